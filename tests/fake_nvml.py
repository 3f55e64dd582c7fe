"""A stand-in for the `pynvml` module (nvidia-ml-py) for machines without a GPU.

Same function names and signatures as the binding, and the binding's own NVMLError
classes (importing `pynvml` needs no driver; only `nvmlInit` does), so the sampler
meets exactly the exceptions it would meet on a real host. Values are given in NVML's
units (bytes, mW) so the tests see the sampler's conversions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml

MIB = 2**20


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    bus_id: str = "00000000:18:00.0"
    util: tuple[int, int] = (87, 41)  # gpu %, memory %
    memory: tuple[int, int, int, int] = (40_000 * MIB, 40_959 * MIB, 600 * MIB, 81_559 * MIB)  # used free reserved total
    temperature: int = 61
    memory_temperature: int = 70
    power_mw: int = 512_345
    energy_mj: int = 123_456_789_012
    clocks: tuple[int, int] = (1980, 2619)  # SM, memory
    processes: list[tuple[int, int | None]] = field(default_factory=lambda: [(4242, 39_000 * MIB)])
    # function name -> NVML error code that function raises for this GPU
    errors: dict[str, int] = field(default_factory=dict)


class FakeNvml:
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
    NVML_CLOCK_MEM = pynvml.NVML_CLOCK_MEM
    NVML_FI_DEV_MEMORY_TEMP = pynvml.NVML_FI_DEV_MEMORY_TEMP
    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(self, gpus: list[FakeGpu], *, init_error: int | None = None, driver: str = "570.133.20",
                 no_temperature_v: bool = False, no_memory_v2: bool = False) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.driver = driver
        self.no_temperature_v = no_temperature_v
        self.no_memory_v2 = no_memory_v2
        self.initialised = False
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        if name.startswith("NVMLError") or name == "NVMLLibraryMismatchError":
            return getattr(pynvml, name)  # the binding's own exception classes
        raise AttributeError(name)

    # -- helpers ---------------------------------------------------------------------

    def _gpu(self, handle: int, function: str) -> FakeGpu:
        self.calls.append(function)
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        gpu = self.gpus[handle]
        if function in gpu.errors:
            raise pynvml.NVMLError(gpu.errors[function])
        return gpu

    # -- the binding's functions ---------------------------------------------------------

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._gpu(index, "nvmlDeviceGetHandleByIndex")
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self._gpu(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetPciInfo(self, handle: int):
        return SimpleNamespace(busId=self._gpu(handle, "nvmlDeviceGetPciInfo").bus_id)

    def nvmlDeviceGetUtilizationRates(self, handle: int):
        gpu, memory = self._gpu(handle, "nvmlDeviceGetUtilizationRates").util
        return SimpleNamespace(gpu=gpu, memory=memory)

    def nvmlDeviceGetMemoryInfo(self, handle: int, version=None):
        used, free, reserved, total = self._gpu(handle, "nvmlDeviceGetMemoryInfo").memory
        if version is None:
            # The v1 struct counts reserved memory as used.
            return SimpleNamespace(total=total, free=free, used=used + reserved)
        if self.no_memory_v2:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return SimpleNamespace(version=version, total=total, reserved=reserved, free=free, used=used)

    def nvmlDeviceGetTemperatureV(self, handle: int, sensor: int) -> int:
        if self.no_temperature_v:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._gpu(handle, "nvmlDeviceGetTemperatureV").temperature

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._gpu(handle, "nvmlDeviceGetTemperature").temperature

    def nvmlDeviceGetFieldValues(self, handle: int, field_ids: list[int]):
        gpu = self._gpu(handle, "nvmlDeviceGetFieldValues")
        assert field_ids == [pynvml.NVML_FI_DEV_MEMORY_TEMP]
        code = gpu.errors.get("NVML_FI_DEV_MEMORY_TEMP", pynvml.NVML_SUCCESS)
        # Per-field status, as NVML reports it: the call succeeds, the field says why it has no value.
        value = SimpleNamespace(uiVal=gpu.memory_temperature if code == pynvml.NVML_SUCCESS else 0)
        return [SimpleNamespace(fieldId=field_ids[0], nvmlReturn=code, valueType=1, value=value)]

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetTotalEnergyConsumption").energy_mj

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int) -> int:
        sm, memory = self._gpu(handle, "nvmlDeviceGetClockInfo").clocks
        return {pynvml.NVML_CLOCK_SM: sm, pynvml.NVML_CLOCK_MEM: memory}[clock]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int):
        gpu = self._gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.processes]


class RecordingLog:
    """A structlog-like logger that keeps what was said."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def _add(self, level: str, message: str, **fields) -> None:
        self.lines.append((level, message, fields))

    def info(self, message: str, **fields) -> None:
        self._add("info", message, **fields)

    def warning(self, message: str, **fields) -> None:
        self._add("warning", message, **fields)

    def messages(self, level: str | None = None) -> list[str]:
        return [m for lvl, m, _ in self.lines if level is None or lvl == level]
