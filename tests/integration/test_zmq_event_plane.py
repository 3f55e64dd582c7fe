"""Dynamo 1.x's ZMQ event plane: the edge's frames in-process, then a real aggregator reading real pyzmq
PUB sockets found through file discovery, and a real XSUB/XPUB broker (zmq.proxy) on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import zmq
from prometheus_client import CollectorRegistry

import fleet_protocol as protocol
from aggregator import rejects
from aggregator.collectors.dynamo_v1 import DynamoV1Collector
from aggregator.collectors.fleet_kv import FleetCollector
from aggregator.collectors.telemetry import Telemetry
from aggregator.config import ShardConfig, ZmqConfig
from aggregator.edges.zmq_event_plane import ZmqEventPlane
from aggregator.ingest.pipeline import Ingest
from aggregator.ingest.shard_filter import ShardFilter
from aggregator.state.fleet import Fleet
from fleet_protocol import (
    ActiveLoad,
    EndpointScope,
    EventChannelEntry,
    EventEnvelope,
    EventScope,
    ZmqTransport,
)
from fleet_protocol import ZmqConfig as ZmqTransportConfig
from fleet_protocol.partitions import partition

from ..support import http_get, mock_worker, render_families, samples, scrape, wait_until

WORKER = 0x5C2DB107CE3E712D
PUBLISHER = 0x1D2C3B4A5968
SUBJECT = "namespace.dynamo.component.backend.endpoint.generate.kv_metrics"


def channel(publisher: int, endpoint: str, topic: str = "kv_metrics") -> tuple[str, EventChannelEntry]:
    scope = EventScope("endpoint", EndpointScope("dynamo", "backend", "generate"))
    return (protocol.event_channel_key("dynamo", "backend", "generate", topic, publisher),
            EventChannelEntry(scope, topic, publisher, ZmqTransport(ZmqTransportConfig(endpoint))))


def load_frames(sequence: int, used: int, publisher: int = PUBLISHER, subject: str | None = None) -> list[bytes]:
    payload = protocol.encode_active_load(ActiveLoad(WORKER, 0, None, None, used))
    return protocol.encode_zmq_frames(EventEnvelope(publisher, sequence, 1, "kv_metrics", payload), subject)


def build(max_publishers: int = 4):
    registry = CollectorRegistry()
    telemetry = Telemetry(registry)
    fleet = Fleet(stale_after=60)
    ingest = Ingest(fleet, telemetry.counts, namespace="dynamo", default_component="backend",
                    max_message_bytes=4096, clock=lambda: 100.0)
    fleet_kv = FleetCollector(fleet)
    fleet.add_listener(fleet_kv.labels)
    registry.register(fleet_kv)
    registry.register(DynamoV1Collector(fleet, fleet_kv.labels, ingest.event_publishers))
    plane = ZmqEventPlane(ZmqConfig(max_publishers=max_publishers), ingest, registry)
    return plane, registry


def counted(families: dict) -> tuple[dict, dict]:
    """{kind: received}, {reason: rejected} of the event-plane kinds (ZMQ is their only source here)."""
    kinds = ("active_load", "forward_pass_metrics", "kv_events")
    received = samples(families, "llm_aggregator_messages_received", "llm_aggregator_messages_received_total")
    rejected = samples(families, "llm_aggregator_messages_rejected", "llm_aggregator_messages_rejected_total")
    found: dict[str, float] = {}
    for labels, value in rejected.items():
        if dict(labels)["kind"] in kinds and value:
            found[dict(labels)["reason"]] = found.get(dict(labels)["reason"], 0) + value
    return ({dict(k)["kind"]: v for k, v in received.items() if dict(k)["kind"] in kinds and v}, found)


def stream(families: dict, name: str) -> float:
    return samples(families, f"llm_aggregator_event_plane_{name}", f"llm_aggregator_event_plane_{name}_total")[
        (("component", "backend"), ("endpoint", "generate"), ("topic", "kv_metrics"))]


def test_frames_go_through_the_one_pipeline_and_garbage_is_counted_by_reason_never_fatal():
    plane, registry = build()
    plane.put(*channel(PUBLISHER, "tcp://127.0.0.1:5999"))
    # Published before the subscriber connected: sequences 0..4 never arrive.
    assert plane.receive(load_frames(5, 7))
    assert plane.receive(load_frames(8, 9))  # 6 and 7 lost on the way
    assert not plane.receive(load_frames(8, 9))  # the same event twice (two brokers, two planes)
    good = load_frames(9, 3)
    garbage = [
        good[:3],  # missing_field: three frames
        [*good, b"x"],  # inconsistent: five
        [good[0], b"\x01", good[2], good[3]],  # wrong_type: a publisher id of one byte
        [good[0], good[1], good[2], b"\x02" + good[3][1:]],  # out_of_range: frame version 2
        [good[0], good[1], good[2], good[3][:5] + b"\xc1" * (len(good[3]) - 5)],  # not_msgpack
        load_frames(9, 3, publisher=PUBLISHER + 1),  # inconsistent: a publisher the store does not list
        [b"kv_metrics\xff", good[1], good[2], good[3]],  # wrong_type: a topic frame that is not UTF-8
    ]
    for frames in garbage:
        assert not plane.receive(frames)
    families = render_families(registry)
    assert samples(families, "llm_kv_blocks_active") == {
        (("component", "backend"), ("dp_rank", "0"), ("endpoint", "generate"), ("worker_id", str(WORKER))): 9}
    received, rejected = counted(families)
    assert received == {"active_load": 3 + len(garbage)}
    assert rejected == {rejects.DUPLICATE: 1, "missing_field": 1, "inconsistent": 2, "wrong_type": 2,
                        "out_of_range": 1, "not_msgpack": 1}
    assert (stream(families, "unseen_events"), stream(families, "lost_events"),
            stream(families, "publisher_starts")) == (5, 2, 0)


def test_the_publisher_cap_and_bad_endpoints_are_refused_and_counted():
    plane, registry = build(max_publishers=1)
    plane.put(*channel(1, "tcp://127.0.0.1:5999"))
    plane.put(*channel(2, "tcp://127.0.0.1:6000"))  # past the cap
    plane.put(*channel(3, "ipc:///tmp/elsewhere"))  # not tcp
    assert set(plane.channels.values()) == {plane.channels[channel(1, "")[0]]}
    families = render_families(registry)
    refused = samples(families, "llm_aggregator_zmq_publishers_refused", "llm_aggregator_zmq_publishers_refused_total")
    assert refused == {(("reason", "publisher_limit"),): 1, (("reason", "bad_endpoint"),): 1,
                       (("reason", "socket_error"),): 0}
    plane.delete(channel(1, "")[0])
    plane.put(*channel(2, "tcp://127.0.0.1:6000"))  # room again
    assert [c.publisher_id for c in plane.channels.values()] == [2]
    assert samples(render_families(registry), "llm_aggregator_zmq_publishers") == {(): 1}


def test_brokers_listed_in_discovery_are_followed_bounded_and_checked():
    plane, registry = build(max_publishers=3)
    key, entry = protocol.zmq_broker_entry("dynamo", 0xB1, ["tcp://127.0.0.1:5555"],
                                           ["tcp://127.0.0.1:5556", "tcp://127.0.0.1:5557"])
    plane.put(key, entry)
    assert plane.brokers == {key: ("tcp://127.0.0.1:5556", "tcp://127.0.0.1:5557")}
    plane.put(*channel(1, "tcp://127.0.0.1:5999"))  # two XPUB endpoints and one publisher: the cap of 3
    plane.put(*channel(2, "tcp://127.0.0.1:6000"))  # past it
    assert len(plane.channels) == 1
    # Another namespace's broker, and a broker that is not a component-scoped `zmq_broker` channel: not ours.
    plane.put(*protocol.zmq_broker_entry("other", 0xB2, [], ["tcp://127.0.0.1:7000"]))
    other_key, other = protocol.zmq_broker_entry("dynamo", 0xB3, [], ["tcp://127.0.0.1:7001"])
    other.scope.component = "not_a_broker"
    plane.put(other_key, other)
    # A broker whose XPUB endpoint is not tcp://host:port.
    bad_key, bad = protocol.zmq_broker_entry("dynamo", 0xB4, [], ["ipc:///tmp/broker"])
    plane.put(bad_key, bad)
    assert list(plane.brokers) == [key]
    refused = samples(render_families(registry), "llm_aggregator_zmq_publishers_refused",
                      "llm_aggregator_zmq_publishers_refused_total")
    assert refused == {(("reason", "publisher_limit"),): 1, (("reason", "bad_endpoint"),): 1,
                       (("reason", "socket_error"),): 0}
    # Its entry changes, then goes.
    plane.put(*protocol.zmq_broker_entry("dynamo", 0xB1, [], ["tcp://127.0.0.1:5558"]))
    assert plane.brokers == {key: ("tcp://127.0.0.1:5558",)}
    plane.delete(key)
    assert plane.brokers == {} and plane._broker_endpoints == {}
    # With DYN_ZMQ_BROKER_URL the brokers are the ones it names, as for Dynamo's workers.
    named = ZmqEventPlane(ZmqConfig(broker_xpub=("tcp://127.0.0.1:5600",)), plane.feed.ingest, CollectorRegistry())
    named.put(key, entry)
    assert named.brokers == {}


def test_a_shard_subscribes_to_its_own_components_publishers_and_drops_the_others_from_a_broker():
    plane, registry = build()
    component = {partition(c, 2): c for c in ("backend", "decode", "x1", "router")}
    shard = ShardFilter(ShardConfig(count=2, index=partition("backend", 2)), "backend")
    plane.keeps = shard.keeps
    other = component[1 - partition("backend", 2)]
    scope = EventScope("endpoint", EndpointScope("dynamo", other, "generate"))
    other_key = protocol.event_channel_key("dynamo", other, "generate", "kv_metrics", PUBLISHER + 1)
    plane.put(other_key, EventChannelEntry(scope, "kv_metrics", PUBLISHER + 1,
                                           ZmqTransport(ZmqTransportConfig("tcp://127.0.0.1:6001"))))
    plane.put(*channel(PUBLISHER, "tcp://127.0.0.1:6000"))
    assert [c.subject for c in plane.channels.values()] == [SUBJECT]  # the other shard's publisher: not subscribed
    other_subject = SUBJECT.replace(".backend.", f".{other}.")
    assert not plane.receive(load_frames(0, 5, publisher=PUBLISHER + 2, subject=other_subject))  # via a broker
    assert plane.receive(load_frames(0, 6, publisher=PUBLISHER + 3, subject=SUBJECT))
    families = render_families(registry)
    assert set(samples(families, "llm_kv_blocks_active").values()) == {6}
    assert shard.skipped == 2 and counted(families)[1] == {}


# A real aggregator -----------------------------------------------------------------


def write_entry(directory: Path, key: str, entry: EventChannelEntry) -> Path:
    bucket, rest = key.split("/", 2)[1:]
    path = directory / "v1" / bucket / protocol.file_name(rest)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(protocol.encode_discovery_entry(entry))
    os.replace(temporary, path)
    return path


@contextlib.contextmanager
def pub_socket() -> Iterator[tuple[object, str]]:
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield socket, f"tcp://127.0.0.1:{port}"
    finally:
        socket.close(0)
        context.term()


def health(aggregator) -> dict:
    status, _, body = http_get(f"{aggregator.url}/health")
    assert status == 200, body
    return json.loads(body)


def connected(aggregator, mode: str = "direct") -> float:
    return samples(scrape(aggregator.url), "llm_aggregator_zmq_endpoints").get((("mode", mode),), 0)


def publish_until_seen(aggregator, socket, first_sequence: int) -> int:
    """Publish kv_metrics until the aggregator shows one (a new subscription reaches a PUB socket a little
    after the handshake); the next sequence."""
    sequence = first_sequence
    deadline = time.monotonic() + 20
    while not samples(scrape(aggregator.url), "llm_kv_blocks_active"):
        assert time.monotonic() < deadline, aggregator.output()[-3000:]
        socket.send_multipart(load_frames(sequence, 1))
        sequence += 1
        time.sleep(0.1)
    return sequence


def test_a_real_aggregator_follows_zmq_publishers_through_file_discovery(processes, nats_server, tmp_path):
    aggregator = processes.aggregator(nats_server.url, "--discovery-backend", "file", "--discovery-file-kv",
                                      str(tmp_path), "--discovery-file-scan-interval", "0.1")
    with pub_socket() as (socket, endpoint):
        key, entry = channel(PUBLISHER, endpoint)
        path = write_entry(tmp_path, key, entry)
        wait_until(lambda: connected(aggregator) == 1, 15, what="connected to the publisher")
        assert health(aggregator)["zmq"] == {"publishers": 1, "brokers": [], "connected": {"direct": 1, "broker": 0}}
        sequence = publish_until_seen(aggregator, socket, 0)
        for used in (11, 12, 13):
            socket.send_multipart(load_frames(sequence, used))
            sequence += 1
        socket.send_multipart(load_frames(sequence + 2, 21))  # two lost
        wait_until(lambda: samples(scrape(aggregator.url), "llm_kv_blocks_active") and
                   set(samples(scrape(aggregator.url), "llm_kv_blocks_active").values()) == {21}, 15,
                   what="the last value")
        families = scrape(aggregator.url)
        received, rejected = counted(families)
        # Every sequence 0..sequence+2 is accounted for: received, unseen (probes sent before the
        # subscription reached the PUB socket) or lost (the two skipped).
        unseen = stream(families, "unseen_events")
        assert received == {"active_load": sequence + 1 - unseen} and rejected == {}
        assert stream(families, "lost_events") == 2
        assert stream(families, "publisher_starts") == (1 if unseen == 0 else 0)
        assert samples(families, "llm_aggregator_zmq_publishers") == {(): 1}
        # The entry goes: the aggregator disconnects.
        path.unlink()
        wait_until(lambda: connected(aggregator) == 0, 15, what="disconnected")
        assert samples(scrape(aggregator.url), "llm_aggregator_zmq_publishers") == {(): 0}


@contextlib.contextmanager
def broker() -> Iterator[tuple[str, str]]:
    """A Dynamo-style broker: zmq.proxy between an XSUB (publishers connect) and an XPUB (subscribers)."""
    context = zmq.Context()
    xsub, xpub = context.socket(zmq.XSUB), context.socket(zmq.XPUB)
    xsub_port = xsub.bind_to_random_port("tcp://127.0.0.1")
    xpub_port = xpub.bind_to_random_port("tcp://127.0.0.1")
    thread = threading.Thread(target=_proxy, args=(xsub, xpub), daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{xsub_port}", f"tcp://127.0.0.1:{xpub_port}"
    finally:
        context.term()  # ends the proxy (ETERM), which closes its sockets
        thread.join(10)


def _proxy(xsub, xpub) -> None:
    with contextlib.suppress(zmq.ContextTerminated):
        zmq.proxy(xsub, xpub)
    xsub.close(0)
    xpub.close(0)


def test_broker_mode_reads_the_namespace_from_two_brokers_and_applies_each_event_once(processes, nats_server):
    with broker() as (xsub1, xpub1), broker() as (xsub2, xpub2):
        aggregator = processes.aggregator(nats_server.url, env={
            "DYN_ZMQ_BROKER_URL": f"xsub={xsub1};{xsub2} , xpub={xpub1};{xpub2}"})
        wait_until(lambda: connected(aggregator, "broker") == 2, 15, what="connected to both brokers")
        assert health(aggregator)["zmq"] == {"publishers": 0, "brokers": [xpub1, xpub2],
                                             "connected": {"direct": 0, "broker": 2}}
        context = zmq.Context()
        socket = context.socket(zmq.PUB)  # a publisher in broker mode: connected to every XSUB
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.connect(xsub1)
            socket.connect(xsub2)
            sequence = 0
            deadline = time.monotonic() + 20
            while not samples(scrape(aggregator.url), "llm_kv_blocks_active"):
                assert time.monotonic() < deadline, aggregator.output()[-3000:]
                socket.send_multipart(load_frames(sequence, 1, subject=SUBJECT))
                sequence += 1
                time.sleep(0.1)
            socket.send_multipart(load_frames(sequence, 30, subject=SUBJECT))
            socket.send_multipart([b"namespace.dynamo.component.backend.endpoint.generate.other-topic",
                                   *load_frames(sequence + 1, 1)[1:]])  # not a topic of ours: passed over
            socket.send_multipart([SUBJECT.encode(), *load_frames(sequence + 1, 1)[1:3], b"\x01"])  # garbage
            wait_until(lambda: set(samples(scrape(aggregator.url), "llm_kv_blocks_active").values()) == {30}, 15,
                       what="the value through the brokers")
            families = scrape(aggregator.url)
            received, rejected = counted(families)
            # Publisher-side PUB round-robins nothing: each XSUB gets every message, so each arrives twice.
            wait_until(lambda: counted(scrape(aggregator.url))[1].get("missing_field") == 2, 15,
                       what="the garbage, from both brokers")
            families = scrape(aggregator.url)
            received, rejected = counted(families)
            assert rejected.get(rejects.DUPLICATE, 0) >= 1
            assert set(rejected) <= {rejects.DUPLICATE, "missing_field"}
            assert stream(families, "lost_events") == 0
        finally:
            socket.close(0)
            context.term()


def test_the_mock_worker_over_zmq_is_found_through_file_discovery_and_dropped_when_it_stops(
        processes, nats_server, tmp_path):
    aggregator = processes.aggregator(nats_server.url, "--discovery-backend", "file", "--discovery-file-kv",
                                      str(tmp_path), "--discovery-file-scan-interval", "0.1")
    worker = processes.add(mock_worker(nats_server.url, "--protocol", "dynamo-1", "--event-plane", "zmq",
                                       "--discovery-file-kv", str(tmp_path), "--workers", "2", "--interval", "0.1",
                                       "--seed", "1"))
    # Three publishers per worker (kv_metrics, kv-events, forward-pass-metrics), each its own PUB socket.
    wait_until(lambda: connected(aggregator) == 6, 20, what=f"six ZMQ endpoints\n{worker.output()[-2000:]}")

    def both_workers():
        families = scrape(aggregator.url)
        loads = samples(families, "llm_kv_blocks_active")
        totals = samples(families, "llm_kv_blocks_total")
        return families if len(loads) == 2 and len(totals) == 2 else None

    families = wait_until(both_workers, 20, what="both mock workers' load and capacity")
    received, rejected = counted(families)
    assert received.get("active_load", 0) > 0 and received.get("forward_pass_metrics", 0) > 0
    assert rejected == {}
    assert samples(families, "llm_aggregator_zmq_publishers") == {(): 6}
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(20) == 0
    wait_until(lambda: connected(aggregator) == 0 and not samples(scrape(aggregator.url), "llm_kv_blocks_active"),
               20, what="the stopped workers gone")


def test_publishers_that_go_while_their_messages_are_being_read_leave_the_aggregator_running(
        processes, nats_server, tmp_path):
    """Entries deleted in the middle of a burst: each subscription is closed with its own socket. (One socket
    `disconnect`ed from an endpoint whose multipart message was half read made libzmq 4.3 abort the process.)"""
    aggregator = processes.aggregator(nats_server.url, "--discovery-backend", "file", "--discovery-file-kv",
                                      str(tmp_path), "--discovery-file-scan-interval", "0.05")
    context = zmq.Context()
    sockets, paths = [], []
    try:
        for index in range(20):
            socket = context.socket(zmq.PUB)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, 100_000)
            port = socket.bind_to_random_port("tcp://127.0.0.1")
            sockets.append(socket)
            paths.append(write_entry(tmp_path, *channel(PUBLISHER + index, f"tcp://127.0.0.1:{port}")))
        wait_until(lambda: connected(aggregator) == 20, 15, what="connected to 20 publishers")
        for sequence in range(2000):
            for index, socket in enumerate(sockets):
                socket.send_multipart(load_frames(sequence, sequence, publisher=PUBLISHER + index))
            if sequence == 1000:
                for path in paths:
                    path.unlink()
        wait_until(lambda: connected(aggregator) == 0, 15, what="every subscription closed")
        assert aggregator.popen.poll() is None and aggregator.health() == 200, aggregator.output()[-3000:]
    finally:
        for socket in sockets:
            socket.close(0)
        context.term()
