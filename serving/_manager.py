"""Model and version lifecycle: discovery, version policies, loading, hot swap and status.

Mirrors TF Serving's `ServerCore` with an `AvailabilityPreservingPolicy`: version directories
under each model's base path are polled, the versions the policy aspires to are loaded while the
current ones keep serving, `Latest` flips to a new version only once it is AVAILABLE, and only
then are retired versions unloaded. A version that fails to load ends in END with its error and
never replaces a serving one. Requests hold a reference to the `Servable` they resolved, so an
unload never breaks a request in flight.
"""

import heapq
import logging
import os
import re
import threading
import time

import grpc
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_status_pb2

from serving._errors import ServingError
from serving._metrics import DISABLED

log = logging.getLogger("serving")

State = get_model_status_pb2.ModelVersionStatus.State
_VERSION_DIR = re.compile(r"^\d+$")
# Model names must be routable over REST (`/v1/models/<name>`) and printable.
_BAD_NAME = re.compile(r"[/:\s\x00-\x1f\x7f]")
# How long a reload waits for another reload to finish before it answers ABORTED.
RELOAD_LOCK_WAIT_S = 0.5
_OK, _UNKNOWN = 0, 2


class Servable:
    """One loaded version of a model.

    Attributes:
        name, version, path: what was loaded, from where.
        signature_defs: the `serve` MetaGraphDef's signature map, read from `saved_model.pb`
            (it includes `__saved_model_init_op`, as TF Serving's metadata does).
        signatures: callables by signature key, taking input aliases as keyword arguments.
    """

    def __init__(self, name, version, path, tags=("serve",)):
        self.name, self.version, self.path = name, version, path
        self.signature_defs = read_signature_defs(path, tags)
        self._loaded = tf.saved_model.load(path, tags=list(tags))
        self.signatures = dict(self._loaded.signatures)


def read_signature_defs(path, tags=("serve",)):
    """Returns the signature map of the MetaGraphDef tagged `tags` in `<path>/saved_model.pb`."""
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved_model = saved_model_pb2.SavedModel.FromString(f.read())
    for meta_graph in saved_model.meta_graphs:
        if set(tags) <= set(meta_graph.meta_info_def.tags):
            return dict(meta_graph.signature_def)
    raise ValueError(f"Could not find meta graph def matching supplied tags: {{{','.join(tags)}}}")


def list_versions(base_path):
    """Returns {version: dir} for the integer-named directories under `base_path`."""
    versions = {}
    for entry in sorted(os.listdir(base_path)):
        full = os.path.join(base_path, entry)
        if _VERSION_DIR.match(entry) and os.path.isdir(full):
            version = int(entry)
            if version in versions:
                log.warning("Duplicate version directories for version %d: %s", version, full)
            versions.setdefault(version, full)
    return versions


def aspired_versions(policy, versions):
    """Applies a `ServableVersionPolicy` (default `latest {num_versions: 1}`) to version numbers."""
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return set(versions)
    if kind == "specific":
        return set(versions) & set(policy.specific.versions)
    n = max(policy.latest.num_versions, 1) if kind == "latest" else 1
    return set(sorted(versions, reverse=True)[:n])


def validate_config(config, current_platforms=None, check_paths=False):
    """Checks a `ModelServerConfig` as `ServerCore` does; raises `ServingError`.

    With `check_paths` (reloads) every local base path must also exist and hold at least one
    numeric version directory, like `FileSystemStoragePathSource::FailIfZeroVersions`, so a
    reload that could never become AVAILABLE is refused before anything is applied.
    """
    kind = config.WhichOneof("config")
    if kind == "custom_model_config":
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "ServerModelConfig type not supported by HandleReloadConfigRequest. "
            "Only ModelConfigList is currently supported",
        )
    seen = set()
    for model in config.model_config_list.config:
        if not model.name or _BAD_NAME.search(model.name):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Invalid model name {model.name!r}: it must be non-empty and hold no '/', ':', "
                "whitespace or control characters",
            )
        if model.name in seen:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Illegal to list model {model.name} multiple times in config list",
            )
        seen.add(model.name)
        if not (os.path.isabs(model.base_path) or "://" in model.base_path):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Expected model {model.name} to have an absolute path or URI; "
                f"got base_path()={model.base_path}",
            )
        if not model.model_platform:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
                "ModelServerConfig::model_platform.",
            )
        if model.model_platform != "tensorflow":
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"PlatformConfigMap has no entry for platform {model.model_platform}",
            )
        old = (current_platforms or {}).get(model.name)
        if old and old != model.model_platform:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Illegal to change a model's platform. For model {model.name} platform was "
                f"{old} and new platform requested is {model.model_platform}",
            )
        if check_paths:
            _check_base_path(model.name, model.base_path)


def _check_base_path(name, base_path):
    try:
        versions = list_versions(base_path)
    except OSError:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"Could not find base path {base_path} for servable {name}") from None
    if not versions:
        raise ServingError(grpc.StatusCode.NOT_FOUND,
                           f"Unable to find a numerical version path for servable {name} at: "
                           f"{base_path}")


class _Version:
    def __init__(self):
        self.state = State.START
        self.error_code, self.error_message = _OK, ""
        self.servable = None
        self.attempts = 0  # failed load attempts so far


class _Model:
    def __init__(self, config):
        self.config = config
        self.versions = {}  # version -> _Version, every version ever seen
        self.available = {}  # version -> Servable, replaced whole on change
        self.aspired = set()  # what the last poll's policy wants loaded
        self.active = True
        self.signature_keys = frozenset()  # of every version loaded so far (metric labels)


class ModelManager:
    """Keeps the configured models' aspired versions loaded; resolves `ModelSpec`s.

    Args:
        config: a `tensorflow.serving.ModelServerConfig` (validated by `validate_config`).
        poll_wait_seconds: seconds between file-system polls; 0 polls once, negative never
            (reloads still poll once).
        max_num_load_retries, load_retry_interval_s: retries of a failed load, re-queued on
            the loader thread (never slept through by discovery).
        tags: MetaGraphDef tags to load.
        warmup: optional callable(servable) run after a load; an exception fails the load.
        reload_timeout_s: the most a `reload_config` waits for its models (a caller's own
            timeout can only shorten it).
        metrics: a `serving._metrics.Metrics`, told of every load attempt.
    """

    def __init__(self, config, *, poll_wait_seconds=1.0, max_num_load_retries=5,
                 load_retry_interval_s=60.0, tags=("serve",), warmup=None,
                 allow_labels_for_unavailable=False, reload_timeout_s=60.0, metrics=DISABLED):
        self.poll_wait_seconds = poll_wait_seconds
        self.max_num_load_retries = max_num_load_retries
        self.load_retry_interval_s = load_retry_interval_s
        self.tags = tuple(tags)
        self.warmup = warmup
        self.allow_labels_for_unavailable = allow_labels_for_unavailable
        self.reload_timeout_s = reload_timeout_s
        self.metrics = metrics
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # a version changed state
        self._work = threading.Condition(self._lock)  # the load queue changed
        self._tasks = []  # heap of (due, seq, model, version, path, record)
        self._seq = 0
        self._poll_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._poll_now = threading.Event()
        self._starting = False
        self._models = {}
        self._labels = {}
        self._stop = threading.Event()
        self._threads = []
        self._set_models(config)

    # Configuration.

    def _set_models(self, config):
        with self._lock:
            wanted = {m.name: m for m in config.model_config_list.config}
            for name, model in self._models.items():
                if name not in wanted:
                    model.active = False
            for name, model_config in wanted.items():
                if name in self._models and self._models[name].active:
                    self._models[name].config = model_config
                elif name in self._models:
                    self._models[name].config, self._models[name].active = model_config, True
                else:
                    self._models[name] = _Model(model_config)

    def _assign_labels(self, config, check):
        labels = {}
        for model_config in config.model_config_list.config:
            available = self._models[model_config.name].available
            for label, version in model_config.version_labels.items():
                if check and version not in available:
                    raise ServingError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"Request to assign label to version {version} of model "
                        f"{model_config.name}, which is not currently available for inference",
                    )
                labels[(model_config.name, label)] = version
        with self._lock:
            self._labels = labels

    def _start_threads(self):
        if self._threads:
            return
        for target, name in ((self._load_loop, "model-loader"), (self._poll_loop, "fs-poll")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def start(self):
        """Starts the manager's threads, waits until every model has served or failed its
        initial versions (polling at least once a second meanwhile), assigns version labels,
        then keeps polling every `poll_wait_seconds` if that is positive.

        Raises:
            ServingError: UNKNOWN `<k> servable(s) did not become available: {...}` if a
                model's initial versions all failed.
        """
        self._starting = True
        self._start_threads()
        try:
            self.poll()
            with self._lock:
                while not self._stop.is_set() and not all(
                        self._settled(m) for m in self._active_models()):
                    self._changed.wait(1.0)
        finally:
            self._starting = False
        failed = self._failures(self._active_models())
        if failed:
            self.stop(timeout=1.0)
            raise ServingError(
                grpc.StatusCode.UNKNOWN,
                f"{len(failed)} servable(s) did not become available: "
                f"{{{', '.join(failed)}}}",
            )
        self._assign_labels(self._config(), check=False)

    def stop(self, timeout=5.0):
        """Stops polling, loading and load retries, and ends reloads still waiting; waits at
        most `timeout` seconds for the threads (a load in progress cannot be interrupted; its
        daemon thread is abandoned). Loaded versions stay usable until dropped."""
        self._stop.set()
        self._poll_now.set()
        with self._lock:
            self._work.notify_all()
            self._changed.notify_all()
        deadline = time.monotonic() + max(timeout, 0)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0))

    def reload_config(self, config, timeout=None):
        """Replaces the model list (omitted models unload) and returns once the new models
        are AVAILABLE, as `ServerCore::ReloadConfig` does; raises `ServingError`.

        The whole config is validated (including base paths) before any of it is applied.
        Loading happens on the manager's threads; this call only waits, at most
        min(`timeout`, `reload_timeout_s`) seconds. Errors beyond TF Serving's rows 28-35:
        ABORTED if another reload is still running, DEADLINE_EXCEEDED if the models are not
        settled in time (the config stays applied and loading goes on), UNAVAILABLE if the
        server stops meanwhile.
        """
        wait = self.reload_timeout_s if timeout is None else min(timeout, self.reload_timeout_s)
        deadline = time.monotonic() + max(wait, 0)
        if not self._reload_lock.acquire(timeout=max(min(RELOAD_LOCK_WAIT_S, wait), 0)):
            raise ServingError(grpc.StatusCode.ABORTED,
                               "Another model config reload is in progress; try again later")
        try:
            self._reload_locked(config, deadline)
        finally:
            self._reload_lock.release()

    def _reload_locked(self, config, deadline):
        if self._stop.is_set():
            raise ServingError(grpc.StatusCode.UNAVAILABLE, "Server is shutting down")
        with self._lock:
            platforms = {n: m.config.model_platform for n, m in self._models.items() if m.active}
        validate_config(config, platforms, check_paths=True)
        if not self.allow_labels_for_unavailable:
            self._check_labels(config)
        self._start_threads()
        self._set_models(config)
        self.poll()  # Discovery only: lists directories and queues loads for the loader thread.
        with self._lock:
            while True:
                pending = [m for m in self._active_models() if not self._settled(m)]
                remaining = deadline - time.monotonic()
                if not pending or self._stop.is_set() or remaining <= 0:
                    break
                self._changed.wait(min(remaining, 1.0))
        if self._stop.is_set():
            raise ServingError(grpc.StatusCode.UNAVAILABLE, "Server is shutting down")
        if pending:
            names = ", ".join(m.config.name for m in pending)
            raise ServingError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"Timed out waiting for model(s) to become available: {{{names}}}; the new "
                "config is applied and loading continues (see GetModelStatus)",
            )
        failed = self._failures(self._active_models())
        if failed:
            raise ServingError(
                grpc.StatusCode.UNKNOWN,
                f"{len(failed)} model(s) did not become available: {{{', '.join(failed)}}}",
            )
        self._assign_labels(config, check=not self.allow_labels_for_unavailable)

    def _check_labels(self, config):
        for model_config in config.model_config_list.config:
            model = self._models.get(model_config.name)
            available = model.available if model else {}
            for version in model_config.version_labels.values():
                if version not in available:
                    raise ServingError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"Request to assign label to version {version} of model "
                        f"{model_config.name}, which is not currently available for inference",
                    )

    def _config(self):
        from tensorflow_serving.config import model_server_config_pb2

        config = model_server_config_pb2.ModelServerConfig()
        with self._lock:
            for model in self._active_models():
                config.model_config_list.config.add().CopyFrom(model.config)
        return config

    def _active_models(self):
        with self._lock:
            return [m for m in self._models.values() if m.active]

    @staticmethod
    def _settled(model):
        """Serving something, or every aspired version failed for good."""
        if model.available:
            return True
        aspired = [model.versions.get(v) for v in model.aspired]
        return bool(aspired) and all(
            r is not None and r.state == State.END and r.error_code != _OK for r in aspired)

    @staticmethod
    def _failures(models):
        parts = []
        for model in models:
            if model.available:
                continue
            for version, v in sorted(model.versions.items()):
                if v.error_code != _OK and v.state == State.END:
                    parts.append(
                        f"{{name: {model.config.name} version: {version}}} due to error: "
                        f"{v.error_message}"
                    )
        return parts

    # Polling (discovery), loading, unloading.

    def _poll_loop(self):
        while not self._stop.is_set():
            if self._starting:  # Until the first versions settle, at least once a second.
                timeout = max(self.poll_wait_seconds, 1.0)
            elif self.poll_wait_seconds > 0:
                timeout = self.poll_wait_seconds
            else:
                timeout = None  # No periodic polls; reloads poll themselves.
            self._poll_now.wait(timeout)
            self._poll_now.clear()
            if self._stop.is_set() or timeout is None:
                continue
            try:
                self.poll()
            except Exception:  # A poll must never kill the loop.
                log.exception("File system poll failed")

    def poll(self):
        """Discovers versions once, unloads retired ones and queues loads of new aspired ones
        for the loader thread; never waits for a load."""
        with self._poll_lock:
            with self._lock:
                models = list(self._models.values())
            for model in models:
                if not model.active:
                    with self._lock:
                        model.aspired = set()
                        self._unload(model, set(model.available))
                        for record in model.versions.values():
                            if record.state == State.LOADING and record.attempts:
                                record.state = State.END
                    continue
                base = model.config.base_path
                try:
                    found = list_versions(base)
                except OSError:
                    log.warning("Could not find base path %s for servable %s", base,
                                model.config.name)
                    continue
                if not found:
                    log.warning(
                        "No versions of servable %s found under base path %s. Did you forget "
                        "to name your leaf directory as a number (eg. '/1/')?",
                        model.config.name, base)
                aspired = aspired_versions(model.config.model_version_policy, found)
                with self._lock:
                    model.aspired = aspired
                    self._unload_retired(model)
                    for version, record in model.versions.items():
                        if record.state == State.LOADING and record.attempts and (
                                version not in aspired):
                            record.state = State.END  # Stop retrying what is not aspired.
                            log.info("Cancelled load retries of servable {name: %s version: "
                                     "%d}", model.config.name, version)
                            self._changed.notify_all()
                    for version in sorted(aspired, reverse=True):
                        record = model.versions.get(version)
                        # Never seen, or unloaded cleanly and aspired again; failures stay
                        # failed.
                        if record is None or (record.state == State.END
                                              and record.error_code == _OK):
                            self._queue(model, version, found[version])

    def _queue(self, model, version, path, due=None):
        """Records `version` as START (if new) and queues its load; call with `_lock` held."""
        if due is None:
            model.versions[version] = _Version()
            due = time.monotonic()
        self._seq += 1
        heapq.heappush(self._tasks,
                       (due, self._seq, model, version, path, model.versions[version]))
        self._work.notify_all()
        self._changed.notify_all()

    def _unload_retired(self, model):
        """Availability-preserving unload; call with `_lock` held."""
        aspired = model.aspired
        retired = set(model.available) - aspired
        if not retired:
            return
        serving_aspired = aspired & set(model.available)
        if serving_aspired or not aspired:
            self._unload(model, retired)
        elif len(retired) > 1:  # Keep the newest retired version until an aspired one serves.
            self._unload(model, set(sorted(retired)[:-1]))

    def _unload(self, model, versions):
        with self._lock:
            for version in sorted(versions):
                record = model.versions[version]
                record.state = State.UNLOADING
                model.available = {v: s for v, s in model.available.items() if v != version}
                record.servable = None
                record.state = State.END
                log.info("Unloaded servable version {name: %s version: %d}", model.config.name,
                         version)
            self._changed.notify_all()

    def _next_task(self):
        with self._lock:
            while not self._stop.is_set():
                now = time.monotonic()
                if self._tasks and self._tasks[0][0] <= now:
                    return heapq.heappop(self._tasks)
                self._work.wait(self._tasks[0][0] - now if self._tasks else None)
        return None

    def _load_loop(self):
        while True:
            task = self._next_task()
            if task is None:
                return
            try:
                self._load(*task[2:])
            except Exception:  # The loader must never die.
                log.exception("Load task failed")

    def _load(self, model, version, path, record):
        name = model.config.name
        with self._lock:
            if model.versions.get(version) is not record or record.state == State.END:
                return  # A stale retry of a version already dropped.
            if not model.active or version not in model.aspired:
                record.state = State.END  # No longer wanted: drop it (keeping any last error).
                log.info("Cancelled loading servable {name: %s version: %d}", name, version)
                self._changed.notify_all()
                return
            record.state = State.LOADING
            self._changed.notify_all()
        if record.attempts:
            log.info("Retrying load of servable {name: %s version: %d}", name, version)
        servable, start = None, time.monotonic()
        try:
            servable = Servable(name, version, path, self.tags)
            self.metrics.load(path, True, time.monotonic() - start)
            if self.warmup is not None:
                self.warmup(servable)
        except Exception as e:
            if servable is None:
                self.metrics.load(path, False, time.monotonic() - start)
            code = getattr(e, "error_code", None)
            if isinstance(e, ServingError):
                code = e.code.value[0]
            message = getattr(e, "message", None) or str(e) or repr(e)
            log.error("Loading servable {name: %s version: %d} failed: %s", name, version,
                      message)
            with self._lock:
                record.error_code = code if code is not None else _UNKNOWN
                record.error_message = message
                record.attempts += 1
                if record.attempts > self.max_num_load_retries or self._stop.is_set():
                    record.state = State.END
                else:  # LOADING with the last error until the retry runs.
                    self._queue(model, version, path,
                                due=time.monotonic() + self.load_retry_interval_s)
                self._changed.notify_all()
            return
        with self._lock:
            record.error_code, record.error_message = _OK, ""
            if not model.active or version not in model.aspired:
                record.state = State.END  # Un-aspired while loading: never served.
                log.info("Discarded servable version {name: %s version: %d}: no longer "
                         "aspired", name, version)
            else:
                record.servable = servable
                model.signature_keys = model.signature_keys | set(servable.signature_defs)
                model.available = {**model.available, version: servable}
                record.state = State.AVAILABLE
                log.info("Successfully loaded servable version {name: %s version: %d}", name,
                         version)
                self._unload_retired(model)
            self._changed.notify_all()

    # Lookups.

    def resolve(self, model_spec):
        """Returns the `Servable` a `ModelSpec` names (§2 of the spec); raises `ServingError`."""
        name = model_spec.name
        if not name:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified.")
        with self._lock:
            model = self._models.get(name)
            available = model.available if model is not None and model.active else {}
            labels = self._labels
        choice = model_spec.WhichOneof("version_choice")
        if choice == "version_label":
            label = model_spec.version_label
            if (name, label) not in labels:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"Unrecognized servable version label: {label}")
            version = labels[(name, label)]
        elif choice == "version":
            version = model_spec.version.value
        else:
            if not available:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Servable not found for request: Latest({name})")
            return available[max(available)]
        if version not in available:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: Specific({name}, {version})")
        return available[version]

    def version_states(self, name, version=None):
        """Returns [(version, state, error_code, error_message)], highest version first."""
        with self._lock:
            model = self._models.get(name)
            records = dict(model.versions) if model is not None else {}
        rows = [(v, r.state, r.error_code, r.error_message) for v, r in records.items()]
        if version is not None:
            rows = [row for row in rows if row[0] == version]
        return sorted(rows, reverse=True)

    def known(self, name, signature_name=None):
        """Whether `name` is or was a configured model and, with `signature_name`, whether a
        version of it loaded so far had that signature: the label values
        `serving._metrics` lets clients choose. Lock-free (a dict lookup and a frozenset
        membership), so a metric update never waits for the manager."""
        model = self._models.get(name)  # entries are added, never removed
        if model is None:
            return False
        return signature_name is None or signature_name in model.signature_keys

    def model_names(self):
        """Names of the models currently configured."""
        return [m.config.name for m in self._active_models()]
