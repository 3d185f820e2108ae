"""The `ledger` command line: migrate, token create, verify, serve (flags, environment, signals), and /health 503."""

import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import ledgertest as lt

TABLES = {"clients", "api_tokens", "accounts", "transfers", "entries", "idempotency_keys"}


def tables(db):
    out = lt.psql(db, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'ledger'")
    return set(out.split())


def output(proc):
    return (proc.stdout or "") + (proc.stderr or "")


# ---------------------------------------------------------------------------------------------------------------------
# migrate


def test_migrate_creates_schema_and_is_repeatable(scratch_db):
    lt.migrate(scratch_db)
    assert TABLES <= tables(scratch_db)
    lt.migrate(scratch_db)  # nothing pending: still exit 0
    assert TABLES <= tables(scratch_db)
    proc = lt.verify(scratch_db)
    assert proc.returncode == 0, output(proc)


def test_migrate_makes_each_database_its_own_cursor_key_once(scratch_db):
    """Entries-page cursors are signed with a key made at migration: 32 random bytes, kept by later migrations."""
    def cursor_key(db):
        return lt.psql(db, "SELECT encode(key, 'hex') FROM ledger.service_keys WHERE name = 'cursor'")

    lt.migrate(scratch_db)
    key = cursor_key(scratch_db)
    assert len(key) == 64, key
    lt.migrate(scratch_db)
    assert cursor_key(scratch_db) == key
    other = lt.create_database("ledger_api_scratch")
    try:
        lt.migrate(other)
        assert cursor_key(other) not in ("", key)
    finally:
        lt.drop_database(other)


def test_migrate_from_several_processes_at_once(scratch_db):
    with ThreadPoolExecutor(4) as pool:
        procs = list(pool.map(lambda _: lt.run_ledger(["migrate"], scratch_db), range(4)))
    for p in procs:
        assert p.returncode == 0, f"concurrent migrate failed ({p.returncode}):\n{output(p)}"
    assert TABLES <= tables(scratch_db)
    proc = lt.verify(scratch_db)
    assert proc.returncode == 0, output(proc)


def test_database_url_from_environment_and_uri(scratch_db):
    proc = lt.run_ledger(["migrate"], env={"DATABASE_URL": lt.database_uri(scratch_db)})
    assert proc.returncode == 0, f"migrate with DATABASE_URL (URI) failed:\n{output(proc)}"
    assert TABLES <= tables(scratch_db)
    proc = lt.run_ledger(["verify"], env={"DATABASE_URL": lt.conninfo(scratch_db)})
    assert proc.returncode == 0, f"verify with DATABASE_URL (conninfo) failed:\n{output(proc)}"
    proc = lt.run_ledger(["verify"], url=lt.database_uri(scratch_db))
    assert proc.returncode == 0, f"verify with --database-url URI failed:\n{output(proc)}"


# ---------------------------------------------------------------------------------------------------------------------
# token create


def test_token_create_prints_a_new_token_each_time(scratch_db):
    lt.migrate(scratch_db)
    t1 = lt.create_token(scratch_db, "tok-client")
    t2 = lt.create_token(scratch_db, "tok-client")
    assert t1 and t2 and t1 != t2
    assert lt.psql(scratch_db, "SELECT count(*) FROM ledger.clients WHERE id = 'tok-client'") == "1"
    assert lt.psql(scratch_db, "SELECT count(*) FROM ledger.api_tokens WHERE client_id = 'tok-client'") == "2"
    # Only a hash is stored, never the token itself.
    stored = lt.psql(scratch_db, "SELECT encode(token_sha256, 'escape') || encode(token_sha256, 'hex') FROM ledger.api_tokens")
    assert t1 not in stored and t2 not in stored


@pytest.mark.parametrize("name", ["bad name", "@world", ".", "-x", "a" * 65, ""])
def test_token_create_refuses_invalid_client_names(scratch_db, name):
    lt.migrate(scratch_db)
    proc = lt.run_ledger(["token", "create", name], scratch_db)
    assert proc.returncode != 0, f"token create {name!r} must fail:\n{output(proc)}"
    assert lt.psql(scratch_db, "SELECT count(*) FROM ledger.clients") == "0"


def token_list(db, client):
    proc = lt.run_ledger(["token", "list", client], db)
    assert proc.returncode == 0, output(proc)
    return [line.split(" ") for line in proc.stdout.splitlines() if line.strip()]


def test_token_list_and_revoke(scratch_db, log_dir):
    lt.migrate(scratch_db)
    kept = lt.create_token(scratch_db, "life")
    revoked = lt.create_token(scratch_db, "life")
    lines = token_list(scratch_db, "life")
    assert len(lines) == 2 and all(len(line) == 5 for line in lines), lines
    ids = {line[0] for line in lines}
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids) and all(line[1] == "active" for line in lines), lines
    assert kept not in str(lines) and revoked not in str(lines)
    revoked_id = next(i for i in ids if lt.psql(
        scratch_db, f"SELECT left(encode(token_sha256, 'hex'), 16) FROM ledger.api_tokens WHERE token_sha256 = sha256({lt.sql_literal(revoked)}::bytea)") == i)
    # A server that caches known tokens for 1 s: the revoked token is refused within that.
    srv = lt.LedgerServer.healthy(scratch_db, ["--auth-cache-ttl-ms", "1000"], log_dir=log_dir)
    try:
        api_kept, api_revoked = lt.Api(srv.base, kept, "life"), lt.Api(srv.base, revoked, "life")
        lt.assert_json(api_revoked.put_account("acct"), 201)
        proc = lt.run_ledger(["token", "revoke", revoked_id], scratch_db)
        assert proc.returncode == 0 and "revoked" in proc.stdout, output(proc)
        again = lt.run_ledger(["token", "revoke", revoked_id], scratch_db)
        assert again.returncode == 0 and "already revoked" in again.stdout, output(again)
        time.sleep(1.2)
        lt.assert_problem(api_revoked.get_account("acct"), 401, "unauthorized")
        lt.assert_json(api_kept.get_account("acct"), 200)
    finally:
        srv.stop()
    states = {line[0]: (line[1], line[4]) for line in token_list(scratch_db, "life")}
    assert states[revoked_id][0] == "revoked" and states[revoked_id][1] != "-", states
    assert [state for i, (state, _) in states.items() if i != revoked_id] == ["active"], states
    unknown = lt.run_ledger(["token", "revoke", "0123456789abcdef"], scratch_db)
    assert unknown.returncode == 1 and "no token" in unknown.stderr, output(unknown)


def test_an_expiring_token_is_refused_at_its_expiry_whatever_the_cache(scratch_db, log_dir):
    lt.migrate(scratch_db)
    proc = lt.run_ledger(["token", "create", "brief", "--expires-in-s", "2"], scratch_db)
    assert proc.returncode == 0, output(proc)
    token = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"created token [0-9a-f]{16} for client brief, expires in 2 s", proc.stderr), proc.stderr
    # The default 30 s cache: an expiring token is never cached past its expiry.
    srv = lt.LedgerServer.healthy(scratch_db, log_dir=log_dir)
    try:
        api = lt.Api(srv.base, token, "brief")
        started = time.monotonic()
        lt.assert_json(api.put_account("acct"), 201)
        time.sleep(max(0, 2.3 - (time.monotonic() - started)))
        lt.assert_problem(api.get_account("acct"), 401, "unauthorized")
    finally:
        srv.stop()
    [line] = token_list(scratch_db, "brief")
    assert line[1] == "expired" and line[3] != "-", line
    for bad in ("0", "-5", "x"):
        refused = lt.run_ledger(["token", "create", "brief", "--expires-in-s", bad], scratch_db)
        assert refused.returncode != 0, output(refused)


# ---------------------------------------------------------------------------------------------------------------------
# verify


def seed(db, client="c1", currency="QQQ"):
    """A few real transfers made by the database's own transfer function."""
    lt.create_token(db, client)
    c = lt.sql_literal(client)
    cur = lt.sql_literal(currency)
    lt.psql(
        db,
        f"""
        SELECT * FROM ledger.put_account({c}, 'corrupt-acct', {cur}, false);
        SELECT * FROM ledger.put_account({c}, 'other-acct', {cur}, false);
        SELECT * FROM ledger.put_account({c}, 'neg-acct', {cur}, true);
        SELECT * FROM ledger.post_transfer({c}, 'k1', 'r1', NULL, 'corrupt-acct', 1000, {cur}, '{{}}', NULL, 1000);
        SELECT * FROM ledger.post_transfer({c}, 'k2', 'r2', 'corrupt-acct', 'other-acct', 300, {cur}, '{{}}', NULL, 1000);
        SELECT * FROM ledger.post_transfer({c}, 'k3', 'r3', 'corrupt-acct', NULL, 100, {cur}, '{{}}', NULL, 1000);
        SELECT * FROM ledger.post_transfer({c}, 'k4', 'r4', 'neg-acct', 'other-acct', 50, {cur}, '{{}}', NULL, 1000);
        """,
    )
    assert lt.psql(db, f"SELECT balance FROM ledger.accounts WHERE client_id = {c} AND id = 'corrupt-acct'") == "600"


@pytest.fixture
def seeded_db(scratch_db):
    lt.migrate(scratch_db)
    seed(scratch_db)
    proc = lt.verify(scratch_db)
    assert proc.returncode == 0, f"verify on a healthy ledger must exit 0, got {proc.returncode}:\n{output(proc)}"
    return scratch_db


def breach_lines(proc):
    return [line for line in output(proc).splitlines() if line.strip()]


def test_verify_healthy_after_real_traffic(seeded_db):
    proc = lt.verify(seeded_db)
    assert proc.returncode == 0, output(proc)


def test_verify_detects_balance_not_matching_entries(seeded_db):
    lt.psql(seeded_db, "UPDATE ledger.accounts SET balance = balance + 1 WHERE id = 'corrupt-acct'")
    proc = lt.verify(seeded_db)
    assert proc.returncode == 1, f"verify must exit 1 on a breach, got {proc.returncode}:\n{output(proc)}"
    lines = breach_lines(proc)
    # Two breaches: corrupt-acct's balance != its entries, and QQQ no longer sums to 0.
    assert len(lines) >= 2, f"one line per breach expected (2 breaches):\n{output(proc)}"
    assert any("corrupt-acct" in line for line in lines), f"the breached account must be named:\n{output(proc)}"
    assert any("QQQ" in line for line in lines), f"the currency that no longer sums to 0 must be named:\n{output(proc)}"
    # Repair: healthy again.
    lt.psql(seeded_db, "UPDATE ledger.accounts SET balance = balance - 1 WHERE id = 'corrupt-acct'")
    proc = lt.verify(seeded_db)
    assert proc.returncode == 0, output(proc)


def test_verify_detects_balances_not_summing_to_zero(seeded_db):
    """A balance raised without any entry: QQQ no longer sums to 0 for the client."""
    lt.psql(seeded_db, "UPDATE ledger.accounts SET balance = balance + 5 WHERE id = 'other-acct'")
    proc = lt.verify(seeded_db)
    assert proc.returncode == 1, output(proc)
    assert any("QQQ" in line for line in breach_lines(proc)), output(proc)


def test_verify_detects_missing_entry(seeded_db):
    lt.psql(
        seeded_db,
        "DELETE FROM ledger.entries WHERE account_id = 'other-acct' AND transfer_id = "
        "(SELECT id FROM ledger.transfers WHERE idempotency_key = 'k2')",
    )
    proc = lt.verify(seeded_db)
    assert proc.returncode == 1, output(proc)
    lines = breach_lines(proc)
    assert len(lines) >= 2, f"a transfer with one entry and an account whose entries do not sum up:\n{output(proc)}"
    assert any("other-acct" in line for line in lines), output(proc)


def test_verify_detects_unbalanced_entry_pair(seeded_db):
    """Both balances and entries changed together, but the transfer's entries no longer sum to 0."""
    lt.psql(
        seeded_db,
        """
        UPDATE ledger.entries SET amount = amount + 1, balance_after = balance_after + 1
         WHERE account_id = 'other-acct' AND transfer_id = (SELECT id FROM ledger.transfers WHERE idempotency_key = 'k4');
        UPDATE ledger.entries SET balance_after = balance_after + 1
         WHERE account_id = 'other-acct' AND account_version > 2;
        UPDATE ledger.accounts SET balance = balance + 1 WHERE id = 'other-acct';
        """,
    )
    proc = lt.verify(seeded_db)
    assert proc.returncode == 1, output(proc)
    assert breach_lines(proc), output(proc)


def test_verify_detects_negative_balance_on_non_negative_account(seeded_db):
    # The schema's CHECK forbids this state; drop it in this throw-away database to simulate the breach.
    lt.psql(
        seeded_db,
        "ALTER TABLE ledger.accounts DROP CONSTRAINT accounts_non_negative; "
        "UPDATE ledger.accounts SET allow_negative = false WHERE id = 'neg-acct'",
    )
    proc = lt.verify(seeded_db)
    assert proc.returncode == 1, output(proc)
    lines = breach_lines(proc)
    assert any("neg-acct" in line for line in lines), output(proc)


def test_verify_reports_one_line_per_breach(seeded_db):
    lt.psql(seeded_db, "UPDATE ledger.accounts SET balance = balance + 1 WHERE id = 'corrupt-acct'")
    n1 = len(breach_lines(lt.verify(seeded_db)))
    # A second, independent client with its own breach adds lines.
    seed(seeded_db, client="c2", currency="RRR")
    lt.psql(seeded_db, "UPDATE ledger.accounts SET balance = balance + 1 WHERE client_id = 'c2' AND id = 'corrupt-acct'")
    proc = lt.verify(seeded_db)
    assert proc.returncode == 1
    n2 = len(breach_lines(proc))
    assert n2 >= n1 + 2, f"two more breaches must add two more lines ({n1} -> {n2}):\n{output(proc)}"


# ---------------------------------------------------------------------------------------------------------------------
# --version


def test_version_prints_the_version():
    """`ledger --version` exits 0 and prints the version of Sources/ledger/Version.swift, the one place it is kept."""
    proc = subprocess.run([lt.LEDGER_BIN, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, output(proc)
    printed = proc.stdout.strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?", printed), f"not a version: {output(proc)!r}"
    source = (lt.REPO / "Sources" / "ledger" / "Version.swift").read_text()
    assert f'"{printed}"' in source, f"`ledger --version` printed {printed!r}, not the version of Version.swift"


# ---------------------------------------------------------------------------------------------------------------------
# serve


def test_serve_help_lists_flags_with_environment_and_defaults():
    proc = subprocess.run([lt.LEDGER_BIN, "serve", "--help"], capture_output=True, text=True, timeout=60)
    text = output(proc)
    assert proc.returncode == 0, text
    for flag in ["--hostname", "--port", "--no-migrate", "--database-url", "--key-wait-ms"]:
        assert flag in text, f"`ledger serve --help` must list {flag}:\n{text}"
    for env in ["HOST", "PORT", "DATABASE_URL", "LEDGER_KEY_WAIT_MS"]:
        assert env in text, f"`ledger serve --help` must name the environment variable {env}:\n{text}"
    assert "8080" in text and "5000" in text, f"defaults must be shown:\n{text}"


def test_serve_help_shows_retention_setting():
    """Retention of stored responses is configurable (at least 24 h), and every limit is a flag shown by --help."""
    proc = subprocess.run([lt.LEDGER_BIN, "serve", "--help"], capture_output=True, text=True, timeout=60)
    text = output(proc)
    assert proc.returncode == 0, text
    assert "retention" in text.lower(), f"`ledger serve --help` shows no retention setting for stored responses:\n{text}"


def test_serve_reads_host_and_port_from_environment(scratch_db, start_server):
    lt.migrate(scratch_db)
    port = lt.free_port()
    srv = start_server(
        ["--database-url", lt.conninfo(scratch_db), "--no-migrate"],
        env={"HOST": "127.0.0.1", "PORT": str(port), "HOSTNAME": "no-such-host.invalid"},
        use_flags=False,
        port=port,
        dbname=scratch_db,
    )
    r = requests.get(srv.base + "/health", timeout=lt.TIMEOUT)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert srv.stop(signal.SIGINT) == 0, f"SIGINT must stop the server cleanly:\n{srv.log_tail()}"


def test_serve_reads_database_url_from_environment(scratch_db, start_server):
    port = lt.free_port()
    srv = start_server(
        ["--hostname", "127.0.0.1", "--port", str(port)],
        env={"DATABASE_URL": lt.database_uri(scratch_db)},
        use_flags=False,
        port=port,
        dbname=scratch_db,
    )
    # serve migrated the empty database at start.
    assert TABLES <= tables(scratch_db)
    token = lt.create_token(scratch_db, "envclient")
    api = lt.Api(srv.base, token, "envclient")
    account = api.funded_account(5)
    assert api.balance(account) == 5
    assert srv.stop(signal.SIGTERM) == 0, f"SIGTERM must stop the server cleanly:\n{srv.log_tail()}"


def test_serve_no_migrate_does_not_migrate(scratch_db, start_server):
    port = lt.free_port()
    srv = start_server(
        ["--hostname", "127.0.0.1", "--port", str(port), "--database-url", lt.conninfo(scratch_db), "--no-migrate"],
        use_flags=False, port=port, dbname=scratch_db, wait=False,
    )
    # Whether it starts or not on an empty database, it must not have created the schema.
    time.sleep(2)
    assert not (TABLES & tables(scratch_db)), "--no-migrate must not apply migrations"
    srv.stop()


def test_serve_stops_on_sigterm_with_exit_0(scratch_db, start_server):
    lt.migrate(scratch_db)
    srv = start_server(dbname=scratch_db)
    t0 = time.monotonic()
    rc = srv.stop(signal.SIGTERM)
    assert rc == 0, f"exit code after SIGTERM: {rc}\n{srv.log_tail()}"
    assert time.monotonic() - t0 < 15
    with pytest.raises(requests.ConnectionError):
        requests.get(srv.base + "/health", timeout=2)


def test_two_servers_migrating_one_database_at_once(scratch_db, start_server):
    s1 = start_server(dbname=scratch_db, wait=False)
    s2 = start_server(dbname=scratch_db, wait=False)
    s1.wait_healthy(60)
    s2.wait_healthy(60)
    assert TABLES <= tables(scratch_db)


# ---------------------------------------------------------------------------------------------------------------------
# database unreachable: /health 503, /v1 503 database-unavailable with Retry-After, nothing stored; recovery


def test_database_unreachable_gives_503_and_recovers(scratch_db, start_server):
    lt.migrate(scratch_db)
    token = lt.create_token(scratch_db, "dbdown")
    srv = start_server(["--no-migrate"], dbname=scratch_db)
    api = lt.Api(srv.base, token, "dbdown")
    account = api.funded_account(100)
    key = lt.uid("k-")
    lt.psql("postgres", f'ALTER DATABASE "{scratch_db}" ALLOW_CONNECTIONS false')
    try:
        lt.psql(
            "postgres",
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = {lt.sql_literal(scratch_db)}",
        )
        deadline = time.monotonic() + 20
        health = None
        while time.monotonic() < deadline:
            health = requests.get(srv.base + "/health", timeout=lt.TIMEOUT)
            if health.status_code == 503:
                break
            time.sleep(0.2)
        assert health is not None and health.status_code == 503, (
            f"/health must be 503 while the database is unreachable: {lt.describe(health)}"
        )
        r = api.debit(account, 10, key=key)
        lt.assert_problem(r, 503, "database-unavailable")
        assert r.headers.get("Retry-After", "").strip().isdigit(), f"503 needs Retry-After: {lt.describe(r)}"
        r = api.get_account(account)
        lt.assert_problem(r, 503, "database-unavailable")
        assert r.headers.get("Retry-After") is not None
    finally:
        lt.psql("postgres", f'ALTER DATABASE "{scratch_db}" ALLOW_CONNECTIONS true')
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if requests.get(srv.base + "/health", timeout=lt.TIMEOUT).status_code == 200:
            break
        time.sleep(0.2)
    assert requests.get(srv.base + "/health", timeout=lt.TIMEOUT).json() == {"status": "ok"}
    # The 503 stored nothing: the same key now executes.
    r = api.debit(account, 10, key=key)
    lt.assert_first(r, 201)
    assert api.balance(account) == 90
    proc = lt.verify(scratch_db)
    assert proc.returncode == 0, output(proc)


def test_retention_purge_never_allows_a_second_transfer(scratch_db, start_server):
    """With a 1 s retention and purge interval, stored responses are purged; a late retry of a key that made a transfer
    still answers with that transfer and moves no money again, and a changed request under it is still refused."""
    lt.migrate(scratch_db)
    token = lt.create_token(scratch_db, "retention")
    srv = start_server(["--no-migrate", "--retention-s", "1", "--purge-interval-s", "1"], dbname=scratch_db)
    api = lt.Api(srv.base, token, "retention")
    alice = api.funded_account(100)
    bob = api.new_account()
    key = lt.uid("k-")
    first = api.transfer(alice, bob, 40, key=key)
    lt.assert_first(first)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if lt.psql(scratch_db, "SELECT count(*) FROM ledger.idempotency_keys") == "0":
            break
        time.sleep(0.3)
    assert lt.psql(scratch_db, "SELECT count(*) FROM ledger.idempotency_keys") == "0", "the purge did not run"
    again = api.transfer(alice, bob, 40, key=key)
    assert again.status_code == 201, lt.describe(again)
    assert again.json()["id"] == first.json()["id"], "a late retry must answer with the key's one transfer"
    assert again.content == first.content, "a late retry gets the original body"
    assert lt.replayed(again) == "true"
    lt.assert_problem(api.transfer(alice, bob, 41, key=key), 422, "idempotency-key-reused")
    assert api.balance(alice) == 60 and api.balance(bob) == 40
    assert lt.psql(scratch_db, "SELECT count(*) FROM ledger.transfers WHERE from_account = " + lt.sql_literal(alice)) == "1"
    proc = lt.verify(scratch_db)
    assert proc.returncode == 0, output(proc)
