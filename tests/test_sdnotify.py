"""sd_notify datagrams on a real AF_UNIX socket; the watchdog withholds pings when stuck."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from gateway.app import ComponentSpec, Gateway, Stage
from gateway.config import parse_config
from gateway.core.backoff import Backoff
from gateway.core.component import UP, Condition
from gateway.sdnotify import Notifier
from gateway.supervisor import Supervised


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield sock, path
    sock.close()


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_messages_arrive_as_datagrams(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    n.ready("2 buses up, 0 down")
    n.status("line one\nline two")
    n.reloading()
    n.stopping()
    msgs = drain(sock)
    assert msgs[0] == "READY=1\nSTATUS=2 buses up, 0 down"
    assert msgs[1] == "STATUS=line one"
    assert msgs[2].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert int(msgs[2].split("=")[-1]) > 0
    assert msgs[3] == "STOPPING=1"


def test_abstract_socket() -> None:
    name = f"edge-gateway-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_no_op_without_systemd() -> None:
    n = Notifier({})
    assert not n.enabled
    n.ready()  # must not raise
    assert n.watchdog_interval is None


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert Notifier(env).watchdog_interval == interval


async def test_watchdog_pings_at_half_the_period_and_stops_when_stuck(
    tmp_path: Path,
    notify_socket: tuple[socket.socket, str],
    autojump_clock: trio.testing.MockClock,
) -> None:
    sock, path = notify_socket
    config = parse_config(f'[gateway]\nstate_dir = "{tmp_path}"\nstatus_interval = "1h"\n')
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    gw = Gateway.create(config, lambda: config, notifier)

    class Wedged:
        async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            with trio.CancelScope(shield=True):  # ignores the supervisor's restart
                await trio.sleep(10_000)

        def condition(self) -> Condition:
            return UP

        def statistics(self) -> object:
            return None

    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.run)
        pings = []
        await trio.sleep(0.5)  # read between pings, never at the same instant as one
        for _ in range(10):  # the socket queues only ~10 datagrams: read as they come
            await trio.sleep(1)
            pings += [m for m in drain(sock) if m == "WATCHDOG=1"]
        assert len(pings) == 11  # t = 0, 1, ..., 10: every 1 s (half of WATCHDOG_USEC)

        spec = ComponentSpec(
            "wedged",
            "bus",
            Stage.PRODUCERS,
            None,
            lambda: Supervised("wedged", lambda progress: Wedged(), Backoff(), stall_after=5.0),
        )
        await gw.components.start(spec)
        await trio.sleep(5 + 2 + 5 + 1)  # stall_after + grace (2 * 1 s + 5 s) + margin
        drain(sock)
        await trio.sleep(5)
        assert [m for m in drain(sock) if m == "WATCHDOG=1"] == []
        nursery.cancel_scope.cancel()
