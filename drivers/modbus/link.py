"""One Modbus line: a TCP connection or a serial port, with reconnects and one transaction at
a time.

``Link.run`` keeps the connection up (reconnecting with backoff, logging once per outage);
``Link.transact`` sends a request and waits for its response under a timeout. Pollers and
writers share the link; a lock serialises transactions, as the line requires.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from drivers.modbus.codec import FrameError, MbapCodec, Request, Response, RtuCodec
from gateway.core.logs import kv

log = logging.getLogger("drivers.modbus")


class Disconnected(Exception):
    """The link is down; the request was not sent (or its answer cannot arrive)."""


class Stream(Protocol):
    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int, /) -> bytes: ...

    async def aclose(self) -> None: ...


class Codec(Protocol):
    def encode(self, request: Request) -> bytes: ...

    def receive_data(self, data: bytes) -> None: ...

    def response(self) -> Response | None: ...


class Link:
    def __init__(
        self,
        name: str,
        open_stream: Callable[[], Awaitable[Stream]],
        codec: Callable[[], RtuCodec | MbapCodec],
        *,
        timeout: float,
        gap: float = 0.0,
        retries: int = 0,
        pause_after_connect: float = 0.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        discard_input: Callable[[Stream], None] | None = None,
    ) -> None:
        self.name = name
        self._open = open_stream
        self._make_codec = codec
        self._codec: RtuCodec | MbapCodec = codec()
        self.timeout = timeout
        self.gap = gap
        self.retries = retries
        self.pause_after_connect = pause_after_connect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._discard_input = discard_input
        self._stream: Stream | None = None
        self._lost = trio.Event()
        self._lock = trio.Lock()
        self._last_end = 0.0
        self._rng = random.Random()
        self.connects = 0
        self.reconnects = 0
        self.crc_errors = 0
        self.last_error: str | None = None

    @property
    def up(self) -> bool:
        return self._stream is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the link up until cancelled. Reports started after the first attempt."""
        failures = 0
        reported = False
        try:
            while True:
                try:
                    stream = await self._open()
                except OSError as e:
                    failures += 1
                    self.last_error = f"{type(e).__name__}: {e}"
                    if failures == 1:
                        log.warning(
                            "%s: cannot connect: %s; retrying with backoff",
                            self.name,
                            self.last_error,
                            extra=kv(bus=self.name),
                        )
                    if not reported:
                        reported = True
                        task_status.started()
                    ceiling = min(self.backoff_max, self.backoff_initial * 2.0 ** (failures - 1))
                    await trio.sleep(self._rng.uniform(ceiling / 2, ceiling))
                    continue
                if self.connects:
                    self.reconnects += 1
                self.connects += 1
                if failures or self.reconnects:
                    log.info("%s: connected again", self.name, extra=kv(bus=self.name))
                failures = 0
                try:  # from here on the stream is closed however this ends
                    if self.pause_after_connect:
                        await trio.sleep(self.pause_after_connect)
                    self._codec = self._make_codec()
                    self._lost = trio.Event()
                    self._stream = stream
                    if not reported:
                        reported = True
                        task_status.started()
                    await self._lost.wait()
                finally:
                    self._stream = None
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
                failures = 1
                log.warning(
                    "%s: connection lost: %s; reconnecting",
                    self.name,
                    self.last_error,
                    extra=kv(bus=self.name),
                )
                await trio.sleep(self._rng.uniform(self.backoff_initial / 2, self.backoff_initial))
        finally:
            self._stream = None

    def _drop(self, reason: str) -> None:
        self.last_error = reason
        self._lost.set()

    async def transact(self, request: Request) -> Response:
        """Send ``request`` and return its response. Raises ``TimeoutError`` (no answer
        within ``self.timeout``), ``FrameError`` (after retries), ``ModbusExceptionResponse``
        or ``Disconnected``."""
        # Fast path when the line is free: acquire without a scheduling pass; the I/O below
        # is where this call checkpoints.
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            for attempt in range(self.retries + 1):
                try:
                    return await self._transact_once(request)
                except FrameError:
                    self.crc_errors += 1
                    if attempt == self.retries:
                        raise
            raise AssertionError("unreachable")
        finally:
            self._lock.release()

    async def _transact_once(self, request: Request) -> Response:
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
                self._discard_input(stream)
            await stream.send_all(codec.encode(request))
            with trio.CancelScope(deadline=trio.current_time() + self.timeout):
                while (response := codec.response()) is None:
                    data = await stream.receive_some(4096)
                    if not data:
                        raise Disconnected("connection closed by the device")
                    codec.receive_data(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._drop(f"{type(e).__name__}: {e}")
            raise Disconnected(str(e) or type(e).__name__) from e
        except Disconnected as e:
            self._drop(str(e))
            raise
        finally:
            self._last_end = trio.current_time()
        if response is None:  # the deadline passed; the connection stays up
            raise TimeoutError(f"no response within {self.timeout:g}s")
        return response

    def statistics(self) -> dict[str, object]:
        return {
            "up": self.up,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "crc_errors": self.crc_errors,
            "last_error": self.last_error,
        }
