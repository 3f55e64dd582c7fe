"""deploy/prometheus/rules: promtool's own checks and unit tests, then the real topology of
compose.yml's `ha` profile on loopback (deploy/prometheus/ha/*.yml as they are, targets mapped):
two shards of two aggregator replicas each, a Prometheus per shard electing one replica, a
global Prometheus federating the shards' partials. Its fleet-wide statistics must equal what one
aggregator computes over the same fleet, to 1e-9.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

from fleet_demo.nats_server import free_port

from ..prometheus_servers import PROMETHEUS, RULES, PrometheusServer, loopback_config, needs_prometheus
from ..support import samples, scrape, wait_until
from .test_shards import COMPONENTS, WORKERS, start_fleet

pytestmark = needs_prometheus


def test_the_rule_files_pass_promtool_check():
    files = sorted(RULES.glob("*.rules.yml"))
    assert {f.name for f in files} == {"replicas.rules.yml", "fleet.rules.yml", "fleet-dashboards.rules.yml"}
    result = subprocess.run(["promtool", "check", "rules", *map(str, files)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("test_file", sorted(RULES.glob("*_test.yml")), ids=lambda path: path.name)
def test_promtool_unit_tests(test_file: Path):
    result = subprocess.run(["promtool", "test", "rules", test_file.name], capture_output=True, text=True,
                            timeout=120, cwd=test_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_can_fail(tmp_path):
    """The same tests against the rules without the clamp of the std: the equal-loads case is NaN."""
    for path in RULES.glob("*.yml"):
        text = path.read_text()
        if path.name == "fleet.rules.yml":
            clamped = "sqrt(clamp_min(\n"
            assert clamped in text and ", 0))" in text
            text = text.replace(clamped, "sqrt((\n").replace(", 0))", "))")
        (tmp_path / path.name).write_text(text)
    result = subprocess.run(["promtool", "test", "rules", "fleet.rules_test.yml"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert "NaN" in result.stdout + result.stderr


def test_every_prometheus_config_of_the_ha_topology_passes_promtool():
    for path in sorted((PROMETHEUS / "ha").glob("*.yml")):
        result = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def group_key(labels: tuple) -> tuple:
    wanted = dict(labels)
    return (wanted["component"], wanted["endpoint"])


def by_group(values: dict[tuple, float]) -> dict[tuple, float]:
    return {group_key(labels): value for labels, value in values.items()}


def test_a_global_prometheus_federating_two_shards_gives_the_whole_fleets_statistics(nats_server, processes,
                                                                                      tmp_path):
    whole = processes.aggregator(nats_server.url)
    replicas = {(shard, replica): processes.aggregator(nats_server.url, "--shards", "2", "--shard", str(shard))
                for shard in (0, 1) for replica in "ab"}
    shard_servers = []
    for shard in (0, 1):
        targets = {f"aggregator-s{shard}-{r}:9091": f"127.0.0.1:{replicas[(shard, r)].port}" for r in "ab"}
        port = free_port()
        config = loopback_config(PROMETHEUS / "ha" / f"shard-{shard}.yml", targets, port)
        shard_servers.append(PrometheusServer(processes, config, tmp_path / f"shard-{shard}", port))
    global_port = free_port()
    config = loopback_config(PROMETHEUS / "ha" / "global.yml",
                             {f"prometheus-s{shard}:9090": f"127.0.0.1:{server.port}"
                              for shard, server in enumerate(shard_servers)}, global_port)
    assert config["scrape_configs"][0]["honor_labels"] is True
    global_server = PrometheusServer(processes, config, tmp_path / "global", global_port)
    start_fleet(processes, nats_server.url)

    expected_workers = len(COMPONENTS) * WORKERS
    # (global series, the reference aggregator's family): the statistics, and the same under the
    # dashboards' names as the global Prometheus records them.
    compared = (("fleet:llm_load_avg:exact", "llm_load_avg"), ("fleet:llm_load_std:exact", "llm_load_std"),
                ("fleet:llm_fleet_kv_hit_rate_percent:exact", "llm_fleet_kv_hit_rate_percent"),
                ("fleet:llm_workers:sum", "llm_workers"), ("llm_load_avg", "llm_load_avg"),
                ("llm_load_std", "llm_load_std"), ("llm_workers", "llm_workers"),
                ("llm_fleet_kv_hit_rate_percent", "llm_fleet_kv_hit_rate_percent"))
    previous: dict = {}

    def settled():
        """The reference at the frozen fleet (two scrapes alike), and the global partial sums equal to its
        partials; each rule group of the global has run since (every compared series has every group)."""
        nonlocal previous
        reference = scrape(whole.url)
        partial_sums = {name: by_group(global_server.query(f"fleet:{name}:sum"))
                        for name in ("llm_load_workers", "llm_load_sum", "llm_load_sum_squares", "llm_workers")}
        want = {name: by_group(samples(reference, name)) for name in partial_sums}
        want["hit_rate"] = by_group(samples(reference, "llm_fleet_kv_hit_rate_isl_blocks",
                                            "llm_fleet_kv_hit_rate_isl_blocks_total"))
        partial_sums["hit_rate"] = by_group(global_server.query("fleet:llm_fleet_kv_hit_rate_isl_blocks_total:sum"))
        done = (partial_sums == want == previous and sum(want["llm_load_workers"].values()) == expected_workers
                and all(set(by_group(global_server.query(name))) == set(want["llm_workers"]) for name, _ in compared))
        previous = want
        return done and reference

    reference = wait_until(settled, 60, interval=1.0, what="the global view at the frozen fleet")
    for name, ours in compared:
        got = by_group(global_server.query(name))
        want = by_group(samples(reference, ours))
        assert set(got) == set(want) and want, (name, got, want)
        for group, value in want.items():
            assert math.isclose(got[group], value, rel_tol=1e-9, abs_tol=1e-9), (name, group, got[group], value)
    assert any(v > 0 for v in by_group(samples(reference, "llm_load_std")).values())  # a spread to compare
    assert by_group(samples(reference, "llm_fleet_kv_hit_rate_percent"))  # hit-rate events were seen
    # Every label the dashboards select on, and both shards present, each through one replica.
    (labels, _), = global_server.query('llm_workers{component="backend"}').items()
    assert dict(labels)["namespace"] == "dynamo"
    assert global_server.query("fleet:llm_aggregator_shards:count") == {(("namespace", "dynamo"), ("shards", "2")): 2}

    def elected_replicas() -> list[tuple[str, str]]:
        elected = global_server.query("shard:llm_aggregator_replica:elected")
        return sorted((dict(labels)["shard"], dict(labels)["replica"]) for labels in elected)

    # One elected replica per shard, and after the elected one of shard 0 stops, only its successor:
    # the old one must not linger beside it in the global view (federated timestamps, no staleness).
    first = wait_until(lambda: len(elected_replicas()) == 2 and elected_replicas(), 20, interval=0.5,
                       what="one elected replica per shard")
    assert [shard for shard, _ in first] == ["0", "1"]
    stopped = first[0][1]
    replicas[(0, stopped)].popen.kill()
    replicas[(0, stopped)].popen.wait(10)
    successor = [("0", "b" if stopped == "a" else "a"), first[1]]
    wait_until(lambda: elected_replicas() == successor, 20, interval=0.5, what="only the successor elected")
