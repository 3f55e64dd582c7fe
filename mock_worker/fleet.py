"""Many simulated workers in one process, each publishing through the publisher library.

Two protocols. `dynamo-1` (Dynamo 1.x), the default: every worker publishes on the event
plane (NATS or ZMQ) what its engines' steps changed (see `dynamo_events`), and registers
itself, its model card and its publishers in a file-backend discovery directory when given
one (`start`; `close` removes them); without one its capacity is published nowhere (1.x
keeps it in discovery only). `legacy` (Dynamo 0.1-0.5): in push mode every worker publishes
its ForwardPassMetrics on `kv_metrics` as JSON, and hit-rate events; in pull mode
(`serve_stats`) every worker instead runs a NATS micro service, as a Dynamo worker did,
whose stats handler returns its current metrics; hit-rate events are still pushed, since
in Dynamo the KV router published them, not the worker. GPU readings and metric
snapshots, this project's own topics, are the same in both.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import zmq
from nats.aio.client import Client

import fleet_protocol as protocol
from fleet_worker.discovery_entries import WorkerEndpoint
from fleet_worker.endpoint_metrics import EndpointMetrics, HandlerError, current_call
from fleet_worker.event_plane_worker import EventPlane, EventPlaneWorker, NatsEventPlane, ZmqEventPlane
from fleet_worker.file_kv_store import FileKvStore
from fleet_worker.nvml_sampler import NvmlGpuSource, node_hostname, read_gpus
from fleet_worker.publisher import WorkerPublisher, run_periodically
from fleet_worker.registry import MetricsRegistry

from .dynamo_events import EngineEvents, model_card
from .engine import Completion, EngineConfig, SimulatedEngine
from .gpus import SimulatedGpus

log = structlog.get_logger("mock_worker")

SHAPES = ("nested", "flat", "wrapped")
MODES = ("push", "pull")
GPU_SOURCES = ("simulated", "nvml", "none")
PROTOCOLS = ("dynamo-1", "legacy")
EVENT_PLANES = ("nats", "zmq")
# How often idle ranks are checked for a due forward-pass heartbeat (due one second after the last message).
HEARTBEAT_CHECK_S = 0.1


@dataclass
class SimulatedWorker:
    worker_id: int
    engines: list[SimulatedEngine]  # one per data-parallel rank
    publisher: WorkerPublisher
    services: list = field(default_factory=list)  # nats.micro services, in pull mode
    runtime: MetricsRegistry | None = None  # the worker process's MetricsRegistry
    # the `generate` endpoint's handler, wrapped by EndpointMetrics
    generate: Callable[[bytes, Completion], bytes] | None = None
    endpoint_metrics: EndpointMetrics | None = None  # its automatic metrics
    gpus: list[SimulatedGpus] | None = None  # one set per data-parallel rank, with --gpu simulated
    hostname: str = ""
    events: EngineEvents | None = None  # its Dynamo 1.x publishers, with the dynamo-1 protocol


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
        call = current_call()
        assert call is not None  # always inside the wrapped handler
        call.duration = completion.latency
        if completion.error is not None:
            raise HandlerError(completion.error, "simulated engine failure")
        return bytes(4 * completion.output_tokens)

    return generate, metrics


def answer(worker: SimulatedWorker, completion: Completion) -> None:
    try:
        assert worker.generate is not None  # answer() is only called for workers that serve
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
        protocol: str = "dynamo-1",
        event_plane: str = "nats",
        event_plane_host: str = "127.0.0.1",
        discovery_file_kv: str | None = None,
    ) -> None:
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}")
        if gpu not in GPU_SOURCES:
            raise ValueError(f"gpu must be one of {GPU_SOURCES}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}")
        if event_plane not in EVENT_PLANES:
            raise ValueError(f"event_plane must be one of {EVENT_PLANES}")
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
        self.protocol = protocol
        self.event_plane_name = event_plane
        self.zmq_context: zmq.Context | None = None
        self.store: FileKvStore | None = None
        if protocol == "dynamo-1":
            self._build_event_plane(event_plane, event_plane_host, discovery_file_kv, config or EngineConfig())

    def _build_event_plane(self, name: str, host: str, file_kv: str | None, config: EngineConfig) -> None:
        plane: EventPlane
        if name == "zmq":
            self.zmq_context = zmq.Context()
            plane = ZmqEventPlane(self.zmq_context, host)
        else:
            plane = NatsEventPlane(self.nc)
        self.store = FileKvStore(file_kv) if file_kv is not None else None
        card = model_card(config, self.dp_ranks)
        for worker in self.workers:
            endpoint = WorkerEndpoint(self.namespace, self.component, self.endpoint, worker.worker_id)
            publisher = EventPlaneWorker(endpoint, plane, dp_ranks=range(self.dp_ranks), store=self.store,
                                         model=card)
            worker.events = EngineEvents(publisher, worker.engines)

    async def start(self) -> None:
        """dynamo-1: register every worker in discovery and start its KV events; nothing for legacy."""
        for worker in self.workers:
            if worker.events is not None:
                await worker.events.start()

    def close(self) -> None:
        """dynamo-1: a clean stop, as Dynamo's: discovery entries deleted, publishers closed."""
        for worker in self.workers:
            if worker.events is not None:
                worker.events.close()
        if self.store is not None:
            self.store.close()
        if self.zmq_context is not None:
            self.zmq_context.term()
            self.zmq_context = None

    async def send_heartbeats(self) -> None:
        for worker in self.workers:
            if worker.events is not None:
                await worker.events.publisher.forward_passes.send_due_heartbeats()

    def _payload(self, worker: SimulatedWorker, metrics: protocol.ForwardPassMetrics) -> bytes:
        data: object
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
                    if worker.events is None:  # Dynamo 1.x has no hit-rate events
                        for sample in samples:
                            await worker.publisher.publish_hit_rate(sample.isl_blocks, sample.overlap_blocks,
                                                                    dp_rank)
                if worker.events is not None:
                    if frozen:
                        worker.events.held_still(rank)
                    else:
                        await worker.events.stepped(rank)
                    continue
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

        if self.protocol != "legacy":
            raise ValueError("pull mode serves Dynamo 0.x's stats data: it needs the legacy protocol")
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
        if self.protocol == "dynamo-1":
            first = self.workers[0].events if self.workers else None
            log.info("publishing", protocol=self.protocol, event_plane=self.event_plane_name,
                     workers=len(self.workers), dp_ranks=self.dp_ranks, interval=interval,
                     freeze_after=self.freeze_after,
                     subject_prefix=first.publisher.worker.subject_prefix
                     if first and self.event_plane_name == "nats" else None,
                     discovery_file_kv=str(self.store.root) if self.store is not None else None,
                     component_metrics=component_metrics, metrics_interval=metrics_interval,
                     gpu=self.gpu, gpu_interval=self.gpu_interval if self.gpu != "none" else None)
            if self.store is None:
                log.info("no discovery directory: capacity (total KV blocks, request slots) is published nowhere; "
                         "set --discovery-file-kv (DYN_FILE_KV) for it")
        elif self.pull:
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
        if self.protocol == "dynamo-1":
            loops.append(run_periodically(HEARTBEAT_CHECK_S, self.send_heartbeats, stop))
            if self.store is not None:
                loops.append(self.store.run_keep_alive(stop))
        try:
            await asyncio.gather(*loops)
        finally:
            if self.gpu == "nvml" and self.gpu_source is not None:
                await asyncio.to_thread(self.gpu_source.close)
