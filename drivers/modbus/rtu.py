"""``kind = "modbus-rtu"``: one RS-485 serial line with one or more slaves.

One transaction at a time on the line, at least t3.5 of silence between transactions, stale
input discarded before each request, responses framed by expected length + CRC. An unplugged
USB adapter is closed, logged once and reopened with backoff until it is back.
"""

from __future__ import annotations

import errno

from drivers.base import BusContext
from drivers.modbus.bus import ModbusBus
from drivers.modbus.codec import RtuCodec
from drivers.modbus.config import ModbusRtuBusConfig
from drivers.modbus.link import ConnectError, Link, Stream
from drivers.serialio import PortError, SerialPort
from gateway.core.backoff import Backoff

# A port that cannot be opened, in a few words for the STATUS line (the journal gets the
# whole message with its hint).
_SHORT = {
    errno.ENOENT: "missing",
    errno.ENODEV: "missing",
    errno.ENXIO: "not ready",
    errno.EACCES: "permission denied",
    errno.EBUSY: "busy",
    errno.EAGAIN: "in use by another process",
}


def _discard_input(stream: Stream) -> int:
    assert isinstance(stream, SerialPort)
    return stream.discard_input()


def modbus_rtu_bus(config: ModbusRtuBusConfig, context: BusContext) -> ModbusBus:
    settings = config.port_settings()

    async def open_stream() -> Stream:
        try:
            return await SerialPort.open(settings)
        except PortError as e:
            what = _SHORT.get(e.errno or 0, "cannot be opened")
            raise ConnectError(str(e), f"{config.port} {what}") from e

    link = Link(
        config.name,
        open_stream,
        RtuCodec,
        where=config.port,
        lost="device gone",
        timeout=config.timeout,
        gap=config.gap,
        retries=config.retries,
        backoff=Backoff(config.backoff_initial, config.backoff_max),
        discard_input=_discard_input,
    )
    return ModbusBus(config.name, config.devices, context, link)
