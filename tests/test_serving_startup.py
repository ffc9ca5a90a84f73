"""Startup, TLS and configuration of the embedded server, and the client's retries."""

import subprocess
import sys
import threading
import time

import grpc
import pytest
from _serving_fixtures import REPO, ServerProcess, free_port, write_half_plus_two
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving import client as serving_client


def _self_signed_cert():
    """A self-signed certificate for `localhost` / 127.0.0.1: (key PEM, cert PEM)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption()).decode()
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode()


def _hp2_request():
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "hp2"
    request.inputs["x"].dtype = 1  # DT_FLOAT
    request.inputs["x"].float_val.append(2.0)
    return request


def test_tls_round_trip_after_waiting_for_the_first_version(tmp_path):
    key, cert = _self_signed_cert()
    ssl_config = tmp_path / "ssl.config"
    ssl_config.write_text(f"server_key: {key!r}\nserver_cert: {cert!r}\n"
                          "client_verify: false\n".replace("'", '"'))
    base = tmp_path / "hp2"
    base.mkdir()
    process = ServerProcess(tmp_path, "--model_name=hp2", f"--model_base_path={base}",
                            f"--ssl_config_file={ssl_config}")
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.encode())
    options = [("grpc.ssl_target_name_override", "localhost")]

    def publish_later():
        time.sleep(4)
        write_half_plus_two(base / ".tmp")
        (base / ".tmp").rename(base / "7")

    publisher = threading.Thread(target=publish_later)
    try:
        publisher.start()
        process.start(credentials=(credentials, options))
        assert (base / "7").exists(), "the port opened before any version was loaded"
        with grpc.secure_channel(process.address, credentials, options) as channel:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                _hp2_request(), timeout=30)
        assert list(response.outputs["y"].float_val) == [3.0]
        assert response.model_spec.version.value == 7
        with grpc.insecure_channel(process.address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                    _hp2_request(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(serving_client.ServingClientError) as info:
            serving_client.classify([b"x"], server=process.address, model="hp2", tls=True,
                                    root_certificates=cert.encode(),
                                    server_name_override="localhost")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT  # TLS worked; wrong inputs
        assert process.terminate() == 0
    finally:
        publisher.join(30)
        process.kill()


def _run_server(*flags):
    return subprocess.run([sys.executable, "-m", "serving.server", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_bad_configs_fail_startup(tmp_path):
    config = tmp_path / "bad.config"
    config.write_text("model_config_list { config { name: 'x' nonsense: 1 } }")
    result = _run_server(f"--model_config_file={config}", f"--port={free_port()}")
    assert result.returncode != 0
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig" in result.stderr
    result = _run_server("--model_name=m", "--model_base_path=models/m",
                         f"--port={free_port()}")
    assert result.returncode != 0
    assert "Expected model m to have an absolute path or URI; got base_path()=models/m" in (
        result.stderr)


def test_client_retries_unavailable_with_backoff_then_names_the_server():
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(serving_client.ServingClientError) as info:
        serving_client.classify([b"x"], server=address, timeout=2, retries=2, backoff=0.2)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert address in str(info.value) and "UNAVAILABLE" in str(info.value)
    assert time.monotonic() - start >= 0.2 + 0.4
