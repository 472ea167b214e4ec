"""Server interceptors, outermost first: RPC metrics and failed-call logs, bearer-token auth, the
concurrency limit. Each wraps the method handler gRPC found, whatever its kind (unary or streaming).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import Callable

import grpc

from . import metrics

log = logging.getLogger("focalserve")

HEALTH_SERVICE = "grpc.health.v1.Health"


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _kind(handler: grpc.RpcMethodHandler):
    """(go-grpc-prometheus grpc_type, behaviour, handler factory, behaviour's attribute name)."""
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream", handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return "client_stream", handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return "server_stream", handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return "unary", handler.unary_unary, grpc.unary_unary_rpc_method_handler


def wrap_handler(handler: grpc.RpcMethodHandler, around: Callable, count_messages=None) -> grpc.RpcMethodHandler:
    """A handler whose behaviour runs inside `around(call, request, context)`, an async context manager
    factory; `count_messages(received: bool)` is called per message where it can be observed."""
    _, behaviour, factory = _kind(handler)

    def counted_requests(request_iterator):
        async def iterate():
            async for request in request_iterator:
                count_messages(True)
                yield request
        return iterate()

    if inspect.isasyncgenfunction(behaviour):
        async def wrapped(request, context):
            async with around(context):
                if handler.request_streaming and count_messages:
                    request = counted_requests(request)
                elif count_messages:
                    count_messages(True)
                async for response in behaviour(request, context):
                    if count_messages:
                        count_messages(False)
                    yield response
    else:
        async def wrapped(request, context):
            async with around(context):
                if handler.request_streaming and count_messages:
                    request = counted_requests(request)
                elif count_messages:
                    count_messages(True)
                response = await behaviour(request, context)
                if count_messages and not handler.response_streaming:
                    count_messages(False)
                return response

    return factory(wrapped, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def _status_code(context, error: BaseException | None) -> grpc.StatusCode:
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
            else grpc.StatusCode.CANCELLED
    code = context.code()
    if code is not None:
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code)
    return grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """go-grpc-prometheus RPC metrics for every call and status, and one log line per failed call."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split(handler_call_details.method)
        grpc_type = _kind(handler)[0]
        labels = (grpc_type, service, method)
        received = metrics.GRPC_MSG_RECEIVED.labels(*labels)
        sent = metrics.GRPC_MSG_SENT.labels(*labels)

        def count(is_received: bool) -> None:
            (received if is_received else sent).inc()

        class Around:
            def __init__(self, context):
                self.context = context

            async def __aenter__(self):
                self.started = time.perf_counter()
                # read now: after a cancellation the core call is gone and peer() would touch freed memory
                self.peer = self.context.peer()
                metrics.GRPC_STARTED.labels(*labels).inc()

            async def __aexit__(self, exc_type, error, tb):
                seconds = time.perf_counter() - self.started
                code = _status_code(self.context, error)
                metrics.GRPC_HANDLED.labels(*labels, code.name).inc()
                metrics.GRPC_HANDLING_SECONDS.labels(*labels).observe(seconds)
                if code is not grpc.StatusCode.OK:
                    details = self.context.details() if hasattr(self.context, "details") else ""
                    log.warning("call failed: %s %s", handler_call_details.method, code.name, extra={"fields": {
                        "event": "call_failed", "method": handler_call_details.method, "code": code.name,
                        "seconds": round(seconds, 6), "peer": self.peer,
                        "details": (details or "")[:300]}})
                return False

        return wrap_handler(handler, Around, count)


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    _, behaviour, factory = _kind(handler)

    if inspect.isasyncgenfunction(behaviour):
        async def deny(request, context):
            await context.abort(code, message)
            yield  # pragma: no cover - makes this an async generator like the behaviour it replaces
    else:
        async def deny(request, context):
            await context.abort(code, message)

    return factory(deny, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call except the health service (probes)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or _split(handler_call_details.method)[0] == HEALTH_SERVICE:
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return handler
        metrics.REJECTED.labels("unauthenticated").inc()
        return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                     "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")


class ConcurrencyLimitInterceptor(grpc.aio.ServerInterceptor):
    """At most `limit` FocalLossService calls at once; more get RESOURCE_EXHAUSTED at once, not a queue."""

    def __init__(self, limit: int, service: str):
        self._limit = limit
        self._service = service
        self._active = 0  # only touched on the event loop

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or _split(handler_call_details.method)[0] != self._service:
            return handler
        limiter = self

        class Around:
            def __init__(self, context):
                self.context = context

            async def __aenter__(self):
                if limiter._active >= limiter._limit:
                    metrics.REJECTED.labels("overload").inc()
                    await self.context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"server busy: {limiter._limit} calls in progress (--max-concurrent-rpcs); retry later")
                limiter._active += 1

            async def __aexit__(self, *exc):
                limiter._active -= 1
                return False

        return wrap_handler(handler, Around)
