"""The one ingest pipeline: routes, feeds per source, counts, and the reject vocabulary (in-process, no NATS)."""

from __future__ import annotations

import gc
import json
import tracemalloc

import structlog
from prometheus_client import CollectorRegistry

import fleet_protocol as protocol
from aggregator import rejects
from aggregator.collectors.ingest_counts import IngestCountsCollector
from aggregator.collectors.telemetry import StatsScrapeTelemetry, Telemetry
from aggregator.edges.hit_rate_journal import restore, take_snapshot
from aggregator.ingest import component_snapshots, pipeline
from aggregator.ingest.component_snapshots import SnapshotLimits, snapshot_route
from aggregator.ingest.pipeline import Ingest
from aggregator.state import component_index
from aggregator.state.fleet import Fleet, GroupKey, WorkerKey
from fleet_protocol import errors

LOAD = {"worker_stats": {"request_active_slots": 1, "request_total_slots": 4},
        "kv_stats": {"kv_active_blocks": 3, "kv_total_blocks": 10}}


def load(worker_id: int) -> bytes:
    return json.dumps({"worker_id": worker_id, "data": LOAD}).encode()


def hit(worker_id: int, isl: int = 10, overlap: int = 4) -> bytes:
    return json.dumps({"worker_id": worker_id, "isl_blocks": isl, "overlap_blocks": overlap}).encode()


def build(max_workers: int = 100):
    registry = CollectorRegistry()
    telemetry = Telemetry(registry)
    fleet = Fleet(stale_after=60, max_workers=max_workers)
    ingest = Ingest(fleet, telemetry.counts, namespace="dynamo", default_component="backend",
                    max_message_bytes=65536, clock=lambda: 100.0)
    return ingest, fleet, registry


def exported(registry: CollectorRegistry, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for family in registry.collect() for s in family.samples
            if s.name == name}


def test_every_reason_is_listed_once_with_a_line_saying_what_it_is():
    groups = (rejects.WIRE, rejects.EVENT_WIRE, rejects.EVENT_STREAM, rejects.WORKER_LIMITS, rejects.COMPONENT_METRICS,
              rejects.STATS_ENDPOINT, rejects.STATS_REQUEST)
    listed = [reason for group in groups for reason in group]
    assert len(listed) == len(set(listed)) == len(rejects.DESCRIPTIONS)
    assert set(listed) == set(rejects.DESCRIPTIONS)
    for reason, description in rejects.DESCRIPTIONS.items():
        assert description.strip() and "\n" not in description, reason
    # The wire reasons are the protocol's own objects, not copies of its strings.
    assert rejects.WIRE == protocol.REJECT_REASONS
    assert set(rejects.WIRE + rejects.EVENT_WIRE) == set(protocol.REJECT_REASONS + protocol.EVENT_REJECT_REASONS)
    assert rejects.OVERSIZED is errors.OVERSIZED and rejects.INCONSISTENT is errors.INCONSISTENT
    for name in ("NOT_EXPOSITION", "BAD_NAME", "RESERVED_NAME", "BAD_FAMILY", "SERIES_LIMIT"):
        assert getattr(component_snapshots, name) is getattr(rejects, name)
    for name in ("TYPE_CONFLICT", "SERIES_LIMIT"):
        assert getattr(component_index, name) is getattr(rejects, name)


def test_every_routed_kind_is_exported_at_zero_for_every_reason_it_can_have():
    ingest, _, registry = build()
    ingest.add_route(protocol.COMPONENT_METRICS, pipeline.COMPONENT_METRICS,
                     snapshot_route(SnapshotLimits(), 1 << 20), reasons=rejects.COMPONENT_METRICS)
    rejected = exported(registry, "llm_aggregator_messages_rejected_total")
    expected = {kind: pipeline.BASE_REASONS for kind in (pipeline.LOAD, pipeline.HIT_RATE, pipeline.GPU)}
    expected[pipeline.COMPONENT_METRICS] = (*pipeline.BASE_REASONS, *rejects.COMPONENT_METRICS)
    for kind in (pipeline.ACTIVE_LOAD, pipeline.FORWARD_PASS, pipeline.KV_EVENTS):  # Dynamo 1.x's event plane
        expected[kind] = (*pipeline.BASE_REASONS, protocol.NOT_MSGPACK, rejects.DUPLICATE)
    assert rejected == {(("kind", kind), ("reason", reason)): 0 for kind, reasons in expected.items()
                        for reason in reasons}
    assert exported(registry, "llm_aggregator_messages_received_total") == {
        (("kind", kind),): 0 for kind in expected}


def test_the_counts_collector_describes_exactly_what_it_collects():
    ingest, _, _ = build()
    collector = IngestCountsCollector(ingest.counts)
    described = [(m.name, m.type, m.documentation) for m in collector.describe()]
    assert described == [(m.name, m.type, m.documentation) for m in collector.collect()]
    assert all(not m.samples for m in collector.describe())
    registry = CollectorRegistry()
    registry.register(collector)
    ingest.handle("namespace.dynamo.component.*.kv_metrics", "namespace.dynamo.component.x.kv_metrics", b"{")
    selected = registry.restricted_registry(["llm_aggregator_messages_rejected_total"])
    assert {s.labels["reason"]: s.value for m in selected.collect() for s in m.samples if s.value} == {"not_json": 1}


def test_the_journal_feed_takes_each_subject_by_its_exact_route_and_counts_apart():
    ingest, fleet, registry = build()
    journal = ingest.subject_feed(pipeline.JOURNAL)
    assert journal.handle_subject("namespace.dynamo.kv-hit-rate", hit(1))
    assert journal.handle_subject("namespace.dynamo.component.prefill.kv-hit-rate", hit(2))
    assert journal.handle_subject("namespace.dynamo.component.prefill.kv_metrics", load(3))
    assert {(k.component, k.worker_id) for k in fleet.workers} == {("backend", 1), ("prefill", 2), ("prefill", 3)}
    for subject in ("namespace.other.kv-hit-rate", "namespace.other.component.prefill.kv-hit-rate",
                    "namespace.dynamo.component.a.b.kv-hit-rate", "namespace.dynamo.kv-hit-rate.x",
                    "namespace.dynamo.component.prefill.unknown", "namespace.dynamo.component.*.kv-hit-rate.x"):
        assert journal.pattern_of(subject) is None, subject
        assert not journal.handle_subject(subject, hit(9))
    assert len(fleet) == 3
    assert ingest.handle("namespace.dynamo.component.*.kv-hit-rate", "namespace.dynamo.component.decode.kv-hit-rate",
                         hit(4))
    counts = ingest.counts
    assert counts.of(pipeline.JOURNAL, pipeline.HIT_RATE).accepted.value == 2
    assert counts.of(pipeline.JOURNAL, pipeline.LOAD).accepted.value == 1
    assert counts.of(pipeline.NATS, pipeline.HIT_RATE).accepted.value == 1
    # Exported by kind, summed over the sources.
    assert exported(registry, "llm_aggregator_messages_accepted_total")[(("kind", "kv_hit_rate"),)] == 3
    assert exported(registry, "llm_aggregator_messages_received_total")[(("kind", "kv_hit_rate"),)] == 3


def test_a_feed_of_decoded_items_applies_counts_and_rejects_where_its_source_says():
    ingest, fleet, registry = build(max_workers=1)
    service = "dynamo_backend"
    scrape = StatsScrapeTelemetry(registry, [service])
    pulled = ingest.feed(pipeline.PULL, scrape.outcomes(service), service=service)
    event = protocol.decode_load_event(load(1), 65536)
    assert pulled.take(pipeline.LOAD, f"{service}.generate-1", Fleet.observe_load, "backend", event)
    other = protocol.decode_load_event(load(2), 65536)
    assert not pulled.take(pipeline.LOAD, f"{service}.generate-2", Fleet.observe_load, "backend", other)
    pulled.reject(pipeline.LOAD, f"{service}.generate-3", rejects.NO_DATA, "no stats handler")
    assert [k.worker_id for k in fleet.workers] == [1]
    errors_ = exported(registry, "llm_aggregator_stats_scrape_errors_total")
    assert {dict(k)["reason"]: v for k, v in errors_.items() if v} == {"worker_limit": 1, "no_data": 1}
    accepted = exported(registry, "llm_aggregator_stats_scrape_endpoints_total")
    assert accepted[(("outcome", "accepted"), ("service", service))] == 1
    # Not counted as messages: pull mode has its own series, as it always had.
    assert not any(exported(registry, "llm_aggregator_messages_received_total").values())
    assert not any(exported(registry, "llm_aggregator_messages_rejected_total").values())

    # Without outcomes of its own, a feed counts in the ingest counts under its source.
    discovered = ingest.feed("discovery")
    discovered.reject(pipeline.LOAD, "somewhere", rejects.NOT_JSON, "bad")
    assert ingest.counts.of("discovery", pipeline.LOAD).rejected[rejects.NOT_JSON].value == 1
    assert exported(registry, "llm_aggregator_messages_rejected_total")[
        (("kind", "kv_metrics"), ("reason", "not_json"))] == 1


def test_a_new_source_is_a_decoder_a_fleet_method_and_a_feed():
    ingest, fleet, registry = build()
    ingest.add_decoder("load_v2", "kv_metrics_v2", protocol.decode_load_event, Fleet.observe_load)
    zmq = ingest.subject_feed("zmq")
    assert zmq.handle_subject("namespace.dynamo.component.router.load_v2", load(5))
    assert not zmq.handle_subject("namespace.dynamo.component.router.load_v2", b"[]")
    assert [(k.component, k.worker_id) for k in fleet.workers] == [("router", 5)]
    # The push feed has the route too, so the subscriber subscribes to it.
    assert "namespace.dynamo.component.*.load_v2" in ingest.routes
    rejected = exported(registry, "llm_aggregator_messages_rejected_total")
    assert rejected[(("kind", "kv_metrics_v2"), ("reason", "wrong_type"))] == 1
    assert rejected[(("kind", "kv_metrics_v2"), ("reason", "worker_limit"))] == 0


def test_a_hit_rate_snapshot_restores_group_totals_and_worker_sums():
    before, _, _ = build()
    before.handle("namespace.dynamo.component.*.kv-hit-rate", "namespace.dynamo.component.a.kv-hit-rate", hit(1))
    before.handle("namespace.dynamo.component.*.kv-hit-rate", "namespace.dynamo.component.a.kv-hit-rate", hit(2, 6, 1))
    before.fleet.expire(1000.0)  # both expire: their sums live on in the group's totals only
    before.handle("namespace.dynamo.kv-hit-rate", "namespace.dynamo.kv-hit-rate", hit(3, 8, 8))
    snapshot = take_snapshot(before.fleet, "S", 7, wall=5000.0, monotonic=1000.0)
    after = Fleet(stale_after=60)
    restore(after, snapshot, wall=5000.0, monotonic=1000.0)
    assert {g: (t.isl_blocks, t.overlap_blocks, t.expired) for g, t in after.groups.items()} == {
        GroupKey("a", "generate"): (16, 5, 2), GroupKey("backend", "generate"): (8, 8, 0)}
    assert {k: (s.isl_blocks, s.overlap_blocks) for k, s in after.workers.items()} == {
        WorkerKey("backend", "generate", 3, 0): (8, 8)}


def test_distinct_hostile_subjects_leave_no_lasting_memory():
    """Each message on a never-seen subject: what ingest remembers per subject is bounded in number and
    size, so once its tables are full a round of new (and long) subjects leaves nothing behind."""
    ingest, _, _ = build()
    pattern = "namespace.dynamo.component.*.kv_metrics"

    def flood(round_: int) -> None:
        for i in range(6_000):
            ingest.handle(pattern, f"namespace.dynamo.component.r{round_}x{i}.kv_metrics", b"{")
        for i in range(2_000):
            ingest.handle(pattern, f"namespace.dynamo.component.r{round_}-{i}-{'c' * 1000}.kv_metrics", b"{")

    def dropped(logger, method, event):  # 24,000 reject lines: not this test's subject
        raise structlog.DropEvent

    config = structlog.get_config()
    structlog.configure(processors=[dropped])
    tracemalloc.start()
    try:
        flood(0)
        flood(1)  # every table full by now
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        flood(2)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        structlog.configure(**config)
    assert grown < 256 * 1024, f"{grown / 2**20:.1f} MiB kept from a round of 8,000 new subjects"
    received = ingest.counts.of("nats", "kv_metrics").received.value
    assert received == 3 * 8_000
