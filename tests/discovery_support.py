"""Helpers of the discovery edge's tests: a sink that checks what it is told, a watcher run in the background."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import fleet_protocol as protocol
from aggregator.config import DiscoveryConfig
from aggregator.edges.discovery_store import DiscoveryWatcher, discovery_watcher
from fleet_protocol import (
    DiscoveryEntry,
    EndpointScope,
    EventChannelEntry,
    EventScope,
    EventSourceEntry,
    InstanceEntry,
    ModelCard,
    ModelEntry,
    NatsConfig,
    NatsTransport,
    RuntimeConfig,
    SourceMetadata,
    SourceWorker,
)

from .dynamo_runtime import EtcdServer

WAIT_S = 20.0
WORKER = 0x5C2DB107CE3E712D
PUBLISHER = 0x1D2C3B4A5968


@dataclass
class RecordingSink:
    """The sink side of the contract: a delete only of a key put, a put only of something new."""

    entries: dict[str, DiscoveryEntry] = field(default_factory=dict)
    changes: list[tuple[str, str]] = field(default_factory=list)  # ("put" | "delete" | "snapshot", key)

    def put(self, key: str, entry: DiscoveryEntry) -> None:
        assert self.entries.get(key) != entry, f"{key} put again unchanged"
        self.entries[key] = entry
        self.changes.append(("put", key))

    def delete(self, key: str) -> None:
        assert key in self.entries, f"{key} deleted but never put"
        del self.entries[key]
        self.changes.append(("delete", key))

    def snapshot_complete(self) -> None:
        self.changes.append(("snapshot", ""))

    @property
    def snapshots(self) -> int:
        return sum(1 for kind, _ in self.changes if kind == "snapshot")

    def of(self, kind: type) -> dict[str, DiscoveryEntry]:
        return {key: entry for key, entry in self.entries.items() if isinstance(entry, kind)}


@dataclass
class Running:
    watcher: DiscoveryWatcher
    sink: RecordingSink
    registry: CollectorRegistry

    def metric(self, name: str, **labels: str) -> float | None:
        """A sample's value, as /metrics would show it, read back with prometheus_client's parser."""
        text = generate_latest(self.registry).decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return None

    async def until(self, predicate: Callable[[], object], what: str, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout}s: {what}; state {self.watcher.state()}, "
                                     f"entries {sorted(self.sink.entries)}")
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(config: DiscoveryConfig, namespace: str = "dynamo", **options) -> AsyncIterator[Running]:
    """A watcher of `config` run until the block ends (and then stopped and awaited)."""
    sink = RecordingSink()
    registry = CollectorRegistry()
    watcher = discovery_watcher(config, namespace, sink, registry)
    for name, value in options.items():
        setattr(watcher, name, value)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    try:
        yield Running(watcher, sink, registry)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


needs_etcd = pytest.mark.skipif(EtcdServer.binary() is None,
                                reason="etcd is not installed (Debian: apt-get install etcd-server)")


@contextlib.contextmanager
def etcd_running(**options) -> Iterator[EtcdServer]:
    """A real etcd on loopback for the block (EtcdServer's `options`: TLS, client certificates, the token TTL);
    stopped (and resumed first, should a test have frozen it)."""
    server = EtcdServer(**options)
    server.start()
    try:
        yield server
    finally:
        if server.popen is not None and server.popen.poll() is None:
            os.kill(server.popen.pid, signal.SIGCONT)
        server.stop()


def worker_entries(namespace: str = "dynamo", worker: int = WORKER, publisher: int = PUBLISHER,
                   total_kv_blocks: int = 4096) -> dict[str, protocol.DiscoveryEntry]:
    scope = EventScope("endpoint", EndpointScope(namespace, "backend", "generate"))
    return {
        protocol.instance_key(namespace, "backend", "generate", worker):
            InstanceEntry(namespace, "backend", "generate", worker),
        protocol.model_card_key(namespace, "backend", "generate", worker):
            ModelEntry(namespace, "backend", "generate", worker, ModelCard(
                "model", 16, runtime_config=RuntimeConfig(total_kv_blocks, 256, 8192, 2, 2))),
        protocol.event_channel_key(namespace, "backend", "generate", "kv_metrics", publisher):
            EventChannelEntry(scope, "kv_metrics", publisher, NatsTransport(NatsConfig(
                f"namespace.{namespace}.component.backend.endpoint.generate"))),
        protocol.event_channel_key(namespace, "backend", "generate", "kv-events", publisher + 1,
                                   bucket=protocol.EVENT_SOURCES):
            EventSourceEntry(scope, "kv-events", publisher + 1, SourceMetadata(SourceWorker(worker, 0))),
    }


def etcd_call(server: EtcdServer, path: str, body: dict) -> dict:
    """One request to etcd's JSON gateway, as Dynamo's etcd client would send it over gRPC."""
    return server.call(path, body)


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def etcd_put(server: EtcdServer, key: str, value: bytes, lease: int = 0) -> int:
    """`value` at `key` (on `lease` if not 0); the revision of the put."""
    body: dict = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = lease
    return int(etcd_call(server, "/v3/kv/put", body)["header"]["revision"])
