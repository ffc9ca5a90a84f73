"""Training throughput (images/s) of the full AlexNet on one device, synthetic inputs.

    python bench/train_throughput.py                       # on a GPU: the BENCHMARKS.md table
    python bench/train_throughput.py --image-size 67 --width 0.125 \\
        --batch-sizes 16 --warmup 1 --steps 3             # a quick check on a CPU

For each batch size it times the training loop's own step
(`keras_alexnet.training.loop.make_train_step`: SGD with momentum, the paper's L2 weight
decay, top-1/top-5 sums) in three modes: fp32,
mixed precision (``mixed_float16`` with loss scaling on a GPU, ``mixed_bfloat16`` on a
CPU, or ``--policy``), and mixed precision with XLA (``jit_compile=True``). Inputs
are one random batch repeated, so the input pipeline costs nothing. Each result is a
JSON line carrying its conditions (device, versions, batch, steps). `build_step` is also
what the runner (``python -m bench``, `bench.compute.train_section`) times, under every
strategy.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if not __package__:  # run as a script: the repository root, for `bench.inputs`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import keras
import tensorflow as tf

from bench.inputs import training_batch
from keras_alexnet.training import loop
from keras_alexnet.training.config import PRESETS


def device_name():
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return details.get("device_name", "GPU")
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def build_step(config, global_batch, num_classes=1000, strategy=None, tower_devices=None):
    """A zero-argument callable running one training step of the loop's own step
    (`loop.make_train_step`) on one random batch, repeated; it returns the summed
    ``[loss, top1, top5, count]`` as a NumPy array (so the step has finished).

    ``global_batch`` is split over ``strategy``'s replicas (default: one device);
    ``tower_devices`` places the towers (the ``towers`` strategy).
    """
    strategy = strategy or tf.distribute.get_strategy()
    x, y = training_batch(global_batch, config.image_size, num_classes)
    data = tf.data.Dataset.from_tensors((tf.constant(x), tf.constant(y))).repeat()
    batches = iter(strategy.experimental_distribute_dataset(data))
    with loop.precision_policy(config.mixed_precision):
        with strategy.scope():
            model = loop.build_model(config, num_classes, tower_devices)
            optimizer = loop.build_optimizer(config)
            optimizer.build(model.trainable_variables)
        step = loop.make_train_step(model, optimizer, strategy, global_batch, config.jit_compile)

    def run():
        with loop.precision_policy(config.mixed_precision):  # traced under the policy too
            return step(next(batches)).numpy()

    run.model = model
    return run


def measure(config, batch, warmup, steps, num_classes=1000):
    """``(images/s, final loss)`` of `build_step` on one device."""
    step = build_step(config, batch, num_classes)
    for _ in range(warmup):  # trace and compile
        step()
    start = time.perf_counter()
    for _ in range(steps):
        sums = step()
    seconds = time.perf_counter() - start
    return batch * steps / seconds, float(sums[0] / batch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--modes", nargs="+", default=["fp32", "mixed", "mixed_xla"],
                        choices=["fp32", "mixed", "mixed_xla", "fp32_xla"])
    parser.add_argument("--policy", choices=["mixed_float16", "mixed_bfloat16"],
                        help="mixed-precision policy (default: float16 on GPU, bfloat16 on CPU)")
    parser.add_argument("--image-size", type=int, default=227)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)

    policy = args.policy or (
        "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16")
    base = dataclasses.replace(PRESETS["paper"], image_size=args.image_size, width=args.width)
    modes = {
        "fp32": dict(mixed_precision=None, jit_compile=False),
        "fp32_xla": dict(mixed_precision=None, jit_compile=True),
        "mixed": dict(mixed_precision=policy, jit_compile=False),
        "mixed_xla": dict(mixed_precision=policy, jit_compile=True),
    }
    results = []
    for batch in args.batch_sizes:
        for mode in args.modes:
            config = dataclasses.replace(base, batch_size=batch, **modes[mode])
            ips, loss = measure(config, batch, args.warmup, args.steps)
            result = {"device": device_name(), "tf": tf.__version__,
                      "keras": keras.__version__, "mode": mode,
                      "policy": config.mixed_precision or "float32", "xla": config.jit_compile,
                      "batch": batch, "image_size": args.image_size, "width": args.width,
                      "warmup": args.warmup, "steps": args.steps, "img_per_s": round(ips, 1),
                      "final_loss": round(loss, 3)}
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


if __name__ == "__main__":
    main()
