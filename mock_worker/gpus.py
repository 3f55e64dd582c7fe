"""Simulated GPUs that follow a simulated engine's load. Pure: time and load come in as values.

The shapes are those of a tensor-parallel LLM engine on datacenter GPUs: utilisation,
memory bandwidth and power rise with the share of busy request slots; framebuffer use is
the model weights plus the KV blocks in use; temperature follows power with a thermal lag;
energy is the integral of power. Every GPU of a worker sees the same load with a little
per-GPU jitter, as tensor-parallel ranks do.
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass, field

from fleet_protocol import ForwardPassMetrics, GpuProcess, GpuReading


@dataclass(frozen=True)
class GpuModel:
    name: str = "NVIDIA H100 80GB HBM3"
    fb_total_mib: int = 81559
    fb_reserved_mib: int = 530
    weights_fraction: float = 0.38  # of usable memory, loaded at start
    kv_pool_fraction: float = 0.52  # of usable memory, filled as KV blocks are used
    idle_watts: float = 70.0
    max_watts: float = 700.0
    ambient_c: float = 28.0
    heat_c_per_watt: float = 0.06
    thermal_time_constant_s: float = 40.0
    sm_clock_idle_mhz: int = 345
    sm_clock_max_mhz: int = 1980
    mem_clock_mhz: int = 2619


# The PCI buses of an 8-GPU HGX board, as NVML lists them; more GPUs continue upwards.
_HGX_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)


def load_fractions(metrics: ForwardPassMetrics | None) -> tuple[float, float]:
    """(busy slot share, used KV block share) of the engine, each 0..1."""
    if metrics is None:
        return 0.0, 0.0
    w, kv = metrics.worker_stats, metrics.kv_stats
    busy = w.request_active_slots / w.request_total_slots if w.request_total_slots else 0.0
    used = kv.kv_active_blocks / kv.kv_total_blocks if kv.kv_total_blocks else 0.0
    return min(busy, 1.0), min(used, 1.0)


def utilisation_percent(busy: float, jitter: float = 0.0) -> int:
    """NVML's "kernel running" share: 0 when idle, high as soon as any request decodes."""
    if busy <= 0:
        return 0
    return max(0, min(100, round(40 + 60 * math.sqrt(busy) + jitter)))


def power_watts(model: GpuModel, util: int) -> float:
    return model.idle_watts + (model.max_watts - model.idle_watts) * (util / 100) ** 1.3


def next_temperature(model: GpuModel, temp: float, watts: float, dt: float) -> float:
    """First-order lag towards the steady-state temperature of the present power."""
    target = model.ambient_c + model.heat_c_per_watt * watts
    return target + (temp - target) * math.exp(-dt / model.thermal_time_constant_s)


def framebuffer_used_mib(model: GpuModel, kv_used: float) -> int:
    usable = model.fb_total_mib - model.fb_reserved_mib
    return round(usable * (model.weights_fraction + model.kv_pool_fraction * kv_used))


@dataclass
class SimulatedGpu:
    index: int
    uuid: str
    pci_bus_id: str
    temperature_c: float
    energy_mj: float  # since "driver load"


@dataclass
class SimulatedGpus:
    """The GPUs of one simulated worker; `step(dt, metrics)` gives their readings after `dt` seconds."""

    count: int
    rng: random.Random
    model: GpuModel = field(default_factory=GpuModel)
    pid: int = 0
    gpus: list[SimulatedGpu] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pid = self.pid or self.rng.randint(1000, 4_000_000)
        for index in range(self.count):
            bus = _HGX_BUSES[index] if index < len(_HGX_BUSES) else 0xE0 + index - len(_HGX_BUSES)
            self.gpus.append(SimulatedGpu(
                index=index,
                uuid=f"GPU-{uuid.UUID(int=self.rng.getrandbits(128), version=4)}",
                pci_bus_id=f"00000000:{bus:02X}:00.0",
                temperature_c=self.model.ambient_c + self.rng.uniform(2, 6),
                energy_mj=self.rng.uniform(1e9, 5e10),
            ))

    def step(self, dt: float, metrics: ForwardPassMetrics | None) -> list[GpuReading]:
        model = self.model
        busy, kv_used = load_fractions(metrics)
        used = framebuffer_used_mib(model, kv_used)
        free = model.fb_total_mib - model.fb_reserved_mib - used
        readings = []
        for gpu in self.gpus:
            util = utilisation_percent(busy, self.rng.uniform(-3, 3) if busy else 0.0)
            watts = power_watts(model, util) + self.rng.uniform(-4, 4)
            gpu.energy_mj += watts * dt * 1000.0
            gpu.temperature_c = next_temperature(model, gpu.temperature_c, watts, dt)
            readings.append(GpuReading(
                index=gpu.index,
                uuid=gpu.uuid,
                name=model.name,
                pci_bus_id=gpu.pci_bus_id,
                gpu_util=util,
                mem_copy_util=max(0, min(100, round(util * 0.45 + self.rng.uniform(-2, 2)))) if util else 0,
                fb_used_mib=used,
                fb_free_mib=free,
                fb_reserved_mib=model.fb_reserved_mib,
                fb_total_mib=model.fb_total_mib,
                gpu_temp_c=round(gpu.temperature_c),
                memory_temp_c=round(gpu.temperature_c + 6),
                power_usage_w=round(watts, 3),
                total_energy_mj=int(gpu.energy_mj),
                sm_clock_mhz=model.sm_clock_max_mhz if util else model.sm_clock_idle_mhz,
                mem_clock_mhz=model.mem_clock_mhz,
                processes=[GpuProcess(self.pid, used - 500)],
            ))
        return readings
