"""The README's demo command works with nothing else running."""

from __future__ import annotations

import sys

from fleet_demo.nats_server import free_port

from .support import Process, samples, scrape, wait_until


def test_demo_serves_live_fleet_metrics_and_stops_cleanly(processes):
    port = free_port()
    demo = processes.add(Process([sys.executable, "-m", "fleet_demo", "--port", str(port),
                                  "--workers", "3", "--interval", "0.2"]))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: sum(samples(scrape(url), "llm_workers").values()) == 3, 20,
               what=f"3 demo workers\n{demo.output()}")
    assert len(samples(scrape(url), "llm_kv_blocks_active")) == 3
    # simulated GPUs, 2 per worker by default
    wait_until(lambda: len(samples(scrape(url), "DCGM_FI_DEV_GPU_UTIL")) == 6, 20, what="demo GPUs")
    assert demo.stop() == 0  # SIGTERM (like Ctrl-C) stops nats-server, aggregator and workers
    assert "Traceback" not in demo.output()


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
