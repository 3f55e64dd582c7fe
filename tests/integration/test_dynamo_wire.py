"""Conformance with the real Dynamo 1.x runtime (ai-dynamo-runtime 1.6.1, the `dynamo` test extra).

Real workers (tests/dynamo_worker.py, Dynamo's own Python API) publish known values on a
loopback nats-server with the NATS event plane; a plain nats-py subscriber captures the raw
messages. Our decoders must yield exactly the published values, and our encoders, fed the
same values, must produce the runtime's very bytes. The discovery entries the runtime
writes (file backend, etcd) decode to what was registered. What a worker leaves behind when
killed or stopped cleanly is recorded here too, as tests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import nats
import pytest

import fleet_protocol as protocol
from fleet_protocol import EventEnvelope

from ..discovery_support import needs_etcd
from ..dynamo_runtime import DynamoWorker
from ..support import NatsCapture, capture_fixture, in_thread, wait_until

pytest.importorskip("dynamo.llm", reason="the `dynamo` test extra (ai-dynamo-runtime) is not installed")
zmq = pytest.importorskip("zmq", reason="the `dynamo` test extra (pyzmq) is not installed")

LIMIT = 64 * 1024
WAIT_S = 20.0


class Capture(NatsCapture):
    """The captured messages read as event-plane envelopes."""

    def on(self, topic: str) -> list[tuple[str, EventEnvelope]]:
        return [(subject, protocol.decode_envelope(data, LIMIT)) for subject, data in self.messages
                if subject.endswith("." + topic)]

    async def wait_for(self, topic: str, count: int, accept: Callable[[EventEnvelope], bool] = lambda _: True):
        deadline = time.monotonic() + WAIT_S
        while True:
            found = [(subject, envelope) for subject, envelope in self.on(topic) if accept(envelope)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} {topic} messages after {WAIT_S}s")
            await asyncio.sleep(0.02)

    def raw(self, envelope: EventEnvelope) -> bytes:
        return next(data for _, data in self.messages if protocol.decode_envelope(data, LIMIT) == envelope)


capture = capture_fixture(Capture)


def assert_same_bytes(raw: bytes, envelope: EventEnvelope, payload: bytes) -> None:
    """Our envelope around our payload is the runtime's message, byte for byte."""
    assert payload == envelope.payload
    ours = protocol.encode_envelope(EventEnvelope(envelope.publisher_id, envelope.sequence, envelope.published_at,
                                                  envelope.topic, payload))
    assert ours == raw


# The event plane on NATS -----------------------------------------------------------------


async def test_kv_metrics_are_the_published_values_and_our_encoding_is_the_runtimes(
        nats_server, capture, dynamo_workers, tmp_path):
    worker = await in_thread(dynamo_workers, nats_url=nats_server.url, file_kv=str(tmp_path))
    before = time.time()
    await in_thread(worker.command, "load", dp_rank=0, active_decode_blocks=5, kv_used_blocks=7)
    for _ in range(10):  # unchanged values: 1.6.1 publishes only on change
        await in_thread(worker.command, "load", dp_rank=0, active_decode_blocks=5, kv_used_blocks=7)
    await in_thread(worker.command, "load", dp_rank=0, active_decode_blocks=None, kv_used_blocks=2**40)
    await in_thread(worker.command, "load", dp_rank=3, active_decode_blocks=0, kv_used_blocks=0)
    found = await capture.wait_for("kv_metrics", 3)
    assert len(found) == 3

    expected = {
        (0, 7): protocol.ActiveLoad(worker.worker_id, 0, 5, None, 7),
        (0, 2**40): protocol.ActiveLoad(worker.worker_id, 0, None, None, 2**40),
        (3, 0): protocol.ActiveLoad(worker.worker_id, 3, 0, None, 0),
    }
    publishers = {envelope.publisher_id for _, envelope in found}
    assert len(publishers) == 1 and 0 < publishers.pop() < 2**53
    assert sorted(envelope.sequence for _, envelope in found) == [0, 1, 2]
    for subject, envelope in found:
        assert subject == "namespace.dynamo.component.backend.endpoint.generate.kv_metrics"
        assert envelope.topic == "kv_metrics"
        assert before * 1000 - 1000 <= envelope.published_at <= time.time() * 1000 + 1000
        load = protocol.decode_active_load(envelope.payload, LIMIT)
        assert load == expected[(load.dp_rank, load.kv_used_blocks)]
        assert_same_bytes(capture.raw(envelope), envelope, protocol.encode_active_load(expected[
            (load.dp_rank, load.kv_used_blocks)]))
    # per dp_rank, in order: the unchanged repeats sent nothing
    rank_zero = [protocol.decode_active_load(e.payload, LIMIT).kv_used_blocks for _, e in found
                 if protocol.decode_active_load(e.payload, LIMIT).dp_rank == 0]
    assert rank_zero == [7, 2**40]


def stored_event(worker_id: int, event_id: int, dp_rank: int, hashes: list[int], tokens_hashes: list[int],
                 parent: int | None) -> protocol.RouterEvent:
    blocks = [protocol.StoredBlock(block, tokens) for block, tokens in zip(hashes, tokens_hashes, strict=True)]
    return protocol.RouterEvent(worker_id=worker_id, event=protocol.KvCacheEvent(
        event_id, protocol.KvEventData(stored=protocol.KvStored(parent, None, blocks)), dp_rank))


async def test_kv_events_stored_removed_cleared_are_the_published_values(
        nats_server, capture, dynamo_workers, tmp_path):
    worker = await in_thread(dynamo_workers, nats_url=nats_server.url, file_kv=str(tmp_path), block_size=4)
    # Through the Python API (dp_rank 0): i64 hashes, negative ones included.
    await in_thread(worker.command, "kv_stored", dp_rank=0, token_ids=list(range(8)), num_block_tokens=[4, 4],
                    block_hashes=[-5, 2**63 - 1], parent_hash=-7)
    await in_thread(worker.command, "kv_removed", dp_rank=0, block_hashes=[-5])
    # As an engine publishes them, through the runtime's ZMQ relay (dp_rank 1): the only way to `cleared`.
    await in_thread(worker.command, "engine_kv", dp_rank=1, seq=0,
                    events=[["BlockStored", [10, 11], None, list(range(8)), 4, None, "GPU"]])
    await in_thread(worker.command, "engine_kv", dp_rank=1, seq=1, events=[["AllBlocksCleared"]])
    found = await capture.wait_for("kv-events", 4)
    batches = {(e.publisher_id, e.sequence): (e, protocol.decode_kv_events(e.payload, LIMIT)) for _, e in found}
    assert len({publisher for publisher, _ in batches}) == 2  # one publisher per KvEventPublisher
    by_rank: dict[int, list[protocol.RouterEvent]] = {}
    for key in sorted(batches):
        for event in batches[key][1]:
            by_rank.setdefault(event.event.dp_rank, []).append(event)
    api, engine = by_rank[0], by_rank[1]
    assert [event.event.kind for event in api] == ["stored", "removed"]
    assert [event.event.event_id for event in api] == [1, 2]
    stored = api[0].event.data.stored
    assert [block.block_hash for block in stored.blocks] == [2**64 - 5, 2**63 - 1]  # two's complement on the wire
    assert stored.parent_hash == 2**64 - 7 and stored.start_position is None
    assert api[1].event.data.removed.block_hashes == [2**64 - 5]
    assert [event.event.kind for event in engine] == ["stored", "cleared"]
    assert [event.event.event_id for event in engine] == [1, 2]
    assert [block.block_hash for block in engine[0].event.data.stored.blocks] == [10, 11]
    assert all((e.worker_id, e.storage_tier, e.residency_domain) == (worker.worker_id, "device", "worker")
               for e in api + engine)

    # Our encoding of the same events is the runtime's (tokens_hash is the runtime's own hash of the tokens).
    expected = {
        (0, 1): stored_event(worker.worker_id, 1, 0, [2**64 - 5, 2**63 - 1],
                             [block.tokens_hash for block in stored.blocks], 2**64 - 7),
        (0, 2): protocol.RouterEvent(worker_id=worker.worker_id, event=protocol.KvCacheEvent(
            2, protocol.KvEventData(removed=protocol.KvRemoved([2**64 - 5])), 0)),
        (1, 1): stored_event(worker.worker_id, 1, 1, [10, 11],
                             [block.tokens_hash for block in engine[0].event.data.stored.blocks], None),
        (1, 2): protocol.RouterEvent(worker_id=worker.worker_id, event=protocol.KvCacheEvent(2, "cleared", 1)),
    }
    for envelope, batch in batches.values():
        (event,) = batch
        assert_same_bytes(capture.raw(envelope), envelope,
                          protocol.encode_kv_events([expected[(event.event.dp_rank, event.event.event_id)]]))


async def test_forward_pass_metrics_are_the_published_values_and_idle_heartbeats_follow(
        nats_server, capture, dynamo_workers, tmp_path):
    worker = await in_thread(dynamo_workers, nats_url=nats_server.url, file_kv=str(tmp_path))
    fields = {"scheduled_num_prefill_requests": 1, "scheduled_sum_prefill_tokens": 100,
              "scheduled_sum_prefill_kv_tokens": 50, "scheduled_num_decode_requests": 2,
              "scheduled_sum_decode_kv_tokens": 300, "queued_num_prefill_requests": 3,
              "queued_sum_prefill_tokens": 400, "queued_num_decode_requests": 4, "queued_sum_decode_kv_tokens": 500,
              "wall_time_secs": 0.25}
    await in_thread(worker.command, "fpm", worker_id=str(worker.worker_id), dp_rank=0, **fields)
    # the iteration, then at least one zeroed heartbeat after an idle second
    found = await capture.wait_for("forward-pass-metrics", 2)
    (subject, envelope), (_, heartbeat) = found[:2]
    assert subject == "namespace.dynamo.component.backend.endpoint.generate.forward-pass-metrics"
    metrics = protocol.decode_forward_pass_v1(envelope.payload, LIMIT)
    expected = protocol.ForwardPassMetricsV1(
        version=1, worker_id=str(worker.worker_id), dp_rank=0, counter_id=1, wall_time=0.25,
        scheduled_requests=protocol.ScheduledRequests(1, 100, 0.0, 50, 2, 300, 0.0),
        queued_requests=protocol.QueuedRequests(3, 400, 0.0, 4, 500, 0.0))
    assert metrics == expected and metrics.worker == worker.worker_id
    assert_same_bytes(capture.raw(envelope), envelope, protocol.encode_forward_pass_v1(expected))
    idle = protocol.decode_forward_pass_v1(heartbeat.payload, LIMIT)
    assert (heartbeat.publisher_id, heartbeat.sequence) == (envelope.publisher_id, envelope.sequence + 1)
    assert idle == protocol.ForwardPassMetricsV1(version=1, worker_id=str(worker.worker_id), counter_id=2)
    assert heartbeat.published_at - envelope.published_at >= 900  # ms: a heartbeat only after an idle second


async def test_odd_names_travel_percent_encoded_and_decode_back(nats_server, capture, dynamo_workers, tmp_path):
    worker = await in_thread(dynamo_workers, nats_url=nats_server.url, file_kv=str(tmp_path),
                             endpoint="a b/x.Cö*mp.e>f%")
    await in_thread(worker.command, "load", dp_rank=0, kv_used_blocks=1)
    ((subject, _),) = await capture.wait_for("kv_metrics", 1)
    assert subject == "namespace.a%20b%2Fx.component.C%C3%B6%2Amp.endpoint.e%3Ef%25.kv_metrics"
    assert protocol.parse_event_subject(subject) == protocol.EventSubject("a b/x", "Cö*mp", "e>f%", "kv_metrics")
    assert protocol.endpoint_event_subject("a b/x", "Cö*mp", "e>f%", "kv_metrics") == subject


# Discovery ----------------------------------------------------------------------------

RUNTIME_CONFIG = {"total_kv_blocks": 4096, "max_num_seqs": 256, "max_num_batched_tokens": 8192,
                  "data_parallel_start_rank": 2, "data_parallel_size": 2}


def file_backend(directory: Path) -> dict[str, tuple[protocol.DiscoveryKey, protocol.DiscoveryEntry]]:
    """{key: (parsed key, entry)} of every file under `directory`/v1, decoded as a reader must."""
    found = {}
    for path in sorted((directory / "v1").glob("*/*")):
        key = protocol.key_of_file(path.parent.name, path.name)
        found[key] = protocol.decode_keyed_entry(key, path.read_bytes(), LIMIT)
    return found


def registered(read: Callable[[], dict]) -> Callable[[], dict]:
    """`read`, once it shows all that check_registration expects (publishers register in the background)."""
    def complete() -> dict:
        entries = read()
        buckets = [parsed.bucket for parsed, _ in entries.values()]
        return entries if sorted(buckets) == ["event_channels", "event_channels", "event_sources", "instances",
                                              "mdc"] else {}
    return lambda: wait_until(complete, WAIT_S, what="the worker's discovery entries")


def check_registration(entries: dict, worker: DynamoWorker, event_plane: str) -> None:
    """One instance, one model card with RUNTIME_CONFIG, one event channel per topic publishing."""
    by_bucket: dict[str, list] = {}
    for key, (parsed, entry) in entries.items():
        by_bucket.setdefault(parsed.bucket, []).append((key, parsed, entry))
    ((key, parsed, instance),) = by_bucket["instances"]
    assert key == f"v1/instances/dynamo/backend/generate/{worker.worker_id:x}"
    assert parsed == protocol.DiscoveryKey("instances", worker.worker_id, "dynamo", "backend", "generate")
    assert (instance.namespace, instance.component, instance.endpoint, instance.instance_id) == (
        "dynamo", "backend", "generate", worker.worker_id)
    ((key, parsed, model),) = by_bucket["mdc"]
    assert key == f"v1/mdc/dynamo/backend/generate/{worker.worker_id:x}" and parsed.lora is None
    assert model.instance_id == worker.worker_id
    assert model.card_json.runtime_config == protocol.RuntimeConfig(**RUNTIME_CONFIG, enable_local_indexer=True)
    channels = {entry.topic: entry for _, _, entry in by_bucket["event_channels"]}
    assert set(channels) == {"kv_metrics", "kv-events"}
    for topic, channel in channels.items():
        assert channel.scope == protocol.EventScope("endpoint", protocol.EndpointScope("dynamo", "backend", "generate"))
        if event_plane == "nats":
            assert channel.transport == protocol.NatsTransport(protocol.NatsConfig(
                "namespace.dynamo.component.backend.endpoint.generate")), topic
        else:
            assert isinstance(channel.transport, protocol.ZmqTransport)
            assert channel.transport.config.endpoint.startswith("tcp://127.0.0.1:")
    ((_, _, source),) = by_bucket["event_sources"]
    assert source.publisher_id == channels["kv-events"].instance_id
    assert source.metadata.worker == protocol.SourceWorker(worker.worker_id, 0)


async def test_file_backend_entries_decode_to_the_registration(nats_server, capture, dynamo_workers, tmp_path):
    worker = await in_thread(dynamo_workers, nats_url=nats_server.url, file_kv=str(tmp_path))
    await in_thread(worker.command, "register", **RUNTIME_CONFIG)
    await in_thread(worker.command, "load", dp_rank=0, kv_used_blocks=3)
    await in_thread(worker.command, "kv_stored", token_ids=list(range(16)), num_block_tokens=[16], block_hashes=[1])
    entries = await in_thread(registered(lambda: file_backend(tmp_path)))
    check_registration(entries, worker, "nats")
    # the channel's instance_id is the publisher_id of the envelopes on NATS
    channels = {entry.topic: entry.instance_id for _, entry in entries.values()
                if isinstance(entry, protocol.EventChannelEntry)}
    for topic in ("kv_metrics", "kv-events"):
        ((_, envelope),) = await capture.wait_for(topic, 1)
        assert envelope.publisher_id == channels[topic]


@needs_etcd
async def test_etcd_entries_are_the_same_keys_on_the_workers_lease(nats_server, dynamo_workers, etcd_server):
    worker = await in_thread(dynamo_workers, discovery="etcd", etcd_url=etcd_server.url, nats_url=nats_server.url)
    await in_thread(worker.command, "register", **RUNTIME_CONFIG)
    await in_thread(worker.command, "kv_stored", token_ids=list(range(16)), num_block_tokens=[16], block_hashes=[1])
    def read() -> dict:
        return {key: protocol.decode_keyed_entry(key, value, LIMIT) for key, (value, _) in etcd_server.entries().items()}

    entries = await in_thread(registered(read))
    check_registration(entries, worker, "nats")
    stored = etcd_server.entries()
    assert all(key.startswith("v1/") for key in stored)  # no prefix before v1/
    assert {lease for _, lease in stored.values()} == {worker.worker_id}  # the instance id is the lease id
    granted, remaining = etcd_server.lease_ttl(worker.worker_id)
    assert granted == protocol.ETCD_LEASE_TTL_S and 0 < remaining <= granted


@needs_etcd
async def test_etcd_without_an_event_plane_setting_means_zmq(dynamo_workers, etcd_server):
    worker = await in_thread(dynamo_workers, discovery="etcd", etcd_url=etcd_server.url, event_plane=None)
    await in_thread(worker.command, "register", **RUNTIME_CONFIG)
    await in_thread(worker.command, "kv_stored", token_ids=list(range(16)), num_block_tokens=[16], block_hashes=[1])
    def read() -> dict:
        return {key: protocol.decode_keyed_entry(key, value, LIMIT) for key, (value, _) in etcd_server.entries().items()}

    check_registration(await in_thread(registered(read)), worker, "zmq")


# What stopping leaves behind -------------------------------------------------------------


def mtimes(directory: Path) -> dict[str, float]:
    return {path.name: path.stat().st_mtime for path in (directory / "v1").glob("*/*")}


def wait_for_mtime_change(directory: Path, name: str, timeout: float) -> float:
    start = mtimes(directory)[name]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = mtimes(directory).get(name, start)
        if now != start:
            return now
        time.sleep(0.05)
    raise AssertionError(f"{name} not refreshed within {timeout}s")


def test_file_backend_after_sigkill_files_stay_and_their_keep_alive_stops(dynamo_workers, tmp_path):
    worker = dynamo_workers(file_kv=str(tmp_path), event_plane=None)
    worker.command("register", **RUNTIME_CONFIG)
    instance = protocol.file_name(f"dynamo/backend/generate/{worker.worker_id:x}")
    # alive: the keep-alive rewrites each file's mtime, every ~10/3 s
    first = wait_for_mtime_change(tmp_path, instance, 3 * protocol.FILE_KEEP_ALIVE_S)
    second = wait_for_mtime_change(tmp_path, instance, 3 * protocol.FILE_KEEP_ALIVE_S)
    period = second - first
    assert 0.5 * protocol.FILE_KEEP_ALIVE_S < period < 2 * protocol.FILE_KEEP_ALIVE_S
    contents = {path.name: path.read_bytes() for path in (tmp_path / "v1").glob("*/*")}
    worker.kill()
    after_kill = mtimes(tmp_path)
    assert set(after_kill) == set(contents)  # nobody removes them
    time.sleep(2.5 * period)  # more than two keep-alive periods: none comes
    assert mtimes(tmp_path) == after_kill
    assert {path.name: path.read_bytes() for path in (tmp_path / "v1").glob("*/*")} == contents
    entries = file_backend(tmp_path)  # still decodable: a reader must expire them itself, by mtime
    assert any(isinstance(entry, protocol.InstanceEntry) for _, entry in entries.values())


def test_file_backend_a_live_dynamo_process_deletes_a_dead_workers_files(dynamo_workers, tmp_path):
    dead = dynamo_workers(file_kv=str(tmp_path), event_plane=None)
    alive = dynamo_workers(file_kv=str(tmp_path), event_plane=None, endpoint="dynamo.other.generate")
    dead_files = {protocol.file_name(f"dynamo/backend/generate/{dead.worker_id:x}")}
    alive_files = {protocol.file_name(f"dynamo/other/generate/{alive.worker_id:x}")}
    assert dead_files | alive_files <= set(mtimes(tmp_path))
    dead.kill()
    killed_at = time.monotonic()
    deadline = killed_at + 3 * protocol.FILE_ENTRY_TTL_S
    while dead_files & set(mtimes(tmp_path)):
        assert time.monotonic() < deadline, "the dead worker's files were never expired"
        time.sleep(0.1)
    waited = time.monotonic() - killed_at
    assert waited > protocol.FILE_ENTRY_TTL_S - 2 * protocol.FILE_KEEP_ALIVE_S  # expired by TTL, not at once
    assert alive_files <= set(mtimes(tmp_path))


def test_file_backend_clean_shutdown_deletes_the_files_at_once(dynamo_workers, tmp_path):
    worker = dynamo_workers(file_kv=str(tmp_path), event_plane=None)
    worker.command("register", **RUNTIME_CONFIG)
    assert mtimes(tmp_path)
    assert worker.exit() == 0
    assert mtimes(tmp_path) == {}


@needs_etcd
def test_etcd_after_sigkill_keys_stay_on_a_lease_that_is_no_longer_kept_alive(dynamo_workers, etcd_server):
    worker = dynamo_workers(discovery="etcd", etcd_url=etcd_server.url, event_plane=None)
    worker.command("register", **RUNTIME_CONFIG)
    keys = set(etcd_server.entries())
    assert len(keys) == 3  # instance, model card, kv_metrics channel
    worker.kill()
    assert set(etcd_server.entries()) == keys
    granted, remaining = etcd_server.lease_ttl(worker.worker_id)
    # They go when the lease expires: within 30 s of the last keep-alive (sent every ~15 s), not waited for here.
    assert granted == protocol.ETCD_LEASE_TTL_S and 0 < remaining <= granted


@needs_etcd
def test_etcd_clean_shutdown_deletes_the_keys_at_once(dynamo_workers, etcd_server):
    worker = dynamo_workers(discovery="etcd", etcd_url=etcd_server.url, event_plane=None)
    worker.command("register", **RUNTIME_CONFIG)
    assert etcd_server.entries()
    assert worker.exit() == 0
    assert etcd_server.entries() == {}
    assert etcd_server.lease_ttl(worker.worker_id)[1] == -1  # the lease is revoked


# The ZMQ event plane (Dynamo's default) ---------------------------------------------------


def test_zmq_event_plane_frames_decode_and_our_framing_is_the_runtimes(dynamo_workers, tmp_path):
    worker = dynamo_workers(file_kv=str(tmp_path), event_plane=None)
    worker.command("load", dp_rank=0, kv_used_blocks=1)  # creates the publisher and its channel entry
    ((_, channel),) = [(parsed, entry) for parsed, entry in file_backend(tmp_path).values()
                       if isinstance(entry, protocol.EventChannelEntry)]
    assert isinstance(channel.transport, protocol.ZmqTransport)
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    try:
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.connect(channel.transport.config.endpoint)
        # PUB/SUB drops what is sent before the subscription arrives: publish changes until one is seen
        for used in range(2, 200):
            worker.command("load", dp_rank=0, kv_used_blocks=used)
            if socket.poll(100):
                socket.recv_multipart()
                break
        else:
            raise AssertionError("no ZMQ message reached the subscriber")
        while socket.poll(200):
            socket.recv_multipart()
        worker.command("load", dp_rank=0, active_decode_blocks=3, kv_used_blocks=1000)
        assert socket.poll(int(WAIT_S * 1000))
        frames = socket.recv_multipart()
    finally:
        socket.close(linger=0)
        context.term()
    event = protocol.decode_zmq_frames(frames, LIMIT)
    assert (event.topic, event.publisher_id) == ("kv_metrics", channel.instance_id)
    expected = protocol.ActiveLoad(worker.worker_id, 0, 3, None, 1000)
    assert protocol.decode_active_load(event.envelope.payload, LIMIT) == expected
    ours = EventEnvelope(event.publisher_id, event.sequence, event.envelope.published_at, "kv_metrics",
                         protocol.encode_active_load(expected))
    assert protocol.encode_zmq_frames(ours) == frames


# $SRV.STATS of 1.x (request plane nats) ---------------------------------------------------


async def test_stats_reply_has_counters_and_no_data(nats_server, dynamo_workers, tmp_path):
    worker = await in_thread(dynamo_workers, nats_url=nats_server.url, file_kv=str(tmp_path), request_plane="nats")
    answer = await in_thread(worker.command, "call", request={"hello": 1})
    assert answer["responses"]  # the request went through Dynamo's request plane, on NATS
    client = await nats.connect(nats_server.url)
    try:
        reply = await client.request(protocol.stats_subject("dynamo_backend"), b"", timeout=5)
    finally:
        await client.close()
    decoded = protocol.decode_stats_reply(reply.data, LIMIT)
    assert decoded.type == protocol.STATS_RESPONSE_TYPE and decoded.name == "dynamo_backend"
    (raw,) = decoded.endpoints
    assert not protocol.has_stats_data(protocol.decode_stats_endpoint(raw))
    stats = protocol.decode_endpoint_stats_v1(raw)
    assert stats.name == protocol.instance_endpoint_name("dynamo_backend", "generate", worker.worker_id)
    assert stats.subject == protocol.endpoint_subject("dynamo_backend", "generate", worker.worker_id)
    assert protocol.parse_instance_endpoint_name(stats.name, "dynamo_backend") == ("generate", worker.worker_id)
    assert (stats.num_requests, stats.num_errors, stats.queue_group) == (1, 0, "q")
    assert stats.processing_time > 0 and stats.average_processing_time > 0
    ours = protocol.StatsReplyV1(decoded.name, decoded.id, decoded.version, decoded.started, [stats])
    assert json.loads(protocol.encode_stats_reply_v1(ours)) == json.loads(reply.data)
