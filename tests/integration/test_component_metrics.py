"""Workers' MetricsRegistry snapshots through the aggregator's ingest, fleet and collectors (no I/O)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry

import fleet_protocol as protocol
from aggregator.collectors.component_metrics import (
    ComponentMetricsCollector,
    family_samples,
)
from aggregator.collectors.fleet_kv import FleetCollector
from aggregator.collectors.telemetry import Telemetry
from aggregator.config import check_prefix
from aggregator.exposition.encoder import encode
from aggregator.ingest.component_snapshots import (
    DEFAULT_HELP,
    SnapshotLimits,
    parse_snapshot,
    read_families,
    render_lines,
    snapshot_route,
)
from aggregator.ingest.pipeline import Ingest
from aggregator.state.fleet import Fleet
from fleet_worker.endpoint_metrics import EndpointMetrics
from fleet_worker.registry import MetricsRegistry

from ..support import OPENMETRICS, parse_openmetrics, parse_text, samples

PATTERN = "namespace.dynamo.component.*.metrics"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Stack:
    def __init__(self, *, max_series_per_worker=5_000, max_series=200_000, max_bytes=1 << 20,
                 prefixes=("dynamo_component_", "dynamo_frontend_")) -> None:
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.telemetry = Telemetry(self.registry)
        self.fleet = Fleet(stale_after=10, max_component_series=max_series)
        fleet_kv = FleetCollector(self.fleet, monotonic_clock=self.clock)
        self.registry.register(fleet_kv)
        self.fleet.add_listener(fleet_kv.labels)
        self.registry.register(ComponentMetricsCollector(self.fleet))
        self.ingest = Ingest(self.fleet, self.telemetry.counts, namespace="dynamo", default_component="backend",
                             max_message_bytes=65536, clock=self.clock)
        self.ingest.add_route(protocol.COMPONENT_METRICS, "component_metrics",
                              snapshot_route(SnapshotLimits(prefixes, max_series_per_worker), max_bytes))

    def send(self, worker_id: int, text: str, component="backend", endpoint="generate") -> bool:
        payload = protocol.encode(protocol.MetricsSnapshot(worker_id=worker_id, text=text, endpoint=endpoint))
        return self.ingest.handle(PATTERN, f"namespace.dynamo.component.{component}.metrics", payload)

    def families(self, openmetrics=False) -> dict:
        body, _ = encode(self.registry, OPENMETRICS if openmetrics else "")
        result = {}
        for family in (parse_openmetrics if openmetrics else parse_text)(body.decode()):
            assert family.name not in result, f"duplicate family {family.name}"
            result[family.name] = family
        return result

    def rejected(self) -> dict:
        fams = self.families()
        return {s.labels["reason"]: s.value for s in fams["llm_aggregator_messages_rejected"].samples
                if s.labels["kind"] == "component_metrics" and s.name.endswith("_total") and s.value}


def worker_registry(requests: int, errors: int = 0, latency: float = 0.2) -> MetricsRegistry:
    runtime = MetricsRegistry()
    metrics = EndpointMetrics(runtime.namespace("dynamo").component("backend").endpoint("generate"))
    for i in range(requests):
        with metrics.track(request_bytes=100) as call:
            call.duration = latency
            call.response_bytes = 40
            if i < errors:
                call.fail()
    return runtime


def text_of(runtime: MetricsRegistry) -> str:
    return runtime.render()[0].decode()


def by_worker(families: dict, name: str, sample: str | None = None) -> dict[str, float]:
    return {dict(k)["worker_id"]: v for k, v in samples(families, name, sample).items()}


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_two_workers_merge_into_one_family_each_with_worker_id(openmetrics):
    stack = Stack()
    assert stack.send(11, text_of(worker_registry(3, errors=1)))
    assert stack.send(22, text_of(worker_registry(5, latency=2.0)))
    fams = stack.families(openmetrics)
    requests = fams["dynamo_component_requests"]
    assert requests.type == "counter"
    assert requests.documentation == "Total number of requests processed by component endpoint"
    assert by_worker(fams, "dynamo_component_requests", "dynamo_component_requests_total") == {"11": 3, "22": 5}
    for key in samples(fams, "dynamo_component_requests", "dynamo_component_requests_total"):
        assert {k for k, _ in key} == {"dynamo_namespace", "dynamo_component", "dynamo_endpoint", "worker_id"}
    duration = "dynamo_component_request_duration_seconds"
    assert fams[duration].type == "histogram"
    assert by_worker(fams, duration, duration + "_count") == {"11": 3, "22": 5}
    assert by_worker(fams, duration, duration + "_sum") == {"11": pytest.approx(0.6), "22": pytest.approx(10.0)}
    inf = {dict(k)["worker_id"]: v for k, v in samples(fams, duration, duration + "_bucket").items()
           if dict(k)["le"] == "+Inf"}
    assert inf == {"11": 3, "22": 5}
    assert by_worker(fams, "dynamo_component_errors", "dynamo_component_errors_total") == {"11": 1}
    assert by_worker(fams, "dynamo_component_request_bytes", "dynamo_component_request_bytes_total") == {
        "11": 300, "22": 500}
    assert set(by_worker(fams, "dynamo_component_uptime_seconds")) == {"11", "22"}
    # The snapshot also makes the worker live, like any message from it.
    assert list(samples(fams, "llm_workers").values()) == [2]


def test_a_newer_snapshot_replaces_the_older_and_expiry_removes_the_worker():
    stack = Stack()
    stack.send(11, text_of(worker_registry(3)))
    stack.clock.now += 6
    stack.send(22, text_of(worker_registry(1)))
    stack.send(22, text_of(worker_registry(4)))
    fams = stack.families()
    assert by_worker(fams, "dynamo_component_requests", "dynamo_component_requests_total") == {"11": 3, "22": 4}
    series = stack.fleet.component_metrics.series
    stack.clock.now += 5  # worker 11 silent for 11 s > stale_after 10
    stack.fleet.expire(stack.clock.now)
    fams = stack.families()
    assert by_worker(fams, "dynamo_component_requests", "dynamo_component_requests_total") == {"22": 4}
    assert 0 < stack.fleet.component_metrics.series < series
    stack.clock.now += 20
    stack.fleet.expire(stack.clock.now)
    fams = stack.families()
    assert "dynamo_component_requests" not in fams
    assert stack.fleet.component_metrics.series == 0 and stack.fleet.component_metrics.names == {}


def test_worker_id_in_the_snapshot_is_replaced_by_the_envelope_in_decimal():
    stack = Stack()
    text = '# TYPE dynamo_component_x gauge\ndynamo_component_x{worker_id="7a3f"} 1\n'
    stack.send(2**63 + 5, text)
    assert by_worker(stack.families(), "dynamo_component_x") == {str(2**63 + 5): 1}


GOOD = "# HELP dynamo_component_ok fine\n# TYPE dynamo_component_ok gauge\ndynamo_component_ok 1\n"


@pytest.mark.parametrize("family, reason", [
    ("# TYPE other_metric gauge\nother_metric 1\n", "bad_name"),
    ("# TYPE dynamo_preprocessor_x gauge\ndynamo_preprocessor_x 1\n", "bad_name"),
    ("# TYPE llm_kv_blocks_active gauge\nllm_kv_blocks_active 5\n", "reserved_name"),
    ("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 5\n", "reserved_name"),
    ("# TYPE dynamo_component_h histogram\ndynamo_component_h_bucket{le=\"1\"} 1\ndynamo_component_h_count 1\n",
     "bad_family"),
    ("# TYPE dynamo_component_d gauge\ndynamo_component_d 1\ndynamo_component_d 2\n", "bad_family"),
    ("# TYPE dynamo_component_z gauge\ndynamo_component_z 1\n" + GOOD.replace("1\n", "2\n"),
     "bad_family"),  # the same family twice
])
def test_a_bad_family_is_dropped_and_counted_the_rest_is_kept(family, reason):
    stack = Stack()
    assert stack.send(1, GOOD + family)
    fams = stack.families()
    assert by_worker(fams, "dynamo_component_ok") == {"1": 1}
    assert stack.rejected() == {reason: 1}
    assert samples(fams, "llm_kv_blocks_active") == {}  # the aggregator's own family is untouched
    assert "other_metric" not in fams and "dynamo_component_h" not in fams
    assert stack.families(openmetrics=True)  # the scrape stays valid OpenMetrics


def test_type_conflict_between_workers_keeps_the_first_type():
    stack = Stack()
    stack.send(1, "# TYPE dynamo_component_q gauge\ndynamo_component_q 3\n")
    stack.send(2, "# TYPE dynamo_component_q_total counter\ndynamo_component_q_total 9\n" + GOOD)
    fams = stack.families()
    assert fams["dynamo_component_q"].type == "gauge"
    assert by_worker(fams, "dynamo_component_q") == {"1": 3}
    assert by_worker(fams, "dynamo_component_ok") == {"2": 1}
    assert stack.rejected() == {"type_conflict": 1}
    # The only holder of a name may change its type.
    stack.send(1, "# TYPE dynamo_component_q_total counter\ndynamo_component_q_total 4\n")
    assert stack.families()["dynamo_component_q"].type == "counter"
    # A gauge named like the counter's sample would write dynamo_component_q_total under two types.
    stack.send(3, "# TYPE dynamo_component_q_total gauge\ndynamo_component_q_total 1\n")
    assert "dynamo_component_q_total" not in stack.families(openmetrics=True)
    assert stack.rejected() == {"type_conflict": 2}


@pytest.mark.parametrize("payload, reason", [
    (b"not json", "not_json"),
    (b'{"text": "x"}', "missing_field"),
    (protocol.encode(protocol.MetricsSnapshot(worker_id=1, text="dynamo_component_x{a=\"b\" 1\n")), "not_exposition"),
    (protocol.encode(protocol.MetricsSnapshot(worker_id=1, text="x" * 5000)), "oversized"),
])
def test_unusable_snapshots_are_rejected_whole(payload, reason):
    stack = Stack(max_bytes=4096)
    stack.send(1, GOOD)
    assert not stack.ingest.handle(PATTERN, "namespace.dynamo.component.backend.metrics", payload)
    assert stack.rejected() == {reason: 1}
    assert by_worker(stack.families(), "dynamo_component_ok") == {"1": 1}  # the previous snapshot stays


def test_series_limits_per_worker_and_in_total():
    stack = Stack(max_series_per_worker=20, max_series=30)
    big = "# TYPE dynamo_component_v gauge\n" + "".join(f'dynamo_component_v{{i="{i}"}} {i}\n' for i in range(21))
    assert not stack.send(1, big)
    assert stack.rejected() == {"series_limit": 1}
    assert "dynamo_component_v" not in stack.families()
    fifteen = "# TYPE dynamo_component_v gauge\n" + "".join(f'dynamo_component_v{{i="{i}"}} 1\n' for i in range(15))
    assert stack.send(1, fifteen) and stack.send(2, fifteen)
    assert not stack.send(3, fifteen)  # 45 > 30 in total
    assert stack.send(2, fifteen)  # replacing its own snapshot does not count twice
    assert set(by_worker(stack.families(), "dynamo_component_v")) == {"1", "2"}
    assert stack.rejected() == {"series_limit": 2}
    assert stack.fleet.component_metrics.series == 30


def test_one_worker_id_under_two_endpoints_never_repeats_a_series():
    stack = Stack()
    text = text_of(worker_registry(2))
    stack.send(5, text, endpoint="generate")
    stack.send(5, text, endpoint="embed")
    fams = stack.families()
    assert by_worker(fams, "dynamo_component_requests", "dynamo_component_requests_total") == {"5": 2}
    assert stack.families(openmetrics=True)


def test_parse_snapshot_drops_timestamps_and_checks_prefixes():
    text = "# TYPE dynamo_frontend_inflight gauge\ndynamo_frontend_inflight{model=\"m\"} 3 1700000000000\n"
    metrics, problems = parse_snapshot(text, 9, SnapshotLimits())
    (sample,) = metrics.families["dynamo_frontend_inflight"].samples
    assert sample.timestamp is None and sample.labels == {"model": "m", "worker_id": "9"}
    assert problems == []
    assert check_prefix("dynamo_") == "dynamo_"
    for bad in ("llm_", "l", "process_x", "9abc", ""):
        with pytest.raises(ValueError):
            check_prefix(bad)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_merged_exposition():
    stack = Stack()
    stack.send(11, text_of(worker_registry(3, errors=1)))
    stack.send(22, text_of(worker_registry(5)))
    body, _ = encode(stack.registry, "")
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60,
                            check=False)
    errors = [line for line in result.stdout.decode().splitlines() + result.stderr.decode().splitlines()
              if "dynamo_component" in line and "error" in line.lower()]
    assert not errors, errors


NO_HELP_TEXT = "# TYPE dynamo_component_plain gauge\ndynamo_component_plain 2\n"
NO_HELP_TYPED = {"name": "dynamo_component_typed", "type": "counter", "help": "",
                 "samples": [["dynamo_component_typed_total", {}, 4]]}


def send_families_without_help(stack: Stack) -> None:
    import json

    assert stack.send(1, NO_HELP_TEXT + GOOD)
    payload = json.dumps({"worker_id": 2, "families": [NO_HELP_TYPED]}).encode()
    assert stack.ingest.handle(PATTERN, "namespace.dynamo.component.backend.metrics", payload)


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_a_family_without_help_gets_a_default_help(openmetrics):
    stack = Stack()
    send_families_without_help(stack)
    fams = stack.families(openmetrics)
    assert fams["dynamo_component_plain"].documentation == DEFAULT_HELP
    assert fams["dynamo_component_typed"].documentation == DEFAULT_HELP
    assert fams["dynamo_component_ok"].documentation == "fine"  # a worker's own HELP is kept
    assert by_worker(fams, "dynamo_component_typed", "dynamo_component_typed_total") == {"2": 4}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_finds_no_family_without_help():
    stack = Stack()
    send_families_without_help(stack)
    body, _ = encode(stack.registry, "")
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60,
                            check=False)
    lint = result.stdout.decode().splitlines() + result.stderr.decode().splitlines()
    assert not [line for line in lint if "dynamo_component" in line], lint


def test_flags_validate_prefixes_and_limits(capsys):
    from aggregator.cli import parse_config

    config = parse_config(["--component-metrics-prefixes", "dynamo_component_, dynamo_preprocessor_"])
    assert config.component_metrics.prefixes == ("dynamo_component_", "dynamo_preprocessor_")
    assert config.component_metrics.max_series == 100_000
    for bad in (["--component-metrics-prefixes", "llm_"], ["--component-metrics-max-series-per-worker", "0"]):
        with pytest.raises(SystemExit):
            parse_config(bad)
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


# -- snapshots sent as typed families (MetricsSnapshot.families) ------------------------------------


def busy_registry() -> MetricsRegistry:
    """Every metric kind a worker registry makes, nasty label values, and values JSON cannot carry."""
    runtime = MetricsRegistry()
    endpoint = runtime.namespace("dynamo").component("backend").endpoint('ge"n\\e\nrate')
    calls = EndpointMetrics(endpoint)
    for i in range(9):
        with calls.track(request_bytes=10 * i) as call:
            call.duration = 0.07 * i
            if i == 4:
                call.fail("cancelled")
    special = endpoint.create_gaugevec("special", "NaN, infinities and big values", ["kind"])
    for kind, value in (("nan", float("nan")), ("inf", float("inf")), ("ninf", float("-inf")), ("big", 3.5e12),
                        ("tiny", -1e-9)):
        special.labels(kind=kind).set(value)
    runtime.namespace("dynamo").component("backend").create_counter("kv_blocks_moved", "A counter").inc(7)
    return runtime


def comparable(metrics) -> dict:
    import math

    return {name: (f.type, f.documentation,
                   [(s.name, dict(s.labels), "nan" if math.isnan(s.value) else s.value) for s in family_samples(f)])
            for name, f in metrics.families.items()}


def test_typed_families_read_as_the_text_parser_reads_the_same_registry():
    runtime = busy_registry()
    from_text, text_problems = parse_snapshot(runtime.render()[0].decode(), 42, SnapshotLimits())
    families = protocol.decode_metrics_snapshot(protocol.encode(protocol.MetricsSnapshot(
        worker_id=42, families=runtime.families())), 1 << 20).families  # through JSON, as on the wire
    from_families, family_problems = read_families(families, 42, SnapshotLimits())
    assert text_problems == family_problems == []
    for metrics in (from_text, from_families):  # a clock, read twice: the only value that differs
        assert metrics.families.pop("dynamo_component_uptime_seconds").count == 1
    assert len(from_text.families) >= 6
    assert comparable(from_families) == comparable(from_text)
    for metrics in (from_text, from_families):
        render_lines(metrics).seal()
    assert from_families.chunks_row == from_text.chunks_row  # the same lines on /metrics


def test_the_publisher_sends_typed_families_and_the_aggregator_exports_them_like_text():
    stack_typed, stack_text = Stack(), Stack()
    runtime = busy_registry()
    payload = protocol.encode(protocol.MetricsSnapshot(worker_id=5, families=runtime.families()))
    assert stack_typed.ingest.handle(PATTERN, "namespace.dynamo.component.backend.metrics", payload)
    assert stack_text.send(5, runtime.render()[0].decode())
    typed, text = stack_typed.families(), stack_text.families()
    for name in ("dynamo_component_requests", "dynamo_component_request_duration_seconds",
                 "dynamo_component_special", "dynamo_component_kv_blocks_moved"):
        assert typed[name].type == text[name].type
        assert [(s.name, s.labels, repr(s.value)) for s in typed[name].samples] == \
            [(s.name, s.labels, repr(s.value)) for s in text[name].samples]


@pytest.mark.parametrize("family,why", [
    ({"name": "dynamo_component_bad name", "type": "gauge", "help": "", "samples": [["x", {}, 1]]},
     "not a Prometheus metric name"),
    ({"name": "dynamo_component_x", "type": "gauge", "help": "", "samples": [["dynamo_component_x", {"a-b": "1"}, 1]]},
     "label name 'a-b'"),
    ({"name": "dynamo_component_x", "type": "gauge", "help": "", "samples": [["dynamo_component_x", {"__x": "1"}, 1]]},
     "label name '__x'"),
    ({"name": "dynamo_component_x", "type": "gauge", "help": "", "samples": [["dynamo_component_x", {}, "lots"]]},
     "is not a number"),
    ({"name": "dynamo_component_x", "type": "gauge", "help": "", "samples": [["dynamo_component_y", {}, 1]]},
     "does not belong to a gauge"),
    ({"name": "dynamo_component_x", "type": "info", "help": "", "samples": [["dynamo_component_x", {}, 1]]},
     "is not re-exported"),
])
def test_a_bad_typed_family_is_dropped_alone(family, why):
    import json

    stack = Stack()
    good = {"name": "dynamo_component_ok", "type": "gauge", "help": "fine",
            "samples": [["dynamo_component_ok", {"a": "1"}, "+Inf"]]}
    payload = json.dumps({"worker_id": 3, "families": [family, good]}).encode()
    assert stack.ingest.handle(PATTERN, "namespace.dynamo.component.backend.metrics", payload)
    assert stack.rejected() == {"bad_family": 1}
    fams = stack.families()
    assert [s.value for s in fams["dynamo_component_ok"].samples] == [float("inf")]
    assert "dynamo_component_x" not in fams


@pytest.mark.parametrize("envelope,reason", [
    ({"worker_id": 1}, "missing_field"),
    ({"worker_id": 1, "text": "", "families": []}, "inconsistent"),
    ({"worker_id": 1, "families": [{"name": "x", "type": "gauge"}]}, "missing_field"),
    ({"worker_id": 1, "families": [{"name": "x", "type": "gauge", "help": "", "samples": [["x", {}, None]]}]},
     "wrong_type"),
    ({"worker_id": 1, "families": "x"}, "wrong_type"),
])
def test_a_snapshot_envelope_without_exactly_one_body_is_rejected(envelope, reason):
    import json

    stack = Stack()
    assert not stack.ingest.handle(PATTERN, "namespace.dynamo.component.backend.metrics", json.dumps(envelope).encode())
    assert stack.rejected() == {reason: 1}


def test_hostile_typed_families_never_raise_and_what_is_kept_stays_valid_exposition():
    """Families that are well-formed, then damaged by hypothesis: whatever is kept must leave the
    whole scrape readable by prometheus_client's text and OpenMetrics parsers (the oracle)."""
    import json

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    values = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(-5, 2**60),
                       st.sampled_from(["NaN", "+Inf", "-Inf", "inf", "", "1", None, True]))
    bounds = st.one_of(st.floats(-100, 100, allow_nan=False, width=16), st.sampled_from([0.5, 1, 2.5]))

    @st.composite
    def family(draw):
        kind = draw(st.sampled_from(["counter", "gauge", "histogram", "summary", "unknown"]))
        name = "dynamo_component_" + draw(st.sampled_from(["a", "b", "c"]))
        rows = []
        for labels in draw(st.lists(st.dictionaries(st.sampled_from(["x", "y"]), st.text("pq\"\n", max_size=2),
                                                    max_size=2), min_size=1, max_size=3)):
            if kind == "counter":
                rows.append([name + "_total", labels, draw(st.integers(0, 100))])
            elif kind in ("gauge", "unknown"):
                rows.append([name, labels, draw(st.floats(allow_nan=False, allow_infinity=False))])
            elif kind == "histogram":
                les = sorted(set(draw(st.lists(bounds, max_size=4))))
                counts = sorted(draw(st.lists(st.integers(0, 50), min_size=len(les) + 1, max_size=len(les) + 1)))
                for le, count in zip([*map(str, les), "+Inf"], counts):
                    rows.append([name + "_bucket", {**labels, "le": le}, count])
                rows += [[name + "_count", labels, counts[-1]], [name + "_sum", labels, draw(st.integers(0, 99))]]
            else:
                for q in sorted(set(draw(st.lists(st.sampled_from(["0.5", "0.9", "1", "0.99"]), max_size=3)))):
                    rows.append([name, {**labels, "quantile": q}, draw(st.floats(0, 10))])
                rows += [[name + "_sum", labels, draw(st.integers(0, 99))], [name + "_count", labels, 3]]
        for _ in range(draw(st.integers(0, 2))):  # damage
            if not rows:
                break
            row = rows[draw(st.integers(0, len(rows) - 1))]
            how = draw(st.sampled_from(["value", "le", "quantile", "drop", "swap"]))
            if how == "value":
                row[2] = draw(values)
            elif how in ("le", "quantile") and how in row[1]:
                row[1] = {**row[1], how: draw(st.sampled_from(["NaN", "x", "-1", "2", "1e3", "+Inf", "inf", "0.50"]))}
            elif how == "drop":
                rows.remove(row)
            elif how == "swap" and len(rows) > 1:
                i = rows.index(row)
                rows[i], rows[i - 1] = rows[i - 1], rows[i]
        return {"name": name, "type": kind, "help": "h", "samples": rows}

    kept, dropped = [], []

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(families=st.lists(family(), max_size=3), worker_id=st.integers(0, 2**64 - 1))
    def check(families, worker_id):
        typed, text = Stack(), Stack()
        payload = json.dumps({"worker_id": worker_id, "families": families}, allow_nan=True).encode()
        typed.ingest.handle(PATTERN, "namespace.dynamo.component.backend.metrics", payload)  # must not raise
        text.send(worker_id, as_text(families))  # the same families, as the text format
        for stack in (typed, text):
            exported = stack.families()
            stack.families(openmetrics=True)  # raises if anything kept breaks the OpenMetrics scrape
            kept.extend(name for name in exported if name.startswith("dynamo_component_"))
            dropped.append(stack.rejected().get("bad_family", 0))

    def as_text(families) -> str:
        out = []
        for f in families:
            header = f["name"] + ("_total" if f["type"] == "counter" else "")
            out.append(f"# HELP {header} {f['help']}\n# TYPE {header} {f['type']}\n")
            for name, labels, value in f["samples"]:
                rendered = ",".join(f"{k}={json.dumps(v)}" for k, v in labels.items())  # \\, \" and \n as Prometheus
                out.append(f"{name}{{{rendered}}} {value}\n")
        return "".join(out)

    check()
    assert len(kept) >= 50 and sum(dropped) >= 20  # both paths are reached


@pytest.mark.parametrize("typed", [False, True], ids=["text", "typed"])
def test_le_and_quantile_are_written_canonically(typed):
    import json

    stack = Stack()
    rows = [["dynamo_component_h_bucket", {"le": "1e3"}, 1], ["dynamo_component_h_bucket", {"le": "inf"}, 2],
            ["dynamo_component_h_count", {}, 2], ["dynamo_component_h_sum", {}, 5]]
    quantiles = [["dynamo_component_s", {"quantile": "0.50"}, 1.5], ["dynamo_component_s_sum", {}, 3],
                 ["dynamo_component_s_count", {}, 2]]
    if typed:
        payload = json.dumps({"worker_id": 1, "families": [
            {"name": "dynamo_component_h", "type": "histogram", "help": "", "samples": rows},
            {"name": "dynamo_component_s", "type": "summary", "help": "", "samples": quantiles}]}).encode()
        assert stack.ingest.handle(PATTERN, "namespace.dynamo.component.backend.metrics", payload)
    else:
        def lines(kind, name, samples):
            body = "".join(f"{n}{{{','.join(f'{k}={json.dumps(v)}' for k, v in labels.items())}}} {value}\n"
                           for n, labels, value in samples)
            return f"# TYPE {name} {kind}\n{body}"
        assert stack.send(1, lines("histogram", "dynamo_component_h", rows)
                          + lines("summary", "dynamo_component_s", quantiles))
    assert stack.rejected() == {}
    fams = stack.families(openmetrics=True)  # prometheus_client's parser requires "+Inf", not "inf"
    assert [s.labels.get("le") for s in fams["dynamo_component_h"].samples if s.name.endswith("_bucket")] == \
        ["1000.0", "+Inf"]
    assert [s.labels["quantile"] for s in fams["dynamo_component_s"].samples if s.name == "dynamo_component_s"] == \
        ["0.5"]


@pytest.mark.parametrize("lines,why", [
    ('dynamo_component_c_total{a="1"} -1\n', "never negative"),
    ('dynamo_component_c_total{a="1"} NaN\n', "never negative or NaN"),
])
def test_a_text_family_openmetrics_forbids_is_dropped_alone(lines, why):
    stack = Stack()
    assert stack.send(2, "# TYPE dynamo_component_c_total counter\n" + lines + "# TYPE dynamo_component_g gauge\n"
                      "dynamo_component_g 1\n")
    assert stack.rejected() == {"bad_family": 1}
    fams = stack.families(openmetrics=True)
    assert "dynamo_component_c" not in fams and "dynamo_component_g" in fams


@pytest.mark.parametrize("where", ["family", "sample", "label"])
def test_a_typed_name_ending_in_a_newline_is_not_a_name(where):
    import json

    # Python's `$` matches before a final newline: a check with re.match would let these through
    # and the newline would split a line of /metrics.
    name = "dynamo_component_x\n" if where in ("family", "sample") else "dynamo_component_x"
    family = {"name": name if where == "family" else "dynamo_component_x", "type": "gauge", "help": "",
              "samples": [[name, {"a\n" if where == "label" else "a": "1"}, 1]]}
    stack = Stack()
    payload = json.dumps({"worker_id": 1, "families": [family]}).encode()
    assert stack.ingest.handle(PATTERN, "namespace.dynamo.component.backend.metrics", payload)
    assert stack.rejected() == {"bad_family": 1}
    assert "dynamo_component_x" not in stack.families(openmetrics=True)
