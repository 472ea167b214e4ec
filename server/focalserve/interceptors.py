"""Server interceptors, outermost first: RPC metrics and failed-call logs, bearer-token auth, the
concurrency limit. Each wraps the method handler gRPC found, whatever its kind (unary or streaming), once
per method: a call then costs one guard object, not new functions.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time

import grpc

from . import metrics

log = logging.getLogger("focalserve")

HEALTH_SERVICE = "grpc.health.v1.Health"


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _kind(handler: grpc.RpcMethodHandler):
    """(go-grpc-prometheus grpc_type, behaviour, handler factory)."""
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream", handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return "client_stream", handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return "server_stream", handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return "unary", handler.unary_unary, grpc.unary_unary_rpc_method_handler


def wrap_handler(handler: grpc.RpcMethodHandler, guard, on_message=None) -> grpc.RpcMethodHandler:
    """A handler whose behaviour runs inside `guard(context)` (an async context manager); `on_message(received)`
    is called per message where it can be observed."""
    _, behaviour, factory = _kind(handler)

    async def counted(request_iterator):
        async for request in request_iterator:
            on_message(True)
            yield request

    def incoming(request):
        if on_message is None:
            return request
        if handler.request_streaming:
            return counted(request)
        on_message(True)
        return request

    if inspect.isasyncgenfunction(behaviour):
        async def wrapped(request, context):
            async with guard(context):
                async for response in behaviour(incoming(request), context):
                    if on_message is not None:
                        on_message(False)
                    yield response
    else:
        async def wrapped(request, context):
            async with guard(context):
                response = await behaviour(incoming(request), context)
                if on_message is not None and not handler.response_streaming:
                    on_message(False)
                return response

    return factory(wrapped, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def _status_code(context, error: BaseException | None) -> grpc.StatusCode:
    # GeneratorExit: grpc closed a streaming handler waiting in `yield` (its peer went away while flow
    # control held an answer back), which is a cancellation too, not an unknown failure
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
            else grpc.StatusCode.CANCELLED
    code = context.code()
    if code is not None:
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code)
    return grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK


class _MethodMetrics:
    """One method's metric children, looked up once."""

    def __init__(self, method: str, grpc_type: str):
        service, name = _split(method)
        labels = (grpc_type, service, name)
        self.method = method
        self.labels = labels
        self.started = metrics.GRPC_STARTED.labels(*labels)
        self.seconds = metrics.GRPC_HANDLING_SECONDS.labels(*labels)
        self.received = metrics.GRPC_MSG_RECEIVED.labels(*labels)
        self.sent = metrics.GRPC_MSG_SENT.labels(*labels)

    def count(self, received: bool) -> None:
        (self.received if received else self.sent).inc()

    def guard(self, context) -> "_Measured":
        return _Measured(self, context)


class _Measured:
    """One call: started, handled with its status code, latency; a log line when it failed."""

    __slots__ = ("method", "context", "started", "peer")

    def __init__(self, method: _MethodMetrics, context):
        self.method, self.context = method, context

    async def __aenter__(self):
        self.started = time.perf_counter()
        # read now: after a cancellation the core call is gone and peer() would touch freed memory
        self.peer = self.context.peer()
        self.method.started.inc()

    async def __aexit__(self, exc_type, error, tb):
        seconds = time.perf_counter() - self.started
        code = _status_code(self.context, error)
        metrics.GRPC_HANDLED.labels(*self.method.labels, code.name).inc()
        self.method.seconds.observe(seconds)
        if code is not grpc.StatusCode.OK:
            details = (self.context.details() or "")[:300]
            # the text form carries what the JSON form does; the message quoted (%r), so one call stays one line
            log.warning("call failed: %s %s after %.6fs from %s: %r", self.method.method, code.name, seconds,
                        self.peer, details, extra={"fields": {
                            "event": "call_failed", "method": self.method.method, "code": code.name,
                            "seconds": round(seconds, 6), "peer": self.peer, "details": details}})
        return False


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """go-grpc-prometheus RPC metrics for every call and status, and one log line per failed call."""

    def __init__(self):
        # keyed by the inner handler, not the method: an inner interceptor may answer a method with
        # different handlers (the real one, or auth's denial)
        self._wrapped: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        wrapped = self._wrapped.get(handler)
        if wrapped is None:
            method_metrics = _MethodMetrics(handler_call_details.method, _kind(handler)[0])
            wrapped = self._wrapped[handler] = wrap_handler(handler, method_metrics.guard, method_metrics.count)
        return wrapped


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
        self._denials: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _split(method)[0] == HEALTH_SERVICE:
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return handler
        metrics.REJECTED.labels("unauthenticated").inc()
        if method not in self._denials:
            self._denials[method] = _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                                          "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")
        return self._denials[method]


class _Slot:
    """One call's place under the concurrency limit, or RESOURCE_EXHAUSTED at once."""

    __slots__ = ("limiter", "context")

    def __init__(self, limiter: "ConcurrencyLimitInterceptor", context):
        self.limiter, self.context = limiter, context

    async def __aenter__(self):
        limiter = self.limiter
        if limiter.active >= limiter.limit:
            metrics.REJECTED.labels("overload").inc()
            await self.context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {limiter.limit} calls in progress (--max-concurrent-rpcs); retry later")
        limiter.active += 1

    async def __aexit__(self, *exc):
        self.limiter.active -= 1
        return False


class ConcurrencyLimitInterceptor(grpc.aio.ServerInterceptor):
    """At most `limit` FocalLossService calls at once; more get RESOURCE_EXHAUSTED at once, not a queue."""

    def __init__(self, limit: int, service: str):
        self.limit = limit
        self.active = 0  # only touched on the event loop
        self._service = service
        self._wrapped: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or _split(handler_call_details.method)[0] != self._service:
            return handler
        if handler not in self._wrapped:
            self._wrapped[handler] = wrap_handler(handler, lambda context: _Slot(self, context))
        return self._wrapped[handler]
