"""`ledger serve` options of the write path, set through the command line and seen over HTTP: the in-memory replay
cache (`--replay-cache-bytes-max`) and group commit (`--batch-max`, `--batch-concurrency-max`).

Which of the two sources answered a replay (memory or the stored response in PostgreSQL) is told apart by changing
the stored response behind the service's back: only the database path can see the change."""

from __future__ import annotations

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
    key_list = "ARRAY[" + ",".join(lt.sql_literal(k) for k in keys) + "]"
    counts = lt.psql(
        main_db,
        "SELECT count(*), count(DISTINCT xmin::text) FROM ledger.transfers "
        f"WHERE client_id = {lt.sql_literal(name)} AND idempotency_key = ANY ({key_list})",
    ).strip()
    assert counts == f"{len(keys)}|{len(keys)}", f"transfers | distinct transactions: {counts}"
    assert api.balance(source) == 1_000 - len(keys)


def test_one_group_commit_at_a_time_still_takes_a_storm(main_db, clients, start_server):
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
    # 20 transfers of 3 left -> right, 20 of 4 right -> left.
    assert api.balance(left) == 500 - 60 + 80
    assert api.balance(right) == 500 + 60 - 80
    # Every answer is final: the same requests again are replays of them.
    again = lt.parallel([send(i) for i in range(len(keys))])
    for first, second in zip(answers, again):
        lt.assert_replay_of(first, second)
