"""Exact resume: a run SIGKILLed at any point and rerun ends as if it had never stopped.

One uninterrupted run is the reference. A second run of the same command is killed
(a real SIGKILL, `keras_alexnet.faults`) three times, at the points that matter, and
rerun after each kill:

1. during a checkpoint write: the epoch-1 checkpoint's files are on disk and its
   history row is written, but ``state.json`` does not name it yet;
2. mid-epoch: after step 40 of 60, five steps after the newest checkpoint;
3. during the export: the SavedModel version is staged but not renamed.

The last rerun finishes. Its final probabilities on fixed inputs must equal the
reference's within 1e-6 and its ``history.csv`` must equal the reference's row for row.
Deterministic ops (``--deterministic``) on CPU, dropout on (its random state is part of
the checkpoint), PCA noise, crops and flips on.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_alexnet.faults import ENV_VAR

pytestmark = pytest.mark.slow

CHECKPOINT_EVERY = 7  # 30 steps per epoch: mid-epoch checkpoints at 7, 14, 21, 28, 35, ...


def _train(shapes_data_dir, run_dir, export_dir, crash_at=None):
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if crash_at:
        env[ENV_VAR] = crash_at
    command = [sys.executable, "training/train.py", "--preset", "smoke",
               "--data-dir", shapes_data_dir, "--run-dir", str(run_dir),
               "--export-dir", str(export_dir), "--epochs", "2", "--dropout-rate", "0.5",
               "--checkpoint-every", str(CHECKPOINT_EVERY), "--deterministic", "--quiet"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


def _probabilities(version_dir, pixels):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(version_dir))
    return loaded.signatures["serving_pixels"](pixels=tf.constant(pixels))[
        "probabilities"].numpy()


def _state(run_dir):
    return json.loads((run_dir / "state.json").read_text())


def test_killed_three_times_ends_like_the_uninterrupted_run(shapes_data_dir, tmp_path):
    reference = _train(shapes_data_dir, tmp_path / "ref", tmp_path / "ref_models")
    assert reference.returncode == 0, reference.stderr[-3000:]

    run, models = tmp_path / "run", tmp_path / "models"
    # 1. Killed during the epoch-end checkpoint of epoch 1 (global step 30).
    killed = _train(shapes_data_dir, run, models, crash_at="checkpoint:30")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (run / "checkpoints" / "ckpt-30.index").exists()  # written, not committed
    assert _state(run)["checkpoints"][-1] == "ckpt-28"
    assert len((run / "history.csv").read_text().splitlines()) == 2  # header + epoch 0

    # 2. Rerun: resumes from step 28 (dropping ckpt-30 and epoch 0's row), killed at step 40.
    killed = _train(shapes_data_dir, run, models, crash_at="step:40")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "Resuming" in killed.stdout and "step 28 of 30" in killed.stdout, killed.stdout
    assert _state(run)["global_step"] == 35

    # 3. Rerun: resumes from step 35, finishes training, killed while exporting.
    killed = _train(shapes_data_dir, run, models, crash_at="export")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "step 5 of 30" in killed.stdout, killed.stdout
    assert not (models / "1").exists()
    assert [p.name for p in models.iterdir() if p.name.startswith(".tmp-")]  # staged only

    # 4. Rerun: nothing left to train; removes the staging folder and exports.
    final = _train(shapes_data_dir, run, models)
    assert final.returncode == 0, final.stderr[-3000:]
    assert sorted(p.name for p in models.iterdir()) == ["1"]

    assert (run / "history.csv").read_text() == (tmp_path / "ref" / "history.csv").read_text()
    pixels = np.random.default_rng(0).normal(0, 60, (8, 67, 67, 3)).astype(np.float32)
    expected = _probabilities(tmp_path / "ref_models" / "1", pixels)
    actual = _probabilities(models / "1", pixels)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)
    # Not a vacuous match: the model is trained, and other inputs give other outputs.
    assert np.abs(expected - expected.mean(axis=0)).max() > 1e-3
