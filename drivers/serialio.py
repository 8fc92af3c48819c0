"""A serial port (tty) for Trio: open with pyserial, then non-blocking reads and writes that
wait in Trio's I/O loop.

pyserial opens ports ``O_NONBLOCK``; with ``timeout=0`` nothing here blocks the event loop.
Reads wait with ``trio.lowlevel.wait_readable`` and then read what is there; no thread per
read. A tty whose device vanished (USB unplug, pty master closed) polls readable and then
reads no data, or fails with EIO/ENXIO/ENODEV: both raise ``DeviceGone``. The fd is never
given to ``trio.lowlevel.FdStream``, which would take an empty tty read for EOF (Trio #549).

Depends on pyserial, trio and attrs only; drivers build their protocols on top.
"""

from __future__ import annotations

import errno
import logging
import os
import termios
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import attrs
import serial
import serial.rs485
import trio

from gateway.core.logs import kv

log = logging.getLogger("drivers.serialio")

# errnos with which a read, write or ioctl tells that the device behind the tty is gone.
_GONE = frozenset({errno.EIO, errno.ENXIO, errno.ENODEV, errno.EPIPE})

_OPEN_HINTS = {
    errno.ENOENT: "no such device: is the adapter plugged in, is the path right?",
    errno.EACCES: "permission denied: add the service user to the port's group (dialout)",
    errno.EBUSY: "the device is busy",
    errno.EAGAIN: "in use: another process holds the port (exclusive lock)",
    errno.ENXIO: "no such device or address: the adapter is not ready or was unplugged",
    errno.ENODEV: "no such device: the adapter was unplugged",
}


class PortError(OSError):
    """The port cannot be opened, set up or used; the message says why and what to change.
    ``errno`` is set when the operating system gave one."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class DeviceGone(PortError):
    """The device behind an open port vanished (unplugged, hung up). Close the port and open
    it again later."""


def _os_error(path: str, action: str, e: OSError) -> PortError:
    code = e.errno
    text = os.strerror(code) if code else str(e)
    if code in _GONE:
        return DeviceGone(f"{path}: device gone ({action}: {text})", code)
    return PortError(f"{path}: {action} failed: {text}", code)


@attrs.frozen
class PortSettings:
    path: str = attrs.field(validator=attrs.validators.min_len(1))
    baudrate: int = attrs.field(default=9600, validator=attrs.validators.gt(0))
    bytesize: Literal[5, 6, 7, 8] = attrs.field(
        default=8, validator=attrs.validators.in_((5, 6, 7, 8))
    )
    parity: Literal["N", "E", "O"] = attrs.field(
        default="N", validator=attrs.validators.in_(("N", "E", "O"))
    )
    stopbits: Literal[1, 2] = attrs.field(default=1, validator=attrs.validators.in_((1, 2)))
    rs485: bool = False
    """Let the kernel driver switch the RS-485 transceiver with RTS (TIOCSRS485)."""
    low_latency: bool = True
    """Ask the driver to deliver bytes at once (FTDI buffers 16 ms by default)."""


BAUDRATES = (300, 600, 1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200, 230400)


@attrs.frozen(kw_only=True)
class SerialPortConfig:
    """The serial-port keys shared by every serial bus kind's config class (a base class)."""

    port: str
    """The device path; prefer the stable /dev/serial/by-id/... names."""
    baudrate: int = 9600
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    rs485: bool = False
    """Let the kernel drive RTS for the RS-485 transceiver (adapters that need it)."""
    low_latency: bool = True
    """Turn off the 16 ms receive buffering of FTDI USB adapters where supported."""

    def port_settings(self) -> PortSettings:
        return PortSettings(
            path=self.port,
            baudrate=self.baudrate,
            bytesize=self.bytesize,
            parity=self.parity,
            stopbits=self.stopbits,
            rs485=self.rs485,
            low_latency=self.low_latency,
        )

    def describe(self) -> str:
        return f"{self.port} {self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"

    def check_port(self) -> Iterator[tuple[str, str]]:
        if not self.port:
            yield "port", "must not be empty: e.g. /dev/ttyUSB0 or /dev/serial/by-id/..."
        if self.baudrate not in BAUDRATES:
            yield "baudrate", f"{self.baudrate} is not a standard baud rate (e.g. 9600, 19200)"


def _open_blocking(settings: PortSettings) -> Any:
    """Open and set up a port; runs in a worker thread (see ``SerialPort.open``)."""
    path = settings.path
    try:
        port = serial.Serial(
            port=path,
            baudrate=settings.baudrate,
            bytesize=settings.bytesize,
            parity=settings.parity,
            stopbits=settings.stopbits,
            timeout=0,
            write_timeout=0,
            exclusive=True,
        )
    except OSError as e:
        # pyserial's open and lock failures carry the errno, as do ioctls failing on a device
        # that vanishes while we set it up; "Could not configure port" (not a tty) does not.
        if e.errno:
            hint = _OPEN_HINTS.get(e.errno, os.strerror(e.errno))
            raise PortError(f"cannot open {path}: {hint}", e.errno) from e
        raise PortError(f"cannot open {path}: {e} (is it a serial port?)") from e
    except (ValueError, termios.error) as e:
        raise PortError(f"cannot set up {path}: {e}") from e
    try:
        if settings.rs485:
            try:
                port.rs485_mode = serial.rs485.RS485Settings()
            except (ValueError, NotImplementedError, OSError) as e:
                raise PortError(
                    f"{path}: the driver refuses RS-485 mode ({e}); set rs485 = false if the "
                    "adapter switches direction by itself (most USB RS-485 adapters do)"
                ) from e
        if settings.low_latency:
            try:
                port.set_low_latency_mode(True)
            except (ValueError, NotImplementedError, OSError) as e:
                # ptys, on-board UARTs and many drivers have no such setting; nothing to fix.
                log.debug("low-latency mode not supported", extra=kv(port=path, why=e))
    except BaseException:
        port.close()
        raise
    return port


class SerialPort(trio.abc.AsyncResource):
    """An open serial port. One task may receive and one other task may send at a time.

    Use ``async with await SerialPort.open(settings) as port:`` or call ``aclose()``.
    """

    def __init__(self, port: Any, settings: PortSettings) -> None:
        self._port: Any = port  # serial.Serial, or None once closed
        self._fd: int = port.fd
        self.settings = settings
        self._receiving = False
        self._sending = False
        self._discards = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.bytes_discarded = 0

    @classmethod
    async def open(cls, settings: PortSettings) -> SerialPort:
        """Open the port; raises ``PortError`` with the reason (missing, busy, permissions,
        RS-485 refused)."""
        # pyserial's open is a few syscalls (open O_NONBLOCK, flock LOCK_NB, tcsetattr,
        # ioctls), but on USB adapters tcsetattr and the ioctls are USB control transfers
        # that can stall for seconds on a sick device. Opens are rare (start, reconnect), so
        # one worker thread per open is cheap and keeps the loop responsive. A cancel waits
        # for the open to finish, so the port is never leaked half-open.
        port = await trio.to_thread.run_sync(_open_blocking, settings)
        return cls(port, settings)

    @property
    def closed(self) -> bool:
        return self._port is None

    def fileno(self) -> int:
        self._check_open()
        return self._fd

    def _check_open(self) -> Any:
        if self._port is None:
            raise trio.ClosedResourceError(f"{self.settings.path} is closed")
        return self._port

    @contextmanager
    def _guard(self, flag: Literal["_receiving", "_sending"], what: str) -> Iterator[None]:
        if getattr(self, flag):
            raise trio.BusyResourceError(f"another task is already {what} on this port")
        setattr(self, flag, True)
        try:
            yield
        finally:
            setattr(self, flag, False)

    async def receive_some(self, max_bytes: int = 4096) -> bytes:
        """Wait for data and return 1..max_bytes bytes. Raises ``DeviceGone`` when the device
        vanished and ``trio.ClosedResourceError`` when the port is (or gets) closed."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        with self._guard("_receiving", "receiving"):
            while True:
                self._check_open()
                discards = self._discards
                await trio.lowlevel.wait_readable(self._fd)
                self._check_open()  # closed after we were woken but before we ran
                try:
                    # One read of what is there, up to max_bytes: the same as pyserial's
                    # read(in_waiting or 1) without its extra select() and lost errno.
                    data = os.read(self._fd, max_bytes)
                except BlockingIOError:
                    continue
                except OSError as e:
                    raise _os_error(self.settings.path, "read", e) from e
                if data:
                    self.bytes_received += len(data)
                    return data
                if self._discards != discards:
                    continue  # discard_input() took what woke us
                # Readable but empty: the tty was hung up (the device is gone).
                raise DeviceGone(f"{self.settings.path}: device gone (hung up)")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``, waiting for room in the driver's buffer as needed."""
        with self._guard("_sending", "sending"):
            remaining = memoryview(data).cast("B")
            if not remaining:
                await trio.lowlevel.checkpoint()
                self._check_open()
                return
            # Write first and wait for room only when the driver's buffer is full: a request
            # fits at once, and the receive that follows yields to the scheduler anyway.
            await trio.lowlevel.checkpoint_if_cancelled()
            while remaining:
                self._check_open()
                try:
                    n = os.write(self._fd, remaining)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self._fd)
                    continue
                except OSError as e:
                    raise _os_error(self.settings.path, "write", e) from e
                self.bytes_sent += n
                remaining = remaining[n:]

    def discard_input(self) -> int:
        """Drop everything received but not read yet (stale bytes before a request); returns
        how many bytes were dropped. Raises ``DeviceGone`` if the device vanished."""
        port = self._check_open()
        dropped = 0
        try:
            dropped += int(port.in_waiting)
            if not dropped:  # the usual case before a request: nothing stale, no more syscalls
                return 0
            port.reset_input_buffer()
            # Bytes the driver delivered between the count and the flush, or right after it.
            while True:
                try:
                    chunk = os.read(self._fd, 4096)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError as e:
            raise _os_error(self.settings.path, "discarding input", e) from e
        except termios.error as e:
            code = e.args[0] if e.args and isinstance(e.args[0], int) else 0
            raise _os_error(self.settings.path, "discarding input", OSError(code, str(e))) from e
        self._discards += 1
        self.bytes_discarded += dropped
        return dropped

    async def aclose(self) -> None:
        """Close the port; tasks waiting on it get ``trio.ClosedResourceError``. Idempotent;
        closes even when cancelled."""
        port, self._port = self._port, None
        if port is not None:
            trio.lowlevel.notify_closing(self._fd)
            try:
                port.close()
            except OSError as e:  # the fd is released anyway; nothing left to do
                log.debug("error closing port", extra=kv(port=self.settings.path, error=e))
        await trio.lowlevel.checkpoint()

    def statistics(self) -> dict[str, object]:
        return {
            "path": self.settings.path,
            "open": self._port is not None,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "bytes_discarded": self.bytes_discarded,
        }
