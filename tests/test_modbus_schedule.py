"""The Modbus poll schedule, with a scripted line under a mock clock: drift-free deadlines,
overruns skipped and counted, a dead slave probed with backoff while others keep time."""

from __future__ import annotations

import itertools
import random

import trio
import trio.testing

from drivers.modbus.bus import ModbusBus
from drivers.modbus.codec import Request, Response
from drivers.modbus.config import ModbusTcpBusConfig
from gateway.config import parse_config
from gateway.core.backoff import Backoff
from tests.readings import Recorder

CONFIG = """
[[buses]]
name = "plc"
kind = "modbus-tcp"
host = "127.0.0.1"
timeout = "500ms"
backoff_initial = "4s"
backoff_max = "8s"
[[buses.devices]]
name = "a"
unit_id = 1
interval = "1s"
points = [{ name = "p", table = "holding", address = 0 }]
[[buses.devices]]
name = "b"
unit_id = 2
interval = "1s"
points = [{ name = "p", table = "holding", address = 0 }]
"""


class ScriptedLink:
    """Stands in for ``Link``: one transaction at a time, each taking ``duration[unit]``
    seconds; units in ``dead`` time out after ``timeout``."""

    timeout = 0.5
    backoff = Backoff(4.0, 8.0)

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self.duration = {1: 0.1, 2: 0.1}
        self.dead: set[int] = set()
        self.log: list[tuple[int, float]] = []

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def transact(self, request: Request) -> Response:
        async with self.lock:
            self.log.append((request.unit_id, trio.current_time()))
            if request.unit_id in self.dead:
                await trio.sleep(self.timeout)
                raise TimeoutError("no response")
            await trio.sleep(self.duration[request.unit_id])
            return Response(registers=(42,))

    def statistics(self) -> dict[str, object]:
        return {}


def make_bus() -> tuple[ModbusBus, ScriptedLink, Recorder]:
    config = parse_config(CONFIG).buses[0]
    assert isinstance(config, ModbusTcpBusConfig)
    link = ScriptedLink()
    rec = Recorder()
    bus = ModbusBus(
        "plc",
        config.devices,
        rec.context(),
        link,  # type: ignore[arg-type]
    )
    bus._rng = random.Random(1)
    return bus, link, rec


def starts(link: ScriptedLink, unit: int) -> list[float]:
    return [t for u, t in link.log if u == unit]


async def test_polls_are_drift_free(autojump_clock: trio.testing.MockClock) -> None:
    bus, link, _ = make_bus()
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(bus.run)
        await trio.sleep(9.95)
        nursery.cancel_scope.cancel()
    # Both devices are due on every whole second; whichever gets the line first starts on
    # the second, the other 100 ms later, behind it. No drift accumulates.
    for i in range(10):
        tick = sorted(t for _, t in link.log[2 * i : 2 * i + 2])
        assert tick == [t0 + i, t0 + i + 0.1]
    assert bus.devices["a"].stats.overruns == 0


async def test_a_slow_cycle_skips_missed_ticks(autojump_clock: trio.testing.MockClock) -> None:
    bus, link, _ = make_bus()
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(bus.run)
        await trio.sleep(2.95)
        link.duration[1] = 2.5  # the poll at t0+3 takes until t0+5.5
        await trio.sleep(1)
        link.duration[1] = 0.1
        await trio.sleep(4)
        nursery.cancel_scope.cancel()
    # Ticks at 4 and 5 were missed and counted, not bunched up at 5.5. (Each start may be
    # 100 ms late when device b got the line first.)
    assert [int(t - t0) for t in starts(link, 1)] == [0, 1, 2, 3, 6, 7]
    assert bus.devices["a"].stats.overruns == 2


async def test_dead_slave_is_probed_with_backoff_others_keep_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus, link, rec = make_bus()
    link.dead.add(2)
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(bus.run)
        await trio.sleep(30.95)
        nursery.cancel_scope.cancel()
    probes = starts(link, 2)
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    # Backoff between 2-4 s, then 4-8 s and capped there (plus the 0.5 s timeout).
    assert 2.5 <= gaps[0] <= 4.6
    assert all(4.5 <= g <= 8.6 for g in gaps[1:])
    assert len(probes) <= 7
    # Device a never waited more than one timeout behind a probe.
    a_starts = starts(link, 1)
    assert len(a_starts) == 31
    assert all(0 <= t - (t0 + i) <= 0.5 + 1e-9 for i, t in enumerate(a_starts))
    assert rec.latest("plc/b/p").reason == "timeout"  # type: ignore[union-attr]
    assert rec.latest("plc/a/p").value == 42  # type: ignore[union-attr]
