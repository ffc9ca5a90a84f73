"""torchvision's AlexNet state dict into the ``"torchvision"`` variant.

torchvision's ``alexnet`` (``AlexNet_Weights.IMAGENET1K_V1``, the file
``alexnet-owt-7be5be79.pth``) is the one-tower network of Krizhevsky's "One weird trick"
(2014)::

    features    0 Conv2d(3, 64, 11, stride 4, padding 2)  ReLU  MaxPool(3, 2)
                3 Conv2d(64, 192, 5, padding 2)           ReLU  MaxPool(3, 2)
                6 Conv2d(192, 384, 3, padding 1)          ReLU
                8 Conv2d(384, 256, 3, padding 1)          ReLU
               10 Conv2d(256, 256, 3, padding 1)          ReLU  MaxPool(3, 2)
    avgpool       AdaptiveAvgPool2d(6, 6)
    classifier    Dropout  1 Linear(9216, 4096)  ReLU
                  Dropout  4 Linear(4096, 4096)  ReLU
                           6 Linear(4096, N)

with state-dict keys ``features.{0,3,6,8,10}.{weight,bias}`` and
``classifier.{1,4,6}.{weight,bias}``. `keras_alexnet.model`'s ``"torchvision"`` variant
is the same function layer for layer (``conv1_pad`` + a valid ``conv1`` is padding 2;
``"same"`` on the stride-1 5x5 and 3x3 convolutions is padding 2 and 1; pool1, pool2
and pool5 are the same floor-mode 3x3/2 max pools; ``avgpool`` is PyTorch's adaptive
average pool), so converting is a re-layout of the tensors:

* convolution kernels: PyTorch's ``(out, in, kh, kw)`` (OIHW, for NCHW maps) become
  Keras' ``(kh, kw, in, out)`` (HWIO, for NHWC maps), ``transpose(2, 3, 1, 0)``. Both
  compute cross-correlations: nothing is flipped.
* ``Linear`` weights ``(out, in)`` become ``Dense`` kernels ``(in, out)``.
* fc6's 9216 inputs are the flattened ``256 x 6 x 6`` avgpool output: PyTorch flattens
  NCHW maps as ``(c, h, w)``, input ``c * 36 + h * 6 + w``; Keras flattens NHWC maps as
  ``(h, w, c)``, input ``h * 1536 + w * 256 + c``. fc6's kernel row for ``(h, w, c)`` is
  therefore PyTorch's column ``(c, h, w)``: the weight is reshaped to
  ``(4096, 256, 6, 6)``, transposed to ``(6, 6, 256, 4096)`` and flattened to
  ``(9216, 4096)``.
* the input: torchvision feeds ``(x / 255 - mean) / std`` per RGB channel for pixels
  ``x`` on the 0-255 scale. This equals ``(x - 255 mean) * (1 / (255 std))``: the mean
  ``255 * TORCHVISION_MEAN`` (123.675, 116.28, 103.53) is subtracted in preprocessing on
  the 0-255 scale like every mean of this package, and the factor is the variant's
  ``input_scale`` layer (a ``Rescaling`` before ``conv1_pad``, so conv1 still pads with
  zeros of the normalised input, as PyTorch does). Channel order is RGB on both sides.
* dropout: torchvision drops the *inputs* of fc6 and fc7, this model the *outputs* of fc6
  and fc7 (``drop6``, ``drop7``: the inputs of fc7 and fc8). Outside training dropout is
  the identity, so inference is identical; fine-tuning the converted model regularises
  one layer later than torchvision would.

Preprocessing: torchvision resizes the shorter side to 256 and centre-crops 224;
`preprocessing.eval_from_image` with ``resize=256`` is the same geometry (centre square,
then 256x256, then the central 224) with its own resampling filter (area averaging when
shrinking, where torchvision uses antialiased bilinear), so pixel values, and hence
accuracy, may differ slightly from the published numbers.

PyTorch is an optional dependency (``pip install 'keras-alexnet[torch]'``), imported only
inside `load_torchvision`; importing this module never imports it.
"""

import hashlib
import pathlib
import re

import numpy as np

from keras_alexnet import paper
from keras_alexnet.convert import ConvertedModel, imagenet_class_names
from keras_alexnet.model import alexnet

#: ``(PyTorch module index, Keras layer name)`` of every layer with weights, in order.
CONV_LAYERS = (("features.0", "conv1"), ("features.3", "conv2"), ("features.6", "conv3"),
               ("features.8", "conv4"), ("features.10", "conv5"))
DENSE_LAYERS = (("classifier.1", "fc6"), ("classifier.4", "fc7"), ("classifier.6", "fc8"))

#: The published file's name; torchvision names files after their SHA-256's first 8 digits.
PUBLISHED_FILE = "alexnet-owt-7be5be79.pth"
PUBLISHED_SHA256_PREFIX = "7be5be79"
PUBLISHED_ACCURACY = {
    "top1": 56.522,
    "top5": 79.066,
    "dataset": "ImageNet-1k validation (50,000 images), one 224 centre crop of the 256 resize",
    "weights": "torchvision AlexNet_Weights.IMAGENET1K_V1 (" + PUBLISHED_FILE + ")",
    "source": "torchvision documentation, torchvision.models.alexnet "
              "(https://pytorch.org/vision/stable/models/generated/torchvision.models.alexnet.html)",
}

#: Top-level keys under which training checkpoints commonly hold the state dict.
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
#: Key prefixes added by wrappers: ``nn.DataParallel``/DDP and ``torch.compile``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_POOL5 = (256, 6, 6)  # the avgpool output fc6 reads, (channels, height, width)


def expected_shapes(num_classes):
    """``{state-dict key: shape}`` of torchvision's AlexNet with ``num_classes`` outputs."""
    in_channels = 3
    shapes = {}
    for (key, _), (filters, kernel) in zip(
            CONV_LAYERS, zip(paper.TORCHVISION_CONV_FILTERS, (11, 5, 3, 3, 3))):
        shapes[f"{key}.weight"] = (filters, in_channels, kernel, kernel)
        shapes[f"{key}.bias"] = (filters,)
        in_channels = filters
    units = int(np.prod(_POOL5))
    for (key, _), out in zip(DENSE_LAYERS, (*paper.FC_UNITS, num_classes)):
        shapes[f"{key}.weight"] = (out, units)
        shapes[f"{key}.bias"] = (out,)
        units = out
    return shapes


def conv_kernel(weight):
    """PyTorch's ``(out, in, kh, kw)`` convolution weight as a Keras ``(kh, kw, in, out)``
    kernel."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def dense_kernel(weight, flattened_from=None):
    """A ``Linear`` weight ``(out, in)`` as a ``Dense`` kernel ``(in, out)``.

    ``flattened_from=(c, h, w)``: the inputs are a flattened ``c x h x w`` map (fc6 reads
    the ``256 x 6 x 6`` avgpool output), whose rows are reordered from PyTorch's
    ``(c, h, w)`` flatten to Keras' ``(h, w, c)``.
    """
    weight = np.asarray(weight)
    if flattened_from is None:
        return np.ascontiguousarray(weight.T)
    channels, height, width = flattened_from
    grid = weight.reshape(weight.shape[0], channels, height, width)
    return np.ascontiguousarray(
        np.transpose(grid, (2, 3, 1, 0)).reshape(height * width * channels, weight.shape[0]))


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "Reading torchvision state dicts needs PyTorch, which is an optional dependency: "
            "pip install 'keras-alexnet[torch]'") from error
    return torch


def _load_error_detail(error):
    """The informative line of a ``torch.load`` failure (its weights-only messages are long)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text[text.index(marker) + len(marker):]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"


def _read(torch, path):
    """``torch.load`` with ``weights_only=True``, its failures as ValueErrors."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused:
            raise ValueError(
                f"{path}: refused to unpickle it: loading it would import {refused.group(1)}, "
                "and only tensors and plain containers are read (torch.load with "
                "weights_only=True), so a pickled nn.Module or code that would run when the "
                "file is loaded is never executed. Save the weights alone with "
                "torch.save(model.state_dict(), path) and convert that file."
            ) from error
        raise ValueError(
            f"{path}: not a PyTorch file that torch.load(weights_only=True) can read "
            f"({_load_error_detail(error)}). Pass the state dict saved by torch.save, such as "
            f"torchvision's {PUBLISHED_FILE}.") from error


def _unwrap(obj, path):
    """The state dict inside a checkpoint: ``obj`` itself, or under `CHECKPOINT_KEYS`,
    with `WRAPPER_PREFIXES` removed from its keys."""
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors). "
            "Save torchvision's AlexNet with torch.save(model.state_dict(), path).")
    if "features.0.weight" not in obj:
        for key in CHECKPOINT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    state = dict(obj)
    for prefix in WRAPPER_PREFIXES:
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _checked(torch, state, path):
    """``{key: float32 ndarray}`` after checking keys, types, shapes and values."""
    fc8 = state.get("classifier.6.weight")
    num_classes = int(fc8.shape[0]) if isinstance(fc8, torch.Tensor) and fc8.dim() == 2 else 1000
    expected = expected_shapes(num_classes)
    missing = [k for k in expected if k not in state]
    unexpected = sorted(str(k) for k in state if k not in expected)
    if missing or unexpected:
        found = sorted(str(k) for k in state)
        raise ValueError(
            f"{path}: not torchvision's AlexNet state dict: missing keys {missing}, unexpected "
            f"keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} (the file holds "
            f"{len(found)} entries{': ' + ', '.join(found[:6]) if found else ''}"
            f"{' ...' if len(found) > 6 else ''}). Expected exactly "
            f"{', '.join(expected)}; pass the state dict of torchvision.models.alexnet "
            f"({PUBLISHED_FILE}).")
    arrays = {}
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: {key} is a {type(value).__name__}, expected a tensor of shape "
                f"{shape}; pass a state dict saved by torch.save(model.state_dict(), path).")
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)}, expected {shape} (torchvision's "
                f"AlexNet with {num_classes} classes); this is another architecture or a "
                "modified AlexNet, which the 'torchvision' variant cannot hold.")
        if not value.is_floating_point():
            raise ValueError(f"{path}: {key} has dtype {value.dtype}, expected floating-point "
                             "weights (float32, float16 or bfloat16).")
        array = value.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        if not np.isfinite(array).all():
            raise ValueError(f"{path}: {key} holds NaN or infinite values; the weights are "
                             "corrupt (or came from a diverged run).")
        arrays[key] = array
    if num_classes < 2:
        raise ValueError(f"{path}: classifier.6.weight has {num_classes} output, expected at "
                         "least 2 classes (1000 for ImageNet).")
    return arrays, num_classes


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_torchvision(state_dict_path, *, class_names=None, image_size=None):
    """Converts torchvision's AlexNet state dict into an `AlexNet` (the module docstring
    gives the maths).

    The file is read with ``torch.load(weights_only=True)``, which never runs code from
    the pickle. It may hold the plain state dict (``torch.save(model.state_dict(), p)``,
    like torchvision's ``alexnet-owt-7be5be79.pth``), a checkpoint dict holding it under
    ``"state_dict"``, ``"model_state_dict"`` or ``"model"``, and keys prefixed by
    ``nn.DataParallel`` (``module.``) or ``torch.compile`` (``_orig_mod.``). Every key,
    type and shape is checked before the model is built. The number of classes is
    ``classifier.6.weight``'s first dimension.

    Args:
        state_dict_path: the ``.pth`` file.
        class_names: one label per class in output order; defaults to
            `imagenet_class_names` for 1000 classes and is required otherwise.
        image_size: side of the square input; defaults to torchvision's 224. Other sizes
            (67 or more) work as in PyTorch, the adaptive pool mapping pool5 to 6x6, and
            crop from a square scaled in proportion, ``round(image_size * 256 / 224)``.

    Returns:
        A `ConvertedModel`: the ``alexnet("torchvision", num_classes=N)`` model with the
        weights, ``mean = 255 * TORCHVISION_MEAN`` (RGB, 0-255 scale), ``resize = 256``,
        the class names and the ``weights`` record for the export metadata.

    Raises:
        ImportError: when PyTorch is not installed.
        ValueError: for a file that is not a PyTorch file, a pickle that
            ``weights_only`` refuses, a state dict that is not torchvision's AlexNet
            (missing or unexpected keys, wrong shapes, non-tensor or non-float values,
            NaNs), or class names that do not match the classes; the message names
            the file and the key, what was expected and what was found.
    """
    torch = _import_torch()
    path = pathlib.Path(state_dict_path).expanduser()
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass the state dict file ({PUBLISHED_FILE}).")
    image_size = paper.TORCHVISION_IMAGE_SIZE if image_size is None else image_size
    if isinstance(image_size, bool) or not isinstance(image_size, int) \
            or image_size < paper.MIN_IMAGE_SIZE:
        raise ValueError(f"`image_size` must be an integer >= {paper.MIN_IMAGE_SIZE}. "
                         f"Received: image_size={image_size!r}")
    arrays, num_classes = _checked(torch, _unwrap(_read(torch, path), path), path)
    if class_names is None:
        if num_classes != paper.NUM_CLASSES:
            raise ValueError(
                f"{path}: the state dict has {num_classes} classes (classifier.6.weight is "
                f"{(num_classes, paper.FC_UNITS[-1])}), so the ImageNet names do not apply; "
                f"pass class_names, {num_classes} labels in output order.")
        class_names = imagenet_class_names()
    class_names = [str(name) for name in class_names]
    if len(class_names) != num_classes:
        raise ValueError(
            f"{path}: {len(class_names)} class names for {num_classes} classes "
            "(classifier.6.weight's first dimension); pass one label per output, in order.")

    model = alexnet("torchvision", num_classes=num_classes, image_size=image_size)
    for key, name in CONV_LAYERS:
        model.get_layer(name).set_weights(
            [conv_kernel(arrays[f"{key}.weight"]), arrays[f"{key}.bias"]])
    for key, name in DENSE_LAYERS:
        flattened_from = _POOL5 if name == "fc6" else None
        model.get_layer(name).set_weights(
            [dense_kernel(arrays[f"{key}.weight"], flattened_from), arrays[f"{key}.bias"]])

    if image_size == paper.TORCHVISION_IMAGE_SIZE:
        resize = paper.TORCHVISION_RESIZE_SIZE
    else:
        resize = int(round(image_size * paper.TORCHVISION_RESIZE_SIZE
                           / paper.TORCHVISION_IMAGE_SIZE))
    mean = [255.0 * m for m in paper.TORCHVISION_MEAN]
    sha256 = _sha256(path)
    published = sha256.startswith(PUBLISHED_SHA256_PREFIX)
    weights = {
        "source": "torchvision",
        "format": "PyTorch state dict, read with torch.load(weights_only=True)",
        "architecture": "torchvision.models.alexnet (one tower, 64-192-384-256-256, "
                        "adaptive 6x6 average pool)",
        "file": path.name,
        "sha256": sha256,
        "published_file": published,
        "num_classes": num_classes,
        "conventions": {
            "layout": "NCHW -> NHWC: conv weights OIHW -> HWIO (transpose 2, 3, 1, 0), "
                      "Linear weights (out, in) -> Dense kernels (in, out)",
            "flatten_order": "fc6 rows permuted from PyTorch's (C, H, W) flatten of the "
                             "256x6x6 avgpool output to Keras' (H, W, C)",
            "std": "1 / (255 std) per RGB channel folded into the model's input_scale layer, "
                   f"std = {list(paper.TORCHVISION_STD)}",
            "mean": f"255 * {list(paper.TORCHVISION_MEAN)} = {[round(m, 3) for m in mean]} "
                    "subtracted on the 0-255 RGB scale in preprocessing",
            "channel_order": "RGB (unchanged)",
            "dropout": "torchvision drops fc6's and fc7's inputs, this model fc6's and fc7's "
                       "outputs: identical at inference",
        },
        "input": image_size,
        "resize": resize,
    }
    if published:
        weights["published_accuracy"] = dict(PUBLISHED_ACCURACY)
    return ConvertedModel(model=model, mean=mean, resize=resize, class_names=class_names,
                          weights=weights)
