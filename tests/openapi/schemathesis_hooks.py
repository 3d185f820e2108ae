"""Schemathesis hooks for the Ledger API run (loaded through SCHEMATHESIS_HOOKS by run_schemathesis.sh).

One hook only, `filter_failure`, and only for the `positive_data_acceptance` check: it drops a "schema-valid request
rejected" failure when, and only when, the server's problem `code` is exactly the documented answer to a rule that
JSON Schema cannot express. Every such request is still sent and every other check (status codes, content types,
headers, response schemas, server errors) still applies to its response; a rejection with any other code, or for a
request the rules below do not explain, remains a failure.

The rules the schema cannot carry:
- `same-account`: `from` must differ from `to` (a transfer or a hold); JSON Schema cannot compare two properties.
- For POST /v1/transfers/batch, each of these rules applied to the first invalid item, which the problem's detail
  names (`transfers[i]: ...`).
- `invalid-amount` for a whole float (`215.0`): in JSON Schema's data model 215.0 *is* an integer, but the contract
  refuses any amount lexeme with a fraction or an exponent, so that no float ever stands for money. The same for a
  hold's `expires_in_s` (`invalid-expiry`).
- `invalid-metadata`: metadata over 4096 bytes as compact JSON, or holding U+0000 (which PostgreSQL jsonb cannot
  store); JSON Schema has no byte-size limit for an object.
- `invalid-cursor`: a cursor is valid only when the service issued it for that account (its entries or its holds); a
  generated one never is. The same for the `after` of GET /v1/events: an event id this client was given.
- `invalid-webhook-url` for a URL that has the documented `http(s)://` prefix but no well-formed host after it, or
  whose host is a link-local address (refused whatever `--webhook-hosts-allowed` says).
- 422 business outcomes of a well-formed POST: `insufficient-funds`, `currency-mismatch`, `balance-overflow`, the
  hold and reversal outcomes (`hold-captured`, `hold-voided`, `hold-expired`, `capture-exceeds-hold`,
  `reversal-exceeds-transfer`, `transfer-not-reversible`), and `idempotency-key-reused` (a generated Idempotency-Key
  that an earlier generated request already used with another body), and 412 `version-mismatch` (a generated
  If-Match naming another version than the account's). These are answers about the ledger's state, not about the
  request's shape.
- `invalid-if-match` for an `If-Match` value outside the documented pattern (one strong tag, `"7"`): the coverage
  phase sends some pattern-derived header values without their quotes, so the request was not schema-valid.
- `idempotency-key-invalid` on `GET /v1/idempotency-keys/{key}` when the key actually sent, decoded, is outside the
  documented pattern (printable ASCII): the fuzzer sometimes puts U+FFFD on the wire for a character it generated.
"""

from __future__ import annotations

import json
import os
import re
from urllib.parse import unquote, urlsplit

import schemathesis

BUSINESS_422 = {
    "insufficient-funds",
    "currency-mismatch",
    "balance-overflow",
    "idempotency-key-reused",
    "hold-captured",
    "hold-voided",
    "hold-expired",
    "capture-exceeds-hold",
    "reversal-exceeds-transfer",
    "transfer-not-reversible",
}
METADATA_BYTES_MAX = 4096
IF_MATCH = re.compile(r'"(?:0|[1-9][0-9]{0,18})"')
PRINTABLE_KEY = re.compile(r"[ -~]{1,255}")
WEBHOOK_URL = re.compile(
    r"https?://(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?(?:[/?#][!-~]*)?", re.I)
LINK_LOCAL = re.compile(r"https?://(?:169\.254\.|\[fe[89ab])", re.I)


def _problem_member(response, name: str) -> str | None:
    try:
        body = json.loads(response.content)
    except (ValueError, TypeError):
        return None
    return body.get(name) if isinstance(body, dict) else None


def _problem_code(response) -> str | None:
    return _problem_member(response, "code")


def _contains_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_contains_nul(k) or _contains_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_contains_nul(v) for v in value)
    return False


def _metadata_refusable(metadata) -> bool:
    if not isinstance(metadata, dict):
        return False
    if _contains_nul(metadata):
        return True
    compact = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return len(compact) > METADATA_BYTES_MAX


def _explained(case, response) -> bool:
    """Whether a rejection of schema-valid data is the documented answer to a rule the schema cannot express."""
    code = _problem_code(response)
    method = case.operation.method.upper()
    path = case.operation.path
    body = case.body if isinstance(case.body, dict) else {}
    if method == "POST" and response.status_code == 422 and code in BUSINESS_422:
        return True
    if method == "POST" and response.status_code == 412 and code == "version-mismatch":
        return True
    if method == "POST" and path == "/v1/transfers/batch" and response.status_code == 400:
        # A batch is refused for its first invalid item, named in the detail: judge that item as a transfer.
        match = re.match(r"transfers\[(\d+)\]: ", _problem_member(response, "detail") or "")
        items = body.get("transfers")
        if not match or not isinstance(items, list) or int(match.group(1)) >= len(items):
            return False
        body, path = items[int(match.group(1))], "/v1/transfers"
        if not isinstance(body, dict):
            return False
    if method == "POST" and response.status_code == 400 and code == "invalid-if-match":
        sent = response.request.headers.get("If-Match")
        return isinstance(sent, str) and not IF_MATCH.fullmatch(sent)
    if method == "POST" and response.status_code == 400:
        if code == "same-account" and path in ("/v1/transfers", "/v1/holds"):
            return isinstance(body.get("from"), str) and body.get("from") == body.get("to")
        if code == "invalid-amount":
            amount = body.get("amount")
            return isinstance(amount, float) and amount.is_integer()
        if code == "invalid-metadata":
            return _metadata_refusable(body.get("metadata"))
        if code == "invalid-expiry" and path == "/v1/holds":
            seconds = body.get("expires_in_s")
            return isinstance(seconds, float) and seconds.is_integer()
    if method == "GET" and path == "/v1/idempotency-keys/{key}" and response.status_code == 400:
        # The fuzzer sometimes sends a key outside the documented pattern (a character it could not encode reaches
        # the wire as U+FFFD): judge the key that was actually sent, decoded, against the pattern.
        if code == "idempotency-key-invalid":
            sent = unquote(urlsplit(str(response.request.url)).path.rsplit("/", 1)[-1])
            return not PRINTABLE_KEY.fullmatch(sent)
    if method == "GET" and path in ("/v1/accounts/{id}/entries", "/v1/accounts/{id}/holds") and response.status_code == 400:
        if code == "invalid-cursor":
            return bool(case.query) and "cursor" in case.query
    if method == "GET" and path == "/v1/events" and response.status_code == 400 and code == "invalid-cursor":
        return bool(case.query) and "after" in case.query
    if method == "PUT" and path == "/v1/webhooks/{id}" and response.status_code == 400 and code == "invalid-webhook-url":
        url = body.get("url")
        return isinstance(url, str) and (not WEBHOOK_URL.fullmatch(url) or bool(LINK_LOCAL.match(url)))
    return False


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep every failure except a positive-data rejection that `_explained` accounts for."""
    if type(failure).__name__ != "RejectedPositiveData":
        return True
    if not _explained(case, response):
        return True
    log = os.environ.get("ST_FILTER_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            operation = f"{case.operation.method.upper()} {case.operation.path}"
            f.write(f"{operation} {response.status_code} {_problem_code(response)}\n")
    return False
