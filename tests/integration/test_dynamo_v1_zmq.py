"""Real Dynamo 1.6.1 workers on their DEFAULT event plane (ZMQ: no DYN_EVENT_PLANE set), found through the
discovery store they register in (file, and etcd), read by a real aggregator process.

Each worker's publishers (kv_metrics, one kv-events per rank, forward-pass-metrics) bind their own PUB socket on
loopback (DYN_EVENT_PLANE_HOST=127.0.0.1) and advertise it under `v1/event_channels/...`. PUB/SUB drops what
is sent before a subscriber connects, so each test makes the publishers first, waits for the aggregator's
handshakes (llm_aggregator_zmq_endpoints), then probes kv_metrics until a value shows: only then are the
values whose exactness is checked published. Values on /metrics are parsed with prometheus_client.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import pytest

import fleet_protocol as protocol
from fleet_worker.file_kv_store import FileKvStore

from ..discovery_support import etcd_running, needs_etcd
from ..dynamo_runtime import DynamoWorker, WorkerSettings
from ..support import in_thread, samples, scrape
from .test_dynamo_v1_aggregator import IDLE_FPM, RUNTIME_CONFIG, by_rank, until
from .test_zmq_event_plane import broker

pytest.importorskip("dynamo.llm", reason="the `dynamo` test extra (ai-dynamo-runtime) is not installed")
pytest.importorskip("zmq", reason="pyzmq is not installed")

GROUP = (("component", "backend"), ("endpoint", "generate"))
PUBLISHERS_PER_WORKER = 4  # kv_metrics, kv-events of ranks 0 and 1, forward-pass-metrics


@pytest.fixture
def zmq_workers() -> Iterator[Callable[..., DynamoWorker]]:
    """Real Dynamo workers on Dynamo's default event plane; every one is stopped after the test."""
    started: list[DynamoWorker] = []

    def start(**settings) -> DynamoWorker:
        worker = DynamoWorker(WorkerSettings(event_plane=None, **settings))
        started.append(worker)
        return worker

    yield start
    for worker in reversed(started):
        worker.stop()


def stream(families: dict, name: str, topic: str) -> float:
    return samples(families, f"llm_aggregator_event_plane_{name}", f"llm_aggregator_event_plane_{name}_total").get(
        (*GROUP, ("topic", topic)), 0)


def zmq_endpoints(families: dict, mode: str) -> float:
    return samples(families, "llm_aggregator_zmq_endpoints").get((("mode", mode),), 0)


def direct_endpoints(families: dict) -> float:
    return zmq_endpoints(families, "direct")


async def subscribed(aggregator, worker: DynamoWorker, endpoints: int, mode: str = "direct") -> None:
    """The worker's publishers made, the aggregator connected to `endpoints` of them (or of brokers), and a
    kv_metrics probe through (so that every subscription has had time to reach its PUB socket)."""
    await in_thread(worker.command, "publishers", kv_ranks=[0, 1], fpm=True)
    await until(aggregator, lambda f: zmq_endpoints(f, mode) == endpoints, f"{endpoints} ZMQ endpoints connected")
    mine = {"worker_id": str(worker.worker_id)}
    for probe in range(1, 200):
        await in_thread(worker.command, "load", dp_rank=0, kv_used_blocks=1000 + probe)
        try:
            await until(aggregator, lambda f, probe=probe: by_rank(f, "llm_kv_blocks_active", **mine).get(0) == 1000 + probe,
                        "the probe", timeout=1.0)
            return
        except AssertionError:
            continue
    raise AssertionError("no kv_metrics probe got through")


async def publish_values(worker: DynamoWorker, used: int) -> None:
    command = worker.command
    await in_thread(command, "register", **RUNTIME_CONFIG)
    await in_thread(command, "load", dp_rank=0, active_decode_blocks=5, kv_used_blocks=used)
    await in_thread(command, "load", dp_rank=1, active_decode_blocks=None, kv_used_blocks=3)
    await in_thread(command, "kv_stored", dp_rank=0, token_ids=list(range(32)), num_block_tokens=[16, 16],
                    block_hashes=[11, 12])
    await in_thread(command, "kv_removed", dp_rank=0, block_hashes=[11])
    await in_thread(command, "kv_stored", dp_rank=1, token_ids=list(range(16)), num_block_tokens=[16],
                    block_hashes=[21])
    await in_thread(command, "fpm", worker_id=str(worker.worker_id), dp_rank=0, **{
        **IDLE_FPM, "scheduled_num_prefill_requests": 1, "scheduled_sum_prefill_tokens": 100,
        "scheduled_sum_prefill_kv_tokens": 50, "wall_time_secs": 0.25})


async def exact_values(aggregator, worker: DynamoWorker, used: int) -> dict:
    mine = {"worker_id": str(worker.worker_id)}

    def complete(families: dict) -> bool:
        return (by_rank(families, "llm_kv_cached_blocks", **mine) == {0: 1, 1: 1}
                and by_rank(families, "llm_prefill_tokens_computed", "llm_prefill_tokens_computed_total",
                            **mine) == {0: 100}
                and by_rank(families, "llm_kv_blocks_active", **mine) == {0: used, 1: 3}
                and len(by_rank(families, "llm_kv_blocks_total", **mine)) == 2)

    families = await until(aggregator, complete, f"every value worker {worker.worker_id} published")
    assert by_rank(families, "llm_kv_active_decode_blocks", **mine) == {0: 5}
    assert by_rank(families, "llm_kv_blocks_total", **mine) == {0: 4096, 1: 4096}
    assert by_rank(families, "llm_kv_cached_blocks_reliable", **mine) == {0: 1, 1: 1}
    assert by_rank(families, "llm_prefill_tokens_from_cache", "llm_prefill_tokens_from_cache_total", **mine) == {0: 50}
    rejected = samples(families, "llm_aggregator_messages_rejected", "llm_aggregator_messages_rejected_total")
    assert {labels: value for labels, value in rejected.items() if value} == {}
    return families


def aggregator_args(nats_url: str, *discovery: str) -> tuple[str, ...]:
    return (nats_url, "--stale-after", "30", *discovery)


async def test_real_workers_on_their_default_event_plane_through_file_discovery(
        nats_server, processes, zmq_workers, tmp_path):
    discovery = ("--discovery-backend", "file", "--discovery-file-kv", str(tmp_path),
                 "--discovery-file-scan-interval", "0.1")
    aggregator = processes.aggregator(*aggregator_args(nats_server.url, *discovery))
    first = await in_thread(zmq_workers, file_kv=str(tmp_path))
    await subscribed(aggregator, first, PUBLISHERS_PER_WORKER)
    await publish_values(first, 7)
    families = await exact_values(aggregator, first, 7)
    # Every kv-events publisher was read from its sequence 0: none unseen, none lost.
    assert stream(families, "unseen_events", "kv-events") == 0
    assert stream(families, "publisher_starts", "kv-events") == 2
    assert set(samples(families, "llm_aggregator_event_plane_lost_events",
                       "llm_aggregator_event_plane_lost_events_total").values()) == {0}

    # A second worker joins, then is restarted: a new process, new publisher ids, counted as starts.
    second = await in_thread(zmq_workers, file_kv=str(tmp_path))
    await subscribed(aggregator, second, 2 * PUBLISHERS_PER_WORKER)
    await publish_values(second, 8)
    await exact_values(aggregator, second, 8)
    assert await in_thread(second.exit) == 0
    await until(aggregator, lambda f: direct_endpoints(f) == PUBLISHERS_PER_WORKER
                and not by_rank(f, "llm_kv_blocks_active", worker_id=str(second.worker_id)), "the second one gone")
    restarted = await in_thread(zmq_workers, file_kv=str(tmp_path))
    assert restarted.worker_id != second.worker_id
    await subscribed(aggregator, restarted, 2 * PUBLISHERS_PER_WORKER)
    await publish_values(restarted, 9)
    families = await exact_values(aggregator, restarted, 9)
    assert stream(families, "publisher_starts", "kv-events") == 6  # two ranks of three processes
    assert by_rank(families, "llm_kv_blocks_active", worker_id=str(first.worker_id)) == {0: 7, 1: 3}

    # The aggregator restarted while the workers run: it reconnects from discovery and the values resume.
    accepted = samples(families, "llm_aggregator_messages_accepted", "llm_aggregator_messages_accepted_total")
    aggregator.stop()
    aggregator = processes.aggregator(*aggregator_args(nats_server.url, *discovery))
    await until(aggregator, lambda f: direct_endpoints(f) == 2 * PUBLISHERS_PER_WORKER, "reconnected")
    families = {}
    for used in range(4, 200):  # until a subscription has reached the PUB socket: sent before, unseen
        await in_thread(first.command, "load", dp_rank=1, kv_used_blocks=used)
        try:
            families = await until(aggregator, lambda f, used=used: by_rank(
                f, "llm_kv_blocks_active", worker_id=str(first.worker_id)) == {1: used},
                                   "the first worker's next value", timeout=1.0)
            break
        except AssertionError:
            continue
    # What the first aggregator took of kv_metrics from both live publishers was sent before this one connected.
    assert accepted[(("kind", "active_load"),)] > 0
    assert stream(families, "unseen_events", "kv_metrics") > 0
    assert stream(families, "lost_events", "kv_metrics") == 0


@needs_etcd
async def test_real_workers_on_their_default_event_plane_through_etcd(nats_server, processes, zmq_workers):
    with etcd_running() as etcd:
        aggregator = processes.aggregator(*aggregator_args(nats_server.url, "--discovery-backend", "etcd",
                                                           "--etcd-endpoints", etcd.url))
        worker = await in_thread(zmq_workers, discovery="etcd", etcd_url=etcd.url)
        await subscribed(aggregator, worker, PUBLISHERS_PER_WORKER)
        await publish_values(worker, 7)
        families = await exact_values(aggregator, worker, 7)
        assert stream(families, "unseen_events", "kv-events") == 0
        assert await in_thread(worker.exit) == 0
        families = await until(aggregator, lambda f: direct_endpoints(f) == 0
                               and samples(f, "llm_workers") == {GROUP: 0}, "the stopped worker gone")
        assert samples(families, "llm_aggregator_zmq_publishers") == {(): 0}
        assert scrape(aggregator.url)  # still serving


@contextlib.contextmanager
def kept_alive(store: FileKvStore) -> Iterator[FileKvStore]:
    """Its entries' files touched every second (Dynamo's processes delete one left 10 s), removed at the end."""
    stop = threading.Event()

    def touch() -> None:
        while not stop.wait(1.0):
            store.keep_alive()

    thread = threading.Thread(target=touch, daemon=True)
    thread.start()
    try:
        yield store
    finally:
        stop.set()
        thread.join(5)
        store.close()


async def test_real_workers_through_a_broker_they_find_in_discovery(nats_server, processes, zmq_workers, tmp_path):
    """DYN_ZMQ_BROKER_ENABLED=true: the workers look up the broker in the store (a channel of component
    `zmq_broker`, as Dynamo's broker registers itself), publish through it and register no channel of
    their own; the aggregator, given the store alone, reads the namespace from the same broker."""
    with broker() as (xsub, xpub), kept_alive(FileKvStore(tmp_path)) as store:
        key, entry = protocol.zmq_broker_entry("dynamo", 0xB0, [xsub], [xpub])
        store.put(key, protocol.encode_discovery_entry(entry))
        aggregator = processes.aggregator(*aggregator_args(
            nats_server.url, "--discovery-backend", "file", "--discovery-file-kv", str(tmp_path),
            "--discovery-file-scan-interval", "0.1"))
        worker = await in_thread(zmq_workers, file_kv=str(tmp_path), extra_env={"DYN_ZMQ_BROKER_ENABLED": "true"})
        await subscribed(aggregator, worker, 1, mode="broker")
        await publish_values(worker, 7)
        families = await exact_values(aggregator, worker, 7)
        assert samples(families, "llm_aggregator_zmq_publishers") == {(): 0}  # no channel: all through the broker
        assert direct_endpoints(families) == 0
        # The broker's entry goes: the aggregator leaves it.
        store.delete(key)
        await until(aggregator, lambda f: zmq_endpoints(f, "broker") == 0, "the broker left")
