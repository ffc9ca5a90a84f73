"""The embedded server against TF Serving's API contract (docs: tf-serving.md §12).

One server process serves a tiny exported AlexNet (`alexnet`) and upstream's `half_plus_two`
(`half_plus_two`, version 00000123, label `stable`) for the whole module.
"""

import base64
import concurrent.futures
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from _serving_fixtures import (
    IMAGES,
    ServerProcess,
    copy_version,
    tiny_version,
    write_half_plus_two,
)
from tensorflow.core.example import example_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving import client as serving_client
from serving._tensors import from_ndarray

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    copy_version(tiny_version(0), root / "alexnet", 1)
    (root / "alexnet" / "not_a_version").mkdir()
    write_half_plus_two(root / "hp2" / "00000123")
    config = root / "models.config"
    config.write_text(f"""
model_config_list {{
  config {{ name: "alexnet" base_path: "{root / 'alexnet'}" model_platform: "tensorflow" }}
  config {{
    name: "half_plus_two" base_path: "{root / 'hp2'}" model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: 123 }} }}
    version_labels {{ key: "stable" value: 123 }}
  }}
}}
""")
    process = ServerProcess(root, f"--model_config_file={config}",
                            "--enable_grpc_healthcheck_service", rest=True)
    try:
        yield process.start()
    finally:
        process.kill()


@pytest.fixture(scope="module")
def channel(server):
    channel = grpc.insecure_channel(server.address, options=[
        ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    yield channel
    channel.close()


@pytest.fixture(scope="module")
def stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def model_stub(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)


@pytest.fixture(scope="module")
def local_model():
    return tf.saved_model.load(str(tiny_version(0)))


def _images():
    return [path.read_bytes() for path in IMAGES]


def _hp2_request(values=(2.0,), shape=(1,), **spec):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = spec.pop("name", "half_plus_two")
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    tensor = request.inputs["x"]
    tensor.dtype = types_pb2.DT_FLOAT
    tensor.float_val.extend(values)
    for size in shape:
        tensor.tensor_shape.dim.add().size = size
    return request


def _image_request(images=None, signature="serving_default"):
    return serving_client.build_predict_request(images or _images(), "alexnet",
                                                signature=signature)


def _error(call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value.code(), info.value.details()


# AlexNet top-5 (items 19-22).


def test_client_top5_matches_in_process_saved_model(server, local_model):
    results = serving_client.classify(IMAGES, server=server.address, model="alexnet")
    expected = local_model.signatures["serving_default"](images=tf.constant(_images()))
    assert len(results) == len(IMAGES)
    for i, top5 in enumerate(results):
        assert [p.class_id for p in top5] == expected["classes"][i].numpy().tolist()
        assert [p.label for p in top5] == [s.decode() for s in expected["labels"][i].numpy()]
        probabilities = [p.probability for p in top5]
        np.testing.assert_allclose(probabilities, expected["scores"][i].numpy(), rtol=1e-5)
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) <= 1.0 + 1e-6


def test_outputs_are_typed_fields_and_echo_the_model_spec(stub):
    response = stub.Predict(_image_request(), timeout=30)
    assert response.model_spec.name == "alexnet"
    assert response.model_spec.signature_name == "serving_default"
    assert response.model_spec.version.value == 1
    assert set(response.outputs) == {"classes", "scores", "labels"}
    for alias, field in (("classes", "int_val"), ("scores", "float_val"),
                         ("labels", "string_val")):
        tensor = response.outputs[alias]
        assert tensor.tensor_content == b""
        assert len(getattr(tensor, field)) == 5 * len(IMAGES)
        assert [d.size for d in tensor.tensor_shape.dim] == [len(IMAGES), 5]
        assert tf.make_ndarray(tensor).shape == (len(IMAGES), 5)


def test_pixels_signature_accepts_tensor_content(stub, local_model):
    pixels = np.random.default_rng(0).normal(0, 50, (2, 67, 67, 3)).astype(np.float32)
    request = _image_request(signature="serving_pixels")
    del request.inputs["images"]
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
    assert request.inputs["pixels"].tensor_content
    response = stub.Predict(request, timeout=30)
    expected = local_model.signatures["serving_pixels"](pixels=tf.constant(pixels))
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["scores"]),
                               expected["scores"].numpy(), rtol=1e-5)


def test_concurrent_predicts_equal_serial(stub):
    images = _images()
    serial = [stub.Predict(_image_request([img]), timeout=30).outputs["scores"].float_val
              for img in images]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stub.Predict, _image_request([images[i % len(images)]]),
                               timeout=60) for i in range(8)]
        for i, future in enumerate(futures):
            np.testing.assert_allclose(future.result().outputs["scores"].float_val,
                                       serial[i % len(images)], rtol=1e-5)


def test_corrupt_image_is_invalid_argument(stub):
    code, details = _error(stub.Predict, _image_request([b"not an image at all"]))
    assert code == INVALID


def test_wrong_spatial_shape_is_invalid_argument(stub):
    request = _image_request(signature="serving_pixels")
    del request.inputs["images"]
    request.inputs["pixels"].CopyFrom(from_ndarray(np.zeros((1, 50, 50, 3), np.float32)))
    assert _error(stub.Predict, request)[0] == INVALID


# half_plus_two Predict (items 6-12).


def test_half_plus_two_predict_with_filter(stub):
    request = _hp2_request(signature_name="serving_default")
    request.output_filter.append("y")
    response = stub.Predict(request, timeout=30)
    assert response.outputs["y"].dtype == types_pb2.DT_FLOAT
    assert list(response.outputs["y"].float_val) == [3.0]
    assert response.model_spec.name == "half_plus_two"
    assert response.model_spec.signature_name == "serving_default"
    assert response.model_spec.version.value == 123


def test_scalar_in_scalar_out_and_empty_signature_name_echoed(stub):
    response = stub.Predict(_hp2_request(shape=()), timeout=30)
    assert response.model_spec.signature_name == "serving_default"
    assert list(response.outputs["y"].float_val) == [3.0]
    assert len(response.outputs["y"].tensor_shape.dim) == 0


def test_short_typed_fields_broadcast_the_last_value(stub):
    response = stub.Predict(_hp2_request(values=(2.0, 4.0), shape=(4,)), timeout=30)
    assert list(response.outputs["y"].float_val) == [3.0, 4.0, 4.0, 4.0]


def test_versions_and_labels_resolve(stub):
    assert stub.Predict(_hp2_request(version=123), timeout=30).model_spec.version.value == 123
    response = stub.Predict(_hp2_request(version_label="stable"), timeout=30)
    assert response.model_spec.version.value == 123
    assert response.model_spec.version_label == ""


@pytest.mark.parametrize("mutate, code, gist", [
    (lambda r: r.ClearField("model_spec"), INVALID, "Missing ModelSpec"),
    (lambda r: setattr(r.model_spec, "name", ""), INVALID, "ModelSpec has no name specified."),
    (lambda r: setattr(r.model_spec, "name", "intentionally_missing_model"), NOT_FOUND,
     "Servable not found for request: Latest(intentionally_missing_model)"),
    (lambda r: r.model_spec.version.__setattr__("value", 999), NOT_FOUND,
     "Servable not found for request: Specific(half_plus_two, 999)"),
    (lambda r: setattr(r.model_spec, "version_label", "nope"), INVALID,
     "Unrecognized servable version label: nope"),
    (lambda r: setattr(r.model_spec, "signature_name", "nope"),
     grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "nope" not found.'),
    (lambda r: r.inputs.clear(), INVALID, "input size does not match signature: 0!=1"),
    (lambda r: [r.inputs[k].CopyFrom(r.inputs["x"]) for k in ("unknown_key1", "unknown_key2")],
     INVALID, "Sent extra: {unknown_key1,unknown_key2}. Missing but required: {}."),
    (lambda r: r.inputs["wrong"].CopyFrom(r.inputs.pop("x")), INVALID,
     "Signature input alias: x(feed name: serving_default_x:0) not found in request"),
    (lambda r: setattr(r.inputs["x"], "dtype", types_pb2.DT_INVALID), INVALID,
     "tensor parsing error: x"),
    (lambda r: r.inputs["x"].CopyFrom(tf.make_tensor_proto(np.zeros(3, np.float32))) or
     setattr(r.inputs["x"], "tensor_content", b"\0" * 5), INVALID, "tensor parsing error: x"),
    (lambda r: r.inputs["x"].CopyFrom(from_ndarray([b"a"])), INVALID,
     "Expects arg[0] to be float but string is provided"),
    (lambda r: r.inputs["x"].CopyFrom(from_ndarray(np.array([True]))), INVALID,
     "Expects arg[0] to be float but bool is provided"),
    (lambda r: r.output_filter.append("output_filter"), INVALID,
     "output tensor alias not found in signature: output_filter Outputs expected to be in "
     "the set {y}."),
    (lambda r: r.output_filter.extend(["y", "y"]), INVALID, "duplicate output tensor alias: y"),
], ids=["row1", "row2", "row3", "row4", "row5", "row7", "row8-empty", "row8-extra", "row9",
        "row10-invalid", "row10-content", "row11-string", "row11-bool", "row13", "row14"])
def test_predict_error_table(stub, mutate, code, gist):
    request = _hp2_request()
    mutate(request)
    got_code, details = _error(stub.Predict, request)
    assert got_code == code
    assert gist in details


def test_extra_inputs_message_is_exact(stub):
    request = _hp2_request()
    request.inputs["unknown_key1"].CopyFrom(request.inputs["x"])
    _, details = _error(stub.Predict, request)
    assert details == ("input size does not match signature: 2!=1 len({unknown_key1,x}) != "
                       "len({x}). Sent extra: {unknown_key1}. Missing but required: {}.")


def test_long_messages_are_truncated_at_1024(stub):
    request = _hp2_request()
    for i in range(3):
        request.inputs[f"k{i}_" + "z" * 600].CopyFrom(request.inputs["x"])
    _, details = _error(stub.Predict, request)
    assert len(details) == 1024 + len("...TRUNCATED") and details.endswith("...TRUNCATED")


def test_deadline_exceeded(stub):
    code, _ = _error(lambda r, timeout: stub.Predict(r, timeout=0.001),
                     _image_request(_images() * 16))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_large_request_and_response(server, stub):
    values = np.arange(2_621_440, dtype=np.float32)  # 10 MiB each way
    request = _hp2_request(values=(), shape=())
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(values))
    response = stub.Predict(request, timeout=60)
    assert len(response.outputs["y"].float_val) == values.size
    with grpc.insecure_channel(server.address) as default_channel:  # 4 MiB receive limit
        code, _ = _error(prediction_service_pb2_grpc.PredictionServiceStub(
            default_channel).Predict, request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


# GetModelMetadata (items 23-24).


def _metadata_request(name="alexnet", fields=("signature_def",)):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=list(fields))
    request.model_spec.name = name
    return request


def test_metadata_returns_the_signature_map(stub):
    response = stub.GetModelMetadata(_metadata_request(), timeout=30)
    assert response.model_spec.name == "alexnet"
    assert response.model_spec.version.value == 1
    assert len(response.metadata) == 1
    assert response.metadata["signature_def"].type_url == (
        "type.googleapis.com/tensorflow.serving.SignatureDefMap")
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    assert {"serving_default", "serving_pixels", "classify",
            "__saved_model_init_op"} <= set(signatures.signature_def)
    default = signatures.signature_def["serving_default"]
    assert default.method_name == "tensorflow/serving/predict"
    assert default.inputs["images"].dtype == types_pb2.DT_STRING
    assert [d.size for d in default.inputs["images"].tensor_shape.dim] == [-1]
    for alias, dtype in (("classes", types_pb2.DT_INT32), ("scores", types_pb2.DT_FLOAT),
                         ("labels", types_pb2.DT_STRING)):
        assert default.outputs[alias].dtype == dtype
        assert [d.size for d in default.outputs[alias].tensor_shape.dim] == [-1, 5]


@pytest.mark.parametrize("request_, code, gist", [
    (_metadata_request(fields=()), INVALID,
     "GetModelMetadataRequest must specify at least one metadata_field"),
    (_metadata_request(fields=("some_stuff",)), INVALID,
     "Metadata field some_stuff is not supported"),
    (get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"]),
     INVALID, "Missing ModelSpec"),
    (_metadata_request(name=""), INVALID, "ModelSpec has no name specified."),
    (_metadata_request(name="nope"), NOT_FOUND, "Servable not found for request: Latest(nope)"),
], ids=["row20", "row21", "row1", "row2", "row3"])
def test_metadata_errors(stub, request_, code, gist):
    got_code, details = _error(stub.GetModelMetadata, request_)
    assert (got_code, gist in details) == (code, True)


# GetModelStatus (items 25-27).


def _status_request(name, version=None):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    return request


def test_status_of_a_healthy_model(model_stub):
    response = model_stub.GetModelStatus(_status_request("half_plus_two"), timeout=30)
    (entry,) = response.model_version_status
    assert entry.version == 123
    assert entry.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert (entry.status.error_code, entry.status.error_message) == (0, "")
    one = model_stub.GetModelStatus(_status_request("half_plus_two", 123), timeout=30)
    assert len(one.model_version_status) == 1


@pytest.mark.parametrize("request_, code, gist", [
    (get_model_status_pb2.GetModelStatusRequest(), INVALID, "Missing ModelSpec"),
    (_status_request("nope"), NOT_FOUND, "Could not find any versions of model nope"),
    (_status_request(""), NOT_FOUND, "Could not find any versions of model "),
    (_status_request("half_plus_two", 7), NOT_FOUND,
     "Could not find version 7 of model half_plus_two"),
], ids=["row1", "row22", "row22-empty", "row23"])
def test_status_errors(model_stub, request_, code, gist):
    got_code, details = _error(model_stub.GetModelStatus, request_)
    assert (got_code, gist in details) == (code, True)


# Classify, Regress, MultiInference (items 40-41).


def _examples(features_list):
    request_input = {"example_list": {"examples": []}}
    examples = []
    for features in features_list:
        example = example_pb2.Example()
        for key, value in features.items():
            if isinstance(value, bytes):
                example.features.feature[key].bytes_list.value.append(value)
            else:
                example.features.feature[key].float_list.value.append(value)
        examples.append(example)
    request_input["example_list"]["examples"] = examples
    return request_input


def test_classify_signature_matches_predict(stub):
    images = _images()[:2]
    request = classification_pb2.ClassificationRequest(
        input=_examples([{"image/encoded": img} for img in images]))
    request.model_spec.name, request.model_spec.signature_name = "alexnet", "classify"
    response = stub.Classify(request, timeout=30)
    predicted = serving_client.parse_predict_response(
        stub.Predict(_image_request(images), timeout=30))
    assert response.model_spec.signature_name == "classify"
    for row, top5 in zip(response.result.classifications, predicted):
        assert [c.label for c in row.classes] == [p.label for p in top5]
        np.testing.assert_allclose([c.score for c in row.classes],
                                   [p.probability for p in top5], rtol=1e-5)


@pytest.mark.parametrize("signature, examples, gist", [
    ("serving_default", [{"x": 1.0}], "Expected one or two output Tensors, found 3"),
    ("nope", [{"x": 1.0}], "No signature was found with the name: nope"),
    ("classify", [], "Input is empty."),
], ids=["row25", "row24", "row26"])
def test_classify_errors(stub, signature, examples, gist):
    request = classification_pb2.ClassificationRequest(input=_examples(examples))
    request.model_spec.name, request.model_spec.signature_name = "alexnet", signature
    code, details = _error(stub.Classify, request)
    assert (code, gist in details) == (INVALID, True)


def test_half_plus_two_classify_regress_and_multi_inference(stub):
    inputs = _examples([{"x": 2.0}])
    request = classification_pb2.ClassificationRequest(input=inputs)
    request.model_spec.name, request.model_spec.signature_name = (
        "half_plus_two", "classify_x_to_y")
    (row,) = stub.Classify(request, timeout=30).result.classifications
    assert [(c.label, c.score) for c in row.classes] == [("", 3.0)]
    request = regression_pb2.RegressionRequest(input=inputs)
    request.model_spec.name, request.model_spec.signature_name = (
        "half_plus_two", "regress_x_to_y")
    response = stub.Regress(request, timeout=30)
    assert [r.value for r in response.result.regressions] == [3.0]
    assert response.model_spec.version.value == 123
    multi = inference_pb2.MultiInferenceRequest(input=inputs)
    for signature, method in (("classify_x_to_y", "tensorflow/serving/classify"),
                              ("regress_x_to_y", "tensorflow/serving/regress")):
        task = multi.tasks.add(method_name=method)
        task.model_spec.name, task.model_spec.signature_name = "half_plus_two", signature
    results = stub.MultiInference(multi, timeout=30).results
    assert len(results) == 2
    assert results[0].classification_result.classifications[0].classes[0].score == 3.0
    assert results[1].regression_result.regressions[0].value == 3.0
    multi.tasks[1].model_spec.name = "alexnet"
    assert _error(stub.MultiInference, multi)[0] == INVALID
    multi.tasks[1].model_spec.name, multi.tasks[1].method_name = "half_plus_two", "odd"
    assert _error(stub.MultiInference, multi)[0] == grpc.StatusCode.UNIMPLEMENTED


def test_regress_on_the_image_signature_is_invalid_argument(stub):
    request = regression_pb2.RegressionRequest(input=_examples([{"x": 1.0}]))
    request.model_spec.name = "alexnet"
    assert _error(stub.Regress, request) == (INVALID, "Expected one output Tensor.")


# REST (item 43).


def _rest(server, path, body=None, method=None):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}", data=data,
                                     method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_rest_b64_predict_equals_grpc(server, stub):
    images = _images()
    status, body = _rest(server, "/v1/models/alexnet:predict", {
        "instances": [{"b64": base64.b64encode(img).decode()} for img in images]})
    assert status == 200
    grpc_top5 = serving_client.parse_predict_response(
        stub.Predict(_image_request(images), timeout=30))
    for row, top5 in zip(body["predictions"], grpc_top5):
        assert row["classes"] == [p.class_id for p in top5]
        assert row["labels"] == [p.label for p in top5]
        np.testing.assert_allclose(row["scores"], [p.probability for p in top5], rtol=1e-6)
    status, columnar = _rest(server, "/v1/models/alexnet/versions/1:predict", {
        "inputs": {"images": [{"b64": base64.b64encode(images[0]).decode()}]}})
    assert status == 200 and columnar["outputs"]["labels"][0] == body["predictions"][0]["labels"]


def test_rest_half_plus_two_formats(server):
    assert _rest(server, "/v1/models/half_plus_two:predict",
                 {"instances": [2.0, 3.0, 4.0]}) == (200, {"predictions": [3.0, 3.5, 4.0]})
    assert _rest(server, "/v1/models/half_plus_two/labels/stable:predict",
                 {"inputs": [2.0, 3.0]}) == (200, {"outputs": [3.0, 3.5]})
    assert _rest(server, "/v1/models/half_plus_two:classify", {
        "signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]}) == (
        200, {"results": [[["", 3.0]]]})
    assert _rest(server, "/v1/models/half_plus_two:regress", {
        "signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]}) == (
        200, {"results": [3.0]})
    assert _rest(server, "/v1/models/half_plus_two") == (200, {"model_version_status": [{
        "version": "123", "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""}}]})
    status, metadata = _rest(server, "/v1/models/half_plus_two/metadata")
    assert status == 200 and metadata["model_spec"]["version"] == "123"
    assert "serving_default" in metadata["metadata"]["signature_def"]["signature_def"]


@pytest.mark.parametrize("method, path, body, status, gist", [
    ("POST", "/v1/models/half_plus_two:predict", b"", 400,
     "JSON Parse error: The document is empty"),
    ("POST", "/v1/models/half_plus_two:predict", {"instances": ["x", "y"]}, 400,
     "not of expected type: float"),
    ("POST", "/v1/models/half_plus_two:predict", {"instances": [{"b64": "AA=="}]}, 400,
     "Type: Object is not of expected type: float"),
    ("POST", "/v1/models/half_plus_two:predict", {"instances": [1.0], "inputs": [1.0]}, 400,
     "expecting only one of 'inputs' or 'instances'"),
    ("POST", "/v1/models/half_plus_two:predict", {"foo": 1}, 400,
     "Missing 'inputs' or 'instances' key"),
    ("POST", "/v1/models/half_plus_two:predict", {"instances": []}, 400,
     "No values in 'instances' array"),
    ("POST", "/v1/models/half_plus_two:predict", {"signature_name": 100, "instances": [1.0]},
     400, "'signature_name' key must be a string value."),
    ("POST", "/v1/models/half_plus_two:predict", {"signature_name": "nope",
                                                   "instances": [1.0]}, 400,
     'Serving signature name: "nope" not found in signature def'),
    ("GET", "/v1/models", None, 400, "Missing model name in request."),
    ("GET", "/v1/foo", None, 400, "Malformed request: GET /v1/foo"),
    ("GET", "/v1/models/half_plus_two/versions/x1", None, 400, "Failed to convert version"),
    ("POST", "/v1/models/foo:predict", {"instances": [1.0]}, 404,
     "Servable not found for request: Latest(foo)"),
])
def test_rest_errors(server, method, path, body, status, gist):
    got_status, answer = _rest(server, path, body, method)
    assert got_status == status
    assert gist in answer["error"]


# Client behaviour, health, CLI.


def test_client_errors_name_server_and_code(server):
    with pytest.raises(serving_client.ServingClientError) as info:
        serving_client.classify(IMAGES[:1], server=server.address, model="nope")
    assert info.value.code == NOT_FOUND
    assert server.address in str(info.value) and "NOT_FOUND" in str(info.value)


def test_client_splits_batches_under_the_message_limit(server):
    whole = serving_client.classify(IMAGES, server=server.address, model="alexnet")
    split = serving_client.classify(IMAGES, server=server.address, model="alexnet",
                                    max_request_bytes=5000)
    assert [[p.class_id for p in r] for r in split] == [[p.class_id for p in r] for r in whole]


def test_health_service(channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "ModelService", "PredictionService",
                    "tensorflow.serving.PredictionService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:  # the health service's answer for others
        health.Check(health_pb2.HealthCheckRequest(service="NoSuchService"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_table_and_json(server, capsys):
    assert serving_client.main([str(IMAGES[0]), "--server", server.address, "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["image"] == str(IMAGES[0]) and len(entry["top5"]) == 5
    assert set(entry["top5"][0]) == {"label", "class_id", "probability"}
    assert serving_client.main([str(IMAGES[0]), "--server", server.address]) == 0
    assert "probability" in capsys.readouterr().out
    assert serving_client.main([str(IMAGES[0]), "--server", server.address,
                                "--model", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_sigterm_drains_in_flight_requests_and_exits_zero(server, stub):
    request = _image_request(_images() * 64)
    future = stub.Predict.future(request, timeout=60)
    import time

    time.sleep(0.2)
    assert server.terminate(timeout=60) == 0
    assert len(future.result().outputs["scores"].float_val) == 5 * 64 * len(IMAGES)
