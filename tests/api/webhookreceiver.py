"""A real HTTP receiver of webhooks for the tests: records every delivery, checks nothing, answers as told."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def signature(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    """Standard Webhooks v1: base64(HMAC-SHA256(base64decode(secret after whsec_), "id.timestamp.body"))."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class Receiver:
    """Listens on 127.0.0.1; `answers` is a function (path, attempt number of this webhook-id) -> (status, headers)."""

    def __init__(self):
        self.deliveries: list[dict] = []
        self.lock = threading.Lock()
        self.answers = lambda path, attempt: (200, {})
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - the stdlib's name
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                with receiver.lock:
                    attempt = 1 + sum(1 for d in receiver.deliveries
                                      if d["id"] == self.headers.get("webhook-id") and d["path"] == self.path)
                    status, headers = receiver.answers(self.path, attempt)
                    receiver.deliveries.append({
                        "path": self.path, "id": self.headers.get("webhook-id"),
                        "timestamp": self.headers.get("webhook-timestamp"),
                        "signature": self.headers.get("webhook-signature"),
                        "content_type": self.headers.get("content-type"), "body": body, "status": status,
                        "at": time.monotonic(),
                    })
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[dict]:
        with self.lock:
            return [d for d in self.deliveries if d["path"] == path]

    def wait_for(self, path: str, predicate, timeout: float = 20) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.at(path)
            if predicate(got):
                return got
            time.sleep(0.05)
        raise AssertionError(f"receiver: condition not met within {timeout}s; got {len(self.at(path))} deliveries")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def events_of(deliveries: list[dict]) -> list[dict]:
    return [json.loads(d["body"]) for d in deliveries]
