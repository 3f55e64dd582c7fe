"""Real Dynamo 1.6.1 workers (ai-dynamo-runtime, the `dynamo` test extra) registering in a secured etcd
with Dynamo's own variables, and an aggregator process given the very same ones: the worker's
capacity (its model card, read from etcd) shows on /metrics.

Dynamo 1.6.1's etcd client (`ClientOptions::default`) takes `ETCD_AUTH_USERNAME` and
`ETCD_AUTH_PASSWORD`, or else all three of `ETCD_AUTH_CA`, `ETCD_AUTH_CLIENT_CERT` and
`ETCD_AUTH_CLIENT_KEY` as PEM text (not paths): one test for each.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..discovery_support import etcd_running, needs_etcd
from ..pki import write_pki
from ..support import in_thread
from .test_dynamo_v1_aggregator import RUNTIME_CONFIG, by_rank, until

pytest.importorskip("dynamo.llm", reason="the `dynamo` test extra (ai-dynamo-runtime) is not installed")
pytest.importorskip("zmq", reason="the `dynamo` test extra (pyzmq) is not installed")

pytestmark = needs_etcd

PASSWORD = "Dynamo-Etcd-Pw-5e81"


async def capacity_shown(processes, dynamo_workers, nats_url: str, etcd_url: str, env: dict[str, str]):
    """The aggregator and a worker, both given `env`: the worker registers, its capacity must show."""
    aggregator = processes.aggregator(nats_url, "--discovery-backend", "etcd", "--etcd-endpoints", etcd_url, env=env)
    worker = await in_thread(dynamo_workers, discovery="etcd", etcd_url=etcd_url, event_plane=None, extra_env=env)
    await in_thread(worker.command, "register", **RUNTIME_CONFIG)
    mine = {"worker_id": str(worker.worker_id), "component": "backend", "endpoint": "generate"}
    families = await until(aggregator, lambda f: len(by_rank(f, "llm_kv_blocks_total", **mine)) == 2,
                           "the worker's model card, read from the secured etcd")
    assert by_rank(families, "llm_kv_blocks_total", **mine) == {0: 4096, 1: 4096}
    assert by_rank(families, "llm_requests_total_slots", **mine) == {0: 256, 1: 256}
    return aggregator


async def test_a_worker_and_the_aggregator_with_the_same_user_and_password(nats_server, processes, dynamo_workers):
    with etcd_running() as etcd:
        etcd.enable_auth(PASSWORD)  # the worker cannot register without authenticating
        env = {"ETCD_AUTH_USERNAME": "root", "ETCD_AUTH_PASSWORD": PASSWORD}
        aggregator = await capacity_shown(processes, dynamo_workers, nats_server.url, etcd.url, env)
        assert PASSWORD not in aggregator.output()


async def test_a_worker_and_the_aggregator_with_the_same_pem_variables_over_mutual_tls(
        nats_server, processes, dynamo_workers, tmp_path):
    pki = write_pki(tmp_path)
    with etcd_running(pki=pki, client_cert_auth=True) as etcd:
        env = {"ETCD_AUTH_CA": Path(pki["ca"][0]).read_text(),
               "ETCD_AUTH_CLIENT_CERT": Path(pki["client"][0]).read_text(),
               "ETCD_AUTH_CLIENT_KEY": Path(pki["client"][1]).read_text()}
        aggregator = await capacity_shown(processes, dynamo_workers, nats_server.url, etcd.url, env)
        assert env["ETCD_AUTH_CLIENT_KEY"].splitlines()[1] not in aggregator.output()
