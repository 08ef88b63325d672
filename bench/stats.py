"""Small statistics helpers (medians of rounds, latency percentiles)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (p in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def spread(values: Sequence[float]) -> str:
    """``min-max`` of the rounds, to show how noisy a median is."""
    if not values:
        return "n/a"
    return f"{min(values):.2f}-{max(values):.2f}"
