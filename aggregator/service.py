"""The aggregator process: fleet state, NATS subscriber, expiry timer and HTTP server, wired together."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

import structlog
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from .collector import FleetCollector
from .fleet import Fleet
from .http import bound_port, build_app, start_server
from .ingest import Ingest
from .transport import NatsSubscriber
from .telemetry import Telemetry

log = structlog.get_logger("aggregator")

# Expiry runs on a timer (not only at scrape time, so memory is freed when nobody
# scrapes) and again right before each scrape (so a scrape never shows a stale worker).
_EXPIRY_TICKS_PER_WINDOW = 4


class Aggregator:
    def __init__(self, args: argparse.Namespace, *, connect_options: dict | None = None) -> None:
        self.args = args
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.telemetry = Telemetry(self.registry)
        self.fleet = Fleet(args.stale_after, max_workers=args.max_workers, default_endpoint=args.endpoint)
        self.registry.register(FleetCollector(self.fleet, gpu_hostname_label=args.gpu_hostname_label))
        self.ingest = Ingest(
            self.fleet,
            self.telemetry,
            namespace=args.namespace,
            default_component=args.component,
            max_message_bytes=args.max_message_bytes,
        )
        self.subscriber = NatsSubscriber(
            args.nats_url,
            self.ingest,
            self.telemetry,
            connect_options=connect_options,
            pending_msgs_limit=args.pending_msgs_limit,
        )
        self.started = time.monotonic()
        self.port: int | None = None

    def expire_now(self) -> None:
        expired = self.fleet.expire(time.monotonic())
        if not expired:
            return
        if len(expired) <= 10:
            for key in expired:
                log.info("worker expired", component=key.component, endpoint=key.endpoint,
                         worker_id=key.worker_id, dp_rank=key.dp_rank, stale_after=self.fleet.stale_after)
        else:
            log.info("workers expired", count=len(expired), stale_after=self.fleet.stale_after)

    def health(self) -> dict:
        nc = self.subscriber.nc
        return {
            "status": "ready" if self.subscriber.healthy else "notready",
            "nats": {
                "connected": bool(nc is not None and nc.is_connected),
                "subscribed": self.subscriber.subscribed,
                "servers": self.subscriber.servers,
            },
            "workers": len(self.fleet),
            "uptime_seconds": round(time.monotonic() - self.started, 3),
        }

    async def _expire_periodically(self, stop: asyncio.Event) -> None:
        period = max(self.fleet.stale_after / _EXPIRY_TICKS_PER_WINDOW, 0.05)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
            self.expire_now()

    async def run(self, stop: asyncio.Event) -> None:
        app = build_app(self.registry, self.telemetry, health=self.health, before_scrape=self.expire_now)
        runner = await start_server(app, self.args.host, self.args.port)
        self.port = bound_port(runner)
        log.info("serving metrics", url=f"http://{self.args.host}:{self.port}/metrics",
                 namespace=self.args.namespace, stale_after=self.args.stale_after)
        tasks = [
            asyncio.create_task(self._expire_periodically(stop), name="expiry"),
            asyncio.create_task(self.subscriber.connect(stop), name="nats-connect"),
        ]
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.subscriber.close()
            await runner.cleanup()
