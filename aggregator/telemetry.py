"""The aggregator's own health metrics (`llm_aggregator_*`).

Ordinary prometheus_client metrics; the children are looked up once, because
`labels()` on every message would cost more than decoding it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .protocol import REJECT_REASONS

KINDS = ("kv_metrics", "kv_hit_rate", "gpu_metrics")
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
