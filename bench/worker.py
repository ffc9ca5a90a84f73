"""A benchmark worker process: ``python -m bench.worker [--cpu-devices N] [--threads T]``.

The runner (`bench.workers`) keeps one worker per kind of process (plain TensorFlow,
TensorFlow with the CPU split into logical devices, PyTorch, PyTorch for
``torch.compile``, ONNX Runtime) and talks to it in JSON lines: a request on stdin, one
answer on the original stdout (everything else the process prints goes to stderr).
Requests (``op``):

* ``setup``: builds the side ``factory`` (``"module:Class"``) with ``spec`` under the
  name ``side`` and runs its warm-up; answers ``info`` (the side's own conditions:
  threads, oneDNN, versions) and ``setup_s``.
* ``run``: times the side for about ``seconds`` (at least one iteration); answers
  ``items``, ``seconds``, ``cpu_seconds``, ``iterations`` (and ``latencies_ms`` for
  sides that measure them).
* ``outputs``: the side's outputs on its fixed check input (for agreement checks).
* ``drop``: forgets the side (frees its memory).
* ``call``: runs the function ``fn`` (``"module:function"``) with ``kwargs``.
* ``quit``.

Every answer has ``ok``; a failed request answers ``ok: false`` and ``error`` and the
worker goes on. Idle workers block on stdin and use no CPU.
"""

import argparse
import gc
import importlib
import json
import os
import sys
import time
import traceback


def resolve(name):
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


class Side:
    """One thing being timed. Subclasses build in ``__init__`` and define `step` (one
    iteration, returning the items it processed: images, matrix products)."""

    warmup_steps = 2

    def step(self):
        raise NotImplementedError

    def warmup(self):
        for _ in range(self.warmup_steps):
            self.step()

    def info(self):
        return {}

    def outputs(self):
        raise NotImplementedError(f"{type(self).__name__} has no check outputs")

    def run(self, seconds):
        """Iterates `step` for at least ``seconds`` (and at least once)."""
        items, iterations = 0, 0
        start, cpu = time.perf_counter(), time.process_time()
        while True:
            items += self.step()
            iterations += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        return {"items": items, "iterations": iterations, "seconds": elapsed,
                "cpu_seconds": time.process_time() - cpu}


def _handle(message, sides):
    op = message["op"]
    if op == "setup":
        start = time.perf_counter()
        side = resolve(message["factory"])(**message.get("spec", {}))
        side.warmup()
        sides[message["side"]] = side
        return {"info": side.info(), "setup_s": round(time.perf_counter() - start, 2)}
    if op == "run":
        return sides[message["side"]].run(float(message["seconds"]))
    if op == "outputs":
        return {"outputs": sides[message["side"]].outputs()}
    if op == "drop":
        sides.pop(message["side"], None)
        gc.collect()
        return {}
    if op == "call":
        return {"result": resolve(message["fn"])(**message.get("kwargs", {}))}
    if op == "quit":
        return {}
    raise ValueError(f"unknown op {op!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="benchmark worker (started by bench.run)")
    parser.add_argument("--cpu-devices", type=int, help="split the CPU into N logical devices")
    parser.add_argument("--threads", type=int, help="PyTorch / ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # C libraries and print() write to stderr: stdout carries answers only
    sys.stdout = sys.stderr
    if args.threads:
        os.environ["BENCH_THREADS"] = str(args.threads)
    if args.cpu_devices:
        from keras_alexnet.training import distribute

        distribute.configure_cpu_devices(args.cpu_devices)  # before any TensorFlow op
    sides = {}
    for line in sys.stdin:
        message = json.loads(line)
        try:
            answer = {"ok": True, **_handle(message, sides)}
        except Exception as error:  # the runner records it as the side's failure
            traceback.print_exc()
            text = str(error).strip().splitlines()
            answer = {"ok": False,
                      "error": f"{type(error).__name__}: {(text[0] if text else '')[:300]}"}
        answers.write(json.dumps(answer) + "\n")
        if message["op"] == "quit":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
