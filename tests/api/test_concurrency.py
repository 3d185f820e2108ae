"""Real parallel HTTP: one key executes exactly once (on one process and across two), no lost updates, no 5xx."""

import threading
import time
from collections import Counter

import requests

import ledgertest as lt


def count_transfers(sql, client, where):
    return int(sql(f"SELECT count(*) FROM ledger.transfers WHERE client_id = {lt.sql_literal(client)} AND {where}"))


def no_5xx(responses):
    bad = [lt.describe(r) for r in responses if r.status_code >= 500]
    assert not bad, "5xx under contention:\n" + "\n".join(bad)


def storm_one_key(apis, account, key, n=40, amount=100):
    """n identical credits with one key, spread over `apis` (one per server), all released at once."""

    def make(i):
        api = apis[i % len(apis)].clone()
        return lambda: api.credit(account, amount, key=key)

    return lt.parallel([make(i) for i in range(n)])


def assert_storm_outcome(responses, api, sql, account, key, amount, n):
    no_5xx(responses)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == Counter({201: n}), f"every request must get 201: {statuses}; e.g. " + "; ".join(
        lt.describe(r) for r in responses if r.status_code != 201
    )[:2000]
    bodies = {r.content for r in responses}
    assert len(bodies) == 1, f"all {n} answers must be the same bytes, got {len(bodies)} variants: {list(bodies)[:3]}"
    flags = Counter(lt.replayed(r) for r in responses)
    assert flags == Counter({"false": 1, "true": n - 1}), f"exactly one execution: Idempotent-Replayed counts {flags}"
    assert api.balance(account) == amount, "the credit must apply exactly once"
    assert len(api.all_entries(account)) == 1
    assert count_transfers(sql, api.client, f"to_account = {lt.sql_literal(account)}") == 1
    assert count_transfers(sql, api.client, f"idempotency_key = {lt.sql_literal(key)}") == 1


def test_storm_one_key_one_process(api_a, sql):
    account = api_a.new_account()
    key = lt.uid("storm-")
    responses = storm_one_key([api_a], account, key, 40, 100)
    assert_storm_outcome(responses, api_a, sql, account, key, 100, 40)


def test_storm_one_key_two_processes(api_a, sql, second_server):
    api2 = api_a.clone(second_server.base)
    for round_ in range(3):
        account = api_a.new_account()
        key = lt.uid(f"storm2-{round_}-")
        responses = storm_one_key([api_a, api2], account, key, 40, 100 + round_)
        assert_storm_outcome(responses, api_a, sql, account, key, 100 + round_, 40)


def test_storm_one_key_transfer_two_processes(api_a, sql, second_server):
    api2 = api_a.clone(second_server.base)
    alice = api_a.funded_account(1000)
    bob = api_a.new_account()
    key = lt.uid("storm-t-")

    def make(i):
        api = (api_a if i % 2 else api2).clone()
        return lambda: api.transfer(alice, bob, 600, key=key)

    responses = lt.parallel([make(i) for i in range(30)])
    no_5xx(responses)
    assert Counter(r.status_code for r in responses) == Counter({201: 30})
    assert len({r.content for r in responses}) == 1
    assert Counter(lt.replayed(r) for r in responses) == Counter({"false": 1, "true": 29})
    assert api_a.balance(alice) == 400 and api_a.balance(bob) == 600


def test_storm_stored_failure_one_key(api_a, second_server):
    """A stored 422 under contention: every request gets the same 422, exactly one execution."""
    api2 = api_a.clone(second_server.base)
    account = api_a.funded_account(10)
    key = lt.uid("storm-f-")

    def make(i):
        api = (api_a if i % 2 else api2).clone()
        return lambda: api.debit(account, 11, key=key)

    responses = lt.parallel([make(i) for i in range(20)])
    no_5xx(responses)
    for r in responses:
        lt.assert_problem(r, 422, "insufficient-funds")
    assert len({r.content for r in responses}) == 1
    assert Counter(lt.replayed(r) for r in responses) == Counter({"false": 1, "true": 19})
    assert api_a.account(account)["version"] == 1


def test_parallel_debits_never_overdraw(api_a):
    account = api_a.funded_account(1000)

    def make():
        api = api_a.clone()
        return lambda: api.debit(account, 100)

    responses = lt.parallel([make() for _ in range(20)])
    no_5xx(responses)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == Counter({201: 10, 422: 10}), f"exactly 10 debits fit into 1000: {statuses}"
    for r in responses:
        if r.status_code == 422:
            lt.assert_problem(r, 422, "insufficient-funds")
        else:
            assert lt.replayed(r) == "false"
    got = api_a.account(account)
    assert (got["balance"], got["version"]) == (0, 11)
    entries = api_a.all_entries(account)
    assert len(entries) == 11
    assert sorted(e["balance_after"] for e in entries) == list(range(0, 1001, 100))


def test_parallel_debits_two_processes(api_a, second_server):
    api2 = api_a.clone(second_server.base)
    account = api_a.funded_account(1000)

    def make(i):
        api = (api_a if i % 2 else api2).clone()
        return lambda: api.debit(account, 100)

    responses = lt.parallel([make(i) for i in range(20)])
    no_5xx(responses)
    assert Counter(r.status_code for r in responses) == Counter({201: 10, 422: 10})
    assert api_a.balance(account) == 0


def test_opposite_transfers_do_not_deadlock(api_a, second_server):
    api2 = api_a.clone(second_server.base)
    a = api_a.funded_account(1000)
    b = api_a.funded_account(1000)

    def make(i):
        api = (api_a if i % 2 else api2).clone()
        if i % 4 < 2:
            return lambda: api.transfer(a, b, 7)
        return lambda: api.transfer(b, a, 5)

    responses = lt.parallel([make(i) for i in range(60)])
    no_5xx(responses)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == Counter({201: 60}), f"all transfers must succeed: {statuses}: " + "; ".join(
        lt.describe(r) for r in responses if r.status_code != 201
    )[:2000]
    # 30 of 7 from a to b, 30 of 5 from b to a.
    assert api_a.balance(a) == 1000 - 30 * 7 + 30 * 5
    assert api_a.balance(b) == 1000 + 30 * 7 - 30 * 5
    assert api_a.account(a)["version"] == 61 and api_a.account(b)["version"] == 61


def test_many_keys_on_one_account_no_lost_update(api_a, second_server):
    api2 = api_a.clone(second_server.base)
    account = api_a.new_account()

    def make(i):
        api = (api_a if i % 2 else api2).clone()
        return lambda: api.credit(account, i + 1)

    responses = lt.parallel([make(i) for i in range(40)])
    no_5xx(responses)
    assert all(r.status_code == 201 for r in responses), [lt.describe(r) for r in responses if r.status_code != 201]
    assert api_a.balance(account) == sum(range(1, 41))
    entries = api_a.all_entries(account)
    assert len(entries) == 40
    running = 0
    for e in reversed(entries):
        running += e["amount"]
        assert e["balance_after"] == running, "balance_after must follow the entries without gaps"


def test_mixed_keys_storm(api_a, sql, second_server):
    """5 keys x 8 copies each, all at once on two processes: exactly 5 executions."""
    api2 = api_a.clone(second_server.base)
    account = api_a.new_account()
    keys = [lt.uid("mix-") for _ in range(5)]

    def make(i):
        api = (api_a if i % 2 else api2).clone()
        key = keys[i % 5]
        return lambda: api.credit(account, 10, key=key)

    responses = lt.parallel([make(i) for i in range(40)])
    no_5xx(responses)
    assert all(r.status_code == 201 for r in responses)
    assert Counter(lt.replayed(r) for r in responses) == Counter({"false": 5, "true": 35})
    for key in keys:
        bodies = {r.content for r, i in zip(responses, range(40)) if keys[i % 5] == key}
        assert len(bodies) == 1
    assert api_a.balance(account) == 50
    assert count_transfers(sql, api_a.client, f"to_account = {lt.sql_literal(account)}") == 5


def test_parallel_put_same_account(api_a, second_server):
    api2 = api_a.clone(second_server.base)
    account = lt.uid("acc-")

    def make(i):
        api = (api_a if i % 2 else api2).clone()
        return lambda: api.put_account(account, "USD")

    responses = lt.parallel([make(i) for i in range(20)])
    no_5xx(responses)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == Counter({201: 1, 200: 19}), f"one creation, 19 identical: {statuses}"
    bodies = [r.json() for r in responses]
    assert all(b == bodies[0] for b in bodies)


def test_key_in_progress_beyond_wait_is_409(api_a, main_db, start_server):
    """A request with a key whose first execution is still running after --key-wait-ms gets 409 with Retry-After,
    and executes nothing; once the first finishes, the key replays. The first execution is held up by a row lock that
    psql holds on the account."""
    srv = start_server(["--key-wait-ms", "300"])
    api = api_a.clone(srv.base)
    currency = "XIP"  # a currency of its own, so no other test's @world is touched
    account = api.new_account(currency)
    key = lt.uid("slow-")
    result = {}
    with lt.holding_account_lock(main_db, api.client, account):

        def first():
            result["first"] = api.clone().credit(account, 9, currency, key=key)

        t = threading.Thread(target=first)
        t.start()
        lt.wait_for_lock_waiter(main_db)
        started = time.monotonic()
        second = api.clone().credit(account, 9, currency, key=key)
        elapsed = time.monotonic() - started
        lt.assert_problem(second, 409, "idempotency-key-in-progress")
        retry_after = second.headers.get("Retry-After")
        assert retry_after is not None and retry_after.strip().isdigit(), (
            f"409 in progress must carry Retry-After (seconds): {lt.describe(second)}"
        )
        assert elapsed < 5, f"the wait must be bounded by --key-wait-ms 300, took {elapsed:.1f}s"
        assert "first" not in result, "the first request must still be running"
    t.join(timeout=30)
    first_r = result["first"]
    lt.assert_first(first_r, 201)
    lt.assert_replay_of(first_r, api.credit(account, 9, currency, key=key))
    assert api.balance(account) == 9


def test_graceful_shutdown_finishes_inflight_request(api_a, main_db, start_server):
    srv = start_server(["--no-migrate"])
    api = api_a.clone(srv.base)
    currency = "XGS"
    account = api.new_account(currency)
    key = lt.uid("inflight-")
    result = {}
    with lt.holding_account_lock(main_db, api.client, account):

        def inflight():
            try:
                result["r"] = api.clone().credit(account, 3, currency, key=key)
            except requests.RequestException as e:
                result["error"] = e

        t = threading.Thread(target=inflight)
        t.start()
        lt.wait_for_lock_waiter(main_db)
        srv.proc.send_signal(15)  # SIGTERM
        time.sleep(0.5)
        assert srv.proc.poll() is None, "the server must wait for the in-flight request before exiting"
    t.join(timeout=30)
    assert "error" not in result, f"in-flight request failed during graceful shutdown: {result.get('error')!r}"
    lt.assert_first(result["r"], 201)
    rc = srv.stop()
    assert rc == 0, f"ledger serve must exit 0 after SIGTERM, got {rc}:\n{srv.log_tail()}"
    # The credit committed exactly once.
    lt.assert_replay_of(result["r"], api_a.credit(account, 3, currency, key=key))
    assert api_a.balance(account) == 3


def test_statement_timeout_is_503_and_stores_nothing(api_a, main_db, start_server):
    """A statement over --statement-timeout-ms is 503 database-unavailable with Retry-After, rolled back, not stored:
    the same key executes afterwards."""
    srv = start_server(["--no-migrate", "--statement-timeout-ms", "500"])
    api = api_a.clone(srv.base)
    currency = "XST"
    account = api.new_account(currency)
    key = lt.uid("timeout-")
    with lt.holding_account_lock(main_db, api.client, account):
        started = time.monotonic()
        r = api.credit(account, 4, currency, key=key)
        elapsed = time.monotonic() - started
        lt.assert_problem(r, 503, "database-unavailable")
        assert r.headers.get("Retry-After", "").strip().isdigit(), f"503 needs Retry-After: {lt.describe(r)}"
        # The bound holds (directly and behind a transaction-mode pooler): well before the lock would be let go.
        assert elapsed < 5, f"the 500 ms statement bound answered only after {elapsed:.1f} s"
    assert api_a.balance(account) == 0
    n = lt.psql(
        main_db,
        f"SELECT count(*) FROM ledger.idempotency_keys WHERE client_id = {lt.sql_literal(api.client)} "
        f"AND key = {lt.sql_literal(key)}",
    )
    assert n == "0", "a 503 must not be stored"
    # 503s retried: on a loaded machine the credit may still pass the 500 ms bound; each stores nothing.
    r = lt.retrying_503(lambda: api.credit(account, 4, currency, key=key))
    lt.assert_first(r, 201)
    assert api_a.balance(account) == 4


def test_statement_timeout_of_one_process_stays_with_it(api_a, main_db, start_server):
    """--statement-timeout-ms bounds the statements of its own process only. A process with a short bound runs
    statements first (behind a transaction-mode pooler, on server connections other processes get next); then a
    request of the session's server (default bound, 10 s) that waits over a second on a row lock still succeeds."""
    short = start_server(["--no-migrate", "--statement-timeout-ms", "300"])
    api_short = api_a.clone(short.base)
    # Only that its statements ran matters: on a loaded machine (or a Citus cluster, one more hop per call) some may
    # exceed the 300 ms bound, and a 503 then is that bound doing its job.
    warmups = lt.parallel([lambda: api_short.clone().put_account(lt.uid("acct-"), "XLK") for _ in range(32)])
    assert all(r.status_code in (201, 503) for r in warmups), [lt.describe(r) for r in warmups if r.status_code != 201]
    account = api_a.new_account("XLK")
    key = lt.uid("noleak-")
    result = {}
    with lt.holding_account_lock(main_db, api_a.client, account):
        waiter = threading.Thread(
            target=lambda: result.setdefault("r", api_a.clone().credit(account, 2, "XLK", key=key)))
        waiter.start()
        lt.wait_for_lock_waiter(main_db)
        time.sleep(1.2)
    waiter.join(timeout=30)
    lt.assert_first(result["r"], 201)
    assert api_a.balance(account) == 2


def test_storm_one_key_two_different_bodies(api_a, sql, second_server):
    """One key, two different requests racing on two processes: exactly one executes; every copy of the winning
    request replays it, every copy of the other gets 422 idempotency-key-reused."""
    api2 = api_a.clone(second_server.base)
    account = api_a.new_account()
    key = lt.uid("race-")

    def make(i):
        api = (api_a if i % 2 else api2).clone()
        amount = 10 if (i // 2) % 2 else 20
        return lambda: (amount, api.credit(account, amount, key=key))

    results = lt.parallel([make(i) for i in range(24)])
    no_5xx([r for _, r in results])
    winners = {amount for amount, r in results if r.status_code == 201}
    assert len(winners) == 1, f"exactly one request may win the key: {[(a, r.status_code) for a, r in results]}"
    winner = winners.pop()
    for amount, r in results:
        if amount == winner:
            assert r.status_code == 201, lt.describe(r)
        else:
            lt.assert_problem(r, 422, "idempotency-key-reused")
    won = [r for amount, r in results if amount == winner]
    assert len({r.content for r in won}) == 1
    assert Counter(lt.replayed(r) for r in won) == Counter({"false": 1, "true": len(won) - 1})
    assert api_a.balance(account) == winner
    assert count_transfers(sql, api_a.client, f"to_account = {lt.sql_literal(account)}") == 1


def test_parallel_put_with_conflicting_settings(api_a, second_server):
    api2 = api_a.clone(second_server.base)
    account = lt.uid("acc-")

    def make(i):
        api = (api_a if i % 2 else api2).clone()
        currency = "USD" if (i // 2) % 2 else "EUR"
        return lambda: (currency, api.put_account(account, currency))

    results = lt.parallel([make(i) for i in range(20)])
    no_5xx([r for _, r in results])
    created = [(c, r) for c, r in results if r.status_code == 201]
    assert len(created) == 1, f"exactly one creation: {[(c, r.status_code) for c, r in results]}"
    winner = created[0][0]
    for currency, r in results:
        if currency == winner:
            assert r.status_code in (200, 201), lt.describe(r)
            assert r.json()["currency"] == winner
        else:
            lt.assert_problem(r, 409, "account-conflict")
