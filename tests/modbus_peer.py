"""pymodbus's own server as an independent Modbus peer, run in a thread with its own asyncio
loop (pymodbus is asyncio; the gateway under test is Trio)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
from collections.abc import Coroutine, Sequence
from typing import Any

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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
