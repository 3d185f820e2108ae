"""Fixtures of the OpenAPI description tests.

Needs `LEDGER_BIN` (the built `ledger` executable) and `LEDGER_TEST_PG` (an admin libpq conninfo without dbname, e.g.
`host=127.0.0.1 port=55500 user=postgres`). The session creates a fresh database, migrates it, creates two clients
with a token each, and starts one `ledger serve` on a free port of 127.0.0.1. Everything is torn down at the end.
"""

from __future__ import annotations

import os
import uuid

import pytest

from openapi_support import LEDGER_BIN, PG_ADMIN, ledger, make_token, psql, start_server


@pytest.fixture(scope="session")
def database():
    if not PG_ADMIN:
        pytest.exit("LEDGER_TEST_PG is not set (an admin libpq conninfo without dbname)", 2)
    if not os.path.exists(LEDGER_BIN):
        pytest.exit(f"LEDGER_BIN {LEDGER_BIN} does not exist; build with `swift build`", 2)
    name = f"ledger_openapi_{uuid.uuid4().hex[:12]}"
    psql("postgres", f"CREATE DATABASE {name}")
    url = f"{PG_ADMIN} dbname={name}"
    proc = ledger(["migrate"], url)
    assert proc.returncode == 0, f"ledger migrate failed: {proc.stdout}\n{proc.stderr}"
    yield url
    if not os.environ.get("LEDGER_TEST_KEEP_DB"):
        psql("postgres", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def tokens(database):
    return {"a": make_token(database, "openapi-a"), "b": make_token(database, "openapi-b")}


@pytest.fixture(scope="session")
def server(database):
    srv = start_server(database)
    yield srv
    srv.stop()
