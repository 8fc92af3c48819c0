"""The device plane over real TLS (trustme) on loopback, with the ``websockets`` library's sync
client (run in a thread) as the independent peer."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import trustme
import websockets.exceptions
import websockets.sync.client
import wsproto
import wsproto.events
import wsproto.frame_protocol
from trio_websocket import WebSocketRequest, serve_websocket

from gateway import deviceplane
from gateway.core.configtypes import Duration, Name, Secret, Size
from gateway.core.reading import Reading
from gateway.deviceauth import DeviceClient, DevicePlaneSection, Refusal, hash_token
from gateway.deviceplane import DevicePlane, RecentIds, TokenBucket
from gateway.hub import Hub, Watermark
from gateway.protocol import MAX_TOPICS

TIMEOUT = 10.0

HMI_TOKEN = "hmi-token-0123456789abcdefghijklmnop"
SENSOR_TOKEN = "sensor-token-0123456789abcdefghijklm"

CLIENTS = (
    DeviceClient(
        id=Name("hmi-1"),
        token_sha256=hash_token(HMI_TOKEN),
        subscribe=("line-1/#", "devices/#"),
        publish=("setpoint",),
    ),
    DeviceClient(
        id=Name("sensor-7"),
        token_sha256=hash_token(SENSOR_TOKEN),
        subscribe=("devices/sensor-7/#",),
        publish=("+",),
    ),
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_section(
    ca: trustme.CA, directory: Path, clients: tuple[DeviceClient, ...], **changes: Any
) -> DevicePlaneSection:
    """A section serving wss on loopback with a certificate of ``ca`` (files in
    ``directory``), for ``clients``."""
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return DevicePlaneSection(
        listen="127.0.0.1",
        port=0,
        tls_cert_file=Secret(cert_file, cert_file.read_text()),
        tls_key_file=Secret(key_file, key_file.read_text()),
        clients=clients,
        **changes,
    )


@pytest.fixture
def section(ca: trustme.CA, tmp_path: Path) -> DevicePlaneSection:
    return tls_section(ca, tmp_path, CLIENTS, send_timeout=Duration(5.0))


@pytest.fixture
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


class Client:
    """A ``websockets`` sync client driven from trio through a worker thread."""

    def __init__(self, ws: websockets.sync.client.ClientConnection) -> None:
        self.ws = ws

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        data = json.dumps(message) if isinstance(message, dict) else message
        await trio.to_thread.run_sync(self.ws.send, data)

    async def receive(self) -> dict[str, Any]:
        data = await trio.to_thread.run_sync(lambda: self.ws.recv(timeout=TIMEOUT))
        result: dict[str, Any] = json.loads(data)
        return result

    async def ping(self) -> None:
        """A protocol ping: everything sent before it has been handled when pong arrives."""
        await self.send({"type": "ping", "id": "sync"})
        assert await self.receive() == {"type": "pong", "id": "sync"}

    async def close_code(self) -> int:
        """Wait until the gateway closes the connection; the code it sent."""

        def wait() -> int:
            # Frames sent before the close are read and discarded.
            while True:
                try:
                    self.ws.recv(timeout=TIMEOUT)
                except websockets.exceptions.ConnectionClosed as e:
                    # -1: closed without a close frame (which no test expects)
                    return e.rcvd.code if e.rcvd is not None else -1

        return await trio.to_thread.run_sync(wait)

    async def close(self) -> None:
        await trio.to_thread.run_sync(self.ws.close)


@pytest.fixture
async def gateway(
    section: DevicePlaneSection,
) -> AsyncIterator[Callable[..., Any]]:
    """Start a device plane; yields ``start(**section changes) -> (plane, hub, scope)``."""
    async with trio.open_nursery() as nursery:

        async def start(
            shutdown_timeout: float = 5.0, **changes: Any
        ) -> tuple[DevicePlane, Hub, trio.CancelScope]:
            hub = Hub()
            plane = DevicePlane(
                attrs.evolve(section, **changes), hub, shutdown_timeout=shutdown_timeout
            )
            scope = trio.CancelScope()

            async def run(task_status: trio.TaskStatus[None]) -> None:
                with scope:
                    await plane.run(task_status=task_status)

            await nursery.start(run)
            return plane, hub, scope

        yield start
        nursery.cancel_scope.cancel()


@pytest.fixture
def connect(client_ssl: ssl.SSLContext) -> Iterator[Callable[..., Any]]:
    opened = contextlib.ExitStack()

    async def connect(port: int, token: str | None = HMI_TOKEN, **kwargs: Any) -> Client:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        ws = await trio.to_thread.run_sync(
            lambda: opened.enter_context(
                websockets.sync.client.connect(
                    f"wss://127.0.0.1:{port}/",
                    ssl=client_ssl,
                    additional_headers=headers,
                    open_timeout=TIMEOUT,
                    close_timeout=TIMEOUT,
                    **kwargs,
                )
            )
        )
        return Client(ws)

    with opened:
        yield connect


async def test_subscribe_publish_ack_with_wildcards(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, hub, _ = await gateway()
    assert plane.condition().state.value == "up"
    hmi = await connect(plane.port)
    sensor = await connect(plane.port, SENSOR_TOKEN, subprotocols=["edge-gateway.v1"])
    assert sensor.ws.subprotocol == "edge-gateway.v1"
    await hmi.send({"type": "subscribe", "topics": ["devices/+/temperature", "line-1/#"]})
    await hmi.ping()

    await sensor.send(
        {
            "type": "publish",
            "id": "p-1",
            "readings": [
                {"point": "temperature", "value": 21.5, "unit": "degC"},
                {"point": "door", "value": True},
            ],
        }
    )
    assert await sensor.receive() == {"type": "ack", "id": "p-1"}
    frame = await hmi.receive()
    assert frame["type"] == "readings"
    assert [(r["topic"], r["value"]) for r in frame["readings"]] == [
        ("devices/sensor-7/temperature", 21.5)
    ]

    hub.publish(Reading("line-1/boiler/flow", 3.0, timestamp=1.0))
    frame = await hmi.receive()
    assert [r["topic"] for r in frame["readings"]] == ["line-1/boiler/flow"]

    await hmi.send({"type": "unsubscribe", "topics": ["line-1/#"]})
    await hmi.ping()
    hub.publish(Reading("line-1/boiler/flow", 4.0, timestamp=2.0))
    hub.publish(Reading("devices/x/temperature", 5.0, timestamp=2.0))
    frame = await hmi.receive()
    assert [r["topic"] for r in frame["readings"]] == ["devices/x/temperature"]

    stats = plane.statistics()
    assert stats.connections == 2
    assert {c.client_id for c in stats.clients} == {"hmi-1", "sensor-7"}
    # hmi: subscribe, ping, unsubscribe, ping; sensor: publish. Out: 2 pongs, ack, 3 readings.
    assert (stats.messages_in, stats.messages_out) == (5, 6)


async def test_acl_denies_subscribe_and_publish(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, hub, _ = await gateway()
    sensor = await connect(plane.port, SENSOR_TOKEN)
    hmi = await connect(plane.port)

    await sensor.send({"type": "subscribe", "topics": ["devices/sensor-7/#", "line-1/#"]})
    error = await sensor.receive()
    assert error["type"] == "error"
    assert error["code"] == "forbidden"
    assert "'line-1/#'" in error["message"]
    # Nothing was subscribed, not even the allowed pattern.
    await sensor.ping()
    hub.publish(Reading("devices/sensor-7/x", 1, timestamp=1.0))
    await sensor.ping()

    sub = hub.subscribe("watcher", ["devices/#"])
    await hmi.send({"type": "publish", "id": "p-9", "readings": [{"point": "door", "value": 1}]})
    error = await hmi.receive()
    assert (error["type"], error["code"], error["ref"]) == ("error", "forbidden", "p-9")
    assert "'door'" in error["message"]
    with pytest.raises(trio.WouldBlock):
        sub.receive_nowait()
    # The connections stay.
    await hmi.ping()
    await sensor.ping()


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abcdefghijklmn"])
async def test_bad_or_missing_token_gets_401(
    gateway: Callable[..., Any],
    connect: Callable[..., Any],
    token: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    plane, _, _ = await gateway()
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        await connect(plane.port, token)
    assert info.value.response.status_code == 401
    assert info.value.response.headers["WWW-Authenticate"] == "Bearer"
    assert plane.statistics().refused == 1
    assert "device plane refused 127.0.0.1:" in caplog.text
    assert ("no token" if token is None else "unknown token (header)") in caplog.text
    if token is not None:
        assert token not in caplog.text
    # Still serving others.
    await (await connect(plane.port)).ping()


async def test_origin_not_allowed_gets_403(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, _, _ = await gateway()
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        await connect(plane.port, origin="https://evil.example")
    assert info.value.response.status_code == 403


async def test_max_connections_gets_503(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, _, _ = await gateway(max_connections=1)
    first = await connect(plane.port)
    await first.ping()
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        await connect(plane.port)
    assert info.value.response.status_code == 503
    await first.ping()


async def test_bad_input_gets_error_and_connection_stays(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, _, _ = await gateway()
    hmi = await connect(plane.port)
    await hmi.send("this is not json")
    error = await hmi.receive()
    assert (error["type"], error["code"]) == ("error", "bad-json")
    await hmi.send({"type": "frobnicate"})
    assert (await hmi.receive())["code"] == "unknown-type"
    await hmi.send({"type": "publish", "id": "p-2"})
    error = await hmi.receive()
    assert (error["code"], error["ref"]) == ("bad-message", "p-2")
    assert "readings" in error["message"]
    await hmi.ping()


async def test_binary_frame_closes_1003(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, hub, _ = await gateway()
    hmi = await connect(plane.port)
    await hmi.send({"type": "subscribe", "topics": ["line-1/#"]})
    await hmi.ping()
    assert len(hub.statistics().subscribers) == 1
    await hmi.send(b"\x00\x01")
    assert await hmi.close_code() == 1003
    # The handler ended and removed its subscription.
    other = await connect(plane.port)
    await other.ping()
    await trio.testing.wait_all_tasks_blocked()
    assert hub.statistics().subscribers == {}
    assert plane.statistics().connections == 1


async def test_oversized_frame_closes_1009(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, _, _ = await gateway(max_message_size=1024)
    hmi = await connect(plane.port)
    await hmi.send({"type": "ping", "id": "x" * 2000})
    assert await hmi.close_code() == 1009


async def test_shutdown_closes_every_client_with_1001(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, hub, scope = await gateway()
    clients = [await connect(plane.port), await connect(plane.port, SENSOR_TOKEN)]
    for client in clients:
        await client.send({"type": "subscribe", "topics": ["devices/sensor-7/#"]})
        await client.ping()
    scope.cancel()
    for client in clients:
        assert await client.close_code() == 1001
    await trio.testing.wait_all_tasks_blocked()
    assert hub.statistics().subscribers == {}
    assert plane.condition().state.value == "down"


@pytest.mark.parametrize("close", ["shutdown", "revoke"])
async def test_a_close_is_not_held_up_by_a_client_that_reads_nothing(
    section: DevicePlaneSection,
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    close: str,
) -> None:
    caplog.set_level(logging.INFO, "gateway.deviceplane")
    hub = Hub()
    # A send waits up to send_timeout; a close may take only shutdown_timeout.
    section = attrs.evolve(section, send_timeout=Duration(30.0))
    plane = DevicePlane(section, hub, shutdown_timeout=0.5)
    scope = trio.CancelScope()
    # Not the 30 s of send_timeout (a shielded send that outlives it raises only at its end).
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def run(task_status: trio.TaskStatus[None]) -> None:
                with scope:
                    await plane.run(task_status=task_status)

            await nursery.start(run)
            stalled, ws = await stalled_subscriber(plane, hub, client_ssl)
            # The answer to a ping waits behind the writer's send: both are cut.
            ping = ws.send(wsproto.events.TextMessage(json.dumps({"type": "ping"})))
            await trio.to_thread.run_sync(stalled.sendall, ping)
            await wait_until(lambda: plane.statistics().clients[0].messages_in == 2)
            if close == "revoke":
                plane.reconfigure(attrs.evolve(section, clients=CLIENTS[1:]))
                await wait_until(lambda: plane.statistics().connections == 0)
                reason = "client 'hmi-1' was removed"
            else:
                reason = "the gateway is shutting down"
            scope.cancel()
    stalled.close()
    # Cut mid-frame: no close frame could follow.
    [line] = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert line.startswith(f"device hmi-1 disconnected (1006: {reason}")
    assert line.endswith("; a send was still waiting for the client to read)")
    assert line.count("a send was still waiting") == 1


async def test_a_client_that_pings_after_the_close_ends_only_its_own_connection(
    gateway: Callable[..., Any],
    connect: Callable[..., Any],
    client_ssl: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The attacker's close waits for an answer its failed reader cannot give, up to this.
    plane, _, _ = await gateway(shutdown_timeout=0.5)
    other = await connect(plane.port, SENSOR_TOKEN)
    await other.ping()

    def attack() -> None:
        """A binary frame (closed with 1003), then a ping after the gateway's close frame:
        trio-websocket 0.12 fails on it (python-trio/trio-websocket#184)."""
        tls, ws = raw_client(plane.port, client_ssl, HMI_TOKEN, [])
        tls.sendall(ws.send(wsproto.events.BytesMessage(b"binary")))
        while not any(isinstance(e, wsproto.events.CloseConnection) for e in ws.events()):
            ws.receive_data(tls.recv(65536))
        # wsproto's connection refuses to ping now; its frame layer still builds one.
        tls.sendall(wsproto.frame_protocol.FrameProtocol(client=True, extensions=[]).ping(b"x"))
        tls.sendall(ws.send(wsproto.events.CloseConnection(1003)))
        tls.close()

    await trio.to_thread.run_sync(attack)
    await wait_until(lambda: plane.statistics().connections == 1)
    # The server and the other client go on.
    await other.ping()
    assert plane.condition().state.value == "up"
    third = await connect(plane.port)
    await third.ping()
    # One line, as what it is, with the client's address.
    [line] = [r.getMessage() for r in caplog.records if "trio-websocket" in r.getMessage()]
    assert line.startswith("a device connection from 127.0.0.1:"), line
    assert "LocalProtocolError: " in line


async def test_a_defect_in_the_handler_is_reported_as_ours_and_ends_one_connection(
    gateway: Callable[..., Any],
    connect: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plane, _, _ = await gateway()

    async def broken(request: Any) -> None:
        raise RuntimeError("a bug")

    with monkeypatch.context() as patch:
        patch.setattr(plane, "_handshake", broken)
        with pytest.raises(websockets.exceptions.InvalidMessage):
            await connect(plane.port)
    hmi = await connect(plane.port)
    await hmi.ping()
    [record] = [r for r in caplog.records if "defect while handling" in r.getMessage()]
    assert record.levelname == "CRITICAL"
    assert "trio-websocket" not in caplog.text


async def test_repeated_snapshots_for_a_client_that_reads_nothing_do_not_pile_up(
    gateway: Callable[..., Any], client_ssl: ssl.SSLContext
) -> None:
    plane, hub, _ = await gateway()
    for i in range(5):
        hub.publish(Reading(f"line-1/boiler/p{i}", "x" * 60_000, timestamp=1.0))
    subscribe = json.dumps({"type": "subscribe", "topics": ["line-1/#"], "last": True})
    stalled, _ = await trio.to_thread.run_sync(
        raw_client, plane.port, client_ssl, HMI_TOKEN, [subscribe] * 50
    )
    await wait_until(lambda: plane.statistics().clients[0].messages_in == 50)
    [connection] = plane._connections
    # The writer waits on the full socket; what waits for it is one reading per topic.
    assert len(connection._snapshot) <= 5
    stalled.close()


async def test_a_cut_send_is_logged_with_its_reason_when_another_send_waited_behind_it(
    gateway: Callable[..., Any], client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.deviceplane")
    plane, hub, _ = await gateway(send_timeout=Duration(1.0))
    # The writer waits on the full socket...
    stalled, ws = await stalled_subscriber(plane, hub, client_ssl)
    # ... and the answer to a ping waits behind it, until send_timeout cuts the writer's send.
    ping = json.dumps({"type": "ping", "id": "behind"})
    await trio.to_thread.run_sync(stalled.sendall, ws.send(wsproto.events.TextMessage(ping)))
    await wait_until(lambda: plane.statistics().connections == 0)
    stalled.close()
    [line] = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert line.startswith("device hmi-1 disconnected (1006: a send took longer than 1s"), line


async def stalled_subscriber(
    plane: DevicePlane, hub: Hub, context: ssl.SSLContext
) -> tuple[ssl.SSLSocket, wsproto.WSConnection]:
    """hmi-1 subscribed to ``line-1/#``, reading nothing, its writer waiting on the full
    socket with readings piled up behind it."""
    subscribe = json.dumps({"type": "subscribe", "topics": ["line-1/#"]})
    stalled, ws = await trio.to_thread.run_sync(
        raw_client, plane.port, context, HMI_TOKEN, [subscribe]
    )
    await wait_until(lambda: bool(hub.statistics().subscriptions))
    while not plane.statistics().clients[0].queued:
        for _ in range(20):
            hub.publish(Reading("line-1/boiler/flow", "x" * 16_000, timestamp=1.0))
        await trio.testing.wait_all_tasks_blocked()
    return stalled, ws


def raw_client(
    port: int, context: ssl.SSLContext, token: str | None, messages: list[str]
) -> tuple[ssl.SSLSocket, wsproto.WSConnection]:
    """A client that sends ``messages`` and reads nothing (wsproto over a blocking socket)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    tls.sendall(
        ws.send(wsproto.events.Request(host="127.0.0.1", target="/", extra_headers=headers))
    )
    while not any(isinstance(e, wsproto.events.AcceptConnection) for e in ws.events()):
        ws.receive_data(tls.recv(65536))
    for message in messages:
        tls.sendall(ws.send(wsproto.events.TextMessage(message)))
    return tls, ws


def reader_tasks() -> list[trio.lowlevel.Task]:
    """trio-websocket's reader tasks, one per connection it still holds."""
    found = []

    def walk(task: trio.lowlevel.Task) -> None:
        if task.name.endswith("_reader_task"):
            found.append(task)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return found


async def test_closing_lets_go_of_a_reader_parked_on_its_full_queue(
    ca: trustme.CA, client_ssl: ssl.SSLContext, nursery: trio.Nursery
) -> None:
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ssl)
    reset, closed = trio.Event(), trio.Event()
    accepted: list[Any] = []

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        accepted.append(ws)
        await reset.wait()  # taking no message meanwhile
        await deviceplane.close_websocket(ws, deviceplane.POLICY_VIOLATION, "bye", wait=TIMEOUT)
        closed.set()

    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, server_ssl)

    messages = [f"message {i}" for i in range(10)]  # which nobody takes
    tls, _ = await trio.to_thread.run_sync(raw_client, server.port, client_ssl, None, messages)
    assert len(reader_tasks()) == 1
    # Until trio-websocket's reader is parked on its full queue (the handler takes nothing).
    await wait_until(lambda: accepted[0]._recv_channel.statistics().tasks_waiting_send == 1)
    # The connection is reset: the close frame cannot go out either.
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tls.close()
    reset.set()
    await closed.wait()
    await trio.testing.wait_all_tasks_blocked()
    assert reader_tasks() == []


async def test_slow_client_does_not_hold_back_others(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, hub, scope = await gateway(queue=50)
    slow = await connect(plane.port, max_queue=1)
    fast = await connect(plane.port)
    for client in (slow, fast):
        await client.send({"type": "subscribe", "topics": ["line-1/#"]})
        await client.ping()
    # The slow client reads nothing while 32 MB of readings (more than socket buffers and
    # its queue of 50 hold) are published; the fast one keeps receiving all of them.
    value = "x" * 16_000
    for batch in range(40):
        for i in range(50):
            hub.publish(Reading("line-1/boiler/flow", value, unit=str(i), timestamp=1.0))
        received = 0
        while received < 50:
            frame = await fast.receive()
            assert frame["type"] == "readings"
            received += len(frame["readings"])
        assert received == 50, batch
    stats = plane.statistics()
    assert max(c.queued for c in stats.clients) <= 50
    assert stats.dropped > 0
    # When the slow client reads, a gap tells it what it lost.
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["type"] != "gap":
        frames.append(await slow.receive())
    assert frames[-1]["dropped"] > 0
    # Both read on until the shutdown's close (a client that stops reading holds the close
    # up to the shutdown timeout).
    scope.cancel()
    assert await slow.close_code() == 1001
    assert await fast.close_code() == 1001


async def test_disconnect_policy_closes_slow_client_1013(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, hub, _ = await gateway(queue=5, overflow="disconnect")
    slow = await connect(plane.port, max_queue=1)
    await slow.send({"type": "subscribe", "topics": ["line-1/#"]})
    await slow.ping()
    value = "x" * 1000
    with trio.fail_after(TIMEOUT):
        # Until the hub drops the subscription that overflowed.
        while hub.statistics().subscribers:
            hub.publish(Reading("line-1/boiler/flow", value, timestamp=1.0))
            await trio.testing.wait_all_tasks_blocked()
    assert await slow.close_code() == 1013
    assert plane.statistics().dropped > 0


async def test_send_timeout_ends_a_stalled_connection(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, hub, _ = await gateway(send_timeout=Duration(0.2))
    stalled = await connect(plane.port, max_queue=1)
    other = await connect(plane.port)
    await stalled.send({"type": "subscribe", "topics": ["line-1/#"]})
    await stalled.ping()
    value = "x" * 16_000
    with trio.fail_after(TIMEOUT):
        # Until the stalled client's send blocks past the timeout and its handler ends.
        while plane.statistics().connections == 2:
            for _ in range(50):
                hub.publish(Reading("line-1/boiler/flow", value, timestamp=1.0))
            await trio.testing.wait_all_tasks_blocked()
    assert hub.statistics().subscribers == {}
    # Cut mid-frame: no close frame can follow a partial one, the TCP connection just ends.
    assert await stalled.close_code() == -1
    await other.ping()


async def test_max_errors_closes_1008_and_spares_others(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, _, _ = await gateway(max_errors=3)
    bad = await connect(plane.port)
    other = await connect(plane.port)
    # Invalid messages and ACL refusals both count.
    await bad.send("not json")
    await bad.send({"type": "frobnicate"})
    await bad.send({"type": "publish", "id": "p-1", "readings": [{"point": "door", "value": 1}]})
    codes = [(await bad.receive())["code"] for _ in range(3)]
    assert codes == ["bad-json", "unknown-type", "forbidden"]
    assert await bad.close_code() == 1008
    # One error short of the limit: the other client stays.
    await other.send("not json")
    await other.send("not json")
    assert [(await other.receive())["code"] for _ in range(2)] == ["bad-json", "bad-json"]
    await other.ping()
    await trio.testing.wait_all_tasks_blocked()
    assert plane.statistics().connections == 1


def test_token_bucket_starts_full_refills_and_caps() -> None:
    bucket = TokenBucket(rate=2.0, capacity=3.0, now=100.0)
    assert bucket.can_take(3, 100.0)
    bucket.take(3, 100.0)
    assert not bucket.can_take(1, 100.0)
    assert not bucket.can_take(1, 100.4)  # 0.8 tokens
    assert bucket.can_take(1, 100.5)
    bucket.take(1, 100.5)
    assert bucket.tokens(100.5) == 0.0
    # Idle for long: no more than the capacity.
    assert bucket.tokens(1000.0) == 3.0
    assert not bucket.can_take(4, 2000.0)
    # A clock going backwards neither adds nor removes tokens.
    bucket.take(2, 2000.0)
    assert bucket.tokens(1500.0) == 1.0
    assert bucket.tokens(2000.25) == 1.5


async def test_rate_limit_drops_messages_then_closes_1008(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    # Three messages at once, then one per 100 s: the test cannot be slow enough to refill.
    plane, hub, _ = await gateway(messages_per_second=0.01, burst=Duration(300.0), max_errors=2)
    sensor = await connect(plane.port, SENSOR_TOKEN)
    other = await connect(plane.port)
    sub = hub.subscribe("watcher", ["devices/#"])
    for i in range(4):
        await sensor.send({"type": "ping", "id": str(i)})
    await sensor.send({"type": "publish", "id": "p-1", "readings": [{"point": "t", "value": 1}]})
    frames = [await sensor.receive() for _ in range(5)]
    assert frames[:3] == [{"type": "pong", "id": str(i)} for i in range(3)]
    assert [f["code"] for f in frames[3:]] == ["rate-limited", "rate-limited"]
    # Persisting over the limit ends in 1008; the dropped publish was not taken.
    assert await sensor.close_code() == 1008
    with pytest.raises(trio.WouldBlock):
        sub.receive_nowait()
    # Buckets are per connection.
    await other.ping()


async def test_byte_rate_limit(gateway: Callable[..., Any], connect: Callable[..., Any]) -> None:
    # 1,200 bytes at once, then 4 per second; each ping is 154 bytes.
    plane, _, _ = await gateway(
        max_message_size=Size(1024), bytes_per_second=Size(4), burst=Duration(300.0)
    )
    hmi = await connect(plane.port)
    ping = {"type": "ping", "id": "x" * 128}
    assert len(json.dumps(ping)) == 154
    for _ in range(8):
        await hmi.send(ping)
    frames = [await hmi.receive() for _ in range(8)]
    assert [f["type"] for f in frames[:7]] == ["pong"] * 7
    assert frames[7]["code"] == "rate-limited"


def test_recent_ids_forget_the_oldest() -> None:
    recent = RecentIds(2)
    for id in ("a", "b", "a", "c"):  # "a" again makes it the newest
        recent.add(id)
    assert ("a" in recent, "b" in recent, "c" in recent, len(recent)) == (True, False, True, 2)


async def test_resent_publish_after_reconnect_is_acked_but_taken_once(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, hub, _ = await gateway()
    sub = hub.subscribe("watcher", ["devices/#"])
    publish = {"type": "publish", "id": "p-1", "readings": [{"point": "t", "value": 1}]}
    sensor = await connect(plane.port, SENSOR_TOKEN)
    await sensor.send(publish)
    assert await sensor.receive() == {"type": "ack", "id": "p-1"}
    await sensor.close()

    sensor = await connect(plane.port, SENSOR_TOKEN)
    await sensor.send(publish)
    assert await sensor.receive() == {"type": "ack", "id": "p-1"}
    # The same id from another client is its own publish.
    hmi = await connect(plane.port)
    await hmi.send({**publish, "readings": [{"point": "setpoint", "value": 2}]})
    assert await hmi.receive() == {"type": "ack", "id": "p-1"}

    delivery = sub.receive_nowait()
    assert [(r.topic, r.value) for r in delivery.readings] == [
        ("devices/sensor-7/t", 1),
        ("devices/hmi-1/setpoint", 2),
    ]
    with pytest.raises(trio.WouldBlock):
        sub.receive_nowait()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (server state with no event to wait on) until it holds."""
    with trio.fail_after(TIMEOUT):
        while not condition():
            await trio.sleep(0.01)


async def test_server_pings_keep_an_answering_client(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    # A generous timeout: a loaded machine must not make this client look silent.
    plane, _, _ = await gateway(ping_interval=Duration(0.05), ping_timeout=Duration(1.0))
    hmi = await connect(plane.port)
    # The websockets client answers pings in its background thread.
    await wait_until(lambda: plane.statistics().clients[0].pings >= 4)
    await hmi.ping()
    assert plane.statistics().connections == 1


async def test_client_that_does_not_answer_pings_is_closed_1011(
    gateway: Callable[..., Any], client_ssl: ssl.SSLContext
) -> None:
    # wsproto, unlike the websockets client, answers a ping only when told to: this client
    # reads every frame and never sends a pong.
    plane, hub, _ = await gateway(ping_interval=Duration(0.05), ping_timeout=Duration(0.1))
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", plane.port, ssl_context=client_ssl)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    request = wsproto.events.Request(
        host="127.0.0.1",
        target="/",
        extra_headers=[(b"authorization", f"Bearer {HMI_TOKEN}".encode())],
    )
    await stream.send_all(ws.send(request))
    events: list[wsproto.events.Event] = []

    async def read_until(kind: type[wsproto.events.Event]) -> None:
        while not any(isinstance(e, kind) for e in events):
            data = await stream.receive_some()
            assert data, "closed without a close frame"
            ws.receive_data(data)
            events.extend(ws.events())

    with trio.fail_after(TIMEOUT):
        await read_until(wsproto.events.AcceptConnection)
        subscribe = {"type": "subscribe", "topics": ["line-1/#"]}
        await stream.send_all(ws.send(wsproto.events.TextMessage(json.dumps(subscribe))))
        await wait_until(lambda: bool(hub.statistics().subscribers))
        await read_until(wsproto.events.CloseConnection)
    await stream.aclose()
    assert isinstance(events[0], wsproto.events.AcceptConnection)
    assert any(isinstance(e, wsproto.events.Ping) for e in events)
    close = events[-1]
    assert isinstance(close, wsproto.events.CloseConnection)
    assert close.code == 1011
    assert "no pong" in close.reason
    await wait_until(lambda: plane.statistics().connections == 0)
    assert hub.statistics().subscribers == {}


# ---- last values, reload, mTLS, local token ---------------------------------------------------


async def test_subscribe_with_last_sends_the_latest_readings_first(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, hub, _ = await gateway()
    hub.publish(Reading("line-1/boiler/flow", 1.0, timestamp=1.0))
    hub.publish(Reading("line-1/boiler/flow", 2.0, timestamp=2.0))
    hub.publish(Reading("line-1/pump/speed", 900, timestamp=2.0))
    hub.publish(Reading("line-2/pump/speed", 5, timestamp=2.0))
    hmi = await connect(plane.port)

    await hmi.send({"type": "subscribe", "topics": ["line-1/#"], "last": True})
    frame = await hmi.receive()
    assert [(r["topic"], r["value"]) for r in frame["readings"]] == [
        ("line-1/boiler/flow", 2.0),
        ("line-1/pump/speed", 900),
    ]
    hub.publish(Reading("line-1/boiler/flow", 3.0, timestamp=3.0))
    frame = await hmi.receive()
    assert [r["value"] for r in frame["readings"]] == [3.0]

    # Asked again for topics already subscribed: the snapshot still comes, nothing twice.
    await hmi.send({"type": "subscribe", "topics": ["line-1/boiler/flow"], "last": True})
    frame = await hmi.receive()
    assert [(r["topic"], r["value"]) for r in frame["readings"]] == [("line-1/boiler/flow", 3.0)]
    hub.publish(Reading("line-1/boiler/flow", 4.0, timestamp=4.0))
    frame = await hmi.receive()
    assert [r["value"] for r in frame["readings"]] == [4.0]
    await hmi.ping()

    stats = plane.statistics()
    assert stats.bytes_in > 0
    assert stats.bytes_out > 0
    assert stats.clients[0].bytes_out == stats.bytes_out


async def test_a_connection_holds_at_most_max_topics_patterns(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, hub, _ = await gateway()
    hub.publish(Reading("line-1/boiler/flow", 1.0, timestamp=1.0))
    hmi = await connect(plane.port)
    patterns = [f"line-1/dev-{i}/+" for i in range(MAX_TOPICS)]
    for start in range(0, MAX_TOPICS, 25):
        await hmi.send({"type": "subscribe", "topics": patterns[start : start + 25]})
    await hmi.ping()
    assert len(plane.statistics().clients[0].patterns) == MAX_TOPICS

    # One more, in a message well within the limit of one message, is one too many in all:
    # refused whole, with "last" too, and the connection stays as it was.
    await hmi.send({"type": "subscribe", "topics": ["line-1/#", patterns[0]], "last": True})
    error = await hmi.receive()
    assert (error["type"], error["code"]) == ("error", "too-large")
    assert error["message"].startswith(f"topics: {MAX_TOPICS + 1} patterns in all")
    await hmi.ping()  # no snapshot came either
    assert plane.statistics().clients[0].patterns == tuple(patterns)

    # Patterns already held do not count twice; one freed makes room for another.
    await hmi.send({"type": "subscribe", "topics": patterns[:10]})
    await hmi.send({"type": "unsubscribe", "topics": [patterns[0]]})
    await hmi.send({"type": "subscribe", "topics": ["line-1/#"], "last": True})
    frame = await hmi.receive()
    assert [r["topic"] for r in frame["readings"]] == ["line-1/boiler/flow"]
    assert len(plane.statistics().clients[0].patterns) == MAX_TOPICS


async def test_reload_revokes_removed_clients_and_keeps_the_others(
    gateway: Callable[..., Any], connect: Callable[..., Any], section: DevicePlaneSection
) -> None:
    plane, hub, _ = await gateway()
    hmi = await connect(plane.port)
    sensor = await connect(plane.port, SENSOR_TOKEN)
    await hmi.send({"type": "subscribe", "topics": ["line-1/#"]})
    await hmi.ping()

    plane.reconfigure(attrs.evolve(section, clients=CLIENTS[:1]))
    assert await sensor.close_code() == 1008
    # The hmi keeps its connection and its subscription.
    hub.publish(Reading("line-1/boiler/flow", 1.0, timestamp=1.0))
    assert (await hmi.receive())["type"] == "readings"
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        await connect(plane.port, SENSOR_TOKEN)
    assert info.value.response.status_code == 401
    assert plane.statistics().revoked == 1


async def test_reload_that_narrows_an_acl_closes_subscriptions_outside_it(
    gateway: Callable[..., Any], connect: Callable[..., Any], section: DevicePlaneSection
) -> None:
    plane, _, _ = await gateway()
    hmi = await connect(plane.port)
    sensor = await connect(plane.port, SENSOR_TOKEN)
    await hmi.send({"type": "subscribe", "topics": ["line-1/#"]})
    await hmi.ping()

    narrower = attrs.evolve(CLIENTS[0], subscribe=("line-1/boiler/#",), publish=("door",))
    plane.reconfigure(attrs.evolve(section, clients=(narrower, CLIENTS[1])))
    assert await hmi.close_code() == 1008
    # The sensor's ACL did not change: it stays, and a new ACL applies to new connections.
    await sensor.ping()
    hmi = await connect(plane.port)
    await hmi.send({"type": "publish", "id": "p-1", "readings": [{"point": "door", "value": 1}]})
    assert await hmi.receive() == {"type": "ack", "id": "p-1"}


async def test_reload_reads_the_certificate_again_without_dropping_connections(
    gateway: Callable[..., Any],
    connect: Callable[..., Any],
    section: DevicePlaneSection,
    ca: trustme.CA,
) -> None:
    plane, _, _ = await gateway()
    hmi = await connect(plane.port)
    assert section.tls_cert_file is not None
    assert section.tls_key_file is not None
    before = await _server_certificate(plane.port)

    rotated = ca.issue_cert("127.0.0.1")
    rotated.cert_chain_pems[0].write_to_path(str(section.tls_cert_file.source))
    rotated.private_key_pem.write_to_path(str(section.tls_key_file.source))
    plane.reconfigure(section)

    after = await _server_certificate(plane.port)
    assert after != before
    assert after == ssl.PEM_cert_to_DER_cert(rotated.cert_chain_pems[0].bytes().decode())
    await hmi.ping()  # still connected
    await (await connect(plane.port)).ping()


async def test_reload_with_a_broken_key_keeps_the_previous_certificate(
    gateway: Callable[..., Any],
    connect: Callable[..., Any],
    section: DevicePlaneSection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    plane, _, _ = await gateway()
    before = await _server_certificate(plane.port)
    assert section.tls_key_file is not None
    section.tls_key_file.source.write_text("not a key")
    plane.reconfigure(section)
    assert "cannot load the certificate and key again" in caplog.text
    assert await _server_certificate(plane.port) == before
    await (await connect(plane.port)).ping()


async def _server_certificate(port: int) -> bytes:
    """The DER certificate the server presents to a new connection."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    await stream.do_handshake()
    der = stream.getpeercert(binary_form=True)
    await trio.aclose_forcefully(stream)
    assert der is not None
    return der


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    gateway: Callable[..., Any],
    client_ssl: ssl.SSLContext,
    ca: trustme.CA,
    tmp_path: Path,
) -> None:
    ca_file = tmp_path / "devices-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    # trio-websocket keeps a connection whose TLS handshake failed until handshake_timeout
    # (its reader fails, but nothing wakes the wait for the HTTP request), so the client
    # waits for that long: keep it short.
    plane, _, _ = await gateway(
        client_ca_file=Secret(ca_file, ca_file.read_text()), handshake_timeout=Duration(0.5)
    )

    def connect(context: ssl.SSLContext) -> None:
        with websockets.sync.client.connect(
            f"wss://127.0.0.1:{plane.port}/",
            ssl=context,
            additional_headers={"Authorization": f"Bearer {HMI_TOKEN}"},
            open_timeout=TIMEOUT,
        ) as ws:
            ws.send(json.dumps({"type": "ping", "id": "1"}))
            assert json.loads(ws.recv(timeout=TIMEOUT)) == {"type": "pong", "id": "1"}

    # Without a client certificate the TLS handshake fails (the alert may arrive as a
    # reset or an EOF, depending on timing, so only "it failed" is asserted).
    with pytest.raises((ssl.SSLError, OSError, websockets.exceptions.WebSocketException)):
        await trio.to_thread.run_sync(connect, client_ssl)
    # A certificate from another CA fails too.
    stranger = trustme.CA().issue_cert("sensor-7")
    with_stranger = ssl.create_default_context()
    ca.configure_trust(with_stranger)
    stranger.configure_cert(with_stranger)
    with pytest.raises((ssl.SSLError, OSError, websockets.exceptions.WebSocketException)):
        await trio.to_thread.run_sync(connect, with_stranger)
    # One the CA issued works.
    ca.issue_cert("hmi-1").configure_cert(client_ssl)
    await trio.to_thread.run_sync(connect, client_ssl)


async def test_the_local_token_is_accepted_only_from_this_machine(
    gateway: Callable[..., Any], connect: Callable[..., Any], section: DevicePlaneSection
) -> None:
    plane, hub, _ = await gateway()
    assert plane.local_token is not None
    local = await connect(plane.port, plane.local_token)
    await local.send({"type": "subscribe", "topics": ["#"], "last": False})
    await local.ping()
    hub.publish(Reading("line-9/x/y", 1, timestamp=1.0))
    assert (await local.receive())["readings"][0]["topic"] == "line-9/x/y"
    assert {c.client_id for c in plane.statistics().clients} == {"local"}

    # The same token from elsewhere is refused (the decision itself, since every test peer
    # is on loopback).
    authenticator = plane._authenticator
    headers = {"authorization": f"Bearer {plane.local_token}"}
    refusal = authenticator.authenticate(headers, {}, (), local_peer=False)
    assert refusal == Refusal(401, "the local token (header) is accepted only from this machine")
    # A reload keeps the local token valid; without local_access there is none.
    plane.reconfigure(section)
    await local.ping()
    plane_without, _, _ = await gateway(local_access=False)
    assert plane_without.local_token is None
    with pytest.raises(websockets.exceptions.InvalidStatus):
        await connect(plane_without.port, plane.local_token)


async def test_readings_that_come_within_frame_interval_share_the_next_frame(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, hub, _ = await gateway(frame_interval=Duration(1.0))
    hmi = await connect(plane.port)
    await hmi.send({"type": "subscribe", "topics": ["line-1/#"]})
    await hmi.ping()
    hub.publish(Reading("line-1/a/x", 1, timestamp=1.0))
    # The first reading goes at once; the writer then waits out the interval, and what
    # comes meanwhile is sent together, even when it came in separate deliveries (the
    # ping's round trip lets the writer take reading 2 on its own if it were not waiting).
    assert [r["value"] for r in (await hmi.receive())["readings"]] == [1]
    hub.publish(Reading("line-1/a/x", 2, timestamp=2.0))
    await hmi.ping()
    hub.publish(Reading("line-1/a/y", 3, timestamp=3.0))
    assert [r["value"] for r in (await hmi.receive())["readings"]] == [2, 3]


async def test_a_defect_serving_one_client_closes_only_that_connection(
    gateway: Callable[..., Any],
    connect: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    plane, hub, _ = await gateway()
    bystander = await connect(plane.port)
    await bystander.send({"type": "subscribe", "topics": ["line-1/#"]})
    await bystander.ping()
    original = deviceplane.parse_client_message

    def parse(data: str, *, now: float) -> Any:
        if "boom" in data:
            raise RuntimeError("a defect")
        return original(data, now=now)

    monkeypatch.setattr(deviceplane, "parse_client_message", parse)
    victim = await connect(plane.port, SENSOR_TOKEN)
    await victim.send({"type": "ping", "id": "boom"})
    assert await victim.close_code() == 1011
    assert "device sensor-7: defect while serving it" in caplog.text
    # The server and the other client carry on.
    assert plane.condition().state.value == "up"
    hub.publish(Reading("line-1/boiler/flow", 1.0, timestamp=1.0))
    assert (await bystander.receive())["type"] == "readings"


async def test_two_tokens_in_the_query_string_are_refused(
    gateway: Callable[..., Any], client_ssl: ssl.SSLContext
) -> None:
    plane, _, _ = await gateway()

    def connect() -> None:
        url = f"wss://127.0.0.1:{plane.port}/?token=wrong-0123456789abcdefghij&token={HMI_TOKEN}"
        with websockets.sync.client.connect(url, ssl=client_ssl, open_timeout=TIMEOUT):
            pass

    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        await trio.to_thread.run_sync(connect)
    assert info.value.response.status_code == 401


def test_close_reasons_are_cut_at_a_word_to_fit_a_close_frame() -> None:
    reason = "client 'hmi-1' may no longer subscribe to all of line-1/#, line-2/# after a " + (
        "reload: reconnect and subscribe within its new patterns"
    )
    fitted = deviceplane._fit(reason)
    assert len(fitted.encode()) <= 123
    assert fitted.endswith(" reconnect and subscribe within its...")
    assert deviceplane._fit("short") == "short"


async def test_with_an_outbox_a_publish_is_acknowledged_once_committed(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, hub, _ = await gateway()
    watermark = Watermark(hub.published)
    plane.watermark = lambda: watermark
    sensor = await connect(plane.port, SENSOR_TOKEN)
    watcher = hub.subscribe("watcher", ["devices/#"])

    one = {"point": "temperature", "value": 21.5}
    await sensor.send({"type": "publish", "id": "p-1", "readings": [one, one]})
    assert len((await watcher.receive()).readings) == 2  # the hub took them...

    def no_frame_yet() -> None:
        with pytest.raises(TimeoutError):
            sensor.ws.recv(timeout=0.3)

    await trio.to_thread.run_sync(no_frame_yet)  # ...but they are not committed yet
    watermark.advance(2)
    assert await sensor.receive() == {"type": "ack", "id": "p-1"}

    # Not stored (a full outbox): an error, and the same id is taken again on a resend.
    await sensor.send({"type": "publish", "id": "p-2", "readings": [one]})
    await watcher.receive()
    watermark.advance(1, stored=False)
    error = await sensor.receive()
    assert (error["type"], error["code"], error["ref"]) == ("error", "not-stored", "p-2")
    await sensor.send({"type": "publish", "id": "p-2", "readings": [one]})
    assert len((await watcher.receive()).readings) == 1
    watermark.advance(1)
    assert await sensor.receive() == {"type": "ack", "id": "p-2"}


async def test_a_resent_publish_gets_the_answer_the_original_gets(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, hub, _ = await gateway()
    watermark = Watermark(hub.published)
    plane.watermark = lambda: watermark
    watcher = hub.subscribe("watcher", ["devices/#"])
    publish = {"type": "publish", "id": "p-1", "readings": [{"point": "t", "value": 1}]}
    first = await connect(plane.port, SENSOR_TOKEN)
    await first.send(publish)
    assert len((await watcher.receive()).readings) == 1
    # Resent, on the same connection and on another one, before the outbox answered: not
    # taken again, and not acknowledged either while the original is not committed.
    await first.send(publish)
    second = await connect(plane.port, SENSOR_TOKEN)
    await second.send(publish)
    await wait_until(lambda: plane.messages_in == 3)
    await trio.testing.wait_all_tasks_blocked(0.1)
    with pytest.raises(trio.WouldBlock):
        watcher.receive_nowait()

    watermark.advance(1, stored=False)  # the outbox refused it: so is every resend
    for client in (first, first, second):
        error = await client.receive()
        assert (error["type"], error["code"], error["ref"]) == ("error", "not-stored", "p-1")

    # The next resend is taken again; once committed, it and its duplicates are acknowledged.
    await second.send(publish)
    assert len((await watcher.receive()).readings) == 1
    await first.send(publish)
    watermark.advance(1)
    assert await second.receive() == {"type": "ack", "id": "p-1"}
    assert await first.receive() == {"type": "ack", "id": "p-1"}
    await second.send(publish)
    assert await second.receive() == {"type": "ack", "id": "p-1"}
    with pytest.raises(trio.WouldBlock):
        watcher.receive_nowait()


def test_recent_ids_forget_an_id_only_while_it_waits_for_the_same_publish() -> None:
    recent = RecentIds(4)
    watermark = Watermark(0)
    refused = deviceplane._AckWhenStored("p-1", 0, 1, watermark)
    again = deviceplane._AckWhenStored("p-1", 1, 2, watermark)
    recent.add("p-1", refused)
    assert recent.get("p-1") is refused
    recent.discard("p-1", refused)
    assert "p-1" not in recent
    recent.add("p-1", again)  # taken again meanwhile: a late answer to the old one keeps it
    recent.discard("p-1", refused)
    assert recent.get("p-1") is again
    recent.discard("p-1")
    assert "p-1" not in recent
