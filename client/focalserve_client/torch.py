"""PyTorch drop-in: torchvision's `sigmoid_focal_loss`, computed by focalserve.

    from focalserve_client.torch import sigmoid_focal_loss   # instead of torchvision.ops
    loss = sigmoid_focal_loss(logits, targets, reduction="mean")
    loss.backward()

One service round trip per forward and backward: the forward asks for the gradient too (when `inputs`
needs one) and the backward scales it by the upstream gradient without calling the service again.
Importing this module imports torch; `import focalserve_client` does not.
"""

from __future__ import annotations

import warnings

import torch

from ._shared import default_client
from .client import FocalLossClient

__all__ = ["sigmoid_focal_loss"]

_REDUCTIONS = ("none", "mean", "sum")


class _SigmoidFocalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs: torch.Tensor, targets, alpha: float, gamma: float, normalizer, reduction: str,
                client: FocalLossClient, want_grad: bool):
        logit = inputs.detach()
        # NumPy has no bfloat16: such inputs travel as float32 (the service computes them in float32 anyway)
        if logit.dtype == torch.bfloat16:
            logit = logit.float()
        label = targets.detach()
        if label.dtype == torch.bfloat16:
            label = label.float()
        result = client.compute(logit.cpu().numpy(), label.cpu().numpy(), alpha=alpha, gamma=gamma,
                                normalizer=normalizer, reduction=reduction, compute_grad=want_grad)
        # The loss goes to the caller, who may write to it: a copy of the response's read-only bytes.
        loss = torch.tensor(result.loss).to(device=inputs.device, dtype=inputs.dtype)
        if result.grad is not None:
            ctx.save_for_backward(_readonly_tensor(result.grad).to(device=inputs.device, dtype=inputs.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # element-wise for "none", a 0-d scale otherwise; out of place, so the saved gradient is never written
        return grad * grad_output, None, None, None, None, None, None, None


# The saved gradient is a view of the response's read-only bytes that is only ever read (backward multiplies
# out of place), so torch's warning about it does not apply; a filter once, as catch_warnings is not thread-safe.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=__name__)


def _readonly_tensor(array):
    """A tensor over a read-only array, without copying it."""
    return torch.from_numpy(array)


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2,
                       reduction: str = "none", *, client: FocalLossClient | None = None) -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss, computed by focalserve; differentiable with respect to `inputs`.

    inputs: logits of any shape; targets: same shape, in [0, 1] (soft labels allowed); alpha < 0 means no
    α weighting, as in torchvision; reduction "none" | "mean" | "sum". The result has `inputs`' dtype and
    device (tensors on a GPU go to the host and the result comes back). `targets` gets no gradient.
    client: a FocalLossClient; None means one shared client for FOCALSERVE_TARGET (default localhost:50051).

    Where the service deliberately differs from naive code (README, "Deliberate differences"), this gives
    the service's values: the loss and gradient stay finite and keep their precision for saturated logits
    (torchvision's `(1 - p_t) ** gamma` gives a NaN gradient there for 0 < gamma < 1); a target of -100
    is an ignored element (loss and gradient 0); any other target outside [0, 1], alpha > 1, a negative or
    non-finite gamma and non-finite logits are refused with FocalLossError naming the field.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction modes: "
                         "'none', 'mean', 'sum'")
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("sigmoid_focal_loss(): inputs and targets must be Tensors")
    if targets.shape != inputs.shape:
        # what binary_cross_entropy_with_logits (inside torchvision's function) raises
        raise ValueError(f"Target size ({targets.size()}) must be the same as input size ({inputs.size()})")
    alpha, gamma = float(alpha), float(gamma)
    normalizer = None
    if alpha < 0:
        # No α weighting: α = 0.5 weighs every element by exactly 0.5 (α·y + (1-α)·(1-y) = 0.5 for any y),
        # and dividing by a normalizer of 0.5 doubles it back, both exact in binary floating point.
        alpha, normalizer = 0.5, 0.5
    # forward runs with grad mode off: whether a gradient will be wanted is known only here (not under no_grad)
    want_grad = torch.is_grad_enabled() and inputs.requires_grad
    return _SigmoidFocalLoss.apply(inputs, targets, alpha, gamma, normalizer, reduction,
                                   client or default_client(), want_grad)
