"""Faults: cancelled streams, expired deadlines, clients killed with calls in flight, SIGTERM under load
with a second replica, unexpected backend exceptions, and the GPU out-of-memory fallback.

Each test runs real server processes. Faults the server's code cannot be made to produce from outside (a
backend raising, a GPU without memory) come from `tests/fault_server.py`, a test-only launcher that
patches focalserve before running its `main`; the production code has no test hooks.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ServerProcess, free_port, start_server
from focalloss.v1 import focal_loss_pb2 as pb
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc
from focalserve.service import INLINE_BYTES
from focalserve_client import FocalLossClient
from focalserve_client.client import build_request
from test_operations import _sample, scrape

SERVICE = "focalloss.v1.FocalLossService"
BIG = [("grpc.max_receive_message_length", 1 << 28), ("grpc.max_send_message_length", 1 << 28)]
LAUNCHER = Path(__file__).with_name("fault_server.py")


def _request(n: int, seed: int = 0, **kwargs) -> pb.ComputeRequest:
    rng = np.random.default_rng(seed)
    return build_request(rng.normal(0, 3, n).astype(np.float32), (rng.random(n) < 0.1).astype(np.float32), **kwargs)


SMALL = _request(64, seed=1, reduction="none", compute_grad=True, request_id="small")


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _answers(target: str) -> pb.ComputeResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.FocalLossServiceStub(channel).Compute(SMALL, timeout=10)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)


def _calls_open(metrics: dict) -> float:
    """FocalLossService calls started and not yet finished, by the server's own counters."""
    return (_sample(metrics, "grpc_server_started_total", grpc_service=SERVICE)
            - _sample(metrics, "grpc_server_handled_total", grpc_service=SERVICE))


def start_fault_server(tmp_path: Path, inject: str, *args: str) -> ServerProcess:
    """conftest.start_server through tests/fault_server.py with `--inject <inject>`."""
    return start_server(tmp_path, *args, command=[sys.executable, str(LAUNCHER), "--inject", inject])


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    metrics_port = free_port()
    srv = start_server(tmp_path_factory.mktemp("faults"), "--workers", "2", "--metrics-port", str(metrics_port),
                       "--metrics-host", "127.0.0.1")
    srv.metrics_port = metrics_port
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


# ---- the client gives up ----

def test_cancel_mid_stream_then_the_next_call_works(metered):
    request = _request(200_000, reduction="none", compute_grad=True)

    def endless():
        while True:
            yield request

    with grpc.insecure_channel(metered.target, BIG) as channel:
        call = pb_grpc.FocalLossServiceStub(channel).ComputeStream(endless(), timeout=60)
        next(call)
        next(call)
        call.cancel()
        assert call.code() == grpc.StatusCode.CANCELLED
    assert _answers(metered.target).stats.elements == 64
    _wait_for(lambda: _sample(scrape(metered.metrics_port), "focalloss_inflight_requests") == 0, 10,
              "focalloss_inflight_requests back to 0 after the cancelled stream")
    assert _serving(metered.target)


def test_deadline_expiring_while_a_large_request_is_worked_on(metered):
    # γ = 0.3 (pow(), the kernel's slowest path): the server's work, not the transfer, is most of a call
    request = _request(8_000_000, reduction="none", compute_grad=True, request_id="big", gamma=0.3)
    with grpc.insecure_channel(metered.target, BIG) as channel:
        stub = pb_grpc.FocalLossServiceStub(channel)
        calls = []
        for _ in range(2):  # the faster of two, so that a slow first call (memory growing) cannot set it
            started = time.perf_counter()
            stub.Compute(request, timeout=60)
            calls.append(time.perf_counter() - started)
        full = min(calls)
        before = scrape(metered.metrics_port)
        with pytest.raises(grpc.RpcError) as late:
            stub.Compute(request, timeout=full / 3)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the server keeps serving, and lets go of the abandoned call
        assert stub.Compute(SMALL, timeout=10).stats.elements == 64
    _wait_for(lambda: _calls_open(scrape(metered.metrics_port)) == 0
              and _sample(scrape(metered.metrics_port), "focalloss_inflight_requests") == 0, 10,
              "the abandoned call and its compute finished on the server")
    after = scrape(metered.metrics_port)
    # the abandoned call ended without an answer: never OK on the server's side
    assert _sample(after, "grpc_server_handled_total", grpc_method="Compute", grpc_code="OK") - \
        _sample(before, "grpc_server_handled_total", grpc_method="Compute", grpc_code="OK") == 1  # SMALL
    assert _serving(metered.target)


@pytest.fixture(scope="module")
def boom(tmp_path_factory):
    metrics_port = free_port()
    srv = start_fault_server(tmp_path_factory.mktemp("boom"), "boom", "--backend", "cpu", "--workers", "2",
                             "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1")
    srv.metrics_port = metrics_port
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def test_deadline_expiring_mid_compute(boom):
    """The compute of a "slow…" request takes 1.5 s longer (tests/fault_server.py): a 0.5 s deadline
    certainly expires while the backend works on it."""
    def ended_without_answer(metrics: dict) -> float:
        return sum(_sample(metrics, "grpc_server_handled_total", grpc_method="Compute", grpc_code=code)
                   for code in ("DEADLINE_EXCEEDED", "CANCELLED"))

    before = ended_without_answer(scrape(boom.metrics_port))
    with grpc.insecure_channel(boom.target) as channel:
        stub = pb_grpc.FocalLossServiceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as late:
            # above service.INLINE_BYTES (8 bytes an element): computed on a pool thread, the loop stays free
            stub.Compute(_request(INLINE_BYTES // 8 + 1000, request_id="slow-1", compute_grad=True), timeout=0.5)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.2, "the caller waited for the compute instead of its deadline"
        assert _sample(scrape(boom.metrics_port), "focalloss_inflight_requests") == 1  # still computing
        assert stub.Compute(SMALL, timeout=10).stats.elements == 64  # the other worker answers meanwhile
    _wait_for(lambda: _sample(scrape(boom.metrics_port), "focalloss_inflight_requests") == 0, 10,
              "the abandoned compute finished")
    # the call is counted as handled when grpc ends its handler, on the event loop
    _wait_for(lambda: _calls_open(scrape(boom.metrics_port)) == 0, 10, "the abandoned call was counted")
    metrics = scrape(boom.metrics_port)
    # The client's timer starts before the server's (which counts from the request's arrival), so the
    # client may give up and reset the stream just before the server's own deadline fires: the server then
    # sees a cancellation, as any gRPC server would. Either way the call ended without an answer.
    assert ended_without_answer(metrics) - before == 1
    assert _serving(boom.target)


CHILD = r"""
import sys, time
import grpc, numpy as np
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc
from focalserve_client.client import build_request
rng = np.random.default_rng(0)
n = 4_000_000
request = build_request(rng.normal(0, 3, n).astype(np.float32), (rng.random(n) < 0.1).astype(np.float32),
                        reduction="none", compute_grad=True)
channel = grpc.insecure_channel(sys.argv[1], [("grpc.max_receive_message_length", 1 << 28)])
stub = pb_grpc.FocalLossServiceStub(channel)
calls = [stub.Compute.future(request, timeout=120) for _ in range(4)]
def endless():
    while True:
        yield request
stream = stub.ComputeStream(endless(), timeout=120)
print("started", flush=True)
time.sleep(300)
"""


def test_client_killed_with_calls_in_flight(metered):
    pid = metered.process.pid
    _wait_for(lambda: _calls_open(scrape(metered.metrics_port)) == 0, 10, "a quiet server to start from")
    fds_before = _fds(pid)
    before = scrape(metered.metrics_port)
    child = subprocess.Popen([sys.executable, "-c", CHILD, metered.target], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "started"
        # kill it once the server has computed some of its work and still has calls open (its endless
        # stream at least: the child never reads the answers, so flow control holds the stream open)
        def working() -> bool:
            now = scrape(metered.metrics_port)
            stream_open = _sample(now, "grpc_server_started_total", grpc_method="ComputeStream") - \
                _sample(now, "grpc_server_handled_total", grpc_method="ComputeStream")
            stream_items = _sample(now, "grpc_server_msg_received_total", grpc_method="ComputeStream") - \
                _sample(before, "grpc_server_msg_received_total", grpc_method="ComputeStream")
            return stream_open >= 1 and stream_items >= 1 and _sample(now, "focalloss_elements_total") > \
                _sample(before, "focalloss_elements_total")
        _wait_for(working, 30, "the child's calls reached the backend")
        opened = _calls_open(scrape(metered.metrics_port))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
    assert opened >= 1
    _wait_for(lambda: _sample(scrape(metered.metrics_port), "focalloss_inflight_requests") == 0, 10,
              "focalloss_inflight_requests back to 0 after the client died")
    _wait_for(lambda: _calls_open(scrape(metered.metrics_port)) == 0, 10, "every call of the dead client ended")
    _wait_for(lambda: _fds(pid) <= fds_before, 10, f"file descriptors back to {fds_before} (now {_fds(pid)})")
    after = scrape(metered.metrics_port)
    cancelled = _sample(after, "grpc_server_handled_total", grpc_service=SERVICE, grpc_code="CANCELLED") - \
        _sample(before, "grpc_server_handled_total", grpc_service=SERVICE, grpc_code="CANCELLED")
    assert cancelled >= 1, "the dead client's calls should end CANCELLED on the server"
    assert _sample(after, "grpc_server_handled_total", grpc_service=SERVICE, grpc_code="UNKNOWN") == \
        _sample(before, "grpc_server_handled_total", grpc_service=SERVICE, grpc_code="UNKNOWN")
    assert _serving(metered.target)
    assert _answers(metered.target).stats.elements == 64
    assert metered.process.poll() is None


# ---- SIGTERM under load, with a second replica ----

def test_sigterm_with_16_busy_clients_loses_no_call(tmp_path):
    """Replica A drains on SIGTERM while 16 threads keep calling through one client whose target lists A
    then B with pick_first: calls A accepted complete, new calls are refused with UNAVAILABLE, and the
    client's retry policy carries them to B: no error reaches a caller."""
    replicas = []
    for _ in range(2):
        metrics_port = free_port()
        srv = start_server(tmp_path, "--workers", "2", "--grace-seconds", "20", "--metrics-port", str(metrics_port),
                           "--metrics-host", "127.0.0.1")
        srv.metrics_port = metrics_port
        replicas.append(srv)
    a, b = replicas
    rng = np.random.default_rng(3)
    logit = rng.normal(0, 3, 50_000).astype(np.float32)
    label = (rng.random(50_000) < 0.1).astype(np.float32)
    errors: list[str] = []
    served = [0] * 16
    stop = threading.Event()
    try:
        with FocalLossClient(f"ipv4:{a.target},{b.target}", timeout=30,
                             options=[("grpc.lb_policy_name", "pick_first")]) as client:
            expected = client.compute(logit, label, compute_grad=True)

            def keep_calling(i: int):
                while not stop.is_set():
                    try:
                        r = client.compute(logit, label, compute_grad=True)
                        assert r.loss == expected.loss and np.array_equal(r.grad, expected.grad)
                        served[i] += 1
                    except Exception as e:  # collected and asserted below
                        errors.append(f"{type(e).__name__}: {e}")

            # work accepted by A that outlives the SIGTERM: a stream sending an item every 0.1 s for 2 s
            stream_results: list[pb.ComputeStreamResponse] = []

            def slow_items():
                for _ in range(30):
                    time.sleep(0.1)
                    yield _request(10_000)

            def stream_to_a():
                with grpc.insecure_channel(a.target) as channel:
                    try:
                        call = pb_grpc.FocalLossServiceStub(channel).ComputeStream(slow_items(), timeout=60)
                        stream_results.extend(call)
                    except grpc.RpcError as e:
                        errors.append(f"stream to A: {e.code().name}: {e.details()}")

            callers = [threading.Thread(target=keep_calling, args=(i,)) for i in range(16)]
            streamer = threading.Thread(target=stream_to_a)
            for t in callers + [streamer]:
                t.start()
            _wait_for(lambda: sum(served) >= 200, 30, "200 calls served before the SIGTERM")
            assert _sample(scrape(b.metrics_port), "grpc_server_handled_total", grpc_method="Compute") == 0, \
                "pick_first should have sent every call to A, listed first"
            a.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with grpc.insecure_channel(a.target) as fresh:  # new work is refused while A drains
                with pytest.raises(grpc.RpcError) as refused:
                    pb_grpc.FocalLossServiceStub(fresh).Compute(SMALL, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            at_sigterm = sum(served)
            time.sleep(2.5)
            stop.set()
            for t in callers + [streamer]:
                t.join(60)
            assert not any(t.is_alive() for t in callers + [streamer]), "a caller hung"
        assert a.process.wait(30) == 0
        on_b = _sample(scrape(b.metrics_port), "grpc_server_handled_total", grpc_method="Compute", grpc_code="OK")
    finally:
        stop.set()
        for srv in replicas:
            srv.stop()
    assert not errors, f"{len(errors)} calls failed around the SIGTERM (of {sum(served) + len(errors)}): {errors[:5]}"
    assert sum(served) > at_sigterm and on_b > 0, "the calls did not move to B"
    assert [m.WhichOneof("kind") for m in stream_results] == ["result"] * 30 + ["summary"]
    assert stream_results[-1].summary.failed_items == 0
    log = a.log()
    assert log.index("drain: health NOT_SERVING") < log.index("drain: calls finished") < log.index("drain: stopped")


# ---- unexpected failures inside the server ----

def test_unexpected_backend_error_is_internal_with_its_request_id(boom):
    with grpc.insecure_channel(boom.target) as channel:
        stub = pb_grpc.FocalLossServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.Compute(_request(100, request_id="boom-unary"), timeout=10)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        message = failed.value.details()
        assert "internal error" in message and "boom-unary" in message, message
        assert "injected" not in message, "the client must not see the exception's text"
        error_id = re.search(r"internal error ([0-9a-f]+)", message).group(1)
        assert stub.Compute(SMALL, timeout=10).stats.elements == 64

        # the same in a stream: that item fails alone, with INTERNAL, and the stream goes on
        items = [_request(100, request_id="ok-0"), _request(100, request_id="boom-stream"),
                 _request(100, request_id="ok-1")]
        messages = list(stub.ComputeStream(iter(items), timeout=10))
    assert [m.WhichOneof("kind") for m in messages] == ["result"] * 3 + ["summary"]
    first, bad, last = (m.result for m in messages[:3])
    assert [r.request_id for r in (first, bad, last)] == ["ok-0", "boom-stream", "ok-1"]
    assert not first.HasField("error") and not last.HasField("error")
    assert bad.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert "internal error" in bad.error.message and "boom-stream" in bad.error.message
    assert messages[-1].summary.items == 3 and messages[-1].summary.failed_items == 1
    stream_error_id = re.search(r"internal error ([0-9a-f]+)", bad.error.message).group(1)

    log = boom.log()
    for eid, rid in ((error_id, "boom-unary"), (stream_error_id, "boom-stream")):
        at = log.index(f"internal error {eid} in request '{rid}'")
        traceback = log[at:at + 4000]
        assert "Traceback" in traceback and "RuntimeError: injected" in traceback, traceback
    assert _serving(boom.target)


# ---- the GPU out of memory: computed on the CPU, never failed ----

def test_gpu_out_of_memory_falls_back_to_the_cpu(tmp_path):
    metrics_port = free_port()
    srv = start_fault_server(tmp_path, "gpu-oom", "--backend", "gpu", "--gpu-min-elements", "0", "--workers", "2",
                             "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1")
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.FocalLossServiceStub(channel)
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            assert list(info.backends) == ["cpu", "cupy"] and info.default_backend == "cupy", info
            base = dict(reduction="none", compute_grad=True, alpha=0.3, gamma=1.5)
            on_cpu = stub.Compute(_request(5000, seed=7, backend="cpu", **base), timeout=10)
            answers = [stub.Compute(_request(5000, seed=7, backend=backend, request_id=f"oom-{backend}", **base),
                                    timeout=10) for backend in ("auto", "gpu")]
            streamed = [m.result for m in stub.ComputeStream(
                iter([_request(5000, seed=7, request_id=f"oom-stream-{i}", **base) for i in range(3)]), timeout=10)
                if m.WhichOneof("kind") == "result"]
        for answer in answers + streamed:
            assert not answer.HasField("error"), answer.error
            assert answer.backend == "cpu"
            assert answer.loss.data == on_cpu.loss.data and answer.grad.data == on_cpu.grad.data
        metrics = scrape(metrics_port)
        assert _sample(metrics, "focalloss_gpu_fallbacks_total") == len(answers) + len(streamed)
        assert _sample(metrics, "focalloss_gpu_memory_bytes", kind="total") == 1
        computed = 5000 * (1 + len(answers) + len(streamed))
        assert _sample(metrics, "focalloss_elements_total", backend="cpu") == computed
        assert _sample(metrics, "focalloss_elements_total", backend="cupy") == 0
        log = srv.log()
        for rid in ("oom-auto", "oom-gpu", "oom-stream-0"):
            assert f"GPU out of memory for request '{rid}'" in log and "computed on the CPU" in log
        assert "Traceback" not in log
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]
