"""Modbus config: invalid combinations are config errors with their path."""

from __future__ import annotations

import pytest

from drivers.modbus.config import ModbusRtuBusConfig, ModbusTcpBusConfig
from gateway.config import ConfigError, parse_config

HEAD = """
[[buses]]
name = "rs485"
kind = "modbus-rtu"
port = "/dev/ttyUSB0"
{bus}
[[buses.devices]]
name = "meter"
unit_id = {unit}
points = [
  {points}
]
"""


def problems(points: str, bus: str = "", unit: int = 1) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(HEAD.format(points=points, bus=bus, unit=unit))
    return info.value.problems


P = "buses[0].devices[0].points[0]"


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        pytest.param(
            '{ name = "v", table = "coil", address = 0, type = "float32" }',
            (
                f"{P}.type",
                'a coil holds one bit: use type = "bool" (a float32 needs holding or '
                "input registers)",
            ),
            id="float-on-coils",
        ),
        pytest.param(
            '{ name = "s", table = "holding", address = 0, type = "string" }',
            (f"{P}.length", "a string needs length = number of registers (2 chars each)"),
            id="string-without-length",
        ),
        pytest.param(
            '{ name = "b", table = "holding", address = 0, type = "bool" }',
            (
                f"{P}.bit",
                'a bool on holding registers needs bit = 0..15 (or use table = "coil" '
                '/ "discrete")',
            ),
            id="bool-without-bit",
        ),
        pytest.param(
            '{ name = "v", table = "holding", address = 0, type = "flaot32" }',
            (
                f"{P}.type",
                "'flaot32' is not one of bool, int16, uint16, int32, uint32, int64, "
                "uint64, float32, float64, string",
            ),
            id="typo-type",
        ),
        pytest.param(
            '{ name = "v", table = "holding", address = 0, type = "int16", order = "ABCDEFGH" }',
            (f"{P}.order", "ABCDEFGH is for 64-bit values; a int16 takes e.g. ABCD"),
            id="order-width",
        ),
        pytest.param(
            '{ name = "v", table = "input", address = 0, writable = true }',
            (f"{P}.writable", "input registers are read-only in Modbus"),
            id="write-input",
        ),
        pytest.param(
            '{ name = "v", table = "holding", address = 70000 }',
            (f"{P}.address", "70000 is outside 0..65535 (addresses are 0-based)"),
            id="address-range",
        ),
        pytest.param(
            '{ name = "a", table = "holding", address = 0, type = "float32", writable = true },'
            ' { name = "b", table = "holding", address = 1 }',
            (
                f"{P}.address",
                "writable a (holding 0..1) overlaps b (holding 1..1): a write to "
                "one would change the other",
            ),
            id="overlapping-write",
        ),
        pytest.param(
            '{ name = "v", table = "holding", address = 0, heartbeat = "1min" }',
            (
                f"{P}.heartbeat",
                "only matters with a deadband (without one, every poll is reported): add "
                "deadband = 0 to report changes only",
            ),
            id="heartbeat-without-deadband",
        ),
        pytest.param(
            '{ name = "s", table = "holding", address = 0, type = "string", length = 125, '
            "writable = true }",
            (
                f"{P}.writable",
                "125 registers is more than one write may carry (123); make the point shorter "
                "or read-only",
            ),
            id="write-too-long",
        ),
        pytest.param(
            '{ name = "v", table = "holding", address = 0, type = "string", scale = 2.0, '
            "length = 2 }",
            (f"{P}.scale", "scale and offset apply to numbers, not to a string"),
            id="scaled-string",
        ),
    ],
)
def test_invalid_points(points: str, expected: tuple[str, str]) -> None:
    assert problems(points) == [expected]


def test_bits_of_one_register_may_be_written_separately() -> None:
    config = parse_config(
        HEAD.format(
            bus="",
            unit=1,
            points='{ name = "a", table = "holding", address = 5, type = "bool", bit = 0, '
            'writable = true }, { name = "b", table = "holding", address = 5, type = "bool", '
            "bit = 1 }",
        )
    )
    assert isinstance(config.buses[0], ModbusRtuBusConfig)


def test_bus_and_device_problems() -> None:
    found = problems(
        '{ name = "v", table = "holding", address = 0 }', bus="baudrate = 9601", unit=0
    )
    assert found == [
        ("buses[0].baudrate", "9601 is not a standard baud rate (e.g. 9600, 19200)"),
        ("buses[0].devices[0].unit_id", "0 is outside 1..247"),
    ]


@pytest.mark.parametrize(
    ("baudrate", "gap_ms"),
    [(9600, 3.65), (19200, 1.82), (38400, 1.75), (115200, 1.75)],
)
def test_t35_gap_follows_the_baud_rate(baudrate: int, gap_ms: float) -> None:
    config = parse_config(
        HEAD.format(
            bus=f"baudrate = {baudrate}",
            unit=1,
            points='{ name = "v", table = "holding", address = 0 }',
        )
    ).buses[0]
    assert isinstance(config, ModbusRtuBusConfig)
    assert config.gap * 1000 == pytest.approx(gap_ms, abs=0.01)


def test_backoff_defaults_to_one_then_at_most_five_seconds() -> None:
    # Short enough that a device back after any outage is read again within seconds.
    rtu = parse_config(
        HEAD.format(points='{ name = "v", table = "holding", address = 0 }', bus="", unit=1)
    )
    tcp = parse_config(
        '[[buses]]\nname = "plc"\nkind = "modbus-tcp"\nhost = "10.0.0.5"\n'
        '[[buses.devices]]\nname = "d"\npoints = [{ name = "v", table = "holding", address = 0 }]\n'
    )
    for config in (rtu.buses[0], tcp.buses[0]):
        assert isinstance(config, ModbusRtuBusConfig | ModbusTcpBusConfig)
        assert (config.backoff_initial, config.backoff_max) == (1.0, 5.0)


TCP_BUS = (
    '[[buses]]\nname = "plc"\nkind = "modbus-tcp"\nhost = {host}\n'
    '[[buses.devices]]\nname = "d"\npoints = [{{ name = "v", table = "holding", address = 0 }}]\n'
)


@pytest.mark.parametrize(
    ("host", "message"),
    [
        (
            '"127.0.0.1:502"',
            "'127.0.0.1:502' includes a port: write host = '127.0.0.1' and port = 502",
        ),
        ('"[::1]:1502"', "'[::1]:1502' includes a port: write host = '::1' and port = 1502"),
        ('"http://10.0.0.5"', "'http://10.0.0.5' is a URL: write only the address"),
        ('"10.0.0.5 "', "'10.0.0.5 ' contains spaces: write only the address"),
        ('"plc/7"', "'plc/7' is not an IP address or host name"),
        ('""', "must not be empty: the device's IP address or host name"),
    ],
)
def test_host_values_pasted_wrongly_are_config_errors(host: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(TCP_BUS.format(host=host))
    assert [p for p, _ in caught.value.problems] == ["buses[0].host"]
    assert caught.value.problems[0][1].startswith(message)


@pytest.mark.parametrize("host", ["10.0.0.5", "::1", "fe80::1%eth0", "plc-7.plant.local", "PLC_7"])
def test_addresses_and_names_are_accepted(host: str) -> None:
    parse_config(TCP_BUS.format(host=f'"{host}"'))


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("10.0.0.256", "'10.0.0.256' is not a valid IPv4 address"),
        ("1.2.3", "'1.2.3' is not a valid IPv4 address"),
        ("[::1]", "'[::1]': write the address without brackets, host = '::1'"),
        ("2001:db8:::1", "'2001:db8:::1' is not an IP address or host name"),
        ("plc:502", "'plc:502' includes a port: write host = 'plc' and port = 502"),
    ],
)
def test_host_hints_are_right(host: str, message: str) -> None:
    from drivers.modbus.config import host_problem

    problem = host_problem(host)
    assert problem is not None
    assert problem.startswith(message)
