"""`python -m bench`: ingest, freshness, scrape cost and memory of the aggregator, side by side
with the bare nats-py ceiling and a real Prometheus Pushgateway, all in one run on loopback.

Every figure is a median over repeats with its (min..max) spread; ratios compare figures of
the same run, because these machines are noisy. The table is printed and written to
bench/RESULTS.md (or --output). `--quick` runs everything at toy size (the test suite's
smoke test), so the benchmark cannot rot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nats
from prometheus_client.parser import text_string_to_metric_families

import fleet_protocol as protocol
from fleet_demo.nats_server import NatsServer, free_port, nats_server_binary, terminate, wait_for_port
from fleet_protocol import __version__

from . import payloads

ROOT = Path(__file__).resolve().parent.parent
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


@dataclass
class Sizes:
    ingest_workers: tuple[int, ...]
    ingest_messages: int
    repeats: int
    freshness_rate: int
    freshness_workers: int
    freshness_seconds: float
    scrape_workers: tuple[int, ...]
    scrape_repeats: int
    churn_workers: int
    churn_wave: int
    push_groups: int
    push_seconds: float
    push_max: int
    poll: float  # seconds between polls of the accepted-messages counter
    # Dynamo 1.x
    v1_workers: int = 1000  # kv_metrics envelopes, beside the bare ceiling
    kv_batches: int = 20_000  # kv-events messages of `kv_batch_blocks` stored + as many removed
    kv_batch_blocks: int = 64
    tracked_workers: int = 10_000  # 1.x workers with a load, a forward pass and one cached block
    block_workers: int = 100  # ... then this many with `blocks_per_worker` cached blocks
    blocks_per_worker: int = 10_000


FULL = Sizes((100, 1000, 10_000), 200_000, 3, 10_000, 1000, 8.0, (100, 1000, 10_000), 5, 100_000, 10_000,
             1000, 20.0, 20_000, 0.05)
QUICK = Sizes((10, 50), 2000, 2, 500, 20, 1.5, (10, 50), 2, 2000, 500, 50, 1.0, 200, 0.005,
              v1_workers=50, kv_batches=1000, tracked_workers=200, block_workers=5, blocks_per_worker=2000)


# -- processes ------------------------------------------------------------------------------


class Child:
    """A benchmark child process speaking line by line on stdin/stdout."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.stdin, self.stdout = self.popen.stdin, self.popen.stdout

    def expect(self, word: str) -> None:
        line = self.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"{self.popen.args!r}: expected {word!r}, got {line!r}")

    def go(self) -> float:
        started = time.time()
        self.stdin.write("go\n")
        self.stdin.flush()
        return started

    def result(self, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                self.popen.wait(30)
                return json.loads(line)
        raise RuntimeError(f"{self.popen.args!r}: no result")

    def stop(self) -> None:
        terminate(self.popen)


class AggregatorUnderTest:
    def __init__(self, nats_url: str, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "aggregator", "--nats-url", nats_url, "--host", "127.0.0.1",
             "--port", str(self.port), "--stale-after", "3600", *extra],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "DYN_LOG": "warn"},
        )
        wait_for_port("127.0.0.1", self.port, 15)
        deadline = time.monotonic() + 15
        while self.health() != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("aggregator never became ready")
            time.sleep(0.05)

    def health(self) -> int:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status
        except Exception:  # noqa: BLE001 - not up yet
            return 0

    def get(self, query: str = "", accept: str = "", gzip: bool = False, path: str = "/metrics") -> tuple[float, bytes]:
        headers = {"Accept": accept} if accept else {}
        if gzip:
            headers["Accept-Encoding"] = "gzip"
        started = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(f"{self.url}{path}{query}", headers=headers),
                                    timeout=60) as response:
            body = response.read()
        return time.perf_counter() - started, body

    def accepted(self) -> float:
        _, body = self.get("?name[]=llm_aggregator_messages_accepted_total")
        total = 0.0
        for family in text_string_to_metric_families(body.decode()):
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return total

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def scrape_seconds(self) -> tuple[float, float]:
        """(sum, count) of the aggregator's own llm_aggregator_scrape_duration_seconds: time spent serving."""
        name = "llm_aggregator_scrape_duration_seconds"
        _, body = self.get(f"?name[]={name}_sum&name[]={name}_count")
        found = {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        return found[f"{name}_sum"], found[f"{name}_count"]

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def wait_accepted(self, target: float, timeout: float = 300, poll: float = 0.05,
                      stall: float | None = None) -> tuple[float, float]:
        """(time, accepted) once `target` messages are accepted, or, with `stall`, once the count has not
        moved for `stall` seconds (messages were lost: the caller reports how many)."""
        # Each poll is a (tiny) scrape the aggregator serves while ingesting: polling every 50 ms costs
        # it ~2 % of its time and bounds the error on the end time to 50 ms (~3 % of a 200k-message run).
        deadline = time.monotonic() + timeout
        last, progressed = -1.0, time.monotonic()
        while time.monotonic() < deadline:
            accepted = self.accepted()
            if accepted >= target:
                return time.time(), accepted
            if accepted != last:
                last, progressed, progressed_wall = accepted, time.monotonic(), time.time()
            elif stall is not None and time.monotonic() - progressed > stall:
                return progressed_wall, accepted
            time.sleep(poll)
        raise RuntimeError(f"aggregator accepted fewer than {target} messages in {timeout}s")

    def stop(self) -> None:
        terminate(self.popen)


def publish_all(nats_url: str, workers: int, messages: int, rate: float = 0.0,
                subject: str = payloads.SUBJECT, kind: str = "load", first_sequence: int = 0) -> tuple[Child, float]:
    publisher = Child("bench.publisher", nats_url, "--workers", str(workers), "--messages", str(messages),
                      "--rate", str(rate), "--subject", subject, "--kind", kind,
                      "--first-sequence", str(first_sequence))
    publisher.expect("ready")
    return publisher, publisher.go()


# -- statistics -----------------------------------------------------------------------------


@dataclass
class Figure:
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def fmt(self, unit: str = "", scale: float = 1.0, digits: int = 0) -> str:
        m, lo, hi = (v * scale for v in (self.median, min(self.values), max(self.values)))
        return f"{m:,.{digits}f}{unit} ({lo:,.{digits}f}..{hi:,.{digits}f})"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# -- measurements ---------------------------------------------------------------------------


CPU: dict[str, list[float]] = {"bare": [], "aggregator": []}  # CPU seconds per message, per ingest run


def bare_ceiling(nats_url: str, workers: int, messages: int, kind: str = "load") -> float:
    subject = payloads.BARE_EVENT_SUBJECT if kind == "active-load" else payloads.BARE_SUBJECT
    subscriber = Child("bench.counting_subscriber", nats_url, str(messages), subject)
    try:
        subscriber.expect("ready")
        publisher, started = publish_all(nats_url, workers, messages, subject=subject, kind=kind)
        publisher.result()
        result = subscriber.result()
    finally:
        subscriber.stop()
    if result["received"] < messages:
        raise RuntimeError(f"bare subscriber got {result['received']} of {messages}")
    CPU["bare"].append(result["cpu"] / messages)
    return messages / (result["last"] - started)


LOST: list[float] = []  # messages the aggregator never received (NATS slow-consumer cut-offs), per run


def aggregator_ingest(nats_url: str, aggregator: AggregatorUnderTest, workers: int, messages: int,
                      poll: float = 0.05, kind: str = "load", first_sequence: int = 0) -> float:
    before = aggregator.accepted()
    cpu_before = aggregator.cpu_seconds()
    subject = payloads.EVENT_SUBJECT if kind == "active-load" else payloads.SUBJECT
    publisher, started = publish_all(nats_url, workers, messages, subject=subject, kind=kind,
                                     first_sequence=first_sequence)
    finished, accepted = aggregator.wait_accepted(before + messages, poll=poll, stall=10.0)
    CPU["aggregator"].append((aggregator.cpu_seconds() - cpu_before) / max(1.0, accepted - before))
    publisher.result()
    LOST.append(before + messages - accepted)
    return (accepted - before) / (finished - started)


def zmq_ingest(nats_url: str, workers: int, messages: int, poll: float, first_id: int) -> tuple[float, float, float]:
    """(msg/s, CPU s per message, messages not received) of an aggregator reading `workers` ZMQ PUB sockets
    it finds in a file discovery directory, all connected before the burst starts."""
    kv_dir = tempfile.mkdtemp(prefix="bench-zmq-kv-")
    publisher = Child("bench.zmq_publisher", kv_dir, "--workers", str(workers), "--messages", str(messages),
                      "--first-id", str(first_id))
    aggregator = None
    try:
        publisher.expect("ready")
        aggregator = AggregatorUnderTest(nats_url, "--discovery-backend", "file", "--discovery-file-kv", kv_dir,
                                         "--discovery-file-scan-interval", "0.2", "--discovery-file-ttl", "3600")
        deadline = time.monotonic() + 120
        while zmq_connected(aggregator) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"aggregator connected to {zmq_connected(aggregator)} of {workers} publishers")
            time.sleep(0.1)
        time.sleep(1.0)  # the subscriptions travel to the PUB sockets after the handshakes
        before, cpu_before = aggregator.accepted(), aggregator.cpu_seconds()
        started = publisher.go()
        finished, accepted = aggregator.wait_accepted(before + messages, poll=poll, stall=10.0)
        cpu = (aggregator.cpu_seconds() - cpu_before) / max(1.0, accepted - before)
        publisher.result()
        return (accepted - before) / (finished - started), cpu, before + messages - accepted
    finally:
        publisher.stop()
        if aggregator is not None:
            aggregator.stop()
        shutil.rmtree(kv_dir, ignore_errors=True)


def zmq_connected(aggregator: AggregatorUnderTest) -> float:
    _, body = aggregator.get("?name[]=llm_aggregator_zmq_endpoints")
    return sum(s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
               if s.labels.get("mode") == "direct")


def check_markers(aggregator: AggregatorUnderTest, workers: int, marker: int = 4000) -> None:
    _, body = aggregator.get("?name[]=llm_kv_blocks_active")
    values = [s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples]
    if len(values) != workers or any(v != marker for v in values):
        raise RuntimeError(f"expected {workers} workers at the final value, saw {len(values)}")


async def freshness(nats_url: str, aggregator: AggregatorUnderTest, sizes: Sizes) -> list[float]:
    """Publish-to-visible delay of a probe worker while the fleet sends `freshness_rate` msg/s."""
    messages = int(sizes.freshness_rate * (sizes.freshness_seconds + 1))
    background, _ = await asyncio.to_thread(publish_all, nats_url, sizes.freshness_workers, messages,
                                         sizes.freshness_rate)
    nc = await nats.connect(nats_url)
    delays: list[float] = []
    probe_id = payloads.WORKER_ID_BASE + 10_000_000
    deadline = time.monotonic() + sizes.freshness_seconds
    seq = 0
    try:
        await asyncio.sleep(0.3)
        while time.monotonic() < deadline:
            seq += 1
            payload = payloads.load_event(10_000_000, seq)
            sent = time.perf_counter()
            await nc.publish(payloads.SUBJECT, payload)
            await nc.flush()
            wanted = f'worker_id="{probe_id}"'
            for _ in range(2000):
                _, body = await asyncio.to_thread(aggregator.get, "?name[]=llm_kv_blocks_active")
                line = next((ln for ln in body.decode().splitlines() if wanted in ln), "")
                if line and float(line.rsplit(" ", 1)[1]) == seq:
                    delays.append(time.perf_counter() - sent)
                    break
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
        await asyncio.to_thread(background.result)
    return delays


def populate(nats_url: str, aggregator: AggregatorUnderTest, workers: int, full: bool = False) -> tuple[float, float]:
    """One message per worker, or with `full` one of every kind (KV, hit rate, GPU, component metrics);
    (seconds until all were accepted, aggregator CPU seconds meanwhile)."""
    before = aggregator.accepted()
    cpu_before = aggregator.cpu_seconds()
    publisher = Child("bench.publisher", nats_url, "--workers", str(workers), "--messages", str(workers),
                      *(["--full"] if full else []))
    publisher.expect("ready")
    started = publisher.go()
    finished, _ = aggregator.wait_accepted(before + workers * (4 if full else 1), poll=0.01)
    cpu = aggregator.cpu_seconds() - cpu_before
    publisher.result()
    return finished - started, cpu


def publish_kind(nats_url: str, aggregator: AggregatorUnderTest, expected: int, *args: str) -> tuple[float, float]:
    """Publish with `bench.publisher` `args`, wait for `expected` more accepted messages;
    (seconds from go to the last accepted, aggregator CPU seconds meanwhile)."""
    before = aggregator.accepted()
    cpu_before = aggregator.cpu_seconds()
    publisher = Child("bench.publisher", nats_url, *args)
    publisher.expect("ready")
    started = publisher.go()
    finished, _ = aggregator.wait_accepted(before + expected, poll=0.01)
    cpu = aggregator.cpu_seconds() - cpu_before
    publisher.result()
    return finished - started, cpu


def dynamo_v1(url: str, sizes: Sizes) -> list[tuple[str, str, str]]:
    """Dynamo 1.x rows: kv_metrics envelopes against the bare ceiling, kv-events block changes on the
    aggregator's one core, and the memory a tracked worker and a tracked block take."""
    rows = []
    workers = sizes.v1_workers
    aggregator = AggregatorUnderTest(url)
    try:
        bare, ours = [], []
        for lst in CPU.values():
            lst.clear()
        for repeat in range(sizes.repeats):
            bare.append(bare_ceiling(url, workers, sizes.ingest_messages, kind="active-load"))
            # The same publishers again: their sequences go on (a repeat from 0 would be all duplicates).
            ours.append(aggregator_ingest(url, aggregator, workers, sizes.ingest_messages, sizes.poll,
                                          kind="active-load", first_sequence=repeat * sizes.ingest_messages))
        check_markers(aggregator, workers)
    finally:
        aggregator.stop()
    ratio = Figure([o / b for o, b in zip(ours, bare, strict=True)])
    bare_cpu, our_cpu = Figure(CPU["bare"]), Figure(CPU["aggregator"])
    rows.append((f"bare nats-py ceiling, Dynamo 1.x kv_metrics envelopes, {workers:,} workers",
                 Figure(bare).fmt(" msg/s"), f"CPU {bare_cpu.fmt(' µs', 1e6, 2)} per message"))
    rows.append((f"aggregator ingest, Dynamo 1.x kv_metrics envelopes, {workers:,} workers", Figure(ours).fmt(" msg/s"),
                 f"{ratio.fmt(' ', 100)}% of bare (target >= 85 %); "
                 f"CPU {our_cpu.fmt(' µs', 1e6, 2)} per message".replace("  ", " ")))
    # The same envelopes on Dynamo's default plane: one ZMQ PUB socket per worker, found through discovery.
    zmq_rates, zmq_cpu, zmq_lost = [], [], []
    for repeat in range(sizes.repeats):
        rate, cpu, lost = zmq_ingest(url, workers, sizes.ingest_messages, sizes.poll, first_id=repeat * workers)
        zmq_rates.append(rate)
        zmq_cpu.append(cpu)
        zmq_lost.append(lost)
    zmq_ratio = Figure([z / o for z, o in zip(zmq_rates, ours, strict=True)])
    rows.append((f"aggregator ingest, Dynamo 1.x kv_metrics over ZMQ, {workers:,} publishers",
                 Figure(zmq_rates).fmt(" msg/s"),
                 f"{zmq_ratio.fmt(' ', 100)}% of the NATS path above; CPU {Figure(zmq_cpu).fmt(' µs', 1e6, 2)} "
                 f"per message; {Figure(zmq_lost).fmt()} of {sizes.ingest_messages:,} not received".replace("  ", " ")))

    # Block changes: each batch stores kv_batch_blocks new blocks and removes as many (a steady cache).
    aggregator = AggregatorUnderTest(url)
    try:
        rates, per_core = [], []
        changes = 2 * sizes.kv_batch_blocks * sizes.kv_batches
        for repeat in range(sizes.repeats):
            seconds, cpu = publish_kind(url, aggregator, sizes.kv_batches, "--kind", "kv-events", "--workers",
                                        str(workers), "--messages", str(sizes.kv_batches), "--blocks",
                                        str(sizes.kv_batch_blocks), "--first-id", str(repeat * workers))
            rates.append(changes / seconds)
            per_core.append(changes / max(cpu, 1 / os.sysconf("SC_CLK_TCK")))  # at least one tick
    finally:
        aggregator.stop()
    rows.append((f"Dynamo 1.x kv-events block changes per CPU second of the aggregator ({sizes.kv_batch_blocks} "
                 f"stored + {sizes.kv_batch_blocks} removed a message, {workers:,} workers)",
                 Figure(per_core).fmt(" changes/s"), f"wall clock {Figure(rates).fmt(' changes/s')}"))

    # Memory: first workers with one cached block each, then a few with many.
    limit = str(sizes.block_workers * sizes.blocks_per_worker * 2)
    aggregator = AggregatorUnderTest(url, "--max-cached-blocks", limit, "--max-cached-blocks-per-worker", limit)
    try:
        base = aggregator.rss_kib()
        publish_kind(url, aggregator, 3 * sizes.tracked_workers, "--kind", "tracked", "--workers",
                     str(sizes.tracked_workers), "--messages", "0", "--blocks", "1")
        with_workers = aggregator.rss_kib()
        batches = -(-sizes.blocks_per_worker // 1000)
        publish_kind(url, aggregator, (2 + batches) * sizes.block_workers, "--kind", "tracked", "--workers",
                     str(sizes.block_workers), "--messages", "0", "--blocks", str(sizes.blocks_per_worker),
                     "--first-id", str(sizes.tracked_workers))
        with_blocks = aggregator.rss_kib()
    finally:
        aggregator.stop()
    per_worker = (with_workers - base) * 1024 / sizes.tracked_workers
    blocks = sizes.block_workers * sizes.blocks_per_worker
    per_block = ((with_blocks - with_workers) * 1024 - per_worker * sizes.block_workers) / blocks
    rows.append((f"RSS per tracked Dynamo 1.x worker ({sizes.tracked_workers:,} live: load, forward passes, "
                 "one cached block)", f"{per_worker:,.0f} bytes", f"baseline {base / 1024:.1f} MiB"))
    rows.append((f"RSS per tracked KV block ({sizes.block_workers:,} workers x {sizes.blocks_per_worker:,} blocks)",
                 f"{per_block:,.0f} bytes", f"in-process (tracemalloc): {block_bytes_in_process():,.0f} bytes"))
    return rows


def block_bytes_in_process(blocks: int = 100_000) -> float:
    """Bytes one tracked block takes in the aggregator's state (its hash and its set slot), measured with
    tracemalloc along the real path: kv-events payloads decoded, then applied."""
    import random
    import tracemalloc

    from aggregator.state.kv_cache import CachedBlocks, KvBlockBudget

    payloads_ = [protocol.encode_kv_events([protocol.RouterEvent(worker_id=1, event=protocol.KvCacheEvent(
        1 + i, protocol.KvEventData(stored=protocol.KvStored(None, None, [
            protocol.StoredBlock(random.getrandbits(64), 0) for _ in range(1000)])), 0))])
        for i in range(blocks // 1000)]
    budget = KvBlockBudget(blocks, blocks)
    cached = CachedBlocks()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for payload in payloads_:
            for event in protocol.decode_kv_events(payload, 1 << 20):
                cached.apply(budget, 1, "device", event.event)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return (after - before) / blocks


def scrape_cost(aggregator: AggregatorUnderTest, repeats: int) -> dict:
    """{format: (client-side times, size, server-side times)}; the server side is read from the
    aggregator's own scrape-duration histogram around each scrape (render and compression,
    without the transfer)."""
    out = {}
    for label, accept, gz in (("text", "", False), ("openmetrics+gzip", OPENMETRICS, True)):
        times, served, size = [], [], 0
        for _ in range(repeats):
            before = aggregator.scrape_seconds()
            seconds, body = aggregator.get(accept=accept, gzip=gz)
            after = aggregator.scrape_seconds()
            times.append(seconds)
            # `before`'s own request is counted in `after` too: a name[] selection, well under 1 ms.
            served.append(after[0] - before[0])
            size = len(body)
        out[label] = (Figure(times), size, Figure(served))
    return out


# What an operator's browser and a script ask of the status page: the page, and large sorted API pages.
STATUS_REQUESTS = (("/", ""), ("/api/v1/workers", "?page_size=1000&sort=kv_usage&order=desc"))


def ingest_during_scrapes(nats_url: str, aggregator: AggregatorUnderTest, workers: int, messages: int,
                          poll: float, status_page: bool = False) -> float:
    """Ingest rate while another thread scrapes /metrics (or, with `status_page`, loads the status
    page and its API) back to back."""
    import threading

    stop = threading.Event()

    def scrape_loop() -> None:
        while not stop.is_set():
            if status_page:
                for path, query in STATUS_REQUESTS:
                    aggregator.get(query, path=path)
            else:
                aggregator.get(accept=OPENMETRICS, gzip=True)

    thread = threading.Thread(target=scrape_loop, daemon=True)
    thread.start()
    try:
        return aggregator_ingest(nats_url, aggregator, workers, messages, poll)
    finally:
        stop.set()
        thread.join(120)


def status_request(aggregator: AggregatorUnderTest, path: str, query: str) -> float:
    """Seconds for one status request, asked after a pause: back to back, a request waits for the
    status page's share of time (edges/status_page.py), which is not what one costs."""
    time.sleep(1.0)
    return aggregator.get(query, path=path)[0]


def pushgateway(sizes: Sizes) -> tuple[float, Figure, int]:
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        raise RuntimeError("prometheus-pushgateway not installed (apt-get install prometheus-pushgateway)")
    port = free_port()
    # In memory only: Debian's build persists to /var/lib/prometheus by default, which would both
    # slow it down and carry groups over from an earlier run.
    gateway = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, 15)
        url = f"http://127.0.0.1:{port}"
        client = Child("bench.push_client", url, "--groups", str(sizes.push_groups), "--pushes",
                       str(sizes.push_max), "--seconds", str(sizes.push_seconds))
        client.expect("ready")
        client.go()
        result = client.result()
        times, size = [], 0
        for _ in range(sizes.scrape_repeats):
            started = time.perf_counter()
            with urllib.request.urlopen(f"{url}/metrics", timeout=60) as response:
                size = len(response.read())
            times.append(time.perf_counter() - started)
        return result["pushes"] / result["seconds"], Figure(times), size
    finally:
        terminate(gateway)


# -- the run --------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import version

    versions = ", ".join(f"{p} {version(p)}" for p in ("nats-py", "prometheus-client", "msgspec", "aiohttp"))
    nats_version = subprocess.run([nats_server_binary(), "--version"], capture_output=True,
                                  text=True).stdout.strip()
    return (f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, aggregator {__version__}, {nats_version}, {versions}")


def run(sizes: Sizes, output: Path) -> str:
    rows: list[tuple[str, str, str]] = []  # (measure, figure, comparison)
    # The server may buffer 512 MiB per client (default 64 MiB) before cutting a slow one off: a
    # 200k-message burst from one publisher is then queued, not dropped, for the bare and the real
    # subscriber alike. Messages the aggregator still never got are counted and reported.
    config = Path(tempfile.mkdtemp(prefix="bench-nats-")) / "nats.conf"
    config.write_text("max_pending: 536870912\n")
    with NatsServer(config=str(config)) as server:
        url = server.url
        # 1 + 2: bare ceiling and aggregator ingest, interleaved per repeat.
        for workers in sizes.ingest_workers:
            aggregator = AggregatorUnderTest(url)
            try:
                bare, ours = [], []
                for lst in CPU.values():
                    lst.clear()
                for _ in range(sizes.repeats):
                    bare.append(bare_ceiling(url, workers, sizes.ingest_messages))
                    ours.append(aggregator_ingest(url, aggregator, workers, sizes.ingest_messages, sizes.poll))
                check_markers(aggregator, workers)
            finally:
                aggregator.stop()
            ratio = Figure([o / b for o, b in zip(ours, bare)])
            bare_cpu, our_cpu = Figure(CPU["bare"]), Figure(CPU["aggregator"])
            rows.append((f"bare nats-py ceiling, {workers:,} workers", Figure(bare).fmt(" msg/s"),
                         f"CPU {bare_cpu.fmt(' µs', 1e6, 2)} per message"))
            rows.append((f"aggregator ingest, {workers:,} workers", Figure(ours).fmt(" msg/s"),
                         f"{ratio.fmt(' ', 100)}% of bare (target >= 60 % at 1,000); "
                         f"CPU {our_cpu.fmt(' µs', 1e6, 2)} per message".replace("  ", " ")))
            if workers == 1000 or workers == sizes.ingest_workers[-1]:
                ingest_1k = Figure(ours)

        # 2b: Dynamo 1.x
        rows += dynamo_v1(url, sizes)

        # 3: freshness
        aggregator = AggregatorUnderTest(url)
        try:
            populate(url, aggregator, sizes.freshness_workers)
            delays = asyncio.run(freshness(url, aggregator, sizes))
        finally:
            aggregator.stop()
        rows.append((f"freshness at {sizes.freshness_rate:,} msg/s ({sizes.freshness_workers:,} workers), "
                     f"{len(delays)} probes",
                     f"p50 {percentile(delays, 50) * 1000:.1f} ms, p99 {percentile(delays, 99) * 1000:.1f} ms",
                     "target p99 < 50 ms"))

        # 4: scrape cost, and ingest while scraping
        ours_1k_scrape = None
        for workers in sizes.scrape_workers:
            # Every worker sends ~20 component series: lift the default total (100,000) for 10,000 workers.
            aggregator = AggregatorUnderTest(url, "--component-metrics-max-series", "5000000")
            try:
                seconds, cpu = populate(url, aggregator, workers, full=True)
                if workers == sizes.scrape_workers[-1]:
                    rows.append((f"ingest of full workers (KV, hit rate, GPU and a component-metric snapshot of "
                                 f"{payloads.snapshot_lines()} lines each), {workers:,} workers",
                                 f"{workers / seconds:,.0f} workers/s",
                                 f"CPU {cpu / workers * 1e6:,.0f} µs per worker, most of it reading the snapshot"))
                cost = scrape_cost(aggregator, sizes.scrape_repeats)
                for label, (figure, size, served) in cost.items():
                    rows.append((f"/metrics {label}, {workers:,} workers (KV, GPU, component series)",
                                 figure.fmt(" ms", 1000, 1), f"{size:,} bytes; in the aggregator "
                                                             f"{served.fmt(' ms', 1000, 1)}, the rest is the transfer"))
                if workers == sizes.scrape_workers[-1]:
                    quiet, busy, paged = [], [], []
                    for _ in range(sizes.repeats):
                        quiet.append(aggregator_ingest(url, aggregator, workers, sizes.ingest_messages, sizes.poll))
                        busy.append(ingest_during_scrapes(url, aggregator, workers, sizes.ingest_messages,
                                                          sizes.poll))
                        paged.append(ingest_during_scrapes(url, aggregator, workers, sizes.ingest_messages,
                                                           sizes.poll, status_page=True))
                    stall = Figure([b / q for b, q in zip(busy, quiet)])
                    lost = int(sum(LOST[-3 * sizes.repeats:]))
                    rows.append((f"ingest during back-to-back scrapes, {workers:,} workers", Figure(busy).fmt(" msg/s"),
                                 f"{stall.fmt('', 100)}% of ingest without scrapes ({Figure(quiet).fmt(' msg/s')}); "
                                 f"messages lost: {lost} (with the next row's runs)"))
                    page_stall = Figure([p / q for p, q in zip(paged, quiet, strict=True)])
                    rows.append((f"ingest during back-to-back status page loads (/ and /api/v1/workers, 1,000 a page, "
                                 f"sorted by KV use), {workers:,} workers", Figure(paged).fmt(" msg/s"),
                                 f"{page_stall.fmt('', 100)}% of ingest without them"))
                    for path, query in STATUS_REQUESTS:
                        times = Figure([status_request(aggregator, path, query) for _ in range(sizes.scrape_repeats)])
                        rows.append((f"status {path}{query}, {workers:,} workers", times.fmt(" ms", 1000, 1),
                                     "one request at a time, client side"))
            finally:
                aggregator.stop()
            if workers == sizes.push_groups:
                # The Pushgateway comparison uses the same data it holds: each worker's KV series only.
                aggregator = AggregatorUnderTest(url)
                try:
                    populate(url, aggregator, workers)
                    ours_1k_scrape, kv_size, _ = scrape_cost(aggregator, sizes.scrape_repeats)["text"]
                    rows.append((f"/metrics text, {workers:,} workers, KV series only (the Pushgateway's data)",
                                 ours_1k_scrape.fmt(" ms", 1000, 1), f"{kv_size:,} bytes"))
                finally:
                    aggregator.stop()

        # 5: memory per live worker, and after churn
        aggregator = AggregatorUnderTest(url, "--stale-after", "1")
        try:
            base = aggregator.rss_kib()
            populate(url, aggregator, sizes.churn_wave)
            live = aggregator.rss_kib()
            per_worker = (live - base) * 1024 / sizes.churn_wave
            rows.append((f"RSS per live worker ({sizes.churn_wave:,} live)", f"{per_worker:,.0f} bytes",
                         f"baseline {base / 1024:.1f} MiB, with workers {live / 1024:.1f} MiB; target < 4 KiB"))
            for first in range(sizes.churn_wave, sizes.churn_workers, sizes.churn_wave):
                publisher = Child("bench.publisher", url, "--workers", str(sizes.churn_wave), "--messages",
                                  str(sizes.churn_wave), "--first-id", str(first))
                publisher.expect("ready")
                publisher.go()
                publisher.result()
                time.sleep(1.3)
            time.sleep(2.0)
            after = aggregator.rss_kib()
            rows.append((f"RSS after {sizes.churn_workers:,} distinct workers came and expired",
                         f"{after / 1024:.1f} MiB", f"{after / live * 100:.0f}% of the RSS with "
                                                   f"{sizes.churn_wave:,} live (flat = no growth)"))
        finally:
            aggregator.stop()
        aggregator = AggregatorUnderTest(url, "--component-metrics-max-series", "5000000")
        try:
            base = aggregator.rss_kib()
            populate(url, aggregator, sizes.churn_wave, full=True)
            full = aggregator.rss_kib()
            rows.append((f"RSS per live worker with all its series ({sizes.churn_wave:,} live; KV, 1 GPU, "
                         f"~20 component series)", f"{(full - base) * 1024 / sizes.churn_wave:,.0f} bytes",
                         f"{(full - base) * 1024 / sizes.churn_wave / 1024:.1f} KiB"))
        finally:
            aggregator.stop()

    # 6: the peer
    pushes, gateway_scrape, gateway_size = pushgateway(sizes)
    rows.append((f"Pushgateway pushes/s, {sizes.push_groups:,} groups, 1 client process", f"{pushes:,.0f} pushes/s",
                 f"aggregator ingest at 1,000 workers is {ingest_1k.median / pushes:,.0f}x (target >= 10x)"))
    comparison = ""
    if ours_1k_scrape is not None:
        comparison = (f"aggregator /metrics with {sizes.push_groups:,} workers: "
                      f"{ours_1k_scrape.median / gateway_scrape.median:.2f}x the Pushgateway's time")
    rows.append((f"Pushgateway /metrics, {sizes.push_groups:,} groups", gateway_scrape.fmt(" ms", 1000, 1),
                 f"{gateway_size:,} bytes; {comparison}"))

    rows.append(("messages the aggregator never received, all ingest runs", f"{int(sum(LOST)):,}",
                 f"of {len(LOST)} runs"))
    table = ["| measure | median (min..max) | comparison |", "|---|---|---|"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = (f"# Benchmark results\n\nMachine: {machine()}\n\nRun: `python -m bench"
            f"{' --quick' if sizes is QUICK else ''}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"{sizes.repeats} repeats per ingest figure, {sizes.scrape_repeats} per scrape figure.\n\n"
            + "\n".join(table) + "\n")
    output.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (seconds), for the smoke test")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args()
    print(run(QUICK if args.quick else FULL, args.output))


if __name__ == "__main__":
    main()
