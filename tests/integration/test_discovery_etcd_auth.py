"""The discovery edge on a secured etcd: etcd's auth (user and password, its token renewed) and TLS
(a CA, a client certificate), configured as Dynamo's workers are (`ETCD_AUTH_*`).

A real etcd (Debian's etcd-server) on loopback with its auth turned on through its own gateway
(`EtcdServer.enable_auth`), or serving TLS with certificates made by the test (tests/pki.py); a
real aggregator process, or the watcher in-process as test_discovery_etcd.py runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

import fleet_protocol as protocol
from aggregator.collectors.discovery_telemetry import DiscoveryTelemetry
from aggregator.config import DiscoveryConfig
from aggregator.edges.discovery_etcd import EtcdDiscovery
from aggregator.edges.discovery_store import DiscoveryView

from ..discovery_support import (
    PUBLISHER,
    WORKER,
    RecordingSink,
    etcd_put,
    etcd_running,
    needs_etcd,
    running,
    worker_entries,
)
from ..dynamo_runtime import EtcdServer
from ..pki import write_pki
from ..support import http_get, samples, scrape, wait_until

pytestmark = needs_etcd

PASSWORD = "Etcd-Root-Pw-7f3a"  # searched for in everything the aggregator prints and shows
WRONG = "Wrong-Etcd-Pw-91c2"
MINE = {"worker_id": str(WORKER), "component": "backend", "endpoint": "generate"}


def put_all(server: EtcdServer, entries: dict[str, protocol.DiscoveryEntry]) -> None:
    for key, entry in entries.items():
        etcd_put(server, key, protocol.encode_discovery_entry(entry))


@pytest.fixture
def auth_etcd():
    """etcd with its auth on (user root), a worker's entries in it, and simple tokens that live 2 s unused."""
    with etcd_running(auth_token_ttl=2) as server:
        server.enable_auth(PASSWORD)
        put_all(server, worker_entries())
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("etcd-pki"))


def scraped(aggregator, check, what: str) -> dict:
    """The aggregator's /metrics, parsed, once `check` holds of it."""
    def attempt() -> dict | None:
        families = scrape(aggregator.url)
        return families if check(families) else None
    return wait_until(attempt, 15, what=what)


def capacity(families: dict) -> dict[int, float]:
    """llm_kv_blocks_total of the worker of worker_entries(), by rank: its model card's capacity."""
    return {int(dict(key)["dp_rank"]): value for key, value in samples(families, "llm_kv_blocks_total").items()
            if MINE.items() <= dict(key).items()}


def discovery_health(aggregator) -> dict:
    return json.loads(http_get(f"{aggregator.url}/health")[2])["discovery"]


def errors(families: dict, reason: str) -> float:
    return samples(families, "llm_aggregator_discovery_errors", "llm_aggregator_discovery_errors_total").get(
        (("reason", reason),), 0)


def etcd_args(server: EtcdServer) -> list[str]:
    return ["--discovery-backend", "etcd", "--etcd-endpoints", server.url]


def auth_config(server: EtcdServer, password: str | None = PASSWORD, username: str = "root",
                **options) -> DiscoveryConfig:
    return DiscoveryConfig(backend="etcd", etcd_endpoints=(server.url,), etcd_username=username if password else None,
                           etcd_password=password, **options)


# Auth ----------------------------------------------------------------------------------


def test_a_password_protected_etcd_is_read_with_dynamos_variables(nats_server, processes, auth_etcd):
    aggregator = processes.aggregator(nats_server.url, *etcd_args(auth_etcd),
                                      env={"ETCD_AUTH_USERNAME": "root", "ETCD_AUTH_PASSWORD": PASSWORD})
    families = scraped(aggregator, capacity, "the worker's model card read")
    assert capacity(families) == {2: 4096, 3: 4096}
    requests = {int(dict(k)["dp_rank"]): v for k, v in samples(families, "llm_requests_total_slots").items()}
    assert requests == {2: 256, 3: 256}
    assert errors(families, "auth") == 0
    assert discovery_health(aggregator) == {"backend": "etcd", "connected": True, "entries": 4, "last_error": None}
    assert PASSWORD not in aggregator.output()


def test_a_wrong_password_is_counted_and_retried_never_fatal_never_shown(nats_server, processes, auth_etcd):
    aggregator = processes.aggregator(nats_server.url, *etcd_args(auth_etcd), "--etcd-username", "root",
                                      env={"ETCD_AUTH_PASSWORD": WRONG})
    families = scraped(aggregator, lambda f: errors(f, "auth") >= 2, "two refused attempts counted")
    assert samples(families, "llm_aggregator_discovery_connected") == {(): 0}
    assert capacity(families) == {}
    health = discovery_health(aggregator)
    assert health["connected"] is False and health["last_error"].startswith(f"auth: {auth_etcd.url}: user 'root'")
    assert "invalid user ID or password" in health["last_error"]
    assert aggregator.popen.poll() is None  # still running, still retrying
    assert WRONG not in http_get(f"{aggregator.url}/health")[2].decode()
    assert WRONG not in aggregator.output() and WRONG not in http_get(f"{aggregator.url}/metrics")[2].decode()
    assert "discovery store not readable" in aggregator.output()


async def test_no_user_or_a_user_who_may_not_read_is_an_auth_error(auth_etcd):
    async with running(auth_config(auth_etcd, password=None)) as run:
        await run.until(lambda: run.metric("llm_aggregator_discovery_errors_total", reason="auth"), "refused")
        assert "etcd requires a user: set ETCD_AUTH_USERNAME" in run.watcher.state().last_error
        assert not run.watcher.state().connected and run.sink.entries == {}
    auth_etcd.add_user("nobody", "Nobody-Pw-1")  # no role: may read nothing
    async with running(auth_config(auth_etcd, password="Nobody-Pw-1", username="nobody")) as run:
        await run.until(lambda: run.metric("llm_aggregator_discovery_errors_total", reason="auth"), "refused")
        assert "user 'nobody' may not read the keys" in run.watcher.state().last_error
        assert "Nobody-Pw-1" not in repr(run.watcher.state()) + repr(auth_config(auth_etcd, password="Nobody-Pw-1"))


async def test_a_token_revoked_mid_watch_is_renewed_and_changes_still_arrive(auth_etcd):
    async with running(auth_config(auth_etcd), probe_interval=0.2, request_timeout=1.0) as run:
        await run.until(lambda: run.sink.snapshots == 1, "the listing")
        assert len(run.sink.entries) == 4 and run.watcher.gateway.tokens_issued == 1
        auth_etcd.revoke_tokens()  # the watcher's token refused from now on; a watch already made goes on
        put_all(auth_etcd, worker_entries(worker=WORKER + 1, publisher=PUBLISHER + 2))
        await run.until(lambda: len(run.sink.entries) == 8, "a change watched after the revocation")
        # The watch ends (etcd frozen, found by the probe): the listing after it is refused the old token.
        assert auth_etcd.popen is not None
        os.kill(auth_etcd.popen.pid, signal.SIGSTOP)
        try:
            await run.until(lambda: not run.watcher.state().connected, "the frozen store reported")
        finally:
            os.kill(auth_etcd.popen.pid, signal.SIGCONT)
        await run.until(lambda: run.watcher.state().connected, "read again with a new token")
        # At least one new token (a loaded machine can time out a request after SIGCONT, and a reconnection
        # to the member starts with a token of its own).
        assert run.watcher.gateway.tokens_issued >= 2
        put_all(auth_etcd, worker_entries(worker=WORKER + 2, publisher=PUBLISHER + 4))
        await run.until(lambda: len(run.sink.entries) == 12, "a change after the renewal, watched")
        assert run.metric("llm_aggregator_discovery_errors_total", reason="auth") == 0  # renewal is no error
        assert run.sink.snapshots == 2


async def test_a_watch_made_with_an_expired_token_renews_it_and_follows(auth_etcd):
    telemetry = DiscoveryTelemetry(CollectorRegistry())
    sink = RecordingSink()
    view = DiscoveryView("dynamo", sink, telemetry, max_entry_bytes=65536, max_entries=100)
    watcher = EtcdDiscovery(auth_config(auth_etcd), view, telemetry)
    stop = asyncio.Event()
    async with watcher.gateway.session(aiohttp.ClientTimeout(total=None)) as session:
        await watcher._list(session, auth_etcd.url)
        assert len(sink.entries) == 4 and watcher.gateway.tokens_issued == 1
        await asyncio.sleep(4)  # unused for twice --auth-token-ttl: etcd has dropped the token
        follow = asyncio.create_task(watcher._follow(session, auth_etcd.url, stop))
        key = protocol.instance_key("dynamo", "backend", "generate", 7)
        etcd_put(auth_etcd, key, protocol.encode_discovery_entry(protocol.InstanceEntry("dynamo", "backend",
                                                                                         "generate", 7)))
        try:
            await asyncio.wait_for(_until(lambda: key in sink.entries or follow.done()), 10)
            assert key in sink.entries, follow  # the watch was made again with a new token, not ended
            assert watcher.gateway.tokens_issued == 2
        finally:
            stop.set()
            await asyncio.wait_for(follow, 10)


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.02)


# TLS -----------------------------------------------------------------------------------


def test_mutual_tls_with_pem_text_in_dynamos_variables(nats_server, processes, pki):
    with etcd_running(pki=pki, client_cert_auth=True) as etcd:
        put_all(etcd, worker_entries())
        pem = {name: Path(path).read_text() for name, path in
               (("ca", pki["ca"][0]), ("cert", pki["client"][0]), ("key", pki["client"][1]))}
        aggregator = processes.aggregator(nats_server.url, *etcd_args(etcd), env={
            "ETCD_AUTH_CA": pem["ca"], "ETCD_AUTH_CLIENT_CERT": pem["cert"], "ETCD_AUTH_CLIENT_KEY": pem["key"]})
        families = scraped(aggregator, capacity, "the worker's model card read over mutual TLS")
        assert capacity(families) == {2: 4096, 3: 4096}
        assert discovery_health(aggregator)["connected"] is True
        key_body = pem["key"].splitlines()[1]
        assert key_body not in aggregator.output()


async def test_tls_with_a_password_and_certificate_files(pki):
    with etcd_running(pki=pki, client_cert_auth=True) as etcd:
        etcd.enable_auth(PASSWORD)
        put_all(etcd, worker_entries())
        # A client certificate with a CommonName: etcd 3.4's gateway refuses it while etcd's auth is on.
        named = auth_config(etcd, etcd_ca=pki["ca"][0], etcd_client_cert=pki["client"][0],
                            etcd_client_key=pki["client"][1])
        async with running(named) as run:
            await run.until(lambda: run.metric("llm_aggregator_discovery_errors_total", reason="auth"), "refused")
            assert "refuses a client certificate with a CommonName" in run.watcher.state().last_error
        config = auth_config(etcd, etcd_ca=pki["ca"][0], etcd_client_cert=pki["anonymous_client"][0],
                             etcd_client_key=pki["anonymous_client"][1])
        async with running(config) as run:
            await run.until(lambda: run.sink.snapshots == 1, "the listing over TLS, authenticated")
            assert len(run.sink.entries) == 4
            second = worker_entries(worker=WORKER + 1, publisher=PUBLISHER + 2)
            put_all(etcd, second)
            await run.until(lambda: len(run.sink.entries) == 8, "a change watched over TLS")


async def test_a_ca_that_did_not_sign_etcds_certificate_is_refused_and_counted(pki, tmp_path):
    other = write_pki(tmp_path, ca_name="other-ca")  # another CA altogether
    with etcd_running(pki=pki, client_cert_auth=True) as etcd:
        put_all(etcd, worker_entries())
        config = DiscoveryConfig(backend="etcd", etcd_endpoints=(etcd.url,), etcd_ca=other["ca"][0],
                                 etcd_client_cert=pki["client"][0], etcd_client_key=pki["client"][1])
        async with running(config) as run:
            await run.until(lambda: run.metric("llm_aggregator_discovery_errors_total", reason="tls"), "refused")
            state = run.watcher.state()
            assert not state.connected and run.sink.entries == {}
            assert "certificate verify failed" in state.last_error and state.last_error.startswith("tls: ")
        # The right CA, but no client certificate: etcd ends the handshake with an alert.
        async with running(DiscoveryConfig(backend="etcd", etcd_endpoints=(etcd.url,), etcd_ca=pki["ca"][0])) as run:
            await run.until(lambda: run.metric("llm_aggregator_discovery_errors_total", reason="tls"), "refused")
            state = run.watcher.state()
            assert not state.connected and run.sink.entries == {}
            assert "bad certificate" in state.last_error and state.last_error.startswith("tls: ")
