"""Idempotency seen from the client: Idempotency-TTL, Prefer: wait, GET /v1/idempotency-keys/{key}."""

from __future__ import annotations

import threading
import time
import urllib.parse

import pytest

import ledgertest as lt

RETENTION = 86400


def ttl(r) -> int:
    value = r.headers.get("Idempotency-TTL")
    assert value is not None and value.isdigit(), f"stored outcome without Idempotency-TTL: {lt.describe(r)}"
    return int(value)


def lookup(api: lt.Api, key: str):
    return api.request("GET", "/v1/idempotency-keys/" + urllib.parse.quote(key, safe=""))


# -- Idempotency-TTL


def test_ttl_on_first_answers_and_replays_of_every_keyed_post(api_a):
    account = api_a.funded_account(10_000)
    other = api_a.new_account()
    calls = {
        "credit": ("/v1/credits", {"account": account, "amount": 5, "currency": "USD"}),
        "debit": ("/v1/debits", {"account": account, "amount": 5, "currency": "USD"}),
        "transfer": ("/v1/transfers", {"from": account, "to": other, "amount": 5, "currency": "USD"}),
        "batch": ("/v1/transfers/batch", {"transfers": [{"from": account, "to": other, "amount": 1, "currency": "USD"}]}),
        "hold": ("/v1/holds", {"from": account, "amount": 7, "currency": "USD"}),
        "stored-422": ("/v1/debits", {"account": account, "amount": 10**12, "currency": "USD"}),
    }
    first_answers = {}
    for name, (path, body) in calls.items():
        key = lt.uid(f"ttl-{name}-")
        first = api_a.post(path, body, key=key)
        assert first.status_code in (201, 422), lt.describe(first)
        assert RETENTION - 2 <= ttl(first) <= RETENTION, lt.describe(first)
        first_answers[name] = (path, body, key, first)
    hold_id = first_answers["hold"][3].json()["id"]
    transfer_id = first_answers["transfer"][3].json()["id"]
    for name, path in [("capture", f"/v1/holds/{hold_id}/capture"), ("reversal", f"/v1/transfers/{transfer_id}/reversals")]:
        key = lt.uid(f"ttl-{name}-")
        first = api_a.post(path, {"amount": 1}, key=key)
        assert first.status_code in (200, 201), lt.describe(first)
        assert RETENTION - 2 <= ttl(first) <= RETENTION
        first_answers[name] = (path, {"amount": 1}, key, first)
    void_hold = api_a.post("/v1/holds", {"from": account, "amount": 1, "currency": "USD"}).json()["id"]
    void = api_a.post(f"/v1/holds/{void_hold}/void", {}, key=lt.uid("ttl-void-"))
    assert void.status_code == 200 and RETENTION - 2 <= ttl(void) <= RETENTION
    time.sleep(1.2)
    for name, (path, body, key, first) in first_answers.items():
        again = api_a.post(path, body, key=key)
        lt.assert_replay_of(first, again)
        assert ttl(again) <= ttl(first) - 1, f"{name}: the TTL must decrease with the outcome's age"
        assert ttl(again) >= RETENTION - 5


def test_no_ttl_on_answers_that_are_not_stored(api_a):
    account = api_a.funded_account(100)
    key = lt.uid("ttl-none-")
    r400 = api_a.post("/v1/credits", {"account": account, "amount": 0, "currency": "USD"}, key=key)
    lt.assert_problem(r400, 400, "invalid-amount")
    assert "Idempotency-TTL" not in r400.headers
    first = api_a.credit(account, 5, key=key)
    assert first.status_code == 201 and "Idempotency-TTL" in first.headers
    reused = api_a.credit(account, 6, key=key)
    lt.assert_problem(reused, 422, "idempotency-key-reused")
    assert "Idempotency-TTL" not in reused.headers
    missing = api_a.request("POST", "/v1/credits", body={"account": account, "amount": 1, "currency": "USD"})
    lt.assert_problem(missing, 400, "idempotency-key-missing")
    assert "Idempotency-TTL" not in missing.headers


def test_no_ttl_on_409_in_progress(api_a, main_db):
    account = api_a.new_account()
    key = lt.uid("ttl-409-")
    with lt.holding_key_lock(main_db, api_a.client, key):
        r = api_a.post("/v1/credits", {"account": account, "amount": 1, "currency": "USD"}, key=key,
                       headers={"Prefer": "wait=0"})
        lt.assert_problem(r, 409, "idempotency-key-in-progress")
        assert "Idempotency-TTL" not in r.headers


def test_ttl_counts_down_from_a_small_retention(start_server, clients, main_db):
    srv = start_server(["--retention-s", "5"])
    name, token = clients["a"]
    api = lt.Api(srv.base, token, name)
    account = api.new_account()
    key = lt.uid("ttl-small-")
    first = api.credit(account, 3, key=key)
    assert first.status_code == 201 and ttl(first) == 5, lt.describe(first)
    time.sleep(2.1)
    again = api.credit(account, 3, key=key)  # likely from the replay cache
    assert lt.replayed(again) and ttl(again) in (2, 3), lt.describe(again)
    # the same from the database, on another process (no replay cache)
    other = lt.Api(start_server(["--retention-s", "5", "--replay-cache-bytes-max", "0"]).base, token, name)
    from_db = other.credit(account, 3, key=key)
    assert lt.replayed(from_db) and ttl(from_db) in (1, 2, 3), lt.describe(from_db)
    time.sleep(3.5)
    late = api.credit(account, 3, key=key)
    assert lt.replayed(late) and ttl(late) == 0, lt.describe(late)
    assert ttl(other.credit(account, 3, key=key)) == 0


# -- Prefer: wait


def _blocked_first(api, main_db, account, key, body_path="/v1/credits"):
    """Starts an execution of `key` that blocks on the account's row lock (held by the caller)."""
    result = {}

    def first():
        result["r"] = api.clone().post(body_path, {"account": account, "amount": 1, "currency": "USD"}, key=key)

    t = threading.Thread(target=first)
    t.start()
    lt.wait_for_lock_waiter(main_db)
    return t, result


def test_prefer_wait_zero_answers_409_at_once(api_a, main_db):
    account = api_a.new_account()
    key = lt.uid("wait0-")
    with lt.holding_account_lock(main_db, api_a.client, account):
        t, result = _blocked_first(api_a, main_db, account, key)
        started = time.monotonic()
        r = api_a.clone().post("/v1/credits", {"account": account, "amount": 1, "currency": "USD"}, key=key,
                               headers={"Prefer": "wait=0"})
        elapsed = time.monotonic() - started
        lt.assert_problem(r, 409, "idempotency-key-in-progress")
        assert r.headers.get("Preference-Applied") == "wait=0"
        assert elapsed < 0.8, f"wait=0 waited {elapsed:.2f}s"
    t.join(timeout=30)
    assert result["r"].status_code == 201
    again = api_a.post("/v1/credits", {"account": account, "amount": 1, "currency": "USD"}, key=key,
                       headers={"Prefer": "wait=0"})
    lt.assert_replay_of(result["r"], again)
    assert again.headers.get("Preference-Applied") == "wait=0"


def test_prefer_wait_bounds_the_wait(api_a, main_db):
    account = api_a.new_account()
    key = lt.uid("wait1-")
    with lt.holding_account_lock(main_db, api_a.client, account):
        t, _ = _blocked_first(api_a, main_db, account, key)
        started = time.monotonic()
        r = api_a.clone().post("/v1/credits", {"account": account, "amount": 1, "currency": "USD"}, key=key,
                               headers={"Prefer": "respond-async, wait=1"})
        elapsed = time.monotonic() - started
        lt.assert_problem(r, 409, "idempotency-key-in-progress")
        assert r.headers.get("Preference-Applied") == "wait=1"
        assert 0.9 <= elapsed < 3.5, f"wait=1 waited {elapsed:.2f}s"
    t.join(timeout=30)


def test_prefer_wait_above_key_wait_is_cut(start_server, clients, main_db):
    srv = start_server(["--key-wait-ms", "2000"])
    name, token = clients["a"]
    api = lt.Api(srv.base, token, name)
    account = api.new_account()
    key = lt.uid("waitcut-")
    with lt.holding_account_lock(main_db, name, account):
        t, _ = _blocked_first(api, main_db, account, key)
        started = time.monotonic()
        r = api.clone().post("/v1/credits", {"account": account, "amount": 1, "currency": "USD"}, key=key,
                             headers={"Prefer": "wait=100"})
        elapsed = time.monotonic() - started
        lt.assert_problem(r, 409, "idempotency-key-in-progress")
        assert r.headers.get("Preference-Applied") == "wait=2"
        assert 1.8 <= elapsed < 5, f"cut wait took {elapsed:.2f}s"
    t.join(timeout=30)


@pytest.mark.parametrize("prefer", ["wait", "wait=", "wait=-1", "wait=1.5", "wait=abc", "wait=1s"])
def test_malformed_wait_is_ignored(api_a, prefer):
    account = api_a.new_account()
    r = api_a.post("/v1/credits", {"account": account, "amount": 1, "currency": "USD"}, headers={"Prefer": prefer})
    assert r.status_code == 201, lt.describe(r)
    assert "Preference-Applied" not in r.headers


def test_preference_applied_on_every_answer_of_a_keyed_post(api_a):
    account = api_a.new_account()
    h = {"Prefer": "wait=3"}
    bad = api_a.post("/v1/credits", {"account": account, "amount": 0, "currency": "USD"}, headers=h)
    lt.assert_problem(bad, 400, "invalid-amount")
    assert bad.headers.get("Preference-Applied") == "wait=3"
    no_key = api_a.request("POST", "/v1/holds", body={}, headers=h)
    lt.assert_problem(no_key, 400, "idempotency-key-missing")
    assert no_key.headers.get("Preference-Applied") == "wait=3"
    ok = api_a.post("/v1/transfers/batch", {"transfers": [{"to": account, "amount": 1, "currency": "USD"}]},
                    headers=h)
    assert ok.headers.get("Preference-Applied") == "wait=3", lt.describe(ok)
    assert api_a.get_account(account).headers.get("Preference-Applied") is None


# -- GET /v1/idempotency-keys/{key}


def test_lookup_completed(api_a):
    account = api_a.new_account()
    key = lt.uid("look-") + ' "quoted"/?'
    first = api_a.credit(account, 4, key='"' + key.replace('"', '\\"') + '"')
    assert first.status_code == 201, lt.describe(first)
    r = lookup(api_a, key)
    body = lt.assert_json(r, 200)
    assert set(body) == {"key", "state", "method", "path", "status", "created_at", "expires_at", "transfer_id"}
    assert body["key"] == key and body["state"] == "completed"
    assert body["method"] == "POST" and body["path"] == "/v1/credits" and body["status"] == 201
    assert body["transfer_id"] == first.json()["id"]
    assert lt.RFC3339_Z.match(body["created_at"]) and lt.RFC3339_Z.match(body["expires_at"])
    failed_key = lt.uid("look-422-")
    api_a.debit(account, 10**9, key=failed_key)
    failed = lt.assert_json(lookup(api_a, failed_key), 200)
    assert (failed["state"], failed["status"], failed["path"], failed["transfer_id"]) == ("completed", 422, "/v1/debits", None)


def test_lookup_in_progress(api_a, main_db):
    account = api_a.new_account()
    key = lt.uid("look-busy-")
    with lt.holding_account_lock(main_db, api_a.client, account):
        t, result = _blocked_first(api_a, main_db, account, key)
        r = lookup(api_a, key)
        body = lt.assert_json(r, 200)
        assert body["state"] == "in_progress"
        assert (body["method"], body["path"], body["status"], body["expires_at"]) == (None, None, None, None)
    t.join(timeout=30)
    assert result["r"].status_code == 201
    assert lookup(api_a, key).json()["state"] == "completed"


def test_lookup_consumed_after_purge(api_a, sql):
    account = api_a.new_account()
    key = lt.uid("look-purged-")
    first = api_a.credit(account, 4, key=key)
    failed_key = lt.uid("look-purged-422-")
    api_a.debit(account, 10**9, key=failed_key)
    sql(f"DELETE FROM ledger.idempotency_keys WHERE client_id = {lt.sql_literal(api_a.client)} "
        f"AND key IN ({lt.sql_literal(key)}, {lt.sql_literal(failed_key)})")
    body = lt.assert_json(lookup(api_a, key), 200)
    assert body == {"key": key, "state": "consumed", "method": None, "path": None, "status": None,
                    "created_at": None, "expires_at": None, "transfer_id": first.json()["id"]}
    lt.assert_problem(lookup(api_a, failed_key), 404, "idempotency-key-not-found")


def test_lookup_expires_at_follows_retention(start_server, clients):
    srv = start_server(["--retention-s", "60"])
    name, token = clients["a"]
    api = lt.Api(srv.base, token, name)
    key = lt.uid("look-exp-")
    api.credit(api.new_account(), 1, key=key)
    body = lookup(api, key).json()
    from datetime import datetime
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))
    assert (parse(body["expires_at"]) - parse(body["created_at"])).total_seconds() == 60


def test_lookup_unknown_invalid_and_other_clients(api_a, api_b):
    lt.assert_problem(lookup(api_a, lt.uid("never-")), 404, "idempotency-key-not-found")
    lt.assert_problem(api_a.request("GET", "/v1/idempotency-keys/" + "x" * 256), 400, "idempotency-key-invalid")
    lt.assert_problem(api_a.request("GET", "/v1/idempotency-keys/a%01b"), 400, "idempotency-key-invalid")
    lt.assert_problem(api_a.request("GET", "/v1/idempotency-keys/%C3%A9"), 400, "idempotency-key-invalid")
    key = lt.uid("mine-")
    assert api_a.credit(api_a.new_account(), 1, key=key).status_code == 201
    lt.assert_problem(lookup(api_b, key), 404, "idempotency-key-not-found")
    assert lookup(api_a, key).status_code == 200


def test_lookup_metrics(api_a, anon):
    lookup(api_a, lt.uid("never-"))
    text = anon.request("GET", "/metrics").text
    assert "ledger_idempotency_key_lookups_total" in text
    api_a.post("/v1/credits", {"account": api_a.new_account(), "amount": 1, "currency": "USD"},
               headers={"Prefer": "wait=1"})
    assert "ledger_wait_preferences_total" in anon.request("GET", "/metrics").text
