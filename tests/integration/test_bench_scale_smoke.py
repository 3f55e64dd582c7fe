"""`python -m bench.scale` runs end to end at toy size, so it cannot rot (its timings are not judged here;
what it reports about the split and the global view is)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ..support import ROOT


@pytest.mark.timeout(300)
def test_quick_scale_benchmark_reports_every_shard_and_the_global_view(tmp_path):
    output = tmp_path / "SCALE.md"
    figures = tmp_path / "scale.json"
    result = subprocess.run([sys.executable, "-m", "bench.scale", "--quick", "--output", str(output),
                             "--json", str(figures)], cwd=ROOT, capture_output=True, text=True, timeout=290)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(figures.read_text())
    assert [(run["shards"], run["split"]) for run in runs] == [(1, "client"), (2, "client"), (2, "server")]
    for run in runs:
        shards = run["per_shard"]
        assert [s["workers"] for s in shards] == [s["share"] for s in shards]  # every worker, once
        assert sum(s["share"] for s in shards) == run["offered_per_s"]
        if run["split"] == "server":
            assert all(s["skipped_per_s"] == 0 for s in shards)  # nats-server sent each shard its own only
        elif run["shards"] > 1:
            assert all(s["skipped_per_s"] > 0 for s in shards)
        if shutil.which("prometheus"):
            assert run["view"]["max_rel_error"] <= 1e-9
    rows = [line for line in output.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 2 + 5 + 3  # two headers, five shard rows, three configuration rows
