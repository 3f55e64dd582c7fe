"""NATS authentication/TLS and HTTP TLS/basic auth, against a nats-server that requires each."""

from __future__ import annotations

import base64
import json
import os
import ssl
import urllib.request

import bcrypt
import nkeys
import pytest

from fleet_demo.nats_server import NatsServer

from ..pki import write_pki
from ..support import ROOT, http_get, samples, scrape, wait_until

PERMISSIONS = ROOT / "deploy" / "nats-server" / "permissions.conf"
NESTED = {"worker_stats": {"request_active_slots": 3, "request_total_slots": 8},
          "kv_stats": {"kv_active_blocks": 30, "kv_total_blocks": 100}}


def load(worker_id):
    return json.dumps({"worker_id": worker_id, "data": NESTED}).encode()


def publish_as(url, messages, **auth):
    import asyncio

    import nats

    async def send():
        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False, **auth)
        for subject, payload in messages:
            await nc.publish(subject, payload)
        await nc.flush()
        await nc.close()

    asyncio.run(send())


def assert_no_secret(aggregator, *secrets):
    _, _, health = http_get(f"{aggregator.url}/health")
    for secret in secrets:
        assert secret not in aggregator.output()
        assert secret not in health.decode()


def test_user_password_with_least_permissions_from_deploy_config(processes):
    with NatsServer(config=str(PERMISSIONS)) as server:
        aggregator = processes.aggregator(server.url, "--nats-user", "aggregator",
                                          env={"NATS_PASSWORD": "aggregator-secret-1"})
        publish_as(server.url, [
            ("namespace.dynamo.component.backend.kv_metrics", load(1)),
            ("namespace.dynamo.component.prefill.kv_metrics", load(2)),  # not this worker's subject: denied
        ], user="worker", password="worker-secret-1")
        publish_as(server.url, [("namespace.dynamo.kv-hit-rate", b'{"worker_id":1,"isl_blocks":4,"overlap_blocks":2}')],
                   user="router", password="router-secret-1")
        wait_until(lambda: samples(scrape(aggregator.url), "llm_kv_hit_rate_isl_blocks",
                                   "llm_kv_hit_rate_isl_blocks_total"), 10, what="router event")
        active = samples(scrape(aggregator.url), "llm_kv_blocks_active")
        assert {dict(k)["worker_id"] for k in active} == {"1"}
        assert_no_secret(aggregator, "aggregator-secret-1")

        # Wrong password in a URL: not ready, and neither the password nor the URL's userinfo is logged.
        wrong = processes.aggregator(server.url.replace("nats://", "nats://aggregator:wrong-secret-9@"), ready=False)
        wait_until(lambda: "Authorization Violation" in wrong.output(), 10, what="auth failure logged")
        assert wrong.health() == 503
        assert_no_secret(wrong, "wrong-secret-9")


def test_token(processes, tmp_path):
    config = tmp_path / "token.conf"
    config.write_text('authorization { token: "tok-s3cret-42" }\n')
    secret_file = tmp_path / "token"
    secret_file.write_text("tok-s3cret-42\n")
    with NatsServer(config=str(config)) as server:
        refused = processes.aggregator(server.url, ready=False)
        aggregator = processes.aggregator(server.url, "--nats-token", f"@{secret_file}")
        wait_until(lambda: "Authorization Violation" in refused.output(), 10, what="no token refused")
        assert refused.health() == 503
        assert_no_secret(aggregator, "tok-s3cret-42")


def test_nkey_seed(processes, tmp_path):
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    config = tmp_path / "nkey.conf"
    config.write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    with NatsServer(config=str(config)) as server:
        aggregator = processes.aggregator(server.url, env={"NATS_NKEY_SEED_FILE": str(seed_file)})
        assert_no_secret(aggregator, seed.decode())


# TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA with a server and a client certificate (files)."""
    return write_pki(tmp_path_factory.mktemp("pki"))


def test_mutual_tls_to_nats(processes, pki, tmp_path):
    ca, _ = pki["ca"]
    cert, key = pki["server"]
    config = tmp_path / "tls.conf"
    config.write_text(f'tls {{ cert_file: "{cert}"\n key_file: "{key}"\n ca_file: "{ca}"\n verify: true }}\n')
    client_cert, client_key = pki["client"]
    with NatsServer(config=str(config)) as server:
        url = server.url.replace("nats://", "tls://")
        without_cert = processes.aggregator(url, "--nats-tls-ca", ca, ready=False)
        aggregator = processes.aggregator(url, env={"NATS_TLS_CA": ca, "NATS_TLS_CERT": client_cert,
                                                    "NATS_TLS_KEY": client_key})
        assert without_cert.health() == 503  # the server requires a client certificate
        context = ssl.create_default_context(cafile=ca)
        context.load_cert_chain(client_cert, client_key)
        publish_as(url, [("namespace.dynamo.component.backend.kv_metrics", load(5))], tls=context)
        wait_until(lambda: samples(scrape(aggregator.url), "llm_kv_blocks_active"), 10, what="message over TLS")


# HTTP ----------------------------------------------------------------------------------


def test_http_tls_and_basic_auth_from_a_web_config_file(nats_server, processes, pki, tmp_path):
    cert, key = pki["server"]
    ca, _ = pki["ca"]
    hashed = bcrypt.hashpw(b"scrape-pass-7", bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                   f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    aggregator = processes.add(__import__("tests.support", fromlist=["AggregatorProcess"]).AggregatorProcess(
        nats_server.url, "--web-config-file", str(web)))
    base = f"https://127.0.0.1:{aggregator.port}"
    context = ssl.create_default_context(cafile=ca)

    def get(path, user=None, password=None):
        request = urllib.request.Request(base + path)
        if user:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, context=context, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    wait_until(lambda: get("/live")[0] == 401, 15, what="https up, auth required")
    assert get("/metrics", "prometheus", "wrong")[0] == 401
    assert get("/metrics", "nobody", "scrape-pass-7")[0] == 401
    status, body = get("/metrics", "prometheus", "scrape-pass-7")
    assert status == 200 and b"llm_aggregator_messages_received" in body
    assert get("/health", "prometheus", "scrape-pass-7")[0] == 200
    with pytest.raises(OSError):  # plain HTTP is not served
        http_get(f"http://127.0.0.1:{aggregator.port}/live", timeout=2)
    assert "scrape-pass-7" not in aggregator.output()


@pytest.mark.parametrize("content,expected", [
    ("basic_auth_users:\n  u: plaintext\n", "not a bcrypt hash"),
    ("tls_server_config:\n  cert_file: nope.crt\n", "needs cert_file and key_file"),
    ("tls_sever_config: {}\n", "unknown keys"),
])
def test_bad_web_config_fails_at_start_with_one_line(tmp_path, content, expected):
    import subprocess
    import sys

    web = tmp_path / "web.yml"
    web.write_text(content)
    result = subprocess.run([sys.executable, "-m", "aggregator", "--web-config-file", str(web)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr
