"""Helpers shared by the tests: real processes on loopback, real parsers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Self

import nats
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from fleet_demo.nats_server import free_port, terminate
from fleet_runtime.nats_settle import settle

ROOT = Path(__file__).resolve().parent.parent
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05, what: str = ""):
    """Poll `predicate` until it returns something truthy; bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as error:  # noqa: BLE001 - retried until the deadline
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: {last_error}")


def in_thread(function, *args, **kwargs):
    """`function(*args, **kwargs)` run in a thread, awaited (a blocking helper inside an async test)."""
    return asyncio.to_thread(function, *args, **kwargs)


def capture_fixture(kind: type[NatsCapture]):
    """A `capture` fixture of `kind` (a NatsCapture with its own readers) on `nats_server`, closed after."""

    @pytest.fixture
    async def capture(nats_server):
        capturing = await kind().start(nats_server.url)
        yield capturing
        await capturing.close()

    return capture


def http_get(url: str, headers: dict | None = None, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def scrape(base_url: str, *, openmetrics: bool = False) -> dict:
    """Scrape /metrics and parse it with prometheus_client's parser: {family name: Metric}."""
    headers = {"Accept": OPENMETRICS} if openmetrics else {}
    status, response_headers, body = http_get(f"{base_url}/metrics", headers)
    assert status == 200, status
    text = body.decode()
    parser = parse_openmetrics if openmetrics else parse_text
    families = {}
    for family in parser(text):
        assert family.name not in families, f"duplicate family {family.name}"
        families[family.name] = family
    return families


def render_families(registry, *, openmetrics: bool = False) -> dict:
    """Render `registry` as /metrics would and parse it back with prometheus_client's parser."""
    from aggregator.exposition.encoder import encode

    body, _ = encode(registry, OPENMETRICS if openmetrics else "")
    parser = parse_openmetrics if openmetrics else parse_text
    families = {}
    for family in parser(body.decode()):
        assert family.name not in families, f"duplicate family {family.name}"
        families[family.name] = family
    return families


def slowest_answer(base_url: str, paths=("/health", "/metrics"), limit: float = 1.0) -> float:
    """Ask each path once; seconds of the slowest answer. Raises if one takes over `limit` or is not 200."""
    slowest = 0.0
    for path in paths:
        started = time.monotonic()
        status, _, _ = http_get(f"{base_url}{path}", timeout=limit)
        slowest = max(slowest, time.monotonic() - started)
        assert status == 200, (path, status)
    return slowest


def samples(families: dict, name: str, sample_name: str | None = None) -> dict[tuple, float]:
    """{sorted label items: value} of one family's samples (sample_name defaults to the family's)."""
    family = families.get(name)
    if family is None:
        return {}
    wanted = sample_name or name
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == wanted}


class Process:
    """A child process whose output goes to a temp file (read on failure), stopped by `stop()`."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix="proc-", suffix=".log")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        try:
            self.popen = subprocess.Popen(args, stdout=fd, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
        finally:
            os.close(fd)  # the child has its own copy

    def output(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        return terminate(self.popen, timeout)


class AggregatorProcess(Process):
    def __init__(self, nats_url: str, *extra: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [sys.executable, "-m", "aggregator", "--nats-url", nats_url, "--host", "127.0.0.1",
             "--port", str(self.port), *extra],
            env,
        )

    def wait_live(self) -> AggregatorProcess:
        try:
            wait_until(lambda: http_get(f"{self.url}/live")[0] == 200, 15, what="aggregator /live")
        except AssertionError:
            raise AssertionError(f"aggregator did not start:\n{self.output()}") from None
        return self

    def health(self) -> int:
        return http_get(f"{self.url}/health")[0]


def mock_worker(nats_url: str, *extra: str) -> Process:
    return Process([sys.executable, "-m", "mock_worker", "--nats-url", nats_url, *extra])


def publish(nats_url: str, messages: list[tuple[str, bytes]]) -> None:
    """Publish raw messages with a real nats-py client and flush them to the server."""
    import asyncio

    import nats

    async def send() -> None:
        nc = await nats.connect(nats_url, connect_timeout=5)
        for subject, payload in messages:
            await nc.publish(subject, payload)
        await nc.flush()
        await nc.close()

    asyncio.run(send())


class NatsCapture:
    """Every raw message on `namespace.>`, as a plain nats-py subscriber sees it; test files add
    their own ways to read what was captured."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    async def start(self, url: str) -> Self:
        self.client = await nats.connect(url)

        async def keep(message) -> None:
            self.messages.append((message.subject, message.data))

        await self.client.subscribe("namespace.>", cb=keep)
        await settle(self.client)  # one flush can return before the server holds the subscription
        return self

    async def close(self) -> None:
        await self.client.close()
