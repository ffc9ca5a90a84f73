"""SavedModel export: signatures, parity with the in-memory model, versioning, isolation."""

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_alexnet import alexnet, export, preprocessing

CLASS_NAMES = [f"class_{i}" for i in range(10)]


@pytest.fixture(scope="module")
def model():
    return alexnet(num_classes=10, image_size=67, width=0.125, seed=0, initializer="he",
                   input_scale=1 / 64)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("models") / "alexnet"
    return export.export_saved_model(model, base, CLASS_NAMES)


def reference_top5(model, image_bytes):
    """Top-5 of the in-memory Keras model on the shared evaluation preprocessing."""
    pixels = tf.stack([preprocessing.eval_from_bytes(b, 67) for b in image_bytes])
    probabilities = tf.nn.softmax(model(pixels, training=False)).numpy()
    classes = np.argsort(-probabilities, axis=1, kind="stable")[:, :5]
    return classes, np.take_along_axis(probabilities, classes, axis=1)


def test_version_layout_and_signatures(exported):
    assert exported.name == "1" and (exported / "saved_model.pb").exists()
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".tmp")]
    loaded = tf.saved_model.load(str(exported))
    assert set(loaded.signatures) == {"serving_default", "serving_pixels", "classify", "features"}
    default = loaded.signatures["serving_default"]
    (spec,) = default.structured_input_signature[1].values()
    assert spec.dtype == tf.string and spec.shape.as_list() == [None] and spec.name == "images"
    outputs = default.structured_outputs
    assert {k: (v.dtype, v.shape.as_list()) for k, v in outputs.items()} == {
        "classes": (tf.int32, [None, 5]), "scores": (tf.float32, [None, 5]),
        "labels": (tf.string, [None, 5])}
    (pixels,) = loaded.signatures["serving_pixels"].structured_input_signature[1].values()
    assert pixels.dtype == tf.float32 and pixels.shape.as_list() == [None, 67, 67, 3]
    metadata = json.loads((exported / "assets.extra" / export.METADATA_FILE).read_text())
    assert metadata["class_names"] == CLASS_NAMES


def test_saved_model_cli_lists_both_signatures(exported):
    cli = pathlib.Path(sys.executable).with_name("saved_model_cli")
    result = subprocess.run([str(cli), "show", "--dir", str(exported), "--all"],
                            capture_output=True, text=True, timeout=120, check=True)
    for needle in ("signature_def['serving_default']", "signature_def['serving_pixels']",
                   "inputs['images']", "inputs['pixels']", "outputs['scores']",
                   "outputs['labels']", "outputs['classes']", "tensorflow/serving/predict"):
        assert needle in result.stdout, needle


def test_top5_on_real_jpegs_equals_in_memory_model(model, exported, image_paths):
    image_bytes = [p.read_bytes() for p in image_paths]
    serve = tf.saved_model.load(str(exported)).signatures["serving_default"]
    out = serve(images=tf.constant(image_bytes))
    classes, scores = reference_top5(model, image_bytes)
    np.testing.assert_array_equal(out["classes"].numpy(), classes)
    np.testing.assert_allclose(out["scores"].numpy(), scores, rtol=1e-5, atol=1e-7)
    assert np.all(np.diff(out["scores"].numpy(), axis=1) <= 0)
    labels = out["labels"].numpy().astype(str)
    assert labels.tolist() == [[CLASS_NAMES[c] for c in row] for row in classes.tolist()]


def test_pixels_and_classify_signatures_agree(exported, image_paths):
    loaded = tf.saved_model.load(str(exported))
    image_bytes = [p.read_bytes() for p in image_paths[:3]]
    by_bytes = loaded.signatures["serving_default"](images=tf.constant(image_bytes))
    pixels = tf.stack([preprocessing.eval_from_bytes(b, 67) for b in image_bytes])
    by_pixels = loaded.signatures["serving_pixels"](pixels=pixels)
    np.testing.assert_array_equal(by_bytes["classes"], by_pixels["classes"])
    probabilities = by_pixels["probabilities"].numpy()
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.sort(probabilities, axis=1)[:, ::-1][:, :5],
                               by_pixels["scores"].numpy(), rtol=1e-6)
    examples = [tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b]))}))
        .SerializeToString() for b in image_bytes]
    by_example = loaded.signatures["classify"](inputs=tf.constant(examples))
    np.testing.assert_array_equal(by_example["classes"], by_bytes["labels"])
    np.testing.assert_allclose(by_example["scores"], by_bytes["scores"], rtol=1e-6)


def _encode(array, fmt, **kwargs):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_decodes_every_format_and_mode(exported):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (90, 120, 3), np.uint8)
    payloads = [
        _encode(rgb, "JPEG"), _encode(rgb, "JPEG", progressive=True), _encode(rgb, "PNG"),
        _encode(rgb, "GIF"), _encode(rgb, "BMP"), _encode(rgb[..., 0], "JPEG"),
        _encode(np.dstack([rgb, np.full((90, 120), 128, np.uint8)]), "PNG"),
        (pathlib.Path(__file__).parent / "data/edge/pil_sample_cmyk.jpg").read_bytes(),
        (pathlib.Path(__file__).parent / "data/edge/hopper_gray.jpg").read_bytes(),
    ]
    serve = tf.saved_model.load(str(exported)).signatures["serving_default"]
    out = serve(images=tf.constant(payloads))
    assert out["classes"].shape == (len(payloads), 5)
    assert np.all(np.isfinite(out["scores"].numpy()))
    empty = serve(images=tf.constant([], tf.string))
    assert empty["scores"].shape == (0, 5)


def test_rejects_undecodable_and_oversized_images(exported):
    serve = tf.saved_model.load(str(exported)).signatures["serving_default"]
    truncated = (pathlib.Path(__file__).parent / "data/edge/truncated_jpeg.jpg").read_bytes()
    for bad in (b"", b"not an image", truncated):
        with pytest.raises(tf.errors.InvalidArgumentError):
            serve(images=tf.constant([bad]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="pixels must have shape"):
        tf.saved_model.load(str(exported)).signatures["serving_pixels"](
            pixels=tf.zeros([1, 50, 50, 3]))
    # A PNG header claiming 20000 x 20000 pixels is refused before decoding.
    png = bytearray(_encode(np.zeros((4, 4, 3), np.uint8), "PNG"))
    png[16:24] = (20000).to_bytes(4, "big") * 2
    with pytest.raises(tf.errors.InvalidArgumentError, match="Image too large"):
        serve(images=tf.constant([bytes(png)]))


def test_versions_increase_and_failures_leave_nothing(model, tmp_path, monkeypatch):
    base = tmp_path / "alexnet"
    (base / "7").mkdir(parents=True)  # an existing version (e.g. from another run)
    (base / "notes").mkdir()
    assert export.export_saved_model(model, base, CLASS_NAMES).name == "8"
    with pytest.raises(ValueError, match="already exists"):
        export.export_saved_model(model, base, CLASS_NAMES, version=8)
    with pytest.raises(ValueError, match="10 outputs but 3 class names"):
        export.export_saved_model(model, base, ["a", "b", "c"])

    def crash(obj, export_dir, *args, **kwargs):  # dies half-way through writing
        pathlib.Path(export_dir, "saved_model.pb").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        export.export_saved_model(model, base, CLASS_NAMES)
    assert sorted(p.name for p in base.iterdir()) == ["7", "8", "notes"]


def test_loads_in_a_fresh_process_without_the_package(model, exported, image_paths):
    script = f"""
import json, sys
sys.modules["keras_alexnet"] = None  # make `import keras_alexnet` fail
try:
    import keras_alexnet
    raise SystemExit("keras_alexnet should not be importable here")
except ImportError:
    pass
import tensorflow as tf
loaded = tf.saved_model.load({str(exported)!r})
images = [open(p, "rb").read() for p in {[str(p) for p in image_paths]!r}]
out = loaded.signatures["serving_default"](images=tf.constant(images))
print(json.dumps({{"classes": out["classes"].numpy().tolist(),
                  "scores": out["scores"].numpy().tolist()}}))
"""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=180, env=env, cwd=str(exported.parent))
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    classes, scores = reference_top5(model, [p.read_bytes() for p in image_paths])
    assert got["classes"] == classes.tolist()
    np.testing.assert_allclose(got["scores"], scores, rtol=1e-5, atol=1e-7)
