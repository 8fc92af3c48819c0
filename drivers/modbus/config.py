"""Config classes for ``kind = "modbus-rtu"`` and ``kind = "modbus-tcp"`` buses.

Addresses are 0-based protocol addresses as sent on the wire (a vendor's "40001" is holding
register address 0). Everything the user can get wrong is checked here with a path.

``check_write`` validates a write against the config without I/O, with the very function the
bus's ``write`` encodes with (``datatypes.encode_write``), so the two never disagree.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterator, Sequence
from typing import Literal

import attrs

from drivers.base import WriteError, unknown_point
from drivers.modbus import datatypes
from drivers.serialio import SerialPortConfig
from gateway.core.configtypes import Duration, Name, duplicate_names
from gateway.core.reading import Value

Table = Literal["coil", "discrete", "holding", "input"]
DataType = Literal[
    "bool",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
    "string",
]
# Byte/word order as Telegraf names it. The four-letter names apply to every width (AB..: no
# swap, BA..: bytes swapped in each register, CD..: registers swapped, DC..: both); the two-
# and eight-letter names are accepted for 16- and 64-bit values.
Order = Literal[
    "ABCD",
    "DCBA",
    "BADC",
    "CDAB",
    "AB",
    "BA",
    "ABCDEFGH",
    "HGFEDCBA",
    "BADCFEHG",
    "GHEFCDAB",
]

REGISTERS = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}
MAX_READ_REGISTERS = 125
MAX_READ_BITS = 2000
MAX_WRITE_REGISTERS = 123


@attrs.frozen
class ModbusPointConfig:
    name: Name
    table: Table
    address: int
    type: DataType = "uint16"
    order: Order = "ABCD"
    bit: int | None = None
    """For ``type = "bool"`` on a holding/input register: which bit (0 = least significant)."""
    length: int | None = None
    """For ``type = "string"``: how many registers (two characters each)."""
    scale: float = 1.0
    offset: float = 0.0
    """value = raw * scale + offset (inverted for writes)."""
    unit: str | None = None
    deadband: float | None = None
    """Report only when the value moved more than this since the last report."""
    heartbeat: Duration | None = None
    """With a deadband: report at least this often anyway."""
    writable: bool = False
    min: float | None = None
    max: float | None = None
    """Accepted range for writes, in engineering units (after scale/offset)."""

    @property
    def is_bit_table(self) -> bool:
        return self.table in ("coil", "discrete")

    @property
    def width(self) -> int:
        """Registers (or bits, on coil/discrete tables) this point occupies."""
        if self.is_bit_table:
            return 1
        if self.type == "string":
            return self.length or 0
        return REGISTERS[self.type]

    def check(self) -> Iterator[tuple[str, str]]:
        if not 0 <= self.address <= 65535:
            yield "address", f"{self.address} is outside 0..65535 (addresses are 0-based)"
        if self.is_bit_table:
            if self.type != "bool":
                yield (
                    "type",
                    (
                        f'a {self.table} holds one bit: use type = "bool" '
                        f"(a {self.type} needs holding or input registers)"
                    ),
                )
            if self.bit is not None:
                yield "bit", f"bit selects a bit of a register; {self.table}s are single bits"
        elif self.type == "bool" and self.bit is None:
            yield (
                "bit",
                (
                    f'a bool on {self.table} registers needs bit = 0..15 (or use table = "coil" '
                    '/ "discrete")'
                ),
            )
        if self.bit is not None and not 0 <= self.bit <= 15:
            yield "bit", f"{self.bit} is outside 0..15"
        if self.type == "string":
            if self.length is None:
                yield "length", "a string needs length = number of registers (2 chars each)"
            elif not 1 <= self.length <= MAX_READ_REGISTERS:
                yield "length", f"{self.length} is outside 1..{MAX_READ_REGISTERS}"
        elif self.length is not None:
            yield "length", 'length is only for type = "string"'
        if 0 <= self.address <= 65535 < self.address + max(self.width, 1) - 1:
            yield "address", f"{self.name} runs past address 65535"
        if len(self.order) == 2 and self.type not in ("int16", "uint16", "string"):
            yield "order", f"{self.order} is for 16-bit values; a {self.type} takes e.g. ABCD"
        if len(self.order) == 8 and self.type not in ("int64", "uint64", "float64"):
            yield "order", f"{self.order} is for 64-bit values; a {self.type} takes e.g. ABCD"
        if self.writable and self.table in ("discrete", "input"):
            what = "discrete inputs" if self.table == "discrete" else "input registers"
            yield "writable", f"{what} are read-only in Modbus"
        if self.scale == 0:
            yield "scale", "must not be 0"
        if (self.type in ("bool", "string")) and (self.scale != 1.0 or self.offset != 0.0):
            yield "scale", f"scale and offset apply to numbers, not to a {self.type}"
        if self.deadband is not None and self.deadband < 0:
            yield "deadband", "must be 0 or more"
        if self.heartbeat is not None and self.heartbeat <= 0:
            yield "heartbeat", "must be greater than 0"
        if self.heartbeat is not None and self.deadband is None:
            yield (
                "heartbeat",
                (
                    "only matters with a deadband (without one, every poll is reported): "
                    "add deadband = 0 to report changes only"
                ),
            )
        if self.writable and not self.is_bit_table and self.width > MAX_WRITE_REGISTERS:
            yield (
                "writable",
                (
                    f"{self.width} registers is more than one write may carry "
                    f"({MAX_WRITE_REGISTERS}); make the point shorter or read-only"
                ),
            )
        if self.min is not None and self.max is not None and self.max < self.min:
            yield "max", f"{self.max} is below min ({self.min})"


@attrs.frozen
class ModbusDeviceConfig:
    name: Name
    unit_id: int = 1
    interval: Duration = Duration(1.0)
    max_registers_per_read: int = MAX_READ_REGISTERS
    max_bits_per_read: int = MAX_READ_BITS
    max_gap: int = 0
    """Unread registers (or bits) a single read may bridge to save a request."""
    points: tuple[ModbusPointConfig, ...] = ()

    def check(self, *, tcp: bool) -> Iterator[tuple[str, str]]:
        low = 0 if tcp else 1
        if not low <= self.unit_id <= 247 and not (tcp and self.unit_id == 255):
            yield (
                "unit_id",
                (
                    f"{self.unit_id} is outside {low}..247"
                    + (" (or 255 for a TCP device that ignores it)" if tcp else "")
                ),
            )
        if self.interval <= 0:
            yield "interval", "must be greater than 0"
        if not 1 <= self.max_registers_per_read <= MAX_READ_REGISTERS:
            yield "max_registers_per_read", f"{self.max_registers_per_read} is outside 1..125"
        if not 1 <= self.max_bits_per_read <= MAX_READ_BITS:
            yield "max_bits_per_read", f"{self.max_bits_per_read} is outside 1..2000"
        if self.max_gap < 0:
            yield "max_gap", "must be 0 or more"
        if not self.points:
            yield "points", "a device needs at least one [[buses.devices.points]] table"
        yield from duplicate_names("points", [p.name for p in self.points])
        for i, point in enumerate(self.points):
            for path, msg in point.check():
                yield f"points[{i}].{path}", msg
            if not point.is_bit_table and point.width > self.max_registers_per_read:
                yield (
                    f"points[{i}].length",
                    (
                        f"{point.name} needs {point.width} registers, more than "
                        f"max_registers_per_read ({self.max_registers_per_read})"
                    ),
                )
        yield from _overlapping_writes(self.points)


def _overlapping_writes(points: tuple[ModbusPointConfig, ...]) -> Iterator[tuple[str, str]]:
    """A writable point must not share a register with another point (a write to one would
    silently change the other), except other bits of the same register: a bit write reads the
    register, changes its bit and writes it back."""
    for i, a in enumerate(points):
        if not a.writable:
            continue
        for b in points:
            if b is a or a.table != b.table:
                continue
            if not (a.address < b.address + b.width and b.address < a.address + a.width):
                continue
            if a.bit is not None and b.bit is not None and a.bit != b.bit:
                continue
            span_a = f"{a.address}..{a.address + a.width - 1}"
            span_b = f"{b.address}..{b.address + b.width - 1}"
            yield (
                f"points[{i}].address",
                f"writable {a.name} ({a.table} {span_a}) overlaps {b.name} ({b.table} {span_b}):"
                " a write to one would change the other",
            )
            break


@attrs.frozen
class ModbusRtuBusConfig(SerialPortConfig):
    name: Name
    kind: Literal["modbus-rtu"] = "modbus-rtu"
    timeout: Duration = Duration(0.5)
    """How long to wait for a response."""
    frame_gap: Duration | None = None
    """Silence between transactions; default t3.5 for the baud rate (1.75 ms above 19200)."""
    retries: int = 1
    """Retries after a CRC or framing error."""
    backoff_initial: Duration = Duration(1.0)
    backoff_max: Duration = Duration(5.0)
    """Per-device backoff after a timeout, so a dead slave costs the bus little, and port
    reopens; short, so a device or adapter that is back is read again within seconds."""
    devices: tuple[ModbusDeviceConfig, ...] = ()

    def topics(self) -> Iterator[str]:
        return _topics(self.name, self.devices)

    def check_write(self, target: str, value: Value) -> Value:
        return check_write(self.name, self.devices, target, value)

    def stall_after(self) -> float:
        return _stall_after(self.devices, self.timeout, self.retries, self.backoff_max)

    def check(self) -> Iterator[tuple[str, str]]:
        yield from self.check_port()
        if self.timeout <= 0:
            yield "timeout", "must be greater than 0"
        if self.retries < 0:
            yield "retries", "must be 0 or more"
        yield from _check_devices(self.devices, self.backoff_initial, self.backoff_max, tcp=False)

    @property
    def char_time(self) -> float:
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return bits / self.baudrate

    @property
    def gap(self) -> float:
        """t3.5 between frames (fixed 1.75 ms above 19200 baud), or the configured gap."""
        if self.frame_gap is not None:
            return self.frame_gap
        return 0.00175 if self.baudrate > 19200 else 3.5 * self.char_time


@attrs.frozen
class ModbusTcpBusConfig:
    name: Name
    host: str
    kind: Literal["modbus-tcp"] = "modbus-tcp"
    port: int = 502
    framing: Literal["mbap", "rtu"] = "mbap"
    """``rtu`` for serial device servers that pass RTU frames over TCP unchanged."""
    timeout: Duration = Duration(1.0)
    connect_timeout: Duration = Duration(5.0)
    pause_after_connect: Duration = Duration(0.0)
    """Some devices drop requests sent right after the connection opens."""
    retries: int = 0
    backoff_initial: Duration = Duration(1.0)
    backoff_max: Duration = Duration(5.0)
    """Reconnect backoff, and per-device backoff after a timeout; short, so a PLC that is
    back is read again within seconds."""
    devices: tuple[ModbusDeviceConfig, ...] = ()

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def topics(self) -> Iterator[str]:
        return _topics(self.name, self.devices)

    def check_write(self, target: str, value: Value) -> Value:
        return check_write(self.name, self.devices, target, value)

    def stall_after(self) -> float:
        return _stall_after(
            self.devices, self.timeout + self.connect_timeout, self.retries, self.backoff_max
        )

    def check(self) -> Iterator[tuple[str, str]]:
        problem = host_problem(self.host)
        if problem:
            yield "host", problem
        if not 1 <= self.port <= 65535:
            yield "port", f"{self.port} is outside 1..65535"
        if self.timeout <= 0:
            yield "timeout", "must be greater than 0"
        if self.connect_timeout <= 0:
            yield "connect_timeout", "must be greater than 0"
        if self.retries < 0:
            yield "retries", "must be 0 or more"
        yield from _check_devices(self.devices, self.backoff_initial, self.backoff_max, tcp=True)


_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?"
_HOST_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


def host_problem(host: str) -> str | None:
    """Why ``host`` is no IP address or host name, or None: catches what people paste from
    a browser or a PLC's manual (``http://...``, ``10.0.0.5:502``, a trailing space)."""
    if not host:
        return "must not be empty: the device's IP address or host name"
    if "://" in host:
        return f'{host!r} is a URL: write only the address, e.g. host = "10.0.0.5"'
    if host != host.strip() or any(c.isspace() for c in host):
        return f'{host!r} contains spaces: write only the address, e.g. host = "10.0.0.5"'
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return None
    if host.startswith("[") and host.endswith("]"):
        return f"{host!r}: write the address without brackets, host = {host[1:-1]!r}"
    name, colon, port = host.rpartition(":")
    bare = name.strip("[]")
    # An IPv6 address with a port is written in brackets; unbracketed, the colon is its own.
    ipv6 = ":" in bare and not name.startswith("[")
    if colon and port.isdigit() and bare and not ipv6 and host_problem(bare) is None:
        return f"{host!r} includes a port: write host = {bare!r} and port = {port}"
    if all(c.isdigit() or c == "." for c in host):
        return f"{host!r} is not a valid IPv4 address (four numbers 0-255, e.g. 10.0.0.5)"
    if len(host) > 253 or not _HOST_NAME.fullmatch(host):
        allowed = "letters, digits, '-', '_' and '.' only"
        return f"{host!r} is not an IP address or host name ({allowed})"
    return None


def _topics(bus: str, devices: tuple[ModbusDeviceConfig, ...]) -> Iterator[str]:
    for d in devices:
        for p in d.points:
            yield f"{bus}/{d.name}/{p.name}"


def find_point(
    bus: str, devices: Sequence[ModbusDeviceConfig], target: str
) -> tuple[ModbusDeviceConfig, ModbusPointConfig]:
    """The device and point that ``target`` (``device/point``) names on bus ``bus``; raises
    ``UnknownPoint`` (with the closest names) when there is none."""
    device_name, _, point_name = target.partition("/")
    for device in devices:
        if device.name == device_name:
            for point in device.points:
                if point.name == point_name:
                    return device, point
    raise unknown_point(bus, target, (f"{d.name}/{p.name}" for d in devices for p in d.points))


def check_write(
    bus: str, devices: Sequence[ModbusDeviceConfig], target: str, value: Value
) -> Value:
    """What ``ModbusBus.write`` checks before any I/O, with the same messages: the point
    exists (``UnknownPoint``), is writable, and ``value`` has its type and range
    (``WriteError`` naming ``bus/device/point`` and what to send instead). Returns the value
    the point will hold: what the registers encode, read as a poll would read them."""
    _, point = find_point(bus, devices, target)
    try:
        payload = datatypes.encode_write(point, value)
    except WriteError as e:
        raise WriteError(f"{bus}/{target}: {e}") from None
    if isinstance(payload, bool):
        return payload
    held = datatypes.decode(point, payload)
    if (
        isinstance(held, float)
        and isinstance(value, int | float)
        and math.isclose(held, value, rel_tol=1e-9)
    ):
        return value  # 33 * 0.1 is 3.3000000000000003: the value sent is what it holds
    return held


def _stall_after(
    devices: tuple[ModbusDeviceConfig, ...], timeout: float, retries: int, backoff_max: float
) -> float:
    # A poll cycle of one device can take (requests x (retries+1) x timeout); devices in
    # backoff still count as progress, so this is generous by design.
    requests = sum(len(d.points) for d in devices) or 1
    longest = max((d.interval for d in devices), default=1.0)
    return 3 * longest + requests * (retries + 1) * timeout + backoff_max + 10.0


def _check_devices(
    devices: tuple[ModbusDeviceConfig, ...],
    backoff_initial: float,
    backoff_max: float,
    *,
    tcp: bool,
) -> Iterator[tuple[str, str]]:
    if backoff_initial <= 0:
        yield "backoff_initial", "must be greater than 0"
    if backoff_max < backoff_initial:
        yield "backoff_max", "must not be below backoff_initial"
    if not devices:
        yield "devices", "a bus needs at least one [[buses.devices]] table"
    yield from duplicate_names("devices", [d.name for d in devices])
    for i, device in enumerate(devices):
        for path, msg in device.check(tcp=tcp):
            yield f"devices[{i}].{path}", msg
