"""Every golden case of ../shared/golden (PaddlePaddle 3.3.1 values) over the wire, within SPEC §4's tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import EXPECTED_BACKEND, assert_golden_close, golden_cases, golden_request, load_golden
from focalloss.v1 import focal_loss_pb2 as pb
from focalserve_client import FocalLossClient
from focalserve_client.client import MESSAGE_OVERHEAD
from focalserve_client.tensor import decode

CASES = golden_cases()
FLOATS = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64)


def test_golden_cases_are_present():
    # The suite must not pass vacuously: the manifest has both label forms and all reductions.
    assert len(CASES) >= 50
    assert {c["label_format"] for c in CASES} == {"dense", "class_index"}
    assert {c["reduction"] for c in CASES} == {"none", "mean", "sum"}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_case_over_compute(stub, case):
    data = load_golden(case)
    request = golden_request(case, data)
    response = stub.Compute(request, timeout=30)
    assert response.request_id == case["name"]
    assert response.backend == EXPECTED_BACKEND
    assert_golden_close(decode(response.loss, "loss", FLOATS), data["loss"], f"{case['name']} loss")
    assert_golden_close(decode(response.grad, "grad", FLOATS), data["grad"], f"{case['name']} grad")
    assert response.stats.elements == data["logit"].size


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_case_through_client_chunks(server, case):
    """The client's split path (tiny message limit) combines chunks exactly as one request would."""
    data = load_golden(case)
    logit, label = data["logit"], data["label"]
    width = logit.shape[1] if case["label_format"] == "class_index" else 1
    row_budget = 2 * width * logit.itemsize + label.itemsize + 16
    budget = max(row_budget, (logit.nbytes + label.nbytes) // 4)
    calls = []
    with FocalLossClient(server.target, max_message_bytes=MESSAGE_OVERHEAD + budget) as client:
        result = client.compute(logit, label, label_format=case["label_format"], alpha=case["alpha"],
                                gamma=case["gamma"], normalizer=case["normalizer"], reduction=case["reduction"],
                                compute_grad=True, progress=lambda done, total: calls.append((done, total)))
    assert len(calls) >= 2, "the batch was not split"
    assert calls[-1] == (logit.size, logit.size)
    assert_golden_close(result.loss, data["loss"], f"{case['name']} loss (chunked)")
    assert_golden_close(result.grad, data["grad"], f"{case['name']} grad (chunked)")
