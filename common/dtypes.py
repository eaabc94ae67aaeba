"""The wire dtype enum against NumPy dtypes, and the checks every boundary-crossing tensor gets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from common.errors import InvalidArgument
from protos import tensor_pb2

_TO_NUMPY: dict[tensor_pb2.DType.ValueType, np.dtype[np.generic]] = {
    tensor_pb2.DTYPE_FLOAT16: np.dtype(np.float16),
    tensor_pb2.DTYPE_FLOAT32: np.dtype(np.float32),
    tensor_pb2.DTYPE_INT32: np.dtype(np.int32),
    tensor_pb2.DTYPE_INT64: np.dtype(np.int64),
    tensor_pb2.DTYPE_UINT8: np.dtype(np.uint8),
    tensor_pb2.DTYPE_BOOL: np.dtype(np.bool_),
}
_FROM_NUMPY = {v: k for k, v in _TO_NUMPY.items()}

# Any one tensor above this is refused before arithmetic can overflow.
MAX_TENSOR_BYTES = 1 << 40


def to_numpy(dtype: int) -> np.dtype[np.generic]:
    """NumPy dtype of a wire dtype; INVALID_ARGUMENT for UNSPECIFIED or unknown values."""
    try:
        return _TO_NUMPY[tensor_pb2.DType.ValueType(dtype)]
    except KeyError:
        raise InvalidArgument(f"unsupported dtype {dtype!r}") from None


def from_numpy(dtype: np.dtype[np.generic] | type) -> tensor_pb2.DType.ValueType:
    """Wire dtype of a NumPy (or CuPy) dtype."""
    try:
        return _FROM_NUMPY[np.dtype(dtype)]
    except KeyError:
        raise InvalidArgument(f"dtype {np.dtype(dtype)} has no wire form") from None


def nbytes_of(dtype: int, shape: Sequence[int]) -> int:
    """Bytes of a tensor, after checking the shape is sane (no negative or absurd dimensions)."""
    item = to_numpy(dtype).itemsize
    for d in shape:
        if d < 0:
            raise InvalidArgument(f"negative dimension {d} in shape {list(shape)}")
    total = math.prod(shape) * item
    if total > MAX_TENSOR_BYTES:
        raise InvalidArgument(f"shape {list(shape)} is {total} bytes, over {MAX_TENSOR_BYTES}")
    return total


def wire_from_array(array: np.ndarray) -> tensor_pb2.WireTensor:
    """A WireTensor holding a copy of a host array's bytes."""
    a = np.ascontiguousarray(array)
    return tensor_pb2.WireTensor(dtype=from_numpy(a.dtype), shape=a.shape, data=a.tobytes())


def array_from_wire(wire: tensor_pb2.WireTensor) -> np.ndarray:
    """A read-only NumPy view of a WireTensor's bytes, after checking they match dtype × shape."""
    # protobuf makes a new bytes object on every access: read it once
    return array_from_bytes(wire.data, wire.dtype, tuple(wire.shape))


def array_from_bytes(
    data: bytes, dtype: tensor_pb2.DType.ValueType, shape: tuple[int, ...]
) -> np.ndarray:
    """A read-only NumPy view of `data` (a WireTensor's bytes, read once by the caller), after
    checking they match dtype × shape."""
    want = nbytes_of(dtype, shape)
    if len(data) != want:
        raise InvalidArgument(
            f"tensor data is {len(data)} bytes, dtype and shape {list(shape)} need {want}"
        )
    return np.frombuffer(data, dtype=to_numpy(dtype)).reshape(shape)
