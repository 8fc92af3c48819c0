"""A Modbus bus: per-device poll schedules over one shared ``Link``; readings and writes.

Each device has its own task with a drift-free schedule (next deadline = previous deadline +
interval; missed ticks skipped and counted as overruns). A device that times out (or answers
in another protocol) goes into its own backoff (``gateway.core.backoff``, the link's policy)
and is probed at that pace, so a dead slave costs the other devices at most one timeout per
probe, and a device that comes back is read again within ``backoff_max``. The link's lock
keeps one transaction at a time on the line.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Literal

import attrs
import trio

from drivers.base import BusContext, WriteError, WriteUncertain
from drivers.modbus import datatypes
from drivers.modbus.codec import (
    FrameError,
    ModbusExceptionResponse,
    NotModbusError,
    Request,
    Response,
)
from drivers.modbus.config import ModbusDeviceConfig, ModbusPointConfig, find_point
from drivers.modbus.link import Disconnected, Link, LinkStatistics
from drivers.modbus.planner import PlannedRead, plan_device
from gateway.core.component import UP, Condition, State
from gateway.core.logs import kv
from gateway.core.reading import Quality, Reading, Value

log = logging.getLogger("drivers.modbus")


@attrs.frozen
class DeviceStatistics:
    polls: int
    requests: int
    responses: int
    timeouts: int
    crc_errors: int
    not_modbus: int
    exceptions: int
    disconnected: int
    overruns: int
    last_error: str | None
    last_success: float | None
    latency_last_ms: float
    latency_max_ms: float
    latency_avg_ms: float | None
    writes: int
    write_errors: int


@attrs.frozen
class ModbusBusStatistics:
    link: LinkStatistics
    devices: Mapping[str, DeviceStatistics]


class DeviceStats:
    """A device's counters as the poller updates them; ``snapshot()`` is the frozen value."""

    def __init__(self) -> None:
        self.polls = 0
        self.requests = 0
        self.responses = 0
        self.timeouts = 0
        self.crc_errors = 0
        self.not_modbus = 0
        self.exceptions = 0
        self.disconnected = 0
        self.overruns = 0
        self.last_error: str | None = None
        self.last_success: float | None = None
        self.latency_last = 0.0
        self.latency_max = 0.0
        self.latency_total = 0.0
        self.writes = 0
        self.write_errors = 0

    def snapshot(self) -> DeviceStatistics:
        return DeviceStatistics(
            polls=self.polls,
            requests=self.requests,
            responses=self.responses,
            timeouts=self.timeouts,
            crc_errors=self.crc_errors,
            not_modbus=self.not_modbus,
            exceptions=self.exceptions,
            disconnected=self.disconnected,
            overruns=self.overruns,
            last_error=self.last_error,
            last_success=self.last_success,
            latency_last_ms=round(self.latency_last * 1000, 3),
            latency_max_ms=round(self.latency_max * 1000, 3),
            latency_avg_ms=round(self.latency_total / self.responses * 1000, 3)
            if self.responses
            else None,
            writes=self.writes,
            write_errors=self.write_errors,
        )


class Device:
    """Poll state of one slave: its plan, filters, stats and backoff."""

    def __init__(self, bus: str, config: ModbusDeviceConfig) -> None:
        self.config = config
        self.plan: tuple[PlannedRead, ...] = plan_device(config)
        self.topics = {p.name: f"{bus}/{config.name}/{p.name}" for p in config.points}
        self.filters = {p.name: datatypes.ReportFilter(p) for p in config.points}
        self.points: dict[str, ModbusPointConfig] = {p.name: p for p in config.points}
        self.stats = DeviceStats()
        self.failures = 0  # consecutive timeouts or foreign answers
        self.problem: str | None = None  # "not answering", "not Modbus": for condition()
        self.backoff_until = 0.0
        self.logged_errors: frozenset[str] = frozenset()  # what the journal last heard
        self.polled = False  # the first poll cycle has ended (answered or not)


class ModbusBus:
    """Shared by the RTU and TCP buses; they differ only in the ``Link`` they build."""

    def __init__(
        self,
        name: str,
        devices: tuple[ModbusDeviceConfig, ...],
        context: BusContext,
        link: Link,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """A device that stops answering backs off with the link's ``backoff`` (the bus
        config's ``backoff_initial`` .. ``backoff_max``), as the link's reconnects do."""
        self.name = name
        self.context = context
        self.link = link
        self.devices: dict[str, Device] = {d.name: Device(name, d) for d in devices}
        self._device_configs = devices
        self._wall_clock = wall_clock
        self._rng = random.Random()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Started at once: the first connection attempt (up to ``connect_timeout`` for a
        PLC that does not answer) runs in the background, so no bus holds back the start of
        the gateway or of the next bus; the condition says starting meanwhile."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._connect_then_poll, nursery)
            task_status.started()

    async def _connect_then_poll(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.link.run)  # returns after the first attempt, good or not
        for device in self.devices.values():
            nursery.start_soon(self._poll_device, device)

    # ---- polling --------------------------------------------------------------------------

    async def _poll_device(self, device: Device) -> None:
        interval = device.config.interval
        deadline = trio.current_time()
        while True:
            now = trio.current_time()
            if now >= device.backoff_until:
                await self._poll_once(device)
            self.context.progress()
            deadline += interval
            now = trio.current_time()
            if now > deadline:  # a slow cycle: skip the missed ticks, never bunch them up
                missed = math.floor((now - deadline) / interval) + 1
                device.stats.overruns += missed
                deadline += missed * interval
            await trio.sleep_until(max(deadline, device.backoff_until))
            if device.backoff_until > deadline:
                deadline = device.backoff_until

    async def _poll_once(self, device: Device) -> None:
        errors: dict[str, list[str]] = {}  # reason -> points, for the journal
        if await self._poll_reads(device, errors):
            self._log_errors(device, errors)
        device.polled = True

    def _log_errors(self, device: Device, errors: dict[str, list[str]]) -> None:
        """One warning when a device's exception/CRC errors change, one line when they clear:
        the journal shows each problem once, not once per poll."""
        reasons = frozenset(errors)
        if reasons == device.logged_errors:
            return
        where = f"{self.name}/{device.config.name}"
        fields = kv(bus=self.name, device=device.config.name, unit=device.config.unit_id)
        for reason in sorted(reasons - device.logged_errors):
            log.warning("%s: %s on %s", where, reason, ", ".join(errors[reason]), extra=fields)
        if not reasons:
            log.info("%s: errors cleared", where, extra=fields)
        device.logged_errors = reasons

    async def _poll_reads(self, device: Device, errors: dict[str, list[str]]) -> bool:
        """One poll cycle; False when a timeout or disconnect cut it short."""
        stats = device.stats
        stats.polls += 1
        unit = device.config.unit_id
        for read in device.plan:
            request = Request.read(read.table, unit, read.address, read.count)
            try:
                response = await self._transact(device, request)
            except TimeoutError:
                stats.timeouts += 1
                self._device_failed(device, "timeout", "not answering")
                self._publish_bad(device, device.config.points, "timeout")
                return False  # the rest of this cycle would time out too
            except NotModbusError as e:
                stats.not_modbus += 1
                self._device_failed(device, str(e), "not Modbus")
                self._publish_bad(device, device.config.points, "not modbus")
                return False  # whatever answers there is no Modbus device
            except Disconnected:
                stats.disconnected += 1
                stats.last_error = "disconnected"
                self._publish_bad(device, device.config.points, "disconnected")
                return False
            except ModbusExceptionResponse as e:
                stats.exceptions += 1
                stats.last_error = e.reason
                self._publish_bad(device, [p.point for p in read.points], e.reason)
                errors.setdefault(e.reason, []).extend(p.point.name for p in read.points)
                continue
            except FrameError as e:
                if e.reason == "bad response":  # TCP: the device itself answers wrongly
                    device.problem = "bad response"
                stats.crc_errors += 1
                stats.last_error = f"{e.reason}: {e}"
                self._publish_bad(device, [p.point for p in read.points], e.reason)
                errors.setdefault(f"{e.reason} ({e})", []).extend(p.point.name for p in read.points)
                continue
            self._device_ok(device)
            self._publish_read(device, read, response)
        return True

    async def _transact(self, device: Device, request: Request) -> Response:
        stats = device.stats
        stats.requests += 1
        started = trio.current_time()
        response = await self.link.transact(request)
        latency = trio.current_time() - started
        stats.responses += 1
        stats.latency_last = latency
        stats.latency_max = max(stats.latency_max, latency)
        stats.latency_total += latency
        return response

    def _device_failed(self, device: Device, reason: str, problem: str) -> None:
        """Back off from a device that does not answer (``problem`` = "not answering") or
        answers in another protocol ("not Modbus"); ``reason`` goes to the journal once."""
        device.failures += 1
        device.problem = problem
        device.stats.last_error = reason
        delay = self.link.backoff.delay(device.failures, self._rng)
        device.backoff_until = trio.current_time() + delay
        if device.failures == 1:
            fields = kv(bus=self.name, device=device.config.name, unit=device.config.unit_id)
            where = f"{self.name}/{device.config.name}"
            if problem == "not answering":
                log.warning(
                    "%s not answering (%s): probing with backoff", where, reason, extra=fields
                )
            else:
                log.warning("%s: %s; probing with backoff", where, reason, extra=fields)

    def _device_ok(self, device: Device) -> None:
        if device.failures:
            log.info(
                "%s/%s answering again",
                self.name,
                device.config.name,
                extra=kv(bus=self.name, device=device.config.name),
            )
        device.failures = 0
        device.problem = None
        device.backoff_until = 0.0
        device.stats.last_success = self._wall_clock()

    def _publish_read(self, device: Device, read: PlannedRead, response: Response) -> None:
        device.polled = True
        now = self._wall_clock()
        for placed in read.points:
            point = placed.point
            if point.is_bit_table:
                value: Value = datatypes.decode_bit(point, response.bits[placed.index])
            else:
                regs = response.registers[placed.index : placed.index + point.width]
                value = datatypes.decode(point, regs)
            if isinstance(value, float) and not math.isfinite(value):
                self._emit(device, point, None, now, f"not a number ({value})")
            else:
                self._emit(device, point, value, now, None)

    def _publish_bad(
        self, device: Device, points: Iterable[ModbusPointConfig], reason: str
    ) -> None:
        device.polled = True
        now = self._wall_clock()
        for point in points:
            self._emit(device, point, None, now, reason)

    def _emit(
        self,
        device: Device,
        point: ModbusPointConfig,
        value: Value,
        now: float,
        reason: str | None,
    ) -> None:
        good = reason is None
        if not device.filters[point.name].should_report(value, good, now, reason):
            return
        self.context.publish(
            Reading(
                device.topics[point.name],
                value,
                unit=point.unit,
                quality=Quality.GOOD if good else Quality.BAD,
                reason=reason,
                timestamp=now,
            )
        )

    # ---- writes and reads on demand --------------------------------------------------------

    async def write(self, target: str, value: Value) -> None:
        """Write ``value`` to ``device/point``; raises ``UnknownPoint`` or ``WriteError``
        saying why not. The value is checked (``datatypes.encode_write``, as the config's
        ``check_write`` does) before anything is sent."""
        device_config, point = find_point(self.name, self._device_configs, target)
        device = self.devices[device_config.name]
        unit = device_config.unit_id
        where = f"{self.name}/{target}"
        device.stats.writes += 1
        try:
            payload = datatypes.encode_write(point, value)
        except WriteError as e:
            device.stats.write_errors += 1
            raise WriteError(f"{where}: {e}") from None
        try:
            with self._failures(where, "write"):
                if isinstance(payload, list):
                    request = Request.write_registers(unit, point.address, payload)
                elif point.table == "coil":
                    request = Request.write_coils(unit, point.address, [payload])
                else:  # a bit of a holding register: read, modify, write
                    assert point.bit is not None
                    current = await self._transact(
                        device, Request.read("holding", unit, point.address, 1)
                    )
                    register = datatypes.set_bit(current.registers[0], point.bit, payload)
                    request = Request.write_registers(unit, point.address, [register])
                await self._transact(device, request)
        except WriteError:
            device.stats.write_errors += 1
            raise
        log.info("wrote %s = %r", where, value, extra=kv(bus=self.name, device=device_config.name))

    async def read(self, target: str) -> Value:
        """Read ``device/point`` now: one request for the point's registers (or bit), decoded
        as a poll decodes it. Raises ``UnknownPoint``, or ``WriteError`` when the device does
        not answer, refuses, or holds a float that is not a number (a poll publishes that as a
        bad reading). Leaves the poller's state (backoff, readings) alone."""
        device_config, point = find_point(self.name, self._device_configs, target)
        device = self.devices[device_config.name]
        where = f"{self.name}/{target}"
        request = Request.read(point.table, device_config.unit_id, point.address, point.width)
        with self._failures(where, "read"):
            response = await self._transact(device, request)
        if point.is_bit_table:
            return datatypes.decode_bit(point, response.bits[0])
        value = datatypes.decode(point, response.registers[: point.width])
        if isinstance(value, float) and not math.isfinite(value):
            raise WriteError(f"{where}: the device holds {value}, not a number")
        return value

    @contextlib.contextmanager
    def _failures(self, where: str, action: Literal["write", "read"]) -> Iterator[None]:
        """Turns what a transaction of an on-demand write or read may raise into a
        ``WriteError`` naming the point."""
        # A write that may have reached the device is "uncertain"; a read is just failed.
        unsure = WriteUncertain if action == "write" else WriteError
        maybe = "; the write may or may not have happened" if action == "write" else ""
        try:
            yield
        except TimeoutError:
            raise unsure(f"{where}: no response within {self.link.timeout:g}s{maybe}") from None
        except Disconnected as e:
            raise unsure(f"{where}: bus disconnected ({e}){maybe}") from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            # The bus was stopped or restarted (reload, shutdown) under the transaction.
            raise unsure(f"{where}: the bus stopped during the {action}{maybe}") from None
        except ModbusExceptionResponse as e:
            raise WriteError(f"{where}: device refused the {action}: {e.reason}") from None
        except NotModbusError as e:
            raise WriteError(f"{where}: {e}") from None
        except FrameError as e:
            raise unsure(f"{where}: corrupted response ({e}){maybe}") from None

    def condition(self) -> Condition:
        """Down while the link is (saying where and why), degraded while some device does not
        answer or answers in another protocol (naming them), starting before the first
        connection attempt and every device's first poll finished, up otherwise."""
        link = self.link.condition()
        if link.state is not State.UP:
            return link
        waiting = [name for name, device in self.devices.items() if not device.polled]
        if waiting:
            return Condition(State.STARTING, f"first poll of {', '.join(waiting)}")
        problems: dict[str, list[str]] = {}
        for name, device in self.devices.items():
            if device.problem is not None:
                problems.setdefault(device.problem, []).append(name)
        if not problems:
            return UP
        reason = "; ".join(f"{', '.join(names)} {problem}" for problem, names in problems.items())
        return Condition(State.DEGRADED, reason)

    def statistics(self) -> ModbusBusStatistics:
        return ModbusBusStatistics(
            link=self.link.statistics(),
            devices={name: d.stats.snapshot() for name, d in self.devices.items()},
        )
