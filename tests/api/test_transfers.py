"""POST /v1/credits, /v1/debits, /v1/transfers and GET /v1/transfers/{id}: shapes, balances, replay."""

import json

import pytest

import ledgertest as lt


def test_credit_201_shape_and_balance(api_a):
    account = api_a.new_account()
    r = api_a.credit(account, 1000)
    lt.assert_first(r, 201)
    body = lt.assert_json(r, 201)
    lt.assert_transfer_shape(body)
    assert body["from"] == "@world" and body["to"] == account, body
    assert body["amount"] == 1000 and body["currency"] == "USD", body
    assert body["metadata"] == {}, f"absent metadata must be shown as {{}}: {body}"
    assert api_a.balance(account) == 1000


def test_debit_201_shape_and_balance(api_a):
    account = api_a.funded_account(1000)
    r = api_a.debit(account, 300, metadata={"order": "o-1"})
    lt.assert_first(r, 201)
    body = lt.assert_json(r, 201)
    lt.assert_transfer_shape(body)
    assert body["from"] == account and body["to"] == "@world", body
    assert body["amount"] == 300 and body["currency"] == "USD"
    assert body["metadata"] == {"order": "o-1"}
    assert api_a.balance(account) == 700


def test_transfer_201_shape_and_balances(api_a):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    metadata = {"note": "rent", "n": 3, "nested": {"a": [1, 2, {"b": None}], "t": True}, "u": "é€😀"}
    r = api_a.transfer(alice, bob, 250, metadata=metadata)
    lt.assert_first(r, 201)
    body = lt.assert_json(r, 201)
    lt.assert_transfer_shape(body)
    assert (body["from"], body["to"], body["amount"], body["currency"]) == (alice, bob, 250, "USD")
    assert body["metadata"] == metadata
    assert api_a.balance(alice) == 750
    assert api_a.balance(bob) == 250


def test_explicit_empty_metadata(api_a):
    account = api_a.new_account()
    body = lt.assert_json(api_a.credit(account, 5, metadata={}), 201)
    assert body["metadata"] == {}


def test_get_transfer_returns_the_transfer(api_a):
    alice = api_a.funded_account(100)
    bob = api_a.new_account()
    created = lt.assert_json(api_a.transfer(alice, bob, 40, metadata={"k": "v"}), 201)
    got = lt.assert_json(api_a.get_transfer(created["id"]), 200)
    lt.assert_transfer_shape(got)
    assert got == created
    credit = lt.assert_json(api_a.credit(bob, 1), 201)
    assert lt.assert_json(api_a.get_transfer(credit["id"]), 200) == credit
    debit = lt.assert_json(api_a.debit(bob, 1), 201)
    got = lt.assert_json(api_a.get_transfer(debit["id"]), 200)
    assert got == debit and got["to"] == "@world"


def test_transfer_ids_are_distinct(api_a):
    account = api_a.new_account()
    ids = {lt.assert_json(api_a.credit(account, 1), 201)["id"] for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize("transfer_id", ["999999999999", "0", "-1", "abc", "1.5", "99999999999999999999999999", "%20"])
def test_unknown_transfer_is_404(api_a, transfer_id):
    lt.assert_problem(api_a.get_transfer(transfer_id), 404, "transfer-not-found")


def test_a_transfer_has_one_id_only(api_a):
    """The id is a string: `01` or `+1` for transfer `1` is another string, naming no transfer."""
    transfer = lt.assert_json(api_a.credit(api_a.new_account(), 1), 201)
    assert lt.assert_json(api_a.get_transfer(transfer["id"]), 200) == transfer
    for alias in ["0" + transfer["id"], "00" + transfer["id"], "+" + transfer["id"], transfer["id"] + ".0"]:
        lt.assert_problem(api_a.get_transfer(alias), 404, "transfer-not-found")


def test_allow_negative_account_may_go_below_zero(api_a):
    account = api_a.new_account(allow_negative=True)
    lt.assert_first(api_a.debit(account, 500), 201)
    assert api_a.balance(account) == -500
    other = api_a.new_account()
    lt.assert_first(api_a.transfer(account, other, 250), 201)
    assert api_a.balance(account) == -750 and api_a.balance(other) == 250


def test_exact_balance_can_be_spent(api_a):
    account = api_a.funded_account(300)
    lt.assert_first(api_a.debit(account, 300), 201)
    assert api_a.balance(account) == 0
    lt.assert_problem(api_a.debit(account, 1), 422, "insufficient-funds")


def test_largest_amount_is_accepted(api_a):
    account = api_a.new_account("XLA")
    body = lt.assert_json(api_a.credit(account, lt.AMOUNT_MAX, "XLA"), 201)
    assert body["amount"] == lt.AMOUNT_MAX
    assert api_a.balance(account) == lt.AMOUNT_MAX
    lt.assert_first(api_a.debit(account, lt.AMOUNT_MAX, "XLA"), 201)
    assert api_a.balance(account) == 0


# ---------------------------------------------------------------------------------------------------------------------
# Replay


@pytest.mark.parametrize("kind", ["credit", "debit", "transfer"])
def test_replay_returns_same_bytes_and_executes_nothing(api_a, kind):
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    key = lt.uid("k-")
    call = {
        "credit": lambda: api_a.credit(alice, 100, key=key),
        "debit": lambda: api_a.debit(alice, 100, key=key),
        "transfer": lambda: api_a.transfer(alice, bob, 100, key=key),
    }[kind]
    first = call()
    lt.assert_first(first, 201)
    expected_alice = {"credit": 1100, "debit": 900, "transfer": 900}[kind]
    for _ in range(3):
        again = call()
        lt.assert_replay_of(first, again)
        assert again.headers.get("Content-Type", "").split(";")[0] == "application/json"
    assert api_a.balance(alice) == expected_alice
    assert api_a.account(alice)["version"] == 2
    assert api_a.balance(bob) == (100 if kind == "transfer" else 0)


def test_replay_with_different_key_order_and_whitespace(api_a):
    account = api_a.new_account()
    key = lt.uid("k-")
    first = api_a.post(
        "/v1/credits", raw=json.dumps({"account": account, "amount": 70, "currency": "USD", "metadata": {"a": 1, "b": [1, 2]}}),
        key=key,
    )
    lt.assert_first(first)
    reordered = (
        '\n{ "metadata" : { "b" : [ 1 , 2 ] , "a" : 1 } ,\t"currency":"USD",  "amount" : 70,"account" : "%s" }  \n'
        % account
    )
    again = api_a.post("/v1/credits", raw=reordered, key=key)
    lt.assert_replay_of(first, again)
    assert api_a.balance(account) == 70


def test_replay_with_equivalent_string_escapes(api_a):
    """Canonical JSON: "\\u0055SD" is the string USD."""
    account = api_a.new_account()
    key = lt.uid("k-")
    first = api_a.post("/v1/credits", raw='{"account":"%s","amount":8,"currency":"USD"}' % account, key=key)
    lt.assert_first(first)
    again = api_a.post("/v1/credits", raw='{"account":"%s","amount":8,"currency":"\\u0055SD"}' % account, key=key)
    lt.assert_replay_of(first, again)
    assert api_a.balance(account) == 8


@pytest.mark.parametrize(
    "change",
    ["amount", "account", "currency", "metadata", "metadata-added", "path"],
)
def test_same_key_different_request_is_422_reused(api_a, sql, change):
    account = api_a.funded_account(1000)
    other = api_a.new_account()
    euro = api_a.new_account("EUR")
    key = lt.uid("k-")
    first = api_a.debit(account, 100, metadata={"m": 1}, key=key)
    lt.assert_first(first)
    before_account = api_a.account(account)
    before_other = api_a.account(other)
    r = {
        "amount": lambda: api_a.debit(account, 101, metadata={"m": 1}, key=key),
        "account": lambda: api_a.debit(other, 100, metadata={"m": 1}, key=key),
        "currency": lambda: api_a.debit(euro, 100, "EUR", metadata={"m": 1}, key=key),
        "metadata": lambda: api_a.debit(account, 100, metadata={"m": 2}, key=key),
        "metadata-added": lambda: api_a.debit(account, 100, metadata={"m": 1, "x": 0}, key=key),
        "path": lambda: api_a.credit(account, 100, metadata={"m": 1}, key=key),
    }[change]()
    lt.assert_problem(r, 422, "idempotency-key-reused")
    assert lt.replayed(r) != "true", "a 422 idempotency-key-reused is not a replay"
    # Nothing executed, nothing stored.
    assert api_a.account(account) == before_account
    assert api_a.account(other) == before_other
    assert api_a.balance(euro) == 0
    n = sql(
        f"SELECT count(*) FROM ledger.transfers WHERE client_id = {lt.sql_literal(api_a.client)} "
        f"AND idempotency_key = {lt.sql_literal(key)}"
    )
    assert n == "1", f"exactly one transfer for key {key}, found {n}"
    # The original still replays.
    lt.assert_replay_of(first, api_a.debit(account, 100, metadata={"m": 1}, key=key))


def test_absent_metadata_and_empty_metadata_are_different_requests(api_a):
    """The fingerprint is the request body as canonical JSON; a body with "metadata":{} is another body."""
    account = api_a.new_account()
    key = lt.uid("k-")
    lt.assert_first(api_a.credit(account, 3, key=key))
    lt.assert_problem(api_a.credit(account, 3, metadata={}, key=key), 422, "idempotency-key-reused")
    assert api_a.balance(account) == 3


def test_reused_422_is_not_stored(api_a):
    account = api_a.new_account()
    key = lt.uid("k-")
    first = api_a.credit(account, 10, key=key)
    lt.assert_first(first)
    for _ in range(2):
        r = api_a.credit(account, 11, key=key)
        lt.assert_problem(r, 422, "idempotency-key-reused")
        assert lt.replayed(r) != "true"
    lt.assert_replay_of(first, api_a.credit(account, 10, key=key))
    assert api_a.balance(account) == 10


def test_replay_after_balances_changed_is_still_the_first_answer(api_a):
    alice = api_a.funded_account(100)
    key = lt.uid("k-")
    first = api_a.debit(alice, 100, key=key)
    lt.assert_first(first)
    assert api_a.balance(alice) == 0
    # Executing again would now fail with insufficient funds; a replay must not execute.
    lt.assert_replay_of(first, api_a.debit(alice, 100, key=key))
    assert api_a.balance(alice) == 0


def test_purged_stored_response_never_makes_a_second_transfer(api_a, sql):
    """Retention: after the stored response of a key is purged, the key still cannot make a second transfer."""
    alice = api_a.funded_account(100)
    bob = api_a.new_account()
    key = lt.uid("purge-")
    first = api_a.transfer(alice, bob, 30, key=key)
    lt.assert_first(first)
    deleted = sql(
        f"DELETE FROM ledger.idempotency_keys WHERE client_id = {lt.sql_literal(api_a.client)} "
        f"AND key = {lt.sql_literal(key)} RETURNING 1"
    )
    assert deleted == "1"
    again = api_a.transfer(alice, bob, 30, key=key)
    assert again.status_code == 201, lt.describe(again)
    assert again.json()["id"] == first.json()["id"], "the purged key must answer with its one transfer"
    assert lt.replayed(again) == "true", "nothing executes: it is a replay"
    lt.assert_problem(api_a.transfer(alice, bob, 31, key=key), 422, "idempotency-key-reused")
    assert api_a.balance(alice) == 70 and api_a.balance(bob) == 30
    n = sql(
        f"SELECT count(*) FROM ledger.transfers WHERE client_id = {lt.sql_literal(api_a.client)} "
        f"AND from_account = {lt.sql_literal(alice)}"
    )
    assert n == "1"


def test_world_account_is_one_per_client_and_currency(api_a, api_b, sql):
    currency = "XWA"  # used by this test only
    a = api_a.new_account(currency)
    b = api_b.new_account(currency)
    lt.assert_first(api_a.credit(a, 100, currency))
    lt.assert_first(api_a.credit(a, 50, currency))
    lt.assert_first(api_a.debit(a, 30, currency))
    lt.assert_first(api_b.credit(b, 7, currency))
    rows = sql(
        "SELECT client_id || '|' || balance || '|' || allow_negative FROM ledger.accounts "
        f"WHERE id = '@world:{currency}' AND client_id IN ({lt.sql_literal(api_a.client)}, {lt.sql_literal(api_b.client)}) "
        "ORDER BY client_id"
    ).splitlines()
    by_client = {line.split("|")[0]: line for line in rows}
    assert len(rows) == 2, f"one @world:{currency} per client: {rows}"
    assert by_client[api_a.client] == f"{api_a.client}|-120|true", rows
    assert by_client[api_b.client] == f"{api_b.client}|-7|true", rows
    # Each client's balances in this currency sum to 0.
    for client in (api_a.client, api_b.client):
        total = sql(
            f"SELECT sum(balance) FROM ledger.accounts WHERE client_id = {lt.sql_literal(client)} AND currency = '{currency}'"
        )
        assert total == "0", f"{client} {currency} balances sum to {total}"


def test_body_without_content_type_is_accepted(api_a):
    """The contract requires JSON bodies, not a Content-Type header."""
    account = api_a.new_account()
    data = json.dumps({"account": account, "amount": 12, "currency": "USD"}).encode()
    h = api_a.headers(lt.uid("k-"))
    r = api_a.session.post(api_a.base + "/v1/credits", data=data, headers=h, timeout=lt.TIMEOUT)
    assert "Content-Type" not in r.request.headers
    lt.assert_first(r, 201)
    assert api_a.balance(account) == 12
