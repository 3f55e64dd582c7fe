"""Fleet statistics as Dynamo's aggregator computed them, on plain values."""

from __future__ import annotations

import math
from collections.abc import Iterable


def load_mean_std(loads: Iterable[float]) -> tuple[float, float] | None:
    """Mean and *population* standard deviation (divide by n, as Dynamo did).

    None for no workers: Dynamo exported NaN or a stale value there; we export nothing.
    """
    values = list(loads)
    n = len(values)
    if n == 0:
        return None
    mean = math.fsum(values) / n
    variance = math.fsum((v - mean) ** 2 for v in values) / n
    return mean, math.sqrt(variance)


def hit_rate_percent(overlap_blocks: int, isl_blocks: int) -> float | None:
    """Cumulative KV hit rate, 100 * overlap / isl; None before any input block was seen."""
    if isl_blocks <= 0:
        return None
    return 100.0 * overlap_blocks / isl_blocks
