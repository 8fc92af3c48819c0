"""Config loading: every problem reported at once, with its path and a hint."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import attrs
import pytest

from drivers.registry import KINDS, DriverKind
from drivers.sim import SimBus, SimBusConfig
from gateway.config import (
    MAX_NESTING,
    ConfigError,
    load_config,
    parse_config,
    restart_needed,
    summary,
)
from gateway.core.configtypes import (
    ConfigValueError,
    Duration,
    Name,
    Secret,
    format_duration,
    parse_duration,
    parse_size,
)

SIM_BUS = """
[[buses]]
name = "line-1"
kind = "sim"
[[buses.devices]]
name = "boiler"
interval = "250ms"
[[buses.devices.points]]
name = "temperature"
unit = "degC"
"""


def problems(text: str, **kwargs: object) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), **kwargs)  # type: ignore[arg-type]
    return info.value.problems


def test_minimal_config_gets_defaults() -> None:
    config = parse_config("")
    assert config.gateway.shutdown_timeout == 10.0
    assert config.supervisor.backoff_initial == 1.0
    assert config.supervisor.backoff_max == 60.0
    assert config.buses == ()


def test_sim_bus_is_structured_by_kind() -> None:
    config = parse_config(SIM_BUS)
    (bus,) = config.buses
    assert isinstance(bus, SimBusConfig)
    assert bus.devices[0].interval == 0.25
    assert list(bus.topics()) == ["line-1/boiler/temperature"]
    assert summary(config)[-1] == "bus line-1 (sim, simulated): 1 device, 1 point"


def test_summary_says_where_each_bus_is() -> None:
    config = parse_config(
        """
        [[buses]]
        name = "plc"
        kind = "modbus-tcp"
        host = "10.0.0.5"
        [[buses.devices]]
        name = "press"
        points = [
          { name = "a", table = "holding", address = 0 },
          { name = "b", table = "holding", address = 1 },
        ]
        [[buses.devices]]
        name = "meter"
        points = [{ name = "p", table = "input", address = 0 }]
        [[buses]]
        name = "rs485"
        kind = "modbus-rtu"
        port = "/dev/ttyUSB0"
        baudrate = 19200
        parity = "E"
        [[buses.devices]]
        name = "meter"
        points = [{ name = "v", table = "input", address = 0 }]
        """.replace("\n        ", "\n")
    )
    assert summary(config)[2:] == [
        "bus plc (modbus-tcp, 10.0.0.5:502): 2 devices, 3 points",
        "bus rs485 (modbus-rtu, /dev/ttyUSB0 19200 8E1): 1 device, 1 point",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            '[gateway]\nshutdown_timout = "5s"\n',
            ("gateway.shutdown_timout", "unknown key (did you mean 'shutdown_timeout'?)"),
            id="typo-key",
        ),
        pytest.param(
            "[gateway]\nstate_dir = 5\n",
            ("gateway.state_dir", "5 is not a string"),
            id="wrong-type",
        ),
        pytest.param(
            "[gateway]\nname = 5\n",
            ("gateway.name", "5 is not a name: expected a string"),
            id="gateway-name-not-a-string",
        ),
        pytest.param(
            '[gateway]\nname = "plant 7/line 1"\n',
            (
                "gateway.name",
                "'plant 7/line 1' may use only letters, digits and _ . : - (no '/', '+', '#' "
                "or spaces: it becomes one level of a topic)",
            ),
            id="gateway-name-rule",
        ),
        pytest.param(
            '[gateway]\nname = ""\n',
            ("gateway.name", "must not be empty"),
            id="gateway-name-empty",
        ),
        pytest.param(
            '[gateway]\nstate_dir = "/var/lib/\\u0000gw"\n',
            ("gateway.state_dir", "contains a NUL character: give a directory path"),
            id="state-dir-nul",
        ),
        pytest.param(
            "[hub]\nsubscriber_buffer = true\n",
            ("hub.subscriber_buffer", "true is not a whole number"),
            id="bool-for-int",
        ),
        pytest.param(
            "buses = 3\n",
            ("buses", "expected a list (e.g. [[buses]] tables, or [ ... ])"),
            id="not-a-list",
        ),
        pytest.param(
            'gateway = "x"\n',
            ("gateway", "'x' is not a table: write [section] or { key = value }"),
            id="not-a-table",
        ),
        pytest.param(
            '[gateway]\nstate_dir = "state"\n',
            (
                "gateway.state_dir",
                "'state' is relative: give an absolute path (under systemd, StateDirectory= "
                "provides /var/lib/edge-gateway)",
            ),
            id="relative-state-dir",
        ),
        pytest.param(
            '[[buses]]\nname = "a"\nkind = "sim"\n',
            ("buses[0].devices", "a sim bus needs at least one [[buses.devices]] table"),
            id="empty-bus",
        ),
        pytest.param(
            '[hub]\nsubscriber_buffer = "10"\n',
            ("hub.subscriber_buffer", "'10' is not a whole number"),
            id="string-for-int",
        ),
        pytest.param(
            '[gateway]\nshutdown_timeout = "10 sec"\n',
            (
                "gateway.shutdown_timeout",
                "'10 sec' is not a duration: use a number and one of ms, s, min, h, d, "
                'e.g. "250ms", "2s", "5min"',
            ),
            id="bad-duration",
        ),
        pytest.param(
            "[gateway]\nshutdown_timeout = 10\n",
            (
                "gateway.shutdown_timeout",
                "10 is not a duration: write it as a string with a unit, "
                'e.g. "250ms", "2s", "5min", "1h"',
            ),
            id="duration-without-unit",
        ),
        pytest.param(
            '[logging]\nlevel = "verbose"\n',
            ("logging.level", "'verbose' is not one of debug, info, warning, error"),
            id="bad-choice",
        ),
        pytest.param(
            '[[buses]]\nname = "a"\nkind = "modbus"\n',
            ("buses[0].kind", f"'modbus' is not one of {', '.join(KINDS)}"),
            id="unknown-kind",
        ),
        pytest.param(
            '[[buses]]\nname = "a"\n',
            ("buses[0].kind", f"missing: every bus needs a kind, one of {', '.join(KINDS)}"),
            id="missing-kind",
        ),
        pytest.param(
            '[[buses]]\nkind = "sim"\n',
            ("buses[0].name", "missing: this key is required"),
            id="missing-name",
        ),
        pytest.param(
            SIM_BUS + SIM_BUS,
            (
                "buses[1].name",
                "duplicate name 'line-1' (entry [0] has it too): names must be unique",
            ),
            id="duplicate-bus",
        ),
        pytest.param(
            SIM_BUS + '[[buses.devices.points]]\nname = "temperature"\n',
            (
                "buses[0].devices[0].points[1].name",
                "duplicate name 'temperature' (entry [0] has it too): names must be unique",
            ),
            id="duplicate-point",
        ),
        pytest.param(
            SIM_BUS.replace('name = "boiler"', 'name = "boiler/2"'),
            (
                "buses[0].devices[0].name",
                "'boiler/2' may use only letters, digits and _ . : - (no '/', '+', '#' or "
                "spaces: it becomes one level of a topic)",
            ),
            id="bad-name",
        ),
        pytest.param(
            SIM_BUS.replace('unit = "degC"', 'signal = "sinus"'),
            (
                "buses[0].devices[0].points[0].signal",
                "'sinus' is not one of sine, random-walk, step, counter, setpoint",
            ),
            id="deep-path",
        ),
        pytest.param(
            '[supervisor]\nbackoff_initial = "10s"\nbackoff_max = "1s"\n',
            ("supervisor.backoff_max", "1s is below backoff_initial (10s)"),
            id="cross-field",
        ),
        pytest.param(
            "[gateway\nname = 'x'\n",
            (
                "",
                "TOML syntax error: Expected ']' at the end of a table declaration "
                "(at line 1, column 9)",
            ),
            id="toml-syntax",
        ),
    ],
)
def test_broken_config_names_path_and_fix(text: str, expected: tuple[str, str]) -> None:
    assert problems(text) == [expected]


def test_all_errors_reported_at_once() -> None:
    found = problems(
        """
        [gateway]
        nmae = "x"
        status_interval = "soon"
        [logging]
        level = 3
        [[buses]]
        name = "a"
        kind = "sim"
        [[buses.devices]]
        name = "d"
        interval = "1sec"
        [[buses]]
        name = "b"
        kind = "nope"
        """
    )
    assert sorted(path for path, _ in found) == [
        "buses[0].devices[0].interval",
        "buses[1].kind",
        "gateway.nmae",
        "gateway.status_interval",
        "logging.level",
    ]


def test_error_lines_carry_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nshutdown_timeout = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.lines() == [
        f"{path}: gateway.shutdown_timeout: 'x' is not a duration: use a number and one of "
        'ms, s, min, h, d, e.g. "250ms", "2s", "5min"'
    ]


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert "file not found: create it (see examples/) or pass --config PATH" in str(info.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1.5s", 1.5), ("5min", 300.0), ("1h", 3600.0), ("1d", 86400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("64KiB", 65536), ("512MiB", 512 * 1024**2), ("1GB", 10**9), ("100", 100), (100, 100)],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


# A driver kind registered only for this test: shows that adding a kind is local to the
# registry table, and gives the secret-file handling a real config path.


@attrs.frozen
class _TokenBusConfig:
    name: Name
    kind: Literal["token-test"] = "token-test"
    token_file: Secret | None = None
    poll: Duration = Duration(1.0)

    def topics(self) -> Iterator[str]:
        return iter(())

    def stall_after(self) -> float:
        return 10.0

    def check(self) -> Iterator[tuple[str, str]]:
        return iter(())

    def describe(self) -> str:
        return "test"


KINDS_WITH_TOKEN = {
    **KINDS,
    "token-test": DriverKind("token-test", _TokenBusConfig, SimBus, "test only"),
}

TOKEN_BUS = '[[buses]]\nname = "t"\nkind = "token-test"\ntoken_file = "{}"\n'


def test_missing_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    found = problems(TOKEN_BUS.format("token"), config_dir=tmp_path, kinds=KINDS_WITH_TOKEN)
    assert found == [
        (
            "buses[0].token_file",
            f"secret file '{tmp_path / 'token'}' does not exist: create it (mode 0600), or give "
            "an absolute path (relative paths resolve against the config's directory)",
        )
    ]


def test_secret_resolves_against_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "token").write_text("s3cr3t-value\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = parse_config(
        TOKEN_BUS.format("token"), config_dir=tmp_path / "elsewhere", kinds=KINDS_WITH_TOKEN
    )
    secret = config.buses[0].token_file  # type: ignore[attr-defined]
    assert isinstance(secret, Secret)
    assert secret.reveal() == "s3cr3t-value"
    assert secret.matches("s3cr3t-value")
    assert not secret.matches("guess")
    # Never shown by repr/str, so never in a log line or an error.
    assert "s3cr3t" not in repr(config)
    assert "s3cr3t" not in str(secret)


def test_empty_secret_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    (tmp_path / "token").write_text("\n")
    found = problems(TOKEN_BUS.format("token"), config_dir=tmp_path, kinds=KINDS_WITH_TOKEN)
    assert found == [("buses[0].token_file", f"secret file '{tmp_path / 'token'}' is empty")]


# ---- values that used to crash or hang the loader ---------------------------------------------

POINT = "buses[0].devices[0].points[0]"
SIM_POINT = SIM_BUS + "{}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            SIM_POINT.format("high = inf"),
            (f"{POINT}.high", "inf is not a finite number: write a number"),
            id="inf",
        ),
        pytest.param(
            SIM_POINT.format("low = -inf"),
            (f"{POINT}.low", "-inf is not a finite number: write a number"),
            id="minus-inf",
        ),
        pytest.param(
            SIM_POINT.format("step = nan"),
            (f"{POINT}.step", "nan is not a finite number: write a number"),
            id="nan",
        ),
        pytest.param(
            SIM_POINT.format("step = 1" + "0" * 400),
            (
                f"{POINT}.step",
                "a number of about 401 digits is too large: a whole number is at most "
                "9223372036854775807 (64 bits)",
            ),
            id="int-beyond-float",
        ),
        pytest.param(
            f"[hub]\nsubscriber_buffer = {2**63}\n",
            (
                "hub.subscriber_buffer",
                "9223372036854775808 is too large: a whole number is at most "
                "9223372036854775807 (64 bits)",
            ),
            id="int-beyond-64-bits",
        ),
        pytest.param(
            "[hub]\nsubscriber_buffer = " + "1" * 5000 + "\n",
            (
                "",
                "a number has thousands of digits: whole numbers in TOML are 64-bit (at most "
                "19 digits)",
            ),
            id="int-too-long-for-python",
        ),
        pytest.param(
            '[gateway]\nshutdown_timeout = "1' + "0" * 400 + 's"\n',
            (
                "gateway.shutdown_timeout",
                "'1" + "0" * 48 + "... (404 characters) is too long: a duration may be at "
                "most 365d (365 days)",
            ),
            id="duration-overflows-float",
        ),
        pytest.param(
            '[gateway]\nstatus_interval = "366d"\n',
            (
                "gateway.status_interval",
                "'366d' is too long: a duration may be at most 365d (365 days)",
            ),
            id="duration-too-long",
        ),
        pytest.param(
            '[gateway]\nshutdown_timeout = "1e400s"\n',
            (
                "gateway.shutdown_timeout",
                "'1e400s' is not a duration: use a number and one of ms, s, min, h, d, "
                'e.g. "250ms", "2s", "5min"',
            ),
            id="duration-exponent",
        ),
        pytest.param(
            '[[buses]]\nname = "a"\nkind = "sim"\nfail_after = "inf s"\n',
            (
                "buses[0].fail_after",
                "'inf s' is not a duration: use a number and one of ms, s, min, h, d, "
                'e.g. "250ms", "2s", "5min"',
            ),
            id="duration-inf",
        ),
        pytest.param(
            "buses = [" + "{ name = 'x' }, " * 3 + "[[1]]]\n",
            ("buses[3]", "expected a table ([[buses]]), got a list"),
            id="bus-not-a-table",
        ),
    ],
)
def test_values_that_overflow_are_config_errors(text: str, expected: tuple[str, str]) -> None:
    found = problems(text)
    assert expected in found
    assert all(path == expected[0] or path.startswith("buses[") for path, _ in found)


TOO_DEEP = (
    f"tables and arrays nested too deeply (more than {MAX_NESTING} levels): no setting nests "
    "that deep; check the brackets"
)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        # Deep enough for tomllib itself to hit the recursion limit:
        pytest.param("a = " + "[" * 1000 + "]" * 1000, "", id="arrays-1000"),
        pytest.param("a = " + "{ b = " * 1000 + "1" + " }" * 1000, "", id="inline-tables-1000"),
        # Parsed fine, too deep for cattrs and repr() in messages:
        pytest.param("buses = " + "[" * 300 + "]" * 300, "buses", id="arrays-300"),
        pytest.param(
            "gateway = " + "{ b = " * 300 + "1" + " }" * 300, "gateway", id="inline-tables-300"
        ),
        # Dotted keys and table headers nest without any recursion in the parser:
        pytest.param("[" + ".".join(["t"] * 5000) + "]\n", "t", id="table-header-5000"),
        pytest.param(".".join(["k"] * 5000) + " = 1\n", "k", id="dotted-key-5000"),
        pytest.param(
            "buses = " + "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1), "buses", id="limit+1"
        ),
    ],
)
def test_nesting_too_deep_is_a_config_error(text: str, path: str) -> None:
    assert problems(text) == [(path, TOO_DEEP)]


def test_nesting_at_the_limit_reaches_the_converter() -> None:
    found = problems("buses = " + "[" * MAX_NESTING + "]" * MAX_NESTING)
    assert found == [("buses[0]", "expected a table ([[buses]]), got a list")]


def test_nesting_limit_holds_in_a_deep_call_stack() -> None:
    # A SIGHUP reload runs deep inside Trio: tomllib gives up at a smaller depth there, and
    # that is still a ConfigError, not a RecursionError.
    def nested(levels: int) -> list[tuple[str, str]]:
        if levels:
            return nested(levels - 1)
        return problems("a = " + "[" * 300 + "]" * 300)

    assert nested(800) in ([("", TOO_DEEP)], [("a", TOO_DEEP)])


def test_byte_order_mark_is_accepted() -> None:
    assert parse_config('\ufeff[gateway]\nname = "bom"\n').gateway.name == "bom"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1" + "0" * 400 + "s", "is too long: a duration may be at most 365d (365 days)"),
        ("366d", "is too long: a duration may be at most 365d (365 days)"),
        ("1e3s", "is not a duration"),
        ("-1s", "is not a duration"),
    ],
)
def test_duration_bounds(text: str, message: str) -> None:
    with pytest.raises(ConfigValueError, match=re.escape(message)):
        parse_duration(text)


def test_longest_duration_is_accepted_and_shown() -> None:
    assert parse_duration("365d") == 365 * 86400.0
    assert format_duration(parse_duration("365d")) == "8760h"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1025GiB", "'1025GiB' is too large: a size may be at most 1024GiB"),
        ("1" + "0" * 400 + "GB", "is too large: a size may be at most 1024GiB"),
        (1024**4 + 1, "1099511627777 is too large: a size may be at most 1024GiB"),
        (-1, "-1 is negative: a size is 0 or more"),
        (True, 'true is not a size: write e.g. "64KiB", "512MiB", "1GB"'),
    ],
)
def test_size_bounds(value: str | int, message: str) -> None:
    with pytest.raises(ConfigValueError) as info:
        parse_size(value)
    assert message in str(info.value)


def test_largest_size_is_accepted() -> None:
    assert parse_size("1024GiB") == 1024**4
    assert parse_size(1024**4) == 1024**4


# ---- reload -------------------------------------------------------------------------------


def test_restart_needed_names_keys_read_only_at_start() -> None:
    old = parse_config("")
    new = parse_config(
        '[gateway]\nname = "other"\nstate_dir = "/srv/gw"\nshutdown_timeout = "3s"\n'
        '[hub]\nsubscriber_buffer = 5\n[logging]\nlevel = "debug"\n' + SIM_BUS
    )
    assert restart_needed(old, new) == [
        "gateway.name",
        "gateway.state_dir",
        "hub.subscriber_buffer",
    ]
    assert restart_needed(new, old) == [
        "gateway.name",
        "gateway.state_dir",
        "hub.subscriber_buffer",
    ]


@pytest.mark.parametrize(
    ("changed", "keys"),
    [
        ("", []),
        ('[gateway]\nshutdown_timeout = "3s"\nstatus_interval = "1s"\n', []),
        ('[logging]\nlevel = "debug"\n[supervisor]\nbackoff_max = "2min"\n', []),
        (SIM_BUS, []),
        ('[gateway]\nname = "renamed"\n', ["gateway.name"]),
        ('[gateway]\nstate_dir = "/srv/elsewhere"\n', ["gateway.state_dir"]),
        ("[hub]\nsubscriber_buffer = 10\n", ["hub.subscriber_buffer"]),
    ],
)
def test_restart_needed_per_key(
    changed: str, keys: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/srv/gw")  # the default state_dir of both
    assert restart_needed(parse_config(""), parse_config(changed)) == keys


def test_a_failing_check_is_still_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A defect in a driver's check() ends as exit 78 (never a crash, never a restart loop)."""

    def broken_check(self: object) -> Iterator[tuple[str, str]]:
        raise RecursionError("maximum recursion depth exceeded")
        yield ("", "")

    monkeypatch.setattr(SimBusConfig, "check", broken_check)
    text = '[[buses]]\nname = "a"\nkind = "sim"\n[[buses.devices]]\nname = "d"\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.problems == [
        (
            "",
            "the config could not be checked (RecursionError: maximum recursion depth "
            "exceeded); please report it",
        )
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[buses]\nname = "a"\nkind = "sim"\n',
            (
                "buses",
                "is a single table ([buses]): write [[buses]], with two brackets, for each bus",
            ),
        ),
        (
            "[gateway]\nstatus_interval = 1979-05-27\n",
            ("gateway.status_interval", "1979-05-27 is not a duration"),
        ),
        (
            '[gateway]\nstatus_interval = "\\uff15s"\n',
            ("gateway.status_interval", "'\uff15s' is not a duration"),
        ),
    ],
    ids=["single-bracket-buses", "toml-date", "full-width-digit"],
)
def test_messages_say_what_was_written(text: str, expected: tuple[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    path, message = caught.value.problems[0]
    assert (path, message[: len(expected[1])]) == expected


def test_an_empty_state_directory_variable_means_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "")
    assert parse_config("").gateway.state_dir == "/var/lib/edge-gateway"
