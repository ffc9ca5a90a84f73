"""The AlexNet builder: sizes, names, initialisation, gradients, towers, serialization."""

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_alexnet import VARIANTS, AlexNet, alexnet, paper


@pytest.fixture(scope="module")
def full_model():
    return alexnet(seed=0)


def tiny(**overrides):
    kwargs = dict(num_classes=10, image_size=67, width=0.125, seed=0)
    kwargs.update(overrides)
    return alexnet(**kwargs)


def test_parameter_count_is_the_papers(full_model):
    assert full_model.count_params() == 60_965_224 == paper.PARAMETER_COUNT
    # Same widths in one branch: the towers' split really removes connections.
    assert alexnet("single_tower").count_params() == 62_378_344


def test_torchvision_variant_has_torchvisions_layout_and_parameter_count():
    """torchvision.models.alexnet: 61,100,840 parameters (its documentation), 224 input."""
    model = alexnet("torchvision")
    assert model.count_params() == 61_100_840 == paper.TORCHVISION_PARAMETER_COUNT
    assert [model.get_layer(f"conv{i}").filters for i in range(1, 6)] == [64, 192, 384, 256, 256]
    names = [layer.name for layer in model.layers]
    assert not any(name.startswith("norm") for name in names)
    assert model.get_layer("conv1").output.shape[1:3] == (55, 55)  # (224 + 2 * 2 - 11) // 4 + 1
    assert model.get_layer("avgpool").output.shape[1:] == (6, 6, 256)
    assert model.get_layer("fc6").kernel.shape == (9216, 4096)


def test_caffe_variant_is_the_papers_layout_with_caffes_lrn_constants():
    model = alexnet("caffe")
    assert model.count_params() == paper.PARAMETER_COUNT
    norm = model.get_layer("norm1")  # one LRN over both towers, as Caffe's norm1 layer
    assert norm.input.shape[-1] == 96 and model.get_layer("norm2").input.shape[-1] == 256
    assert (norm.size, norm.bias, norm.beta) == (5, 1.0, 0.75)
    assert norm.alpha == pytest.approx(2e-5)  # Caffe's alpha 1e-4 divided by local_size 5


def test_lrn_across_towers_normalises_the_channels_at_the_boundary_with_both_towers():
    """conv1 channels 46-49 see the other tower's maps in Caffe's LRN (n = 5), no others."""
    kwargs = dict(num_classes=3, image_size=67, seed=3, initializer="he", lrn_bias=1.0,
                  lrn_alpha=0.5)
    shared = alexnet("krizhevsky2012", lrn_across_towers=True, **kwargs)
    alone = alexnet("krizhevsky2012", **kwargs)
    alone.set_weights(shared.get_weights())
    x = np.random.default_rng(0).uniform(0, 50, (1, 67, 67, 3)).astype("float32")
    a = keras.Model(shared.input, shared.get_layer("pool1_a").output)(x).numpy()
    b = keras.Model(alone.input, alone.get_layer("pool1_a").output)(x).numpy()
    differs = np.abs(a - b).max(axis=(0, 1, 2)) > 1e-6
    assert list(np.flatnonzero(differs)) == [46, 47]  # tower a: 0-47; n // 2 = 2 reach b


@pytest.mark.parametrize("size, out", [(13, 6), (6, 6), (2, 6), (7, 3), (1, 1)])
def test_adaptive_average_pooling_matches_pytorchs_bins(size, out):
    """PyTorch's AdaptiveAvgPool2d bins: rows floor(i H / s) to ceil((i + 1) H / s)."""
    from keras_alexnet.layers import AdaptiveAveragePooling2D

    x = np.random.default_rng(0).normal(size=(2, size, size + 1, 3))
    expected = np.zeros((2, out, out, 3))
    for i in range(out):
        r0, r1 = (i * size) // out, -(-((i + 1) * size) // out)
        for j in range(out):
            c0, c1 = (j * (size + 1)) // out, -(-((j + 1) * (size + 1)) // out)
            expected[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    got = AdaptiveAveragePooling2D(out)(x.astype("float32")).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_per_layer_parameter_counts(full_model):
    expected = {"conv1": 34_944, "conv2": 307_456, "conv3": 885_120, "conv4": 663_936,
                "conv5": 442_624, "fc6": 37_752_832, "fc7": 16_781_312, "fc8": 4_097_000}
    for layer, count in expected.items():
        names = [layer] if layer == "fc8" else [f"{layer}_a", f"{layer}_b"]
        assert sum(full_model.get_layer(n).count_params() for n in names) == count, layer


def test_feature_map_sizes(full_model):
    sizes = {name: full_model.get_layer(name).output.shape[1:] for name in (
        "conv1_a", "pool1_a", "conv2_b", "pool2_b", "conv3_a", "conv4_b", "conv5_a", "pool5_b")}
    assert sizes == {
        "conv1_a": (55, 55, 48), "pool1_a": (27, 27, 48), "conv2_b": (27, 27, 128),
        "pool2_b": (13, 13, 128), "conv3_a": (13, 13, 192), "conv4_b": (13, 13, 192),
        "conv5_a": (13, 13, 128), "pool5_b": (6, 6, 128)}
    assert full_model.get_layer("cross6").output.shape[1:] == (9216,)
    assert full_model.output.shape[1:] == (1000,)


def test_layer_names_and_order(full_model):
    names = [layer.name for layer in full_model.layers]
    for stem in ("conv1", "norm1", "pool1", "conv2", "norm2", "pool2", "conv3", "conv4",
                 "conv5", "pool5", "fc6", "fc7"):
        assert f"{stem}_a" in names and f"{stem}_b" in names, stem
    for name in ("images", "cross3", "cross6", "drop6", "drop7", "fc8"):
        assert name in names
    # The paper's order: conv -> ReLU -> LRN -> pool.
    assert names.index("conv1_a") < names.index("norm1_a") < names.index("pool1_a")
    assert full_model.get_layer("conv1_a").get_config()["activation"] == "relu"
    assert full_model.get_layer("fc8").get_config()["activation"] == "linear"
    pool = full_model.get_layer("pool1_a")
    assert pool.pool_size == (3, 3) and pool.strides == (2, 2)
    assert full_model.get_layer("drop6").rate == 0.5
    assert all(not isinstance(layer, keras.layers.Lambda) for layer in full_model.layers)


def test_paper_initialisation(full_model):
    for layer in full_model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            continue
        kernel, bias = (w.numpy() for w in layer.weights)
        if kernel.size > 10_000:
            assert abs(kernel.mean()) < 1e-3, layer.name
            assert kernel.std() == pytest.approx(0.01, rel=0.05), layer.name
        stem = layer.name.split("_")[0]
        assert np.all(bias == (1.0 if stem in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0))


def test_small_configurations_and_validation():
    model = tiny()
    assert model.output.shape[1:] == (10,)
    assert model.get_layer("pool5_a").output.shape[1:3] == (1, 1)
    assert model.get_layer("conv1_a").filters == 6  # 96 * 0.125 / 2
    one = tiny(towers=1)
    assert "conv1" in [layer.name for layer in one.layers]
    with pytest.raises(ValueError, match="image_size"):
        tiny(image_size=66)
    with pytest.raises(ValueError, match="towers"):
        tiny(towers=3)
    with pytest.raises(ValueError, match="variant"):
        alexnet("vgg")
    assert set(VARIANTS) == {"krizhevsky2012", "single_tower", "caffe", "torchvision"}


def test_gradient_reaches_every_weight():
    model = tiny(dropout_rate=0.0)
    x = tf.random.normal((4, 67, 67, 3), stddev=50.0, seed=1)
    y = tf.constant([0, 1, 2, 3])
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    grads = tape.gradient(loss, model.trainable_weights)
    # 7 layers per tower (conv1-conv5, fc6, fc7) and fc8, a kernel and a bias each.
    assert len(grads) == len(model.trainable_weights) == 2 * 14 + 2
    for weight, grad in zip(model.trainable_weights, grads):
        assert grad is not None and np.any(grad.numpy() != 0), weight.path


def test_keras_save_load_round_trip(tmp_path):
    model = tiny(input_scale=1 / 64, initializer="he", weight_decay=5e-4)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is AlexNet
    assert loaded.get_config() == model.get_config()
    x = np.random.default_rng(0).normal(0, 50, (3, 67, 67, 3)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    assert len(loaded.losses) == len(model.losses) == 15  # L2 on every kernel, no bias


def test_config_of_a_placed_model_holds_no_devices_and_round_trips():
    placed = tiny(tower_devices=("/cpu:0", "/cpu:0"))
    assert placed.get_layer("conv1_b").device == "/cpu:0"  # placed ...
    config = placed.get_config()
    assert "tower_devices" not in config  # ... but the config does not say so
    assert config == tiny().get_config()
    saved = json.dumps(keras.saving.serialize_keras_object(placed))  # what .keras holds
    assert not re.search(r"cpu|gpu|tpu|device", saved, re.IGNORECASE), saved
    clone = AlexNet.from_config(config)
    assert clone.tower_devices is None
    assert not any(type(layer).__name__.startswith("Placed") for layer in clone.layers)
    assert [(w.path, tuple(w.shape)) for w in clone.weights] == [
        (w.path, tuple(w.shape)) for w in placed.weights]
    clone.set_weights(placed.get_weights())  # same order: a checkpoint of one loads into the other
    x = np.random.default_rng(0).normal(0, 50, (2, 67, 67, 3)).astype(np.float32)
    np.testing.assert_array_equal(clone(x), placed(x))
    # A config saved when placement was still part of it loads unplaced.
    old = AlexNet.from_config({**config, "tower_devices": ("/gpu:0", "/gpu:1")})
    assert old.tower_devices is None


def _outputs(model, names, x):
    probe = keras.Model(model.input, [model.get_layer(n).output for n in names])
    return [o.numpy() for o in probe(x)]


def test_towers_only_cross_where_the_paper_crosses():
    model = tiny(width=0.25)
    x = tf.random.normal((2, 67, 67, 3), stddev=50.0, seed=2)
    names = ["conv2_a", "conv2_b", "conv3_a", "conv4_a", "conv5_a", "fc6_a"]
    before = dict(zip(names, _outputs(model, names, x)))
    # Change tower B's channels entering conv2 (via conv1_b's weights).
    kernel = model.get_layer("conv1_b").kernel
    kernel.assign(kernel + tf.random.normal(kernel.shape, stddev=0.5, seed=3))
    after = dict(zip(names, _outputs(model, names, x)))
    np.testing.assert_array_equal(before["conv2_a"], after["conv2_a"])  # own tower only
    assert np.abs(before["conv2_b"] - after["conv2_b"]).max() > 1e-3
    assert np.abs(before["conv3_a"] - after["conv3_a"]).max() > 1e-3  # conv3 crosses
    # conv4 and conv5 read only their own tower: perturbing conv3_b leaves tower A alone.
    before = dict(zip(names, _outputs(model, names, x)))
    kernel = model.get_layer("conv3_b").kernel
    kernel.assign(kernel + tf.random.normal(kernel.shape, stddev=0.5, seed=4))
    after = dict(zip(names, _outputs(model, names, x)))
    np.testing.assert_array_equal(before["conv4_a"], after["conv4_a"])
    np.testing.assert_array_equal(before["conv5_a"], after["conv5_a"])
    assert np.abs(before["fc6_a"] - after["fc6_a"]).max() > 1e-6  # fc6 crosses


@pytest.mark.parametrize("wd", [5e-4, 0.05])  # the paper's, and one where decay dominates
def test_paper_sgd_step_matches_hand_computed_update(wd):
    """Two steps of SGD(0.01, momentum 0.9) + L2(wd/2) equal the paper's rule:
    v <- 0.9 v - wd*lr*w - lr*g ; w <- w + v, with no decay on biases."""
    lr, mu = 0.01, 0.9
    model = tiny(dropout_rate=0.0, weight_decay=wd, initializer="he", input_scale=1 / 64)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr, momentum=mu),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(3)
    x = rng.normal(0, 60, (8, 67, 67, 3)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    w = [v.numpy().astype(np.float64) for v in model.trainable_weights]
    is_kernel = [v.name == "kernel" for v in model.trainable_weights]
    velocity = [np.zeros_like(a) for a in w]

    def data_gradients(weights):
        for var, value in zip(model.trainable_weights, weights):
            var.assign(value.astype(np.float32))
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True))  # the data term only: decay is in the rule
        return [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_weights)]

    expected = w
    for _ in range(2):
        grads = data_gradients(expected)
        velocity = [mu * v - (wd * lr * a if k else 0.0) - lr * g
                    for v, a, g, k in zip(velocity, expected, grads, is_kernel)]
        expected = [a + v for a, v in zip(expected, velocity)]

    for var, value in zip(model.trainable_weights, w):  # back to the start
        var.assign(value.astype(np.float32))
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for var, want, start in zip(model.trainable_weights, expected, w):
        got = var.numpy().astype(np.float64)
        update = np.abs(want - start).max()
        # float32 weights carry ~6e-8 relative rounding per step; updates are ~1e-4.
        tolerance = 1e-3 * update + 2 * np.finfo(np.float32).eps * np.abs(start).max()
        assert np.abs(got - want).max() <= tolerance, var.path



EMPTY_BATCH_SCRIPT = """
import json, os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np, tensorflow as tf
from keras_alexnet import alexnet
model = alexnet(num_classes=10, image_size=67, width=0.125, seed=0, input_scale=1 / 64)
x = np.random.default_rng(0).normal(size=(3, 67, 67, 3)).astype("float32")
graph_call = tf.function(lambda t: model(t, training=False))
out = {
    "eager_empty": list(model(tf.zeros([0, 67, 67, 3]), training=False).shape),
    "graph_empty": list(graph_call(tf.zeros([0, 67, 67, 3])).shape),
    "predict_empty": list(model.predict_on_batch(np.zeros([0, 67, 67, 3], "float32")).shape),
    "graph_vs_eager": float(np.abs(graph_call(x).numpy() - model(x).numpy()).max()),
    "onednn": os.environ["TF_ENABLE_ONEDNN_OPTS"],
}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.parametrize("onednn", ["0", "1"])
def test_empty_batch_gives_empty_logits_under_both_kernel_settings(onednn):
    # With oneDNN on, TensorFlow's Conv2D returns its input's shape for a zero-sized
    # batch; the model must answer [0, classes] instead of failing at conv2.
    from _subprocess import run_script

    out = run_script(EMPTY_BATCH_SCRIPT, onednn=onednn, timeout=120)
    assert out["onednn"] == onednn
    assert out["eager_empty"] == out["graph_empty"] == out["predict_empty"] == [0, 10]
    assert out["graph_vs_eager"] <= 1e-5


def test_experiment_options_tanh_units_and_non_overlapping_pooling_of_the_same_map_sizes():
    """The arms of the paper's experiments come from the one builder: tanh instead of ReLU
    (Figure 1) everywhere but fc8, and 2x2/2 pooling (Sec. 3.4), whose maps at 227 are the
    sizes of the paper's 3x3/2 (55 -> 27 -> 13 -> 6), so the parameter count is unchanged."""
    model = alexnet(activation="tanh", pool_size=2, pool_stride=2, seed=0)
    assert model.count_params() == paper.PARAMETER_COUNT
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            want = "linear" if layer.name == "fc8" else "tanh"
            assert layer.get_config()["activation"] == want, layer.name
        if isinstance(layer, keras.layers.MaxPooling2D):
            assert layer.pool_size == (2, 2) and layer.strides == (2, 2), layer.name
    assert [model.get_layer(n).output.shape[1] for n in ("pool1_a", "pool2_b", "pool5_a")] \
        == [27, 13, 6]
    copy = AlexNet.from_config(json.loads(json.dumps(model.get_config())))
    assert (copy.activation, copy.pool_size, copy.pool_stride) == ("tanh", 2, 2)
    # conv1's output is tanh of its affine map: check against NumPy on one patch.
    x = np.random.default_rng(0).normal(size=(1, 227, 227, 3)).astype("float32")
    conv1 = keras.Model(model.input, model.get_layer("conv1_a").output)
    kernel, bias = (w.numpy().astype(np.float64) for w in model.get_layer("conv1_a").weights)
    patch = x[0, :11, :11, :].astype(np.float64)
    want = np.tanh(np.tensordot(patch, kernel, axes=3) + bias)
    np.testing.assert_allclose(conv1(x).numpy()[0, 0, 0], want, atol=1e-5)
    with pytest.raises(ValueError, match="activation"):
        tiny(activation="sigmoid")
    with pytest.raises(ValueError, match="pool_stride"):
        tiny(pool_stride=0)
