"""The event feed: GET /v1/events (contract: "Events: a gap-free feed of every change")."""

from __future__ import annotations

import json
import threading
import time

import pytest

import ledgertest as lt


@pytest.fixture
def fresh(main_db, server) -> lt.Api:
    """A client of its own: its feed holds only what the test does."""
    name = "events." + lt.uid()
    return lt.Api(server.base, lt.create_token(main_db, name), name)


def feed(api: lt.Api, after=None, limit=None, wait_s=None) -> dict:
    params = {k: v for k, v in {"after": after, "limit": limit, "wait_s": wait_s}.items() if v is not None}
    r = api.get("/v1/events", params=params or None)
    assert r.status_code == 200, r.text
    return r.json()


def follow(api: lt.Api, after=None) -> list[dict]:
    """Every event after `after`, following next_after page by page."""
    events = []
    while True:
        page = feed(api, after=after, limit=1000)
        events += page["events"]
        if not page["events"]:
            return events
        after = page["next_after"]


def test_a_new_client_has_an_empty_feed(fresh):
    assert feed(fresh) == {"events": [], "next_after": None}


def test_each_change_appends_its_event_with_the_answer_as_data(fresh):
    created = fresh.put_account("alice")
    assert created.status_code == 201
    fresh.put_account("bob")
    assert fresh.put_account("alice").status_code == 200  # unchanged: no event
    credit = fresh.credit("alice", 1000)
    transfer = fresh.transfer("alice", "bob", 300, metadata={"order": "A-1"})
    events = follow(fresh)
    assert [e["type"] for e in events] == ["account.created", "account.created", "transfer.created", "transfer.created"]
    assert [e["id"] for e in events] == ["1", "2", "3", "4"]
    assert all(isinstance(e["id"], str) and e["created_at"].endswith("Z") for e in events)
    assert events[0]["data"] == created.json()
    assert events[2]["data"] == credit.json() and events[3]["data"] == transfer.json()
    # The data are the answer's bytes, not only the same JSON.
    raw = fresh.get("/v1/events").text
    assert credit.text in raw and transfer.text in raw


def test_failures_replays_and_world_append_nothing(fresh):
    fresh.put_account("alice")
    before = follow(fresh)
    key = lt.uid("k-")
    assert fresh.debit("alice", 5, key=key).status_code == 422  # insufficient funds, stored
    assert fresh.debit("alice", 5, key=key).status_code == 422  # replayed
    assert fresh.credit("nobody", 5).status_code == 404
    assert fresh.credit("alice", 5, currency="EUR").status_code == 422  # currency mismatch
    assert follow(fresh, after=before[-1]["id"]) == []
    # A credit in a new currency creates @world:<CUR> on demand: only the transfer's event.
    fresh.put_account("eve", currency="JPY")
    ok = fresh.credit("eve", 7, currency="JPY", key=key + "-2")
    assert fresh.credit("eve", 7, currency="JPY", key=key + "-2").status_code == 201  # a replay
    types = [e["type"] for e in follow(fresh, after=before[-1]["id"])]
    assert types == ["account.created", "transfer.created"]
    assert ok.status_code == 201


def test_holds_append_one_event_per_status(fresh, server):
    for account in ("alice", "bob"):
        fresh.put_account(account)
    fresh.credit("alice", 1000)
    start = follow(fresh)[-1]["id"]
    hold = fresh.post("/v1/holds", {"from": "alice", "to": "bob", "amount": 100, "currency": "USD"}).json()
    captured = fresh.post(f"/v1/holds/{hold['id']}/capture", {"amount": 60})
    assert captured.status_code == 200
    other = fresh.post("/v1/holds", {"from": "alice", "to": "bob", "amount": 10, "currency": "USD"}).json()
    voided = fresh.post(f"/v1/holds/{other['id']}/void", {})
    short = fresh.post("/v1/holds", {"from": "alice", "amount": 5, "currency": "USD", "expires_in_s": 1}).json()
    events = follow(fresh, after=start)
    assert [e["type"] for e in events] == [
        "hold.created", "transfer.created", "hold.captured", "hold.created", "hold.voided", "hold.created"]
    assert events[2]["data"] == captured.json() and events[4]["data"] == voided.json()
    assert events[1]["data"]["hold_id"] == hold["id"]
    # The sweep records the expiry within its interval (1 s by default).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        tail = follow(fresh, after=events[-1]["id"])
        if tail:
            assert [e["type"] for e in tail] == ["hold.expired"]
            assert tail[0]["data"]["id"] == short["id"] and tail[0]["data"]["status"] == "expired"
            break
        time.sleep(0.2)
    else:
        pytest.fail("no hold.expired event")


def test_reversal_appends_a_transfer_created(fresh):
    fresh.put_account("alice")
    original = fresh.credit("alice", 100).json()
    last = follow(fresh)[-1]["id"]
    reversal = fresh.post(f"/v1/transfers/{original['id']}/reversals", {"amount": 40})
    assert reversal.status_code == 201, reversal.text
    events = follow(fresh, after=last)
    assert [(e["type"], e["data"]) for e in events] == [("transfer.created", reversal.json())]


def test_a_batch_appends_its_transfers_adjacent_and_in_order(fresh):
    fresh.put_account("a1", allow_negative=True)
    fresh.put_account("a2")
    last = follow(fresh)[-1]["id"]
    body = {"atomic": True, "transfers": [{"from": "a1", "to": "a2", "amount": i + 1, "currency": "USD"}
                                          for i in range(5)]}
    r = fresh.post("/v1/transfers/batch", body)
    assert r.status_code == 201, r.text
    made = [x["transfer"] for x in r.json()["results"]]
    events = follow(fresh, after=last)
    assert [e["data"] for e in events] == made


def test_paging_and_next_after(fresh):
    fresh.put_account("alice")
    for _ in range(4):
        fresh.credit("alice", 1)
    first = feed(fresh, limit=2)
    assert [e["id"] for e in first["events"]] == ["1", "2"] and first["next_after"] == "2"
    second = feed(fresh, after="2", limit=2)
    assert [e["id"] for e in second["events"]] == ["3", "4"] and second["next_after"] == "4"
    third = feed(fresh, after="4")
    assert [e["id"] for e in third["events"]] == ["5"]
    assert feed(fresh, after="5") == {"events": [], "next_after": "5"}
    assert len(feed(fresh)["events"]) == 5  # default limit 100


@pytest.mark.parametrize(
    "params, code",
    [
        ({"limit": "0"}, "invalid-limit"), ({"limit": "1001"}, "invalid-limit"), ({"limit": "x"}, "invalid-limit"),
        ({"wait_s": "31"}, "invalid-wait"), ({"wait_s": "-1"}, "invalid-wait"), ({"wait_s": "1.5"}, "invalid-wait"),
        ({"after": "99999"}, "invalid-cursor"), ({"after": "abc"}, "invalid-cursor"), ({"after": "0"}, "invalid-cursor"),
        ({"after": "01"}, "invalid-cursor"),
    ],
)
def test_bad_queries_are_400(fresh, params, code):
    fresh.put_account("alice")
    r = fresh.get("/v1/events", params=params)
    assert r.status_code == 400 and r.json()["code"] == code, r.text
    assert r.headers["content-type"].startswith("application/problem+json")


def test_another_clients_cursor_and_events_stay_apart(fresh, api_b):
    fresh.put_account("alice")
    for _ in range(3):
        fresh.credit("alice", 1)
    mine = follow(fresh)
    theirs = follow(api_b)
    assert not any(e["data"].get("id") == "alice" for e in theirs if e["type"] == "account.created"
                   and e["data"]["created_at"] == mine[0]["data"]["created_at"])
    # An id the service issued to the other client and never to this one (beyond this client's head) is not a
    # cursor this client may pass: 400 invalid-cursor, not the other client's events and not an empty page.
    for _ in range(len(mine) + 2 - len(theirs)):
        api_b.put_account(lt.uid("pad-"))
    theirs = follow(api_b)
    assert int(theirs[-1]["id"]) > int(mine[-1]["id"])
    lt.assert_problem(fresh.get("/v1/events", params={"after": theirs[-1]["id"]}), 400, "invalid-cursor")
    # The same id is fine for the client it was issued to.
    assert lt.assert_json(api_b.get("/v1/events", params={"after": theirs[-1]["id"]}), 200)["events"] == []


def test_a_long_poll_answers_soon_after_a_commit(fresh):
    fresh.put_account("alice")
    last = follow(fresh)[-1]["id"]
    result = {}

    def poll():
        started = time.monotonic()
        result["page"] = feed(fresh.clone(), after=last, wait_s=10)
        result["answered"] = time.monotonic()
        result["started"] = started

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(1.0)
    committed = time.monotonic()
    credit = fresh.credit("alice", 3)
    thread.join(15)
    assert [e["data"] for e in result["page"]["events"]] == [credit.json()]
    assert result["answered"] - committed < 1.0, result["answered"] - committed
    assert result["answered"] - result["started"] >= 0.9


def test_a_long_poll_without_events_waits_its_time(fresh):
    started = time.monotonic()
    page = feed(fresh, wait_s=1)
    assert page == {"events": [], "next_after": None}
    assert 0.9 <= time.monotonic() - started < 3


def test_twenty_writers_and_a_tight_consumer_miss_nothing(fresh):
    """Concurrent commits out of their start order: the consumer following next_after sees each event once."""
    accounts = [f"w{i}" for i in range(20)]
    for account in accounts:
        fresh.put_account(account, allow_negative=True)
    stop = threading.Event()
    seen: list[dict] = []
    errors = []

    def consume():
        api = fresh.clone()
        after = None
        while True:
            done = stop.is_set()
            page = feed(api, after=after, limit=50)
            seen.extend(page["events"])
            after = page["next_after"]
            if done and not page["events"]:
                return

    def write(i):
        api = fresh.clone()
        try:
            for n in range(15):
                kind = n % 3
                if kind == 0:
                    r = api.transfer(accounts[i], accounts[(i + 1) % 20], 1)
                elif kind == 1:
                    r = api.credit(accounts[i], 2)
                else:
                    r = api.post("/v1/transfers/batch", {"transfers": [
                        {"from": accounts[i], "to": accounts[(i + 3) % 20], "amount": 1, "currency": "USD"},
                        {"from": accounts[(i + 3) % 20], "to": accounts[i], "amount": 1, "currency": "USD"}]})
                assert r.status_code == 201, r.text
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    consumer = threading.Thread(target=consume)
    consumer.start()
    writers = [threading.Thread(target=write, args=(i,)) for i in range(20)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    stop.set()
    consumer.join(60)
    assert not errors, errors
    ids = [e["id"] for e in seen]
    assert len(ids) == len(set(ids)), "an event was seen twice"
    assert ids == [str(n) for n in range(1, len(ids) + 1)], "positions are 1..N in order"
    transfers = [e for e in seen if e["type"] == "transfer.created"]
    assert len(transfers) == 20 * (5 + 5 + 5 * 2)
    assert len({e["data"]["id"] for e in transfers}) == len(transfers)
    # The events of one account follow its versions: each account's balances along its transfers add up.
    for account in accounts:
        got = fresh.get_account(account).json()
        touching = [e for e in transfers if account in (e["data"]["from"], e["data"]["to"])]
        assert len(touching) == got["version"]


def test_waiting_requests_are_answered_at_once_on_shutdown(main_db, log_dir):
    srv = lt.LedgerServer.healthy(main_db, log_dir=log_dir)
    name = "events." + lt.uid()
    api = lt.Api(srv.base, lt.create_token(main_db, name), name)
    result = {}

    def poll():
        result["response"] = api.get("/v1/events", params={"wait_s": "30"})
        result["at"] = time.monotonic()

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(1.0)
    stopped = time.monotonic()
    assert srv.stop() == 0
    thread.join(10)
    assert result["response"].status_code == 200
    assert result["response"].json() == {"events": [], "next_after": None}
    assert result["at"] - stopped < 5


def test_waiters_are_bounded(main_db, log_dir):
    srv = lt.LedgerServer.healthy(main_db, extra_args=["--events-waiters-max", "1"], log_dir=log_dir)
    try:
        name = "events." + lt.uid()
        api = lt.Api(srv.base, lt.create_token(main_db, name), name)
        first = threading.Thread(target=lambda: api.clone().get("/v1/events", params={"wait_s": "3"}))
        first.start()
        time.sleep(0.5)
        r = api.get("/v1/events", params={"wait_s": "3"})
        assert r.status_code == 503 and r.json()["code"] == "events-waiters-exhausted" and r.headers["Retry-After"]
        assert api.get("/v1/events").status_code == 200  # no wait: never refused
        first.join(10)
    finally:
        srv.stop()
