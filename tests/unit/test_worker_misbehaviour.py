"""Defined behaviour for workers that are odd but not malformed (README, "Reliability and security").

- `kv_total_blocks` changing on every message: the latest message wins for every gauge
  (a worker may legitimately resize its cache); nothing is averaged across messages.
- Flipping between Dynamo's payload shapes: all shapes normalise to one, so the series
  stay the same; an optional field absent from the latest message is omitted (never 0).
- One worker id reused by another component: a different worker (the key includes the
  component), each with its own series and counters; neither disturbs the other.
- A worker restarting with the same id before it expired: its cumulative hit-rate
  counters continue (they are the aggregator's sums of events, not the worker's), so
  they never go backwards; after expiry it comes back as a new series starting at 0,
  which `rate()` treats as a new series, not as a reset of the old one.
"""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from aggregator.collectors.fleet_kv import FleetCollector
from aggregator.collectors.telemetry import Telemetry
from aggregator.exposition.encoder import encode
from aggregator.ingest.pipeline import Ingest
from aggregator.state.fleet import Fleet

from ..support import parse_text

LOAD = "namespace.dynamo.component.*.kv_metrics"
HIT = "namespace.dynamo.component.*.kv-hit-rate"


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def stack():
    clock = Clock()
    registry = CollectorRegistry()
    fleet = Fleet(stale_after=10)
    registry.register(FleetCollector(fleet, wall_clock=clock, monotonic_clock=clock))
    ingest = Ingest(fleet, Telemetry(registry).counts, namespace="dynamo", default_component="backend",
                    max_message_bytes=65536, clock=clock)
    return ingest, registry, clock


def exported(registry, name) -> dict:
    body, _ = encode(registry, "")
    for family in parse_text(body.decode()):
        if family.name == name:
            return {(s.labels["component"], s.labels["worker_id"]): s.value for s in family.samples
                    if s.name in (name, name + "_total")}
    return {}


def nested(active, total, usage=None):
    return {"worker_stats": {"request_active_slots": 1, "request_total_slots": 4},
            "kv_stats": {"kv_active_blocks": active, "kv_total_blocks": total, "gpu_cache_usage_perc": usage}}


def send(ingest, component, worker_id, data):
    payload = json.dumps({"worker_id": worker_id, "data": data}).encode()
    return ingest.handle(LOAD, LOAD.replace("*", component), payload)


def hit(ingest, component, worker_id, isl, overlap):
    payload = json.dumps({"worker_id": worker_id, "isl_blocks": isl, "overlap_blocks": overlap}).encode()
    return ingest.handle(HIT, HIT.replace("*", component), payload)


def test_a_changing_kv_total_blocks_is_taken_from_the_latest_message():
    ingest, registry, _ = stack()
    for total in (100, 7, 5000, 64):
        assert send(ingest, "backend", 1, nested(total // 2, total))
    assert exported(registry, "llm_kv_blocks_total") == {("backend", "1"): 64}
    assert exported(registry, "llm_kv_blocks_active") == {("backend", "1"): 32}
    # A total below the active count is rejected, not clamped: the previous values stay.
    assert not send(ingest, "backend", 1, nested(65, 64))
    assert exported(registry, "llm_kv_blocks_total") == {("backend", "1"): 64}


def test_flipping_payload_shapes_keeps_one_set_of_series_and_omits_what_the_latest_lacks():
    ingest, registry, _ = stack()
    assert send(ingest, "backend", 1, nested(10, 100, usage=0.1))
    assert exported(registry, "llm_gpu_cache_usage_ratio") == {("backend", "1"): 0.1}
    flat = {"request_active_slots": 1, "request_total_slots": 4, "kv_active_blocks": 20, "kv_total_blocks": 100}
    assert send(ingest, "backend", 1, flat)
    assert exported(registry, "llm_kv_blocks_active") == {("backend", "1"): 20}
    assert exported(registry, "llm_gpu_cache_usage_ratio") == {}
    assert send(ingest, "backend", 1, {"engine_load_metrics": nested(30, 100, usage=0.3)})
    assert exported(registry, "llm_kv_blocks_active") == {("backend", "1"): 30}
    assert exported(registry, "llm_gpu_cache_usage_ratio") == {("backend", "1"): 0.3}


def test_a_worker_id_reused_by_another_component_is_another_worker():
    ingest, registry, _ = stack()
    assert send(ingest, "backend", 7, nested(10, 100))
    assert send(ingest, "prefill", 7, nested(90, 100))
    assert hit(ingest, "backend", 7, 10, 5)
    assert hit(ingest, "prefill", 7, 10, 1)
    assert hit(ingest, "prefill", 7, 10, 1)
    assert exported(registry, "llm_kv_blocks_active") == {("backend", "7"): 10, ("prefill", "7"): 90}
    assert exported(registry, "llm_kv_hit_rate_isl_blocks") == {("backend", "7"): 10, ("prefill", "7"): 20}
    assert exported(registry, "llm_kv_hit_rate_overlap_blocks") == {("backend", "7"): 5, ("prefill", "7"): 2}


def test_a_restarted_worker_continues_its_counters_until_it_expires():
    ingest, registry, clock = stack()
    hit(ingest, "backend", 1, 10, 4)
    clock.now += 5  # restarted within --stale-after: same series, counters continue
    hit(ingest, "backend", 1, 10, 2)
    assert exported(registry, "llm_kv_hit_rate_isl_blocks") == {("backend", "1"): 20}
    clock.now += 11  # silent past --stale-after: the series go
    ingest.fleet.expire(clock.now)
    assert exported(registry, "llm_kv_hit_rate_isl_blocks") == {}
    hit(ingest, "backend", 1, 10, 1)
    assert exported(registry, "llm_kv_hit_rate_isl_blocks") == {("backend", "1"): 10}
    # The fleet counter never goes backwards: it keeps what expired workers contributed.
    body, _ = encode(registry, "")
    fleet_isl = [s.value for f in parse_text(body.decode()) if f.name == "llm_fleet_kv_hit_rate_isl_blocks"
                 for s in f.samples]
    assert fleet_isl == [30]
