"""The paper's model parallelism: tower A on one device, tower B on another.

Two logical CPUs can only be made before TensorFlow starts its runtime, so the
placement checks and a CLI run with ``--strategy towers`` run in a fresh Python process
(`SCRIPT`, under both oneDNN settings); the rest of the pytest process is left untouched.
"""

import json
import math
import pathlib
import re
import textwrap

import pytest
from _subprocess import ONEDNN_SETTINGS, run_script

from keras_alexnet import AlexNet, alexnet
from keras_alexnet.training.run_dir import RunDirectory

TINY = dict(num_classes=10, image_size=67, width=0.125, seed=0)

SCRIPT = textwrap.dedent("""
    import json, os
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_alexnet.training import distribute
    distribute.configure_cpu_devices(2)
    import keras, numpy as np, tensorflow as tf
    from keras_alexnet import alexnet
    from keras_alexnet.training import loop

    devices = ("/device:CPU:0", "/device:CPU:1")
    kwargs = dict(num_classes=10, image_size=67, width=0.125, seed=0, dropout_rate=0.0,
                  weight_decay=5e-4)
    placed = alexnet(tower_devices=devices, **kwargs)
    plain = alexnet(**kwargs)
    out = {"variable_devices": {v.path: v.value.device for v in placed.weights}}

    # The traced training step: op name -> device for every convolution.
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(placed.trainable_variables)
    step = loop.make_train_step(placed, optimizer, tf.distribute.get_strategy(), 8)
    spec = (tf.TensorSpec([8, 67, 67, 3]), tf.TensorSpec([8], tf.int64))
    graph = step.get_concrete_function(spec).graph
    out["conv_ops"] = {op.name: op.device for op in graph.get_operations()
                       if op.type.startswith("Conv2D")}

    # One loop step of each model from the same initial weights.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 67, 67, 3)).astype("float32")
    y = rng.integers(0, 10, size=8)
    initial = [w.numpy() for w in plain.weights]
    out["same_init"] = all(np.array_equal(a, b.numpy()) for a, b in zip(initial, placed.weights))
    results = []
    for model in (plain, placed):
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        optimizer.build(model.trainable_variables)
        model_step = loop.make_train_step(model, optimizer, tf.distribute.get_strategy(), 8)
        model_step((tf.constant(x), tf.constant(y)))
        results.append([w.numpy() for w in model.weights])
    out["max_abs_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(*results))
    out["max_update"] = max(float(np.abs(a - b).max()) for a, b in zip(results[0], initial))

    import sys
    from training import train
    data_dir, base = sys.argv[1], sys.argv[2]
    # The model the CLI run builds, to see where its towers were placed.
    built, real_build = [], loop.build_model
    loop.build_model = lambda *a, **k: built.append(real_build(*a, **k)) or built[-1]
    summary = train.main(["--preset", "smoke", "--data-dir", data_dir, "--epochs", "1",
                          "--strategy", "towers", "--cpu-devices", "2", "--quiet",
                          "--run-dir", base + "/run", "--export-dir", base + "/models"])
    (model,) = built
    out["cli_tower_devices"] = list(model.tower_devices)
    out["cli_variable_devices"] = {v.path: v.value.device for v in model.weights}
    out["cli_summary"] = summary
    # What the run left: its committed checkpoint, loaded the way every tool loads one.
    from keras_alexnet.training.run_dir import RunDirectory
    run = RunDirectory(base + "/run")
    trained = run.load_model()
    fresh = loop.build_model(run.read_config(), trained.output_shape[-1])  # the run's init
    out["max_trained_change"] = max(float(np.abs(a.numpy() - b.numpy()).max())
                                    for a, b in zip(trained.weights, fresh.weights))
    out["trained_digest"] = loop.weights_digest(trained)
    out["history"] = run.read_history()
    out["state"] = json.loads(run.state_path.read_text())
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module", params=ONEDNN_SETTINGS, ids=lambda v: f"onednn{v}")
def placement(shapes_data_dir, tmp_path_factory, request):
    base = tmp_path_factory.mktemp("towers")
    return {**run_script(SCRIPT, shapes_data_dir, base, onednn=request.param), "base": str(base)}


def _tower(name):
    """``"a"``/``"b"`` for an op or variable of a per-tower layer (``conv1_b_1/...``)."""
    match = re.search(r"(?:^|/)(?:conv|fc|norm|pool)\d_([ab])(?:_\d+)?/", name)
    match = match or re.search(r"(?:^|/)flatten_([ab])(?:_\d+)?/", name)
    return match.group(1) if match else None


@pytest.mark.slow
def test_each_towers_convolutions_run_on_its_device(placement):
    ops = placement["conv_ops"]
    forward = {n: d for n, d in ops.items() if "gradient" not in n.lower()}
    assert len(forward) == 10, ops  # conv1..conv5, two towers
    # Gradient ops carry no device of their own (the tape builds them outside the
    # layers' scopes); TensorFlow's placer puts them at run time. Forward ops:
    for name, device in forward.items():
        tower = _tower(name)
        assert tower is not None, name
        assert device.endswith("CPU:0" if tower == "a" else "CPU:1"), (name, device)


@pytest.mark.slow
def test_tower_variables_live_on_their_device(placement):
    for path, device in placement["variable_devices"].items():
        tower = _tower(path)
        expected = {"a": "CPU:0", "b": "CPU:1", None: "CPU:0"}[tower]  # fc8 with tower A
        assert device.endswith(expected), (path, device)


@pytest.mark.slow
def test_towers_step_equals_single_device_step(placement):
    assert placement["same_init"]
    assert placement["max_update"] > 1e-6  # the step did change the weights
    assert placement["max_abs_diff"] <= 1e-6 * max(1.0, placement["max_update"])


@pytest.mark.slow
def test_cli_trains_with_towers(placement):
    """``--strategy towers --cpu-devices 2`` from the command line: the run trained one
    epoch (30 steps), committed its checkpoint, and the weights moved from the seed's."""
    summary, history, state = placement["cli_summary"], placement["history"], placement["state"]
    assert summary["epochs"] == 1 and summary["export_path"].endswith("1")
    assert [row["epoch"] for row in history] == [0]
    assert all(math.isfinite(history[0][k]) for k in ("loss", "val_loss"))
    assert history[0]["val_top1"] == pytest.approx(summary["val_top1"])
    assert (state["epoch"], state["global_step"], state["checkpoints"]) == (1, 30, ["ckpt-30"])
    assert state["global_batch"] == 16  # model parallelism: one replica
    assert placement["max_trained_change"] > 1e-4  # trained, not the initial weights
    # The committed checkpoint holds the run's final weights exactly.
    assert placement["trained_digest"] == summary["weights_sha256"]


@pytest.mark.slow
def test_cli_run_placed_its_towers_on_two_devices(placement):
    first, second = placement["cli_tower_devices"]
    assert first.endswith("CPU:0") and second.endswith("CPU:1")
    devices = placement["cli_variable_devices"]
    assert {_tower(path) for path in devices} == {"a", "b", None}
    for path, device in devices.items():
        expected = {"a": "CPU:0", "b": "CPU:1", None: "CPU:0"}[_tower(path)]
        assert device.endswith(expected), (path, device)


@pytest.mark.slow
def test_cli_towers_export_classifies(placement, image_paths):
    import numpy as np
    import tensorflow as tf

    from keras_alexnet.export import METADATA_FILE

    version = pathlib.Path(placement["cli_summary"]["export_path"])
    names = json.loads((version / "assets.extra" / METADATA_FILE).read_text())["class_names"]
    assert len(names) == 10
    loaded = tf.saved_model.load(str(version))
    images = tf.constant([p.read_bytes() for p in image_paths[:3]])
    outputs = loaded.signatures["serving_default"](images=images)
    scores = outputs["scores"].numpy()
    assert scores.shape == (3, 5) and np.all(np.diff(scores, axis=1) <= 0)
    assert np.all((scores >= 0) & (scores <= 1)) and np.all(scores.sum(axis=1) <= 1 + 1e-5)
    labels = [[label.decode() for label in row] for row in outputs["labels"].numpy()]
    assert {label for row in labels for label in row} <= set(names)
    assert [[names[c] for c in row] for row in outputs["classes"].numpy()] == labels
    # The export is the trained model (float32, unplaced): the checkpoint's probabilities.
    pixels = np.random.default_rng(0).normal(0, 60, (4, 67, 67, 3)).astype(np.float32)
    exported = loaded.signatures["serving_pixels"](pixels=tf.constant(pixels))["probabilities"]
    run = RunDirectory(pathlib.Path(placement["base"]) / "run")
    expected = tf.nn.softmax(run.load_model()(pixels, training=False))
    np.testing.assert_allclose(exported, expected, atol=1e-5)


def test_tower_devices_keep_names_parameters_and_config():
    plain = alexnet(**TINY)
    placed = alexnet(tower_devices=("/cpu:0", "/cpu:0"), **TINY)
    assert [layer.name for layer in placed.layers] == [layer.name for layer in plain.layers]
    assert placed.count_params() == plain.count_params()
    assert placed.get_layer("conv1_b").device == "/cpu:0"
    assert type(placed.get_layer("conv1_a")).__name__ == "PlacedConv2D"
    assert type(plain.get_layer("conv1_a")).__name__ == "Conv2D"
    clone = AlexNet.from_config(placed.get_config())
    assert clone.tower_devices is None  # placement is not part of the saved config
    assert "tower_devices" not in placed.get_config()


def test_tower_devices_need_two_towers():
    with pytest.raises(ValueError, match="Received: towers=1"):
        alexnet(towers=1, tower_devices=("/cpu:0", "/cpu:1"), **TINY)
