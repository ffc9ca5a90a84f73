"""Fine-tuning: a training run that starts from another model's weights with a new fc8.

A fine-tuning run is an ordinary training run (`keras_alexnet.training.loop.train`, the
same `RunDirectory`, checkpoints, exact resume, strategies and export) whose
`TrainConfig` names a source in ``init_from``:

* the model is the source's architecture (`SOURCE_FIELDS`: crop size, widths, towers,
  LRN constants, input scaling, ...) with a new fc8 for the dataset's classes, drawn by
  the source's initializer (N(0, 0.01) for the paper's and the converted weights, He for
  the demo presets) from the run's seed; every other layer starts with the source's
  weights;
* the preprocessing is the source's: its mean and the side its crops are cut from
  (``resize``; torchvision's weights take 224 crops of 256 squares);
* epochs ``0 .. head_epochs - 1`` are the *head* phase: only fc8 trains; with
  ``unfreeze`` set, the following epochs are the *unfrozen* phase: the named layer and
  every layer above it train (both towers), fc8 included, at ``learning_rate *
  unfreeze_lr_factor``. Each phase has its own optimiser (`phase_optimizers`); both are
  in every checkpoint, so the checkpoint's layout is the same in either phase and a
  resume anywhere (the phase boundary included) restores the right trainable set,
  optimiser state and learning rate. The phase is a function of the committed epoch.

The source is read only when the run starts (`describe_source` reads its metadata
without running TensorFlow, before the run's strategy exists; the loop then loads its
weights, `load_source`). A rerun of the same command resumes from the run's own
checkpoints and takes the source-derived fields from ``config.json`` (`prepare_config`),
so the source may be gone by then.
"""

import dataclasses
import json
import pathlib
import zipfile

from keras_alexnet import paper, preprocessing
from keras_alexnet.training.config import VARIANT_FIELDS

# The weight layers, bottom to top (tower suffixes _a/_b stripped).
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
UNFREEZE_CHOICES = ("conv3", "conv4", "conv5", "fc6", "fc7", "all")
# What a fine-tuning configuration takes from its source (the function its weights compute
# and the preprocessing they expect), besides ``init_source``.
ARCHITECTURE_FIELDS = ("image_size", "width", "towers", "use_lrn", "input_scale",
                       "initializer") + VARIANT_FIELDS
SOURCE_FIELDS = ARCHITECTURE_FIELDS + ("mean", "resize", "init_source")


def base_name(layer_name):
    """``"conv2"`` for ``"conv2_a"``; the tower suffix removed."""
    for suffix in ("_a", "_b"):
        if layer_name.endswith(suffix):
            return layer_name[: -len(suffix)]
    return layer_name


def trainable_layers(phase, unfreeze):
    """The `LAYERS` that train in ``phase`` (``"head"`` or ``"unfrozen"``)."""
    if phase == "head":
        return ("fc8",)
    start = 0 if unfreeze == "all" else LAYERS.index(unfreeze)
    return LAYERS[start:]


def phase_variables(model, phase, unfreeze):
    """The variables that train in ``phase``, in the model's layer order."""
    names = set(trainable_layers(phase, unfreeze))
    return [v for layer in model.layers if base_name(layer.name) in names
            for v in layer.trainable_weights]


def phase_optimizers(config, model, build_optimizer, replicas=1):
    """``{phase: (optimizer, variables)}``, in checkpoint order.

    A training run has one phase, ``"train"``: every trainable variable. A fine-tuning
    run has ``"head"`` (fc8) and, with ``config.unfreeze``, ``"unfrozen"`` (from that layer
    up) at ``unfreeze_lr_factor`` times the learning rate. Call under the strategy's scope:
    each optimiser is built (its slot variables made) over its own variables.
    """
    if config.init_from is None:
        phases = {"train": (build_optimizer(config, replicas), model.trainable_variables)}
    else:
        phases = {"head": (build_optimizer(config, replicas),
                           phase_variables(model, "head", config.unfreeze))}
        if config.unfreeze is not None:
            phases["unfrozen"] = (
                build_optimizer(config, replicas, lr_factor=config.unfreeze_lr_factor),
                phase_variables(model, "unfrozen", config.unfreeze))
    for optimizer, variables in phases.values():
        optimizer.build(variables)
    return phases


# Checks ---------------------------------------------------------------------------------

def check_config(config):
    """Raises ValueError for fine-tuning fields that make no sense (writes nothing)."""
    if config.init_from is None:
        if config.unfreeze is not None or config.head_epochs:
            raise ValueError("`unfreeze` and `head_epochs` need a model to fine-tune "
                             "(`init_from`, --from).")
    else:
        if config.unfreeze is not None and config.unfreeze not in UNFREEZE_CHOICES:
            raise ValueError(f"--unfreeze must be one of {', '.join(UNFREEZE_CHOICES)}. "
                             f"Received: {config.unfreeze!r}")
        if isinstance(config.head_epochs, bool) or not isinstance(config.head_epochs, int) \
                or config.head_epochs < 0:
            raise ValueError(f"--head-epochs must be an integer >= 0. Received: "
                             f"{config.head_epochs!r}")
        if not config.unfreeze_lr_factor > 0:
            raise ValueError(f"--unfreeze-lr-factor must be positive. Received: "
                             f"{config.unfreeze_lr_factor!r}")
        if config.init_source is None:
            raise ValueError("A fine-tuning configuration needs `init_source` "
                             "(finetune.prepare_config fills it).")
    if config.image_size < paper.MIN_IMAGE_SIZE:
        raise ValueError(f"The crop size {config.image_size} is below the smallest AlexNet "
                         f"input ({paper.MIN_IMAGE_SIZE}).")
    preprocessing.resize_size(config.image_size, config.resize)  # the crop fits its square
    if config.mean == "image" and config.resize is not None \
            and config.resize != preprocessing.resize_size(config.image_size):
        raise ValueError(
            f"The per-pixel mean image is computed at the paper's ratio "
            f"({preprocessing.resize_size(config.image_size)} for {config.image_size} crops), "
            f"not at resize={config.resize}; use a channel mean with this source.")


def _normal(value):
    """Tuples as lists (what a JSON round trip gives), so that configurations compare."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value


def _architecture(model_config):
    """`ARCHITECTURE_FIELDS` of an `AlexNet` config dict (get_config / a saved record)."""
    defaults = {"lrn_bias": paper.LRN_BIAS, "lrn_alpha": paper.LRN_ALPHA,
                "conv_filters": list(paper.CONV_FILTERS), "conv1_padding": 0,
                "adaptive_pool": None, "activation": "relu", "pool_size": paper.POOL_SIZE,
                "pool_stride": paper.POOL_STRIDE, "input_scale": None, "initializer": "paper",
                "use_lrn": True, "towers": 2, "width": 1.0, "image_size": paper.IMAGE_SIZE}
    return {k: _normal(model_config.get(k, defaults[k])) for k in ARCHITECTURE_FIELDS}


def _config_architecture(config):
    """The architecture a `TrainConfig` builds, ``None`` variants resolved to the paper's."""
    return _architecture({k: v for k, v in dataclasses.asdict(config).items()
                          if k in ARCHITECTURE_FIELDS and v is not None})


# The source -----------------------------------------------------------------------------

def _refuse(path, why):
    return ValueError(f"--from {path}: {why}")


def describe_source(path):
    """What fine-tuning takes from the model at ``path``, read from its metadata alone
    (no TensorFlow op runs: the run's strategy is made later).

    Returns a dict of `SOURCE_FIELDS` for `TrainConfig` plus ``dropout_rate`` (the
    source's, the default for the run). ``init_source`` records the resolved ``path``
    (a run's newest checkpoint, an export base's newest version), its ``origin``
    (``"run"``, ``"export"``, ``"keras"``) and its ``num_classes``.

    Raises:
        ValueError: when ``path`` does not exist, is none of the kinds
            `model_source.load_keras` opens, or is not an `AlexNet`.
    """
    from keras_alexnet import export
    from keras_alexnet.training import model_source

    given = path
    path = pathlib.Path(path).expanduser().absolute()
    if not path.exists() and not path.with_name(path.name + ".index").is_file():
        raise _refuse(given, "no such file or directory.")
    try:
        found = model_source.run_and_checkpoint(path)
    except FileNotFoundError as error:
        raise _refuse(given, str(error)) from None
    if found is not None:
        run, name = found
        try:
            saved, state = run.read_config(), run.read_state()
            checkpoint = run.checkpoint_path(name)
        except (FileNotFoundError, ValueError, TypeError) as error:
            raise _refuse(given, str(error)) from None
        model_config = {**saved.model_kwargs(), "num_classes": state.num_classes}
        mean, resize, origin, resolved = saved.mean, saved.resize, "run", checkpoint
    elif path.is_file():
        if path.suffix != ".keras":
            raise _refuse(given, "a file but not a .keras model.")
        try:
            with zipfile.ZipFile(path) as archive:
                record = json.loads(archive.read("config.json"))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
            raise _refuse(given, f"not a readable .keras file ({error}).") from None
        if record.get("class_name") != "AlexNet":
            raise _refuse(given, f"holds a {record.get('class_name')!r}, not an AlexNet; "
                                 "fine-tuning replaces an AlexNet's fc8.")
        model_config = record.get("config", {})
        mean, resize, origin, resolved = "imagenet", None, "keras", path
    else:
        try:
            version = model_source.newest_version(path)
            metadata = export.read_metadata(version)
        except (FileNotFoundError, ValueError) as error:
            raise _refuse(given, str(error)) from None
        record = metadata.get("model") or {}
        if record.get("class_name") != "AlexNet":
            raise _refuse(given, "the export records no AlexNet architecture (exports of "
                                 "this package and its converters do); re-export the model.")
        model_config = record.get("config", {})
        mean = metadata.get("mean", "imagenet")
        if mean == "per-pixel":
            # The source's mean image is not carried over; the run uses the per-pixel
            # mean image of its own dataset (the same recipe).
            mean = "image"
        resize, origin, resolved = metadata.get("resize_size"), "export", version
    values = _architecture(model_config)
    for name in VARIANT_FIELDS:  # None (the paper's) unless they differ
        default = _architecture({})[name]
        if values[name] == default:
            values[name] = None
    if resize is not None and resize == preprocessing.resize_size(values["image_size"]):
        resize = None  # the paper's ratio: recorded as the default
    values.update(
        mean=_normal(mean), resize=resize,
        init_source={"path": str(resolved), "origin": origin,
                     "num_classes": int(model_config.get("num_classes", 0))},
        dropout_rate=float(model_config.get("dropout_rate", paper.DROPOUT_RATE)))
    return values


def prepare_config(config, init_from, run_dir=None, *, dropout_rate=None):
    """``config`` made a fine-tuning configuration from ``init_from``.

    For a new run the source-derived fields (`SOURCE_FIELDS`) come from the source's
    metadata (`describe_source`); when ``run_dir`` holds a run fine-tuning from the same
    ``init_from`` already, they come from its ``config.json`` and the source is not read.
    ``dropout_rate`` overrides the source's dropout (``None``: keep it). The result still
    goes through `TrainConfig.check_resumes` in `loop.train`.

    Raises:
        ValueError: for a source that is missing or not an AlexNet (nothing written).
    """
    from keras_alexnet.training.run_dir import RunDirectory

    init_from = str(pathlib.Path(init_from).expanduser().absolute())
    config = dataclasses.replace(config, init_from=init_from)
    saved = RunDirectory(run_dir).read_config() if run_dir is not None else None
    fields = SOURCE_FIELDS + (() if dropout_rate is not None else ("dropout_rate",))
    if saved is not None and saved.init_from == init_from:
        values = {k: getattr(saved, k) for k in fields}
    else:
        values = {k: v for k, v in describe_source(init_from).items() if k in fields}
    if dropout_rate is not None:
        values["dropout_rate"] = dropout_rate
    return dataclasses.replace(config, **values)


def load_source(config):
    """The source model of a fine-tuning configuration (`model_source.load_keras` of
    ``config.init_source["path"]``), checked against the configuration.

    Raises:
        ValueError: when it cannot be loaded, or its architecture is not the one the
            configuration records (it changed since the run started).
    """
    from keras_alexnet.model import AlexNet
    from keras_alexnet.training import model_source

    path = config.init_source["path"]
    try:
        loaded = model_source.load_keras(path)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise _refuse(config.init_from, f"cannot be loaded ({error}).") from None
    if not isinstance(loaded.model, AlexNet):
        raise _refuse(config.init_from, f"{path} is a {type(loaded.model).__name__}, not "
                                        "an AlexNet.")
    have, want = _architecture(loaded.model.get_config()), _config_architecture(config)
    changed = [k for k in ARCHITECTURE_FIELDS if have[k] != want[k]]
    if changed:
        details = ", ".join(f"{k}: {want[k]!r} recorded, {have[k]!r} now" for k in changed)
        raise _refuse(config.init_from, f"{path} is not the model this run was configured "
                                        f"from ({details}); choose a new --run-dir.")
    return loaded


def copy_source_weights(source_model, model):
    """Copies every weight layer's weights but fc8's from ``source_model`` into ``model``
    (matched by layer name, shapes checked); returns the layer names copied."""
    copied = []
    for layer in model.layers:
        if base_name(layer.name) not in LAYERS[:-1] or not layer.weights:
            continue
        source = source_model.get_layer(layer.name)
        values = source.get_weights()
        shapes = [tuple(w.shape) for w in layer.weights]
        if [tuple(v.shape) for v in values] != shapes:
            raise ValueError(f"Layer {layer.name}: the source's weights have shapes "
                             f"{[tuple(v.shape) for v in values]}, the model's {shapes}.")
        layer.set_weights(values)
        copied.append(layer.name)
    return copied
