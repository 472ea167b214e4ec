"""Property tests of SPEC §1 over the real server, against an independent reference written here.

The reference below is SPEC §1 evaluated in extended precision (`np.longdouble`) with the stable forms
of §1.5; it imports nothing from the server. Every check goes through the gRPC stub.

Tolerances (why they are sound):
- The server computes float32 (and float16/bfloat16, widened) in float32. We compare against the
  reference evaluated on the inputs *as the server sees them* (logits, labels and grad_output rounded to
  the compute dtype), so only the server's own rounding is measured.
- Loss = α_t·q^γ·CE is a product of sums of non-negative terms (α_t = α·y + (1-α)(1-y) included): a
  faithful implementation has a small relative error, growing with γ (q^γ), so
  |got-ref| <= RTOL·(1+γ)·ref + TINY.
- The gradient α_t·q^γ·[(p-y) + γ(1-2y)·r·CE] has an inherent cancellation for soft labels (p - y, and
  the two terms of the bracket), so its error is bounded relative to the magnitude of its parts:
  B = α_t·q^γ·[p(1-y) + (1-p)y + γ·r·CE]; |got-ref| <= RTOL·(1+γ)·B·scale + TINY.
- TINY covers float32 denormals (exp(-|x|) underflows into the denormal range for |x| > 87).
- Reductions: relative to the sum of |terms|.
Measured on a faithful implementation over 5000 examples: float32 error <= 1.5e-6·B (RTOL is 2e-5),
float64 <= 2.2e-15·B (RTOL is 1e-10).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import EXPECTED_BACKEND
from focalloss.v1 import focal_loss_pb2 as pb
from focalserve_client.tensor import decode, encode, float32_to_bfloat16

LD = np.longdouble
IGNORE = -100.0
DEFAULT_ALPHA, DEFAULT_GAMMA = 0.25, 2.0
FLOAT_OUT = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64)
ANY_DTYPE = tuple(pb.DType.values())

# relative tolerances per compute dtype (multiplied by 1+γ), and the absolute floor per element
RTOL = {np.float32: 2e-5, np.float64: 1e-10}
TINY = {np.float32: 1e-36, np.float64: 1e-300}

# FOCALSERVE_PROPERTY_EXAMPLES raises the example count for a longer hunt (5000 runs in about a minute)
MAX_EXAMPLES = int(os.environ.get("FOCALSERVE_PROPERTY_EXAMPLES", "200"))
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])
FD_SETTINGS = settings(SETTINGS, max_examples=max(1, MAX_EXAMPLES // 3))

REDUCTION_NAMES = {pb.REDUCTION_NONE: "none", pb.REDUCTION_MEAN: "mean", pb.REDUCTION_SUM: "sum",
                   pb.REDUCTION_UNSPECIFIED: "sum"}


# ============================== independent reference (SPEC §1) ==============================

def reference_elementwise(x, y, alpha: float, gamma: float):
    """Per element, before normalizer/reduction: (loss, dloss/dx, B) in longdouble.

    x: logits (float64 values); y: labels in [0,1] or -100 (ignored: everything 0).
    B = α_t q^γ [p(1-y) + (1-p)y + γ r CE] bounds the magnitude of the gradient's parts.
    """
    x = np.asarray(x, np.float64).astype(LD)
    y = np.asarray(y, np.float64)
    keep = (y != IGNORE).astype(LD)
    y = np.where(y == IGNORE, 0.0, y).astype(LD)
    a, g = LD(alpha), LD(gamma)
    one = LD(1)

    e = np.exp(-np.abs(x))                      # in (0, 1], never overflows
    s = np.log1p(e)                             # softplus(-|x|)
    softplus_x = s + np.maximum(x, 0)           # softplus(x)  = -log(1-p)
    softplus_neg_x = s + np.maximum(-x, 0)      # softplus(-x) = -log p
    inv = one / (one + e)
    p = np.where(x >= 0, inv, e * inv)          # σ(x)
    omp = np.where(x >= 0, e * inv, inv)        # σ(-x) = 1 - p, without subtraction
    omy = one - y

    ce = y * softplus_neg_x + omy * softplus_x
    q = omp * y + p * omy                       # 1 - p_t
    alpha_t = a * y + (one - a) * omy
    qg = np.power(q, g)                         # 0^0 = 1
    r = np.zeros_like(q)
    np.divide(p * omp, q, out=r, where=q > 0)   # p(1-p)/q in [0, 1]; 0 where q = 0
    w = alpha_t * qg

    loss = w * ce
    grad = w * ((p * omy - omp * y) + g * (one - 2 * y) * r * ce)
    bound = w * ((p * omy + omp * y) + g * r * ce)
    return loss * keep, grad * keep, bound * keep


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class-index labels [N] -> dense float labels [N, C]: -1 rows become -100 (ignored)."""
    labels = np.asarray(labels).reshape(-1)
    y = (labels[:, None] == np.arange(1, num_classes + 1)[None, :]).astype(np.float64)
    y[labels == -1, :] = IGNORE
    return y


def reference(x, y, alpha, gamma, normalizer, reduction, grad_output):
    """Loss, grad (= ∂Σ g⊙L/∂x) and tolerance bases after normalizer and reduction. Longdouble arrays.

    Returns dict: loss, grad, loss_mag (sum of |terms| behind each loss value), grad_mag (B scaled),
    loss_sum (un-normalized sum), n_terms (values behind each loss, for the absolute floor).
    """
    loss_e, grad_e, bound_e = reference_elementwise(x, y, alpha, gamma)
    norm = LD(normalizer)
    if reduction == "none":
        g = np.ones(loss_e.shape, LD) if grad_output is None else np.asarray(grad_output, np.float64).astype(LD)
        return dict(loss=loss_e / norm, loss_mag=loss_e / norm,
                    grad=grad_e * g / norm, grad_mag=bound_e * np.abs(g) / norm,
                    loss_sum=loss_e.sum(), n_terms=1)
    count = LD(loss_e.size) if reduction == "mean" else LD(1)
    g = LD(1) if grad_output is None else LD(float(np.asarray(grad_output).reshape(())))
    total = loss_e.sum()
    return dict(loss=np.asarray(total / (norm * count)), loss_mag=np.asarray(total / (norm * count)),
                grad=grad_e * g / (norm * count), grad_mag=bound_e * abs(g) / (norm * count),
                loss_sum=total, n_terms=loss_e.size)


# ============================== helpers ==============================

def compute_dtype(logit_wire: int):
    return np.float64 if logit_wire == pb.DTYPE_FLOAT64 else np.float32


def to_wire(values: np.ndarray, wire: int) -> pb.Tensor:
    """float64 values -> Tensor of `wire` dtype (rounded the way a client would)."""
    values = np.asarray(values, np.float64)
    if wire == pb.DTYPE_BFLOAT16:
        return encode(float32_to_bfloat16(values.astype(np.float32)), pb.DTYPE_BFLOAT16)
    numpy_dtype = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_FLOAT64: np.float64, pb.DTYPE_FLOAT16: np.float16,
                   pb.DTYPE_UINT8: np.uint8, pb.DTYPE_BOOL: np.bool_}[wire]
    return encode(values.astype(numpy_dtype), wire)


def seen(tensor: pb.Tensor, dtype) -> np.ndarray:
    """What the server computes with: the tensor's values in the compute dtype, as float64."""
    return decode(tensor, "t", ANY_DTYPE).astype(dtype).astype(np.float64)


def assert_close(got, want, mag, rtol, tiny, what, context):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, LD)
    tol = rtol * np.asarray(mag, LD) + LD(tiny)
    err = np.abs(got.astype(LD) - want)
    bad = ~(err <= tol)
    if bad.any():
        idx = np.unravel_index(int(np.argmax(bad)), bad.shape) if bad.ndim else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} values off; first at {idx}: got {got[idx]!r}, "
            f"reference {float(want[idx])!r}, |err| {float(err[idx]):.3e} > tol {float(tol[idx]):.3e}; "
            + context(idx))


def check_response(resp, *, x, y, alpha, gamma, normalizer, reduction, grad_output, cdtype, shape,
                   positives, label_desc=""):
    """Everything a response must satisfy against the reference."""
    ref = reference(x, y, alpha, gamma, normalizer, reduction, grad_output)
    rtol = RTOL[cdtype] * (1 + gamma)
    tiny = TINY[cdtype] * max(1.0, 1.0 / normalizer) * (1.0 if grad_output is None
                                                       else max(1.0, float(np.max(np.abs(grad_output)))))
    wire = pb.DTYPE_FLOAT64 if cdtype is np.float64 else pb.DTYPE_FLOAT32
    assert resp.backend == EXPECTED_BACKEND
    assert resp.loss.dtype == wire and resp.grad.dtype == wire
    loss = decode(resp.loss, "loss", FLOAT_OUT)
    grad = decode(resp.grad, "grad", FLOAT_OUT)
    assert loss.shape == (shape if reduction == "none" else ())
    assert grad.shape == shape
    assert np.isfinite(loss).all(), f"non-finite loss {loss}"
    assert np.isfinite(grad).all(), f"non-finite grad {grad}"

    xf, yf = np.asarray(x).reshape(-1), np.asarray(y).reshape(-1)

    def context(idx):
        if reduction != "none" and len(idx) == 0:
            return f"(reduced over {xf.size} elements; alpha={alpha!r} gamma={gamma!r} normalizer={normalizer!r})"
        flat = int(np.ravel_multi_index(idx, shape)) if idx else 0
        g = "" if grad_output is None else f" grad_output={np.asarray(grad_output).reshape(-1)[flat if reduction == 'none' else 0]!r}"
        return (f"x={xf[flat]!r} y={yf[flat]!r} alpha={alpha!r} gamma={gamma!r} normalizer={normalizer!r} "
                f"reduction={reduction}{g} dtype={cdtype.__name__}{label_desc}")

    assert_close(loss, ref["loss"], ref["loss_mag"], rtol, tiny * ref["n_terms"], "loss", context)
    assert_close(grad, ref["grad"], ref["grad_mag"], rtol, tiny, "grad", context)

    s = resp.stats
    assert s.elements == xf.size
    assert s.positives == positives
    assert s.compute_seconds >= 0
    assert_close(s.loss_sum, ref["loss_sum"], ref["loss_sum"], rtol, TINY[cdtype] * xf.size,
                 "stats.loss_sum", lambda idx: f"alpha={alpha!r} gamma={gamma!r}")


# ============================== strategies ==============================

SPECIAL_LOGITS = [0.0, -0.0, 1e-30, -1e-7, 0.5, -0.5, 1.0, -1.0, 5.0, -5.0, 17.0, -17.0, 20.0, -20.0,
                  36.7, -36.7, 50.0, -50.0, 87.5, -87.5, 89.0, -89.0, 104.0, -104.0, 200.0, -200.0,
                  745.2, -745.2, 1000.0, -1000.0, 1e4, -1e4]
logit_values = st.one_of(
    st.floats(-20.0, 20.0),
    st.sampled_from(SPECIAL_LOGITS),
    st.floats(-1e4, 1e4),
)
soft_labels = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 0.5]), st.just(IGNORE))
gammas = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, 8.0]), st.floats(0.0, 8.0))
alphas = st.one_of(st.none(), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.floats(0.0, 1.0))
normalizers = st.one_of(st.none(), st.sampled_from([1.0, 0.5, 1e3]), st.floats(1e-3, 1e3))
reductions = st.sampled_from([pb.REDUCTION_NONE, pb.REDUCTION_MEAN, pb.REDUCTION_SUM, pb.REDUCTION_UNSPECIFIED])
logit_wires = st.sampled_from([pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64,
                               pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16])


@st.composite
def dense_shapes(draw):
    rank = draw(st.integers(1, 3))
    max_side = {1: 300, 2: 17, 3: 6}[rank]
    return tuple(draw(st.lists(st.integers(1, max_side), min_size=rank, max_size=rank)))


@st.composite
def grad_outputs(draw, shape, reduction):
    """None, or a loss-shaped (NONE) / scalar (SUM, MEAN) upstream gradient as (values, wire dtype)."""
    if draw(st.booleans()):
        return None
    wire = draw(st.sampled_from([pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64]))
    values = st.one_of(st.floats(-10.0, 10.0), st.sampled_from([1.0, -1.0, 0.0, 1e-3]))
    if reduction == pb.REDUCTION_NONE:
        return draw(hnp.arrays(np.float64, shape, elements=values)), wire
    scalar_shape = draw(st.sampled_from([(), (1,)]))
    return np.full(scalar_shape, draw(values)), wire


@st.composite
def dense_cases(draw):
    shape = draw(dense_shapes())
    logit_wire = draw(logit_wires)
    label_wire = draw(st.sampled_from([pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16,
                                       pb.DTYPE_UINT8, pb.DTYPE_BOOL]))
    logits = draw(hnp.arrays(np.float64, shape, elements=logit_values))
    if label_wire in (pb.DTYPE_UINT8, pb.DTYPE_BOOL):
        labels = draw(hnp.arrays(np.float64, shape, elements=st.sampled_from([0.0, 1.0])))
    else:
        labels = draw(hnp.arrays(np.float64, shape, elements=soft_labels))
    reduction = draw(reductions)
    return dict(shape=shape, logit_wire=logit_wire, label_wire=label_wire, logits=logits, labels=labels,
                alpha=draw(alphas), gamma=draw(st.one_of(st.none(), gammas)), normalizer=draw(normalizers),
                reduction=reduction, grad_output=draw(grad_outputs(shape, reduction)))


@st.composite
def class_index_cases(draw):
    num_classes = draw(st.integers(1, 12))
    rows = draw(st.integers(1, 300 // num_classes))
    logit_wire = draw(logit_wires)
    label_wire = draw(st.sampled_from([pb.DTYPE_INT32, pb.DTYPE_INT64]))
    logits = draw(hnp.arrays(np.float64, (rows, num_classes), elements=logit_values))
    labels = draw(hnp.arrays(np.int64, (rows, 1), elements=st.integers(-1, num_classes)))
    reduction = draw(reductions)
    return dict(logit_wire=logit_wire, label_wire=label_wire, logits=logits, labels=labels,
                alpha=draw(alphas), gamma=draw(st.one_of(st.none(), gammas)), normalizer=draw(normalizers),
                reduction=reduction, grad_output=draw(grad_outputs((rows, num_classes), reduction)))


def build_request(case, label_tensor):
    req = pb.ComputeRequest(request_id="prop", logit=to_wire(case["logits"], case["logit_wire"]),
                            label=label_tensor, reduction=case["reduction"], compute_grad=True)
    for field in ("alpha", "gamma", "normalizer"):
        if case[field] is not None:
            setattr(req, field, case[field])
    if case["grad_output"] is not None:
        values, wire = case["grad_output"]
        req.grad_output.CopyFrom(to_wire(values, wire))
    return req


def seen_grad_output(req, cdtype):
    return seen(req.grad_output, cdtype) if req.HasField("grad_output") else None


# ============================== properties ==============================

@SETTINGS
@given(case=dense_cases())
@example(case=dict(shape=(4,), logit_wire=pb.DTYPE_FLOAT64, label_wire=pb.DTYPE_FLOAT64,
                   logits=np.array([17.0, 50.0, -1e4, 1e4]), labels=np.array([1.0, 1.0, 1.0, 0.0]),
                   alpha=None, gamma=0.5, normalizer=None, reduction=pb.REDUCTION_NONE, grad_output=None))
@example(case=dict(shape=(2, 3), logit_wire=pb.DTYPE_FLOAT32, label_wire=pb.DTYPE_FLOAT32,
                   logits=np.array([[0.0, 1e4, -1e4], [100.0, -100.0, 0.0]]),
                   labels=np.array([[0.3, 0.0, 1.0], [1.0, 0.0, IGNORE]]),
                   alpha=0.9, gamma=3.5, normalizer=7.0, reduction=pb.REDUCTION_MEAN,
                   grad_output=(np.array(2.5), pb.DTYPE_FLOAT64)))
@example(case=dict(shape=(3,), logit_wire=pb.DTYPE_FLOAT32, label_wire=pb.DTYPE_FLOAT32,  # small α, y = 1
                   logits=np.array([-3.0, 0.0, 2.0]), labels=np.array([1.0, 1.0, 0.0]),
                   alpha=1e-4, gamma=None, normalizer=None, reduction=pb.REDUCTION_NONE, grad_output=None))
def test_dense_matches_reference(stub, case):
    cdtype = compute_dtype(case["logit_wire"])
    req = build_request(case, to_wire(case["labels"], case["label_wire"]))
    x, y = seen(req.logit, cdtype), seen(req.label, cdtype)
    resp = stub.Compute(req, timeout=30)
    check_response(
        resp, x=x, y=y,
        alpha=DEFAULT_ALPHA if case["alpha"] is None else case["alpha"],
        gamma=DEFAULT_GAMMA if case["gamma"] is None else case["gamma"],
        normalizer=1.0 if case["normalizer"] is None else case["normalizer"],
        reduction=REDUCTION_NAMES[case["reduction"]], grad_output=seen_grad_output(req, cdtype),
        cdtype=cdtype, shape=case["shape"], positives=int(np.count_nonzero(y > 0.5)),
        label_desc=f" label_dtype={pb.DType.Name(case['label_wire'])}")


@SETTINGS
@given(case=class_index_cases())
@example(case=dict(logit_wire=pb.DTYPE_FLOAT32, label_wire=pb.DTYPE_INT32,
                   logits=np.array([[-1e4, 1e4, 0.0], [-100.0, 3.0, 17.0], [5.0, 5.0, 5.0]]),
                   labels=np.array([[1], [0], [-1]]), alpha=None, gamma=None, normalizer=None,
                   reduction=pb.REDUCTION_SUM, grad_output=None))
@example(case=dict(logit_wire=pb.DTYPE_FLOAT32, label_wire=pb.DTYPE_INT64,  # small α, positive column
                   logits=np.array([[-3.0, 2.0]]), labels=np.array([[1]]), alpha=1e-4, gamma=None,
                   normalizer=None, reduction=pb.REDUCTION_NONE, grad_output=None))
def test_class_index_matches_reference(stub, case):
    cdtype = compute_dtype(case["logit_wire"])
    rows, num_classes = case["logits"].shape
    label_dtype = np.int32 if case["label_wire"] == pb.DTYPE_INT32 else np.int64
    req = build_request(case, encode(case["labels"].astype(label_dtype)))
    req.label_format = pb.LABEL_FORMAT_CLASS_INDEX
    x = seen(req.logit, cdtype)
    labels = case["labels"].reshape(-1)
    positives = int(np.count_nonzero(labels >= 1))
    fg_num = positives if case["normalizer"] is None else case["normalizer"]
    resp = stub.Compute(req, timeout=30)
    check_response(
        resp, x=x, y=one_hot(labels, num_classes),
        alpha=DEFAULT_ALPHA if case["alpha"] is None else case["alpha"],
        gamma=DEFAULT_GAMMA if case["gamma"] is None else case["gamma"],
        normalizer=max(float(fg_num), 1.0),
        reduction=REDUCTION_NAMES[case["reduction"]], grad_output=seen_grad_output(req, cdtype),
        cdtype=cdtype, shape=(rows, num_classes), positives=positives)


@st.composite
def fd_cases(draw):
    n = draw(st.integers(1, 6))
    reduction = draw(reductions)
    return dict(
        logits=draw(hnp.arrays(np.float64, (n,), elements=st.one_of(
            st.floats(-20.0, 20.0), st.sampled_from([0.0, 1e-3, -1e-3, 2.0, -2.0, 19.5, -19.5])))),
        labels=draw(hnp.arrays(np.float64, (n,), elements=st.one_of(
            st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 0.5, IGNORE])))),
        alpha=draw(alphas), gamma=draw(st.one_of(st.none(), gammas)), normalizer=draw(normalizers),
        reduction=reduction, grad_output=draw(grad_outputs((n,), reduction)))


@FD_SETTINGS
@given(case=fd_cases())
@example(case=dict(logits=np.array([0.0, 19.5, -19.5, 3.0]), labels=np.array([0.5, 1.0, 0.0, 0.2]),
                   alpha=0.25, gamma=0.5, normalizer=None, reduction=pb.REDUCTION_MEAN, grad_output=None))
def test_gradient_matches_central_finite_differences(stub, case):
    """grad = ∂(Σ g⊙L)/∂x, checked with central differences of the server's own float64 loss."""
    h = 1e-6
    base = build_request(dict(case, logit_wire=pb.DTYPE_FLOAT64), encode(case["labels"]))
    reduction = REDUCTION_NAMES[case["reduction"]]
    g = np.ones(case["logits"].shape) if case["grad_output"] is None else \
        np.broadcast_to(seen(base.grad_output, np.float64), case["logits"].shape)

    def objective_terms(x: np.ndarray) -> np.ndarray:
        req = pb.ComputeRequest()
        req.CopyFrom(base)
        req.logit.CopyFrom(encode(x))
        req.compute_grad = False
        loss = decode(stub.Compute(req, timeout=30).loss, "loss", FLOAT_OUT)
        return g * loss if reduction == "none" else g.reshape(-1)[:1] * loss

    resp = stub.Compute(base, timeout=30)
    grad = decode(resp.grad, "grad", FLOAT_OUT)
    x0 = case["logits"]
    magnitude = float(np.sum(np.abs(objective_terms(x0))))
    # rounding noise of a central difference of a float64 objective, plus h² truncation
    noise = 8 * np.finfo(np.float64).eps * magnitude / h + 1e-9 * float(np.max(np.abs(grad)))
    for i in range(x0.size):
        plus, minus = x0.copy(), x0.copy()
        plus[i] += h
        minus[i] -= h
        step = plus[i] - minus[i]
        fd = float(np.sum(objective_terms(plus) - objective_terms(minus))) / step
        tol = 1e-5 * abs(fd) + noise + 1e-12
        assert abs(grad[i] - fd) <= tol, (
            f"element {i}: grad {grad[i]!r} vs central difference {fd!r} (tol {tol:.2e}); x={x0[i]!r} "
            f"y={case['labels'][i]!r} alpha={case['alpha']!r} gamma={case['gamma']!r} "
            f"normalizer={case['normalizer']!r} reduction={reduction} g={g.reshape(-1)[i]!r}")


# ============================== specific edge values (SPEC §1.5) ==============================

def compute(stub, x, y, dtype=np.float64, **fields):
    req = pb.ComputeRequest(logit=encode(np.asarray(x, dtype)), label=encode(np.asarray(y, dtype)),
                            reduction=fields.pop("reduction", pb.REDUCTION_NONE), compute_grad=True, **fields)
    resp = stub.Compute(req, timeout=30)
    return decode(resp.loss, "loss", FLOAT_OUT), decode(resp.grad, "grad", FLOAT_OUT)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("x, gamma", [(17.0, 0.0), (17.0, 2.0), (50.0, 0.0), (50.0, 1.0), (30.0, 0.5)])
def test_positive_tail_keeps_relative_precision(stub, x, gamma, dtype, rtol):
    """x = 17, y = 1, γ = 0: loss = α·log1p(e^-17) ≈ 1.04e-8, not 0 (no max(x,0) - x·y cancellation)."""
    alpha = 0.25
    tail = math.log1p(math.exp(-x))                  # CE = softplus(-x)
    omp = sigmoid(-x)                                # 1 - p
    want_loss = alpha * omp ** gamma * tail
    want_grad = -alpha * omp ** gamma * (omp + gamma * sigmoid(x) * tail)   # SPEC §1.4, y = 1
    loss, grad = compute(stub, [x], [1.0], dtype, alpha=alpha, gamma=gamma)
    assert loss[0] > 0 and grad[0] < 0
    assert loss[0] == pytest.approx(want_loss, rel=rtol, abs=0)
    assert grad[0] == pytest.approx(want_grad, rel=rtol, abs=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("alpha", [0.25, 0.6])
def test_extreme_logits_are_finite_and_exact(stub, dtype, gamma, alpha):
    """x = ±1e4 with hard labels: wrong side gives loss α_t·1e4 and grad ∓α_t exactly; right side 0."""
    x = [-1e4, 1e4, 1e4, -1e4]
    y = [1.0, 0.0, 1.0, 0.0]
    loss, grad = compute(stub, x, y, dtype, alpha=alpha, gamma=gamma)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    a, b = dtype(alpha), dtype(1 - alpha)
    np.testing.assert_allclose(loss, [a * dtype(1e4), b * dtype(1e4), 0, 0], rtol=4 * np.finfo(dtype).eps, atol=0)
    np.testing.assert_allclose(grad, [-a, b, 0, 0], rtol=4 * np.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("gamma", [0.5, 0.25, 0.75])
def test_fractional_gamma_saturated_logits_are_finite(stub, dtype, gamma):
    """0 < γ < 1 with 1-p_t rounding to 0 (PaddlePaddle's gradient is NaN there): finite and right."""
    x = np.array([30.0, 50.0, 100.0, 1e4, -30.0, -50.0, -100.0, -1e4])
    y = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    loss, grad = compute(stub, x, y, dtype, alpha=0.25, gamma=gamma)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    ref_loss, ref_grad, bound = reference_elementwise(x.astype(dtype), y, 0.25, gamma)
    assert_close(loss, ref_loss, ref_loss, 1e-5, TINY[dtype], "loss", lambda i: f"x={x[i]}")
    assert_close(grad, ref_grad, bound, 1e-5, TINY[dtype], "grad", lambda i: f"x={x[i]}")


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-6)], ids=["f64", "f32"])
@pytest.mark.parametrize("y", [0.0, 1.0, 0.3, 0.5])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 0.5])
def test_gradient_at_exactly_zero(stub, dtype, rtol, y, gamma):
    """x = 0: p = 1-p = q = 1/2, r = 1/2, CE = log 2: grad = α_t 2^-γ [(1/2 - y) + γ(1-2y) log(2)/2]."""
    alpha = 0.25
    alpha_t = alpha * y + (1 - alpha) * (1 - y)
    want = alpha_t * 0.5 ** gamma * ((0.5 - y) + gamma * (1 - 2 * y) * 0.5 * math.log(2))
    loss, grad = compute(stub, [0.0, -0.0], [y, y], dtype, alpha=alpha, gamma=gamma)
    assert loss.tolist() == pytest.approx([alpha_t * 0.5 ** gamma * math.log(2)] * 2, rel=rtol, abs=0)
    assert grad.tolist() == pytest.approx([want] * 2, rel=rtol, abs=1e-300)


@pytest.mark.parametrize("alpha", [1e-12, 3.3e-7, 1e-4, 1e-2, 0.99, 1 - 1e-4])
@pytest.mark.parametrize("y", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_alpha_t_keeps_relative_precision(stub, alpha, y, dtype):
    """α_t = α·y + (1-α)(1-y) for a hard label is exactly α or 1-α: loss keeps float relative precision."""
    alpha_t = alpha if y == 1.0 else 1.0 - alpha
    x = -3.0 if y == 1.0 else 3.0                    # the wrong side: CE = softplus(3)
    ce = 3.0 + math.log1p(math.exp(-3.0))
    want = alpha_t * sigmoid(3.0) ** 2 * ce           # γ = 2, q = σ(3)
    loss, _ = compute(stub, [x], [y], dtype, alpha=alpha, gamma=2.0)
    assert loss[0] == pytest.approx(want, rel=24 * float(np.finfo(dtype).eps), abs=0)


def test_grad_only_when_asked_and_request_id_echoed(stub):
    req = pb.ComputeRequest(request_id="no-grad", logit=encode(np.array([0.5, -2.0])),
                            label=encode(np.array([1.0, 0.0])), reduction=pb.REDUCTION_NONE)
    resp = stub.Compute(req, timeout=30)
    assert resp.request_id == "no-grad"
    assert not resp.HasField("grad")
    assert decode(resp.loss, "loss", FLOAT_OUT).shape == (2,)


# ---- the reference itself, against the naive textbook formulas where those are accurate ----

@settings(max_examples=200, deadline=None)
@given(x=st.floats(-8.0, 8.0), y=st.floats(0.0, 1.0), alpha=st.floats(0.0, 1.0), gamma=gammas)
def test_reference_agrees_with_naive_formulas(x, y, alpha, gamma):
    p = 1 / (1 + math.exp(-x))
    ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
    q = (1 - p) * y + p * (1 - y)
    alpha_t = alpha * y + (1 - alpha) * (1 - y)
    naive_loss = alpha_t * q ** gamma * ce
    naive_grad = alpha_t * ((p - y) * q ** gamma
                            + (gamma * q ** (gamma - 1) * (1 - 2 * y) * p * (1 - p) * ce if gamma else 0.0))
    loss, grad, bound = reference_elementwise([x], [y], alpha, gamma)
    assert float(loss[0]) == pytest.approx(naive_loss, rel=1e-9, abs=1e-300)
    assert abs(float(grad[0]) - naive_grad) <= 1e-8 * float(bound[0]) + 1e-300
    for label, hard in ((1.0, -alpha * (1 - p) ** gamma * ((1 - p) - gamma * p * math.log(p))),
                        (0.0, (1 - alpha) * p ** gamma * (p - gamma * (1 - p) * math.log(1 - p)))):
        _, g, b = reference_elementwise([x], [label], alpha, gamma)
        assert abs(float(g[0]) - hard) <= 1e-9 * float(b[0]) + 1e-300
