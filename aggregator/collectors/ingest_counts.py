"""`llm_aggregator_messages_{received,accepted,rejected}_total`: what ingest counted, by kind.

The counts are kept per source (state/ingest_counts.py); the exported series are by kind
only, summed over the sources, as they always were.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from aggregator.state.ingest_counts import IngestCounts


def _families() -> tuple[CounterMetricFamily, CounterMetricFamily, CounterMetricFamily]:
    return (
        CounterMetricFamily("llm_aggregator_messages_received", "Messages received from every source (NATS, ZMQ, pull, journal, discovery), by kind",
                            labels=["kind"]),
        CounterMetricFamily("llm_aggregator_messages_accepted",
                            "Messages decoded and applied to the fleet state, by kind", labels=["kind"]),
        CounterMetricFamily("llm_aggregator_messages_rejected",
                            "Messages dropped, by kind and reason (decode failures and cardinality limits)",
                            labels=["kind", "reason"]),
    )


class IngestCountsCollector(Collector):
    def __init__(self, counts: IngestCounts) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        received: dict[str, int] = {}
        accepted: dict[str, int] = {}
        rejected: dict[tuple[str, str], int] = {}
        for counts in self.counts.all():
            kind = counts.kind
            received[kind] = received.get(kind, 0) + counts.received.value
            accepted[kind] = accepted.get(kind, 0) + counts.accepted.value
            for reason, tally in list(counts.rejected.items()):  # the event loop may add a reason meanwhile
                rejected[(kind, reason)] = rejected.get((kind, reason), 0) + tally.value
        received_family, accepted_family, rejected_family = _families()
        for kind, value in received.items():
            received_family.add_metric([kind], value)
        for kind, value in accepted.items():
            accepted_family.add_metric([kind], value)
        for (kind, reason), value in rejected.items():
            rejected_family.add_metric([kind, reason], value)
        yield from (received_family, accepted_family, rejected_family)

    def describe(self) -> Iterator[Metric]:
        return iter(_families())
