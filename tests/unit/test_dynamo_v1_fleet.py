"""Dynamo 1.x in the fleet state and the pipeline, in-process (no server): what each source's values become.

The event plane's messages go through `Ingest.handle` as NATS delivers them (subject, bytes);
discovery entries through `DiscoveryIngest`, the sink the discovery edge calls. What comes
out is read from the aggregator's own collectors with prometheus_client's parser.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

import fleet_protocol as protocol
from aggregator import rejects
from aggregator.collectors.dynamo_v1 import DynamoV1Collector
from aggregator.collectors.fleet_kv import FleetCollector
from aggregator.collectors.telemetry import Telemetry
from aggregator.ingest import pipeline
from aggregator.ingest.discovery_entries import INSTANCE, MODEL_CARD, DiscoveryIngest
from aggregator.ingest.pipeline import Ingest
from aggregator.state.event_publishers import EventPublishers, StreamKey
from aggregator.state.fleet import Fleet, WorkerKey
from aggregator.state.forward_passes import ForwardPasses
from aggregator.state.kv_cache import CachedBlocks, KvBlockBudget
from fleet_protocol import (
    ActiveLoad,
    EventEnvelope,
    ForwardPassMetricsV1,
    InstanceEntry,
    KvCacheEvent,
    KvEventData,
    KvRemoved,
    KvStored,
    ModelCard,
    ModelEntry,
    QueuedRequests,
    RouterEvent,
    RuntimeConfig,
    ScheduledRequests,
    StoredBlock,
)

from ..support import render_families, samples

WORKER = 0x5C2DB107CE3E712D
LIMIT = 65536


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """An aggregator's state, pipeline and collectors, without its edges."""

    def __init__(self, stale_after: float = 10.0, max_workers: int = 100, kv_blocks: KvBlockBudget | None = None):
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.telemetry = Telemetry(self.registry)
        self.fleet = Fleet(stale_after, max_workers=max_workers, kv_blocks=kv_blocks)
        self.ingest = Ingest(self.fleet, self.telemetry.counts, namespace="dynamo", default_component="backend",
                             max_message_bytes=LIMIT, clock=self.clock)
        fleet_kv = FleetCollector(self.fleet, wall_clock=lambda: 1e9, monotonic_clock=lambda: 0.0)
        self.fleet.add_listener(fleet_kv.labels)
        self.labels = fleet_kv.labels
        self.registry.register(fleet_kv)
        self.registry.register(DynamoV1Collector(self.fleet, fleet_kv.labels, self.ingest.event_publishers))
        self.discovery = DiscoveryIngest(self.ingest)
        self.sequences: dict[int, int] = {}

    def publish(self, topic: str, payload: bytes, *, publisher: int = 7, component: str = "backend",
                endpoint: str = "generate", sequence: int | None = None) -> bool:
        if sequence is None:
            sequence = self.sequences.get(publisher, -1) + 1
        self.sequences[publisher] = sequence
        subject = protocol.endpoint_event_subject("dynamo", component, endpoint, topic)
        envelope = protocol.encode_envelope(EventEnvelope(publisher, sequence, 1_700_000_000_000, topic, payload))
        return self.ingest.handle(protocol.event_subject_pattern("dynamo", topic), subject, envelope)

    def load(self, kv_used: int | None, decode: int | None = None, rank: int = 0, **options) -> bool:
        return self.publish("kv_metrics", protocol.encode_active_load(ActiveLoad(WORKER, rank, decode, None, kv_used)),
                            **options)

    def metrics(self) -> dict:
        return render_families(self.registry)

    def value(self, name: str, sample: str | None = None, **labels: str) -> dict[tuple, float]:
        found = samples(self.metrics(), name, sample)
        return {key: value for key, value in found.items() if labels.items() <= dict(key).items()}

    def counts(self, kind: str) -> tuple[int, int, dict[str, int]]:
        (counts,) = [c for c in self.ingest.counts.all() if c.kind == kind]
        return (counts.received.value, counts.accepted.value,
                {reason: tally.value for reason, tally in counts.rejected.items() if tally.value})


def worker_labels(rank: int = 0, component: str = "backend", endpoint: str = "generate") -> tuple:
    return tuple(sorted({"component": component, "endpoint": endpoint, "worker_id": str(WORKER),
                         "dp_rank": str(rank)}.items()))


def stored(event_id: int, hashes: list[int], rank: int = 0, tier: str = "device") -> RouterEvent:
    blocks = [StoredBlock(block, block + 1) for block in hashes]
    return RouterEvent(worker_id=WORKER, storage_tier=tier, event=KvCacheEvent(
        event_id, KvEventData(stored=KvStored(None, None, blocks)), rank))


def removed(event_id: int, hashes: list[int], rank: int = 0, tier: str = "device") -> RouterEvent:
    return RouterEvent(worker_id=WORKER, storage_tier=tier, event=KvCacheEvent(
        event_id, KvEventData(removed=KvRemoved(hashes)), rank))


def cleared(event_id: int, rank: int = 0) -> RouterEvent:
    return RouterEvent(worker_id=WORKER, event=KvCacheEvent(event_id, "cleared", rank))


def kv_events(*events: RouterEvent) -> bytes:
    return protocol.encode_kv_events(list(events))


def forward_pass(counter_id: int, *, rank: int = 0, wall_time: float = 0.0, prefill: tuple[int, int, int] = (0, 0, 0),
                 decode: int = 0, queued: tuple[int, int] = (0, 0)) -> bytes:
    """prefill = (requests, tokens computed, tokens read from cache); queued = (waiting, preempted)."""
    return protocol.encode_forward_pass_v1(ForwardPassMetricsV1(
        version=1, worker_id=str(WORKER), dp_rank=rank, counter_id=counter_id, wall_time=wall_time,
        scheduled_requests=ScheduledRequests(num_prefill_requests=prefill[0], sum_prefill_tokens=prefill[1],
                                             sum_prefill_kv_tokens=prefill[2], num_decode_requests=decode),
        queued_requests=QueuedRequests(num_prefill_requests=queued[0], num_decode_requests=queued[1])))


def instance(worker: int = WORKER, component: str = "backend") -> tuple[str, InstanceEntry]:
    return (protocol.instance_key("dynamo", component, "generate", worker),
            InstanceEntry("dynamo", component, "generate", worker))


def model_card(worker: int = WORKER, *, start: int = 0, size: int = 1, blocks: int | None = 4096,
               seqs: int | None = 256, lora: str | None = None) -> tuple[str, ModelEntry]:
    return (protocol.model_card_key("dynamo", "backend", "generate", worker, lora),
            ModelEntry("dynamo", "backend", "generate", worker, ModelCard(
                "model", 16, runtime_config=RuntimeConfig(blocks, seqs, 8192, start, size))))


# kv_metrics -------------------------------------------------------------------------------


def test_kv_metrics_give_used_and_decode_blocks_and_the_load_statistics():
    harness = Harness()
    assert harness.load(7, decode=5)
    assert harness.load(9, decode=None, rank=1)
    assert harness.value("llm_kv_blocks_active") == {worker_labels(0): 7, worker_labels(1): 9}
    assert harness.value("llm_kv_active_decode_blocks") == {worker_labels(0): 5}  # nil is left out, never 0
    assert harness.value("llm_active_prefill_tokens") == {}  # always nil from 1.6.1 workers
    group = (("component", "backend"), ("endpoint", "generate"))
    assert harness.value("llm_load_avg") == {group: 8.0}
    assert harness.value("llm_load_std") == {group: 1.0}
    assert harness.load(3, decode=2)  # replaced whole
    assert harness.value("llm_kv_active_decode_blocks") == {worker_labels(0): 2}
    assert harness.counts(pipeline.ACTIVE_LOAD) == (3, 3, {})


def test_names_are_decoded_from_the_subject_and_each_stream_counts_lost_events_and_starts():
    harness = Harness()
    assert harness.load(1, component="Cö*mp", endpoint="e>f%", publisher=6)
    assert harness.value("llm_kv_blocks_active") == {worker_labels(0, "Cö*mp", "e>f%"): 1}
    assert harness.load(2, sequence=0)
    assert harness.load(2, sequence=4)  # messages 1..3 never came
    assert harness.load(3, publisher=8, sequence=5)  # another publisher, first seen mid-stream: not a start
    assert harness.load(4, publisher=9, sequence=0)  # a publisher that (re)started
    lost = harness.value("llm_aggregator_event_plane_lost_events", "llm_aggregator_event_plane_lost_events_total")
    starts = harness.value("llm_aggregator_event_plane_publisher_starts",
                           "llm_aggregator_event_plane_publisher_starts_total")
    stream = (("component", "backend"), ("endpoint", "generate"), ("topic", "kv_metrics"))
    odd = (("component", "Cö*mp"), ("endpoint", "e>f%"), ("topic", "kv_metrics"))
    assert lost == {stream: 3, odd: 0}
    assert starts == {stream: 2, odd: 1}


def test_a_bad_message_is_rejected_with_its_reason_and_changes_nothing():
    harness = Harness()
    assert harness.load(7, decode=5)
    before = harness.metrics()
    pattern = protocol.event_subject_pattern("dynamo", "kv_metrics")
    subject = protocol.endpoint_event_subject("dynamo", "backend", "generate", "kv_metrics")
    good = protocol.encode_active_load(ActiveLoad(WORKER, 0, 1, None, 1))
    wrong_topic = protocol.encode_envelope(EventEnvelope(7, 1, 0, "kv-events", good))
    bad_payload = protocol.encode_envelope(EventEnvelope(7, 2, 0, "kv_metrics", b"\x81\xa9worker_id\xa1x"))
    cases = [
        (subject, b"\xc1", "not_msgpack"),
        (subject, wrong_topic, "inconsistent"),
        (subject, bad_payload, "wrong_type"),
        ("namespace.dynamo.component.a%2.endpoint.generate.kv_metrics", protocol.encode_envelope(
            EventEnvelope(7, 3, 0, "kv_metrics", good)), "wrong_type"),  # a token not percent-encoded
        (subject, b"\x00" * (LIMIT + 1), "oversized"),
    ]
    for message_subject, payload, _ in cases:
        assert not harness.ingest.handle(pattern, message_subject, payload)
    assert harness.counts(pipeline.ACTIVE_LOAD)[2] == {
        "not_msgpack": 1, "inconsistent": 1, "wrong_type": 2, "oversized": 1}
    after = harness.metrics()
    for name in ("llm_kv_blocks_active", "llm_kv_active_decode_blocks", "llm_workers"):
        assert samples(after, name) == samples(before, name), name


# forward-pass-metrics ---------------------------------------------------------------------


def test_forward_passes_give_running_and_waiting_prefill_counters_and_iteration_times():
    harness = Harness()
    fpm = "forward-pass-metrics"
    assert harness.publish(fpm, forward_pass(1, wall_time=0.02, prefill=(1, 100, 50), decode=2, queued=(3, 4)))
    assert harness.value("llm_requests_active_slots") == {worker_labels(): 3}
    assert harness.value("llm_requests_waiting") == {worker_labels(): 7}
    assert harness.publish(fpm, forward_pass(2, wall_time=0.3, prefill=(1, 10, 30), decode=1))
    assert harness.publish(fpm, forward_pass(2, wall_time=0.3, prefill=(1, 10, 30), decode=1))  # a repeat
    assert harness.publish(fpm, forward_pass(3))  # the idle heartbeat: nothing runs, nothing waits
    assert harness.value("llm_requests_active_slots") == {worker_labels(): 0}
    assert harness.value("llm_requests_waiting") == {worker_labels(): 0}
    computed = harness.value("llm_prefill_tokens_computed", "llm_prefill_tokens_computed_total")
    from_cache = harness.value("llm_prefill_tokens_from_cache", "llm_prefill_tokens_from_cache_total")
    assert (computed, from_cache) == ({worker_labels(): 110}, {worker_labels(): 80})
    histogram = harness.metrics()["llm_forward_pass_duration_seconds"]
    assert histogram.type == "histogram"
    by_le = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert (by_le["0.01"], by_le["0.025"], by_le["0.25"], by_le["0.5"], by_le["+Inf"]) == (0, 1, 1, 2, 2)
    totals = {s.name: s.value for s in histogram.samples if not s.name.endswith("_bucket")}
    assert totals == {"llm_forward_pass_duration_seconds_count": 2,
                      "llm_forward_pass_duration_seconds_sum": pytest.approx(0.32)}


def test_a_new_publisher_counts_again_from_its_first_pass():
    passes = ForwardPasses()
    metrics = protocol.decode_forward_pass_v1(forward_pass(5, prefill=(1, 10, 0)), LIMIT)
    assert passes.observe(1, metrics) and not passes.observe(1, metrics)
    restarted = protocol.decode_forward_pass_v1(forward_pass(1, prefill=(1, 7, 0)), LIMIT)
    assert passes.observe(2, restarted)  # counter_id 1 < 5, but from another publisher
    assert passes.prefill_computed == 17


# kv-events -------------------------------------------------------------------------------


def test_cached_blocks_are_exact_from_stored_removed_cleared():
    harness = Harness()
    events = "kv-events"
    assert harness.publish(events, kv_events(stored(1, [1, 2, 3]), stored(2, [3, 4], tier="host_pinned"),
                                             removed(3, [1, 99])))
    cached = harness.value("llm_kv_cached_blocks")
    assert cached == {tuple(sorted((*worker_labels(), ("storage_tier", tier)))): 2 for tier in ("device", "host_pinned")}
    assert harness.value("llm_kv_cached_blocks_reliable") == {worker_labels(): 1}
    assert harness.publish(events, kv_events(cleared(4)))
    assert set(harness.value("llm_kv_cached_blocks").values()) == {0}
    assert harness.fleet.kv_blocks.tracked == 0


def test_a_gap_or_a_late_start_marks_the_count_unreliable_until_cleared():
    harness = Harness()
    events = "kv-events"
    assert harness.publish(events, kv_events(stored(5, [1, 2])))  # not the worker's first event
    assert harness.value("llm_kv_cached_blocks_reliable") == {worker_labels(): 0}
    assert harness.publish(events, kv_events(cleared(6), stored(7, [1])))
    assert harness.value("llm_kv_cached_blocks_reliable") == {worker_labels(): 1}
    assert harness.publish(events, kv_events(stored(10, [2])))  # 8 and 9 lost
    assert harness.value("llm_kv_cached_blocks_reliable") == {worker_labels(): 0}
    assert harness.value("llm_kv_events_lost", "llm_kv_events_lost_total") == {worker_labels(): 2}
    assert harness.publish(events, kv_events(stored(10, [3])))  # a repeat of 10: not applied
    assert sum(harness.value("llm_kv_cached_blocks").values()) == 2
    assert harness.publish(events, kv_events(cleared(11)))
    assert harness.value("llm_kv_cached_blocks_reliable") == {worker_labels(): 1}


def test_tracked_blocks_are_bounded_per_worker_and_in_all_and_counted_when_not_tracked():
    harness = Harness(kv_blocks=KvBlockBudget(max_per_worker=3, max_total=4))
    events = "kv-events"
    assert harness.publish(events, kv_events(stored(1, [1, 2, 3, 4, 5])))
    assert harness.publish(events, kv_events(stored(1, [10, 11], rank=1)))
    untracked = harness.value("llm_aggregator_kv_blocks_untracked", "llm_aggregator_kv_blocks_untracked_total")
    assert untracked == {(("limit", "worker"),): 2, (("limit", "total"),): 1}
    assert harness.value("llm_aggregator_kv_blocks_tracked") == {(): 4}
    assert harness.value("llm_kv_cached_blocks_reliable") == {worker_labels(0): 0, worker_labels(1): 0}
    harness.clock.now += 60
    harness.fleet.expire(harness.clock.now)  # expired workers give their room back
    assert harness.fleet.kv_blocks.tracked == 0


def test_one_bad_event_of_a_batch_is_dropped_alone():
    harness = Harness(max_workers=1)
    events = "kv-events"
    other = RouterEvent(worker_id=WORKER + 1, event=KvCacheEvent(1, KvEventData(stored=KvStored(None, None, [
        StoredBlock(1, 1)])), 0))
    tiers = [stored(2 + index, [index], tier=f"tier{index}") for index in range(6)]
    assert harness.publish(events, kv_events(stored(1, [100]), other, *tiers))
    assert harness.counts(pipeline.KV_EVENTS) == (1, 1, {"worker_limit": 1, "out_of_range": 2})
    assert list(harness.fleet.workers) == [WorkerKey("backend", "generate", WORKER, 0)]
    assert len(harness.fleet.workers[WorkerKey("backend", "generate", WORKER, 0)].kv_cache.tiers) == 5


def test_cached_blocks_alone():
    budget = KvBlockBudget()
    blocks = CachedBlocks()
    for event in (stored(1, [1, 2]), removed(2, [2]), stored(3, [2, 3])):
        assert blocks.apply(budget, 1, "device", event.event)
    assert not blocks.apply(budget, 1, "device", removed(2, [1]).event)  # an old id of the same publisher
    assert blocks.apply(budget, 2, "device", stored(1, [9]).event)  # a new publisher from its start
    assert (blocks.tiers["device"], blocks.reliable, budget.tracked) == ({1, 2, 3, 9}, True, 4)
    assert blocks.apply(budget, 3, "device", stored(7, [8]).event)  # a new publisher in mid-stream
    assert not blocks.reliable


# The publisher table -----------------------------------------------------------------------


def test_the_publisher_table_is_bounded_and_its_counts_too():
    publishers = EventPublishers(max_publishers=2, max_streams=1)
    counts = publishers.counts(StreamKey("c", "e", "kv_metrics"))
    assert publishers.counts(StreamKey("c", "e", "kv-events")) is None  # past max_streams: not counted
    for publisher in (1, 2, 3):
        publishers.observe(counts, publisher, 0)
    assert (len(publishers), publishers.evicted, counts.starts) == (2, 1, 3)
    publishers.observe(counts, 3, 2**40)  # no real gap: another publisher reusing the id
    publishers.observe(counts, 3, 2**40 + 3)
    publishers.observe(counts, 3, 5)  # behind: a duplicate or out of order
    assert counts.lost == 2


# Discovery -------------------------------------------------------------------------------


def test_capacity_comes_from_the_model_card_for_each_of_its_ranks():
    harness = Harness()
    harness.discovery.put(*instance())
    harness.discovery.put(*model_card(start=2, size=2, blocks=4096, seqs=256))
    ranks = {worker_labels(2): 4096, worker_labels(3): 4096}
    assert harness.value("llm_kv_blocks_total") == ranks
    assert harness.value("llm_requests_total_slots") == {key: 256 for key in ranks}
    assert harness.load(10, rank=2) and harness.load(3, rank=0)  # rank 0 is not the card's
    assert harness.value("llm_kv_blocks_active") == {worker_labels(2): 10, worker_labels(0): 3}
    assert harness.value("llm_kv_blocks_total") == ranks
    # A LoRA adapter's card of the same worker, then gone again: the last card put is the one used.
    harness.discovery.put(*model_card(blocks=100, seqs=8, start=2, size=1, lora="adapter"))
    assert harness.value("llm_kv_blocks_total") == {worker_labels(2): 100}
    harness.discovery.delete(model_card(lora="adapter")[0])
    assert harness.value("llm_kv_blocks_total") == ranks
    harness.discovery.delete(model_card()[0])
    assert harness.value("llm_kv_blocks_total") == {}
    assert harness.counts(MODEL_CARD) == (4, 4, {})


def test_an_instance_keeps_its_idle_worker_and_its_deletion_drops_every_rank_at_once():
    harness = Harness(stale_after=5)
    other = WORKER + 1
    harness.discovery.put(*instance())
    harness.discovery.put(*model_card(size=2))
    assert len(harness.value("llm_kv_blocks_total")) == 2  # rendered: label sets cached
    harness.ingest.handle(  # a worker without an instance entry, younger than ours
        protocol.event_subject_pattern("dynamo", "kv_metrics"),
        protocol.endpoint_event_subject("dynamo", "backend", "generate", "kv_metrics"),
        protocol.encode_envelope(EventEnvelope(9, 0, 0, "kv_metrics", protocol.encode_active_load(
            ActiveLoad(other, 0, None, None, 1)))))
    harness.clock.now += 60
    assert harness.fleet.expire(harness.clock.now) == [WorkerKey("backend", "generate", other, 0)]
    for _ in range(3):  # idle, again and again: kept
        harness.clock.now += 60
        assert harness.fleet.expire(harness.clock.now) == []
    assert set(harness.fleet.workers) == {WorkerKey("backend", "generate", WORKER, rank) for rank in (0, 1)}
    harness.discovery.delete(instance()[0])
    assert len(harness.fleet) == 0
    group = (("component", "backend"), ("endpoint", "generate"))
    assert harness.value("llm_workers_deregistered", "llm_workers_deregistered_total") == {group: 2}
    assert harness.value("llm_workers_expired", "llm_workers_expired_total") == {group: 1}
    assert harness.labels.by_worker == {}  # the collectors were told: their render caches are freed


def test_expiry_still_drops_every_stale_unregistered_worker_behind_kept_ones():
    harness = Harness(stale_after=5)
    harness.discovery.put(*instance())
    for worker, rank in ((WORKER, 0), (WORKER + 1, 0), (WORKER, 1), (WORKER + 2, 0)):
        harness.fleet.observe_active_load("backend", "generate", 1, ActiveLoad(worker, rank, None, None, 1),
                                          harness.clock.now)
        harness.clock.now += 1
    harness.fleet.observe_active_load("backend", "generate", 1, ActiveLoad(WORKER + 3, 0, None, None, 1),
                                      harness.clock.now + 20)
    expired = harness.fleet.expire(harness.clock.now + 10)
    assert sorted(key.worker_id for key in expired) == [WORKER + 1, WORKER + 2]
    assert sorted(harness.fleet.workers) == sorted([WorkerKey("backend", "generate", WORKER, 0),
                                                     WorkerKey("backend", "generate", WORKER, 1),
                                                     WorkerKey("backend", "generate", WORKER + 3, 0)])


def test_bad_entries_are_rejected_with_reasons_and_counted():
    harness = Harness(max_workers=3)
    key, entry = instance()
    harness.discovery.put(key.replace(f"{WORKER:x}", "ff"), entry)  # the key names another worker
    harness.discovery.put("v1/instances/dynamo/x", entry)  # not a discovery key
    card_key, card = model_card()
    harness.discovery.put(card_key, model_card(start=65535, size=2)[1])  # ranks past 65535
    harness.discovery.put(card_key, model_card(size=4)[1])  # four new workers, three allowed
    harness.discovery.put(*instance(component="x" * 129))  # no such label value (nor key)
    harness.discovery.put(protocol.instance_key("other", "backend", "generate", 1),
                          InstanceEntry("other", "backend", "generate", 1))  # another namespace: passed over
    assert harness.counts(INSTANCE) == (3, 0, {"inconsistent": 1, "wrong_type": 2})
    assert harness.counts(MODEL_CARD) == (2, 0, {"out_of_range": 1, "worker_limit": 1})
    assert len(harness.fleet) == 0
    rejected = harness.value("llm_aggregator_messages_rejected", "llm_aggregator_messages_rejected_total",
                             kind=INSTANCE)
    assert {dict(labels)["reason"] for labels in rejected} == {*rejects.WIRE, *rejects.WORKER_LIMITS}


def test_service_stats_of_a_dp_worker_go_on_its_first_rank():
    harness = Harness()
    harness.discovery.put(*model_card(start=2, size=2))
    stats = protocol.EndpointStatsV1("n", "s", num_requests=5, num_errors=1, processing_time=2_500_000_000)
    harness.fleet.observe_service_stats("backend", "generate", WORKER, stats, harness.clock.now)
    assert harness.value("llm_worker_requests", "llm_worker_requests_total") == {worker_labels(2): 5}
    assert harness.value("llm_worker_request_errors", "llm_worker_request_errors_total") == {worker_labels(2): 1}
    assert harness.value("llm_worker_processing_seconds", "llm_worker_processing_seconds_total") == {
        worker_labels(2): 2.5}


# $SRV.STATS of 1.x ---------------------------------------------------------------------------


def test_a_1x_stats_entry_gives_counters_and_an_entry_without_data_of_another_shape_is_still_no_data():
    import json
    from pathlib import Path

    from aggregator.ingest.stats_replies import ServicePlan, read_stats_reply

    recorded = json.loads((Path(__file__).parent.parent / "dynamo_wire_1_6_1.json").read_text())["stats_reply"]
    plan = ServicePlan("dynamo_backend", {"generate": "backend"})
    reading = read_stats_reply(recorded.encode(), plan, LIMIT)
    (counters,) = reading.counters
    assert (counters.component, counters.endpoint, counters.worker_id) == ("backend", "generate", 0x57A3121772825123)
    assert (counters.stats.num_requests, counters.stats.processing_time) == (0, 0)
    assert reading.readings == [] and reading.rejects == []
    entry = json.loads(recorded)["endpoints"][0]
    others = [
        {**entry, "name": "generate-57a3121772825123"},  # a 0.x name: its worker has no stats handler
        {**entry, "name": "dynamo_backend-generate-ff"},  # names another worker than its subject
        {**entry, "num_requests": -1},  # a 1.x entry, broken
    ]
    reply = json.dumps({**json.loads(recorded), "endpoints": others}).encode()
    assert [reject.reason for reject in read_stats_reply(reply, plan, LIMIT).rejects] == [
        rejects.NO_DATA, rejects.NO_DATA, "out_of_range"]
