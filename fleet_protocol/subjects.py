"""Where messages travel: Dynamo's NATS subject layout and its defaults."""

from __future__ import annotations

from typing import Final

KV_METRICS: Final = "kv_metrics"
KV_HIT_RATE: Final = "kv-hit-rate"
COMPONENT_METRICS: Final = "metrics"  # snapshots of a worker's MetricsRegistry

DEFAULT_NAMESPACE: Final = "dynamo"
DEFAULT_COMPONENT: Final = "backend"
DEFAULT_ENDPOINT: Final = "generate"


def namespace_subject(namespace: str, event: str) -> str:
    """Dynamo's `Namespace.publish(event)` subject."""
    return f"namespace.{namespace}.{event}"


def component_subject(namespace: str, component: str, event: str) -> str:
    """Dynamo's `Component.publish(event)` subject."""
    return f"namespace.{namespace}.component.{component}.{event}"


def component_of(subject: str) -> str | None:
    """The component token of a `namespace.{ns}.component.{component}.{event}` subject."""
    parts = subject.split(".")
    if len(parts) == 5 and parts[2] == "component":
        return parts[3]
    return None
