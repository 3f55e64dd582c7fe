"""GPU readings in the fleet and on /metrics: dcgm-exporter's names and labels, expiry, fleet views."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry

from aggregator.collectors.fleet_kv import FleetCollector
from aggregator.collectors.gpus import GpuCollector, combine_views, framebuffer_mib, summarize
from aggregator.collectors.telemetry import Telemetry
from aggregator.exposition.encoder import encode
from aggregator.ingest.pipeline import Ingest
from aggregator.state.fleet import Fleet, GroupKey
from fleet_protocol import (
    ForwardPassMetrics,
    GpuMetricsEvent,
    GpuReading,
    KvStats,
    WorkerStats,
)

from ..support import render_families

GPU_PATTERN = "namespace.dynamo.component.*.gpu_metrics"
DCGM_NAMES = ["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE",
              "DCGM_FI_DEV_FB_RESERVED", "DCGM_FI_DEV_FB_TOTAL", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_MEMORY_TEMP",
              "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_SM_CLOCK",
              "DCGM_FI_DEV_MEM_CLOCK"]

H100 = {"index": 0, "uuid": "GPU-11111111-2222-3333-4444-555555555555", "name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": "00000000:18:00.0", "gpu_util": 80, "mem_copy_util": 40, "fb_used_mib": 40000,
        "fb_free_mib": 40959, "fb_reserved_mib": 600, "fb_total_mib": 81559, "gpu_temp_c": 61,
        "memory_temp_c": 70, "power_usage_w": 512.5, "total_energy_mj": 123456789012, "sm_clock_mhz": 1980,
        "mem_clock_mhz": 2619, "processes": [{"pid": 4242, "used_memory_mib": 39000}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_stack(hostname_label="Hostname"):
    clock = Clock()
    registry = CollectorRegistry()
    telemetry = Telemetry(registry)
    fleet = Fleet(stale_after=10)
    kv = FleetCollector(fleet, wall_clock=lambda: 1_700_000_000.0 + clock.now, monotonic_clock=clock)
    gpus = GpuCollector(fleet, hostname_label=hostname_label, monotonic_clock=clock)
    for collector in (kv, gpus):
        registry.register(collector)
    fleet.add_listener(kv.labels)
    fleet.add_listener(gpus.readings)
    ingest = Ingest(fleet, telemetry.counts, namespace="dynamo", default_component="backend",
                    max_message_bytes=65536, clock=clock)
    return ingest, registry, clock


def send_gpu(ingest, worker_id, gpus, *, component="backend", **fields) -> bool:
    payload = json.dumps({"worker_id": worker_id, "hostname": "node-a", "driver_version": "570.133.20",
                          "gpus": gpus, **fields}).encode()
    return ingest.handle(GPU_PATTERN, f"namespace.dynamo.component.{component}.gpu_metrics", payload)


def send_load(ingest, worker_id, total_blocks=4096, component="backend") -> bool:
    data = {"worker_stats": {"request_active_slots": 3, "request_total_slots": 8},
            "kv_stats": {"kv_active_blocks": 30, "kv_total_blocks": total_blocks}}
    payload = json.dumps({"worker_id": worker_id, "data": data}).encode()
    return ingest.handle("namespace.dynamo.component.*.kv_metrics",
                         f"namespace.dynamo.component.{component}.kv_metrics", payload)


def families(registry, openmetrics=False) -> dict:
    return render_families(registry, openmetrics=openmetrics)


def series(fams, name) -> list[tuple[dict, float]]:
    family = fams.get(name)
    return [] if family is None else [(s.labels, s.value) for s in family.samples if s.name == name]


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text-0.0.4", "openmetrics"])
def test_dcgm_names_labels_and_units(openmetrics):
    ingest, registry, _ = make_stack()
    assert send_gpu(ingest, 7587888657184927289, [H100, {**H100, "index": 1, "uuid": "GPU-b",
                                                        "pci_bus_id": "00000000:2A:00.0"}], dp_rank=2)
    fams = families(registry, openmetrics)
    expected_labels = {
        "gpu": "0", "UUID": H100["uuid"], "pci_bus_id": "00000000:18:00.0", "device": "nvidia0",
        "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "node-a", "DCGM_FI_DRIVER_VERSION": "570.133.20",
        "component": "backend", "endpoint": "generate", "worker_id": "7587888657184927289", "dp_rank": "2",
    }
    values = {}
    for name in DCGM_NAMES:
        found = series(fams, name)
        assert len(found) == 2, name
        assert fams[name].type == "gauge"
        labels, value = next((labels, value) for labels, value in found if labels["gpu"] == "0")
        assert labels == expected_labels, name
        values[name] = value
    assert values == {
        "DCGM_FI_DEV_GPU_UTIL": 80, "DCGM_FI_DEV_MEM_COPY_UTIL": 40, "DCGM_FI_DEV_FB_USED": 40000,
        "DCGM_FI_DEV_FB_FREE": 40959, "DCGM_FI_DEV_FB_RESERVED": 600, "DCGM_FI_DEV_FB_TOTAL": 81559,
        "DCGM_FI_DEV_GPU_TEMP": 61, "DCGM_FI_DEV_MEMORY_TEMP": 70, "DCGM_FI_DEV_POWER_USAGE": 512.5,
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 123456789012, "DCGM_FI_DEV_SM_CLOCK": 1980,
        "DCGM_FI_DEV_MEM_CLOCK": 2619,
    }
    # The energy sample keeps dcgm-exporter's exact name in both formats (no `_total`).
    energy = fams["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"]
    assert {s.name for s in energy.samples} == {"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"}
    (process,) = [(labels, v) for labels, v in series(fams, "llm_gpu_process_memory_used_mib") if labels["gpu"] == "0"]
    assert process == ({**expected_labels, "pid": "4242"}, 39000)
    assert series(fams, "llm_gpu_sampler_up") == [({"component": "backend", "endpoint": "generate",
                                                    "worker_id": "7587888657184927289", "dp_rank": "2",
                                                    "error": ""}, 1.0)]


def test_energy_is_exact_as_a_sample_value_in_text_format():
    ingest, registry, _ = make_stack()
    send_gpu(ingest, 1, [{**H100, "total_energy_mj": 9_007_199_254_740_993}])  # above 2**53: float rounds
    body, _ = encode(registry, "")
    (line,) = [text for text in body.decode().splitlines() if text.startswith("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{")]
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(9_007_199_254_740_993, rel=1e-15)


def test_the_hostname_label_can_be_lower_case():
    ingest, registry, _ = make_stack(hostname_label="hostname")
    send_gpu(ingest, 1, [H100])
    ((labels, _),) = series(families(registry), "DCGM_FI_DEV_GPU_UTIL")
    assert labels["hostname"] == "node-a" and "Hostname" not in labels


def test_unsupported_fields_have_no_series_and_unknown_labels_are_empty():
    ingest, registry, _ = make_stack()
    minimal = {"index": 3, "uuid": "GPU-t4", "name": "Tesla T4", "gpu_util": 0}
    assert ingest.handle(GPU_PATTERN, "namespace.dynamo.component.backend.gpu_metrics",
                         json.dumps({"worker_id": 5, "gpus": [minimal]}).encode())
    fams = families(registry)
    ((labels, value),) = series(fams, "DCGM_FI_DEV_GPU_UTIL")
    assert value == 0 and labels["gpu"] == "3" and labels["device"] == "nvidia3"
    # Empty label values are what Prometheus treats as absent labels.
    assert labels["DCGM_FI_DRIVER_VERSION"] == "" and labels["Hostname"] == ""
    for name in DCGM_NAMES:
        if name != "DCGM_FI_DEV_GPU_UTIL":
            assert series(fams, name) == [], name


def test_a_gpu_message_keeps_the_worker_alive_and_expires_with_it():
    ingest, registry, clock = make_stack()
    send_load(ingest, 1)
    send_gpu(ingest, 1, [H100])
    assert len(ingest.fleet) == 1  # one worker, not two: same WorkerKey
    clock.now += 8
    send_gpu(ingest, 1, [H100])  # only GPU messages from now on
    clock.now += 8
    ingest.fleet.expire(clock.now)
    fams = families(registry)
    assert len(series(fams, "llm_kv_blocks_active")) == 1
    assert len(series(fams, "DCGM_FI_DEV_GPU_UTIL")) == 1
    clock.now += 11
    ingest.fleet.expire(clock.now)
    fams = families(registry)
    for name in [*DCGM_NAMES, "llm_gpu_process_memory_used_mib", "llm_gpu_sampler_up", "llm_gpus",
                 "llm_gpu_utilization_avg", "llm_kv_blocks_per_gib"]:
        assert series(fams, name) == [], name


def test_render_caches_hold_each_reading_once_and_let_go_of_expired_workers():
    ingest, registry, clock = make_stack()
    kv, gpus = (c for c in registry._collector_to_names if isinstance(c, (FleetCollector, GpuCollector)))
    for worker in (1, 2):
        send_load(ingest, worker)
        send_gpu(ingest, worker, [H100])
    assert len(gpus.readings) == 2 and len(kv.labels) == 0  # readings rendered on arrival, labels at a scrape
    first = families(registry)
    assert len(kv.labels) == 2
    send_gpu(ingest, 1, [{**H100, "gpu_util": 5}])  # a new reading replaces the worker's rendered one
    assert len(gpus.readings) == 2
    assert series(families(registry), "DCGM_FI_DEV_GPU_UTIL") != series(first, "DCGM_FI_DEV_GPU_UTIL")
    clock.now += 11
    assert len(ingest.fleet.expire(clock.now)) == 2
    assert len(gpus.readings) == 0 and len(kv.labels) == 0


def test_stale_gpu_readings_are_hidden_while_the_worker_lives_on_kv_stats():
    ingest, registry, clock = make_stack()
    send_gpu(ingest, 1, [H100])
    for _ in range(3):
        clock.now += 5
        send_load(ingest, 1)
    ingest.fleet.expire(clock.now)
    fams = families(registry)
    assert len(series(fams, "llm_kv_blocks_active")) == 1
    assert series(fams, "DCGM_FI_DEV_GPU_UTIL") == [] and series(fams, "llm_gpus") == []


def test_a_bad_gpu_message_is_counted_and_touches_nothing():
    ingest, registry, _ = make_stack()
    send_load(ingest, 1)
    send_gpu(ingest, 1, [H100])
    before = encode(registry, "")[0]
    assert not send_gpu(ingest, 1, [{**H100, "gpu_util": 101}])
    assert not send_gpu(ingest, 1, [H100, H100])
    assert not send_gpu(ingest, 2, [{**H100, "fb_used_mib": "lots"}])
    assert not ingest.handle(GPU_PATTERN, "namespace.dynamo.component.backend.gpu_metrics", b"\x00")
    fams = families(registry)
    rejected = {(s.labels["kind"], s.labels["reason"]): s.value
                for s in fams["llm_aggregator_messages_rejected"].samples if s.name.endswith("_total") and s.value}
    assert rejected == {("gpu_metrics", "out_of_range"): 1, ("gpu_metrics", "inconsistent"): 1,
                        ("gpu_metrics", "wrong_type"): 1, ("gpu_metrics", "not_json"): 1}
    assert len(ingest.fleet) == 1  # worker 2 was never created
    changed = [line for line in set(encode(registry, "")[0].decode().splitlines())
               - set(before.decode().splitlines()) if not line.startswith(("llm_aggregator", "#"))]
    assert changed == []


def test_a_worker_without_gpus_reports_its_sampler_failure():
    ingest, registry, _ = make_stack()
    send_gpu(ingest, 1, [], sampler_error="NVMLError_LibraryNotFound")
    fams = families(registry)
    assert series(fams, "llm_gpu_sampler_up") == [({"component": "backend", "endpoint": "generate",
                                                    "worker_id": "1", "dp_rank": "0",
                                                    "error": "NVMLError_LibraryNotFound"}, 0.0)]
    assert series(fams, "llm_gpus") == [({"component": "backend", "endpoint": "generate"}, 0.0)]
    assert series(fams, "llm_gpu_utilization_avg") == []


def test_fleet_views_per_component_endpoint():
    ingest, registry, _ = make_stack()
    send_load(ingest, 1, total_blocks=4000)
    send_gpu(ingest, 1, [{**H100, "fb_total_mib": 81920, "fb_used_mib": 40960, "gpu_util": 90},
                         {**H100, "index": 1, "uuid": "GPU-b", "fb_total_mib": 81920, "fb_used_mib": 20480,
                          "gpu_util": 50, "gpu_temp_c": 80, "power_usage_w": 300.0}])
    send_gpu(ingest, 2, [{**H100, "gpu_util": 10}])  # no load: not in blocks-per-GiB
    send_gpu(ingest, 3, [H100], component="prefill")
    fams = families(registry)
    backend = {"component": "backend", "endpoint": "generate"}
    prefill = {"component": "prefill", "endpoint": "generate"}

    def view(name):
        return {tuple(sorted(labels.items())): value for labels, value in series(fams, name)}

    key_b, key_p = tuple(sorted(backend.items())), tuple(sorted(prefill.items()))
    assert view("llm_gpus") == {key_b: 3, key_p: 1}
    assert view("llm_gpu_utilization_avg") == {key_b: pytest.approx(50.0), key_p: 80.0}
    assert view("llm_gpu_power_watts")[key_b] == pytest.approx(512.5 + 300.0 + 512.5)
    assert view("llm_gpu_temperature_max_celsius")[key_b] == 80
    assert view("llm_gpu_memory_used_ratio")[key_b] == pytest.approx((40960 + 20480 + 40000) / (81920 * 2 + 81559))
    # 4000 blocks over 2 x 80 GiB of framebuffer
    assert view("llm_kv_blocks_per_gib") == {key_b: pytest.approx(25.0)}


def test_group_views_on_plain_values():
    group = GroupKey("backend", "generate")
    load = ForwardPassMetrics(WorkerStats(1, 8), KvStats(10, 2048))
    known = GpuReading(0, "GPU-a", "A100", fb_used_mib=1024, fb_free_mib=1024, fb_reserved_mib=0)
    unknown = GpuReading(1, "GPU-b", "A100", gpu_util=30)
    views = combine_views([
        (group, summarize(GpuMetricsEvent(1, gpus=[known])), load),  # 2 GiB from used + free
        (group, summarize(GpuMetricsEvent(2, gpus=[known, unknown])), load),  # framebuffer not fully known: skipped
    ])
    view = views[group]
    assert view.gpus == 3
    assert view.utilization_avg == 30.0
    assert view.kv_blocks_per_gib == 1024.0
    assert view.memory_used_ratio == 0.5
    assert view.power_watts is None and view.temperature_max_c is None
    assert framebuffer_mib(known) == 2048 and framebuffer_mib(unknown) is None


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is installed by .ci/run (Debian prometheus)")
def test_promtool_accepts_the_gpu_series():
    ingest, registry, _ = make_stack()
    send_load(ingest, 1)
    send_gpu(ingest, 1, [H100])
    body, _ = encode(registry, "")
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    problems = [line for line in result.stderr.decode().splitlines() if line.strip()]
    gpu_problems = [p for p in problems if p.startswith(("DCGM_", "llm_gpu", "llm_kv_blocks_per_gib"))]
    # dcgm-exporter's own label names (modelName, UUID, Hostname) are camelCase; kept for its dashboards.
    camel = "label names should be written in 'snake_case' not 'camelCase'"
    assert gpu_problems and all(p.endswith(camel) for p in gpu_problems), problems
