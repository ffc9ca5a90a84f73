"""Where a training (or inference) step's time goes: TensorFlow's profiler, op by op.

    python -m bench.profile_step --out /tmp/profile            # the paper model, batch 64
    python -m bench.profile_step --strategy towers --cpu-devices 2 --out /tmp/profile-towers
    python -m bench.profile_step --mode infer --out /tmp/profile-infer

It builds the step the runner times (`bench.train_throughput.build_step`: the loop's own
step, SGD with momentum, the paper's L2, top-1/top-5 sums; or, with ``--mode infer``, the
model's forward pass in a ``tf.function``), warms it up, records ``--steps`` steps with
``tf.profiler.experimental`` and reads the trace (the ``.xplane.pb`` file: every op
TensorFlow's executor ran, on which thread, for how long). It writes ``profile.md`` and
``profile.json`` under ``--out`` (the trace stays there too, for TensorBoard's profile
plugin) and prints the tables:

* by kind of work: convolutions forward, their gradients with respect to the inputs and to
  the weights, dense layers forward and backward (each with its FLOP from the layer shapes,
  `bench.flops`, and the GFLOP/s it achieved), and the rest (LRN, pooling, ReLU, dropout,
  the optimizer's updates, the loss, the metrics, copies), each as a share of the op time;
* by layer and kind: where the FLOP-bearing kernels fall short of the matrix-multiply rate;
* the slowest single ops.

Op time is summed over TensorFlow's inter-op threads: two ops running at once (the towers
of one layer) both count, so op time can exceed the step's wall time. FLOP per kind: a
convolution's forward pass, input gradient and weight gradient each cost the forward
multiply-adds (conv1's input gradient is never computed), a dense layer's backward pass
twice its forward.
"""

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import re
import statistics
import sys
import time

if not __package__:  # run as a script: the repository root, for `bench`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from training import fail, prefer_onednn

LAYER = re.compile(r"^(conv\d|fc\d|norm\d|pool\d|drop\d)(_[ab])?(_\d+)?$")
FLOP_KINDS = ("conv forward", "conv grad inputs", "conv grad weights", "dense forward",
              "dense backward")


def layer_of(path):
    """``(base, layer)`` of an op's scope path: ``("conv1", "conv1_a")`` for
    ``alexnet_1/conv1_a_1/Relu``, ``(None, None)`` outside the model's layers."""
    for part in path.split("/"):
        match = LAYER.match(part)
        if match:
            return match.group(1), match.group(1) + (match.group(2) or "")
    return None, None


def kind_of(name, op_type):
    """The kind of work of one op event ``name`` (``scope/.../op``) of type ``op_type``."""
    gradient = name.startswith("gradient_tape/")
    base, _ = layer_of(name)
    if "Conv2DBackpropFilter" in op_type:
        return "conv grad weights"
    if "Conv2DBackpropInput" in op_type:
        return "conv grad inputs"
    if "Conv2D" in op_type:
        return "conv forward"
    if "MatMul" in op_type and base and base.startswith("fc"):
        return "dense backward" if gradient else "dense forward"
    if op_type.startswith("LRN") or (base and base.startswith("norm")):
        return "LRN"
    if "Pool" in op_type:
        return "max pooling"
    if "Relu" in op_type:
        return "ReLU"
    if base and base.startswith("drop"):
        return "dropout"
    lowered = name.lower()
    if op_type == "Mul" and re.fullmatch(r"gradient_tape/Mul(_\d+)?", name):
        return "weight decay gradient"
    if "sgd" in lowered or "momentum" in lowered or "assign" in op_type.lower() or \
            op_type.startswith("ResourceApply"):
        return "optimizer update"
    if base:  # bias adds, reshapes and the like inside a layer
        return f"other in layers ({op_type})"
    return f"other ({op_type})"


def read_trace(logdir):
    """The op events of the newest ``.xplane.pb`` under ``logdir``: a list of
    ``(thread, name, op_type, start_ps, duration_ps)``."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = sorted(pathlib.Path(logdir).rglob("*.xplane.pb"), key=os.path.getmtime)
    if not files:
        raise RuntimeError(f"the profiler wrote no trace under {logdir}")
    space = xplane_pb2.XSpace()
    space.ParseFromString(files[-1].read_bytes())
    events = []
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_"):  # the executor's op threads (tf_Compute, ...)
                continue
            for event in line.events:
                full = plane.event_metadata[event.metadata_id].name
                if ":" not in full or full.startswith(("Iterator", "ExecutorState")):
                    continue
                name, op_type = full.rsplit(":", 1)
                events.append((line.name, name, op_type,
                               line.timestamp_ns * 1000 + event.offset_ps, event.duration_ps))
    return events


def flop_per_kind(model, batch):
    """``{(layer, kind): FLOP per step}`` of the FLOP-bearing kinds (`FLOP_KINDS`)."""
    from bench import flops

    out = {}
    macs = flops.forward_macs(model)
    for layer, value in macs.items():
        flop = 2 * value * batch
        if layer.startswith("conv"):
            out[(layer, "conv forward")] = flop
            out[(layer, "conv grad weights")] = flop
            if not layer.startswith("conv1"):  # the images need no gradient
                out[(layer, "conv grad inputs")] = flop
        else:
            out[(layer, "dense forward")] = flop
            out[(layer, "dense backward")] = 2 * flop
    return out


def summarise(events, steps, flop, mode):
    """The tables of `main` from the trace's op events, per step."""
    if mode == "infer":
        flop = {k: v for k, v in flop.items() if k[1] in ("conv forward", "dense forward")}
    total_ps = sum(e[4] for e in events)
    by_kind, by_layer, by_op = (collections.Counter() for _ in range(3))
    for _, name, op_type, _, duration in events:
        kind = kind_of(name, op_type)
        by_kind[kind] += duration
        _, layer = layer_of(name)
        if kind in FLOP_KINDS:
            # fc layers are not split by tower; a tower's conv is its own layer
            by_layer[(layer, kind)] += duration
        by_op[f"{name}:{op_type}"] += duration
    per_step_ms = {k: v / 1e9 / steps for k, v in by_kind.items()}
    kind_flop = collections.Counter()
    for (layer, kind), value in flop.items():
        kind_flop[kind] += value
    kinds = [{"kind": kind, "ms_per_step": round(ms, 4),
              "share_of_op_time": round(by_kind[kind] / total_ps, 4),
              "gflop_per_step": round(kind_flop[kind] / 1e9, 3) if kind in kind_flop else None,
              "gflop_per_s": round(kind_flop[kind] / 1e9 / (ms / 1e3), 1)
              if kind in kind_flop and ms else None}
             for kind, ms in sorted(per_step_ms.items(), key=lambda kv: -kv[1])]
    layers = []
    for (layer, kind), value in sorted(flop.items()):
        ms = by_layer[(layer, kind)] / 1e9 / steps
        layers.append({"layer": layer, "kind": kind, "ms_per_step": round(ms, 4),
                       "gflop_per_step": round(value / 1e9, 6),
                       "gflop_per_s": round(value / 1e9 / (ms / 1e3), 1) if ms else None})
    top = [{"op": op[:120], "ms_per_step": round(ps / 1e9 / steps, 2),
            "share_of_op_time": round(ps / total_ps, 4)} for op, ps in by_op.most_common(15)]
    return {"op_ms_per_step": round(total_ps / 1e9 / steps, 1), "kinds": kinds,
            "layers": layers, "top_ops": top,
            "flop_kernels_share": round(sum(by_kind[k] for k in FLOP_KINDS) / total_ps, 4),
            "model_gflop_per_step": round(sum(flop.values()) / 1e9, 3)}


def markdown(result):
    s = result["summary"]
    lines = [
        f"# Step profile: {result['mode']}, {result['strategy']}, {result['policy']}, "
        f"batch {result['batch']}, {result['image_size']}x{result['image_size']}, "
        f"width {result['width']}",
        "",
        f"- TensorFlow {result['tf']}, oneDNN (TF_ENABLE_ONEDNN_OPTS) "
        f"{result['onednn']}, {result['cores']} cores, inter-op threads "
        f"{result['inter_op_threads']}; {result['steps']} profiled steps "
        f"after {result['warmup']} warm-up steps",
        f"- step wall time: {result['step_ms_median']} ms median unprofiled "
        f"({result['img_per_s']} img/s, {result['gflop_per_s']} GFLOP/s of the layers' "
        f"{s['model_gflop_per_step']} GFLOP per step), {result['profiled_step_ms']} ms "
        "profiled",
        f"- op time per step (summed over inter-op threads): {s['op_ms_per_step']} ms; "
        f"the FLOP-bearing kernels (convolutions, matrix products) take "
        f"{100 * s['flop_kernels_share']:.1f} % of it",
        "",
        "| kind of work | ms per step | share of op time | GFLOP per step | GFLOP/s |",
        "|---|---|---|---|---|",
    ]
    for k in s["kinds"]:
        lines.append(f"| {k['kind']} | {k['ms_per_step']:.2f} | "
                     f"{100 * k['share_of_op_time']:.1f} % "
                     f"| {k['gflop_per_step'] if k['gflop_per_step'] is not None else '-'} | "
                     f"{k['gflop_per_s'] if k['gflop_per_s'] is not None else '-'} |")
    lines += ["", "| layer | kind | ms per step | GFLOP per step | GFLOP/s |",
              "|---|---|---|---|---|"]
    for r in s["layers"]:
        lines.append(f"| {r['layer']} | {r['kind']} | {r['ms_per_step']:.2f} | "
                     f"{r['gflop_per_step']:.3g} | {r['gflop_per_s'] or '-'} |")
    lines += ["", "| slowest ops | ms per step | share of op time |", "|---|---|---|"]
    for r in s["top_ops"]:
        lines.append(f"| `{r['op']}` | {r['ms_per_step']} | "
                     f"{100 * r['share_of_op_time']:.1f} % |")
    return "\n".join(lines) + "\n"


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bench.profile_step",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for profile.md/.json and the trace")
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--strategy", choices=("default", "towers", "mirrored"),
                        default="default")
    parser.add_argument("--cpu-devices", type=int, default=None,
                        help="split the CPU into this many logical devices (towers, mirrored)")
    parser.add_argument("--policy", choices=("float32", "mixed_bfloat16"), default="float32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=227)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timed", type=int, default=5, help="unprofiled steps timed")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--inter-op-threads", type=int, default=1,
                        help="TensorFlow's inter-op threads (default 1: one op at a time, so "
                             "that each op's time is its own and not time spent waiting for "
                             "the intra-op threads another op holds; 0: TensorFlow's default)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.inter_op_threads < 0:
        fail(f"--inter-op-threads must be 0 or more. Received: {args.inter_op_threads}")
    for name in ("batch", "warmup", "timed", "steps", "num_classes"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be positive. "
                 f"Received: {getattr(args, name)}")
    if args.image_size < 67:
        fail(f"--image-size must be at least 67. Received: {args.image_size}")
    if args.strategy != "default" and (args.cpu_devices or 0) < 2:
        fail(f"--strategy {args.strategy} needs --cpu-devices 2 or more.")
    if args.mode == "infer" and args.strategy != "default":
        fail("--mode infer profiles the default strategy only.")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefer_onednn()

    import tensorflow as tf

    if args.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)

    from bench.inputs import pixels
    from bench.train_throughput import build_step
    from keras_alexnet.files import atomic_write
    from keras_alexnet.training import distribute, loop
    from keras_alexnet.training.config import PRESETS

    config = dataclasses.replace(
        PRESETS["paper"], image_size=args.image_size, width=args.width, jit_compile=False,
        mixed_precision=None if args.policy == "float32" else args.policy)
    if args.mode == "train":
        strategy, towers = distribute.make_strategy(args.strategy, args.cpu_devices)
        run = build_step(config, args.batch, args.num_classes, strategy, towers)
        model = run.model
    else:
        with loop.precision_policy(config.mixed_precision):
            model = loop.build_model(config, args.num_classes)
        x = tf.constant(pixels(args.batch, args.image_size))
        forward = tf.function(lambda: model(x, training=False))

        def run():
            return forward().numpy()

    for _ in range(args.warmup):
        run()
    times = []
    for _ in range(args.timed):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    logdir = out / "trace"
    tf.profiler.experimental.start(str(logdir))
    begin = time.perf_counter()
    for _ in range(args.steps):
        run()
    profiled = (time.perf_counter() - begin) / args.steps
    tf.profiler.experimental.stop()

    flop = flop_per_kind(model, args.batch)
    summary = summarise(read_trace(logdir), args.steps, flop, args.mode)
    step_s = statistics.median(times)
    from tensorflow.python.util import _pywrap_util_port

    result = {
        "mode": args.mode, "strategy": args.strategy, "policy": args.policy,
        "batch": args.batch, "image_size": args.image_size, "width": args.width,
        "tf": tf.__version__, "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "onednn_effective": bool(_pywrap_util_port.IsMklEnabled()), "cores": os.cpu_count(),
        "inter_op_threads": args.inter_op_threads or "default",
        "warmup": args.warmup, "timed": args.timed, "steps": args.steps,
        "step_ms_median": round(1000 * step_s, 1), "profiled_step_ms": round(1000 * profiled, 1),
        "img_per_s": round(args.batch / step_s, 1),
        "gflop_per_s": round(summary["model_gflop_per_step"] / step_s, 1), "summary": summary,
    }
    atomic_write(out / "profile.json", json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    atomic_write(out / "profile.md", text)
    print(text)
    return result


if __name__ == "__main__":
    main()
