"""Version discovery, hot swap, failed loads and server-side batching (§9, §10.3).

One server polls a base path every 0.3 s with batching on (max_batch_size 8).
"""

import concurrent.futures
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from _serving_fixtures import IMAGES, ServerProcess, copy_version, tiny_version
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from serving import client as serving_client

State = get_model_status_pb2.ModelVersionStatus.State


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("versions")


@pytest.fixture(scope="module")
def server(base):
    copy_version(tiny_version(0), base / "alexnet", 1)
    batching = base / "batching.config"
    batching.write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 5000 }\n"
                        "max_enqueued_batches { value: 100 }\nnum_batch_threads { value: 1 }\n")
    process = ServerProcess(
        base, "--model_name=alexnet", f"--model_base_path={base / 'alexnet'}",
        "--file_system_poll_wait_seconds=0.3", "--enable_batching",
        f"--batching_parameters_file={batching}", "--max_num_load_retries=1",
        "--load_retry_interval_micros=100000")
    try:
        yield process.start()
    finally:
        process.kill()


@pytest.fixture(scope="module")
def client(server):
    with serving_client.Client(server.address, "alexnet", timeout=30) as client:
        yield client


def _status(server, version=None):
    with grpc.insecure_channel(server.address) as channel:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "alexnet"
        if version is not None:
            request.model_spec.version.value = version
        try:
            response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
                request, timeout=10)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise
    return [(s.version, s.state, s.status.error_code) for s in response.model_version_status]


def _wait_for(condition, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_batch_larger_than_max_batch_size_is_rejected(client):
    images = [path.read_bytes() for path in IMAGES] * 3
    with pytest.raises(serving_client.ServingClientError) as info:
        client.predict(serving_client.build_predict_request(images[:9], "alexnet"))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Task size 9 is larger than maximum input batch size 8" in info.value.details
    with serving_client.Client(client.server, max_batch_size=8) as splitting:
        assert len(splitting.classify(images)) == len(images)


def test_batched_concurrent_results_equal_unbatched(client):
    local = tf.saved_model.load(str(tiny_version(0))).signatures["serving_default"]
    images = [path.read_bytes() for path in IMAGES]
    expected = local(images=tf.constant(images))["scores"].numpy()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: client.classify([images[i % len(images)]])[0],
                                range(12)))
    for i, top5 in enumerate(results):
        np.testing.assert_allclose([p.probability for p in top5], expected[i % len(images)],
                                   rtol=1e-5)


def test_new_version_is_swapped_in_with_zero_failed_requests(server, base, client):
    request = serving_client.build_predict_request([IMAGES[0].read_bytes()], "alexnet")
    seen, failures, stop = [], [], threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                seen.append(client.predict(request).model_spec.version.value)
            except Exception as e:  # Recorded and asserted on below.
                failures.append(e)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        _wait_for(lambda: len(seen) >= 3, 30)
        copy_version(tiny_version(1), base / "alexnet", 2)
        swapped = _wait_for(lambda: seen and seen[-1] == 2)
        count = len(seen)
        _wait_for(lambda: len(seen) >= count + 5, 30)
    finally:
        stop.set()
        thread.join(60)
    assert swapped, f"version 2 never served; last versions {seen[-5:]}"
    assert failures == []
    assert 1 in seen and seen[-1] == 2 and sorted(seen) == seen
    assert _wait_for(lambda: _status(server) == [(2, State.AVAILABLE, 0), (1, State.END, 0)])
    with pytest.raises(serving_client.ServingClientError) as info:
        serving_client.Client(server.address, version=1).classify(IMAGES[:1])
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert "Servable not found for request: Specific(alexnet, 1)" in info.value.details


def test_a_version_that_fails_to_load_leaves_the_current_one_serving(server, base, client):
    broken = base / "alexnet" / ".tmp-3"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    broken.rename(base / "alexnet" / "3")
    assert _wait_for(lambda: _status(server, 3) and _status(server, 3)[0][1] == State.END)
    ((version, state, error_code),) = _status(server, 3)
    assert error_code != 0
    assert _status(server)[1][:2] == (2, State.AVAILABLE)
    response = client.predict(serving_client.build_predict_request(
        [IMAGES[0].read_bytes()], "alexnet"))
    assert response.model_spec.version.value == 2


def test_reload_config_rpc(server, base):
    from tensorflow_serving.apis import model_management_pb2
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    for _ in range(2):
        config.model_config_list.config.add(
            name="alexnet", base_path=str(base / "alexnet"), model_platform="tensorflow")
    request = model_management_pb2.ReloadConfigRequest(config=config)
    with grpc.insecure_channel(server.address) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.HandleReloadConfigRequest(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Illegal to list model alexnet multiple times" in info.value.details()
        del config.model_config_list.config[1]
        config.model_config_list.config[0].model_version_policy.specific.versions.append(2)
        response = stub.HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=config), timeout=60)
    assert response.status.error_code == 0
    rows = _status(server)
    assert rows[0][:2] == (3, State.END) and rows[1] == (2, State.AVAILABLE, 0)
