"""Reversals (refunds): POST /v1/transfers/{id}/reversals, whole and partial, what can be reversed, the checking
order of their failures, idempotency, and many concurrent partial reversals of one transfer."""

import pytest

import ledgertest as lt


def reverse(api, transfer_id, body=None, key=None, raw=None):
    return api.post(f"/v1/transfers/{transfer_id}/reversals", body, key, raw=raw)


def reversed_ok(api, transfer_id, body=None, key=None) -> dict:
    r = reverse(api, transfer_id, body, key)
    lt.assert_first(r, 201)
    t = lt.assert_json(r, 201)
    lt.assert_transfer_shape(t)
    return t


def transfer_now(api, transfer_id) -> dict:
    t = lt.assert_json(api.get_transfer(transfer_id), 200)
    lt.assert_transfer_shape(t)
    return t


def made(r) -> dict:
    t = lt.assert_json(r, 201)
    lt.assert_transfer_shape(t)
    return t


def bal(api, account):
    a = api.account(account)
    return a["balance"], a["version"]


def stored(first, again, status, code):
    lt.assert_problem(first, status, code)
    assert lt.replayed(first) == "false", f"first execution of a stored outcome: {lt.describe(first)}"
    lt.assert_replay_of(first, again)


def test_whole_reversal(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    t = made(api_a.transfer(alice, bob, 300, metadata={"order": 7}))
    assert (t["hold_id"], t["reverses"], t["reversed_amount"]) == (None, None, 0)
    rv = reversed_ok(api_a, t["id"])
    assert (rv["from"], rv["to"], rv["amount"], rv["currency"]) == (bob, alice, 300, "USD")
    assert (rv["reverses"], rv["hold_id"], rv["reversed_amount"]) == (t["id"], None, 0)
    assert rv["metadata"] == {}, "metadata defaults to {}, not the original's"
    assert rv["id"] != t["id"]
    assert transfer_now(api_a, rv["id"]) == rv
    orig = transfer_now(api_a, t["id"])
    assert orig["reversed_amount"] == 300
    assert {k: v for k, v in orig.items() if k != "reversed_amount"} == \
        {k: v for k, v in t.items() if k != "reversed_amount"}
    assert bal(api_a, alice) == (1000, 3)
    assert bal(api_a, bob) == (0, 2)
    e = api_a.all_entries(bob)[0]
    assert (e["transfer_id"], e["amount"], e["balance_after"]) == (rv["id"], -300, 0)
    # Nothing is left: any further reversal exceeds, stored.
    for body in (None, {}, {"amount": 1}):
        k = lt.uid("k-")
        first = reverse(api_a, t["id"], body, key=k)
        stored(first, reverse(api_a, t["id"], body, key=k), 422, "reversal-exceeds-transfer")
    assert bal(api_a, alice) == (1000, 3)


def test_partial_reversals_and_default_amount(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    t = made(api_a.transfer(alice, bob, 500))
    r1 = reversed_ok(api_a, t["id"], {"amount": 120, "metadata": {"why": "damaged"}})
    assert (r1["amount"], r1["metadata"], r1["from"], r1["to"]) == (120, {"why": "damaged"}, bob, alice)
    assert transfer_now(api_a, t["id"])["reversed_amount"] == 120
    k = lt.uid("k-")
    first = reverse(api_a, t["id"], {"amount": 381}, key=k)
    stored(first, reverse(api_a, t["id"], {"amount": 381}, key=k), 422, "reversal-exceeds-transfer")
    r2 = reversed_ok(api_a, t["id"], {"amount": 80})
    assert transfer_now(api_a, t["id"])["reversed_amount"] == 200
    r3 = reversed_ok(api_a, t["id"], {})  # what is left
    assert r3["amount"] == 300
    assert transfer_now(api_a, t["id"])["reversed_amount"] == 500
    assert bal(api_a, alice) == (1000, 5)
    assert bal(api_a, bob) == (0, 4)
    assert {r1["reverses"], r2["reverses"], r3["reverses"]} == {t["id"]}
    lt.assert_problem(reverse(api_a, t["id"], {"amount": 1}), 422, "reversal-exceeds-transfer")


def test_empty_body_is_empty_object(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    t = made(api_a.transfer(alice, bob, 50))
    k = lt.uid("k-")
    first = reverse(api_a, t["id"], key=k)
    lt.assert_first(first, 201)
    lt.assert_replay_of(first, reverse(api_a, t["id"], {}, key=k))
    assert first.json()["amount"] == 50


def test_reversal_of_a_reversal_is_not_reversible(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    t = made(api_a.transfer(alice, bob, 100))
    rv = reversed_ok(api_a, t["id"], {"amount": 40})
    for body in (None, {"amount": 1}, {"amount": 10**6}):
        k = lt.uid("k-")
        first = reverse(api_a, rv["id"], body, key=k)
        stored(first, reverse(api_a, rv["id"], body, key=k), 422, "transfer-not-reversible")
    assert transfer_now(api_a, rv["id"])["reversed_amount"] == 0


def test_insufficient_funds_of_the_originals_to(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    carol = api_a.new_account()
    t = made(api_a.transfer(alice, bob, 300))
    lt.assert_first(api_a.transfer(bob, carol, 250))  # bob has 50 left
    k = lt.uid("k-")
    first = reverse(api_a, t["id"], {"amount": 51}, key=k)
    lt.assert_problem(first, 422, "insufficient-funds")
    lt.assert_first(api_a.credit(bob, 1000))
    stored(first, reverse(api_a, t["id"], {"amount": 51}, key=k), 422, "insufficient-funds")
    assert transfer_now(api_a, t["id"])["reversed_amount"] == 0
    reversed_ok(api_a, t["id"], {"amount": 51})


def test_holds_of_the_payer_count_against_the_reversal(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    t = made(api_a.transfer(alice, bob, 300))
    h = api_a.post("/v1/holds", {"from": bob, "amount": 250, "currency": "USD"})
    lt.assert_json(h, 201)
    lt.assert_problem(reverse(api_a, t["id"], {"amount": 51}), 422, "insufficient-funds")
    reversed_ok(api_a, t["id"], {"amount": 50})
    acct = api_a.account(bob)
    assert (acct["balance"], acct["held"], acct["available"]) == (250, 250, 0)


def test_allow_negative_payer_needs_no_funds(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account(allow_negative=True)
    t = made(api_a.transfer(alice, bob, 300))
    lt.assert_first(api_a.debit(bob, 300))
    reversed_ok(api_a, t["id"])
    assert bal(api_a, bob) == (-300, 3)


def test_transfer_not_found_is_stored(api_a):
    for tid in ("99999999999", "nope", "0", "-3", "1.0"):
        k = lt.uid("k-")
        first = reverse(api_a, tid, key=k)
        stored(first, reverse(api_a, tid, key=k), 404, "transfer-not-found")


def test_other_clients_transfer_is_not_found(api_a, api_b):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    t = made(api_a.transfer(alice, bob, 300))
    lt.assert_problem(reverse(api_b, t["id"]), 404, "transfer-not-found")
    assert transfer_now(api_a, t["id"])["reversed_amount"] == 0


def test_reversal_of_a_credit(api_a):
    alice = api_a.new_account()
    c = made(api_a.credit(alice, 400))
    rv = reversed_ok(api_a, c["id"], {"amount": 150})
    assert (rv["from"], rv["to"], rv["amount"]) == (alice, "@world", 150)
    assert bal(api_a, alice) == (250, 2)
    # alice pays: funds are checked.
    lt.assert_problem(reverse(api_a, c["id"], {"amount": 251}), 422, "reversal-exceeds-transfer")
    lt.assert_first(api_a.debit(alice, 100))
    lt.assert_problem(reverse(api_a, c["id"], {"amount": 151}), 422, "insufficient-funds")


def test_reversal_of_a_debit_needs_no_funds_from_world(api_a, sql):
    alice = api_a.funded_account(1000)
    d = made(api_a.debit(alice, 700))
    rv = reversed_ok(api_a, d["id"])
    assert (rv["from"], rv["to"], rv["amount"], rv["reverses"]) == ("@world", alice, 700, d["id"])
    assert bal(api_a, alice) == (1000, 3)


def test_reversal_of_a_batch_item(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    carol = api_a.new_account()
    r = api_a.post("/v1/transfers/batch", {"transfers": [
        {"from": alice, "to": bob, "amount": 100, "currency": "USD"},
        {"from": alice, "to": carol, "amount": 200, "currency": "USD"},
    ]})
    body = lt.assert_json(r, 201)
    item = body["results"][1]["transfer"]
    lt.assert_transfer_shape(item)
    rv = reversed_ok(api_a, item["id"], {"amount": 200})
    assert (rv["from"], rv["to"], rv["reverses"]) == (carol, alice, item["id"])
    assert transfer_now(api_a, item["id"])["reversed_amount"] == 200
    assert transfer_now(api_a, body["results"][0]["transfer"]["id"])["reversed_amount"] == 0
    assert bal(api_a, alice) == (900, 4)


def test_reversal_of_a_capture(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    h = lt.assert_json(api_a.post("/v1/holds", {"from": alice, "to": bob, "amount": 500, "currency": "USD"}), 201)
    cap = lt.assert_json(api_a.post(f"/v1/holds/{h['id']}/capture", {"amount": 400}), 200)
    tid = cap["transfer_id"]
    rv = reversed_ok(api_a, tid, {"amount": 100})
    assert (rv["from"], rv["to"], rv["hold_id"], rv["reverses"]) == (bob, alice, None, tid)
    orig = transfer_now(api_a, tid)
    assert (orig["hold_id"], orig["reversed_amount"]) == (h["id"], 100)
    # The hold itself is unchanged.
    assert lt.assert_json(api_a.get(f"/v1/holds/{h['id']}"), 200) == cap
    assert bal(api_a, alice) == (700, 3)
    assert bal(api_a, bob) == (300, 2)


def test_reversal_of_a_capture_to_world(api_a):
    alice = api_a.funded_account(1000)
    h = lt.assert_json(api_a.post("/v1/holds", {"from": alice, "amount": 500, "currency": "USD"}), 201)
    cap = lt.assert_json(api_a.post(f"/v1/holds/{h['id']}/capture", {}), 200)
    rv = reversed_ok(api_a, cap["transfer_id"])
    assert (rv["from"], rv["to"], rv["amount"]) == ("@world", alice, 500)
    assert bal(api_a, alice) == (1000, 3)


def test_reversal_of_other_currency(api_a):
    alice = api_a.funded_account(1000, "EUR")
    bob = api_a.new_account("EUR")
    t = made(api_a.transfer(alice, bob, 100, "EUR"))
    assert reversed_ok(api_a, t["id"])["currency"] == "EUR"


@pytest.mark.parametrize("body,code", [
    ({"amount": 0}, "invalid-amount"),
    ({"amount": -5}, "invalid-amount"),
    ({"amount": "5"}, "invalid-amount"),
    ({"amount": lt.AMOUNT_MAX + 1}, "invalid-amount"),
    ({"metadata": [1]}, "invalid-metadata"),
    ({"metadata": {"x": "y" * 5000}}, "invalid-metadata"),
    ({"currency": "USD"}, "invalid-json"),
    ({"to": "x"}, "invalid-json"),
    ([], "invalid-json"),
])
def test_reversal_body_validation(api_a, body, code):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    t = made(api_a.transfer(alice, bob, 100))
    k = lt.uid("k-")
    lt.assert_problem(reverse(api_a, t["id"], body, key=k), 400, code)
    # Not stored: the key still executes.
    reversed_ok(api_a, t["id"], {"amount": 10}, key=k)


def test_reversal_requires_key(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    t = made(api_a.transfer(alice, bob, 100))
    r = api_a.request("POST", f"/v1/transfers/{t['id']}/reversals", body={})
    lt.assert_problem(r, 400, "idempotency-key-missing")
    assert transfer_now(api_a, t["id"])["reversed_amount"] == 0


def test_replay_and_reuse(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    t = made(api_a.transfer(alice, bob, 100))
    t2 = made(api_a.transfer(alice, bob, 100))
    k = lt.uid("k-")
    first = reverse(api_a, t["id"], {"amount": 30, "metadata": {"a": [1, 2]}}, key=k)
    lt.assert_first(first, 201)
    lt.assert_replay_of(first, reverse(api_a, t["id"], {"metadata": {"a": [1, 2]}, "amount": 30}, key=k))
    assert transfer_now(api_a, t["id"])["reversed_amount"] == 30
    lt.assert_problem(reverse(api_a, t["id"], {"amount": 31}, key=k), 422, "idempotency-key-reused")
    lt.assert_problem(reverse(api_a, t2["id"], {"amount": 30, "metadata": {"a": [1, 2]}}, key=k), 422,
                      "idempotency-key-reused")
    lt.assert_problem(api_a.credit(alice, 30, key=k), 422, "idempotency-key-reused")
    assert transfer_now(api_a, t2["id"])["reversed_amount"] == 0
    assert bal(api_a, bob) == (170, 3)


def test_checking_order(api_a):
    """transfer-not-reversible, then reversal-exceeds-transfer, then insufficient-funds."""
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    carol = api_a.new_account()
    t = made(api_a.transfer(alice, bob, 300))
    rv = reversed_ok(api_a, t["id"], {"amount": 100})
    lt.assert_first(api_a.transfer(alice, carol, 1))
    # The reversal's payer (alice) is empty and the amount exceeds: not-reversible first.
    lt.assert_first(api_a.debit(alice, api_a.balance(alice)))
    lt.assert_problem(reverse(api_a, rv["id"], {"amount": 10**6}), 422, "transfer-not-reversible")
    # bob has nothing and the amount exceeds what is left: exceeds before funds.
    lt.assert_first(api_a.transfer(bob, carol, 200))
    assert api_a.balance(bob) == 0
    lt.assert_problem(reverse(api_a, t["id"], {"amount": 201}), 422, "reversal-exceeds-transfer")
    lt.assert_problem(reverse(api_a, t["id"], {"amount": 200}), 422, "insufficient-funds")
    lt.assert_problem(reverse(api_a, t["id"]), 422, "insufficient-funds")
    assert transfer_now(api_a, t["id"])["reversed_amount"] == 100


def test_concurrent_partial_reversals_never_exceed(api_a, main_db):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    t = made(api_a.transfer(alice, bob, 100))
    calls = [lambda c=api_a.clone(): reverse(c, t["id"], {"amount": 7}) for _ in range(20)]
    results = lt.parallel(calls)
    ok = [r for r in results if r.status_code == 201]
    for r in results:
        if r.status_code != 201:
            lt.assert_problem(r, 422, "reversal-exceeds-transfer")
    assert len(ok) == 14, f"exactly floor(100/7) reversals fit; got {[r.status_code for r in results]}"
    orig = transfer_now(api_a, t["id"])
    assert orig["reversed_amount"] == 98
    assert bal(api_a, bob)[0] == 2 and api_a.balance(alice) == 998
    # The rest, concurrently with default amounts: exactly one gets the 2 left.
    results = lt.parallel([lambda c=api_a.clone(): reverse(c, t["id"]) for _ in range(5)])
    assert sorted(r.status_code for r in results) == [201, 422, 422, 422, 422], [r.text for r in results]
    for r in results:
        if r.status_code == 201:
            assert r.json()["amount"] == 2
        else:
            lt.assert_problem(r, 422, "reversal-exceeds-transfer")
    assert transfer_now(api_a, t["id"])["reversed_amount"] == 100
    proc = lt.verify(main_db)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_concurrent_reversals_of_many_transfers_with_debits(api_a):
    """Reversals racing with debits of their payer never overdraw it."""
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    ts = [made(api_a.transfer(alice, bob, 50)) for _ in range(6)]  # bob: 300
    calls = [lambda c=api_a.clone(), t=t: reverse(c, t["id"]) for t in ts]
    calls += [lambda c=api_a.clone(): c.debit(bob, 50) for _ in range(6)]
    results = lt.parallel(calls)
    for r in results:
        if r.status_code != 201:
            lt.assert_problem(r, 422, "insufficient-funds")
    assert sum(r.status_code == 201 for r in results) == 6
    assert api_a.account(bob)["balance"] == 0


def test_stored_transfer_not_found_replays_after_the_id_exists(api_a, main_db):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    made(api_a.transfer(alice, bob, 10))
    future = str(2**61 + int(lt.uid("")[-6:], 16))   # ids are random: the next transfer is given this one below
    k = lt.uid("k-")
    first = reverse(api_a, future, key=k)
    lt.assert_problem(first, 404, "transfer-not-found")
    lt.psql(main_db, f"ALTER TABLE ledger.transfers ALTER COLUMN id SET DEFAULT {future}")
    try:
        nxt = made(api_a.transfer(alice, bob, 20))
    finally:
        lt.psql(main_db, "ALTER TABLE ledger.transfers ALTER COLUMN id SET DEFAULT ledger.random_transfer_id()")
    assert nxt["id"] == future
    lt.assert_replay_of(first, reverse(api_a, future, key=k))
    assert transfer_now(api_a, nxt["id"])["reversed_amount"] == 0
    assert bal(api_a, bob) == (30, 2)


def test_concurrent_reversals_across_two_replicas(api_a, second_server):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    t = made(api_a.transfer(alice, bob, 50))
    apis = [api_a.clone(), api_a.clone(second_server.base)] * 10
    results = lt.parallel([lambda c=c: reverse(c, t["id"], {"amount": 3}) for c in apis])
    for r in results:
        if r.status_code != 201:
            lt.assert_problem(r, 422, "reversal-exceeds-transfer")
    assert sum(r.status_code == 201 for r in results) == 16
    assert transfer_now(api_a, t["id"])["reversed_amount"] == 48
    assert api_a.balance(bob) == 2


def test_same_key_concurrent_reversal_executes_once(api_a, second_server):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    t = made(api_a.transfer(alice, bob, 50))
    key = lt.uid("k-")
    apis = [api_a.clone(), api_a.clone(second_server.base)] * 4
    results = lt.parallel([lambda c=c: reverse(c, t["id"], {"amount": 20}, key=key) for c in apis])
    firsts = [r for r in results if lt.replayed(r) == "false"]
    assert len(firsts) == 1, [(r.status_code, lt.replayed(r)) for r in results]
    for r in results:
        assert r.status_code == 201 and r.content == firsts[0].content, lt.describe(r)
    assert transfer_now(api_a, t["id"])["reversed_amount"] == 20
