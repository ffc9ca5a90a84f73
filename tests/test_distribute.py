"""Data parallelism: the training loop under MirroredStrategy over two logical CPUs
equals the loop on one device.

Logical CPUs must exist before TensorFlow initialises, so the two-replica checks run
in a fresh Python process, under both oneDNN settings; the strategy, TF_CONFIG and
run-directory helpers are tested in-process.
"""

import json
import math
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from _subprocess import ONEDNN_SETTINGS, run_script

from keras_alexnet.model import AlexNet
from keras_alexnet.training import distribute, loop
from keras_alexnet.training.run_dir import RunDirectory, RunState, checkpoint_object
from training import train

SCRIPT = textwrap.dedent("""
    import dataclasses, json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_alexnet.training import distribute
    distribute.configure_cpu_devices(2)
    import keras, numpy as np, tensorflow as tf
    from keras_alexnet import alexnet
    from keras_alexnet.training import loop
    from keras_alexnet.training.config import PRESETS
    from training import train

    kwargs = dict(num_classes=10, image_size=67, width=0.125, seed=0, dropout_rate=0.0,
                  weight_decay=5e-4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 67, 67, 3)).astype("float32")
    y = rng.integers(0, 10, size=8)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = tf.distribute.get_strategy()

    def loop_step(strategy):
        with strategy.scope():
            model = alexnet(**kwargs)
            optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
            optimizer.build(model.trainable_variables)
        start = [w.numpy() for w in model.weights]
        step = loop.make_train_step(model, optimizer, strategy, global_batch=8)
        data = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
        sums = step(next(iter(data))).numpy()
        return start, [w.numpy() for w in model.weights], sums

    def compare(a, b):
        (a0, a1), (b0, b1) = a[:2], b[:2]
        assert all(np.array_equal(p, q) for p, q in zip(a0, b0))
        rel = max(float(np.abs(p - q).max() / max(np.abs(q).max(), 1e-12))
                  for p, q in zip(a1, b1))
        upd = max(float(np.abs((p - p0) - (q - q0)).max() / max(np.abs(q - q0).max(), 1e-12))
                  for p, q, p0, q0 in zip(a1, b1, a0, b0))
        moved = max(float(np.abs(q - q0).max()) for q, q0 in zip(b1, b0))
        return {"weights_rel": rel, "update_rel": upd, "moved": moved}

    out = {"replicas": mirrored.num_replicas_in_sync}
    m, s = loop_step(mirrored), loop_step(single)
    out["loop"] = compare(m, s)
    out["loop_sums"] = [m[2].tolist(), s[2].tolist()]

    # 97 images in batches of 32: the last global batch holds one image, so replica 1
    # gets an empty batch (oneDNN's Conv2D mishandles those; AlexNet.call guards it).
    ragged = rng.normal(size=(97, 67, 67, 3)).astype("float32")

    def predict(strategy):
        with strategy.scope():
            model = alexnet(**kwargs)
        return model.predict(tf.data.Dataset.from_tensor_slices(ragged).batch(32), verbose=0)

    m_logits, s_logits = predict(mirrored), predict(single)
    out["ragged"] = {"rows": len(m_logits),
                     "logits_diff": float(np.abs(m_logits - s_logits).max())}

    # The loop's validation pass: 100 images, padded with zero-weight examples to whole
    # per-replica batches; every real image counts once, on one device or two.
    data_dir, base = sys.argv[1], sys.argv[2]
    config = dataclasses.replace(PRESETS["smoke"], data_dir=data_dir)
    source, mean = loop.load_data(config)

    def validation(strategy):
        with strategy.scope():
            model = loop.build_model(config, source.num_classes)
        data = loop.Data(strategy, source, config, mean,
                         config.batch_size * strategy.num_replicas_in_sync)
        step = loop.make_eval_step(model, strategy)
        total = np.zeros(4)
        for _, batch in zip(range(data.eval_steps), data.validation()):
            total += step(batch).numpy()
        return {"sums": total.tolist(), "eval_steps": data.eval_steps,
                "steps_per_epoch": data.steps_per_epoch}

    out["validation"] = {"mirrored": validation(mirrored), "single": validation(single)}

    summary = train.main(["--preset", "smoke", "--data-dir", data_dir, "--epochs", "1",
                          "--strategy", "mirrored", "--cpu-devices", "2", "--quiet",
                          "--no-export", "--run-dir", base + "/run"])
    out["cli"] = summary
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module", params=ONEDNN_SETTINGS, ids=lambda v: f"onednn{v}")
def two_replicas(shapes_data_dir, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("mirrored")
    return run_script(SCRIPT, shapes_data_dir, out, timeout=400, onednn=request.param), out


@pytest.mark.slow
def test_two_replica_step_equals_single_device_step(two_replicas):
    result, _ = two_replicas
    assert result["replicas"] == 2
    assert result["loop"]["moved"] > 1e-6  # the step changed the weights
    assert result["loop"]["weights_rel"] <= 1e-5, result["loop"]
    # Weight decay is on: a regularisation loss not divided by the replicas would make
    # the decay part of the update twice as large; the updates themselves agree.
    assert result["loop"]["update_rel"] <= 1e-3, result["loop"]


@pytest.mark.slow
def test_loop_metrics_are_summed_over_replicas(two_replicas):
    result, _ = two_replicas
    mirrored, single = result["loop_sums"]
    assert mirrored[3] == single[3] == 8  # every example of the global batch counted once
    assert mirrored[0] == pytest.approx(single[0], rel=1e-5)
    assert mirrored[1:3] == single[1:3]


@pytest.mark.slow
def test_empty_replica_batch_predicts_like_one_device(two_replicas):
    ragged = two_replicas[0]["ragged"]
    assert ragged["rows"] == 97
    assert ragged["logits_diff"] <= 1e-4


@pytest.mark.slow
def test_padded_validation_counts_every_image_once_on_two_replicas(two_replicas):
    mirrored, single = (two_replicas[0]["validation"][k] for k in ("mirrored", "single"))
    # 100 images: 7 per-replica batches of 16, in 4 steps of two replicas or 7 of one.
    assert (mirrored["eval_steps"], single["eval_steps"]) == (4, 7)
    assert (mirrored["steps_per_epoch"], single["steps_per_epoch"]) == (15, 30)
    assert mirrored["sums"][3] == single["sums"][3] == 100
    assert mirrored["sums"][0] == pytest.approx(single["sums"][0], rel=1e-5)
    assert mirrored["sums"][1:3] == pytest.approx(single["sums"][1:3], abs=1e-6)
    assert 0 < mirrored["sums"][2] <= 100 and math.isfinite(mirrored["sums"][0])


@pytest.mark.slow
def test_cli_trains_mirrored(two_replicas):
    result, out = two_replicas
    summary, run = result["cli"], RunDirectory(out / "run")
    assert summary["epochs"] == 1 and 0 <= summary["val_top1"] <= 1
    assert summary["export_path"] is None
    saved = json.loads(run.config_path.read_text())
    assert (saved["strategy"], saved["cpu_devices"]) == ("mirrored", 2)
    # Two replicas of 16: a global batch of 32, 15 steps per epoch, the learning rate
    # scaled by 2 (the linear scaling rule).
    state = run.read_state()
    assert (state.epoch, state.global_step, state.global_batch) == (1, 15, 32)
    assert state.checkpoints == ["ckpt-15"]
    (row,) = run.read_history()
    assert row["lr"] == pytest.approx(2 * saved["learning_rate"])
    assert math.isfinite(row["loss"]) and row["val_loss"] == pytest.approx(summary["val_loss"])
    # The committed checkpoint is the final, mirrored weights, loadable on one device.
    assert loop.weights_digest(run.load_model()) == summary["weights_sha256"]


def test_chief_detection_from_tf_config():
    cluster = {"worker": ["h0:1", "h1:1"]}
    assert distribute.is_chief({})
    assert distribute.is_chief({"cluster": cluster, "task": {"type": "worker", "index": 0}})
    assert not distribute.is_chief({"cluster": cluster, "task": {"type": "worker", "index": 1}})
    with_chief = {**cluster, "chief": ["c:1"]}
    assert distribute.is_chief({"cluster": with_chief, "task": {"type": "chief", "index": 0}})
    assert not distribute.is_chief({"cluster": with_chief,
                                    "task": {"type": "worker", "index": 0}})


def test_task_and_worker_count(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}))
    assert distribute.task() == ("worker", 1)
    assert not distribute.is_chief()
    monkeypatch.delenv("TF_CONFIG")
    assert distribute.task() == (None, 0) and distribute.is_chief()
    assert distribute.num_workers(tf.distribute.get_strategy()) == 1


def test_only_the_chief_keeps_checkpoint_files(tmp_path):
    model = AlexNet(num_classes=3, image_size=67, width=0.125, seed=0)
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)
    chief, worker = RunDirectory(tmp_path / "run"), RunDirectory(tmp_path / "run", chief=False)
    assert chief.checkpoint_write_dir() == chief.checkpoint_dir
    private = worker.checkpoint_write_dir()
    assert private.parent == chief.checkpoint_dir and private.name.startswith(".worker-")

    state = worker.save(checkpoint_object(model, optimizer), RunState(global_step=4), keep=2)
    assert state.checkpoints == []  # nothing committed by a worker
    assert not private.exists() and not chief.state_path.exists()
    assert list(chief.checkpoint_dir.iterdir()) == []
    state = chief.save(checkpoint_object(model, optimizer), RunState(global_step=4), keep=2)
    assert state.checkpoints == ["ckpt-4"] and chief.read_state().checkpoint == "ckpt-4"
    assert worker.read_state() == chief.read_state()  # workers read the chief's commit
    restored = AlexNet(num_classes=3, image_size=67, width=0.125, seed=1)
    worker.restore(restored)
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_strategy_errors(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="one of"):
        distribute.make_strategy("horovod")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.make_strategy("multiworker")


def test_cli_scale_flags():
    args = train.build_parser().parse_args(
        ["--strategy", "mirrored", "--cpu-devices", "4", "--mixed-precision", "bfloat16",
         "--jit", "--no-lr-scaling", "--checkpoint-every", "50", "--deterministic"])
    config = train.resolve_config(args)
    assert (config.strategy, config.cpu_devices) == ("mirrored", 4)
    assert (config.mixed_precision, config.jit_compile, config.scale_lr) == (
        "mixed_bfloat16", True, False)
    assert (config.checkpoint_every, config.deterministic) == (50, True)
    default = train.resolve_config(train.build_parser().parse_args([]))
    assert (default.strategy, default.mixed_precision, default.jit_compile) == (
        "default", None, False)
    assert float(loop.build_optimizer(config, replicas=4).learning_rate) == pytest.approx(
        config.learning_rate)  # --no-lr-scaling
    scaled = train.resolve_config(train.build_parser().parse_args(["--strategy", "mirrored"]))
    assert float(loop.build_optimizer(scaled, replicas=4).learning_rate) == pytest.approx(
        4 * scaled.learning_rate)
