"""The sim driver: repeatable signals on a drift-free schedule; writable setpoints."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from drivers.base import BusContext, WriteError
from drivers.sim import MAX_VALUE, SimBus, SimBusConfig, _SimPoint
from gateway.config import ConfigError, parse_config
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


# ---- bounds: every accepted point runs; the values beyond are refused ---------------------------

EXTREMES = (-MAX_VALUE, -1.5, 0.0, 1e-9, 1.0, MAX_VALUE)
SIGNALS = ("sine", "random-walk", "step", "counter", "setpoint")
DURATIONS = ("1ms", "1s", "365d")  # the shortest a sim accepts, a usual one, the longest of all


def extreme_configs() -> Iterator[str]:
    """One sim bus config per interval, holding every signal with every accepted extreme."""
    for interval in DURATIONS:
        points = [
            f'{{ name = "p{i}", signal = "{signal}", low = {low!r}, high = {high!r}, '
            f'step = {step!r}, period = "{period}" }}'
            for i, (signal, low, high, step, period) in enumerate(
                (signal, low, high, step, period)
                for signal in SIGNALS
                for low in EXTREMES
                for high in EXTREMES
                if low <= high
                for step in (-MAX_VALUE, -1.0, 0.0, 0.5, MAX_VALUE)
                for period in DURATIONS
            )
        ]
        yield (
            f'[[buses]]\nname = "x"\nkind = "sim"\n[[buses.devices]]\nname = "d"\n'
            f'interval = "{interval}"\npoints = [\n  ' + ",\n  ".join(points) + "\n]\n"
        )


# Sample numbers: the first hundred, and those of a run of 1 ms samples for a year and more.
SAMPLES = [*range(100), 10**6, 3 * 10**10, 2**53, 10**15]


def test_every_accepted_extreme_samples_finite_values() -> None:
    for text in extreme_configs():
        bus = parse_config(text).buses[0]  # accepted: no ConfigError
        assert isinstance(bus, SimBusConfig)
        device = bus.devices[0]
        assert len(device.points) > 1000
        for p in device.points:
            point = _SimPoint(f"x/d/{p.name}", p, device.interval)
            for n in SAMPLES:
                value = point.sample(n)
                assert isinstance(value, int | float), (p, n, value)
                assert math.isfinite(value), (p, n, value)
                json.dumps(value, allow_nan=False)  # what a device or CPI receives


async def test_largest_values_run_on_the_bus(autojump_clock: trio.testing.MockClock) -> None:
    text = (
        '[[buses]]\nname = "x"\nkind = "sim"\n[[buses.devices]]\nname = "d"\ninterval = "1ms"\n'
        "points = [\n"
        + ",\n".join(
            f'{{ name = "{s}", signal = "{s}", low = -1e9, high = 1e9, step = 1e9, '
            'period = "1ms" }'
            for s in SIGNALS
        )
        + "\n]\n"
    )
    config = parse_config(text).buses[0]
    assert isinstance(config, SimBusConfig)
    readings: list[Reading] = []
    bus = SimBus(config, BusContext(readings.append, lambda: None))
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await trio.sleep(20.0)  # 20 000 samples of every point
        nursery.cancel_scope.cancel()
    assert len(readings) >= 5 * 20_000
    assert all(isinstance(r.value, int | float) and math.isfinite(r.value) for r in readings)


P = "buses[0].devices[0].points[0]"


@pytest.mark.parametrize(
    ("point", "expected"),
    [
        pytest.param(
            'signal = "counter", step = 1e308',
            [(f"{P}.step", "1e+308 is outside -1e9 .. 1e9")],
            id="step-1e308",
        ),
        pytest.param(
            "low = -1e308, high = 1e308",
            [
                (f"{P}.low", "-1e+308 is outside -1e9 .. 1e9"),
                (f"{P}.high", "1e+308 is outside -1e9 .. 1e9"),
            ],
            id="range-1e308",
        ),
        pytest.param(
            "high = 1000000001",
            [(f"{P}.high", "1e+09 is outside -1e9 .. 1e9")],
            id="just-above",
        ),
        pytest.param(
            "low = -1.0000001e9",
            [(f"{P}.low", "-1e+09 is outside -1e9 .. 1e9")],
            id="just-below",
        ),
        pytest.param(
            'period = "0.5ms"',
            [(f"{P}.period", "must be at least 1ms")],
            id="period-too-short",
        ),
        pytest.param(
            'period = "0s"',
            [(f"{P}.period", "must be at least 1ms")],
            id="period-zero",
        ),
    ],
)
def test_values_beyond_the_bounds_are_refused(point: str, expected: list[tuple[str, str]]) -> None:
    text = (
        '[[buses]]\nname = "x"\nkind = "sim"\n[[buses.devices]]\nname = "d"\n'
        f'points = [{{ name = "p", {point} }}]\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.problems == expected


@pytest.mark.parametrize("interval", ["0.999ms", "0s"])
def test_interval_below_1ms_is_refused(interval: str) -> None:
    text = f'[[buses]]\nname = "x"\nkind = "sim"\n[[buses.devices]]\nname = "d"\ninterval = "{interval}"\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.problems == [("buses[0].devices[0].interval", "must be at least 1ms")]
