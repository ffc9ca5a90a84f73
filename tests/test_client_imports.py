"""`serving.client` loads its protos without TensorFlow's runtime or Keras (issue 9).

Every check runs in a fresh interpreter: what `import serving.client` pulls in depends on what
the process imported before, and pytest's process has TensorFlow loaded by other tests.
"""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = sorted((REPO / "tests" / "data" / "images").iterdir())[0]
# Lines TensorFlow's C++ runtime prints as it starts (absl's "I0000 00:00:..." prefix).
TF_LINE = re.compile(r"^(?:[IWEF]\d{4} |WARNING: All log messages before absl|.*oneDNN custom "
                     r"operations|.*cpu_feature_guard|To enable the following instructions)")
# `import serving.client` took ~2,890 modules (TensorFlow and Keras) before; now grpc, NumPy,
# protobuf and the protos (~330). The bound leaves room for other versions of those.
MAX_MODULES = 800


def _python(code, *args, timeout=120, env=None):
    """Runs `code` in a fresh interpreter in the repository; returns (stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def _result(stdout):
    return json.loads([x for x in stdout.splitlines() if x.startswith("RESULT")][-1][6:])


def _tf_lines(stderr):
    return [line for line in stderr.splitlines() if TF_LINE.match(line)]


def test_import_loads_neither_keras_nor_tensorflow_runtime():
    stdout, stderr = _python("""if True:
        import json, sys, time
        start = time.perf_counter()
        import serving.client
        seconds = time.perf_counter() - start
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "keras_alexnet")
                       or m == "tensorflow" or m.startswith("tensorflow."))
        finders = [type(f).__name__ for f in sys.meta_path]
        print("RESULT" + json.dumps(dict(heavy=heavy, modules=len(sys.modules),
                                         seconds=seconds, finders=finders)))
    """)
    result = _result(stdout)
    # No keras, no tensorflow.python, and no leftover `tensorflow.*` proto modules either: a
    # later import under `tensorflow.` runs the real package first.
    assert result["heavy"] == [], result["heavy"][:20]
    assert result["modules"] < MAX_MODULES, result["modules"]
    assert "_ProtoFinder" not in result["finders"]
    assert _tf_lines(stderr) == [], stderr[-2000:]


def test_request_round_trips_without_tensorflow():
    stdout, _ = _python("""if True:
        import json, sys
        from serving import client
        from serving._tensors import from_ndarray, to_ndarray
        import numpy as np
        images = [b"\\xff\\xd8jpeg", b"", b"\\x00" * 70000]
        request = client.build_predict_request(images, "alexnet", version=7)
        wire = client.predict_pb2.PredictRequest.FromString(request.SerializeToString())
        tensor = wire.inputs["images"]
        response = client.predict_pb2.PredictResponse()
        response.outputs["classes"].CopyFrom(from_ndarray(np.array([[3, 1]], np.int64)))
        response.outputs["scores"].CopyFrom(from_ndarray(np.array([[0.75, 0.25]], np.float32)))
        response.outputs["labels"].CopyFrom(from_ndarray(np.array([[b"cat", b"dog"]], object)))
        response = client.predict_pb2.PredictResponse.FromString(response.SerializeToString())
        print("RESULT" + json.dumps(dict(
            same=[x.hex() for x in to_ndarray(tensor).tolist()] == [x.hex() for x in images],
            dtype=tensor.dtype == client.types_pb2.DT_STRING,
            shape=[d.size for d in tensor.tensor_shape.dim],
            spec=[wire.model_spec.name, wire.model_spec.signature_name,
                  wire.model_spec.version.value],
            top=[list(p) for p in client.parse_predict_response(response)[0]],
            tensorflow="tensorflow" in sys.modules)))
    """)
    result = _result(stdout)
    assert result["same"] and result["dtype"] and result["shape"] == [3]
    assert result["spec"] == ["alexnet", "serving_default", 7]
    assert result["top"] == [["cat", 3, 0.75], ["dog", 1, 0.25]]
    assert not result["tensorflow"]


_AFTER_TENSORFLOW = """if True:
    import json, sys
    {load}
    request = client.build_predict_request([b"abc", b"de"], "alexnet")
    import tensorflow as tf
    import keras
    from serving._tensors import to_ndarray
    from tensorflow.core.framework import tensor_pb2
    ours = request.inputs["images"]
    theirs = tf.make_tensor_proto([[1.5, 2.5]])
    request.inputs["floats"].CopyFrom(theirs)  # a TF-made TensorProto inside our request
    again = client.predict_pb2.PredictRequest.FromString(request.SerializeToString())
    print("RESULT" + json.dumps(dict(
        constant=int(tf.constant(1).numpy()),
        ours=[x.decode() for x in tf.make_ndarray(ours).tolist()],
        theirs=to_ndarray(again.inputs["floats"]).tolist(),
        same_class=type(theirs) is type(ours) is tensor_pb2.TensorProto,
        parsed=tf.io.parse_tensor(tf.io.serialize_tensor([1, 2]), tf.int32).numpy().tolist(),
        keras=keras.layers.Dense(2)(tf.ones([1, 3])).shape.as_list(),
        getattr_left=[m for m, v in sys.modules.items() if m.startswith("tensorflow.")
                      and v is not None and "__getattr__" in vars(v)],
        finders=[type(f).__name__ for f in sys.meta_path])))
"""


def _check_after_tensorflow(result):
    assert result["constant"] == 1
    assert result["ours"] == ["abc", "de"]
    assert result["theirs"] == [[1.5, 2.5]]
    assert result["same_class"]
    assert result["parsed"] == [1, 2]
    assert result["keras"] == [1, 2]
    assert result["getattr_left"] == [] and "_ProtoFinder" not in result["finders"]


def test_tensorflow_imports_after_the_client_and_shares_its_proto_classes():
    stdout, _ = _python(_AFTER_TENSORFLOW.format(load="from serving import client"),
                        timeout=300)
    _check_after_tensorflow(_result(stdout))


def test_pure_python_protobuf_runtime_shares_the_classes_too():
    # Like upb, the pure-Python runtime caches message classes per descriptor.
    stdout, _ = _python(_AFTER_TENSORFLOW.format(load="from serving import client"),
                        timeout=300, env={"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"})
    _check_after_tensorflow(_result(stdout))


def test_falls_back_to_the_ordinary_import_when_a_proto_lives_elsewhere():
    # With no roots registered, `tensorflow.core` cannot be served without `tensorflow`: the
    # client must drop what it loaded and import the protos with TensorFlow after all.
    load = textwrap.indent(textwrap.dedent("""\
        import importlib.util
        path = "serving/client.py"
        source = open(path).read()
        roots = '_PROTO_ROOTS = ("core", "compiler", "tsl")'
        assert roots in source
        client = importlib.util.module_from_spec(
            importlib.util.spec_from_loader("fallback_client", loader=None))
        sys.modules["fallback_client"] = client
        exec(compile(source.replace(roots, "_PROTO_ROOTS = ()"), path, "exec"),
             vars(client))
        assert "tensorflow.python" in sys.modules, "the fallback imports TensorFlow"
        """), "    ").strip()
    stdout, _ = _python(_AFTER_TENSORFLOW.format(load=load), timeout=300)
    _check_after_tensorflow(_result(stdout))


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, command=(sys.executable, "-m", "serving.client")):
    # TF_CPP_MIN_LOG_LEVEL is removed: conftest sets it for the test process.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_help_prints_no_tensorflow_lines():
    proc = _cli("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "alexnet-classify" in proc.stdout and "--server" in proc.stdout
    assert _tf_lines(proc.stderr) == [] and proc.stderr == "", proc.stderr[-2000:]


def test_cli_unreachable_server_is_a_clear_error():
    address = f"127.0.0.1:{_closed_port()}"
    proc = _cli(str(IMAGE), "--server", address, "--retries", "0", "--timeout", "10")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {address}: UNAVAILABLE: "), lines
    assert "Traceback" not in proc.stderr and _tf_lines(proc.stderr) == []


def test_console_script_prints_no_tensorflow_lines():
    script = Path(sys.executable).with_name("alexnet-classify")
    # The suite runs on the installed project (`pip install -e ".[dev]"`, as .ci/run does).
    assert script.exists(), f"{script} missing: install the project with pip install -e ."
    proc = _cli("--help", command=(str(script),))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
