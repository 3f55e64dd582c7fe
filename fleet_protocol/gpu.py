"""GPU readings, one message per worker per sampling interval (this project's own topic)."""

from __future__ import annotations

from typing import Annotated, Final

import msgspec
from msgspec import Meta, Struct

from .codec import decode
from .errors import INCONSISTENT, MessageRejected
from .subjects import DEFAULT_ENDPOINT
from .values import EndpointName, Rank, WorkerId, check_worker_id

# GPU telemetry ------------------------------------------------------------------------
#
# One message per worker (per data-parallel rank) per sampling interval, on
# `namespace.{ns}.component.{component}.gpu_metrics`. Readings are in the units
# dcgm-exporter exports (%, MiB, °C, W, mJ, MHz); the sampler converts NVML's mW and
# bytes. A field the GPU does not support is absent, never 0. The bounds are physical
# ceilings with a wide margin: NVML's "not available" sentinels (0xFFFFFFFF and the like)
# fall outside them, so a sentinel can never travel as a reading.

GPU_METRICS: Final = "gpu_metrics"

# Chosen so that the largest legal message (64 GPUs, 32 processes each, every string at
# its limit) stays under the aggregator's default --max-message-bytes of 256 KiB.
MAX_GPUS_PER_MESSAGE: Final = 64
MAX_PROCESSES_PER_GPU: Final = 32
MAX_GPU_TEXT_LENGTH: Final = 128
MAX_HOSTNAME_LENGTH: Final = 253  # a DNS name

GpuIndex = Annotated[int, Meta(ge=0, le=1023)]
Percent = Annotated[int, Meta(ge=0, le=100)]
MiB = Annotated[int, Meta(ge=0, le=2**30)]  # 1 PiB of framebuffer
Celsius = Annotated[int, Meta(ge=0, le=250)]
Watts = Annotated[float, Meta(ge=0.0, le=100_000.0)]
MilliJoules = Annotated[int, Meta(ge=0)]  # since driver load; a u64 in NVML, int64 here (292 years at 1 kW)
MHz = Annotated[int, Meta(ge=0, le=100_000)]
Pid = Annotated[int, Meta(ge=0, le=2**32 - 1)]
GpuText = Annotated[str, Meta(max_length=MAX_GPU_TEXT_LENGTH)]


class GpuProcess(Struct, omit_defaults=True, gc=False):
    """A process holding memory on the GPU (NVML's compute processes)."""

    pid: Pid
    used_memory_mib: MiB | None = None  # None where NVML cannot tell (e.g. WDDM, some containers)


class GpuReading(Struct, omit_defaults=True, gc=False):
    """One GPU, read once. Identity fields first, then dcgm-exporter's default fields."""

    index: GpuIndex  # NVML index: dcgm-exporter's `gpu` label
    uuid: GpuText  # "GPU-xxxxxxxx-..."
    name: GpuText  # model, dcgm-exporter's `modelName`
    pci_bus_id: GpuText = ""
    gpu_util: Percent | None = None
    mem_copy_util: Percent | None = None
    fb_used_mib: MiB | None = None
    fb_free_mib: MiB | None = None
    fb_reserved_mib: MiB | None = None
    fb_total_mib: MiB | None = None
    gpu_temp_c: Celsius | None = None
    memory_temp_c: Celsius | None = None
    power_usage_w: Watts | None = None
    total_energy_mj: MilliJoules | None = None
    sm_clock_mhz: MHz | None = None
    mem_clock_mhz: MHz | None = None
    processes: Annotated[list[GpuProcess], Meta(max_length=MAX_PROCESSES_PER_GPU)] = []


class GpuMetricsEvent(Struct, omit_defaults=True, gc=False):
    """The GPUs one worker (one data-parallel rank of it) uses, read at one instant.

    `gpus` is empty when the worker has no usable GPU; `sampler_error` then says why
    (e.g. "NVMLError_LibraryNotFound"), so a fleet can tell "no GPU" from "no reports".
    """

    worker_id: WorkerId
    hostname: Annotated[str, Meta(max_length=MAX_HOSTNAME_LENGTH)] = ""
    endpoint: EndpointName = DEFAULT_ENDPOINT
    dp_rank: Rank | None = None
    driver_version: GpuText | None = None
    gpus: Annotated[list[GpuReading], Meta(max_length=MAX_GPUS_PER_MESSAGE)] = []
    sampler_error: GpuText | None = None


_gpu_metrics_decoder = msgspec.json.Decoder(GpuMetricsEvent)


def check_gpu_metrics(event: GpuMetricsEvent) -> None:
    """Reject readings that contradict themselves: two GPUs with one identity, used > total."""
    check_worker_id(event.worker_id)
    indexes: set[int] = set()
    uuids: set[str] = set()
    for gpu in event.gpus:
        if gpu.index in indexes or (gpu.uuid and gpu.uuid in uuids):
            raise MessageRejected(INCONSISTENT, f"GPU {gpu.index} ({gpu.uuid}) appears twice")
        indexes.add(gpu.index)
        uuids.add(gpu.uuid)
        if gpu.fb_total_mib is not None:
            for name in ("fb_used_mib", "fb_free_mib", "fb_reserved_mib"):
                value = getattr(gpu, name)
                if value is not None and value > gpu.fb_total_mib:
                    raise MessageRejected(
                        INCONSISTENT, f"GPU {gpu.index}: {name} {value} > fb_total_mib {gpu.fb_total_mib}"
                    )


def decode_gpu_metrics(payload: bytes, max_bytes: int) -> GpuMetricsEvent:
    event = decode(_gpu_metrics_decoder, payload, max_bytes)
    check_gpu_metrics(event)
    return event
