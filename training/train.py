"""Train AlexNet (Krizhevsky, Sutskever & Hinton, 2012) and export a SavedModel.

    python training/train.py                      # the demo: full network, embedded data
    python training/train.py --preset paper --dataset imagenet2012 --data-dir ...
    python training/train.py --strategy mirrored                 # every GPU of the machine
    python training/train.py --strategy towers --cpu-devices 2   # the paper's two towers
    TF_CONFIG=... python training/train.py --strategy multiworker  # see docs/scale.md

A preset supplies every setting (see `keras_alexnet.training.config.PRESETS`); flags override
it. Rerunning the same command after an interruption resumes from the newest
checkpoint in the run directory.
"""

import argparse
import dataclasses
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out


from training import HelpFormatter, prefer_onednn

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "alexnet-train":
    prefer_onednn()

from keras_alexnet.training.config import DEFAULT_PRESET, PRESETS


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train AlexNet and export a versioned SavedModel for TensorFlow Serving.",
        formatter_class=HelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                     help="base settings: 'demo' trains on the embedded dataset in minutes on "
                          "a CPU, 'paper' is the recipe of Sec. 5, 'smoke' is for tests")
    run.add_argument("--run-dir", default=None,
                     help="checkpoints, TensorBoard logs, history.csv and config.json go here "
                          "(default: runs/<preset>-<dataset>); rerun to resume")
    run.add_argument("--export-dir", default="models/alexnet",
                     help="base path of the versioned SavedModels (<export-dir>/<N>/)")
    run.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    run.add_argument("--force-export", action="store_true",
                     help="export a new version even if this finished run exported one already")
    run.add_argument("--seed", type=int, help="random seed for weights, shuffling, augmentation")
    run.add_argument("--quiet", action="store_true", help="one line per epoch, no progress bar")
    run.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                     help="also commit a checkpoint every STEPS training steps, besides every "
                          "epoch end (0: epoch ends only); a killed run resumes from the newest "
                          "(default: the preset's, a few minutes of work)")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic TensorFlow ops: bit-identical reruns, somewhat slower")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="dataset name: alexnet_shapes (embedded, generated "
                                        "locally), alexnet_shapes/tiny, imagenet2012 (with "
                                        "--manual-dir), folder:PATH (one sub-folder per class; "
                                        "val/ or --val-split)")
    data.add_argument("--data-dir", help="TFDS data directory (default ~/tensorflow_datasets)")
    data.add_argument("--manual-dir", help="folder holding ILSVRC2012_img_train.tar and "
                                           "ILSVRC2012_img_val.tar (imagenet2012 only)")
    data.add_argument("--val-split", type=float,
                      help="fraction held out for validation (folder datasets without val/)")
    data.add_argument("--mean-image", action="store_true",
                      help="subtract the paper's per-pixel mean image of the training set "
                           "(computed once, cached beside the data) instead of the channel mean")
    data.add_argument("--batch-size", type=int, help="images per step")
    data.add_argument("--image-size", type=int, help="input crop size (227 in the paper, >= 67)")
    data.add_argument("--no-pca", action="store_true", help="turn PCA colour noise off")
    data.add_argument("--no-augment", action="store_true",
                      help="no random crops, flips or colour noise: train on the centre crop")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, help="number of epochs")
    optim.add_argument("--learning-rate", type=float, help="initial learning rate")
    optim.add_argument("--optimizer", choices=("sgd", "adam"), help="optimiser")
    optim.add_argument("--weight-decay", type=float,
                       help="paper-style weight decay inside the momentum buffer (0.0005)")

    model = parser.add_argument_group("model")
    model.add_argument("--width", type=float, help="width multiplier (1.0 = the paper)")
    model.add_argument("--towers", type=int, choices=(1, 2), help="2 = the paper's two towers")
    model.add_argument("--dropout-rate", type=float,
                       help="dropout before fc6 and fc7 (0.5 in the paper, 0 turns it off)")
    model.add_argument("--activation", choices=("relu", "tanh"),
                       help="the units after every convolution and fc6/fc7 (relu in the paper)")
    model.add_argument("--no-lrn", action="store_true",
                       help="no local response normalisation after conv1 and conv2")
    model.add_argument("--pool-size", type=int,
                       help="max pooling window (3 in the paper: overlapping with stride 2)")
    model.add_argument("--pool-stride", type=int, help="max pooling stride (2 in the paper)")

    scale = parser.add_argument_group("scale (docs/scale.md)")
    scale.add_argument("--strategy", choices=("default", "mirrored", "towers", "multiworker"),
                       help="default: one device; mirrored: data parallel over every GPU (or "
                            "--cpu-devices); towers: tower A on device 0, tower B on device 1; "
                            "multiworker: MultiWorkerMirroredStrategy from TF_CONFIG")
    scale.add_argument("--cpu-devices", type=int,
                       help="split the CPU into N logical devices (mirrored/towers without GPUs)")
    scale.add_argument("--no-lr-scaling", action="store_true",
                       help="keep --learning-rate as given instead of multiplying it by the "
                            "number of replicas (--batch-size is per replica)")
    scale.add_argument("--mixed-precision", choices=("float16", "bfloat16"),
                       help="mixed_float16 (with loss scaling) or mixed_bfloat16; LRN, softmax "
                            "and the loss stay float32")
    scale.add_argument("--jit", action="store_true", help="compile the training step with XLA")
    return parser


# Flags whose value goes to the TrainConfig field of the same name, when given.
_FIELD_FLAGS = ("dataset", "data_dir", "batch_size", "image_size", "epochs", "learning_rate",
                "optimizer", "weight_decay", "width", "towers", "seed", "manual_dir",
                "val_split", "strategy", "cpu_devices", "checkpoint_every", "dropout_rate",
                "activation", "pool_size", "pool_stride")


def resolve_config(args):
    """The preset's `TrainConfig` with every flag the user gave applied on top."""
    values = {k: getattr(args, k) for k in _FIELD_FLAGS if getattr(args, k) is not None}
    if args.no_pca:
        values["pca_std"] = 0.0
    if args.no_augment:
        values["augment"] = False
    if args.no_lrn:
        values["use_lrn"] = False
    if args.mean_image:
        values["mean"] = "image"
    if args.no_lr_scaling:
        values["scale_lr"] = False
    if args.mixed_precision:
        values["mixed_precision"] = f"mixed_{args.mixed_precision}"
    if args.jit:
        values["jit_compile"] = True
    if args.deterministic:
        values["deterministic"] = True
    for name in ("batch_size", "epochs", "cpu_devices", "pool_size", "pool_stride"):
        if name in values and values[name] < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    if values.get("checkpoint_every", 0) < 0:
        raise SystemExit("error: --checkpoint-every must be 0 (epoch ends only) or more")
    return dataclasses.replace(PRESETS[args.preset], **values)


def default_run_dir(preset, dataset):
    return os.path.join("runs", f"{preset}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', dataset)}")


def main(argv=None):
    """Runs training from command-line arguments; returns the summary dict."""
    args = build_parser().parse_args(argv)
    config = resolve_config(args)
    run_dir = args.run_dir or default_run_dir(args.preset, config.dataset)

    from keras_alexnet.training import loop  # imports TensorFlow: after --help is served

    print(f"Training AlexNet ({args.preset} preset) on {config.dataset}; run directory {run_dir}")
    try:
        summary = loop.train(config, run_dir, args.export_dir, verbose=2 if args.quiet else 1,
                              do_export=not args.no_export, force_export=args.force_export)
    except (ValueError, loop.NonFiniteLossError) as error:
        # What a user can fix (a bad flag, dataset or run directory; a diverged run) gets
        # its message, not a traceback; nothing was written that a rerun would trip on.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2 if isinstance(error, ValueError) else 1) from None
    minutes = summary["seconds"] / 60
    print(f"\nDone in {minutes:.1f} min: validation top-1 {summary['val_top1']:.2%} "
          f"(error {1 - summary['val_top1']:.2%}), top-5 {summary['val_top5']:.2%} "
          f"(error {1 - summary['val_top5']:.2%}).")
    if summary["export_path"]:
        base = os.path.abspath(args.export_dir)
        print(f"SavedModel exported to {summary['export_path']}\n"
              f"Serve it:\n"
              f"  python -m serving.server --model_name=alexnet --model_base_path={base}\n"
              f"  docker compose up serving    # TensorFlow Serving on :8500 (gRPC), :8501 (REST)\n"
              f"Classify: python -m serving.client path/to/image.jpg --server localhost:8500")
    return summary


def cli():
    """The ``alexnet-train`` command: `main`, with an exit status instead of the summary."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
