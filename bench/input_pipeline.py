"""Input-pipeline throughput: decode + the paper's training augmentation, images/s on 1 and 2 cores.

    python bench/input_pipeline.py                      # 1 and 2 cores, all sample JPEGs
    python bench/input_pipeline.py --cores 1 --max-side 500 --seconds 20

Reads real ImageNet JPEGs (``../shared/data/imagenet-sample`` if present, else
``tests/data/images``) into memory, so disk speed is out of the measurement, and runs
`input_pipeline.training_dataset` (shuffle, decode, shorter side to 256 + central
256x256, PCA colour noise, mean subtraction, random 227 crop, flip, batch 128) over
them repeatedly. Each core count runs in a fresh process pinned to that many CPUs
(``sched_setaffinity``) with tf.data's private thread pool and TensorFlow's op thread
pools of the same size. Prints one JSON line per measurement with its conditions.
Not a test: run it by hand on a quiet machine.
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = [ROOT.parent / "shared" / "data" / "imagenet-sample", ROOT / "tests" / "data" / "images"]


def _images(folder, max_side):
    from PIL import Image

    files = sorted(p for p in pathlib.Path(folder).iterdir()
                   if p.suffix.lower() in (".jpg", ".jpeg"))
    if max_side:
        files = [p for p in files if max(Image.open(p).size) <= max_side]
    return files


def measure(folder, cores, seconds, batch_size, max_side, stage):
    """Runs in the pinned child process; returns the result dict."""
    os.sched_setaffinity(0, list(sorted(os.sched_getaffinity(0)))[:cores])
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(cores)
    tf.config.threading.set_inter_op_parallelism_threads(cores)
    from keras_alexnet import preprocessing
    from keras_alexnet.training import input_pipeline

    files = _images(folder, max_side)
    encoded = [p.read_bytes() for p in files]
    source = tf.data.Dataset.from_tensor_slices(
        (encoded, tf.zeros(len(encoded), tf.int64))).repeat()
    if stage == "train":
        ds = input_pipeline.training_dataset(source, batch_size, seed=0, shuffle_buffer=len(files))
    else:  # decode only, for reference
        ds = source.map(lambda b, y: (tf.shape(preprocessing.decode_image(b)), y),
                        num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    ds = ds.with_options(options)
    iterator = iter(ds)
    for _ in range(3):  # warm-up: tracing, AUTOTUNE's first decisions
        next(iterator)
    count, start = 0, time.perf_counter()
    cpu_start = time.process_time()
    while time.perf_counter() - start < seconds:
        next(iterator)
        count += batch_size
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    sizes = [tf.io.extract_jpeg_shape(b).numpy() for b in encoded]
    return {
        "stage": stage, "cores": cores, "img_per_s": round(count / elapsed, 1),
        "img_per_s_per_core": round(count / elapsed / cores, 1),
        # Images per CPU-second used by this process: what one uncontended core would
        # do, and the fairer figure when other work shares the machine.
        "img_per_cpu_s": round(count / cpu, 1),
        "cpu_utilisation": round(cpu / elapsed / cores, 2), "images": len(files),
        "mean_pixels": int(sum(int(h) * int(w) for h, w, _ in sizes) / len(sizes)),
        "max_side": max_side, "batch": batch_size, "seconds": round(elapsed, 1),
        "folder": str(folder), "cpu": platform.processor() or platform.machine(),
        "visible_cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "tf": tf.__version__,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", default=next((str(p) for p in SAMPLES if p.is_dir()), None))
    parser.add_argument("--cores", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-side", type=int, default=0,
                        help="only images whose longer side is at most this (0: all)")
    parser.add_argument("--stage", choices=("train", "decode"), nargs="+", default=["train"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = measure(args.folder, args.cores[0], args.seconds, args.batch_size,
                         args.max_side, args.stage[0])
        print(json.dumps(result))
        return result
    results = []
    for stage in args.stage:
        for cores in args.cores:
            result = run_child(args.folder, cores, args.seconds, args.batch_size,
                               args.max_side, stage)
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


def run_child(folder, cores, seconds, batch_size, max_side, stage, env=None, timeout=None):
    """`measure` in a fresh process pinned to ``cores`` CPUs; returns its result dict.

    ``env`` is the child's environment (default: this process's). Raises
    RuntimeError with the child's last output lines when it fails.
    """
    command = [sys.executable, __file__, "--child", "--folder", str(folder),
               "--cores", str(cores), "--seconds", str(seconds),
               "--batch-size", str(batch_size), "--max-side", str(max_side), "--stage", stage]
    env = dict(os.environ if env is None else env, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"input pipeline child failed ({out.returncode}): "
                           + " | ".join(out.stderr.strip().splitlines()[-3:])[-500:])
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
