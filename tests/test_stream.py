"""ComputeStream over a real server: order, per-item errors, the summary, cancellation."""

from __future__ import annotations

import math
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from focalloss.v1 import focal_loss_pb2 as pb
from focalserve_client import FocalLossClient, StreamSummary
from focalserve_client.client import build_request
from focalserve_client.tensor import decode, encode

FLOATS = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64)


def _batch(rng, n, bad=False, dtype=np.float32):
    logit = rng.normal(0, 3, size=(n, 4)).astype(dtype)
    label = (rng.random((n, 4)) < 0.3).astype(dtype)
    if bad:
        label[0, 0] = 2.0
    return logit, label


def test_results_in_request_order_with_errors_and_summary(stub):
    rng = np.random.default_rng(7)
    sizes = [1, 5000, 3, 20000, 7, 64, 1, 9000, 2, 100]  # big and small mixed, so completion order varies
    bad = {2, 6}
    batches = [_batch(rng, n, bad=i in bad, dtype=np.float64 if i % 3 == 0 else np.float32)
               for i, n in enumerate(sizes)]
    requests = [build_request(lg, lb, reduction="sum", compute_grad=True, request_id=f"item-{i}")
                for i, (lg, lb) in enumerate(batches)]
    messages = list(stub.ComputeStream(iter(requests), timeout=60))

    assert [m.WhichOneof("kind") for m in messages] == ["result"] * len(sizes) + ["summary"]
    results = [m.result for m in messages[:-1]]
    assert [r.request_id for r in results] == [f"item-{i}" for i in range(len(sizes))]
    loss_sum = positives = elements = 0
    for i, (result, request) in enumerate(zip(results, requests)):
        if i in bad:
            assert result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert result.error.message.startswith("label:")
            assert not result.HasField("loss")
            continue
        assert not result.HasField("error")
        unary = stub.Compute(request, timeout=30)  # the same item alone gives the same bits
        assert decode(result.loss, "loss", FLOATS) == decode(unary.loss, "loss", FLOATS)
        np.testing.assert_array_equal(decode(result.grad, "grad", FLOATS), decode(unary.grad, "grad", FLOATS))
        loss_sum += result.stats.loss_sum
        positives += result.stats.positives
        elements += result.stats.elements
        assert result.stats.positives == np.count_nonzero(batches[i][1] > 0.5)
    summary = messages[-1].summary
    assert summary.items == len(sizes)
    assert summary.failed_items == len(bad)
    assert summary.elements == elements == sum(4 * n for i, n in enumerate(sizes) if i not in bad)
    assert summary.positives == positives
    assert math.isclose(summary.loss_sum, loss_sum, rel_tol=1e-12)
    assert math.isclose(summary.normalized_loss, loss_sum / max(positives, 1), rel_tol=1e-12)


def test_empty_stream_gets_an_empty_summary(stub):
    messages = list(stub.ComputeStream(iter([]), timeout=10))
    assert len(messages) == 1 and messages[0].WhichOneof("kind") == "summary"
    assert messages[0].summary == pb.StreamSummary()


def test_client_stream_yields_results_then_summary(server):
    rng = np.random.default_rng(3)
    batches = [_batch(rng, 10), {"logit": _batch(rng, 4)[0], "label": _batch(rng, 4, bad=True)[1]},
               _batch(rng, 30)]
    with FocalLossClient(server.target) as client:
        items = list(client.stream(batches))
    assert len(items) == 4 and isinstance(items[-1], StreamSummary)
    assert [r.request_id for r in items[:3]] == ["0", "1", "2"]
    assert items[1].error is not None and items[1].error.violations[0][0] == "label"
    assert items[0].error is None and items[0].loss.shape == ()
    assert items[-1].items == 3 and items[-1].failed_items == 1
    assert items[-1].elements == 40 + 120


def test_cancel_mid_stream_leaves_server_healthy(server, stub, channel):
    rng = np.random.default_rng(11)
    logit, label = _batch(rng, 50_000)
    request = build_request(logit, label, reduction="none", compute_grad=True)
    sent = 0

    def endless():
        nonlocal sent
        while True:
            sent += 1
            yield request

    call = stub.ComputeStream(endless(), timeout=60)
    received = 0
    for _ in call:
        received += 1
        if received == 3:
            call.cancel()
            break
    assert call.code() == grpc.StatusCode.CANCELLED
    time.sleep(0.5)
    assert server.process.poll() is None, "server died after a cancelled stream"
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    small = build_request(np.array([0.5], np.float32), np.array([1.0], np.float32))
    assert stub.Compute(small, timeout=10).stats.elements == 1
