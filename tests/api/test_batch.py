"""POST /v1/transfers/batch: up to 1,000 transfers under one Idempotency-Key, all or nothing (`atomic`, the default)
or each on its own. Shape, sequential execution, stored outcomes and byte-for-byte replays, validation that stores
nothing, the 1 MiB body limit of this route, the key namespace shared with /v1/transfers, and contention."""

import json
import threading
import time
from collections import Counter

import pytest

import ledgertest as lt

BATCH = "/v1/transfers/batch"
BATCH_BODY_MAX = 1_048_576
ITEM_KEYS = ("from", "to", "amount", "currency", "metadata")


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def item(from_, to, amount, currency="USD", metadata=None):
    body = {"from": from_, "to": to, "amount": amount, "currency": currency}
    if metadata is not None:
        body["metadata"] = metadata
    return body


def batch_body(items, atomic=None):
    body = {"transfers": items}
    if atomic is not None:
        body["atomic"] = atomic
    return body


def post_batch(api, items, atomic=None, key=None):
    return api.post(BATCH, batch_body(items, atomic), key=key)


def key_rows(sql, api, key) -> tuple[int, int]:
    """(stored idempotency outcomes, transfers) under this client's key."""
    c, k = lt.sql_literal(api.client), lt.sql_literal(key)
    out = sql(
        f"SELECT (SELECT count(*) FROM ledger.idempotency_keys WHERE client_id = {c} AND key = {k}) || ',' ||"
        f" (SELECT count(*) FROM ledger.transfers WHERE client_id = {c} AND idempotency_key = {k})"
    )
    stored, transfers = out.split(",")
    return int(stored), int(transfers)


def state(api, accounts) -> dict:
    """{account: (balance, version)}."""
    out = {}
    for a in accounts:
        got = api.account(a)
        out[a] = (got["balance"], got["version"])
    return out


def strip_prefix(problem: dict, index: int) -> dict:
    prefix = f"transfers[{index}]: "
    assert problem["detail"].startswith(prefix), f"detail must start with {prefix!r}: {problem}"
    return problem | {"detail": problem["detail"][len(prefix):]}


def assert_same_problem(batch_problem: dict, single: dict, it: dict) -> None:
    """The batch item's problem is the one a single transfer gets, detail included: both run the same rules."""
    assert batch_problem == single, f"batch problem {batch_problem} != single transfer's {single} for {it}"


def assert_batch_ok(r, atomic: bool, n: int) -> list:
    """201 application/json `{"atomic":..., "results":[...]}` with n results; returns the results."""
    body = lt.assert_json(r, 201)
    assert isinstance(body, dict) and set(body) == {"atomic", "results"}, f"batch body keys: {lt.describe(r)}"
    assert body["atomic"] is atomic, f"atomic must echo {atomic}: {lt.describe(r)}"
    results = body["results"]
    assert isinstance(results, list) and len(results) == n, f"expected {n} results, got {len(results)}"
    return results


def assert_result_transfer(result: dict, expected_item: dict) -> dict:
    assert set(result) == {"status", "transfer"} and result["status"] == 201, f"expected a 201 result: {result}"
    t = result["transfer"]
    lt.assert_transfer_shape(t)
    want = dict(expected_item)
    want.setdefault("metadata", {})
    assert {k: t[k] for k in ITEM_KEYS} == want, f"transfer {t} does not match item {expected_item}"
    return t


def assert_result_problem(result: dict, status: int, code: str) -> dict:
    assert set(result) == {"status", "problem"}, f"expected a problem result: {result}"
    assert result["status"] == status and type(result["status"]) is int, f"result status: {result}"
    p = result["problem"]
    assert isinstance(p, dict) and set(p) == lt.PROBLEM_KEYS, f"problem keys: {result}"
    assert p["status"] == status and p["code"] == code, f"expected {status} {code}: {result}"
    for field in ("type", "title", "detail"):
        assert isinstance(p[field], str) and p[field], f"problem {field}: {result}"
    return p


def no_5xx(responses):
    bad = [lt.describe(r) for r in responses if r.status_code >= 500]
    assert not bad, "5xx under contention:\n" + "\n".join(bad)


def assert_nothing_stored_then_key_works(api, sql, key):
    """A refused request stored nothing under `key`: no rows, and the key then executes a valid batch afresh."""
    assert key_rows(sql, api, key) == (0, 0), f"a refused batch must store nothing under {key}"
    a = api.funded_account(10)
    b = api.new_account()
    r = post_batch(api, [item(a, b, 4)], key=key)
    lt.assert_first(r, 201)
    assert_result_transfer(assert_batch_ok(r, True, 1)[0], item(a, b, 4))
    assert api.balance(a) == 6 and api.balance(b) == 4


# ---------------------------------------------------------------------------------------------------------------------
# 1. Success


def test_atomic_batch_of_three(api_a, sql):
    a = api_a.funded_account(100)
    b = api_a.new_account()
    c = api_a.new_account()
    # b and c start empty: item 1 spends what item 0 brought, item 2 what item 1 brought.
    items = [
        item(a, b, 30, metadata={"n": 1, "note": "first"}),
        item(b, c, 20),
        item(c, a, 5, metadata={}),
    ]
    key = lt.uid("b3-")
    r = post_batch(api_a, items, key=key)
    lt.assert_first(r, 201)
    results = assert_batch_ok(r, True, 3)
    transfers = [assert_result_transfer(res, it) for res, it in zip(results, items)]
    assert len({t["id"] for t in transfers}) == 3, "every item is its own transfer"

    assert state(api_a, [a, b, c]) == {a: (75, 3), b: (10, 2), c: (15, 2)}
    # Each transfer is an ordinary transfer: GET returns the very object of the results.
    for t in transfers:
        assert lt.assert_json(api_a.get_transfer(t["id"]), 200) == t
    # Entries: newest first, with exact balance_after, one per item touching the account.
    t0, t1, t2 = transfers
    ea = api_a.all_entries(a)
    eb = api_a.all_entries(b)
    ec = api_a.all_entries(c)
    for e in ea + eb + ec:
        lt.assert_entry_shape(e)
    assert [(e["transfer_id"], e["amount"], e["balance_after"]) for e in ea][:2] == [
        (t2["id"], 5, 75), (t0["id"], -30, 70)
    ]
    assert [(e["transfer_id"], e["amount"], e["balance_after"]) for e in eb] == [(t1["id"], -20, 10), (t0["id"], 30, 30)]
    assert [(e["transfer_id"], e["amount"], e["balance_after"]) for e in ec] == [(t2["id"], -5, 15), (t1["id"], 20, 20)]
    for t in transfers:
        assert t["created_at"] == next(e["created_at"] for e in ea + eb + ec if e["transfer_id"] == t["id"])
    assert key_rows(sql, api_a, key) == (1, 3)


def test_atomic_is_the_default_and_can_be_explicit(api_a):
    a = api_a.funded_account(10)
    b = api_a.new_account()
    r = post_batch(api_a, [item(a, b, 1)])
    lt.assert_first(r, 201)
    assert_batch_ok(r, True, 1)
    r = post_batch(api_a, [item(a, b, 2)], atomic=True)
    assert_batch_ok(r, True, 1)
    # Default atomic: a failing item fails the whole batch.
    r = post_batch(api_a, [item(a, b, 3), item(a, b, 100)])
    body = lt.assert_problem(r, 422, "insufficient-funds")
    assert body["detail"].startswith("transfers[1]: ")
    assert state(api_a, [a, b]) == {a: (7, 3), b: (3, 2)}


def test_single_item_non_atomic_success(api_a):
    a = api_a.funded_account(10, "EUR")
    b = api_a.new_account("EUR")
    it = item(a, b, 10, "EUR", {"ref": "x"})
    r = post_batch(api_a, [it], atomic=False)
    lt.assert_first(r, 201)
    t = assert_result_transfer(assert_batch_ok(r, False, 1)[0], it)
    assert lt.assert_json(api_a.get_transfer(t["id"]), 200) == t
    assert state(api_a, [a, b]) == {a: (0, 2), b: (10, 1)}


# ---------------------------------------------------------------------------------------------------------------------
# 2. The acceptance test: 1,000 transfers, item 499 overdraws


def thousand_items(api):
    """10 sources, 10 sinks; item i moves (i % 13) + 1 from s[i % 10] to d[i % 10]. Each source is funded with exactly
    what its items other than 499 need; item 499 (from s[9]) asks for one more than s[9] still holds at that point
    (but less than s[9] held at the start, so only sequential execution catches it)."""
    sources = [api.new_account(prefix="src-") for _ in range(10)]
    sinks = [api.new_account(prefix="dst-") for _ in range(10)]
    items = [item(sources[i % 10], sinks[i % 10], (i % 13) + 1, metadata={"i": i}) for i in range(1000)]
    funding = [0] * 10
    for i, it in enumerate(items):
        if i != 499:
            funding[i % 10] += it["amount"]
    left_at_499 = sum(it["amount"] for i, it in enumerate(items) if i % 10 == 9 and i > 499)
    items[499]["amount"] = left_at_499 + 1
    assert items[499]["amount"] < funding[9], "item 499 alone would fit into the starting balance"
    for s, amount in zip(sources, funding):
        lt.assert_first(api.credit(s, amount), 201)
    return sources, sinks, items, funding


def test_thousand_items_item_499_overdraws(api_a, sql):
    sources, sinks, items, funding = thousand_items(api_a)
    accounts = sources + sinks
    before = state(api_a, accounts)
    assert before == {**{s: (f, 1) for s, f in zip(sources, funding)}, **{d: (0, 0) for d in sinks}}
    single = lt.assert_problem(api_a.transfer(sources[9], sinks[9], funding[9] + 1), 422, "insufficient-funds")

    # Atomic: the whole batch fails as item 499 failed, nothing is written.
    atomic_body = batch_body(items, True)
    raw = json.dumps(atomic_body, separators=(",", ":"))
    assert lt.BODY_MAX < len(raw.encode()) < BATCH_BODY_MAX, f"body of {len(raw)} bytes: over 64 KiB, under 1 MiB"
    key_atomic = lt.uid("k1000a-")
    ra = api_a.post(BATCH, raw=raw, key=key_atomic)
    problem = lt.assert_problem(ra, 422, "insufficient-funds")
    assert lt.replayed(ra) == "false"
    assert problem["detail"].startswith("transfers[499]: "), problem
    assert strip_prefix(problem, 499) == single, "the problem must be the one a single transfer gets"
    assert state(api_a, accounts) == before, "an atomic batch with a failing item must write nothing"
    assert key_rows(sql, api_a, key_atomic) == (1, 0)

    # Not atomic: 999 transfers, result 499 is the problem; later items see the balances the earlier ones left.
    key = lt.uid("k1000n-")
    r = api_a.post(BATCH, batch_body(items, False), key=key)
    lt.assert_first(r, 201)
    results = assert_batch_ok(r, False, 1000)
    assert Counter(res["status"] for res in results) == Counter({201: 999, 422: 1})
    assert assert_result_problem(results[499], 422, "insufficient-funds") == single
    transfers = [assert_result_transfer(res, it) for i, (res, it) in enumerate(zip(results, items)) if i != 499]
    assert len({t["id"] for t in transfers}) == 999
    expected = {s: (0, 101) for s in sources[:9]}
    expected[sources[9]] = (0, 100)
    for k, d in enumerate(sinks):
        expected[d] = (sum(it["amount"] for i, it in enumerate(items) if i % 10 == k and i != 499), 100 if k < 9 else 99)
    assert state(api_a, accounts) == expected
    assert key_rows(sql, api_a, key) == (1, 999)
    # Spot checks: GET of transfers and the entries of s[9] follow the items exactly.
    for i in (0, 498, 500, 999):
        t = results[i]["transfer"]
        assert lt.assert_json(api_a.get_transfer(t["id"]), 200) == t
    entries = api_a.all_entries(sources[9])
    assert len(entries) == 100
    balance = 0
    for e in reversed(entries):
        balance += e["amount"]
        assert e["balance_after"] == balance
    assert [-e["amount"] for e in reversed(entries[:-1])] == [
        it["amount"] for i, it in enumerate(items) if i % 10 == 9 and i != 499
    ]
    # The atomic failure is still stored: its replay is the same 422 now that the funds are gone.
    lt.assert_replay_of(ra, api_a.post(BATCH, raw=raw, key=key_atomic))
    lt.assert_replay_of(r, api_a.post(BATCH, batch_body(items, False), key=key))
    assert state(api_a, accounts) == expected
    assert key_rows(sql, api_a, key) == (1, 999)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Idempotency


def test_replay_atomic_success(api_a, sql):
    a = api_a.funded_account(100)
    b = api_a.new_account()
    items = [item(a, b, 10, metadata={"z": 1, "a": [1, 2]}), item(b, a, 4)]
    key = lt.uid("rep-")
    first = post_batch(api_a, items, key=key)
    lt.assert_first(first, 201)
    assert_batch_ok(first, True, 2)
    after = state(api_a, [a, b])
    assert after == {a: (94, 3), b: (6, 2)}
    for _ in range(2):
        lt.assert_replay_of(first, post_batch(api_a, items, key=key))
    # Same canonical body with other key order and whitespace: a replay too.
    raw = (
        '{ "transfers" : [ {"currency":"USD", "metadata": {"a":[1, 2],"z":1}, "amount":10, "to":"%s", "from":"%s"},'
        '\n {"to":"%s","amount":4,"from":"%s","currency":"USD"} ] }' % (b, a, a, b)
    )
    lt.assert_replay_of(first, api_a.post(BATCH, raw=raw, key=key))
    assert state(api_a, [a, b]) == after, "replays execute nothing"
    assert key_rows(sql, api_a, key) == (1, 2)


def test_replay_atomic_failure_even_after_funding(api_a, sql):
    a = api_a.funded_account(10)
    b = api_a.new_account()
    items = [item(a, b, 5), item(a, b, 6)]
    key = lt.uid("repf-")
    first = post_batch(api_a, items, key=key)
    body = lt.assert_problem(first, 422, "insufficient-funds")
    assert lt.replayed(first) == "false"
    assert body["detail"].startswith("transfers[1]: ")
    assert state(api_a, [a, b]) == {a: (10, 1), b: (0, 0)}
    lt.assert_first(api_a.credit(a, 1000))
    again = post_batch(api_a, items, key=key)
    lt.assert_problem(again, 422, "insufficient-funds")
    lt.assert_replay_of(first, again)
    assert state(api_a, [a, b]) == {a: (1010, 2), b: (0, 0)}
    assert key_rows(sql, api_a, key) == (1, 0)
    # The same items under a new key now execute.
    lt.assert_first(post_batch(api_a, items), 201)
    assert state(api_a, [a, b]) == {a: (999, 4), b: (11, 2)}


def test_replay_atomic_404_after_account_created(api_a):
    a = api_a.funded_account(10)
    ghost = lt.uid("ghost-")
    items = [item(a, ghost, 5)]
    key = lt.uid("rep404-")
    first = post_batch(api_a, items, key=key)
    body = lt.assert_problem(first, 404, "account-not-found")
    assert body["detail"].startswith("transfers[0]: ")
    lt.assert_json(api_a.put_account(ghost, "USD"), 201)
    lt.assert_replay_of(first, post_batch(api_a, items, key=key))
    assert state(api_a, [a, ghost]) == {a: (10, 1), ghost: (0, 0)}


def test_replay_non_atomic_mixed(api_a, sql):
    a = api_a.funded_account(50)
    b = api_a.new_account()
    ghost = lt.uid("ghost-")
    items = [item(a, b, 30), item(a, b, 30), item(a, ghost, 1), item(b, a, 10)]
    key = lt.uid("repm-")
    first = post_batch(api_a, items, atomic=False, key=key)
    lt.assert_first(first, 201)
    results = assert_batch_ok(first, False, 4)
    assert [res["status"] for res in results] == [201, 422, 404, 201]
    after = state(api_a, [a, b])
    assert after == {a: (30, 3), b: (20, 2)}
    # Fund and create what was missing: the replay is still the stored answer, byte for byte.
    lt.assert_first(api_a.credit(a, 500))
    lt.assert_json(api_a.put_account(ghost, "USD"), 201)
    again = post_batch(api_a, items, atomic=False, key=key)
    lt.assert_replay_of(first, again)
    assert state(api_a, [a, b, ghost]) == {a: (530, 4), b: (20, 2), ghost: (0, 0)}
    assert key_rows(sql, api_a, key) == (1, 2)


def test_key_reused_with_different_body(api_a, sql):
    a = api_a.funded_account(100)
    b = api_a.new_account()
    items = [item(a, b, 10)]
    key = lt.uid("reuse-")
    first = post_batch(api_a, items, key=key)
    lt.assert_first(first, 201)
    for other in (
        batch_body([item(a, b, 11)]),
        batch_body([item(a, b, 10), item(a, b, 10)]),
        batch_body(items, False),
        batch_body([item(a, b, 10, metadata={"x": 1})]),
    ):
        lt.assert_problem(api_a.post(BATCH, other, key=key), 422, "idempotency-key-reused")
    assert state(api_a, [a, b]) == {a: (90, 2), b: (10, 1)}
    lt.assert_replay_of(first, post_batch(api_a, items, key=key))
    assert key_rows(sql, api_a, key) == (1, 1)


def test_batch_key_then_single_transfer_is_reused(api_a):
    a = api_a.funded_account(100)
    b = api_a.new_account()
    key = lt.uid("ns1-")
    first = post_batch(api_a, [item(a, b, 10)], key=key)
    lt.assert_first(first, 201)
    # The very same transfer posted singly under the batch's key: another request, 422.
    lt.assert_problem(api_a.transfer(a, b, 10, key=key), 422, "idempotency-key-reused")
    lt.assert_problem(api_a.credit(a, 10, key=key), 422, "idempotency-key-reused")
    lt.assert_problem(api_a.debit(a, 10, key=key), 422, "idempotency-key-reused")
    assert state(api_a, [a, b]) == {a: (90, 2), b: (10, 1)}
    lt.assert_replay_of(first, post_batch(api_a, [item(a, b, 10)], key=key))


def test_batch_key_with_stored_failure_then_single_is_reused(api_a):
    a = api_a.funded_account(1)
    b = api_a.new_account()
    key = lt.uid("ns2-")
    lt.assert_problem(post_batch(api_a, [item(a, b, 10)], key=key), 422, "insufficient-funds")
    lt.assert_problem(api_a.transfer(a, b, 1, key=key), 422, "idempotency-key-reused")
    assert state(api_a, [a, b]) == {a: (1, 1), b: (0, 0)}


def test_single_transfer_key_then_batch_is_reused(api_a):
    a = api_a.funded_account(100)
    b = api_a.new_account()
    key = lt.uid("ns3-")
    first = api_a.transfer(a, b, 10, key=key)
    lt.assert_first(first, 201)
    lt.assert_problem(post_batch(api_a, [item(a, b, 10)], key=key), 422, "idempotency-key-reused")
    lt.assert_problem(post_batch(api_a, [item(a, b, 10)], atomic=False, key=key), 422, "idempotency-key-reused")
    assert state(api_a, [a, b]) == {a: (90, 2), b: (10, 1)}
    lt.assert_replay_of(first, api_a.transfer(a, b, 10, key=key))
    # A credit's stored failure shares the namespace too.
    key2 = lt.uid("ns4-")
    lt.assert_problem(api_a.credit(lt.uid("ghost-"), 1, key=key2), 404, "account-not-found")
    lt.assert_problem(post_batch(api_a, [item(a, b, 1)], key=key2), 422, "idempotency-key-reused")
    assert state(api_a, [a, b]) == {a: (90, 2), b: (10, 1)}


def test_batch_keys_are_scoped_per_client(api_a, api_b):
    key = lt.uid("scope-")
    a1 = api_a.funded_account(100)
    b1 = api_a.new_account()
    first_a = post_batch(api_a, [item(a1, b1, 10)], key=key)
    lt.assert_first(first_a, 201)
    # Client b, same key and even the same body text: its own execution on its own accounts.
    for acct in (a1, b1):
        lt.assert_json(api_b.put_account(acct, "USD"), 201)
    lt.assert_first(api_b.credit(a1, 50), 201)
    first_b = post_batch(api_b, [item(a1, b1, 10)], key=key)
    lt.assert_first(first_b, 201)
    assert first_b.content != first_a.content
    assert state(api_a, [a1, b1]) == {a1: (90, 2), b1: (10, 1)}
    assert state(api_b, [a1, b1]) == {a1: (40, 2), b1: (10, 1)}
    tb = first_b.json()["results"][0]["transfer"]
    lt.assert_problem(api_a.get_transfer(tb["id"]), 404, "transfer-not-found")
    assert lt.assert_json(api_b.get_transfer(tb["id"]), 200) == tb


# ---------------------------------------------------------------------------------------------------------------------
# 4. Validation: 400 / 413, nothing written, nothing stored


def test_idempotency_key_and_auth_required(api_a, anon, sql):
    a = api_a.funded_account(10)
    b = api_a.new_account()
    body = batch_body([item(a, b, 1)])
    r = api_a.request("POST", BATCH, body=body)
    lt.assert_problem(r, 400, "idempotency-key-missing")
    for bad in ("", "x" * 256, "caf\u00e9".encode("utf-8").decode("latin-1")):
        r = api_a.request("POST", BATCH, body=body, key=bad)
        lt.assert_problem(r, 400, "idempotency-key-invalid")
    r = anon.post(BATCH, body)
    lt.assert_problem(r, 401, "unauthorized")
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")
    # Quoted sf-string and bare token name the same key.
    key = lt.uid("q-")
    first = api_a.post(BATCH, body, key=f'"{key}"')
    lt.assert_first(first, 201)
    lt.assert_replay_of(first, api_a.post(BATCH, body, key=key))
    assert state(api_a, [a, b]) == {a: (9, 2), b: (1, 1)}


def test_content_type_handled_as_for_transfers(api_a):
    a = api_a.funded_account(10)
    b = api_a.new_account()
    for ctype in ("text/plain", "application/xml"):
        single = api_a.post("/v1/transfers", item(a, b, 1), headers={"Content-Type": ctype})
        batch = api_a.post(BATCH, batch_body([item(a, b, 1)]), headers={"Content-Type": ctype})
        assert batch.status_code == single.status_code, (lt.describe(single), lt.describe(batch))
        if single.status_code >= 400:
            assert batch.json()["code"] == single.json()["code"]


def valid_items(api):
    a = api.funded_account(10)
    b = api.new_account()
    return a, b, [item(a, b, 1)]


@pytest.mark.parametrize(
    "raw,detail",
    [
        ("not json", None),
        ("", None),
        ("{", None),
        ("[]", None),
        ('[{"from":"a","to":"b","amount":1,"currency":"USD"}]', None),
        ("null", None),
        ('"transfers"', None),
        ("{}", None),
        ('{"atomic":true}', None),
        ('{"transfers":null}', None),
        ('{"transfers":{}}', None),
        ('{"transfers":"x"}', None),
        ('{"transfers":{"0":{"from":"a","to":"b","amount":1,"currency":"USD"}}}', None),
        ('{"transfers":[VALID],"extra":1}', None),
        ('{"transfers":[VALID],"Atomic":true}', None),
        ('{"atomic":"yes","transfers":[VALID]}', None),
        ('{"atomic":1,"transfers":[VALID]}', None),
        ('{"atomic":"true","transfers":[VALID]}', None),
        ('{"atomic":null,"transfers":[VALID]}', None),
        ('{"transfers":[VALID,5]}', "transfers[1] must be a JSON object."),
        ('{"transfers":[VALID,VALID,null]}', "transfers[2] must be a JSON object."),
        ('{"transfers":[[VALID]]}', "transfers[0] must be a JSON object."),
        ('{"transfers":[VALID,"x"]}', "transfers[1] must be a JSON object."),
    ],
)
def test_invalid_json(api_a, sql, raw, detail):
    a, b, items = valid_items(api_a)
    raw = raw.replace("VALID", json.dumps(items[0]))
    key = lt.uid("ij-")
    r = api_a.post(BATCH, raw=raw, key=key)
    body = lt.assert_problem(r, 400, "invalid-json")
    if detail is not None:
        assert body["detail"] == detail
    assert state(api_a, [a, b]) == {a: (10, 1), b: (0, 0)}
    assert_nothing_stored_then_key_works(api_a, sql, key)


@pytest.mark.parametrize("extra", ["extra", "Amount", "id", "key", "atomic", "transfers"])
def test_item_with_unknown_field(api_a, sql, extra):
    a, b, items = valid_items(api_a)
    bad = dict(items[0], **{extra: "x"})
    single = lt.assert_problem(api_a.post("/v1/transfers", bad), 400, "invalid-json")
    key = lt.uid("uf-")
    r = post_batch(api_a, [items[0], items[0], bad], key=key)
    body = lt.assert_problem(r, 400, "invalid-json")
    assert strip_prefix(body, 2) == single
    assert state(api_a, [a, b]) == {a: (10, 1), b: (0, 0)}
    assert_nothing_stored_then_key_works(api_a, sql, key)


@pytest.mark.parametrize("n", [0, 1001, 1500])
def test_item_count_out_of_range(api_a, sql, n):
    a, b, items = valid_items(api_a)
    key = lt.uid("cnt-")
    r = post_batch(api_a, items * n, key=key)
    lt.assert_problem(r, 400, "invalid-batch")
    assert state(api_a, [a, b]) == {a: (10, 1), b: (0, 0)}
    assert_nothing_stored_then_key_works(api_a, sql, key)


def test_exactly_1000_items_is_accepted(api_a, sql):
    a = api_a.funded_account(1000)
    b = api_a.new_account()
    key = lt.uid("k1000-")
    r = post_batch(api_a, [item(a, b, 1)] * 1000, key=key)
    lt.assert_first(r, 201)
    assert_batch_ok(r, True, 1000)
    assert state(api_a, [a, b]) == {a: (0, 1001), b: (1000, 1000)}
    assert key_rows(sql, api_a, key) == (1, 1000)


# Items that fail validation: (item builder, code). Each must get the code and detail a single transfer gets.
BAD_ITEMS = {
    "amount-zero": (lambda a, b: item(a, b, 0), "invalid-amount"),
    "amount-negative": (lambda a, b: item(a, b, -5), "invalid-amount"),
    "amount-string": (lambda a, b: item(a, b, "5"), "invalid-amount"),
    "amount-fraction": (lambda a, b: item(a, b, 1.5), "invalid-amount"),
    "amount-over-2^53": (lambda a, b: item(a, b, lt.AMOUNT_MAX + 1), "invalid-amount"),
    "amount-missing": (lambda a, b: {"from": a, "to": b, "currency": "USD"}, "invalid-amount"),
    "currency-lower": (lambda a, b: item(a, b, 1, "usd"), "invalid-currency"),
    "currency-long": (lambda a, b: item(a, b, 1, "USDX"), "invalid-currency"),
    "currency-number": (lambda a, b: item(a, b, 1, 840), "invalid-currency"),
    "from-space": (lambda a, b: item("bad id", b, 1), "invalid-account-id"),
    "to-world": (lambda a, b: item(a, "@world", 1), "invalid-account-id"),
    "from-number": (lambda a, b: item(7, b, 1), "invalid-account-id"),
    "to-missing": (lambda a, b: {"from": a, "amount": 1, "currency": "USD"}, "invalid-account-id"),
    "same-account": (lambda a, b: item(a, a, 1), "same-account"),
    "metadata-array": (lambda a, b: item(a, b, 1, metadata=[1]), "invalid-metadata"),
    "metadata-string": (lambda a, b: item(a, b, 1, metadata="x"), "invalid-metadata"),
    "metadata-too-big": (lambda a, b: item(a, b, 1, metadata={"x": "y" * 5000}), "invalid-metadata"),
}


@pytest.mark.parametrize("name", list(BAD_ITEMS))
@pytest.mark.parametrize("index", [0, 3])
def test_invalid_item_gets_its_own_code_and_index(api_a, sql, name, index):
    a, b, items = valid_items(api_a)
    build, code = BAD_ITEMS[name]
    bad = build(a, b)
    single = lt.assert_problem(api_a.post("/v1/transfers", bad), 400, code)
    batch_items = [item(a, b, 1)] * index + [bad] + [item(a, b, 1)] * 2
    for atomic in (None, False):
        key = lt.uid("bi-")
        r = post_batch(api_a, batch_items, atomic=atomic, key=key)
        body = lt.assert_problem(r, 400, code)
        assert strip_prefix(body, index) == single, "the item's problem must be the single transfer's, prefixed"
        assert state(api_a, [a, b]) == {a: (10, 1), b: (0, 0)}
        assert key_rows(sql, api_a, key) == (0, 0)
    assert_nothing_stored_then_key_works(api_a, sql, key)


def test_lowest_failing_index_wins(api_a, sql):
    a, b, items = valid_items(api_a)
    cases = [
        ([items[0], item(a, b, 1, "usd"), item(a, b, 0)], 1, "invalid-currency"),
        ([items[0], item(a, b, 0), item(a, b, 1, "usd")], 1, "invalid-amount"),
        ([items[0], items[0], item(a, a, 1), 5], 2, "same-account"),
        ([items[0], dict(items[0], x=1), item(a, b, 0)], 1, "invalid-json"),
        ([item(a, b, 1, metadata=[]), items[0], item("@x", b, 1)], 0, "invalid-metadata"),
    ]
    for batch_items, index, code in cases:
        key = lt.uid("low-")
        body = lt.assert_problem(post_batch(api_a, batch_items, key=key), 400, code)
        assert body["detail"].startswith(f"transfers[{index}]: "), body
        assert key_rows(sql, api_a, key) == (0, 0)
    # A non-object item before an invalid object item: the non-object's invalid-json.
    key = lt.uid("low-")
    body = lt.assert_problem(post_batch(api_a, [items[0], [], item(a, b, 0)], key=key), 400, "invalid-json")
    assert body["detail"] == "transfers[1] must be a JSON object."
    assert state(api_a, [a, b]) == {a: (10, 1), b: (0, 0)}
    assert_nothing_stored_then_key_works(api_a, sql, key)


def padded(body: dict, size: int) -> bytes:
    """The JSON of body, padded with trailing whitespace to exactly `size` bytes."""
    data = json.dumps(body, separators=(",", ":")).encode()
    assert len(data) <= size
    return data + b" " * (size - len(data))


def test_body_limit_is_one_mib_for_batch(api_a, sql):
    a = api_a.funded_account(10)
    b = api_a.new_account()
    body = batch_body([item(a, b, 1)])
    # Over 1 MiB: 413, nothing stored, the key then works.
    key = lt.uid("big-")
    r = api_a.post(BATCH, raw=padded(body, BATCH_BODY_MAX + 1), key=key)
    lt.assert_problem(r, 413, "body-too-large")
    # Far over, with real items (1,000 items with large metadata).
    fat = batch_body([item(a, b, 1, metadata={"pad": "x" * 1100})] * 1000)
    r = api_a.post(BATCH, fat, key=key)
    lt.assert_problem(r, 413, "body-too-large")
    assert state(api_a, [a, b]) == {a: (10, 1), b: (0, 0)}
    assert key_rows(sql, api_a, key) == (0, 0)
    # Exactly 1 MiB is accepted (the padding is whitespace, so the canonical body is the same as unpadded).
    r = api_a.post(BATCH, raw=padded(body, BATCH_BODY_MAX), key=key)
    lt.assert_first(r, 201)
    assert_batch_ok(r, True, 1)
    lt.assert_replay_of(r, api_a.post(BATCH, body, key=key))
    assert state(api_a, [a, b]) == {a: (9, 2), b: (1, 1)}
    # Other routes keep 64 KiB.
    single = item(a, b, 1)
    lt.assert_problem(api_a.post("/v1/transfers", raw=padded(single, lt.BODY_MAX + 1)), 413, "body-too-large")
    lt.assert_first(api_a.post("/v1/transfers", raw=padded(single, lt.BODY_MAX)), 201)
    lt.assert_problem(api_a.post("/v1/credits", raw=padded({"account": a, "amount": 1, "currency": "USD"},
                                                           lt.BODY_MAX + 1)), 413, "body-too-large")
    assert state(api_a, [a, b]) == {a: (8, 3), b: (2, 2)}


def test_chunked_body_limit(api_a):
    """Without Content-Length (chunked), the actual size counts: 1 MiB passes, one byte more is 413."""
    a = api_a.funded_account(10)
    b = api_a.new_account()
    body = batch_body([item(a, b, 1)])

    def chunks(data):
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    def send(size, key):
        h = api_a.headers(key, {"Content-Type": "application/json"})
        return api_a.session.post(api_a.base + BATCH, data=chunks(padded(body, size)), headers=h, timeout=lt.TIMEOUT)

    key = lt.uid("chunk-")
    lt.assert_problem(send(BATCH_BODY_MAX + 1, key), 413, "body-too-large")
    assert state(api_a, [a, b]) == {a: (10, 1), b: (0, 0)}
    r = send(BATCH_BODY_MAX, key)
    lt.assert_first(r, 201)
    assert state(api_a, [a, b]) == {a: (9, 2), b: (1, 1)}


def test_body_over_one_mib_is_401_without_token(anon):
    """Precedence: 401 before 413."""
    lt.assert_problem(anon.post(BATCH, raw=b"{" + b" " * BATCH_BODY_MAX + b"}"), 401, "unauthorized")


def test_body_over_one_mib_without_key_is_413(api_a):
    """Precedence: 413 comes before the Idempotency-Key header check."""
    r = api_a.request("POST", BATCH, raw=b"{" + b" " * BATCH_BODY_MAX + b"}")
    lt.assert_problem(r, 413, "body-too-large")


# ---------------------------------------------------------------------------------------------------------------------
# 5. Stored failures per item (non-atomic) and as the whole batch (atomic)


def test_non_atomic_item_failures(api_a, sql):
    a = api_a.funded_account(100)
    b = api_a.new_account()
    c = api_a.new_account()
    eur = api_a.funded_account(100, "EUR")
    ghost = lt.uid("ghost-")
    items = [
        item(a, b, 60),            # 0 ok: a 40, b 60
        item(a, b, 60),            # 1 insufficient: a holds 40
        item(b, c, 60),            # 2 ok thanks to item 0: b 0, c 60
        item(c, a, 10),            # 3 ok: c 50, a 50
        item(ghost, a, 1),         # 4 404 (from)
        item(a, ghost, 1),         # 5 404 (to)
        item(a, eur, 1),           # 6 currency mismatch (to holds EUR)
        item(eur, a, 1),           # 7 currency mismatch (from holds EUR)
        item(a, b, 1, "GBP"),      # 8 currency mismatch (the request's currency)
        item(a, b, 50),            # 9 ok: a 0, b 50
        item(b, a, 51),            # 10 insufficient
    ]
    key = lt.uid("naf-")
    r = post_batch(api_a, items, atomic=False, key=key)
    lt.assert_first(r, 201)
    results = assert_batch_ok(r, False, len(items))
    expected_codes = {1: (422, "insufficient-funds"), 4: (404, "account-not-found"), 5: (404, "account-not-found"),
                      6: (422, "currency-mismatch"), 7: (422, "currency-mismatch"), 8: (422, "currency-mismatch"),
                      10: (422, "insufficient-funds")}
    final = {a: (0, 4), b: (50, 3), c: (50, 2), eur: (100, 1)}
    assert state(api_a, [a, b, c, eur]) == final
    transfers = []
    for i, (res, it) in enumerate(zip(results, items)):
        if i in expected_codes:
            status, code = expected_codes[i]
            p = assert_result_problem(res, status, code)
            # The same problem a single transfer gets for that item (state now: the failures still fail).
            single = lt.assert_problem(api_a.post("/v1/transfers", it), status, code)
            assert_same_problem(p, single, it)
        else:
            t = assert_result_transfer(res, it)
            assert lt.assert_json(api_a.get_transfer(t["id"]), 200) == t
            transfers.append(t)
    assert state(api_a, [a, b, c, eur]) == final
    assert key_rows(sql, api_a, key) == (1, 4)
    # Entries of b follow the successful items in order.
    eb = api_a.all_entries(b)
    assert [(e["transfer_id"], e["amount"], e["balance_after"]) for e in reversed(eb)] == [
        (transfers[0]["id"], 60, 60), (transfers[1]["id"], -60, 0), (transfers[3]["id"], 50, 50)
    ]
    # The stored answer replays even after the failures would have succeeded.
    lt.assert_json(api_a.put_account(ghost, "USD", True), 201)
    lt.assert_first(api_a.credit(a, 1000))
    lt.assert_replay_of(r, post_batch(api_a, items, atomic=False, key=key))
    assert key_rows(sql, api_a, key) == (1, 4)


def test_non_atomic_all_items_fail(api_a, sql):
    a = api_a.funded_account(5)
    b = api_a.new_account()
    ghost = lt.uid("ghost-")
    items = [item(a, b, 6), item(ghost, b, 1), item(a, b, 1, "EUR")]
    key = lt.uid("nall-")
    r = post_batch(api_a, items, atomic=False, key=key)
    lt.assert_first(r, 201)
    results = assert_batch_ok(r, False, 3)
    assert_result_problem(results[0], 422, "insufficient-funds")
    assert_result_problem(results[1], 404, "account-not-found")
    assert_result_problem(results[2], 422, "currency-mismatch")
    assert state(api_a, [a, b]) == {a: (5, 1), b: (0, 0)}
    assert key_rows(sql, api_a, key) == (1, 0)
    lt.assert_first(api_a.credit(a, 100))
    lt.assert_replay_of(r, post_batch(api_a, items, atomic=False, key=key))
    assert state(api_a, [a, b]) == {a: (105, 2), b: (0, 0)}


@pytest.mark.parametrize(
    "kind,status,code",
    [("ghost-from", 404, "account-not-found"), ("ghost-to", 404, "account-not-found"),
     ("mismatch", 422, "currency-mismatch"), ("request-currency", 422, "currency-mismatch"),
     ("insufficient", 422, "insufficient-funds")],
)
def test_atomic_failure_is_the_items_problem(api_a, sql, kind, status, code):
    a = api_a.funded_account(100)
    b = api_a.new_account()
    eur = api_a.new_account("EUR")
    ghost = lt.uid("ghost-")
    bad = {
        "ghost-from": item(ghost, b, 1),
        "ghost-to": item(a, ghost, 1),
        "mismatch": item(a, eur, 1),
        "request-currency": item(a, b, 1, "JPY"),
        "insufficient": item(b, a, 71),  # b holds 70 after items 0..1
    }[kind]
    items = [item(a, b, 50), item(a, b, 20), bad, item(b, a, 1)]
    key = lt.uid("af-")
    r = post_batch(api_a, items, key=key)
    body = lt.assert_problem(r, status, code)
    assert lt.replayed(r) == "false"
    assert state(api_a, [a, b, eur]) == {a: (100, 1), b: (0, 0), eur: (0, 0)}
    assert key_rows(sql, api_a, key) == (1, 0)
    # The problem is the single transfer's (in the state where the item runs), prefixed with its index.
    lt.assert_first(api_a.transfer(a, b, 70))
    single = lt.assert_problem(api_a.post("/v1/transfers", bad), status, code)
    assert_same_problem(strip_prefix(body, 2), single, bad)
    lt.assert_replay_of(r, post_batch(api_a, items, key=key))


def test_atomic_lowest_failing_item_wins_whatever_the_kind(api_a, sql):
    a = api_a.funded_account(10)
    b = api_a.new_account()
    ghost = lt.uid("ghost-")
    cases = [
        ([item(a, b, 5), item(a, ghost, 1), item(a, b, 6)], 1, 404, "account-not-found"),
        ([item(a, b, 5), item(a, b, 6), item(a, ghost, 1)], 1, 422, "insufficient-funds"),
        ([item(a, b, 5), item(a, b, 5), item(a, b, 1), item(a, b, 1, "EUR")], 2, 422, "insufficient-funds"),
        ([item(a, b, 5), item(a, b, 1, "EUR"), item(a, b, 6)], 1, 422, "currency-mismatch"),
    ]
    for items, index, status, code in cases:
        key = lt.uid("lw-")
        body = lt.assert_problem(post_batch(api_a, items, key=key), status, code)
        assert body["detail"].startswith(f"transfers[{index}]: "), body
        assert key_rows(sql, api_a, key) == (1, 0)
    assert state(api_a, [a, b]) == {a: (10, 1), b: (0, 0)}


def test_batch_of_unknown_accounts_only(api_a, sql):
    g1, g2 = lt.uid("ghost-"), lt.uid("ghost-")
    items = [item(g1, g2, 1), item(g2, g1, 1)]
    key = lt.uid("gh-")
    r = post_batch(api_a, items, key=key)
    body = lt.assert_problem(r, 404, "account-not-found")
    assert body["detail"] == f"transfers[0]: Account {g1} does not exist."
    key_n = lt.uid("ghn-")
    r = post_batch(api_a, items, atomic=False, key=key_n)
    lt.assert_first(r, 201)
    results = assert_batch_ok(r, False, 2)
    assert assert_result_problem(results[0], 404, "account-not-found")["detail"] == f"Account {g1} does not exist."
    assert assert_result_problem(results[1], 404, "account-not-found")["detail"] == f"Account {g2} does not exist."
    assert key_rows(sql, api_a, key) == (1, 0) and key_rows(sql, api_a, key_n) == (1, 0)
    for g in (g1, g2):
        lt.assert_problem(api_a.get_account(g), 404, "account-not-found")


# balance-overflow: an allow_negative source pays 1,024 x (2^53-1) into a sink through two batches of the service
# itself (1,000 + 24 items), so the sink holds 2^63 - 1024 and the source -(2^63 - 1024).

@pytest.fixture(scope="module")
def near_limits(server, clients):
    name, token = clients["a"]
    api = lt.Api(server.base, token, name)
    currency = "XBV"
    neg = api.new_account(currency, allow_negative=True, prefix="neg-")
    big = api.new_account(currency, prefix="big-")
    r = post_batch(api, [item(neg, big, lt.AMOUNT_MAX, currency)] * 1000)
    assert_batch_ok(r, True, 1000)
    r = post_batch(api, [item(neg, big, lt.AMOUNT_MAX, currency)] * 24, atomic=False)
    assert_batch_ok(r, False, 24)
    return api, currency, neg, big


SEEDED = 1024 * lt.AMOUNT_MAX  # 2^63 - 1024


def test_seeded_near_limits(near_limits):
    api, currency, neg, big = near_limits
    assert SEEDED == lt.INT64_MAX - 1023
    assert state(api, [neg, big]) == {neg: (-SEEDED, 1024), big: (SEEDED, 1024)}


def test_balance_overflow_per_item_and_atomic(near_limits, sql):
    api, currency, neg, big = near_limits
    other = api.new_account(currency, allow_negative=True, prefix="oth-")
    items = [
        item(neg, big, 1023, currency),  # 0 ok: big at 2^63-1, exactly the maximum
        item(neg, big, 1, currency),     # 1 overflow (to)
        item(big, other, 1023, currency),  # 2 ok: big back to 2^63-1024, other 1023
        item(neg, other, 1, currency),   # 3 ok: neg from -(2^63-1) to exactly -2^63
        item(neg, other, 1, currency),   # 4 overflow: neg would go below -2^63
    ]
    key = lt.uid("ovf-")
    r = post_batch(api, items, atomic=True, key=key)
    body = lt.assert_problem(r, 422, "balance-overflow")
    assert body["detail"].startswith("transfers[1]: ")
    assert state(api, [neg, big, other]) == {neg: (-SEEDED, 1024), big: (SEEDED, 1024), other: (0, 0)}
    assert key_rows(sql, api, key) == (1, 0)
    lt.assert_replay_of(r, post_batch(api, items, atomic=True, key=key))

    key = lt.uid("ovfn-")
    r = post_batch(api, items, atomic=False, key=key)
    lt.assert_first(r, 201)
    results = assert_batch_ok(r, False, 5)
    assert [res["status"] for res in results] == [201, 422, 201, 201, 422]
    p1 = assert_result_problem(results[1], 422, "balance-overflow")
    p4 = assert_result_problem(results[4], 422, "balance-overflow")
    assert p1 == p4 == strip_prefix(body, 1)
    assert state(api, [neg, big, other]) == {
        neg: (lt.INT64_MIN, 1026), big: (SEEDED, 1026), other: (1024, 2)
    }
    # The same problem a single transfer gets.
    single = lt.assert_problem(api.transfer(neg, other, 1, currency), 422, "balance-overflow")
    assert single == p4
    assert key_rows(sql, api, key) == (1, 3)
    lt.assert_replay_of(r, post_batch(api, items, atomic=False, key=key))
    # Leave the accounts as they were seeded (minus the sum-zero moves), for readability of later runs.
    lt.assert_first(post_batch(api, [item(other, neg, 1024, currency)]), 201)
    assert state(api, [neg, other]) == {neg: (-SEEDED, 1027), other: (0, 3)}


# ---------------------------------------------------------------------------------------------------------------------
# 6. Concurrency


def storm_items(a, b, n=50):
    return [item(a, b, 1 + (i % 5), metadata={"i": i}) for i in range(n)]


def assert_storm_once(responses, first_status=201):
    no_5xx(responses)
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {first_status, 409}, f"only the outcome or 409 in progress: {statuses}; " + "; ".join(
        lt.describe(r) for r in responses if r.status_code not in (first_status, 409)
    )[:2000]
    for r in responses:
        if r.status_code == 409:
            lt.assert_problem(r, 409, "idempotency-key-in-progress")
    done = [r for r in responses if r.status_code == first_status]
    assert done, "at least one request must complete"
    assert len({r.content for r in done}) == 1, "every answer must be the same bytes"
    flags = Counter(lt.replayed(r) for r in done)
    assert flags["false"] <= 1 and flags["false"] + flags["true"] == len(done), f"Idempotent-Replayed: {flags}"
    return done


@pytest.mark.parametrize("two_processes", [False, True], ids=["one-process", "two-processes"])
def test_storm_same_batch_one_key(api_a, sql, request, two_processes):
    apis = [api_a]
    if two_processes:
        apis.append(api_a.clone(request.getfixturevalue("second_server").base))
    a = api_a.funded_account(1000)
    b = api_a.new_account()
    items = storm_items(a, b)
    total = sum(it["amount"] for it in items)
    key = lt.uid("storm-")

    def make(i):
        api = apis[i % len(apis)].clone()
        return lambda: post_batch(api, items, key=key)

    responses = lt.parallel([make(i) for i in range(30)])
    done = assert_storm_once(responses)
    assert_batch_ok(done[0], True, 50)
    assert state(api_a, [a, b]) == {a: (1000 - total, 51), b: (total, 50)}
    assert key_rows(sql, api_a, key) == (1, 50)
    replay = post_batch(api_a, items, key=key)
    lt.assert_replay_of(done[0], replay)
    executed = [r for r in responses if lt.replayed(r) == "false"]
    assert len(executed) == 1, "exactly one of the storm executed (and the later replay did not)"


def test_storm_atomic_failure_one_key_two_processes(api_a, sql, second_server):
    api2 = api_a.clone(second_server.base)
    a = api_a.funded_account(50)
    b = api_a.new_account()
    items = storm_items(a, b, 40)  # needs 120
    key = lt.uid("stormf-")

    def make(i):
        api = (api_a if i % 2 else api2).clone()
        return lambda: post_batch(api, items, key=key)

    responses = lt.parallel([make(i) for i in range(24)])
    done = assert_storm_once(responses, 422)
    body = lt.assert_problem(done[0], 422, "insufficient-funds")
    spent, failing = 0, None
    for i, it in enumerate(items):
        if spent + it["amount"] > 50:
            failing = i
            break
        spent += it["amount"]
    assert body["detail"].startswith(f"transfers[{failing}]: "), body
    assert state(api_a, [a, b]) == {a: (50, 1), b: (0, 0)}
    assert key_rows(sql, api_a, key) == (1, 0)
    assert sum(1 for r in responses if lt.replayed(r) == "false") == 1


def test_storm_batch_and_single_race_for_one_key(api_a, sql, second_server):
    """One key, a batch and a single transfer racing on two processes: exactly one wins; copies of the loser get
    422 idempotency-key-reused."""
    api2 = api_a.clone(second_server.base)
    a = api_a.funded_account(1000)
    b = api_a.new_account()
    items = storm_items(a, b, 20)
    key = lt.uid("race-")

    def make(i):
        api = (api_a if i % 2 else api2).clone()
        if (i // 2) % 2:
            return lambda: ("batch", post_batch(api, items, key=key))
        return lambda: ("single", api.transfer(a, b, 7, key=key))

    results = lt.parallel([make(i) for i in range(24)])
    no_5xx([r for _, r in results])
    winners = {kind for kind, r in results if r.status_code == 201 and lt.replayed(r) == "false"}
    assert len(winners) == 1, f"exactly one request may execute: {[(k, r.status_code) for k, r in results]}"
    winner = winners.pop()
    for kind, r in results:
        if kind == winner:
            assert r.status_code in (201, 409), lt.describe(r)
        else:
            lt.assert_problem(r, 422, "idempotency-key-reused")
    total = sum(it["amount"] for it in items) if winner == "batch" else 7
    assert api_a.balance(a) == 1000 - total and api_a.balance(b) == total
    assert key_rows(sql, api_a, key) == (1, 20 if winner == "batch" else 1)


def test_opposite_order_batches_do_not_deadlock(api_a, second_server):
    """Batches walking A->B->C->D and D->C->B->A, plus single transfers, all at once on two processes, each with its
    own key: no deadlock, no 5xx, every one succeeds, and the balances are exact."""
    api2 = api_a.clone(second_server.base)
    accts = [api_a.funded_account(100_000, prefix=p) for p in ("zz-", "aa-", "mm-", "bb-")]
    A, B, C, D = accts
    forward = [item(A, B, 7), item(B, C, 7), item(C, D, 7), item(D, A, 2)]
    backward = [item(D, C, 5), item(C, B, 5), item(B, A, 5), item(A, D, 1)]
    calls = []
    for i in range(36):
        api = (api_a if i % 2 else api2).clone()
        kind = i % 3
        if kind == 0:
            calls.append((forward, lambda api=api: post_batch(api, forward)))
        elif kind == 1:
            calls.append((backward, lambda api=api: post_batch(api, backward, atomic=False)))
        else:
            calls.append(([item(C, A, 3)], lambda api=api: api.transfer(C, A, 3)))
    responses = lt.parallel([fn for _, fn in calls])
    no_5xx(responses)
    assert all(r.status_code == 201 for r in responses), [lt.describe(r) for r in responses if r.status_code != 201]
    for (items, _), r in zip(calls, responses):
        if r.request.url.endswith(BATCH):
            assert all(res["status"] == 201 for res in r.json()["results"]), lt.describe(r)
    expected = {x: 100_000 for x in accts}
    versions = {x: 1 for x in accts}
    for items, _ in calls:
        for it in items:
            expected[it["from"]] -= it["amount"]
            expected[it["to"]] += it["amount"]
            versions[it["from"]] += 1
            versions[it["to"]] += 1
    assert state(api_a, accts) == {x: (expected[x], versions[x]) for x in accts}
    for x in accts:
        entries = api_a.all_entries(x)
        assert len(entries) == versions[x]
        running = 0
        for e in reversed(entries):
            running += e["amount"]
            assert e["balance_after"] == running


def test_parallel_non_atomic_batches_never_overdraw(api_a, second_server):
    """Parallel non-atomic batches draining one account: exactly what fits is written."""
    api2 = api_a.clone(second_server.base)
    a = api_a.funded_account(100)
    b = api_a.new_account()
    items = [item(a, b, 10)] * 3

    def make(i):
        api = (api_a if i % 2 else api2).clone()
        return lambda: post_batch(api, items, atomic=False)

    responses = lt.parallel([make(i) for i in range(8)])
    no_5xx(responses)
    statuses = Counter()
    for r in responses:
        for res in assert_batch_ok(r, False, 3):
            statuses[res["status"]] += 1
            if res["status"] == 422:
                assert_result_problem(res, 422, "insufficient-funds")
    assert statuses == Counter({201: 10, 422: 14})
    assert state(api_a, [a, b]) == {a: (0, 11), b: (100, 10)}


# ---------------------------------------------------------------------------------------------------------------------
# 7. Route


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_batch_route_wrong_method_is_405(api_a, method):
    r = api_a.request(method, BATCH)
    lt.assert_problem(r, 405, "method-not-allowed")
    allow = {m.strip() for m in r.headers.get("Allow", "").split(",") if m.strip()}
    assert "POST" in allow and method not in allow, f"Allow: {r.headers.get('Allow')!r}"
    assert allow <= {"POST", "HEAD", "OPTIONS"}


def test_batch_route_get_without_auth_is_401(anon):
    lt.assert_problem(anon.request("GET", BATCH), 401, "unauthorized")


def test_transfer_lookup_routes_still_work(api_a):
    lt.assert_problem(api_a.get_transfer("999999999999"), 404, "transfer-not-found")
    lt.assert_problem(api_a.post("/v1/transfers/batch/x", batch_body([item("a", "b", 1)])), 404, "not-found")


# ---------------------------------------------------------------------------------------------------------------------
# 8. In progress (409), server-side failure (503), retention purge


def test_key_in_progress_is_409_then_replays(api_a, main_db, start_server):
    srv = start_server(["--no-migrate", "--key-wait-ms", "300"])
    api = api_a.clone(srv.base)
    a = api.funded_account(100, "XBI")
    b = api.new_account("XBI")
    items = [item(a, b, 10, "XBI"), item(b, a, 3, "XBI")]
    key = lt.uid("busy-")
    result = {}
    with lt.holding_account_lock(main_db, api.client, a):
        t = threading.Thread(target=lambda: result.setdefault("first", post_batch(api.clone(), items, key=key)))
        t.start()
        lt.wait_for_lock_waiter(main_db)
        started = time.monotonic()
        second = post_batch(api.clone(), items, key=key)
        elapsed = time.monotonic() - started
        lt.assert_problem(second, 409, "idempotency-key-in-progress")
        assert second.headers.get("Retry-After", "").strip().isdigit(), lt.describe(second)
        assert elapsed < 5, f"the wait must be bounded by --key-wait-ms 300, took {elapsed:.1f}s"
        # A single transfer under the same key is also held off while the batch runs.
        lt.assert_problem(api.clone().transfer(a, b, 1, "XBI", key=key), 409, "idempotency-key-in-progress")
        assert "first" not in result
    t.join(timeout=30)
    first = result["first"]
    lt.assert_first(first, 201)
    assert_batch_ok(first, True, 2)
    lt.assert_replay_of(first, post_batch(api, items, key=key))
    lt.assert_problem(api.transfer(a, b, 1, "XBI", key=key), 422, "idempotency-key-reused")
    assert state(api, [a, b]) == {a: (93, 3), b: (7, 2)}


def test_statement_timeout_is_503_and_stores_nothing(api_a, main_db, sql, start_server):
    srv = start_server(["--no-migrate", "--statement-timeout-ms", "500"])
    api = api_a.clone(srv.base)
    a = api.funded_account(100, "XBS")
    b = api.new_account("XBS")
    items = [item(b, a, 1, "XBS", {"k": 1}), item(a, b, 10, "XBS")]  # item 0 fails unless item order is ignored
    key = lt.uid("slow-")
    with lt.holding_account_lock(main_db, api.client, b):
        for atomic in (True, False):
            r = post_batch(api, items, atomic=atomic, key=key if atomic else key + "n")
            lt.assert_problem(r, 503, "database-unavailable")
            assert r.headers.get("Retry-After", "").strip().isdigit(), lt.describe(r)
    assert state(api, [a, b]) == {a: (100, 1), b: (0, 0)}
    assert key_rows(sql, api, key) == (0, 0) and key_rows(sql, api, key + "n") == (0, 0)
    # The keys execute afresh (503s retried: on a loaded machine a statement may still pass the 500 ms bound).
    r = lt.retrying_503(lambda: post_batch(api, items, key=key))
    lt.assert_problem(r, 422, "insufficient-funds")
    assert lt.replayed(r) == "false"
    r = lt.retrying_503(lambda: post_batch(api, items, atomic=False, key=key + "n"))
    lt.assert_first(r, 201)
    assert [res["status"] for res in assert_batch_ok(r, False, 2)] == [422, 201]
    assert state(api, [a, b]) == {a: (90, 2), b: (10, 1)}


def purge_key(sql, api, key):
    """What the retention purge does to one stored response (ledger.purge_idempotency_keys deletes rows)."""
    sql(
        "DELETE FROM ledger.idempotency_keys WHERE client_id = {} AND key = {}".format(
            lt.sql_literal(api.client), lt.sql_literal(key)
        )
    )
    assert key_rows(sql, api, key)[0] == 0


def test_purged_batch_key_never_makes_transfers_twice(api_a, sql):
    a = api_a.funded_account(100)
    b = api_a.new_account()
    items = [item(a, b, 10), item(b, a, 4, metadata={"x": [1]})]
    key = lt.uid("purge-")
    first = post_batch(api_a, items, key=key)
    lt.assert_first(first, 201)
    purge_key(sql, api_a, key)
    again = post_batch(api_a, items, key=key)
    lt.assert_replay_of(first, again)  # the same transfers, the same bytes, nothing made again
    assert state(api_a, [a, b]) == {a: (94, 3), b: (6, 2)}
    assert key_rows(sql, api_a, key)[1] == 2
    # Another request under the purged key: reused, on both routes.
    lt.assert_problem(post_batch(api_a, [item(a, b, 11)], key=key), 422, "idempotency-key-reused")
    lt.assert_problem(api_a.transfer(a, b, 10, key=key), 422, "idempotency-key-reused")
    assert state(api_a, [a, b]) == {a: (94, 3), b: (6, 2)}
    # A purged single transfer's key cannot be taken over by a batch either.
    key2 = lt.uid("purge1-")
    lt.assert_first(api_a.transfer(a, b, 1, key=key2), 201)
    purge_key(sql, api_a, key2)
    lt.assert_problem(post_batch(api_a, [item(a, b, 1)], key=key2), 422, "idempotency-key-reused")
    assert state(api_a, [a, b]) == {a: (93, 4), b: (7, 3)}


def test_purged_non_atomic_batch_keeps_its_transfers(api_a, sql):
    a = api_a.funded_account(15)
    b = api_a.new_account()
    items = [item(a, b, 10), item(a, b, 10), item(b, a, 1)]
    key = lt.uid("purgen-")
    first = post_batch(api_a, items, atomic=False, key=key)
    assert [res["status"] for res in assert_batch_ok(first, False, 3)] == [201, 422, 201]
    purge_key(sql, api_a, key)
    again = post_batch(api_a, items, atomic=False, key=key)
    results = assert_batch_ok(again, False, 3)
    first_results = first.json()["results"]
    assert results[0] == first_results[0] and results[2] == first_results[2], "made transfers are answered, not redone"
    assert results[1] == first_results[1], "the failed item still fails (a holds 6)"
    assert state(api_a, [a, b]) == {a: (6, 3), b: (9, 2)}
    assert key_rows(sql, api_a, key)[1] == 2
