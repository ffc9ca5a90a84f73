"""Caffe's ``bvlc_alexnet`` (BVLC model zoo) converted into a two-tower Keras AlexNet.

`load_caffe` reads a network definition (``deploy.prototxt``) and its weights
(``bvlc_alexnet.caffemodel``), checks that they are bvlc_alexnet, and returns a
`ConvertedModel` whose Keras model computes Caffe's logits on RGB pixels. Both of
Caffe's formats are read, for either file: the current ``layer { type: "Convolution" }``
and the legacy V1 ``layers { type: CONVOLUTION }`` (the released caffemodel is V1, with
4-D ``num x channels x height x width`` blobs; the current deploy.prototxt is not).
Messages come from `caffe_pb` (no Caffe install).

The conversion, blob by blob (Caffe is NCHW with ``(O, I, kh, kw)`` kernels and
``(O, I)`` inner products; Keras is NHWC with ``(kh, kw, I, O)`` and ``(I, O)``):

* every kernel is transposed OIHW -> HWIO, every inner product transposed;
* conv1: Caffe's input channels are B, G, R (OpenCV's order); they are reversed in the
  kernel, so the model takes RGB: ``W_rgb[:, :, c] = W_bgr[:, :, 2 - c]``;
* towers: a grouped convolution's group ``g`` is tower ``a`` for ``g = 0`` and ``b`` for
  ``g = 1`` (its filters ``[g F/2, (g+1) F/2)`` reading input channels ``[g C/2,
  (g+1) C/2)``). conv1 is not grouped, but its outputs 0-47 are the input of conv2's group
  0: they are ``conv1_a``. conv3 (not grouped) reads all 256 channels in Caffe's order,
  which is ``cross3`` (tower a then b); its filters 0-191 are ``conv3_a``, 192-383
  ``conv3_b``, which is what conv4's groups read;
* fc6: Caffe flattens pool5 as (C, H, W), input ``c * 36 + h * 6 + w`` with channels
  0-127 from group 0; the model concatenates the (H, W, C) flattens of the towers
  (``flatten_a`` then ``flatten_b``), input ``t * 4608 + h * 768 + w * 128 + c'`` for
  channel ``c = 128 t + c'``. fc6's columns are permuted accordingly; its rows 0-2047 are
  ``fc6_a``, 2048-4095 ``fc6_b``. fc7's inputs are ``cross_fc6`` in Caffe's order, its
  rows split the same way; fc8 is transposed;
* LRN: Caffe's ``scale = k + alpha / n * sum`` over the ``n = local_size`` channels around
  each; this package's `LocalResponseNormalization` multiplies the plain sum, so the
  model gets ``alpha = alpha_caffe / local_size`` and ``bias = k`` (Caffe's default
  ``k = 1``), read from the prototxt (bvlc_alexnet: ``alpha 1e-4``, ``beta 0.75``, no k).
  Caffe's LRN layers are not grouped: they normalise all 96 (256) channels at once, so
  the ``"caffe"`` `AlexNet` variant (`build_model`) runs norm1/norm2 on the towers'
  concatenation (``lrn_across_towers``), unlike the paper's per-tower LRN, which differs
  at the tower boundary;
* pooling: Caffe rounds pooled sizes up (``ceil((H - 3) / 2) + 1``), Keras down. At 227
  inputs every size divides exactly (55 -> 27 -> 13 -> 6), so the two agree; an input
  size where they would differ is refused.

Preprocessing: RGB 0-255 pixels minus Caffe's mean, either its per-channel average
(`paper.CAFFE_MEAN_BGR` reversed to RGB, the default) or, with ``mean=`` Caffe's mean
image ``ilsvrc_2012_mean.binaryproto`` (``1 x 3 x 256 x 256``, BGR, CHW), that image as an
RGB ``(256, 256, 3)`` per-pixel mean; a 227 centre crop of the 256 square (Caffe warps
the whole image to 256 x 256; this package's preprocessing keeps the aspect ratio).
"""

import hashlib
import pathlib

import numpy as np
from google.protobuf import message, text_format

from keras_alexnet import paper
from keras_alexnet.convert import ConvertedModel, caffe_pb, imagenet_class_names
from keras_alexnet.model import alexnet

# The BVLC model zoo's readme (models/bvlc_alexnet/readme.md).
PUBLISHED_SHA1 = "9116a64c0fbe4459d18f4bb6b56d647b63920377"
PUBLISHED_ACCURACY = {
    "top1": 57.1,
    "top5": 80.2,
    "dataset": "ILSVRC2012 validation set, centre crop only",
    "weights": "bvlc_alexnet.caffemodel (iteration 360,000 snapshot)",
    "source": "BVLC model zoo readme, BVLC/caffe models/bvlc_alexnet/readme.md",
}

# bvlc_alexnet's parametrised layers (Caffe names) and the Caffe blob shapes of conv1..conv5.
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_LAYERS = ("fc6", "fc7", "fc8")
# (num_output, kernel_size, stride, pad, group) as in models/bvlc_alexnet/deploy.prototxt.
CONV_SPECS = {
    "conv1": (96, 11, 4, 0, 1),
    "conv2": (256, 5, 1, 2, 2),
    "conv3": (384, 3, 1, 1, 1),
    "conv4": (384, 3, 1, 1, 2),
    "conv5": (256, 3, 1, 1, 2),
}
FC_UNITS = {"fc6": 4096, "fc7": 4096}
POOL_SPEC = (3, 2, 0)  # MAX, kernel_size, stride, pad
LRN_SIZE = 5  # the model's LocalResponseNormalization window (paper.LRN_SIZE)

# The layer sequence of bvlc_alexnet after its input, by (V2) type; Dropout layers may sit
# anywhere in between (identity at inference), anything after fc8 (Softmax, Accuracy,
# SoftmaxWithLoss) is ignored.
SEQUENCE = (
    ("conv1", "Convolution"), ("relu1", "ReLU"), ("norm1", "LRN"), ("pool1", "Pooling"),
    ("conv2", "Convolution"), ("relu2", "ReLU"), ("norm2", "LRN"), ("pool2", "Pooling"),
    ("conv3", "Convolution"), ("relu3", "ReLU"),
    ("conv4", "Convolution"), ("relu4", "ReLU"),
    ("conv5", "Convolution"), ("relu5", "ReLU"), ("pool5", "Pooling"),
    ("fc6", "InnerProduct"), ("relu6", "ReLU"),
    ("fc7", "InnerProduct"), ("relu7", "ReLU"),
    ("fc8", "InnerProduct"),
)
_INPUT_TYPES = ("Input", "Data", "ImageData", "MemoryData", "DummyData", "HDF5Data",
                "WindowData")
_SKIPPED_TYPES = ("Dropout",)


class _Layer:
    """One layer of either format: ``name``, V2 ``type`` string, ``bottom``, ``top``, the
    parameter messages and the blobs."""

    def __init__(self, layer, v1):
        self.name = layer.name
        self.type = caffe_pb.v1_type_name(layer.type) if v1 else layer.type
        self.bottom = list(layer.bottom)
        self.top = list(layer.top)
        self.convolution = layer.convolution_param
        self.lrn = layer.lrn_param
        self.pooling = layer.pooling_param
        self.inner_product = layer.inner_product_param
        self.input_shapes = [] if v1 else [list(s.dim) for s in layer.input_param.shape]
        self.blobs = layer.blobs


def _layers(net, path):
    """The layers of a `NetParameter` in file order, whichever format it uses."""
    if len(net.layer) and len(net.layers):
        raise ValueError(f"{path} mixes the current 'layer' and the legacy V1 'layers' fields; "
                         "upgrade it with Caffe's upgrade_net_proto_text/binary.")
    if any(layer.HasField("layer") for layer in net.layers):
        raise ValueError(f"{path} is a V0 (pre-2014) Caffe net; upgrade it with Caffe's "
                         "upgrade_net_proto_text/binary first.")
    if len(net.layer):
        return [_Layer(layer, v1=False) for layer in net.layer], "layer"
    return [_Layer(layer, v1=True) for layer in net.layers], "V1 layers"


def _expect(layer, what, expected, found):
    if expected != found:
        raise ValueError(f"Layer {layer!r}: expected {what} {expected!r} as in bvlc_alexnet, found "
                         f"{found!r}. This converter reads Caffe's bvlc_alexnet only "
                         "(models/bvlc_alexnet/deploy.prototxt).")


def _square(layer, what, values, h, w, default):
    """A square 2-D size from Caffe's ``[repeated] x`` / ``x_h`` + ``x_w`` fields."""
    values = list(values) if not isinstance(values, (int, np.integer)) else [values]
    if h or w:
        values = [h, w]
    if not values:
        return default
    if len(values) > 2 or len(set(values)) != 1:
        raise ValueError(f"Layer {layer!r}: expected a square {what}, found {values}.")
    return values[0]


def _conv_spec(layer):
    p = layer.convolution
    kernel = _square(layer.name, "kernel_size", p.kernel_size, p.kernel_h, p.kernel_w, None)
    stride = _square(layer.name, "stride", p.stride, p.stride_h, p.stride_w, 1)
    pad = _square(layer.name, "pad", p.pad, p.pad_h, p.pad_w, 0)
    dilation = _square(layer.name, "dilation", p.dilation, 0, 0, 1)
    _expect(layer.name, "dilation", 1, dilation)
    _expect(layer.name, "bias_term", True, p.bias_term)
    return (p.num_output, kernel, stride, pad, p.group)


def _check_pooling(layer):
    p = layer.pooling
    _expect(layer.name, "pooling", "MAX", caffe_pb.PoolingParameter.PoolMethod.Name(p.pool))
    _expect(layer.name, "global_pooling", False, p.global_pooling)
    kernel = _square(layer.name, "kernel_size", p.kernel_size, p.kernel_h, p.kernel_w, None)
    stride = _square(layer.name, "stride", p.stride, p.stride_h, p.stride_w, 1)
    pad = _square(layer.name, "pad", p.pad, p.pad_h, p.pad_w, 0)
    _expect(layer.name, "(kernel_size, stride, pad)", POOL_SPEC, (kernel, stride, pad))


def _lrn_constants(layer):
    p = layer.lrn
    _expect(layer.name, "norm_region", "ACROSS_CHANNELS",
            caffe_pb.LRNParameter.NormRegion.Name(p.norm_region))
    _expect(layer.name, "local_size", LRN_SIZE, p.local_size)
    if not p.k > 0:
        raise ValueError(f"Layer {layer.name!r}: LRN k must be positive, found {p.k}.")
    # float32 in the file: 1e-4 is stored as 9.99999974738e-05; round to float32's 7 digits.
    return {"local_size": int(p.local_size), "alpha": float(f"{p.alpha:.7g}"),
            "beta": float(f"{p.beta:.7g}"), "k": float(f"{p.k:.7g}")}


def _input_size(net, layers, path):
    """The input's spatial side from ``input_param``, ``input_shape`` or ``input_dim``."""
    shapes = [shape for layer in layers if layer.type == "Input" for shape in layer.input_shapes]
    shapes += [list(s.dim) for s in net.input_shape]
    dims = list(net.input_dim)
    shapes += [dims[i:i + 4] for i in range(0, len(dims) - 3, 4)]
    if not shapes:
        return paper.IMAGE_SIZE  # a train_val net: its Data layer's crop_size is 227
    shape = shapes[0]
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
        raise ValueError(f"{path}: expected an input of shape N x 3 x S x S (bvlc_alexnet: "
                         f"10 x 3 x 227 x 227), found {shape}.")
    return int(shape[2])


def _pooled_sizes(size):
    """(Caffe's, Keras') spatial sizes after conv1, pool1, pool2, pool5 for ``size`` inputs."""
    conv1 = (size - 11) // 4 + 1
    caffe, keras = [conv1], [conv1]
    for _ in range(3):  # pool1, pool2 (conv2-conv5 keep the size), pool5
        caffe.append(-(-(caffe[-1] - 3) // 2) + 1)
        keras.append((keras[-1] - 3) // 2 + 1)
    return caffe, keras


def check_architecture(net, path="the prototxt"):
    """Checks that a `caffe_pb.NetParameter` is bvlc_alexnet; returns what varies.

    bvlc_alexnet (models/bvlc_alexnet/deploy.prototxt) is, after its 3 x 227 x 227 input:
    conv1 96@11x11/4 pad 0 -> ReLU -> LRN (local_size 5, ACROSS_CHANNELS) -> MAX pool 3/2
    -> conv2 256@5x5 pad 2 group 2 -> ReLU -> LRN -> pool 3/2 -> conv3 384@3x3 pad 1 ->
    ReLU -> conv4 384@3x3 pad 1 group 2 -> ReLU -> conv5 256@3x3 pad 1 group 2 -> ReLU ->
    pool 3/2 -> fc6 4096 -> ReLU -> fc7 4096 -> ReLU -> fc8, each layer reading the one
    before (Dropout layers allowed in between). Layer names may differ; types, order,
    connections and sizes may not. Nothing is built.

    Returns:
        ``dict(names=..., lrn=..., num_classes=..., image_size=..., pool5=..., format=...)``:
        the Caffe names of conv1..fc8 (the caffemodel's blobs are found by them), the LRN
        constants ``{local_size, alpha, beta, k}`` in Caffe's convention, fc8's outputs,
        the input side, pool5's side and the prototxt's format.

    Raises:
        ValueError: naming the layer and the expected and found value at the first
            difference.
    """
    layers, form = _layers(net, path)
    chain = [layer for layer in layers
             if layer.type not in _INPUT_TYPES and layer.type not in _SKIPPED_TYPES]
    names, lrns = {}, []
    current = None
    dropouts = [layer for layer in layers if layer.type in _SKIPPED_TYPES]
    for position, (expected_name, expected_type) in enumerate(SEQUENCE):
        if position >= len(chain):
            raise ValueError(f"{path} ends after {position} layers; expected layer "
                             f"{expected_name!r} of type {expected_type!r} next, as in "
                             "bvlc_alexnet.")
        layer = chain[position]
        if layer.type != expected_type:
            raise ValueError(
                f"Layer {layer.name!r} ({position + 1}th after the input): expected type "
                f"{expected_type!r} (bvlc_alexnet's {expected_name}), found {layer.type!r}. "
                "This converter reads Caffe's bvlc_alexnet only.")
        if len(layer.bottom) != 1 or len(layer.top) != 1:
            raise ValueError(f"Layer {layer.name!r}: expected one bottom and one top, found "
                             f"bottom {layer.bottom} and top {layer.top}.")
        if current is not None and layer.bottom[0] != current:
            raise ValueError(f"Layer {layer.name!r}: expected bottom {current!r} (the previous "
                             f"layer's output), found {layer.bottom[0]!r}.")
        current = layer.top[0]
        if expected_type == "Convolution":
            _expect(layer.name, "(num_output, kernel_size, stride, pad, group)",
                    CONV_SPECS[expected_name], _conv_spec(layer))
            names[expected_name] = layer.name
        elif expected_type == "InnerProduct":
            p = layer.inner_product
            if expected_name in FC_UNITS:
                _expect(layer.name, "num_output", FC_UNITS[expected_name], p.num_output)
            _expect(layer.name, "bias_term", True, p.bias_term)
            _expect(layer.name, "transpose", False, p.transpose)
            _expect(layer.name, "axis", 1, p.axis)
            names[expected_name] = layer.name
        elif expected_type == "LRN":
            lrns.append((layer.name, _lrn_constants(layer)))
        elif expected_type == "Pooling":
            _check_pooling(layer)
    for layer in dropouts:
        if layer.bottom != layer.top:
            raise ValueError(f"Layer {layer.name!r}: expected an in-place Dropout (bottom = top), "
                             f"found bottom {layer.bottom} and top {layer.top}.")
    (_, lrn), (second, lrn2) = lrns
    _expect(second, "the same LRN constants as the first LRN", lrn, lrn2)
    num_classes = int(chain[len(SEQUENCE) - 1].inner_product.num_output)
    if num_classes < 2:
        raise ValueError(f"Layer {names['fc8']!r}: expected num_output >= 2, found {num_classes}.")
    size = _input_size(net, layers, path)
    caffe_sizes, keras_sizes = _pooled_sizes(size)
    if size < paper.MIN_IMAGE_SIZE or size > paper.RESIZE_SIZE or caffe_sizes != keras_sizes:
        raise ValueError(
            f"{path}: input side {size} is not supported: Caffe rounds pooled sizes up and Keras "
            f"down, giving {caffe_sizes} and {keras_sizes} after conv1/pool1/pool2/pool5; the "
            f"converter takes sides from {paper.MIN_IMAGE_SIZE} to {paper.RESIZE_SIZE} where they "
            "agree (bvlc_alexnet's 227: 55, 27, 13, 6).")
    return {"names": names, "lrn": lrn, "num_classes": num_classes, "image_size": size,
            "pool5": caffe_sizes[-1], "format": form}


def expected_blob_shapes(num_classes, pool5=6):
    """Caffe's (weight, bias) blob shapes of bvlc_alexnet's conv1..fc8 (current format)."""
    shapes = {}
    inputs = 3
    for name in CONV_LAYERS:
        filters, kernel, _, _, group = CONV_SPECS[name]
        shapes[name] = ((filters, inputs // group, kernel, kernel), (filters,))
        inputs = filters
    inputs *= pool5 * pool5
    for name in FC_LAYERS:
        units = FC_UNITS.get(name, num_classes)
        shapes[name] = ((units, inputs), (units,))
        inputs = units
    return shapes


def _same_shape(found, expected):
    """Caffe's comparison: legacy 4-D blobs count with their leading 1s removed."""
    found = tuple(int(d) for d in found)
    while len(found) > len(expected) and found[0] == 1:
        found = found[1:]
    return found == tuple(expected)


def _read(path, what):
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist.")
    return path, path.read_bytes()


def read_prototxt(path):
    """The `caffe_pb.NetParameter` of a prototxt file; ``ValueError`` if it is not one."""
    path, data = _read(path, "The prototxt")
    try:
        return caffe_pb.parse_text(data.decode("utf-8"))
    except (UnicodeDecodeError, text_format.ParseError) as error:
        raise ValueError(f"{path} is not a Caffe prototxt (protobuf text format): {error}. Pass "
                         "the network definition, e.g. models/bvlc_alexnet/deploy.prototxt."
                         ) from None


def read_caffemodel(path, names):
    """The Caffe-shaped float32 ``(weight, bias)`` arrays of the layers ``names``.

    Returns ``(blobs, info)``: ``blobs`` maps each name to its two arrays, ``info`` the
    file's format and SHA-1. Raises ``ValueError`` (naming the file) for a file that is
    not a binary ``NetParameter``, is truncated, or lacks one of the layers' blobs.
    """
    path, data = _read(path, "The caffemodel")
    sha1 = hashlib.sha1(data).hexdigest()
    hint = ("Pass the binary weights file of bvlc_alexnet (bvlc_alexnet.caffemodel from the "
            f"BVLC model zoo, SHA-1 {PUBLISHED_SHA1}), re-downloading it if it is incomplete.")
    try:
        net = caffe_pb.NetParameter.FromString(data)
    except message.DecodeError as error:
        raise ValueError(f"{path} is not a readable caffemodel (a binary Caffe NetParameter): "
                         f"{error}; it may be truncated or another kind of file. {hint}") from None
    del data
    layers, form = _layers(net, path)
    by_name = {}
    for layer in layers:
        if len(layer.blobs):
            by_name.setdefault(layer.name, layer.blobs)
    missing = [name for name in names if name not in by_name]
    if missing:
        held = sorted(by_name)[:12]
        raise ValueError(f"{path} holds no weights for the layers {missing} (it has weights for "
                         f"{held or 'no layer'}). {hint}")
    blobs = {}
    for name in names:
        if len(by_name[name]) != 2:
            raise ValueError(f"{path}: layer {name!r} has {len(by_name[name])} blobs; expected 2 "
                             f"(weights and biases). {hint}")
        try:
            blobs[name] = tuple(caffe_pb.blob_to_array(blob) for blob in by_name[name])
        except ValueError as error:
            raise ValueError(f"{path}: layer {name!r}: {error} {hint}") from None
    return blobs, {"format": form, "sha1": sha1}


def read_mean_image(path, size=paper.RESIZE_SIZE):
    """Caffe's mean image (a ``BlobProto`` file, ``1 x 3 x S x S`` BGR CHW) as RGB HWC float32."""
    path, data = _read(path, "The mean file")
    hint = ("Pass Caffe's mean image (ilsvrc_2012_mean.binaryproto, 1 x 3 x 256 x 256), or no "
            "mean for its per-channel average.")
    try:
        array = caffe_pb.blob_to_array(caffe_pb.BlobProto.FromString(data))
    except (message.DecodeError, ValueError) as error:
        raise ValueError(f"{path} is not a Caffe mean image (a binary BlobProto): {error}. "
                         f"{hint}") from None
    if array.shape not in ((1, 3, size, size), (3, size, size)):
        raise ValueError(f"{path}: expected a mean image of shape 1 x 3 x {size} x {size}, found "
                         f"{' x '.join(map(str, array.shape)) or 'an empty blob'}. {hint}")
    return np.ascontiguousarray(array.reshape(3, size, size)[::-1].transpose(1, 2, 0),
                                dtype=np.float32)


def _fc6_permutation(pool5):
    """``perm[j]``: Caffe's fc6 input index for the model's fc6 input ``j``.

    The model's 9216 inputs are ``concat(flatten_a, flatten_b)``, each an (H, W, C) flatten
    of one tower's 128 channels; Caffe's are the (C, H, W) flatten of all 256.
    """
    caffe_index = np.arange(256 * pool5 * pool5).reshape(2, 128, pool5, pool5)  # tower, c, h, w
    return caffe_index.transpose(0, 2, 3, 1).reshape(-1)


def keras_weights(blobs, pool5=6):
    """The model's weights from Caffe's blobs: ``{keras layer name: [kernel, bias]}``.

    See the module docstring for the mapping (HWIO, BGR -> RGB, groups -> towers, fc6's
    column permutation).
    """
    def hwio(weight):
        return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))

    def vector(bias):
        return bias.reshape(-1)

    weights = {}
    for name in CONV_LAYERS:
        weight, bias = blobs[name]
        bias = vector(bias)
        if name == "conv1":
            weight = weight[:, ::-1]  # BGR input channels -> RGB
        half = weight.shape[0] // 2
        for suffix, rows in (("_a", slice(0, half)), ("_b", slice(half, None))):
            weights[name + suffix] = [hwio(weight[rows]), np.ascontiguousarray(bias[rows])]
    for name in ("fc6", "fc7"):
        weight, bias = blobs[name]
        weight, bias = weight.reshape(weight.shape[-2:]), vector(bias)
        if name == "fc6":
            weight = weight[:, _fc6_permutation(pool5)]
        half = weight.shape[0] // 2
        for suffix, rows in (("_a", slice(0, half)), ("_b", slice(half, None))):
            weights[name + suffix] = [np.ascontiguousarray(weight[rows].T),
                                      np.ascontiguousarray(bias[rows])]
    weight, bias = blobs["fc8"]
    weights["fc8"] = [np.ascontiguousarray(weight.reshape(weight.shape[-2:]).T), vector(bias)]
    return weights


def build_model(num_classes=paper.NUM_CLASSES, image_size=paper.IMAGE_SIZE,
                lrn_alpha=paper.CAFFE_LRN_ALPHA, lrn_bias=paper.CAFFE_LRN_BIAS,
                lrn_beta=paper.LRN_BETA, dropout_rate=paper.DROPOUT_RATE):
    """bvlc_alexnet as the ``"caffe"`` `AlexNet` (LRN across both towers, as Caffe's
    single norm1/norm2 layers see the whole blob; see `model.norm_across_towers`).

    ``lrn_alpha`` multiplies the plain sum (Caffe's alpha / n); the window is `LRN_SIZE`
    channels. Weights start at zero (the converter sets all of them).
    """
    return alexnet("caffe", num_classes=num_classes, image_size=image_size, lrn_alpha=lrn_alpha,
                   lrn_bias=lrn_bias, lrn_beta=lrn_beta, dropout_rate=dropout_rate,
                   initializer="glorot")


def load_caffe(prototxt, caffemodel, *, mean=None, class_names=None):
    """Converts Caffe's bvlc_alexnet into the ``"caffe"`` `AlexNet`; a `ConvertedModel`.

    Everything is checked before the model is built: the prototxt against bvlc_alexnet
    (`check_architecture`), the caffemodel's conv1..fc8 blob shapes against the ones the
    prototxt implies (Caffe's legacy 4-D blobs compare without their leading 1s: fc
    weights ``1 x 1 x O x I``), the mean image and the class names.

    The model is `build_model` (the ``"caffe"`` `AlexNet`'s layers, names and weight
    shapes, with Caffe's LRN across both towers) with ``lrn_alpha = alpha / n``,
    ``lrn_bias = k`` and beta read from the prototxt, every weight set from the
    caffemodel, dropout at its default (inactive at inference). It takes RGB 0-255
    pixels minus ``mean`` (BGR is folded into conv1) and returns Caffe's fc8 outputs
    (logits; Caffe's ``prob`` is their softmax).

    Args:
        prototxt: path of the network definition (``deploy.prototxt``; a train_val
            prototxt works too), current or V1 format.
        caffemodel: path of the binary weights (``bvlc_alexnet.caffemodel``), either format.
        mean: ``None`` for Caffe's per-channel mean (`paper.CAFFE_MEAN_BGR` as RGB), or the
            path of Caffe's mean image ``ilsvrc_2012_mean.binaryproto``, converted to an RGB
            ``(256, 256, 3)`` per-pixel mean.
        class_names: one label per fc8 output; defaults to the 1000 ImageNet classes
            (`imagenet_class_names`) when fc8 has 1000 outputs, required otherwise.

    Returns:
        A `ConvertedModel` with ``resize=256`` and a ``weights`` record (files, format,
        conventions, LRN constants as read and as converted, mean, input size, published
        accuracy).

    Raises:
        ValueError: for a prototxt that is not bvlc_alexnet, a caffemodel that is
            unreadable, truncated, lacks the weights or has other shapes, a bad mean file,
            or missing / miscounted class names; each names the file and what to do.
    """
    prototxt = pathlib.Path(prototxt)
    spec = check_architecture(read_prototxt(prototxt), prototxt)
    num_classes, size, pool5 = spec["num_classes"], spec["image_size"], spec["pool5"]
    if class_names is None:
        if num_classes != paper.NUM_CLASSES:
            raise ValueError(
                f"{prototxt}: fc8 has {num_classes} outputs, not the 1000 ImageNet classes; pass "
                f"class_names, one label per output in output order.")
        class_names = imagenet_class_names()
    class_names = [str(name) for name in class_names]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names were given for fc8's {num_classes} "
                         "outputs; pass one name per output, in output order.")
    if mean is None:
        mean_array = np.asarray(paper.CAFFE_MEAN_BGR[::-1], np.float32)
        mean_record = ("Caffe's per-channel ImageNet mean (B, G, R = "
                       f"{', '.join(f'{m:.3f}' for m in paper.CAFFE_MEAN_BGR)}) as RGB, "
                       "subtracted on the 0-255 scale")
    else:
        mean_array = read_mean_image(mean)
        mean_record = (f"Caffe's mean image {pathlib.Path(mean).name} (BGR, CHW) as an RGB "
                       "256 x 256 x 3 per-pixel mean, subtracted on the 0-255 scale")

    caffe_names = spec["names"]
    raw, info = read_caffemodel(caffemodel, [caffe_names[n] for n in CONV_LAYERS + FC_LAYERS])
    blobs = {name: raw[caffe_names[name]] for name in CONV_LAYERS + FC_LAYERS}
    for name, shapes in expected_blob_shapes(num_classes, pool5).items():
        for kind, blob, expected in zip(("weights", "biases"), blobs[name], shapes):
            if not _same_shape(blob.shape, expected):
                raise ValueError(
                    f"{caffemodel}: layer {caffe_names[name]!r} {kind} have shape "
                    f"{' x '.join(map(str, blob.shape))}, expected "
                    f"{' x '.join(map(str, expected))} for the prototxt {prototxt.name}. Pass "
                    "the caffemodel trained with this prototxt (bvlc_alexnet.caffemodel).")
    weights = keras_weights(blobs, pool5)
    del blobs, raw

    lrn = spec["lrn"]
    keras_lrn = {"size": lrn["local_size"], "alpha": lrn["alpha"] / lrn["local_size"],
                 "bias": lrn["k"], "beta": lrn["beta"]}
    model = build_model(num_classes, size, lrn_alpha=keras_lrn["alpha"],
                        lrn_bias=keras_lrn["bias"], lrn_beta=keras_lrn["beta"])
    for name, values in weights.items():
        model.get_layer(name).set_weights(values)

    record = {
        "source": "caffe",
        "architecture": "Caffe bvlc_alexnet: the 'caffe' variant's two towers (a/b = Caffe "
                        "groups 0/1) with norm1/norm2 across both towers, as Caffe's LRN",
        "prototxt": prototxt.name,
        "caffemodel": pathlib.Path(caffemodel).name,
        "mean_file": pathlib.Path(mean).name if mean is not None else None,
        "format": {"prototxt": spec["format"], "caffemodel": info["format"]},
        "sha1": info["sha1"],
        "published_file": info["sha1"] == PUBLISHED_SHA1,
        "num_classes": num_classes,
        "channel_order": "BGR folded into conv1 (the export takes RGB)",
        "lrn": {
            "caffe": lrn,
            "keras": keras_lrn,
            "convention": "Caffe: scale = k + alpha / n * sum; Keras layer: bias + alpha * sum, "
                          "so alpha_keras = alpha_caffe / local_size, bias = k",
        },
        "conventions": {
            "layout": "NCHW -> NHWC: conv weights OIHW -> HWIO, InnerProduct (out, in) -> Dense "
                      "kernels (in, out)",
            "groups": "Caffe group 0 / 1 -> towers _a / _b; conv1, conv3, fc6, fc7 outputs "
                      "split in halves the same way",
            "flatten_order": "fc6 columns permuted from Caffe's (C, H, W) flatten of pool5 to "
                             "concat(flatten_a, flatten_b), each (H, W, C)",
            "pooling": "Caffe rounds pooled sizes up, Keras down: equal at this input size",
        },
        "mean": mean_record,
        "input": size,
        "resize": paper.RESIZE_SIZE,
        "published_accuracy": dict(PUBLISHED_ACCURACY),
    }
    return ConvertedModel(model=model, mean=mean_array, resize=paper.RESIZE_SIZE,
                          class_names=class_names, weights=record)
