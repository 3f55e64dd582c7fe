"""The discovery edge against real Dynamo 1.6.1 workers (ai-dynamo-runtime, the `dynamo` test extra).

Workers (tests/dynamo_worker.py) register through Dynamo's own API, in the file backend and in
etcd; the edge must see each instance, its model card's runtime_config and its event channels
(ZMQ, Dynamo's default event plane, and NATS), keep an idle worker, and drop a stopped one:
at once after a clean shutdown; after the file TTL for a killed worker's files; when its lease
expires in etcd (30 s: not waited for here, test_discovery_etcd.py expires a short lease).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import fleet_protocol as protocol
from aggregator.config import DiscoveryConfig
from fleet_protocol import (
    EventChannelEntry,
    EventSourceEntry,
    InstanceEntry,
    ModelEntry,
    NatsTransport,
    RuntimeConfig,
    ZmqTransport,
)

from ..discovery_support import Running, etcd_put, needs_etcd, running
from ..dynamo_runtime import DynamoWorker
from ..support import in_thread

pytest.importorskip("dynamo.llm", reason="the `dynamo` test extra (ai-dynamo-runtime) is not installed")
pytest.importorskip("zmq", reason="the `dynamo` test extra (pyzmq) is not installed")

RUNTIME_CONFIG = {"total_kv_blocks": 4096, "max_num_seqs": 256, "max_num_batched_tokens": 8192,
                  "data_parallel_start_rank": 2, "data_parallel_size": 2}


async def registered(worker: DynamoWorker) -> None:
    """The worker's model, and one publisher per topic (a load report, a stored block)."""
    await in_thread(worker.command, "register", **RUNTIME_CONFIG)
    await in_thread(worker.command, "load", dp_rank=0, kv_used_blocks=3)
    await in_thread(worker.command, "kv_stored", token_ids=list(range(16)), num_block_tokens=[16], block_hashes=[1])


def complete(run: Running) -> bool:
    """The sink holds all a registered worker has: instance, model card, two channels, one event source."""
    return (len(run.sink.of(InstanceEntry)) == 1 and len(run.sink.of(ModelEntry)) == 1
            and len(run.sink.of(EventChannelEntry)) == 2 and len(run.sink.of(EventSourceEntry)) == 1)


def check_worker(run: Running, worker: DynamoWorker, transport: type) -> None:
    (key, instance), = run.sink.of(InstanceEntry).items()
    assert key == protocol.instance_key("dynamo", "backend", "generate", worker.worker_id)
    assert (instance.namespace, instance.component, instance.endpoint, instance.instance_id) == (
        "dynamo", "backend", "generate", worker.worker_id)
    (key, model), = run.sink.of(ModelEntry).items()
    assert key == protocol.model_card_key("dynamo", "backend", "generate", worker.worker_id)
    assert model.instance_id == worker.worker_id
    assert model.card_json.runtime_config == RuntimeConfig(**RUNTIME_CONFIG, enable_local_indexer=True)
    config = model.card_json.runtime_config
    assert (config.total_kv_blocks, config.max_num_seqs, config.data_parallel_size,
            config.data_parallel_start_rank) == (4096, 256, 2, 2)
    channels = {entry.topic: entry for entry in run.sink.of(EventChannelEntry).values()}
    assert set(channels) == {"kv_metrics", "kv-events"}
    for channel in channels.values():
        assert channel.scope.endpoint == protocol.EndpointScope("dynamo", "backend", "generate")
        assert isinstance(channel.transport, transport)
        if isinstance(channel.transport, ZmqTransport):
            assert channel.transport.config.endpoint.startswith("tcp://127.0.0.1:")
        else:
            assert channel.transport.config.subject_prefix == "namespace.dynamo.component.backend.endpoint.generate"
    (source,) = run.sink.of(EventSourceEntry).values()
    assert source.publisher_id == channels["kv-events"].instance_id
    assert source.metadata.worker == protocol.SourceWorker(worker.worker_id, 0)


def file_config(directory: Path) -> DiscoveryConfig:
    return DiscoveryConfig(backend="file", file_kv=str(directory), file_scan_interval=0.2)


async def test_file_backend_sees_a_real_worker_and_its_clean_shutdown(dynamo_workers, tmp_path):
    async with running(file_config(tmp_path)) as run:
        worker = await in_thread(dynamo_workers, file_kv=str(tmp_path), event_plane=None)  # Dynamo's default: ZMQ
        await registered(worker)
        await run.until(lambda: complete(run), "the worker's entries")
        check_worker(run, worker, ZmqTransport)
        assert run.watcher.state().connected
        assert await in_thread(worker.exit) == 0
        await run.until(lambda: not run.sink.entries, "every entry deleted")
        assert run.metric("llm_aggregator_discovery_expired_total") == 0  # removed, not expired


async def test_file_backend_keeps_an_idle_worker_and_expires_a_killed_ones(dynamo_workers, tmp_path):
    async with running(file_config(tmp_path)) as run:
        worker = await in_thread(dynamo_workers, file_kv=str(tmp_path), event_plane=None)
        await registered(worker)
        await run.until(lambda: complete(run), "the worker's entries")
        # Idle for longer than the TTL: its keep-alive holds every entry.
        idle_until = time.monotonic() + protocol.FILE_ENTRY_TTL_S + 2
        while time.monotonic() < idle_until:
            assert complete(run), f"an idle worker's entry went: {run.sink.changes[-3:]}"
            await asyncio.sleep(0.2)
        assert not [kind for kind, _ in run.sink.changes if kind == "delete"]
        files = sorted((tmp_path / "v1").glob("*/*"))
        await in_thread(worker.kill)
        await run.until(lambda: not run.sink.entries, "a killed worker's entries expired",
                        timeout=protocol.FILE_ENTRY_TTL_S + 10)
        assert sorted((tmp_path / "v1").glob("*/*")) == files  # still there: gone by their age
        assert run.metric("llm_aggregator_discovery_expired_total") == 5


@needs_etcd
async def test_etcd_sees_a_real_worker_and_its_clean_shutdown(nats_server, dynamo_workers, etcd_server):
    config = DiscoveryConfig(backend="etcd", etcd_endpoints=(etcd_server.url,))
    async with running(config) as run:
        await run.until(lambda: run.sink.snapshots == 1, "the empty listing")
        worker = await in_thread(dynamo_workers, discovery="etcd", etcd_url=etcd_server.url,
                                 nats_url=nats_server.url, event_plane="nats")
        await registered(worker)
        await run.until(lambda: complete(run), "the worker's entries, watched")
        check_worker(run, worker, NatsTransport)
        assert await in_thread(worker.exit) == 0
        await run.until(lambda: not run.sink.entries, "every entry deleted")
        assert run.sink.snapshots == 1


@needs_etcd
async def test_etcd_keeps_a_killed_workers_entries_while_its_lease_lasts(dynamo_workers, etcd_server):
    config = DiscoveryConfig(backend="etcd", etcd_endpoints=(etcd_server.url,))
    worker = await in_thread(dynamo_workers, discovery="etcd", etcd_url=etcd_server.url, event_plane=None)
    await registered(worker)
    async with running(config) as run:
        await run.until(lambda: complete(run), "the worker's entries, listed")
        check_worker(run, worker, ZmqTransport)
        entries = dict(run.sink.entries)
        await in_thread(worker.kill)
        # A later change in the store, once watched, shows every change before it was applied too.
        marker = protocol.instance_key("dynamo", "marker", "generate", 1)
        etcd_put(etcd_server, marker, protocol.encode_discovery_entry(
            InstanceEntry("dynamo", "marker", "generate", 1)))
        await run.until(lambda: marker in run.sink.entries, "the marker watched")
        assert {key: run.sink.entries[key] for key in entries} == entries  # the lease still holds them
        granted, remaining = etcd_server.lease_ttl(worker.worker_id)
        assert granted == protocol.ETCD_LEASE_TTL_S and remaining > 0

