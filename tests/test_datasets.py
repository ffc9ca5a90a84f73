"""folder:PATH datasets on real images, the per-pixel mean image, and the registry."""

import io
import pathlib
import shutil
import warnings

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_alexnet import datasets, preprocessing
from keras_alexnet.datasets import folder
from keras_alexnet.training import input_pipeline, mean_image

DATA = pathlib.Path(__file__).parent / "data"
IMAGES = sorted((DATA / "images").iterdir())
EDGE = DATA / "edge"


def _encoded(path, fmt, mode=None):
    image = Image.open(path)
    image = image.convert(mode) if mode else image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_folder(root):
    """Two classes (one with a space in its name) of real images in every accepted form."""
    train_a = root / "train" / "tusker and van"
    train_b = root / "train" / "small things"
    nested = train_b / "more photos"
    val_a, val_b = root / "val" / "tusker and van", root / "val" / "small things"
    for d in (train_a, train_b, nested, val_a, val_b):
        d.mkdir(parents=True)
    shutil.copy(IMAGES[0], train_a / "first photo.JPEG")
    shutil.copy(IMAGES[4], train_a / "VAN.JPG")
    shutil.copy(EDGE / "hopper_gray.jpg", train_a / "gray.jpeg")
    shutil.copy(EDGE / "pil_sample_cmyk.jpg", train_a / "cmyk.Jpg")
    (train_a / "png bytes.JPEG").write_bytes(_encoded(IMAGES[1], "PNG"))  # PNG under .JPEG
    (train_b / "rgba.PNG").write_bytes(_encoded(IMAGES[2], "PNG", "RGBA"))
    (train_b / "anim.gif").write_bytes(_encoded(IMAGES[3], "GIF"))
    (nested / "bitmap.BMP").write_bytes(_encoded(IMAGES[5], "BMP"))
    shutil.copy(IMAGES[6], nested / "cobra.jpg")
    shutil.copy(EDGE / "truncated_jpeg.jpg", train_b / "truncated.jpg")  # cannot decode
    (train_b / "notes.jpg").write_text("not an image")  # cannot decode
    (train_b / "readme.txt").write_text("ignored: not an image extension")
    (train_b / ".hidden.jpg").write_bytes(IMAGES[0].read_bytes())  # ignored: hidden
    shutil.copy(IMAGES[7], root / "val" / "tusker and van" / "tiger 1.jpg")
    shutil.copy(IMAGES[2], root / "val" / "small things" / "bear.jpeg")
    return root


def test_folder_decodes_every_format_and_reports_undecodable_files_once(tmp_path):
    root = make_folder(tmp_path / "pics")
    with pytest.warns(folder.UndecodableImagesWarning) as record:
        source = datasets.load(f"folder:{root}", data_dir=str(tmp_path / "cache"))
    assert len(record) == 1
    message = str(record[0].message)
    assert "Skipped 2 file(s)" in message
    assert "truncated.jpg" in message and "notes.jpg" in message
    assert source.class_names == ["small things", "tusker and van"]
    assert (source.num_train, source.num_validation) == (9, 2)
    assert sorted(p.rsplit("/", 1)[1] for p in source.skipped) == ["notes.jpg", "truncated.jpg"]

    shapes = {}
    for image_bytes, label in source.train.as_numpy_iterator():
        image = preprocessing.decode_image(image_bytes).numpy()
        assert image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8
        shapes.setdefault(int(label), []).append(image.shape)
    assert len(shapes[0]) == 4 and len(shapes[1]) == 5
    # The grayscale JPEG became three equal channels; the CMYK one real colours.
    gray = preprocessing.decode_image(tf.io.read_file(str(root / "train/tusker and van/gray.jpeg")))
    assert np.array_equal(gray[..., 0], gray[..., 2])
    cmyk = preprocessing.decode_image(tf.io.read_file(str(root / "train/tusker and van/cmyk.Jpg")))
    pil = np.asarray(Image.open(EDGE / "pil_sample_cmyk.jpg").convert("RGB"), np.float32)
    assert np.abs(cmyk.numpy().astype(np.float32) - pil).mean() < 3

    # The whole training pipeline runs over it without an error; a second load reads
    # the cached check (no decoding) and warns the same way.
    batch = next(iter(input_pipeline.training_dataset(source.train, 9, image_size=67)))
    assert batch[0].shape == (9, 67, 67, 3) and np.isfinite(batch[0].numpy()).all()
    with pytest.warns(folder.UndecodableImagesWarning, match="Skipped 2"):
        again = datasets.load(f"folder:{root}", data_dir=str(tmp_path / "cache"))
    assert again.num_train == 9 and again.fingerprint == source.fingerprint


def _small_folder(root):
    """One class, a decodable image in train/ and val/, and one corrupt file in train/."""
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        shutil.copy(IMAGES[0], root / split / "a" / "good.jpg")
    (root / "train" / "a" / "bad.jpg").write_text("not an image")
    return root


def test_skipped_files_warning_points_at_the_callers_code(tmp_path):
    root = _small_folder(tmp_path / "pics")
    for _ in range(2):  # the decode check, then the cached check
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            line = _line_here() + 1
            datasets.load(f"folder:{root}", data_dir=str(tmp_path / "cache"))
        record = [r for r in record if issubclass(r.category, folder.UndecodableImagesWarning)]
        assert len(record) == 1
        assert record[0].filename == __file__ and record[0].lineno == line
    # Called from inside the package (load_folder directly), it still names this file.
    with pytest.warns(folder.UndecodableImagesWarning) as record:
        folder.load_folder(f"folder:{root}", data_dir=str(tmp_path / "cache"))
    assert record[0].filename == __file__


def _line_here():
    import inspect

    return inspect.currentframe().f_back.f_lineno


def test_a_read_only_cache_location_only_costs_a_re_check(tmp_path, monkeypatch):
    root = _small_folder(tmp_path / "pics")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(folder.safe_files, "atomic_write", read_only)
    calls = []
    find = folder.find_undecodable
    monkeypatch.setattr(folder, "find_undecodable", lambda paths: calls.append(1) or find(paths))
    for _ in range(2):
        with pytest.warns(folder.UndecodableImagesWarning, match="Skipped 1"):
            source = datasets.load(f"folder:{root}", data_dir=str(tmp_path / "cache"))
        assert (source.num_train, source.num_validation) == (1, 1)
    assert len(calls) == 2  # nothing was cached: checked again
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_held_out_split_is_stratified_and_seeded(tmp_path):
    root = tmp_path / "flat"
    for name, files in (("a", IMAGES[:4]), ("b", IMAGES[4:8])):
        (root / name).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / name / f.name)
    with pytest.raises(ValueError, match="--val-split"):
        datasets.load(f"folder:{root}", data_dir=str(tmp_path / "cache"))
    source = datasets.load(f"folder:{root}", data_dir=str(tmp_path / "cache"), val_split=0.25)
    assert (source.num_train, source.num_validation) == (6, 2)
    val_labels = sorted(int(y) for _, y in source.validation.as_numpy_iterator())
    assert val_labels == [0, 1]  # one per class
    again = datasets.load(f"folder:{root}", data_dir=str(tmp_path / "cache"), val_split=0.25,
                          seed=9)  # the training seed does not move the held-out files
    first = [b for b, _ in source.validation.as_numpy_iterator()]
    assert first == [b for b, _ in again.validation.as_numpy_iterator()]
    train = {b for b, _ in source.train.as_numpy_iterator()}
    assert not train & set(first)

    # The augmented pipeline is deterministic for a seed, also across fresh sources
    # (a resumed process loads the dataset again).
    def batch(seed):
        fresh = datasets.load(f"folder:{root}", data_dir=str(tmp_path / "cache"), val_split=0.25)
        ds = input_pipeline.training_dataset(fresh.train, 6, image_size=67, seed=seed)
        return next(iter(ds))[0].numpy()

    np.testing.assert_array_equal(batch(5), batch(5))
    assert not np.array_equal(batch(5), batch(6))


def test_folder_errors_are_explicit(tmp_path):
    with pytest.raises(ValueError, match="No such folder"):
        datasets.load(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="Unknown dataset.*folder:PATH"):
        datasets.load("imagenet")


def test_mean_image_is_the_per_pixel_mean_and_is_cached(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "pics")
    with pytest.warns(folder.UndecodableImagesWarning):
        source = datasets.load(f"folder:{root}", data_dir=str(tmp_path / "cache"))
    side = preprocessing.resize_size(67)
    mean = mean_image.compute_or_load(source, str(tmp_path / "cache"), 67)
    assert mean.shape == (side, side, 3) and mean.dtype == np.float32
    squares = [preprocessing.resize_to_square(preprocessing.decode_image(b), side).numpy()
               for b, _ in source.train.as_numpy_iterator()]
    np.testing.assert_allclose(mean, np.mean(squares, axis=0), atol=1e-3)
    path = mean_image.cache_path(source, str(tmp_path / "cache"), 67)
    assert path.is_file() and str(tmp_path / "cache") in str(path)

    monkeypatch.setattr(mean_image, "compute", lambda *a, **k: pytest.fail("recomputed"))
    np.testing.assert_array_equal(mean_image.compute_or_load(source, str(tmp_path / "cache"), 67),
                                  mean)
    # The pipeline and the export take it as a mean.
    pixels = preprocessing.eval_from_bytes(IMAGES[0].read_bytes(), 67, mean)
    assert pixels.shape == (67, 67, 3)


@pytest.mark.slow
def test_train_cli_on_a_folder_with_the_mean_image(tmp_path):
    from training import train

    root = make_folder(tmp_path / "pics")
    with pytest.warns(folder.UndecodableImagesWarning):
        summary = train.main([
            "--preset", "smoke", "--dataset", f"folder:{root}", "--data-dir",
            str(tmp_path / "cache"), "--mean-image", "--run-dir", str(tmp_path / "run"),
            "--no-export", "--epochs", "1", "--batch-size", "4", "--quiet",
        ])
    assert np.isfinite(summary["val_loss"])
    assert list((tmp_path / "cache" / "keras_alexnet" / "mean-images").glob("*.npy"))


def test_folder_training_order_is_a_function_of_the_order_seed(tmp_path):
    """`shuffled_train(seed)` gives a full reshuffle per seed, the same one every time."""
    root = tmp_path / "pics"
    for i in range(3):
        (root / f"class{i}").mkdir(parents=True)
        for j in range(6):
            Image.new("RGB", (8, 8), (i * 80, j * 40, 0)).save(root / f"class{i}" / f"{j}.png")
    source = datasets.load(f"folder:{root}", data_dir=str(tmp_path / "cache"), val_split=0.2)

    def order(seed):
        return [b for b, _ in source.shuffled_train(seed).as_numpy_iterator()]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == sorted(order(2))
    assert len(order(1)) == source.num_train
