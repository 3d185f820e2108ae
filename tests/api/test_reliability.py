"""Reliability under failure: graceful shutdown, database outages, and a connection lost around COMMIT.

These tests start `ledger serve` processes of their own, on databases of their own, so that what they break touches
no other test. The outage test stops the session's PostgreSQL server for a moment; it needs LEDGER_TEST_PGDATA (set by
scripts/test when it runs a private server) and is skipped otherwise.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests

import ledgertest as lt


@pytest.fixture
def own_db():
    name = lt.create_database("ledger_rel")
    lt.migrate(name)
    yield name
    lt.drop_database(name)


@pytest.fixture
def serve(own_db, log_dir):
    """Starts `ledger serve` processes on the test's own database; every one is stopped after the test."""
    started = []

    def start(extra_args=(), **kwargs):
        server = lt.LedgerServer(own_db, list(extra_args), log_dir=log_dir, **kwargs)
        started.append(server)
        server.wait_healthy()
        return server

    yield start
    for server in started:
        server.stop()


def client_api(dbname: str, server: lt.LedgerServer, client: str = "rel") -> lt.Api:
    return lt.Api(server.base, lt.create_token(dbname, client), client)


# --------------------------------------------------------------------------------------------------------------------
# Graceful shutdown


def test_sigterm_lets_an_in_flight_request_finish_then_exits_cleanly(own_db, serve):
    server = serve(["--key-wait-ms", "15000"])
    api = client_api(own_db, server)
    account = api.funded_account(1000)
    key = lt.uid("k-")
    result = {}

    def send():
        result["response"] = api.debit(account, 100, key=key)

    # Hold the key's advisory lock from psql, so the request waits inside the database.
    with lt.holding_key_lock(own_db, "rel", key):
        thread = threading.Thread(target=send)
        thread.start()
        lt.wait_for_lock_waiter(own_db)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.proc.poll() is None, "the server exited with a request still in flight"
    thread.join(timeout=20)
    response = result.get("response")
    assert response is not None, "the in-flight request got no answer"
    lt.assert_first(response, 201)
    assert server.stop(timeout=20) == 0, server.log_tail()
    assert lt.psql(own_db, f"SELECT balance FROM ledger.accounts WHERE id = {lt.sql_literal(account)}") == "900"


def test_sigterm_fails_readiness_but_keeps_serving_through_the_drain(own_db, serve):
    server = serve(["--drain-s", "3"])
    api = client_api(own_db, server)
    account = api.funded_account(1000)
    assert requests.get(server.base + "/health/ready", timeout=5).status_code == 200
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    deadline = started + 2
    while True:
        ready = requests.get(server.base + "/health/ready", timeout=5)
        if ready.status_code == 503 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    lt.assert_problem(ready, 503, "shutting-down")
    assert ready.headers["Retry-After"].isdigit()
    # Still draining: liveness holds and requests are served in full.
    live = requests.get(server.base + "/health/live", timeout=5)
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    lt.assert_first(api.debit(account, 100, key=lt.uid("k-")), 201)
    assert time.monotonic() - started < 3, "the checks above must run within the drain"
    assert server.proc.wait(timeout=20) == 0, server.log_tail()
    assert time.monotonic() - started >= 3, "the listener closed before the drain ended"


def test_in_flight_requests_are_cut_after_the_shutdown_grace(own_db, serve):
    server = serve(["--key-wait-ms", "30000", "--shutdown-grace-s", "1"])
    api = client_api(own_db, server)
    account = api.funded_account(1000)
    key = lt.uid("k-")
    with lt.holding_key_lock(own_db, "rel", key):
        thread = threading.Thread(target=lambda: _swallow(lambda: api.debit(account, 100, key=key)))
        thread.start()
        lt.wait_for_lock_waiter(own_db)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=15)
        # Grace 1 s, then the in-flight statement is cancelled on the server (not left to its 10 s statement
        # timeout): the process is gone well within 5 s.
        took = time.monotonic() - started
        assert took < 5, f"shutdown took {took:.1f} s with --shutdown-grace-s 1"
    thread.join(timeout=20)


def _swallow(fn):
    try:
        fn()
    except requests.RequestException:
        pass


# --------------------------------------------------------------------------------------------------------------------
# Database outage


PGDATA = os.environ.get("LEDGER_TEST_PGDATA")


def pg_control(action: str) -> None:
    port = re.search(r"port=(\d+)", lt.PG_ADMIN).group(1)
    script = f'. "{lt.REPO}/scripts/pg.sh"; '
    script += f'pg_stop "{PGDATA}" immediate' if action == "crash" else f'pg_start "{PGDATA}" {port}'
    subprocess.run(["bash", "-c", script], check=True)


@pytest.mark.skipif(not PGDATA, reason="needs a private PostgreSQL (LEDGER_TEST_PGDATA) to stop and start")
def test_database_outage_fails_fast_with_503_and_recovers_without_restart(own_db, serve):
    server = serve(["--connect-timeout-s", "2", "--pool-acquire-wait-ms", "2000"])
    api = client_api(own_db, server)
    account = api.funded_account(1000)
    key = lt.uid("k-")
    pg_control("crash")
    try:
        started = time.monotonic()
        r = api.debit(account, 10, key=key)
        elapsed = time.monotonic() - started
        lt.assert_problem(r, 503, "database-unavailable")
        assert r.headers.get("Retry-After", "").isdigit(), lt.describe(r)
        assert elapsed < 5, f"a request took {elapsed:.1f}s to fail while the database was down"
        health = requests.get(server.base + "/health", timeout=10)
        lt.assert_problem(health, 503, "database-unavailable")
    finally:
        pg_control("start")
    # The service recovers by itself: no restart.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and requests.get(server.base + "/health", timeout=10).status_code != 200:
        time.sleep(0.2)
    assert requests.get(server.base + "/health", timeout=10).status_code == 200
    r = api.debit(account, 10, key=key)
    lt.assert_first(r, 201)   # the 503 stored nothing: the same key executes now, once
    assert api.balance(account) == 990
    assert server.proc.poll() is None
    assert lt.verify(own_db).returncode == 0


# --------------------------------------------------------------------------------------------------------------------
# A connection lost around COMMIT: a TCP proxy between the service and PostgreSQL cuts one connection on purpose.


class CuttingProxy:
    """Forwards TCP to PostgreSQL. Armed with 'reply', it cuts the connection instead of forwarding the server's next
    answer (the statement ran and committed, the service never hears it); armed with 'request', it cuts before
    forwarding the service's next statement (it never ran)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.armed: str | None = None
        self.cuts = 0
        self.frozen = False
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def arm(self, mode: str) -> None:
        with self.lock:
            self.armed = mode

    def freeze(self, frozen: bool = True) -> None:
        """Frozen, nothing is forwarded either way and every socket stays open: what a frozen database host or a
        partition that drops packets looks like from the service (TCP itself still answers, so no keepalive or TCP
        timeout ends the wait)."""
        self.frozen = frozen

    def take(self, mode: str) -> bool:
        with self.lock:
            if self.armed == mode:
                self.armed = None
                self.cuts += 1
                return True
            return False

    def accept_loop(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self.pump, args=(client, server), daemon=True).start()

    def pump(self, client: socket.socket, server: socket.socket):
        sockets = [client, server]
        try:
            while True:
                if self.frozen:
                    time.sleep(0.05)
                    continue
                readable, _, _ = select.select(sockets, [], [], 0.1)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    direction = "request" if s is client else "reply"
                    if self.take(direction):
                        return
                    (server if s is client else client).sendall(data)
        except OSError:
            return
        finally:
            client.close()
            server.close()

    def close(self):
        self.closed = True
        self.listener.close()


def serve_behind_proxy(own_db, serve, flags):
    """A `ledger serve` whose every database connection goes through a CuttingProxy in front of PostgreSQL."""
    parts = dict(p.split("=", 1) for p in lt.PG_ADMIN.split())
    proxy = CuttingProxy(int(parts["port"]))
    url = f"host=127.0.0.1 port={proxy.port} user={parts.get('user', 'postgres')} dbname={own_db}"
    port = lt.free_port()
    server = serve(["--hostname", "127.0.0.1", "--port", str(port), "--database-url", url, *flags],
                   use_flags=False, port=port)
    return proxy, server


@pytest.mark.parametrize("cut, replayed", [("reply", True), ("request", False)])
def test_connection_lost_around_commit_answers_503_and_the_retry_executes_exactly_once(own_db, serve, cut, replayed):
    # One connection, so the armed cut hits the statement of the request below and nothing else: the background
    # work (purge, hold sweep, webhook deliveries) is made rare enough not to take it.
    proxy, server = serve_behind_proxy(own_db, serve, [
        "--pool-size", "1", "--purge-interval-s", "3600", "--hold-sweep-interval-ms", "3600000",
        "--webhook-poll-interval-ms", "60000"])
    try:
        api = client_api(own_db, server)
        account = api.funded_account(1000)   # also warms the token cache: the next statement is the transfer's
        key = lt.uid("k-")
        proxy.arm(cut)
        r = api.debit(account, 100, key=key)
        assert proxy.cuts == 1, "the proxy did not cut the connection"
        lt.assert_problem(r, 503, "database-unavailable")
        assert r.headers.get("Retry-After"), lt.describe(r)

        again = api.debit(account, 100, key=key)
        assert again.status_code == 201, lt.describe(again)
        assert again.headers.get("Idempotent-Replayed") == ("true" if replayed else "false"), lt.describe(again)
        count = lt.psql(own_db, f"SELECT count(*) FROM ledger.transfers WHERE idempotency_key = {lt.sql_literal(key)}")
        assert count == "1"
        assert api.balance(account) == 900
        third = api.debit(account, 100, key=key)
        lt.assert_replay_of(again, third)
        assert lt.verify(own_db).returncode == 0
    finally:
        proxy.close()


def test_a_database_that_stops_answering_is_503_within_the_call_timeout_and_recovers(own_db, serve):
    """The database host freezes (the relay keeps every socket open and forwards nothing): `statement_timeout`
    cannot fire and TCP notices nothing, so only the service's own deadline per call ends the wait. Writes, reads
    and /health all answer 503 in bounded time, and the service recovers when the database answers again."""
    proxy, server = serve_behind_proxy(own_db, serve, [
        "--pool-size", "2", "--statement-timeout-ms", "1000", "--database-call-timeout-ms", "2000",
        "--connect-timeout-s", "2", "--pool-acquire-wait-ms", "1000", "--auth-cache-ttl-ms", "600000"])
    try:
        api = client_api(own_db, server)
        account = api.funded_account(1000)   # also caches the token: the requests below reach the database
        key = lt.uid("k-")
        proxy.freeze()
        outcomes = {}

        def timed(name, call):
            started = time.monotonic()
            outcomes[name] = (call(), time.monotonic() - started)

        calls = [threading.Thread(target=timed, args=args) for args in [
            ("debit", lambda: api.clone().debit(account, 100, key=key)),
            ("read", lambda: api.clone().get_account(account)),
            ("health", lambda: requests.get(server.base + "/health", timeout=30)),
        ]]
        for thread in calls:
            thread.start()
        for thread in calls:
            thread.join(40)
        for name in ("debit", "read", "health"):
            response, elapsed = outcomes[name]
            lt.assert_problem(response, 503, "database-unavailable")
            # The call timeout (2 s), then at most a reconnect attempt (connect timeout 2 s) and the pool wait (1 s).
            assert elapsed < 8, f"{name} took {elapsed:.1f}s to fail while the database did not answer"
        assert outcomes["health"][1] < 4, "health has a short deadline of its own"
    finally:
        proxy.freeze(False)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and requests.get(server.base + "/health", timeout=10).status_code != 200:
            time.sleep(0.2)
        # Whatever the frozen connections had sent may reach the server now; the key makes the retry exactly once.
        again = api.debit(account, 100, key=key)
        assert again.status_code == 201, lt.describe(again)
        assert api.balance(account) == 900
        count = lt.psql(own_db, f"SELECT count(*) FROM ledger.transfers WHERE idempotency_key = {lt.sql_literal(key)}")
        assert count == "1"
        assert server.proc.poll() is None
        assert lt.verify(own_db).returncode == 0
    finally:
        proxy.close()
