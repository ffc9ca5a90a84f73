"""Convert published AlexNet weights and export them as a servable SavedModel version.

    alexnet-convert caffe --prototxt deploy.prototxt \\
        --caffemodel bvlc_alexnet.caffemodel --export models/alexnet
    alexnet-convert torchvision --state-dict alexnet-owt-7be5be79.pth \\
        --export models/alexnet-tv

Nothing is downloaded: bring the files (Caffe's BVLC model zoo ``bvlc_alexnet``;
torchvision's ``AlexNet_Weights.IMAGENET1K_V1`` state dict, which needs the ``torch``
extra: ``pip install 'keras-alexnet[torch]'``). The export serves the 1000 ImageNet
classes (or ``--labels``, one per line, for other class counts) with the preprocessing
the weights were trained with, recorded in ``assets.extra/alexnet_export.json``.
"""

import argparse
import os
import pathlib
import sys

from training import HelpFormatter, fail, read_labels

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Convert Caffe's bvlc_alexnet or torchvision's AlexNet weights into this "
                    "package's model and export a SavedModel version for TensorFlow Serving.",
        formatter_class=HelpFormatter,
    )
    sources = parser.add_subparsers(dest="source", required=True, metavar="{caffe,torchvision}")
    caffe = sources.add_parser("caffe", help="Caffe's two-tower bvlc_alexnet",
                               formatter_class=HelpFormatter)
    caffe.add_argument("--prototxt", required=True, help="the network definition (deploy.prototxt)")
    caffe.add_argument("--caffemodel", required=True, help="the weights (bvlc_alexnet.caffemodel)")
    caffe.add_argument("--mean", help="Caffe's mean image (ilsvrc_2012_mean.binaryproto); default: "
                                      "its per-channel average (B, G, R = 104, 117, 123)")
    torchvision = sources.add_parser("torchvision", help="torchvision's one-tower AlexNet",
                                     formatter_class=HelpFormatter)
    torchvision.add_argument("--state-dict", required=True,
                             help="a state dict saved by torch.save (alexnet-owt-7be5be79.pth)")
    for sub in (caffe, torchvision):
        sub.add_argument("--export", required=True,
                         help="the SavedModel base directory; a new version is added")
        sub.add_argument("--version", type=int, help="explicit version number (default: next)")
        sub.add_argument("--labels", help="a text file of class names, one per line in output "
                                          "order (default: the 1000 ImageNet classes)")
    return parser


def _check_file(flag, path):
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        fail(f"{flag} {path} does not exist (the project downloads nothing: "
             "bring the file, see README 'Pretrained weights and transfer')")
    return path


def main(argv=None):
    """Converts and exports; returns the new version directory."""
    args = build_parser().parse_args(argv)
    labels = read_labels(args.labels)
    if args.version is not None and args.version < 1:
        fail(f"--version must be a positive integer. Received {args.version}")
    export_base = pathlib.Path(args.export).expanduser()
    if args.version is not None and (export_base / str(args.version)).exists():
        fail(f"version {args.version} already exists in {export_base}")

    # Checked before TensorFlow starts: a typo fails in a moment.
    if args.source == "caffe":
        prototxt = _check_file("--prototxt", args.prototxt)
        caffemodel = _check_file("--caffemodel", args.caffemodel)
        mean = _check_file("--mean", args.mean) if args.mean else None
    else:
        state_dict = _check_file("--state-dict", args.state_dict)

    from keras_alexnet import convert

    try:
        if args.source == "caffe":
            from keras_alexnet.convert import caffe

            converted = caffe.load_caffe(prototxt, caffemodel, mean=mean, class_names=labels)
        else:
            from keras_alexnet.convert import torchvision

            converted = torchvision.load_torchvision(state_dict, class_names=labels)
        version = convert.export_converted(converted, export_base, version=args.version)
    except (ValueError, ImportError) as error:
        fail(str(error))
    weights = converted.weights
    accuracy = weights.get("published_accuracy")
    print(f"Exported {args.source} weights ({converted.model.count_params():,} parameters, "
          f"{len(converted.class_names)} classes) to {version}")
    if accuracy:
        print(f"Published accuracy of these weights: top-1 {accuracy['top1']} %, top-5 "
              f"{accuracy['top5']} % ({accuracy['source']})")
    return version


def cli():
    """The ``alexnet-convert`` command: `main`, with an exit status."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
