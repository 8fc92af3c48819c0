"""A simulated Modbus TCP energy meter for ``edge-gateway demo``.

pymodbus's own ``ModbusTcpServer`` (an independent implementation, not our codec) serves an
energy meter's register map; its values change every second. pymodbus is
asyncio and the gateway is Trio, so the server runs in a background thread with its own
asyncio loop; ``start()`` returns once it listens (on an ephemeral port by default) and
``stop()`` shuts it down and joins the thread.

It answers every unit id, as many Modbus TCP devices do (and pymodbus 3.16 would log a
traceback for a unit it does not know, instead of answering with an exception).

Register map (0-based addresses; the matching points are in ``gateway.demo``):

======== ======= ============ ============================================================
table    address type         meaning
======== ======= ============ ============================================================
input    0..1    float32 ABCD voltage, V (around 230)
input    2..3    float32 ABCD current, A (0 while the relay is open)
input    4..5    float32 ABCD active power, W
input    6       uint16       frequency, 0.01 Hz (5000 = 50.00 Hz)
input    8..9    uint32 CDAB  energy, 0.01 kWh, low word first
holding  0       uint16       power limit, 0.1 kW (writable)
holding  1       bits         status: bit 0 relay closed, bit 1 power above the limit
coil     0       bit          relay (writable; open it and the current drops to 0)
======== ======= ============ ============================================================

Depends on pymodbus and the standard library only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import struct
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from types import TracebackType
from typing import Any

from pymodbus.framer import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

ANY_UNIT = 0
"""pymodbus's simulator: a ``SimDevice`` with id 0 serves every unit id without one of its own."""
TABLE_SIZE = 16
"""Registers (and bits) per table; reads beyond it get exception 02 (illegal address)."""

# Function codes for pymodbus's datastore calls.
_COILS, _HOLDING, _INPUT = 1, 3, 4

_FRAME_DUMP = "\n>>>>> "
_CLIENT_GONE = "Cancel send, because not connected!"


class _QuietServer(logging.Filter):
    """Keeps pymodbus's server errors to one readable line in the demo's log.

    pymodbus appends its last 20 raw frames (``>>>>> send: 0x0 0x1 ...``) to every error it
    logs while its logger is below DEBUG, which ``gateway.core.logs.setup`` makes it: the dump is
    cut off. And it logs an error when a client hangs up while a request is being answered,
    which the gateway does at every stop (it cancels the poll in flight): that one is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str):
            return True
        if record.msg.startswith(_CLIENT_GONE):
            return False
        if _FRAME_DUMP in record.msg:
            record.msg = record.msg.split(_FRAME_DUMP, 1)[0]
        return True


_quiet_server = _QuietServer()
_PYMODBUS_LOGGER = "pymodbus.logging"
"""The one logger all of pymodbus logs to."""


def float32_registers(value: float) -> list[int]:
    """ABCD (big-endian) register image of a float32."""
    high, low = struct.unpack(">2H", struct.pack(">f", value))
    return [high, low]


def uint32_cdab_registers(value: int) -> list[int]:
    """CDAB register image of a uint32: low word first."""
    high, low = struct.unpack(">2H", struct.pack(">I", value))
    return [low, high]


class MeterModel:
    """The meter's readings: a pure function of time (plus a little seeded noise), the relay
    and the power limit. Sans-IO; the server thread calls ``advance`` once a second."""

    def __init__(self, seed: int = 7) -> None:
        self._rng = random.Random(seed)
        self.relay = True
        self.power_limit_w = 3000.0
        self.voltage = 230.0
        self.current = 0.0
        self.power = 0.0
        self.frequency = 50.0
        self.energy_wh = 12_345_678.0

    def advance(self, t: float, dt: float) -> None:
        """The state ``t`` seconds after start; energy adds the last power over ``dt``."""
        self.energy_wh += self.power * dt / 3600
        noise = self._rng.uniform
        self.voltage = 230.0 + 4.0 * math.sin(2 * math.pi * t / 60) + noise(-0.3, 0.3)
        self.current = 0.0
        if self.relay:
            self.current = 11.0 + 5.0 * math.sin(2 * math.pi * t / 45) + noise(-0.2, 0.2)
        self.power = self.voltage * self.current * 0.95  # power factor 0.95
        self.frequency = 50.0 + 0.04 * math.sin(2 * math.pi * t / 20)

    def input_registers(self) -> list[int]:
        """Input registers 0..9 as the map above lays them out."""
        return [
            *float32_registers(self.voltage),
            *float32_registers(self.current),
            *float32_registers(self.power),
            round(self.frequency * 100),
            0,
            *uint32_cdab_registers(int(self.energy_wh / 10) % 2**32),
        ]

    def status_bits(self) -> int:
        return int(self.relay) | int(self.power > self.power_limit_w) << 1


def _meter_device() -> SimDevice:
    def regs(values: Sequence[int]) -> list[SimData]:
        padded = [*values, *[0] * (TABLE_SIZE - len(values))]
        return [SimData(0, values=padded, datatype=DataType.REGISTERS)]

    def bits(values: Sequence[bool]) -> list[SimData]:
        padded = [*values, *[False] * (TABLE_SIZE - len(values))]
        return [SimData(0, values=padded, datatype=DataType.BITS)]

    # Four separate tables (coils, discrete inputs, holding, input), as most meters have.
    return SimDevice(ANY_UNIT, simdata=(bits([True]), bits([]), regs([30, 1]), regs([])))


class EnergyMeterSimulator:
    """``with EnergyMeterSimulator() as meter:`` serves on ``meter.host``:``meter.port``
    until the block ends."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, update: float = 1.0) -> None:
        """``port=0`` lets the kernel pick a free port; read it from ``port`` after start."""
        self.host = host
        self.port = port
        self.update = update
        self.model = MeterModel()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> EnergyMeterSimulator:
        """Start serving; returns once the server listens. Raises ``OSError`` if it cannot."""
        if self._thread is not None:
            raise RuntimeError("the simulator is running already")
        self._ready.clear()
        self._error = None
        logging.getLogger(_PYMODBUS_LOGGER).addFilter(_quiet_server)
        self._thread = threading.Thread(target=self._main, name="modbus-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise OSError(f"Modbus simulator did not start within {timeout:g}s")
        if self._error is not None:
            self.stop()
            raise OSError(
                f"Modbus simulator cannot listen on {self.host}:{self.port}: {self._error}"
            ) from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the server and its connections and end the thread; idempotent."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and not loop.is_closed():
            with suppress(RuntimeError):  # the loop closed in the meantime
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join(timeout)
        self._thread = None
        logging.getLogger(_PYMODBUS_LOGGER).removeFilter(_quiet_server)

    def __enter__(self) -> EnergyMeterSimulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- the server thread ----------------------------------------------------------------

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # handed to start(), which raises it in the caller
            self._error = e
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = ModbusTcpServer(
            [_meter_device()],
            address=(self.host, self.port),
            framer=FramerType.SOCKET,
        )
        await server.serve_forever(background=True)
        try:
            # pymodbus keeps the asyncio Server it listens with as its transport.
            listener: Any = server.transport
            self.port = int(listener.sockets[0].getsockname()[1])
            animate = asyncio.create_task(self._animate(server))
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                animate.cancel()
                with suppress(asyncio.CancelledError):
                    await animate
        finally:
            await server.shutdown()  # type: ignore[no-untyped-call]

    async def _animate(self, server: ModbusTcpServer) -> None:
        model = self.model
        started = last = time.monotonic()
        while True:
            now = time.monotonic()
            # Writes from the gateway land in the datastore: take them into the model.
            (relay,) = await server.async_getValues(ANY_UNIT, _COILS, 0, 1)
            limit, status = await server.async_getValues(ANY_UNIT, _HOLDING, 0, 2)
            model.relay = bool(relay)
            model.power_limit_w = int(limit) * 100.0
            model.advance(now - started, now - last)
            last = now
            # All ten input registers in one call: a read never sees half an update.
            await server.async_setValues(ANY_UNIT, _INPUT, 0, model.input_registers())
            status = (int(status) & ~0b11) | model.status_bits()
            await server.async_setValues(ANY_UNIT, _HOLDING, 1, [status])
            await asyncio.sleep(self.update)
