"""A few seconds of `ledger bench` against the session's server: the shipped benchmark runs, every workload makes
its accounts, gets only the answers it expects, and reports its numbers. Not a performance test: see BENCHMARKS.md."""

from __future__ import annotations

import re

import pytest

import ledgertest as lt


@pytest.fixture(scope="module")
def bench_token(main_db):
    return lt.create_token(main_db, "bench")


@pytest.mark.parametrize("workload", ["transfers", "hot", "replays", "mixed", "batch"])
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


def test_bench_refuses_a_bad_workload(server, bench_token):
    proc = lt.run_ledger(["bench", "--url", server.base, "--token", bench_token, "--workload", "nope"])
    assert proc.returncode != 0
    assert "workload" in proc.stderr
