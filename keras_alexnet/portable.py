"""ONNX and LiteRT (TFLite) files of a classifier: preprocessed pixels in, softmax out.

`export_onnx` and `export_litert` write one model file that computes what a SavedModel
export's ``serving_pixels`` signature computes (`keras_alexnet.export`), for runtimes
without TensorFlow (ONNX Runtime, the LiteRT interpreter):

* input ``pixels``: ``float32 [batch, S, S, 3]``, NHWC, RGB, already preprocessed as
  `keras_alexnet.preprocessing.eval_from_image` does (the shorter side rescaled to the
  model's resize side R, the central R x R square, the mean subtracted on the 0-255
  scale, the central S x S crop); the model's own input scaling (the torchvision
  variant's ``1 / (255 std)``) is inside the file;
* outputs ``probabilities`` ``float32 [batch, num_classes]`` (the softmax), and the
  top K (`keras_alexnet.export.top_k_for`: 5, or all classes when fewer) as
  ``classes`` ``int32 [batch, K]`` and ``scores`` ``float32 [batch, K]``, descending.

Beside the file goes a JSON sidecar (`sidecar_path`: the file's name plus ``.json``)
that says what to feed: the input's name and shape, the preprocessing (mean, resize
side, crop, channel order, scale), the class names, the outputs and the source; a
per-pixel mean image is written as ``<file>.mean.npy``. The ONNX file also carries the
record in its ``metadata_props`` (key `METADATA_KEY`).

What these formats cannot carry is refused (``ValueError``) before anything is
converted: the encoded-image signatures (``serving_default``, ``classify``,
``features``: no image decoder op in either runtime, so the files take pixels) and
``ten_crop`` (send the 10 crops of `preprocessing.ten_crop_from_image` as 10 rows and
average their probabilities). Ensembles (`keras_alexnet.ensemble.Ensemble`) convert:
their output is the members' averaged softmax, as in their SavedModel.

How: the network is traced without `AlexNet.call`'s empty-batch ``tf.cond`` (a
TensorFlow-kernel workaround, see there), because both converters fail on it (tf2onnx
cannot read the kernels inside the branch; the TFLite file reads uninitialised
variables). ONNX goes through ``tf2onnx.convert.from_function`` (Keras 3 models fail
in its ``from_keras``; Keras' own ``export(format="onnx")`` is the same call but names
the output ``output_0`` and needs a model that has been called); LiteRT through a
SavedModel and ``tf.lite.TFLiteConverter.from_saved_model`` restricted to the builtin
ops, so the file runs on the plain interpreter without the Flex delegate
(``from_concrete_functions`` produced NaN outputs here; Keras'
``export(format="litert")`` allows Select TF ops and names the output ``output_0``).
Every conversion is checked before anything is written (``verify``): the file's
runtime and TensorFlow must agree within `TOLERANCE` on seeded random pixels, else
`ConversionError`. Files are written atomically (`keras_alexnet.files`): a failed
conversion leaves nothing. Needs the ``onnx`` or ``litert`` extra
(``pip install 'keras-alexnet[onnx]'``); without it `MissingExtraError`.
"""

import contextlib
import importlib
import io
import json
import logging
import os
import pathlib
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_alexnet import ensemble, export, files, preprocessing
from keras_alexnet.model import AlexNet

FORMATS = ("onnx", "litert")
SUFFIXES = {"onnx": ".onnx", "litert": ".tflite"}
# The packages each format needs to convert, and to check the result (`verify`).
EXTRAS = {"onnx": ("tf2onnx", "onnx"), "litert": ()}
VERIFY_EXTRAS = {"onnx": ("onnxruntime",), "litert": ("ai_edge_litert",)}
INPUT_NAME = "pixels"
OUTPUT_NAMES = ("probabilities", "classes", "scores")
PIXELS_SIGNATURE = "serving_pixels"  # the SavedModel signature these files reproduce
LITERT_SIGNATURE = "serving_default"  # the signature key inside a .tflite file
DEFAULT_OPSET = 17
TOLERANCE = 1e-4  # max |probability difference| the conversion check accepts
METADATA_KEY = "alexnet_export"
SIDECAR_VERSION = 1
# Protocol buffers (ONNX) and flatbuffers (TFLite) cannot hold 2 GiB; with room for the graph.
MAX_WEIGHT_BYTES = 2**31 - 2**26
_CHECK_SEED = 20120  # the verification pixels (seeded, so a failure reproduces)


class MissingExtraError(ImportError):
    """The optional packages of a format are not installed."""


class ConversionError(RuntimeError):
    """The converter failed, or its file disagrees with TensorFlow; nothing was written."""


def sidecar_path(path):
    """The JSON sidecar of a model file: ``alexnet.onnx`` -> ``alexnet.onnx.json``."""
    path = pathlib.Path(path)
    return path.with_name(path.name + ".json")


def mean_path(path):
    """Where a per-pixel mean image is written beside a model file (``.mean.npy``)."""
    path = pathlib.Path(path)
    return path.with_name(path.name + ".mean.npy")


def read_sidecar(path):
    """The sidecar record (a dict) of a model file written here (or of the sidecar itself)."""
    path = pathlib.Path(path)
    if path.suffix != ".json":
        path = sidecar_path(path)
    return json.loads(path.read_text())


def check_request(format, signature=PIXELS_SIGNATURE, ten_crop=False):
    """Refuses what ``format`` cannot carry.

    Raises:
        ValueError: for an unknown format, a signature other than ``serving_pixels``
            (the encoded-image ones need an image decoder neither runtime has), or
            ``ten_crop``.
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown format {format!r}; choose one of {list(FORMATS)} (or the "
                         "SavedModel: keras_alexnet.export.export_saved_model).")
    if signature != PIXELS_SIGNATURE:
        raise ValueError(
            f"The {format} file cannot carry the {signature!r} signature: it takes "
            f"preprocessed pixels (float32 [batch, S, S, 3], the SavedModel's "
            f"{PIXELS_SIGNATURE!r}), not encoded image bytes, since neither ONNX Runtime nor "
            "LiteRT decodes JPEG/PNG. Preprocess the images as the sidecar JSON says "
            "(keras_alexnet.preprocessing.eval_from_bytes), or serve the SavedModel.")
    if ten_crop:
        raise ValueError(
            f"The {format} file takes one crop per row and cannot average 10 crops itself: "
            "send the 10 crops of keras_alexnet.preprocessing.ten_crop_from_image as 10 rows "
            "and average their probabilities, or serve a --ten-crop SavedModel.")


def require_extra(format, verify=True):
    """Imports the packages ``format`` needs (to convert, and to check the file when
    ``verify``); `MissingExtraError` naming the extra to install."""
    for name in EXTRAS[format] + (VERIFY_EXTRAS[format] if verify else ()):
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise MissingExtraError(
                f"The {format} export needs the {name!r} package, which is not installed "
                f"({error}); install the extra: pip install 'keras-alexnet[{format}]'.") from None


def pixel_model(model):
    """``model`` as a plain functional Keras model (same layers and weights) with no
    empty-batch ``tf.cond``: an `AlexNet`'s graph, an `Ensemble` over its members'
    graphs, any other Keras model as it is."""
    if isinstance(model, AlexNet):
        return keras.Model(model.input, model.output, name=f"{model.name}_pixels")
    if isinstance(model, ensemble.Ensemble):
        average = next(layer for layer in model.layers
                       if isinstance(layer, ensemble.LogMeanSoftmax))
        images = keras.Input(shape=tuple(model.input_shape[1:]), name=INPUT_NAME)
        logits = average([pixel_model(member)(images) for member in model.members])
        return keras.Model(images, logits, name=f"{model.name}_pixels")
    return model


def pixel_function(model, top_k):
    """The ``tf.function`` the files hold: ``pixels`` -> ``probabilities``, ``classes``,
    ``scores`` (see the module docstring); ``model`` as `pixel_model` returns it."""
    size = int(model.input_shape[1])
    spec = tf.TensorSpec([None, size, size, 3], tf.float32, name=INPUT_NAME)

    @tf.function(input_signature=[spec])
    def serve(pixels):
        logits = tf.cast(model(pixels, training=False), tf.float32)
        probabilities = tf.nn.softmax(logits, axis=-1)
        scores, classes = tf.math.top_k(probabilities, k=top_k)
        return {"probabilities": probabilities, "classes": tf.cast(classes, tf.int32),
                "scores": scores}

    return serve


@contextlib.contextmanager
def _quiet_tf2onnx():
    """tf2onnx without its INFO log lines, and without the deep copy of the whole graph
    (weights included) it makes before each of its ~24 optimizer passes to roll back a
    failing one: the full model converts in 61 s (check included) instead of 134 s. A
    failing pass raises instead, and every file is checked numerically afterwards anyway.

    tf2onnx 1.17 (``convert.py``) turns the copies off whenever ``TF2ONNX_CATCH_ERRORS``
    is set, whatever its value: it compares the variable's name, not its value, with
    "TRUE". So "FALSE" here is only for readers; a value the user set is left alone and,
    through that bug, also turns them off."""
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.WARNING)
    variable = "TF2ONNX_CATCH_ERRORS"
    given = os.environ.get(variable)
    if given is None:
        os.environ[variable] = "FALSE"
    try:
        yield
    finally:
        logger.setLevel(level)
        if given is None:
            os.environ.pop(variable, None)


def _convert_onnx(function, opset):
    import tf2onnx

    spec = function.input_signature
    with _quiet_tf2onnx():
        proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=opset)
    return proto


def _convert_litert(function, model):
    with tempfile.TemporaryDirectory(prefix="alexnet-litert-") as staging:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(LITERT_SIGNATURE, function,
                             input_signature=list(function.input_signature))
        archive.write_out(staging, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(staging, [LITERT_SIGNATURE])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        return converter.convert()


def run_onnx(model, pixels):
    """ONNX Runtime's outputs (a dict of arrays) for ``pixels``; ``model`` is a file path
    or the serialized bytes."""
    import onnxruntime

    source = str(model) if isinstance(model, (str, pathlib.Path)) else model
    session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    values = session.run(names, {INPUT_NAME: np.asarray(pixels, np.float32)})
    return dict(zip(names, values))


def run_litert(model, pixels):
    """The LiteRT interpreter's outputs (a dict of arrays) for ``pixels`` (batch >= 1);
    ``model`` is a file path or the flatbuffer bytes."""
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(model, (str, pathlib.Path)):
        interpreter = Interpreter(model_path=str(model))
    else:
        interpreter = Interpreter(model_content=bytes(model))
    runner = interpreter.get_signature_runner(LITERT_SIGNATURE)
    return runner(**{INPUT_NAME: np.asarray(pixels, np.float32)})


def _versions(format, verify):
    """``{"converter": ..., "runtime": ...}``: the packages that made and checked a file."""
    from importlib import metadata

    def version(package):
        try:
            return f"{package} {metadata.version(package)}"
        except metadata.PackageNotFoundError:
            return package

    converter = version("tf2onnx") if format == "onnx" else f"tensorflow {tf.__version__}"
    runtime = version("onnxruntime" if format == "onnx" else "ai-edge-litert")
    return {"converter": converter, "runtime": runtime if verify else None}


def _verify(function, content, runner, size):
    """Max |difference| of probabilities and scores between TensorFlow and the file's
    runtime on seeded random pixels; `ConversionError` when above `TOLERANCE`."""
    pixels = np.random.default_rng(_CHECK_SEED).uniform(-128, 128, (2, size, size, 3))
    pixels = pixels.astype(np.float32)
    want = {k: v.numpy() for k, v in function(tf.constant(pixels)).items()}
    try:
        got = runner(content, pixels)
    except Exception as error:  # the runtime refuses the file: the conversion failed
        raise ConversionError(f"The converted file does not run: {error}") from error
    if set(got) != set(OUTPUT_NAMES):
        raise ConversionError(f"The converted file has outputs {sorted(got)}, not "
                              f"{sorted(OUTPUT_NAMES)}.")
    worst = max(float(np.abs(got[k].astype(np.float64) - want[k]).max())
                for k in ("probabilities", "scores"))
    if not worst <= TOLERANCE:
        raise ConversionError(f"The converted file's probabilities differ from TensorFlow's by "
                              f"{worst:.3g} (more than {TOLERANCE}); nothing was written.")
    return {"inputs": int(pixels.shape[0]), "pixels": f"uniform(-128, 128), seed {_CHECK_SEED}",
            "max_abs_difference": worst, "tolerance": TOLERANCE}


def check_target(path, format, overwrite):
    """The file a ``format`` export writes to, checked before anything is converted:
    ``ValueError`` for a wrong suffix or a folder, ``FileExistsError`` when the file, its
    sidecar or its mean image exists and ``overwrite`` is false. Returns it as a Path."""
    path = pathlib.Path(path)
    if path.suffix != SUFFIXES[format]:
        raise ValueError(f"The {format} file's name must end with {SUFFIXES[format]}. "
                         f"Received: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name the {SUFFIXES[format]} file to write.")
    if not overwrite:
        for existing in (path, sidecar_path(path), mean_path(path)):
            if existing.exists():
                raise FileExistsError(f"{existing} exists already; remove it, choose another "
                                      "name or pass overwrite=True (--overwrite).")
    return path


def _record(format, path, model, class_names, mean, side, top_k, source, check, extra):
    size = int(model.input_shape[1])
    per_pixel = mean.size != 3
    return {
        "sidecar_version": SIDECAR_VERSION,
        "format": format,
        "file": path.name,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [None, size, size, 3],
                  "layout": "NHWC"},
        "outputs": {
            "probabilities": {"dtype": "float32", "shape": [None, len(class_names)],
                              "meaning": "softmax over the classes"},
            "classes": {"dtype": "int32", "shape": [None, top_k],
                        "meaning": "indices into class_names, most probable first"},
            "scores": {"dtype": "float32", "shape": [None, top_k],
                       "meaning": "the probabilities of `classes`"},
        },
        **({"signature": LITERT_SIGNATURE} if format == "litert" else {}),
        "preprocessing": {
            "function": "keras_alexnet.preprocessing.eval_from_image",
            "channel_order": "RGB",
            "scale": "0-255 (the 8-bit pixel values as float32, not divided by 255)",
            "resize": side,
            "resize_rule": f"rescale the shorter side to {side} (area averaging when "
                           f"shrinking, bilinear when enlarging) and keep the central "
                           f"{side}x{side} square",
            # float32 values at their own precision (123.68, not 123.68000030517578)
            "mean": "per-pixel" if per_pixel else [float(f"{v:.7g}") for v in mean],
            **({"mean_file": mean_path(path).name, "mean_shape": list(mean.shape)}
               if per_pixel else {}),
            "mean_rule": "subtracted from the square",
            "crop": size,
            "crop_rule": f"the central {size}x{size} crop of the square",
        },
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "top_k": top_k,
        "source": source,
        "check": check,
        **extra,
        "equivalent_savedmodel_signature": PIXELS_SIGNATURE,
    }


def _write(path, content, record, mean):
    """The model file, the mean image (if per-pixel) and the sidecar, each atomically;
    the ones written are removed again if a later one fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writes = [(path, content)]
    if mean.size != 3:
        buffer = io.BytesIO()
        np.save(buffer, mean.astype(np.float32))
        writes.append((mean_path(path), buffer.getvalue()))
    writes.append((sidecar_path(path), json.dumps(record, indent=1)))
    stale_mean = mean_path(path) if mean.size == 3 else None
    done = []
    try:
        for target, data in writes:
            files.atomic_write(target, data)
            done.append(target)
    except BaseException:
        for target in done:
            target.unlink(missing_ok=True)
        raise
    if stale_mean is not None:  # an overwritten export's per-pixel mean is not this one's
        stale_mean.unlink(missing_ok=True)
    return path


def _export(format, model, path, class_names, *, mean, resize, source, overwrite, verify,
            signature, ten_crop, opset=None):
    check_request(format, signature, ten_crop)
    path = check_target(path, format, overwrite)
    require_extra(format, verify)
    class_names = [str(name) for name in class_names]
    num_outputs = int(model.output_shape[-1])
    if len(class_names) != num_outputs:
        raise ValueError(f"The model has {num_outputs} outputs but {len(class_names)} class "
                         "names were given; pass one name per class, in class-index order.")
    top_k = export.top_k_for(num_outputs)
    size = int(model.input_shape[1])
    mean = preprocessing.resolve_mean(mean, size, resize)
    side = preprocessing.resize_size(size, resize)
    weight_bytes = 4 * int(model.count_params())
    if weight_bytes > MAX_WEIGHT_BYTES:
        raise ValueError(f"The model's weights take {weight_bytes / 2**30:.2f} GiB; a {format} "
                         "file holds less than 2 GiB (protocol/flat buffer limit). Export fewer "
                         "ensemble members, or the SavedModel.")
    json.dumps(source)  # fails here, before any conversion, if not serializable
    plain = pixel_model(model)
    function = pixel_function(plain, top_k)
    try:
        if format == "onnx":
            proto = _convert_onnx(function, opset)
            content = proto.SerializeToString()
        else:
            content = _convert_litert(function, plain)
    except Exception as error:
        raise ConversionError(f"The {format} converter failed: {type(error).__name__}: "
                              f"{str(error)[:500]}") from error
    runner = run_onnx if format == "onnx" else run_litert
    check = _verify(function, content, runner, size) if verify else None
    extra = {**({"opset": opset} if format == "onnx" else {}), **_versions(format, verify)}
    record = _record(format, path, model, class_names, mean, side, top_k, source, check, extra)
    if format == "onnx":  # the record inside the file too, for users of the file alone
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(record)
        content = proto.SerializeToString()
    return _write(path, content, record, mean)


def export_onnx(model, path, class_names, *, mean=None, resize=None, source=None,
                opset=DEFAULT_OPSET, overwrite=False, verify=True,
                signature=PIXELS_SIGNATURE, ten_crop=False):
    """Writes ``model`` as an ONNX file ``path`` (``.onnx``) and its sidecar JSON.

    Args:
        model: a Keras model taking ``[batch, S, S, 3]`` preprocessed pixels and returning
            logits (an `AlexNet` of any variant, an `Ensemble`, or another Keras model).
        path: the ``.onnx`` file to write (its folders are created).
        class_names: the label of each class, in class-index order (into the sidecar).
        mean, resize: the preprocessing the weights expect, as for
            `keras_alexnet.export.export_saved_model` (default: ImageNet's channel mean,
            the paper's resize ratio); recorded in the sidecar, not applied by the file.
        source: optional JSON-serializable description of where the model came from.
        opset: the ONNX opset (17 runs on ONNX Runtime 1.14 and later).
        overwrite: replace an existing file (and sidecar) instead of refusing.
        verify: compare ONNX Runtime with TensorFlow on seeded random pixels before
            writing (needs onnxruntime).
        signature, ten_crop: only ``"serving_pixels"`` and ``False``; anything else is
            refused (see `check_request`).

    Returns:
        The ``pathlib.Path`` of the file.

    Raises:
        ValueError: for what ONNX cannot carry, a name without ``.onnx``, a class count
            that disagrees with the model, or weights over 2 GiB.
        FileExistsError: when the file or its sidecar exists and not ``overwrite``.
        MissingExtraError: without tf2onnx, onnx (and onnxruntime to verify).
        ConversionError: when tf2onnx fails or the file disagrees with TensorFlow.
    """
    return _export("onnx", model, path, class_names, mean=mean, resize=resize, source=source,
                   overwrite=overwrite, verify=verify, signature=signature, ten_crop=ten_crop,
                   opset=int(opset))


def export_litert(model, path, class_names, *, mean=None, resize=None, source=None,
                  overwrite=False, verify=True, signature=PIXELS_SIGNATURE, ten_crop=False):
    """Writes ``model`` as a LiteRT (TFLite) flatbuffer ``path`` (``.tflite``) and its sidecar.

    The file has one signature, ``serving_default``, with input ``pixels`` and outputs
    ``probabilities``, ``classes`` and ``scores`` (call it through the interpreter's
    ``get_signature_runner()``); builtin ops only; the batch size is dynamic but at
    least 1 (the interpreter refuses an empty batch). Arguments, return value and
    errors as `export_onnx` (``verify`` needs ai-edge-litert: the ``litert`` extra).
    """
    return _export("litert", model, path, class_names, mean=mean, resize=resize,
                   source=source, overwrite=overwrite, verify=verify, signature=signature,
                   ten_crop=ten_crop)


EXPORTERS = {"onnx": export_onnx, "litert": export_litert}
