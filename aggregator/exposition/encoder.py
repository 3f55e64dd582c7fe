"""A faster encoder for /metrics whose output is byte for byte prometheus_client's.

prometheus_client spends ~5 µs per sample formatting: it sorts and escapes every
label set on every scrape. A worker's labels never change while it lives, so the
collectors hand over `RenderedLabels`, a label dict that carries its own rendered
text, computed once; this encoder then only formats the value. Everything it does not
need to speed up (family headers, `_created`/`_gsum`/`_gcount` moves, exemplars,
timestamps, UTF-8 names, OpenMetrics versions other than 1.0.0) it leaves to
prometheus_client itself, so the bytes stay exactly prometheus_client's; a test
compares the two on the same state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from itertools import chain

from prometheus_client import exposition
from prometheus_client.core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from aggregator.exposition.selection import Selection

# What a metric and a label name are in the text format (check with fullmatch: `$` also matches
# before a final newline).
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TEXT_MOVED = ("_created", "_gsum", "_gcount")  # text 0.0.4 moves these into gauges after the family


class _Fallback(Exception):
    """This family needs prometheus_client's own encoder."""


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def label_text(labels: dict[str, str]) -> str:
    """`k="v",...` as prometheus_client writes it: sorted by name, values escaped."""
    parts = []
    for name, value in sorted(labels.items()):
        if not LABEL_NAME.fullmatch(name):
            raise _Fallback
        parts.append(f'{name}="{_escape(value)}"')
    return ",".join(parts)


class RenderedLabels(dict):
    """A label dict that carries its exposition text; build it once per series, reuse it every scrape."""

    __slots__ = ("text",)

    def __init__(self, labels: dict[str, str]) -> None:
        super().__init__(labels)
        try:
            self.text: str | None = label_text(self)
        except _Fallback:
            self.text = None


def go_float(value: float) -> str:
    """floatToGoString, with its common case (a finite value below 1e6) inlined."""
    value = float(value)
    if -1e6 < value < 1e6:
        return repr(value)
    return floatToGoString(value)


class _Single:
    def __init__(self, metrics: Iterable[Metric]) -> None:
        self.metrics = metrics

    def collect(self):
        return iter(self.metrics)


@lru_cache(maxsize=4096)
def _header(openmetrics_format: bool, escaping: str, name: str, documentation: str, mtype: str, unit: str) -> bytes:
    empty = Metric(name, documentation, mtype, unit)
    if openmetrics_format:
        text = openmetrics.generate_latest(_Single([empty]), escaping=escaping, version="1.0.0")
        return text[: -len(b"# EOF\n")]
    return exposition.generate_latest(_Single([empty]), escaping=escaping)


def render_chunk(samples: list) -> bytes | None:
    """The sample lines of `samples` (text 0.0.4 and OpenMetrics 1.0 write them alike), or None
    where only prometheus_client's encoder will do (timestamps, exemplars, non-legacy names)."""
    if any(sample.name.endswith(_TEXT_MOVED) for sample in samples):
        return None  # text 0.0.4 moves these out of the family: leave them to the encoder
    try:
        return "".join(_sample_lines(samples, ())).encode()
    except _Fallback:
        return None


def samples_of_chunk(chunk: bytes) -> list[Sample]:
    """The samples of lines `render_chunk` or `rows_chunk` wrote, read back with prometheus_client's parser.

    Series kept only as their lines (~130 bytes each instead of ~600 as Sample objects) need
    their Samples only for prometheus_client's own encoders, which are rare and may pay for a parse.
    """
    return [sample for family in text_string_to_metric_families(chunk.decode()) for sample in family.samples]


def rows_chunk(name: str, rows: list[tuple[RenderedLabels, float]]) -> bytes | None:
    """The lines `name{labels} value` of (labels, value) rows, without making Sample objects;
    None where a label set has no text of its own (the encoder then goes sample by sample)."""
    lines = []
    for labels, value in rows:
        text = labels.text
        if not text:
            return None
        lines.append(f"{name}{{{text}}} {go_float(value)}\n")
    return "".join(lines).encode()


def _sample_lines(samples, moved) -> list[str]:
    lines = []
    for sample in samples:
        if sample.timestamp is not None or sample.exemplar is not None or sample.native_histogram is not None:
            raise _Fallback
        sample_name = sample.name
        if moved and sample_name in moved:
            raise _Fallback
        labels = sample.labels
        text = labels.text if type(labels) is RenderedLabels else (label_text(labels) if labels else "")
        if text is None:
            raise _Fallback
        if sample.value is None:
            raise _Fallback
        if text:
            lines.append(f"{sample_name}{{{text}}} {go_float(sample.value)}\n")
        else:
            lines.append(f"{sample_name} {go_float(sample.value)}\n")
    return lines


def _family(metric: Metric, openmetrics_format: bool, escaping: str) -> list[bytes]:
    name = metric.name
    if not METRIC_NAME.fullmatch(name):
        raise _Fallback
    moved = (
        {name + suffix for suffix in _TEXT_MOVED}
        if not openmetrics_format and metric.type not in ("gauge", "unknown", "info", "stateset")
        else ()
    )
    header = _header(openmetrics_format, escaping, name, metric.documentation, metric.type, metric.unit)
    chunks = getattr(metric, "chunks", None)
    if chunks is not None:
        return [header, *chunks]
    return [header, "".join(_sample_lines(metric.samples, moved)).encode()]


def _generic(metric: Metric, openmetrics_format: bool, escaping: str) -> bytes:
    if openmetrics_format:
        text = openmetrics.generate_latest(_Single([metric]), escaping=escaping, version="1.0.0")
        return text[: -len(b"# EOF\n")]
    return exposition.generate_latest(_Single([metric]), escaping=escaping)


def encode(source, accept: str, names: Iterable[str] = ()) -> tuple[bytes, str]:
    """(body, content type) for `source` (a registry) as prometheus_client would negotiate and encode it;
    with `names`, only the series of those names (`/metrics?name[]=`, see selection.py)."""
    families, content_type = encode_families(source, accept, names)
    return b"".join(chain.from_iterable(families)), content_type


def encode_families(source, accept: str, names: Iterable[str] = ()) -> tuple[list[list[bytes]], str]:
    """`encode`'s body as pieces, grouped by family: joined once for a plain body, or compressed
    family by family (at 10,000 full workers, joining the 91 MB body first costs more than
    compressing it)."""
    names = tuple(names)
    if names:
        source = Selection(source, names)
    encoder, content_type = exposition.choose_encoder(accept)
    func = getattr(encoder, "func", encoder)
    keywords = getattr(encoder, "keywords", {})
    if func is openmetrics.generate_latest and keywords.get("version") == "1.0.0":
        openmetrics_format = True
    elif func is exposition.generate_latest:
        openmetrics_format = False
    else:
        return [[encoder(source)]], content_type  # a format this encoder does not know: the library's own
    escaping = keywords.get("escaping", openmetrics.UNDERSCORES)
    out: list[list[bytes]] = []
    for metric in source.collect():
        try:
            out.append(_family(metric, openmetrics_format, escaping))
        except _Fallback:
            out.append([_generic(metric, openmetrics_format, escaping)])
    if openmetrics_format:
        out.append([b"# EOF\n"])
    return out, content_type
