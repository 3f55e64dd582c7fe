"""Many simulated workers in one process, each publishing through the publisher library."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import structlog
from nats.aio.client import Client

from aggregator import protocol
from aggregator.gpu import NvmlGpuSource, node_hostname, read_gpus
from aggregator.publisher import WorkerPublisher, run_periodically

from .engine import EngineConfig, SimulatedEngine
from .gpus import SimulatedGpus

log = structlog.get_logger("mock_worker")

SHAPES = ("nested", "flat", "wrapped")
GPU_SOURCES = ("simulated", "nvml", "none")


@dataclass
class SimulatedWorker:
    worker_id: int
    engines: list[SimulatedEngine]  # one per data-parallel rank
    publisher: WorkerPublisher
    gpus: list[SimulatedGpus] | None = None  # one set per data-parallel rank, with --gpu simulated
    hostname: str = ""


def worker_ids(count: int, rng: random.Random) -> list[int]:
    """Lease-like 63-bit ids, as Dynamo's etcd leases are; distinct for a seed."""
    ids: set[int] = set()
    while len(ids) < count:
        ids.add(rng.getrandbits(62) | (1 << 62))
    return sorted(ids)


class MockFleet:
    def __init__(
        self,
        nc: Client,
        *,
        workers: int,
        namespace: str = protocol.DEFAULT_NAMESPACE,
        component: str = protocol.DEFAULT_COMPONENT,
        endpoint: str = protocol.DEFAULT_ENDPOINT,
        seed: int | None = None,
        dp_ranks: int = 1,
        shape: str = "nested",
        hit_rate_on_namespace: bool = False,
        config: EngineConfig | None = None,
        gpu: str = "none",
        gpus_per_worker: int = 1,
        gpu_interval: float = 5.0,
        gpu_source: NvmlGpuSource | None = None,
    ) -> None:
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}")
        if gpu not in GPU_SOURCES:
            raise ValueError(f"gpu must be one of {GPU_SOURCES}")
        self.rng = random.Random(seed)
        self.shape = shape
        config = config or EngineConfig()
        self.workers = [
            SimulatedWorker(
                worker_id,
                [SimulatedEngine(config, random.Random(self.rng.getrandbits(64))) for _ in range(dp_ranks)],
                WorkerPublisher(nc, namespace=namespace, component=component, endpoint=endpoint,
                                worker_id=worker_id, hit_rate_on_namespace=hit_rate_on_namespace),
            )
            for worker_id in worker_ids(workers, self.rng)
        ]
        self.dp_ranks = dp_ranks
        self.gpu = gpu
        self.gpu_interval = gpu_interval
        self.gpu_source = gpu_source if gpu_source is not None or gpu != "nvml" else NvmlGpuSource()
        if gpu == "simulated":
            # Drawn after the engines, so a seed gives the same KV stats with or without GPUs.
            for position, worker in enumerate(self.workers):
                worker.hostname = f"mock-node-{position}"
                worker.gpus = [SimulatedGpus(gpus_per_worker, random.Random(self.rng.getrandbits(64)))
                               for _ in range(dp_ranks)]
        elif gpu == "nvml":
            for worker in self.workers:
                worker.hostname = node_hostname()

    def _payload(self, worker: SimulatedWorker, metrics: protocol.ForwardPassMetrics) -> bytes:
        if self.shape == "flat":
            data = protocol.flat_forward_pass_metrics(metrics)
        elif self.shape == "wrapped":
            data = {"engine_load_metrics": metrics}
        else:
            data = metrics
        return protocol.encode_json({"worker_id": worker.worker_id, "endpoint": worker.publisher.endpoint,
                                     "data": data})

    async def tick(self, dt: float) -> None:
        """Advance every engine by `dt` and publish its load and hit-rate events."""
        for worker in self.workers:
            for rank, engine in enumerate(worker.engines):
                samples, _ = engine.step(dt)
                dp_rank = rank if self.dp_ranks > 1 else None
                for sample in samples:
                    await worker.publisher.publish_hit_rate(sample.isl_blocks, sample.overlap_blocks, dp_rank)
                metrics = engine.metrics(dp_rank)
                if self.shape == "nested":
                    await worker.publisher.publish_load(metrics)
                else:
                    await worker.publisher.publish_raw(protocol.KV_METRICS, self._payload(worker, metrics))

    async def gpu_tick(self, dt: float) -> None:
        """Publish one GpuMetricsEvent per worker (per rank, for simulated GPUs)."""
        if self.gpu == "simulated":
            for worker in self.workers:
                for rank, (engine, gpus) in enumerate(zip(worker.engines, worker.gpus or [])):
                    dp_rank = rank if self.dp_ranks > 1 else None
                    await worker.publisher.publish_gpu(gpus.step(dt, engine.metrics(dp_rank)),
                                                       hostname=worker.hostname, dp_rank=dp_rank,
                                                       driver_version="570.133.20")
        elif self.gpu == "nvml":
            # One host, one read: every simulated worker reports the host's real GPUs.
            snapshot = await read_gpus(self.gpu_source)
            for worker in self.workers:
                await worker.publisher.publish_gpu(snapshot.gpus, hostname=worker.hostname,
                                                   driver_version=snapshot.driver_version,
                                                   sampler_error=snapshot.error)

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        log.info("publishing", workers=len(self.workers), dp_ranks=self.dp_ranks, interval=interval,
                 shape=self.shape, subject=self.workers[0].publisher.load_subject if self.workers else None,
                 gpu=self.gpu, gpu_interval=self.gpu_interval if self.gpu != "none" else None)
        loops = [run_periodically(interval, lambda: self.tick(interval), stop)]
        if self.gpu != "none":
            loops.append(run_periodically(self.gpu_interval, lambda: self.gpu_tick(self.gpu_interval), stop))
        try:
            await asyncio.gather(*loops)
        finally:
            if self.gpu == "nvml":
                await asyncio.to_thread(self.gpu_source.close)
