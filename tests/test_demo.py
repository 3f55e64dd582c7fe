"""The README's demo command works with nothing else running."""

from __future__ import annotations

import sys

from aggregator.embedded_nats import free_port

from .support import Process, samples, scrape, wait_until


def test_demo_serves_live_fleet_metrics_and_stops_cleanly(processes):
    port = free_port()
    demo = processes.add(Process([sys.executable, "-m", "aggregator.demo", "--port", str(port),
                                  "--workers", "3", "--interval", "0.2"]))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: sum(samples(scrape(url), "llm_workers").values()) == 3, 20,
               what=f"3 demo workers\n{demo.output()}")
    assert len(samples(scrape(url), "llm_kv_blocks_active")) == 3
    # simulated GPUs, 2 per worker by default
    wait_until(lambda: len(samples(scrape(url), "DCGM_FI_DEV_GPU_UTIL")) == 6, 20, what="demo GPUs")
    assert demo.stop() == 0  # SIGTERM (like Ctrl-C) stops nats-server, aggregator and workers
    assert "Traceback" not in demo.output()
