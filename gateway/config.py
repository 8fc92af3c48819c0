"""The configuration file: model, loading and validation.

One TOML file structured by one cattrs converter into frozen attrs classes. Every problem is
collected (not just the first) and reported with its path and a hint, e.g.
``gateway.toml: buses[1].devices[0].points[3].type: 'flaot32' is not one of int16, ...``.
Driver sections come from ``drivers.registry``; a new component adds its section class here.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn

from drivers.base import BusConfig
from drivers.registry import KINDS, DriverKind
from gateway.core.configtypes import (
    ConfigValueError,
    Duration,
    Name,
    Secret,
    Size,
    duplicate_names,
    format_duration,
    load_secret,
    parse_duration,
    parse_name,
    parse_size,
)

DEFAULT_PATH = Path("/etc/edge-gateway/gateway.toml")
EX_CONFIG = 78  # sysexits.h; the unit's RestartPreventExitStatus=78 stops a crash loop


def _default_state_dir() -> str:
    # systemd's StateDirectory= sets $STATE_DIRECTORY.
    return os.environ.get("STATE_DIRECTORY", "/var/lib/edge-gateway").split(":")[0]


@attrs.frozen
class GatewaySection:
    name: str = "edge-gateway"
    state_dir: str = attrs.field(factory=_default_state_dir)
    shutdown_timeout: Duration = Duration(10.0)
    status_interval: Duration = Duration(5.0)


@attrs.frozen
class SupervisorSection:
    backoff_initial: Duration = Duration(1.0)
    backoff_max: Duration = Duration(60.0)
    healthy_after: Duration = Duration(30.0)
    """A component up this long has its backoff reset."""


@attrs.frozen
class LoggingSection:
    level: Literal["debug", "info", "warning", "error"] = "info"


@attrs.frozen
class HubSection:
    subscriber_buffer: int = 1000
    """Readings buffered per subscriber before its overflow policy applies."""


@attrs.frozen
class Config:
    gateway: GatewaySection = attrs.Factory(GatewaySection)
    supervisor: SupervisorSection = attrs.Factory(SupervisorSection)
    logging: LoggingSection = attrs.Factory(LoggingSection)
    hub: HubSection = attrs.Factory(HubSection)
    buses: tuple[BusConfig, ...] = ()
    """Each a driver's config class, chosen by its ``kind`` (see ``drivers.registry``)."""

    def check(self) -> Iterator[tuple[str, str]]:
        s = self.supervisor
        if s.backoff_initial <= 0:
            yield "supervisor.backoff_initial", "must be greater than 0"
        if s.backoff_max < s.backoff_initial:
            yield (
                "supervisor.backoff_max",
                (
                    f"{format_duration(s.backoff_max)} is below backoff_initial "
                    f"({format_duration(s.backoff_initial)})"
                ),
            )
        if not Path(self.gateway.state_dir).is_absolute():
            yield (
                "gateway.state_dir",
                (
                    f"{self.gateway.state_dir!r} is relative: give an absolute path "
                    "(under systemd, StateDirectory= provides /var/lib/edge-gateway)"
                ),
            )
        if self.gateway.shutdown_timeout <= 0:
            yield "gateway.shutdown_timeout", "must be greater than 0"
        if self.gateway.status_interval <= 0:
            yield "gateway.status_interval", "must be greater than 0"
        if self.hub.subscriber_buffer < 1:
            yield "hub.subscriber_buffer", "must be at least 1"
        yield from duplicate_names("buses", [b.name for b in self.buses])
        for i, bus in enumerate(self.buses):
            for path, message in bus.check():
                yield f"buses[{i}].{path}", message


class ConfigError(Exception):
    """The config cannot be used. ``problems`` lists every ``(path, message)`` found."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [
            f"{self.source}: {path}: {msg}" if path else f"{self.source}: {msg}"
            for path, msg in self.problems
        ]


# ---- the converter ------------------------------------------------------------------------


def toml_repr(value: object) -> str:
    """A value as it is written in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _strict(kind: type, label: str) -> Callable[[object, type], object]:
    def structure(value: object, _: type) -> object:
        if isinstance(value, bool) and kind is not bool:
            raise ConfigValueError(f"{toml_repr(value)} is not {label}")
        if kind is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, kind):
            raise ConfigValueError(f"{toml_repr(value)} is not {label}")
        return value

    return structure


def _is_literal(tp: object) -> bool:
    return getattr(tp, "__origin__", None) is Literal


def _literal_hook(tp: Any) -> Callable[[object, type], object]:
    choices = typing.get_args(tp)

    def structure(value: object, _: type) -> object:
        if value not in choices:
            raise ConfigValueError(
                f"{toml_repr(value)} is not one of {', '.join(str(c) for c in choices)}"
            )
        return value

    return structure


def _make_converter(config_dir: Path, kinds: Mapping[str, DriverKind]) -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(int, _strict(int, "a whole number"))
    conv.register_structure_hook(float, _strict(float, "a number"))
    conv.register_structure_hook(bool, _strict(bool, "true or false"))
    conv.register_structure_hook(Duration, lambda v, _: parse_duration(v))
    conv.register_structure_hook(Size, lambda v, _: parse_size(v))
    conv.register_structure_hook(Name, lambda v, _: parse_name(v))
    conv.register_structure_hook(Secret, lambda v, _: load_secret(v, config_dir))
    conv.register_structure_hook_factory(_is_literal, _literal_hook)

    def table_hook(cl: type) -> Callable[[object, type], object]:
        structure_fields: Callable[..., object] = make_dict_structure_fn(
            cl, conv, _cattrs_forbid_extra_keys=True
        )

        def structure(value: object, _: type) -> object:
            if not isinstance(value, dict):
                raise ConfigValueError(
                    f"{toml_repr(value)} is not a table: write [section] or {{ key = value }}"
                )
            return structure_fields(value, cl)

        return structure

    conv.register_structure_hook_factory(attrs.has, table_hook)

    def structure_bus(value: object, _: type) -> object:
        if not isinstance(value, dict):
            raise ConfigValueError(f"expected a table ([[buses]]), got {value!r}")
        kind = value.get("kind")
        if kind is None:
            raise ConfigValueError(
                f"missing: every bus needs a kind, one of {', '.join(kinds)}", "kind"
            )
        driver = kinds.get(kind) if isinstance(kind, str) else None
        if driver is None:
            raise ConfigValueError(f"{kind!r} is not one of {', '.join(kinds)}", "kind")
        return conv.structure(value, driver.config_type)

    conv.register_structure_hook_func(lambda t: t is BusConfig, structure_bus)
    return conv


def _problems(exc: BaseException, path: str) -> Iterator[tuple[str, str]]:
    """Flatten cattrs' detailed-validation exception tree into ``(path, message)`` pairs."""
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            if isinstance(note, AttributeValidationNote):
                sub_path = f"{path}.{note.name}" if path else note.name
            elif isinstance(note, IterableValidationNote):
                sub_path = f"{path}[{note.index}]"
            else:
                sub_path = path
            yield from _problems(sub, sub_path)
        for sub in without:
            yield from _problems(sub, path)
    elif isinstance(exc, ForbiddenExtraKeysError):
        allowed = [a.name for a in attrs.fields(exc.cl)]
        for key in sorted(exc.extra_fields):
            guess = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {guess[0]!r}?" if guess else f"allowed: {', '.join(allowed)}"
            yield (f"{path}.{key}" if path else key), f"unknown key ({hint})"
    elif isinstance(exc, KeyError):
        yield path, "missing: this key is required"
    elif isinstance(exc, ConfigValueError):
        yield (f"{path}.{exc.subpath}" if exc.subpath else path), str(exc)
    elif isinstance(exc, TypeError) and "not iterable" in str(exc):
        yield path, "expected a list (e.g. [[buses]] tables, or [ ... ])"
    elif isinstance(exc, (ValueError, TypeError)):
        yield path, str(exc)
    else:
        raise exc


def parse_config(
    text: str,
    source: str = "gateway.toml",
    *,
    config_dir: Path | None = None,
    kinds: Mapping[str, DriverKind] = KINDS,
) -> Config:
    """Parse and validate config text; raises ``ConfigError`` listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, [("", f"TOML syntax error: {e}")]) from None
    conv = _make_converter(config_dir or Path.cwd(), kinds)
    try:
        config = conv.structure(data, Config)
    except (ClassValidationError, IterableValidationError) as e:
        raise ConfigError(source, list(_problems(e, ""))) from None
    problems = list(config.check())
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: Path, *, kinds: Mapping[str, DriverKind] = KINDS) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            str(path), [("", "file not found: create it (see examples/) or pass --config PATH")]
        ) from None
    except OSError as e:
        raise ConfigError(str(path), [("", f"cannot read: {e.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), [("", "not UTF-8 text")]) from None
    return parse_config(text, str(path), config_dir=path.parent.resolve(), kinds=kinds)


def summary(config: Config) -> list[str]:
    """What would run, one line each, for ``check-config``."""
    g = config.gateway
    lines = [
        f"gateway {g.name}: state in {g.state_dir}, "
        f"shutdown timeout {format_duration(g.shutdown_timeout)}",
        f"supervisor: backoff {format_duration(config.supervisor.backoff_initial)} .. "
        f"{format_duration(config.supervisor.backoff_max)}",
    ]
    for bus in config.buses:
        topics = list(bus.topics())
        devices = len({t.split("/")[1] for t in topics})
        lines.append(f"bus {bus.name} ({bus.kind}): {devices} devices, {len(topics)} points")
    if not config.buses:
        lines.append("no buses configured: the gateway will start but read nothing")
    return lines
