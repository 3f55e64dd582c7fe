"""Messages the benchmark publishes: the same typed messages real workers send."""

from __future__ import annotations

import fleet_protocol as protocol
from fleet_protocol import ForwardPassMetrics, KvStats, LoadEvent, WorkerStats

SUBJECT = protocol.component_subject("dynamo", "backend", protocol.KV_METRICS)
# The bare ceiling runs on a namespace no aggregator listens to (same length, same payloads), so
# an aggregator left running between measurements neither competes for CPU nor counts its messages.
BARE_SUBJECT = protocol.component_subject("barens", "backend", protocol.KV_METRICS)
WORKER_ID_BASE = 1 << 62


def load_event(worker: int, active: int) -> bytes:
    return protocol.encode(LoadEvent(
        worker_id=WORKER_ID_BASE + worker,
        data=ForwardPassMetrics(
            WorkerStats(request_active_slots=active % 64, request_total_slots=64, num_requests_waiting=active % 7),
            KvStats(kv_active_blocks=active, kv_total_blocks=4096, gpu_cache_usage_perc=active / 4096,
                    gpu_prefix_cache_hit_rate=0.25),
        ),
    ))


def round_robin(workers: int, messages: int, marker: int, first: int = 0) -> list[bytes]:
    """`messages` LoadEvents cycling over `workers` (ids from `first`); each worker's last one carries `marker`."""
    ids = range(first, first + workers)
    variants = [[load_event(w, v) for v in (100, 200, 300)] for w in ids]
    out = [variants[i % workers][(i // workers) % 3] for i in range(messages - workers)]
    out += [load_event(w, marker) for w in ids]
    return out


def exposition_body(worker: int, active: int = 100) -> bytes:
    """The per-worker KV series as Prometheus text, as a Pushgateway client would push them."""
    lines = []
    values = {
        "llm_kv_blocks_active": active, "llm_kv_blocks_total": 4096, "llm_requests_active_slots": active % 64,
        "llm_requests_total_slots": 64, "llm_requests_waiting": active % 7,
        "llm_gpu_cache_usage_ratio": active / 4096, "llm_gpu_prefix_cache_hit_ratio": 0.25,
    }
    labels = f'component="backend",endpoint="generate",worker_id="{WORKER_ID_BASE + worker}",dp_rank="0"'
    for name, value in values.items():
        lines.append(f"# TYPE {name} gauge\n{name}{{{labels}}} {value}")
    return ("\n".join(lines) + "\n").encode()


def _component_registry():
    """A worker MetricsRegistry after some traffic: the automatic endpoint metrics."""
    from fleet_worker.endpoint_metrics import EndpointMetrics
    from fleet_worker.registry import MetricsRegistry

    runtime = MetricsRegistry()
    calls = EndpointMetrics(runtime.namespace("dynamo").component("backend").endpoint("generate"))
    for i in range(50):
        with calls.track(request_bytes=2048) as call:
            call.duration = 0.05 * (i % 20)
    return runtime


def snapshot_lines() -> int:
    """Sample lines in the component-metric snapshot every full worker sends."""
    return sum(len(family.samples) for family in _component_registry().families())


def full_worker_messages(workers: int, first: int = 0) -> list[tuple[str, bytes]]:
    """Every kind of message one worker sends: KV stats, a hit-rate event, one GPU, its component metrics."""
    import random

    from mock_worker.engine import EngineConfig, SimulatedEngine
    from mock_worker.gpus import SimulatedGpus

    families = _component_registry().families()  # as WorkerPublisher.publish_component_metrics sends them
    engine = SimulatedEngine(EngineConfig(), random.Random(1))
    for _ in range(20):
        engine.step(0.5)
    metrics = engine.metrics()
    gpus = SimulatedGpus(1, random.Random(1)).step(1.0, metrics)
    subject = {event: protocol.component_subject("dynamo", "backend", event)
               for event in (protocol.KV_HIT_RATE, protocol.GPU_METRICS, protocol.COMPONENT_METRICS)}
    out = []
    for w in range(first, first + workers):
        worker_id = WORKER_ID_BASE + w
        out.append((SUBJECT, load_event(w, 4000)))
        out.append((subject[protocol.KV_HIT_RATE], protocol.encode(protocol.KvHitRateEvent(worker_id, 40, 25))))
        out.append((subject[protocol.GPU_METRICS], protocol.encode(protocol.GpuMetricsEvent(
            worker_id=worker_id, hostname=f"node-{w // 8}", gpus=gpus, driver_version="570.133.20"))))
        out.append((subject[protocol.COMPONENT_METRICS], protocol.encode(protocol.MetricsSnapshot(
            worker_id=worker_id, families=families))))
    return out


# Dynamo 1.x: envelopes on the event plane ------------------------------------------------------

EVENT_SUBJECT = protocol.endpoint_event_subject("dynamo", "backend", "generate", protocol.KV_METRICS_TOPIC)
KV_EVENTS_SUBJECT = protocol.endpoint_event_subject("dynamo", "backend", "generate", protocol.KV_EVENTS_TOPIC)
FPM_SUBJECT = protocol.endpoint_event_subject("dynamo", "backend", "generate", protocol.FORWARD_PASS_METRICS_TOPIC)
# Same length as EVENT_SUBJECT, on a namespace no aggregator listens to (see BARE_SUBJECT).
BARE_EVENT_SUBJECT = protocol.endpoint_event_subject("barens", "backend", "generate", protocol.KV_METRICS_TOPIC)
PUBLISHER_BASE = 1 << 40  # publisher ids: one per worker and topic, below 2**53 as Dynamo's


def envelope(topic: str, publisher: int, sequence: int, payload: bytes) -> bytes:
    return protocol.encode_envelope(protocol.EventEnvelope(publisher, sequence, 1_700_000_000_000, topic, payload))


def active_load_round_robin(workers: int, messages: int, marker: int, first: int = 0,
                            first_sequence: int = 0) -> list[bytes]:
    """`round_robin` as a 1.6.1 worker sends it: ActiveLoad in an envelope, each worker its own publisher and
    sequence (from `first_sequence`: the same publishers again continue theirs, or their envelopes are
    duplicates); each worker's last one has kv_used_blocks = `marker`."""
    sequences = [first_sequence] * workers

    def one(index: int, used: int) -> bytes:
        worker = first + index
        sequence = sequences[index]
        sequences[index] += 1
        load = protocol.ActiveLoad(WORKER_ID_BASE + worker, 0, used // 2, None, used)
        return envelope(protocol.KV_METRICS_TOPIC, PUBLISHER_BASE + worker, sequence, protocol.encode_active_load(load))

    out = [one(i % workers, (100, 200, 300)[(i // workers) % 3]) for i in range(messages - workers)]
    out += [one(index, marker) for index in range(workers)]
    return out


def kv_event_batches(workers: int, batches: int, blocks: int, first: int = 0) -> list[bytes]:
    """`batches` kv-events messages cycling over `workers`: each stores `blocks` new blocks and, from a
    worker's second batch on, removes the `blocks` stored before (2 x blocks changes a batch, a steady cache)."""
    out = []
    for i in range(batches):
        index = i % workers
        round_ = i // workers
        worker = WORKER_ID_BASE + first + index
        base = round_ * blocks
        events = [protocol.RouterEvent(worker_id=worker, event=protocol.KvCacheEvent(
            2 * round_ + 1, protocol.KvEventData(stored=protocol.KvStored(None, None, [
                protocol.StoredBlock(base + b, base + b) for b in range(blocks)])), 0))]
        if round_:
            events.append(protocol.RouterEvent(worker_id=worker, event=protocol.KvCacheEvent(
                2 * round_ + 2, protocol.KvEventData(removed=protocol.KvRemoved(
                    list(range(base - blocks, base)))), 0)))
        out.append(envelope(protocol.KV_EVENTS_TOPIC, PUBLISHER_BASE + 2**20 + first + index, round_,
                            protocol.encode_kv_events(events)))
    return out


def tracked_worker_messages(workers: int, blocks: int, first: int = 0) -> list[tuple[str, bytes]]:
    """What a 1.x worker sends once it ran: its load, a forward pass, and `blocks` cached blocks (in batches)."""
    out = []
    per_batch = 1000
    for w in range(first, first + workers):
        worker = WORKER_ID_BASE + w
        out.append((EVENT_SUBJECT, envelope(protocol.KV_METRICS_TOPIC, PUBLISHER_BASE + w, 0, protocol.encode_active_load(
            protocol.ActiveLoad(worker, 0, 10, None, 20)))))
        out.append((FPM_SUBJECT, envelope(protocol.FORWARD_PASS_METRICS_TOPIC, PUBLISHER_BASE + 2**21 + w, 0,
                                          protocol.encode_forward_pass_v1(protocol.ForwardPassMetricsV1(
                                              version=1, worker_id=str(worker), counter_id=1, wall_time=0.02)))))
        for batch, start in enumerate(range(0, max(blocks, 1), per_batch)):
            hashes = range(start, min(start + per_batch, blocks)) if blocks else range(0)
            events = [protocol.RouterEvent(worker_id=worker, event=protocol.KvCacheEvent(
                batch + 1, protocol.KvEventData(stored=protocol.KvStored(None, None, [
                    protocol.StoredBlock(w * 2**32 + h, h) for h in hashes])), 0))]
            out.append((KV_EVENTS_SUBJECT, envelope(protocol.KV_EVENTS_TOPIC, PUBLISHER_BASE + 2**20 + w, batch,
                                                    protocol.encode_kv_events(events))))
    return out
