"""Training never loses or fakes work: divergence, checks before writing, kills, reruns.

The kills are real: the CLI runs in a child process that `keras_alexnet.faults` SIGKILLs
at a named point (``KERAS_ALEXNET_CRASH_AT``), so no ``finally`` block or buffered write
of the child runs. Divergence is provoked in process by monkeypatching the loop's own
functions (`RunDirectory.restore`, `loop.make_eval_step`).
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_alexnet import export
from keras_alexnet.datasets import folder
from keras_alexnet.faults import ENV_VAR
from keras_alexnet.training import loop
from keras_alexnet.training.config import PRESETS
from keras_alexnet.training.run_dir import RunDirectory

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGES = sorted((ROOT / "tests" / "data" / "images").iterdir())
STEPS = 30  # the smoke preset on alexnet_shapes/tiny: 480 images in batches of 16


def smoke(data_dir, **overrides):
    return dataclasses.replace(PRESETS["smoke"], data_dir=data_dir, **overrides)


def image_folder(root, classes, per_class=3):
    """``root/<class>/`` with real JPEGs, ``per_class`` each (val_split picks one)."""
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            shutil.copy(IMAGES[(c * per_class + i) % len(IMAGES)],
                        root / f"class{c}" / f"{i}.jpg")
    return root


def listing(path):
    return sorted(str(p.relative_to(path)) for p in pathlib.Path(path).rglob("*"))


def snapshot(run_dir):
    """Every file of a run directory but its TensorBoard logs, with its bytes."""
    run_dir = pathlib.Path(run_dir)
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file() and "logs" not in p.relative_to(run_dir).parts}


def history_epochs(run_dir):
    return [row["epoch"] for row in RunDirectory(run_dir).read_history()]


# Divergence --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_good_epoch(shapes_data_dir, tmp_path_factory):
    """A run directory after one healthy epoch (epoch-end checkpoints only)."""
    run_dir = tmp_path_factory.mktemp("good") / "run"
    config = smoke(shapes_data_dir, epochs=1, checkpoint_every=0)
    loop.train(config, run_dir, run_dir.parent / "unused", verbose=0, do_export=False)
    return config, run_dir


def _diverge_on_resume(monkeypatch):
    """Makes the next resumed run's optimiser explode (learning rate 1e6)."""
    real_restore = RunDirectory.restore

    def diverging_restore(self, model, optimizer=None, checkpoint=None):
        path = real_restore(self, model, optimizer, checkpoint)
        if optimizer is not None:
            optimizer.learning_rate.assign(1e6)
        return path

    monkeypatch.setattr(RunDirectory, "restore", diverging_restore)


@pytest.mark.slow
def test_diverging_loss_stops_commits_nothing_and_the_last_good_checkpoint_resumes(
        one_good_epoch, tmp_path, monkeypatch):
    config, good = one_good_epoch
    run_dir, models = tmp_path / "run", tmp_path / "models"
    shutil.copytree(good, run_dir)
    before = snapshot(run_dir)
    assert json.loads(before["state.json"])["checkpoints"] == [f"ckpt-{STEPS}"]

    _diverge_on_resume(monkeypatch)
    with pytest.raises(loop.NonFiniteLossError,
                       match=r"Epoch 2, step \d+: the loss is .* keeps the last good"):
        loop.train(dataclasses.replace(config, epochs=3), run_dir, models, verbose=0)
    after = snapshot(run_dir)
    # Nothing of the diverged epoch was committed: state, checkpoints and history are
    # byte for byte what the good epoch left (config.json took the new epoch count).
    assert {k: v for k, v in after.items() if k != "config.json"} == {
        k: v for k, v in before.items() if k != "config.json"}
    assert history_epochs(run_dir) == [0]
    assert not models.exists() and not (run_dir / "export.json").exists()

    monkeypatch.undo()  # the same run directory still resumes from its last good checkpoint
    summary = loop.train(dataclasses.replace(config, epochs=2), run_dir, models, verbose=0,
                         do_export=False)
    assert np.isfinite(summary["val_loss"]) and summary["export_path"] is None
    assert history_epochs(run_dir) == [0, 1]
    assert RunDirectory(run_dir).read_state().global_step == 2 * STEPS


@pytest.mark.slow
def test_a_checkpoint_committed_before_a_divergence_holds_weights_with_a_finite_loss(
        one_good_epoch, tmp_path, monkeypatch):
    """With a checkpoint every step, what state.json names when the loss diverges must
    still be a good checkpoint (the error message says so): its weights give a finite
    loss on the very batch the loop would train on next."""
    config, good = one_good_epoch
    run_dir, models = tmp_path / "run", tmp_path / "models"
    shutil.copytree(good, run_dir)
    _diverge_on_resume(monkeypatch)
    resumed = dataclasses.replace(config, epochs=2, checkpoint_every=1)
    with pytest.raises(loop.NonFiniteLossError, match=r"Epoch 2, step \d+: the loss is") as info:
        loop.train(resumed, run_dir, models, verbose=0)
    failed_step = STEPS + int(re.search(r"step (\d+)", str(info.value)).group(1))
    monkeypatch.undo()

    run = RunDirectory(run_dir)
    state = run.read_state()
    assert state.global_step < failed_step  # the diverged step itself is not committed
    assert history_epochs(run_dir) == [0] and not models.exists()
    model = run.load_model()
    assert all(np.isfinite(w).all() for w in model.get_weights())
    source, mean = loop.load_data(resumed)
    data = loop.Data(tf.distribute.get_strategy(), source, resumed, mean, resumed.batch_size)
    pixels, labels = next(iter(data.train_epoch(state.epoch, skip_steps=state.step)))
    loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(
        labels, model(pixels, training=True), from_logits=True)))
    assert np.isfinite(loss), (
        f"state.json names {state.checkpoint} (global step {state.global_step}, the loop "
        f"failed at step {failed_step}), whose weights give a loss of {loss} on the next "
        "training batch: a diverged checkpoint was committed as the last good one")


@pytest.mark.slow
def test_a_non_finite_validation_loss_commits_nothing_of_the_epoch(
        shapes_data_dir, tmp_path, monkeypatch):
    real_eval_step = loop.make_eval_step

    def poisoned_eval_step(model, strategy):
        step = real_eval_step(model, strategy)
        return lambda batch: tf.tensor_scatter_nd_update(step(batch), [[0]], [np.nan])

    monkeypatch.setattr(loop, "make_eval_step", poisoned_eval_step)
    run_dir, models = tmp_path / "run", tmp_path / "models"
    with pytest.raises(loop.NonFiniteLossError, match=r"Epoch 1: the validation loss is nan"):
        loop.train(smoke(shapes_data_dir, epochs=1, checkpoint_every=10), run_dir, models,
                   verbose=0)
    state = RunDirectory(run_dir).read_state()
    # The mid-epoch checkpoints are kept; the epoch end (step 30) is neither committed nor
    # written, and its history row is not logged.
    assert (state.epoch, state.step, state.global_step) == (0, 20, 20)
    assert state.checkpoints == ["ckpt-10", "ckpt-20"]
    assert not list((run_dir / "checkpoints").glob(f"ckpt-{STEPS}*"))
    assert not (run_dir / "history.csv").exists()
    assert not models.exists() and not (run_dir / "export.json").exists()


@pytest.mark.slow
def test_cli_with_a_huge_learning_rate_exits_non_zero_and_exports_nothing(
        shapes_data_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "training/train.py", "--preset", "smoke", "--data-dir",
         shapes_data_dir, "--learning-rate", "1e6", "--epochs", "1", "--quiet",
         "--run-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "models")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr  # a message for the user, not a stack
    assert "error: Epoch 1, step" in proc.stderr and "not a finite number" in proc.stderr
    assert "lower learning rate (it was 1e+06)" in proc.stderr
    assert not (tmp_path / "models").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "logs"]


# Checks before anything is written ----------------------------------------------------

def test_cli_refuses_an_unknown_dataset_with_a_message_and_writes_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "training/train.py", "--preset", "smoke", "--dataset", "nope",
         "--run-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Unknown dataset 'nope'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_bad_datasets_are_refused_before_anything_is_written(shapes_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="Unknown dataset 'alexnet_shape'"):
        loop.train(smoke(shapes_data_dir, dataset="alexnet_shape"), run_dir, tmp_path / "m")
    assert not run_dir.exists()
    one = image_folder(tmp_path / "one", 1)
    with pytest.raises(ValueError, match="has 1 class"):
        loop.train(smoke(shapes_data_dir, dataset=f"folder:{one}", val_split=0.3), run_dir,
                   tmp_path / "m")
    assert not run_dir.exists()
    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    (broken / "a" / "x.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="0 decodable training"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", folder.UndecodableImagesWarning)
            loop.train(smoke(shapes_data_dir, dataset=f"folder:{broken}", val_split=0.3),
                       run_dir, tmp_path / "m")
    assert not run_dir.exists() and not (tmp_path / "m").exists()


def test_an_old_release_run_directory_is_refused_before_anything_is_written(
        shapes_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    config = smoke(shapes_data_dir, epochs=2)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(config.to_json())
    (run_dir / "checkpoints" / "epoch_0001.keras").write_bytes(b"old format")
    before = snapshot(run_dir)
    with pytest.raises(ValueError, match="older release"):
        loop.train(config, run_dir, tmp_path / "m", verbose=0)
    assert snapshot(run_dir) == before and not (tmp_path / "m").exists()


@pytest.mark.slow
def test_three_classes_export_top_three_and_fewer_epochs_are_refused(tmp_path):
    root = image_folder(tmp_path / "pics", 3)
    config = dataclasses.replace(PRESETS["smoke"], dataset=f"folder:{root}", val_split=0.34,
                                 data_dir=str(tmp_path / "cache"), batch_size=2, epochs=1)
    summary = loop.train(config, tmp_path / "run", tmp_path / "models", verbose=0)
    metadata = json.loads((pathlib.Path(summary["export_path"]) / "assets.extra"
                           / export.METADATA_FILE).read_text())
    assert metadata["top_k"] == 3 and metadata["class_names"] == ["class0", "class1", "class2"]
    assert RunDirectory(tmp_path / "run").read_state().num_classes == 3
    before = snapshot(tmp_path / "run")
    with pytest.raises(ValueError, match="has trained 1 epochs already; epochs=0 is fewer"):
        loop.train(dataclasses.replace(config, epochs=0), tmp_path / "run", tmp_path / "models")
    assert snapshot(tmp_path / "run") == before
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["1"]


# Input files ---------------------------------------------------------------------------

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
    run = RunDirectory(tmp_path)
    run.history_path.write_text(
        "epoch,loss,top1\n0,2.3,0.1\n1,2.0,0.2\n1,1.9,0.25\n2,1.8,0.3\n3,1.")
    run.truncate_history(2)
    assert run.history_path.read_text() == "epoch,loss,top1\n0,2.3,0.1\n1,1.9,0.25\n"
    run.truncate_history(0)
    assert not run.history_path.exists()


# Kills ---------------------------------------------------------------------------------

def _train_cli(argv, crash_at=None):
    """The CLI in a child process, SIGKILLed at ``crash_at`` (a `faults` point)."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if crash_at:
        env[ENV_VAR] = crash_at
    proc = subprocess.Popen([sys.executable, "training/train.py", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    expected = -9 if crash_at else 0
    assert proc.returncode == expected, (crash_at, proc.returncode, err[-3000:])
    if crash_at:
        assert f"{ENV_VAR}={crash_at}: killing" in err
    return out, proc.pid


def _temporary(directory, name, pid):
    """A `keras_alexnet.files` temporary named as process ``pid`` of this host names it."""
    path = directory / f".tmp-{name}-{socket.gethostname().replace('-', '_')}-{pid}-x1y2"
    path.write_text("partial")
    return path


@pytest.mark.slow
def test_killed_runs_resume_without_duplicates_leftovers_or_extra_exports(
        shapes_data_dir, tmp_path):
    run_dir, models = tmp_path / "run", tmp_path / "models"
    argv = ["--preset", "smoke", "--data-dir", shapes_data_dir, "--epochs", "2", "--quiet",
            "--checkpoint-every", "0", "--run-dir", str(run_dir), "--export-dir", str(models)]
    run = RunDirectory(run_dir)

    _train_cli(argv, crash_at=f"step:{STEPS + 15}")  # half-way through epoch 2
    state = run.read_state()
    assert (state.epoch, state.global_step, state.checkpoints) == (1, STEPS, [f"ckpt-{STEPS}"])
    assert history_epochs(run_dir) == [0]

    # Epoch 2 trained again from its start, logged, its checkpoint written, not committed.
    out, _ = _train_cli(argv, crash_at=f"checkpoint:{2 * STEPS}")
    assert f"from ckpt-{STEPS} (epoch 2, step 0 of {STEPS})" in out, out
    assert run.read_state().checkpoints == [f"ckpt-{STEPS}"]
    assert history_epochs(run_dir) == [0, 1]
    assert (run_dir / "checkpoints" / f"ckpt-{2 * STEPS}.index").exists()

    # The rerun drops the uncommitted checkpoint and epoch 2's row, trains epoch 2 once
    # more and is killed with the SavedModel staged but not renamed into place.
    out, dead_pid = _train_cli(argv, crash_at="export")
    assert re.search(rf"Removed \S*ckpt-{2 * STEPS}\.index", out), out
    state = run.read_state()
    assert (state.epoch, state.checkpoints) == (2, [f"ckpt-{STEPS}", f"ckpt-{2 * STEPS}"])
    assert history_epochs(run_dir) == [0, 1]
    staging = [p.name for p in models.iterdir()]
    assert len(staging) == 1 and staging[0].startswith(".tmp-1-")
    assert json.loads((run_dir / "export.json").read_text())["status"] == "pending"

    # What other kills leave behind: a dead process's temporaries and private checkpoint
    # folders go; a live process's temporary stays.
    dead = [_temporary(run_dir, "state.json", dead_pid),
            run_dir / "checkpoints" / ".worker-4242", run_dir / "checkpoints" / "ckpt-7_temp"]
    for folder_ in dead[1:]:
        folder_.mkdir()
        (folder_ / "part").write_bytes(b"x")
    live = _temporary(run_dir, "history.csv", os.getpid())

    out, _ = _train_cli(argv)  # the same command again: nothing to train, exports
    assert "SavedModel exported to" in out
    for path in [*dead, models / staging[0]]:
        assert f"Removed {path}," in out, (path, out)
        assert not path.exists()
    assert live.exists()
    live.unlink()
    assert history_epochs(run_dir) == [0, 1]
    assert [p.name for p in models.iterdir()] == ["1"]
    assert (models / "1" / "saved_model.pb").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted(
        f"ckpt-{s}.{ext}" for s in (STEPS, 2 * STEPS)
        for ext in ("index", "data-00000-of-00001"))
    assert not [p for p in [*run_dir.rglob("*"), *models.rglob("*")] if ".tmp" in p.name]
    record = json.loads((run_dir / "export.json").read_text())
    assert (record["status"], record["version"], record["epoch"]) == ("done", 1, 2)

    # Rerunning the finished run exports nothing new; asking for it exports version 2.
    config = smoke(shapes_data_dir, epochs=2, checkpoint_every=0)
    summary = loop.train(config, run_dir, models, verbose=0)
    assert summary["export_path"] is None and summary["previous_export"] == str(models / "1")
    assert [p.name for p in models.iterdir()] == ["1"]
    summary = loop.train(config, run_dir, models, verbose=0, force_export=True)
    assert summary["export_path"] == str(models / "2")
    assert sorted(p.name for p in models.iterdir()) == ["1", "2"]
    assert history_epochs(run_dir) == [0, 1]
