"""Evaluator: pipelined batches over one stream, refused batches, and summary(distributed=True) over 4
ranks of torch.distributed (gloo) and paddle.distributed (gloo on CPU), started by the test."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import free_port
from dist_worker import BATCHES, REFUSED, shard_batch
from focalserve_client import Evaluator, FocalLossClient, FocalLossError, StreamSummary
from fwfixtures import client, fw_server  # noqa: F401 - fixtures

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def expected_summary(client, indices) -> StreamSummary:
    """What the service's summary of these batches must be, from one Compute call per batch."""
    total, sums = StreamSummary(), []
    for i in indices:
        total.items += 1
        logit, label = shard_batch(i)
        try:
            stats = client.compute(logit, label, label_format="class_index", alpha=0.25, gamma=2.0).stats
        except FocalLossError:
            total.failed_items += 1
            continue
        total.elements += stats.elements
        total.positives += stats.positives
        sums.append(stats.loss_sum)
    total.loss_sum = math.fsum(sums)
    total.normalized_loss = total.loss_sum / max(total.positives, 1.0)
    return total


def assert_same(got: dict, expected: dict, rel: float):
    for key in ("items", "failed_items", "elements", "positives"):
        assert got[key] == expected[key], key
    for key in ("loss_sum", "normalized_loss"):
        assert got[key] == pytest.approx(expected[key], rel=rel, abs=0), key


def test_summary_counts_every_batch_and_keeps_refused_ones(client):
    done = []
    evaluator = Evaluator(client, label_format="class_index", alpha=0.25, gamma=2.0, max_in_flight=3,
                          progress=lambda finished, added: done.append((finished, added)))
    pending = []
    for i in range(BATCHES):
        evaluator.add(*shard_batch(i))
        pending.append(evaluator.pending)
    summary = evaluator.summary()
    assert max(pending) <= 3 and evaluator.pending == 0
    assert [d for d, _ in done] == list(range(1, BATCHES + 1))
    assert [e.request_id for e in evaluator.errors] == [str(REFUSED)]
    assert [f for f, _ in evaluator.errors[0].violations] == ["label"]
    assert_same(vars(summary), vars(expected_summary(client, range(BATCHES))), rel=1e-12)
    assert evaluator.summary() == summary
    with pytest.raises(RuntimeError):
        evaluator.add(*shard_batch(0))


def test_per_batch_overrides_and_tensors(client):
    import torch
    logit, label = shard_batch(1)
    evaluator = Evaluator(client, label_format="class_index")
    evaluator.add(torch.from_numpy(logit), torch.from_numpy(label), alpha=0.5, gamma=1.0)
    summary = evaluator.summary()
    stats = client.compute(logit, label, label_format="class_index", alpha=0.5, gamma=1.0).stats
    assert summary.loss_sum == pytest.approx(stats.loss_sum, rel=1e-12)
    default = client.compute(logit, label, label_format="class_index").stats
    assert summary.loss_sum != pytest.approx(default.loss_sum, rel=1e-3)


def test_distributed_summary_needs_an_initialised_group(client):
    evaluator = Evaluator(client)
    with pytest.raises(RuntimeError, match="torch.distributed or paddle.distributed"):
        evaluator.summary(distributed=True)


def test_a_stream_that_fails_raises_from_summary():
    with FocalLossClient(f"127.0.0.1:{free_port()}", max_attempts=2) as nowhere:
        evaluator = Evaluator(nowhere, timeout=20)
        evaluator.add(np.zeros(4, np.float32), np.zeros(4, np.float32))
        with pytest.raises(FocalLossError) as failed:
            evaluator.summary()
        with pytest.raises(FocalLossError):
            evaluator.summary()
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE


def run_ranks(framework: str, target: str, tmp_path: Path) -> list[dict]:
    port = free_port()
    worker = [str(HERE / "dist_worker.py"), "--framework", framework, "--target", target, "--out", str(tmp_path)]
    if framework == "torch":
        command = [str(BIN / "torchrun"), "--nproc-per-node", "4", "--master-addr", "127.0.0.1",
                   "--master-port", str(port), *worker]
    else:
        command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "4",
                   "--master", f"127.0.0.1:{port}", "--start_port", str(free_port()),
                   "--log_dir", str(tmp_path / "log"), *worker]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "log").glob("workerlog.*"))) \
        if (tmp_path / "log").exists() else ""
    assert done.returncode == 0, (done.stdout + done.stderr + logs)[-5000:]
    return [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(4)]


@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_distributed_summary_over_4_gloo_ranks_equals_one_process(client, fw_server, framework, tmp_path):
    ranks = run_ranks(framework, fw_server.target, tmp_path)
    one_process = Evaluator(client, label_format="class_index", alpha=0.25, gamma=2.0)
    for i in range(BATCHES):
        one_process.add(*shard_batch(i))
    expected = vars(one_process.summary())
    assert [r["world"] for r in ranks] == [4] * 4
    for r, rank in enumerate(ranks):
        assert_same(rank["total"], expected, rel=1e-9)
        assert rank["total"] == ranks[0]["total"]  # identical on every rank
        assert rank["local"]["items"] == len(range(r, BATCHES, 4))
        assert rank["errors"] == ([str(REFUSED // 4)] if r == REFUSED % 4 else [])
    # the ranks' own summaries are not the total: the all-reduce did something
    assert all(rank["local"]["items"] < expected["items"] for rank in ranks)
