"""Workers' own metrics (MetricsRegistry snapshots), checked on arrival and re-exported merged.

A snapshot is parsed once, when it arrives, with prometheus_client's text parser; each
accepted sample already carries the `worker_id` label, so a scrape only concatenates
lists. What a worker may not do:

- send something that is not the text exposition format (`not_exposition`);
- use a name outside the allowed prefixes (`bad_name`) or an `llm_*` / `process_*` /
  `python_*` name, which are the aggregator's own series (`reserved_name`);
- send a family whose sample names do not fit its type, or a histogram without `+Inf`
  (`bad_family`): re-exported as is, it would break the OpenMetrics scrape for everyone;
- declare a name with a type other workers already use for it (`type_conflict`);
- send more series than allowed per worker, or push the total past its limit (`series_limit`).

Bad families are dropped one by one and the rest of the snapshot is used; a snapshot over
a limit, or not parseable at all, is dropped whole and the worker keeps its previous one.
No I/O here.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

import fleet_protocol as protocol
from aggregator.config import DEFAULT_PREFIXES, RESERVED_PREFIXES
from aggregator.exposition.encoder import ChunkedMetric, RenderedLabels, render_chunk
from aggregator.rejects import (
    BAD_FAMILY,
    BAD_NAME,
    NOT_EXPOSITION,
    RESERVED_NAME,
    SERIES_LIMIT,
    TYPE_CONFLICT,
)
from fleet_protocol import MessageRejected
from fleet_protocol.names import LABEL_NAME, METRIC_NAME

WORKER_ID = "worker_id"

_TYPES = ("counter", "gauge", "histogram", "summary", "unknown")


@dataclass(frozen=True)
class SnapshotLimits:
    prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    max_series_per_worker: int = 5_000


@dataclass(slots=True)
class Family:
    name: str
    type: str
    documentation: str
    samples: list[Sample] | None  # None once rendered into `chunk`: read back from it on demand
    count: int  # how many samples
    chunk: bytes | None = None

    def get_samples(self) -> list[Sample]:
        if self.samples is not None:
            return self.samples
        return samples_of_chunk(self.chunk)


def samples_of_chunk(chunk: bytes) -> list[Sample]:
    """A rendered family's samples, read back with prometheus_client's parser.

    A live worker's series are kept only as their rendered lines, ~130 bytes each instead of
    ~600 as Sample objects with their labels; the Samples are only needed for `?name[]=`
    selections and prometheus_client's own encoders, which are rare and may pay for a parse.
    """
    return [sample for family in text_string_to_metric_families(chunk.decode()) for sample in family.samples]


@dataclass(slots=True)
class WorkerMetrics:
    """One worker's accepted families, samples already labelled with its worker_id."""

    families: dict[str, Family] = field(default_factory=dict)
    # Set by seal() once the fleet has accepted the snapshot: the family names in order, and per
    # family its rendered lines (None: only prometheus_client's encoder will do).
    names: tuple[str, ...] = ()
    families_row: tuple[Family, ...] = ()
    chunks_row: tuple[bytes | None, ...] = ()

    @property
    def series(self) -> int:
        return sum(f.count for f in self.families.values())

    def seal(self) -> None:
        """Render the lines now, on arrival, so that no scrape has to: a fleet that sends snapshots
        every second would otherwise have every scrape re-render every worker's series."""
        for family in self.families.values():
            family.chunk = render_chunk(family.samples)
            if family.chunk is not None:
                family.samples = None
        self.families_row = tuple(self.families.values())
        self.names = tuple(f.name for f in self.families_row)
        self.chunks_row = tuple(f.chunk for f in self.families_row)


def _column_samples(column: tuple[Family, ...]) -> list[Sample]:
    return [sample for family in column for sample in family.get_samples()]


Problem = tuple[str, str]  # (reason, detail) of one dropped family


def _sample_names(family) -> set[str] | None:
    """The sample names a family of this type may have (None: any sample name is wrong)."""
    n = family.name
    if family.type == "counter":
        return {n + "_total"}
    if family.type == "histogram":
        return {n + "_bucket", n + "_sum", n + "_count"}
    if family.type == "summary":
        return {n, n + "_sum", n + "_count"}
    return {n}


def _check_family(family) -> str | None:
    """Why a parsed family cannot be re-exported, or None."""
    if family.type not in _TYPES:
        return f"type {family.type!r} is not re-exported"
    allowed = _sample_names(family)
    seen = set()
    for sample in family.samples:
        if sample.name not in allowed:
            return f"sample {sample.name!r} does not belong to a {family.type} named {family.name!r}"
        key = (sample.name, tuple(sorted(sample.labels.items())))
        if key in seen:  # Prometheus would reject the whole scrape
            return f"series {sample.name}{dict(key[1])} appears twice"
        seen.add(key)
    return _openmetrics_problem(family)


_COUNTER_LIKE = ("_total", "_sum", "_count", "_bucket")


@dataclass(slots=True)
class _HistogramGroup:
    le: float | None = None  # the last bucket's bound
    bucket: float = 0.0  # the last bucket's count
    count: float | None = None
    has_sum: bool = False
    negative_le: bool = False

    def problem(self) -> str | None:
        if self.le != math.inf:
            return "a histogram series without a +Inf bucket (or buckets after it)"
        if self.count is not None and self.count != self.bucket:
            return f"_count {self.count} is not the +Inf bucket's {self.bucket}"
        if self.has_sum != (self.count is not None):
            return "_sum and _count come together or not at all"
        if self.negative_le and self.has_sum:
            return "_sum with negative buckets"
        return None


def _openmetrics_problem(family) -> str | None:
    """What OpenMetrics forbids in a family's values and order: re-exported, it would make
    Prometheus's OpenMetrics scrape (and prometheus_client's parser) reject the whole
    /metrics, every worker's series with it. The rules are OpenMetrics 1.0's, as
    prometheus_client's parser enforces them; tests check this against that parser."""
    name, typ = family.name, family.type
    seen_groups: set = set()
    group = histogram = None
    for sample in family.samples:
        suffix = sample.name[len(name):]
        value = sample.value
        labels = sample.labels
        if typ == "histogram" and suffix == "_bucket":
            key = frozenset((k, v) for k, v in labels.items() if k != "le")
        elif typ == "summary" and not suffix:
            key = frozenset((k, v) for k, v in labels.items() if k != "quantile")
        else:
            key = frozenset(labels.items())
        if key != group:
            if histogram is not None and (why := histogram.problem()):
                return why
            if key in seen_groups:
                return "the samples of one series are not next to each other"
            seen_groups.add(key)
            group, histogram = key, (_HistogramGroup() if typ == "histogram" else None)
        if suffix in _COUNTER_LIKE and typ != "gauge" and typ != "unknown":
            if math.isnan(value) or value < 0:
                return f"{sample.name} is {value}: a counted value is never negative or NaN"
            if suffix in ("_count", "_bucket") and not float(value).is_integer():
                return f"{sample.name} is {value}: a count is a whole number"
        if typ == "summary" and not suffix:
            quantile = _number(labels.get("quantile"))
            if quantile is None or not 0 <= quantile <= 1:
                return f"quantile label {labels.get('quantile')!r} is not a number in [0, 1]"
            if value < 0:
                return f"quantile value {value} is negative"
        if histogram is not None:
            if suffix == "_bucket":
                le = _number(labels.get("le"))
                if le is None or math.isnan(le):
                    return f"le label {labels.get('le')!r} is not a number"
                if histogram.le is not None and le <= histogram.le:
                    return "buckets are not in increasing le order"
                if value < histogram.bucket:
                    return "bucket counts decrease"
                histogram.le, histogram.bucket = le, value
                histogram.negative_le |= le < 0
            elif suffix == "_count":
                histogram.count = value
            elif suffix == "_sum":
                histogram.has_sum = True
    if histogram is not None:
        return histogram.problem()
    return None


def _number(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _canonical(family, samples: list[Sample]) -> list[Sample]:
    """`le` and `quantile` written as prometheus_client writes numbers ("1" -> "1.0"), as OpenMetrics
    requires of them; Prometheus 3 normalises them the same way on ingestion."""
    key = "le" if family.type == "histogram" else "quantile" if family.type == "summary" else None
    if key is None:
        return samples
    out = []
    for sample in samples:
        text = sample.labels.get(key)
        number = _number(text)
        if number is not None and not math.isnan(number) and floatToGoString(number) != text:
            sample = Sample(sample.name, {**sample.labels, key: floatToGoString(number)}, sample.value)
        out.append(sample)
    return out


def parse_snapshot(text: str, worker_id: int, limits: SnapshotLimits) -> tuple[WorkerMetrics, list[Problem]]:
    """Parse, check and label one worker's exposition text.

    Raises MessageRejected when the whole snapshot is unusable (not the exposition
    format, or more series than `max_series_per_worker`); returns the accepted families
    and the reasons some families were dropped.
    """
    problems: list[Problem] = []
    try:
        return _accept(text_string_to_metric_families(text), worker_id, limits, problems), problems
    except MessageRejected:
        raise
    except Exception as error:  # noqa: BLE001 - the parser raises ValueError, IndexError, KeyError...
        raise MessageRejected(NOT_EXPOSITION, f"{type(error).__name__}: {error}"[:300]) from None


def read_families(families: list[protocol.SnapshotFamily], worker_id: int,
                  limits: SnapshotLimits) -> tuple[WorkerMetrics, list[Problem]]:
    """`parse_snapshot` for a snapshot sent already structured (`MetricsSnapshot.families`).

    What the text parser would refuse in a family (a name or label name that is not a
    Prometheus name, a value that is not a number) drops that family as `bad_family`.
    """
    problems: list[Problem] = []
    return _accept(_checked(families, problems), worker_id, limits, problems), problems


@dataclass(slots=True)
class _Parsed:
    """A structured family in the shape prometheus_client's parser yields."""

    name: str
    type: str
    documentation: str
    samples: list[Sample]


def _checked(families: list[protocol.SnapshotFamily], problems: list[Problem]) -> Iterator[_Parsed]:
    for family in families:
        try:
            if not METRIC_NAME.fullmatch(family.name):
                raise MessageRejected(BAD_FAMILY, "not a Prometheus metric name")
            samples = []
            for sample in family.samples:
                if not METRIC_NAME.fullmatch(sample.name):
                    raise MessageRejected(BAD_FAMILY, f"sample name {sample.name[:80]!r} is not a Prometheus name")
                for label in sample.labels:
                    if not LABEL_NAME.fullmatch(label) or label.startswith("__"):
                        raise MessageRejected(BAD_FAMILY, f"label name {label[:80]!r} is not a Prometheus label name")
                samples.append(Sample(sample.name, sample.labels, protocol.sample_value(sample.value)))
        except MessageRejected as error:
            problems.append((BAD_FAMILY, f"{family.name[:80]!r}: {error.detail}"))
            continue
        yield _Parsed(family.name, "unknown" if family.type == "untyped" else family.type, family.help, samples)


def _accept(parsed_families, worker_id: int, limits: SnapshotLimits, problems: list[Problem]) -> WorkerMetrics:
    worker = str(worker_id)
    result = WorkerMetrics()
    series = 0
    for parsed in parsed_families:
        series += len(parsed.samples)
        if series > limits.max_series_per_worker:
            raise MessageRejected(SERIES_LIMIT, f"more than {limits.max_series_per_worker} series in one snapshot")
        name = parsed.name
        if not parsed.samples:  # a HELP/TYPE without series (e.g. a vector no child was made of)
            continue
        if name.startswith(RESERVED_PREFIXES):
            problems.append((RESERVED_NAME, f"{name!r} is one of the aggregator's own names"))
            continue
        if not name.startswith(limits.prefixes):
            problems.append((BAD_NAME, f"{name!r} does not start with one of {limits.prefixes}"))
            continue
        if name in result.families:
            problems.append((BAD_FAMILY, f"{name!r} appears twice"))
            continue
        parsed = _Parsed(name, parsed.type, parsed.documentation, _canonical(parsed, parsed.samples))
        why = _check_family(parsed)
        if why is not None:
            problems.append((BAD_FAMILY, f"{name!r}: {why}"))
            continue
        # Timestamps and exemplars are dropped: the aggregator re-exports the latest value.
        # Labels rendered once per snapshot, not once per scrape (see exposition.py).
        samples = [Sample(s.name, RenderedLabels({**s.labels, WORKER_ID: worker}), s.value) for s in parsed.samples]
        result.families[name] = Family(name, parsed.type, parsed.documentation, samples, len(samples))
    return result


def snapshot_route(limits: SnapshotLimits, max_bytes: int):
    """The ingest `apply` for `namespace.{ns}.component.{c}.metrics`: decode, parse once, store."""

    def apply(fleet, component: str, payload: bytes, now: float) -> list[Problem]:
        snapshot = protocol.decode_metrics_snapshot(payload, max_bytes)
        if snapshot.families is not None:
            metrics, problems = read_families(snapshot.families, snapshot.worker_id, limits)
        else:
            metrics, problems = parse_snapshot(snapshot.text, snapshot.worker_id, limits)
        return problems + fleet.observe_component_metrics(component, snapshot, metrics, now)

    return apply


@dataclass(slots=True)
class _NameEntry:
    type: str
    documentation: str
    holders: int


class ComponentMetricsIndex:
    """Fleet-wide view of the workers' families: one type and HELP per name, and the series total.

    Families clash not only by name: a counter `x` owns the sample name `x_total`, so a gauge
    named `x_total` from another worker would write the same series name under two types.
    """

    def __init__(self, max_series: int = 100_000) -> None:
        self.max_series = max_series
        self.names: dict[str, _NameEntry] = {}
        self.owners: dict[str, str] = {}  # sample name -> the family name that writes it
        self.series = 0

    def conflicts(self, family: Family, previous: WorkerMetrics | None) -> str | None:
        own = previous.families if previous is not None else {}
        owners = (self.owners.get(sample_name) for sample_name in _sample_names(family))
        clashes = {owner for owner in owners if owner is not None and owner != family.name}
        entry = self.names.get(family.name)
        if entry is not None and entry.type != family.type:
            clashes.add(family.name)
        for name in clashes:
            mine = own.get(name)
            entry = self.names[name]
            if mine is not None and entry.holders == 1 and mine.type == entry.type:
                continue  # this worker is the only holder: it may change its own mind
            return f"{family.name!r} ({family.type}) clashes with {name!r} ({entry.type}) from other workers"
        return None

    def admit(self, new: WorkerMetrics, previous: WorkerMetrics | None) -> list[Problem]:
        """Drop the families of `new` that conflict; raise MessageRejected past the series total."""
        problems: list[Problem] = []
        for name in list(new.families):
            why = self.conflicts(new.families[name], previous)
            if why is not None:
                del new.families[name]
                problems.append((TYPE_CONFLICT, why))
        after = self.series - (previous.series if previous is not None else 0) + new.series
        if after > self.max_series:
            raise MessageRejected(SERIES_LIMIT, f"{new.series} series would take the total to {after} > "
                                                f"{self.max_series}")
        return problems

    def add(self, metrics: WorkerMetrics) -> None:
        for family in metrics.families.values():
            entry = self.names.get(family.name)
            if entry is None:
                self.names[family.name] = _NameEntry(family.type, family.documentation, 1)
                for sample_name in _sample_names(family):
                    self.owners[sample_name] = family.name
            else:
                entry.holders += 1
        self.series += metrics.series

    def remove(self, metrics: WorkerMetrics) -> None:
        for family in metrics.families.values():
            entry = self.names[family.name]
            entry.holders -= 1
            if entry.holders == 0:
                del self.names[family.name]
                for sample_name in _sample_names(family):
                    if self.owners.get(sample_name) == family.name:
                        del self.owners[sample_name]
        self.series -= metrics.series


class ComponentMetricsCollector(Collector):
    """Every live worker's families, merged by name, one HELP/TYPE each, at scrape time."""

    def __init__(self, fleet) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        index: ComponentMetricsIndex = self.fleet.component_metrics
        snapshots = [s for s in list(self.fleet.workers.values()) if s.component_metrics is not None]
        # A worker's series all carry its worker_id, so only a worker id publishing under two
        # keys (two endpoints, ranks or components) can repeat a series; a duplicate makes
        # Prometheus reject the whole scrape, so those keep the first copy of each series.
        keys_per_id = Counter(s.key.worker_id for s in snapshots)
        # Workers of one kind send the same families in the same order: grouped by that, each
        # group's rows are transposed into columns at C speed instead of family by family.
        same_names: dict[tuple[str, ...], list[WorkerMetrics]] = {}
        shared: list[WorkerMetrics] = []
        for state in snapshots:
            metrics = state.component_metrics
            if keys_per_id[state.key.worker_id] > 1:
                shared.append(metrics)
            else:
                same_names.setdefault(metrics.names, []).append(metrics)
        merged: dict[str, Metric] = {}

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
                    out.add_chunk(list(self._unique(family.get_samples(), seen.setdefault(name, set()))), None)
        return iter(merged.values())

    @staticmethod
    def _unique(samples: list[Sample], seen: set) -> Iterator[Sample]:
        for sample in samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            if key not in seen:
                seen.add(key)
                yield sample

    def describe(self) -> Iterator[Metric]:
        return iter(())
