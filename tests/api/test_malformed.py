"""Malformed requests of many kinds: each gets a 4xx problem+json and writes nothing.

Sent over raw sockets where a well-behaved HTTP library would refuse to send them (NUL bytes, invalid UTF-8,
over-long headers). After every case, the database holds exactly what it held before.
"""

from __future__ import annotations

import json
import socket

import pytest

import ledgertest as lt

VALID = {"account": "{acct}", "amount": 100, "currency": "USD"}


def body(text: str) -> bytes:
    return text.encode("utf-8")


# (name, path, extra headers, body bytes, expected status or None for "any 4xx")
CASES = [
    ("empty body", "/v1/credits", {}, b"", 400),
    ("whitespace body", "/v1/credits", {}, b"   \n ", 400),
    ("truncated json", "/v1/credits", {}, body('{"account":"{acct}","amount":1'), 400),
    ("trailing garbage", "/v1/credits", {}, body('{"account":"{acct}","amount":1,"currency":"USD"} x'), 400),
    ("two documents", "/v1/credits", {}, body('{"account":"{acct}","amount":1,"currency":"USD"}{}'), 400),
    ("json array", "/v1/credits", {}, body('[{"account":"{acct}","amount":1,"currency":"USD"}]'), 400),
    ("json string", "/v1/credits", {}, body('"hello"'), 400),
    ("json null", "/v1/credits", {}, body("null"), 400),
    ("single quotes", "/v1/credits", {}, body("{'account':'{acct}','amount':1,'currency':'USD'}"), 400),
    ("trailing comma", "/v1/credits", {}, body('{"account":"{acct}","amount":1,"currency":"USD",}'), 400),
    ("comment", "/v1/credits", {}, body('{"account":"{acct}",/*x*/"amount":1,"currency":"USD"}'), 400),
    ("duplicate key", "/v1/credits", {}, body('{"account":"{acct}","amount":1,"amount":100000,"currency":"USD"}'), 400),
    ("float amount", "/v1/credits", {}, body('{"account":"{acct}","amount":1.5,"currency":"USD"}'), 400),
    ("whole float amount", "/v1/credits", {}, body('{"account":"{acct}","amount":100.0,"currency":"USD"}'), 400),
    ("exponent amount", "/v1/credits", {}, body('{"account":"{acct}","amount":1e2,"currency":"USD"}'), 400),
    ("negative zero", "/v1/credits", {}, body('{"account":"{acct}","amount":-0,"currency":"USD"}'), 400),
    ("huge amount", "/v1/credits", {}, body('{"account":"{acct}","amount":' + "9" * 400 + ',"currency":"USD"}'), 400),
    ("int64 overflow amount", "/v1/credits", {}, body('{"account":"{acct}","amount":9223372036854775808,"currency":"USD"}'), 400),
    ("leading zero", "/v1/credits", {}, body('{"account":"{acct}","amount":0100,"currency":"USD"}'), 400),
    ("NaN", "/v1/credits", {}, body('{"account":"{acct}","amount":NaN,"currency":"USD"}'), 400),
    ("string amount", "/v1/credits", {}, body('{"account":"{acct}","amount":"100","currency":"USD"}'), 400),
    ("bool amount", "/v1/credits", {}, body('{"account":"{acct}","amount":true,"currency":"USD"}'), 400),
    ("NUL byte in body", "/v1/credits", {}, b'{"account":"{acct}"\x00,"amount":1,"currency":"USD"}', 400),
    ("NUL escape in account", "/v1/credits", {}, body('{"account":"a\\u0000b","amount":1,"currency":"USD"}'), 400),
    ("NUL escape in metadata", "/v1/credits", {}, body('{"account":"{acct}","amount":1,"currency":"USD","metadata":{"k":"\\u0000"}}'), 400),
    ("invalid UTF-8", "/v1/credits", {}, b'{"account":"{acct}","amount":1,"currency":"\xff\xfe"}', 400),
    ("overlong UTF-8", "/v1/credits", {}, b'{"account":"{acct}","amount":1,"currency":"\xc0\xafSD"}', 400),
    ("lone surrogate", "/v1/credits", {}, body('{"account":"{acct}","amount":1,"currency":"USD","metadata":{"k":"\\ud800"}}'), 400),
    ("byte order mark", "/v1/credits", {}, b'\xef\xbb\xbf{"account":"{acct}","amount":1,"currency":"USD"}', 400),
    ("deep nesting", "/v1/credits", {}, body('{"account":"{acct}","amount":1,"currency":"USD","metadata":' + '{"a":' * 200 + "1" + "}" * 200 + "}"), 400),
    ("unicode currency", "/v1/credits", {}, body('{"account":"{acct}","amount":1,"currency":"ÜSD"}'), 400),
    ("unicode account", "/v1/credits", {}, body('{"account":"äcct","amount":1,"currency":"USD"}'), 400),
    ("wrong content type", "/v1/credits", {"Content-Type": "text/plain"}, None, 415),
    ("xml content type", "/v1/credits", {"Content-Type": "application/xml"}, None, 415),
    ("multipart content type", "/v1/credits", {"Content-Type": "multipart/form-data; boundary=x"}, None, 415),
    ("key with space", "/v1/credits", {"Idempotency-Key": "a b"}, None, 400),
    ("key with non-ASCII", "/v1/credits", {"Idempotency-Key": "clé"}, None, 400),
    ("unterminated sf-string key", "/v1/credits", {"Idempotency-Key": '"abc'}, None, 400),
    ("over-long key", "/v1/credits", {"Idempotency-Key": "k" * 300}, None, 400),
    ("over-long header", "/v1/credits", {"X-Padding": "p" * 200_000}, None, None),
    ("over-long body", "/v1/credits", {}, b" " * (64 * 1024 + 1), 413),
    ("unknown route", "/v1/credit", {}, None, 404),
    ("dot segment path", "/v1/accounts/../credits", {}, None, None),
    ("percent-encoded NUL in path (POST: route first)", "/v1/accounts/a%00b", {}, None, 405),
]


def send_raw(base: str, method: str, path: str, headers: dict, payload: bytes) -> tuple[int, dict, bytes]:
    host, port = base.replace("http://", "").split(":")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
             f"Content-Length: {len(payload)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
    with socket.create_connection((host, int(port)), timeout=lt.TIMEOUT) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    response_headers = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        response_headers[k.strip().lower()] = v.strip()
    return status, response_headers, rest


def counts(sql) -> str:
    return sql("SELECT (SELECT count(*) FROM ledger.transfers) || '/' || (SELECT count(*) FROM ledger.entries)"
               " || '/' || (SELECT count(*) FROM ledger.idempotency_keys) || '/' || (SELECT count(*) FROM ledger.accounts)")


@pytest.mark.parametrize("name, path, headers, payload, expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_gets_4xx_problem_and_writes_nothing(api_a, sql, name, path, headers, payload, expected):
    account = api_a.funded_account(1000)
    if payload is None:
        payload = json.dumps(VALID).encode()
    payload = payload.replace(b"{acct}", account.encode())
    full = {"Authorization": f"Bearer {api_a.token}", "Content-Type": "application/json",
            "Idempotency-Key": lt.uid("fuzz-")}
    full.update(headers)
    before = counts(sql)
    status, response_headers, data = send_raw(api_a.base, "POST", path, full, payload)
    assert 400 <= status < 500, f"{name}: expected a 4xx, got {status} {data[:300]!r}"
    if expected is not None:
        assert status == expected, f"{name}: expected {expected}, got {status} {data[:300]!r}"
    if status != 431 and data:
        assert response_headers.get("content-type", "").startswith("application/problem+json"), (name, response_headers)
        problem = json.loads(data)
        assert set(problem) == lt.PROBLEM_KEYS and problem["status"] == status, (name, problem)
    assert counts(sql) == before, f"{name}: something was written"
    assert api_a.balance(account) == 1000


def test_there_are_at_least_30_kinds():
    assert len(CASES) >= 30
