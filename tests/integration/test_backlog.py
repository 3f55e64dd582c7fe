"""A large backlog at the default pending limit (512k messages) must not starve /health and /metrics.

The aggregator is frozen (SIGSTOP) while 300,000 messages are published, so on SIGCONT the
whole backlog is waiting for it at once (in the server, which is told to buffer rather
than cut the client off, and in the socket). While it drains, /health and /metrics are
polled with a 1-second timeout; every message must then be counted, none dropped.

What this does *not* prove: that transport.py's "yield every 64 messages" is needed for it.
Run with that yield removed it passes too (slowest answer ~30 ms here): nats-py's reader
hands the subscription queue at most what one socket read buffered per event-loop turn,
and the subscription task empties it before the reader runs again, so the queue never
holds more than a few thousand messages whatever the backlog. The yield only matters
once a queue holds many messages, which this path does not produce.
"""

from __future__ import annotations

import signal
import sys
import time

from fleet_demo.nats_server import NatsServer

from ..support import Process, samples, scrape, slowest_answer

COUNT = 300_000

PUBLISH = """
import asyncio, json, sys
import nats

async def main(url, count):
    nc = await nats.connect(url, pending_size=256 * 1024 * 1024)
    payload = json.dumps({"worker_id": 1, "data": {
        "worker_stats": {"request_active_slots": 1, "request_total_slots": 8},
        "kv_stats": {"kv_active_blocks": 1, "kv_total_blocks": 100}}}).encode()
    for i in range(count):
        await nc.publish("namespace.dynamo.component.backend.kv_metrics", payload)
        if i % 10_000 == 0:
            await nc.flush()
    await nc.flush()
    await nc.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_a_300k_backlog_drains_while_health_and_metrics_answer_within_a_second(processes, tmp_path):
    config = tmp_path / "buffering.conf"
    # Defaults (64 MB, 10 s) would disconnect the frozen client as a slow consumer.
    config.write_text('max_pending: 512MB\nwrite_deadline: "60s"\n')
    with NatsServer(config=str(config)) as server:
        aggregator = processes.aggregator(server.url, "--stale-after", "600")  # default pending limits
        aggregator.signal(signal.SIGSTOP)
        try:
            sender = processes.add(Process([sys.executable, "-c", PUBLISH, server.url, str(COUNT)]))
            assert sender.popen.wait(60) == 0, sender.output()
        finally:
            aggregator.signal(signal.SIGCONT)

        def received(families):
            return samples(families, "llm_aggregator_messages_received",
                           "llm_aggregator_messages_received_total")[(("kind", "kv_metrics"),)]

        slowest, polls, done = 0.0, 0, False
        deadline = time.monotonic() + 60
        while not done and time.monotonic() < deadline:
            slowest = max(slowest, slowest_answer(aggregator.url))  # raises if slower than 1 s
            polls += 2
            done = received(scrape(aggregator.url)) == COUNT
            time.sleep(0.02)
        print(f"{polls} requests while draining, slowest {slowest:.3f}s")
        families = scrape(aggregator.url)
        assert received(families) == COUNT
        assert samples(families, "llm_aggregator_nats_slow_consumer_dropped",
                       "llm_aggregator_nats_slow_consumer_dropped_total")[()] == 0
        assert polls >= 2
