"""The pull-mode edge in-process, against a real nats-server and real nats.micro services."""

from __future__ import annotations

import asyncio
import random

import msgspec
import nats
from prometheus_client import CollectorRegistry

from aggregator.collectors.telemetry import StatsScrapeTelemetry
from aggregator.edges.stats_scraper import StatsScraper
from aggregator.ingest.pipeline import Ingest
from aggregator.ingest.stats_replies import ServicePlan
from aggregator.state.fleet import Fleet
from aggregator.state.ingest_counts import IngestCounts
from fleet_protocol.service_stats import service_name
from mock_worker.engine import EngineConfig, SimulatedEngine
from mock_worker.stats_service import start_worker_service

PLAN = ServicePlan(service_name("dynamo", "backend"), {"generate": "backend"})


def scraper(connection, fleet: Fleet | None = None, timeout: float = 0.3):
    registry = CollectorRegistry()
    telemetry = StatsScrapeTelemetry(registry, [PLAN.service])
    fleet = Fleet(30.0) if fleet is None else fleet
    return StatsScraper([PLAN], ingest(fleet), telemetry, connection=connection, poll_interval=timeout * 2,
                        timeout=timeout, max_message_bytes=65536), fleet, registry


def ingest(fleet: Fleet) -> Ingest:
    return Ingest(fleet, IngestCounts(), namespace="dynamo", default_component="backend", max_message_bytes=65536)


def value(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, {"service": PLAN.service, **labels}) or 0.0


async def test_every_instance_of_the_service_is_read(nats_server):
    workers = await nats.connect(nats_server.url)
    client = await nats.connect(nats_server.url)
    try:
        engines = {}
        for worker_id in (0x1A, 0x694D988806B92E39):
            engine = SimulatedEngine(EngineConfig(), random.Random(worker_id))
            engine.step(5.0)
            engines[worker_id] = engine
            await start_worker_service(workers, namespace="dynamo", component="backend", endpoint="generate",
                                       worker_id=worker_id, engine=engine)
        scrape, fleet, registry = scraper(lambda: client)
        assert await scrape.scrape(PLAN) == 2
        loads = {key.worker_id: state.load for key, state in fleet.workers.items()}
        assert loads == {worker_id: engine.metrics() for worker_id, engine in engines.items()}
        assert {(key.component, key.endpoint, key.dp_rank) for key in fleet.workers} == {("backend", "generate", 0)}
        assert value(registry, "llm_aggregator_stats_scrape_replies_total") == 2
        assert value(registry, "llm_aggregator_stats_scrape_endpoints_total", outcome="accepted") == 2
        assert value(registry, "llm_aggregator_stats_scrape_timeouts_total") == 0
        assert 0 < value(registry, "llm_aggregator_stats_scrape_duration_seconds_sum") < 0.3
    finally:
        await workers.close()
        await client.close()


async def test_a_silent_service_is_a_timeout_not_an_error(nats_server):
    client = await nats.connect(nats_server.url)
    try:
        scrape, fleet, registry = scraper(lambda: client, timeout=0.1)
        assert await scrape.scrape(PLAN) == 0
        assert len(fleet) == 0
        assert value(registry, "llm_aggregator_stats_scrapes_total") == 1
        assert value(registry, "llm_aggregator_stats_scrape_timeouts_total") == 1
        assert value(registry, "llm_aggregator_stats_scrape_duration_seconds_sum") == 0.1
    finally:
        await client.close()


async def test_no_connection_or_a_closed_one_is_counted_and_survived(nats_server):
    scrape, _, registry = scraper(lambda: None)
    assert await scrape.scrape(PLAN) == 0
    client = await nats.connect(nats_server.url)
    await client.close()
    scrape, _, registry = scraper(lambda: client)
    assert await scrape.scrape(PLAN) == 0
    assert value(registry, "llm_aggregator_stats_scrape_errors_total", reason="not_connected") == 1


async def test_run_polls_on_schedule_and_stops(nats_server):
    client = await nats.connect(nats_server.url)
    try:
        scrape, _, registry = scraper(lambda: client, timeout=0.05)
        stop = asyncio.Event()
        task = asyncio.create_task(scrape.run(stop))
        await asyncio.sleep(0.55)  # polls at 0, 0.1, ..., 0.5
        stop.set()
        await asyncio.wait_for(task, 2)
        assert 3 <= value(registry, "llm_aggregator_stats_scrapes_total") <= 7
    finally:
        await client.close()


def test_the_cardinality_limit_refuses_new_workers_only():
    scrape, fleet, registry = scraper(lambda: None, fleet=Fleet(30.0, max_workers=1))
    data = {"worker_stats": {"request_active_slots": 1, "request_total_slots": 2},
            "kv_stats": {"kv_active_blocks": 5, "kv_total_blocks": 10}}
    reply = msgspec.json.encode({"endpoints": [
        {"name": "generate-1", "subject": "dynamo_backend.generate-1", "data": data},
        {"name": "generate-2", "subject": "dynamo_backend.generate-2", "data": data},
    ]})
    scrape.apply_reply(PLAN, reply)
    scrape.apply_reply(PLAN, reply)
    assert [key.worker_id for key in fleet.workers] == [1]
    assert value(registry, "llm_aggregator_stats_scrape_errors_total", reason="worker_limit") == 2
    assert value(registry, "llm_aggregator_stats_scrape_endpoints_total", outcome="accepted") == 2


def test_timeout_must_be_below_the_interval():
    import pytest

    registry = CollectorRegistry()
    telemetry = StatsScrapeTelemetry(registry, [PLAN.service])
    with pytest.raises(ValueError):
        StatsScraper([PLAN], ingest(Fleet(30.0)), telemetry, connection=lambda: None, poll_interval=1.0, timeout=1.0,
                     max_message_bytes=1024)
