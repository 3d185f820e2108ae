"""The client commands (`ledger credit|debit|transfer|hold|capture|void|reverse`) against the real service, most of
them through a fault-injecting HTTP proxy: a connection cut before or after the service answered, a 503 or 429 with
Retry-After, a 409 while the same key still executes. Each time the command retries with the same key and the same
body bytes, and the money moves exactly once; when it gives up it exits 2 and the key it printed, reused by hand,
replays the outcome.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections import deque

import pytest

import ledgertest as lt

KEY_LINE = re.compile(r"^idempotency-key: (\S+)$", re.M)


def run_cli(args, env=None, timeout=120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("LEDGER_URL", "LEDGER_TOKEN")}
    full_env.update(env or {})
    return subprocess.run([lt.LEDGER_BIN, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=lt.REPO)


def printed_key(proc) -> str:
    match = KEY_LINE.search(proc.stderr)
    assert match, f"no idempotency-key line on stderr:\n{proc.stderr}"
    return match.group(1)


def describe(proc) -> str:
    return f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"


def transfers_with_key(db: str, key: str) -> int:
    return int(lt.psql(db, f"SELECT count(*) FROM ledger.transfers WHERE idempotency_key = {lt.sql_literal(key)}"))


# --------------------------------------------------------------------------------------------------------------------
# The proxy


def read_message(sock: socket.socket, buffer: bytearray) -> bytes | None:
    """One HTTP/1.1 message (head and a Content-Length body) from the socket; None when it closed first."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            return None
        buffer += data
    head_end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:head_end]).decode("latin-1")
    match = re.search(r"(?im)^content-length:\s*(\d+)\s*$", head)
    length = int(match.group(1)) if match else 0
    assert not re.search(r"(?im)^transfer-encoding:", head), "the proxy only reads Content-Length bodies"
    while len(buffer) < head_end + length:
        data = sock.recv(65536)
        if not data:
            return None
        buffer += data
    message = bytes(buffer[:head_end + length])
    del buffer[:head_end + length]
    return message


def header(message: bytes, name: str) -> str | None:
    head = message.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    match = re.search(rf"(?im)^{re.escape(name)}:\s*(.*?)\s*$", head)
    return match.group(1) if match else None


def body_of(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[1]


def problem_answer(status: int, reason: str, code: str, retry_after: str | None) -> bytes:
    body = json.dumps({"type": f"urn:ledger:problem:{code}", "title": reason, "status": status,
                       "detail": "injected by the test proxy", "code": code}).encode()
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/problem+json\r\nContent-Length: {len(body)}\r\n"
    if callable(retry_after):
        retry_after = retry_after()
    if retry_after is not None:
        head += f"Retry-After: {retry_after}\r\n"
    return head.encode() + b"\r\n" + body


class FaultProxy:
    """An HTTP/1.1 proxy in front of the service that plays one scripted fault per request, then forwards:
    - ("pass",): forward and relay the answer;
    - ("cut-before",): close the client's connection without forwarding (the request never ran);
    - ("cut-after",): forward, then close the client's connection instead of relaying the answer (it ran);
    - ("stall",): never answer, until the client closes the connection;
    - ("answer", status, reason, code, retry_after): answer that problem itself, without forwarding.
    Every request is recorded with its arrival time, so tests can compare keys, bodies and waits."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.script: deque = deque()
        self.default = ("pass",)
        self.requests: list[tuple[float, bytes]] = []
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def plan(self, *steps, default=("pass",)):
        with self.lock:
            self.script = deque(steps)
            self.default = default
            self.requests = []

    def next_step(self, message: bytes):
        with self.lock:
            self.requests.append((time.monotonic(), message))
            return self.script.popleft() if self.script else self.default

    def accept_loop(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client: socket.socket):
        buffer = bytearray()
        try:
            while True:
                message = read_message(client, buffer)
                if message is None:
                    return
                step = self.next_step(message)
                if step[0] == "cut-before":
                    return
                if step[0] == "stall":
                    # Hear the request, never answer; wait for the client to give up on this connection.
                    while client.recv(65536):
                        pass
                    return
                if step[0] == "answer":
                    client.sendall(problem_answer(*step[1:]))
                    continue
                answer = self.forward(message)
                if step[0] == "cut-after":
                    return
                client.sendall(answer)
        except OSError:
            return
        finally:
            client.close()

    def forward(self, message: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.upstream_port), timeout=60) as upstream:
            upstream.sendall(message)
            answer = read_message(upstream, bytearray())
        assert answer is not None, "the service closed without answering"
        return answer

    def close(self):
        self.closed = True
        self.listener.close()


@pytest.fixture(scope="module")
def proxy(server):
    p = FaultProxy(server.port)
    yield p
    p.close()


@pytest.fixture
def cli(api_a):
    """Runs a client command as client a, with the URL and token in flags."""

    def run(command, *args, url=None, env=None, timeout=120):
        return run_cli([command, "--url", url or api_a.base, "--token", api_a.token, *args], env=env,
                       timeout=timeout)

    return run


FAST = ["--retry-base-ms", "10", "--retry-max-ms", "50"]


def assert_same_key_and_bytes(proxy: FaultProxy, attempts: int) -> None:
    assert len(proxy.requests) == attempts, [m[:200] for _, m in proxy.requests]
    keys = {header(m, "Idempotency-Key") for _, m in proxy.requests}
    bodies = {body_of(m) for _, m in proxy.requests}
    assert len(keys) == 1 and None not in keys, keys
    assert len(bodies) == 1, bodies


# --------------------------------------------------------------------------------------------------------------------
# Retries through the proxy: exactly once


@pytest.mark.parametrize("fault", ["cut-before", "cut-after"])
def test_a_cut_connection_is_retried_with_the_same_key_and_the_transfer_is_made_once(
        api_a, main_db, proxy, cli, fault):
    payer, payee = api_a.funded_account(1000), api_a.new_account()
    proxy.plan((fault,), (fault,))
    proc = cli("transfer", "--from", payer, "--to", payee, "--amount", "250", "--currency", "USD", *FAST,
               url=proxy.url)
    assert proc.returncode == 0, describe(proc)
    key = printed_key(proc)
    assert_same_key_and_bytes(proxy, 3)
    assert header(proxy.requests[0][1], "Idempotency-Key") == key
    transfer = json.loads(proc.stdout)
    lt.assert_transfer_shape(transfer)
    assert (transfer["from"], transfer["to"], transfer["amount"]) == (payer, payee, 250)
    assert transfers_with_key(main_db, key) == 1
    assert api_a.balance(payer) == 750 and api_a.balance(payee) == 250
    assert proc.stderr.count("retrying in") == 2, proc.stderr


@pytest.mark.parametrize("status, reason, code", [
    (503, "Service Unavailable", "database-unavailable"),
    (429, "Too Many Requests", "rate-limited"),
    (502, "Bad Gateway", "bad-gateway"),
    (504, "Gateway Timeout", "gateway-timeout"),
    (409, "Conflict", "idempotency-key-in-progress"),
])
def test_retryable_answers_are_retried_and_the_money_moves_once(api_a, main_db, proxy, cli, status, reason, code):
    account = api_a.funded_account(1000)
    proxy.plan(("answer", status, reason, code, "0"), ("cut-after",), ("answer", status, reason, code, None))
    proc = cli("debit", "--account", account, "--amount", "100", "--currency", "USD", *FAST, url=proxy.url)
    assert proc.returncode == 0, describe(proc)
    assert_same_key_and_bytes(proxy, 4)
    assert transfers_with_key(main_db, printed_key(proc)) == 1
    assert api_a.balance(account) == 900


@pytest.mark.parametrize("form", ["delta-seconds", "http-date"])
def test_retry_after_is_waited_for(api_a, proxy, cli, form):
    account = api_a.funded_account(1000)
    # An HTTP-date has whole seconds: made when the proxy answers, 3 s ahead is at least 2 s from then.
    retry_after = "2" if form == "delta-seconds" else lambda: email.utils.formatdate(time.time() + 3, usegmt=True)
    proxy.plan(("answer", 503, "Service Unavailable", "database-unavailable", retry_after))
    proc = cli("credit", "--account", account, "--amount", "5", "--currency", "USD", *FAST, url=proxy.url)
    assert proc.returncode == 0, describe(proc)
    (first, _), (second, _) = proxy.requests
    assert second - first >= 1.9, f"retried {second - first:.2f} s after a Retry-After of 2 s or more"
    assert api_a.balance(account) == 1005


def test_a_409_while_the_key_executes_is_retried_until_it_completes(main_db, clients, start_server):
    """A real 409 idempotency-key-in-progress: the key's lock is held from psql as if another execution ran."""
    server = start_server(["--key-wait-ms", "100", "--retry-after-s", "1"])
    name, token = clients["a"]
    api = lt.Api(server.base, token, name)
    account = api.funded_account(1000)
    key = lt.uid("k-")
    args = ["debit", "--url", server.base, "--token", token, "--idempotency-key", key, "--account", account,
            "--amount", "100", "--currency", "USD", *FAST]
    with lt.holding_key_lock(main_db, name, key):
        proc = subprocess.Popen([lt.LEDGER_BIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2.5)   # at least two answers of 409, each followed by its Retry-After of 1 s
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    assert "409 idempotency-key-in-progress" in err, err
    assert json.loads(out)["amount"] == 100
    assert transfers_with_key(main_db, key) == 1
    assert api.balance(account) == 900


def test_an_attempt_that_hears_nothing_times_out_and_is_retried(api_a, main_db, proxy, cli):
    account = api_a.funded_account(1000)
    proxy.plan(("stall",))
    started = time.monotonic()
    proc = cli("credit", "--account", account, "--amount", "7", "--currency", "USD", "--attempt-timeout-s", "1",
               *FAST, url=proxy.url)
    assert proc.returncode == 0, describe(proc)
    assert time.monotonic() - started >= 1
    assert "attempt 1: no answer" in proc.stderr, proc.stderr
    assert_same_key_and_bytes(proxy, 2)
    assert transfers_with_key(main_db, printed_key(proc)) == 1
    assert api_a.balance(account) == 1007


# --------------------------------------------------------------------------------------------------------------------
# Giving up, and the key reused by hand


def test_giving_up_exits_2_and_the_printed_key_replays_by_hand(api_a, main_db, proxy, cli):
    payer, payee = api_a.funded_account(1000), api_a.new_account()
    # Every attempt executes (or replays) on the service, and the command never hears the answer.
    proxy.plan(default=("cut-after",))
    proc = cli("transfer", "--from", payer, "--to", payee, "--amount", "300", "--currency", "USD",
               "--retries-max", "2", *FAST, url=proxy.url)
    assert proc.returncode == 2, describe(proc)
    assert proc.stdout == ""
    key = printed_key(proc)
    assert f"--idempotency-key {key}" in proc.stderr, proc.stderr
    assert_same_key_and_bytes(proxy, 3)
    assert transfers_with_key(main_db, key) == 1

    again = cli("transfer", "--from", payer, "--to", payee, "--amount", "300", "--currency", "USD",
                "--idempotency-key", key)
    assert again.returncode == 0, describe(again)
    transfer = json.loads(again.stdout)
    assert transfer["id"] == lt.psql(
        main_db, f"SELECT id FROM ledger.transfers WHERE idempotency_key = {lt.sql_literal(key)}")
    assert api_a.balance(payer) == 700 and api_a.balance(payee) == 300
    state = api_a.get(f"/v1/idempotency-keys/{key}").json()
    assert state["state"] == "completed" and state["transfer_id"] == transfer["id"], state


def test_the_time_bound_gives_up_before_a_retry_after_beyond_it(api_a, proxy, cli):
    account = api_a.funded_account(1000)
    proxy.plan(default=("answer", 503, "Service Unavailable", "database-unavailable", "30"))
    started = time.monotonic()
    proc = cli("debit", "--account", account, "--amount", "1", "--currency", "USD", "--timeout-s", "5", *FAST,
               url=proxy.url)
    assert proc.returncode == 2, describe(proc)
    assert time.monotonic() - started < 5, "it waited for a Retry-After past its own time bound"
    assert "503 database-unavailable" in proc.stderr, proc.stderr
    assert len(proxy.requests) == 1
    assert api_a.balance(account) == 1000


def test_nothing_listening_exits_2(cli):
    port = lt.free_port()
    proc = cli("credit", "--account", "x", "--amount", "1", "--currency", "USD", "--retries-max", "1", *FAST,
               url=f"http://127.0.0.1:{port}")
    assert proc.returncode == 2, describe(proc)
    assert proc.stdout == ""
    assert "attempt 1: no answer" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------------------------------
# Definitive answers: exit 1, printed, never retried


def test_422_is_definitive_exit_1_with_the_problem_on_stdout(api_a, proxy, cli):
    account = api_a.funded_account(10)
    proxy.plan()
    proc = cli("debit", "--account", account, "--amount", "11", "--currency", "USD", *FAST, url=proxy.url)
    assert proc.returncode == 1, describe(proc)
    assert json.loads(proc.stdout)["code"] == "insufficient-funds"
    assert len(proxy.requests) == 1
    # The stored outcome replays to the same key.
    again = cli("debit", "--account", account, "--amount", "11", "--currency", "USD",
                "--idempotency-key", printed_key(proc))
    assert again.returncode == 1 and again.stdout == proc.stdout, describe(again)


def test_a_409_other_than_in_progress_is_definitive(api_a, proxy, cli):
    account = api_a.funded_account(10)
    proxy.plan(("answer", 409, "Conflict", "some-other-conflict", "0"))
    proc = cli("credit", "--account", account, "--amount", "1", "--currency", "USD", *FAST, url=proxy.url)
    assert proc.returncode == 1, describe(proc)
    assert json.loads(proc.stdout)["code"] == "some-other-conflict"
    assert len(proxy.requests) == 1


def test_400_and_401_are_definitive(api_a, cli):
    proc = cli("credit", "--account", "@world", "--amount", "1", "--currency", "USD")
    assert proc.returncode == 1, describe(proc)
    assert json.loads(proc.stdout)["code"] == "invalid-account-id"
    proc = run_cli(["credit", "--url", api_a.base, "--token", "nope", "--account", "a", "--amount", "1",
                    "--currency", "USD"])
    assert proc.returncode == 1, describe(proc)
    assert json.loads(proc.stdout)["code"] == "unauthorized"


# --------------------------------------------------------------------------------------------------------------------
# Flags and environment


def test_url_and_token_come_from_the_environment(api_a):
    account = api_a.new_account()
    env = {"LEDGER_URL": api_a.base, "LEDGER_TOKEN": api_a.token}
    proc = run_cli(["credit", "--account", account, "--amount", "42", "--currency", "USD",
                    "--metadata", '{"order":"o-1","n":[1,2]}'], env=env)
    assert proc.returncode == 0, describe(proc)
    transfer = json.loads(proc.stdout)
    assert transfer["from"] == "@world" and transfer["metadata"] == {"order": "o-1", "n": [1, 2]}
    assert api_a.balance(account) == 42


def test_a_given_key_is_used_and_replays(api_a, main_db, cli):
    account = api_a.funded_account(100)
    key = lt.uid("cli-")
    args = ["--account", account, "--amount", "10", "--currency", "USD", "--idempotency-key", key]
    first, again = cli("debit", *args), cli("debit", *args)
    assert first.returncode == 0 and again.returncode == 0, describe(first) + describe(again)
    assert printed_key(first) == key
    assert first.stdout == again.stdout
    assert transfers_with_key(main_db, key) == 1
    assert api_a.balance(account) == 90
    # The same key with another body is refused: 422 idempotency-key-reused, exit 1.
    other = cli("debit", "--account", account, "--amount", "11", "--currency", "USD", "--idempotency-key", key)
    assert other.returncode == 1 and json.loads(other.stdout)["code"] == "idempotency-key-reused", describe(other)


def test_if_match_executes_on_the_version_and_412_otherwise(api_a, cli):
    account = api_a.funded_account(100)
    version = api_a.account(account)["version"]
    stale = cli("debit", "--account", account, "--amount", "1", "--currency", "USD", "--if-match", str(version + 5))
    assert stale.returncode == 1, describe(stale)
    problem = json.loads(stale.stdout)
    assert problem["code"] == "version-mismatch" and problem["current_version"] == version
    quoted = cli("debit", "--account", account, "--amount", "1", "--currency", "USD", "--if-match", f'"{version}"')
    assert quoted.returncode == 0, describe(quoted)
    assert api_a.balance(account) == 99


def test_hold_capture_void_and_reverse(api_a, cli):
    payer, payee = api_a.funded_account(1000), api_a.new_account()
    hold = cli("hold", "--from", payer, "--to", payee, "--amount", "300", "--currency", "USD", "--expires-in-s",
               "600", "--metadata", '{"order":"h-1"}')
    assert hold.returncode == 0, describe(hold)
    hold_body = json.loads(hold.stdout)
    assert hold_body["status"] == "pending" and hold_body["metadata"] == {"order": "h-1"}
    captured = cli("capture", "--hold", hold_body["id"], "--amount", "200")
    assert captured.returncode == 0, describe(captured)
    captured_body = json.loads(captured.stdout)
    assert captured_body["status"] == "captured" and captured_body["captured_amount"] == 200
    assert api_a.balance(payee) == 200

    to_world = cli("hold", "--from", payer, "--amount", "50", "--currency", "USD")
    assert to_world.returncode == 0 and json.loads(to_world.stdout)["to"] == "@world", describe(to_world)
    voided = cli("void", "--hold", json.loads(to_world.stdout)["id"])
    assert voided.returncode == 0 and json.loads(voided.stdout)["status"] == "voided", describe(voided)
    again = cli("void", "--hold", json.loads(to_world.stdout)["id"])
    assert again.returncode == 1 and json.loads(again.stdout)["code"] == "hold-voided", describe(again)

    reversed_ = cli("reverse", "--transfer", captured_body["transfer_id"], "--amount", "50")
    assert reversed_.returncode == 0, describe(reversed_)
    assert json.loads(reversed_.stdout)["reverses"] == captured_body["transfer_id"]
    rest = cli("reverse", "--transfer", captured_body["transfer_id"])
    assert rest.returncode == 0 and json.loads(rest.stdout)["amount"] == 150, describe(rest)
    assert api_a.balance(payee) == 0 and api_a.balance(payer) == 1000


def test_missing_flags_are_usage_errors(api_a):
    proc = run_cli(["transfer", "--url", api_a.base, "--token", api_a.token, "--from", "a", "--amount", "1",
                    "--currency", "USD"])
    assert proc.returncode not in (0, 1, 2), describe(proc)
    assert "--to" in proc.stderr, proc.stderr
    proc = run_cli(["credit", "--account", "a", "--amount", "1", "--currency", "USD", "--metadata", "[1]"])
    assert proc.returncode not in (0, 1, 2), describe(proc)
    assert "--metadata" in proc.stderr, proc.stderr
