"""The NATS edge: connect (and keep reconnecting), subscribe, hand messages to `Ingest`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import nats
import structlog
from nats.aio.client import Client
from nats.errors import SlowConsumerError

from .ingest import Ingest
from .nats_auth import redact_url
from .logs import LogLimiter
from .telemetry import Telemetry

log = structlog.get_logger("aggregator.nats")

_YIELD_EVERY = 64


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
        self.nc: Client | None = None
        self.subscribed = False
        self._closing = False
        self._error_log = LogLimiter(interval=10.0)

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
        suppressed = self._error_log.allow(key)
        if suppressed is not None:
            if isinstance(error, SlowConsumerError):
                log.warning("slow consumer: messages dropped", subject=error.subject,
                            suppressed_since_last=suppressed)
            else:
                log.warning("NATS error", error=str(error) or key, suppressed_since_last=suppressed)

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
                self.nc = await nats.connect(
                    servers=self.servers,
                    name=self.name,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    connect_timeout=2,
                    ping_interval=self.ping_interval,
                    max_outstanding_pings=2,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                    **self.connect_options,
                )
                break
            except Exception as error:  # noqa: BLE001 - any failure to connect means "try again"
                if attempt == 1 or attempt % 10 == 0:
                    log.warning("NATS not reachable yet; retrying", servers=self.display_servers,
                                error=str(error) or type(error).__name__, attempt=attempt)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, 5.0)
        if self.nc is None:
            return False
        await self.subscribe(p for p in self.ingest.routes if p not in self.skip_patterns)
        self.telemetry.nats_connected.set(1)
        log.info("connected to NATS", server=self._server_name(),
                 subjects=sorted(p for p in self.ingest.routes if p not in self.skip_patterns))
        return True

    async def subscribe(self, patterns: Iterable[str]) -> None:
        assert self.nc is not None
        for pattern in patterns:
            await self.nc.subscribe(
                pattern,
                cb=self._callback(pattern),
                pending_msgs_limit=self.pending_msgs_limit,
                pending_bytes_limit=self.pending_bytes_limit,
            )
        await self.nc.flush()
        self.subscribed = True

    def _callback(self, pattern: str):
        handle = self.ingest.handle
        handled = 0

        async def on_message(msg) -> None:
            nonlocal handled
            handle(pattern, msg.subject, msg.data)
            handled += 1
            # nats-py runs callbacks back to back while the queue is non-empty; yielding bounds
            # HTTP's wait whatever the queue holds. A safeguard, not a measured fix: with nats-py
            # 2.16 the queue holds at most one socket read's worth (tests/test_backlog.py).
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
