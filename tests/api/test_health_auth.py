"""GET /health and bearer-token authentication."""

import pytest
import requests

import ledgertest as lt


def test_health_ok_without_auth(server):
    r = requests.get(server.base + "/health", timeout=lt.TIMEOUT)
    body = lt.assert_json(r, 200)
    assert body == {"status": "ok"}, f"/health body: {r.text!r}"


def test_health_ignores_a_bad_token(server):
    r = requests.get(server.base + "/health", headers={"Authorization": "Bearer nope"}, timeout=lt.TIMEOUT)
    assert lt.assert_json(r, 200) == {"status": "ok"}


def assert_unauthorized(r):
    lt.assert_problem(r, 401, "unauthorized")
    challenge = r.headers.get("WWW-Authenticate")
    assert challenge is not None, f"401 must carry WWW-Authenticate: {lt.describe(r)}"
    assert challenge.split()[0].lower() == "bearer", f"WWW-Authenticate must name Bearer, got {challenge!r}"


ROUTES = [
    ("GET", "/v1/accounts/alice", None),
    ("PUT", "/v1/accounts/alice", {"currency": "USD"}),
    ("GET", "/v1/accounts/alice/entries", None),
    ("POST", "/v1/credits", {"account": "alice", "amount": 1, "currency": "USD"}),
    ("POST", "/v1/debits", {"account": "alice", "amount": 1, "currency": "USD"}),
    ("POST", "/v1/transfers", {"from": "alice", "to": "bob", "amount": 1, "currency": "USD"}),
    ("GET", "/v1/transfers/1", None),
]


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_missing_token_is_401(anon, method, path, body):
    r = anon.request(method, path, body=body, key="k-" + lt.uid())
    assert_unauthorized(r)


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_unknown_token_is_401(server, method, path, body):
    api = lt.Api(server.base, "not-a-real-token-" + lt.uid())
    r = api.request(method, path, body=body, key="k-" + lt.uid())
    assert_unauthorized(r)


@pytest.mark.parametrize(
    "authorization",
    ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc", "Bearer  x y"],
    ids=["empty", "scheme-only", "scheme-space", "basic", "other-scheme", "garbage"],
)
def test_malformed_authorization_is_401(server, authorization):
    r = requests.get(
        server.base + "/v1/accounts/alice", headers={"Authorization": authorization}, timeout=lt.TIMEOUT
    )
    assert_unauthorized(r)


def test_valid_token_with_other_scheme_is_401(server, clients):
    _, token = clients["a"]
    r = requests.get(server.base + "/v1/accounts/alice", headers={"Authorization": f"Basic {token}"}, timeout=lt.TIMEOUT)
    assert_unauthorized(r)


def test_token_with_suffix_is_401(server, clients):
    _, token = clients["a"]
    api = lt.Api(server.base, token + "x")
    assert_unauthorized(api.get_account("alice"))


def test_valid_token_is_accepted(api_a):
    r = api_a.get_account(lt.uid("nobody-"))
    lt.assert_problem(r, 404, "account-not-found")


def test_unknown_v1_route_without_token_is_401(anon):
    """Precedence: 401 comes before the route's 404."""
    assert_unauthorized(anon.request("GET", "/v1/no-such-route"))


def test_unauthorized_post_writes_nothing_and_key_is_free(api_a, server):
    """A 401 is not stored: the same key then executes for the real client."""
    account = api_a.new_account()
    key = lt.uid("k401-")
    body = {"account": account, "amount": 5, "currency": "USD"}
    bad = lt.Api(server.base, "bogus-" + lt.uid())
    assert_unauthorized(bad.post("/v1/credits", body, key))
    assert api_a.balance(account) == 0
    r = api_a.post("/v1/credits", body, key)
    lt.assert_first(r, 201)
    assert api_a.balance(account) == 5
