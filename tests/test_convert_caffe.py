"""keras_alexnet.convert.caffe: bvlc_alexnet files written here (nothing is downloaded) in
both Caffe formats convert to a model whose logits equal an independent float64 NumPy
forward pass with Caffe's semantics (tests/_caffe_reference.py), under both oneDNN
settings; the export classifies real photos like the Keras model; bad files are refused
before anything is written."""

import json
import pathlib
import re
import sys

import _caffe_reference as reference
import numpy as np
import pytest
from _subprocess import ONEDNN_SETTINGS, run_script

from keras_alexnet.convert import caffe_pb

TESTS = pathlib.Path(__file__).parent

LAYER_SEEDS = {"layer": 1, "V1": 2}
PIXEL_SEED = 7
# bvlc_alexnet's LRN (deploy.prototxt: local_size 5, alpha 1e-4, beta 0.75, k unset = 1);
# the V1 file sets k and alpha explicitly to other values, to show they are read.
LRN = {"layer": dict(local_size=5, alpha=1e-4, beta=0.75, k=1.0),
       "V1": dict(local_size=5, alpha=5e-4, beta=0.75, k=2.0)}


def _conv(name, bottom, num_output, kernel, *, stride=None, pad=None, group=None, v1=False):
    params = [f"num_output: {num_output}"]
    params += [f"pad: {pad}"] if pad else []
    params += [f"kernel_size: {kernel}"]
    params += [f"stride: {stride}"] if stride else []
    params += [f"group: {group}"] if group else []
    params += ['weight_filler { type: "gaussian" std: 0.01 }',
               'bias_filler { type: "constant" value: 0.1 }']
    if v1:
        head = (f'name: "{name}" type: CONVOLUTION blobs_lr: 1 blobs_lr: 2 weight_decay: 1 '
                'weight_decay: 0')
    else:
        head = (f'name: "{name}" type: "Convolution" param {{ lr_mult: 1 decay_mult: 1 }} '
                'param { lr_mult: 2 decay_mult: 0 }')
    return (f'{head}\n  convolution_param {{ {" ".join(params)} }}\n'
            f'  bottom: "{bottom}" top: "{name}"')


def _simple(name, kind, bottom, top, body="", v1=False):
    kinds = {"ReLU": "RELU", "LRN": "LRN", "Pooling": "POOLING", "Dropout": "DROPOUT",
             "InnerProduct": "INNER_PRODUCT", "Softmax": "SOFTMAX"}
    kind = kinds[kind] if v1 else f'"{kind}"'
    return f'name: "{name}" type: {kind} {body}\n  bottom: "{bottom}" top: "{top}"'


def deploy_prototxt(v1=False, lrn=None, num_classes=1000, conv2_group=2, norm1=True,
                    pool_first=False):
    """A deploy.prototxt modelled on models/bvlc_alexnet/deploy.prototxt (current format)
    or its 2014 V1 version (``input_dim``, ``layers``, enum types, blobs_lr)."""
    lrn = lrn or LRN["V1" if v1 else "layer"]
    lrn_body = (f"lrn_param {{ local_size: {lrn['local_size']} alpha: {lrn['alpha']} "
                f"beta: {lrn['beta']}" + (f" k: {lrn['k']}" if lrn["k"] != 1.0 else "") + " }")
    pool = "pooling_param { pool: MAX kernel_size: 3 stride: 2 engine: CAFFE }"
    fc = ("param { lr_mult: 1 } param { lr_mult: 2 } " if not v1 else "blobs_lr: 1 ") + \
        'inner_product_param { num_output: UNITS weight_filler { type: "gaussian" } }'
    blocks = [
        _conv("conv1", "data", 96, 11, stride=4, v1=v1),
        _simple("relu1", "ReLU", "conv1", "conv1", v1=v1),
    ]
    norm = _simple("norm1", "LRN", "conv1", "norm1", lrn_body, v1=v1)
    pool1 = _simple("pool1", "Pooling", "norm1" if norm1 else "conv1", "pool1", pool, v1=v1)
    if pool_first:  # CaffeNet's order: pool, then LRN
        blocks += [_simple("pool1", "Pooling", "conv1", "pool1", pool, v1=v1),
                   _simple("norm1", "LRN", "pool1", "norm1", lrn_body, v1=v1)]
        second = "norm1"
    else:
        blocks += ([norm] if norm1 else []) + [pool1]
        second = "pool1"
    blocks += [
        _conv("conv2", second, 256, 5, pad=2, group=conv2_group, v1=v1),
        _simple("relu2", "ReLU", "conv2", "conv2", v1=v1),
        _simple("norm2", "LRN", "conv2", "norm2", lrn_body, v1=v1),
        _simple("pool2", "Pooling", "norm2", "pool2", pool, v1=v1),
        _conv("conv3", "pool2", 384, 3, pad=1, v1=v1),
        _simple("relu3", "ReLU", "conv3", "conv3", v1=v1),
        _conv("conv4", "conv3", 384, 3, pad=1, group=2, v1=v1),
        _simple("relu4", "ReLU", "conv4", "conv4", v1=v1),
        _conv("conv5", "conv4", 256, 3, pad=1, group=2, v1=v1),
        _simple("relu5", "ReLU", "conv5", "conv5", v1=v1),
        _simple("pool5", "Pooling", "conv5", "pool5", pool, v1=v1),
    ]
    bottom = "pool5"
    for stage, units in ((6, 4096), (7, 4096), (8, num_classes)):
        blocks.append(_simple(f"fc{stage}", "InnerProduct", bottom, f"fc{stage}",
                              fc.replace("UNITS", str(units)), v1=v1))
        if stage < 8:
            blocks += [_simple(f"relu{stage}", "ReLU", f"fc{stage}", f"fc{stage}", v1=v1),
                       _simple(f"drop{stage}", "Dropout", f"fc{stage}", f"fc{stage}",
                               "dropout_param { dropout_ratio: 0.5 }", v1=v1)]
        bottom = f"fc{stage}"
    blocks.append(_simple("prob", "Softmax", "fc8", "prob", v1=v1))
    if v1:
        head = 'name: "AlexNet"\ninput: "data"\ninput_dim: 10\ninput_dim: 3\n' \
               'input_dim: 227\ninput_dim: 227\n'
        return head + "".join(f"layers {{\n  {b}\n}}\n" for b in blocks)
    head = ('name: "AlexNet"\nlayer {\n  name: "data" type: "Input" top: "data"\n'
            '  input_param { shape: { dim: 10 dim: 3 dim: 227 dim: 227 } }\n}\n')
    return head + "".join(f"layer {{\n  {b}\n}}\n" for b in blocks)


_V1_TYPES = {"Convolution": 4, "InnerProduct": 14, "ReLU": 18, "LRN": 15, "Pooling": 17,
             "Dropout": 6, "Softmax": 20}


def write_caffemodel(path, blobs, *, v1=False, legacy_dims=False):
    """A caffemodel as Caffe writes one: every layer of the net, the parametrised ones with
    their (weight, bias) blobs (``legacy_dims``: 4-D num/channels/height/width blobs)."""
    net = caffe_pb.NetParameter(name="AlexNet")
    order = [("conv1", "Convolution"), ("relu1", "ReLU"), ("norm1", "LRN"),
             ("pool1", "Pooling"), ("conv2", "Convolution"), ("relu2", "ReLU"),
             ("norm2", "LRN"), ("pool2", "Pooling"), ("conv3", "Convolution"),
             ("relu3", "ReLU"), ("conv4", "Convolution"), ("relu4", "ReLU"),
             ("conv5", "Convolution"), ("relu5", "ReLU"), ("pool5", "Pooling"),
             ("fc6", "InnerProduct"), ("relu6", "ReLU"), ("drop6", "Dropout"),
             ("fc7", "InnerProduct"), ("relu7", "ReLU"), ("drop7", "Dropout"),
             ("fc8", "InnerProduct"), ("prob", "Softmax")]
    for name, kind in order:
        if v1:
            layer = net.layers.add(name=name, type=_V1_TYPES[kind])
        else:
            layer = net.layer.add(name=name, type=kind)
        for array in blobs.get(name, ()):
            layer.blobs.append(caffe_pb.blob_from_array(array, legacy=legacy_dims))
    pathlib.Path(path).write_bytes(net.SerializeToString())
    return path


@pytest.fixture(scope="session")
def caffe_files(tmp_path_factory):
    """Both formats on disk: ``{"layer": (prototxt, caffemodel), "V1": (...)}``."""
    root = tmp_path_factory.mktemp("caffe")
    files = {}
    for form, seed in LAYER_SEEDS.items():
        v1 = form == "V1"
        prototxt = root / f"deploy_{form}.prototxt"
        prototxt.write_text(deploy_prototxt(v1=v1))
        model = write_caffemodel(root / f"alexnet_{form}.caffemodel",
                                 reference.random_blobs(seed), v1=v1, legacy_dims=v1)
        files[form] = (prototxt, model)
    return files


LOGITS_SCRIPT = """
import json, os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
sys.path.insert(0, sys.argv[1])
import _caffe_reference as reference
from keras_alexnet.convert import caffe
results = {}
for form, (prototxt, caffemodel, seed, pixel_seed, lrn) in json.loads(sys.argv[2]).items():
    rgb = reference.random_pixels(pixel_seed)
    # Caffe saw BGR: the reference gets the same pixels with the channels reversed, NCHW.
    want = reference.forward(reference.random_blobs(seed),
                             rgb[..., ::-1].transpose(0, 3, 1, 2), lrn_params=lrn)
    converted = caffe.load_caffe(prototxt, caffemodel)
    got = converted.model(rgb, training=False).numpy().astype(np.float64)
    results[form] = {
        "max_diff": float(np.abs(got - want).max()),
        "scale": float(np.abs(want).max()),
        "std": float(want.std()),
        "argmax_equal": bool((got.argmax(1) == want.argmax(1)).all()),
        "weights": converted.weights,
    }
    del converted
results["onednn"] = os.environ["TF_ENABLE_ONEDNN_OPTS"]
print("RESULT" + json.dumps(results))
"""


@pytest.mark.parametrize("onednn", ONEDNN_SETTINGS)
def test_logits_equal_an_independent_caffe_forward_pass(caffe_files, onednn):
    """The whole mapping (HWIO, BGR -> RGB in conv1, groups -> towers, conv3's inputs,
    fc6's C,H,W -> towers' H,W,C, LRN alpha / n and k, LRN across both towers, ceil
    pooling at 227) in one number per format: logits equal Caffe's computed in float64,
    for the current ``layer`` format and the legacy V1 one (4-D blobs)."""
    jobs = {form: [str(caffe_files[form][0]), str(caffe_files[form][1]), LAYER_SEEDS[form],
                   PIXEL_SEED, LRN[form]] for form in LAYER_SEEDS}
    out = run_script(LOGITS_SCRIPT, TESTS, json.dumps(jobs), onednn=onednn, timeout=300)
    assert out.pop("onednn") == onednn
    for form, result in out.items():
        assert 2.0 < result["scale"] < 100.0 and result["std"] > 1.0  # O(1)-O(10), not dead
        assert result["max_diff"] <= 1e-4 * result["scale"], (form, result)
        assert result["argmax_equal"]
        lrn = result["weights"]["lrn"]
        assert lrn["caffe"] == LRN[form]
        assert lrn["keras"]["alpha"] == pytest.approx(LRN[form]["alpha"] / 5, rel=1e-6)
        assert lrn["keras"]["bias"] == LRN[form]["k"]
        name = "layer" if form == "layer" else "V1 layers"
        assert result["weights"]["format"] == {"prototxt": name, "caffemodel": name}
        print(f"{form} onednn={onednn}: max |logit diff| {result['max_diff']:.2e} "
              f"on logits up to {result['scale']:.1f}")


def test_reference_is_not_per_tower():
    """The reference's LRN spans both groups (Caffe's LRN is not grouped): a per-tower LRN
    gives other values at the tower boundary, so the logits test would see one."""
    x = np.random.default_rng(0).normal(0, 100, (1, 96, 2, 2))
    whole = reference.lrn(x, local_size=5, alpha=1e-4, beta=0.75, k=1.0)
    towers = np.concatenate([reference.lrn(x[:, :48], local_size=5, alpha=1e-4, beta=0.75,
                                           k=1.0),
                             reference.lrn(x[:, 48:], local_size=5, alpha=1e-4, beta=0.75,
                                           k=1.0)], axis=1)
    differ = np.flatnonzero(np.abs(whole - towers).max(axis=(0, 2, 3)) > 1e-9)
    assert differ.tolist() == [46, 47, 48, 49]
    # Caffe's formula by hand at channel 47: window 45..49, scale = k + alpha / 5 * sum.
    window = (x[0, 45:50, 0, 0] ** 2).sum()
    assert whole[0, 47, 0, 0] == pytest.approx(x[0, 47, 0, 0] * (1 + 1e-4 / 5 * window) ** -0.75)


def _top5(logits):
    return np.argsort(-np.asarray(logits), axis=-1)[:, :5].tolist()


def _export_and_compare(converted, export_dir, image_paths):
    import tensorflow as tf

    from keras_alexnet import export, preprocessing
    from keras_alexnet.convert import export_converted

    version = export_converted(converted, export_dir)
    served = tf.saved_model.load(str(version)).signatures["serving_default"]
    images = [pathlib.Path(p).read_bytes() for p in image_paths]
    outputs = served(images=tf.constant(images))
    pixels = np.stack([preprocessing.eval_from_bytes(b, 227, converted.mean, 256).numpy()
                       for b in images])
    want = _top5(converted.model(pixels, training=False).numpy())
    assert outputs["classes"].numpy().tolist() == want
    labels = outputs["labels"].numpy()
    for row, classes in zip(labels, want):
        assert [s.decode() for s in row] == [converted.class_names[c] for c in classes]
        assert all(re.fullmatch(r"n\d{8} \S.*", s.decode()) for s in row)
    return version, export.read_metadata(version)


def test_export_serves_like_the_keras_model(caffe_files, image_paths, tmp_path):
    from keras_alexnet.convert import caffe

    converted = caffe.load_caffe(*caffe_files["layer"])
    assert converted.class_names[0] == "n01440764 tench" and len(converted.class_names) == 1000
    # Caffe's channel mean B, G, R = 104.007, 116.669, 122.679, given to the export as RGB.
    np.testing.assert_allclose(converted.mean, [122.679, 116.669, 104.007], atol=1e-3)
    assert converted.resize == 256
    _, metadata = _export_and_compare(converted, tmp_path / "export", image_paths)
    assert metadata["weights"] == json.loads(json.dumps(converted.weights))
    assert metadata["weights"]["source"] == "caffe"
    assert metadata["weights"]["channel_order"] == "BGR folded into conv1 (the export takes RGB)"
    assert metadata["weights"]["input"] == 227
    assert metadata["weights"]["published_accuracy"]["top1"] == 57.1
    assert metadata["weights"]["published_accuracy"]["top5"] == 80.2
    assert "models/bvlc_alexnet/readme.md" in metadata["weights"]["published_accuracy"]["source"]
    assert metadata["resize_size"] == 256 and metadata["image_size"] == 227
    np.testing.assert_allclose(metadata["mean"], converted.mean, rtol=1e-6)


def test_binaryproto_mean_image_becomes_an_rgb_hwc_mean(caffe_files, image_paths, tmp_path):
    """Caffe's mean image is 1 x 3 x 256 x 256, BGR, CHW: a hand-made one whose channels,
    rows and columns all differ comes back as mean[y, x] = (R, G, B)."""
    from keras_alexnet.convert import caffe

    y, x = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    bgr = np.stack([100 + 0.1 * y, 110 + 0.01 * x, 130 + 0.1 * y + 0.01 * x])  # B, G, R
    mean_file = tmp_path / "mean.binaryproto"
    mean_file.write_bytes(caffe_pb.blob_from_array(bgr[None], legacy=True).SerializeToString())
    converted = caffe.load_caffe(*caffe_files["layer"], mean=mean_file)
    assert converted.mean.shape == (256, 256, 3) and converted.mean.dtype == np.float32
    np.testing.assert_allclose(converted.mean[3, 200], [130 + 0.3 + 2.0, 110 + 2.0, 100.3],
                               rtol=1e-6)
    np.testing.assert_allclose(converted.mean, np.stack([bgr[2], bgr[1], bgr[0]], -1), rtol=1e-6)
    version, metadata = _export_and_compare(converted, tmp_path / "export", image_paths)
    assert metadata["mean"] == "per-pixel"
    np.testing.assert_array_equal(np.load(version / "assets.extra" / "mean.npy"), converted.mean)
    assert "mean.binaryproto" in metadata["weights"]["mean"]


def _bad_prototxt(tmp_path, **changes):
    path = tmp_path / "bad.prototxt"
    path.write_text(deploy_prototxt(**changes))
    return path


def _small_caffemodel(tmp_path, conv2_shape):
    """Real conv1 blobs, a conv2 weight of ``conv2_shape``, small stand-ins elsewhere."""
    blobs = {name: (np.zeros((2, 2), np.float32), np.zeros(2, np.float32))
             for name in reference.BLOB_SHAPES}
    blobs["conv1"] = tuple(np.zeros(s, np.float32) for s in reference.BLOB_SHAPES["conv1"])
    blobs["conv2"] = (np.zeros(conv2_shape, np.float32), np.zeros(256, np.float32))
    return write_caffemodel(tmp_path / "small.caffemodel", blobs)


@pytest.mark.parametrize("case", [
    "truncated", "random_bytes", "text_as_caffemodel", "no_weights", "conv2_group_1",
    "no_lrn", "pool_before_lrn", "conv2_blob_shape", "ten_classes_no_names", "binary_prototxt",
])
def test_bad_input_is_refused_before_anything_is_written(caffe_files, tmp_path, case):
    from keras_alexnet.convert import caffe, export_converted

    prototxt, caffemodel = caffe_files["layer"]
    expected = None
    if case == "truncated":
        caffemodel = tmp_path / "truncated.caffemodel"
        caffemodel.write_bytes(caffe_files["layer"][1].read_bytes()[:5_000_000])
        expected = r"truncated\.caffemodel is not a readable caffemodel"
    elif case == "random_bytes":
        caffemodel = tmp_path / "random.caffemodel"
        caffemodel.write_bytes(np.random.default_rng(0).bytes(100_000))
        expected = r"random\.caffemodel"
    elif case == "text_as_caffemodel":
        caffemodel = prototxt
        expected = re.escape(prototxt.name)
    elif case == "no_weights":
        caffemodel = write_caffemodel(tmp_path / "empty.caffemodel", {})
        expected = r"empty\.caffemodel holds no weights for the layers \['conv1'"
    elif case == "conv2_group_1":
        prototxt = _bad_prototxt(tmp_path, conv2_group=None)
        expected = r"Layer 'conv2': expected .*\(256, 5, 1, 2, 2\).*found \(256, 5, 1, 2, 1\)"
    elif case == "no_lrn":
        prototxt = _bad_prototxt(tmp_path, norm1=False)
        expected = r"Layer 'pool1'.*expected type 'LRN'.*found 'Pooling'"
    elif case == "pool_before_lrn":
        prototxt = _bad_prototxt(tmp_path, pool_first=True)
        expected = r"Layer 'pool1'.*expected type 'LRN'.*found 'Pooling'"
    elif case == "conv2_blob_shape":
        caffemodel = _small_caffemodel(tmp_path, (256, 96, 5, 5))
        expected = r"layer 'conv2' weights have shape 256 x 96 x 5 x 5, expected 256 x 48 x 5 x 5"
    elif case == "ten_classes_no_names":
        prototxt = _bad_prototxt(tmp_path, num_classes=10)
        expected = r"fc8 has 10 outputs.*pass class_names"
    elif case == "binary_prototxt":
        prototxt = tmp_path / "binary.prototxt"
        prototxt.write_bytes(np.random.default_rng(1).bytes(1000))
        expected = r"binary\.prototxt is not a Caffe prototxt"
    export_dir = tmp_path / "export"
    with pytest.raises(ValueError, match=expected):
        export_converted(caffe.load_caffe(prototxt, caffemodel), export_dir)
    assert not export_dir.exists()


def test_messages_have_caffes_field_numbers_and_defaults():
    lrn = caffe_pb.LRNParameter()
    assert (lrn.local_size, lrn.alpha, lrn.beta, lrn.k) == (5, 1.0, 0.75, 1.0)
    assert caffe_pb.ConvolutionParameter().group == 1
    assert caffe_pb.ConvolutionParameter().bias_term is True
    assert caffe_pb.PoolingParameter().pool == 0 and caffe_pb.PoolingParameter().stride == 1
    fields = {name: caffe_pb.NetParameter.DESCRIPTOR.fields_by_name[name].number
              for name in ("name", "layers", "input", "input_dim", "input_shape", "layer")}
    assert fields == {"name": 1, "layers": 2, "input": 3, "input_dim": 4, "input_shape": 8,
                      "layer": 100}
    blob = caffe_pb.BlobProto.DESCRIPTOR.fields_by_name
    assert [blob[n].number for n in ("num", "channels", "height", "width", "data", "shape",
                                     "double_data")] == [1, 2, 3, 4, 5, 7, 8]
    # The fast encoder writes exactly what filling the repeated field writes.
    array = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    slow = caffe_pb.BlobProto()
    slow.shape.dim.extend([4, 3])
    slow.data.extend(array.ravel().tolist())
    assert caffe_pb.blob_from_array(array).SerializeToString() == slow.SerializeToString()
    # Nested unknown messages, unknown scalars and enum identifiers in prototxt are skipped.
    net = caffe_pb.parse_text('layer { name: "c" type: "Convolution" param { lr_mult: 1 } '
                              'convolution_param { num_output: 3 weight_filler { type: "x" '
                              'std: 0.1 } engine: CUDNN } include { phase: TEST } }')
    assert net.layer[0].convolution_param.num_output == 3
    v1 = caffe_pb.parse_text('layers { name: "n" type: LRN lrn_param { alpha: 0.5 } }')
    assert caffe_pb.v1_type_name(v1.layers[0].type) == "LRN"
    assert v1.layers[0].lrn_param.k == 1.0 and v1.layers[0].lrn_param.alpha == 0.5


def test_the_convert_command_exports_a_version_and_refuses_bad_requests(caffe_files, tmp_path):
    """``alexnet-convert caffe`` as a user runs it: a new version with the Caffe record;
    an existing --version or a missing file is refused and changes nothing."""
    import subprocess

    prototxt, caffemodel = caffe_files["layer"]
    base = tmp_path / "models" / "alexnet"
    command = [sys.executable, "-m", "training.convert", "caffe", "--prototxt", str(prototxt),
               "--caffemodel", str(caffemodel), "--export", str(base)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "top-1 57.1 %, top-5 80.2 %" in done.stdout
    metadata = json.loads((base / "1" / "assets.extra" / "alexnet_export.json").read_text())
    assert metadata["weights"]["source"] == "caffe" and len(metadata["class_names"]) == 1000
    assert sorted(p.name for p in base.iterdir()) == ["1"]

    again = subprocess.run(command + ["--version", "1"], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode != 0 and "already exists" in again.stderr
    missing = subprocess.run(command[:7] + [str(tmp_path / "nope.caffemodel"), "--export",
                                            str(tmp_path / "other")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "nope.caffemodel does not exist" in missing.stderr
    assert not (tmp_path / "other").exists()
    assert sorted(p.name for p in base.iterdir()) == ["1"]
