"""The discovery edge on etcd: a real etcd (Debian's etcd-server) on loopback, stopped, restarted, frozen.

Keys are written through etcd's own JSON gateway, as Dynamo's etcd client writes them: at the
root (`v1/...`), on a lease when a worker's.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

import fleet_protocol as protocol
from aggregator.collectors.discovery_telemetry import DiscoveryTelemetry
from aggregator.config import DiscoveryConfig
from aggregator.edges.discovery_etcd import EtcdDiscovery, WatchEnded
from aggregator.edges.discovery_store import DiscoveryView
from fleet_demo.nats_server import free_port

from ..discovery_support import (
    PUBLISHER,
    WORKER,
    RecordingSink,
    b64,
    etcd_call,
    etcd_put,
    needs_etcd,
    running,
    worker_entries,
)
from ..dynamo_runtime import EtcdServer

pytestmark = needs_etcd


def put_all(server: EtcdServer, entries: dict[str, protocol.DiscoveryEntry], lease: int = 0) -> None:
    for key, entry in entries.items():
        etcd_put(server, key, protocol.encode_discovery_entry(entry), lease)


def delete(server: EtcdServer, key: str) -> None:
    etcd_call(server, "/v3/kv/deleterange", {"key": b64(key)})


def config(*urls: str) -> DiscoveryConfig:
    return DiscoveryConfig(backend="etcd", etcd_endpoints=urls)


def stop_process(server: EtcdServer) -> None:
    """etcd ends (its data directory kept): the store is down."""
    assert server.popen is not None
    server.popen.terminate()
    server.popen.wait(10)


async def test_entries_listed_then_watched_appear_and_go(etcd_server):
    first = worker_entries()
    put_all(etcd_server, first)
    async with running(config(etcd_server.url)) as run:
        await run.until(lambda: run.sink.snapshots == 1, "the listing")
        assert run.sink.entries == first
        assert run.watcher.state().health() == {"backend": "etcd", "connected": True, "entries": 4,
                                                "last_error": None}
        assert run.metric("llm_aggregator_discovery_connected") == 1
        second = worker_entries(worker=WORKER + 1, publisher=PUBLISHER + 2)
        put_all(etcd_server, second)  # seen by the watch
        await run.until(lambda: len(run.sink.entries) == 8, "the second worker")
        assert run.sink.entries == {**first, **second}
        for key in first:
            delete(etcd_server, key)
        await run.until(lambda: len(run.sink.entries) == 4, "the first worker's keys deleted")
        assert run.sink.entries == second
        assert run.metric("llm_aggregator_discovery_entries", bucket="mdc") == 1
        assert run.sink.snapshots == 1 and run.metric("llm_aggregator_discovery_resyncs_total") == 0


async def test_other_keys_are_skipped_and_bad_values_counted(etcd_server):
    put_all(etcd_server, worker_entries("other"))
    etcd_put(etcd_server, "elsewhere/v1/instances/dynamo/backend/generate/1", b"{}")
    etcd_put(etcd_server, "v1/kv_routers/dynamo/x", b"not ours")
    ours = worker_entries()
    async with running(config(etcd_server.url)) as run:
        await run.until(lambda: run.sink.snapshots == 1, "the listing")
        assert run.sink.entries == {}
        put_all(etcd_server, worker_entries("dynamo-2", worker=WORKER + 1))  # watched, and not ours either
        bad = protocol.instance_key("dynamo", "backend", "generate", 1)
        etcd_put(etcd_server, bad, b'{"type":"Endpoint"')
        put_all(etcd_server, ours)
        await run.until(lambda: len(run.sink.entries) == 4, "our worker")
        assert run.sink.entries == ours
        assert run.metric("llm_aggregator_discovery_errors_total", reason="not_json") == 1
        assert run.metric("llm_aggregator_discovery_errors_total", reason="wrong_type") == 0
        # A good value overwritten by a bad one: no longer the store's, so deleted.
        key = next(iter(ours))
        etcd_put(etcd_server, key, b"[]")
        await run.until(lambda: key not in run.sink.entries, "the overwritten entry deleted")
        assert run.metric("llm_aggregator_discovery_errors_total", reason="wrong_type") == 1


async def test_keys_go_when_their_lease_expires(etcd_server):
    # A worker's keys on a lease of its own, kept alive until the watcher has them; then the worker
    # "is killed": no keep-alive comes, and etcd deletes the keys when the lease expires.
    lease = int(etcd_call(etcd_server, "/v3/lease/grant", {"TTL": 2})["ID"])
    entries = worker_entries()
    put_all(etcd_server, entries, lease)

    def kept_alive_and_listed() -> bool:
        assert int(etcd_call(etcd_server, "/v3/lease/keepalive", {"ID": lease})["result"].get("TTL", 0)) > 0
        return run.sink.entries == entries

    async with running(config(etcd_server.url)) as run:
        await run.until(kept_alive_and_listed, "the leased keys listed")
        await run.until(lambda: not run.sink.entries, "the keys deleted by the lease's expiry")
        assert etcd_server.entries() == {} and etcd_server.lease_ttl(lease)[1] == -1
        assert run.watcher.state().connected and run.sink.snapshots == 1


async def test_etcd_down_then_up_is_reported_and_recovered(etcd_server):
    first = worker_entries()
    put_all(etcd_server, first)
    async with running(config(etcd_server.url)) as run:
        await run.until(lambda: run.sink.snapshots == 1, "the listing")
        stop_process(etcd_server)
        await run.until(lambda: not run.watcher.state().connected, "the loss reported")
        state = run.watcher.state()
        assert state.last_error is not None and etcd_server.url in state.last_error
        assert run.sink.entries == first  # the last view stands while the store is down
        assert run.metric("llm_aggregator_discovery_connected") == 0
        await run.until(lambda: run.metric("llm_aggregator_discovery_errors_total", reason="unreachable"),
                        "a failed attempt to reconnect")
        etcd_server.start()  # the same data, the same port
        await run.until(lambda: run.watcher.state().connected, "reconnected")
        assert run.sink.entries == first and run.sink.snapshots == 2
        assert run.metric("llm_aggregator_discovery_resyncs_total") == 1
        second = worker_entries(worker=WORKER + 1, publisher=PUBLISHER + 2)
        put_all(etcd_server, second)  # watched again
        await run.until(lambda: len(run.sink.entries) == 8, "a worker registered after the restart")
        # Still unchanged entries were never put twice (RecordingSink refuses that).


async def test_entries_that_vanished_while_away_are_deleted_on_return(etcd_server):
    first = worker_entries()
    put_all(etcd_server, first)
    async with running(config(etcd_server.url)) as run:
        await run.until(lambda: run.sink.snapshots == 1, "the listing")
        stop_process(etcd_server)
        await run.until(lambda: not run.watcher.state().connected, "the loss reported")
        # The store comes back without them (rebuilt empty, or restored from an older backup).
        shutil.rmtree(os.path.join(etcd_server.data_dir, "data"))
        etcd_server.start()
        second = worker_entries(worker=WORKER + 1, publisher=PUBLISHER + 2)
        put_all(etcd_server, second)
        await run.until(lambda: run.sink.snapshots == 2, "the listing after the return")
        await run.until(lambda: run.sink.entries == second, "the vanished deleted, the new put")
        assert {key for kind, key in run.sink.changes if kind == "delete"} == set(first)


async def test_a_frozen_etcd_is_found_by_the_probe(etcd_server):
    put_all(etcd_server, worker_entries())
    async with running(config(etcd_server.url), probe_interval=0.2, request_timeout=1.0) as run:
        await run.until(lambda: run.sink.snapshots == 1, "the listing")
        assert etcd_server.popen is not None
        os.kill(etcd_server.popen.pid, signal.SIGSTOP)  # its watch stream goes silent, its socket stays open
        try:
            await run.until(lambda: not run.watcher.state().connected, "the frozen store reported")
            assert "watch_lost" in (run.watcher.state().last_error or "")
        finally:
            os.kill(etcd_server.popen.pid, signal.SIGCONT)
        await run.until(lambda: run.watcher.state().connected, "reconnected once it answers")
        assert len(run.sink.entries) == 4


async def test_an_endpoint_that_does_not_answer_gives_way_to_the_next(etcd_server):
    dead = f"http://127.0.0.1:{free_port()}"
    put_all(etcd_server, worker_entries())
    async with running(config(dead, etcd_server.url)) as run:
        await run.until(lambda: run.sink.snapshots == 1, "the listing from the second endpoint")
        assert len(run.sink.entries) == 4
        assert run.metric("llm_aggregator_discovery_errors_total", reason="unreachable") >= 1


async def test_a_watch_from_a_compacted_revision_ends_as_compacted(etcd_server):
    etcd_put(etcd_server, "v1/instances/dynamo/backend/generate/1", b"{}")
    revision = etcd_put(etcd_server, "v1/instances/dynamo/backend/generate/2", b"{}")
    etcd_call(etcd_server, "/v3/kv/compaction", {"revision": revision})
    telemetry = DiscoveryTelemetry(CollectorRegistry())
    view = DiscoveryView("dynamo", RecordingSink(), telemetry, max_entry_bytes=65536, max_entries=10)
    watcher = EtcdDiscovery(config(etcd_server.url), view, telemetry)
    watcher.revision = 1  # the view is older than what etcd keeps
    async with aiohttp.ClientSession() as session:
        with pytest.raises(WatchEnded) as ended:
            await asyncio.wait_for(watcher._follow(session, etcd_server.url, asyncio.Event()), 10)
    assert ended.value.reason == "compacted"

