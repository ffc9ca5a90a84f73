"""TF Serving's REST API (`--rest_api_port`) on the standard library's HTTP server.

Routes, JSON tensor formats and error mapping follow `http_rest_api_handler.cc` and
`json_tensor.cc`: `POST /v1/models/NAME[/versions/N|/labels/L]:(predict|classify|regress)`,
`GET` of the same prefix for status and `+/metadata` for metadata, errors as `{"error": ...}`;
other `/v1/` paths are 400 `Malformed request`, paths outside `/v1/` 404 (no handler in TF
Serving's HTTP server). With a metrics path (`--monitoring_config_file`), GET there answers the
Prometheus text page (`serving._metrics`), other methods 405 with `Allow: GET`.

Hardening (TF Serving's libevent server has no such limits; these are this server's, each a
keyword of `make_http_server` / `json_to_array` / `RestApi`):

* `DEFAULT_MAX_BODY_BYTES` = 32 MiB request body. The gRPC side sets no receive limit
  (`grpc.max_receive_message_length` = -1, as TF Serving's INT32_MAX), so REST gets its own
  cap: a larger `Content-Length` is answered 413 before any of the body is read. Python's JSON
  parser holds 4x (small ints) to 24x (`[],[],...`) the body in objects, 14x for pixel rows
  `[0.5,0.5,0.5],`, so one request's transient memory stays under about 26 x 32 MiB = 832 MiB
  (body, its text and the parsed value); 32 MiB carries about 20 float32 227x227 images as JSON
  numbers, or a few hundred base64 JPEGs.
* `Content-Length` must be one decimal integer (else 400); a POST without one (including
  chunked uploads, which are not supported) gets 411; a body shorter than declared gets 400
  when the client closes, 408 when the read time runs out. These errors close the connection.
* `DEFAULT_READ_TIMEOUT_S` = 30 s: the idle wait for a request on a (keep-alive) connection is
  bounded by it, and so, separately, is receiving one request's headers and body, however
  slowly the bytes trickle in; an idle connection is then closed, a half-read request gets 408.
* `MAX_JSON_DEPTH`: JSON nested deeper than Python's parser allows (about 1000 levels) is 400
  `JSON Parse error: ... nested too deeply`, and tensors of rank over 64 are 400.
* The elements a Predict's JSON inputs hold are capped like gRPC's (`serving._tensors`,
  `DEFAULT_MAX_ELEMENTS` 4-byte elements, `DEFAULT_MAX_STRINGS` strings): 400 naming the cap.
* Methods other than GET and POST get 405 with `{"error": "Malformed request: <M> <path>"}` and
  `Allow: GET, POST` (TF Serving answers PUT/DELETE with 400 and that message), and every error
  the HTTP layer itself sends (bad request line, headers too large, ...) is JSON too.
* At most `max_concurrent_requests` (default 4 x CPUs, like `--rest_api_num_threads`) requests
  are decoded and run at once, so REST's transient memory is bounded by about
  max_concurrent_requests x 26 x max_body_bytes (bodies still being received add 1x each).
* The listening socket's backlog is `LISTEN_BACKLOG` (1024, capped by the kernel's
  somaxconn), not socketserver's 5: a burst of new connections (16 clients connecting at
  once) is queued by the kernel instead of dropped and retried a second later.
* Handler threads are daemon threads; `server_close()` (after `shutdown()`) closes idle and
  half-read connections at once, waits up to `close_timeout_s` (5 s) for requests being
  answered, then shuts down whatever is left.
"""

import base64
import io
import json
import logging
import math
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow.core.framework import tensor_pb2, types_pb2
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
from serving._metrics import DISABLED
from serving._tensors import (
    _DTYPES,
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_MAX_STRINGS,
    MAX_RANK,
    TensorLimitError,
    check_limits,
    dtype_name,
    from_ndarray,
    numpy_dtype,
    to_ndarray,
)

log = logging.getLogger("serving")

DEFAULT_MAX_BODY_BYTES = 32 << 20
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_CLOSE_TIMEOUT_S = 5.0
# Connections the kernel completes before the accept loop takes them (listen()'s backlog;
# the kernel caps it at net.core.somaxconn). socketserver's default of 5 makes the 7th of
# a burst of new connections wait for a SYN retransmission (1 s, then 3 s, ...).
LISTEN_BACKLOG = 1024
MAX_JSON_DEPTH = 1000  # what `json.loads` reaches before RecursionError (sys.getrecursionlimit)
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_INT_RANGES = {k: (int(np.iinfo(v[0]).min), int(np.iinfo(v[0]).max))
               for k, v in _DTYPES.items() if np.dtype(v[0]).kind in "iu"}
_API_PATH = re.compile(r"/v1/.*", re.IGNORECASE | re.DOTALL)  # kHTTPRestApiHandlerPathRegex
_API_NAMES = {"predict": "Predict", "classify": "Classify", "regress": "Regress"}
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


def _snippet(value, limit=1100, depth=0):
    """`json.dumps(value)` cut to about `limit` chars, bounded in time and depth (for messages)."""
    if isinstance(value, list):
        parts, size = [], 2
        for item in value:
            if size > limit:
                parts.append("...")
                break
            part = _snippet(item, limit - size, depth + 1) if depth < 64 else "..."
            parts.append(part)
            size += len(part) + 2
        return "[" + ", ".join(parts) + "]"
    if isinstance(value, dict):
        parts, size = [], 2
        for key, item in value.items():
            if size > limit:
                parts.append("...")
                break
            part = (_snippet(key, limit - size) + ": " + (
                _snippet(item, limit - size, depth + 1) if depth < 64 else "..."))
            parts.append(part)
            size += len(part) + 2
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, str) and len(value) > limit:
        return json.dumps(value[:limit])[:-1] + "..."
    return json.dumps(value)


def _type_error(value, dtype):
    return ServingError(_INVALID, f"JSON Value: {_snippet(value)} Type: {_json_type(value)} "
                                  f"is not of expected type: {dtype_name(dtype)}")


def _utf8(text):
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        raise ServingError(_INVALID, "JSON Parse error: The surrogate pair in string is "
                                     "invalid.") from None


def _scalar(value, dtype):
    if dtype == types_pb2.DT_STRING:
        if isinstance(value, str):
            return _utf8(value)
        if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except ValueError:
                raise ServingError(_INVALID, "Unable to base64 decode: "
                                             f"{_snippet(value['b64'])[1:-1]}") from None
        raise _type_error(value, dtype)
    if dtype == types_pb2.DT_BOOL:
        if isinstance(value, bool):
            return value
        raise _type_error(value, dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(value, dtype)
    if dtype in _INT_RANGES:
        if isinstance(value, float) and not value.is_integer():
            raise _type_error(value, dtype)
        low, high = _INT_RANGES[dtype]
        if not low <= value <= high:  # rapidjson: not an Int/Int64/Uint/Uint64 of that range
            raise _type_error(value, dtype)
        return int(value)
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # over 1.8e308: not a JSON double
            raise _type_error(value, dtype) from None
    return value


def _shape_of(value):
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if len(shape) > MAX_RANK:
            raise ServingError(_INVALID, f"Tensor of rank more than {MAX_RANK} (JSON arrays "
                                         f"nested more than {MAX_RANK} deep) is not supported")
        value = value[0] if value else None
    return shape


def json_to_array(value, dtype, max_elements=DEFAULT_MAX_ELEMENTS,
                  max_strings=DEFAULT_MAX_STRINGS, used=0, used_strings=0):
    """Converts a JSON value (nested lists, `{"b64": ...}` for strings) to a NumPy array.

    The shape (the lengths along the first elements) is checked against `max_elements`
    4-byte elements and, for DT_STRING, `max_strings` (None = no cap) before conversion;
    `used` and `used_strings` are what other inputs of the same request already took.

    Raises:
        ServingError: INVALID_ARGUMENT for a value of the wrong type or shape, a dtype this
            server cannot hold, or a tensor over a cap.
    """
    if dtype not in _DTYPES:
        raise ServingError(_INVALID, f"Unsupported tensor dtype: {dtype_name(dtype)}")
    shape = _shape_of(value)
    n = 1
    for size in shape:
        n *= size
    units = n * max(1, numpy_dtype(dtype).itemsize // 4) if dtype != types_pb2.DT_STRING else n
    try:
        check_limits(used + units, used_strings + (n if dtype == types_pb2.DT_STRING else 0),
                     max_elements, max_strings)
    except TensorLimitError as e:
        raise ServingError(_INVALID, f"JSON tensor too large: {e}") from None
    # The output is allocated once and filled row by row (no list of all the scalars).
    out = np.empty(n, dtype=object if dtype == types_pb2.DT_STRING else numpy_dtype(dtype))
    if not shape:
        if isinstance(value, list):
            raise ServingError(_INVALID, f"Expecting a scalar but got: {_snippet(value)}")
        out[0] = _scalar(value, dtype)
        return out.reshape(shape)
    filled = 0
    with np.errstate(over="ignore", invalid="ignore"):  # 1e39 as float32 is inf, as in TF
        # Depth-first over a stack of iterators, one per level: O(rank) extra memory.
        stack, item = [], value
        while True:
            depth = len(stack)
            if not isinstance(item, list) or len(item) != shape[depth]:
                raise ServingError(_INVALID, "Expecting tensor size: "
                                             f"{shape[depth]} but got: {_snippet(item)}")
            if depth + 1 < len(shape):
                stack.append(iter(item))
            else:
                _fill(out, filled, item, dtype)
                filled += len(item)
            while stack:
                item = next(stack[-1], _END)
                if item is not _END:
                    break
                stack.pop()
            else:
                break
    return out.reshape(shape)


_CHUNK = 1 << 16
_END = object()
_FAST_TYPES = {types_pb2.DT_BOOL: (bool,), types_pb2.DT_FLOAT: (float, int),
               types_pb2.DT_DOUBLE: (float, int), types_pb2.DT_HALF: (float, int)}
_FAST_TYPES.update({k: (int,) for k in _INT_RANGES})


def _fill(out, start, items, dtype):
    """Writes the JSON scalars `items` into `out[start:]` in bounded chunks: a plain
    all-numbers chunk is assigned by NumPy, anything else goes through `_scalar` (which raises
    TF Serving's type errors)."""
    fast = _FAST_TYPES.get(dtype, ())
    for i in range(0, len(items), _CHUNK):
        chunk = items[i:i + _CHUNK]
        if fast and all(type(x) in fast for x in chunk):
            try:
                out[start + i:start + i + len(chunk)] = chunk
                continue
            except (OverflowError, ValueError, TypeError):
                pass  # out of range: let _scalar name the value
        converted = []
        for item in chunk:
            if isinstance(item, list):
                raise ServingError(_INVALID, f"Expecting a scalar but got: {_snippet(item)}")
            converted.append(_scalar(item, dtype))
        out[start + i:start + i + len(converted)] = converted


def _content_proto(array, dtype):
    """A TensorProto holding `array` as `tensor_content` (strings: typed `string_val`)."""
    if dtype == types_pb2.DT_STRING:
        return from_ndarray(array, dtype=dtype)
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for size in array.shape:
        proto.tensor_shape.dim.add().size = size
    proto.tensor_content = np.ascontiguousarray(array, dtype=numpy_dtype(dtype)).tobytes()
    return proto


def _to_json(array, alias):
    if array.dtype == object:
        if alias.endswith("_bytes"):
            convert = lambda v: {"b64": base64.b64encode(v).decode("ascii")}  # noqa: E731  one-line converters
        else:
            convert = lambda v: v.decode("utf-8", "replace")  # noqa: E731  one-line converters
    elif array.dtype.kind == "f":
        convert = lambda v: float(str(v))  # noqa: E731  shortest float32 text
    elif array.dtype.kind == "b":
        convert = bool
    elif array.dtype.kind == "c":
        convert = lambda v: [float(v.real), float(v.imag)]  # noqa: E731  one-line converters
    else:
        convert = int
    if array.ndim == 0:
        return convert(array.item() if array.dtype != object else array[()])
    return [_to_json(row, alias) for row in array] if array.ndim > 1 else [
        convert(v) for v in array]


_INT64 = (-(1 << 63), (1 << 63) - 1)


def _feature(value):
    values = value if isinstance(value, list) else [value]
    feature = feature_pb2.Feature()
    if values and all((isinstance(v, bool) or isinstance(v, int)) and
                      _INT64[0] <= v <= _INT64[1] for v in values):
        feature.int64_list.value.extend(int(v) for v in values)
    elif values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        try:
            feature.float_list.value.extend(float(v) for v in values)
        except OverflowError:
            raise ServingError(_INVALID, f"JSON Value: {_snippet(value)} is out of range for "
                                         "a float feature") from None
    else:
        feature.bytes_list.value.extend(_scalar(v, types_pb2.DT_STRING) for v in values)
    return feature


def _example(obj):
    if not isinstance(obj, dict):
        raise ServingError(_INVALID, "Expected 'examples' to be an array of objects.")
    example = example_pb2.Example()
    for name, value in obj.items():
        _utf8(name)
        example.features.feature[name].CopyFrom(_feature(value))
    return example


class RestApi:
    """Answers REST requests with the same handlers as gRPC.

    Args:
        manager: the `ModelManager`.
        runner: the `_inference.Runner`.
        timeout_s: run timeout for each request (`--rest_api_timeout_in_ms`).
        max_request_elements: cap on the 4-byte elements of all of a Predict's JSON inputs
            (None = no cap); default `serving._tensors.DEFAULT_MAX_ELEMENTS`.
        max_request_strings: cap on their strings; default `DEFAULT_MAX_STRINGS`.
        metrics: a `serving._metrics.Metrics`, told of every `/v1/` request.
    """

    def __init__(self, manager, runner, timeout_s=30.0, max_request_elements=DEFAULT_MAX_ELEMENTS,
                 max_request_strings=DEFAULT_MAX_STRINGS, metrics=DISABLED):
        self.manager, self.runner, self.timeout_s = manager, runner, timeout_s
        self.max_request_elements = max_request_elements
        self.max_request_strings = max_request_strings
        self.metrics = metrics

    def handle(self, method, path, body):
        """Returns (http status, JSON-able object) for one request.

        Paths outside `/v1/` are 404 `Not Found: <path>`, as TF Serving's HTTP server has no
        handler for them (and they are not counted in the metrics).
        """
        if not _API_PATH.fullmatch(path.split("?", 1)[0]):
            return 404, {"error": f"Not Found: {path.split('?', 1)[0][:200]}"}
        start, call = time.monotonic(), {"api": "", "verb": "", "model": "", "signature": ""}
        code = grpc.StatusCode.OK
        try:
            answer = 200, self._dispatch(method, path, body, call)
        except ServingError as e:
            code, answer = e.code, (http_status(e.code), {"error": e.message})
        except RecursionError:
            code = _INVALID
            answer = 400, {"error": "JSON Parse error: The document is nested too deeply"}
        except MemoryError:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            answer = 429, {"error": "Out of memory while handling the request"}
        except Exception as e:  # Never drop the connection without an answer.
            code, answer = grpc.StatusCode.UNKNOWN, (500, {"error": f"{type(e).__name__}: {e}"})
        # http_server.cc: every /v1/ request, API label = the verb ("" for GETs).
        self.metrics.request("REST", call["api"], call["model"], call["signature"], code,
                             time.monotonic() - start, tf_api=call["verb"])
        return answer

    def _dispatch(self, method, path, body, call):
        """Answers one `/v1/` request; fills `call` (API, verb, model and signature names)
        for the metrics as far as the request gets."""
        path = path.split("?", 1)[0]
        match = _ROUTE.fullmatch(path)
        verb = (match.group("verb") or "").lower() if match else ""
        if not match or (method == "GET") == bool(verb) or method not in ("GET", "POST") or (
                verb and match.group("metadata")):
            raise ServingError(_INVALID, f"Malformed request: {method} {path}")
        if not match.group("name"):
            raise ServingError(_INVALID, "Missing model name in request.")
        call["model"], call["verb"] = match.group("name"), verb
        call["api"] = _API_NAMES.get(verb) or (
            "GetModelMetadata" if match.group("metadata") else "GetModelStatus")
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
        _utf8(signature_name)
        spec.signature_name = signature_name
        call["signature"] = signature_name or _inference.DEFAULT_SIGNATURE
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
        except RecursionError:
            raise ServingError(_INVALID, "JSON Parse error: The document is nested too deeply "
                                         f"(more than about {MAX_JSON_DEPTH} levels)") from None
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
        used = strings = 0
        for alias, value in columns.items():
            _utf8(alias)
            dtype = signature.inputs[alias].dtype if alias in signature.inputs else (
                types_pb2.DT_FLOAT)
            array = json_to_array(value, dtype, self.max_request_elements,
                                  self.max_request_strings, used, strings)
            used += array.size * max(1, array.itemsize // 4) if array.dtype != object else (
                array.size)
            strings += array.size if array.dtype == object else 0
            predict.inputs[alias].CopyFrom(_content_proto(array, dtype))
            del array
            columns[alias] = None  # let the parsed JSON go before the model runs
        instances = "instances" in request
        request.pop("instances", None)
        request.pop("inputs", None)
        value = rows = None
        response = self.runner.predict(_inference.Pinned(servable), predict, deadline)
        outputs = {alias: to_ndarray(t, None, None) for alias, t in response.outputs.items()}
        if instances:
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


class _DeadlineReader(io.RawIOBase):
    """The socket's reading side, each `recv` limited to what is left of `handler.deadline`,
    so that bytes trickling in cannot stretch one request's read time."""

    def __init__(self, handler):
        super().__init__()
        self.handler = handler

    def readable(self):
        return True

    def readinto(self, buffer):
        left = self.handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("read timed out")
        self.handler.connection.settimeout(None if left == math.inf else left)
        return self.handler.connection.recv_into(buffer)


class _Connection:
    __slots__ = ("busy",)

    def __init__(self):
        self.busy = False


class RestHTTPServer(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` whose daemon handler threads and open connections it tracks, so
    that `shutdown()` + `server_close()` end every connection promptly (see the module doc)."""

    daemon_threads = True
    block_on_close = False  # server_close drains connections itself, with a bound
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, handler, close_timeout_s=DEFAULT_CLOSE_TIMEOUT_S):
        self.close_timeout_s = close_timeout_s
        self.closing = False
        self._lock = threading.Lock()
        self._connections = {}
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._lock:
            if self.closing:
                self.shutdown_request(request)
                return
            self._connections[request] = _Connection()
        super().process_request(request, client_address)

    def connection_state(self, request):
        with self._lock:
            return self._connections.get(request) or _Connection()

    def shutdown_request(self, request):
        with self._lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def open_connections(self):
        """How many client connections are open."""
        with self._lock:
            return len(self._connections)

    def _shut(self, busy_too):
        with self._lock:
            for sock, state in list(self._connections.items()):
                if busy_too or not state.busy:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            return len(self._connections)

    def server_close(self):
        """Closes the listening socket, then idle and half-read connections at once; waits up
        to `close_timeout_s` for requests being answered, then shuts the rest down."""
        super().server_close()
        with self._lock:
            self.closing = True
        deadline = time.monotonic() + self.close_timeout_s
        while self._shut(busy_too=False) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._shut(busy_too=True)

    def handle_error(self, request, client_address):
        log.debug("REST connection from %s failed", client_address, exc_info=True)


def make_http_server(api, host, port, *, max_body_bytes=DEFAULT_MAX_BODY_BYTES,
                     read_timeout_s=DEFAULT_READ_TIMEOUT_S,
                     close_timeout_s=DEFAULT_CLOSE_TIMEOUT_S, max_concurrent_requests=None,
                     metrics=DISABLED, metrics_path=None):
    """Returns a `RestHTTPServer` serving `api`; `serve_forever()` it in a thread.

    Args:
        api: the `RestApi`.
        host, port: where to listen.
        max_body_bytes: the largest request body (413 beyond; None = no limit).
        read_timeout_s: bound on the idle wait for a request, and separately on receiving one
            request's headers and body (None = no bound).
        close_timeout_s: how long `server_close()` waits for requests being answered.
        max_concurrent_requests: how many requests are decoded and run at once (others wait,
            their bodies already read); default 4 x CPUs, as TF Serving's
            `--rest_api_num_threads`. JSON decoding holds several times the body in memory.
        metrics, metrics_path: GET `metrics_path` answers `metrics.exposition()`, the
            Prometheus text page (None: no page; the path is then 404 like any outside /v1/).
    """
    if max_concurrent_requests is None:
        max_concurrent_requests = 4 * (os.cpu_count() or 1)
    running = threading.BoundedSemaphore(max_concurrent_requests)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # TCP_NODELAY: the headers and the body are two writes, and on a kept-alive
        # connection Nagle's algorithm held the body back until the client's delayed ACK of
        # the headers (about 40 ms per request, measured by bench/: 48 ms -> 5.6 ms median).
        disable_nagle_algorithm = True
        timeout = read_timeout_s
        deadline = math.inf

        def setup(self):
            super().setup()
            self.state = self.server.connection_state(self.request)
            self.rfile.close()
            self.rfile = io.BufferedReader(_DeadlineReader(self))

        def _restart_clock(self):
            self.deadline = (math.inf if read_timeout_s is None
                             else time.monotonic() + read_timeout_s)

        def handle_one_request(self):
            if self.server.closing:
                self.close_connection = True
                return
            self._restart_clock()  # The idle wait for the request line.
            try:
                super().handle_one_request()
            except OSError:  # The client went away, or server_close shut the socket down.
                self.close_connection = True

        def parse_request(self):
            self._restart_clock()  # Headers and body.
            return super().parse_request()

        def _send_json(self, status, payload, close=False, headers=()):
            self._send(status, "application/json", json.dumps(payload, indent=None).encode(
                "utf-8"), close, headers)

        def _send(self, status, content_type, data, close=False, headers=()):
            if close:
                self.close_connection = True
            self.connection.settimeout(read_timeout_s)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers:
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            self.wfile.flush()

        def send_error(self, code, message=None, explain=None):
            """The HTTP layer's own errors (bad request line, headers too large, ...) as JSON."""
            self.close_connection = True
            if self.request_version == "HTTP/0.9":  # unparsed version: answer with headers
                self.request_version = "HTTP/1.1"
            try:
                phrase = self.responses[code][0]
            except KeyError:
                phrase = "Error"
            self._send_json(code, {"error": message or phrase}, close=True)

        def _content_length(self):
            """The declared body length, or None after answering an error."""
            lengths = self.headers.get_all("Content-Length") or []
            chunked = self.headers.get("Transfer-Encoding")
            if chunked and lengths:
                self._send_json(400, {"error": "Both Transfer-Encoding and Content-Length "
                                               "are set"}, close=True)
                return None
            if chunked or not lengths:
                if self.command == "POST":
                    self._send_json(411, {"error": "Length Required: a POST needs a "
                                                   "Content-Length header (chunked bodies "
                                                   "are not supported)"}, close=True)
                    return None
                return 0
            values = {v.strip() for v in lengths}
            value = values.pop()
            if values or not value.isascii() or not value.isdigit():
                self._send_json(400, {"error": "Invalid Content-Length: "
                                               f"{', '.join(lengths)[:100]}"}, close=True)
                return None
            length = int(value) if len(value) <= 30 else 10 ** 30
            if max_body_bytes is not None and length > max_body_bytes:
                self._send_json(413, {"error": f"Request body of {length} bytes is larger "
                                               f"than the limit of {max_body_bytes} bytes"},
                                close=True)
                return None
            return length

        def handle_expect_100(self):
            # Refuse a bad or oversized body before the client sends it.
            if self._content_length() is None:
                return False
            return super().handle_expect_100()

        def _read_body(self, length):
            """Reads `length` bytes, or answers 400/408 and returns None."""
            chunks, got = [], 0
            try:
                while got < length:
                    chunk = self.rfile.read1(min(length - got, 1 << 20))
                    if not chunk:
                        self._send_json(400, {"error": f"Request body truncated: got {got} "
                                                       f"of {length} bytes"}, close=True)
                        return None
                    chunks.append(chunk)
                    got += len(chunk)
            except TimeoutError:
                self._send_json(408, {"error": f"Request body not received in "
                                               f"{read_timeout_s:g} s: got {got} of {length} "
                                               "bytes"}, close=True)
                return None
            return b"".join(chunks)

        def _is_metrics_page(self):
            return metrics_path is not None and self.path.split("?", 1)[0] == metrics_path

        def _metrics_page(self, method):
            """The Prometheus page, outside the request semaphore so that scrapes still
            answer while inference requests fill it (and while models load)."""
            if method != "GET":
                self._not_allowed()
                return
            self.state.busy = True
            try:
                try:
                    content_type, data = metrics.exposition()
                except Exception as e:
                    log.warning("Rendering the metrics page failed", exc_info=True)
                    self._send_json(500, {"error": f"{type(e).__name__}: {e}"})
                    return
                self._send(200, content_type, data)
            finally:
                self.state.busy = False

        def _answer(self, method):
            length = self._content_length()
            if length is None:
                return
            data = self._read_body(length) if length else b""
            if data is None:
                return
            if self._is_metrics_page():
                self._metrics_page(method)
                return
            while not running.acquire(timeout=0.1):
                if self.server.closing:
                    self.close_connection = True
                    return
            self.state.busy = True
            try:
                body = data.decode("utf-8", "replace")
                del data
                status, payload = api.handle(method, self.path, body)
                del body
                if self.server.closing:
                    self.close_connection = True
                self._send_json(status, payload)
            finally:
                self.state.busy = False
                running.release()

        def do_GET(self):
            self._answer("GET")

        def do_POST(self):
            self._answer("POST")

        def _not_allowed(self):
            allow = "GET" if self._is_metrics_page() else "GET, POST"
            self._send_json(405, {"error": f"Malformed request: {self.command} "
                                           f"{self.path.split('?', 1)[0][:200]}"},
                            close=True, headers=[("Allow", allow)])

        def __getattr__(self, name):
            if name.startswith("do_"):  # PUT, DELETE, PATCH, HEAD, OPTIONS, anything else
                return self._not_allowed
            raise AttributeError(name)

        def log_message(self, format, *args):
            pass

    return RestHTTPServer((host, port), Handler, close_timeout_s=close_timeout_s)
