"""Conditional requests: ETag / If-None-Match on GET /v1/accounts/{id}, and If-Match on credits, debits,
transfers and holds (412 version-mismatch, stored; part of the fingerprint; validation and precedence; races)."""

import json

import pytest

import ledgertest as lt


def assert_412(r, current_version: int) -> dict:
    assert r.status_code == 412, f"expected 412 version-mismatch; got {lt.describe(r)}"
    ctype = r.headers.get("Content-Type", "")
    assert ctype.split(";")[0].strip() == "application/problem+json", lt.describe(r)
    body = r.json()
    assert set(body) == lt.PROBLEM_KEYS | {"current_version"}, f"412 members: {sorted(body)}: {lt.describe(r)}"
    assert body["code"] == "version-mismatch" and body["status"] == 412, lt.describe(r)
    for field in ("type", "title", "detail"):
        assert isinstance(body[field], str) and body[field], lt.describe(r)
    assert type(body["current_version"]) is int and body["current_version"] == current_version, lt.describe(r)
    return body


def im(tag):
    return {"If-Match": tag}


def debit(api, account, amount, tag=None, key=None, currency="USD"):
    return api.post("/v1/debits", {"account": account, "amount": amount, "currency": currency}, key,
                    headers=im(tag) if tag is not None else None)


def credit(api, account, amount, tag=None, key=None, currency="USD"):
    return api.post("/v1/credits", {"account": account, "amount": amount, "currency": currency}, key,
                    headers=im(tag) if tag is not None else None)


def transfer(api, from_, to, amount, tag=None, key=None, currency="USD"):
    return api.post("/v1/transfers", {"from": from_, "to": to, "amount": amount, "currency": currency}, key,
                    headers=im(tag) if tag is not None else None)


def hold(api, from_, amount, tag=None, key=None, currency="USD", to=None):
    body = {"from": from_, "amount": amount, "currency": currency}
    if to is not None:
        body["to"] = to
    return api.post("/v1/holds", body, key, headers=im(tag) if tag is not None else None)


def state(api, account):
    a = api.account(account)
    return a["balance"], a["held"], a["version"]


# ---------------------------------------------------------------------------------------------------------------------
# ETag and If-None-Match


def test_etag_is_the_version(api_a):
    alice = api_a.new_account()
    r = api_a.get_account(alice)
    lt.assert_json(r, 200)
    assert r.headers.get("ETag") == '"0"', lt.describe(r)
    lt.assert_first(api_a.credit(alice, 100))
    lt.assert_first(api_a.debit(alice, 30))
    r = api_a.get_account(alice)
    assert r.headers.get("ETag") == f'"{r.json()["version"]}"' == '"2"', lt.describe(r)


def test_etag_ignores_holds(api_a):
    """Holds do not change version, so they do not change the ETag."""
    alice = api_a.funded_account(100)
    lt.assert_json(hold(api_a, alice, 40), 201)
    r = api_a.get_account(alice)
    assert r.headers.get("ETag") == '"1"' and r.json()["held"] == 40, lt.describe(r)


@pytest.mark.parametrize("inm", ['"3"', '"1", "3"', '"1","3" , "9"', 'W/"3"', 'W/"2", W/"3"', "*", '"9" ,"3"'])
def test_if_none_match_hit_is_304(api_a, inm):
    alice = api_a.funded_account(100)
    lt.assert_first(api_a.debit(alice, 10))
    lt.assert_first(api_a.debit(alice, 10))
    r = api_a.request("GET", f"/v1/accounts/{alice}", headers={"If-None-Match": inm})
    assert r.status_code == 304, f"If-None-Match {inm!r}: {lt.describe(r)}"
    assert r.headers.get("ETag") == '"3"', lt.describe(r)
    assert r.content == b"", f"a 304 has no body: {r.content!r}"


@pytest.mark.parametrize("inm", ['"2"', '"4"', 'W/"2", "4"', '"03"', "3", '"3 "', '""'])
def test_if_none_match_miss_is_200(api_a, inm):
    alice = api_a.funded_account(100)
    lt.assert_first(api_a.debit(alice, 10))
    lt.assert_first(api_a.debit(alice, 10))
    r = api_a.request("GET", f"/v1/accounts/{alice}", headers={"If-None-Match": inm})
    body = lt.assert_json(r, 200)
    assert r.headers.get("ETag") == '"3"' and body["version"] == 3 and body["balance"] == 80


def test_if_none_match_after_a_change(api_a):
    alice = api_a.funded_account(100)
    etag = api_a.get_account(alice).headers["ETag"]
    assert api_a.request("GET", f"/v1/accounts/{alice}", headers={"If-None-Match": etag}).status_code == 304
    lt.assert_first(api_a.debit(alice, 1))
    r = api_a.request("GET", f"/v1/accounts/{alice}", headers={"If-None-Match": etag})
    assert lt.assert_json(r, 200)["balance"] == 99 and r.headers["ETag"] == '"2"'


def test_if_none_match_on_unknown_account_is_404(api_a):
    r = api_a.request("GET", f"/v1/accounts/{lt.uid('ghost-')}", headers={"If-None-Match": "*"})
    lt.assert_problem(r, 404, "account-not-found")


# ---------------------------------------------------------------------------------------------------------------------
# If-Match: match executes, mismatch is a stored 412


@pytest.mark.parametrize("kind", ["debit", "credit", "transfer", "hold"])
def test_if_match_match_executes(api_a, kind):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    lt.assert_first(api_a.debit(alice, 1))  # version 2
    call = {
        "debit": lambda tag, k=None: debit(api_a, alice, 10, tag, k),
        "credit": lambda tag, k=None: credit(api_a, alice, 10, tag, k),
        "transfer": lambda tag, k=None: transfer(api_a, alice, bob, 10, tag, k),
        "hold": lambda tag, k=None: hold(api_a, alice, 10, tag, k, to=bob),
    }[kind]
    r = call('"2"')
    lt.assert_first(r, 201)
    if kind == "hold":
        assert state(api_a, alice) == (999, 10, 2)
        # A hold leaves the version, so the same tag still matches.
        lt.assert_first(call('"2"'), 201)
    else:
        assert state(api_a, alice)[2] == 3
        k = lt.uid("k-")
        first = call('"2"', k)
        assert_412(first, 3)
        assert lt.replayed(first) == "false"
    # The payee's version is not what If-Match names.
    if kind == "transfer":
        assert api_a.account(bob)["version"] == 1
        lt.assert_first(call('"3"'), 201)


@pytest.mark.parametrize("kind", ["debit", "credit", "transfer", "hold"])
def test_if_match_mismatch_is_stored_412(api_a, kind):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    call = {
        "debit": lambda tag, k: debit(api_a, alice, 10, tag, k),
        "credit": lambda tag, k: credit(api_a, alice, 10, tag, k),
        "transfer": lambda tag, k: transfer(api_a, alice, bob, 10, tag, k),
        "hold": lambda tag, k: hold(api_a, alice, 10, tag, k, to=bob),
    }[kind]
    k = lt.uid("k-")
    first = call('"0"', k)
    assert_412(first, 1)
    assert lt.replayed(first) == "false"
    assert state(api_a, alice) == (1000, 0, 1) and state(api_a, bob) == (0, 0, 0), "a 412 moves nothing"
    # The version moves on; the retry still replays the stored 412 and executes nothing.
    lt.assert_first(api_a.debit(alice, 1))
    again = call('"0"', k)
    lt.assert_replay_of(first, again)
    assert_412(again, 1)  # the stored answer, not today's version
    # A new attempt takes a new key.
    lt.assert_first(call('"2"', lt.uid("k-")), 201)


def test_stored_412_replays_even_once_the_version_matches(api_a):
    alice = api_a.funded_account(1000)
    k = lt.uid("k-")
    first = debit(api_a, alice, 5, '"3"', k)
    assert_412(first, 1)
    lt.assert_first(api_a.debit(alice, 1))
    lt.assert_first(api_a.debit(alice, 1))
    assert api_a.account(alice)["version"] == 3
    lt.assert_replay_of(first, debit(api_a, alice, 5, '"3"', k))
    assert state(api_a, alice) == (998, 0, 3)


def test_credit_if_match_names_the_account(api_a):
    alice = api_a.new_account()
    assert_412(credit(api_a, alice, 5, '"1"'), 0)
    lt.assert_first(credit(api_a, alice, 5, '"0"'))
    assert state(api_a, alice) == (5, 0, 1)


def test_largest_if_match_values(api_a):
    alice = api_a.funded_account(10)
    assert_412(debit(api_a, alice, 1, '"9223372036854775807"'), 1)
    # 19 digits is still a well-formed tag, even above the 64-bit range: it just does not match.
    assert_412(debit(api_a, alice, 1, '"9999999999999999999"'), 1)
    lt.assert_problem(debit(api_a, alice, 1, '"10000000000000000000"'), 400, "invalid-if-match")
    assert state(api_a, alice) == (10, 0, 1)


# ---------------------------------------------------------------------------------------------------------------------
# The fingerprint covers If-Match


def test_fingerprint_covers_if_match(api_a):
    alice = api_a.funded_account(1000)
    k = lt.uid("k-")
    first = debit(api_a, alice, 10, '"1"', k)
    lt.assert_first(first, 201)
    lt.assert_replay_of(first, debit(api_a, alice, 10, '"1"', k))
    lt.assert_problem(debit(api_a, alice, 10, '"2"', k), 422, "idempotency-key-reused")
    lt.assert_problem(debit(api_a, alice, 10, None, k), 422, "idempotency-key-reused")
    k2 = lt.uid("k-")
    lt.assert_first(debit(api_a, alice, 10, None, k2), 201)
    lt.assert_problem(debit(api_a, alice, 10, '"3"', k2), 422, "idempotency-key-reused")
    # Stored 412s too.
    k3 = lt.uid("k-")
    assert_412(debit(api_a, alice, 10, '"0"', k3), 3)
    lt.assert_problem(debit(api_a, alice, 10, '"3"', k3), 422, "idempotency-key-reused")
    lt.assert_problem(debit(api_a, alice, 10, None, k3), 422, "idempotency-key-reused")
    assert state(api_a, alice) == (980, 0, 3)


def test_fingerprint_covers_if_match_on_holds(api_a):
    alice = api_a.funded_account(1000)
    k = lt.uid("k-")
    lt.assert_first(hold(api_a, alice, 10, '"1"', k), 201)
    lt.assert_problem(hold(api_a, alice, 10, None, k), 422, "idempotency-key-reused")
    lt.assert_problem(hold(api_a, alice, 10, '"0"', k), 422, "idempotency-key-reused")
    assert state(api_a, alice) == (1000, 10, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Validation and precedence


@pytest.mark.parametrize("tag", ['W/"1"', "*", '"01"', "1", '"1", "2"', '"1","1"', '""', '"-1"', '"+1"', '"1.0"',
                                 '"1 "', "'1'", '"1', '1"', '" 1"', '"0x1"', '"10000000000000000000"'])
@pytest.mark.parametrize("kind", ["debit", "credit", "transfer", "hold"])
def test_invalid_if_match(api_a, tag, kind):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    k = lt.uid("k-")
    call = {
        "debit": lambda tag, k: debit(api_a, alice, 10, tag, k),
        "credit": lambda tag, k: credit(api_a, alice, 10, tag, k),
        "transfer": lambda tag, k: transfer(api_a, alice, bob, 10, tag, k),
        "hold": lambda tag, k: hold(api_a, alice, 10, tag, k),
    }[kind]
    r = call(tag, k)
    lt.assert_problem(r, 400, "invalid-if-match")
    assert lt.replayed(r) is None
    assert state(api_a, alice) == (1000, 0, 1)
    # Not stored: the key is still free.
    lt.assert_first(call('"1"', k), 201)


def test_two_if_match_headers_are_invalid(api_a, server):
    alice = api_a.funded_account(1000)
    body = json.dumps({"account": alice, "amount": 1, "currency": "USD"}).encode()
    headers = [("Authorization", f"Bearer {api_a.token}"), ("Idempotency-Key", lt.uid("k-")),
               ("Content-Type", "application/json"), ("If-Match", '"1"'), ("If-Match", '"1"')]
    import http.client
    host, port = server.base.replace("http://", "").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=lt.TIMEOUT)
    try:
        conn.putrequest("POST", "/v1/debits")
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 400 and data["code"] == "invalid-if-match", (resp.status, data)
    assert api_a.balance(alice) == 1000


def test_missing_key_before_invalid_if_match(api_a):
    alice = api_a.funded_account(1000)
    r = api_a.request("POST", "/v1/debits", body={"account": alice, "amount": 1, "currency": "USD"},
                      headers=im('W/"1"'))
    lt.assert_problem(r, 400, "idempotency-key-missing")
    r = api_a.request("POST", "/v1/debits", body={"account": alice, "amount": 1, "currency": "USD"},
                      key="bad key", headers=im('W/"1"'))
    lt.assert_problem(r, 400, "idempotency-key-invalid")


@pytest.mark.parametrize("raw", ["not json", '{"account": "x", "amount": 0, "currency": "USD"}',
                                 '{"account": "x", "amount": 1, "currency": "USD", "zzz": 1}'])
def test_invalid_if_match_before_invalid_body(api_a, raw):
    r = api_a.post("/v1/debits", raw=raw, headers=im("*"))
    lt.assert_problem(r, 400, "invalid-if-match")
    r = api_a.post("/v1/holds", raw=raw, headers=im('"01"'))
    lt.assert_problem(r, 400, "invalid-if-match")


def test_auth_and_route_before_if_match(api_a, anon):
    r = anon.request("POST", "/v1/debits", body={}, key=lt.uid("k-"), headers=im("*"))
    lt.assert_problem(r, 401, "unauthorized")
    r = api_a.request("POST", "/v1/nowhere", body={}, key=lt.uid("k-"), headers=im("*"))
    lt.assert_problem(r, 404, "not-found")


def test_not_found_before_412(api_a):
    ghost = lt.uid("ghost-")
    k = lt.uid("k-")
    first = debit(api_a, ghost, 1, '"7"', k)
    lt.assert_problem(first, 404, "account-not-found")
    lt.assert_replay_of(first, debit(api_a, ghost, 1, '"7"', k))
    alice = api_a.funded_account(100)
    # The payer exists with another version, the payee does not: 404 first.
    lt.assert_problem(transfer(api_a, alice, ghost, 1, '"7"'), 404, "account-not-found")
    lt.assert_problem(hold(api_a, alice, 1, '"7"', to=ghost), 404, "account-not-found")
    lt.assert_problem(credit(api_a, ghost, 1, '"7"'), 404, "account-not-found")


def test_412_before_currency_mismatch_and_insufficient_funds(api_a):
    alice = api_a.funded_account(100)
    eur = api_a.new_account("EUR")
    assert_412(debit(api_a, alice, 1, '"0"', currency="EUR"), 1)
    assert_412(credit(api_a, alice, 1, '"0"', currency="EUR"), 1)
    assert_412(transfer(api_a, alice, eur, 1, '"0"'), 1)
    assert_412(hold(api_a, alice, 1, '"0"', currency="EUR"), 1)
    assert_412(debit(api_a, alice, 101, '"0"'), 1)
    assert_412(transfer(api_a, alice, api_a.new_account(), 101, '"0"'), 1)
    assert_412(hold(api_a, alice, 101, '"0"'), 1)
    # With the right version the business outcome follows.
    lt.assert_problem(debit(api_a, alice, 1, '"1"', currency="EUR"), 422, "currency-mismatch")
    lt.assert_problem(debit(api_a, alice, 101, '"1"'), 422, "insufficient-funds")
    lt.assert_problem(hold(api_a, alice, 101, '"1"'), 422, "insufficient-funds")
    assert state(api_a, alice) == (100, 0, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Races


@pytest.mark.parametrize("kind", ["debit", "transfer", "credit"])
def test_race_on_one_version(api_a, kind):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()

    def call(c):
        if kind == "debit":
            return debit(c, alice, 10, '"1"')
        if kind == "credit":
            return credit(c, alice, 10, '"1"')
        return transfer(c, alice, bob, 10, '"1"')

    results = lt.parallel([lambda c=api_a.clone(): call(c) for _ in range(8)])
    wins = [r for r in results if r.status_code == 201]
    assert len(wins) == 1, [(r.status_code, r.text[:120]) for r in results]
    for r in results:
        if r.status_code != 201:
            assert_412(r, 2)
    assert api_a.account(alice)["version"] == 2


def test_compare_and_swap_loop(api_a):
    """Several writers each retry with a fresh key and the current version until they succeed: every write lands
    exactly once and the versions count them."""
    alice = api_a.funded_account(1000)

    def writer(c):
        tries = 0
        while tries < 200:
            tries += 1
            v = c.account(alice)["version"]
            r = debit(c, alice, 1, f'"{v}"')
            if r.status_code == 201:
                return tries
            assert_412(r, r.json()["current_version"])
        raise AssertionError("never won")

    lt.parallel([lambda c=api_a.clone(): writer(c) for _ in range(5)])
    assert state(api_a, alice) == (995, 0, 6)


def test_concurrent_holds_with_one_if_match_all_execute(api_a):
    """A hold does not change the version, so every hold naming the current version executes (funds allowing)."""
    alice = api_a.funded_account(1000)
    results = lt.parallel([lambda c=api_a.clone(): hold(c, alice, 100, '"1"') for _ in range(8)])
    assert [r.status_code for r in results] == [201] * 8, [r.text[:120] for r in results]
    assert state(api_a, alice) == (1000, 800, 1)


def test_race_on_one_version_across_replicas(api_a, second_server):
    alice = api_a.funded_account(1000)
    apis = [api_a.clone(), api_a.clone(second_server.base)] * 4
    results = lt.parallel([lambda c=c: debit(c, alice, 10, '"1"') for c in apis])
    assert sum(r.status_code == 201 for r in results) == 1, [(r.status_code, r.text[:120]) for r in results]
    for r in results:
        if r.status_code != 201:
            assert_412(r, 2)
    assert state(api_a, alice) == (990, 0, 2)


def test_if_none_match_other_clients_account_is_404(api_a, api_b):
    alice = api_a.funded_account(10)
    r = api_b.request("GET", f"/v1/accounts/{alice}", headers={"If-None-Match": '"1"'})
    lt.assert_problem(r, 404, "account-not-found")
