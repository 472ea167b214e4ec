"""Fuzzing the wire: arbitrary ComputeRequest messages, arbitrary bytes as requests, fuzzed streams.

Every request goes through the session server's real gRPC port. The oracle is independent of the server:
`expected_codes` reads a request the way SPEC §1.6 and §2 describe it and says which statuses may answer
it: a request that breaks a rule of §1.6 must get INVALID_ARGUMENT, a valid one must be computed (OK), and
where the spec leaves a case open (a rank over NumPy's 64 dimensions, a zero-size tensor whose other
dimensions multiply past 2**63, a subnormal dense normalizer, non-finite grad_output or fg_num, a
grad_output / normalizer the compute dtype cannot hold, bool bytes other than 0/1) either OK or
INVALID_ARGUMENT is accepted. UNKNOWN and INTERNAL are never acceptable.

For an OK answer the checks are the ones that hold whatever the values: shapes and dtypes of loss and
grad, the echoed request id, loss >= 0, ignored elements (label -100, class-index row -1) exactly 0 in
loss and gradient, and finite values wherever the exact result is representable. The exact result is
bounded without computing it: per element CE <= |x| + 1 and α_t·q^γ <= 1, so |loss| <= (max|x|+1)/norm
(times n for SUM); |dL/dx| <= (2 + ln(1+γ))·|g|/norm (divided by n for MEAN), because α_t·q^γ·γ·r·CE
grows only like ln γ. Where that bound is below float max/16 the server's answer must be finite. MEAN
over zero elements is NaN by design (README).

Inputs that once failed are kept as explicit `@example`s. FOCALSERVE_LONG_TESTS=1 raises the example
counts from ~150 to 5000 per property (the longer fuzz run).
"""

from __future__ import annotations

import math
import os

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import EXPECTED_BACKEND, TEST_BACKEND
from focalloss.v1 import focal_loss_pb2 as pb

LONG = os.environ.get("FOCALSERVE_LONG_TESTS") == "1"
EXAMPLES = 5000 if LONG else 150
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])
STREAM_FUZZ = settings(FUZZ, max_examples=max(1, EXAMPLES * 2 // 3))

COMPUTE = "/focalloss.v1.FocalLossService/Compute"
COMPUTE_STREAM = "/focalloss.v1.FocalLossService/ComputeStream"
TIMEOUT = 10.0
HAS_GPU = TEST_BACKEND == "gpu"
Code = grpc.StatusCode
NEVER = (Code.UNKNOWN, Code.INTERNAL)

# ---- the wire format, written out here (not imported from the client or the server) ----

F32, F64, F16, BF16, I32, I64, U8, BOOL = 1, 2, 3, 4, 5, 6, 7, 8
ITEMSIZE = {F32: 4, F64: 8, F16: 2, BF16: 2, I32: 4, I64: 8, U8: 1, BOOL: 1}
LOGIT_DTYPES = (F32, F64, F16, BF16)
DENSE_LABEL_DTYPES = (F32, F64, F16, BF16, U8, BOOL)
CLASS_INDEX_LABEL_DTYPES = (I32, I64)
FLOAT_DTYPES = (F32, F64, F16, BF16)
DENSE, CLASS_INDEX = 1, 2
NONE, MEAN, SUM = 1, 2, 3
TINY = {np.float32: float(np.finfo(np.float32).tiny), np.float64: float(np.finfo(np.float64).tiny)}
FMAX = {np.float32: float(np.finfo(np.float32).max), np.float64: float(np.finfo(np.float64).max)}
MAX_FUZZ_ELEMENTS = 160  # tensors with more declared elements get short random data (a length mismatch)


def wire_values(tensor: pb.Tensor) -> np.ndarray:
    """The tensor's elements, flat, as the spec defines them (bfloat16 widened, bool as its raw bytes)."""
    raw = {F32: "<f4", F64: "<f8", F16: "<f2", BF16: "<u2", I32: "<i4", I64: "<i8", U8: "u1", BOOL: "u1"}
    values = np.frombuffer(tensor.data, raw[tensor.dtype])
    if tensor.dtype == BF16:
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values


def compute_dtype(logit_dtype: int):
    return np.float64 if logit_dtype == F64 else np.float32


def _encode(values: list, dtype: int) -> bytes:
    """Values of any kind into `dtype`'s bytes the way a (careless) client would: overflow is inf,
    out-of-range integers are clipped, an unknown dtype gets float32 bytes."""
    with np.errstate(all="ignore"):
        a = np.asarray(values, np.float64) if values else np.zeros(0)
        if dtype == F64:
            return a.astype("<f8").tobytes()
        if dtype == F16:
            return a.astype("<f2").tobytes()
        if dtype == BF16:  # truncation of the float32 bits: NaN stays NaN, inf stays inf
            return (a.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        if dtype in (I32, I64):
            info = np.iinfo(np.int32 if dtype == I32 else np.int64)
            clipped = np.clip(np.nan_to_num(a, posinf=info.max, neginf=info.min), info.min, info.max)
            exact = [int(v) if isinstance(v, int) else int(c) for v, c in zip(values, clipped)]
            return np.asarray([min(max(v, info.min), info.max) for v in exact],
                              "<i4" if dtype == I32 else "<i8").tobytes()
        if dtype in (U8, BOOL):
            return np.clip(np.nan_to_num(a), 0, 255).astype("u1").tobytes()
        return a.astype("<f4").tobytes()


# ---- strategies ----

def mostly(good: st.SearchStrategy, wild: st.SearchStrategy, wild_in_ten: int) -> st.SearchStrategy:
    """`good` about (10 - wild_in_ten) times in ten, else `wild`."""
    if wild_in_ten <= 0:
        return good
    return st.integers(0, 9).flatmap(lambda k: wild if k < wild_in_ten else good)


INT32 = st.integers(-2**31, 2**31 - 1)
WILD_ENUM = st.one_of(st.sampled_from([-1, 3, 4, 9, 1000, 2**31 - 1, -2**31]), INT32)
ANY_DTYPE = st.one_of(st.integers(0, 8), WILD_ENUM)
WILD_DIM = st.one_of(st.sampled_from([-1, -2**63, 0, 1, 2, 7, 2**31, 2**40, 2**62, 2**63 - 1]),
                     st.integers(-3, 12))
WILD_SHAPE = st.one_of(
    st.lists(WILD_DIM, max_size=6),
    st.integers(1, 70).map(lambda k: [1] * k),                     # many dimensions
    st.lists(st.sampled_from([2**40, 2**62, 2**63 - 1]), min_size=1, max_size=3).map(lambda s: s + [0]),
)
ANY_FLOAT = st.one_of(
    st.floats(),  # NaN, ±inf, huge, subnormal
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, -5e-324, 1e-310, 1.1754943508222875e-38,
                     3.4028234663852886e38, 3.5e38, 1e39, 1e300, 1.7976931348623157e308, -1e300, 1e-45]),
)
GOOD_LOGITS = st.one_of(st.floats(-30, 30), st.sampled_from([0.0, -0.0, 17.0, -17.0, 88.0, -88.0, 1e4, -1e4]))
WILD_LOGITS = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                        st.sampled_from([6e4, -6e4, 3e38, -3e38, 1e-40, math.nan, math.inf, -math.inf]))
GOOD_DENSE_LABELS = st.one_of(st.sampled_from([0.0, 1.0, 1.0, -100.0]), st.floats(0, 1))
WILD_DENSE_LABELS = st.one_of(st.sampled_from([2.0, -1.0, -100.5, 1.0000001, math.nan, 255.0]), ANY_FLOAT)
GOOD_GRADS = st.floats(-10, 10)


def numel(shape) -> int | None:
    return None if any(d < 0 for d in shape) else math.prod(shape)


@st.composite
def tensors(draw, dtype: int, shape: list[int], values: st.SearchStrategy, chaos: int) -> pb.Tensor:
    """Data for `shape`: encoded `values` mostly; with `chaos` > 0 sometimes random bits (NaN, inf,
    garbage) or a byte count that does not match."""
    n = numel(shape)
    itemsize = ITEMSIZE.get(dtype, 4)
    how = draw(st.integers(0, 19)) if chaos else 0
    if n is None or n > MAX_FUZZ_ELEMENTS or how == 19:
        data = draw(st.binary(max_size=48))                        # a length that rarely matches
    elif how == 18:
        data = draw(st.binary(min_size=max(n * itemsize - 3, 0), max_size=n * itemsize + 3))
    elif how >= 16:
        data = draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))  # random bits
    else:
        data = _encode(draw(st.lists(values, min_size=n, max_size=n)), dtype)
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def compute_requests(draw) -> pb.ComputeRequest:
    """Any ComputeRequest. A `chaos` level drawn first sets how often each field is out of its domain:
    never (about 4 requests in 10, so valid requests are common), or 1 or 3 fields in 10."""
    chaos = draw(st.sampled_from([0, 0, 1, 3]))
    label_format = draw(mostly(st.sampled_from([0, DENSE, CLASS_INDEX]), WILD_ENUM, chaos // 2))
    class_index = label_format == CLASS_INDEX
    if class_index:
        good_shape = st.tuples(st.integers(0, 8), st.integers(0, 6)).map(list)
    else:
        good_shape = st.lists(st.integers(0, 5), min_size=1, max_size=3)
    logit_dtype = draw(mostly(st.sampled_from(LOGIT_DTYPES), ANY_DTYPE, chaos // 2))
    logit_shape = draw(mostly(good_shape, WILD_SHAPE, chaos // 2))
    request = pb.ComputeRequest(
        request_id=draw(st.text(max_size=12)),
        label_format=label_format,
        reduction=draw(mostly(st.sampled_from([0, NONE, MEAN, SUM]), WILD_ENUM, chaos // 2)),
        compute_grad=draw(st.booleans()),
        backend=draw(mostly(st.sampled_from([0, 1]), st.one_of(st.just(2), WILD_ENUM), chaos // 2)),
    )
    if not chaos or draw(st.integers(0, 29)):
        logits = mostly(GOOD_LOGITS, WILD_LOGITS, chaos)
        request.logit.CopyFrom(draw(tensors(logit_dtype, logit_shape, logits, chaos)))
    if class_index:
        rows = logit_shape[0] if logit_shape else 1
        classes = max(logit_shape[1], 0) if len(logit_shape) == 2 else 3
        label_shape = draw(mostly(st.just([rows, 1]), WILD_SHAPE, chaos // 2))
        label_dtype = draw(mostly(st.sampled_from(CLASS_INDEX_LABEL_DTYPES), ANY_DTYPE, chaos // 2))
        label_values = mostly(st.integers(-1, max(classes, 0)),
                              st.one_of(st.integers(-3, classes + 2), st.integers(-2**63, 2**63 - 1)), chaos)
    else:
        label_shape = draw(mostly(st.just(list(logit_shape)), WILD_SHAPE, chaos // 2))
        label_dtype = draw(mostly(st.sampled_from(DENSE_LABEL_DTYPES), ANY_DTYPE, chaos // 2))
        label_values = mostly(GOOD_DENSE_LABELS, WILD_DENSE_LABELS, chaos)
    if not chaos or draw(st.integers(0, 29)):
        request.label.CopyFrom(draw(tensors(label_dtype, label_shape, label_values, chaos)))
    for name, good in (("alpha", st.floats(0, 1)), ("gamma", st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5])),
                       ("normalizer", st.floats(0.01, 1000))):
        value = draw(st.none() | mostly(good, ANY_FLOAT, 2 * chaos))
        if value is not None:
            setattr(request, name, value)
    if draw(st.integers(0, 3)) == 0:
        reduction = request.reduction
        scalar = st.sampled_from([[], [1]])
        good = st.just(list(logit_shape)) if reduction == NONE else scalar
        shape = draw(mostly(good, st.one_of(scalar, st.just(list(logit_shape)), WILD_SHAPE), chaos))
        dtype = draw(mostly(st.sampled_from(FLOAT_DTYPES), ANY_DTYPE, chaos // 2))
        grads = mostly(GOOD_GRADS, ANY_FLOAT, chaos)
        request.grad_output.CopyFrom(draw(tensors(dtype, shape, grads, chaos)))
    return request


# ---- the oracle: what the spec says of a request ----

class _Decoded:
    def __init__(self, shape: tuple[int, ...], values: np.ndarray | None):
        self.shape = shape
        self.values = values  # flat; None where the spec leaves the tensor's fate open


def _tensor(request: pb.ComputeRequest, field: str, allowed: tuple[int, ...], problems: list, doubts: list):
    if not request.HasField(field):
        problems.append(f"{field} missing")
        return None
    tensor = getattr(request, field)
    shape = tuple(tensor.shape)
    if tensor.dtype not in allowed:
        problems.append(f"{field}.dtype {tensor.dtype} not allowed")
        return None
    if any(d < 0 for d in shape):
        problems.append(f"{field}.shape {list(shape)} has a negative dimension")
        return None
    if len(tensor.data) != math.prod(shape) * ITEMSIZE[tensor.dtype]:
        problems.append(f"{field}.data length {len(tensor.data)} does not match {list(shape)}")
        return None
    if len(shape) > 64:
        doubts.append(f"{field} has rank {len(shape)} (NumPy holds at most 64)")
        return _Decoded(shape, None)
    if math.prod(d for d in shape if d) * ITEMSIZE[tensor.dtype] >= 2**63:
        doubts.append(f"{field}.shape {list(shape)}: zero elements, but the other dimensions overflow int64")
        return _Decoded(shape, None)
    return _Decoded(shape, wire_values(tensor))


def expected_codes(request: pb.ComputeRequest) -> tuple[set, str]:
    """The statuses SPEC §1.6 allows for `request` on the default server, and why."""
    problems: list[str] = []
    doubts: list[str] = []
    if request.label_format not in (0, DENSE, CLASS_INDEX):
        problems.append("unknown label_format")
    if request.reduction not in (0, NONE, MEAN, SUM):
        problems.append("unknown reduction")
    if request.backend not in (0, 1, 2):
        problems.append("unknown backend")
    if request.HasField("alpha") and not 0.0 <= request.alpha <= 1.0:
        problems.append(f"alpha {request.alpha!r}")
    if request.HasField("gamma") and not (math.isfinite(request.gamma) and request.gamma >= 0.0):
        problems.append(f"gamma {request.gamma!r}")
    class_index = request.label_format == CLASS_INDEX
    logit = _tensor(request, "logit", LOGIT_DTYPES, problems, doubts)
    label = _tensor(request, "label", CLASS_INDEX_LABEL_DTYPES if class_index else DENSE_LABEL_DTYPES,
                    problems, doubts)
    if logit is not None:
        if class_index and len(logit.shape) != 2:
            problems.append(f"class-index logit of shape {list(logit.shape)}")
        if not class_index and len(logit.shape) == 0:
            problems.append("dense logit of rank 0")
        if logit.values is not None and not np.isfinite(logit.values).all():
            problems.append("non-finite logits")
    if logit is not None and label is not None:
        tensor = request.label
        if class_index and len(logit.shape) == 2:
            if label.shape != (logit.shape[0], 1):
                problems.append(f"class-index label shape {list(label.shape)} for logit {list(logit.shape)}")
            elif label.values is not None and label.values.size and not (
                    (label.values >= -1) & (label.values <= logit.shape[1])).all():
                problems.append("class-index label outside {-1, 0..C}")
        elif not class_index:
            if label.shape != logit.shape:
                problems.append(f"label shape {list(label.shape)} != logit {list(logit.shape)}")
            elif label.values is not None and tensor.dtype == BOOL:
                if (label.values > 1).any():
                    doubts.append("bool label bytes other than 0/1")
            elif label.values is not None:
                v = label.values.astype(np.float64)
                if not (((v >= 0) & (v <= 1)) | (v == -100)).all():
                    problems.append("dense label outside [0, 1] and not -100")
    if request.HasField("normalizer"):
        value = request.normalizer
        if not class_index:
            if not (math.isfinite(value) and value > 0):
                problems.append(f"dense normalizer {value!r}")
            elif request.HasField("logit") and value < TINY[compute_dtype(request.logit.dtype)]:
                doubts.append(f"dense normalizer {value!r} below the compute dtype's smallest normal")
        elif not math.isfinite(value):
            doubts.append(f"fg_num {value!r}")
    if request.HasField("grad_output"):
        g = _tensor(request, "grad_output", FLOAT_DTYPES, problems, doubts)
        if g is not None and logit is not None:
            if request.reduction == NONE:
                if g.shape != logit.shape:
                    problems.append(f"grad_output shape {list(g.shape)} for NONE, logit {list(logit.shape)}")
            elif len(g.shape) > 1 or math.prod(g.shape) != 1:
                problems.append(f"grad_output shape {list(g.shape)} for a reduced loss")
            if g.values is not None and not np.isfinite(g.values).all():
                doubts.append("non-finite grad_output")
            elif g.values is not None and g.values.size and request.HasField("logit"):
                # a gradient scale the compute dtype cannot hold: refusing it is as good as computing it
                dtype = compute_dtype(request.logit.dtype)
                gmax = float(np.abs(g.values.astype(np.float64)).max())
                norm = request.normalizer if request.HasField("normalizer") and not class_index else 1.0
                if gmax > FMAX[dtype] or (norm > 0 and gmax / norm > FMAX[dtype] / 16):
                    doubts.append(f"grad_output {gmax:.3g} / normalizer {norm:.3g} overflows the compute dtype")
    gpu_refused = request.backend == 2 and not HAS_GPU
    if problems:
        return {Code.INVALID_ARGUMENT} | ({Code.FAILED_PRECONDITION} if gpu_refused else set()), "; ".join(problems)
    allowed = {Code.FAILED_PRECONDITION} if gpu_refused else {Code.OK}
    if doubts:
        allowed.add(Code.INVALID_ARGUMENT)
    return allowed, "; ".join(doubts) or "a valid request"


# ---- checks of an answer ----

def _out(tensor: pb.Tensor, dtype, what: str) -> np.ndarray:
    wire = F64 if dtype == np.float64 else F32
    assert tensor.dtype == wire, f"{what}.dtype {tensor.dtype}, expected {wire}"
    values = np.frombuffer(tensor.data, "<f8" if wire == F64 else "<f4")
    assert values.size == math.prod(tensor.shape), f"{what}: {len(tensor.data)} bytes for shape {list(tensor.shape)}"
    return values


def check_answer(request: pb.ComputeRequest, response: pb.ComputeResponse) -> None:
    """An OK answer: shapes, dtypes, id, sign, ignored elements, finiteness where the exact value fits."""
    assert response.request_id == request.request_id
    assert not response.HasField("error")
    assert response.backend == ("cpu" if request.backend == 1 else "cupy" if request.backend == 2
                                else EXPECTED_BACKEND)
    dtype = compute_dtype(request.logit.dtype)
    shape = list(request.logit.shape)
    n = math.prod(shape)
    reduction = request.reduction or SUM
    assert response.stats.elements == n
    loss = _out(response.loss, dtype, "loss")
    assert list(response.loss.shape) == (shape if reduction == NONE else []), \
        f"loss shape {list(response.loss.shape)} for logit {shape}, reduction {reduction}"
    assert response.HasField("grad") == request.compute_grad
    grad = None
    if request.compute_grad:
        grad = _out(response.grad, dtype, "grad")
        assert list(response.grad.shape) == shape

    if reduction == MEAN and n == 0:
        assert np.isnan(loss).all(), "MEAN over zero elements is NaN (README)"
    else:
        assert not (loss < 0).any(), f"negative loss {loss[loss < 0][:4]}"

    # ignored elements: loss and gradient exactly 0, whatever normalizer and grad_output
    labels = wire_values(request.label)
    if request.label_format == CLASS_INDEX:
        ignored = np.repeat(labels.astype(np.int64) == -1, shape[1]) if n else np.zeros(0, bool)
    elif request.label.dtype in (U8, BOOL):
        ignored = np.zeros(n, bool)
    else:
        ignored = labels.astype(np.float64) == -100
    if ignored.any():
        if reduction == NONE:
            assert (loss[ignored] == 0).all(), f"ignored elements have loss {loss[ignored][:4]}"
        if grad is not None:
            assert (grad[ignored] == 0).all(), f"ignored elements have gradient {grad[ignored][:4]} (must be 0)"

    # finite wherever the exact result is representable (the bounds of the module docstring)
    x = wire_values(request.logit).astype(np.float64)
    xmax = float(np.abs(x).max()) if n else 0.0
    gamma = request.gamma if request.HasField("gamma") else 2.0
    if request.label_format == CLASS_INDEX:
        positives = float(np.count_nonzero(labels.astype(np.int64) >= 1))
        norm = max(request.normalizer if request.HasField("normalizer") else positives, 1.0)
    else:
        norm = request.normalizer if request.HasField("normalizer") else 1.0
    if request.HasField("grad_output"):
        g = wire_values(request.grad_output).astype(np.float64)
        gmax = float(np.abs(g).max()) if g.size else 0.0
    else:
        gmax = 1.0
    per_element = (xmax + 1.0) / norm
    loss_bound = per_element * (n if reduction == SUM else 1)
    grad_bound = (2.0 + math.log1p(gamma)) * gmax / norm / (n if reduction == MEAN and n else 1)
    limit = FMAX[dtype] / 16
    with np.errstate(all="ignore"):
        if loss_bound <= limit and not (reduction == MEAN and n == 0):
            assert np.isfinite(loss).all(), \
                f"non-finite loss {loss[~np.isfinite(loss)][:4]} where |loss| <= {loss_bound:.3g}"
        if grad is not None and grad_bound <= limit:
            assert np.isfinite(grad).all(), \
                f"non-finite gradient {grad[~np.isfinite(grad)][:4]} where |grad| <= {grad_bound:.3g}"


def bad_request_fields(status) -> list[str]:
    fields = []
    for detail in status.details if status is not None else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields += [v.field for v in bad_request.field_violations]
    return fields


def check_outcome(request: pb.ComputeRequest, code: grpc.StatusCode, message: str, status,
                  response: pb.ComputeResponse | None) -> None:
    allowed, why = expected_codes(request)
    assert code not in NEVER, f"{code.name} ({message!r}) for {why}"
    assert code in allowed, (f"{code.name} ({message!r}); the spec allows {sorted(c.name for c in allowed)} "
                             f"here: {why}")
    if code is Code.OK:
        check_answer(request, response)
        return
    assert message.strip(), f"{code.name} with an empty message"
    if code is Code.INVALID_ARGUMENT:
        fields = bad_request_fields(status)
        assert fields and all(fields), f"INVALID_ARGUMENT without google.rpc.BadRequest field violations: {message!r}"
        assert message.startswith(fields[0].split(".")[0]), f"message {message!r} does not start with the field"


def call_compute(stub, request: pb.ComputeRequest):
    try:
        return Code.OK, "", None, stub.Compute(request, timeout=TIMEOUT)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", rpc_status.from_call(e), None


def _code(number: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == number), Code.UNKNOWN)


# ---- regression examples: inputs that failed (see the report of each in the module's history) ----

def _t(dtype: int, shape: list[int], values, raw: bytes | None = None) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=raw if raw is not None else _encode(list(values), dtype))


# A rank-65 logit: valid by the spec (any rank >= 1); NumPy cannot hold it. Got INTERNAL.
RANK_65 = pb.ComputeRequest(request_id="rank65", logit=_t(F32, [1] * 65, [0.5]), label=_t(F32, [1] * 65, [1.0]))
# Zero elements, but the other dimensions multiply past 2**63. Got INTERNAL ("cannot reshape"); fixed in 46b468e.
HUGE_EMPTY = pb.ComputeRequest(request_id="huge-empty", logit=_t(F32, [2**62, 2**62, 0], []),
                               label=_t(F32, [2**62, 2**62, 0], []))
# γ = 1e39 overflows float32: the gradient of finite float32 logits was NaN (SPEC §1.5: finite for every γ >= 0).
GAMMA_1E39 = pb.ComputeRequest(request_id="gamma", logit=_t(F32, [3], [0.5, -3.0, 20.0]),
                               label=_t(F32, [3], [1.0, 0.0, 0.5]), gamma=1e39, reduction=NONE, compute_grad=True)
# γ = max float64 (valid: finite, >= 0): `int(2 * gamma)` in the backend's _power raised OverflowError -> INTERNAL.
GAMMA_MAX = pb.ComputeRequest(request_id="gamma-max", logit=_t(F64, [2], [0.5, -1.0]), label=_t(F64, [2], [1.0, 0.0]),
                              gamma=1.7976931348623157e308, reduction=NONE, compute_grad=True)
# grad_output 1e300 (float64) for float32 logits: the ignored element's gradient was NaN instead of 0.
GRAD_OUTPUT_1E300 = pb.ComputeRequest(request_id="g1e300", logit=_t(F32, [3], [0.5, -3.0, 20.0]),
                                      label=_t(F32, [3], [1.0, 0.0, -100.0]), reduction=SUM, compute_grad=True,
                                      grad_output=_t(F64, [], [1e300]))
# grad_output / normalizer overflows float32 (10 / 1.2e-38): the ignored element's gradient was NaN.
SCALE_OVERFLOW = pb.ComputeRequest(request_id="scale", logit=_t(F32, [2], [0.5, 2.0]),
                                   label=_t(F32, [2], [-100.0, 1.0]), normalizer=1.2e-38, reduction=SUM,
                                   compute_grad=True, grad_output=_t(F32, [1], [10.0]))
# a few that pass, kept as anchors of the oracle: MEAN of nothing, class-index with C = 0, NaN bytes
MEAN_OF_NOTHING = pb.ComputeRequest(logit=_t(F32, [0], []), label=_t(F32, [0], []), reduction=MEAN, compute_grad=True)
NO_CLASSES = pb.ComputeRequest(logit=_t(F64, [3, 0], []), label=_t(I64, [3, 1], [0, -1, 0]),
                               label_format=CLASS_INDEX, reduction=NONE, compute_grad=True)
NAN_LOGIT = pb.ComputeRequest(logit=_t(F32, [2], [], raw=b"\x00\x00\xc0\x7f\x00\x00\x80\x3f"),
                              label=_t(F32, [2], [1.0, 0.0]))
UNKNOWN_ENUMS = pb.ComputeRequest(logit=_t(9, [1], [1.0]), label=_t(-1, [1], [1.0]), label_format=1000,
                                  reduction=-1, backend=2**31 - 1, alpha=math.nan, gamma=-math.inf)


# ---- the properties ----

@FUZZ
@given(request=compute_requests())
@example(request=RANK_65)
@example(request=HUGE_EMPTY)
@example(request=GAMMA_1E39)
@example(request=GAMMA_MAX)
@example(request=GRAD_OUTPUT_1E300)
@example(request=SCALE_OVERFLOW)
@example(request=MEAN_OF_NOTHING)
@example(request=NO_CLASSES)
@example(request=NAN_LOGIT)
@example(request=UNKNOWN_ENUMS)
def test_compute_answers_any_request_with_a_documented_status(stub, request):
    code, message, status, response = call_compute(stub, request)
    check_outcome(request, code, message, status, response)


@STREAM_FUZZ
@given(items=st.lists(compute_requests(), max_size=6))
@example(items=[MEAN_OF_NOTHING, UNKNOWN_ENUMS, NAN_LOGIT, NO_CLASSES])
@example(items=[GAMMA_1E39, RANK_65, SCALE_OVERFLOW])
def test_compute_stream_answers_each_fuzzed_item_in_order_then_summarises(stub, items):
    requests = []
    for i, item in enumerate(items):
        request = pb.ComputeRequest()
        request.CopyFrom(item)
        request.request_id = f"{i}:{item.request_id}"
        requests.append(request)
    messages = list(stub.ComputeStream(iter(requests), timeout=TIMEOUT))  # an RpcError fails the test
    assert [m.WhichOneof("kind") for m in messages] == ["result"] * len(requests) + ["summary"]
    results = [m.result for m in messages[:-1]]
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    failed, elements = 0, 0
    for request, result in zip(requests, results):
        if result.HasField("error"):
            failed += 1
            check_outcome(request, _code(result.error.code), result.error.message, result.error, None)
        else:
            check_outcome(request, Code.OK, "", None, result)
            elements += result.stats.elements
    summary = messages[-1].summary
    assert (summary.items, summary.failed_items, summary.elements) == (len(requests), failed, elements)


@st.composite
def mangled_requests(draw) -> bytes:
    """A serialized request, then cut, flipped, spliced or extended: mostly not a valid message."""
    data = bytearray(draw(compute_requests()).SerializeToString())
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.integers(0, 3))
        at = draw(st.integers(0, len(data)))
        if how == 0:
            del data[at:]
        elif how == 1 and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == 2:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


RAW_REQUESTS = st.one_of(st.binary(max_size=256), mangled_requests())


def _parses(payload: bytes) -> pb.ComputeRequest | None:
    try:
        return pb.ComputeRequest.FromString(payload)
    except Exception:
        return None


@FUZZ
@given(payload=RAW_REQUESTS)
@example(payload=b"\xff")                       # not a protobuf message: got UNKNOWN (DecodeError)
@example(payload=b"\x0a\x02\xff\xfe")           # request_id of invalid UTF-8: got UNKNOWN (DecodeError)
@example(payload=b"")                           # the empty message: logit is required
def test_arbitrary_bytes_as_a_compute_request_never_give_unknown_or_internal(channel, payload):
    compute = channel.unary_unary(COMPUTE, request_serializer=None, response_deserializer=None)
    try:
        reply = compute(payload, timeout=TIMEOUT)
        code, message, status = Code.OK, "", None
    except grpc.RpcError as e:
        reply, code, message, status = None, e.code(), e.details() or "", rpc_status.from_call(e)
    assert code not in NEVER, f"{code.name} for {len(payload)} raw bytes: {message!r}"
    parsed = _parses(payload)
    if parsed is not None:  # a message after all: the oracle applies as for any request
        check_outcome(parsed, code, message, status, pb.ComputeResponse.FromString(reply) if reply else None)
    else:
        assert code is not Code.OK, "bytes that are not a ComputeRequest were computed"
        assert message.strip()


@STREAM_FUZZ
@given(payloads=st.lists(st.one_of(RAW_REQUESTS, compute_requests().map(lambda r: r.SerializeToString())),
                         min_size=1, max_size=4))
@example(payloads=[b"", b"\xff", b""])          # got UNKNOWN (DecodeError) for the whole stream
def test_arbitrary_bytes_in_a_compute_stream_never_give_unknown_or_internal(channel, payloads):
    stream = channel.stream_stream(COMPUTE_STREAM, request_serializer=None, response_deserializer=None)
    call = stream(iter(payloads), timeout=TIMEOUT)
    messages = []
    try:
        for reply in call:
            messages.append(pb.ComputeStreamResponse.FromString(reply))
        code, message = Code.OK, ""
    except grpc.RpcError as e:
        code, message = e.code(), e.details() or ""
    assert code not in NEVER, f"{code.name} for a stream of {len(payloads)} raw items: {message!r}"
    if code is not Code.OK:
        assert message.strip()
        assert any(_parses(p) is None for p in payloads), f"{code.name} ({message!r}) for a stream of valid messages"
    results = [m.result for m in messages if m.WhichOneof("kind") == "result"]
    for payload, result in zip(payloads, results):
        parsed = _parses(payload)
        if result.HasField("error"):
            assert _code(result.error.code) not in NEVER, f"item error {result.error.code}: {result.error.message!r}"
        if parsed is not None:
            if result.HasField("error"):
                check_outcome(parsed, _code(result.error.code), result.error.message, result.error, None)
            else:
                check_outcome(parsed, Code.OK, "", None, result)
    if code is Code.OK:
        assert [m.WhichOneof("kind") for m in messages] == ["result"] * len(payloads) + ["summary"]


# ---- afterwards ----

@pytest.fixture(scope="module", autouse=True)
def log_offset(server):
    """Where the session server's log stood before this module's first call."""
    return len(server.log())


def test_server_still_serves_and_logged_no_unexpected_exception(server, stub, channel, log_offset):
    good = pb.ComputeRequest(request_id="after-fuzz", logit=_t(F32, [2, 3], [0.97, 0.91, 0.03, 0.55, 0.43, 0.71]),
                             label=_t(F32, [2, 3], [1, 0, 0, 0, 1, 0]), normalizer=2.0, compute_grad=True)
    response = stub.Compute(good, timeout=TIMEOUT)
    assert np.frombuffer(response.loss.data, "<f4")[0] == pytest.approx(0.65782464, rel=1e-6)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert server.process.poll() is None
    log = server.log()[log_offset:]
    unexpected = [line for line in log.splitlines() if "Traceback" in line or "Unexpected" in line]
    assert not unexpected, f"the server logged {len(unexpected)} unexpected exceptions while fuzzed, e.g.:\n" + \
        "\n".join(unexpected[:5])
