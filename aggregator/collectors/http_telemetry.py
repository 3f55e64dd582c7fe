"""The HTTP edge's own metrics (`llm_aggregator_http_*`, `llm_aggregator_scrape_renders_total`):
what its limits refused or cut, so a hostile or broken client shows up on a dashboard."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

ACCEPT_ERRORS = ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM", "other")
CLOSE_REASONS = ("header_timeout", "write_timeout", "tls_handshake")
REFUSE_REASONS = ("unauthorized", "auth_busy", "scrape_limit")


class HttpTelemetry:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.connections = Gauge(
            "llm_aggregator_http_connections", "HTTP connections open (at most --http-max-connections)",
            registry=registry)
        closed = Counter(
            "llm_aggregator_http_connections_closed",
            "HTTP connections the server closed on a limit: no complete request header within "
            "--http-header-timeout, a response not taken within --http-write-timeout, a failed TLS handshake",
            ["reason"], registry=registry)
        refused = Counter(
            "llm_aggregator_http_requests_refused",
            "HTTP requests answered without being served: 401 (unauthorized), 503 while too many password "
            "checks wait (auth_busy) or --http-max-scrapes scrapes are in flight (scrape_limit)",
            ["reason"], registry=registry)
        accept_errors = Counter(
            "llm_aggregator_http_accept_errors",
            "Failures to accept an HTTP connection, by errno (EMFILE: out of file descriptors); "
            "accepting resumes when a connection closes",
            ["errno"], registry=registry)
        self.renders = Counter(
            "llm_aggregator_scrape_renders",
            "Renders of /metrics; concurrent scrapes of the same format share one", registry=registry)
        self.closed = {reason: closed.labels(reason) for reason in CLOSE_REASONS}
        self.refused = {reason: refused.labels(reason) for reason in REFUSE_REASONS}
        self.accept_errors = {name: accept_errors.labels(name) for name in ACCEPT_ERRORS}
