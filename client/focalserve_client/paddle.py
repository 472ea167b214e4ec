"""PaddlePaddle drop-ins, computed by focalserve.

    from focalserve_client.paddle import sigmoid_focal_loss      # paddle.nn.functional's signature
    from focalserve_client.paddle import detection_sigmoid_focal_loss   # the legacy detection op's

One service round trip per forward and backward: the forward asks for the gradient too (when `logit`
needs one) and the backward scales it by the upstream gradient without calling the service again.
Importing this module imports paddle; `import focalserve_client` does not.
"""

from __future__ import annotations

import numpy as np
import paddle

from ._shared import default_client
from .client import FocalLossClient

__all__ = ["sigmoid_focal_loss", "detection_sigmoid_focal_loss"]


class _ServiceFocalLoss(paddle.autograd.PyLayer):
    """Only the logit is a Tensor argument, so it is the only input that gets a gradient."""

    @staticmethod
    def forward(ctx, logit, label: np.ndarray, options: dict, client: FocalLossClient, compute_grad: bool):
        result = client.compute(_host_array(logit), label, compute_grad=compute_grad, **options)
        # The loss goes to the caller, who may write to it: a copy of the response's read-only bytes.
        loss = paddle.to_tensor(np.asarray(result.loss), dtype=logit.dtype, place=logit.place)
        if compute_grad:
            ctx.save_for_backward(_saved_grad(result.grad, logit))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensor()
        # element-wise for "none", a 0-d scale otherwise
        if grad.dtype == grad_output.dtype:
            return grad * grad_output
        # half-precision logits: the gradient was kept in the service's float32 (Paddle's CPU has no float16
        # multiply); scaled in float32, then given the logit's dtype
        return (grad * grad_output.astype(grad.dtype)).astype(grad_output.dtype)


def _wants_grad(logit) -> bool:
    # known here, not in PyLayer.forward, which runs with gradients off: nothing asked under paddle.no_grad()
    return not logit.stop_gradient and paddle.is_grad_enabled()


def _check_tensors(**tensors) -> None:
    for name, value in tensors.items():
        if not isinstance(value, paddle.Tensor):
            raise TypeError(f"The type of '{name}' in sigmoid_focal_loss must be paddle.Tensor, "
                            f"but received {type(value).__name__}.")


def _host_array(tensor) -> np.ndarray:
    """The tensor's values as a NumPy array: a view of a CPU tensor (DLPack, no copy), else a host copy."""
    if tensor.dtype == paddle.bfloat16:  # NumPy has none: computed in float32 by the service anyway
        tensor = tensor.astype("float32")
    if tensor.place.is_cpu_place():
        return np.from_dlpack(tensor.detach())
    return tensor.numpy()


_NUMPY_DTYPES = {paddle.float32: np.dtype(np.float32), paddle.float64: np.dtype(np.float64)}


def _saved_grad(grad: np.ndarray, like):
    """The response's gradient as a tensor on `like`'s place, of its dtype (float32 for half-precision
    logits); on the CPU a view of the response (DLPack, no copy) that is only ever read: backward
    multiplies it out of place."""
    if like.place.is_cpu_place() and _NUMPY_DTYPES.get(like.dtype) == grad.dtype:
        return paddle.from_dlpack(grad)
    dtype = like.dtype if like.dtype in _NUMPY_DTYPES else paddle.float32
    return paddle.to_tensor(grad, dtype=dtype, place=like.place)


def _scalar(tensor, name: str) -> float:
    values = np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor).reshape(-1)
    if values.size != 1:
        raise ValueError(f"Expected {name} in sigmoid_focal_loss to hold one value, got shape {list(values.shape)}.")
    return float(values[0])


def sigmoid_focal_loss(logit, label, normalizer=None, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "sum", name: str | None = None, *, client: FocalLossClient | None = None):
    """paddle.nn.functional.sigmoid_focal_loss, computed by focalserve; differentiable with respect to `logit`.

    logit: [N, *] float32/float64; label: same shape, in [0, 1] (soft labels allowed, -100 ignores the
    element); normalizer: an optional [1] (or 0-d) tensor dividing the loss; reduction 'sum' | 'mean' |
    'none'. The result has `logit`'s dtype and place. `label` and `normalizer` get no gradient.
    client: a FocalLossClient; None means one shared client for FOCALSERVE_TARGET (default localhost:50051).

    Where the service deliberately differs from PaddlePaddle 3.3.1 (README, "Deliberate differences"), this
    gives the service's values: the exact gradient at x = 0 and for 0 < gamma < 1 with saturated logits
    (Paddle's is wrong or NaN there), a -100 label fully ignored (loss and gradient 0), rank-1 logits
    accepted; alpha outside [0, 1], a negative gamma, a label outside [0, 1] ∪ {-100}, a normalizer <= 0
    and non-finite logits are refused with FocalLossError naming the field.
    """
    _check_tensors(logit=logit, label=label)
    if reduction not in ("sum", "mean", "none"):
        raise ValueError("The value of 'reduction' in sigmoid_focal_loss should be 'sum', 'mean' or 'none', "
                         f"but received {reduction}, which is not allowed.")
    norm = None
    if normalizer is not None:
        if len(normalizer.shape) > 1:
            raise ValueError("Expected zero or one dimension of normalizer in sigmoid_focal_loss but got "
                             f"{len(normalizer.shape)}.")
        norm = _scalar(normalizer, "normalizer")
    if list(label.shape) != list(logit.shape):
        raise ValueError(f"label shape {list(label.shape)} must match logit shape {list(logit.shape)} "
                         "in sigmoid_focal_loss.")
    options = dict(alpha=float(alpha), gamma=float(gamma), normalizer=norm, reduction=reduction)
    label_np = label.numpy() if hasattr(label, "numpy") else np.asarray(label)
    return _ServiceFocalLoss.apply(logit, label_np, options, client or default_client(), _wants_grad(logit))


def detection_sigmoid_focal_loss(x, label, fg_num, gamma: float = 2.0, alpha: float = 0.25, *,
                                 client: FocalLossClient | None = None):
    """The legacy fluid.layers.detection.sigmoid_focal_loss, computed by focalserve.

    x: [N, C] float logits (C classes, background excluded); label: [N, 1] int32/int64, 0 background,
    1..C the positive class, -1 ignores the row; fg_num: a [1] int tensor, the normalizer (clamped to at
    least 1). Returns the element-wise [N, C] loss, differentiable with respect to `x`; `label` and
    `fg_num` get no gradient.

    Deliberate differences from the legacy op (README): p is not clamped at FLT_MIN, so a positive with a
    very negative logit gets its exact loss α·|x| rather than saturating at 87.34·α; a class label outside
    {-1, 0..C} is refused with FocalLossError naming `label` instead of being read as background.
    """
    _check_tensors(x=x, label=label)
    if len(x.shape) != 2:
        raise ValueError(f"The rank of x in detection sigmoid_focal_loss should be 2, but received {len(x.shape)}.")
    if list(label.shape) != [x.shape[0], 1]:
        raise ValueError(f"The shape of label in detection sigmoid_focal_loss should be [{x.shape[0]}, 1], "
                         f"but received {list(label.shape)}.")
    norm = max(_scalar(fg_num, "fg_num"), 1.0)
    options = dict(label_format="class_index", alpha=float(alpha), gamma=float(gamma), normalizer=norm,
                   reduction="none")
    label_np = label.numpy() if hasattr(label, "numpy") else np.asarray(label)
    return _ServiceFocalLoss.apply(x, label_np, options, client or default_client(), _wants_grad(x))
