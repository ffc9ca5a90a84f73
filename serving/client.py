"""Batch top-5 image classification against TensorFlow Serving (or `serving.server`).

Sends encoded image bytes to the `serving_default` signature of an exported keras_alexnet
model (input `images`, outputs `classes`, `scores`, `labels`) with gRPC Predict. Uses grpcio,
NumPy and the protos of tensorflow-serving-api; it never imports Keras or keras_alexnet, and
it loads TensorFlow's generated `*_pb2` modules without TensorFlow's runtime (see
`_protos_without_tensorflow_runtime`), so `import serving.client` takes a fraction of a second.

    >>> from serving.client import classify
    >>> classify(["cat.jpg"], server="localhost:8500")[0][0]
    Prediction(label='tabby', class_id=281, probability=0.71)

CLI: `python -m serving.client IMG... [--server HOST:PORT] [--json]` (also `alexnet-classify`).
"""

import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import threading
import time
from typing import NamedTuple

if __name__ == "__main__" or os.path.basename(sys.argv[0] if sys.argv else "").startswith(
        "alexnet-classify"):
    # The CLI. Should TensorFlow's runtime load after all (the fallback below), fewer of its
    # C++ lines precede the table (TF 2.21 prints its oneDNN and CUDA lines at any level).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc

# Top-level subpackages of `tensorflow` holding the protos tensorflow-serving-api imports, all
# with empty `__init__.py` files: tensorflow.core.{framework,protobuf,example} for Predict and
# the other PredictionService protos, tensorflow.compiler.xla.tsl.protobuf for the config_pb2
# that the model-management protos import, `tsl` for versions that move protos there.
_PROTO_ROOTS = ("core", "compiler", "tsl")


def _import_submodule(package, name):
    """A package's module `__getattr__`: `from package import name` imports the submodule
    with `importlib.import_module`, which, unlike `__import__`, does not import the top-level
    package (`tensorflow`) as well."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{package}.{name}":
            raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None


class _ProtoLoader:
    """Loads a `tensorflow.*` package as usual, then gives it `_import_submodule`."""

    def __init__(self, loader, packages):
        self.loader, self.packages = loader, packages

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        _add_getattr(module, self.packages)


def _add_getattr(module, packages):
    module.__getattr__ = lambda name, package=module.__name__: _import_submodule(package, name)
    packages.append(module)


class _ProtoFinder:
    """First on `sys.meta_path` while the protos load, in the loading thread only: refuses
    `import tensorflow` and wraps the loader of each `tensorflow.*` package."""

    def __init__(self):
        self.thread, self.packages = threading.get_ident(), []

    def find_spec(self, name, path=None, target=None):
        if threading.get_ident() != self.thread or not name.startswith("tensorflow"):
            return None
        if name == "tensorflow":
            raise ImportError("a tensorflow-serving-api proto needs TensorFlow's runtime or a "
                              "package outside serving.client._PROTO_ROOTS", name=name)
        if not name.startswith("tensorflow."):
            return None  # tensorflow_serving
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.submodule_search_locations is not None:
            spec.loader = _ProtoLoader(spec.loader, self.packages)
        return spec


@contextlib.contextmanager
def _protos_without_tensorflow_runtime():
    """Lets the block import TensorFlow's generated `*_pb2` modules without `tensorflow`.

    The tensorflow-serving-api protos say `from tensorflow.core.framework import tensor_pb2`,
    which imports `tensorflow` (TensorFlow's whole runtime and Keras: ~2,900 modules, seconds,
    C++ log lines) twice over: as the parent of `tensorflow.core`, and because `__import__`
    returns the top-level package when it imports a submodule missing from a package's
    attributes. So this registers `tensorflow.core` (and the other `_PROTO_ROOTS`) as the
    import system would, from the real files, and gives every `tensorflow.*` package a module
    `__getattr__` that imports submodules without the top-level package (`_ProtoFinder`).
    `tensorflow` itself never enters `sys.modules`, so no other thread can see a stand-in.

    On exit the `__getattr__`s go and every `tensorflow.*` module the block loaded leaves
    `sys.modules` (the names the block bound keep them alive), unless `tensorflow` got imported
    meanwhile (another thread): any later import under `tensorflow.` then runs the real package
    first, as it would have without this. TensorFlow then executes those `*_pb2` files again, which
    the protobuf runtime accepts for identical files and which yields the same message
    classes (they are cached per descriptor), so messages built here work with TensorFlow.

    If a proto needs anything else, `import tensorflow` is refused in this thread (it would run
    TensorFlow's `__init__` halfway through), the block raises ImportError and the modules
    it loaded are dropped, so the caller can fall back to the ordinary import. Does nothing
    if `tensorflow` is imported already (the protos then cost nothing) or not installed.
    """
    spec = None if "tensorflow" in sys.modules else importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        yield
        return
    before = set(sys.modules)
    finder = _ProtoFinder()
    sys.meta_path.insert(0, finder)
    ok = False
    try:
        for name in ("tensorflow." + root for root in _PROTO_ROOTS):
            if name in sys.modules:
                continue
            root = importlib.machinery.PathFinder.find_spec(name, spec.submodule_search_locations)
            if root is None or root.submodule_search_locations is None:
                continue
            module = importlib.util.module_from_spec(root)
            sys.modules[name] = module
            root.loader.exec_module(module)
            _add_getattr(module, finder.packages)
        yield
        ok = True
    finally:
        sys.meta_path.remove(finder)
        for module in finder.packages:
            vars(module).pop("__getattr__", None)
        if "tensorflow" not in sys.modules:
            for name in set(sys.modules) - before:
                if name.startswith("tensorflow.") or not ok and (
                        name.startswith("tensorflow_serving") or name == "serving._tensors"):
                    del sys.modules[name]


try:
    with _protos_without_tensorflow_runtime():
        from tensorflow.core.framework import tensor_pb2, types_pb2
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        from serving._tensors import to_ndarray
except ImportError:  # a future proto layout: load them with TensorFlow's runtime after all
    from tensorflow.core.framework import tensor_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving._tensors import to_ndarray

DEFAULT_SERVER = "localhost:8500"
DEFAULT_MODEL = "alexnet"
DEFAULT_SIGNATURE = "serving_default"
# Requests stay under gRPC's common 4 MiB receive default, with room for the envelope.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024 - 64 * 1024
# serving/batching.config's max_batch_size: larger requests fail with INVALID_ARGUMENT there.
DEFAULT_MAX_BATCH_SIZE = 64


class Prediction(NamedTuple):
    """One of an image's top-5 classes."""

    label: str
    class_id: int
    probability: float


class ServingClientError(RuntimeError):
    """A failed call, naming the server, the gRPC status code and the server's message."""

    def __init__(self, server, code, details):
        super().__init__(f"{server}: {code.name}: {details}")
        self.server, self.code, self.details = server, code, details


def _read(image):
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    with open(os.fspath(image), "rb") as f:
        return f.read()


def split_batches(images, max_request_bytes=DEFAULT_MAX_REQUEST_BYTES, max_batch_size=None):
    """Yields (start, chunk) runs of `images` (bytes) whose request stays under the limit.

    An image larger than the limit on its own travels alone.
    """
    start, chunk, size = 0, [], 0
    for i, data in enumerate(images):
        cost = len(data) + 16  # tag, length varint and field overhead per string_val
        full = max_batch_size is not None and len(chunk) >= max_batch_size
        if chunk and (size + cost > max_request_bytes or full):
            yield start, chunk
            start, chunk, size = i, [], 0
        chunk.append(data)
        size += cost
    if chunk:
        yield start, chunk


def build_predict_request(images, model=DEFAULT_MODEL, version=None,
                          signature=DEFAULT_SIGNATURE):
    """A `PredictRequest` carrying encoded images (bytes) as DT_STRING `images`."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=list(images))
    tensor.tensor_shape.dim.add().size = len(images)
    request.inputs["images"].CopyFrom(tensor)
    return request


def parse_predict_response(response):
    """Per image, the top-5 `Prediction`s from a `PredictResponse` (typed fields or
    `tensor_content`)."""
    classes = to_ndarray(response.outputs["classes"])
    scores = to_ndarray(response.outputs["scores"])
    labels = to_ndarray(response.outputs["labels"]) if "labels" in response.outputs else None
    return [
        [Prediction(labels[i, j].decode("utf-8", "replace") if labels is not None
                    else str(int(classes[i, j])), int(classes[i, j]), float(scores[i, j]))
         for j in range(classes.shape[1])]
        for i in range(classes.shape[0])
    ]


class Client:
    """A reusable channel to one server.

    Args:
        server: "host:port" (or "unix:/path").
        model, version, signature: the `ModelSpec` to call; `version=None` = latest.
        timeout: seconds per request (the server's run deadline too).
        retries: extra attempts after UNAVAILABLE, with exponential backoff from `backoff`
            seconds; other codes are raised at once.
        max_request_bytes, max_batch_size: how to split large batches (None: no count
            limit); the default count matches serving/batching.config.
        tls: use TLS; `root_certificates`, `private_key`, `certificate_chain` are PEM bytes
            (or paths) for the server's CA and an optional client certificate;
            `server_name_override` sets the name checked against the certificate.
        max_receive_bytes: the channel's receive limit (-1 = unlimited).
    """

    def __init__(self, server=DEFAULT_SERVER, model=DEFAULT_MODEL, version=None, *,
                 signature=DEFAULT_SIGNATURE, timeout=30.0, retries=3, backoff=0.5,
                 max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
                 max_batch_size=DEFAULT_MAX_BATCH_SIZE, tls=False, root_certificates=None,
                 private_key=None, certificate_chain=None, server_name_override=None,
                 max_receive_bytes=-1):
        self.server, self.model, self.version, self.signature = server, model, version, signature
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_request_bytes, self.max_batch_size = max_request_bytes, max_batch_size
        options = [("grpc.max_receive_message_length", max_receive_bytes),
                   ("grpc.max_send_message_length", -1)]
        if tls or root_certificates or certificate_chain:
            if server_name_override:
                options.append(("grpc.ssl_target_name_override", server_name_override))
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(root_certificates), private_key=_pem(private_key),
                certificate_chain=_pem(certificate_chain))
            self.channel = grpc.secure_channel(server, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(server, options=options)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def predict(self, request):
        """Sends one `PredictRequest`, retrying on UNAVAILABLE; raises `ServingClientError`."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return self.stub.Predict(request, timeout=self.timeout)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise ServingClientError(self.server, e.code(), e.details()) from None
            time.sleep(delay)
            delay *= 2

    def classify(self, images):
        """Top-5 `Prediction`s per image, in input order; images are paths or bytes."""
        data = [_read(image) for image in images]
        results = []
        for _, chunk in split_batches(data, self.max_request_bytes, self.max_batch_size):
            request = build_predict_request(chunk, self.model, self.version, self.signature)
            results.extend(parse_predict_response(self.predict(request)))
        return results


def _pem(value):
    if value is None or isinstance(value, bytes):
        return value
    with open(os.fspath(value), "rb") as f:
        return f.read()


def classify(images, server=DEFAULT_SERVER, model=DEFAULT_MODEL, version=None, timeout=30.0,
             **options):
    """Classifies images (file paths or encoded bytes) on a TF Serving compatible server.

    Returns:
        One list per image of five `Prediction(label, class_id, probability)`, most probable
        first.

    Raises:
        ServingClientError: with the server, gRPC code and message, after retrying
            UNAVAILABLE `retries` times.
        OSError: if an image path cannot be read.

    Other keyword arguments go to `Client` (retries, TLS, batch limits).
    """
    with Client(server, model, version, timeout=timeout, **options) as client:
        return client.classify(images)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="alexnet-classify", description="Top-5 classes of images from TF Serving.")
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, BMP)")
    parser.add_argument("--server", default=DEFAULT_SERVER, help="host:port of the gRPC API")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--version", type=int, default=None, help="default: latest")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--retries", type=int, default=3, help="retries on UNAVAILABLE")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="images per request")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    tls.add_argument("--ca", help="PEM file of the server's CA (implies --tls)")
    tls.add_argument("--cert", help="client certificate PEM (mutual TLS)")
    tls.add_argument("--key", help="client private key PEM (mutual TLS)")
    tls.add_argument("--server-name", help="name to check the server certificate against")
    return parser


def main(argv=None):
    """CLI entry point; returns 0, or 1 after printing the error."""
    args = build_parser().parse_args(argv)
    try:
        results = classify(
            args.images, server=args.server, model=args.model, version=args.version,
            timeout=args.timeout, retries=args.retries, max_batch_size=args.max_batch_size,
            tls=args.tls, root_certificates=args.ca, certificate_chain=args.cert,
            private_key=args.key, server_name_override=args.server_name)
    except (ServingClientError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"image": path, "top5": [p._asdict() for p in top5]}
                          for path, top5 in zip(args.images, results)], indent=2))
        return 0
    for path, top5 in zip(args.images, results):
        print(path)
        print(f"  {'rank':>4}  {'class':>5}  {'probability':>11}  label")
        for rank, p in enumerate(top5, 1):
            print(f"  {rank:>4}  {p.class_id:>5}  {p.probability:>11.4f}  {p.label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
