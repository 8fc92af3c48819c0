"""The composition root: the whole process is this one nursery tree.

    gateway
    ├── signals                     SIGTERM/SIGINT -> graceful stop, SIGHUP -> reload; lives
    │                               until the tree below has ended, so a late signal is handled
    └── tree (root nursery)         READY=1 only after every component started
        ├── components              every long-running part, in start order (``specs``):
        │   ├── outbox              stage store: the SQLite outbox, fed from the hub (required;
        │   │                       with [cpi] only), subscribed before any producer starts
        │   ├── bus <name>...       stage producers: one Supervised per configured bus
        │   ├── devices             stage producers: the wss device plane (required)
        │   ├── cpi                 stage consumers: the forwarder, batches from the outbox
        │   ├── api                 stage api: the HTTPS management and command API
        │   └── commands            stage commands: the command router and its SQLite store
        │                           (with [api] or [cpi]: commands come from either)
        ├── watchdog                WATCHDOG=1 while the loop runs and no component is stuck
        ├── status                  STATUS= line every gateway.status_interval
        └── extras                  e.g. the demo's console; each gets the hub, nothing more

Components are started in the order ``specs`` lists them and stopped by stage: producers
first (buses, and the device plane, whose clients also publish), then the forwarder gets a
moment for the batch in flight, then the outbox commits everything the hub still holds and
closes, then the API, then the command router. Watchdog, STATUS line, reload, ``/readyz``
and ``/metrics`` read components only through ``gateway.core.component``'s model.

This module and the config loader are the only ones that import ``drivers``.
"""

from __future__ import annotations

import enum
import functools
import gc
import logging
import math
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import attrs
import trio

from drivers.base import Bus, BusConfig, BusContext, UnknownPoint, WriteError, WriteUncertain
from drivers.modbus.config import ModbusRtuBusConfig, ModbusTcpBusConfig
from drivers.modbus.planner import format_plan
from drivers.registry import KINDS
from gateway import localendpoint
from gateway.api import Api, ApiSection, LiveAccess
from gateway.commands import CommandLimits, CommandRouter
from gateway.config import EX_CONFIG, Config, ConfigError, restart_needed, state_dir_message
from gateway.core import logs
from gateway.core.backoff import Backoff
from gateway.core.commands import CommandRejected, ModbusTarget, OutcomeUnknown, Unavailable
from gateway.core.component import UP, Condition, Health, StartPolicy, StartupError, State
from gateway.core.configtypes import Duration, format_duration
from gateway.core.logs import kv
from gateway.core.reading import Reading, Value
from gateway.core.topics import DEVICE_NAMESPACE
from gateway.deviceauth import DevicePlaneSection
from gateway.deviceplane import DevicePlane, DevicePlaneStatistics
from gateway.forwarder import CpiSection, Forwarder, ForwarderStatistics
from gateway.hub import Hub, OverflowPolicy, Subscription, Watermark
from gateway.outbox import Outbox, OutboxError, OutboxStatistics
from gateway.sdnotify import Notifier
from gateway.supervisor import GatewayStatistics, Supervised, describe_error

log = logging.getLogger("gateway")

Extra = Callable[..., Awaitable[None]]
"""``async fn(hub, *, task_status)``: a task of the caller's (the demo's console)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stage(enum.IntEnum):
    """When a component stops, in this order; the reverse is roughly the start order."""

    PRODUCERS = 1
    """Buses and the device plane (its clients publish; they are closed with 1001): nothing
    new enters the hub after this stage."""
    CONSUMERS = 2
    """The forwarder finishes the batch in flight (``shutdown_grace``)."""
    STORE = 3
    """The outbox commits what the hub still holds, then closes."""
    CONNECTIONS = 4
    """Outgoing connections not covered above (none yet)."""
    API = 5
    """The management API: it answers until the end (``/readyz`` says the gateway stops)."""
    COMMANDS = 6
    """The command router, last: the API hands it commands until the API has stopped."""


@attrs.frozen
class ComponentSpec:
    """How to build one component; reload rebuilds it when ``config`` changes."""

    name: str
    kind: str
    stage: Stage
    config: object
    """What a reload compares: when it changed, the component is stopped and built anew."""
    build: Callable[[], Supervised] = attrs.field(eq=False)
    update: Callable[[Supervised], None] | None = attrs.field(default=None, eq=False)
    """Applies the rest of a reloaded config to the running component in place (the
    device plane's clients, limits and certificate): called when ``config`` is unchanged."""


def supervisor_backoff(config: Config) -> Backoff:
    return Backoff(config.supervisor.backoff_initial, config.supervisor.backoff_max)


@attrs.define
class Stores:
    """What components share across reloads: the open outbox (for the forwarder), the
    command router (for the API, the forwarder and the device plane) and the device plane
    (for the router and the API)."""

    outbox: Outbox | None = None
    watermark: Watermark | None = None
    """How far the outbox has committed what the hub published (device acks wait for it)."""


def specs(config: Config, hub: Hub, stores: Stores, gateway: Gateway) -> list[ComponentSpec]:
    """Every component of ``config`` in start order: the outbox first, so that it is
    subscribed before any reading is published; the command router before the device plane
    (which hands it acks) and the forwarder (commands in CPI's answers); the API last.
    ``gateway`` is how components find each other's running parts (the router, the device
    plane, the buses), always the current ones, also after a restart or a reload."""
    wanted: list[ComponentSpec] = []
    if config.cpi is not None:
        wanted.append(outbox_spec(config, hub, stores))
    if config.api is not None or config.cpi is not None:
        wanted.append(commands_spec(config, gateway))
    wanted.extend(bus_spec(bus, config, hub) for bus in config.buses)
    if config.device_plane is not None:
        wanted.append(device_plane_spec(config.device_plane, config, hub, stores, gateway))
    if config.cpi is not None:
        wanted.append(forwarder_spec(config.cpi, config, stores, gateway))
    if config.api is not None:
        wanted.append(api_spec(config.api, config, gateway))
    return wanted


LOSS_SHOWN = 60.0
"""Seconds the outbox shows degraded after it last lost readings."""

OUTBOX = "database"
"""The outbox component's name (kind ``outbox``): ``outbox database failed: ...``."""
CPI = "forwarder"
"""The forwarder's name (kind ``cpi``): ``cpi forwarder failed: ...``."""


class OutboxPart:
    """The outbox as a component: opens the database, feeds it from a hub subscription,
    and on ``drain`` commits everything the subscription still holds before it closes."""

    def __init__(self, config: Config, hub: Hub, stores: Stores) -> None:
        self.section = config.outbox
        self.path = config.outbox.path(config.gateway.state_dir)
        self.hub = hub
        self.stores = stores
        self.outbox: Outbox | None = None
        self._subscription: Subscription | None = None
        self._drained = trio.Event()
        self._lost_seen = 0
        self._losing_until = -math.inf

    def condition(self) -> Condition:
        """Degraded while readings are being lost (the hub's buffer overflowing, a full
        outbox, writes failing), and for ``LOSS_SHOWN`` seconds after: the STATUS line must
        not say all is well while data is discarded."""
        if self.outbox is None:
            return Condition(State.STARTING)
        stats = self.outbox.statistics()
        lost = stats.dropped_hub + stats.dropped_full + stats.rejected + stats.write_failed
        now = trio.current_time()
        if lost > self._lost_seen:
            self._lost_seen = lost
            self._losing_until = now + LOSS_SHOWN
        if now < self._losing_until:
            if stats.write_failed:
                why = "writes failing"
            elif stats.dropped_full or stats.rejected:
                why = "full"
            else:
                why = "disk too slow"
            return Condition(State.DEGRADED, f"losing readings ({why}; {lost} so far)")
        return UP

    def statistics(self) -> OutboxStatistics | None:
        return self.outbox.statistics() if self.outbox is not None else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            outbox = await Outbox.open(self.path, self.section)
        except OutboxError as e:
            # A missing directory, no permission, a file that is not an outbox: only a person
            # can fix it, so exit 78 (systemd does not restart), not 69 and a retry loop. (A
            # corrupt database does not land here: it is moved aside and a fresh one made.)
            raise StartupError(f"outbox: {e}", EX_CONFIG) from None
        try:
            self.outbox = self.stores.outbox = outbox
            self._subscription = self.hub.subscribe(
                OUTBOX, ["#"], maxlen=self.section.buffer, policy=OverflowPolicy.DROP_OLDEST
            )
            watermark = self.stores.watermark = Watermark(self.hub.published)
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(outbox.feed, self._subscription, watermark=watermark)
                )
                task_status.started()
            self._drained.set()  # the subscription was closed and all it held committed
            await trio.sleep_forever()
        finally:
            if self._subscription is not None:
                self._subscription.close()
            if self.stores.outbox is outbox:
                self.stores.outbox = self.stores.watermark = None
            self.outbox = None
            with trio.CancelScope(shield=True):
                await outbox.aclose()

    async def drain(self) -> None:
        if self._subscription is None:
            await trio.lowlevel.checkpoint()
            return
        self._subscription.close()
        await self._drained.wait()


class ForwarderPart:
    """The forwarder as a component; ``drain`` is its graceful stop (the batch in flight
    gets ``shutdown_grace``), after which it idles until the supervisor stops it."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self._finished = trio.Event()

    def condition(self) -> Condition:
        return self.forwarder.condition()

    def statistics(self) -> ForwarderStatistics:
        return self.forwarder.statistics()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.forwarder.run(task_status=task_status)
        finally:
            self._finished.set()
        await trio.sleep_forever()

    async def drain(self) -> None:
        self.forwarder.stop()
        await self._finished.wait()


def outbox_spec(config: Config, hub: Hub, stores: Stores) -> ComponentSpec:
    def build() -> Supervised:
        return Supervised(
            OUTBOX,
            lambda progress: OutboxPart(config, hub, stores),
            supervisor_backoff(config),
            kind="outbox",
            policy=StartPolicy.REQUIRED,
            healthy_after=config.supervisor.healthy_after,
        )

    key = (config.outbox, config.gateway.state_dir)
    return ComponentSpec(OUTBOX, "outbox", Stage.STORE, key, build)


def forwarder_spec(
    section: CpiSection, config: Config, stores: Stores, gateway: Gateway
) -> ComponentSpec:
    def make(progress: Callable[[], None]) -> ForwarderPart:
        outbox = stores.outbox
        if outbox is None:
            raise RuntimeError("the outbox is not open (see its errors above)")
        # The batch in flight gets at most half the gateway's whole shutdown time.
        grace = min(section.shutdown_grace, config.gateway.shutdown_timeout / 2)
        bounded = attrs.evolve(section, shutdown_grace=Duration(grace))
        return ForwarderPart(
            Forwarder(
                bounded,
                outbox,
                gateway=config.gateway.name,
                progress=progress,
                command_router=gateway.route_cpi_commands,
            )
        )

    def build() -> Supervised:
        return Supervised(
            CPI,
            make,
            supervisor_backoff(config),
            kind="cpi",
            healthy_after=config.supervisor.healthy_after,
        )

    # The outbox's settings are part of the key: a reload that reopens the outbox restarts
    # the forwarder too (first, by stage), so it never holds a closed one; the same for the
    # command router's database, where CPI's commands go.
    key = (section, config.gateway.name, config.outbox, config.gateway.state_dir)
    return ComponentSpec(CPI, "cpi", Stage.CONSUMERS, key, build)


def bus_spec(bus: BusConfig, config: Config, hub: Hub) -> ComponentSpec:
    kind = KINDS[bus.kind]

    def build() -> Supervised:
        return Supervised(
            bus.name,
            lambda progress: kind.create(bus, BusContext(hub.publish, progress)),
            supervisor_backoff(config),
            kind="bus",
            healthy_after=config.supervisor.healthy_after,
            stall_after=bus.stall_after(),
        )

    return ComponentSpec(bus.name, "bus", Stage.PRODUCERS, bus, build)


def device_plane_spec(
    section: DevicePlaneSection, config: Config, hub: Hub, stores: Stores, gateway: Gateway
) -> ComponentSpec:
    """The wss server: required (a port in use ends the process with 69, for systemd to
    retry), reconfigured in place on reload unless its listener changed."""

    def make(progress: Callable[[], None]) -> DevicePlane:
        directory = localendpoint.directory() if section.local_access else None
        return DevicePlane(
            section,
            hub,
            shutdown_timeout=config.gateway.shutdown_timeout / 2,
            local_endpoint_dir=directory,
            watermark=lambda: stores.watermark,
            commands=gateway.running_router,
        )

    def build() -> Supervised:
        return Supervised(
            DEVICE_NAMESPACE,
            make,
            supervisor_backoff(config),
            kind="device plane",
            policy=StartPolicy.REQUIRED,
            healthy_after=config.supervisor.healthy_after,
        )

    def update(component: Supervised) -> None:
        component.make = make  # a restart after a failure builds from the new section
        if isinstance(component.part, DevicePlane):
            component.part.reconfigure(section)

    return ComponentSpec(
        DEVICE_NAMESPACE,
        "device plane",
        Stage.PRODUCERS,
        section.restart_key(),
        build,
        update,
    )


COMMANDS = "commands"
"""The command router's name (kind ``commands``)."""
COMMANDS_FILE = "commands.sqlite"
"""The router's database, in ``gateway.state_dir``."""
API = "api"


def command_limits(config: Config) -> CommandLimits:
    api = config.api
    if api is None:
        return CommandLimits()
    return CommandLimits(
        default_timeout=api.command_timeout,
        max_timeout=api.max_command_timeout,
        default_expiry=api.command_expiry,
    )


class BusTargets:
    """The router's way to the buses (``ModbusTargets``): checks against the configured
    points, writes and reads through the running bus. ``modbus:<bus>/<device>/<point>``
    names any configured bus; each driver says what it accepts (a sim bus its setpoints,
    line sensors nothing)."""

    def __init__(self, config: Callable[[], Config], components: Components) -> None:
        self._config = config
        self._components = components

    def _bus_config(self, target: ModbusTarget) -> BusConfig:
        for bus in self._config().buses:
            if bus.name == target.bus:
                return bus
        names = ", ".join(b.name for b in self._config().buses) or "none"
        raise CommandRejected(
            404, "unknown-target", f"{target}: no bus {target.bus!r} (configured: {names})"
        )

    def check_write(self, target: ModbusTarget, value: Value) -> Value:
        bus = self._bus_config(target)
        # The drivers' messages name the bus, device and point already.
        try:
            return bus.check_write(f"{target.device}/{target.point}", value)
        except UnknownPoint as e:
            raise CommandRejected(404, "unknown-target", str(e)) from None
        except WriteError as e:
            raise CommandRejected(422, "not-writable", str(e)) from None

    def _running(self, target: ModbusTarget) -> Bus:
        self._bus_config(target)
        component = self._components.get(target.bus)
        part = component.part if component is not None else None
        health = component.health() if component is not None else None
        if part is None or health is None or health.state is State.DOWN:
            why = (health.reason or health.last_error) if health is not None else None
            raise Unavailable(
                f"bus {target.bus} is down"
                + (f" ({why})" if why else "")
                + ": nothing was written; send the command again once it is up"
            )
        return part  # type: ignore[return-value]

    async def write(self, target: ModbusTarget, value: Value) -> None:
        try:
            await self._running(target).write(f"{target.device}/{target.point}", value)
        except WriteUncertain as e:
            raise OutcomeUnknown(str(e)) from None

    async def read(self, target: ModbusTarget) -> Value:
        return await self._running(target).read(f"{target.device}/{target.point}")


def commands_spec(config: Config, gateway: Gateway) -> ComponentSpec:
    """The command router: supervised (a broken database is retried, and until it opens the
    API answers 503 to commands), one database per state directory. It checks and writes
    against the gateway's current config and running buses, so a reload that adds a bus or
    changes a point's range applies to the next command."""
    path = Path(config.gateway.state_dir) / COMMANDS_FILE

    def make(progress: Callable[[], None]) -> CommandRouter:
        return CommandRouter(
            path,
            BusTargets(lambda: gateway.config, gateway.components),
            gateway.device_plane,
            limits=command_limits(config),
        )

    def build() -> Supervised:
        return Supervised(
            COMMANDS,
            make,
            supervisor_backoff(config),
            kind="commands",
            healthy_after=config.supervisor.healthy_after,
        )

    def update(component: Supervised) -> None:
        component.make = make  # a restart after a failure takes the reloaded limits
        if isinstance(component.part, CommandRouter):
            component.part.limits = command_limits(config)

    return ComponentSpec(COMMANDS, "commands", Stage.COMMANDS, str(path), build, update)


def api_spec(section: ApiSection, config: Config, services: Gateway) -> ComponentSpec:
    """The HTTPS API: required (a port in use ends the process, as for the device plane);
    users, limits and a renewed certificate apply in place on reload, a new address, port
    or client CA restarts it."""

    def make(progress: Callable[[], None]) -> Api:
        return Api(section, services)

    def build() -> Supervised:
        return Supervised(
            API,
            make,
            supervisor_backoff(config),
            kind="api",
            policy=StartPolicy.REQUIRED,
            healthy_after=config.supervisor.healthy_after,
        )

    def update(component: Supervised) -> None:
        component.make = make
        if isinstance(component.part, Api):
            component.part.reconfigure(section)

    return ComponentSpec(API, "api", Stage.API, section.restart_key(), build, update)


@attrs.define
class _Running:
    spec: ComponentSpec
    component: Supervised
    done: trio.Event = attrs.Factory(trio.Event)


class Components:
    """The running components by name. ``apply`` (reload) stops and starts only those whose
    spec changed; ``stop`` is idempotent and safe to call from several tasks at once."""

    def __init__(self) -> None:
        self._running: dict[str, _Running] = {}
        self._nursery: trio.Nursery | None = None

    async def run(
        self,
        wanted: Sequence[ComponentSpec],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for spec in wanted:
                await self.start(spec)
            task_status.started()
            await trio.sleep_forever()

    async def start(self, spec: ComponentSpec) -> None:
        """Start one more component (reload, tests)."""
        assert self._nursery is not None
        running = _Running(spec, spec.build())
        self._running[spec.name] = running

        async def supervise(*, task_status: trio.TaskStatus[None]) -> None:
            try:
                await running.component.run(task_status=task_status)
            finally:
                running.done.set()
                if self._running.get(spec.name) is running:
                    del self._running[spec.name]

        await self._nursery.start(supervise)

    async def stop(self, name: str) -> None:
        """Stop one component and wait until it has ended."""
        running = self._running.get(name)
        if running is None:
            await trio.lowlevel.checkpoint()
            return
        running.component.stop()
        await running.done.wait()

    async def stop_stage(self, stage: Stage) -> None:
        """Let the stage's components finish what they accepted, then stop them together."""
        members = [r for r in self._running.values() if r.spec.stage is stage]
        async with trio.open_nursery() as nursery:
            for running in members:

                async def finish(r: _Running = running) -> None:
                    await r.component.drain()
                    await self.stop(r.spec.name)

                nursery.start_soon(finish)

    async def stop_all(self) -> None:
        for stage in Stage:
            await self.stop_stage(stage)

    async def apply(self, wanted: Sequence[ComponentSpec]) -> tuple[int, int, int]:
        """Make the running components match ``wanted``; returns (restarted, removed, added)."""
        by_name = {spec.name: spec for spec in wanted}
        before = set(self._running)
        changed = [n for n, r in self._running.items() if by_name.get(n) != r.spec]
        previous = {n: self._running[n].spec for n in changed}
        for name in sorted(changed, key=lambda n: self._running[n].spec.stage):
            log.info("stopping %s for reload", name, extra=kv(component=name))
            await self.stop(name)
        for spec in wanted:
            running = self._running.get(spec.name)
            if running is None:
                try:
                    await self.start(spec)
                except StartupError as e:
                    # A required part that cannot start with the new config (its new port is
                    # taken, say) must not end a gateway that was running: back to the
                    # settings it ran with, and say so.
                    old = previous.get(spec.name)
                    if old is None:
                        log.error(
                            "reload: %s; it is not running: fix the config and reload again",
                            e,
                            extra=kv(component=spec.name),
                        )
                        continue
                    log.error(
                        "reload: %s; %s goes on with the previous address and port, and the "
                        "rest of the new config: fix the config and reload again",
                        e,
                        spec.name,
                        extra=kv(component=spec.name),
                    )
                    try:
                        await self.start(old)
                    except StartupError as again:
                        log.error(
                            "reload: %s; with the previous settings too: it is not running: "
                            "fix the config and reload again",
                            again,
                            extra=kv(component=spec.name),
                        )
                        continue
                    fallback = self._running.get(spec.name)
                    if fallback is not None and spec.update is not None:
                        # Users, clients, limits of the new config apply all the same: a
                        # revocation in this reload must not be undone by the fallback. The
                        # old way of building stays, for a restart after a failure.
                        make = fallback.component.make
                        spec.update(fallback.component)
                        fallback.component.make = make
            elif spec.update is not None:
                spec.update(running.component)
                running.spec = spec
        removed = before - set(by_name)
        return len(changed) - len(removed), len(removed), len(set(by_name) - before)

    def all(self) -> list[Supervised]:
        return [r.component for r in self._running.values()]

    def get(self, name: str) -> Supervised | None:
        running = self._running.get(name)
        return running.component if running else None


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RELOADING = "reloading"
    STOPPING = "stopping"


@attrs.define
class Gateway:
    config: Config
    load_config: Callable[[], Config]
    notifier: Notifier
    hub: Hub
    components: Components = attrs.Factory(Components)
    stores: Stores = attrs.Factory(Stores)
    phase: Phase = Phase.STARTING
    ready: trio.Event = attrs.Factory(trio.Event)
    """Set once every component has started (when READY=1 goes to systemd)."""
    stopped_cleanly: bool = False
    settle: bool = False
    """Call ``settle_memory`` once ready (the daemon; not tests running many gateways in one
    process, where frozen objects would pile up)."""
    _tree: trio.Nursery | None = None
    _reload_scope: trio.CancelScope | None = None
    _reload_done: trio.Event | None = None
    _reload_again: bool = False
    _stuck_reported: bool = False

    @classmethod
    def create(
        cls, config: Config, load_config: Callable[[], Config], notifier: Notifier
    ) -> Gateway:
        return cls(config, load_config, notifier, Hub(config.hub.subscriber_buffer))

    @property
    def stopping(self) -> bool:
        return self.phase is Phase.STOPPING

    def specs(self, config: Config) -> list[ComponentSpec]:
        return specs(config, self.hub, self.stores, self)

    # ---- what the API reads (ApiServices) ----------------------------------------------------

    @property
    def gateway_name(self) -> str:
        return self.config.gateway.name

    def latest(self) -> Sequence[Reading]:
        return self.hub.latest(["#"])

    def device_plane(self) -> DevicePlane | None:
        component = self.components.get(DEVICE_NAMESPACE)
        plane = component.part if component is not None else None
        return plane if isinstance(plane, DevicePlane) else None

    def running_router(self) -> CommandRouter | None:
        """The command router's current part (None between attempts): where device acks
        and CPI's commands go, also while the gateway stops."""
        component = self.components.get(COMMANDS)
        part = component.part if component is not None else None
        return part if isinstance(part, CommandRouter) else None

    def router(self) -> CommandRouter | None:
        """The command router for the API: None while the gateway stops (the API then
        answers 503 to new commands)."""
        return None if self.stopping else self.running_router()

    async def route_cpi_commands(self, commands: Sequence[object]) -> None:
        """The forwarder's hook for the commands in CPI's answer to a batch."""
        router = self.running_router()
        if router is None:
            await trio.lowlevel.checkpoint()
            log.error(
                "%d command(s) in CPI's answer not executed: the command router is not "
                "running (see its errors above); CPI must send them again",
                len(commands),
            )
            return
        await router.from_cpi(commands)

    def live(self, origin: str | None, user: str | None = None) -> LiveAccess | None:
        """A short-lived token for the status page's wss subscription; None without a
        ``[device_plane]``. Raises ``Unavailable`` while it is configured but not running
        (restarting, or the gateway stops): the page tries again later."""
        plane = self.device_plane()
        section = self.config.device_plane
        if section is None:
            return None
        if plane is None or self.stopping:
            raise Unavailable("the device plane is not running now (see /readyz): try again")
        port = plane.statistics().port or section.port
        try:
            token = plane.viewer_token(origin, owner=user)
        except ValueError:  # a malformed Origin: no browser page sends one
            return None
        return LiveAccess(port=port, tls=not section.plain, token=token)

    async def run(self, extras: Iterable[Extra] = (), *, stop_requested: bool = False) -> None:
        """Run until a signal stops it; returns after a clean shutdown. ``stop_requested``: a
        SIGTERM came before the loop could handle signals (start, then stop at once). Raises
        ``StartupError`` when a required component cannot start."""
        try:
            with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
                async with trio.open_nursery() as outer:
                    outer.start_soon(self._signals, signals)
                    try:
                        if stop_requested:
                            self._begin_shutdown("SIGTERM")
                        await self._run_tree(list(extras))
                    finally:
                        outer.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            startup, rest = group.split(StartupError)
            if startup is not None and rest is None:
                raise _first(startup) from None
            raise
        self.stopped_cleanly = True

    async def _run_tree(self, extras: list[Extra]) -> None:
        async with trio.open_nursery() as tree:
            self._tree = tree
            if self.stopping:
                tree.start_soon(self.shutdown, "SIGTERM")
            # Extras first: the demo's CPI stand-in must listen before the forwarder sends.
            for extra in extras:
                await tree.start(extra, self.hub)
            await tree.start(self.components.run, self.specs(self.config))
            await tree.start(self._watchdog)
            await tree.start(self._status)
            if self.stopping:
                return
            self.phase = Phase.RUNNING
            if self.settle:
                settle_memory()
            status = self.status_line()
            self.notifier.ready(status)
            self.ready.set()
            log.info("gateway ready: %s", status, extra=kv(name=self.config.gateway.name))

    # ---- signals, reload, shutdown ----------------------------------------------------------

    async def _signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                self._request_reload()
            elif not self.stopping:
                self._begin_shutdown(name)
            elif signum == signal.SIGINT:
                log.warning("second interrupt: cancelling everything now")
                if self._tree is not None:
                    self._tree.cancel_scope.cancel()
            else:
                log.info("%s while stopping: already stopping", name)

    def _begin_shutdown(self, reason: str) -> None:
        self.phase = Phase.STOPPING
        self.notifier.stopping()
        if self._reload_scope is not None:
            self._reload_scope.cancel()
        if self._tree is not None:
            self._tree.start_soon(self.shutdown, reason)

    async def shutdown(self, reason: str = "request") -> None:
        """Stop the components stage by stage within ``shutdown_timeout``, then cancel."""
        assert self._tree is not None
        if self.phase is not Phase.STOPPING:
            self.phase = Phase.STOPPING
            self.notifier.stopping()
        if self._reload_scope is not None:
            self._reload_scope.cancel()
        timeout = self.config.gateway.shutdown_timeout
        log.info("stopping (%s), up to %gs", reason, timeout)
        with trio.move_on_after(timeout) as scope:
            if self._reload_done is not None:
                await self._reload_done.wait()  # a cancelled reload ends before we stop
            await self.components.stop_all()
        if scope.cancelled_caught:
            log.warning("shutdown timeout of %gs reached: cancelling what is left", timeout)
        self._tree.cancel_scope.cancel()

    def _request_reload(self) -> None:
        if self.stopping:
            log.info("SIGHUP while stopping: reload ignored")
        elif self.phase is Phase.STARTING:
            log.warning("SIGHUP during start-up: reload ignored; send it again once ready")
        elif self._reload_done is not None:
            self._reload_again = True  # one more pass after the running one
        elif self._tree is not None:
            self._reload_done = trio.Event()
            self._tree.start_soon(self._reload_task)

    async def _reload_task(self) -> None:
        assert self._reload_done is not None
        try:
            with trio.CancelScope() as self._reload_scope:
                again = True
                while again and not self.stopping:
                    self._reload_again = False
                    await self.reload()
                    again = self._reload_again
        finally:
            self._reload_scope = None
            self._reload_done.set()
            self._reload_done = None

    async def reload(self) -> None:
        """Load the config again (file I/O in a thread) and apply it; an invalid one is
        rejected and the running config stays. Never overlaps a shutdown."""
        log.info("reloading configuration")
        previous = self.phase
        self.phase = Phase.RELOADING
        try:
            try:
                new = await trio.to_thread.run_sync(self.load_config, abandon_on_cancel=True)
            except ConfigError as e:
                for line in e.lines():
                    log.error("reload rejected: %s", line)
                log.error("reload rejected: keeping the running configuration (fix and reload)")
                return
            except Exception as e:  # a defect in the loader must not end a running gateway
                log.critical(
                    "reload failed: %s; keeping the running configuration (please report this)",
                    describe_error(e),
                    exc_info=e,
                )
                return
            if self.stopping:
                return
            self.notifier.reloading()
            for key in restart_needed(self.config, new):
                log.warning(
                    "reload: %s changed; it takes effect only after a restart "
                    "(systemctl restart edge-gateway)",
                    key,
                    extra=kv(key=key),
                )
            logs.setup(new.logging.level)
            restarted, removed, added = await self.components.apply(self.specs(new))
            for component in self.components.all():
                component.backoff = supervisor_backoff(new)
                component.healthy_after = new.supervisor.healthy_after
            # A removed API user's status pages lose their live view too, not only their
            # logins, whatever else this reload changed (the API's port, [api] removed).
            plane = self.device_plane()
            if plane is not None:
                plane.revoke_viewers({u.name for u in new.api.users} if new.api else set())
            self.config = new
            if self.stopping:
                return
            status = self.status_line()
            self.notifier.ready(status)
            log.info("reloaded", extra=kv(restarted=restarted, removed=removed, added=added))
        finally:
            if self.phase is Phase.RELOADING:
                self.phase = previous

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
            stuck = [f"{c.kind} {c.name}" for c in self.components.all() if c.stuck(grace)]
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
            if not self.stopping:
                self.notifier.status(self.status_line(rate))

    def health(self) -> dict[str, Health]:
        return {c.name: c.health() for c in self.components.all()}

    def status_line(self, rate: float | None = None) -> str:
        groups: dict[str, list[tuple[str, Health]]] = {}
        for component in self.components.all():
            if component.kind == "cpi":
                continue  # said below, with when CPI last answered
            groups.setdefault(component.kind, []).append((component.name, component.health()))
        text = ", ".join(status_of(kind, members) for kind, members in groups.items())
        text = text or "no components"
        clients = [
            stats.part.connections
            for stats in (c.statistics() for c in self.components.all())
            if isinstance(stats.part, DevicePlaneStatistics)
        ]
        if clients:
            text += f", {sum(clients)} wss client{'' if sum(clients) == 1 else 's'}"
        forwarder = self.components.get(CPI)
        if forwarder is not None:
            text += f", {cpi_status(forwarder.health(), forwarder.statistics().part)}"
        outbox = self.components.get(OUTBOX)
        stats = outbox.statistics().part if outbox is not None else None
        if isinstance(stats, OutboxStatistics):
            text += f", backlog {stats.backlog_readings}"
            if stats.dead_letters:
                text += f", {stats.dead_letters} dead letters"
        if rate is not None:
            text += f", {rate:.0f} readings/s"
        return text

    def statistics(self) -> GatewayStatistics:
        return GatewayStatistics(
            self.hub.statistics(), tuple(c.statistics() for c in self.components.all())
        )


PLURALS = {"bus": "buses", "cpi": "cpi", "commands": "commands", "api": "api"}
SINGLETONS = {"outbox", "device plane", "cpi", "api", "commands"}
"""Kinds of which a gateway has one: ``device plane up`` says all there is."""
REASONS_SHOWN = 3
REASON_LENGTH = 100


def status_of(kind: str, members: list[tuple[str, Health]]) -> str:
    """``2 buses up, 1 degraded (plc: meter not answering), 1 down (line-1: /dev/ttyUSB9
    missing)``: the state counts of one kind, with each unhealthy member's reason."""
    if kind in SINGLETONS and len(members) == 1 and members[0][1].state is State.UP:
        return f"{kind} up"
    by_state: dict[State, list[tuple[str, Health]]] = {s: [] for s in State}
    for name, health in members:
        by_state[health.state].append((name, health))
    up = len(by_state[State.UP])
    parts = [f"{up} {PLURALS.get(kind, kind + 's') if up != 1 else kind} up"]
    for state in (State.DEGRADED, State.STARTING, State.DOWN):
        unhealthy = by_state[state]
        if not unhealthy and state is not State.DOWN:
            continue
        part = f"{len(unhealthy)} {state.value}"
        reasons = [f"{name}: {_short(h.reason)}" for name, h in unhealthy if h.reason]
        if reasons:
            more = len(reasons) - REASONS_SHOWN
            shown = "; ".join(reasons[:REASONS_SHOWN]) + (f"; +{more} more" if more > 0 else "")
            part += f" ({shown})"
        parts.append(part)
    return ", ".join(parts)


def cpi_status(health: Health, stats: object, now: float | None = None) -> str:
    """``CPI ok 2s ago``, ``CPI failing 4min (503)``, ``CPI not reached yet`` or, while the
    forwarder is down, ``CPI down (<reason>)``."""
    if health.state is State.DEGRADED:
        return f"CPI {_short(health.reason)}"
    if health.state is not State.UP or not isinstance(stats, ForwarderStatistics):
        return f"CPI {health.state.value}" + (
            f" ({_short(health.reason)})" if health.reason else ""
        )
    if stats.last_success is None:
        return "CPI not reached yet"
    ago = max(0, round((time.time() if now is None else now) - stats.last_success))
    return f"CPI ok {format_duration(ago) if ago else 'just now'}" + (" ago" if ago else "")


def _short(reason: str | None) -> str:
    """One line of at most ``REASON_LENGTH`` characters; the middle goes, since both ends
    matter (``/dev/serial/by-id/usb-FTDI_..._A50285BI-if00-port0 missing``)."""
    text = " ".join((reason or "").split())
    if len(text) <= REASON_LENGTH:
        return text
    keep = (REASON_LENGTH - 3) // 2
    return text[:keep] + "..." + text[-keep:]


GC_THRESHOLD = 10_000
"""Container allocations between young-generation collections (CPython's default: 700)."""


def settle_memory() -> None:
    """Once started: keep the cyclic garbage collector off what start-up made.

    Modules, config, drivers and the tree are moved out of its reach (``gc.freeze``), so a
    full collection scans only what came since; and it runs its young-generation passes less
    often. Each pass stops the event loop: with the defaults they put the device plane's p99
    latency at several times its p50 (``bench fanout``)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, middle, old)


def _first(group: BaseExceptionGroup[StartupError]) -> StartupError:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, StartupError)
    return exc


def request_plan(config: Config) -> list[str]:
    """The read requests of every Modbus bus, as ``check-config --plan`` prints them: a
    heading per bus, then ``drivers.modbus.planner.format_plan``'s lines indented."""
    lines: list[str] = []
    for bus in config.buses:
        if isinstance(bus, ModbusRtuBusConfig | ModbusTcpBusConfig):
            lines.append(f"request plan of bus {bus.name} ({bus.kind}), addresses 0-based:")
            lines.extend(f"  {line}" for line in format_plan(bus.name, bus.devices))
    if not lines:
        lines.append("request plan: no Modbus buses")
    return lines


def prepare_state_dir(config: Config, source: str) -> Config:
    """Create the state directory; an unusable one is a config error (exit 78)."""
    path = Path(config.gateway.state_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(
            source, [("gateway.state_dir", state_dir_message(str(path), reason))]
        ) from None
    return config
