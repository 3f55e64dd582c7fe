"""The NATS edge: connect (and keep reconnecting), subscribe, hand messages to `Ingest`.

Messages on the aggregator's own subscriptions go from nats-py's protocol parser straight
to `Ingest.handle` (`DirectClient`), not through a Msg object, an asyncio.Queue and a
task per subscription: that path is ~2 µs of the ~3.5 µs nats-py spends per message, and
taking it out raises ingest at 1,000 workers from ~52 % to ~80 % of a bare nats-py
subscriber's rate (bench/RESULTS.md). It relies on one internal method of nats-py,
`Client._process_msg(sid, subject, reply, data, headers)`, checked at import; where a
nats-py release changes it, the aggregator logs so and uses the public callback path.

With direct delivery the client holds no queue of its own: it reads as fast as it
processes, and past that nats-server buffers up to its `max_pending` for the connection,
then cuts it off as a slow consumer (the aggregator reconnects and resubscribes).
`--pending-msgs-limit`/`--pending-bytes-limit` bound the queued path (messages with
headers or a reply subject, and the fallback).

A shard (`--shards`, ingest/shard_filter.py) subscribes to the same patterns and drops other
shards' messages before ingest, or, where nats-server splits the component subjects for it
(`--shard-subject-prefix`), subscribes to its partition's subjects and hands ingest each
message under its original subject.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterable

import structlog
from nats.aio.client import Client
from nats.errors import SlowConsumerError

from aggregator.collectors.telemetry import Telemetry
from aggregator.edges.nats_auth import redact_url
from aggregator.ingest.pipeline import Ingest
from aggregator.ingest.shard_filter import ShardFilter
from fleet_runtime.nats_settle import settle

log = structlog.get_logger("aggregator.nats")

_YIELD_EVERY = 64


def _direct_delivery_supported() -> bool:
    """Whether this nats-py has the parser hook DirectClient overrides, with the same parameters."""
    method = getattr(Client, "_process_msg", None)
    if method is None or not inspect.iscoroutinefunction(method):
        return False
    return list(inspect.signature(method).parameters) == ["self", "sid", "subject", "reply", "data", "headers"]


DIRECT_DELIVERY = _direct_delivery_supported()


class DirectClient(Client):
    """nats-py's client; messages of the subscriptions in `direct` (by sid) go from the protocol
    parser straight to their handler as (subject, payload) bytes. A message with headers or a
    reply subject, and every other subscription (requests, JetStream), take nats-py's own path."""

    def __init__(self) -> None:
        super().__init__()
        self.direct: dict[int, Callable[[bytes, bytes], object]] = {}

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        handler = self.direct.get(sid)
        if handler is None or headers or reply:
            return await super()._process_msg(sid, subject, reply, data, headers)
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        handler(subject, data)


class NatsSubscriber:
    def __init__(
        self,
        url: str,
        ingest: Ingest,
        telemetry: Telemetry,
        *,
        connect_options: dict | None = None,
        pending_msgs_limit: int = 512 * 1024,
        pending_bytes_limit: int = 128 * 1024 * 1024,
        name: str = "llm-aggregator",
        ping_interval: float = 5,
        skip_patterns: Iterable[str] = (),
        shard: ShardFilter | None = None,
    ) -> None:
        self.servers = [u.strip() for u in url.split(",") if u.strip()]
        self.display_servers = [redact_url(u) for u in self.servers]  # for logs and /health
        self.ingest = ingest
        self.telemetry = telemetry
        self.connect_options = connect_options or {}
        self.pending_msgs_limit = pending_msgs_limit
        self.pending_bytes_limit = pending_bytes_limit
        self.name = name
        self.ping_interval = ping_interval
        # Routes fed from elsewhere (the JetStream hit-rate journal) get no core subscription.
        self.skip_patterns = set(skip_patterns)
        self.shard = shard
        self.subjects: list[str] = []  # what it subscribed to
        self.nc: Client | None = None
        self.subscribed = False
        self._closing = False

    @property
    def healthy(self) -> bool:
        return self.nc is not None and self.nc.is_connected and self.subscribed

    async def _on_disconnected(self) -> None:
        self.telemetry.nats_connected.set(0)
        if self._closing:
            return
        self.telemetry.nats_disconnects.inc()
        log.warning("disconnected from NATS")

    async def _on_reconnected(self) -> None:
        self.telemetry.nats_connected.set(1)
        self.telemetry.nats_reconnects.inc()
        log.info("reconnected to NATS", server=self._server_name())

    async def _on_error(self, error: Exception) -> None:
        # Awaited inline by nats-py's reader (once per dropped message on a slow consumer):
        # count, and log rarely, so an overload is not made worse by logging.
        if isinstance(error, SlowConsumerError):
            self.telemetry.nats_slow_consumer_dropped.inc()
        else:
            self.telemetry.nats_errors.inc()
        key = type(error).__name__
        if isinstance(error, SlowConsumerError):
            log.warning("slow consumer: messages dropped", subject=error.subject, rate_limit=key)
        else:
            log.warning("NATS error", error=str(error) or key, rate_limit=key)

    def _server_name(self) -> str:
        url = self.nc.connected_url if self.nc is not None else None
        return f"{url.hostname}:{url.port}" if url is not None else ""  # never the userinfo

    async def connect(self, stop: asyncio.Event) -> bool:
        """Connect, retrying until NATS is up or `stop` is set; then subscribe."""
        delay = 0.2
        attempt = 0
        while not stop.is_set():
            attempt += 1
            try:
                nc = DirectClient() if DIRECT_DELIVERY else Client()
                await nc.connect(
                    servers=self.servers,
                    name=self.name,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    connect_timeout=2,
                    # nats-py annotates an int but sleeps on it: a float works.
                    ping_interval=self.ping_interval,  # type: ignore[arg-type]
                    max_outstanding_pings=2,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                    **self.connect_options,
                )
                self.nc = nc
                break
            except Exception as error:  # noqa: BLE001 - any failure to connect means "try again"
                if attempt == 1 or attempt % 10 == 0:
                    log.warning("NATS not reachable yet; retrying", servers=self.display_servers,
                                error=str(error) or type(error).__name__, attempt=attempt)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 5.0)
        if self.nc is None:
            return False
        await self.subscribe(p for p in self.ingest.routes if p not in self.skip_patterns)
        self.telemetry.nats_connected.set(1)
        log.info("connected to NATS", server=self._server_name(), subjects=sorted(self.subjects),
                 delivery="direct" if isinstance(self.nc, DirectClient) else "callback")
        return True

    async def subscribe(self, patterns: Iterable[str]) -> None:
        assert self.nc is not None
        for pattern in patterns:
            split = self.shard.split_by_server(pattern) if self.shard is not None else None
            subject = split or pattern
            # Where nats-server split the subjects, a message is this shard's and its subject starts with
            # `{prefix}.{index}.`; elsewhere a shard keeps its own share.
            strip = len(split) - len(pattern) if split else 0
            keeps = self.shard.keeps if self.shard is not None and not split else None
            subscription = await self.nc.subscribe(
                subject,
                cb=self._callback(pattern, strip, keeps),
                pending_msgs_limit=self.pending_msgs_limit,
                pending_bytes_limit=self.pending_bytes_limit,
            )
            self.subjects.append(subject)
            if isinstance(self.nc, DirectClient):
                # nats-py keeps a subscription's sid across reconnects (it resubscribes with it).
                self.nc.direct[subscription._id] = self._direct_handler(pattern, strip, keeps)
        await settle(self.nc)  # only then is the aggregator ready (/health)
        self.subscribed = True

    def _direct_handler(self, pattern: str, strip: int = 0,
                        keeps: Callable[[str], bool] | None = None) -> Callable[[bytes, bytes], None]:
        handle = self.ingest.handle

        def on_message(subject: bytes, data: bytes) -> None:
            # Called inside nats-py's protocol parser: whatever happens must not reach it, or the
            # connection would be torn down. Ingest.handle does not raise (tests/unit/test_hostile_input.py).
            try:
                # NATS does not require UTF-8 subjects; a bad byte only shows in the component label.
                handle(pattern, subject.decode("utf-8", "replace"), data)
            except Exception as error:  # noqa: BLE001 - see above
                self._failed(subject, error)

        def on_shard_message(subject: bytes, data: bytes) -> None:
            try:
                text = subject.decode("utf-8", "replace")[strip:]
                if keeps is None or keeps(text):
                    handle(pattern, text, data)
            except Exception as error:  # noqa: BLE001 - see above
                self._failed(subject, error)

        # The unsharded path stays as short as it was.
        return on_shard_message if strip or keeps is not None else on_message

    def _failed(self, subject: bytes, error: Exception) -> None:
        self.telemetry.nats_errors.inc()
        log.error("message handler failed", subject=subject.decode("utf-8", "replace"), error=repr(error),
                  rate_limit=type(error).__name__)

    def _callback(self, pattern: str, strip: int = 0, keeps: Callable[[str], bool] | None = None):
        handle = self.ingest.handle
        handled = 0

        async def on_message(msg) -> None:
            nonlocal handled
            subject = msg.subject[strip:]
            if keeps is None or keeps(subject):
                handle(pattern, subject, msg.data)
            handled += 1
            # nats-py runs callbacks back to back while the queue is non-empty; yielding bounds
            # HTTP's wait whatever the queue holds. A safeguard, not a measured fix: with nats-py
            # 2.16 the queue holds at most one socket read's worth (tests/integration/test_backlog.py).
            if handled % _YIELD_EVERY == 0:
                await asyncio.sleep(0)

        return on_message

    async def close(self) -> None:
        self._closing = True
        self.telemetry.nats_connected.set(0)
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), 5)
            except Exception:  # noqa: BLE001 - closing anyway
                await self.nc.close()
