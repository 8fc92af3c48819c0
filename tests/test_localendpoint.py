"""The local endpoint file: where it goes, safe writing, stale files, and what ``find`` says."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import localendpoint
from gateway.localendpoint import (
    FILE_NAME,
    EndpointNotFoundError,
    LocalEndpoint,
    MalformedEndpointError,
    UnsafeDirectoryError,
)

TOKEN = "local-token-0123456789abcdefghijklmnopq"
UID = os.getuid()


def endpoint(pid: int | None = None, url: str = "wss://127.0.0.1:8443") -> LocalEndpoint:
    return LocalEndpoint(
        url, TOKEN, "/etc/edge-gateway/cert.pem", os.getpid() if pid is None else pid
    )


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No RUNTIME_DIRECTORY or XDG_RUNTIME_DIR from the environment the tests run in."""
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return monkeypatch


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


def test_directory_prefers_runtime_directory_then_xdg_then_tmp(env: pytest.MonkeyPatch) -> None:
    assert localendpoint.directory() == Path(f"/tmp/edge-gateway-{UID}")
    env.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert localendpoint.directory() == Path("/run/user/1000/edge-gateway")
    # systemd lists several when RuntimeDirectory= names several: the first is ours.
    env.setenv("RUNTIME_DIRECTORY", "/run/edge-gateway:/run/other")
    assert localendpoint.directory() == Path("/run/edge-gateway")
    # Relative paths would depend on the current directory: ignored (as the XDG spec says).
    env.setenv("RUNTIME_DIRECTORY", "relative")
    env.setenv("XDG_RUNTIME_DIR", "")
    assert localendpoint.directory() == Path(f"/tmp/edge-gateway-{UID}")


def test_candidates_in_order_without_duplicates(env: pytest.MonkeyPatch) -> None:
    assert localendpoint.candidates() == [
        Path("/run/edge-gateway") / FILE_NAME,
        Path(f"/tmp/edge-gateway-{UID}") / FILE_NAME,
    ]
    env.setenv("RUNTIME_DIRECTORY", "/run/edge-gateway")
    env.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert localendpoint.candidates() == [
        Path("/run/edge-gateway") / FILE_NAME,
        Path("/run/user/1000/edge-gateway") / FILE_NAME,
        Path(f"/tmp/edge-gateway-{UID}") / FILE_NAME,
    ]
    env.setenv("RUNTIME_DIRECTORY", "/srv/gw")
    assert localendpoint.candidates()[:2] == [
        Path("/srv/gw") / FILE_NAME,
        Path("/run/edge-gateway") / FILE_NAME,
    ]


def test_write_creates_private_directory_and_file_and_reads_back(tmp_path: Path) -> None:
    directory = tmp_path / "edge-gateway"
    old_umask = os.umask(0o022)  # a permissive umask must not widen the modes
    try:
        path = localendpoint.write(endpoint(), directory)
    finally:
        os.umask(old_umask)
    assert path == directory / FILE_NAME
    assert stat.S_IMODE(directory.stat().st_mode) == 0o750
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert localendpoint.read(path) == endpoint()
    assert sorted(p.name for p in directory.iterdir()) == [FILE_NAME]  # no temp file left
    assert json.loads(path.read_text())["url"] == "wss://127.0.0.1:8443"


def test_write_replaces_an_existing_file(tmp_path: Path) -> None:
    path = localendpoint.write(endpoint(url="wss://127.0.0.1:1"), tmp_path)
    localendpoint.write(endpoint(url="wss://127.0.0.1:2"), tmp_path)
    assert localendpoint.read(path).url == "wss://127.0.0.1:2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]


def test_token_not_in_repr() -> None:
    assert TOKEN not in repr(endpoint())


def test_write_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "edge-gateway"
    link.symlink_to(real)
    with pytest.raises(UnsafeDirectoryError) as info:
        localendpoint.write(endpoint(), link)
    assert str(link) in str(info.value)
    assert "is a symlink" in str(info.value)
    assert "RUNTIME_DIRECTORY" in str(info.value)
    assert isinstance(info.value, OSError)
    assert list(real.iterdir()) == []


def test_write_refuses_a_file_in_place_of_the_directory(tmp_path: Path) -> None:
    squat = tmp_path / "edge-gateway"
    squat.write_text("")
    with pytest.raises(UnsafeDirectoryError, match="is not a directory"):
        localendpoint.write(endpoint(), squat)


def test_write_refuses_another_users_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Running as another uid stands in for a directory squatted in /tmp by another user.
    monkeypatch.setattr(os, "geteuid", lambda: UID + 1)
    with pytest.raises(UnsafeDirectoryError) as info:
        localendpoint.write(endpoint(), tmp_path)
    assert f"{tmp_path} belongs to uid {UID}, not to this user (uid {UID + 1})" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_remove_only_our_own_file(tmp_path: Path) -> None:
    path = localendpoint.write(endpoint(pid=4242), tmp_path)
    # Another gateway wrote its file since: this one must not remove it.
    assert not localendpoint.remove(path, 1111)
    assert path.exists()
    assert localendpoint.remove(path, 4242)
    assert not path.exists()
    assert not localendpoint.remove(path, 4242)  # gone already: nothing to do


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"url": "wss://x:1", "cert_file": null, "pid": 5}', "token: missing"),
        (
            b'{"url": "wss://x:1", "token": "t", "cert_file": null, "pid": "5"}',
            "pid: '5' is not a whole number",
        ),
        (
            b'{"url": "wss://x:1", "token": "t", "cert_file": null, "pid": true}',
            "pid: True is not a whole number",
        ),
        (b'{"url": "wss://x:1", "token": "t", "cert_file": null, "pid": 0}', "pid: 0 is not a pid"),
        (
            b'{"url": "https://x:1", "token": "t", "cert_file": null, "pid": 5}',
            "url: not a ws:// or wss:// URL",
        ),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_read_malformed(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / FILE_NAME
    path.write_bytes(content)
    with pytest.raises(MalformedEndpointError) as info:
        localendpoint.read(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)
    assert "remove it" in str(info.value)


def test_read_ignores_keys_of_later_versions(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    data = {"url": "ws://127.0.0.1:1", "token": TOKEN, "cert_file": None, "pid": 7, "new": 1}
    path.write_text(json.dumps(data))
    assert localendpoint.read(path) == LocalEndpoint("ws://127.0.0.1:1", TOKEN, None, 7)


def test_read_refuses_a_fifo(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    os.mkfifo(path)
    with pytest.raises(MalformedEndpointError, match="FIFO"):
        localendpoint.read(path)


def test_find_first_live_file(env: pytest.MonkeyPatch, tmp_path: Path, dead_pid: int) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    env.setattr(localendpoint, "candidates", lambda: [first / FILE_NAME, second / FILE_NAME])
    localendpoint.write(endpoint(pid=dead_pid, url="wss://127.0.0.1:1"), first)
    localendpoint.write(endpoint(url="wss://127.0.0.1:2"), second)
    found, path = localendpoint.find()
    assert (found.url, path) == ("wss://127.0.0.1:2", second / FILE_NAME)


def test_find_through_runtime_directory(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    localendpoint.write(endpoint(), localendpoint.directory())
    assert localendpoint.find() == (endpoint(), tmp_path / FILE_NAME)


def test_find_says_where_it_looked_and_what_stood_in_the_way(
    env: pytest.MonkeyPatch, tmp_path: Path, dead_pid: int
) -> None:
    missing = tmp_path / "missing" / FILE_NAME
    stale = localendpoint.write(endpoint(pid=dead_pid), tmp_path / "stale")
    malformed = tmp_path / "malformed.json"
    malformed.write_text("{")
    env.setattr(localendpoint, "candidates", lambda: [missing, stale, malformed])
    with pytest.raises(EndpointNotFoundError) as info:
        localendpoint.find()
    message = str(info.value)
    assert f"  {missing}: not there" in message
    assert f"  {stale}: stale: written by process {dead_pid}, which is no longer running" in message
    assert f"  {malformed} is not a device plane endpoint file" in message
    assert "[device_plane]" in message
    assert not info.value.permission_denied
    assert TOKEN not in message


def test_find_names_the_unreadable_file_and_the_group(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    unreadable = localendpoint.write(endpoint(), tmp_path / "service")
    mine = localendpoint.write(endpoint(), tmp_path / "mine")
    env.setattr(localendpoint, "candidates", lambda: [unreadable, mine])
    real_read = localendpoint.read_regular_file

    def read(path: Path, limit: int) -> bytes:
        # As for the gateway's 0640 file, seen by a user outside its group (root reads any).
        if path == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path, limit)

    env.setattr(localendpoint, "read_regular_file", read)
    # Another file further on is found all the same.
    assert localendpoint.find() == (endpoint(), mine)
    mine.unlink()
    with pytest.raises(EndpointNotFoundError) as info:
        localendpoint.find()
    assert f"{unreadable}: permission denied: run with sudo, or join group edge-gateway" in str(
        info.value
    )
    assert info.value.permission_denied


def test_running() -> None:
    assert localendpoint.running(os.getpid())
    assert localendpoint.running(1)  # init: exists, and belongs to another user (or us as root)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_find_ignores_a_tmp_directory_squatted_by_another_user(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    squatted = tmp_path / "edge-gateway-0"
    env.setattr(localendpoint, "_tmp_directory", lambda: squatted)
    env.setattr(localendpoint, "candidates", lambda: [squatted / FILE_NAME])
    path = localendpoint.write(endpoint(), squatted)
    os.chown(squatted, 65534, 65534)
    os.chown(path, 65534, 65534)
    skipped: list[str] = []
    with pytest.raises(EndpointNotFoundError) as info:
        localendpoint.find(skipped)
    assert f"{squatted} belongs to uid 65534, not to this user: remove it" in str(info.value)
    assert skipped == [
        f"  {path}: ignored: {squatted} belongs to uid 65534, not to this user: remove it"
    ]


def test_find_ignores_a_symlink_in_tmp(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = localendpoint.write(endpoint(), tmp_path / "elsewhere")
    link = tmp_path / "edge-gateway-0"
    link.symlink_to(real.parent)
    env.setattr(localendpoint, "_tmp_directory", lambda: link)
    env.setattr(localendpoint, "candidates", lambda: [link / FILE_NAME])
    with pytest.raises(EndpointNotFoundError, match="is a symlink"):
        localendpoint.find()
