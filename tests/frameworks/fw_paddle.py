"""focalserve_client.paddle against PaddlePaddle 3.3.1's own sigmoid_focal_loss, and against the legacy
detection op's formula written with Paddle ops in float64 (the op itself is gone from Paddle 3)."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from focalserve_client import FocalLossError
from focalserve_client.paddle import detection_sigmoid_focal_loss, sigmoid_focal_loss
from fwfixtures import calls_since, client, fw_server, handled_calls  # noqa: F401 - fixtures


def dense_batch(dtype: str, shape=(48, 10), seed=0):
    rng = np.random.default_rng(seed)
    # away from x = 0, where Paddle's CPU gradient is wrong (README, deliberate differences)
    logit = rng.standard_normal(shape) * 3 + 0.05
    label = (rng.random(shape) < 0.2).astype(np.float64)
    label[::5] = rng.random(label[::5].shape)  # soft labels
    return paddle.to_tensor(logit.astype(dtype)), paddle.to_tensor(label.astype(dtype))


def close(got, expected, dtype: str, what: str):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if dtype == "float32":
        atol = 1e-6 * float(np.max(np.abs(expected))) if expected.size else 0.0
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=atol, err_msg=what)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-15, err_msg=what)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("normalized", [False, True], ids=["no-normalizer", "normalizer"])
@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (1.5, 0.6)])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_matches_paddle_sigmoid_focal_loss(client, dtype, reduction, normalized, gamma, alpha, weighted):
    logit, label = dense_batch(dtype)
    normalizer = paddle.to_tensor([7.0], dtype=dtype) if normalized else None
    x = logit.clone()
    x.stop_gradient = False
    loss = sigmoid_focal_loss(x, label, normalizer, alpha=alpha, gamma=gamma, reduction=reduction, client=client)
    ref_x = logit.clone()
    ref_x.stop_gradient = False
    ref = F.sigmoid_focal_loss(ref_x, label, normalizer, alpha=alpha, gamma=gamma, reduction=reduction)
    assert loss.dtype == ref.dtype and list(loss.shape) == list(ref.shape) and str(loss.place) == str(ref.place)

    rng = np.random.default_rng(1)
    weights = paddle.to_tensor((rng.random(ref.shape) * 3 if weighted else np.ones(ref.shape)).astype(dtype))
    (loss * weights).sum().backward()
    (ref * weights).sum().backward()
    close(loss.numpy(), ref.numpy(), dtype, "loss")
    assert x.grad.dtype == ref_x.grad.dtype
    close(x.grad.numpy(), ref_x.grad.numpy(), dtype, "grad")


def legacy_formula(x, label, fg_num, gamma: float, alpha: float):
    """fluid.layers.detection.sigmoid_focal_loss's forward (sigmoid_focal_loss_op.h), in Paddle ops."""
    classes = x.shape[1]
    positive = (label == paddle.arange(1, classes + 1, dtype=label.dtype).reshape([1, classes])).astype(x.dtype)
    kept = (label != -1).astype(x.dtype)
    p = F.sigmoid(x)
    pos = -alpha * (1 - p) ** gamma * F.log_sigmoid(x)
    neg = -(1 - alpha) * p ** gamma * F.log_sigmoid(-x)
    norm = paddle.clip(fg_num.astype(x.dtype), min=1.0)
    return kept * (positive * pos + (1 - positive) * neg) / norm


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("fg_num", [5, 0], ids=["fg5", "fg0-clamped"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_detection_matches_the_legacy_formula(client, dtype, fg_num, weighted):
    rng = np.random.default_rng(2)
    rows, classes = 40, 6
    logit = rng.standard_normal((rows, classes)) * 3
    label = rng.integers(-1, classes + 1, (rows, 1)).astype(np.int32)
    x = paddle.to_tensor(logit.astype(dtype), stop_gradient=False)
    fg = paddle.to_tensor([fg_num], dtype="int32")
    loss = detection_sigmoid_focal_loss(x, paddle.to_tensor(label), fg, gamma=2.0, alpha=0.25, client=client)
    ref_x = paddle.to_tensor(logit, dtype="float64", stop_gradient=False)
    ref = legacy_formula(ref_x, paddle.to_tensor(label), fg, 2.0, 0.25)
    assert loss.dtype == x.dtype and list(loss.shape) == [rows, classes]

    weights = rng.random((rows, classes)) * 3 if weighted else np.ones((rows, classes))
    (loss * paddle.to_tensor(weights.astype(dtype))).sum().backward()
    (ref * paddle.to_tensor(weights)).sum().backward()
    close(loss.numpy(), ref.numpy(), dtype, "loss")
    close(x.grad.numpy(), ref_x.grad.numpy(), dtype, "grad")
    ignored = label[:, 0] == -1
    assert ignored.any() and not x.grad.numpy()[ignored].any()


def test_one_call_per_forward_and_backward(client, fw_server):
    logit, label = dense_batch("float32", seed=3)
    for reduction in ("none", "mean", "sum"):
        x = logit.clone()
        x.stop_gradient = False
        before = handled_calls(fw_server)
        loss = sigmoid_focal_loss(x, label, paddle.to_tensor([3.0]), reduction=reduction, client=client)
        (loss * 2).sum().backward()
        assert x.grad is not None
        assert calls_since(fw_server, before) == {"Compute": 1.0}, reduction
    x = paddle.to_tensor(np.random.default_rng(4).standard_normal((8, 3)).astype("float32"), stop_gradient=False)
    before = handled_calls(fw_server)
    detection_sigmoid_focal_loss(x, paddle.to_tensor([[1]] * 8, dtype="int64"), paddle.to_tensor([2]),
                                 client=client).sum().backward()
    assert calls_since(fw_server, before) == {"Compute": 1.0}


def test_label_and_normalizer_get_no_gradient(client):
    logit, label = dense_batch("float64", seed=5)
    x = logit.clone()
    x.stop_gradient = False
    label.stop_gradient = False
    normalizer = paddle.to_tensor([4.0], dtype="float64", stop_gradient=False)
    sigmoid_focal_loss(x, label, normalizer, client=client).backward()
    assert x.grad is not None and label.grad is None and normalizer.grad is None


def test_wrong_arguments(client):
    logit, label = dense_batch("float32")
    with pytest.raises(ValueError, match="should be 'sum', 'mean' or 'none'"):
        sigmoid_focal_loss(logit, label, reduction="avg", client=client)
    with pytest.raises(ValueError, match="zero or one dimension of normalizer"):
        sigmoid_focal_loss(logit, label, paddle.ones([1, 1]), client=client)
    with pytest.raises(FocalLossError) as refused:
        sigmoid_focal_loss(logit, label, alpha=1.5, client=client)
    assert [field for field, _ in refused.value.violations] == ["alpha"]
    with pytest.raises(FocalLossError) as refused:
        sigmoid_focal_loss(logit, label, paddle.to_tensor([0.0]), client=client)
    assert [field for field, _ in refused.value.violations] == ["normalizer"]
    x = paddle.to_tensor(np.zeros((4, 3), np.float32))
    with pytest.raises(FocalLossError) as refused:
        detection_sigmoid_focal_loss(x, paddle.to_tensor([[0], [1], [4], [0]]), paddle.to_tensor([1]),
                                     client=client)
    assert [field for field, _ in refused.value.violations] == ["label"]
    with pytest.raises(ValueError, match="label"):
        detection_sigmoid_focal_loss(x, paddle.to_tensor([0, 1, 2, 0]), paddle.to_tensor([1]), client=client)
    with pytest.raises(TypeError, match="logit"):
        sigmoid_focal_loss(logit.numpy(), label, client=client)


def test_no_gradient_asked_under_no_grad(client, monkeypatch):
    asked = []
    compute = client.compute
    monkeypatch.setattr(client, "compute", lambda *a, **k: asked.append(k["compute_grad"]) or compute(*a, **k))
    logit, label = dense_batch("float32", seed=6)
    logit.stop_gradient = False
    with paddle.no_grad():
        sigmoid_focal_loss(logit, label, client=client)
    sigmoid_focal_loss(logit, label, client=client).backward()
    assert asked == [False, True]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_keep_their_dtype(client, dtype):
    logit, label = dense_batch("float32", seed=7)
    x = logit.astype(dtype)
    x.stop_gradient = False
    loss = sigmoid_focal_loss(x, label, reduction="sum", client=client)
    loss.backward()
    assert loss.dtype == x.dtype and x.grad.dtype == x.dtype
    ref = F.sigmoid_focal_loss(x.astype("float32"), label, reduction="sum")
    np.testing.assert_allclose(float(loss.astype("float32")), float(ref), rtol=1e-2)
