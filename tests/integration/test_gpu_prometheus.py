"""A real Prometheus scrapes the aggregator: DCGM-style queries work on what it stores."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.parse
from pathlib import Path

import pytest

from fleet_demo.nats_server import free_port

from ..support import Process, http_get, mock_worker, wait_until

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="Debian's prometheus is installed by .ci/run")


def query(base: str, promql: str) -> list[dict]:
    status, _, body = http_get(f"{base}/api/v1/query?query={urllib.parse.quote(promql)}")
    assert status == 200, body
    return json.loads(body)["data"]["result"]


def test_prometheus_reads_dcgm_names_and_energy_rate_gives_power(nats_server, processes):
    aggregator = processes.aggregator(nats_server.url)
    processes.add(mock_worker(nats_server.url, "--workers", "2", "--interval", "0.25", "--seed", "5",
                              "--gpu", "simulated", "--gpus-per-worker", "2", "--gpu-interval", "0.25"))
    workdir = Path(tempfile.mkdtemp(prefix="prom-"))
    (workdir / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: aggregator\n    static_configs: [{{targets: ['127.0.0.1:{aggregator.port}']}}]\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    prometheus = processes.add(Process([
        "prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]))

    # The query dashboard 12239 runs (it filters by instance and gpu only).
    util = wait_until(lambda: len(query(base, 'DCGM_FI_DEV_GPU_UTIL{gpu="0"}')) == 2 and
                      query(base, 'DCGM_FI_DEV_GPU_UTIL{gpu="0"}'), 30, what=f"scraped GPUs\n{prometheus.output()}")
    assert {r["metric"]["modelName"] for r in util} == {"NVIDIA H100 80GB HBM3"}
    # Energy is a counter in meaning: its rate, in W, matches the reported power draw.
    # (once the window is full: rate() divides by the whole range)
    wait_until(lambda: len(query(base, "count_over_time(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION[6s]) >= 6")) == 4,
               30, what="6 s of energy samples")
    rates = query(base, "rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION[6s]) / 1000")
    assert len(rates) == 4
    power = {r["metric"]["UUID"]: float(r["value"][1])
             for r in query(base, "avg_over_time(DCGM_FI_DEV_POWER_USAGE[6s])")}
    for result in rates:
        assert float(result["value"][1]) == pytest.approx(power[result["metric"]["UUID"]], rel=0.15)
    status, _, body = http_get(f"{base}/api/v1/metadata?metric=DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")
    assert json.loads(body)["data"]["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"][0]["type"] == "gauge"
    (gpus,) = query(base, "sum(llm_gpus)")
    assert float(gpus["value"][1]) == 4
