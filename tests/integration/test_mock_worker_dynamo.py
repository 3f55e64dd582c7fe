"""The mock worker's Dynamo 1.x protocol and the worker library under it, on a real nats-server and real ZMQ sockets.

What the library sends is captured by a plain nats-py subscriber or a pyzmq SUB socket
and read back with fleet_protocol's decoders: publisher ids and sequences as Dynamo's,
kv_metrics only on change, the forward-pass heartbeat, kv-event ids per source, the
file-backend entries (names, atomic writes, keep-alive, removal on a clean stop), and a
simulated fleet whose events agree with its engines step by step. Conformance with the
real runtime's bytes is in test_mock_dynamo_conformance.py.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

import fleet_protocol as protocol
from fleet_protocol import EventEnvelope
from fleet_worker.discovery_entries import ModelCardValues, WorkerEndpoint
from fleet_worker.event_plane_worker import EventPlaneWorker, NatsEventPlane, ZmqEventPlane
from fleet_worker.event_publisher import (
    MAX_PUBLISHER_ID,
    EventPublisher,
    NatsEventTransport,
    ZmqEventTransport,
)
from fleet_worker.file_kv_store import TEMP_FILE_PREFIX, FileKvStore
from fleet_worker.topic_publishers import ForwardPassPublisher, block_hash_u64
from mock_worker import cli as mock_worker_cli
from mock_worker.config import MockWorkerConfig
from mock_worker.dynamo_events import used_blocks
from mock_worker.engine import EngineConfig, SimulatedEngine
from mock_worker.fleet import MockFleet
from mock_worker.kv_blocks import DeviceBlocks

from ..support import NatsCapture, Process, capture_fixture, wait_until

LIMIT = 1 << 20
WAIT_S = 20.0
WORKER = WorkerEndpoint("dynamo", "backend", "generate", 0xABCDEF0123456789)
PREFIX = "namespace.dynamo.component.backend.endpoint.generate"
CARD = ModelCardValues("mock-llm", total_kv_blocks=4096, max_num_seqs=64, max_num_batched_tokens=8192,
                       data_parallel_size=2, kv_cache_block_size=16)


class Capture(NatsCapture):
    """The captured messages read as event-plane envelopes."""

    def events(self, topic: str | None = None) -> list[tuple[str, EventEnvelope]]:
        """The event-plane messages (of `topic`), decoded."""
        topics = protocol.EVENT_TOPICS if topic is None else (topic,)
        return [(subject, protocol.decode_envelope(data, LIMIT)) for subject, data in self.messages
                if subject.rsplit(".", 1)[-1] in topics and subject.count(".") == 6]

    async def wait_for_events(self, count: int) -> list[tuple[str, EventEnvelope]]:
        deadline = time.monotonic() + WAIT_S
        while len(found := self.events()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} event-plane messages after {WAIT_S}s")
            await asyncio.sleep(0.01)
        assert len(found) == count, f"{len(found)} event-plane messages, {count} published"
        return found


capture = capture_fixture(Capture)


@pytest.fixture
def zmq_context():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def payloads(found: list[tuple[str, EventEnvelope]], decode: Callable) -> list:
    return [decode(envelope.payload, LIMIT) for _, envelope in found]


# The library: publishers -------------------------------------------------------------------


async def test_each_publisher_has_its_own_id_and_a_sequence_from_zero(nc, capture):
    worker = EventPlaneWorker(WORKER, NatsEventPlane(nc), dp_ranks=range(2))
    before = time.time()
    await worker.load.publish(0, 1, 1)
    await worker.load.publish(1, 2, 2)
    await worker.forward_passes.publish(0, 0.01, protocol.ScheduledRequests(num_decode_requests=1),
                                        protocol.QueuedRequests())
    for rank in (0, 1):
        await worker.kv_events[rank].cleared()
    await worker.kv_events[0].stored([(1, 2)])
    await worker.kv_events[0].removed([1])
    await nc.flush()
    found = await capture.wait_for_events(7)
    by_publisher: dict[int, list[tuple[str, EventEnvelope]]] = {}
    for subject, envelope in found:
        by_publisher.setdefault(envelope.publisher_id, []).append((subject, envelope))
    ids = [publisher.publisher_id for publisher in worker.publishers]
    assert set(by_publisher) == set(ids) and len(ids) == 4  # kv_metrics, forward-pass-metrics, a kv-events per rank
    assert all(0 < publisher_id <= MAX_PUBLISHER_ID for publisher_id in ids)
    for publisher in worker.publishers:
        mine = by_publisher[publisher.publisher_id]
        assert [envelope.sequence for _, envelope in mine] == list(range(len(mine))) == list(range(publisher.sequence))
        assert {subject for subject, _ in mine} == {f"{PREFIX}.{publisher.topic}"}
        assert all(envelope.topic == publisher.topic for _, envelope in mine)
        assert all(before * 1000 - 1000 <= envelope.published_at <= time.time() * 1000 + 1000 for _, envelope in mine)
    worker.close()


def test_publisher_ids_are_random_and_53_bits():
    ids = {EventPublisher("kv_metrics", NatsEventTransport(None, PREFIX)).publisher_id  # type: ignore[arg-type]
           for _ in range(2000)}
    assert len(ids) == 2000
    assert all(0 < publisher_id < 2**53 for publisher_id in ids)
    assert max(ids) > 2**52  # drawn over the whole range, not a small counter
    with pytest.raises(ValueError):
        EventPublisher("kv_metrics", NatsEventTransport(None, PREFIX), publisher_id=2**53)  # type: ignore[arg-type]


async def test_load_is_sent_only_when_it_changes_per_rank(nc, capture):
    worker = EventPlaneWorker(WORKER, NatsEventPlane(nc), dp_ranks=range(2))
    calls = [(0, 5, 7), (0, 5, 7), (0, 5, 7), (1, 5, 7), (0, None, 7), (0, None, 7), (0, 5, 7), (1, 5, 7)]
    sent = [await worker.load.publish(*call) for call in calls]
    assert sent == [True, False, False, True, True, False, True, False]
    with pytest.raises(ValueError):
        await worker.load.publish(0, None, None)
    await nc.flush()
    found = await capture.wait_for_events(4)
    assert payloads(found, protocol.decode_active_load) == [
        protocol.ActiveLoad(WORKER.instance_id, rank, decode, None, used)
        for (rank, decode, used), was_sent in zip(calls, sent, strict=True) if was_sent]
    worker.close()


async def test_forward_passes_count_per_rank_and_an_idle_rank_gets_a_heartbeat_each_second(nc, capture):
    now = [100.0]
    events = EventPublisher(protocol.FORWARD_PASS_METRICS_TOPIC, NatsEventTransport(nc, PREFIX))
    passes = ForwardPassPublisher(events, 42, dp_ranks=(0, 1), clock=lambda: now[0])
    scheduled = protocol.ScheduledRequests(2, 300, 25.0, 100, 3, 900, 4.0)
    queued = protocol.QueuedRequests(1, 50, 0.0, 0, 0, 0.0)
    assert passes.due() == []  # idle from the start, but quiet for less than a second
    now[0] = 100.99
    assert await passes.send_due_heartbeats() == 0
    now[0] = 101.0
    assert await passes.send_due_heartbeats() == 2  # both ranks, one second after the start
    assert await passes.send_due_heartbeats() == 0  # and not again until a second later
    await passes.publish(0, 0.02, scheduled, queued)  # rank 0 runs a pass at 101.0
    now[0] = 102.5
    assert passes.due() == [1]  # a busy rank gets none, however long since its last message
    assert await passes.send_due_heartbeats() == 1
    passes.idle(0)  # rank 0 had nothing to run: quiet since 101.0, so a heartbeat is due at once
    assert passes.due() == [0]
    assert await passes.send_due_heartbeats() == 1
    now[0] = 103.49
    assert passes.due() == []
    now[0] = 103.5
    assert passes.due() == [0, 1]
    await nc.flush()
    found = await capture.wait_for_events(5)
    sent = payloads(found, protocol.decode_forward_pass_v1)

    def heartbeat(rank: int, counter: int) -> protocol.ForwardPassMetricsV1:
        return protocol.ForwardPassMetricsV1(version=1, worker_id="42", dp_rank=rank, counter_id=counter)

    assert sent == [heartbeat(0, 1), heartbeat(1, 1),
                    protocol.ForwardPassMetricsV1(1, "42", 0, 2, 0.02, scheduled, queued),
                    heartbeat(1, 2), heartbeat(0, 3)]
    assert [envelope.sequence for _, envelope in found] == [0, 1, 2, 3, 4]


async def test_kv_events_count_from_one_per_source_and_hashes_travel_as_u64(nc, capture):
    worker = EventPlaneWorker(WORKER, NatsEventPlane(nc), dp_ranks=range(2))
    zero, one = worker.kv_events[0], worker.kv_events[1]
    assert await zero.stored([(-5, 9), (2**63 - 1, 2**64 - 1)], parent_hash=-7) == 1
    assert await one.cleared() == 1
    assert await zero.removed([-5]) == 2
    assert await zero.cleared() == 3
    assert await one.stored([(10, 11)]) == 2
    await nc.flush()
    found = await capture.wait_for_events(5)
    batches = payloads(found, protocol.decode_kv_events)
    assert all(len(batch) == 1 for batch in batches)  # one RouterEvent per message, as 1.6.1 sends them
    events = [batch[0] for batch in batches]
    assert [(event.event.dp_rank, event.event.event_id, event.event.kind) for event in events] == [
        (0, 1, "stored"), (1, 1, "cleared"), (0, 2, "removed"), (0, 3, "cleared"), (1, 2, "stored")]
    assert all((event.worker_id, event.storage_tier, event.residency_domain) == (WORKER.instance_id, "device", "worker")
               for event in events)
    stored = events[0].event.data.stored
    assert stored.parent_hash == 2**64 - 7 and stored.start_position is None
    assert [(block.block_hash, block.tokens_hash) for block in stored.blocks] == [(2**64 - 5, 9),
                                                                                   (2**63 - 1, 2**64 - 1)]
    assert events[2].event.data.removed.block_hashes == [2**64 - 5]
    # each rank's events come from a publisher of its own
    assert len({envelope.publisher_id for _, envelope in found}) == 2
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError):
            block_hash_u64(bad)
    worker.close()


def drain(socket: zmq.Socket) -> list[list[bytes]]:
    received = []
    while socket.poll(100):
        received.append(socket.recv_multipart())
    return received


async def test_a_zmq_publisher_binds_loopback_and_sends_dynamos_four_frames(zmq_context):
    transport = ZmqEventTransport(zmq_context)
    assert transport.endpoint.startswith("tcp://127.0.0.1:") and int(transport.endpoint.rsplit(":", 1)[1]) > 0
    assert transport.channel() == protocol.ZmqTransport(protocol.ZmqConfig(transport.endpoint))
    publisher = EventPublisher(protocol.KV_METRICS_TOPIC, transport)
    load = protocol.encode_active_load(protocol.ActiveLoad(WORKER.instance_id, 0, 3, None, 3))
    subscriber = zmq_context.socket(zmq.SUB)
    try:
        subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        subscriber.connect(transport.endpoint)
        # PUB/SUB drops what is sent before the subscription arrives: send until one message comes through.
        for _ in range(200):
            await publisher.publish(load)
            if subscriber.poll(50):
                break
        else:
            raise AssertionError("no ZMQ message reached the subscriber")
        first = subscriber.recv_multipart()
        rest = drain(subscriber)
        envelopes = [protocol.decode_zmq_frames(frames, LIMIT).envelope for frames in [first, *rest]]
        sequences = [envelope.sequence for envelope in envelopes]
        assert sequences == list(range(sequences[0], publisher.sequence))  # no gap once subscribed
        sent = await publisher.publish(load)
        (frames,) = drain(subscriber)
    finally:
        subscriber.close(linger=0)
        publisher.close()
    assert frames == protocol.encode_zmq_frames(sent)
    assert frames[0] == b"kv_metrics" and frames[3][0] == protocol.ZMQ_FRAME_VERSION
    assert protocol.decode_active_load(sent.payload, LIMIT) == protocol.ActiveLoad(WORKER.instance_id, 0, 3, None, 3)
    with pytest.raises(ValueError):
        ZmqEventTransport(zmq_context, "0.0.0.0")  # nothing a subscriber could connect to


# The library: the file discovery backend -----------------------------------------------------


def files(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes()
            for path in (directory / "v1").glob("*/*") if path.is_file()} if (directory / "v1").exists() else {}


def decoded(directory: Path) -> dict[str, tuple[protocol.DiscoveryKey, protocol.DiscoveryEntry]]:
    """{key: (parsed key, entry)} of every file, decoded as a reader must (skipping temporary files)."""
    found = {}
    for path in sorted((directory / "v1").glob("*/*")):
        if not path.name.startswith(TEMP_FILE_PREFIX):
            key = protocol.key_of_file(path.parent.name, path.name)
            found[key] = protocol.decode_keyed_entry(key, path.read_bytes(), LIMIT)
    return found


def test_file_entries_are_dynamos_keys_and_decode_to_the_registration(tmp_path, zmq_context):
    worker = EventPlaneWorker(WORKER, ZmqEventPlane(zmq_context), dp_ranks=range(2), store=FileKvStore(tmp_path),
                              model=CARD)
    worker.register()
    entries = decoded(tmp_path)
    assert not [name for name in files(tmp_path) if TEMP_FILE_PREFIX in name]  # written whole, then renamed
    by_bucket: dict[str, list] = {}
    for key, (parsed, entry) in entries.items():
        by_bucket.setdefault(parsed.bucket, []).append((key, entry))
    ((key, instance),) = by_bucket["instances"]
    assert key == f"v1/instances/dynamo/backend/generate/{WORKER.instance_id:x}"
    assert (instance.namespace, instance.component, instance.endpoint, instance.instance_id) == (
        "dynamo", "backend", "generate", WORKER.instance_id)
    ((key, model),) = by_bucket["mdc"]
    assert key == f"v1/mdc/dynamo/backend/generate/{WORKER.instance_id:x}"
    assert model.card_json.runtime_config == protocol.RuntimeConfig(4096, 64, 8192, 0, 2, True)
    assert (model.card_json.display_name, model.card_json.kv_cache_block_size) == ("mock-llm", 16)
    channels = {entry.instance_id: entry for _, entry in by_bucket["event_channels"]}
    assert {publisher.publisher_id: publisher.topic for publisher in worker.publishers} == {
        publisher_id: entry.topic for publisher_id, entry in channels.items()}
    for publisher in worker.publishers:
        channel = channels[publisher.publisher_id]
        assert channel.scope == protocol.EventScope("endpoint", protocol.EndpointScope("dynamo", "backend", "generate"))
        assert channel.transport == protocol.ZmqTransport(protocol.ZmqConfig(publisher.transport.endpoint))
    sources = {entry.publisher_id: entry.metadata.worker for _, entry in by_bucket["event_sources"]}
    assert sources == {kv.events.publisher_id: protocol.SourceWorker(WORKER.instance_id, rank)
                       for rank, kv in worker.kv_events.items()}
    worker.close()
    assert files(tmp_path) == {}  # a clean stop deletes every entry at once


def test_keep_alive_touches_every_entry_and_writes_back_one_deleted(tmp_path):
    store = FileKvStore(tmp_path)
    written = [store.put(f"v1/instances/dynamo/backend/generate/{n:x}", f'{{"n":{n}}}'.encode()) for n in (1, 2)]
    hour_ago = time.time() - 3600
    for path in written:
        os.utime(path, (hour_ago, hour_ago))
    written[1].unlink()  # as a Dynamo process does with an entry whose keep-alive stopped
    before = time.time()
    store.keep_alive()
    assert all(path.stat().st_mtime >= before - 1 for path in written)
    assert [path.read_bytes() for path in written] == [b'{"n":1}', b'{"n":2}']
    store.delete("v1/instances/dynamo/backend/generate/1")
    store.keep_alive()
    assert not written[0].exists()  # deleted on purpose: not written back
    store.close()
    assert files(tmp_path) == {}
    with pytest.raises(ValueError):
        store.path_of("instances/x")


async def test_the_keep_alive_loop_refreshes_until_stopped(tmp_path):
    store = FileKvStore(tmp_path)
    path = store.put("v1/mdc/dynamo/backend/generate/1", b"{}")
    hour_ago = time.time() - 3600
    os.utime(path, (hour_ago, hour_ago))
    stop = asyncio.Event()
    loop = asyncio.ensure_future(store.run_keep_alive(stop, period=0.05))
    deadline = time.monotonic() + WAIT_S
    while path.stat().st_mtime < hour_ago + 60:
        assert time.monotonic() < deadline, "never refreshed"
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(loop, WAIT_S)
    store.close()


# The mock fleet -----------------------------------------------------------------------------


@pytest.mark.parametrize("config", [EngineConfig(), EngineConfig(total_blocks=600, mean_arrival_rate=20)],
                         ids=["roomy", "full"])
def test_an_engines_block_changes_replayed_give_its_blocks_in_use_up_to_capacity(config):
    engine = SimulatedEngine(config, random.Random(7))
    blocks = DeviceBlocks(config.total_blocks)
    replayed: set[int] = set()
    over_capacity = 0
    for _ in range(600):
        engine.step(1.0)
        changes = blocks.update(engine)
        assert set(changes.removed) <= replayed
        replayed.difference_update(changes.removed)
        for run in changes.stored:
            assert not replayed & set(run.block_hashes)  # never stored twice
            replayed.update(run.block_hashes)
        assert replayed == blocks.resident
        assert len(replayed) == used_blocks(engine) == min(engine.active_blocks(), config.total_blocks)
        over_capacity += engine.active_blocks() > config.total_blocks
    assert (over_capacity > 0) == (config.total_blocks == 600)  # the full engine did run out of blocks




def apply(blocks: set[int], event: protocol.RouterEvent) -> None:
    data = event.event.data
    if isinstance(data, str):
        blocks.clear()
    elif data.stored is not None:
        blocks.update(block.block_hash for block in data.stored.blocks)
    else:
        blocks.difference_update(data.removed.block_hashes)


def published(fleet: MockFleet) -> int:
    return sum(publisher.sequence for worker in fleet.workers
               for publisher in worker.events.publisher.publishers)


async def test_the_fleets_events_follow_its_engines_step_by_step(nc, capture):
    fleet = MockFleet(nc, workers=2, seed=3, dp_ranks=2, protocol="dynamo-1", component_metrics=False)
    await fleet.start()
    blocks: dict[tuple[int, int], set[int]] = {}
    loads: dict[tuple[int, int], int] = {}
    event_ids: dict[tuple[int, int], list[int]] = {}
    seen = 0
    prefill = {}
    try:
        for _ in range(60):
            await fleet.tick(1.0)
            await nc.flush()
            found = await capture.wait_for_events(published(fleet))
            for _, envelope in found[seen:]:
                if envelope.topic == protocol.KV_EVENTS_TOPIC:
                    for event in protocol.decode_kv_events(envelope.payload, LIMIT):
                        source = (event.worker_id, event.event.dp_rank)
                        apply(blocks.setdefault(source, set()), event)
                        event_ids.setdefault(source, []).append(event.event.event_id)
                        if event.event.event_id == 1:
                            assert event.event.kind == "cleared"  # each source starts from a known empty cache
                elif envelope.topic == protocol.KV_METRICS_TOPIC:
                    load = protocol.decode_active_load(envelope.payload, LIMIT)
                    source = (load.worker_id, load.dp_rank)
                    assert loads.get(source) != load.kv_used_blocks  # sent on change only
                    assert load.active_decode_blocks == load.kv_used_blocks
                    loads[source] = load.kv_used_blocks
                else:
                    passes = protocol.decode_forward_pass_v1(envelope.payload, LIMIT)
                    engine = next(w for w in fleet.workers if w.worker_id == passes.worker).engines[passes.dp_rank]
                    scheduled, queued = passes.scheduled_requests, passes.queued_requests
                    # this step's pass: the batch the engine holds now, what waits now
                    assert scheduled.num_prefill_requests + scheduled.num_decode_requests == len(engine.running)
                    assert queued.num_prefill_requests == len(engine.waiting)
                    assert passes.wall_time > 0
                    totals = prefill.setdefault((passes.worker, passes.dp_rank), [0, 0])
                    totals[0] += scheduled.sum_prefill_tokens
                    totals[1] += scheduled.sum_prefill_kv_tokens
            seen = len(found)
            for worker in fleet.workers:
                for rank, engine in enumerate(worker.engines):
                    source = (worker.worker_id, rank)
                    # what a consumer counts from the events is the load of the same step
                    assert len(blocks[source]) == loads.get(source, 0) == used_blocks(engine)
                    assert used_blocks(engine) == engine.metrics().kv_stats.kv_active_blocks
    finally:
        fleet.close()
    assert set(blocks) == {(worker.worker_id, rank) for worker in fleet.workers for rank in range(2)}
    assert all(ids == list(range(1, len(ids) + 1)) for ids in event_ids.values())
    assert max(len(ids) for ids in event_ids.values()) > 50
    for worker in fleet.workers:
        for rank, engine in enumerate(worker.engines):
            computed, cached = prefill[(worker.worker_id, rank)]
            assert (computed, cached) == (engine.prefill_tokens_computed, engine.prefill_tokens_cached)
            assert 0 < cached < computed  # prefixes get reused: a hit rate exists
    assert max(loads.values()) > 0
    # Dynamo 1.x has no hit-rate events and no JSON LoadEvent
    legacy = ("kv-hit-rate", "component.backend.kv_metrics")
    assert not [subject for subject, _ in capture.messages if subject.endswith(legacy)]


async def test_gpu_readings_and_metric_snapshots_stay_as_they_are_in_dynamo_1(nc, capture):
    fleet = MockFleet(nc, workers=2, seed=2, protocol="dynamo-1", gpu="simulated")
    await fleet.start()
    try:
        await fleet.tick(1.0)
        await fleet.gpu_tick(1.0)
        await fleet.publish_component_metrics()
        await nc.flush()
        await capture.wait_for_events(published(fleet))
        deadline = time.monotonic() + WAIT_S
        while len([s for s, _ in capture.messages if not s.endswith(protocol.EVENT_TOPICS)]) < 4:
            assert time.monotonic() < deadline, "no GPU readings or snapshots"
            await asyncio.sleep(0.01)
    finally:
        fleet.close()
    own = {subject: data for subject, data in capture.messages if not subject.endswith(protocol.EVENT_TOPICS)}
    gpus = [protocol.decode_gpu_metrics(data, LIMIT) for subject, data in capture.messages
            if subject == "namespace.dynamo.component.backend.gpu_metrics"]
    snapshots = [protocol.decode_metrics_snapshot(data, LIMIT) for subject, data in capture.messages
                 if subject == "namespace.dynamo.component.backend.metrics"]
    assert set(own) == {"namespace.dynamo.component.backend.gpu_metrics", "namespace.dynamo.component.backend.metrics"}
    workers = {worker.worker_id for worker in fleet.workers}
    assert {event.worker_id for event in gpus} == workers == {snapshot.worker_id for snapshot in snapshots}


async def test_a_frozen_fleet_runs_no_passes_and_leaves_its_ranks_to_the_heartbeat(nc, capture):
    fleet = MockFleet(nc, workers=1, seed=5, protocol="dynamo-1", freeze_after=3, component_metrics=False)
    await fleet.start()
    passes = fleet.workers[0].events.publisher.forward_passes
    try:
        for _ in range(3):
            await fleet.tick(1.0)
        assert passes.counters[0] == 3 and passes.idle_ranks == set()
        for _ in range(3):
            await fleet.tick(1.0)
        assert passes.counters[0] == 3 and passes.idle_ranks == {0}  # held still: no pass, heartbeats due
        await nc.flush()
        found = await capture.wait_for_events(published(fleet))
    finally:
        fleet.close()
    sent = [protocol.decode_forward_pass_v1(envelope.payload, LIMIT) for _, envelope in found
            if envelope.topic == protocol.FORWARD_PASS_METRICS_TOPIC]
    assert [metrics.counter_id for metrics in sent] == [1, 2, 3]
    assert all(metrics.wall_time > 0 for metrics in sent)


async def test_the_fleet_over_zmq_is_found_through_discovery_and_leaves_nothing(nc, tmp_path):
    fleet = MockFleet(nc, workers=2, seed=4, protocol="dynamo-1", event_plane="zmq",
                      discovery_file_kv=str(tmp_path), component_metrics=False)
    await fleet.start()
    context = zmq.Context()
    sockets: dict[int, zmq.Socket] = {}
    try:
        entries = decoded(tmp_path)
        instances = {entry.instance_id for _, entry in entries.values() if isinstance(entry, protocol.InstanceEntry)}
        assert instances == {worker.worker_id for worker in fleet.workers}
        cards = [entry.card_json for _, entry in entries.values() if isinstance(entry, protocol.ModelEntry)]
        assert [card.runtime_config for card in cards] == [protocol.RuntimeConfig(4096, 64, 8192, 0, 1, True)] * 2
        channels = [entry for _, entry in entries.values() if isinstance(entry, protocol.EventChannelEntry)]
        assert len(channels) == 2 * 3
        for channel in channels:
            assert isinstance(channel.transport, protocol.ZmqTransport)
            assert channel.transport.config.endpoint.startswith("tcp://127.0.0.1:")
            socket = sockets[channel.instance_id] = context.socket(zmq.SUB)
            socket.setsockopt(zmq.SUBSCRIBE, b"")
            socket.connect(channel.transport.config.endpoint)
        # Subscriptions arrive after a while: step until every load and pass publisher has been heard.
        heard: dict[int, list[protocol.ZmqEvent]] = {}
        busy = [channel.instance_id for channel in channels if channel.topic != protocol.KV_EVENTS_TOPIC]
        for _ in range(200):
            await fleet.tick(1.0)
            for publisher_id, socket in sockets.items():
                while socket.poll(0):
                    heard.setdefault(publisher_id, []).append(protocol.decode_zmq_frames(socket.recv_multipart(),
                                                                                         LIMIT))
            if all(heard.get(publisher_id) for publisher_id in busy):
                break
        else:
            raise AssertionError("not every ZMQ publisher reached its subscriber")
        marks = {publisher_id: len(events) for publisher_id, events in heard.items()}
        for _ in range(10):
            await fleet.tick(1.0)
        for publisher_id, socket in sockets.items():
            while socket.poll(200):
                heard.setdefault(publisher_id, []).append(protocol.decode_zmq_frames(socket.recv_multipart(), LIMIT))
        for publisher_id in busy:
            events = heard[publisher_id]
            sequences = [event.sequence for event in events]
            assert sequences == list(range(sequences[0], sequences[0] + len(events)))  # once subscribed, no gap
            assert len(events) > marks[publisher_id]
        for worker in fleet.workers:  # the last load heard is the engine's (sent on change: nothing newer)
            (last,) = [protocol.decode_active_load(heard[publisher.publisher_id][-1].envelope.payload, LIMIT)
                       for publisher in [worker.events.publisher.load.events]]
            assert (last.worker_id, last.kv_used_blocks) == (worker.worker_id, used_blocks(worker.engines[0]))
    finally:
        for socket in sockets.values():
            socket.close(linger=0)
        context.term()
        fleet.close()
    assert files(tmp_path) == {}


# The mock worker process ---------------------------------------------------------------------


@pytest.fixture
def mock_workers():
    started: list[Process] = []

    def start(nats_url: str, *args: str, env: dict | None = None) -> Process:
        process = Process([sys.executable, "-m", "mock_worker", "--nats-url", nats_url, "--gpu", "none", *args],
                          env=env)
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()


def test_the_process_publishes_over_zmq_and_a_clean_stop_removes_its_entries(nats_server, mock_workers, tmp_path):
    worker = mock_workers(nats_server.url, "--protocol", "dynamo-1", "--event-plane", "zmq", "--discovery-file-kv",
                          str(tmp_path), "--workers", "2", "--interval", "0.1", "--seed", "1")
    entries = wait_until(lambda: (found := decoded(tmp_path)) and len(found) == 2 * (1 + 1 + 3 + 1) and found,
                         WAIT_S, what=f"the mock worker's discovery entries\n{worker.output()}")
    instances = {entry.instance_id for _, entry in entries.values() if isinstance(entry, protocol.InstanceEntry)}
    loads = [entry for _, entry in entries.values()
             if isinstance(entry, protocol.EventChannelEntry) and entry.topic == protocol.KV_METRICS_TOPIC]
    context = zmq.Context()
    try:
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        for channel in loads:
            socket.connect(channel.transport.config.endpoint)
        got = set()
        deadline = time.monotonic() + WAIT_S
        while got != instances:
            assert time.monotonic() < deadline, f"loads from {len(got)} of 2 workers\n{worker.output()}"
            if socket.poll(100):
                event = protocol.decode_zmq_frames(socket.recv_multipart(), LIMIT)
                got.add(protocol.decode_active_load(event.envelope.payload, LIMIT).worker_id)
        socket.close(linger=0)
    finally:
        context.term()
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(WAIT_S) == 0, worker.output()
    assert files(tmp_path) == {}


async def test_the_process_configured_by_dynamos_variables_heartbeats_when_idle(nats_server, mock_workers, capture):
    env = {"MOCK_WORKER_PROTOCOL": "dynamo-1", "DYN_EVENT_PLANE": "nats", "DYN_FILE_KV": ""}
    mock_workers(nats_server.url, "--workers", "1", "--interval", "0.1", "--freeze-after", "3", env=env)
    deadline = time.monotonic() + WAIT_S
    while len(heartbeats := [envelope for _, envelope in capture.events(protocol.FORWARD_PASS_METRICS_TOPIC)
                             if protocol.decode_forward_pass_v1(envelope.payload, LIMIT).wall_time == 0]) < 3:
        assert time.monotonic() < deadline, "fewer than 3 heartbeats"
        await asyncio.sleep(0.05)
    counters = [protocol.decode_forward_pass_v1(envelope.payload, LIMIT).counter_id for envelope in heartbeats]
    assert counters == list(range(counters[0], counters[0] + len(counters)))  # frozen: nothing but heartbeats
    gaps = [later.published_at - earlier.published_at for earlier, later in itertools.pairwise(heartbeats)]
    assert all(gap >= 900 for gap in gaps)  # ms: one a second, not one a check


# Configuration ------------------------------------------------------------------------------

DYNAMO_ENV = ("MOCK_WORKER_PROTOCOL", "DYN_EVENT_PLANE", "DYN_EVENT_PLANE_HOST", "DYN_FILE_KV")


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*DYNAMO_ENV, *(flag.env for flag in mock_worker_cli.FLAGS if flag.env)):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_dynamo_1_on_nats_is_the_default_and_dynamos_variables_set_the_rest(clean_env):
    default = mock_worker_cli.parse_config([])
    assert (default.protocol, default.event_plane, default.discovery_file_kv, default.mode) == (
        "dynamo-1", "nats", None, "push")
    assert mock_worker_cli.parse_config(["--protocol", "legacy"]).protocol == "legacy"
    legacy = mock_worker_cli.parse_config(["--protocol", "legacy", "--mode", "pull", "--shape", "flat",
                                           "--hit-rate-on-namespace"])
    assert (legacy.mode, legacy.shape, legacy.hit_rate_on_namespace) == ("pull", "flat", True)
    clean_env.setenv("MOCK_WORKER_PROTOCOL", "legacy")
    assert mock_worker_cli.parse_config(["--mode", "pull"]).protocol == "legacy"
    clean_env.setenv("MOCK_WORKER_PROTOCOL", "dynamo-1")
    clean_env.setenv("DYN_EVENT_PLANE", "zmq")
    clean_env.setenv("DYN_EVENT_PLANE_HOST", "127.0.0.2")
    clean_env.setenv("DYN_FILE_KV", "/var/lib/dynamo")
    config = mock_worker_cli.parse_config([])
    assert (config.protocol, config.event_plane, config.event_plane_host, config.discovery_file_kv) == (
        "dynamo-1", "zmq", "127.0.0.2", "/var/lib/dynamo")
    assert mock_worker_cli.parse_config(["--event-plane", "nats", "--discovery-file-kv", ""]).discovery_file_kv is None


@pytest.mark.parametrize("argv,line", [
    (["--protocol", "dynamo-2"], "argument --protocol: 'dynamo-2' is not one of dynamo-1, legacy "
                                 "(env MOCK_WORKER_PROTOCOL)"),
    (["--protocol", "dynamo-1", "--event-plane", "zmq"],
     "argument --event-plane: ZMQ publishers are found through discovery: set --discovery-file-kv "
     "(env DYN_EVENT_PLANE)"),
    (["--protocol", "dynamo-1", "--mode", "pull"],
     "argument --mode: pull mode serves Dynamo 0.x's stats data: it belongs to the legacy protocol, not to "
     "--protocol dynamo-1 (env MOCK_WORKER_MODE)"),
    # The default protocol is dynamo-1: the legacy-only settings need --protocol legacy said.
    (["--mode", "pull"],
     "argument --mode: pull mode serves Dynamo 0.x's stats data: it belongs to the legacy protocol, not to "
     "--protocol dynamo-1 (env MOCK_WORKER_MODE)"),
    (["--shape", "wrapped"],
     "argument --shape: the ForwardPassMetrics shape belongs to the legacy protocol, not to --protocol dynamo-1"),
    (["--protocol", "dynamo-1", "--shape", "flat"],
     "argument --shape: the ForwardPassMetrics shape belongs to the legacy protocol, not to --protocol dynamo-1"),
    (["--protocol", "dynamo-1", "--hit-rate-on-namespace"],
     "argument --hit-rate-on-namespace: Dynamo 1.x has no hit-rate events: this belongs to the legacy protocol, "
     "not to --protocol dynamo-1"),
    (["--event-plane-host", "0.0.0.0"], "argument --event-plane-host: 0.0.0.0 cannot be advertised: give the "
                                        "address subscribers connect to (env DYN_EVENT_PLANE_HOST)"),
    (["--protocol", "dynamo-1", "--discovery-file-kv", "/d", "--endpoint", "a/b"],
     "argument --endpoint: a '/' would make its discovery keys ambiguous (Dynamo writes the name raw into "
     "v1/instances/{ns}/{c}/{e}/...) (env MOCK_WORKER_ENDPOINT)"),
])
def test_a_bad_dynamo_setting_is_one_line(clean_env, capsys, argv, line):
    with pytest.raises(SystemExit) as exit_:
        mock_worker_cli.parse_config(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"mock_worker: error: {line}\n"


def test_legacy_ignores_the_event_plane_settings():
    # Dynamo's own variables may be exported for real workers beside a legacy mock: not an error.
    config = MockWorkerConfig(protocol="legacy", event_plane="zmq", discovery_file_kv="/d", mode="pull",
                              shape="flat")
    assert (config.protocol, config.mode, config.shape) == ("legacy", "pull", "flat")
