"""Large requests are read without copying their tensors (server/focalserve/wire.py): whatever the bytes,
the result must be exactly what protobuf's own parse gives, or the same refusal."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from focalloss.v1 import focal_loss_pb2 as pb
from focalserve import wire
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
