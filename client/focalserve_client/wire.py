"""The protobuf wire format of focalserve's messages, written and read without copying tensor payloads.

One codec for both ends (https://protobuf.dev/programming-guides/encoding/):

- writing (`encode_request`, `tensor_field`): a message is its small fields, written here, and its arrays'
  buffers, joined once into the bytes gRPC sends (one copy of each payload, where building a Tensor and
  serializing it copies it three times). The bytes equal protobuf's deterministic serialization.
- reading (`split`): the Tensor fields are found by walking the top-level fields, each Tensor's `data`
  becomes a memoryview of the received bytes, and protobuf parses everything else, a few dozen bytes.
  upb copies a bytes field twice on its way to NumPy (into its arena when parsing, into a new bytes
  object when the field is read: about 2.5 ms for a 4M-element message). Whatever is unusual (a Tensor
  field given twice, which protobuf would merge, a `data` field given twice, a group, a malformed length,
  more fields than the message has) returns None, and the caller parses the plain way, so the meaning of
  a message is always protobuf's own. Varints are held to upb's limits, so that nothing is read in place
  that protobuf would refuse: a field key in at most 5 bytes and below 2^32, a length in at most 5 bytes
  and below 2^31, any other varint in at most 10 bytes.

The server reads requests with it and writes its
responses with `tensor_field`; the client writes requests and reads responses.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator

import numpy as np

# ComputeRequest's Tensor fields, ComputeResponse's, and Tensor's data field (proto/focalloss/v1/focal_loss.proto)
TENSOR_FIELDS = {2: "logit", 3: "label", 10: "grad_output"}
RESPONSE_TENSOR_FIELDS = {2: "loss", 3: "grad"}
TENSOR_DATA = 3
# ComputeRequest has 12 fields; a Tensor 3, or 2 + one per dimension (at most 64) if its shape is not packed
MOST_FIELDS, MOST_TENSOR_FIELDS = 32, 80
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
# upb's limits (checked against protobuf's parser in tests/test_wire.py)
_KEY_BYTES, _KEY_LIMIT = 5, 1 << 32
_LENGTH_BYTES, _LENGTH_LIMIT = 5, 1 << 31
_VALUE_BYTES = 10


class _Unusual(Exception):
    pass


def _varint(buf, pos: int, end: int, most_bytes: int = _VALUE_BYTES) -> tuple[int, int]:
    value = shift = 0
    stop = min(end, pos + most_bytes)
    while pos < stop:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _Unusual


def _fields(buf, pos: int, end: int, most: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, start of the field, start of its value, end) of each field in buf[pos:end];
    more than `most` fields is unusual (a message padded with many small fields would otherwise cost a
    Python loop turn each, on the event loop)."""
    while pos < end:
        most -= 1
        if most < 0:
            raise _Unusual
        start = pos
        key, pos = _varint(buf, pos, end, _KEY_BYTES)
        if key >= _KEY_LIMIT:
            raise _Unusual
        wire = key & 7
        if wire == _VARINT:
            _, stop = _varint(buf, pos, end)
        elif wire == _LENGTH_DELIMITED:
            length, pos = _varint(buf, pos, end, _LENGTH_BYTES)
            if length >= _LENGTH_LIMIT:
                raise _Unusual
            stop = pos + length
        elif wire == _FIXED64:
            stop = pos + 8
        elif wire == _FIXED32:
            stop = pos + 4
        else:  # groups (deprecated) and invalid wire types
            raise _Unusual
        if stop > end or key >> 3 == 0:
            raise _Unusual
        yield key >> 3, wire, start, pos, stop
        pos = stop


def split(data, tensor_fields: dict[int, str] = TENSOR_FIELDS, start: int = 0, end: int | None = None
          ) -> tuple[bytes, dict[str, tuple[bytes, memoryview | None]]] | None:
    """(the message in data[start:end] without its Tensor fields, {tensor field: (the Tensor without
    `data`, its data)}), or None where the plain parse must decide. Only the small parts are copied.
    `tensor_fields`: the message's Tensor fields by number (a ComputeRequest's by default)."""
    try:
        rest: list[bytes] = []
        tensors: dict[str, tuple[bytes, memoryview | None]] = {}
        view = memoryview(data)
        for number, wire, first, value, stop in _fields(data, start, len(data) if end is None else end,
                                                         MOST_FIELDS):
            name = tensor_fields.get(number)
            if name is None:
                rest.append(data[first:stop])
                continue
            if wire != _LENGTH_DELIMITED or name in tensors:
                return None
            header: list[bytes] = []
            payload = None
            for inner, inner_wire, inner_start, inner_value, inner_stop in _fields(data, value, stop,
                                                                                   MOST_TENSOR_FIELDS):
                if inner != TENSOR_DATA:
                    header.append(data[inner_start:inner_stop])
                elif inner_wire != _LENGTH_DELIMITED or payload is not None:
                    return None
                else:
                    payload = view[inner_value:inner_stop]
            tensors[name] = (b"".join(header), payload)
        return b"".join(rest), tensors
    except _Unusual:
        return None


def parse_in_place(message_class, data, tensor_fields: dict[int, str] = TENSOR_FIELDS, start: int = 0,
                   end: int | None = None) -> tuple[object, dict[str, memoryview | bytes]] | None:
    """(the message in data[start:end] parsed by protobuf with its Tensors' `data` left out, {tensor field:
    its data as a view of `data`}), or None where the plain parse must decide (`split`)."""
    parts = split(data, tensor_fields, start, end)
    if parts is None:
        return None
    rest, tensors = parts
    message = message_class.FromString(rest)
    payloads = {}
    for name, (header, payload) in tensors.items():
        tensor = getattr(message, name)
        tensor.SetInParent()
        tensor.MergeFromString(header)
        payloads[name] = payload if payload is not None else b""
    return message, payloads


def only_field(data, number: int) -> tuple[int, int] | None:
    """(start, end) of the value of `data`'s one field when it is the length-delimited field `number`
    (e.g. a ComputeStreamResponse's `result`), else None."""
    try:
        fields = list(_fields(data, 0, len(data), 2))
    except _Unusual:
        return None
    if len(fields) != 1 or fields[0][0] != number or fields[0][1] != _LENGTH_DELIMITED:
        return None
    return fields[0][3], fields[0][4]


# ---- writing ----

_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


def varint(value: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_KEYS: dict[int, bytes] = {}


def length_delimited(field_number: int, length: int) -> bytes:
    """The key and length that start a length-delimited field (wire type 2) of `length` bytes."""
    key = _KEYS.get(field_number)
    if key is None:
        key = _KEYS[field_number] = varint(field_number << 3 | 2)
    return key + varint(length)


@functools.lru_cache(maxsize=1024)  # a training loop sends the same few shapes again and again
def tensor_header(dtype: int, shape: tuple[int, ...]) -> bytes:
    """A Tensor's `dtype` and packed `shape` fields, as protobuf serializes them (defaults omitted)."""
    out = b"\x08" + varint(dtype) if dtype else b""
    if shape:
        dims = b"".join([varint(d) for d in shape])
        out += length_delimited(2, len(dims)) + dims
    return out


def payload_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without copying (any rank, 0-d and bool included)."""
    return memoryview(array.reshape(-1).view(np.uint8))


def tensor_pieces(field_number: int, dtype: int, array: np.ndarray) -> list:
    """A C-contiguous `array` of wire dtype `dtype` as field `field_number` (a Tensor) of an enclosing
    message: pieces for b"".join(), the array's own memory the last."""
    header = tensor_header(dtype, array.shape)
    nbytes = array.nbytes
    if not nbytes:  # proto3 leaves an empty bytes field out
        return [length_delimited(field_number, len(header)), header]
    data_key = length_delimited(TENSOR_DATA, nbytes)
    return [length_delimited(field_number, len(header) + len(data_key) + nbytes), header, data_key,
            payload_view(array)]


def tensor_field(field_number: int, array: np.ndarray) -> list:
    """`array` as field `field_number` (a Tensor) of an enclosing message, in protobuf wire format.

    Returns pieces for b"".join(): the array's own memory is the last piece, so joining copies the
    payload exactly once, where building a Tensor message and serializing it would copy it three times.
    """
    from .tensor import wire_array  # tensor imports this module

    dtype, array = wire_array(array)
    return tensor_pieces(field_number, dtype, array)


_DOUBLE = struct.Struct("<d")


def encode_request(*, logit: tuple[int, np.ndarray], label: tuple[int, np.ndarray], request_id: str = "",
                   label_format: int = 0, alpha: float | None = None, gamma: float | None = None,
                   normalizer: float | None = None, reduction: int = 0, compute_grad: bool = False,
                   grad_output: tuple[int, np.ndarray] | None = None, backend: int = 0,
                   batch_elements: int = 0) -> bytes:
    """A ComputeRequest's wire bytes, equal to protobuf's deterministic serialization of the message.

    Tensors are (wire dtype, C-contiguous little-endian array of that dtype) pairs (`tensor.wire_array`);
    enums are their numbers. Each payload is copied once, into the returned bytes.
    """
    pieces: list = []
    if request_id:
        encoded = request_id.encode()
        pieces += [length_delimited(1, len(encoded)), encoded]
    pieces += tensor_pieces(2, *logit)
    pieces += tensor_pieces(3, *label)
    if label_format:
        pieces += [b"\x20", varint(label_format)]
    for key, value in ((b"\x29", alpha), (b"\x31", gamma), (b"\x39", normalizer)):
        if value is not None:
            pieces += [key, _DOUBLE.pack(value)]
    if reduction:
        pieces += [b"\x40", varint(reduction)]
    if compute_grad:
        pieces.append(b"\x48\x01")
    if grad_output is not None:
        pieces += tensor_pieces(10, *grad_output)
    if backend:
        pieces += [b"\x58", varint(backend)]
    if batch_elements:
        pieces += [b"\x60", varint(batch_elements)]
    return b"".join(pieces)
