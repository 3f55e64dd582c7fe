"""Dynamo's discovery store as a source of the ingest pipeline: worker instances and their model cards.

The interface a discovery edge (aggregator/edges/discovery_*.py) calls is `DiscoverySink`,
three methods called on the event loop, which neither block nor raise:

- `put(key, entry)`: `entry` (a decoded `fleet_protocol` discovery entry) is now the store's
  value at `key` (`v1/{bucket}/...`, as etcd holds it), new or changed;
- `delete(key)`: the entry at `key`, put before, is gone (a clean shutdown, an expired etcd
  lease, a file whose keep-alive stopped);
- `snapshot_complete()`: a full listing has been applied; the keys put and not deleted are
  now all the store holds.

`DiscoveryIngest` is the sink. An entry goes through the pipeline as source `discovery`:
kinds `discovery_instance` (`v1/instances/...`) and `discovery_model_card` (`v1/mdc/...`),
counted like any message (received, accepted, rejected by reason) and applied by a fleet
method: an instance entry keeps its worker alive however idle (`Fleet.put_instance`), its
deletion drops the worker's ranks at once (`Fleet.delete_instance`); a model card gives its
ranks their capacity from `runtime_config` (`Fleet.put_model_card`). Rejected: a key that is
not a discovery key (wrong_type), a key whose id or names are not its entry's
(inconsistent), ranks past 65535 (out_of_range), a new worker past a limit. Entries of
another namespace, and the event buckets (event_channels, event_sources: for the ZMQ event
plane), are passed over without a count; so are another shard's components (`keeps`), counted
as skipped by the shard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

import structlog

import fleet_protocol as protocol
from aggregator.ingest.pipeline import Feed, Ingest, Observe
from aggregator.state.fleet import Fleet
from fleet_protocol import (
    INSTANCES,
    MODEL_CARDS,
    DiscoveryEntry,
    InstanceEntry,
    MessageRejected,
    ModelEntry,
)

log = structlog.get_logger("aggregator.ingest")

DISCOVERY: Final = "discovery"  # the source
INSTANCE: Final = "discovery_instance"  # kinds
MODEL_CARD: Final = "discovery_model_card"


class DiscoverySink(Protocol):
    """Where a discovery edge's changes go; called on the event loop, so it must neither block nor raise."""

    def put(self, key: str, entry: DiscoveryEntry) -> None:
        """`entry` is now the store's value of `key` (new, or changed)."""

    def delete(self, key: str) -> None:
        """`key`, put before, is gone from the store."""

    def snapshot_complete(self) -> None:
        """A full listing is applied: the keys put and not deleted are all the store holds."""


class DiscoverySinks:
    """One `DiscoverySink` that tells several, in order: the fleet's, then the edges that follow the
    store (the ZMQ event plane)."""

    def __init__(self, *sinks: DiscoverySink) -> None:
        self.sinks = sinks

    def put(self, key: str, entry: DiscoveryEntry) -> None:
        for sink in self.sinks:
            sink.put(key, entry)

    def delete(self, key: str) -> None:
        for sink in self.sinks:
            sink.delete(key)

    def snapshot_complete(self) -> None:
        for sink in self.sinks:
            sink.snapshot_complete()


def _put_instance(fleet: Fleet, component: str, item: tuple[str, InstanceEntry], now: float) -> None:
    fleet.put_instance(item[0], item[1], now)


def _delete_instance(fleet: Fleet, component: str, key: str, now: float) -> None:
    fleet.delete_instance(key, now)


def _put_model_card(fleet: Fleet, component: str, item: tuple[str, ModelEntry], now: float) -> None:
    fleet.put_model_card(item[0], item[1], now)


def _delete_model_card(fleet: Fleet, component: str, key: str, now: float) -> None:
    fleet.delete_model_card(key, now)


def _check_key(key: str, entry: InstanceEntry | ModelEntry) -> None:
    """The key must be of the entry's bucket, and name its id (and its names, where the key is not ambiguous)."""
    parsed = protocol.parse_discovery_key(key)
    bucket = INSTANCES if isinstance(entry, InstanceEntry) else MODEL_CARDS
    if parsed.bucket != bucket:
        raise MessageRejected(protocol.INCONSISTENT, f"a {bucket} entry at key {key[:256]!r}")
    if parsed.instance_id != entry.instance_id:
        raise MessageRejected(protocol.INCONSISTENT, f"key id {parsed.instance_id:x} != entry id {entry.instance_id:x}")
    if parsed.namespace is not None and (parsed.namespace, parsed.component, parsed.endpoint) != (
            entry.namespace, entry.component, entry.endpoint):
        raise MessageRejected(protocol.INCONSISTENT, "the key's names are not the entry's")


class DiscoveryIngest:
    """The `DiscoverySink` that feeds the fleet through the ingest pipeline."""

    def __init__(self, ingest: Ingest, keeps: Callable[[str], bool] | None = None) -> None:
        """`keeps`: whether a component's workers are this shard's (ShardFilter.keeps_component); all when None."""
        self.namespace = ingest.namespace
        self.keeps = keeps
        self.feed: Feed = ingest.feed(DISCOVERY)
        for kind in (INSTANCE, MODEL_CARD):
            self.feed.outcomes(kind)  # counted from 0
        self.snapshots = 0

    def put(self, key: str, entry: DiscoveryEntry) -> None:
        observe: Observe
        if isinstance(entry, InstanceEntry):
            kind, observe = INSTANCE, _put_instance
        elif isinstance(entry, ModelEntry):
            kind, observe = MODEL_CARD, _put_model_card
        else:
            return  # event channels and sources: the ZMQ event plane's
        if entry.namespace != self.namespace or (self.keeps is not None and not self.keeps(entry.component)):
            return
        try:
            _check_key(key, entry)
        except MessageRejected as error:
            self.feed.reject(kind, key, error.reason, error.detail)
            return
        self.feed.take(kind, key, observe, entry.component, (key, entry))

    def delete(self, key: str) -> None:
        if self.keeps is not None:
            try:
                component = protocol.parse_discovery_key(key).component
            except MessageRejected:
                component = None
            if component is not None and not self.keeps(component):
                return  # another shard's: never put here
        bucket = key.split("/", 2)[1] if key.count("/") >= 2 else ""
        if bucket == INSTANCES:
            self.feed.take(INSTANCE, key, _delete_instance, "", key)
        elif bucket == MODEL_CARDS:
            self.feed.take(MODEL_CARD, key, _delete_model_card, "", key)

    def snapshot_complete(self) -> None:
        self.snapshots += 1
