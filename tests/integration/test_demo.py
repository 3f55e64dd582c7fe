"""The README's demo command works with nothing else running."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fleet_demo.nats_server import free_port
from mock_worker.engine import EngineConfig

from ..support import Process, samples, scrape, wait_until


def test_demo_serves_live_fleet_metrics_and_stops_cleanly(processes):
    port = free_port()
    demo = processes.add(Process([sys.executable, "-m", "fleet_demo", "--port", str(port),
                                  "--workers", "3", "--interval", "0.2"], env={"DYN_LOGGING_JSONL": "true"}))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: sum(samples(scrape(url), "llm_workers").values()) == 3, 20,
               what=f"3 demo workers\n{demo.output()}")
    # Dynamo 1.x workers: their load from the event plane, their capacity from the demo's discovery directory.
    families = wait_until(lambda: (found := scrape(url)) and len(samples(found, "llm_kv_blocks_total")) == 3
                          and found, 20, what=f"capacity from discovery\n{demo.output()}")
    active = samples(families, "llm_kv_blocks_active")
    assert len(active) == 3
    engine = EngineConfig()  # the mock workers' engines, whose capacity their model cards give
    assert samples(families, "llm_kv_blocks_total") == dict.fromkeys(active, engine.total_blocks)
    assert samples(families, "llm_requests_total_slots") == dict.fromkeys(active, engine.total_slots)
    assert all(0 <= value <= engine.total_blocks for value in active.values())
    assert len(samples(families, "llm_kv_active_decode_blocks")) == 3  # a 1.x-only series
    assert samples(families, "llm_kv_hit_rate_percent") == {}  # the legacy hit-rate events: none
    # simulated GPUs, 2 per worker by default
    wait_until(lambda: len(samples(scrape(url), "DCGM_FI_DEV_GPU_UTIL")) == 6, 20, what="demo GPUs")

    def discovery_directories() -> set[str]:
        """The directory its "demo running" line names (logged a moment after the workers start)."""
        lines = [json.loads(line) for line in demo.output().splitlines() if line.startswith("{")]
        return {line["discovery"] for line in lines if "discovery" in line}

    (discovery,) = wait_until(discovery_directories, 10, what=f"the demo's running line\n{demo.output()}")
    assert Path(discovery).is_dir() and any(Path(discovery).rglob("*"))
    assert demo.stop() == 0  # SIGTERM (like Ctrl-C) stops nats-server, aggregator and workers
    assert "Traceback" not in demo.output()
    assert not Path(discovery).exists()  # the temporary discovery directory goes with the demo


def test_ctrl_c_in_a_terminal_stops_everything_cleanly(processes):
    """A terminal's Ctrl-C signals the whole foreground process group, nats-server included."""
    import os
    import signal
    import subprocess

    port = free_port()
    demo = subprocess.Popen([sys.executable, "-m", "fleet_demo", "--port", str(port), "--workers", "2",
                             "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group, like a shell job
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: sum(samples(scrape(url), "llm_workers").values()) == 2, 20, what="2 demo workers")
        os.killpg(demo.pid, signal.SIGINT)
        output, _ = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
    assert demo.returncode == 0, output
    assert "Traceback" not in output and "did not drain" not in output, output
