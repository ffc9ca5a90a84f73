"""Export a model as a SavedModel version, an ONNX file or a LiteRT (TFLite) file.

    alexnet-export runs/demo --format savedmodel --out models/alexnet
    alexnet-export models/alexnet/3 --format onnx --out alexnet.onnx
    alexnet-export models/alexnet-tv --format litert --out alexnet-tv.tflite

MODEL is a training run directory (its newest checkpoint), one of its checkpoints
(``<run>/checkpoints/ckpt-N``), an exported SavedModel version (or base) directory
(also the converters' and ``alexnet-ensemble``'s) or a ``.keras`` file.

* ``savedmodel``: a new version under the base directory ``--out``, with every signature
  (`keras_alexnet.export`; ``--ten-crop`` as there);
* ``onnx`` / ``litert``: one file taking preprocessed pixels ``float32 [batch, S, S, 3]``
  (the SavedModel's ``serving_pixels``) and returning ``probabilities``, ``classes`` and
  ``scores`` (`keras_alexnet.portable`), with ``<file>.json`` beside it saying which
  preprocessing to apply; checked against TensorFlow before it is written. They need
  the ``onnx`` / ``litert`` extra (``pip install 'keras-alexnet[onnx]'``).

Class names come from ``--labels``, else the export, else the run's dataset. Bad input
(an unknown format, a missing model, an ``--out`` that cannot be written, a signature or
option the format cannot carry) is an ``error:`` line and exit status 2 with nothing
written; a conversion that fails or disagrees with TensorFlow exits 1, also with
nothing written.
"""

import argparse
import os
import pathlib
import sys
import tempfile

from training import HelpFormatter, fail, read_labels

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FORMATS = ("savedmodel", "onnx", "litert")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Export an AlexNet as a TF Serving SavedModel version, or as an ONNX or "
                    "LiteRT file that takes preprocessed pixels.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", help="a training run directory (newest checkpoint), one of its "
                                      "checkpoints/ckpt-N, a SavedModel version directory (or its "
                                      "base directory: newest version) or a .keras file")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="savedmodel: a new version in the base directory --out; onnx, "
                             "litert: the file --out (.onnx, .tflite) and its .json sidecar")
    parser.add_argument("--out", required=True,
                        help="the SavedModel base directory, or the .onnx / .tflite file")
    parser.add_argument("--labels", help="a text file of class names, one per line in output "
                                         "order (default: the export's, or the run's dataset's)")
    parser.add_argument("--mean", help="'imagenet', 'image', 'R,G,B' or a .npy file "
                                       "(default: what the model was trained with)")
    parser.add_argument("--data-dir", help="the TFDS data directory of a run's dataset (its "
                                           "class names, a per-pixel mean)")
    saved = parser.add_argument_group("savedmodel")
    saved.add_argument("--version", type=int, help="explicit version number (default: next)")
    saved.add_argument("--ten-crop", action="store_true",
                       help="the encoded-image signatures average each image's 10 crops")
    portable = parser.add_argument_group("onnx and litert")
    portable.add_argument("--signature", default=None,
                          help="the SavedModel signature to reproduce; only serving_pixels "
                               "(pixels in): the encoded-image ones need an image decoder")
    portable.add_argument("--opset", type=int, default=17, help="the ONNX opset")
    portable.add_argument("--overwrite", action="store_true",
                          help="replace an existing file and its sidecar")
    portable.add_argument("--no-verify", action="store_true",
                          help="skip the check of the file against TensorFlow (which needs "
                               "onnxruntime / ai-edge-litert)")
    return parser


def check_writable(out):
    """`fail` unless ``out`` can be created: its nearest existing ancestor must be a folder
    this process can write in (tried with a temporary file, which is removed)."""
    out = pathlib.Path(out).expanduser().absolute()
    ancestor = out if out.is_dir() else out.parent  # a SavedModel base that exists: itself
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        fail(f"--out {out}: {ancestor} is a file, not a folder; choose another location")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as error:
        fail(f"--out {out}: cannot write in {ancestor} ({error.strerror or error}); choose a "
             "writable location")
    return out


def _check_arguments(args):
    """The checks that need no TensorFlow: a typo fails in a moment."""
    if not pathlib.Path(args.model).expanduser().exists():
        fail(f"the model {args.model} does not exist (give a run directory, a checkpoint, an "
             "export version or a .keras file)")
    out = pathlib.Path(args.out).expanduser()
    if args.format == "savedmodel":
        for flag, given in (("--signature", args.signature is not None),
                            ("--overwrite", args.overwrite), ("--no-verify", args.no_verify)):
            if given:
                fail(f"{flag} applies to onnx and litert; a SavedModel carries all its "
                     "signatures and is never overwritten")
        if args.version is not None and args.version < 1:
            fail(f"--version must be a positive integer. Received {args.version}")
        if out.exists() and not out.is_dir():
            fail(f"--out {out} is a file; a SavedModel goes into a base directory")
        if args.version is not None and (out / str(args.version)).exists():
            fail(f"version {args.version} already exists in {out}")
        return check_writable(out)
    from keras_alexnet import portable  # imports TensorFlow; only what follows needs it

    if args.version is not None:
        fail(f"--version applies to savedmodel; the {args.format} file is --out itself")
    try:
        portable.check_request(args.format, args.signature or portable.PIXELS_SIGNATURE,
                               args.ten_crop)
    except ValueError as error:
        fail(error)
    try:
        portable.check_target(out, args.format, args.overwrite)
    except (ValueError, FileExistsError) as error:
        fail(f"--out: {error}")
    try:
        portable.require_extra(args.format, verify=not args.no_verify)
    except ImportError as error:
        fail(error)
    return check_writable(out)


def _class_names(loaded, given, data_dir):
    names = given or loaded.class_names
    config = loaded.run_config or {}
    if names is None and config.get("dataset"):
        from keras_alexnet import datasets

        try:
            names = list(datasets.load(config["dataset"], data_dir=data_dir or config.get(
                "data_dir"), manual_dir=config.get("manual_dir"),
                val_split=config.get("val_split")).display_names)
        except (OSError, ValueError) as error:
            fail(f"the class names of the run's dataset {config['dataset']} are not available "
                 f"({error}); pass --labels")
    if names is None:
        fail(f"{loaded.path} records no class names (a .keras file); pass --labels")
    return names


def _source(loaded):
    """The sidecar's / metadata's ``source``: where the model came from."""
    from keras_alexnet import export

    record = {"path": str(loaded.path), "origin": loaded.origin,
              "keras_class": type(loaded.model).__name__,
              "parameters": int(loaded.model.count_params())}
    if loaded.origin == "export":
        metadata = export.read_metadata(loaded.path)
        for key in ("weights", "ensemble"):
            if metadata.get(key) is not None:
                record[key] = metadata[key]
    return record


def main(argv=None):
    """Loads MODEL and writes the format asked for; returns a summary dict."""
    args = build_parser().parse_args(argv)
    out = _check_arguments(args)
    labels = read_labels(args.labels)

    from keras_alexnet import export, portable
    from keras_alexnet.training import model_source, probe

    try:
        loaded = model_source.load_keras(args.model)
    except (FileNotFoundError, ValueError, OSError) as error:
        fail(error)
    names = _class_names(loaded, labels, args.data_dir)
    try:
        mean = probe.model_mean(loaded, args.mean, args.data_dir)
    except (ValueError, OSError) as error:
        fail(error)
    source = _source(loaded)
    try:
        if args.format == "savedmodel":
            extra = {key: source.pop(key) for key in ("weights", "ensemble") if key in source}
            path = export.export_saved_model(loaded.model, out, names, version=args.version,
                                             mean=mean, resize=loaded.resize,
                                             metadata={**extra, "source": source},
                                             ten_crop=args.ten_crop)
            print(f"Exported {args.model} as SavedModel version {path}")
            return {"format": args.format, "path": str(path), "sidecar": None}
        exporter = portable.EXPORTERS[args.format]
        options = {"opset": args.opset} if args.format == "onnx" else {}
        path = exporter(loaded.model, out, names, mean=mean, resize=loaded.resize,
                        source=source, overwrite=args.overwrite, verify=not args.no_verify,
                        **options)
    except portable.ConversionError as error:
        fail(error, status=1)
    except (ValueError, ImportError, OSError) as error:
        fail(error)
    record = portable.read_sidecar(path)
    checked = (f"; checked against TensorFlow: max |dp| {record['check']['max_abs_difference']:.2g}"
               if record["check"] else "")
    size = record["input"]["shape"][1]
    print(f"Exported {args.model} as {args.format} {path} (input pixels [batch, {size}, {size}, 3],"
          f" preprocessing in {portable.sidecar_path(path)}){checked}")
    return {"format": args.format, "path": str(path), "sidecar": str(portable.sidecar_path(path))}


def cli():
    """The ``alexnet-export`` command: `main`, with an exit status."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
