"""Many simulated workers in one process, each publishing through the publisher library.

In push mode every worker publishes its ForwardPassMetrics on `kv_metrics`. In pull mode
(`serve_stats`) every worker instead runs a NATS micro service, as a Dynamo worker does,
whose stats handler returns its current metrics; hit-rate events are still pushed, since
in Dynamo the KV router publishes them, not the worker.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import structlog
from nats.aio.client import Client

import fleet_protocol as protocol
from fleet_worker.endpoint_metrics import EndpointMetrics, HandlerError, current_call
from fleet_worker.nvml_sampler import NvmlGpuSource, node_hostname, read_gpus
from fleet_worker.publisher import WorkerPublisher, run_periodically
from fleet_worker.registry import MetricsRegistry

from .engine import Completion, EngineConfig, SimulatedEngine
from .gpus import SimulatedGpus

log = structlog.get_logger("mock_worker")

SHAPES = ("nested", "flat", "wrapped")
MODES = ("push", "pull")
GPU_SOURCES = ("simulated", "nvml", "none")


@dataclass
class SimulatedWorker:
    worker_id: int
    engines: list[SimulatedEngine]  # one per data-parallel rank
    publisher: WorkerPublisher
    services: list = field(default_factory=list)  # nats.micro services, in pull mode
    runtime: MetricsRegistry | None = None  # the worker process's MetricsRegistry
    generate: object = None  # the `generate` endpoint's handler, wrapped by EndpointMetrics
    endpoint_metrics: EndpointMetrics | None = None  # its automatic metrics
    gpus: list[SimulatedGpus] | None = None  # one set per data-parallel rank, with --gpu simulated
    hostname: str = ""


def serve_generate(endpoint: MetricsRegistry):
    """The simulated `generate` endpoint behind the automatic endpoint metrics: (handler, metrics).

    The engine already decided each request's fate; the handler answers it, so the
    endpoint metrics are the simulation's own numbers: its latency (simulated seconds),
    its failures, and bytes as 4-byte token ids in and out. Simulated requests run in
    simulated time and the handler is called when one completes, so the in-flight gauge is
    set from the engine's running requests instead (`MockFleet.tick`).
    """
    metrics = EndpointMetrics(endpoint)

    @metrics.handler
    def generate(request: bytes, completion: Completion) -> bytes:
        current_call().duration = completion.latency
        if completion.error is not None:
            raise HandlerError(completion.error, "simulated engine failure")
        return bytes(4 * completion.output_tokens)

    return generate, metrics


def answer(worker: SimulatedWorker, completion: Completion) -> None:
    try:
        worker.generate(bytes(4 * completion.prompt_tokens), completion)
    except HandlerError:
        pass  # counted by the endpoint metrics; the simulated client just sees the error


def worker_ids(count: int, rng: random.Random) -> list[int]:
    """Lease-like 63-bit ids, as Dynamo's etcd leases are; distinct for a seed."""
    ids: set[int] = set()
    while len(ids) < count:
        ids.add(rng.getrandbits(62) | (1 << 62))
    return sorted(ids)


def build_engines(
    workers: int, seed: int | None, dp_ranks: int = 1, config: EngineConfig | None = None
) -> list[tuple[int, list[SimulatedEngine]]]:
    """(worker_id, one engine per rank) for each worker; the same seed gives the same fleet."""
    rng = random.Random(seed)
    config = config or EngineConfig()
    return [
        (worker_id, [SimulatedEngine(config, random.Random(rng.getrandbits(64))) for _ in range(dp_ranks)])
        for worker_id in worker_ids(workers, rng)
    ]


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
        freeze_after: int = 0,
        component_metrics: bool = True,
        gpu: str = "none",
        gpus_per_worker: int = 1,
        gpu_interval: float = 5.0,
        gpu_source: NvmlGpuSource | None = None,
    ) -> None:
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}")
        if gpu not in GPU_SOURCES:
            raise ValueError(f"gpu must be one of {GPU_SOURCES}")
        # GPUs draw from their own stream, so a seed gives the same KV stats with or without GPUs.
        self.rng = random.Random(None if seed is None else f"{seed}/gpus")
        self.nc = nc
        self.shape = shape
        self.namespace = namespace
        self.component = component
        self.endpoint = endpoint
        self.workers = [
            SimulatedWorker(
                worker_id,
                engines,
                WorkerPublisher(nc, namespace=namespace, component=component, endpoint=endpoint,
                                worker_id=worker_id, hit_rate_on_namespace=hit_rate_on_namespace),
            )
            for worker_id, engines in build_engines(workers, seed, dp_ranks, config)
        ]
        self.dp_ranks = dp_ranks
        # After this many steps the engines hold still (0 = never): a fixed state to compare runs by.
        self.freeze_after = freeze_after
        self.steps = 0
        self.pull = False
        if component_metrics:
            for worker in self.workers:
                worker.runtime = MetricsRegistry()
                worker.generate, worker.endpoint_metrics = serve_generate(
                    worker.runtime.namespace(namespace).component(component).endpoint(endpoint))
        self.gpu = gpu
        self.gpu_interval = gpu_interval
        self.gpu_source = gpu_source if gpu_source is not None or gpu != "nvml" else NvmlGpuSource()
        if gpu == "simulated":
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
        """Advance every engine by `dt` and publish its hit-rate events and (push mode) its load."""
        frozen = bool(self.freeze_after) and self.steps >= self.freeze_after
        self.steps += not frozen
        for worker in self.workers:
            for rank, engine in enumerate(worker.engines):
                dp_rank = rank if self.dp_ranks > 1 else None
                if not frozen:
                    samples, completions = engine.step(dt)
                    if worker.generate is not None:
                        for completion in completions:
                            answer(worker, completion)
                    for sample in samples:
                        await worker.publisher.publish_hit_rate(sample.isl_blocks, sample.overlap_blocks, dp_rank)
                if self.pull:
                    continue  # the stats handler reports the load when asked
                metrics = engine.metrics(dp_rank)
                if self.shape == "nested":
                    await worker.publisher.publish_load(metrics)
                else:
                    await worker.publisher.publish_raw(protocol.KV_METRICS, self._payload(worker, metrics))
            if worker.endpoint_metrics is not None:
                # Requests run in simulated time (see serve_generate): in flight = running in the engines.
                worker.endpoint_metrics.inflight.set(sum(len(engine.running) for engine in worker.engines))

    async def serve_stats(self) -> None:
        """Pull mode: run each worker as a NATS micro service with Dynamo's naming (see `stats_service`)."""
        from .stats_service import start_worker_service

        if self.dp_ranks != 1:
            raise ValueError("pull mode reports one ForwardPassMetrics per worker endpoint: use one dp rank")
        for worker in self.workers:
            worker.services.append(await start_worker_service(
                self.nc, namespace=self.namespace, component=self.component, endpoint=self.endpoint,
                worker_id=worker.worker_id, engine=worker.engines[0]))
        self.pull = True

    async def publish_component_metrics(self) -> None:
        for worker in self.workers:
            if worker.runtime is not None:
                await worker.publisher.publish_component_metrics(worker.runtime)

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

    async def run(self, interval: float, stop: asyncio.Event, metrics_interval: float = 5.0) -> None:
        component_metrics = bool(self.workers) and self.workers[0].runtime is not None
        if self.pull:
            from fleet_protocol.service_stats import service_name, stats_subject

            log.info("serving stats", workers=len(self.workers), interval=interval, freeze_after=self.freeze_after,
                     stats_subject=stats_subject(service_name(self.namespace, self.component)))
        else:
            log.info("publishing", workers=len(self.workers), dp_ranks=self.dp_ranks, interval=interval,
                     shape=self.shape, freeze_after=self.freeze_after,
                     subject=self.workers[0].publisher.load_subject if self.workers else None,
                     component_metrics=component_metrics, metrics_interval=metrics_interval,
                     gpu=self.gpu, gpu_interval=self.gpu_interval if self.gpu != "none" else None)
        loops = [run_periodically(interval, lambda: self.tick(interval), stop)]
        if component_metrics:
            loops.append(run_periodically(metrics_interval, self.publish_component_metrics, stop))
        if self.gpu != "none":
            loops.append(run_periodically(self.gpu_interval, lambda: self.gpu_tick(self.gpu_interval), stop))
        try:
            await asyncio.gather(*loops)
        finally:
            if self.gpu == "nvml":
                await asyncio.to_thread(self.gpu_source.close)
