"""Helpers for the black-box HTTP API tests of the ledger service.

Everything here talks to the service over HTTP on 127.0.0.1, to PostgreSQL through `psql`, and to the `ledger`
executable through subprocesses. Nothing imports the service's code.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
LEDGER_BIN = os.environ.get("LEDGER_BIN", str(REPO / ".build" / "debug" / "ledger"))
PG_ADMIN = os.environ.get("LEDGER_TEST_PG", "")
# Where the `ledger serve` processes of the tests connect, when not straight to LEDGER_TEST_PG: a conninfo without
# dbname, e.g. a pgbouncer in transaction mode in front of the same server (scripts/test's pooler stage). psql,
# migrations and the other CLI commands stay on LEDGER_TEST_PG.
SERVE_PG = os.environ.get("LEDGER_TEST_SERVE_PG", "") or PG_ADMIN

# A Citus cluster (scripts/test-citus): LEDGER_TEST_PG is its coordinator and these are the ports of its workers, on
# the same host. Every test database is then made on each node with the citus extension, and migrated with
# `ledger migrate --citus`.
CITUS_WORKERS = os.environ.get("LEDGER_TEST_CITUS_WORKERS", "").split()

TIMEOUT = 30  # seconds, for every HTTP request
AMOUNT_MAX = 9007199254740991  # 2^53 - 1
INT64_MAX = 9223372036854775807
INT64_MIN = -9223372036854775808
BODY_MAX = 64 * 1024

RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
PROBLEM_KEYS = {"type", "title", "status", "detail", "code"}
ACCOUNT_KEYS = {"id", "currency", "balance", "allow_negative", "version", "created_at", "held", "available"}
TRANSFER_KEYS = {"id", "from", "to", "amount", "currency", "metadata", "created_at", "hold_id", "reverses",
                 "reversed_amount"}
HOLD_KEYS = {"id", "from", "to", "amount", "currency", "status", "captured_amount", "transfer_id", "metadata",
             "expires_at", "created_at"}
ENTRY_KEYS = {"transfer_id", "amount", "balance_after", "created_at"}

NO_KEY = object()  # pass as key= to send no Idempotency-Key header


def uid(prefix: str = "") -> str:
    """A short unique id that is a valid account id / key."""
    return f"{prefix}{uuid.uuid4().hex[:16]}"


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --------------------------------------------------------------------------------------------------------------------
# PostgreSQL


def conninfo(dbname: str) -> str:
    return f"{PG_ADMIN} dbname={dbname}"


def serve_conninfo(dbname: str) -> str:
    """The conninfo `ledger serve` gets for a database of the test server (through LEDGER_TEST_SERVE_PG if set)."""
    return f"{SERVE_PG} dbname={dbname}"


def conninfo_parts() -> dict:
    parts = {}
    for item in PG_ADMIN.split():
        key, _, value = item.partition("=")
        parts[key] = value
    return parts


def database_uri(dbname: str) -> str:
    """The same database as a libpq URI (postgresql://user@host:port/db)."""
    p = conninfo_parts()
    user = p.get("user", "postgres")
    host = p.get("host", "127.0.0.1")
    port = p.get("port", "5432")
    return f"postgresql://{user}@{host}:{port}/{dbname}"


def psql(dbname: str, sql: str, check: bool = True) -> str:
    """Runs SQL through psql (unaligned, tuples only) and returns its standard output, stripped."""
    proc = subprocess.run(
        ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", conninfo(dbname), "-c", sql],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"psql failed ({proc.returncode}) for {sql!r}:\n{proc.stderr}")
    return proc.stdout.strip()


def worker_conninfo(port: str, dbname: str) -> str:
    parts = conninfo_parts()
    parts.update(port=port, dbname=dbname)
    return " ".join(f"{key}={value}" for key, value in parts.items())


def worker_psql(port: str, dbname: str, sql: str, check: bool = True) -> None:
    proc = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", worker_conninfo(port, dbname), "-c", sql],
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"psql on worker {port} failed for {sql!r}:\n{proc.stderr}")


def create_database(prefix: str = "ledger_api") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    psql("postgres", f'CREATE DATABASE "{name}"')
    if CITUS_WORKERS:
        for port in CITUS_WORKERS:
            worker_psql(port, "postgres", f'CREATE DATABASE "{name}"')
            worker_psql(port, name, "CREATE EXTENSION citus")
        coordinator = conninfo_parts().get("port", "5432")
        psql(name, "CREATE EXTENSION citus")
        psql(name, f"SELECT citus_set_coordinator_host('127.0.0.1', {coordinator})")
        for port in CITUS_WORKERS:
            psql(name, f"SELECT citus_add_node('127.0.0.1', {port})")
    return name


def drop_database(name: str) -> None:
    psql("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', check=False)
    for port in CITUS_WORKERS:
        worker_psql(port, "postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', check=False)


class PsqlSession:
    """A long-lived psql process, to hold locks inside an open transaction while requests run."""

    def __init__(self, dbname: str, port: str | None = None):
        target = worker_conninfo(port, dbname) if port else conninfo(dbname)
        self.proc = subprocess.Popen(
            ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def query_line(self, sql: str, timeout: float = 30) -> str:
        """Sends SQL that prints exactly one line, and returns that line."""
        marker = f"__done_{uuid.uuid4().hex}"
        self.proc.stdin.write(sql.rstrip().rstrip(";") + ";\n")
        self.proc.stdin.write(f"SELECT '{marker}';\n")
        self.proc.stdin.flush()
        lines = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line == "":
                raise AssertionError(f"psql session ended: {self.proc.stderr.read()}")
            line = line.rstrip("\n")
            if line == marker:
                return lines[0] if lines else ""
            if line:
                lines.append(line)
        raise AssertionError("psql session did not answer in time")

    def send(self, sql: str) -> None:
        self.proc.stdin.write(sql.rstrip().rstrip(";") + ";\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write("\\q\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def holding_account_lock(dbname: str, client: str, account: str):
    """Holds a row lock on the account (SELECT ... FOR UPDATE in an open transaction of a psql session) for the
    length of the block: a request that writes to the account waits inside the database meanwhile."""
    holder = PsqlSession(dbname)
    try:
        holder.send("BEGIN")
        locked = holder.query_line(
            f"SELECT id FROM ledger.accounts WHERE client_id = {sql_literal(client)} AND id = {sql_literal(account)} "
            "FOR UPDATE"
        )
        assert locked == account, f"account {account!r} not found to lock: {locked!r}"
        yield holder
    finally:
        try:
            holder.send("COMMIT")
        finally:
            holder.close()


@contextlib.contextmanager
def holding_key_lock(dbname: str, client: str, key: str):
    """Holds the advisory lock the service takes for an execution of (client, key) for the length of the block, as
    if another execution of the key were in progress."""
    holder = PsqlSession(dbname, client_node_port(dbname, client))
    try:
        holder.query_line(f"SELECT pg_advisory_lock(ledger.key_lock_id({sql_literal(client)}, {sql_literal(key)}))")
        yield holder
    finally:
        try:
            holder.query_line("SELECT pg_advisory_unlock_all()")
        finally:
            holder.close()


def client_node_port(dbname: str, client: str) -> str | None:
    """On a Citus cluster, the port of the worker that holds the client's rows and runs its requests (advisory locks
    are per node: a lock that a request must meet is taken there); None on a single server."""
    if not CITUS_WORKERS:
        return None
    return psql(dbname, "SELECT n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n ON n.groupid = p.groupid "
                f"WHERE p.shardid = get_shard_id_for_distribution_column('ledger.accounts', {sql_literal(client)})")


def wait_for_lock_waiter(dbname: str, timeout: float = 10) -> None:
    """Waits until some backend of the database waits on a lock (a request is blocked behind our held lock); on a
    Citus cluster, on any node."""
    deadline = time.monotonic() + timeout
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    while time.monotonic() < deadline:
        counts = [psql(dbname, query)]
        for port in CITUS_WORKERS:
            proc = subprocess.run(["psql", "-X", "-A", "-t", "-q", "-d", worker_conninfo(port, dbname), "-c", query],
                                  capture_output=True, text=True, timeout=30)
            counts.append(proc.stdout.strip() or "0")
        if any(int(n) >= 1 for n in counts):
            return
        time.sleep(0.05)
    raise AssertionError("no request got blocked behind the held lock within the timeout")


# --------------------------------------------------------------------------------------------------------------------
# The ledger executable


def run_ledger(args, dbname=None, env=None, timeout=120, url=None) -> subprocess.CompletedProcess:
    cmd = [LEDGER_BIN, *args]
    if dbname is not None or url is not None:
        cmd += ["--database-url", url if url is not None else conninfo(dbname)]
    full_env = dict(os.environ)
    full_env.pop("DATABASE_URL", None)
    if env:
        full_env.update(env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def create_token(dbname: str, client: str) -> str:
    proc = run_ledger(["token", "create", client], dbname)
    assert proc.returncode == 0, f"ledger token create {client} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = [line.strip() for line in proc.stdout.strip().splitlines() if line.strip()]
    assert lines, f"ledger token create {client} printed nothing on stdout; stderr:\n{proc.stderr}"
    return lines[-1]


def migrate(dbname: str) -> None:
    proc = run_ledger(["migrate", "--citus"] if CITUS_WORKERS else ["migrate"], dbname)
    assert proc.returncode == 0, f"ledger migrate failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def verify(dbname: str) -> subprocess.CompletedProcess:
    return run_ledger(["verify"], dbname)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LedgerServer:
    """One `ledger serve` process on 127.0.0.1 and a free port; its output goes to a log file."""

    def __init__(self, dbname: str | None, extra_args=(), env=None, use_flags=True, port=None, log_dir=None, url=None):
        """On `dbname` of the test server, or on the conninfo `url` (say, of a server that is not there)."""
        self.dbname = dbname
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        log_dir = log_dir or tempfile.mkdtemp(prefix="ledger-api-test-")
        self.log_path = Path(log_dir) / f"serve-{self.port}.log"
        cmd = [LEDGER_BIN, "serve"]
        if use_flags:
            cmd += ["--hostname", "127.0.0.1", "--port", str(self.port),
                    "--database-url", url or serve_conninfo(dbname)]
        cmd += list(extra_args)
        full_env = dict(os.environ)
        full_env.pop("DATABASE_URL", None)
        full_env.pop("HOST", None)
        full_env.pop("PORT", None)
        if env:
            full_env.update(env)
        self.cmd = cmd
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
        self.returncode = None

    @classmethod
    def healthy(cls, dbname: str, extra_args=(), env=None, log_dir=None, timeout: float = 30) -> "LedgerServer":
        """A `ledger serve` on the database, once /health answers 200; stopped again if it never does."""
        srv = cls(dbname, extra_args, env, log_dir=log_dir)
        try:
            srv.wait_healthy(timeout)
        except BaseException:
            srv.stop()
            raise
        return srv

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_healthy(self, timeout: float = 30, answering_only: bool = False) -> None:
        """Until /health answers 200 (or, with answering_only, answers at all: a server whose database is down)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"ledger serve exited with {self.proc.returncode} before becoming healthy "
                    f"({' '.join(self.cmd)}):\n{self.log_tail()}"
                )
            try:
                r = requests.get(self.base + "/health", timeout=2)
                last = r.status_code
                if r.status_code == 200 or answering_only:
                    return
            except requests.RequestException as e:
                last = repr(e)
            time.sleep(0.1)
        raise AssertionError(f"ledger serve not healthy within {timeout}s (last: {last}):\n{self.log_tail()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.returncode = "killed after timeout"
                self.log.close()
                return None
        self.returncode = self.proc.returncode
        self.log.close()
        return self.proc.returncode


# --------------------------------------------------------------------------------------------------------------------
# HTTP


class Api:
    """A small client of the ledger API acting with one bearer token."""

    def __init__(self, base: str, token: str | None, client: str | None = None):
        self.base = base
        self.token = token
        self.client = client
        self.session = requests.Session()

    def clone(self, base: str | None = None) -> "Api":
        """Another client with the same token (one per thread), optionally against another server."""
        return Api(base or self.base, self.token, self.client)

    def headers(self, key=NO_KEY, extra=None, auth=True) -> dict:
        h = {}
        if auth and self.token is not None:
            h["Authorization"] = f"Bearer {self.token}"
        if key is not NO_KEY and key is not None:
            h["Idempotency-Key"] = key
        if extra:
            h.update(extra)
        return h

    def request(self, method, path, body=None, raw=None, key=NO_KEY, headers=None, auth=True, params=None):
        h = self.headers(key, headers, auth)
        data = None
        if raw is not None:
            data = raw.encode("utf-8") if isinstance(raw, str) else raw
        elif body is not None:
            data = json.dumps(body).encode("utf-8")
        if data is not None and "Content-Type" not in h:
            h["Content-Type"] = "application/json"
        r = self.session.request(method, self.base + path, data=data, headers=h, params=params, timeout=TIMEOUT)
        r.idem_key = key
        return r

    # -- accounts

    def put_account(self, account, currency="USD", allow_negative=None, raw=None):
        body = {"currency": currency}
        if allow_negative is not None:
            body["allow_negative"] = allow_negative
        return self.request("PUT", f"/v1/accounts/{account}", body=body, raw=raw)

    def get_account(self, account):
        return self.request("GET", f"/v1/accounts/{account}")

    def entries(self, account, limit=None, cursor=None):
        params = {}
        if limit is not None:
            params["limit"] = limit
        if cursor is not None:
            params["cursor"] = cursor
        return self.request("GET", f"/v1/accounts/{account}/entries", params=params or None)

    # -- money

    def post(self, path, body=None, key=None, raw=None, headers=None):
        if key is None:
            key = uid("key-")
        return self.request("POST", path, body=body, raw=raw, key=key, headers=headers)

    def credit(self, account, amount, currency="USD", metadata=None, key=None):
        body = {"account": account, "amount": amount, "currency": currency}
        if metadata is not None:
            body["metadata"] = metadata
        return self.post("/v1/credits", body, key)

    def debit(self, account, amount, currency="USD", metadata=None, key=None):
        body = {"account": account, "amount": amount, "currency": currency}
        if metadata is not None:
            body["metadata"] = metadata
        return self.post("/v1/debits", body, key)

    def transfer(self, from_, to, amount, currency="USD", metadata=None, key=None):
        body = {"from": from_, "to": to, "amount": amount, "currency": currency}
        if metadata is not None:
            body["metadata"] = metadata
        return self.post("/v1/transfers", body, key)

    def get(self, path, params=None):
        return self.request("GET", path, params=params)

    def get_transfer(self, transfer_id):
        return self.request("GET", f"/v1/transfers/{transfer_id}")

    # -- conveniences that assert success

    def new_account(self, currency="USD", allow_negative=None, prefix="acct-") -> str:
        account = uid(prefix)
        r = self.put_account(account, currency, allow_negative)
        assert r.status_code == 201, f"PUT /v1/accounts/{account}: expected 201, got {r.status_code} {r.text}"
        return account

    def funded_account(self, amount, currency="USD", allow_negative=None, prefix="acct-") -> str:
        account = self.new_account(currency, allow_negative, prefix)
        r = self.credit(account, amount, currency)
        assert r.status_code == 201, f"credit {amount} to {account}: expected 201, got {r.status_code} {r.text}"
        return account

    def account(self, account) -> dict:
        r = self.get_account(account)
        assert r.status_code == 200, f"GET /v1/accounts/{account}: expected 200, got {r.status_code} {r.text}"
        return r.json()

    def balance(self, account) -> int:
        return self.account(account)["balance"]

    def all_entries(self, account, limit=500) -> list:
        out = []
        cursor = None
        for _ in range(10000):
            r = self.entries(account, limit=limit, cursor=cursor)
            assert r.status_code == 200, f"entries of {account}: {r.status_code} {r.text}"
            body = r.json()
            out.extend(body["entries"])
            cursor = body["next_cursor"]
            if cursor is None:
                return out
        raise AssertionError("entries paging did not end")


def raw_request(base: str, method: str, path: str, headers=None, body: bytes | None = None):
    """An HTTP request with the path sent exactly as given (no dot-segment removal, no re-encoding)."""
    host, port = base.replace("http://", "").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), data
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------------------------
# Assertions


def describe(r) -> str:
    return f"{r.request.method} {r.request.url} -> {r.status_code} {dict(r.headers)} {r.text[:600]!r}"


def assert_problem(r, status: int, code: str) -> dict:
    """The response is an RFC 9457 problem with this status and code slug, in the contract's exact shape."""
    assert r.status_code == status, f"expected {status} {code}; got {describe(r)}"
    ctype = r.headers.get("Content-Type", "")
    assert ctype.split(";")[0].strip() == "application/problem+json", (
        f"expected Content-Type application/problem+json for {code}; got {ctype!r}: {describe(r)}"
    )
    try:
        body = r.json()
    except ValueError:
        raise AssertionError(f"problem body is not JSON: {describe(r)}")
    assert isinstance(body, dict), f"problem body is not an object: {describe(r)}"
    assert set(body) == PROBLEM_KEYS, f"problem body keys {sorted(body)} != {sorted(PROBLEM_KEYS)}: {describe(r)}"
    assert body["code"] == code, f"expected code {code!r}, got {body['code']!r}: {describe(r)}"
    assert body["status"] == status and type(body["status"]) is int, f"problem status field wrong: {describe(r)}"
    for field in ("type", "title", "detail"):
        assert isinstance(body[field], str) and body[field], f"problem {field} must be a non-empty string: {describe(r)}"
    return body


def retrying_503(call, attempts: int = 10):
    """`call()` again, with the same key and body, while it answers 503 (what a client does: a 503 stored nothing),
    waiting its Retry-After (at least 0.2 s) in between; returns the last answer. For what must execute once the
    database answers in time again, on a machine that may be slow: a 500 ms statement bound on a loaded cluster."""
    r = call()
    for _ in range(attempts - 1):
        if r.status_code != 503:
            break
        time.sleep(max(0.2, float(r.headers.get("Retry-After", "0") or 0)))
        r = call()
    return r


def assert_json(r, status: int):
    assert r.status_code == status, f"expected {status}; got {describe(r)}"
    ctype = r.headers.get("Content-Type", "")
    assert ctype.split(";")[0].strip() == "application/json", (
        f"expected Content-Type application/json; got {ctype!r}: {describe(r)}"
    )
    return r.json()


def assert_account_shape(body: dict) -> None:
    assert set(body) == ACCOUNT_KEYS, f"account keys {sorted(body)} != {sorted(ACCOUNT_KEYS)}: {body}"
    assert isinstance(body["id"], str)
    assert isinstance(body["currency"], str)
    assert type(body["balance"]) is int, f"balance must be an integer: {body}"
    assert type(body["allow_negative"]) is bool, f"allow_negative must be a boolean: {body}"
    assert type(body["version"]) is int, f"version must be an integer: {body}"
    assert type(body["held"]) is int and body["held"] >= 0, f"held must be a non-negative integer: {body}"
    assert body["available"] == body["balance"] - body["held"], f"available must be balance - held: {body}"
    assert isinstance(body["created_at"], str) and RFC3339_Z.match(body["created_at"]), (
        f"created_at must be RFC 3339 UTC (Z): {body}"
    )


def assert_transfer_shape(body: dict) -> None:
    assert set(body) == TRANSFER_KEYS, f"transfer keys {sorted(body)} != {sorted(TRANSFER_KEYS)}: {body}"
    assert isinstance(body["id"], str) and body["id"], f"transfer id must be a non-empty string: {body}"
    assert isinstance(body["from"], str) and isinstance(body["to"], str)
    assert type(body["amount"]) is int, f"amount must be an integer: {body}"
    assert isinstance(body["currency"], str)
    assert isinstance(body["metadata"], dict), f"metadata must be an object: {body}"
    assert isinstance(body["created_at"], str) and RFC3339_Z.match(body["created_at"]), (
        f"created_at must be RFC 3339 UTC (Z): {body}"
    )
    assert body["hold_id"] is None or isinstance(body["hold_id"], str), f"hold_id must be a string or null: {body}"
    assert body["reverses"] is None or isinstance(body["reverses"], str), f"reverses must be a string or null: {body}"
    assert type(body["reversed_amount"]) is int and 0 <= body["reversed_amount"] <= body["amount"], (
        f"reversed_amount must be an integer from 0 to amount: {body}"
    )


def assert_hold_shape(body: dict) -> None:
    assert set(body) == HOLD_KEYS, f"hold keys {sorted(body)} != {sorted(HOLD_KEYS)}: {body}"
    assert isinstance(body["id"], str) and body["id"], f"hold id must be a non-empty string: {body}"
    assert body["status"] in ("pending", "captured", "voided", "expired"), f"hold status: {body}"
    assert type(body["amount"]) is int and type(body["captured_amount"]) is int, f"hold amounts: {body}"
    assert (body["status"] == "captured") == (body["transfer_id"] is not None), f"transfer_id iff captured: {body}"
    assert isinstance(body["metadata"], dict), f"metadata must be an object: {body}"
    for field in ("expires_at", "created_at"):
        assert isinstance(body[field], str) and RFC3339_Z.match(body[field]), f"{field} must be RFC 3339 UTC: {body}"


def assert_entry_shape(body: dict) -> None:
    assert set(body) == ENTRY_KEYS, f"entry keys {sorted(body)} != {sorted(ENTRY_KEYS)}: {body}"
    assert isinstance(body["transfer_id"], str), f"transfer_id must be a string: {body}"
    assert type(body["amount"]) is int and body["amount"] != 0, f"entry amount must be a non-zero integer: {body}"
    assert type(body["balance_after"]) is int, f"balance_after must be an integer: {body}"
    assert isinstance(body["created_at"], str) and RFC3339_Z.match(body["created_at"]), (
        f"created_at must be RFC 3339 UTC (Z): {body}"
    )


def replayed(r):
    return r.headers.get("Idempotent-Replayed")


def assert_first(r, status: int = 201):
    assert r.status_code == status, f"expected {status}; got {describe(r)}"
    assert replayed(r) == "false", f"first execution must carry Idempotent-Replayed: false; got {describe(r)}"


def assert_replay_of(first, again):
    """`again` is a replay of `first`: same status, same body bytes, Idempotent-Replayed: true."""
    assert again.status_code == first.status_code, (
        f"replay status {again.status_code} != first {first.status_code}: {describe(again)}"
    )
    assert again.content == first.content, (
        f"replay body differs from the first response:\nfirst: {first.content!r}\nagain: {again.content!r}"
    )
    assert replayed(again) == "true", f"replay must carry Idempotent-Replayed: true; got {describe(again)}"


def parallel(fns, max_workers=None):
    """Runs the callables at the same moment (a barrier releases them together); returns results in order."""
    from concurrent.futures import ThreadPoolExecutor

    n = len(fns)
    barrier = threading.Barrier(n)

    def run(fn):
        barrier.wait(timeout=60)
        return fn()

    with ThreadPoolExecutor(max_workers=max_workers or n) as pool:
        futures = [pool.submit(run, fn) for fn in fns]
        return [f.result() for f in futures]
