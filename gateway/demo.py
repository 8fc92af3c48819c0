"""``edge-gateway demo``: the real daemon on an embedded config with simulated sensors.

Two buses: ``line-1`` (the sim driver) and ``plc``, the Modbus TCP driver polling the energy
meter of ``gateway.simulator`` (pymodbus's server, started by ``edge-gateway demo`` on a free
port of 127.0.0.1). State goes to a temporary directory; a console component logs the latest
values every few seconds so a person can see data flowing. Later components (wss, outbox, CPI
stand-in, status page) add themselves here.
"""

from __future__ import annotations

import logging
import math
import tempfile

import attrs
import trio

from gateway.config import Config, parse_config
from gateway.core.reading import Value
from gateway.hub import Hub, OverflowPolicy

log = logging.getLogger("gateway.demo")

DEMO_CONFIG = """
[gateway]
name = "demo"
shutdown_timeout = "5s"
status_interval = "5s"

[[buses]]
name = "line-1"
kind = "sim"

[[buses.devices]]
name = "boiler"
interval = "1s"
points = [
  { name = "temperature", signal = "sine", unit = "degC", low = 60, high = 80, period = "30s" },
  { name = "pressure", signal = "random-walk", unit = "bar", low = 1.0, high = 3.0, step = 0.05 },
  { name = "setpoint", signal = "setpoint", unit = "degC", low = 60, high = 90 },
]

[[buses.devices]]
name = "conveyor"
interval = "500ms"
points = [
  { name = "running", signal = "step", low = 0, high = 1, period = "20s" },
  { name = "parts", signal = "counter", unit = "pcs", step = 1 },
]

# The energy meter of gateway.simulator; demo_config() sets the port it listens on.
[[buses]]
name = "plc"
kind = "modbus-tcp"
host = "127.0.0.1"
port = 502

[[buses.devices]]
name = "meter"
unit_id = 1
interval = "1s"
max_gap = 2
points = [
  { name = "voltage", table = "input", address = 0, type = "float32", unit = "V" },
  { name = "current", table = "input", address = 2, type = "float32", unit = "A" },
  { name = "power", table = "input", address = 4, type = "float32", unit = "W" },
  { name = "frequency", table = "input", address = 6, type = "uint16", scale = 0.01, unit = "Hz", deadband = 0.02, heartbeat = "10s" },
  { name = "energy", table = "input", address = 8, type = "uint32", order = "CDAB", scale = 0.01, unit = "kWh" },
  { name = "power_limit", table = "holding", address = 0, type = "uint16", scale = 0.1, unit = "kW", writable = true, min = 0, max = 6 },
  { name = "relay_closed", table = "holding", address = 1, type = "bool", bit = 0 },
  { name = "over_limit", table = "holding", address = 1, type = "bool", bit = 1 },
  { name = "relay", table = "coil", address = 0, type = "bool", writable = true },
]
"""  # noqa: E501 (an inline TOML table cannot be split over lines)
PLC_BUS = "plc"
PLC_SECTION = "# The energy meter of gateway.simulator"


def demo_config(state_dir: str, *, plc_port: int | None = None) -> Config:
    """The demo config with its state in ``state_dir``; the ``plc`` bus polls the simulated
    meter on ``127.0.0.1:plc_port``, and is left out without a port."""
    text = DEMO_CONFIG
    if plc_port is None:
        text = text[: text.index(PLC_SECTION)]
    else:
        text = text.replace("port = 502", f"port = {plc_port}")
    config = parse_config(text, "demo config")
    return attrs.evolve(config, gateway=attrs.evolve(config.gateway, state_dir=state_dir))


def show(value: Value) -> str:
    """A value for the console. A float32 register holds about 7 significant digits, so
    230.1 arrives as 230.10000610351562: show what the device meant."""
    if isinstance(value, float) and math.isfinite(value):
        return str(float(f"{value:.7g}"))
    return str(value)


async def console(hub: Hub, *, task_status: trio.TaskStatus[None]) -> None:
    """Log the latest value of every point every few seconds."""
    latest: dict[str, str] = {}
    with hub.subscribe("demo-console", ["#"], policy=OverflowPolicy.DROP_OLDEST) as sub:
        task_status.started()
        deadline = trio.current_time() + 3
        while True:
            with trio.move_on_at(deadline):
                async for delivery in sub:
                    for r in delivery.readings:
                        unit = f" {r.unit}" if r.unit else ""
                        latest[r.topic] = f"{show(r.value)}{unit}" if r.good else f"BAD({r.reason})"
            deadline += 3
            if latest:
                log.info("latest: %s", ", ".join(f"{t}={v}" for t, v in sorted(latest.items())))


def state_tempdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="edge-gateway-demo-")
