"""Pushgateway client process: one group per worker, PUT round-robin (`python -m bench.push_client`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp

from .payloads import exposition_body


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--groups", type=int, required=True)
    parser.add_argument("--pushes", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    bodies = [exposition_body(g) for g in range(args.groups)]
    async with aiohttp.ClientSession() as session:
        async def put(group: int) -> None:
            async with session.put(f"{args.url}/metrics/job/bench/instance/{group}", data=bodies[group]) as r:
                if r.status >= 300:
                    raise RuntimeError(f"push failed: {r.status} {await r.text()}")

        for start in range(0, args.groups, args.concurrency):  # create the groups first
            await asyncio.gather(*(put(g) for g in range(start, min(start + args.concurrency, args.groups))))
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        done = 0
        started = time.time()
        deadline = time.monotonic() + args.seconds

        async def pusher(offset: int) -> None:
            nonlocal done
            i = offset
            while done < args.pushes and time.monotonic() < deadline:
                await put(i % args.groups)
                done += 1
                i += args.concurrency

        await asyncio.gather(*(pusher(k) for k in range(args.concurrency)))
        print(json.dumps({"pushes": done, "seconds": time.time() - started}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
