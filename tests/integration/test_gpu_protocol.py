"""GpuMetricsEvent on the wire: what decodes, and the reason for everything that does not."""

from __future__ import annotations

import json

import pytest

import fleet_protocol as protocol
from fleet_protocol import GpuMetricsEvent, GpuProcess, GpuReading, MessageRejected

LIMIT = 256 * 1024

GPU = {"index": 0, "uuid": "GPU-11111111-2222-3333-4444-555555555555", "name": "NVIDIA H100 80GB HBM3",
       "pci_bus_id": "00000000:18:00.0", "gpu_util": 87, "mem_copy_util": 41, "fb_used_mib": 40000,
       "fb_free_mib": 40959, "fb_reserved_mib": 600, "fb_total_mib": 81559, "gpu_temp_c": 61,
       "memory_temp_c": 70, "power_usage_w": 512.345, "total_energy_mj": 123456789012, "sm_clock_mhz": 1980,
       "mem_clock_mhz": 2619, "processes": [{"pid": 4242, "used_memory_mib": 39000}]}


def event(**fields) -> bytes:
    return json.dumps({"worker_id": 7587888657184927289, "hostname": "node-1", "driver_version": "570.133.20",
                       "gpus": [GPU], **fields}).encode()


def with_gpu(**changes) -> bytes:
    return event(gpus=[{**GPU, **changes}])


def test_a_full_message_decodes_and_round_trips():
    decoded = protocol.decode_gpu_metrics(event(), LIMIT)
    assert decoded.worker_id == 7587888657184927289
    assert decoded.endpoint == "generate" and decoded.dp_rank is None and decoded.sampler_error is None
    (gpu,) = decoded.gpus
    assert gpu.power_usage_w == 512.345 and gpu.processes == [GpuProcess(4242, 39000)]
    assert protocol.decode_gpu_metrics(protocol.encode(decoded), LIMIT) == decoded


def test_only_identity_is_required_and_absent_fields_stay_absent():
    minimal = {"index": 3, "uuid": "GPU-x", "name": "Tesla T4"}
    decoded = protocol.decode_gpu_metrics(json.dumps({"worker_id": 1, "gpus": [minimal]}).encode(), LIMIT)
    assert decoded.gpus == [GpuReading(3, "GPU-x", "Tesla T4")]
    assert json.loads(protocol.encode(decoded)) == {"worker_id": 1, "gpus": [minimal]}


def test_a_worker_without_gpus_says_why():
    decoded = protocol.decode_gpu_metrics(event(gpus=[], sampler_error="NVMLError_LibraryNotFound"), LIMIT)
    assert decoded.gpus == [] and decoded.sampler_error == "NVMLError_LibraryNotFound"


def test_unknown_fields_are_ignored():
    decoded = protocol.decode_gpu_metrics(with_gpu(enc_util=3, future={"x": 1}), LIMIT)
    assert decoded.gpus[0].gpu_util == 87


@pytest.mark.parametrize("payload,reason", [
    (b"{nope", "not_json"),
    (b"[]", "wrong_type"),
    (json.dumps({"gpus": []}).encode(), "missing_field"),
    (event(gpus=[{"index": 0, "uuid": "GPU-x"}]), "missing_field"),
    (with_gpu(gpu_util="87"), "wrong_type"),
    (with_gpu(gpu_util=87.5), "wrong_type"),
    (with_gpu(gpu_util=101), "out_of_range"),
    (with_gpu(mem_copy_util=-1), "out_of_range"),
    (with_gpu(gpu_temp_c=4294967295), "out_of_range"),  # an NVML sentinel
    (with_gpu(power_usage_w=-0.5), "out_of_range"),
    (with_gpu(fb_used_mib=-1), "out_of_range"),
    (with_gpu(index=4096), "out_of_range"),
    (with_gpu(name="x" * (protocol.MAX_GPU_TEXT_LENGTH + 1)), "out_of_range"),
    (with_gpu(processes=[{"pid": -1}]), "out_of_range"),
    (with_gpu(processes=[{"pid": 1}] * (protocol.MAX_PROCESSES_PER_GPU + 1)), "out_of_range"),
    (event(gpus=[GPU] * 65), "out_of_range"),
    (event(worker_id=2**64), "out_of_range"),
    (event(worker_id=-1), "out_of_range"),
    (event(endpoint=""), "out_of_range"),
    (event(hostname="h" * 300), "out_of_range"),
    (event(gpus=[GPU, GPU]), "inconsistent"),  # the same GPU twice
    (event(gpus=[GPU, {**GPU, "index": 1}]), "inconsistent"),  # two indexes, one UUID
    (with_gpu(fb_used_mib=90000), "inconsistent"),  # used > total
    (with_gpu(fb_free_mib=90000), "inconsistent"),
    (b" " * (LIMIT + 1), "oversized"),
])
def test_every_bad_message_has_its_reason(payload, reason):
    with pytest.raises(MessageRejected) as caught:
        protocol.decode_gpu_metrics(payload, LIMIT)
    assert caught.value.reason == reason


def test_the_largest_legal_message_fits_the_default_size_limit():
    text = protocol.MAX_GPU_TEXT_LENGTH
    gpu = {**GPU, "name": "N" * text, "pci_bus_id": "P" * text, "total_energy_mj": 2**63 - 1,
           "processes": [{"pid": 4294967295, "used_memory_mib": 2**30}] * protocol.MAX_PROCESSES_PER_GPU}
    gpus = [{**gpu, "index": i, "uuid": f"{i:03d}" + "U" * (text - 3)} for i in range(protocol.MAX_GPUS_PER_MESSAGE)]
    payload = event(gpus=gpus, hostname="h" * protocol.MAX_HOSTNAME_LENGTH, sampler_error="E" * text)
    default_max_message_bytes = 256 * 1024  # aggregator --max-message-bytes
    assert 64 * 1024 < len(payload) <= default_max_message_bytes
    assert protocol.decode_gpu_metrics(payload, default_max_message_bytes).gpus[63].index == 63


def test_encoded_events_omit_unknown_optionals():
    payload = protocol.encode(GpuMetricsEvent(worker_id=5, gpus=[GpuReading(0, "GPU-a", "A100", gpu_util=0)]))
    assert json.loads(payload) == {"worker_id": 5, "gpus": [{"index": 0, "uuid": "GPU-a", "name": "A100",
                                                            "gpu_util": 0}]}
