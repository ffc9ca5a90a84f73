"""The embedded server serves the export's ``features`` signature (gRPC Predict, REST
predict, GetModelMetadata) exactly as the in-process SavedModel computes it."""

import base64
import json
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from _serving_fixtures import IMAGES, ServerProcess, copy_version, tiny_version
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

from serving import client as serving_client
from serving._tensors import to_ndarray

DIM = 512  # fc7 of the tiny model (width 0.125)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    copy_version(tiny_version(0), root / "alexnet", 1)
    process = ServerProcess(root, "--model_name=alexnet", f"--model_base_path={root / 'alexnet'}",
                            rest=True)
    try:
        yield process.start()
    finally:
        process.kill()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.address, options=[
        ("grpc.max_receive_message_length", -1)])
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def expected():
    """The in-process ``features`` signature on the test photos."""
    signature = tf.saved_model.load(str(tiny_version(0))).signatures["features"]
    images = [path.read_bytes() for path in IMAGES]
    return images, signature(images=tf.constant(images))["features"].numpy()


def test_grpc_predict_features_equals_the_saved_model(stub, expected):
    images, values = expected
    request = serving_client.build_predict_request(images, "alexnet", signature="features")
    response = stub.Predict(request, timeout=60)
    assert response.model_spec.signature_name == "features"
    assert list(response.outputs) == ["features"]
    tensor = response.outputs["features"]
    assert tensor.dtype == types_pb2.DT_FLOAT
    assert [d.size for d in tensor.tensor_shape.dim] == [len(images), DIM]
    np.testing.assert_allclose(to_ndarray(tensor), values, rtol=1e-6, atol=1e-6)
    assert values.min() >= 0.0  # ReLU activations


def test_grpc_predict_features_rejects_non_images(stub):
    request = serving_client.build_predict_request([b"not an image"], "alexnet",
                                                   signature="features")
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Unsupported image format" in info.value.details()


def _rest(server, path, body):
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}",
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())


def test_rest_predict_features_equals_the_saved_model(server, expected):
    images, values = expected
    instances = [{"b64": base64.b64encode(image).decode()} for image in images]
    status, body = _rest(server, "/v1/models/alexnet:predict",
                         {"signature_name": "features", "instances": instances})
    assert status == 200
    rows = np.asarray(body["predictions"], np.float32)  # one output: a row per image
    assert rows.shape == (len(images), DIM)
    np.testing.assert_allclose(rows, values, rtol=1e-5, atol=1e-6)
    status, columnar = _rest(server, "/v1/models/alexnet/versions/1:predict",
                             {"signature_name": "features", "inputs": {"images": instances[:2]}})
    assert status == 200
    np.testing.assert_allclose(np.asarray(columnar["outputs"], np.float32), values[:2],
                               rtol=1e-5, atol=1e-6)


def test_metadata_lists_the_features_signature(server, stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "alexnet"
    response = stub.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["features"]
    assert signature.method_name == "tensorflow/serving/predict"
    assert list(signature.inputs) == ["images"] and list(signature.outputs) == ["features"]
    assert signature.inputs["images"].dtype == types_pb2.DT_STRING
    assert [d.size for d in signature.inputs["images"].tensor_shape.dim] == [-1]
    assert signature.outputs["features"].dtype == types_pb2.DT_FLOAT
    assert [d.size for d in signature.outputs["features"].tensor_shape.dim] == [-1, DIM]
    with urllib.request.urlopen(f"http://127.0.0.1:{server.rest_port}/v1/models/alexnet/metadata",
                                timeout=30) as reply:
        rest = json.loads(reply.read())
    assert "features" in rest["metadata"]["signature_def"]["signature_def"]


def test_grpc_predict_features_of_an_empty_batch(stub):
    request = serving_client.build_predict_request([], "alexnet", signature="features")
    tensor = stub.Predict(request, timeout=60).outputs["features"]
    assert [d.size for d in tensor.tensor_shape.dim] == [0, DIM]
