"""``kind = "modbus-tcp"``: a Modbus TCP device or gateway, one connection per bus.

MBAP framing with transaction ids (``framing = "mbap"``), or RTU frames over TCP for serial
device servers (``framing = "rtu"``). One outstanding request at a time.
"""

from __future__ import annotations

import socket

import trio

from drivers.base import BusContext
from drivers.modbus.bus import ModbusBus
from drivers.modbus.codec import MbapCodec, RtuCodec
from drivers.modbus.config import ModbusTcpBusConfig
from drivers.modbus.link import Link, Stream


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

    async def aclose(self) -> None:
        if self._sock.fileno() != -1:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()


def modbus_tcp_bus(config: ModbusTcpBusConfig, context: BusContext) -> ModbusBus:
    async def open_stream() -> Stream:
        with trio.move_on_after(config.connect_timeout):
            return await TcpStream.connect(config.host, config.port)
        raise OSError(
            f"connect to {config.host}:{config.port} timed out after {config.connect_timeout:g}s"
        )

    codec = MbapCodec if config.framing == "mbap" else RtuCodec
    link = Link(
        config.name,
        open_stream,
        codec,
        timeout=config.timeout,
        retries=config.retries,
        pause_after_connect=config.pause_after_connect,
        backoff_initial=config.backoff_initial,
        backoff_max=config.backoff_max,
    )
    return ModbusBus(config.name, config.devices, context, link)
