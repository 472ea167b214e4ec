"""Traces: a real server exporting over OTLP/gRPC to a real receiver started here (opentelemetry-proto's
TraceService), called by the Python client inside a span of the caller's own: the server's spans arrive in
the caller's trace, with their attributes; the log line of a failed call carries its trace id. Off by
default; the client works without OpenTelemetry installed."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider

from conftest import EXPECTED_BACKEND, REPO, start_server
from focalloss.v1 import focal_loss_pb2 as pb
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc
from focalserve import tracing
from focalserve.service import INLINE_BYTES
from focalserve_client import FocalLossClient
from focalserve_client.client import FocalLossError, build_request

SERVICE = "focalloss.v1.FocalLossService"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self):
        self._lock = threading.Lock()
        self._spans: list[dict] = []

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self._spans.append({
                            "name": span.name, "kind": span.kind, "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(), "parent_span_id": span.parent_span_id.hex(),
                            "attributes": _attributes(span.attributes), "status": span.status,
                            "resource": resource})
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, trace_id: str) -> list[dict]:
        with self._lock:
            return [s for s in self._spans if s["trace_id"] == trace_id]

    def wait(self, trace_id: str, names: dict[str, int], timeout: float = 20.0) -> list[dict]:
        """The spans of `trace_id` once `names` ({span name: how many}) have arrived."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.spans(trace_id)
            counts = {name: sum(s["name"] == name for s in found) for name in names}
            if counts == names or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert counts == names, f"spans of trace {trace_id}: {[s['name'] for s in found]}"
        return found


def _attributes(pairs) -> dict:
    out = {}
    for kv in pairs:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind) if kind else None
    return out


@pytest.fixture(scope="module")
def receiver():
    sink = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    sink.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield sink
    server.stop(0)


@pytest.fixture(scope="module")
def traced(receiver, tmp_path_factory):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_SERVICE_NAME": "focalserve-under-test", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    srv = start_server(tmp_path_factory.mktemp("traced"), "--log-format", "json", "--workers", "2", env=env)
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def tracer():
    """The caller's own tracer (an SDK provider of the test's, exporting nowhere)."""
    return TracerProvider().get_tracer("training-loop")


def _arrays(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 2, n).astype(np.float32), (rng.random(n) < 0.2).astype(np.float32)


def _ids(span) -> tuple[str, str]:
    context = span.get_span_context()
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def test_client_call_continues_the_callers_trace(traced, receiver, tracer):
    n = INLINE_BYTES // 8 + 1000  # computed on a pool thread: the trace follows the work there
    logit, label = _arrays(n)
    with FocalLossClient(traced.target) as client, tracer.start_as_current_span("training-step") as step:
        result = client.compute(logit, label, reduction="sum", compute_grad=True, request_id="traced-1")
    trace_id, step_span_id = _ids(step)
    spans = receiver.wait(trace_id, {f"{SERVICE}/Compute": 1, "focalloss.compute": 1})
    (call,) = [s for s in spans if s["name"] == f"{SERVICE}/Compute"]
    (compute,) = [s for s in spans if s["name"] == "focalloss.compute"]
    assert call["kind"] == trace_pb2.Span.SPAN_KIND_SERVER and call["parent_span_id"] == step_span_id
    assert compute["parent_span_id"] == call["span_id"]
    expected = {"focalloss.request_id": "traced-1", "focalloss.elements": n, "focalloss.label_format": "dense",
                "focalloss.backend": EXPECTED_BACKEND}
    assert expected.items() <= call["attributes"].items()
    assert expected.items() <= compute["attributes"].items()
    assert compute["attributes"]["focalloss.compute_seconds"] == pytest.approx(result.stats.compute_seconds)
    assert {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": "Compute",
            "rpc.grpc.status_code": 0}.items() <= call["attributes"].items()
    assert call["status"].code != trace_pb2.Status.STATUS_CODE_ERROR
    assert call["resource"]["service.name"] == "focalserve-under-test"
    print(f"\ncaller's span {trace_id}/{step_span_id}; received: {json.dumps(call, default=str)}")


def test_a_failed_call_is_traced_and_its_log_line_carries_the_trace_id(traced, receiver, tracer):
    logit, label = _arrays(100, seed=1)
    label[3] = 7.0
    with FocalLossClient(traced.target) as client, tracer.start_as_current_span("bad-step") as step:
        with pytest.raises(FocalLossError) as refused:
            client.compute(logit, label, request_id="traced-bad")
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    trace_id, _ = _ids(step)
    spans = receiver.wait(trace_id, {f"{SERVICE}/Compute": 1, "focalloss.compute": 1})
    (call,) = [s for s in spans if s["name"] == f"{SERVICE}/Compute"]
    (compute,) = [s for s in spans if s["name"] == "focalloss.compute"]
    assert call["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert call["attributes"]["focalloss.request_id"] == "traced-bad"
    assert call["status"].code == trace_pb2.Status.STATUS_CODE_ERROR
    assert call["status"].message.startswith("INVALID_ARGUMENT: label")
    assert compute["status"].code == trace_pb2.Status.STATUS_CODE_ERROR
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entries = [json.loads(line) for line in traced.log().splitlines() if line.startswith("{")]
        failed = [e for e in entries if e.get("event") == "call_failed" and e.get("trace_id") == trace_id]
        if failed:
            break
        time.sleep(0.1)
    assert failed, "no call_failed log line with the call's trace id"
    assert failed[0]["code"] == "INVALID_ARGUMENT" and failed[0]["span_id"] == call["span_id"]


def test_a_stream_is_one_span_with_a_compute_span_per_item(traced, receiver, tracer):
    with FocalLossClient(traced.target) as client, tracer.start_as_current_span("eval") as step:
        batches = [dict(logit=a, label=b, request_id=f"item-{i}") for i, (a, b) in
                   enumerate(_arrays(500 + i, seed=i) for i in range(3))]
        results = list(client.stream(batches))
    assert len(results) == 4  # three results and the summary
    trace_id, step_span_id = _ids(step)
    spans = receiver.wait(trace_id, {f"{SERVICE}/ComputeStream": 1, "focalloss.compute": 3})
    (call,) = [s for s in spans if s["name"] == f"{SERVICE}/ComputeStream"]
    assert call["parent_span_id"] == step_span_id
    items = sorted((s for s in spans if s["name"] == "focalloss.compute"), key=lambda s: s["attributes"]["focalloss.request_id"])
    assert [s["attributes"]["focalloss.request_id"] for s in items] == ["item-0", "item-1", "item-2"]
    assert [s["attributes"]["focalloss.elements"] for s in items] == [500, 501, 502]
    assert all(s["parent_span_id"] == call["span_id"] for s in items)


def test_a_raw_w3c_traceparent_is_continued(traced, receiver):
    """Any gRPC client: the W3C header alone is enough."""
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    request = build_request(*_arrays(64), request_id="raw")
    with grpc.insecure_channel(traced.target) as channel:
        pb_grpc.FocalLossServiceStub(channel).Compute(request, timeout=10,
                                                      metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),))
    spans = receiver.wait(trace_id, {f"{SERVICE}/Compute": 1, "focalloss.compute": 1})
    (call,) = [s for s in spans if s["name"] == f"{SERVICE}/Compute"]
    assert call["parent_span_id"] == parent_id and call["attributes"]["focalloss.request_id"] == "raw"


def test_tracing_is_off_unless_the_environment_asks():
    assert not tracing.wanted({})
    assert not tracing.wanted({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert not tracing.wanted({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})


def test_server_without_otel_environment_does_not_trace(server, traced):
    assert "tracing on" not in server.log()
    assert "tracing on" in traced.log()


def test_sampler_from_the_environment_drops_traces(receiver, tmp_path, tracer):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_TRACES_SAMPLER": "always_off", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    srv = start_server(tmp_path, env=env)
    try:
        with FocalLossClient(srv.target) as client, tracer.start_as_current_span("unsampled") as step:
            client.compute(*_arrays(64))
    finally:
        assert srv.stop() == 0  # the drain flushes whatever was queued
    assert receiver.spans(_ids(step)[0]) == []


def test_client_works_without_opentelemetry(server):
    """With OpenTelemetry not importable, the client's channel is left as it is and calls work."""
    code = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "import numpy as np, grpc\n"
        "from focalserve_client import tracing, FocalLossClient\n"
        "assert tracing.propagate is None\n"
        "channel = grpc.insecure_channel('x:1'); assert tracing.intercept(channel) is channel\n"
        f"with FocalLossClient('{server.target}') as c:\n"
        "    r = c.compute(np.array([0.5, -1.0], np.float32), np.array([1.0, 0.0], np.float32))\n"
        "print(float(r.loss))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert float(r.stdout) > 0


def test_tracing_benchmark_runs_and_every_span_arrives():
    """benchmarks/tracing.py --smoke: every row printed with figures; the traced server's spans all arrived."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tracing.py"), "--smoke"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| Compute")]
    assert len(rows) == 6 and all(line.count("µs") == 3 for line in rows), done.stdout
    # warm-up 20 calls, then 20 of 1K and 5 of 256K: two spans each (the call, its compute step)
    assert "90 spans received" in done.stdout, done.stdout
