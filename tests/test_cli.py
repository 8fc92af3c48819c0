"""The real ``edge-gateway`` command in a subprocess, talking sd_notify to a real socket.

Covers ``check-config``, exit status 78 for a broken config, and ``run`` under a stand-in for
systemd: READY/STATUS/WATCHDOG/STOPPING/RELOADING, SIGTERM, SIGHUP with a good and a broken
config, and a failing bus being restarted while the others keep publishing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from drivers.registry import KINDS
from tests.conftest import gateway_command, gateway_env

if TYPE_CHECKING:
    from conftest import Daemon, NotifySocket

RunGateway = Callable[..., subprocess.CompletedProcess[str]]

EX_CONFIG = 78

# A device without points publishes nothing, so every reading counted in STATUS comes from
# line-1. The bus fails 100ms after each start.
FLAKY_BUS = """\
[[buses]]
name = "flaky"
kind = "sim"
fail_after = "100ms"

[[buses.devices]]
name = "nothing"
points = []
"""

EXTRA_BUS = """\
[[buses]]
name = "line-2"
kind = "sim"

[[buses.devices]]
name = "press"
interval = "100ms"
points = [{ name = "force", signal = "random-walk", unit = "kN" }]
"""

# Four mistakes at different depths (a typo'd key, a bad duration, a bad choice inside a list,
# an unknown bus kind): all must be reported at once, each with its path.
BROKEN_CONFIG = """\
[gateway]
nmae = "typo"
status_interval = "5 parsecs"

[[buses]]
name = "line-1"
kind = "sim"

[[buses.devices]]
name = "boiler"
points = [{ name = "temperature", signal = "sinus" }]

[[buses]]
name = "rs485-1"
kind = "modbsu"
"""


def broken_config_errors(path: Path) -> list[str]:
    return [
        f"{path}: gateway.nmae: unknown key (did you mean 'name'?)",
        f"{path}: gateway.status_interval: '5 parsecs' is not a duration",
        f"{path}: buses[0].devices[0].points[0].signal: 'sinus' is not one of sine,",
        f"{path}: buses[1].kind: 'modbsu' is not one of {', '.join(KINDS)}",
    ]


STATUS_RATE = re.compile(r"STATUS=(\d+) bus(?:es)? up, (\d+) down, (\d+) readings/s")


def fields(message: str) -> dict[str, str]:
    """The ``KEY=value`` lines of an sd_notify message."""
    return dict(line.split("=", 1) for line in message.split("\n"))


def is_status_update(message: str) -> bool:
    """A periodic STATUS= message (not the one that comes with READY=1)."""
    return STATUS_RATE.fullmatch(message) is not None


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# ---- check-config ---------------------------------------------------------------------------


def test_check_config_good_prints_summary(
    gateway_config: Callable[..., Path], run_gateway: RunGateway
) -> None:
    path = gateway_config(EXTRA_BUS)
    result = run_gateway("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: OK"
    assert "  bus line-1 (sim, simulated): 1 device, 2 points" in lines
    assert "  bus line-2 (sim, simulated): 1 device, 1 point" in lines
    assert any(line.startswith("  gateway test: state in ") for line in lines)


def test_check_config_reports_every_problem_with_its_path(
    tmp_path: Path, run_gateway: RunGateway
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(BROKEN_CONFIG, encoding="utf-8")
    result = run_gateway("check-config", "--config", str(path))
    assert result.returncode == EX_CONFIG
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    for expected in broken_config_errors(path):
        assert any(line.startswith(expected) for line in lines), (expected, lines)
    assert lines[-1] == "4 problem(s); nothing was started"


def test_check_config_missing_file(tmp_path: Path, run_gateway: RunGateway) -> None:
    path = tmp_path / "absent.toml"
    result = run_gateway("check-config", "--config", str(path))
    assert result.returncode == EX_CONFIG
    assert f"{path}: file not found" in result.stderr


def test_run_with_broken_config_exits_78_without_ready(
    tmp_path: Path, notify_listener: NotifySocket, run_gateway: RunGateway
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(BROKEN_CONFIG, encoding="utf-8")
    result = run_gateway("run", "--config", str(path), NOTIFY_SOCKET=notify_listener.address)
    assert result.returncode == EX_CONFIG
    lines = result.stderr.splitlines()
    for expected in broken_config_errors(path):
        assert any(expected in line and " ERROR " in line for line in lines), (expected, lines)
    assert "config invalid: not starting (exit 78)" in lines[-1]
    assert notify_listener.drain() == []


def test_run_with_unusable_state_dir_exits_78(
    tmp_path: Path, gateway_config: Callable[..., Path], run_gateway: RunGateway
) -> None:
    path = gateway_config()
    (tmp_path / "state").write_text("a file where the state directory should be")
    result = run_gateway("run", "--config", str(path))
    assert result.returncode == EX_CONFIG
    assert f"gateway.state_dir: {str(tmp_path / 'state')!r} is not a writable directory" in (
        result.stderr
    )


# ---- run: readiness, status, watchdog -------------------------------------------------------


def test_ready_is_sent_once_every_bus_has_started(
    gateway_config: Callable[..., Path], daemon: Callable[..., Daemon]
) -> None:
    d = daemon(gateway_config(EXTRA_BUS))
    ready = d.wait_for_notify(lambda m: "READY" in m)
    # Without a watchdog nothing is sent before READY=1, and READY=1 carries the status.
    assert d.notify is not None
    assert d.notify.messages[0] == ready
    assert fields(ready) == {"READY": "1", "STATUS": "2 buses up, 0 down"}
    d.wait_for_log("gateway ready: 2 buses up, 0 down name=test")


def test_status_updates_every_status_interval(
    gateway_config: Callable[..., Path], daemon: Callable[..., Daemon]
) -> None:
    d = daemon(gateway_config())
    d.wait_ready()
    for _ in range(3):
        status = d.wait_for_notify(is_status_update)
        m = STATUS_RATE.fullmatch(status)
        assert m is not None
        up, down, rate = (int(g) for g in m.groups())
        assert (up, down) == (1, 0)
        assert rate > 0  # line-1 publishes 2 readings every 50ms


def test_watchdog_pings_keep_coming_under_systemd(
    gateway_config: Callable[..., Path], daemon: Callable[..., Daemon]
) -> None:
    # The interval itself (half of WATCHDOG_USEC) is checked under the mock clock in
    # test_sdnotify.py; here: the real process keeps pinging, counted by events, not time.
    d = daemon(gateway_config(), WATCHDOG_USEC="200000")
    d.wait_ready()
    for _ in range(5):
        d.wait_for_notify(lambda m: m == "WATCHDOG=1")
    assert d.running


def test_no_watchdog_pings_when_watchdog_pid_is_another_process(
    gateway_config: Callable[..., Path], daemon: Callable[..., Daemon]
) -> None:
    d = daemon(gateway_config(), WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid()))
    d.wait_ready()
    for _ in range(3):  # 3 status updates: at least 400ms, time for several pings
        d.wait_for_notify(is_status_update)
    assert d.notify is not None
    assert "WATCHDOG=1" not in d.notify.messages


def test_abstract_namespace_notify_listener(
    gateway_config: Callable[..., Path],
    daemon: Callable[..., Daemon],
    abstract_notify_listener: NotifySocket,
) -> None:
    assert abstract_notify_listener.address.startswith("@")
    d = daemon(gateway_config(), notify=abstract_notify_listener)
    assert fields(d.wait_ready())["READY"] == "1"
    d.send_signal(signal.SIGTERM)
    d.wait_for_notify(lambda m: m == "STOPPING=1")
    assert d.wait_exit() == 0


def test_full_notify_queue_does_not_block_the_gateway(
    gateway_config: Callable[..., Path], daemon: Callable[..., Daemon]
) -> None:
    # Nobody reads the socket, and pings every 10ms fill its queue at once. Sends then fail
    # (logged); blocking instead would freeze every task, signal handling included.
    d = daemon(gateway_config(), WATCHDOG_USEC="20000")
    d.wait_for_log("gateway ready")
    d.wait_for_log("sd_notify failed")
    d.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert d.lines[-1].endswith("gateway: stopped")


# ---- run: signals ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_stop_signal_sends_stopping_and_exits_0(
    gateway_config: Callable[..., Path], daemon: Callable[..., Daemon], signum: signal.Signals
) -> None:
    d = daemon(gateway_config(FLAKY_BUS))
    d.wait_ready()
    d.send_signal(signum)
    d.wait_for_notify(lambda m: m == "STOPPING=1")
    # The shutdown timeout is 3s; a little on top for the interpreter to exit.
    assert d.wait_exit(timeout=3 + 2) == 0
    d.wait_for_log(f"stopping ({signum.name}), up to 3s")
    assert d.lines[-1].endswith("gateway: stopped")


def test_sighup_with_broken_config_keeps_running(
    gateway_config: Callable[..., Path], daemon: Callable[..., Daemon]
) -> None:
    path = gateway_config()
    d = daemon(path)
    d.wait_ready()
    path.write_text(BROKEN_CONFIG, encoding="utf-8")
    d.send_signal(signal.SIGHUP)
    d.wait_for_log("reloading configuration")
    d.wait_for_log("reload rejected: keeping the running configuration")
    for expected in broken_config_errors(path):
        assert any(
            " ERROR " in line and f"reload rejected: {expected}" in line for line in d.lines
        ), (expected, d.lines)
    # Still serving: a status update after the rejection, still with its bus and readings.
    status = d.wait_for_notify(is_status_update)
    assert status.startswith("STATUS=1 bus up, 0 down, ")
    assert not status.endswith(" 0 readings/s")
    assert d.running
    assert d.notify is not None
    assert not any("RELOADING=1" in m for m in d.notify.messages)
    assert [m for m in d.notify.messages if "READY=1" in m] == [d.notify.messages[0]]
    d.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_sighup_with_changed_config_reloads(
    gateway_config: Callable[..., Path], daemon: Callable[..., Daemon]
) -> None:
    path = gateway_config()
    d = daemon(path)
    d.wait_ready()
    gateway_config(EXTRA_BUS)  # the same file, one bus more
    before = monotonic_usec()
    d.send_signal(signal.SIGHUP)
    reloading = fields(d.wait_for_notify(lambda m: "RELOADING=1" in m))
    after = monotonic_usec()
    assert reloading.keys() == {"RELOADING", "MONOTONIC_USEC"}
    # systemd compares it with CLOCK_MONOTONIC: it must be that clock, in microseconds.
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    ready = fields(d.wait_for_notify(lambda m: "READY=1" in m))
    assert ready == {"READY": "1", "STATUS": "2 buses up, 0 down"}
    d.wait_for_log("reloaded restarted=0 removed=0 added=1")
    status = d.wait_for_notify(is_status_update)
    assert status.startswith("STATUS=2 buses up, 0 down, ")
    assert d.running


# ---- run: supervision -----------------------------------------------------------------------


def test_failing_bus_is_restarted_while_others_keep_publishing(
    gateway_config: Callable[..., Path], daemon: Callable[..., Daemon]
) -> None:
    d = daemon(gateway_config(FLAKY_BUS), WATCHDOG_USEC="200000")
    assert fields(d.wait_ready())["STATUS"] == "2 buses up, 0 down"
    first = d.wait_for_log("bus flaky failed: RuntimeError: simulated failure")
    assert "bus=flaky failures=1 " in first
    for n in (2, 3):
        d.wait_for_log("bus flaky is up again bus=flaky")
        again = d.wait_for_log("bus flaky failed again: RuntimeError")
        assert f"bus=flaky failures={n} " in again
    # Readings kept coming after the third failure; the flaky bus publishes none itself.
    assert d.notify is not None
    d.notify.drain()
    status = d.wait_for_notify(is_status_update)
    m = STATUS_RATE.fullmatch(status)
    assert m is not None
    assert int(m.group(3)) > 0, status
    # A failing bus is not a stuck one: the watchdog keeps being fed.
    d.wait_for_notify(lambda m: m == "WATCHDOG=1")
    assert d.running
    assert not any("line-1" in line and "failed" in line for line in d.lines)
    d.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_check_config_into_a_closed_pipe_exits_quietly(
    gateway_config: Callable[..., Path],
) -> None:
    """``check-config | head -1``: the reader goes away; no crash report, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write fails with EPIPE
    try:
        result = subprocess.run(
            gateway_command("check-config", "--plan", "--config", str(gateway_config())),
            env=gateway_env(),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 128 + signal.SIGPIPE
    assert result.stderr == ""
