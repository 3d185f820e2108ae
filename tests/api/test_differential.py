"""One set of money rules: a seeded random workload run through every path leaves the same ledger.

The paths: lone requests over HTTP (`ledger serve --batch-max 1`), group commit (`ledger.post_transfers`, the call
the service makes for concurrent requests, given the whole workload at once so that its order is fixed), and the
batch endpoint (`POST /v1/transfers/batch`, not atomic). They must give the same stored bodies (statuses, problems,
transfers), balances, versions and entries, and leave the same rows (no `@world` of a currency that only failing
requests named). Set LEDGER_DIFF_SEED to replay a failing seed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

import ledgertest as lt

SEED = int(os.environ.get("LEDGER_DIFF_SEED", "20261130"))
CLIENT = "diff"
# Ids and currencies: USD and EUR accounts, one allowed to go negative, one that never exists.
ACCOUNTS = {"u0": ("USD", False), "u1": ("USD", False), "u2": ("USD", True), "e0": ("EUR", False),
            "e1": ("EUR", True), "big": ("USD", True)}
UNKNOWN = "ghost"
# `big` gets 2^63 - 1024 from `u2` first (not from `@world`, whose balance would leave the int64 range), so that one
# more large credit to `big` or debit of `u2` overflows.
BIG_CREDITS = 1024


def workload(rng: random.Random, count: int, kinds=("credit", "debit", "transfer")) -> list[dict]:
    """`count` requests: {"kind", "from", "to", "amount", "currency", "metadata"} with None for `@world`."""
    ids = list(ACCOUNTS) + [UNKNOWN]
    ops = []
    for _ in range(count):
        kind = rng.choice(kinds)
        currency = rng.choice(["USD", "USD", "EUR", "GBP" if kind != "transfer" else "USD"])
        amount = rng.choice([1, 7, 50, 400, 2500, lt.AMOUNT_MAX])
        a = rng.choice(ids)
        b = rng.choice([x for x in ids if x != a])
        metadata = rng.choice([None, {}, {"n": rng.randrange(1000)}, {"order": "A-" + str(rng.randrange(99))}])
        op = {"kind": kind, "from": a if kind != "credit" else None, "to": b if kind != "debit" else None,
              "amount": amount, "currency": currency, "metadata": metadata}
        ops.append(op)
    return ops


def http_call(op: dict) -> tuple[str, dict]:
    """The path and body of one request."""
    body = {"amount": op["amount"], "currency": op["currency"]}
    if op["kind"] == "credit":
        body["account"] = op["to"]
    elif op["kind"] == "debit":
        body["account"] = op["from"]
    else:
        body["from"], body["to"] = op["from"], op["to"]
    if op["metadata"] is not None:
        body["metadata"] = op["metadata"]
    return f"/v1/{op['kind']}s", body


def prepare(db: str) -> tuple[lt.Api, lt.LedgerServer]:
    """A migrated database with the accounts, funded identically, and a server on it with group commit off."""
    lt.migrate(db)
    # Transfer ids are random (sql/0011_transfer_ids.sql); here they come from a sequence of the database's own, so
    # that the same transfers made in the same order get the same ids on every path and the ledgers compare whole.
    lt.psql(db, "CREATE SEQUENCE public.transfer_ids; "
                "ALTER TABLE ledger.transfers ALTER COLUMN id SET DEFAULT nextval('public.transfer_ids')")
    token = lt.create_token(db, CLIENT)
    srv = lt.LedgerServer.healthy(db, extra_args=["--batch-max", "1"])
    api = lt.Api(srv.base, token, CLIENT)
    for account, (currency, negative) in ACCOUNTS.items():
        assert api.put_account(account, currency, negative).status_code == 201
    for i, (account, amount) in enumerate([("u0", 5000), ("u1", 300), ("e0", 900)]):
        lt.assert_json(api.credit(account, amount, ACCOUNTS[account][0], key=f"fund-{i}"), 201)
    credits = [{"kind": "transfer", "from": "u2", "to": "big", "amount": lt.AMOUNT_MAX, "currency": "USD",
                "metadata": None}] * BIG_CREDITS
    for start in range(0, BIG_CREDITS, 1000):
        assert all(status == 201 for status, _ in run_grouped(db, credits[start:start + 1000], f"big-{start}-"))
    return api, srv


def run_alone(api: lt.Api, ops: list[dict]) -> list[tuple[int, dict]]:
    out = []
    for i, op in enumerate(ops):
        path, body = http_call(op)
        r = api.post(path, body, key=f"op-{i}")
        assert r.status_code in (201, 404, 422), lt.describe(r)
        out.append((r.status_code, r.json()))
    return out


def run_grouped(db: str, ops: list[dict], prefix: str = "op-") -> list[tuple[int, dict]]:
    items = []
    for i, op in enumerate(ops):
        path, body = http_call(op)
        items.append({"key": f"{prefix}{i}", "request": "POST " + path + "\n" + json.dumps(body, sort_keys=True),
                      "from": op["from"], "to": op["to"], "amount": op["amount"], "currency": op["currency"],
                      "metadata": op["metadata"] if op["metadata"] is not None else {}})
    # Through standard input: the statement is larger than one command-line argument may be.
    proc = subprocess.run(
        ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", lt.conninfo(db)],
        input="SELECT item, outcome, status_code, response_body FROM ledger.post_transfers("
              f"{lt.sql_literal(CLIENT)}, {lt.sql_literal(json.dumps(items))}) ORDER BY item;",
        capture_output=True, text=True, timeout=120, check=True)
    rows = proc.stdout.strip()
    out = []
    for line in rows.splitlines():
        item, outcome, status, body = line.split("|", 3)
        assert outcome == "executed", line
        out.append((int(status), json.loads(body)))
    assert len(out) == len(ops)
    return out


def run_batch(api: lt.Api, ops: list[dict]) -> list[tuple[int, dict]]:
    transfers = [http_call(op)[1] for op in ops]
    r = api.post("/v1/transfers/batch", {"atomic": False, "transfers": transfers}, key="the-batch")
    body = lt.assert_json(r, 201)
    return [(x["status"], x.get("transfer") or x.get("problem")) for x in body["results"]]


def stored_bodies(db: str) -> dict[str, tuple[int, dict]]:
    rows = lt.psql(db, "SELECT key, status_code, response_body FROM ledger.idempotency_keys "
                   f"WHERE client_id = {lt.sql_literal(CLIENT)} AND key LIKE 'op-%'")
    out = {}
    for line in rows.splitlines():
        key, status, body = line.split("|", 2)
        out[key] = (int(status), json.loads(body))
    return out


def ledger_rows(db: str) -> dict:
    """Accounts (balance, version), entries and transfers, with created_at left out and transfer ids as they are:
    each database starts empty and makes the same transfers in the same order, its ids from a sequence (prepare)."""
    c = lt.sql_literal(CLIENT)
    accounts = lt.psql(db, f"SELECT id, currency, balance, version FROM ledger.accounts WHERE client_id = {c} ORDER BY id")
    entries = lt.psql(db, "SELECT account_id, account_version, transfer_id, amount, balance_after FROM ledger.entries "
                      f"WHERE client_id = {c} ORDER BY account_id, account_version")
    transfers = lt.psql(db, "SELECT id, from_account, to_account, amount, currency, metadata FROM ledger.transfers "
                        f"WHERE client_id = {c} ORDER BY id")
    return {"accounts": accounts.splitlines(), "entries": entries.splitlines(), "transfers": transfers.splitlines()}


def without_times(outcomes: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    return [(status, {k: v for k, v in body.items() if k != "created_at"}) for status, body in outcomes]


@pytest.fixture
def three_databases():
    names = [lt.create_database("ledger_diff") for _ in range(3)]
    servers = []
    yield names, servers
    for srv in servers:
        srv.stop()
    for name in names:
        lt.drop_database(name)


def prepared(three_databases):
    names, servers = three_databases
    apis = []
    for db in names:
        api, srv = prepare(db)
        servers.append(srv)
        apis.append(api)
    return names, apis


def assert_all_alike(names, outcomes):
    first = without_times(outcomes[0])
    for other in outcomes[1:]:
        assert without_times(other) == first, f"seed {SEED}: answers differ between paths"
    rows = [ledger_rows(db) for db in names]
    for other in rows[1:]:
        assert other == rows[0], f"seed {SEED}: the ledgers differ between paths"
    for db in names:
        assert lt.verify(db).returncode == 0


def test_credits_debits_transfers_alone_and_grouped(three_databases):
    names, apis = prepared(three_databases)
    ops = workload(random.Random(SEED), 300)
    alone = run_alone(apis[0], ops)
    grouped = run_grouped(names[1], ops)
    assert_all_alike(names[:2], [alone, grouped])
    # The stored bodies are the answers, byte for byte apart from the time they were made.
    for db, outcomes in ((names[0], alone), (names[1], grouped)):
        stored = stored_bodies(db)
        assert [stored[f"op-{i}"] for i in range(len(ops))] == outcomes
    codes = {body.get("code") for status, body in alone if status != 201}
    assert {"account-not-found", "insufficient-funds", "currency-mismatch", "balance-overflow"} <= codes, codes
    assert any(status == 201 for status, _ in alone)
    # GBP was credited or debited, but no GBP account exists: every such request failed and none left `@world:GBP`.
    world = lt.psql(names[0], f"SELECT string_agg(id, ',' ORDER BY id) FROM ledger.accounts "
                    f"WHERE client_id = {lt.sql_literal(CLIENT)} AND id LIKE '@world:%'")
    assert world == "@world:EUR,@world:USD"


def test_transfers_alone_grouped_and_in_a_batch(three_databases):
    names, apis = prepared(three_databases)
    ops = workload(random.Random(SEED + 1), 300, kinds=("transfer",))
    alone = run_alone(apis[0], ops)
    grouped = run_grouped(names[1], ops)
    batched = run_batch(apis[2], ops)
    assert_all_alike(names, [alone, grouped, batched])
    codes = {body.get("code") for status, body in alone if status != 201}
    assert {"account-not-found", "insufficient-funds", "currency-mismatch", "balance-overflow"} <= codes, codes
