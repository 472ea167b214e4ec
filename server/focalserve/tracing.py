"""OpenTelemetry traces: off unless the standard OTEL_* environment asks for them (README "Traces").

When on, every call (the health service's aside: probes would drown the traces) gets a SERVER span that
continues the caller's W3C `traceparent` (or whatever OTEL_PROPAGATORS names), with the method, the status
and, for a unary Compute, the request id, elements, label format and backend; the compute step of each
item is its child span. Spans go out over OTLP/gRPC (OTEL_EXPORTER_OTLP_ENDPOINT, ..._INSECURE, ..._HEADERS,
OTEL_TRACES_SAMPLER, OTEL_SERVICE_NAME: the SDK reads them), in batches from a thread of the SDK. The
server's log lines of a traced call carry its `trace_id` and `span_id`.

When off (the default) nothing here is imported from OpenTelemetry and the hooks in the servicer cost a
global lookup and a call each.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
from collections.abc import Mapping
from types import SimpleNamespace

import grpc

from . import __version__
from .interceptors import _grpc_type, status_code, wrap_handler

log = logging.getLogger("focalserve")

UNTRACED_SERVICES = ("grpc.health.v1.Health",)

_tracer = None          # an SDK Tracer while tracing is on
_provider = None
_otel = None            # the OpenTelemetry names used per call, bound once by setup()
_OK_CODE = grpc.StatusCode.OK
# The current call's span, and whether it is a unary call (whose single item's details go on it too).
# A ContextVar of our own rather than OpenTelemetry's attached context: a streaming handler may be closed
# from another context, where detaching would fail.
_call: contextvars.ContextVar = contextvars.ContextVar("focalserve_call_span", default=None)
_NULL = contextlib.nullcontext()


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint, or OTEL_TRACES_EXPORTER naming an exporter."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER")
    if exporters is not None:
        return any(e.strip() not in ("", "none") for e in exporters.split(","))
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def enabled() -> bool:
    return _tracer is not None


def setup(env: Mapping[str, str] = os.environ) -> bool:
    """Turns tracing on when the environment asks for it and OpenTelemetry's SDK is installed."""
    global _tracer, _provider, _otel
    if not wanted(env):
        return False
    try:
        from opentelemetry import propagate, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as e:
        log.warning("OTEL_* asks for traces but the OpenTelemetry SDK is not installed (%s): tracing stays off",
                    e.name)
        return False
    attributes = {"service.version": __version__}
    if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.name"] = "focalserve"
    # the sampler comes from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default: parentbased_always_on)
    provider = TracerProvider(resource=Resource.create(attributes))
    exporters = [e.strip() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()]
    for name in exporters:
        if name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
            if protocol != "grpc":
                log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: focalserve ships the OTLP/gRPC exporter only; "
                            "exporting over grpc", protocol)
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name != "none":
            log.warning("OTEL_TRACES_EXPORTER=%s: unknown exporter, ignored (otlp and console are known)", name)
    _otel = SimpleNamespace(extract=propagate.extract, set_span_in_context=trace.set_span_in_context,
                            SERVER=trace.SpanKind.SERVER, Status=trace.Status, ERROR=trace.StatusCode.ERROR)
    _provider = provider
    _tracer = provider.get_tracer("focalserve", __version__)
    log.addFilter(_add_trace_ids)
    log.info("tracing on: exporters %s, endpoint %s, sampler %s", ",".join(exporters),
             env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "default",
             env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
             extra={"fields": {"event": "tracing_on", "exporters": exporters}})
    return True


def shutdown() -> None:
    """Sends the spans still queued (the drain's last step)."""
    global _tracer, _provider, _otel
    if _provider is not None:
        _provider.shutdown()
    log.removeFilter(_add_trace_ids)
    _tracer = _provider = _otel = None


def server_interceptors() -> list:
    """The tracing interceptor to put outermost (before the metrics one, so that its failed-call log line
    is written inside the span), or nothing when tracing is off."""
    return [TracingInterceptor()] if _tracer is not None else []


# ---- hooks in the servicer ----

def bind(work):
    """`work` to run on a pool thread inside the current call's trace (run_in_executor does not carry
    context variables over)."""
    if _tracer is None or _call.get() is None:
        return work
    context = contextvars.copy_context()
    return lambda *args: context.run(work, *args)


def compute_span(request_id: str):
    """The compute step of one item, as a child of the call's span (a context manager yielding the span,
    or None when tracing is off)."""
    if _tracer is None:
        return _NULL
    call = _call.get()
    if call is not None and not call[0].is_recording():  # the sampler dropped this trace
        return _NULL
    return _compute_span(request_id)


@contextlib.contextmanager
def _compute_span(request_id: str):
    call = _call.get()
    parent = _otel.set_span_in_context(call[0]) if call is not None else None
    if call is not None and call[1]:
        call[0].set_attribute("focalloss.request_id", request_id)
    span = _tracer.start_span("focalloss.compute", context=parent, attributes={"focalloss.request_id": request_id})
    try:
        yield span
    except BaseException as e:
        span.set_status(_otel.Status(_otel.ERROR, f"{type(e).__name__}: {e}"[:300]))
        raise
    finally:
        span.end()


def annotate(span, label_format: str, result) -> None:
    """The item's outcome on its compute span, and on the call's span for a unary call."""
    if span is None:
        return
    attributes = {"focalloss.elements": result.elements, "focalloss.label_format": label_format,
                  "focalloss.backend": result.backend, "focalloss.compute_seconds": result.compute_seconds}
    span.set_attributes(attributes)
    call = _call.get()
    if call is not None and call[1]:
        call[0].set_attributes(attributes)


# ---- the server span of each call ----

class _CallSpan:
    __slots__ = ("name", "attributes", "unary", "context", "span", "token")

    def __init__(self, name: str, attributes: dict, unary: bool, context):
        self.name, self.attributes, self.unary, self.context = name, attributes, unary, context

    async def __aenter__(self):
        carrier = {key: value for key, value in (self.context.invocation_metadata() or ()) if isinstance(value, str)}
        self.span = _tracer.start_span(self.name, context=_otel.extract(carrier), kind=_otel.SERVER,
                                       attributes=self.attributes)
        self.token = _call.set((self.span, self.unary))

    async def __aexit__(self, exc_type, error, tb):
        code = status_code(self.context, error)
        self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not _OK_CODE:
            details = self.context.details() if error is None or code is not grpc.StatusCode.UNKNOWN else str(error)
            self.span.set_status(_otel.Status(_otel.ERROR, f"{code.name}: {details or ''}"[:300]))
        self.span.end()
        try:
            _call.reset(self.token)
        except ValueError:  # a stream closed from another context: that context never saw the span
            pass
        return False


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span around each call, continuing the caller's trace context from the call's metadata."""

    def __init__(self):
        self._wrapped: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        if service in UNTRACED_SERVICES:
            return handler
        wrapped = self._wrapped.get(handler)
        if wrapped is None:
            unary = _grpc_type(handler) == "unary"  # Compute is served request-streaming (CallGate)
            attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
            name = f"{service}/{method}"
            wrapped = self._wrapped[handler] = wrap_handler(
                handler, lambda context: _CallSpan(name, attributes, unary, context))
        return wrapped


def _add_trace_ids(record: logging.LogRecord) -> bool:
    call = _call.get()
    if call is not None:
        ids = call[0].get_span_context()
        record.fields = {**getattr(record, "fields", {}), "trace_id": format(ids.trace_id, "032x"),
                         "span_id": format(ids.span_id, "016x")}
    return True
