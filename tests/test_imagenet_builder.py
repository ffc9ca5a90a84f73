"""imagenet2012: the real TFDS builder on a miniature manual directory, then one training step.

The miniature archives have the real layout: ``ILSVRC2012_img_train.tar`` holds one
``<synset>.tar`` of JPEGs per class, and ``ILSVRC2012_img_val.tar`` holds
``ILSVRC2012_val_000NNNNN.JPEG`` files. The TFDS builder labels validation files by
sorting their names and pairing them with the labels it ships
(``validation_labels.txt``), so files 1-3 get that file's first three labels.
"""

import io
import pathlib
import tarfile

import pytest

from keras_alexnet import datasets
from keras_alexnet.datasets import imagenet

DATA = pathlib.Path(__file__).parent / "data"
IMAGES = sorted((DATA / "images").iterdir())
# The shipped labels of ILSVRC2012_val_00000001..3 (TFDS validation_labels.txt, lines 1-3).
VAL_LABELS = ["n01751748", "n09193705", "n02105855"]


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_manual_dir(path):
    """Train: 3 real synsets of 2 real JPEGs each (one CMYK); val: 3 real JPEGs."""
    path.mkdir(parents=True, exist_ok=True)
    by_synset = {
        "n01871265": [IMAGES[0], IMAGES[1]],
        "n02817516": [IMAGES[2], DATA / "edge" / "pil_sample_cmyk.jpg"],
        "n03796401": [IMAGES[3], IMAGES[4]],
    }
    with tarfile.open(path / imagenet.TRAIN_ARCHIVE, "w") as train:
        for synset, files in by_synset.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for i, f in enumerate(files, 1):
                    _add(class_tar, f"{synset}_{i}.JPEG", f.read_bytes())
            _add(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(path / imagenet.VAL_ARCHIVE, "w") as val:
        for i, f in enumerate(IMAGES[:3], 1):
            _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", f.read_bytes())
    return path


def test_missing_archives_name_the_files_and_the_folder(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / imagenet.VAL_ARCHIVE).write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        datasets.load("imagenet2012", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
    message = str(err.value)
    assert imagenet.TRAIN_ARCHIVE in message and str(manual) in message
    assert "Missing: ILSVRC2012_img_train.tar." in message


def test_display_names_come_from_the_shipped_label_file():
    assert imagenet.display_name("n01440764") == "n01440764 tench"
    assert imagenet.display_name("n02012849") == "n02012849 crane"
    assert imagenet.display_name("n03126707") == "n03126707 crane"
    assert len(imagenet.synset_words()) == 1000


@pytest.mark.slow
def test_real_builder_prepares_the_miniature_archives_and_trains_one_step(tmp_path):
    import numpy as np
    import tensorflow as tf

    from keras_alexnet import preprocessing
    from keras_alexnet.training import input_pipeline
    from training import train

    manual = write_manual_dir(tmp_path / "manual")
    data_dir = str(tmp_path / "tfds")
    source = datasets.load("imagenet2012", data_dir=data_dir, manual_dir=str(manual))
    assert source.num_classes == 1000 and source.num_train == 6 and source.num_validation == 3
    assert source.class_names[0] == "n01440764"
    assert source.display_names[0] == "n01440764 tench"

    train_labels = sorted(int(y) for _, y in source.train.as_numpy_iterator())
    want = sorted(source.class_names.index(s) for s in ("n01871265", "n02817516", "n03796401")
                  for _ in range(2))
    assert train_labels == want
    val = list(source.validation.as_numpy_iterator())
    assert sorted(source.class_names[y] for _, y in val) == sorted(VAL_LABELS)
    # Every stored image decodes to RGB, the CMYK training JPEG included.
    for image_bytes, _ in list(source.train.as_numpy_iterator()) + val:
        assert preprocessing.decode_image(image_bytes).shape[-1] == 3
    # Nothing is cached in memory: TFDS would auto-cache a dataset this small.
    policy = tf.data.experimental.ExternalStatePolicy.WARN
    for split in (source.train, source.validation):
        graph = split._as_serialized_graph(external_state_policy=policy).numpy()
        assert b"CacheDataset" not in graph
    batch = next(iter(input_pipeline.training_dataset(source.train, 2, image_size=67)))
    assert batch[0].shape == (2, 67, 67, 3) and np.isfinite(batch[0].numpy()).all()

    # The archives are read once: a second load uses the prepared shards alone.
    for archive in manual.iterdir():
        archive.unlink()
    summary = train.main([
        "--preset", "smoke", "--dataset", "imagenet2012", "--data-dir", data_dir,
        "--manual-dir", str(manual), "--run-dir", str(tmp_path / "run"), "--no-export",
        "--epochs", "1", "--batch-size", "4", "--quiet",
    ])
    assert summary["epochs"] == 1 and np.isfinite(summary["val_loss"])
