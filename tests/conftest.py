from __future__ import annotations

from collections.abc import Callable, Iterator

import nats
import pytest

from fleet_demo.nats_server import NatsServer

from .discovery_support import etcd_running
from .dynamo_runtime import DynamoWorker, EtcdServer, WorkerSettings
from .support import AggregatorProcess, Process, wait_until


@pytest.fixture
def nats_server():
    """A real nats-server on a free loopback port, stopped after the test."""
    server = NatsServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nc(nats_server):
    """A nats-py client of `nats_server`, closed after the test."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
def processes():
    """Start child processes through this; every one is stopped after the test."""
    started: list[Process] = []

    class Starter:
        def aggregator(self, nats_url: str, *extra: str, env: dict | None = None,
                       ready: bool = True) -> AggregatorProcess:
            """Started and live; with `ready`, also subscribed (/health 200), so that nothing published
            from then on is missed. `ready=False` for a test whose aggregator must not reach NATS."""
            process = AggregatorProcess(nats_url, *extra, env=env)
            started.append(process)
            process.wait_live()
            if ready:
                try:
                    wait_until(lambda: process.health() == 200, 15, what="aggregator subscribed")
                except AssertionError:
                    raise AssertionError(f"aggregator not ready:\n{process.output()[-4000:]}") from None
            return process

        def add(self, process: Process) -> Process:
            started.append(process)
            return process

    yield Starter()
    for process in reversed(started):
        process.stop()


@pytest.fixture
def dynamo_workers() -> Iterator[Callable[..., DynamoWorker]]:
    """Start real Dynamo workers through this; every one is stopped after the test."""
    started: list[DynamoWorker] = []

    def start(**settings) -> DynamoWorker:
        worker = DynamoWorker(WorkerSettings(**settings))
        started.append(worker)
        return worker

    yield start
    for worker in reversed(started):
        worker.stop()


@pytest.fixture
def etcd_server() -> Iterator[EtcdServer]:
    """A real etcd on loopback (Debian's etcd-server), stopped after the test; mark the test `needs_etcd`."""
    with etcd_running() as server:
        yield server
