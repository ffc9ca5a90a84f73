"""TensorFlow Serving warm-up requests for an export: ``assets.extra/tf_serving_warmup_requests``.

TensorFlow Serving (and the embedded server, `serving.server.make_warmup`) replays this
file when it loads a version, before marking the version AVAILABLE, so that the first
client request does not pay for the first run of each signature: graph optimisation,
kernel selection, memory allocation (tensorflow_serving/g3doc/saved_model_warmup.md).

The file is a TFRecord of serialised ``tensorflow.serving.PredictionLog`` messages, at
most `MAX_RECORDS`. Each record holds one request and no response, and names no model
(the server ignores the name). For every signature of the export there are requests at
each of `BATCH_SIZES`:

* ``serving_default`` and ``features``: Predict with JPEG images the export makes
  itself, a colour gradient at an odd size, so the decode, resize and crop run;
* ``serving_pixels``: Predict with zero pixels of the model's input size;
* ``classify``: Classify with ``tf.Example``\\ s holding the same JPEG.
"""

import numpy as np

WARMUP_FILE = "tf_serving_warmup_requests"  # under assets.extra/
MAX_RECORDS = 1000  # TF Serving refuses more
BATCH_SIZES = (1, 8)
_IMAGE_SHAPE = (200, 300)  # not square, not the crop size: every preprocessing step runs


def sample_jpeg():
    """A 200x300 RGB gradient encoded as JPEG (bytes), made here rather than read."""
    import tensorflow as tf

    rows, cols = _IMAGE_SHAPE
    y, x = np.mgrid[0:rows, 0:cols]
    image = np.stack([255 * x / (cols - 1), 255 * y / (rows - 1),
                      np.full_like(x, 128, dtype=np.float64)], axis=-1)
    return tf.io.encode_jpeg(image.astype(np.uint8), quality=90).numpy()


def warmup_logs(signatures, image_size, batch_sizes=BATCH_SIZES):
    """The ``PredictionLog`` messages for an export with ``signatures`` (names) and input
    side ``image_size``."""
    import tensorflow as tf
    from tensorflow_serving.apis import (
        classification_pb2,
        input_pb2,
        predict_pb2,
        prediction_log_pb2,
    )

    jpeg = sample_jpeg()
    logs = []
    for batch in batch_sizes:
        for name in signatures:
            if name == "classify":
                request = classification_pb2.ClassificationRequest()
                request.model_spec.signature_name = name
                example = tf.train.Example(features=tf.train.Features(feature={
                    "image/encoded": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[jpeg]))}))
                request.input.CopyFrom(input_pb2.Input(
                    example_list=input_pb2.ExampleList(examples=[example] * batch)))
                logs.append(prediction_log_pb2.PredictionLog(
                    classify_log=prediction_log_pb2.ClassifyLog(request=request)))
                continue
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = name
            if name == "serving_pixels":
                pixels = np.zeros((batch, image_size, image_size, 3), np.float32)
                request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
            else:  # serving_default, features: encoded images
                request.inputs["images"].CopyFrom(
                    tf.make_tensor_proto([jpeg] * batch, dtype=tf.string))
            logs.append(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)))
    if len(logs) > MAX_RECORDS:
        raise ValueError(f"{len(logs)} warm-up records exceed TF Serving's {MAX_RECORDS}.")
    return logs


def write_warmup_file(version_dir, signatures, image_size, batch_sizes=BATCH_SIZES):
    """Writes ``<version_dir>/assets.extra/tf_serving_warmup_requests``; returns the
    number of records. Called on the staging folder of an export, so the version
    appears with its warm-up file or not at all."""
    import pathlib

    import tensorflow as tf

    path = pathlib.Path(version_dir) / "assets.extra" / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    logs = warmup_logs(signatures, image_size, batch_sizes)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for log in logs:
            writer.write(log.SerializeToString())
    return len(logs)
