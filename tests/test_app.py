"""The composition root: components through one model, reload restarts only what changed,
truthful STATUS lines, and shutdown that excludes reload and survives signals at any moment.

In-process tests call what the signal handler calls; tests that need real signals run the
gateway in a subprocess (a signal sent to the pytest process itself would end the whole run
if handling regressed).
"""

from __future__ import annotations

import functools
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from gateway import app, cli
from gateway.api import hash_password
from gateway.app import COMMANDS, COMMANDS_FILE, ComponentSpec, Gateway, Stage, status_of
from gateway.commands import CommandLimits, CommandRouter, command_from_object
from gateway.config import Config, ConfigError, parse_config
from gateway.core.backoff import Backoff
from gateway.core.commands import CommandRejected, CommandRequest, CommandState
from gateway.core.commands import Source as Source_
from gateway.core.component import UP, Condition, Health, StartPolicy, StartupError, State
from gateway.demo import free_port
from gateway.forwarder import ForwarderStatistics
from gateway.hub import Hub
from gateway.sdnotify import Notifier
from gateway.supervisor import Supervised
from tests.conftest import gateway_env

if TYPE_CHECKING:
    from conftest import Daemon, NotifySocket

BUS = """
[[buses]]
name = "{name}"
kind = "sim"
[[buses.devices]]
name = "d"
interval = "{interval}"
points = [{{ name = "p", signal = "counter" }}]
"""


def config_text(tmp_path: Path, *, head: str = "", **intervals: str) -> str:
    text = f'[gateway]\nstate_dir = "{tmp_path}"\nstatus_interval = "1s"\n{head}'
    return text + "".join(BUS.format(name=n, interval=i) for n, i in intervals.items())


class Source:
    """What SIGHUP re-reads: settable text, parsed like the real file."""

    def __init__(self, text: str) -> None:
        self.text = text

    def load(self) -> Config:
        return parse_config(self.text)


class RecordingNotifier(Notifier):
    """The sd_notify messages, in order, without a socket."""

    def __init__(self) -> None:
        super().__init__({})
        self.messages: list[str] = []

    def notify(self, *lines: str) -> None:
        self.messages.append("\n".join(lines))


def states(gw: Gateway) -> dict[str, str]:
    return {name: h.state.value for name, h in gw.health().items()}


async def test_reload_restarts_only_changed_buses(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(config_text(tmp_path, a="1s", b="1s", c="1s"))
    gw = Gateway.create(source.load(), source.load, Notifier({}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.run)
        await trio.sleep(2.5)
        before = {c.name: c for c in gw.components.all()}
        assert gw.status_line() == "3 buses up, 0 down"

        # b changes, c goes away, d is new; a is untouched.
        source.text = config_text(tmp_path, a="1s", b="2s", d="1s")
        await gw.reload()
        after = {c.name: c for c in gw.components.all()}
        assert sorted(after) == ["a", "b", "d"]
        assert after["a"] is before["a"]
        assert after["b"] is not before["b"]
        assert before["b"].health().reason == "stopped"
        assert before["c"].health().reason == "stopped"
        assert gw.config.buses[1].devices[0].interval == 2.0  # type: ignore[attr-defined]

        # An invalid config is rejected; the running one stays.
        source.text = "[gateway]\nshutdown_timeout = 5\n"
        await gw.reload()
        assert gw.components.get("a") is after["a"]
        assert sorted(c.name for c in gw.components.all()) == ["a", "b", "d"]

        await trio.sleep(2)
        stats = gw.statistics()
        assert stats.hub.published > 0
        assert [c.name for c in stats.components] == ["a", "b", "d"]
        assert all(c.health.state is State.UP for c in stats.components)
        await gw.shutdown("test")
    assert all(c.health().reason == "stopped" for c in after.values())


async def test_reload_warns_about_keys_that_need_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    source = Source(config_text(tmp_path, a="1s"))
    gw = Gateway.create(source.load(), source.load, Notifier({}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.run)
        await gw.ready.wait()
        source.text = config_text(
            tmp_path, head='name = "renamed"\n[hub]\nsubscriber_buffer = 7\n', a="1s"
        )
        await gw.reload()
        nursery.cancel_scope.cancel()
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for key in ("gateway.name", "hub.subscriber_buffer"):
        assert any(
            f"reload: {key} changed; it takes effect only after a restart" in w for w in warned
        ), (key, warned)


async def test_shutdown_gives_up_after_the_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(config_text(tmp_path, head='shutdown_timeout = "3s"\n', a="1s"))
    gw = Gateway.create(source.load(), source.load, Notifier({}))
    wedged = trio.Event()

    async def stop_all_that_hangs() -> None:
        wedged.set()
        await trio.sleep_forever()

    gw.components.stop_all = stop_all_that_hangs  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.run)
        await trio.sleep(1)
        t0 = trio.current_time()
        await gw.shutdown("test")
        assert wedged.is_set()
        assert trio.current_time() - t0 == pytest.approx(3.0)


async def test_stop_signal_during_reload_cancels_it_and_never_sends_ready_after_stopping(
    tmp_path: Path,
) -> None:
    """SIGTERM while a reload is still reading its file: the reload is cancelled, shutdown
    is clean (no ExceptionGroup[KeyError]) and READY=1 never follows STOPPING=1."""
    source = Source(config_text(tmp_path, a="50ms"))
    loading = threading.Event()
    release = threading.Event()

    def slow_load() -> Config:
        loading.set()
        release.wait(10)
        return source.load()

    notifier = RecordingNotifier()
    gw = Gateway(source.load(), slow_load, notifier, Hub())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gw.run)
            await gw.ready.wait()
            gw._request_reload()  # what SIGHUP does
            await trio.to_thread.run_sync(loading.wait)
            gw._begin_shutdown("SIGTERM")  # what SIGTERM does
            gw._request_reload()  # a SIGHUP while stopping is ignored
    release.set()
    assert gw.stopped_cleanly
    stopping = notifier.messages.index("STOPPING=1")
    assert not any("READY=1" in m for m in notifier.messages[stopping:]), notifier.messages
    assert all(c.health().reason == "stopped" for c in gw.components.all())


async def test_reload_requested_during_a_reload_runs_once_more(tmp_path: Path) -> None:
    """SIGHUPs while a reload reads the file: one more pass after it (the file may have
    changed again), not one per signal."""
    source = Source(config_text(tmp_path, a="1s"))
    loads: list[int] = []
    loading = threading.Event()
    release = threading.Event()

    def slow_load() -> Config:
        loads.append(1)
        loading.set()
        release.wait(10)
        return source.load()

    gw = Gateway(source.load(), slow_load, RecordingNotifier(), Hub())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.run)
        await gw.ready.wait()
        gw._request_reload()
        done = gw._reload_done
        assert done is not None
        await trio.to_thread.run_sync(loading.wait)
        for _ in range(5):
            gw._request_reload()
        release.set()
        with trio.fail_after(10):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert len(loads) == 2


async def test_status_line_says_which_component_is_down_and_why(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    missing = tmp_path / "ttyUSB9"
    text = (
        config_text(tmp_path, a="1s", b="1s")
        + f"""
[[buses]]
name = "line-1"
kind = "serial-line"
port = "{missing}"
format = "regex"
pattern = 'T=(?P<t>[0-9.]+)'
points = [{{ name = "t" }}]
"""
    )
    source = Source(text)
    gw = Gateway.create(source.load(), source.load, Notifier({}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.run)
        await gw.ready.wait()
        await trio.sleep(1)
        line = gw.status_line()
        assert line == f"2 buses up, 1 down (line-1: {missing} missing)"
        health = gw.health()["line-1"]
        assert health.state is State.DOWN
        nursery.cancel_scope.cancel()


def test_status_of_groups_states_with_reasons() -> None:
    def h(state: State, reason: str | None = None) -> Health:
        return Health(state, 0.0, reason)

    members = [
        ("a", h(State.UP)),
        ("plc", h(State.DEGRADED, "meter not answering")),
        ("line-1", h(State.DOWN, "/dev/ttyUSB9 missing")),
        ("b", h(State.UP)),
    ]
    assert status_of("bus", members) == (
        "2 buses up, 1 degraded (plc: meter not answering), 1 down (line-1: /dev/ttyUSB9 missing)"
    )
    assert status_of("bus", [("a", h(State.UP))]) == "1 bus up, 0 down"
    many = [(f"b{i}", h(State.DOWN, "a" * 60 + "z" * 60)) for i in range(5)]
    text = status_of("bus", many)
    assert text.startswith("0 buses up, 5 down (b0: " + "a" * 48 + "..." + "z" * 48 + ";")
    assert text.endswith("; +2 more)")
    assert (
        status_of("outbox", [("outbox", h(State.STARTING))]) == "0 outboxs up, 1 starting, 0 down"
    )


def _failing_required(hub: Hub) -> ComponentSpec:
    class Refuses:
        async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
            raise StartupError("port 8443 in use: stop the other process or change api.listen")

        def condition(self) -> object:
            raise AssertionError

        def statistics(self) -> object:
            return None

    def build() -> Supervised:
        return Supervised(
            "api",
            lambda progress: Refuses(),
            Backoff(),
            kind="api",  # type: ignore[arg-type,return-value]
            policy=StartPolicy.REQUIRED,
        )

    return ComponentSpec("api", "api", Stage.API, None, build)


@pytest.fixture
def keep_signal_handlers() -> Iterator[None]:
    """``cli._serve`` sets the process's SIGTERM/SIGINT handlers: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.mark.usefixtures("keep_signal_handlers")
def test_required_component_that_cannot_start_ends_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = Source(config_text(tmp_path, a="1s"))
    real_specs = app.specs
    monkeypatch.setattr(
        app,
        "specs",
        lambda config, hub, *rest: [*real_specs(config, hub, *rest), _failing_required(hub)],
    )
    assert cli._serve(source.load) == StartupError.EX_UNAVAILABLE
    critical = [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"]
    assert critical == [
        "cannot start: port 8443 in use: stop the other process or change api.listen (exit 69)"
    ]


@pytest.mark.usefixtures("keep_signal_handlers")
def test_config_error_in_the_loader_is_exit_78(tmp_path: Path) -> None:
    def broken() -> Config:
        raise ConfigError("x.toml", [("gateway.name", "bad")])

    assert cli._serve(broken) == 78


# ---- real signals, in a subprocess ---------------------------------------------------------

HANGING_STOP = """
import sys, trio
from gateway.app import Gateway
from gateway.config import load_config
from gateway.sdnotify import Notifier
from pathlib import Path

config = load_config(Path(sys.argv[1]))
gw = Gateway.create(config, lambda: config, Notifier())

async def stop_all_that_hangs():
    print("draining", file=sys.stderr, flush=True)
    await trio.sleep_forever()

gw.components.stop_all = stop_all_that_hangs
trio.run(gw.run)
print("returned", file=sys.stderr, flush=True)
"""


def test_second_interrupt_cancels_at_once(
    tmp_path: Path, notify_listener: NotifySocket, daemon_command: Callable[..., Daemon]
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(tmp_path, head='shutdown_timeout = "1h"\n', a="1s"))
    script = tmp_path / "hanging.py"
    script.write_text(HANGING_STOP)
    d = daemon_command([sys.executable, str(script), str(config)])
    d.wait_ready()
    d.send_signal(signal.SIGINT)  # graceful stop begins, and hangs
    d.wait_for_log("draining")
    d.send_signal(signal.SIGINT)  # the second one cancels everything
    assert d.wait_exit(timeout=10) == 0  # far below the 1 h shutdown timeout
    assert d.lines[-1] == "returned"


@pytest.mark.parametrize("gap", [0.0, 0.001, 0.01, 0.05])
def test_second_sigterm_soon_after_the_first_still_exits_0(
    gap: float, gateway_config: Callable[..., Path], daemon: Callable[..., Daemon]
) -> None:
    d = daemon(gateway_config())
    d.wait_ready()
    d.send_signal(signal.SIGTERM)
    time.sleep(gap)  # the scenario itself: two signals this far apart
    d.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0, d.lines
    assert d.lines[-1].endswith("gateway: stopped"), d.lines
    assert not any("Traceback" in line or "Exception ignored" in line for line in d.lines), (
        "\n".join(d.lines)
    )


@pytest.mark.parametrize("gap", [0.0, 0.002, 0.02])
def test_sigterm_right_after_sighup_stops_cleanly(
    gap: float, gateway_config: Callable[..., Path], daemon: Callable[..., Daemon]
) -> None:
    path = gateway_config()
    d = daemon(path)
    d.wait_ready()
    d.send_signal(signal.SIGHUP)
    time.sleep(gap)
    d.send_signal(signal.SIGTERM)
    assert d.wait_exit() == 0, d.lines
    assert not any("Traceback" in line for line in d.lines), d.lines
    assert d.notify is not None
    d.notify.drain()
    messages = d.notify.messages
    stopping = messages.index("STOPPING=1")
    assert not any("READY=1" in m for m in messages[stopping:]), messages


@pytest.mark.parametrize("gap", [0.0, 0.001, 0.01])
def test_sighup_right_after_sigterm_changes_nothing(
    gap: float, gateway_config: Callable[..., Path], daemon: Callable[..., Daemon]
) -> None:
    d = daemon(gateway_config())
    d.wait_ready()
    d.send_signal(signal.SIGTERM)
    time.sleep(gap)
    d.send_signal(signal.SIGHUP)  # once stopped, it must not kill the process (exit -1)
    assert d.wait_exit() == 0, d.lines
    assert d.lines[-1].endswith("gateway: stopped"), d.lines


EARLY = """
import os, signal, sys
import gateway.entry as entry

class Interrupted:  # Ctrl-C while the command is still being imported
    def find_spec(self, name, path=None, target=None):
        if name == "gateway.cli":
            raise KeyboardInterrupt
        return None

entry.handle_early_signals()
os.kill(os.getpid(), signal.SIGHUP)   # ignored: nothing to reload yet
os.kill(os.getpid(), signal.SIGTERM)  # remembered: the gateway stops as soon as it runs
print(entry.early_terms, flush=True)
sys.meta_path.insert(0, Interrupted())
status = entry.main()
os.kill(os.getpid(), signal.SIGTERM)  # a second signal while exiting: ignored, not fatal
os.kill(os.getpid(), signal.SIGINT)
sys.exit(status)
"""


def test_signals_before_the_gateway_runs_are_handled_quietly() -> None:
    result = subprocess.run(
        [sys.executable, "-c", EARLY],
        env=gateway_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.stdout == f"[{int(signal.SIGTERM)}]\n"
    assert result.returncode == 130  # Ctrl-C during the import: no traceback
    assert result.stderr == ""


def test_sigterm_during_start_up_stops_without_ready(
    gateway_config: Callable[..., Path], daemon: Callable[..., Daemon]
) -> None:
    d = daemon(gateway_config())
    d.send_signal(signal.SIGTERM)  # before the gateway could handle signals itself
    assert d.wait_exit() in (0, -signal.SIGTERM), d.lines
    assert not any("Traceback" in line for line in d.lines), d.lines
    assert d.notify is not None
    d.notify.drain()
    assert not any("READY=1" in m for m in d.notify.messages), d.notify.messages


async def test_components_stop_stage_by_stage_producers_first() -> None:
    """Stop order is the reverse of the data flow: producers, consumers (which first drain),
    store, connections, API; start order is the order of the specs."""
    events: list[str] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
            events.append(f"start {self.name}")
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                events.append(f"stop {self.name}")

        def condition(self) -> Condition:
            return UP

        def statistics(self) -> object:
            return None

    class Draining(Supervised):
        async def drain(self) -> None:
            events.append(f"drain {self.name}")
            await trio.lowlevel.checkpoint()

    def spec(name: str, stage: Stage) -> ComponentSpec:
        def build() -> Supervised:
            cls = Draining if stage is Stage.CONSUMERS else Supervised
            return cls(name, lambda progress: Recorder(name), Backoff(), kind=name)  # type: ignore[arg-type,return-value]

        return ComponentSpec(name, name, stage, None, build)

    components = app.Components()
    wanted = [
        spec("api", Stage.API),
        spec("outbox", Stage.STORE),
        spec("wss", Stage.CONNECTIONS),
        spec("forwarder", Stage.CONSUMERS),
        spec("bus", Stage.PRODUCERS),
    ]
    async with trio.open_nursery() as nursery:
        await nursery.start(components.run, wanted)
        await components.stop_all()
        nursery.cancel_scope.cancel()
    starts = [e for e in events if e.startswith("start")]
    assert starts == [f"start {s.name}" for s in wanted]
    assert [e for e in events if not e.startswith("start")] == [
        "stop bus",
        "drain forwarder",
        "stop forwarder",
        "stop outbox",
        "stop wss",
        "stop api",
    ]
    assert components.all() == []


async def test_a_defect_in_the_loader_keeps_the_gateway_running(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    source = Source(config_text(tmp_path, a="1s"))

    def defective() -> Config:
        raise RecursionError("maximum recursion depth exceeded")

    gw = Gateway(source.load(), defective, RecordingNotifier(), Hub())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.run)
        await gw.ready.wait()
        await gw.reload()
        assert gw.status_line() == "1 bus up, 0 down"
        nursery.cancel_scope.cancel()
    critical = [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"]
    assert critical == [
        "reload failed: RecursionError: maximum recursion depth exceeded; keeping the running "
        "configuration (please report this)"
    ]


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A loopback port whose accept queue is full: a connect there hangs, as to a PLC whose
    packets are dropped. Yields the port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    fill = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fill.append(s)
    yield port
    for s in [*fill, listener]:
        s.close()


async def test_unreachable_plcs_do_not_hold_back_ready(
    tmp_path: Path, blackhole: int, autojump_clock: trio.testing.MockClock
) -> None:
    """Four PLCs that do not answer a connect: READY comes at once (each bus says it is
    starting), not after 4 x connect_timeout, which would run into systemd's start timeout."""
    plc = """
[[buses]]
name = "plc-{n}"
kind = "modbus-tcp"
host = "127.0.0.1"
port = {port}
connect_timeout = "5s"
[[buses.devices]]
name = "d"
points = [{{ name = "v", table = "holding", address = 0 }}]
"""
    text = config_text(tmp_path, a="1s") + "".join(
        plc.format(n=n, port=blackhole) for n in range(4)
    )
    source = Source(text)
    notifier = RecordingNotifier()
    gw = Gateway(source.load(), source.load, notifier, Hub())
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        nursery.start_soon(gw.run)
        await gw.ready.wait()
        assert trio.current_time() - t0 < 1.0
        ready = [m for m in notifier.messages if m.startswith("READY=1")]
        assert ready == [
            "READY=1\nSTATUS=1 bus up, 4 starting "
            f"(plc-0: connecting to 127.0.0.1:{blackhole}; plc-1: connecting to "
            f"127.0.0.1:{blackhole}; plc-2: connecting to 127.0.0.1:{blackhole}; +1 more), 0 down"
        ]
        await trio.sleep(6)  # past the connect timeout: down, with the reason
        line = gw.status_line()
        assert line.startswith(f"1 bus up, 4 down (plc-0: 127.0.0.1:{blackhole} not answering; "), (
            line
        )
        nursery.cancel_scope.cancel()


def test_cpi_status_says_when_cpi_last_answered() -> None:
    def stats(last_success: float | None) -> ForwarderStatistics:
        return ForwarderStatistics(
            batches_delivered=0,
            readings_delivered=0,
            requests=0,
            retries=0,
            splits=0,
            dead_letters=0,
            token_fetches=0,
            csrf_fetches=0,
            last_success=last_success,
            last_failure=None,
            last_failure_reason=None,
            failing_since=None,
        )

    up = Health(State.UP, 0.0)
    assert app.cpi_status(up, stats(None), now=100.0) == "CPI not reached yet"
    assert app.cpi_status(up, stats(98.0), now=100.0) == "CPI ok 2s ago"
    assert app.cpi_status(up, stats(100.0), now=100.0) == "CPI ok just now"
    failing = Health(State.DEGRADED, 0.0, "failing 4min (503)")
    assert app.cpi_status(failing, stats(1.0), now=300.0) == "CPI failing 4min (503)"
    down = Health(State.DOWN, 0.0, "RuntimeError: the outbox is not open")
    assert app.cpi_status(down, None) == "CPI down (RuntimeError: the outbox is not open)"


API_HEAD = """
[api]
listen = "127.0.0.1"
port = {port}
plain = true

[[api.users]]
name = "op"
password_scrypt = "{hash}"
role = "operator"
"""
SETPOINT_BUS = """
[[buses]]
name = "{name}"
kind = "sim"
[[buses.devices]]
name = "d"
interval = "1s"
points = [{{ name = "sp", signal = "setpoint", low = 0, high = {high} }}]
"""


def command_config(tmp_path: Path, buses: dict[str, int], port: int) -> str:
    head = API_HEAD.format(port=port, hash=_password_hash())
    text = f'[gateway]\nstate_dir = "{tmp_path}"\n{head}'
    return text + "".join(SETPOINT_BUS.format(name=n, high=h) for n, h in buses.items())


@functools.cache
def _password_hash() -> str:
    return hash_password("a password for the test")


def write(target: str, value: float) -> CommandRequest:
    data = {"id": f"{target}={value}", "target": target, "value": value}
    return command_from_object(data, now=time.time(), limits=CommandLimits())


async def test_commands_after_a_reload_see_its_buses_and_ranges(tmp_path: Path) -> None:
    port = free_port()
    source = Source(command_config(tmp_path, {"a": 10}, port))
    gw = Gateway.create(source.load(), source.load, Notifier({}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.run)
        await gw.ready.wait()
        router = gw.router()
        assert router is not None
        assert (await await_refused(router, write("modbus:a/d/sp", 50))).status == 422

        source.text = command_config(tmp_path, {"a": 100, "b": 100}, port)
        await gw.reload()
        assert gw.router() is router  # kept: only its config changed
        done = await router.execute(write("modbus:a/d/sp", 50), Source_.API)
        assert done.state is CommandState.DONE
        done = await router.execute(write("modbus:b/d/sp", 60), Source_.API)
        assert done.state is CommandState.DONE
        await gw.shutdown("test")


async def await_refused(router: CommandRouter, request: CommandRequest) -> CommandRejected:
    with pytest.raises(CommandRejected) as info:
        await router.execute(request, Source_.API)
    return info.value


async def test_cpi_commands_go_to_the_router_running_now(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The router's database cannot be opened at first (a directory in its place): the router
    # is retried; once it runs, commands in CPI's answers reach it, not a dead first attempt.
    (tmp_path / COMMANDS_FILE).mkdir()
    source = Source(command_config(tmp_path, {"a": 100}, free_port()))
    gw = Gateway.create(source.load(), source.load, Notifier({}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.run)
        await gw.ready.wait()
        component = gw.components.get(COMMANDS)
        assert component is not None
        assert component.health().state is not State.UP
        (tmp_path / COMMANDS_FILE).rmdir()
        while component.health().state is not State.UP:
            await trio.sleep(0.05)  # virtual time: the supervisor's backoff passes
        await gw.route_cpi_commands([{"id": "from-cpi", "target": "modbus:a/d/sp", "value": 7}])
        router = gw.router()
        assert router is not None
        # from_cpi runs it in the router's own task: wait (in virtual time) for its record.
        while (record := await router.get("from-cpi")) is None or not record.state.final:
            await trio.sleep(0.01)
        assert record.state is CommandState.DONE
        assert record.source is Source_.CPI
        await gw.shutdown("test")
