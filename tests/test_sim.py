"""The sim driver: repeatable signals on a drift-free schedule; writable setpoints."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from drivers.base import BusContext, WriteError
from drivers.sim import SimBus, SimBusConfig
from gateway.config import parse_config
from gateway.core.reading import Reading

CONFIG = """
[[buses]]
name = "sim"
kind = "sim"
[[buses.devices]]
name = "d"
interval = "1s"
points = [
  { name = "sine", signal = "sine", low = 0, high = 10, period = "4s" },
  { name = "walk", signal = "random-walk", low = 0, high = 1, step = 0.5 },
  { name = "step", signal = "step", low = 0, high = 1, period = "2s" },
  { name = "count", signal = "counter", low = 100, step = 2 },
  { name = "sp", signal = "setpoint", low = 10, high = 20 },
]
"""


def sim_bus() -> tuple[SimBus, list[Reading], list[float]]:
    config = parse_config(CONFIG).buses[0]
    assert isinstance(config, SimBusConfig)
    readings: list[Reading] = []
    progress: list[float] = []
    bus = SimBus(config, BusContext(readings.append, lambda: progress.append(trio.current_time())))
    return bus, readings, progress


def values(readings: list[Reading], point: str) -> list[object]:
    return [r.value for r in readings if r.topic == f"sim/d/{point}"]


async def test_signals_and_schedule(autojump_clock: trio.testing.MockClock) -> None:
    bus, readings, progress = sim_bus()
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(bus.run)
        await trio.sleep(7.5)
        nursery.cancel_scope.cancel()
    assert progress == [t0 + i for i in range(8)]  # drift-free: exactly on the second
    assert values(readings, "sine") == [5.0, 10.0, 5.0, 0.0, 5.0, 10.0, 5.0, 0.0]
    assert values(readings, "step") == [0, 0, 1, 1, 0, 0, 1, 1]
    assert values(readings, "count") == [100, 102, 104, 106, 108, 110, 112, 114]
    walk = values(readings, "walk")
    assert all(0 <= v <= 1 for v in walk)  # type: ignore[operator]
    assert len(set(walk)) > 1
    assert values(readings, "sp") == [10.0] * 8


async def test_random_walk_is_repeatable(autojump_clock: trio.testing.MockClock) -> None:
    runs = []
    for _ in range(2):
        bus, readings, _ = sim_bus()
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            await trio.sleep(5.5)
            nursery.cancel_scope.cancel()
        runs.append(values(readings, "walk"))
    assert runs[0] == runs[1]


async def test_late_cycles_are_skipped_and_counted(autojump_clock: trio.testing.MockClock) -> None:
    bus, _readings, progress = sim_bus()
    blocked = {"done": False}
    original = bus.context.publish

    def slow_publish(r: Reading) -> None:
        # The third cycle takes 2.5 s of (mock) time: simulate a stall by jumping the clock.
        if r.topic == "sim/d/sine" and len(progress) == 2 and not blocked["done"]:
            blocked["done"] = True
            autojump_clock.jump(2.5)
        original(r)

    bus.context = BusContext(slow_publish, bus.context.progress)
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(bus.run)
        await trio.sleep(6.5)
        nursery.cancel_scope.cancel()
    # Cycles at 0, 1, 2 (which ran until 4.5), then 5, 6: the ticks at 3 and 4 were missed.
    assert progress == [t0, t0 + 1, t0 + 4.5, t0 + 5, t0 + 6]
    assert bus.overruns == 2


async def test_writes() -> None:
    bus, _, _ = sim_bus()
    await bus.write("d/sp", 15)
    assert bus._points["d/sp"].sample(0) == 15.0
    with pytest.raises(WriteError, match=r"25 is outside sim/d/sp's range 10.0..20.0"):
        await bus.write("d/sp", 25)
    with pytest.raises(WriteError, match="only setpoints are writable"):
        await bus.write("d/sine", 1)
    with pytest.raises(WriteError, match="has no point 'd/nope'"):
        await bus.write("d/nope", 1)
    with pytest.raises(WriteError, match="takes a number"):
        await bus.write("d/sp", "hot")
