"""Versioned SavedModel export for TensorFlow Serving.

`export_saved_model` writes ``<base_dir>/<N>/`` (N = one more than the largest
existing integer version) with three signatures, and a fourth for AlexNets:

* ``serving_default``: ``images`` ``DT_STRING [batch]`` of encoded JPEG/PNG/GIF/BMP/WebP
  bytes of any size (grayscale and RGBA become RGB) -> the evaluation preprocessing of
  `keras_alexnet.preprocessing` (the same definition training and evaluation use) ->
  ``classes`` ``DT_INT32 [batch, K]``, ``scores`` ``DT_FLOAT [batch, K]`` (softmax
  probabilities, descending) and ``labels`` ``DT_STRING [batch, K]``; K is 5, or the
  number of classes when there are 2 to 4 (``top_k`` in ``assets.extra/alexnet_export.json``).
* ``serving_pixels``: ``pixels`` ``DT_FLOAT [batch, S, S, 3]`` already preprocessed
  (resized, centre-cropped, mean subtracted; S the model's input size) -> the same outputs
  plus ``probabilities`` ``DT_FLOAT [batch, num_classes]`` (the whole softmax, for
  callers that average crops, like 10-crop evaluation).
* ``classify``: ``inputs`` ``DT_STRING [batch]`` of serialized ``tf.Example`` with the
  encoded image in the bytes feature ``image/encoded`` -> ``classes`` ``DT_STRING
  [batch, 5]`` (the labels) and ``scores``, the layout TensorFlow Serving's Classify
  API expects.
* ``features``: ``images`` ``DT_STRING [batch]`` (the same checked preprocessing as
  ``serving_default``) -> ``features`` ``DT_FLOAT [batch, D]``: the activations of a
  hidden layer (`keras_alexnet.features`), by default fc7 after its ReLU (4096-d for
  the full model), the DeCAF transfer descriptor. Only models that have the layer get
  it (a generic Keras model has none); the metadata's ``features`` entry names the
  layer and D (``null`` without the signature). For an ensemble
  (`keras_alexnet.ensemble`) it is the concatenation of the members' features.

``ten_crop=True`` makes the three encoded-image signatures (``serving_default``,
``classify``, ``features``) evaluate the paper's 10 patches of every image (Sec. 4.1:
the 4 corners and the centre of the resized square, and their mirrors:
`preprocessing.ten_crop`) and average the softmax probabilities (for ``features``:
the features) over them; ``serving_pixels`` still takes one preprocessed crop per
row (send the 10 crops as 10 rows and average ``probabilities`` to do the same).
The metadata's ``ten_crop`` records the choice; the network runs 10 times per image.

Every version carries TF Serving's warm-up file ``assets.extra/tf_serving_warmup_requests``
(`keras_alexnet.warmup`: requests for each signature at batch 1 and 8, from an image the
export makes itself), which TF Serving and the embedded server replay before the version
becomes AVAILABLE; the metadata's ``warmup`` entry counts its records.

Images whose header declares more than `MAX_IMAGE_PIXELS` pixels (for a GIF: all its
frames together) are rejected before decoding (``InvalidArgumentError``), so one
request cannot exhaust a server's memory; bytes of any other format, and animated
WebP, are rejected with their own message rather than let through.
The version is written to a hidden temporary directory beside it and renamed into
place, so a server polling ``base_dir`` never sees a half-written version; its
directories and files get the modes of ordinary file creation (0755 / 0644 under umask
022), so a server running as another user can read it. The SavedModel needs neither
Keras nor this package to load.
"""

import json
import pathlib

import keras
import numpy as np
import tensorflow as tf

from keras_alexnet import faults, files, preprocessing, warmup
from keras_alexnet import features as feature_layers

TOP_K = 5
MAX_IMAGE_PIXELS = 50_000_000
METADATA_FILE = "alexnet_export.json"
_OWN_METADATA = ("class_names", "image_size", "mean", "resize_size", "signatures", "top_k",
                 "model", "features", "ten_crop", "warmup")
FEATURES_SIGNATURE = "features"
DEFAULT_FEATURES = "fc7"  # the layer of the ``features`` signature unless told otherwise
NUM_CROPS = 10  # the paper's test patches per image (``ten_crop``)


def top_k_for(num_classes):
    """How many classes the signatures return: `TOP_K`, or all of them when fewer.

    Raises:
        ValueError: for fewer than 2 classes (nothing to classify).
    """
    if num_classes < 2:
        raise ValueError(f"A classifier needs at least 2 classes; the model has {num_classes}. "
                         "Add image folders (one per class) to the dataset.")
    return min(TOP_K, num_classes)


def remove_stale_staging(base_dir):
    """Deletes the staging folders of exports into ``base_dir`` that were killed before
    their rename (their process is gone); returns the names removed."""
    return files.remove_stale_temporaries(base_dir)


def _le_uint(data, offset, length):
    """Little-endian unsigned integer of ``length`` bytes at ``offset`` of a string tensor."""
    raw = tf.io.decode_raw(tf.strings.substr(data, offset, length), tf.uint8)
    raw = tf.cast(raw, tf.int64)
    return tf.reduce_sum(raw * (256 ** tf.range(length, dtype=tf.int64)))


def _be_uint(data, offset, length):
    raw = tf.io.decode_raw(tf.strings.substr(data, offset, length), tf.uint8)
    raw = tf.cast(raw, tf.int64)
    return tf.reduce_sum(raw * (256 ** tf.range(length - 1, -1, -1, dtype=tf.int64)))


UNSUPPORTED_FORMAT = -1  # `declared_pixels` of bytes that are no format the decoder takes
ANIMATED_WEBP = -2  # `declared_pixels` of an animated WebP (the RGB decoder refuses them)


def _byte_reader(image_bytes):
    """``byte(i)``: the unsigned byte at ``i`` as int64, 0 past the end."""
    data = tf.io.decode_raw(image_bytes, tf.uint8)
    n = tf.size(data, out_type=tf.int64)

    def byte(i):
        i = tf.cast(i, tf.int64)
        inside = tf.logical_and(i >= 0, i < n)
        value = tf.gather(data, tf.clip_by_value(i, tf.constant(0, tf.int64), tf.maximum(n - 1, 0)))
        return tf.where(inside, tf.cast(value, tf.int64), tf.constant(0, tf.int64))

    return byte, n


def _gif_pixels(image_bytes):
    """Pixels the GIF decoder holds: every frame counted, each at least the logical screen.

    giflib's ``DGifSlurp`` (behind ``tf.io.decode_image``, even for the first frame
    only) decodes every frame's raster, so a small file of many large frames is a
    decompression bomb however small its first frame is. After the header and global
    colour table come blocks: an extension (0x21, a label, then sub-blocks), an image
    descriptor (0x2C, 10 bytes, a local colour table, the LZW code size, sub-blocks)
    or the trailer (0x3B); sub-blocks are a size byte and that many bytes, until a 0.
    The blocks are walked in graph (an inner loop of a few scalar ops per 255-byte
    sub-block: about 0.1 s for a 1.4 MB GIF on one core), stopping at the trailer, at
    anything else, or as soon as the count passes `MAX_IMAGE_PIXELS`. Returns the sum
    over frames of max(frame area, screen area), at least the screen area.
    """
    data = tf.io.decode_raw(image_bytes, tf.uint8)
    n = tf.size(data, out_type=tf.int32)
    padded = tf.cast(tf.concat([data, tf.zeros([16], tf.uint8)], 0), tf.int32)

    def byte(i):  # 0 past the end (the loops stop there)
        return tf.gather(padded, tf.minimum(i, n))

    def color_table(packed):
        present = tf.not_equal(tf.bitwise.bitwise_and(packed, 0x80), 0)
        return tf.where(present, 3 * tf.bitwise.left_shift(2, tf.bitwise.bitwise_and(packed, 7)),
                        0)

    def skip_sub_blocks(pos):
        pos = tf.while_loop(lambda p: tf.logical_and(p < n, tf.not_equal(byte(p), 0)),
                            lambda p: (p + byte(p) + 1,), (pos,), parallel_iterations=1)[0]
        return pos + 1

    screen = tf.cast(byte(6) + 256 * byte(7), tf.int64) * tf.cast(byte(8) + 256 * byte(9),
                                                                    tf.int64)

    def block(pos, total):
        kind = byte(pos)
        is_image = tf.equal(kind, 0x2C)
        frame = (tf.cast(byte(pos + 5) + 256 * byte(pos + 6), tf.int64)
                 * tf.cast(byte(pos + 7) + 256 * byte(pos + 8), tf.int64))
        first = tf.where(is_image, pos + 11 + color_table(byte(pos + 9)), pos + 2)
        following = tf.cond(tf.logical_or(is_image, tf.equal(kind, 0x21)),
                            lambda: skip_sub_blocks(first), lambda: n)  # trailer, junk: stop
        return following, total + tf.where(is_image, tf.maximum(frame, screen), 0)

    _, total = tf.while_loop(
        lambda pos, total: tf.logical_and(pos < n, total <= MAX_IMAGE_PIXELS),
        block,
        (13 + color_table(byte(10)), tf.constant(0, tf.int64)),
        parallel_iterations=1,
    )
    return tf.maximum(total, screen)


def _webp_pixels(image_bytes):
    """Canvas pixels of a WebP (simple lossy ``VP8 ``, lossless ``VP8L``, extended ``VP8X``)."""
    byte, _ = _byte_reader(image_bytes)
    chunk = tf.strings.substr(image_bytes, 12, 4)

    def vp8():  # key frame: 3-byte frame tag, start code 9d 01 2a, 14-bit width and height
        width = tf.bitwise.bitwise_and(byte(26) + 256 * byte(27), 0x3FFF)
        height = tf.bitwise.bitwise_and(byte(28) + 256 * byte(29), 0x3FFF)
        return width * height

    def vp8l():  # signature 0x2f, then 14 bits width - 1 and 14 bits height - 1
        bits = byte(21) + 256 * byte(22) + 65536 * byte(23) + 16777216 * byte(24)
        width = tf.bitwise.bitwise_and(bits, 0x3FFF) + 1
        height = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 14), 0x3FFF) + 1
        return width * height

    def vp8x():  # flags (bit 1: animation), 3 reserved bytes, 24-bit canvas width/height - 1
        width = byte(24) + 256 * byte(25) + 65536 * byte(26) + 1
        height = byte(27) + 256 * byte(28) + 65536 * byte(29) + 1
        animated = tf.not_equal(tf.bitwise.bitwise_and(byte(20), 0x02), 0)
        return tf.where(animated, tf.constant(ANIMATED_WEBP, tf.int64), width * height)

    return tf.case(
        [(tf.equal(chunk, b"VP8 "), vp8), (tf.equal(chunk, b"VP8L"), vp8l),
         (tf.equal(chunk, b"VP8X"), vp8x)],
        default=lambda: tf.constant(UNSUPPORTED_FORMAT, tf.int64),
        exclusive=False,
    )


def declared_pixels(image_bytes):
    """Pixels an image's header declares (JPEG, PNG, GIF, BMP, WebP): the decoder's cost.

    Reads only the headers (for a GIF, the block structure: every frame counts), so a
    decompression bomb is caught before it is decoded. Returns `UNSUPPORTED_FORMAT`
    for bytes of any other format (or too short for their header) and `ANIMATED_WEBP`
    for an animated WebP, so that nothing unrecognised bypasses the limit.
    """
    length = tf.strings.length(image_bytes)
    # The magic numbers are read from a zero-padded copy: substr past the end raises.
    head = tf.strings.substr(tf.strings.join([image_bytes, b"\0" * 16]), 0, 16)
    magic = tf.strings.substr(head, 0, 4)

    def jpeg():
        shape = tf.io.extract_jpeg_shape(image_bytes, output_type=tf.int64)
        return shape[0] * shape[1]

    def png():
        return _be_uint(image_bytes, 16, 4) * _be_uint(image_bytes, 20, 4)

    def gif():
        return _gif_pixels(image_bytes)

    def bmp():
        height = _le_uint(image_bytes, 22, 4)
        height = tf.where(height >= 2**31, 2**32 - height, height)  # top-down BMPs
        return _le_uint(image_bytes, 18, 4) * height

    def webp():
        return _webp_pixels(image_bytes)

    def unknown():
        return tf.constant(UNSUPPORTED_FORMAT, tf.int64)

    is_png = tf.logical_and(tf.equal(magic, b"\x89PNG"), length >= 24)
    is_gif = tf.logical_and(tf.equal(tf.strings.substr(head, 0, 3), b"GIF"), length >= 13)
    is_bmp = tf.logical_and(tf.equal(tf.strings.substr(head, 0, 2), b"BM"), length >= 26)
    is_webp = tf.logical_and(
        tf.logical_and(tf.equal(magic, b"RIFF"), tf.equal(tf.strings.substr(head, 8, 4), b"WEBP")),
        length >= 30)
    return tf.case(
        [
            (tf.io.is_jpeg(image_bytes), jpeg),
            (is_png, png),
            (is_gif, gif),
            (is_bmp, bmp),
            (is_webp, webp),
        ],
        default=unknown,
        exclusive=False,
    )


def _checked_image(image_bytes):
    """`preprocessing.decode_image` after the header checks (format, `MAX_IMAGE_PIXELS`)."""
    pixels = declared_pixels(image_bytes)
    checks = [
        tf.debugging.assert_none_equal(
            pixels, tf.constant(UNSUPPORTED_FORMAT, tf.int64),
            message="Unsupported image format: send JPEG, PNG, GIF, BMP or WebP bytes "
                    "(the header was not recognised, or is truncated)"),
        tf.debugging.assert_none_equal(
            pixels, tf.constant(ANIMATED_WEBP, tf.int64),
            message="Animated WebP is not supported: send a still image (e.g. its first "
                    "frame as PNG or JPEG)"),
    ]
    with tf.control_dependencies(checks):
        check = tf.debugging.assert_less_equal(
            pixels,
            tf.constant(MAX_IMAGE_PIXELS, tf.int64),
            message=f"Image too large: its header declares more than {MAX_IMAGE_PIXELS} "
                    "pixels (every frame of a GIF counts); send a smaller image",
        )
    with tf.control_dependencies([check]):
        return preprocessing.decode_image(image_bytes)


def _checked_eval_pixels(image_bytes, image_size, mean, resize=None):
    """`preprocessing.eval_from_bytes` (the centre crop) of checked bytes."""
    return preprocessing.eval_from_image(_checked_image(image_bytes), image_size, mean, resize)


def _checked_ten_crop(image_bytes, image_size, mean, resize=None):
    """`preprocessing.ten_crop_from_image` of checked bytes: ``[10, S, S, 3]``."""
    return preprocessing.ten_crop_from_image(_checked_image(image_bytes), image_size, mean,
                                             resize)


class _Endpoints:
    """The signature functions over a model, its label strings and its preprocessing."""

    def __init__(self, model, labels, mean, resize=None, extractor=None, ten_crop=False):
        self.model = model
        self.extractor = extractor  # model input -> feature layer (``features``), or None
        self.ten_crop = bool(ten_crop)  # encoded images: the mean over their 10 crops
        self.size = int(model.input_shape[1])
        self.resize = preprocessing.resize_size(self.size, resize)
        self.labels = tf.constant(labels, tf.string)
        self.num_classes = len(labels)
        self.k = top_k_for(self.num_classes)
        self.mean = tf.constant(mean, tf.float32)

    def probabilities(self, pixels):
        """The softmax of the model's logits for each row of ``pixels``."""
        # An empty batch skips the network: oneDNN's Conv2D mishandles zero-sized batches
        # (docs/scale.md). AlexNet.call guards itself; this covers any other Keras model
        # exported here.
        logits = tf.cond(
            tf.shape(pixels)[0] > 0,
            lambda: tf.cast(self.model(pixels, training=False), tf.float32),
            lambda: tf.zeros([0, self.num_classes], tf.float32),
        )
        return tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)

    def top_k(self, pixels, with_probabilities=False):
        return self.top_k_of(self.probabilities(pixels), with_probabilities)

    def top_k_of(self, probabilities, with_probabilities=False):
        scores, classes = tf.math.top_k(probabilities, k=self.k)
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
            lambda b: _checked_eval_pixels(b, self.size, self.mean, self.resize),
            images,
            fn_output_signature=tf.TensorSpec([self.size, self.size, 3], tf.float32),
        )

    def crops_from_bytes(self, images):
        """The 10 crops of each image, flattened: ``[batch * 10, S, S, 3]`` (image-major)."""
        crops = tf.map_fn(
            lambda b: _checked_ten_crop(b, self.size, self.mean, self.resize),
            images,
            fn_output_signature=tf.TensorSpec([NUM_CROPS, self.size, self.size, 3], tf.float32),
        )
        return tf.reshape(crops, [-1, self.size, self.size, 3])

    def _crop_mean(self, per_crop):
        """``[batch * 10, D]`` -> ``[batch, D]``: the mean over each image's crops."""
        return tf.reduce_mean(tf.reshape(per_crop, [-1, NUM_CROPS, per_crop.shape[-1]]), axis=1)

    def image_probabilities(self, images):
        """Probabilities of encoded images: of the centre crop, or the mean over 10 crops."""
        if self.ten_crop:
            return self._crop_mean(self.probabilities(self.crops_from_bytes(images)))
        return self.probabilities(self.pixels_from_bytes(images))

    def serve_images(self, images):
        return self.top_k_of(self.image_probabilities(images))

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

    def serve_features(self, images):
        pixels = self.crops_from_bytes(images) if self.ten_crop else self.pixels_from_bytes(images)
        dim = int(self.extractor.output_shape[-1])
        # The same empty-batch guard as `top_k`: the extractor is a plain functional model.
        features = tf.cond(
            tf.shape(pixels)[0] > 0,
            lambda: tf.cast(self.extractor(pixels, training=False), tf.float32),
            lambda: tf.zeros([0, dim], tf.float32),
        )
        features.set_shape([None, dim])
        return {"features": self._crop_mean(features) if self.ten_crop else features}

    def classify(self, inputs):
        features = tf.io.parse_example(
            inputs, {"image/encoded": tf.io.FixedLenFeature([], tf.string)}
        )
        outputs = self.top_k_of(self.image_probabilities(features["image/encoded"]))
        return {"classes": outputs["labels"], "scores": outputs["scores"]}


def model_record(model):
    """``{"class_name", "config", ...}`` of a serializable Keras model (JSON), or ``None``.

    Written into the export metadata (``"model"``) so that tools can rebuild the Keras
    architecture of an export and fill it from the SavedModel's variables.
    """
    try:
        record = keras.saving.serialize_keras_object(model)
        json.dumps(record)
    except (TypeError, ValueError, NotImplementedError):
        return None
    return record


def _features_extractor(model, layer):
    """``(extractor model, metadata entry)`` of the ``features`` signature, or ``(None, None)``.

    ``layer`` ``None`` or ``False``: none; `DEFAULT_FEATURES`: fc7 when the model has it.
    An ensemble's are its members' features side by side (`Ensemble.feature_extractor`).
    """
    if layer is None or layer is False:
        return None, None
    # A model that defines its own features (an `keras_alexnet.ensemble.Ensemble`, which
    # builds on this module, so is not imported here) says what they are.
    own = getattr(model, "feature_extractor", None)
    if callable(own):
        return own(layer, required=layer != DEFAULT_FEATURES)
    found = feature_layers.find_layer(model, layer)
    if found is None:
        if layer == DEFAULT_FEATURES:
            return None, None
        raise ValueError(f"The model has no {layer} layer for the features signature; pass "
                         f"features=None to export without one.")
    extractor = feature_layers.feature_extractor(model, layer)
    return extractor, {"layer": layer, "keras_layer": found.name,
                       "dim": int(extractor.output_shape[-1])}


def export_saved_model(model, base_dir, class_names, *, version=None, mean=None, resize=None,
                       metadata=None, features=DEFAULT_FEATURES, ten_crop=False):
    """Exports ``model`` as SavedModel version ``<base_dir>/<version>/``.

    Args:
        model: a Keras model taking ``[batch, S, S, 3]`` preprocessed pixels and
            returning logits over ``len(class_names)`` classes.
        base_dir: the model's base path (e.g. ``models/alexnet``).
        class_names: the label string of each class, in class-index order.
        version: explicit version number; defaults to one more than the largest.
        mean: the mean subtracted in preprocessing (see
            `preprocessing.resolve_mean`); defaults to ImageNet's channel mean.
        resize: the side of the square the centre crop is cut from (see
            `preprocessing.resize_size`); defaults to the paper's ratio (256 for 227).
        metadata: optional JSON-serializable entries added to the export's metadata
            file (e.g. ``{"weights": {...}}`` describing converted weights); they may
            not replace the entries the export writes itself.
        features: the layer of the ``features`` signature (`DEFAULT_FEATURES`: fc7
            when the model has it; ``None``: no such signature).
        ten_crop: whether the encoded-image signatures average over each image's 10
            crops instead of taking its centre crop (``serving_pixels`` is unchanged).

    Returns:
        The ``pathlib.Path`` of the new version directory.

    Raises:
        ValueError: if the class count disagrees with the model's outputs, the
            version exists already, or the version is not a positive integer, or the
            model lacks an explicitly requested ``features`` layer, or ``ten_crop``
            is not a bool.
    """
    class_names = [str(name) for name in class_names]
    num_outputs = int(model.output_shape[-1])
    if len(class_names) != num_outputs:
        raise ValueError(
            f"The model has {num_outputs} outputs but {len(class_names)} class names were "
            "given; pass one name per class, in class-index order."
        )
    top_k = top_k_for(num_outputs)
    if not isinstance(ten_crop, bool):
        raise ValueError(f"`ten_crop` must be True or False. Received: {ten_crop!r}")
    base = pathlib.Path(base_dir)
    if version is None:
        version = (files.list_versions(base) or [0])[-1] + 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"`version` must be a positive integer. Received: {version!r}")
    target = base / str(version)
    if target.exists():
        raise ValueError(f"Version {version} already exists at {target}; export a new version.")
    base.mkdir(parents=True, exist_ok=True)
    mean = preprocessing.resolve_mean(mean, int(model.input_shape[1]), resize)
    extractor, features_record = _features_extractor(model, features)
    if features_record is not None and ten_crop:
        features_record = {**features_record, "crops": NUM_CROPS, "crop_pooling": "mean"}
    endpoints = _Endpoints(model, class_names, mean, resize, extractor, ten_crop)
    size = endpoints.size
    extra = dict(metadata or {})
    json.dumps(extra)  # fails here, before anything is written, if not serializable
    clashes = sorted(set(extra) & set(_OWN_METADATA))
    if clashes:
        raise ValueError(f"`metadata` may not replace the export's own entries {clashes}.")

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
    signatures = ["serving_default", "serving_pixels", "classify"]
    if extractor is not None:
        archive.add_endpoint(
            FEATURES_SIGNATURE,
            endpoints.serve_features,
            input_signature=[tf.TensorSpec([None], tf.string, name="images")],
        )
        signatures.append(FEATURES_SIGNATURE)
    # A hidden name (TF Serving ignores non-numeric directories) on the same filesystem,
    # renamed into place only once complete.
    with files.staged_directory(target, tag=str(version)) as staging:
        archive.write_out(str(staging), verbose=False)
        # TF Serving's warm-up file: the server runs every signature before serving it.
        warmup_records = warmup.write_warmup_file(staging, signatures, size)
        record = {
            "class_names": class_names,
            "image_size": size,
            "mean": np.asarray(mean).tolist() if np.asarray(mean).size == 3 else "per-pixel",
            "resize_size": endpoints.resize,
            "signatures": signatures,
            "top_k": top_k,
            "model": model_record(model),
            "features": features_record,
            "ten_crop": ten_crop,
            "warmup": {"file": f"assets.extra/{warmup.WARMUP_FILE}",
                       "records": warmup_records, "batch_sizes": list(warmup.BATCH_SIZES)},
        }
        assert set(record) == set(_OWN_METADATA)
        record.update(extra)
        (staging / "assets.extra").mkdir(exist_ok=True)
        (staging / "assets.extra" / METADATA_FILE).write_text(json.dumps(record, indent=1))
        if np.asarray(mean).size != 3:  # the per-pixel mean image, for offline evaluation
            np.save(staging / "assets.extra" / "mean.npy", np.asarray(mean, np.float32))
        faults.crash_point("export")
    return target


def read_metadata(version_dir):
    """The ``assets.extra/alexnet_export.json`` record of an export version (a dict).

    Raises:
        ValueError: if ``version_dir`` is not a SavedModel version written by
            `export_saved_model` (no ``saved_model.pb`` or no metadata file).
    """
    version_dir = pathlib.Path(version_dir)
    path = version_dir / "assets.extra" / METADATA_FILE
    if not (version_dir / "saved_model.pb").is_file() or not path.is_file():
        raise ValueError(
            f"{version_dir} is not an export version of this package (it needs saved_model.pb "
            f"and assets.extra/{METADATA_FILE}); pass a version directory such as "
            "models/alexnet/1.")
    return json.loads(path.read_text())


def load_keras_model(version_dir):
    """Rebuilds the Keras model of an export version and fills it with its weights.

    The architecture comes from the metadata's ``"model"`` record (`model_record`), the
    weights from the SavedModel's variables, matched by name (``conv1_a/kernel``) and
    checked for shape, so the result computes exactly what the export serves. Returns
    ``(model, metadata)``; the metadata's mean, ``image_size`` and ``resize_size`` are the
    preprocessing the model expects (`preprocessing.eval_from_image`). An ensemble export
    rebuilds only once `keras_alexnet.ensemble` is imported (it registers `Ensemble`;
    `keras_alexnet.training.model_source.load_keras` does it).

    Raises:
        ValueError: if the export holds no model record (a model that was not
            serializable), or its variables do not match the rebuilt architecture.
    """
    metadata = read_metadata(version_dir)
    if not metadata.get("model"):
        raise ValueError(f"The export {version_dir} records no Keras architecture (its model was "
                         "not serializable); load it with tf.saved_model.load instead.")
    from keras_alexnet import model as _  # noqa: F401 (registers AlexNet and its layers)

    model = keras.saving.deserialize_keras_object(metadata["model"])
    # Dropout's RNG states are skipped on both sides: they are not weights, and their
    # names depend on how many models the process has built.
    saved = {v.name.rsplit(":", 1)[0]: v for v in tf.saved_model.load(str(version_dir)).variables
             if "seed_generator" not in v.name}
    for variable in model.variables:
        if "seed_generator" in variable.path:  # dropout's RNG state: not part of an export
            continue
        source = saved.pop(variable.path, None)
        if source is None or tuple(source.shape) != tuple(variable.shape):
            raise ValueError(
                f"The export {version_dir} does not match its recorded architecture at "
                f"{variable.path} (shape {tuple(variable.shape)}); re-export the model.")
        variable.assign(source)
    if saved:
        raise ValueError(f"The export {version_dir} holds variables its recorded architecture "
                         f"lacks: {sorted(saved)[:5]}; re-export the model.")
    if metadata["mean"] == "per-pixel":
        metadata["mean"] = np.load(pathlib.Path(version_dir) / "assets.extra" / "mean.npy")
    return model, metadata
