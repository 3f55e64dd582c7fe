"""`python -m mock_worker` / `llm-mock-worker`: simulate a fleet of inference workers."""

from __future__ import annotations

import asyncio
import os
import sys

import nats
import structlog

import fleet_protocol as protocol
from fleet_runtime import logs
from fleet_runtime.flags import (
    OneLineParser,
    bounded,
    choice,
    env_flag,
    label_value,
    nats_token,
    nats_urls,
)
from fleet_runtime.signals import stop_event
from fleet_worker.status_server import StatusServer, StatusServerConfig

from .fleet import GPU_SOURCES, MODES, SHAPES, MockFleet

log = structlog.get_logger("mock_worker")


def parser() -> OneLineParser:
    p = OneLineParser(prog="mock_worker", description="Simulated LLM inference workers publishing over NATS.")
    env_flag(p, "--nats-url", "NATS_SERVER", "nats://localhost:4222", nats_urls, "NATS server URL(s)")
    env_flag(p, "--namespace", "DYN_NAMESPACE", protocol.DEFAULT_NAMESPACE, nats_token, "Dynamo namespace")
    env_flag(p, "--component", "MOCK_WORKER_COMPONENT", protocol.DEFAULT_COMPONENT, nats_token, "component name")
    env_flag(p, "--endpoint", "MOCK_WORKER_ENDPOINT", protocol.DEFAULT_ENDPOINT, label_value, "endpoint name")
    env_flag(p, "--workers", "MOCK_WORKER_COUNT", 4, bounded(int, 1, 100_000), "simulated workers in this process")
    env_flag(p, "--dp-ranks", "MOCK_WORKER_DP_RANKS", 1, bounded(int, 1, 64), "data-parallel ranks per worker")
    env_flag(p, "--interval", "MOCK_WORKER_INTERVAL", 1.0, bounded(float, 0.01, 3600.0),
             "seconds between stats messages (simulated time advances by the same amount)")
    env_flag(p, "--seed", "MOCK_WORKER_SEED", None, int, "random seed; the same seed gives the same run")
    p.add_argument("--shape", choices=SHAPES, default="nested",
                   help="ForwardPassMetrics shape to send (all three are Dynamo's); default nested")
    p.add_argument("--hit-rate-on-namespace", action="store_true",
                   help="publish hit-rate events on namespace.{ns}.kv-hit-rate as Dynamo's router does")
    env_flag(p, "--mode", "MOCK_WORKER_MODE", "push", _mode,
             "push: publish kv_metrics; pull: serve it as NATS micro service stats, Dynamo-style")
    env_flag(p, "--freeze-after", "MOCK_WORKER_FREEZE_AFTER", 0, bounded(int, 0, 10**9),
             "simulated steps after which the engines hold still and stop producing hit-rate events "
             "(0 = never); a fixed state to compare runs by")
    env_flag(p, "--gpu", "MOCK_WORKER_GPU", "simulated", choice(GPU_SOURCES),
             "GPU readings to publish on ...gpu_metrics: simulated (follow the simulated load), "
             "nvml (this host's GPUs through NVML; none found = empty reports with the reason), none")
    env_flag(p, "--gpus-per-worker", "MOCK_WORKER_GPUS_PER_WORKER", 1, bounded(int, 1, protocol.MAX_GPUS_PER_MESSAGE),
             "simulated GPUs per worker (per data-parallel rank)")
    env_flag(p, "--gpu-interval", "MOCK_WORKER_GPU_INTERVAL", 5.0, bounded(float, 0.05, 3600.0),
             "seconds between GPU readings; keep it below the aggregator's --stale-after")
    env_flag(p, "--duration", "MOCK_WORKER_DURATION", 0.0, bounded(float, 0.0, 10_000_000.0),
             "stop after this many seconds (0 = run until interrupted)")
    env_flag(p, "--metrics-interval", "MOCK_WORKER_METRICS_INTERVAL", 5.0, bounded(float, 0.05, 3600.0),
             "seconds between MetricsRegistry snapshots (namespace.{ns}.component.{c}.metrics)")
    p.add_argument("--no-component-metrics", dest="component_metrics", action="store_false",
                   help="serve no MetricsRegistry: no endpoint metrics, no snapshots, no status server")
    return p


def _mode(value: str) -> str:
    if value not in MODES:
        raise ValueError(f"{value!r} is not one of {', '.join(MODES)}")
    return value


def status_config(args) -> StatusServerConfig | None:
    """DYN_SYSTEM_PORT enables a status server for the (single) simulated worker process."""
    config = StatusServerConfig.from_env(os.environ)
    if config is not None and (args.workers != 1 or not args.component_metrics):
        raise ValueError("DYN_SYSTEM_PORT serves one worker's registry: it needs --workers 1 and component metrics")
    return config


async def run(args, status: StatusServerConfig | None = None) -> None:
    stop = stop_event(args.duration)
    servers = args.nats_url.split(",")
    while not stop.is_set():
        try:
            nc = await nats.connect(servers=servers, name="mock-worker", max_reconnect_attempts=-1,
                                    reconnect_time_wait=1)
            break
        except Exception as error:  # noqa: BLE001 - NATS not up yet: keep trying
            log.warning("NATS not reachable yet; retrying", servers=servers, error=str(error) or type(error).__name__)
            await asyncio.sleep(1)
    else:
        return
    fleet = MockFleet(nc, workers=args.workers, namespace=args.namespace, component=args.component,
                      endpoint=args.endpoint, seed=args.seed, dp_ranks=args.dp_ranks, shape=args.shape,
                      hit_rate_on_namespace=args.hit_rate_on_namespace, freeze_after=args.freeze_after,
                      component_metrics=args.component_metrics, gpu=args.gpu,
                      gpus_per_worker=args.gpus_per_worker, gpu_interval=args.gpu_interval)
    server = None
    if status is not None:
        server = StatusServer(fleet.workers[0].runtime, status)
        port = await server.start()
        server.health.set_endpoint(args.endpoint)
        server.health.set_ready()
        log.info("status server", url=f"http://{status.host}:{port}/metrics", worker_id=fleet.workers[0].worker_id)
    try:
        if args.mode == "pull":
            await fleet.serve_stats()
        await fleet.run(args.interval, stop, args.metrics_interval)
    finally:
        if server is not None:
            await server.stop()
        await nc.drain()


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.mode == "pull" and args.dp_ranks != 1:
        p.error("argument --dp-ranks: pull mode serves one ForwardPassMetrics per worker endpoint; use 1")
    try:
        logs.configure()
        status = status_config(args)
    except ValueError as error:
        sys.exit(f"mock_worker: error: {error}")
    asyncio.run(run(args, status))


if __name__ == "__main__":
    main()
