"""Registers <-> values for every type and byte/word order, write checks, report-by-exception.

Known vectors are written out by hand (from the IEEE 754 / two's complement bit patterns), so
the tests do not just compare ``struct`` with itself.
"""

from __future__ import annotations

import math
from typing import Any, cast

import pytest

from drivers.base import WriteError
from drivers.modbus.config import DataType, ModbusPointConfig, Order
from drivers.modbus.datatypes import (
    ReportFilter,
    decode,
    decode_bit,
    encode,
    encode_bit,
    set_bit,
)
from gateway.core.configtypes import Duration, Name
from gateway.core.reading import Value


def point(type: str = "uint16", order: str = "ABCD", **kwargs: Any) -> ModbusPointConfig:
    """A point config as the loader would build it; fails if the config itself is invalid."""
    kwargs.setdefault("table", "holding")
    kwargs.setdefault("address", 0)
    kwargs.setdefault("name", Name("p"))
    p = ModbusPointConfig(type=cast(DataType, type), order=cast(Order, order), **kwargs)
    assert list(p.check()) == []
    return p


def writable(type: str = "uint16", order: str = "ABCD", **kwargs: Any) -> ModbusPointConfig:
    return point(type, order, writable=True, **kwargs)


# (type, value, registers in wire order for ABCD, BADC, CDAB, DCBA)
VECTORS: list[tuple[str, int | float, dict[str, list[int]]]] = [
    (
        "float32",
        123.456,  # 0x42F6E979
        {
            "ABCD": [0x42F6, 0xE979],
            "BADC": [0xF642, 0x79E9],
            "CDAB": [0xE979, 0x42F6],
            "DCBA": [0x79E9, 0xF642],
        },
    ),
    (
        "float32",
        -1.5,  # 0xBFC00000
        {
            "ABCD": [0xBFC0, 0x0000],
            "BADC": [0xC0BF, 0x0000],
            "CDAB": [0x0000, 0xBFC0],
            "DCBA": [0x0000, 0xC0BF],
        },
    ),
    (
        "int32",
        -2,  # 0xFFFFFFFE
        {
            "ABCD": [0xFFFF, 0xFFFE],
            "BADC": [0xFFFF, 0xFEFF],
            "CDAB": [0xFFFE, 0xFFFF],
            "DCBA": [0xFEFF, 0xFFFF],
        },
    ),
    (
        "uint32",
        0xDEADBEEF,
        {
            "ABCD": [0xDEAD, 0xBEEF],
            "BADC": [0xADDE, 0xEFBE],
            "CDAB": [0xBEEF, 0xDEAD],
            "DCBA": [0xEFBE, 0xADDE],
        },
    ),
    (
        "uint64",
        0x0123456789ABCDEF,
        {
            "ABCD": [0x0123, 0x4567, 0x89AB, 0xCDEF],
            "BADC": [0x2301, 0x6745, 0xAB89, 0xEFCD],
            "CDAB": [0xCDEF, 0x89AB, 0x4567, 0x0123],
            "DCBA": [0xEFCD, 0xAB89, 0x6745, 0x2301],
        },
    ),
    (
        "uint64",
        2**64 - 1,  # beyond a float's 53 bits: must stay exact
        {order: [0xFFFF] * 4 for order in ("ABCD", "BADC", "CDAB", "DCBA")},
    ),
    (
        "int64",
        -1234567890123456789,  # 0xEEDDEF0B82167EEB
        {
            "ABCD": [0xEEDD, 0xEF0B, 0x8216, 0x7EEB],
            "BADC": [0xDDEE, 0x0BEF, 0x1682, 0xEB7E],
            "CDAB": [0x7EEB, 0x8216, 0xEF0B, 0xEEDD],
            "DCBA": [0xEB7E, 0x1682, 0x0BEF, 0xDDEE],
        },
    ),
    (
        "int64",
        2**63 - 1,
        {
            "ABCD": [0x7FFF, 0xFFFF, 0xFFFF, 0xFFFF],
            "BADC": [0xFF7F, 0xFFFF, 0xFFFF, 0xFFFF],
            "CDAB": [0xFFFF, 0xFFFF, 0xFFFF, 0x7FFF],
            "DCBA": [0xFFFF, 0xFFFF, 0xFFFF, 0xFF7F],
        },
    ),
    (
        "float64",
        math.pi,  # 0x400921FB54442D18
        {
            "ABCD": [0x4009, 0x21FB, 0x5444, 0x2D18],
            "BADC": [0x0940, 0xFB21, 0x4454, 0x182D],
            "CDAB": [0x2D18, 0x5444, 0x21FB, 0x4009],
            "DCBA": [0x182D, 0x4454, 0xFB21, 0x0940],
        },
    ),
    (
        "float64",
        -2.5e-3,  # 0xBF647AE147AE147B
        {
            "ABCD": [0xBF64, 0x7AE1, 0x47AE, 0x147B],
            "BADC": [0x64BF, 0xE17A, 0xAE47, 0x7B14],
            "CDAB": [0x147B, 0x47AE, 0x7AE1, 0xBF64],
            "DCBA": [0x7B14, 0xAE47, 0xE17A, 0x64BF],
        },
    ),
    # One register: reversing the word order of a single register changes nothing.
    (
        "int16",
        -1,
        {order: [0xFFFF] for order in ("ABCD", "BADC", "CDAB", "DCBA")},
    ),
    (
        "int16",
        -2,  # 0xFFFE
        {"ABCD": [0xFFFE], "BADC": [0xFEFF], "CDAB": [0xFFFE], "DCBA": [0xFEFF]},
    ),
    (
        "uint16",
        0x1234,
        {"ABCD": [0x1234], "BADC": [0x3412], "CDAB": [0x1234], "DCBA": [0x3412]},
    ),
]

KNOWN = [
    pytest.param(type_, order, value, regs, id=f"{type_}-{value!r}-{order}")
    for type_, value, by_order in VECTORS
    for order, regs in by_order.items()
]

# The two- and eight-letter names are the same four cases.
ALIASES = {
    1: {"AB": "ABCD", "BA": "BADC"},
    4: {"ABCDEFGH": "ABCD", "BADCFEHG": "BADC", "GHEFCDAB": "CDAB", "HGFEDCBA": "DCBA"},
}
ALIASED = [
    pytest.param(type_, alias, value, by_order[order], id=f"{type_}-{value!r}-{alias}")
    for type_, value, by_order in VECTORS
    for alias, order in ALIASES.get(len(by_order["ABCD"]), {}).items()
]


@pytest.mark.parametrize(("type_", "order", "value", "regs"), KNOWN + ALIASED)
def test_decode_known_vector(type_: str, order: str, value: float, regs: list[int]) -> None:
    decoded = decode(point(type_, order), regs)
    assert decoded == pytest.approx(value, rel=1e-7) if type_ == "float32" else decoded == value
    assert type(decoded) is (float if type_.startswith("float") else int)


@pytest.mark.parametrize(("type_", "order", "value", "regs"), KNOWN + ALIASED)
def test_encode_known_vector(type_: str, order: str, value: float, regs: list[int]) -> None:
    assert encode(writable(type_, order), value) == regs


ORDERS_4 = ["ABCD", "BADC", "CDAB", "DCBA"]
ORDERS_BY_TYPE = {
    "int16": [*ORDERS_4, "AB", "BA"],
    "uint16": [*ORDERS_4, "AB", "BA"],
    "int32": ORDERS_4,
    "uint32": ORDERS_4,
    "float32": ORDERS_4,
    "int64": [*ORDERS_4, "ABCDEFGH", "BADCFEHG", "GHEFCDAB", "HGFEDCBA"],
    "uint64": [*ORDERS_4, "ABCDEFGH", "BADCFEHG", "GHEFCDAB", "HGFEDCBA"],
    "float64": [*ORDERS_4, "ABCDEFGH", "BADCFEHG", "GHEFCDAB", "HGFEDCBA"],
}
SAMPLES: dict[str, list[int | float]] = {
    "int16": [-(2**15), -1, 0, 1, 0x1234, 2**15 - 1],
    "uint16": [0, 1, 0x1234, 0xFF00, 2**16 - 1],
    "int32": [-(2**31), -70000, 0, 70000, 2**31 - 1],
    "uint32": [0, 0x12345678, 2**32 - 1],
    "int64": [-(2**63), -(2**53) - 1, 0, 2**53 + 1, 2**63 - 1],
    "uint64": [0, 2**53 + 1, 0xFEDCBA9876543210, 2**64 - 1],
    "float32": [0.0, -0.0, 1.5, -273.15, 3.4028234663852886e38, 1.401298464324817e-45],
    "float64": [0.0, -0.0, math.pi, -1e-300, 1.7976931348623157e308, 5e-324],
}
ROUND_TRIPS = [
    pytest.param(type_, order, value, id=f"{type_}-{order}-{value!r}")
    for type_, orders in ORDERS_BY_TYPE.items()
    for order in orders
    for value in SAMPLES[type_]
]


@pytest.mark.parametrize(("type_", "order", "value"), ROUND_TRIPS)
def test_round_trip(type_: str, order: str, value: float) -> None:
    p = writable(type_, order)
    regs = encode(p, value)
    assert len(regs) == p.width
    assert all(0 <= r <= 0xFFFF for r in regs)
    decoded = decode(p, regs)
    assert isinstance(decoded, int | float)
    if type_ == "float32":
        assert decoded == pytest.approx(value, rel=1e-7)
    else:
        assert decoded == value
    assert math.copysign(1, decoded) == math.copysign(1, value)  # -0.0 too


@pytest.mark.parametrize("order", ORDERS_4)
def test_int_and_float_views_of_the_same_order_agree(order: str) -> None:
    # The word swap reverses all registers of a 64-bit value, not pairs of them.
    as_int = encode(writable("uint64", order), 0x400921FB54442D18)
    assert as_int == encode(writable("float64", order), math.pi)


def test_float_nan_and_infinity_are_returned_as_floats() -> None:
    assert math.isnan(decode(point("float32"), [0x7FC0, 0x0000]))  # type: ignore[arg-type]
    assert decode(point("float32"), [0x7F80, 0x0000]) == math.inf
    assert decode(point("float32", "CDAB"), [0x0000, 0xFF80]) == -math.inf
    assert math.isnan(decode(point("float64"), [0x7FF8, 0, 0, 0]))  # type: ignore[arg-type]


# Strings: two characters per register, first character in the high byte unless swapped.
STRINGS = [
    pytest.param("AB", [0x4845, 0x4C4C, 0x4F00], "HELLO", id="AB"),
    pytest.param("ABCD", [0x4845, 0x4C4C, 0x4F00], "HELLO", id="ABCD"),
    pytest.param("CDAB", [0x4845, 0x4C4C, 0x4F00], "HELLO", id="CDAB-word-order-ignored"),
    pytest.param("BA", [0x4548, 0x4C4C, 0x004F], "HELLO", id="BA"),
    pytest.param("BADC", [0x4548, 0x4C4C, 0x004F], "HELLO", id="BADC"),
    pytest.param("DCBA", [0x4548, 0x4C4C, 0x004F], "HELLO", id="DCBA"),
]


@pytest.mark.parametrize(("order", "regs", "text"), STRINGS)
def test_string_decode(order: str, regs: list[int], text: str) -> None:
    assert decode(point("string", order, length=3), regs) == text


@pytest.mark.parametrize(("order", "regs", "text"), STRINGS)
def test_string_encode_pads_with_nuls(order: str, regs: list[int], text: str) -> None:
    assert encode(writable("string", order, length=3), text) == regs


@pytest.mark.parametrize(
    ("regs", "text"),
    [
        ([0x4142, 0x2020], "AB"),  # trailing spaces
        ([0x4142, 0x0000], "AB"),  # trailing NULs
        ([0x4142, 0x2000], "AB"),  # both
        ([0x2041, 0x2042], " A B"),  # inner and leading spaces stay
        ([0x0000, 0x0000], ""),
        ([0x4361, 0x66E9], "Café"),  # latin-1
    ],
)
def test_string_decode_strips_and_reads_latin1(regs: list[int], text: str) -> None:
    assert decode(point("string", length=2), regs) == text


@pytest.mark.parametrize("order", ["AB", "BA", "ABCD", "BADC", "CDAB", "DCBA"])
@pytest.mark.parametrize("text", ["", "X", "ABCD", "serial-0001"])
def test_string_round_trip(order: str, text: str) -> None:
    p = writable("string", order, length=6)
    assert decode(p, encode(p, text)) == text


@pytest.mark.parametrize(
    ("bit", "register", "expected"),
    [
        (0, 0x0001, True),
        (0, 0xFFFE, False),
        (1, 0x0002, True),
        (15, 0x8000, True),
        (15, 0x7FFF, False),
        (8, 0x0100, True),
        (7, 0x0100, False),
    ],
)
@pytest.mark.parametrize("table", ["holding", "input"])
def test_bool_bit_of_register(bit: int, register: int, expected: bool, table: str) -> None:
    assert decode(point("bool", bit=bit, table=table), [register]) is expected


@pytest.mark.parametrize("table", ["coil", "discrete"])
@pytest.mark.parametrize("value", [True, False])
def test_decode_bit(table: str, value: bool) -> None:
    assert decode_bit(point("bool", table=table), value) is value


@pytest.mark.parametrize(
    ("register", "bit", "value", "expected"),
    [
        (0x00F0, 0, True, 0x00F1),
        (0x00F0, 4, False, 0x00E0),
        (0x00F0, 4, True, 0x00F0),
        (0x0000, 15, True, 0x8000),
        (0xFFFF, 15, False, 0x7FFF),
        (0xFFFF, 0, False, 0xFFFE),
    ],
)
def test_set_bit(register: int, bit: int, value: bool, expected: int) -> None:
    assert set_bit(register, bit, value) == expected


@pytest.mark.parametrize(("register", "bit"), [(-1, 0), (0x10000, 0), (0, -1), (0, 16)])
def test_set_bit_rejects_out_of_range(register: int, bit: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        set_bit(register, bit, True)


def test_encode_bit_for_coil_and_register_bit() -> None:
    assert encode_bit(writable("bool", table="coil"), True) is True
    assert encode_bit(writable("bool", table="coil"), False) is False
    p = writable("bool", bit=3)
    assert p.bit is not None
    assert set_bit(0x0F00, p.bit, encode_bit(p, True)) == 0x0F08


# Scale and offset: value = raw * scale + offset.
@pytest.mark.parametrize(
    ("type_", "scale", "offset", "raw", "value"),
    [
        ("uint16", 0.1, 0.0, [2345], 234.5),
        ("uint16", 0.1, -40.0, [650], 25.0),
        ("uint16", 0.1, -40.0, [0], -40.0),
        ("int16", 0.01, 0.0, [0xFF38], -2.0),  # raw -200
        ("int16", -1.0, 0.0, [0xFFFB], 5.0),  # raw -5
        ("int32", 1.0, 1000.0, [0xFFFF, 0xFFFF], 999.0),  # raw -1
        ("float32", 2.0, 1.0, [0x3FC0, 0x0000], 4.0),  # raw 1.5
    ],
)
def test_scale_and_offset(
    type_: str, scale: float, offset: float, raw: list[int], value: float
) -> None:
    p = writable(type_, scale=scale, offset=offset)
    decoded = decode(p, raw)
    assert type(decoded) is float
    assert decoded == pytest.approx(value)
    assert encode(p, value) == raw


def test_integer_types_stay_int_without_scale_and_offset() -> None:
    assert decode(point("uint16"), [2345]) == 2345
    assert type(decode(point("uint16"), [2345])) is int
    assert type(decode(point("float32"), [0x4000, 0x0000])) is float  # 2.0, still a float


def test_encode_rounds_to_nearest_raw() -> None:
    p = writable("uint16", scale=0.1)
    assert encode(p, 234.56) == [2346]
    assert encode(p, 234.54) == [2345]
    assert encode(writable("int16"), 2.7) == [3]
    assert encode(writable("int16"), -2.7) == [0xFFFD]
    # 23.45 / 0.1 is 234.4999... in binary floating point; the user means 234.5 -> 235.
    assert encode(p, 23.45) == [235]
    assert encode(writable("int16", scale=0.1), -23.45) == [0x10000 - 235]
    assert encode(writable("int16"), 2.5) == [3]  # halves away from zero


def test_encode_accepts_int_for_float_type() -> None:
    assert encode(writable("float32"), 2) == [0x4000, 0x0000]


# Every write refusal, with its message.
@pytest.mark.parametrize(
    ("p", "value", "message"),
    [
        pytest.param(
            point("uint16"),
            1,
            "p is read-only: set writable = true in its [[buses.devices.points]] table to "
            "allow writes",
            id="not-writable",
        ),
        pytest.param(
            point("uint16", table="input"),
            1,
            "p is on input 0: input registers are read-only in Modbus; write to a coil or "
            "holding register instead",
            id="input-register",
        ),
        pytest.param(
            writable("int16"), True, "p is an int16: send a number, not bool True", id="bool-int"
        ),
        pytest.param(
            writable("float32"),
            "12.5",
            "p is a float32: send a number, not str '12.5'",
            id="str-float",
        ),
        pytest.param(
            writable("uint16"), None, "p is a uint16: send a number, not null None", id="none"
        ),
        pytest.param(
            writable("string", length=2), 12, "p is a string: send text, not int 12", id="int-str"
        ),
        pytest.param(
            writable("float32"),
            math.nan,
            "p: nan is not a finite number; send a finite number",
            id="nan",
        ),
        pytest.param(
            writable("float64"),
            math.inf,
            "p: inf is not a finite number",
            id="inf",
        ),
        pytest.param(
            writable("int16"),
            40000,
            "p: 40000 is outside int16 (-32768..32767); send a value in that range",
            id="int16-overflow",
        ),
        pytest.param(
            writable("uint16"),
            -1,
            "p: -1 is outside uint16 (0..65535); send a value in that range",
            id="uint16-negative",
        ),
        pytest.param(
            writable("uint64"),
            2**64,
            "p: 18446744073709551616 is outside uint64 (0..18446744073709551615)",
            id="uint64-overflow",
        ),
        pytest.param(
            writable("int16", scale=0.1),
            7000,
            "p: 7000 becomes raw 70000 (scale 0.1, offset 0), outside int16 (-32768..32767); "
            "send a value in -3276.8..3276.7",
            id="scaled-overflow",
        ),
        pytest.param(
            writable("uint16", scale=0.1, offset=-40),
            -41,
            "p: -41 becomes raw -10 (scale 0.1, offset -40), outside uint16 (0..65535); "
            "send a value in -40..6513.5",
            id="below-offset",
        ),
        pytest.param(
            writable("int16", scale=-2),
            70000,
            "send a value in -65534..65536",  # negative scale: the range is sorted
            id="negative-scale",
        ),
        pytest.param(
            writable("int32", scale=1e-300),
            1.0,
            "p: 1 becomes raw 1e+300 (scale 1e-300, offset 0), outside int32 "
            "(-2147483648..2147483647); send a value in -2.147483648e-291..2.147483647e-291",
            id="scaled-huge",
        ),
        pytest.param(
            writable("int32", scale=1e-300),
            1e10,
            "p: 1e+10 becomes a raw value (scale 1e-300, offset 0), outside int32",
            id="scaled-to-infinity",
        ),
        pytest.param(
            writable("float32"),
            1e39,
            "p: 1e+39 is outside float32; send a value in -3.402823466e+38..3.402823466e+38",
            id="float32-overflow",
        ),
        pytest.param(
            writable("float64", scale=1e-300),
            1e10,
            "p: 1e+10 (scale 1e-300, offset 0) is outside float64; send a value in "
            "-179769313.5..179769313.5",
            id="float64-overflow",
        ),
        pytest.param(
            writable("float32", min=0, max=100),
            150,
            "p: 150 is above max (100); send a value in 0..100",
            id="above-max",
        ),
        pytest.param(
            writable("int16", min=-10.5, max=10),
            -11,
            "p: -11 is below min (-10.5); send a value in -10.5..10",
            id="below-min",
        ),
        pytest.param(
            writable("uint16", min=5), 4, "p: 4 is below min (5); send 5 or more", id="min-only"
        ),
        pytest.param(
            writable("uint16", scale=0.1, max=50),
            50.5,
            "p: 50.5 is above max (50); send 50 or less",
            id="max-only-in-engineering-units",
        ),
        pytest.param(
            writable("string", length=2),
            "ABCDE",
            "p: 'ABCDE' has 5 characters, more than the 4 that fit in 2 registers; send at most 4",
            id="string-too-long",
        ),
        pytest.param(
            writable("string", length=2),
            "Café",
            "p: 'Café' is not ASCII; send ASCII characters only",
            id="string-not-ascii",
        ),
    ],
)
def test_encode_refuses(p: ModbusPointConfig, value: Value, message: str) -> None:
    with pytest.raises(WriteError) as info:
        encode(p, value)
    assert message in str(info.value)


def test_encode_refusal_on_discrete_input() -> None:
    with pytest.raises(WriteError, match="discrete inputs are read-only in Modbus"):
        encode_bit(point("bool", table="discrete"), True)


@pytest.mark.parametrize(
    ("p", "value", "message"),
    [
        pytest.param(
            point("bool", table="coil"),
            True,
            "p is read-only: set writable = true",
            id="not-writable",
        ),
        pytest.param(
            writable("bool", table="coil"),
            1,
            "p is a bool: send true or false, not int 1",
            id="int",
        ),
        pytest.param(
            writable("bool", bit=0),
            "true",
            "p is a bool: send true or false, not str 'true'",
            id="str",
        ),
        pytest.param(writable("bool", bit=0), None, "send true or false, not null None", id="none"),
    ],
)
def test_encode_bit_refuses(p: ModbusPointConfig, value: Value, message: str) -> None:
    with pytest.raises(WriteError) as info:
        encode_bit(p, value)
    assert message in str(info.value)


def test_limits_accept_the_edges() -> None:
    p = writable("int16", min=-10, max=10)
    assert encode(p, -10) == [0xFFF6]
    assert encode(p, 10) == [0x000A]


# Misuse by the caller (the poller), not by the user: ValueError.
def test_caller_errors() -> None:
    with pytest.raises(ValueError, match="takes 2 registers, got 1"):
        decode(point("float32"), [0])
    with pytest.raises(ValueError, match=r"outside 0\.\.65535"):
        decode(point("uint16"), [0x10000])
    with pytest.raises(ValueError, match="use decode_bit"):
        decode(point("bool", table="coil"), [1])
    with pytest.raises(ValueError, match="use decode, not decode_bit"):
        decode_bit(point("bool", bit=0), True)
    with pytest.raises(ValueError, match="use encode_bit"):
        encode(writable("bool", table="coil"), True)
    with pytest.raises(ValueError, match="use encode_bit and set_bit"):
        encode(writable("bool", bit=2), True)
    with pytest.raises(ValueError, match="use encode, not encode_bit"):
        encode_bit(writable("uint16"), True)


# Report by exception.
def reports(f: ReportFilter, steps: list[tuple[float, Value]]) -> list[bool]:
    return [f.should_report(value, True, now) for now, value in steps]


def test_first_value_is_always_reported() -> None:
    f = ReportFilter(point(deadband=100.0, heartbeat=Duration(3600.0)))
    assert f.should_report(1.0, True, 0.0)


def test_first_bad_value_is_reported() -> None:
    f = ReportFilter(point(deadband=100.0))
    assert f.should_report(None, False, 0.0, "timeout")


def test_without_deadband_every_value_is_reported() -> None:
    f = ReportFilter(point())
    assert reports(f, [(0, 1), (1, 1), (2, 1), (3, 2)]) == [True, True, True, True]


def test_deadband_compares_with_the_last_reported_value() -> None:
    f = ReportFilter(point("float32", deadband=0.5))
    steps: list[tuple[float, Value]] = [
        (0, 10.0),
        (1, 10.4),  # moved 0.4
        (2, 10.5),  # exactly the deadband: not more than it
        (3, 10.6),  # 0.6 from 10.0: slow drift is not lost
        (4, 10.9),  # 0.3 from 10.6
        (5, 10.0),  # 0.6 down
        (6, 9.4),  # 0.6 down from 10.0
    ]
    assert reports(f, steps) == [True, False, False, True, False, True, True]


def test_deadband_zero_reports_every_change_only() -> None:
    f = ReportFilter(point(deadband=0.0))
    assert reports(f, [(0, 5), (1, 5), (2, 6), (3, 6)]) == [True, False, True, False]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([True, True, False, False, True], [True, False, True, False, True]),
        (["a", "a", "b", "b"], [True, False, True, False]),
        ([1.0, math.nan, math.nan, 1.0], [True, True, False, True]),
        ([1.0, math.inf, math.inf, -math.inf], [True, True, False, True]),
        ([1, True, 1], [True, True, True]),  # a bool is not a number here
    ],
)
def test_deadband_with_non_numbers_reports_changes(
    values: list[Value], expected: list[bool]
) -> None:
    f = ReportFilter(point("float32", deadband=1000.0))
    assert reports(f, list(enumerate(values))) == expected


def test_heartbeat_reports_an_unchanged_value() -> None:
    f = ReportFilter(point(deadband=1.0, heartbeat=Duration(60.0)))
    steps: list[tuple[float, Value]] = [
        (0, 5),
        (30, 5),
        (59.9, 5),
        (60, 5),  # heartbeat due
        (61, 5),
        (119.9, 5),
        (120, 5),
    ]
    assert reports(f, steps) == [True, False, False, True, False, False, True]


def test_heartbeat_counts_from_the_last_report_of_any_kind() -> None:
    f = ReportFilter(point(deadband=1.0, heartbeat=Duration(60.0)))
    steps: list[tuple[float, Value]] = [(0, 5), (50, 10), (100, 10), (110, 10)]
    assert reports(f, steps) == [True, True, False, True]


def test_quality_and_reason_changes_are_reported() -> None:
    f = ReportFilter(point(deadband=10.0))
    assert f.should_report(1, True, 0)
    assert f.should_report(None, False, 1, "timeout")  # good -> bad
    assert not f.should_report(None, False, 2, "timeout")  # same reason
    assert f.should_report(None, False, 3, "crc")  # reason changed
    assert not f.should_report(None, False, 4, "crc")
    assert f.should_report(1, True, 5)  # bad -> good, although the value did not move
    assert not f.should_report(2, True, 6)  # and the deadband applies again from 1
    assert f.should_report(2, False, 7, "exception 02 illegal address")


def test_bad_readings_repeat_on_heartbeat() -> None:
    f = ReportFilter(point(deadband=1.0, heartbeat=Duration(10.0)))
    assert f.should_report(None, False, 0, "timeout")
    assert not f.should_report(None, False, 5, "timeout")
    assert f.should_report(None, False, 10, "timeout")
