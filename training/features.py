"""Extract AlexNet features (fc7, fc6 or pool5) of a folder of images into an .npz file.

    alexnet-features models/alexnet ~/pets --layer fc7 --out pets-fc7.npz
    alexnet-features runs/demo-alexnet_shapes ~/photos --layer pool5 --out photos.npz

MODEL is a training run directory (its newest checkpoint), one of its checkpoints, an
exported SavedModel version (or base) directory or a ``.keras`` file; images are
preprocessed as the model expects (its crop size, mean and resize side; ``--mean``
overrides the mean). PATH holds one sub-folder of images per class (like a ``folder:``
dataset's ``train/``), or just images (labels -1). Files that cannot be decoded are
skipped with a warning that lists them.

The .npz (written atomically: a complete file or none) holds ``features`` (float32
``[N, D]``), ``labels`` (int64 ``[N]``), ``files`` (paths relative to PATH),
``class_names`` and ``layer``.
"""

import argparse
import io
import os
import pathlib
import sys
import warnings

from training import HelpFormatter, fail

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_alexnet.features import FEATURE_LAYERS


def build_parser():
    parser = argparse.ArgumentParser(
        description="Features of a folder of images at an AlexNet layer (DeCAF), as .npz.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", help="a training run directory (newest checkpoint), one of its "
                                      "checkpoints/ckpt-N, a SavedModel version directory (or its "
                                      "base directory: newest version) or a .keras file")
    parser.add_argument("path", help="a folder of images: one sub-folder per class, or images "
                                     "directly (labels -1)")
    parser.add_argument("--layer", choices=FEATURE_LAYERS, default="fc7",
                        help="fc7/fc6: the fully connected layers after ReLU; pool5: flattened")
    parser.add_argument("--out", default="features.npz", help="the .npz file to write")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--mean", help="'imagenet', 'image', 'R,G,B' or a .npy file "
                                       "(default: what the model was trained with)")
    parser.add_argument("--data-dir", help="where the image decode check is cached, and the "
                                           "training data of a per-pixel mean (default: TFDS')")
    return parser


class UndecodableImagesWarning(UserWarning):
    """Files of the folder that could not be decoded were skipped."""


def write_npz(path, **arrays):
    """Writes ``arrays`` as an .npz at ``path`` atomically (a temporary, then a rename)."""
    import numpy as np

    from keras_alexnet import files

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return files.atomic_write(path, buffer.getvalue())


def main(argv=None):
    """Extracts and writes the features; returns a summary dict."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        fail("--batch-size must be at least 1")
    out = pathlib.Path(args.out)
    if out.is_dir():
        fail(f"--out {out} is a folder; name the .npz file to write")

    import numpy as np
    import tensorflow as tf

    from keras_alexnet import features
    from keras_alexnet.datasets import folder
    from keras_alexnet.training import model_source, probe

    root = pathlib.Path(args.path).expanduser()
    try:
        paths, labels, class_names = features.list_images(root)
    except ValueError as error:
        fail(error)
    try:
        loaded = model_source.load_keras(args.model)
    except (FileNotFoundError, ValueError) as error:
        fail(error)
    if features.find_layer(loaded.model, args.layer) is None:
        fail(f"the model {args.model} has no {args.layer} layer (it is not an AlexNet of "
              "this package)")
    try:
        mean = probe.model_mean(loaded, args.mean, args.data_dir)
    except (ValueError, OSError) as error:
        fail(error)

    good, bad = folder.checked_files(paths, args.data_dir)
    if bad:
        shown = ", ".join(repr(os.path.relpath(p, root)) for p in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        warnings.warn(f"Skipped {len(bad)} file(s) under {root} that could not be read or "
                      f"decoded: {shown}{more}.", UndecodableImagesWarning, stacklevel=2)
    if not good:
        fail(f"none of the {len(paths)} images under {root} could be decoded")
    good_set = set(good)
    kept = [(p, y) for p, y in zip(paths, labels) if p in good_set]
    paths = [p for p, _ in kept]
    labels = np.asarray([y for _, y in kept], np.int64)

    dataset = tf.data.Dataset.from_tensor_slices((paths, labels)).map(
        lambda p, y: (tf.io.read_file(p), y), num_parallel_calls=tf.data.AUTOTUNE)
    print(f"Extracting {args.layer} features of {len(paths)} images under {root} "
          f"({loaded.image_size}x{loaded.image_size} crops)")
    values, extracted_labels = features.extract(
        loaded.model, dataset, args.layer, loaded.image_size, mean, loaded.resize,
        args.batch_size)
    relative = [pathlib.Path(os.path.relpath(p, root)).as_posix() for p in paths]
    write_npz(out, features=values, labels=extracted_labels, files=np.asarray(relative, str),
              class_names=np.asarray(class_names, str), layer=np.asarray(args.layer))
    print(f"Wrote {values.shape[0]} x {values.shape[1]} features to {out}")
    return {"out": str(out), "layer": args.layer, "count": int(values.shape[0]),
            "dim": int(values.shape[1]), "skipped": [os.path.relpath(p, root) for p in bad]}


def cli():
    """The ``alexnet-features`` command."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
