"""PUT and GET /v1/accounts/{id}."""

import json

import pytest

import ledgertest as lt


def test_put_creates_then_identical_put_is_200(api_a):
    account = lt.uid("acc-")
    r1 = api_a.put_account(account, "USD", False)
    created = lt.assert_json(r1, 201)
    lt.assert_account_shape(created)
    assert created["id"] == account
    assert created["currency"] == "USD"
    assert created["balance"] == 0
    assert created["allow_negative"] is False
    assert created["version"] == 0, f"version starts at 0: {created}"

    r2 = api_a.put_account(account, "USD", False)
    again = lt.assert_json(r2, 200)
    lt.assert_account_shape(again)
    assert again == created, f"identical PUT must return the same account: {again} vs {created}"

    got = lt.assert_json(api_a.get_account(account), 200)
    assert got == created


def test_put_allow_negative_defaults_to_false(api_a):
    account = lt.uid("acc-")
    created = lt.assert_json(api_a.put_account(account, "EUR"), 201)
    assert created["allow_negative"] is False
    assert created["currency"] == "EUR"
    # Explicit false is the same settings: 200.
    lt.assert_json(api_a.put_account(account, "EUR", False), 200)
    # And omitting it again: 200.
    lt.assert_json(api_a.put_account(account, "EUR"), 200)


def test_put_allow_negative_true(api_a):
    account = lt.uid("acc-")
    created = lt.assert_json(api_a.put_account(account, "USD", True), 201)
    assert created["allow_negative"] is True
    assert lt.assert_json(api_a.put_account(account, "USD", True), 200) == created


def test_put_with_other_settings_is_409_account_conflict(api_a):
    account = lt.uid("acc-")
    lt.assert_json(api_a.put_account(account, "USD", False), 201)
    lt.assert_problem(api_a.put_account(account, "EUR", False), 409, "account-conflict")
    lt.assert_problem(api_a.put_account(account, "USD", True), 409, "account-conflict")
    lt.assert_problem(api_a.put_account(account, "EUR", True), 409, "account-conflict")
    # The account is unchanged.
    got = api_a.account(account)
    assert got["currency"] == "USD" and got["allow_negative"] is False


def test_put_conflict_when_created_with_allow_negative(api_a):
    account = lt.uid("acc-")
    lt.assert_json(api_a.put_account(account, "USD", True), 201)
    lt.assert_problem(api_a.put_account(account, "USD"), 409, "account-conflict")


def test_identical_put_after_balance_change_returns_current_account(api_a):
    account = api_a.new_account()
    lt.assert_first(api_a.credit(account, 500), 201)
    again = lt.assert_json(api_a.put_account(account, "USD", False), 200)
    assert again["balance"] == 500 and again["version"] == 1, f"PUT 200 must carry the account as it is: {again}"


def test_version_grows_by_one_per_balance_change(api_a):
    a = api_a.new_account()
    b = api_a.new_account()
    assert api_a.account(a)["version"] == 0
    lt.assert_first(api_a.credit(a, 1000))
    assert api_a.account(a) | {"created_at": None} == {
        "id": a, "currency": "USD", "balance": 1000, "allow_negative": False, "version": 1, "created_at": None,
        "held": 0, "available": 1000,
    }
    lt.assert_first(api_a.debit(a, 300))
    got = api_a.account(a)
    assert (got["balance"], got["version"]) == (700, 2)
    lt.assert_first(api_a.transfer(a, b, 200))
    got_a, got_b = api_a.account(a), api_a.account(b)
    assert (got_a["balance"], got_a["version"]) == (500, 3)
    assert (got_b["balance"], got_b["version"]) == (200, 1)
    # A failed debit (insufficient funds) changes no balance, so no version.
    lt.assert_problem(api_a.debit(b, 201), 422, "insufficient-funds")
    got_b = api_a.account(b)
    assert (got_b["balance"], got_b["version"]) == (200, 1)
    # A replay changes nothing either.
    key = lt.uid("k-")
    first = api_a.credit(b, 1, key=key)
    lt.assert_first(first)
    lt.assert_replay_of(first, api_a.credit(b, 1, key=key))
    got_b = api_a.account(b)
    assert (got_b["balance"], got_b["version"]) == (201, 2)


def test_get_unknown_account_is_404(api_a):
    lt.assert_problem(api_a.get_account(lt.uid("missing-")), 404, "account-not-found")


def test_account_id_64_characters_is_valid(api_a):
    account = "A" + lt.uid().ljust(63, "z")
    assert len(account) == 64
    created = lt.assert_json(api_a.put_account(account, "USD"), 201)
    assert created["id"] == account
    lt.assert_json(api_a.get_account(account), 200)
    lt.assert_first(api_a.credit(account, 7))


@pytest.mark.parametrize(
    "account",
    ["x" + lt.uid(), "9" + lt.uid(), "a.b_c:d-e" + lt.uid(), "Z" + lt.uid() + "..", "q" + lt.uid() + ":USD"],
    ids=["letter", "digit", "punctuation", "trailing-dots", "colon-currency"],
)
def test_valid_account_id_forms(api_a, account):
    created = lt.assert_json(api_a.put_account(account, "USD"), 201)
    assert created["id"] == account
    assert lt.assert_json(api_a.get_account(account), 200)["id"] == account


BAD_PATH_IDS = [
    "@world",
    "%40world",
    "a" * 65,
    "a%20b",
    "-abc",
    "_abc",
    ":abc",
    "a%2Fb",
    "caf%C3%A9",
    "a*b",
]


@pytest.mark.parametrize("path_id", BAD_PATH_IDS)
def test_bad_account_id_in_path_is_400(api_a, path_id):
    lt.assert_problem(api_a.get_account(path_id), 400, "invalid-account-id")
    lt.assert_problem(api_a.put_account(path_id, "USD"), 400, "invalid-account-id")
    lt.assert_problem(api_a.entries(path_id), 400, "invalid-account-id")


@pytest.mark.parametrize("path_id", [".", ".."])
def test_dot_account_ids_in_path_are_400(server, clients, path_id):
    """`.` and `..` sent literally (no client-side dot-segment removal)."""
    _, token = clients["a"]
    for method, suffix, body in [
        ("GET", "", None),
        ("PUT", "", b'{"currency":"USD"}'),
        ("GET", "/entries", None),
    ]:
        headers = {"Authorization": f"Bearer {token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        status, headers_out, data = lt.raw_request(
            server.base, method, f"/v1/accounts/{path_id}{suffix}", headers, body
        )
        assert status == 400, f"{method} /v1/accounts/{path_id}{suffix}: expected 400, got {status} {data!r}"
        assert headers_out.get("content-type", "").split(";")[0] == "application/problem+json"
        assert json.loads(data)["code"] == "invalid-account-id", data


def test_world_account_is_not_addressable(api_a):
    api_a.funded_account(10)  # makes sure @world:USD exists for this client
    lt.assert_problem(api_a.get_account("@world"), 400, "invalid-account-id")
    lt.assert_problem(api_a.get_account("@world:USD"), 400, "invalid-account-id")
    lt.assert_problem(api_a.entries("@world"), 400, "invalid-account-id")
    lt.assert_problem(api_a.put_account("@world:USD", "USD", True), 400, "invalid-account-id")


@pytest.mark.parametrize(
    "body",
    [
        {"currency": "usd"},
        {"currency": "US"},
        {"currency": "USDD"},
        {"currency": "U1D"},
        {"currency": ""},
        {"currency": None},
        {"currency": 840},
        {"currency": ["USD"]},
        {"currency": "ÜSD"},
        {},
        {"allow_negative": False},
    ],
    ids=["lower", "two", "four", "digit", "empty", "null", "number", "array", "non-ascii", "missing", "missing-with-flag"],
)
def test_put_bad_currency_is_400(api_a, body):
    account = lt.uid("acc-")
    lt.assert_problem(api_a.request("PUT", f"/v1/accounts/{account}", body=body), 400, "invalid-currency")
    lt.assert_problem(api_a.get_account(account), 404, "account-not-found")


@pytest.mark.parametrize(
    "raw",
    [
        '{"currency":"USD","allow_negative":"true"}',
        '{"currency":"USD","allow_negative":1}',
        '{"currency":"USD","allow_negative":null}',
        '{"currency":"USD","allow_negative":{}}',
    ],
    ids=["string", "number", "null", "object"],
)
def test_put_allow_negative_wrong_type_is_invalid_json(api_a, raw):
    account = lt.uid("acc-")
    lt.assert_problem(api_a.request("PUT", f"/v1/accounts/{account}", raw=raw), 400, "invalid-json")
    lt.assert_problem(api_a.get_account(account), 404, "account-not-found")


@pytest.mark.parametrize(
    "raw",
    [
        '{"currency":"USD","extra":1}',
        '{"currency":"USD","balance":100}',
        '{"currency":"USD","id":"x"}',
        "not json",
        "",
        "[]",
        '["USD"]',
        '"USD"',
        "null",
        "42",
        '{"currency":"USD"',
        '{"currency":"USD"} x',
    ],
    ids=["unknown-field", "balance-field", "id-field", "not-json", "empty", "empty-array", "array", "string", "null",
         "number", "truncated", "trailing"],
)
def test_put_invalid_json(api_a, raw):
    account = lt.uid("acc-")
    lt.assert_problem(api_a.request("PUT", f"/v1/accounts/{account}", raw=raw), 400, "invalid-json")
    lt.assert_problem(api_a.get_account(account), 404, "account-not-found")


def test_put_body_key_order_and_whitespace_do_not_matter(api_a):
    account = lt.uid("acc-")
    lt.assert_json(api_a.request("PUT", f"/v1/accounts/{account}", raw='{"allow_negative":true,"currency":"GBP"}'), 201)
    body = lt.assert_json(
        api_a.request("PUT", f"/v1/accounts/{account}", raw=' {\n "currency" : "GBP" ,\t"allow_negative" : true }\n'),
        200,
    )
    assert body["currency"] == "GBP" and body["allow_negative"] is True


def test_put_needs_no_idempotency_key(api_a):
    account = lt.uid("acc-")
    r = api_a.request("PUT", f"/v1/accounts/{account}", body={"currency": "USD"})
    assert "Idempotency-Key" not in r.request.headers
    lt.assert_json(r, 201)


def test_accounts_in_several_currencies(api_a):
    for currency in ["USD", "EUR", "JPY", "XYZ"]:
        account = api_a.new_account(currency)
        lt.assert_first(api_a.credit(account, 100, currency))
        assert api_a.account(account)["currency"] == currency
        assert api_a.balance(account) == 100
