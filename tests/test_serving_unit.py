"""In-process checks of the serving pieces: tensor codec, batcher, configs, client helpers,
version policies and config reloads, and the Docker files (no Docker needed)."""

import ast
import importlib.metadata
import re
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from _serving_fixtures import REPO, write_half_plus_two
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving import _textproto
from serving import client as serving_client
from serving._batching import Batcher, BatchingOptions
from serving._errors import ServingError
from serving._manager import ModelManager, aspired_versions, list_versions
from serving._tensors import TensorParseError, from_ndarray, to_ndarray
from serving.server import parse_channel_arguments

# Tensor codec (§3.2 step 7, §11.2).


def _typed(values, shape, dtype=types_pb2.DT_FLOAT, field="float_val"):
    proto = tensor_pb2.TensorProto(dtype=dtype)
    getattr(proto, field).extend(values)
    for size in shape:
        proto.tensor_shape.dim.add().size = size
    return proto


def test_typed_fields_broadcast_pad_and_truncate_like_tensorflow():
    assert to_ndarray(_typed([1, 2], [4])).tolist() == [1, 2, 2, 2]
    assert to_ndarray(_typed([], [3])).tolist() == [0, 0, 0]
    assert to_ndarray(_typed([1, 2, 3], [2])).tolist() == [1, 2]
    assert to_ndarray(_typed([5], [])).shape == ()
    assert to_ndarray(_typed([b"a"], [2], types_pb2.DT_STRING, "string_val")).tolist() == [
        b"a", b"a"]


def test_tensor_content_and_typed_fields_decode_like_make_ndarray():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    for proto in (tf.make_tensor_proto(array), from_ndarray(array)):
        np.testing.assert_array_equal(to_ndarray(proto), tf.make_ndarray(proto))
    typed = from_ndarray(array)
    assert typed.tensor_content == b"" and len(typed.float_val) == 12
    for value in (np.array([1, 2], np.int64), np.array([True]), np.array([[1.5]], np.float16),
                  np.array(3, np.int32), np.array([b"x", b"yz"], dtype=object)):
        np.testing.assert_array_equal(tf.make_ndarray(from_ndarray(value)), value)


@pytest.mark.parametrize("proto", [
    tensor_pb2.TensorProto(),
    tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=b"\0" * 5),
    _typed([1.0], [-1]),
    tensor_pb2.TensorProto(dtype=types_pb2.DT_VARIANT),
], ids=["dt-invalid", "content-length", "negative-dim", "unsupported"])
def test_undecodable_tensors_raise(proto):
    with pytest.raises(TensorParseError):
        to_ndarray(proto)


# Batching (rows 17-19).


def _batcher(run, **fields):
    params = _textproto.BatchingParameters()
    for key, value in fields.items():
        if key == "allowed_batch_sizes":
            params.allowed_batch_sizes.extend(value)
        else:
            getattr(params, key).value = value
    return Batcher(BatchingOptions(params), lambda servable, sig, feeds: run(feeds))


def test_batcher_rejects_like_tf_serving():
    batcher = _batcher(lambda feeds: feeds, max_batch_size=4)
    try:
        for feeds, gist in (
            ({"x": np.zeros(5)}, "Task size 5 is larger than maximum input batch size 4"),
            ({"x": np.float32(1)}, "must have at least one dimension"),
            ({"x": np.zeros(1), "y": np.zeros(2)}, "must have equal 0th-dimension size"),
        ):
            with pytest.raises(ServingError) as info:
                batcher.run(object(), "s", feeds)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert gist in info.value.message
    finally:
        batcher.stop()


def test_batcher_merges_concurrent_tasks_pads_and_splits():
    sizes = []

    def run(feeds):
        sizes.append(len(feeds["x"]))
        time.sleep(0.05)
        return {"y": feeds["x"] * 2}

    batcher = _batcher(run, max_batch_size=8, batch_timeout_micros=50000, num_batch_threads=1,
                       allowed_batch_sizes=[4, 8])
    servable, results = object(), {}

    def call(i):
        results[i] = batcher.run(servable, "s", {"x": np.full(i + 1, i, np.float32)})["y"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    finally:
        batcher.stop()
    for i in range(3):
        assert results[i].tolist() == [2.0 * i] * (i + 1)
    assert all(size in (4, 8) for size in sizes) and len(sizes) < 3


def test_batcher_queue_full_is_unavailable():
    release = threading.Event()
    batcher = _batcher(lambda feeds: (release.wait(10), feeds)[1], max_batch_size=1,
                       max_enqueued_batches=1, num_batch_threads=1)
    servable, errors = object(), []

    def call():
        try:
            batcher.run(servable, "s", {"x": np.zeros(1)})
        except ServingError as e:
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
            time.sleep(0.2)
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
        batcher.stop()
    assert [e.code for e in errors] == [grpc.StatusCode.UNAVAILABLE]
    assert "The batch scheduling queue to which this task was submitted is full" in (
        errors[0].message)


# Config files.


def test_shipped_configs_parse():
    config = _textproto.parse_model_server_config(REPO / "serving" / "models.config")
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == (
        "alexnet", "/models/alexnet", "tensorflow")
    params = _textproto.parse_file(REPO / "serving" / "batching.config",
                                   _textproto.BatchingParameters)
    assert params.max_batch_size.value == serving_client.DEFAULT_MAX_BATCH_SIZE


def test_config_parse_errors_name_the_message(tmp_path):
    path = tmp_path / "bad.config"
    path.write_text("max_batch_size { value: 8 }\nmax_batch_sise { value: 8 }\n")
    with pytest.raises(_textproto.ConfigParseError,
                       match="Error parsing text-format tensorflow.serving.BatchingParameters"):
        _textproto.parse_file(path, _textproto.BatchingParameters)
    path.write_text('server_key: "k"\nserver_cert: "c"\nclient_verify: true\n')
    ssl = _textproto.parse_file(path, _textproto.SSLConfig)
    assert (ssl.server_key, ssl.client_verify) == ("k", True)


def test_channel_arguments_pass_integers_as_integers():
    assert parse_channel_arguments(
        "grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb") == [
        ("grpc.max_connection_age_ms", 2000), ("grpc.lb_policy_name", "grpclb")]


# Versions and reloads (§9).


def test_version_directories_and_policies(tmp_path):
    for name in ("1", "00000123", "7", "foo", ".tmp-9"):
        (tmp_path / name).mkdir()
    (tmp_path / "8").write_text("a file, not a version")
    assert sorted(list_versions(tmp_path)) == [1, 7, 123]
    policy = model_server_config_pb2.ModelConfig().model_version_policy
    assert aspired_versions(policy, [1, 7, 123]) == {123}
    policy.latest.num_versions = 2
    assert aspired_versions(policy, [1, 7, 123]) == {7, 123}
    policy.all.SetInParent()
    assert aspired_versions(policy, [1, 7, 123]) == {1, 7, 123}
    policy.specific.versions.extend([7, 42])
    assert aspired_versions(policy, [1, 7, 123]) == {7}


def _config(*models):
    config = model_server_config_pb2.ModelServerConfig()
    for name, base, labels in models:
        model = config.model_config_list.config.add(name=name, base_path=str(base),
                                                    model_platform="tensorflow")
        model.model_version_policy.all.SetInParent()
        model.version_labels.update(labels)
    return config


def test_reload_config_replaces_models_and_checks_like_server_core(tmp_path):
    write_half_plus_two(tmp_path / "a" / "1")
    write_half_plus_two(tmp_path / "b" / "2")
    manager = ModelManager(_config(("a", tmp_path / "a", {})), poll_wait_seconds=-1)
    manager.start()
    try:
        from tensorflow_serving.apis import model_pb2

        # Labels may only name versions already AVAILABLE: serve b first, then label it.
        manager.reload_config(_config(("b", tmp_path / "b", {})))
        manager.reload_config(_config(("b", tmp_path / "b", {"stable": 2})))

        assert manager.resolve(model_pb2.ModelSpec(name="b", version_label="stable")).version == 2
        with pytest.raises(ServingError, match=r"Latest\(a\)"):
            manager.resolve(model_pb2.ModelSpec(name="a"))
        assert [row[1] for row in manager.version_states("a")] == [50]  # END, kept listed
        cases = [
            (_config(("b", tmp_path / "b", {}), ("b", tmp_path / "b", {})),
             grpc.StatusCode.INVALID_ARGUMENT, "Illegal to list model b multiple times"),
            (_config(("c", "relative/c", {})), grpc.StatusCode.INVALID_ARGUMENT,
             "Expected model c to have an absolute path or URI; got base_path()=relative/c"),
            (_config(("b", tmp_path / "b", {"canary": 9})), grpc.StatusCode.FAILED_PRECONDITION,
             "Request to assign label to version 9 of model b, which is not currently"),
        ]
        custom = model_server_config_pb2.ModelServerConfig()
        custom.custom_model_config.type_url = "x"
        cases.append((custom, grpc.StatusCode.INVALID_ARGUMENT,
                      "ServerModelConfig type not supported by HandleReloadConfigRequest"))
        for config, code, gist in cases:
            with pytest.raises(ServingError) as info:
                manager.reload_config(config)
            assert info.value.code == code and gist in info.value.message
    finally:
        manager.stop()


# Client helpers.


def test_split_batches_respects_bytes_and_count():
    images = [b"x" * 100] * 5
    assert [len(c) for _, c in serving_client.split_batches(images, 250)] == [2, 2, 1]
    assert [s for s, _ in serving_client.split_batches(images, 10**6, 2)] == [0, 2, 4]
    assert [len(c) for _, c in serving_client.split_batches([b"y" * 1000], 10)] == [1]


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "boom"


@pytest.mark.parametrize("code, calls", [
    (grpc.StatusCode.UNAVAILABLE, 3), (grpc.StatusCode.INVALID_ARGUMENT, 1),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 1)])
def test_client_retries_only_unavailable(code, calls):
    client = serving_client.Client("example.invalid:1", retries=2, backoff=0.01)
    attempts = []

    class Stub:
        def Predict(self, request, timeout):
            attempts.append(timeout)
            raise _FakeRpcError(code)

    client.stub = Stub()
    with pytest.raises(serving_client.ServingClientError) as info:
        client.predict(None)
    client.close()
    assert len(attempts) == calls
    assert str(info.value) == f"example.invalid:1: {code.name}: boom"


def test_client_does_not_import_keras_or_the_package():
    for module in ("client.py", "_tensors.py", "__init__.py"):
        tree = ast.parse((REPO / "serving" / module).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        for name in names:
            root = name.split(".")[0]
            assert root not in ("keras", "keras_alexnet"), (module, name)
            assert name == "tensorflow.core.framework" or root != "tensorflow", (module, name)


# Docker files (§10.1, §10.5 item 45), checked statically.


def test_dockerfile_serving_and_training_targets():
    text = (REPO / "Dockerfile").read_text()
    stages = re.split(r"(?m)^FROM ", text)[1:]
    by_target = {s.split()[2]: s for s in stages}
    version = importlib.metadata.version("tensorflow-serving-api")
    serving = by_target["serving"]
    assert serving.startswith(f"tensorflow/serving:{version} AS serving")
    assert "ENTRYPOINT" not in serving
    assert re.search(r"(?m)^USER (?!root|0)\S+", serving)
    assert "MODEL_NAME=alexnet" in serving and "EXPOSE 8500 8501" in serving
    # The model files must be readable by the serving user, never writable by it.
    copy = re.search(r"(?m)^COPY ((?:--\S+ )*)models/alexnet /models/alexnet$", serving)
    assert copy, "the serving stage copies models/alexnet to /models/alexnet"
    user = re.search(r"(?m)^USER (\d+):(\d+)", serving).groups()
    flags = dict(f.lstrip("-").split("=", 1) for f in copy.group(1).split())
    owner, group = flags["chown"].split(":")
    assert owner in ("root", "0") and group == user[1]
    mode = int(flags["chmod"], 8)
    assert mode & 0o040 and mode & 0o010 and not mode & 0o022  # group r-x, nobody else writes
    copied = re.search(r"(?m)^COPY ((?:serving/\S+ )+)/config/$", serving).group(1).split()
    assert "serving/monitoring.config" in copied  # TF Serving's own Prometheus endpoint
    for name in copied:
        assert f"/config/{name.split('/')[-1]}" in serving
    # The health check (tests/test_deploy.py runs the script itself).
    assert re.search(r'(?m)^HEALTHCHECK .*\\\n\s+CMD \["/usr/local/bin/alexnet-healthcheck"\]$',
                     serving)
    training = by_target["training"]
    assert training.startswith(f"tensorflow/tensorflow:{version.rsplit('.', 1)[0]}.0-gpu")
    assert '"training/train.py"' in training and re.search(r"(?m)^USER (?!root|0)\S+", training)
    compose = (REPO / "docker-compose.yml").read_text()
    assert "./models/alexnet:/models/alexnet" in compose and "target: serving" in compose


# Warm-up (§9.7) and the method-name check (row 15).


def _hp2_manager(base, warmup):
    from serving._inference import Runner
    from serving.server import make_warmup

    config = _config(("hp2", base, {}))
    return ModelManager(config, poll_wait_seconds=-1, max_num_load_retries=0,
                        warmup=make_warmup(Runner()) if warmup else None)


def test_warmup_replays_predict_logs_and_bad_files_fail_the_load(tmp_path):
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    good = write_half_plus_two(tmp_path / "good" / "1")
    (good / "assets.extra").mkdir()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "name_is_irrelevant"
    request.inputs["x"].CopyFrom(from_ndarray(np.array([1.0], np.float32)))
    with tf.io.TFRecordWriter(str(good / "assets.extra" / "tf_serving_warmup_requests")) as w:
        w.write(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())
    manager = _hp2_manager(tmp_path / "good", warmup=True)
    manager.start()
    assert manager.version_states("hp2") == [(1, 30, 0, "")]

    bad = write_half_plus_two(tmp_path / "bad" / "1")
    (bad / "assets.extra").mkdir()
    (bad / "assets.extra" / "tf_serving_warmup_requests").write_bytes(b"garbage" * 10)
    manager = _hp2_manager(tmp_path / "bad", warmup=True)
    with pytest.raises(ServingError, match="1 servable\\(s\\) did not become available"):
        manager.start()
    ((version, state, code, message),) = manager.version_states("hp2")
    assert (state, code) == (50, grpc.StatusCode.DATA_LOSS.value[0])
    assert "TFRecord" in message


def test_method_name_check_is_internal_for_odd_methods():
    from tensorflow.core.protobuf import meta_graph_pb2
    from tensorflow_serving.apis import model_pb2, predict_pb2

    from serving._inference import Runner

    class Servable:
        version = 1
        signature_defs = {"serving_default": meta_graph_pb2.SignatureDef(method_name="odd")}

    class Manager:
        def resolve(self, spec):
            return Servable()

    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="m"))
    with pytest.raises(ServingError) as info:
        Runner(enable_signature_method_name_check=True).predict(Manager(), request)
    assert info.value.code == grpc.StatusCode.INTERNAL
    assert "Expected prediction signature method_name to be one of" in info.value.message
    with pytest.raises(ServingError) as info:  # without the flag the input check comes next
        Runner().predict(Manager(), request)
    assert "input size does not match signature: 0!=0" in info.value.message


def test_config_file_polling_replaces_the_served_models(tmp_path):
    from tensorflow_serving.apis import model_pb2

    from serving.server import ModelServer, build_parser

    write_half_plus_two(tmp_path / "hp" / "1")
    config = tmp_path / "models.config"

    def write(name):
        config.write_text(f'model_config_list {{ config {{ name: "{name}" '
                          f'base_path: "{tmp_path / "hp"}" model_platform: "tensorflow" }} }}')

    write("half_plus_two")
    args = build_parser().parse_args(["--port=0", f"--model_config_file={config}",
                                      "--model_config_file_poll_wait_seconds=1"])
    server = ModelServer(args)
    server.start()
    try:
        assert server.manager.resolve(model_pb2.ModelSpec(name="half_plus_two")).version == 1
        write("half_plus_three")
        deadline = time.monotonic() + 20
        while "half_plus_three" not in server.manager.model_names():
            assert time.monotonic() < deadline, "config file change not picked up"
            time.sleep(0.2)
        while time.monotonic() < deadline:
            try:
                server.manager.resolve(model_pb2.ModelSpec(name="half_plus_three"))
                break
            except ServingError:
                time.sleep(0.2)
        with pytest.raises(ServingError, match=r"Latest\(half_plus_two\)"):
            server.manager.resolve(model_pb2.ModelSpec(name="half_plus_two"))
    finally:
        server.stop(grace=1)


def test_unix_socket_listener(tmp_path):
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving.server import ModelServer, build_parser

    write_half_plus_two(tmp_path / "hp" / "1")
    socket_path = tmp_path / "grpc.sock"
    server = ModelServer(build_parser().parse_args([
        "--port=0", f"--grpc_socket_path={socket_path}", "--model_name=hp2",
        f"--model_base_path={tmp_path / 'hp'}"]))
    server.start()
    try:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "hp2"
        request.inputs["x"].CopyFrom(from_ndarray(np.array([2.0], np.float32)))
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                request, timeout=30)
        assert list(response.outputs["y"].float_val) == [3.0]
    finally:
        server.stop(grace=1)
