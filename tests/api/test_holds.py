"""Holds: two-phase transfers (place, then capture or void; expiry), their effect on held/available, the list
endpoint, idempotency of every outcome, and races between captures, voids and debits."""

import contextlib
import time

import pytest

import ledgertest as lt


def place(api, from_, amount, to=lt.NO_KEY, currency="USD", key=None, **extra):
    body = {"from": from_, "amount": amount, "currency": currency}
    if to is not lt.NO_KEY:
        body["to"] = to
    body.update(extra)
    return api.post("/v1/holds", body, key)


def placed(api, from_, amount, to=lt.NO_KEY, **kw) -> dict:
    r = place(api, from_, amount, to, **kw)
    lt.assert_first(r, 201)
    body = lt.assert_json(r, 201)
    lt.assert_hold_shape(body)
    return body


def capture(api, hold_id, body=None, key=None, raw=None):
    return api.post(f"/v1/holds/{hold_id}/capture", body, key, raw=raw)


def void(api, hold_id, body=None, key=None, raw=None):
    return api.post(f"/v1/holds/{hold_id}/void", body, key, raw=raw)


def get_hold(api, hold_id):
    return api.get(f"/v1/holds/{hold_id}")


def hold_now(api, hold_id) -> dict:
    body = lt.assert_json(get_hold(api, hold_id), 200)
    lt.assert_hold_shape(body)
    return body


def money(api, account):
    a = api.account(account)
    lt.assert_account_shape(a)
    return a["balance"], a["held"], a["available"], a["version"]


def stored(first, again, status, code):
    lt.assert_problem(first, status, code)
    assert lt.replayed(first) == "false", f"first execution of a stored outcome: {lt.describe(first)}"
    lt.assert_replay_of(first, again)


# ---------------------------------------------------------------------------------------------------------------------
# Placing


def test_place_hold_shape_and_balances(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    h = placed(api_a, alice, 300, bob, metadata={"order": "o-1"})
    assert (h["from"], h["to"], h["amount"], h["currency"], h["status"]) == (alice, bob, 300, "USD", "pending")
    assert (h["captured_amount"], h["transfer_id"], h["metadata"]) == (0, None, {"order": "o-1"})
    assert h["expires_at"] > h["created_at"]
    assert money(api_a, alice) == (1000, 300, 700, 1), "a hold moves held only; version counts balance changes"
    assert money(api_a, bob) == (0, 0, 0, 0)
    assert hold_now(api_a, h["id"]) == h


def test_default_expiry_is_seven_days(api_a, sql):
    alice = api_a.funded_account(10)
    h = placed(api_a, alice, 1)
    secs = sql(f"SELECT extract(epoch FROM expires_at - created_at)::int FROM ledger.holds WHERE id = {int(h['id'])}")
    assert int(secs) == 604800, f"default expires_in_s is 604800; got {secs}"
    h2 = placed(api_a, alice, 1, expires_in_s=2592000)
    secs = sql(f"SELECT extract(epoch FROM expires_at - created_at)::int FROM ledger.holds WHERE id = {int(h2['id'])}")
    assert int(secs) == 2592000


def test_to_absent_means_world(api_a):
    alice = api_a.funded_account(500)
    h = placed(api_a, alice, 200)
    assert h["to"] == "@world"
    r = capture(api_a, h["id"])
    body = lt.assert_json(r, 200)
    t = lt.assert_json(api_a.get_transfer(body["transfer_id"]), 200)
    assert (t["from"], t["to"], t["amount"], t["hold_id"]) == (alice, "@world", 200, h["id"])
    assert money(api_a, alice) == (300, 0, 300, 2)


@pytest.mark.parametrize("to", [None, "@world", "", "bad id", 7])
def test_to_null_or_world_is_invalid_account_id(api_a, to):
    alice = api_a.funded_account(100)
    lt.assert_problem(place(api_a, alice, 10, to), 400, "invalid-account-id")
    assert money(api_a, alice) == (100, 0, 100, 1)


def test_from_world_is_invalid_account_id(api_a):
    bob = api_a.new_account()
    lt.assert_problem(place(api_a, "@world", 10, bob), 400, "invalid-account-id")


def test_same_account_hold(api_a):
    alice = api_a.funded_account(100)
    lt.assert_problem(place(api_a, alice, 10, alice), 400, "same-account")


@pytest.mark.parametrize("expiry", [0, -1, 2592001, 1.5, "60", None, True, [60], {"s": 60}, 1e3])
def test_invalid_expiry(api_a, expiry):
    alice = api_a.funded_account(100)
    lt.assert_problem(place(api_a, alice, 10, expires_in_s=expiry), 400, "invalid-expiry")
    assert money(api_a, alice) == (100, 0, 100, 1)


@pytest.mark.parametrize("expiry", [1, 2592000])
def test_expiry_bounds_accepted(api_a, expiry):
    alice = api_a.funded_account(100)
    placed(api_a, alice, 10, expires_in_s=expiry)


@pytest.mark.parametrize("body,code", [
    ({"amount": 0}, "invalid-amount"),
    ({"amount": "5"}, "invalid-amount"),
    ({"amount": lt.AMOUNT_MAX + 1}, "invalid-amount"),
    ({"currency": "usd"}, "invalid-currency"),
    ({"metadata": []}, "invalid-metadata"),
    ({"extra": 1}, "invalid-json"),
    ({"from": 5}, "invalid-account-id"),
])
def test_hold_body_validation(api_a, body, code):
    alice = api_a.funded_account(100)
    full = {"from": alice, "amount": 10, "currency": "USD"} | body
    key = lt.uid("k-")
    lt.assert_problem(api_a.post("/v1/holds", full, key), 400, code)
    # 400s are not stored: the key is still free.
    lt.assert_first(api_a.post("/v1/holds", {"from": alice, "amount": 10, "currency": "USD"}, key), 201)


def test_hold_requires_key(api_a):
    alice = api_a.funded_account(100)
    r = api_a.request("POST", "/v1/holds", body={"from": alice, "amount": 1, "currency": "USD"})
    lt.assert_problem(r, 400, "idempotency-key-missing")


def test_hold_unknown_account_and_currency_are_stored(api_a):
    ghost = lt.uid("ghost-")
    key = lt.uid("k-")
    first = place(api_a, ghost, 10, key=key)
    lt.assert_json(api_a.put_account(ghost, "USD", True), 201)
    stored(first, place(api_a, ghost, 10, key=key), 404, "account-not-found")

    alice = api_a.funded_account(100)
    ghost_to = lt.uid("ghost-")
    first = place(api_a, alice, 10, ghost_to, key=key + "b")
    stored(first, place(api_a, alice, 10, ghost_to, key=key + "b"), 404, "account-not-found")

    eur = api_a.new_account("EUR")
    first = place(api_a, alice, 10, eur, key=key + "c")
    stored(first, place(api_a, alice, 10, eur, key=key + "c"), 422, "currency-mismatch")
    first = place(api_a, alice, 10, currency="EUR", key=key + "d")
    stored(first, place(api_a, alice, 10, currency="EUR", key=key + "d"), 422, "currency-mismatch")
    assert money(api_a, alice) == (100, 0, 100, 1)


def test_hold_insufficient_funds_on_available(api_a):
    alice = api_a.funded_account(500)
    placed(api_a, alice, 400)
    key = lt.uid("k-")
    first = place(api_a, alice, 101, key=key)
    lt.assert_problem(first, 422, "insufficient-funds")
    lt.assert_first(api_a.credit(alice, 1000))
    stored(first, place(api_a, alice, 101, key=key), 422, "insufficient-funds")
    assert money(api_a, alice) == (1500, 400, 1100, 2)
    placed(api_a, alice, 1100)  # exactly available
    assert money(api_a, alice) == (1500, 1500, 0, 2)
    lt.assert_problem(place(api_a, alice, 1), 422, "insufficient-funds")


def test_holds_reduce_what_debits_transfers_and_batches_may_spend(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    placed(api_a, alice, 700)
    lt.assert_problem(api_a.debit(alice, 301), 422, "insufficient-funds")
    lt.assert_problem(api_a.transfer(alice, bob, 301), 422, "insufficient-funds")
    batch = {"atomic": False, "transfers": [
        {"from": alice, "to": bob, "amount": 200, "currency": "USD"},
        {"from": alice, "to": bob, "amount": 101, "currency": "USD"},
    ]}
    r = api_a.post("/v1/transfers/batch", batch)
    body = lt.assert_json(r, 201)
    assert [x["status"] for x in body["results"]] == [201, 422], body
    assert body["results"][1]["problem"]["code"] == "insufficient-funds"
    lt.assert_transfer_shape(body["results"][0]["transfer"])
    atomic = {"transfers": [{"from": alice, "to": bob, "amount": 101, "currency": "USD"}]}
    r = api_a.post("/v1/transfers/batch", atomic)
    lt.assert_problem(r, 422, "insufficient-funds")
    assert money(api_a, alice) == (800, 700, 100, 2)
    lt.assert_first(api_a.debit(alice, 100))
    assert money(api_a, alice) == (700, 700, 0, 3)


def test_allow_negative_payer_may_hold_beyond_balance(api_a):
    neg = api_a.new_account(allow_negative=True)
    placed(api_a, neg, 500)
    assert money(api_a, neg) == (0, 500, -500, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Capture


def test_partial_capture(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    h = placed(api_a, alice, 400, bob, metadata={"m": "hold"})
    r = capture(api_a, h["id"], {"amount": 150})
    lt.assert_first(r, 200)
    got = lt.assert_json(r, 200)
    lt.assert_hold_shape(got)
    assert got["status"] == "captured" and got["captured_amount"] == 150
    assert got["metadata"] == {"m": "hold"} and got["amount"] == 400
    assert {k: v for k, v in got.items() if k not in ("status", "captured_amount", "transfer_id")} == \
        {k: v for k, v in h.items() if k not in ("status", "captured_amount", "transfer_id")}
    t = lt.assert_json(api_a.get_transfer(got["transfer_id"]), 200)
    lt.assert_transfer_shape(t)
    assert (t["from"], t["to"], t["amount"], t["currency"], t["hold_id"], t["reverses"], t["reversed_amount"]) == \
        (alice, bob, 150, "USD", h["id"], None, 0)
    assert t["metadata"] == {"m": "hold"}, "capture without metadata takes the hold's"
    # The whole hold leaves held; the rest is released.
    assert money(api_a, alice) == (850, 0, 850, 2)
    assert money(api_a, bob) == (150, 0, 150, 1)
    assert hold_now(api_a, h["id"]) == got
    entries = api_a.all_entries(alice)
    assert entries[0]["transfer_id"] == t["id"] and entries[0]["amount"] == -150


@pytest.mark.parametrize("how", ["no-body", "empty-object", "whole-amount"])
def test_full_capture(api_a, how):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    h = placed(api_a, alice, 400, bob)
    if how == "no-body":
        r = capture(api_a, h["id"])
    elif how == "empty-object":
        r = capture(api_a, h["id"], {})
    else:
        r = capture(api_a, h["id"], {"amount": 400})
    got = lt.assert_json(r, 200)
    assert (got["status"], got["captured_amount"]) == ("captured", 400)
    assert money(api_a, alice) == (600, 0, 600, 2)
    assert money(api_a, bob) == (400, 0, 400, 1)


def test_capture_metadata_rules(api_a):
    alice = api_a.funded_account(1000)
    h1 = placed(api_a, alice, 10, metadata={"a": 1})
    h2 = placed(api_a, alice, 10, metadata={"a": 1})
    h3 = placed(api_a, alice, 10, metadata={"a": 1})
    t1 = lt.assert_json(capture(api_a, h1["id"], {}), 200)
    t2 = lt.assert_json(capture(api_a, h2["id"], {"metadata": {}}), 200)
    t3 = lt.assert_json(capture(api_a, h3["id"], {"metadata": {"b": 2}}), 200)
    meta = [lt.assert_json(api_a.get_transfer(t["transfer_id"]), 200)["metadata"] for t in (t1, t2, t3)]
    assert meta == [{"a": 1}, {}, {"b": 2}]
    for h in (t1, t2, t3):
        assert h["metadata"] == {"a": 1}, "the hold keeps its own metadata"


@pytest.mark.parametrize("body,code", [
    ({"amount": 0}, "invalid-amount"),
    ({"amount": "1"}, "invalid-amount"),
    ({"amount": 1.5}, "invalid-amount"),
    ({"metadata": "x"}, "invalid-metadata"),
    ({"currency": "USD"}, "invalid-json"),
    ([], "invalid-json"),
])
def test_capture_body_validation(api_a, body, code):
    alice = api_a.funded_account(100)
    h = placed(api_a, alice, 10)
    lt.assert_problem(capture(api_a, h["id"], body), 400, code)
    assert hold_now(api_a, h["id"])["status"] == "pending"


def test_capture_exceeds_hold_is_stored(api_a):
    alice = api_a.funded_account(1000)
    h = placed(api_a, alice, 100)
    key = lt.uid("k-")
    first = capture(api_a, h["id"], {"amount": 101}, key=key)
    lt.assert_problem(first, 422, "capture-exceeds-hold")
    stored(first, capture(api_a, h["id"], {"amount": 101}, key=key), 422, "capture-exceeds-hold")
    assert hold_now(api_a, h["id"])["status"] == "pending"
    assert money(api_a, alice) == (1000, 100, 900, 1)
    lt.assert_json(capture(api_a, h["id"], {"amount": 100}), 200)


def test_capture_then_second_capture_and_void(api_a):
    alice = api_a.funded_account(1000)
    h = placed(api_a, alice, 100)
    ok = capture(api_a, h["id"], {"amount": 50})
    lt.assert_json(ok, 200)
    lt.assert_replay_of(ok, capture(api_a, h["id"], {"amount": 50}, key=ok.idem_key))
    # Not pending: the status is checked before the amount.
    for body in ({"amount": 50}, {"amount": 101}, {}):
        k = lt.uid("k-")
        first = capture(api_a, h["id"], body, key=k)
        stored(first, capture(api_a, h["id"], body, key=k), 422, "hold-captured")
    k = lt.uid("k-")
    first = void(api_a, h["id"], key=k)
    stored(first, void(api_a, h["id"], key=k), 422, "hold-captured")
    assert money(api_a, alice) == (950, 0, 950, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Void


@pytest.mark.parametrize("body", [None, {}])
def test_void_releases(api_a, body):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    h = placed(api_a, alice, 300, bob)
    r = void(api_a, h["id"], body)
    lt.assert_first(r, 200)
    got = lt.assert_json(r, 200)
    lt.assert_hold_shape(got)
    assert (got["status"], got["captured_amount"], got["transfer_id"]) == ("voided", 0, None)
    assert money(api_a, alice) == (1000, 0, 1000, 1)
    assert money(api_a, bob) == (0, 0, 0, 0)
    lt.assert_replay_of(r, void(api_a, h["id"], body, key=r.idem_key))
    for body2 in ({"amount": 10}, {"amount": 1000}, {}):
        k = lt.uid("k-")
        first = capture(api_a, h["id"], body2, key=k)
        stored(first, capture(api_a, h["id"], body2, key=k), 422, "hold-voided")
    k = lt.uid("k-")
    first = void(api_a, h["id"], key=k)
    stored(first, void(api_a, h["id"], key=k), 422, "hold-voided")


@pytest.mark.parametrize("body", [{"amount": 1}, {"metadata": {}}, {"x": None}])
def test_void_with_any_member_is_invalid_json(api_a, body):
    alice = api_a.funded_account(100)
    h = placed(api_a, alice, 10)
    lt.assert_problem(void(api_a, h["id"], body), 400, "invalid-json")
    assert hold_now(api_a, h["id"])["status"] == "pending"


def test_void_body_not_json(api_a):
    alice = api_a.funded_account(100)
    h = placed(api_a, alice, 10)
    lt.assert_problem(void(api_a, h["id"], raw="nope"), 400, "invalid-json")
    lt.assert_problem(void(api_a, h["id"], raw="[]"), 400, "invalid-json")


# ---------------------------------------------------------------------------------------------------------------------
# Unknown holds


@pytest.mark.parametrize("hold_id", ["999999999", "nope", "%40bad", "0", "-1", "1.5", "99999999999999999999999"])
def test_unknown_or_malformed_hold(api_a, hold_id):
    lt.assert_problem(get_hold(api_a, hold_id), 404, "hold-not-found")
    for op in (capture, void):
        k = lt.uid("k-")
        first = op(api_a, hold_id, key=k)
        stored(first, op(api_a, hold_id, key=k), 404, "hold-not-found")


def test_other_clients_hold_is_not_found(api_a, api_b):
    alice = api_a.funded_account(100)
    h = placed(api_a, alice, 10)
    lt.assert_problem(get_hold(api_b, h["id"]), 404, "hold-not-found")
    lt.assert_problem(capture(api_b, h["id"]), 404, "hold-not-found")
    lt.assert_problem(void(api_b, h["id"]), 404, "hold-not-found")
    assert hold_now(api_a, h["id"])["status"] == "pending"


# ---------------------------------------------------------------------------------------------------------------------
# Idempotency


def test_place_replay_and_reuse(api_a):
    alice = api_a.funded_account(1000)
    key = lt.uid("k-")
    first = place(api_a, alice, 100, key=key, metadata={"x": 1})
    lt.assert_first(first, 201)
    again = api_a.post("/v1/holds", {"metadata": {"x": 1}, "currency": "USD", "amount": 100, "from": alice}, key)
    lt.assert_replay_of(first, again)
    assert money(api_a, alice) == (1000, 100, 900, 1), "a replay places nothing"
    lt.assert_problem(place(api_a, alice, 101, key=key), 422, "idempotency-key-reused")
    # Keys share one namespace with credits, debits and transfers.
    lt.assert_problem(api_a.debit(alice, 100, key=key), 422, "idempotency-key-reused")
    k2 = lt.uid("k-")
    lt.assert_first(api_a.credit(alice, 5, key=k2))
    lt.assert_problem(place(api_a, alice, 5, key=k2), 422, "idempotency-key-reused")
    # Capture and void of the same hold under the hold's key are other requests.
    lt.assert_problem(capture(api_a, first.json()["id"], key=key), 422, "idempotency-key-reused")
    lt.assert_problem(void(api_a, first.json()["id"], key=key), 422, "idempotency-key-reused")
    assert money(api_a, alice) == (1005, 100, 905, 2)


def test_capture_replay_and_reuse(api_a):
    alice = api_a.funded_account(1000)
    h = placed(api_a, alice, 100)
    key = lt.uid("k-")
    first = capture(api_a, h["id"], {"amount": 40, "metadata": {"a": 1}}, key=key)
    lt.assert_first(first, 200)
    again = capture(api_a, h["id"], {"metadata": {"a": 1}, "amount": 40}, key=key)
    lt.assert_replay_of(first, again)
    lt.assert_problem(capture(api_a, h["id"], {"amount": 41, "metadata": {"a": 1}}, key=key), 422,
                      "idempotency-key-reused")
    lt.assert_problem(void(api_a, h["id"], key=key), 422, "idempotency-key-reused")
    assert money(api_a, alice) == (960, 0, 960, 2)


def test_capture_empty_body_equals_empty_object(api_a):
    alice = api_a.funded_account(1000)
    h = placed(api_a, alice, 100)
    key = lt.uid("k-")
    first = capture(api_a, h["id"], key=key)
    lt.assert_first(first, 200)
    lt.assert_replay_of(first, capture(api_a, h["id"], {}, key=key))


def test_void_empty_body_equals_empty_object(api_a):
    alice = api_a.funded_account(1000)
    h = placed(api_a, alice, 100)
    key = lt.uid("k-")
    first = void(api_a, h["id"], {}, key=key)
    lt.assert_first(first, 200)
    lt.assert_replay_of(first, void(api_a, h["id"], key=key))


def test_capture_key_on_other_hold_is_reused(api_a):
    alice = api_a.funded_account(1000)
    h1 = placed(api_a, alice, 100)
    h2 = placed(api_a, alice, 100)
    key = lt.uid("k-")
    lt.assert_first(capture(api_a, h1["id"], key=key), 200)
    lt.assert_problem(capture(api_a, h2["id"], key=key), 422, "idempotency-key-reused")
    assert hold_now(api_a, h2["id"])["status"] == "pending"


# ---------------------------------------------------------------------------------------------------------------------
# Expiry


def wait_past(sql, hold_id, timeout=10):
    """Until the database's clock is past the hold's expires_at."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sql(f"SELECT now() >= expires_at FROM ledger.holds WHERE id = {int(hold_id)}") == "t":
            return
        time.sleep(0.05)
    raise AssertionError("hold never passed its expires_at")


@contextlib.contextmanager
def sweep_blocked(main_db, client, hold_id):
    """Holds a row lock on the hold, so that no sweep can record its expiry during the block (requests that only
    read the hold or touch its account must not need that lock)."""
    holder = lt.PsqlSession(main_db)
    try:
        holder.send("BEGIN")
        got = holder.query_line(f"SELECT id FROM ledger.holds WHERE client_id = {lt.sql_literal(client)} "
                                f"AND id = {int(hold_id)} FOR UPDATE")
        assert got == str(hold_id), got
        yield holder
    finally:
        try:
            holder.send("ROLLBACK")
        finally:
            holder.close()


def test_expiry_takes_effect_at_once_without_the_sweep(api_a, main_db, sql):
    """Before any sweep has recorded it, an expired hold already counts as expired everywhere."""
    api = api_a
    alice = api.funded_account(1000)
    bob = api.new_account()
    h = placed(api, alice, 300, bob, expires_in_s=1)
    long = placed(api, alice, 100, bob)
    assert money(api, alice) == (1000, 400, 600, 1)
    lt.assert_problem(api.debit(alice, 601), 422, "insufficient-funds")
    with sweep_blocked(main_db, api.client, h["id"]):
        wait_past(sql, h["id"])
        assert sql(f"SELECT status FROM ledger.holds WHERE id = {int(h['id'])}") == "pending", "not yet recorded"
        got = hold_now(api, h["id"])
        assert got["status"] == "expired", f"GET shows expired from expires_at on: {got}"
        assert money(api, alice) == (1000, 100, 900, 1), "an expired hold counts in no held or available"
        pend = lt.assert_json(api.get(f"/v1/accounts/{alice}/holds", params={"status": "pending"}), 200)["holds"]
        assert [x["id"] for x in pend] == [long["id"]]
        exp = lt.assert_json(api.get(f"/v1/accounts/{alice}/holds", params={"status": "expired"}), 200)["holds"]
        assert [x["id"] for x in exp] == [h["id"]]
        proc = lt.verify(main_db)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # Capture and void answer hold-expired (before the amount), stored.
    for op, body in ((capture, {}), (capture, {"amount": 10**6}), (void, None)):
        k = lt.uid("k-")
        first = op(api, h["id"], body, key=k)
        stored(first, op(api, h["id"], body, key=k), 422, "hold-expired")
    assert money(api, bob) == (0, 0, 0, 0)
    assert money(api, alice) == (1000, 100, 900, 1)


@pytest.mark.parametrize("spend", ["debit", "transfer", "hold", "batch", "reversal"])
def test_released_money_of_expired_hold_is_spendable_before_the_sweep(api_a, main_db, sql, spend):
    """From expires_at on, the hold counts in no available a later request sees: all of available can be spent
    before a sweep has recorded the expiry (the sweep runs only every --hold-sweep-interval-ms; here it is kept
    from recording this hold so that the window is certain)."""
    api = api_a
    alice = api.funded_account(1000)
    bob = api.new_account()
    h = placed(api, alice, 300, bob, expires_in_s=1)
    placed(api, alice, 100, bob)
    with sweep_blocked(main_db, api.client, h["id"]):
        wait_past(sql, h["id"])
        assert money(api, alice) == (1000, 100, 900, 1)
        if spend == "debit":
            r = api.debit(alice, 900)
        elif spend == "transfer":
            r = api.transfer(alice, bob, 900)
        elif spend == "hold":
            r = place(api, alice, 900, bob)
        elif spend == "reversal":  # of the credit that funded alice: alice pays
            funding = api.all_entries(alice)[-1]["transfer_id"]
            r = api.post(f"/v1/transfers/{funding}/reversals", {"amount": 900})
        else:
            r = api.post("/v1/transfers/batch", {"transfers": [{"from": alice, "to": bob, "amount": 900,
                                                                 "currency": "USD"}]})
        lt.assert_first(r, 201)
    b, held, avail, _ = money(api, alice)
    assert avail == 0 and b - held == 0, (b, held, avail)


def test_sweep_records_expiry(api_a, sql):
    alice = api_a.funded_account(1000)
    h = placed(api_a, alice, 300, expires_in_s=1)
    wait_past(sql, h["id"])
    got = hold_now(api_a, h["id"])
    assert got["status"] == "expired"
    deadline = time.monotonic() + 2.5
    status = None
    while time.monotonic() < deadline:
        status = sql(f"SELECT status FROM ledger.holds WHERE id = {int(h['id'])}")
        if status == "expired":
            break
        time.sleep(0.1)
    assert status == "expired", f"the sweep records the expiry within its interval; still {status!r}"
    assert money(api_a, alice) == (1000, 0, 1000, 1)
    k = lt.uid("k-")
    first = capture(api_a, h["id"], key=k)
    stored(first, capture(api_a, h["id"], key=k), 422, "hold-expired")


# ---------------------------------------------------------------------------------------------------------------------
# The list endpoint


def test_list_holds_filter_paging_and_held_sum(api_a):
    alice = api_a.funded_account(10000)
    other = api_a.funded_account(10000)
    placed(api_a, other, 5)  # not alice's
    hs = [placed(api_a, alice, 100 + i) for i in range(6)]
    lt.assert_json(capture(api_a, hs[1]["id"], {"amount": 50}), 200)
    lt.assert_json(void(api_a, hs[2]["id"]), 200)
    lt.assert_json(void(api_a, hs[4]["id"]), 200)
    # Incoming holds (alice as `to`) are not alice's.
    placed(api_a, other, 7, alice)

    def listing(status=None, limit=None):
        out, cursor = [], None
        for _ in range(100):
            params = {}
            if status:
                params["status"] = status
            if limit:
                params["limit"] = limit
            if cursor:
                params["cursor"] = cursor
            body = lt.assert_json(api_a.get(f"/v1/accounts/{alice}/holds", params=params), 200)
            assert set(body) == {"holds", "next_cursor"}, body
            if limit:
                assert len(body["holds"]) <= limit
            for x in body["holds"]:
                lt.assert_hold_shape(x)
                assert x["from"] == alice
            out.extend(body["holds"])
            cursor = body["next_cursor"]
            if cursor is None:
                return out
        raise AssertionError("paging did not end")

    everything = listing()
    ids = [x["id"] for x in everything]
    assert ids == [h["id"] for h in reversed(hs)], "newest first, only alice's"
    assert [x["id"] for x in listing(limit=1)] == ids, "paging with limit=1 sees each hold exactly once"
    assert [x["id"] for x in listing(limit=4)] == ids
    pending = listing("pending")
    assert [x["id"] for x in pending] == [hs[5]["id"], hs[3]["id"], hs[0]["id"]]
    assert [x["id"] for x in listing("pending", limit=1)] == [x["id"] for x in pending]
    assert [x["id"] for x in listing("captured")] == [hs[1]["id"]]
    assert [x["id"] for x in listing("voided")] == [hs[4]["id"], hs[2]["id"]]
    assert listing("expired") == []
    acct = api_a.account(alice)
    assert acct["held"] == sum(x["amount"] for x in pending) == 100 + 103 + 105


@pytest.mark.parametrize("params,code", [
    ({"status": "bogus"}, "invalid-status"),
    ({"status": "PENDING"}, "invalid-status"),
    ({"status": ""}, "invalid-status"),
    ({"limit": 0}, "invalid-limit"),
    ({"limit": 501}, "invalid-limit"),
    ({"limit": "x"}, "invalid-limit"),
    ({"cursor": "not-a-cursor"}, "invalid-cursor"),
])
def test_list_holds_bad_params(api_a, params, code):
    alice = api_a.funded_account(10)
    lt.assert_problem(api_a.get(f"/v1/accounts/{alice}/holds", params=params), 400, code)


def test_list_holds_unknown_account(api_a):
    lt.assert_problem(api_a.get(f"/v1/accounts/{lt.uid('ghost-')}/holds"), 404, "account-not-found")


# ---------------------------------------------------------------------------------------------------------------------
# Races


def test_concurrent_captures_and_voids_exactly_one_wins(api_a):
    for round_ in range(3):
        alice = api_a.funded_account(1000)
        bob = api_a.new_account()
        h = placed(api_a, alice, 500, bob)
        calls = []
        for i in range(10):
            c = api_a.clone()
            if (i + round_) % 2 == 0:
                calls.append(lambda c=c: ("capture", capture(c, h["id"], {"amount": 200})))
            else:
                calls.append(lambda c=c: ("void", void(c, h["id"])))
        results = lt.parallel(calls)
        winners = [(op, r) for op, r in results if r.status_code == 200]
        assert len(winners) == 1, [(op, r.status_code, r.text[:200]) for op, r in results]
        op, win = winners[0]
        final = hold_now(api_a, h["id"])
        expected_code = {"capture": "hold-captured", "void": "hold-voided"}[op]
        assert final["status"] == {"capture": "captured", "void": "voided"}[op]
        for _, r in results:
            if r is not win:
                lt.assert_problem(r, 422, expected_code)
        if op == "capture":
            assert money(api_a, alice) == (800, 0, 800, 2)
            assert money(api_a, bob) == (200, 0, 200, 1)
        else:
            assert money(api_a, alice) == (1000, 0, 1000, 1)
            assert money(api_a, bob) == (0, 0, 0, 0)


def test_concurrent_holds_and_debits_never_overdraw(api_a, main_db):
    alice = api_a.funded_account(1000)
    calls = []
    for i in range(30):
        c = api_a.clone()
        if i % 3 == 0:
            calls.append(lambda c=c: c.debit(alice, 70))
        elif i % 3 == 1:
            calls.append(lambda c=c: place(c, alice, 90))
        else:
            calls.append(lambda c=c: c.transfer(alice, "nobody-" + lt.uid(), 1))  # 404s, mixing locks
    results = lt.parallel(calls)
    spent = held = 0
    for i, r in enumerate(results):
        assert r.status_code in (201, 404, 422), lt.describe(r)
        if r.status_code == 422:
            lt.assert_problem(r, 422, "insufficient-funds")
        if r.status_code == 201 and i % 3 == 0:
            spent += 70
        if r.status_code == 201 and i % 3 == 1:
            held += 90
    acct = api_a.account(alice)
    assert acct["balance"] == 1000 - spent and acct["held"] == held, (acct, spent, held)
    assert acct["available"] >= 0, f"never overdrawn: {acct}"
    assert acct["available"] < 90, f"the losers lost only for lack of funds: {acct}"
    # Captures and debits racing on the same payer.
    pend = lt.assert_json(api_a.get(f"/v1/accounts/{alice}/holds", params={"status": "pending"}), 200)["holds"]
    calls = [lambda c=api_a.clone(), h=h: capture(c, h["id"]) for h in pend]
    calls += [lambda c=api_a.clone(): c.debit(alice, 30) for _ in range(10)]
    for r in lt.parallel(calls):
        assert r.status_code in (200, 201, 422), lt.describe(r)
    acct = api_a.account(alice)
    assert acct["held"] == 0 and acct["balance"] >= 0 and acct["available"] >= 0, acct
    proc = lt.verify(main_db)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_same_key_concurrent_capture_executes_once(api_a):
    alice = api_a.funded_account(1000)
    h = placed(api_a, alice, 100)
    key = lt.uid("k-")
    results = lt.parallel([lambda c=api_a.clone(): capture(c, h["id"], {"amount": 60}, key=key) for _ in range(6)])
    firsts = [r for r in results if lt.replayed(r) == "false"]
    assert len(firsts) == 1, [(r.status_code, lt.replayed(r)) for r in results]
    for r in results:
        assert r.status_code == 200 and r.content == firsts[0].content, lt.describe(r)
    assert money(api_a, alice) == (940, 0, 940, 2)


def test_stored_hold_not_found_replays_after_the_id_exists(api_a):
    alice = api_a.funded_account(1000)
    h = placed(api_a, alice, 10)
    future = str(int(h["id"]) + 1)
    k1, k2 = lt.uid("k-"), lt.uid("k-")
    first_c = capture(api_a, future, {"amount": 5}, key=k1)
    first_v = void(api_a, future, key=k2)
    lt.assert_problem(first_c, 404, "hold-not-found")
    lt.assert_problem(first_v, 404, "hold-not-found")
    nxt = placed(api_a, alice, 20)
    lt.assert_replay_of(first_c, capture(api_a, future, {"amount": 5}, key=k1))
    lt.assert_replay_of(first_v, void(api_a, future, key=k2))
    assert hold_now(api_a, nxt["id"])["status"] == "pending"
    assert money(api_a, alice) == (1000, 30, 970, 1)


def test_list_paging_is_stable_while_holds_arrive(api_a):
    alice = api_a.funded_account(100000)
    first_ids = [placed(api_a, alice, 1)["id"] for _ in range(5)]
    seen, cursor = [], None
    for i in range(100):
        params = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        body = lt.assert_json(api_a.get(f"/v1/accounts/{alice}/holds", params=params), 200)
        seen.extend(x["id"] for x in body["holds"])
        placed(api_a, alice, 1)  # newer than everything paged so far
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(first_ids)), "following next_cursor never repeats or skips a hold"


def test_concurrent_holds_never_exceed_available(api_a):
    alice = api_a.funded_account(1000)
    results = lt.parallel([lambda c=api_a.clone(): place(c, alice, 100) for _ in range(20)])
    ok = [r for r in results if r.status_code == 201]
    for r in results:
        if r.status_code != 201:
            lt.assert_problem(r, 422, "insufficient-funds")
    assert len(ok) == 10, [r.status_code for r in results]
    assert money(api_a, alice) == (1000, 1000, 0, 1)


def test_same_key_concurrent_place_executes_once(api_a, second_server):
    alice = api_a.funded_account(1000)
    key = lt.uid("k-")
    apis = [api_a.clone(), api_a.clone(second_server.base)] * 4
    results = lt.parallel([lambda c=c: place(c, alice, 100, key=key) for c in apis])
    firsts = [r for r in results if lt.replayed(r) == "false"]
    assert len(firsts) == 1, [(r.status_code, lt.replayed(r)) for r in results]
    for r in results:
        assert r.status_code == 201 and r.content == firsts[0].content, lt.describe(r)
    assert money(api_a, alice) == (1000, 100, 900, 1)


def test_capture_void_storm_across_two_replicas(api_a, second_server):
    alice = api_a.funded_account(1000)
    h = placed(api_a, alice, 500)
    calls = []
    for i in range(10):
        c = api_a.clone(second_server.base if i % 2 else None)
        calls.append((lambda c=c: capture(c, h["id"], {"amount": 100})) if i % 3 else (lambda c=c: void(c, h["id"])))
    results = lt.parallel(calls)
    assert sum(r.status_code == 200 for r in results) == 1, [(r.status_code, r.text[:100]) for r in results]
    final = hold_now(api_a, h["id"])
    code = {"captured": "hold-captured", "voided": "hold-voided"}[final["status"]]
    for r in results:
        if r.status_code != 200:
            lt.assert_problem(r, 422, code)
    assert money(api_a, alice)[:3] == ((900, 0, 900) if final["status"] == "captured" else (1000, 0, 1000))


@pytest.mark.parametrize("raw", ["null", "[]", "1", '"x"', "{"])
def test_capture_and_void_non_object_bodies(api_a, raw):
    alice = api_a.funded_account(100)
    h = placed(api_a, alice, 10)
    lt.assert_problem(capture(api_a, h["id"], raw=raw), 400, "invalid-json")
    lt.assert_problem(void(api_a, h["id"], raw=raw), 400, "invalid-json")
    assert hold_now(api_a, h["id"])["status"] == "pending"


def test_capture_and_void_require_a_key(api_a):
    alice = api_a.funded_account(100)
    h = placed(api_a, alice, 10)
    for op in ("capture", "void"):
        r = api_a.request("POST", f"/v1/holds/{h['id']}/{op}", body={})
        lt.assert_problem(r, 400, "idempotency-key-missing")
    assert hold_now(api_a, h["id"])["status"] == "pending"


def test_list_holds_malformed_account_id(api_a):
    lt.assert_problem(api_a.get("/v1/accounts/%40world/holds"), 400, "invalid-account-id")
    lt.assert_problem(api_a.get("/v1/accounts/" + "a" * 65 + "/holds"), 400, "invalid-account-id")


def test_hold_metadata_limit(api_a):
    alice = api_a.funded_account(100)
    lt.assert_problem(place(api_a, alice, 1, metadata={"x": "y" * 4100}), 400, "invalid-metadata")
    h = placed(api_a, alice, 1)
    lt.assert_problem(capture(api_a, h["id"], {"metadata": {"x": "y" * 4100}}), 400, "invalid-metadata")


def test_quoted_key_is_the_same_key(api_a):
    alice = api_a.funded_account(1000)
    h = placed(api_a, alice, 100)
    bare = lt.uid("k-")
    first = capture(api_a, h["id"], {"amount": 10}, key=bare)
    lt.assert_first(first, 200)
    lt.assert_replay_of(first, capture(api_a, h["id"], {"amount": 10}, key=f'"{bare}"'))
    lt.assert_problem(capture(api_a, h["id"], {"amount": 10}, key=bare.upper()), 422, "hold-captured")


@pytest.mark.parametrize("op", ["place", "capture", "void"])
def test_in_progress_key_is_409(api_a, main_db, start_server, op):
    srv = start_server(["--key-wait-ms", "300"])
    api = api_a.clone(srv.base)
    alice = api.funded_account(1000)
    h = placed(api, alice, 100)
    key = lt.uid("k-")
    call = {
        "place": lambda: place(api, alice, 5, key=key),
        "capture": lambda: capture(api, h["id"], key=key),
        "void": lambda: void(api, h["id"], key=key),
    }[op]
    with lt.holding_key_lock(main_db, api.client, key):
        r = call()
        lt.assert_problem(r, 409, "idempotency-key-in-progress")
        assert r.headers.get("Retry-After"), lt.describe(r)
    lt.assert_first(call(), 201 if op == "place" else 200)


def test_captures_and_voids_racing_the_expiry(api_a, main_db, sql):
    """Operations fired around expires_at either win (the hold is captured/voided, before expires_at) or answer
    hold-expired (the hold ends expired); never both, never a 5xx, and the invariants hold."""
    alice = api_a.funded_account(100000)
    holds = [placed(api_a, alice, 100, expires_in_s=1) for _ in range(12)]
    base = time.monotonic()

    def fire(i, h):
        c = api_a.clone()
        time.sleep(max(0.0, 0.85 + 0.025 * i - (time.monotonic() - base)))
        return capture(c, h["id"], {"amount": 50}) if i % 2 == 0 else void(c, h["id"])

    results = lt.parallel([lambda i=i, h=h: fire(i, h) for i, h in enumerate(holds)])
    time.sleep(0.1)
    for i, (h, r) in enumerate(zip(holds, results)):
        final = hold_now(api_a, h["id"])
        if r.status_code == 200:
            assert final["status"] == ("captured" if i % 2 == 0 else "voided"), (final, r.text)
            assert r.json() == final
        else:
            lt.assert_problem(r, 422, "hold-expired")
            assert final["status"] == "expired", final
        if final["status"] == "captured":
            ok = sql(f"SELECT t.created_at < h.expires_at FROM ledger.holds h JOIN ledger.transfers t "
                     f"ON t.client_id = h.client_id AND t.id = h.transfer_id WHERE h.id = {int(h['id'])}")
            assert ok == "t", f"captured at or after expires_at: {final}"
    acct = api_a.account(alice)
    captured = sum(50 for i, r in enumerate(results) if i % 2 == 0 and r.status_code == 200)
    assert (acct["balance"], acct["held"]) == (100000 - captured, 0), acct
    proc = lt.verify(main_db)
    assert proc.returncode == 0, proc.stdout + proc.stderr
