"""The aggregator's own health metrics (`llm_aggregator_*`).

The per-message counters are ingest's plain integers (state/ingest_counts.py), exported by
`IngestCountsCollector`; the rest are ordinary prometheus_client metrics.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aggregator import rejects
from aggregator.collectors.ingest_counts import IngestCountsCollector
from aggregator.state.ingest_counts import IngestCounts


class Telemetry:
    def __init__(self, registry: CollectorRegistry, counts: IngestCounts | None = None) -> None:
        # What ingest counts per message; a fresh one for a telemetry made alone (tests).
        self.counts = counts if counts is not None else IngestCounts()
        registry.register(IngestCountsCollector(self.counts))
        self.nats_connected = Gauge(
            "llm_aggregator_nats_connected", "1 while connected to NATS and subscribed, else 0", registry=registry
        )
        self.nats_reconnects = Counter(
            "llm_aggregator_nats_reconnects", "Reconnections to NATS after a disconnect", registry=registry
        )
        self.nats_disconnects = Counter(
            "llm_aggregator_nats_disconnects", "Disconnections from NATS", registry=registry
        )
        self.nats_errors = Counter(
            "llm_aggregator_nats_errors", "Asynchronous errors reported by the NATS client", registry=registry
        )
        self.nats_slow_consumer_dropped = Counter(
            "llm_aggregator_nats_slow_consumer_dropped",
            "Messages dropped by the NATS client because a subscription's pending limits were reached",
            registry=registry,
        )
        self.scrape_duration = Histogram(
            "llm_aggregator_scrape_duration_seconds",
            "Time to collect and encode /metrics",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )


# Pull mode: scraping workers' NATS service stats ($SRV.STATS.{service}). Every reason a poll, a
# reply or an endpoint entry can fail for, in the order their children are created.
SCRAPE_REASONS = (*rejects.STATS_REQUEST, *rejects.WIRE, *rejects.STATS_ENDPOINT, *rejects.WORKER_LIMITS)


class StatsScrapeTelemetry:
    """`llm_aggregator_stats_scrape*`: one child per service, created up front so zeros are exported."""

    def __init__(self, registry: CollectorRegistry, services: Iterable[str]) -> None:
        services = list(services)
        labels = ["service"]
        scrapes = Counter("llm_aggregator_stats_scrapes", "Stats requests sent, by NATS service", labels,
                          registry=registry)
        duration = Histogram(
            "llm_aggregator_stats_scrape_duration_seconds",
            "Time from a stats request to the last reply received before the timeout "
            "(the timeout itself when no instance answered)",
            labels,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        replies = Counter("llm_aggregator_stats_scrape_replies", "Stats replies received (one per service instance)",
                          labels, registry=registry)
        timeouts = Counter("llm_aggregator_stats_scrape_timeouts",
                           "Stats requests that no service instance answered before the timeout", labels,
                           registry=registry)
        endpoints = Counter("llm_aggregator_stats_scrape_endpoints",
                            "Endpoint entries of stats replies applied to the fleet (outcome=accepted) or "
                            "skipped as not asked for (outcome=ignored)", ["service", "outcome"], registry=registry)
        errors = Counter("llm_aggregator_stats_scrape_errors",
                         "Stats requests, replies and endpoint entries that could not be used, by reason",
                         ["service", "reason"], registry=registry)
        self.scrapes = {s: scrapes.labels(s) for s in services}
        self.duration = {s: duration.labels(s) for s in services}
        self.replies = {s: replies.labels(s) for s in services}
        self.timeouts = {s: timeouts.labels(s) for s in services}
        self.accepted = {s: endpoints.labels(s, "accepted") for s in services}
        self.ignored = {s: endpoints.labels(s, "ignored") for s in services}
        self._errors = errors
        self.errors = {
            (s, reason): errors.labels(s, reason)
            for s in services
            for reason in SCRAPE_REASONS
        }

    def error(self, service: str, reason: str) -> None:
        child = self.errors.get((service, reason))
        if child is None:
            child = self.errors[(service, reason)] = self._errors.labels(service, reason)
        child.inc()

    def outcomes(self, service: str) -> ServiceOutcomes:
        """Where ingest counts the endpoint entries of `service`'s replies."""
        return ServiceOutcomes(self, service)


class _NotCounted:
    def inc(self, amount: int = 1) -> None:
        pass


class ServiceOutcomes:
    """A service's entries as ingest counts them: accepted in `_endpoints_total{outcome="accepted"}`,
    rejected in `_errors_total{reason}`; not each received (`_replies_total` counts the replies)."""

    __slots__ = ("_service", "_telemetry", "accepted")
    received = _NotCounted()

    def __init__(self, telemetry: StatsScrapeTelemetry, service: str) -> None:
        self.accepted = telemetry.accepted[service]
        self._telemetry = telemetry
        self._service = service

    def reject(self, reason: str) -> None:
        self._telemetry.error(self._service, reason)
