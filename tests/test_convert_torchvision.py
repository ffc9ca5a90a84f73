"""`load_torchvision` computes what PyTorch computes with the same state dict.

torchvision cannot be installed beside the pinned CPU torch, so its AlexNet is written
out here as a plain ``torch.nn`` module (`TorchvisionAlexNet`, exactly its structure and
state-dict keys); the tests make their own weights and PyTorch's forward pass is the
reference. Nothing is downloaded.

The logits comparison runs in fresh processes under both oneDNN settings (`SCRIPT`):
oneDNN's kernels change the convolutions' numerics. The rest runs in the pytest process.
"""

import hashlib
import json
import pickle
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import torch
from _subprocess import ONEDNN_SETTINGS, run_script
from torch import nn

from keras_alexnet import paper, preprocessing
from keras_alexnet.convert import export_converted, imagenet_class_names
from keras_alexnet.convert import torchvision as tv_convert
from keras_alexnet.export import read_metadata

MEAN = np.asarray(paper.TORCHVISION_MEAN, np.float32)
STD = np.asarray(paper.TORCHVISION_STD, np.float32)


class TorchvisionAlexNet(nn.Module):
    """torchvision.models.alexnet's definition (same modules, indices and key names)."""

    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.5),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def torch_model(seed=0, num_classes=1000):
    """A seeded `TorchvisionAlexNet` in eval mode with O(1) logits.

    PyTorch's default initialisation shrinks the activations layer after layer: the
    logits are about 0.01, set by fc8's bias, and every image gets the same top-5. The
    weights are redrawn He-normal (``N(0, 2 / fan_in)``; fc8 ``N(0, 1 / fan_in)``) with
    biases uniform in +-0.1, so the logits are O(1), depend on the image, and about
    two thirds of the ReLUs are active.
    """
    torch.manual_seed(seed)
    model = TorchvisionAlexNet(num_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                gain = 1.0 if name.startswith("classifier.6") else 2.0
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator)
                                * (gain / fan_in) ** 0.5)
            else:
                parameter.copy_((torch.rand(parameter.shape, generator=generator) - 0.5) * 0.2)
    return model.eval()


def torch_logits(model, pixels):
    """PyTorch's logits for ``[batch, H, W, 3]`` 0-255 RGB pixels, through torchvision's
    ``ToTensor`` (/255, NCHW) and ``Normalize(mean, std)``."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2) / 255.0
    x = (x - torch.from_numpy(MEAN)[:, None, None]) / torch.from_numpy(STD)[:, None, None]
    with torch.no_grad():
        return model(x).numpy()


def random_pixels(batch, size, seed):
    """Random 0-255 RGB images, integer-valued like decoded pixels: float32 NHWC."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``(model, path)``: the seeded PyTorch model and its saved state dict."""
    model = torch_model(seed=0)
    path = tmp_path_factory.mktemp("torchvision") / "alexnet.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def converted(reference):
    """The conversion of `reference`'s file, which plays the published file here (its
    SHA-256 prefix stands in for ``7be5be79``) so that the accuracy record is exercised."""
    _, path = reference
    prefix = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tv_convert, "PUBLISHED_SHA256_PREFIX", prefix)
        return tv_convert.load_torchvision(path)


# ---------------------------------------------------------------------------------------
# Logits equal PyTorch's, under both oneDNN settings.

SIZES = (224, 180)  # torchvision's input (pool5 6x6); 180: pool5 4x4, the adaptive pool upsamples

SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    from keras_alexnet.convert import torchvision as tv
    imported_torch = "torch" in sys.modules  # PyTorch is optional: only load_torchvision needs it
    import torch

    work = sys.argv[1]
    inputs = np.load(work + "/inputs.npz")
    out = {"onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "sizes": {},
           "import_imports_torch": imported_torch}
    logits = {}
    for size in (224, 180):
        converted = tv.load_torchvision(work + "/alexnet.pth", image_size=size)
        model = converted.model
        x = inputs[f"pixels{size}"] - np.asarray(converted.mean, np.float32)
        logits[f"keras{size}"] = model(x, training=False).numpy()
        out["sizes"][str(size)] = {"input": converted.weights["input"],
                                   "resize": converted.resize,
                                   "pool5": list(model.get_layer("pool5").output.shape[1:]),
                                   "params": model.count_params()}
        if size == 224:
            # fc6 without the flatten permutation (a plain transpose): must not match.
            fc6 = model.get_layer("fc6")
            state = torch.load(work + "/alexnet.pth", map_location="cpu", weights_only=True)
            fc6.set_weights([state["classifier.1.weight"].numpy().T, fc6.get_weights()[1]])
            logits["naive224"] = model(x, training=False).numpy()
        del converted, model
    np.savez(work + "/logits.npz", **logits)
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def torch_inputs(reference, tmp_path_factory):
    """The reference file beside random pixels of each size and PyTorch's logits for them."""
    model, path = reference
    work = tmp_path_factory.mktemp("logits")
    (work / "alexnet.pth").symlink_to(path)
    pixels = {f"pixels{size}": random_pixels(3, size, seed=size) for size in SIZES}
    np.savez(work / "inputs.npz", **pixels)
    want = {size: torch_logits(model, pixels[f"pixels{size}"]) for size in SIZES}
    return work, want


@pytest.fixture(scope="module", params=ONEDNN_SETTINGS, ids=lambda v: f"onednn{v}")
def keras_run(torch_inputs, request):
    work, want = torch_inputs
    out = run_script(SCRIPT, work, timeout=300, onednn=request.param)
    with np.load(work / "logits.npz") as got:
        return out, {k: got[k] for k in got.files}, want


def _tolerance(want):
    """1e-4 of the logits' scale, absolute and relative."""
    return dict(rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@pytest.mark.parametrize("size", SIZES)
def test_logits_equal_pytorch(keras_run, size, request):
    out, got, want = keras_run
    want = want[size]
    # A meaningful comparison: O(1) logits that vary from image to image.
    assert 1.0 < np.abs(want).max() < 100.0
    assert want.std(axis=0).mean() > 0.1
    assert out["onednn"] == request.node.callspec.params["keras_run"]
    np.testing.assert_allclose(got[f"keras{size}"], want, **_tolerance(want))
    print(f"size {size} onednn={out['onednn']}: max |keras - torch| = "
          f"{np.abs(got[f'keras{size}'] - want).max():.3g}, max |torch| = "
          f"{np.abs(want).max():.3g}")


def test_the_comparison_sees_the_flatten_order(keras_run):
    """fc6's rows transposed without the (c, h, w) -> (h, w, c) permutation give other logits."""
    _, got, want = keras_run
    assert np.abs(got["naive224"] - want[224]).max() > 100 * _tolerance(want[224])["atol"]


def test_image_size_override(keras_run):
    out, _, _ = keras_run
    assert out["sizes"]["224"] == {"input": 224, "resize": 256, "pool5": [6, 6, 256],
                                   "params": paper.TORCHVISION_PARAMETER_COUNT}
    assert out["sizes"]["180"]["input"] == 180
    assert out["sizes"]["180"]["resize"] == round(180 * 256 / 224)
    assert out["sizes"]["180"]["pool5"] == [4, 4, 256]  # the adaptive pool maps 4x4 to 6x6


# ---------------------------------------------------------------------------------------
# The converted model, its record and its export.


def test_converted_model_and_record(converted, reference):
    model, path = reference
    keras_model = converted.model
    assert keras_model.count_params() == paper.TORCHVISION_PARAMETER_COUNT
    np.testing.assert_allclose(converted.mean, [123.675, 116.28, 103.53], rtol=1e-6)
    assert converted.resize == 256
    assert converted.class_names == imagenet_class_names()
    state = model.state_dict()
    kernel, bias = keras_model.get_layer("conv2").get_weights()
    np.testing.assert_array_equal(kernel[1, 3, 7, 11], state["features.3.weight"][11, 7, 1, 3])
    np.testing.assert_array_equal(bias, state["features.3.bias"].numpy())
    # fc6 input (h, w, c) in Keras is PyTorch's column c * 36 + h * 6 + w.
    kernel = keras_model.get_layer("fc6").get_weights()[0]
    h, w, c = 2, 5, 77
    np.testing.assert_array_equal(kernel[h * 6 * 256 + w * 256 + c, 9],
                                  state["classifier.1.weight"][9, c * 36 + h * 6 + w])
    np.testing.assert_array_equal(keras_model.get_layer("fc8").get_weights()[0],
                                  state["classifier.6.weight"].numpy().T)
    weights = converted.weights
    json.dumps(weights)
    assert weights["source"] == "torchvision"
    assert weights["file"] == "alexnet.pth"
    assert weights["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (weights["input"], weights["resize"], weights["num_classes"]) == (224, 256, 1000)
    assert set(weights["conventions"]) >= {"layout", "flatten_order", "std", "mean"}
    assert weights["published_file"] is True
    accuracy = weights["published_accuracy"]
    assert (accuracy["top1"], accuracy["top5"]) == (56.522, 79.066)
    assert "torchvision" in accuracy["source"]


@pytest.mark.slow
def test_export_serves_what_the_keras_model_computes(converted, image_paths, tmp_path):
    version = export_converted(converted, tmp_path / "models")
    metadata = read_metadata(version)
    assert metadata["weights"] == converted.weights
    assert (metadata["image_size"], metadata["resize_size"]) == (224, 256)
    np.testing.assert_allclose(metadata["mean"], [255 * m for m in paper.TORCHVISION_MEAN],
                               rtol=1e-6)
    assert metadata["class_names"] == imagenet_class_names()

    blobs = [path.read_bytes() for path in image_paths]
    served = tf.saved_model.load(str(version)).signatures["serving_default"](
        images=tf.constant(blobs))
    pixels = tf.stack([preprocessing.eval_from_bytes(b, 224, converted.mean, 256)
                       for b in blobs])
    probabilities = tf.nn.softmax(converted.model(pixels, training=False)).numpy()
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    assert len({tuple(row) for row in top5}) > 1  # the photos matter, not only fc8's bias
    np.testing.assert_array_equal(served["classes"].numpy(), top5)
    np.testing.assert_allclose(served["scores"].numpy(),
                               np.take_along_axis(probabilities, top5, axis=1),
                               rtol=1e-4, atol=1e-6)
    labels = [[label.decode() for label in row] for row in served["labels"].numpy()]
    assert labels == [[converted.class_names[i] for i in row] for row in top5]


# ---------------------------------------------------------------------------------------
# Accepted wrappings of the state dict.


def _wrapped(form, model):
    if form == "dataparallel":
        state = nn.DataParallel(model).state_dict()
        assert all(key.startswith("module.") for key in state)
        return state
    if form == "checkpoint_state_dict":
        return {"state_dict": model.state_dict(), "epoch": 90, "best_acc1": 56.5}
    return {"model": model.state_dict(), "optimizer": {"lr": 0.01}}


@pytest.mark.parametrize("form", ["dataparallel", "checkpoint_state_dict", "checkpoint_model"])
def test_wrapped_state_dicts_load(form, reference, converted, tmp_path):
    model, _ = reference
    path = tmp_path / f"{form}.pth"
    torch.save(_wrapped(form, model), path)
    result = tv_convert.load_torchvision(path)
    for got, want in zip(result.model.weights, converted.model.weights):
        assert got.path == want.path
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert result.weights["published_file"] is False
    assert "published_accuracy" not in result.weights  # not the published file


def test_other_class_counts_need_their_names(tmp_path):
    model = torch_model(seed=1, num_classes=10)
    path = tmp_path / "ten.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match=r"ten\.pth.*10 classes.*pass class_names"):
        tv_convert.load_torchvision(path)
    with pytest.raises(ValueError, match=r"3 class names for 10 classes"):
        tv_convert.load_torchvision(path, class_names=["a", "b", "c"])
    names = [f"class {i}" for i in range(10)]
    result = tv_convert.load_torchvision(path, class_names=names)
    assert result.class_names == names
    assert result.model.output_shape == (None, 10)
    pixels = random_pixels(2, 224, seed=5)
    want = torch_logits(model, pixels)
    got = result.model(pixels - np.asarray(result.mean, np.float32), training=False).numpy()
    np.testing.assert_allclose(got, want, **_tolerance(want))


# ---------------------------------------------------------------------------------------
# Refused files: a clear ValueError, before any model is built, and nothing executed.


class CodeOnUnpickle:
    """Unpickling this calls ``open(marker, "w")``: it creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def no_build(monkeypatch):
    """Fails the test if `load_torchvision` gets as far as building the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built for a file that should have been refused")
    monkeypatch.setattr(tv_convert, "alexnet", refuse)


# torch warns that a plain pickle's protocol is not its own before refusing it.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", ["torch_save", "plain_pickle"])
def test_a_pickle_that_runs_code_is_refused(writer, tmp_path, no_build):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    payload = {"features.0.weight": CodeOnUnpickle(marker)}
    if writer == "torch_save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    message = "refused to unpickle" if writer == "torch_save" else "not a PyTorch file"
    with pytest.raises(ValueError, match=message) as raised:
        tv_convert.load_torchvision(path)
    assert str(path) in str(raised.value)
    assert not marker.exists()
    # The payload is live: an unsafe load runs it.
    if writer == "torch_save":
        loaded = torch.load(path, weights_only=False)
    else:
        loaded = pickle.loads(path.read_bytes())
    loaded["features.0.weight"].close()
    assert marker.exists()


def test_a_pickled_module_is_refused(tmp_path, no_build):
    path = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match=r"refused to unpickle.*torch\.nn\.modules\.linear.*"
                                         r"model\.state_dict\(\)"):
        tv_convert.load_torchvision(path)


@pytest.fixture(scope="module")
def state(reference):
    """The reference state dict (shared tensors: the cases below copy the dict only)."""
    return dict(reference[0].state_dict())


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


BAD_STATES = {
    "missing_key": (lambda s: _without(s, "classifier.4.bias"),
                    r"missing keys \['classifier\.4\.bias'\], unexpected keys \[\]"),
    "wrong_shape": (lambda s: {**s, "features.3.weight": torch.zeros(192, 64, 3, 3)},
                    r"features\.3\.weight has shape \(192, 64, 3, 3\), expected "
                    r"\(192, 64, 5, 5\)"),
    "resnet": (lambda s: {"conv1.weight": torch.zeros(64, 3, 7, 7),
                          "bn1.weight": torch.ones(64), "fc.weight": torch.zeros(1000, 512),
                          "fc.bias": torch.zeros(1000)},
               r"not torchvision's AlexNet state dict: missing keys \['features\.0\.weight'.*"
               r"unexpected keys \['bn1\.weight', 'conv1\.weight', 'fc\.bias', 'fc\.weight'\]"),
    "extra_key": (lambda s: {**s, "classifier.7.weight": torch.zeros(3)},
                  r"missing keys \[\], unexpected keys \['classifier\.7\.weight'\]"),
    "not_a_tensor": (lambda s: {**s, "features.0.bias": [0.0] * 64},
                     r"features\.0\.bias is a list, expected a tensor of shape \(64,\)"),
    "integer_tensor": (lambda s: {**s, "features.0.bias": torch.zeros(64, dtype=torch.int64)},
                       r"features\.0\.bias has dtype torch\.int64"),
    "nan": (lambda s: {**s, "classifier.4.bias": torch.full((4096,), float("nan"))},
            r"classifier\.4\.bias holds NaN"),
    "not_a_dict": (lambda s: [s["features.0.weight"]], r"holds a list, not a state dict"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_bad_state_dicts_are_refused(case, state, tmp_path, no_build):
    mutate, message = BAD_STATES[case]
    path = tmp_path / f"{case}.pth"
    torch.save(mutate(state), path)
    with pytest.raises(ValueError, match=message) as raised:
        tv_convert.load_torchvision(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint\n", "random"])
def test_files_that_are_not_torch_files_are_refused(content, tmp_path, no_build):
    if content == "random":
        content = np.random.default_rng(0).bytes(100_000)
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"not a PyTorch file") as raised:
        tv_convert.load_torchvision(path)
    assert str(path) in str(raised.value)


def test_a_missing_file_is_refused(tmp_path, no_build):
    with pytest.raises(ValueError, match=r"nope\.pth: no such file"):
        tv_convert.load_torchvision(tmp_path / "nope.pth")


# ---------------------------------------------------------------------------------------
# PyTorch stays optional.


def test_without_torch_the_error_says_how_to_install_it(monkeypatch, reference):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
    with pytest.raises(ImportError, match=r"pip install 'keras-alexnet\[torch\]'"):
        tv_convert.load_torchvision(reference[1])


def test_importing_the_converter_does_not_import_torch(keras_run):
    """`SCRIPT` imports the converter in a fresh process before anything imports torch."""
    out, _, _ = keras_run
    assert out["import_imports_torch"] is False
