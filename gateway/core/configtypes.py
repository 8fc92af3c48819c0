"""Value types for the config file, shared by the daemon and the drivers' config classes.

Durations are strings (``"250ms"``, ``"2s"``, ``"5min"``, ``"1h"``) held as float seconds;
sizes are strings (``"64KiB"``, ``"512MiB"``) held as int bytes; secrets are read from files
(``*_file`` keys) and never shown in a repr or a log line. Pure: no I/O but reading secrets.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NewType

import attrs

from gateway.core.topics import name_problem

Duration = NewType("Duration", float)
"""Seconds, written in the config as ``"500ms"``, ``"2s"``, ``"5min"``, ``"1h"``."""

Size = NewType("Size", int)
"""Bytes, written in the config as ``"64KiB"``, ``"512MiB"``, ``"1GB"``."""

Name = NewType("Name", str)
"""A name that becomes one level of a topic (``bus/device/point``)."""


class ConfigValueError(ValueError):
    """A bad value; ``subpath`` names the key below the current path that is wrong."""

    def __init__(self, message: str, subpath: str = "") -> None:
        super().__init__(message)
        self.subpath = subpath


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|h|d)\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|kB|KB|MB|GB)?\s*")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(text: object) -> Duration:
    if not isinstance(text, str):
        raise ConfigValueError(
            f"{text!r} is not a duration: write it as a string with a unit, "
            'e.g. "250ms", "2s", "5min", "1h"'
        )
    m = _DURATION.fullmatch(text)
    if not m:
        raise ConfigValueError(
            f"{text!r} is not a duration: use a number and one of ms, s, min, h, d, "
            'e.g. "250ms", "2s", "5min"'
        )
    return Duration(float(m.group(1)) * _DURATION_UNITS[m.group(2)])


def parse_size(text: object) -> Size:
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ConfigValueError(f'{text!r} is not a size: write e.g. "64KiB", "512MiB", "1GB"')
    if isinstance(text, int):
        return Size(text)
    m = _SIZE.fullmatch(text)
    if not m:
        raise ConfigValueError(
            f"{text!r} is not a size: use a number and one of B, KiB, MiB, GiB, kB, MB, GB, "
            'e.g. "512MiB"'
        )
    return Size(int(float(m.group(1)) * _SIZE_UNITS[m.group(2)]))


def format_duration(seconds: float) -> str:
    for unit in ("h", "min", "s"):
        n = seconds / _DURATION_UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return f"{seconds * 1000:g}ms"


def parse_name(text: object) -> Name:
    if not isinstance(text, str):
        raise ConfigValueError(f"{text!r} is not a name: expected a string")
    problem = name_problem(text)
    if problem:
        raise ConfigValueError(problem)
    return Name(text)


@attrs.frozen(repr=False)
class Secret:
    """A secret read from a file. Its repr and str never show the value."""

    source: Path
    _value: str

    def reveal(self) -> str:
        return self._value

    def matches(self, candidate: str) -> bool:
        """Constant-time comparison."""
        return hmac.compare_digest(self._value.encode(), candidate.encode())

    def __repr__(self) -> str:
        return f"Secret(source={str(self.source)!r})"

    __str__ = __repr__


def credentials_dir() -> Path | None:
    value = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(value) if value else None


def load_secret(text: object, config_dir: Path) -> Secret:
    """Read a secret file. Relative paths resolve against ``$CREDENTIALS_DIRECTORY`` (systemd
    ``LoadCredential=``) when set, otherwise against the config file's directory."""
    if not isinstance(text, str) or not text:
        raise ConfigValueError(f"{text!r} is not a file path: expected a string")
    path = Path(text)
    if not path.is_absolute():
        path = (credentials_dir() or config_dir) / path
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        where = (
            "$CREDENTIALS_DIRECTORY"
            if credentials_dir() and not Path(text).is_absolute()
            else "the config's directory"
        )
        raise ConfigValueError(
            f"secret file {str(path)!r} does not exist: create it (mode 0600), or give an "
            f"absolute path (relative paths resolve against {where})"
        ) from None
    except OSError as e:
        raise ConfigValueError(f"secret file {str(path)!r} cannot be read: {e.strerror}") from None
    if not value:
        raise ConfigValueError(f"secret file {str(path)!r} is empty")
    return Secret(path, value)


def duplicate_names(path: str, names: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(path, message)`` for each name that repeats an earlier one in the list at ``path``."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            yield (
                f"{path}[{i}].name",
                f"duplicate name {name!r} (entry [{seen[name]}] has it too): names must be unique",
            )
        else:
            seen[name] = i
