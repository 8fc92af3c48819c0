"""Modbus RTU on a pty pair against pymodbus's serial server: values, writes, exceptions,
CRC retries, a dead slave on a shared line (counted, not timed), unplug/replug of the adapter,
a missing port, and what ``condition()`` says meanwhile."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from drivers.modbus.bus import ModbusBus
from drivers.modbus.config import ModbusRtuBusConfig
from drivers.modbus.rtu import modbus_rtu_bus
from gateway.config import parse_config
from gateway.core.component import UP, Condition, State
from gateway.core.reading import Quality
from tests.modbus_peer import ModbusPeer, device
from tests.ptys import PtyLink, open_pty_link
from tests.readings import Recorder

POINTS = """
points = [
  { name = "power", table = "input", address = 0, type = "float32", order = "CDAB", unit = "kW" },
  { name = "energy", table = "input", address = 2, type = "uint32", scale = 0.01, unit = "kWh" },
  { name = "setpoint", table = "holding", address = 10, type = "int16", writable = true },
  { name = "relay", table = "coil", address = 0, type = "bool", writable = true },
  { name = "missing", table = "holding", address = 190, type = "uint32" },
]
"""


def bus_config(
    path: Path, devices: str = "", *, interval: str = "100ms", **overrides: str
) -> ModbusRtuBusConfig:
    settings = {
        "timeout": '"100ms"',
        "backoff_initial": '"1s"',
        "backoff_max": '"2s"',
        **overrides,
    }
    lines = "\n".join(f"{k} = {v}" for k, v in settings.items())
    text = f"""
[[buses]]
name = "rs485"
kind = "modbus-rtu"
port = "{path}"
baudrate = 19200
{lines}
[[buses.devices]]
name = "meter"
unit_id = 1
interval = "{interval}"
{POINTS}
{devices}
"""
    config = parse_config(text).buses[0]
    assert isinstance(config, ModbusRtuBusConfig)
    return config


@pytest.fixture
async def line(tmp_path: Path) -> AsyncIterator[tuple[PtyLink, ModbusPeer]]:
    meter = device(
        1,
        input=[0x0000, 0x4348, 0x3039, 0x0000],  # power 200.0 (CDAB), energy 0x30390000 raw
        holding=[0] * 10 + [7],
        coils=[True],
        size=100,
    )
    async with open_pty_link(tmp_path) as link:
        peer = ModbusPeer([meter], serial_port=link.server_path, silent_units=[9])
        await trio.to_thread.run_sync(peer.start)
        try:
            yield link, peer
        finally:
            await trio.to_thread.run_sync(peer.stop)


@pytest.fixture
async def running(
    line: tuple[PtyLink, ModbusPeer],
) -> AsyncIterator[tuple[ModbusBus, Recorder]]:
    link, _ = line
    rec = Recorder()
    bus = modbus_rtu_bus(bus_config(link.path), rec.context())
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        yield bus, rec
        nursery.cancel_scope.cancel()


async def test_reads_values_and_exceptions(running: tuple[ModbusBus, Recorder]) -> None:
    bus, rec = running
    topics = [f"rs485/meter/{n}" for n in ("power", "energy", "setpoint", "relay", "missing")]
    await rec.wait_for(lambda r: all(r.latest(t) for t in topics))
    power, energy, setpoint, relay, missing = (rec.latest(t) for t in topics)
    assert power is not None
    assert power.value == 200.0
    assert power.unit == "kW"
    assert energy is not None
    assert energy.value == pytest.approx(0x30390000 * 0.01)
    assert setpoint is not None
    assert setpoint.value == 7
    assert relay is not None
    assert relay.value is True
    assert missing is not None
    assert missing.quality is Quality.BAD
    assert missing.reason == "exception 02 illegal address"
    stats = bus.statistics().devices["meter"]
    assert stats.timeouts == 0
    assert stats.exceptions >= 1
    assert bus.condition() == UP


async def test_writes_reach_the_slave(
    running: tuple[ModbusBus, Recorder], line: tuple[PtyLink, ModbusPeer]
) -> None:
    bus, rec = running
    _, peer = line
    await rec.wait_for(lambda r: r.latest("rs485/meter/relay") is not None)
    await bus.write("meter/setpoint", -300)
    await bus.write("meter/relay", False)
    assert await trio.to_thread.run_sync(peer.get, 1, 3, 10, 1) == [0x10000 - 300]
    assert await trio.to_thread.run_sync(peer.get, 1, 1, 0, 1) == [False]
    await rec.wait_latest("rs485/meter/setpoint", lambda r: r.value == -300)


async def test_crc_error_is_counted_and_retried(
    running: tuple[ModbusBus, Recorder], line: tuple[PtyLink, ModbusPeer]
) -> None:
    bus, rec = running
    _, peer = line
    await rec.wait_latest("rs485/meter/power", lambda r: r.good)
    peer.corrupt_responses = 1
    await rec.wait_for(lambda r: bus.link.crc_errors == 1)
    count = len(rec.readings)
    await rec.wait_for(lambda r: len(r.readings) > count + 10)
    # One retry (the default) absorbed the corrupted frame: no point went bad for it.
    assert all(r.reason != "crc" for r in rec.readings)
    assert bus.statistics().link.crc_errors == 1


async def test_dead_slave_does_not_delay_the_live_one(line: tuple[PtyLink, ModbusPeer]) -> None:
    link, _ = line
    dead = """
[[buses.devices]]
name = "dead"
unit_id = 9
interval = "50ms"
points = [{ name = "x", table = "holding", address = 0 }]
"""
    rec = Recorder()
    bus = modbus_rtu_bus(bus_config(link.path, dead, interval="50ms"), rec.context())
    meter, silent = bus.devices["meter"].stats, bus.devices["dead"].stats
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await rec.wait_until(lambda: silent.timeouts == 1)
        polls_before = meter.polls
        # Two more probes of the dead slave, after 0.5..1 s and 1..2 s of backoff.
        await rec.wait_until(lambda: silent.timeouts == 3)
        polls = meter.polls - polls_before
        condition = bus.condition()
        nursery.cancel_scope.cancel()
    # Counted, not timed: between the probes the meter is polled at its 50 ms ticks (30..60 of
    # them), and each probe holds the line for one 100 ms timeout. Were the dead slave polled
    # at every tick (no per-slave backoff), the meter would get a poll or two between them.
    assert polls >= 8, polls
    assert condition == Condition(State.DEGRADED, "dead not answering")
    stats = bus.statistics().devices
    assert stats["dead"].requests <= 4  # probed with backoff, not every 50 ms
    assert stats["meter"].timeouts == 0


async def test_unplug_and_replug_recovers_by_itself(
    running: tuple[ModbusBus, Recorder], line: tuple[PtyLink, ModbusPeer]
) -> None:
    bus, rec = running
    link, _ = line
    await rec.wait_latest("rs485/meter/power", lambda r: r.good)
    await link.unplug()
    # The driver notices (EIO / hang-up), closes the port and reports the points.
    await rec.wait_latest("rs485/meter/power", lambda r: r.reason == "disconnected")
    # The adapter's device node is gone: reopening fails, and the condition says so.
    await rec.wait_until(lambda: bus.condition() == Condition(State.DOWN, f"{link.path} missing"))
    await link.replug()
    await rec.wait_latest("rs485/meter/power", lambda r: r.good and r.value == 200.0)
    assert bus.link.reconnects == 1
    assert bus.condition() == UP


async def test_missing_port_is_down_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ttyUSB9"
    rec = Recorder()
    bus = modbus_rtu_bus(bus_config(path), rec.context())
    assert bus.condition().state is State.STARTING
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)  # started at once; the first open runs meanwhile
        await rec.wait_until(lambda: bus.condition().state is not State.STARTING)
        condition = bus.condition()
        nursery.cancel_scope.cancel()
    assert condition == Condition(State.DOWN, f"{path} missing")
    message = f"cannot open {path}: no such device: is the adapter plugged in, is the path right?"
    assert bus.statistics().link.last_error == message
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"rs485: {message}; retrying with backoff"]
