"""The one retry-delay policy: reconnects, port reopens, slave probes and component restarts.

Exponential with "equal jitter": the delay before attempt ``n`` (1-based, counting consecutive
failures) is uniform in ``[c/2, c]`` with ``c = min(maximum, initial * 2**(n-1))``. The lower
half keeps a fleet of failing clients from retrying in lock step without ever retrying at
once; the cap keeps recovery within seconds of a device's return. Pure: no clock, no I/O.
"""

from __future__ import annotations

import random

import attrs


@attrs.frozen
class Backoff:
    initial: float = 1.0
    maximum: float = 5.0

    def ceiling(self, failures: int) -> float:
        """The longest delay before attempt ``failures`` (1-based)."""
        return min(self.maximum, self.initial * 2.0 ** min(max(failures - 1, 0), 62))

    def delay(self, failures: int, rng: random.Random) -> float:
        """A delay in ``[ceiling/2, ceiling]``."""
        ceiling = self.ceiling(failures)
        return rng.uniform(ceiling / 2, ceiling)
