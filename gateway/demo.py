"""``edge-gateway demo``: the real daemon on an embedded config with simulated sensors.

State goes to a temporary directory; a console component logs the latest values every few
seconds so a person can see data flowing. Later components (wss, outbox, CPI stand-in, status
page) add themselves here.
"""

from __future__ import annotations

import logging
import tempfile

import attrs
import trio

from gateway.app import Gateway
from gateway.config import Config, parse_config
from gateway.hub import OverflowPolicy

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
"""


def demo_config(state_dir: str) -> Config:
    config = parse_config(DEMO_CONFIG, "demo config")
    return attrs.evolve(config, gateway=attrs.evolve(config.gateway, state_dir=state_dir))


async def console(gateway: Gateway, *, task_status: trio.TaskStatus[None]) -> None:
    """Log the latest value of every point every few seconds."""
    latest: dict[str, str] = {}
    with gateway.hub.subscribe("demo-console", ["#"], policy=OverflowPolicy.DROP_OLDEST) as sub:
        task_status.started()
        deadline = trio.current_time() + 3
        while True:
            with trio.move_on_at(deadline):
                async for delivery in sub:
                    for r in delivery.readings:
                        unit = f" {r.unit}" if r.unit else ""
                        latest[r.topic] = f"{r.value}{unit}" if r.good else f"BAD({r.reason})"
            deadline += 3
            if latest:
                log.info("latest: %s", ", ".join(f"{t}={v}" for t, v in sorted(latest.items())))


def state_tempdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="edge-gateway-demo-")
