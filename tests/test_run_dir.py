"""The run directory's checkpoint format: what a checkpoint holds and how it commits."""

import json

import keras
import numpy as np
import pytest

from keras_alexnet.model import AlexNet
from keras_alexnet.training.run_dir import RunDirectory, RunState, checkpoint_object


def _model_and_optimizer(seed):
    model = AlexNet(num_classes=3, image_size=67, width=0.125, seed=seed, dropout_rate=0.5)
    optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def test_a_checkpoint_holds_weights_optimizer_state_and_dropout_randomness(tmp_path):
    model, optimizer = _model_and_optimizer(seed=1)
    pixels = np.random.default_rng(0).normal(0, 50, (2, 67, 67, 3)).astype(np.float32)
    model(pixels, training=True)  # advances the dropout layers' seed state
    optimizer.learning_rate.assign(0.001)  # as a plateau drop does
    optimizer.iterations.assign(17)
    for momentum in optimizer.variables[2:]:
        momentum.assign(np.full(momentum.shape, 0.25, np.float32))
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    state = run.save(checkpoint_object(model, optimizer),
                     RunState(epoch=1, global_step=17, num_classes=3), keep=2)
    assert state.checkpoints == ["ckpt-17"]
    assert json.loads(run.state_path.read_text())["checkpoints"] == ["ckpt-17"]

    other, other_optimizer = _model_and_optimizer(seed=2)  # different weights and seeds
    run.restore(other, other_optimizer)
    for a, b in zip(model.variables, other.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    assert float(other_optimizer.learning_rate.numpy()) == pytest.approx(0.001)
    assert int(other_optimizer.iterations.numpy()) == 17
    assert all(np.all(np.asarray(m) == 0.25) for m in other_optimizer.variables[2:])
    # The same dropout masks from here on: the random state came back too.
    np.testing.assert_array_equal(model(pixels, training=True), other(pixels, training=True))


def test_an_uncommitted_checkpoint_is_never_restored_and_is_cleaned(tmp_path):
    model, optimizer = _model_and_optimizer(seed=1)
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    first = np.asarray(model.get_layer("fc8").kernel).copy()
    state = run.save(checkpoint_object(model, optimizer), RunState(global_step=5), keep=2)
    model.get_layer("fc8").kernel.assign(first + 1.0)

    def killed():
        raise KeyboardInterrupt  # between the checkpoint's files and state.json

    with pytest.raises(KeyboardInterrupt):
        run.save(checkpoint_object(model, optimizer), RunState(global_step=9,
                 checkpoints=state.checkpoints), keep=2, before_commit=killed)
    assert (run.checkpoint_dir / "ckpt-9.index").exists()
    assert run.read_state().checkpoint == "ckpt-5"
    fresh, _ = _model_and_optimizer(seed=3)
    run.restore(fresh)
    np.testing.assert_array_equal(np.asarray(fresh.get_layer("fc8").kernel), first)
    removed = run.clean(run.read_state())
    assert sorted(p.rsplit("/", 1)[-1] for p in removed) == [
        "ckpt-9.data-00000-of-00001", "ckpt-9.index"]
    assert sorted(p.name for p in run.checkpoint_dir.iterdir()) == [
        "ckpt-5.data-00000-of-00001", "ckpt-5.index"]


def test_history_truncation_keeps_complete_rows_of_committed_epochs(tmp_path):
    run = RunDirectory(tmp_path)
    for epoch in range(3):
        run.append_history({"epoch": epoch, "loss": 1.0 / (epoch + 1), "lr": 0.01,
                            "top1": 0.1, "top5": 0.5, "val_loss": 2.0, "val_top1": 0.2,
                            "val_top5": 0.6})
    with open(run.history_path, "a") as f:
        f.write("3,0.2,0.01")  # a row cut short by the kill
    run.truncate_history(2)
    rows = run.read_history()
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[1]["loss"] == 0.5  # written with repr: read back exactly
    run.truncate_history(0)
    assert not run.history_path.exists()
