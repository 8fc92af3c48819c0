"""Pseudo-terminals standing in for serial devices, with unplug and replug.

- ``PtyPeer``: one pty; the test holds the master fd and plays the device (writes lines,
  reads what the driver sent). The driver opens ``peer.path``, a symlink in a temp directory
  that always points at the current pty's slave.
- ``PtyLink`` (``open_pty_link``): two ptys joined by a relay task that copies bytes between
  their master fds, so both ends are real tty paths: ``server_path`` for an independent peer
  that opens a serial port itself (pymodbus's ``ModbusSerialServer``), ``path`` (a symlink)
  for our driver.

``unplug()`` closes the driver side's master: the kernel hangs up the slave, so the driver
sees what a USB unplug looks like (readable, then no data; EIO on write), the device node
disappears and, as udev does with /dev/serial/by-id links, the symlink is removed (so a
freed /dev/pts number taken by someone else is never reached through it). ``replug()``
creates a new pty and points the symlink at it atomically.

Every pty is in raw mode (no echo, no CR/LF translation). We keep each slave open ourselves
so the master never reads EIO while the driver has the port closed. Everything waits in
Trio's I/O loop; nothing here sleeps.
"""

from __future__ import annotations

import os
import tty
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import trio

TIMEOUT = 5.0
"""Upper bound for anything that normally takes milliseconds; only a failing test waits it."""


class Pty:
    """One raw pty pair; ``name`` is the slave's device path (``/dev/pts/N``)."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.name = os.ttyname(self.slave)
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with suppress(RuntimeError):  # outside a Trio run there is nobody to notify
            trio.lowlevel.notify_closing(self.master)
        os.close(self.master)
        os.close(self.slave)


def remove_symlink(link: Path) -> None:
    with suppress(FileNotFoundError):
        link.unlink()


def point_symlink(link: Path, target: str) -> None:
    """Make ``link`` point at ``target`` atomically: a reader sees the old or the new one."""
    tmp = link.with_name(link.name + ".new")
    with suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


async def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        await trio.lowlevel.wait_writable(fd)
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            continue
        view = view[n:]


async def read_some(fd: int) -> bytes:
    """Bytes from a master fd; b"" once every slave fd is closed (EIO)."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, 65536)
        except BlockingIOError:
            continue
        except OSError:  # EIO: no slave open any more
            return b""


def drain(fd: int) -> int:
    """Read and drop whatever is buffered on ``fd`` without waiting; returns the count."""
    dropped = 0
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            return dropped
        if not chunk:
            return dropped
        dropped += len(chunk)


class PtyPeer:
    """A device played by the test through the master side of a pty."""

    def __init__(self, directory: Path, name: str = "ttyPEER0") -> None:
        self.path = directory / name
        self.pty = Pty()
        point_symlink(self.path, self.pty.name)
        self.received = bytearray()
        """Everything read from the driver so far (until ``take_received``)."""

    @property
    def plugged(self) -> bool:
        return not self.pty.closed

    async def send(self, data: bytes) -> None:
        await write_all(self.pty.master, data)

    async def wait_received(self, predicate: Callable[[bytes], bool]) -> bytes:
        """Read from the driver until ``predicate(all bytes received)`` holds."""
        with trio.fail_after(TIMEOUT):
            while not predicate(bytes(self.received)):
                data = await read_some(self.pty.master)
                if not data:
                    raise AssertionError(f"pty closed; received so far: {bytes(self.received)!r}")
                self.received += data
        return bytes(self.received)

    def take_received(self) -> bytes:
        data = bytes(self.received)
        self.received.clear()
        return data

    def unplug(self) -> None:
        """The device vanishes: the driver's tty is hung up and its path stops existing."""
        self.pty.close()
        remove_symlink(self.path)

    def replug(self) -> None:
        """A new device appears at the same path."""
        self.pty.close()
        self.pty = Pty()
        self.received.clear()
        point_symlink(self.path, self.pty.name)

    def close(self) -> None:
        self.pty.close()


class PtyLink:
    """Two ptys joined by a relay: ``server_path`` (a real tty path for an independent peer)
    and ``path`` (a symlink for our driver). Create with ``open_pty_link``."""

    def __init__(self, directory: Path, nursery: trio.Nursery, name: str) -> None:
        self.server = Pty()
        self.server_path = self.server.name
        self.client = Pty()
        self.path = directory / name
        point_symlink(self.path, self.client.name)
        self._nursery = nursery
        self._relay_scope: trio.CancelScope | None = None
        self._relay_done = trio.Event()
        self.to_server = 0
        self.to_client = 0
        """Bytes relayed in each direction, for assertions and debugging."""
        self.dropped = 0
        """Bytes the server sent while our side was unplugged (a real line loses them)."""

    @property
    def plugged(self) -> bool:
        return not self.client.closed

    async def _copy(self, src: int, dst: int, counter: str) -> None:
        while True:
            data = await read_some(src)
            if not data:
                return
            await write_all(dst, data)
            setattr(self, counter, getattr(self, counter) + len(data))

    async def _relay(self, *, task_status: trio.TaskStatus[None]) -> None:
        done = self._relay_done = trio.Event()
        try:
            with trio.CancelScope() as self._relay_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        self._copy, self.server.master, self.client.master, "to_client"
                    )
                    nursery.start_soon(
                        self._copy, self.client.master, self.server.master, "to_server"
                    )
                    task_status.started()
        finally:
            done.set()

    async def _start_relay(self) -> None:
        await self._nursery.start(self._relay)

    async def _stop_relay(self) -> None:
        if self._relay_scope is not None:
            self._relay_scope.cancel()
            await self._relay_done.wait()
            self._relay_scope = None

    async def unplug(self) -> None:
        """Our side's device vanishes: its tty is hung up and its path stops existing."""
        await self._stop_relay()
        self.client.close()
        remove_symlink(self.path)

    async def replug(self) -> None:
        """A new device appears at ``path``; the server side stays as it was."""
        await self._stop_relay()
        self.client.close()
        self.dropped += drain(self.server.master)
        self.client = Pty()
        point_symlink(self.path, self.client.name)
        await self._start_relay()

    def close(self) -> None:
        self.client.close()
        self.server.close()


@asynccontextmanager
async def open_pty_link(directory: Path, name: str = "ttyGW0") -> AsyncIterator[PtyLink]:
    link: PtyLink | None = None
    try:
        async with trio.open_nursery() as nursery:
            link = PtyLink(directory, nursery, name)
            await link._start_relay()
            yield link
            nursery.cancel_scope.cancel()
    finally:
        if link is not None:
            link.close()
