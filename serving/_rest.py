"""TF Serving's REST API (`--rest_api_port`) on the standard library's HTTP server.

Routes, JSON tensor formats and error mapping follow `http_rest_api_handler.cc` and
`json_tensor.cc`: `POST /v1/models/NAME[/versions/N|/labels/L]:(predict|classify|regress)`,
`GET` of the same prefix for status and `+/metadata` for metadata, errors as `{"error": ...}`.
"""

import base64
import json
import math
import re
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)

from serving import _inference
from serving._errors import ServingError
from serving._tensors import dtype_name, from_ndarray, numpy_dtype, to_ndarray

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_ROUTE = re.compile(
    r"/v1/models(?:/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+)"
    r"|/labels/(?P<label>[A-Za-z0-9_]+))?(?:/(?P<metadata>metadata)"
    r"|:(?P<verb>predict|classify|regress))?)?",
    re.IGNORECASE,
)
_HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_FLOAT_TYPES = (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_HALF, types_pb2.DT_BFLOAT16)


def http_status(code):
    """Maps a `grpc.StatusCode` to TF Serving's HTTP status (`ToHTTPStatusCode`)."""
    return _HTTP_STATUS.get(code, 500)


def _json_type(value):
    if isinstance(value, bool):
        return "Bool"
    if isinstance(value, (int, float)):
        return "Number"
    if isinstance(value, str):
        return "String"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    return "Null"


def _type_error(value, dtype):
    return ServingError(_INVALID, f"JSON Value: {json.dumps(value)} Type: {_json_type(value)} "
                                  f"is not of expected type: {dtype_name(dtype)}")


def _scalar(value, dtype):
    if dtype == types_pb2.DT_STRING:
        if isinstance(value, str):
            return value.encode("utf-8")
        if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except ValueError:
                raise ServingError(_INVALID, f"Unable to base64 decode: {value['b64']}") from None
        raise _type_error(value, dtype)
    if dtype == types_pb2.DT_BOOL:
        if isinstance(value, bool):
            return value
        raise _type_error(value, dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(value, dtype)
    if dtype not in _FLOAT_TYPES and (isinstance(value, float) and not value.is_integer()):
        raise _type_error(value, dtype)
    return value


def _shape_of(value):
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return shape


def json_to_array(value, dtype):
    """Converts a JSON value (nested lists, `{"b64": ...}` for strings) to a NumPy array."""
    shape = _shape_of(value)
    flat = []

    def walk(v, depth):
        if depth < len(shape):
            if not isinstance(v, list) or len(v) != shape[depth]:
                raise ServingError(_INVALID, "Expecting tensor size: "
                                             f"{shape[depth]} but got: {json.dumps(v)}")
            for item in v:
                walk(item, depth + 1)
        else:
            if isinstance(v, list):
                raise ServingError(_INVALID, f"Expecting a scalar but got: {json.dumps(v)}")
            flat.append(_scalar(v, dtype))

    walk(value, 0)
    if dtype == types_pb2.DT_STRING:
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    return np.array(flat, dtype=numpy_dtype(dtype)).reshape(shape)


def _to_json(array, alias):
    if array.dtype == object:
        if alias.endswith("_bytes"):
            convert = lambda v: {"b64": base64.b64encode(v).decode("ascii")}  # noqa: E731
        else:
            convert = lambda v: v.decode("utf-8", "replace")  # noqa: E731
    elif array.dtype.kind == "f":
        convert = lambda v: float(str(v))  # noqa: E731  shortest float32 text
    elif array.dtype.kind == "b":
        convert = bool
    elif array.dtype.kind == "c":
        convert = lambda v: [float(v.real), float(v.imag)]  # noqa: E731
    else:
        convert = int
    if array.ndim == 0:
        return convert(array.item() if array.dtype != object else array[()])
    return [_to_json(row, alias) for row in array] if array.ndim > 1 else [
        convert(v) for v in array]


def _feature(value):
    values = value if isinstance(value, list) else [value]
    feature = feature_pb2.Feature()
    if all(isinstance(v, bool) or isinstance(v, int) for v in values) and values:
        feature.int64_list.value.extend(int(v) for v in values)
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and values:
        feature.float_list.value.extend(float(v) for v in values)
    else:
        feature.bytes_list.value.extend(_scalar(v, types_pb2.DT_STRING) for v in values)
    return feature


def _example(obj):
    if not isinstance(obj, dict):
        raise ServingError(_INVALID, "Expected 'examples' to be an array of objects.")
    example = example_pb2.Example()
    for name, value in obj.items():
        example.features.feature[name].CopyFrom(_feature(value))
    return example


class RestApi:
    """Answers REST requests with the same handlers as gRPC.

    Args:
        manager: the `ModelManager`.
        runner: the `_inference.Runner`.
        timeout_s: run timeout for each request (`--rest_api_timeout_in_ms`).
    """

    def __init__(self, manager, runner, timeout_s=30.0):
        self.manager, self.runner, self.timeout_s = manager, runner, timeout_s

    def handle(self, method, path, body):
        """Returns (http status, JSON-able object) for one request."""
        try:
            return 200, self._dispatch(method, path, body)
        except ServingError as e:
            return http_status(e.code), {"error": e.message}
        except Exception as e:  # Never drop the connection without an answer.
            return 500, {"error": f"{type(e).__name__}: {e}"}

    def _dispatch(self, method, path, body):
        path = path.split("?", 1)[0]
        match = _ROUTE.fullmatch(path)
        verb = (match.group("verb") or "").lower() if match else ""
        if not match or (method == "GET") == bool(verb) or method not in ("GET", "POST") or (
                verb and match.group("metadata")):
            raise ServingError(_INVALID, f"Malformed request: {method} {path}")
        if not match.group("name"):
            raise ServingError(_INVALID, "Missing model name in request.")
        spec = model_pb2.ModelSpec(name=match.group("name"))
        if match.group("version") is not None:
            try:
                spec.version.value = int(match.group("version"))
            except ValueError:
                raise ServingError(_INVALID, "Failed to convert version: "
                                             f"{match.group('version')} to numeric.") from None
        elif match.group("label"):
            spec.version_label = match.group("label")
        if method == "GET":
            if match.group("metadata"):
                return self._metadata(spec)
            return self._status(spec)
        request = self._parse_body(body)
        signature_name = request.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise ServingError(_INVALID, "'signature_name' key must be a string value.")
        spec.signature_name = signature_name
        deadline = time.monotonic() + self.timeout_s
        if verb == "predict":
            return self._predict(spec, request, deadline)
        return self._classify_or_regress(verb, spec, request, deadline)

    @staticmethod
    def _parse_body(body):
        if not body.strip():
            raise ServingError(_INVALID, "JSON Parse error: The document is empty")
        try:
            request = json.loads(body)
        except ValueError as e:
            raise ServingError(_INVALID, f"JSON Parse error: {e}") from None
        if not isinstance(request, dict):
            raise ServingError(_INVALID, "JSON Parse error: The document root must be an object")
        return request

    def _status(self, spec):
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = spec.name
        if spec.HasField("version"):
            request.model_spec.version.value = spec.version.value
        response = _inference.get_model_status(self.manager, request)
        return json_format.MessageToDict(
            response, always_print_fields_with_no_presence=True, preserving_proto_field_name=True)

    def _metadata(self, spec):
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=spec, metadata_field=["signature_def"])
        response = _inference.get_model_metadata(self.manager, request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        model_spec = json_format.MessageToDict(
            response.model_spec, always_print_fields_with_no_presence=True,
            preserving_proto_field_name=True)
        model_spec["version"] = str(response.model_spec.version.value)
        return {"model_spec": model_spec, "metadata": {"signature_def": json_format.MessageToDict(
            signature_map, preserving_proto_field_name=True)}}

    def _predict(self, spec, request, deadline):
        servable = self.manager.resolve(spec)
        signature_name = spec.signature_name or _inference.DEFAULT_SIGNATURE
        signature = servable.signature_defs.get(signature_name)
        if signature is None:
            raise ServingError(_INVALID, f'Serving signature name: "{signature_name}" not found '
                                         "in signature def")
        if "instances" in request and "inputs" in request:
            raise ServingError(_INVALID, "Not formatted correctly expecting only one of "
                                         "'inputs' or 'instances' keys to exist")
        if "instances" not in request and "inputs" not in request:
            raise ServingError(_INVALID, "Missing 'inputs' or 'instances' key")
        aliases = sorted(signature.inputs)
        columns = {}
        if "instances" in request:
            rows = request["instances"]
            if not isinstance(rows, list):
                raise ServingError(_INVALID, "Expecting 'instances' to be an list/array")
            if not rows:
                raise ServingError(_INVALID, "No values in 'instances' array")
            named = len(aliases) > 1 or (isinstance(rows[0], dict) and set(rows[0]) == set(
                aliases) and "b64" not in rows[0])
            for alias in aliases:
                if named:
                    for row in rows:
                        if not isinstance(row, dict) or set(row) != set(aliases):
                            raise ServingError(_INVALID, "Expecting object but got list or "
                                                         "object with wrong keys, expected: "
                                                         f"{{{','.join(aliases)}}}")
                    columns[alias] = [row[alias] for row in rows]
                else:
                    columns[alias] = rows
        else:
            inputs = request["inputs"]
            if isinstance(inputs, dict) and "b64" not in inputs:
                columns = inputs
            elif len(aliases) == 1:
                columns = {aliases[0]: inputs}
            else:
                raise ServingError(_INVALID, "Expecting 'inputs' to be an object with keys "
                                             f"{{{','.join(aliases)}}}")
        predict = predict_pb2.PredictRequest(model_spec=spec)
        for alias, value in columns.items():
            dtype = signature.inputs[alias].dtype if alias in signature.inputs else (
                types_pb2.DT_FLOAT)
            predict.inputs[alias].CopyFrom(from_ndarray(json_to_array(value, dtype), dtype=dtype))
        response = self.runner.predict(_inference.Pinned(servable), predict, deadline)
        outputs = {alias: to_ndarray(t) for alias, t in response.outputs.items()}
        if "instances" in request:
            batch = {a.shape[0] if a.ndim else None for a in outputs.values()}
            if len(batch) != 1 or None in batch:
                name = sorted(outputs)[0]
                raise ServingError(_INVALID, f"Tensor name: {name} has inconsistent batch size")
            if len(outputs) == 1:
                (alias, array), = outputs.items()
                return {"predictions": _to_json(array, alias)}
            n = batch.pop()
            return {"predictions": [{a: _to_json(v[i], a) for a, v in sorted(outputs.items())}
                                    for i in range(n)]}
        if len(outputs) == 1:
            (alias, array), = outputs.items()
            return {"outputs": _to_json(array, alias)}
        return {"outputs": {a: _to_json(v, a) for a, v in sorted(outputs.items())}}

    def _classify_or_regress(self, verb, spec, request, deadline):
        examples = request.get("examples")
        if not isinstance(examples, list):
            raise ServingError(_INVALID, "Expected 'examples' key with an array of objects.")
        if "context" in request:
            example_input = {"example_list_with_context": {
                "examples": [_example(e) for e in examples],
                "context": _example(request["context"])}}
        else:
            example_input = {"example_list": {"examples": [_example(e) for e in examples]}}
        if verb == "classify":
            message = classification_pb2.ClassificationRequest(model_spec=spec, input=example_input)
            response = self.runner.classify(self.manager, message, deadline)
            return {"results": [[[c.label, _round(c.score)] for c in row.classes]
                                for row in response.result.classifications]}
        message = regression_pb2.RegressionRequest(model_spec=spec, input=example_input)
        response = self.runner.regress(self.manager, message, deadline)
        return {"results": [_round(r.value) for r in response.result.regressions]}


def _round(value):
    return value if math.isnan(value) or math.isinf(value) else float(str(np.float32(value)))


def make_http_server(api, host, port):
    """Returns a `ThreadingHTTPServer` serving `api`; `serve_forever()` it in a thread."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, method):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
            status, payload = api.handle(method, self.path, body)
            data = json.dumps(payload, indent=None).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self._answer("GET")

        def do_POST(self):  # noqa: N802
            self._answer("POST")

        def log_message(self, format, *args):  # noqa: A002
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = False
    return server
