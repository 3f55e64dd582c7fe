"""What /metrics says for a given state, read back with prometheus_client's parsers and promtool."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry

import fleet_protocol as protocol
from aggregator import rejects
from aggregator.collectors.fleet_kv import FleetCollector
from aggregator.collectors.telemetry import Telemetry
from aggregator.exposition.encoder import encode
from aggregator.ingest.component_snapshots import SnapshotLimits, snapshot_route
from aggregator.ingest.pipeline import Ingest
from aggregator.state.fleet import Fleet

from ..support import render_families


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stack():
    clock = Clock()
    registry = CollectorRegistry()
    telemetry = Telemetry(registry)
    fleet = Fleet(stale_after=10)
    collector = FleetCollector(fleet, wall_clock=lambda: 1_700_000_000.0 + clock.now, monotonic_clock=clock)
    registry.register(collector)
    fleet.add_listener(collector.labels)
    ingest = Ingest(fleet, telemetry.counts, namespace="dynamo", default_component="backend",
                    max_message_bytes=65536, clock=clock)
    # Every route the aggregator has (aggregator/service.py): a kind is counted from 0 once routed.
    ingest.add_route(protocol.COMPONENT_METRICS, "component_metrics", snapshot_route(SnapshotLimits(), 1 << 20),
                     reasons=rejects.COMPONENT_METRICS)
    return ingest, registry, clock


def publish_load(ingest, worker_id, active, *, component="backend", endpoint="generate", rank=None, total=100):
    data = {"worker_stats": {"data_parallel_rank": rank, "request_active_slots": 3, "request_total_slots": 8,
                             "num_requests_waiting": 1},
            "kv_stats": {"kv_active_blocks": active, "kv_total_blocks": total, "gpu_cache_usage_perc": active / total,
                         "gpu_prefix_cache_hit_rate": 0.5}}
    payload = json.dumps({"worker_id": worker_id, "endpoint": endpoint, "data": data}).encode()
    subject = f"namespace.dynamo.component.{component}.kv_metrics"
    return ingest.handle("namespace.dynamo.component.*.kv_metrics", subject, payload)


def families(registry, openmetrics=False) -> dict:
    return render_families(registry, openmetrics=openmetrics)


def values(fams, name, sample=None):
    return {
        (s.labels.get("component"), s.labels.get("endpoint"), s.labels.get("worker_id"), s.labels.get("dp_rank")): s.value
        for s in fams[name].samples if s.name == (sample or name)
    }


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text-0.0.4", "openmetrics"])
def test_worker_and_group_series(stack, openmetrics):
    ingest, registry, clock = stack
    assert publish_load(ingest, 7587888657184927289, 40)
    assert publish_load(ingest, 2, 20, rank=1)
    hit = b'{"worker_id":7587888657184927289,"isl_blocks":12,"overlap_blocks":8}'
    assert ingest.handle("namespace.dynamo.kv-hit-rate", "namespace.dynamo.kv-hit-rate", hit)
    fams = families(registry, openmetrics)

    w1 = ("backend", "generate", "7587888657184927289", "0")
    w2 = ("backend", "generate", "2", "1")
    assert values(fams, "llm_kv_blocks_active") == {w1: 40, w2: 20}
    assert values(fams, "llm_kv_blocks_total") == {w1: 100, w2: 100}
    assert values(fams, "llm_requests_active_slots") == {w1: 3, w2: 3}
    assert values(fams, "llm_requests_total_slots") == {w1: 8, w2: 8}
    assert values(fams, "llm_requests_waiting") == {w1: 1, w2: 1}
    assert values(fams, "llm_gpu_cache_usage_ratio") == {w1: 0.4, w2: 0.2}
    assert values(fams, "llm_gpu_prefix_cache_hit_ratio") == {w1: 0.5, w2: 0.5}
    assert values(fams, "llm_kv_hit_rate_percent") == {w1: pytest.approx(100 * 8 / 12)}
    assert values(fams, "llm_kv_hit_rate_isl_blocks", "llm_kv_hit_rate_isl_blocks_total") == {w1: 12}
    assert values(fams, "llm_kv_hit_rate_overlap_blocks", "llm_kv_hit_rate_overlap_blocks_total") == {w1: 8}
    assert fams["llm_kv_hit_rate_isl_blocks"].type == "counter"
    assert values(fams, "llm_worker_last_seen_timestamp_seconds") == {w1: 1_700_001_000.0, w2: 1_700_001_000.0}

    group = ("backend", "generate", None, None)
    assert values(fams, "llm_workers") == {group: 2}
    assert values(fams, "llm_load_avg") == {group: 30.0}
    assert values(fams, "llm_load_std") == {group: 10.0}
    assert values(fams, "llm_fleet_kv_hit_rate_percent") == {group: pytest.approx(100 * 8 / 12)}
    received = {s.labels["kind"]: s.value for s in fams["llm_aggregator_messages_received"].samples
                if s.name == "llm_aggregator_messages_received_total"}
    assert received == {"kv_metrics": 2, "kv_hit_rate": 1, "gpu_metrics": 0, "component_metrics": 0,
                        "active_load": 0, "forward_pass_metrics": 0, "kv_events": 0}


def test_zero_live_workers_export_a_zero_count_and_no_load(stack):
    ingest, registry, clock = stack
    publish_load(ingest, 1, 40)
    clock.now += 11
    ingest.fleet.expire(clock.now)
    fams = families(registry, openmetrics=True)
    assert values(fams, "llm_workers") == {("backend", "generate", None, None): 0}
    assert values(fams, "llm_load_avg") == {}
    assert values(fams, "llm_load_std") == {}
    assert values(fams, "llm_kv_blocks_active") == {}
    assert values(fams, "llm_workers_expired", "llm_workers_expired_total") == {("backend", "generate", None, None): 1}


def test_worker_label_sets_live_as_long_as_their_workers(stack):
    ingest, registry, clock = stack
    (collector,) = (c for c in registry._collector_to_names if isinstance(c, FleetCollector))
    publish_load(ingest, 1, 40)
    publish_load(ingest, 2, 40)
    families(registry)
    assert len(collector.labels) == 2
    listed = list(ingest.fleet.workers)  # what a scrape on the render thread had listed...
    clock.now += 11
    assert ingest.fleet.expire(clock.now) == listed  # ...before the event loop expired them
    assert len(collector.labels) == 0
    # That scrape goes on rendering them; it must not leave their label sets behind.
    assert [collector.labels.of(key)["worker_id"] for key in listed] == ["1", "2"]
    assert len(collector.labels) == 0


def test_a_bad_message_is_counted_and_leaves_every_worker_as_it_was(stack):
    ingest, registry, clock = stack
    publish_load(ingest, 1, 40)
    before = encode(registry, "")[0]
    bad = json.dumps({"worker_id": 1, "data": {"request_active_slots": 1}}).encode()
    assert not ingest.handle("namespace.dynamo.component.*.kv_metrics",
                             "namespace.dynamo.component.backend.kv_metrics", bad)
    assert not ingest.handle("namespace.dynamo.component.*.kv_metrics",
                             "namespace.dynamo.component.backend.kv_metrics", b"\x00garbage")
    fams = families(registry)
    assert values(fams, "llm_kv_blocks_active") == {("backend", "generate", "1", "0"): 40}
    rejected = {(s.labels["kind"], s.labels["reason"]): s.value
                for s in fams["llm_aggregator_messages_rejected"].samples if s.name.endswith("_total")}
    assert rejected[("kv_metrics", "missing_field")] == 1
    assert rejected[("kv_metrics", "not_json")] == 1
    assert sum(rejected.values()) == 2
    # nothing but the counters moved
    changed = [line for line in set(encode(registry, "")[0].decode().splitlines())
               - set(before.decode().splitlines()) if line.startswith("llm_") and "aggregator" not in line]
    assert changed == []


def test_label_values_are_escaped(stack):
    ingest, registry, clock = stack
    nasty = 'a"b\\c\nd'
    assert publish_load(ingest, 1, 40, endpoint=nasty)
    for openmetrics in (False, True):
        fams = families(registry, openmetrics)
        assert values(fams, "llm_kv_blocks_active") == {("backend", nasty, "1", "0"): 40}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is installed by .ci/run (Debian prometheus)")
def test_promtool_check_metrics_is_clean_except_dynamos_names(stack):
    ingest, registry, clock = stack
    publish_load(ingest, 1, 40)
    ingest.handle("namespace.dynamo.kv-hit-rate", "namespace.dynamo.kv-hit-rate",
                  b'{"worker_id":1,"isl_blocks":12,"overlap_blocks":8}')
    body, _ = encode(registry, "")
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    problems = [line for line in result.stderr.decode().splitlines() if line.strip()]
    # Kept for compatibility with Dynamo's dashboards (README, "Compatibility"):
    allowed = ("llm_kv_blocks_total",)
    unexpected = [p for p in problems if not p.startswith(allowed)]
    assert unexpected == [], problems
