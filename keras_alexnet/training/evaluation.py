"""Top-1 / top-5 error for a centre crop and for the paper's 10 crops, and per class.

Sec. 4.1: at test time the network "extracts five 224x224 patches (the four corner
patches and the center patch) as well as their horizontal reflections (hence ten
patches in all), and averag[es] the predictions made by the network's softmax layer on
the ten patches". Each image is decoded once, rescaled and mean-subtracted by the
shared preprocessing (`preprocessing.ten_crop_from_image`); patch 0 of the ten is the
centre crop, so one pass gives both rows of the paper's tables.

A *predictor* maps ``float32 [N, S, S, 3]`` preprocessed pixels to softmax
probabilities ``[N, num_classes]``: `keras_predictor` for a Keras model and
`saved_model_predictor` for an exported SavedModel (its ``serving_pixels`` signature).
"""

import csv
import dataclasses
import io
import json
import pathlib
import time
import warnings

import numpy as np
import tensorflow as tf

from keras_alexnet import files, paper, preprocessing
from keras_alexnet.training import input_pipeline

NUM_CROPS = 10


def ten_crop_dataset(validation, batch_size, *, image_size=paper.IMAGE_SIZE,
                     mean=paper.IMAGENET_MEAN_RGB, resize=None):
    """Batches of ``(crops [B, 10, S, S, 3], labels [B])`` in the source's order; the
    crops are cut from a ``resize`` square (``None``: the paper's ratio)."""
    mean = tf.constant(mean, tf.float32)

    def prepare(image_bytes, label):
        image = preprocessing.decode_image(image_bytes)
        return preprocessing.ten_crop_from_image(image, image_size, mean, resize=resize), label

    ds = validation.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def keras_predictor(model):
    """Softmax probabilities of a Keras model that returns logits."""

    @tf.function(reduce_retracing=True)
    def predict(pixels):
        return tf.nn.softmax(tf.cast(model(pixels, training=False), tf.float32), axis=-1)

    return predict


def saved_model_predictor(loaded, num_classes):
    """Probabilities from an exported SavedModel's ``serving_pixels`` signature.

    Uses its ``probabilities`` output when it has one. Otherwise only the top-5
    ``classes`` and ``scores`` are available: the other classes count as 0, which
    leaves every single-crop top-1/top-5 result exact and can only change a 10-crop
    result where a class outside one crop's top 5 matters to the average.
    """
    signature = loaded.signatures["serving_pixels"]
    has_probabilities = "probabilities" in signature.structured_outputs
    if not has_probabilities:
        warnings.warn(
            "The SavedModel's serving_pixels signature returns only the top-5 scores; "
            "10-crop averages treat the other classes' probabilities as 0.",
            stacklevel=2,
        )

    def predict(pixels):
        outputs = signature(pixels=tf.convert_to_tensor(pixels, tf.float32))
        if has_probabilities:
            return outputs["probabilities"]
        classes = tf.cast(outputs["classes"], tf.int64)
        rows = tf.repeat(tf.range(tf.shape(classes, out_type=tf.int64)[0]), tf.shape(classes)[1])
        indices = tf.stack([rows, tf.reshape(classes, [-1])], axis=1)
        shape = tf.stack([tf.shape(classes, out_type=tf.int64)[0], num_classes])
        return tf.scatter_nd(indices, tf.reshape(outputs["scores"], [-1]), shape)

    return predict


def saved_model_input_size(loaded):
    """The pixel size ``S`` of a SavedModel's ``serving_pixels`` input."""
    spec = loaded.signatures["serving_pixels"].structured_input_signature[1]["pixels"]
    return int(spec.shape[1])


def saved_model_metadata(path):
    """The export metadata (``class_names``, ``image_size``, ``mean``, ``resize_size``)
    or ``{}``."""
    meta = pathlib.Path(path) / "assets.extra" / "alexnet_export.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


@dataclasses.dataclass
class EvaluationResult:
    """Errors are fractions in [0, 1]; per-class arrays have one entry per class.

    ``correct`` maps ``"centre_top1"``, ``"centre_top5"``, ``"ten_crop_top1"`` and
    ``"ten_crop_top5"`` to per-class counts of correctly classified images.
    """

    num_images: int
    counts: np.ndarray
    correct: dict
    seconds: float

    def error(self, key):
        return 1.0 - float(self.correct[key].sum()) / max(self.num_images, 1)

    def summary(self):
        return {
            "images": self.num_images,
            **{f"{key}_error": self.error(key) for key in self.correct},
            "seconds": self.seconds,
        }

    def table(self):
        """The result laid out like the paper's Tables 1 and 2."""
        lines = [f"{'':14}{'top-1 error':>13}{'top-5 error':>13}   ({self.num_images} images)"]
        for label, key in (("centre crop", "centre"), ("10 crops", "ten_crop")):
            lines.append(f"{label:14}{self.error(key + '_top1'):>13.2%}"
                         f"{self.error(key + '_top5'):>13.2%}")
        return "\n".join(lines)


def _hits(probabilities, labels, k):
    top = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1)


def evaluate(predict, validation, num_classes, *, image_size=paper.IMAGE_SIZE,
             mean=paper.IMAGENET_MEAN_RGB, batch_size=16, limit=None, log_every=0,
             resize=None):
    """Centre-crop and 10-crop top-1/top-5 results of ``predict`` on a source split.

    Args:
        predict: pixels ``[N, S, S, 3]`` -> probabilities ``[N, num_classes]``.
        validation: ``tf.data.Dataset`` of ``(encoded bytes, label)``.
        num_classes: number of classes (length of the per-class arrays).
        image_size, mean: the model's input size and the mean it was trained with.
        resize: side of the square the crops are cut from (``None``: the paper's
            ratio; an export's ``resize_size``, a run's ``config.resize``).
        batch_size: images per step (each becomes 10 crops).
        limit: evaluate only the first ``limit`` images.
        log_every: print progress every this many images (0: never).
    """
    if limit:
        validation = validation.take(limit)
    ds = ten_crop_dataset(validation, batch_size, image_size=image_size, mean=mean,
                          resize=resize)
    counts = np.zeros(num_classes, np.int64)
    correct = {key: np.zeros(num_classes, np.int64)
               for key in ("centre_top1", "centre_top5", "ten_crop_top1", "ten_crop_top5")}
    start = time.time()
    seen = 0
    for crops, labels in ds.as_numpy_iterator():
        n = len(labels)
        flat = crops.reshape((n * NUM_CROPS,) + crops.shape[2:])
        probs = np.asarray(predict(flat), np.float64).reshape(n, NUM_CROPS, num_classes)
        centre, averaged = probs[:, 0], probs.mean(axis=1)
        labels = labels.astype(np.int64)
        np.add.at(counts, labels, 1)
        for key, p, k in (("centre_top1", centre, 1), ("centre_top5", centre, 5),
                          ("ten_crop_top1", averaged, 1), ("ten_crop_top5", averaged, 5)):
            np.add.at(correct[key], labels, _hits(p, labels, k).astype(np.int64))
        seen += n
        if log_every and seen // log_every != (seen - n) // log_every:
            print(f"evaluated {seen} images ({seen / (time.time() - start):.1f} img/s)")
    return EvaluationResult(int(counts.sum()), counts, correct, time.time() - start)


def predict_split(predict, validation, *, image_size=paper.IMAGE_SIZE,
                  mean=paper.IMAGENET_MEAN_RGB, resize=None, batch_size=64):
    """``(probabilities [N, C] float64, labels [N] int64)`` of ``predict`` on the centre
    crops of a split, in the split's order (for ensembles: average members' rows)."""
    probabilities, labels = [], []
    ds = input_pipeline.evaluation_dataset(validation, batch_size, image_size=image_size,
                                           mean=mean, resize=resize)
    for pixels, batch_labels in ds.as_numpy_iterator():
        probabilities.append(np.asarray(predict(pixels), np.float64))
        labels.append(batch_labels.astype(np.int64))
    if not labels:
        raise ValueError("The split is empty: nothing to predict.")
    return np.concatenate(probabilities), np.concatenate(labels)


def write_per_class_csv(result, path, class_names, display_names=None):
    """One row per class: its images and the four accuracies (empty if it has no images).

    Written atomically: an interrupted evaluation leaves the previous file, never half
    of one.
    """
    display_names = display_names or class_names
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(result.correct)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["class_index", "class_name", "display_name", "images"]
                    + [f"{key}_accuracy" for key in keys])
    for i, name in enumerate(class_names):
        n = int(result.counts[i])
        accuracies = [f"{result.correct[key][i] / n:.6f}" if n else "" for key in keys]
        writer.writerow([i, name, display_names[i], n] + accuracies)
    files.atomic_write(path, text.getvalue())
    return path
