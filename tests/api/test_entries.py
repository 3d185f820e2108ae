"""GET /v1/accounts/{id}/entries: newest first, signed amounts, balance_after, limit and cursor paging."""

import base64

import pytest

import ledgertest as lt


def page(api, account, limit=None, cursor=None):
    r = api.entries(account, limit=limit, cursor=cursor)
    body = lt.assert_json(r, 200)
    assert set(body) == {"entries", "next_cursor"}, f"entries page keys: {sorted(body)}"
    assert isinstance(body["entries"], list)
    assert body["next_cursor"] is None or (isinstance(body["next_cursor"], str) and body["next_cursor"]), body
    for e in body["entries"]:
        lt.assert_entry_shape(e)
    return body


def assert_last_page(api, account, body, limit=None):
    """Nothing follows this page: next_cursor is null, or (tolerated) leads to an empty last page."""
    if body["next_cursor"] is None:
        return
    after = page(api, account, limit=limit, cursor=body["next_cursor"])
    assert after == {"entries": [], "next_cursor": None}, f"entries after the last page: {after}"


def test_new_account_has_no_entries(api_a):
    account = api_a.new_account()
    body = page(api_a, account)
    assert body == {"entries": [], "next_cursor": None}


def test_entries_newest_first_signed_with_balance_after(api_a):
    alice = api_a.new_account()
    bob = api_a.new_account()
    t1 = lt.assert_json(api_a.credit(alice, 1000), 201)
    t2 = lt.assert_json(api_a.debit(alice, 300), 201)
    t3 = lt.assert_json(api_a.transfer(alice, bob, 200), 201)
    t4 = lt.assert_json(api_a.transfer(bob, alice, 50), 201)
    body = page(api_a, alice)
    got = [(e["transfer_id"], e["amount"], e["balance_after"]) for e in body["entries"]]
    assert got == [
        (t4["id"], 50, 550),
        (t3["id"], -200, 500),
        (t2["id"], -300, 700),
        (t1["id"], 1000, 1000),
    ], got
    assert_last_page(api_a, alice, body)
    for e, t in zip(body["entries"], [t4, t3, t2, t1]):
        assert e["created_at"] == t["created_at"], f"entry time {e['created_at']} != transfer time {t['created_at']}"
    bob_entries = page(api_a, bob)["entries"]
    assert [(e["transfer_id"], e["amount"], e["balance_after"]) for e in bob_entries] == [
        (t4["id"], -50, 150),
        (t3["id"], 200, 200),
    ]


def test_negative_balance_after(api_a):
    account = api_a.new_account(allow_negative=True)
    lt.assert_first(api_a.debit(account, 40))
    e = page(api_a, account)["entries"]
    assert [(x["amount"], x["balance_after"]) for x in e] == [(-40, -40)]


def test_failed_and_replayed_requests_make_no_entries(api_a):
    account = api_a.funded_account(10)
    key = lt.uid("k-")
    first = api_a.credit(account, 5, key=key)
    lt.assert_first(first)
    lt.assert_replay_of(first, api_a.credit(account, 5, key=key))
    lt.assert_problem(api_a.debit(account, 100), 422, "insufficient-funds")
    lt.assert_problem(api_a.credit(account, 5, key=key + "x", currency="EUR"), 422, "currency-mismatch")
    assert len(page(api_a, account)["entries"]) == 2


def test_default_limit_is_50(api_a):
    account = api_a.new_account()
    for _ in range(51):
        lt.assert_first(api_a.credit(account, 1))
    body = page(api_a, account)
    assert len(body["entries"]) == 50, f"default limit 50, got {len(body['entries'])}"
    assert body["next_cursor"] is not None
    rest = page(api_a, account, cursor=body["next_cursor"])
    assert len(rest["entries"]) == 1
    assert rest["entries"][0]["balance_after"] == 1
    assert_last_page(api_a, account, rest)
    full = page(api_a, account, limit=500)
    assert len(full["entries"]) == 51
    assert_last_page(api_a, account, full, 500)
    one = page(api_a, account, limit=1)
    assert len(one["entries"]) == 1 and one["entries"][0]["balance_after"] == 51 and one["next_cursor"]


def test_paging_with_limit_2_over_5_entries(api_a):
    account = api_a.new_account()
    ids = [lt.assert_json(api_a.credit(account, i + 1), 201)["id"] for i in range(5)]
    seen = []
    cursor = None
    pages = 0
    while True:
        body = page(api_a, account, limit=2, cursor=cursor)
        pages += 1
        assert len(body["entries"]) <= 2
        seen.extend(e["transfer_id"] for e in body["entries"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10, "paging does not end"
    assert seen == list(reversed(ids)), f"every entry exactly once, newest first: {seen} vs {list(reversed(ids))}"
    assert pages in (3, 4), f"5 entries at limit 2 take 3 pages (4 with a trailing empty page), took {pages}"


def test_cursor_is_stable_while_new_entries_arrive(api_a):
    account = api_a.new_account()
    old = [lt.assert_json(api_a.credit(account, 1), 201)["id"] for _ in range(5)]
    first = page(api_a, account, limit=2)
    assert [e["transfer_id"] for e in first["entries"]] == [old[4], old[3]]
    cursor = first["next_cursor"]
    new = [lt.assert_json(api_a.credit(account, 1), 201)["id"] for _ in range(3)]
    second = page(api_a, account, limit=2, cursor=cursor)
    assert [e["transfer_id"] for e in second["entries"]] == [old[2], old[1]], "no repeat, no skip after new entries"
    lt.assert_first(api_a.debit(account, 1))
    third = page(api_a, account, limit=2, cursor=second["next_cursor"])
    assert [e["transfer_id"] for e in third["entries"]] == [old[0]]
    assert_last_page(api_a, account, third, 2)
    # Same cursor again: same answer (stable).
    again = page(api_a, account, limit=2, cursor=cursor)
    assert again["entries"] == second["entries"]
    newest = page(api_a, account, limit=4)
    assert [e["transfer_id"] for e in newest["entries"]][1:4] == list(reversed(new))


def test_cursor_works_with_another_limit(api_a):
    account = api_a.new_account()
    ids = [lt.assert_json(api_a.credit(account, 1), 201)["id"] for _ in range(6)]
    first = page(api_a, account, limit=2)
    rest = page(api_a, account, limit=10, cursor=first["next_cursor"])
    assert [e["transfer_id"] for e in rest["entries"]] == list(reversed(ids[:4]))


@pytest.mark.parametrize("limit", ["0", "501", "abc", "-1", "1.5", "1e2", "99999999999999999999", "0x10", "5a"])
def test_invalid_limit(api_a, limit):
    account = api_a.funded_account(1)
    r = api_a.request("GET", f"/v1/accounts/{account}/entries", params={"limit": limit})
    lt.assert_problem(r, 400, "invalid-limit")


@pytest.mark.parametrize("limit", ["1", "500", "50"])
def test_valid_limit_bounds(api_a, limit):
    account = api_a.funded_account(1)
    body = page(api_a, account, limit=limit)
    assert len(body["entries"]) == 1


@pytest.mark.parametrize(
    "cursor",
    ["garbage", "!!!", "AAAA", base64.urlsafe_b64encode(b"hello world").decode().rstrip("="), "x" * 300, "0", "-1"],
    ids=["word", "punctuation", "base64-zero", "base64-text", "long", "zero", "negative"],
)
def test_invalid_cursor(api_a, cursor):
    account = api_a.funded_account(1)
    r = api_a.request("GET", f"/v1/accounts/{account}/entries", params={"cursor": cursor})
    lt.assert_problem(r, 400, "invalid-cursor")


def test_cursor_from_another_account_is_invalid(api_a):
    a = api_a.new_account()
    b = api_a.new_account()
    for _ in range(3):
        lt.assert_first(api_a.credit(a, 1))
        lt.assert_first(api_a.credit(b, 1))
    cursor = page(api_a, a, limit=1)["next_cursor"]
    assert cursor
    lt.assert_problem(api_a.request("GET", f"/v1/accounts/{b}/entries", params={"cursor": cursor}), 400,
                      "invalid-cursor")
    # Tampered: one character changed.
    tampered = cursor[:-1] + ("A" if cursor[-1] != "A" else "B")
    r = api_a.request("GET", f"/v1/accounts/{a}/entries", params={"cursor": tampered})
    if r.status_code == 200:
        # A tampered cursor may by chance decode to another valid cursor of this account; it must then behave as one.
        assert set(r.json()) == {"entries", "next_cursor"}
    else:
        lt.assert_problem(r, 400, "invalid-cursor")


def fnv1a64(text: str) -> int:
    value = 0xCBF29CE484222325
    for byte in text.encode():
        value = ((value ^ byte) * 0x100000001B3) % (1 << 64)
    return value


def b64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def test_made_up_cursor_is_invalid(api_a):
    """A cursor the service did not issue is refused even when it is well-formed: the same signature on another
    position, or the unkeyed form of earlier versions (`e1:<account>:<version>:<fnv-1a>`, computable by anyone)."""
    account = api_a.new_account()
    for _ in range(5):
        lt.assert_first(api_a.credit(account, 1))
    issued = page(api_a, account, limit=1)["next_cursor"]
    kind, version, mac = base64.urlsafe_b64decode(issued + "=" * (-len(issued) % 4)).decode().split(":")
    assert (kind, version) == ("e2", "5")
    payload = f"e1:{account}:4"
    for cursor in [b64url(f"e2:4:{mac}"), b64url(f"{payload}:{fnv1a64(payload):x}"), b64url("e2:5:" + "0" * 32)]:
        r = api_a.request("GET", f"/v1/accounts/{account}/entries", params={"cursor": cursor})
        lt.assert_problem(r, 400, "invalid-cursor")


def test_cursor_of_another_client_is_invalid(api_a, api_b):
    """Two clients may each have an account of the same id; a cursor is one client's."""
    account = lt.uid("shared-name-")
    for api in (api_a, api_b):
        lt.assert_json(api.put_account(account), 201)
        for _ in range(3):
            lt.assert_first(api.credit(account, 1))
    cursor = page(api_a, account, limit=1)["next_cursor"]
    assert len(page(api_a, account, cursor=cursor)["entries"]) == 2
    r = api_b.request("GET", f"/v1/accounts/{account}/entries", params={"cursor": cursor})
    lt.assert_problem(r, 400, "invalid-cursor")


def test_cursor_of_one_replica_pages_on_another(api_a, second_server):
    """Every replica signs with the key kept in the database: a client may follow a cursor through any of them."""
    account = api_a.new_account()
    for _ in range(4):
        lt.assert_first(api_a.credit(account, 1))
    first = page(api_a, account, limit=2)
    other = api_a.clone(second_server.base)
    rest = page(other, account, limit=2, cursor=first["next_cursor"])
    assert [e["balance_after"] for e in first["entries"] + rest["entries"]] == [4, 3, 2, 1]
    assert page(api_a, account, limit=2, cursor=first["next_cursor"]) == rest


def test_entries_of_unknown_account_is_404(api_a):
    lt.assert_problem(api_a.entries(lt.uid("nobody-")), 404, "account-not-found")


def test_large_history_pages_exactly_once(api_a):
    """120 entries through limit 7 and limit 500."""
    account = api_a.new_account(allow_negative=True)
    other = api_a.new_account(allow_negative=True)
    ids = []
    for i in range(60):
        ids.append(lt.assert_json(api_a.transfer(account, other, i + 1), 201)["id"])
        ids.append(lt.assert_json(api_a.transfer(other, account, i + 1), 201)["id"])
    seen = []
    cursor = None
    while True:
        body = page(api_a, account, limit=7, cursor=cursor)
        seen.extend(body["entries"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [e["transfer_id"] for e in seen] == list(reversed(ids))
    assert len({e["transfer_id"] for e in seen}) == 120
    # balance_after is consistent: each equals the next older one plus its own amount.
    chronological = list(reversed(seen))
    running = 0
    for e in chronological:
        running += e["amount"]
        assert e["balance_after"] == running
    assert running == api_a.balance(account) == 0
    assert api_a.account(account)["version"] == 120
