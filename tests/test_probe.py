"""Linear probes: fitting, top-k errors, the folded export and ``alexnet-probe``, against
scikit-learn and hand computations."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from keras_alexnet import alexnet, datasets, export, preprocessing
from keras_alexnet.training import probe
from training import probe as probe_cli

TINY = dict(num_classes=6, image_size=67, width=0.125, seed=11, initializer="he")


def _clusters(num_classes, per_class, dim=20, seed=0, spread=0.3):
    """Gaussian clusters around far-apart centres, on unequal feature scales and offsets."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    x = centres[labels] + rng.normal(0, spread, (len(labels), dim))
    scale, offset = rng.uniform(0.1, 50, dim), rng.uniform(-100, 100, dim)
    return (x * scale + offset).astype(np.float32), labels


@pytest.mark.parametrize("kind", probe.CLASSIFIERS)
def test_separable_clusters_are_classified_without_error(kind):
    x, y = _clusters(7, 30, seed=1)
    held = np.arange(len(y)) % 3 == 0  # a third of every class
    train_x, train_y, val_x, val_y = x[~held], y[~held], x[held], y[held]
    fitted = probe.fit(train_x, train_y, 7, kind)
    assert fitted.converged
    assert probe.top_k_errors(fitted.scores(val_x), val_y) == (0.0, 0.0, 5)


def test_top_k_errors_by_hand():
    scores = np.array([[0.1, 0.5, 0.2, 0.0, 0.3, 0.9],   # rank: 5 1 4 2 0 3
                       [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # rank: 0 1 2 3 4 5 (ties: index)
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    labels = np.array([1, 5, 4])
    top1, top5, k = probe.top_k_errors(scores, labels)
    assert (top1, top5, k) == (1.0, pytest.approx(1 / 3), 5)
    assert probe.top_k_errors(scores[:, :3], np.array([1, 0, 2])) == (
        pytest.approx(1 / 3), 0.0, 3)  # fewer than 5 classes: top-k is all of them


@pytest.mark.parametrize("kind, num_classes", [("logistic", 4), ("svm", 4), ("logistic", 2),
                                               ("svm", 2)])
def test_folded_weights_equal_decision_function(kind, num_classes):
    x, y = _clusters(num_classes, 15, dim=12, seed=num_classes, spread=2.0)
    fitted = probe.fit(x, y, num_classes, kind, C=0.5)
    kernel, bias = fitted.folded()
    folded = x.astype(np.float64) @ kernel + bias
    reference = fitted.classifier.decision_function(fitted.scaler.transform(x))
    if num_classes == 2:  # one score s, as logits [-s/2, s/2]
        np.testing.assert_allclose(folded[:, 1] - folded[:, 0], reference, rtol=1e-4,
                                   atol=1e-4 * np.abs(reference).max())
        np.testing.assert_allclose(folded.sum(axis=1), 0.0, atol=1e-4)
        if kind == "logistic":
            softmax = np.exp(folded) / np.exp(folded).sum(axis=1, keepdims=True)
            np.testing.assert_allclose(softmax, fitted.classifier.predict_proba(
                fitted.scaler.transform(x)), atol=1e-5)
    else:
        np.testing.assert_allclose(folded, reference, rtol=1e-4,
                                   atol=1e-4 * np.abs(reference).max())
    np.testing.assert_allclose(fitted.scores(x), folded, rtol=1e-4, atol=1e-4)


def test_folded_deviation_flags_near_constant_features():
    x, y = _clusters(3, 10, dim=8, seed=3, spread=2.0)
    fitted = probe.fit(x, y, 3)
    assert fitted.folded_deviation(x) < 1e-5
    nearly_constant = (1000.0 + x * 1e-4).astype(np.float32)  # mu = 1e7 sigma
    assert probe.fit(nearly_constant, y, 3).folded_deviation(nearly_constant) > 1e-3


def test_fit_refuses_bad_arguments():
    x, y = _clusters(3, 4)
    with pytest.raises(ValueError, match="no training images"):
        probe.fit(x, y, 4)
    with pytest.raises(ValueError, match="classifier"):
        probe.fit(x, y, 3, "forest")
    with pytest.raises(ValueError, match="positive"):
        probe.fit(x, y, 3, C=0)


# On real photos: three classes, each the crops, flips and colour changes of one photo.


def _make_dataset(root, image_paths, per_class=6):
    rng = np.random.default_rng(0)
    for label, path in enumerate([image_paths[0], image_paths[2], image_paths[6]]):
        image = Image.open(path).convert("RGB")
        image.thumbnail((160, 160))
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            w, h = image.size
            f = rng.uniform(0.75, 0.95)
            cw, ch = int(w * f), int(h * f)
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            variant = image.crop((x, y, x + cw, y + ch))
            if i % 2:
                variant = ImageOps.mirror(variant)
            variant = ImageEnhance.Color(variant).enhance(rng.uniform(0.6, 1.4))
            variant = ImageEnhance.Brightness(variant).enhance(rng.uniform(0.8, 1.2))
            variant.save(folder / f"img_{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory, image_paths):
    """``(dataset root, data_dir, source, model)``: the folder dataset and a tiny model."""
    root = _make_dataset(tmp_path_factory.mktemp("photos") / "data", image_paths)
    data_dir = tmp_path_factory.mktemp("tfds")
    source = datasets.load(f"folder:{root}", data_dir=str(data_dir), val_split=0.34)
    return root, data_dir, source, alexnet(**TINY)


def _split(dataset):
    pairs = list(dataset.as_numpy_iterator())
    return [b for b, _ in pairs], np.array([y for _, y in pairs])


def _fc7_by_hand(model, image_bytes):
    pixels = tf.stack([preprocessing.eval_from_bytes(b, 67) for b in image_bytes])
    cut = keras.Model(model.input, model.get_layer("cross_fc7").output)
    return cut(pixels, training=False).numpy(), pixels


def test_folded_export_logits_equal_the_probe(photos, tmp_path):
    _, _, source, model = photos
    train_bytes, train_y = _split(source.train)
    val_bytes, _ = _split(source.validation)
    train_x, _ = _fc7_by_hand(model, train_bytes)
    fitted = probe.fit(train_x, train_y, 3)
    kernel, bias = fitted.folded()
    head = probe.probe_model(model, "fc7", kernel, bias)
    assert head.get_layer("probe").units == 3 and head.output_shape == (None, 3)
    version = export.export_saved_model(head, tmp_path / "probe", source.class_names,
                                        features="fc7")
    metadata = export.read_metadata(version)
    assert metadata["signatures"][-1] == "features" and metadata["features"]["dim"] == 512

    images = train_bytes + val_bytes
    x, pixels = _fc7_by_hand(model, images)
    reference = fitted.classifier.decision_function(fitted.scaler.transform(x))
    rebuilt, _ = export.load_keras_model(version)  # the export's own variables
    logits = rebuilt(pixels, training=False).numpy()
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    loaded = tf.saved_model.load(str(version))
    served = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_array_equal(served["classes"].numpy(),
                                  np.argsort(-reference, axis=1, kind="stable"))
    probabilities = loaded.signatures["serving_pixels"](pixels=pixels)["probabilities"].numpy()
    softmax = np.exp(reference - reference.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probabilities, softmax / softmax.sum(axis=1, keepdims=True),
                               atol=1e-5)
    served_features = loaded.signatures["features"](images=tf.constant(images))["features"]
    np.testing.assert_allclose(served_features.numpy(), x, rtol=1e-5, atol=1e-5)


def test_cli_end_to_end(photos, tmp_path, capsys):
    root, data_dir, source, model = photos
    keras_file = tmp_path / "tiny.keras"
    model.save(keras_file)
    summary_path = tmp_path / "probe.json"
    summary = probe_cli.main([str(keras_file), "--dataset", f"folder:{root}", "--val-split",
                              "0.34", "--data-dir", str(data_dir), "--layer", "fc7",
                              "--export", str(tmp_path / "exported"), "--json",
                              str(summary_path), "--batch-size", "5"])
    out = capsys.readouterr().out
    assert "top-1 error" in out and "top-5 error" in out and "(top-3: all classes)" in out
    assert json.loads(summary_path.read_text()) == summary
    assert (summary["num_train"], summary["num_validation"], summary["num_classes"]) == (12, 6, 3)
    assert summary["dim"] == 512 and summary["top_k"] == 3 and summary["top5_error"] == 0.0
    assert summary["export_deviation"] < 1e-4
    # Each class is one photo: its crops, flips and colour changes are told apart.
    assert summary["top1_error"] <= 1 / 6 and summary["train_top1_error"] == 0.0

    # An independent refit (scikit-learn on hand-computed fc7) ranks the classes alike.
    train_bytes, train_y = _split(source.train)
    val_bytes, val_y = _split(source.validation)
    train_x, _ = _fc7_by_hand(model, train_bytes)
    val_x, _ = _fc7_by_hand(model, val_bytes)
    scaler = StandardScaler().fit(train_x)
    sk = LogisticRegression(C=1.0, max_iter=probe.DEFAULT_MAX_ITER).fit(
        scaler.transform(train_x), train_y)
    reference = sk.decision_function(scaler.transform(val_x))
    assert summary["top1_error"] == pytest.approx(np.mean(reference.argmax(axis=1) != val_y))
    version = tmp_path / "exported" / "1"
    assert summary["export"] == str(version)
    metadata = export.read_metadata(version)
    assert metadata["class_names"] == ["class_0", "class_1", "class_2"]
    assert metadata["probe"]["layer"] == "fc7" and metadata["resize_size"] == 76
    served = tf.saved_model.load(str(version)).signatures["serving_default"](
        images=tf.constant(val_bytes))
    np.testing.assert_array_equal(served["classes"].numpy(),
                                  np.argsort(-reference, axis=1, kind="stable"))


def test_cli_errors(photos, tmp_path, capsys):
    root, data_dir, _, _ = photos
    with pytest.raises(SystemExit) as info:
        probe_cli.main([str(tmp_path / "missing"), "--dataset", f"folder:{root}",
                        "--val-split", "0.3"])
    assert info.value.code == 2 and "is not a training run" in capsys.readouterr().err
    inputs = keras.Input((67, 67, 3))
    generic = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    generic.save(tmp_path / "generic.keras")
    with pytest.raises(SystemExit) as info:
        probe_cli.main([str(tmp_path / "generic.keras"), "--dataset", f"folder:{root}",
                        "--val-split", "0.3"])
    assert info.value.code == 2 and "has no fc7 layer" in capsys.readouterr().err
