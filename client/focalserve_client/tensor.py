"""NumPy arrays <-> `focalloss.v1.Tensor` messages.

A Tensor is raw little-endian bytes in C order plus a dtype and a shape. Decoding returns a read-only
view of the message's bytes (no copy); only bfloat16, which NumPy lacks, is widened to float32.
Encoding copies the array's bytes once, into the message.
"""

from __future__ import annotations

import math
import numpy as np

from focalloss.v1 import focal_loss_pb2 as pb

# Wire dtype -> NumPy dtype (explicitly little-endian). bfloat16 travels as its raw 16 bits.
NUMPY_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype("<u2"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_BOOL: np.dtype("?"),
}

_WIRE_DTYPES: dict[np.dtype, int] = {
    np.dtype("f4"): pb.DTYPE_FLOAT32,
    np.dtype("f8"): pb.DTYPE_FLOAT64,
    np.dtype("f2"): pb.DTYPE_FLOAT16,
    np.dtype("i4"): pb.DTYPE_INT32,
    np.dtype("i8"): pb.DTYPE_INT64,
    np.dtype("u1"): pb.DTYPE_UINT8,
    np.dtype("?"): pb.DTYPE_BOOL,
}


MAX_RANK = 64  # NumPy's maximum number of dimensions


class TensorError(ValueError):
    """A Tensor message that cannot be decoded; `field` names it (e.g. "logit.shape")."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def dtype_name(dtype: int) -> str:
    try:
        return pb.DType.Name(dtype)
    except ValueError:
        return f"unknown DType {dtype}"


def decode(tensor: pb.Tensor, field: str, allowed: tuple[int, ...], data=None) -> np.ndarray:
    """The tensor's values as an ndarray of its shape: a read-only view of the bytes (bfloat16 widened).

    dtype, shape and byte length are checked before anything is allocated, so a message that declares
    a huge shape with few bytes costs nothing. `data`: the payload when it is held outside the message
    (a bytes-like object; the server passes a view of the received request), else `tensor.data`.
    """
    if tensor.dtype not in allowed:
        names = ", ".join(pb.DType.Name(d) for d in allowed)
        raise TensorError(f"{field}.dtype", f"{dtype_name(tensor.dtype)} is not allowed here (allowed: {names})")
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > MAX_RANK:
        raise TensorError(f"{field}.shape", f"has rank {len(shape)}, more than {MAX_RANK} (NumPy's limit)")
    for axis, dim in enumerate(shape):
        if dim < 0:
            raise TensorError(f"{field}.shape", f"dimension {axis} is negative ({dim})")
    size = math.prod(shape)
    itemsize = NUMPY_DTYPES[tensor.dtype].itemsize
    nbytes = size * itemsize
    if data is None:
        data = tensor.data  # upb copies a bytes field on every read: read it exactly once
    if len(data) != nbytes:
        raise TensorError(
            f"{field}.data",
            f"has {len(data)} bytes but shape {list(shape)} of {pb.DType.Name(tensor.dtype)} needs {nbytes}",
        )
    if math.prod(d for d in shape if d) * itemsize > np.iinfo(np.intp).max:
        # empty, but NumPy refuses such a shape even with a zero dimension in it
        raise TensorError(f"{field}.shape", f"{list(shape)} is larger than any array can be")
    array = np.frombuffer(data, dtype=NUMPY_DTYPES[tensor.dtype], count=size)
    if tensor.dtype == pb.DTYPE_BFLOAT16:
        array = bfloat16_to_float32(array)
    return array.reshape(shape)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the upper half of a float32: widening is exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (NaN kept NaN), for clients that send bfloat16."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    nan = np.isnan(values)
    return np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)


def encode(array: np.ndarray, dtype: int | None = None) -> pb.Tensor:
    """An ndarray as a Tensor message. `dtype` forces the wire dtype (e.g. DTYPE_BFLOAT16 for uint16 bits)."""
    array = np.asarray(array)
    if dtype is None:
        try:
            dtype = _WIRE_DTYPES[array.dtype.newbyteorder("=")]
        except KeyError:
            raise TensorError("tensor", f"NumPy dtype {array.dtype} has no wire dtype") from None
    wire = NUMPY_DTYPES[dtype]
    if array.dtype != wire:
        array = array.astype(wire)
    return pb.Tensor(dtype=dtype, shape=array.shape, data=np.ascontiguousarray(array).tobytes())


# ---- writing a Tensor field straight into a message's wire bytes (one copy of the payload) ----

_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


def _varint(value: int) -> bytes:
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
        key = _KEYS[field_number] = _varint(field_number << 3 | 2)
    return key + _varint(length)


def tensor_field(field_number: int, array: np.ndarray) -> list:
    """`array` as field `field_number` (a Tensor) of an enclosing message, in protobuf wire format.

    Returns pieces for b"".join(): the array's own memory is the last piece, so joining copies the
    payload exactly once, where building a Tensor message and serializing it would copy it three times.
    """
    if not array.flags.c_contiguous:
        array = array.copy()  # (np.ascontiguousarray would turn a 0-d loss into shape [1])
    dtype = _WIRE_DTYPES.get(array.dtype) or _WIRE_DTYPES[array.dtype.newbyteorder("=")]
    header = pb.Tensor(dtype=dtype, shape=array.shape).SerializeToString()
    data_key = length_delimited(3, array.nbytes)
    body_length = len(header) + len(data_key) + array.nbytes
    return [length_delimited(field_number, body_length), header, data_key, memoryview(array.reshape(-1)).cast("B")]
