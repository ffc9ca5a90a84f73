"""Fuzzing (hypothesis) of what a client controls on the serving side: the REST JSON decoder
(`json_to_array`), REST request handling (`RestApi.handle`, body parsing through the Predict,
Classify and Regress paths with a fake one-model manager) and TensorProto decoding
(`to_ndarray`, `decode_inputs`). Only typed errors may come out: `ServingError` with
INVALID_ARGUMENT / `TensorParseError`, or an HTTP 4xx, never another exception or a 500.

Bounded: derandomized, no example database, a few hundred examples per test, small values.
"""

import json

import grpc
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from serving import _inference
from serving._errors import ServingError
from serving._rest import RestApi, json_to_array
from serving._tensors import _DTYPES, TensorParseError, to_ndarray

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KNOWN_DTYPES = sorted(_DTYPES) + [types_pb2.DT_BFLOAT16, types_pb2.DT_VARIANT,
                                  types_pb2.DT_RESOURCE, types_pb2.DT_FLOAT_REF]
DTYPES = st.one_of(st.sampled_from(KNOWN_DTYPES), st.integers(-3, 200),
                   st.integers(-2**31, 2**31 - 1))
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-300, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.builds(lambda s: {"b64": s}, st.sampled_from(["AA==", "aGk=", "!!", "", "A", "YQ"])))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=40)


def _ok_array(array):
    assert isinstance(array, np.ndarray)
    return array


@FUZZ
@given(value=JSON_VALUES, dtype=DTYPES)
def test_json_to_array_raises_only_invalid_argument(value, dtype):
    try:
        _ok_array(json_to_array(value, dtype))
    except ServingError as e:
        assert e.code == INVALID and e.message


@FUZZ
@given(depth=st.integers(65, 3000), dtype=st.sampled_from(sorted(_DTYPES)))
def test_json_to_array_deep_nesting_is_invalid_argument(depth, dtype):
    value = 1
    for _ in range(depth):
        value = [value]
    with pytest.raises(ServingError) as info:
        json_to_array(value, dtype)
    assert info.value.code == INVALID


# TensorProto decoding.

DIMS = st.lists(st.one_of(st.integers(-3, 5), st.integers(-2**63, 2**63 - 1),
                          st.sampled_from([2**31, 2**32, 2**62, 10**6])), max_size=6)
_FIELD_VALUES = {
    "float_val": st.lists(st.floats(width=32), max_size=6),
    "double_val": st.lists(st.floats(), max_size=6),
    "int_val": st.lists(st.integers(-2**31, 2**31 - 1), max_size=6),
    "int64_val": st.lists(st.integers(-2**63, 2**63 - 1), max_size=6),
    "uint32_val": st.lists(st.integers(0, 2**32 - 1), max_size=6),
    "uint64_val": st.lists(st.integers(0, 2**64 - 1), max_size=6),
    "bool_val": st.lists(st.booleans(), max_size=6),
    "string_val": st.lists(st.binary(max_size=6), max_size=6),
    "half_val": st.lists(st.integers(-2**31, 2**31 - 1), max_size=6),
    "scomplex_val": st.lists(st.floats(width=32), max_size=7),
    "dcomplex_val": st.lists(st.floats(), max_size=7),
}


@st.composite
def tensor_protos(draw):
    proto = tensor_pb2.TensorProto(dtype=draw(DTYPES))
    if draw(st.booleans()):
        proto.tensor_shape.unknown_rank = draw(st.booleans())
        for size in draw(DIMS):
            proto.tensor_shape.dim.add().size = size
    if draw(st.booleans()):
        proto.tensor_content = draw(st.binary(max_size=64))
    for field in draw(st.lists(st.sampled_from(sorted(_FIELD_VALUES)), max_size=3)):
        getattr(proto, field).extend(draw(_FIELD_VALUES[field]))
    return proto


@FUZZ
@given(proto=tensor_protos())
def test_to_ndarray_raises_only_tensor_parse_errors(proto):
    try:
        array = _ok_array(to_ndarray(proto))
    except TensorParseError:
        return
    assert list(array.shape) == [d.size for d in proto.tensor_shape.dim]


def _signature(**inputs):
    signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    for alias, dtype in inputs.items():
        signature.inputs[alias].name = f"{alias}:0"
        signature.inputs[alias].dtype = dtype
        signature.outputs[alias].name = f"out_{alias}:0"
        signature.outputs[alias].dtype = dtype
    return signature


@FUZZ
@given(protos=st.dictionaries(st.sampled_from(["x", "s", "extra"]), tensor_protos(),
                              min_size=1, max_size=3))
def test_decode_inputs_raises_only_invalid_argument(protos):
    signature = _signature(x=types_pb2.DT_FLOAT, s=types_pb2.DT_STRING)
    try:
        decoded = _inference.decode_inputs(signature, protos)
    except ServingError as e:
        assert e.code == INVALID and e.message
        return
    assert set(decoded) == {"x", "s"}


# REST request handling, end to end short of the socket.


class _Servable:
    version = 1

    def __init__(self):
        predict = _signature(x=types_pb2.DT_FLOAT, s=types_pb2.DT_STRING, i=types_pb2.DT_INT32)
        single = _signature(x=types_pb2.DT_FLOAT)
        examples = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/classify")
        examples.inputs["inputs"].dtype = types_pb2.DT_STRING
        examples.outputs["scores"].dtype = types_pb2.DT_FLOAT
        self.signature_defs = {"serving_default": single, "multi": predict,
                               "classify": examples}

        def echo(**feeds):
            return dict(feeds)

        def scores(inputs):
            return {"scores": tf.zeros([tf.shape(inputs)[0], 2], tf.float32)}

        self.signatures = {"serving_default": echo, "multi": echo, "classify": scores}


class _Manager:
    def __init__(self):
        self.servable = _Servable()

    def resolve(self, spec):
        if spec.name != "m":
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: Latest({spec.name})")
        return self.servable

    def version_states(self, name, version=None):
        return [(1, 30, 0, "")] if name == "m" else []


API = RestApi(_Manager(), _inference.Runner(), timeout_s=30.0)
PATHS = st.one_of(
    st.sampled_from(["/v1/models/m:predict", "/v1/models/m/versions/1:predict",
                     "/v1/models/m:classify", "/v1/models/m:regress", "/v1/models/m",
                     "/v1/models/m/metadata", "/v1/models/other:predict", "/v1/models",
                     "/v1/models/m/labels/x:predict", "/v1/models/m/versions/x:predict"]),
    st.text(max_size=30).map(lambda s: "/v1/" + s))
REQUESTS = st.fixed_dictionaries({}, optional={
    "signature_name": st.one_of(st.sampled_from(["", "multi", "classify", "nope"]),
                                JSON_SCALARS),
    "instances": JSON_VALUES,
    "inputs": JSON_VALUES,
    "examples": JSON_VALUES,
    "context": JSON_VALUES,
})
BODIES = st.one_of(
    REQUESTS.map(json.dumps),
    JSON_VALUES.map(json.dumps),
    st.text(max_size=40),
    st.sampled_from(["", " ", "{", "[" * 5000, '{"inputs": ' + "[" * 3000 + "]" * 3000 + "}",
                     '{"inputs": "\\ud800"}', '{"signature_name": "\\udfff", "inputs": 1}',
                     '{"inputs": {"x": 1e400}}', '{"inputs": 123' + "4" * 5000 + "}",
                     '{"examples": [{"\\ud800": 1}]}', '{"examples": [{"a": 1e999}]}',
                     '{"examples": [{"a": 99999999999999999999999}]}']))


@FUZZ
@given(method=st.sampled_from(["GET", "POST"]), path=PATHS, body=BODIES)
def test_rest_handle_answers_4xx_never_500(method, path, body):
    status, payload = API.handle(method, path, body)
    json.dumps(payload)  # What the HTTP layer sends must serialize.
    assert status == 200 or 400 <= status < 500, (status, payload)
    if status != 200:
        assert isinstance(payload["error"], str) and payload["error"]
