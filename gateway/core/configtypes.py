"""Value types for the config file, shared by the daemon and the drivers' config classes.

Durations are strings (``"250ms"``, ``"2s"``, ``"5min"``, ``"1h"``) held as float seconds;
sizes are strings (``"64KiB"``, ``"512MiB"``) held as int bytes; both are bounded, so no
accepted value overflows arithmetic later. Secrets are read from files (``*_file`` keys) and
never shown in a repr or a log line. Pure: no I/O but reading files (the config, secrets) with
``read_regular_file``, which refuses what could hang or exhaust memory.
"""

from __future__ import annotations

import datetime
import hmac
import math
import os
import re
import stat
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


def toml_repr(value: object) -> str:
    """A value as it is written in TOML, for error messages; long ones are cut short so that
    every problem stays one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, datetime.date | datetime.time):  # TOML dates and times
        return value.isoformat()
    if isinstance(value, int) and abs(value) >= 10**40:
        return f"a number of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}... ({len(text)} characters)"


MAX_DURATION = 365 * 86400.0
"""The longest duration accepted anywhere (365 days)."""
MAX_SIZE = 1024**4
"""The largest size accepted anywhere (1024GiB)."""

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|h|d)\s*", re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|kB|KB|MB|GB)?\s*", re.ASCII)
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


class DurationTooLong(ConfigValueError):
    """A well-formed duration beyond ``MAX_DURATION``."""


def parse_duration(text: object) -> Duration:
    if not isinstance(text, str):
        raise ConfigValueError(
            f"{toml_repr(text)} is not a duration: write it as a string with a unit, "
            'e.g. "250ms", "2s", "5min", "1h"'
        )
    m = _DURATION.fullmatch(text)
    if not m:
        raise ConfigValueError(
            f"{toml_repr(text)} is not a duration: use a number and one of ms, s, min, h, d, "
            'e.g. "250ms", "2s", "5min"'
        )
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    # A long enough digit string is inf as a float; anything this long is a typo anyway.
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise DurationTooLong(
            f"{toml_repr(text)} is too long: a duration may be at most 365d (365 days)"
        )
    return Duration(seconds)


def parse_size(text: object) -> Size:
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ConfigValueError(
            f'{toml_repr(text)} is not a size: write e.g. "64KiB", "512MiB", "1GB"'
        )
    if isinstance(text, int):
        size: float = text
    else:
        m = _SIZE.fullmatch(text)
        if not m:
            raise ConfigValueError(
                f"{toml_repr(text)} is not a size: use a number and one of B, KiB, MiB, GiB, "
                'kB, MB, GB, e.g. "512MiB"'
            )
        size = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if size < 0:
        raise ConfigValueError(f"{toml_repr(text)} is negative: a size is 0 or more")
    if not math.isfinite(size) or size > MAX_SIZE:
        raise ConfigValueError(f"{toml_repr(text)} is too large: a size may be at most 1024GiB")
    return Size(int(size))


def format_duration(seconds: float) -> str:
    for unit in ("h", "min", "s"):
        n = seconds / _DURATION_UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return f"{seconds * 1000:g}ms"


def parse_name(text: object) -> Name:
    if not isinstance(text, str):
        raise ConfigValueError(f"{toml_repr(text)} is not a name: expected a string")
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


class FileRefused(Exception):
    """A file that ``read_regular_file`` will not read; the message says what it is instead."""


_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _bytes(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if n % _SIZE_UNITS[unit] == 0:
            return f"{n // _SIZE_UNITS[unit]}{unit}"
    return f"{n} bytes"


def _refuse_unless_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise FileRefused(f"is {kind}, not a regular file")


def read_regular_file(path: Path, limit: int) -> bytes:
    """The contents of a regular file of at most ``limit`` bytes.

    Anything else is refused before it is read (``FileRefused``): a FIFO would block the read
    for ever, ``/dev/zero`` would fill memory. The path is checked with ``stat`` before it is
    opened, because opening some devices has effects (a serial port raises DTR); the open uses
    ``O_NONBLOCK`` so that even a FIFO swapped in meanwhile cannot block it, and ``fstat`` then
    checks what was really opened. Raises ``OSError`` (and ``ValueError`` for a NUL in the path).
    """
    _refuse_unless_regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        _refuse_unless_regular(info.st_mode)
        if info.st_size > limit:
            raise FileRefused(f"is {info.st_size} bytes, more than the limit of {_bytes(limit)}")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # the file may grow while it is read
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FileRefused(f"is larger than the limit of {_bytes(limit)}")
        return b"".join(chunks)
    finally:
        os.close(fd)


MAX_SECRET_FILE = 64 * 1024
"""A secret (a password, a key in PEM form) is far smaller; anything larger is the wrong file."""


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
        # utf-8-sig: a byte order mark (Notepad writes one) is not part of the secret.
        value = read_regular_file(path, MAX_SECRET_FILE).decode("utf-8-sig").strip()
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
    except FileRefused as e:
        raise ConfigValueError(
            f"secret file {str(path)!r} {e}: give the path of the file that holds the secret"
        ) from None
    except OSError as e:
        raise ConfigValueError(f"secret file {str(path)!r} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigValueError(
            f"secret file {str(path)!r} is not UTF-8 text: save it as UTF-8"
        ) from None
    except ValueError as e:  # a NUL in the path
        raise ConfigValueError(f"secret file {str(path)!r} cannot be read: {e}") from None
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
