"""``edge-gateway check-config --plan`` as a real subprocess, and every shipped example config
passing ``check-config``.

check-config opens no port and no connection, so the Modbus buses here point at addresses
where nothing listens.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

RunGateway = Callable[..., subprocess.CompletedProcess[str]]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Points chosen so that every planner rule shows: a bit sharing register 0 with a value,
# max_gap = 2 bridging one unused register (1) but not three (4..6), max_registers_per_read = 10
# splitting 7..17, coils and discrete inputs read with their own function codes.
MODBUS_BUSES = """\
[[buses]]
name = "plc"
kind = "modbus-tcp"
host = "127.0.0.1"
port = 1502

[[buses.devices]]
name = "press"
unit_id = 3
interval = "250ms"
max_gap = 2
max_registers_per_read = 10
points = [
  { name = "speed", table = "holding", address = 0, type = "int16" },
  { name = "pressure", table = "holding", address = 2, type = "float32" },
  { name = "temp", table = "holding", address = 7 },
  { name = "count", table = "holding", address = 8, type = "uint32" },
  { name = "text", table = "holding", address = 10, type = "string", length = 4 },
  { name = "big", table = "holding", address = 14, type = "uint64" },
  { name = "running", table = "holding", address = 0, type = "bool", bit = 3 },
  { name = "motor", table = "coil", address = 5, type = "bool", writable = true },
  { name = "lamp", table = "coil", address = 6, type = "bool" },
  { name = "estop", table = "discrete", address = 100, type = "bool" },
  { name = "raw", table = "input", address = 0 },
]

[[buses.devices]]
name = "meter"
unit_id = 4
points = [{ name = "power", table = "input", address = 10, type = "float32", unit = "kW" }]

[[buses]]
name = "rs485"
kind = "modbus-rtu"
port = "/dev/does-not-exist"

[[buses.devices]]
name = "meter"
interval = "2s"
points = [
  { name = "voltage", table = "input", address = 0, type = "float32" },
  { name = "current", table = "input", address = 6, type = "float32" },
]
"""

PLAN = [
    "request plan of bus plc (modbus-tcp), addresses 0-based:",
    "  plc/press (unit 3, every 250ms): FC1 coil 5..6 (2 bits): motor@5, lamp@6",
    "  plc/press (unit 3, every 250ms): FC2 discrete 100..100 (1 bit): estop@100",
    "  plc/press (unit 3, every 250ms): FC3 holding 0..3 (4 registers): speed@0, running@0.3, pressure@2",
    "  plc/press (unit 3, every 250ms): FC3 holding 7..13 (7 registers): temp@7, count@8, text@10",
    "  plc/press (unit 3, every 250ms): FC3 holding 14..17 (4 registers): big@14",
    "  plc/press (unit 3, every 250ms): FC4 input 0..0 (1 register): raw@0",
    "  plc/meter (unit 4, every 1s): FC4 input 10..11 (2 registers): power@10",
    "  plc: 7 requests per poll cycle",
    "request plan of bus rs485 (modbus-rtu), addresses 0-based:",
    "  rs485/meter (unit 1, every 2s): FC4 input 0..1 (2 registers): voltage@0",
    "  rs485/meter (unit 1, every 2s): FC4 input 6..7 (2 registers): current@6",
    "  rs485: 2 requests per poll cycle",
]


def test_plan_follows_the_summary(
    gateway_config: Callable[..., Path], run_gateway: RunGateway
) -> None:
    path = gateway_config(MODBUS_BUSES)
    result = run_gateway("check-config", "--plan", "--config", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: OK"
    # The summary (the sim bus line-1 comes first in the base config), then the plan.
    summary_end = (
        lines.index("  bus rs485 (modbus-rtu, /dev/does-not-exist 9600 8N1): 1 device, 2 points")
        + 1
    )
    assert "  bus plc (modbus-tcp, 127.0.0.1:1502): 2 devices, 12 points" in lines[:summary_end]
    assert lines[summary_end:] == PLAN
    assert result.stderr == ""


def test_no_plan_without_the_flag(
    gateway_config: Callable[..., Path], run_gateway: RunGateway
) -> None:
    path = gateway_config(MODBUS_BUSES)
    result = run_gateway("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "request plan" not in result.stdout
    assert (
        result.stdout.splitlines()[-1]
        == "  bus rs485 (modbus-rtu, /dev/does-not-exist 9600 8N1): 1 device, 2 points"
    )


def test_plan_without_modbus_buses_says_so(
    gateway_config: Callable[..., Path], run_gateway: RunGateway
) -> None:
    result = run_gateway("check-config", "--plan", "--config", str(gateway_config()))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "request plan: no Modbus buses"


def test_plan_of_an_invalid_config_is_not_printed(
    gateway_config: Callable[..., Path], run_gateway: RunGateway
) -> None:
    path = gateway_config(MODBUS_BUSES.replace("max_gap = 2", "max_gap = -1"))
    result = run_gateway("check-config", "--plan", "--config", str(path))
    assert result.returncode == 78
    assert result.stdout == ""
    assert f"{path}: buses[1].devices[0].max_gap: must be 0 or more" in result.stderr


def test_the_examples_are_all_there() -> None:
    # So that the parametrised test below cannot pass by finding no files.
    names = {p.name for p in EXAMPLES.glob("*.toml")}
    assert {
        "sim.toml",
        "energy-meter-rtu.toml",
        "plc-modbus-tcp.toml",
        "hmi-device-plane.toml",
        "cpi-commands.toml",
    } <= names


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_example_passes_check_config(
    example: Path, tmp_path: Path, run_gateway: RunGateway
) -> None:
    # check-config checks the state directory too: point it where this user may write, so
    # the test does not depend on running as root.
    text = example.read_text(encoding="utf-8")
    assert 'state_dir = "/var/lib/edge-gateway"' in text
    copy = tmp_path / example.name
    copy.write_text(text.replace("/var/lib/edge-gateway", str(tmp_path / "state")))
    if "tls_cert_file" in text:  # the files it names, as the PKI would issue them
        cert = trustme.CA().issue_cert("gateway.plant.local")
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "gateway.crt"))
        cert.private_key_pem.write_to_path(str(tmp_path / "gateway.key"))
    if "cpi-client-secret" in text:  # the service key's secret, as its *_file names it
        (tmp_path / "cpi-client-secret").write_text("secret-of-the-service-key\n")
    result = run_gateway("check-config", "--plan", "--config", str(copy))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{copy}: OK"
