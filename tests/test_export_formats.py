"""ONNX and LiteRT files (`keras_alexnet.portable`, ``alexnet-export``) against the SavedModel.

The reference is the SavedModel version `keras_alexnet.export` writes of the same model:
its ``serving_pixels`` signature run by TensorFlow, in a fresh interpreter under each
oneDNN setting (the kernels change the numerics), on the real photos of tests/data
preprocessed by `keras_alexnet.preprocessing`. The files are run by ONNX Runtime and the
LiteRT interpreter directly, not through the code under test.
"""

import inspect
import json
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime
import pytest
from _subprocess import ONEDNN_SETTINGS, own_onednn, run_script
from ai_edge_litert.interpreter import Interpreter

from keras_alexnet import alexnet, ensemble, export, paper, portable, preprocessing
from training import export as export_cli

CLASS_NAMES = [f"class_{i}" for i in range(10)]
LOGIT_SCALE = 6.0  # fc8 scaled up: peaked probabilities, no near-ties in the top 5
TOLERANCE = 1e-4
TINY = dict(num_classes=len(CLASS_NAMES), width=0.125, initializer="he")


def _peaked(model):
    fc8 = model.get_layer("fc8")
    kernel, bias = fc8.get_weights()
    fc8.set_weights([kernel * LOGIT_SCALE, bias])
    return model


def _caffe_mean():
    """A smooth per-pixel mean image (76 x 76 x 3) for the caffe case (the .mean.npy path)."""
    ramp = np.linspace(-20, 20, 76, dtype=np.float32)
    return (np.asarray(paper.IMAGENET_MEAN_RGB, np.float32)
            + ramp[:, None, None] + 0.5 * ramp[None, :, None]).astype(np.float32)


def _cases():
    """``{name: (model, mean, resize)}``: the paper network, both converted layouts, an
    ensemble; each with the preprocessing its export records."""
    tv_mean = [255.0 * m for m in paper.TORCHVISION_MEAN]
    members = [_peaked(alexnet(image_size=67, seed=s, input_scale=1 / 64, **TINY))
               for s in (1, 2)]
    return {
        # The whole architecture (two towers, per-tower LRN, 227 inputs) at a quarter width.
        "paper": (_peaked(alexnet(**{**TINY, "width": 0.25}, image_size=227, seed=1,
                                  input_scale=1 / 64)), None, None),
        # Caffe's layout: LRN across both towers, Caffe's constants; a per-pixel mean image.
        "caffe": (_peaked(alexnet("caffe", image_size=67, seed=3, input_scale=1 / 64, **TINY)),
                  _caffe_mean(), None),
        # torchvision's: one tower, conv1 padding, its 1/(255 std) input scale, and the
        # adaptive 6x6 average pool over a 4x4 pool5 (uneven, overlapping bins).
        "torchvision": (_peaked(alexnet("torchvision", image_size=163, seed=4, **TINY)),
                        tv_mean, 186),
        "ensemble": (ensemble.ensemble_model(members), None, None),
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory, image_paths):
    """Per case: the model, its SavedModel version, its .onnx and .tflite files, and the
    evaluation pixels of the real photos."""
    root = tmp_path_factory.mktemp("formats")
    image_bytes = [p.read_bytes() for p in image_paths]
    out = {}
    for name, (model, mean, resize) in _cases().items():
        size = int(model.input_shape[1])
        version = export.export_saved_model(model, root / "saved" / name, CLASS_NAMES,
                                            mean=mean, resize=resize, features=None)
        source = {"case": name}
        files = {fmt: portable.EXPORTERS[fmt](model, root / fmt / f"{name}{suffix}",
                                              CLASS_NAMES, mean=mean, resize=resize,
                                              source=source)
                 for fmt, suffix in portable.SUFFIXES.items()}
        resolved = preprocessing.resolve_mean(mean, size, resize)
        pixels = np.stack([preprocessing.eval_from_bytes(b, size, resolved, resize).numpy()
                           for b in image_bytes])
        np.save(root / f"{name}-pixels.npy", pixels)
        out[name] = {"model": model, "version": version, "files": files, "pixels": pixels,
                     "pixels_file": root / f"{name}-pixels.npy", "mean": resolved,
                     "resize": preprocessing.resize_size(size, resize), "size": size}
    return out


def run_onnx_file(path, pixels):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"pixels": pixels})))


def run_litert_file(path, pixels):
    interpreter = Interpreter(model_path=str(path))
    return interpreter.get_signature_runner("serving_default")(pixels=pixels)


RUNNERS = {"onnx": run_onnx_file, "litert": run_litert_file}


# ---------------------------------------------------------------------------------------
# The TensorFlow side: serving_pixels of each SavedModel, under both oneDNN settings.

def serving_pixels_outputs(jobs):
    """``{case: {output: list}}`` of each SavedModel's ``serving_pixels`` on its pixels."""
    import numpy as np
    import tensorflow as tf

    result = {}
    for name, (version, pixels_file) in jobs.items():
        serve = tf.saved_model.load(version).signatures["serving_pixels"]
        outputs = serve(pixels=tf.constant(np.load(pixels_file)))
        result[name] = {k: outputs[k].numpy().tolist()
                        for k in ("probabilities", "classes", "scores")}
    return result


REFERENCE_SCRIPT = textwrap.dedent(inspect.getsource(serving_pixels_outputs)) + textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out = serving_pixels_outputs(json.loads(sys.argv[1]))
    out["onednn"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def reference(built):
    """``reference(onednn)``: the SavedModels' outputs under that setting (computed once)."""
    cache = {}
    jobs = {name: (str(case["version"]), str(case["pixels_file"]))
            for name, case in built.items()}

    def get(onednn):
        if onednn not in cache:
            if own_onednn() == onednn:  # this process's kernels: no second TensorFlow start
                cache[onednn] = {**serving_pixels_outputs(jobs), "onednn": onednn}
            else:
                cache[onednn] = run_script(REFERENCE_SCRIPT, json.dumps(jobs), timeout=300,
                                           onednn=onednn)
        return cache[onednn]

    return get


@pytest.fixture(scope="module")
def runtime_outputs(built):
    cache = {}

    def get(name, fmt):
        if (name, fmt) not in cache:
            case = built[name]
            cache[name, fmt] = RUNNERS[fmt](case["files"][fmt], case["pixels"])
        return cache[name, fmt]

    return get


def top5(probabilities):
    return np.argsort(-np.asarray(probabilities), axis=1, kind="stable")[:, :5]


@pytest.mark.parametrize("onednn", ONEDNN_SETTINGS, ids=lambda v: f"onednn{v}")
@pytest.mark.parametrize("fmt", portable.FORMATS)
@pytest.mark.parametrize("name", ["paper", "caffe", "torchvision", "ensemble"])
def test_files_match_the_savedmodel_on_real_photos(name, fmt, onednn, reference,
                                                   runtime_outputs):
    want = reference(onednn)
    assert want["onednn"] == onednn
    want = {k: np.asarray(v) for k, v in want[name].items()}
    got = runtime_outputs(name, fmt)
    assert set(got) == {"probabilities", "classes", "scores"}
    assert got["probabilities"].shape == want["probabilities"].shape == (8, len(CLASS_NAMES))
    assert got["probabilities"].dtype == np.float32 and got["classes"].dtype == np.int32
    # The comparison means something: peaked probabilities that differ between photos,
    # and no near-tie in anyone's top 6 (their logits at least 1e-3 apart, a hundred times
    # float32's error on them), so that the top 5 and its order are well defined.
    ranked = np.sort(want["probabilities"], axis=1)[:, ::-1]
    assert ranked[:, 0].max() > 4 / len(CLASS_NAMES)
    assert len({tuple(r) for r in top5(want["probabilities"])}) > 1
    assert np.diff(np.log(ranked[:, :6]), axis=1).max() < -1e-3
    difference = float(np.abs(got["probabilities"] - want["probabilities"]).max())
    print(f"{name} {fmt} onednn={onednn}: max |dp| {difference:.3g}")
    assert difference <= TOLERANCE
    np.testing.assert_array_equal(top5(got["probabilities"]), top5(want["probabilities"]))
    np.testing.assert_array_equal(got["classes"], want["classes"])
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("fmt", portable.FORMATS)
def test_batch_size_is_dynamic(fmt, built, runtime_outputs):
    case = built["paper"]
    whole = runtime_outputs("paper", fmt)
    # Not bit for bit: a runtime may block its matrix products differently for another
    # batch size (ONNX Runtime on an AVX2-only CPU: 1.2e-6 between batches of 1 and 8).
    for rows in (slice(0, 1), slice(3, 6)):
        part = RUNNERS[fmt](case["files"][fmt], case["pixels"][rows])
        np.testing.assert_allclose(part["probabilities"], whole["probabilities"][rows],
                                   rtol=0, atol=1e-5)
    if fmt == "onnx":  # ONNX Runtime also takes an empty batch (the interpreter refuses one)
        empty = run_onnx_file(case["files"]["onnx"], case["pixels"][:0])
        assert empty["probabilities"].shape == (0, len(CLASS_NAMES))


# ---------------------------------------------------------------------------------------
# What a user of the file reads: the sidecar (and the ONNX file's own metadata).

@pytest.mark.parametrize("fmt", portable.FORMATS)
@pytest.mark.parametrize("name", ["paper", "caffe", "torchvision"])
def test_sidecar_says_what_to_feed(name, fmt, built):
    case = built[name]
    path = case["files"][fmt]
    record = json.loads(portable.sidecar_path(path).read_text())
    saved = export.read_metadata(case["version"])  # what the SavedModel itself records
    size = case["size"]
    assert record["format"] == fmt and record["file"] == path.name
    assert record["input"] == {"name": "pixels", "dtype": "float32",
                               "shape": [None, size, size, 3], "layout": "NHWC"}
    assert record["class_names"] == saved["class_names"] == CLASS_NAMES
    assert record["top_k"] == saved["top_k"] == 5
    assert record["outputs"]["probabilities"]["shape"] == [None, 10]
    assert record["outputs"]["classes"]["shape"] == [None, 5]
    pre = record["preprocessing"]
    assert pre["crop"] == saved["image_size"] == size
    assert pre["resize"] == saved["resize_size"] == case["resize"]
    assert pre["channel_order"] == "RGB" and pre["scale"].startswith("0-255")
    if name == "caffe":
        assert pre["mean"] == saved["mean"] == "per-pixel"
        mean = np.load(path.with_name(pre["mean_file"]))
        np.testing.assert_array_equal(mean, np.load(case["version"] / "assets.extra"
                                                    / "mean.npy"))
        assert pre["mean_shape"] == [76, 76, 3]
    else:
        np.testing.assert_allclose(pre["mean"], saved["mean"], rtol=1e-6)
    assert record["source"] == {"case": name}
    assert record["check"]["max_abs_difference"] <= TOLERANCE
    if fmt == "onnx":
        proto = onnx.load(str(path))
        props = {p.key: p.value for p in proto.metadata_props}
        assert json.loads(props[portable.METADATA_KEY]) == record
        assert [i.name for i in proto.graph.input] == ["pixels"]
        assert record["opset"] == portable.DEFAULT_OPSET
    else:
        signatures = Interpreter(model_path=str(path)).get_signature_list()
        assert list(signatures) == [record["signature"]] == ["serving_default"]
        assert signatures["serving_default"]["inputs"] == ["pixels"]
        assert sorted(signatures["serving_default"]["outputs"]) == ["classes", "probabilities",
                                                                    "scores"]


# ---------------------------------------------------------------------------------------
# Refusals and failures: a clear error, nothing written.

@pytest.fixture(scope="module")
def small():
    return _peaked(alexnet(image_size=67, seed=5, input_scale=1 / 64, **TINY))


@pytest.mark.parametrize("fmt", portable.FORMATS)
def test_what_a_format_cannot_carry_is_refused(fmt, small, tmp_path):
    target = tmp_path / f"m{portable.SUFFIXES[fmt]}"
    exporter = portable.EXPORTERS[fmt]
    for signature in ("serving_default", "classify", "features"):
        with pytest.raises(ValueError, match="preprocessed pixels"):
            exporter(small, target, CLASS_NAMES, signature=signature)
    with pytest.raises(ValueError, match="10 crops"):
        exporter(small, target, CLASS_NAMES, ten_crop=True)
    with pytest.raises(ValueError, match=r"must end with \.(onnx|tflite)"):
        exporter(small, tmp_path / "m.bin", CLASS_NAMES)
    with pytest.raises(ValueError, match="10 outputs but 3 class names"):
        exporter(small, target, CLASS_NAMES[:3])
    folder = tmp_path / f"folder{portable.SUFFIXES[fmt]}"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        exporter(small, folder, CLASS_NAMES)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name] and not list(folder.iterdir())


def test_weights_beyond_the_format_limit_are_refused(small, tmp_path, monkeypatch):
    monkeypatch.setattr(portable, "MAX_WEIGHT_BYTES", 1000)
    with pytest.raises(ValueError, match="GiB"):
        portable.export_onnx(small, tmp_path / "m.onnx", CLASS_NAMES)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt,module", [("onnx", "tf2onnx"), ("onnx", "onnxruntime"),
                                        ("litert", "ai_edge_litert")])
def test_a_missing_extra_names_the_install_command(fmt, module, small, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(portable.MissingExtraError, match=rf"pip install 'keras-alexnet\[{fmt}\]'"):
        portable.EXPORTERS[fmt](small, tmp_path / f"m{portable.SUFFIXES[fmt]}", CLASS_NAMES)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", portable.FORMATS)
def test_a_failed_or_wrong_conversion_leaves_no_file(fmt, small, tmp_path, monkeypatch):
    target = tmp_path / "out" / f"m{portable.SUFFIXES[fmt]}"
    real = portable.run_onnx if fmt == "onnx" else portable.run_litert

    def off_by_a_little(content, pixels):
        outputs = real(content, pixels)
        return {**outputs, "probabilities": outputs["probabilities"] + 1e-3}

    monkeypatch.setattr(portable, "run_onnx" if fmt == "onnx" else "run_litert",
                        off_by_a_little)
    with pytest.raises(portable.ConversionError, match="differ from TensorFlow's by 0.001"):
        portable.EXPORTERS[fmt](small, target, CLASS_NAMES)
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(portable, "_convert_onnx" if fmt == "onnx" else "_convert_litert",
                        broken)
    with pytest.raises(portable.ConversionError, match="converter crashed"):
        portable.EXPORTERS[fmt](small, target, CLASS_NAMES)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_existing_files_are_kept_unless_overwrite(small, tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        portable.export_onnx(small, target, CLASS_NAMES)
    assert target.read_bytes() == b"keep me" and not portable.sidecar_path(target).exists()
    portable.export_onnx(small, target, CLASS_NAMES, overwrite=True, verify=False)
    assert portable.read_sidecar(target)["check"] is None
    assert run_onnx_file(target, np.zeros((1, 67, 67, 3), np.float32))["probabilities"].shape \
        == (1, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]


def test_a_per_pixel_mean_file_is_kept_unless_overwrite_and_never_left_stale(small, tmp_path):
    target = tmp_path / "p.onnx"
    stale = portable.mean_path(target)
    np.save(stale, np.zeros((67, 67, 3), np.float32))
    with pytest.raises(FileExistsError, match="overwrite"):
        portable.export_onnx(small, target, CLASS_NAMES, verify=False)
    assert not target.exists() and stale.exists()
    portable.export_onnx(small, target, CLASS_NAMES, overwrite=True, verify=False)
    # A channel-mean export: the old per-pixel mean beside it would mislead a reader.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.onnx", "p.onnx.json"]


# ---------------------------------------------------------------------------------------
# The command.

def _cli(argv, monkeypatch):
    """``alexnet-export argv`` in this process; its exit status."""
    monkeypatch.setattr(sys, "argv", ["alexnet-export", *map(str, argv)])
    try:
        return export_cli.cli()
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("fmt", ["onnx", "litert"])
def test_cli_writes_a_file_that_matches_its_source(fmt, built, tmp_path, monkeypatch):
    case = built["torchvision"]  # an export with its own mean and resize side
    out = tmp_path / "nested" / f"tv{portable.SUFFIXES[fmt]}"
    assert _cli([case["version"], "--format", fmt, "--out", out], monkeypatch) == 0
    record = portable.read_sidecar(out)
    saved = export.read_metadata(case["version"])
    assert record["preprocessing"]["resize"] == saved["resize_size"] == 186
    np.testing.assert_allclose(record["preprocessing"]["mean"], saved["mean"], rtol=1e-6)
    assert record["class_names"] == CLASS_NAMES
    assert record["source"]["path"] == str(case["version"])
    assert record["source"]["origin"] == "export"
    assert record["source"]["keras_class"] == "AlexNet"
    got = RUNNERS[fmt](out, case["pixels"])
    # The same weights as the fixture's own file, through the export and its reload.
    want = RUNNERS[fmt](case["files"][fmt], case["pixels"])
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=0, atol=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, out.name + ".json"]


def test_cli_savedmodel_is_a_new_version_of_the_same_model(built, tmp_path, monkeypatch):
    import tensorflow as tf

    case = built["caffe"]  # a per-pixel mean: carried from export to export
    base = tmp_path / "models" / "caffe"
    assert _cli([case["version"], "--format", "savedmodel", "--out", base, "--version", "4"],
                monkeypatch) == 0
    assert sorted(p.name for p in base.iterdir()) == ["4"]
    first = export.read_metadata(base / "4")
    assert first["ten_crop"] is False and first["class_names"] == CLASS_NAMES
    assert first["mean"] == "per-pixel" and first["resize_size"] == 76
    np.testing.assert_array_equal(np.load(base / "4" / "assets.extra" / "mean.npy"),
                                  case["mean"])
    assert first["source"]["path"] == str(case["version"])
    pixels = tf.constant(case["pixels"])
    want = tf.saved_model.load(str(case["version"])).signatures["serving_pixels"](pixels=pixels)
    got = tf.saved_model.load(str(base / "4")).signatures["serving_pixels"](pixels=pixels)
    np.testing.assert_allclose(got["probabilities"].numpy(), want["probabilities"].numpy(),
                               rtol=0, atol=1e-6)


def test_cli_keras_file_needs_labels(small, tmp_path, monkeypatch, capsys):
    keras_file = tmp_path / "small.keras"
    small.save(keras_file)
    out = tmp_path / "small.onnx"
    assert _cli([keras_file, "--format", "onnx", "--out", out], monkeypatch) == 2
    assert "pass --labels" in capsys.readouterr().err and not out.exists()
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(CLASS_NAMES))
    assert _cli([keras_file, "--format", "onnx", "--out", out, "--labels", labels],
                monkeypatch) == 0
    assert portable.read_sidecar(out)["source"]["origin"] == "keras"


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None)
                  for p in root.rglob("*"))


def test_cli_bad_inputs_exit_2_and_write_nothing(built, tmp_path, monkeypatch, capsys):
    version = built["paper"]["version"]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"keep me")
    (tmp_path / "stale.onnx.mean.npy").write_bytes(b"keep me")
    (tmp_path / "dir.tflite").mkdir()
    cases = [
        ([version, "--format", "tflite", "--out", tmp_path / "m.tflite"], "invalid choice"),
        ([tmp_path / "no-such-model", "--format", "onnx", "--out", tmp_path / "m.onnx"],
         "does not exist"),
        ([version, "--format", "onnx", "--out", a_file / "m.onnx"], "is a file, not a folder"),
        ([version, "--format", "savedmodel", "--out", a_file / "models"], "is a file"),
        ([version, "--format", "savedmodel", "--out", a_file], "is a file"),
        ([version, "--format", "onnx", "--out", "/proc/alexnet-export-test/m.onnx"],
         "cannot write in /proc"),
        ([version, "--format", "litert", "--out", "/proc/m.tflite"], "cannot write in /proc"),
        # An existing SavedModel base is checked itself, not its parent (/, writable here).
        ([version, "--format", "savedmodel", "--out", "/proc"], "cannot write in /proc"),
        ([version, "--format", "onnx", "--out", existing], "exists already"),
        # A per-pixel mean left by an earlier export would be read as this one's.
        ([version, "--format", "onnx", "--out", tmp_path / "stale.onnx"],
         "stale.onnx.mean.npy exists already"),
        ([version, "--format", "litert", "--out", tmp_path / "dir.tflite"], "is a folder"),
        ([version, "--format", "onnx", "--out", tmp_path / "m.tflite"], "must end with .onnx"),
        ([version, "--format", "onnx", "--out", tmp_path / "m.onnx", "--signature",
          "serving_default"], "cannot carry the 'serving_default' signature"),
        ([version, "--format", "litert", "--out", tmp_path / "m.tflite", "--ten-crop"],
         "10 crops"),
        ([version, "--format", "onnx", "--out", tmp_path / "m.onnx", "--version", "3"],
         "--version applies to savedmodel"),
        ([version, "--format", "savedmodel", "--out", tmp_path / "models", "--signature",
          "serving_pixels"], "--signature applies to onnx and litert"),
        ([version, "--format", "savedmodel", "--out", version.parent, "--version", "1"],
         "version 1 already exists"),
    ]
    before = _snapshot(tmp_path)
    for argv, message in cases:
        assert _cli(argv, monkeypatch) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and message in err, (argv, err)
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    assert _cli([version, "--format", "onnx", "--out", tmp_path / "m.onnx"], monkeypatch) == 2
    assert "pip install 'keras-alexnet[onnx]'" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in version.parent.iterdir()) == ["1"]
