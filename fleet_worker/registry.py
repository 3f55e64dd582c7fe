"""Worker-side metrics registry: Dynamo's `MetricsRegistry` for Python workers.

    runtime = MetricsRegistry()                      # one per worker process
    endpoint = runtime.namespace("dynamo").component("backend").endpoint("generate")
    tokens = endpoint.create_counter("output_tokens", "Tokens generated", labels={"model": "llama"})
    tokens.inc(42)
    # dynamo_component_output_tokens_total{dynamo_component="backend",dynamo_endpoint="generate",
    #                                      dynamo_namespace="dynamo",model="llama"} 42.0

The hierarchy is runtime → namespace → component → endpoint. A metric created at a level
carries the auto labels `dynamo_namespace`, `dynamo_component`, `dynamo_endpoint` as far
as that level goes (a runtime metric has none). Names get the `dynamo_component_` prefix.

Metrics are prometheus_client's own Counter, Gauge and Histogram in a per-process
CollectorRegistry (never the global one), so anything that reads a prometheus_client
registry reads this one. A plain factory returns the labelled child (inc/set/observe);
a `*vec` factory returns a `LabelledMetric` whose `labels(...)` takes only the dynamic
labels, because the auto and constant ones are already fixed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from fleet_protocol import SnapshotFamily, SnapshotSample, snapshot_value
from fleet_protocol.names import LABEL_NAME, METRIC_NAME

NAME_PREFIX = "dynamo_component_"
NAMESPACE_LABEL = "dynamo_namespace"
COMPONENT_LABEL = "dynamo_component"
ENDPOINT_LABEL = "dynamo_endpoint"
WORKER_ID_LABEL = "worker_id"  # added by the aggregator when it re-exports a worker's metrics
AUTO_LABELS = (NAMESPACE_LABEL, COMPONENT_LABEL, ENDPOINT_LABEL)
RESERVED_LABELS = frozenset((*AUTO_LABELS, WORKER_ID_LABEL, "le", "quantile"))

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

_NAME_INVALID = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_VALUE_INVALID = re.compile(r"[^a-zA-Z0-9_]")


class MetricsError(ValueError):
    """A metric that cannot be created as asked (bad name, reserved or duplicate label, clash)."""


def sanitize_name(name: str) -> str:
    """A metric name with characters outside `[a-zA-Z0-9_:]` removed, then validated."""
    cleaned = _NAME_INVALID.sub("", name)
    if not METRIC_NAME.fullmatch(cleaned):
        raise MetricsError(f"metric name {name!r} is not valid after sanitising ({cleaned!r}); "
                           "it must match [a-zA-Z_:][a-zA-Z0-9_:]*")
    return cleaned


def component_metric_name(name: str) -> str:
    """`dynamo_component_` + the sanitised name; a name that already has the prefix keeps one."""
    cleaned = sanitize_name(name)
    if cleaned.startswith(NAME_PREFIX):
        cleaned = cleaned[len(NAME_PREFIX):]
        if not cleaned:
            raise MetricsError(f"metric name {name!r} is only the prefix")
    return NAME_PREFIX + cleaned


def sanitize_label_value(value: str) -> str:
    """An auto-label value as Dynamo writes it: `my-ns.v2` → `my_ns_v2`.

    Characters outside `[a-zA-Z0-9_]` become `_`; leading `__` (Prometheus reserves it)
    is stripped; a value starting with a digit gets a `_` in front; nothing but
    underscores is an error, since two different names would then look alike.
    """
    cleaned = _LABEL_VALUE_INVALID.sub("_", value)
    if cleaned.startswith("__"):
        cleaned = cleaned.lstrip("_")
    if not cleaned.strip("_"):
        raise MetricsError(f"name {value!r} has no letter or digit; it cannot be a label value")
    if cleaned[0].isdigit():
        cleaned = "_" + cleaned
    return cleaned


def check_label_names(names: Iterable[str]) -> list[str]:
    """User label names: valid, not reserved, not duplicated."""
    seen: list[str] = []
    for name in names:
        if not isinstance(name, str) or not LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise MetricsError(f"label name {name!r} must match [a-zA-Z_][a-zA-Z0-9_]* and not start with '__'")
        if name in AUTO_LABELS:
            raise MetricsError(f"label {name!r} is automatically added by auto_label feature and cannot be "
                               "manually set")
        if name in RESERVED_LABELS:
            raise MetricsError(f"label {name!r} is reserved (worker_id is added by the aggregator; "
                               "le and quantile by Prometheus)")
        if name in seen:
            raise MetricsError(f"label {name!r} given twice")
        seen.append(name)
    return seen


class LabelledMetric:
    """A metric family with its auto and constant labels fixed; `labels()` takes the dynamic ones."""

    def __init__(self, metric, fixed: Mapping[str, str], dynamic: Sequence[str]) -> None:
        self._metric = metric
        self._fixed = dict(fixed)
        self.label_names = tuple(dynamic)

    def labels(self, *values: str, **named: str):
        if values and named:
            raise MetricsError("give label values either by position or by name, not both")
        if values:
            if len(values) != len(self.label_names):
                raise MetricsError(f"expected {len(self.label_names)} label values {self.label_names}, "
                                   f"got {len(values)}")
            named = dict(zip(self.label_names, values))
        elif set(named) != set(self.label_names):
            raise MetricsError(f"expected labels {self.label_names}, got {tuple(named)}")
        return self._metric.labels(**self._fixed, **{k: str(v) for k, v in named.items()})

    def remove(self, *values: str) -> None:
        """Forget one dynamic label combination (values in `label_names` order)."""
        labels = {**self._fixed, **dict(zip(self.label_names, values))}
        self._metric.remove(*(labels[name] for name in self._metric._labelnames))


@dataclass(frozen=True)
class _Family:
    kind: type
    label_names: tuple[str, ...]
    buckets: tuple[float, ...] | None
    metric: object


class _Families:
    """Every family of one runtime, by name; a name is one family however many levels use it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.by_name: dict[str, _Family] = {}

    def get(self, kind: type, name: str, documentation: str, label_names: tuple[str, ...],
            buckets: tuple[float, ...] | None):
        family = self.by_name.get(name)
        if family is not None:
            if (family.kind, family.label_names, family.buckets) != (kind, label_names, buckets):
                raise MetricsError(
                    f"metric {name!r} already exists as a {family.kind.__name__.lower()} with labels "
                    f"{family.label_names}; it cannot also be a {kind.__name__.lower()} with labels {label_names}"
                    + (" or other buckets" if family.buckets != buckets else "")
                )
            return family.metric
        options = {"buckets": buckets} if buckets is not None else {}
        metric = kind(name, documentation or name, label_names, registry=self.registry, **options)
        self.by_name[name] = _Family(kind, label_names, buckets, metric)
        return metric


class MetricsRegistry:
    """One level of the hierarchy; `MetricsRegistry()` is the runtime (process) level."""

    def __init__(self, *, registry: CollectorRegistry | None = None, clock=time.monotonic) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._families = _Families(self.registry)
        self._levels: tuple[tuple[str, str], ...] = ()
        self._names: tuple[str, ...] = ()
        started = clock()
        self.uptime = self.create_gauge("uptime_seconds", "Time since the worker's metrics registry started")
        self.uptime.set_function(lambda: clock() - started)

    def _child(self, label: str, name: str) -> MetricsRegistry:
        child = object.__new__(MetricsRegistry)
        child.registry = self.registry
        child._families = self._families
        child._levels = (*self._levels, (label, sanitize_label_value(name)))
        child._names = (*self._names, name)
        child.uptime = self.uptime
        return child

    # -- hierarchy ---------------------------------------------------------------------

    def namespace(self, name: str) -> MetricsRegistry:
        self._expect_level(0, "namespace")
        return self._child(NAMESPACE_LABEL, name)

    def component(self, name: str) -> MetricsRegistry:
        self._expect_level(1, "component")
        return self._child(COMPONENT_LABEL, name)

    def endpoint(self, name: str) -> MetricsRegistry:
        self._expect_level(2, "endpoint")
        return self._child(ENDPOINT_LABEL, name)

    def _expect_level(self, depth: int, what: str) -> None:
        if len(self._levels) != depth:
            parent = ("runtime", "namespace", "component")[depth]
            raise MetricsError(f"a {what} is created from a {parent}, not from {self.level}")

    @property
    def level(self) -> str:
        return ("runtime", "namespace", "component", "endpoint")[len(self._levels)]

    @property
    def auto_labels(self) -> dict[str, str]:
        """The labels every metric created at this level carries (sanitised values)."""
        return dict(self._levels)

    @property
    def hierarchy(self) -> str:
        """Dynamo's hierarchy string: the names of the levels joined by `_`."""
        return "_".join(self._names)

    @property
    def basename(self) -> str:
        return self._names[-1] if self._names else ""

    # -- factories ---------------------------------------------------------------------

    def _metric(self, kind: type, name: str, documentation: str, const_labels: Mapping[str, str] | None,
                dynamic: Sequence[str] = (), buckets: Sequence[float] | None = None):
        const_labels = dict(const_labels or {})
        names = check_label_names([*const_labels, *dynamic])
        fixed = {**self.auto_labels, **{k: str(v) for k, v in const_labels.items()}}
        label_names = tuple(sorted([*self.auto_labels, *names]))  # Dynamo writes labels alphabetically
        if buckets is not None:
            buckets = tuple(float(b) for b in buckets)
            if not buckets or list(buckets) != sorted(set(buckets)):
                raise MetricsError(f"buckets {buckets} must be increasing and not empty")
        metric = self._families.get(kind, component_metric_name(name), documentation, label_names, buckets)
        if dynamic:
            return LabelledMetric(metric, fixed, dynamic)
        return metric.labels(**fixed) if label_names else metric

    def create_counter(self, name: str, description: str, labels: Mapping[str, str] | None = None):
        return self._metric(Counter, name, description, labels)

    def create_gauge(self, name: str, description: str, labels: Mapping[str, str] | None = None):
        return self._metric(Gauge, name, description, labels)

    def create_histogram(self, name: str, description: str, labels: Mapping[str, str] | None = None,
                         buckets: Sequence[float] | None = None):
        return self._metric(Histogram, name, description, labels, buckets=buckets or DEFAULT_BUCKETS)

    # Prometheus stores every value as a float64; Dynamo's Int* types are a Rust performance
    # detail, so the int variants are the same prometheus_client types under Dynamo's names.
    create_intcounter = create_counter
    create_intgauge = create_gauge

    def create_countervec(self, name: str, description: str, label_names: Sequence[str],
                          const_labels: Mapping[str, str] | None = None) -> LabelledMetric:
        return self._metric(Counter, name, description, const_labels, self._dynamic(label_names))

    def create_gaugevec(self, name: str, description: str, label_names: Sequence[str],
                        const_labels: Mapping[str, str] | None = None) -> LabelledMetric:
        return self._metric(Gauge, name, description, const_labels, self._dynamic(label_names))

    def create_histogramvec(self, name: str, description: str, label_names: Sequence[str],
                            const_labels: Mapping[str, str] | None = None,
                            buckets: Sequence[float] | None = None) -> LabelledMetric:
        return self._metric(Histogram, name, description, const_labels, self._dynamic(label_names),
                            buckets or DEFAULT_BUCKETS)

    create_intcountervec = create_countervec
    create_intgaugevec = create_gaugevec

    @staticmethod
    def _dynamic(label_names: Sequence[str]) -> list[str]:
        if isinstance(label_names, str) or not label_names:
            raise MetricsError("a vector metric needs a non-empty list of dynamic label names")
        return list(label_names)

    # -- output ------------------------------------------------------------------------

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The whole registry in the format `accept` asks for (text 0.0.4 by default)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(_WithoutCreated(self.registry)), content_type

    def families(self) -> list[SnapshotFamily] | None:
        """The whole registry as typed families (`MetricsSnapshot.families`), as `render()` would
        write it; None if it holds a family type the text format writes differently (info,
        stateset, gauge histogram: publish `render()` instead)."""
        out = []
        for family in _WithoutCreated(self.registry).collect():
            if family.type not in _STRUCTURED_TYPES:
                return None
            out.append(SnapshotFamily(family.name, family.type, family.documentation,
                                      [SnapshotSample(s.name, s.labels, snapshot_value(s.value))
                                       for s in family.samples]))
        return out

    def prometheus_metrics_fmt(self) -> str:
        """Dynamo's name for the text exposition of the whole registry."""
        return self.render()[0].decode()


_STRUCTURED_TYPES = ("counter", "gauge", "histogram", "summary", "unknown")


class _WithoutCreated:
    """A registry view without `_created` samples.

    prometheus_client writes each counter's and histogram's creation time as an extra
    `*_created` gauge in the text format; it doubles the series a worker publishes and
    Dynamo does not emit it.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self):
        for family in self._registry.collect():
            created = family.name + "_created"
            if family.type not in ("counter", "histogram", "summary") or not any(
                    s.name == created for s in family.samples):
                yield family
                continue
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            copy.samples = [s for s in family.samples if s.name != created]
            yield copy
