"""The Modbus request planner: points -> as few reads as possible, within the limits."""

from __future__ import annotations

import functools
import random

import pytest

from drivers.modbus.config import (
    DataType,
    ModbusDeviceConfig,
    ModbusPointConfig,
    Table,
)
from drivers.modbus.planner import PlannedRead, format_plan, plan_device
from gateway.core.configtypes import Duration, Name

# (table, address, count, point names in plan order)
Shape = tuple[Table, int, int, tuple[str, ...]]


def point(
    name: str,
    address: int,
    type: DataType = "uint16",
    *,
    table: Table = "holding",
    bit: int | None = None,
    length: int | None = None,
) -> ModbusPointConfig:
    if table in ("coil", "discrete"):
        type = "bool"
    return ModbusPointConfig(
        name=Name(name), table=table, address=address, type=type, bit=bit, length=length
    )


def device(
    *points: ModbusPointConfig,
    max_gap: int = 0,
    max_registers_per_read: int = 125,
    max_bits_per_read: int = 2000,
) -> ModbusDeviceConfig:
    return ModbusDeviceConfig(
        name=Name("meter-1"),
        max_gap=max_gap,
        max_registers_per_read=max_registers_per_read,
        max_bits_per_read=max_bits_per_read,
        points=points,
    )


def shape(reads: tuple[PlannedRead, ...]) -> list[Shape]:
    return [(r.table, r.address, r.count, tuple(p.point.name for p in r.points)) for r in reads]


def check_valid(dev: ModbusDeviceConfig, reads: tuple[PlannedRead, ...]) -> None:
    """Every point read exactly once, whole, inside one legal request."""
    placed = [p.point for r in reads for p in r.points]
    assert sorted(placed, key=id) == sorted(dev.points, key=id)
    for r in reads:
        bits = r.table in ("coil", "discrete")
        limit = min(dev.max_bits_per_read, 2000) if bits else min(dev.max_registers_per_read, 125)
        assert 1 <= r.count <= limit
        covered: set[int] = set()
        for p in r.points:
            assert p.point.table == r.table
            assert p.index == p.point.address - r.address
            assert p.index >= 0
            assert p.index + p.point.width <= r.count
            covered.update(range(p.point.address, p.point.address + p.point.width))
        assert min(covered) == r.address
        assert max(covered) == r.last
        gaps = sorted(set(range(r.address, r.last + 1)) - covered)
        run = 0
        for i, a in enumerate(gaps):
            run = run + 1 if i and gaps[i - 1] == a - 1 else 1
            assert run <= dev.max_gap


def floats(n: int, start: int = 0) -> list[ModbusPointConfig]:
    return [point(f"f{i}", start + 2 * i, "float32") for i in range(n)]


def words(n: int, start: int = 0) -> list[ModbusPointConfig]:
    return [point(f"w{i}", start + i) for i in range(n)]


def bits(n: int, table: Table = "coil") -> list[ModbusPointConfig]:
    return [point(f"b{i}", i, table=table) for i in range(n)]


def names(prefix: str, indices: range) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in indices)


CASES: list[tuple[str, ModbusDeviceConfig, list[Shape]]] = [
    ("no points", device(), []),
    (
        "contiguous registers coalesce",
        device(*words(5)),
        [("holding", 0, 5, names("w", range(5)))],
    ),
    (
        "contiguous float32 coalesce",
        device(*floats(3)),
        [("holding", 0, 6, ("f0", "f1", "f2"))],
    ),
    (
        "gap without max_gap splits",
        device(point("a", 0), point("b", 2)),
        [("holding", 0, 1, ("a",)), ("holding", 2, 1, ("b",))],
    ),
    (
        "gap above max_gap splits",
        device(point("a", 0), point("b", 5), max_gap=3),
        [("holding", 0, 1, ("a",)), ("holding", 5, 1, ("b",))],
    ),
    (
        "gap equal to max_gap bridges",
        device(point("a", 0), point("b", 4), max_gap=3),
        [("holding", 0, 5, ("a", "b"))],
    ),
    (
        "gap counts from the end of the widest point so far",
        device(
            point("serial", 0, "string", length=10),
            point("model", 2),
            point("status", 11),
            max_gap=1,
        ),
        [("holding", 0, 12, ("serial", "model", "status"))],
    ),
    (
        "70 float32 (140 registers) need 2 reads under the 125 limit",
        device(*floats(70)),
        [
            ("holding", 0, 124, names("f", range(62))),
            ("holding", 124, 16, names("f", range(62, 70))),
        ],
    ),
    (
        "125 registers fit exactly in one read",
        device(*words(125)),
        [("holding", 0, 125, names("w", range(125)))],
    ),
    (
        "the 126th register starts a second read",
        device(*words(126)),
        [("holding", 0, 125, names("w", range(125))), ("holding", 125, 1, ("w125",))],
    ),
    (
        "a point ending exactly at the limit joins",
        device(point("a", 0), point("b", 123, "float32"), max_gap=200),
        [("holding", 0, 125, ("a", "b"))],
    ),
    (
        "a point one past the limit does not straddle: it starts a read",
        device(point("a", 0), point("b", 124, "float32"), max_gap=200),
        [("holding", 0, 1, ("a",)), ("holding", 124, 2, ("b",))],
    ),
    (
        "max_registers_per_read 10 splits",
        device(*floats(6), max_registers_per_read=10),
        [("holding", 0, 10, names("f", range(5))), ("holding", 10, 2, ("f5",))],
    ),
    (
        "max_registers_per_read above 125 is held to 125",
        device(*words(126), max_registers_per_read=200),
        [("holding", 0, 125, names("w", range(125))), ("holding", 125, 1, ("w125",))],
    ),
    (
        "2000 coils fit in one read",
        device(*bits(2000)),
        [("coil", 0, 2000, names("b", range(2000)))],
    ),
    (
        "the 2001st discrete input starts a second read",
        device(*bits(2001, "discrete")),
        [
            ("discrete", 0, 2000, names("b", range(2000))),
            ("discrete", 2000, 1, ("b2000",)),
        ],
    ),
    (
        "max_bits_per_read 8 splits",
        device(*bits(10), max_bits_per_read=8),
        [("coil", 0, 8, names("b", range(8))), ("coil", 8, 2, ("b8", "b9"))],
    ),
    (
        "max_bits_per_read above 2000 is held to 2000",
        device(*bits(2001), max_bits_per_read=5000),
        [("coil", 0, 2000, names("b", range(2000))), ("coil", 2000, 1, ("b2000",))],
    ),
    (
        "bits bridge gaps up to max_gap too",
        device(
            point("run", 0, table="coil"),
            point("trip", 3, table="coil"),
            point("reset", 10, table="coil"),
            max_gap=2,
        ),
        [("coil", 0, 4, ("run", "trip")), ("coil", 10, 1, ("reset",))],
    ),
    (
        "different tables never share a read; order coil, discrete, holding, input",
        device(
            point("in", 1, table="input"),
            point("hold", 0),
            point("di", 0, table="discrete"),
            point("co", 1, table="coil"),
            max_gap=10,
        ),
        [
            ("coil", 1, 1, ("co",)),
            ("discrete", 0, 1, ("di",)),
            ("holding", 0, 1, ("hold",)),
            ("input", 1, 1, ("in",)),
        ],
    ),
    (
        "a uint32 and a bit of its first register share a read",
        device(point("energy", 10, "uint32"), point("alarm", 10, "bool", bit=3)),
        [("holding", 10, 2, ("energy", "alarm"))],
    ),
    (
        "bits of the same register share one register",
        device(point("b0", 7, "bool", bit=0), point("b1", 7, "bool", bit=1)),
        [("holding", 7, 1, ("b0", "b1"))],
    ),
    (
        "a point inside a string shares its read",
        device(point("serial", 0, "string", length=10), point("model", 4)),
        [("holding", 0, 10, ("serial", "model"))],
    ),
    (
        "a point overlapping the end of a full read starts its own read",
        device(
            point("s1", 0, "string", length=4),
            point("s2", 3, "string", length=8),
            max_registers_per_read=10,
        ),
        [("holding", 0, 4, ("s1",)), ("holding", 3, 8, ("s2",))],
    ),
    (
        "unsorted points are planned by address",
        device(point("c", 4, "float32"), point("a", 0, "float32"), point("b", 2, "float32")),
        [("holding", 0, 6, ("a", "b", "c"))],
    ),
    (
        "string points take their length",
        device(
            point("serial", 100, "string", length=8),
            point("firmware", 108),
            point("tag", 109, "string", length=20),
            max_registers_per_read=28,
        ),
        [("holding", 100, 9, ("serial", "firmware")), ("holding", 109, 20, ("tag",))],
    ),
]


@pytest.mark.parametrize(("dev", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(dev: ModbusDeviceConfig, expected: list[Shape]) -> None:
    reads = plan_device(dev)
    assert shape(reads) == expected
    check_valid(dev, reads)


@pytest.mark.parametrize(
    ("dev", "expected"),
    [
        pytest.param(
            device(point("a", 10), point("b", 11, "float32"), point("c", 13, "uint64")),
            {"a": 0, "b": 1, "c": 3},
            id="consecutive points",
        ),
        pytest.param(
            device(point("a", 10), point("b", 14), max_gap=5),
            {"a": 0, "b": 4},
            id="across a bridged gap",
        ),
        pytest.param(
            device(point("energy", 20, "uint32"), point("alarm", 20, "bool", bit=15)),
            {"energy": 0, "alarm": 0},
            id="overlapping points share an offset",
        ),
        pytest.param(
            device(*floats(70)),
            {"f0": 0, "f61": 122, "f62": 0, "f69": 14},
            id="offsets restart in each read",
        ),
        pytest.param(
            device(point("x", 5, table="coil"), point("y", 9, table="coil"), max_gap=3),
            {"x": 0, "y": 4},
            id="bits",
        ),
    ],
)
def test_offsets(dev: ModbusDeviceConfig, expected: dict[str, int]) -> None:
    offsets: dict[str, int] = {p.point.name: p.index for r in plan_device(dev) for p in r.points}
    assert {name: offsets[name] for name in expected} == expected


@pytest.mark.parametrize(
    ("table", "code"),
    [("coil", 1), ("discrete", 2), ("holding", 3), ("input", 4)],
    ids=["coil", "discrete", "holding", "input"],
)
def test_function_code(table: Table, code: int) -> None:
    (read,) = plan_device(device(point("p", 0, table=table)))
    assert read.function_code == code


@pytest.mark.parametrize(
    "dev",
    [
        pytest.param(
            device(point("tag", 0, "string", length=11), max_registers_per_read=10),
            id="wider than max_registers_per_read",
        ),
        pytest.param(device(point("tag", 0, "string")), id="string without length"),
    ],
)
def test_point_that_fits_no_read_is_refused(dev: ModbusDeviceConfig) -> None:
    # ModbusDeviceConfig.check reports these to the user; the planner must not emit an
    # illegal request if one slips through.
    with pytest.raises(ValueError, match="tag needs"):
        plan_device(dev)


def fewest_reads(spans: list[tuple[int, int]], limit: int, max_gap: int) -> int:
    """Brute force: the fewest groups such that each group is one legal read."""

    def legal(group: list[tuple[int, int]]) -> bool:
        group = sorted(group)
        start, end = group[0]
        for a, b in group[1:]:
            if a - end > max_gap:
                return False
            end = max(end, b)
        return end - start <= limit

    n = len(spans)
    ok = [m > 0 and legal([spans[i] for i in range(n) if m >> i & 1]) for m in range(1 << n)]

    @functools.cache
    def best(left: int) -> int:
        if not left:
            return 0
        lowest = left & -left
        result = n
        group = left
        while group:
            if group & lowest and ok[group]:
                result = min(result, 1 + best(left & ~group))
            group = (group - 1) & left
        return result

    return best((1 << n) - 1)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_plan_is_smallest(seed: int) -> None:
    # The planner's comment claims greedy is optimal; check it against brute force on small
    # random devices with overlapping and nested points of mixed widths.
    rng = random.Random(seed)
    for _ in range(60):
        limit = rng.randint(2, 10)
        max_gap = rng.randint(0, 3)
        points = []
        for i in range(rng.randint(1, 7)):
            points.append(
                point(f"p{i}", rng.randint(0, 14), "string", length=rng.randint(1, limit))
            )
        dev = device(*points, max_gap=max_gap, max_registers_per_read=limit)
        reads = plan_device(dev)
        check_valid(dev, reads)
        spans = [(p.address, p.address + p.width) for p in points]
        assert len(reads) == fewest_reads(spans, limit, max_gap), dev


def test_format_plan() -> None:
    meter = ModbusDeviceConfig(
        name=Name("meter-1"),
        unit_id=1,
        interval=Duration(1.0),
        points=(
            point("voltage_l1", 0, "float32"),
            point("voltage_l2", 2, "float32"),
            point("alarm", 0, "bool", bit=4),
            point("relay", 3, table="coil"),
        ),
    )
    idle = ModbusDeviceConfig(name=Name("spare"), unit_id=7, interval=Duration(0.25))
    assert format_plan("line-1", [meter, idle]) == [
        "line-1/meter-1 (unit 1, every 1s): FC1 coil 3..3 (1 bit): relay@3",
        "line-1/meter-1 (unit 1, every 1s): FC3 holding 0..3 (4 registers): "
        "voltage_l1@0, alarm@0.4, voltage_l2@2",
        "line-1/spare (unit 7, every 250ms): no points, no requests",
        "line-1: 2 requests per poll cycle",
    ]


@pytest.mark.parametrize(
    ("devices", "total"),
    [
        pytest.param([], "line-1: 0 requests per poll cycle", id="no devices"),
        pytest.param([device(point("a", 0))], "line-1: 1 request per poll cycle", id="one request"),
        pytest.param(
            [device(*floats(70)), device(*bits(3))],
            "line-1: 3 requests per poll cycle",
            id="summed over devices",
        ),
    ],
)
def test_format_plan_total(devices: list[ModbusDeviceConfig], total: str) -> None:
    assert format_plan("line-1", devices)[-1] == total
