"""Runs last (files run in name order): after everything above, the shared ledger still holds every invariant."""

import ledgertest as lt


def test_invariants_hold_after_the_suite(main_db, server):
    proc = lt.verify(main_db)
    assert proc.returncode == 0, f"ledger verify exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    breaches = lt.psql(main_db, "SELECT count(*) FROM ledger.invariant_breaches")
    assert breaches == "0", lt.psql(main_db, "SELECT * FROM ledger.invariant_breaches")

