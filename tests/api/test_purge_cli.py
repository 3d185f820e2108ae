"""`ledger purge`: deletes only expired stored responses; a purged key that made a transfer still answers with it."""

from __future__ import annotations

import ledgertest as lt


def test_ledger_purge_deletes_expired_stored_responses_only(scratch_db, start_server):
    lt.migrate(scratch_db)
    server = start_server(["--no-migrate"], dbname=scratch_db)
    api = lt.Api(server.base, lt.create_token(scratch_db, "purger"), "purger")
    account = api.funded_account(100)
    old = api.debit(account, 10, key="old-key")
    lt.assert_first(old, 201)
    lt.assert_first(api.debit(account, 10, key="fresh-key"), 201)
    # Everything but fresh-key (the funding credit and old-key) is made two hours old.
    lt.psql(scratch_db, "UPDATE ledger.idempotency_keys SET created_at = now() - interval '2 hours' "
                        "WHERE key <> 'fresh-key'")
    proc = lt.run_ledger(["purge", "--retention-s", "3600", "--purge-batch-size", "1"], scratch_db)
    assert proc.returncode == 0, proc.stderr
    assert "deleted 2 stored responses" in proc.stdout, proc.stdout   # in batches of 1
    keys = lt.psql(scratch_db, "SELECT string_agg(key, ',' ORDER BY key) FROM ledger.idempotency_keys")
    assert keys == "fresh-key", keys
    again = api.debit(account, 10, key="old-key")
    lt.assert_replay_of(old, again)
    assert api.balance(account) == 80
    assert lt.verify(scratch_db).returncode == 0
