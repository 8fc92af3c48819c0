"""The outbox and the CPI forwarder in the real ``edge-gateway run`` (subprocesses): every
reading reaches the CPI stand-in exactly once and in order, also across a ``kill -9`` of the
daemon; ``edge-gateway outbox`` looks into the database while it runs."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from gateway.core.reading import Reading
from gateway.outbox import Outbox
from tests.conftest import ROOT, TIMEOUT, Daemon, gateway_command, gateway_env

STANDIN = """
import functools, sys, trio
from pathlib import Path
from typing import Any
from gateway.cpistandin import CpiStandIn, serve_standin

async def main():
    app = CpiStandIn(auth="basic", client_id="sb-test", client_secret="s3cret-of-the-test",
                     csrf=True, echo=True)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(
            serve_standin, app, cert_file=Path(sys.argv[1]), key_file=Path(sys.argv[2])))
        print(f"port {port}", flush=True)

trio.run(main)
"""


class StandIn:
    """The CPI stand-in in a subprocess; a thread collects the batches it prints."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", STANDIN, str(cert), str(key)],
            cwd=ROOT,
            env=gateway_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert first.startswith("port "), first
        self.port = int(first.split()[1])
        self.ranges: list[tuple[int, int]] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            match = re.search(r" seq (\d+)\.\.(\d+) ", line)
            if match:
                with self._changed:
                    self.ranges.append((int(match.group(1)), int(match.group(2))))
                    self._changed.notify_all()

    def wait_for(self, predicate: Callable[[list[tuple[int, int]]], bool]) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: predicate(self.ranges), 3 * TIMEOUT), self.ranges

    def seqs(self) -> list[int]:
        with self._changed:
            return [seq for first, last in self.ranges for seq in range(first, last + 1)]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cpi-cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "cpi-key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "cpi-ca.pem"))
    return tmp_path / "cpi-cert.pem", tmp_path / "cpi-key.pem"


@pytest.fixture
def standin(tls: tuple[Path, Path]) -> Iterator[StandIn]:
    s = StandIn(*tls)
    yield s
    s.stop()


def cpi_toml(port: int) -> str:
    return f"""
[cpi]
url = "https://127.0.0.1:{port}/http/edge/readings"
auth = "basic"
client_id = "sb-test"
client_secret_file = "cpi-secret"
ca_file = "cpi-ca.pem"
csrf = true
linger = "100ms"
batch_max_readings = 50
backoff_initial = "50ms"
max_backoff = "200ms"

[outbox]
commit_interval = "20ms"
"""


def outbox_cli(config: Path, *args: str) -> str:
    result = subprocess.run(
        gateway_command("outbox", "--config", str(config), *args),
        cwd=ROOT,
        env=gateway_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_reading_reaches_cpi_once_in_order_across_kill_9(
    daemon: Callable[..., Daemon],
    gateway_config: Callable[..., Path],
    standin: StandIn,
    tmp_path: Path,
) -> None:
    (tmp_path / "cpi-secret").write_text("s3cret-of-the-test\n")
    config = gateway_config(cpi_toml(standin.port))
    gw = daemon(config)
    assert "CPI not reached yet, backlog 0" in gw.wait_ready()
    standin.wait_for(lambda ranges: len(ranges) >= 3)
    gw.proc.kill()  # kill -9: whatever was committed must still arrive
    gw.wait_exit()
    stats = outbox_cli(config, "stats")
    assert "backlog:" in stats
    next_seq = int(re.search(r"next seq: (\d+)", stats).group(1))  # type: ignore[union-attr]
    assert next_seq > 1

    again = daemon(config)
    again.wait_ready()
    # Everything committed before the kill arrives, exactly once after dedupe, in order.
    standin.wait_for(lambda ranges: max(last for _, last in ranges) >= next_seq - 1)
    again.wait_for_notify(lambda m: "CPI ok" in m)  # the STATUS line says so
    # A reload that reopens the outbox restarts the forwarder with it: nothing fails, and
    # readings keep arriving.
    before = max(last for _, last in standin.ranges)
    config.write_text(
        config.read_text().replace('commit_interval = "20ms"', 'commit_interval = "30ms"')
    )
    again.send_signal(signal.SIGHUP)
    again.wait_for_log("reloaded")
    standin.wait_for(lambda ranges: max(last for _, last in ranges) > before + 20)
    assert not [line for line in again.lines if " failed" in line or "Traceback" in line]
    again.send_signal(signal.SIGTERM)
    assert again.wait_exit() == 0
    seqs = standin.seqs()
    first_arrivals = list(dict.fromkeys(seqs))
    # No hole, and in order: each reading first arrived after every earlier one (a batch
    # resent after the kill only repeats readings CPI's idempotent call drops).
    assert first_arrivals == list(range(1, len(first_arrivals) + 1))
    assert len(first_arrivals) >= next_seq - 1
    final = outbox_cli(config, "stats")
    assert "dead letters: 0 batches" in final
    assert "no dead letters" in outbox_cli(config, "dead-letters")
    peek = outbox_cli(config, "peek", "3")
    assert len(peek.splitlines()) <= 3


@pytest.mark.usefixtures("tls")
def test_outbox_cli_shows_replays_and_purges_dead_letters(
    gateway_config: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "cpi-secret").write_text("s3cret-of-the-test\n")
    config = gateway_config(cpi_toml(9))
    path = tmp_path / "state" / "outbox.sqlite3"
    path.parent.mkdir()

    async def make_dead_letters() -> None:
        async with await Outbox.open(path) as outbox:
            await outbox.append(
                [Reading(f"line-1/boiler/p{i}", i, timestamp=1.7e9) for i in range(5)]
            )
            batch = await outbox.next_batch(3, 1_000_000)
            assert batch is not None
            await outbox.dead_letter(batch, 404, "Not Found: no iFlow at /http/edge/readings")

    trio.run(make_dead_letters)
    letters = outbox_cli(config, "dead-letters")
    assert (
        "seq 1-3 (3 readings) status 404: 'Not Found: no iFlow at /http/edge/readings'" in letters
    )
    assert "backlog: 2 readings" in outbox_cli(config, "stats")
    assert outbox_cli(config, "replay-dead") == "3 readings put back in front of the backlog\n"
    assert "backlog: 5 readings" in outbox_cli(config, "stats")
    assert outbox_cli(config, "peek", "1").startswith("1 line-1/boiler/p0 ")
    assert outbox_cli(config, "purge-dead") == "0 dead readings deleted\n"


@pytest.mark.usefixtures("tls")
def test_outbox_cli_on_a_missing_outbox_says_so(
    gateway_config: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "cpi-secret").write_text("s3cret-of-the-test\n")
    config = gateway_config(cpi_toml(9))
    result = subprocess.run(
        gateway_command("outbox", "--config", str(config), "stats"),
        cwd=ROOT,
        env=gateway_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 69
    assert "no outbox database at" in result.stderr
    assert not (tmp_path / "state" / "outbox.sqlite3").exists()


@pytest.mark.usefixtures("tls")
def test_an_outbox_that_cannot_be_opened_ends_the_gateway_with_78(
    daemon: Callable[..., Daemon], gateway_config: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "cpi-secret").write_text("s3cret-of-the-test\n")
    missing = tmp_path / "no-such-dir" / "outbox.sqlite3"
    gw = daemon(gateway_config(cpi_toml(9) + f"file = '{missing}'\n"))
    assert gw.wait_exit() == 78  # systemd does not restart: a person must fix it
    line = gw.wait_for_log("cannot start:")
    assert f"outbox: cannot create the outbox database {missing}" in line
    assert "(exit 78)" in line


@pytest.mark.usefixtures("tls")
def test_check_config_finds_an_outbox_in_a_missing_directory(
    gateway_config: Callable[..., Path], tmp_path: Path, run_gateway: Callable[..., Any]
) -> None:
    (tmp_path / "cpi-secret").write_text("s3cret-of-the-test\n")
    missing = tmp_path / "no-such-dir" / "outbox.sqlite3"
    config = gateway_config(cpi_toml(9) + f"file = '{missing}'\n")
    result = run_gateway("check-config", "--config", str(config))
    assert result.returncode == 78
    assert f"outbox.file: '{missing}': the directory '{missing.parent}' does not exist" in (
        result.stderr
    )
