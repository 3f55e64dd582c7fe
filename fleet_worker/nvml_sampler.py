"""Worker-side GPU sampling through NVML, in dcgm-exporter's units.

`NvmlGpuSource` reads the GPUs a worker may use (honouring CUDA_VISIBLE_DEVICES) through
an NVML binding module: `pynvml` from the `nvidia-ml-py` distribution by default, any
object with the same functions and `NVMLError*` classes in tests. Its calls block (NVML
talks to the driver), so `read_gpus` runs them in a worker thread.

Failure is expected and quiet: on a host without a driver, library or permission, NVML
fails once at init; the source says so once in the log and from then on reports no GPUs
with the reason, and the worker goes on publishing its KV stats. A field one GPU does
not support is omitted (never reported as 0) and mentioned once.

The pure parts (unit conversions, range checks, CUDA_VISIBLE_DEVICES parsing and
matching) are plain functions, tested with plain values.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
from dataclasses import dataclass, field
from types import EllipsisType
from typing import Any, get_args

import structlog

import fleet_protocol as protocol
from fleet_protocol import GpuProcess, GpuReading

log = structlog.get_logger("aggregator.gpu")

BYTES_PER_MIB = 2**20


# Pure helpers -------------------------------------------------------------------------


def mib(num_bytes: int | None) -> int | None:
    """NVML's bytes as dcgm-exporter's MiB (whole MiB, rounded down as DCGM does)."""
    return None if num_bytes is None else int(num_bytes) // BYTES_PER_MIB


def watts(milliwatts: int | None) -> float | None:
    """NVML's mW as dcgm-exporter's W."""
    return None if milliwatts is None else milliwatts / 1000.0


def _bounds(annotated) -> tuple[float, float]:
    meta = get_args(annotated)[1]
    return meta.ge, (meta.le if meta.le is not None else 2**63 - 1)


# The protocol's own bounds, so the sampler never sends what the aggregator would reject.
FIELD_BOUNDS: dict[str, tuple[float, float]] = {
    "gpu_util": _bounds(protocol.Percent),
    "mem_copy_util": _bounds(protocol.Percent),
    "fb_used_mib": _bounds(protocol.MiB),
    "fb_free_mib": _bounds(protocol.MiB),
    "fb_reserved_mib": _bounds(protocol.MiB),
    "fb_total_mib": _bounds(protocol.MiB),
    "gpu_temp_c": _bounds(protocol.Celsius),
    "memory_temp_c": _bounds(protocol.Celsius),
    "power_usage_w": _bounds(protocol.Watts),
    "total_energy_mj": _bounds(protocol.MilliJoules),
    "sm_clock_mhz": _bounds(protocol.MHz),
    "mem_clock_mhz": _bounds(protocol.MHz),
}


def plausible(name: str, value):
    """`value` if it lies within the field's bounds, else None.

    NVML and DCGM leak "not available" sentinels as readings (4294967295 % utilisation,
    9223372036854775794 °C); those are dropped here rather than exported.
    """
    if value is None:
        return None
    low, high = FIELD_BOUNDS[name]
    return value if low <= value <= high else None


def parse_visible_devices(value: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list of entries; None when unset (every GPU is visible)."""
    if value is None:
        return None
    return [entry.strip() for entry in value.split(",")] if value.strip() else []


def _uuid_key(value: str) -> str:
    value = value.strip().lower()
    return value[4:] if value.startswith("gpu-") else value


def choose_devices(entries: list[str] | None, devices: list[tuple[int, str]]) -> tuple[list[int], str | None]:
    """The NVML indexes CUDA_VISIBLE_DEVICES selects from `devices` [(index, uuid)], and a problem if any.

    CUDA's rules: entries are indexes or (unique prefixes of) UUIDs, with or without the
    "GPU-" prefix; the first entry that matches nothing ends the list, later entries are
    ignored. An index entry is taken as the NVML index, which is CUDA's ordinal when
    CUDA_DEVICE_ORDER=PCI_BUS_ID or all GPUs are the same model; UUIDs are exact. MIG
    device entries ("MIG-...") are not supported and end the list too.
    """
    if entries is None:
        return [index for index, _ in devices], None
    by_index = {index: index for index, _ in devices}
    chosen: list[int] = []
    for entry in entries:
        match: int | None = None
        if entry.lstrip("-").isdigit():
            match = by_index.get(int(entry)) if not entry.startswith("-") else None
        elif entry and not entry.lower().startswith("mig-"):
            key = _uuid_key(entry)
            found = [index for index, uuid in devices if key and _uuid_key(uuid).startswith(key)]
            match = found[0] if len(found) == 1 else None
        if match is None:
            return chosen, f"CUDA_VISIBLE_DEVICES entry {entry!r} matches no single GPU; it and later entries ignored"
        if match not in chosen:
            chosen.append(match)
    return chosen, None


def node_hostname() -> str:
    """The node's name as dcgm-exporter takes it: $NODE_NAME (Kubernetes) or the host name."""
    return (os.environ.get("NODE_NAME") or socket.gethostname())[: protocol.MAX_HOSTNAME_LENGTH]


def _text(value: Any) -> str:
    # Old bindings return bytes; nvidia-ml-py returns str.
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return str(value)[: protocol.MAX_GPU_TEXT_LENGTH]


def _describe(error: Exception) -> str:
    # The binding looks unknown codes up in the library, which may be what is missing.
    try:
        return str(error)
    except Exception:  # noqa: BLE001
        return type(error).__name__


def _errors(nvml, *names: str) -> tuple[type[BaseException], ...]:
    """The binding's exception classes of these names that it has; () catches nothing."""
    found = (getattr(nvml, name, None) for name in names)
    return tuple(cls for cls in found if isinstance(cls, type) and issubclass(cls, BaseException))


# The source ---------------------------------------------------------------------------


@dataclass(slots=True)
class GpuSnapshot:
    """What one read of a worker's GPUs gave: the readings, or why there are none."""

    gpus: list[GpuReading] = field(default_factory=list)
    driver_version: str | None = None
    error: str | None = None


@dataclass(slots=True)
class _Device:
    index: int
    handle: Any
    uuid: str
    name: str
    pci_bus_id: str


# NVML field-value types (nvmlValueType_t) → the union member holding the value.
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


class NvmlGpuSource:
    """Reads the visible GPUs through NVML. `sample()` blocks; call it through `read_gpus`."""

    blocking = True

    def __init__(self, nvml: Any = None, *, visible_devices: str | None | EllipsisType = ..., logger=None) -> None:
        self._nvml = nvml
        self._visible = (os.environ.get("CUDA_VISIBLE_DEVICES") if isinstance(visible_devices, EllipsisType)
                         else visible_devices)
        self._log = logger or log
        self._opened = False
        self._devices: list[_Device] = []
        self.driver_version: str | None = None
        self.error: str | None = None
        self._said: set[tuple] = set()
        # Newer calls that this driver turned out not to have; the older call is used instead.
        self._no_memory_v2 = False
        self._no_temperature_v = False

    # -- lifecycle ---------------------------------------------------------------------

    def _say_once(self, key: tuple, level: str, message: str, **fields) -> None:
        if key in self._said:
            return
        self._said.add(key)
        getattr(self._log, level)(message, **fields)

    def open(self) -> None:
        """Initialise NVML and pick the devices; on failure, log once and remember why."""
        if self._opened:
            return
        self._opened = True
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError as error:
                self.error = "ImportError"
                self._say_once(("init",), "warning", "NVML binding not importable; reporting no GPUs",
                               error=str(error), hint="pip install nvidia-ml-py")
                return
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            # LibraryNotFound (no driver installed), DriverNotLoaded, NoPermission, Unknown,
            # LibRmVersionMismatch: nothing to read on this host until the worker restarts.
            self.error = type(error).__name__
            self._say_once(("init",), "warning", "NVML unavailable; reporting no GPUs, KV stats continue",
                           error=self.error, detail=_describe(error))
            return
        try:
            self.driver_version = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError as error:
            self._say_once(("driver",), "info", "NVML driver version unavailable", error=type(error).__name__)
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as error:
            self.error = type(error).__name__
            self._say_once(("count",), "warning", "NVML cannot count GPUs; reporting none", error=self.error)
            return
        found: dict[int, _Device] = {}
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except nvml.NVMLError as error:
                self._say_once(("device", index), "warning", "GPU not readable; skipped", gpu=index,
                               error=type(error).__name__)
                continue
            name = self._read(index, "name", lambda h=handle: _text(nvml.nvmlDeviceGetName(h))) or ""
            bus = self._read(index, "pci_bus_id", lambda h=handle: _text(nvml.nvmlDeviceGetPciInfo(h).busId)) or ""
            found[index] = _Device(index, handle, uuid, name, bus)
        chosen, problem = choose_devices(parse_visible_devices(self._visible),
                                         [(d.index, d.uuid) for d in found.values()])
        if problem:
            self._say_once(("visible",), "warning", problem, cuda_visible_devices=self._visible)
        self._devices = [found[index] for index in chosen]
        self._log.info("NVML ready", gpus=[d.index for d in self._devices], driver_version=self.driver_version,
                       models=sorted({d.name for d in self._devices}))

    def close(self) -> None:
        if self._opened and self.error is None and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
        self._opened = False
        self._devices = []

    # -- reading -----------------------------------------------------------------------

    def _read(self, index: int, name: str, call):
        """One field of one GPU, or None: unsupported fields are omitted, errors are said once."""
        nvml = self._nvml
        try:
            return call()
        except _errors(nvml, "NVMLError_NotSupported", "NVMLLibraryMismatchError") as error:
            # NVMLLibraryMismatchError: the binding's unversioned call is newer than the driver.
            self._say_once(("field", index, name), "info", "GPU field not supported; omitted", gpu=index,
                           field=name, error=type(error).__name__)
        except nvml.NVMLError as error:
            self._say_once(("field", index, name, type(error).__name__), "warning",
                           "GPU field read failed; omitted", gpu=index, field=name, error=type(error).__name__)
        return None

    def _memory(self, handle):
        nvml = self._nvml
        version = getattr(nvml, "nvmlMemory_v2", None)
        if version is not None and not self._no_memory_v2:
            try:
                return nvml.nvmlDeviceGetMemoryInfo(handle, version=version), True
            except _errors(nvml, "NVMLError_FunctionNotFound", "NVMLError_ArgumentVersionMismatch"):
                self._no_memory_v2 = True  # driver older than the v2 struct: total = used + free
        return nvml.nvmlDeviceGetMemoryInfo(handle), False

    def _temperature(self, handle):
        nvml = self._nvml
        if not self._no_temperature_v and hasattr(nvml, "nvmlDeviceGetTemperatureV"):
            try:
                return nvml.nvmlDeviceGetTemperatureV(handle, nvml.NVML_TEMPERATURE_GPU)
            except _errors(nvml, "NVMLError_FunctionNotFound"):
                self._no_temperature_v = True
        return nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)

    def _memory_temperature(self, handle):
        nvml = self._nvml
        (value,) = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_MEMORY_TEMP])
        if value.nvmlReturn != 0:
            raise nvml.NVMLError(value.nvmlReturn)
        return getattr(value.value, _VALUE_MEMBERS.get(value.valueType, "uiVal"))

    def _processes(self, handle) -> list[GpuProcess]:
        procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        result = [GpuProcess(int(p.pid), plausible("fb_used_mib", mib(getattr(p, "usedGpuMemory", None))))
                  for p in procs if 0 <= int(p.pid) <= 2**32 - 1]
        # The biggest users matter; the message carries a bounded number.
        result.sort(key=lambda p: -(p.used_memory_mib or 0))
        return result[: protocol.MAX_PROCESSES_PER_GPU]

    def read_device(self, device: _Device) -> GpuReading:
        nvml, h, i = self._nvml, device.handle, device.index
        values: dict[str, Any] = {}
        rates = self._read(i, "utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(h))
        if rates is not None:
            values["gpu_util"], values["mem_copy_util"] = rates.gpu, rates.memory
        memory = self._read(i, "memory", lambda: self._memory(h))
        if memory is not None:
            info, has_reserved = memory
            values["fb_used_mib"], values["fb_free_mib"] = mib(info.used), mib(info.free)
            values["fb_total_mib"] = mib(info.total)
            if has_reserved:
                values["fb_reserved_mib"] = mib(info.reserved)
        values["gpu_temp_c"] = self._read(i, "gpu_temp", lambda: self._temperature(h))
        values["memory_temp_c"] = self._read(i, "memory_temp", lambda: self._memory_temperature(h))
        values["power_usage_w"] = watts(self._read(i, "power_usage", lambda: nvml.nvmlDeviceGetPowerUsage(h)))
        values["total_energy_mj"] = self._read(
            i, "total_energy", lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(h))
        values["sm_clock_mhz"] = self._read(i, "sm_clock", lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM))
        values["mem_clock_mhz"] = self._read(
            i, "mem_clock", lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM))
        checked = {}
        for name, value in values.items():
            kept = plausible(name, value)
            if value is not None and kept is None:
                self._say_once(("implausible", i, name), "warning", "GPU field out of range; omitted", gpu=i,
                               field=name, value=value)
            checked[name] = kept
        processes = self._read(i, "processes", lambda: self._processes(h)) or []
        return GpuReading(index=i, uuid=device.uuid, name=device.name, pci_bus_id=device.pci_bus_id,
                          processes=processes, **checked)

    def sample(self) -> GpuSnapshot:
        """Read every chosen GPU once (blocking)."""
        self.open()
        if self.error is not None:
            return GpuSnapshot(error=self.error)
        readings = []
        for device in self._devices:
            try:
                readings.append(self.read_device(device))
            except Exception as error:  # noqa: BLE001 - a binding bug must not stop the reports
                self._say_once(("unexpected", device.index, type(error).__name__), "warning",
                               "GPU read failed unexpectedly; GPU left out of this report", gpu=device.index,
                               error=type(error).__name__, detail=str(error)[:300])
        return GpuSnapshot(readings, self.driver_version)


async def read_gpus(source) -> GpuSnapshot:
    """One snapshot from `source`, off the event loop when its reads block (NVML does)."""
    if getattr(source, "blocking", True):
        return await asyncio.to_thread(source.sample)
    return source.sample()


async def report_gpus(publisher, source, interval: float, stop: asyncio.Event, *, dp_rank: int | None = None,
                      hostname: str | None = None) -> None:
    """Publish `source`'s GPUs through `publisher` every `interval` seconds until `stop`.

    Runs beside the worker's KV-stats loop, on its own interval: NVML sampling costs the
    engine a little (srt-slurm measured ~2 % inter-token latency at 100 ms, parity at 5 s).
    """
    from fleet_worker.publisher import run_periodically

    host = hostname if hostname is not None else node_hostname()

    refused: set[str] = set()

    async def tick() -> None:
        snapshot = await read_gpus(source)
        try:
            await publisher.publish_gpu(snapshot.gpus, hostname=host, driver_version=snapshot.driver_version,
                                        dp_rank=dp_rank, sampler_error=snapshot.error)
        except protocol.MessageRejected as error:
            # Readings the aggregator would drop; keep reporting, say it once per reason.
            if error.reason not in refused:
                refused.add(error.reason)
                log.warning("GPU report not sent: the aggregator would reject it", reason=error.reason,
                            detail=error.detail[:300])

    try:
        await run_periodically(interval, tick, stop)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            await asyncio.to_thread(close) if getattr(source, "blocking", True) else close()
