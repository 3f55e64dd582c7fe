"""Worker-side publisher library: what an inference worker imports to report to the aggregator.

    nc = await nats.connect("nats://nats:4222")
    publisher = WorkerPublisher(nc, namespace="dynamo", component="backend", worker_id=lease_id)
    await publisher.publish_load(ForwardPassMetrics(WorkerStats(...), KvStats(...)))
    await publisher.publish_hit_rate(isl_blocks=12, overlap_blocks=8)
    await publisher.publish_component_metrics(runtime)  # a MetricsRegistry, on an interval
    snapshot = await read_gpus(NvmlGpuSource())  # aggregator.gpu; NVML off the event loop
    await publisher.publish_gpu(snapshot.gpus, hostname=node_hostname(),
                                driver_version=snapshot.driver_version, sampler_error=snapshot.error)

Messages are the typed structures of `aggregator.protocol`, sent as Dynamo sends them
(JSON on core NATS, fire-and-forget), so the aggregator cannot tell this library from a
Dynamo worker. `run_periodically` publishes a sampled value on an interval.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from nats.aio.client import Client

import fleet_protocol as protocol
from fleet_protocol import (
    ForwardPassMetrics,
    GpuMetricsEvent,
    GpuReading,
    KvHitRateEvent,
    LoadEvent,
    MetricsSnapshot,
)
from fleet_worker.registry import MetricsRegistry


class WorkerPublisher:
    def __init__(
        self,
        nc: Client,
        *,
        namespace: str = protocol.DEFAULT_NAMESPACE,
        component: str = protocol.DEFAULT_COMPONENT,
        endpoint: str = protocol.DEFAULT_ENDPOINT,
        worker_id: int,
        hit_rate_on_namespace: bool = False,
    ) -> None:
        self.nc = nc
        self.namespace = namespace
        self.component = component
        self.endpoint = endpoint
        self.worker_id = worker_id
        self.load_subject = protocol.component_subject(namespace, component, protocol.KV_METRICS)
        # Dynamo's KV router publishes hit-rate events on the namespace-level subject.
        self.metrics_subject = protocol.component_subject(namespace, component, protocol.COMPONENT_METRICS)
        self.hit_rate_subject = (
            protocol.namespace_subject(namespace, protocol.KV_HIT_RATE)
            if hit_rate_on_namespace
            else protocol.component_subject(namespace, component, protocol.KV_HIT_RATE)
        )

    @property
    def gpu_subject(self) -> str:
        return self.subject(protocol.GPU_METRICS)

    def subject(self, event: str) -> str:
        return protocol.component_subject(self.namespace, self.component, event)

    async def publish_load(self, metrics: ForwardPassMetrics) -> None:
        protocol.check_forward_pass_metrics(metrics)
        event = LoadEvent(worker_id=self.worker_id, data=metrics, endpoint=self.endpoint)
        await self.nc.publish(self.load_subject, protocol.encode(event))

    async def publish_hit_rate(self, isl_blocks: int, overlap_blocks: int, dp_rank: int | None = None) -> None:
        event = KvHitRateEvent(self.worker_id, isl_blocks, overlap_blocks, dp_rank)
        await self.nc.publish(self.hit_rate_subject, protocol.encode(event))

    async def publish_component_metrics(self, registry: MetricsRegistry, dp_rank: int | None = None) -> int:
        """Publish a snapshot of `registry`, as typed families (the text exposition format where the
        registry holds a type that has no structured form); returns the payload size."""
        families = registry.families()
        if families is not None:
            snapshot = MetricsSnapshot(worker_id=self.worker_id, families=families, endpoint=self.endpoint,
                                       dp_rank=dp_rank)
        else:
            snapshot = MetricsSnapshot(worker_id=self.worker_id, text=registry.render()[0].decode(),
                                       endpoint=self.endpoint, dp_rank=dp_rank)
        payload = protocol.encode(snapshot)
        await self.nc.publish(self.metrics_subject, payload)
        return len(payload)

    async def publish_gpu(
        self,
        gpus: list[GpuReading],
        *,
        hostname: str = "",
        driver_version: str | None = None,
        dp_rank: int | None = None,
        sampler_error: str | None = None,
    ) -> None:
        """One GpuMetricsEvent (see `aggregator.gpu` for the NVML sampler that makes readings).

        The encoded message is decoded once before sending, so a reading the aggregator would
        reject raises `MessageRejected` here instead of being dropped there.
        """
        event = GpuMetricsEvent(worker_id=self.worker_id, hostname=hostname, endpoint=self.endpoint,
                                dp_rank=dp_rank, driver_version=driver_version, gpus=gpus,
                                sampler_error=sampler_error)
        payload = protocol.encode(event)
        protocol.decode_gpu_metrics(payload, len(payload))
        await self.nc.publish(self.gpu_subject, payload)

    async def publish_raw(self, event: str, payload: bytes) -> None:
        await self.nc.publish(self.subject(event), payload)


async def run_periodically(
    interval: float, tick: Callable[[], Awaitable[None]], stop: asyncio.Event
) -> None:
    """Call `tick` every `interval` seconds (on a fixed schedule, not drifting) until `stop`."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not stop.is_set():
        await tick()
        next_at += interval
        delay = next_at - loop.time()
        if delay < 0:  # fell behind: skip the missed ticks rather than bursting
            next_at = loop.time()
            delay = 0
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
