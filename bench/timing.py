"""Latency samples and the plain-text tables every benchmark prints."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

Timed = tuple[list[int], float, float]
"""Latencies (ns), elapsed seconds, CPU seconds of this process."""


async def timed(call: Callable[[], Awaitable[T]], count: int, limit: float) -> tuple[Timed, T]:
    """Await ``call()`` ``count`` times back to back, or until ``limit`` seconds passed;
    returns the timings and the last result. The same code times Trio and asyncio clients."""
    clock = time.perf_counter_ns
    latencies: list[int] = []
    result: T | None = None
    cpu = time.process_time()
    start = clock()
    deadline = start + int(limit * 1e9)
    for _ in range(count):
        t0 = clock()
        result = await call()
        t1 = clock()
        latencies.append(t1 - t0)
        if t1 > deadline:
            break
    seconds = (clock() - start) / 1e9
    if result is None:
        raise ValueError("count must be at least 1")
    return (latencies, seconds, time.process_time() - cpu), result


class Sample:
    """Per-transaction latencies (ns), the wall time they took and the CPU time this process
    spent meanwhile (the client's own cost: the peer runs in another process), summed over
    rounds; ``rounds`` keeps each round's rate so the spread between rounds can be shown."""

    def __init__(self, client: str) -> None:
        self.client = client
        self.latencies: list[int] = []
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.rounds: list[float] = []

    def add(self, latencies: Sequence[int], seconds: float, cpu_seconds: float) -> None:
        self.latencies.extend(latencies)
        self.seconds += seconds
        self.cpu_seconds += cpu_seconds
        self.rounds.append(len(latencies) / seconds)

    @property
    def transactions(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.transactions / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        """Client CPU time per transaction, in microseconds."""
        return self.cpu_seconds / self.transactions * 1e6 if self.transactions else math.nan

    @property
    def mean_ms(self) -> float:
        return sum(self.latencies) / len(self.latencies) / 1e6 if self.latencies else math.nan

    def quantile_ms(self, q: float) -> float:
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] / 1e6


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell: first column left-aligned, the rest right."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])
