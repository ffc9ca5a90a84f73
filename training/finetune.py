"""Fine-tune AlexNet weights on a folder of images (or any dataset) and export a SavedModel.

    python training/finetune.py --from runs/demo-alexnet_shapes --dataset folder:~/pets
    python training/finetune.py --from models/alexnet-torchvision --dataset folder:~/pets \\
        --head-epochs 2 --unfreeze conv5 --epochs 6 --lr 1e-3
    python training/finetune.py --from runs/x/checkpoints/ckpt-900 --dataset folder:PATH \\
        --strategy mirrored --cpu-devices 2

``--from`` is a training run directory (its newest checkpoint), one of its checkpoints
(``<run>/checkpoints/ckpt-N``), an exported SavedModel version or base directory (also
the weight converters' exports) or a ``.keras`` file. fc8 is replaced by a new one for
the dataset's classes; for ``--head-epochs`` epochs it trains alone (everything else
frozen), then ``--unfreeze LAYER`` trains that layer and every one above it too, at
``--lr`` times ``--unfreeze-lr-factor``. Without ``--unfreeze`` only fc8 trains, for
all ``--epochs``. The crop size, mean and resize side are the source's.

This is a training run like ``training/train.py``'s (same loop, run directory,
checkpoints, TensorBoard logs, strategies and export); rerunning the same command after
an interruption resumes it, without reading the source again.
"""

import argparse
import dataclasses
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out

from training import HelpFormatter, prefer_onednn

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "alexnet-finetune":
    prefer_onednn()

from keras_alexnet.training.config import DEFAULT_PRESET, PRESETS
from keras_alexnet.training.finetune import UNFREEZE_CHOICES

DEFAULT_EXPORT_DIR = "models/ft"


def build_parser():
    parser = argparse.ArgumentParser(
        description="Fine-tune an AlexNet (a run, checkpoint, export or .keras file) on a "
                    "dataset: new fc8, frozen layers, optional unfreezing; export a SavedModel.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--from", dest="init_from", required=True, metavar="SOURCE",
                        help="the model to start from: a run directory, run/checkpoints/ckpt-N, "
                             "a SavedModel version or base directory, or a .keras file")
    parser.add_argument("--dataset", required=True,
                        help="folder:PATH (one sub-folder per class; val/ or --val-split), or "
                             "alexnet_shapes, alexnet_shapes/tiny, imagenet2012")
    phases = parser.add_argument_group("phases")
    phases.add_argument("--head-epochs", type=int,
                        help="epochs training the new fc8 alone, before --unfreeze "
                             "(default: 1 with --unfreeze; without it fc8 alone trains "
                             "throughout)")
    phases.add_argument("--unfreeze", choices=UNFREEZE_CHOICES,
                        help="after the head epochs, also train this layer and every layer "
                             "above it (both towers); 'all' trains everything")
    phases.add_argument("--unfreeze-lr-factor", type=float, default=0.1,
                        help="learning rate of the unfrozen phase, relative to --lr")

    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                     help="optimiser, batch and epochs to start from (the architecture, crop "
                          "size and mean are the source's)")
    run.add_argument("--run-dir", default=None,
                     help="checkpoints, logs, history.csv and config.json (default: "
                          "runs/ft-<dataset>); rerun to resume")
    run.add_argument("--export-dir", default=DEFAULT_EXPORT_DIR,
                     help="base path of the versioned SavedModels (<export-dir>/<N>/)")
    run.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    run.add_argument("--force-export", action="store_true",
                     help="export a new version even if this finished run exported one already")
    run.add_argument("--seed", type=int, help="random seed for fc8, shuffling, augmentation")
    run.add_argument("--quiet", action="store_true", help="one line per epoch, no progress bar")
    run.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                     help="also commit a checkpoint every STEPS training steps (0: epoch ends "
                          "only)")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic TensorFlow ops: bit-identical reruns, somewhat slower")

    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", help="TFDS data directory (default ~/tensorflow_datasets)")
    data.add_argument("--manual-dir", help="ImageNet archives (imagenet2012 only)")
    data.add_argument("--val-split", type=float,
                      help="fraction held out for validation (folder datasets without val/)")
    data.add_argument("--batch-size", type=int, help="images per step (per replica)")
    data.add_argument("--no-pca", action="store_true", help="turn PCA colour noise off")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, help="number of epochs in all (both phases)")
    optim.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float,
                       help="learning rate of the head phase")
    optim.add_argument("--optimizer", choices=("sgd", "adam"), help="optimiser")
    optim.add_argument("--weight-decay", type=float,
                       help="paper-style weight decay inside the momentum buffer")
    optim.add_argument("--dropout-rate", type=float,
                       help="dropout before fc6 and fc7 (default: the source's)")

    scale = parser.add_argument_group("scale (docs/scale.md)")
    scale.add_argument("--strategy", choices=("default", "mirrored", "towers", "multiworker"),
                       help="as training/train.py")
    scale.add_argument("--cpu-devices", type=int,
                       help="split the CPU into N logical devices (mirrored/towers without GPUs)")
    scale.add_argument("--no-lr-scaling", action="store_true",
                       help="do not multiply the learning rate by the number of replicas")
    scale.add_argument("--mixed-precision", choices=("float16", "bfloat16"),
                       help="mixed_float16 (with loss scaling) or mixed_bfloat16")
    scale.add_argument("--jit", action="store_true", help="compile the training step with XLA")
    return parser


_FIELD_FLAGS = ("dataset", "data_dir", "manual_dir", "val_split", "batch_size", "epochs",
                "learning_rate", "optimizer", "weight_decay", "seed", "strategy",
                "cpu_devices", "checkpoint_every", "unfreeze", "unfreeze_lr_factor")


def resolve_config(args, run_dir):
    """The fine-tuning `TrainConfig`: the preset, the flags, and the source's architecture
    and preprocessing (from ``run_dir``'s ``config.json`` when it resumes the same
    source, else from the source's metadata)."""
    from keras_alexnet.training import finetune

    values = {k: getattr(args, k) for k in _FIELD_FLAGS if getattr(args, k) is not None}
    if args.no_pca:
        values["pca_std"] = 0.0
    if args.no_lr_scaling:
        values["scale_lr"] = False
    if args.mixed_precision:
        values["mixed_precision"] = f"mixed_{args.mixed_precision}"
    if args.jit:
        values["jit_compile"] = True
    if args.deterministic:
        values["deterministic"] = True
    for name in ("batch_size", "epochs", "cpu_devices"):
        if name in values and values[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if values.get("checkpoint_every", 0) < 0:
        raise ValueError("--checkpoint-every must be 0 (epoch ends only) or more")
    if args.head_epochs is not None and args.unfreeze is None:
        raise ValueError("--head-epochs needs --unfreeze: without it every epoch trains fc8 "
                         "alone")
    if args.unfreeze is not None:
        values["head_epochs"] = 1 if args.head_epochs is None else args.head_epochs
    config = dataclasses.replace(PRESETS[args.preset], **values)
    return finetune.prepare_config(config, args.init_from, run_dir,
                                   dropout_rate=args.dropout_rate)


def default_run_dir(dataset):
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.split(":", 1)[-1].rstrip("/"))
    return os.path.join("runs", f"ft-{name.strip('_') or 'dataset'}")


def main(argv=None):
    """Runs fine-tuning from command-line arguments; returns the summary dict."""
    args = build_parser().parse_args(argv)
    run_dir = args.run_dir or default_run_dir(args.dataset)
    try:
        config = resolve_config(args, run_dir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None

    from keras_alexnet.training import loop  # imports TensorFlow: after --help is served

    phases = "fc8 alone" if config.unfreeze is None else (
        f"fc8 alone for {config.head_epochs} epoch(s), then {config.unfreeze} and up")
    print(f"Fine-tuning {config.init_from} on {config.dataset} ({phases}); run directory "
          f"{run_dir}")
    try:
        summary = loop.train(config, run_dir, args.export_dir, verbose=2 if args.quiet else 1,
                             do_export=not args.no_export, force_export=args.force_export)
    except (ValueError, loop.NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2 if isinstance(error, ValueError) else 1) from None
    print(f"\nDone in {summary['seconds'] / 60:.1f} min: validation top-1 "
          f"{summary['val_top1']:.2%} (error {1 - summary['val_top1']:.2%}), top-5 "
          f"{summary['val_top5']:.2%}.")
    if summary["export_path"]:
        print(f"SavedModel exported to {summary['export_path']}")
    return summary


def cli():
    """The ``alexnet-finetune`` command: `main`, with an exit status instead of the summary."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
