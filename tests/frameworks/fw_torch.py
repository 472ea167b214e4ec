"""focalserve_client.torch against torchvision's sigmoid_focal_loss, written here with torch ops from its
source (torchvision/ops/focal_loss.py: no torchvision wheel is built for this CPU torch), differentiated
by torch's autograd in float64."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fwfixtures import calls_since, client, fw_server, handled_calls  # noqa: F401 - fixtures
from focalserve_client import FocalLossError
from focalserve_client._shared import reset_default_client
from focalserve_client.torch import sigmoid_focal_loss


def torchvision_focal_loss(inputs, targets, alpha: float = 0.25, gamma: float = 2, reduction: str = "none"):
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss


def batch(dtype, shape=(64, 12), seed=0):
    rng = np.random.default_rng(seed)
    logit = rng.standard_normal(shape) * 3
    target = (rng.random(shape) < 0.2).astype(np.float64)
    target[::7] = rng.random(target[::7].shape)  # some soft labels: torchvision's formula takes them too
    return torch.tensor(logit, dtype=dtype), torch.tensor(target, dtype=dtype)


TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-13)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2), (0.7, 1.5), (-1, 2), (-0.5, 0)])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_forward_and_backward_match_torchvision(client, dtype, reduction, alpha, gamma, weighted):
    logit, target = batch(dtype)
    x = logit.clone().requires_grad_(True)
    loss = sigmoid_focal_loss(x, target, alpha=alpha, gamma=gamma, reduction=reduction, client=client)

    ref_x = logit.double().clone().requires_grad_(True)
    ref = torchvision_focal_loss(ref_x, target.double(), alpha=alpha, gamma=gamma, reduction=reduction)
    assert loss.dtype == dtype and loss.shape == ref.shape and loss.device == logit.device

    weights = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3 \
        if weighted else torch.ones(ref.shape, dtype=torch.float64)
    (loss * weights.to(dtype)).sum().backward()
    (ref * weights).sum().backward()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=tol["rtol"], atol=tol["atol"] * 10)


def test_negative_alpha_is_exactly_no_weighting(client):
    """α < 0 maps onto α = 0.5 and a normalizer of 0.5: exact, so equal to twice the α = 0.5 loss bit for bit."""
    logit, target = batch(torch.float32, seed=3)
    unweighted = sigmoid_focal_loss(logit, target, alpha=-1, reduction="none", client=client)
    half = sigmoid_focal_loss(logit, target, alpha=0.5, reduction="none", client=client)
    assert torch.equal(unweighted, half * 2)


def test_one_call_per_forward_and_backward(client, fw_server):
    logit, target = batch(torch.float32, seed=4)
    for reduction in ("none", "mean", "sum"):
        x = logit.clone().requires_grad_(True)
        before = handled_calls(fw_server)
        loss = sigmoid_focal_loss(x, target, reduction=reduction, client=client)
        (loss * 2).sum().backward()
        assert x.grad is not None
        assert calls_since(fw_server, before) == {"Compute": 1.0}, reduction


def test_targets_get_no_gradient_and_input_dtype_is_kept(client):
    logit, target = batch(torch.float16, seed=5)
    x = logit.clone().requires_grad_(True)
    t = target.clone().requires_grad_(True)
    loss = sigmoid_focal_loss(x, t, reduction="sum", client=client)
    loss.backward()
    assert loss.dtype == torch.float16 and x.grad.dtype == torch.float16
    assert t.grad is None
    ref = torchvision_focal_loss(logit.double(), target.double(), reduction="sum")
    torch.testing.assert_close(loss.double(), ref, rtol=2e-3, atol=0)


def test_wrong_arguments_raise_what_torchvision_raises(client):
    logit, target = batch(torch.float32)
    with pytest.raises(ValueError, match="Invalid Value for arg 'reduction'"):
        sigmoid_focal_loss(logit, target, reduction="avg", client=client)
    with pytest.raises(ValueError, match="Target size"):
        sigmoid_focal_loss(logit, target[:, :5], client=client)
    with pytest.raises(FocalLossError) as refused:
        sigmoid_focal_loss(logit, target, alpha=1.5, client=client)
    assert [field for field, _ in refused.value.violations] == ["alpha"]
    with pytest.raises(FocalLossError) as refused:
        sigmoid_focal_loss(logit, target * 3, client=client)
    assert "label" in str(refused.value)


def test_default_client_follows_focalserve_target_from_several_threads(fw_server, monkeypatch):
    monkeypatch.setenv("FOCALSERVE_TARGET", fw_server.target)
    reset_default_client()
    try:
        logit, target = batch(torch.float64, seed=6)
        expected = torchvision_focal_loss(logit, target, reduction="sum")
        results, errors = [], []

        def work():
            try:
                for _ in range(5):
                    results.append(sigmoid_focal_loss(logit, target, reduction="sum"))
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(results) == 20
        for r in results:
            torch.testing.assert_close(r, expected, rtol=1e-10, atol=0)
    finally:
        reset_default_client()


def test_no_gradient_asked_under_no_grad(client, monkeypatch):
    asked = []
    compute = client.compute
    monkeypatch.setattr(client, "compute", lambda *a, **k: asked.append(k["compute_grad"]) or compute(*a, **k))
    logit, target = batch(torch.float32, seed=7)
    x = logit.requires_grad_(True)
    with torch.no_grad():
        sigmoid_focal_loss(x, target, client=client)
    sigmoid_focal_loss(x, target, reduction="sum", client=client).backward()
    sigmoid_focal_loss(logit.detach(), target, client=client)
    assert asked == [False, True, False]
