"""Input bounds before allocation (issue 8, item 5).

Typed TensorProto fields broadcast their last value, so a few bytes can declare gigabytes.
Unit tests pin the shape checks and caps of `serving._tensors` / `decode_inputs` /
`json_to_array`; the last test starts the real server on 127.0.0.1 with the tiny model, sends
a hostile set over gRPC and REST, checks each typed answer, that Predict still works after, and
that the server's peak RSS (VmHWM) stayed under `RSS_CAP_BYTES` (1.75 GiB) and grew by less
than `GROWTH_CAP_BYTES` over its RSS when ready.
"""

import json
import socket
import tracemalloc

import grpc
import numpy as np
import pytest
from _serving_fixtures import TINY, ServerProcess, copy_version, tiny_version
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving import _inference
from serving._errors import ServingError
from serving._rest import json_to_array
from serving._tensors import (
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_MAX_STRINGS,
    TensorLimitError,
    TensorParseError,
    to_ndarray,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
# Peak RSS (VmHWM) of the server process, TF and the tiny model included: about 620 MiB when
# ready, plus at most ~26 x the 32 MiB REST body cap for the JSON parser's worst case (a body
# of empty lists), plus margin. The growth over the ready RSS is checked on its own too.
RSS_CAP_BYTES = 1792 << 20  # 1.75 GiB
GROWTH_CAP_BYTES = 26 * (32 << 20) + (64 << 20)  # 896 MiB
SIZE = TINY["image_size"]


def _proto(shape, dtype=types_pb2.DT_FLOAT, **fields):
    proto = tensor_pb2.TensorProto(dtype=dtype, **fields)
    for size in shape:
        proto.tensor_shape.dim.add().size = size
    return proto


def test_default_caps_are_documented_values():
    assert DEFAULT_MAX_ELEMENTS == 256 * 227 * 227 * 3 == 39_574_272
    assert DEFAULT_MAX_STRINGS == 2 ** 20


@pytest.mark.parametrize("shape, dtype, fields, gist", [
    ([11000, 67, 67, 3], types_pb2.DT_FLOAT, {"float_val": [1.0]}, "39574272 elements"),
    ([10 ** 6, 10 ** 6], types_pb2.DT_FLOAT, {"float_val": [1.0]}, "1000000000000 elements"),
    ([DEFAULT_MAX_ELEMENTS // 2 + 1], types_pb2.DT_DOUBLE, {"double_val": [1.0]},
     "4-byte units"),
    ([DEFAULT_MAX_ELEMENTS // 4 + 1], types_pb2.DT_COMPLEX128, {}, "4-byte units"),
    ([2 ** 20 + 1], types_pb2.DT_STRING, {"string_val": [b"x"]}, "1048576 strings"),
    ([2 ** 40], types_pb2.DT_STRING, {}, "strings per request"),
])
def test_declared_size_over_the_cap_is_refused_before_allocating(shape, dtype, fields, gist):
    proto = _proto(shape, dtype, **fields)
    tracemalloc.start()
    try:
        with pytest.raises(TensorLimitError) as info:
            to_ndarray(proto)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert gist in str(info.value) and "max_request_" in str(info.value)
    assert peak < 1 << 20  # nothing near the declared size was allocated


def test_exactly_the_cap_decodes_and_broadcasts():
    array = to_ndarray(_proto([256, 227, 227, 3], float_val=[0.0, 2.5]))
    assert array.shape == (256, 227, 227, 3) and array.dtype == np.float32
    assert array.reshape(-1)[0] == 0.0 and array.reshape(-1)[-1] == 2.5
    del array
    strings = to_ndarray(_proto([2 ** 20], types_pb2.DT_STRING, string_val=[b"a", b"b"]))
    assert strings.shape == (2 ** 20,) and strings[0] == b"a" and strings[-1] == b"b"


@pytest.mark.parametrize("proto", [
    _proto([-1, 3], float_val=[1.0]),
    _proto([3, -5]),
    _proto([-(2 ** 63)]),
    _proto([2 ** 62, 2 ** 62], float_val=[1.0]),      # product overflows int64
    _proto([2 ** 32, 2 ** 32]),                         # wraps to 0 in int64 np.prod
    _proto([1] * 65, float_val=[1.0]),                  # rank over NumPy's 64
    _proto([0, 2 ** 62]),                               # valid in TF, not in NumPy
    _proto([1, SIZE, SIZE, 3], tensor_content=b"\0" * 5),
    _proto([2], tensor_content=b"\0" * 12),
    _proto([2], types_pb2.DT_STRING, tensor_content=b"ab"),
    tensor_pb2.TensorProto(dtype=999),
    tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT,
                           tensor_shape={"unknown_rank": True}),
], ids=["negative", "negative-2", "int64-min", "overflow", "wrap-to-zero", "rank-65",
        "numpy-too-big", "content-short", "content-long", "content-string", "dtype-999",
        "unknown-rank"])
def test_invalid_shapes_and_contents_raise_tensor_parse_error(proto):
    with pytest.raises(TensorParseError):
        to_ndarray(proto)


def test_narrow_integer_and_half_values_keep_the_low_bits_like_tensorflow():
    assert to_ndarray(_proto([3], types_pb2.DT_UINT8, int_val=[300, -1, 7])).tolist() == [
        44, 255, 7]
    assert to_ndarray(_proto([2], types_pb2.DT_INT8, int_val=[200, 5])).tolist() == [-56, 5]
    half = to_ndarray(_proto([2], types_pb2.DT_HALF, half_val=[0x3C00 + 65536, -1]))
    assert half[0] == 1.0 and half.view(np.uint16)[1] == 0xFFFF
    assert to_ndarray(_proto([2], types_pb2.DT_COMPLEX64, scomplex_val=[1, 2, 3])).tolist() == [
        1 + 2j, 1 + 2j]  # the odd last value is ignored, as TF's pair count does


def _signature(**inputs):
    signature = meta_graph_pb2.SignatureDef()
    for alias, dtype in inputs.items():
        signature.inputs[alias].dtype = dtype
    return signature


def test_decode_inputs_sums_the_request_and_names_the_cap():
    signature = _signature(a=types_pb2.DT_FLOAT, b=types_pb2.DT_FLOAT)
    half = DEFAULT_MAX_ELEMENTS // 2 + 1
    inputs = {"a": _proto([half], float_val=[1.0]), "b": _proto([half], float_val=[1.0])}
    with pytest.raises(ServingError) as info:
        _inference.decode_inputs(signature, inputs)
    assert info.value.code == INVALID
    assert info.value.message.startswith("tensor parsing error: b: ")
    assert f"limit of {DEFAULT_MAX_ELEMENTS} elements" in info.value.message
    decoded = _inference.decode_inputs(signature, inputs, max_elements=None)
    assert decoded["a"][0].shape == (half,)
    with pytest.raises(ServingError) as info:
        _inference.decode_inputs(signature, {"a": _proto([10]), "b": _proto([11])},
                                 max_elements=20)
    assert "limit of 20 elements" in info.value.message
    with pytest.raises(ServingError) as info:  # TF Serving's row-10 text for a bad shape
        _inference.decode_inputs(signature, {"a": _proto([-1]), "b": _proto([1])})
    assert info.value.message == "tensor parsing error: a"


def test_runner_caps_are_keywords():
    runner = _inference.Runner(max_request_elements=7, max_request_strings=3)
    assert (runner.max_request_elements, runner.max_request_strings) == (7, 3)
    assert _inference.Runner().max_request_elements == DEFAULT_MAX_ELEMENTS


def test_json_to_array_caps_the_shape_before_converting():
    with pytest.raises(ServingError) as info:
        json_to_array([[0.5] * 10] * 10, types_pb2.DT_FLOAT, max_elements=99)
    assert info.value.code == INVALID and "limit of 99 elements" in info.value.message
    with pytest.raises(ServingError) as info:
        json_to_array(["a"] * 10, types_pb2.DT_STRING, max_strings=9)
    assert "limit of 9 strings" in info.value.message
    with pytest.raises(ServingError) as info:  # other inputs of the request count too
        json_to_array([1.0] * 10, types_pb2.DT_FLOAT, max_elements=15, used=6)
    assert "16 elements" in info.value.message
    assert json_to_array([[1, 2]], types_pb2.DT_INT32, max_elements=2).tolist() == [[1, 2]]
    with pytest.raises(ServingError) as info:
        json_to_array([2 ** 31], types_pb2.DT_INT32)
    assert "is not of expected type: int32" in info.value.message


# The real server under a hostile set of requests.


def _vm(pid, key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _http(port, raw, send_after=b"", shut_write=False, timeout=60):
    """Sends raw bytes, returns (status, parsed JSON body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        if send_after:
            try:
                sock.sendall(send_after)
            except OSError:
                pass
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        try:
            while True:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep:
                    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")]
                    if length and len(body) >= length[0]:
                        break
        except ConnectionResetError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _post(path, body, extra=b""):
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(
        body) + extra + b"\r\n" + body)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    copy_version(tiny_version(0), root / "alexnet", 1)
    process = ServerProcess(root, "--model_name=alexnet",
                            f"--model_base_path={root / 'alexnet'}", rest=True)
    try:
        yield process.start()
    finally:
        process.kill()


def test_hostile_requests_get_typed_errors_and_rss_stays_bounded(server):
    pid = server.process.pid
    rss_ready = _vm(pid, "VmRSS")
    channel = grpc.insecure_channel(server.address)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    results = []

    def grpc_case(name, signature, alias, proto, code=INVALID, gist=None):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "alexnet"
        request.model_spec.signature_name = signature
        request.inputs[alias].CopyFrom(proto)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request, timeout=60)
        assert info.value.code() == code, (name, info.value.details())
        if gist:
            assert gist in info.value.details(), (name, info.value.details())
        results.append((name, f"{info.value.code().name}", len(request.SerializeToString())))

    def rest_case(name, raw, status, gist=None, **kwargs):
        got, body = _http(server.rest_port, raw, **kwargs)
        assert got == status, (name, got, body)
        assert isinstance(body["error"], str) and (gist is None or gist in body["error"]), (
            name, body)
        results.append((name, got, len(raw)))

    try:
        pixels = "serving_pixels"
        grpc_case("grpc pixels [11000,67,67,3], one float_val", pixels, "pixels",
                  _proto([11000, SIZE, SIZE, 3], float_val=[1.0]), gist="39574272")
        grpc_case("grpc pixels 1e12 elements", pixels, "pixels",
                  _proto([10 ** 6, 10 ** 6, 1, 1], float_val=[1.0]), gist="max_request_elements")
        grpc_case("grpc pixels int64 dims overflow", pixels, "pixels",
                  _proto([2 ** 62, 2 ** 62, 1, 1], float_val=[1.0]),
                  gist="tensor parsing error: pixels")
        grpc_case("grpc pixels negative dim", pixels, "pixels",
                  _proto([-1, SIZE, SIZE, 3], float_val=[1.0]))
        grpc_case("grpc pixels tensor_content 5 bytes", pixels, "pixels",
                  _proto([1, SIZE, SIZE, 3], tensor_content=b"\0" * 5))
        grpc_case("grpc pixels 30M doubles", pixels, "pixels",
                  _proto([30_000_000, 1, 1, 1], types_pb2.DT_DOUBLE, double_val=[1.0]),
                  gist="4-byte units")
        grpc_case("grpc pixels rank 100", pixels, "pixels", _proto([1] * 100, float_val=[1]))
        grpc_case("grpc pixels dtype 999", pixels, "pixels", _proto([1], 999))
        grpc_case("grpc images 2**21+1 strings declared", "serving_default", "images",
                  _proto([2 ** 21 + 1], types_pb2.DT_STRING, string_val=[b"x"]),
                  gist="1048576 strings")
        grpc_case("grpc images 2**40 strings declared", "serving_default", "images",
                  _proto([2 ** 40], types_pb2.DT_STRING), gist="max_request_strings")

        predict = "/v1/models/alexnet:predict"
        rest_case("rest JSON nested 100000 deep", _post(predict, b"[" * 100_000), 400,
                  "nested too deeply")
        rest_case("rest JSON tensor rank 70", _post(predict, b'{"signature_name": '
                  b'"serving_pixels", "inputs": ' + b"[" * 70 + b"1" + b"]" * 70 + b"}"), 400)
        rest_case("rest 2**20+1 strings", _post(predict, json.dumps(
            {"instances": ["a"] * (2 ** 20 + 1)}).encode()), 400, "1048576 strings")
        rest_case("rest Content-Length: abc", b"POST " + predict.encode() +
                  b" HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}", 400, "Content-Length")
        rest_case("rest Content-Length: -5", b"POST " + predict.encode() +
                  b" HTTP/1.1\r\nContent-Length: -5\r\n\r\n{}", 400, "Content-Length")
        rest_case("rest POST without Content-Length", b"POST " + predict.encode() +
                  b" HTTP/1.1\r\n\r\n{}", 411)
        rest_case("rest declared 1 TB body", b"POST " + predict.encode() +
                  b" HTTP/1.1\r\nContent-Length: 1000000000000\r\n\r\n", 413, "larger than")
        rest_case("rest 32 MiB + 1 body sent", b"POST " + predict.encode() +
                  b" HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % ((32 << 20) + 1), 413,
                  send_after=b" " * (1 << 20))
        rest_case("rest truncated body", b"POST " + predict.encode() +
                  b" HTTP/1.1\r\nContent-Length: 100000\r\n\r\n{\"inputs\": [1,", 400,
                  "truncated", shut_write=True)
        rest_case("rest PUT", b"PUT " + predict.encode() + b" HTTP/1.1\r\n"
                  b"Content-Length: 2\r\n\r\n{}", 405)
        # Bodies just under the 32 MiB cap that parse, then fail their shape: JSON numbers
        # (8.4M floats), and the parser's worst case, empty lists (24x the body in objects).
        floats = b'{"signature_name": "serving_pixels", "inputs": [[' + b"0.5," * (
            (32 << 20) // 4 - 20) + b"0.5], [0.5]]}"
        rest_case("rest 32 MiB ragged float JSON", _post(predict, floats), 400,
                  "Expecting tensor size")
        del floats
        lists = b'{"instances": [' + b"[]," * ((32 << 20) // 3 - 10) + b"1]}"
        rest_case("rest 32 MiB of empty lists", _post(predict, lists), 400,
                  "Expecting tensor size")
        del lists
        assert _vm(pid, "VmHWM") < RSS_CAP_BYTES

        # Still serving afterwards, on both front ends.
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "alexnet"
        request.model_spec.signature_name = "serving_pixels"
        request.inputs["pixels"].CopyFrom(_proto([2, SIZE, SIZE, 3], float_val=[0.5]))
        response = stub.Predict(request, timeout=60)
        assert list(response.outputs["scores"].tensor_shape.dim[0:1])[0].size == 2
        status, body = _http(server.rest_port, _post(predict, json.dumps(
            {"signature_name": "serving_pixels",
             "instances": np.full((1, SIZE, SIZE, 3), 0.5).tolist()}).encode()))
        assert status == 200 and len(body["predictions"]) == 1
    finally:
        channel.close()
    peak = _vm(pid, "VmHWM")
    rss_after = _vm(pid, "VmRSS")
    report = "\n".join(f"  {name}: {code} ({size} bytes sent)" for name, code, size in results)
    print(f"\nhostile set:\n{report}\nRSS when ready {rss_ready >> 20} MiB, after "
          f"{rss_after >> 20} MiB, peak (VmHWM) {peak >> 20} MiB, cap {RSS_CAP_BYTES >> 20} MiB")
    assert server.process.poll() is None
    assert peak < RSS_CAP_BYTES, f"peak RSS {peak >> 20} MiB"
    assert peak - rss_ready < GROWTH_CAP_BYTES, f"grew {(peak - rss_ready) >> 20} MiB"


def test_server_flags_set_the_request_caps(tmp_path):
    # 67x67x3 pixels = 13467 elements: over a cap of 10000, under the default.
    copy_version(tiny_version(0), tmp_path / "alexnet", 1)
    process = ServerProcess(tmp_path, "--model_name=alexnet",
                            f"--model_base_path={tmp_path / 'alexnet'}",
                            "--max_request_elements=10000", "--rest_api_max_body_bytes=1000",
                            rest=True)
    try:
        process.start()
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "alexnet"
        request.model_spec.signature_name = "serving_pixels"
        request.inputs["pixels"].CopyFrom(_proto([1, 67, 67, 3], float_val=[0.0]))
        with grpc.insecure_channel(process.address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                    request, timeout=60)
        assert info.value.code() == INVALID
        assert "limit of 10000 elements" in info.value.details()
        body = json.dumps({"instances": [0.0] * 400}).encode()
        status, answer = _http(process.rest_port, _post("/v1/models/alexnet:predict", body))
        assert status == 413 and "error" in answer
    finally:
        process.kill()
