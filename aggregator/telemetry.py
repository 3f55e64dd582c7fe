"""The aggregator's own health metrics (`llm_aggregator_*`).

Ordinary prometheus_client metrics; the children are looked up once, because
`labels()` on every message would cost more than decoding it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .protocol import REJECT_REASONS

KINDS = ("kv_metrics", "kv_hit_rate")
LIMIT_REASONS = ("worker_limit", "group_limit")


class Telemetry:
    def __init__(self, registry: CollectorRegistry, kinds=KINDS) -> None:
        received = Counter(
            "llm_aggregator_messages_received", "Messages received from NATS, by kind", ["kind"], registry=registry
        )
        accepted = Counter(
            "llm_aggregator_messages_accepted",
            "Messages decoded and applied to the fleet state, by kind",
            ["kind"],
            registry=registry,
        )
        rejected = Counter(
            "llm_aggregator_messages_rejected",
            "Messages dropped, by kind and reason (decode failures and cardinality limits)",
            ["kind", "reason"],
            registry=registry,
        )
        self.received = {kind: received.labels(kind) for kind in kinds}
        self.accepted = {kind: accepted.labels(kind) for kind in kinds}
        self.rejected = {
            (kind, reason): rejected.labels(kind, reason)
            for kind in kinds
            for reason in (*REJECT_REASONS, *LIMIT_REASONS)
        }
        self._rejected_family = rejected
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
        self.scrape_duration = Histogram(
            "llm_aggregator_scrape_duration_seconds",
            "Time to collect and encode /metrics",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )

    def reject(self, kind: str, reason: str) -> None:
        child = self.rejected.get((kind, reason))
        if child is None:
            child = self.rejected[(kind, reason)] = self._rejected_family.labels(kind, reason)
        child.inc()


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
