"""One way to open "a model" given on a command line, as a Keras model.

The transfer tools (features, linear probes, fine-tuning) take any of:

* a training run directory (its newest committed checkpoint) or one of its
  checkpoints, ``<run>/checkpoints/ckpt-<step>``;
* an exported SavedModel version directory, or its base directory (newest version),
  written by `keras_alexnet.export` (also by the weight converters);
* a ``.keras`` file.

`load_keras` returns the model with the preprocessing it expects (crop size, mean,
resize side) and, where known, its class names.
"""

import dataclasses
import pathlib
from typing import Any, Optional

from keras_alexnet import export, files, preprocessing


@dataclasses.dataclass
class LoadedModel:
    """A float32, unplaced Keras model and the preprocessing its weights expect.

    Attributes:
        model: the Keras model (an `AlexNet` for runs and this package's exports).
        image_size: side of its square input.
        mean: what `preprocessing.resolve_mean` takes (``"imagenet"``, three values, an
            array or a ``.npy`` path), or ``"image"``: the run's per-pixel training mean,
            which `resolved_mean` computes (or reads from its cache) from the dataset.
        resize: side of the square the crops are cut from (``None``: the paper's ratio).
        class_names: the output labels, when the source records them (exports).
        run_config: the training run's configuration as a dict (runs and checkpoints).
        origin: ``"run"``, ``"export"`` or ``"keras"``.
        path: the resolved path (for a base directory, the version used).
    """

    model: Any
    image_size: int
    mean: Any = "imagenet"
    resize: Optional[int] = None
    class_names: Optional[list] = None
    run_config: Optional[dict] = None
    origin: str = "keras"
    path: Optional[pathlib.Path] = None

    def resolved_mean(self, source=None, data_dir=None):
        """The mean as a float32 array; ``"image"`` needs the training ``source``."""
        mean = self.mean
        if isinstance(mean, str) and mean == "image":
            if source is None:
                raise ValueError("This model was trained with the per-pixel mean image of its "
                                 "dataset; pass the dataset (or --mean) to compute it.")
            from keras_alexnet.training import mean_image

            mean = mean_image.compute_or_load(source, data_dir, self.image_size)
        return preprocessing.resolve_mean(mean, self.image_size, self.resize)


def run_and_checkpoint(path):
    """``(RunDirectory, checkpoint name)`` when ``path`` is a run directory (newest
    checkpoint: ``None``) or a checkpoint prefix inside one; else ``None``.

    Raises:
        FileNotFoundError: for a ``checkpoints/ckpt-N`` path with no such checkpoint.
    """
    from keras_alexnet.training.run_dir import CHECKPOINT_PREFIX, RunDirectory

    path = pathlib.Path(path)
    if (path / "config.json").is_file():
        return RunDirectory(path), None
    if path.name.startswith(CHECKPOINT_PREFIX) and path.parent.name == "checkpoints":
        if not path.with_name(path.name + ".index").is_file():
            raise FileNotFoundError(f"There is no checkpoint {path.name} in {path.parent}.")
        return RunDirectory(path.parent.parent), path.name
    return None


def newest_version(path):
    """``path`` itself when it is a SavedModel version, else its newest integer version.

    Raises:
        FileNotFoundError: when it is neither.
    """
    path = pathlib.Path(path)
    if (path / "saved_model.pb").is_file():
        return path
    versions = files.list_versions(path) if path.is_dir() else []
    if not versions:
        raise FileNotFoundError(
            f"{path} is not a training run, a checkpoint (run/checkpoints/ckpt-N), a SavedModel "
            "version (or base) directory or a .keras file.")
    return path / str(versions[-1])


def register_classes():
    """Makes the library's Keras classes known to Keras' deserialization (`AlexNet`, its
    layers, `keras_alexnet.ensemble.Ensemble`): their modules register them when they are
    imported, and the package imports them lazily. Call before rebuilding a recorded
    architecture or opening a ``.keras`` file."""
    from keras_alexnet import ensemble, model  # noqa: F401 (imported for registration)


def load_keras(path):
    """Opens a run, checkpoint, export or ``.keras`` file as a `LoadedModel`.

    Raises:
        FileNotFoundError: when ``path`` is none of those (or a run without checkpoint).
        ValueError: for an export without a recorded architecture, or a run of an
            older release.
    """
    path = pathlib.Path(path).expanduser()
    found = run_and_checkpoint(path)
    if found is not None:
        run, name = found
        model = run.load_model(name)
        config = dataclasses.asdict(run.read_config())
        return LoadedModel(model, int(model.input_shape[1]), config.get("mean") or "imagenet",
                           config.get("resize"), None, config, "run", path)
    if path.is_file():
        import keras

        if path.suffix != ".keras":
            raise FileNotFoundError(f"{path} is a file but not a .keras model.")
        register_classes()
        model = keras.saving.load_model(path)
        return LoadedModel(model, int(model.input_shape[1]), path=path)
    version = newest_version(path)
    register_classes()
    model, metadata = export.load_keras_model(version)
    return LoadedModel(model, int(metadata["image_size"]), metadata["mean"],
                       metadata.get("resize_size"), list(metadata["class_names"]), None,
                       "export", version)
