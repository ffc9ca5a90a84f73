"""The part of Caffe's ``caffe.proto`` that a ``bvlc_alexnet`` conversion reads.

Message classes built at import time from descriptors written here (no ``protoc``, no
generated code, no Caffe install), in a private descriptor pool so that they never clash
with a real ``caffe_pb2`` imported into the same process. Field numbers, types and
defaults are Caffe's (``BVLC/caffe`` ``src/caffe/proto/caffe.proto``); only the fields
a conversion needs are declared:

* `NetParameter`: ``name`` (1), the current ``layer`` (100, `LayerParameter`), the legacy
  ``layers`` (2, `V1LayerParameter`, what Caffe wrote before January 2015: the released
  ``bvlc_alexnet.caffemodel`` was written by Caffe 709dc15 of August 2014, so it is in
  this format), and the legacy input declarations ``input`` (3), ``input_dim`` (4) and
  ``input_shape`` (8);
* `LayerParameter`: ``name``, ``type`` (a string: ``"Convolution"``), ``bottom``, ``top``,
  ``blobs`` and the ``convolution_param``, ``inner_product_param``, ``input_param``,
  ``lrn_param`` and ``pooling_param`` messages; `V1LayerParameter` the same with V1's
  field numbers and its ``LayerType`` enum (``CONVOLUTION``), and the V0 ``layer`` field
  (1), declared only to recognise a pre-2014 net and say so;
* `BlobProto`: the legacy 4-D ``num``/``channels``/``height``/``width``, ``shape``
  (`BlobShape`), packed float ``data`` and ``double_data``.

Everything else a real file holds (``param { lr_mult }``, fillers, ``transform_param``,
``diff``, ...) is skipped: binary parsing keeps unknown fields aside, and `parse_text`
parses prototxt with ``allow_unknown_field`` (unknown scalars, enums and nested messages
alike). `blob_from_array` writes large blobs without a per-float Python loop.
"""

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL, _REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_TYPES = {
    "string": _F.TYPE_STRING, "bool": _F.TYPE_BOOL, "float": _F.TYPE_FLOAT,
    "double": _F.TYPE_DOUBLE, "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32,
}
_PACKAGE = "caffe"

# V1LayerParameter.LayerType (caffe.proto) and the V2 type string each becomes
# (src/caffe/util/upgrade_proto.cpp, UpgradeV1LayerType).
V1_LAYER_TYPES = {
    "NONE": (0, ""), "ABSVAL": (35, "AbsVal"), "ACCURACY": (1, "Accuracy"),
    "ARGMAX": (30, "ArgMax"), "BNLL": (2, "BNLL"), "CONCAT": (3, "Concat"),
    "CONTRASTIVE_LOSS": (37, "ContrastiveLoss"), "CONVOLUTION": (4, "Convolution"),
    "DATA": (5, "Data"), "DECONVOLUTION": (39, "Deconvolution"), "DROPOUT": (6, "Dropout"),
    "DUMMY_DATA": (32, "DummyData"), "EUCLIDEAN_LOSS": (7, "EuclideanLoss"),
    "ELTWISE": (25, "Eltwise"), "EXP": (38, "Exp"), "FLATTEN": (8, "Flatten"),
    "HDF5_DATA": (9, "HDF5Data"), "HDF5_OUTPUT": (10, "HDF5Output"),
    "HINGE_LOSS": (28, "HingeLoss"), "IM2COL": (11, "Im2col"),
    "IMAGE_DATA": (12, "ImageData"), "INFOGAIN_LOSS": (13, "InfogainLoss"),
    "INNER_PRODUCT": (14, "InnerProduct"), "LRN": (15, "LRN"),
    "MEMORY_DATA": (29, "MemoryData"),
    "MULTINOMIAL_LOGISTIC_LOSS": (16, "MultinomialLogisticLoss"), "MVN": (34, "MVN"),
    "POOLING": (17, "Pooling"), "POWER": (26, "Power"), "RELU": (18, "ReLU"),
    "SIGMOID": (19, "Sigmoid"), "SIGMOID_CROSS_ENTROPY_LOSS": (27, "SigmoidCrossEntropyLoss"),
    "SILENCE": (36, "Silence"), "SOFTMAX": (20, "Softmax"),
    "SOFTMAX_LOSS": (21, "SoftmaxWithLoss"), "SPLIT": (22, "Split"), "SLICE": (33, "Slice"),
    "TANH": (23, "TanH"), "WINDOW_DATA": (24, "WindowData"), "THRESHOLD": (31, "Threshold"),
}


def _field(name, number, kind, *, repeated=False, default=None, packed=False):
    """A field: ``kind`` is a scalar type name, ``"message:Name"`` or ``"enum:Name"``."""
    field = _F(name=name, number=number, label=_REPEATED if repeated else _OPTIONAL)
    if kind.startswith("message:"):
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{_PACKAGE}.{kind[8:]}"
    elif kind.startswith("enum:"):
        field.type, field.type_name = _F.TYPE_ENUM, f".{_PACKAGE}.{kind[5:]}"
    else:
        field.type = _TYPES[kind]
    if default is not None:
        field.default_value = default
    if packed:
        field.options.packed = True
    return field


def _message(file, name, fields, enums=()):
    message = file.message_type.add(name=name)
    message.field.extend(fields)
    for enum_name, values in enums:
        enum = message.enum_type.add(name=enum_name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    return message


def _layer_params(numbers):
    """The layer-specific parameter fields, at ``numbers`` (V2's or V1's)."""
    return [_field(name, numbers[name], f"message:{kind}") for name, kind in (
        ("convolution_param", "ConvolutionParameter"),
        ("inner_product_param", "InnerProductParameter"),
        ("lrn_param", "LRNParameter"),
        ("pooling_param", "PoolingParameter"),
    )]


def _file_descriptor():
    file = descriptor_pb2.FileDescriptorProto(
        name="keras_alexnet/convert/caffe_subset.proto", package=_PACKAGE, syntax="proto2")
    _message(file, "BlobShape", [_field("dim", 1, "int64", repeated=True, packed=True)])
    _message(file, "BlobProto", [
        _field("num", 1, "int32", default="0"),
        _field("channels", 2, "int32", default="0"),
        _field("height", 3, "int32", default="0"),
        _field("width", 4, "int32", default="0"),
        _field("data", 5, "float", repeated=True, packed=True),
        _field("shape", 7, "message:BlobShape"),
        _field("double_data", 8, "double", repeated=True, packed=True),
    ])
    _message(file, "ConvolutionParameter", [
        _field("num_output", 1, "uint32"),
        _field("bias_term", 2, "bool", default="true"),
        # repeated since 2015 (N-d convolution); V1's optional uint32 has the same encoding.
        _field("pad", 3, "uint32", repeated=True),
        _field("kernel_size", 4, "uint32", repeated=True),
        _field("group", 5, "uint32", default="1"),
        _field("stride", 6, "uint32", repeated=True),
        _field("pad_h", 9, "uint32", default="0"),
        _field("pad_w", 10, "uint32", default="0"),
        _field("kernel_h", 11, "uint32"),
        _field("kernel_w", 12, "uint32"),
        _field("stride_h", 13, "uint32"),
        _field("stride_w", 14, "uint32"),
        _field("dilation", 18, "uint32", repeated=True),
    ])
    _message(file, "LRNParameter", [
        _field("local_size", 1, "uint32", default="5"),
        _field("alpha", 2, "float", default="1"),
        _field("beta", 3, "float", default="0.75"),
        _field("norm_region", 4, "enum:LRNParameter.NormRegion", default="ACROSS_CHANNELS"),
        _field("k", 5, "float", default="1"),
    ], enums=[("NormRegion", [("ACROSS_CHANNELS", 0), ("WITHIN_CHANNEL", 1)])])
    _message(file, "PoolingParameter", [
        _field("pool", 1, "enum:PoolingParameter.PoolMethod", default="MAX"),
        _field("kernel_size", 2, "uint32"),
        _field("stride", 3, "uint32", default="1"),
        _field("pad", 4, "uint32", default="0"),
        _field("kernel_h", 5, "uint32"),
        _field("kernel_w", 6, "uint32"),
        _field("stride_h", 7, "uint32"),
        _field("stride_w", 8, "uint32"),
        _field("pad_h", 9, "uint32", default="0"),
        _field("pad_w", 10, "uint32", default="0"),
        _field("global_pooling", 12, "bool", default="false"),
        _field("round_mode", 13, "enum:PoolingParameter.RoundMode", default="CEIL"),
    ], enums=[("PoolMethod", [("MAX", 0), ("AVE", 1), ("STOCHASTIC", 2)]),
              ("RoundMode", [("CEIL", 0), ("FLOOR", 1)])])
    _message(file, "InnerProductParameter", [
        _field("num_output", 1, "uint32"),
        _field("bias_term", 2, "bool", default="true"),
        _field("axis", 5, "int32", default="1"),
        _field("transpose", 6, "bool", default="false"),
    ])
    _message(file, "InputParameter", [
        _field("shape", 1, "message:BlobShape", repeated=True)])
    _message(file, "LayerParameter", [
        _field("name", 1, "string"),
        _field("type", 2, "string"),
        _field("bottom", 3, "string", repeated=True),
        _field("top", 4, "string", repeated=True),
        _field("blobs", 7, "message:BlobProto", repeated=True),
        _field("input_param", 143, "message:InputParameter"),
        *_layer_params(dict(convolution_param=106, inner_product_param=117, lrn_param=118,
                            pooling_param=121)),
    ])
    _message(file, "V0LayerParameter", [  # only to recognise a V0 net
        _field("name", 1, "string"),
        _field("type", 2, "string"),
    ])
    _message(file, "V1LayerParameter", [
        _field("layer", 1, "message:V0LayerParameter"),
        _field("bottom", 2, "string", repeated=True),
        _field("top", 3, "string", repeated=True),
        _field("name", 4, "string"),
        _field("type", 5, "enum:V1LayerParameter.LayerType"),
        _field("blobs", 6, "message:BlobProto", repeated=True),
        *_layer_params(dict(convolution_param=10, inner_product_param=17, lrn_param=18,
                            pooling_param=19)),
    ], enums=[("LayerType", [(name, number) for name, (number, _) in V1_LAYER_TYPES.items()])])
    _message(file, "NetParameter", [
        _field("name", 1, "string"),
        _field("layers", 2, "message:V1LayerParameter", repeated=True),
        _field("input", 3, "string", repeated=True),
        _field("input_dim", 4, "int32", repeated=True),
        _field("input_shape", 8, "message:BlobShape", repeated=True),
        _field("layer", 100, "message:LayerParameter", repeated=True),
    ])
    return file


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file_descriptor())


def _class(name):
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.{name}"))


BlobShape = _class("BlobShape")
BlobProto = _class("BlobProto")
ConvolutionParameter = _class("ConvolutionParameter")
LRNParameter = _class("LRNParameter")
PoolingParameter = _class("PoolingParameter")
InnerProductParameter = _class("InnerProductParameter")
InputParameter = _class("InputParameter")
LayerParameter = _class("LayerParameter")
V1LayerParameter = _class("V1LayerParameter")
NetParameter = _class("NetParameter")


def v1_type_name(number):
    """The V2 type string (``"Convolution"``) of a V1 ``LayerType`` number, ``""`` if none."""
    for value, name in V1_LAYER_TYPES.values():
        if value == number:
            return name
    return ""


def parse_text(text, message_class=NetParameter):
    """Parses prototxt ``text`` into a new ``message_class``, skipping undeclared fields.

    Raises ``google.protobuf.text_format.ParseError`` for text that is not protobuf text
    format (or misuses a declared field).
    """
    message = message_class()
    text_format.Parse(text, message, allow_unknown_field=True)
    return message


def _varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def blob_from_array(array, *, legacy=False):
    """A `BlobProto` holding ``array`` (cast to float32) in row-major order.

    The shape goes into ``shape.dim``, or with ``legacy=True`` into Caffe's old 4-D
    ``num``/``channels``/``height``/``width`` with leading 1s (a 2-D ``(O, I)`` weight
    becomes ``1 x 1 x O x I``, a bias ``1 x 1 x 1 x O``, as Caffe wrote them before 2015).
    The packed ``data`` field is encoded directly from the array's bytes (tag, length,
    little-endian floats) and merged into the message: filling the repeated field from
    Python costs seconds per million floats.
    """
    array = np.ascontiguousarray(array, dtype="<f4")
    blob = BlobProto()
    if legacy:
        if array.ndim > 4:
            raise ValueError(f"A legacy blob has at most 4 dimensions; got shape {array.shape}.")
        blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - array.ndim) + array.shape
    else:
        blob.shape.dim.extend(array.shape)
    raw = array.tobytes()
    if raw:
        blob.MergeFromString(_varint(5 << 3 | 2) + _varint(len(raw)) + raw)
    return blob


def blob_to_array(blob):
    """The float32 array of a `BlobProto`, shaped as Caffe does (``Blob::FromProto``).

    The legacy 4-D dims win when any of them is set, else ``shape.dim``; ``double_data``
    is used when present. Raises ``ValueError`` when the value count disagrees with the
    shape.
    """
    if any(blob.HasField(name) for name in ("num", "channels", "height", "width")):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(blob.shape.dim)
    values = blob.double_data if len(blob.double_data) else blob.data
    data = np.asarray(values, dtype=np.float64 if len(blob.double_data) else np.float32)
    count = int(np.prod(shape, dtype=np.int64))
    if data.size != count:
        raise ValueError(f"The blob's shape {shape} holds {count} values but it stores "
                         f"{data.size}.")
    return data.astype(np.float32, copy=False).reshape(shape)
