"""The aggregator process: fleet state, NATS subscriber, expiry timer and HTTP server, wired together;
pull mode, the hit-rate journal and Dynamo's discovery store when configured."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

import fleet_protocol as protocol
from aggregator import rejects
from aggregator.collectors.component_metrics import ComponentMetricsCollector
from aggregator.collectors.dynamo_v1 import DynamoV1Collector
from aggregator.collectors.fleet_kv import FleetCollector, FleetGroupCollector
from aggregator.collectors.fleet_partials import FleetPartialsCollector
from aggregator.collectors.gpus import GpuCollector
from aggregator.collectors.group_table import GroupTableCollector
from aggregator.collectors.http_telemetry import HttpTelemetry
from aggregator.collectors.shard_telemetry import ShardCollector
from aggregator.collectors.status_view import StatusView
from aggregator.collectors.telemetry import StatsScrapeTelemetry, Telemetry
from aggregator.config import AggregatorConfig, PullConfig
from aggregator.edges import nats_auth, web_config
from aggregator.edges.discovery_store import discovery_watcher
from aggregator.edges.hit_rate_journal import HitRateJournal
from aggregator.edges.http_listener import ConnectionLimits
from aggregator.edges.http_server import ScrapeLimits, build_app, start_server
from aggregator.edges.nats_transport import NatsSubscriber
from aggregator.edges.push_gateway import PushGatewayPusher
from aggregator.edges.remote_write import RemoteWriter
from aggregator.edges.stats_scraper import StatsScraper
from aggregator.edges.status_page import StatusPage, nats_connection
from aggregator.edges.zmq_event_plane import ZmqEventPlane
from aggregator.ingest.component_snapshots import SnapshotLimits, snapshot_route
from aggregator.ingest.discovery_entries import DiscoveryIngest, DiscoverySinks
from aggregator.ingest.pipeline import Ingest
from aggregator.ingest.shard_filter import ShardFilter
from aggregator.ingest.stats_replies import plan_services
from aggregator.state.fleet import Fleet
from aggregator.state.ingest_counts import IngestCounts
from aggregator.state.kv_cache import KvBlockBudget

log = structlog.get_logger("aggregator")

# Expiry runs on a timer (not only at scrape time, so memory is freed when nobody
# scrapes) and again right before each scrape (so a scrape never shows a stale worker).
_EXPIRY_TICKS_PER_WINDOW = 4


class Aggregator:
    def __init__(self, config: AggregatorConfig, *, connect_options: dict | None = None) -> None:
        """Raises ValueError (or OSError) for a web config file or hit-rate snapshot that cannot be used."""
        self.config = config
        limits, component_metrics = config.limits, config.component_metrics
        # Loaded first: a file that cannot be used stops the start before anything else is set up.
        path = config.http.web_config_file
        self.web = web_config.load(path) if path is not None else web_config.WebConfig()
        # auto_describe: collectors without describe() (process_*, python_*) register their names, so
        # `name[]` finds them without collecting them for every selection (exposition/selection.py).
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.counts = IngestCounts()
        self.telemetry = Telemetry(self.registry, self.counts)
        self.http_telemetry = HttpTelemetry(self.registry)
        self.fleet = Fleet(limits.stale_after, max_workers=limits.max_workers, max_groups=limits.max_groups,
                           default_endpoint=config.endpoint,
                           max_component_series=component_metrics.max_series,
                           kv_blocks=KvBlockBudget(limits.max_cached_blocks_per_worker, limits.max_cached_blocks))
        # Group families in a collector of their own: a scrape selecting them renders no worker series.
        fleet_kv = FleetCollector(self.fleet, groups=False)
        gpus = GpuCollector(self.fleet, hostname_label=config.gpu_hostname_label)
        # A shard keeps its share of the fleet (docs/sharding.md); the whole fleet is shard 0 of 1.
        self.shard = ShardFilter(config.shard, config.component) if config.shard.count > 1 else None
        shard = self.shard
        for collector in (fleet_kv, FleetGroupCollector(self.fleet), FleetPartialsCollector(self.fleet), gpus, ComponentMetricsCollector(self.fleet),
                          GroupTableCollector(self.fleet),
                          ShardCollector(config.shard, lambda: shard.skipped if shard is not None else 0)):
            self.registry.register(collector)
        # The collectors' render caches follow the workers (a GPU reading is rendered as it arrives).
        self.fleet.add_listener(fleet_kv.labels)
        self.fleet.add_listener(gpus.readings)
        self.ingest = Ingest(
            self.fleet,
            self.counts,
            namespace=config.namespace,
            default_component=config.component,
            max_message_bytes=limits.max_message_bytes,
        )
        self.registry.register(DynamoV1Collector(self.fleet, fleet_kv.labels, self.ingest.event_publishers))
        # Opt-in: Dynamo's discovery store, for 1.x workers' liveness and capacity.
        self.discovery: DiscoveryIngest | None = None
        self.discovery_watcher = None
        # Dynamo's default event plane: ZMQ publishers found in the discovery store, or a broker.
        self.zmq: ZmqEventPlane | None = None
        if (config.discovery is not None and config.zmq.max_publishers) or config.zmq.broker_xpub:
            self.zmq = ZmqEventPlane(config.zmq, self.ingest, self.registry,
                                     keeps=shard.keeps if shard is not None else None)
        if config.discovery is not None:
            self.discovery = DiscoveryIngest(self.ingest, keeps=shard.keeps_component if shard is not None else None)
            sink = self.discovery if self.zmq is None else DiscoverySinks(self.discovery, self.zmq)
            self.discovery_watcher = discovery_watcher(config.discovery, config.namespace, sink, self.registry)
        # Opt-in: hit-rate events from a JetStream stream, sums restored from a snapshot.
        self.journal = (
            HitRateJournal(config.journal, self.ingest, self.registry,
                           keeps=self.shard.keeps if self.shard is not None else None)
            if config.journal is not None else None
        )
        if self.journal is not None:
            self.journal.load()
        snapshot_limits = SnapshotLimits(component_metrics.prefixes, component_metrics.max_series_per_worker)
        self.ingest.add_route(protocol.COMPONENT_METRICS, "component_metrics",
                              snapshot_route(snapshot_limits, component_metrics.max_bytes),
                              reasons=rejects.COMPONENT_METRICS)
        nats = config.nats
        self.subscriber = NatsSubscriber(
            ",".join(nats.urls),
            self.ingest,
            self.telemetry,
            connect_options={**nats_auth.connect_options(nats), **(connect_options or {})},
            pending_msgs_limit=nats.pending_msgs_limit,
            pending_bytes_limit=nats.pending_bytes_limit,
            ping_interval=nats.ping_interval,
            skip_patterns=self.journal.patterns if self.journal else (),
            shard=self.shard,
        )
        self.scraper = self._stats_scraper(config.pull) if config.pull is not None else None
        # Opt-in: for where nothing scrapes /metrics. Each expires workers first, as a scrape does.
        self.pusher = (PushGatewayPusher(config.push_gateway, self.registry, before_push=self.expire_now)
                       if config.push_gateway is not None else None)
        self.remote_writer = (RemoteWriter(config.remote_write, self.registry, before_collect=self.expire_now)
                              if config.remote_write is not None else None)
        self.started = time.monotonic()
        self.port: int | None = None
        self.status = StatusView(self.fleet, self.counts, self.ingest.subjects,
                                 nats=nats_connection(self.subscriber), started=self.started)

    def _stats_scraper(self, pull: PullConfig) -> StatsScraper | None:
        """Pull mode, on the subscriber's connection (it polls only while that one is connected)."""
        plans = plan_services(self.config.namespace, pull.targets)
        if not plans:
            return None
        telemetry = StatsScrapeTelemetry(self.registry, [plan.service for plan in plans])
        return StatsScraper(plans, self.ingest, telemetry, connection=lambda: self.subscriber.nc,
                            poll_interval=pull.poll_interval, timeout=pull.timeout,
                            max_message_bytes=self.config.limits.max_message_bytes)

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
        health = {
            "status": "ready" if self.subscriber.healthy else "notready",
            "nats": {
                "connected": bool(nc is not None and nc.is_connected),
                "subscribed": self.subscriber.subscribed,
                "servers": self.subscriber.display_servers,
            },
            "workers": len(self.fleet),
            "uptime_seconds": round(time.monotonic() - self.started, 3),
        }
        if self.discovery_watcher is not None:
            # Reported, not part of `status`: while the store cannot be read its last view stands.
            health["discovery"] = self.discovery_watcher.state().health()
        if self.zmq is not None:
            health["zmq"] = self.zmq.health()  # reported, not part of `status`, like discovery
        return health

    async def _expire_periodically(self, stop: asyncio.Event) -> None:
        period = max(self.fleet.stale_after / _EXPIRY_TICKS_PER_WINDOW, 0.05)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
            self.expire_now()

    async def run(self, stop: asyncio.Event) -> None:
        web, http = self.web, self.config.http
        middlewares = (web_config.basic_auth_middleware(web.users, self.http_telemetry),) if web.users else ()
        status_page = StatusPage(self.status, before_read=self.expire_now)
        app = build_app(self.registry, self.telemetry, health=self.health, before_scrape=self.expire_now,
                        middlewares=middlewares, http_telemetry=self.http_telemetry,
                        limits=ScrapeLimits(http.max_scrapes, http.write_timeout), routes=status_page.routes())
        server = await start_server(app, http.host, http.port, ssl_context=web.ssl_context,
                                    limits=ConnectionLimits(http.max_connections, http.header_timeout,
                                                            http.idle_timeout),
                                    telemetry=self.http_telemetry)
        self.port = server.port
        log.info("serving metrics", url=f"{web.scheme}://{http.host}:{self.port}/metrics",
                 basic_auth=bool(web.users), namespace=self.config.namespace,
                 stale_after=self.config.limits.stale_after, nats_auth=nats_auth.describe(self.config.nats))
        tasks = [
            asyncio.create_task(self._expire_periodically(stop), name="expiry"),
            asyncio.create_task(self.subscriber.connect(stop), name="nats-connect"),
        ]
        if self.scraper is not None:
            tasks.append(asyncio.create_task(self.scraper.run(stop), name="stats-scrape"))
        if self.journal is not None:
            tasks.append(asyncio.create_task(self.journal.run(self.subscriber, stop), name="hit-rate-journal"))
        if self.pusher is not None:
            tasks.append(asyncio.create_task(self.pusher.run(stop), name="push-gateway"))
        if self.remote_writer is not None:
            tasks.append(asyncio.create_task(self.remote_writer.run(stop), name="remote-write"))
        if self.zmq is not None:
            tasks.append(asyncio.create_task(self.zmq.run(stop), name="zmq-event-plane"))
        if self.discovery_watcher is not None:
            tasks.append(asyncio.create_task(self.discovery_watcher.run(stop), name="discovery"))
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
