"""Export robustness: readable by other users, every decoder format guarded, 2-4 classes."""

import io
import json
import os
import pathlib
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_alexnet import alexnet, export, preprocessing

IMAGES = sorted((pathlib.Path(__file__).parent / "data" / "images").iterdir())
NOBODY = 65534


def tiny_model(num_classes):
    return alexnet(num_classes=num_classes, image_size=67, width=0.125, seed=0,
                   initializer="he", input_scale=1 / 64)


@pytest.fixture(scope="module")
def model():
    return tiny_model(10)


@pytest.fixture(scope="module")
def exported_027(model, tmp_path_factory):
    """An export made under umask 027."""
    previous = os.umask(0o027)
    try:
        return export.export_saved_model(model, tmp_path_factory.mktemp("m") / "alexnet",
                                         [f"c{i}" for i in range(10)])
    finally:
        os.umask(previous)


@pytest.fixture(scope="module")
def serve(exported_027):
    return tf.saved_model.load(str(exported_027)).signatures["serving_default"]


@pytest.fixture
def public_dir():
    """A folder every user may traverse (pytest's own tmp_path is 0700, root's)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="export-robustness-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _encode(image, fmt, **kwargs):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def webp_declaring(width, height):
    """A 38-byte lossy WebP: RIFF header, a VP8 key frame header declaring the size."""
    vp8 = b"\x00\x00\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"\x00" * 8
    chunk = b"VP8 " + struct.pack("<I", len(vp8)) + vp8
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def gif_of_frames(width, height, frames):
    """A GIF whose `frames` image descriptors each declare width x height (a few bytes
    of LZW data each): tiny on disk, frames x width x height pixels for giflib."""
    out = [b"GIF89a", struct.pack("<HHBBB", width, height, 0x80, 0, 0), b"\0\0\0\xff\xff\xff"]
    for _ in range(frames):
        out.append(b"\x21\xf9\x04\x00\x0a\x00\x00\x00")  # graphic control extension
        out.append(b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0))
        out.append(b"\x02\x02\x4c\x01\x00")  # LZW code size, one sub-block, terminator
    return b"".join(out) + b"\x3b"


def _modes(root):
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + ([] if dirpath != str(root) else ["."]):
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    return found


def _check_modes(version_dir, umask):
    modes = _modes(version_dir)
    assert len(modes) > 5  # saved_model.pb, variables/, assets.extra/alexnet_export.json ...
    for rel, mode in modes.items():
        is_dir = os.path.isdir(os.path.join(version_dir, rel))
        expected = (0o777 if is_dir else 0o666) & ~umask
        assert mode == expected, (rel, oct(mode), oct(expected))


def test_export_is_readable_by_an_unprivileged_user(public_dir):
    model = tiny_model(3)  # also: 3 classes export their top 3
    names = ["ant", "bee", "cat"]
    version = export.export_saved_model(model, public_dir / "models", names)
    _check_modes(version, 0o022)
    _check_modes(public_dir / "models", 0o022)  # the base path too (created by mkdir)
    metadata = json.loads((version / "assets.extra" / export.METADATA_FILE).read_text())
    assert metadata["top_k"] == 3
    image = IMAGES[0]
    shutil.copy(image, public_dir / "photo.jpg")
    os.chmod(public_dir / "photo.jpg", 0o644)
    # TensorFlow is imported first (this interpreter may live under root's 0700 home);
    # then every privilege goes, and only then is the export read.
    script = f"""
import json, os
import tensorflow as tf
os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
assert os.getuid() == {NOBODY} and os.geteuid() == {NOBODY} and os.getgroups() == []
caps = [l for l in open("/proc/self/status") if l.startswith("CapEff")][0].split()[1]
assert int(caps, 16) == 0, caps
serve = tf.saved_model.load({str(version)!r}).signatures["serving_default"]
out = serve(images=tf.constant([open({str(public_dir / "photo.jpg")!r}, "rb").read()]))
print("RESULT" + json.dumps({{"classes": out["classes"].numpy().tolist(),
                             "labels": out["labels"].numpy().astype(str).tolist()}}))
"""
    assert os.getuid() == 0, "this test needs root to drop to another user"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", HOME=str(public_dir))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=180, env=env, cwd=str(public_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads([x for x in result.stdout.splitlines() if x.startswith("RESULT")][-1][6:])
    pixels = preprocessing.eval_from_bytes(image.read_bytes(), 67)[None]
    expected = np.argsort(-model(pixels, training=False).numpy()[0], kind="stable")[:3]
    assert got["classes"] == [expected.tolist()]
    assert got["labels"] == [[names[i] for i in expected]]


def test_export_modes_follow_the_umask(exported_027):
    _check_modes(exported_027, 0o027)


def test_declared_pixels_of_every_format_matches_the_image(tmp_path):
    photo = Image.open(IMAGES[1]).convert("RGB")
    width, height = photo.size
    frames = [photo, photo.transpose(Image.FLIP_LEFT_RIGHT), photo.rotate(180)]
    cases = {
        "jpeg": (_encode(photo, "JPEG"), width * height),
        "png": (_encode(photo, "PNG"), width * height),
        "bmp": (_encode(photo, "BMP"), width * height),
        "gif": (_encode(photo, "GIF"), width * height),
        "gif, 3 frames": (_encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
                          3 * width * height),
        "webp (VP8)": (_encode(photo, "WEBP"), width * height),
        "webp (VP8L)": (_encode(photo, "WEBP", lossless=True), width * height),
        "webp (VP8X)": (_encode(photo, "WEBP", exif=b"Exif\0\0MM"), width * height),
        "webp 8000x8000": (webp_declaring(8000, 8000), 64_000_000),
        "animated webp": (_encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
                          export.ANIMATED_WEBP),
        "unknown": (b"\0\0\0\x0cjP  \r\n\x87\n", export.UNSUPPORTED_FORMAT),  # JPEG 2000
        "empty": (b"", export.UNSUPPORTED_FORMAT),
        "short gif": (b"GIF89a", export.UNSUPPORTED_FORMAT),
    }
    assert cases["webp (VP8X)"][0][12:16] == b"VP8X"
    assert cases["webp (VP8L)"][0][12:16] == b"VP8L"
    declared = tf.function(export.declared_pixels)
    for name, (payload, expected) in cases.items():
        assert int(declared(tf.constant(payload))) == expected, name
    # 60 frames of 4000 x 4000: counting stops as soon as the cap is passed.
    bomb = gif_of_frames(4000, 4000, 60)
    assert len(bomb) < 1500
    assert int(declared(tf.constant(bomb))) > export.MAX_IMAGE_PIXELS
    assert int(declared(tf.constant(gif_of_frames(100, 50, 7)))) == 7 * 100 * 50


def test_serving_refuses_bombs_and_unknown_formats_with_clear_messages(serve):
    cases = [
        (webp_declaring(8000, 8000), "Image too large"),
        (gif_of_frames(4000, 4000, 60), "every frame of a GIF counts"),
        (gif_of_frames(4000, 4000, 4), "Image too large"),  # 64 MP over 4 frames
        (b"\0\0\0\x0cjP  \r\n\x87\n" + b"\0" * 64, "Unsupported image format"),
        (b"II*\0" + b"\0" * 64, "Unsupported image format"),  # TIFF
        (b"", "Unsupported image format"),
    ]
    photo = Image.open(IMAGES[2]).convert("RGB")
    animated = _encode(photo, "WEBP", save_all=True, append_images=[photo.rotate(90)])
    cases.append((animated, "Animated WebP is not supported"))
    for payload, message in cases:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            serve(images=tf.constant([payload]))


def test_every_format_still_classifies(model, serve):
    photo = Image.open(IMAGES[3]).convert("RGB")
    frames = [photo, photo.rotate(180)]
    payloads = [
        _encode(photo, "JPEG"), _encode(photo, "PNG"), _encode(photo, "GIF"),
        _encode(photo, "BMP"), _encode(photo, "WEBP"), _encode(photo, "WEBP", lossless=True),
        _encode(photo, "WEBP", exif=b"Exif\0\0MM"),
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        IMAGES[0].read_bytes(),
    ]
    out = serve(images=tf.constant(payloads))
    pixels = tf.stack([preprocessing.eval_from_bytes(b, 67) for b in payloads])
    probabilities = tf.nn.softmax(model(pixels, training=False)).numpy()
    classes = np.argsort(-probabilities, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(out["classes"].numpy(), classes)
    np.testing.assert_allclose(out["scores"].numpy(),
                               np.take_along_axis(probabilities, classes, axis=1), rtol=1e-5)


def test_two_classes_export_top_two_and_one_class_is_refused(tmp_path):
    version = export.export_saved_model(tiny_model(2), tmp_path / "m", ["no", "yes"])
    assert json.loads((version / "assets.extra" / export.METADATA_FILE).read_text())[
        "top_k"] == 2
    loaded = tf.saved_model.load(str(version))
    out = loaded.signatures["serving_default"](images=tf.constant([IMAGES[0].read_bytes()]))
    assert out["classes"].shape == (1, 2) and sorted(out["classes"].numpy()[0]) == [0, 1]
    np.testing.assert_allclose(out["scores"].numpy().sum(), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2 classes"):
        export.top_k_for(1)
    assert [export.top_k_for(n) for n in (2, 3, 4, 5, 1000)] == [2, 3, 4, 5, 5]


def test_stale_staging_folders_are_removed_and_live_ones_kept(tmp_path):
    base = tmp_path / "models"
    host = socket.gethostname().replace("-", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        "dead": f".tmp-3-{host}-{dead.pid}-abc",
        "live": f".tmp-3-{host}-{os.getppid()}-def",
        "other host": f".tmp-3-elsewhere-{dead.pid}-ghi",
        "old style": ".tmp-3-x8_k2",
    }
    for name in names.values():
        (base / name / "variables").mkdir(parents=True)
    (base / "1").mkdir()
    removed = export.remove_stale_staging(base)
    assert removed == sorted([names["dead"], names["old style"]])
    assert sorted(p.name for p in base.iterdir()) == sorted(
        ["1", names["live"], names["other host"]])
