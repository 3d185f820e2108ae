"""One execution per Idempotency-Key, whatever shape the call to the keyed SQL function takes.

The service calls each request function as one statement outside a transaction block. The same function called
inside a transaction block, or behind another statement of the same query, must meet the same key lock. On a Citus
cluster that is not a given: Citus delegates a call to the worker that holds the client only outside a transaction
block unless the function is distributed with force_delegation (sql/citus/0001_distribute.sql), and not at all on a
connection where it once failed to plan a CTE; a call it does not delegate runs on the coordinator, whose advisory
locks are its own, and would execute a key that an execution on the worker holds (sql/citus/0002_key_lock_guard.sql
refuses that). lt.holding_key_lock takes the lock where the service's executions take it (on the client's worker).
"""

from __future__ import annotations

import subprocess

import pytest

import ledgertest as lt

SHAPES = {
    # The service's own shape (behind set_config in one pipeline, which is no transaction block).
    "lone": "{call}",
    # A transaction block around the call, each statement its own message.
    "transaction": None,
    # Two statements in one simple query: one implicit transaction block.
    "one-query": "SELECT set_config('statement_timeout', '30000', true); {call}",
}


def credit_call(client: str, key: str, account: str, currency: str) -> str:
    """ledger.post_transfer for a credit of 5, waiting 0 ms for another execution of the key."""
    return (
        "SELECT outcome || ' ' || status_code FROM ledger.post_transfer("
        f"{lt.sql_literal(client)}, {lt.sql_literal(key)}, {lt.sql_literal('POST /v1/credits')}, NULL, "
        f"{lt.sql_literal(account)}, 5, {lt.sql_literal(currency)}, '{{}}'::jsonb, NULL, 0)"
    )


def run_shape(main_db: str, shape: str, call: str) -> str:
    if SHAPES[shape] is not None:
        lines = lt.psql(main_db, SHAPES[shape].format(call=call)).splitlines()
        return lines[-1]
    session = lt.PsqlSession(main_db)
    try:
        session.send("BEGIN")
        answer = session.query_line(call)
        session.send("COMMIT")
        session.query_line("SELECT 1")
        return answer
    finally:
        session.close()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_key_held_elsewhere_is_in_progress_in_every_call_shape(api_a, main_db, shape):
    currency = "XKS"
    account = api_a.new_account(currency)
    key = lt.uid("shape-")
    call = credit_call(api_a.client, key, account, currency)
    with lt.holding_key_lock(main_db, api_a.client, key):
        assert run_shape(main_db, shape, call) == "in_progress 409"
    assert api_a.balance(account) == 0
    assert run_shape(main_db, shape, call) == "executed 201"
    assert run_shape(main_db, shape, call) == "replayed 201"
    assert api_a.balance(account) == 5


# A statement Citus refuses while it plans one of its CTEs (a FOR UPDATE over the shards of every client). Citus 13.2
# leaves its recursive-planning depth raised in the backend after it, and from then on delegates no function call
# made on that connection: as a pooled connection of the service would, after the webhook claims of 0009 failed.
REFUSED_IN_PLANNING = (
    "WITH due AS (SELECT a.client_id, a.id FROM ledger.accounts a ORDER BY a.id LIMIT 1 FOR UPDATE SKIP LOCKED) "
    "UPDATE ledger.accounts a SET version = a.version FROM due WHERE a.client_id = due.client_id AND a.id = due.id"
)


@pytest.mark.skipif(not lt.CITUS_WORKERS, reason="a Citus cluster only: single-node PostgreSQL delegates nothing")
def test_a_connection_citus_stopped_delegating_on_never_executes_a_held_key(api_a, main_db):
    currency = "XKP"
    account = api_a.new_account(currency)
    key = lt.uid("stuck-")
    call = credit_call(api_a.client, key, account, currency)
    with lt.holding_key_lock(main_db, api_a.client, key):
        proc = subprocess.run(
            ["psql", "-X", "-A", "-t", "-q", "-d", lt.conninfo(main_db), "-c", REFUSED_IN_PLANNING, "-c", call],
            capture_output=True, text=True, timeout=60)
        assert "could not run distributed query" in proc.stderr, proc.stderr
        # Delegated after all (a Citus without that fault), it meets the lock; not delegated, it ends its backend.
        assert proc.stdout.strip() in ("in_progress 409", ""), proc.stdout + proc.stderr
        if proc.stdout.strip() == "":
            assert "terminating connection" in proc.stderr, proc.stderr
    assert api_a.balance(account) == 0
    assert run_shape(main_db, "lone", call) == "executed 201"
    assert api_a.balance(account) == 5
