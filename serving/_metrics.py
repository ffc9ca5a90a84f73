"""Prometheus metrics of the embedded server (`--monitoring_config_file`), named as TF Serving's.

TF Serving registers TensorFlow monitoring metrics (`/tensorflow/serving/request_count`, ...)
and `tensorflow_serving/util/prometheus_exporter.cc` prints them with every character outside
`[a-zA-Z0-9_]` turned into `:`, counters without a `_total` suffix and histograms as
`_bucket`/`_sum`/`_count`. `PrometheusMetrics` keeps the same names, labels, types, units
(microseconds) and bucket limits in a `prometheus_client.CollectorRegistry` of its own (never
the process-wide default, so several servers in one process do not collide) and renders them
with `generate_latest`; docs/serving.md lists each metric, its source file and what is ours.

Label values a client chooses are bounded: a model name that is not (and never was) in the
server's config is counted as `UNKNOWN`, and so is a signature name that no loaded version of
the model has had, so random names cannot grow the number of series. Every update is a few
dictionary lookups under prometheus_client's locks and never raises: a failing update is logged
at debug level and the request goes on.
"""

import functools
import logging

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

log = logging.getLogger("serving")

# tensorflow_serving/util/prometheus_exporter.cc: PrometheusExporter::kPrometheusPath.
DEFAULT_PATH = "/monitoring/prometheus/metrics"
UNKNOWN = "<unknown>"
# What `generate_latest` writes for names valid in the classic format (all of these are). Not
# `prometheus_client.CONTENT_TYPE_LATEST`, which says version=1.0.0 in recent releases (0.26).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_OK = grpc.StatusCode.OK


def _exponential(scale, growth, count):
    """`tensorflow::monitoring::Buckets::Exponential(scale, growth, count)` bucket limits, with
    the 6 significant digits `absl::StrCat` prints them with."""
    return [float(f"{scale * growth ** i:.6g}") for i in range(count)]


# "Scale of 10, power of 1.8 with bucket count 33 (~20 minutes)" (util.cc) in microseconds.
_LATENCY_BUCKETS = _exponential(10, 1.8, 33)
_BATCH_BUCKETS = _exponential(1, 2, 14)  # batching_util.h: [1*2^0, ..., 1*2^13, DBL_MAX]
_QUEUE_BUCKETS = _exponential(100, 1.2, 52)  # batching_session.cc: ~1 second
_EXAMPLE_BUCKETS = _exponential(1, 2, 15)  # util.cc: [1, 2, 4, ..., 16 * 1024, DBL_MAX]


def prometheus_path(config):
    """The path a `MonitoringConfig` serves metrics at, or None if it does not enable them.

    An empty `path` is TF Serving's default, `DEFAULT_PATH`.

    Raises:
        ValueError: a path that is not an absolute URL path (it could never match a request).
    """
    if config is None or not config.prometheus_config.enable:
        return None
    path = config.prometheus_config.path or DEFAULT_PATH
    if not path.startswith("/") or any(c in path for c in "?# \t\r\n"):
        raise ValueError(f"prometheus_config.path must be a URL path starting with '/' and "
                         f"without '?', '#' or whitespace, e.g. {DEFAULT_PATH!r}; got {path!r} "
                         "in --monitoring_config_file")
    if path == "/v1" or path.startswith("/v1/"):
        raise ValueError(f"prometheus_config.path {path!r} would hide the /v1/ REST API; "
                         f"choose another path, e.g. {DEFAULT_PATH!r}")
    return path


class Metrics:
    """What the server records; this base class records nothing (no monitoring config).

    Times are in seconds (exported in microseconds, as TF Serving's); `code` is a
    `grpc.StatusCode`.
    """

    enabled = False

    def request(self, entrypoint, api, model_name, signature_name, code, seconds, tf_api=None):
        """One finished request: `entrypoint` "GRPC" or "REST", `api` the gRPC method name
        ("Predict", ..., "" for a malformed REST request), `signature_name` the one it asked
        for ("" where the API has none). `tf_api` is the API label TF Serving's own request
        metrics use for it (None: TF Serving does not count this request)."""

    def runtime(self, model_name, api, seconds):
        """One signature run (batching queue included) of a Predict, Classify or Regress."""

    def examples(self, model_name, count):
        """The `tf.Example`s of one successful MultiInference."""

    def batch_task(self, input_sizes):
        """The dim-0 sizes of one batched run's inputs, as it is queued."""

    def batch_queued(self, seconds):
        """How long one task waited in the batching queue."""

    def batch_run(self, size, padding):
        """One batch run of `size` rows (after padding), `padding` of them padding."""

    def load(self, model_path, ok, seconds):
        """One attempt to load the SavedModel at `model_path` (a version directory)."""

    def warmup(self, model_path, code, seconds, records):
        """One warm-up replay of `records` records, ending with `code`."""

    def exposition(self):
        """(content type, body bytes) of the metrics page."""
        raise NotImplementedError("no metrics are collected")


DISABLED = Metrics()


def _never_raises(method):
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            method(self, *args, **kwargs)
        except Exception:  # A metric must never fail a request or a load.
            log.debug("Metric update %s failed", method.__name__, exc_info=True)

    return wrapped


class _WithoutCreated:
    """The registry's families without prometheus_client's `_created` samples, which TF
    Serving does not export."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class PrometheusMetrics(Metrics):
    """Metrics in a registry of their own (`self.registry`), rendered by `exposition()`.

    Args:
        models: an object with `known(model_name, signature_name=None)` (the
            `ModelManager`), which bounds the label values clients choose; None counts every
            named model as `UNKNOWN`. Can be set later as `self.models`.
        batching: also register the batching session's metrics (`--enable_batching`).
    """

    enabled = True

    def __init__(self, models=None, batching=False):
        self.models = models
        self.registry = CollectorRegistry()
        self._counters = []  # names whose samples TF Serving prints without `_total`

        def counter(name, doc, labels):
            if not name.endswith("_total"):
                self._counters.append(name)
            return Counter(name, doc, labels, registry=self.registry)

        def histogram(name, doc, labels, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        # tensorflow_serving/servables/tensorflow/util.cc
        self._tf_requests = counter(
            ":tensorflow:serving:request_count", "The total number of requests.",
            ["model_name", "status"])
        self._tf_latency = histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ["model_name", "API", "entrypoint"], _LATENCY_BUCKETS)
        self._runtime = histogram(
            ":tensorflow:serving:runtime_latency",
            "Distribution of wall time (in microseconds) for Tensorflow runtime.",
            ["model_name", "API", "runtime"], _LATENCY_BUCKETS)
        self._example_counts = histogram(
            ":tensorflow:serving:request_example_counts",
            "The number of tensorflow.Examples per request.", ["model"], _EXAMPLE_BUCKETS)
        self._example_total = counter(
            ":tensorflow:serving:request_example_count_total",
            "The total number of tensorflow.Examples.", ["model"])
        # tensorflow/cc/saved_model/loader.cc (TensorFlow, linked into TF Serving)
        self._load_attempts = counter(
            ":tensorflow:cc:saved_model:load_attempt_count",
            "The number of times a SavedModel was successfully loaded.",
            ["model_path", "status"])
        self._load_latency = counter(
            ":tensorflow:cc:saved_model:load_latency",
            "Latency in microseconds for SavedModels that were successfully loaded.",
            ["model_path"])
        # tensorflow_serving/servables/tensorflow/saved_model_warmup_util.cc
        self._warmup_latency = histogram(
            ":tensorflow:serving:model_warmup_latency",
            "Distribution of wall time (in microseconds) for warming up the model.",
            ["model_path", "status"], _LATENCY_BUCKETS)
        self._warmup_records = counter(
            ":tensorflow:serving:model_warmup_records_read",
            "Total number of warmup records read during model warmup.",
            ["model_path", "status"])
        # Ours (TF Serving has no per-API, per-signature or failed-request latency series):
        # every request of both front ends, whatever its API and status.
        labels = ["model_name", "API", "signature_name", "entrypoint", "status"]
        self._requests = counter(
            ":tensorflow:serving:stand_in:request_count",
            "Requests by model, API, signature, entry point and final status (embedded "
            "server only).", labels)
        self._latency = histogram(
            ":tensorflow:serving:stand_in:request_latency",
            "Distribution of wall time (in microseconds) of every request, failed ones "
            "included (embedded server only).", labels, _LATENCY_BUCKETS)
        self._batching = batching
        if batching:
            # tensorflow_serving/batching/batching_util.h (BatchingSessionTask::Name() is
            # "batching_session") and tensorflow_serving/batching/batching_session.cc
            self._input_batch = histogram(
                ":tensorflow:serving:batching_session:input_batch_size",
                "Tracks the batch size distribution on the inputs.", [], _BATCH_BUCKETS)
            self._processed_batch = histogram(
                ":tensorflow:serving:batching_session:processed_batch_size",
                "Tracks the batch size distribution on processing.", [], _BATCH_BUCKETS)
            self._padding = histogram(
                ":tensorflow:serving:batching_session:padding_size",
                "Tracks the padding size distribution on batches.",
                ["execution_batch_size"], _BATCH_BUCKETS)
            self._queuing = histogram(
                ":tensorflow:serving:batching_session:queuing_latency",
                "Distribution of wall time spent (in microseconds) in queuing",
                ["thread_pool_name"], _QUEUE_BUCKETS)
            self._wrapped_runs = counter(
                ":tensorflow:serving:batching_session:wrapped_run_count",
                "Total count of run calls on the wrapped session", [])
        self._renames = {f"{name}_total": name for name in self._counters}

    def _bound(self, model_name, signature_name):
        """The label values for a client's model and signature names (see module doc)."""
        models = self.models
        if not model_name:
            return "", signature_name and UNKNOWN
        if models is None or not models.known(model_name):
            return UNKNOWN, signature_name and UNKNOWN
        if signature_name and not models.known(model_name, signature_name):
            return model_name, UNKNOWN
        return model_name, signature_name

    @_never_raises
    def request(self, entrypoint, api, model_name, signature_name, code, seconds, tf_api=None):
        model, signature = self._bound(model_name, signature_name)
        status, micros = code.name, max(seconds, 0.0) * 1e6
        self._requests.labels(model, api, signature, entrypoint, status).inc()
        self._latency.labels(model, api, signature, entrypoint, status).observe(micros)
        if tf_api is not None:  # prediction_service_impl.cc, http_server.cc
            self._tf_requests.labels(model, status).inc()
            if code == _OK:
                self._tf_latency.labels(model, tf_api, entrypoint).observe(micros)

    @_never_raises
    def runtime(self, model_name, api, seconds):
        model, _ = self._bound(model_name, "")
        self._runtime.labels(model, api, "TF1").observe(max(seconds, 0.0) * 1e6)

    @_never_raises
    def examples(self, model_name, count):
        model, _ = self._bound(model_name, "")
        self._example_counts.labels(model).observe(count)
        self._example_total.labels(model).inc(count)

    @_never_raises
    def batch_task(self, input_sizes):
        if self._batching:
            for size in input_sizes:
                self._input_batch.observe(size)

    @_never_raises
    def batch_queued(self, seconds):
        if self._batching:  # TF Serving's batching session passes an empty pool name.
            self._queuing.labels("").observe(max(seconds, 0.0) * 1e6)

    @_never_raises
    def batch_run(self, size, padding):
        if self._batching:
            self._wrapped_runs.inc()
            self._processed_batch.observe(size)
            self._padding.labels(str(size)).observe(padding)

    @_never_raises
    def load(self, model_path, ok, seconds):
        self._load_attempts.labels(model_path, "success" if ok else "fail").inc()
        self._load_latency.labels(model_path).inc(int(max(seconds, 0.0) * 1e6))

    @_never_raises
    def warmup(self, model_path, code, seconds, records):
        status = code.name
        self._warmup_latency.labels(model_path, status).observe(max(seconds, 0.0) * 1e6)
        self._warmup_records.labels(model_path, status).inc(records)

    def exposition(self):
        """(`CONTENT_TYPE`, the text format page) with TF Serving's counter names."""
        text = generate_latest(_WithoutCreated(self.registry)).decode("utf-8")
        lines = []
        for line in text.splitlines():
            if line.startswith("# "):  # "# HELP <name> ..." / "# TYPE <name> ..."
                kind, _, rest = line[2:].partition(" ")
                name, _, tail = rest.partition(" ")
                if name in self._renames:
                    line = f"# {kind} {self._renames[name]} {tail}"
            else:
                end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0),
                          default=len(line))
                name = line[:end]
                if name in self._renames:
                    line = self._renames[name] + line[end:]
            lines.append(line)
        return CONTENT_TYPE, ("\n".join(lines) + "\n").encode("utf-8")
