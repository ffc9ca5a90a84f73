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
JSON line carrying its conditions (device, versions, batch, steps).
"""

import argparse
import dataclasses
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from keras_alexnet.training import loop
from keras_alexnet.training.config import PRESETS


def device_name():
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return details.get("device_name", "GPU")
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def measure(config, batch, warmup, steps, num_classes=1000):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, config.image_size, config.image_size, 3)).astype("float32")
    y = rng.integers(0, num_classes, size=batch)
    batch_data = (tf.constant(x), tf.constant(y))
    strategy = tf.distribute.get_strategy()
    with loop.precision_policy(config.mixed_precision):
        model = loop.build_model(config, num_classes)
        optimizer = loop.build_optimizer(config)
        optimizer.build(model.trainable_variables)
        step = loop.make_train_step(model, optimizer, strategy, batch, config.jit_compile)
        for _ in range(warmup):  # trace and compile
            sums = step(batch_data)
        sums.numpy()
        start = time.perf_counter()
        for _ in range(steps):
            sums = step(batch_data)
        loss = float(sums.numpy()[0] / batch)  # waits for the last step
        seconds = time.perf_counter() - start
    return batch * steps / seconds, loss


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
