"""Bus kinds: the config class and the factory for each ``kind = "..."`` in ``[[buses]]``.

Adding a driver kind means adding one entry here; the config loader and the daemon look up
kinds only through this table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from drivers import lines, sim
from drivers.base import Bus, BusContext
from drivers.modbus.config import ModbusRtuBusConfig, ModbusTcpBusConfig
from drivers.modbus.rtu import modbus_rtu_bus
from drivers.modbus.tcp import modbus_tcp_bus


@attrs.frozen
class DriverKind:
    kind: str
    config_type: type[Any]
    create: Callable[[Any, BusContext], Bus]
    summary: str


KINDS: Mapping[str, DriverKind] = {
    k.kind: k
    for k in (
        DriverKind("sim", sim.SimBusConfig, sim.SimBus, "simulated points (demo, tests)"),
        DriverKind("modbus-rtu", ModbusRtuBusConfig, modbus_rtu_bus, "Modbus RTU serial line"),
        DriverKind("modbus-tcp", ModbusTcpBusConfig, modbus_tcp_bus, "Modbus TCP device"),
        DriverKind(
            "serial-line",
            lines.SerialLineBusConfig,
            lines.SerialLineBus,
            "line/NMEA sensors on a serial port",
        ),
    )
}
