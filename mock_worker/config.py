"""A mock-worker process's settings: typed, frozen, checked when built (see fleet_runtime.config_checks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import fleet_protocol as protocol
from fleet_runtime.config_checks import (
    ConfigError,
    check_fields,
    checked,
    each,
    label_value,
    nats_token,
    nats_url,
    one_of,
    optional,
    within,
)

from .fleet import GPU_SOURCES, MODES, SHAPES


def _flag(value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{value!r} is not True or False")


def _seed(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not a whole number")


@dataclass(frozen=True, slots=True)
class MockWorkerConfig:
    """Everything `python -m mock_worker` is told."""

    nats_urls: tuple[str, ...] = field(default=("nats://localhost:4222",),
                                       metadata=checked(each(nats_url, what="NATS URL")))
    namespace: str = field(default=protocol.DEFAULT_NAMESPACE, metadata=checked(nats_token))
    component: str = field(default=protocol.DEFAULT_COMPONENT, metadata=checked(nats_token))
    endpoint: str = field(default=protocol.DEFAULT_ENDPOINT, metadata=checked(label_value))
    workers: int = field(default=4, metadata=checked(within(1, 100_000)))
    dp_ranks: int = field(default=1, metadata=checked(within(1, 64)))
    # Seconds between stats messages; simulated time advances by the same amount.
    interval: float = field(default=1.0, metadata=checked(within(0.01, 3600.0)))
    seed: int | None = field(default=None, metadata=checked(optional(_seed)))  # the same seed, the same run
    shape: str = field(default="nested", metadata=checked(one_of(SHAPES)))
    hit_rate_on_namespace: bool = field(default=False, metadata=checked(_flag))
    mode: str = field(default="push", metadata=checked(one_of(MODES)))
    # Simulated steps after which the engines hold still (0 = never).
    freeze_after: int = field(default=0, metadata=checked(within(0, 10**9)))
    gpu: str = field(default="simulated", metadata=checked(one_of(GPU_SOURCES)))
    gpus_per_worker: int = field(default=1, metadata=checked(within(1, protocol.MAX_GPUS_PER_MESSAGE)))
    gpu_interval: float = field(default=5.0, metadata=checked(within(0.05, 3600.0)))
    duration: float = field(default=0.0, metadata=checked(within(0.0, 10_000_000.0)))  # 0 = until interrupted
    metrics_interval: float = field(default=5.0, metadata=checked(within(0.05, 3600.0)))
    component_metrics: bool = field(default=True, metadata=checked(_flag))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.mode == "pull" and self.dp_ranks != 1:
            raise ConfigError("dp_ranks", "pull mode serves one ForwardPassMetrics per worker endpoint; use 1")
