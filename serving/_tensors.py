"""Conversions between `tensorflow.TensorProto` and NumPy arrays, as TF Serving does them.

Decoding follows `Tensor::FromProto`: `tensor_content` must hold exactly the bytes of the
shape, typed fields broadcast their last value (none give zeros, extra values are ignored),
and a proto without `tensor_shape` is a scalar. Encoding follows `Tensor::AsProtoField`:
typed repeated fields plus `tensor_shape`, never `tensor_content`. Only NumPy and the
TensorFlow protos are used, so the client can share this module without TensorFlow ops.
"""

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

# DataType -> (NumPy dtype, typed field, DataTypeString as TF spells it in messages).
_DTYPES = {
    types_pb2.DT_FLOAT: (np.float32, "float_val", "float"),
    types_pb2.DT_DOUBLE: (np.float64, "double_val", "double"),
    types_pb2.DT_INT32: (np.int32, "int_val", "int32"),
    types_pb2.DT_UINT8: (np.uint8, "int_val", "uint8"),
    types_pb2.DT_INT16: (np.int16, "int_val", "int16"),
    types_pb2.DT_INT8: (np.int8, "int_val", "int8"),
    types_pb2.DT_UINT16: (np.uint16, "int_val", "uint16"),
    types_pb2.DT_INT64: (np.int64, "int64_val", "int64"),
    types_pb2.DT_BOOL: (np.bool_, "bool_val", "bool"),
    types_pb2.DT_STRING: (np.object_, "string_val", "string"),
    types_pb2.DT_HALF: (np.float16, "half_val", "half"),
    types_pb2.DT_UINT32: (np.uint32, "uint32_val", "uint32"),
    types_pb2.DT_UINT64: (np.uint64, "uint64_val", "uint64"),
    types_pb2.DT_COMPLEX64: (np.complex64, "scomplex_val", "complex64"),
    types_pb2.DT_COMPLEX128: (np.complex128, "dcomplex_val", "complex128"),
}
_BY_NUMPY = {np.dtype(v[0]): k for k, v in _DTYPES.items() if v[0] is not np.object_}


class TensorParseError(ValueError):
    """A `TensorProto` that `Tensor::FromProto` would reject."""


def dtype_name(dtype):
    """Returns TensorFlow's `DataTypeString` for a `DataType` enum value, e.g. "float"."""
    if dtype in _DTYPES:
        return _DTYPES[dtype][2]
    name = types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else str(dtype)
    return name[3:].lower() if name.startswith("DT_") else name


def numpy_dtype(dtype):
    """The NumPy dtype of a `DataType` enum value (`object` for DT_STRING)."""
    if dtype not in _DTYPES:
        raise TypeError(f"Unsupported dtype. Received: dtype={dtype_name(dtype)}")
    return np.dtype(_DTYPES[dtype][0])


def to_ndarray(proto):
    """Decodes a `TensorProto` into a NumPy array (`object` of `bytes` for DT_STRING).

    Raises:
        TensorParseError: for DT_INVALID or an unsupported dtype, an unknown-rank or negative
            shape, or a `tensor_content` whose length does not match the shape.
    """
    if proto.dtype not in _DTYPES:
        raise TensorParseError(f"unsupported dtype {dtype_name(proto.dtype)}")
    np_dtype, field, _ = _DTYPES[proto.dtype]
    if proto.tensor_shape.unknown_rank:
        raise TensorParseError("unknown rank")
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise TensorParseError(f"invalid shape {list(shape)}")
    n = int(np.prod(shape, dtype=np.int64))
    if proto.tensor_content:
        if proto.dtype == types_pb2.DT_STRING:
            raise TensorParseError("tensor_content is not supported for DT_STRING")
        if len(proto.tensor_content) != n * np.dtype(np_dtype).itemsize:
            raise TensorParseError("tensor_content size does not match the shape")
        return np.frombuffer(proto.tensor_content, dtype=np_dtype).reshape(shape).copy()
    values = getattr(proto, field)
    if proto.dtype == types_pb2.DT_HALF:
        flat = np.asarray(values, dtype=np.uint16).view(np.float16)
    elif proto.dtype in (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128):
        pairs = np.asarray(values, dtype=np.float64).reshape(-1, 2)
        flat = (pairs[:, 0] + 1j * pairs[:, 1]).astype(np_dtype)
    elif proto.dtype == types_pb2.DT_STRING:
        flat = np.empty(len(values), dtype=object)
        flat[:] = list(values)
    else:
        flat = np.asarray(values, dtype=np_dtype)
    if len(flat) == 0:
        out = np.full(n, b"" if np_dtype is np.object_ else 0, dtype=np_dtype)
    elif len(flat) < n:
        out = np.concatenate([flat, np.repeat(flat[-1:], n - len(flat))])
    else:
        out = flat[:n]
    return out.reshape(shape)


def from_ndarray(array, dtype=None):
    """Encodes an array into a `TensorProto` with typed fields and `tensor_shape`.

    Strings (NumPy `object`, `bytes_` or `str_` arrays, or Python `bytes`/`str`) become
    DT_STRING `string_val`; `dtype` forces a `DataType` enum value for the others.
    """
    if isinstance(array, (bytes, str)) or (
        isinstance(array, (list, tuple)) and array and isinstance(array[0], (bytes, str))
    ):
        array = np.array(array, dtype=object)
    array = np.asarray(array)
    proto = tensor_pb2.TensorProto()
    for size in array.shape:
        proto.tensor_shape.dim.add().size = size
    if array.dtype.kind in "OSU" or dtype == types_pb2.DT_STRING:
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(
            v.encode() if isinstance(v, str) else bytes(v) for v in array.reshape(-1)
        )
        return proto
    proto.dtype = dtype if dtype is not None else _BY_NUMPY.get(array.dtype)
    if proto.dtype not in _DTYPES:
        raise TypeError(f"Unsupported array dtype. Received: dtype={array.dtype}")
    np_dtype, field, _ = _DTYPES[proto.dtype]
    flat = array.astype(np_dtype).reshape(-1)
    if proto.dtype == types_pb2.DT_HALF:
        proto.half_val.extend(flat.view(np.uint16).tolist())
    elif np.dtype(np_dtype).kind == "c":
        proto.MergeFrom(
            tensor_pb2.TensorProto(**{field: np.stack([flat.real, flat.imag], 1).reshape(-1)})
        )
    else:
        getattr(proto, field).extend(flat.tolist())
    return proto
