"""Shared fixtures.

For the real ``edge-gateway`` command run as a subprocess:

- ``notify_listener``: a real ``AF_UNIX``/``SOCK_DGRAM`` socket standing in for systemd's
  ``$NOTIFY_SOCKET``.
- ``gateway_config``: writes a small valid config (simulated buses, state in ``tmp_path``).
- ``daemon``: starts ``python -m gateway run``, collects its stderr lines in a thread and kills
  whatever is still running at teardown.

Tests wait for events (a datagram, a log line) with a deadline, never for a fixed time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Upper bound for something that normally takes a fraction of a second. Generous so that a
# loaded machine does not make tests flaky; only a failing test ever waits this long.
TIMEOUT = 10.0

# Inherited from the environment the tests run in, these would change what the gateway does.
_SYSTEMD_VARS = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "STATE_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
)

BASE_CONFIG = """\
[gateway]
name = "{name}"
state_dir = '{state_dir}'
status_interval = "200ms"
shutdown_timeout = "3s"

[supervisor]
backoff_initial = "50ms"
backoff_max = "100ms"

[[buses]]
name = "line-1"
kind = "sim"

[[buses.devices]]
name = "boiler"
interval = "50ms"
points = [
  {{ name = "temperature", signal = "sine", unit = "degC", low = 60, high = 80, period = "2s" }},
  {{ name = "parts", signal = "counter" }},
]
"""


def gateway_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


def gateway_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARS}
    env.update(extra)
    return env


def _run_to_completion(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_command(*args),
        cwd=ROOT,
        env=gateway_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


class NotifySocket:
    """The receiving end of sd_notify. ``wait_for`` looks at messages in arrival order and
    never returns the same message twice, so consecutive waits also check the order."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        """The value for ``$NOTIFY_SOCKET``."""
        self.messages: list[str] = []
        """Every datagram received so far."""
        self._next = 0

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.0))
        try:
            data = self.sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            return False
        self.messages.append(data.decode())
        return True

    def drain(self) -> list[str]:
        """Receive what is already queued, without waiting; mark everything as seen."""
        while self._receive(0):
            pass
        new = self.messages[self._next :]
        self._next = len(self.messages)
        return new

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            while self._next < len(self.messages):
                message = self.messages[self._next]
                self._next += 1
                if predicate(message):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._receive(remaining):
                raise AssertionError(
                    f"no matching sd_notify message within {timeout}s; got {self.messages!r}"
                )


class Daemon:
    """``edge-gateway ARGS`` (``run``, ``demo``) in a subprocess; a thread collects stderr."""

    def __init__(
        self,
        args: Sequence[str],
        notify: NotifySocket | None,
        env: dict[str, str],
        *,
        command: Sequence[str] | None = None,
    ) -> None:
        """Runs ``edge-gateway ARGS``, or ``command`` when given (a test's own script)."""
        self.notify = notify
        if notify is not None:
            env = {"NOTIFY_SOCKET": notify.address, **env}
        self.proc = subprocess.Popen(
            list(command) if command is not None else gateway_command(*args),
            cwd=ROOT,
            env=gateway_env(**env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        """Every stderr line so far, without the newline."""
        self._next = 0
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for_log(self, text: str, timeout: float = TIMEOUT) -> str:
        """The next stderr line (after the one last returned) containing ``text``."""
        return self.wait_for_line(lambda line: text in line, timeout, what=repr(text))

    def wait_for_line(
        self, predicate: Callable[[str], bool], timeout: float = TIMEOUT, what: str = "a match"
    ) -> str:
        """The next stderr line (after the one last returned) for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                while self._next < len(self.lines):
                    line = self.lines[self._next]
                    self._next += 1
                    if predicate(line):
                        return line
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    raise AssertionError(
                        f"no log line with {what} within {timeout}s "
                        f"(exit status {self.proc.poll()}); stderr:\n" + "\n".join(self.lines)
                    )
                self._changed.wait(remaining)

    def wait_for_notify(self, predicate: Callable[[str], bool], timeout: float = TIMEOUT) -> str:
        assert self.notify is not None, "started without a notify socket"
        return self.notify.wait_for(predicate, timeout)

    def wait_ready(self) -> str:
        return self.wait_for_notify(lambda m: "READY=1" in m.split("\n"))

    def send_signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running {timeout}s later; stderr:\n" + "\n".join(self.lines)
            ) from None
        self._reader.join(TIMEOUT)  # every line is collected once the reader hits EOF
        return code

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def notify_listener(tmp_path: Path) -> Iterator[NotifySocket]:
    directory = tmp_path
    if len(os.fsencode(directory / "notify.sock")) >= 100:  # sun_path holds 108 bytes
        directory = Path(tempfile.mkdtemp(prefix="gw-"))
    address = str(directory / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        yield NotifySocket(sock, address)
    os.unlink(address)
    if directory != tmp_path:
        directory.rmdir()


@pytest.fixture
def abstract_notify_listener() -> Iterator[NotifySocket]:
    name = f"edge-gateway-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield NotifySocket(sock, "@" + name)


@pytest.fixture
def gateway_config(tmp_path: Path) -> Callable[..., Path]:
    """``write(*extra, name=...)``: write the base config plus extra TOML; returns its path.
    Call again to rewrite the same file (for reload tests)."""
    path = tmp_path / "gateway.toml"
    state_dir = tmp_path / "state"

    def write(*extra: str, name: str = "test") -> Path:
        text = BASE_CONFIG.format(name=name, state_dir=state_dir)
        path.write_text("\n".join([text, *extra]), encoding="utf-8")
        return path

    return write


@pytest.fixture
def daemon(notify_listener: NotifySocket) -> Iterator[Callable[..., Daemon]]:
    """``start(config, notify=notify_listener, **env)``: a running ``edge-gateway run``."""
    started: list[Daemon] = []

    def start(config: Path, notify: NotifySocket | None = notify_listener, **env: str) -> Daemon:
        d = Daemon(["run", "--config", str(config)], notify, env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


@pytest.fixture
def daemon_command(notify_listener: NotifySocket) -> Iterator[Callable[..., Daemon]]:
    """``start(command, **env)``: a test's own script running the gateway, with a notify
    socket; killed at teardown."""
    started: list[Daemon] = []

    def start(command: Sequence[str], **env: str) -> Daemon:
        d = Daemon([], notify_listener, env, command=command)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


@pytest.fixture
def run_gateway() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_gateway(*args, **env)``: run a command that is expected to finish by itself
    (``check-config``, a ``run`` that fails) and capture its output."""
    return _run_to_completion
