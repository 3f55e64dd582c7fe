"""Pull mode's NATS edge: poll `$SRV.STATS.{service}` and fold the replies into the fleet.

Every `poll_interval` one stats request per service goes out with a fresh reply inbox;
every instance of the service answers once, and replies are read as they arrive until
`timeout` (shorter than the interval, so polls never overlap). Each wanted endpoint of a
reply becomes a `LoadEvent` applied through `Fleet.observe_load`, exactly as a pushed
`kv_metrics` message is, so expiry and every `llm_*` series treat pushed and pulled
workers alike. A worker that stops answering simply stops being refreshed and expires
after `--stale-after`.

Nothing here raises out of the polling loop: a failed request, a silent service or a
bad reply is counted (`llm_aggregator_stats_scrape_*`), logged rate-limited, and the
next poll goes ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog
from nats.aio.client import Client

from aggregator.collectors.telemetry import StatsScrapeTelemetry
from aggregator.ingest.stats_replies import ServicePlan, read_stats_reply
from aggregator.state.fleet import Fleet, LimitExceeded
from fleet_protocol import LoadEvent, MessageRejected
from fleet_runtime.logs import LogLimiter

log = structlog.get_logger("aggregator.stats_scrape")


class StatsScraper:
    def __init__(
        self,
        plans: list[ServicePlan],
        fleet: Fleet,
        telemetry: StatsScrapeTelemetry,
        *,
        connection: Callable[[], Client | None],
        poll_interval: float,
        timeout: float,
        max_message_bytes: int,
        clock=time.monotonic,
        limiter: LogLimiter | None = None,
    ) -> None:
        if not 0 < timeout < poll_interval:
            raise ValueError(f"timeout {timeout} must be above 0 and below the poll interval {poll_interval}")
        self.plans = plans
        self.fleet = fleet
        self.telemetry = telemetry
        self._connection = connection
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._clock = clock
        self._limiter = limiter or LogLimiter()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every service on a fixed schedule until `stop` is set."""
        loop = asyncio.get_running_loop()
        log.info("scraping NATS service stats", services=[p.subject for p in self.plans],
                 endpoints={p.service: sorted(p.endpoints) for p in self.plans},
                 poll_interval=self.poll_interval, timeout=self.timeout)
        next_at = loop.time()
        while not stop.is_set():
            try:
                await asyncio.gather(*(self.scrape(plan, stop) for plan in self.plans))
            except Exception as error:  # noqa: BLE001 - a bug here must not end pull mode for good
                self._warn(("scrape_loop",), "stats scrape failed", error=repr(error))
            next_at += self.poll_interval
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (a stalled loop): skip the missed polls rather than bursting
                next_at = loop.time()
                delay = 0
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def scrape(self, plan: ServicePlan, stop: asyncio.Event | None = None) -> int:
        """One stats request to `plan.service`; the number of replies received before the timeout."""
        service = plan.service
        telemetry = self.telemetry
        nc = self._connection()
        if nc is None or not nc.is_connected:
            telemetry.error(service, "not_connected")
            return 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        replies = 0
        last_reply = started

        async def on_reply(msg) -> None:
            nonlocal replies, last_reply
            if not msg.data:
                # nats-server's "no responders" status (503) when no instance is subscribed;
                # Dynamo skips empty payloads too. Not a reply: the scrape ends as a timeout.
                return
            replies += 1
            last_reply = loop.time()
            telemetry.replies[service].inc()
            self.apply_reply(plan, msg.data)

        telemetry.scrapes[service].inc()
        try:
            subscription = await nc.subscribe(nc.new_inbox(), cb=on_reply)
            try:
                await nc.publish(plan.subject, b"", reply=subscription.subject)
                remaining = self.timeout - (loop.time() - started)
                if stop is None:
                    await asyncio.sleep(max(remaining, 0))
                else:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), max(remaining, 0))
            finally:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
        except Exception as error:  # noqa: BLE001 - e.g. the connection closed mid-request
            telemetry.error(service, "request_failed")
            self._warn((service, "request_failed"), "stats request failed", service=service,
                       error=str(error) or type(error).__name__)
            return replies
        if replies:
            telemetry.duration[service].observe(last_reply - started)
        else:
            telemetry.duration[service].observe(self.timeout)
            telemetry.timeouts[service].inc()
            self._warn((service, "timeout"), "no service instance answered the stats request",
                       subject=plan.subject, timeout=self.timeout)
        return replies

    def apply_reply(self, plan: ServicePlan, payload: bytes) -> None:
        """Fold one instance's stats reply into the fleet: each wanted endpoint on its own."""
        service = plan.service
        telemetry = self.telemetry
        try:
            reading = read_stats_reply(payload, plan, self.max_message_bytes)
        except MessageRejected as error:
            self._reject(service, error.reason, plan.subject, error.detail)
            return
        if reading.ignored:
            telemetry.ignored[service].inc(reading.ignored)
        for reject in reading.rejects:
            self._reject(service, reject.reason, reject.subject, reject.detail)
        now = self._clock()
        for item in reading.readings:
            event = LoadEvent(worker_id=item.worker_id, data=item.metrics, endpoint=item.endpoint)
            try:
                self.fleet.observe_load(item.component, event, now)
            except LimitExceeded as error:
                self._reject(service, error.reason, item.subject, "cardinality limit reached; new worker refused")
                continue
            telemetry.accepted[service].inc()

    def _reject(self, service: str, reason: str, subject: str, detail: str) -> None:
        self.telemetry.error(service, reason)
        self._warn((service, reason, subject), "stats entry rejected", service=service, subject=subject,
                   reason=reason, detail=detail[:300])

    def _warn(self, key: tuple, message: str, **fields) -> None:
        suppressed = self._limiter.allow(key)
        if suppressed is not None:
            log.warning(message, suppressed_since_last=suppressed, **fields)
