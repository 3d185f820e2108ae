"""Metrics, request ids, logs that hold no secrets, one client never blocking another, and the psql views."""

from __future__ import annotations

import re
import threading

import requests

import ledgertest as lt


def metric(base: str, name: str) -> float:
    text = requests.get(base + "/metrics", timeout=lt.TIMEOUT).text
    values = [float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values)


def test_metrics_count_replays_reuse_and_insufficient_funds(api_a, server):
    r = requests.get(server.base + "/metrics", timeout=lt.TIMEOUT)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain"), lt.describe(r)
    before = {name: metric(server.base, name) for name in (
        "ledger_idempotent_replays_total", "ledger_idempotency_key_reused_total", "ledger_insufficient_funds_total")}
    account = api_a.funded_account(100)
    key = lt.uid("k-")
    api_a.debit(account, 10, key=key)
    lt.assert_replay_of(api_a.debit(account, 10, key=key), api_a.debit(account, 10, key=key))
    lt.assert_problem(api_a.debit(account, 11, key=key), 422, "idempotency-key-reused")
    lt.assert_problem(api_a.debit(account, 1000, key=lt.uid("k-")), 422, "insufficient-funds")
    assert metric(server.base, "ledger_idempotent_replays_total") >= before["ledger_idempotent_replays_total"] + 2
    assert metric(server.base, "ledger_idempotency_key_reused_total") >= before["ledger_idempotency_key_reused_total"] + 1
    assert metric(server.base, "ledger_insufficient_funds_total") >= before["ledger_insufficient_funds_total"] + 1
    text = requests.get(server.base + "/metrics", timeout=lt.TIMEOUT).text
    assert 'ledger_http_requests_total{route="/v1/debits",method="POST",status="201"}' in text.replace(", ", ",")
    assert account not in text and key not in text, "metrics must never carry ids or keys"


FAMILIES = [
    "ledger_http_requests_total", "ledger_http_request_duration_seconds", "ledger_idempotency_outcomes_total",
    "ledger_idempotent_replays_total", "ledger_idempotency_key_reused_total", "ledger_idempotency_key_in_progress_total",
    "ledger_transfer_problems_total", "ledger_insufficient_funds_total", "ledger_db_errors_total", "ledger_holds_total",
    "ledger_reversals_total", "ledger_wait_preferences_total", "ledger_idempotency_key_lookups_total",
    "ledger_precondition_failed_total", "ledger_batch_items_total", "ledger_db_pool_connections",
    "ledger_db_pool_waiting",
]


def test_every_metric_family_is_there_from_the_start_with_help(main_db, log_dir):
    srv = lt.LedgerServer.healthy(main_db, ["--no-migrate"], log_dir=log_dir)
    try:
        text = requests.get(srv.base + "/metrics", timeout=lt.TIMEOUT).text
    finally:
        srv.stop()
    types = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    helped = set(re.findall(r"^# HELP (\S+) \S", text, re.M))
    assert set(FAMILIES) <= types, sorted(set(FAMILIES) - types)
    assert types <= helped, f"families without # HELP: {sorted(types - helped)}"
    assert 'ledger_batch_items_total{outcome="failed"} 0' in text


def test_failed_batch_items_are_counted(api_a, server):
    before = {o: metric(server.base, f'ledger_batch_items_total{{outcome="{o}"}}') for o in ("succeeded", "failed", "rolled_back")}
    rich, poor = api_a.funded_account(100), api_a.new_account()
    items = [{"from": rich, "to": poor, "amount": 10, "currency": "USD"},
             {"from": poor, "to": rich, "amount": 1000, "currency": "USD"},
             {"from": rich, "to": poor, "amount": 5, "currency": "USD"}]
    lt.assert_json(api_a.post("/v1/transfers/batch", {"atomic": False, "transfers": items}, key=lt.uid("b-")), 201)
    r = api_a.post("/v1/transfers/batch", {"atomic": True, "transfers": items}, key=lt.uid("b-"))
    assert r.status_code == 422, lt.describe(r)
    after = {o: metric(server.base, f'ledger_batch_items_total{{outcome="{o}"}}') for o in before}
    assert after["succeeded"] - before["succeeded"] >= 2
    assert after["failed"] - before["failed"] >= 2
    assert after["rolled_back"] - before["rolled_back"] >= 2


def test_request_id_is_echoed_or_generated(api_a):
    r = api_a.request("GET", "/v1/accounts/nobody", headers={"X-Request-Id": "trace-42"})
    assert r.headers.get("X-Request-Id") == "trace-42"
    generated = api_a.request("GET", "/v1/accounts/nobody").headers.get("X-Request-Id")
    assert generated and generated != "trace-42"


def test_logs_hold_no_tokens_bodies_or_keys(server, api_a):
    secret = lt.uid("secret-metadata-")
    key = lt.uid("secret-key-")
    account = api_a.funded_account(100)
    api_a.debit(account, 1, key=key, metadata={"note": secret})
    api_a.request("GET", "/v1/accounts/x", headers={"Authorization": "Bearer not-a-real-token-123"})
    log = server.log_path.read_text(errors="replace")
    assert "request" in log and "http.route=/v1/debits" in log, "the access log line is missing"
    for needle in (api_a.token, "not-a-real-token-123", secret, key):
        assert needle not in log, f"the log holds {needle!r}"


def test_one_client_never_blocks_another_on_the_same_key(main_db, api_a, api_b):
    key = lt.uid("shared-")
    a_account = api_a.funded_account(100)
    b_account = api_b.funded_account(100)
    # Client A's execution of the key is "in progress" (its advisory lock is held)...
    with lt.holding_key_lock(main_db, api_a.client, key):
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("a", api_a.debit(a_account, 1, key=key)))
        t.start()
        lt.wait_for_lock_waiter(main_db)
        # ...and client B's same key executes at once.
        r = api_b.debit(b_account, 1, key=key)
        lt.assert_first(r, 201)
        assert "a" not in result, "client A's request should still be waiting"
    t.join(timeout=30)
    lt.assert_first(result["a"], 201)


def test_psql_views_explain_the_ledger(api_a, sql):
    a = api_a.funded_account(500)
    b = api_a.new_account()
    lt.assert_first(api_a.transfer(a, b, 200, key=lt.uid("k-")), 201)
    client = lt.sql_literal(api_a.client)
    assert sql(f"SELECT total FROM ledger.trial_balance WHERE client_id = {client} AND currency = 'USD'") == "0"
    held_world = sql(f"SELECT held + world FROM ledger.trial_balance WHERE client_id = {client} AND currency = 'USD'")
    assert held_world == "0"
    row = sql(f"SELECT balance, entries_sum, entries, consistent FROM ledger.account_balances "
              f"WHERE client_id = {client} AND account = {lt.sql_literal(b)}")
    assert row == "200|200|1|t", row
    assert sql("SELECT count(*) FROM ledger.account_balances WHERE NOT consistent") == "0"
    outcome = sql(f"SELECT outcome FROM ledger.idempotency_outcomes WHERE client_id = {client} "
                  f"ORDER BY created_at DESC LIMIT 1")
    assert outcome == "created"
    assert sql("SELECT count(*) FROM ledger.invariant_breaches") == "0"
