"""The composition root in-process: reload restarts only what changed; clean shutdown."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from gateway.app import Gateway
from gateway.config import Config, parse_config
from gateway.sdnotify import Notifier

BUS = """
[[buses]]
name = "{name}"
kind = "sim"
[[buses.devices]]
name = "d"
interval = "{interval}"
points = [{{ name = "p", signal = "counter" }}]
"""


def config_text(tmp_path: Path, **intervals: str) -> str:
    head = f'[gateway]\nstate_dir = "{tmp_path}"\nstatus_interval = "1s"\n'
    return head + "".join(BUS.format(name=n, interval=i) for n, i in intervals.items())


class Source:
    """What SIGHUP re-reads: settable text, parsed like the real file."""

    def __init__(self, text: str) -> None:
        self.text = text

    def load(self) -> Config:
        return parse_config(self.text)


async def test_reload_restarts_only_changed_buses(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(config_text(tmp_path, a="1s", b="1s", c="1s"))
    gw = Gateway.create(source.load(), source.load, Notifier({}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.run)
        await trio.sleep(2.5)
        before = {name: sup for name, (_, sup) in gw.buses.supervised.items()}
        assert gw.status_line() == "3 buses up, 0 down"

        # b changes, c goes away, d is new; a is untouched.
        source.text = config_text(tmp_path, a="1s", b="2s", d="1s")
        await gw.reload()
        after = {name: sup for name, (_, sup) in gw.buses.supervised.items()}
        assert sorted(after) == ["a", "b", "d"]
        assert after["a"] is before["a"]
        assert after["b"] is not before["b"]
        assert before["b"].state.value == "stopped"
        assert before["c"].state.value == "stopped"
        assert gw.config.buses[1].devices[0].interval == 2.0

        # An invalid config is rejected; the running one stays.
        source.text = "[gateway]\nshutdown_timeout = 5\n"
        await gw.reload()
        assert gw.buses.supervised["a"][1] is after["a"]
        assert sorted(gw.buses.supervised) == ["a", "b", "d"]

        await trio.sleep(2)
        counts = gw.hub.statistics()
        assert isinstance(counts["published"], int)
        assert counts["published"] > 0
        await gw.shutdown("test")
    assert all(sup.state.value == "stopped" for sup in after.values())


async def test_shutdown_gives_up_after_the_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(
        config_text(tmp_path, a="1s").replace(
            "status_interval", 'shutdown_timeout = "3s"\nstatus_interval'
        )
    )
    gw = Gateway.create(source.load(), source.load, Notifier({}))
    wedged = trio.Event()

    async def stop_all_that_hangs() -> None:
        wedged.set()
        await trio.sleep_forever()

    gw.buses.stop_all = stop_all_that_hangs  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gw.run)
        await trio.sleep(1)
        t0 = trio.current_time()
        await gw.shutdown("test")
        assert wedged.is_set()
        assert trio.current_time() - t0 == pytest.approx(3.0)


async def test_second_interrupt_cancels_at_once(tmp_path: Path) -> None:
    source = Source(
        config_text(tmp_path, a="1s").replace(
            "status_interval", 'shutdown_timeout = "1h"\nstatus_interval'
        )
    )
    gw = Gateway.create(source.load(), source.load, Notifier({}))
    draining = trio.Event()

    async def stop_all_that_hangs() -> None:
        draining.set()
        await trio.sleep_forever()

    gw.buses.stop_all = stop_all_that_hangs  # type: ignore[method-assign]
    with trio.fail_after(10):  # far below the 1 h shutdown timeout
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gw.run)
            await gw.ready.wait()  # signal handling is installed before anything else
            os.kill(os.getpid(), signal.SIGINT)  # graceful stop begins, and hangs
            await draining.wait()
            assert gw.stopping
            os.kill(os.getpid(), signal.SIGINT)  # the second one cancels everything
    assert all(sup.state.value == "stopped" for _, sup in gw.buses.supervised.values())
