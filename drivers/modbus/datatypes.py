"""Registers <-> values for Modbus points, and the report-by-exception filter.

Pure: no I/O, no clocks (the caller passes ``now``). Depends only on the ``WriteError`` of
``drivers.base`` and the ``Value`` type of ``gateway.core.reading``, and on the point config's
type for annotations only: the config module validates writes with ``encode_write`` (its
``check_write``), so it imports this one.

Byte/word order follows Telegraf: the four-letter names apply to every width (``ABCD`` big
endian, ``BADC`` bytes swapped in each register, ``CDAB`` registers reversed, ``DCBA`` both,
i.e. full little endian); ``AB``/``BA`` and the eight-letter 64-bit names are the same four
cases. Strings only use the byte swap (``BA``, ``BADC``, ``DCBA``): their registers always run
first character first.

Errors: ``WriteError`` for a value a user asked to write that cannot be written (the message
names the point and says what to send instead); ``ValueError`` for a caller bug, such as the
wrong number of registers or ``encode`` on a coil.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from drivers.base import WriteError
from gateway.core.reading import Value

if TYPE_CHECKING:
    from drivers.modbus.config import ModbusPointConfig, Order

# type -> (struct format for big-endian bytes, integer range or None for floats)
_FORMATS: Final[dict[str, tuple[str, tuple[int, int] | None]]] = {
    "int16": (">h", (-(2**15), 2**15 - 1)),
    "uint16": (">H", (0, 2**16 - 1)),
    "int32": (">i", (-(2**31), 2**31 - 1)),
    "uint32": (">I", (0, 2**32 - 1)),
    "int64": (">q", (-(2**63), 2**63 - 1)),
    "uint64": (">Q", (0, 2**64 - 1)),
    "float32": (">f", None),
    "float64": (">d", None),
}
_FLOAT32_MAX: Final[float] = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]

# order -> (bytes swapped within each register, register order reversed)
_SWAPS: Final[dict[Order, tuple[bool, bool]]] = {
    "AB": (False, False),
    "ABCD": (False, False),
    "ABCDEFGH": (False, False),
    "BA": (True, False),
    "BADC": (True, False),
    "BADCFEHG": (True, False),
    "CDAB": (False, True),
    "GHEFCDAB": (False, True),
    "DCBA": (True, True),
    "HGFEDCBA": (True, True),
}


def _swap_bytes(register: int) -> int:
    return ((register & 0xFF) << 8) | (register >> 8)


def _registers_to_bytes(point: ModbusPointConfig, registers: Sequence[int]) -> bytes:
    """Wire-order registers -> big-endian bytes of the value (string: characters in order)."""
    byte_swap, word_swap = _SWAPS[point.order]
    regs = list(registers)
    if word_swap and point.type != "string":
        regs.reverse()
    if byte_swap:
        regs = [_swap_bytes(r) for r in regs]
    return struct.pack(f">{len(regs)}H", *regs)


def _bytes_to_registers(point: ModbusPointConfig, data: bytes) -> list[int]:
    """The inverse of ``_registers_to_bytes`` (the swaps are their own inverses)."""
    byte_swap, word_swap = _SWAPS[point.order]
    regs = list(struct.unpack(f">{len(data) // 2}H", data))
    if byte_swap:
        regs = [_swap_bytes(r) for r in regs]
    if word_swap and point.type != "string":
        regs.reverse()
    return regs


def _check_registers(point: ModbusPointConfig, registers: Sequence[int]) -> None:
    if point.is_bit_table:
        raise ValueError(f"{point.name} is a {point.table}: use decode_bit, not decode")
    if len(registers) != point.width:
        raise ValueError(
            f"{point.name} ({point.type}) takes {point.width} registers, got {len(registers)}"
        )
    for r in registers:
        if not 0 <= r <= 0xFFFF:
            raise ValueError(f"{point.name}: register value {r} is outside 0..65535")


def decode(point: ModbusPointConfig, registers: Sequence[int]) -> int | float | bool | str:
    """The value of a holding/input register point from its ``point.width`` registers, in
    the order they came off the wire.

    Integer types give an ``int`` when scale is 1 and offset is 0, otherwise a ``float``
    (``raw * scale + offset``); float types always give a ``float``. A NaN or infinity in a
    float register is returned as it is: whether that is a bad reading is the caller's call.
    A ``bool`` is bit ``point.bit`` (0 = least significant) of the register as received;
    ``order`` does not apply to it. A string is decoded as latin-1 with trailing NULs and
    spaces removed.
    """
    _check_registers(point, registers)
    if point.type == "bool":
        if point.bit is None:
            raise ValueError(f"{point.name}: a bool on registers needs bit")
        return bool((registers[0] >> point.bit) & 1)
    data = _registers_to_bytes(point, registers)
    if point.type == "string":
        return data.decode("latin-1").rstrip("\x00 ")
    fmt, _ = _FORMATS[point.type]
    raw: int | float = struct.unpack(fmt, data)[0]
    if point.scale == 1 and point.offset == 0:
        return raw  # an int for integer types, a float (even -0.0) for float types
    return float(raw * point.scale + point.offset)


def decode_bit(point: ModbusPointConfig, bit: bool) -> bool:
    """The value of a coil/discrete point (there is nothing to convert)."""
    if not point.is_bit_table:
        raise ValueError(f"{point.name} is a {point.table} register: use decode, not decode_bit")
    return bool(bit)


def _num(x: float) -> str:
    # 32767 * 0.1 is 3276.7000000000003; show what a user would type. Ints stay exact.
    return str(x) if isinstance(x, int) else f"{x:.10g}"


def _check_writable(point: ModbusPointConfig) -> None:
    if point.table in ("discrete", "input"):
        kind = "discrete inputs" if point.table == "discrete" else "input registers"
        raise WriteError(
            f"{point.name} is on {point.table} {point.address}: {kind} are read-only in "
            "Modbus; write to a coil or holding register instead"
        )
    if not point.writable:
        raise WriteError(
            f"{point.name} is read-only: set writable = true in its [[buses.devices.points]] "
            "table to allow writes"
        )


def _a(type_name: str) -> str:
    return f"an {type_name}" if type_name.startswith("int") else f"a {type_name}"


def _type_name(value: Value) -> str:
    return "null" if value is None else type(value).__name__


def _check_limits(point: ModbusPointConfig, value: float) -> None:
    if point.min is not None and value < point.min:
        raise WriteError(
            f"{point.name}: {_num(value)} is below min ({_num(point.min)}){_span(point)}"
        )
    if point.max is not None and value > point.max:
        raise WriteError(
            f"{point.name}: {_num(value)} is above max ({_num(point.max)}){_span(point)}"
        )


def _span(point: ModbusPointConfig) -> str:
    if point.min is not None and point.max is not None:
        return f"; send a value in {_num(point.min)}..{_num(point.max)}"
    if point.min is not None:
        return f"; send {_num(point.min)} or more"
    return f"; send {_num(point.max or 0)} or less"


def _engineering_range(point: ModbusPointConfig, low: float, high: float) -> str:
    a = low * point.scale + point.offset
    b = high * point.scale + point.offset
    return f"{_num(min(a, b))}..{_num(max(a, b))}"


def _unscale(point: ModbusPointConfig, value: float) -> float:
    """``(value - offset) / scale``; infinite when that overflows a float."""
    if point.scale == 1 and point.offset == 0:
        return float(value)  # keeps -0.0
    try:
        return (value - point.offset) / point.scale
    except OverflowError:  # an int too large for a float
        return math.inf


def _round_raw(x: float) -> int:
    """Nearest integer, halves away from zero, after dropping float noise: 23.45 / 0.1 is
    234.49999999999997 in binary floating point, but a user writing 23.45 means 234.5."""
    r = round(x, 6)
    return int(math.copysign(math.floor(abs(r) + 0.5), r))


def _encode_number(point: ModbusPointConfig, value: Value) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WriteError(
            f"{point.name} is {_a(point.type)}: send a number, not {_type_name(value)} {value!r}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise WriteError(f"{point.name}: {value!r} is not a finite number; send a finite number")
    _check_limits(point, value)
    fmt, int_range = _FORMATS[point.type]
    scaled = point.scale != 1 or point.offset != 0
    if int_range is not None:
        low, high = int_range
        if not scaled:
            raw = value if isinstance(value, int) else _round_raw(value)  # ints stay exact
            if not low <= raw <= high:
                raise WriteError(
                    f"{point.name}: {_num(value)} is outside {point.type} ({low}..{high}); "
                    "send a value in that range"
                )
            return struct.pack(fmt, raw)
        exact = _unscale(point, value)
        raw_scaled = _round_raw(exact) if math.isfinite(exact) else None
        raw_text = f"raw {_num(float(raw_scaled))}" if raw_scaled is not None else "a raw value"
        if raw_scaled is None or not low <= raw_scaled <= high:
            raise WriteError(
                f"{point.name}: {_num(value)} becomes {raw_text} (scale {_num(point.scale)}, "
                f"offset {_num(point.offset)}), outside {point.type} ({low}..{high}); send a "
                f"value in {_engineering_range(point, low, high)}"
            )
        return struct.pack(fmt, raw_scaled)
    limit = _FLOAT32_MAX if point.type == "float32" else sys.float_info.max
    raw_float = _unscale(point, value)
    try:
        if not math.isfinite(raw_float):
            raise OverflowError
        return struct.pack(fmt, raw_float)
    except OverflowError:  # struct's answer to a finite value beyond the float32 range
        how = f" (scale {_num(point.scale)}, offset {_num(point.offset)})" if scaled else ""
        raise WriteError(
            f"{point.name}: {_num(value)}{how} is outside {point.type}; send a value in "
            + _engineering_range(point, -limit, limit)
        ) from None


def _encode_string(point: ModbusPointConfig, value: Value) -> bytes:
    if not isinstance(value, str):
        raise WriteError(f"{point.name} is a string: send text, not {_type_name(value)} {value!r}")
    size = 2 * point.width
    if not value.isascii():
        raise WriteError(f"{point.name}: {value!r} is not ASCII; send ASCII characters only")
    if len(value) > size:
        raise WriteError(
            f"{point.name}: {value!r} has {len(value)} characters, more than the {size} that "
            f"fit in {point.width} registers; send at most {size}"
        )
    return value.encode("ascii").ljust(size, b"\x00")


def encode(point: ModbusPointConfig, value: Value) -> list[int]:
    """The registers to write for ``value``, in wire order (``point.width`` of them).

    Numbers are converted to raw with ``(value - offset) / scale``, rounded to the nearest
    integer (ties to even) for integer types. Strings are padded with NULs. Raises
    ``WriteError`` when the point is not writable, ``value`` has the wrong type, is not finite,
    is outside the point's min/max, or does not fit the register type after scaling, and for a
    string that is not ASCII or too long. A bool in a register bit needs read-modify-write: use
    ``encode_bit`` and ``set_bit`` instead.
    """
    if point.is_bit_table:
        raise ValueError(f"{point.name} is a {point.table}: use encode_bit, not encode")
    if point.type == "bool":
        raise ValueError(
            f"{point.name} is a bit of a register: use encode_bit and set_bit "
            "(read-modify-write), not encode"
        )
    _check_writable(point)
    encode_value = _encode_string if point.type == "string" else _encode_number
    return _bytes_to_registers(point, encode_value(point, value))


def encode_bit(point: ModbusPointConfig, value: Value) -> bool:
    """The bit to write for a bool point: a coil, or a bit of a holding register (then combine
    it with the register just read, using ``set_bit``). Raises ``WriteError`` like
    ``encode``; only ``True``/``False`` are accepted, not 0/1 or strings."""
    if point.type != "bool":
        raise ValueError(f"{point.name} is a {point.type}: use encode, not encode_bit")
    _check_writable(point)
    if not isinstance(value, bool):
        raise WriteError(
            f"{point.name} is a bool: send true or false, not {_type_name(value)} {value!r}"
        )
    return value


def encode_write(point: ModbusPointConfig, value: Value) -> bool | list[int]:
    """What a write of ``value`` to ``point`` sends: the bit of a bool point (a coil, or a
    bit of a holding register to combine with ``set_bit``), or the registers of any other.
    Raises ``WriteError`` as ``encode`` / ``encode_bit`` do: every check a write makes before
    any I/O, which is why ``check_write`` of the bus config calls this too."""
    if point.type == "bool":
        return encode_bit(point, value)
    return encode(point, value)


def set_bit(register: int, bit: int, value: bool) -> int:
    """``register`` with bit ``bit`` (0 = least significant) set to ``value``, for the
    read-modify-write of a bool in a holding register."""
    if not 0 <= register <= 0xFFFF:
        raise ValueError(f"register value {register} is outside 0..65535")
    if not 0 <= bit <= 15:
        raise ValueError(f"bit {bit} is outside 0..15")
    return register | (1 << bit) if value else register & ~(1 << bit)


class ReportFilter:
    """Report-by-exception for one point: decides whether a new value is worth publishing.

    Always reports the first value, a change of quality, and a change of the bad reason.
    Without a deadband every value is reported. With one, a number is reported when it moved
    more than the deadband from the last *reported* value (so slow drift is not lost), a
    bool or string when it differs, and anything once ``heartbeat`` seconds passed since the
    last report. State changes only when the answer is yes.
    """

    __slots__ = ("_deadband", "_heartbeat", "_last", "_time")

    def __init__(self, point: ModbusPointConfig) -> None:
        self._deadband = point.deadband
        self._heartbeat = point.heartbeat
        # (value, good, reason) of the last report, and when it was made
        self._last: tuple[Value, bool, str | None] | None = None
        self._time = 0.0

    def should_report(
        self, value: Value, good: bool, now: float, reason: str | None = None
    ) -> bool:
        if self._report(value, good, now, reason):
            self._last = (value, good, reason)
            self._time = now
            return True
        return False

    def _report(self, value: Value, good: bool, now: float, reason: str | None) -> bool:
        if self._last is None or self._deadband is None:
            return True
        last_value, last_good, last_reason = self._last
        if good != last_good or reason != last_reason:
            return True
        if self._heartbeat is not None and now - self._time >= self._heartbeat:
            return True
        return _moved(last_value, value, self._deadband)


def _moved(last: Value, value: Value, deadband: float) -> bool:
    numbers = (int, float)
    if (
        isinstance(last, numbers)
        and isinstance(value, numbers)
        and not isinstance(last, bool)
        and not isinstance(value, bool)
    ):
        if value == last:
            return False
        if math.isnan(value) or math.isnan(last):
            # NaN compares false with everything: a move to, from or between NaNs is news
            # unless both are NaN.
            return not (math.isnan(value) and math.isnan(last))
        return abs(value - last) > deadband
    return type(value) is not type(last) or value != last
