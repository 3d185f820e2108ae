"""The migration that adds the feed backfills the history made before it, in commit order."""

from __future__ import annotations

import shutil
import time

import ledgertest as lt


def call(db: str, sql: str) -> str:
    return lt.psql(db, sql)


def test_history_before_the_feed_gets_its_events(tmp_path, log_dir):
    old_sql = tmp_path / "sql"
    old_sql.mkdir()
    for path in sorted((lt.REPO / "sql").glob("000[1-8]_*.sql")):
        shutil.copy(path, old_sql / path.name)
    db = lt.create_database("backfill")
    try:
        proc = lt.run_ledger(["migrate", "--sql-dir", str(old_sql)], dbname=db)
        assert proc.returncode == 0, proc.stderr
        # History made by the 0008 functions, as a service of that release would have made it.
        call(db, "INSERT INTO ledger.clients (id) VALUES ('old'), ('other')")
        for account in ("alice", "bob"):
            call(db, f"SELECT ledger.put_account('old', '{account}', 'USD', false)")
        call(db, "SELECT ledger.put_account('other', 'zed', 'EUR', false)")
        post = "SELECT status_code FROM ledger.post_transfer('old', '{k}', 'POST /v1/x\n{k}', {f}, {t}, {a}, 'USD', '{{}}', NULL, 1000)"
        assert call(db, post.format(k="k1", f="NULL", t="'alice'", a=1000)) == "201"
        assert call(db, post.format(k="k2", f="'alice'", t="'bob'", a=100)) == "201"
        hold = "SELECT status_code FROM ledger.post_hold('old', '{k}', 'POST /v1/holds\n{k}', 'alice', 'bob', {a}, 'USD', '{{}}', {e}, NULL, 1000)"
        assert call(db, hold.format(k="h1", a=50, e=3600)) == "201"
        assert call(db, hold.format(k="h2", a=20, e=3600)) == "201"
        assert call(db, hold.format(k="h3", a=5, e=1)) == "201"
        assert call(db, "SELECT status_code FROM ledger.post_capture('old', 'c1', 'POST c1', '1', 30, NULL, 1000)") == "200"
        assert call(db, "SELECT status_code FROM ledger.post_void('old', 'v1', 'POST v1', '2', 1000)") == "200"
        time.sleep(1.2)
        assert call(db, "SELECT ledger.expire_holds(100)") == "1"
        # A failed transfer: stored, but no event.
        assert call(db, post.format(k="k3", f="'bob'", t="'alice'", a=10**9)) == "422"

        proc = lt.run_ledger(["migrate"], dbname=db)
        assert proc.returncode == 0, proc.stderr
        rows = call(db, "SELECT position, type, subject FROM ledger.events WHERE client_id = 'old' ORDER BY position")
        assert [tuple(r.split("|")) for r in rows.splitlines()] == [
            ("1", "account.created", "alice"), ("2", "account.created", "bob"),
            ("3", "transfer.created", "1"), ("4", "transfer.created", "2"),
            ("5", "hold.created", "1"), ("6", "hold.created", "2"), ("7", "hold.created", "3"),
            ("8", "transfer.created", "3"), ("9", "hold.captured", "1"), ("10", "hold.voided", "2"),
            ("11", "hold.expired", "3"),
        ]
        assert call(db, "SELECT position, type FROM ledger.events WHERE client_id = 'other'") == "1|account.created"
        # The account as created, the hold as placed.
        assert '"balance":0,' in call(db, "SELECT data FROM ledger.events WHERE client_id = 'old' AND position = 1")
        assert '"status":"pending"' in call(db, "SELECT data FROM ledger.events WHERE client_id = 'old' AND position = 5")
        assert call(db, "SELECT count(*) FROM ledger.invariant_breaches") == "0"
        assert lt.verify(db).returncode == 0

        # The feed continues after the history: served, and new events follow.
        token = lt.create_token(db, "old")
        srv = lt.LedgerServer.healthy(db, log_dir=log_dir)
        try:
            api = lt.Api(srv.base, token, "old")
            page = api.get("/v1/events", params={"after": "10"}).json()
            assert [e["type"] for e in page["events"]] == ["hold.expired"] and page["next_after"] == "11"
            credit = api.credit("bob", 1)
            assert api.get("/v1/events", params={"after": "11"}).json()["events"][0]["data"] == credit.json()
        finally:
            srv.stop()
    finally:
        lt.drop_database(db)
