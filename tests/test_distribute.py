"""Data parallelism: MirroredStrategy over two logical CPUs equals one device.

Logical CPUs must exist before TensorFlow initialises, so the two-replica checks run
in a fresh Python process; the strategy and TF_CONFIG helpers are tested in-process.
"""

import json
import textwrap

import pytest
from _subprocess import ONEDNN_SETTINGS, run_script

from keras_alexnet.training import distribute
from training import train

SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_alexnet.training import distribute
    distribute.configure_cpu_devices(2)
    import keras, numpy as np, tensorflow as tf
    from keras_alexnet import alexnet, custom_loop
    from training import train

    kwargs = dict(num_classes=10, image_size=67, width=0.125, seed=0, dropout_rate=0.0,
                  weight_decay=5e-4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 67, 67, 3)).astype("float32")
    y = rng.integers(0, 10, size=8)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = tf.distribute.get_strategy()

    def fit_step(strategy):
        with strategy.scope():
            model = alexnet(**kwargs)
            model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        start = [w.numpy() for w in model.weights]
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # one global batch
        model.fit(data, epochs=1, verbose=0)
        return start, [w.numpy() for w in model.weights]

    def loop_step(strategy):
        with strategy.scope():
            model = alexnet(**kwargs)
            optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
            optimizer.build(model.trainable_variables)
        start = [w.numpy() for w in model.weights]
        step = custom_loop.make_train_step(model, optimizer, strategy, global_batch=8)
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
    out["fit"] = compare(fit_step(mirrored), fit_step(single))
    m, s = loop_step(mirrored), loop_step(single)
    out["loop"] = compare(m, s)
    out["loop_sums"] = [m[2].tolist(), s[2].tolist()]

    # 97 images in batches of 32: the last global batch holds one image, so replica 1
    # gets an empty batch (oneDNN's Conv2D mishandles those; AlexNet.call guards it).
    ragged = tf.data.Dataset.from_tensor_slices(
        (rng.normal(size=(97, 67, 67, 3)).astype("float32"), rng.integers(0, 10, size=97)))

    def evaluate(strategy):
        with strategy.scope():
            model = alexnet(**kwargs)
            model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1")])
        logits = model.predict(ragged.batch(32).map(lambda a, b: a), verbose=0)
        return model.evaluate(ragged.batch(32), verbose=0, return_dict=True), logits

    (m_eval, m_logits), (s_eval, s_logits) = evaluate(mirrored), evaluate(single)
    out["ragged"] = {"mirrored": m_eval, "single": s_eval, "rows": len(m_logits),
                     "logits_diff": float(np.abs(m_logits - s_logits).max())}

    data_dir, run_dir = sys.argv[1], sys.argv[2]
    summary = train.main(["--preset", "smoke", "--data-dir", data_dir, "--epochs", "1",
                          "--strategy", "mirrored", "--cpu-devices", "2", "--quiet", "--no-export",
                          "--run-dir", run_dir + "/run", "--export-dir", run_dir + "/models"])
    out["cli"] = {k: summary[k] for k in ("val_top1", "epochs")}
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module", params=ONEDNN_SETTINGS, ids=lambda v: f"onednn{v}")
def two_replicas(shapes_data_dir, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("mirrored")
    return run_script(SCRIPT, shapes_data_dir, out, timeout=400, onednn=request.param), out


@pytest.mark.slow
@pytest.mark.parametrize("path", ["fit", "loop"])
def test_two_replica_step_equals_single_device_step(two_replicas, path):
    result, _ = two_replicas
    assert result["replicas"] == 2
    assert result[path]["moved"] > 1e-6  # the step changed the weights
    assert result[path]["weights_rel"] <= 1e-5, result[path]
    # Weight decay is on: a regularisation loss not divided by the replicas would make
    # the decay part of the update twice as large; the updates themselves agree.
    assert result[path]["update_rel"] <= 1e-3, result[path]


@pytest.mark.slow
def test_custom_loop_metrics_are_summed_over_replicas(two_replicas):
    result, _ = two_replicas
    mirrored, single = result["loop_sums"]
    assert mirrored[3] == single[3] == 8  # every example of the global batch counted once
    assert mirrored[0] == pytest.approx(single[0], rel=1e-5)
    assert mirrored[1:3] == single[1:3]


@pytest.mark.slow
def test_empty_replica_batch_evaluates_like_one_device(two_replicas):
    ragged = two_replicas[0]["ragged"]
    assert ragged["rows"] == 97
    assert ragged["logits_diff"] <= 1e-4
    assert ragged["mirrored"]["top1"] == pytest.approx(ragged["single"]["top1"], abs=1e-7)
    assert ragged["mirrored"]["loss"] == pytest.approx(ragged["single"]["loss"], rel=1e-5)


@pytest.mark.slow
def test_cli_trains_mirrored(two_replicas):
    result, out = two_replicas
    assert result["cli"]["epochs"] == 1 and 0 <= result["cli"]["val_top1"] <= 1
    assert len((out / "run" / "history.csv").read_text().splitlines()) == 2
    saved = json.loads((out / "run" / "config.json").read_text())
    assert (saved["strategy"], saved["cpu_devices"]) == ("mirrored", 2)


def test_chief_detection_from_tf_config():
    cluster = {"worker": ["h0:1", "h1:1"]}
    assert distribute.is_chief({})
    assert distribute.is_chief({"cluster": cluster, "task": {"type": "worker", "index": 0}})
    assert not distribute.is_chief({"cluster": cluster, "task": {"type": "worker", "index": 1}})
    with_chief = {**cluster, "chief": ["c:1"]}
    assert distribute.is_chief({"cluster": with_chief, "task": {"type": "chief", "index": 0}})
    assert not distribute.is_chief({"cluster": with_chief,
                                    "task": {"type": "worker", "index": 0}})


def test_worker_write_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}))
    assert distribute.write_dir(tmp_path, chief=True) == str(tmp_path)
    assert distribute.write_dir(tmp_path, chief=False) == str(tmp_path / ".worker-worker-1")


def test_strategy_errors(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="one of"):
        distribute.make_strategy("horovod")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.make_strategy("multiworker")


def test_cli_scale_flags():
    args = train.build_parser().parse_args(
        ["--strategy", "mirrored", "--cpu-devices", "4", "--mixed-precision", "bfloat16",
         "--jit", "--no-lr-scaling"])
    config = train.resolve_config(args)
    assert (config.strategy, config.cpu_devices) == ("mirrored", 4)
    assert (config.mixed_precision, config.jit_compile, config.scale_lr) == (
        "mixed_bfloat16", True, False)
    default = train.resolve_config(train.build_parser().parse_args([]))
    assert (default.strategy, default.mixed_precision, default.jit_compile) == (
        "default", None, False)
