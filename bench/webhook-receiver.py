#!/usr/bin/env python3
"""A fast local webhook receiver for scripts/bench-webhooks: asyncio, HTTP/1.1 keep-alive, answers 204 to every POST.

Counts deliveries and distinct webhook-ids; prints `received=N distinct=D first=T0 last=T1` (monotonic seconds) on
SIGTERM or when stdin closes. Usage: webhook-receiver.py PORT
"""

import asyncio
import signal
import sys
import time

count = 0
ids: set[bytes] = set()
first = last = 0.0


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    global count, first, last
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            webhook_id = b""
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"webhook-id":
                    webhook_id = value.strip()
            if length:
                await reader.readexactly(length)
            now = time.monotonic()
            if not count:
                first = now
            count += 1
            last = now
            ids.add(webhook_id)
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()
    print(f"received={count} distinct={len(ids)} first={first:.3f} last={last:.3f}", flush=True)


asyncio.run(main())
