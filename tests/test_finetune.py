"""Fine-tuning (training/finetune.py): a training run that starts from another model.

The source is a tiny AlexNet (smoke preset: 67x67, width 0.125) trained in this module on
the embedded ``alexnet_shapes/tiny``. The fine-tuning dataset is a different one: a
folder of four other classes (ellipse, grid, hexagon, concentric rings), drawn with the
colour and noise helpers of `keras_alexnet.datasets.shapes_render` at 96x96, 24
training and 25 validation images per class.
"""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from keras_alexnet import export
from keras_alexnet.datasets import shapes_render
from keras_alexnet.faults import ENV_VAR
from keras_alexnet.training import finetune, loop
from keras_alexnet.training.config import PRESETS
from keras_alexnet.training.run_dir import RunDirectory
from training import finetune as finetune_cli

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("ellipse", "grid", "hexagon", "rings")
TRAIN_PER_CLASS, VAL_PER_CLASS = 24, 25  # 96 training images: 6 steps of 16 per epoch
STEPS = 6


def _render(name, rng, size=96):
    """One image of a class the source never saw, on a plain background with noise."""
    bg, fg = shapes_render._colour_pair(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    radius = rng.uniform(0.25, 0.35) * size
    rot = rng.uniform(0, math.pi)
    if name in ("hexagon", "ellipse"):
        mask = Image.new("L", (size, size), 0)
        if name == "hexagon":
            points = shapes_render._polygon(cx, cy, radius, 6, rot)
        else:
            points = [(cx + radius * math.cos(t) * math.cos(rot)
                       - 0.45 * radius * math.sin(t) * math.sin(rot),
                       cy + radius * math.cos(t) * math.sin(rot)
                       + 0.45 * radius * math.sin(t) * math.cos(rot))
                      for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
        ImageDraw.Draw(mask).polygon(points, fill=255)
        alpha = np.asarray(mask, np.float32) / 255.0
    elif name == "grid":
        period = rng.uniform(0.14, 0.2) * size
        u = xx * math.cos(rot) + yy * math.sin(rot)
        v = -xx * math.sin(rot) + yy * math.cos(rot)
        alpha = (((u % period) < period / 4) | ((v % period) < period / 4)).astype(np.float32)
    else:
        period = rng.uniform(0.1, 0.14) * size
        alpha = ((np.hypot(xx - cx, yy - cy) % period) < period / 2).astype(np.float32)
    image = bg[None, None].astype(np.float32) + alpha[..., None] * (fg - bg)[None, None]
    image += rng.standard_normal(image.shape).astype(np.float32) * 4
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory):
    """``train/<class>/`` and ``val/<class>/`` of the four new classes (seeded)."""
    root = tmp_path_factory.mktemp("other") / "folder"
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng([7, c, i, split == "val"])
                (root / split / name / f"{i}.jpg").write_bytes(
                    shapes_render.encode_jpeg(_render(name, rng)))
    return root


@pytest.fixture(scope="module")
def source_run(shapes_data_dir, tmp_path_factory):
    """A run directory of the smoke network trained 6 epochs on alexnet_shapes/tiny
    (about 37% validation top-1 on its 10 classes)."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    config = dataclasses.replace(PRESETS["smoke"], data_dir=shapes_data_dir, epochs=6,
                                 checkpoint_every=0)
    loop.train(config, run_dir, run_dir.parent / "unused", verbose=0, do_export=False)
    return run_dir


def base_config(folder, **overrides):
    """The smoke preset on the other folder: what both sides of a comparison share."""
    return dataclasses.replace(PRESETS["smoke"], dataset=f"folder:{folder}",
                               checkpoint_every=0, **overrides)


def weights(model):
    return {w.path: np.asarray(w).copy() for w in model.weights}


def layer_weights(model, prefix):
    return {k: v for k, v in weights(model).items()
            if finetune.base_name(k.split("/")[0]) == prefix}


# Fine-tuning beats training from scratch ------------------------------------------------

SHARED = dict(epochs=3, learning_rate=3e-3, keep_checkpoints=3)  # 18 steps of 16 images


@pytest.fixture(scope="module")
def tuned(source_run, other_folder, tmp_path_factory):
    """``(config, summary, run_dir)`` of the source fine-tuned on the other folder: epoch 1
    trains fc8 alone, epochs 2 and 3 fc6 and up at a tenth of the learning rate."""
    run_dir = tmp_path_factory.mktemp("tuned") / "run"
    config = finetune.prepare_config(
        base_config(other_folder, head_epochs=1, unfreeze="fc6", **SHARED), source_run,
        run_dir)
    summary = loop.train(config, run_dir, run_dir.parent / "unused", verbose=0,
                         do_export=False)
    return config, summary, run_dir


def test_fine_tuning_beats_training_from_scratch_at_the_same_steps(source_run, other_folder,
                                                                   tuned, tmp_path):
    """Both runs: smoke preset, Adam at 3e-3, 3 epochs of 6 steps, same seed, same data;
    only the start differs. Measured on 2 cores (illustration only): fine-tuned 0.28-0.36
    top-1 error, from scratch 0.48-0.69, over several seeds, with fc8 alone or with
    unfreezing, under both oneDNN settings; chance is 0.75."""
    _, summary, run_dir = tuned
    scratch = loop.train(base_config(other_folder, **SHARED), tmp_path / "scratch",
                         tmp_path / "unused", verbose=0, do_export=False)
    tuned_error, scratch_error = 1 - summary["val_top1"], 1 - scratch["val_top1"]
    print(f"top-1 error: fine-tuned {tuned_error:.3f}, from scratch {scratch_error:.3f}")
    assert tuned_error < scratch_error, (tuned_error, scratch_error)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["init_from"] == str(source_run)
    assert saved["init_source"]["origin"] == "run"
    assert saved["init_source"]["path"].endswith("checkpoints/ckpt-180")
    assert (saved["head_epochs"], saved["unfreeze"]) == (1, "fc6")
    assert saved["image_size"] == 67 and saved["width"] == 0.125  # the source's network
    assert len(RunDirectory(run_dir).read_history()) == 3
    assert list((run_dir / "logs").rglob("events.out.tfevents*"))


# Frozen means frozen --------------------------------------------------------------------

def test_frozen_layers_keep_the_source_weights_bit_for_bit(source_run, tuned):
    config, _, run_dir = tuned
    run = RunDirectory(run_dir)
    assert json.loads(run.state_path.read_text())["checkpoints"] == [
        "ckpt-6", "ckpt-12", "ckpt-18"]
    source = RunDirectory(source_run).load_model()
    after_head = run.load_model("ckpt-6")
    final = run.load_model("ckpt-18")
    fresh = loop.build_model(config, len(CLASSES))  # the fc8 the run started with

    frozen_then = [n for n in finetune.LAYERS if n != "fc8"]
    for name in frozen_then:
        src, head = layer_weights(source, name), layer_weights(after_head, name)
        assert src and src.keys() == head.keys(), name
        for key in src:
            np.testing.assert_array_equal(head[key], src[key], err_msg=key)
    for key, value in layer_weights(fresh, "fc8").items():
        assert not np.array_equal(layer_weights(after_head, "fc8")[key], value), key

    for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):  # still frozen
        for key, value in layer_weights(source, name).items():
            np.testing.assert_array_equal(layer_weights(final, name)[key], value,
                                          err_msg=key)
    for name in ("fc6", "fc7", "fc8"):  # unfrozen: both towers of fc6 and fc7 moved
        head = layer_weights(after_head, name)
        for key, value in layer_weights(final, name).items():
            assert not np.array_equal(value, head[key]), key
    history = run.read_history()
    assert history[0]["lr"] == pytest.approx(3e-3, rel=1e-6)
    assert history[1]["lr"] == history[2]["lr"] == pytest.approx(3e-4, rel=1e-6)  # x 0.1


# Resume after kills ---------------------------------------------------------------------

def _finetune(source, folder, run_dir, crash_at=None):
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if crash_at:
        env[ENV_VAR] = crash_at
    command = [sys.executable, "training/finetune.py", "--from", str(source),
               "--dataset", f"folder:{folder}", "--preset", "smoke",
               "--run-dir", str(run_dir), "--no-export", "--epochs", "2",
               "--head-epochs", "1", "--unfreeze", "conv5", "--lr", "0.003",
               "--dropout-rate", "0.5", "--checkpoint-every", "4", "--deterministic",
               "--quiet"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_killed_in_both_phases_ends_like_the_uninterrupted_run(source_run, other_folder,
                                                              tmp_path):
    """6 steps per epoch, epoch 1 trains fc8 alone, epoch 2 conv5 and up; checkpoints
    every 4 steps and at epoch ends. Killed (SIGKILL) while writing the checkpoint at the
    phase boundary, then mid-way through the unfrozen phase; the reruns end with the
    uninterrupted run's weights, bit for bit, and its history."""
    reference = _finetune(source_run, other_folder, tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr[-3000:]

    run = tmp_path / "run"
    killed = _finetune(source_run, other_folder, run, crash_at="checkpoint:6")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert json.loads((run / "state.json").read_text())["checkpoints"][-1] == "ckpt-4"

    # Resumes in the head phase, crosses into the unfrozen one, killed at step 10.
    killed = _finetune(source_run, other_folder, run, crash_at="step:10")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "step 4 of 6" in killed.stdout and "unfreezing conv5" in killed.stdout, killed.stdout
    assert json.loads((run / "state.json").read_text())["global_step"] == 8

    final = _finetune(source_run, other_folder, run)  # resumes in the unfrozen phase
    assert final.returncode == 0, final.stderr[-3000:]
    assert "epoch 2, step 2 of 6" in final.stdout and "unfreezing" not in final.stdout

    assert (run / "history.csv").read_text() == (tmp_path / "ref" / "history.csv").read_text()
    expected = weights(RunDirectory(tmp_path / "ref").load_model())
    actual = weights(RunDirectory(run).load_model())
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=0, atol=1e-6, err_msg=key)
    source = weights(RunDirectory(source_run).load_model())
    conv5 = [k for k in expected if k.startswith("conv5")]
    assert conv5 and all(not np.array_equal(expected[k], source[k]) for k in conv5)


# From an export ---------------------------------------------------------------------------

def test_fine_tuning_from_an_export_keeps_its_preprocessing_and_records_the_source(
        source_run, other_folder, tmp_path):
    """The source exported with its own mean and resize side (as converted weights are:
    torchvision's 224 crops of 256); the run takes both, and its export carries them."""
    model = RunDirectory(source_run).load_model()
    mean, resize = [100.0, 110.0, 120.0], 80
    export.export_saved_model(model, tmp_path / "source_models", shapes_render.CLASS_NAMES,
                              mean=mean, resize=resize)
    config = finetune.prepare_config(base_config(other_folder, epochs=1),
                                     tmp_path / "source_models", tmp_path / "ft")
    assert (config.mean, config.resize, config.image_size) == (mean, resize, 67)
    summary = loop.train(config, tmp_path / "ft", tmp_path / "models", verbose=0)

    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["init_from"] == str(tmp_path / "source_models")
    assert saved["init_source"] == {"path": str(tmp_path / "source_models" / "1"),
                                    "origin": "export", "num_classes": 10}
    assert (saved["mean"], saved["resize"]) == (mean, resize)
    metadata = export.read_metadata(summary["export_path"])
    assert metadata["class_names"] == list(CLASSES)
    assert (metadata["mean"], metadata["resize_size"]) == (mean, resize)
    assert metadata["fine_tuned_from"]["path"] == str(tmp_path / "source_models" / "1")
    tuned = RunDirectory(tmp_path / "ft").load_model()
    for name in ("conv1", "conv3", "fc7"):
        for key, value in layer_weights(model, name).items():
            np.testing.assert_array_equal(layer_weights(tuned, name)[key], value)


# Bad inputs -----------------------------------------------------------------------------

def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        finetune_cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs_are_refused_before_anything_is_written(source_run, other_folder, tmp_path,
                                                           capsys):
    run_dir = tmp_path / "run"
    common = ["--preset", "smoke", "--run-dir", str(run_dir),
              "--export-dir", str(tmp_path / "models")]
    dataset = ["--dataset", f"folder:{other_folder}"]
    err = _cli_error(capsys, ["--from", str(tmp_path / "nothing"), *dataset, *common])
    assert "nothing: no such file or directory" in err
    (tmp_path / "empty").mkdir()
    err = _cli_error(capsys, ["--from", str(tmp_path / "empty"), *dataset, *common])
    assert "is not a training run" in err
    (tmp_path / "model.h5").write_bytes(b"junk")
    err = _cli_error(capsys, ["--from", str(tmp_path / "model.h5"), *dataset, *common])
    assert "not a .keras model" in err
    err = _cli_error(capsys, ["--from", str(source_run / "checkpoints" / "ckpt-7"), *dataset,
                              *common])
    assert "ckpt-7: no such file or directory" in err
    err = _cli_error(capsys, ["--from", str(source_run), *dataset, "--head-epochs", "2",
                              *common])
    assert "--head-epochs needs --unfreeze" in err
    err = _cli_error(capsys, ["--from", str(source_run), *dataset, "--unfreeze", "conv9",
                              *common])
    assert "invalid choice: 'conv9'" in err
    one_class = tmp_path / "one"
    (one_class / "only").mkdir(parents=True)
    for i in range(4):
        (one_class / "only" / f"{i}.jpg").write_bytes(
            shapes_render.encode_jpeg(_render("grid", np.random.default_rng(i))))
    err = _cli_error(capsys, ["--from", str(source_run), "--dataset", f"folder:{one_class}",
                              "--val-split", "0.5", *common])
    assert "needs at least 2" in err
    err = _cli_error(capsys, ["--from", str(source_run), "--dataset", "folder:/no/such",
                              *common])
    assert "error:" in err
    assert not run_dir.exists() and not (tmp_path / "models").exists()

    # In the configuration: a layer name that is not one, a crop larger than its square,
    # a fine-tuning phase without a source.
    config = finetune.prepare_config(base_config(other_folder), source_run, run_dir)
    for bad, message in ((dict(unfreeze="conv9", head_epochs=1), "--unfreeze must be"),
                         (dict(resize=60), "`resize` must be an integer >= the crop"),
                         (dict(unfreeze_lr_factor=0.0), "--unfreeze-lr-factor"),
                         (dict(init_from=None, init_source=None, unfreeze="fc7"),
                          "need a model to fine-tune")):
        with pytest.raises(ValueError, match=message):
            loop.train(dataclasses.replace(config, **bad), run_dir, tmp_path / "models",
                       verbose=0)
    assert not run_dir.exists()

    # A run directory of a plain training run is not resumed by fine-tuning.
    run_dir.mkdir()
    (run_dir / "config.json").write_text(base_config(other_folder).to_json())
    with pytest.raises(ValueError, match="init_from: None ->"):
        loop.train(config, run_dir, tmp_path / "models", verbose=0)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]
