"""``edge-gateway send-command``'s own checks, as a real subprocess: bad arguments exit 2 with
what to write instead, before anything is sent (the API calls are in test_commands_e2e.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest

RunGateway = Callable[..., CompletedProcess[str]]
BASE = ("send-command", "--url", "https://127.0.0.1:1", "--user", "cpi")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("bogus:x", "1"), "starts with neither modbus: nor device:"),
        (("modbus:plc/meter/limit",), "needs a VALUE"),
        (("modbus:plc/meter/limit", "NaN"), "'NaN' is not a finite number"),
        (("modbus:plc/meter/limit", "1e999"), "is not a finite number"),
        (("device:hmi-1", "5"), "not a VALUE"),
        (("device:hmi-1",), "needs --name"),
        (("device:hmi-1", "--name", "x", "--arg", "novalue"), "write KEY=VALUE"),
        (("modbus:plc/meter/limit", "1", "--id", " "), "--id is empty"),
        (("--status", "c-1", "modbus:plc/meter/limit", "1"), "either --status ID or a TARGET"),
    ],
)
def test_bad_arguments_exit_2_and_say_what_to_write(
    run_gateway: RunGateway, args: tuple[str, ...], words: str
) -> None:
    result = run_gateway(*BASE, *args, EDGE_GATEWAY_PASSWORD="pw")
    assert result.returncode == 2, result.stderr
    assert words in result.stderr
    assert "crashed" not in result.stderr


def test_a_bad_url_or_ca_file_is_a_bad_argument(run_gateway: RunGateway, tmp_path: Path) -> None:
    ftp = run_gateway(
        "send-command", "--url", "ftp://x", "--user", "cpi", "device:a", "--name", "n",
        EDGE_GATEWAY_PASSWORD="pw",
    )  # fmt: skip
    assert ftp.returncode == 2
    assert "give https://" in ftp.stderr
    missing = run_gateway(
        *BASE, "--ca", str(tmp_path / "nope.pem"), "device:a", "--name", "n",
        EDGE_GATEWAY_PASSWORD="pw",
    )  # fmt: skip
    assert missing.returncode == 2
    assert "no such file" in missing.stderr


def test_nothing_listening_is_69_with_the_address(run_gateway: RunGateway) -> None:
    result = run_gateway(*BASE, "device:a", "--name", "n", EDGE_GATEWAY_PASSWORD="pw")
    assert result.returncode == 69
    assert "cannot reach the API at https://127.0.0.1:1" in result.stderr
