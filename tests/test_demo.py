"""``edge-gateway demo`` as a real subprocess: the sim bus and the Modbus TCP bus polling the
demo's own pymodbus energy meter both deliver values, the log stays readable, and SIGINT
(Ctrl-C) stops everything with exit status 0. Also the simulator on its own, as a peer."""

from __future__ import annotations

import math
import re
import signal
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio

from drivers.modbus.config import ModbusTcpBusConfig
from drivers.modbus.tcp import modbus_tcp_bus
from gateway.core.configtypes import Duration
from gateway.demo import PLC_BUS, demo_config, show
from gateway.simulator import EnergyMeterSimulator
from tests.conftest import TIMEOUT, Daemon
from tests.readings import Recorder

NUMBER = r"-?\d+(?:\.\d+)?"


@pytest.fixture
def demo() -> Iterator[Daemon]:
    d = Daemon(["demo"], None, {})
    yield d
    d.kill()


def test_demo_polls_the_modbus_simulator_and_stops_on_ctrl_c(demo: Daemon) -> None:
    # The console logs every 3 s; the first line may come before the first Modbus poll.
    line = demo.wait_for_line(
        lambda line: "latest: " in line and "plc/meter/voltage=" in line, timeout=3 * TIMEOUT
    )
    voltage = float(re.search(rf"plc/meter/voltage=({NUMBER}) V", line).group(1))  # type: ignore[union-attr]
    assert 220 < voltage < 240
    assert re.search(rf"plc/meter/energy={NUMBER} kWh", line), line
    assert "plc/meter/relay=True" in line
    assert re.search(rf"line-1/boiler/temperature={NUMBER} degC", line), line
    assert "BAD(" not in line

    demo.proc.send_signal(signal.SIGINT)
    # shutdown_timeout is 5 s; a clean stop takes a fraction of that.
    assert demo.wait_exit(timeout=5 + 2) == 0
    assert demo.lines[-1].endswith("gateway: stopped")
    assert any("stopping (SIGINT)" in line for line in demo.lines)
    # Readable: nothing from pymodbus (no '>>>>> send: 0x..' frame dumps), no tracebacks,
    # no warnings (a lost or refused connection to the simulator would be one).
    text = "\n".join(demo.lines)
    assert ">>>>>" not in text
    assert "pymodbus" not in text
    assert "Traceback" not in text
    assert not [line for line in demo.lines if " WARNING " in line or " ERROR " in line]


# ---- the simulator on its own -----------------------------------------------------------------


@pytest.fixture
def meter() -> Iterator[EnergyMeterSimulator]:
    with EnergyMeterSimulator(update=0.05) as m:
        yield m


def plc_bus(port: int) -> ModbusTcpBusConfig:
    """The demo's plc bus, polling faster than the demo does so that the test is quick."""
    config = demo_config("/tmp/unused", plc_port=port)
    (bus,) = (b for b in config.buses if b.name == PLC_BUS)
    assert isinstance(bus, ModbusTcpBusConfig)
    assert bus.port == port
    fast = tuple(attrs.evolve(d, interval=Duration(0.05)) for d in bus.devices)
    return attrs.evolve(bus, devices=fast)


def test_demo_config_without_a_port_has_no_plc_bus() -> None:
    assert [b.name for b in demo_config("/tmp/unused").buses] == ["line-1"]
    assert [b.name for b in demo_config("/tmp/unused", plc_port=1502).buses] == ["line-1", "plc"]


def test_simulator_listens_on_an_ephemeral_port(meter: EnergyMeterSimulator) -> None:
    assert meter.host == "127.0.0.1"
    assert 1024 <= meter.port <= 65535


async def test_demo_points_read_the_simulated_meter(meter: EnergyMeterSimulator) -> None:
    rec = Recorder()
    bus = modbus_tcp_bus(plc_bus(meter.port), rec.context())
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        topics = [f"plc/meter/{p.name}" for p in bus.devices["meter"].config.points]
        await rec.wait_for(lambda r: all(r.latest(t) for t in topics))
        readings = {t.rsplit("/", 1)[1]: rec.latest(t) for t in topics}
        assert all(r is not None and r.good for r in readings.values()), readings
        v: dict[str, Any] = {name: r.value for name, r in readings.items() if r is not None}
        assert 220 < v["voltage"] < 240
        assert 5 < v["current"] < 17
        # One request reads voltage, current and power, and the simulator updates them at once.
        assert v["power"] == pytest.approx(v["voltage"] * v["current"] * 0.95, rel=1e-4)
        assert 49.9 < v["frequency"] < 50.1
        assert v["energy"] == pytest.approx(12345.67, abs=0.5)
        assert v["power_limit"] == pytest.approx(3.0)
        assert v["relay"] is True
        assert v["relay_closed"] is True
        assert isinstance(v["over_limit"], bool)

        # Values change over time.
        voltage = v["voltage"]
        await rec.wait_latest("plc/meter/voltage", lambda r: r.value != voltage)

        # Writes reach the model: open the relay and the current drops to 0.
        await bus.write("meter/relay", False)
        await rec.wait_latest("plc/meter/current", lambda r: r.value == 0.0)
        await rec.wait_latest("plc/meter/relay_closed", lambda r: r.value is False)
        await bus.write("meter/power_limit", 5.5)
        await rec.wait_latest("plc/meter/power_limit", lambda r: r.value == pytest.approx(5.5))
        nursery.cancel_scope.cancel()


def test_stop_is_idempotent_and_frees_the_port() -> None:
    m = EnergyMeterSimulator().start()
    port = m.port
    m.stop()
    m.stop()
    # Nothing listens any more: a new server can take the same port.
    with EnergyMeterSimulator(port=port) as again:
        assert again.port == port


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (230.10000610351562, "230.1"),  # float32 230.1
        (12345.67, "12345.67"),
        (60.0, "60.0"),
        (5, "5"),
        (True, "True"),
        (math.inf, "inf"),
        ("HELLO", "HELLO"),
    ],
)
def test_console_shows_what_the_device_meant(value: object, shown: str) -> None:
    assert show(value) == shown  # type: ignore[arg-type]
