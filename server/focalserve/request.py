"""ComputeRequest -> a validated `Job` with the defaults of SPEC §1.3 resolved.

Everything that can be checked from the message's header and the (small) class-index labels is checked
here, before any per-element work. The two checks that must read every element (dense label values,
non-finite logits) are made by the backend while each block is in cache, with the helpers at the end of
this module, so that a bad value is reported the same way whichever backend runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
import numpy as np

from focalloss.v1 import focal_loss_pb2 as pb
from focalserve_client.tensor import TensorError, decode

from .errors import RequestError

DEFAULT_ALPHA = 0.25
MAX_EFFECTIVE_GAMMA = 1e30
DEFAULT_GAMMA = 2.0
IGNORE_LABEL = -100
MAX_CLASSES = 2**31 - 1  # class-index C: labels 1..C must be int32

LOGIT_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16)
FLOAT_DTYPES = LOGIT_DTYPES
DENSE_LABEL_DTYPES = FLOAT_DTYPES + (pb.DTYPE_UINT8, pb.DTYPE_BOOL)
CLASS_INDEX_LABEL_DTYPES = (pb.DTYPE_INT32, pb.DTYPE_INT64)

DENSE = "dense"
CLASS_INDEX = "class_index"
_LABEL_FORMATS = {
    pb.LABEL_FORMAT_UNSPECIFIED: DENSE,
    pb.LABEL_FORMAT_DENSE: DENSE,
    pb.LABEL_FORMAT_CLASS_INDEX: CLASS_INDEX,
}
_BACKENDS = frozenset(pb.Backend.values())
_REDUCTIONS = {
    pb.REDUCTION_UNSPECIFIED: "sum",
    pb.REDUCTION_NONE: "none",
    pb.REDUCTION_MEAN: "mean",
    pb.REDUCTION_SUM: "sum",
}


@dataclass
class Job:
    """One validated request, ready for a backend.

    `logit` is in the compute dtype (float32 or float64). For the dense form `label` has the logit's
    shape in its wire dtype; for the class-index form it is the flat [N] vector of class indices.
    `normalizer` is final (dense: given or 1; class-index: fg_num given or counted, clamped to >= 1).
    `grad_scale` is what every element's gradient is multiplied by: 1/normalizer, times 1/numel for
    MEAN, times the scalar `grad_output` for SUM/MEAN; for NONE `grad_output` is per element.
    """

    request_id: str
    logit: np.ndarray
    label: np.ndarray
    label_format: str
    alpha: float
    gamma: float
    normalizer: float
    reduction: str
    compute_grad: bool
    grad_output: np.ndarray | None
    grad_scale: float
    backend: int
    num_classes: int = 0
    positives: float | None = None  # known up front for class-index labels; counted by the backend otherwise
    batch_elements: int = 0  # the whole batch's size when this job is one of its chunks (ComputeRequest field 12)

    @property
    def elements(self) -> int:
        return self.logit.size

    @property
    def dtype(self) -> np.dtype:
        return self.logit.dtype

    @property
    def engine_elements(self) -> int:
        """The size BACKEND_AUTO chooses the engine by: the whole batch's, for every chunk of a split one."""
        return max(self.elements, self.batch_elements)


@dataclass(frozen=True)
class Limits:
    max_elements: int = 0  # 0: no limit beyond the message size


def parse(request: pb.ComputeRequest, limits: Limits = Limits(), payloads: dict | None = None) -> Job:
    """Validates `request` (SPEC §1.6) and resolves its defaults. Raises RequestError.

    `payloads`: the tensors' data by field name where they are held outside the message (service.py reads
    large requests without copying them); the message's own `data` otherwise."""
    label_format = _enum(request.label_format, _LABEL_FORMATS, "label_format", pb.LabelFormat)
    reduction = _enum(request.reduction, _REDUCTIONS, "reduction", pb.Reduction)
    if request.backend not in _BACKENDS:
        raise RequestError.invalid("backend", f"unknown Backend value {request.backend}")

    alpha = request.alpha if request.HasField("alpha") else DEFAULT_ALPHA
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise RequestError.invalid("alpha", f"must be in [0, 1], got {alpha!r}")
    gamma = request.gamma if request.HasField("gamma") else DEFAULT_GAMMA
    if not (math.isfinite(gamma) and gamma >= 0.0):
        raise RequestError.invalid("gamma", f"must be finite and >= 0, got {gamma!r}")

    for field in ("logit", "label"):
        if not request.HasField(field):
            raise RequestError.invalid(field, "is required")
    logit = _tensor(request.logit, "logit", LOGIT_DTYPES, payloads)
    if limits.max_elements and logit.size > limits.max_elements:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            ("logit", f"{logit.size} elements exceed this server's limit of {limits.max_elements} per request "
                      "(--max-elements); split the batch (the Python client does it by itself)"),
        )
    if request.batch_elements < 0 or 0 < request.batch_elements < logit.size:
        raise RequestError.invalid("batch_elements", "must be 0 (the request is the whole batch) or the element count "
                                                     f"of the batch it is a chunk of, at least its own {logit.size}; "
                                                     f"got {request.batch_elements}")
    if logit.dtype == np.float16:
        logit = logit.astype(np.float32)  # SPEC §2: float16 is computed (and returned) in float32

    if label_format == DENSE:
        if logit.ndim == 0:
            raise RequestError.invalid("logit.shape", "must have rank >= 1 for the dense form, got a scalar")
        label = _tensor(request.label, "label", DENSE_LABEL_DTYPES, payloads)
        if label.dtype == np.bool_:
            label = _canonical_bool(label)
        if label.shape != logit.shape:
            raise RequestError.invalid(
                "label.shape", f"{list(label.shape)} does not match logit.shape {list(logit.shape)}")
        num_classes = 0
        positives = None
        normalizer = _dense_normalizer(request, logit.dtype)
    else:
        if logit.ndim != 2:
            raise RequestError.invalid(
                "logit.shape", f"must be [N, C] for the class-index form, got {list(logit.shape)}")
        rows, num_classes = logit.shape
        if num_classes > MAX_CLASSES:
            # the GPU kernel takes C as an int and class labels as int32: refused here for every engine (even
            # with no rows), rather than failing inside one of them (INTERNAL) or answering on another
            raise RequestError.invalid("logit.shape", f"C = {num_classes} classes is more than the {MAX_CLASSES} "
                                                      "(2^31 - 1) the class-index form allows")
        label = _tensor(request.label, "label", CLASS_INDEX_LABEL_DTYPES, payloads)
        if label.shape != (rows, 1):
            raise RequestError.invalid("label.shape", f"must be [{rows}, 1] (logit is [N, C]), got {list(label.shape)}")
        label = label.reshape(rows)
        positives = float(check_class_index_labels(label, num_classes))
        normalizer = _class_index_normalizer(request, positives)

    grad_output = None
    if request.HasField("grad_output"):
        grad_output = _grad_output(request.grad_output, reduction, logit, payloads)
    if reduction == "none":
        grad_scale = 1.0 / normalizer
    else:
        upstream = 1.0 if grad_output is None else float(grad_output.reshape(()))
        count = logit.size if reduction == "mean" else 1
        # one division by the product, so a client splitting a MEAN request into SUM chunks with
        # normalizer * numel gets bit-identical gradients
        grad_scale = upstream / (normalizer * count) if logit.size else 0.0
        grad_output = None

    if not np.isfinite(logit.dtype.type(grad_scale)):
        # e.g. grad_output 1e300 on float32, or a tiny normalizer: every gradient would be inf, ignored ones NaN
        field = "grad_output" if request.HasField("grad_output") else "normalizer"
        raise RequestError.invalid(field, f"the gradient's scale (grad_output / normalizer{' / numel' if reduction == 'mean' else ''}"
                                          f" = {grad_scale:.3g}) overflows {logit.dtype.name}")

    return Job(
        request_id=request.request_id,
        logit=logit,
        label=label,
        label_format=label_format,
        alpha=float(alpha),
        # q^γ is already 0 for every q < 1 representable in float64 at γ = 1e30; beyond it the factor γ
        # itself would overflow float32 (inf · 0 = NaN), so larger γ computes as 1e30, with the same result.
        # γ as the compute dtype holds it, in every engine: the float32 ones cannot use another, and q^γ
        # would carry γ's rounding (|ln q|·γ·2^-24 relative, tens of ulps) into one engine and not another.
        gamma=float(logit.dtype.type(min(float(gamma), MAX_EFFECTIVE_GAMMA))),
        normalizer=normalizer,
        reduction=reduction,
        compute_grad=request.compute_grad,
        grad_output=grad_output,
        grad_scale=grad_scale,
        backend=request.backend,
        num_classes=num_classes,
        positives=positives,
        batch_elements=request.batch_elements,
    )


def _enum(value: int, names: dict[int, str], field: str, enum_type) -> str:
    try:
        return names[value]
    except KeyError:
        raise RequestError.invalid(field, f"unknown {enum_type.DESCRIPTOR.name} value {value}") from None


def _tensor(tensor: pb.Tensor, field: str, allowed: tuple[int, ...], payloads: dict | None = None) -> np.ndarray:
    try:
        return decode(tensor, field, allowed, data=payloads.get(field) if payloads else None)
    except TensorError as e:
        raise RequestError.invalid(e.field, e.reason) from None


def _canonical_bool(label: np.ndarray) -> np.ndarray:
    """BOOL labels as bytes 0/1. NumPy reads any other byte as True, but the compiled kernels read the
    bytes themselves (as uint8) and would call a 2 a bad label: such bytes become 1 here, once."""
    raw = label.view(np.uint8)
    if raw.size and raw.max() > 1:
        return np.not_equal(raw, 0)
    return label


def _dense_normalizer(request: pb.ComputeRequest, dtype: np.dtype) -> float:
    if not request.HasField("normalizer"):
        return 1.0
    value = request.normalizer
    if not (math.isfinite(value) and value > 0.0):
        raise RequestError.invalid("normalizer", f"must be finite and > 0 for the dense form, got {value!r}")
    smallest = float(np.finfo(dtype).tiny)
    if value < smallest:  # 1/normalizer would overflow the compute dtype: 0 · inf = NaN for zero losses
        raise RequestError.invalid("normalizer", f"{value!r} is below the smallest normal {dtype.name} "
                                                 f"({smallest:.3g}); scale the loss on the client instead")
    return value


def _class_index_normalizer(request: pb.ComputeRequest, positives: float) -> float:
    """fg_num: given, or the number of labels >= 1; clamped to >= 1 like the legacy op."""
    if request.HasField("normalizer"):
        value = request.normalizer
        if not math.isfinite(value):
            raise RequestError.invalid("normalizer", f"fg_num must be finite, got {value!r}")
    else:
        value = positives
    return max(value, 1.0)


def check_class_index_labels(label: np.ndarray, num_classes: int) -> int:
    """Raises unless every label is in {-1, 0..C}; returns the number of positives (labels >= 1)."""
    if label.size == 0:
        return 0
    low, high = int(label.min()), int(label.max())
    if low < -1 or high > num_classes:
        bad = np.flatnonzero((label < -1) | (label > num_classes))
        raise RequestError.invalid(
            "label",
            f"class-index labels must be in {{-1, 0..{num_classes}}} (C = {num_classes}); "
            f"{bad.size} are not, the first at row {bad[0]}: {int(label[bad[0]])}")
    return int(np.count_nonzero(label >= 1))


def _grad_output(tensor: pb.Tensor, reduction: str, logit: np.ndarray, payloads: dict | None) -> np.ndarray:
    grad_output = _tensor(tensor, "grad_output", FLOAT_DTYPES, payloads)
    if reduction == "none":
        if grad_output.shape != logit.shape:
            raise RequestError.invalid(
                "grad_output.shape",
                f"must match logit.shape {list(logit.shape)} for reduction NONE, got {list(grad_output.shape)}")
    elif grad_output.size != 1 or grad_output.ndim > 1:
        raise RequestError.invalid(
            "grad_output.shape", f"must be a scalar ([] or [1]) for reduction {reduction.upper()}, "
                                 f"got {list(grad_output.shape)}")
    if not np.isfinite(grad_output).all():
        raise RequestError.invalid("grad_output", "contains NaN or infinite values")
    return grad_output.astype(logit.dtype, copy=False)


# ---- per-block value checks, called by the backends while a block is in cache ----

def raise_nonfinite_logits(block_start: int, block: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(block))
    raise RequestError.invalid(
        "logit",
        f"contains NaN or infinite values (first at flat index {block_start + int(bad[0])}: {block[bad[0]]}); "
        "the server rejects them unless started with --allow-nonfinite", reason="nonfinite")


def raise_bad_dense_labels(block_start: int, block: np.ndarray) -> None:
    bad = np.flatnonzero(~(((block >= 0) & (block <= 1)) | (block == IGNORE_LABEL)))
    raise RequestError.invalid(
        "label",
        f"dense labels must be in [0, 1] or {IGNORE_LABEL} (ignored); "
        f"found {block[bad[0]]} at flat index {block_start + int(bad[0])}")
