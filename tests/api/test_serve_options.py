"""`ledger serve` options of the write path, set through the command line and seen over HTTP: the in-memory replay
cache (`--replay-cache-bytes-max`), group commit (`--batch-max`, `--batch-concurrency-max`) and the return of freed
heap memory (`--memory-trim-interval-s`).

Which of the two sources answered a replay (memory or the stored response in PostgreSQL) is told apart by changing
the stored response behind the service's back: only the database path can see the change."""

from __future__ import annotations

import threading
import time

import pytest

import ledgertest as lt


def tamper_stored_response(main_db: str, client: str, key: str) -> None:
    """Appends a space to the stored answer of (client, key): still JSON, and different bytes from the first answer."""
    changed = lt.psql(
        main_db,
        "UPDATE ledger.idempotency_keys SET response_body = response_body || ' ' "
        f"WHERE client_id = {lt.sql_literal(client)} AND key = {lt.sql_literal(key)} RETURNING 1",
    )
    assert changed.strip() == "1", f"no stored response for key {key!r}: {changed!r}"


def transaction_sizes(main_db: str, client: str, keys: list[str]) -> list[int]:
    """How many of the keys' transfers each transaction committed (transfers committed together share their xmin)."""
    key_list = "ARRAY[" + ",".join(lt.sql_literal(k) for k in keys) + "]"
    out = lt.psql(
        main_db,
        "SELECT count(*) FROM ledger.transfers "
        f"WHERE client_id = {lt.sql_literal(client)} AND idempotency_key = ANY ({key_list}) GROUP BY xmin::text",
    )
    return sorted(int(line) for line in out.split())


def first_transfer(api: lt.Api) -> tuple[str, dict, object]:
    source = api.funded_account(100)
    target = api.new_account()
    key = lt.uid("opt-")
    body = {"from": source, "to": target, "amount": 7, "currency": "USD"}
    first = api.post("/v1/transfers", body, key)
    lt.assert_first(first)
    return key, body, first


@pytest.mark.parametrize("cache_bytes", [None, "0"])
def test_replay_cache_answers_from_memory_unless_turned_off(main_db, clients, start_server, cache_bytes):
    args = ["--no-migrate"] + (["--replay-cache-bytes-max", cache_bytes] if cache_bytes is not None else [])
    srv = start_server(args)
    name, token = clients["a"]
    api = lt.Api(srv.base, token, name)
    key, body, first = first_transfer(api)

    tamper_stored_response(main_db, name, key)
    again = api.post("/v1/transfers", body, key)
    assert again.status_code == 201 and lt.replayed(again) == "true", lt.describe(again)
    if cache_bytes == "0":
        # No cache: the replay is the stored response, as PostgreSQL now holds it.
        assert again.content == first.content + b" ", lt.describe(again)
    else:
        # The default cache: the completed answer is kept in memory and replayed byte for byte.
        assert again.content == first.content, lt.describe(again)


def test_batch_max_1_gives_every_request_a_transaction_of_its_own(main_db, clients, start_server):
    srv = start_server(["--no-migrate", "--batch-max", "1"])
    name, token = clients["a"]
    api = lt.Api(srv.base, token, name)
    source = api.funded_account(1_000)
    targets = [api.new_account() for _ in range(4)]
    keys = [lt.uid("solo-") for _ in range(24)]

    def send(i):
        return lambda: api.transfer(source, targets[i % 4], 1, key=keys[i])

    answers = lt.parallel([send(i) for i in range(len(keys))])
    assert all(r.status_code == 201 for r in answers), [lt.describe(r) for r in answers if r.status_code != 201]
    sizes = transaction_sizes(main_db, name, keys)
    assert sizes == [1] * len(keys), f"transfers per transaction: {sizes}"
    assert api.balance(source) == 1_000 - len(keys)


def test_one_group_commit_at_a_time_still_takes_a_storm(main_db, clients, start_server):
    """--batch-concurrency-max 1 and --batch-max 4: every request answered once, exact balances, batches within 4
    (with --batch-max ignored, batches of 8 were seen)."""
    srv = start_server(["--no-migrate", "--batch-concurrency-max", "1", "--batch-max", "4"])
    name, token = clients["a"]
    api = lt.Api(srv.base, token, name)
    left, right = api.funded_account(500), api.funded_account(500)
    keys = [lt.uid("storm-") for _ in range(40)]

    def send(i):
        pair = (left, right) if i % 2 == 0 else (right, left)
        return lambda: api.transfer(*pair, 3 + i % 2, key=keys[i])

    answers = lt.parallel([send(i) for i in range(len(keys))])
    assert all(r.status_code == 201 for r in answers), [lt.describe(r) for r in answers if r.status_code != 201]
    # --batch-max 4: no transaction holds more than 4 of them.
    sizes = transaction_sizes(main_db, name, keys)
    assert sum(sizes) == len(keys) and max(sizes) <= 4, f"transfers per transaction: {sizes}"
    # 20 transfers of 3 left -> right, 20 of 4 right -> left.
    assert api.balance(left) == 500 - 60 + 80
    assert api.balance(right) == 500 + 60 - 80
    # Every answer is final: the same requests again are replays of them.
    again = lt.parallel([send(i) for i in range(len(keys))])
    for first, second in zip(answers, again):
        lt.assert_replay_of(first, second)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_batch_concurrency_max_bounds_the_transactions_running_at_once(main_db, clients, start_server, concurrency):
    """With --batch-concurrency-max N, N group-commit transactions may run at once: one stuck behind a row lock
    holds up every other request when N is 1, and none when N is 2."""
    srv = start_server(["--no-migrate", "--batch-concurrency-max", str(concurrency)])
    name, token = clients["a"]
    api = lt.Api(srv.base, token, name)
    stuck_from, stuck_to = api.funded_account(10), api.new_account()
    free_from, free_to = api.funded_account(10), api.new_account()
    results = {}
    with lt.holding_account_lock(main_db, name, stuck_from):
        stuck = threading.Thread(
            target=lambda: results.setdefault("stuck", api.clone().transfer(stuck_from, stuck_to, 1)))
        stuck.start()
        lt.wait_for_lock_waiter(main_db)
        free = threading.Thread(
            target=lambda: results.setdefault("free", api.clone().transfer(free_from, free_to, 1)))
        free.start()
        free.join(timeout=3)
        if concurrency == 1:
            assert "free" not in results, "a second transaction ran beside the stuck one"
        else:
            assert "free" in results, "the free request waited for the stuck one"
            lt.assert_first(results["free"], 201)
    stuck.join(timeout=30)
    free.join(timeout=30)
    lt.assert_first(results["stuck"], 201)
    lt.assert_first(results["free"], 201)
    assert (api.balance(stuck_to), api.balance(free_to)) == (1, 1)


def anonymous_kib(pid: int) -> int:
    """The process's private heap and stack pages (Linux: /proc/PID/smaps_rollup, Anonymous)."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    raise AssertionError("no Anonymous line in smaps_rollup")


def burst_of_batches(api: lt.Api) -> None:
    """12 requests of 1,000 transfers from 6 threads: megabytes of bodies, parsed items and answers, then freed."""
    source, target = api.funded_account(10**9), api.new_account()
    items = [{"from": source, "to": target, "amount": 1, "currency": "USD", "metadata": {"n": str(i)}}
             for i in range(1000)]
    failures = []

    def send():
        for _ in range(2):
            r = api.post("/v1/transfers/batch", {"transfers": items})
            if r.status_code != 201:
                failures.append(lt.describe(r))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:1]


def test_freed_heap_goes_back_to_the_system_unless_turned_off(main_db, clients, start_server):
    """glibc keeps what a burst freed; --memory-trim-interval-s returns it within the interval (0: never)."""
    name, token = clients["a"]
    anonymous = {}
    for interval in ["0", "1"]:
        srv = start_server(["--no-migrate", "--memory-trim-interval-s", interval])
        burst_of_batches(lt.Api(srv.base, token, name))
        time.sleep(2.5)   # idle: at least two trims of the second server
        anonymous[interval] = anonymous_kib(srv.proc.pid)
    # Measured here: about 16 MiB kept without trims, 11 MiB with them.
    assert anonymous["1"] < anonymous["0"] - 2048, f"KiB of anonymous memory by trim interval: {anonymous}"
