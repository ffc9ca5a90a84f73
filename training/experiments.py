"""The paper's experiments as commands: train the variants a claim compares, report a table.

    python training/experiments.py relu-vs-tanh     # Figure 1: steps to 25 % training error
    python training/experiments.py lrn              # Sec. 3.3
    python training/experiments.py overlapping-pool # Sec. 3.4
    python training/experiments.py dropout          # Sec. 4.2
    python training/experiments.py augmentation     # Sec. 4.1
    python training/experiments.py ensemble --members 3   # Sec. 6
    python training/experiments.py lrn --preset paper --dataset imagenet2012 --manual-dir ...

Each default run is a small configuration (stated in its output and results.md) that
trains in a few minutes on a 2-core CPU on the embedded dataset; ``--preset paper`` is
the full network with the paper's recipe, for a GPU. The variants come from the one
model builder and input pipeline (`keras_alexnet.training.experiments`); each trains
in ``<run-dir>/<variant>``, which a rerun of the same command resumes. The table
(``results.md``, ``results.csv``, ``results.json``) and ``plot.png`` go into
``--run-dir`` (default ``runs/experiments/<name>``).
"""

import argparse
import dataclasses
import os
import sys

from training import HelpFormatter, prefer_onednn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __name__ == "__main__":
    prefer_onednn()

from keras_alexnet.training import experiments
from keras_alexnet.training.config import PRESETS

BASES = {"small": experiments.SMALL, "paper": PRESETS["paper"]}

# Flags whose value goes to the TrainConfig field of the same name, when given.
_FIELD_FLAGS = ("dataset", "data_dir", "manual_dir", "epochs", "image_size", "width",
                "batch_size", "learning_rate", "optimizer", "seed", "strategy", "cpu_devices")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Run one of the paper's experiments and write its table and plot.",
        formatter_class=HelpFormatter)
    parser.add_argument("name", choices=sorted(experiments.EXPERIMENTS))
    parser.add_argument("--preset", choices=sorted(BASES), default="small",
                        help="small: a narrow network that trains in minutes on a CPU; "
                             "paper: the full network and recipe (for a GPU)")
    parser.add_argument("--run-dir", help="default: runs/experiments/<name>")
    parser.add_argument("--dataset", help="alexnet_shapes, alexnet_shapes/tiny, imagenet2012, "
                                          "folder:PATH (see train.py)")
    parser.add_argument("--data-dir", help="TFDS data directory")
    parser.add_argument("--manual-dir", help="the ImageNet archives (imagenet2012)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--width", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--optimizer", choices=("sgd", "adam"))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--strategy", choices=("default", "mirrored", "towers", "multiworker"))
    parser.add_argument("--cpu-devices", type=int)
    parser.add_argument("--members", type=int, default=3, help="ensemble: number of seeds")
    parser.add_argument("--threshold", type=float, default=0.25,
                        help="relu-vs-tanh: the training top-1 error to reach")
    parser.add_argument("--quiet", action="store_true", help="one line per epoch")
    return parser


def resolve(args):
    """``(base configuration, run directory)``: the preset, the experiment's own defaults
    for the small preset, then the flags."""
    experiment = experiments.EXPERIMENTS[args.name]
    base = BASES[args.preset]
    if args.preset == "small":
        base = dataclasses.replace(base, **experiment.defaults)
    values = {k: getattr(args, k) for k in _FIELD_FLAGS if getattr(args, k) is not None}
    for name in ("epochs", "batch_size", "cpu_devices", "image_size"):
        if name in values and values[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if experiment.kind == "ensemble" and args.members < 2:
        raise ValueError(f"--members must be at least 2. Received: {args.members}")
    if not 0 < args.threshold < 1:
        raise ValueError(f"--threshold must be between 0 and 1. Received: {args.threshold}")
    run_dir = args.run_dir or os.path.join("runs", "experiments", args.name)
    return dataclasses.replace(base, **values), run_dir


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        base, run_dir = resolve(args)
        print(f"Experiment {args.name} ({args.preset} preset): "
              f"{experiments.EXPERIMENTS[args.name].claim}\n"
              f"Configuration: dataset {base.dataset}, image {base.image_size}, width "
              f"{base.width}, {base.epochs} epochs of batch {base.batch_size}, "
              f"{base.optimizer} lr {base.learning_rate:g}; run directory {run_dir}",
              flush=True)
        result = experiments.run(args.name, base, run_dir, members=args.members,
                                 threshold=args.threshold, verbose=2 if args.quiet else 1)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as error:  # a diverged arm (loop.NonFiniteLossError): say which
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print("\n" + experiments.markdown_table(result))
    print(f"Wrote {os.path.join(run_dir, 'results.md')}, results.csv, results.json and "
          "plot.png.")
    return result


def cli():
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
