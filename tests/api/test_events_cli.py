"""`ledger events [--after ID] [--follow]`: the feed as JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

import ledgertest as lt


@pytest.fixture
def fresh(main_db, server) -> lt.Api:
    name = "events-cli." + lt.uid()
    return lt.Api(server.base, lt.create_token(main_db, name), name)


def events_cli(api, *args, timeout=60):
    env = dict(os.environ, LEDGER_URL=api.base, LEDGER_TOKEN=api.token)
    return subprocess.run([lt.LEDGER_BIN, "events", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_prints_the_feed_as_json_lines(fresh):
    fresh.put_account("alice")
    credits = [fresh.credit("alice", n).json() for n in (1, 2, 3)]
    proc = events_cli(fresh, "--limit", "2")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["id"] for e in lines] == ["1", "2", "3", "4"]
    assert [e["data"] for e in lines[1:]] == credits
    assert lines == fresh.get("/v1/events").json()["events"]
    after = events_cli(fresh, "--after", "2")
    assert [json.loads(line)["id"] for line in after.stdout.splitlines()] == ["3", "4"]


def test_follow_prints_new_events_as_they_commit(fresh):
    fresh.put_account("alice")
    env = dict(os.environ, LEDGER_URL=fresh.base, LEDGER_TOKEN=fresh.token)
    proc = subprocess.Popen([lt.LEDGER_BIN, "events", "--follow", "--after", "1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        credit = fresh.credit("alice", 5).json()
        line = proc.stdout.readline()
        assert json.loads(line)["data"] == credit
        assert proc.poll() is None  # still following
    finally:
        proc.kill()
        proc.wait()


def test_definitive_errors_exit_1_and_no_answer_exits_2(fresh):
    fresh.put_account("alice")
    bad = events_cli(fresh, "--after", "999")
    assert bad.returncode == 1 and "invalid-cursor" in bad.stderr
    env = dict(os.environ, LEDGER_URL=f"http://127.0.0.1:{lt.free_port()}", LEDGER_TOKEN=fresh.token)
    gone = subprocess.run([lt.LEDGER_BIN, "events", "--retries-max", "1", "--retry-base-ms", "10", "--timeout-s", "5"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert gone.returncode == 2 and gone.stdout == "", gone.stderr
