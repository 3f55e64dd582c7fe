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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric, Sample

from aggregator.exposition.encoder import ChunkedMetric, RenderedLabels, render_chunk
from aggregator.state.fleet import Fleet, GroupKey, WorkerKey
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


def gpu_families(fleet: Fleet, now: float, hostname_label: str = "Hostname") -> Iterator[Metric]:
    """Every GPU family, from the readings of live workers fresher than the fleet's stale_after."""
    fresh: list[tuple[GroupKey, GpuSummary, ForwardPassMetrics | None]] = []
    rendered: list[tuple] = []
    deadline = now - fleet.stale_after
    for key, state in list(fleet.workers.items()):
        event = state.gpu
        if event is None or state.gpu_seen < deadline:
            continue
        cached = state.gpu_rendered
        if cached is None or cached[0] is not event or cached[1] != hostname_label:
            cached = render_reading(state, hostname_label)  # normally done on arrival
        rendered.append(cached)
        fresh.append((GroupKey(key.component, key.endpoint), cached[4], state.load))
    families = [ChunkedMetric(name, doc, "gauge") for name, doc in _GPU_FAMILIES]
    if rendered:
        # One row per worker, one column per family: transposed by zip, not sample by sample.
        sample_columns = zip(*(row[2] for row in rendered))
        chunk_columns = zip(*(row[3] for row in rendered))
        for family, samples, chunks in zip(families, sample_columns, chunk_columns):
            family.add_column(samples, chunks)
    yield from families
    yield from _group_families(combine_views(fresh))


def render_reading(state, hostname_label: str) -> tuple:
    """Render the worker's latest reading once, when it arrives: readings come every few seconds
    from every worker, so rendering them at scrape time would make every scrape re-render the fleet."""
    event = state.gpu
    samples, chunks = _worker_gpu_series(state, event, hostname_label)
    rendered = state.gpu_rendered = (event, hostname_label, samples, chunks, summarize(event))
    return rendered


def _worker_gpu_series(state, event: GpuMetricsEvent, hostname_label: str) -> tuple[tuple, tuple]:
    """One worker's GPU reading: (samples, rendered lines) per family of _GPU_FAMILIES."""
    gpu_names = tuple(dcgm_labels(hostname_label))
    worker = _worker_labels(state.key)
    samples: list[list] = [[] for _ in _GPU_FAMILIES]
    up = "llm_gpu_sampler_up"
    up_labels = state.labels((*WORKER_LABELS, "error"), (*worker, event.sampler_error or ""))
    samples[_GPU_FAMILY_INDEX[up]].append(Sample(up, up_labels, 0 if event.sampler_error else 1))
    for gpu in event.gpus:
        gpu_values = (str(gpu.index), gpu.uuid, gpu.pci_bus_id, f"nvidia{gpu.index}", gpu.name,
                      event.hostname, event.driver_version or "", *worker)
        # Rendered once per GPU identity while the worker lives (see exposition.py).
        gpu_labels = state.labels(gpu_names, gpu_values)
        for i, (name, _, attr) in enumerate(DCGM_GAUGES):
            value = getattr(gpu, attr)
            if value is not None:
                samples[i].append(Sample(name, gpu_labels, value))
        for process in gpu.processes:
            if process.used_memory_mib is not None:
                name = "llm_gpu_process_memory_used_mib"
                labels = RenderedLabels(dict(zip((*gpu_names, "pid"), (*gpu_values, str(process.pid)))))
                samples[_GPU_FAMILY_INDEX[name]].append(Sample(name, labels, process.used_memory_mib))
    return tuple(samples), tuple(render_chunk(family_samples) for family_samples in samples)


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
