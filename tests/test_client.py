"""The Python client and its command line against real servers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest

from conftest import BACKENDS, golden_cases, load_golden, start_server
from focalloss.v1 import focal_loss_pb2 as pb
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc
from focalserve_client import FocalLossClient, FocalLossError
from focalserve_client.tensor import encode

DOC_LOGIT = np.array([[0.97, 0.91, 0.03], [0.55, 0.43, 0.71]], np.float32)
DOC_LABEL = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)


def test_readme_example_value(server):
    # the README's five lines, verbatim but for the target
    with FocalLossClient(server.target) as client:
        result = client.compute(DOC_LOGIT, DOC_LABEL, normalizer=2.0, compute_grad=True)
    assert result.loss.dtype == np.float32 and f"{float(result.loss):.8f}" == "0.65782464"
    golden = load_golden(next(c for c in golden_cases() if c["name"] == "doc_example"))
    np.testing.assert_allclose(result.grad, golden["grad"], rtol=1e-5)
    assert result.stats.elements == 6 and result.stats.positives == 2


def test_client_raises_with_field_violations(server):
    with FocalLossClient(server.target) as client:
        with pytest.raises(FocalLossError) as info:
            client.compute(DOC_LOGIT, DOC_LABEL, gamma=-1.0)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.violations == [("gamma", "must be finite and >= 0, got -1.0")]


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("small"), "--max-message-mb", "1", "--workers", "2")
    yield srv
    assert srv.stop() == 0


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_split_over_a_real_message_limit_matches_one_request(server, small_server, reduction):
    """A 1M-element batch against a server that accepts 1 MiB: split, and identical to one request."""
    rng = np.random.default_rng(5)
    logit = rng.normal(0, 4, (1000, 1000)).astype(np.float32)
    label = rng.random((1000, 1000)).astype(np.float32)  # soft labels
    label[::97, ::13] = -100
    grad_output = rng.random((1000, 1000)).astype(np.float32) if reduction == "none" else np.float32(0.5)
    kwargs = dict(alpha=0.3, gamma=1.5, normalizer=7.0, reduction=reduction, compute_grad=True,
                  grad_output=grad_output)
    with FocalLossClient(server.target) as whole, FocalLossClient(small_server.target) as split:
        assert split.message_limit() == 1 << 20
        expected = whole.compute(logit, label, **kwargs)
        chunks = []
        got = split.compute(logit, label, progress=lambda d, t: chunks.append(d), **kwargs)
    assert len(chunks) >= 8
    np.testing.assert_array_equal(got.grad, expected.grad)
    if reduction == "none":
        np.testing.assert_array_equal(got.loss, expected.loss)
    else:
        np.testing.assert_allclose(got.loss, expected.loss, rtol=2e-7)
    assert got.stats.elements == expected.stats.elements == logit.size
    assert got.stats.positives == expected.stats.positives
    assert got.stats.loss_sum == pytest.approx(expected.stats.loss_sum, rel=1e-12)


def test_split_class_index_counts_fg_num_over_the_whole_batch(server, small_server):
    rng = np.random.default_rng(9)
    logit = rng.normal(0, 3, (30_000, 20)).astype(np.float32)
    label = rng.integers(-1, 21, (30_000, 1)).astype(np.int32)
    label[:20_000] = 0  # positives only in the last third: per-chunk fg_num would differ wildly
    kwargs = dict(label_format="class_index", reduction="sum", compute_grad=True)
    with FocalLossClient(server.target) as whole, FocalLossClient(small_server.target) as split:
        expected = whole.compute(logit, label, **kwargs)
        got = split.compute(logit, label, **kwargs)
    np.testing.assert_array_equal(got.grad, expected.grad)
    np.testing.assert_allclose(got.loss, expected.loss, rtol=2e-7)
    assert got.stats.positives == expected.stats.positives == np.count_nonzero(label >= 1)


def test_deadline_exceeded_is_raised(server):
    logit = np.zeros(4_000_000, np.float32)
    with FocalLossClient(server.target) as client:
        client.message_limit()
        with pytest.raises(FocalLossError) as info:
            client.compute(logit, logit, reduction="none", compute_grad=True, timeout=0.001)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


class _FlakyServicer(pb_grpc.FocalLossServiceServicer):
    """A real gRPC server that answers UNAVAILABLE `failures` times before succeeding."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls = 0
        self.lock = threading.Lock()

    def Compute(self, request, context):
        with self.lock:
            self.calls += 1
            failing = self.calls <= self.failures
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.ComputeResponse(request_id=request.request_id, loss=encode(np.float32(1.5)), backend="flaky")

    def GetServerInfo(self, request, context):
        return pb.GetServerInfoResponse(max_message_bytes=1 << 20)


@pytest.mark.parametrize("failures, max_attempts, succeeds", [(2, 5, True), (10, 3, False)])
def test_unavailable_is_retried_with_backoff(failures, max_attempts, succeeds):
    servicer = _FlakyServicer(failures)
    flaky = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_FocalLossServiceServicer_to_server(servicer, flaky)
    port = flaky.add_insecure_port("127.0.0.1:0")
    flaky.start()
    try:
        with FocalLossClient(f"127.0.0.1:{port}", max_attempts=max_attempts) as client:
            if succeeds:
                assert float(client.compute(DOC_LOGIT, DOC_LABEL).loss) == 1.5
                assert servicer.calls == failures + 1
            else:
                with pytest.raises(FocalLossError) as info:
                    client.compute(DOC_LOGIT, DOC_LABEL)
                assert info.value.code == grpc.StatusCode.UNAVAILABLE
                assert servicer.calls == max_attempts
    finally:
        flaky.stop(None)


# ---- the command line ----

def _cli(server, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "focalserve_client", "--target", server.target, *args],
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_compute_prints_the_loss_and_saves_the_gradient(server, tmp_path):
    np.save(tmp_path / "logit.npy", DOC_LOGIT)
    np.save(tmp_path / "label.npy", DOC_LABEL)
    proc = _cli(server, "compute", "--logit", str(tmp_path / "logit.npy"), "--label", str(tmp_path / "label.npy"),
                "--normalizer", "2", "--grad-out", str(tmp_path / "grad.npy"))
    assert proc.stdout.strip() == "0.65782464"
    golden = load_golden(next(c for c in golden_cases() if c["name"] == "doc_example"))
    np.testing.assert_allclose(np.load(tmp_path / "grad.npy"), golden["grad"], rtol=1e-5)


def test_cli_stream_shows_progress_and_summary(server, tmp_path):
    rng = np.random.default_rng(1)
    args = []
    for i in range(3):
        np.save(tmp_path / f"logit{i}.npy", rng.normal(size=(100, 5)).astype(np.float32))
        np.save(tmp_path / f"label{i}.npy", (rng.random((100, 5)) < 0.2).astype(np.uint8))
        args += ["--logit", str(tmp_path / f"logit{i}.npy"), "--label", str(tmp_path / f"label{i}.npy")]
    proc = _cli(server, "stream", *args, "--progress", "--json")
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["request_id"] for line in lines[:3]] == [str(tmp_path / f"logit{i}.npy") for i in range(3)]
    summary = lines[-1]["summary"]
    assert summary["items"] == 3 and summary["failed_items"] == 0 and summary["elements"] == 1500
    assert summary["loss_sum"] == pytest.approx(sum(line["loss_sum"] for line in lines[:3]), rel=1e-12)
    assert "100.0%" in proc.stderr and "3/3 items" in proc.stderr


def test_cli_reports_a_refused_request(server, tmp_path):
    np.save(tmp_path / "logit.npy", DOC_LOGIT)
    np.save(tmp_path / "label.npy", DOC_LABEL * 3)
    proc = _cli(server, "compute", "--logit", str(tmp_path / "logit.npy"), "--label", str(tmp_path / "label.npy"),
                check=False)
    assert proc.returncode == 1
    assert "INVALID_ARGUMENT" in proc.stderr and "label:" in proc.stderr


def test_cli_info(server):
    info = json.loads(_cli(server, "info").stdout)
    assert info["backends"] == BACKENDS and info["max_message_bytes"] == 256 << 20
