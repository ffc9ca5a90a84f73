"""A Python stand-in for `tensorflow_model_server`: TF Serving's gRPC and REST APIs.

Serves versioned SavedModels (`<base_path>/<N>/`) over the `tensorflow.serving`
`PredictionService` (Predict, Classify, Regress, MultiInference, GetModelMetadata) and
`ModelService` (GetModelStatus, HandleReloadConfigRequest), with the services, flags, status
codes and messages of TF Serving 2.21 (see docs/serving.md), so one client works against both.

    python -m serving.server --port=8500 --rest_api_port=8501 \
        --model_name=alexnet --model_base_path=$PWD/models/alexnet

Departures from TF Serving: the port opens after the initial load, as upstream, but while no
version exists yet the server polls every `--file_system_poll_wait_seconds` (at least 1 s)
even if that flag is 0; no profiler, ALTS or request logging. It listens on 127.0.0.1 unless
`--bind_address` says otherwise (TF Serving: all interfaces), a reload waits at most
`--reload_config_timeout_seconds`, and SIGTERM drains for at most `--shutdown_grace_seconds`,
then closes what is left and exits 0. Prometheus metrics (`--monitoring_config_file`, TF
Serving's names, see `serving._metrics`) are served on the REST port.
"""

import argparse
import logging
import os
import re
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from serving import _inference, _metrics, _textproto
from serving._batching import Batcher, BatchingOptions
from serving._errors import ServingError
from serving._manager import ModelManager, validate_config
from serving._rest import DEFAULT_MAX_BODY_BYTES
from serving._tensors import DEFAULT_MAX_ELEMENTS, DEFAULT_MAX_STRINGS

log = logging.getLogger("serving")

VERSION = "2.21.0"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000
# The gRPC health service's names: TF Serving registers the bare service names
# (model_servers/server.cc: "ModelService", "PredictionService"); the fully qualified
# ones are answered too, for probes written against the proto's service names.
_SERVICES = ("ModelService", "PredictionService",
             "tensorflow.serving.ModelService", "tensorflow.serving.PredictionService")


def _deadline(context):
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _request_spec(request):
    """The `ModelSpec` a request names (a MultiInference's first task's)."""
    if hasattr(request, "tasks"):
        return request.tasks[0].model_spec if request.tasks else None
    return request.model_spec


def _handler(method, counted=False):
    """Wraps a servicer method: `ServingError` -> gRPC status, deadline checked after run;
    the outcome goes to `self.metrics` (`counted`: also to TF Serving's own request metrics,
    which count only Predict, Classify and Regress over gRPC, prediction_service_impl.cc)."""
    api = method.__name__

    def wrapped(self, request, context):
        start, code = time.monotonic(), grpc.StatusCode.UNKNOWN
        try:
            try:
                response = method(self, request, context)
            except ServingError as e:
                code = e.code
                context.abort(e.code, e.message)
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            code = grpc.StatusCode.OK
            return response
        finally:
            if self.metrics.enabled:
                _record(self.metrics, api, counted, request, code, time.monotonic() - start)

    wrapped.__name__, wrapped.__doc__ = method.__name__, method.__doc__
    return wrapped


def _record(metrics, api, counted, request, code, seconds):
    try:
        spec = _request_spec(request)
        signature = (spec.signature_name or _inference.DEFAULT_SIGNATURE) if (
            counted and spec is not None) else ""
        metrics.request("GRPC", api, spec.name if spec is not None else "", signature, code,
                        seconds, tf_api=api if counted else None)
    except Exception:  # A metric must never fail the request.
        log.debug("Recording %s failed", api, exc_info=True)


def _counted(method):
    return _handler(method, counted=True)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """`tensorflow.serving.PredictionService` over a `ModelManager`."""

    def __init__(self, manager, runner, metrics=_metrics.DISABLED):
        self.manager, self.runner, self.metrics = manager, runner, metrics

    @_counted
    def Predict(self, request, context):
        return self.runner.predict(self.manager, request, _deadline(context))

    @_counted
    def Classify(self, request, context):
        return self.runner.classify(self.manager, request, _deadline(context))

    @_counted
    def Regress(self, request, context):
        return self.runner.regress(self.manager, request, _deadline(context))

    @_handler
    def MultiInference(self, request, context):
        return self.runner.multi_inference(self.manager, request, _deadline(context))

    @_handler
    def GetModelMetadata(self, request, context):
        return _inference.get_model_metadata(self.manager, request)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """`tensorflow.serving.ModelService` over a `ModelManager`."""

    def __init__(self, manager, metrics=_metrics.DISABLED):
        self.manager, self.metrics = manager, metrics

    @_handler
    def GetModelStatus(self, request, context):
        return _inference.get_model_status(self.manager, request)

    def HandleReloadConfigRequest(self, request, context):
        """Validates, applies, then waits (bounded by the client's deadline and
        `--reload_config_timeout_seconds`) for the new models; loading runs on the manager's
        threads and a second concurrent reload answers ABORTED, so reloads cannot tie up the
        gRPC worker pool."""
        response = model_management_pb2.ReloadConfigResponse()
        try:
            self.manager.reload_config(request.config, timeout=context.time_remaining())
        except ServingError as e:
            response.status.error_code = e.code.value[0]
            response.status.error_message = e.message
            context.set_code(e.code)
            context.set_details(e.message)
        return response


def make_warmup(runner, iterations=1, metrics=_metrics.DISABLED):
    """Returns a load hook replaying `assets.extra/tf_serving_warmup_requests` (a TFRecord of
    `PredictionLog`s, at most 1000); any failure fails the load, as in TF Serving. Each replay
    of a file goes to `metrics.warmup` (time, records replayed, final status)."""

    def warmup(servable):
        path = os.path.join(servable.path, WARMUP_FILE)
        if not os.path.exists(path):
            log.info("No warmup data file found at %s", path)
            return
        start, replayed, code = time.monotonic(), 0, grpc.StatusCode.UNKNOWN
        try:
            for _ in _replay(runner, iterations, servable, path):
                replayed += 1
            code = grpc.StatusCode.OK
        except ServingError as e:
            code = e.code
            raise
        finally:
            metrics.warmup(servable.path, code, time.monotonic() - start, replayed)

    return warmup


def _replay(runner, iterations, servable, path):
    """Replays the warm-up file at `path`, yielding after each record."""
    import tensorflow as tf

    records = []
    try:
        for record in tf.data.TFRecordDataset(path):
            records.append(record.numpy())
            if len(records) > MAX_WARMUP_RECORDS:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"Number of warmup records exceeds the maximum "
                                   f"({MAX_WARMUP_RECORDS}) at {path}")
    except tf.errors.DataLossError as e:
        detail = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:.*$", "", e.message)
        raise ServingError(grpc.StatusCode.DATA_LOSS,
                           f"Data loss: {detail} at {path}. Please verify your warmup data "
                           "is in TFRecord format.") from None
    pinned = _inference.Pinned(servable)
    for record in records:
        try:
            entry = prediction_log_pb2.PredictionLog.FromString(record)
        except Exception:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               "Failed to parse warmup record") from None
        kind = entry.WhichOneof("log_type")
        call = {"predict_log": runner.predict, "classify_log": runner.classify,
                "regress_log": runner.regress,
                "multi_inference_log": runner.multi_inference}.get(kind)
        if call is None:
            raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                               "Unsupported log_type for warmup")
        request = getattr(entry, kind).request
        for _ in range(max(iterations, 1)):
            call(pinned, request)
        yield


def parse_channel_arguments(text):
    """Parses `--grpc_channel_arguments` ("k=v,k=v"; integers passed as integers)."""
    options = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        try:
            options.append((key, int(value)))
        except ValueError:
            options.append((key, value))
    return options


def _host_port(host, port):
    """`host:port`, with an IPv6 host in brackets, as gRPC and URLs spell it."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _is_loopback(host):
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_config(args):
    """The `ModelServerConfig` from `--model_config_file`, or from the single-model flags."""
    if args.model_config_file:
        return _textproto.parse_model_server_config(args.model_config_file)
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name, model.base_path, model.model_platform = (
        args.model_name, args.model_base_path, "tensorflow")
    return config


class ModelServer:
    """The running server: model manager, gRPC server, optional REST server.

    Build it with `ModelServer(args)` from `build_parser().parse_args(...)`, then `start()`
    (blocks until the initial versions load) and `stop()` (drains in-flight requests).
    """

    def __init__(self, args):
        self.args = args
        config = build_config(args)
        validate_config(config)
        self.metrics, self.metrics_path = _metrics.DISABLED, self._metrics_path(args)
        if self.metrics_path is not None:
            self.metrics = _metrics.PrometheusMetrics(batching=args.enable_batching)
        self.batcher = None
        self.runner = _inference.Runner(
            enable_signature_method_name_check=args.enable_signature_method_name_check,
            max_request_elements=args.max_request_elements,
            max_request_strings=args.max_request_strings, metrics=self.metrics)
        if args.enable_batching:
            params = (_textproto.parse_file(args.batching_parameters_file,
                                            _textproto.BatchingParameters)
                      if args.batching_parameters_file else None)
            self.batcher = Batcher(BatchingOptions(params, os.cpu_count() or 1),
                                   _inference.run_signature, metrics=self.metrics)
            self.runner.batcher = self.batcher
        self.manager = ModelManager(
            config,
            poll_wait_seconds=args.file_system_poll_wait_seconds,
            max_num_load_retries=args.max_num_load_retries,
            load_retry_interval_s=args.load_retry_interval_micros / 1e6,
            tags=args.saved_model_tags.split(","),
            warmup=(make_warmup(self._warmup_runner(), args.num_request_iterations_for_warmup,
                                self.metrics) if args.enable_model_warmup else None),
            allow_labels_for_unavailable=args.allow_version_labels_for_unavailable_models,
            reload_timeout_s=args.reload_config_timeout_seconds,
            metrics=self.metrics,
        )
        if self.metrics.enabled:
            self.metrics.models = self.manager  # bounds the model and signature labels
        self.ssl_config = (_textproto.parse_file(args.ssl_config_file, _textproto.SSLConfig)
                           if args.ssl_config_file else None)
        self.grpc_server = self.http_server = self._http_thread = None
        self.addresses = []  # what the listeners really bound, as logged
        self._config_thread = None
        self._stopped = threading.Event()

    @staticmethod
    def _metrics_path(args):
        """The Prometheus path `--monitoring_config_file` enables on the REST port, or None.

        The file is parsed even without `--rest_api_port` (TF Serving then ignores it), so a
        bad one is refused at once; without a REST port a warning says nothing is exported.
        """
        if not args.monitoring_config_file:
            return None
        config = _textproto.parse_file(args.monitoring_config_file, _textproto.MonitoringConfig)
        path = _metrics.prometheus_path(config)
        if path is not None and not args.rest_api_port:
            log.warning("--monitoring_config_file enables Prometheus metrics, which are served "
                        "on the REST port only: set --rest_api_port to export them")
            return None
        return path

    def _warmup_runner(self):
        """The runner of warm-up replays: this server's batcher and method check, without
        the per-request caps (``--max_request_elements``/``--max_request_strings``). The
        warm-up file belongs to the model, like its graph, not to a client; it is bounded
        by its 1000 records, and a cap set for clients must not keep a version from
        loading."""
        runner = _inference.Runner(
            enable_signature_method_name_check=self.runner.method_check,
            max_request_elements=None, max_request_strings=None, metrics=self.metrics)
        runner.batcher = self.runner.batcher
        return runner

    def start(self):
        """Loads the initial versions, then opens the gRPC (and REST) ports."""
        args = self.args
        self.manager.start()
        options = [("grpc.max_receive_message_length", -1),
                   ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)]
        options += parse_channel_arguments(args.grpc_channel_arguments)
        workers = args.grpc_max_threads or 4 * (os.cpu_count() or 1)
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                                       options=options)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.manager, self.runner, self.metrics), self.grpc_server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.manager, self.metrics), self.grpc_server)
        if args.enable_grpc_healthcheck_service:
            from grpc_health.v1 import health, health_pb2, health_pb2_grpc

            self.health = health.HealthServicer()
            for service in ("",) + _SERVICES:
                self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        credentials = None
        if self.ssl_config is not None:
            ssl = self.ssl_config
            credentials = grpc.ssl_server_credentials(
                [(ssl.server_key.encode(), ssl.server_cert.encode())],
                root_certificates=ssl.custom_ca.encode() if ssl.custom_ca else None,
                require_client_auth=ssl.client_verify)
        addresses = []
        if args.port:
            addresses.append(_host_port(args.bind_address, args.port))
        if args.grpc_socket_path:
            addresses.append(f"unix:{args.grpc_socket_path}")
        bound_addresses = []
        for address in addresses:
            bound = (self.grpc_server.add_secure_port(address, credentials) if credentials
                     else self.grpc_server.add_insecure_port(address))
            if not bound:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, f"Failed to bind {address}")
            bound_addresses.append(address if address.startswith("unix:")
                                   else _host_port(args.bind_address, bound))
        self.grpc_server.start()
        for address in bound_addresses:
            log.info("Running gRPC ModelServer at %s ...", address)
        self.addresses = list(bound_addresses)
        if args.port and not _is_loopback(args.bind_address) and not (
                self.ssl_config is not None and self.ssl_config.client_verify):
            log.warning(
                "Listening on %s without TLS client verification: any client that can reach "
                "it may call ModelService/HandleReloadConfigRequest and replace the served "
                "models (see docs/serving.md)", args.bind_address)
        if args.rest_api_port:
            from serving._rest import RestApi, make_http_server

            api = RestApi(self.manager, self.runner, args.rest_api_timeout_in_ms / 1000,
                          max_request_elements=args.max_request_elements,
                          max_request_strings=args.max_request_strings, metrics=self.metrics)
            # Daemon handler threads; server_close() closes idle and half-read connections.
            self.http_server = make_http_server(
                api, args.bind_address, args.rest_api_port,
                max_body_bytes=args.rest_api_max_body_bytes or None,
                max_concurrent_requests=args.rest_api_num_threads or None,
                metrics=self.metrics, metrics_path=self.metrics_path)
            self._http_thread = threading.Thread(target=self.http_server.serve_forever,
                                                 name="rest", daemon=True)
            self._http_thread.start()
            host, port = self.http_server.server_address[:2]
            rest_address = _host_port(host, port)
            log.info("Exporting HTTP/REST API at:%s ...", rest_address)
            if self.metrics_path is not None:
                log.info("Exporting Prometheus metrics at http://%s%s", rest_address,
                         self.metrics_path)
            self.addresses.append(f"http://{rest_address}")
        if args.model_config_file and args.model_config_file_poll_wait_seconds > 0:
            self._config_thread = threading.Thread(target=self._poll_config, daemon=True)
            self._config_thread.start()

    def _poll_config(self):
        while not self._stopped.wait(self.args.model_config_file_poll_wait_seconds):
            try:
                self.manager.reload_config(build_config(self.args))
            except (ServingError, _textproto.ConfigParseError, OSError) as e:
                log.error("Failed to reload the model config: %s", e)

    def stop(self, grace=10.0):
        """Stops accepting at once, drains in-flight gRPC and REST requests for at most
        `grace` seconds, then cancels what is left, closes idle and slow REST connections
        (keep-alive, half-sent bodies) and stops the batcher and the manager; returns within
        about `grace` + 2 seconds."""
        deadline = time.monotonic() + max(grace, 0)
        self._stopped.set()
        self.manager.stop(timeout=0)  # Ends load retries and reloads waiting for models.
        if self.http_server is not None:
            self.http_server.shutdown()  # serve_forever returns within its 0.5 s poll.
        grpc_done = None
        if self.grpc_server is not None:  # Refuses new RPCs now, cancels the rest at deadline.
            grpc_done = self.grpc_server.stop(max(deadline - time.monotonic(), 0))
        if self.http_server is not None:
            # serving._rest's server_close(): closes the listening socket and idle or half-read
            # connections at once, waits up to close_timeout_s for requests being answered,
            # then shuts the rest down. Its handler threads are daemons: nothing is joined.
            self.http_server.close_timeout_s = max(deadline - time.monotonic(), 0)
            self.http_server.server_close()
        if grpc_done is not None:
            grpc_done.wait(max(deadline - time.monotonic(), 0) + 1.0)
        if self.batcher is not None:
            thread = threading.Thread(target=self.batcher.stop, name="batcher-stop",
                                      daemon=True)
            thread.start()
            thread.join(max(deadline - time.monotonic(), 0.5))
        self.manager.stop(timeout=0.5)


def _bool(text):
    value = str(text).lower()
    if value in ("1", "true", "yes", "t", "y"):
        return True
    if value in ("0", "false", "no", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"Expected a boolean. Received: {text!r}")


def build_parser():
    """Flags named like `tensorflow_model_server`'s, with its defaults."""
    parser = argparse.ArgumentParser(
        prog="alexnet-serve", description="TF Serving compatible model server (Python).")

    def flag(name, default, kind=str, help=None):
        if kind is bool:
            parser.add_argument(name, type=_bool, nargs="?", const=True, default=default,
                                help=help)
        else:
            parser.add_argument(name, type=kind, default=default, help=help)

    flag("--port", 8500, int, "gRPC port (0 disables TCP; then use --grpc_socket_path)")
    flag("--grpc_socket_path", "", str, "also serve gRPC on unix:<path>")
    flag("--rest_api_port", 0, int, "REST port; 0 disables REST")
    flag("--rest_api_timeout_in_ms", 30000, int)
    flag("--rest_api_num_threads", 0, int,
         "REST requests decoded and run at once; 0 = 4 x CPUs (TF Serving's default)")
    flag("--rest_api_max_body_bytes", DEFAULT_MAX_BODY_BYTES, int,
         "largest REST request body, 413 beyond (stand-in only; 0 = no limit)")
    flag("--max_request_elements", DEFAULT_MAX_ELEMENTS, int,
         "elements (4-byte units) one request may declare over all its inputs, checked "
         "before anything is allocated; default: 256 images of 227x227x3 (stand-in only)")
    flag("--max_request_strings", DEFAULT_MAX_STRINGS, int,
         "strings one request may declare (stand-in only)")
    flag("--bind_address", "127.0.0.1", str,
         "address the gRPC and REST ports listen on (stand-in only; TF Serving binds all "
         "interfaces): 0.0.0.0 or :: to accept remote clients, e.g. in a container")
    flag("--model_name", "default", str)
    flag("--model_base_path", "", str)
    flag("--model_config_file", "", str, "text ModelServerConfig; overrides the two above")
    flag("--model_config_file_poll_wait_seconds", 0, int)
    flag("--file_system_poll_wait_seconds", 1, float)
    flag("--max_num_load_retries", 5, int)
    flag("--load_retry_interval_micros", 60_000_000, int)
    flag("--enable_batching", False, bool)
    flag("--batching_parameters_file", "", str, "text BatchingParameters")
    flag("--grpc_channel_arguments", "", str, "k=v,k=v gRPC server arguments")
    flag("--grpc_max_threads", 0, int, "gRPC worker threads; 0 = 4 x CPUs")
    flag("--saved_model_tags", "serve", str)
    flag("--enable_model_warmup", True, bool)
    flag("--num_request_iterations_for_warmup", 0, int)
    flag("--ssl_config_file", "", str, "text SSLConfig with PEM contents")
    flag("--monitoring_config_file", "", str,
         "text MonitoringConfig: Prometheus metrics on the REST port")
    flag("--enable_signature_method_name_check", False, bool)
    flag("--enable_grpc_healthcheck_service", False, bool)
    flag("--allow_version_labels_for_unavailable_models", False, bool)
    flag("--shutdown_grace_seconds", 10.0, float,
         "how long SIGTERM waits for in-flight requests before cancelling them (stand-in only)")
    flag("--reload_config_timeout_seconds", 60.0, float,
         "most a HandleReloadConfigRequest waits for its models (stand-in only; the client's "
         "deadline can shorten it)")
    parser.add_argument("--version", action="store_true", help="print versions and exit")
    return parser


def main(argv=None):
    """Runs the server until SIGTERM or SIGINT, then drains and returns 0."""
    args = build_parser().parse_args(argv)
    if args.version:
        import tensorflow as tf

        print(f"TensorFlow ModelServer: {VERSION}-python\nTensorFlow Library: {tf.__version__}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if args.batching_parameters_file and not args.enable_batching:
        print("--batching_parameters_file is set without --enable_batching", file=sys.stderr)
        return 1
    if not args.model_config_file and not args.model_base_path:
        print("Both server_model_config and model_base_path are empty!", file=sys.stderr)
        return 1
    stop = threading.Event()
    server = None

    def on_signal(*_):
        stop.set()
        if server is not None:
            server.manager.stop(timeout=0)  # Ends a start() still waiting for versions.

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    try:
        server = ModelServer(args)
        server.start()
        if stop.is_set():
            server.stop(0)
            return 0
    except (ServingError, _textproto.ConfigParseError, ValueError, OSError) as e:
        print(f"Failed to start server. Error: {e}", file=sys.stderr)
        return 255
    while not stop.wait(0.25):
        pass
    log.info("Shutting down: draining in-flight requests for at most %.1f s",
             args.shutdown_grace_seconds)
    server.stop(args.shutdown_grace_seconds)
    log.info("Server stopped")
    _exit_soon(0, 2.0)
    return 0


def _exit_soon(code, delay):
    """Exits with `code` after `delay` seconds if interpreter shutdown is still waiting for
    non-daemon threads then (a gRPC handler cancelled after the grace period but still
    running, for instance), so SIGTERM always ends the process in bounded time."""

    def force():
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(delay, force)
    timer.daemon = True
    timer.start()


if __name__ == "__main__":
    sys.exit(main())
