"""The Idempotency-Key header: required, syntax, bare token vs sf-string, length, case."""

import pytest

import ledgertest as lt

ENDPOINTS = ["/v1/credits", "/v1/debits", "/v1/transfers"]


def body_for(path, account, other):
    if path == "/v1/transfers":
        return {"from": account, "to": other, "amount": 1, "currency": "USD"}
    return {"account": account, "amount": 1, "currency": "USD"}


@pytest.mark.parametrize("path", ENDPOINTS)
def test_missing_key(api_a, path):
    account = api_a.funded_account(10)
    other = api_a.new_account()
    r = api_a.request("POST", path, body=body_for(path, account, other))
    assert "Idempotency-Key" not in r.request.headers
    lt.assert_problem(r, 400, "idempotency-key-missing")
    assert api_a.account(account)["version"] == 1


INVALID_KEYS = [
    ("empty", ""),
    ("256-chars", "k" * 256),
    ("quoted-256-chars", '"' + "k" * 256 + '"'),
    ("non-ascii-latin1", "caf\u00e9"),
    ("non-ascii-utf8", "caf\u00c3\u00a9"),
    ("tab", "ab\tcd"),
    ("bare-with-space", "ab cd"),
    ("bare-with-quote", 'ab"cd'),
    ("quoted-empty", '""'),
    ("unterminated-quote", '"abc'),
    ("text-after-quote", '"abc"def'),
    ("bad-escape", '"a\\nb"'),
    ("trailing-backslash", '"abc\\"'),
    ("quoted-non-ascii", '"caf\u00e9"'),
    ("quoted-tab", '"ab\tcd"'),
]


@pytest.mark.parametrize("key", [k for _, k in INVALID_KEYS], ids=[n for n, _ in INVALID_KEYS])
def test_invalid_key(api_a, key):
    account = api_a.new_account()
    r = api_a.request("POST", "/v1/credits", body={"account": account, "amount": 1, "currency": "USD"}, key=key)
    lt.assert_problem(r, 400, "idempotency-key-invalid")
    assert api_a.balance(account) == 0


@pytest.mark.parametrize("key", ["ab\x01cd", "ab\x7fcd", '"ab\x01cd"', "ab\x00cd"], ids=["ctl", "del", "quoted-ctl", "nul"])
def test_control_characters_in_key_are_refused(api_a, key):
    """Control characters are not allowed in any HTTP field value (RFC 9110 5.5), so the HTTP layer may refuse the
    request before the application sees it: only a 400 with nothing written is required here."""
    account = api_a.new_account()
    r = api_a.request("POST", "/v1/credits", body={"account": account, "amount": 1, "currency": "USD"}, key=key)
    assert r.status_code == 400, lt.describe(r)
    assert api_a.balance(account) == 0


@pytest.mark.parametrize("path", ENDPOINTS)
def test_invalid_key_on_every_endpoint(api_a, path):
    account = api_a.funded_account(10)
    other = api_a.new_account()
    r = api_a.request("POST", path, body=body_for(path, account, other), key="x" * 256)
    lt.assert_problem(r, 400, "idempotency-key-invalid")


def unique_key_of_length(n):
    base = lt.uid("K")
    return (base + "-" * n)[:n]


def test_key_of_255_characters_is_accepted(api_a):
    account = api_a.new_account()
    key = unique_key_of_length(255)
    first = api_a.credit(account, 4, key=key)
    lt.assert_first(first)
    lt.assert_replay_of(first, api_a.credit(account, 4, key=key))
    assert api_a.balance(account) == 4


def test_quoted_key_of_255_characters_after_unquoting_is_accepted(api_a):
    account = api_a.new_account()
    key = unique_key_of_length(255)
    first = api_a.credit(account, 4, key='"' + key + '"')  # 257 characters on the wire
    lt.assert_first(first)
    # Same key as the bare token.
    lt.assert_replay_of(first, api_a.credit(account, 4, key=key))
    assert api_a.balance(account) == 4


def test_quoted_key_with_escapes_counts_after_unquoting(api_a):
    account = api_a.new_account()
    core = unique_key_of_length(253)
    wire = '"' + core + '\\\\' + '\\"' + '"'  # core + \\ + \" -> 255 characters after unquoting, 259 on the wire
    first = api_a.credit(account, 6, key=wire)
    lt.assert_first(first)
    lt.assert_replay_of(first, api_a.credit(account, 6, key=wire))
    too_long = '"' + core + 'x\\\\' + '\\"' + '"'  # 256 after unquoting
    lt.assert_problem(api_a.credit(account, 6, key=too_long), 400, "idempotency-key-invalid")
    assert api_a.balance(account) == 6


def test_bare_and_quoted_key_are_the_same_key(api_a):
    account = api_a.new_account()
    key = lt.uid("abc-")
    first = api_a.credit(account, 10, key=key)
    lt.assert_first(first)
    lt.assert_replay_of(first, api_a.credit(account, 10, key=f'"{key}"'))
    # And in the other direction.
    key2 = lt.uid("abc-")
    first2 = api_a.credit(account, 10, key=f'"{key2}"')
    lt.assert_first(first2)
    lt.assert_replay_of(first2, api_a.credit(account, 10, key=key2))
    assert api_a.balance(account) == 20


def test_quoted_backslash_escape_equals_bare_backslash(api_a):
    account = api_a.new_account()
    key = lt.uid("a\\b-")  # bare: a\b-...
    first = api_a.credit(account, 10, key=key)
    lt.assert_first(first)
    quoted = '"' + key.replace("\\", "\\\\") + '"'  # "a\\b-..."
    lt.assert_replay_of(first, api_a.credit(account, 10, key=quoted))
    # The quoted key with a reused fingerprint check: a different body under the same key is refused.
    lt.assert_problem(api_a.credit(account, 11, key=quoted), 422, "idempotency-key-reused")
    assert api_a.balance(account) == 10


def test_quoted_key_with_escaped_quote(api_a):
    account = api_a.new_account()
    suffix = lt.uid()
    key = f'"a\\"b-{suffix}"'  # the key a"b-<suffix>
    first = api_a.credit(account, 10, key=key)
    lt.assert_first(first)
    lt.assert_replay_of(first, api_a.credit(account, 10, key=key))
    # a"b is not ab, nor a\"b.
    lt.assert_first(api_a.credit(account, 10, key=f'"ab-{suffix}"'))
    lt.assert_first(api_a.credit(account, 10, key=f'"a\\\\\\"b-{suffix}"'))
    assert api_a.balance(account) == 30


def test_quoted_key_with_space(api_a):
    account = api_a.new_account()
    key = f'"a b {lt.uid()}"'
    first = api_a.credit(account, 10, key=key)
    lt.assert_first(first)
    lt.assert_replay_of(first, api_a.credit(account, 10, key=key))
    assert api_a.balance(account) == 10


def test_keys_are_case_sensitive(api_a):
    account = api_a.new_account()
    key = lt.uid("Key-")
    first = api_a.credit(account, 10, key=key)
    lt.assert_first(first)
    second = api_a.credit(account, 10, key=key.upper())
    lt.assert_first(second)
    third = api_a.credit(account, 10, key=key.lower())
    lt.assert_first(third)
    ids = {first.json()["id"], second.json()["id"], third.json()["id"]}
    assert len(ids) == 3, f"three keys differing in case must make three transfers: {ids}"
    assert api_a.balance(account) == 30


@pytest.mark.parametrize("key", ["!#$%&'()*+,-./:;<=>?@[]^_`{|}~", "a", "0", "\\", "~~~"])
def test_bare_keys_of_visible_ascii(api_a, key):
    """Fixed keys: each runs once per session (fresh database), and no other test uses them."""
    account = api_a.new_account()
    first = api_a.credit(account, 10, key=key)
    lt.assert_first(first)
    lt.assert_replay_of(first, api_a.credit(account, 10, key=key))
    lt.assert_problem(api_a.credit(account, 11, key=key), 422, "idempotency-key-reused")
    assert api_a.balance(account) == 10


def test_key_reused_across_endpoints_is_422(api_a):
    alice = api_a.funded_account(100)
    bob = api_a.new_account()
    key = lt.uid("k-")
    lt.assert_first(api_a.credit(alice, 10, key=key))
    lt.assert_problem(api_a.debit(alice, 10, key=key), 422, "idempotency-key-reused")
    lt.assert_problem(api_a.transfer(alice, bob, 10, key=key), 422, "idempotency-key-reused")
    assert api_a.balance(alice) == 110 and api_a.balance(bob) == 0
