"""Fixtures of the OpenAPI description tests.

Needs `LEDGER_BIN` (the built `ledger` executable) and `LEDGER_TEST_PG` (an admin libpq conninfo without dbname, e.g.
`host=127.0.0.1 port=55500 user=postgres`). The session creates a fresh database, migrates it, creates two clients
with a token each, and starts one `ledger serve` on a free port of 127.0.0.1. Everything is torn down at the end.
PostgreSQL, the `ledger` executable and HTTP go through the API tests' helpers (tests/api/ledgertest.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))
import ledgertest as lt  # noqa: E402


@pytest.fixture(scope="session")
def database():
    if not lt.PG_ADMIN:
        pytest.exit("LEDGER_TEST_PG is not set (an admin libpq conninfo without dbname)", 2)
    if not os.path.exists(lt.LEDGER_BIN):
        pytest.exit(f"LEDGER_BIN {lt.LEDGER_BIN} does not exist; build with `swift build`", 2)
    name = lt.create_database("ledger_openapi")
    lt.migrate(name)
    yield name
    if not os.environ.get("LEDGER_TEST_KEEP_DB"):
        lt.drop_database(name)


@pytest.fixture(scope="session")
def tokens(database):
    return {"a": lt.create_token(database, "openapi-a"), "b": lt.create_token(database, "openapi-b")}


@pytest.fixture(scope="session")
def server(database):
    srv = lt.LedgerServer.healthy(database, ["--no-migrate"], env={"LOG_FORMAT": "text", "LOG_LEVEL": "info"}, timeout=60)
    yield srv
    srv.stop()
