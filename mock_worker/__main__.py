"""`python -m mock_worker` / `llm-mock-worker`: simulate a fleet of inference workers."""

from __future__ import annotations

import asyncio
import os
import sys

import nats
import structlog

from fleet_runtime import logs
from fleet_runtime.signals import stop_event
from fleet_worker.status_server import StatusServer, StatusServerConfig

from .cli import parse_config, parser
from .config import MockWorkerConfig
from .fleet import MockFleet

# `parser` stays importable from here, where tests and the docs know it.
__all__ = ["main", "parser", "run", "status_config"]

log = structlog.get_logger("mock_worker")


def status_config(config: MockWorkerConfig) -> StatusServerConfig | None:
    """DYN_SYSTEM_PORT enables a status server for the (single) simulated worker process."""
    status = StatusServerConfig.from_env(os.environ)
    if status is not None and (config.workers != 1 or not config.component_metrics):
        raise ValueError("DYN_SYSTEM_PORT serves one worker's registry: it needs --workers 1 and component metrics")
    return status


async def run(config: MockWorkerConfig, status: StatusServerConfig | None = None) -> None:
    stop = stop_event(config.duration)
    servers = list(config.nats_urls)
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
    fleet = MockFleet(nc, workers=config.workers, namespace=config.namespace, component=config.component,
                      endpoint=config.endpoint, seed=config.seed, dp_ranks=config.dp_ranks, shape=config.shape,
                      hit_rate_on_namespace=config.hit_rate_on_namespace, freeze_after=config.freeze_after,
                      component_metrics=config.component_metrics, gpu=config.gpu,
                      gpus_per_worker=config.gpus_per_worker, gpu_interval=config.gpu_interval,
                      protocol=config.protocol, event_plane=config.event_plane,
                      event_plane_host=config.event_plane_host, discovery_file_kv=config.discovery_file_kv)
    server = None
    if status is not None:
        runtime = fleet.workers[0].runtime
        assert runtime is not None  # status_config() allows a status server only with component metrics
        server = StatusServer(runtime, status)
        port = await server.start()
        server.health.set_endpoint(config.endpoint)
        server.health.set_ready()
        log.info("status server", url=f"http://{status.host}:{port}/metrics", worker_id=fleet.workers[0].worker_id)
    try:
        await fleet.start()
        if config.mode == "pull":
            await fleet.serve_stats()
        await fleet.run(config.interval, stop, config.metrics_interval)
    finally:
        fleet.close()
        if server is not None:
            await server.stop()
        await nc.drain()


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    try:
        logs.configure()
        status = status_config(config)
    except ValueError as error:
        sys.exit(f"mock_worker: error: {error}")
    asyncio.run(run(config, status))


if __name__ == "__main__":
    main()
