"""The device plane over real TLS (trustme) on loopback, with the ``websockets`` library's sync
client (run in a thread) as the independent peer."""

from __future__ import annotations

import contextlib
import json
import ssl
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

from gateway.core.configtypes import Duration, Name, Secret
from gateway.core.reading import Reading
from gateway.deviceauth import DeviceClient, DevicePlaneSection, hash_token
from gateway.deviceplane import DevicePlane
from gateway.hub import Hub

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


@pytest.fixture
def section(ca: trustme.CA, tmp_path: Path) -> DevicePlaneSection:
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return DevicePlaneSection(
        listen="127.0.0.1",
        port=0,
        tls_cert_file=Secret(cert_file, cert_file.read_text()),
        tls_key_file=Secret(key_file, key_file.read_text()),
        clients=CLIENTS,
        send_timeout=Duration(5.0),
    )


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

        async def start(**changes: Any) -> tuple[DevicePlane, Hub, trio.CancelScope]:
            hub = Hub()
            plane = DevicePlane(attrs.evolve(section, **changes), hub, shutdown_timeout=5.0)
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
