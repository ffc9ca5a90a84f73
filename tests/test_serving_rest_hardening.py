"""The REST front end under misbehaving clients (issue 8, item 4), in process on 127.0.0.1:
read timeouts, the body cap, bad / missing Content-Length, truncated bodies, deep JSON, other
HTTP methods, and `shutdown()` + `server_close()` ending every connection promptly.

The HTTP layer runs over a small stand-in API so that each test takes well under a second or
two; the JSON-to-tensor path is covered by test_serving_fuzz.py and the real server by
test_serving_bounds.py.
"""

import json
import socket
import threading
import time

import pytest
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from serving._rest import DEFAULT_MAX_BODY_BYTES, RestApi, make_http_server

READ_TIMEOUT_S = 1.0
MAX_BODY = 1000


class _EchoApi:
    """Answers 200 with what it got; `/slow` blocks until `release` is set."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()

    def handle(self, method, path, body):
        if path == "/slow":
            self.started.set()
            self.release.wait(10)
        return 200, {"method": method, "path": path, "body_len": len(body)}


@pytest.fixture
def http():
    api = _EchoApi()
    server = make_http_server(api, "127.0.0.1", 0, read_timeout_s=READ_TIMEOUT_S,
                              max_body_bytes=MAX_BODY, close_timeout_s=2.0)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    server.api = api
    try:
        yield server
    finally:
        api.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def _connect(server):
    sock = socket.create_connection(server.server_address[:2], timeout=10)
    return sock


def _read_response(sock, timeout=10):
    """Returns (status, headers dict, body bytes) of one response, or None on EOF."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in
               (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def _exchange(server, raw, shut_write=False):
    with _connect(server) as sock:
        sock.sendall(raw)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        return _read_response(sock)


def _json_error(response, status):
    got_status, headers, body = response
    assert got_status == status, (got_status, body)
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert isinstance(error, str) and error
    return error


def _closed(sock, timeout=5):
    """True if the server closes `sock` (EOF or reset) within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_keep_alive_requests_work(http):
    with _connect(http) as sock:
        for i in range(3):
            body = json.dumps({"i": i}).encode()
            sock.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            status, headers, answer = _read_response(sock)
            assert status == 200 and json.loads(answer)["body_len"] == len(body)
            assert headers.get("connection") != "close"


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1.5", b"0x10", b"10, 20", b""])
def test_bad_content_length_is_400_json(http, value):
    response = _exchange(http, b"POST /v1/models/m:predict HTTP/1.1\r\nContent-Length: " +
                         value + b"\r\n\r\n{}")
    assert "Content-Length" in _json_error(response, 400)
    assert response[1]["connection"] == "close"


def test_conflicting_content_lengths_and_chunked_with_length_are_400(http):
    response = _exchange(http, b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n"
                               b"Content-Length: 3\r\n\r\n{}")
    _json_error(response, 400)
    response = _exchange(http, b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n{}")
    assert "Transfer-Encoding" in _json_error(response, 400)


def test_post_without_content_length_is_411(http):
    assert "Content-Length" in _json_error(
        _exchange(http, b"POST /v1/models/m:predict HTTP/1.1\r\n\r\n"), 411)
    _json_error(_exchange(http, b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"2\r\n{}\r\n0\r\n\r\n"), 411)


def test_get_without_content_length_is_fine(http):
    status, _, body = _exchange(http, b"GET /v1/models/m HTTP/1.1\r\n\r\n")
    assert status == 200 and json.loads(body)["method"] == "GET"


def test_body_over_the_limit_is_413_before_it_is_read(http):
    started = time.monotonic()
    response = _exchange(http, b"POST /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (
        MAX_BODY + 1))
    error = _json_error(response, 413)
    assert str(MAX_BODY) in error and time.monotonic() - started < READ_TIMEOUT_S
    _json_error(_exchange(http, b"POST /x HTTP/1.1\r\nContent-Length: 1" + b"0" * 40 +
                          b"\r\n\r\n"), 413)
    # With Expect: 100-continue the refusal comes instead of the 100.
    response = _exchange(http, b"POST /x HTTP/1.1\r\nContent-Length: 5000\r\n"
                               b"Expect: 100-continue\r\n\r\n")
    _json_error(response, 413)
    # Exactly the limit is accepted.
    status, _, body = _exchange(http, b"POST /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (
        MAX_BODY) + b" " * MAX_BODY)
    assert status == 200 and json.loads(body)["body_len"] == MAX_BODY


def test_default_body_limit_is_32_mib():
    assert DEFAULT_MAX_BODY_BYTES == 32 * 1024 * 1024


def test_truncated_body_is_400_when_the_client_stops_sending(http):
    response = _exchange(http, b"POST /x HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"a\"",
                         shut_write=True)
    assert "truncated" in _json_error(response, 400)


def test_half_sent_body_times_out_with_408(http):
    started = time.monotonic()
    with _connect(http) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"a\"")
        response = _read_response(sock)
        elapsed = time.monotonic() - started
        assert _closed(sock)
    assert "not received" in _json_error(response, 408)
    assert READ_TIMEOUT_S * 0.9 <= elapsed < READ_TIMEOUT_S + 2


def test_idle_connection_is_closed_after_the_read_timeout(http):
    with _connect(http) as sock:
        started = time.monotonic()
        assert _closed(sock, timeout=READ_TIMEOUT_S + 3)
        assert time.monotonic() - started < READ_TIMEOUT_S + 2


def test_trickling_headers_cannot_hold_a_thread(http):
    """One byte every 0.2 s would reset a plain socket timeout forever; the per-request read
    deadline still ends it."""
    with _connect(http) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\n")
        started = time.monotonic()
        closed = False
        for _ in range(int(READ_TIMEOUT_S / 0.2) * 3):
            try:
                sock.sendall(b"X")
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            sock.settimeout(0.01)
            try:
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed = True
                break
        assert closed and time.monotonic() - started < READ_TIMEOUT_S + 2


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"])
def test_other_methods_are_405_json(http, method):
    response = _exchange(http, f"{method} /v1/models/m:predict HTTP/1.1\r\n"
                               "Content-Length: 0\r\n\r\n".encode())
    assert _json_error(response, 405) == f"Malformed request: {method} /v1/models/m:predict"
    assert response[1]["allow"] == "GET, POST"


def test_head_is_405_without_a_body(http):
    with _connect(http) as sock:
        sock.sendall(b"HEAD /v1/models/m HTTP/1.1\r\n\r\n")
        sock.settimeout(5)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405") and b"application/json" in head and body == b""


def test_http_layer_errors_are_json(http):
    _json_error(_exchange(http, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"), 414)
    headers = b"".join(b"X-%d: y\r\n" % i for i in range(150))
    _json_error(_exchange(http, b"GET / HTTP/1.1\r\n" + headers + b"\r\n"), 431)
    _json_error(_exchange(http, b"GET / HTTP/1.1 extra\r\n\r\n"), 400)
    _json_error(_exchange(http, b"GET / HTTP/9.9\r\n\r\n"), 505)


class _OneModel:
    """A manager whose every model has a `serving_default` taking float `x`."""

    class servable:
        signature = meta_graph_pb2.SignatureDef()
        signature.inputs["x"].dtype = types_pb2.DT_FLOAT
        signature_defs = {"serving_default": signature}

    def resolve(self, spec):
        return self.servable


def test_deep_json_is_400_not_500():
    api = RestApi(manager=_OneModel(), runner=None)
    for body in ("[" * 100000, '{"inputs": ' + "[" * 5000 + "]" * 5000 + "}",
                 '{"instances": ' + "[" * 70 + "1" + "]" * 70 + "}"):
        status, payload = api.handle("POST", "/v1/models/m:predict", body)
        assert status == 400 and payload["error"], payload
    status, payload = api.handle("POST", "/v1/models/m:predict", "[" * 100000)
    assert "nested too deeply" in payload["error"]


def test_max_concurrent_requests_queues_the_rest():
    api = _EchoApi()
    server = make_http_server(api, "127.0.0.1", 0, read_timeout_s=5, max_concurrent_requests=1)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        with _connect(server) as slow, _connect(server) as fast:
            slow.sendall(b"POST /slow HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            assert api.started.wait(5)
            fast.sendall(b"POST /fast HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            fast.settimeout(0.5)
            with pytest.raises(TimeoutError):  # waits for the one running request
                fast.recv(1)
            api.release.set()
            assert _read_response(slow)[0] == 200 and _read_response(fast)[0] == 200
    finally:
        api.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_burst_of_connections_is_queued_not_dropped():
    """Before the accept loop runs, the kernel completes up to the listen backlog's
    connections and drops the SYNs beyond it (the client retries after 1 s, then 3 s).
    With socketserver's backlog of 5, the 7th of 64 connections would not complete."""
    server = make_http_server(_EchoApi(), "127.0.0.1", 0)  # not serving: nothing accepts
    socks = []
    try:
        for i in range(64):
            sock = socket.socket()
            sock.settimeout(0.8)  # under the first SYN retransmission (1 s)
            socks.append(sock)
            try:
                sock.connect(server.server_address[:2])
            except TimeoutError:
                pytest.fail(f"connection {i + 1} of 64 was not queued by the listen backlog")
    finally:
        for sock in socks:
            sock.close()
        server.server_close()


def test_handler_threads_are_daemons(http):
    with _connect(http) as sock:
        sock.sendall(b"POST /slow HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert http.api.started.wait(5)
        handlers = [t for t in threading.enumerate() if t.name.startswith("Thread-") and
                    "process_request_thread" in repr(getattr(t, "_target", ""))]
        assert handlers and all(t.daemon for t in handlers)
        http.api.release.set()
        assert _read_response(sock)[0] == 200


def test_server_close_ends_idle_half_read_and_busy_connections_promptly(http):
    idle, half_read, busy = _connect(http), _connect(http), _connect(http)
    try:
        half_read.sendall(b"POST /x HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        busy.sendall(b"POST /slow HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert http.api.started.wait(5)
        deadline = time.monotonic() + 5
        while http.open_connections() < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert http.open_connections() == 3
        threading.Timer(0.3, http.api.release.set).start()  # The busy one finishes soon.
        started = time.monotonic()
        http.shutdown()
        http.server_close()
        elapsed = time.monotonic() - started
        assert elapsed < 2.0  # close_timeout_s, not READ_TIMEOUT_S x connections
        assert http.open_connections() == 0
        assert _closed(idle, 2) and _closed(half_read, 2)
        status, _, body = _read_response(busy)  # answered, then closed
        assert status == 200 and json.loads(body)["path"] == "/slow"
        assert _closed(busy, 2)
    finally:
        for sock in (idle, half_read, busy):
            sock.close()


def test_server_close_gives_up_on_a_stuck_request_after_close_timeout():
    api = _EchoApi()
    server = make_http_server(api, "127.0.0.1", 0, read_timeout_s=READ_TIMEOUT_S,
                              close_timeout_s=0.5)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        with _connect(server) as sock:
            sock.sendall(b"POST /slow HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            assert api.started.wait(5)
            started = time.monotonic()
            server.shutdown()
            server.server_close()
            assert time.monotonic() - started < 2.0
            assert _closed(sock, 2)  # shut down although its handler still runs
    finally:
        api.release.set()
        thread.join(5)
