"""GPU telemetry through the real pipeline: mock workers → nats-server → aggregator → /metrics."""

from __future__ import annotations

import json
import time

import pytest

from ..support import mock_worker, publish, samples, scrape, wait_until

DCGM_LABELS = {"gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION",
               "component", "endpoint", "worker_id", "dp_rank"}
DCGM_NAMES = ["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE",
              "DCGM_FI_DEV_FB_RESERVED", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_POWER_USAGE",
              "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK"]


def gpu_series(url: str, openmetrics: bool = False) -> dict:
    return samples(scrape(url, openmetrics=openmetrics), "DCGM_FI_DEV_GPU_UTIL")


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_simulated_gpus_of_three_workers_appear_with_dcgm_labels_then_expire(nats_server, processes, openmetrics):
    aggregator = processes.aggregator(nats_server.url, "--stale-after", "1.5")
    # Legacy: the capacity (llm_kv_blocks_per_gib) in every message, with no discovery store.
    workers = processes.add(mock_worker(nats_server.url, "--protocol", "legacy", "--workers", "3", "--interval",
                                        "0.2", "--seed", "11", "--gpu", "simulated", "--gpus-per-worker", "2",
                                        "--gpu-interval", "0.2"))
    wait_until(lambda: len(gpu_series(aggregator.url)) == 6, 20, what=f"6 GPUs\n{workers.output()}")
    # Energy integrates power, so it must have grown between two reports of the same GPU.
    first_energy = samples(scrape(aggregator.url), "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")
    time.sleep(0.6)

    families = scrape(aggregator.url, openmetrics=openmetrics)
    worker_ids = {dict(k)["worker_id"] for k in samples(families, "llm_kv_blocks_active")}
    assert len(worker_ids) == 3
    for name in DCGM_NAMES:
        found = samples(families, name)
        assert len(found) == 6, name
        assert families[name].type == "gauge"
        for key, value in found.items():
            labels = dict(key)
            assert set(labels) == DCGM_LABELS, name
            assert labels["worker_id"] in worker_ids  # tied to a worker that reports KV stats
            assert labels["device"] == f"nvidia{labels['gpu']}" and labels["gpu"] in {"0", "1"}
            assert labels["modelName"] == "NVIDIA H100 80GB HBM3"
            assert labels["UUID"].startswith("GPU-") and labels["pci_bus_id"].startswith("00000000:")
            assert labels["Hostname"].startswith("mock-node-") and labels["DCGM_FI_DRIVER_VERSION"]
            assert (labels["component"], labels["endpoint"], labels["dp_rank"]) == ("backend", "generate", "0")
            assert value >= 0
    utils = samples(families, "DCGM_FI_DEV_GPU_UTIL")
    assert len({dict(k)["UUID"] for k in utils}) == 6
    assert {dict(k)["Hostname"] for k in utils} == {"mock-node-0", "mock-node-1", "mock-node-2"}
    assert all(0 <= v <= 100 for v in utils.values())
    energy = samples(families, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")
    assert all(energy[key] > first_energy[key] for key in first_energy)
    for key, used in samples(families, "DCGM_FI_DEV_FB_USED").items():
        free = samples(families, "DCGM_FI_DEV_FB_FREE")[key]
        reserved = samples(families, "DCGM_FI_DEV_FB_RESERVED")[key]
        assert used + free + reserved == samples(families, "DCGM_FI_DEV_FB_TOTAL")[key]

    group = (("component", "backend"), ("endpoint", "generate"))
    assert samples(families, "llm_gpus") == {group: 6}
    assert 0 <= samples(families, "llm_gpu_utilization_avg")[group] <= 100
    assert samples(families, "llm_kv_blocks_per_gib")[group] > 0
    assert set(samples(families, "llm_gpu_sampler_up").values()) == {1.0}

    workers.stop()
    wait_until(lambda: not gpu_series(aggregator.url), 10, what="GPU series to expire with their workers")
    families = scrape(aggregator.url, openmetrics=openmetrics)
    for name in [*DCGM_NAMES, "llm_gpus", "llm_gpu_utilization_avg", "llm_kv_blocks_per_gib",
                 "llm_gpu_sampler_up", "llm_gpu_process_memory_used_mib"]:
        assert samples(families, name) == {}, name
    assert sum(samples(families, "llm_workers").values()) == 0


def test_without_a_driver_the_worker_says_so_once_and_keeps_publishing(nats_server, processes):
    from fleet_worker.nvml_sampler import NvmlGpuSource

    if NvmlGpuSource(visible_devices=None).sample().error is None:
        pytest.skip("this machine has an NVIDIA driver; the no-driver path cannot be shown here")
    aggregator = processes.aggregator(nats_server.url)
    worker = processes.add(mock_worker(nats_server.url, "--workers", "2", "--interval", "0.2",
                                       "--gpu", "nvml", "--gpu-interval", "0.2"))
    up = wait_until(lambda: samples(scrape(aggregator.url), "llm_gpu_sampler_up") or None, 20,
                    what=f"GPU reports\n{worker.output()}")
    assert len(up) == 2 and set(up.values()) == {0.0}
    assert {dict(k)["error"] for k in up} == {"NVMLError_LibraryNotFound"}
    families = scrape(aggregator.url)
    assert samples(families, "DCGM_FI_DEV_GPU_UTIL") == {}
    assert samples(families, "llm_gpus") == {(("component", "backend"), ("endpoint", "generate")): 0}
    assert len(samples(families, "llm_kv_blocks_active")) == 2  # KV stats unaffected
    time.sleep(1.0)  # several more GPU intervals
    assert worker.output().count("NVML unavailable") == 1
    assert "Traceback" not in worker.output()


def test_bad_gpu_messages_are_counted_and_harm_no_one(nats_server, processes):
    aggregator = processes.aggregator(nats_server.url, env={"DYN_LOGGING_JSONL": "true"})
    subject = "namespace.dynamo.component.backend.gpu_metrics"
    good = {"worker_id": 1, "hostname": "n", "gpus": [{"index": 0, "uuid": "GPU-a", "name": "A100", "gpu_util": 50}]}
    bad = [
        b"{broken",
        json.dumps({**good, "gpus": [{**good["gpus"][0], "gpu_util": 4294967295}]}).encode(),
        json.dumps({**good, "gpus": [{"index": 0, "uuid": "GPU-a"}]}).encode(),
        json.dumps({**good, "gpus": good["gpus"] * 2}).encode(),
        json.dumps({**good, "worker_id": "one"}).encode(),
    ]
    publish(nats_server.url, [(subject, json.dumps(good).encode())] + [(subject, payload) for payload in bad * 2])

    def rejected():
        family = scrape(aggregator.url)["llm_aggregator_messages_rejected"]
        counts = {s.labels["reason"]: s.value for s in family.samples
                  if s.name.endswith("_total") and s.labels["kind"] == "gpu_metrics" and s.value}
        return counts if sum(counts.values()) == len(bad) * 2 else None

    counts = wait_until(rejected, 10, what="GPU rejections counted")
    assert counts == {"not_json": 2, "out_of_range": 2, "missing_field": 2, "inconsistent": 2, "wrong_type": 2}
    families = scrape(aggregator.url)
    assert list(samples(families, "DCGM_FI_DEV_GPU_UTIL").values()) == [50.0]
    accepted = samples(families, "llm_aggregator_messages_accepted", "llm_aggregator_messages_accepted_total")
    assert accepted[(("kind", "gpu_metrics"),)] == 1
    assert aggregator.health() == 200
    logged = [json.loads(line) for line in aggregator.output().splitlines() if line.startswith("{")]
    reasons = {line["reason"] for line in logged if line.get("message") == "message rejected"}
    assert reasons == set(counts)
    assert all(line["subject"] == subject for line in logged if line.get("message") == "message rejected")
