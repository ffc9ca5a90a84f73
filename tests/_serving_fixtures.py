"""Helpers for the serving tests: tiny exported models, a half_plus_two SavedModel, free
ports, and a `serving.server` subprocess that is always killed."""

import atexit
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
IMAGES = sorted((REPO / "tests" / "data" / "images").glob("*.[jJ][pP]*[gG]"))
CLASS_NAMES = [f"class_{i}" for i in range(6)]
TINY = dict(num_classes=len(CLASS_NAMES), image_size=67, width=0.125)
_TMP = tempfile.mkdtemp(prefix="serving-tests-")
atexit.register(shutil.rmtree, _TMP, True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_tiny(base_dir, version=None, seed=0):
    """Exports a tiny keras_alexnet model (67x67, 6 classes) as `<base_dir>/<N>/`."""
    import keras_alexnet
    from keras_alexnet.export import export_saved_model

    model = keras_alexnet.alexnet(seed=seed, **TINY)
    return export_saved_model(model, base_dir, CLASS_NAMES, version=version)


@functools.lru_cache(maxsize=None)
def tiny_version(seed=0):
    """A cached export (one per seed) to copy into test base paths."""
    return export_tiny(Path(_TMP) / f"tiny-{seed}", version=1, seed=seed)


def copy_version(source, base_dir, version):
    """Copies a version directory in with TF Serving's temp-then-rename discipline."""
    base_dir = Path(base_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    staging = base_dir / f".tmp-{version}"
    shutil.copytree(source, staging)
    os.rename(staging, base_dir / str(version))
    return base_dir / str(version)


def write_half_plus_two(version_dir):
    """Upstream's `half_plus_two` (y = 0.5 x + 2) with predict, classify and regress
    signatures, like `saved_model_half_plus_two_cpu`."""
    import tensorflow as tf

    class HalfPlusTwo(tf.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = tf.Variable(0.5), tf.Variable(2.0)

        @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="x")])
        def predict(self, x):
            return {"y": self.a * x + self.b}

        def _from_examples(self, inputs):
            x = tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([1], tf.float32)})["x"]
            return self.a * x + self.b

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def classify(self, inputs):
            return {"scores": self._from_examples(inputs)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def regress(self, inputs):
            return {"outputs": self._from_examples(inputs)}

    module = HalfPlusTwo()
    tf.saved_model.save(module, str(version_dir), signatures={
        "serving_default": module.predict,
        "classify_x_to_y": module.classify,
        "regress_x_to_y": module.regress,
    })
    return version_dir


class ServerProcess:
    """`python -m serving.server` on loopback with the given flags.

    `start()` waits (bounded) until the server answers, like upstream's `WaitForServerReady`:
    a Predict on `intentionally_missing_model` whose error mentions "Servable".
    """

    def __init__(self, workdir, *flags, rest=False, ready_timeout=120):
        self.port = free_port()
        self.rest_port = free_port() if rest else 0
        self.log_path = Path(workdir) / f"server-{self.port}.log"
        self.flags = [f"--port={self.port}", f"--rest_api_port={self.rest_port}",
                      "--bind_address=127.0.0.1", *flags]
        self.ready_timeout = ready_timeout
        self.process = None
        self.address = f"127.0.0.1:{self.port}"

    def start(self, credentials=None):
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        self._log = open(self.log_path, "wb")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO),
                   CUDA_VISIBLE_DEVICES="-1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.server", *self.flags], cwd=REPO, env=env,
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "intentionally_missing_model"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}:\n{self.log()}")
            channel = (grpc.secure_channel(self.address, credentials[0], credentials[1])
                       if credentials else grpc.insecure_channel(self.address))
            try:
                prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                    request, timeout=2)
            except grpc.RpcError as e:
                if "Servable" in (e.details() or ""):
                    return self
                time.sleep(0.5)
            finally:
                channel.close()
        self.kill()
        raise RuntimeError(f"server not ready in {self.ready_timeout}s:\n{self.log()}")

    def log(self):
        return self.log_path.read_text(errors="replace")[-5000:]

    def terminate(self, timeout=60):
        """SIGTERM, then wait; returns the exit code (killing it past `timeout`)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if getattr(self, "_log", None):
            self._log.close()
