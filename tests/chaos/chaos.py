#!/usr/bin/env python3
"""Chaos test: nothing lost, nothing twice, while the service is killed with SIGKILL and PostgreSQL crashes.

Workers post transfers, and holds followed by a partial capture, with unique Idempotency-Keys, and retry every
request that got no definitive answer with the same key and body. Meanwhile the service is killed with SIGKILL at random moments and restarted, and PostgreSQL is
stopped in immediate mode (a crash) and restarted once. At the end:
  - every acknowledged transfer (a 201 a worker received) exists exactly once, with the acknowledged body;
  - every acknowledged hold exists once; every acknowledged capture made exactly one transfer, of the captured
    amount, from the hold (kill -9 mid-capture included), and a capture acknowledged as failed made none;
  - every key that was acknowledged with a stored failure made no transfer;
  - no key made two transfers, and no transfer exists that no worker asked for;
  - a webhook on every event, whose receiver fails a fifth of the attempts, got every event committed after it was
    made at least once with a 2xx, and, deduplicated by `webhook-id`, exactly once with the feed's bytes;
  - `ledger verify` passes.
Prints `chaos: N requests, K kills, L lost, D duplicated` and exits non-zero unless L and D are 0.

Needs LEDGER_BIN, LEDGER_TEST_PG (admin conninfo without dbname) and LEDGER_TEST_PGDATA (the server's data directory,
to crash and restart it); scripts/test sets all three. Bounded: LEDGER_CHAOS_SECONDS of load (default 40), then at
most 60 s to settle.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "api"))
from webhookreceiver import Receiver  # noqa: E402 - beside the API tests, shared
LEDGER_BIN = os.environ.get("LEDGER_BIN", os.path.join(ROOT, ".build/debug/ledger"))
PG_ADMIN = os.environ["LEDGER_TEST_PG"]
PG_DATA = os.environ["LEDGER_TEST_PGDATA"]
PG_PORT = re.search(r"port=(\d+)", PG_ADMIN).group(1)
LOAD_SECONDS = float(os.environ.get("LEDGER_CHAOS_SECONDS", "40"))
SETTLE_SECONDS = 60.0
WORKERS = 8
KILLS_MIN = 5
ACCOUNTS = [f"acct-{i}" for i in range(8)]


def psql(db: str, sql: str) -> str:
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", f"{PG_ADMIN} dbname={db}", "-c", sql],
        check=True, capture_output=True, text=True,
    )
    return out.stdout.strip()


def pg_control(action: str) -> None:
    script = f'. "{ROOT}/scripts/pg.sh"; '
    script += f'pg_stop "{PG_DATA}" immediate' if action == "crash" else f'pg_start "{PG_DATA}" {PG_PORT}'
    subprocess.run(["bash", "-c", script], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One `ledger serve` process that can be killed and restarted on the same port."""

    def __init__(self, db: str, port: int, log_path: str):
        self.db, self.port, self.log_path = db, port, log_path
        self.proc: subprocess.Popen | None = None
        self.kills = 0

    def start(self) -> None:
        log = open(self.log_path, "ab")
        env = dict(os.environ, DATABASE_URL=f"{PG_ADMIN} dbname={self.db}", LOG_LEVEL="warning")
        self.proc = subprocess.Popen(
            [LEDGER_BIN, "serve", "--port", str(self.port), "--pool-size", "8", "--key-wait-ms", "2000",
             "--pool-acquire-wait-ms", "2000", "--connect-timeout-s", "2",
             "--webhook-retry-base-ms", "200", "--webhook-retry-max-ms", "1000", "--webhook-timeout-ms", "2000",
             "--webhook-attempts-max", "1000"],
            env=env, stdout=log, stderr=log, cwd=ROOT,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"ledger serve exited with {self.proc.returncode}; see {self.log_path}")
            time.sleep(0.1)
        raise RuntimeError(f"ledger serve did not become healthy; see {self.log_path}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.acked: dict[str, tuple[int, str]] = {}   # key -> (status, first body)
        self.paths: dict[str, str] = {}                # key -> the path it was posted to
        self.replay_mismatch: list[str] = []
        self.asked: set[str] = set()
        self.unsettled: set[str] = set()


STORED_CODES = ("insufficient-funds", "account-not-found", "currency-mismatch", "balance-overflow", "hold-captured",
                "hold-voided", "hold-expired", "capture-exceeds-hold", "hold-not-found")


def post(base: str, token: str, key: str, body: bytes, path: str = "/v1/transfers") -> tuple[int, str] | None:
    """One attempt; None when there was no definitive answer (connection refused or reset, timeout, 5xx, 409)."""
    request = urllib.request.Request(
        f"{base}{path}", data=body, method="POST",
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        text = error.read().decode()
        if error.code in (404, 422):
            code = json.loads(text).get("code")
            if code in STORED_CODES:
                return error.code, text
            raise AssertionError(f"unexpected {error.code} {text}")
        if error.code >= 500 or error.code == 409:
            return None
        raise AssertionError(f"unexpected {error.code} {text}")
    except (OSError, ConnectionError):
        return None


def settle(base: str, token: str, stats: Stats, hard_until: float, path: str, key: str, body: bytes):
    """Posts until a definitive answer, then once more: the replay must give the very same status and bytes.
    Returns the first definitive answer, or None when there was none before `hard_until`."""
    with stats.lock:
        stats.asked.add(key)
        stats.paths[key] = path
    first = None
    while time.time() < hard_until:
        with stats.lock:
            stats.requests += 1
        answer = post(base, token, key, body, path)
        if answer is None:
            time.sleep(0.05)
            continue
        if first is None:
            first = answer
            with stats.lock:
                stats.acked[key] = answer
            continue
        if answer != first:
            with stats.lock:
                stats.replay_mismatch.append(key)
        return first
    with stats.lock:
        stats.unsettled.add(key)
    return first


def worker(base: str, token: str, stats: Stats, load_until: float, hard_until: float, seed: int) -> None:
    """Transfers; every fourth worker places holds and captures part of each instead."""
    rng = random.Random(seed)
    while time.time() < load_until:
        src, dst = rng.sample(ACCOUNTS, 2)
        amount = rng.randint(1, 500)
        if seed % 4 != 3:
            body = json.dumps({"from": src, "to": dst, "amount": amount, "currency": "USD",
                               "metadata": {"worker": seed}}).encode()
            settle(base, token, stats, hard_until, "/v1/transfers", f"chaos-{uuid.uuid4()}", body)
            continue
        body = json.dumps({"from": src, "to": dst, "amount": amount, "currency": "USD"}).encode()
        placed = settle(base, token, stats, hard_until, "/v1/holds", f"chaos-hold-{uuid.uuid4()}", body)
        if placed is None or placed[0] != 201:
            continue
        hold = json.loads(placed[1])
        capture = json.dumps({"amount": rng.randint(1, amount)}).encode()
        settle(base, token, stats, hard_until, f"/v1/holds/{hold['id']}/capture", f"chaos-capture-{uuid.uuid4()}",
               capture)


def check_holds(db: str, stats: Stats) -> list[str]:
    """Keys whose acknowledged hold or capture the database does not show exactly once."""
    rows = psql(db, "SELECT h.idempotency_key, h.id, h.status, h.captured_amount, coalesce(h.finished_key, ''), "
                    "(SELECT count(*) FROM ledger.transfers t WHERE t.client_id = h.client_id AND t.hold_id = h.id), "
                    "(SELECT string_agg(t.amount::text, ',') FROM ledger.transfers t "
                    " WHERE t.client_id = h.client_id AND t.hold_id = h.id) "
                    "FROM ledger.holds h WHERE h.client_id = 'chaos'")
    holds = {}
    captures = {}
    for line in rows.splitlines():
        key, hold_id, status, captured, finished, transfers, amounts = line.split("|")
        holds[key] = hold_id
        if finished:
            captures[finished] = (status, int(captured), int(transfers), amounts)
    bad = []
    for key, (status, body) in stats.acked.items():
        path = stats.paths[key]
        if path == "/v1/holds" and status == 201 and holds.get(key) != json.loads(body)["id"]:
            bad.append(key)
        if path.endswith("/capture"):
            made = captures.get(key)
            if status == 200:
                want = json.loads(body)["captured_amount"]
                if made != ("captured", want, 1, str(want)):
                    bad.append(key)
            elif made is not None:
                bad.append(key)   # told it failed, but the hold was captured by this key
    return bad


def get_json(base: str, token: str, path: str) -> dict:
    request = urllib.request.Request(f"{base}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def feed(base: str, token: str, after: str | None = None) -> list[dict]:
    """Every event after `after`, following next_after."""
    events = []
    while True:
        page = get_json(base, token, "/v1/events?limit=1000" + (f"&after={after}" if after else ""))
        if not page["events"]:
            return events
        events += page["events"]
        after = page["next_after"]


def check_webhook(db: str, base: str, token: str, receiver: Receiver, first_after: str | None) -> list[str]:
    """Waits (bounded) until nothing is pending, then compares what the receiver acknowledged with the feed."""
    deadline = time.time() + 90
    while time.time() < deadline and psql(db, "SELECT count(*) FROM ledger.webhook_deliveries WHERE NOT failed") != "0":
        time.sleep(0.5)
    expected = {e["id"]: json.dumps(e, separators=(",", ":")) for e in feed(base, token, first_after)}
    delivered: dict[str, set[bytes]] = {}
    for d in receiver.at("/chaos"):
        if d["status"] == 200:
            delivered.setdefault(d["id"], set()).add(d["body"])
    problems = [f"missing {i}" for i in expected if i not in delivered]
    problems += [f"unexpected {i}" for i in delivered if i not in expected]
    problems += [f"bodies differ for {i}" for i, bodies in delivered.items() if len(bodies) != 1]
    problems += [f"body of {i} is not the feed's" for i, bodies in delivered.items()
                 if i in expected and json.loads(next(iter(bodies))) != json.loads(expected[i])]
    twice = sum(1 for d in receiver.at("/chaos") if d["status"] == 200) - len(delivered)
    print(f"chaos: webhook: {len(expected)} events, {len(delivered)} delivered, {twice} duplicate deliveries "
          f"(removed by webhook-id), {sum(1 for d in receiver.at('/chaos') if d['status'] != 200)} failed attempts")
    return problems


def main() -> int:
    db = "chaos_" + uuid.uuid4().hex[:12]
    psql("postgres", f"CREATE DATABASE {db}")
    env = dict(os.environ, DATABASE_URL=f"{PG_ADMIN} dbname={db}")
    subprocess.run([LEDGER_BIN, "migrate"], env=env, check=True, capture_output=True, cwd=ROOT)
    token = subprocess.run([LEDGER_BIN, "token", "create", "chaos"], env=env, check=True, capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
    port = free_port()
    service = Service(db, port, os.path.join(os.environ.get("TMPDIR", "/tmp"), f"{db}.log"))
    service.start()
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    for account in ACCOUNTS:
        urllib.request.urlopen(urllib.request.Request(
            f"{base}/v1/accounts/{account}", data=b'{"currency":"USD"}', method="PUT", headers=headers), timeout=10)
        urllib.request.urlopen(urllib.request.Request(
            f"{base}/v1/credits", data=json.dumps({"account": account, "amount": 20_000, "currency": "USD"}).encode(),
            method="POST", headers=dict(headers, **{"Idempotency-Key": f"fund-{account}"})), timeout=10)
    # A webhook on every event, whose receiver fails a fifth of the attempts.
    receiver = Receiver()
    flaky = random.Random(11)
    receiver.answers = lambda path, attempt: (500, {}) if flaky.random() < 0.2 else (200, {})
    urllib.request.urlopen(urllib.request.Request(
        f"{base}/v1/webhooks/chaos", data=json.dumps({"url": receiver.url("/chaos")}).encode(), method="PUT",
        headers=headers), timeout=10)
    before_hook = feed(base, token)
    first_after = before_hook[-1]["id"] if before_hook else None

    stats = Stats()
    started = time.time()
    load_until = started + LOAD_SECONDS
    hard_until = load_until + SETTLE_SECONDS
    threads = [threading.Thread(target=worker, args=(base, token, stats, load_until, hard_until, i), daemon=True)
               for i in range(WORKERS)]
    for t in threads:
        t.start()

    # Kill the service at random moments; crash PostgreSQL once, between two kills.
    rng = random.Random(7)
    crash_after_kill = 2
    interval = LOAD_SECONDS / (KILLS_MIN + 2)
    while service.kills < KILLS_MIN or time.time() < load_until - interval:
        time.sleep(rng.uniform(0.5, 1.5) * interval)
        service.kill()
        if service.kills == crash_after_kill:
            pg_control("crash")
            time.sleep(1.5)
            pg_control("start")
        service.start()
        if time.time() > load_until + 10:
            break

    for t in threads:
        t.join(timeout=max(1.0, hard_until - time.time() + 5))
    webhook_problems = check_webhook(db, base, token, receiver, first_after)
    service.stop()
    receiver.close()

    # Check the database against what workers were told.
    rows = psql(db, "SELECT t.idempotency_key, ledger.transfer_json(t) FROM ledger.transfers t "
                    "WHERE t.client_id = 'chaos' AND t.idempotency_key LIKE 'chaos-%'")
    hold_errors = check_holds(db, stats)
    transfers: dict[str, list[str]] = {}
    for line in rows.splitlines():
        key, body = line.split("|", 1)
        transfers.setdefault(key, []).append(body)
    lost = []
    for key, (status, body) in stats.acked.items():
        if stats.paths[key] != "/v1/transfers":
            continue   # holds and captures: check_holds
        made = transfers.get(key, [])
        if status == 201 and made != [body]:
            lost.append(key)
        if status != 201 and made:
            lost.append(key)   # told it failed, but money moved
    duplicated = [k for k, made in transfers.items() if len(made) > 1 or k not in stats.asked]
    verify = subprocess.run([LEDGER_BIN, "verify"], env=env, capture_output=True, text=True)

    created = sum(1 for k, (s, _) in stats.acked.items() if s == 201 and stats.paths[k] == "/v1/transfers")
    lost += hold_errors
    captured = sum(1 for k, (s, _) in stats.acked.items() if s == 200 and stats.paths[k].endswith("/capture"))
    print(f"chaos: {stats.requests} requests, {service.kills} kills, {len(lost)} lost, {len(duplicated)} duplicated")
    print(f"chaos: {captured} captures acknowledged")
    print(f"chaos: {len(stats.asked)} keys, {created} transfers acknowledged, "
          f"{sum(1 for st, _ in stats.acked.values() if st >= 400)} stored failures, {len(stats.unsettled)} unsettled, "
          f"{len(stats.replay_mismatch)} replay mismatches, verify exit {verify.returncode}")
    ok = (not lost and not duplicated and not stats.replay_mismatch and not stats.unsettled and not webhook_problems
          and verify.returncode == 0 and service.kills >= KILLS_MIN and created > 0 and captured > 0)
    if not ok:
        print(f"chaos: FAILED; webhook={webhook_problems[:5]} lost={lost[:5]} duplicated={duplicated[:5]} "
              f"mismatch={stats.replay_mismatch[:5]} "
              f"unsettled={list(stats.unsettled)[:5]} verify={verify.stdout}{verify.stderr} log={service.log_path}")
    else:
        psql("postgres", f"DROP DATABASE {db} WITH (FORCE)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
