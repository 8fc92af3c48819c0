"""A publish callback that records readings and lets a test wait for a condition on them."""

from __future__ import annotations

from collections.abc import Callable

import trio

from drivers.base import BusContext
from gateway.core.reading import Reading


class Recorder:
    """Readings and progress calls from a bus. Waits are woken by either: progress comes
    every poll cycle, so it also wakes waits on a bus's statistics."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.progress_calls = 0
        self._changed = trio.Event()

    def publish(self, reading: Reading) -> None:
        self.readings.append(reading)
        self._changed.set()

    def progress(self) -> None:
        self.progress_calls += 1
        self._changed.set()

    def context(self) -> BusContext:
        return BusContext(self.publish, self.progress)

    def latest(self, topic: str) -> Reading | None:
        for r in reversed(self.readings):
            if r.topic == topic:
                return r
        return None

    def of(self, topic: str) -> list[Reading]:
        return [r for r in self.readings if r.topic == topic]

    def values(self, topic: str) -> list[object]:
        return [r.value for r in self.readings if r.topic == topic]

    async def wait_for(self, predicate: Callable[[Recorder], bool], timeout: float = 10) -> None:
        """Wait (woken by each new reading) until ``predicate(self)`` holds."""
        with trio.fail_after(timeout):
            while not predicate(self):
                await self._changed.wait()
                self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        await self.wait_for(lambda _: predicate(), timeout)

    async def wait_latest(
        self, topic: str, predicate: Callable[[Reading], bool], timeout: float = 10
    ) -> Reading:
        def check(rec: Recorder) -> bool:
            r = rec.latest(topic)
            return r is not None and predicate(r)

        await self.wait_for(check, timeout)
        latest = self.latest(topic)
        assert latest is not None
        return latest
