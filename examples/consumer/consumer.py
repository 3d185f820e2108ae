#!/usr/bin/env python3
"""A consumer of Ledger's event feed that applies each event exactly once to a table of its own.

It follows `GET /v1/events` (long-polling with `wait_s`) and, for each event, in ONE transaction of its own database:
  1. records the event id in `processed_events` (the dedup row; a second time, the insert does nothing and the event
     is skipped),
  2. applies the effect (here: a projection of balances from `transfer.created` events),
  3. moves the checkpoint (`checkpoint.after`) to the event id.
A crash at any point either commits all three or none: after a restart it reads from the checkpoint, and an event it
sees again (the checkpoint is only a hint: the dedup row decides) is skipped. This is the "processed_messages" table
of an at-least-once consumer, done so that the effect and its record can never part.

Usage: LEDGER_URL=http://127.0.0.1:8080 LEDGER_TOKEN=... CONSUMER_DATABASE_URL=postgresql://... consumer.py [--once]
  --once      stop when the feed has nothing more (else follow it for ever)
Environment for tests: CONSUMER_CRASH_AT=N exits abruptly (os._exit) in the middle of applying the Nth event, after
its effect was written but before COMMIT.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import psycopg

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS consumer;
CREATE TABLE IF NOT EXISTS consumer.processed_events (
    client_id text NOT NULL, event_id bigint NOT NULL, type text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (client_id, event_id));
CREATE TABLE IF NOT EXISTS consumer.checkpoint (client_id text PRIMARY KEY, after bigint NOT NULL);
CREATE TABLE IF NOT EXISTS consumer.balances (
    client_id text NOT NULL, account text NOT NULL, currency text NOT NULL, balance bigint NOT NULL,
    PRIMARY KEY (client_id, account, currency));
"""


def fetch(url: str, token: str, after: int | None, wait_s: int) -> dict:
    query = {"limit": "100", "wait_s": str(wait_s)}
    if after is not None:
        query["after"] = str(after)
    request = urllib.request.Request(f"{url}/v1/events?{urllib.parse.urlencode(query)}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=wait_s + 15) as response:
        return json.loads(response.read())


def apply(cur, client: str, event: dict) -> None:
    """The effect: a balance projection. Only transfers move money; @world is kept too, so each currency sums to 0."""
    if event["type"] != "transfer.created":
        return
    t = event["data"]
    for account, delta in ((t["from"], -t["amount"]), (t["to"], t["amount"])):
        cur.execute(
            "INSERT INTO consumer.balances (client_id, account, currency, balance) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (client_id, account, currency) DO UPDATE SET balance = consumer.balances.balance + %s",
            (client, account, t["currency"], delta, delta))


def consume(db, client: str, url: str, token: str, once: bool) -> int:
    crash_at = int(os.environ.get("CONSUMER_CRASH_AT", "0"))
    applied = 0
    with db.cursor() as cur:
        cur.execute("SELECT after FROM consumer.checkpoint WHERE client_id = %s", (client,))
        row = cur.fetchone()
    after = row[0] if row else None
    while True:
        try:
            page = fetch(url, token, after, 0 if once else 10)
        except (urllib.error.URLError, OSError) as error:
            print(f"consumer: feed unavailable ({error}); retrying", file=sys.stderr)
            time.sleep(1)
            continue
        if not page["events"] and once:
            return applied
        for event in page["events"]:
            with db.transaction(), db.cursor() as cur:
                cur.execute("INSERT INTO consumer.processed_events (client_id, event_id, type) VALUES (%s, %s, %s) "
                            "ON CONFLICT DO NOTHING", (client, int(event["id"]), event["type"]))
                if cur.rowcount == 1:
                    apply(cur, client, event)
                    applied += 1
                    if applied == crash_at:
                        os._exit(3)  # mid-transaction: effect written, nothing committed
                cur.execute("INSERT INTO consumer.checkpoint (client_id, after) VALUES (%s, %s) "
                            "ON CONFLICT (client_id) DO UPDATE SET after = greatest(consumer.checkpoint.after, %s)",
                            (client, int(event["id"]), int(event["id"])))
            after = int(event["id"])


def main() -> int:
    url = os.environ.get("LEDGER_URL", "http://127.0.0.1:8080").rstrip("/")
    token = os.environ["LEDGER_TOKEN"]
    client = os.environ.get("CONSUMER_CLIENT", "default")
    with psycopg.connect(os.environ["CONSUMER_DATABASE_URL"], autocommit=True) as db:
        db.execute(SCHEMA)
        applied = consume(db, client, url, token, "--once" in sys.argv[1:])
    print(f"consumer: applied {applied} events")
    return 0


if __name__ == "__main__":
    sys.exit(main())
