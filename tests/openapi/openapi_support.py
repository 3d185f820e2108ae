"""Helpers of the OpenAPI description tests: paths, PostgreSQL through psql, the `ledger` executable.

Reads `LEDGER_BIN` (the built `ledger` executable) and `LEDGER_TEST_PG` (an admin libpq conninfo without dbname).
Talks to PostgreSQL through `psql` and to the service over HTTP on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
OPENAPI_PATH = REPO / "Sources" / "LedgerHTTP" / "Resources" / "openapi.yaml"
LEDGER_BIN = os.environ.get("LEDGER_BIN", str(REPO / ".build" / "debug" / "ledger"))
PG_ADMIN = os.environ.get("LEDGER_TEST_PG", "")


def psql(dbname: str, sql: str) -> str:
    proc = subprocess.run(
        ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", f"{PG_ADMIN} dbname={dbname}", "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"psql failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ledger(args: list[str], database_url: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DATABASE_URL=database_url)
    return subprocess.run([LEDGER_BIN, *args], env=env, capture_output=True, text=True, timeout=120)


@dataclass
class Server:
    base: str
    process: subprocess.Popen
    log_path: str

    def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after 15 s); its log is kept only with LEDGER_TEST_KEEP_LOGS=1."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if os.environ.get("LEDGER_TEST_KEEP_LOGS"):
            print(f"\nledger serve log: {self.log_path}")
        else:
            Path(self.log_path).unlink(missing_ok=True)


def start_server(database_url: str, extra_args: list[str] | None = None, wait_healthy: bool = True) -> Server:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="ledger-openapi-serve-", suffix=".log", delete=False)
    env = dict(os.environ, DATABASE_URL=database_url, LOG_FORMAT="text", LOG_LEVEL="info")
    process = subprocess.Popen(
        [LEDGER_BIN, "serve", "--hostname", "127.0.0.1", "--port", str(port), "--no-migrate", *(extra_args or [])],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{port}", process, log.name)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"ledger serve exited with {process.returncode}; log: {Path(log.name).read_text()}")
        try:
            response = requests.get(server.base + "/health", timeout=5)
            if not wait_healthy or response.status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            text = Path(log.name).read_text()
            server.stop()
            raise RuntimeError(f"ledger serve did not become healthy; log: {text}")
        time.sleep(0.1)


def make_token(database_url: str, client: str) -> str:
    proc = ledger(["token", "create", client], database_url)
    assert proc.returncode == 0, f"ledger token create failed: {proc.stdout}\n{proc.stderr}"
    return proc.stdout.strip().splitlines()[-1].strip()
