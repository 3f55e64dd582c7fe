"""Dynamo 1.x's ZMQ event plane (its default since 1.3), read: a `DiscoverySink` and a SUB socket per endpoint.

Direct mode: every publisher (one per topic per worker process) binds its own PUB socket and
registers `v1/event_channels/.../topic/{topic}/{publisher_id:x}` with its endpoint
`tcp://ip:port`. The service hands this edge every discovery change beside the fleet's own
sink; for each ZMQ endpoint of the namespace a SUB socket connects to it, read by its own
task on the event loop (asyncio wakes only the sockets with messages), and is closed when
the entry goes. One socket per endpoint, not one socket connected to all: libzmq 4.3 aborts
the process (`!_more`, fq.cpp) when `disconnect` removes a connection whose multipart
message is being read, which a worker that stops while publishing can cause. A message's
first frame is the bare topic, so whose it is comes from its publisher id, which must be a
channel the store lists for that topic.

Broker mode: publishers connect to a broker's XSUB side and register nothing; a socket
connects to each of the broker's XPUB sides and takes the namespace's subjects, which the
first frame carries whole. The brokers are the ones `DYN_ZMQ_BROKER_URL` (`--zmq-broker-url`)
names or, without it, those the discovery store lists, as Dynamo's workers find them with
`DYN_ZMQ_BROKER_ENABLED=true`: a component-scoped channel of component `zmq_broker` whose
transport is `ZmqBroker`, followed like any entry (subscribed when it appears, left when it
goes). With several brokers each event arrives once per broker: the publisher table drops
the later copies (`duplicate`).

Frames are decoded (fleet_protocol.decode_zmq_frames) into the envelope NATS carries, and go
into the ingest pipeline as source `zmq`, under the event-plane subject they stand for: the
same kinds, reasons, sequence tracking and fleet methods as NATS. PUB/SUB drops what a
publisher sent before the subscriber connected: its first sequence seen is counted as unseen
(`llm_aggregator_event_plane_unseen_events_total`), later gaps as lost (a full receive queue,
a dropped connection). Bounded: publishers subscribed to (`--zmq-max-publishers`; a discovered
broker counts once per XPUB endpoint), frame size
(ZMQ_MAXMSGSIZE from `--max-message-bytes`; ZMQ drops the connection of a peer that sends a
larger one, and reconnects), messages queued per connection (`--zmq-receive-hwm`). Each
endpoint costs three ZMQ sockets (its SUB socket and the two ends of its connection monitor)
and four file descriptors (its TCP connection and three mailboxes): the context allows the
sockets, and the soft RLIMIT_NOFILE is raised (up to the hard one) for the descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry
from zmq.utils.monitor import parse_monitor_message

import fleet_protocol as protocol
from aggregator.collectors.zmq_telemetry import BAD_ENDPOINT, PUBLISHER_LIMIT, SOCKET_ERROR, ZmqTelemetry
from aggregator.config import ZmqConfig, zmq_endpoint
from aggregator.ingest.pipeline import ZMQ, Ingest
from fleet_protocol import DiscoveryEntry, EventChannelEntry, MessageRejected, ZmqBrokerTransport, ZmqTransport

log = structlog.get_logger("aggregator.zmq")

# Messages taken off the socket before the event loop gets a turn.
BATCH: Final = 256
# ZMQ's reconnect delay to an endpoint that went away grows to this (ms) until its entry goes.
RECONNECT_MAX_MS: Final = 5000
SOCKETS_PER_ENDPOINT: Final = 3
FDS_PER_ENDPOINT: Final = 4
_FRAME_HEADER_BYTES: Final = 5
_BROKER_FIRST: Final = b"namespace."
_TOPICS: Final = tuple((topic.encode(), topic) for topic in protocol.EVENT_TOPICS)
DIRECT: Final = "direct"  # the modes of a subscription (the `mode` label)
BROKER: Final = "broker"


def _allow_descriptors(wanted: int) -> None:
    """Raise the soft limit on open files towards `wanted` (never above the hard limit, never down)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            log.warning("open-file limit not raised; ZMQ publishers past it will fail", soft=soft, wanted=target,
                        error=str(error))


@dataclass(frozen=True, slots=True)
class ZmqChannel:
    """One ZMQ publisher the discovery store lists: where to connect, and the subject its events stand for."""

    publisher_id: int
    endpoint: str
    topic: str
    subject: str


def zmq_channel(entry: DiscoveryEntry, namespace: str) -> ZmqChannel | None:
    """The channel an entry describes, if it is an endpoint-scoped ZMQ publisher of `namespace`.

    Raises ValueError for an endpoint that is not tcp://host:port.
    """
    if not isinstance(entry, EventChannelEntry) or not isinstance(entry.transport, ZmqTransport):
        return None
    scope = entry.scope.endpoint
    if scope is None or scope.namespace != namespace:
        return None
    endpoint = zmq_endpoint(entry.transport.config.endpoint)
    return ZmqChannel(entry.instance_id, endpoint, entry.topic,
                      protocol.endpoint_event_subject(scope.namespace, scope.component, scope.name, entry.topic))


def zmq_broker_xpub(entry: DiscoveryEntry, namespace: str) -> tuple[str, ...] | None:
    """The XPUB endpoints of a ZMQ broker of `namespace` the entry describes; None for any other entry.

    Raises ValueError for an endpoint that is not tcp://host:port.
    """
    if not isinstance(entry, EventChannelEntry) or not isinstance(entry.transport, ZmqBrokerTransport):
        return None
    scope = entry.scope
    if scope.endpoint is not None or scope.namespace != namespace or scope.component != protocol.ZMQ_BROKER_COMPONENT:
        return None
    return tuple(dict.fromkeys(zmq_endpoint(endpoint) for endpoint in entry.transport.config.xpub_endpoints))


class _Subscription:
    """One SUB socket connected to one endpoint (a publisher's PUB socket, or a broker's XPUB side)."""

    __slots__ = ("endpoint", "mode", "socket", "monitor", "tasks", "connected")

    def __init__(self, endpoint: str, mode: str) -> None:
        self.endpoint = endpoint
        self.mode = mode  # DIRECT or BROKER
        self.socket: zmq.asyncio.Socket | None = None
        self.monitor: zmq.asyncio.Socket | None = None
        self.tasks: list[asyncio.Task] = []
        self.connected = False


class ZmqEventPlane:
    """The `DiscoverySink` of ZMQ channels, and the SUB sockets reading them: `run` until stopped."""

    def __init__(self, config: ZmqConfig, ingest: Ingest, registry: CollectorRegistry,
                 keeps: Callable[[str], bool] | None = None) -> None:
        """`keeps`: whether an event subject is this shard's (ShardFilter.keeps): another shard's publishers
        are not subscribed to, and its events from a broker are dropped unread; all are kept when None."""
        self.config = config
        self.keeps = keeps
        self.namespace = ingest.namespace
        self.max_message_bytes = ingest.max_message_bytes
        self.feed = ingest.subject_feed(ZMQ)
        self.feed.count_unseen = True
        self.telemetry = ZmqTelemetry(registry)
        self.channels: dict[str, ZmqChannel] = {}  # by discovery key
        self.brokers: dict[str, tuple[str, ...]] = {}  # XPUB endpoints of the brokers discovered, by key
        self._by_publisher: dict[int, ZmqChannel] = {}
        self._endpoints: dict[str, int] = {}  # endpoint -> channels using it
        self._broker_endpoints: dict[str, int] = {}  # XPUB endpoint -> discovered brokers listing it
        self._subscriptions: dict[tuple[str, str], _Subscription] = {}  # by (mode, endpoint), while running
        self._context: zmq.asyncio.Context | None = None

    # The DiscoverySink side ----------------------------------------------------------

    def _in_use(self) -> int:
        """What counts against --zmq-max-publishers: the channels, and each discovered broker's XPUB endpoints."""
        return len(self.channels) + sum(len(xpub) for xpub in self.brokers.values())

    def _refuse_past_the_limit(self, key: str) -> None:
        self.telemetry.refused.labels(PUBLISHER_LIMIT).inc()
        log.warning("ZMQ publisher not subscribed to", key=key[:256], reason=PUBLISHER_LIMIT,
                    max_publishers=self.config.max_publishers, rate_limit=PUBLISHER_LIMIT)

    def put(self, key: str, entry: DiscoveryEntry) -> None:
        try:
            channel = zmq_channel(entry, self.namespace)
            xpub = zmq_broker_xpub(entry, self.namespace) if channel is None else None
        except ValueError as error:
            self.delete(key)
            self.telemetry.refused.labels(BAD_ENDPOINT).inc()
            log.warning("ZMQ publisher not subscribed to", key=key[:256], reason=BAD_ENDPOINT, detail=str(error),
                        rate_limit=BAD_ENDPOINT)
            return
        if xpub is not None:
            if key in self.channels:
                self.delete(key)
            self._put_broker(key, xpub)
            return
        self._delete_broker(key)
        if channel is None or (self.keeps is not None and not self.keeps(channel.subject)):
            self.delete(key)  # no longer a ZMQ channel of ours (or of this shard), if it was one
            return
        known = self.channels.get(key)
        if known == channel:
            return
        if known is not None:
            self.delete(key)
        elif self._in_use() >= self.config.max_publishers:
            self._refuse_past_the_limit(key)
            return
        self.channels[key] = channel
        self._by_publisher[channel.publisher_id] = channel
        self._hold(self._endpoints, channel.endpoint, DIRECT)
        self.telemetry.publishers.set(len(self.channels))

    def _put_broker(self, key: str, xpub: tuple[str, ...]) -> None:
        if self.config.broker_xpub:
            return  # DYN_ZMQ_BROKER_URL names the brokers, for the aggregator as for Dynamo's workers
        known = self.brokers.get(key)
        if known == xpub:
            return
        if known is not None:
            self.delete(key)
        if self._in_use() + len(xpub) > self.config.max_publishers:
            self._refuse_past_the_limit(key)
            return
        self.brokers[key] = xpub
        for endpoint in xpub:
            self._hold(self._broker_endpoints, endpoint, BROKER)
        log.info("ZMQ broker found in discovery", key=key[:256], xpub=list(xpub))

    def _delete_broker(self, key: str) -> bool:
        xpub = self.brokers.pop(key, None)
        if xpub is None:
            return False
        for endpoint in xpub:
            self._release(self._broker_endpoints, endpoint, BROKER)
        log.info("ZMQ broker gone from discovery", key=key[:256])
        return True

    def delete(self, key: str) -> None:
        if self._delete_broker(key):
            return
        channel = self.channels.pop(key, None)
        if channel is None:
            return
        if self._by_publisher.get(channel.publisher_id) is channel:
            del self._by_publisher[channel.publisher_id]
        self._release(self._endpoints, channel.endpoint, DIRECT)
        self.telemetry.publishers.set(len(self.channels))

    def _hold(self, users: dict[str, int], endpoint: str, mode: str) -> None:
        """One more user of `endpoint` (channels or brokers listing it); the first one subscribes, if running."""
        held = users.get(endpoint, 0)
        users[endpoint] = held + 1
        if not held and self._context is not None:
            self._subscribe(endpoint, mode)

    def _release(self, users: dict[str, int], endpoint: str, mode: str) -> None:
        """One user fewer of `endpoint`; the last one closes its subscription."""
        left = users[endpoint] - 1
        if left:
            users[endpoint] = left
            return
        del users[endpoint]
        subscription = self._subscriptions.pop((mode, endpoint), None)
        if subscription is not None:
            self._unsubscribe(subscription)

    def snapshot_complete(self) -> None:
        pass  # every change came through put and delete

    def health(self) -> dict[str, object]:
        """What /health reports: publishers and brokers known, and how many of their endpoints are connected."""
        return {"publishers": len(self.channels), "brokers": self._brokers(), "connected": self._connected()}

    def _brokers(self) -> list[str]:
        """The XPUB endpoints read: DYN_ZMQ_BROKER_URL's, or those the discovery store lists."""
        return [*self.config.broker_xpub, *self._broker_endpoints]

    def _connected(self) -> dict[str, int]:
        """Endpoints whose handshake is done, by mode."""
        connected = dict.fromkeys((DIRECT, BROKER), 0)
        for subscription in self._subscriptions.values():
            connected[subscription.mode] += subscription.connected
        return connected

    # Messages ------------------------------------------------------------------------

    def receive(self, frames: list[bytes]) -> bool:
        """One multipart message off the socket; True if it was used. Never raises for what a peer sent."""
        first = frames[0] if frames else b""
        if first.startswith(_BROKER_FIRST):
            return self._from_broker(frames, first)
        topic = next((name for raw, name in _TOPICS if first.startswith(raw)), None)
        kind = self.feed.event_kind(topic) if topic is not None else None
        if topic is None or kind is None:
            # The socket subscribes to these topics only, so a peer cannot get anything else through.
            log.warning("ZMQ message of a topic not subscribed to", first_frame=first[:64],
                        rate_limit=("unsubscribed",))
            return False
        channel = None
        try:
            event = protocol.decode_zmq_frames(frames, self.max_message_bytes)
            channel = self._by_publisher.get(event.publisher_id)
            if channel is None:
                raise MessageRejected(protocol.INCONSISTENT, f"publisher {event.publisher_id:x} is not a ZMQ "
                                                             f"channel of the discovery store")
            if channel.topic != event.topic:
                raise MessageRejected(protocol.INCONSISTENT, f"publisher {event.publisher_id:x} of {channel.topic} "
                                                             f"sent {event.topic[:64]!r}")
        except MessageRejected as error:
            subject = channel.subject if channel is not None else protocol.event_subject_pattern(self.namespace, topic)
            self.feed.reject(kind, subject, error.reason, error.detail, frames[-1] if frames else b"")
            return False
        return self.feed.handle_envelope(channel.subject, event.envelope, frames[3])

    def _from_broker(self, frames: list[bytes], first: bytes) -> bool:
        if self.keeps is not None and not self.keeps(first.decode(errors="replace")):
            return False  # another shard's (the broker carries the whole namespace)
        try:
            event = protocol.decode_zmq_frames(frames, self.max_message_bytes, broker=True)
        except MessageRejected as error:
            # Counted under the topic the subject ends in, if it is one of ours; others are not ours to count.
            topic = first.rsplit(b".", 1)[-1].decode(errors="replace")
            kind = self.feed.event_kind(topic)
            if kind is not None:
                self.feed.reject(kind, first[:256].decode(errors="replace"), error.reason, error.detail,
                                 frames[-1] if frames else b"")
            return False
        if self.feed.event_kind(event.topic) is None:
            return False  # another topic of the namespace (the broker carries all of them): not ours
        return self.feed.handle_envelope(first.decode(), event.envelope, frames[3])

    # The socket ------------------------------------------------------------------------

    def _subscribe(self, endpoint: str, mode: str) -> None:
        """A SUB socket for `endpoint`, its reader and its monitor's, started on the running loop."""
        assert self._context is not None
        try:
            socket = self._context.socket(zmq.SUB)
        except zmq.ZMQError as error:  # out of sockets or descriptors
            self.telemetry.refused.labels(SOCKET_ERROR).inc()
            log.warning("ZMQ endpoint not subscribed to", endpoint=endpoint, reason=SOCKET_ERROR, error=str(error),
                        rate_limit=SOCKET_ERROR)
            return
        subscription = _Subscription(endpoint, mode)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, self.config.receive_hwm)
        socket.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes + _FRAME_HEADER_BYTES)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
        if mode == BROKER:
            socket.setsockopt(zmq.SUBSCRIBE, f"namespace.{protocol.encode_event_segment(self.namespace)}.".encode())
        else:
            for topic in protocol.EVENT_TOPICS:
                socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        subscription.monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        socket.connect(endpoint)
        subscription.socket = socket
        subscription.tasks = [asyncio.create_task(self._read(socket), name=f"zmq-read {endpoint}"),
                              asyncio.create_task(self._watch(subscription), name=f"zmq-monitor {endpoint}")]
        self._subscriptions[(mode, endpoint)] = subscription

    def _unsubscribe(self, subscription: _Subscription) -> None:
        """Its tasks cancelled, its sockets closed (they close once the tasks have let go of them)."""
        for task in subscription.tasks:
            task.cancel()
        socket, monitor = subscription.socket, subscription.monitor
        subscription.socket = subscription.monitor = None
        if socket is not None:
            with contextlib.suppress(zmq.ZMQError):
                socket.disable_monitor()
            socket.close(linger=0)
        if monitor is not None:
            monitor.close(linger=0)
        if subscription.connected:
            subscription.connected = False
            self._set_connected()

    def _set_connected(self) -> None:
        for mode, connected in self._connected().items():
            self.telemetry.endpoints.labels(mode).set(connected)

    async def _read(self, socket: zmq.asyncio.Socket) -> None:
        # The asyncio socket waits; the plain one it shadows drains a batch without a future per message.
        plain: zmq.Socket = zmq.Socket.shadow(socket.underlying)
        receive = self.receive
        while True:
            await socket.poll()  # POLLIN, no timeout
            for _ in range(BATCH):
                try:
                    frames = plain.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    receive(frames)
                except Exception as error:  # a bug here must not stop the plane
                    log.error("ZMQ message not handled", error=repr(error)[:512], rate_limit="bug", exc_info=error)
            await asyncio.sleep(0)

    async def _watch(self, subscription: _Subscription) -> None:
        monitor = subscription.monitor
        assert monitor is not None
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            connected = event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
            if not connected and subscription.connected:
                self.telemetry.disconnects.inc()
            subscription.connected = connected
            self._set_connected()

    async def run(self, stop: asyncio.Event) -> None:
        endpoints = self.config.max_publishers + len(self.config.broker_xpub)
        self._context = zmq.asyncio.Context()
        self._context.set(zmq.MAX_SOCKETS, SOCKETS_PER_ENDPOINT * endpoints + 64)
        _allow_descriptors(FDS_PER_ENDPOINT * endpoints + 1024)
        for endpoint in self._brokers():
            self._subscribe(endpoint, BROKER)
        for endpoint in self._endpoints:
            self._subscribe(endpoint, DIRECT)
        log.info("ZMQ event plane subscribed", publishers=len(self.channels), brokers=self._brokers(),
                 max_publishers=self.config.max_publishers)
        try:
            await stop.wait()
        finally:
            self.close()

    def close(self) -> None:
        for subscription in list(self._subscriptions.values()):
            self._unsubscribe(subscription)
        self._subscriptions.clear()
        if self._context is not None:
            self._context.term()
            self._context = None
