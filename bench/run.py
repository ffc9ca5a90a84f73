"""The benchmark runner: every comparison of issue 13 in one command.

    python -m bench --out bench-results            # the full run (see BENCHMARKS.md)
    python -m bench --quick --out /tmp/benchq      # a tiny model: checks that it all works
    python -m bench --sections train infer --onednn 0 1 --out results

Sections (``--sections``, in this order): ``matmul`` (the float32 and, where the CPU has
AVX512_BF16 or AMX, bfloat16 matrix-multiply rate: the limit; always run with ``train``
or ``infer``), ``train``, ``infer``, ``serving``, ``warmup``, ``pipeline``; see
`bench.compute` and `bench.serve`. One model is built, exported (the real
`export_saved_model`) and converted for all of them (`bench.sides_tf.prepare`).

Each comparison's sides live in long-lived worker processes (`bench.workers`) and are
timed in turn, A B C A B C ..., ``--reps`` times after their warm-up; figures are
medians with their min-max, ratios the median of the per-repetition ratios. Each
oneDNN setting (``--onednn``; default: ``TF_ENABLE_ONEDNN_OPTS`` if set, else 1, as the
training command sets it) runs every section in fresh processes. PyTorch and ONNX
Runtime get ``--threads`` intra-op threads (default: every core), TensorFlow keeps
its default (one intra-op thread per core).

Writes ``<out>/results.jsonl`` (one JSON record per line, each with its conditions:
CPU model and flags, cores, versions, batch, dtype, oneDNN), ``<out>/results.md``
(the tables) and ``<out>/run.json`` (the run's own conditions), atomically, after every
section. ``--quick`` shrinks everything (67x67, width 0.125, short repetitions) to check
that the runner works; it asserts nothing about speed.
"""

import argparse
import json
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow
if not __package__:  # run as a script (python bench/run.py): the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import conditions, report
from bench.context import Context
from bench.workers import REPO, Pool, WorkerError
from training import fail

SECTIONS = ("matmul", "train", "infer", "serving", "warmup", "pipeline")
NEEDS_MODEL = ("train", "infer", "serving", "warmup")
DTYPES = ("float32", "mixed_bfloat16")
SAMPLES = REPO.parent / "shared" / "data" / "imagenet-sample"
TEST_IMAGES = REPO / "tests" / "data" / "images"

FULL = dict(
    image_size=227, width=1.0, num_classes=1000, batch=64, infer_batches=[1, 8, 64],
    serving_batches=[1, 8, 32], serving_clients=[1, 4, 16], reps=5, seconds=3.0,
    train_seconds=10.0, serving_seconds=4.0, matmul_size=4096, compile_timeout=1200.0,
    warmup_requests=20, warmup_trials=3, pipeline_cores=None, pipeline_seconds=15.0,
    pipeline_batch=128, pipeline_max_side=500, pipeline_reps=3, pipeline_folder=None)
QUICK = dict(
    image_size=67, width=0.125, num_classes=10, batch=8, infer_batches=[1, 8],
    serving_batches=[1, 8], serving_clients=[1, 4], reps=2, seconds=0.3,
    train_seconds=0.3, serving_seconds=0.5, matmul_size=256, compile_timeout=180.0,
    warmup_requests=5, warmup_trials=1, pipeline_cores=[1], pipeline_seconds=1.0,
    pipeline_batch=8, pipeline_max_side=0, pipeline_reps=1, pipeline_folder=str(TEST_IMAGES))


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.jsonl/.md, run.json")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and short repetitions (a check, not a measurement)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--onednn", nargs="+", choices=("0", "1"),
                        help="TF_ENABLE_ONEDNN_OPTS settings to run (default: the "
                             "environment's, else 1)")
    parser.add_argument("--threads", type=int, help="PyTorch/ONNX Runtime threads (default: cores)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES),
                        help="training precisions")
    ints = ("image_size", "num_classes", "batch", "reps", "matmul_size", "warmup_requests",
            "warmup_trials", "pipeline_batch", "pipeline_reps")
    for name in ints:
        parser.add_argument("--" + name.replace("_", "-"), type=int)
    for name in ("width", "seconds", "train_seconds", "serving_seconds", "compile_timeout",
                 "pipeline_seconds"):
        parser.add_argument("--" + name.replace("_", "-"), type=float)
    for name in ("infer_batches", "serving_batches", "serving_clients", "pipeline_cores"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, nargs="+")
    parser.add_argument("--pipeline-max-side", type=int,
                        help="input pipeline: only photos whose longer side is at most this")
    parser.add_argument("--pipeline-folder", help="input pipeline: a folder of JPEGs")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the export, weights and worker logs (printed path)")
    return parser


def resolve(args):
    """Fills the unset sizes from `QUICK` or `FULL`; checks them (`fail` on bad input)."""
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    cores = os.cpu_count() or 1
    if args.pipeline_cores is None:
        args.pipeline_cores = sorted({1, min(2, cores)})
    if args.pipeline_folder is None:
        args.pipeline_folder = str(SAMPLES if SAMPLES.is_dir() else TEST_IMAGES)
    args.threads = args.threads or cores
    args.onednn = args.onednn or [os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1")]
    if args.image_size < 67:
        fail(f"--image-size must be at least 67 (smaller inputs leave pool5 empty). "
             f"Received: {args.image_size}")
    if not args.width > 0:
        fail(f"--width must be positive. Received: {args.width}")
    if args.num_classes < 2:
        fail(f"--num-classes must be at least 2. Received: {args.num_classes}")
    positive = ["batch", "reps", "matmul_size", "warmup_requests", "warmup_trials",
                "pipeline_batch", "pipeline_reps", "threads", "seconds", "train_seconds",
                "serving_seconds", "compile_timeout", "pipeline_seconds"]
    for name in positive:
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive. Received: {getattr(args, name)}")
    for name in ("infer_batches", "serving_batches", "serving_clients", "pipeline_cores"):
        if not all(v > 0 for v in getattr(args, name)):
            fail(f"--{name.replace('_', '-')} must be positive. Received: {getattr(args, name)}")
    if max(args.pipeline_cores) > cores:
        fail(f"--pipeline-cores cannot exceed the {cores} cores. Received: {args.pipeline_cores}")
    if "train" in args.sections and args.batch % 2:
        fail(f"--batch must be even (the mirrored side splits it over 2 replicas). "
             f"Received: {args.batch}")
    if "pipeline" in args.sections and not pathlib.Path(args.pipeline_folder).is_dir():
        fail(f"--pipeline-folder is not a folder. Received: {args.pipeline_folder}")
    if ("train" in args.sections or "infer" in args.sections) and "matmul" not in args.sections:
        args.sections = ["matmul", *args.sections]  # the limit the fractions divide by
    args.sections = [s for s in SECTIONS if s in args.sections]
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        fail(f"--out must be a folder. Received: {args.out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"cannot create --out ({error.strerror}). Received: {args.out}")
    if not os.access(out, os.W_OK):
        fail(f"--out is not writable. Received: {args.out}")
    return args


def _env(onednn):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, CUDA_VISIBLE_DEVICES="-1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def section_functions():
    from bench import compute, serve

    return {"matmul": compute.matmul_section, "train": compute.train_section,
            "infer": compute.infer_section, "serving": serve.serving_section,
            "warmup": serve.warmup_section, "pipeline": compute.pipeline_section}


def write(out, header, records):
    """results.jsonl, results.md and run.json, each replaced atomically."""
    from keras_alexnet.files import atomic_write

    out = pathlib.Path(out)
    atomic_write(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write(out / "results.md", report.markdown(header, records))
    atomic_write(out / "run.json", json.dumps(header, indent=1) + "\n")


def run_setting(args, onednn, header, records, workdir):
    """Every chosen section under one oneDNN setting; appends to ``records``."""
    workdir.mkdir(parents=True, exist_ok=True)
    pool = Pool(workdir, _env(onednn), args.threads)
    ctx = Context(args, workdir, pool, _env(onednn), onednn, args.threads, header["machine"])
    functions = section_functions()
    try:
        prepare_error = None
        if any(s in args.sections for s in NEEDS_MODEL):
            print(f"[oneDNN {onednn}] preparing the model ...", flush=True)
            try:
                ctx.model = pool.get("tf").request(
                    3600, op="call", fn="bench.sides_tf:prepare",
                    kwargs={"workdir": str(workdir), "image_size": args.image_size,
                            "width": args.width, "num_classes": args.num_classes,
                            "inference_sides": "infer" in args.sections})["result"]
                header["model"] = ctx.model
            except WorkerError as error:
                prepare_error = f"failed: preparing the model: {error}"
        for section in args.sections:
            started = time.monotonic()
            print(f"[oneDNN {onednn}] {section} ...", flush=True)
            if section in NEEDS_MODEL and prepare_error:
                found = [ctx.record(section, section, prepare_error)]
            else:
                try:
                    found = functions[section](ctx)
                except Exception as error:  # one section's crash must not lose the others
                    traceback.print_exc()
                    found = [ctx.record(section, section, f"failed: {type(error).__name__}: "
                                                          f"{str(error)[:300]}")]
            records.extend(found)
            header["section_seconds"][f"{section} (oneDNN {onednn})"] = round(
                time.monotonic() - started, 1)
            header["load_end"] = conditions.load_average()
            write(args.out, header, records)
    finally:
        pool.close()


def main(argv=None):
    args = resolve(build_parser().parse_args(argv))
    start = time.monotonic()
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (
        sys.argv[1:] if argv is None else argv))
    header = {
        "command": command, "machine": conditions.machine(), "quick": args.quick,
        "threads": args.threads, "onednn": args.onednn, "sections": args.sections,
        "image_size": args.image_size, "width": args.width, "num_classes": args.num_classes,
        "reps": args.reps, "load_start": conditions.load_average(), "load_end": None,
        "settings": {k: getattr(args, k) for k in FULL}, "section_seconds": {}, "model": None,
    }
    records = []
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="alexnet-bench-"))
    try:
        for onednn in args.onednn:
            run_setting(args, onednn, header, records, workdir / f"onednn-{onednn}")
    finally:
        if args.keep_workdir:
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    header["wall_seconds"] = round(time.monotonic() - start, 1)
    write(args.out, header, records)
    failed = [r for r in records if r["status"].startswith("failed")]
    print(f"{len(records)} records ({len(failed)} failed) in {header['wall_seconds']} s: "
          f"{pathlib.Path(args.out) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
