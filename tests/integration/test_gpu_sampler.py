"""The NVML sampler: unit conversions, CUDA_VISIBLE_DEVICES, and every partial-support path.

NVML itself cannot run here (no GPU), so a fake module with the binding's function names
and its own NVMLError classes stands in; the one real-binding test checks the no-driver path.
"""

from __future__ import annotations

import asyncio
import threading

import pynvml
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fleet_protocol as protocol
from fleet_worker.nvml_sampler import (
    NvmlGpuSource,
    choose_devices,
    mib,
    parse_visible_devices,
    plausible,
    read_gpus,
    watts,
)

from ..fake_nvml import MIB, FakeGpu, FakeNvml, RecordingLog

UUID0 = "GPU-11111111-2222-3333-4444-555555555555"
UUID1 = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
UUID2 = "GPU-abcdef00-0000-0000-0000-000000000000"


def source(gpus, visible=None, **fake) -> tuple[NvmlGpuSource, FakeNvml, RecordingLog]:
    nvml = FakeNvml(gpus, **fake)
    log = RecordingLog()
    return NvmlGpuSource(nvml, visible_devices=visible, logger=log), nvml, log


# Pure conversions ----------------------------------------------------------------------


def test_units_are_dcgm_exporters():
    assert mib(81_559 * MIB) == 81_559
    assert mib(MIB - 1) == 0  # whole MiB, rounded down as DCGM does
    assert mib(None) is None
    assert watts(512_345) == pytest.approx(512.345)
    assert watts(0) == 0.0
    assert watts(None) is None


@pytest.mark.parametrize("name,value,kept", [
    ("gpu_util", 100, 100), ("gpu_util", 0, 0), ("gpu_util", 4294967295, None), ("gpu_util", -1, None),
    ("gpu_temp_c", 9223372036854775794, None), ("gpu_temp_c", 61, 61),
    ("power_usage_w", 4294967.295, None), ("power_usage_w", 700.5, 700.5),
    ("total_energy_mj", 2**63 - 1, 2**63 - 1), ("total_energy_mj", 2**64 - 1, None),
    ("fb_used_mib", 0, 0), ("mem_clock_mhz", None, None),
])
def test_nvml_sentinels_are_dropped_not_exported(name, value, kept):
    assert plausible(name, value) == kept


@given(st.integers(min_value=0, max_value=2**50))
def test_mib_conversion_never_exceeds_the_bytes(num_bytes):
    assert mib(num_bytes) * MIB <= num_bytes < (mib(num_bytes) + 1) * MIB


# CUDA_VISIBLE_DEVICES ------------------------------------------------------------------

DEVICES = [(0, UUID0), (1, UUID1), (2, UUID2)]


@pytest.mark.parametrize("value,expected", [
    (None, None), ("", []), ("  ", []), ("0", ["0"]), ("1, 0", ["1", "0"]), ("GPU-a,2", ["GPU-a", "2"]),
])
def test_visible_devices_are_parsed(value, expected):
    assert parse_visible_devices(value) == expected


@pytest.mark.parametrize("value,chosen,problem", [
    (None, [0, 1, 2], False),  # unset: every GPU
    ("", [], False),  # set but empty: none, as CUDA
    ("2,0", [2, 0], False),  # CUDA's order is kept
    ("1,1", [1], False),
    (UUID1, [1], False),
    ("GPU-aaaaaaaa", [1], False),  # a unique prefix
    ("aaaaaaaa-bbbb", [1], False),  # without the GPU- prefix
    ("gpu-AAAAAAAA", [1], False),  # case-insensitive
    ("GPU-a", [], True),  # ambiguous prefix (two UUIDs start with "a")
    ("0,7,1", [0], True),  # CUDA stops at the first invalid entry
    ("-1", [], True),  # the usual "hide every GPU"
    ("MIG-12345678-aaaa", [], True),  # MIG instances are not supported
    ("1,GPU-ffff", [1], True),
])
def test_visible_devices_follow_cuda_rules(value, chosen, problem):
    got, message = choose_devices(parse_visible_devices(value), DEVICES)
    assert got == chosen
    assert (message is not None) == problem


# Full support ----------------------------------------------------------------------------


def test_a_fully_supported_gpu_reads_every_field_in_dcgm_units():
    sampler, nvml, log = source([FakeGpu(UUID0)])
    snapshot = sampler.sample()
    assert snapshot.error is None
    assert snapshot.driver_version == "570.133.20"
    (gpu,) = snapshot.gpus
    assert gpu == protocol.GpuReading(
        index=0, uuid=UUID0, name="NVIDIA H100 80GB HBM3", pci_bus_id="00000000:18:00.0",
        gpu_util=87, mem_copy_util=41, fb_used_mib=40_000, fb_free_mib=40_959, fb_reserved_mib=600,
        fb_total_mib=81_559, gpu_temp_c=61, memory_temp_c=70, power_usage_w=512.345,
        total_energy_mj=123_456_789_012, sm_clock_mhz=1980, mem_clock_mhz=2619,
        processes=[protocol.GpuProcess(4242, 39_000)],
    )
    # The reading is what the aggregator accepts.
    payload = protocol.encode(protocol.GpuMetricsEvent(worker_id=1, gpus=snapshot.gpus))
    assert protocol.decode_gpu_metrics(payload, 1 << 20).gpus == snapshot.gpus
    assert log.messages("warning") == []


def test_cuda_visible_devices_choose_the_reported_gpus():
    sampler, _, log = source([FakeGpu(UUID0), FakeGpu(UUID1), FakeGpu(UUID2)], visible="GPU-abcdef,0")
    assert [g.index for g in sampler.sample().gpus] == [2, 0]
    sampler, _, log = source([FakeGpu(UUID0), FakeGpu(UUID1)], visible="1,5")
    assert [g.index for g in sampler.sample().gpus] == [1]
    sampler.sample()
    assert [m for m in log.messages("warning") if "CUDA_VISIBLE_DEVICES" in m] and len(log.messages("warning")) == 1


def test_the_environment_variable_is_read_when_not_given(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", UUID1)
    sampler = NvmlGpuSource(FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1)]), logger=RecordingLog())
    assert [g.uuid for g in sampler.sample().gpus] == [UUID1]


# Partial support -------------------------------------------------------------------------


def test_unsupported_fields_are_omitted_not_zero_and_said_once():
    gpu = FakeGpu(UUID0, errors={
        "nvmlDeviceGetTotalEnergyConsumption": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "nvmlDeviceGetComputeRunningProcesses": pynvml.NVML_ERROR_NOT_SUPPORTED,
        "NVML_FI_DEV_MEMORY_TEMP": pynvml.NVML_ERROR_NOT_SUPPORTED,  # per-field status inside FieldValues
    })
    sampler, _, log = source([gpu, FakeGpu(UUID1)])
    for _ in range(3):
        first, second = sampler.sample().gpus
    assert first.total_energy_mj is None and first.memory_temp_c is None and first.processes == []
    assert first.gpu_util == 87 and first.power_usage_w == pytest.approx(512.345)
    assert second.total_energy_mj == 123_456_789_012 and second.memory_temp_c == 70
    encoded = protocol.encode(first)
    assert b"total_energy_mj" not in encoded and b"memory_temp_c" not in encoded  # absent, not null, not 0
    unsupported = [f["field"] for lvl, m, f in log.lines if m == "GPU field not supported; omitted"]
    assert sorted(unsupported) == ["memory_temp", "processes", "total_energy"]  # once each over three samples
    assert log.messages("warning") == []


def test_a_field_that_errors_is_omitted_and_warned_once_per_error():
    gpu = FakeGpu(UUID0, errors={"nvmlDeviceGetPowerUsage": pynvml.NVML_ERROR_GPU_IS_LOST,
                                 "nvmlDeviceGetUtilizationRates": pynvml.NVML_ERROR_UNKNOWN})
    sampler, _, log = source([gpu])
    for _ in range(3):
        (reading,) = sampler.sample().gpus
    assert reading.power_usage_w is None and reading.gpu_util is None and reading.mem_copy_util is None
    assert reading.fb_used_mib == 40_000
    warnings = [(f["field"], f["error"]) for lvl, m, f in log.lines if lvl == "warning"]
    assert sorted(warnings) == [("power_usage", "NVMLError_GpuIsLost"), ("utilization", "NVMLError_Unknown")]


def test_sentinel_readings_are_omitted_and_warned_once():
    gpu = FakeGpu(UUID0, util=(4294967295, 12), temperature=2**31)
    sampler, _, log = source([gpu])
    sampler.sample()
    (reading,) = sampler.sample().gpus
    assert reading.gpu_util is None and reading.mem_copy_util == 12 and reading.gpu_temp_c is None
    assert sorted(f["field"] for _, m, f in log.lines if m == "GPU field out of range; omitted") == [
        "gpu_temp_c", "gpu_util"]


def test_older_drivers_fall_back_to_the_older_calls_once():
    sampler, nvml, log = source([FakeGpu(UUID0)], no_temperature_v=True, no_memory_v2=True)
    for _ in range(2):
        (reading,) = sampler.sample().gpus
    assert reading.gpu_temp_c == 61
    # v1 memory info: used includes reserved, and there is no reserved figure
    assert (reading.fb_used_mib, reading.fb_reserved_mib, reading.fb_total_mib) == (40_600, None, 81_559)
    assert log.messages("warning") == []
    assert nvml.calls.count("nvmlDeviceGetTemperature") == 2


def test_a_gpu_that_cannot_be_identified_is_skipped():
    broken = FakeGpu(UUID1, errors={"nvmlDeviceGetUUID": pynvml.NVML_ERROR_GPU_IS_LOST})
    sampler, _, log = source([FakeGpu(UUID0), broken])
    assert [g.index for g in sampler.sample().gpus] == [0]
    assert log.messages("warning") == ["GPU not readable; skipped"]


def test_a_binding_newer_than_the_driver_omits_the_field():
    class OldDriver(FakeNvml):
        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            # what nvidia-ml-py's @throwOnVersionMismatch raises: not an NVMLError
            raise pynvml.NVMLLibraryMismatchError("Unversioned function called ...")

    log = RecordingLog()
    sampler = NvmlGpuSource(OldDriver([FakeGpu(UUID0)]), visible_devices=None, logger=log)
    (reading,) = sampler.sample().gpus
    assert reading.processes == [] and reading.gpu_util == 87
    assert log.messages("warning") == []


def test_an_unexpected_exception_leaves_one_gpu_out_and_never_escapes():
    class Buggy(FakeNvml):
        def nvmlDeviceGetPowerUsage(self, handle):
            if handle == 1:
                raise ValueError("ctypes said no")
            return super().nvmlDeviceGetPowerUsage(handle)

    log = RecordingLog()
    sampler = NvmlGpuSource(Buggy([FakeGpu(UUID0), FakeGpu(UUID1)]), visible_devices=None, logger=log)
    for _ in range(2):
        assert [g.index for g in sampler.sample().gpus] == [0]
    assert log.messages("warning") == ["GPU read failed unexpectedly; GPU left out of this report"]


def test_processes_are_bounded_biggest_first_with_unknown_memory_kept():
    many = [(1000 + i, i * MIB) for i in range(100)] + [(7, None)]
    sampler, _, _ = source([FakeGpu(UUID0, processes=many)])
    (reading,) = sampler.sample().gpus
    assert len(reading.processes) == protocol.MAX_PROCESSES_PER_GPU
    assert reading.processes[0] == protocol.GpuProcess(1099, 99)
    no_memory = source([FakeGpu(UUID0, processes=[(7, None)])])[0].sample().gpus[0]
    assert no_memory.processes == [protocol.GpuProcess(7, None)]


# No GPU, no driver -------------------------------------------------------------------------


@pytest.mark.parametrize("code,name", [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVMLError_LibraryNotFound"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "NVMLError_DriverNotLoaded"),
    (pynvml.NVML_ERROR_NO_PERMISSION, "NVMLError_NoPermission"),
    (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "NVMLError_LibRmVersionMismatch"),
])
def test_init_failure_is_said_once_and_reports_no_gpus_with_the_reason(code, name):
    sampler, nvml, log = source([FakeGpu(UUID0)], init_error=code)
    for _ in range(5):
        snapshot = sampler.sample()
        assert snapshot.gpus == [] and snapshot.error == name
    assert log.messages() == ["NVML unavailable; reporting no GPUs, KV stats continue"]
    assert nvml.calls == []  # no device call after a failed init
    sampler.close()  # nothing to shut down; must not raise


def test_the_real_binding_without_a_driver_reports_library_not_found():
    # This machine has no NVIDIA driver: the real nvidia-ml-py binding must fail at init only.
    log = RecordingLog()
    sampler = NvmlGpuSource(logger=log, visible_devices=None)
    snapshot = sampler.sample()
    if snapshot.error is None:
        pytest.skip("an NVIDIA driver is present on this machine")
    assert snapshot.gpus == [] and snapshot.error == "NVMLError_LibraryNotFound"
    assert log.messages("warning") == ["NVML unavailable; reporting no GPUs, KV stats continue"]


def test_zero_gpus_after_init_is_an_empty_report_not_an_error():
    sampler, _, _ = source([])
    assert sampler.sample() == type(sampler.sample())([], "570.133.20", None)


async def test_reads_run_off_the_event_loop():
    loop_thread = threading.get_ident()
    seen: list[int] = []

    class Probe(FakeNvml):
        def nvmlDeviceGetPowerUsage(self, handle):
            seen.append(threading.get_ident())
            return super().nvmlDeviceGetPowerUsage(handle)

    sampler = NvmlGpuSource(Probe([FakeGpu(UUID0)]), visible_devices=None, logger=RecordingLog())
    snapshot = await read_gpus(sampler)
    assert snapshot.gpus[0].power_usage_w == pytest.approx(512.345)
    assert seen and all(ident != loop_thread for ident in seen)
    await asyncio.sleep(0)
