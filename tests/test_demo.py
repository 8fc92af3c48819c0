"""``edge-gateway demo`` as a real subprocess: the sim bus and the Modbus TCP bus polling the
demo's own pymodbus energy meter both deliver values, the log stays readable, and SIGINT
(Ctrl-C) stops everything with exit status 0. Also the simulator on its own, as a peer."""

from __future__ import annotations

import json
import math
import re
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import websockets.sync.client

from drivers.modbus.config import ModbusTcpBusConfig
from drivers.modbus.tcp import modbus_tcp_bus
from gateway import localendpoint
from gateway.core.configtypes import Duration
from gateway.demo import PLC_BUS, demo_config, show
from gateway.simulator import EnergyMeterSimulator
from tests.conftest import TIMEOUT, Daemon, gateway_command, gateway_env
from tests.readings import Recorder

NUMBER = r"-?\d+(?:\.\d+)?"


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Daemon]:
    # Its certificate and the local endpoint file go below tmp_path, not the user's home.
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "RUNTIME_DIRECTORY": str(tmp_path / "run")}
    d = Daemon(["demo"], None, env)
    yield d
    d.kill()


def test_demo_serves_wss_with_its_self_signed_certificate(demo: Daemon, tmp_path: Path) -> None:
    line = demo.wait_for_log("demo: devices connect to wss://127.0.0.1:")
    match = re.search(r"wss://127\.0\.0\.1:(\d+) as client demo-device with token (\S+) ", line)
    assert match is not None, line
    port, token = int(match.group(1)), match.group(2)
    cert = tmp_path / "data" / "edge-gateway" / "demo-cert.pem"
    assert f"self-signed (made now in {cert})" in line
    demo.wait_for_log("gateway ready:")

    # The demo device's token, trusting exactly the certificate the log names; the name
    # checked is 127.0.0.1, which the certificate holds.
    context = ssl.create_default_context(cafile=str(cert))
    with websockets.sync.client.connect(
        f"wss://127.0.0.1:{port}/",
        ssl=context,
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=TIMEOUT,
    ) as ws:
        ws.send(json.dumps({"type": "subscribe", "topics": ["plc/#"], "last": True}))
        frame = json.loads(ws.recv(timeout=TIMEOUT))
        assert frame["type"] == "readings"
        assert all(r["topic"].startswith("plc/meter/") for r in frame["readings"])
    endpoint = localendpoint.read(tmp_path / "run" / localendpoint.FILE_NAME)
    assert endpoint.url == f"wss://127.0.0.1:{port}"
    assert endpoint.cert_file == str(cert)

    # What the log promises: on this machine, 'edge-gateway tail' with no URL or token.
    tail = subprocess.Popen(
        gateway_command("tail", "--last", "plc/meter/voltage"),
        env=gateway_env(RUNTIME_DIRECTORY=str(tmp_path / "run")),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert tail.stdout is not None
        line = tail.stdout.readline()
        assert re.fullmatch(
            rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z +plc/meter/voltage +{NUMBER} V\n", line
        ), line
        tail.send_signal(signal.SIGINT)
        assert tail.wait(TIMEOUT) == 130
    finally:
        tail.kill()
        tail.communicate()

    demo.proc.send_signal(signal.SIGINT)
    assert demo.wait_exit() == 0


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
