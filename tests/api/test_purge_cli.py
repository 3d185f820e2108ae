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


def test_purge_help_shows_its_own_flags_only():
    """`ledger purge` runs once: it takes the retention and batch size, not the background interval of `serve`."""
    purge = lt.run_ledger(["purge", "--help"])
    assert purge.returncode == 0, purge.stderr
    for flag in ["--retention-s", "LEDGER_RETENTION_S", "--purge-batch-size", "LEDGER_PURGE_BATCH_SIZE"]:
        assert flag in purge.stdout, f"`ledger purge --help` must list {flag}:\n{purge.stdout}"
    assert "--purge-interval-s" not in purge.stdout, purge.stdout
    refused = lt.run_ledger(["purge", "--purge-interval-s", "5"])
    assert refused.returncode != 0 and "purge-interval-s" in refused.stderr, refused.stderr
    serve = lt.run_ledger(["serve", "--help"])
    assert "--purge-interval-s" in serve.stdout and "LEDGER_PURGE_INTERVAL_S" in serve.stdout, serve.stdout


def test_purge_retention_zero_purges_everything_and_errors_name_the_flag(scratch_db):
    lt.migrate(scratch_db)
    lt.create_token(scratch_db, "zero")
    lt.psql(scratch_db, "INSERT INTO ledger.idempotency_keys (client_id, key, request_sha256, status_code, response_body) "
                        "VALUES ('zero', 'k', '\\x00', 404, '{}')")
    proc = lt.run_ledger(["purge", "--retention-s", "0"], scratch_db)
    assert proc.returncode == 0, proc.stderr
    assert lt.psql(scratch_db, "SELECT count(*) FROM ledger.idempotency_keys") == "0"
    refused = lt.run_ledger(["purge", "--retention-s=-1"], scratch_db)
    assert refused.returncode != 0 and "--retention-s" in refused.stderr, refused.stderr
    assert "LEDGER_RETENTION_S" not in refused.stderr, refused.stderr
    by_env = lt.run_ledger(["purge"], scratch_db, env={"LEDGER_RETENTION_S": "-1"})
    assert by_env.returncode != 0 and "LEDGER_RETENTION_S" in by_env.stderr, by_env.stderr
