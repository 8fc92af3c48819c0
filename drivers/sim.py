"""Simulated sensors: sine, random walk, step, counter and writable setpoints.

Gives the demo and the tests readings without hardware. Values are a pure function of the
point's config, the sample number and a per-topic seeded RNG, so runs are repeatable.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Iterator
from typing import Literal

import attrs
import trio

from drivers.base import BusContext, WriteError, unknown_point
from gateway.core.component import UP, Condition
from gateway.core.configtypes import Duration, Name, duplicate_names
from gateway.core.reading import Reading, Value

Signal = Literal["sine", "random-walk", "step", "counter", "setpoint"]

# Bounds that keep every sample finite for any sample number a run can reach: low, high and
# step within +-1e9 (so high - low, n * step stay far from float overflow), interval and
# period at least 1 ms (so t / period does too, with durations at most 365 days).
MAX_VALUE = 1e9
MIN_INTERVAL = 0.001


@attrs.frozen
class SimPointConfig:
    name: Name
    signal: Signal = "sine"
    unit: str | None = None
    low: float = 0.0
    high: float = 100.0
    period: Duration = Duration(60.0)
    """Sine period; for ``step``, how long each level is held."""
    step: float = 1.0
    """Largest change per sample (random walk), increment per sample (counter)."""


@attrs.frozen
class SimDeviceConfig:
    name: Name
    interval: Duration = Duration(1.0)
    points: tuple[SimPointConfig, ...] = ()


@attrs.frozen
class SimBusConfig:
    name: Name
    kind: Literal["sim"] = "sim"
    devices: tuple[SimDeviceConfig, ...] = ()
    fail_after: Duration | None = None
    """Testing aid: the bus raises this long after each start (exercises the supervisor)."""

    def topics(self) -> Iterator[str]:
        for d in self.devices:
            for p in d.points:
                yield f"{self.name}/{d.name}/{p.name}"

    def stall_after(self) -> float:
        return 3 * max((d.interval for d in self.devices), default=1.0) + 10.0

    def describe(self) -> str:
        return "simulated"

    def point(self, target: str) -> SimPointConfig:
        """The point ``target`` (``device/point``) names; raises ``UnknownPoint``."""
        device_name, _, point_name = target.partition("/")
        for d in self.devices:
            if d.name == device_name:
                for p in d.points:
                    if p.name == point_name:
                        return p
        known = (f"{d.name}/{p.name}" for d in self.devices for p in d.points)
        raise unknown_point(self.name, target, known)

    def check_write(self, target: str, value: Value) -> Value:
        """Only setpoints are writable, with a number in low..high (``SimBus.write`` applies
        exactly this); the setpoint then holds it as a float."""
        point = self.point(target)
        where = f"{self.name}/{target}"
        if point.signal != "setpoint":
            raise WriteError(f"{where} is a {point.signal} signal; only setpoints are writable")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WriteError(
                f"{where} takes a number, got {value!r}; send a number in {point.low}..{point.high}"
            )
        if not point.low <= value <= point.high:  # NaN too: it compares false
            raise WriteError(
                f"{value} is outside {where}'s range {point.low}..{point.high}; send a number "
                "in that range"
            )
        return float(value)

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.devices:
            yield "devices", "a sim bus needs at least one [[buses.devices]] table"
        yield from duplicate_names("devices", [d.name for d in self.devices])
        for i, d in enumerate(self.devices):
            if not d.interval >= MIN_INTERVAL:
                yield f"devices[{i}].interval", "must be at least 1ms"
            yield from duplicate_names(f"devices[{i}].points", [p.name for p in d.points])
            for j, p in enumerate(d.points):
                at = f"devices[{i}].points[{j}]"
                for key in ("low", "high", "step"):
                    value = getattr(p, key)
                    if not -MAX_VALUE <= value <= MAX_VALUE:
                        yield f"{at}.{key}", f"{value:g} is outside -1e9 .. 1e9"
                if p.high < p.low:
                    yield f"{at}.high", f"{p.high} is below low ({p.low})"
                if not p.period >= MIN_INTERVAL:
                    yield f"{at}.period", "must be at least 1ms"


@attrs.frozen
class SimBusStatistics:
    polls: int
    overruns: int
    points: int


class _SimPoint:
    def __init__(self, topic: str, config: SimPointConfig, interval: float) -> None:
        self.topic = topic
        self.config = config
        self.interval = interval
        self.rng = random.Random(zlib.crc32(topic.encode()))
        self.value = config.low
        # What a read before the first poll gives: the first sample, without taking it (a
        # random walk would move).
        self.latest: Value = config.low if config.signal == "random-walk" else self.sample(0)

    def sample(self, n: int) -> Value:
        c = self.config
        t = n * self.interval
        if c.signal == "sine":
            mid, amp = (c.high + c.low) / 2, (c.high - c.low) / 2
            return round(mid + amp * math.sin(2 * math.pi * t / c.period), 3)
        if c.signal == "random-walk":
            self.value = min(c.high, max(c.low, self.value + self.rng.uniform(-c.step, c.step)))
            return round(self.value, 3)
        if c.signal == "step":
            return c.high if int(t // c.period) % 2 else c.low
        if c.signal == "counter":
            return int(c.low + n * c.step)
        return self.value  # setpoint: what was last written


class SimBus:
    def __init__(self, config: SimBusConfig, context: BusContext) -> None:
        self.name: str = config.name
        self.config = config
        self.context = context
        self._points = {
            f"{d.name}/{p.name}": _SimPoint(f"{config.name}/{d.name}/{p.name}", p, d.interval)
            for d in config.devices
            for p in d.points
        }
        self.polls = 0
        self.overruns = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for device in self.config.devices:
                nursery.start_soon(self._poll_device, device)
            task_status.started()
            if self.config.fail_after is not None:
                await trio.sleep(self.config.fail_after)
                raise RuntimeError(f"simulated failure after {self.config.fail_after}s")

    async def _poll_device(self, device: SimDeviceConfig) -> None:
        points = [self._points[f"{device.name}/{p.name}"] for p in device.points]
        deadline = trio.current_time()
        n = 0
        while True:
            for point in points:
                point.latest = point.sample(n)
                self.context.publish(Reading(point.topic, point.latest, unit=point.config.unit))
            self.polls += 1
            self.context.progress()
            deadline += device.interval
            n += 1
            now = trio.current_time()
            if now > deadline:  # missed ticks are skipped, not bunched up
                missed = int((now - deadline) // device.interval) + 1
                self.overruns += missed
                deadline += missed * device.interval
                n += missed
            await trio.sleep_until(deadline)

    async def write(self, target: str, value: Value) -> None:
        await trio.lowlevel.checkpoint()
        self.config.check_write(target, value)
        assert isinstance(value, int | float)  # check_write lets only numbers through
        point = self._points[target]
        point.value = point.latest = float(value)

    async def read(self, target: str) -> Value:
        """The point's current value: what a setpoint holds, the latest sample of others."""
        await trio.lowlevel.checkpoint()
        self.config.point(target)  # UnknownPoint, with the closest names
        return self._points[target].latest

    def condition(self) -> Condition:
        return UP

    def statistics(self) -> SimBusStatistics:
        return SimBusStatistics(self.polls, self.overruns, len(self._points))
