"""Ensembles served as one SavedModel: the mean of the members' softmax (issue 11).

Every reference is computed apart from the ensemble: by the members' own SavedModel
exports (their ``serving_pixels`` signatures), or from `preprocessing.ten_crop_from_image`
and plain NumPy, never by the code under test.
"""

import contextlib
import functools
import inspect
import io
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from _subprocess import ONEDNN_SETTINGS, own_onednn, run_script

from keras_alexnet import alexnet, ensemble, export, files, preprocessing
from keras_alexnet.training import model_source
from training import ensemble as ensemble_cli

CLASS_NAMES = [f"class_{i}" for i in range(10)]
SIZE = 67
SEEDS = (1, 2)
LOGIT_SCALE = 6.0  # fc8 scaled up: peaked, well-separated probabilities (no near-ties)


def tiny(seed, **overrides):
    """A tiny AlexNet whose softmax is far from uniform."""
    model = alexnet(**{**dict(num_classes=len(CLASS_NAMES), image_size=SIZE, width=0.125,
                              seed=seed, initializer="he", input_scale=1 / 64), **overrides})
    fc8 = model.get_layer("fc8")
    kernel, bias = fc8.get_weights()
    fc8.set_weights([kernel * LOGIT_SCALE, bias])
    return model


@pytest.fixture(scope="module")
def members():
    return [tiny(seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def member_exports(members, tmp_path_factory):
    """Each member's own export: the independent reference (their ``serving_pixels``).

    Member 1's is a ten-crop export (which leaves ``serving_pixels`` as it is): the
    single-model case of the option, tested below without another export.
    """
    root = tmp_path_factory.mktemp("members")
    return [export.export_saved_model(model, root / f"m{i}", CLASS_NAMES, features=None,
                                      ten_crop=i == 1)
            for i, model in enumerate(members)]


@pytest.fixture(scope="module")
def ensemble_export(members, member_exports, tmp_path_factory):
    base = tmp_path_factory.mktemp("ensembles") / "ensemble"
    given = [ensemble.Member(model, CLASS_NAMES, path=path)
             for model, path in zip(members, member_exports)]
    return ensemble.export_ensemble(given, base)


@pytest.fixture(scope="module")
def photos(image_paths):
    """``(encoded bytes, evaluation pixels [N, 67, 67, 3])`` of the real photos."""
    image_bytes = [p.read_bytes() for p in image_paths]
    pixels = np.stack([preprocessing.eval_from_bytes(b, SIZE).numpy() for b in image_bytes])
    return image_bytes, pixels


@functools.lru_cache(maxsize=None)
def _load(version):
    return tf.saved_model.load(version)


def signature(version, name):
    return _load(str(version)).signatures[name]


def member_mean(member_exports, pixels):
    """The mean over the members' own exports of their probabilities (float64)."""
    return np.mean([signature(v, "serving_pixels")(pixels=tf.constant(pixels))["probabilities"]
                    .numpy().astype(np.float64) for v in member_exports], axis=0)


def top5(probabilities):
    return np.argsort(-probabilities, axis=1, kind="stable")[:, :5]


# ---------------------------------------------------------------------------------------
# The averaged probabilities, under both oneDNN settings (the loading process's kernels
# are the ones that serve): in a fresh interpreter, or in this one for its own setting.

def compare_with_members(pixels, ensemble_dir, member_dirs, load):
    """The ensemble's ``serving_pixels`` probabilities against the mean of the members'."""
    import numpy as np
    import tensorflow as tf

    def probabilities(path):
        serve = load(str(path)).signatures["serving_pixels"]
        return serve(pixels=tf.constant(pixels))["probabilities"].numpy()

    members = np.stack([probabilities(path) for path in member_dirs]).astype(np.float64)
    got = probabilities(ensemble_dir)
    want = members.mean(axis=0)
    return {
        "max_difference": float(np.abs(got - want).max()),
        "max_member_spread": float(np.abs(members - want).max()),
        "max_member_probability": float(members.max()),
        "sum_error": float(np.abs(got.sum(axis=1) - 1).max()),
        "top5_equal": bool((np.argsort(-got, 1, kind="stable")[:, :5]
                            == np.argsort(-want, 1, kind="stable")[:, :5]).all()),
    }


EQUALITY_SCRIPT = textwrap.dedent(inspect.getsource(compare_with_members)) + textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    work, ensemble_dir, member_dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
    out = compare_with_members(np.load(work + "/pixels.npy"), ensemble_dir, member_dirs,
                               tf.saved_model.load)
    out["onednn"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.parametrize("onednn", ONEDNN_SETTINGS, ids=lambda v: f"onednn{v}")
def test_probabilities_equal_the_mean_of_the_members_exports(onednn, ensemble_export,
                                                             member_exports, photos,
                                                             tmp_path):
    if own_onednn() == onednn:  # this process's kernels: no second TensorFlow start
        out = {**compare_with_members(photos[1], ensemble_export, member_exports, _load),
               "onednn": onednn}
    else:
        np.save(tmp_path / "pixels.npy", photos[1])
        out = run_script(EQUALITY_SCRIPT, tmp_path, ensemble_export, *member_exports,
                         timeout=300, onednn=onednn)
    print(out)
    assert out["onednn"] == onednn
    # The members disagree (so the mean is not any one member's) and are far from uniform.
    assert out["max_member_spread"] > 0.05 and out["max_member_probability"] > 0.5
    assert out["max_difference"] < 1e-6
    assert out["sum_error"] < 1e-6 and out["top5_equal"]


def test_serving_default_top5_is_the_top5_of_the_mean(ensemble_export, member_exports, photos):
    image_bytes, pixels = photos
    want = member_mean(member_exports, pixels)
    classes = top5(want)
    ranked = np.sort(want, axis=1)[:, ::-1]
    # No near-ties anywhere in the top 6, so the top 5 (and their order) are well defined.
    assert np.diff(ranked[:, :6], axis=1).max() < -1e-4, np.diff(ranked[:, :6], axis=1).max()
    # The ensemble's top 5 is not simply one member's.
    member_classes = [top5(signature(v, "serving_pixels")(pixels=tf.constant(pixels))
                           ["probabilities"].numpy()) for v in member_exports]
    assert all((c != classes).any() for c in member_classes)

    out = signature(ensemble_export, "serving_default")(images=tf.constant(image_bytes))
    np.testing.assert_array_equal(out["classes"].numpy(), classes)
    scores = np.take_along_axis(want, classes, axis=1)
    print("serving_default max score difference", np.abs(out["scores"].numpy() - scores).max())
    np.testing.assert_allclose(out["scores"].numpy(), scores, rtol=0, atol=1e-6)
    assert out["labels"].numpy().astype(str).tolist() == [
        [CLASS_NAMES[c] for c in row] for row in classes.tolist()]

    examples = [tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b]))}))
        .SerializeToString() for b in image_bytes]
    by_example = signature(ensemble_export, "classify")(inputs=tf.constant(examples))
    np.testing.assert_array_equal(by_example["classes"].numpy(), out["labels"].numpy())


def test_metadata_features_and_keras_reload(ensemble_export, members, member_exports, photos):
    metadata = export.read_metadata(ensemble_export)
    assert metadata["class_names"] == CLASS_NAMES and metadata["image_size"] == SIZE
    assert metadata["ten_crop"] is False
    assert metadata["signatures"] == ["serving_default", "serving_pixels", "classify",
                                      "features"]
    record = metadata["ensemble"]
    assert record["averaging"] == "softmax mean" and record["ten_crop"] is False
    assert [m["path"] for m in record["members"]] == [str(v) for v in member_exports]
    assert [m["keras_name"] for m in record["members"]] == ["member_0", "member_1"]
    # features: the members' fc7 (512 each at width 1/8) side by side, member 0 first.
    assert metadata["features"]["dim"] == 2 * 512
    assert metadata["features"]["keras_layer"] == ["member_0/cross_fc7", "member_1/cross_fc7"]
    image_bytes, pixels = photos
    got = signature(ensemble_export, "features")(images=tf.constant(image_bytes))["features"]
    from keras_alexnet import features as feature_layers

    want = np.concatenate([feature_layers.feature_extractor(m, "fc7")(pixels).numpy()
                           for m in members], axis=1)
    assert got.shape == (len(image_bytes), 2 * 512) and want.max() > 0.1
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5 * want.max())

    # The export reopens as a Keras model through the loaders the tools use.
    loaded = model_source.load_keras(ensemble_export.parent)
    assert isinstance(loaded.model, ensemble.Ensemble) and loaded.path == ensemble_export
    assert loaded.class_names == CLASS_NAMES and loaded.image_size == SIZE
    reloaded = tf.nn.softmax(loaded.model(pixels, training=False)).numpy()
    served = member_mean(member_exports, pixels)
    print("reloaded Keras ensemble max difference", np.abs(reloaded - served).max())
    np.testing.assert_allclose(reloaded, served, rtol=0, atol=1e-6)


def test_mismatched_members_are_refused_before_anything_is_written(members, tmp_path):
    base = tmp_path / "ensemble"

    def member(model=members[0], **kwargs):
        return ensemble.Member(model, kwargs.pop("class_names", CLASS_NAMES), **kwargs)

    cases = [
        ([member(), member(tiny(4, image_size=71))], "member 1 takes inputs of shape"),
        ([member(), member(tiny(5, num_classes=7), class_names=CLASS_NAMES[:7])],
         "member 1 has 7 classes"),
        ([member(), member(members[1]), member(members[0], mean=[0.0, 0.0, 0.0])],
         "member 2 subtracts the mean"),
        ([member(), member(members[1], resize=80)], "member 1 crops from a 80-pixel square"),
        ([member(), member(members[1], class_names=CLASS_NAMES[::-1])],
         "member 1 names its classes"),
        ([member(), member(members[1], class_names=None)], "member 1 records no class names"),
        ([member(members[1], path="models/b/1", mean="image"), member()],
         r"member 0 \(models/b/1\) was trained with its dataset's per-pixel mean"),
        ([member()], "at least 2 members"),
    ]
    for given, message in cases:
        with pytest.raises(ValueError, match=message):
            ensemble.export_ensemble(given, base)
        assert not base.exists() or not files.list_versions(base)
    with pytest.raises(ValueError, match="takes inputs of shape"):
        ensemble.ensemble_model([members[0], tiny(4, image_size=71)])
    assert not base.exists()


# ---------------------------------------------------------------------------------------
# The command line (in-process), with --ten-crop.

@pytest.fixture(scope="module")
def cli_ten_crop(member_exports, tmp_path_factory):
    """``(version, stdout)`` of ``alexnet-ensemble m0 m1 --export ... --ten-crop``."""
    base = tmp_path_factory.mktemp("cli") / "ensemble"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        version = ensemble_cli.main([str(member_exports[0].parent), str(member_exports[1]),
                                     "--export", str(base), "--ten-crop"])
    return version, stdout.getvalue()


def test_cli_exports_a_version_and_lists_its_members(cli_ten_crop, member_exports):
    version, stdout = cli_ten_crop
    assert version.name == "1" and (version / "saved_model.pb").is_file()
    assert str(version) in stdout
    assert f"member_0: {member_exports[0]} (AlexNet" in stdout
    assert f"member_1: {member_exports[1]} (AlexNet" in stdout
    metadata = export.read_metadata(version)
    assert metadata["ten_crop"] is True and metadata["ensemble"]["ten_crop"] is True
    assert metadata["features"]["crops"] == 10
    assert [m["path"] for m in metadata["ensemble"]["members"]] == [
        str(v) for v in member_exports]


def test_cli_refuses_bad_members_and_writes_nothing(member_exports, tmp_path, capsys):
    base = tmp_path / "ensemble"
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    cases = [
        ([member_exports[0], tmp_path / "no-such-model"], "member 1"),
        ([member_exports[0], not_a_model], "is not a training run"),
        ([member_exports[0]], "at least 2 members"),
        ([*member_exports[:2], "--version", "0"], "--version must be a positive integer"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            ensemble_cli.main([*map(str, argv), "--export", str(base)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
        assert not base.exists() or not files.list_versions(base)


def test_console_script_is_installed():
    command = pathlib.Path(sys.executable).with_name("alexnet-ensemble")
    out = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--ten-crop" in out.stdout and "MEMBER" in out.stdout


def test_ten_crop_averages_crops_and_members(cli_ten_crop, member_exports, photos):
    """Mean over the 10 crops (`preprocessing.ten_crop_from_image`) and the 2 members of
    the members' own probabilities, against the ten-crop ensemble's top-5 scores."""
    version, _ = cli_ten_crop
    image_bytes, centre = photos
    mean = preprocessing.resolve_mean(None, SIZE)
    crops = np.concatenate([
        preprocessing.ten_crop_from_image(preprocessing.decode_image(b), SIZE, mean).numpy()
        for b in image_bytes])  # [N * 10, S, S, 3], image-major
    np.testing.assert_array_equal(crops[::10], centre)  # crop 0 is the centre crop
    per_crop = member_mean(member_exports, crops).reshape(len(image_bytes), 10, -1)
    want = per_crop.mean(axis=1)
    # Ten crops change the answer (else this would not test the averaging over crops).
    assert np.abs(want - per_crop[:, 0]).max() > 0.02
    classes = top5(want)
    out = signature(version, "serving_default")(images=tf.constant(image_bytes))
    np.testing.assert_array_equal(out["classes"].numpy(), classes)
    scores = np.take_along_axis(want, classes, axis=1)
    print("ten-crop max score difference", np.abs(out["scores"].numpy() - scores).max())
    np.testing.assert_allclose(out["scores"].numpy(), scores, rtol=0, atol=1e-6)
    # serving_pixels keeps one crop per row.
    by_pixels = signature(version, "serving_pixels")(pixels=tf.constant(centre))
    centre_mean = per_crop[:, 0]
    np.testing.assert_allclose(by_pixels["probabilities"].numpy(), centre_mean, rtol=0,
                               atol=1e-6)


def test_single_model_ten_crop_export(members, member_exports, photos):
    """ten_crop is an option of the one export: a single model averages its 10 crops."""
    model, version = members[1], member_exports[1]
    assert export.read_metadata(version)["ten_crop"] is True
    assert export.read_metadata(member_exports[0])["ten_crop"] is False
    image_bytes = photos[0]
    mean = preprocessing.resolve_mean(None, SIZE)
    want = np.stack([
        tf.nn.softmax(model(preprocessing.ten_crop_from_image(
            preprocessing.decode_image(b), SIZE, mean), training=False)).numpy().mean(axis=0)
        for b in image_bytes])
    out = signature(version, "serving_default")(images=tf.constant(image_bytes))
    classes = top5(want)
    np.testing.assert_array_equal(out["classes"].numpy(), classes)
    scores = np.take_along_axis(want, classes, axis=1)
    print("single ten-crop max score difference", np.abs(out["scores"].numpy() - scores).max())
    np.testing.assert_allclose(out["scores"].numpy(), scores, rtol=0, atol=1e-6)
    empty = signature(version, "serving_default")(images=tf.constant([], tf.string))
    assert empty["scores"].shape == (0, 5)


def test_a_fresh_process_reopens_an_ensemble_through_the_tools_loaders(ensemble_export,
                                                                        tmp_path):
    """The package loads its classes lazily, so a tool that imports only its loader (no
    `keras_alexnet.ensemble`) must still rebuild a recorded `Ensemble`: from an export's
    metadata and from a ``.keras`` file (`model_source.register_classes`)."""
    keras_file = tmp_path / "ensemble.keras"
    model_source.load_keras(ensemble_export.parent).model.save(keras_file)
    script = textwrap.dedent("""
        import json, sys
        from keras_alexnet.training import model_source
        before = "keras_alexnet.ensemble" in sys.modules
        kinds = [type(model_source.load_keras(p).model).__name__ for p in sys.argv[1:]]
        print("RESULT" + json.dumps({"before": before, "kinds": kinds}))
    """)
    result = run_script(script, ensemble_export.parent, keras_file)
    assert result == {"before": False, "kinds": ["Ensemble", "Ensemble"]}
