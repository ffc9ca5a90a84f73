"""Centre-crop and 10-crop evaluation: the crops, the metrics, the CLI on both model formats."""

import csv
import pathlib
import shutil
import warnings

import numpy as np
import pytest
import tensorflow as tf

from keras_alexnet import datasets, preprocessing
from keras_alexnet.training import evaluation

DATA = pathlib.Path(__file__).parent / "data"
IMAGES = sorted((DATA / "images").iterdir())
SIZE = 67


def test_ten_crops_are_corners_centre_and_mirrors():
    side = preprocessing.resize_size(SIZE)  # 76
    square = np.arange(side * side * 3, dtype=np.float32).reshape(side, side, 3)
    crops = preprocessing.ten_crop(tf.constant(square), SIZE).numpy()
    far, mid = side - SIZE, (side - SIZE) // 2
    expected = [square[mid:mid + SIZE, mid:mid + SIZE], square[:SIZE, :SIZE],
                square[:SIZE, far:], square[far:, :SIZE], square[far:, far:]]
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(crops[i], want)
        np.testing.assert_array_equal(crops[i + 5], want[:, ::-1])
    np.testing.assert_array_equal(crops[0], preprocessing.center_crop(square, SIZE))


def test_metrics_average_the_softmax_over_ten_crops():
    # 3 images, 6 classes. A fake predictor scores each crop from its mean pixel, so
    # the centre crop and the 10-crop average disagree in a known way.
    images = [np.full((80, 80, 3), v, np.uint8) for v in (10, 20, 30)]
    images[2][:20, :20] = 250  # a bright top-left corner: only some crops see it
    encoded = [tf.io.encode_png(i).numpy() for i in images]
    source = tf.data.Dataset.from_tensor_slices((encoded, np.array([0, 1, 5], np.int64)))

    def predict(pixels):
        level = pixels.reshape(len(pixels), -1).mean(1)
        probs = np.full((len(pixels), 6), 0.01)
        probs[np.arange(len(pixels)), np.clip((level // 10).astype(int), 0, 5)] = 0.95
        return probs / probs.sum(1, keepdims=True)

    result = evaluation.evaluate(predict, source, 6, image_size=SIZE, mean=(0, 0, 0),
                                 batch_size=2)
    assert result.num_images == 3 and result.counts.tolist() == [1, 1, 0, 0, 0, 1]
    # Centre crops: levels 10, 20, 30 -> classes 1, 2, 3; labels 0, 1, 5: all wrong.
    assert result.error("centre_top1") == 1.0
    assert result.correct["centre_top5"].tolist() == [1, 1, 0, 0, 0, 0]
    # Image 3: crops that hold more of the bright corner have a higher level; the
    # 10-crop answer is their averaged softmax, recomputed here from the same crops.
    crops = preprocessing.ten_crop_from_image(tf.constant(images[2]), SIZE, (0, 0, 0)).numpy()
    expected_top1 = int(np.argmax(predict(crops).mean(0)) == 5)
    assert result.correct["ten_crop_top1"][5] == expected_top1
    assert "centre crop" in result.table() and "10 crops" in result.table()


def _six_class_folder(root):
    for i in range(6):
        for split, image in (("train", IMAGES[i]), ("val", IMAGES[(i + 1) % len(IMAGES)])):
            (root / split / f"class {i}").mkdir(parents=True, exist_ok=True)
            shutil.copy(image, root / split / f"class {i}" / image.name)
    return root


@pytest.mark.slow
def test_cli_on_a_checkpoint_and_on_its_saved_model(tmp_path):
    from keras_alexnet import export
    from keras_alexnet.model import alexnet
    from training import evaluate

    root = _six_class_folder(tmp_path / "pics")
    model = alexnet(num_classes=6, image_size=SIZE, width=0.125, seed=1)
    checkpoint = tmp_path / "model.keras"
    model.save(checkpoint)
    args = ["--dataset", f"folder:{root}", "--data-dir", str(tmp_path / "cache")]
    summary = evaluate.main([str(checkpoint), *args, "--csv", str(tmp_path / "k.csv")])
    assert summary["images"] == 6
    for key in ("centre_top1", "centre_top5", "ten_crop_top1", "ten_crop_top5"):
        assert 0.0 <= summary[f"{key}_error"] <= 1.0

    # The same numbers from the library, computed here independently for the centre crop.
    source = datasets.load(f"folder:{root}", data_dir=str(tmp_path / "cache"))
    hits = 0
    for image_bytes, label in source.validation.as_numpy_iterator():
        logits = model(preprocessing.eval_from_bytes(image_bytes, SIZE)[None], training=False)
        hits += int(np.argmax(logits[0]) == label)
    assert summary["centre_top1_error"] == pytest.approx(1 - hits / 6)

    with open(tmp_path / "k.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class_name"] for r in rows] == [f"class {i}" for i in range(6)]
    assert all(r["images"] == "1" for r in rows)
    assert set(rows[0]) >= {"centre_top1_accuracy", "ten_crop_top5_accuracy"}

    # The exported SavedModel (serving_pixels) gives the same centre-crop results.
    export.export_saved_model(model, tmp_path / "models", source.class_names)
    # Its `probabilities` output carries the whole softmax: 10 crops are exact too.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        exported = evaluate.main([str(tmp_path / "models"), *args,
                                  "--csv", str(tmp_path / "s.csv")])
    for key in ("centre_top1_error", "centre_top5_error", "ten_crop_top1_error",
                "ten_crop_top5_error"):
        assert exported[key] == summary[key], key


@pytest.mark.slow
def test_cli_on_a_training_run_and_its_checkpoint(shapes_data_dir, tmp_path, capsys):
    """`alexnet-evaluate <run>` reads the run's own checkpoint format; its centre-crop
    error is the training loop's final validation error (the same preprocessing)."""
    import dataclasses
    import json

    from keras_alexnet.training import loop
    from keras_alexnet.training.config import PRESETS
    from training import evaluate

    config = dataclasses.replace(PRESETS["smoke"], data_dir=shapes_data_dir, epochs=1)
    trained = loop.train(config, tmp_path / "run", tmp_path / "models", verbose=0,
                         do_export=False)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    args = ["--csv", str(tmp_path / "c.csv"), "--batch-size", "20"]
    from_run = evaluate.main([str(tmp_path / "run"), *args])
    checkpoint = tmp_path / "run" / "checkpoints" / state["checkpoints"][-1]
    from_checkpoint = evaluate.main([str(checkpoint), *args])
    from_run.pop("seconds"), from_checkpoint.pop("seconds")
    assert from_run == from_checkpoint
    assert from_run["images"] == 100
    assert from_run["centre_top1_error"] == pytest.approx(1 - trained["val_top1"], abs=1e-6)
    assert from_run["centre_top5_error"] == pytest.approx(1 - trained["val_top5"], abs=1e-6)

    with pytest.raises(SystemExit) as info:
        evaluate.main([str(checkpoint.with_name("ckpt-7")), *args])
    assert info.value.code == 2 and "no checkpoint ckpt-7" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # two values are not a mean
        evaluate.main([str(checkpoint), *args, "--mean", "120,110"])
    assert info.value.code == 2 and "--mean must be" in capsys.readouterr().err


def test_commands_end_with_an_exit_status_not_a_printed_summary(tmp_path):
    """The console scripts call `cli`, which returns 0: ``sys.exit(summary_dict)`` would
    print the raw dict as the last line a user sees."""
    import configparser
    import pathlib

    from training import evaluate, train

    setup = configparser.ConfigParser()
    setup.read(pathlib.Path(__file__).parents[1] / "setup.cfg")
    scripts = setup["options.entry_points"]["console_scripts"]
    assert "alexnet-train = training.train:cli" in scripts
    assert "alexnet-evaluate = training.evaluate:cli" in scripts
    calls = []
    for module in (train, evaluate):
        original = module.main
        module.main = lambda argv=None: calls.append(argv) or {"val_top1": 0.5}
        try:
            assert module.cli() == 0
        finally:
            module.main = original
    assert len(calls) == 2
