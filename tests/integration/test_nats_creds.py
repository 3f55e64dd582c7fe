"""`.creds` authentication (`--nats-creds`) against a nats-server in operator (JWT) mode.

The operator, account and user NKeys are generated here and the JWTs signed by hand
(tests/nats_jwt.py); the server resolves accounts from memory (`resolver: MEMORY` with
`resolver_preload`), as an `nsc`-managed deployment would from its resolver.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fleet_demo.nats_server import NatsServer

from .. import nats_jwt
from ..support import samples, scrape, wait_until

SUBJECT = "namespace.dynamo.component.backend.kv_metrics"
NESTED = {"worker_stats": {"request_active_slots": 3, "request_total_slots": 8},
          "kv_stats": {"kv_active_blocks": 30, "kv_total_blocks": 100}}
# The aggregator role of deploy/nats-server/permissions.conf, carried in the user JWT.
AGGREGATOR_PERMISSIONS = {"pub": {"allow": ["$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "$SRV.STATS.>"]},
                          "sub": {"allow": ["namespace.dynamo.>", "_INBOX.>"]}}


@pytest.fixture(scope="module")
def operator_mode(tmp_path_factory):
    """A nats-server trusting one operator; accounts `fleet` and `SYS` preloaded; creds files for users."""
    directory = tmp_path_factory.mktemp("jwt")
    op, fleet, system = nats_jwt.operator(), nats_jwt.account(), nats_jwt.account()
    config = directory / "operator.conf"
    config.write_text(nats_jwt.server_config(op, {
        fleet.public: nats_jwt.account_jwt(op, fleet, "fleet"),
        system.public: nats_jwt.account_jwt(op, system, "SYS"),
    }, system_account=system.public))

    def creds_file(name: str, account: nats_jwt.Identity, seed_of: nats_jwt.Identity | None = None, **permissions):
        usr = nats_jwt.user()
        jwt = nats_jwt.user_jwt(account, usr, name, **permissions)
        path = directory / f"{name}.creds"
        path.write_text(nats_jwt.creds(jwt, (seed_of or usr).seed))
        return path, usr.seed.decode()

    files = {
        "aggregator": creds_file("aggregator", fleet, **AGGREGATOR_PERMISSIONS),
        "worker": creds_file("worker", fleet, pub={"allow": [SUBJECT]}, sub={"allow": ["_INBOX.>"]}),
        # Signed by an account the server does not know.
        "unknown_account": creds_file("stranger", nats_jwt.account()),
        # A valid JWT with someone else's seed: the server's nonce signature check fails.
        "wrong_seed": creds_file("impostor", fleet, seed_of=nats_jwt.user()),
    }
    with NatsServer(config=str(config)) as server:
        yield server, files


def publish_with_creds(url: str, creds: str, messages) -> None:
    import asyncio

    import nats

    async def send():
        nc = await nats.connect(url, user_credentials=creds, connect_timeout=5, allow_reconnect=False)
        for subject, payload in messages:
            await nc.publish(subject, payload)
        await nc.flush()
        await nc.close()

    asyncio.run(send())


def test_the_aggregator_connects_with_a_creds_file_and_receives_a_workers_messages(operator_mode, processes):
    server, files = operator_mode
    creds, seed = files["aggregator"]
    by_flag = processes.aggregator(server.url, "--nats-creds", str(creds))
    by_env = processes.aggregator(server.url, env={"NATS_CREDS": str(creds)})
    worker_creds, _ = files["worker"]
    publish_with_creds(server.url, str(worker_creds),
                       [(SUBJECT, json.dumps({"worker_id": 7, "data": NESTED}).encode())])
    for aggregator in (by_flag, by_env):
        wait_until(lambda aggregator=aggregator: {dict(k)["worker_id"] for k in samples(scrape(aggregator.url),
                                                                                 "llm_kv_blocks_active")}
                   == {"7"}, 10, what="the worker's message, across the JWT-authenticated account")
        output = aggregator.output()
        assert "nats_auth=['creds']" in output  # the method is named...
        assert seed not in output and "BEGIN NATS USER JWT" not in output  # ...the secret is not


@pytest.mark.parametrize("case", ["missing", "unknown_account", "wrong_seed"])
def test_wrong_or_missing_creds_are_refused_with_a_clear_log_line_and_503(operator_mode, processes, case):
    server, files = operator_mode
    extra = [] if case == "missing" else ["--nats-creds", str(files[case][0])]
    refused = processes.aggregator(server.url, *extra, ready=False)
    wait_until(lambda: "Authorization Violation" in refused.output(), 15, what="the refusal logged")
    lines = [x for x in refused.output().splitlines() if "Authorization Violation" in x]
    assert "[warning" in lines[0] and "NATS error" in lines[0], lines[0]
    assert refused.health() == 503
    assert len(lines) <= 3  # the client retries for ever; the log line is rate-limited
    if case != "missing":
        assert files[case][1] not in refused.output()


def test_a_creds_file_that_cannot_be_read_stops_the_start_with_one_line(tmp_path):
    missing = tmp_path / "nope.creds"
    result = subprocess.run([sys.executable, "-m", "aggregator", "--nats-creds", str(missing)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--nats-creds" in result.stderr and str(missing) in result.stderr, \
        result.stderr
