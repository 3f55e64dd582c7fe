"""Workers' MetricsRegistry snapshots, as they arrive: checked, labelled, rendered once, then stored.

A snapshot is untrusted input. It is parsed once, when it arrives, with prometheus_client's
text parser (or read from its typed families); each accepted series gets the `worker_id`
label and is rendered into its exposition lines right away, so a scrape only concatenates
bytes (README, "How a large scrape stays cheap"). What a worker may not do:

- send something that is not the text exposition format (`not_exposition`);
- use a name outside the allowed prefixes (`bad_name`) or an `llm_*` / `process_*` /
  `python_*` name, which are the aggregator's own series (`reserved_name`);
- send a family whose sample names do not fit its type, or a histogram without `+Inf`
  (`bad_family`): re-exported as is, it would break the OpenMetrics scrape for everyone;
- declare a name with a type other workers already use for it (`type_conflict`, decided by
  the fleet's index);
- send more series than allowed per worker, or push the total past its limit (`series_limit`).

Bad families are dropped one by one and the rest of the snapshot is used; a snapshot over
a limit, or not parseable at all, is dropped whole and the worker keeps its previous one.
A family without HELP gets `DEFAULT_HELP`: an empty HELP is a lint error for promtool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

import fleet_protocol as protocol
from aggregator.config import DEFAULT_PREFIXES, RESERVED_PREFIXES
from aggregator.exposition.encoder import RenderedLabels, render_chunk
from aggregator.rejects import BAD_FAMILY, BAD_NAME, NOT_EXPOSITION, RESERVED_NAME, SERIES_LIMIT
from aggregator.state.component_index import Family, Problem, WorkerMetrics, sample_names
from aggregator.state.fleet import Fleet
from fleet_protocol import MessageRejected
from fleet_protocol.names import LABEL_NAME, METRIC_NAME

WORKER_ID = "worker_id"
DEFAULT_HELP = "Re-exported from workers' metrics snapshots"

_TYPES = ("counter", "gauge", "histogram", "summary", "unknown")


@dataclass(frozen=True)
class SnapshotLimits:
    prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    max_series_per_worker: int = 5_000


def _check_family(family: ParsedFamily) -> str | None:
    """Why a parsed family cannot be re-exported, or None."""
    if family.type not in _TYPES:
        return f"type {family.type!r} is not re-exported"
    allowed = sample_names(family.name, family.type)
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


def _openmetrics_problem(family: ParsedFamily) -> str | None:
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
    if text is None:
        return None
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _canonical(family: ParsedFamily, samples: list[Sample]) -> list[Sample]:
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


# What prometheus_client's text parser yields, or a typed family read into the same shape.
ParsedFamily = Metric | _Parsed


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


def _accept(parsed_families: Iterable[ParsedFamily], worker_id: int, limits: SnapshotLimits, problems: list[Problem]) -> WorkerMetrics:
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
        result.families[name] = Family(name, parsed.type, parsed.documentation or DEFAULT_HELP, samples, len(samples))
    return result


def render_lines(metrics: WorkerMetrics) -> WorkerMetrics:
    """Render each family's series into its exposition lines, once, on arrival: a fleet that sends
    snapshots every second would otherwise have every scrape re-render every worker's series. A
    family kept as lines costs ~130 bytes a series instead of ~600 as Sample objects; one whose
    lines only prometheus_client's encoder can write keeps its samples."""
    for family in metrics.families.values():
        if family.samples is not None:
            family.chunk = render_chunk(family.samples)
            if family.chunk is not None:
                family.samples = None
    return metrics


Apply = Callable[[Fleet, str, bytes, float], list[Problem]]


def snapshot_route(limits: SnapshotLimits, max_bytes: int) -> Apply:
    """The ingest `apply` for `namespace.{ns}.component.{c}.metrics`: decode, check, render once, store."""

    def apply(fleet: Fleet, component: str, payload: bytes, now: float) -> list[Problem]:
        snapshot = protocol.decode_metrics_snapshot(payload, max_bytes)
        if snapshot.families is not None:
            metrics, problems = read_families(snapshot.families, snapshot.worker_id, limits)
        else:
            metrics, problems = parse_snapshot(snapshot.text or "", snapshot.worker_id, limits)
        return problems + fleet.observe_component_metrics(component, snapshot, render_lines(metrics), now)

    return apply
