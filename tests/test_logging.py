"""Log lines: ``key=value`` context, quoting, the terminal format (UTC timestamp and level) and
the journal format (``<N>`` priority prefix on every line, no timestamp).

The formatter is tested in-process; one run of the real command each checks that
``$JOURNAL_STREAM`` switches the format of everything the daemon writes.
"""

from __future__ import annotations

import io
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gateway.core import logs
from gateway.core.logs import _Formatter, kv
from tests.conftest import gateway_env

if TYPE_CHECKING:
    from conftest import Daemon

TIMESTAMPED = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+: "
)
PRIORITY = re.compile(r"<[0-7]>")


class Collect(logging.Handler):
    """Keeps each record's formatted text, so a test can see what one record became."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.setFormatter(_Formatter(journal=journal))
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.texts.append(self.format(record))


@pytest.fixture
def collect() -> Iterator[Callable[[bool], tuple[logging.Logger, Collect]]]:
    log = logging.getLogger("gateway.test_logging")
    handlers: list[Collect] = []

    def make(journal: bool) -> tuple[logging.Logger, Collect]:
        handler = Collect(journal)
        handlers.append(handler)
        log.addHandler(handler)
        return log, handler

    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield make
    for handler in handlers:
        log.removeHandler(handler)
    log.setLevel(logging.NOTSET)
    log.propagate = True


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger without the gateway's handler (an earlier test in this process may have
    called ``logs.setup``); what the test's ``logs.setup`` does is undone afterwards."""
    root = logging.getLogger()
    noisy = ["hypercorn", "httpx", "httpcore", "pymodbus", "trio-websocket"]
    levels = {name: logging.getLogger(name).level for name in noisy}
    level = root.level
    earlier = [h for h in root.handlers if getattr(h, "_edge_gateway", False)]
    for handler in earlier:
        root.removeHandler(handler)
    yield root
    for handler in list(root.handlers):
        if getattr(handler, "_edge_gateway", False):
            root.removeHandler(handler)
    for handler in earlier:
        root.addHandler(handler)
    root.setLevel(level)
    for name, noisy_level in levels.items():
        logging.getLogger(name).setLevel(noisy_level)


def raise_and_log(log: logging.Logger) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("poll failed", extra=kv(bus="rs485-1"))


# ---- terminal format --------------------------------------------------------------------------


def test_terminal_line_has_utc_timestamp_level_and_logger(
    collect: Callable[[bool], tuple[logging.Logger, Collect]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Far from UTC, so local time in the line would show.
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    time.tzset()
    try:
        log, out = collect(False)
        log.info("bus %s is up", "rs485-1")
    finally:
        monkeypatch.undo()
        time.tzset()
    [record], [text] = out.records, out.texts
    created = datetime.fromtimestamp(record.created, UTC)
    stamp = created.strftime("%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"
    assert text == f"{stamp} INFO    gateway.test_logging: bus rs485-1 is up"


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        (logging.DEBUG, "DEBUG   "),
        (logging.INFO, "INFO    "),
        (logging.WARNING, "WARNING "),
        (logging.ERROR, "ERROR   "),
        (logging.CRITICAL, "CRITICAL "),
    ],
)
def test_terminal_line_shows_the_level(
    collect: Callable[[bool], tuple[logging.Logger, Collect]], level: int, shown: str
) -> None:
    log, out = collect(False)
    log.log(level, "something happened")
    [text] = out.texts
    assert TIMESTAMPED.match(text)
    assert f"Z {shown}gateway.test_logging: something happened" in text


def test_terminal_traceback_follows_the_line(
    collect: Callable[[bool], tuple[logging.Logger, Collect]],
) -> None:
    log, out = collect(False)
    raise_and_log(log)
    [text] = out.texts
    lines = text.split("\n")
    assert TIMESTAMPED.match(lines[0])
    assert lines[0].endswith(" ERROR   gateway.test_logging: poll failed bus=rs485-1")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"


# ---- key=value context ------------------------------------------------------------------------


def test_context_follows_the_message_as_key_value(
    collect: Callable[[bool], tuple[logging.Logger, Collect]],
) -> None:
    log, out = collect(True)
    log.info("polled", extra=kv(bus="rs485-1", devices=3, ok=True, delay=0.5))
    assert out.texts == ["<6>polled bus=rs485-1 devices=3 ok=True delay=0.5"]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("two words", '"two words"'),
        ("", '""'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a=b", '"a=b"'),
        ("tab\there", '"tab\there"'),
        ("line one\nline two", '"line one\\nline two"'),
        ('C:\\dir "x"', '"C:\\\\dir \\"x\\""'),
        ("C:\\dir", "C:\\dir"),  # nothing to quote: left as it is
    ],
)
def test_context_values_are_quoted_when_needed(
    collect: Callable[[bool], tuple[logging.Logger, Collect]], value: str, shown: str
) -> None:
    log, out = collect(True)
    log.info("x", extra=kv(key=value, next=1))
    # A value never runs into the next key, and never splits the line.
    assert out.texts == [f"<6>x key={shown} next=1"]


# ---- journal format ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.DEBUG, "<7>"),
        (logging.INFO, "<6>"),
        (logging.WARNING, "<4>"),
        (logging.ERROR, "<3>"),
        (logging.CRITICAL, "<2>"),
    ],
)
def test_journal_line_is_priority_and_message_only(
    collect: Callable[[bool], tuple[logging.Logger, Collect]], level: int, prefix: str
) -> None:
    log, out = collect(True)
    log.log(level, "bus %s is up", "rs485-1", extra=kv(bus="rs485-1"))
    assert out.texts == [f"{prefix}bus rs485-1 is up bus=rs485-1"]


def test_journal_multiline_message_has_prefix_on_every_line(
    collect: Callable[[bool], tuple[logging.Logger, Collect]],
) -> None:
    log, out = collect(True)
    log.warning("first\nsecond")
    assert out.texts == ["<4>first\n<4>second"]


def test_journal_traceback_stays_in_one_record_with_prefix_on_every_line(
    collect: Callable[[bool], tuple[logging.Logger, Collect]],
) -> None:
    log, out = collect(True)
    raise_and_log(log)
    [text] = out.texts  # one record, so one write to the journal stream
    lines = text.split("\n")
    assert lines[0] == "<3>poll failed bus=rs485-1"
    assert lines[1] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in lines), lines


@pytest.mark.parametrize("journal", [False, True])
def test_stack_info_is_kept(
    collect: Callable[[bool], tuple[logging.Logger, Collect]], journal: bool
) -> None:
    log, out = collect(journal)
    log.warning("where am I", stack_info=True)
    [text] = out.texts
    lines = text.split("\n")
    assert any(line.endswith("Stack (most recent call last):") for line in lines), lines
    assert any("test_stack_info_is_kept" in line for line in lines), lines
    if journal:
        assert all(line.startswith("<4>") for line in lines), lines


# ---- setup ------------------------------------------------------------------------------------


def test_setup_uses_journal_format_when_journal_stream_is_set(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:123456")
    stream = io.StringIO()
    logs.setup("info", stream)
    logging.getLogger("gateway.test_logging").error("bad", extra=kv(bus="b"))
    assert stream.getvalue() == "<3>bad bus=b\n"


def test_setup_uses_terminal_format_without_journal_stream(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stream = io.StringIO()
    logs.setup("info", stream)
    logging.getLogger("gateway.test_logging").info("fine")
    [line] = stream.getvalue().splitlines()
    assert TIMESTAMPED.match(line)
    assert line.endswith(" INFO    gateway.test_logging: fine")


def test_setup_again_changes_the_level_and_keeps_one_handler(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:123456")
    stream = io.StringIO()
    log = logging.getLogger("gateway.test_logging")
    logs.setup("info", stream)
    log.debug("hidden")
    logs.setup("debug", stream)
    log.debug("shown")
    logs.setup("error", stream)
    log.warning("hidden too")
    # Libraries are held at warning or above, and follow a stricter level on reload too.
    logging.getLogger("httpx").warning("library chatter")
    log.error("last")
    assert stream.getvalue() == "<7>shown\n<3>last\n"
    assert sum(getattr(h, "_edge_gateway", False) for h in root_logger.handlers) == 1


# ---- the real command -------------------------------------------------------------------------

FLAKY_BUS = """\
[[buses]]
name = "flaky"
kind = "sim"
fail_after = "100ms"

[[buses.devices]]
name = "nothing"
points = []
"""


def test_run_under_journal_prefixes_every_line(
    gateway_config: Callable[..., Path], daemon: Callable[..., Daemon]
) -> None:
    d = daemon(gateway_config(FLAKY_BUS), JOURNAL_STREAM="8:123456")
    d.wait_ready()
    d.wait_for_log("bus flaky failed: RuntimeError")  # the first failure has a traceback
    d.wait_for_log("bus flaky is up again")
    d.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert "<6>gateway ready: 2 buses up, 0 down name=test" in d.lines
    assert d.lines[-1] == "<6>stopped"
    for line in d.lines:
        assert PRIORITY.match(line), line
        assert not TIMESTAMPED.search(line), line
    failed = next(i for i, line in enumerate(d.lines) if "bus flaky failed:" in line)
    assert d.lines[failed].startswith("<3>bus flaky failed: RuntimeError: simulated failure")
    trace = d.lines[failed + 1 : d.lines.index("<6>bus flaky is up again bus=flaky")]
    assert any("Traceback (most recent call last):" in line for line in trace), trace
    assert trace[-1].endswith("RuntimeError: simulated failure after 0.1s"), trace
    assert all(line.startswith("<3>") for line in trace), trace


def test_run_on_a_terminal_has_timestamp_and_level(
    gateway_config: Callable[..., Path], daemon: Callable[..., Daemon]
) -> None:
    d = daemon(gateway_config())
    d.wait_ready()
    d.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0
    assert d.lines, "no log lines"
    for line in d.lines:
        assert TIMESTAMPED.match(line), line
    assert any(" INFO    gateway: gateway ready: " in line for line in d.lines)


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "terminal"])
def test_config_errors_are_logged_as_errors(
    tmp_path: Path, run_gateway: Callable[..., subprocess.CompletedProcess[str]], journal: bool
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nnmae = "typo"\n', encoding="utf-8")
    env = {"JOURNAL_STREAM": "8:123456"} if journal else {}
    result = run_gateway("run", "--config", str(path), **env)
    assert result.returncode == 78
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines  # the problem, then "not starting"
    assert "gateway.nmae: unknown key (did you mean 'name'?)" in lines[0]
    for line in lines:
        if journal:
            assert line.startswith("<3>"), line
        else:
            assert TIMESTAMPED.match(line), line
            assert " ERROR   gateway: " in line


@pytest.mark.parametrize("where", ["main", "thread"])
def test_uncaught_traceback_under_journal_is_critical(where: str) -> None:
    """A crash must show in ``journalctl -p warning``: every line of an uncaught traceback
    carries priority 2 (critical), in the main thread and in worker threads."""
    body = "raise RuntimeError('boom')"
    if where == "thread":
        body = (
            "import threading\n"
            "def f():\n    raise RuntimeError('boom')\n"
            "t = threading.Thread(target=f); t.start(); t.join()"
        )
    code = f"from gateway.core import logs\nlogs.setup('info')\n{body}\n"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=gateway_env(JOURNAL_STREAM="8:1234"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    lines = result.stderr.splitlines()
    assert any("RuntimeError: boom" in line for line in lines), lines
    assert all(line.startswith("<2>") for line in lines), lines


def test_accept_failures_give_one_warning_a_minute_without_a_traceback() -> None:
    now = [0.0]
    retries = logs.AcceptRetries(clock=lambda: now[0])
    logger = logging.getLogger("trio.serve_listeners")

    def failure() -> logging.LogRecord:
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            return logger.makeRecord(
                logger.name,
                logging.ERROR,
                __file__,
                1,
                "accept returned %s (%s); retrying in %s seconds",
                ("EMFILE", "Too many open files", 0.1),
                sys.exc_info(),
            )

    first = failure()
    assert retries.filter(first)
    assert first.levelname == "WARNING"
    assert first.exc_info is None
    assert first.getMessage() == (
        "new connections wait: accepting one failed with EMFILE (Too many open files), "
        "retrying every 0.1s; the process is out of file descriptors: raise LimitNOFILE in "
        "the unit, or lower max_connections"
    )
    now[0] = 59.0
    assert not any(retries.filter(failure()) for _ in range(590))
    now[0] = 60.0
    later = failure()
    assert retries.filter(later)
    assert "(590 more such failures since the last message)" in later.getMessage()
    # Anything else trio's server logs goes through as it is.
    other = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "other", (), None)
    assert retries.filter(other)
    assert other.getMessage() == "other"


SERVE_WITH_FEW_FILES = """
import resource, sys, trio
from gateway.core import logs
resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
logs.setup(stream=sys.stderr)
async def main():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(lambda stream: trio.sleep_forever(), listeners)
trio.run(main)
"""


def test_a_server_out_of_file_descriptors_logs_one_line_not_a_traceback_flood() -> None:
    import socket

    server = subprocess.Popen(
        [sys.executable, "-c", SERVE_WITH_FEW_FILES],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=gateway_env(),
    )
    clients: list[socket.socket] = []
    # Should the line never come, killing the server ends the wait (and fails the test).
    watchdog = threading.Timer(10.0, server.kill)
    watchdog.start()
    try:
        assert server.stdout is not None
        assert server.stderr is not None
        port = int(server.stdout.readline())
        # More connections than the server has descriptors for: its accepts fail.
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
        line = server.stderr.readline()
    finally:
        watchdog.cancel()
        server.kill()
        _, rest = server.communicate(timeout=10)
        for client in clients:
            client.close()
    assert "WARNING" in line, line
    assert "accepting one failed with EMFILE" in line
    assert "LimitNOFILE" in line
    assert "Traceback" not in line + rest, rest
