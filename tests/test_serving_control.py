"""The control plane cannot be turned against the server, and broken versions never block
discovery (issue 8, items 3 and 6).

One server on loopback serves half_plus_two as `hp`, polls every 0.3 s, retries failed loads
100 times 0.2 s apart (so a load that blocked discovery would block it for 20 s) and caps a
reload's wait at 4 s.
"""

import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from _serving_fixtures import ServerProcess, copy_version, write_half_plus_two
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from serving._tensors import from_ndarray

State = get_model_status_pb2.ModelVersionStatus.State
POLL_S, RETRY_S, RETRIES, RELOAD_CAP_S = 0.3, 0.2, 100, 4
# Documented bounds (docs/serving.md): a refused reload answers at once (validation is a few
# directory listings), and a newer good version serves within one poll plus its load time.
BAD_RELOAD_BOUND_S = 3.0
NEWER_VERSION_BOUND_S = 8.0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("control")
    write_half_plus_two(base / "hp2" / "1")
    copy_version(base / "hp2" / "1", base / "hp", 1)
    return base


@pytest.fixture(scope="module")
def server(base):
    process = ServerProcess(
        base, "--model_name=hp", f"--model_base_path={base / 'hp'}",
        f"--file_system_poll_wait_seconds={POLL_S}", f"--max_num_load_retries={RETRIES}",
        f"--load_retry_interval_micros={int(RETRY_S * 1e6)}", "--grpc_max_threads=8",
        f"--reload_config_timeout_seconds={RELOAD_CAP_S}")
    try:
        yield process.start()
    finally:
        process.kill()


@pytest.fixture
def model_service(server):
    with grpc.insecure_channel(server.address) as channel:
        yield model_service_pb2_grpc.ModelServiceStub(channel)


def _config(*models):
    config = model_server_config_pb2.ModelServerConfig()
    for name, base_path, *platform in models:
        config.model_config_list.config.add(
            name=name, base_path=str(base_path),
            model_platform=platform[0] if platform else "tensorflow")
    return config


def _reload(stub, config, timeout=30):
    """(code, details, seconds) of a HandleReloadConfigRequest."""
    start = time.monotonic()
    try:
        response = stub.HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=config), timeout=timeout)
    except grpc.RpcError as e:
        return e.code(), e.details(), time.monotonic() - start
    assert response.status.error_code == 0
    return grpc.StatusCode.OK, "", time.monotonic() - start


def _status(stub, name, version=None):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    try:
        response = stub.GetModelStatus(request, timeout=10)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return []
        raise
    return [(s.version, s.state, s.status.error_code, s.status.error_message)
            for s in response.model_version_status]


def _predict(server, timeout=5):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "hp"
    request.inputs["x"].CopyFrom(from_ndarray(np.array([2.0], np.float32)))
    with grpc.insecure_channel(server.address) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            request, timeout=timeout)
    return response.model_spec.version.value, list(response.outputs["y"].float_val)


def _wait_for(predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


def _broken_version(base, name, version, how):
    """A version directory that fails to load: corrupt `saved_model.pb` or no `variables/`."""
    staging = base / name / f".tmp-{version}"
    if how == "corrupt":
        staging.mkdir(parents=True)
        (staging / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    else:
        shutil.copytree(base / "hp2" / "1", staging)
        shutil.rmtree(staging / "variables")
    staging.rename(base / name / str(version))


def test_bad_reload_configs_are_refused_at_once_with_tf_serving_codes(server, base, model_service):
    (base / "empty").mkdir()
    (base / "empty" / "not-a-version").mkdir()
    custom = model_server_config_pb2.ModelServerConfig()
    custom.custom_model_config.type_url = "x"
    hp = ("hp", base / "hp")
    cases = [
        # A valid new model listed before the bad one: none of the config may be applied.
        (_config(hp, ("hp_copy", base / "hp2"), ("new", base / "missing")),
         grpc.StatusCode.INVALID_ARGUMENT,
         f"Could not find base path {base / 'missing'} for servable new"),
        (_config(hp, ("new", base / "empty")), grpc.StatusCode.NOT_FOUND,
         f"Unable to find a numerical version path for servable new at: {base / 'empty'}"),
        (_config(hp, ("new", "relative/new")), grpc.StatusCode.INVALID_ARGUMENT,
         "Expected model new to have an absolute path or URI; got base_path()=relative/new"),
        (_config(hp, hp), grpc.StatusCode.INVALID_ARGUMENT,
         "Illegal to list model hp multiple times in config list"),
        (_config(hp, ("", base / "hp2")), grpc.StatusCode.INVALID_ARGUMENT,
         "Invalid model name ''"),
        (_config(hp, ("a/b", base / "hp2")), grpc.StatusCode.INVALID_ARGUMENT,
         "Invalid model name 'a/b'"),
        (_config(hp, ("new", base / "hp2", "pytorch")), grpc.StatusCode.FAILED_PRECONDITION,
         "PlatformConfigMap has no entry for platform pytorch"),
        (_config(hp, ("new", base / "hp2", "")), grpc.StatusCode.INVALID_ARGUMENT,
         "Illegal setting neither ModelServerConfig::model_type (deprecated) nor"),
        (custom, grpc.StatusCode.INVALID_ARGUMENT,
         "ServerModelConfig type not supported by HandleReloadConfigRequest"),
    ]
    for config, code, gist in cases:
        got, details, seconds = _reload(model_service, config)
        assert (got, gist in details) == (code, True), (got, details)
        assert seconds < BAD_RELOAD_BOUND_S, f"{gist}: answered after {seconds:.2f}s"
        assert [row[:3] for row in _status(model_service, "hp")] == [(1, State.AVAILABLE, 0)]
    assert _status(model_service, "hp_copy") == [] and _status(model_service, "new") == []
    assert _predict(server) == (1, [3.0])


def test_concurrent_reloads_never_exhaust_the_grpc_workers(server, base, model_service):
    """Nine bad reloads at once (one more than the 8 worker threads) all answer at once, nine
    slow ones answer within their deadline (one DEADLINE_EXCEEDED, the rest ABORTED), and
    Predict keeps working meanwhile."""
    _broken_version(base, "broken", 1, "corrupt")
    bad = _config(("hp", base / "hp"), ("new", base / "missing"))
    slow = _config(("hp", base / "hp"), ("broken", base / "broken"))

    def storm(config, timeout):
        results = [None] * 9

        def call(i):
            results[i] = _reload(model_service, config, timeout)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(9)]
        for thread in threads:
            thread.start()
        predicted = _predict(server, timeout=5)  # Would time out if the workers were held.
        for thread in threads:
            thread.join(60)
        return predicted, results

    predicted, results = storm(bad, 30)
    assert predicted == (1, [3.0])
    codes = [code for code, _, _ in results]
    assert set(codes) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED}, results
    assert grpc.StatusCode.INVALID_ARGUMENT in codes
    assert max(seconds for _, _, seconds in results) < BAD_RELOAD_BOUND_S, results

    predicted, results = storm(slow, 3)
    assert predicted == (1, [3.0])
    codes = sorted(code.name for code, _, _ in results)
    assert codes == ["ABORTED"] * 8 + ["DEADLINE_EXCEEDED"], results
    aborted = [r for r in results if r[0] == grpc.StatusCode.ABORTED]
    assert all("Another model config reload is in progress" in d for _, d, _ in aborted)
    assert max(seconds for _, _, seconds in results) < 3 + 2, results
    # The slow config was applied; its broken version retries in the background (LOADING with
    # its error) without holding anything up.
    ((version, state, error_code, message),) = _status(model_service, "broken")
    assert (version, state) == (1, State.LOADING) and error_code != 0 and message

    # Without a client deadline the server's cap (--reload_config_timeout_seconds) applies.
    code, details, seconds = _reload(model_service, slow, timeout=None)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, details)
    assert "Timed out waiting for model(s) to become available: {broken}" in details
    assert RELOAD_CAP_S - 0.5 < seconds < RELOAD_CAP_S + 2

    # Dropping the model ends its retries: END with the last error, kept listed.
    assert _reload(model_service, _config(("hp", base / "hp")))[0] == grpc.StatusCode.OK
    ((_, state, error_code, message),) = _status(model_service, "broken")
    assert (state, error_code != 0, bool(message)) == (State.END, True, True)
    assert _predict(server) == (1, [3.0])


def test_a_broken_version_retries_in_the_background_and_a_newer_one_takes_over(
        server, base, model_service):
    _broken_version(base, "hp", 2, "no-variables")
    # Version 2 is retried (LOADING with its error) while version 1 keeps serving.
    rows = _wait_for(lambda: [r for r in _status(model_service, "hp", 2)
                              if r[1] == State.LOADING and r[2] != 0])
    assert rows and "variables" in rows[0][3], _status(model_service, "hp")
    error_code = rows[0][2]
    assert _predict(server) == (1, [3.0])

    start = time.monotonic()
    copy_version(base / "hp2" / "1", base / "hp", 3)
    assert _wait_for(lambda: _status(model_service, "hp", 3)[:1] == [
        (3, State.AVAILABLE, 0, "")], timeout=30)
    elapsed = time.monotonic() - start
    assert elapsed < NEWER_VERSION_BOUND_S, f"version 3 took {elapsed:.2f}s"
    assert _predict(server) == (3, [3.0])
    # Version 2 is no longer aspired: its retries stop, its error stays; 1 unloads cleanly.
    assert _wait_for(lambda: [r[:3] for r in _status(model_service, "hp")] == [
        (3, State.AVAILABLE, 0), (2, State.END, error_code), (1, State.END, 0)]), (
        _status(model_service, "hp"))
    print(f"newer good version AVAILABLE after {elapsed:.2f}s")


def test_load_retries_respect_the_flags_and_end_with_the_error(tmp_path, caplog):
    """In-process manager: 2 retries 0.3 s apart, then END with the error; discovery (poll)
    returns at once throughout and version 1 keeps serving."""
    import logging

    from tensorflow_serving.apis import model_pb2

    from serving._manager import ModelManager

    write_half_plus_two(tmp_path / "hp" / "1")
    manager = ModelManager(_config(("hp", tmp_path / "hp")), poll_wait_seconds=-1,
                           max_num_load_retries=2, load_retry_interval_s=0.3)
    manager.start()
    try:
        (tmp_path / "hp" / "2").mkdir()
        (tmp_path / "hp" / "2" / "saved_model.pb").write_bytes(b"corrupt")
        caplog.set_level(logging.INFO, logger="serving")
        start = time.monotonic()
        manager.poll()
        assert time.monotonic() - start < 1.0  # Discovery never waits for a load.
        assert _wait_for(lambda: manager.version_states("hp", 2)[0][1] == State.END, 10)
        elapsed = time.monotonic() - start
        ((_, state, code, message),) = manager.version_states("hp", 2)
        assert code != 0 and message
        failures = [r for r in caplog.records if "version: 2} failed" in r.getMessage()]
        assert len(failures) == 3 and elapsed >= 2 * 0.3
        assert manager.resolve(model_pb2.ModelSpec(name="hp")).version == 1
        manager.poll()  # A failed version stays failed: not loaded again.
        time.sleep(0.5)
        assert len([r for r in caplog.records if "version: 2} failed" in r.getMessage()]) == 3
    finally:
        manager.stop()
