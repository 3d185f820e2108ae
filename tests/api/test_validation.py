"""400 validation of POST bodies, 413, and the rule that a refused request stores nothing."""

import json

import pytest

import ledgertest as lt

ENDPOINTS = ["/v1/credits", "/v1/debits", "/v1/transfers"]


def valid_body(path, account="alice", other="bob"):
    if path == "/v1/transfers":
        return {"from": account, "to": other, "amount": 100, "currency": "USD"}
    return {"account": account, "amount": 100, "currency": "USD"}


def assert_400_stores_nothing(api, sql, path, raw_or_body, code, account=None):
    """POSTs with a fresh key, expects 400 `code`; then the key is unused: nothing stored under it."""
    key = lt.uid("k400-")
    if isinstance(raw_or_body, (str, bytes)):
        r = api.post(path, raw=raw_or_body, key=key)
    else:
        r = api.post(path, raw_or_body, key=key)
    lt.assert_problem(r, 400, code)
    n = sql(
        "SELECT (SELECT count(*) FROM ledger.idempotency_keys WHERE client_id = {c} AND key = {k})"
        " + (SELECT count(*) FROM ledger.transfers WHERE client_id = {c} AND idempotency_key = {k})".format(
            c=lt.sql_literal(api.client), k=lt.sql_literal(key)
        )
    )
    assert n == "0", f"a 400 must store nothing, found {n} rows for key {key}"
    return key


# ---------------------------------------------------------------------------------------------------------------------
# invalid-json


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(
    "raw",
    ["not json", "", "[]", "[1]", "null", "true", "1", '"x"', "{", '{"amount":1,}', "{} {}", "{'a':1}"],
    ids=["text", "empty", "empty-array", "array", "null", "true", "number", "string", "truncated", "trailing-comma",
         "two-values", "single-quotes"],
)
def test_invalid_json(api_a, sql, path, raw):
    assert_400_stores_nothing(api_a, sql, path, raw, "invalid-json")


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("extra", ["extra", "Amount", "id", "to_account", "idempotency_key"])
def test_unknown_field_is_invalid_json(api_a, sql, path, extra):
    body = valid_body(path)
    body[extra] = "x"
    assert_400_stores_nothing(api_a, sql, path, body, "invalid-json")


def test_credit_with_transfer_fields_is_invalid_json(api_a, sql):
    assert_400_stores_nothing(api_a, sql, "/v1/credits", {"from": "a", "to": "b", "amount": 1, "currency": "USD"},
                              "invalid-json")
    assert_400_stores_nothing(api_a, sql, "/v1/transfers", {"account": "a", "amount": 1, "currency": "USD"},
                              "invalid-json")


def test_invalid_utf8_is_invalid_json(api_a, sql):
    raw = b'{"account":"alice","amount":1,"currency":"USD","metadata":{"k":"\xff\xfe"}}'
    assert_400_stores_nothing(api_a, sql, "/v1/credits", raw, "invalid-json")


# ---------------------------------------------------------------------------------------------------------------------
# invalid-amount


AMOUNT_BAD_RAW = ["0", "-1", "1.5", "1e3", "1E3", "100.0", '"100"', "null", "true", "[100]", "{}", "9007199254740992",
                  "18446744073709551616", "-0", "01"]


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("amount", AMOUNT_BAD_RAW)
def test_invalid_amount(api_a, sql, path, amount):
    body = valid_body(path)
    raw = json.dumps(body).replace('"amount": 100', f'"amount": {amount}')
    assert f'"amount": {amount}' in raw
    if amount == "01":
        # Not valid JSON at all (leading zero): either code would be defensible, but the contract says
        # "not JSON" -> invalid-json.
        assert_400_stores_nothing(api_a, sql, path, raw, "invalid-json")
    else:
        assert_400_stores_nothing(api_a, sql, path, raw, "invalid-amount")


@pytest.mark.parametrize("path", ENDPOINTS)
def test_missing_amount(api_a, sql, path):
    body = valid_body(path)
    del body["amount"]
    assert_400_stores_nothing(api_a, sql, path, body, "invalid-amount")


def test_amount_2_pow_53_refused_2_pow_53_minus_1_accepted(api_a):
    account = api_a.new_account("XAM")
    lt.assert_problem(api_a.credit(account, 2**53, "XAM"), 400, "invalid-amount")
    assert api_a.balance(account) == 0
    lt.assert_first(api_a.credit(account, 2**53 - 1, "XAM"), 201)
    assert api_a.balance(account) == 2**53 - 1
    lt.assert_first(api_a.debit(account, 2**53 - 1, "XAM"), 201)


def test_amount_one_is_accepted(api_a):
    account = api_a.new_account()
    body = lt.assert_json(api_a.credit(account, 1), 201)
    assert body["amount"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# invalid-currency


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize(
    "currency", ["usd", "US", "USDD", "", None, 840, "U$D", "ÜSD", " USD", ["USD"]],
    ids=["lower", "two", "four", "empty", "null", "number", "symbol", "non-ascii", "space", "array"],
)
def test_invalid_currency(api_a, sql, path, currency):
    body = valid_body(path)
    body["currency"] = currency
    assert_400_stores_nothing(api_a, sql, path, body, "invalid-currency")


@pytest.mark.parametrize("path", ENDPOINTS)
def test_missing_currency(api_a, sql, path):
    body = valid_body(path)
    del body["currency"]
    assert_400_stores_nothing(api_a, sql, path, body, "invalid-currency")


# ---------------------------------------------------------------------------------------------------------------------
# invalid-account-id


BAD_IDS = ["", "@world", "@world:USD", ".", "..", "a" * 65, "a b", "-a", "a/b", "café", None, 5, ["a"], {"id": "a"}]
BAD_ID_NAMES = ["empty", "world", "world-currency", "dot", "dotdot", "65-chars", "space", "leading-dash", "slash",
                "non-ascii", "null", "number", "array", "object"]


@pytest.mark.parametrize("bad", BAD_IDS, ids=BAD_ID_NAMES)
@pytest.mark.parametrize("field", ["credit.account", "debit.account", "transfer.from", "transfer.to"])
def test_invalid_account_id_in_body(api_a, sql, field, bad):
    kind, name = field.split(".")
    path = f"/v1/{kind}s"
    body = valid_body(path, "alice", "bob")
    body[name] = bad
    assert_400_stores_nothing(api_a, sql, path, body, "invalid-account-id")


@pytest.mark.parametrize("field", ["credit.account", "debit.account", "transfer.from", "transfer.to"])
def test_missing_account_field(api_a, sql, field):
    kind, name = field.split(".")
    path = f"/v1/{kind}s"
    body = valid_body(path)
    del body[name]
    assert_400_stores_nothing(api_a, sql, path, body, "invalid-account-id")


def test_64_character_account_id_in_body_is_valid(api_a):
    account = "b" + lt.uid().ljust(63, "0")
    lt.assert_json(api_a.put_account(account, "USD"), 201)
    lt.assert_first(api_a.credit(account, 9))


# ---------------------------------------------------------------------------------------------------------------------
# same-account


def test_same_account(api_a, sql):
    account = api_a.funded_account(100)
    assert_400_stores_nothing(api_a, sql, "/v1/transfers",
                              {"from": account, "to": account, "amount": 10, "currency": "USD"}, "same-account")
    # Even for an account that does not exist: validation comes before the business outcome.
    assert_400_stores_nothing(api_a, sql, "/v1/transfers",
                              {"from": "ghost", "to": "ghost", "amount": 10, "currency": "USD"}, "same-account")
    assert api_a.account(account)["version"] == 1


def test_ids_differing_in_case_are_different_accounts(api_a):
    base = lt.uid("case-")
    upper = base.upper()
    lt.assert_json(api_a.put_account(base, "USD"), 201)
    lt.assert_json(api_a.put_account(upper, "USD"), 201)
    lt.assert_first(api_a.credit(base, 50))
    lt.assert_first(api_a.transfer(base, upper, 20))
    assert api_a.balance(base) == 30 and api_a.balance(upper) == 20


# ---------------------------------------------------------------------------------------------------------------------
# invalid-metadata


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("metadata", [[], [1, 2], "x", 1, True, None], ids=["empty-array", "array", "string", "number",
                                                                          "bool", "null"])
def test_metadata_not_an_object(api_a, sql, path, metadata):
    body = valid_body(path)
    body["metadata"] = metadata
    assert_400_stores_nothing(api_a, sql, path, body, "invalid-metadata")


def metadata_of_compact_size(size):
    """A metadata object whose compact JSON is exactly `size` bytes: {"k":"xxx..."} is 8 + len bytes."""
    m = {"k": "x" * (size - 8)}
    assert len(json.dumps(m, separators=(",", ":")).encode()) == size
    return m


def test_metadata_exactly_4096_bytes_compact_is_accepted(api_a):
    account = api_a.new_account()
    metadata = metadata_of_compact_size(4096)
    # Sent with whitespace: the raw body is larger, the compact form is exactly 4096 bytes.
    raw = json.dumps({"account": account, "amount": 1, "currency": "USD", "metadata": metadata}, indent=4)
    raw = raw.replace('"k": ', '"k"   :   ')
    r = api_a.post("/v1/credits", raw=raw)
    body = lt.assert_json(r, 201)
    assert body["metadata"] == metadata


@pytest.mark.parametrize("path", ENDPOINTS)
def test_metadata_4097_bytes_compact_is_refused(api_a, sql, path):
    body = valid_body(path)
    body["metadata"] = metadata_of_compact_size(4097)
    assert_400_stores_nothing(api_a, sql, path, body, "invalid-metadata")


def test_metadata_size_counts_utf8_bytes(api_a, sql):
    # 2048 two-byte characters = 4096 bytes of text, plus {"k":""} -> over 4096 bytes, though only 2056 characters.
    body = {"account": "alice", "amount": 1, "currency": "USD", "metadata": {"k": "é" * 2048}}
    raw = json.dumps(body, ensure_ascii=False)
    assert_400_stores_nothing(api_a, sql, "/v1/credits", raw, "invalid-metadata")


# ---------------------------------------------------------------------------------------------------------------------
# 400s are never stored: the same key then executes


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        '{"account":"ACC","amount":0,"currency":"USD"}',
        '{"account":"ACC","amount":5,"currency":"usd"}',
        '{"account":"@ACC","amount":5,"currency":"USD"}',
        '{"account":"ACC","amount":5,"currency":"USD","metadata":[]}',
        '{"account":"ACC","amount":5,"currency":"USD","x":1}',
    ],
    ids=["json", "amount", "currency", "account-id", "metadata", "unknown-field"],
)
def test_key_of_a_400_is_free_afterwards(api_a, bad):
    account = api_a.new_account()
    key = lt.uid("k-")
    r = api_a.post("/v1/credits", raw=bad.replace("ACC", account), key=key)
    assert r.status_code == 400, lt.describe(r)
    assert api_a.balance(account) == 0
    good = api_a.credit(account, 5, key=key)
    lt.assert_first(good, 201)
    assert api_a.balance(account) == 5
    lt.assert_replay_of(good, api_a.credit(account, 5, key=key))


def test_invalid_request_with_a_completed_key_is_400_not_422(api_a):
    """Precedence: body 400s come before 422 idempotency-key-reused."""
    account = api_a.new_account()
    key = lt.uid("k-")
    lt.assert_first(api_a.credit(account, 5, key=key))
    lt.assert_problem(api_a.post("/v1/credits", raw='{"account":"%s","amount":-5,"currency":"USD"}' % account, key=key),
                      400, "invalid-amount")
    lt.assert_problem(api_a.post("/v1/credits", raw="nope", key=key), 400, "invalid-json")
    assert api_a.balance(account) == 5


# ---------------------------------------------------------------------------------------------------------------------
# 413


def padded(body, total_size):
    """The body as JSON of exactly total_size bytes (padded with JSON whitespace before the closing brace)."""
    core = json.dumps(body, separators=(",", ":"))
    pad = total_size - len(core.encode())
    assert pad >= 0
    raw = core[:-1] + " " * pad + "}"
    assert len(raw.encode()) == total_size
    return raw


def padded_credit(account, total_size):
    return padded({"account": account, "amount": 2, "currency": "USD"}, total_size)


def test_body_of_exactly_64_kib_is_accepted(api_a):
    account = api_a.new_account()
    r = api_a.post("/v1/credits", raw=padded_credit(account, lt.BODY_MAX))
    lt.assert_first(r, 201)
    assert api_a.balance(account) == 2


@pytest.mark.parametrize("path", ENDPOINTS)
def test_body_over_64_kib_is_413(api_a, path):
    account = api_a.funded_account(10)
    other = api_a.new_account()
    key = lt.uid("k-")
    body = {"account": account, "amount": 2, "currency": "USD"}
    if path == "/v1/transfers":
        body = {"from": account, "to": other, "amount": 2, "currency": "USD"}
    r = api_a.post(path, raw=padded(body, lt.BODY_MAX + 1), key=key)
    lt.assert_problem(r, 413, "body-too-large")
    assert api_a.account(account)["version"] == 1
    # Not stored: the key is free for the same request at an acceptable size.
    r = api_a.post(path, raw=padded(body, lt.BODY_MAX), key=key)
    lt.assert_first(r, 201)
    assert api_a.account(account)["version"] == 2


def test_large_body_is_413(api_a):
    account = api_a.new_account()
    lt.assert_problem(api_a.post("/v1/credits", raw=padded_credit(account, 200 * 1024)), 413, "body-too-large")
    assert api_a.balance(account) == 0


def test_put_account_body_over_64_kib_is_413(api_a):
    account = lt.uid("acc-")
    raw = '{"currency":"USD"' + " " * (lt.BODY_MAX) + "}"
    lt.assert_problem(api_a.request("PUT", f"/v1/accounts/{account}", raw=raw), 413, "body-too-large")
    lt.assert_problem(api_a.get_account(account), 404, "account-not-found")


def test_chunked_body_over_64_kib_is_413(api_a):
    account = api_a.new_account()
    raw = padded_credit(account, lt.BODY_MAX + 4096).encode()

    def chunks():
        for i in range(0, len(raw), 8192):
            yield raw[i:i + 8192]

    h = api_a.headers(lt.uid("k-"), {"Content-Type": "application/json"})
    r = api_a.session.post(api_a.base + "/v1/credits", data=chunks(), headers=h, timeout=lt.TIMEOUT)
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    lt.assert_problem(r, 413, "body-too-large")
    assert api_a.balance(account) == 0


def test_chunked_small_body_is_accepted(api_a):
    account = api_a.new_account()
    raw = json.dumps({"account": account, "amount": 3, "currency": "USD"}).encode()
    h = api_a.headers(lt.uid("k-"), {"Content-Type": "application/json"})
    r = api_a.session.post(api_a.base + "/v1/credits", data=iter([raw[:10], raw[10:]]), headers=h, timeout=lt.TIMEOUT)
    lt.assert_first(r, 201)
    assert api_a.balance(account) == 3
