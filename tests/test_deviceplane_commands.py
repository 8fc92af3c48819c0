"""The device plane's side of commands and the status page's viewer tokens, over real TLS
(trustme) on loopback, with the ``websockets`` library's sync client (in a thread) as the device.

The command router is a recording ``CommandSink`` here: what the device plane tells it, and
what it answers, is the whole contract (``gateway.core.commands``)."""

from __future__ import annotations

import socket
import textwrap
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import websockets.exceptions
import websockets.sync.client

from gateway.config import ConfigError, parse_config
from gateway.core.commands import CommandRequest, DeviceTarget, Json
from gateway.core.configtypes import Duration
from gateway.core.reading import Reading
from gateway.deviceauth import SUBPROTOCOL, DevicePlaneSection, hash_token
from gateway.deviceplane import COMMAND_BYTES_QUEUED, DevicePlane
from gateway.hub import Hub
from tests.test_deviceplane import (  # the fixtures too: one server setup for both modules
    HMI_TOKEN,
    SENSOR_TOKEN,
    TIMEOUT,
    ca,
    client_ssl,
    connect,
    section,
)

__all__ = ["ca", "client_ssl", "connect", "section"]  # pytest fixtures used by name

PAGE = "https://gateway.plant.local:9443"
"""The status page's origin (the API's own)."""

EXPIRES = datetime(2026, 11, 27, 22, 0, tzinfo=UTC).timestamp()


def request(
    id: str = "cpi-4712",
    client_id: str = "hmi-1",
    name: str = "show-message",
    args: dict[str, Json] | None = None,
) -> CommandRequest:
    return CommandRequest(
        id=id,
        target=DeviceTarget(client_id),
        name=name,
        args={"text": "hi"} if args is None else args,
        value=None,
        timeout=5.0,
        expires=EXPIRES,
    )


class RecordingSink:
    """A ``CommandSink`` that records every call; an ack is taken when its command id is in
    ``waiting`` for that client (and then no longer)."""

    def __init__(self) -> None:
        self.connected: list[str] = []
        self.acks: list[tuple[str, str, bool, Json, str | None]] = []
        self.waiting: set[tuple[str, str]] = set()
        self._changed = trio.Event()

    def device_connected(self, client_id: str) -> None:
        self.connected.append(client_id)
        self._changed.set()
        self._changed = trio.Event()

    def device_acked(
        self, client_id: str, command_id: str, ok: bool, result: Json, error: str | None
    ) -> bool:
        self.acks.append((client_id, command_id, ok, result, error))
        if (client_id, command_id) in self.waiting:
            self.waiting.discard((client_id, command_id))
            return True
        return False

    async def wait_connected(self, count: int) -> None:
        with trio.fail_after(TIMEOUT):
            while len(self.connected) < count:
                await self._changed.wait()


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
async def gateway(
    section: DevicePlaneSection, sink: RecordingSink
) -> AsyncIterator[Callable[..., Any]]:
    """Start a device plane that tells ``sink`` (unless ``sink=None``); yields
    ``start(sink=..., **section changes) -> (plane, hub)``."""
    async with trio.open_nursery() as nursery:

        async def start(
            with_sink: RecordingSink | None = sink, **changes: Any
        ) -> tuple[DevicePlane, Hub]:
            hub = Hub()
            plane = DevicePlane(
                attrs.evolve(section, **changes),
                hub,
                shutdown_timeout=5.0,
                commands=lambda: with_sink,
            )
            await nursery.start(plane.run)
            return plane, hub

        yield start
        nursery.cancel_scope.cancel()


async def status_of(connect: Callable[..., Any], port: int, **kwargs: Any) -> int:
    """The HTTP status a refused handshake got."""
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        await connect(port, None, **kwargs)
    status: int = info.value.response.status_code
    return status


# ---- commands ------------------------------------------------------------------------------


async def test_a_command_reaches_the_device_and_its_acks_reach_the_router(
    gateway: Callable[..., Any], connect: Callable[..., Any], sink: RecordingSink
) -> None:
    plane, _ = await gateway()
    assert plane.known("hmi-1")
    assert plane.known("sensor-7")  # configured, not connected
    for other in ("nobody", "local", "status-page"):
        assert not plane.known(other), other
    assert not plane.connected("hmi-1")

    hmi = await connect(plane.port)
    await sink.wait_connected(1)
    assert sink.connected == ["hmi-1"]
    assert plane.connected("hmi-1")
    assert not plane.connected("sensor-7")

    assert await plane.send_command("hmi-1", request()) is True
    assert await hmi.receive() == {
        "type": "command",
        "command_id": "cpi-4712",
        "name": "show-message",
        "args": {"text": "hi"},
        "expires": "2026-11-27T22:00:00.000Z",
    }
    sink.waiting |= {("hmi-1", "cpi-4712"), ("hmi-1", "cpi-4713")}
    await hmi.send(
        {"type": "ack", "command_id": "cpi-4712", "ok": True, "result": {"shown": [1, "a"]}}
    )
    await hmi.send({"type": "ack", "command_id": "cpi-4713", "ok": False, "error": "no display"})
    await hmi.ping()  # the acks were handled before the ping, and answered by nothing
    assert sink.acks == [
        ("hmi-1", "cpi-4712", True, {"shown": [1, "a"]}, None),
        ("hmi-1", "cpi-4713", False, None, "no display"),
    ]
    stats = plane.statistics()
    assert (stats.commands_sent, stats.acks_unmatched) == (1, 0)


async def test_acks_of_a_backlog_do_not_count_towards_the_rate_limit(
    gateway: Callable[..., Any], connect: Callable[..., Any], sink: RecordingSink
) -> None:
    # 4 messages at once, then one every 2 s: 40 acks would be refused after the fourth.
    plane, _ = await gateway(messages_per_second=0.5, burst=Duration(8.0), max_errors=3)
    hmi = await connect(plane.port)
    await sink.wait_connected(1)
    ids = [f"cpi-{i}" for i in range(40)]
    for command_id in ids:
        assert await plane.send_command("hmi-1", attrs.evolve(request(), id=command_id))
        sink.waiting.add(("hmi-1", command_id))
    for command_id in ids:
        assert (await hmi.receive())["command_id"] == command_id
    # The device used its burst on messages of its own first.
    for i in range(4):
        await hmi.send({"type": "ping", "id": str(i)})
    assert [(await hmi.receive())["type"] for _ in range(4)] == ["pong"] * 4
    for command_id in ids:
        await hmi.send({"type": "ack", "command_id": command_id, "ok": True})
    # Unmatched acks still count, and the bucket is empty.
    await hmi.send({"type": "ack", "command_id": "never-sent", "ok": True})
    assert (await hmi.receive())["code"] == "rate-limited"
    assert [a[1] for a in sink.acks[:40]] == ids
    assert not sink.waiting


async def test_an_unmatched_ack_gets_an_error_and_the_connection_stays(
    gateway: Callable[..., Any], connect: Callable[..., Any], sink: RecordingSink
) -> None:
    plane, _ = await gateway(max_errors=2)
    hmi = await connect(plane.port)
    # More unmatched acks than max_errors: they do not count towards closing the connection.
    for _ in range(3):
        await hmi.send({"type": "ack", "command_id": "nope-1", "ok": True})
        error = await hmi.receive()
        assert (error["type"], error["code"], error["ref"]) == (
            "error",
            "unknown-command",
            "nope-1",
        )
    assert error["message"] == (
        "command_id: 'nope-1' is not a command of client 'hmi-1' waiting for an ack (never sent "
        "to it, already answered, or expired): nothing was recorded; ack only command ids you "
        "received, once each"
    )
    await hmi.ping()
    assert sink.acks == [("hmi-1", "nope-1", True, None, None)] * 3
    assert plane.statistics().acks_unmatched == 3
    # Another client's command is not this client's to answer.
    sink.waiting.add(("sensor-7", "c-1"))
    await hmi.send({"type": "ack", "command_id": "c-1", "ok": True})
    assert (await hmi.receive())["code"] == "unknown-command"
    assert ("sensor-7", "c-1") in sink.waiting


async def test_without_a_router_every_ack_is_unmatched(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, _ = await gateway(with_sink=None)
    sensor = await connect(plane.port, SENSOR_TOKEN)
    await sensor.send({"type": "ack", "command_id": "c-9", "ok": False, "error": "why"})
    error = await sensor.receive()
    assert (error["code"], error["ref"]) == ("unknown-command", "c-9")
    await sensor.ping()


async def test_every_connection_of_the_client_gets_the_command(
    gateway: Callable[..., Any], connect: Callable[..., Any], sink: RecordingSink
) -> None:
    plane, _ = await gateway()
    first = await connect(plane.port)
    second = await connect(plane.port, subprotocols=[SUBPROTOCOL])
    sensor = await connect(plane.port, SENSOR_TOKEN)
    await sink.wait_connected(3)
    assert sorted(sink.connected) == ["hmi-1", "hmi-1", "sensor-7"]

    assert await plane.send_command("hmi-1", request(args={})) is True
    for hmi in (first, second):
        frame = await hmi.receive()
        assert (frame["type"], frame["command_id"], frame["args"]) == ("command", "cpi-4712", {})
    await sensor.ping()  # nothing for the sensor came before its pong
    assert plane.statistics().commands_sent == 2


async def test_a_command_for_a_client_that_is_not_connected_is_not_taken(
    gateway: Callable[..., Any], connect: Callable[..., Any], sink: RecordingSink
) -> None:
    plane, _ = await gateway()
    assert await plane.send_command("sensor-7", request(client_id="sensor-7")) is False
    assert await plane.send_command("nobody", request(client_id="nobody")) is False

    hmi = await connect(plane.port)
    await sink.wait_connected(1)
    await hmi.close()
    await trio.testing.wait_all_tasks_blocked()
    assert not plane.connected("hmi-1")
    assert await plane.send_command("hmi-1", request()) is False
    assert plane.statistics().commands_sent == 0


async def test_no_command_reaches_a_reserved_client(
    gateway: Callable[..., Any], connect: Callable[..., Any], sink: RecordingSink
) -> None:
    plane, _ = await gateway()
    assert plane.local_token is not None
    local = await connect(plane.port, plane.local_token)
    await local.ping()
    assert not plane.connected("local")
    assert await plane.send_command("local", request(client_id="local")) is False
    assert sink.connected == []  # nothing to deliver to it, ever
    await local.ping()  # and nothing was sent


async def test_a_client_that_stops_reading_holds_up_only_its_own_commands(
    gateway: Callable[..., Any], connect: Callable[..., Any], sink: RecordingSink
) -> None:
    send_timeout = 1.0
    plane, _ = await gateway(send_timeout=Duration(send_timeout))
    stalled = await connect(plane.port, max_queue=1)  # reads nothing more once one frame waits
    sensor = await connect(plane.port, SENSOR_TOKEN)
    await sink.wait_connected(2)
    big: dict[str, Json] = {"text": "x" * 60_000}
    sent = 0
    delivered = trio.Event()

    async def deliver() -> None:
        """The router's delivery task for hmi-1: the only one that waits for it."""
        nonlocal sent
        while await plane.send_command("hmi-1", request(f"c-{sent}", args=big)):
            sent += 1
            assert sent < 2000, "the stalled client was never closed"
        delivered.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver)
            # Socket buffers and COMMAND_BYTES_QUEUED full: send_command waits for room.
            await trio.testing.wait_all_tasks_blocked(0.2)
            assert not delivered.is_set()
            assert sent >= COMMAND_BYTES_QUEUED // 61_000
            # The others are served meanwhile.
            assert await plane.send_command("sensor-7", request("s-1", client_id="sensor-7"))
            assert (await sensor.receive())["command_id"] == "s-1"
            await sensor.ping()
            started = trio.current_time()
            await delivered.wait()
            # No room within send_timeout: the stalled client is closed, the wait ends.
            assert trio.current_time() - started < send_timeout + 1.0
    assert not plane.connected("hmi-1")
    # A send of its own was cut off by send_timeout first: no close frame could follow it.
    assert await stalled.close_code() == -1


async def test_a_backlog_larger_than_the_command_budget_reaches_a_client_that_reads(
    gateway: Callable[..., Any], connect: Callable[..., Any], sink: RecordingSink
) -> None:
    # A device reconnecting to 100 pending commands of 16 kB (over COMMAND_BYTES_QUEUED in
    # all) on a slow link gets them all, at its pace, rather than 1013 at every reconnect.
    plane, _ = await gateway()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16_384)  # a slow link, modelled
    sock.settimeout(TIMEOUT)
    await trio.to_thread.run_sync(sock.connect, ("127.0.0.1", plane.port))
    device = await connect(plane.port, sock=sock, max_queue=1)
    await sink.wait_connected(1)
    count = 100
    assert count * 16_000 > COMMAND_BYTES_QUEUED
    taken = 0

    async def deliver() -> None:
        nonlocal taken
        for i in range(count):
            taken += await plane.send_command("hmi-1", request(f"c-{i}", args={"t": "x" * 16_000}))

    with trio.fail_after(4 * TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(deliver)
            for i in range(count):
                frame = await device.receive()
                assert (frame["type"], frame["command_id"]) == ("command", f"c-{i}")
                await trio.sleep(0.002)  # a device that does something with each
    assert taken == count
    assert plane.connected("hmi-1")
    await device.ping()


# ---- viewer tokens ---------------------------------------------------------------------------


async def test_a_viewer_token_subscribes_from_its_page_and_publishes_nothing(
    gateway: Callable[..., Any], connect: Callable[..., Any], sink: RecordingSink
) -> None:
    plane, hub = await gateway()
    token = plane.viewer_token(PAGE)
    # As the page's JavaScript does: new WebSocket(url, ["edge-gateway.v1", "bearer." + token])
    viewer = await connect(
        plane.port, None, origin=PAGE, subprotocols=[SUBPROTOCOL, f"bearer.{token}"]
    )
    assert viewer.ws.subprotocol == SUBPROTOCOL
    await viewer.send({"type": "subscribe", "topics": ["#"]})
    await viewer.ping()
    assert [(c.client_id, c.patterns) for c in plane.statistics().clients] == [
        ("status-page", ("#",))
    ]
    hub.publish(Reading("line-1/boiler/flow", 3.5, unit="m3/h", timestamp=1.0))
    hub.publish(Reading("devices/hmi-1/setpoint", 21, timestamp=1.0))
    topics: list[str] = []
    while len(topics) < 2:
        frame = await viewer.receive()
        assert frame["type"] == "readings"
        topics += [r["topic"] for r in frame["readings"]]
    assert topics == ["line-1/boiler/flow", "devices/hmi-1/setpoint"]

    await viewer.send({"type": "publish", "id": "p-1", "readings": [{"point": "x", "value": 1}]})
    error = await viewer.receive()
    assert (error["type"], error["code"], error["ref"]) == ("error", "forbidden", "p-1")
    # It is no command target, and the router never hears of it.
    assert not plane.known("status-page")
    assert not plane.connected("status-page")
    assert sink.connected == []
    # The token opens more than one connection within its time (the page reconnecting).
    again = await connect(
        plane.port, None, origin=PAGE.upper(), subprotocols=[SUBPROTOCOL, f"bearer.{token}"]
    )
    await again.ping()


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("https://evil.example", 403),
        ("https://gateway.plant.local:8443", 403),  # another port, another origin
        (None, 403),  # a token issued for a page is for that page only
    ],
)
async def test_a_viewer_token_from_another_origin_is_refused(
    gateway: Callable[..., Any], connect: Callable[..., Any], origin: str | None, status: int
) -> None:
    plane, _ = await gateway()
    token = plane.viewer_token(PAGE)
    offer = [SUBPROTOCOL, f"bearer.{token}"]
    assert await status_of(connect, plane.port, origin=origin, subprotocols=offer) == status
    assert plane.statistics().refused == 1


async def test_the_page_origin_admits_no_other_token(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    # PAGE is not in device_plane.origins: a viewer token for it lets the viewer in, not a
    # device token used from a page there.
    plane, _ = await gateway()
    plane.viewer_token(PAGE)
    offer = [SUBPROTOCOL, f"bearer.{HMI_TOKEN}"]
    assert await status_of(connect, plane.port, origin=PAGE, subprotocols=offer) == 403
    offer = [SUBPROTOCOL, "bearer.not-a-token-0123456789abcdefghijklmn"]
    assert await status_of(connect, plane.port, origin=PAGE, subprotocols=offer) == 401


async def test_a_viewer_token_without_origin_follows_the_origin_list(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, _ = await gateway(origins=("https://hmi.plant.local",))
    token = plane.viewer_token(None)
    offer = [SUBPROTOCOL, f"bearer.{token}"]
    assert await status_of(connect, plane.port, origin=PAGE, subprotocols=offer) == 403
    listed = await connect(plane.port, None, origin="https://hmi.plant.local", subprotocols=offer)
    await listed.ping()
    headerless = await connect(plane.port, token)  # no Origin: not a browser
    await headerless.ping()


async def test_a_viewer_token_expires_but_its_connections_stay(
    gateway: Callable[..., Any],
    connect: Callable[..., Any],
    mock_clock: trio.testing.MockClock,
    section: DevicePlaneSection,
) -> None:
    # The mock clock stands still unless jumped: no timer in the server fires by itself
    # (frame_interval 0, so no writer waits on it either).
    plane, hub = await gateway(frame_interval=Duration(0))
    token = plane.viewer_token(PAGE, ttl=60.0)
    offer = [SUBPROTOCOL, f"bearer.{token}"]
    viewer = await connect(plane.port, None, origin=PAGE, subprotocols=offer)
    await viewer.send({"type": "subscribe", "topics": ["line-1/#"]})
    await viewer.ping()

    mock_clock.jump(59.9)
    await (await connect(plane.port, None, origin=PAGE, subprotocols=offer)).ping()
    mock_clock.jump(0.1)
    assert await status_of(connect, plane.port, origin=PAGE, subprotocols=offer) == 401
    # A fresh token works; the first connection is still open and subscribed, also after a
    # reload (which rebuilds the authenticator and refreshes every identity).
    fresh = plane.viewer_token(PAGE)
    await (
        await connect(plane.port, None, origin=PAGE, subprotocols=[SUBPROTOCOL, f"bearer.{fresh}"])
    ).ping()
    plane.reconfigure(section)
    await viewer.ping()
    hub.publish(Reading("line-1/boiler/flow", 1.0, timestamp=1.0))
    assert (await viewer.receive())["readings"][0]["value"] == 1.0
    # The reload kept the tokens too.
    await (
        await connect(plane.port, None, origin=PAGE, subprotocols=[SUBPROTOCOL, f"bearer.{fresh}"])
    ).ping()
    assert plane.statistics().revoked == 0


async def test_removing_an_api_user_revokes_its_viewer_tokens_and_connections(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, _ = await gateway()
    alice = plane.viewer_token(PAGE, owner="alice")
    bob = plane.viewer_token(PAGE, owner="bob")
    seen_by_alice = await connect(
        plane.port, None, origin=PAGE, subprotocols=[SUBPROTOCOL, f"bearer.{alice}"]
    )
    seen_by_bob = await connect(
        plane.port, None, origin=PAGE, subprotocols=[SUBPROTOCOL, f"bearer.{bob}"]
    )
    await seen_by_alice.ping()
    plane.revoke_viewers({"bob"})  # a reload removed alice
    assert await seen_by_alice.close_code() == 1008
    await seen_by_bob.ping()
    offer = [SUBPROTOCOL, f"bearer.{alice}"]
    assert await status_of(connect, plane.port, origin=PAGE, subprotocols=offer) == 401
    assert plane.statistics().revoked == 1


async def test_only_the_newest_viewer_tokens_are_kept(
    gateway: Callable[..., Any], connect: Callable[..., Any]
) -> None:
    plane, _ = await gateway()
    oldest = plane.viewer_token(PAGE)
    second = plane.viewer_token(PAGE)
    for _ in range(99):
        plane.viewer_token(PAGE)
    offer = [SUBPROTOCOL, f"bearer.{oldest}"]
    assert await status_of(connect, plane.port, origin=PAGE, subprotocols=offer) == 401
    offer = [SUBPROTOCOL, f"bearer.{second}"]
    await (await connect(plane.port, None, origin=PAGE, subprotocols=offer)).ping()


@pytest.mark.parametrize(
    ("origin", "ttl", "message"),
    [
        ("https://gateway/status", 300.0, "is not an origin"),
        ("null", 300.0, "'null' is the origin of sandboxed pages"),
        (PAGE, 0.0, "ttl 0.0 must be a number of seconds above 0"),
        (PAGE, float("nan"), "ttl nan must be a number of seconds above 0"),
    ],
)
async def test_a_viewer_token_needs_an_origin_and_a_lifetime(
    gateway: Callable[..., Any], origin: str, ttl: float, message: str
) -> None:
    plane, _ = await gateway()
    with pytest.raises(ValueError, match="viewer token: ") as info:
        plane.viewer_token(origin, ttl)
    assert message in str(info.value)


def test_no_configured_client_may_be_the_status_page(tmp_path: Path) -> None:
    text = f"""
    [device_plane]
    listen = "127.0.0.1"
    plain = true
    [[device_plane.clients]]
    id = "status-page"
    token_sha256 = "{hash_token(HMI_TOKEN)}"
    subscribe = ["#"]
    """
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), config_dir=tmp_path)
    assert info.value.problems == [
        (
            "device_plane.clients[0].id",
            "'status-page' is reserved for the status page's live view (its short-lived viewer "
            "tokens): choose another id",
        )
    ]
