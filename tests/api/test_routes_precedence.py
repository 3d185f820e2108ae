"""Unknown routes (404), wrong methods (405 with Allow), and the precedence of errors:
401, then 413, then route (404/405), then the Idempotency-Key header, then the body (400s), then 422 reused,
then 409 in progress, then the business outcome."""

import pytest
import requests

import ledgertest as lt

BIG = lt.BODY_MAX + 1024


def allow_set(r):
    allow = r.headers.get("Allow")
    assert allow is not None, f"405 must carry an Allow header: {lt.describe(r)}"
    return {m.strip().upper() for m in allow.split(",") if m.strip()}


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/nope"),
        ("POST", "/v1/nope"),
        ("GET", "/v1/accounts/alice/nope"),
        ("GET", "/v1/accounts/alice/entries/1"),
        ("GET", "/v1/transfers/1/entries"),
        ("POST", "/v1/credits/1"),
        ("GET", "/v2/accounts/alice"),
        ("GET", "/v1"),
        # An empty id names nothing: the path is unknown, not an id to validate.
        ("GET", "/v1/accounts/"),
        ("PUT", "/v1/accounts/"),
        ("GET", "/v1/accounts//entries"),
        ("GET", "/v1/transfers/"),
        ("POST", "/v1/transfers/"),
        ("POST", "/v1/credits/"),
    ],
)
def test_unknown_route_is_404_not_found(api_a, method, path):
    lt.assert_problem(api_a.request(method, path), 404, "not-found")


def test_unknown_route_outside_v1_needs_no_auth(anon):
    lt.assert_problem(anon.request("GET", "/nope"), 404, "not-found")


@pytest.mark.parametrize(
    "method,path,allowed",
    [
        ("DELETE", "/v1/accounts/alice", {"GET", "PUT"}),
        ("POST", "/v1/accounts/alice", {"GET", "PUT"}),
        ("PATCH", "/v1/accounts/alice", {"GET", "PUT"}),
        ("POST", "/v1/accounts/alice/entries", {"GET"}),
        ("DELETE", "/v1/accounts/alice/entries", {"GET"}),
        ("GET", "/v1/credits", {"POST"}),
        ("PUT", "/v1/debits", {"POST"}),
        ("GET", "/v1/transfers", {"POST"}),
        ("DELETE", "/v1/transfers", {"POST"}),
        ("DELETE", "/v1/transfers/1", {"GET"}),
        ("POST", "/v1/transfers/1", {"GET"}),
    ],
)
def test_wrong_method_is_405_with_allow(api_a, method, path, allowed):
    r = api_a.request(method, path)
    lt.assert_problem(r, 405, "method-not-allowed")
    got = allow_set(r)
    assert allowed <= got, f"Allow {got} must list {allowed}"
    assert method not in got, f"Allow {got} must not list the refused method {method}"
    assert got <= allowed | {"HEAD", "OPTIONS"}, f"Allow {got} lists methods the route does not have"


def test_health_wrong_method_is_405(anon):
    r = anon.request("POST", "/health")
    lt.assert_problem(r, 405, "method-not-allowed")
    assert "GET" in allow_set(r)


# ---------------------------------------------------------------------------------------------------------------------
# Precedence


def test_401_before_413(anon, api_a):
    account = api_a.new_account()
    r = anon.post("/v1/credits", raw='{"account":"%s","amount":1,"currency":"USD"%s}' % (account, " " * BIG))
    lt.assert_problem(r, 401, "unauthorized")


def test_401_before_404_and_405(anon):
    lt.assert_problem(anon.request("GET", "/v1/nope"), 401, "unauthorized")
    lt.assert_problem(anon.request("DELETE", "/v1/accounts/alice"), 401, "unauthorized")
    lt.assert_problem(anon.request("GET", "/v1/credits"), 401, "unauthorized")


def test_413_before_404(api_a):
    lt.assert_problem(api_a.request("POST", "/v1/nope", raw="{" + " " * BIG + "}"), 413, "body-too-large")


def test_413_before_405(api_a):
    lt.assert_problem(api_a.request("DELETE", "/v1/accounts/alice", raw="{" + " " * BIG + "}"), 413, "body-too-large")


def test_413_before_key_missing(api_a):
    r = api_a.request("POST", "/v1/credits", raw='{"account":"a","amount":1,"currency":"USD"%s}' % (" " * BIG))
    lt.assert_problem(r, 413, "body-too-large")


def test_413_before_invalid_path_id(api_a):
    lt.assert_problem(api_a.request("PUT", "/v1/accounts/@world", raw="{" + " " * BIG + "}"), 413, "body-too-large")


def test_404_route_before_key_errors(api_a):
    lt.assert_problem(api_a.request("POST", "/v1/nope", body={"a": 1}), 404, "not-found")
    lt.assert_problem(api_a.request("POST", "/v1/nope", body={"a": 1}, key=""), 404, "not-found")


def test_405_before_key_errors(api_a):
    lt.assert_problem(api_a.request("GET", "/v1/credits"), 405, "method-not-allowed")
    lt.assert_problem(api_a.request("PUT", "/v1/credits", raw="nope", key="x" * 300), 405, "method-not-allowed")


@pytest.mark.parametrize("path", ["/v1/credits", "/v1/debits", "/v1/transfers"])
def test_key_errors_before_body_errors(api_a, path):
    lt.assert_problem(api_a.request("POST", path, raw="not json"), 400, "idempotency-key-missing")
    lt.assert_problem(api_a.request("POST", path, raw="not json", key=""), 400, "idempotency-key-invalid")
    lt.assert_problem(api_a.request("POST", path, raw='{"amount":0}', key="k" * 256), 400, "idempotency-key-invalid")


def test_body_errors_before_422_reused(api_a):
    account = api_a.new_account()
    key = lt.uid("k-")
    lt.assert_first(api_a.credit(account, 5, key=key))
    lt.assert_problem(api_a.credit(account, 0, key=key), 400, "invalid-amount")
    lt.assert_problem(api_a.credit(account, 5, currency="usd", key=key), 400, "invalid-currency")
    lt.assert_problem(api_a.post("/v1/credits", raw="[]", key=key), 400, "invalid-json")


def test_422_reused_before_business_outcome(api_a):
    account = api_a.new_account()
    key = lt.uid("k-")
    lt.assert_first(api_a.credit(account, 5, key=key))
    # Would be 404 account-not-found, 422 insufficient-funds, 422 currency-mismatch if executed.
    lt.assert_problem(api_a.credit(lt.uid("ghost-"), 5, key=key), 422, "idempotency-key-reused")
    lt.assert_problem(api_a.debit(account, 500, key=key), 422, "idempotency-key-reused")
    lt.assert_problem(api_a.credit(account, 5, currency="EUR", key=key), 422, "idempotency-key-reused")
    assert api_a.balance(account) == 5


def test_path_id_validation_for_get_before_not_found(api_a):
    lt.assert_problem(api_a.get_account("a" * 65), 400, "invalid-account-id")


def test_every_error_is_problem_json(api_a, anon, server):
    """A sample of every error class, all in the exact problem+json shape (assert_problem checks it)."""
    lt.assert_problem(anon.get_account("x"), 401, "unauthorized")
    lt.assert_problem(api_a.request("GET", "/v1/zzz"), 404, "not-found")
    lt.assert_problem(api_a.request("DELETE", "/v1/credits"), 405, "method-not-allowed")
    lt.assert_problem(api_a.request("POST", "/v1/credits", body={}), 400, "idempotency-key-missing")
    lt.assert_problem(api_a.post("/v1/credits", raw="{"), 400, "invalid-json")
    r = requests.get(server.base + "/v1/accounts/x", headers={"Authorization": "Bearer ?"}, timeout=lt.TIMEOUT)
    lt.assert_problem(r, 401, "unauthorized")
