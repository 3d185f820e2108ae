"""Business outcomes that are stored and replayed: 404 account-not-found, 422 insufficient-funds,
422 currency-mismatch, 422 balance-overflow."""

import pytest

import ledgertest as lt


def assert_stored_problem(first, again, status, code):
    lt.assert_problem(first, status, code)
    assert lt.replayed(first) == "false", f"first execution of a stored outcome: {lt.describe(first)}"
    lt.assert_problem(again, status, code)
    lt.assert_replay_of(first, again)


def test_credit_to_unknown_account_is_stored_404(api_a):
    account = lt.uid("later-")
    key = lt.uid("k-")
    first = api_a.credit(account, 100, key=key)
    lt.assert_problem(first, 404, "account-not-found")
    # Create the account: the key still answers with its stored 404 and executes nothing.
    lt.assert_json(api_a.put_account(account, "USD"), 201)
    again = api_a.credit(account, 100, key=key)
    assert_stored_problem(first, again, 404, "account-not-found")
    assert api_a.balance(account) == 0
    # A new key executes.
    lt.assert_first(api_a.credit(account, 100), 201)
    assert api_a.balance(account) == 100


def test_debit_from_unknown_account_is_stored_404(api_a):
    account = lt.uid("later-")
    key = lt.uid("k-")
    first = api_a.debit(account, 1, key=key)
    lt.assert_problem(first, 404, "account-not-found")
    api_a.put_account(account, "USD", True)
    assert_stored_problem(first, api_a.debit(account, 1, key=key), 404, "account-not-found")
    assert api_a.account(account)["version"] == 0


@pytest.mark.parametrize("missing", ["from", "to", "both"])
def test_transfer_with_unknown_account_is_stored_404(api_a, missing):
    known = api_a.funded_account(100)
    ghost = lt.uid("ghost-")
    ghost2 = lt.uid("ghost-")
    from_, to = {"from": (ghost, known), "to": (known, ghost), "both": (ghost, ghost2)}[missing]
    key = lt.uid("k-")
    first = api_a.transfer(from_, to, 10, key=key)
    lt.assert_problem(first, 404, "account-not-found")
    for g in (ghost, ghost2):
        api_a.put_account(g, "USD", True)
    again = api_a.transfer(from_, to, 10, key=key)
    assert_stored_problem(first, again, 404, "account-not-found")
    assert api_a.balance(known) == 100


def test_insufficient_funds_is_stored(api_a):
    account = api_a.funded_account(50)
    key = lt.uid("k-")
    first = api_a.debit(account, 80, key=key)
    lt.assert_problem(first, 422, "insufficient-funds")
    assert api_a.account(account) | {"created_at": 0} == {
        "id": account, "currency": "USD", "balance": 50, "allow_negative": False, "version": 1, "created_at": 0,
        "held": 0, "available": 50,
    }
    # Fund the account: the key still answers with the stored 422 and executes nothing.
    lt.assert_first(api_a.credit(account, 1000))
    again = api_a.debit(account, 80, key=key)
    assert_stored_problem(first, again, 422, "insufficient-funds")
    assert api_a.balance(account) == 1050
    # A different request under the same key is still 422 reused, not the stored outcome.
    lt.assert_problem(api_a.debit(account, 81, key=key), 422, "idempotency-key-reused")


def test_transfer_insufficient_funds_is_stored(api_a):
    alice = api_a.funded_account(10)
    bob = api_a.new_account()
    key = lt.uid("k-")
    first = api_a.transfer(alice, bob, 11, key=key)
    lt.assert_problem(first, 422, "insufficient-funds")
    lt.assert_first(api_a.credit(alice, 100))
    assert_stored_problem(first, api_a.transfer(alice, bob, 11, key=key), 422, "insufficient-funds")
    assert api_a.balance(alice) == 110 and api_a.balance(bob) == 0


def test_insufficient_funds_on_empty_account(api_a):
    account = api_a.new_account()
    lt.assert_problem(api_a.debit(account, 1), 422, "insufficient-funds")
    other = api_a.new_account()
    lt.assert_problem(api_a.transfer(account, other, 1), 422, "insufficient-funds")


@pytest.mark.parametrize("kind", ["credit", "debit", "transfer-from", "transfer-to", "transfer-request"])
def test_currency_mismatch_is_stored(api_a, kind):
    usd = api_a.funded_account(100, "USD")
    usd2 = api_a.funded_account(100, "USD")
    eur = api_a.funded_account(100, "EUR")
    key = lt.uid("k-")
    call = {
        "credit": lambda: api_a.credit(usd, 10, "EUR", key=key),
        "debit": lambda: api_a.debit(eur, 10, "USD", key=key),
        "transfer-from": lambda: api_a.transfer(eur, usd, 10, "USD", key=key),
        "transfer-to": lambda: api_a.transfer(usd, eur, 10, "USD", key=key),
        "transfer-request": lambda: api_a.transfer(usd, usd2, 10, "GBP", key=key),
    }[kind]
    first = call()
    lt.assert_problem(first, 422, "currency-mismatch")
    assert_stored_problem(first, call(), 422, "currency-mismatch")
    for account in (usd, usd2, eur):
        got = api_a.account(account)
        assert (got["balance"], got["version"]) == (100, 1), f"nothing may change on a currency mismatch: {got}"


def test_stored_outcome_replays_after_other_changes(api_a):
    """The 404's replay is byte-identical even though a replay at that time would otherwise succeed."""
    ghost = lt.uid("ghost-")
    key = lt.uid("k-")
    first = api_a.credit(ghost, 7, key=key)
    lt.assert_problem(first, 404, "account-not-found")
    api_a.put_account(ghost, "USD")
    for _ in range(3):
        lt.assert_replay_of(first, api_a.credit(ghost, 7, key=key))
    assert api_a.balance(ghost) == 0


# ---------------------------------------------------------------------------------------------------------------------
# balance-overflow: balances near the signed 64-bit limits, reached through real transfers made by the database's own
# transfer function (1024 transfers of 2^53-1 in one transaction), so that every invariant still holds.


@pytest.fixture(scope="module")
def overflow_client(main_db, server):
    name = "ovf." + lt.uid()
    token = lt.create_token(main_db, name)
    api = lt.Api(server.base, token, name)
    for account, currency, allow_negative in [
        ("big", "XOV", False),
        ("neg", "XOW", True),
        ("sink", "XOW", False),
        ("src", "XOW", False),
    ]:
        lt.assert_json(api.put_account(account, currency, allow_negative), 201)
    c = lt.sql_literal(name)
    lt.psql(
        main_db,
        f"""
        DO $$
        DECLARE r record;
        BEGIN
          FOR i IN 1..1024 LOOP
            SELECT * INTO r FROM ledger.post_transfer({c}, 'seed-big-' || i, 'seed-big-' || i, NULL, 'big',
                                                     9007199254740991, 'XOV', '{{}}'::jsonb, NULL, 5000);
            IF r.status_code <> 201 THEN RAISE EXCEPTION 'seed credit % failed: %', i, r.response_body; END IF;
            SELECT * INTO r FROM ledger.post_transfer({c}, 'seed-neg-' || i, 'seed-neg-' || i, 'neg', 'sink',
                                                     9007199254740991, 'XOW', '{{}}'::jsonb, NULL, 5000);
            IF r.status_code <> 201 THEN RAISE EXCEPTION 'seed transfer % failed: %', i, r.response_body; END IF;
          END LOOP;
        END $$;
        """,
    )
    return api


SEEDED = 1024 * lt.AMOUNT_MAX  # = 2^63 - 1024


def test_seeded_balances(overflow_client):
    api = overflow_client
    assert SEEDED == lt.INT64_MAX - 1023
    assert api.account("big")["balance"] == SEEDED
    assert api.account("big")["version"] == 1024
    assert api.account("neg")["balance"] == -SEEDED
    assert api.account("sink")["balance"] == SEEDED


def test_credit_overflow_is_stored_422(overflow_client):
    api = overflow_client
    key = lt.uid("k-")
    first = api.credit("big", 1024, "XOV", key=key)
    lt.assert_problem(first, 422, "balance-overflow")
    assert lt.replayed(first) == "false"
    assert api.balance("big") == SEEDED
    lt.assert_replay_of(first, api.credit("big", 1024, "XOV", key=key))
    # Exactly up to the maximum is fine, and is exact in JSON.
    lt.assert_first(api.credit("big", 1023, "XOV"))
    got = api.account("big")
    assert got["balance"] == lt.INT64_MAX, f"balance must be exactly 2^63-1: {got}"
    lt.assert_problem(api.credit("big", 1, "XOV"), 422, "balance-overflow")
    # Take it back down: after debits the stored overflow still replays, unchanged.
    lt.assert_first(api.debit("big", 1023, "XOV"))
    lt.assert_replay_of(first, api.credit("big", 1024, "XOV", key=key))
    assert api.balance("big") == SEEDED


def test_debit_below_int64_min_is_overflow(overflow_client):
    api = overflow_client
    key = lt.uid("k-")
    first = api.debit("neg", 1025, "XOW", key=key)
    lt.assert_problem(first, 422, "balance-overflow")
    lt.assert_replay_of(first, api.debit("neg", 1025, "XOW", key=key))
    assert api.balance("neg") == -SEEDED
    # Exactly down to the minimum is fine.
    lt.assert_first(api.debit("neg", 1024, "XOW"))
    got = api.account("neg")
    assert got["balance"] == lt.INT64_MIN, f"balance must be exactly -2^63: {got}"
    lt.assert_problem(api.debit("neg", 1, "XOW"), 422, "balance-overflow")
    entries = lt.assert_json(api.entries("neg", limit=1), 200)["entries"]
    assert entries[0]["balance_after"] == lt.INT64_MIN and entries[0]["amount"] == -1024
    # Bring it back so that later checks stay simple.
    lt.assert_first(api.credit("neg", 1024, "XOW"))


def test_transfer_into_full_account_is_overflow(overflow_client):
    api = overflow_client
    lt.assert_first(api.credit("src", 5000, "XOW"))
    key = lt.uid("k-")
    first = api.transfer("src", "sink", 1024, "XOW", key=key)
    lt.assert_problem(first, 422, "balance-overflow")
    lt.assert_replay_of(first, api.transfer("src", "sink", 1024, "XOW", key=key))
    assert api.balance("src") == 5000 and api.balance("sink") == SEEDED
    lt.assert_first(api.transfer("src", "sink", 1023, "XOW"))
    assert api.balance("sink") == lt.INT64_MAX
    lt.assert_first(api.debit("sink", 1023, "XOW"))
