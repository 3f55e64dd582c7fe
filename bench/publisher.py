"""Publisher process: prepares its messages, says `ready`, publishes on `go`, reports when flushed.

`python -m bench.publisher URL --workers W --messages N [--rate R] [--first-id K] [--kind KIND]`

Kinds: `load` (legacy JSON LoadEvents, the default), `active-load` (Dynamo 1.x kv_metrics envelopes),
`kv-events` (1.x kv-events batches of `--blocks` stored and as many removed), `tracked` (per worker
a 1.x load, a forward pass and `--blocks` cached blocks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import nats

from .payloads import (
    EVENT_SUBJECT,
    KV_EVENTS_SUBJECT,
    SUBJECT,
    active_load_round_robin,
    full_worker_messages,
    kv_event_batches,
    round_robin,
    tracked_worker_messages,
)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s; 0 = as fast as possible")
    parser.add_argument("--marker", type=int, default=4000)
    parser.add_argument("--subject", default=None, help="instead of the kind's own")
    parser.add_argument("--kind", choices=["load", "active-load", "kv-events", "tracked"], default="load")
    parser.add_argument("--blocks", type=int, default=64, help="KV blocks per batch (kv-events) or worker (tracked)")
    parser.add_argument("--first-id", type=int, default=0, help="offset of the worker ids (churn runs)")
    parser.add_argument("--first-sequence", type=int, default=0,
                        help="active-load: where the publishers' sequences start (a later run of the same ones)")
    parser.add_argument("--full", action="store_true",
                        help="one of every message kind per worker (KV, hit rate, GPU, component metrics)")
    args = parser.parse_args()
    if args.full:
        messages = full_worker_messages(args.workers, args.first_id)
    elif args.kind == "tracked":
        messages = tracked_worker_messages(args.workers, args.blocks, args.first_id)
    elif args.kind == "kv-events":
        messages = [(args.subject or KV_EVENTS_SUBJECT, p)
                    for p in kv_event_batches(args.workers, args.messages, args.blocks, args.first_id)]
    elif args.kind == "active-load":
        messages = [(args.subject or EVENT_SUBJECT, p)
                    for p in active_load_round_robin(args.workers, args.messages, args.marker, args.first_id,
                                                     args.first_sequence)]
    else:
        messages = [(args.subject or SUBJECT, p)
                    for p in round_robin(args.workers, args.messages, args.marker, args.first_id)]
    nc = await nats.connect(args.url, pending_size=64 * 1024 * 1024)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    started = time.time()
    publish = nc.publish
    if args.rate <= 0:
        for i, (subject, payload) in enumerate(messages):
            await publish(subject, payload)
            if i % 2000 == 1999:
                await asyncio.sleep(0)  # let the flusher run; keeps memory flat
    else:
        batch = max(1, int(args.rate / 200))  # 5 ms batches
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for start in range(0, len(messages), batch):
            for subject, payload in messages[start:start + batch]:
                await publish(subject, payload)
            due = t0 + (start + batch) / args.rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
    await nc.flush(timeout=60)
    print(json.dumps({"started": started, "flushed": time.time(), "sent": len(messages)}), flush=True)
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
