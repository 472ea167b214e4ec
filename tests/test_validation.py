"""SPEC §1.6 over the real server: every invalid request is refused with the right status code, a message
"<field>: <reason>" and a google.rpc.BadRequest field violation naming the field; the server keeps
serving afterwards, and inside ComputeStream a bad item fails alone."""

from __future__ import annotations

import math
import struct
import time

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conftest import start_server
from focalloss.v1 import focal_loss_pb2 as pb
from focalloss.v1 import focal_loss_pb2_grpc as pb_grpc
from focalserve_client.tensor import decode, encode, float32_to_bfloat16

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FLOAT_OUT = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64)
NAN, INF = float("nan"), float("inf")

LOGIT = np.array([[0.5, -1.0, 2.0], [3.0, -0.25, 0.0]], np.float32)           # [2, 3]
LABEL = np.array([[1.0, 0.0, 0.3], [0.0, 1.0, -100.0]], np.float32)
CI_LOGIT = np.array([[0.5, -1.0, 2.0, 0.1], [3.0, -0.25, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0]], np.float32)  # C = 4
CI_LABEL = np.array([[0], [2], [-1]], np.int32)


# ---- request builders ----

def tensor(dtype: int, shape, data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=list(shape), data=data)


def dense(logit=None, label=None, **fields) -> pb.ComputeRequest:
    req = pb.ComputeRequest(**{"request_id": "dense", "label_format": pb.LABEL_FORMAT_DENSE,
                               "reduction": pb.REDUCTION_SUM, "compute_grad": True, **fields})
    req.logit.CopyFrom(encode(LOGIT) if logit is None else logit)
    req.label.CopyFrom(encode(LABEL) if label is None else label)
    return req


def class_index(logit=None, label=None, **fields) -> pb.ComputeRequest:
    req = pb.ComputeRequest(**{"request_id": "class-index", "label_format": pb.LABEL_FORMAT_CLASS_INDEX,
                               "reduction": pb.REDUCTION_SUM, "compute_grad": True, **fields})
    req.logit.CopyFrom(encode(CI_LOGIT) if logit is None else logit)
    req.label.CopyFrom(encode(CI_LABEL) if label is None else label)
    return req


def without(req: pb.ComputeRequest, field: str) -> pb.ComputeRequest:
    req.ClearField(field)
    return req


def dense_label(values, dtype=np.float32) -> pb.Tensor:
    """LABEL with its first element replaced by `values` (a dense label value under test)."""
    label = LABEL.astype(np.float64)
    label.flat[0] = values
    if dtype == "bf16":
        return encode(float32_to_bfloat16(label.astype(np.float32)), pb.DTYPE_BFLOAT16)
    if dtype == np.uint8:
        label = np.where(label == -100.0, 0.0, label)  # uint8 cannot hold -100; keep the rest valid
        label = np.clip(np.round(label), 0, 255)
        label.flat[0] = values
    return encode(label.astype(dtype))


def logit_with(value, dtype=np.float32) -> pb.Tensor:
    logit = LOGIT.astype(np.float64)
    logit.flat[4] = value
    if dtype == "bf16":
        return encode(float32_to_bfloat16(logit.astype(np.float32)), pb.DTYPE_BFLOAT16)
    return encode(logit.astype(dtype))


def grad_output(shape, dtype=np.float32) -> pb.Tensor:
    return encode(np.full(shape, 0.5, dtype))


def f32_bytes(n: int) -> bytes:
    return struct.pack(f"<{n}f", *range(n))


# (id, request, field, code): every rule of SPEC §1.6
CASES = [
    # missing tensors
    ("missing-logit", without(dense(), "logit"), "logit"),
    ("missing-label", without(dense(), "label"), "label"),
    ("missing-label-class-index", without(class_index(), "label"), "label"),
    # dtypes not allowed for the field
    *[(f"logit-dtype-{pb.DType.Name(d)}", dense(logit=tensor(d, [2, 3], bytes(6 * size))), "logit.dtype")
      for d, size in ((pb.DTYPE_INT32, 4), (pb.DTYPE_INT64, 8), (pb.DTYPE_UINT8, 1), (pb.DTYPE_BOOL, 1),
                      (pb.DTYPE_UNSPECIFIED, 4))],
    ("logit-dtype-INT32-class-index", class_index(logit=encode(CI_LOGIT.astype(np.int32))), "logit.dtype"),
    ("dense-label-dtype-INT32", dense(label=encode(LABEL.clip(0).astype(np.int32))), "label.dtype"),
    ("dense-label-dtype-INT64", dense(label=encode(LABEL.clip(0).astype(np.int64))), "label.dtype"),
    ("class-index-label-dtype-FLOAT32", class_index(label=encode(CI_LABEL.astype(np.float32))), "label.dtype"),
    ("class-index-label-dtype-FLOAT64", class_index(label=encode(CI_LABEL.astype(np.float64))), "label.dtype"),
    ("class-index-label-dtype-UINT8", class_index(label=encode(CI_LABEL.clip(0).astype(np.uint8))), "label.dtype"),
    ("grad-output-dtype-INT32", dense(grad_output=encode(np.array(2, np.int32))), "grad_output.dtype"),
    # logit ranks
    ("dense-logit-rank-0", dense(logit=encode(np.float32(0.5)), label=encode(np.float32(1.0))), "logit.shape"),
    ("class-index-logit-rank-1", class_index(logit=encode(CI_LOGIT[:, 0])), "logit.shape"),
    ("class-index-logit-rank-3", class_index(logit=encode(CI_LOGIT[:, :, None])), "logit.shape"),
    # negative dimensions
    ("logit-negative-dim", dense(logit=tensor(pb.DTYPE_FLOAT32, [2, -3], b"")), "logit.shape"),
    ("logit-negative-dims-product-positive", dense(logit=tensor(pb.DTYPE_FLOAT32, [-2, -3], f32_bytes(6))),
     "logit.shape"),
    ("label-negative-dim", dense(label=tensor(pb.DTYPE_FLOAT32, [-2, 3], b"")), "label.shape"),
    # len(data) != prod(shape) * itemsize
    ("logit-data-short", dense(logit=tensor(pb.DTYPE_FLOAT32, [2, 3], f32_bytes(5))), "logit.data"),
    ("logit-data-long", dense(logit=tensor(pb.DTYPE_FLOAT32, [2, 3], f32_bytes(7))), "logit.data"),
    ("logit-data-odd-bytes", dense(logit=tensor(pb.DTYPE_FLOAT64, [2, 3], bytes(47))), "logit.data"),
    ("logit-huge-shape-2^40", dense(logit=tensor(pb.DTYPE_FLOAT32, [2 ** 40], f32_bytes(1))), "logit.data"),
    ("logit-huge-shape-2^62x2^62", dense(logit=tensor(pb.DTYPE_FLOAT64, [2 ** 62, 2 ** 62], f32_bytes(2))),
     "logit.data"),
    ("label-data-short", dense(label=tensor(pb.DTYPE_FLOAT32, [2, 3], f32_bytes(5))), "label.data"),
    ("class-index-label-data-long", class_index(label=tensor(pb.DTYPE_INT64, [3, 1], bytes(32))), "label.data"),
    # label shapes
    ("dense-label-shape-transposed", dense(label=encode(LABEL.T.copy())), "label.shape"),
    ("dense-label-shape-extra-axis", dense(label=encode(LABEL[:, :, None])), "label.shape"),
    ("class-index-label-rank-1", class_index(label=encode(CI_LABEL.reshape(3))), "label.shape"),
    ("class-index-label-N-by-2", class_index(label=encode(np.repeat(CI_LABEL, 2, axis=1))), "label.shape"),
    ("class-index-label-too-many-rows", class_index(label=encode(np.zeros((4, 1), np.int32))), "label.shape"),
    # class-index label values outside {-1, 0..C}
    ("class-index-label-C+1", class_index(label=encode(np.array([[0], [5], [1]], np.int32))), "label"),
    ("class-index-label-minus-2", class_index(label=encode(np.array([[0], [-2], [1]], np.int64))), "label"),
    ("class-index-label-int64-huge", class_index(label=encode(np.array([[0], [2 ** 40], [1]], np.int64))), "label"),
    ("class-index-label-minus-100", class_index(label=encode(np.array([[-100], [0], [1]], np.int32))), "label"),
    # dense label values outside [0, 1] ∪ {-100}
    *[(f"dense-label-{name}", dense(label=dense_label(value, dtype)), "label") for name, value, dtype in (
        ("1.5", 1.5, np.float32), ("-0.1", -0.1, np.float32), ("nan", NAN, np.float32),
        ("inf", INF, np.float32), ("-99", -99.0, np.float32), ("-100.5", -100.5, np.float32),
        ("f64-1+1e-12", 1 + 1e-12, np.float64), ("f64-minus-tiny", -1e-300, np.float64),
        ("f16-1.5", 1.5, np.float16), ("bf16-nan", NAN, "bf16"), ("bf16-2", 2.0, "bf16"),
        ("uint8-2", 2, np.uint8), ("uint8-255", 255, np.uint8))],
    # alpha, gamma
    *[(f"alpha-{v}", dense(alpha=v), "alpha") for v in (-0.1, 1.1, -1e-300, NAN, INF, -INF)],
    *[(f"gamma-{v}", dense(gamma=v), "gamma") for v in (-0.5, -1e-300, INF, NAN, -INF)],
    *[(f"class-index-gamma-{v}", class_index(gamma=v), "gamma") for v in (-1.0, NAN)],
    *[(f"class-index-alpha-{v}", class_index(alpha=v), "alpha") for v in (2.0, NAN)],
    # normalizer
    *[(f"dense-normalizer-{v}", dense(normalizer=v), "normalizer") for v in (0.0, -0.0, -1.0, INF, -INF, NAN)],
    ("class-index-normalizer-nan", class_index(normalizer=NAN), "normalizer"),
    # grad_output shape
    ("grad-output-NONE-transposed", dense(reduction=pb.REDUCTION_NONE, grad_output=grad_output((3, 2))),
     "grad_output.shape"),
    ("grad-output-NONE-flat", dense(reduction=pb.REDUCTION_NONE, grad_output=grad_output((6,))),
     "grad_output.shape"),
    ("grad-output-NONE-scalar", dense(reduction=pb.REDUCTION_NONE, grad_output=grad_output(())),
     "grad_output.shape"),
    ("grad-output-SUM-vector", dense(reduction=pb.REDUCTION_SUM, grad_output=grad_output((2,))),
     "grad_output.shape"),
    ("grad-output-MEAN-loss-shaped", dense(reduction=pb.REDUCTION_MEAN, grad_output=grad_output((2, 3))),
     "grad_output.shape"),
    ("grad-output-UNSPECIFIED-vector", dense(reduction=pb.REDUCTION_UNSPECIFIED, grad_output=grad_output((3,))),
     "grad_output.shape"),
    ("grad-output-class-index-NONE", class_index(reduction=pb.REDUCTION_NONE, grad_output=grad_output((3, 1))),
     "grad_output.shape"),
    # unknown enum values
    ("label-format-7", dense(label_format=7), "label_format"),
    ("reduction-9", dense(reduction=9), "reduction"),
    ("backend-5", dense(backend=5), "backend"),
    ("backend-minus-1", dense(backend=-1), "backend"),
    # non-finite logits
    *[(f"logit-{name}", dense(logit=logit_with(value, dtype)), "logit") for name, value, dtype in (
        ("nan", NAN, np.float32), ("inf", INF, np.float32), ("-inf", -INF, np.float32),
        ("f64-nan", NAN, np.float64), ("f64-inf", INF, np.float64), ("f16-inf", INF, np.float16),
        ("bf16-nan", NAN, "bf16"))],
    ("class-index-logit-nan", class_index(logit=encode(np.where(CI_LOGIT == 4.0, np.nan, CI_LOGIT))), "logit"),
]
assert len({c[0] for c in CASES}) == len(CASES)
CASE_PARAMS = [pytest.param(req, field, id=name) for name, req, field in CASES]


# ---- assertions ----

def violations(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None, f"no google.rpc.Status attached to {err.code()}: {err.details()!r}"
    assert status.details, f"no details attached: {err.details()!r}"
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request), f"details[0] is {status.details[0].type_url}, not BadRequest"
    return [v.field for v in bad_request.field_violations]


def assert_refused(stub, req, code: grpc.StatusCode, field: str, timeout: float = 10.0) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Compute(req, timeout=timeout)
    err = info.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()!r}"
    message = err.details()
    assert message.startswith(f"{field}: ") and len(message) > len(field) + 2, \
        f"message {message!r} is not '{field}: <reason>'"
    fields = violations(err)
    assert field in fields, f"BadRequest violations {fields} do not name {field!r}"
    return err


def assert_still_serving(stub) -> None:
    resp = stub.Compute(dense(request_id="good"), timeout=10)
    assert resp.request_id == "good"
    assert np.isfinite(decode(resp.loss, "loss", FLOAT_OUT)).all()


def good_items(n: int = 2) -> list[pb.ComputeRequest]:
    return [dense(request_id=f"good-{i}") for i in range(n)]


# ---- Compute ----

def test_base_requests_are_valid(stub):
    """The requests every case mutates are accepted (so each case fails for its one reason)."""
    for req in (dense(), class_index(), dense(reduction=pb.REDUCTION_NONE, grad_output=grad_output((2, 3))),
                dense(reduction=pb.REDUCTION_SUM, grad_output=grad_output(())),
                dense(reduction=pb.REDUCTION_MEAN, grad_output=grad_output((1,))),
                dense(label=dense_label(1, np.uint8)), dense(label=encode(LABEL > 0.5)),
                dense(logit=logit_with(1.0, "bf16"), label=dense_label(0.5, "bf16")),
                dense(label_format=pb.LABEL_FORMAT_UNSPECIFIED), dense(backend=pb.BACKEND_CPU),
                dense(alpha=0.0, gamma=0.0, normalizer=1e-3), dense(alpha=1.0, gamma=8.0)):
        resp = stub.Compute(req, timeout=10)
        assert np.isfinite(decode(resp.loss, "loss", FLOAT_OUT)).all()


@pytest.mark.parametrize("req, field", CASE_PARAMS)
def test_invalid_request_is_refused_naming_the_field(stub, req, field):
    assert_refused(stub, req, INVALID, field)
    assert_still_serving(stub)


@pytest.mark.parametrize("shape", [[2 ** 40], [2 ** 31, 2 ** 31], [2 ** 62, 2 ** 62, 2 ** 62]], ids=str)
def test_huge_declared_shape_is_refused_without_allocating(stub, shape):
    started = time.perf_counter()
    assert_refused(stub, dense(logit=tensor(pb.DTYPE_FLOAT64, shape, bytes(8))), INVALID, "logit.data")
    assert time.perf_counter() - started < 2.0
    assert_still_serving(stub)


@pytest.mark.parametrize("normalizer", [0.0, -0.0, -3.0, 0.5, 1e-300])
def test_class_index_normalizer_below_one_is_clamped_not_refused(stub, normalizer):
    """fg_num is clamped to >= 1 like the legacy op (SPEC §1.3); only a NaN one is invalid."""
    for reduction in (pb.REDUCTION_NONE, pb.REDUCTION_SUM):
        got = stub.Compute(class_index(normalizer=normalizer, reduction=reduction), timeout=10)
        want = stub.Compute(class_index(normalizer=1.0, reduction=reduction), timeout=10)
        for name in ("loss", "grad"):
            np.testing.assert_array_equal(decode(getattr(got, name), name, FLOAT_OUT),
                                          decode(getattr(want, name), name, FLOAT_OUT))


def test_backend_gpu_without_gpu_is_failed_precondition(stub):
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    if "cupy" in info.backends:
        pytest.skip("this server has a usable GPU")
    assert_refused(stub, dense(backend=pb.BACKEND_GPU), grpc.StatusCode.FAILED_PRECONDITION, "backend")
    assert_still_serving(stub)


# ---- ComputeStream: a bad item fails alone ----

def run_stream(stub, requests):
    replies = list(stub.ComputeStream(iter(requests), timeout=30))
    assert replies and replies[-1].WhichOneof("kind") == "summary", "the stream must end with a summary"
    assert all(r.WhichOneof("kind") == "result" for r in replies[:-1])
    return [r.result for r in replies[:-1]], replies[-1].summary


def assert_stream_isolates(stub, bad: pb.ComputeRequest, code: grpc.StatusCode, field: str) -> None:
    bad = pb.ComputeRequest.FromString(bad.SerializeToString())
    bad.request_id = "bad"
    first, last = good_items()
    results, summary = run_stream(stub, [first, bad, first, last])
    assert [r.request_id for r in results] == ["good-0", "bad", "good-0", "good-1"]
    failed = results[1]
    assert failed.HasField("error")
    assert failed.error.code == code.value[0], f"error {failed.error.code}: {failed.error.message!r}"
    assert failed.error.message.startswith(f"{field}: "), failed.error.message
    bad_request = error_details_pb2.BadRequest()
    assert failed.error.details and failed.error.details[0].Unpack(bad_request)
    assert field in [v.field for v in bad_request.field_violations]
    for good in (results[0], results[2], results[3]):
        assert not good.HasField("error")
        assert np.isfinite(decode(good.loss, "loss", FLOAT_OUT)).all()
    assert summary.items == 4
    assert summary.failed_items == 1
    assert summary.elements == 3 * LOGIT.size
    assert summary.loss_sum == pytest.approx(3 * results[0].stats.loss_sum, rel=1e-12)


@pytest.mark.parametrize("req, field", CASE_PARAMS)
def test_stream_bad_item_fails_alone(stub, req, field):
    assert_stream_isolates(stub, req, INVALID, field)


def test_stream_backend_gpu_item_fails_alone(stub):
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    if "cupy" in info.backends:
        pytest.skip("this server has a usable GPU")
    assert_stream_isolates(stub, dense(backend=pb.BACKEND_GPU), grpc.StatusCode.FAILED_PRECONDITION, "backend")


def test_stream_of_only_bad_items(stub):
    results, summary = run_stream(stub, [dense(alpha=2.0), without(dense(), "logit")])
    assert [r.error.code for r in results] == [3, 3]
    assert (summary.items, summary.failed_items, summary.elements, summary.loss_sum) == (2, 2, 0, 0.0)


# ---- servers with other flags ----

@pytest.fixture(scope="module")
def server_factory(tmp_path_factory):
    started = []

    def make(*args):
        srv = start_server(tmp_path_factory.mktemp("flags"), *args)
        started.append(srv)
        channel = grpc.insecure_channel(srv.target)
        return pb_grpc.FocalLossServiceStub(channel), channel

    yield make
    for srv in started:
        code = srv.stop()
        assert code == 0, f"server exited with {code}:\n{srv.log()}"


@pytest.fixture(scope="module")
def limited_stub(server_factory):
    stub, channel = server_factory("--max-elements", "1000")
    yield stub
    channel.close()


@pytest.fixture(scope="module")
def small_message_stub(server_factory):
    stub, channel = server_factory("--max-message-mb", "1")
    yield stub
    channel.close()


@pytest.fixture(scope="module")
def nonfinite_stub(server_factory):
    stub, channel = server_factory("--allow-nonfinite")
    yield stub
    channel.close()


def flat_request(n: int, **fields) -> pb.ComputeRequest:
    rng = np.random.default_rng(n)
    return dense(logit=encode(rng.normal(size=n).astype(np.float32)),
                 label=encode((rng.random(n) > 0.5).astype(np.float32)), **fields)


def test_max_elements_is_resource_exhausted(limited_stub):
    limited_stub.Compute(flat_request(1000), timeout=10)
    assert_refused(limited_stub, flat_request(1001), grpc.StatusCode.RESOURCE_EXHAUSTED, "logit")
    assert_refused(limited_stub, class_index(logit=encode(np.zeros((251, 4), np.float32)),
                                             label=encode(np.zeros((251, 1), np.int32))),
                   grpc.StatusCode.RESOURCE_EXHAUSTED, "logit")
    assert_still_serving(limited_stub)
    assert_stream_isolates(limited_stub, flat_request(1001), grpc.StatusCode.RESOURCE_EXHAUSTED, "logit")


def test_max_message_size_is_resource_exhausted(small_message_stub):
    big = flat_request(2 ** 18)  # logit 1 MiB + label 1 MiB
    assert big.ByteSize() > 2 * 2 ** 20
    with pytest.raises(grpc.RpcError) as info:
        small_message_stub.Compute(big, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert_still_serving(small_message_stub)


@pytest.mark.parametrize("value, dtype", [(NAN, np.float32), (INF, np.float32), (-INF, np.float32),
                                          (NAN, np.float64), (-INF, np.float64), (INF, np.float16)],
                         ids=["nan", "inf", "-inf", "f64-nan", "f64--inf", "f16-inf"])
def test_allow_nonfinite_computes_instead_of_refusing(nonfinite_stub, stub, value, dtype):
    """With --allow-nonfinite the request is computed; the other elements are unaffected."""
    req = dense(logit=logit_with(value, dtype), reduction=pb.REDUCTION_NONE)
    resp = nonfinite_stub.Compute(req, timeout=10)
    loss = decode(resp.loss, "loss", FLOAT_OUT)
    grad = decode(resp.grad, "grad", FLOAT_OUT)
    assert loss.shape == grad.shape == LOGIT.shape
    # the default server refuses the very same request
    assert_refused(stub, req, INVALID, "logit")
    finite = dense(logit=logit_with(1.0, dtype), reduction=pb.REDUCTION_NONE)
    want = stub.Compute(finite, timeout=10)
    others = np.arange(LOGIT.size) != 4
    np.testing.assert_array_equal(loss.reshape(-1)[others], decode(want.loss, "loss", FLOAT_OUT).reshape(-1)[others])
    np.testing.assert_array_equal(grad.reshape(-1)[others], decode(want.grad, "grad", FLOAT_OUT).reshape(-1)[others])
