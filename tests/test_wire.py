"""Large requests are read without copying their tensors (client/focalserve_client/wire.py, the codec both
ends use): whatever the bytes, the result must be exactly what protobuf's own parse gives, or the same refusal."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from focalloss.v1 import focal_loss_pb2 as pb
from focalserve_client import wire
from focalserve.service import Received, read_request
from focalserve_client.client import build_request


def as_protobuf_parsed(received: Received) -> pb.ComputeRequest:
    """The message with its payloads put back, to compare with ComputeRequest.FromString."""
    message = pb.ComputeRequest()
    message.CopyFrom(received.message)
    for name, payload in (received.payloads or {}).items():
        getattr(message, name).data = bytes(payload)
    return message


def assert_same_as_protobuf(data: bytes) -> None:
    in_place, plain = read_request(data, in_place=True), read_request(data, in_place=False)
    assert in_place.size == plain.size == len(data)
    if plain.message is None:
        assert in_place.message is None and in_place.error
        return
    assert in_place.message is not None, in_place.error
    assert as_protobuf_parsed(in_place) == plain.message
    # and the refined message serializes back to the same semantics
    assert pb.ComputeRequest.FromString(as_protobuf_parsed(in_place).SerializeToString()) == plain.message


_ARRAYS = st.integers(0, 50).flatmap(lambda n: st.tuples(
    st.just(n), st.sampled_from([np.float32, np.float64, np.float16]), st.integers(0, 2**32 - 1)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=_ARRAYS, label_format=st.sampled_from(["dense", "class_index"]),
       extras=st.fixed_dictionaries({}, optional={
           "alpha": st.floats(0, 1), "gamma": st.floats(0, 5), "normalizer": st.floats(0.1, 10),
           "reduction": st.sampled_from(["none", "sum", "mean"]), "compute_grad": st.booleans(),
           "request_id": st.text(max_size=20)}),
       with_grad_output=st.booleans())
def test_valid_requests_read_in_place_equal_protobufs_parse(arrays, label_format, extras, with_grad_output):
    n, dtype, seed = arrays
    rng = np.random.default_rng(seed)
    logit = rng.normal(size=(n, 3)).astype(dtype)
    if label_format == "dense":
        label = (rng.random((n, 3)) < 0.5).astype(np.uint8)
    else:
        label = rng.integers(-1, 4, (n, 1)).astype(np.int32)
    request = build_request(logit, label, label_format=label_format, **extras)
    if with_grad_output:
        request.grad_output.dtype = pb.DTYPE_FLOAT32
        request.grad_output.data = b"\x00\x00\x80\x3f"
    data = request.SerializeToString()
    received = read_request(data, in_place=True)
    assert received.payloads is not None  # the fast path was taken
    assert bytes(received.payloads["logit"]) == request.logit.data
    assert not received.message.logit.data  # not copied into the message
    assert_same_as_protobuf(data)


@settings(max_examples=100, deadline=None)
@given(first=st.binary(max_size=60), second=st.binary(max_size=60))
def test_merged_messages_match_protobufs_merge(first, second):
    """Two serialized requests back to back are one message whose fields protobuf merges."""
    a = build_request(np.frombuffer(first[: len(first) // 4 * 4], np.float32),
                      np.zeros(len(first) // 4, np.float32)).SerializeToString()
    b = pb.ComputeRequest(request_id="x", label=pb.Tensor(data=second)).SerializeToString()
    assert_same_as_protobuf(a + b)
    assert wire.split(a + b) is None  # label twice: left to protobuf


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_read_in_place_equal_protobufs_parse(data):
    assert_same_as_protobuf(data)


@settings(max_examples=300, deadline=None)
@given(base=st.integers(0, 2**32 - 1), cut=st.integers(0, 400), flip=st.integers(0, 400), value=st.integers(0, 255))
def test_damaged_requests_read_in_place_equal_protobufs_parse(base, cut, flip, value):
    rng = np.random.default_rng(base)
    data = bytearray(build_request(rng.normal(size=20).astype(np.float32), rng.random(20).astype(np.float32),
                                   request_id="r", gamma=1.0).SerializeToString())
    data[flip % len(data)] = value
    assert_same_as_protobuf(bytes(data[: len(data) - cut % 40]))


def test_a_request_padded_with_small_fields_is_left_to_protobuf():
    """A 1 MB request of 500K unknown 2-byte fields: the walk gives up after MOST_FIELDS (not one Python
    loop turn per field, on the event loop) and protobuf's C parser reads it."""
    data = build_request(np.zeros(10, np.float32), np.zeros(10, np.float32)).SerializeToString() + b"\x78\x01" * 500_000
    received = read_request(data, in_place=True)
    assert received.message is not None and received.payloads is None
    assert_same_as_protobuf(data)


def test_unusual_layouts_are_left_to_protobuf():
    assert wire.split(b"\x12\x02\x1a\x00\x12\x00") is None        # logit twice
    assert wire.split(b"\x12\x04\x1a\x00\x1a\x00") is None        # logit.data twice
    assert wire.split(b"\x13\x14") is None                        # a group
    assert wire.split(b"\x12\x05\x1a\x09") is None                # a length beyond the end
    assert wire.split(b"\x10\x01") is None                        # logit as a varint
    assert wire.split(b"\x58\x01" * (wire.MOST_FIELDS + 1)) is None  # padded with many small fields
    rest, tensors = wire.split(b"\x0a\x01r\x12\x05\x08\x01\x1a\x01\x07")
    assert rest == b"\x0a\x01r" and tensors["logit"][0] == b"\x08\x01" and bytes(tensors["logit"][1]) == b"\x07"


# ---- the client's writer and reader (focalserve_client/wire.py) against protobuf, both directions ----

from focalserve_client import wire as codec  # noqa: E402
from focalserve_client.client import _Request, read_response  # noqa: E402
from focalserve_client.tensor import decode, wire_array  # noqa: E402

_FLOATS = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64)
_SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=4)
_LOGIT_DTYPES = st.sampled_from(["<f4", ">f4", "<f8", "<f2", ">f8"])
_LABEL_DTYPES = st.sampled_from(["<f4", "<f8", "u1", "?", "<i4", "<i8", ">i8"])


def _array(draw, shape, dtype, c_order=True):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.normal(0, 3, size=shape) if np.dtype(dtype).kind == "f" else rng.integers(0, 2, size=shape)
    array = values.astype(dtype)
    return array if c_order else np.asfortranarray(array)


@st.composite
def requests(draw):
    shape = tuple(draw(_SHAPES))
    logit = _array(draw, shape, draw(_LOGIT_DTYPES), draw(st.booleans()))
    label = _array(draw, shape, draw(_LABEL_DTYPES), draw(st.booleans()))
    kwargs = draw(st.fixed_dictionaries({}, optional={
        "alpha": st.floats(allow_nan=False), "gamma": st.floats(allow_nan=False),
        "normalizer": st.floats(allow_nan=False), "reduction": st.sampled_from(["none", "sum", "mean"]),
        "compute_grad": st.booleans(), "request_id": st.text(max_size=20),
        "label_format": st.sampled_from(["dense", "class_index"]), "backend": st.sampled_from(["auto", "cpu", "gpu"])}))
    if draw(st.booleans()):
        kwargs["grad_output"] = _array(draw, tuple(draw(_SHAPES)), draw(_LOGIT_DTYPES))
    return logit, label, kwargs


@settings(max_examples=300, deadline=None)
@given(case=requests())
def test_written_requests_are_protobufs_own_serialization(case):
    """Our encoder -> protobuf's parser gives the message build_request builds, and the bytes are those of
    protobuf's deterministic serialization (the labels in the wire dtype the client chose)."""
    logit, label, kwargs = case
    request = _Request(logit, label, **kwargs)
    data = request.encode()
    expected = build_request(logit, label, **kwargs)
    expected.label.CopyFrom(pb.Tensor(dtype=request.label[0], shape=request.label[1].shape,
                                      data=request.label[1].tobytes()))
    assert pb.ComputeRequest.FromString(data) == expected
    assert data == expected.SerializeToString(deterministic=True)
    # and the server's in-place reader reads it back as protobuf does
    assert_same_as_protobuf(data)


@settings(max_examples=200, deadline=None)
@given(shape=_SHAPES, dtype=st.sampled_from([pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT64]), seed=st.integers(0, 2**32 - 1),
       with_grad=st.booleans(), request_id=st.text(max_size=10), backend=st.text(max_size=10),
       elements=st.integers(0, 2**40), pad=st.integers(0, 70_000))
def test_protobuf_serialized_responses_read_in_place(shape, dtype, seed, with_grad, request_id, backend,
                                                     elements, pad):
    """protobuf's serializer -> our reader: the same arrays and fields as protobuf's parse, large responses
    (padded past ZERO_COPY_BYTES with an unknown-to-us long request_id) read as views of the bytes."""
    rng = np.random.default_rng(seed)
    loss = rng.normal(size=shape).astype(NP := {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_FLOAT64: np.float64}[dtype])
    response = pb.ComputeResponse(request_id=request_id + "x" * pad, backend=backend,
                                  loss=pb.Tensor(dtype=dtype, shape=shape, data=loss.tobytes()),
                                  stats=pb.ItemStats(elements=elements, loss_sum=float(loss.sum())))
    if with_grad:
        response.grad.CopyFrom(pb.Tensor(dtype=dtype, shape=shape, data=(loss * 2).astype(NP).tobytes()))
    data = response.SerializeToString()
    got = read_response(data)
    parsed = pb.ComputeResponse.FromString(data)
    assert got.request_id == parsed.request_id and got.backend == parsed.backend
    assert got.stats.elements == elements
    np.testing.assert_array_equal(got.loss, decode(parsed.loss, "loss", _FLOATS))
    assert got.loss.dtype == NP and got.loss.shape == tuple(shape)
    if with_grad:
        np.testing.assert_array_equal(got.grad, decode(parsed.grad, "grad", _FLOATS))
    else:
        assert got.grad is None
    if len(data) >= 64 * 1024 and loss.size:
        assert not got.loss.flags.owndata and not got.loss.flags.writeable  # a view of `data`


def test_tensor_field_matches_protobuf():
    for array in (np.float32(2.5), np.zeros((0, 3), np.float64), np.arange(6, dtype=">f4").reshape(2, 3).T):
        data = b"".join(codec.tensor_field(2, array))
        dtype, expected = wire_array(array)
        assert pb.ComputeResponse.FromString(data).loss == pb.Tensor(dtype=dtype, shape=expected.shape,
                                                                     data=expected.tobytes())


# ---- issue 13 item 4: varints only as long as protobuf's parser takes them ----

def overlong(value: int, length: int) -> bytes:
    """`value` as a varint of exactly `length` bytes (padded with continuation bytes, as protobuf never writes)."""
    out = bytearray()
    for _ in range(length - 1):
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    assert value < 0x80
    out.append(value)
    return bytes(out)


def minimal_length(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), which=st.sampled_from(["key", "length", "inner key", "inner length"]),
       extra=st.integers(0, 6), high=st.integers(0, 0x7F))
def test_overlong_keys_and_lengths_read_in_place_only_where_protobuf_parses_them(seed, which, extra, high):
    """A request's logit field with its key or length (or those of its data field) written in up to 10
    bytes, or as 5 bytes whose top bits make the key >= 2^32 or the length >= 2^31: the in-place reader
    takes exactly what protobuf takes (keys <= 5 bytes and < 2^32, lengths <= 5 bytes and < 2^31)."""
    rng = np.random.default_rng(seed)
    payload = rng.normal(size=16).astype(np.float32).tobytes()
    header = b"\x08\x01\x12\x01\x10"  # dtype FLOAT32, shape [16]

    def field(key: int, body: bytes, key_bytes: int | None, length_bytes: int | None, top: int = 0) -> bytes:
        k = overlong(key, key_bytes) if key_bytes else codec.varint(key)
        if top and key_bytes == 5:  # bits 32..34 of the key's fifth byte
            k = k[:4] + bytes([k[4] | (top << 4) & 0x7F])
        n = overlong(len(body), length_bytes) if length_bytes else codec.varint(len(body))
        if top and length_bytes == 5:
            n = n[:4] + bytes([n[4] | (top << 3) & 0x7F])
        return k + n + body

    size = 5 + extra  # 5 .. 11 bytes
    top = high if extra == 0 else 0
    inner = field(0x1A, payload, size if which == "inner key" else None,
                  size if which == "inner length" else None, top)
    logit = field(0x12, header + inner, size if which == "key" else None, size if which == "length" else None, top)
    label = field(0x1A, b"\x08\x01\x12\x01\x10" + field(0x1A, bytes(64), None, None), None, None)
    data = logit + label
    assert_same_as_protobuf(data)
    if pb_parses(data):  # and not over-strict: what protobuf takes is read in place
        assert wire.split(data) is not None


def pb_parses(data: bytes) -> bool:
    try:
        pb.ComputeRequest.FromString(data)
        return True
    except Exception:
        return False


def test_the_issues_six_byte_logit_key_is_refused_as_protobuf_refuses_it():
    data = b"\x92\x80\x80\x80\x80\x00" + b"\x02\x08\x01"
    assert not pb_parses(data)
    assert wire.split(data) is None
    assert_same_as_protobuf(data)
    # five bytes are protobuf's limit, and taken
    data = b"\x92\x80\x80\x80\x00" + b"\x02\x08\x01"
    assert pb_parses(data) and wire.split(data) is not None
    assert_same_as_protobuf(data)
