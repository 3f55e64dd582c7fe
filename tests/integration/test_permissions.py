"""The least-permission roles of deploy/nats-server/permissions.conf, proved both ways on a real nats-server.

The server runs the deploy file itself, with JetStream switched on from the command line
(`-js`), so there is no second copy of the roles to drift. Allowed: everything each role
needs works and the NATS client reports no error (a permissions violation reaches the
client's error callback, which the aggregator counts in `llm_aggregator_nats_errors_total`).
Denied: every forbidden publish/subscribe of a worker is *observed* as a
`Permissions Violation` from the server, and its message never reaches the aggregator.
"""

from __future__ import annotations

import asyncio
import json
import sys

import nats
import pytest

from fleet_demo.nats_server import NatsServer

from ..support import ROOT, Process, samples, scrape, wait_until

PERMISSIONS = ROOT / "deploy" / "nats-server" / "permissions.conf"
NESTED = {"worker_stats": {"request_active_slots": 3, "request_total_slots": 8},
          "kv_stats": {"kv_active_blocks": 30, "kv_total_blocks": 100}}
PULL_WORKER_ID = 0x2A

# A Dynamo-style worker in pull mode (a NATS micro service) logged in as the `worker` role;
# it prints every asynchronous error the server sends it.
PULL_WORKER = """
import asyncio, random, sys
import nats
from mock_worker.engine import EngineConfig, SimulatedEngine
from mock_worker.stats_service import start_worker_service

async def main(url, worker_id):
    async def on_error(error):
        print("NATS ERROR", error, flush=True)
    nc = await nats.connect(url, error_cb=on_error)
    engine = SimulatedEngine(EngineConfig(), random.Random(1))
    engine.step(1.0)
    await start_worker_service(nc, namespace="dynamo", component="backend", endpoint="generate",
                               worker_id=worker_id, engine=engine)
    await nc.flush()
    print("SERVING", flush=True)
    await asyncio.sleep(120)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def as_role(url: str, user: str) -> str:
    return url.replace("nats://", f"nats://{user}:{user}-secret-1@")


@pytest.fixture
def permissions_server():
    with NatsServer(config=str(PERMISSIONS), jetstream=True) as server:
        yield server


async def attempt(url: str, publishes=(), subscribes=(), settle: float = 0.5) -> list[str]:
    """Connect, try the publishes and subscriptions, return the errors the server reported."""
    errors: list[str] = []

    async def on_error(error):
        errors.append(str(error))

    async def ignore(msg):
        pass

    nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, connect_timeout=5)
    try:
        for subject in subscribes:
            await nc.subscribe(subject, cb=ignore)
        for subject, payload in publishes:
            await nc.publish(subject, payload)
        await nc.flush()
        deadline = asyncio.get_running_loop().time() + 5
        expected = len(publishes) + len(subscribes)
        while len(errors) < expected and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(settle)  # any late, unexpected error is caught too
        assert nc.is_connected  # a violation is reported, not a disconnect
    finally:
        await nc.close()
    return errors


def nats_errors(families) -> float:
    return samples(families, "llm_aggregator_nats_errors", "llm_aggregator_nats_errors_total")[()]


def test_the_aggregator_role_has_everything_it_needs_push_pull_and_the_jetstream_journal(
        permissions_server, processes):
    url = permissions_server.url
    aggregator = processes.aggregator(
        url, "--nats-user", "aggregator", "--hit-rate-stream", "HITRATE", "--stale-after", "600",
        "--scrape", "backend/generate", "--poll-interval", "0.3", env={"NATS_PASSWORD": "aggregator-secret-1"})
    # JetStream API: the aggregator creates the stream and its ordered consumer itself.
    wait_until(lambda: "consuming hit-rate events" in aggregator.output(), 15, what="stream consumer")
    assert "hit-rate stream created" in aggregator.output()

    pull_worker = processes.add(Process([sys.executable, "-c", PULL_WORKER, as_role(url, "worker"),
                                         str(PULL_WORKER_ID)]))
    wait_until(lambda: "SERVING" in pull_worker.output(), 15, what="pull worker serving")

    async def route():
        # The router's events, stored by the stream (js.publish waits for the stream's ack).
        nc = await nats.connect(as_role(url, "router"), allow_reconnect=False)
        js = nc.jetstream()
        for i in range(10):
            await js.publish("namespace.dynamo.component.backend.kv-hit-rate",
                             json.dumps({"worker_id": PULL_WORKER_ID, "isl_blocks": 10, "overlap_blocks": i}).encode())
        await nc.close()
        # A push worker's load stats, core NATS.
        return await attempt(as_role(url, "worker"), publishes=[
            ("namespace.dynamo.component.backend.kv_metrics",
             json.dumps({"worker_id": 7, "data": NESTED}).encode())], settle=0.2)

    assert asyncio.run(route()) == []

    def everything_arrived():
        families = scrape(aggregator.url)
        active = samples(families, "llm_kv_blocks_active")
        isl = samples(families, "llm_kv_hit_rate_isl_blocks", "llm_kv_hit_rate_isl_blocks_total")
        overlap = samples(families, "llm_kv_hit_rate_overlap_blocks", "llm_kv_hit_rate_overlap_blocks_total")
        replies = samples(families, "llm_aggregator_stats_scrape_replies", "llm_aggregator_stats_scrape_replies_total")
        return ({dict(k)["worker_id"] for k in active} == {"7", str(PULL_WORKER_ID)}  # pushed + pulled
                and sum(isl.values()) == 100 and sum(overlap.values()) == 45  # the journal
                and replies.get((("service", "dynamo_backend"),), 0) >= 1 and families)

    families = wait_until(everything_arrived, 20, what="push, pull and journal through the aggregator role")
    assert nats_errors(families) == 0
    for process in (aggregator, pull_worker):
        assert "Permissions Violation" not in process.output() and "NATS ERROR" not in process.output(), \
            process.output()


def test_a_worker_is_denied_other_components_and_other_workers_subjects(permissions_server, processes):
    url = permissions_server.url
    aggregator = processes.aggregator(url, "--nats-user", "aggregator", "--stale-after", "600",
                                      env={"NATS_PASSWORD": "aggregator-secret-1"})
    forbidden_publishes = [
        ("namespace.dynamo.component.prefill.kv_metrics", json.dumps({"worker_id": 66, "data": NESTED}).encode()),
        ("namespace.dynamo.kv_metrics", json.dumps({"worker_id": 67, "data": NESTED}).encode()),
        ("namespace.dynamo.kv-hit-rate", b'{"worker_id":68,"isl_blocks":5,"overlap_blocks":5}'),
    ]
    forbidden_subscriptions = ["namespace.dynamo.component.backend.kv_metrics",  # the other workers' stats
                               "namespace.dynamo.>"]
    errors = asyncio.run(attempt(as_role(url, "worker"), forbidden_publishes, forbidden_subscriptions))

    for subject, _ in forbidden_publishes:
        assert any(f'permissions violation for publish to "{subject}"' in e.lower() for e in errors), (subject, errors)
    for subject in forbidden_subscriptions:
        assert any(f'permissions violation for subscription to "{subject}"' in e.lower() for e in errors), \
            (subject, errors)
    assert len(errors) == len(forbidden_publishes) + len(forbidden_subscriptions), errors

    # The allowed subject still works on the same role, and nothing forbidden got through.
    assert asyncio.run(attempt(as_role(url, "worker"), [
        ("namespace.dynamo.component.backend.kv_metrics", json.dumps({"worker_id": 7, "data": NESTED}).encode())],
        settle=0.1)) == []
    wait_until(lambda: {dict(k)["worker_id"] for k in samples(scrape(aggregator.url), "llm_kv_blocks_active")}
               == {"7"}, 10, what="the allowed message")
    families = scrape(aggregator.url)
    assert not samples(families, "llm_kv_hit_rate_isl_blocks", "llm_kv_hit_rate_isl_blocks_total")
    assert nats_errors(families) == 0
