"""Connection limits: a socket that sends nothing for --idle-timeout-s is closed (mid-headers, mid-body, or idle
between requests), and at most --connections-max are served at once, so that half-sent requests cannot use up the
process's file descriptors and lock every client out."""

from __future__ import annotations

import socket
import time

import requests

import ledgertest as lt


def open_socket(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        s.sendall(data)
    return s


def closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed the socket (reads EOF or a reset), or None if it stayed open."""
    started = time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - started < seconds:
        try:
            if s.recv(4096) == b"":
                return time.monotonic() - started
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def test_half_sent_and_idle_connections_are_closed(start_server):
    srv = start_server(["--idle-timeout-s", "2"])
    port = srv.port
    mid_headers = open_socket(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    mid_body = open_socket(port, b"POST /v1/credits HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\"")
    keep_alive = open_socket(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in keep_alive.recv(4096)
    for name, s in (("mid-headers", mid_headers), ("mid-body", mid_body), ("idle keep-alive", keep_alive)):
        took = closed_within(s, 8)
        assert took is not None, f"a {name} connection was still open after 8 s with --idle-timeout-s 2"
        s.close()
    # The server still answers.
    assert requests.get(srv.base + "/health", timeout=5).status_code == 200


def test_connections_beyond_the_cap_wait_until_one_closes(start_server):
    srv = start_server(["--connections-max", "3", "--idle-timeout-s", "60"])
    # One at a time, with time between them: the server accepts in bursts (several connections per read of its
    # listening socket), so held connections and the fourth arriving together could all be accepted in one burst.
    held = []
    for _ in range(3):
        held.append(open_socket(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "))
        time.sleep(0.3)
    time.sleep(0.5)
    try:
        requests.get(srv.base + "/health", timeout=1.5)
        raise AssertionError("a fourth connection was served while 3 were open and the cap is 3")
    except requests.exceptions.RequestException:
        pass
    held.pop().close()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert requests.get(srv.base + "/health", timeout=2).status_code == 200
            break
        except requests.exceptions.RequestException:
            assert time.monotonic() < deadline, "no connection was served after one of the 3 closed"
    for s in held:
        s.close()


def raw_exchange(port: int, data: bytes, wait: float = 3.0) -> tuple[bytes, bool]:
    """Sends `data`, reads until the server closes or goes quiet for `wait` s: (bytes read, closed by the server)."""
    s = open_socket(port, data)
    s.settimeout(wait)
    out = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return out, True
            out += chunk
    except socket.timeout:
        return out, False
    finally:
        s.close()


def status_and_code(answer: bytes) -> tuple[int, str | None]:
    head, _, rest = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, __import__("json").loads(rest.decode()).get("code")
    except ValueError:
        return status, None


def test_malformed_chunked_framing_is_a_client_error(server, api_a):
    """Not 500 internal: bad chunk sizes are 400, on authenticated routes and on /health alike."""
    token = api_a.token
    for path, auth in (("/health", b""), ("/v1/credits", f"Authorization: Bearer {token}\r\n".encode())):
        answer, _ = raw_exchange(server.port, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + auth
                                 + b"Idempotency-Key: k-" + lt.uid().encode()
                                 + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n")
        assert answer, f"no answer to malformed chunked framing on {path}"
        status, code = status_and_code(answer)
        assert status == 400 and code == "malformed-request", answer[:300]


def test_an_unknown_transfer_coding_is_501(server, api_a):
    answer, _ = raw_exchange(server.port, b"POST /v1/credits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                             + api_a.token.encode() + b"\r\nIdempotency-Key: k-" + lt.uid().encode()
                             + b"\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
    status, code = status_and_code(answer)
    assert status == 501 and code == "transfer-coding-not-implemented", answer[:300]


def test_http10_without_keep_alive_is_closed_after_its_answer(server):
    answer, closed = raw_exchange(server.port, b"GET /health HTTP/1.0\r\n\r\n")
    assert b" 200 " in answer.split(b"\r\n", 1)[0] and closed, (answer[:200], closed)
    answer, closed = raw_exchange(server.port, b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", wait=1.0)
    assert b" 200 " in answer.split(b"\r\n", 1)[0] and not closed, "an HTTP/1.0 keep-alive connection stays open"
    answer, closed = raw_exchange(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", wait=1.0)
    assert b" 200 " in answer.split(b"\r\n", 1)[0] and not closed, "an HTTP/1.1 connection stays open"


def test_connect_is_answered_and_the_connection_closed(server):
    started = time.monotonic()
    answer, closed = raw_exchange(server.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 4") and closed, (answer[:200], closed)
    assert time.monotonic() - started < 2, "a CONNECT left the client waiting"
