"""``check_write`` (a write validated against the config alone, no I/O) and ``read`` (a point
read on demand, for read-back) of every driver.

Each refused case is checked twice: ``check_write`` on the config raises, and the bus's
``write`` raises the same exception class with the same message, without sending anything
(pymodbus's server is the Modbus peer: its datastore stays as it was). Reads go to pymodbus's
server too: after a write, of what the device holds now (not the last poll), of a slave that
does not answer, of a line that is down.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from drivers.base import UnknownPoint, WriteError, WriteUncertain, unknown_point
from drivers.lines import LinePointConfig, SerialLineBus, SerialLineBusConfig
from drivers.modbus.bus import ModbusBus
from drivers.modbus.config import ModbusRtuBusConfig, ModbusTcpBusConfig
from drivers.modbus.tcp import modbus_tcp_bus
from drivers.registry import KINDS
from drivers.sim import SimBus, SimBusConfig
from gateway.config import parse_config
from gateway.core.component import State
from gateway.core.configtypes import Name
from gateway.core.reading import Value
from tests.modbus_peer import ModbusPeer, device, free_port
from tests.readings import Recorder

# ---- Modbus ---------------------------------------------------------------------------------

POINTS = """
points = [
  { name = "i32", table = "holding", address = 8, type = "int32" },
  { name = "i16", table = "holding", address = 20, type = "int16" },
  { name = "bit2", table = "holding", address = 25, type = "bool", bit = 2 },
  { name = "bit3", table = "holding", address = 25, type = "bool", bit = 3, writable = true },
  { name = "setpoint", table = "holding", address = 26, type = "int16", scale = 0.5, writable = true, min = -100, max = 100 },
  { name = "f32_w", table = "holding", address = 27, type = "float32", writable = true },
  { name = "centi", table = "holding", address = 30, type = "int16", scale = 0.01, writable = true },
  { name = "u16", table = "holding", address = 31, type = "uint16", writable = true, min = 10 },
  { name = "nan", table = "holding", address = 32, type = "float32" },
  { name = "text", table = "holding", address = 40, type = "string", length = 2, writable = true },
  { name = "in", table = "input", address = 5, type = "uint16" },
  { name = "in_bit", table = "input", address = 6, type = "bool", bit = 0 },
  { name = "coil0", table = "coil", address = 0, type = "bool", writable = true },
  { name = "coil1", table = "coil", address = 1, type = "bool" },
  { name = "di3", table = "discrete", address = 3, type = "bool" },
  { name = "missing", table = "holding", address = 500, type = "uint16", writable = true },
]
"""
DEAD = """
[[buses.devices]]
name = "dead"
unit_id = 9
interval = "1h"
points = [{ name = "x", table = "holding", address = 0, writable = true }]
"""


def modbus_text(kind: str, where: str, *, timeout: str = "300ms", devices: str = "") -> str:
    return f"""
[[buses]]
name = "plc"
kind = "{kind}"
{where}
timeout = "{timeout}"
backoff_initial = "100ms"
backoff_max = "200ms"
[[buses.devices]]
name = "d1"
unit_id = 1
interval = "1h"
max_gap = 10
{POINTS}
{devices}
"""


def tcp_config(port: int, **kw: str) -> ModbusTcpBusConfig:
    # interval 1h: the bus polls once at start, so what a read returns comes from the read.
    config = parse_config(modbus_text("modbus-tcp", f'host = "127.0.0.1"\nport = {port}', **kw))
    bus = config.buses[0]
    assert isinstance(bus, ModbusTcpBusConfig)
    return bus


TCP = tcp_config(502)
RTU = parse_config(modbus_text("modbus-rtu", 'port = "/dev/ttyUSB0"')).buses[0]
assert isinstance(RTU, ModbusRtuBusConfig)

READ_ONLY = (
    "is read-only: set writable = true in its [[buses.devices.points]] table to allow writes"
)
NOT_IN_MODBUS = "are read-only in Modbus; write to a coil or holding register instead"
MODBUS_REFUSED = [
    pytest.param(
        "dx/setpoint",
        1,
        UnknownPoint,
        "bus 'plc' has no point 'dx/setpoint'; did you mean 'd1/setpoint'?",
        id="unknown device",
    ),
    pytest.param(
        "d1/setpont",
        1,
        UnknownPoint,
        "bus 'plc' has no point 'd1/setpont'; did you mean 'd1/setpoint' or 'd1/centi'?",
        id="unknown point",
    ),
    pytest.param("d1/i32", 5, WriteError, f"plc/d1/i32: i32 {READ_ONLY}", id="read-only"),
    pytest.param("d1/coil1", True, WriteError, f"plc/d1/coil1: coil1 {READ_ONLY}", id="ro coil"),
    pytest.param("d1/bit2", True, WriteError, f"plc/d1/bit2: bit2 {READ_ONLY}", id="ro bit"),
    pytest.param(
        "d1/di3",
        True,
        WriteError,
        f"plc/d1/di3: di3 is on discrete 3: discrete inputs {NOT_IN_MODBUS}",
        id="discrete",
    ),
    pytest.param(
        "d1/in", 1, WriteError, f"plc/d1/in: in is on input 5: input registers {NOT_IN_MODBUS}"
    ),
    pytest.param(
        "d1/in_bit",
        True,
        WriteError,
        f"plc/d1/in_bit: in_bit is on input 6: input registers {NOT_IN_MODBUS}",
        id="bit of an input register",
    ),
    pytest.param(
        "d1/setpoint",
        "high",
        WriteError,
        "plc/d1/setpoint: setpoint is an int16: send a number, not str 'high'",
        id="string to int16",
    ),
    pytest.param(
        "d1/f32_w",
        True,
        WriteError,
        "plc/d1/f32_w: f32_w is a float32: send a number, not bool True",
        id="bool to float32",
    ),
    pytest.param(
        "d1/setpoint",
        None,
        WriteError,
        "plc/d1/setpoint: setpoint is an int16: send a number, not null None",
        id="null to int16",
    ),
    pytest.param(
        "d1/coil0",
        1,
        WriteError,
        "plc/d1/coil0: coil0 is a bool: send true or false, not int 1",
        id="number to coil",
    ),
    pytest.param(
        "d1/bit3",
        1,
        WriteError,
        "plc/d1/bit3: bit3 is a bool: send true or false, not int 1",
        id="number to a bit of a holding register",
    ),
    pytest.param(
        "d1/setpoint",
        -150,
        WriteError,
        "plc/d1/setpoint: setpoint: -150 is below min (-100); send a value in -100..100",
        id="below min",
    ),
    pytest.param(
        "d1/setpoint",
        500,
        WriteError,
        "plc/d1/setpoint: setpoint: 500 is above max (100); send a value in -100..100",
        id="above max",
    ),
    pytest.param("d1/u16", 5, WriteError, "plc/d1/u16: u16: 5 is below min (10); send 10 or more"),
    pytest.param(
        "d1/u16",
        70000,
        WriteError,
        "plc/d1/u16: u16: 70000 is outside uint16 (0..65535); send a value in that range",
        id="outside uint16",
    ),
    pytest.param(
        "d1/centi",
        400,
        WriteError,
        "plc/d1/centi: centi: 400 becomes raw 40000 (scale 0.01, offset 0), outside int16 "
        "(-32768..32767); send a value in -327.68..327.67",
        id="outside int16 after scale",
    ),
    pytest.param(
        "d1/f32_w",
        1e39,
        WriteError,
        "plc/d1/f32_w: f32_w: 1e+39 is outside float32; send a value in "
        "-3.402823466e+38..3.402823466e+38",
        id="float32 overflow",
    ),
    pytest.param(
        "d1/setpoint",
        math.nan,
        WriteError,
        "plc/d1/setpoint: setpoint: nan is not a finite number; send a finite number",
        id="nan",
    ),
    pytest.param(
        "d1/text",
        "abcde",
        WriteError,
        "plc/d1/text: text: 'abcde' has 5 characters, more than the 4 that fit in 2 "
        "registers; send at most 4",
        id="string too long",
    ),
]
MODBUS_ACCEPTED: list[tuple[str, Value]] = [
    ("d1/setpoint", -12.5),
    ("d1/setpoint", 100),
    ("d1/f32_w", 123.456),
    ("d1/centi", -327.68),
    ("d1/u16", 10),
    ("d1/coil0", True),
    ("d1/bit3", False),
    ("d1/text", "ab"),
]


@pytest.mark.parametrize(("target", "value", "error", "message"), MODBUS_REFUSED)
@pytest.mark.parametrize("config", [TCP, RTU], ids=["tcp", "rtu"])
def test_modbus_check_write_refuses_with_what_to_send(
    config: ModbusTcpBusConfig | ModbusRtuBusConfig,
    target: str,
    value: Value,
    error: type[WriteError],
    message: str,
) -> None:
    # A plain function: check_write needs no event loop and does no I/O.
    with pytest.raises(WriteError) as refused:
        config.check_write(target, value)
    assert type(refused.value) is error
    assert str(refused.value) == message


@pytest.mark.parametrize(("target", "value"), MODBUS_ACCEPTED)
def test_modbus_check_write_accepts_what_fits(target: str, value: Value) -> None:
    TCP.check_write(target, value)
    RTU.check_write(target, value)


HOLDING = {8: [0xFFFF, 0xFFFE], 20: [0xFFFF], 25: [0b0010_0100], 32: [0x7FC0, 0x0000]}


@pytest.fixture
def peer() -> Iterator[ModbusPeer]:
    holding = [0] * 200
    for address, values in HOLDING.items():
        holding[address : address + len(values)] = values
    dev = device(
        1,
        holding=holding,
        input=[0, 0, 0, 0, 0, 77, 1],
        coils=[False, True],
        discrete=[False, False, False, True],
    )
    p = ModbusPeer([dev], silent_units=[9]).start()
    yield p
    p.stop()


@pytest.fixture
async def bus(peer: ModbusPeer) -> AsyncIterator[ModbusBus]:
    recorder = Recorder()
    bus = modbus_tcp_bus(tcp_config(peer.port), recorder.context())
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await recorder.wait_latest("plc/d1/i32", lambda r: r.good)  # connected, polled once
        yield bus
        nursery.cancel_scope.cancel()


async def datastore(peer: ModbusPeer) -> tuple[list[int], list[bool]]:
    holding = await trio.to_thread.run_sync(peer.get, 1, 3, 0, 50)
    coils = await trio.to_thread.run_sync(peer.get, 1, 1, 0, 8)
    return holding, coils


@pytest.mark.parametrize(("target", "value", "error", "message"), MODBUS_REFUSED)
async def test_modbus_write_refuses_as_check_write_does_and_sends_nothing(
    bus: ModbusBus,
    peer: ModbusPeer,
    target: str,
    value: Value,
    error: type[WriteError],
    message: str,
) -> None:
    before = await datastore(peer)
    with pytest.raises(WriteError) as refused:
        await bus.write(target, value)
    assert type(refused.value) is error
    assert str(refused.value) == message
    assert await datastore(peer) == before


async def test_modbus_accepted_writes_land(bus: ModbusBus, peer: ModbusPeer) -> None:
    for target, value in MODBUS_ACCEPTED:
        await bus.write(target, value)
    holding, coils = await datastore(peer)
    assert holding[25:32] == [0b0010_0100, 200, 0x42F6, 0xE979, 0, 0x8000, 10]
    assert holding[40:42] == [0x6162, 0]
    assert coils[:2] == [True, True]


@pytest.mark.parametrize(
    ("target", "value", "expected"),
    [
        ("d1/setpoint", -12.5, -12.5),  # int16, scale 0.5: raw -25
        ("d1/centi", 123.45, 123.45),
        ("d1/f32_w", 123.456, pytest.approx(123.456, rel=1e-6)),
        ("d1/coil0", True, True),
        ("d1/bit3", True, True),
        ("d1/text", "ab", "ab"),
    ],
)
async def test_modbus_read_back_after_write(
    bus: ModbusBus, target: str, value: Value, expected: object
) -> None:
    await bus.write(target, value)
    assert await bus.read(target) == expected


async def test_modbus_read_a_bit_keeps_the_other_bits(bus: ModbusBus, peer: ModbusPeer) -> None:
    await bus.write("d1/bit3", True)
    assert await bus.read("d1/bit2") is True  # set in the datastore, untouched by the write
    assert await bus.read("d1/bit3") is True
    await bus.write("d1/bit3", False)
    assert await bus.read("d1/bit3") is False
    assert await trio.to_thread.run_sync(peer.get, 1, 3, 25, 1) == [0b0010_0100]


async def test_modbus_read_gives_what_the_device_holds_now(
    bus: ModbusBus, peer: ModbusPeer
) -> None:
    # The bus polled these once at start (interval 1h); the device's values change since.
    await trio.to_thread.run_sync(peer.set, 1, 3, 20, [0xFFFE])
    await trio.to_thread.run_sync(peer.set, 1, 1, 1, [False])
    await trio.to_thread.run_sync(peer.set, 1, 4, 5, [78])
    assert await bus.read("d1/i16") == -2
    assert await bus.read("d1/coil1") is False
    assert await bus.read("d1/in") == 78
    # Tables writes cannot reach are readable all the same.
    assert await bus.read("d1/di3") is True
    assert await bus.read("d1/in_bit") is True
    assert await bus.read("d1/i32") == -2


async def test_modbus_read_failures_name_the_point(bus: ModbusBus) -> None:
    with pytest.raises(UnknownPoint, match=r"^bus 'plc' has no point 'd1/nope'; "):
        await bus.read("d1/nope")
    with pytest.raises(WriteError) as refused:
        await bus.read("d1/missing")  # address 500: the device has 200 registers
    assert str(refused.value) == (
        "plc/d1/missing: device refused the read: exception 02 illegal address"
    )
    with pytest.raises(WriteError) as nan:
        await bus.read("d1/nan")
    assert str(nan.value) == "plc/d1/nan: the device holds nan, not a number"
    # A write to the same address is refused in the write's words, as before.
    with pytest.raises(WriteError, match="device refused the write: exception 02"):
        await bus.write("d1/missing", 1)


async def test_modbus_read_of_a_slave_that_does_not_answer(peer: ModbusPeer) -> None:
    config = tcp_config(peer.port, timeout="100ms", devices=DEAD)
    recorder = Recorder()
    bus = modbus_tcp_bus(config, recorder.context())
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await recorder.wait_latest("plc/d1/i32", lambda r: r.good)
        with pytest.raises(WriteError) as timeout:
            await bus.read("dead/x")
        assert str(timeout.value) == "plc/dead/x: no response within 0.1s"
        # A write without an answer may or may not have happened: said so, and typed so.
        with pytest.raises(WriteUncertain) as unsure:
            await bus.write("dead/x", 1)
        assert str(unsure.value) == (
            "plc/dead/x: no response within 0.1s; the write may or may not have happened"
        )
        assert not isinstance(timeout.value, WriteUncertain)  # a read is just failed
        # The live slave is read as ever.
        assert await bus.read("d1/i32") == -2
        nursery.cancel_scope.cancel()


async def test_modbus_read_while_the_line_is_down() -> None:
    recorder = Recorder()
    bus = modbus_tcp_bus(tcp_config(free_port()), recorder.context())  # nothing listens
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await recorder.wait_until(lambda: bus.condition().state is State.DOWN)
        with pytest.raises(WriteError, match=r"^plc/d1/i32: bus disconnected \(.+\)$"):
            await bus.read("d1/i32")
        nursery.cancel_scope.cancel()
    # check_write needs no line: the config alone answers.
    tcp_config(free_port()).check_write("d1/setpoint", 1)


# ---- sim ------------------------------------------------------------------------------------

SIM = """
[[buses]]
name = "sim"
kind = "sim"
[[buses.devices]]
name = "d"
interval = "1s"
points = [
  { name = "sine", signal = "sine", low = 0, high = 10, period = "4s" },
  { name = "count", signal = "counter", low = 100, step = 2 },
  { name = "walk", signal = "random-walk", low = 0, high = 1, step = 0.5 },
  { name = "sp", signal = "setpoint", low = 10, high = 20 },
]
"""


def sim_bus() -> tuple[SimBusConfig, SimBus]:
    config = parse_config(SIM).buses[0]
    assert isinstance(config, SimBusConfig)
    return config, SimBus(config, Recorder().context())


SIM_REFUSED = [
    pytest.param(
        "tank/sp",
        15,
        UnknownPoint,
        "bus 'sim' has no point 'tank/sp'; its devices are d",
        id="device",
    ),
    pytest.param("d/spp", 15, UnknownPoint, "bus 'sim' has no point 'd/spp'; did you mean 'd/sp'?"),
    pytest.param(
        "d/sine", 5, WriteError, "sim/d/sine is a sine signal; only setpoints are writable"
    ),
    pytest.param(
        "d/sp",
        "hot",
        WriteError,
        "sim/d/sp takes a number, got 'hot'; send a number in 10.0..20.0",
        id="string",
    ),
    pytest.param(
        "d/sp",
        True,
        WriteError,
        "sim/d/sp takes a number, got True; send a number in 10.0..20.0",
        id="bool",
    ),
    pytest.param(
        "d/sp",
        None,
        WriteError,
        "sim/d/sp takes a number, got None; send a number in 10.0..20.0",
        id="null",
    ),
    pytest.param(
        "d/sp",
        9.5,
        WriteError,
        "9.5 is outside sim/d/sp's range 10.0..20.0; send a number in that range",
        id="below",
    ),
    pytest.param(
        "d/sp",
        25,
        WriteError,
        "25 is outside sim/d/sp's range 10.0..20.0; send a number in that range",
        id="above",
    ),
    pytest.param(
        "d/sp",
        math.nan,
        WriteError,
        "nan is outside sim/d/sp's range 10.0..20.0; send a number in that range",
        id="nan",
    ),
]


@pytest.mark.parametrize(("target", "value", "error", "message"), SIM_REFUSED)
async def test_sim_write_refuses_as_check_write_does(
    target: str, value: Value, error: type[WriteError], message: str
) -> None:
    config, bus = sim_bus()
    with pytest.raises(WriteError) as checked:
        config.check_write(target, value)
    assert type(checked.value) is error
    assert str(checked.value) == message
    with pytest.raises(WriteError) as written:
        await bus.write(target, value)
    assert type(written.value) is error
    assert str(written.value) == message
    assert await bus.read("d/sp") == 10.0  # unchanged


async def test_sim_read(autojump_clock: trio.testing.MockClock) -> None:
    config, bus = sim_bus()
    config.check_write("d/sp", 12)
    # Before the first poll: the first sample (a random walk starts at low).
    assert [await bus.read(f"d/{p}") for p in ("sine", "count", "walk", "sp")] == [5.0, 100, 0, 10]
    await bus.write("d/sp", 12)
    assert await bus.read("d/sp") == 12.0
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await trio.sleep(2.5)  # samples 0, 1 and 2
        assert await bus.read("d/count") == 104
        assert await bus.read("d/sine") == 5.0  # 2 s of a 4 s period: back to the middle
        assert await bus.read("d/sp") == 12.0
        nursery.cancel_scope.cancel()
    with pytest.raises(UnknownPoint, match=r"^bus 'sim' has no point 'd/nope'"):
        await bus.read("d/nope")


# ---- serial line ----------------------------------------------------------------------------


def line_bus(tmp_path: Path) -> tuple[SerialLineBusConfig, SerialLineBus]:
    config = SerialLineBusConfig(
        Name("wx"),
        port=str(tmp_path / "tty"),
        pattern=r"T=(?P<temperature>\S+) H=(?P<humidity>\S+)",
        points=(LinePointConfig(Name("temperature")), LinePointConfig(Name("humidity"))),
    )
    assert list(config.check()) == []
    return config, SerialLineBus(config, Recorder().context())  # the port is never opened


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (
            "sensor/temperature",
            WriteError,
            "wx/sensor/temperature is on a serial-line bus; line sensors are read-only",
        ),
        ("sensor/wind", UnknownPoint, "bus 'wx' has no point 'sensor/wind'; did you mean "),
        ("gps/temperature", UnknownPoint, "bus 'wx' has no point 'gps/temperature'; did you "),
        ("x/y", UnknownPoint, "bus 'wx' has no point 'x/y'; its devices are sensor"),
    ],
)
async def test_line_sensors_refuse_writes(
    tmp_path: Path, target: str, error: type[WriteError], message: str
) -> None:
    config, bus = line_bus(tmp_path)
    with pytest.raises(WriteError) as checked:
        config.check_write(target, 1.0)
    assert type(checked.value) is error
    assert str(checked.value).startswith(message)
    with pytest.raises(WriteError) as written:
        await bus.write(target, 1.0)
    assert type(written.value) is error
    assert str(written.value) == str(checked.value)


async def test_line_sensors_cannot_be_read_on_demand(tmp_path: Path) -> None:
    _, bus = line_bus(tmp_path)
    with pytest.raises(WriteError) as refused:
        await bus.read("sensor/humidity")
    assert type(refused.value) is WriteError
    assert str(refused.value) == (
        "wx/sensor/humidity is on a serial-line bus: line sensors cannot be read on demand; "
        "their latest value is in the hub (the bus publishes every line)"
    )
    with pytest.raises(UnknownPoint):
        await bus.read("sensor/nope")


# ---- every driver; the hints of an unknown point ----------------------------------------------


def test_every_driver_kind_checks_writes() -> None:
    """The registry types config classes as ``Any`` (mypy checks its factories return a
    ``Bus``, with ``read``, but not this): a kind without ``check_write`` would fail the
    command router at run time."""
    for kind in KINDS.values():
        assert callable(getattr(kind.config_type, "check_write", None)), kind.kind


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("d1/temprature", "bus 'b' has no point 'd1/temprature'; did you mean 'd1/temperature'?"),
        ("zz/q", "bus 'b' has no point 'zz/q'; its devices are d1, d2"),
        ("d1/xyz", "bus 'b' has no point 'd1/xyz'; the points of 'd1' are temperature, p0, p1, p2, "
         "p3, p4, p5, p6, p7, p8, ... (12 in all)"),
        ("d2/q", "bus 'b' has no point 'd2/q'; the points of 'd2' are flow"),
    ],
)  # fmt: skip
def test_unknown_point_says_what_exists(target: str, message: str) -> None:
    points = ["d1/temperature", *(f"d1/p{i}" for i in range(11)), "d2/flow"]
    error = unknown_point("b", target, points)
    assert isinstance(error, UnknownPoint)
    assert isinstance(error, WriteError)  # callers that catch WriteError catch it too
    assert str(error) == message
    assert str(unknown_point("b", "d/p", [])) == "bus 'b' has no point 'd/p'; it has no devices"
