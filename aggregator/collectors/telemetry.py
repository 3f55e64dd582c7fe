"""The aggregator's own health metrics (`llm_aggregator_*`).

The per-message counters are plain integers exported by a small collector: a
prometheus_client Counter takes a lock on every `inc()`, which cost a quarter of the
per-message ingest time. The rest are ordinary prometheus_client metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from fleet_protocol import REJECT_REASONS

KINDS = ("kv_metrics", "kv_hit_rate", "gpu_metrics", "component_metrics")
LIMIT_REASONS = ("worker_limit", "group_limit", "label_limit")


class Tally:
    """A counter without a lock: only the event loop's thread increments it."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class _MessageCounters(Collector):
    def __init__(self, telemetry: "Telemetry") -> None:
        self.telemetry = telemetry

    def collect(self) -> Iterator[Metric]:
        t = self.telemetry
        received = CounterMetricFamily(
            "llm_aggregator_messages_received", "Messages received from NATS, by kind", labels=["kind"])
        accepted = CounterMetricFamily(
            "llm_aggregator_messages_accepted", "Messages decoded and applied to the fleet state, by kind",
            labels=["kind"])
        rejected = CounterMetricFamily(
            "llm_aggregator_messages_rejected",
            "Messages dropped, by kind and reason (decode failures and cardinality limits)",
            labels=["kind", "reason"])
        for kind, tally in list(t.received.items()):
            received.add_metric([kind], tally.value)
        for kind, tally in list(t.accepted.items()):
            accepted.add_metric([kind], tally.value)
        for (kind, reason), tally in list(t.rejected.items()):
            rejected.add_metric([kind, reason], tally.value)
        yield from (received, accepted, rejected)

    def describe(self) -> Iterator[Metric]:
        return (Metric(family.name, family.documentation, family.type) for family in self.collect())


class Telemetry:
    def __init__(self, registry: CollectorRegistry, kinds=KINDS) -> None:
        self.received = {kind: Tally() for kind in kinds}
        self.accepted = {kind: Tally() for kind in kinds}
        self.rejected = {
            (kind, reason): Tally()
            for kind in kinds
            for reason in (*REJECT_REASONS, *LIMIT_REASONS)
        }
        registry.register(_MessageCounters(self))
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

    def add_kind(self, kind: str, reasons: tuple[str, ...] = ()) -> None:
        """Count a new message kind (its rejection reasons appear at 0 from the start)."""
        self.received.setdefault(kind, Tally())
        self.accepted.setdefault(kind, Tally())
        for reason in (*REJECT_REASONS, *LIMIT_REASONS, *reasons):
            self.rejected.setdefault((kind, reason), Tally())

    def reject(self, kind: str, reason: str) -> None:
        tally = self.rejected.get((kind, reason))
        if tally is None:
            tally = self.rejected[(kind, reason)] = Tally()
        tally.inc()


# Pull mode: scraping workers' NATS service stats ($SRV.STATS.{service}).
SCRAPE_REPLY_REASONS = REJECT_REASONS
SCRAPE_EDGE_REASONS = ("not_connected", "request_failed")


class StatsScrapeTelemetry:
    """`llm_aggregator_stats_scrape*`: one child per service, created up front so zeros are exported."""

    def __init__(self, registry: CollectorRegistry, services, endpoint_reasons=()) -> None:
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
            for reason in (*SCRAPE_EDGE_REASONS, *SCRAPE_REPLY_REASONS, *endpoint_reasons, *LIMIT_REASONS)
        }

    def error(self, service: str, reason: str) -> None:
        child = self.errors.get((service, reason))
        if child is None:
            child = self.errors[(service, reason)] = self._errors.labels(service, reason)
        child.inc()
