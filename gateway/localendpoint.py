"""The local endpoint file: how ``edge-gateway tail`` on the gateway's own machine finds the
device plane without being told its URL, token or certificate.

While the device plane is up, the gateway writes ``device-plane.json`` (``write``) into its
runtime directory: the URL to connect to, a token it accepts only from loopback peers (new at
each start), the certificate to pin, and its pid. ``tail`` looks for it in the usual places
(``find``); the gateway removes it when it stops (``remove``), and a file left behind by a
gateway that was killed is recognised by its pid and skipped.

The file holds a token, so it is written mode 0640 into a directory of mode 0750 that must
belong to the gateway's user: a directory squatted in ``/tmp`` by another user, or a symlink
there, is refused rather than written into.

Depends on attrs, cattrs and ``gateway.core``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError

from gateway.core.configtypes import FileRefused, read_regular_file
from gateway.core.validation import leaves

FILE_NAME = "device-plane.json"
DIRECTORY_NAME = "edge-gateway"
"""The directory below ``$XDG_RUNTIME_DIR`` and ``/run``; also the group that may read it."""
SYSTEM_DIRECTORY = Path("/run") / DIRECTORY_NAME
"""What systemd's ``RuntimeDirectory=edge-gateway`` creates for the service."""

DIRECTORY_MODE = 0o750
FILE_MODE = 0o640
MAX_FILE_SIZE = 64 * 1024
"""The file is a few hundred bytes; anything larger is not ours."""


class LocalEndpointError(Exception):
    """The local endpoint file cannot be written, read or found; the message says why and
    what to do."""


class UnsafeDirectoryError(LocalEndpointError, OSError):
    """The directory for the file is a symlink, not a directory, or another user's."""


class MalformedEndpointError(LocalEndpointError, ValueError):
    """The file is not what the gateway writes."""


class EndpointNotFoundError(LocalEndpointError, LookupError):
    """No usable file in any of the places looked."""

    def __init__(self, message: str, *, permission_denied: bool) -> None:
        super().__init__(message)
        self.permission_denied = permission_denied
        """A file was there but could not be read: running as another user would help."""


@attrs.frozen
class LocalEndpoint:
    """What ``device-plane.json`` holds."""

    url: str
    """E.g. ``wss://127.0.0.1:8443``."""
    token: str = attrs.field(repr=False)
    """Accepted only from loopback peers; new at each start of the gateway."""
    cert_file: str | None
    """The server's certificate (PEM) to pin; None for plain ``ws://``."""
    pid: int
    """The gateway's process id: the file is stale once no such process exists."""


# ---- where ----------------------------------------------------------------------------------


def _first_absolute(value: str | None) -> Path | None:
    """The first path of a ':'-separated list, if absolute (a relative one would depend on
    the current directory; the XDG spec says to ignore it)."""
    if not value:
        return None
    first = value.split(":", 1)[0]
    return Path(first) if os.path.isabs(first) else None


def _tmp_directory() -> Path:
    return Path("/tmp") / f"{DIRECTORY_NAME}-{os.getuid()}"


def directory() -> Path:
    """Where the gateway writes the file: ``$RUNTIME_DIRECTORY`` (systemd's
    ``RuntimeDirectory=``; the first path when it lists several), else
    ``$XDG_RUNTIME_DIR/edge-gateway``, else ``/tmp/edge-gateway-<uid>``."""
    runtime = _first_absolute(os.environ.get("RUNTIME_DIRECTORY"))
    if runtime is not None:
        return runtime
    xdg = _first_absolute(os.environ.get("XDG_RUNTIME_DIR"))
    if xdg is not None:
        return xdg / DIRECTORY_NAME
    return _tmp_directory()


def candidates() -> list[Path]:
    """Where ``tail`` looks for the file, in this order, without duplicates:
    ``$RUNTIME_DIRECTORY``, ``/run/edge-gateway`` (the systemd service's),
    ``$XDG_RUNTIME_DIR/edge-gateway`` (a gateway run by this user), ``/tmp/edge-gateway-<uid>``."""
    xdg = _first_absolute(os.environ.get("XDG_RUNTIME_DIR"))
    directories = [
        _first_absolute(os.environ.get("RUNTIME_DIRECTORY")),
        SYSTEM_DIRECTORY,
        None if xdg is None else xdg / DIRECTORY_NAME,
        _tmp_directory(),
    ]
    paths = [d / FILE_NAME for d in directories if d is not None]
    return list(dict.fromkeys(paths))


# ---- the file -------------------------------------------------------------------------------


def _strict_str(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _strict_int(value: object, _: type) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{value!r} is not a whole number")
    return value


def _make_converter() -> cattrs.Converter:
    # Extra keys are allowed: a newer gateway may add some, and an older tail still works.
    conv = cattrs.Converter(detailed_validation=True)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(int, _strict_int)
    return conv


_CONVERTER = _make_converter()


def _encode(endpoint: LocalEndpoint) -> bytes:
    data: dict[str, Any] = _CONVERTER.unstructure(endpoint)
    return (json.dumps(data, indent=2) + "\n").encode()


def parse(data: bytes, path: Path) -> LocalEndpoint:
    """The endpoint in ``data`` (the contents of ``path``, named in errors)."""
    what = f"{path} is not a device plane endpoint file"
    advice = "remove it; the gateway writes it anew when it starts"
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MalformedEndpointError(f"{what} (not JSON: {e}): {advice}") from None
    if not isinstance(raw, dict):
        raise MalformedEndpointError(f"{what} (not a JSON object): {advice}")
    try:
        endpoint = _CONVERTER.structure(raw, LocalEndpoint)
    except ClassValidationError as e:
        problems = []
        for key, leaf in leaves(e):
            text = "missing" if isinstance(leaf, KeyError) else str(leaf)
            problems.append(f"{key}: {text}")
        raise MalformedEndpointError(f"{what} ({'; '.join(problems)}): {advice}") from None
    if endpoint.pid <= 0:
        raise MalformedEndpointError(f"{what} (pid: {endpoint.pid} is not a pid): {advice}")
    if not endpoint.url.startswith(("ws://", "wss://")):
        raise MalformedEndpointError(f"{what} (url: not a ws:// or wss:// URL): {advice}")
    return endpoint


def read(path: Path) -> LocalEndpoint:
    """The endpoint in the file at ``path``. Raises ``OSError`` (``FileNotFoundError``,
    ``PermissionError``...) or ``MalformedEndpointError``."""
    try:
        data = read_regular_file(path, MAX_FILE_SIZE)
    except FileRefused as e:
        raise MalformedEndpointError(f"{path} {e}: remove it") from None
    return parse(data, path)


def _unsafe(path: Path, what: str) -> UnsafeDirectoryError:
    return UnsafeDirectoryError(
        f"{path} {what}: the gateway will not write its device plane token there (another "
        "user could read or replace it); remove it, or set RUNTIME_DIRECTORY (systemd: "
        "RuntimeDirectory=edge-gateway) or XDG_RUNTIME_DIR to a directory of the gateway's "
        "own user"
    )


def _open_directory(path: Path) -> int:
    """A file descriptor of ``path``, created (0750) when missing, once it is known to be a
    real directory of this user. Everything after goes through the descriptor, so the path
    cannot be swapped for a symlink between the check and the write."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=DIRECTORY_MODE)
        os.chmod(path, DIRECTORY_MODE)  # whatever the umask
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise _unsafe(path, "is a symlink")
    if not stat.S_ISDIR(info.st_mode):
        raise _unsafe(path, "is not a directory")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _unsafe(path, "was replaced by a symlink") from None
        raise
    try:
        owner = os.fstat(fd).st_uid
        if owner != os.geteuid():
            raise _unsafe(path, f"belongs to uid {owner}, not to this user (uid {os.geteuid()})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def write(endpoint: LocalEndpoint, directory: Path) -> Path:
    """Write ``endpoint`` to ``directory/device-plane.json`` atomically (a reader sees the old
    file or the new one, never half of one); the path written. Raises
    ``UnsafeDirectoryError`` or ``OSError``."""
    dir_fd = _open_directory(directory)
    temp = f".{FILE_NAME}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(
            temp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            FILE_MODE,
            dir_fd=dir_fd,
        )
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(_encode(endpoint))
            os.fchmod(fd, FILE_MODE)  # whatever the umask
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, FILE_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)
    return directory / FILE_NAME


def remove(path: Path, pid: int) -> bool:
    """Remove the file at ``path`` if it still holds ``pid``: a gateway started since may have
    replaced it with its own. Whether it was removed."""
    try:
        endpoint = read(path)
    except (OSError, MalformedEndpointError):
        return False
    if endpoint.pid != pid:
        return False
    # Another gateway could replace the file between the read and the unlink; it is a window
    # of microseconds at a stop, and that gateway's tail users would only need a restart.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        return True
    return False


# ---- finding it -----------------------------------------------------------------------------


def _not_ours(path: Path) -> str | None:
    """Why ``path`` (in the shared ``/tmp``) cannot be trusted, or None when it and its
    directory are real and belong to this user; a missing file is left to the reader."""
    for item in (path.parent, path):
        try:
            info = os.lstat(item)
        except FileNotFoundError:
            return None
        except OSError as e:
            return f"cannot be checked ({e.strerror or e})"
        if stat.S_ISLNK(info.st_mode):
            return f"{item} is a symlink"
        if info.st_uid != os.geteuid():
            return f"{item} belongs to uid {info.st_uid}, not to this user: remove it"
    return None


def running(pid: int) -> bool:
    """Whether a process ``pid`` exists (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user (the gateway's service user)
    return True


def find(skipped: list[str] | None = None) -> tuple[LocalEndpoint, Path]:
    """The first usable endpoint file of ``candidates()`` and its path. Files of gateways no
    longer running are skipped, and so is a file in ``/tmp`` that is not this user's (anyone
    can create ``/tmp/edge-gateway-<uid>`` first and put a URL, certificate and token of their
    choosing there). Each candidate passed over adds a line to ``skipped``. Raises
    ``EndpointNotFoundError`` saying where it looked and what stood in the way."""
    notes: list[str] = [] if skipped is None else skipped
    permission_denied = False
    shared = _tmp_directory() / FILE_NAME
    for path in candidates():
        if path == shared and (problem := _not_ours(path)) is not None:
            notes.append(f"  {path}: ignored: {problem}")
            continue
        try:
            endpoint = read(path)
        except (FileNotFoundError, NotADirectoryError):
            notes.append(f"  {path}: not there")
            continue
        except PermissionError:
            permission_denied = True
            notes.append(
                f"  {path}: permission denied: run with sudo, or join group {DIRECTORY_NAME} "
                f"(sudo usermod -aG {DIRECTORY_NAME} $USER, then log in again)"
            )
            continue
        except OSError as e:
            notes.append(f"  {path}: cannot be read ({e.strerror or e})")
            continue
        except MalformedEndpointError as e:
            notes.append(f"  {e}")
            continue
        if not running(endpoint.pid):
            notes.append(
                f"  {path}: stale: written by process {endpoint.pid}, which is no longer "
                "running (a gateway that was killed)"
            )
            continue
        return endpoint, path
    raise EndpointNotFoundError(
        "no local device plane found; looked at:\n"
        + "\n".join(notes)
        + "\nIs the gateway running on this machine, with a [device_plane] section in its "
        "config?",
        permission_denied=permission_denied,
    )
