"""Modbus TCP: read transactions per second, our Trio client against pymodbus's asyncio client.

Both clients read the same 10 holding registers from the same pymodbus ``ModbusTcpServer``
(its own process, see ``bench.peers``), one request in flight, back to back. Ours is the
``Link`` that ``modbus_tcp_bus`` builds (MBAP codec, lock, timeout, reconnect supervision);
theirs is ``AsyncModbusTcpClient.read_holding_registers``. Many short rounds alternate which
client goes first, so that load from other processes hits both alike; the spread of the
per-round ratios shows how much noise there was. Then the full poll path (planner, schedule,
decode, report filter, publish) runs once, ours only: pymodbus has no equivalent.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable
from typing import Any

import trio
from pymodbus.client import AsyncModbusTcpClient

from bench import profiling
from bench.peers import SILENT, UNIT, check_registers, link_round, server_process
from bench.timing import Sample, Timed, table, timed
from drivers.base import BusContext
from drivers.modbus.config import ModbusTcpBusConfig
from drivers.modbus.tcp import modbus_tcp_bus
from gateway.config import parse_config
from gateway.core.reading import Reading

COUNT = 8000
"""Measured transactions per client, split over ``ROUNDS``."""
ROUNDS = 8
WARMUP = 200
"""Unmeasured transactions at the start of each round (connection, caches, allocator)."""
ROUND_LIMIT = 2.0
"""Seconds after which a round stops early (a slow machine); keeps the whole run short."""
POLL_SECONDS = 2.0
POLL_INTERVAL = "0.01ms"
"""Far below one transaction's time: every cycle overruns, so polls run back to back (a
"1ms" interval would cap the bus at 1000 polls/s and measure the schedule, not the path)."""
GOAL = 1.0
"""The issue's target for ours / pymodbus in transactions per second."""

OURS = "ours: Link + MbapCodec (trio)"
THEIRS = "pymodbus AsyncModbusTcpClient (asyncio)"
POLL = "ours: ModbusBus poll path (trio)"


def bus_config(port: int, interval: str) -> ModbusTcpBusConfig:
    points = ", ".join(f'{{ name = "r{i}", table = "holding", address = {i} }}' for i in range(10))
    config = parse_config(
        f"""
[[buses]]
name = "bench"
kind = "modbus-tcp"
host = "127.0.0.1"
port = {port}
timeout = "1s"

[[buses.devices]]
name = "d1"
unit_id = {UNIT}
interval = "{interval}"
points = [{points}]
"""
    ).buses[0]
    assert isinstance(config, ModbusTcpBusConfig)
    return config


async def ours_round(port: int, count: int) -> Timed:
    link = modbus_tcp_bus(bus_config(port, "1s"), SILENT).link
    return await link_round(link, count, WARMUP, ROUND_LIMIT)


async def theirs_round(port: int, count: int) -> Timed:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
    if not await client.connect():
        raise RuntimeError("pymodbus cannot connect")
    try:

        def read() -> Awaitable[Any]:
            return client.read_holding_registers(0, count=10, device_id=UNIT)

        for _ in range(WARMUP):
            check_registers((await read()).registers)
        timings, last = await timed(read, count, ROUND_LIMIT)
        if last.isError():
            raise RuntimeError(f"pymodbus read failed: {last}")
        check_registers(last.registers)
    finally:
        client.close()
    return timings


class PollResult:
    def __init__(self) -> None:
        self.polls = 0
        self.readings = 0
        self.bad = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.link_seconds = 0.0
        """Time spent inside ``link.transact`` (the bus's own latency statistics)."""
        self.total_polls = 0
        """Including the warm-up."""


async def poll_path(port: int, seconds: float) -> PollResult:
    """Run a ``ModbusBus`` polling back to back; count what it does in a window of
    ``seconds`` after a warm-up."""
    readings = [0, 0]  # all, bad
    warmed_up = trio.Event()

    def publish(reading: Reading) -> None:
        readings[0] += 1
        readings[1] += not reading.good
        if readings[0] == WARMUP * 10:  # ten points per poll
            warmed_up.set()

    bus = modbus_tcp_bus(bus_config(port, POLL_INTERVAL), BusContext(publish, SILENT.progress))
    stats = bus.devices["d1"].stats
    result = PollResult()
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        with trio.fail_after(5):
            await warmed_up.wait()
        polls, latency, (count, bad) = stats.polls, stats.latency_total, readings[:]
        cpu, start = time.process_time(), time.perf_counter()
        await trio.sleep(seconds)  # the measuring window: the bus polls meanwhile
        result.seconds = time.perf_counter() - start
        result.cpu_seconds = time.process_time() - cpu
        result.polls = stats.polls - polls
        result.link_seconds = stats.latency_total - latency
        result.readings, result.bad = readings[0] - count, readings[1] - bad
        result.total_polls = stats.polls
        nursery.cancel_scope.cancel()
    return result


def run(count: int = COUNT, rounds: int = ROUNDS) -> None:
    ours, theirs = Sample(OURS), Sample(THEIRS)
    per_round = max(1, count // rounds)
    with server_process("tcp") as where:
        port = int(where)
        for r in range(rounds):
            first_ours = r % 2 == 0  # alternate who goes first
            for is_ours in (first_ours, not first_ours):
                if is_ours:
                    ours.add(*trio.run(ours_round, port, per_round))
                else:
                    theirs.add(*asyncio.run(theirs_round(port, per_round)))
        poll = trio.run(poll_path, port, POLL_SECONDS)

    headers = ["client", "transactions", "seconds", "tx/s", "mean ms", "p99 ms", "CPU us/tx"]
    rows = [
        [
            s.client,
            str(s.transactions),
            f"{s.seconds:.2f}",
            f"{s.rate:,.0f}",
            f"{s.mean_ms:.3f}",
            f"{s.quantile_ms(0.99):.3f}",
            f"{s.cpu_us:.0f}",
        ]
        for s in (ours, theirs)
    ]
    ratio = ours.rate / theirs.rate
    rows[0].append(f"{ratio:.2f}x")
    rows[1].append("1.00x")
    if poll.polls:
        rows.append(
            [
                POLL,
                str(poll.polls),
                f"{poll.seconds:.2f}",
                f"{poll.polls / poll.seconds:,.0f}",
                f"{poll.seconds / poll.polls * 1000:.3f}",
                "-",
                f"{poll.cpu_seconds / poll.polls * 1e6:.0f}",
                "ours-only",
            ]
        )
    print(
        "Modbus TCP: read 10 holding registers (function 3, unit 1), one request in flight, "
        "from pymodbus ModbusTcpServer in its own process on 127.0.0.1"
    )
    print(table([*headers, "ours/pymodbus"], rows))
    ratios = [a / b for a, b in zip(ours.rounds, theirs.rounds, strict=True)]
    print(
        f"- {rounds} rounds of {count // rounds} per client after {WARMUP} warm-up each, "
        f"alternating who goes first; ours/pymodbus per round: median "
        f"{statistics.median(ratios):.2f}x, range {min(ratios):.2f}x..{max(ratios):.2f}x"
    )
    print(
        "- CPU us/tx: this process's CPU time (user + system) per transaction; the server's is "
        "not in it, so this is the client's own cost"
    )
    if poll.polls:
        print(
            f"- poll path: {poll.readings / poll.seconds:,.0f} readings/s ({poll.readings} "
            f"readings, {poll.bad} bad), one read per poll; mean ms = one whole cycle, of which "
            f"{poll.link_seconds / poll.polls * 1000:.3f} ms in link.transact; interval "
            f"{POLL_INTERVAL} so cycles run back to back"
        )
    verdict = "MET" if ratio >= GOAL else "NOT MET"
    noise = min(ratios) < GOAL < max(ratios)
    print(
        f"goal ours >= {GOAL:.1f}x pymodbus tx/s: {verdict} ({ratio:.2f}x)"
        + ("; rounds fell on both sides of the goal, so it is within this run's noise" * noise)
    )


def profile(count: int = 3000) -> None:
    """cProfile one round of each client and a second of the poll path against the same
    server; print where the time goes."""
    polls: list[PollResult] = []
    with server_process("tcp") as where:
        port = int(where)
        ours = profiling.profiled(lambda: trio.run(ours_round, port, count))
        theirs = profiling.profiled(lambda: asyncio.run(theirs_round(port, count)))
        poll = profiling.profiled(lambda: polls.append(trio.run(poll_path, port, 1.0)))
    for name, profiler in ((OURS, ours), (THEIRS, theirs)):
        print(f"--- {name}: {count} transactions + {WARMUP} warm-up, connect and close included")
        print(profiling.report(profiler, count + WARMUP))
    total = polls[0].total_polls
    print(f"--- {POLL}: {total} polls (one read each), warm-up included")
    print(profiling.report(poll, total))
