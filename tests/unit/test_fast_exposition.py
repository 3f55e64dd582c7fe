"""The fast encoder's bytes are prometheus_client's bytes, for the same state, in every format."""

from __future__ import annotations

import json
import math
import random

import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

import fleet_protocol as protocol
from aggregator.cli import parse_config
from aggregator.exposition import encoder as exposition
from aggregator.service import Aggregator
from fleet_worker.endpoint_metrics import EndpointMetrics
from fleet_worker.registry import MetricsRegistry
from mock_worker.engine import EngineConfig, SimulatedEngine
from mock_worker.gpus import SimulatedGpus

ACCEPTS = [
    "",
    "text/plain;version=0.0.4",
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",  # Prometheus 2.x
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,"
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;version=1.0.0;q=0.3",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text",
]


def handle(aggregator: Aggregator, event: str, component: str, payload: bytes) -> None:
    pattern = protocol.component_subject("dynamo", "*", event)
    assert aggregator.ingest.handle(pattern, protocol.component_subject("dynamo", component, event), payload)


@pytest.fixture(scope="module")
def populated():
    aggregator = Aggregator(parse_config(["--port", "0"]))
    rng = random.Random(3)
    for i in range(60):
        worker_id = rng.getrandbits(63)
        component = "backend" if i % 3 else "prefill"
        endpoint = ['generate', 'we"ird\\end\npoint', "chat"][i % 3]
        engine = SimulatedEngine(EngineConfig(), random.Random(i))
        for _ in range(20):
            samples, completions = engine.step(0.5)
        rank = i % 2 if i % 5 == 0 else None
        metrics = engine.metrics(rank)
        handle(aggregator, protocol.KV_METRICS, component,
               protocol.encode(protocol.LoadEvent(worker_id, metrics, endpoint)))
        hit = {"worker_id": worker_id, "isl_blocks": 10 + i, "overlap_blocks": i % 10, "dp_rank": rank}
        handle(aggregator, protocol.KV_HIT_RATE, component, json.dumps(hit).encode())
        gpus = SimulatedGpus(2, random.Random(i)).step(1.0, metrics)
        handle(aggregator, protocol.GPU_METRICS, component, protocol.encode(protocol.GpuMetricsEvent(
            worker_id=worker_id, hostname=f"node-{i}", endpoint=endpoint, dp_rank=rank, gpus=gpus,
            driver_version="570.1" if i % 2 else None, sampler_error=None)))
        runtime = MetricsRegistry()
        calls = EndpointMetrics(runtime.namespace("dynamo").component(component).endpoint("generate"))
        for completion in completions:
            with calls.track(request_bytes=completion.prompt_tokens * 4) as call:
                call.duration = completion.latency
        snapshot = protocol.MetricsSnapshot(worker_id=worker_id, text=runtime.render()[0].decode(),
                                            endpoint=endpoint, dp_rank=rank)
        handle(aggregator, protocol.COMPONENT_METRICS, component, protocol.encode(snapshot))
    # Freeze what changes between two renders by itself: process CPU/RSS and the clocks.
    from prometheus_client import ProcessCollector

    from aggregator.collectors.fleet_kv import FleetCollector

    for collector in list(aggregator.registry._collector_to_names):
        if isinstance(collector, ProcessCollector):
            aggregator.registry.unregister(collector)
        if isinstance(collector, FleetCollector):
            now, wall = collector._monotonic(), collector._wall()
            collector._monotonic, collector._wall = (lambda now=now: now), (lambda wall=wall: wall)
    # Families prometheus_client renders specially: _created samples, big and special floats, no labels.
    extra = aggregator.registry
    Counter("zz_plain_counter", "A counter with _created", ["a"], registry=extra).labels("x").inc(3)
    Histogram("zz_plain_histogram", "A histogram with _created", registry=extra).observe(0.3)
    Gauge("zz_big", "Huge\nand \\ small values", ["v"], registry=extra).labels("1").set(1.5e12)

    class Special:
        def collect(self):
            family = GaugeMetricFamily("zz_special", "Special floats", labels=["kind"])
            for kind, value in (("nan", math.nan), ("inf", math.inf), ("ninf", -math.inf), ("neg", -2.5e9),
                                ("tiny", 1e-12), ("int", 7), ("edge", 999999.9999), ("million", 1e6)):
                family.add_metric([kind], value)
            yield family
            yield Metric("zz_empty", "A family without samples", "gauge")

    extra.register(Special())
    return aggregator


@pytest.mark.parametrize("accept", ACCEPTS)
def test_fast_bytes_equal_prometheus_clients(populated, accept):
    # prometheus_client's encoder reads `samples`, which for component series are read back from
    # their rendered lines: equal bytes prove the lines and the samples agree.
    encoder, content_type = choose_encoder(accept)
    expected = encoder(populated.registry)
    body, fast_content_type = exposition.encode(populated.registry, accept)
    assert fast_content_type == content_type
    assert len(body) > 100_000
    assert body == expected


@pytest.mark.parametrize("accept", ACCEPTS[:3])
def test_gzipped_body_inflates_to_prometheus_clients_bytes(populated, accept):
    import gzip

    from aggregator.edges.scrape_body import render as _render

    encoder, content_type = choose_encoder(accept)
    body, headers = _render(populated.registry, accept, True)
    assert headers == {"Content-Type": content_type, "Content-Encoding": "gzip"}
    assert body[:2] == b"\x1f\x8b"  # a gzip member, which is what Content-Encoding: gzip promises
    assert gzip.decompress(body) == encoder(populated.registry)
    assert len(body) < len(encoder(populated.registry)) / 5


def test_restricted_output_is_equal_too(populated):
    restricted = populated.registry.restricted_registry(["llm_kv_blocks_active", "DCGM_FI_DEV_GPU_UTIL"])
    encoder, _ = choose_encoder("")
    assert exposition.encode(restricted, "")[0] == encoder(restricted)


SELECTIONS = [  # (series names, how many families hold them)
    (["llm_kv_blocks_active", "DCGM_FI_DEV_GPU_UTIL"], 2),
    (["llm_kv_hit_rate_isl_blocks_total", "llm_workers", "llm_gpus", "zz_big", "zz_plain_counter_total"], 5),
    (["dynamo_component_requests_total", "dynamo_component_request_duration_seconds_bucket",
      "dynamo_component_request_duration_seconds_count", "llm_gpu_sampler_up"], 3),
    (["llm_aggregator_messages_accepted_total", "llm_aggregator_scrape_duration_seconds_count", "no_such_series"], 2),
]


@pytest.mark.parametrize("names, families", SELECTIONS)
@pytest.mark.parametrize("accept", ACCEPTS[:3])
def test_selected_bytes_equal_prometheus_clients_restriction_of_every_family(populated, names, families, accept):
    class Restricted:  # prometheus_client's own restriction, applied to every family collected
        def collect(self):
            for metric in populated.registry.collect():
                restricted = metric._restricted_metric(set(names))
                if restricted is not None:
                    yield restricted

    encoder, _ = choose_encoder(accept)
    expected = encoder(Restricted())
    assert exposition.encode(populated.registry, accept, names)[0] == expected
    assert expected.count(b"# TYPE") == families


def test_component_samples_read_back_from_their_lines_equal_the_parsed_ones():
    from aggregator.collectors.component_metrics import family_samples
    from aggregator.exposition.encoder import samples_of_chunk
    from aggregator.ingest.component_snapshots import (
        SnapshotLimits,
        parse_snapshot,
        render_lines,
    )

    runtime = MetricsRegistry()
    calls = EndpointMetrics(runtime.namespace("dynamo").component("backend").endpoint("gen\\e\"rate"))
    for i in range(7):
        with calls.track(request_bytes=100 * i) as call:
            call.duration = 0.037 * i
    metrics, problems = parse_snapshot(runtime.render()[0].decode(), 2**63 + 1, SnapshotLimits())
    assert problems == []
    parsed = {name: list(family.samples) for name, family in metrics.families.items()}
    render_lines(metrics)
    rendered = [family for family in metrics.families.values() if family.samples is None]
    assert len(rendered) >= 3  # counters and histograms are kept as lines only
    for family in metrics.families.values():
        assert family.count == len(parsed[family.name])
        assert [(s.name, dict(s.labels), float(s.value)) for s in family_samples(family)] == \
            [(s.name, dict(s.labels), float(s.value)) for s in parsed[family.name]]
        if family.chunk is not None:
            assert samples_of_chunk(family.chunk) == family_samples(family)


def test_rendered_labels_are_reused_across_scrapes(populated):
    populated.registry.collect()
    first = {id(s.labels) for m in populated.registry.collect() if m.name == "llm_kv_blocks_active"
             for s in m.samples}
    second = {id(s.labels) for m in populated.registry.collect() if m.name == "llm_kv_blocks_active"
              for s in m.samples}
    assert first == second and len(first) == 60


def test_rendering_in_a_thread_while_the_fleet_changes_never_fails():
    """/metrics renders off the event loop; the state it reads keeps changing under it."""
    import threading
    import time

    from aggregator.edges.scrape_body import render as _render
    from bench.payloads import full_worker_messages

    aggregator = Aggregator(parse_config(["--port", "0", "--stale-after", "0.2"]))
    errors: list[BaseException] = []
    renders = 0
    stop = threading.Event()

    def render_loop() -> None:
        nonlocal renders
        while not stop.is_set():
            try:
                for accept in ("", ACCEPTS[2]):
                    _render(aggregator.registry, accept, False)
                    renders += 1
            except BaseException as error:  # noqa: BLE001 - the test reports it
                errors.append(error)
                return

    thread = threading.Thread(target=render_loop)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        for round_ in range(6):
            messages = full_worker_messages(300, first=round_ * 300)
            for i, (subject, payload) in enumerate(messages):
                # New components (groups) keep appearing, old workers keep expiring.
                component = f"c{(round_ * 300 + i) // 2}"
                subject = subject.replace(".component.backend.", f".component.{component}.")
                event = subject.rsplit(".", 1)[1]
                aggregator.ingest.handle(protocol.component_subject("dynamo", "*", event), subject, payload)
                if i % 200 == 0:
                    aggregator.expire_now()
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
            aggregator.expire_now()
    finally:
        stop.set()
        thread.join(30)
    assert errors == []
    assert renders >= 4
    # The render caches made on both threads let go of every worker once all have expired.
    from aggregator.collectors.fleet_kv import FleetCollector
    from aggregator.collectors.gpus import GpuCollector

    time.sleep(0.3)
    aggregator.expire_now()
    assert len(aggregator.fleet) == 0
    for collector in list(aggregator.registry._collector_to_names):
        if isinstance(collector, FleetCollector):
            assert len(collector.labels) == 0
        if isinstance(collector, GpuCollector):
            assert len(collector.readings) == 0
