"""Conversions between `tensorflow.TensorProto` and NumPy arrays, as TF Serving does them.

Decoding follows `Tensor::FromProto`: `tensor_content` must hold exactly the bytes of the
shape, typed fields broadcast their last value (none give zeros, extra values are ignored),
and a proto without `tensor_shape` is a scalar. Encoding follows `Tensor::AsProtoField`:
typed repeated fields plus `tensor_shape`, never `tensor_content`. Only NumPy and the
TensorFlow protos are used, so the client can share this module without TensorFlow ops.

Input bounds (checked on the declared shape, before NumPy allocates anything):

* `DEFAULT_MAX_ELEMENTS` = 256 x 227 x 227 x 3 = 39,574,272 elements per decoded tensor or per
  request (what a batch of 256 AlexNet images in `[None, 227, 227, 3]` needs; 151 MiB as
  float32). Elements are counted in 4-byte units (`element_units`): int64, uint64, double and
  complex64 count twice, complex128 four times, so one decoded copy never exceeds 151 MiB.
  Broadcasting makes the declared size, not the bytes sent, what gets allocated: a 60-byte
  `PredictRequest` could otherwise declare gigabytes.
* `DEFAULT_MAX_STRINGS` = 1,048,576 (2**20) `DT_STRING` elements: every string is a Python
  object (tens of bytes each), so strings get their own, smaller cap; a batch of 256 JPEGs or
  of 1000 serialized `tf.Example`s is far below it.
* `MAX_RANK` = 64: TensorFlow allows 254 dims, NumPy 64.
* dims must be >= 0 and their product must fit in int64 (TensorFlow's `TensorShape::IsValid`);
  `tensor_content` must hold exactly `elements x itemsize` bytes.

A tensor beyond a cap raises `TensorLimitError` (a `TensorParseError`), which the servers answer
with INVALID_ARGUMENT naming the cap. TF Serving itself has no such cap (it would try to
allocate, and answer UNKNOWN or run out of memory).
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


DEFAULT_MAX_ELEMENTS = 256 * 227 * 227 * 3
DEFAULT_MAX_STRINGS = 1 << 20
MAX_RANK = 64
_INT64_MAX = (1 << 63) - 1


class TensorParseError(ValueError):
    """A `TensorProto` that `Tensor::FromProto` would reject."""


class TensorLimitError(TensorParseError):
    """A `TensorProto` whose declared size is over this server's element cap."""


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


def declared_elements(proto):
    """Validates the shape of a `TensorProto` and returns its element count, allocating nothing.

    Raises:
        TensorParseError: DT_INVALID or an unsupported dtype, unknown rank, rank over
            `MAX_RANK`, a negative dim, or a shape of more than 2**63 - 1 elements.
    """
    if proto.dtype not in _DTYPES:
        raise TensorParseError(f"unsupported dtype {dtype_name(proto.dtype)}")
    if proto.tensor_shape.unknown_rank:
        raise TensorParseError("unknown rank")
    dims = [d.size for d in proto.tensor_shape.dim]
    if len(dims) > MAX_RANK:
        raise TensorParseError(f"rank {len(dims)} is more than the maximum of {MAX_RANK}")
    if any(d < 0 for d in dims):
        raise TensorParseError(f"invalid shape {dims}")
    n = 1
    for d in dims:
        n *= d
        if n > _INT64_MAX:
            raise TensorParseError(f"shape {dims} is too large (more than 2**63 - 1 entries)")
    return n


def element_units(proto, n):
    """`n` elements of `proto`'s dtype in the 4-byte units the element cap counts: 8-byte
    dtypes (int64, uint64, double, complex64) count 2 each, complex128 4, the rest 1."""
    if proto.dtype == types_pb2.DT_STRING:
        return n
    return n * max(1, np.dtype(_DTYPES[proto.dtype][0]).itemsize // 4)


def check_limits(units, strings=0, max_elements=DEFAULT_MAX_ELEMENTS,
                 max_strings=DEFAULT_MAX_STRINGS):
    """Raises `TensorLimitError` if `units` (4-byte element units, see `element_units`) are
    over `max_elements`, or `strings` DT_STRING elements over `max_strings` (None = no cap)."""
    if max_strings is not None and strings > max_strings:
        raise TensorLimitError(f"{strings} strings declared, more than the limit of "
                               f"{max_strings} strings per request (max_request_strings)")
    if max_elements is not None and units > max_elements:
        raise TensorLimitError(f"{units} elements (4-byte units) declared, more than the limit "
                               f"of {max_elements} elements per request (max_request_elements)")


def to_ndarray(proto, max_elements=DEFAULT_MAX_ELEMENTS, max_strings=DEFAULT_MAX_STRINGS):
    """Decodes a `TensorProto` into a NumPy array (`object` of `bytes` for DT_STRING).

    The shape is validated and checked against `max_elements` (and `max_strings` for
    DT_STRING; None = no cap) before anything is allocated.

    Raises:
        TensorParseError: for DT_INVALID or an unsupported dtype, an unknown-rank, negative or
            overflowing shape, or a `tensor_content` whose length does not match the shape.
        TensorLimitError: (a `TensorParseError`) for a shape over a cap.
    """
    n = declared_elements(proto)
    check_limits(element_units(proto, n), n if proto.dtype == types_pb2.DT_STRING else 0,
                 max_elements, max_strings)
    try:
        return _decode(proto, n)
    except ValueError:  # e.g. shape [0, 2**62]: valid in TensorFlow, too big for NumPy
        raise TensorParseError("shape is not representable as a NumPy array") from None


def _decode(proto, n):
    np_dtype, field, _ = _DTYPES[proto.dtype]
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    if proto.tensor_content:
        if proto.dtype == types_pb2.DT_STRING:
            raise TensorParseError("tensor_content is not supported for DT_STRING")
        if len(proto.tensor_content) != n * np.dtype(np_dtype).itemsize:
            raise TensorParseError("tensor_content size does not match the shape")
        return np.frombuffer(proto.tensor_content, dtype=np_dtype).reshape(shape).copy()
    values = getattr(proto, field)
    if n == 0 or len(values) == 0:
        return np.full(shape, b"" if np_dtype is np.object_ else 0, dtype=np_dtype)
    if proto.dtype in (types_pb2.DT_COMPLEX64, types_pb2.DT_COMPLEX128):
        count = min(len(values) // 2, n)  # (real, imag) pairs; an odd last value is dropped
        if count == 0:
            return np.zeros(shape, dtype=np_dtype)
        pairs = np.asarray(values[:2 * count], dtype=np.float64).reshape(-1, 2)
        flat = (pairs[:, 0] + 1j * pairs[:, 1]).astype(np_dtype)
    elif proto.dtype == types_pb2.DT_STRING:
        flat = np.empty(min(len(values), n), dtype=object)
        flat[:] = list(values[:n])
    elif proto.dtype == types_pb2.DT_HALF:  # half_val holds the bit patterns in int32s
        flat = np.asarray(values[:n], dtype=np.int64).astype(np.uint16).view(np.float16)
    elif field == "int_val":  # int32 on the wire; narrower types keep the low bits, as TF
        flat = np.asarray(values[:n], dtype=np.int64).astype(np_dtype)
    else:
        flat = np.asarray(values[:n], dtype=np_dtype)
    if len(flat) < n:  # broadcast the last value, allocating the output only once
        out = np.empty(n, dtype=np_dtype)
        out[:len(flat)] = flat
        out[len(flat):] = flat[-1]
        flat = out
    return flat.reshape(shape)


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
