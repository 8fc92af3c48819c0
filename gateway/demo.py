"""``edge-gateway demo``: the real daemon on an embedded config with simulated sensors.

Two buses: ``line-1`` (the sim driver) and ``plc``, the Modbus TCP driver polling the energy
meter of ``gateway.simulator`` (pymodbus's server, started by ``edge-gateway demo`` on a free
port of 127.0.0.1). State goes to a temporary directory; a console component logs the latest
values every few seconds so a person can see data flowing. The device plane serves wss on
127.0.0.1 (port 8443, or a free one when that is taken) with a self-signed certificate kept in
``certificate_dir()``, so that ``edge-gateway tail`` shows the readings. Later components
(outbox, CPI stand-in, status page) add themselves here.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import tempfile
from pathlib import Path

import attrs
import trio

from gateway.api import hash_password
from gateway.app import Extra
from gateway.config import Config, parse_config
from gateway.core.reading import Value
from gateway.cpistandin import CpiStandIn, ReceivedBatch, serve_standin
from gateway.deviceauth import generate_token, hash_token
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


DEVICE_PLANE = """
[device_plane]
listen = "127.0.0.1"
port = {port}
tls_cert_file = '{cert}'
tls_key_file = '{key}'

# A device or HMI of the demo: any topic, and readings of its own points.
[[device_plane.clients]]
id = "demo-device"
token_sha256 = "{token_sha256}"
subscribe = ["#"]
publish = ["+"]
"""
CPI = """
# gateway.cpistandin on this machine, standing in for the iFlow's HTTPS endpoint.
[cpi]
url = "https://127.0.0.1:{port}/http/edge/readings"
auth = "basic"
client_id = "{client_id}"
client_secret_file = '{secret_file}'
ca_file = '{cert}'
csrf = true
"""
API = """
# The HTTPS API: the status page, /readyz, /metrics and the command API.
[api]
listen = "127.0.0.1"
port = {port}
tls_cert_file = '{cert}'
tls_key_file = '{key}'

[[api.users]]
name = "{user}"
password_scrypt = "{password_scrypt}"
role = "operator"
"""
CPI_CLIENT_ID = "sb-edge-gateway-demo"
STANDIN_HISTORY = 1000
"""Batches and requests the demo's CPI stand-in remembers (for its dedupe by message id)."""
WSS_PORT = 8443
API_PORT = 9443
API_USER = "demo"


@attrs.frozen
class DemoPlane:
    """What the demo's device plane needs: where, with which certificate, and the token of
    its one client (made at each start; the demo prints it)."""

    port: int
    cert: Path
    key: Path
    token: str


@attrs.frozen
class DemoApi:
    """The demo's API: its port, certificate and the password of user ``demo`` (made at
    each start; the demo prints it), with its scrypt hash (made once: it takes a moment)."""

    port: int
    cert: Path
    key: Path
    password: str
    password_scrypt: str


@attrs.frozen
class DemoCpi:
    """The CPI stand-in the demo forwards to: its port and Basic credentials."""

    port: int
    secret_file: Path
    cert: Path


def demo_config(
    state_dir: str,
    *,
    plc_port: int | None = None,
    plane: DemoPlane | None = None,
    cpi: DemoCpi | None = None,
    api: DemoApi | None = None,
) -> Config:
    """The demo config with its state in ``state_dir``; the ``plc`` bus polls the simulated
    meter on ``127.0.0.1:plc_port``, and is left out without a port; the device plane is
    there with ``plane``, forwarding to the CPI stand-in with ``cpi``, the API with ``api``."""
    text = DEMO_CONFIG
    if plc_port is None:
        text = text[: text.index(PLC_SECTION)]
    else:
        text = text.replace("port = 502", f"port = {plc_port}")
    if plane is not None:
        text += DEVICE_PLANE.format(
            port=plane.port,
            cert=plane.cert,
            key=plane.key,
            token_sha256=hash_token(plane.token),
        )
    if cpi is not None:
        text += CPI.format(
            port=cpi.port, client_id=CPI_CLIENT_ID, secret_file=cpi.secret_file, cert=cpi.cert
        )
    if api is not None:
        text += API.format(
            port=api.port,
            cert=api.cert,
            key=api.key,
            user=API_USER,
            password_scrypt=api.password_scrypt,
        )
    config = parse_config(text, "demo config")
    return attrs.evolve(config, gateway=attrs.evolve(config.gateway, state_dir=state_dir))


def certificate_dir() -> Path:
    """Where the demo keeps its self-signed certificate, across runs (so that trusting it
    once lasts): ``$XDG_DATA_HOME/edge-gateway`` or ``~/.local/share/edge-gateway``."""
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "edge-gateway"


def free_port(preferred: int = 0) -> int:
    """``preferred`` when nothing listens there, else a free port (the demo must start)."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            # As the servers bind: a port with connections of an earlier run in TIME_WAIT
            # is free for them, so it is for the demo.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            bound: int = probe.getsockname()[1]
            return bound
    raise OSError("no free TCP port on 127.0.0.1")


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


def wss_port() -> int:
    return free_port(WSS_PORT)


def demo_api(cert: Path, key: Path, avoid: int) -> DemoApi:
    """The API on 127.0.0.1:9443 (or a free port other than ``avoid``, the wss port)."""
    port = free_port(API_PORT)
    while port == avoid:
        port = free_port()
    password = generate_token()
    return DemoApi(port, cert, key, password, hash_password(password))


def cpi_standin(cpi: DemoCpi, key: Path) -> Extra:
    """The CPI stand-in as a demo task: serves HTTPS on ``cpi.port`` with the demo's
    certificate, checks Basic credentials and CSRF as CPI does, and logs each batch. It keeps
    no bodies and only the last ``STANDIN_HISTORY`` batches: the demo may run for days."""

    def logged(batch: ReceivedBatch) -> None:
        span = f"seq {batch.seqs[0]}..{batch.seqs[-1]}" if batch.seqs else "no seq"
        log.info(
            "CPI stand-in received batch %s: %d readings (%s), %d bytes",
            batch.message_id,
            len(batch.seqs),
            span,
            len(batch.body),
        )

    app = CpiStandIn(
        auth="basic",
        client_id=CPI_CLIENT_ID,
        client_secret=cpi.secret_file.read_text().strip(),
        csrf=True,
        keep_bodies=False,
        history=STANDIN_HISTORY,
        on_batch=logged,
    )

    async def run(hub: Hub, *, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    serve_standin, app, cert_file=cpi.cert, key_file=key, port=cpi.port
                )
            )
            task_status.started()

    return run


def state_tempdir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="edge-gateway-demo-")
