"""The systemd unit: ``systemd-analyze verify`` is clean, the hardening score stays at or below
2.0, and the settings the gateway relies on are present.

Runs the real ``systemd-analyze`` (no systemd as PID 1 needed); skipped where it is missing.
``verify`` checks that ``ExecStart=``'s binary exists, and ``/opt/edge-gateway/venv`` exists
only on an installed gateway, so the verify test checks a copy of the unit whose ExecStart
points at this checkout's own ``edge-gateway`` script (same arguments, nothing else changed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import DEFAULT_PATH, EX_CONFIG, GatewaySection
from gateway.core.configtypes import parse_duration

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edge-gateway.service"
INSTALLED_BINARY = "/opt/edge-gateway/venv/bin/edge-gateway"
MAX_EXPOSURE = 2.0


@pytest.fixture
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not on PATH (install systemd to run these checks)")
    return path


def analyze(systemd_analyze: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values in order]}}``; keys like DeviceAllow= may repeat."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        assert "=" in line, f"not a key=value line: {line!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))["Service"]


@pytest.fixture
def unit_for_verify(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart runs this checkout's ``edge-gateway``."""
    binary = Path(sys.executable).parent / "edge-gateway"
    assert binary.exists(), f"{binary} missing: install the project (make venv)"
    text = UNIT.read_text(encoding="utf-8")
    old = f"ExecStart={INSTALLED_BINARY} "
    assert text.count(old) == 1, f"expected exactly one line starting with {old!r}"
    copy = tmp_path / UNIT.name  # same file name: verify derives the unit name from it
    copy.write_text(text.replace(old, f"ExecStart={binary} "), encoding="utf-8")
    return copy


def test_verify_is_clean(systemd_analyze: str, unit_for_verify: Path) -> None:
    result = analyze(systemd_analyze, "verify", str(unit_for_verify))
    # verify exits 0 even for unknown keys or bad values, which it reports as warnings
    # naming the file or the unit; warnings about unrelated units on this host are ignored.
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if UNIT.name in line or UNIT.stem in line
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours == []


def test_verify_catches_a_mistake(systemd_analyze: str, unit_for_verify: Path) -> None:
    """The clean-verify test can fail: a misspelled key shows up as a warning about our unit."""
    text = unit_for_verify.read_text(encoding="utf-8")
    unit_for_verify.write_text(
        text.replace("NotifyAccess=main", "NotifyAcess=main"), encoding="utf-8"
    )
    result = analyze(systemd_analyze, "verify", str(unit_for_verify))
    assert "NotifyAcess" in result.stdout + result.stderr


def exposure(systemd_analyze: str, unit: Path) -> float:
    """The overall exposure score (0 = locked down, 10 = exposed) of ``unit``."""
    result = analyze(systemd_analyze, "security", "--offline=yes", str(unit))
    output = result.stdout + result.stderr
    if result.returncode != 0 and "offline" in output and "unrecognized" in output:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    assert result.returncode == 0, output
    pattern = rf"Overall exposure level for {re.escape(unit.name)}: (\d+(?:\.\d+)?)"
    match = re.search(pattern, output)
    assert match, f"no overall exposure score in:\n{output}"
    return float(match.group(1))


def test_security_exposure_is_low(systemd_analyze: str) -> None:
    assert exposure(systemd_analyze, UNIT) <= MAX_EXPOSURE


def test_security_score_is_read_correctly(systemd_analyze: str, tmp_path: Path) -> None:
    """The score check can fail: the same unit without its sandbox settings scores high."""
    text = UNIT.read_text(encoding="utf-8")
    assert "# ---- sandbox" in text
    bare = tmp_path / UNIT.name
    bare.write_text(text.split("# ---- sandbox")[0] + "\n[Install]\nWantedBy=multi-user.target\n")
    assert exposure(systemd_analyze, bare) > MAX_EXPOSURE


def test_lifecycle_settings(service: dict[str, list[str]]) -> None:
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["WatchdogSec"] == ["30s"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == [str(EX_CONFIG)]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["ExecStart"] == [f"{INSTALLED_BINARY} run --config {DEFAULT_PATH}"]


def test_stop_timeout_leaves_room_for_graceful_shutdown(service: dict[str, list[str]]) -> None:
    (value,) = service["TimeoutStopSec"]
    assert parse_duration(value) > GatewaySection().shutdown_timeout


def test_identity_and_directories(service: dict[str, list[str]]) -> None:
    assert service["User"] == ["edge-gateway"]
    assert service["Group"] == ["edge-gateway"]
    assert "DynamicUser" not in service  # serial ports need the static user's dialout group
    assert service["SupplementaryGroups"] == ["dialout"]
    assert service["StateDirectory"] == ["edge-gateway"]
    assert service["ConfigurationDirectory"] == ["edge-gateway"]
    assert service["StandardError"] == ["journal"]
    assert service["SyslogIdentifier"] == ["edge-gateway"]


def test_serial_ports_and_network_stay_reachable(service: dict[str, list[str]]) -> None:
    assert service["DevicePolicy"] == ["closed"]
    assert "PrivateDevices" not in service or service["PrivateDevices"] == ["no"]
    allowed = set(service["DeviceAllow"])
    assert {"char-ttyUSB rw", "char-ttyACM rw", "char-ttyAMA rw"} <= allowed
    families = " ".join(service["RestrictAddressFamilies"]).split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)  # AF_UNIX: sd_notify
    assert "PrivateNetwork" not in service or service["PrivateNetwork"] == ["no"]
    assert service["MemoryDenyWriteExecute"] == ["yes"]
