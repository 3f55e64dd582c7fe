"""The mock worker speaks Dynamo 1.x as the real runtime does (ai-dynamo-runtime 1.6.1, the `dynamo` test extra).

A real worker (tests/dynamo_worker.py) and the worker library (what the mock publishes
through) are given the same values, with the same worker id; a plain nats-py subscriber
and a pyzmq SUB socket capture both. The payloads must be the same bytes, and our
envelope (or our ZMQ frames) the runtime's once its publisher id, sequence and time are
put in. The discovery entries each writes in a file-backend directory must have the same
file names and the same bytes once ids and addresses are put in, and decode to the same
structures; both delete them on a clean stop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

import fleet_protocol as protocol
from fleet_protocol import EventEnvelope
from fleet_worker.discovery_entries import ModelCardValues, WorkerEndpoint
from fleet_worker.event_plane_worker import EventPlaneWorker, NatsEventPlane, ZmqEventPlane
from fleet_worker.event_publisher import EventPublisher, NatsEventTransport, ZmqEventTransport
from fleet_worker.file_kv_store import FileKvStore
from fleet_worker.topic_publishers import (
    ActiveLoadPublisher,
    ForwardPassPublisher,
    KvEventPublisher,
    removed_data,
    stored_data,
)
from mock_worker.dynamo_events import MODEL_NAME, model_card
from mock_worker.engine import EngineConfig
from mock_worker.fleet import MockFleet

from ..dynamo_runtime import DynamoWorker
from ..support import NatsCapture, capture_fixture, in_thread, wait_until

pytest.importorskip("dynamo.llm", reason="the `dynamo` test extra (ai-dynamo-runtime) is not installed")
zmq = pytest.importorskip("zmq", reason="pyzmq (the `worker` extra) is not installed")

LIMIT = 1 << 20
WAIT_S = 20.0
PREFIX = "namespace.dynamo.component.backend.endpoint.generate"


class Capture(NatsCapture):
    """The captured messages read as event-plane envelopes."""

    def of(self, topic: str, *, only: set[int] | None = None,
           besides: set[int] | None = None) -> list[tuple[str, EventEnvelope, bytes]]:
        """(subject, envelope, raw bytes) of `topic`: from the publishers `only`, or from all `besides` some."""
        found = []
        for subject, data in self.messages:
            if subject.endswith("." + topic):
                envelope = protocol.decode_envelope(data, LIMIT)
                if (only is None or envelope.publisher_id in only) and envelope.publisher_id not in (besides or ()):
                    found.append((subject, envelope, data))
        return found

    async def wait_for(self, topic: str, count: int, **which: set[int]) -> list[tuple[str, EventEnvelope, bytes]]:
        deadline = time.monotonic() + WAIT_S
        while len(found := self.of(topic, **which)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} {topic} messages after {WAIT_S}s")
            await asyncio.sleep(0.02)
        return found


capture = capture_fixture(Capture)


def same_envelope(ours: EventEnvelope, ours_raw: bytes, theirs: EventEnvelope) -> None:
    """Their envelope with our publisher id, sequence and time is our message, byte for byte."""
    assert ours.payload == theirs.payload
    assert protocol.encode_envelope(msgspec.structs.replace(
        theirs, publisher_id=ours.publisher_id, sequence=ours.sequence, published_at=ours.published_at)) == ours_raw


# The event plane on NATS ---------------------------------------------------------------------


async def test_on_nats_our_messages_are_the_runtimes_for_the_same_values(
        nats_server, nc, capture, dynamo_workers, tmp_path):
    real = await in_thread(dynamo_workers, nats_url=nats_server.url, file_kv=str(tmp_path), block_size=4)
    now = [1000.0]

    def publisher(topic: str) -> EventPublisher:
        return EventPublisher(topic, NatsEventTransport(nc, PREFIX))

    load = ActiveLoadPublisher(publisher(protocol.KV_METRICS_TOPIC), real.worker_id)
    passes = ForwardPassPublisher(publisher(protocol.FORWARD_PASS_METRICS_TOPIC), real.worker_id, (0,),
                                  clock=lambda: now[0])
    kv = {rank: KvEventPublisher(publisher(protocol.KV_EVENTS_TOPIC), real.worker_id, rank) for rank in (0, 1, 2)}
    ours = {p.events.publisher_id for p in (load, passes, *kv.values())}

    # kv_metrics: the same calls, unchanged repeats included
    calls = [(0, 5, 7), (0, 5, 7), (0, 5, 7), (0, None, 2**40), (3, 0, 0)]
    changes = 0
    for rank, decode, used in calls:
        await in_thread(real.command, "load", dp_rank=rank, active_decode_blocks=decode, kv_used_blocks=used)
        if await load.publish(rank, decode, used):
            # the runtime keeps only the last of changes less than 1 ms apart: one at a time
            changes += 1
            await capture.wait_for(protocol.KV_METRICS_TOPIC, changes, besides=ours)
    theirs = await capture.wait_for(protocol.KV_METRICS_TOPIC, 3, besides=ours)
    mine = await capture.wait_for(protocol.KV_METRICS_TOPIC, 3, only=ours)
    await asyncio.sleep(0.2)  # a fourth message of either would show now
    assert len(capture.of(protocol.KV_METRICS_TOPIC)) == 6  # 3 + 3: only the changes
    assert sorted(envelope.sequence for _, envelope, _ in mine) == [0, 1, 2]
    by_payload = {envelope.payload: envelope for _, envelope, _ in theirs}
    assert len(by_payload) == 3
    for subject, envelope, raw in mine:
        assert subject == f"{PREFIX}.kv_metrics"
        same_envelope(envelope, raw, by_payload[envelope.payload])

    # forward-pass-metrics: one pass, then the idle heartbeat
    fields = {"scheduled_num_prefill_requests": 1, "scheduled_sum_prefill_tokens": 100,
              "scheduled_sum_prefill_kv_tokens": 50, "scheduled_num_decode_requests": 2,
              "scheduled_sum_decode_kv_tokens": 300, "queued_num_prefill_requests": 3,
              "queued_sum_prefill_tokens": 400, "queued_num_decode_requests": 4, "queued_sum_decode_kv_tokens": 500,
              "wall_time_secs": 0.25}
    await in_thread(real.command, "fpm", worker_id=str(real.worker_id), dp_rank=0, **fields)
    await passes.publish(0, 0.25, protocol.ScheduledRequests(1, 100, 0.0, 50, 2, 300, 0.0),
                         protocol.QueuedRequests(3, 400, 0.0, 4, 500, 0.0))
    passes.idle(0)
    now[0] += 1.0
    assert await passes.send_due_heartbeats() == 1
    theirs = (await capture.wait_for(protocol.FORWARD_PASS_METRICS_TOPIC, 2, besides=ours))[:2]
    mine = await capture.wait_for(protocol.FORWARD_PASS_METRICS_TOPIC, 2, only=ours)
    for (subject, envelope, raw), (their_subject, their_envelope, _) in zip(mine, theirs, strict=True):
        assert subject == their_subject == f"{PREFIX}.forward-pass-metrics"
        same_envelope(envelope, raw, their_envelope)
    assert protocol.decode_forward_pass_v1(mine[1][1].payload, LIMIT).counter_id == 2  # the heartbeat counts

    # kv-events: stored, removed (the Python API, dp_rank 0); stored, cleared (an engine's relay, dp_rank 1)
    await in_thread(real.command, "kv_stored", dp_rank=0, token_ids=list(range(8)), num_block_tokens=[4, 4],
                    block_hashes=[-5, 2**63 - 1], parent_hash=-7)
    await in_thread(real.command, "kv_removed", dp_rank=0, block_hashes=[-5])
    await in_thread(real.command, "engine_kv", dp_rank=1, seq=0,
                    events=[["BlockStored", [10, 11], None, list(range(8)), 4, None, "GPU"]])
    await in_thread(real.command, "engine_kv", dp_rank=1, seq=1, events=[["AllBlocksCleared"]])
    # an engine's batch (dp_rank 2) travels as one message, as the mock sends a step's changes
    await in_thread(real.command, "engine_kv", dp_rank=2, seq=0, events=[
        ["BlockStored", [40, 41], None, list(range(8)), 4, None, "GPU"],
        ["BlockStored", [50], 5, list(range(4)), 4, None, "GPU"], ["BlockRemoved", [40], "GPU"]])
    theirs = {}
    for _, envelope, _ in await capture.wait_for(protocol.KV_EVENTS_TOPIC, 5, besides=ours):
        batch = protocol.decode_kv_events(envelope.payload, LIMIT)
        theirs[tuple((event.event.dp_rank, event.event.event_id) for event in batch)] = (envelope, batch)
    assert sorted(theirs) == [((0, 1),), ((0, 2),), ((1, 1),), ((1, 2),), ((2, 1), (2, 2), (2, 3))]
    # tokens_hash is the runtime's own hash of the block's tokens: taken from what it sent
    tokens = {(event.event.dp_rank, block.block_hash): block.tokens_hash for _, batch in theirs.values()
              for event in batch if event.event.kind == "stored" for block in event.event.data.stored.blocks}
    await kv[0].stored([(-5, tokens[(0, 2**64 - 5)]), (2**63 - 1, tokens[(0, 2**63 - 1)])], parent_hash=-7)
    await kv[0].removed([-5])
    await kv[1].stored([(10, tokens[(1, 10)]), (11, tokens[(1, 11)])])
    await kv[1].cleared()
    assert await kv[2].publish(stored_data([(40, tokens[(2, 40)]), (41, tokens[(2, 41)])]),
                               stored_data([(50, tokens[(2, 50)])], parent_hash=5), removed_data([40])) == [1, 2, 3]
    mine = await capture.wait_for(protocol.KV_EVENTS_TOPIC, 5, only=ours)
    keys = []
    for subject, envelope, raw in mine:
        key = tuple((event.event.dp_rank, event.event.event_id)
                    for event in protocol.decode_kv_events(envelope.payload, LIMIT))
        keys.append(key)
        assert subject == f"{PREFIX}.kv-events"
        same_envelope(envelope, raw, theirs[key][0])
    assert keys == [((0, 1),), ((0, 2),), ((1, 1),), ((1, 2),), ((2, 1), (2, 2), (2, 3))]
    for publisher in (load, passes, *kv.values()):
        publisher.events.close()


# The event plane on ZMQ (Dynamo's default) -----------------------------------------------------


def file_entries(directory: Path) -> dict[str, tuple[protocol.DiscoveryKey, protocol.DiscoveryEntry, bytes]]:
    """{file path under directory: (parsed key, entry, raw bytes)}, decoded as a reader must."""
    found = {}
    for path in sorted((directory / "v1").glob("*/*")):
        key = protocol.key_of_file(path.parent.name, path.name)
        parsed, entry = protocol.decode_keyed_entry(key, path.read_bytes(), LIMIT)
        found[path.relative_to(directory).as_posix()] = (parsed, entry, path.read_bytes())
    return found


def test_on_zmq_our_frames_and_channel_entry_are_the_runtimes(dynamo_workers, tmp_path):
    real = dynamo_workers(file_kv=str(tmp_path / "real"), event_plane=None)
    real.command("load", dp_rank=0, kv_used_blocks=1)
    ((their_channel, their_raw),) = [(entry, raw) for parsed, entry, raw in file_entries(tmp_path / "real").values()
                                     if isinstance(entry, protocol.EventChannelEntry)]
    assert isinstance(their_channel.transport, protocol.ZmqTransport)
    context = zmq.Context()
    ours = EventPlaneWorker(WorkerEndpoint("dynamo", "backend", "generate", real.worker_id),
                            ZmqEventPlane(context), store=FileKvStore(tmp_path / "ours"))
    subscriber = context.socket(zmq.SUB)
    try:
        subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        subscriber.connect(their_channel.transport.config.endpoint)
        transport = ours.load.events.transport
        assert isinstance(transport, ZmqEventTransport)
        subscriber.connect(transport.endpoint)
        # PUB/SUB drops what is sent before the subscription arrives: publish changes until both are heard
        heard: set[int] = set()
        for used in range(2, 400):
            if their_channel.instance_id not in heard:
                real.command("load", dp_rank=0, kv_used_blocks=used)
            if ours.load.events.publisher_id not in heard:
                asyncio.run(ours.load.publish(0, None, used))
            while subscriber.poll(50):
                heard.add(protocol.decode_zmq_frames(subscriber.recv_multipart(), LIMIT).publisher_id)
            if len(heard) == 2:
                break
        else:
            raise AssertionError(f"heard {len(heard)} of 2 ZMQ publishers")
        while subscriber.poll(200):
            subscriber.recv_multipart()
        real.command("load", dp_rank=0, active_decode_blocks=3, kv_used_blocks=1000)
        asyncio.run(ours.load.publish(0, 3, 1000))
        received = {}
        while len(received) < 2 and subscriber.poll(int(WAIT_S * 1000)):
            frames = subscriber.recv_multipart()
            received[protocol.decode_zmq_frames(frames, LIMIT).publisher_id] = frames
        mine = received[ours.load.events.publisher_id]
        theirs = protocol.decode_zmq_frames(received[their_channel.instance_id], LIMIT)
        ours.register()
        (our_raw,) = [raw for _, entry, raw in file_entries(tmp_path / "ours").values()
                      if isinstance(entry, protocol.EventChannelEntry) and entry.topic == protocol.KV_METRICS_TOPIC]
    finally:
        subscriber.close(linger=0)
        ours.close()
        context.term()
    event = protocol.decode_zmq_frames(mine, LIMIT)
    assert protocol.decode_active_load(event.envelope.payload, LIMIT) == protocol.ActiveLoad(
        real.worker_id, 0, 3, None, 1000)
    assert mine == protocol.encode_zmq_frames(msgspec.structs.replace(
        theirs.envelope, publisher_id=event.publisher_id, sequence=event.sequence,
        published_at=event.envelope.published_at))
    # the channel entry: the same bytes but for the publisher id and the socket's address
    their_endpoint = their_channel.transport.config.endpoint
    our_endpoint = transport.endpoint
    assert our_raw == their_raw.replace(str(their_channel.instance_id).encode(),
                                        str(ours.load.events.publisher_id).encode()).replace(
        their_endpoint.encode(), our_endpoint.encode())


# Discovery: the file backend -----------------------------------------------------------------


def publisher_ids(entries: dict) -> dict[int, str]:
    """publisher id -> `{topic}` for every event channel (and `source-{rank}` for event sources' keys)."""
    return {entry.instance_id: entry.topic for _, entry, _ in entries.values()
            if isinstance(entry, protocol.EventChannelEntry)}


def with_placeholders(entries: dict, worker_id: int) -> dict[str, bytes]:
    """File names and bytes with the worker id and each publisher id written as what it stands for."""
    names = {worker_id: "WORKER", **{publisher: f"PUBLISHER-{topic}" for publisher, topic in
                                     publisher_ids(entries).items()}}
    found = {}
    for name, (_, _, raw) in entries.items():
        text = raw.decode()
        for number, placeholder in names.items():
            name = name.replace(f"{number:x}", placeholder)
            text = text.replace(str(number), placeholder).replace(f"{number:x}", placeholder)
        found[name] = text.encode()
    return found


def registered(directory: Path, count: int) -> Callable[[], dict]:
    """The entries, once all `count` are written (publishers register in the background)."""
    return lambda: wait_until(lambda: len(found := file_entries(directory)) == count and found, WAIT_S,
                              what=f"{count} discovery entries in {directory}")


def make_every_publisher(real: DynamoWorker) -> None:
    """The load publisher exists from the start; a KV event and a pass create the other two."""
    real.command("kv_stored", token_ids=list(range(16)), num_block_tokens=[16], block_hashes=[1])
    real.command("fpm", worker_id=str(real.worker_id), dp_rank=0, wall_time_secs=0.1,
                 **{name: 0 for name in ("scheduled_num_prefill_requests", "scheduled_sum_prefill_tokens",
                                         "scheduled_sum_prefill_kv_tokens", "scheduled_num_decode_requests",
                                         "scheduled_sum_decode_kv_tokens", "queued_num_prefill_requests",
                                         "queued_sum_prefill_tokens", "queued_num_decode_requests",
                                         "queued_sum_decode_kv_tokens")})


ENTRIES = 6  # instance, model card, three event channels, the kv-events source


async def test_our_file_entries_are_the_runtimes_bytes_for_the_same_registration(
        nats_server, nc, dynamo_workers, tmp_path):
    # request plane `nats`: the instance entry then names a subject, which the mock advertises too
    real = await in_thread(dynamo_workers, nats_url=nats_server.url, file_kv=str(tmp_path / "real"),
                           request_plane="nats", endpoint='ns a"\\ö.Comp_1.gen-x')
    runtime = {"total_kv_blocks": 4096, "max_num_seqs": 256, "max_num_batched_tokens": 8192,
               "data_parallel_start_rank": 2, "data_parallel_size": 2}
    await in_thread(real.command, "register", **runtime)
    await in_thread(make_every_publisher, real)
    theirs = await in_thread(registered(tmp_path / "real", ENTRIES))
    # what the runtime wrote for the values it is not given here (it keeps no block size without model assets)
    (their_card,) = [entry.card_json for _, entry, _ in theirs.values() if isinstance(entry, protocol.ModelEntry)]
    card = ModelCardValues("model", kv_cache_block_size=their_card.kv_cache_block_size,
                           context_length=their_card.context_length, **runtime)
    ours = EventPlaneWorker(WorkerEndpoint('ns a"\\ö', "Comp_1", "gen-x", real.worker_id), NatsEventPlane(nc),
                            store=FileKvStore(tmp_path / "ours"), model=card)
    ours.register()
    mine = file_entries(tmp_path / "ours")
    assert with_placeholders(mine, real.worker_id) == with_placeholders(theirs, real.worker_id)
    assert sorted(publisher_ids(mine).values()) == sorted(publisher_ids(theirs).values())

    # decoded as a reader decodes them: the same structures, ids apart
    def structures(entries: dict, publishers: dict[int, str]) -> list:
        found = []
        for parsed, entry, _ in entries.values():
            parsed = msgspec.structs.replace(parsed, instance_id=publishers.get(parsed.instance_id, parsed.instance_id))
            if isinstance(entry, protocol.EventChannelEntry):
                entry = msgspec.structs.replace(entry, instance_id=publishers[entry.instance_id])
            if isinstance(entry, protocol.EventSourceEntry):
                metadata = msgspec.structs.replace(entry.metadata, publisher_id=publishers[entry.publisher_id])
                entry = msgspec.structs.replace(entry, publisher_id=publishers[entry.publisher_id], metadata=metadata)
            found.append((parsed, entry))
        return sorted(found, key=repr)

    assert structures(mine, publisher_ids(mine)) == structures(theirs, publisher_ids(theirs))
    # a clean stop deletes them at once, in both
    assert await in_thread(real.exit) == 0
    ours.close()
    assert file_entries(tmp_path / "real") == {} == file_entries(tmp_path / "ours")


async def test_the_mock_fleets_entries_are_a_real_workers_with_the_mocks_capacity(
        nats_server, nc, dynamo_workers, tmp_path):
    config = EngineConfig()
    card = model_card(config, 1)
    real = await in_thread(dynamo_workers, nats_url=nats_server.url, file_kv=str(tmp_path / "real"),
                           request_plane="nats")
    await in_thread(real.command, "register", model=MODEL_NAME, total_kv_blocks=card.total_kv_blocks,
                    max_num_seqs=card.max_num_seqs, max_num_batched_tokens=card.max_num_batched_tokens,
                    data_parallel_start_rank=0, data_parallel_size=1)
    await in_thread(make_every_publisher, real)
    theirs = await in_thread(registered(tmp_path / "real", ENTRIES))
    fleet = MockFleet(nc, workers=1, seed=1, protocol="dynamo-1", discovery_file_kv=str(tmp_path / "ours"),
                      component_metrics=False)
    await fleet.start()
    try:
        mine = file_entries(tmp_path / "ours")
    finally:
        fleet.close()
    ours = with_placeholders(mine, fleet.workers[0].worker_id)
    expected = with_placeholders(theirs, real.worker_id)
    # The one value the runtime does not keep here: the mock says its block size.
    (name,) = [name for name in expected if name.startswith("v1/mdc/")]
    expected[name] = expected[name].replace(b'"kv_cache_block_size":0,',
                                            f'"kv_cache_block_size":{config.block_size},'.encode())
    assert ours == expected
    assert file_entries(tmp_path / "ours") == {}
