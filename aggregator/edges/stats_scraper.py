"""Pull mode's NATS edge: poll `$SRV.STATS.{service}` and fold the replies into the fleet.

Every `poll_interval` one stats request per service goes out with a fresh reply inbox;
every instance of the service answers once, and replies are read as they arrive until
`timeout` (shorter than the interval, so polls never overlap). Each wanted endpoint of a
reply becomes a `LoadEvent` handed to ingest (source "pull") and applied through
`Fleet.observe_load`, exactly as a pushed `kv_metrics` message is, so expiry and every
`llm_*` series treat pushed and pulled workers alike; a bad entry is rejected there too,
and counted per service. A Dynamo 1.x entry (no data, the framework's counters) goes to
`Fleet.observe_service_stats` (`llm_worker_requests_total` and its siblings) and keeps its
worker alive as well. A worker that stops answering simply stops being refreshed and
expires after `--stale-after`.

Nothing here raises out of the polling loop: a failed request, a silent service or a
bad reply is counted (`llm_aggregator_stats_scrape_*`), logged rate-limited, and the
next poll goes ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog
from nats.aio.client import Client

from aggregator import rejects
from aggregator.collectors.telemetry import StatsScrapeTelemetry
from aggregator.ingest.pipeline import LOAD, PULL, SERVICE_STATS, Feed, Ingest
from aggregator.ingest.stats_replies import EndpointCounters, ServicePlan, read_stats_reply
from aggregator.state.fleet import Fleet
from fleet_protocol import LoadEvent, MessageRejected

log = structlog.get_logger("aggregator.stats_scrape")


class StatsScraper:
    def __init__(
        self,
        plans: list[ServicePlan],
        ingest: Ingest,
        telemetry: StatsScrapeTelemetry,
        *,
        connection: Callable[[], Client | None],
        poll_interval: float,
        timeout: float,
        max_message_bytes: int,
    ) -> None:
        if not 0 < timeout < poll_interval:
            raise ValueError(f"timeout {timeout} must be above 0 and below the poll interval {poll_interval}")
        self.plans = plans
        self.telemetry = telemetry
        # Counted per service in llm_aggregator_stats_scrape_*, as pull mode always was.
        self.feeds: dict[str, Feed] = {
            plan.service: ingest.feed(PULL, telemetry.outcomes(plan.service), service=plan.service)
            for plan in plans}
        self._connection = connection
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes

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
                log.warning("stats scrape failed", error=repr(error), rate_limit=("scrape_loop",))
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
            telemetry.error(service, rejects.NOT_CONNECTED)
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
            telemetry.error(service, rejects.REQUEST_FAILED)
            log.warning("stats request failed", service=service, error=str(error) or type(error).__name__,
                        rate_limit=(service, rejects.REQUEST_FAILED))
            return replies
        if replies:
            telemetry.duration[service].observe(last_reply - started)
        else:
            telemetry.duration[service].observe(self.timeout)
            telemetry.timeouts[service].inc()
            log.warning("no service instance answered the stats request", subject=plan.subject,
                        timeout=self.timeout, rate_limit=(service, "timeout"))
        return replies

    def apply_reply(self, plan: ServicePlan, payload: bytes) -> None:
        """Hand one instance's stats reply to ingest: each wanted endpoint on its own."""
        feed = self.feeds[plan.service]
        try:
            reading = read_stats_reply(payload, plan, self.max_message_bytes)
        except MessageRejected as error:
            feed.reject(LOAD, plan.subject, error.reason, error.detail, payload)
            return
        if reading.ignored:
            self.telemetry.ignored[plan.service].inc(reading.ignored)
        for reject in reading.rejects:
            feed.reject(LOAD, reject.subject, reject.reason, reject.detail, payload)
        for item in reading.readings:
            event = LoadEvent(worker_id=item.worker_id, data=item.metrics, endpoint=item.endpoint)
            feed.take(LOAD, item.subject, Fleet.observe_load, item.component, event)
        for counters in reading.counters:
            feed.take(SERVICE_STATS, counters.subject, _observe_counters, counters.component, counters)


def _observe_counters(fleet: Fleet, component: str, counters: EndpointCounters, now: float) -> None:
    fleet.observe_service_stats(component, counters.endpoint, counters.worker_id, counters.stats, now)
