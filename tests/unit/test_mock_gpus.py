"""Simulated GPUs follow the simulated engine's load, on plain values."""

from __future__ import annotations

import random

import pytest

import fleet_protocol as protocol
from fleet_protocol import ForwardPassMetrics, KvStats, WorkerStats
from mock_worker.engine import EngineConfig, SimulatedEngine
from mock_worker.gpus import (
    GpuModel,
    SimulatedGpus,
    framebuffer_used_mib,
    load_fractions,
    next_temperature,
    power_watts,
    utilisation_percent,
)

MODEL = GpuModel()


def load(active_slots: int, active_blocks: int, total_slots: int = 64, total_blocks: int = 4096):
    return ForwardPassMetrics(WorkerStats(active_slots, total_slots), KvStats(active_blocks, total_blocks))


def test_load_fractions():
    assert load_fractions(None) == (0.0, 0.0)
    assert load_fractions(load(16, 1024)) == (0.25, 0.25)
    assert load_fractions(load(0, 0, total_slots=0, total_blocks=0)) == (0.0, 0.0)


def test_utilisation_and_power_rise_with_busy_slots():
    utils = [utilisation_percent(busy) for busy in (0.0, 0.05, 0.25, 0.5, 1.0)]
    assert utils[0] == 0 and utils == sorted(utils) and utils[-1] == 100
    powers = [power_watts(MODEL, u) for u in utils]
    assert powers == sorted(powers)
    assert powers[0] == MODEL.idle_watts and powers[-1] == MODEL.max_watts


def test_framebuffer_use_rises_with_kv_blocks_and_fits():
    used = [framebuffer_used_mib(MODEL, kv) for kv in (0.0, 0.5, 1.0)]
    assert used == sorted(used) and used[0] > 0
    assert used[-1] <= MODEL.fb_total_mib - MODEL.fb_reserved_mib


def test_temperature_lags_towards_the_steady_state_of_the_power():
    temp = MODEL.ambient_c
    steady = MODEL.ambient_c + MODEL.heat_c_per_watt * MODEL.max_watts
    after_one = next_temperature(MODEL, temp, MODEL.max_watts, 1.0)
    assert MODEL.ambient_c < after_one < steady
    for _ in range(600):
        temp = next_temperature(MODEL, temp, MODEL.max_watts, 1.0)
    assert temp == pytest.approx(steady, abs=0.01)


def test_energy_integrates_the_reported_power():
    gpus = SimulatedGpus(2, random.Random(1))
    before = gpus.step(1.0, load(32, 2048))
    after = gpus.step(2.0, load(32, 2048))
    for b, a in zip(before, after):
        # energy grows by power x dt (W x s = J = 1000 mJ); power is reported to the mW
        assert a.total_energy_mj - b.total_energy_mj == pytest.approx(a.power_usage_w * 2.0 * 1000, abs=3)


def test_readings_follow_the_engine_and_are_valid_messages():
    engine = SimulatedEngine(EngineConfig(), random.Random(3))
    gpus = SimulatedGpus(4, random.Random(4))
    idle = gpus.step(1.0, engine.metrics())
    assert {g.gpu_util for g in idle} == {0} and {g.sm_clock_mhz for g in idle} == {MODEL.sm_clock_idle_mhz}
    busy_readings = []
    for _ in range(30):
        engine.step(1.0)
        busy_readings = gpus.step(1.0, engine.metrics())
    metrics = engine.metrics()
    assert metrics.worker_stats.request_active_slots > 0
    assert all(g.gpu_util > 0 and g.power_usage_w > MODEL.idle_watts for g in busy_readings)
    assert {g.index for g in busy_readings} == {0, 1, 2, 3}
    assert len({g.uuid for g in busy_readings}) == 4 and len({g.pci_bus_id for g in busy_readings}) == 4
    for gpu in busy_readings:
        assert gpu.fb_used_mib + gpu.fb_free_mib + gpu.fb_reserved_mib == gpu.fb_total_mib
    event = protocol.GpuMetricsEvent(worker_id=1, hostname="mock-node-0", gpus=busy_readings)
    assert protocol.decode_gpu_metrics(protocol.encode(event), 1 << 20) == event


def test_a_seed_reproduces_the_gpus():
    first = SimulatedGpus(2, random.Random(9)).step(1.0, load(10, 100))
    again = SimulatedGpus(2, random.Random(9)).step(1.0, load(10, 100))
    assert first == again
