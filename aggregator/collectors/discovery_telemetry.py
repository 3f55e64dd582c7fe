"""The discovery edge's own metrics (`llm_aggregator_discovery_*`), on a registry passed in.

Every label value exists from the start (at 0), so a rate or an alert on a reason works
before its first occurrence. Entries change at the pace of workers joining and leaving:
plain prometheus_client metrics are cheap enough.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from fleet_protocol import BUCKETS, REJECT_REASONS

ENTRY_LIMIT: Final = "entry_limit"  # the store holds more entries of the namespace than max_entries
UNREACHABLE: Final = "unreachable"  # the store could not be reached or answered with an error
UNREADABLE: Final = "unreadable"  # a directory or file of the file backend could not be read
WATCH_LOST: Final = "watch_lost"  # an etcd watch ended or stopped answering
COMPACTED: Final = "compacted"  # etcd compacted the revision a watch needed: relisted
# etcd refused the user and password, or a token renewed just before, or the user may not read the keys,
# or it requires a user and none is configured. A token that expired and was renewed is not an error.
AUTH: Final = "auth"
TLS: Final = "tls"  # the TLS handshake with etcd failed: its certificate not trusted, or the client's refused
# Why an entry or the store is not read: the decoders' reasons, then the store's own.
ERROR_REASONS: Final = (*REJECT_REASONS, ENTRY_LIMIT, UNREACHABLE, UNREADABLE, WATCH_LOST, COMPACTED, AUTH, TLS)


class DiscoveryTelemetry:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.entries = Gauge(
            "llm_aggregator_discovery_entries",
            "Entries of the aggregator's namespace read from Dynamo's discovery store, by bucket",
            ["bucket"], registry=registry)
        self.errors = Counter(
            "llm_aggregator_discovery_errors",
            "Discovery entries dropped and store failures, by reason (a bad entry counts once per version)",
            ["reason"], registry=registry)
        self.connected = Gauge(
            "llm_aggregator_discovery_connected",
            "1 while the discovery store is read and its view is current, else 0", registry=registry)
        self.expired = Counter(
            "llm_aggregator_discovery_expired",
            "File-backend entries treated as gone because their keep-alive stopped (a killed worker)",
            registry=registry)
        self.resyncs = Counter(
            "llm_aggregator_discovery_resyncs",
            "Full listings of the store after the first one (a reconnect, a lost or compacted watch)",
            registry=registry)
        for bucket in BUCKETS:
            self.entries.labels(bucket)
        for reason in ERROR_REASONS:
            self.errors.labels(reason)
