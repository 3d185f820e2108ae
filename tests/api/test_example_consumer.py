"""examples/consumer: applies each event exactly once, across a crash mid-transaction and a kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import ledgertest as lt

CONSUMER = lt.REPO / "examples" / "consumer" / "consumer.py"


@pytest.fixture
def consumer_db():
    name = lt.create_database("consumer")
    yield name
    lt.drop_database(name)


def run_consumer(api, dbname, *args, env=None, wait=True):
    full_env = dict(os.environ, LEDGER_URL=api.base, LEDGER_TOKEN=api.token, CONSUMER_CLIENT=api.client,
                    CONSUMER_DATABASE_URL=lt.database_uri(dbname), **(env or {}))
    proc = subprocess.Popen([sys.executable, str(CONSUMER), *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=120)
        return proc.returncode, out
    return proc


def test_each_event_applied_once_across_crashes(main_db, server, consumer_db):
    pytest.importorskip("psycopg")
    name = "consumer." + lt.uid()
    api = lt.Api(server.base, lt.create_token(main_db, name), name)
    accounts = [f"c{i}" for i in range(4)]
    for account in accounts:
        api.put_account(account, allow_negative=True)
    for n in range(40):
        assert api.transfer(accounts[n % 4], accounts[(n + 1) % 4], n + 1).status_code == 201

    # 1. Crash in the middle of the 15th event's transaction: its effect is written but not committed.
    code, out = run_consumer(api, consumer_db, "--once", env={"CONSUMER_CRASH_AT": "15"})
    assert code == 3, out
    assert lt.psql(consumer_db, "SELECT count(*) FROM consumer.processed_events").strip() == "14"

    # 2. Follow the feed while more transfers commit, and kill -9 it at some point.
    proc = run_consumer(api, consumer_db, wait=False)
    for n in range(40, 80):
        assert api.transfer(accounts[n % 4], accounts[(n + 1) % 4], n + 1).status_code == 201
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    # 3. Restart until the feed is drained.
    code, out = run_consumer(api, consumer_db, "--once")
    assert code == 0, out

    events = int(lt.psql(consumer_db, "SELECT count(*) FROM consumer.processed_events").strip())
    assert events == 4 + 80  # four account.created, eighty transfer.created
    projected = dict(
        line.split("|") for line in lt.psql(
            consumer_db, "SELECT account, balance FROM consumer.balances ORDER BY account").strip().splitlines())
    for account in accounts:
        assert int(projected[account]) == api.get_account(account).json()["balance"], account
    assert lt.psql(consumer_db, "SELECT after FROM consumer.checkpoint").strip() == str(events)
