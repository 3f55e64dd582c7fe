"""The worker-side MetricsRegistry and automatic endpoint metrics, on plain values."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from fleet_worker.endpoint_metrics import (
    EndpointMetrics,
    HandlerError,
    current_call,
    payload_size,
)
from fleet_worker.registry import (
    MetricsError,
    MetricsRegistry,
    component_metric_name,
    sanitize_label_value,
    sanitize_name,
)

from ..support import samples

AUTO = (("dynamo_component", "backend"), ("dynamo_endpoint", "generate"), ("dynamo_namespace", "dynamo"))


def families(runtime: MetricsRegistry, openmetrics: bool = False) -> dict:
    accept = "application/openmetrics-text;version=1.0.0" if openmetrics else ""
    body, _ = runtime.render(accept)
    parser = parse_openmetrics if openmetrics else parse_text
    return {f.name: f for f in parser(body.decode())}


def levels():
    runtime = MetricsRegistry()
    ns = runtime.namespace("dynamo")
    comp = ns.component("backend")
    return runtime, ns, comp, comp.endpoint("generate")


def test_auto_labels_go_as_far_as_the_level():
    runtime, ns, comp, ep = levels()
    runtime.create_gauge("rt", "runtime level").set(1)
    ns.create_gauge("ns", "namespace level").set(2)
    comp.create_gauge("comp", "component level").set(3)
    ep.create_gauge("ep", "endpoint level").set(4)
    fams = families(runtime)
    assert samples(fams, "dynamo_component_rt") == {(): 1}
    assert samples(fams, "dynamo_component_ns") == {(("dynamo_namespace", "dynamo"),): 2}
    assert samples(fams, "dynamo_component_comp") == {
        (("dynamo_component", "backend"), ("dynamo_namespace", "dynamo")): 3}
    assert samples(fams, "dynamo_component_ep") == {AUTO: 4}
    assert (runtime.level, ns.level, comp.level, ep.level) == ("runtime", "namespace", "component", "endpoint")
    assert ep.hierarchy == "dynamo_backend_generate" and ep.basename == "generate"


def test_labels_are_written_alphabetically_as_dynamo_does():
    runtime, *_, ep = levels()
    ep.create_counter("processed", "Items", labels={"type": "batch", "priority": "high"}).inc()
    text = runtime.render()[0].decode()
    assert ('dynamo_component_processed_total{dynamo_component="backend",dynamo_endpoint="generate",'
            'dynamo_namespace="dynamo",priority="high",type="batch"} 1.0') in text


def test_hierarchy_must_be_built_in_order():
    runtime, ns, comp, ep = levels()
    with pytest.raises(MetricsError, match="created from a namespace"):
        runtime.component("x")
    with pytest.raises(MetricsError):
        ep.endpoint("again")
    with pytest.raises(MetricsError):
        ns.namespace("nested")


@pytest.mark.parametrize("label", ["dynamo_namespace", "dynamo_component", "dynamo_endpoint"])
def test_user_labels_may_not_reuse_auto_label_names(label):
    *_, ep = levels()
    with pytest.raises(MetricsError, match="automatically added by auto_label"):
        ep.create_counter("x", "x", labels={label: "v"})
    with pytest.raises(MetricsError, match="automatically added"):
        ep.create_countervec("y", "y", [label])


@pytest.mark.parametrize("labels", [["worker_id"], ["le"], ["bad-name"], ["__hidden"], ["a", "a"], ["1x"]])
def test_invalid_reserved_or_duplicate_label_names_are_refused(labels):
    *_, ep = levels()
    with pytest.raises(MetricsError):
        ep.create_countervec("x", "x", labels)


def test_const_and_dynamic_labels_may_not_overlap():
    *_, ep = levels()
    with pytest.raises(MetricsError, match="twice"):
        ep.create_countervec("x", "x", ["service"], const_labels={"service": "api"})


def test_names_are_sanitised_validated_and_prefixed_once():
    assert sanitize_name("request-count.v2") == "requestcountv2"
    assert component_metric_name("queue size") == "dynamo_component_queuesize"
    assert component_metric_name("dynamo_component_requests") == "dynamo_component_requests"
    assert component_metric_name("ns:rule") == "dynamo_component_ns:rule"
    for bad in ("", "---", "2xx", "dynamo_component_"):
        with pytest.raises(MetricsError):
            component_metric_name(bad)


def test_auto_label_values_are_sanitised():
    assert sanitize_label_value("my-ns") == "my_ns"
    assert sanitize_label_value("vllm.worker/v2") == "vllm_worker_v2"
    assert sanitize_label_value("2nd") == "_2nd"
    assert sanitize_label_value("__private") == "private"
    for bad in ("", "___", "-.-"):
        with pytest.raises(MetricsError):
            sanitize_label_value(bad)
    runtime = MetricsRegistry()
    ep = runtime.namespace("my-ns").component("vllm.worker").endpoint("gen/1")
    ep.create_gauge("g", "g").set(1)
    assert samples(families(runtime), "dynamo_component_g") == {
        (("dynamo_component", "vllm_worker"), ("dynamo_endpoint", "gen_1"), ("dynamo_namespace", "my_ns")): 1}


def test_factories_counter_gauge_histogram_int_and_vectors():
    runtime, *_, ep = levels()
    ep.create_intcounter("ints", "ints").inc(3)
    ep.create_intgauge("depth", "depth").set(7)
    hist = ep.create_histogram("latency", "latency", buckets=[0.1, 1.0])
    hist.observe(0.5)
    vec = ep.create_countervec("responses", "responses", ["status"], const_labels={"service": "api"})
    vec.labels("200").inc()
    vec.labels(status="404").inc(2)
    gauges = ep.create_intgaugevec("slots", "slots", ["kind"])
    gauges.labels("free").set(3)
    hvec = ep.create_histogramvec("size", "size", ["kind"], buckets=[1, 10])
    hvec.labels("prompt").observe(5)
    fams = families(runtime)
    assert samples(fams, "dynamo_component_ints", "dynamo_component_ints_total") == {AUTO: 3}
    assert fams["dynamo_component_ints"].type == "counter"
    assert samples(fams, "dynamo_component_depth") == {AUTO: 7}
    assert fams["dynamo_component_latency"].type == "histogram"
    buckets = samples(fams, "dynamo_component_latency", "dynamo_component_latency_bucket")
    assert {dict(k)["le"]: v for k, v in buckets.items()} == {"0.1": 0, "1.0": 1, "+Inf": 1}
    responses = samples(fams, "dynamo_component_responses", "dynamo_component_responses_total")
    assert {(dict(k)["status"], dict(k)["service"]): v for k, v in responses.items()} == {
        ("200", "api"): 1, ("404", "api"): 2}
    assert list(samples(fams, "dynamo_component_slots").values()) == [3]
    assert {dict(k)["le"]: v for k, v in samples(fams, "dynamo_component_size", "dynamo_component_size_bucket")
            .items()} == {"1.0": 0, "10.0": 1, "+Inf": 1}
    with pytest.raises(MetricsError):
        vec.labels("200", "extra")
    with pytest.raises(MetricsError):
        vec.labels(code="200")
    with pytest.raises(MetricsError):
        ep.create_histogram("bad", "bad", buckets=[2, 1])


def test_one_name_is_one_family_across_levels_but_types_and_labels_must_agree():
    runtime, ns, comp, ep = levels()
    other = comp.endpoint("embed")
    ep.create_counter("hits", "hits").inc()
    other.create_counter("hits", "hits").inc(2)
    assert len(samples(families(runtime), "dynamo_component_hits", "dynamo_component_hits_total")) == 2
    with pytest.raises(MetricsError, match="already exists as a counter"):
        ep.create_gauge("hits", "hits")
    with pytest.raises(MetricsError, match="labels"):
        comp.create_counter("hits", "hits")  # a component-level series would lack dynamo_endpoint


def test_uptime_is_a_runtime_gauge_without_auto_labels_and_no_created_series():
    now = [100.0]
    runtime = MetricsRegistry(clock=lambda: now[0])
    runtime.namespace("a").component("b").endpoint("c").create_counter("n", "n").inc()
    now[0] = 112.5
    fams = families(runtime)
    assert samples(fams, "dynamo_component_uptime_seconds") == {(): 12.5}
    assert not [name for name in fams if name.endswith("_created")]
    assert "dynamo_component_n" in families(runtime, openmetrics=True)


# -- automatic endpoint metrics ----------------------------------------------------------


def endpoint_values(runtime: MetricsRegistry) -> dict:
    fams = families(runtime)

    def one(name, sample=None):
        values = samples(fams, name, sample)
        return values.get(AUTO, 0)

    errors = samples(fams, "dynamo_component_errors", "dynamo_component_errors_total")
    return {
        "requests": one("dynamo_component_requests", "dynamo_component_requests_total"),
        "inflight": one("dynamo_component_inflight_requests"),
        "request_bytes": one("dynamo_component_request_bytes", "dynamo_component_request_bytes_total"),
        "response_bytes": one("dynamo_component_response_bytes", "dynamo_component_response_bytes_total"),
        "count": one("dynamo_component_request_duration_seconds", "dynamo_component_request_duration_seconds_count"),
        "sum": one("dynamo_component_request_duration_seconds", "dynamo_component_request_duration_seconds_sum"),
        "errors": {dict(k)["error_type"]: v for k, v in errors.items()},
    }


def instrumented():
    runtime, *_, ep = levels()
    ticks = iter(range(0, 1000, 2))  # every clock read advances 2 s
    return runtime, EndpointMetrics(ep, clock=lambda: float(next(ticks)))


def test_wrapped_sync_handler_counts_requests_bytes_and_duration():
    runtime, metrics = instrumented()

    @metrics.handler
    def echo(request: bytes) -> bytes:
        assert current_call() is not None
        assert endpoint_values(runtime)["inflight"] == 1
        return request * 2

    assert echo(b"abcd") == b"abcdabcd"
    assert echo("héllo") == "héllohéllo"
    assert current_call() is None
    assert endpoint_values(runtime) == {"requests": 2, "inflight": 0, "request_bytes": 4 + 6,
                                        "response_bytes": 8 + 12, "count": 2, "sum": 4.0, "errors": {}}


async def test_wrapped_async_handler_and_exception_counts_error_and_propagates():
    runtime, metrics = instrumented()

    @metrics.handler
    async def generate(request: dict) -> dict:
        await asyncio.sleep(0)
        if request.get("fail"):
            raise RuntimeError("engine crashed")
        return {"text": "ok"}

    assert await generate({"prompt": "hi"}) == {"text": "ok"}
    with pytest.raises(RuntimeError, match="engine crashed"):
        await generate({"fail": True})
    with pytest.raises(HandlerError):
        await _raise_handler_error(metrics)
    values = endpoint_values(runtime)
    assert values["requests"] == 3 and values["inflight"] == 0 and values["count"] == 3
    assert values["errors"] == {"generate": 1, "deserialization": 1}
    assert values["request_bytes"] == payload_size({"prompt": "hi"}) + payload_size({"fail": True}) + 2
    assert values["response_bytes"] == payload_size({"text": "ok"})


async def _raise_handler_error(metrics: EndpointMetrics):
    @metrics.handler
    async def strict(request: bytes) -> bytes:
        raise HandlerError("deserialization", "bad request")

    return await strict(b"??")


async def test_wrapped_async_stream_counts_every_item_and_lasts_until_the_end():
    runtime, metrics = instrumented()

    @metrics.handler
    async def stream(request: str):
        for word in request.split():
            assert current_call() is not None
            yield word

    assert [w async for w in stream("one two three")] == ["one", "two", "three"]
    values = endpoint_values(runtime)
    assert values["requests"] == 1 and values["response_bytes"] == len("onetwothree")
    assert values["count"] == 1 and values["sum"] == 2.0


def test_wrapped_sync_generator_and_method_with_request_arg():
    runtime, metrics = instrumented()

    class Engine:
        @metrics.handler(request_arg=1)
        def tokens(self, request: bytes):
            yield from (b"ab", b"cde")

    assert list(Engine().tokens(b"12345")) == [b"ab", b"cde"]
    values = endpoint_values(runtime)
    assert values["request_bytes"] == 5 and values["response_bytes"] == 5


async def test_context_manager_sync_and_async_reported_duration_and_fail():
    runtime, metrics = instrumented()
    with metrics.track(request_bytes=10) as call:
        call.response_bytes += 3
        call.duration = 0.25  # e.g. a latency the engine measured
    async with metrics.track() as call:
        call.fail("response_stream")
    with pytest.raises(asyncio.CancelledError):
        async with metrics.track():
            raise asyncio.CancelledError
    values = endpoint_values(runtime)
    assert values["requests"] == 3 and values["request_bytes"] == 10 and values["response_bytes"] == 3
    assert values["sum"] == pytest.approx(0.25 + 2 + 2)
    assert values["errors"] == {"response_stream": 1, "cancelled": 1}


def test_endpoint_metrics_need_an_endpoint():
    runtime, ns, comp, ep = levels()
    with pytest.raises(MetricsError):
        EndpointMetrics(comp)
