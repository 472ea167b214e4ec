"""The Python client's wire path against real servers: narrowed labels, pipelined and split streams,
limits from GetServerInfo, ErrorInfo, retry throttling, and the command line's error handling."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent import futures

import grpc
import numpy as np
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from conftest import start_server
from focalloss.v1 import focal_loss_pb2 as pb
from focalserve_client import FocalLossClient, FocalLossError, StreamSummary, build_request, service_config
from focalserve_client.client import _Request
from focalserve_client.tensor import decode

FLOATS = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("small"), "--max-message-mb", "1", "--workers", "2")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def few_elements_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("few"), "--max-elements", "1000", "--workers", "2")
    yield srv
    assert srv.stop() == 0


# ---- lossless narrower wire dtypes ----

def test_labels_travel_in_the_narrowest_lossless_dtype():
    logit = np.zeros((3, 2), np.float32)
    binary = np.array([[0, 1], [1, 0], [0, 0]])
    for dtype in (np.float32, np.float64, np.float16, ">f4"):
        assert _Request(logit, binary.astype(dtype)).label[0] == pb.DTYPE_UINT8
    assert _Request(logit, binary.astype(bool)).label[0] == pb.DTYPE_BOOL
    soft = binary.astype(np.float32)
    soft[0, 0] = 0.5
    assert _Request(logit, soft).label[0] == pb.DTYPE_FLOAT32
    ignored = binary.astype(np.float32)
    ignored[1, 1] = -100
    assert _Request(logit, ignored).label[0] == pb.DTYPE_FLOAT32
    negative_zero = binary.astype(np.float32)
    negative_zero[2, 0] = -0.0  # bit for bit: -0.0 is not sent as 0
    assert _Request(logit, negative_zero).label[0] == pb.DTYPE_FLOAT32
    index = np.array([[0], [3], [-1]], np.int64)
    assert _Request(logit, index, label_format="class_index").label[0] == pb.DTYPE_INT32
    assert _Request(logit, index + 2**31, label_format="class_index").label[0] == pb.DTYPE_INT64
    request = _Request(logit, binary.astype(np.float32))
    assert request.label[1].dtype == np.uint8 and request.label[1].tolist() == binary.tolist()


def _as_sent_by_protobuf(stub, logit, label, **kwargs):
    """The same batch with the caller's own dtypes (build_request: no narrowing), through the generated stub."""
    response = stub.Compute(build_request(logit, label, **kwargs), timeout=60)
    grad = decode(response.grad, "grad", FLOATS) if response.HasField("grad") else None
    return decode(response.loss, "loss", FLOATS), grad, response.stats


@pytest.mark.parametrize("label_format, logit_dtype, label_dtype, reduction", [
    ("dense", np.float32, np.float32, "none"), ("dense", np.float32, np.float32, "sum"),
    ("dense", np.float64, np.float64, "mean"), ("dense", np.float16, np.float16, "sum"),
    ("dense", np.float32, np.float64, "none"),
    ("class_index", np.float32, np.int64, "sum"), ("class_index", np.float64, np.int64, "none")])
def test_narrowed_labels_give_the_same_bits(server, stub, label_format, logit_dtype, label_dtype, reduction):
    rng = np.random.default_rng(11)
    logit = rng.normal(0, 4, (3000, 7)).astype(logit_dtype)
    if label_format == "dense":
        label = (rng.random((3000, 7)) < 0.3).astype(label_dtype)
    else:
        label = rng.integers(-1, 8, (3000, 1)).astype(label_dtype)
    kwargs = dict(label_format=label_format, reduction=reduction, compute_grad=True, gamma=1.5, alpha=0.3)
    loss, grad, stats = _as_sent_by_protobuf(stub, logit, label, **kwargs)
    with FocalLossClient(server.target) as client:
        assert _Request(logit, label, label_format=label_format).label[1].itemsize < label.itemsize
        got = client.compute(logit, label, **kwargs)
    assert got.loss.dtype == loss.dtype and got.loss.tobytes() == loss.tobytes()
    assert got.grad.tobytes() == grad.tobytes()
    assert got.stats.loss_sum == stats.loss_sum and got.stats.positives == stats.positives


# ---- splitting: streams, the server's max_elements ----

def test_stream_splits_an_oversize_batch_instead_of_ending(server, small_server):
    """A 1M-element batch in a stream to a server that accepts 1 MiB messages: one combined result for
    it, equal to the single request, the items around it answered, the summary over the caller's batches."""
    rng = np.random.default_rng(3)
    big = (rng.normal(0, 3, (1000, 1000)).astype(np.float32), (rng.random((1000, 1000)) < 0.2).astype(np.float32))
    small = (rng.normal(size=(10, 4)).astype(np.float32), np.ones((10, 4), np.float32))
    bad = (np.zeros((2, 2), np.float32), np.full((2, 2), 3.0, np.float32))
    batches = [dict(logit=small[0], label=small[1], compute_grad=True),
               dict(logit=big[0], label=big[1], compute_grad=True, reduction="none"),
               dict(logit=bad[0], label=bad[1]),
               dict(logit=big[0], label=big[1], reduction="mean", compute_grad=True)]
    with FocalLossClient(server.target) as whole, FocalLossClient(small_server.target) as split:
        expected = [whole.compute(**b) if b["label"] is not bad[1] else None for b in batches]
        items = list(split.stream(batches))
    assert len(items) == 5 and isinstance(items[-1], StreamSummary)
    assert [r.request_id for r in items[:4]] == ["0", "1", "2", "3"]
    assert items[2].error is not None and items[2].error.code == grpc.StatusCode.INVALID_ARGUMENT
    for got, want in zip(items[:4], expected):
        if want is None:
            continue
        assert got.error is None, got.error
        assert got.grad.tobytes() == want.grad.tobytes()
        if got.loss.ndim:
            assert got.loss.tobytes() == want.loss.tobytes()
        else:
            np.testing.assert_allclose(got.loss, want.loss, rtol=2e-7)
    summary = items[-1]
    assert (summary.items, summary.failed_items) == (4, 1)
    assert summary.elements == 40 + 2 * 1_000_000
    assert summary.loss_sum == pytest.approx(sum(w.stats.loss_sum for w in expected if w), rel=1e-12)


def test_batches_over_the_servers_max_elements_are_split(server, few_elements_server):
    rng = np.random.default_rng(8)
    logit = rng.normal(size=(700, 9)).astype(np.float32)
    label = rng.integers(-1, 10, (700, 1)).astype(np.int32)
    kwargs = dict(label_format="class_index", reduction="none", compute_grad=True)
    with FocalLossClient(server.target) as whole, FocalLossClient(few_elements_server.target) as limited:
        assert limited.server_info().max_elements == 1000
        expected = whole.compute(logit, label, **kwargs)
        parts = []
        got = limited.compute(logit, label, progress=lambda done, total: parts.append(done), **kwargs)
        streamed = list(limited.stream([dict(logit=logit, label=label, **kwargs)]))
    assert len(parts) == 7  # 111 rows of 9 per chunk
    for result in (got, streamed[0]):
        assert result.error is None, result.error
        assert result.loss.tobytes() == expected.loss.tobytes() and result.grad.tobytes() == expected.grad.tobytes()
    assert streamed[1].items == 1 and streamed[1].failed_items == 0


def test_split_path_raises_focal_loss_error_like_a_single_request(small_server):
    logit = np.zeros((100_000, 4), np.float32)  # over 1 MiB: split
    with FocalLossClient(small_server.target) as client:
        with pytest.raises(FocalLossError) as info:
            client.compute(logit, np.zeros((100_000, 2), np.int32), label_format="class_index")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.violations[0][0] == "label"
        with pytest.raises(FocalLossError) as info:  # a chunk the server refuses
            client.compute(logit, np.full((100_000, 4), 2.0, np.float32))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.violations[0][0] == "label"


def test_requests_in_flight_are_bounded(server):
    """The stream pulls the caller's batches only as answers come back: at most max_in_flight requests
    sent and unanswered, plus the one being encoded."""
    rng = np.random.default_rng(2)
    pulled = 0

    def batches():
        nonlocal pulled
        for _ in range(40):
            pulled += 1
            yield rng.normal(size=(20_000, 4)).astype(np.float32), np.zeros((20_000, 4), np.float32)

    ahead = []
    with FocalLossClient(server.target, max_in_flight=2) as client:
        for answered, item in enumerate(client.stream(batches()), start=1):
            if isinstance(item, StreamSummary):
                assert item.items == 40
                break
            ahead.append(pulled - answered)
    assert max(ahead) <= 2 + 1
    assert max(ahead) >= 1  # and it does send ahead


# ---- errors: ErrorInfo, throttled retries ----

def test_error_info_is_exposed_with_violations():
    """A status built by grpcio-status with an ErrorInfo and a BadRequest, from a real in-process server."""
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="server busy: try another replica")
    info = error_details_pb2.ErrorInfo(reason="OVERLOADED", domain="focalserve",
                                       metadata={"max_concurrent_rpcs": "64"})
    bad = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="logit", description="too many")])
    status.details.add().Pack(info)
    status.details.add().Pack(bad)

    def refuse(request, context):
        context.abort_with_status(rpc_status.to_status(status))

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("focalloss.v1.FocalLossService", {
        "Compute": grpc.unary_unary_rpc_method_handler(refuse),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            lambda request, context: pb.GetServerInfoResponse(max_message_bytes=1 << 20),
            request_deserializer=pb.GetServerInfoRequest.FromString,
            response_serializer=pb.GetServerInfoResponse.SerializeToString)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with FocalLossClient(f"127.0.0.1:{port}", max_attempts=1) as client:
            with pytest.raises(FocalLossError) as caught:
                client.compute(np.zeros(4, np.float32), np.zeros(4, np.float32))
    finally:
        server.stop(None)
    error = caught.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (error.reason, error.domain, error.metadata) == ("OVERLOADED", "focalserve", {"max_concurrent_rpcs": "64"})
    assert error.violations == [("logit", "too many")]


def test_a_real_servers_bad_request_has_violations_and_no_reason(server):
    with FocalLossClient(server.target) as client:
        with pytest.raises(FocalLossError) as caught:
            client.compute(np.zeros(4, np.float32), np.zeros(4, np.float32), gamma=-1.0)
    assert caught.value.violations and caught.value.violations[0][0] == "gamma"
    assert caught.value.reason in ("", caught.value.reason.upper())  # set only where the server sends ErrorInfo
    assert isinstance(caught.value.metadata, dict)


def test_service_config_throttles_retries():
    config = json.loads(service_config())
    assert config["retryThrottling"] == {"maxTokens": 100, "tokenRatio": 0.1}
    assert config["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 5
    # one attempt: no retryPolicy at all (gRPC refuses maxAttempts < 2 and the channel would not start)
    assert "retryPolicy" not in json.loads(service_config(1))["methodConfig"][0]


# ---- the command line ----

def _cli(server, *args):
    return subprocess.run([sys.executable, "-m", "focalserve_client", "--target", server.target, *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_missing_or_unreadable_npy_is_one_error_line(server, tmp_path):
    np.save(tmp_path / "logit.npy", np.zeros(4, np.float32))
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    for label in (tmp_path / "missing.npy", tmp_path / "broken.npy"):
        proc = _cli(server, "compute", "--logit", str(tmp_path / "logit.npy"), "--label", str(label))
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert proc.stderr.startswith(f"focalserve-client: cannot read --label {label}")
    proc = _cli(server, "stream", "--logit", str(tmp_path / "logit.npy"), "--label", str(tmp_path / "missing.npy"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "cannot read --label" in proc.stderr


def test_cli_options_class_index_spelling_and_upstream_grad(server, tmp_path):
    rng = np.random.default_rng(4)
    logit = rng.normal(size=(50, 3)).astype(np.float32)
    label = rng.integers(0, 4, (50, 1)).astype(np.int64)
    upstream = rng.random((50, 3)).astype(np.float32)
    for name, value in (("logit", logit), ("label", label), ("g", upstream)):
        np.save(tmp_path / f"{name}.npy", value)
    with FocalLossClient(server.target) as client:
        expected = client.compute(logit, label, label_format="class_index", reduction="none", compute_grad=True,
                                  grad_output=upstream)
    for spelling, grad_option in (("class_index", "--upstream-grad"), ("class-index", "--grad-output")):
        out = tmp_path / f"grad-{spelling}.npy"
        proc = _cli(server, "compute", "--logit", str(tmp_path / "logit.npy"), "--label", str(tmp_path / "label.npy"),
                    "--label-format", spelling, "--reduction", "none", grad_option, str(tmp_path / "g.npy"),
                    "--grad-out", str(out))
        assert proc.returncode == 0, proc.stderr
        assert np.load(out).tobytes() == expected.grad.tobytes()


def test_cli_prints_each_field_violation_once(server, tmp_path):
    np.save(tmp_path / "logit.npy", np.zeros(4, np.float32))
    np.save(tmp_path / "label.npy", np.zeros(4, np.float32))
    proc = _cli(server, "compute", "--logit", str(tmp_path / "logit.npy"), "--label", str(tmp_path / "label.npy"),
                "--gamma", "-1")
    assert proc.returncode == 1
    assert proc.stderr.count("must be finite and >= 0") == 1, proc.stderr


def test_cli_stream_is_read_to_its_end_not_cancelled(tmp_path):
    """The CLI used to stop at the summary, before the call's status, and cancel a finished stream: the
    server then counted it CANCELLED. Now it reads to the end: OK."""
    from conftest import free_port
    from test_operations import _sample, scrape

    metrics_port = free_port()
    srv = start_server(tmp_path, "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1")
    try:
        np.save(tmp_path / "logit.npy", np.zeros((50, 4), np.float32))
        np.save(tmp_path / "label.npy", np.zeros((50, 4), np.float32))
        for _ in range(3):
            proc = _cli(srv, "stream", "--logit", str(tmp_path / "logit.npy"), "--label", str(tmp_path / "label.npy"))
            assert proc.returncode == 0, proc.stderr
        text = scrape(metrics_port)
        ok = _sample(text, "grpc_server_handled_total", grpc_method="ComputeStream", grpc_code="OK")
        cancelled = _sample(text, "grpc_server_handled_total", grpc_method="ComputeStream", grpc_code="CANCELLED")
    finally:
        assert srv.stop() == 0
    assert (ok, cancelled) == (3, 0)


def test_a_split_batch_ends_its_stream_ok_not_cancelled(tmp_path):
    """compute() of a split batch reads its stream to the end (the server counts it OK, not CANCELLED)."""
    from conftest import free_port
    from test_operations import _sample, scrape

    metrics_port = free_port()
    srv = start_server(tmp_path, "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1",
                       "--max-message-mb", "1")
    try:
        with FocalLossClient(srv.target) as client:
            result = client.compute(np.zeros(300_000, np.float32), np.zeros(300_000, np.float32), compute_grad=True)
        assert result.stats.elements == 300_000
        text = scrape(metrics_port)
        counts = {code: _sample(text, "grpc_server_handled_total", grpc_method="ComputeStream", grpc_code=code)
                  for code in ("OK", "CANCELLED")}
    finally:
        assert srv.stop() == 0
    assert counts == {"OK": 1, "CANCELLED": 0}
