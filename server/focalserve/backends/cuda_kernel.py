"""The host side of focal_loss.cu that does not need CuPy: which kernel a job launches, with which
arguments (kernel_host.finish turns its per-block sums and flags into the result, as for the CPU kernel).

The CuPy backend launches these plans on a GPU; the test suite launches the same plans on the CPU through
the same .cu file compiled as C++ (tests/cuda/), so the argument order and the host logic are checked
there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import request as rq
from ..request import Job
from .kernel_host import SUFFIX, gamma_halves

SOURCE = Path(__file__).with_name("focal_loss.cu")
KERNELS = ("focal_dense_f32_f32", "focal_dense_f32_u8", "focal_dense_f64_f64", "focal_dense_f64_u8",
           "focal_class_index_f32", "focal_class_index_f64")

BLOCK = 256  # FOCAL_BLOCK in the .cu
WRITE_LOSS, WRITE_GRAD, GRAD_OUTPUT = 1, 2, 4


@dataclass
class KernelPlan:
    """One launch: `kernel` over `elements`; `label` is the host label array in the kernel's label type.

    `scalars` are the common parameters in the kernel's order (after the form's own leading ones):
    alpha, 1 - alpha (formed in double: α near 1 rounds to 1 in float32), gamma, gamma_halves, mode,
    loss_scale, grad_scale, check_finite.
    """

    kernel: str
    dtype: np.dtype
    label: np.ndarray
    elements: int
    rows: int
    classes: int
    mode: int
    scalars: tuple

    @property
    def class_index(self) -> bool:
        return self.classes > 0

    def grid(self, max_blocks: int) -> int:
        return max(1, min(-(-self.elements // BLOCK), max_blocks))


def plan(job: Job, check_finite: bool) -> KernelPlan:
    dtype = job.dtype
    suffix = SUFFIX[dtype]
    mode = (WRITE_LOSS if job.reduction == "none" else 0) | (WRITE_GRAD if job.compute_grad else 0)
    if job.compute_grad and job.grad_output is not None:
        mode |= GRAD_OUTPUT
    scalar = dtype.type
    scalars = (scalar(job.alpha), scalar(1.0 - job.alpha), scalar(job.gamma), np.int32(gamma_halves(job.gamma)),
               np.uint32(mode),
               scalar(1.0 / job.normalizer), scalar(job.grad_scale), np.int32(check_finite))
    if job.label_format == rq.CLASS_INDEX:
        rows, classes = job.logit.shape
        label = np.ascontiguousarray(job.label, dtype=np.int32)  # checked to lie in [-1, C]
        return KernelPlan(f"focal_class_index_{suffix}", dtype, label, job.elements, rows, classes, mode, scalars)
    label = job.label.reshape(-1)
    if label.dtype in (np.uint8, np.bool_):
        kernel, label = f"focal_dense_{suffix}_u8", label.view(np.uint8)
    else:
        kernel, label = f"focal_dense_{suffix}_{suffix}", np.ascontiguousarray(label, dtype=dtype)
    return KernelPlan(kernel, dtype, label, job.elements, job.elements, 0, mode, scalars)
