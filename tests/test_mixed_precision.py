"""Mixed precision and XLA on CPU: the model builds and trains a step.

Under ``mixed_float16`` and ``mixed_bfloat16`` the convolutions and dense layers
compute in 16 bits while LRN, the logits (hence softmax and the loss) and every
variable stay float32; float16 trains through a ``LossScaleOptimizer``. ``--jit``
compiles the step with XLA, which TensorFlow also supports on CPU.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_alexnet import custom_loop, trainer
from keras_alexnet.training.config import PRESETS

TINY = dict(num_classes=10, image_size=67, width=0.125, seed=0, dropout_rate=0.0)


def batch(n=8):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, 67, 67, 3)).astype("float32"),
            rng.integers(0, 10, size=n).astype("int64"))


def config(**overrides):
    return dataclasses.replace(PRESETS["smoke"], **overrides)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_builds_and_trains_a_fit_step(policy):
    x, y = batch()
    with trainer.precision_policy(policy):
        model = trainer.compile_model(trainer.build_model(config(), 10), config(
            mixed_precision=policy))
        compute = policy.split("_")[1]
        assert model.get_layer("conv1_a").compute_dtype == compute
        assert model.get_layer("fc6_b").compute_dtype == compute
        assert model.get_layer("norm1_a").compute_dtype == "float32"
        assert model.get_layer("fc8").compute_dtype == "float32"
        assert all(w.dtype == "float32" for w in model.weights)
        assert model(x[:2]).dtype == "float32"
        scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert scaled == (policy == "mixed_float16")
        before = [w.numpy() for w in model.trainable_weights]
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert keras.config.dtype_policy().name == "float32"  # restored
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(before, model.trainable_weights))


def test_custom_loop_step_with_loss_scaling():
    x, y = batch()
    strategy = tf.distribute.get_strategy()
    with trainer.precision_policy("mixed_float16"):
        model = trainer.build_model(config(weight_decay=5e-4), 10)
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3))
        optimizer.build(model.trainable_variables)
        before = [w.numpy() for w in model.trainable_weights]
        step = custom_loop.make_train_step(model, optimizer, strategy, 8)
        data = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
        sums = step(next(iter(data))).numpy()
    assert np.isfinite(sums).all() and sums[3] == 8
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(before, model.trainable_weights))


@pytest.mark.slow
def test_fit_with_xla():
    x, y = batch()
    model = trainer.compile_model(trainer.build_model(config(), 10), config(jit_compile=True))
    assert model.jit_compile is True
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_export_copy_is_float32_and_unplaced():
    with trainer.precision_policy("mixed_bfloat16"):
        model = trainer.build_model(config(), 10, tower_devices=("/cpu:0", "/cpu:0"))
    copy = trainer.inference_copy(model)
    assert copy.tower_devices is None
    assert copy.get_layer("conv1_a").compute_dtype == "float32"
    x, _ = batch(2)
    np.testing.assert_allclose(copy(x), model(x), rtol=0.05, atol=0.05)  # bfloat16 vs fp32
