"""The demo's settings: typed, frozen, checked when built (see fleet_runtime.config_checks)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleet_runtime.config_checks import check_fields, checked, port_number, within


def _seed(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not a whole number")


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """Everything `llm-fleet-demo` is told."""

    port: int = field(default=9091, metadata=checked(port_number))  # the aggregator's HTTP port
    workers: int = field(default=8, metadata=checked(within(1, 10_000)))  # mock workers
    interval: float = field(default=1.0, metadata=checked(within(0.05, 60.0)))  # seconds between stats
    gpus_per_worker: int = field(default=2, metadata=checked(within(1, 64)))  # simulated, as DCGM_FI_* series
    seed: int = field(default=42, metadata=checked(_seed))
    duration: float = field(default=0.0, metadata=checked(within(0.0, 1e7)))  # 0 = until Ctrl-C

    def __post_init__(self) -> None:
        check_fields(self)
