"""Versioned SavedModel export for TensorFlow Serving.

`export_saved_model` writes ``<base_dir>/<N>/`` (N = one more than the largest
existing integer version) with three signatures:

* ``serving_default``: ``images`` ``DT_STRING [batch]`` of encoded JPEG/PNG/GIF/BMP
  bytes of any size (grayscale and RGBA become RGB) -> the evaluation preprocessing of
  `keras_alexnet.preprocessing` (the same definition training and evaluation use) ->
  ``classes`` ``DT_INT32 [batch, 5]``, ``scores`` ``DT_FLOAT [batch, 5]`` (softmax
  probabilities, descending) and ``labels`` ``DT_STRING [batch, 5]``.
* ``serving_pixels``: ``pixels`` ``DT_FLOAT [batch, S, S, 3]`` already preprocessed
  (resized, centre-cropped, mean subtracted; S the model's input size) -> the same outputs
  plus ``probabilities`` ``DT_FLOAT [batch, num_classes]`` (the whole softmax, for
  callers that average crops, like 10-crop evaluation).
* ``classify``: ``inputs`` ``DT_STRING [batch]`` of serialized ``tf.Example`` with the
  encoded image in the bytes feature ``image/encoded`` -> ``classes`` ``DT_STRING
  [batch, 5]`` (the labels) and ``scores``, the layout TensorFlow Serving's Classify
  API expects.

Images whose header declares more than `MAX_IMAGE_PIXELS` pixels are rejected before
decoding (``InvalidArgumentError``), so one request cannot exhaust a server's memory.
The version is written to a hidden temporary directory beside it and renamed into
place, so a server polling ``base_dir`` never sees a half-written version. The
SavedModel needs neither Keras nor this package to load.
"""

import json
import os
import pathlib
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_alexnet import preprocessing

TOP_K = 5
MAX_IMAGE_PIXELS = 50_000_000
METADATA_FILE = "alexnet_export.json"


def _le_uint(data, offset, length):
    """Little-endian unsigned integer of ``length`` bytes at ``offset`` of a string tensor."""
    raw = tf.io.decode_raw(tf.strings.substr(data, offset, length), tf.uint8)
    raw = tf.cast(raw, tf.int64)
    return tf.reduce_sum(raw * (256 ** tf.range(length, dtype=tf.int64)))


def _be_uint(data, offset, length):
    raw = tf.io.decode_raw(tf.strings.substr(data, offset, length), tf.uint8)
    raw = tf.cast(raw, tf.int64)
    return tf.reduce_sum(raw * (256 ** tf.range(length - 1, -1, -1, dtype=tf.int64)))


def declared_pixels(image_bytes):
    """Pixel count declared by an image header (JPEG, PNG, GIF, BMP); 0 if unknown.

    Reads only the header, so a decompression bomb is caught before it is decoded.
    """
    length = tf.strings.length(image_bytes)
    magic = tf.strings.substr(image_bytes, 0, 4)

    def jpeg():
        shape = tf.io.extract_jpeg_shape(image_bytes, output_type=tf.int64)
        return shape[0] * shape[1]

    def png():
        return _be_uint(image_bytes, 16, 4) * _be_uint(image_bytes, 20, 4)

    def gif():
        return _le_uint(image_bytes, 6, 2) * _le_uint(image_bytes, 8, 2)

    def bmp():
        height = _le_uint(image_bytes, 22, 4)
        height = tf.where(height >= 2**31, 2**32 - height, height)  # top-down BMPs
        return _le_uint(image_bytes, 18, 4) * height

    def unknown():
        return tf.constant(0, tf.int64)

    is_png = tf.logical_and(tf.equal(magic, b"\x89PNG"), length >= 24)
    is_gif = tf.logical_and(tf.equal(tf.strings.substr(image_bytes, 0, 3), b"GIF"), length >= 10)
    is_bmp = tf.logical_and(tf.equal(tf.strings.substr(image_bytes, 0, 2), b"BM"), length >= 26)
    return tf.case(
        [
            (tf.io.is_jpeg(image_bytes), jpeg),
            (is_png, png),
            (is_gif, gif),
            (is_bmp, bmp),
        ],
        default=unknown,
        exclusive=False,
    )


def _checked_eval_pixels(image_bytes, image_size, mean):
    pixels = declared_pixels(image_bytes)
    check = tf.debugging.assert_less_equal(
        pixels,
        tf.constant(MAX_IMAGE_PIXELS, tf.int64),
        message=f"Image too large: its header declares more than {MAX_IMAGE_PIXELS} pixels",
    )
    with tf.control_dependencies([check]):
        return preprocessing.eval_from_bytes(image_bytes, image_size, mean)


class _Endpoints:
    """The signature functions over a model, its label strings and its preprocessing."""

    def __init__(self, model, labels, mean):
        self.model = model
        self.size = int(model.input_shape[1])
        self.labels = tf.constant(labels, tf.string)
        self.num_classes = len(labels)
        self.mean = tf.constant(mean, tf.float32)

    def top_k(self, pixels, with_probabilities=False):
        # An empty batch skips the network: oneDNN's fused convolutions reject zero-sized
        # batches ("input depth must be evenly divisible by filter depth").
        logits = tf.cond(
            tf.shape(pixels)[0] > 0,
            lambda: tf.cast(self.model(pixels, training=False), tf.float32),
            lambda: tf.zeros([0, self.num_classes], tf.float32),
        )
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        scores, classes = tf.math.top_k(probabilities, k=TOP_K)
        outputs = {
            "classes": tf.cast(classes, tf.int32),
            "scores": scores,
            "labels": tf.gather(self.labels, classes),
        }
        if with_probabilities:
            outputs["probabilities"] = probabilities
        return outputs

    def pixels_from_bytes(self, images):
        return tf.map_fn(
            lambda b: _checked_eval_pixels(b, self.size, self.mean),
            images,
            fn_output_signature=tf.TensorSpec([self.size, self.size, 3], tf.float32),
        )

    def serve_images(self, images):
        return self.top_k(self.pixels_from_bytes(images))

    def serve_pixels(self, pixels):
        # Checked here rather than left to the convolution kernels: some CPU kernels
        # (oneDNN) abort the whole process on a wrongly sized input instead of raising.
        check = tf.debugging.assert_equal(
            tf.shape(pixels)[1:],
            tf.constant([self.size, self.size, 3]),
            message=f"pixels must have shape [batch, {self.size}, {self.size}, 3]",
        )
        with tf.control_dependencies([check]):
            pixels = tf.identity(pixels)
        return self.top_k(pixels, with_probabilities=True)

    def classify(self, inputs):
        features = tf.io.parse_example(
            inputs, {"image/encoded": tf.io.FixedLenFeature([], tf.string)}
        )
        outputs = self.top_k(self.pixels_from_bytes(features["image/encoded"]))
        return {"classes": outputs["labels"], "scores": outputs["scores"]}


def existing_versions(base_dir):
    """Sorted integer version numbers present under ``base_dir``."""
    base = pathlib.Path(base_dir)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def export_saved_model(model, base_dir, class_names, *, version=None, mean=None):
    """Exports ``model`` as SavedModel version ``<base_dir>/<version>/``.

    Args:
        model: a Keras model taking ``[batch, S, S, 3]`` preprocessed pixels and
            returning logits over ``len(class_names)`` classes.
        base_dir: the model's base path (e.g. ``models/alexnet``).
        class_names: the label string of each class, in class-index order.
        version: explicit version number; defaults to one more than the largest.
        mean: the mean subtracted in preprocessing (see
            `preprocessing.resolve_mean`); defaults to ImageNet's channel mean.

    Returns:
        The ``pathlib.Path`` of the new version directory.

    Raises:
        ValueError: if the class count disagrees with the model's outputs, the
            version exists already, or the version is not a positive integer.
    """
    class_names = [str(name) for name in class_names]
    num_outputs = int(model.output_shape[-1])
    if len(class_names) != num_outputs:
        raise ValueError(
            f"The model has {num_outputs} outputs but {len(class_names)} class names were "
            "given; pass one name per class, in class-index order."
        )
    if num_outputs < TOP_K:
        raise ValueError(f"Export returns the top {TOP_K}; the model has only {num_outputs} classes.")
    base = pathlib.Path(base_dir)
    if version is None:
        version = (existing_versions(base) or [0])[-1] + 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"`version` must be a positive integer. Received: {version!r}")
    target = base / str(version)
    if target.exists():
        raise ValueError(f"Version {version} already exists at {target}; export a new version.")
    base.mkdir(parents=True, exist_ok=True)
    mean = preprocessing.resolve_mean(mean, int(model.input_shape[1]))
    endpoints = _Endpoints(model, class_names, mean)
    size = endpoints.size

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        endpoints.serve_images,
        input_signature=[tf.TensorSpec([None], tf.string, name="images")],
    )
    archive.add_endpoint(
        "serving_pixels",
        endpoints.serve_pixels,
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")],
    )
    archive.add_endpoint(
        "classify",
        endpoints.classify,
        input_signature=[tf.TensorSpec([None], tf.string, name="inputs")],
    )
    # A hidden name (TF Serving ignores non-numeric directories) on the same filesystem,
    # renamed into place only once complete.
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=base))
    try:
        archive.write_out(str(staging), verbose=False)
        metadata = {
            "class_names": class_names,
            "image_size": size,
            "mean": np.asarray(mean).tolist() if np.asarray(mean).size == 3 else "per-pixel",
            "signatures": ["serving_default", "serving_pixels", "classify"],
            "top_k": TOP_K,
        }
        (staging / "assets.extra").mkdir(exist_ok=True)
        (staging / "assets.extra" / METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        if np.asarray(mean).size != 3:  # the per-pixel mean image, for offline evaluation
            np.save(staging / "assets.extra" / "mean.npy", np.asarray(mean, np.float32))
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
