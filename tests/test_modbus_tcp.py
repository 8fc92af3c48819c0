"""Modbus TCP against pymodbus's server: every type, writes, exceptions, reconnects, a dead
unit; against small loopback peers (``LoopbackPeer``, a web server): late answers and stale
bytes with RTU framing, a port that is not Modbus, recovery after long outages under the mock
clock. Connection failures that name the host, ``condition()`` and ``statistics()``."""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import re
import socket
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import NoReturn

import attrs
import pytest
import trio
import trio.testing
from pymodbus.framer import FramerType

from drivers.base import WriteError
from drivers.modbus.bus import DeviceStatistics, ModbusBus, ModbusBusStatistics
from drivers.modbus.codec import Request
from drivers.modbus.config import ModbusTcpBusConfig
from drivers.modbus.link import LinkStatistics
from drivers.modbus.tcp import connect_error, modbus_tcp_bus
from gateway.config import parse_config
from gateway.core.component import UP, Condition, State
from gateway.core.reading import Quality
from tests.modbus_peer import LoopbackPeer, ModbusPeer, device, free_port
from tests.readings import Recorder

# Known register images (wire order), independent of our encoder.
HOLDING = {
    0: [0x42F6, 0xE979],  # float32 123.456 ABCD
    2: [0xE979, 0x42F6],  # float32 123.456 CDAB
    4: [0xF642, 0x79E9],  # float32 123.456 BADC
    6: [0x79E9, 0xF642],  # float32 123.456 DCBA
    8: [0xFFFF, 0xFFFE],  # int32 -2
    10: [0xDEAD, 0xBEEF],  # uint32 3735928559
    12: [0x0000, 0x0000, 0x0001, 0x0000],  # uint64 65536
    16: [0x405E, 0xDD2F, 0x1A9F, 0xBE77],  # float64 123.456
    20: [0xFFFF],  # int16 -1
    21: [0x0929],  # uint16 2345 (scale 0.1 -> 234.5)
    22: [0x4845, 0x4C4C, 0x4F00],  # "HELLO"
    25: [0b0000_0000_0010_0100],  # bits 2 and 5 set
    26: [0x0000],  # a writable setpoint
    27: [0x0000, 0x0000],  # a writable float32
}
POINTS = """
points = [
  { name = "f32_abcd", table = "holding", address = 0, type = "float32", order = "ABCD" },
  { name = "f32_cdab", table = "holding", address = 2, type = "float32", order = "CDAB" },
  { name = "f32_badc", table = "holding", address = 4, type = "float32", order = "BADC" },
  { name = "f32_dcba", table = "holding", address = 6, type = "float32", order = "DCBA" },
  { name = "i32", table = "holding", address = 8, type = "int32" },
  { name = "u32", table = "holding", address = 10, type = "uint32" },
  { name = "u64", table = "holding", address = 12, type = "uint64" },
  { name = "f64", table = "holding", address = 16, type = "float64" },
  { name = "i16", table = "holding", address = 20, type = "int16" },
  { name = "scaled", table = "holding", address = 21, type = "uint16", scale = 0.1, unit = "V" },
  { name = "text", table = "holding", address = 22, type = "string", length = 3 },
  { name = "bit2", table = "holding", address = 25, type = "bool", bit = 2 },
  { name = "bit3", table = "holding", address = 25, type = "bool", bit = 3, writable = true },
  { name = "setpoint", table = "holding", address = 26, type = "int16", scale = 0.5, writable = true, min = -100, max = 100 },
  { name = "f32_w", table = "holding", address = 27, type = "float32", writable = true },
  { name = "in", table = "input", address = 5, type = "uint16" },
  { name = "coil0", table = "coil", address = 0, type = "bool", writable = true },
  { name = "coil1", table = "coil", address = 1, type = "bool" },
  { name = "di3", table = "discrete", address = 3, type = "bool" },
  { name = "missing", table = "holding", address = 500, type = "uint16" },
]
"""
EXPECTED = {
    "f32_abcd": 123.456,
    "f32_cdab": 123.456,
    "f32_badc": 123.456,
    "f32_dcba": 123.456,
    "i32": -2,
    "u32": 3735928559,
    "u64": 65536,
    "f64": 123.456,
    "i16": -1,
    "scaled": 234.5,
    "text": "HELLO",
    "bit2": True,
    "bit3": False,
    "setpoint": 0.0,
    "in": 77,
    "coil0": False,
    "coil1": True,
    "di3": True,
}


def holding_image() -> list[int]:
    regs = [0] * 200
    for address, values in HOLDING.items():
        regs[address : address + len(values)] = values
    return regs


@pytest.fixture
def peer() -> Iterator[ModbusPeer]:
    dev = device(
        1,
        holding=holding_image(),
        input=[0, 0, 0, 0, 0, 77],
        coils=[False, True],
        discrete=[False, False, False, True],
    )
    p = ModbusPeer([dev]).start()
    yield p
    p.stop()


def bus_config(
    port: int, devices: str = "", *, points: str = POINTS, interval: str = "50ms", **settings: str
) -> ModbusTcpBusConfig:
    """Bus settings as TOML values (``framing='"rtu"'``) over fast test defaults."""
    values = {
        "host": '"127.0.0.1"',
        "timeout": '"300ms"',
        "backoff_initial": '"100ms"',
        "backoff_max": '"200ms"',
        **settings,
    }
    lines = "\n".join(f"{k} = {v}" for k, v in values.items())
    text = f"""
[[buses]]
name = "plc"
kind = "modbus-tcp"
port = {port}
{lines}
[[buses.devices]]
name = "d1"
unit_id = 1
interval = "{interval}"
max_gap = 10
{points}
{devices}
"""
    config = parse_config(text).buses[0]
    assert isinstance(config, ModbusTcpBusConfig)
    return config


@pytest.fixture
async def running(peer: ModbusPeer) -> AsyncIterator[tuple[ModbusBus, Recorder]]:
    recorder = Recorder()
    bus = modbus_tcp_bus(bus_config(peer.port), recorder.context())
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        yield bus, recorder
        nursery.cancel_scope.cancel()


def good(value: object) -> object:
    return value


async def test_every_type_reads_correctly(running: tuple[ModbusBus, Recorder]) -> None:
    bus, rec = running
    await rec.wait_for(lambda r: all(r.latest(f"plc/d1/{n}") for n in EXPECTED))
    for name, expected in EXPECTED.items():
        reading = rec.latest(f"plc/d1/{name}")
        assert reading is not None
        assert reading.quality is Quality.GOOD, (name, reading.reason)
        if isinstance(expected, float):
            assert reading.value == pytest.approx(expected, rel=1e-6), name
        else:
            assert reading.value == expected, name
            assert type(reading.value) is type(expected), name
    assert rec.latest("plc/d1/scaled").unit == "V"  # type: ignore[union-attr]
    # The planner coalesced the holding points into one read; stats say so.
    stats = bus.statistics().devices["d1"]
    assert stats.exceptions >= 1  # the "missing" point's own read
    # Exceptions are valid answers: every device answers, so the bus is up.
    assert bus.condition() == UP


async def test_exception_response_is_a_bad_quality_not_a_crash(
    running: tuple[ModbusBus, Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    _, rec = running
    reading = await rec.wait_latest("plc/d1/missing", lambda r: True)
    assert reading.quality is Quality.BAD
    assert reading.reason == "exception 02 illegal address"
    await rec.wait_for(lambda r: len(r.values("plc/d1/missing")) >= 5)
    # The journal hears of it once, not once per poll.
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["plc/d1: exception 02 illegal address on missing"]
    # The other points of the device are unaffected.
    assert rec.latest("plc/d1/i32").quality is Quality.GOOD  # type: ignore[union-attr]


async def test_writes_land_in_the_servers_datastore(
    running: tuple[ModbusBus, Recorder], peer: ModbusPeer
) -> None:
    bus, rec = running
    await rec.wait_for(lambda r: r.latest("plc/d1/coil0") is not None)
    await bus.write("d1/setpoint", -12.5)  # raw -25 (scale 0.5)
    await bus.write("d1/f32_w", 123.456)
    await bus.write("d1/coil0", True)
    await bus.write("d1/bit3", True)  # read-modify-write keeps bits 2 and 5
    store = await trio.to_thread.run_sync(peer.get, 1, 3, 25, 4)
    assert store == [0b0010_1100, 0xFFE7, 0x42F6, 0xE979]
    assert await trio.to_thread.run_sync(peer.get, 1, 1, 0, 1) == [True]
    # And the bus reads back what it wrote.
    await rec.wait_latest("plc/d1/setpoint", lambda r: r.value == -12.5)
    await rec.wait_latest("plc/d1/coil0", lambda r: r.value is True)


@pytest.mark.parametrize(
    ("target", "value", "message"),
    [
        ("d1/i32", 5, "plc/d1/i32: i32 is read-only"),
        ("d1/setpoint", 500, r"500 is above max \(100\)"),
        ("d1/setpoint", "high", "setpoint"),
        ("d1/nope", 1, "bus 'plc' has no point 'd1/nope'"),
    ],
)
async def test_bad_writes_are_refused_with_a_reason(
    running: tuple[ModbusBus, Recorder], peer: ModbusPeer, target: str, value: object, message: str
) -> None:
    bus, _ = running
    with pytest.raises(WriteError, match=message):
        await bus.write(target, value)  # type: ignore[arg-type]
    assert await trio.to_thread.run_sync(peer.get, 1, 3, 26, 1) == [0]


async def test_server_restart_reconnects_without_restarting_the_bus(
    running: tuple[ModbusBus, Recorder], peer: ModbusPeer
) -> None:
    bus, rec = running
    await rec.wait_latest("plc/d1/i32", lambda r: r.good)
    await trio.to_thread.run_sync(peer.stop)
    bad = await rec.wait_latest("plc/d1/i32", lambda r: not r.good)
    assert bad.reason in ("disconnected", "timeout")
    await trio.to_thread.run_sync(peer.start)
    await rec.wait_latest("plc/d1/i32", lambda r: r.good and r.value == -2)
    assert bus.link.reconnects >= 1


async def test_dead_unit_does_not_stall_the_live_one(peer: ModbusPeer) -> None:
    # Unit 9 gets no answer: every request to it times out.
    peer.silent_units.add(9)
    dead = """
[[buses.devices]]
name = "dead"
unit_id = 9
interval = "20ms"
points = [{ name = "x", table = "holding", address = 0 }]
"""
    config = bus_config(
        peer.port,
        dead,
        points='points = [{ name = "i32", table = "holding", address = 8, type = "int32" }]',
        interval="20ms",
        timeout='"100ms"',
        backoff_initial='"1s"',
        backoff_max='"2s"',
    )
    rec = Recorder()
    bus = modbus_tcp_bus(config, rec.context())
    live, silent = bus.devices["d1"].stats, bus.devices["dead"].stats
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await rec.wait_until(lambda: silent.timeouts == 1)
        start, polls_before = trio.current_time(), live.polls
        # Two more probes of the dead unit, after 0.5..1 s and 1..2 s of backoff.
        await rec.wait_until(lambda: silent.timeouts == 3)
        ticks = (trio.current_time() - start) / 0.02
        polls = live.polls - polls_before
        condition = bus.condition()
        nursery.cancel_scope.cancel()
    # Counted, not timed: between the probes the live unit is polled at every free tick (75..150
    # of them); each probe costs it one 100 ms timeout. Were the dead unit polled at every tick
    # (no per-device backoff), the live one would get a poll or two between its timeouts.
    assert polls >= 10, (polls, ticks)
    assert condition == Condition(State.DEGRADED, "dead not answering")
    stats = bus.statistics().devices
    assert stats["d1"].timeouts == 0
    assert bus.link.connects == 1  # a timeout is not a reason to drop the connection
    assert stats["d1"].latency_avg_ms is not None


async def test_rtu_framing_over_tcp_for_serial_device_servers() -> None:
    peer = ModbusPeer([device(1, holding=holding_image())], framer=FramerType.RTU)
    await trio.to_thread.run_sync(peer.start)
    try:
        rec = Recorder()
        config = bus_config(peer.port, framing='"rtu"')
        bus = modbus_tcp_bus(config, rec.context())
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            reading = await rec.wait_latest("plc/d1/f32_cdab", lambda r: r.good)
            assert reading.value == pytest.approx(123.456, rel=1e-6)
            await bus.write("d1/setpoint", 50)
            nursery.cancel_scope.cancel()
        assert await trio.to_thread.run_sync(peer.get, 1, 3, 26, 1) == [100]
    finally:
        await trio.to_thread.run_sync(peer.stop)


async def test_pause_after_connect_holds_the_first_request(peer: ModbusPeer) -> None:
    rec = Recorder()
    bus = modbus_tcp_bus(bus_config(peer.port, pause_after_connect='"300ms"'), rec.context())
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        await nursery.start(bus.run)
        await rec.wait_latest("plc/d1/i32", lambda r: r.good)
        # Nothing was sent during the pause: the device saw no request before it ended.
        assert trio.current_time() - started >= 0.3
        assert bus.link.connects == 1
        nursery.cancel_scope.cancel()


# ---- RTU frames over TCP: no transaction id, so stale input must never pass for an answer ----


def read(address: int) -> Request:
    return Request.read("holding", 1, address, 1)


async def test_rtu_over_tcp_a_late_answer_is_never_taken_for_the_next_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = LoopbackPeer("rtu")
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.serve)
        link = modbus_tcp_bus(bus_config(peer.port, framing='"rtu"'), Recorder().context()).link
        await nursery.start(link.run)
        assert (await link.transact(read(0))).registers == (0,)
        # The device answers the read of 10 only after the timeout, right before its answer
        # to the next request: both arrive after that request went out.
        peer.hold_next = True
        with pytest.raises(TimeoutError):
            await link.transact(read(10))
        for address in (20, 30, 40):
            assert (await link.transact(read(address))).registers == (address,)
        nursery.cancel_scope.cancel()
    # The late answer went to a connection that was closed after the timeout.
    assert link.statistics().resyncs == 1
    assert peer.connections == 2
    assert link.statistics().reconnects == 0  # a resync is not an outage


async def test_rtu_over_tcp_stale_bytes_are_dropped_before_each_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    peer = LoopbackPeer("rtu")
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.serve)
        link = modbus_tcp_bus(bus_config(peer.port, framing='"rtu"'), Recorder().context()).link
        await nursery.start(link.run)
        assert (await link.transact(read(10))).registers == (10,)
        stale = peer.frame(peer.answer(1, 3, 10, 1))  # the same answer again, out of turn
        await peer.send_raw(stale)
        assert (await link.transact(read(20))).registers == (20,)
        nursery.cancel_scope.cancel()
    assert link.statistics().discarded_bytes == len(stale)
    assert link.statistics().resyncs == 0


async def test_mbap_timeout_keeps_the_connection(autojump_clock: trio.testing.MockClock) -> None:
    # Transaction ids tell a late MBAP answer apart: no reason to reconnect.
    peer = LoopbackPeer("mbap")
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.serve)
        link = modbus_tcp_bus(bus_config(peer.port), Recorder().context()).link
        await nursery.start(link.run)
        peer.hold_next = True
        with pytest.raises(TimeoutError):
            await link.transact(read(10))
        for address in (20, 30):
            assert (await link.transact(read(address))).registers == (address,)
        nursery.cancel_scope.cancel()
    assert peer.connections == 1
    assert link.statistics().resyncs == 0


# ---- a peer that is not Modbus at all ----

NOT_MODBUS = "not Modbus: the device answered 'HTTP/1.1 400 Bad Request' (wrong port or protocol?)"


async def http_400(stream: trio.SocketStream) -> None:
    """A web server on the Modbus port: a 400 for whatever arrives, then close."""
    await stream.receive_some(4096)
    await stream.send_all(
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )


@pytest.mark.parametrize("framing", ['"mbap"', '"rtu"'])
async def test_an_http_server_on_the_port_is_reported_as_not_modbus(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, framing: str
) -> None:
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, http_400, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        bus = modbus_tcp_bus(bus_config(port, framing=framing), rec.context())
        await nursery.start(bus.run)
        await rec.wait_until(lambda: bus.devices["d1"].stats.not_modbus >= 3)
        condition = bus.condition()
        with pytest.raises(WriteError, match=re.escape(f"plc/d1/setpoint: {NOT_MODBUS}")):
            await bus.write("d1/setpoint", 1)
        nursery.cancel_scope.cancel()
    assert {r.reason for r in rec.readings} == {"not modbus"}
    stats = bus.statistics()
    assert stats.devices["d1"].crc_errors == 0
    assert stats.devices["d1"].last_error == NOT_MODBUS
    assert stats.link.crc_errors == 0  # nothing for `retries` to resend
    assert condition == Condition(State.DEGRADED, "d1 not Modbus")
    # The journal hears of it once, not once per probe.
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"plc/d1: {NOT_MODBUS}; probing with backoff"]


# ---- connection failures name the host; condition() says where ----


async def test_condition_is_starting_before_the_first_attempt() -> None:
    bus = modbus_tcp_bus(bus_config(free_port()), Recorder().context())
    assert bus.condition().state is State.STARTING
    await trio.lowlevel.checkpoint()


async def test_refused_connection_names_host_and_port(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    rec = Recorder()
    bus = modbus_tcp_bus(bus_config(port), rec.context())
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)  # started at once; the first attempt runs meanwhile
        await rec.wait_until(lambda: bus.condition().state is not State.STARTING)
        condition = bus.condition()
        await rec.wait_latest("plc/d1/i32", lambda r: r.reason == "disconnected")
        nursery.cancel_scope.cancel()
    assert condition == Condition(State.DOWN, f"127.0.0.1:{port} connection refused")
    message = (
        f"cannot connect to 127.0.0.1:{port}: connection refused "
        "(nothing accepts connections there: is the device on, is the port right?)"
    )
    assert bus.statistics().link.last_error == message
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"plc: {message}; retrying with backoff"]


class NoSuchHost(trio.abc.HostnameResolver):
    """A resolver that knows no names, as a DNS server answers for ``.invalid`` (RFC 6761).
    Tests send no traffic beyond loopback, so the query never leaves the process."""

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> NoReturn:
        await trio.lowlevel.checkpoint()
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        raise NotImplementedError


async def test_unresolvable_host_is_named(caplog: pytest.LogCaptureFixture) -> None:
    trio.socket.set_custom_hostname_resolver(NoSuchHost())  # for this trio.run only
    rec = Recorder()
    bus = modbus_tcp_bus(bus_config(502, host='"plc-7.invalid"'), rec.context())
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await rec.wait_until(lambda: bus.condition().state is not State.STARTING)
        condition = bus.condition()
        nursery.cancel_scope.cancel()
    assert condition == Condition(State.DOWN, "cannot resolve plc-7.invalid")
    message = bus.statistics().link.last_error
    assert message is not None
    assert re.fullmatch(
        r"cannot resolve host 'plc-7\.invalid' \(.+\): check the name or use an IP address",
        message,
    ), message
    assert "gaierror" not in message
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"plc: {message}; retrying with backoff"]


async def test_lost_connection_is_down_then_up_again(peer: ModbusPeer) -> None:
    rec = Recorder()
    bus = modbus_tcp_bus(bus_config(peer.port), rec.context())
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await rec.wait_latest("plc/d1/i32", lambda r: r.good)
        assert bus.condition() == UP
        await trio.to_thread.run_sync(peer.stop)
        await rec.wait_until(lambda: bus.condition().state is State.DOWN)
        assert bus.condition().reason in (
            f"127.0.0.1:{peer.port} connection lost",
            f"127.0.0.1:{peer.port} connection refused",
        )
        await trio.to_thread.run_sync(peer.start)
        await rec.wait_latest("plc/d1/i32", lambda r: r.good)
        assert bus.condition() == UP
        nursery.cancel_scope.cancel()


# ---- recovery after a long outage: within backoff_max (5 s by default), not a minute ----

OUTAGE = """
[[buses]]
name = "plc"
kind = "modbus-tcp"
host = "127.0.0.1"
port = {port}
timeout = "500ms"
[[buses.devices]]
name = "a"
unit_id = 1
interval = "1s"
points = [{{ name = "p", table = "holding", address = 7 }}]
[[buses.devices]]
name = "b"
unit_id = 2
interval = "1s"
points = [{{ name = "p", table = "holding", address = 8 }}]
"""


def outage_bus(port: int, rec: Recorder, seed: int) -> ModbusBus:
    config = parse_config(OUTAGE.format(port=port)).buses[0]
    assert isinstance(config, ModbusTcpBusConfig)
    assert config.backoff_max == 5.0  # the default under test
    bus = modbus_tcp_bus(config, rec.context())
    bus.link._rng = random.Random(seed)
    bus._rng = random.Random(seed)
    return bus


@pytest.mark.parametrize("seed", range(3))
async def test_a_plc_back_after_a_long_outage_is_read_within_seconds(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    peer = LoopbackPeer()
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.serve)
        bus = outage_bus(peer.port, rec, seed)
        await nursery.start(bus.run)
        await rec.wait_latest("plc/a/p", lambda r: r.good)
        await peer.close()  # switched off: connection closed, connects refused
        await rec.wait_until(lambda: bus.condition().state is State.DOWN)
        await trio.sleep(600)
        back = trio.current_time()
        await nursery.start(peer.serve)  # back, on the same port
        await rec.wait_latest("plc/a/p", lambda r: r.good, timeout=120)
        took = trio.current_time() - back
        nursery.cancel_scope.cancel()
    # Reconnect attempts are at most backoff_max apart; then the device's next tick.
    assert took <= 5.0 + 1.0, took
    assert bus.link.reconnects == 1


@pytest.mark.parametrize("seed", range(3))
async def test_a_device_silent_for_long_is_read_within_seconds_of_its_return(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    peer = LoopbackPeer()
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.serve)
        bus = outage_bus(peer.port, rec, seed)
        await nursery.start(bus.run)
        await rec.wait_latest("plc/a/p", lambda r: r.good)
        peer.silent_units.add(1)  # a rebooting device behind a gateway: no answer at all
        await rec.wait_latest("plc/a/p", lambda r: r.reason == "timeout")
        assert bus.condition() == Condition(State.DEGRADED, "a not answering")
        b = bus.devices["b"].stats
        start, b_polls = trio.current_time(), b.polls
        await trio.sleep(600)
        back = trio.current_time()
        peer.silent_units.clear()
        await rec.wait_latest("plc/a/p", lambda r: r.good, timeout=120)
        took = trio.current_time() - back
        ticks = math.floor(trio.current_time() - start)
        assert bus.condition() == UP
        nursery.cancel_scope.cancel()
    # Probes are at most backoff_max apart (one may be waiting out its timeout at the return).
    assert took <= 5.0 + 0.5 + 1e-6, took
    # Device b, on the same connection, kept its schedule all along: every tick polled.
    assert b.polls - b_polls in (ticks, ticks + 1)
    assert b.overruns == 0
    assert b.timeouts == 0
    assert bus.link.connects == 1


# ---- statistics() ----


async def test_statistics_are_frozen_values(running: tuple[ModbusBus, Recorder]) -> None:
    bus, rec = running
    await rec.wait_latest("plc/d1/i32", lambda r: r.good)
    stats = bus.statistics()
    assert isinstance(stats, ModbusBusStatistics)
    assert isinstance(stats.link, LinkStatistics)
    assert isinstance(stats.devices["d1"], DeviceStatistics)
    assert stats.link.up
    assert stats.link.connects == 1
    assert stats.devices["d1"].responses >= 1
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.link.up = False  # type: ignore[misc]
    # A snapshot: later polls do not change it.
    polls = stats.devices["d1"].polls
    await rec.wait_until(lambda: bus.devices["d1"].stats.polls > polls)
    assert stats.devices["d1"].polls == polls


@pytest.mark.parametrize(
    ("code", "message", "short"),
    [
        (
            errno.EHOSTUNREACH,
            "cannot connect to 10.0.0.5:502: no route to host "
            "(is the device on, is the address right?)",
            "10.0.0.5:502 no route to host",
        ),
        (
            errno.ENETUNREACH,
            "cannot connect to 10.0.0.5:502: network is unreachable "
            "(check the address and this machine's network settings)",
            "10.0.0.5:502 network is unreachable",
        ),
    ],
)
def test_connect_errors_name_host_and_port(code: int, message: str, short: str) -> None:
    # What trio.open_tcp_stream raises: one OSError caused by a group of each attempt's error.
    error = OSError("all attempts to connect to 10.0.0.5:502 failed")
    error.__cause__ = ExceptionGroup("attempts", [OSError(code, os.strerror(code))])
    result = connect_error("10.0.0.5", "10.0.0.5:502", error)
    assert (str(result), result.short) == (message, short)


async def test_a_device_that_accepts_and_closes_is_down_logged_once_and_backed_off(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A PLC at its connection limit accepts and closes at once. Connecting is not an
    answer: the bus stays down, the outage is logged once, and reconnects back off."""

    async def accept_and_close(stream: trio.SocketStream) -> None:
        await stream.aclose()

    rec = Recorder()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, accept_and_close, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        bus = modbus_tcp_bus(
            bus_config(port, backoff_initial='"1s"', backoff_max='"5s"'), rec.context()
        )
        await nursery.start(bus.run)
        states = []
        for _ in range(60):
            await trio.sleep(1)
            states.append(bus.condition().state)
        connects = bus.link.connects
        nursery.cancel_scope.cancel()
    assert State.UP not in states[2:], states
    assert bus.condition().reason is not None
    # Reconnects at most every 2.5-5 s once the backoff has grown: about 60 / 3.75.
    assert connects <= 25, connects
    lost = [r.getMessage() for r in caplog.records if "connection lost" in r.getMessage()]
    assert len(lost) == 1, lost
    assert not [r for r in caplog.records if "connected again" in r.getMessage()]
