"""Feature extraction: the export's ``features`` signature, `keras_alexnet.features` and
``alexnet-features``, against the Keras model's own intermediate layers."""

import json
import shutil
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_alexnet import alexnet, export, features, preprocessing
from training import features as features_cli

# Float32 sums in another order, not another computation: a batch of 3 and one of 8 block
# their matrix products differently (1.7e-5 on fc activations of about 50 on an AVX2-only
# CPU, where the kernels differ from AVX-512's).
TOL = 1e-4

CLASS_NAMES = [f"class_{i}" for i in range(6)]
TINY = dict(num_classes=6, image_size=67, width=0.125, initializer="he")
# Per layout: the variant, the Keras layer of each feature layer.
LAYOUTS = {
    "two_towers": ("krizhevsky2012", {"fc7": "cross_fc7", "fc6": "cross_fc6",
                                      "pool5": "cross6"}),
    "one_tower": ("single_tower", {"fc7": "fc7", "fc6": "fc6", "pool5": "flatten"}),
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request, tmp_path_factory):
    """``(name, model, version dir, keras layer names)`` of a tiny model of each layout."""
    variant, names = LAYOUTS[request.param]
    # "he" weights and zero biases: about half of the fc7 units are negative before ReLU.
    model = alexnet(variant, seed=7, **TINY)
    version = export.export_saved_model(model, tmp_path_factory.mktemp(request.param) / "m",
                                        CLASS_NAMES)
    return request.param, model, version, names


def _pixels(image_bytes, size=67):
    return tf.stack([preprocessing.eval_from_bytes(b, size) for b in image_bytes])


def _by_hand(model, keras_layer, image_bytes):
    """The Keras model's intermediate output on the shared evaluation preprocessing."""
    cut = keras.Model(model.input, model.get_layer(keras_layer).output)
    return cut(_pixels(image_bytes), training=False).numpy()


_LOADED = {}


def _loaded(version):
    """The SavedModel of ``version``, loaded once per module."""
    if str(version) not in _LOADED:
        _LOADED[str(version)] = tf.saved_model.load(str(version))
    return _LOADED[str(version)]


def _serve_features(version, image_bytes):
    signature = _loaded(version).signatures["features"]
    return signature(images=tf.constant(image_bytes, tf.string))["features"].numpy()


def test_features_signature_equals_the_keras_layer(layout, image_paths):
    _, model, version, names = layout
    image_bytes = [p.read_bytes() for p in image_paths]
    served = _serve_features(version, image_bytes)
    expected = _by_hand(model, names["fc7"], image_bytes)
    assert served.shape == (len(image_bytes), 512) and served.dtype == np.float32
    np.testing.assert_allclose(served, expected, rtol=TOL, atol=TOL)


def test_fc7_features_are_relu_of_the_preactivation(layout, image_paths):
    name, model, version, names = layout
    image_bytes = [p.read_bytes() for p in image_paths]
    served = _serve_features(version, image_bytes)
    # fc6's output (the input of fc7) and fc7's kernels give the pre-activation by hand.
    fc6 = _by_hand(model, names["fc6"], image_bytes).astype(np.float64)
    towers = ("fc7_a", "fc7_b") if name == "two_towers" else ("fc7",)
    pre = np.concatenate([fc6 @ model.get_layer(t).kernel.numpy().astype(np.float64)
                          + model.get_layer(t).bias.numpy() for t in towers], axis=1)
    assert (pre < 0).mean() > 0.1  # the check below is not vacuous
    np.testing.assert_allclose(served, np.maximum(pre, 0.0), rtol=1e-4, atol=1e-4)
    assert served.min() >= 0.0 and (served == 0).any()


def test_features_signature_spec_metadata_and_empty_batch(layout):
    _, _, version, names = layout
    signature = _loaded(version).signatures["features"]
    (spec,) = signature.structured_input_signature[1].values()
    assert (spec.name, spec.dtype, spec.shape.as_list()) == ("images", tf.string, [None])
    output = signature.structured_outputs["features"]
    assert (output.dtype, output.shape.as_list()) == (tf.float32, [None, 512])
    empty = signature(images=tf.constant([], tf.string))["features"]
    assert empty.shape == (0, 512) and empty.dtype == tf.float32
    metadata = export.read_metadata(version)
    assert metadata["signatures"] == ["serving_default", "serving_pixels", "classify",
                                      "features"]
    assert metadata["features"] == {"layer": "fc7", "keras_layer": names["fc7"], "dim": 512}


def test_features_signature_uses_the_checked_preprocessing(layout):
    _, _, version, _ = layout
    signature = _loaded(version).signatures["features"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="Unsupported image format"):
        signature(images=tf.constant([b"certainly not an image"]))


def test_extract_every_layer_equals_the_keras_layer(layout, image_paths):
    _, model, _, names = layout
    image_bytes = [p.read_bytes() for p in image_paths]
    dataset = tf.data.Dataset.from_tensor_slices((image_bytes, np.arange(len(image_bytes))))
    for layer in features.FEATURE_LAYERS:
        values, labels = features.extract(model, dataset, layer, batch_size=3)
        expected = _by_hand(model, names[layer], image_bytes)
        assert values.dtype == np.float32 and labels.dtype == np.int64
        assert values.shape == expected.shape == (len(image_bytes),
                                                  features.feature_dim(model, layer))
        np.testing.assert_allclose(values, expected, rtol=TOL, atol=TOL)
        np.testing.assert_array_equal(labels, np.arange(len(image_bytes)))
    pool5 = [layer for layer in model.layers if layer.name.startswith("pool5")]
    assert features.feature_dim(model, "pool5") == sum(
        int(np.prod(layer.output.shape[1:])) for layer in pool5)


def test_unknown_layers_and_models_without_them():
    with pytest.raises(ValueError, match="Unknown feature layer 'fc8'"):
        features.find_layer(alexnet(**TINY), "fc8")
    inputs = keras.Input((67, 67, 3))
    generic = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(
        inputs)))
    assert features.find_layer(generic, "fc7") is None
    with pytest.raises(ValueError, match="has no fc6 layer"):
        features.feature_extractor(generic, "fc6")


def test_a_generic_keras_model_gets_no_features_signature(tmp_path):
    inputs = keras.Input((67, 67, 3))
    generic = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(
        inputs)))
    version = export.export_saved_model(generic, tmp_path / "generic", ["a", "b"])
    assert set(tf.saved_model.load(str(version)).signatures) == {
        "serving_default", "serving_pixels", "classify"}
    metadata = export.read_metadata(version)
    assert metadata["features"] is None and "features" not in metadata["signatures"]
    with pytest.raises(ValueError, match="has no fc6 layer"):
        export.export_saved_model(generic, tmp_path / "generic", ["a", "b"], features="fc6")
    assert [p.name for p in (tmp_path / "generic").iterdir()] == ["1"]


# alexnet-features.


def _image_folder(root, image_paths, *, broken=False):
    """Two classes of real photos (one nested), optionally with an undecodable file."""
    (root / "cats" / "more").mkdir(parents=True)
    (root / "vans").mkdir()
    shutil.copy(image_paths[0], root / "cats" / "a.JPEG")
    shutil.copy(image_paths[2], root / "cats" / "more" / "b.jpg")
    shutil.copy(image_paths[6], root / "vans" / "c d.JPEG")
    shutil.copy(image_paths[5], root / "vans" / "e.jpg")
    if broken:
        (root / "vans" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return {"cats/a.JPEG": 0, "cats/more/b.jpg": 0, "vans/c d.JPEG": 1, "vans/e.jpg": 1}


def _run(argv):
    return features_cli.main([str(a) for a in argv])


def test_cli_from_an_export_and_a_keras_file(layout, image_paths, tmp_path):
    _, model, version, _ = layout
    expected_files = _image_folder(tmp_path / "photos", image_paths, broken=True)
    out = tmp_path / "out" / "features.npz"
    with pytest.warns(features_cli.UndecodableImagesWarning, match="broken.jpg"):
        summary = _run([version, tmp_path / "photos", "--out", out, "--batch-size", 3,
                        "--data-dir", tmp_path / "cache"])
    assert summary["skipped"] == ["vans/broken.jpg"]
    with np.load(out) as npz:
        data = {key: npz[key] for key in npz.files}
    assert sorted(data) == ["class_names", "features", "files", "labels", "layer"]
    assert data["files"].tolist() == list(expected_files)
    assert data["labels"].tolist() == list(expected_files.values())
    assert data["labels"].dtype == np.int64 and data["features"].dtype == np.float32
    assert data["class_names"].tolist() == ["cats", "vans"] and str(data["layer"]) == "fc7"
    image_bytes = [(tmp_path / "photos" / f).read_bytes() for f in expected_files]
    served = _serve_features(version, image_bytes)
    np.testing.assert_allclose(data["features"], served, rtol=TOL, atol=TOL)

    keras_file = tmp_path / "model.keras"
    model.save(keras_file)
    out_keras = tmp_path / "from-keras.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", features_cli.UndecodableImagesWarning)
        _run([keras_file, tmp_path / "photos", "--out", out_keras, "--layer", "fc6",
              "--data-dir", tmp_path / "cache"])
    with np.load(out_keras) as npz:
        assert str(npz["layer"]) == "fc6"
        fc6 = _by_hand(model, LAYOUTS[layout[0]][1]["fc6"], image_bytes)
        np.testing.assert_allclose(npz["features"], fc6, rtol=TOL, atol=TOL)
    assert not [p for p in tmp_path.rglob(".tmp-*")]


def test_cli_flat_folder_has_label_minus_one(layout, image_paths, tmp_path):
    _, _, version, _ = layout
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(image_paths[1], flat / "x.JPEG")
    shutil.copy(image_paths[3], flat / "y.JPEG")
    (flat / "notes.txt").write_text("not an image")
    _run([version, flat, "--out", tmp_path / "f.npz", "--data-dir", tmp_path / "cache"])
    with np.load(tmp_path / "f.npz") as npz:
        assert npz["files"].tolist() == ["x.JPEG", "y.JPEG"]
        assert npz["labels"].tolist() == [-1, -1] and npz["class_names"].tolist() == []
        served = _serve_features(version, [(flat / f).read_bytes() for f in ("x.JPEG",
                                                                           "y.JPEG")])
        np.testing.assert_allclose(npz["features"], served, rtol=TOL, atol=TOL)


def test_cli_bad_inputs_fail_clearly_and_write_nothing(layout, image_paths, tmp_path, capsys):
    _, _, version, _ = layout
    photos = tmp_path / "photos"
    _image_folder(photos, image_paths)
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    out = tmp_path / "never.npz"
    cases = [
        ([tmp_path / "no-such-model", photos], "no-such-model is not a training run"),
        ([version, tmp_path / "no-such-folder"], "No such folder of images"),
        ([version, empty], "holds no images"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            _run([*argv, "--out", out, "--data-dir", tmp_path / "cache"])
        assert info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        _run([version, photos, "--layer", "fc8", "--out", out])
    assert info.value.code == 2 and "invalid choice: 'fc8'" in capsys.readouterr().err
    undecodable = tmp_path / "undecodable" / "cats"
    undecodable.mkdir(parents=True)
    (undecodable / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as info, pytest.warns(features_cli.UndecodableImagesWarning):
        _run([version, undecodable.parent, "--out", out, "--data-dir", tmp_path / "cache"])
    assert info.value.code == 2 and "could be decoded" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    json.dumps(export.read_metadata(version)["features"])  # the entry stays plain JSON
