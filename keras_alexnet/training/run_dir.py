"""The run directory: everything a training run writes, and the only code that writes it.

::

    config.json        the resolved `TrainConfig` (written once, checked on every resume)
    state.json         the commit record: the newest trusted checkpoint and the loop's
                       position (epoch, step, partial-epoch sums, schedule state)
    checkpoints/       ckpt-<global step>.index / .data-*: model variables (weights and
                       dropout random state) and optimiser variables (momenta, learning
                       rate, iteration count, loss scale), `tf.train.Checkpoint` format
    history.csv        one row per finished epoch: loss, lr, top-1, top-5, validation
    logs/              TensorBoard event files (train/ and validation/)
    export.json        the SavedModel version this run exported (pending / done)

**Commit protocol.** A checkpoint's files are written first, then ``state.json`` is
replaced atomically (`keras_alexnet.files.atomic_write`) to name it: only a checkpoint
that ``state.json`` names is ever restored, so a kill in the middle of a checkpoint
write leaves the previous one in charge. `clean` removes what a killed run left:
uncommitted checkpoints, temporaries, export staging folders, history rows of epochs no
checkpoint covers. Every tool (resume, `alexnet-evaluate`, fine-tuning, conversion)
reads checkpoints through `RunDirectory.restore` / `RunDirectory.load_model`, for every
strategy including multi-worker.

**Multi-worker.** Every worker takes part in a checkpoint write (it runs collective
ops), but only the chief's files are kept: the others write into a private folder that
they delete at once. Only the chief writes ``state.json``, the history, the logs and the
export; every worker reads ``state.json`` from the shared run directory on restart.
"""

import csv
import dataclasses
import io
import json
import pathlib
import shutil

import tensorflow as tf

from keras_alexnet import export, files
from keras_alexnet.training.config import TrainConfig

HISTORY_FIELDS = ("epoch", "loss", "lr", "top1", "top5", "val_loss", "val_top1", "val_top5")
CHECKPOINT_PREFIX = "ckpt-"


@dataclasses.dataclass
class RunState:
    """Where a run stands: what ``state.json`` records with each committed checkpoint.

    ``epoch`` epochs are finished and ``step`` steps of the next one are done
    (``global_step = epoch * steps_per_epoch + step``); ``train_sums`` are the summed
    ``[loss, top1, top5, count]`` of those ``step`` steps, so that the epoch's history
    row is the same whether or not it was interrupted; ``schedule`` is the learning-rate
    schedule's state.
    """

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    train_sums: tuple = (0.0, 0.0, 0.0, 0.0)
    schedule: dict = dataclasses.field(default_factory=dict)
    num_classes: int = 0
    global_batch: int = 0  # batch_size x replicas: a resumed run must use the same
    checkpoints: list = dataclasses.field(default_factory=list)  # committed, oldest first

    @property
    def checkpoint(self):
        return self.checkpoints[-1] if self.checkpoints else None


def checkpoint_object(model, optimizer=None):
    """The `tf.train.Checkpoint` a run saves: ``model.variables`` (weights and the
    dropout layers' random state, in the model's fixed variable order) and, for
    training, ``optimizer.variables``. Readers that only need weights pass no optimiser
    and restore with ``expect_partial``.

    ``optimizer`` may be a list: a fine-tuning run has one optimiser per phase (fc8
    alone, then the unfrozen layers), all in every checkpoint, so the checkpoint's layout
    is the same in both phases and a resume in either restores both.
    """
    objects = {"model_variables": list(model.variables)}
    if optimizer is not None:
        optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
        objects["optimizer_variables"] = [v for o in optimizers for v in o.variables]
    return tf.train.Checkpoint(**objects)


class RunDirectory:
    """One training run's folder (see the module docstring for its layout).

    Args:
        path: the run directory.
        chief: whether this process writes (the multi-worker chief, or a single
            process); other workers only read.
    """

    def __init__(self, path, chief=True):
        self.path = pathlib.Path(path)
        self.chief = chief

    # Paths -----------------------------------------------------------------------
    @property
    def config_path(self):
        return self.path / "config.json"

    @property
    def state_path(self):
        return self.path / "state.json"

    @property
    def checkpoint_dir(self):
        return self.path / "checkpoints"

    @property
    def history_path(self):
        return self.path / "history.csv"

    @property
    def log_dir(self):
        return self.path / "logs"

    @property
    def export_record_path(self):
        return self.path / "export.json"

    def exists(self):
        return self.config_path.is_file()

    # Reading ----------------------------------------------------------------------
    def read_config(self):
        """The saved `TrainConfig`, or ``None`` for a directory without a run."""
        if not self.config_path.is_file():
            return None
        return TrainConfig.from_dict(json.loads(self.config_path.read_text()))

    def read_state(self):
        """The committed `RunState`, or ``None`` before the first checkpoint.

        Raises:
            ValueError: for a run written by an older release (``.keras`` or
                ``backup/`` checkpoints) or a ``state.json`` that does not parse.
        """
        if not self.state_path.is_file():
            if list(self.checkpoint_dir.glob("epoch_*.keras")) or (self.path / "backup").is_dir():
                raise ValueError(
                    f"{self.path} holds checkpoints of an older release (epoch_N.keras or "
                    "backup/), which this one cannot resume. Train into a new --run-dir.")
            return None
        try:
            values = json.loads(self.state_path.read_text())
            return RunState(**{k: values[k] for k in values
                               if k in {f.name for f in dataclasses.fields(RunState)}})
        except (ValueError, TypeError) as error:
            raise ValueError(f"{self.state_path} cannot be read ({error}); it is written "
                             "atomically, so something else changed it.") from error

    def check_resumable(self, config):
        """``(saved_config, state)`` after checking that ``config`` may resume this run:
        only `RESUMABLE_CHANGES` differ and ``config.epochs`` is not below the epochs
        trained already. Writes nothing; ``(None, None)`` for a new run."""
        saved = self.read_config()
        state = None
        if saved is not None:
            config.check_resumes(saved)
            state = self.read_state()
        trained = state.epoch if state else 0
        if config.epochs < trained:
            raise ValueError(
                f"{self.path} has trained {trained} epochs already; epochs={config.epochs} "
                f"is fewer. Pass --epochs {trained} (or more, to extend the run), or choose "
                "a new --run-dir.")
        return saved, state

    def checkpoint_path(self, name=None):
        """The prefix of checkpoint ``name`` (default: the newest committed one).

        Raises:
            FileNotFoundError: when the run has no committed checkpoint (yet).
        """
        if name is None:
            state = self.read_state()
            name = state.checkpoint if state else None
        if name is None:
            raise FileNotFoundError(f"{self.path} has no committed checkpoint yet (no "
                                    "state.json): train at least checkpoint_every steps.")
        return self.checkpoint_dir / name

    def restore(self, model, optimizer=None, checkpoint=None):
        """Restores ``model`` (and ``optimizer``) from a committed checkpoint (default the
        newest); with an optimiser every saved variable must match, without one the
        optimiser's variables are ignored. Returns the checkpoint's path."""
        path = self.checkpoint_path(checkpoint)
        status = checkpoint_object(model, optimizer).read(str(path))
        if optimizer is not None:
            status.assert_existing_objects_matched()
        else:
            status.expect_partial()
        return path

    def load_model(self, checkpoint=None):
        """A float32, unplaced `AlexNet` with the weights of a committed checkpoint (by
        default the newest), built from ``config.json`` alone: no dataset needed."""
        from keras_alexnet.model import AlexNet

        config = self.read_config()
        state = self.read_state()
        if config is None or state is None:
            raise FileNotFoundError(f"{self.path} is not a training run with a checkpoint "
                                    "(config.json and state.json).")
        model = AlexNet(num_classes=state.num_classes, seed=config.seed,
                        **config.model_kwargs())
        self.restore(model, checkpoint=checkpoint)
        return model

    # Writing (chief only) -----------------------------------------------------------
    def clean(self, state, export_dir=None):
        """Removes what a killed run left behind; returns the paths removed.

        Temporaries of `keras_alexnet.files`, TensorFlow's ``*_temp`` checkpoint folders,
        the private folders of other workers, checkpoints that ``state`` does not name
        (written but never committed), export staging folders under ``export_dir``, and
        ``history.csv`` rows of epochs after ``state.epoch``.
        """
        removed = [self.path / n for n in files.remove_stale_temporaries(self.path)]
        committed = set(state.checkpoints) if state else set()
        if self.checkpoint_dir.is_dir():
            for path in self.checkpoint_dir.iterdir():
                stem = path.name.split(".", 1)[0]
                leftover = (
                    path.name.startswith(files.TEMP_PREFIX) or "_temp" in path.name
                    or path.name.startswith(".worker-")
                    or (stem.startswith(CHECKPOINT_PREFIX) and stem not in committed))
                if leftover:
                    _remove(path)
                    removed.append(path)
        if export_dir is not None:
            removed += [pathlib.Path(export_dir) / n
                        for n in export.remove_stale_staging(export_dir)]
        self.truncate_history(state.epoch if state else 0)
        return [str(p) for p in removed]

    def write_config(self, config):
        self.path.mkdir(parents=True, exist_ok=True)
        files.atomic_write(self.config_path, config.to_json())

    def checkpoint_write_dir(self):
        """Where this process writes checkpoint files: ``checkpoints/`` on the chief, a
        private ``checkpoints/.worker-<pid>`` folder elsewhere (deleted after each write)."""
        if self.chief:
            return self.checkpoint_dir
        import os

        return self.checkpoint_dir / f".worker-{os.getpid()}"

    def save(self, checkpoint, state, keep, *, before_commit=None):
        """`write` then `commit`: writes checkpoint ``ckpt-<state.global_step>``, runs
        ``before_commit`` (the crash tests kill there), then commits it. Every worker
        calls it; only the chief keeps files. Returns the committed `RunState`."""
        self.write(checkpoint, state)
        if before_commit is not None:
            before_commit()
        return self.commit(state, keep)

    def write(self, checkpoint, state):
        """Writes the files of checkpoint ``ckpt-<state.global_step>`` (not yet trusted:
        `commit` makes it so). On other workers the files go to a private folder that is
        deleted at once."""
        write_dir = self.checkpoint_write_dir()
        write_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write(str(write_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"))
        if not self.chief:
            shutil.rmtree(write_dir, ignore_errors=True)

    def commit(self, state, keep):
        """Makes the written checkpoint of ``state`` the trusted one by replacing
        ``state.json``, then deletes committed checkpoints beyond the newest ``keep``.
        Returns the committed `RunState` (``state`` itself on other workers)."""
        if not self.chief:
            return state
        name = f"{CHECKPOINT_PREFIX}{state.global_step}"
        kept = [c for c in state.checkpoints if c != name] + [name]
        state = dataclasses.replace(state, checkpoints=kept[-max(1, keep):])
        files.atomic_write(self.state_path, json.dumps(dataclasses.asdict(state), indent=1))
        for old in set(kept) - set(state.checkpoints):
            for path in self.checkpoint_dir.glob(f"{old}.*"):
                path.unlink(missing_ok=True)
        return state

    def append_history(self, row):
        """Appends one epoch's row (`HISTORY_FIELDS`) to ``history.csv``."""
        new = not self.history_path.exists()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, extrasaction="ignore",
                                lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow({k: repr(float(v)) if k != "epoch" else int(v)
                         for k, v in row.items() if k in HISTORY_FIELDS})
        with open(self.history_path, "a") as f:
            f.write(buffer.getvalue())

    def truncate_history(self, epochs):
        """Keeps the rows of ``history.csv`` for epochs ``0 .. epochs - 1`` only, once each.

        A run killed after logging an epoch but before committing its checkpoint (or a
        write cut short by a full disk) leaves rows that the resumed run writes again;
        this drops them (the last complete row of an epoch wins) and any partial line.
        With ``epochs == 0`` the file goes.
        """
        path = self.history_path
        if not path.exists():
            return
        lines = path.read_text().splitlines(keepends=True)
        if epochs == 0 or not lines or not lines[0].endswith("\n"):
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
            files.atomic_write(path, text)

    def read_history(self):
        """The rows of ``history.csv`` as dicts of floats (``epoch`` an int)."""
        if not self.history_path.exists():
            return []
        with open(self.history_path, newline="") as f:
            return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()}
                    for row in csv.DictReader(f)]

    # Export -------------------------------------------------------------------------
    def previous_export(self, export_dir, epoch):
        """The path of the version this run already exported at ``epoch`` into
        ``export_dir``, or ``None``. A record left ``pending`` by a run killed during the
        export counts when its version directory exists (the rename is the last step)."""
        try:
            record = json.loads(self.export_record_path.read_text())
        except (OSError, ValueError):
            return None
        path = pathlib.Path(record.get("path", ""))
        same_base = (pathlib.Path(record.get("base_dir", "")).resolve()
                     == pathlib.Path(export_dir).resolve())
        if record.get("epoch") == epoch and same_base and (path / "saved_model.pb").is_file():
            return path
        return None

    def export(self, model, export_dir, class_names, mean, epoch, *, resize=None,
               metadata=None):
        """Exports the next version into ``export_dir`` and records it in ``export.json``.

        ``resize`` (the side crops are cut from) and ``metadata`` (extra entries of the
        export's metadata file) go to `keras_alexnet.export.export_saved_model`.

        The record is written first as ``pending`` with the version number, then the
        version (staged and renamed, `keras_alexnet.export`), then the record as done: a
        kill anywhere leaves either no version or one that `previous_export` recognises.
        """
        version = (files.list_versions(export_dir) or [0])[-1] + 1
        path = pathlib.Path(export_dir) / str(version)
        record = {"path": str(path), "base_dir": str(pathlib.Path(export_dir)),
                  "version": version, "epoch": epoch}
        files.atomic_write(self.export_record_path,
                           json.dumps({**record, "status": "pending"}))
        path = export.export_saved_model(model, export_dir, class_names, version=version,
                                         mean=mean, resize=resize, metadata=metadata)
        files.atomic_write(self.export_record_path, json.dumps({**record, "status": "done"}))
        return path


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
