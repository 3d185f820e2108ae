"""Webhooks: PUT/GET/DELETE /v1/webhooks, and deliveries to a real receiver (contract: "Webhooks")."""

from __future__ import annotations

import time

import pytest

import ledgertest as lt
from webhookreceiver import Receiver, events_of, signature

FAST = ["--webhook-retry-base-ms", "200", "--webhook-retry-max-ms", "400", "--webhook-attempts-max", "4",
        "--webhook-timeout-ms", "2000", "--webhook-poll-interval-ms", "50"]


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def hooks_server(main_db, log_dir):
    """A server of its own with quick retries, on the session's database."""
    srv = lt.LedgerServer.healthy(main_db, extra_args=FAST, log_dir=log_dir)
    yield srv
    srv.stop()


@pytest.fixture
def api(main_db, hooks_server) -> lt.Api:
    name = "hooks." + lt.uid()
    return lt.Api(hooks_server.base, lt.create_token(main_db, name), name)


def put(api, hook_id, body):
    return api.request("PUT", f"/v1/webhooks/{hook_id}", body=body)


def test_put_get_list_delete(api, receiver):
    r = put(api, "h1", {"url": receiver.url("/crud"), "types": ["transfer.created"]})
    assert r.status_code == 201, r.text
    made = r.json()
    assert set(made) == {"id", "url", "types", "enabled", "created_at", "pending", "failed", "secret"}
    assert made["secret"].startswith("whsec_") and len(__import__("base64").b64decode(made["secret"][6:])) == 32
    assert (made["id"], made["types"], made["enabled"], made["pending"], made["failed"]) == (
        "h1", ["transfer.created"], True, 0, 0)
    again = put(api, "h1", {"url": receiver.url("/crud2"), "enabled": False})
    assert again.status_code == 200 and "secret" not in again.json()
    assert again.json()["url"] == receiver.url("/crud2") and again.json()["types"] == [] and not again.json()["enabled"]
    assert again.json()["created_at"] == made["created_at"]
    got = api.get("/v1/webhooks/h1")
    assert got.status_code == 200 and got.json() == again.json()
    put(api, "h0", {"url": receiver.url("/crud")})
    listed = api.get("/v1/webhooks").json()["webhooks"]
    assert [w["id"] for w in listed] == ["h0", "h1"] and all("secret" not in w for w in listed)
    assert api.request("DELETE", "/v1/webhooks/h1").status_code == 204
    assert api.get("/v1/webhooks/h1").json()["code"] == "webhook-not-found"
    assert api.request("DELETE", "/v1/webhooks/h1").status_code == 404


@pytest.mark.parametrize(
    "body, code",
    [
        ({}, "invalid-webhook-url"), ({"url": 5}, "invalid-webhook-url"), ({"url": "ftp://example.com/x"}, "invalid-webhook-url"),
        ({"url": "/relative"}, "invalid-webhook-url"), ({"url": "http://"}, "invalid-webhook-url"),
        ({"url": "http://169.254.169.254/latest"}, "invalid-webhook-url"), ({"url": "http://[fe80::1]/x"}, "invalid-webhook-url"),
        ({"url": "https://example.com/" + "a" * 2048}, "invalid-webhook-url"),
        ({"url": "https://example.com/", "types": "transfer.created"}, "invalid-event-type"),
        ({"url": "https://example.com/", "types": ["transfer.deleted"]}, "invalid-event-type"),
        ({"url": "https://example.com/", "types": [1]}, "invalid-event-type"),
        ({"url": "https://example.com/", "enabled": "yes"}, "invalid-json"),
    ],
)
def test_bad_webhooks_are_400(api, body, code):
    r = put(api, "bad", body)
    assert r.status_code == 400 and r.json()["code"] == code, r.text


@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE"])
def test_bad_ids_are_400(api, method):
    r = api.request(method, "/v1/webhooks/-no", body={"url": "https://example.com/"} if method == "PUT" else None)
    assert r.status_code == 400 and r.json()["code"] == "invalid-webhook-id", r.text


def test_unknown_webhooks_are_404(api, api_b):
    assert api.get("/v1/webhooks/nope").status_code == 404


def test_events_are_delivered_signed_with_the_feed_bytes(api, receiver):
    made = put(api, "all", {"url": receiver.url("/signed-" + api.client)}).json()
    api.put_account("alice")
    credit = api.credit("alice", 100)
    got = receiver.wait_for("/signed-" + api.client, lambda d: len(d) >= 2)
    feed = api.get("/v1/events").text
    for delivery in got:
        assert delivery["content_type"] == "application/json"
        assert delivery["signature"] == signature(made["secret"], delivery["id"], delivery["timestamp"], delivery["body"])
        assert abs(int(delivery["timestamp"]) - time.time()) < 30
        assert delivery["body"].decode() in feed
        assert events_of([delivery])[0]["id"] == delivery["id"]
    assert sorted(e["type"] for e in events_of(got)) == ["account.created", "transfer.created"]
    assert credit.text in [d["body"].decode() for d in got][events_of(got).index(
        next(e for e in events_of(got) if e["type"] == "transfer.created"))]
    wait_pending(api, "all", 0)


def wait_pending(api, hook_id, pending, timeout=10):
    """Outcomes are recorded at the delivery service's next tick: wait for the count."""
    deadline = time.monotonic() + timeout
    while api.get(f"/v1/webhooks/{hook_id}").json()["pending"] != pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.get(f"/v1/webhooks/{hook_id}").json()["pending"] == pending


def test_only_subscribed_types_and_only_while_enabled(api, receiver):
    path = "/types-" + api.client
    put(api, "t", {"url": receiver.url(path), "types": ["account.created"]})
    api.put_account("a1")
    api.credit("a1", 5)  # transfer.created: not subscribed
    receiver.wait_for(path, lambda d: len(d) >= 1)
    put(api, "t", {"url": receiver.url(path), "types": ["account.created"], "enabled": False})
    api.put_account("a2")  # committed while disabled: never delivered
    put(api, "t", {"url": receiver.url(path), "types": ["account.created"], "enabled": True})
    api.put_account("a3")
    got = receiver.wait_for(path, lambda d: len(d) >= 2)
    time.sleep(0.5)
    ids = [e["data"]["id"] for e in events_of(receiver.at(path))]
    assert ids == ["a1", "a3"]


def test_failed_attempts_are_retried_until_a_2xx(api, receiver):
    path = "/flaky-" + api.client
    receiver.answers = lambda p, attempt: (500, {}) if p == path and attempt <= 2 else (200, {})
    try:
        put(api, "f", {"url": receiver.url(path)})
        api.put_account("x")
        got = receiver.wait_for(path, lambda d: any(x["status"] == 200 for x in d))
        assert [d["status"] for d in got] == [500, 500, 200]
        assert len({d["id"] for d in got}) == 1
        assert got[1]["at"] - got[0]["at"] >= 0.09  # backoff from 200 ms, half of it at least
    finally:
        receiver.answers = lambda p, attempt: (200, {})
    wait_pending(api, "f", 0)


def test_retry_after_is_honoured(api, receiver):
    path = "/later-" + api.client
    receiver.answers = lambda p, attempt: (503, {"Retry-After": "2"}) if p == path and attempt == 1 else (200, {})
    try:
        put(api, "r", {"url": receiver.url(path)})
        api.put_account("x")
        got = receiver.wait_for(path, lambda d: len(d) >= 2, timeout=20)
        assert got[1]["at"] - got[0]["at"] >= 1.9
    finally:
        receiver.answers = lambda p, attempt: (200, {})


def test_attempts_are_bounded_then_failed(api, receiver):
    path = "/down-" + api.client
    receiver.answers = lambda p, attempt: (500, {}) if p == path else (200, {})
    try:
        put(api, "d", {"url": receiver.url(path)})
        api.put_account("x")
        receiver.wait_for(path, lambda d: len(d) >= 4, timeout=20)
        deadline = time.monotonic() + 10
        while api.get("/v1/webhooks/d").json()["failed"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        hook = api.get("/v1/webhooks/d").json()
        assert (hook["pending"], hook["failed"]) == (0, 1)
        time.sleep(1)
        assert len(receiver.at(path)) == 4
    finally:
        receiver.answers = lambda p, attempt: (200, {})


def test_a_410_disables_the_webhook(api, receiver):
    path = "/gone-" + api.client
    receiver.answers = lambda p, attempt: (410, {}) if p == path else (200, {})
    try:
        put(api, "g", {"url": receiver.url(path)})
        api.put_account("x")
        receiver.wait_for(path, lambda d: len(d) >= 1)
        deadline = time.monotonic() + 10
        while api.get("/v1/webhooks/g").json()["enabled"] and time.monotonic() < deadline:
            time.sleep(0.05)
        hook = api.get("/v1/webhooks/g").json()
        assert not hook["enabled"] and hook["failed"] == 1
        api.put_account("y")
        time.sleep(1)
        assert len(receiver.at(path)) == 1
    finally:
        receiver.answers = lambda p, attempt: (200, {})


def test_delete_drops_undelivered_events(api, receiver):
    path = "/dropped-" + api.client
    receiver.answers = lambda p, attempt: (500, {}) if p == path else (200, {})
    try:
        put(api, "x", {"url": receiver.url(path)})
        api.put_account("x1")
        receiver.wait_for(path, lambda d: len(d) >= 1)
        assert api.request("DELETE", "/v1/webhooks/x").status_code == 204
        count = len(receiver.at(path))
        time.sleep(1.5)
        assert len(receiver.at(path)) <= count + 1  # at most one attempt that was already in flight
    finally:
        receiver.answers = lambda p, attempt: (200, {})


def test_hosts_allowed(main_db, log_dir, receiver):
    srv = lt.LedgerServer.healthy(main_db, extra_args=["--webhook-hosts-allowed", "127.0.0.0/8, hooks.example.com"],
                                  log_dir=log_dir)
    try:
        name = "hosts." + lt.uid()
        api = lt.Api(srv.base, lt.create_token(main_db, name), name)
        assert put(api, "a", {"url": receiver.url("/ok")}).status_code == 201
        assert put(api, "b", {"url": "https://hooks.example.com/x"}).status_code == 201
        r = put(api, "c", {"url": "https://other.example.com/x"})
        assert r.status_code == 400 and r.json()["code"] == "invalid-webhook-url"
        r = put(api, "d", {"url": "http://10.0.0.1/x"})
        assert r.status_code == 400 and r.json()["code"] == "invalid-webhook-url"
    finally:
        srv.stop()

