"""Workers' own families (their MetricsRegistry snapshots), merged by name, at scrape time.

Each family's series arrive rendered (aggregator.ingest.component_snapshots), so a scrape
only gathers every live worker's lines under one HELP/TYPE per name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from functools import partial

from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from aggregator.exposition.chunked_metric import ChunkedMetric
from aggregator.exposition.encoder import samples_of_chunk
from aggregator.state.component_index import Family, WorkerMetrics
from aggregator.state.fleet import Fleet


def family_samples(family: Family) -> list[Sample]:
    """A stored family's samples, read back from its lines if it is kept as lines."""
    if family.samples is not None:
        return family.samples
    assert family.chunk is not None
    return samples_of_chunk(family.chunk)


def _column_samples(column: tuple[Family, ...]) -> list[Sample]:
    return [sample for family in column for sample in family_samples(family)]


class ComponentMetricsCollector(Collector):
    """Every live worker's families, merged by name, one HELP/TYPE each.

    Register it before workers are known, as the service does: it then describes no name to the
    registry, and `name[]` selections ask its describe() at request time (exposition/selection.py).
    """

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._described: dict[tuple[str, str, str], Metric] = {}

    def collect(self) -> Iterator[Metric]:
        index = self.fleet.component_metrics
        snapshots = [(state.key.worker_id, metrics) for state in list(self.fleet.workers.values())
                     if (metrics := state.component_metrics) is not None]
        # A worker's series all carry its worker_id, so only a worker id publishing under two
        # keys (two endpoints, ranks or components) can repeat a series; a duplicate makes
        # Prometheus reject the whole scrape, so those keep the first copy of each series.
        keys_per_id = Counter(worker_id for worker_id, _ in snapshots)
        # Workers of one kind send the same families in the same order: grouped by that, each
        # group's rows are transposed into columns at C speed instead of family by family.
        same_names: dict[tuple[str, ...], list[WorkerMetrics]] = {}
        shared: list[WorkerMetrics] = []
        for worker_id, metrics in snapshots:
            if keys_per_id[worker_id] > 1:
                shared.append(metrics)
            else:
                same_names.setdefault(metrics.names, []).append(metrics)
        merged: dict[str, ChunkedMetric] = {}

        def family_named(name: str) -> ChunkedMetric | None:
            out = merged.get(name)
            if out is None:
                entry = index.names.get(name)  # read from the render thread: may just have gone
                if entry is None:
                    return None
                out = merged[name] = ChunkedMetric(name, entry.documentation, entry.type)
            return out

        for names, group in same_names.items():
            family_columns = zip(*(m.families_row for m in group))
            chunk_columns = zip(*(m.chunks_row for m in group))
            for name, families, chunks in zip(names, family_columns, chunk_columns):
                out = family_named(name)
                if out is not None:
                    out.add_column(partial(_column_samples, families), chunks)
        seen: dict[str, set] = {}
        for metrics in shared:
            for name, family in metrics.families.items():
                out = family_named(name)
                if out is not None:
                    out.add_chunk(list(self._unique(family_samples(family), seen.setdefault(name, set()))), None)
        return iter(merged.values())

    @staticmethod
    def _unique(samples: list[Sample], seen: set) -> Iterator[Sample]:
        for sample in samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            if key not in seen:
                seen.add(key)
                yield sample

    def describe(self) -> Iterator[Metric]:
        """The families exported now (no samples): the workers' families come and go with them."""
        described = {}
        for name, entry in list(self.fleet.component_metrics.names.items()):
            key = (name, entry.type, entry.documentation)
            family = self._described.get(key)
            described[key] = family if family is not None else Metric(name, entry.documentation, entry.type)
        self._described = described  # the families of names still exported, made once each
        return iter(described.values())
