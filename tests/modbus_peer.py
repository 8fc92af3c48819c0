"""Modbus peers for the driver's tests.

- ``ModbusPeer``: pymodbus's own server as an independent Modbus peer, run in a thread with its
  own asyncio loop (pymodbus is asyncio; the gateway under test is Trio).
- ``LoopbackPeer``: a small hand-written Modbus TCP device on loopback, a task in the test's
  own Trio loop (so it also runs under the mock clock), for what pymodbus cannot do on
  demand: answer late, send stale bytes, go away and come back on the same port.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import socket
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Literal

import trio
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


def device(
    unit: int,
    *,
    coils: Sequence[bool] = (),
    discrete: Sequence[bool] = (),
    holding: Sequence[int] = (),
    input: Sequence[int] = (),
    size: int = 200,
) -> SimDevice:
    """A device with four separate tables of ``size`` entries, starting at address 0."""

    def regs(values: Sequence[int]) -> list[SimData]:
        v = list(values) + [0] * (size - len(values))
        return [SimData(0, values=v, datatype=DataType.REGISTERS)]

    def bits(values: Sequence[bool]) -> list[SimData]:
        v = list(values) + [False] * (size - len(values))
        return [SimData(0, values=v, datatype=DataType.BITS)]

    return SimDevice(unit, simdata=(bits(coils), bits(discrete), regs(holding), regs(input)))


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except OSError:
        return 32768, 60999
    return int(low), int(high)


def free_port() -> int:
    """A free TCP port on 127.0.0.1, outside the kernel's range of ephemeral (client) ports:
    a client that keeps reconnecting to a port where nothing listens could otherwise be given
    that very port as its own and connect to itself (TCP self-connect)."""
    low, high = _ephemeral_ports()
    candidates = range(10000, low) if low > 11000 else range(high + 1, 65536)
    for port in random.sample(candidates, 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port outside the ephemeral range")


class ModbusPeer:
    """``start()`` serves until ``stop()``; ``get``/``set`` reach into its datastore."""

    def __init__(
        self,
        devices: list[SimDevice],
        *,
        port: int | None = None,
        serial_port: str | None = None,
        baudrate: int = 19200,
        framer: FramerType | None = None,
        silent_units: Sequence[int] = (),
    ) -> None:
        """``silent_units``: requests to these units get no answer at all (a dead slave;
        pymodbus 3.16's ``ignore_missing_devices`` does not work with ``SimDevice``)."""
        self.devices = devices
        self.port = port or free_port()
        self.serial_port = serial_port
        self.baudrate = baudrate
        self.framer = framer
        self.silent_units = set(silent_units)
        self.corrupt_responses = 0  # corrupt the CRC of this many next responses (RTU)
        self.responses = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: ModbusTcpServer | ModbusSerialServer | None = None

    def start(self) -> ModbusPeer:
        ready = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as e:  # reported to start()
                errors.append(e)
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    async def _serve(self) -> None:
        if self.serial_port is None:
            self._server = ModbusTcpServer(
                self.devices,
                address=("127.0.0.1", self.port),
                framer=self.framer or FramerType.SOCKET,
                trace_packet=self._trace,
            )
        else:
            self._server = ModbusSerialServer(
                self.devices,
                port=self.serial_port,
                baudrate=self.baudrate,
                framer=self.framer or FramerType.RTU,
                trace_packet=self._trace,
            )
        await self._server.serve_forever(background=True)

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if not sending or not data:
            return data
        rtu = self.serial_port is not None or self.framer == FramerType.RTU
        unit = data[0] if rtu else data[6]
        if unit in self.silent_units:
            return b""
        self.responses += 1
        if rtu and self.corrupt_responses:
            self.corrupt_responses -= 1
            return data[:-1] + bytes([data[-1] ^ 0xFF])
        return data

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        assert self._loop is not None
        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(10)

    def get(self, unit: int, function_code: int, address: int, count: int) -> list[Any]:
        assert self._server is not None
        return list(self._call(self._server.async_getValues(unit, function_code, address, count)))

    def set(self, unit: int, function_code: int, address: int, values: Sequence[Any]) -> None:
        assert self._server is not None
        self._call(self._server.async_setValues(unit, function_code, address, list(values)))

    def stop(self) -> None:
        if self._loop is None or self._server is None:
            return
        self._call(self._server.shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop = None
        self._server = None


def crc16(data: bytes) -> bytes:
    """Modbus RTU CRC (poly 0xA001 reflected, init 0xFFFF), low byte first; written out here
    so the peer does not share code with the driver under test."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc.to_bytes(2, "little")


class LoopbackPeer:
    """A Modbus TCP device answering reads of holding/input registers (functions 3 and 4):
    register ``a`` holds ``registers(unit, a)`` (by default ``a`` itself), so an answer says
    which request it belongs to. ``framing``: ``"mbap"`` or ``"rtu"`` (RTU frames over TCP, as
    a serial device server passes them).

    ``await nursery.start(peer.serve)`` listens on 127.0.0.1, ``peer.port``; ``await
    peer.close()`` closes the listener and every connection (the device is off: connects are
    refused); ``serve`` again listens on the same port. Misbehaviour on demand:

    - ``silent_units``: requests to these units get no answer;
    - ``hold_next``: the answer to the next request is held back and sent on the same
      connection just before the answer to the request after it (a late answer);
    - ``send_raw(data)``: bytes out of the blue on the newest connection.
    """

    def __init__(self, framing: Literal["mbap", "rtu"] = "mbap") -> None:
        self.framing = framing
        self.port = free_port()
        self.silent_units: set[int] = set()
        self.hold_next = False
        self.registers: Callable[[int, int], int] = lambda unit, address: address
        self.requests: list[tuple[int, int]] = []
        """(unit, address) of every request received."""
        self.connections = 0
        self._streams: list[trio.SocketStream] = []
        self._scope: trio.CancelScope | None = None
        self._closed = trio.Event()
        self._sending = trio.Lock()  # send_raw and the handler may send on one stream

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._closed = trio.Event()
        try:
            with trio.CancelScope() as self._scope:
                listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
                await trio.serve_listeners(self._handle, listeners, task_status=task_status)
        finally:
            self._streams.clear()
            self._closed.set()

    async def close(self) -> None:
        """Close the listener and every connection; returns once they are closed."""
        assert self._scope is not None
        self._scope.cancel()
        await self._closed.wait()

    async def send_raw(self, data: bytes) -> None:
        async with self._sending:
            await self._streams[-1].send_all(data)

    def answer(self, unit: int, function: int, address: int, count: int) -> bytes:
        """The answer to a read, framed (without MBAP header: ``_frame`` adds it)."""
        values = b"".join(
            (self.registers(unit, address + i) & 0xFFFF).to_bytes(2, "big") for i in range(count)
        )
        return bytes([unit, function, 2 * count]) + values

    def frame(self, adu: bytes, transaction_id: int = 0) -> bytes:
        if self.framing == "rtu":
            return adu + crc16(adu)
        return transaction_id.to_bytes(2, "big") + b"\x00\x00" + len(adu).to_bytes(2, "big") + adu

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self._streams.append(stream)
        buffer = bytearray()
        held: bytes | None = None
        while data := await stream.receive_some(4096):
            buffer += data
            while (request := self._take_request(buffer)) is not None:
                tid, unit, function, address, count = request
                self.requests.append((unit, address))
                if unit in self.silent_units:
                    continue
                answer = self.frame(self.answer(unit, function, address, count), tid)
                if self.hold_next:
                    self.hold_next = False
                    held = answer
                    continue
                if held is not None:
                    answer, held = held + answer, None
                async with self._sending:
                    await stream.send_all(answer)

    def _take_request(self, buffer: bytearray) -> tuple[int, int, int, int, int] | None:
        """(transaction id, unit, function, address, count) of a complete read request:
        MBAP header (7 bytes, unit last) + PDU (5 bytes), or unit + PDU + CRC (8 bytes)."""
        mbap = self.framing == "mbap"
        size = 12 if mbap else 8
        if len(buffer) < size:
            return None
        request = bytes(buffer[:size])
        del buffer[:size]
        if not mbap:
            assert crc16(request[:6]) == request[6:], "request with a bad CRC"
        tid = int.from_bytes(request[:2], "big") if mbap else 0
        adu = request[6:] if mbap else request[:6]
        unit, function = adu[0], adu[1]
        assert function in (3, 4), f"LoopbackPeer reads only registers, got function {function}"
        address = int.from_bytes(adu[2:4], "big")
        count = int.from_bytes(adu[4:6], "big")
        return tid, unit, function, address, count
