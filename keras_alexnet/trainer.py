"""A training run: model, optimiser, data, callbacks, resume, evaluation and export.

`run` trains with ``model.fit`` and leaves in the run directory::

    config.json          the resolved `TrainConfig`
    checkpoints/         epoch_NNNN.keras (model + optimiser), the newest `keep_checkpoints`
    state.json           last finished epoch and learning-rate schedule state
    history.csv          loss, top-1, top-5 (train and validation) and lr per epoch
    logs/                TensorBoard event files
    export.json          what was exported (version path, base path, epoch), so that
                         rerunning a finished run exports nothing new unless forced

Everything that can be checked before training is checked before anything is written
(the configuration against a saved run, ``epochs`` against the epochs already trained,
the dataset: it loads, decodes, has at least 2 classes). Every file is written to a
temporary name and renamed into place, so an interrupted run never leaves a
half-written checkpoint; rerunning the same command resumes from the newest checkpoint
that ``state.json`` names, first removing what a killed run left behind (temporary
checkpoint and state files, export staging folders, ``history.csv`` rows of epochs no
checkpoint covers). A non-finite loss stops the run with `NonFiniteLossError`: the last
good checkpoint stays, nothing of the diverged weights is saved or exported.

``config.strategy`` picks the device layout (`keras_alexnet.distribute`): ``default``,
``mirrored`` and ``towers`` train with ``fit`` as above; ``multiworker`` trains with
`keras_alexnet.custom_loop` (Keras 3 ``fit`` fails under that strategy). The model is
built under the strategy's scope, ``config.batch_size`` is per replica and the
pipelines are batched at the global batch, which ``fit`` splits across replicas.
"""

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import time

import keras

from keras_alexnet import datasets, export, files, preprocessing
from keras_alexnet.training import distribute, input_pipeline
from keras_alexnet.training.config import TrainConfig
from keras_alexnet.model import AlexNet

# Fields that may change between a run and its resumption.
RESUMABLE_CHANGES = ("epochs", "data_dir", "manual_dir", "keep_checkpoints")


def build_model(config, num_classes, tower_devices=None):
    """The `AlexNet` a configuration describes (towers placed on ``tower_devices``)."""
    return AlexNet(num_classes=num_classes, seed=config.seed, tower_devices=tower_devices,
                   **config.model_kwargs())


def build_optimizer(config, replicas=1):
    """SGD with momentum (the paper; decay comes from the model's L2 terms) or Adam.

    With ``config.scale_lr`` the learning rate is multiplied by ``replicas``, as the
    global batch is (the linear scaling rule of Goyal et al., 2017).
    """
    lr = config.learning_rate * (replicas if getattr(config, "scale_lr", True) else 1)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=config.momentum)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    raise ValueError(f"`optimizer` must be 'sgd' or 'adam'. Received: {config.optimizer!r}")


@contextlib.contextmanager
def precision_policy(name):
    """Sets Keras' global dtype policy (``None`` leaves it) and restores it on exit."""
    if name not in (None, "float32", "mixed_float16", "mixed_bfloat16"):
        raise ValueError("`mixed_precision` must be 'mixed_float16' or 'mixed_bfloat16'. "
                         f"Received: {name!r}")
    previous = keras.config.dtype_policy()
    if name is not None:
        keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def inference_copy(model):
    """A float32, unplaced, strategy-free copy of an `AlexNet` with the same weights.

    What gets exported: a SavedModel of it carries neither device names nor mirrored
    variables, so it loads on any machine.
    """
    with precision_policy("float32"):
        copy = AlexNet.from_config({**model.get_config(), "tower_devices": None})
    copy.set_weights([keras.ops.convert_to_numpy(w) for w in model.weights])
    return copy


def load_data(config):
    """``(source, mean)``: the dataset splits and the mean the pipelines subtract."""
    source = datasets.load(config.dataset, data_dir=config.data_dir,
                           manual_dir=config.manual_dir, val_split=config.val_split,
                           seed=config.seed)
    if config.mean == "image":
        from keras_alexnet.training import mean_image

        mean = mean_image.compute_or_load(source, config.data_dir, config.image_size)
    else:
        mean = preprocessing.resolve_mean(config.mean, config.image_size)
    return source, mean


def metrics():
    """Top-1 and top-5 accuracy on integer labels (error = 1 - accuracy)."""
    return [
        keras.metrics.SparseCategoricalAccuracy(name="top1"),
        keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5"),
    ]


def compile_model(model, config, replicas=1):
    """Compiles for ``fit``; under mixed_float16 Keras wraps the optimiser in a
    ``LossScaleOptimizer`` (``auto_scale_loss``)."""
    model.compile(
        optimizer=build_optimizer(config, replicas),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics(),
        jit_compile=True if getattr(config, "jit_compile", False) else "auto",
    )
    return model


def write_atomic(path, text):
    """Writes ``text`` to ``path`` through a temporary file and a rename."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training diverged and was stopped."""


def non_finite_message(where, name, value, run_dir, config):
    return (
        f"{where}: the {name} is {value}, not a finite number; training diverged and was "
        f"stopped. Nothing of these weights was saved or exported; {run_dir} keeps the "
        f"last good checkpoint. Retry with a lower learning rate (it was "
        f"{config.learning_rate:g}) in a new --run-dir."
    )


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises `NonFiniteLossError` at the first non-finite training loss (checked after
    every batch) or validation loss (after every epoch). It must come first among the
    callbacks, so that no later one logs or checkpoints the epoch."""

    def __init__(self, run_dir, config):
        super().__init__()
        self.run_dir, self.config = run_dir, config
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def _check(self, where, logs, names):
        for name in names:
            if logs and name in logs:
                value = float(keras.ops.convert_to_numpy(logs[name]))
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        non_finite_message(where, name.replace("val_", "validation "),
                                           value, self.run_dir, self.config))

    def on_train_batch_end(self, batch, logs=None):
        self._check(f"Epoch {self.epoch + 1}, step {batch + 1}", logs, ("loss",))

    def on_epoch_end(self, epoch, logs=None):
        self._check(f"Epoch {epoch + 1}", logs, ("loss", "val_loss"))


def truncate_history(path, epochs):
    """Keeps the rows of ``history.csv`` for epochs ``0 .. epochs - 1`` only, once each.

    A run killed after logging an epoch but before ``state.json`` trusted its
    checkpoint (or a write cut short by a full disk) leaves rows that the resumed run
    writes again; this drops them (the last complete row of an epoch wins) and any
    partial line. With ``epochs == 0`` the file goes.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return
    if epochs == 0:
        path.unlink()
        return
    lines = path.read_text().splitlines(keepends=True)
    if not lines or not lines[0].endswith("\n"):
        path.unlink()
        return
    header, width = lines[0], len(lines[0].rstrip("\r\n").split(","))
    rows = {}
    for line in lines[1:]:
        cells = line.rstrip("\r\n").split(",")
        if line.endswith("\n") and len(cells) == width and cells[0].isdigit():
            if int(cells[0]) < epochs:
                rows[int(cells[0])] = line
    text = header + "".join(rows[e] for e in sorted(rows))
    if text != "".join(lines):
        write_atomic(path, text)


def remove_leftovers(run_dir, export_dir=None):
    """Deletes what a killed run left: ``.*.tmp`` files in ``run_dir`` (`write_atomic`),
    partial ``checkpoints/.epoch_N.tmp.keras`` files and the staging folders of killed
    exports under ``export_dir``. Returns the paths removed."""
    run_dir = pathlib.Path(run_dir)
    removed = []
    for pattern in (".*.tmp", "checkpoints/.epoch_*.tmp.keras", "backup/*_temp*"):
        for path in run_dir.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(str(path))
    if export_dir is not None:
        removed += [str(pathlib.Path(export_dir) / name)
                    for name in export.remove_stale_staging(export_dir)]
    return removed


def read_run(run_dir, config):
    """``(saved_config, state)`` of an existing run in ``run_dir`` (``None`` when absent),
    after checking that ``config`` may resume it: only `RESUMABLE_CHANGES` differ and
    ``config.epochs`` is not below the epochs already trained. Writes nothing."""
    run_dir = pathlib.Path(run_dir)
    config_path, state_path = run_dir / "config.json", run_dir / "state.json"
    saved = state = None
    if config_path.exists():
        saved = TrainConfig.from_dict(json.loads(config_path.read_text()))
        check_resumable(saved, config)
        if state_path.exists():
            state = json.loads(state_path.read_text())
    trained = state["epoch"] if state else 0
    if config.epochs < trained:
        raise ValueError(
            f"{run_dir} has trained {trained} epochs already; epochs={config.epochs} is fewer. "
            f"Pass --epochs {trained} (or more, to extend the run), or choose a new --run-dir."
        )
    return saved, state


def check_source(source):
    """Checks a loaded dataset before training: at least 2 classes, and the first image
    of each split decodes. Raises ValueError naming the problem."""
    from keras_alexnet import preprocessing as prep

    if source.num_classes < 2:
        raise ValueError(
            f"Dataset {source.name!r} has {source.num_classes} class(es): classification "
            "needs at least 2 (one sub-folder per class for folder datasets).")
    export.top_k_for(source.num_classes)
    for split, ds in (("training", source.train), ("validation", source.validation)):
        try:
            image_bytes, _ = next(iter(ds.take(1)))
            prep.decode_image(image_bytes)
        except StopIteration:
            raise ValueError(f"The {split} split of {source.name!r} is empty.") from None
        except Exception as error:  # noqa: BLE001 - reported with its cause
            raise ValueError(
                f"The first {split} image of {source.name!r} cannot be read or decoded "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]}).") from error


def previous_export(run_dir, export_dir, epoch):
    """The path of the version this run already exported at ``epoch`` into
    ``export_dir``, or ``None``. A record left ``pending`` by a run killed during the
    export counts when its version directory exists (the rename is the last step)."""
    record_path = pathlib.Path(run_dir) / "export.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    path = pathlib.Path(record.get("path", ""))
    if "epoch" not in record:  # written before export.json recorded epochs: a finished run
        record = {**record, "epoch": epoch, "base_dir": str(path.parent)}
    same_base = (pathlib.Path(record.get("base_dir", "")).resolve()
                 == pathlib.Path(export_dir).resolve())
    if record.get("epoch") == epoch and same_base and (path / "saved_model.pb").is_file():
        return path
    return None


def export_once(model, run_dir, export_dir, class_names, mean, epoch):
    """Exports the next version into ``export_dir`` and records it in ``export.json``.

    The record is written first as ``pending`` with the version number, then the
    version, then the record as done: a kill anywhere leaves either no version or one
    that `previous_export` recognises.
    """
    run_dir = pathlib.Path(run_dir)
    version = (files.list_versions(export_dir) or [0])[-1] + 1
    path = pathlib.Path(export_dir) / str(version)
    record = {"path": str(path), "base_dir": str(pathlib.Path(export_dir)),
              "version": version, "epoch": epoch}
    write_atomic(run_dir / "export.json", json.dumps({**record, "status": "pending"}))
    path = export.export_saved_model(model, export_dir, class_names, version=version, mean=mean)
    write_atomic(run_dir / "export.json", json.dumps({**record, "status": "done"}))
    return path


class PlateauSchedule(keras.callbacks.Callback):
    """Divides the learning rate by 10 when validation top-1 stops improving (Sec. 5).

    At most ``max_drops`` times, after ``patience`` epochs without a new best. Its state
    (best, wait, drops) is saved with each checkpoint so a resumed run continues it.
    """

    def __init__(self, max_drops, patience, factor=0.1, monitor="val_top1"):
        super().__init__()
        self.max_drops, self.patience, self.factor, self.monitor = (
            max_drops, patience, factor, monitor)
        self.best, self.wait, self.drops = -1.0, 0, 0

    def get_state(self):
        return {"best": self.best, "wait": self.wait, "drops": self.drops}

    def set_state(self, state):
        self.best, self.wait, self.drops = state["best"], state["wait"], state["drops"]

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        value = logs.get(self.monitor)
        if value is None:
            return
        if value > self.best:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience and self.drops < self.max_drops:
            self.model.optimizer.learning_rate.assign(logs["lr"] * self.factor)
            self.drops += 1
            self.wait = 0
            print(f"\nEpoch {epoch + 1}: validation top-1 plateaued; learning rate "
                  f"{logs['lr']:.2e} -> {logs['lr'] * self.factor:.2e} (drop {self.drops})")


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves ``checkpoints/epoch_NNNN.keras`` after each epoch, atomically, and prunes.

    The model (with optimiser state) goes to a temporary file that is renamed into
    place; then ``state.json`` records the epoch and the schedule state. A checkpoint
    is only trusted once ``state.json`` names it.
    """

    def __init__(self, run_dir, schedule, keep):
        super().__init__()
        self.run_dir = pathlib.Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.schedule, self.keep = schedule, max(1, keep)

    def on_epoch_end(self, epoch, logs=None):
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"epoch_{epoch + 1:04d}.keras"
        tmp = self.dir / f".epoch_{epoch + 1:04d}.tmp.keras"
        self.model.save(tmp)
        os.replace(tmp, path)
        state = {"epoch": epoch + 1, "checkpoint": path.name, "schedule": self.schedule.get_state()}
        write_atomic(self.run_dir / "state.json", json.dumps(state, indent=1))
        for old in sorted(self.dir.glob("epoch_*.keras"))[: -self.keep]:
            old.unlink()


def check_resumable(saved, config):
    """Raises ValueError naming the fields where ``config`` differs from the ``saved`` run.

    Only `RESUMABLE_CHANGES` (e.g. ``epochs``, to extend a run) may differ.
    """
    old, new = dataclasses.asdict(saved), dataclasses.asdict(config)
    changed = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise ValueError(
            f"The run directory holds a run with a different configuration ({details}). "
            "Rerun with the original flags to resume it, or choose a new --run-dir."
        )


def run(config, run_dir, export_dir="models/alexnet", *, verbose=1, do_export=True,
        force_export=False):
    """Trains (or resumes) the run in ``run_dir`` and exports a SavedModel version.

    A finished run that already exported its final epoch into ``export_dir`` exports
    nothing new unless ``force_export``.

    Returns a dict with the final validation ``val_top1``/``val_top5`` (accuracies),
    ``val_loss``, the ``epochs`` trained, ``seconds`` of wall time, ``export_path``
    (``None`` when nothing was exported) and ``previous_export`` (the version this run
    had exported already, when that made the export unnecessary).

    Raises:
        ValueError: before anything is written, for a configuration the run directory
            cannot resume, ``epochs`` below the epochs trained, or a dataset that
            does not load or decode or has fewer than 2 classes.
        NonFiniteLossError: the loss diverged (the last good checkpoint is kept).
    """
    if config.strategy == "multiworker":
        from keras_alexnet import custom_loop

        strategy, _ = distribute.make_strategy(config.strategy, config.cpu_devices)
        return custom_loop.run(config, run_dir, export_dir, strategy, verbose=verbose,
                               do_export=do_export, force_export=force_export)
    with precision_policy(config.mixed_precision):
        return _fit(config, run_dir, export_dir, verbose=verbose, do_export=do_export,
                    force_export=force_export)


def _fit(config, run_dir, export_dir, *, verbose, do_export, force_export):
    start = time.time()
    run_dir = pathlib.Path(run_dir)
    # Checks first: nothing is written to run_dir before they pass.
    _, state = read_run(run_dir, config)
    strategy, tower_devices = distribute.make_strategy(config.strategy, config.cpu_devices)
    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas
    keras.utils.set_random_seed(config.seed)
    source, mean = load_data(config)
    check_source(source)

    run_dir.mkdir(parents=True, exist_ok=True)
    for path in remove_leftovers(run_dir, export_dir if do_export else None):
        print(f"Removed {path}, left by an interrupted run.")
    truncate_history(run_dir / "history.csv", state["epoch"] if state else 0)
    write_atomic(run_dir / "config.json", config.to_json())

    train_ds = input_pipeline.training_dataset(
        source.train, global_batch, image_size=config.image_size, mean=mean,
        pca_std=config.pca_std, seed=config.seed)
    val_ds = input_pipeline.evaluation_dataset(
        source.validation, global_batch, image_size=config.image_size, mean=mean)

    schedule = PlateauSchedule(config.lr_drops, config.plateau_patience)
    initial_epoch = 0
    if state is not None:
        checkpoint = run_dir / "checkpoints" / state["checkpoint"]
        with strategy.scope():
            model = keras.saving.load_model(checkpoint)
        schedule.set_state(state["schedule"])
        initial_epoch = state["epoch"]
        print(f"Resuming {run_dir} from {checkpoint.name} (epoch {initial_epoch}).")
    else:
        with strategy.scope():
            model = compile_model(
                build_model(config, source.num_classes, tower_devices), config, replicas)

    callbacks = [
        StopOnNonFiniteLoss(run_dir, config),  # first: before anything logs the epoch
        schedule,
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(run_dir / "logs"), write_graph=False),
        AtomicCheckpoint(run_dir, schedule, config.keep_checkpoints),
    ]
    results = None
    if initial_epoch < config.epochs:
        # shuffle=False: the tf.data pipeline shuffles, seeded; Keras would only warn.
        history = model.fit(train_ds, validation_data=val_ds, epochs=config.epochs,
                            initial_epoch=initial_epoch, callbacks=callbacks, verbose=verbose,
                            shuffle=False)
        # The last epoch's validation pass already measured the final weights.
        results = {k: history.history[f"val_{k}"][-1] for k in ("loss", "top1", "top5")}
    if results is None:  # nothing left to train (a finished run rerun): measure again
        results = model.evaluate(val_ds, return_dict=True, verbose=0)
    summary = {
        "val_loss": float(results["loss"]),
        "val_top1": float(results["top1"]),
        "val_top5": float(results["top5"]),
        "epochs": config.epochs,
        "export_path": None,
    }
    summary["previous_export"] = None
    if do_export:
        summary["previous_export"] = previous = (
            None if force_export else previous_export(run_dir, export_dir, config.epochs))
        if previous is not None:
            summary["previous_export"] = str(previous)
            print(f"{run_dir} exported epoch {config.epochs} already, to {previous}; nothing "
                  "new exported (force_export=True, or --force-export, exports it again).")
        else:
            plain = (config.strategy == "default" and config.mixed_precision is None)
            exported = model if plain else inference_copy(model)
            path = export_once(exported, run_dir, export_dir, source.display_names, mean,
                               config.epochs)
            summary["export_path"] = str(path)
    summary["seconds"] = time.time() - start
    return summary
