"""`/metrics?name[]=`: only the series with the given names, for every family the registry exports.

As in prometheus_client, a name is a series name (a counter's `x_total`, a histogram's
`x_bucket`, `x_sum`, `x_count`) and the answer is each family holding such series, with
those series only.

Which collectors to ask: prometheus_client's `restricted_registry` looks a name up among
the names collectors described when they registered, so a collector whose families come
and go (the workers' own families, ComponentMetricsCollector) is never found: it described
nothing when it registered, before any worker was known. Here a collector that described
names at registration is trusted with them, as prometheus_client does (a dict lookup, no
call), and one that described none is asked now: its `describe()` says what it exports at
this moment, and without one it is collected.

A family whose series come pre-rendered (`ChunkedMetric`) is selected line by line from its
chunks, so selecting one family of a large fleet formats and parses nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import lru_cache

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from aggregator.exposition.chunked_metric import ChunkedMetric

# The series names a family of each type may write, as prometheus_client's registry lists them.
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}


class Selection:
    """A source (anything with `collect()`) restricted to the series named `names`."""

    def __init__(self, source: object, names: Iterable[str]) -> None:
        self.source = source
        self.names = frozenset(names)

    def collect(self) -> Iterator[Metric]:
        for collector, registered in _collectors(self.source):
            if registered:
                if self.names.isdisjoint(registered):
                    continue
            else:
                describe = getattr(collector, "describe", None)
                if describe is not None and not any(self._wanted_in(metric) for metric in describe()):
                    continue
            for metric in collector.collect():
                if self._wanted_in(metric):
                    selected = _restricted(metric, self.names.intersection(_series_names(metric.name, metric.type)))
                    if selected is not None:
                        yield selected

    def _wanted_in(self, metric: Metric) -> bool:
        return not self.names.isdisjoint(_series_names(metric.name, metric.type))


def _collectors(source: object) -> list[tuple[Collector, list[str]]]:
    """(collector, the series names it described when it registered) for each collector of `source`."""
    # prometheus_client has no public list of a registry's collectors; its own restricted registry
    # reads this mapping. Any other source counts as one collector that described nothing.
    registered = getattr(source, "_collector_to_names", None)
    if registered is None:
        return [(source, [])]  # type: ignore[list-item]
    return list(registered.items())


@lru_cache(maxsize=4096)
def _series_names(name: str, typ: str) -> frozenset[str]:
    return frozenset((name, *(name + suffix for suffix in _SUFFIXES.get(typ, ()))))


def _restricted(metric: Metric, names: frozenset[str]) -> Metric | None:
    chunks = getattr(metric, "chunks", None)
    if chunks is not None:
        return _restricted_lines(metric, chunks, names)
    samples = [sample for sample in metric.samples if sample.name in names]
    if not samples:
        return None
    selected = Metric(metric.name, metric.documentation, metric.type, metric.unit)
    selected.samples = samples
    return selected


def _restricted_lines(metric: Metric, chunks: list[bytes], names: frozenset[str]) -> Metric | None:
    # A line is `name{labels} value` or `name value`; a label value never holds a raw newline.
    starts = tuple(prefix for name in names for prefix in ((name + "{").encode(), (name + " ").encode()))
    kept = b"".join(line + b"\n" for chunk in chunks for line in chunk.split(b"\n") if line.startswith(starts))
    if not kept:
        return None
    selected = ChunkedMetric(metric.name, metric.documentation, metric.type, metric.unit)
    selected.add_chunk(lambda: [sample for sample in metric.samples if sample.name in names], kept)
    return selected
