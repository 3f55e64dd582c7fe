"""GPU readings as Prometheus families: dcgm-exporter's per-GPU series and fleet views.

Per GPU, under dcgm-exporter's names, units and labels (`gpu`, `UUID`, `pci_bus_id`,
`device`, `modelName`, `Hostname`, `DCGM_FI_DRIVER_VERSION`), so NVIDIA's and Dynamo's DCGM
dashboards work against the aggregator; then the worker that uses the GPU
(`component`, `endpoint`, `worker_id`, `dp_rank`).

`DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` is a counter in meaning (mJ since the driver
loaded) but is exposed as a gauge: dcgm-exporter names it without `_total`, and
prometheus_client (like OpenMetrics) would append `_total` to a counter's samples,
which would break every dashboard that queries the DCGM name. `rate()` and
`increase()` work on it all the same (PromQL does not look at the type).

A worker's readings are exported while they are fresher than `stale_after`: a worker
that keeps sending KV stats but stopped sending GPU readings shows no stale GPUs.

Readings come every few seconds from every worker, so each is rendered once, when it
arrives (`RenderedReadings`, told by the fleet), not at every scrape.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache

from prometheus_client.core import GaugeMetricFamily, Metric, Sample
from prometheus_client.registry import Collector

from aggregator.exposition.chunked_metric import ChunkedMetric
from aggregator.exposition.encoder import RenderedLabels, render_chunk
from aggregator.state.fleet import Fleet, GroupKey, WorkerKey, WorkerState
from fleet_protocol import ForwardPassMetrics, GpuMetricsEvent, GpuReading

GROUP_LABELS = ["component", "endpoint"]
WORKER_LABELS = ["component", "endpoint", "worker_id", "dp_rank"]

# (name, help, GpuReading field). Help texts are dcgm-exporter's, with what its users asked.
DCGM_GAUGES: list[tuple[str, str, str]] = [
    ("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", "sm_clock_mhz"),
    ("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", "mem_clock_mhz"),
    ("DCGM_FI_DEV_MEMORY_TEMP", "Memory temperature (in C).", "memory_temp_c"),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "gpu_temp_c"),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "power_usage_w"),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
     "Total energy consumption since boot (in mJ). A counter, typed gauge to keep dcgm-exporter's name.",
     "total_energy_mj"),
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %): share of time a kernel ran.", "gpu_util"),
    ("DCGM_FI_DEV_MEM_COPY_UTIL",
     "Memory utilization (in %): share of time device memory was read or written (bandwidth, not capacity).",
     "mem_copy_util"),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", "fb_free_mib"),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "fb_used_mib"),
    ("DCGM_FI_DEV_FB_RESERVED", "Framebuffer memory reserved (in MiB).", "fb_reserved_mib"),
    ("DCGM_FI_DEV_FB_TOTAL", "Framebuffer memory total (in MiB).", "fb_total_mib"),
]


def dcgm_labels(hostname_label: str) -> list[str]:
    return ["gpu", "UUID", "pci_bus_id", "device", "modelName", hostname_label, "DCGM_FI_DRIVER_VERSION",
            *WORKER_LABELS]


def framebuffer_mib(gpu: GpuReading) -> int | None:
    """The GPU's whole framebuffer: NVML's total, else the sum of its parts."""
    if gpu.fb_total_mib is not None:
        return gpu.fb_total_mib
    if gpu.fb_used_mib is not None and gpu.fb_free_mib is not None:
        return gpu.fb_used_mib + gpu.fb_free_mib + (gpu.fb_reserved_mib or 0)
    return None


@dataclass(slots=True)
class GpuGroupView:
    """What an operator looks at first, per component endpoint, over fresh GPU readings."""

    gpus: int = 0
    utilization_avg: float | None = None
    memory_used_ratio: float | None = None
    power_watts: float | None = None
    temperature_max_c: float | None = None
    kv_blocks_per_gib: float | None = None


@dataclass(frozen=True, slots=True)
class GpuSummary:
    """One worker's reading reduced to what the fleet views add up; made once per reading."""

    gpus: int = 0
    util_sum: float = 0.0
    util_n: int = 0
    used_mib: int = 0  # framebuffer used, over the GPUs whose whole framebuffer is known
    fb_mib: int = 0  # those GPUs' whole framebuffer
    powers: tuple[float, ...] = ()
    temperature_max_c: float | None = None
    worker_fb_mib: int | None = None  # the worker's whole framebuffer; None if one GPU's is unknown


def summarize(event: GpuMetricsEvent) -> GpuSummary:
    util_sum, util_n, used, fb_sum, worker_fb = 0.0, 0, 0, 0, 0
    worker_fb_known = bool(event.gpus)
    powers: list[float] = []
    temperature = None
    for gpu in event.gpus:
        if gpu.gpu_util is not None:
            util_sum += gpu.gpu_util
            util_n += 1
        fb = framebuffer_mib(gpu)
        if fb is None:
            worker_fb_known = False
        else:
            worker_fb += fb
            if gpu.fb_used_mib is not None:
                used += gpu.fb_used_mib
                fb_sum += fb
        if gpu.power_usage_w is not None:
            powers.append(gpu.power_usage_w)
        if gpu.gpu_temp_c is not None:
            temperature = max(temperature or 0, gpu.gpu_temp_c)
    return GpuSummary(len(event.gpus), util_sum, util_n, used, fb_sum, tuple(powers), temperature,
                      worker_fb if worker_fb_known else None)


def combine_views(
    workers: Iterable[tuple[GroupKey, GpuSummary, ForwardPassMetrics | None]],
) -> dict[GroupKey, GpuGroupView]:
    """Fleet views from (group, a worker's `summarize`d readings, its load or None); pure. Each summary
    is made once per reading (`render_reading`), not once per scrape."""
    sums: dict[GroupKey, list] = {}  # [util, util_n, used, fb, kv_blocks, kv_mib, powers]
    views: dict[GroupKey, GpuGroupView] = {}
    for group, summary, load in workers:
        view = views.get(group)
        if view is None:
            view = views[group] = GpuGroupView()
            sums[group] = [0.0, 0, 0, 0, 0, 0, []]
        s = sums[group]
        view.gpus += summary.gpus
        s[0] += summary.util_sum
        s[1] += summary.util_n
        s[2] += summary.used_mib
        s[3] += summary.fb_mib
        s[6].extend(summary.powers)
        if summary.temperature_max_c is not None:
            view.temperature_max_c = max(view.temperature_max_c or 0, summary.temperature_max_c)
        # KV capacity per GiB only for workers whose whole framebuffer is known.
        if load is not None and summary.worker_fb_mib:
            s[4] += load.kv_stats.kv_total_blocks
            s[5] += summary.worker_fb_mib
    for group, view in views.items():
        util, util_n, used, fb, kv_blocks, kv_mib, powers = sums[group]
        if util_n:
            view.utilization_avg = util / util_n
        if fb:
            view.memory_used_ratio = used / fb
        if powers:
            # Summed exactly (fsum), so the view does not depend on the order workers arrived in.
            view.power_watts = math.fsum(powers)
        if kv_mib:
            view.kv_blocks_per_gib = kv_blocks / (kv_mib / 1024)
    return views


# Every per-GPU family, in exposition order: (name, help).
_GPU_FAMILIES: list[tuple[str, str]] = [
    *((name, doc) for name, doc, _ in DCGM_GAUGES),
    ("llm_gpu_process_memory_used_mib", "Framebuffer used by one process on the GPU (in MiB), as NVML reports it"),
    ("llm_gpu_sampler_up",
     "1 if the worker's last GPU report read its GPUs, 0 if its sampler failed (the reason in `error`)"),
]
_GPU_FAMILY_INDEX = {name: i for i, (name, _) in enumerate(_GPU_FAMILIES)}


# A worker's rendered label sets, by label values; bounded, as a worker whose GPUs keep
# changing identity must not grow it.
LabelSets = dict[tuple[str, ...], RenderedLabels]
_MAX_LABEL_SETS = 256


@dataclass(frozen=True, slots=True)
class RenderedReading:
    """One worker's latest reading, rendered: samples and lines per family of _GPU_FAMILIES."""

    event: GpuMetricsEvent  # the reading these are of
    samples: tuple[list[Sample], ...]
    chunks: tuple[bytes | None, ...]
    summary: GpuSummary
    label_sets: LabelSets  # reused by the worker's next readings


class RenderedReadings:
    """The render cache of GPU readings, keyed by worker: a FleetListener that renders each reading as
    it arrives and frees a worker's entry when it expires. Written only on the thread that changes the
    fleet; the render thread only reads it."""

    def __init__(self, hostname_label: str = "Hostname") -> None:
        self.hostname_label = hostname_label
        self.by_worker: dict[WorkerKey, RenderedReading] = {}  # read directly by scrapes (C-speed lookups)

    def __len__(self) -> int:
        return len(self.by_worker)

    def gpu_reading(self, state: WorkerState) -> None:
        assert state.gpu is not None
        previous = self.by_worker.get(state.key)
        self.by_worker[state.key] = render_reading(state.key, state.gpu, self.hostname_label,
                                                   previous.label_sets if previous is not None else {})

    def workers_expired(self, keys: list[WorkerKey]) -> None:
        for key in keys:
            self.by_worker.pop(key, None)


class GpuCollector(Collector):
    """The per-GPU series of live workers' fresh readings, and the fleet views per component endpoint.

    Register `readings` with the fleet (`Fleet.add_listener`) so readings are rendered on arrival.
    """

    def __init__(self, fleet: Fleet, *, hostname_label: str = "Hostname",
                 monotonic_clock: Callable[[], float] = time.monotonic) -> None:
        self.fleet = fleet
        self.readings = RenderedReadings(hostname_label)
        self._monotonic = monotonic_clock

    def collect(self) -> Iterator[Metric]:
        return gpu_families(self.fleet, self._monotonic(), self.readings)

    def describe(self) -> Iterator[Metric]:
        return iter(_described())


@cache
def _described() -> tuple[Metric, ...]:
    # The families without samples: what an empty fleet yields.
    return tuple(gpu_families(Fleet(stale_after=1.0), 0.0, RenderedReadings()))


def gpu_families(fleet: Fleet, now: float, readings: RenderedReadings) -> Iterator[Metric]:
    """Every GPU family, from the readings of live workers fresher than the fleet's stale_after."""
    fresh: list[tuple[GroupKey, GpuSummary, ForwardPassMetrics | None]] = []
    rendered: list[RenderedReading] = []
    deadline = now - fleet.stale_after
    rendered_by_worker = readings.by_worker
    for key, state in list(fleet.workers.items()):
        event = state.gpu
        if event is None or state.gpu_seen < deadline:
            continue
        reading = rendered_by_worker.get(key)
        if reading is None or reading.event is not event:
            # Normally rendered on arrival; this one is not kept (only the fleet's thread writes the cache).
            reading = render_reading(key, event, readings.hostname_label, {})
        rendered.append(reading)
        fresh.append((GroupKey(key.component, key.endpoint), reading.summary, state.load))
    families = [ChunkedMetric(name, doc, "gauge") for name, doc in _GPU_FAMILIES]
    if rendered:
        # One row per worker, one column per family: transposed by zip, not sample by sample.
        sample_columns = zip(*(reading.samples for reading in rendered))
        chunk_columns = zip(*(reading.chunks for reading in rendered))
        for family, samples, chunks in zip(families, sample_columns, chunk_columns):
            family.add_column(samples, chunks)
    yield from families
    yield from _group_families(combine_views(fresh))


def render_reading(key: WorkerKey, event: GpuMetricsEvent, hostname_label: str,
                   label_sets: LabelSets) -> RenderedReading:
    """A worker's reading as its series (samples and lines) per family, and its summary for the views."""
    gpu_names = tuple(dcgm_labels(hostname_label))
    worker = _worker_labels(key)

    def labels(names: tuple[str, ...], values: tuple[str, ...]) -> RenderedLabels:
        # Rendered once per label set while the worker lives (see encoder.py).
        found = label_sets.get(values)
        if found is None:
            if len(label_sets) >= _MAX_LABEL_SETS:
                label_sets.clear()
            found = label_sets[values] = RenderedLabels(dict(zip(names, values)))
        return found

    samples: list[list] = [[] for _ in _GPU_FAMILIES]
    up = "llm_gpu_sampler_up"
    up_labels = labels((*WORKER_LABELS, "error"), (*worker, event.sampler_error or ""))
    samples[_GPU_FAMILY_INDEX[up]].append(Sample(up, up_labels, 0 if event.sampler_error else 1))
    for gpu in event.gpus:
        gpu_values = (str(gpu.index), gpu.uuid, gpu.pci_bus_id, f"nvidia{gpu.index}", gpu.name,
                      event.hostname, event.driver_version or "", *worker)
        gpu_labels = labels(gpu_names, gpu_values)
        for i, (name, _, attr) in enumerate(DCGM_GAUGES):
            value = getattr(gpu, attr)
            if value is not None:
                samples[i].append(Sample(name, gpu_labels, value))
        for process in gpu.processes:
            if process.used_memory_mib is not None:
                name = "llm_gpu_process_memory_used_mib"
                process_labels = RenderedLabels(dict(zip((*gpu_names, "pid"), (*gpu_values, str(process.pid)))))
                samples[_GPU_FAMILY_INDEX[name]].append(Sample(name, process_labels, process.used_memory_mib))
    return RenderedReading(event, tuple(samples), tuple(render_chunk(family) for family in samples),
                           summarize(event), label_sets)


def _worker_labels(key: WorkerKey) -> tuple[str, ...]:
    return (key.component, key.endpoint, str(key.worker_id), str(key.dp_rank))


def _group_families(views: dict[GroupKey, GpuGroupView]) -> Iterator[Metric]:
    gpus = GaugeMetricFamily("llm_gpus", "GPUs reported by live workers", labels=GROUP_LABELS)
    util = GaugeMetricFamily("llm_gpu_utilization_avg", "Mean GPU utilization (in %) over the reported GPUs",
                             labels=GROUP_LABELS)
    memory = GaugeMetricFamily(
        "llm_gpu_memory_used_ratio", "Framebuffer used over framebuffer total (0..1), summed over the reported GPUs",
        labels=GROUP_LABELS)
    power = GaugeMetricFamily("llm_gpu_power_watts", "Power draw (in W) of all reported GPUs together",
                              labels=GROUP_LABELS)
    temperature = GaugeMetricFamily("llm_gpu_temperature_max_celsius", "Temperature of the hottest reported GPU",
                                    labels=GROUP_LABELS)
    per_gib = GaugeMetricFamily(
        "llm_kv_blocks_per_gib",
        "KV cache capacity per GiB of framebuffer: sum(kv_total_blocks) / sum(framebuffer GiB) over the workers "
        "that report both", labels=GROUP_LABELS)
    for group, view in views.items():
        labels = [group.component, group.endpoint]
        gpus.add_metric(labels, view.gpus)
        for family, value in ((util, view.utilization_avg), (memory, view.memory_used_ratio),
                              (power, view.power_watts), (temperature, view.temperature_max_c),
                              (per_gib, view.kv_blocks_per_gib)):
            if value is not None:
                family.add_metric(labels, value)
    yield from (gpus, util, memory, power, temperature, per_gib)
