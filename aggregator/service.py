"""The aggregator process: fleet state, NATS subscriber, expiry timer and HTTP server, wired together."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

import structlog
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

import fleet_protocol as protocol
from aggregator.collectors.fleet_kv import FleetCollector
from aggregator.collectors.group_table import GroupTableCollector
from aggregator.collectors.http_telemetry import HttpTelemetry
from aggregator.collectors.telemetry import StatsScrapeTelemetry, Telemetry
from aggregator.component_metrics import (
    ComponentMetricsCollector,
    SnapshotLimits,
    snapshot_route,
)
from aggregator.edges import nats_auth
from aggregator.edges.hit_rate_journal import HitRateJournal
from aggregator.edges.http_listener import ConnectionLimits
from aggregator.edges.http_server import ScrapeLimits, build_app, start_server
from aggregator.edges.nats_transport import NatsSubscriber
from aggregator.edges.stats_scraper import StatsScraper
from aggregator.edges.web_config import basic_auth_middleware
from aggregator.ingest.pipeline import Ingest
from aggregator.ingest.stats_replies import ENDPOINT_REASONS, plan_services
from aggregator.state.fleet import Fleet

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
        self.http_telemetry = HttpTelemetry(self.registry)
        self.fleet = Fleet(args.stale_after, max_workers=args.max_workers, max_groups=args.max_groups,
                           default_endpoint=args.endpoint,
                           max_component_series=args.component_metrics_max_series)
        self.registry.register(FleetCollector(self.fleet, gpu_hostname_label=args.gpu_hostname_label))
        self.registry.register(ComponentMetricsCollector(self.fleet))
        self.registry.register(GroupTableCollector(self.fleet))
        self.ingest = Ingest(
            self.fleet,
            self.telemetry,
            namespace=args.namespace,
            default_component=args.component,
            max_message_bytes=args.max_message_bytes,
        )
        # Opt-in: hit-rate events from a JetStream stream, sums restored from a snapshot.
        self.journal = (
            HitRateJournal(args, self.ingest, self.registry) if getattr(args, "hit_rate_stream", None) else None
        )
        if self.journal is not None:
            self.journal.load()
        limits = SnapshotLimits(args.component_metrics_prefixes, args.component_metrics_max_series_per_worker)
        self.ingest.add_route(protocol.COMPONENT_METRICS, "component_metrics",
                              snapshot_route(limits, args.component_metrics_max_bytes))
        self.subscriber = NatsSubscriber(
            args.nats_url,
            self.ingest,
            self.telemetry,
            connect_options={**nats_auth.connect_options(args), **(connect_options or {})},
            pending_msgs_limit=args.pending_msgs_limit,
            pending_bytes_limit=args.pending_bytes_limit,
            ping_interval=args.nats_ping_interval,
            skip_patterns=self.journal.patterns if self.journal else (),
        )
        self.scraper = self._stats_scraper(args)
        self.started = time.monotonic()
        self.port: int | None = None

    def _stats_scraper(self, args: argparse.Namespace) -> StatsScraper | None:
        """Pull mode, on the subscriber's connection (it polls only while that one is connected)."""
        plans = plan_services(args.namespace, getattr(args, "scrape", None) or [])
        if not plans:
            return None
        telemetry = StatsScrapeTelemetry(self.registry, [plan.service for plan in plans], ENDPOINT_REASONS)
        return StatsScraper(plans, self.fleet, telemetry, connection=lambda: self.subscriber.nc,
                            poll_interval=args.poll_interval, timeout=args.scrape_timeout,
                            max_message_bytes=args.max_message_bytes)

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
                "servers": self.subscriber.display_servers,
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
        web = self.args.web_config
        middlewares = (basic_auth_middleware(web.users, self.http_telemetry),) if web.users else ()
        args = self.args
        app = build_app(self.registry, self.telemetry, health=self.health, before_scrape=self.expire_now,
                        middlewares=middlewares, http_telemetry=self.http_telemetry,
                        limits=ScrapeLimits(args.http_max_scrapes, args.http_write_timeout))
        server = await start_server(app, args.host, args.port, ssl_context=web.ssl_context,
                                    limits=ConnectionLimits(args.http_max_connections, args.http_header_timeout,
                                                            args.http_idle_timeout),
                                    telemetry=self.http_telemetry)
        self.port = server.port
        log.info("serving metrics", url=f"{web.scheme}://{self.args.host}:{self.port}/metrics",
                 basic_auth=bool(web.users), namespace=self.args.namespace, stale_after=self.args.stale_after,
                 nats_auth=nats_auth.describe(self.args))
        tasks = [
            asyncio.create_task(self._expire_periodically(stop), name="expiry"),
            asyncio.create_task(self.subscriber.connect(stop), name="nats-connect"),
        ]
        if self.scraper is not None:
            tasks.append(asyncio.create_task(self.scraper.run(stop), name="stats-scrape"))
        if self.journal is not None:
            tasks.append(asyncio.create_task(self.journal.run(self.subscriber, stop), name="hit-rate-journal"))
        try:
            await stop.wait()
        finally:
            log.info("shutting down")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.journal is not None:
                await self.journal.close()  # final snapshot before the connection goes
            await self.subscriber.close()
            await server.close()
            log.info("stopped")
