"""Pictures of a model or a run as PNG files: filters, curves, predictions, neighbours,
confusion.

    alexnet-plot filters runs/paper-imagenet2012             # -> the run's filters.png
    alexnet-plot filters models/alexnet/3 --out conv1.png
    alexnet-plot curves runs/paper-imagenet2012              # -> the run's curves.png
    alexnet-plot predictions models/alexnet ~/photos cat.jpg --out predictions.png --max 8
    alexnet-plot neighbours runs/demo --dataset alexnet_shapes --queries 5 --k 6
    alexnet-plot confusion runs/demo --out confusion.png     # the run's validation split

MODEL is a training run directory (its newest checkpoint), one of its checkpoints
(``<run>/checkpoints/ckpt-N``), an exported SavedModel version directory (or its base
directory: the newest version; the weight converters' exports too) or a ``.keras`` file.

* ``filters``: the conv1 kernels, one block per tower (the paper's Figure 3).
* ``curves``: loss, top-1/top-5 error and learning rate per epoch from ``history.csv``,
  and the batch loss TensorBoard logged.
* ``predictions``: images (files, or folders of them) with their five most probable
  labels (Figure 4, left); class names from the export or the run's dataset.
* ``neighbours``: validation images and the training images nearest to them in fc7
  space (Figure 4, right).
* ``confusion``: the row-normalised confusion matrix of the validation split.

Images are preprocessed as the model expects (its crop size, mean and resize side, with
`keras_alexnet.preprocessing`) and shown as the crop the model sees. ``--out`` defaults
to ``<command>.png`` in the current directory, or for ``filters`` and ``curves`` of a run
directory to that run's own file. Files are written atomically, and only once everything
was computed: a bad input (``error: ...``, exit status 2) leaves no file behind.
"""

import argparse
import os
import pathlib
import re
import sys

from training import HelpFormatter, fail

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODEL_HELP = ("a training run directory (newest checkpoint), one of its checkpoints/ckpt-N, a "
              "SavedModel version directory (or its base directory: newest version) or a "
              ".keras file")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Pictures of an AlexNet or its training run, as PNG files.",
        formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text):
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  formatter_class=HelpFormatter)
        sub.add_argument("--out", help=f"the PNG file to write (default: {name}.png here"
                         + (", or the run directory's own" if name in ("filters", "curves")
                            else "") + ")")
        return sub

    def model_and_data(sub, dataset_required):
        sub.add_argument("model", help=MODEL_HELP)
        sub.add_argument("--dataset", required=dataset_required,
                         help="alexnet_shapes, alexnet_shapes/tiny, imagenet2012 or folder:PATH"
                              " (default: the run's dataset, for a run or checkpoint)")
        sub.add_argument("--data-dir", help="TFDS data directory (default: the run's, or TFDS')")
        sub.add_argument("--manual-dir", help="the ILSVRC2012 archives (imagenet2012)")
        sub.add_argument("--val-split", type=float,
                         help="held-out fraction, for folder datasets without val/")
        sub.add_argument("--mean", help="'imagenet', 'image', 'R,G,B' or a .npy file "
                                        "(default: what the model was trained with)")
        sub.add_argument("--batch-size", type=int, default=32, help="images per forward pass")

    sub = command("filters", "the conv1 kernels, one block per tower (the paper's Figure 3)")
    sub.add_argument("model", help=MODEL_HELP)
    sub = command("curves", "loss, top-1/top-5 error, learning rate and batch loss of a run")
    sub.add_argument("run_dir", help="a training run directory (with its history.csv)")
    sub = command("predictions", "images with their five most probable labels")
    sub.add_argument("model", help=MODEL_HELP)
    sub.add_argument("images", nargs="+", help="image files, or folders of them (one "
                                               "sub-folder per class, or images directly)")
    sub.add_argument("--max", type=int, default=16, help="at most this many images")
    sub.add_argument("--mean", help="'imagenet', 'image', 'R,G,B' or a .npy file "
                                    "(default: what the model was trained with)")
    sub.add_argument("--data-dir", help="the training data of a per-pixel mean and the run's "
                                        "dataset (class names)")
    sub = command("neighbours", "validation images and their nearest training images in fc7 "
                                "space (Figure 4, right)")
    model_and_data(sub, dataset_required=False)
    sub.add_argument("--queries", type=int, default=5, help="validation images (rows)")
    sub.add_argument("--k", type=int, default=6, help="neighbours per query")
    sub.add_argument("--train-limit", type=int,
                     help="search only the first N training images (default: all)")
    sub = command("confusion", "the confusion matrix of the validation split")
    model_and_data(sub, dataset_required=False)
    sub.add_argument("--limit", type=int, help="only the first N validation images")
    return parser


def _tf_message(error):
    """The first line of a TensorFlow error's message, without its op annotations."""
    text = str(getattr(error, "message", None) or error).splitlines()[0]
    text = re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$", "", text)
    return text.strip()[:200]


def _check_out(out):
    out = pathlib.Path(out).expanduser()
    if out.is_dir():
        fail(f"--out {out} is a folder; name the .png file to write")
    return out


def _write(out, data):
    from keras_alexnet import files, plots

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(out, data)
    except OSError as error:
        fail(f"cannot write {out}: {error}")
    width, height = plots.png_size(data)
    print(f"Wrote {out} ({width}x{height})")
    return {"out": str(out), "size": (width, height)}


def _load_model(path):
    import zipfile

    from keras_alexnet.training import model_source

    try:
        return model_source.load_keras(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        fail(str(error).splitlines()[0] if str(error) else f"{path} is not a model")


def _is_run_dir(path):
    return (pathlib.Path(path).expanduser() / "config.json").is_file()


def _mean(loaded, override, data_dir):
    from keras_alexnet.training import probe

    try:
        return probe.model_mean(loaded, override, data_dir)
    except (OSError, ValueError) as error:
        fail(error)


def _crop_for_display(image, loaded):
    """The crop the model sees, before the mean is subtracted, as ``uint8``."""
    import numpy as np

    from keras_alexnet import preprocessing

    crop = preprocessing.eval_from_image(image, loaded.image_size, np.zeros(3, np.float32),
                                         loaded.resize)
    return np.clip(np.rint(crop.numpy()), 0, 255).astype(np.uint8)


def _dataset(args, loaded):
    """The dataset ``--dataset`` names, or the run's; ``(source, data_dir)``."""
    from keras_alexnet import datasets

    config = loaded.run_config or {}
    name = args.dataset or config.get("dataset")
    if not name:
        fail("pass --dataset (the model's training run is not known)")
    data_dir = args.data_dir or (config.get("data_dir") if not args.dataset else None)
    try:
        source = datasets.load(name, data_dir=data_dir,
                               manual_dir=args.manual_dir or config.get("manual_dir"),
                               val_split=args.val_split or config.get("val_split"))
    except (OSError, ValueError) as error:
        fail(error)
    return source, data_dir


def _class_names(loaded, num_outputs, data_dir):
    """The model's labels: from its export, else its run's dataset, else ``class N``."""
    if loaded.class_names and len(loaded.class_names) == num_outputs:
        return list(loaded.class_names)
    config = loaded.run_config or {}
    if config.get("dataset"):
        from keras_alexnet import datasets

        try:
            source = datasets.load(config["dataset"], data_dir=data_dir or config.get("data_dir"),
                                   manual_dir=config.get("manual_dir"),
                                   val_split=config.get("val_split"))
            if source.num_classes == num_outputs:
                return list(source.display_names)
        except (OSError, ValueError) as error:
            print(f"Note: the class names of {config['dataset']} are not available "
                  f"({error}); labels are class numbers.", file=sys.stderr)
    return [f"class {i}" for i in range(num_outputs)]


# Commands -----------------------------------------------------------------------------

def plot_filters(args):
    from keras_alexnet import plots

    out = _check_out(args.out or (pathlib.Path(args.model) / "filters.png"
                                  if _is_run_dir(args.model) else "filters.png"))
    loaded = _load_model(args.model)
    try:
        figure = plots.filter_grid(loaded.model)
    except ValueError as error:
        fail(error)
    return _write(out, plots.to_png(figure))


def plot_curves(args):
    from keras_alexnet import plots
    from keras_alexnet.training import pictures
    from keras_alexnet.training.run_dir import RunDirectory

    path = pathlib.Path(args.run_dir).expanduser()
    if not path.is_dir():
        fail(f"{path} is not a training run directory (no such folder)")
    run = RunDirectory(path)
    if not run.history_path.is_file():
        fail(f"{path} has no history.csv: it is not a training run, or no epoch has "
              "finished yet")
    out = _check_out(args.out or run.path / "curves.png")
    try:
        rows = run.read_history()
    except (OSError, ValueError, KeyError, TypeError) as error:
        fail(f"{run.history_path} cannot be read ({error})")
    if not rows:
        fail(f"{run.history_path} holds no epoch yet")
    try:
        steps = pictures.read_scalars(run.log_dir / "train", "batch_loss")
    except Exception as error:  # an optional panel: the epochs' curves do without it
        print(f"Note: the batch loss of {run.log_dir / 'train'} cannot be read "
              f"({type(error).__name__}: {error}); curves without it.", file=sys.stderr)
        steps = None
    try:
        figure = plots.training_curves(rows, steps, pictures.CURVES_SIZE)
    except (ValueError, KeyError) as error:
        fail(f"{run.history_path}: {error}")
    return _write(out, plots.to_png(figure))


def _image_files(arguments, limit):
    """``(paths, skipped)``: the files given and the images of the folders given, in
    order, at most ``limit``."""
    from keras_alexnet import features

    paths = []
    for argument in arguments:
        path = pathlib.Path(argument).expanduser()
        if path.is_dir():
            try:
                found, _, _ = features.list_images(path)
            except ValueError as error:
                fail(error)
            paths.extend((p, False) for p in found)
        elif path.is_file():
            paths.append((str(path), True))
        else:
            fail(f"{path} does not exist")
    return paths[:limit] if limit else paths


def plot_predictions(args):
    import numpy as np
    import tensorflow as tf

    from keras_alexnet import plots, preprocessing

    if args.max < 1:
        fail("--max must be at least 1")
    out = _check_out(args.out or "predictions.png")
    candidates = _image_files(args.images, None)
    loaded = _load_model(args.model)
    mean = _mean(loaded, args.mean, args.data_dir)
    images, pixels, names, skipped = [], [], [], []
    for path, named in candidates:
        if len(images) == args.max:
            break
        try:
            image = preprocessing.decode_image(tf.io.read_file(path))
        except (tf.errors.OpError, OSError) as error:
            if named:  # a file the user named must be an image
                fail(f"{path} cannot be read or decoded as an image ({_tf_message(error)})")
            skipped.append(path)
            continue
        images.append(_crop_for_display(image, loaded))
        pixels.append(preprocessing.eval_from_image(image, loaded.image_size, mean,
                                                    loaded.resize))
        names.append(os.path.basename(path))
    if skipped:
        print(f"Skipped {len(skipped)} file(s) that could not be decoded: "
              + ", ".join(skipped[:10]), file=sys.stderr)
    if not images:
        fail("none of the images could be decoded")
    logits = loaded.model.predict(tf.stack(pixels), batch_size=16, verbose=0)
    probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1).numpy()
    num_outputs = probabilities.shape[-1]
    class_names = _class_names(loaded, num_outputs, args.data_dir)
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :min(5, num_outputs)]
    labels = [[class_names[c] for c in row] for row in top]
    probs = [probabilities[i, row] for i, row in enumerate(top)]
    figure = plots.prediction_grid(images, labels, probs, titles=names)
    return _write(out, plots.to_png(figure))


def _evaluation_pixels(dataset, loaded, mean):
    from keras_alexnet import preprocessing

    return dataset.map(lambda data, label: (preprocessing.eval_from_bytes(
        data, loaded.image_size, mean, loaded.resize), label))


def _crops_at(dataset, indices, loaded):
    """``{index: uint8 crop}`` of the elements ``indices`` of ``dataset``."""
    from keras_alexnet import preprocessing

    crops = {}
    for i, (data, _) in _elements_at(dataset, indices, keep_index=True):
        crops[int(i)] = _crop_for_display(preprocessing.decode_image(data), loaded)
    return crops


def _elements_at(dataset, indices, keep_index=False):
    """The elements ``indices`` of ``dataset``, in its order (``(index, element)`` pairs
    with ``keep_index``)."""
    import tensorflow as tf

    wanted = tf.constant(sorted({int(i) for i in indices}), tf.int64)

    def selected(index, element):
        return tf.reduce_any(tf.equal(index, wanted))

    def element_only(index, element):
        return element

    found = dataset.enumerate().filter(selected)
    return found if keep_index else found.map(element_only)


def plot_neighbours(args):
    import numpy as np

    from keras_alexnet import features, plots

    if args.queries < 1 or args.k < 1 or args.batch_size < 1:
        fail("--queries, --k and --batch-size must be at least 1")
    if args.train_limit is not None and args.train_limit < args.k:
        fail(f"--train-limit must be at least --k ({args.k})")
    out = _check_out(args.out or "neighbours.png")
    loaded = _load_model(args.model)
    if features.find_layer(loaded.model, "fc7") is None:
        fail(f"the model {args.model} has no fc7 layer (it is not an AlexNet of this package)")
    source, data_dir = _dataset(args, loaded)
    mean = _mean(loaded, args.mean, data_dir)
    count = min(args.queries, source.num_validation)
    # Queries spread over the validation split (it may be ordered by class).
    query_index = np.unique(np.rint(np.linspace(0, source.num_validation - 1, count))
                            .astype(np.int64))
    train = source.train if args.train_limit is None else source.train.take(args.train_limit)
    print(f"fc7 features of the training split of {source.name} "
          f"({args.train_limit or source.num_train} images) and {len(query_index)} queries")
    queries = _elements_at(source.validation, query_index)
    train_features, train_labels = features.extract(
        loaded.model, train, "fc7", loaded.image_size, mean, loaded.resize, args.batch_size)
    query_features, query_labels = features.extract(
        loaded.model, queries, "fc7", loaded.image_size, mean, loaded.resize, args.batch_size)
    if len(train_features) < args.k:
        fail(f"the training split has {len(train_features)} images, fewer than --k {args.k}")
    rows = plots.nearest(query_features, train_features, args.k)
    query_crops = _crops_at(source.validation, query_index, loaded)
    train_crops = _crops_at(train, rows.reshape(-1), loaded)
    names = source.display_names
    figure = plots.neighbour_grid(
        [query_crops[i] for i in query_index],
        [[train_crops[j] for j in row] for row in rows],
        query_titles=[names[y] for y in query_labels],
        neighbour_titles=[[names[train_labels[j]] for j in row] for row in rows])
    return _write(out, plots.to_png(figure))


def plot_confusion(args):
    import numpy as np
    import tensorflow as tf

    from keras_alexnet import plots

    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        fail("--batch-size and --limit must be at least 1")
    out = _check_out(args.out or "confusion.png")
    loaded = _load_model(args.model)
    source, data_dir = _dataset(args, loaded)
    num_outputs = int(loaded.model.output_shape[-1])
    if num_outputs != source.num_classes:
        fail(f"the model has {num_outputs} outputs but {source.name} has "
              f"{source.num_classes} classes")
    mean = _mean(loaded, args.mean, data_dir)
    validation = source.validation if args.limit is None else source.validation.take(args.limit)
    model = loaded.model

    @tf.function(reduce_retracing=True)
    def predict(pixels):
        return tf.argmax(model(pixels, training=False), axis=-1)

    labels, predictions = [np.zeros([0], np.int64)], [np.zeros([0], np.int64)]
    for pixels, y in _evaluation_pixels(validation, loaded, mean).batch(args.batch_size):
        predictions.append(predict(pixels).numpy().astype(np.int64))
        labels.append(y.numpy().astype(np.int64))
    labels, predictions = np.concatenate(labels), np.concatenate(predictions)
    if labels.size == 0:
        fail(f"the validation split of {source.name} is empty")
    figure = plots.confusion_matrix_figure(labels, predictions, source.display_names)
    return _write(out, plots.to_png(figure))


COMMANDS = {"filters": plot_filters, "curves": plot_curves, "predictions": plot_predictions,
            "neighbours": plot_neighbours, "confusion": plot_confusion}


def main(argv=None):
    """Draws the picture the command names and writes it; returns ``{"out", "size"}``.

    Bad input prints ``error: ...`` on stderr and exits with status 2, writing nothing.
    """
    args = build_parser().parse_args(argv)
    # A path that is not there is refused at once, before TensorFlow is imported.
    given = getattr(args, "model", None) or args.__dict__.get("run_dir")
    path = pathlib.Path(given).expanduser()
    if not (path.exists() or path.with_name(path.name + ".index").is_file()):  # or ckpt-N
        fail(f"{given} does not exist")
    return COMMANDS[args.command](args)


def cli():
    """The ``alexnet-plot`` command: `main`, with an exit status instead of the summary."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
