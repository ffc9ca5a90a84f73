"""Batch top-5 image classification against TensorFlow Serving (or `serving.server`).

Sends encoded image bytes to the `serving_default` signature of an exported keras_alexnet
model (input `images`, outputs `classes`, `scores`, `labels`) with gRPC Predict. Depends only on
grpcio and tensorflow-serving-api; it never imports Keras or keras_alexnet.

    >>> from serving.client import classify
    >>> classify(["cat.jpg"], server="localhost:8500")[0][0]
    Prediction(label='tabby', class_id=281, probability=0.71)

CLI: `python -m serving.client IMG... [--server HOST:PORT] [--json]` (also `alexnet-classify`).
"""

import argparse
import json
import os
import sys
import time
from typing import NamedTuple

import grpc
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
