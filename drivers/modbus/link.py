"""One Modbus line: a TCP connection or a serial port, with reconnects and one transaction at
a time.

``Link.run`` keeps the connection up (reconnecting with ``gateway.core.backoff``, logging once
per outage); ``Link.transact`` sends a request and waits for its response under a timeout.
Pollers and writers share the link; a lock serialises transactions, as the line requires.
``Link.condition()`` says whether the line is up and, when not, where and why (``10.0.0.5:502
connection refused``, ``/dev/ttyUSB9 missing``).

A TCP stream that may hold bytes out of step with the requests (a late RTU answer, the rest of
an HTTP server's reply) is *resynced*: closed and reopened at once, without backoff, while the
next transaction waits for it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from drivers.modbus.codec import (
    FrameError,
    MbapCodec,
    ModbusExceptionResponse,
    NotModbusError,
    Request,
    Response,
    RtuCodec,
)
from gateway.core.backoff import Backoff
from gateway.core.component import UP, Condition, State
from gateway.core.logs import kv

log = logging.getLogger("drivers.modbus")


class Disconnected(Exception):
    """The link is down; the request was not sent (or its answer cannot arrive)."""


class ConnectError(OSError):
    """The line cannot be opened. ``str()`` says why and what to do (for the journal);
    ``short`` says where and what in a few words (for the STATUS line)."""

    def __init__(self, message: str, short: str) -> None:
        super().__init__(message)
        self.short = short


class Stream(Protocol):
    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int, /) -> bytes: ...

    async def aclose(self) -> None: ...


class Codec(Protocol):
    def encode(self, request: Request) -> bytes: ...

    def receive_data(self, data: bytes) -> None: ...

    def response(self) -> Response | None: ...


@attrs.frozen
class LinkStatistics:
    up: bool
    connects: int
    reconnects: int
    """Connections made again after one was lost or could not be made."""
    resyncs: int
    """Connections closed and reopened at once to drop bytes out of step with the requests."""
    crc_errors: int
    discarded_bytes: int
    """Stale input dropped before requests (late answers, noise)."""
    last_error: str | None


class Link:
    def __init__(
        self,
        name: str,
        open_stream: Callable[[], Awaitable[Stream]],
        codec: Callable[[], RtuCodec | MbapCodec],
        *,
        where: str | None = None,
        lost: str = "connection lost",
        timeout: float,
        gap: float = 0.0,
        retries: int = 0,
        pause_after_connect: float = 0.0,
        backoff: Backoff | None = None,
        discard_input: Callable[[Stream], int] | None = None,
        resync_on_timeout: bool = False,
        resync_on_not_modbus: bool = False,
    ) -> None:
        """``where`` names the line in conditions (``10.0.0.5:502``, ``/dev/ttyUSB0``) and
        ``lost`` says what happened when it broke (``connection lost``, ``device gone``).
        ``backoff`` paces reconnects (and the bus's per-device probes).
        ``discard_input`` drops stale input before each request and returns how many bytes.
        ``resync_on_timeout``: reopen the stream after a timeout, for framings without
        transaction ids over a stream that may deliver the late answer after the next request
        went out (RTU over TCP). ``resync_on_not_modbus``: reopen it after a foreign answer
        (TCP: the rest of it would follow)."""
        self.name = name
        self.where = where or name
        self.lost_reason = lost
        self._open = open_stream
        self._make_codec = codec
        self._codec: RtuCodec | MbapCodec = codec()
        self.timeout = timeout
        self.gap = gap
        self.retries = retries
        self.pause_after_connect = pause_after_connect
        self.backoff = backoff or Backoff()
        self._discard_input = discard_input
        self.resync_on_timeout = resync_on_timeout
        self.resync_on_not_modbus = resync_on_not_modbus
        self._stream: Stream | None = None
        self._lost = trio.Event()
        self._lock = trio.Lock()
        self._last_end = 0.0
        self._rng = random.Random()
        self._attempted = False  # the first connection attempt has finished
        # An outage lasts from a lost (or unopenable) connection until the device answers
        # again, not until a connect succeeds: a device at its connection limit accepts and
        # closes at once, and must not look up, nor reset the backoff, nor log per attempt.
        self._outage = False
        self._failures = 0
        self._down_reason: str | None = None
        self._resyncing = False
        self._resync_done = trio.Event()
        self.connects = 0
        self.reconnects = 0
        self.resyncs = 0
        self.crc_errors = 0
        self.discarded_bytes = 0
        self.last_error: str | None = None

    @property
    def up(self) -> bool:
        return self._stream is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the link up until cancelled. Reports started after the first attempt."""
        reported = False
        try:
            while True:
                resync = self._resyncing
                try:
                    stream = await self._open()
                except OSError as e:
                    self._failures += 1
                    self._cannot_open(e, log_it=not self._outage)
                    self._outage = True
                    if not reported:
                        reported = True
                        task_status.started()
                    await trio.sleep(self.backoff.delay(self._failures, self._rng))
                    continue
                if self.connects and not resync:
                    self.reconnects += 1
                self.connects += 1
                try:  # from here on the stream is closed however this ends
                    if self.pause_after_connect:
                        await trio.sleep(self.pause_after_connect)
                    self._codec = self._make_codec()
                    self._lost = trio.Event()
                    self._stream = stream
                    self._attempted = True
                    if not self._outage:
                        self._down_reason = None
                    self._end_resync()
                    if not reported:
                        reported = True
                        task_status.started()
                    await self._lost.wait()
                finally:
                    self._stream = None
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                if self._resyncing:
                    # The device is there; only the stream is out of step. Reopen at once.
                    self.resyncs += 1
                    continue
                self._failures += 1
                if not self._outage:
                    self._outage = True
                    log.warning(
                        "%s: connection lost: %s; reconnecting",
                        self.name,
                        self.last_error,
                        extra=kv(bus=self.name),
                    )
                await trio.sleep(self.backoff.delay(self._failures, self._rng))
        finally:
            self._stream = None
            self._end_resync()

    def _cannot_open(self, error: OSError, *, log_it: bool) -> None:
        if isinstance(error, ConnectError):
            message, short = str(error), error.short
        else:
            message = f"cannot connect: {type(error).__name__}: {error}"
            short = f"{self.where}: {error}"
        self.last_error = message
        self._attempted = True
        self._down_reason = short
        self._end_resync()
        if log_it:
            log.warning(
                "%s: %s; retrying with backoff", self.name, message, extra=kv(bus=self.name)
            )

    def _end_resync(self) -> None:
        if self._resyncing:
            self._resyncing = False
            self._resync_done.set()

    def _drop(self, reason: str) -> None:
        """The stream broke: ``run`` closes it and reconnects with backoff."""
        self.last_error = reason
        self._down_reason = f"{self.where} {self.lost_reason}"
        self._stream = None  # nobody sends on it any more, whoever runs first
        self._lost.set()

    def _resync(self) -> None:
        """Close the stream and reopen it at once; transactions wait for the new one."""
        if not self._resyncing:
            self._resyncing = True
            self._resync_done = trio.Event()
        self._stream = None
        self._lost.set()

    def _answered(self) -> None:
        """The device answered (a response or an exception response): an outage is over."""
        if self._outage:
            self._outage = False
            self._down_reason = None
            log.info("%s: connected again", self.name, extra=kv(bus=self.name))
        self._failures = 0

    def condition(self) -> Condition:
        """Up; starting (before the first attempt finished); or down, saying where and why
        (also while connected again after an outage, until the device answers)."""
        if self._stream is not None or self._resyncing:
            if self._outage:
                return Condition(State.DOWN, f"{self._down_reason or self.where}, no answer yet")
            return UP
        if not self._attempted:
            return Condition(State.STARTING, f"connecting to {self.where}")
        return Condition(State.DOWN, self._down_reason or f"{self.where} not connected")

    async def transact(self, request: Request) -> Response:
        """Send ``request`` and return its response. Raises ``TimeoutError`` (no answer
        within ``self.timeout``), ``FrameError`` (after retries), ``NotModbusError``,
        ``ModbusExceptionResponse`` or ``Disconnected``."""
        # Fast path when the line is free: acquire without a scheduling pass; the I/O below
        # is where this call checkpoints.
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            for attempt in range(self.retries + 1):
                try:
                    response = await self._transact_once(request)
                except ModbusExceptionResponse:
                    self._answered()
                    raise
                except FrameError:
                    self.crc_errors += 1
                    if attempt == self.retries:
                        raise
                else:
                    self._answered()
                    return response
            raise AssertionError("unreachable")
        finally:
            self._lock.release()

    async def _transact_once(self, request: Request) -> Response:
        if self._stream is None and self._resyncing:
            await self._resync_done.wait()  # a resync takes one connect: wait, don't fail
        stream = self._stream
        if stream is None:
            await trio.lowlevel.checkpoint()
            raise Disconnected(self.last_error or "not connected")
        if self.gap:
            await trio.sleep_until(self._last_end + self.gap)
        codec = self._codec
        response = None
        try:
            if self._discard_input is not None:
                self.discarded_bytes += self._discard_input(stream)
            await stream.send_all(codec.encode(request))
            with trio.CancelScope(deadline=trio.current_time() + self.timeout):
                while (response := codec.response()) is None:
                    data = await stream.receive_some(4096)
                    if not data:
                        raise Disconnected("connection closed by the device")
                    codec.receive_data(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            reason = str(e) or type(e).__name__  # our port errors say it all
            self._drop(reason)
            raise Disconnected(reason) from e
        except Disconnected as e:
            self._drop(str(e))
            raise
        except NotModbusError:
            if self.resync_on_not_modbus:
                self._resync()
            raise
        finally:
            self._last_end = trio.current_time()
        if response is None:  # the deadline passed
            if self.resync_on_timeout:
                # No transaction id tells a late answer from the next request's: on a fresh
                # connection it cannot arrive at all.
                self._resync()
            raise TimeoutError(f"no response within {self.timeout:g}s")
        return response

    def statistics(self) -> LinkStatistics:
        return LinkStatistics(
            up=self.up,
            connects=self.connects,
            reconnects=self.reconnects,
            resyncs=self.resyncs,
            crc_errors=self.crc_errors,
            discarded_bytes=self.discarded_bytes,
            last_error=self.last_error,
        )
