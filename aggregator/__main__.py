"""`python -m aggregator` / `llm-aggregator`: run the aggregation service."""

from __future__ import annotations

import asyncio
import gc
import sys

import structlog
from prometheus_client import disable_created_metrics

from aggregator.cli import parse_config
from aggregator.service import Aggregator
from fleet_runtime import logs
from fleet_runtime.signals import stop_event


async def _serve(aggregator: Aggregator) -> None:
    # Everything allocated so far (modules, the app) lives as long as the process: move it out of
    # the cyclic GC's reach, so collections during ingest do not keep rescanning it (+5-8 % ingest).
    gc.freeze()
    await aggregator.run(stop_event())


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    try:
        logs.configure()
    except ValueError as error:
        sys.exit(f"aggregator: error: {error}")
    # `_created` series double the series count and Prometheus < 2.55 stores them as plain gauges.
    disable_created_metrics()
    try:
        aggregator = Aggregator(config)
    except (OSError, ValueError) as error:  # an unreadable or corrupt hit-rate snapshot
        sys.exit(f"aggregator: error: {error}")
    try:
        asyncio.run(_serve(aggregator))
    except OSError as error:  # the HTTP port could not be bound
        structlog.get_logger("aggregator").error("cannot serve HTTP", host=config.http.host, port=config.http.port,
                                                 error=str(error))
        sys.exit(1)


if __name__ == "__main__":
    main()
