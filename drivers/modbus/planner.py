"""Turn a device's points into as few Modbus read requests as possible.

Pure: config in, plan out; no I/O, no clock, no pymodbus. Depends only on
``drivers.modbus.config`` and ``gateway.core.configtypes`` (for ``format_duration``). The poller
sends one request per ``PlannedRead`` each poll cycle and slices each point's registers (or
bits) out of the response at ``PlacedPoint.index``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from drivers.modbus.config import (
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    ModbusDeviceConfig,
    ModbusPointConfig,
    Table,
)
from gateway.core.configtypes import format_duration

TABLES: tuple[Table, ...] = ("coil", "discrete", "holding", "input")
"""Plan order; also the order of the read function codes 1..4."""

FUNCTION_CODES: dict[Table, int] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


@attrs.frozen
class PlacedPoint:
    point: ModbusPointConfig
    index: int
    """Index of the point's first register (or bit) within its read's result."""


@attrs.frozen
class PlannedRead:
    table: Table
    address: int
    """First register (or bit) read, 0-based as on the wire."""
    count: int
    """Registers (holding/input) or bits (coil/discrete) read."""
    points: tuple[PlacedPoint, ...]
    """Sorted by address; points that share registers are all listed."""

    @property
    def function_code(self) -> int:
        return FUNCTION_CODES[self.table]

    @property
    def last(self) -> int:
        """Last register (or bit) read, inclusive."""
        return self.address + self.count - 1


def read_limit(device: ModbusDeviceConfig, table: Table) -> int:
    """Most registers (or bits) one request may read from ``table``: the device's own limit,
    never above what the protocol allows."""
    if table in ("coil", "discrete"):
        return min(device.max_bits_per_read, MAX_READ_BITS)
    return min(device.max_registers_per_read, MAX_READ_REGISTERS)


def plan_device(device: ModbusDeviceConfig) -> tuple[PlannedRead, ...]:
    """The reads for one poll cycle of ``device``, ordered by table (coil, discrete, holding,
    input), then address.

    Raises ``ValueError`` for a point wider than the device's read limit, which
    ``ModbusDeviceConfig.check`` reports to the user first.
    """
    reads: list[PlannedRead] = []
    for table in TABLES:
        points = [p for p in device.points if p.table == table]
        reads.extend(_plan_table(table, points, read_limit(device, table), device.max_gap))
    return tuple(reads)


def _plan_table(
    table: Table, points: Iterable[ModbusPointConfig], limit: int, max_gap: int
) -> list[PlannedRead]:
    # Greedy from the lowest address, which gives the fewest reads. Why: when a point q can't
    # join for the gap, no read can hold points on both sides of that hole; when it can't for
    # the limit, any later point that could share a read with the first one lies inside q. So
    # the points from q on never need more reads than an optimal plan minus one.
    reads: list[PlannedRead] = []
    current: list[ModbusPointConfig] = []
    start = end = 0  # of the current read; end is exclusive
    # sorted() is stable: points at the same address keep their config order.
    for point in sorted(points, key=lambda p: p.address):
        width = point.width
        if not 1 <= width <= limit:
            raise ValueError(
                f"{point.name} needs {width} {_unit(table, width)}; one read takes 1..{limit}"
            )
        point_end = point.address + width
        if current and point.address - end <= max_gap and max(end, point_end) - start <= limit:
            current.append(point)
            end = max(end, point_end)
            continue
        if current:
            reads.append(_read(table, start, end, current))
        current = [point]
        start, end = point.address, point_end
    if current:
        reads.append(_read(table, start, end, current))
    return reads


def _read(table: Table, start: int, end: int, points: Sequence[ModbusPointConfig]) -> PlannedRead:
    placed = tuple(PlacedPoint(p, p.address - start) for p in points)
    return PlannedRead(table=table, address=start, count=end - start, points=placed)


def format_plan(bus_name: str, devices: Iterable[ModbusDeviceConfig]) -> list[str]:
    """The requests one bus sends per poll cycle, one line per read, for
    ``edge-gateway check-config --plan``. Points are shown as ``name@address`` (``.bit`` for a
    bit of a register), addresses 0-based as in the config."""
    lines: list[str] = []
    total = 0
    for device in devices:
        head = (
            f"{bus_name}/{device.name} (unit {device.unit_id}, "
            f"every {format_duration(device.interval)})"
        )
        reads = plan_device(device)
        if not reads:
            lines.append(f"{head}: no points, no requests")
        for read in reads:
            names = ", ".join(_placed_label(p.point) for p in read.points)
            lines.append(
                f"{head}: FC{read.function_code} {read.table} {read.address}..{read.last} "
                f"({read.count} {_unit(read.table, read.count)}): {names}"
            )
        total += len(reads)
    lines.append(f"{bus_name}: {total} {'request' if total == 1 else 'requests'} per poll cycle")
    return lines


def _placed_label(point: ModbusPointConfig) -> str:
    bit = "" if point.bit is None else f".{point.bit}"
    return f"{point.name}@{point.address}{bit}"


def _unit(table: Table, n: int) -> str:
    word = "bit" if table in ("coil", "discrete") else "register"
    return word if n == 1 else f"{word}s"
