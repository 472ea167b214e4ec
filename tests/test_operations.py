"""Operating the service: metrics scraped by a real Prometheus, logs, drain on SIGTERM, overload, deadlines,
cancellation. Every test runs real server processes on free ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import EXPECTED_BACKEND, debian_tool, free_port, metrics_text, start_server
from focalloss.v1 import focal_loss_pb2 as pb
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc
from focalserve.service import INLINE_BYTES
from focalserve_client.client import build_request

SERVICE = "focalloss.v1.FocalLossService"


def _http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read().decode()


def scrape(port: int) -> dict[str, float]:
    """The /metrics samples as {'name{label="v",...}': value} (labels sorted as exposed)."""
    samples = {}
    for line in metrics_text(port).splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def _sample(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        metric, _, label_text = key.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += value
    return total


def _request(n: int, seed: int = 0, bad: bool = False, **kwargs) -> pb.ComputeRequest:
    rng = np.random.default_rng(seed)
    logit = rng.normal(0, 3, n).astype(np.float32)
    label = (rng.random(n) < 0.2).astype(np.float32)
    if bad:
        label[0] = 7.0
    return build_request(logit, label, **kwargs)


# ---- metrics, logs, Prometheus ----

@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    metrics_port = free_port()
    srv = start_server(tmp_path_factory.mktemp("metered"), "--metrics-port", str(metrics_port),
                       "--metrics-host", "127.0.0.1", "--log-format", "json")
    srv.metrics_port = metrics_port
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def known_traffic(metered):
    """A known mix of calls: 3 good and 2 bad Compute, one stream of 3 items (1 bad), 1 GetServerInfo."""
    with grpc.insecure_channel(metered.target) as channel:
        stub = pb_grpc.FocalLossServiceStub(channel)
        for i in range(3):
            stub.Compute(_request(1000, seed=i, compute_grad=True), timeout=10)
        for i in range(2):
            with pytest.raises(grpc.RpcError):
                stub.Compute(_request(1000, seed=i, bad=True), timeout=10)
        items = [_request(500, seed=1), _request(500, seed=2, bad=True), _request(700, seed=3)]
        list(stub.ComputeStream(iter(items), timeout=10))
        stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    return {"ok_compute": 3, "bad_compute": 2, "elements": 3 * 1000 + 500 + 700}


def test_metrics_endpoint_has_every_spec_metric(metered, known_traffic):
    samples = scrape(metered.metrics_port)
    names = {key.partition("{")[0] for key in samples}
    for name in ("grpc_server_started_total", "grpc_server_handled_total", "grpc_server_handling_seconds_bucket",
                 "grpc_server_msg_received_total", "grpc_server_msg_sent_total", "focalloss_elements_total",
                 "focalloss_compute_seconds_bucket", "focalloss_request_bytes_bucket", "focalloss_inflight_requests",
                 "focalloss_nonfinite_inputs_total", "focalloss_item_loss_bucket", "focalloss_build_info"):
        assert name in names, name
    compute = dict(grpc_type="unary", grpc_service=SERVICE, grpc_method="Compute")
    assert _sample(samples, "grpc_server_handled_total", grpc_code="OK", **compute) == 3
    assert _sample(samples, "grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **compute) == 2
    assert _sample(samples, "grpc_server_started_total", **compute) == 5
    stream = dict(grpc_type="bidi_stream", grpc_service=SERVICE, grpc_method="ComputeStream")
    assert _sample(samples, "grpc_server_handled_total", grpc_code="OK", **stream) == 1
    assert _sample(samples, "grpc_server_msg_received_total", **stream) == 3
    assert _sample(samples, "grpc_server_msg_sent_total", **stream) == 4  # 3 results + the summary
    assert _sample(samples, "focalloss_elements_total", backend=EXPECTED_BACKEND, label_format="dense") == \
        known_traffic["elements"]
    assert _sample(samples, "focalloss_item_loss_count") == 5
    assert _sample(samples, "focalloss_build_info", backend=EXPECTED_BACKEND) == 1
    # latency buckets span 100 µs .. 60 s
    assert 'grpc_server_handling_seconds_bucket{grpc_method="Compute",grpc_service="focalloss.v1.FocalLossService",' \
           'grpc_type="unary",le="0.0001"}' in samples
    assert any('le="60.0"' in key for key in samples if key.startswith("grpc_server_handling_seconds_bucket"))


def test_failed_calls_are_logged_as_json_without_payload(metered, known_traffic):
    entries = [json.loads(line) for line in metered.log().splitlines() if line.startswith("{")]
    failed = [e for e in entries if e.get("event") == "call_failed"]
    assert len(failed) >= 2
    assert {e["code"] for e in failed} == {"INVALID_ARGUMENT"}
    assert all(e["method"] == f"/{SERVICE}/Compute" and e["details"].startswith("label:") for e in failed)
    assert any(e.get("event") == "serving" for e in entries)
    assert "7.0 at flat index" in failed[0]["details"]  # the reason, not the tensor: no payload bytes logged
    assert all(len(line) < 2000 for line in metered.log().splitlines())


@pytest.fixture(scope="module")
def prometheus(metered, tmp_path_factory):
    binary = debian_tool("prometheus", "prometheus")
    if binary is None:
        pytest.skip("Prometheus is not installed and could not be installed (apt-get install prometheus failed)")
    folder = tmp_path_factory.mktemp("prometheus")
    (folder / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: focalserve\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metered.metrics_port}']\n")
    port = free_port()
    log = open(folder / "prometheus.log", "w")
    process = subprocess.Popen([binary, f"--config.file={folder / 'prometheus.yml'}",
                                f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if "Ready" in _http_get(f"{base}/-/ready", timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"Prometheus did not become ready:\n{(folder / 'prometheus.log').read_text()}")
    yield base
    process.terminate()
    process.wait(30)
    log.close()


def _query(base: str, promql: str) -> list[dict]:
    reply = json.loads(_http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def _query_until(base: str, promql: str, expected: float, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        result = _query(base, promql)
        value = float(result[0]["value"][1]) if result else None
        if value == expected:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{promql} = {value}, expected {expected} after {timeout}s")


def test_real_prometheus_scrapes_grpc_codes_and_domain_counters(prometheus, known_traffic):
    compute = 'grpc_service="focalloss.v1.FocalLossService",grpc_method="Compute"'
    _query_until(prometheus, f'sum(grpc_server_handled_total{{{compute},grpc_code="OK"}})',
                 known_traffic["ok_compute"])
    _query_until(prometheus, f'sum(grpc_server_handled_total{{{compute},grpc_code="INVALID_ARGUMENT"}})',
                 known_traffic["bad_compute"])
    _query_until(prometheus, 'sum(focalloss_elements_total{label_format="dense"})', known_traffic["elements"])
    targets = json.loads(_http_get(f"{prometheus}/api/v1/targets"))["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"]
    # the README's PromQL examples, as the README writes them, are valid queries here
    from test_readme import promql_examples
    assert len(promql_examples()) >= 4, promql_examples()
    for promql in promql_examples():
        _query(prometheus, promql)


# ---- drain, overload, deadlines, cancellation ----

def test_sigterm_drains_a_stream_in_flight_then_exits_zero(tmp_path):
    srv = start_server(tmp_path, "--workers", "1", "--grace-seconds", "30")
    items = 24
    # small answers, real work: γ = 0.3 (pow(), ~40 ms an item here) keeps the stream in flight at SIGTERM
    request = _request(1_000_000, reduction="sum", gamma=0.3)
    statuses: list[tuple[float, int]] = []
    results: list[pb.ComputeStreamResponse] = []
    first_result = threading.Event()
    with grpc.insecure_channel(srv.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)

        def follow_health():
            try:
                for reply in watch:
                    statuses.append((time.monotonic(), reply.status))
            except grpc.RpcError:
                pass

        def run_stream():
            for message in pb_grpc.FocalLossServiceStub(channel).ComputeStream(iter([request] * items), timeout=60):
                results.append(message)
                first_result.set()

        watcher = threading.Thread(target=follow_health)
        streamer = threading.Thread(target=run_stream)
        watcher.start()
        streamer.start()
        assert first_result.wait(30)
        srv.process.send_signal(signal.SIGTERM)
        sigterm = time.monotonic()
        time.sleep(0.3)
        with grpc.insecure_channel(srv.target) as fresh:  # new calls are refused while draining
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.FocalLossServiceStub(fresh).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(results) < items, "the stream ended before SIGTERM: nothing was drained"
        streamer.join(60)
        done = time.monotonic()
        assert srv.process.wait(60) == 0
        # the open health Watch (as clients with health checking keep) did not hold the exit for the 30 s grace
        assert time.monotonic() - sigterm < 15, "the server waited out its grace period after its calls ended"
        watch.cancel()
        watcher.join(10)
    assert [m.WhichOneof("kind") for m in results] == ["result"] * items + ["summary"]
    assert results[-1].summary.items == items and results[-1].summary.failed_items == 0
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert statuses[0][1] == serving
    turned = [t for t, status in statuses if status == not_serving]
    assert turned and sigterm <= turned[0] < done, "health must turn NOT_SERVING before the drain ends"
    log = srv.log()
    assert log.index("drain: health NOT_SERVING") < log.index("drain: calls finished") < log.index("drain: stopped")


def test_overload_is_refused_with_resource_exhausted_and_recovers(tmp_path):
    metrics_port = free_port()
    srv = start_server(tmp_path, "--workers", "1", "--max-concurrent-rpcs", "2", "--metrics-port", str(metrics_port))
    try:
        # SUM without gradient: small answers; γ = 0.3 takes pow(), the kernel's slowest path (~0.15 s a
        # call here), so ten calls started together overlap for certain
        request = _request(4_000_000, gamma=0.3)
        outcomes: list[object] = [None] * 10

        def call(i: int):
            with grpc.insecure_channel(srv.target) as channel:
                try:
                    outcomes[i] = pb_grpc.FocalLossServiceStub(channel).Compute(request, timeout=60)
                except grpc.RpcError as e:
                    outcomes[i] = e

        threads = [threading.Thread(target=call, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert all(o is not None for o in outcomes), "a call hung"
        refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
        served = [o for o in outcomes if isinstance(o, pb.ComputeResponse)]
        assert refused and served and len(refused) + len(served) == 10
        assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all("server busy" in e.details() for e in refused)
        assert len({r.stats.loss_sum for r in served}) == 1  # every served answer is the same, right one
        with grpc.insecure_channel(srv.target) as channel:
            again = pb_grpc.FocalLossServiceStub(channel).Compute(request, timeout=60)
        assert again.stats.loss_sum == served[0].stats.loss_sum
        samples = scrape(metrics_port)
        assert _sample(samples, "focalloss_rejected_total", reason="overload") == len(refused)
        assert _sample(samples, "grpc_server_handled_total", grpc_method="Compute",
                       grpc_code="RESOURCE_EXHAUSTED") == len(refused)
    finally:
        assert srv.stop() == 0


@pytest.fixture(scope="module")
def single_worker(tmp_path_factory):
    metrics_port = free_port()
    srv = start_server(tmp_path_factory.mktemp("single"), "--workers", "1", "--metrics-port", str(metrics_port))
    srv.metrics_port = metrics_port
    yield srv
    assert srv.stop() == 0


def test_work_whose_deadline_passed_in_the_queue_is_not_started(single_worker):
    before = scrape(single_worker.metrics_port)
    with grpc.insecure_channel(single_worker.target) as channel:
        stub = pb_grpc.FocalLossServiceStub(channel)
        # holds the one worker for ~0.7 s (γ = 0.3 takes pow(), the kernel's slowest path)
        busy = stub.Compute.future(_request(16_000_000, gamma=0.3), timeout=60)
        time.sleep(0.2)
        # above service.INLINE_BYTES (8 bytes an element): queued for the pool, not computed on the loop
        with pytest.raises(grpc.RpcError) as late:
            stub.Compute(_request(INLINE_BYTES // 8 + 1000, seed=5), timeout=0.05)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert busy.result().stats.elements == 16_000_000
        time.sleep(0.2)
    after = scrape(single_worker.metrics_port)
    # the late call's work was never computed: dropped from the queue when its deadline cancelled it (or,
    # had it reached a worker, refused there); only the busy call's elements were computed
    assert _sample(after, "focalloss_elements_total") - _sample(before, "focalloss_elements_total") == 16_000_000
    assert _sample(after, "focalloss_rejected_total", reason="deadline") - \
        _sample(before, "focalloss_rejected_total", reason="deadline") <= 1


def test_cancelling_a_stream_stops_its_work(single_worker):
    before = _sample(scrape(single_worker.metrics_port), "focalloss_elements_total")
    items, n = 60, 1_000_000
    with grpc.insecure_channel(single_worker.target) as channel:
        call = pb_grpc.FocalLossServiceStub(channel).ComputeStream(iter([_request(n)] * items), timeout=60)
        next(call)
        call.cancel()
        time.sleep(0.5)
        settled = _sample(scrape(single_worker.metrics_port), "focalloss_elements_total") - before
        time.sleep(1.0)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    computed = _sample(scrape(single_worker.metrics_port), "focalloss_elements_total") - before
    # nothing computed after the cancellation settled; before it, the answered item and the few items read
    # while the cancellation travelled (each ~5 ms of work), far from the stream's 60
    assert computed == settled, (settled, computed)
    assert n <= computed <= 20 * n, computed
