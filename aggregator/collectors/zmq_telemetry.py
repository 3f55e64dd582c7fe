"""The ZMQ event plane edge's own metrics (`llm_aggregator_zmq_*`), on a registry passed in.

What its messages carried is counted by the ingest pipeline (source `zmq`) and the event
plane's publisher table (`llm_aggregator_event_plane_*`); here is only the transport:
publishers subscribed to, connections made and lost, publishers refused. They change at the
pace of workers joining and leaving: plain prometheus_client metrics are cheap enough.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

PUBLISHER_LIMIT: Final = "publisher_limit"  # past --zmq-max-publishers
BAD_ENDPOINT: Final = "bad_endpoint"  # an advertised endpoint that is not tcp://host:port
SOCKET_ERROR: Final = "socket_error"  # no socket could be made: out of file descriptors
REFUSED_REASONS: Final = (PUBLISHER_LIMIT, BAD_ENDPOINT, SOCKET_ERROR)


class ZmqTelemetry:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.publishers = Gauge(
            "llm_aggregator_zmq_publishers",
            "ZMQ event publishers of the namespace (one per topic per worker process) found in the discovery "
            "store and subscribed to", registry=registry)
        self.endpoints = Gauge(
            "llm_aggregator_zmq_endpoints",
            "ZMQ endpoints the aggregator's subscriber is connected to (its handshake done), by mode: direct "
            "(publishers' own PUB sockets) or broker (XPUB sides of DYN_ZMQ_BROKER_URL)",
            ["mode"], registry=registry)
        self.disconnects = Counter(
            "llm_aggregator_zmq_disconnects",
            "ZMQ connections that closed while still wanted (a worker that stopped before its discovery entry "
            "went, a broker restart, a frame over --max-message-bytes); ZMQ reconnects by itself",
            registry=registry)
        self.refused = Counter(
            "llm_aggregator_zmq_publishers_refused",
            "ZMQ publishers in the discovery store not subscribed to, by reason", ["reason"], registry=registry)
        for mode in ("direct", "broker"):
            self.endpoints.labels(mode)
        for reason in REFUSED_REASONS:
            self.refused.labels(reason)
