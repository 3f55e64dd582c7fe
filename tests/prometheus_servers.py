"""Real Prometheus servers on loopback, configured from deploy/prometheus's own files."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import yaml

from fleet_demo.nats_server import free_port

from .support import ROOT, Process, http_get, wait_until

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules"

needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                      reason="prometheus not installed (.ci/run installs it)")


def loopback_config(path: Path, targets: dict[str, str], port: int, *, interval: str = "1s",
                    extra_rule_files: tuple[Path, ...] = (), rule_files: tuple[Path, ...] | None = None) -> dict:
    """A deploy/prometheus config for loopback: its targets mapped (`targets`, compose name -> host:port;
    the `prometheus` job to `port`), every interval `interval`, its rule files as absolute paths."""
    config = copy.deepcopy(yaml.safe_load(path.read_text()))
    config["global"].update(scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval)
    mapped = {**targets, "localhost:9090": f"127.0.0.1:{port}"}
    for job in config["scrape_configs"]:
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
        for static in job["static_configs"]:
            static["targets"] = [mapped[target] for target in static["targets"]]
    files = [(path.parent / name).resolve() for name in config.get("rule_files", [])] if rule_files is None \
        else list(rule_files)
    config["rule_files"] = [str(file) for file in (*files, *extra_rule_files)]
    return config


class PrometheusServer:
    """One `prometheus` process (started through `processes`, which stops it) and its HTTP API."""

    def __init__(self, processes, config: dict, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        check = subprocess.run(["promtool", "check", "config", str(config_path)], capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        self.process = processes.add(Process([
            "prometheus", f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}"]))
        try:
            wait_until(lambda: http_get(f"{self.base}/-/ready")[0] == 200, 30, what="Prometheus ready")
        except AssertionError:
            raise AssertionError(self.process.output()) from None

    def get(self, path: str, **params) -> dict:
        status, _, body = http_get(f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}", timeout=10)
        payload = json.loads(body)
        assert status == 200 and payload.get("status") == "success", payload
        return payload["data"]

    def query(self, expr: str, at: float | None = None) -> dict[tuple, float]:
        """An instant query: {sorted label items, without __name__: value}."""
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        data = self.get("/api/v1/query", **params)
        assert data["resultType"] == "vector", data
        return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")): float(r["value"][1])
                for r in data["result"]}

    def samples(self, selector: str, seconds: float, at: float) -> dict[tuple, list[tuple[float, float]]]:
        """The raw samples of `selector` over the `seconds` before `at`: {labels: [(timestamp, value)]}."""
        data = self.get("/api/v1/query", query=f"{selector}[{int(seconds * 1000)}ms]", time=at)
        assert data["resultType"] == "matrix", data
        return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")):
                [(float(t), float(v)) for t, v in r["values"]] for r in data["result"]}
