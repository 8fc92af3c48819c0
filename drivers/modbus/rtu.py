"""``kind = "modbus-rtu"``: one RS-485 serial line with one or more slaves.

One transaction at a time on the line, at least t3.5 of silence between transactions, stale
input discarded before each request, responses framed by expected length + CRC. An unplugged
USB adapter is closed, logged once and reopened with backoff until it is back.
"""

from __future__ import annotations

from drivers.base import BusContext
from drivers.modbus.bus import ModbusBus
from drivers.modbus.codec import RtuCodec
from drivers.modbus.config import ModbusRtuBusConfig
from drivers.modbus.link import Link, Stream
from drivers.serialio import SerialPort


def _discard_input(stream: Stream) -> None:
    assert isinstance(stream, SerialPort)
    stream.discard_input()


def modbus_rtu_bus(config: ModbusRtuBusConfig, context: BusContext) -> ModbusBus:
    settings = config.port_settings()

    async def open_stream() -> Stream:
        return await SerialPort.open(settings)

    link = Link(
        config.name,
        open_stream,
        RtuCodec,
        timeout=config.timeout,
        gap=config.gap,
        retries=config.retries,
        backoff_initial=config.backoff_initial,
        backoff_max=config.backoff_max,
        discard_input=_discard_input,
    )
    return ModbusBus(config.name, config.devices, context, link)
