"""One Dynamo 1.x worker's publishing side: its three event-plane topics and its discovery entries.

    plane = NatsEventPlane(nc)  # or ZmqEventPlane(zmq.Context(), host="127.0.0.1")
    worker = EventPlaneWorker(WorkerEndpoint("dynamo", "backend", "generate", worker_id), plane,
                              dp_ranks=range(2), store=FileKvStore(directory), model=ModelCardValues(...))
    worker.register()  # instance, model card, one event channel per publisher
    await worker.load.publish(dp_rank=0, active_decode_blocks=40, kv_used_blocks=40)
    await worker.forward_passes.publish(0, wall_time, scheduled, queued)
    await worker.kv_events[0].stored([(block_hash, tokens_hash)], parent_hash=None)
    worker.close()  # entries deleted, sockets closed

As a Dynamo worker process is laid out: one `kv_metrics` publisher (all ranks), one
`forward-pass-metrics` publisher (all ranks), one `kv-events` publisher per dp_rank (each
a source of its own, with its `event_sources` entry); each publisher has its own id,
sequence and, on ZMQ, its own PUB socket. The worker id is the instance id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

import zmq
from nats.aio.client import Client

from fleet_protocol import FORWARD_PASS_METRICS_TOPIC, KV_EVENTS_TOPIC, KV_METRICS_TOPIC

from .discovery_entries import (
    ModelCardValues,
    WorkerEndpoint,
    event_channel_entry,
    event_source_entry,
    instance_entry,
    model_entry,
)
from .event_publisher import EventPublisher, EventTransport, NatsEventTransport, ZmqEventTransport
from .file_kv_store import FileKvStore
from .topic_publishers import ActiveLoadPublisher, ForwardPassPublisher, KvEventPublisher


class EventPlane(Protocol):
    """Where a worker's publishers send (Dynamo's `DYN_EVENT_PLANE`)."""

    name: str

    def transport(self, worker: WorkerEndpoint) -> EventTransport: ...


class NatsEventPlane:
    name = "nats"

    def __init__(self, nc: Client) -> None:
        self.nc = nc

    def transport(self, worker: WorkerEndpoint) -> EventTransport:
        return NatsEventTransport(self.nc, worker.subject_prefix)


class ZmqEventPlane:
    """A PUB socket per publisher, bound to `host` (Dynamo's `DYN_EVENT_PLANE_HOST`) on an ephemeral port."""

    name = "zmq"

    def __init__(self, context: zmq.Context, host: str = "127.0.0.1") -> None:
        self.context = context
        self.host = host

    def transport(self, worker: WorkerEndpoint) -> EventTransport:
        return ZmqEventTransport(self.context, self.host)


class EventPlaneWorker:
    def __init__(self, worker: WorkerEndpoint, plane: EventPlane, *, dp_ranks: Iterable[int] = (0,),
                 store: FileKvStore | None = None, model: ModelCardValues | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.worker = worker
        self.store = store
        self.model = model
        self.keys: list[str] = []
        ranks = list(dp_ranks)
        worker_id = worker.instance_id
        self.load = ActiveLoadPublisher(EventPublisher(KV_METRICS_TOPIC, plane.transport(worker)), worker_id)
        self.forward_passes = ForwardPassPublisher(
            EventPublisher(FORWARD_PASS_METRICS_TOPIC, plane.transport(worker)), worker_id, ranks, clock)
        self.kv_events = {rank: KvEventPublisher(EventPublisher(KV_EVENTS_TOPIC, plane.transport(worker)),
                                                 worker_id, rank) for rank in ranks}

    @property
    def publishers(self) -> list[EventPublisher]:
        return [self.load.events, self.forward_passes.events, *(kv.events for kv in self.kv_events.values())]

    def entries(self) -> list[tuple[str, bytes]]:
        """Every (key, value) this worker registers."""
        found = [instance_entry(self.worker)]
        if self.model is not None:
            found.append(model_entry(self.worker, self.model))
        for publisher in self.publishers:
            found.append(event_channel_entry(self.worker, publisher.topic, publisher.publisher_id,
                                             publisher.transport.channel()))
        for rank, kv in self.kv_events.items():
            found.append(event_source_entry(self.worker, KV_EVENTS_TOPIC, kv.events.publisher_id, rank))
        return found

    def register(self) -> None:
        """Write this worker's entries into its store (nothing without one)."""
        if self.store is None:
            return
        for key, value in self.entries():
            self.store.put(key, value)
            self.keys.append(key)

    def close(self) -> None:
        """A clean stop: the entries first (no reader is left pointing at a closed socket), then the publishers."""
        if self.store is not None:
            for key in self.keys:
                self.store.delete(key)
        self.keys.clear()
        for publisher in self.publishers:
            publisher.close()
