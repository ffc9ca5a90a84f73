"""Mixed precision and XLA on CPU, through the training loop's own pieces.

Under ``mixed_float16`` and ``mixed_bfloat16`` the convolutions and dense layers
compute in 16 bits while LRN, the logits (hence softmax and the loss) and every
variable stay float32; float16 trains through a ``LossScaleOptimizer`` whose state is
part of every checkpoint. The export is a float32 copy. ``jit_compile`` compiles each
replica's step with XLA, which TensorFlow also supports on CPU.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from _subprocess import ONEDNN_SETTINGS, own_onednn, run_script

from keras_alexnet.training import loop
from keras_alexnet.training.config import PRESETS
from keras_alexnet.training.run_dir import RunDirectory

POLICIES = ["mixed_float16", "mixed_bfloat16"]


def batch(n=8):
    rng = np.random.default_rng(0)
    return (rng.normal(0, 60, size=(n, 67, 67, 3)).astype("float32"),
            rng.integers(0, 10, size=n).astype("int64"))


def config(**overrides):
    return dataclasses.replace(PRESETS["smoke"], **overrides)


def one_step(model, optimizer, jit_compile=False):
    """One `loop.make_train_step` step on `batch`; returns its summed metrics."""
    x, y = batch()
    strategy = tf.distribute.get_strategy()
    step = loop.make_train_step(model, optimizer, strategy, 8, jit_compile=jit_compile)
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    return step(next(iter(data))).numpy()


def weights(model):
    return [np.array(w) for w in model.trainable_weights]


@pytest.mark.parametrize("policy", POLICIES)
def test_mixed_precision_builds_and_trains_a_loop_step(policy):
    x, _ = batch()
    cfg = config(mixed_precision=policy)
    with loop.precision_policy(policy):
        model = loop.build_model(cfg, 10)
        optimizer = loop.build_optimizer(cfg)
        optimizer.build(model.trainable_variables)
        compute = policy.split("_")[1]
        assert model.get_layer("conv1_a").compute_dtype == compute
        assert model.get_layer("fc6_b").compute_dtype == compute
        assert model.get_layer("norm1_a").compute_dtype == "float32"
        assert model.get_layer("fc8").compute_dtype == "float32"
        assert all(w.dtype == "float32" for w in model.weights)
        assert model(x[:2]).dtype == "float32"
        scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        assert scaled == (policy == "mixed_float16")
        before = weights(model)
        sums = one_step(model, optimizer)
    assert keras.config.dtype_policy().name == "float32"  # restored
    assert np.isfinite(sums).all() and sums[3] == 8
    assert 0 < sums[0] / sums[3] < 10  # a cross-entropy over 10 classes, not a scaled loss
    after = weights(model)
    assert all(w.dtype == np.float32 for w in after)
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))


def test_float16_loss_scaling_is_undone_before_the_update():
    """With weight decay on, a float16 step moves every weight as a float32 step does:
    the loss scale (32768 at first) multiplies the gradients and is divided out again."""
    cfg = config(optimizer="sgd", learning_rate=1e-3, momentum=0.0, weight_decay=5e-4)
    updates = {}
    for policy in ("float32", "mixed_float16"):
        with loop.precision_policy(policy):
            model = loop.build_model(dataclasses.replace(cfg, mixed_precision=policy), 10)
            optimizer = loop.build_optimizer(dataclasses.replace(cfg, mixed_precision=policy))
            optimizer.build(model.trainable_variables)
            assert model.losses  # the L2 terms take part in the step
            before = weights(model)
            sums = one_step(model, optimizer)
            assert np.isfinite(sums).all()
            updates[policy] = [a - b for a, b in zip(weights(model), before)]
    assert float(optimizer.dynamic_scale.numpy()) == 32768.0  # no overflow: not skipped
    for name, full, half in zip([w.path for w in model.trainable_weights],
                                updates["float32"], updates["mixed_float16"]):
        norm = np.linalg.norm(full)
        assert norm > 0, name
        assert np.linalg.norm(half) == pytest.approx(norm, rel=0.1), name
        cosine = float(np.sum(full * half) / (norm * np.linalg.norm(half)))
        assert cosine > 0.98, (name, cosine)


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_train_under_mixed_precision_checkpoints_and_exports_float32(
        shapes_data_dir, tmp_path, policy):
    cfg = config(data_dir=shapes_data_dir, epochs=1, mixed_precision=policy,
                 checkpoint_every=0)
    summary = loop.train(cfg, tmp_path / "run", tmp_path / "models", verbose=0)
    assert keras.config.dtype_policy().name == "float32"
    run = RunDirectory(tmp_path / "run")
    (row,) = run.read_history()
    assert all(np.isfinite(row[k]) for k in ("loss", "val_loss"))
    assert row["val_loss"] == pytest.approx(summary["val_loss"])

    # The checkpoint holds every optimiser variable, the loss scale's included.
    with loop.precision_policy(policy):
        model = loop.build_model(cfg, 10)
        optimizer = loop.build_optimizer(cfg)
        optimizer.build(model.trainable_variables)
        run.restore(model, optimizer)  # every saved variable must match
    assert loop.weights_digest(model) == summary["weights_sha256"]
    assert 0 < int(optimizer.iterations.numpy()) <= 30
    if policy == "mixed_float16":
        assert float(optimizer.dynamic_scale.numpy()) >= 1.0

    # The export is the float32 copy: probabilities in float32, the trained model's.
    x, _ = batch(4)
    loaded = tf.saved_model.load(summary["export_path"])
    probabilities = loaded.signatures["serving_pixels"](pixels=tf.constant(x))["probabilities"]
    assert probabilities.dtype == tf.float32
    np.testing.assert_allclose(np.sum(probabilities, axis=1), 1.0, atol=1e-5)
    reference = tf.nn.softmax(run.load_model()(x, training=False))
    np.testing.assert_allclose(probabilities, reference, atol=1e-5)
    # A float32 forward pass of the mixed-precision-trained weights: close, not equal.
    with loop.precision_policy(policy):
        mixed = tf.nn.softmax(tf.cast(model(x, training=False), tf.float32))
    np.testing.assert_allclose(probabilities, mixed, atol=0.05)


@pytest.mark.slow
def test_xla_compiled_step_matches_the_plain_step():
    cfg = config(weight_decay=5e-4)
    results = []
    for jit_compile in (False, True):
        model = loop.build_model(cfg, 10)
        optimizer = loop.build_optimizer(cfg)
        optimizer.build(model.trainable_variables)
        before = weights(model)
        sums = one_step(model, optimizer, jit_compile=jit_compile)
        results.append((before, weights(model), sums))
    (b0, a0, s0), (b1, a1, s1) = results
    assert all(np.array_equal(p, q) for p, q in zip(b0, b1))  # the same seeded start
    assert s1[3] == 8 and s1[0] == pytest.approx(s0[0], rel=1e-4)
    assert max(float(np.abs(a - b).max()) for a, b in zip(a0, b0)) > 1e-6  # it moved
    for p, q in zip(a0, a1):
        np.testing.assert_allclose(q, p, rtol=1e-4, atol=1e-5)


def test_export_copy_is_float32_and_unplaced():
    with loop.precision_policy("mixed_bfloat16"):
        model = loop.build_model(config(), 10, tower_devices=("/cpu:0", "/cpu:0"))
    copy = loop.inference_copy(model)
    assert model.tower_devices == ("/cpu:0", "/cpu:0") and copy.tower_devices is None
    assert copy.get_layer("conv1_a").compute_dtype == "float32"
    assert type(copy.get_layer("conv1_a")).__name__ == "Conv2D"
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), copy.get_weights()))
    x, _ = batch(2)
    np.testing.assert_allclose(copy(x), model(x), rtol=0.05, atol=0.05)  # bfloat16 vs fp32


def test_bfloat16_inference_copy_computes_in_bfloat16_from_the_same_weights():
    model = loop.build_model(config(), 10)
    copy = loop.inference_copy(model, "mixed_bfloat16")
    assert copy.get_layer("conv1_a").compute_dtype == "bfloat16"
    assert copy.get_layer("conv1_a").variable_dtype == "float32"
    assert copy.get_layer("fc8").compute_dtype == "float32"
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), copy.get_weights()))
    x, _ = batch(2)
    fp32, bf16 = np.asarray(model(x)), np.asarray(copy(x))
    assert bf16.dtype == np.float32
    assert not np.array_equal(bf16, fp32)  # it did compute in the other precision
    np.testing.assert_allclose(bf16, fp32, rtol=0.05, atol=0.05)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


def test_bfloat16_weight_copy_stores_rounded_weights():
    """``inference_copy(model, "bfloat16")`` keeps its weights in bfloat16 (rounded to
    nearest even, as NumPy's ml_dtypes rounds), except fc8's; LRN computes in float32."""
    import ml_dtypes

    model = loop.build_model(config(), 10)
    stored = loop.inference_copy(model, "bfloat16")
    conv1, fc8 = stored.get_layer("conv1_a"), stored.get_layer("fc8")
    assert (conv1.variable_dtype, conv1.compute_dtype) == ("bfloat16", "bfloat16")
    assert (fc8.variable_dtype, fc8.compute_dtype) == ("float32", "float32")
    lrn = [layer for layer in stored.layers if "LocalResponse" in type(layer).__name__]
    assert lrn and all(layer.compute_dtype == "float32" for layer in lrn)
    for source, copy in zip(model.weights, stored.weights):
        want = np.asarray(source).astype(ml_dtypes.bfloat16 if copy.dtype == "bfloat16"
                                         else np.float32)
        np.testing.assert_array_equal(np.asarray(copy), want)
    assert keras.config.dtype_policy().name == "float32"


STORED_VS_MIXED_SCRIPT = """
import json, os
import numpy as np
from keras_alexnet.training import loop
from keras_alexnet.training.config import PRESETS
model = loop.build_model(PRESETS["smoke"], 10)
x = np.random.default_rng(0).normal(0, 60, size=(2, 67, 67, 3)).astype("float32")
outputs = [np.asarray(loop.inference_copy(model, p)(x)) for p in ("bfloat16", "mixed_bfloat16")]
print("RESULT" + json.dumps({"max_difference": float(np.abs(outputs[0] - outputs[1]).max()),
                             "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}))
"""


@pytest.mark.parametrize("onednn", ONEDNN_SETTINGS, ids=lambda v: f"onednn{v}")
def test_bfloat16_weight_copy_computes_what_the_mixed_copy_does(onednn):
    """Bit for bit, under both kernel settings: the mixed copy rounds its float32 weights
    to bfloat16 on every call exactly as the stored copy rounded them once."""
    if own_onednn() == onednn:  # this process's kernels: no second TensorFlow start
        model = loop.build_model(config(), 10)
        x, _ = batch(2)
        stored, mixed = (np.asarray(loop.inference_copy(model, p)(x))
                         for p in ("bfloat16", "mixed_bfloat16"))
        out = {"max_difference": float(np.abs(stored - mixed).max()), "onednn": onednn}
    else:
        out = run_script(STORED_VS_MIXED_SCRIPT, onednn=onednn)
    assert out == {"max_difference": 0.0, "onednn": onednn}


def test_policies_are_checked_for_their_use():
    model = loop.build_model(config(), 10)
    with pytest.raises(ValueError, match="Received: 'mixed_float16'"):
        loop.inference_copy(model, "mixed_float16")  # float16 inference is not offered
    with pytest.raises(ValueError, match="Received: 'bfloat16'"):
        with loop.precision_policy("bfloat16"):  # training keeps float32 weights
            pass
    assert keras.config.dtype_policy().name == "float32"
