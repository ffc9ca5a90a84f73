"""Evaluate an AlexNet run, checkpoint or SavedModel: top-1/top-5 error, centre crop and
10 crops.

    alexnet-evaluate runs/paper-imagenet2012                    # its newest checkpoint
    alexnet-evaluate runs/paper-imagenet2012/checkpoints/ckpt-900810
    alexnet-evaluate models/alexnet/3 --dataset folder:~/pets --val-split 0.1

Prints the errors as in the paper's tables (Sec. 6) and writes per-class accuracies to a
CSV file. The model is a training run directory (its newest committed checkpoint), one
of its checkpoints (``<run>/checkpoints/ckpt-<step>``, as training names them), an
exported SavedModel version directory (its ``serving_pixels`` signature; a base
directory picks its newest version) or a ``.keras`` file. For a run or checkpoint the
dataset and the mean come from the run's ``config.json``; for a SavedModel the mean
comes from its export metadata. ``--dataset`` and ``--mean`` override them.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys

from training import HelpFormatter, fail

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Top-1/top-5 error of an AlexNet checkpoint or SavedModel, for a centre "
                    "crop and for 10 crops (4 corners + centre, mirrored; softmax averaged).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", help="a training run directory (newest checkpoint), one of "
                                      "its checkpoints/ckpt-N, a SavedModel version directory "
                                      "(or its base directory: newest version) or a .keras file")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset",
                      help="alexnet_shapes, alexnet_shapes/tiny, imagenet2012 or folder:PATH "
                           "(default: the run's dataset, for a checkpoint)")
    data.add_argument("--data-dir", help="TFDS data directory (default ~/tensorflow_datasets)")
    data.add_argument("--manual-dir", help="folder holding the ILSVRC2012 archives (imagenet2012)")
    data.add_argument("--val-split", type=float,
                      help="held-out fraction, for folder datasets without val/")
    data.add_argument("--split", choices=("validation", "train"), default="validation",
                      help="which split to evaluate")
    data.add_argument("--mean", help="'imagenet', 'image' (the per-pixel mean image of the "
                                     "training set, cached), 'R,G,B' or a .npy file "
                                     "(default: what the model was trained with)")
    data.add_argument("--limit", type=int, help="evaluate only the first N images")
    data.add_argument("--batch-size", type=int, default=16, help="images per step (x10 crops)")
    parser.add_argument("--csv", default="per_class_accuracy.csv",
                        help="where to write per-class accuracies")
    parser.add_argument("--json", help="also write the summary as JSON here")
    return parser


def _newest_version(path):
    from keras_alexnet.training import model_source

    try:
        return model_source.newest_version(path)
    except FileNotFoundError as error:
        fail(error)


def _run_and_checkpoint(path):
    """``(RunDirectory, checkpoint name)`` for a run directory or one of its checkpoints;
    else ``None`` (`model_source.run_and_checkpoint`)."""
    from keras_alexnet.training import model_source

    try:
        return model_source.run_and_checkpoint(path)
    except FileNotFoundError as error:
        fail(error)


def load_model(path):
    """``(predict_fn_factory, image_size, default_mean, run_config, resize)`` for a model
    path; ``resize`` is the side of the square its crops are cut from (``None``: the
    paper's ratio), from the run's config or the export's metadata."""
    import keras
    import tensorflow as tf

    from keras_alexnet.training import evaluation, model_source

    path = pathlib.Path(path).expanduser()
    found = _run_and_checkpoint(path)
    if found is not None:
        run, name = found
        try:
            model = run.load_model(name)
        except (FileNotFoundError, ValueError) as error:
            fail(error)
        config = dataclasses.asdict(run.read_config())
        num_outputs = int(model.output_shape[-1])
        return (lambda num_classes: (evaluation.keras_predictor(model), num_outputs),
                int(model.input_shape[1]), config.get("mean", "imagenet"), config,
                config.get("resize"))
    if path.is_file():
        model_source.register_classes()
        model = keras.saving.load_model(path)
        num_outputs = int(model.output_shape[-1])
        return (lambda num_classes: (evaluation.keras_predictor(model), num_outputs),
                int(model.input_shape[1]), "imagenet", {}, None)
    version = _newest_version(path)
    loaded = tf.saved_model.load(str(version))
    meta = evaluation.saved_model_metadata(version)
    mean = meta.get("mean", "imagenet")
    if mean == "per-pixel":
        npy = version / "assets.extra" / "mean.npy"
        mean = str(npy) if npy.is_file() else None
    num_outputs = len(meta["class_names"]) if "class_names" in meta else None
    return (lambda num_classes: (evaluation.saved_model_predictor(loaded, num_classes),
                                 num_outputs or num_classes),
            evaluation.saved_model_input_size(loaded), mean, {}, meta.get("resize_size"))


def main(argv=None):
    """Runs the evaluation; returns the summary dict (errors are fractions)."""
    args = build_parser().parse_args(argv)

    from keras_alexnet import datasets, preprocessing
    from keras_alexnet.training import evaluation, probe

    make_predictor, image_size, model_mean, run_config, resize = load_model(args.model)
    dataset = args.dataset or run_config.get("dataset")
    if not dataset:
        fail("pass --dataset (the model's training run is not known)")
    data_dir = args.data_dir or run_config.get("data_dir")
    source = datasets.load(dataset, data_dir=data_dir,
                           manual_dir=args.manual_dir or run_config.get("manual_dir"),
                           val_split=args.val_split or run_config.get("val_split"))
    predict, num_outputs = make_predictor(source.num_classes)
    if num_outputs != source.num_classes:
        fail(f"the model has {num_outputs} outputs but {dataset} has "
                         f"{source.num_classes} classes")

    try:
        mean = probe.parse_mean(args.mean) if args.mean else model_mean
    except ValueError as error:
        fail(error)
    if mean is None:
        fail("the SavedModel was exported with a per-pixel mean image that it "
                         "does not carry; pass it with --mean (a .npy file, or 'image')")
    if mean == "image":
        from keras_alexnet.training import mean_image

        mean = mean_image.compute_or_load(source, data_dir, image_size)
    mean = preprocessing.resolve_mean(mean, image_size, resize)

    split = source.validation if args.split == "validation" else source.train
    total = source.num_validation if args.split == "validation" else source.num_train
    if args.limit:
        total = min(total, args.limit)
    print(f"Evaluating {args.model} on {dataset} ({args.split}, {total} images, "
          f"{image_size}x{image_size} crops)")
    result = evaluation.evaluate(predict, split, source.num_classes, image_size=image_size,
                                 mean=mean, batch_size=args.batch_size, limit=args.limit,
                                 log_every=10_000, resize=resize)
    print(result.table())
    csv_path = evaluation.write_per_class_csv(result, args.csv, source.class_names,
                                              source.display_names)
    print(f"Per-class accuracy written to {csv_path}")
    summary = result.summary()
    if args.json:
        from keras_alexnet import files

        files.atomic_write(pathlib.Path(args.json).expanduser(), json.dumps(summary, indent=1))
    return summary


def cli():
    """The ``alexnet-evaluate`` command: `main`, with an exit status instead of the summary."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
