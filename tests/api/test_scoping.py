"""Client scoping: accounts, transfers and idempotency keys are namespaced per client."""

import ledgertest as lt


def test_other_client_cannot_see_account(api_a, api_b):
    account = api_a.funded_account(100)
    lt.assert_problem(api_b.get_account(account), 404, "account-not-found")
    lt.assert_problem(api_b.entries(account), 404, "account-not-found")


def test_other_client_cannot_see_transfer(api_a, api_b):
    account = api_a.new_account()
    t = lt.assert_json(api_a.credit(account, 100), 201)
    lt.assert_json(api_a.get_transfer(t["id"]), 200)
    lt.assert_problem(api_b.get_transfer(t["id"]), 404, "transfer-not-found")


def test_other_client_cannot_move_money(api_a, api_b):
    alice = api_a.funded_account(100)
    bob_b = api_b.new_account()
    lt.assert_problem(api_b.debit(alice, 10), 404, "account-not-found")
    lt.assert_problem(api_b.transfer(alice, bob_b, 10), 404, "account-not-found")
    lt.assert_problem(api_b.credit(alice, 10), 404, "account-not-found")
    assert api_a.balance(alice) == 100
    assert api_a.account(alice)["version"] == 1


def test_same_account_id_under_two_clients_is_unrelated(api_a, api_b):
    account = lt.uid("shared-")
    a = lt.assert_json(api_a.put_account(account, "USD", False), 201)
    # Other settings under another client: not a conflict, a new account.
    b = lt.assert_json(api_b.put_account(account, "EUR", True), 201)
    assert (a["currency"], b["currency"]) == ("USD", "EUR")
    lt.assert_first(api_a.credit(account, 100, "USD"))
    lt.assert_first(api_b.debit(account, 30, "EUR"))
    assert api_a.account(account)["balance"] == 100
    assert api_b.account(account)["balance"] == -30
    assert [e["amount"] for e in api_a.all_entries(account)] == [100]
    assert [e["amount"] for e in api_b.all_entries(account)] == [-30]


def test_same_key_under_two_clients_is_unrelated(api_a, api_b):
    account = lt.uid("shared-")
    lt.assert_json(api_a.put_account(account, "USD"), 201)
    lt.assert_json(api_b.put_account(account, "USD"), 201)
    key = lt.uid("k-")
    ra = api_a.credit(account, 100, key=key)
    lt.assert_first(ra)
    # Same key, same body, other client: executes its own (not a replay of A's).
    rb = api_b.credit(account, 100, key=key)
    lt.assert_first(rb)
    assert ra.json()["id"] != rb.json()["id"]
    # Each client's key replays its own answer.
    lt.assert_replay_of(ra, api_a.credit(account, 100, key=key))
    lt.assert_replay_of(rb, api_b.credit(account, 100, key=key))
    assert api_a.balance(account) == 100 and api_b.balance(account) == 100


def test_same_key_different_body_under_other_client_is_not_reused(api_a, api_b):
    account_a = api_a.new_account()
    account_b = api_b.new_account()
    key = lt.uid("k-")
    lt.assert_first(api_a.credit(account_a, 5, key=key))
    rb = api_b.credit(account_b, 7, key=key)
    lt.assert_first(rb, 201)
    assert api_b.balance(account_b) == 7


def test_stored_outcome_of_one_client_is_not_replayed_to_another(api_a, api_b):
    account = lt.uid("shared-")
    key = lt.uid("k-")
    lt.assert_problem(api_a.credit(account, 10, key=key), 404, "account-not-found")
    lt.assert_json(api_b.put_account(account, "USD"), 201)
    lt.assert_first(api_b.credit(account, 10, key=key), 201)
    assert api_b.balance(account) == 10


def test_second_token_of_a_client_sees_the_same_data(main_db, server, clients):
    name, token = clients["a"]
    token2 = lt.create_token(main_db, name)
    assert token2 != token, "a second `token create` must make a new token"
    api1 = lt.Api(server.base, token, name)
    api2 = lt.Api(server.base, token2, name)
    account = api1.funded_account(42)
    assert api2.balance(account) == 42
    key = lt.uid("k-")
    first = api1.credit(account, 1, key=key)
    lt.assert_first(first)
    # Keys are scoped per client, not per token: the second token replays.
    lt.assert_replay_of(first, api2.credit(account, 1, key=key))
    # The first token still works.
    assert api1.balance(account) == 43


def test_key_locks_of_one_client_are_out_of_another_clients_reach(api_a, api_b, main_db, sql):
    """The advisory lock of (client, key) is keyed by a secret of the service: it is not hashtextextended of the
    client and the key (invertible: a client could compute a key of its own sharing another client's lock), and while
    one client's execution of a key holds it, another client's request with the same key runs at once."""
    key = lt.uid("lock-")
    a, b = api_a.client, api_b.client

    def lock_id(client: str) -> str:
        # A call of its own: on a Citus cluster it runs on the client's node, the only one that gives its lock ids.
        return sql(f"SELECT ledger.key_lock_id({lt.sql_literal(client)}, {lt.sql_literal(key)})")

    assert lock_id(a) != sql(f"SELECT hashtextextended({lt.sql_literal(a + ' ' + key)}, 0)")
    assert lock_id(a) != lock_id(b)
    account_a, account_b = api_a.new_account(), api_b.new_account()
    with lt.holding_key_lock(main_db, a, key):
        lt.assert_json(api_b.credit(account_b, 5, key=key), 201)
        r = api_a.post("/v1/credits", {"account": account_a, "amount": 5, "currency": "USD"}, key=key,
                       headers={"Prefer": "wait=0"})
        lt.assert_problem(r, 409, "idempotency-key-in-progress")
    lt.assert_json(api_a.credit(account_a, 5, key=key), 201)


def test_key_lock_ids_change_with_the_secret(scratch_db):
    lt.migrate(scratch_db)
    before = lt.psql(scratch_db, "SELECT ledger.key_lock_id('c', 'k')")
    lt.psql(scratch_db, "UPDATE ledger.service_keys SET key = sha256(key) WHERE name = 'key-lock'")
    assert lt.psql(scratch_db, "SELECT ledger.key_lock_id('c', 'k')") != before
