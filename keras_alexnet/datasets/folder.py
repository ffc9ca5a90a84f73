"""Folders of images, one sub-folder per class: ``--dataset folder:PATH``.

Two layouts:

* ``PATH/train/<class>/...`` and ``PATH/val/<class>/...`` (``validation/`` also works);
* ``PATH/<class>/...`` (or only ``PATH/train/<class>/...``) with ``val_split``, the
  fraction of every class held out for validation, chosen by a seeded shuffle.

Class names are the folder names, sorted; labels are their indices. Images may sit in
nested folders below a class folder. Accepted: ``.jpg .jpeg .png .gif .bmp`` in any
letter case, names with spaces. Every listed file is decoded once, in parallel, with
the same decoder training uses (`preprocessing.decode_image`: grayscale, CMYK, RGBA and
PNG bytes under a ``.JPEG`` name all become RGB); files that fail (and files that cannot
be read: dangling symlinks, no read permission) are left out and reported in one
warning with their count and a few names. The result of that check is cached (keyed by
the paths, sizes, modification times, modes and readability), so later runs start at
once and a file that becomes readable is checked again. Only file paths are held in
memory; images are read from disk as they are used.
"""

import hashlib
import json
import os
import pathlib
import sys
import warnings

import numpy as np
import tensorflow as tf

from keras_alexnet import files as safe_files

EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
VAL_FOLDERS = ("val", "validation")
PREFIX = "folder:"
SHOWN_NAMES = 5
# The held-out split does not follow the training seed: the same files are held out
# whatever --seed a run uses, so runs with different seeds are evaluated alike.
SPLIT_SEED = 0
# Warnings point at the first caller outside this package (the user's code).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UndecodableImagesWarning(UserWarning):
    """Some files in an image folder could not be decoded and were left out."""


def _is_image(name):
    return not name.startswith(".") and name.lower().endswith(EXTENSIONS)


def list_class_folder(root):
    """``(class_names, {class_name: [paths]})`` of the image files under ``root/<class>/``."""
    root = pathlib.Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {}
    for name in classes:
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
        files[name] = found
    return classes, files


def _fingerprint(paths):
    """A key that changes when any file changes: its size, modification time, mode and
    whether this process can read it (a dangling symlink, a file this user may not read,
    or one fixed since, with `os.chmod` or a new link target, gets a new key)."""
    digest = hashlib.sha1()
    for path in paths:
        try:
            st = os.stat(path)
            entry = f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_mode:o}\0{os.access(path, os.R_OK)}"
        except OSError as error:  # dangling symlink, unreadable directory, ...
            entry = f"unreadable {error.errno}"
        digest.update(f"{path}\0{entry}\n".encode())
    return digest.hexdigest()[:16]


def _unreadable(paths):
    """The subset of ``paths`` this process cannot open for reading."""
    bad = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError:
            bad.append(path)
    return bad


def find_undecodable(paths):
    """The subset of ``paths`` that `preprocessing.decode_image` cannot decode.

    Decodes all of them in parallel with tf.data; elements whose decode raises are
    dropped by ``ignore_errors`` and the missing indices are the answer.
    """
    from keras_alexnet import preprocessing

    if not paths:
        return []
    unreadable = set(_unreadable(paths))  # read errors would not all be "ignored" errors
    readable = [p for p in paths if p not in unreadable]
    if not readable:
        return list(paths)
    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(readable)), readable))

    def decode(index, path):
        image = preprocessing.decode_image(tf.io.read_file(path))
        tf.debugging.assert_positive(tf.size(image), message="empty image")
        return index

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.ignore_errors().batch(1024)
    good = np.zeros(len(readable), bool)
    for indices in ds.as_numpy_iterator():
        good[indices] = True
    bad = unreadable | {p for p, ok in zip(readable, good) if not ok}
    return [p for p in paths if p in bad]


def _cache_dir(data_dir):
    if data_dir:
        return pathlib.Path(data_dir).expanduser() / "keras_alexnet"
    import tensorflow_datasets as tfds

    return pathlib.Path(str(tfds.core.constants.DATA_DIR)).expanduser() / "keras_alexnet"


def checked_files(paths, data_dir=None):
    """``(good_paths, bad_paths)``; the decode check is cached under ``data_dir``."""
    key = _fingerprint(paths)
    cache = _cache_dir(data_dir) / "folder-checks" / f"{key}.json"
    bad = None
    if cache.is_file():
        try:
            bad = json.loads(cache.read_text())["undecodable"]
        except (OSError, ValueError, KeyError):
            bad = None
    if bad is None:
        bad = find_undecodable(paths)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            safe_files.remove_stale_temporaries(cache.parent)  # left by killed runs
            safe_files.atomic_write(cache, json.dumps({"files": len(paths), "undecodable": bad}))
        except OSError:
            pass  # a read-only cache location only costs a re-check next time
    bad_set = set(bad)
    return [p for p in paths if p not in bad_set], bad


def _outside_stacklevel():
    """The ``stacklevel`` for a `warnings.warn` in the caller of this function that names
    the first frame outside the keras_alexnet package (Python 3.11's `warnings.warn` has
    no ``skip_file_prefixes``)."""
    frame, level = sys._getframe(1), 1  # the frame that calls warnings.warn: level 1
    while frame.f_back is not None and _in_package(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _in_package(filename):
    return os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep)


def _warn_undecodable(bad, root):
    if not bad:
        return
    shown = ", ".join(repr(os.path.relpath(p, root)) for p in bad[:SHOWN_NAMES])
    more = f" and {len(bad) - SHOWN_NAMES} more" if len(bad) > SHOWN_NAMES else ""
    warnings.warn(
        f"Skipped {len(bad)} file(s) under {root} that could not be read or decoded as "
        f"JPEG, PNG, GIF or BMP images (unreadable, dangling symlinks, corrupt): "
        f"{shown}{more}.",
        UndecodableImagesWarning,
        stacklevel=_outside_stacklevel(),
    )


def _split_held_out(files, fraction, seed):
    """Per class, a seeded shuffle; the first ``round(n * fraction)`` (at least 1) go to val."""
    train, val = {}, {}
    rng = np.random.default_rng(seed)
    for name, paths in files.items():
        order = rng.permutation(len(paths))
        count = int(round(len(paths) * fraction))
        if len(paths) >= 2:
            count = min(max(count, 1), len(paths) - 1)
        else:
            count = 0
        held = set(order[:count].tolist())
        val[name] = [p for i, p in enumerate(paths) if i in held]
        train[name] = [p for i, p in enumerate(paths) if i not in held]
    return train, val


def _pairs(files, classes):
    paths, labels = [], []
    for label, name in enumerate(classes):
        paths.extend(files.get(name, []))
        labels.extend([label] * len(files.get(name, [])))
    return paths, labels


def load_folder(spec, data_dir=None, val_split=None, seed=0, **_):
    """The `DatasetSource` of ``folder:PATH`` (see the module docstring).

    ``seed`` orders the training files of ``train``; ``shuffled_train(s)`` gives them in the
    order of seed ``s`` (training draws a full reshuffle for every epoch).

    Raises:
        ValueError: the folder is missing, has no class folders or images, a
            validation class is not a training class, or neither a ``val`` folder nor
            ``val_split`` is given (or both are).
    """
    from keras_alexnet.datasets.source import DatasetSource

    root = pathlib.Path(spec[len(PREFIX):] if spec.startswith(PREFIX) else spec).expanduser()
    if not root.is_dir():
        raise ValueError(f"No such folder of images. Received: dataset={spec!r}")
    train_root = root / "train" if (root / "train").is_dir() else root
    val_root = next((root / v for v in VAL_FOLDERS if (root / v).is_dir()), None)
    if val_root is not None and val_split:
        raise ValueError(
            f"{root} has a {val_root.name}/ folder; drop --val-split or the folder. "
            f"Received: val_split={val_split}"
        )
    if val_root is None and not val_split:
        raise ValueError(
            f"{root} has no val/ folder: pass the held-out fraction, e.g. --val-split 0.1, "
            f"or add {root / 'val'}/<class>/... Received: val_split={val_split}"
        )
    if val_split is not None and not 0 < val_split < 1:
        raise ValueError(f"`val_split` must be between 0 and 1. Received: val_split={val_split}")

    classes, train_files = list_class_folder(train_root)
    if not classes:
        raise ValueError(f"{train_root} holds no class folders (one sub-folder per class).")
    if val_root is not None:
        val_classes, val_files = list_class_folder(val_root)
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise ValueError(
                f"Classes in {val_root} that {train_root} does not have: {unknown[:SHOWN_NAMES]}"
            )
    else:
        train_files, val_files = _split_held_out(train_files, val_split, SPLIT_SEED)

    train_paths, train_labels = _pairs(train_files, classes)
    val_paths, val_labels = _pairs(val_files, classes)
    good, bad = checked_files(train_paths + val_paths, data_dir)
    _warn_undecodable(bad, root)
    good = set(good)
    train = [(p, y) for p, y in zip(train_paths, train_labels) if p in good]
    val = [(p, y) for p, y in zip(val_paths, val_labels) if p in good]
    if not train or not val:
        raise ValueError(
            f"{root} has {len(train)} decodable training and {len(val)} validation images; "
            "both need at least one."
        )

    def dataset(pairs, shuffle_seed=None):
        paths = tf.constant([p for p, _ in pairs])
        labels = tf.constant([y for _, y in pairs], tf.int64)
        ds = tf.data.Dataset.from_tensor_slices((paths, labels))
        if shuffle_seed is not None:
            # The list is in class order; a full shuffle of the paths (not the images)
            # keeps input_pipeline's bounded shuffle buffer from seeing one class at a time.
            # The same order for the same seed: training passes each epoch's own.
            ds = ds.shuffle(len(pairs), seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds.map(lambda p, y: (tf.io.read_file(p), y), num_parallel_calls=tf.data.AUTOTUNE)

    return DatasetSource(
        name=f"{PREFIX}{root}",
        train=dataset(train, seed),
        validation=dataset(val),
        shuffled_train=lambda order_seed: dataset(train, order_seed),
        class_names=classes,
        num_train=len(train),
        num_validation=len(val),
        fingerprint=_fingerprint([p for p, _ in train]),
        skipped=bad,
    )
