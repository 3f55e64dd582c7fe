"""NATS frozen and resumed, workers killed, floods: real nats-server, real aggregator, real clients.

NATS not up at start and NATS killed/restarted are in test_end_to_end.py
(test_starts_without_nats_then_follows_its_restarts); these add what it does not cover.
"""

from __future__ import annotations

import json
import signal
import sys
import time

from ..support import (
    Process,
    mock_worker,
    publish,
    samples,
    scrape,
    slowest_answer,
    wait_until,
)

NESTED = {"worker_stats": {"request_active_slots": 3, "request_total_slots": 8},
          "kv_stats": {"kv_active_blocks": 30, "kv_total_blocks": 100}}
SUBJECT = "namespace.dynamo.component.backend.kv_metrics"


def load(worker_id: int) -> bytes:
    return json.dumps({"worker_id": worker_id, "data": NESTED}).encode()


def workers_exported(url: str) -> set[str]:
    return {dict(k)["worker_id"] for k in samples(scrape(url), "llm_kv_blocks_active")}


def test_frozen_nats_is_detected_by_pings_and_followed_after_it_resumes(nats_server, processes):
    aggregator = processes.aggregator(nats_server.url, "--nats-ping-interval", "0.5", "--stale-after", "60")
    publish(nats_server.url, [(SUBJECT, load(1))])
    wait_until(lambda: workers_exported(aggregator.url) == {"1"}, 10, what="worker 1")

    nats_server.process.send_signal(signal.SIGSTOP)
    try:
        # TCP stays up while the server is frozen: only unanswered pings reveal it.
        wait_until(lambda: aggregator.health() == 503, 20, what="503 while NATS is frozen")
        assert workers_exported(aggregator.url) == {"1"}  # /metrics still answers, state kept
    finally:
        nats_server.process.send_signal(signal.SIGCONT)
    wait_until(lambda: aggregator.health() == 200, 30, what="reconnected after SIGCONT")
    publish(nats_server.url, [(SUBJECT, load(2))])
    wait_until(lambda: workers_exported(aggregator.url) == {"1", "2"}, 10, what="subscriptions restored")
    families = scrape(aggregator.url)
    assert samples(families, "llm_aggregator_nats_reconnects", "llm_aggregator_nats_reconnects_total")[()] >= 1


def test_a_sigkilled_worker_expires(nats_server, processes):
    aggregator = processes.aggregator(nats_server.url, "--stale-after", "1.5")
    worker = processes.add(mock_worker(nats_server.url, "--workers", "2", "--interval", "0.2", "--seed", "3"))
    wait_until(lambda: sum(samples(scrape(aggregator.url), "llm_workers").values()) == 2, 15, what="2 workers")
    worker.signal(signal.SIGKILL)
    wait_until(lambda: sum(samples(scrape(aggregator.url), "llm_workers").values()) == 0, 10, what="expiry")
    expired = samples(scrape(aggregator.url), "llm_workers_expired", "llm_workers_expired_total")
    assert sum(expired.values()) == 2


FLOOD = """
import asyncio, json, sys, time
import nats

async def main(url, count, seconds, headers):
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    deadline = time.monotonic() + seconds
    sent = 0
    while sent < count and time.monotonic() < deadline:
        for _ in range(1000):
            payload = json.dumps({"worker_id": sent % 50, "data": {
                "worker_stats": {"request_active_slots": 1, "request_total_slots": 8},
                "kv_stats": {"kv_active_blocks": sent % 100, "kv_total_blocks": 100}}}).encode()
            await nc.publish("namespace.dynamo.component.backend.kv_metrics", payload, headers=headers)
            sent += 1
        await nc.flush()
    await nc.close()
    print(sent)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])))
"""


def test_a_flood_on_the_queued_path_is_dropped_and_counted_while_metrics_and_health_keep_answering(
        nats_server, processes):
    # Messages with headers take nats-py's queued path, bounded by --pending-msgs-limit (the
    # direct path has no client-side queue: see the next test).
    aggregator = processes.aggregator(nats_server.url, "--pending-msgs-limit", "20", "--stale-after", "60",
                                      env={"DYN_LOGGING_JSONL": "1"})
    flood = processes.add(Process([sys.executable, "-c", FLOOD, nats_server.url, "150000", "15",
                                   json.dumps({"Nats-Msg-Id": "flood"})]))

    slowest = 0.0
    answered = 0
    deadline = time.monotonic() + 40
    while flood.popen.poll() is None and time.monotonic() < deadline:
        slowest = max(slowest, slowest_answer(aggregator.url, ("/metrics", "/health")))  # raises past 1 s
        answered += 2
        time.sleep(0.05)
    assert flood.popen.wait(30) == 0, flood.output()
    assert answered >= 4, "the flood ended before it could be observed"
    print(f"{answered} requests during the flood, slowest {slowest:.3f}s")

    def dropped():
        return samples(scrape(aggregator.url), "llm_aggregator_nats_slow_consumer_dropped",
                       "llm_aggregator_nats_slow_consumer_dropped_total").get((), 0)

    wait_until(dropped, 10, what="slow-consumer drops counted")
    lines = [json.loads(x) for x in aggregator.output().splitlines() if x.startswith("{")]
    drop_logs = [x for x in lines if x.get("message") == "slow consumer: messages dropped"]
    assert 1 <= len(drop_logs) <= 5 < dropped()  # counted per message, logged rarely
    wait_until(lambda: aggregator.health() == 200, 15, what="healthy after the flood")


def test_a_frozen_aggregator_cut_off_as_a_slow_consumer_reconnects_and_resumes(processes, tmp_path):
    """Direct delivery keeps no client-side queue: past nats-server's max_pending for the
    connection the server cuts the aggregator off; it must reconnect, resubscribe and go on."""
    from fleet_demo.nats_server import NatsServer

    config = tmp_path / "strict.conf"
    config.write_text('max_pending: 1MB\nwrite_deadline: "1s"\n')
    with NatsServer(config=str(config)) as server:
        aggregator = processes.aggregator(server.url, "--stale-after", "600", env={"DYN_LOGGING_JSONL": "1"})
        publish(server.url, [(SUBJECT, load(1))])
        wait_until(lambda: workers_exported(aggregator.url) == {"1"}, 10, what="worker 1")
        aggregator.signal(signal.SIGSTOP)
        try:
            flood = processes.add(Process([sys.executable, "-c", FLOOD, server.url, "30000", "15", "null"]))
            assert flood.popen.wait(60) == 0, flood.output()  # ~4 MB: four times what the server holds for it
        finally:
            aggregator.signal(signal.SIGCONT)
        wait_until(lambda: samples(scrape(aggregator.url), "llm_aggregator_nats_reconnects",
                                   "llm_aggregator_nats_reconnects_total")[()] >= 1, 30, what="a reconnect")
        wait_until(lambda: aggregator.health() == 200, 30, what="healthy again")
        slowest_answer(aggregator.url)
        publish(server.url, [(SUBJECT, load(2))])
        wait_until(lambda: workers_exported(aggregator.url) >= {"1", "2"}, 10, what="subscriptions restored")
        lines = [json.loads(x) for x in aggregator.output().splitlines() if x.startswith("{")]
        assert any(x.get("message") == "connected to NATS" and x.get("delivery") == "direct" for x in lines)
