"""LocalResponseNormalization against a float64 NumPy implementation of Sec. 3.3."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_alexnet import LocalResponseNormalization


def lrn_reference(a, n=5, k=2.0, alpha=1e-4, beta=0.75):
    """b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta, float64."""
    a = np.asarray(a, np.float64)
    channels = a.shape[-1]
    out = np.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        s = np.sum(a[..., lo : hi + 1] ** 2, axis=-1)
        out[..., i] = a[..., i] / (k + alpha * s) ** beta
    return out


@pytest.mark.parametrize("scale", [1.0, 30.0, 300.0])
def test_matches_paper_formula(scale):
    rng = np.random.default_rng(0)
    # ReLU outputs: non-negative, with large values so the alpha term matters.
    x = np.maximum(rng.normal(0, scale, (2, 5, 7, 16)), 0).astype(np.float32)
    got = LocalResponseNormalization()(x).numpy()
    want = lrn_reference(x)
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
    assert rel.max() <= 1e-5
    # The first and last channels have truncated windows: check them explicitly.
    for c in (0, 1, 14, 15):
        np.testing.assert_allclose(got[..., c], want[..., c], rtol=1e-5)


def test_non_default_parameters_and_window_size():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 50, (3, 2, 2, 11)).astype(np.float32)
    got = LocalResponseNormalization(size=3, bias=1.0, alpha=2e-3, beta=0.5)(x).numpy()
    want = lrn_reference(x, n=3, k=1.0, alpha=2e-3, beta=0.5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # TF's depth_radius=5 (the classic bug) would be a window of 11: far off.
    wrong = lrn_reference(x, n=11, k=1.0, alpha=2e-3, beta=0.5)
    assert np.abs(got - wrong).max() > 1e-2


def test_config_round_trip():
    layer = LocalResponseNormalization(size=7, bias=1.5, alpha=3e-4, beta=0.5, name="norm_x")
    config = layer.get_config()
    assert {k: config[k] for k in ("size", "bias", "alpha", "beta", "name")} == {
        "size": 7, "bias": 1.5, "alpha": 3e-4, "beta": 0.5, "name": "norm_x"}
    clone = LocalResponseNormalization.from_config(config)
    assert clone.get_config() == config
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(revived, LocalResponseNormalization)
    assert revived.get_config() == config


@pytest.mark.parametrize("bad", [0, 4, -3, 2.0, True])
def test_rejects_bad_size(bad):
    with pytest.raises(ValueError, match="positive odd integer"):
        LocalResponseNormalization(size=bad)


def test_gradient_matches_numerical_gradient():
    rng = np.random.default_rng(2)
    x = np.maximum(rng.normal(0, 40, (1, 2, 2, 9)), 0.5)
    upstream = rng.normal(0, 1, x.shape)
    layer = LocalResponseNormalization()
    xt = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = tf.reduce_sum(layer(xt) * tf.constant(upstream, tf.float32))
    analytic = tape.gradient(y, xt).numpy()
    # Central differences of the float64 reference formula.
    numeric = np.zeros_like(x)
    eps = 1e-4
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (np.sum(lrn_reference(plus) * upstream)
                        - np.sum(lrn_reference(minus) * upstream)) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-5)


def test_float32_under_mixed_precision():
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = LocalResponseNormalization()
        x = tf.constant(np.full((1, 1, 1, 5), 200.0), tf.float16)
        y = layer(x)
        assert layer.compute_dtype == "float32"
        assert y.dtype == tf.float32
        np.testing.assert_allclose(y.numpy(), lrn_reference(np.full((1, 1, 1, 5), 200.0)),
                                   rtol=1e-5)
    finally:
        keras.config.set_dtype_policy(policy)
