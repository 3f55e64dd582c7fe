"""The bare nats-py ceiling: a subscriber that only counts (`python -m bench.counting_subscriber URL N [SUBJECT]`)."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

import nats

from fleet_runtime.nats_settle import settle

from .payloads import BARE_SUBJECT


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main() -> None:
    url, expected = sys.argv[1], int(sys.argv[2])
    subject = sys.argv[3] if len(sys.argv) > 3 else BARE_SUBJECT
    done = asyncio.Event()
    count = 0
    first = last = 0.0

    async def on_message(msg) -> None:
        nonlocal count, first, last
        count += 1
        if count == 1:
            first = time.time()
        if count >= expected:
            last = time.time()
            done.set()

    nc = await nats.connect(url)
    await nc.subscribe(subject, cb=on_message, pending_msgs_limit=2_000_000, pending_bytes_limit=0)
    await settle(nc)  # the server has the subscription before "ready"
    print("ready", flush=True)
    cpu_ready = _cpu_seconds()
    try:
        await asyncio.wait_for(done.wait(), 120)
    finally:
        print(json.dumps({"received": count, "first": first, "last": last, "cpu": _cpu_seconds() - cpu_ready}),
              flush=True)
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
