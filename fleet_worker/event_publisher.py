"""Dynamo 1.x's event plane, publishing side: an EventPublisher per topic, on NATS or on a ZMQ PUB socket.

    publisher = EventPublisher(KV_METRICS_TOPIC, NatsEventTransport(nc, subject_prefix))
    await publisher.publish(encode_active_load(load))

As Dynamo's own `EventPublisher` (one per topic per worker process): a random
`publisher_id` masked to 53 bits (Dynamo keeps it exact in float64-backed JSON), a
`sequence` from 0 that every publish takes one of (taken before sending, so a failed send
is a gap, as in Dynamo), and the payload wrapped in an `EventEnvelope` with its
`published_at` in milliseconds. On NATS the envelope goes to `{subject_prefix}.{topic}`;
on ZMQ each publisher binds its own PUB socket and sends Dynamo's four frames. Where a
consumer finds either is the publisher's `channel()` (its discovery entry's transport).
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from collections.abc import Callable
from typing import Final, Protocol

import zmq
from nats.aio.client import Client

from fleet_protocol import (
    EventEnvelope,
    NatsConfig,
    NatsTransport,
    ZmqConfig,
    ZmqTransport,
    encode_envelope,
    encode_event_segment,
    encode_zmq_frames,
)

MAX_PUBLISHER_ID: Final = 2**53 - 1
# Dynamo's PUB socket settings: a deep send queue, and sends that never wait (a full queue drops).
ZMQ_SEND_HIGH_WATER_MARK: Final = 100_000


def new_publisher_id() -> int:
    """A random id, masked to 53 bits as Dynamo masks it; never 0, which reads as unset."""
    while True:
        publisher_id = secrets.randbits(64) & MAX_PUBLISHER_ID
        if publisher_id:
            return publisher_id


class EventTransport(Protocol):
    def channel(self) -> NatsTransport | ZmqTransport: ...

    async def send(self, envelope: EventEnvelope) -> None: ...

    def close(self) -> None: ...


class NatsEventTransport:
    """Core NATS, fire-and-forget: `{subject_prefix}.{topic}` (the topic percent-encoded as a subject token)."""

    def __init__(self, nc: Client, subject_prefix: str) -> None:
        self.nc = nc
        self.subject_prefix = subject_prefix

    def channel(self) -> NatsTransport:
        return NatsTransport(NatsConfig(self.subject_prefix))

    def subject(self, topic: str) -> str:
        return f"{self.subject_prefix}.{encode_event_segment(topic)}"

    async def send(self, envelope: EventEnvelope) -> None:
        await self.nc.publish(self.subject(envelope.topic), encode_envelope(envelope))

    def close(self) -> None:
        pass  # the connection is the caller's


class ZmqEventTransport:
    """A PUB socket of its own, bound to `host` on a port the OS picks; advertised as `tcp://host:port`.

    Messages sent before a subscriber connects are lost (PUB/SUB); `dropped` counts sends
    refused because the queue was full.
    """

    def __init__(self, context: zmq.Context, host: str = "127.0.0.1") -> None:
        address = ipaddress.ip_address(host)
        if address.is_unspecified:
            raise ValueError(f"{host} cannot be advertised: bind the address consumers can reach")
        shown = f"[{address}]" if address.version == 6 else str(address)
        self.socket = context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, ZMQ_SEND_HIGH_WATER_MARK)
        self.socket.setsockopt(zmq.LINGER, 0)
        if address.version == 6:
            self.socket.setsockopt(zmq.IPV6, 1)
        port = self.socket.bind_to_random_port(f"tcp://{shown}")
        self.endpoint = f"tcp://{shown}:{port}"
        self.dropped = 0

    def channel(self) -> ZmqTransport:
        return ZmqTransport(ZmqConfig(self.endpoint))

    async def send(self, envelope: EventEnvelope) -> None:
        try:
            self.socket.send_multipart(encode_zmq_frames(envelope), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        self.socket.close(linger=0)


class EventPublisher:
    """One topic's publisher: its id, its sequence, its transport."""

    def __init__(self, topic: str, transport: EventTransport, *, publisher_id: int | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.topic = topic
        self.transport = transport
        self.publisher_id = new_publisher_id() if publisher_id is None else publisher_id
        if not 0 < self.publisher_id <= MAX_PUBLISHER_ID:
            raise ValueError(f"publisher_id {self.publisher_id} is outside 1..2**53-1")
        self.sequence = 0  # the next message's
        self.wall_clock = wall_clock

    async def publish(self, payload: bytes) -> EventEnvelope:
        """Wrap `payload` (the topic's MessagePack) in the next envelope and send it; the envelope sent."""
        envelope = EventEnvelope(self.publisher_id, self.sequence, int(self.wall_clock() * 1000), self.topic,
                                 payload)
        self.sequence += 1
        await self.transport.send(envelope)
        return envelope

    def close(self) -> None:
        self.transport.close()
