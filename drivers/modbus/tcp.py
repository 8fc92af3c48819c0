"""``kind = "modbus-tcp"``: a Modbus TCP device or gateway, one connection per bus.

MBAP framing with transaction ids (``framing = "mbap"``), or RTU frames over TCP for serial
device servers (``framing = "rtu"``). One outstanding request at a time.

RTU frames carry no transaction id, so over TCP a late answer could be taken for the next
request's: stale input is dropped before each request and, after a timeout, the connection
is reopened so that an answer still on its way cannot arrive at all. A peer that answers in
another protocol gets its connection reopened too (the rest of its answer would follow).
"""

from __future__ import annotations

import errno
import os
import socket

import trio

from drivers.base import BusContext
from drivers.modbus.bus import ModbusBus
from drivers.modbus.codec import MbapCodec, RtuCodec
from drivers.modbus.config import ModbusTcpBusConfig
from drivers.modbus.link import ConnectError, Disconnected, Link, Stream
from gateway.core.backoff import Backoff

_CONNECT_HINTS = {
    errno.ECONNREFUSED: "nothing accepts connections there: is the device on, is the port right?",
    errno.EHOSTUNREACH: "is the device on, is the address right?",
    errno.ENETUNREACH: "check the address and this machine's network settings",
    errno.ETIMEDOUT: "is the device on, does a firewall drop the packets?",
}


class TcpStream:
    """A connected TCP socket with just what a Modbus master needs. Sends go out at once and
    wait only when the kernel buffer is full; receives wait for readable then read. One pass
    through the scheduler per transaction (``trio.SocketStream``'s general path takes three,
    which made us slower than pymodbus's asyncio client; see ``bench/``)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock

    @classmethod
    async def connect(cls, host: str, port: int) -> TcpStream:
        # open_tcp_stream does name resolution, happy eyeballs and TCP_NODELAY for us.
        stream = await trio.open_tcp_stream(host, port)
        return cls(socket.socket(fileno=stream.socket.detach()))

    async def send_all(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._sock)
                continue
            view = view[sent:]

    async def receive_some(self, max_bytes: int) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            try:
                return self._sock.recv(max_bytes)
            except BlockingIOError:
                continue

    def discard_input(self) -> int:
        """Drop what the socket already holds, without waiting; returns how many bytes."""
        dropped = 0
        while True:
            try:
                data = self._sock.recv(4096)
            except BlockingIOError:
                return dropped
            if not data:
                raise Disconnected("connection closed by the device")
            dropped += len(data)

    async def aclose(self) -> None:
        if self._sock.fileno() != -1:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()


def connect_error(host: str, where: str, error: OSError) -> ConnectError:
    """What a failed connect means, naming the host (and port): resolution, refusal..."""
    if isinstance(error, socket.gaierror):
        return ConnectError(
            f"cannot resolve host {host!r} ({error.strerror}): check the name or use an IP address",
            f"cannot resolve {host}",
        )
    # trio.open_tcp_stream raises "all attempts to connect to h:p failed" from a group of
    # each address's error: the first one with an errno says what happened.
    cause: BaseException = error
    if isinstance(error.__cause__, BaseExceptionGroup):
        cause = next(
            (e for e in error.__cause__.exceptions if isinstance(e, OSError) and e.errno),
            error,
        )
    code = cause.errno if isinstance(cause, OSError) else None
    if not code:
        return ConnectError(f"cannot connect to {where}: {error}", f"{where} {error}")
    what = os.strerror(code).lower()
    hint = _CONNECT_HINTS.get(code)
    return ConnectError(
        f"cannot connect to {where}: {what}" + (f" ({hint})" if hint else ""),
        f"{where} {what}",
    )


def _discard_input(stream: Stream) -> int:
    assert isinstance(stream, TcpStream)
    return stream.discard_input()


def modbus_tcp_bus(config: ModbusTcpBusConfig, context: BusContext) -> ModbusBus:
    where = config.describe()

    async def open_stream() -> Stream:
        try:
            with trio.move_on_after(config.connect_timeout):
                return await TcpStream.connect(config.host, config.port)
        except OSError as e:
            raise connect_error(config.host, where, e) from e
        raise ConnectError(
            f"cannot connect to {where}: no answer within {config.connect_timeout:g}s "
            "(is the device on, does a firewall drop the packets?)",
            f"{where} not answering",
        )

    rtu = config.framing == "rtu"
    link = Link(
        config.name,
        open_stream,
        RtuCodec if rtu else MbapCodec,
        where=where,
        timeout=config.timeout,
        retries=config.retries,
        pause_after_connect=config.pause_after_connect,
        backoff=Backoff(config.backoff_initial, config.backoff_max),
        # MBAP's transaction ids already skip late answers: no extra syscall per request.
        discard_input=_discard_input if rtu else None,
        resync_on_timeout=rtu,
        resync_on_not_modbus=True,
    )
    return ModbusBus(config.name, config.devices, context, link)
