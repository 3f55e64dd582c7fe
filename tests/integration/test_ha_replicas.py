"""Two replicas of one aggregator shard, scraped by one Prometheus (deploy/prometheus/ha/shard-0.yml
on loopback, with the rules of deploy/prometheus/rules): SIGKILL the elected replica mid-run, and
the deduplicated view has no gap and no double count over the kill window.

"No gap" is checked against Prometheus's own evaluations: each rule group gets one extra rule that
always has a value, so a deduplicated series must have a sample at every evaluation that one has.
"""

from __future__ import annotations

import time

import yaml

from fleet_demo.nats_server import free_port
from fleet_protocol.partitions import partition

from ..prometheus_servers import PROMETHEUS, RULES, PrometheusServer, loopback_config, needs_prometheus
from ..support import samples, scrape, wait_until
from .test_shards import COMPONENTS, WORKERS, start_fleet

pytestmark = needs_prometheus

# The deduplicated series checked over the window, at both levels.
CHECKED = ("shard:llm_workers:elected", "shard:llm_load_sum:elected", "shard:llm_load_sum_squares:elected",
           "shard:llm_fleet_kv_hit_rate_isl_blocks_total:elected", "fleet:llm_workers:sum",
           "fleet:llm_load_sum:sum", "fleet:llm_load_std:exact")


def with_control_rules(tmp_path):
    """Copies of replicas.rules.yml and fleet.rules.yml, each group with a rule that always has a value."""
    files = []
    for name in ("replicas.rules.yml", "fleet.rules.yml"):
        rules = yaml.safe_load((RULES / name).read_text())
        for group in rules["groups"]:
            group["rules"].append({"record": f"test:{group['name'].replace('-', '_')}:evaluated",
                                   "expr": "vector(1)"})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(rules))
        files.append(path)
    return tuple(files)


def test_killing_the_elected_replica_leaves_no_gap_and_no_double_count(nats_server, processes, tmp_path):
    replica_a = processes.aggregator(nats_server.url, "--shards", "2", "--shard", "0")
    replica_b = processes.aggregator(nats_server.url, "--shards", "2", "--shard", "0")  # up later: a is elected
    port = free_port()
    config = loopback_config(PROMETHEUS / "ha" / "shard-0.yml",
                             {"aggregator-s0-a:9091": f"127.0.0.1:{replica_a.port}",
                              "aggregator-s0-b:9091": f"127.0.0.1:{replica_b.port}"},
                             port, rule_files=with_control_rules(tmp_path))
    prometheus = PrometheusServer(processes, config, tmp_path / "prometheus", port)
    start_fleet(processes, nats_server.url)
    workers = WORKERS * sum(partition(c, 2) == 0 for c in COMPONENTS)
    assert workers > 0

    previous: dict = {}

    def elected_a_at_the_frozen_fleet():
        nonlocal previous
        families = scrape(replica_b.url)
        state = {name: samples(families, name) for name in ("llm_load_sum", "llm_load_sum_squares", "llm_workers")}
        stable = state == previous and sum(samples(families, "llm_load_workers").values()) == workers
        previous = state
        elected = prometheus.query("shard:llm_aggregator_replica:elected")
        return (stable and [dict(labels)["replica"] for labels in elected] == ["a"]
                and prometheus.query("fleet:llm_workers:sum") and families)

    reference = wait_until(elected_a_at_the_frozen_fleet, 40, interval=0.5, what="replica a elected, fleet frozen")
    expected = {
        "workers": sum(samples(reference, "llm_workers").values()),
        "load_sum": sum(samples(reference, "llm_load_sum").values()),
        "isl": sum(samples(reference, "llm_fleet_kv_hit_rate_isl_blocks",
                           "llm_fleet_kv_hit_rate_isl_blocks_total").values()),
    }
    assert expected["workers"] == workers and expected["isl"] > 0
    assert sum(samples(scrape(replica_a.url), "llm_workers").values()) == workers  # a holds the same fleet
    frozen_at = time.time()

    def evaluations_since(moment: float) -> int:
        (points,) = prometheus.samples("test:llm_fleet:evaluated", 120, time.time()).values()
        return sum(t > moment for t, _ in points)

    # A few evaluations with a elected at the frozen fleet, inside the window checked below.
    wait_until(lambda: evaluations_since(frozen_at) >= 3, 30, what="3 evaluations before the kill")

    killed_at = time.time()
    replica_a.popen.kill()  # SIGKILL: no goodbye, its scrapes simply fail
    replica_a.popen.wait(10)

    def elected_b_for_a_while():
        elected = prometheus.query("shard:llm_aggregator_replica:elected")
        return [dict(labels)["replica"] for labels in elected] == ["b"] and evaluations_since(killed_at) >= 5

    wait_until(elected_b_for_a_while, 40, interval=0.5, what="replica b elected for 5 evaluations")
    end = time.time()
    window = end - frozen_at

    evaluated = {}
    for group in ("llm_aggregator_replicas", "llm_fleet"):
        (points,) = prometheus.samples(f"test:{group}:evaluated", window, end).values()
        evaluated[group] = [t for t, _ in points]
        assert len(evaluated[group]) >= 6
        assert any(t < killed_at for t in evaluated[group]) and any(t > killed_at for t in evaluated[group])
    groups = {("component", c) for c in COMPONENTS if partition(c, 2) == 0}
    totals: dict[str, float] = {}
    for name in CHECKED:
        series = prometheus.samples(name, window, end)
        # One series per component endpoint of the shard, never one per replica.
        assert {labels[0] for labels in series} == groups, (name, series)
        level = "llm_aggregator_replicas" if name.startswith("shard:") else "llm_fleet"
        for labels, points in series.items():
            assert [t for t, _ in points] == evaluated[level], (name, labels, "gap", points, evaluated[level])
            values = {value for _, value in points}
            assert len(values) == 1, (name, labels, "changed over the kill", points)
            totals[name] = totals.get(name, 0.0) + values.pop()
    assert totals["fleet:llm_workers:sum"] == totals["shard:llm_workers:elected"] == expected["workers"]  # not twice
    assert totals["fleet:llm_load_sum:sum"] == totals["shard:llm_load_sum:elected"] == expected["load_sum"]
    assert totals["shard:llm_fleet_kv_hit_rate_isl_blocks_total:elected"] == expected["isl"]
    # Both replicas were scraped before the kill: the raw view would have counted every worker twice.
    doubled = prometheus.query("sum(llm_workers)", at=killed_at - 1)
    assert list(doubled.values()) == [2 * expected["workers"]]
