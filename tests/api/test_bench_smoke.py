"""A few seconds of `ledger bench` against the session's server: the shipped benchmark runs, every workload makes
its accounts, gets only the answers it expects, and reports its numbers. Not a performance test: see BENCHMARKS.md."""

from __future__ import annotations

import re

import pytest

import ledgertest as lt


@pytest.fixture(scope="module")
def bench_token(main_db):
    return lt.create_token(main_db, "bench")


@pytest.mark.parametrize("workload", ["transfers", "hot", "replays", "mixed", "batch", "batch-disjoint"])
def test_bench_workload_runs_without_errors(server, bench_token, workload):
    proc = lt.run_ledger(["bench", "--url", server.base, "--token", bench_token, "--workload", workload,
                          "--connections", "4", "--duration-s", "1", "--accounts", "20", "--batch-size", "10"],
                         timeout=120)
    assert proc.returncode == 0, f"ledger bench {workload} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    # Every connection is closed before the event loops stop: nothing is left to fail after the report.
    assert "ERROR" not in proc.stderr, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    fields = dict(re.findall(r"(\S+?)=(\S+)", line))
    assert fields["workload"] == workload and fields["errors"] == "0", line
    assert int(fields["requests"]) > 0, line
    for name in ("rate", "p50", "p99", "p99.9"):
        assert name in fields, line
    if workload == "replays":
        assert fields["replays"] == fields["requests"], line


def test_bench_open_loop_keeps_its_schedule(server, bench_token):
    """`--rate R`: requests on a fixed schedule, R per second in all, timed from when each was due; what fell due
    but was not sent by the end is reported as missed, and the run still ends on time."""
    proc = lt.run_ledger(["bench", "--url", server.base, "--token", bench_token, "--workload", "transfers",
                          "--connections", "4", "--duration-s", "2", "--accounts", "20", "--rate", "50"],
                         timeout=120)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    fields = dict(re.findall(r"(\S+?)=(\S+)", proc.stdout.strip().splitlines()[-1]))
    assert fields["errors"] == "0" and fields["schedule"] == "50.00/s", fields
    assert int(fields["requests"]) + int(fields["missed"]) == 100, fields
    assert float(fields["seconds"]) < 3, fields


def test_bench_refuses_a_rate_of_zero(server, bench_token):
    proc = lt.run_ledger(["bench", "--url", server.base, "--token", bench_token, "--rate", "0"])
    assert proc.returncode != 0
    assert "rate" in proc.stderr


def test_bench_batch_disjoint_connections_share_no_account(server, main_db):
    """`batch-disjoint` measures batches that need not wait for each other's row locks: each connection keeps to
    accounts of its own. Its keys name the connection (`bench-<run>-<connection>-<sequence>`)."""
    client = "bench-disjoint." + lt.uid()
    token = lt.create_token(main_db, client)
    proc = lt.run_ledger(["bench", "--url", server.base, "--token", token, "--workload", "batch-disjoint",
                          "--connections", "4", "--duration-s", "1", "--accounts", "40", "--batch-size", "50"],
                         timeout=120)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    per_connection = f"""
        SELECT substring(t.idempotency_key FROM '-([0-9]+)-[0-9]+$') AS connection, a.account
        FROM ledger.transfers t, LATERAL (VALUES (t.from_account), (t.to_account)) AS a(account)
        WHERE t.client_id = {lt.sql_literal(client)} AND t.batch_item > 0"""
    connections = lt.psql(main_db, f"SELECT count(DISTINCT connection) FROM ({per_connection}) x")
    assert int(connections) == 4, f"expected batches from 4 connections, got {connections}"
    shared = lt.psql(main_db, f"SELECT count(*) FROM (SELECT account FROM ({per_connection}) x "
                              "GROUP BY account HAVING count(DISTINCT connection) > 1) s")
    assert shared == "0", f"{shared} accounts were used by more than one connection"


def test_bench_refuses_a_bad_workload(server, bench_token):
    proc = lt.run_ledger(["bench", "--url", server.base, "--token", bench_token, "--workload", "nope"])
    assert proc.returncode != 0
    assert "workload" in proc.stderr
