"""A mock-worker process's settings: typed, frozen, checked when built (see fleet_runtime.config_checks)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from fleet_protocol import DEFAULT_COMPONENT, DEFAULT_ENDPOINT, DEFAULT_NAMESPACE, MAX_GPUS_PER_MESSAGE
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
    text,
    within,
)

from .fleet import EVENT_PLANES, GPU_SOURCES, MODES, PROTOCOLS, SHAPES


def _flag(value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{value!r} is not True or False")


def _advertised_address(value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not an IP address")
    address = ipaddress.ip_address(value)  # ValueError names the text
    if address.is_unspecified:
        raise ValueError(f"{value} cannot be advertised: give the address subscribers connect to")


def _seed(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not a whole number")


@dataclass(frozen=True, slots=True)
class MockWorkerConfig:
    """Everything `python -m mock_worker` is told."""

    nats_urls: tuple[str, ...] = field(default=("nats://localhost:4222",),
                                       metadata=checked(each(nats_url, what="NATS URL")))
    namespace: str = field(default=DEFAULT_NAMESPACE, metadata=checked(nats_token))
    component: str = field(default=DEFAULT_COMPONENT, metadata=checked(nats_token))
    endpoint: str = field(default=DEFAULT_ENDPOINT, metadata=checked(label_value))
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
    gpus_per_worker: int = field(default=1, metadata=checked(within(1, MAX_GPUS_PER_MESSAGE)))
    gpu_interval: float = field(default=5.0, metadata=checked(within(0.05, 3600.0)))
    duration: float = field(default=0.0, metadata=checked(within(0.0, 10_000_000.0)))  # 0 = until interrupted
    metrics_interval: float = field(default=5.0, metadata=checked(within(0.05, 3600.0)))
    component_metrics: bool = field(default=True, metadata=checked(_flag))
    # dynamo-1: Dynamo 1.x's event plane and discovery entries; legacy: Dynamo 0.1-0.5's JSON.
    protocol: str = field(default="dynamo-1", metadata=checked(one_of(PROTOCOLS)))
    event_plane: str = field(default="nats", metadata=checked(one_of(EVENT_PLANES)))  # dynamo-1 only
    event_plane_host: str = field(default="127.0.0.1", metadata=checked(_advertised_address))  # for zmq
    # dynamo-1 only. Without it the workers publish no capacity: Dynamo 1.x keeps it in discovery alone.
    discovery_file_kv: str | None = field(default=None, metadata=checked(optional(text)))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.mode == "pull" and self.dp_ranks != 1:
            raise ConfigError("dp_ranks", "pull mode serves one ForwardPassMetrics per worker endpoint; use 1")
        if self.protocol == "dynamo-1":
            self._check_dynamo_1()

    def _check_dynamo_1(self) -> None:
        legacy_only = "belongs to the legacy protocol, not to {0} dynamo-1"
        if self.mode == "pull":
            raise ConfigError("mode", "pull mode serves Dynamo 0.x's stats data: it " + legacy_only, ("protocol",))
        if self.shape != "nested":
            raise ConfigError("shape", "the ForwardPassMetrics shape " + legacy_only, ("protocol",))
        if self.hit_rate_on_namespace:
            raise ConfigError("hit_rate_on_namespace", "Dynamo 1.x has no hit-rate events: this " + legacy_only,
                              ("protocol",))
        if self.discovery_file_kv is not None and "/" in self.endpoint:
            raise ConfigError("endpoint", "a '/' would make its discovery keys ambiguous (Dynamo writes the name "
                              "raw into v1/instances/{ns}/{c}/{e}/...)")
        if self.event_plane == "zmq" and self.discovery_file_kv is None:
            raise ConfigError("event_plane", "ZMQ publishers are found through discovery: set {0}",
                              ("discovery_file_kv",))
