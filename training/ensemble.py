"""Export several trained AlexNets as one servable model that averages their predictions.

    alexnet-ensemble models/a/3 models/b/1 runs/c --export models/ensemble [--ten-crop]

The paper's 15.3 % top-5 error came from averaging the predictions of several CNNs
(Sec. 6). Each MEMBER is an exported SavedModel version (or base directory: its newest
version), a training run directory (its newest checkpoint), one of its checkpoints or a
``.keras`` file. The members must share the crop size, the classes (and their names),
the mean and the resize side; the first that differs is named and nothing is written.
The new SavedModel version under ``--export`` has the signatures of a single export
(`keras_alexnet.export`), serving the mean of the members' softmax probabilities;
with ``--ten-crop`` the encoded-image signatures also average over each image's 10
crops. ``assets.extra/alexnet_export.json`` lists the members under ``ensemble``.
"""

import argparse
import os
import pathlib
import sys

from training import HelpFormatter, fail, read_labels

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Export the average of several models' softmax as one SavedModel version "
                    "for TensorFlow Serving (the paper's ensembles).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("members", nargs="+", metavar="MEMBER",
                        help="two or more models: SavedModel version (or base) directories, "
                             "training run directories, run/checkpoints/ckpt-N or .keras files")
    parser.add_argument("--export", required=True,
                        help="the ensemble's SavedModel base directory; a new version is added")
    parser.add_argument("--version", type=int, help="explicit version number (default: next)")
    parser.add_argument("--ten-crop", action="store_true",
                        help="average each image's 10 crops (corners, centre, mirrored) too, "
                             "in the encoded-image signatures (10 forward passes per image)")
    parser.add_argument("--labels", help="a text file of class names, one per line, for members "
                                         "that record none (training runs, .keras files)")
    return parser


def _load_member(index, given):
    """A `keras_alexnet.ensemble.Member` of the path ``given`` (exits 2 if unusable)."""
    from keras_alexnet import ensemble, export
    from keras_alexnet.training import model_source

    try:
        loaded = model_source.load_keras(given)
    except (FileNotFoundError, ValueError, OSError) as error:
        fail(f"member {index} ({given}): {error}")
    weights = None
    if loaded.origin == "export":
        weights = export.read_metadata(loaded.path).get("weights")
    return ensemble.Member(loaded.model, loaded.class_names, loaded.mean, loaded.resize,
                           loaded.path, weights)


def main(argv=None):
    """Loads the members, checks them and exports the ensemble; returns the version path."""
    args = build_parser().parse_args(argv)
    if len(args.members) < 2:
        fail(f"an ensemble needs at least 2 members; got {len(args.members)}")
    if args.version is not None and args.version < 1:
        fail(f"--version must be a positive integer. Received {args.version}")
    base = pathlib.Path(args.export).expanduser()
    if args.version is not None and (base / str(args.version)).exists():
        fail(f"version {args.version} already exists in {base}")
    for index, given in enumerate(args.members):  # before TensorFlow starts: a typo fails fast
        if not pathlib.Path(given).expanduser().exists():
            fail(f"member {index} ({given}) does not exist")
    labels = read_labels(args.labels)

    from keras_alexnet import ensemble

    members = [_load_member(i, given) for i, given in enumerate(args.members)]
    try:
        version = ensemble.export_ensemble(members, base, class_names=labels,
                                           version=args.version, ten_crop=args.ten_crop)
    except ValueError as error:
        fail(error)
    crops = "10 crops" if args.ten_crop else "the centre crop"
    print(f"Exported an ensemble of {len(members)} members (the mean of their softmax, on "
          f"{crops} of each encoded image) to {version}")
    for index, member in enumerate(members):
        print(f"  {ensemble.MEMBER_PREFIX}{index}: {member.path} "
              f"({type(member.model).__name__}, {member.model.count_params():,} parameters)")
    return version


def cli():
    """The ``alexnet-ensemble`` command: `main`, with an exit status."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
