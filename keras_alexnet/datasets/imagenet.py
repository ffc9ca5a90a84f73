"""ImageNet ILSVRC-2012 through the TFDS ``imagenet2012`` builder, from the user's archives.

TFDS cannot download ImageNet: the user registers at image-net.org, downloads
``ILSVRC2012_img_train.tar`` (138 GB) and ``ILSVRC2012_img_val.tar`` (6.3 GB) and puts
both in a *manual directory*. `load_imagenet` then runs the real TFDS builder once
(it reads the archives and writes TFRecord shards into ``data_dir``, which takes
hours and about 150 GB) and afterwards only reads the prepared shards. Nothing is
downloaded: GCS is off and the builder reads only the manual directory.

Labels are the 1000 synsets in sorted order (TFDS' ``labels.txt``, the same order as
Caffe's ``synset_words.txt`` and Keras' ``imagenet_class_index.json``). The TFDS builder
labels validation images by sorting the file names in the validation tar and pairing
them with the 50,000 labels it ships, so the validation tar must hold the real
``ILSVRC2012_val_000NNNNN.JPEG`` files. Display names come from the label file this
package ships (``resources/synset_words.txt``): ``"n01440764 tench"``.
"""

import functools
import os
import pathlib

import tensorflow as tf

TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
NAME = "imagenet2012"


@functools.lru_cache(maxsize=None)
def synset_words():
    """``{synset: [word, ...]}`` from the shipped Caffe ``synset_words.txt`` (1000 classes)."""
    text = _resource_text("synset_words.txt")
    words = {}
    for line in text.splitlines():
        if line.strip():
            synset, _, names = line.partition(" ")
            words[synset] = [name.strip() for name in names.split(",")]
    return words


def _resource_text(name):
    from importlib import resources

    return (resources.files("keras_alexnet") / "resources" / name).read_text(encoding="utf-8")


def display_name(synset):
    """``"n01440764 tench"``: the synset id and the first of its WordNet words."""
    words = synset_words().get(synset)
    return f"{synset} {words[0]}" if words else synset


def default_manual_dir(data_dir=None):
    """Where TFDS looks for the archives when no manual directory is given."""
    import tensorflow_datasets as tfds

    base = data_dir or tfds.core.constants.DATA_DIR
    return os.path.join(os.path.expanduser(str(base)), "downloads", "manual")


def check_archives(manual_dir):
    """Raises ``FileNotFoundError`` naming each missing archive and where it belongs."""
    manual_dir = pathlib.Path(manual_dir).expanduser()
    missing = [name for name in (TRAIN_ARCHIVE, VAL_ARCHIVE) if not (manual_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            "ImageNet (imagenet2012) is prepared from your own copy of the ILSVRC-2012 "
            f"archives. Missing: {', '.join(missing)}. Download {TRAIN_ARCHIVE} and "
            f"{VAL_ARCHIVE} from https://image-net.org/download-images (free registration) "
            f"and put both, unpacked as .tar files, in {manual_dir} (or pass the folder "
            "holding them with --manual-dir). Received: manual_dir="
            f"{str(manual_dir)!r}"
        )


def load_imagenet(data_dir=None, manual_dir=None, seed=0, **_):
    """The ``imagenet2012`` `DatasetSource`; prepares it from the archives the first time.

    Args:
        data_dir: TFDS data directory for the prepared shards (default ``~/tensorflow_datasets``).
        manual_dir: folder holding the two archives (default
            ``<data_dir>/downloads/manual``, TFDS' own default).
        seed: file-order shuffling seed for the training split.

    Raises:
        FileNotFoundError: the dataset is not prepared yet and an archive is missing.
    """
    import tensorflow_datasets as tfds

    from keras_alexnet.datasets.source import DatasetSource

    builder = tfds.builder(NAME, data_dir=data_dir)
    if not _is_prepared(builder):
        manual_dir = manual_dir or default_manual_dir(data_dir)
        check_archives(manual_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.path.expanduser(str(manual_dir)),
                try_download_gcs=False,
                # Split sizes are recorded, not verified: a subset of the archives
                # (for a test, or a trial run) prepares as well as the full set.
                compute_stats=tfds.download.ComputeStatsMode.SKIP,
            )
        )

    def split(which, shuffle, shuffle_seed=seed):
        read_config = tfds.ReadConfig(
            # Never cache: 150 GB. (TFDS would only auto-cache a small prepared subset.)
            try_autocache=False,
            shuffle_seed=shuffle_seed if shuffle else None,
            shuffle_reshuffle_each_iteration=False,  # the order is the seed's, every time
        )
        ds = builder.as_dataset(
            split=which,
            decoders={"image": tfds.decode.SkipDecoding()},
            shuffle_files=shuffle,
            read_config=read_config,
        )
        return ds.map(lambda ex: (ex["image"], ex["label"]))

    info = builder.info
    synsets = list(info.features["label"].names)
    return DatasetSource(
        name=NAME,
        train=split("train", True),
        validation=split("validation", False),
        class_names=synsets,
        display_names=[display_name(s) for s in synsets],
        num_train=info.splits["train"].num_examples,
        num_validation=info.splits["validation"].num_examples,
        fingerprint=f"{info.version}-{info.splits['train'].num_examples}",
        shuffled_train=lambda order_seed: split("train", True, order_seed),
    )


def _is_prepared(builder):
    return tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))
