"""NumPy arrays <-> `focalloss.v1.Tensor` messages.

A Tensor is raw little-endian bytes in C order plus a dtype and a shape. Decoding returns a read-only
view of the message's bytes (no copy); only bfloat16, which NumPy lacks, is widened to float32.
Encoding copies the array's bytes once, into the message; wire.py writes them into request bytes.
"""

from __future__ import annotations

import math
import numpy as np

from focalloss.v1 import focal_loss_pb2 as pb

# The writer lives in wire.py, with the reader; the server imports these names from here too.
from .wire import length_delimited, payload_view, tensor_field  # noqa: F401

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
_INTP_MAX = int(np.iinfo(np.intp).max)  # (np.iinfo costs microseconds a call: a 1K request's decode pays it twice)


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
    if math.prod(d for d in shape if d) * itemsize > _INTP_MAX:
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


def wire_array(array, dtype: int | None = None) -> tuple[int, np.ndarray]:
    """(wire dtype, the array as C-contiguous little-endian values of it): the array itself when it already
    is one (no copy), else one converted copy. `dtype` forces the wire dtype."""
    array = np.asarray(array)
    if dtype is None:
        dtype = _WIRE_DTYPES.get(array.dtype)
        if dtype is not None and array.flags.c_contiguous and array.dtype == NUMPY_DTYPES[dtype]:
            return dtype, array  # already what travels (the common case: its checks below cost a 1K call)
        if dtype is None:
            try:
                dtype = _WIRE_DTYPES[array.dtype.newbyteorder("=")]
            except KeyError:
                raise TensorError("tensor", f"NumPy dtype {array.dtype} has no wire dtype") from None
    wire = NUMPY_DTYPES[dtype]
    if array.dtype != wire:
        array = array.astype(wire)
    if not array.flags.c_contiguous:
        array = array.copy()  # (np.ascontiguousarray would turn a 0-d array into shape [1])
    return dtype, array


# ---- lossless narrowing of labels (README "Wire dtypes") ----

_NARROW_CHUNK = 1 << 16  # elements per pass: the chunk's temporaries stay in cache
_UNSIGNED = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT32 = np.iinfo(np.int32)
_ONES: dict[np.dtype, np.unsignedinteger] = {}  # the bits of 1.0 in each float dtype and byte order


def narrow_dense_label(array: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(DTYPE_UINT8, 0/1 bytes) for a float array whose every value is exactly +0.0 or 1.0 (bit for bit:
    -0.0 and soft labels keep their dtype), else None. One pass over the labels, in cache-sized chunks."""
    if array.dtype.kind != "f" or array.dtype.itemsize not in _UNSIGNED:
        return None
    if not array.flags.c_contiguous:
        return None
    unsigned = _UNSIGNED[array.dtype.itemsize]
    bits = array.reshape(-1).view(unsigned)
    one = _ONES.get(array.dtype)
    if one is None:
        one = _ONES[array.dtype] = np.array(1, array.dtype).view(unsigned)[()]  # in the array's byte order
    if bits.size <= _NARROW_CHUNK:  # small: fewer NumPy calls (a 1K request's whole client cost is ~50 us)
        is_one = bits == one
        if np.count_nonzero(is_one) + np.count_nonzero(bits == 0) != bits.size:
            return None
        return pb.DTYPE_UINT8, is_one.view(np.uint8).reshape(array.shape)
    out = np.empty(bits.size, np.uint8)
    is_one = np.empty(min(bits.size, _NARROW_CHUNK), np.bool_)
    is_zero = np.empty_like(is_one)
    for start in range(0, bits.size, _NARROW_CHUNK):
        chunk = bits[start:start + _NARROW_CHUNK]
        n = chunk.size
        np.equal(chunk, one, out=is_one[:n])
        np.equal(chunk, 0, out=is_zero[:n])
        np.logical_or(is_one[:n], is_zero[:n], out=is_zero[:n])
        if not is_zero[:n].all():
            return None
        out[start:start + n] = is_one[:n].view(np.uint8)
    return pb.DTYPE_UINT8, out.reshape(array.shape)


def narrow_class_label(array: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(DTYPE_INT32, the labels) for an int64 array whose values all fit in int32, else None."""
    if array.dtype.kind != "i" or array.dtype.itemsize <= 4 or array.size == 0:
        return None
    if array.min() < _INT32.min or array.max() > _INT32.max:
        return None
    return pb.DTYPE_INT32, array.astype("<i4")


def encode(array: np.ndarray, dtype: int | None = None) -> pb.Tensor:
    """An ndarray as a Tensor message. `dtype` forces the wire dtype (e.g. DTYPE_BFLOAT16 for uint16 bits)."""
    dtype, array = wire_array(array, dtype)
    return pb.Tensor(dtype=dtype, shape=array.shape, data=payload_view(array).tobytes())

