"""The explicit towers compute what ``Conv2D(groups=2)`` computes (docs: P2 of the style guide).

The reference is Keras' own grouped convolution, given the two towers' kernels and
biases concatenated along the output-filter axis (tower A first, as when a Caffe
``group: 2`` checkpoint is imported), never the towers' own output. Everything runs in
float32 at tiny widths.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_alexnet import alexnet, paper

TINY = dict(num_classes=10, width=0.125, initializer="he", dropout_rate=0.0, seed=0)


def _model(image_size=paper.MIN_IMAGE_SIZE):
    return alexnet(image_size=image_size, **TINY)


def _images(image_size, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 50, (batch, image_size, image_size, 3)).astype(np.float32)


def _joined_weights(model, stem):
    """``(kernel, bias)`` of ``stem_a`` and ``stem_b`` concatenated along the filter axis."""
    a, b = (model.get_layer(f"{stem}{s}") for s in ("_a", "_b"))
    return [np.concatenate([wa.numpy(), wb.numpy()], axis=-1)
            for wa, wb in zip(a.weights, b.weights)]


def _grouped_conv(model, stem, groups, input_shape, **kwargs):
    """A ``Conv2D`` (``groups`` groups) holding both towers' ``stem`` weights."""
    kernel, bias = _joined_weights(model, stem)
    layer = keras.layers.Conv2D(kernel.shape[-1], kernel.shape[:2], groups=groups,
                                activation="relu", dtype="float32", **kwargs)
    layer.build(input_shape)
    layer.set_weights([kernel, bias])
    return layer


def _assert_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.abs(want).max() > 1e-3  # a non-trivial comparison (not all ReLU zeros)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("stem, source", [("conv2", "pool1"), ("conv4", "conv3"),
                                          ("conv5", "conv4")])
def test_grouped_layer_equals_conv2d_groups_2(stem, source):
    """Each layer that reads only its own tower equals one grouped convolution."""
    model = _model()
    names = [f"{source}_a", f"{source}_b", f"{stem}_a", f"{stem}_b"]
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    in_a, in_b, out_a, out_b = (o.numpy() for o in probe(_images(paper.MIN_IMAGE_SIZE)))
    x = np.concatenate([in_a, in_b], axis=-1)
    reference = _grouped_conv(model, stem, 2, x.shape, padding="same")
    assert reference.kernel.shape[2] == x.shape[-1] // 2  # really grouped
    _assert_close(np.concatenate([out_a, out_b], axis=-1), reference(x))


def _lrn_per_group(x):
    """The paper's LRN applied to each half of the channels on its own."""
    return tf.concat([tf.nn.local_response_normalization(
        half, depth_radius=paper.LRN_SIZE // 2, bias=paper.LRN_BIAS, alpha=paper.LRN_ALPHA,
        beta=paper.LRN_BETA) for half in tf.split(x, 2, axis=-1)], axis=-1)


def _pool(x):
    return tf.nn.max_pool2d(x, paper.POOL_SIZE, paper.POOL_STRIDE, "VALID")


def _tower_flatten_order(height, width, channels_a, channels_b):
    """Index into a row-major flatten of ``[h, w, a | b]`` maps for each input of fc6.

    The towers flatten their own pool5 maps and concatenate the results (all of tower
    A, then all of tower B); a grouped model flattens the joined maps. fc6's kernel rows
    are permuted accordingly (a no-op when pool5 is 1x1).
    """
    channels = channels_a + channels_b
    hw = np.arange(height * width)[:, None] * channels
    order_a = (hw + np.arange(channels_a)[None, :]).ravel()
    order_b = (hw + channels_a + np.arange(channels_b)[None, :]).ravel()
    return np.concatenate([order_a, order_b])


def _grouped_reference(model, x):
    """Logits of the same network written with ``Conv2D(groups=2)``, from ``x``."""
    x = tf.constant(x)
    for stem, groups, kwargs in [("conv1", 1, dict(strides=4, padding="valid")),
                                 ("conv2", 2, dict(padding="same"))]:
        x = _grouped_conv(model, stem, groups, x.shape, **kwargs)(x)
        x = _pool(_lrn_per_group(x))  # LRN per GPU in the paper
    for stem, groups in [("conv3", 1), ("conv4", 2), ("conv5", 2)]:
        x = _grouped_conv(model, stem, groups, x.shape, padding="same")(x)
    x = _pool(x)
    _, height, width, channels = x.shape
    x = tf.reshape(x, [x.shape[0], -1])
    kernel, bias = _joined_weights(model, "fc6")
    inverse = np.argsort(_tower_flatten_order(height, width, channels // 2, channels // 2))
    x = tf.nn.relu(x @ kernel[inverse] + bias)
    kernel, bias = _joined_weights(model, "fc7")
    x = tf.nn.relu(x @ kernel + bias)
    kernel, bias = (w.numpy() for w in model.get_layer("fc8").weights)
    return (x @ kernel + bias).numpy()


@pytest.mark.parametrize("image_size", [paper.MIN_IMAGE_SIZE, 99])  # pool5 1x1 and 2x2
def test_two_tower_model_equals_a_grouped_convolution_model(image_size):
    model = _model(image_size)
    x = _images(image_size, seed=1)
    pool5 = model.get_layer("pool5_a").output.shape[1:3]
    assert pool5 == ((1, 1) if image_size == paper.MIN_IMAGE_SIZE else (2, 2))
    _assert_close(model(x, training=False), _grouped_reference(model, x))


def test_flatten_order_matches_numpy():
    maps = np.arange(2 * 3 * 5).reshape(2, 3, 5)  # h, w, channels (2 of tower A)
    towers = np.concatenate([maps[..., :2].ravel(), maps[..., 2:].ravel()])
    np.testing.assert_array_equal(maps.ravel()[_tower_flatten_order(2, 3, 2, 3)], towers)


def test_towers_share_no_variables():
    model = _model()
    a = {id(w) for layer in model.layers if layer.name.endswith("_a") for w in layer.weights}
    b = {id(w) for layer in model.layers if layer.name.endswith("_b") for w in layer.weights}
    assert a and b and not a & b
    assert len({w.path for w in model.weights}) == len(model.weights)
