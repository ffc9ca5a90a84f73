"""Warm-up at export: assets.extra/tf_serving_warmup_requests, in TF Serving's format,
replayed by the embedded server before a version becomes AVAILABLE."""

import json

import numpy as np
import pytest
import tensorflow as tf
from _serving_fixtures import CLASS_NAMES, export_tiny
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from keras_alexnet import export, warmup
from serving._inference import Runner
from serving._manager import ModelManager
from serving.server import make_warmup

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    """A tiny export of this module's own (the shared cached one lives in another
    module's temporary folder)."""
    return export_tiny(tmp_path_factory.mktemp("warmup") / "alexnet", version=1)


def _records(version_dir):
    path = version_dir / "assets.extra" / warmup.WARMUP_FILE
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(str(path))]


def test_every_signature_has_warmup_requests_that_the_savedmodel_answers(version):
    metadata = json.loads((version / "assets.extra" / export.METADATA_FILE).read_text())
    logs = _records(version)
    signatures = metadata["signatures"]
    assert metadata["warmup"] == {"file": "assets.extra/tf_serving_warmup_requests",
                                  "records": len(logs), "batch_sizes": [1, 8]}
    assert len(logs) == len(signatures) * 2 <= warmup.MAX_RECORDS
    seen = set()
    loaded = tf.saved_model.load(str(version))
    for log in logs:
        kind = log.WhichOneof("log_type")
        request = getattr(log, kind).request
        name = request.model_spec.signature_name
        if kind == "classify_log":
            examples = request.input.example_list.examples
            batch = len(examples)
            out = loaded.signatures[name](
                inputs=tf.constant([e.SerializeToString() for e in examples]))
            assert out["classes"].shape == (batch, 5)
        else:
            assert kind == "predict_log"
            inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
            batch = int(next(iter(inputs.values())).shape[0])
            out = loaded.signatures[name](**inputs)
            assert all(int(t.shape[0]) == batch for t in out.values())
            if name == "serving_default":  # the export's own JPEG decodes and classifies
                labels = {x.decode() for x in out["labels"].numpy().ravel()}
                assert labels <= set(CLASS_NAMES)
        seen.add((name, batch))
    assert seen == {(name, b) for name in signatures for b in (1, 8)}
    # A real JPEG, not the crop size, so decode, resize and crop all run.
    image = tf.io.decode_jpeg(warmup.sample_jpeg()).numpy()
    assert image.shape == (200, 300, 3) and image.std() > 20


class CountingRunner(Runner):
    """The server's own runner, counting the calls the warm-up makes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def predict(self, manager, request, **kwargs):
        self.calls.append(("predict", request.model_spec.signature_name))
        return super().predict(manager, request, **kwargs)

    def classify(self, manager, request, **kwargs):
        self.calls.append(("classify", request.model_spec.signature_name))
        return super().classify(manager, request, **kwargs)


def test_the_embedded_server_replays_the_export_warmup_before_available(version):
    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.config.add(name="alexnet", base_path=str(version.parent),
                                        model_platform="tensorflow")
    runner = CountingRunner()
    manager = ModelManager(config, poll_wait_seconds=-1, max_num_load_retries=0,
                           warmup=make_warmup(runner, iterations=2))
    manager.start()
    assert manager.version_states("alexnet") == [(1, 30, 0, "")]  # AVAILABLE, no error
    logs = _records(version)
    want = sorted(("classify" if log.WhichOneof("log_type") == "classify_log" else "predict",
                   getattr(log, log.WhichOneof("log_type")).request.model_spec.signature_name)
                  for log in logs for _ in range(2))
    assert sorted(runner.calls) == want
    manager.stop()


def test_warmup_requests_need_at_most_the_limit():
    logs = warmup.warmup_logs(["serving_default", "serving_pixels", "classify", "features"],
                              67, batch_sizes=(1, 2, 4))
    assert len(logs) == 12
    pixels = logs[1].predict_log.request.inputs["pixels"]
    assert tf.make_ndarray(pixels).shape == (1, 67, 67, 3)
    assert np.all(tf.make_ndarray(pixels) == 0)
    with pytest.raises(ValueError, match="exceed"):
        warmup.warmup_logs(["serving_default"], 67, batch_sizes=range(1, 1002))
