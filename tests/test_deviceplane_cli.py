"""The device plane in the real ``edge-gateway run`` (a subprocess): listening, the local
endpoint file, reload (revocation, live ACL) and SIGTERM (every client gets 1001), with the
``websockets`` library as the independent client."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import websockets.exceptions
import websockets.sync.client

from gateway import localendpoint
from gateway.deviceauth import hash_token
from tests.conftest import TIMEOUT, Daemon

HMI_TOKEN = "hmi-token-0123456789abcdefghijklmnop"
PANEL_TOKEN = "panel-token-0123456789abcdefghijklm"


def free_port() -> int:
    """A port nothing listens on now (the config wants a real one, not 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def plane_toml(port: int, *, panel: bool = True) -> str:
    clients = [
        f"""
[[device_plane.clients]]
id = "hmi-1"
token_sha256 = "{hash_token(HMI_TOKEN)}"
subscribe = ["line-1/#"]
"""
    ]
    if panel:
        clients.append(
            f"""
[[device_plane.clients]]
id = "panel"
token_sha256 = "{hash_token(PANEL_TOKEN)}"
subscribe = ["#"]
"""
        )
    return f"""
[device_plane]
listen = "127.0.0.1"
port = {port}
tls_cert_file = "cert.pem"
tls_key_file = "key.pem"
ping_interval = "1s"
""" + "".join(clients)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(tmp_path: Path, ca: trustme.CA) -> Path:
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    return tmp_path


@pytest.fixture
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o750)
    return path


@pytest.fixture
def clients(client_ssl: ssl.SSLContext) -> Iterator[Callable[..., Any]]:
    opened = contextlib.ExitStack()

    def connect(
        port: int, token: str, topics: list[str]
    ) -> websockets.sync.client.ClientConnection:
        ws = opened.enter_context(
            websockets.sync.client.connect(
                f"wss://127.0.0.1:{port}/",
                ssl=client_ssl,
                additional_headers={"Authorization": f"Bearer {token}"},
                open_timeout=TIMEOUT,
            )
        )
        ws.send(json.dumps({"type": "subscribe", "topics": topics}))
        ws.send(json.dumps({"type": "ping", "id": "subscribed"}))
        while json.loads(ws.recv(timeout=TIMEOUT)).get("type") != "pong":
            pass
        return ws

    with opened:
        yield connect


def listening_port(daemon: Daemon) -> int:
    line = daemon.wait_for_log("device plane listening on wss://127.0.0.1:")
    match = re.search(r"wss://127\.0\.0\.1:(\d+)", line)
    assert match is not None
    return int(match.group(1))


def close_code(ws: websockets.sync.client.ClientConnection) -> int:
    """Read until the gateway closes; the code it sent (-1 for none)."""
    while True:
        try:
            ws.recv(timeout=TIMEOUT)
        except websockets.exceptions.ConnectionClosed as e:
            return e.rcvd.code if e.rcvd is not None else -1


def test_sigterm_closes_every_client_with_1001(
    daemon: Callable[..., Daemon],
    gateway_config: Callable[..., Path],
    tls_files: Path,
    runtime_dir: Path,
    clients: Callable[..., Any],
) -> None:
    gw = daemon(gateway_config(plane_toml(free_port())), RUNTIME_DIRECTORY=str(runtime_dir))
    port = listening_port(gw)
    ready = gw.wait_ready()
    assert "bus up, 0 down, device plane up, 0 wss clients" in ready

    # The local endpoint file says where and holds a token that works from here.
    endpoint = localendpoint.read(runtime_dir / localendpoint.FILE_NAME)
    assert endpoint.url == f"wss://127.0.0.1:{port}"
    assert endpoint.pid == gw.proc.pid
    assert endpoint.cert_file == str(tls_files / "cert.pem")

    connected = [clients(port, HMI_TOKEN, ["line-1/#"]) for _ in range(3)]
    connected.append(clients(port, endpoint.token, ["#"]))
    frame = json.loads(connected[0].recv(timeout=TIMEOUT))
    assert frame["type"] == "readings"
    assert frame["readings"][0]["topic"].startswith("line-1/boiler/")

    gw.send_signal(signal.SIGTERM)
    assert [close_code(ws) for ws in connected] == [1001] * 4
    assert gw.wait_exit() == 0
    assert not (runtime_dir / localendpoint.FILE_NAME).exists()


def test_reload_revokes_a_removed_client_and_keeps_the_rest(
    daemon: Callable[..., Daemon],
    gateway_config: Callable[..., Path],
    tls_files: Path,
    runtime_dir: Path,
    clients: Callable[..., Any],
) -> None:
    gw = daemon(gateway_config(plane_toml(free_port())), RUNTIME_DIRECTORY=str(runtime_dir))
    port = listening_port(gw)
    gw.wait_ready()
    hmi = clients(port, HMI_TOKEN, ["line-1/#"])
    panel = clients(port, PANEL_TOKEN, ["#"])

    gateway_config(plane_toml(port, panel=False))
    gw.send_signal(signal.SIGHUP)
    assert close_code(panel) == 1008
    gw.wait_for_log("reloaded")
    # The hmi stayed connected and keeps receiving.
    hmi.send(json.dumps({"type": "ping", "id": "after"}))
    while json.loads(hmi.recv(timeout=TIMEOUT)) != {"type": "pong", "id": "after"}:
        pass
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        clients(port, PANEL_TOKEN, ["#"])
    assert info.value.response.status_code == 401
    assert any("panel" in line and "removed or its token changed" in line for line in gw.lines)


def test_a_port_in_use_ends_the_gateway_with_69(
    daemon: Callable[..., Daemon],
    gateway_config: Callable[..., Path],
    tls_files: Path,
    runtime_dir: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = daemon(gateway_config(plane_toml(port)), RUNTIME_DIRECTORY=str(runtime_dir))
        assert gw.wait_exit() == 69
    line = gw.wait_for_log("cannot start:")
    assert "device plane devices cannot start" in line
    assert "address already in use" in line.lower()
    assert "(exit 69)" in line
