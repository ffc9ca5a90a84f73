"""Prometheus metrics of the embedded server (`--monitoring_config_file`).

One in-process server with server-side batching serves upstream's `half_plus_two` (version 1
with a three-record warm-up file, and a broken version 2, both aspired). The test sends a
known list of good and bad gRPC and REST requests between two scrapes and checks every count
against the table written out below: TF Serving's own metrics (names, labels and which
requests they count, from tensorflow_serving/servables/tensorflow/util.cc,
model_servers/prediction_service_impl.cc and http_server.cc), this server's per-signature
extra, the batching session's batch sizes, load attempts and warm-up.
"""

import json
import logging
import urllib.error
import urllib.request

import grpc
import pytest
import tensorflow as tf
from _serving_fixtures import free_port, write_half_plus_two
from prometheus_client.parser import text_string_to_metric_families
from tensorflow.core.example import example_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving import _metrics, _textproto
from serving.server import ModelServer, build_parser

HP = "half_plus_two"
UNKNOWN = "<unknown>"
WARMUP_RECORDS = 3
PAGE = "/monitoring/prometheus/metrics"


def _predict(batch=1, name=HP, signature=""):
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = name, signature
    tensor = request.inputs["x"]
    tensor.dtype = types_pb2.DT_FLOAT
    tensor.float_val.extend(float(i) for i in range(batch))
    tensor.tensor_shape.dim.add().size = batch
    return request


def _examples(n):
    examples = []
    for i in range(n):
        example = example_pb2.Example()
        example.features.feature["x"].float_list.value.append(float(i))
        examples.append(example)
    return {"example_list": {"examples": examples}}


def _write_warmup(version_dir):
    path = version_dir / "assets.extra" / "tf_serving_warmup_requests"
    path.parent.mkdir()
    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in range(1, WARMUP_RECORDS + 1):
            log = prediction_log_pb2.PredictionLog()
            log.predict_log.request.CopyFrom(_predict(batch))
            writer.write(log.SerializeToString())


def _server(root, *flags):
    args = build_parser().parse_args([
        f"--port={free_port()}", f"--rest_api_port={free_port()}", "--max_num_load_retries=0",
        f"--model_config_file={root / 'models.config'}", *flags])
    server = ModelServer(args)
    server.start()
    return server


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    write_half_plus_two(root / "hp" / "1")
    _write_warmup(root / "hp" / "1")
    (root / "hp" / "2").mkdir()
    (root / "hp" / "2" / "saved_model.pb").write_bytes(b"not a SavedModel")
    (root / "models.config").write_text(
        f'model_config_list {{ config {{ name: "{HP}" base_path: "{root / "hp"}" '
        'model_platform: "tensorflow" model_version_policy { all {} } } }')
    (root / "monitoring.config").write_text("prometheus_config { enable: true }\n")
    (root / "batching.config").write_text(
        "max_batch_size { value: 8 } batch_timeout_micros { value: 0 } "
        "num_batch_threads { value: 1 } allowed_batch_sizes: 2 allowed_batch_sizes: 4 "
        "allowed_batch_sizes: 8\n")
    return root


@pytest.fixture(scope="module")
def server(root):
    server = _server(root, f"--monitoring_config_file={root / 'monitoring.config'}",
                     "--enable_batching", f"--batching_parameters_file={root / 'batching.config'}")
    try:
        states = dict((v, s) for v, s, *_ in server.manager.version_states(HP))
        assert states == {1: get_model_status_pb2.ModelVersionStatus.AVAILABLE,
                          2: get_model_status_pb2.ModelVersionStatus.END}
        yield server
    finally:
        server.stop(grace=1)


def _url(server, path):
    return f"{server.addresses[-1]}{path}"


def _http(server, method, path, body=None):
    """(status, headers, body text) of one REST request."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(_url(server, path), data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def _scrape(server):
    status, headers, text = _http(server, "GET", PAGE)
    assert status == 200, text
    return text


def _samples(text):
    """{(sample name, sorted label items): value}; counters' samples get the parser's
    `_total`."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _series(samples, name, labels, before=None):
    """{label values in `labels` order: value (minus its value in `before`)}, zeros dropped."""
    out = {}
    for (sample, items), value in samples.items():
        if sample == name:
            key = tuple(dict(items)[label] for label in labels)
            value -= (before or {}).get((sample, items), 0)
            if value:
                out[key] = value
    return out


def _send_requests(server):
    """The requests whose counts the table in `test_request_counts...` states."""
    with grpc.insecure_channel(server.addresses[0]) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for batch in (1, 3, 8):
            assert list(stub.Predict(_predict(batch), timeout=30).outputs["y"].float_val) == [
                0.5 * i + 2 for i in range(batch)]
        bad = [(_predict(9), grpc.StatusCode.INVALID_ARGUMENT),  # over max_batch_size
               (_predict(1, signature="bogus"), grpc.StatusCode.FAILED_PRECONDITION)]
        bad += [(_predict(1, name=f"random-{i}"), grpc.StatusCode.NOT_FOUND) for i in range(3)]
        for request, code in bad:
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(request, timeout=30)
            assert info.value.code() == code
        classify = classification_pb2.ClassificationRequest(input=_examples(2))
        classify.model_spec.name, classify.model_spec.signature_name = HP, "classify_x_to_y"
        assert len(stub.Classify(classify, timeout=30).result.classifications) == 2
        regress = regression_pb2.RegressionRequest(input=_examples(1))
        regress.model_spec.name, regress.model_spec.signature_name = HP, "regress_x_to_y"
        assert [r.value for r in stub.Regress(regress, timeout=30).result.regressions] == [2.0]
        multi = inference_pb2.MultiInferenceRequest(input=_examples(2))
        for signature, method in (("classify_x_to_y", "tensorflow/serving/classify"),
                                  ("regress_x_to_y", "tensorflow/serving/regress")):
            task = multi.tasks.add(method_name=method)
            task.model_spec.name, task.model_spec.signature_name = HP, signature
        assert len(stub.MultiInference(multi, timeout=30).results) == 2
        metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        metadata.model_spec.name = HP
        assert stub.GetModelMetadata(metadata, timeout=30).model_spec.version.value == 1
        metadata.model_spec.name = "random-3"
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModelMetadata(metadata, timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        status = get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.name = HP
        model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
        assert len(model_stub.GetModelStatus(status, timeout=30).model_version_status) == 2
    rest = [
        ("POST", f"/v1/models/{HP}:predict", {"instances": [1.0, 2.0]}, 200),
        ("POST", f"/v1/models/{HP}:predict", {"instances": [3.0, 4.0]}, 200),
        ("POST", f"/v1/models/{HP}:predict", b"not json", 400),
        ("POST", "/v1/models/random-4:predict", {"instances": [1.0]}, 404),
        ("POST", f"/v1/models/{HP}:classify",
         {"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}]}, 200),
        ("GET", f"/v1/models/{HP}/metadata", None, 200),
        ("GET", f"/v1/models/{HP}", None, 200),
        ("GET", "/v1/foo", None, 400),
        ("GET", "/not/an/api/path", None, 404),  # no handler: not counted
    ]
    for method, path, body, expected in rest:
        status, _, text = _http(server, method, path, body)
        assert status == expected, (path, text)


def test_request_counts_latencies_and_batch_sizes(server):
    before = _samples(_scrape(server))
    _send_requests(server)
    text = _scrape(server)
    after = _samples(text)

    # TF Serving's request_count: gRPC Predict/Classify/Regress and every /v1/ REST request.
    assert _series(after, ":tensorflow:serving:request_count_total",
                   ["model_name", "status"], before) == {
        (HP, "OK"): 3 + 1 + 1 + 2 + 1 + 2, (HP, "INVALID_ARGUMENT"): 2,
        (HP, "FAILED_PRECONDITION"): 1, (UNKNOWN, "NOT_FOUND"): 3 + 1,
        ("", "INVALID_ARGUMENT"): 1}
    # ... and its request_latency: successful ones only; REST's API label is the verb.
    assert _series(after, ":tensorflow:serving:request_latency_count",
                   ["model_name", "API", "entrypoint"], before) == {
        (HP, "Predict", "GRPC"): 3, (HP, "Classify", "GRPC"): 1, (HP, "Regress", "GRPC"): 1,
        (HP, "predict", "REST"): 2, (HP, "classify", "REST"): 1, (HP, "", "REST"): 2}
    labels = ["model_name", "API", "signature_name", "entrypoint", "status"]
    expected = {
        (HP, "Predict", "serving_default", "GRPC", "OK"): 3,
        (HP, "Predict", "serving_default", "GRPC", "INVALID_ARGUMENT"): 1,
        (HP, "Predict", UNKNOWN, "GRPC", "FAILED_PRECONDITION"): 1,
        (UNKNOWN, "Predict", UNKNOWN, "GRPC", "NOT_FOUND"): 3,
        (HP, "Classify", "classify_x_to_y", "GRPC", "OK"): 1,
        (HP, "Regress", "regress_x_to_y", "GRPC", "OK"): 1,
        (HP, "MultiInference", "", "GRPC", "OK"): 1,
        (HP, "GetModelMetadata", "", "GRPC", "OK"): 1,
        (UNKNOWN, "GetModelMetadata", "", "GRPC", "NOT_FOUND"): 1,
        (HP, "GetModelStatus", "", "GRPC", "OK"): 1,
        (HP, "Predict", "serving_default", "REST", "OK"): 2,
        (HP, "Predict", "", "REST", "INVALID_ARGUMENT"): 1,
        (UNKNOWN, "Predict", UNKNOWN, "REST", "NOT_FOUND"): 1,
        (HP, "Classify", "classify_x_to_y", "REST", "OK"): 1,
        (HP, "GetModelMetadata", "", "REST", "OK"): 1,
        (HP, "GetModelStatus", "", "REST", "OK"): 1,
        ("", "", "", "REST", "INVALID_ARGUMENT"): 1,
    }
    assert _series(after, ":tensorflow:serving:stand_in:request_count_total", labels,
                   before) == expected
    assert _series(after, ":tensorflow:serving:stand_in:request_latency_count", labels,
                   before) == expected
    # Client-chosen names never became label values: every random name is UNKNOWN.
    values = {v for (_, items), _ in after.items() for k, v in items if k == "model_name"}
    assert values == {HP, UNKNOWN, ""}

    assert _series(after, ":tensorflow:serving:runtime_latency_count",
                   ["model_name", "API", "runtime"], before) == {
        (HP, "Predict", "TF1"): 3 + 2, (HP, "Classify", "TF1"): 1 + 1,
        (HP, "Regress", "TF1"): 1}
    assert _series(after, ":tensorflow:serving:request_example_counts_sum", ["model"],
                   before) == {(HP,): 2}
    assert _series(after, ":tensorflow:serving:request_example_count_total", ["model"],
                   before) == {(HP,): 2}

    # Batching (allowed sizes 2, 4, 8): inputs 1, 3, 8, 9 (refused), classify 2, regress 1,
    # multi-inference 2 + 2, REST predict 2 + 2, REST classify 1.
    prefix = ":tensorflow:serving:batching_session:"
    inputs = [1, 3, 8, 9, 2, 1, 2, 2, 2, 2, 1]
    processed = [2, 4, 8, 2, 2, 2, 2, 2, 2, 2]
    assert _series(after, prefix + "input_batch_size_count", [], before) == {(): len(inputs)}
    assert _series(after, prefix + "input_batch_size_sum", [], before) == {(): sum(inputs)}
    assert _series(after, prefix + "input_batch_size_bucket", ["le"], before) == {
        (le,): sum(size <= float(le) for size in inputs)
        for le in ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "256.0",
                   "512.0", "1024.0", "2048.0", "4096.0", "8192.0", "+Inf")}
    assert _series(after, prefix + "processed_batch_size_count", [], before) == {
        (): len(processed)}
    assert _series(after, prefix + "processed_batch_size_sum", [], before) == {
        (): sum(processed)}
    assert _series(after, prefix + "padding_size_count", ["execution_batch_size"],
                   before) == {("2",): 8, ("4",): 1, ("8",): 1}
    assert _series(after, prefix + "padding_size_sum", ["execution_batch_size"],
                   before) == {("2",): 3, ("4",): 1}
    assert _series(after, prefix + "wrapped_run_count_total", [], before) == {
        (): len(processed)}
    assert _series(after, prefix + "queuing_latency_count", ["thread_pool_name"],
                   before) == {("",): len(processed)}

    # TF Serving's exact text: counters without `_total`, '/' turned into ':'.
    assert "# TYPE :tensorflow:serving:request_count counter\n" in text
    assert f':tensorflow:serving:request_count{{model_name="{HP}",status="OK"}} ' in text
    assert "# TYPE :tensorflow:serving:request_latency histogram\n" in text
    assert "# TYPE :tensorflow:serving:request_example_count_total counter\n" in text
    assert "_created" not in text


def test_load_attempts_and_warmup(server, root):
    samples = _samples(_scrape(server))
    paths = [str(root / "hp" / "1"), str(root / "hp" / "2")]
    assert _series(samples, ":tensorflow:cc:saved_model:load_attempt_count_total",
                   ["model_path", "status"]) == {(paths[0], "success"): 1, (paths[1], "fail"): 1}
    assert {dict(items)["model_path"] for (name, items) in samples
            if name == ":tensorflow:cc:saved_model:load_latency_total"} == set(paths)
    # The broken version never got to warm-up; version 1 replayed its three records.
    assert _series(samples, ":tensorflow:serving:model_warmup_latency_count",
                   ["model_path", "status"]) == {(paths[0], "OK"): 1}
    assert _series(samples, ":tensorflow:serving:model_warmup_records_read_total",
                   ["model_path", "status"]) == {(paths[0], "OK"): WARMUP_RECORDS}


def test_metrics_page_is_get_only_and_plain_text(server):
    status, headers, text = _http(server, "GET", PAGE + "?name[]=x")
    assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families[":tensorflow:serving:request_count"] == "counter"
    assert families[":tensorflow:serving:batching_session:processed_batch_size"] == "histogram"
    for method in ("POST", "PUT", "HEAD"):
        status, headers, body = _http(server, method, PAGE, b"{}" if method != "HEAD" else None)
        assert status == 405 and headers["Allow"] == "GET"
        if method != "HEAD":
            assert json.loads(body) == {"error": f"Malformed request: {method} {PAGE}"}


def test_no_metrics_page_without_the_config(root):
    server = _server(root)
    try:
        status, headers, body = _http(server, "GET", PAGE)
        assert status == 404 and headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"error": f"Not Found: {PAGE}"}
        assert _http(server, "GET", f"/v1/models/{HP}")[0] == 200
    finally:
        server.stop(grace=1)


def _parse(tmp_path, text):
    path = tmp_path / "monitoring.config"
    path.write_text(text)
    return _metrics.prometheus_path(_textproto.parse_file(path, _textproto.MonitoringConfig))


def test_monitoring_config_parsing(tmp_path):
    from pathlib import Path

    assert _metrics.prometheus_path(_textproto.parse_file(
        Path(__file__).parents[1] / "serving" / "monitoring.config",
        _textproto.MonitoringConfig)) == PAGE
    assert _parse(tmp_path, "prometheus_config { enable: true }") == PAGE
    assert _parse(tmp_path, 'prometheus_config { enable: true, path: "/metrics" }') == "/metrics"
    assert _parse(tmp_path, 'prometheus_config { path: "/metrics" }') is None
    assert _parse(tmp_path, "") is None
    with pytest.raises(ValueError, match="must be a URL path starting with '/'"):
        _parse(tmp_path, 'prometheus_config { enable: true, path: "metrics" }')
    for shadowing in ("/v1", "/v1/models/alexnet"):
        with pytest.raises(ValueError, match="would hide the /v1/ REST API"):
            _parse(tmp_path, f'prometheus_config {{ enable: true, path: "{shadowing}" }}')
    with pytest.raises(_textproto.ConfigParseError,
                       match="Error parsing text-format tensorflow.serving.MonitoringConfig"):
        _parse(tmp_path, "prometheus_config { enabled: true }")


def test_a_bad_config_refuses_to_start_and_no_rest_port_warns(tmp_path, caplog):
    bad = tmp_path / "bad.config"
    bad.write_text("prometheus_config { enable: maybe }")
    flags = ["--model_name=m", f"--model_base_path={tmp_path}"]
    with pytest.raises(_textproto.ConfigParseError, match="MonitoringConfig"):
        ModelServer(build_parser().parse_args(
            flags + ["--rest_api_port=8501", f"--monitoring_config_file={bad}"]))
    good = tmp_path / "good.config"
    good.write_text("prometheus_config { enable: true }")
    with caplog.at_level(logging.WARNING, logger="serving"):
        server = ModelServer(build_parser().parse_args(
            flags + [f"--monitoring_config_file={good}"]))
    assert server.metrics_path is None and not server.metrics.enabled
    assert "set --rest_api_port to export them" in caplog.text


def test_registries_are_per_server_and_updates_never_raise():
    class Models:
        def known(self, name, signature=None):
            return name == "m" and signature in (None, "s")

    first, second = _metrics.PrometheusMetrics(Models()), _metrics.PrometheusMetrics(Models())
    first.request("GRPC", "Predict", "m", "s", grpc.StatusCode.OK, 0.001, tf_api="Predict")
    first.request("GRPC", "Predict", "m", "x" * 10_000, "not a status code", 0.001)
    first.load(None, True, "not a number")
    one = _series(_samples(first.exposition()[1].decode()),
                  ":tensorflow:serving:stand_in:request_count_total",
                  ["model_name", "signature_name", "status"])
    assert one == {("m", "s", "OK"): 1}
    assert not _series(_samples(second.exposition()[1].decode()),
                       ":tensorflow:serving:stand_in:request_count_total", ["model_name"])


def test_metrics_page_answers_while_every_request_slot_is_busy():
    import threading

    from serving._rest import make_http_server

    release, started = threading.Event(), threading.Event()

    class SlowApi:
        def handle(self, method, path, body):
            started.set()
            release.wait(10)
            return 200, {}

    metrics = _metrics.PrometheusMetrics()
    metrics.load("/m/1", True, 0.5)
    http = make_http_server(SlowApi(), "127.0.0.1", 0, max_concurrent_requests=1,
                            metrics=metrics, metrics_path=PAGE)
    thread = threading.Thread(target=http.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{http.server_address[1]}"
    busy = threading.Thread(target=urllib.request.urlopen, args=(f"{base}/v1/models/m",),
                            kwargs={"timeout": 30}, daemon=True)
    try:
        busy.start()
        assert started.wait(10)
        with urllib.request.urlopen(base + PAGE, timeout=10) as response:
            samples = _samples(response.read().decode())
        assert _series(samples, ":tensorflow:cc:saved_model:load_latency_total",
                       ["model_path"]) == {("/m/1",): 500_000}
    finally:
        release.set()
        busy.join(10)
        http.shutdown()
        http.server_close()
        thread.join(5)
