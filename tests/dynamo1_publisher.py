"""Dynamo 1.x workers for the stack test: the three event-plane topics on NATS, until stopped.

`python -m tests.dynamo1_publisher NATS_URL [--workers N] [--interval S] [--namespace NS]`

Built on fleet_protocol's encoders, which give the real 1.6.1 runtime's bytes for the same
values (tests/integration/test_dynamo_wire.py): every `--interval` each worker changes its load
(`kv_metrics`), runs a forward pass (`forward-pass-metrics`) and stores and evicts KV blocks
(`kv-events`), each topic from its own publisher with its own sequence, as a worker process
does. Worker ids start with 99999 so that they sort after the mock workers' (the dashboards'
"first worker" stays a mock one, whose capacity comes from discovery). Stopped by SIGTERM from
the test's fixture.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import nats

import fleet_protocol as protocol
from fleet_protocol import EventEnvelope

WORKER_BASE = 9_999_900_000_000_000_000
BLOCKS_PER_STEP = 4


class Worker:
    def __init__(self, namespace: str, index: int, rng: random.Random) -> None:
        self.worker_id = WORKER_BASE + index
        self.rng = rng
        self.subjects = {topic: protocol.endpoint_event_subject(namespace, "backend", "generate", topic)
                         for topic in protocol.EVENT_TOPICS}
        self.publishers = {topic: rng.getrandbits(53) for topic in protocol.EVENT_TOPICS}
        self.sequences = dict.fromkeys(protocol.EVENT_TOPICS, 0)
        self.step = 0
        self.next_block = 1
        self.event_id = 0  # per worker rank, from 1, as KvEventPublisher counts

    def envelope(self, topic: str, payload: bytes) -> tuple[str, bytes]:
        sequence = self.sequences[topic]
        self.sequences[topic] += 1
        message = EventEnvelope(self.publishers[topic], sequence, int(time.time() * 1000), topic, payload)
        return self.subjects[topic], protocol.encode_envelope(message)

    def messages(self) -> list[tuple[str, bytes]]:
        self.step += 1
        used = 100 + (self.step * 37) % 400
        load = protocol.ActiveLoad(self.worker_id, 0, used // 2, None, used)
        iteration = protocol.ForwardPassMetricsV1(
            version=1, worker_id=str(self.worker_id), counter_id=self.step,
            wall_time=self.rng.uniform(0.005, 0.2),
            scheduled_requests=protocol.ScheduledRequests(
                num_prefill_requests=1, sum_prefill_tokens=self.rng.randint(50, 500),
                sum_prefill_kv_tokens=self.rng.randint(0, 400), num_decode_requests=self.rng.randint(1, 8)),
            queued_requests=protocol.QueuedRequests(num_prefill_requests=self.rng.randint(0, 3)))
        first = self.next_block
        self.next_block += BLOCKS_PER_STEP
        changes = [protocol.KvEventData(stored=protocol.KvStored(None, None, [
            protocol.StoredBlock(block, block) for block in range(first, self.next_block)]))]
        if self.step > 3:  # a steady cache: the blocks of three steps ago are evicted
            old = first - 3 * BLOCKS_PER_STEP
            changes.append(protocol.KvEventData(removed=protocol.KvRemoved(list(range(old, old + BLOCKS_PER_STEP)))))
        events = []
        for data in changes:
            self.event_id += 1
            events.append(protocol.RouterEvent(worker_id=self.worker_id,
                                               event=protocol.KvCacheEvent(self.event_id, data, 0)))
        return [
            self.envelope(protocol.KV_METRICS_TOPIC, protocol.encode_active_load(load)),
            self.envelope(protocol.FORWARD_PASS_METRICS_TOPIC, protocol.encode_forward_pass_v1(iteration)),
            self.envelope(protocol.KV_EVENTS_TOPIC, protocol.encode_kv_events(events)),
        ]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--namespace", default="dynamo")
    args = parser.parse_args()
    rng = random.Random(1)
    workers = [Worker(args.namespace, index, rng) for index in range(args.workers)]
    client = await nats.connect(args.url)
    try:
        while True:
            for worker in workers:
                for subject, payload in worker.messages():
                    await client.publish(subject, payload)
            await client.flush()
            await asyncio.sleep(args.interval)
    finally:
        await client.close()


if __name__ == "__main__":
    asyncio.run(main())
