"""A retry racing the retention purge (group commit, ledger.post_transfers) is answered as a replay or a fresh
execution, never 422 `idempotency-key-reused`: every answer is decided from one read of what the keys hold, taken
after the locks, so a purge committing between the batch's first look at its keys and that read changes nothing but
which of the two right answers it gets.

The interleaving is pinned, not hoped for: the batch's first look (which keys hold a stored answer) is one statement
that also derives the key lock id of each key without one, and that derivation reads `ledger.service_keys`. With
that table locked by the test, the batch stops right after its first look; the purge runs and commits; then the
batch goes on."""

from __future__ import annotations

import json
import threading

import ledgertest as lt

CLIENT = "race"


def item(key: str, path: str, body: dict, src, dst) -> dict:
    return {"key": key, "request": "POST " + path + "\n" + json.dumps(body, sort_keys=True), "from": src, "to": dst,
            "amount": body["amount"], "currency": body["currency"], "metadata": {}}


def post_transfers(db: str, items: list[dict]) -> list[tuple[str, int, dict]]:
    rows = lt.psql(db, f"SELECT outcome, status_code, response_body FROM ledger.post_transfers("
                       f"{lt.sql_literal(CLIENT)}, {lt.sql_literal(json.dumps(items))}) ORDER BY item")
    out = []
    for line in rows.splitlines():
        outcome, status, body = line.split("|", 2)
        out.append((outcome, int(status), json.loads(body) if body else {}))
    return out


def test_a_retry_whose_stored_failure_is_purged_mid_batch_executes_afresh(scratch_db):
    lt.migrate(scratch_db)
    lt.create_token(scratch_db, CLIENT)
    for account in ("payer", "payee"):
        lt.psql(scratch_db, f"SELECT status_code FROM ledger.put_account({lt.sql_literal(CLIENT)}, '{account}', 'USD', false)")
    failing = item("k-fail", "/v1/debits", {"account": "payer", "amount": 500, "currency": "USD"}, "payer", None)
    [(outcome, status, body)] = post_transfers(scratch_db, [failing])
    assert (outcome, status, body.get("code")) == ("executed", 422, "insufficient-funds")

    fresh = item("k-new", "/v1/credits", {"account": "payee", "amount": 100, "currency": "USD"}, None, "payee")
    holder = lt.PsqlSession(scratch_db)
    result: list = []
    try:
        holder.send("BEGIN")
        holder.query_line("LOCK TABLE ledger.service_keys IN ACCESS EXCLUSIVE MODE; SELECT 1")
        batch = threading.Thread(target=lambda: result.extend(post_transfers(scratch_db, [fresh, failing])))
        batch.start()
        lt.wait_for_lock_waiter(scratch_db)   # the batch has looked at its keys: k-fail held its stored 422
        purged = holder.query_line("SELECT ledger.purge_idempotency_keys(interval '0', 100)")
        assert purged == "1", purged
    finally:
        holder.send("COMMIT")
        holder.close()
    batch.join(30)
    assert not batch.is_alive()
    assert [(o, s) for o, s, _ in result] == [("executed", 201), ("executed", 422)], result
    assert result[1][2]["code"] == "insufficient-funds"
    # The fresh answer is stored again under the key, and a later retry replays it.
    [(outcome, status, _)] = post_transfers(scratch_db, [failing])
    assert (outcome, status) == ("replayed", 422)
    assert lt.verify(scratch_db).returncode == 0
