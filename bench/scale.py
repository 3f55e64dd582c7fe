"""`python -m bench.scale`: a fleet of 100,000 workers at 1 Hz into 1, 2 and 4 aggregator shards.

For each shard count, and each way of splitting (`client`: every shard receives every message
and keeps its own; `server`: a nats-server leaf with the partition mapping of
deploy/nats-server/shard-router.conf feeds each shard its own), on loopback:

- publishers (bench/fleet_publisher.py, several processes) send one LoadEvent per worker per
  second on 16 components, 4 per partition of 4, so the shards are even;
- per shard: the workers it holds, ingest (accepted and skipped messages/s, against its share of
  the offered rate), messages the NATS client dropped, CPU (cores), RSS, and /metrics (the whole
  exposition: time and size; the partials alone, what a fleet-level Prometheus needs);
- the global view: a Prometheus per shard scrapes its aggregator's partials and elects
  (deploy/prometheus/rules/replicas.rules.yml), a global Prometheus federates them and adds them
  up (fleet.rules.yml); reported: how long after the first message the global view holds every
  worker, and its largest relative error against the statistics computed here from the loads
  the publishers send (they never change).

Written to bench/SCALE.md (or --output) with the machine it ran on; --json FILE keeps every figure. `--quick` runs it at toy
size (tests/integration/test_bench_scale_smoke.py). Everything runs on this one machine, the publishers and
nats-server included: on a small one the figures are a floor, and the table says what ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from fleet_demo.nats_server import NatsServer, free_port, terminate, wait_for_port
from fleet_protocol.partitions import partition

from .__main__ import OPENMETRICS, AggregatorUnderTest, Child, machine
from .fleet_publisher import component_of, load_of

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules"
SHARD_ROUTER = ROOT / "deploy" / "nats-server" / "shard-router.conf"
COMPONENTS = tuple(f"pool-{i:02d}" for i in range(16))
# What a fleet-level Prometheus scrapes from each aggregator (`/metrics?name[]=`): the partials and
# what the replica election reads, a few series per component, whatever the number of workers.
PARTIAL_SERIES = ("llm_workers", "llm_load_workers", "llm_load_sum", "llm_load_sum_squares",
                  "llm_kv_blocks_total_sum", "llm_fleet_kv_hit_rate_isl_blocks_total",
                  "llm_fleet_kv_hit_rate_overlap_blocks_total", "llm_workers_expired_total",
                  "llm_aggregator_shard_info", "llm_aggregator_nats_connected", "process_start_time_seconds")


@dataclass(frozen=True)
class ScaleSizes:
    workers: int
    shard_counts: tuple[int, ...]
    splits: tuple[str, ...]
    publishers: int
    window: float  # seconds of steady ingest measured
    scrape_repeats: int
    fill_timeout: float


FULL = ScaleSizes(100_000, (1, 2, 4), ("client", "server"), 4, 10.0, 3, 120.0)
QUICK = ScaleSizes(2_000, (1, 2), ("client", "server"), 2, 2.0, 1, 60.0)


def expected_statistics(workers: int) -> dict[str, tuple[int, float, float]]:
    """{component: (n, avg, population std)} of the loads the publishers send."""
    loads: dict[str, list[int]] = {c: [] for c in COMPONENTS}
    for worker in range(workers):
        loads[component_of(worker, list(COMPONENTS))].append(load_of(worker))
    out = {}
    for component, values in loads.items():
        n = len(values)
        mean = math.fsum(values) / n
        out[component] = (n, mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n))
    return out


def series_total(aggregator: AggregatorUnderTest, name: str) -> float:
    _, body = aggregator.get(f"?name[]={name}")
    return sum(s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples if s.name == name)


# -- the global view ------------------------------------------------------------------------


class PrometheusProcess:
    def __init__(self, config: dict, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True)
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.popen = subprocess.Popen(
            ["prometheus", f"--config.file={path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port, 30)

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())["data"]["result"]

    def stop(self) -> None:
        terminate(self.popen)


def global_view(shards: list[AggregatorUnderTest], workdir: Path, interval: str = "2s") -> tuple[
        PrometheusProcess, list[PrometheusProcess]]:
    timing = {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval}
    shard_servers = []
    for index, aggregator in enumerate(shards):
        config = {"global": timing, "rule_files": [str(RULES / "replicas.rules.yml")],
                  "scrape_configs": [{"job_name": "aggregator", "params": {"name[]": list(PARTIAL_SERIES)},
                                      "static_configs": [{"targets": [f"127.0.0.1:{aggregator.port}"],
                                                          "labels": {"namespace": "dynamo", "replica": "a"}}]}]}
        shard_servers.append(PrometheusProcess(config, workdir / f"shard-{index}"))
    config = {"global": timing,
              "rule_files": [str(RULES / "fleet.rules.yml")],
              "scrape_configs": [{"job_name": "federate", "honor_labels": True, "metrics_path": "/federate",
                                  "params": {"match[]": ['{__name__=~"shard:.+"}']},
                                  "static_configs": [{"targets": [f"127.0.0.1:{s.port}" for s in shard_servers]}]}]}
    return PrometheusProcess(config, workdir / "global"), shard_servers


def global_errors(server: PrometheusProcess, expected: dict[str, tuple[int, float, float]]) -> float | None:
    """The largest relative error of the global avg and std against `expected`; None until it holds them all."""
    got = {}
    for name in ("fleet:llm_load_workers:sum", "fleet:llm_load_avg:exact", "fleet:llm_load_std:exact"):
        got[name] = {r["metric"]["component"]: float(r["value"][1]) for r in server.query(name)}
    if got["fleet:llm_load_workers:sum"] != {c: float(n) for c, (n, _, _) in expected.items()}:
        return None
    if any(set(got[name]) != set(expected) for name in got):
        return None  # a rule group that has not run since the last shard arrived
    worst = 0.0
    for component, (_, mean, std) in expected.items():
        for name, want in (("fleet:llm_load_avg:exact", mean), ("fleet:llm_load_std:exact", std)):
            worst = max(worst, abs(got[name].get(component, math.inf) - want) / want)
    return worst


# -- one configuration --------------------------------------------------------------------


def scrape_costs(aggregator: AggregatorUnderTest, repeats: int) -> dict:
    """Median seconds the aggregator spends serving /metrics as Prometheus asks for it (OpenMetrics, gzip),
    by its own llm_aggregator_scrape_duration_seconds (the transfer and the client's share of a busy
    machine left out), the bytes, and the same for the partials alone."""
    out = {}
    for key, query in (("scrape", ""), ("partials", "?" + "&".join(f"name[]={n}" for n in PARTIAL_SERIES))):
        spent, size = [], 0
        for _ in range(repeats):
            before = aggregator.scrape_seconds()
            _, body = aggregator.get(query, accept=OPENMETRICS, gzip=True)
            after = aggregator.scrape_seconds()
            # The polls themselves are scrapes too: the difference holds this one and the poll after it.
            spent.append(after[0] - before[0])
            size = len(body)
        out[f"{key}_s"], out[f"{key}_gzip_bytes"] = statistics.median(spent), size
    return out


def pending_bytes(monitor_port: int) -> dict[int, int]:
    """{client port: bytes nats-server holds for it, not yet sent} of the aggregators' connections."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/connz?limit=1024", timeout=10) as response:
        connections = json.loads(response.read())["connections"]
    return {c["port"]: c["pending_bytes"] for c in connections if c.get("name") == "llm-aggregator"}


def shard_router(workdir: Path, hub_leaf_port: int, shards: int, monitor_port: int) -> NatsServer:
    text = SHARD_ROUTER.read_text()
    remotes = '["nats-leaf://nats-1:7422", "nats-leaf://nats-2:7422", "nats-leaf://nats-3:7422"]'
    assert remotes in text and "partition(2,2)" in text
    text = (text.replace(remotes, f'["nats-leaf://127.0.0.1:{hub_leaf_port}"]')
            .replace("partition(2,2)", f"partition({shards},2)")
            .replace("http_port: 8222", f"http_port: {monitor_port}"))
    path = workdir / "shard-router.conf"
    path.write_text(text)
    return NatsServer(config=str(path))


def run_configuration(sizes: ScaleSizes, shards: int, split: str, workdir: Path) -> dict:
    expected = expected_statistics(sizes.workers)
    share = {index: sum(n for c, (n, _, _) in expected.items() if partition(c, shards) == index)
             for index in range(shards)}
    hub_conf = workdir / "hub.conf"
    leaf_port = free_port()
    hub_conf.write_text(f"leafnodes {{ host: 127.0.0.1, port: {leaf_port} }}\nmax_payload: 1MB\n")
    started: list = []
    monitor = free_port()
    hub = NatsServer(config=str(hub_conf), extra_args=["-m", str(monitor)]).start()
    try:
        router = None
        if split == "server" and shards > 1:
            monitor = free_port()
            router = shard_router(workdir, leaf_port, shards, monitor).start()
        aggregators = []
        for index in range(shards):
            extra = ["--max-workers", str(sizes.workers + 1000), "--shards", str(shards), "--shard", str(index)]
            if router is not None:
                extra += ["--shard-subject-prefix", "shard"]
            aggregators.append(AggregatorUnderTest((router or hub).url, *extra))
            started.append(aggregators[-1])
        publishers = [Child("bench.fleet_publisher", hub.url, "--components", ",".join(COMPONENTS),
                            "--workers", str(sizes.workers), "--slice", f"{k}/{sizes.publishers}")
                      for k in range(sizes.publishers)]
        started.extend(publishers)
        for publisher in publishers:
            publisher.expect("ready")
        prometheus = None
        if shutil.which("prometheus"):
            prometheus = global_view(aggregators, workdir)
            started.extend([prometheus[0], *prometheus[1]])
        go = min(publisher.go() for publisher in publishers)
        # Every shard holds its share.
        deadline = time.monotonic() + sizes.fill_timeout
        held = [0.0] * shards
        while time.monotonic() < deadline:
            held = [series_total(a, "llm_workers") for a in aggregators]
            if held == [share[i] for i in range(shards)]:
                break
            time.sleep(0.2)
        filled = time.time() - go
        view = {}
        if prometheus is not None:
            deadline = time.monotonic() + sizes.fill_timeout
            error = None
            while time.monotonic() < deadline and error is None:
                error = global_errors(prometheus[0], expected)
                if error is None:
                    time.sleep(0.5)
            series = prometheus[0].query('count({__name__=~".+"})')
            view = {"seconds_after_go": time.time() - go if error is not None else None, "max_rel_error": error,
                    "series": float(series[0]["value"][1]) if series else None}
        # Steady ingest.
        before = [(a.accepted(), series_total(a, "llm_aggregator_shard_skipped_messages_total"), a.cpu_seconds(),
                   time.time()) for a in aggregators]
        time.sleep(sizes.window)
        backlog = sum(pending_bytes(monitor).values())  # what the aggregators have not read yet
        after = [(a.accepted(), series_total(a, "llm_aggregator_shard_skipped_messages_total"), a.cpu_seconds(),
                  time.time()) for a in aggregators]
        per_shard = []
        for index, aggregator in enumerate(aggregators):
            (a0, s0, c0, t0), (a1, s1, c1, t1) = before[index], after[index]
            received = (a1 - a0) + (s1 - s0)
            # At 1 Hz a shard receives the whole fleet's messages (client split) or its share (server split).
            offered = share[index] if router is not None else sizes.workers
            cost = (c1 - c0) / received if received else math.nan
            per_shard.append({
                "shard": index, "workers": held[index], "share": share[index],
                "accepted_per_s": (a1 - a0) / (t1 - t0), "skipped_per_s": (s1 - s0) / (t1 - t0),
                "cores": (c1 - c0) / (t1 - t0), "cpu_us_per_message": cost * 1e6,
                "cores_at_1hz": cost * offered, "rss_mib": aggregator.rss_kib() / 1024,
                "dropped": series_total(aggregator, "llm_aggregator_nats_slow_consumer_dropped_total"),
                **scrape_costs(aggregator, sizes.scrape_repeats),
            })
        results = []
        for publisher in publishers:
            stdin = publisher.popen.stdin
            assert stdin is not None
            stdin.close()  # EOF: stop publishing
            results.append(publisher.result(120))
        return {"shards": shards, "split": split, "filled_s": filled, "per_shard": per_shard, "view": view,
                "backlog_bytes": backlog,
                "offered_per_s": sizes.workers, "publishers": results}
    finally:
        for process in reversed(started):
            process.stop()
        if router is not None:
            router.stop()
        hub.stop()


# -- the report -----------------------------------------------------------------------------


def report(sizes: ScaleSizes, runs: list[dict]) -> str:
    counts = sorted({run["shards"] for run in runs})
    lines = [f"# Scale: {sizes.workers:,} workers at 1 Hz into {', '.join(map(str, counts))} shards", "",
             f"`python -m bench.scale` on {machine()}.", "",
             f"{sizes.workers:,} workers on {len(COMPONENTS)} components (4 per partition of 4), one LoadEvent each "
             f"per second from {sizes.publishers} publisher processes; {sizes.window:g} s of steady ingest measured. "
             "`client`: each shard receives every message and keeps its own; `server`: a nats-server leaf with the "
             "partition mapping (deploy/nats-server/shard-router.conf) feeds each shard its own. Publishers, "
             "nats-server(s), aggregators and Prometheus servers all share this machine.", "",
             "| shards | split | shard | workers held (its share) | accepted msg/s | skipped msg/s | CPU µs per "
             "message received | cores to keep 1 Hz | RSS MiB | /metrics ms | /metrics gzip MB | partials ms "
             "| dropped |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for shard in run["per_shard"]:
            lines.append(
                f"| {run['shards']} | {run['split']} | {shard['shard']} | {shard['workers']:,.0f} ({shard['share']:,}) "
                f"| {shard['accepted_per_s']:,.0f} | {shard['skipped_per_s']:,.0f} "
                f"| {shard['cpu_us_per_message']:.1f} | {shard['cores_at_1hz']:.2f} | {shard['rss_mib']:,.0f} "
                f"| {shard['scrape_s'] * 1000:,.0f} | {shard['scrape_gzip_bytes'] / 1e6:,.1f} "
                f"| {shard['partials_s'] * 1000:,.1f} | {shard['dropped']:,.0f} |")
    lines += ["", "| shards | split | all held after (s) | published msg/s | accepted msg/s | NATS backlog MB "
              "| cores to keep 1 Hz: busiest shard, all shards | RSS MiB, all shards | slowest /metrics ms "
              "| global view complete after (s) | global max rel. error | global series | publishers' worst lag (s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        shards, view = run["per_shard"], run["view"]
        seconds = view.get("seconds_after_go")
        error = view.get("max_rel_error")
        lines.append(
            f"| {run['shards']} | {run['split']} | {run['filled_s']:.1f} "
            f"| {sum(p['sent'] / p['seconds'] for p in run['publishers']):,.0f} "
            f"| {sum(s['accepted_per_s'] for s in shards):,.0f} | {run['backlog_bytes'] / 1e6:,.1f} "
            f"| {max(s['cores_at_1hz'] for s in shards):.2f}, {sum(s['cores_at_1hz'] for s in shards):.2f} "
            f"| {sum(s['rss_mib'] for s in shards):,.0f} | {max(s['scrape_s'] for s in shards) * 1000:,.0f} "
            f"| {'-' if seconds is None else f'{seconds:.1f}'} | {'-' if error is None else f'{error:.1e}'} "
            f"| {view.get('series') or 0:,.0f} | {max(p['worst_lag_s'] for p in run['publishers']):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy size, for the smoke test")
    parser.add_argument("--workers", type=int, help="override the fleet size")
    parser.add_argument("--shards", help="comma-separated shard counts, e.g. 1,2,4")
    parser.add_argument("--splits", help="comma-separated: client, server")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "SCALE.md")
    parser.add_argument("--json", type=Path, help="also write every figure here, as JSON")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.workers or args.shards or args.splits:
        sizes = ScaleSizes(args.workers or sizes.workers,
                           tuple(int(s) for s in args.shards.split(",")) if args.shards else sizes.shard_counts,
                           tuple(args.splits.split(",")) if args.splits else sizes.splits,
                           sizes.publishers, sizes.window, sizes.scrape_repeats, sizes.fill_timeout)
    assert all(sum(partition(c, 4) == p for c in COMPONENTS) == 4 for p in range(4))
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for shards in sizes.shard_counts:
            for split in sizes.splits:
                if shards == 1 and split == "server":
                    continue  # nothing to split
                print(f"{shards} shard(s), {split} split...", file=sys.stderr, flush=True)
                workdir = Path(tmp) / f"{shards}-{split}"
                workdir.mkdir()
                runs.append(run_configuration(sizes, shards, split, workdir))
    text = report(sizes, runs)
    args.output.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=1))
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("DYN_LOG", "warn")
    main()
