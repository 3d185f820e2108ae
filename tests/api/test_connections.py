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
    held = [open_socket(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ") for _ in range(3)]
    time.sleep(0.3)
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
