"""Fixtures of the HTTP API tests.

Needs `LEDGER_TEST_PG` (an admin libpq conninfo without dbname, e.g. `host=127.0.0.1 port=54321 user=postgres`) and
`LEDGER_BIN` (the built `ledger` executable); `scripts/test` sets both. The session gets a fresh database, migrates it,
starts one `ledger serve`, and creates two clients with a token each. Tests use unique account ids and keys so that
they never collide on the shared server. At the end `ledger verify` must exit 0.
"""

from __future__ import annotations

import os
import tempfile

import pytest

import ledgertest as lt


@pytest.fixture(scope="session")
def log_dir():
    return tempfile.mkdtemp(prefix="ledger-api-test-")


@pytest.fixture(scope="session")
def main_db():
    if not lt.PG_ADMIN:
        pytest.exit("LEDGER_TEST_PG is not set (an admin libpq conninfo without dbname); run scripts/test", 2)
    if not os.path.exists(lt.LEDGER_BIN):
        pytest.exit(f"LEDGER_BIN {lt.LEDGER_BIN} does not exist; build with `swift build`", 2)
    name = lt.create_database("ledger_api_main")
    lt.migrate(name)
    yield name
    # The whole suite must leave the ledger's invariants intact.
    proc = lt.verify(name)
    drop = os.environ.get("LEDGER_TEST_KEEP_DB") is None
    assert proc.returncode == 0, (
        f"ledger verify after the whole suite exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    if drop:
        lt.drop_database(name)


@pytest.fixture(scope="session")
def server(main_db, log_dir):
    srv = lt.LedgerServer.healthy(main_db, log_dir=log_dir)
    yield srv
    srv.stop()
    print(f"\nledger serve log: {srv.log_path}")


@pytest.fixture(scope="session")
def clients(main_db):
    """Two clients, each with one token: {'a': (name, token), 'b': (name, token)}."""
    a = "client-a." + lt.uid()
    b = "client-b." + lt.uid()
    return {"a": (a, lt.create_token(main_db, a)), "b": (b, lt.create_token(main_db, b))}


@pytest.fixture
def api_a(server, clients) -> lt.Api:
    name, token = clients["a"]
    return lt.Api(server.base, token, name)


@pytest.fixture
def api_b(server, clients) -> lt.Api:
    name, token = clients["b"]
    return lt.Api(server.base, token, name)


@pytest.fixture
def anon(server) -> lt.Api:
    return lt.Api(server.base, None)


@pytest.fixture
def sql(main_db):
    """Runs SQL against the session's database and returns psql's output."""

    def run(statement: str) -> str:
        return lt.psql(main_db, statement)

    return run


@pytest.fixture
def start_server(main_db, log_dir):
    """Starts more `ledger serve` processes on the session database; all are stopped after the test."""
    started = []

    def start(extra_args=(), env=None, use_flags=True, port=None, dbname=None, wait=True):
        srv = lt.LedgerServer(dbname or main_db, extra_args, env, use_flags, port, log_dir)
        started.append(srv)
        if wait:
            srv.wait_healthy(30)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def second_server(main_db, server, log_dir):
    """A second `ledger serve` on the same database (another replica)."""
    srv = lt.LedgerServer.healthy(main_db, log_dir=log_dir)
    yield srv
    srv.stop()


@pytest.fixture
def scratch_db():
    """A fresh, empty database of its own (not migrated), dropped afterwards."""
    if not lt.PG_ADMIN:
        pytest.exit("LEDGER_TEST_PG is not set", 2)
    name = lt.create_database("ledger_api_scratch")
    yield name
    lt.drop_database(name)
