"""A latency histogram with fixed buckets, kept by the part that measures (the forwarder)
and read as a frozen ``HistogramSnapshot`` through ``statistics()``: ``/metrics`` turns it
into a Prometheus histogram without the measuring part knowing about Prometheus.

Pure data; depends on attrs only.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import attrs

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds in seconds: an HTTPS POST to CPI takes from tens of milliseconds to a minute."""


@attrs.frozen
class HistogramSnapshot:
    bounds: tuple[float, ...]
    """Upper bounds, increasing; an implicit +Inf bucket follows."""
    counts: tuple[int, ...]
    """Observations in each bucket (not cumulative), one more than ``bounds`` (+Inf)."""
    total: float
    """Sum of all observations."""

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` pairs, ending with ``(inf, count)``."""
        pairs: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            pairs.append((bound, running))
        return pairs


class Histogram:
    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._total = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._total += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self._counts), self._total)
