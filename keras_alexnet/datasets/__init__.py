"""Dataset sources: encoded images and integer labels, by name.

`load` returns a `DatasetSource` whose ``train`` and ``validation`` splits yield
``(encoded_image_bytes, label)`` pairs; decoding and augmentation happen later in
`keras_alexnet.training.input_pipeline`, with the preprocessing shared by export. Names:

* ``alexnet_shapes`` (default) and ``alexnet_shapes/tiny``: the embedded, locally
  generated TFDS dataset (`keras_alexnet.datasets.shapes`).
* ``imagenet2012``: ILSVRC-2012 through the TFDS builder, prepared from the user's
  own archives in ``manual_dir`` (`keras_alexnet.datasets.imagenet`).
* ``folder:PATH``: one sub-folder of images per class, with ``train/`` + ``val/`` or a
  held-out ``val_split`` (`keras_alexnet.datasets.folder`).
"""

from keras_alexnet.datasets.source import DatasetSource

__all__ = ["DEFAULT_DATASET", "DatasetSource", "load"]

DEFAULT_DATASET = "alexnet_shapes"


def _load_shapes(name, data_dir):
    import tensorflow_datasets as tfds

    from keras_alexnet.datasets.shapes import AlexnetShapes

    config = name.split("/", 1)[1] if "/" in name else "default"
    builder = AlexnetShapes(config=config, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )

    def split(which):
        ds = builder.as_dataset(
            split=which, decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False
        )
        return ds.map(lambda ex: (ex["image"], ex["label"]))

    info = builder.info
    return DatasetSource(
        name=name,
        train=split("train"),
        validation=split("validation"),
        class_names=list(info.features["label"].names),
        num_train=info.splits["train"].num_examples,
        num_validation=info.splits["validation"].num_examples,
    )


def load(name=DEFAULT_DATASET, *, data_dir=None, **options):
    """Loads a dataset source by name (see the module docstring).

    Args:
        name: dataset name.
        data_dir: TFDS data directory (where prepared datasets are cached);
            ``None`` uses TFDS' default (``~/tensorflow_datasets``).
        **options: dataset-specific options: ``manual_dir`` (imagenet2012),
            ``val_split`` (folders), ``seed`` (file-order shuffling); ``None`` values
            are ignored.

    Raises:
        ValueError: for an unknown name, naming the known ones.
        FileNotFoundError: for imagenet2012 not yet prepared and without its archives.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if name == DEFAULT_DATASET or name.startswith(DEFAULT_DATASET + "/"):
        return _load_shapes(name, data_dir)
    if name == "imagenet2012":
        from keras_alexnet.datasets.imagenet import load_imagenet

        return load_imagenet(data_dir=data_dir, **options)
    if name.startswith("folder:"):
        from keras_alexnet.datasets.folder import load_folder

        return load_folder(name, data_dir=data_dir, **options)
    raise ValueError(
        f"Unknown dataset {name!r}. Known: '{DEFAULT_DATASET}', '{DEFAULT_DATASET}/tiny', "
        "'imagenet2012', 'folder:PATH'."
    )
