"""The benchmark runs end to end at toy size, so it cannot rot (its figures are not judged here)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from ..support import ROOT


@pytest.mark.skipif(shutil.which("prometheus-pushgateway") is None,
                    reason="the Pushgateway peer is installed by .ci/run (Debian prometheus-pushgateway)")
@pytest.mark.timeout(240)
def test_quick_benchmark_writes_every_row(tmp_path):
    output = tmp_path / "RESULTS.md"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--output", str(output)], cwd=ROOT,
                            capture_output=True, text=True, timeout=230)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in output.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    measures = [row.split("|")[1].strip() for row in rows[1:]]
    for prefix in ("bare nats-py ceiling", "aggregator ingest", "freshness", "/metrics text", "/metrics openmetrics",
                   "ingest during back-to-back scrapes", "ingest during back-to-back status page loads", "status /",
                   "ingest of full workers", "RSS per live worker", "RSS after",
                   "Pushgateway pushes/s",
                   "Pushgateway /metrics", "bare nats-py ceiling, Dynamo 1.x kv_metrics envelopes",
                   "aggregator ingest, Dynamo 1.x kv_metrics envelopes",
                   "aggregator ingest, Dynamo 1.x kv_metrics over ZMQ", "Dynamo 1.x kv-events block changes",
                   "RSS per tracked Dynamo 1.x worker", "RSS per tracked KV block"):
        assert any(m.startswith(prefix) for m in measures), (prefix, measures)
    assert "x the Pushgateway's time" in output.read_text()
    assert " per message" in output.read_text() and "in the aggregator" in output.read_text()


def test_benchmark_finds_nats_server_when_the_scripts_folder_is_not_on_path():
    """Run from a venv without activating it: nats-server is beside this Python, not on PATH."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    result = subprocess.run([sys.executable, "-c", "from bench.__main__ import machine; print(machine())"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nats-server: v" in result.stdout, result.stdout
