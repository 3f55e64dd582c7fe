"""Push where nothing can scrape: the exposition PUT to a Prometheus Pushgateway every interval (--push-gateway).

Dynamo's old aggregator could push to a Pushgateway; this keeps that row, with
prometheus_client's own client (`push_to_gateway`). PUT, not POST (`pushadd_to_gateway`):
PUT replaces the whole group, so a worker that expired here is gone from the Pushgateway at
the next push; POST would keep its last values there for ever.

Each push renders and sends in a thread (`asyncio.to_thread`), so neither holds the event
loop that takes NATS messages and answers /metrics; expiry runs first, on the loop, as it
does before a scrape. One push at a time: intervals that pass while a push still runs are
skipped, and counted. A failed push is not retried: the next interval pushes the whole
state again, so nothing but freshness is lost. `user:password@` in the URL becomes HTTP
basic auth (prometheus_client's `basic_auth_handler`); the URL is logged without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import time
import urllib.error
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import basic_auth_handler, default_handler, push_to_gateway

from aggregator.config import PushGatewayConfig, without_credentials
from fleet_runtime.config_checks import redact_url

log = structlog.get_logger("aggregator.push_gateway")

FAILURE_REASONS = ("status_4xx", "status_5xx", "timeout", "connection")


def failure_reason(error: BaseException) -> str:
    """What went wrong with one HTTP request, as one of FAILURE_REASONS."""
    if isinstance(error, urllib.error.HTTPError):
        return "status_4xx" if error.code < 500 else "status_5xx"
    if isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError):
        return "timeout"
    return "connection"


class PushTelemetry:
    """`llm_aggregator_push_*`: what reached the Pushgateway, and what did not."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.samples = Counter("llm_aggregator_push_samples", "Samples in pushes the Pushgateway accepted",
                               registry=registry)
        failures = Counter("llm_aggregator_push_failures", "Pushes that failed, by reason (status_4xx, status_5xx, "
                           "timeout, connection); the next interval pushes the whole state again",
                           ["reason"], registry=registry)
        self.failures = {reason: failures.labels(reason) for reason in FAILURE_REASONS}
        self.missed = Counter("llm_aggregator_push_intervals_missed",
                              "Push intervals skipped because the push before was still running", registry=registry)
        self.last_success = Gauge("llm_aggregator_push_last_success_timestamp_seconds",
                                  "When the Pushgateway last accepted a push (Unix time); 0 before the first",
                                  registry=registry)
        self.duration = Histogram("llm_aggregator_push_duration_seconds", "Time to render and send one push",
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
                                  registry=registry)


class PushGatewayPusher:
    def __init__(self, config: PushGatewayConfig, registry: CollectorRegistry, *,
                 before_push: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.registry = registry
        self.before_push = before_push
        self.gateway, self._user, self._password = without_credentials(config.url)
        self.display_url = redact_url(config.url)
        self.grouping = dict(config.grouping)
        self.telemetry = PushTelemetry(registry)
        self._failing = False
        self._samples = 0  # of the push in progress

    def _handler(self, url: str, method: str, timeout: float | None, headers: list[tuple[str, str]],
                 data: bytes) -> Callable[[], None]:
        # Counted here, where prometheus_client hands over the body it rendered: its sample lines.
        self._samples = sum(1 for line in data.splitlines() if line and not line.startswith(b"#"))
        if self._user is not None:
            return basic_auth_handler(url, method, timeout, headers, data, self._user, self._password)
        return default_handler(url, method, timeout, headers, data)

    def push_once(self) -> bool:
        """Render and push the registry (blocking: run it in a thread). Whether the Pushgateway accepted it."""
        started = time.perf_counter()
        self._samples = 0
        try:
            push_to_gateway(self.gateway, job=self.config.job, registry=self.registry,
                            grouping_key=self.grouping, timeout=self.config.timeout, handler=self._handler)
        except (OSError, http.client.HTTPException) as error:  # HTTPException: a reply that is not HTTP
            reason = failure_reason(error)
            self.telemetry.failures[reason].inc()
            # Said once when pushes start failing and once when they recover, not at every interval.
            if not self._failing:
                log.warning("push to the Pushgateway failed; retrying every interval", url=self.display_url,
                            reason=reason, error=_described(error))
            self._failing = True
            return False
        finally:
            self.telemetry.duration.observe(time.perf_counter() - started)
        self.telemetry.samples.inc(self._samples)
        self.telemetry.last_success.set(time.time())
        if self._failing:
            log.info("pushing to the Pushgateway again", url=self.display_url)
        self._failing = False
        return True

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.config.interval
        log.info("pushing to a Pushgateway", url=self.display_url, job=self.config.job, grouping=self.grouping,
                 interval=interval)
        next_push = time.monotonic()
        while not stop.is_set():
            self.before_push()
            await asyncio.to_thread(self.push_once)
            next_push += interval
            now = time.monotonic()
            if now > next_push:
                missed = int((now - next_push) // interval) + 1
                self.telemetry.missed.inc(missed)
                next_push += missed * interval
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), next_push - now)


def _described(error: Any) -> str:
    """An error's text without the URL it may quote (urllib's errors do not include credentials, but be sure)."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    reason = getattr(error, "reason", None)
    return str(reason if reason is not None else error) or type(error).__name__
