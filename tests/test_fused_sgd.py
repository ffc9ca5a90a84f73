"""`FusedSGD`: Keras' SGD-with-momentum rule in one kernel per variable.

Checked against the rule written out in float64 NumPy (v <- mu v - lr g; w <- w + v),
against Keras' own SGD, under a MirroredStrategy of two logical CPUs (each replica's
variables updated by the kernel of its own device), and for checkpoint compatibility.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _subprocess import run_script

from keras_alexnet.training import loop
from keras_alexnet.training.config import TrainConfig
from keras_alexnet.training.fused_sgd import FusedSGD

SHAPES = [(3, 3, 4, 8), (8,), (50, 7)]
LR, MU = 0.05, 0.9


def _gradients(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in range(steps)]


def _start(seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def _run(optimizer, steps):
    variables = [keras.Variable(w) for w in _start()]
    optimizer.build(variables)
    for grads in _gradients(steps):
        optimizer.apply([tf.constant(g) for g in grads], variables)
    return [v.numpy() for v in variables], [m.numpy() for m in optimizer.momentums]


def _rule(steps, lrs):
    """The paper's update in float64, with the learning rate of each step."""
    weights = [w.astype(np.float64) for w in _start()]
    velocity = [np.zeros_like(w) for w in weights]
    for lr, grads in zip(lrs, _gradients(steps)):
        velocity = [MU * v - lr * g.astype(np.float64) for v, g in zip(velocity, grads)]
        weights = [w + v for w, v in zip(weights, velocity)]
    return weights, velocity


def _close_to_rule(got, want):
    # float32 storage: a few roundings of values of order 1 per step.
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, np.abs(b).max()))


def test_three_steps_follow_the_rule_and_keras_sgd():
    steps = 3
    weights, momentums = _run(FusedSGD(LR, momentum=MU), steps)
    want_w, want_v = _rule(steps, [LR] * steps)
    _close_to_rule(weights, want_w)
    _close_to_rule(momentums, want_v)
    assert np.abs(weights[0] - _start()[0]).max() > 0.1  # it moved
    keras_w, keras_v = _run(keras.optimizers.SGD(LR, momentum=MU), steps)
    for a, b in zip(weights + momentums, keras_w + keras_v):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_learning_rate_schedule_reaches_the_kernel():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [LR, LR / 10])
    weights, _ = _run(FusedSGD(schedule, momentum=MU), 3)
    _close_to_rule(weights, _rule(3, [LR, LR, LR / 10])[0])  # iterations 0 and 1, then 2


def _apply_graph_op_types(optimizer):
    variables = [keras.Variable(w) for w in _start()]
    optimizer.build(variables)

    @tf.function
    def apply(grads):
        optimizer.apply(grads, variables)

    graph = apply.get_concrete_function([tf.TensorSpec(s) for s in SHAPES]).graph
    return [op.type for op in graph.get_operations()]


def test_the_update_is_one_kernel_per_variable():
    fused = _apply_graph_op_types(FusedSGD(LR, momentum=MU))
    plain = _apply_graph_op_types(keras.optimizers.SGD(LR, momentum=MU))
    assert fused.count("ResourceApplyKerasMomentum") == len(SHAPES)
    assert "ResourceApplyKerasMomentum" not in plain
    # Keras adds each velocity to its variable in a separate op; the kernel does it itself.
    assert (plain.count("AssignAddVariableOp"), fused.count("AssignAddVariableOp")) == (
        len(SHAPES), 0)
    assert len(fused) < len(plain)


def test_fallbacks_are_keras_sgd():
    for kwargs in (dict(momentum=MU, nesterov=True), dict(momentum=0.0)):
        fused, _ = _run(FusedSGD(LR, **kwargs), 2)
        plain, _ = _run(keras.optimizers.SGD(LR, **kwargs), 2)
        for a, b in zip(fused, plain):
            np.testing.assert_array_equal(a, b)


def test_checkpoints_are_interchangeable_with_keras_sgd(tmp_path):
    fused = FusedSGD(LR, momentum=MU)
    _run(fused, 2)
    plain = keras.optimizers.SGD(LR, momentum=MU, name="sgd")
    plain.build([keras.Variable(np.zeros(s, np.float32)) for s in SHAPES])
    # The same variables under the same optimizer name (the rest of a momentum's path is
    # its model variable's name).
    assert [v.path.split("/")[0] for v in fused.variables] == ["sgd"] * len(plain.variables)
    assert [v.shape for v in fused.variables] == [v.shape for v in plain.variables]
    path = tf.train.Checkpoint(optimizer=fused).write(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(optimizer=plain).read(path).assert_existing_objects_matched()
    for a, b in zip(fused.variables, plain.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_the_loop_builds_it_for_sgd_and_keeps_adam():
    assert type(loop.build_optimizer(TrainConfig(optimizer="sgd"))) is FusedSGD
    assert type(loop.build_optimizer(TrainConfig(optimizer="adam"))) is keras.optimizers.Adam
    wrapped = loop.build_optimizer(TrainConfig(optimizer="sgd", mixed_precision="mixed_float16"))
    assert type(wrapped.inner_optimizer) is FusedSGD


MIRRORED_SCRIPT = """
import json, sys
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from keras_alexnet.training.fused_sgd import FusedSGD
shapes, lr, mu = [(3, 3, 4, 8), (8,), (50, 7)], 0.05, 0.9
rng = np.random.default_rng(1)
start = [rng.normal(size=s).astype(np.float32) for s in shapes]
# Each replica's gradient differs; the strategy sums them before the update.
grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(2)]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    variables = [keras.Variable(w) for w in start]
    optimizer = FusedSGD(lr, momentum=mu)
    optimizer.build(variables)

@tf.function
def step():
    def replica_fn():
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        g = [tf.where(rid == 0, tf.constant(a), tf.constant(b)) for a, b in zip(*grads)]
        optimizer.apply(g, variables)
    strategy.run(replica_fn)

step(); step()
replicas = [[v.value.values[i].numpy().tolist() for v in variables] for i in range(2)]
types = [op.type for op in step.get_concrete_function().graph.get_operations()]
print("RESULT" + json.dumps({"replicas": replicas,
                             "kernels": types.count("ResourceApplyKerasMomentum"),
                             "devices": [v.value.values[i].device for v in variables
                                         for i in range(2)]}))
"""


@pytest.mark.slow
def test_mirrored_replicas_update_their_own_variables_by_the_rule():
    result = run_script(MIRRORED_SCRIPT)
    assert result["kernels"] == 2 * len(SHAPES)  # one kernel per variable per device
    assert sorted({d.rsplit(":", 1)[-1] for d in result["devices"]}) == ["0", "1"]
    rng = np.random.default_rng(1)
    start = [rng.normal(size=s) for s in SHAPES]
    grads = [[rng.normal(size=s) for s in SHAPES] for _ in range(2)]
    summed = [g0.astype(np.float32).astype(np.float64) + g1.astype(np.float32)
              for g0, g1 in zip(*grads)]
    weights = [w.astype(np.float32).astype(np.float64) for w in start]
    velocity = [np.zeros_like(w) for w in weights]
    for _ in range(2):
        velocity = [MU * v - LR * g for v, g in zip(velocity, summed)]
        weights = [w + v for w, v in zip(weights, velocity)]
    for replica in result["replicas"]:
        _close_to_rule([np.array(a) for a in replica], weights)
    for a, b in zip(*result["replicas"]):
        np.testing.assert_array_equal(np.array(a), np.array(b))  # replicas stay in sync
