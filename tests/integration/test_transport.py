"""The NATS edge in-process, against a real nats-server: direct delivery, its fallbacks, its guard."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest
from prometheus_client import CollectorRegistry

from aggregator.collectors.telemetry import Telemetry
from aggregator.edges import nats_transport as transport
from aggregator.edges.nats_transport import DirectClient, NatsSubscriber
from aggregator.ingest.pipeline import Ingest
from aggregator.state.fleet import Fleet

SUBJECT = "namespace.dynamo.component.backend.kv_metrics"


def load(worker_id: int, active: int = 10) -> bytes:
    return json.dumps({"worker_id": worker_id, "data": {
        "worker_stats": {"request_active_slots": 1, "request_total_slots": 8},
        "kv_stats": {"kv_active_blocks": active, "kv_total_blocks": 100}}}).encode()


def make_subscriber(url: str) -> tuple[NatsSubscriber, Fleet, Telemetry]:
    telemetry = Telemetry(CollectorRegistry())
    fleet = Fleet(stale_after=60)
    ingest = Ingest(fleet, telemetry.counts, namespace="dynamo", default_component="backend", max_message_bytes=65536)
    return NatsSubscriber(url, ingest, telemetry), fleet, telemetry


async def until(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def accepted(telemetry: Telemetry) -> int:
    return telemetry.counts.of("nats", "kv_metrics").accepted.value


def test_the_installed_nats_py_has_the_hook_direct_delivery_needs():
    # If a nats-py release changes Client._process_msg, the aggregator still works (callbacks) but
    # ingests ~35 % slower: this test makes such an upgrade fail loudly instead.
    assert transport.DIRECT_DELIVERY


async def test_direct_and_queued_messages_reach_the_same_state(nats_server):
    subscriber, fleet, telemetry = make_subscriber(nats_server.url)
    publisher = await nats.connect(nats_server.url)
    try:
        assert await subscriber.connect(asyncio.Event())
        assert isinstance(subscriber.nc, DirectClient) and len(subscriber.nc.direct) == len(subscriber.ingest.routes)
        direct = subscriber.nc.direct
        calls = []
        for sid, handler in list(direct.items()):
            def spy(subject, data, handler=handler):
                calls.append(subject)
                handler(subject, data)
            direct[sid] = spy
        await publisher.publish(SUBJECT, load(1, 11))
        await publisher.publish(SUBJECT, load(2, 22), headers={"Nats-Msg-Id": "x"})  # nats-py's queued path
        await publisher.flush()
        await until(lambda: accepted(telemetry) == 2)
        assert calls == [SUBJECT.encode()]  # only the message without headers went direct
        assert {k.worker_id: s.load.kv_stats.kv_active_blocks for k, s in fleet.workers.items()} == {1: 11, 2: 22}
        assert subscriber.nc.stats["in_msgs"] == 2
    finally:
        await publisher.close()
        await subscriber.close()


async def test_a_handler_that_raises_is_counted_and_the_connection_lives_on(nats_server):
    subscriber, fleet, telemetry = make_subscriber(nats_server.url)
    publisher = await nats.connect(nats_server.url)
    original = subscriber.ingest.handle
    failures = iter([RuntimeError("boom")])

    def flaky(pattern, subject, payload):
        error = next(failures, None)
        if error is not None:
            raise error
        return original(pattern, subject, payload)

    subscriber.ingest.handle = flaky  # the direct handler binds it at subscribe time
    try:
        assert await subscriber.connect(asyncio.Event())
        for worker in (1, 2):
            await publisher.publish(SUBJECT, load(worker))
        await publisher.flush()
        await until(lambda: accepted(telemetry) == 1)
        assert telemetry.nats_errors._value.get() == 1
        assert subscriber.healthy and [k.worker_id for k in fleet.workers] == [2]
    finally:
        await publisher.close()
        await subscriber.close()


@pytest.mark.parametrize("subject", [b"namespace.dynamo.component.b\xffad.kv_metrics"])
async def test_a_subject_that_is_not_utf8_does_not_break_the_parser(nats_server, subject):
    subscriber, fleet, telemetry = make_subscriber(nats_server.url)
    try:
        assert await subscriber.connect(asyncio.Event())
        reader, writer = await asyncio.open_connection("127.0.0.1", nats_server.port)
        await reader.readline()  # INFO
        payload = load(5)
        writer.write(b'CONNECT {"verbose":false}\r\nPUB ' + subject + b" " + str(len(payload)).encode() + b"\r\n"
                     + payload + b"\r\nPING\r\n")
        await writer.drain()
        await reader.readline()  # PONG
        writer.close()
        await until(lambda: accepted(telemetry) == 1)
        (key,) = fleet.workers
        assert key.component == "b\ufffdad" and subscriber.healthy
    finally:
        await subscriber.close()


async def test_without_the_hook_the_public_callback_path_is_used(nats_server, monkeypatch):
    monkeypatch.setattr(transport, "DIRECT_DELIVERY", False)
    subscriber, fleet, telemetry = make_subscriber(nats_server.url)
    publisher = await nats.connect(nats_server.url)
    try:
        assert await subscriber.connect(asyncio.Event())
        assert not isinstance(subscriber.nc, DirectClient)
        await publisher.publish(SUBJECT, load(3))
        await publisher.flush()
        await until(lambda: accepted(telemetry) == 1)
    finally:
        await publisher.close()
        await subscriber.close()


async def test_settle_returns_only_once_the_server_has_the_subscriptions(nats_server):
    # nats-py writes PING straight to the socket and SUB through its flusher task; a single flush()
    # right after subscribe() was seen answered before the server had the subscriptions.
    from fleet_runtime.nats_settle import settle

    listener = await nats.connect(nats_server.url)
    publisher = await nats.connect(nats_server.url)
    try:
        got = []

        async def on_message(msg) -> None:
            got.append(msg)

        for round_ in range(30):
            got.clear()
            subscriptions = [await listener.subscribe(f"settle.{round_}.{i}", cb=on_message) for i in range(20)]
            await settle(listener)
            for i in range(20):
                await publisher.publish(f"settle.{round_}.{i}", b"x")
            await publisher.flush()
            await until(lambda: len(got) == 20, timeout=5)
            for subscription in subscriptions:
                await subscription.unsubscribe()
    finally:
        await listener.close()
        await publisher.close()
