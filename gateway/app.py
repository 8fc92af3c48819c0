"""The composition root: the whole process is this one nursery tree.

    gateway (root nursery)          READY=1 only after every child started
    ├── signals                     SIGTERM/SIGINT -> graceful stop, SIGHUP -> reload
    ├── buses                       one Supervised task per bus (drivers.registry kinds)
    ├── watchdog                    WATCHDOG=1 while the loop runs and no supervisor is stuck
    ├── status                      STATUS= line every gateway.status_interval
    └── extras                      e.g. the demo's console (passed in by the caller)

Components get what they need as arguments; nothing here is global.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import attrs
import trio

from drivers.base import Bus, BusConfig, BusContext
from drivers.registry import KINDS
from gateway.config import Config, ConfigError
from gateway.core import logs
from gateway.core.logs import kv
from gateway.hub import Hub
from gateway.sdnotify import Notifier
from gateway.supervisor import Backoff, State, Supervised

log = logging.getLogger("gateway")

Extra = Callable[..., Awaitable[None]]  # async fn(gateway, *, task_status)


def backoff_of(config: Config) -> Backoff:
    s = config.supervisor
    return Backoff(s.backoff_initial, s.backoff_max, s.healthy_after)


class Buses:
    """Every configured bus under its own supervisor. ``apply`` (reload) stops and starts only
    the buses whose config changed."""

    def __init__(self, hub: Hub, backoff: Backoff) -> None:
        self.hub = hub
        self.backoff = backoff
        self.supervised: dict[str, tuple[BusConfig, Supervised]] = {}
        self.instances: dict[str, Bus] = {}  # the current attempt's bus, for write()
        self._nursery: trio.Nursery | None = None
        self._done: dict[str, trio.Event] = {}

    async def run(
        self,
        configs: Iterable[BusConfig],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for config in configs:
                await self._start(config)
            task_status.started()
            await trio.sleep_forever()

    async def _start(self, config: BusConfig) -> None:
        assert self._nursery is not None
        kind = KINDS[config.kind]
        name = config.name

        def make(progress: Callable[[], None]) -> Callable[..., Awaitable[None]]:
            bus = kind.create(config, BusContext(self.hub.publish, progress))
            self.instances[name] = bus
            return bus.run

        sup = Supervised(
            f"bus {name}",
            make,
            self.backoff,
            stall_after=config.stall_after(),
            context={"bus": name},
        )
        self.supervised[name] = (config, sup)
        done = self._done[name] = trio.Event()

        async def supervise(*, task_status: trio.TaskStatus[None]) -> None:
            try:
                await sup.run(task_status=task_status)
            finally:
                done.set()

        await self._nursery.start(supervise)

    async def _stop(self, name: str) -> None:
        _, sup = self.supervised.pop(name)
        self.instances.pop(name, None)
        sup.stop()
        await self._done.pop(name).wait()

    async def apply(self, configs: Iterable[BusConfig], backoff: Backoff) -> tuple[int, int, int]:
        """Make the running buses match ``configs``; returns (restarted, removed, added)."""
        self.backoff = backoff
        wanted: dict[str, BusConfig] = {c.name: c for c in configs}
        running = set(self.supervised)
        changed = [n for n, (old, _) in self.supervised.items() if wanted.get(n) != old]
        for name in changed:
            log.info("stopping bus for reload", extra=kv(bus=name))
            await self._stop(name)
        for _, sup in self.supervised.values():
            sup.backoff = backoff
        for config in wanted.values():
            if config.name not in self.supervised:
                await self._start(config)
        removed = running - set(wanted)
        return len(changed) - len(removed), len(removed), len(set(wanted) - running)

    async def stop_all(self) -> None:
        for name in list(self.supervised):
            await self._stop(name)

    def all_supervised(self) -> list[Supervised]:
        return [sup for _, sup in self.supervised.values()]

    def statistics(self) -> dict[str, object]:
        return {
            name: {**sup.statistics(), "bus": self.instances[name].statistics()}
            if name in self.instances
            else sup.statistics()
            for name, (_, sup) in self.supervised.items()
        }


@attrs.define
class Gateway:
    config: Config
    load_config: Callable[[], Config]
    notifier: Notifier
    hub: Hub
    buses: Buses
    stopping: bool = False
    _root: trio.Nursery | None = None
    _reload_lock: trio.Lock = attrs.Factory(trio.Lock)
    ready: trio.Event = attrs.Factory(trio.Event)
    """Set once every component has started (when READY=1 goes to systemd)."""
    _stuck_reported: bool = False

    @classmethod
    def create(
        cls, config: Config, load_config: Callable[[], Config], notifier: Notifier
    ) -> Gateway:
        hub = Hub(config.hub.subscriber_buffer)
        return cls(config, load_config, notifier, hub, Buses(hub, backoff_of(config)))

    async def run(self, extras: Iterable[Extra] = ()) -> None:
        """Run until a signal stops it. Returns normally after a clean shutdown."""
        async with trio.open_nursery() as root:
            self._root = root
            await root.start(self._signals)
            await root.start(self.buses.run, self.config.buses)
            await root.start(self._watchdog)
            for extra in extras:
                await root.start(extra, self)
            await root.start(self._status)
            status = self.status_line()
            self.notifier.ready(status)
            self.ready.set()
            log.info("gateway ready: %s", status, extra=kv(name=self.config.gateway.name))

    # ---- signals, reload, shutdown ----------------------------------------------------------

    async def _signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                assert self._root is not None
                if signum == signal.SIGHUP:
                    if not self.stopping:
                        self._root.start_soon(self.reload)
                elif self.stopping:
                    if signum == signal.SIGINT:
                        log.warning("second interrupt: cancelling everything now")
                        self._root.cancel_scope.cancel()
                else:
                    self.stopping = True
                    self._root.start_soon(self.shutdown, signal.Signals(signum).name)

    async def shutdown(self, reason: str = "request") -> None:
        """Stop accepting work, let components finish within ``shutdown_timeout``, cancel."""
        assert self._root is not None
        self.stopping = True
        self.notifier.stopping()
        timeout = self.config.gateway.shutdown_timeout
        log.info("stopping (%s), up to %gs", reason, timeout)
        with trio.move_on_after(timeout) as scope:
            await self.buses.stop_all()
        if scope.cancelled_caught:
            log.warning("shutdown timeout of %gs reached: cancelling what is left", timeout)
        self._root.cancel_scope.cancel()

    async def reload(self) -> None:
        async with self._reload_lock:
            log.info("reloading configuration")
            try:
                new = self.load_config()
            except ConfigError as e:
                for line in e.lines():
                    log.error("reload rejected: %s", line)
                log.error("reload rejected: keeping the running configuration (fix and reload)")
                return
            self.notifier.reloading()
            logs.setup(new.logging.level)
            restarted, removed, added = await self.buses.apply(new.buses, backoff_of(new))
            self.config = new
            status = self.status_line()
            self.notifier.ready(status)
            log.info("reloaded", extra=kv(restarted=restarted, removed=removed, added=added))

    # ---- health ------------------------------------------------------------------------------

    async def _watchdog(self, *, task_status: trio.TaskStatus[None]) -> None:
        interval = self.notifier.watchdog_interval
        task_status.started()
        if interval is None:
            return
        grace = 2 * interval + 5.0
        expected = trio.current_time()
        while True:
            now = trio.current_time()
            if now - expected > interval:
                log.warning("event loop was blocked for %.1fs", now - expected)
            stuck = [s.name for s in self.buses.all_supervised() if s.stuck(grace)]
            if stuck:
                if not self._stuck_reported:
                    log.error("withholding watchdog ping: %s stuck", ", ".join(stuck))
                    self._stuck_reported = True
            else:
                self._stuck_reported = False
                self.notifier.watchdog()
            expected = trio.current_time() + interval
            await trio.sleep(interval)

    async def _status(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        last_count, last_time = self.hub.published, trio.current_time()
        while True:
            await trio.sleep(self.config.gateway.status_interval)
            now = trio.current_time()
            rate = (self.hub.published - last_count) / max(now - last_time, 1e-9)
            last_count, last_time = self.hub.published, now
            self.notifier.status(self.status_line(rate))

    def status_line(self, rate: float | None = None) -> str:
        sups = self.buses.all_supervised()
        up = sum(1 for s in sups if s.state is State.UP)
        text = f"{up} {'bus' if up == 1 else 'buses'} up, {len(sups) - up} down"
        if rate is not None:
            text += f", {rate:.0f} readings/s"
        return text

    def statistics(self) -> dict[str, object]:
        return {"hub": self.hub.statistics(), "buses": self.buses.statistics()}


def prepare_state_dir(config: Config, source: str) -> Config:
    """Create the state directory; an unusable one is a config error (exit 78)."""
    path = Path(config.gateway.state_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            source,
            [
                (
                    "gateway.state_dir",
                    f"{str(path)!r} is not a writable directory ({e.strerror}): create it for "
                    "the gateway's user, or use systemd's StateDirectory=",
                )
            ],
        ) from None
    return config
