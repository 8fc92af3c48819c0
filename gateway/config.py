"""The configuration file: model, loading and validation.

One TOML file structured by one cattrs converter into frozen attrs classes. Every problem is
collected (not just the first) and reported with its path and a hint, e.g.
``gateway.toml: buses[1].devices[0].points[3].type: 'flaot32' is not one of int16, ...``.
Driver sections come from ``drivers.registry``; a new component adds its section class here.
Sections: gateway, supervisor, logging, hub, buses, device_plane, outbox, cpi, api.

Whatever the file holds, loading it either returns a ``Config`` or raises ``ConfigError``: no
other exception, no hang (``read_regular_file``), no value that overflows later (non-finite
numbers, durations and sizes are bounded, nesting is limited).
"""

from __future__ import annotations

import codecs
import math
import os
import pwd
import stat
import tomllib
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs
from cattrs.errors import (
    ClassValidationError,
    IterableValidationError,
)
from cattrs.gen import make_dict_structure_fn

from drivers.base import BusConfig
from drivers.registry import KINDS, DriverKind
from gateway.api import ApiSection
from gateway.core.configtypes import (
    ConfigValueError,
    Duration,
    FileRefused,
    Name,
    Secret,
    Size,
    duplicate_names,
    format_duration,
    load_secret,
    parse_duration,
    parse_name,
    parse_size,
    read_regular_file,
    toml_repr,
)
from gateway.core.topics import DEVICE_NAMESPACE
from gateway.core.validation import UnknownKey, join, leaves
from gateway.deviceauth import DevicePlaneSection
from gateway.forwarder import CpiSection
from gateway.outbox import OutboxSection

DEFAULT_PATH = Path("/etc/edge-gateway/gateway.toml")
EX_CONFIG = 78  # sysexits.h; the unit's RestartPreventExitStatus=78 stops a crash loop
MAX_CONFIG_FILE = 1024 * 1024
"""A config file larger than 1 MiB is refused unread: it cannot be a real config."""
MAX_NESTING = 32
"""Tables and arrays inside each other; the deepest real table (a sim or Modbus point) is 6."""
MAX_INT = 2**63 - 1
"""TOML's whole numbers are 64-bit; Python's parser accepts more."""


def _default_state_dir() -> str:
    # systemd's StateDirectory= sets $STATE_DIRECTORY.
    # Set but empty (a unit or shell mishap) means not set.
    return os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "/var/lib/edge-gateway"


@attrs.frozen
class GatewaySection:
    name: Name = Name("edge-gateway")
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
    device_plane: DevicePlaneSection | None = None
    """The wss server for devices and HMIs; None (no ``[device_plane]``): no server."""
    outbox: OutboxSection = attrs.Factory(OutboxSection)
    """The store-and-forward database; used only with ``[cpi]``."""
    cpi: CpiSection | None = None
    """Where readings are forwarded; None (no ``[cpi]``): readings are not stored or sent."""
    api: ApiSection | None = None
    """The HTTPS management and command API; None (no ``[api]``): no API."""

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
        if "\0" in self.gateway.state_dir:
            yield "gateway.state_dir", "contains a NUL character: give a directory path"
        elif not Path(self.gateway.state_dir).is_absolute():
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
            if bus.name == DEVICE_NAMESPACE:
                yield (
                    f"buses[{i}].name",
                    f"{bus.name!r} is reserved for readings that devices publish over the device "
                    f"plane ({DEVICE_NAMESPACE}/<client id>/<point>): give the bus another name",
                )
        if self.device_plane is not None:
            for path, message in self.device_plane.check():
                yield f"device_plane.{path}", message
        for path, message in self.outbox.check():
            yield f"outbox.{path}", message
        if self.cpi is not None:
            for path, message in self.cpi.check():
                yield f"cpi.{path}", message
        if self.api is not None:
            for path, message in self.api.check():
                yield f"api.{path}", message
            yield from self._check_ports()

    def _check_ports(self) -> Iterator[tuple[str, str]]:
        """The API and the device plane cannot share a port on overlapping addresses."""
        api, plane = self.api, self.device_plane
        if api is None or plane is None or api.port != plane.port:
            return
        wildcard = ("0.0.0.0", "::")
        if api.listen == plane.listen or api.listen in wildcard or plane.listen in wildcard:
            yield (
                "api.port",
                f"{api.port} is also device_plane.port on an overlapping address: give the "
                "API another port (e.g. 9443)",
            )


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


def _strict(kind: type, label: str) -> Callable[[object, type], object]:
    numeric = kind in (int, float)

    def structure(value: object, _: type) -> object:
        if isinstance(value, bool) and kind is not bool:
            raise ConfigValueError(f"{toml_repr(value)} is not {label}")
        if numeric and isinstance(value, int) and abs(value) > MAX_INT:
            raise ConfigValueError(
                f"{toml_repr(value)} is too large: a whole number is at most {MAX_INT} (64 bits)"
            )
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind):
            raise ConfigValueError(f"{toml_repr(value)} is not {label}")
        if isinstance(value, float) and not math.isfinite(value):
            # TOML allows inf and nan; no setting means them, and they break arithmetic later.
            raise ConfigValueError(f"{toml_repr(value)} is not a finite number: write a number")
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
            raise ConfigValueError(f"expected a table ([[buses]]), got {toml_repr(value)}")
        kind = value.get("kind")
        if kind is None:
            raise ConfigValueError(
                f"missing: every bus needs a kind, one of {', '.join(kinds)}", "kind"
            )
        driver = kinds.get(kind) if isinstance(kind, str) else None
        if driver is None:
            raise ConfigValueError(f"{toml_repr(kind)} is not one of {', '.join(kinds)}", "kind")
        return conv.structure(value, driver.config_type)

    conv.register_structure_hook_func(lambda t: t is BusConfig, structure_bus)
    return conv


def _problems(exc: BaseException) -> Iterator[tuple[str, str]]:
    """cattrs' detailed-validation errors as ``(path, message)`` pairs."""
    for path, leaf in leaves(exc):
        if isinstance(leaf, UnknownKey):
            yield path, str(leaf)
        elif isinstance(leaf, KeyError):
            yield path, "missing: this key is required"
        elif isinstance(leaf, ConfigValueError):
            yield join(path, leaf.subpath) if leaf.subpath else path, str(leaf)
        elif isinstance(leaf, TypeError) and "not iterable" in str(leaf):
            yield path, "expected a list (e.g. [[buses]] tables, or [ ... ])"
        elif isinstance(leaf, ValueError | TypeError):
            yield path, str(leaf)
        elif isinstance(leaf, RecursionError):
            yield path, _TOO_DEEP
        else:
            # Not expected from the hooks; still a message with the path, not a traceback.
            yield path, f"cannot be used ({type(leaf).__name__}: {leaf})"


_TOO_DEEP = (
    f"tables and arrays nested too deeply (more than {MAX_NESTING} levels): "
    "no setting nests that deep; check the brackets"
)


def _too_deep(data: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """The top-level keys under which tables and arrays nest deeper than ``MAX_NESTING``.
    Walked without recursion, so that the depth itself cannot overflow the stack."""
    for key, top in data.items():
        stack: list[tuple[object, int]] = [(top, 1)]
        while stack:
            value, depth = stack.pop()
            children: Iterable[object]
            if isinstance(value, dict):
                children = value.values()
            elif isinstance(value, list):
                children = value
            else:
                continue
            if depth > MAX_NESTING:
                yield key, _TOO_DEEP
                break
            stack.extend((child, depth + 1) for child in children)


def parse_config(
    text: str,
    source: str = "gateway.toml",
    *,
    config_dir: Path | None = None,
    kinds: Mapping[str, DriverKind] = KINDS,
) -> Config:
    """Parse and validate config text; raises ``ConfigError`` listing every problem."""
    text = text.removeprefix("\ufeff")  # a byte order mark, as Notepad writes it
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        hint = ""
        if str(e).startswith(("Cannot declare", "Cannot overwrite")):
            # The usual cause: a second [api.users] (or [buses], [device_plane.clients])
            # with single brackets, which TOML reads as the same table again.
            hint = (
                "; a table written twice? Each entry of a list of tables needs two brackets: "
                "[[buses]], [[buses.devices]], [[device_plane.clients]], [[api.users]]"
            )
        raise ConfigError(source, [("", f"TOML syntax error: {e}{hint}")]) from None
    except RecursionError:
        # tomllib recurses per level; where it gives up depends on the caller's stack.
        raise ConfigError(source, [("", _TOO_DEEP)]) from None
    except ValueError as e:
        # tomllib turns digits into int(); Python refuses more than 4300 digits.
        message = (
            "a number has thousands of digits: whole numbers in TOML are 64-bit (at most 19 digits)"
            if "digits" in str(e)
            else f"cannot be parsed: {e}"
        )
        raise ConfigError(source, [("", message)]) from None
    problems = list(_too_deep(data))
    if isinstance(data.get("buses"), dict):
        problems.append(
            (
                "buses",
                "is a single table ([buses]): write [[buses]], with two brackets, for each bus",
            )
        )
    plane = data.get("device_plane")
    if isinstance(plane, dict) and isinstance(plane.get("clients"), dict):
        problems.append(
            (
                "device_plane.clients",
                "is a single table ([device_plane.clients]): write [[device_plane.clients]], "
                "with two brackets, for each client",
            )
        )
    api = data.get("api")
    if isinstance(api, dict) and isinstance(api.get("users"), dict):
        problems.append(
            (
                "api.users",
                "is a single table ([api.users]): write [[api.users]], with two brackets, for "
                "each user",
            )
        )
    if problems:
        raise ConfigError(source, problems)
    conv = _make_converter(config_dir or Path.cwd(), kinds)
    try:
        config = conv.structure(data, Config)
    except (ClassValidationError, IterableValidationError) as e:
        raise ConfigError(source, list(_problems(e))) from None
    except RecursionError:
        raise ConfigError(source, [("", _TOO_DEEP)]) from None
    try:
        problems = list(config.check())
    except Exception as e:  # a defect in a check must still end as a config error (exit 78)
        raise ConfigError(
            source,
            [("", f"the config could not be checked ({type(e).__name__}: {e}); please report it")],
        ) from e
    if problems:
        raise ConfigError(source, problems)
    return config


def decode_config(data: bytes) -> str:
    """The text of a config file: UTF-8, with or without a byte order mark. Raises
    ``ValueError`` with what to do for UTF-16/32 (Notepad's "Unicode") and other encodings."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise ValueError("is UTF-32 text: save it as UTF-8")
    # Without a byte order mark, ASCII text in UTF-16 has a NUL byte next to every character.
    utf16_without_bom = len(data) >= 2 and (data[0] == 0) != (data[1] == 0)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or utf16_without_bom:
        raise ValueError(
            'is UTF-16 text (Notepad calls it "Unicode"): save it as UTF-8 '
            '(in Notepad: File, Save as, Encoding "UTF-8")'
        )
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(
            f"is not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}, column {column}): "
            "save it as UTF-8"
        ) from None


def load_config(
    path: Path,
    *,
    kinds: Mapping[str, DriverKind] = KINDS,
    check_state_dir: bool = False,
) -> Config:
    """Read, parse and validate the config file; raises ``ConfigError`` for every failure.

    With ``check_state_dir`` (``check-config``), ``state_dir_problems`` are problems too.
    """
    source = str(path)
    try:
        text = decode_config(_read(path))
        if all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines()):
            # Most likely caught while an editor rewrites it in place; running on defaults
            # would stop every bus and the device plane. Reloads keep the running config.
            raise ConfigError(
                source,
                [
                    (
                        "",
                        "the file has no settings (empty, or only comments): if an editor "
                        "is saving it, reload once it is done; start from examples/",
                    )
                ],
            )
        config = parse_config(text, source, config_dir=path.parent.resolve(), kinds=kinds)
    except ValueError as e:  # decode_config says what the encoding is and what to do
        raise ConfigError(source, [("", str(e))]) from None
    except MemoryError:
        raise ConfigError(source, [("", "cannot read: out of memory")]) from None
    if check_state_dir:
        problems = state_dir_problems(config)
        if problems:
            raise ConfigError(source, problems)
    return config


def _read(path: Path) -> bytes:
    def error(message: str) -> ConfigError:
        return ConfigError(str(path), [("", message)])

    try:
        return read_regular_file(path, MAX_CONFIG_FILE)
    except FileNotFoundError:
        raise error("file not found: create it (see examples/) or pass --config PATH") from None
    except FileRefused as e:
        raise error(f"{e}: pass the path of the TOML config file") from None
    except PermissionError as e:
        raise error(
            f"cannot read: {e.strerror}: let the gateway's user read it "
            "(or run check-config with sudo)"
        ) from None
    except OSError as e:
        raise error(f"cannot read: {e.strerror or e}") from None
    except ValueError as e:  # a NUL in the path
        raise error(f"cannot read: {e}") from None


def state_dir_message(path: str, reason: str) -> str:
    """The problem with an unusable ``gateway.state_dir``, the same for ``check-config``
    (``state_dir_problems``) and for ``run``, which finds it when creating the directory."""
    return (
        f"{path!r} is not a writable directory ({reason}): create it for the gateway's user, "
        "or use systemd's StateDirectory="
    )


def _user() -> str:
    try:
        return f"user {pwd.getpwuid(os.geteuid()).pw_name}"
    except KeyError:  # a uid without a passwd entry (containers)
        return f"uid {os.geteuid()}"


def _state_dir_reason(path: Path) -> str | None:
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        pass  # not there (yet): can it be created?
    except (OSError, ValueError) as e:
        return f"cannot check it: {getattr(e, 'strerror', None) or e}"
    else:
        if not stat.S_ISDIR(mode):
            return "it exists and is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{_user()} cannot write to it"
        return None
    for parent in path.parents:
        try:
            mode = os.stat(parent).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (OSError, ValueError) as e:
            return f"cannot check {str(parent)!r}: {getattr(e, 'strerror', None) or e}"
        if not stat.S_ISDIR(mode):
            return f"it cannot be created: {str(parent)!r} is not a directory"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"it does not exist, and {_user()} cannot create it in {str(parent)!r}"
        return None
    return "no parent directory exists"


def state_dir_problems(config: Config) -> list[tuple[str, str]]:
    """Whether ``gateway.state_dir`` can be used, as far as the user running this can tell
    without creating anything: it is a directory this user may write to, or it does not exist
    yet and its nearest existing parent is one (so ``run`` can create it)."""
    path = config.gateway.state_dir
    reason = _state_dir_reason(Path(path))
    problems = [("gateway.state_dir", state_dir_message(path, reason))] if reason else []
    outbox = Path(config.outbox.file)
    if config.cpi is not None and outbox.is_absolute() and not outbox.parent.is_dir():
        # In the state directory it is created with it; elsewhere its directory must exist.
        problems.append(
            (
                "outbox.file",
                f"{str(outbox)!r}: the directory {str(outbox.parent)!r} does not exist: "
                "create it for the gateway's user, or leave a file name (in state_dir)",
            )
        )
    return problems


def restart_needed(old: Config, new: Config) -> list[str]:
    """The keys that changed from ``old`` to ``new`` but that a reload cannot apply (they are
    read only at start), for the reload to warn about each."""
    read_at_start: dict[str, Callable[[Config], object]] = {
        "gateway.name": lambda c: c.gateway.name,
        "gateway.state_dir": lambda c: c.gateway.state_dir,
        "hub.subscriber_buffer": lambda c: c.hub.subscriber_buffer,
    }
    return [key for key, value in read_at_start.items() if value(old) != value(new)]


def summary(config: Config) -> list[str]:
    """What would run, one line each, for ``check-config``."""
    g = config.gateway
    lines = [
        f"gateway {g.name}: state in {g.state_dir}, "
        f"shutdown timeout {format_duration(g.shutdown_timeout)}",
        f"supervisor: backoff {format_duration(config.supervisor.backoff_initial)} .. "
        f"{format_duration(config.supervisor.backoff_max)}",
    ]
    if config.device_plane is not None:
        lines.append(config.device_plane.describe())
    if config.api is not None:
        lines.append(config.api.describe())
    if config.cpi is not None:
        lines.append(config.cpi.describe())
        o = config.outbox
        lines.append(
            f"outbox: {o.path(g.state_dir)}, at most {o.max_bytes} bytes ({o.policy}), "
            f"synchronous={o.synchronous}"
        )
    for bus in config.buses:
        topics = list(bus.topics())
        devices = len({t.split("/")[1] for t in topics})
        lines.append(
            f"bus {bus.name} ({bus.kind}, {bus.describe()}): "
            f"{_count(devices, 'device')}, {_count(len(topics), 'point')}"
        )
    if not config.buses:
        lines.append("no buses configured: the gateway will start but read nothing")
    return lines


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"
