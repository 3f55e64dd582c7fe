"""The compose stack, proved without a Docker engine.

- `docker-compose config` validates compose.yml, `promtool check config` prometheus.yml.
- The dashboards are checked structurally and against their generator.
- The real thing: a real Prometheus, configured from deploy/prometheus.yml with its targets
  rewritten to loopback, scrapes a real aggregator fed by mock workers started with
  compose.yml's own command, all through a nats-server started from deploy/nats-server.conf.
  Then every query of every dashboard panel (and every template-variable query) goes
  through Prometheus's HTTP API and must parse and return at least one finite value.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.parse
from pathlib import Path

import pytest
import yaml

from fleet_demo.nats_server import NatsServer, free_port
from mock_worker.engine import EngineConfig

from ..support import ROOT, AggregatorProcess, Process, http_get, mock_worker, wait_until
from .test_packaging import AGGREGATOR_SIDE, WORKER_SIDE

DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "providers.yml"

# Jobs of deploy/prometheus.yml whose service does not run here; the rewrite drops them.
# Anything else in that file must map to a process the fixture starts (see `rewrite`).
NOT_RUN_HERE = {"nats-prometheus-exporter", "etcd-server", "dcgm-exporter"}
# What Grafana puts in place of its built-in variables, for a 1 s scrape interval:
# $__rate_interval is at least 4 scrape intervals; 10 s leaves room on a loaded machine.
BUILTINS = {"$__rate_interval": "10s", "$__interval": "2s", "$__range": "60s"}
DEADLINE_S = 50.0  # from the stack's start until every query must return data

needs_docker_compose = pytest.mark.skipif(shutil.which("docker-compose") is None,
                                          reason="docker-compose not installed (.ci/run installs it)")
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                      reason="prometheus not installed (.ci/run installs it)")


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def compose_config(*args: str) -> dict:
    result = subprocess.run(["docker-compose", "-f", str(ROOT / "compose.yml"), *args, "config"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def volumes(service: dict) -> dict[str, str]:
    """{target: source} of a service's mounts (docker-compose 1.29 prints the short `src:dst:mode` form)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        mounts[target] = source
    return mounts


def compose_file() -> dict:
    return load_yaml(ROOT / "compose.yml")


# --- compose.yml ------------------------------------------------------------------------

@needs_docker_compose
def test_compose_config_accepts_the_stack():
    config = compose_config()
    # docker-compose 1.29 lists every profile's services; the ha profile's are checked on their own below.
    services = {name: s for name, s in config["services"].items() if "ha" not in s.get("profiles", ())}
    assert set(services) == {"nats-server", "nats-prometheus-exporter", "etcd-server", "aggregator", "mock-worker",
                             "dcgm-exporter", "prometheus", "grafana"}
    # Only dcgm-exporter needs a GPU, so only it sits in a profile: a bare `up` is the demo.
    assert {name for name, s in services.items() if s.get("profiles")} == {"dcgm-exporter"}
    assert services["dcgm-exporter"]["profiles"] == ["gpu"]
    assert services["dcgm-exporter"]["environment"]["NVIDIA_VISIBLE_DEVICES"] == "all"  # CUDA_VISIBLE_DEVICES unset
    for name, service in services.items():
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), (name, image)
        assert service["restart"] == "unless-stopped", name
    published = {name: sorted(p["published"] for p in s.get("ports", [])) for name, s in services.items()}
    assert published == {"nats-server": [4222, 8222], "nats-prometheus-exporter": [7777], "etcd-server": [2379, 2380],
                         "aggregator": [9091], "mock-worker": [], "dcgm-exporter": [9401], "prometheus": [9090],
                         "grafana": [3001]}
    # Health checks: declared in compose, or the image's own (aggregator: Dockerfile HEALTHCHECK);
    # the exporter's image has no shell or client, the mock workers no HTTP endpoint.
    without = {name for name, s in services.items() if "test" not in s.get("healthcheck", {})}
    assert without == {"aggregator", "nats-prometheus-exporter"}
    assert services["mock-worker"]["healthcheck"]["test"] == ["NONE"]  # `disable: true`, as compose normalises it
    # Built here, each from its own Dockerfile target (one side installed in each), under its own name.
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert {name: build["target"] for name, build in built.items()} == {"aggregator": "aggregator",
                                                                          "mock-worker": "mock-worker"}
    assert all(Path(build["context"]) == ROOT for build in built.values())
    assert services["aggregator"]["image"] != services["mock-worker"]["image"]
    assert set(built) == {name for name, s in services.items() if s["image"].endswith(":local")}
    assert {"prometheus-data", "grafana-data", "dynamo-discovery"} <= set(config["volumes"])
    # Dynamo 1.x's capacity lives in its discovery store: the mock workers write their entries in a
    # volume the aggregator reads (read-only), each where its DYN_FILE_KV says.
    for name in ("mock-worker", "aggregator"):
        where = services[name]["environment"]["DYN_FILE_KV"]
        assert volumes(services[name])[where] == "dynamo-discovery", name
    assert services["aggregator"]["environment"]["DYN_DISCOVERY_BACKEND"] == "file"
    modes = {name: [volume.split(":")[2] for volume in services[name]["volumes"] if volume.startswith("dynamo-")]
             for name in ("mock-worker", "aggregator")}
    assert modes == {"mock-worker": ["rw"], "aggregator": ["ro"]}  # docker-compose 1.29's short form
    assert volumes(services["prometheus"])["/prometheus"] == "prometheus-data"
    assert volumes(services["grafana"])["/var/lib/grafana"] == "grafana-data"
    grafana = services["grafana"]["environment"]
    assert (grafana["GF_SECURITY_ADMIN_USER"], grafana["GF_SECURITY_ADMIN_PASSWORD"]) == ("dynamo", "dynamo")
    assert grafana["GF_SERVER_HTTP_PORT"] == "3001"


NATS_NODES = ("nats-1", "nats-2", "nats-3")


@needs_docker_compose
def test_compose_ha_profile_runs_a_3_node_nats_cluster():
    services = compose_config("--profile", "ha")["services"]
    nodes = {name: services[name] for name in NATS_NODES}
    assert all(node["profiles"] == ["ha"] for node in nodes.values())
    # The same image as the single server, each node its own config file, data volume and client port.
    assert {node["image"] for node in nodes.values()} == {services["nats-server"]["image"]}
    data = set()
    for name, node in nodes.items():
        assert node["command"] == ["-c", f"/etc/nats/{name}.conf", "-sd", "/data/jetstream"], name
        mounts = volumes(node)
        assert Path(mounts["/etc/nats"]) == DEPLOY / "nats-cluster", name
        data.add(mounts["/data"])
        assert [p["target"] for p in node["ports"]] == [4222], name
        assert node["healthcheck"]["test"][-1] == "http://127.0.0.1:8222/healthz", name
        assert node["restart"] == "unless-stopped", name
    assert data == {f"{name}-data" for name in NATS_NODES}
    published = [p["published"] for node in nodes.values() for p in node["ports"]]
    others = [p["published"] for name, s in services.items() if name not in nodes for p in s.get("ports", [])]
    assert len(set(published)) == 3 and not set(published) & set(others)
    # Routes: every node's file names the three services on the cluster port it listens on.
    cluster = (DEPLOY / "nats-cluster" / "cluster.conf").read_text()
    assert re.findall(r"nats-route://([\w-]+):(\d+)", cluster) == [(name, "6222") for name in NATS_NODES]
    assert re.search(r"^\s*listen:\s*0\.0\.0\.0:6222$", cluster, re.MULTILINE)


@pytest.mark.parametrize("node", NATS_NODES)
def test_nats_cluster_files_are_valid_for_nats_server(node):
    """nats-server's own check (-t) of each node's file with what it includes; tests/integration/test_nats_cluster.py runs them."""
    from fleet_demo.nats_server import nats_server_binary

    path = DEPLOY / "nats-cluster" / f"{node}.conf"
    assert re.search(rf"^server_name: {node}$", path.read_text(), re.MULTILINE)
    result = subprocess.run([nats_server_binary(), "-c", str(path), "-t"], capture_output=True, text=True, timeout=30,
                            cwd=path.parent)
    assert result.returncode == 0 and "is valid" in result.stdout + result.stderr, result.stdout + result.stderr


@needs_docker_compose
def test_compose_mounts_the_files_that_exist_where_their_consumers_look():
    services = compose_config("--profile", "gpu")["services"]
    binds = {(name, target): Path(source) for name, s in services.items()
             for target, source in volumes(s).items() if source.startswith("/")}
    for (name, _), source in binds.items():
        assert source.exists(), (name, source)
        assert ROOT in source.parents, (name, source)
    assert binds[("prometheus", "/etc/prometheus/prometheus.yml")] == DEPLOY / "prometheus.yml"
    assert binds[("nats-server", "/etc/nats/nats-server.conf")] == DEPLOY / "nats-server.conf"
    # Grafana reads dashboards from where the provider says, and finds Prometheus where the datasource says.
    provider_path = load_yaml(PROVIDERS)["providers"][0]["options"]["path"]
    assert binds[("grafana", provider_path)] == DASHBOARDS
    assert binds[("grafana", "/etc/grafana/provisioning")] == DEPLOY / "grafana" / "provisioning"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DASHBOARDS / Path(home).relative_to(provider_path)).is_file()
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    # Every scrape target of prometheus.yml is a compose service on its published port.
    for job in load_yaml(DEPLOY / "prometheus.yml")["scrape_configs"]:
        for target in [t for c in job.get("static_configs", []) for t in c["targets"]]:
            host, port = target.split(":")
            if host != "localhost":
                assert int(port) in [p["target"] for p in services[host]["ports"]], (job["job_name"], target)
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                assert sd["port"] in [p["target"] for p in services[host]["ports"]], (job["job_name"], host)


HA_AGGREGATORS = {"aggregator-s0-a": 0, "aggregator-s0-b": 0, "aggregator-s1-a": 1, "aggregator-s1-b": 1}
HA_NATS = "nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222"  # the cluster nodes of the `ha` profile


@needs_docker_compose
def test_compose_ha_profile(monkeypatch):
    """2 shards x 2 replicas on the NATS cluster, a Prometheus per shard, a global one and its Grafana
    (docs/sharding.md): every piece points at the others by the names and ports they have."""
    from aggregator.cli import parse_config as aggregator_config
    from aggregator.config import ShardConfig
    from fleet_protocol.partitions import partition
    from mock_worker.cli import parse_config as mock_worker_config

    services = compose_config("--profile", "ha")["services"]
    ha = {name for name, s in services.items() if s.get("profiles") == ["ha"]}
    mine = {*HA_AGGREGATORS, "mock-worker-ha-backend", "mock-worker-ha-prefill", "prometheus-s0", "prometheus-s1",
            "prometheus-global", "grafana-global"}
    assert mine <= ha
    for name in mine:
        service = services[name]
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), (name, image)
        assert service["restart"] == "unless-stopped", name
    # The aggregators: one shard each, two replicas per shard, every NATS node; as the program reads them.
    for name, shard in HA_AGGREGATORS.items():
        service = services[name]
        assert service["build"]["target"] == "aggregator" and service["image"] == services["aggregator"]["image"]
        assert service["environment"]["NATS_SERVER"] == HA_NATS
        assert "ports" not in service  # reached through their shard's Prometheus
        with monkeypatch.context() as env:
            for key, value in service["environment"].items():
                env.setenv(key, str(value))
            config = aggregator_config(service["command"][1:])
        assert config.shard == ShardConfig(count=2, index=shard), name
        assert config.nats.urls == tuple(HA_NATS.split(","))
    # The fleet: on the cluster, a component in each shard.
    components = set()
    for name in ("mock-worker-ha-backend", "mock-worker-ha-prefill"):
        service = services[name]
        assert service["environment"]["NATS_SERVER"] == HA_NATS
        with monkeypatch.context() as env:
            for key, value in service["environment"].items():
                env.setenv(key, str(value))
            components.add(mock_worker_config(service["command"][1:]).component)
    assert {partition(component, 2) for component in components} == {0, 1}
    # Each shard's Prometheus scrapes the two replicas of its shard, as replicas a and b of one job.
    prometheus_files = {}
    for name in ("prometheus-s0", "prometheus-s1", "prometheus-global"):
        service = services[name]
        assert volumes(service)["/etc/prometheus"] == str(DEPLOY / "prometheus")
        (flag,) = [arg for arg in service["command"] if arg.startswith("--config.file=")]
        path = DEPLOY / "prometheus" / Path(flag.split("=", 1)[1]).relative_to("/etc/prometheus")
        prometheus_files[name] = load_yaml(path)
        for rules in prometheus_files[name]["rule_files"]:
            assert (path.parent / rules).resolve().is_file(), (name, rules)
    for shard in (0, 1):
        (job,) = [j for j in prometheus_files[f"prometheus-s{shard}"]["scrape_configs"] if j["job_name"] == "aggregator"]
        targets = {t: static["labels"] for static in job["static_configs"] for t in static["targets"]}
        assert targets == {f"aggregator-s{shard}-{r}:9091": {"namespace": "dynamo", "replica": r} for r in "ab"}
        assert [Path(f).name for f in prometheus_files[f"prometheus-s{shard}"]["rule_files"]] == ["replicas.rules.yml"]
    # The global one federates both shard Prometheus servers, on the port they listen on.
    (federate,) = [j for j in prometheus_files["prometheus-global"]["scrape_configs"] if j["job_name"] == "federate"]
    assert federate["honor_labels"] is True and federate["metrics_path"] == "/federate"
    assert federate["static_configs"][0]["targets"] == ["prometheus-s0:9090", "prometheus-s1:9090"]
    assert [Path(f).name for f in prometheus_files["prometheus-global"]["rule_files"]] == [
        "fleet.rules.yml", "fleet-dashboards.rules.yml"]
    external = prometheus_files["prometheus-global"]["global"]["external_labels"]
    assert {"cluster", "__replica__", "prometheus_replica"} <= set(external)
    # Grafana on the global Prometheus, with the same dashboards and the uid their panels name.
    grafana = services["grafana-global"]
    mounts = volumes(grafana)
    (datasource,) = load_yaml(Path(mounts["/etc/grafana/provisioning/datasources"]) / "prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus-global:9090" and datasource["uid"] == "prometheus"
    assert mounts["/etc/grafana/dashboards"] == str(DASHBOARDS)
    assert Path(mounts["/etc/grafana/provisioning/dashboards"]) == PROVIDERS.parent
    published = {name: sorted(p["published"] for p in services[name].get("ports", [])) for name in mine}
    taken = {p["published"] for name, s in services.items() if name not in mine for p in s.get("ports", [])}
    assert not taken & {port for ports in published.values() for port in ports}
    assert published["prometheus-global"] == [9190] and published["grafana-global"] == [3002]


def test_compose_commands_are_accepted_by_the_programs(monkeypatch):
    """The aggregator and mock-worker commands and environment of compose.yml, through the real parsers."""
    from aggregator.cli import parse_config as aggregator_config
    from mock_worker.cli import parse_config as mock_worker_config

    services = compose_file()["services"]
    parsed = {}
    for name, parse in (("aggregator", aggregator_config), ("mock-worker", mock_worker_config)):
        service = services[name]
        with monkeypatch.context() as env:
            for key, value in service["environment"].items():
                env.setenv(key, str(value))
            command = service["command"]
            assert command[0] in {"llm-aggregator", "llm-mock-worker"}
            try:
                parsed[name] = parse(command[1:])
            except SystemExit as exit_:
                pytest.fail(f"compose.yml's {name} command {command} is refused: exit {exit_.code}")
    # The mock workers publish Dynamo 1.x on NATS and register where the aggregator reads discovery.
    worker, aggregator = parsed["mock-worker"], parsed["aggregator"]
    assert (worker.protocol, worker.event_plane, worker.mode) == ("dynamo-1", "nats", "push")
    assert aggregator.discovery is not None and aggregator.discovery.backend == "file"
    assert worker.discovery_file_kv == aggregator.discovery.file_kv


# --- Dockerfile --------------------------------------------------------------------------

def dockerfile_healthcheck() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, re.MULTILINE)
    assert match, "no HEALTHCHECK ... CMD [...] in the Dockerfile"
    return json.loads(match.group(1))


def dockerfile_stages() -> dict[str, str]:
    """{stage name: its lines} of the Dockerfile, in order."""
    text = (ROOT / "Dockerfile").read_text()
    parts = re.split(r"^FROM (\S+) AS (\S+)$", text, flags=re.MULTILINE)
    return {name: f"FROM {image}\n{body}" for image, name, body in zip(parts[1::3], parts[2::3], parts[3::3], strict=True)}


def test_dockerfile_targets_install_one_side_each_and_dockerignore_lets_it_through():
    stages = dockerfile_stages()
    assert list(stages) == ["base", "mock-worker", "aggregator"]  # the last, the default target: the service
    assert re.match(r"FROM python:\d+\.\d+\.\d+-slim-\w+$", stages["base"], re.MULTILINE), "pinned slim base"
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}

    def copied(stage: str) -> list[str]:
        return [c for line in re.findall(r"^COPY (.+)$", stages[stage], re.MULTILINE) for c in line.split()[:-1]]

    packages = {}
    for target, extra, side in (("aggregator", "aggregator", AGGREGATOR_SIDE), ("mock-worker", "worker", WORKER_SIDE)):
        assert stages[target].startswith("FROM base\n"), target
        assert re.search(r"^USER (?!root|0\b)\S+$", stages[target], re.MULTILINE), f"{target} runs as non-root"
        assert f'RUN pip install ".[{extra}]"' in stages[target], target
        sources = copied("base") + copied(target)
        for source in sources:
            assert (ROOT / source).exists() and source in allowed, (target, source)
        # Exactly the packages of its side (tests/integration/test_packaging.py runs each side with the others refused).
        packages[target] = {source for source in sources if (ROOT / source).is_dir()}
        assert packages[target] == set(side), target
    # Every package pyproject.toml installs is in an image, but the demo's (it runs both sides in one process).
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.rstrip("*") for pattern in include} - set().union(*packages.values()) == {"fleet_demo"}


def test_dockerfile_healthcheck_follows_the_aggregators_health(processes):
    """The image's HEALTHCHECK command, run as Docker would, against a real aggregator."""
    command = dockerfile_healthcheck()
    assert command[0] == "python"

    def check(port: int) -> int:
        return subprocess.run([sys.executable, *command[1:]], env={"AGGREGATOR_PORT": str(port)},
                              capture_output=True, timeout=30).returncode

    with NatsServer() as nats:
        healthy = processes.aggregator(nats.url)
        assert check(healthy.port) == 0
    # NATS gone: /health answers 503 and the check fails; nothing listening fails too.
    wait_until(lambda: healthy.health() == 503, 15, what="aggregator unhealthy without NATS")
    assert check(healthy.port) != 0
    assert check(free_port()) != 0


# --- prometheus.yml -----------------------------------------------------------------------

@needs_prometheus
def test_promtool_accepts_prometheus_yml():
    result = subprocess.run(["promtool", "check", "config", str(DEPLOY / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"]: job for job in load_yaml(DEPLOY / "prometheus.yml")["scrape_configs"]}
    assert set(jobs) == NOT_RUN_HERE | {"aggregator", "prometheus"}
    assert jobs["aggregator"]["scrape_interval"] == "2s"
    (aggregator,) = jobs["aggregator"]["static_configs"]
    assert aggregator["targets"] == ["aggregator:9091"] and aggregator["labels"]["namespace"]


# --- dashboards -----------------------------------------------------------------------------

def pinned_dashboard_sdk() -> str:
    """The grafana-foundation-sdk version of pyproject.toml's `dashboards` extra."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dashboards"]
    (version,) = [r.split("==", 1)[1] for r in extra if r.startswith("grafana-foundation-sdk==")]
    return version


def test_dashboards_are_the_generators_output():
    pytest.importorskip("grafana_foundation_sdk", reason="the `dashboards` extra is not installed "
                        "(pip install -e '.[dashboards]'; .ci/run installs it)")
    # Another SDK build may write other defaults: regenerate with the pinned one only.
    installed = importlib.metadata.version("grafana-foundation-sdk")
    assert installed == pinned_dashboard_sdk(), f"grafana-foundation-sdk {installed} is not the pinned build"
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    rendered = generate.render()
    assert sorted(rendered) == sorted(p.name for p in DASHBOARDS.glob("*.json"))
    for name, text in rendered.items():
        assert (DASHBOARDS / name).read_text() == text, f"{name} is stale: python3 deploy/grafana/generate.py"


def variable_query(variable: dict) -> str:
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else query


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows
    return [p for p in panels if p["type"] != "row"]


def test_dashboard_structure():
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    provisioned = {"type": datasource["type"], "uid": datasource["uid"]}
    boards = dashboards()
    assert set(boards) == {"llm-fleet.json", "gpus.json", "components.json", "aggregator.json", "dynamo-v1.json"}
    uids = [board["uid"] for board in boards.values()]
    assert len(set(uids)) == len(uids)
    assert len({board["title"] for board in boards.values()}) == len(boards)
    for name, board in boards.items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert "namespace" in variables, name
        for variable in variables.values():
            assert variable["datasource"] == provisioned, (name, variable["name"])
            assert variable_query(variable).startswith("label_values("), (name, variable["name"])
        panels = all_panels(board)
        assert panels, name
        ids = [p["id"] for p in panels]
        assert len(set(ids)) == len(ids), name
        used: set[str] = set()
        for panel in panels:
            where = f"{name}: {panel['title']}"
            assert panel["datasource"] == provisioned, where
            assert panel["targets"], where
            refs = [t["refId"] for t in panel["targets"]]
            assert len(set(refs)) == len(refs), where
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, where
            for target in panel["targets"]:
                assert target["datasource"] == provisioned, where
                assert target["expr"].strip(), where
                refs_in_expr = set(re.findall(r"\$(\w+)", target["expr"]))
                unknown = {r for r in refs_in_expr if not r.startswith("__")} - set(variables)
                assert not unknown, (where, unknown)
                builtins = {f"${r}" for r in refs_in_expr if r.startswith("__")}
                assert builtins <= set(BUILTINS), (where, builtins)
                used |= refs_in_expr
        for variable in variables.values():
            used |= set(re.findall(r"\$(\w+)", variable_query(variable)))
        assert set(variables) <= used, (name, set(variables) - used)


# --- the real thing: Prometheus scraping the aggregator --------------------------------------

def rewrite(config: dict, targets: dict[str, str]) -> dict:
    """deploy/prometheus.yml for loopback: targets mapped, 1 s scrapes, jobs of absent services dropped."""
    config = json.loads(json.dumps(config))  # a deep copy
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    kept = []
    for job in config["scrape_configs"]:
        if job["job_name"] in NOT_RUN_HERE:
            continue
        job["scrape_interval"] = job["scrape_timeout"] = "1s"
        for static in job["static_configs"]:
            static["targets"] = [targets[t] for t in static["targets"]]
        kept.append(job)
    assert {job["job_name"] for job in config["scrape_configs"]} - NOT_RUN_HERE == {j["job_name"] for j in kept}
    config["scrape_configs"] = kept
    return config


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params) -> dict:
        status, _, body = http_get(f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}", timeout=10)
        payload = json.loads(body)
        if status != 200 or payload.get("status") != "success":
            raise QueryError(payload.get("error", f"HTTP {status}"))
        return payload["data"]

    def label_values(self, definition: str) -> list[str]:
        match = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", definition.strip())
        assert match, definition
        selector, label = match.groups()
        now = time.time()
        if selector is None:
            return self.get(f"/api/v1/label/{label}/values", start=now - 120, end=now)
        series = self.get("/api/v1/series", **{"match[]": selector, "start": now - 120, "end": now})
        return sorted({s[label] for s in series if s.get(label)})

    def check(self, expr: str) -> str | None:
        """None when `expr` parses and returns a finite value over the last 20 s, else why not."""
        now = time.time()
        try:
            data = self.get("/api/v1/query_range", query=expr, start=now - 20, end=now, step=1)
        except QueryError as error:
            return f"error: {error}"
        if not data["result"]:
            return "no data"
        if not any(math.isfinite(float(v)) for series in data["result"] for _, v in series["values"]):
            return "only NaN/Inf"
        return None


class QueryError(Exception):
    pass


@pytest.fixture(scope="module")
def stack():
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (.ci/run installs it)")
    started: list[Process] = []
    tmp = Path(tempfile.mkdtemp(prefix="stack-"))
    nats = NatsServer(config=str(DEPLOY / "nats-server.conf"), jetstream=True,
                      extra_args=["-m", str(free_port()), "--server_name", "stack-test"])
    try:
        nats.start()
        services = compose_file()["services"]
        # compose.yml's environment, its discovery volume a directory here (shared as the volume is).
        discovery = tmp / "discovery"
        discovery.mkdir()
        aggregator = AggregatorProcess(nats.url, "--stale-after", "3",
                                       env=compose_env(services["aggregator"], discovery))
        started.append(aggregator)
        aggregator.wait_live()
        # compose.yml's mock-worker command and environment (Dynamo 1.x, registered in discovery), as many
        # replicas as it runs, publishing faster.
        worker = services["mock-worker"]
        for _ in range(worker["deploy"]["replicas"]):
            started.append(Process([sys.executable, "-m", "mock_worker", "--nats-url", nats.url,
                                    *supported_mock_worker_args(worker["command"][1:]), "--interval", "0.5"],
                                   env=compose_env(worker, discovery)))
        # Dynamo 0.x workers for the targets only its JSON feeds (hit-rate events: 1.x has none), named as
        # Dynamo 0.x's examples named theirs.
        started.append(mock_worker(nats.url, "--protocol", "legacy", "--component", LEGACY_COMPONENT,
                                   "--workers", "2", "--interval", "0.5"))
        # A second component whose workers stop after 4 s: expiries are real, not absent.
        started.append(mock_worker(nats.url, "--component", "prefill", "--endpoint", "prefill", "--workers", "2",
                                   "--interval", "0.5", "--duration", "4"))
        # Dynamo 1.x workers built on fleet_protocol's encoders alone (the real runtime's bytes), beside the mock.
        started.append(Process([sys.executable, "-m", "tests.dynamo1_publisher", nats.url, "--workers", "2",
                                "--interval", "0.5"]))
        prometheus_port = free_port()
        config = rewrite(load_yaml(DEPLOY / "prometheus.yml"), {
            "aggregator:9091": f"127.0.0.1:{aggregator.port}",
            "localhost:9090": f"127.0.0.1:{prometheus_port}",
        })
        config_path = tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        check = subprocess.run(["promtool", "check", "config", str(config_path)], capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        prometheus = Process(["prometheus", f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'data'}",
                              f"--web.listen-address=127.0.0.1:{prometheus_port}"])
        started.append(prometheus)
        api = Prometheus(f"http://127.0.0.1:{prometheus_port}")
        try:
            wait_until(lambda: http_get(f"{api.base}/-/ready")[0] == 200, 30, what="Prometheus ready")
        except AssertionError:
            raise AssertionError(prometheus.output()) from None
        yield {"api": api, "nats": nats, "started": time.monotonic(), "aggregator": aggregator,
               "compose_workers": worker["deploy"]["replicas"] * compose_mock_workers(worker)}
    finally:
        for process in reversed(started):
            process.stop()
        nats.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        if nats.store_dir:
            shutil.rmtree(nats.store_dir, ignore_errors=True)


LEGACY_COMPONENT = "VllmWorker"


def compose_env(service: dict, discovery: Path) -> dict[str, str]:
    """A compose service's environment for a process here: its DYN_FILE_KV the test's directory."""
    env = {key: str(value) for key, value in service["environment"].items()}
    env["DYN_FILE_KV"] = str(discovery)
    return env


def compose_mock_workers(service: dict) -> int:
    """Simulated workers per replica of compose.yml's mock-worker service, as its own parser reads them."""
    from mock_worker.cli import parser

    return parser().parse_known_args(service["command"][1:])[0].workers


def supported_mock_worker_args(args: list[str]) -> list[str]:
    """compose.yml's mock-worker arguments that this checkout's mock_worker knows.

    Only matters before the GPU-telemetry branch (`--gpu simulated`) is merged:
    test_compose_commands_are_accepted_by_the_programs fails on any unknown argument, so this
    tolerance cannot hide a wrong command, and the GPU dashboard fails for lack of data.
    """
    from mock_worker.__main__ import parser

    _, unknown = parser().parse_known_args(args)
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in unknown:
            skip = True  # the flag's value follows it
        else:
            kept.append(arg)
    return kept


def test_nats_server_conf_runs_with_jetstream_and_monitoring(stack):
    nats = stack["nats"]
    monitor = int(nats.extra_args[1])
    status, _, body = http_get(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true")
    assert status == 200, body
    varz = json.loads(http_get(f"http://127.0.0.1:{monitor}/varz")[2])
    assert varz["jetstream"]["config"]["max_memory"] == 256 * 1024 * 1024
    assert varz["max_payload"] == 1024 * 1024


def test_the_compose_mock_workers_reach_prometheus_as_dynamo_1_with_their_capacity(stack):
    """compose.yml's workers speak 1.x: their 1.x-only series, and the capacity their discovery entries give."""
    api, count = stack["api"], stack["compose_workers"]
    mock_ids = 'worker_id!~"99999.*"'  # not tests.dynamo1_publisher's workers, which register nowhere

    def values(expr: str) -> dict[str, float]:
        return {r["metric"]["worker_id"]: float(r["value"][1]) for r in api.get("/api/v1/query", query=expr)["result"]}

    def scraped() -> dict[str, float]:
        found = values(f'llm_kv_active_decode_blocks{{component="backend", {mock_ids}}}')
        return found if len(found) == count else {}

    workers = wait_until(scraped, 30, what=f"{count} compose mock workers' 1.x series")
    engine = EngineConfig()
    assert values(f'llm_kv_blocks_total{{component="backend", {mock_ids}}}') == dict.fromkeys(workers,
                                                                                               engine.total_blocks)
    assert values(f'llm_requests_total_slots{{component="backend", {mock_ids}}}') == dict.fromkeys(
        workers, engine.total_slots)
    assert values('llm_kv_hit_rate_percent{component="backend"}') == {}  # 1.x has no hit-rate events
    assert len(values(f'llm_kv_hit_rate_percent{{component="{LEGACY_COMPONENT}"}}')) == 2  # the legacy ones do


def test_the_query_checker_can_fail(stack):
    api = stack["api"]
    wait_until(lambda: api.check("up") is None, 30, what="Prometheus scraping")
    assert api.check("llm_no_such_metric") == "no data"
    assert api.check("rate(llm_workers[").startswith("error:")
    assert api.check("0 / 0") == "only NaN/Inf"


def substitute(text: str, values: dict[str, str]) -> str:
    for name, value in BUILTINS.items():
        text = text.replace(name, value)
    # Longest names first, so $worker never eats part of a hypothetical $worker_id.
    for name in sorted(values, key=len, reverse=True):
        text = text.replace(f"${name}", values[name])
    return text


def resolve_variables(api: Prometheus, board: dict, concrete: bool,
                      component: str | None = None) -> tuple[dict[str, str], list[str]]:
    """Values as Grafana would choose them: the first value (or `component` for $component, when it is
    one of the options), or `.*` for an "All" multi-value variable."""
    values, problems = {}, []
    for variable in board["templating"]["list"]:
        definition = substitute(variable_query(variable), values)
        try:
            options = api.label_values(definition)
        except QueryError as error:
            options, problems = [], problems + [f"variable ${variable['name']}: {definition}: error: {error}"]
        if not options:
            problems.append(f"variable ${variable['name']}: {definition}: no values")
            values[variable["name"]] = "no-value"
        elif variable.get("includeAll") and not concrete:
            values[variable["name"]] = variable["allValue"]
        else:
            chosen = component if variable["name"] == "component" and component in options else options[0]
            values[variable["name"]] = re.escape(chosen) if variable.get("multi") else chosen
    return values, problems


def dashboard_failures(api: Prometheus, board: dict) -> list[str]:
    """Every query must return data with every variable at "All", and with one value each for some
    component: a panel can show 0.x and 1.x workers side by side, each target reading one of them."""
    values, failures = resolve_variables(api, board, False)
    failures = [f"[All] {p}" for p in failures]
    for panel in all_panels(board):
        for target in panel["targets"]:
            expr = substitute(target["expr"], values)
            why = api.check(expr)
            if why:
                failures.append(f"[All] {panel['title']} / {target['refId']}: {why}: {expr}")
    first, problems = resolve_variables(api, board, True)
    failures += [f"[one value each] {p}" for p in problems]
    selections = [first]
    if "component" in first:
        for component in api.label_values(substitute(variable_query(component_variable(board)), first)):
            selections.append(resolve_variables(api, board, True, component)[0])
    for panel in all_panels(board):
        for target in panel["targets"]:
            whys = []
            for chosen in selections:
                whys.append(api.check(substitute(target["expr"], chosen)))
                if whys[-1] is None:
                    break
            else:
                failures.append(f"[one value each] {panel['title']} / {target['refId']}: {whys[0]}, and for every "
                                f"other component: {substitute(target['expr'], first)}")
    return failures


def component_variable(board: dict) -> dict:
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "component"]
    return variable


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["llm-fleet.json", "aggregator.json", "gpus.json", "components.json",
                                  "dynamo-v1.json"])
def test_every_dashboard_query_returns_data_from_a_real_prometheus(stack, name):
    api, board = stack["api"], dashboards()[name]
    deadline = stack["started"] + DEADLINE_S
    failures = dashboard_failures(api, board)
    while failures and time.monotonic() < deadline:  # data arrives with the first scrapes and rate windows
        time.sleep(2)
        failures = dashboard_failures(api, board)
    assert not failures, f"{name}: {len(failures)} queries without data:\n" + "\n".join(failures)
    # The namespace the dashboards offer is the one prometheus.yml gives the aggregator's target.
    (job,) = [j for j in load_yaml(DEPLOY / "prometheus.yml")["scrape_configs"] if j["job_name"] == "aggregator"]
    namespace = board["templating"]["list"][0]
    assert api.label_values(variable_query(namespace)) == [job["static_configs"][0]["labels"]["namespace"]]
