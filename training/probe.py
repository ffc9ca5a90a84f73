"""Linear probe: a linear classifier on frozen AlexNet features, scored on validation.

    alexnet-probe models/alexnet --dataset folder:~/pets --val-split 0.2 --layer fc7
    alexnet-probe runs/demo-alexnet_shapes --dataset folder:~/pets --classifier svm --C 0.1 \\
        --export models/pets-probe --json probe.json

Extracts the features of the training and validation splits at ``--layer``, standardises
them, fits multinomial logistic regression (or a linear SVM) and prints the validation
top-1 / top-5 error (classes ranked by the decision function; with fewer than 5 classes
top-5 covers them all). ``--export BASE`` writes a SavedModel version whose head is the
probe with the standardisation folded into its weights, on the frozen network, with
the dataset's class names and the model's preprocessing (see `keras_alexnet.training.probe`).
MODEL is what ``alexnet-features`` takes.
"""

import argparse
import json
import os
import pathlib
import sys

from training import HelpFormatter, fail

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_alexnet.features import FEATURE_LAYERS
from keras_alexnet.training.probe import CLASSIFIERS, DEFAULT_MAX_ITER


def build_parser():
    parser = argparse.ArgumentParser(
        description="Top-1/top-5 error of a linear classifier on frozen AlexNet features.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", help="a training run directory (newest checkpoint), one of its "
                                      "checkpoints/ckpt-N, a SavedModel version directory (or its "
                                      "base directory: newest version) or a .keras file")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True,
                      help="folder:PATH (or any dataset name alexnet-train takes)")
    data.add_argument("--val-split", type=float,
                      help="held-out fraction, for folder datasets without val/")
    data.add_argument("--data-dir",
                      help="TFDS data directory (caches; default ~/tensorflow_datasets)")
    data.add_argument("--manual-dir", help="folder holding the ILSVRC2012 archives (imagenet2012)")
    data.add_argument("--mean", help="'imagenet', 'image', 'R,G,B' or a .npy file "
                                     "(default: what the model was trained with)")
    data.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    probe = parser.add_argument_group("probe")
    probe.add_argument("--layer", choices=FEATURE_LAYERS, default="fc7", help="feature layer")
    probe.add_argument("--classifier", choices=CLASSIFIERS, default="logistic",
                       help="multinomial logistic regression (lbfgs) or one-vs-rest linear SVM")
    probe.add_argument("--C", type=float, default=1.0, help="inverse regularisation strength")
    probe.add_argument("--max-iter", type=int, default=DEFAULT_MAX_ITER,
                       help="solver iteration limit")
    parser.add_argument("--export", metavar="BASE",
                        help="export the probe on the frozen network as BASE/<N>/ (SavedModel)")
    parser.add_argument("--json", help="also write the summary as JSON here")
    return parser


def main(argv=None):
    """Fits and scores the probe; returns the summary dict (errors are fractions)."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        fail("--batch-size must be at least 1")
    if not args.C > 0:
        fail(f"--C must be positive. Received: {args.C}")

    from keras_alexnet import datasets, export, features
    from keras_alexnet.training import model_source, probe

    try:
        loaded = model_source.load_keras(args.model)
    except (FileNotFoundError, ValueError) as error:
        fail(error)
    if features.find_layer(loaded.model, args.layer) is None:
        fail(f"the model {args.model} has no {args.layer} layer (it is not an AlexNet of "
              "this package)")
    try:
        source = datasets.load(args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir,
                               val_split=args.val_split)
        mean = probe.model_mean(loaded, args.mean, args.data_dir)
    except (FileNotFoundError, ValueError) as error:
        fail(error)
    if source.num_classes < 2:
        fail(f"{args.dataset} has {source.num_classes} class; a probe needs at least 2")

    def extract(split, count, name):
        print(f"Extracting {args.layer} features of {count} {name} images")
        return features.extract(loaded.model, split, args.layer, loaded.image_size, mean,
                                loaded.resize, args.batch_size)

    train_x, train_y = extract(source.train, source.num_train, "training")
    val_x, val_y = extract(source.validation, source.num_validation, "validation")
    try:
        fitted = probe.fit(train_x, train_y, source.num_classes, args.classifier, args.C,
                           args.max_iter)
    except ValueError as error:
        fail(error)
    top1, topk, k = probe.top_k_errors(fitted.scores(val_x), val_y)
    train_top1, _, _ = probe.top_k_errors(fitted.scores(train_x), train_y)
    summary = {
        "model": str(loaded.path or args.model),
        "dataset": source.name,
        "layer": args.layer,
        "dim": int(train_x.shape[1]),
        "classifier": args.classifier,
        "C": args.C,
        "num_classes": source.num_classes,
        "num_train": int(len(train_y)),
        "num_validation": int(len(val_y)),
        "top1_error": top1,
        "top5_error": topk,
        "top_k": k,
        "train_top1_error": train_top1,
        "converged": fitted.converged,
        "export": None,
        "export_deviation": None,
    }
    print(f"Linear probe ({args.classifier}, C={args.C:g}) on {args.layer} "
          f"({summary['dim']}-d), {summary['num_train']} training / "
          f"{summary['num_validation']} validation images, {source.num_classes} classes:")
    print(f"  top-1 error {100 * top1:.2f}%   top-5 error {100 * topk:.2f}%"
          + (f" (top-{k}: all classes)" if k < 5 else ""))
    print(f"  training top-1 error {100 * train_top1:.2f}%")
    if not fitted.converged:
        print(f"  warning: the solver did not converge in {args.max_iter} iterations "
              "(raise --max-iter or lower --C)")
    if args.export:
        kernel, bias = fitted.folded()
        head = probe.probe_model(loaded.model, args.layer, kernel, bias)
        record = {key: summary[key] for key in ("model", "dataset", "layer", "classifier", "C",
                                                "top1_error", "top5_error", "top_k")}
        path = export.export_saved_model(head, args.export, source.display_names, mean=mean,
                                         resize=loaded.resize, features=args.layer,
                                         metadata={"probe": record})
        summary["export"] = str(path)
        summary["export_deviation"] = fitted.folded_deviation(val_x)
        print(f"Exported the probe to {path}")
        if summary["export_deviation"] > 1e-3:
            print(f"  warning: in float32 the exported head's logits differ from the probe's "
                  f"by up to {100 * summary['export_deviation']:.2g}% of the largest score "
                  "(features that hardly vary; see LinearProbe.folded_deviation)")
    if args.json:
        from keras_alexnet import files

        files.atomic_write(args.json, json.dumps(summary, indent=1))
        print(f"Summary written to {pathlib.Path(args.json)}")
    return summary


def cli():
    """The ``alexnet-probe`` command: `main`, with an exit status instead of the summary."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
