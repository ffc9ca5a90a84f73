"""Bounded shutdown and loopback binding of the embedded server (issue 8, items 3 and 4).

Real `serving.server` subprocesses on 127.0.0.1 serving half_plus_two.
"""

import errno
import socket
import time

import pytest
from _serving_fixtures import ServerProcess, write_half_plus_two

from serving.server import build_parser

GRACE_S = 3
EXIT_MARGIN_S = 5  # Documented: SIGTERM exits 0 within --shutdown_grace_seconds + a few s.


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("shutdown")
    write_half_plus_two(base / "hp" / "1")
    return base


def _server(base, *flags, bind=True):
    process = ServerProcess(base, "--model_name=hp", f"--model_base_path={base / 'hp'}",
                            *flags, rest=True)
    if not bind:
        process.flags.remove("--bind_address=127.0.0.1")
    return process


def _wait_for_log(process, *texts, timeout=20):
    """The server log once it holds every one of `texts` (REST opens just after gRPC, which
    is what `start()` waits for)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = process.log_path.read_text(errors="replace")
        if all(text in log for text in texts):
            return log
        time.sleep(0.1)
    raise AssertionError(f"{texts} not logged:\n{process.log()}")


def _http_get_keep_alive(port):
    """A connection that has had one GET answered and is now idle (HTTP/1.1 keep-alive)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(b"GET /v1/models/hp HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int([line.split(b":")[1] for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length")][0])
    while len(body) < length:
        body += conn.recv(4096)
    assert head.startswith(b"HTTP/1.1 200") and b"AVAILABLE" in body
    return conn


def test_defaults_bind_loopback_and_grace_is_ten_seconds():
    args = build_parser().parse_args([])
    assert (args.bind_address, args.shutdown_grace_seconds) == ("127.0.0.1", 10.0)


def test_wildcard_bind_is_explicit_logged_and_warned_about(base):
    process = _server(base, bind=False)
    process.flags.append("--bind_address=0.0.0.0")
    try:
        process.start()
        _wait_for_log(process, f"Running gRPC ModelServer at 0.0.0.0:{process.port} ...",
                      f"Exporting HTTP/REST API at:0.0.0.0:{process.rest_port} ...",
                      "may call ModelService/HandleReloadConfigRequest")
        with socket.socket() as probe, pytest.raises(OSError) as info:
            probe.bind(("127.0.0.2", process.port))
        assert info.value.errno == errno.EADDRINUSE
        assert process.terminate() == 0
    finally:
        process.kill()


def test_sigterm_with_idle_and_slow_rest_connections_exits_0_within_grace(base):
    """Default bind (no --bind_address): loopback only, and logged as such. Then SIGTERM while
    one REST connection idles in keep-alive and another has sent half a body."""
    process = _server(base, f"--shutdown_grace_seconds={GRACE_S}", bind=False)
    try:
        process.start()
        log = _wait_for_log(process, f"Running gRPC ModelServer at 127.0.0.1:{process.port} ...",
                            f"Exporting HTTP/REST API at:127.0.0.1:{process.rest_port} ...")
        assert "localhost" not in log and "HandleReloadConfigRequest" not in log
        # Nothing listens on the wildcard address: the same ports on another loopback address
        # are free (binding them fails with EADDRINUSE when the server holds 0.0.0.0).
        for port in (process.port, process.rest_port):
            with socket.socket() as probe:
                probe.bind(("127.0.0.2", port))
        idle = _http_get_keep_alive(process.rest_port)
        slow = socket.create_connection(("127.0.0.1", process.rest_port), timeout=10)
        slow.sendall(b"POST /v1/models/hp:predict HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"instances\": [")  # ...never finished
        time.sleep(0.5)  # Both connections are now held by handler threads.
        start = time.monotonic()
        code = process.terminate(timeout=GRACE_S + EXIT_MARGIN_S + 30)
        elapsed = time.monotonic() - start
        print(f"SIGTERM -> exit {code} in {elapsed:.2f}s (grace {GRACE_S}s)")
        assert code == 0, process.log()
        assert elapsed < GRACE_S + EXIT_MARGIN_S, f"exit took {elapsed:.2f}s"
        # The idle connection was closed by the server, not left to time out.
        idle.settimeout(5)
        assert idle.recv(100) == b""
        assert "Server stopped" in process.log()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", process.rest_port), timeout=2).close()
        idle.close()
        slow.close()
    finally:
        process.kill()
