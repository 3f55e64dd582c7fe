"""Workers' MetricsRegistry over a real nats-server into the real aggregator process, scraped over HTTP."""

from __future__ import annotations

import json
import sys

import pytest

import fleet_protocol as protocol
from fleet_demo.nats_server import free_port

from ..support import (
    Process,
    http_get,
    mock_worker,
    parse_text,
    publish,
    samples,
    scrape,
    wait_until,
)

REQUESTS = ("dynamo_component_requests", "dynamo_component_requests_total")
DURATION = "dynamo_component_request_duration_seconds"


def by_worker(families: dict, name: str, sample: str | None = None) -> dict[str, float]:
    return {dict(k)["worker_id"]: v for k, v in samples(families, name, sample).items()}


def worker_ids_of(url: str) -> set[str]:
    return set(by_worker(scrape(url), *REQUESTS))


def mock_worker_env(nats_url: str, env: dict, *extra: str) -> Process:
    return Process([sys.executable, "-m", "mock_worker", "--nats-url", nats_url, *extra], env=env)


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_two_workers_of_one_component_merged_then_one_expires(nats_server, processes, openmetrics):
    aggregator = processes.aggregator(nats_server.url, "--stale-after", "1.5")
    status_port = free_port()
    common = ("--workers", "1", "--interval", "0.2", "--metrics-interval", "0.3")
    first = processes.add(mock_worker_env(nats_server.url, {"DYN_SYSTEM_PORT": str(status_port),
                                                            "DYN_SYSTEM_HOST": "127.0.0.1"}, *common, "--seed", "1"))
    second = processes.add(mock_worker(nats_server.url, *common, "--seed", "2"))

    def two_workers_with_requests():
        values = by_worker(scrape(aggregator.url), *REQUESTS)
        return values if len(values) == 2 and all(v > 0 for v in values.values()) else None

    wait_until(two_workers_with_requests, 20, what="two workers' request counters")
    families = scrape(aggregator.url, openmetrics=openmetrics)
    requests = by_worker(families, *REQUESTS)
    assert families["dynamo_component_requests"].type == "counter"
    assert families[DURATION].type == "histogram"
    for key in samples(families, *REQUESTS):
        assert dict(key)["dynamo_component"] == "backend" and dict(key)["dynamo_endpoint"] == "generate"
        assert dict(key)["dynamo_namespace"] == "dynamo" and dict(key)["worker_id"].isdigit()
    # The histogram agrees with the counter of the same snapshot (one snapshot per worker).
    assert by_worker(families, DURATION, DURATION + "_count") == requests
    # Latencies are the simulation's: seconds of simulated decoding, never the microseconds of a call.
    for worker, total in by_worker(families, DURATION, DURATION + "_sum").items():
        assert total / requests[worker] > 0.05
    # Request bytes are 4 per prompt token, so at least 4 per request.
    for worker, total in by_worker(families, "dynamo_component_request_bytes",
                                   "dynamo_component_request_bytes_total").items():
        assert total >= 4 * requests[worker]
    assert set(by_worker(families, "dynamo_component_uptime_seconds")) == set(requests)
    # The same workers are the aggregator's llm_* workers.
    llm_ids = {dict(k)["worker_id"] for k in samples(families, "llm_kv_blocks_active")}
    assert llm_ids == set(requests)

    # The first worker's own status server serves the same registry and Dynamo's health JSON.
    status_url = f"http://127.0.0.1:{status_port}"
    status, headers, body = http_get(f"{status_url}/metrics")
    assert status == 200
    own = {f.name: f for f in parse_text(body.decode())}
    own_requests = [s.value for s in own["dynamo_component_requests"].samples]
    assert len(own_requests) == 1 and own_requests[0] > 0
    status, _, body = http_get(f"{status_url}/health")
    assert status == 200
    health = json.loads(body)
    assert health["status"] == "ready" and health["endpoints"] == {"generate": "ready"}
    assert http_get(f"{status_url}/elsewhere")[2] == b"Route not found"

    first.stop()
    remaining = wait_until(lambda: (ids := worker_ids_of(aggregator.url)) and len(ids) == 1 and ids, 15,
                           what="the stopped worker to expire")
    families = scrape(aggregator.url, openmetrics=openmetrics)
    assert set(by_worker(families, *REQUESTS)) == remaining
    assert set(by_worker(families, DURATION, DURATION + "_count")) == remaining
    assert set(by_worker(families, "dynamo_component_uptime_seconds")) == remaining
    assert second.popen.poll() is None


def test_bad_snapshots_are_rejected_and_counted_and_the_scrape_is_unaffected(nats_server, processes):
    aggregator = processes.aggregator(nats_server.url, "--component-metrics-max-bytes", "4096")
    subject = protocol.component_subject("dynamo", "backend", protocol.COMPONENT_METRICS)

    def snapshot(worker_id: int, text: str) -> bytes:
        return protocol.encode(protocol.MetricsSnapshot(worker_id=worker_id, text=text))

    good = "# HELP dynamo_component_queue_depth Queued\n# TYPE dynamo_component_queue_depth gauge\n" \
           "dynamo_component_queue_depth 4\n"
    publish(nats_server.url, [
        (subject, snapshot(1, good)),
        (subject, snapshot(2, "# TYPE dynamo_component_queue_depth_total counter\n"
                              "dynamo_component_queue_depth_total 1\n")),
        (subject, snapshot(3, "# TYPE mine gauge\nmine 1\n" + good)),
        (subject, snapshot(4, "# TYPE llm_workers gauge\nllm_workers 1000\n")),
        (subject, snapshot(5, good + "#" * 5000)),
        (subject, snapshot(6, "dynamo_component_x{a=\"b\" 1\n")),
    ])

    def rejected():
        fams = scrape(aggregator.url)
        counts = {s.labels["reason"]: s.value for s in fams["llm_aggregator_messages_rejected"].samples
                  if s.labels["kind"] == "component_metrics" and s.name.endswith("_total") and s.value}
        return counts if len(counts) == 5 else None

    counts = wait_until(rejected, 10, what="five reasons counted")
    assert counts == {"type_conflict": 1, "bad_name": 1, "reserved_name": 1, "oversized": 1, "not_exposition": 1}
    for openmetrics in (False, True):
        families = scrape(aggregator.url, openmetrics=openmetrics)
        assert families["dynamo_component_queue_depth"].type == "gauge"
        assert by_worker(families, "dynamo_component_queue_depth") == {"1": 4, "3": 4}
        assert "mine" not in families
        # Snapshots used in part refresh their workers (1-4); those rejected whole (5, 6) do not.
        assert samples(families, "llm_workers") == {(("component", "backend"), ("endpoint", "generate")): 4}
