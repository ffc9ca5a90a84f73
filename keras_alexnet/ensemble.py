"""Ensembles of classifiers served as one model (the paper's averaged CNNs, Sec. 6).

The paper's best ILSVRC-2012 result, 15.3 % top-5 test error, "averag[ed] the predictions
of seven similar CNNs" (five at 16.4 %). `ensemble_model` builds that average as one
Keras model, so the whole ensemble is one SavedModel version with the signatures of a
single export (`keras_alexnet.export`):

* the members get their own copies (``member_0``, ``member_1``, ...: every variable
  path starts with the member's name, so the members' ``conv1_a/kernel`` do not clash);
* the output is ``log(mean_m softmax(logits_m))``, so that the softmax every export
  takes of a model's output returns the members' averaged probabilities: since
  ``sum_i p_i = 1``, ``softmax(log p) = p / sum_i p_i = p``. The log is taken of
  ``max(p, FLOOR)`` (`FLOOR`, the smallest normal float32, 1.2e-38) so that a class every
  member gives probability 0 (a float32 softmax underflow) has a finite logit; that
  changes any probability by at most ``num_classes * FLOOR``. What remains is float32
  rounding of the log, the exp and the sums: a few 1e-8 per probability (at most 1e-6
  is tested against the members' own exports);
* the ``features`` signature (`Ensemble.feature_extractor`) is the concatenation of
  the members' features (fc7 by default: ``k x 4096`` for k full-size AlexNets),
  member 0's first;
* `export_ensemble` checks that the members agree on everything a request depends on
  (crop size, classes and their names, mean, resize side), naming the first member
  that differs, before anything is written; ``ten_crop=True`` makes the encoded-image
  signatures average over the 10 crops of each image too (over crops and members).

`load_keras_model` of `keras_alexnet.export` rebuilds an ensemble export (`Ensemble`
is a registered Keras class whose configuration holds its members'). Opening members
given as paths (runs, checkpoints, exports, ``.keras`` files) is the command line's
part (``alexnet-ensemble``, `training.ensemble`).
"""

import dataclasses
import pathlib
from typing import Any, Optional

import keras
import numpy as np

from keras_alexnet import export, preprocessing
from keras_alexnet import features as feature_layers

FLOOR = float(np.finfo(np.float32).tiny)  # log's floor: see the module docstring
AVERAGING = "softmax mean"
MEMBER_PREFIX = "member_"


@keras.saving.register_keras_serializable(package="keras_alexnet")
class LogMeanSoftmax(keras.layers.Layer):
    """``log(max(mean_m softmax(x_m), FLOOR))`` of a list of logits, in float32."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, inputs):
        probabilities = [keras.ops.softmax(keras.ops.cast(x, "float32"), axis=-1)
                         for x in inputs]
        mean = keras.ops.mean(keras.ops.stack(probabilities, axis=0), axis=0)
        return keras.ops.log(keras.ops.maximum(mean, FLOOR))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])


def _record(member, index):
    """The member's serialized record, renamed ``member_<index>``."""
    if isinstance(member, dict):
        record = member
    else:
        record = export.model_record(member)
        if record is None:
            raise ValueError(f"Member {index} ({member.name!r}) is not a serializable Keras "
                             "model; an ensemble copies its members from their configurations.")
    record = {**record, "config": {**record.get("config", {}),
                                   "name": f"{MEMBER_PREFIX}{index}"}}
    return record


@keras.saving.register_keras_serializable(package="keras_alexnet")
class Ensemble(keras.Model):
    """The mean of its members' softmax, as a functional model returning its log.

    Args:
        members: two or more Keras models taking the same ``[batch, S, S, 3]`` input
            and returning logits over the same number of classes, or their serialized
            records (``keras.saving.serialize_keras_object``; what `from_config` passes).
            Each is copied (built from its configuration inside the name scope
            ``member_<i>``, weights copied from the model given), so the ensemble
            holds new variables whose paths start with ``member_<i>/``.
        name: the model's name.

    Raises:
        ValueError: for fewer than 2 members, or members that differ in input shape or
            number of outputs (the message names the member).
    """

    def __init__(self, members, name="ensemble", **kwargs):
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"An ensemble needs at least 2 members; got {len(members)}.")
        copies = []
        for index, member in enumerate(members):
            record = _record(member, index)
            with keras.name_scope(f"{MEMBER_PREFIX}{index}"):
                copy = keras.saving.deserialize_keras_object(record)
            if not isinstance(member, dict):
                copy.set_weights(member.get_weights())
            copies.append(copy)
        _check_shapes(copies)
        images = keras.Input(shape=tuple(copies[0].input_shape[1:]), name="images")
        outputs = LogMeanSoftmax(name="log_mean_softmax")([copy(images) for copy in copies])
        super().__init__(inputs=images, outputs=outputs, name=name, **kwargs)
        self.members = copies

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "members": [export.model_record(copy) for copy in self.members]}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def feature_extractor(self, layer=export.DEFAULT_FEATURES, required=True):
        """``(model, metadata entry)``: the members' ``layer`` features side by side.

        The model maps the ensemble's input to ``[batch, sum of the members' D]``
        (member 0's features first), float32. When a member lacks the layer:
        ``ValueError`` if ``required``, else ``(None, None)`` (no ``features``
        signature).
        """
        found = [feature_layers.find_layer(copy, layer) for copy in self.members]
        if any(f is None for f in found):
            if not required:
                return None, None
            missing = [copy.name for copy, f in zip(self.members, found) if f is None]
            raise ValueError(f"The ensemble's members {missing} have no {layer} layer for the "
                             "features signature; pass features=None to export without one.")
        images = keras.Input(shape=tuple(self.input_shape[1:]), name="images")
        parts = [feature_layers.feature_extractor(copy, layer)(images) for copy in self.members]
        joined = keras.layers.Concatenate(name=f"{layer}_members", dtype="float32")(parts)
        extractor = keras.Model(images, joined, name=f"{self.name}_{layer}")
        dims = [int(part.shape[-1]) for part in parts]
        return extractor, {
            "layer": layer,
            "keras_layer": [f"{copy.name}/{f.name}" for copy, f in zip(self.members, found)],
            "dim": int(sum(dims)),
            "member_dims": dims,
            "combined": "concatenation of the members' features, member_0 first",
        }


def _check_shapes(models, labels=None):
    labels = labels or [f"member {i}" for i in range(len(models))]
    size = tuple(models[0].input_shape[1:])
    outputs = int(models[0].output_shape[-1])
    for model, label in zip(models[1:], labels[1:]):
        if tuple(model.input_shape[1:]) != size:
            raise ValueError(f"{label} takes inputs of shape {tuple(model.input_shape[1:])}, "
                             f"{labels[0]} {size}: the members must share the image size.")
        if int(model.output_shape[-1]) != outputs:
            raise ValueError(f"{label} has {int(model.output_shape[-1])} classes, {labels[0]} "
                             f"{outputs}: the members must classify the same classes.")


def ensemble_model(members, name="ensemble"):
    """An `Ensemble` of Keras ``members`` (copies; the originals are left untouched)."""
    return Ensemble(list(members), name=name)


@dataclasses.dataclass
class Member:
    """A member model with the preprocessing and classes it was trained with.

    The attributes are those of ``keras_alexnet.training.model_source.LoadedModel``,
    which can be passed instead. ``mean`` is what `preprocessing.resolve_mean` takes;
    ``weights``: an optional JSON description (e.g. a converted export's ``weights``).
    """

    model: Any
    class_names: Optional[list] = None
    mean: Any = "imagenet"
    resize: Optional[int] = None
    path: Optional[Any] = None
    weights: Optional[dict] = None


def _label(member, index):
    return f"member {index} ({member.path})" if member.path is not None else f"member {index}"


def check_members(members, class_names=None):
    """``(image_size, class_names, mean, resize_side)`` the ``members`` share.

    ``members``: `Member` or ``LoadedModel`` objects. ``class_names`` stands in for the
    members that record none (training runs, ``.keras`` files) and must equal those that
    do.

    Raises:
        ValueError: for fewer than 2 members, or the first member that differs from
            member 0 in image size, number of classes, class names, mean or resize side
            (or records no class names when none are given).
    """
    members = list(members)
    if len(members) < 2:
        raise ValueError(f"An ensemble needs at least 2 members; got {len(members)}.")
    labels = [_label(m, i) for i, m in enumerate(members)]
    _check_shapes([m.model for m in members], labels)
    size = int(members[0].model.input_shape[1])
    given = None if class_names is None else [str(c) for c in class_names]
    names, means, sides = [], [], []
    for member, label in zip(members, labels):
        own = None if member.class_names is None else [str(c) for c in member.class_names]
        if own is not None and given is not None and own != given:
            raise ValueError(f"{label} names its classes {_short(own)}, not the given "
                             f"{_short(given)}.")
        if own is None and given is None:
            raise ValueError(f"{label} records no class names (a training run or a .keras "
                             "file); pass the class names (--labels).")
        names.append(own if own is not None else given)
        mean = member.mean
        if isinstance(mean, str) and mean == "image":
            raise ValueError(f"{label} was trained with its dataset's per-pixel mean image; "
                             "export it (the export records the mean image) and use the export.")
        try:
            means.append(preprocessing.resolve_mean(mean, size, member.resize))
            sides.append(preprocessing.resize_size(size, member.resize))
        except (ValueError, OSError) as error:
            raise ValueError(f"{label}: {error}") from None
    for index in range(1, len(members)):
        if names[index] != names[0]:
            raise ValueError(f"{labels[index]} names its classes {_short(names[index])}, "
                             f"{labels[0]} {_short(names[0])}: the members must agree.")
        if means[index].shape != means[0].shape or not np.array_equal(means[index], means[0]):
            raise ValueError(f"{labels[index]} subtracts the mean {_mean_text(means[index])}, "
                             f"{labels[0]} {_mean_text(means[0])}: the members must share "
                             "their preprocessing.")
        if sides[index] != sides[0]:
            raise ValueError(f"{labels[index]} crops from a {sides[index]}-pixel square, "
                             f"{labels[0]} from {sides[0]}: the members must share their "
                             "preprocessing (resize).")
    return size, names[0], means[0], sides[0]


def _short(names):
    return repr(names) if len(names) <= 6 else f"[{names[0]!r}, {names[1]!r}, ... ({len(names)})]"


def _mean_text(mean):
    return np.round(mean, 3).tolist() if mean.size == 3 else f"a per-pixel mean image {mean.shape}"


def export_ensemble(members, base_dir, *, class_names=None, version=None, ten_crop=False,
                    features=export.DEFAULT_FEATURES, name="ensemble"):
    """Exports the members' averaged softmax as SavedModel version ``<base_dir>/<N>/``.

    Args:
        members: two or more `Member` (or ``LoadedModel``) objects; see `check_members`.
        base_dir: the ensemble's base path; a new version is added (or ``version``).
        class_names: the class names, for members that record none.
        version: explicit version number.
        ten_crop: average over each image's 10 crops in the encoded-image signatures.
        features: the members' layer whose concatenation is the ``features`` signature.
        name: the Keras model's name.

    Returns:
        The new version directory. Its metadata adds ``ensemble``: the members (path,
        weights description, Keras class), the averaging and the ``ten_crop`` flag.

    Raises:
        ValueError: when the members disagree (see `check_members`) or the export
            refuses (an existing version); nothing is written then.
    """
    members = list(members)
    size, names, mean, side = check_members(members, class_names)
    target = pathlib.Path(base_dir) / str(version) if version is not None else None
    if target is not None and target.exists():  # before the copies are built
        raise ValueError(f"Version {version} already exists at {target}; export a new version.")
    model = ensemble_model([m.model for m in members], name=name)
    record = {
        "members": [{
            "keras_name": copy.name,
            "path": None if m.path is None else str(m.path),
            "class_name": type(m.model).__name__,
            # A LoadedModel (the other accepted member type) records no weights.
            "weights": getattr(m, "weights", None),
        } for m, copy in zip(members, model.members)],
        "averaging": AVERAGING,
        "ten_crop": bool(ten_crop),
    }
    return export.export_saved_model(model, base_dir, names, version=version, mean=mean,
                                     resize=side, metadata={"ensemble": record},
                                     features=features, ten_crop=bool(ten_crop))
