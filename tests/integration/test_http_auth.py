"""Basic auth against hostile clients, on the real aggregator process (exporter-toolkit web config).

Every malformed credential is a 401 (a password over 72 bytes used to be a 500 with a
traceback per request); an unknown user takes as long as a known one (the dummy hash used a
fixed cost 10 while real hashes use 12: 4x faster, so user names could be told apart); a flood
of wrong passwords never delays the scrapes of an authorised Prometheus.
"""

from __future__ import annotations

import base64
import http.client
import statistics
import threading
import time

import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families as parse_text

from ..support import AggregatorProcess, http_get, samples, wait_until

USER, PASSWORD = "prometheus", "scrape-pass-7"
LONG_PASSWORD = "p" * 72 + "-ignored-tail"  # compared on its first 72 bytes, as bcrypt always did


def basic(credential: bytes) -> str:
    return "Basic " + base64.b64encode(credential).decode()


def start(processes, nats_url: str, tmp_path, cost: int) -> AggregatorProcess:
    users = {USER: PASSWORD, "long": LONG_PASSWORD[:72]}
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users:\n" + "".join(
        f"  {user}: '{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()}'\n"
        for user, password in users.items()))
    aggregator = processes.add(AggregatorProcess(nats_url, "--web-config-file", str(web)))
    wait_until(lambda: http_get(f"{aggregator.url}/live")[0] == 401, 15, what="serving, auth required")
    return aggregator


def raw_status(port: int, header_lines: bytes) -> int:
    """Send a request whose header lines are raw bytes (not necessarily valid text); the status code."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", "/metrics")
        for line in header_lines.split(b"\r\n"):
            name, _, value = line.partition(b": ")
            connection.putheader(name.decode(), value)
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


MALFORMED = {
    "password over 72 bytes": basic(f"{USER}:{'x' * 100}".encode()),
    "unknown user, password over 72 bytes": basic(b"nobody:" + b"x" * 100),
    "huge password (6 KB)": basic(f"{USER}:{'x' * 6000}".encode()),
    "not base64": "Basic !!!not-base64!!!",
    "base64 without padding": "Basic " + base64.b64encode(b"prometheus:x").decode().rstrip("="),
    "no colon": basic(b"prometheus"),
    "empty": "Basic ",
    "scheme only": "Basic",
    "other scheme": "Bearer abc",
    "user not UTF-8": basic(b"\xff\xfe:" + PASSWORD.encode()),
    "password not UTF-8": basic(USER.encode() + b":\xff\xfe"),
    "NUL in password": basic(USER.encode() + b":scrape\x00pass"),
    "non-ASCII header value": "Basic caf\u00e9",
}


def test_every_malformed_credential_is_a_401_without_a_traceback(nats_server, processes, tmp_path):
    aggregator = start(processes, nats_server.url, tmp_path, cost=4)
    statuses = {}
    for case, header in MALFORMED.items():
        statuses[case] = raw_status(aggregator.port, b"Authorization: " + header.encode("utf-8"))
    assert statuses == dict.fromkeys(MALFORMED, 401)
    # A header past aiohttp's 8 KB line limit is refused by the HTTP parser itself, as a client error.
    assert 400 <= raw_status(aggregator.port, b"Authorization: Basic " + b"A" * 20_000) < 500
    # The right passwords still work, a long one compared on its first 72 bytes.
    assert http_get(f"{aggregator.url}/metrics", {"Authorization": basic(f"{USER}:{PASSWORD}".encode())})[0] == 200
    assert http_get(f"{aggregator.url}/metrics", {"Authorization": basic(f"long:{LONG_PASSWORD}".encode())})[0] == 200
    output = aggregator.output()
    assert "Traceback" not in output and "Error handling request" not in output, output
    assert aggregator.popen.poll() is None


def test_an_unknown_user_takes_as_long_as_a_known_one(nats_server, processes, tmp_path):
    # Cost 8 (~20 ms a check) so bcrypt, not HTTP, dominates; the dummy hash must follow it.
    aggregator = start(processes, nats_server.url, tmp_path, cost=8)
    times: dict[str, list[float]] = {"known": [], "unknown": []}
    for i in range(30):  # interleaved, so both paths see the same machine load
        for user in ("known", "unknown"):
            name = USER if user == "known" else f"nobody{i}"
            # A new wrong password every time: nothing can be answered from a cache.
            header = {"Authorization": basic(f"{name}:wrong-{user}-{i}".encode())}
            started = time.perf_counter()
            status, _, _ = http_get(f"{aggregator.url}/metrics", header)
            times[user].append(time.perf_counter() - started)
            assert status == 401
    ratio = statistics.median(times["unknown"]) / statistics.median(times["known"])
    print(f"median known {statistics.median(times['known']) * 1000:.1f} ms, "
          f"unknown {statistics.median(times['unknown']) * 1000:.1f} ms, ratio {ratio:.2f}")
    assert 0.5 < ratio < 2.0


@pytest.mark.timeout(180)
def test_a_flood_of_wrong_passwords_does_not_delay_an_authorised_scrape(nats_server, processes, tmp_path):
    aggregator = start(processes, nats_server.url, tmp_path, cost=10)
    good = {"Authorization": basic(f"{USER}:{PASSWORD}".encode())}
    refused_before = refusals(aggregator, good)  # checked once, then cached
    answered: list[tuple[float, int]] = []
    lock = threading.Lock()

    def wrong(i: int) -> None:
        status, _, _ = http_get(f"{aggregator.url}/health", {"Authorization": basic(f"{USER}:wrong{i}".encode())},
                                timeout=120)
        with lock:
            answered.append((time.monotonic(), status))

    flood = [threading.Thread(target=wrong, args=(i,)) for i in range(60)]
    for thread in flood:
        thread.start()
    try:
        time.sleep(0.5)  # the flood is queued
        for _ in range(5):
            assert http_get(f"{aggregator.url}/metrics", good, timeout=120)[0] == 200
        done = time.monotonic()
    finally:
        for thread in flood:
            thread.join(150)
    before = sum(1 for when, _ in answered if when <= done)
    print(f"flood answers before the 5 authorised scrapes were done: {before} of {len(answered)}")
    assert {status for _, status in answered} <= {401, 503}
    assert len(answered) == 60
    # Checked one at a time, 60 wrong passwords take ~60 bcrypt checks; the authorised scrapes
    # went through while most of them were still waiting.
    assert before < 30
    assert refusals(aggregator, good) - refused_before == 60


def refusals(aggregator: AggregatorProcess, authorization: dict) -> float:
    """llm_aggregator_http_requests_refused_total for a wrong password, summed over 401 and 503."""
    status, _, body = http_get(f"{aggregator.url}/metrics", authorization, timeout=30)
    assert status == 200
    families = {family.name: family for family in parse_text(body.decode())}
    refused = samples(families, "llm_aggregator_http_requests_refused", "llm_aggregator_http_requests_refused_total")
    return refused[(("reason", "unauthorized"),)] + refused[(("reason", "auth_busy"),)]
