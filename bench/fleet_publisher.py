"""A slice of a large fleet at 1 Hz: one LoadEvent per worker per interval, on its component's subject.

`python -m bench.fleet_publisher URL --components a,b,.. --workers W --slice K/P [--interval 1]`

Worker i (of W) belongs to component i mod C and to the publisher i mod P; its load is `load_of(i)`
and never changes, so whoever reads the fleet can compute the exact statistics it must show. The
messages are encoded once, up front, as the same typed LoadEvents real workers send: a simulated
worker (mock_worker) costs ~0.2 ms of CPU per step, which would take ~20 cores for 100,000 workers
at 1 Hz; publishing prepared messages costs a few microseconds each.

Says `ready`, publishes on `go` (one line on stdin) until stdin closes, spreading each interval's
messages evenly in 5 ms batches; then prints one JSON line: messages sent, intervals, and how far
behind its schedule it fell at worst (a publisher that cannot keep 1 Hz says so).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import nats

import fleet_protocol as protocol

from .payloads import load_event


def load_of(worker: int) -> int:
    """The fixed load (kv_active_blocks) of worker `worker`: spread over 0..4095, deterministic."""
    return (worker * 2654435761) % 4096


def component_of(worker: int, components: list[str]) -> str:
    return components[worker % len(components)]


def messages(namespace: str, components: list[str], workers: int, index: int, count: int) -> list[tuple[str, bytes]]:
    subjects = {c: protocol.component_subject(namespace, c, protocol.KV_METRICS) for c in components}
    return [(subjects[component_of(w, components)], load_event(w, load_of(w))) for w in range(index, workers, count)]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--namespace", default="dynamo")
    parser.add_argument("--components", required=True, help="comma-separated")
    parser.add_argument("--workers", type=int, required=True, help="of the whole fleet")
    parser.add_argument("--slice", required=True, help="K/P: this publisher's share, workers K, K+P, ...")
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    index, count = (int(part) for part in args.slice.split("/"))
    prepared = messages(args.namespace, args.components.split(","), args.workers, index, count)
    nc = await nats.connect(args.url, pending_size=64 * 1024 * 1024)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    stopped = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))  # EOF or any line: stop
    loop = asyncio.get_running_loop()
    batch = max(1, int(len(prepared) / (args.interval * 200)))  # 5 ms batches
    sent = intervals = 0
    worst_lag = 0.0
    start = loop.time()
    publish = nc.publish
    while not stopped.done():
        due0 = start + intervals * args.interval
        for first in range(0, len(prepared), batch):
            for subject, payload in prepared[first:first + batch]:
                await publish(subject, payload)
            sent += min(batch, len(prepared) - first)
            due = due0 + (first + batch) / len(prepared) * args.interval
            delay = due - loop.time()
            worst_lag = max(worst_lag, -delay)
            if delay > 0:
                await asyncio.sleep(delay)
            if stopped.done():
                break
        intervals += 1
    await nc.flush(timeout=60)
    print(json.dumps({"sent": sent, "intervals": intervals, "worst_lag_s": round(worst_lag, 3),
                      "seconds": round(loop.time() - start, 3), "finished": time.time()}), flush=True)
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
