"""TensorFlow sides of the benchmark (run inside `bench.worker` processes).

* `prepare`: the one model every section measures: built as the training loop builds
  it, its FLOPs from its layer shapes (`bench.flops`), exported with the real
  `export_saved_model` (pixels and encoded-image signatures, the warm-up file), its
  weights in the PyTorch layout (`bench.torch_alexnet`) and its ONNX conversion
  (`bench.onnx_model`).
* `Matmul`: a large ``tf.matmul``, the machine's matrix-multiply rate (the limit).
* `KerasTrain`: the training loop's step (`bench.train_throughput.build_step`) under the
  default strategy, ``mirrored`` over 2 logical CPUs or the paper's ``towers``.
* `SavedModelInfer`: one signature of the exported SavedModel at one batch size.
* `SavedModelThreads`: ``serving_default`` called from several threads at once, the
  in-process baseline of the serving section.
"""

import dataclasses
import os
import pathlib
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from bench.bf16_agreement import compare
from bench.inputs import CHECK_BATCH, CHECK_SEED, PHOTOS, photos, pixels
from bench.worker import Side


def onednn_enabled():
    """Whether this process runs TensorFlow's oneDNN kernels (the env var and the CPU)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def tf_info():
    return {"onednn_effective": onednn_enabled(),
            "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()
            or f"default ({os.cpu_count()})",
            "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads()
            or "default"}


def train_config(image_size, width, policy=None):
    """The paper preset at the run's size: what every Keras side (and `prepare`) builds."""
    from keras_alexnet.training.config import PRESETS

    return dataclasses.replace(PRESETS["paper"], image_size=image_size, width=width,
                               mixed_precision=None if policy == "float32" else policy,
                               jit_compile=False)


def prepare(workdir, image_size, width, num_classes, inference_sides=True):
    """Builds, counts, exports and converts the benchmark's model; returns its facts.

    Writes ``<workdir>/models/alexnet/1`` (SavedModel) and ``torch_state.npz``; with
    ``inference_sides`` (only the infer section uses them) also the bfloat16 copy
    ``models/alexnet-bf16/1`` with its top-5 agreement, and ``model.onnx`` (or records
    why the conversion failed).
    """
    from bench import flops, onnx_model, torch_alexnet
    from keras_alexnet.export import export_saved_model
    from keras_alexnet.training import loop

    workdir = pathlib.Path(workdir)
    config = train_config(image_size, width)
    model = loop.build_model(config, num_classes)
    class_names = [f"class_{i}" for i in range(num_classes)]
    start = time.perf_counter()
    version = export_saved_model(model, workdir / "models" / "alexnet", class_names)
    export_s = time.perf_counter() - start
    np.savez(workdir / "torch_state.npz", **torch_alexnet.state_from_keras(model))
    facts = {
        "version_dir": str(version), "base_path": str(version.parent),
        "export_s": round(export_s, 1), "bf16_version_dir": None, "bf16_export_s": None,
        "bf16_top5": None,
        "torch_state": str(workdir / "torch_state.npz"),
        "arch": torch_alexnet.arch_from_keras(model), "parameters": int(model.count_params()),
        "forward_flop": flops.forward_flops(model), "train_flop": flops.train_flops(model),
        "train_factor": flops.TRAIN_FACTOR, "onnx": None, "onnx_error": None,
        "bf16_error": None,
        "onnx_source": onnx_model.SOURCE,
    }
    if inference_sides:
        try:
            start = time.perf_counter()
            bf16_version = export_saved_model(
                loop.inference_copy(model, "bfloat16"),
                workdir / "models" / "alexnet-bf16", class_names)
            facts["bf16_export_s"] = round(time.perf_counter() - start, 1)
            facts["bf16_version_dir"] = str(bf16_version)
            facts["bf16_top5"] = top5_agreement(str(version), str(bf16_version), image_size)
        except Exception as error:  # recorded: the bfloat16 sides report it
            facts["bf16_error"] = _first_line(error)
        try:
            facts["onnx"] = str(onnx_model.convert(model, workdir / "model.onnx"))
        except Exception as error:  # recorded: the ONNX Runtime sides report it
            facts["onnx_error"] = _first_line(error)
    del model
    keras.backend.clear_session(free_memory=True)  # this worker's later sides build their own
    return facts


def _first_line(error):
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def top5_agreement(reference, other, image_size):
    """How often ``other`` SavedModel's top-5 on the real photos (`bench.inputs.PHOTOS`)
    is ``reference``'s, both through ``serving_pixels`` on the photos preprocessed by
    `keras_alexnet.preprocessing.eval_from_bytes` (the one evaluation preprocessing) at
    ``image_size``: ``{"photos", "same_top5" (the same five
    classes, any order), "same_order" (in the same order), "same_top1", "min_gap"}``;
    ``min_gap`` is the smallest gap between the reference's 5th and 6th probability (an
    untrained model's are tiny, so its top-5 is fragile under any rounding)."""
    from keras_alexnet.preprocessing import eval_from_bytes

    pixels_of_photos = tf.stack([eval_from_bytes(b, image_size)
                                 for b in photos(len(PHOTOS))])
    first, second = [load(path).signatures["serving_pixels"](pixels=pixels_of_photos)[
        "probabilities"].numpy() for path in (reference, other)]
    found = compare(first, second)
    return {"photos": found["images"], "same_top5": found["same_topk_set"],
            "same_order": found["same_topk_order"], "same_top1": found["same_top1"],
            "min_gap": found["min_gap_topk"]}


class Matmul(Side):
    """``n x n`` by ``n x n`` ``tf.matmul`` in ``dtype``; items are matrix products."""

    def __init__(self, n, dtype="float32"):
        rng = np.random.default_rng(0)
        self.a = tf.cast(tf.constant(rng.normal(size=(n, n)).astype(np.float32)), dtype)
        self.b = tf.cast(tf.constant(rng.normal(size=(n, n)).astype(np.float32)), dtype)

    def step(self):
        c = tf.matmul(self.a, self.b)
        c[0, 0].numpy()  # eager CPU ops are synchronous; this makes sure
        return 1

    def info(self):
        return tf_info()


class KerasTrain(Side):
    """One training step of the loop (SGD with momentum, the paper's L2, top-1/top-5
    sums) on a ``batch`` (global) of random pixels; items are images."""

    warmup_steps = 3

    def __init__(self, strategy, policy, batch, image_size, width, num_classes):
        from bench.train_throughput import build_step
        from keras_alexnet.training import distribute

        config = train_config(image_size, width, policy)
        strategy_object, towers = distribute.make_strategy(strategy)
        self.batch, self.strategy = batch, strategy_object
        self._step = build_step(config, batch, num_classes, strategy_object, towers)

    def step(self):
        self._step()
        return self.batch

    def info(self):
        return {**tf_info(), "replicas": self.strategy.num_replicas_in_sync}


_LOADED = {}


def load(path):
    """A SavedModel loaded once per process."""
    if path not in _LOADED:
        _LOADED[path] = tf.saved_model.load(path)
    return _LOADED[path]


class SavedModelInfer(Side):
    """The export's ``serving_pixels`` (random preprocessed pixels) or ``serving_default``
    (JPEG photos) at ``batch``; items are images."""

    warmup_steps = 3

    def __init__(self, path, signature, batch, image_size):
        self.fn = load(path).signatures[signature]
        self.signature, self.batch, self.image_size = signature, batch, image_size
        if signature == "serving_pixels":
            self.inputs = {"pixels": tf.constant(pixels(batch, image_size))}
        else:
            self.inputs = {"images": tf.constant(photos(batch))}

    def step(self):
        out = self.fn(**self.inputs)
        out["scores"].numpy()
        return self.batch

    def outputs(self):
        if self.signature != "serving_pixels":
            return None
        check = tf.constant(pixels(CHECK_BATCH, self.image_size, CHECK_SEED))
        return self.fn(pixels=check)["probabilities"].numpy().tolist()

    def info(self):
        return tf_info()


class SavedModelThreads(Side):
    """``serving_default`` on ``batch`` JPEG photos from ``clients`` threads at once, each
    calling as fast as it can (the in-process twin of the serving load); items are
    images, with each call's latency."""

    warmup_steps = 1

    def __init__(self, path, batch, clients):
        self.fn = load(path).signatures["serving_default"]
        self.batch, self.clients = batch, clients
        self.images = tf.constant(photos(batch))

    def step(self):
        {k: v.numpy() for k, v in self.fn(images=self.images).items()}
        return self.batch

    def run(self, seconds):
        latencies, lock = [], threading.Lock()
        start, cpu = time.perf_counter(), time.process_time()
        deadline = start + seconds

        def client():
            mine = []
            while True:
                begin = time.perf_counter()
                self.step()
                mine.append(1000 * (time.perf_counter() - begin))
                if time.perf_counter() >= deadline:
                    break
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        return {"items": self.batch * len(latencies), "iterations": len(latencies),
                "seconds": elapsed, "cpu_seconds": time.process_time() - cpu,
                "latencies_ms": latencies}

    def info(self):
        return tf_info()
