"""pymodbus's server in a separate process, the one peer both clients of a benchmark talk to.

A process, not a thread (as ``tests.modbus_peer`` uses): a server thread would share the GIL
with the client being measured and slow it down by however much the server works. In its own
process (spawned, so it inherits no state) the server gets its own core on a multi-core
machine and costs both clients the same.

For RTU the process also owns the serial line: two raw ptys (``tests.ptys.Pty``) joined by a
relay in the server's asyncio loop, so pymodbus's ``ModbusSerialServer`` opens one tty path
and the clients open the other. ``tests.ptys.open_pty_link`` does the same with a Trio relay,
which would run in the measured client's event loop; here the relay stays on the server side.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Literal

import trio
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

from bench.timing import Timed, timed
from drivers.base import BusContext
from drivers.modbus.codec import Request
from drivers.modbus.link import Link
from gateway.core.reading import Reading
from tests.modbus_peer import device, free_port
from tests.ptys import Pty

UNIT = 1
HOLDING = [1000 + i for i in range(10)]
"""Holding registers 0..9 of unit 1: what every benchmark reads."""


def check_registers(registers: Sequence[int]) -> None:
    """Both clients must have read the right values, or the timings mean nothing."""
    if list(registers) != HOLDING:
        raise RuntimeError(f"wrong registers read: {list(registers)}, expected {HOLDING}")


def _ignore_reading(reading: Reading) -> None:
    pass


def _no_progress() -> None:
    pass


SILENT = BusContext(_ignore_reading, _no_progress)
"""A bus context for benchmarks: readings and progress go nowhere."""


async def link_round(link: Link, count: int, warmup: int, limit: float) -> Timed:
    """Our client's round: bring ``link`` up, warm up, then time ``count`` reads of the
    benchmark's registers back to back (checking what was read)."""
    request = Request.read("holding", UNIT, 0, len(HOLDING))
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        if not link.up:
            raise RuntimeError(f"ours cannot connect: {link.last_error}")
        for _ in range(warmup):
            check_registers((await link.transact(request)).registers)
        timings, last = await timed(lambda: link.transact(request), count, limit)
        check_registers(last.registers)
        nursery.cancel_scope.cancel()
    return timings


READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0

Kind = Literal["tcp", "rtu"]


@contextmanager
def spawned(
    target: Callable[..., None],
    args: tuple[object, ...],
    name: str,
    *,
    stop: object,
    ready_timeout: float = READY_TIMEOUT,
    stop_timeout: float = STOP_TIMEOUT,
) -> Iterator[tuple[BaseProcess, Connection, object]]:
    """Run ``target(*args, conn)`` in a spawned process that answers ``("ready", where)`` on
    ``conn`` once serving (or anything else with the reason it could not start); yields the
    process, our end of the pipe and ``where``. At the end sends ``stop``, then terminates
    what is still running."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    process = ctx.Process(target=target, args=(*args, theirs), name=name)
    process.start()
    theirs.close()
    try:
        if not ours.poll(ready_timeout):
            raise RuntimeError(f"the {name} server did not start within {ready_timeout:g}s")
        try:
            status, where = ours.recv()
        except EOFError:
            process.join(stop_timeout)
            raise RuntimeError(
                f"the {name} server exited while starting (exit code {process.exitcode})"
            ) from None
        if status != "ready":
            raise RuntimeError(f"the {name} server failed to start: {where}")
        yield process, ours, where
    finally:
        with suppress(OSError):  # it is gone already
            ours.send(stop)
        process.join(stop_timeout)
        if process.is_alive():
            process.terminate()
            process.join(stop_timeout)
        ours.close()


@contextmanager
def server_process(kind: Kind) -> Iterator[str]:
    """Run the server until the block ends. Yields where to reach it: the TCP port (as a
    string) or the tty path for the client side of the serial line."""
    with spawned(_main, (kind,), f"modbus-{kind}", stop="stop") as (_, _, where):
        assert isinstance(where, str)
        yield where


def quiet_pymodbus() -> None:
    """pymodbus logs a disconnect mid-request as an error with its last 20 frames attached;
    in a benchmark that churns connections that is noise, not news."""
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL + 10)


def pin(role: Literal["client", "server"]) -> str:
    """Put the measured client and the server on different cores (when there are two), so
    neither client pays for the server's work or for the scheduler moving them around."""
    if not hasattr(os, "sched_getaffinity"):
        return "not pinned (no CPU affinity here)"
    # The client pins itself first; the server, spawned later, inherits that one CPU, so
    # the set of usable CPUs travels in the environment.
    known = os.environ.get("BENCH_CPUS")
    cpus = [int(c) for c in known.split(",")] if known else sorted(os.sched_getaffinity(0))
    os.environ["BENCH_CPUS"] = ",".join(map(str, cpus))
    if len(cpus) < 2:
        return "not pinned (one CPU)"
    cpu = cpus[0] if role == "client" else cpus[-1]
    os.sched_setaffinity(0, {cpu})
    return f"client on CPU {cpus[0]}, server on CPU {cpus[-1]}"


def _main(kind: Kind, conn: Connection) -> None:
    quiet_pymodbus()
    pin("server")
    try:
        asyncio.run(_serve(kind, conn))
    except Exception as e:  # reported to the parent, which raises it
        with suppress(OSError):  # the parent is gone
            conn.send(("error", f"{type(e).__name__}: {e}"))
        raise
    finally:
        conn.close()


async def _serve(kind: Kind, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    devices = [device(UNIT, holding=HOLDING, size=100)]
    stop = asyncio.Event()
    loop.add_reader(conn.fileno(), stop.set)  # "stop" from the parent, or its end closing
    if kind == "tcp":
        port = free_port()
        server: ModbusTcpServer | ModbusSerialServer = ModbusTcpServer(
            devices, address=("127.0.0.1", port), framer=FramerType.SOCKET
        )
        await server.serve_forever(background=True)
        conn.send(("ready", str(port)))
        await stop.wait()
        await server.shutdown()
        return
    with _PtyRelay(loop) as relay:
        # The baud rate only matters to a real UART; a pty delivers bytes at once.
        server = ModbusSerialServer(
            devices, port=relay.server.name, baudrate=115200, framer=FramerType.RTU
        )
        await server.serve_forever(background=True)
        conn.send(("ready", relay.client.name))
        await stop.wait()
        await server.shutdown()


class _PtyRelay:
    """Copies bytes between the masters of two ptys from asyncio reader callbacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.server = Pty()
        self.client = Pty()
        self._pending: dict[int, bytearray] = {
            self.server.master: bytearray(),
            self.client.master: bytearray(),
        }

    def __enter__(self) -> _PtyRelay:
        self.loop.add_reader(self.server.master, self._copy, self.server.master, self.client.master)
        self.loop.add_reader(self.client.master, self._copy, self.client.master, self.server.master)
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._pending:
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
        self.server.close()
        self.client.close()

    def _copy(self, src: int, dst: int) -> None:
        try:
            data = os.read(src, 65536)
        except BlockingIOError:
            return
        self._pending[dst] += data
        self._flush(dst)

    def _flush(self, dst: int) -> None:
        pending = self._pending[dst]
        try:
            n = os.write(dst, pending)
        except BlockingIOError:
            n = 0
        del pending[:n]
        if pending:
            self.loop.add_writer(dst, self._flush, dst)
        else:
            self.loop.remove_writer(dst)
