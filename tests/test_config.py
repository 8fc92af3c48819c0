"""Config loading: every problem reported at once, with its path and a hint."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import attrs
import pytest

from drivers.registry import KINDS, DriverKind
from drivers.sim import SimBus, SimBusConfig
from gateway.config import ConfigError, load_config, parse_config, summary
from gateway.core.configtypes import Duration, Name, Secret, parse_duration, parse_size

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
    assert summary(config)[-1] == "bus line-1 (sim): 1 devices, 1 points"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            '[gateway]\nshutdown_timout = "5s"\n',
            ("gateway.shutdown_timout", "unknown key (did you mean 'shutdown_timeout'?)"),
            id="typo-key",
        ),
        pytest.param(
            "[gateway]\nname = 5\n",
            ("gateway.name", "5 is not a string"),
            id="wrong-type",
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


KINDS_WITH_TOKEN = {
    **KINDS,
    "token-test": DriverKind("token-test", _TokenBusConfig, SimBus, "test only"),  # type: ignore[arg-type]
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
    secret = config.buses[0].token_file
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
