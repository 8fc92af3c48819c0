"""``kind = "modbus-tcp"``: a Modbus TCP device or gateway, one connection per bus.

MBAP framing with transaction ids (``framing = "mbap"``), or RTU frames over TCP for serial
device servers (``framing = "rtu"``). One outstanding request at a time.
"""

from __future__ import annotations

import trio

from drivers.base import BusContext
from drivers.modbus.bus import ModbusBus
from drivers.modbus.codec import MbapCodec, RtuCodec
from drivers.modbus.config import ModbusTcpBusConfig
from drivers.modbus.link import Link, Stream


def modbus_tcp_bus(config: ModbusTcpBusConfig, context: BusContext) -> ModbusBus:
    async def open_stream() -> Stream:
        with trio.move_on_after(config.connect_timeout):
            return await trio.open_tcp_stream(config.host, config.port)
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
    return ModbusBus(
        config.name,
        config.devices,
        context,
        link,
        backoff_initial=config.backoff_initial,
        backoff_max=config.backoff_max,
    )
