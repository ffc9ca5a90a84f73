"""Model and version lifecycle: discovery, version policies, loading, hot swap and status.

Mirrors TF Serving's `ServerCore` with an `AvailabilityPreservingPolicy`: version directories
under each model's base path are polled, the versions the policy aspires to are loaded while the
current ones keep serving, `Latest` flips to a new version only once it is AVAILABLE, and only
then are retired versions unloaded. A version that fails to load ends in END with its error and
never replaces a serving one. Requests hold a reference to the `Servable` they resolved, so an
unload never breaks a request in flight.
"""

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

log = logging.getLogger("serving")

State = get_model_status_pb2.ModelVersionStatus.State
_VERSION_DIR = re.compile(r"^\d+$")
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


def validate_config(config, current_platforms=None):
    """Checks a `ModelServerConfig` as `ServerCore` does; raises `ServingError`."""
    kind = config.WhichOneof("config")
    if kind == "custom_model_config":
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "ServerModelConfig type not supported by HandleReloadConfigRequest. "
            "Only ModelConfigList is currently supported",
        )
    seen = set()
    for model in config.model_config_list.config:
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


class _Version:
    def __init__(self):
        self.state = State.START
        self.error_code, self.error_message = _OK, ""
        self.servable = None


class _Model:
    def __init__(self, config):
        self.config = config
        self.versions = {}  # version -> _Version, every version ever seen
        self.available = {}  # version -> Servable, replaced whole on change
        self.active = True


class ModelManager:
    """Keeps the configured models' aspired versions loaded; resolves `ModelSpec`s.

    Args:
        config: a `tensorflow.serving.ModelServerConfig` (validated by `validate_config`).
        poll_wait_seconds: seconds between file-system polls; 0 polls once, negative never.
        max_num_load_retries, load_retry_interval_s: retries of a failed load.
        tags: MetaGraphDef tags to load.
        warmup: optional callable(servable) run after a load; an exception fails the load.
    """

    def __init__(self, config, *, poll_wait_seconds=1.0, max_num_load_retries=5,
                 load_retry_interval_s=60.0, tags=("serve",), warmup=None,
                 allow_labels_for_unavailable=False):
        self.poll_wait_seconds = poll_wait_seconds
        self.max_num_load_retries = max_num_load_retries
        self.load_retry_interval_s = load_retry_interval_s
        self.tags = tuple(tags)
        self.warmup = warmup
        self.allow_labels_for_unavailable = allow_labels_for_unavailable
        self._lock = threading.RLock()
        self._poll_lock = threading.Lock()
        self._models = {}
        self._labels = {}
        self._stop = threading.Event()
        self._thread = None
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

    def start(self):
        """Runs the first poll, waits until every model has served or failed its initial
        versions, assigns version labels, then keeps polling in a daemon thread.

        Raises:
            ServingError: UNKNOWN `<k> servable(s) did not become available: {...}` if a
                model's initial versions all failed.
        """
        interval = self.poll_wait_seconds if self.poll_wait_seconds > 0 else 1.0
        while not self._stop.is_set():
            self.poll()
            pending = [m for m in self._active_models() if not self._settled(m)]
            if not pending:
                break
            self._stop.wait(interval)
        failed = self._failures(self._active_models())
        if failed:
            raise ServingError(
                grpc.StatusCode.UNKNOWN,
                f"{len(failed)} servable(s) did not become available: "
                f"{{{', '.join(failed)}}}",
            )
        self._assign_labels(self._config(), check=False)
        if self.poll_wait_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="fs-poll", daemon=True)
            self._thread.start()

    def stop(self):
        """Stops polling; loaded versions stay usable until dropped."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def reload_config(self, config):
        """Replaces the model list (omitted models unload) and returns once the new models
        are AVAILABLE, as `ServerCore::ReloadConfig` does; raises `ServingError`."""
        with self._lock:
            platforms = {n: m.config.model_platform for n, m in self._models.items() if m.active}
        validate_config(config, platforms)
        if not self.allow_labels_for_unavailable:
            self._check_labels(config)
        self._set_models(config)
        while True:
            self.poll()
            models = [m for m in self._active_models() if not self._settled(m)]
            if not models or self._stop.is_set():
                break
            time.sleep(0.2)
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
        return bool(model.available) or any(
            v.state == State.END and v.error_code != _OK for v in model.versions.values()
        )

    @staticmethod
    def _failures(models):
        parts = []
        for model in models:
            if model.available:
                continue
            for version, v in sorted(model.versions.items()):
                if v.error_code != _OK:
                    parts.append(
                        f"{{name: {model.config.name} version: {version}}} due to error: "
                        f"{v.error_message}"
                    )
        return parts

    # Polling, loading, unloading.

    def _poll_loop(self):
        while not self._stop.wait(self.poll_wait_seconds):
            try:
                self.poll()
            except Exception:  # A poll must never kill the loop.
                log.exception("File system poll failed")

    def poll(self):
        """Discovers versions once and loads/unloads to match each model's policy."""
        with self._poll_lock:
            with self._lock:
                models = list(self._models.values())
            for model in models:
                if not model.active:
                    self._unload(model, set(model.available))
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
                self._unload_retired(model, aspired)
                for version in sorted(aspired, reverse=True):
                    record = model.versions.get(version)
                    # Never seen, or unloaded cleanly and aspired again; failures stay failed.
                    if record is None or (record.state == State.END and record.error_code == _OK):
                        self._load(model, version, found[version])
                self._unload_retired(model, aspired)

    def _unload_retired(self, model, aspired):
        retired = set(model.available) - aspired
        if not retired:
            return
        serving_aspired = aspired & set(model.available)
        if serving_aspired or not aspired:
            self._unload(model, retired)
        elif len(retired) > 1:  # Keep the newest retired version until an aspired one serves.
            self._unload(model, set(sorted(retired)[:-1]))

    def _unload(self, model, versions):
        for version in sorted(versions):
            record = model.versions[version]
            record.state = State.UNLOADING
            with self._lock:
                model.available = {v: s for v, s in model.available.items() if v != version}
            record.servable = None
            record.state = State.END
            log.info("Unloaded servable version {name: %s version: %d}", model.config.name, version)

    def _load(self, model, version, path):
        record = _Version()
        with self._lock:
            model.versions[version] = record
        record.state = State.LOADING
        name = model.config.name
        for attempt in range(self.max_num_load_retries + 1):
            if attempt:
                if self._stop.wait(self.load_retry_interval_s):
                    break
                log.info("Retrying load of servable {name: %s version: %d}", name, version)
            try:
                servable = Servable(name, version, path, self.tags)
                if self.warmup is not None:
                    self.warmup(servable)
            except Exception as e:
                code = getattr(e, "error_code", None)
                if isinstance(e, ServingError):
                    code = e.code.value[0]
                record.error_code = code if code is not None else _UNKNOWN
                record.error_message = getattr(e, "message", None) or str(e) or repr(e)
                log.error("Loading servable {name: %s version: %d} failed: %s", name, version,
                          record.error_message)
                continue
            record.error_code, record.error_message = _OK, ""
            record.servable = servable
            with self._lock:
                model.available = {**model.available, version: servable}
            record.state = State.AVAILABLE
            log.info("Successfully loaded servable version {name: %s version: %d}", name, version)
            return
        record.state = State.END

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

    def model_names(self):
        """Names of the models currently configured."""
        return [m.config.name for m in self._active_models()]
