"""Dynamo's discovery store, read: what both backends (file, etcd) share, and the sink they feed.

A watcher (`discovery_file.FileDiscovery`, `discovery_etcd.EtcdDiscovery`) lists the store,
then follows it, and tells a `DiscoverySink` what changed among the entries of the
aggregator's namespace: `put(key, entry)` for an entry that appeared or changed,
`delete(key)` for one that went (a clean shutdown, an etcd lease that expired, a file whose
keep-alive stopped), and `snapshot_complete()` once a full listing has been applied: from
then on, the entries put and not deleted are exactly the store's. A listing after a
reconnect is diffed against what the sink was told, so an entry that vanished while the
store could not be read is deleted then, and an unchanged one is not put again.

While the store cannot be read, the last view stands (the store's own entries are not
known to be gone), `connected` is false, and the watcher retries with a growing delay.
Nothing here is fatal: a bad entry is dropped and counted once per version, a store that
fails is counted, logged rarely and retried.

Keys of other namespaces are skipped before their value is read; the names inside an entry
are authoritative (a key holding a `/` in a name is ambiguous) and must agree with the
names its key holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import ClassVar, Final

import structlog
from prometheus_client import CollectorRegistry

import fleet_protocol as protocol
from aggregator.collectors.discovery_telemetry import DiscoveryTelemetry
from aggregator.config import DiscoveryConfig
from aggregator.ingest.discovery_entries import DiscoverySink
from fleet_protocol import (
    EVENT_CHANNELS,
    EVENT_SOURCES,
    INCONSISTENT,
    INSTANCES,
    MODEL_CARDS,
    DiscoveryEntry,
    EventChannelEntry,
    EventSourceEntry,
    MessageRejected,
)
from fleet_protocol.discovery import KEY_ROOT

log = structlog.get_logger("aggregator.discovery")

# Delays between attempts to read a store that failed: doubled from the first up to the last.
FIRST_RETRY_S: Final = 0.2
LAST_RETRY_S: Final = 5.0
_SHOWN_KEY = 256  # characters of a key shown in a log line


@dataclass(frozen=True, slots=True)
class DiscoveryState:
    """How the discovery store is doing, for /health."""

    backend: str
    connected: bool
    entries: int
    last_error: str | None

    def health(self) -> dict[str, object]:
        return {"backend": self.backend, "connected": self.connected, "entries": self.entries,
                "last_error": self.last_error}


def key_prefixes(namespace: str) -> dict[str, str]:
    """{bucket: the start of every key of `namespace` in it}."""
    segment = protocol.encode_event_segment(namespace)
    return {
        INSTANCES: f"{KEY_ROOT}/{INSTANCES}/{namespace}/",
        MODEL_CARDS: f"{KEY_ROOT}/{MODEL_CARDS}/{namespace}/",
        EVENT_CHANNELS: f"{KEY_ROOT}/{EVENT_CHANNELS}/namespace/{segment}/",
        EVENT_SOURCES: f"{KEY_ROOT}/{EVENT_SOURCES}/namespace/{segment}/",
    }


def _names(entry: DiscoveryEntry) -> tuple[str | None, str | None, str | None, str | None]:
    """(namespace, component, endpoint, topic) an entry says it is for."""
    if isinstance(entry, (EventChannelEntry, EventSourceEntry)):
        scope = entry.scope.endpoint
        if scope is None:
            return entry.scope.namespace, entry.scope.component, None, entry.topic
        return scope.namespace, scope.component, scope.name, entry.topic
    return entry.namespace, entry.component, entry.endpoint, None


_BROKER_SEGMENT: Final = f"/component/{protocol.encode_event_segment(protocol.ZMQ_BROKER_COMPONENT)}/topic/"


def _unused_component_scoped(key: str) -> bool:
    # `v1/{event bucket}/namespace/{ns}/component/{c}/topic/{t}/{id:x}`: a component's own channel (no
    # worker endpoint). Of those only the ZMQ brokers' (component `zmq_broker`) are read.
    parts = key.split("/")
    return (len(parts) == 9 and parts[1] in (EVENT_CHANNELS, EVENT_SOURCES) and parts[6] == "topic"
            and not (parts[1] == EVENT_CHANNELS and _BROKER_SEGMENT in key))


class DiscoveryView:
    """The entries of one namespace the sink has been told of, by key; the only way to the sink."""

    def __init__(self, namespace: str, sink: DiscoverySink, telemetry: DiscoveryTelemetry, *,
                 max_entry_bytes: int, max_entries: int) -> None:
        self.namespace = namespace
        self.sink = sink
        self.telemetry = telemetry
        self.max_entry_bytes = max_entry_bytes
        self.max_entries = max_entries
        self.prefixes = key_prefixes(namespace)
        self._prefix_tuple = tuple(self.prefixes.values())
        self._entries: dict[str, DiscoveryEntry] = {}
        self._counts = dict.fromkeys(self.prefixes, 0)
        self._listed: set[str] | None = None  # keys seen by the listing in progress

    def __len__(self) -> int:
        return len(self._entries)

    def wants(self, key: str) -> bool:
        """Whether `key` may hold an entry of this namespace (a cheap test, before its value is read)."""
        return key.startswith(self._prefix_tuple) and not _unused_component_scoped(key)

    def decode(self, key: str, value: bytes) -> DiscoveryEntry | None:
        """The entry `value` holds, if it is one of this namespace's; a bad one is counted and logged rarely."""
        try:
            parsed, entry = protocol.decode_keyed_entry(key, value, self.max_entry_bytes)
            namespace, component, endpoint, topic = _names(entry)
            if namespace != self.namespace and parsed.namespace != self.namespace:
                return None  # another namespace's, whose name holds a `/`
            if parsed.namespace is not None and (parsed.namespace, parsed.component, parsed.endpoint) != (
                    namespace, component, endpoint):
                raise MessageRejected(INCONSISTENT, "the key's names are not the entry's")
            if parsed.topic is not None and parsed.topic != topic:
                raise MessageRejected(INCONSISTENT, "the key's topic is not the entry's")
        except MessageRejected as error:
            self.reject(key, error.reason, error.detail)
            return None
        return entry

    def reject(self, key: str, reason: str, detail: str) -> None:
        self.telemetry.errors.labels(reason).inc()
        log.warning("discovery entry dropped", reason=reason, key=key[:_SHOWN_KEY], detail=detail[:512],
                    rate_limit=("reject", reason))

    def apply(self, key: str, value: bytes) -> None:
        """The store holds `value` at `key` (a key of any namespace)."""
        if not self.wants(key):
            return
        entry = self.decode(key, value)
        if entry is None:
            self.remove(key)  # whatever it held before is not the store's value any more
        else:
            self.offer(key, entry)

    def offer(self, key: str, entry: DiscoveryEntry) -> None:
        """`entry` is the store's at `key`: told to the sink if new or changed, and room is left."""
        if self._listed is not None:
            self._listed.add(key)
        known = self._entries.get(key)
        if known is entry or known == entry:
            return
        if known is None:
            if len(self._entries) >= self.max_entries:
                self.reject(key, "entry_limit", f"{self.max_entries} entries already held")
                return
            self._count(key, 1)
        self._entries[key] = entry
        self.sink.put(key, entry)

    def remove(self, key: str) -> bool:
        """`key` is gone from the store; whether the sink had been told of it."""
        if self._entries.pop(key, None) is None:
            return False
        self._count(key, -1)
        self.sink.delete(key)
        return True

    def begin_listing(self) -> None:
        """A full listing starts: keys it does not offer are deleted by `end_listing`."""
        self._listed = set()

    def abandon_listing(self) -> None:
        self._listed = None

    def end_listing(self) -> None:
        listed, self._listed = self._listed, None
        assert listed is not None, "end_listing without begin_listing"
        for key in [key for key in self._entries if key not in listed]:
            self.remove(key)
        self.sink.snapshot_complete()

    def snapshot_complete(self) -> None:
        self.sink.snapshot_complete()

    def _count(self, key: str, change: int) -> None:
        bucket = key.split("/", 2)[1]
        self._counts[bucket] += change
        self.telemetry.entries.labels(bucket).set(self._counts[bucket])


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class Backoff:
    """Delays between attempts: doubled after each failure, back to the first after a success."""

    def __init__(self, first: float = FIRST_RETRY_S, last: float = LAST_RETRY_S) -> None:
        self.first = first
        self.last = last
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    async def wait(self, stop: asyncio.Event) -> None:
        """Sleep the current delay (cut short by `stop`), then double it."""
        await wait_or_stop(stop, self.delay)
        self.delay = min(self.delay * 2, self.last)


class DiscoveryWatcher:
    """One backend's reader of the store: `run` until stopped; `state()` for /health."""

    backend: ClassVar[str]

    def __init__(self, view: DiscoveryView, telemetry: DiscoveryTelemetry, where: str) -> None:
        self.view = view
        self.telemetry = telemetry
        self.where = where  # the store, as logs show it
        self.connected = False
        self.last_error: str | None = None
        self.listings = 0

    @property
    def healthy(self) -> bool:
        return self.connected

    def state(self) -> DiscoveryState:
        return DiscoveryState(self.backend, self.connected, len(self.view), self.last_error)

    async def run(self, stop: asyncio.Event) -> None:
        raise NotImplementedError

    def _listed(self) -> None:
        """A full listing was applied: the view is the store's again."""
        if self.listings:
            self.telemetry.resyncs.inc()
        self.listings += 1
        if not self.connected:
            self.connected = True
            self.telemetry.connected.set(1)
            log.info("discovery store read", backend=self.backend, store=self.where, entries=len(self.view),
                     listing=self.listings, rate_limit="listed")

    def _failed(self, reason: str, message: str) -> None:
        """The store could not be read, or a watch of it ended: counted, and logged rarely."""
        self.telemetry.errors.labels(reason).inc()
        self.last_error = f"{reason}: {message}"[:1024]
        self.connected = False
        self.telemetry.connected.set(0)
        log.warning("discovery store not readable; retrying, its last entries kept", backend=self.backend,
                    store=self.where, reason=reason, error=message[:512], rate_limit=reason)


    def _bug(self, error: Exception) -> None:
        """Something here (or in the sink) raised: logged rarely, retried; the view is re-listed."""
        self.last_error = f"internal: {error!r}"[:1024]
        log.error("discovery watcher failed; retrying", backend=self.backend, error=repr(error)[:512],
                  rate_limit="bug", exc_info=error)


def discovery_watcher(config: DiscoveryConfig, namespace: str, sink: DiscoverySink,
                      registry: CollectorRegistry) -> DiscoveryWatcher:
    """The watcher `config` describes, feeding `sink` with the entries of `namespace`."""
    # Imported here: both backends import this module.
    from aggregator.edges.discovery_etcd import EtcdDiscovery
    from aggregator.edges.discovery_file import FileDiscovery

    telemetry = DiscoveryTelemetry(registry)
    view = DiscoveryView(namespace, sink, telemetry, max_entry_bytes=config.max_entry_bytes,
                         max_entries=config.max_entries)
    if config.backend == "file":
        return FileDiscovery(config, view, telemetry)
    return EtcdDiscovery(config, view, telemetry)
