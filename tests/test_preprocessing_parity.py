"""One preprocessing definition: export signature, evaluation and training give the same pixels.

For the same real JPEGs, the reference pixels are `preprocessing.eval_from_bytes`. The
evaluation path (`evaluation.ten_crop_dataset`, patch 0, and
`input_pipeline.evaluation_dataset`) and the training path with augmentation off
(`input_pipeline.training_dataset(augment=False)`) must produce them; with augmentation
on but PCA noise off, every training crop must be a window (possibly mirrored) of the
same mean-subtracted square. The exported SavedModel's pixels are not an output, so the
test exports a random *linear* model: its ``serving_default`` (encoded bytes in) must
give the same top-5 scores as ``serving_pixels`` fed the reference pixels and as NumPy's
softmax of the same projection, to 1e-5; the test checks that one grey level of
difference in a single pixel moves a score by more than that.
"""

import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_alexnet import export, preprocessing
from keras_alexnet.training import evaluation, input_pipeline

DATA = pathlib.Path(__file__).parent / "data"
FILES = sorted((DATA / "images").iterdir()) + [DATA / "edge" / "hopper_gray.jpg",
                                                DATA / "edge" / "pil_sample_cmyk.jpg"]
SIZE = 67
MEAN = np.array([120.0, 110.0, 100.0], np.float32)
NUM_CLASSES = 8


@pytest.fixture(scope="module")
def encoded():
    return [f.read_bytes() for f in FILES]


@pytest.fixture(scope="module")
def reference(encoded):
    return np.stack([preprocessing.eval_from_bytes(b, SIZE, MEAN).numpy() for b in encoded])


def _source(encoded):
    return tf.data.Dataset.from_tensor_slices((encoded, np.arange(len(encoded), dtype=np.int64)))


def test_evaluation_paths_give_the_reference_pixels(encoded, reference):
    ds = evaluation.ten_crop_dataset(_source(encoded), 4, image_size=SIZE, mean=MEAN)
    centre = np.concatenate([crops[:, 0] for crops, _ in ds.as_numpy_iterator()])
    np.testing.assert_allclose(centre, reference, atol=1e-4)
    ds = input_pipeline.evaluation_dataset(_source(encoded), 4, image_size=SIZE, mean=MEAN)
    pixels = np.concatenate([x for x, _ in ds.as_numpy_iterator()])
    np.testing.assert_allclose(pixels, reference, atol=1e-4)


def test_training_path_gives_the_same_pixels(encoded, reference):
    n = len(encoded)
    ds = input_pipeline.training_dataset(_source(encoded), n, image_size=SIZE, mean=MEAN,
                                         augment=False, seed=3)
    pixels, labels = next(iter(ds))
    np.testing.assert_allclose(pixels.numpy()[np.argsort(labels.numpy())], reference, atol=1e-4)

    # Augmentation on, colour noise off: each crop is a window of the same square.
    side = preprocessing.resize_size(SIZE)
    ds = input_pipeline.training_dataset(_source(encoded), n, image_size=SIZE, mean=MEAN,
                                         pca_std=0.0, seed=3)
    pixels, labels = next(iter(ds))
    for crop, label in zip(pixels.numpy(), labels.numpy()):
        square = preprocessing.subtract_mean(preprocessing.resize_to_square(
            preprocessing.decode_image(encoded[label]), side), MEAN).numpy()
        windows = [square[top:top + SIZE, left:left + SIZE] for top in range(side - SIZE + 1)
                   for left in range(side - SIZE + 1)]
        best = min(min(np.abs(w - crop).max(), np.abs(w[:, ::-1] - crop).max()) for w in windows)
        assert best < 1e-3, FILES[label].name


@pytest.mark.slow
def test_exported_signature_gives_the_same_pixels(encoded, reference, tmp_path):
    rng = np.random.default_rng(0)
    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        keras.layers.Flatten(),
        keras.layers.Dense(NUM_CLASSES, use_bias=False),
    ])
    weights = rng.normal(0, 1e-4, (SIZE * SIZE * 3, NUM_CLASSES)).astype(np.float32)
    model.layers[-1].set_weights([weights])
    path = export.export_saved_model(model, tmp_path / "m", [f"c{i}" for i in range(NUM_CLASSES)],
                                     mean=MEAN)
    loaded = tf.saved_model.load(str(path))
    from_bytes = loaded.signatures["serving_default"](images=tf.constant(encoded))
    from_pixels = loaded.signatures["serving_pixels"](pixels=tf.constant(reference))
    np.testing.assert_array_equal(from_bytes["classes"], from_pixels["classes"])
    np.testing.assert_allclose(from_bytes["scores"], from_pixels["scores"], atol=1e-5)

    logits = reference.reshape(len(encoded), -1).astype(np.float64) @ weights
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1)[:, :5]
    np.testing.assert_array_equal(from_bytes["classes"], top)
    np.testing.assert_allclose(from_bytes["scores"], np.take_along_axis(probs, top, 1), atol=1e-5)
    # The sensitivity claimed above: one grey level in one pixel is visible.
    nudged = reference.copy()
    nudged[:, 30, 30, 0] += 1.0
    moved = loaded.signatures["serving_pixels"](pixels=tf.constant(nudged))["scores"]
    assert np.abs(moved.numpy() - from_pixels["scores"].numpy()).max() > 1e-5


def _box_matrix(n_in, n_out):
    """Row i averages source pixels [i * f, (i + 1) * f), f = n_in / n_out, by overlap."""
    f = n_in / n_out
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo, hi = i * f, (i + 1) * f
        for j in range(int(lo), min(int(np.ceil(hi)), n_in)):
            weights[i, j] = max(0.0, min(hi, j + 1) - max(lo, j)) / f
    return weights


def test_rescale_rule_matches_an_independent_box_filter_reference():
    """`resize_to_square` = the source's central square, area-averaged (NumPy reference)."""
    for name in ("n02129604_20374_tiger.jpg", "n01748264_Indian_cobra.JPEG"):  # 420x248, 220x530
        image = preprocessing.decode_image((DATA / "images" / name).read_bytes())
        pixels = image.numpy().astype(np.float64)
        h, w, _ = pixels.shape
        s = min(h, w)
        square = pixels[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        side = 200  # below either shorter side: a shrink
        weights = _box_matrix(s, side)
        want = np.stack([weights @ square[..., c] @ weights.T for c in range(3)], axis=-1)
        got = preprocessing.resize_to_square(image, side).numpy()
        np.testing.assert_allclose(got, want, atol=0.01, err_msg=name)
    # Antialiasing: one-pixel stripes shrunk 4x become flat grey, not a moire of stripes.
    stripes = np.zeros((1024, 1024, 3), np.uint8)
    stripes[:, ::2] = 255
    out = preprocessing.resize_to_square(tf.constant(stripes), 256).numpy()
    np.testing.assert_allclose(out, 127.5, atol=0.5)
