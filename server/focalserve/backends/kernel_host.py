"""What the host does around either compiled kernel (focal_loss.cu on a GPU, focal_loss_cpu.cpp on the
CPU): how γ is passed, what their flags mean, and how their per-block sums become the result."""

from __future__ import annotations

import math

import numpy as np

from .. import request as rq
from ..request import Job

FLAG_NONFINITE, FLAG_BAD_LABEL = 1, 2
# the dtype part of the kernels' entry-point names
SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64", np.dtype(np.uint8): "u8"}


def gamma_halves(gamma: float) -> int:
    """2γ when γ is a multiple of 0.5 up to 8 (every backend then multiplies instead of calling pow), else -1."""
    twice = 2.0 * gamma
    return int(twice) if gamma <= 8.0 and twice == int(twice) else -1


def finish(job: Job, block_sums: np.ndarray, flags: int) -> tuple[float, float]:
    """Raises for what the kernel flagged (naming the first culprit, as the NumPy backend does);
    returns (loss_sum, positives) from the per-block (loss, positives) pairs, added in block order."""
    if flags & FLAG_NONFINITE:
        rq.raise_nonfinite_logits(0, job.logit.reshape(-1))
    if flags & FLAG_BAD_LABEL:
        rq.raise_bad_dense_labels(0, job.label.reshape(-1))
    pairs = block_sums.reshape(-1, 2)
    loss_sum = math.fsum(pairs[:, 0])
    positives = job.positives if job.label_format == rq.CLASS_INDEX else float(math.fsum(pairs[:, 1]))
    return loss_sum, positives
