"""Server interceptors, outermost first: RPC metrics and failed-call logs, bearer-token auth, the call
gate (drain accounting, the concurrency limit). Each wraps the method handler gRPC found, whatever its kind
(unary or streaming), once per method: a call then costs one guard object, not new functions.

Refusals happen at the headers, before any of the request is read: grpc.aio receives and parses the whole
body of a unary call before it starts the handler, so the gate serves FocalLossService's unary methods
through request-streaming handlers (which gRPC starts at the headers, and which read their one message
themselves), and refusals are request-streaming handlers that abort without reading. An unread body is
held back by HTTP/2 flow control: a refused 128 MiB call costs the server a few KiB, not 128 MiB.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time

import grpc

from . import metrics
from .errors import refusal

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


# Handlers made here that serve a unary method as request-streaming -> the method's own grpc_type, so that
# metrics keep labelling Compute "unary".
_GRPC_TYPE: dict[grpc.RpcMethodHandler, str] = {}


def _grpc_type(handler: grpc.RpcMethodHandler) -> str:
    return _GRPC_TYPE.get(handler) or _kind(handler)[0]


def read_at_headers(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A unary-request unary-response method as a request-streaming handler: gRPC starts it when the headers
    arrive, instead of once the whole body has been received and parsed; it then reads its one message."""
    if handler.request_streaming or handler.response_streaming:
        return handler
    behaviour = handler.unary_unary

    async def at_headers(request_iterator, context):
        # Read to the end of the stream (the client half-closes with its message), not just the first
        # message: the readers (gRPC's async generator, the metrics wrapper's) would otherwise stay suspended
        # holding the request in a reference cycle that only the garbage collector frees: a large request's
        # memory kept per call, and the next request's buffers page-faulted afresh.
        request = None
        async for message in request_iterator:
            if request is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "request: more than one message for a unary method")
            request = message
        if request is None:
            # gRPC itself failed the receive: a message over --max-message-mb, refused from its length
            # prefix, unread (the client already has gRPC's own RESOURCE_EXHAUSTED; this status only
            # names the failure in the log and metrics), or a client that sent none
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "request: not received (over --max-message-mb: refused by gRPC, unread)")
        return await behaviour(request, context)

    converted = grpc.stream_unary_rpc_method_handler(at_headers, request_deserializer=handler.request_deserializer,
                                                     response_serializer=handler.response_serializer)
    _GRPC_TYPE[converted] = "unary"
    return converted


def refuse(handler: grpc.RpcMethodHandler, status: grpc.Status) -> grpc.RpcMethodHandler:
    """A handler for `handler`'s method that ends the call with `status` at the headers, reading nothing."""
    if handler.response_streaming:
        async def refused(request_iterator, context):
            await context.abort_with_status(status)
            yield  # pragma: no cover - makes this an async generator, as a streaming answer must be
        factory = grpc.stream_stream_rpc_method_handler
    else:
        async def refused(request_iterator, context):
            await context.abort_with_status(status)
        factory = grpc.stream_unary_rpc_method_handler
    denial = factory(refused, request_deserializer=handler.request_deserializer,
                     response_serializer=handler.response_serializer)
    _GRPC_TYPE[denial] = _grpc_type(handler)
    return denial


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

    result = factory(wrapped, request_deserializer=handler.request_deserializer,
                     response_serializer=handler.response_serializer)
    if handler in _GRPC_TYPE:
        _GRPC_TYPE[result] = _GRPC_TYPE[handler]
    return result


def status_code(context, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with, as seen from a wrapper around its handler."""
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
        code = status_code(self.context, error)
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
            method_metrics = _MethodMetrics(handler_call_details.method, _grpc_type(handler))
            wrapped = self._wrapped[handler] = wrap_handler(handler, method_metrics.guard, method_metrics.count)
        return wrapped


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call except the health service (probes); refuses
    others at the headers, unread."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()
        self._denials: dict[tuple[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _split(method)[0] == HEALTH_SERVICE:
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return handler
        reason = "TOKEN_INVALID" if given else "TOKEN_MISSING"
        metrics.REJECTED.labels("unauthenticated").inc()
        denial = self._denials.get((handler, reason))
        if denial is None:
            message = ("authorization: wrong bearer token" if given else
                       "authorization: missing (metadata 'authorization: Bearer <token>')")
            denial = self._denials[handler, reason] = refuse(
                handler, refusal(grpc.StatusCode.UNAUTHENTICATED, message, reason, header="authorization"))
        return denial


class _Slot:
    """One call's place in the gate: counted for the drain from its headers on, or RESOURCE_EXHAUSTED at once
    when the concurrency limit is reached (before its body is read)."""

    __slots__ = ("gate", "context")

    def __init__(self, gate: "CallGate", context):
        self.gate, self.context = gate, context

    async def __aenter__(self):
        gate = self.gate
        if gate.limit and gate.active >= gate.limit:
            metrics.REJECTED.labels("overload").inc()
            await self.context.abort_with_status(gate.overloaded)
        gate.active += 1
        gate.idle.clear()
        # released when gRPC is done with the call, not when the handler returns: a unary answer is sent
        # after that, and until then it (and gRPC's copy of it) is memory the bound counts
        self.context.add_done_callback(gate.leave)

    async def __aexit__(self, *exc):
        return False


class CallGate(grpc.aio.ServerInterceptor):
    """The service's calls from their headers on: counted (the drain waits for them), at most `limit` at
    once (0: no limit; more get RESOURCE_EXHAUSTED at once, not a queue), refused with UNAVAILABLE once
    `draining`. Health Watch streams end (UNAVAILABLE) at `release_watches()`: they never end by themselves
    and would hold the server's stop for its whole grace period."""

    def __init__(self, limit: int, service: str):
        self.limit = limit
        self.active = 0  # only touched on the event loop
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False
        self.overloaded = refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"--max-concurrent-rpcs: server busy, {limit} calls in progress; retry later", "OVERLOADED",
            limit=str(limit))
        self._draining = refusal(grpc.StatusCode.UNAVAILABLE,
                                 "draining: the server is shutting down; retry (another replica answers)", "DRAINING")
        self._released = asyncio.Event()
        self._service = service
        self._wrapped: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}
        self._refused: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    async def wait_idle(self) -> None:
        await self.idle.wait()

    def leave(self, _context=None) -> None:
        self.active -= 1
        if not self.active:
            self.idle.set()

    def release_watches(self) -> None:
        self._released.set()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, name = _split(handler_call_details.method)
        if service == HEALTH_SERVICE and name == "Watch":
            return self._wrap(handler, self._watch)
        if service != self._service:
            return handler
        if self.draining:
            metrics.REJECTED.labels("draining").inc()
            denial = self._refused.get(handler)
            if denial is None:
                denial = self._refused[handler] = refuse(handler, self._draining)
            return denial
        return self._wrap(handler, lambda h: wrap_handler(read_at_headers(h), lambda context: _Slot(self, context)))

    def _wrap(self, handler, make):
        wrapped = self._wrapped.get(handler)
        if wrapped is None:
            wrapped = self._wrapped[handler] = make(handler)
        return wrapped

    def _watch(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behaviour = handler.unary_stream  # a coroutine writing with context.write (grpc_health's aio servicer)

        async def watch(request, context):
            task = asyncio.ensure_future(behaviour(request, context))
            released = asyncio.ensure_future(self._released.wait())
            try:
                await asyncio.wait((task, released), return_when=asyncio.FIRST_COMPLETED)
            finally:
                released.cancel()
                if not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if task.cancelled():
                await context.abort_with_status(self._draining)
            return task.result()

        return grpc.unary_stream_rpc_method_handler(watch, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)
