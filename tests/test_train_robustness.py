"""Training never loses or fakes work: divergence, checks before writing, kills, reruns."""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import warnings

import keras
import pytest

from keras_alexnet import export, trainer
from keras_alexnet.training.config import PRESETS
from keras_alexnet.datasets import folder

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGES = sorted((ROOT / "tests" / "data" / "images").iterdir())


def smoke(data_dir, **overrides):
    return dataclasses.replace(PRESETS["smoke"], data_dir=data_dir, **overrides)


def image_folder(root, classes, per_class=3):
    """``root/<class>/`` with real JPEGs, ``per_class`` each (val_split picks one)."""
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            shutil.copy(IMAGES[(c * per_class + i) % len(IMAGES)], root / f"class{c}" / f"{i}.jpg")
    return root


def listing(path):
    return sorted(str(p.relative_to(path)) for p in pathlib.Path(path).rglob("*"))


def test_diverging_loss_stops_keeps_last_good_checkpoint_and_exports_nothing(
        shapes_data_dir, tmp_path, monkeypatch):
    run_dir, models = tmp_path / "run", tmp_path / "models"
    trainer.run(smoke(shapes_data_dir, epochs=1), run_dir, models, verbose=0, do_export=False)
    good = (run_dir / "checkpoints" / "epoch_0001.keras").read_bytes()
    real_load = keras.saving.load_model

    def diverging_load(*args, **kwargs):  # the resumed run's optimiser explodes
        model = real_load(*args, **kwargs)
        model.optimizer.learning_rate.assign(1e6)
        return model

    monkeypatch.setattr(keras.saving, "load_model", diverging_load)
    with pytest.raises(trainer.NonFiniteLossError, match=r"Epoch 2, step \d+: the loss is"):
        trainer.run(smoke(shapes_data_dir, epochs=3), run_dir, models, verbose=0)
    assert json.loads((run_dir / "state.json").read_text())["epoch"] == 1
    assert listing(run_dir / "checkpoints") == ["epoch_0001.keras"]
    assert (run_dir / "checkpoints" / "epoch_0001.keras").read_bytes() == good
    rows = (run_dir / "history.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("0,")
    assert not models.exists() and not (run_dir / "export.json").exists()


def test_cli_with_a_huge_learning_rate_exits_non_zero_and_exports_nothing(
        shapes_data_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "training/train.py", "--preset", "smoke", "--data-dir",
         shapes_data_dir, "--learning-rate", "1e6", "--epochs", "1", "--quiet",
         "--run-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "models")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr  # a message for the user, not a stack
    assert "error: " in proc.stderr and "not a finite number" in proc.stderr
    assert "lower learning rate (it was 1e+06)" in proc.stderr
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_refuses_an_unknown_dataset_with_a_message_and_writes_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "training/train.py", "--preset", "smoke", "--dataset", "nope",
         "--run-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Unknown dataset 'nope'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_custom_loop_stops_on_a_non_finite_loss(shapes_data_dir, tmp_path):
    import tensorflow as tf

    from keras_alexnet import custom_loop

    with pytest.raises(trainer.NonFiniteLossError, match="Epoch 1: the loss is"):
        custom_loop.run(smoke(shapes_data_dir, epochs=1, learning_rate=1e6), tmp_path / "run",
                        tmp_path / "models", tf.distribute.get_strategy(), verbose=0,
                        steps_per_epoch=4)
    assert not (tmp_path / "models").exists()
    assert not list((tmp_path / "run").glob("backup/ckpt-*"))
    assert not (tmp_path / "run" / "history.csv").exists()


def test_bad_datasets_are_refused_before_anything_is_written(shapes_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="Unknown dataset 'alexnet_shape'"):
        trainer.run(smoke(shapes_data_dir, dataset="alexnet_shape"), run_dir, tmp_path / "m")
    assert not run_dir.exists()
    one = image_folder(tmp_path / "one", 1)
    with pytest.raises(ValueError, match="has 1 class"):
        trainer.run(smoke(shapes_data_dir, dataset=f"folder:{one}", val_split=0.3), run_dir,
                    tmp_path / "m")
    assert not run_dir.exists()
    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    (broken / "a" / "x.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="0 decodable training"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", folder.UndecodableImagesWarning)
            trainer.run(smoke(shapes_data_dir, dataset=f"folder:{broken}", val_split=0.3),
                        run_dir, tmp_path / "m")
    assert not run_dir.exists() and not (tmp_path / "m").exists()


def test_three_classes_export_top_three_and_fewer_epochs_are_refused(tmp_path):
    root = image_folder(tmp_path / "pics", 3)
    config = dataclasses.replace(PRESETS["smoke"], dataset=f"folder:{root}", val_split=0.34,
                                 data_dir=str(tmp_path / "cache"), batch_size=2, epochs=1)
    summary = trainer.run(config, tmp_path / "run", tmp_path / "models", verbose=0)
    metadata = json.loads((pathlib.Path(summary["export_path"]) / "assets.extra"
                           / export.METADATA_FILE).read_text())
    assert metadata["top_k"] == 3 and metadata["class_names"] == ["class0", "class1", "class2"]
    before = {p: (tmp_path / "run" / p).read_bytes() for p in ("config.json", "state.json")}
    with pytest.raises(ValueError, match="has trained 1 epochs already; epochs=0 is fewer"):
        trainer.run(dataclasses.replace(config, epochs=0), tmp_path / "run", tmp_path / "models")
    assert {p: (tmp_path / "run" / p).read_bytes() for p in before} == before


def test_dangling_symlinks_are_skipped_and_the_cache_notices_a_fix(tmp_path):
    root = image_folder(tmp_path / "pics", 2)
    link = root / "class1" / "later.jpg"
    target = tmp_path / "elsewhere.jpg"
    link.symlink_to(target)  # dangling for now
    from keras_alexnet import datasets

    with pytest.warns(folder.UndecodableImagesWarning, match=r"Skipped 1 file.*later\.jpg"):
        source = datasets.load(f"folder:{root}", data_dir=str(tmp_path / "c"), val_split=0.34)
    assert source.num_train + source.num_validation == 6
    shutil.copy(IMAGES[0], target)  # the link now resolves: the cached check is stale
    with warnings.catch_warnings():
        warnings.simplefilter("error", folder.UndecodableImagesWarning)
        source = datasets.load(f"folder:{root}", data_dir=str(tmp_path / "c"), val_split=0.34)
    assert source.num_train + source.num_validation == 7 and source.skipped == []


def test_unreadable_files_are_skipped_for_an_unprivileged_user(tmp_path):
    import tempfile

    public = pathlib.Path(tempfile.mkdtemp(prefix="unreadable-"))
    try:
        os.chmod(public, 0o755)
        root = image_folder(public / "pics", 2)
        for path in [public, *public.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.chmod(root / "class0" / "1.jpg", 0o000)
        cache = public / "cache"
        cache.mkdir(mode=0o777)
        os.chmod(cache, 0o777)
        warm = image_folder(public / "warm", 2)
        script = f"""
import json, os, warnings
import numpy.random, tensorflow as tf  # imported first: the interpreter is under 0700 /root
from keras_alexnet import datasets, preprocessing
from keras_alexnet.datasets import folder
# The same load as root first, on other files: TensorFlow imports modules lazily, and the
# checkout (with its virtualenv) may sit in a 0700 folder the unprivileged user cannot read.
datasets.load("folder:{warm}", data_dir="{public / 'warm-cache'}", val_split=0.34)
os.setgroups([]); os.setgid(65534); os.setuid(65534)
def load():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        source = datasets.load("folder:{root}", data_dir="{cache}", val_split=0.34)
    return [str(w.message) for w in seen], source.num_train + source.num_validation
print("RESULT" + json.dumps(load()))
"""
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=180, cwd=ROOT,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", HOME=str(public)))
        assert proc.returncode == 0, proc.stderr[-2000:]
        messages, count = json.loads(
            [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1][6:])
        assert count == 5
        assert len(messages) == 1 and "Skipped 1 file" in messages[0] and "1.jpg" in messages[0]
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_history_is_truncated_to_the_trusted_epochs(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,top1\n0,2.3,0.1\n1,2.0,0.2\n1,1.9,0.25\n2,1.8,0.3\n3,1.")
    trainer.truncate_history(path, 2)
    assert path.read_text() == "epoch,loss,top1\n0,2.3,0.1\n1,1.9,0.25\n"
    trainer.truncate_history(path, 0)
    assert not path.exists()


# A child that trains through the CLI and, at the requested point, says so and waits to
# be killed (SIGKILL: no cleanup of any kind runs).
KILLABLE = r"""
import sys, time
import keras
from keras_alexnet import trainer
from training import train

point, argv = sys.argv[1], sys.argv[2:]

def hold(tag):
    print("AT " + tag, flush=True)
    time.sleep(600)

if point == "mid-epoch":  # epoch 2, a few steps in
    real_batch_end = trainer.StopOnNonFiniteLoss.on_train_batch_end
    def batch_end(self, batch, logs=None):
        real_batch_end(self, batch, logs)
        if self.epoch == 1 and batch == 5:
            hold(point)
    trainer.StopOnNonFiniteLoss.on_train_batch_end = batch_end
elif point == "checkpoint":  # half of epoch 2's checkpoint file is on disk
    real_save = keras.Model.save
    def save(self, filepath, *args, **kwargs):
        real_save(self, filepath, *args, **kwargs)
        if "epoch_0002" in str(filepath):
            data = open(filepath, "rb").read()
            open(filepath, "wb").write(data[: len(data) // 2])
            hold(point)
    keras.Model.save = save
elif point == "export":  # the SavedModel is written to its staging folder, not renamed
    from keras_alexnet import export
    def make_readable(root):
        hold(point)
    export.make_readable = make_readable
train.main(argv)
print("FINISHED", flush=True)
"""


def _run_child(point, argv):
    """Runs the CLI in a child; SIGKILLs it once it reports ``point``. Returns its stdout."""
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, point, *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("AT "):
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    if point == "none":
        assert proc.returncode == 0, stderr[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, stderr[-3000:])
    return "".join(lines)


def test_killed_runs_resume_without_duplicates_leftovers_or_extra_exports(
        shapes_data_dir, tmp_path):
    run_dir, models = tmp_path / "run", tmp_path / "models"
    argv = ["--preset", "smoke", "--data-dir", shapes_data_dir, "--epochs", "3", "--quiet",
            "--run-dir", str(run_dir), "--export-dir", str(models)]

    def state_epoch():
        return json.loads((run_dir / "state.json").read_text())["epoch"]

    def history_epochs():
        return [r.split(",")[0] for r in (run_dir / "history.csv").read_text().splitlines()[1:]]

    _run_child("mid-epoch", argv)
    assert state_epoch() == 1 and history_epochs() == ["0"]

    _run_child("checkpoint", argv)  # epoch 2 logged, its checkpoint half-written
    assert state_epoch() == 1 and history_epochs() == ["0", "1"]
    assert (run_dir / "checkpoints" / ".epoch_0002.tmp.keras").exists()

    out = _run_child("export", argv)  # trains epochs 2 and 3, killed while exporting
    assert "Removed" in out and ".epoch_0002.tmp.keras" in out
    assert state_epoch() == 3 and history_epochs() == ["0", "1", "2"]
    staging = [p.name for p in models.iterdir()]
    assert len(staging) == 1 and staging[0].startswith(".tmp-1-")
    assert json.loads((run_dir / "export.json").read_text())["status"] == "pending"

    out = _run_child("none", argv)  # the same command again: completes
    assert "FINISHED" in out and "SavedModel exported to" in out
    assert history_epochs() == ["0", "1", "2"]
    assert listing(models) != [] and [p.name for p in models.iterdir()] == ["1"]
    assert (models / "1" / "saved_model.pb").is_file()
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")
                or ".tmp." in p.name]
    record = json.loads((run_dir / "export.json").read_text())
    assert (record["status"], record["version"], record["epoch"]) == ("done", 1, 3)

    # Rerunning the finished run exports nothing new; asking for it exports version 2.
    config = smoke(shapes_data_dir, epochs=3)
    summary = trainer.run(config, run_dir, models, verbose=0)
    assert summary["export_path"] is None and summary["previous_export"] == str(models / "1")
    assert [p.name for p in models.iterdir()] == ["1"]
    summary = trainer.run(config, run_dir, models, verbose=0, force_export=True)
    assert summary["export_path"] == str(models / "2")
    assert sorted(p.name for p in models.iterdir()) == ["1", "2"]
    assert history_epochs() == ["0", "1", "2"]
