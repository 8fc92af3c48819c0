"""Stress tests of the device plane (issue 7): a thousand connections coming and going, well
or badly, leave nothing behind; a client that stops reading neither holds back the others nor
makes the gateway hold more than its queue.

Real TLS (trustme) on loopback. The well-behaved peers are the ``websockets`` library: its
asyncio client in a subprocess for the churn (``wss_churn_clients.py``), its sync client in
threads for the slow-client test. The misbehaving peers are raw trio sockets with ``ssl`` and
``wsproto`` in this process, because they do what a library client never does: stall in a
handshake, stop mid-frame, reset the connection, ignore pings, stop reading. One edge case
that needs exact control of when the server's sends block runs the real trio-websocket server
and the plane's handler over an in-memory stream instead (``TightStream``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import random
import re
import resource
import socket
import ssl
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
import trustme
import websockets.sync.client
import wsproto
import wsproto.events
from trio_websocket import WebSocketServer

from gateway.core.configtypes import Duration, Name
from gateway.core.reading import Reading
from gateway.deviceauth import DeviceClient, DevicePlaneSection, hash_token
from gateway.deviceplane import ClientStatistics, DevicePlane
from gateway.hub import Hub
from tests.test_deviceplane import ca, client_ssl, tls_section  # the same server setup

__all__ = ["ca", "client_ssl"]  # pytest fixtures used by name

# Upper bound for something that normally takes a fraction of a second; only a failing test
# ever waits this long.
TIMEOUT = 10.0

CHURN_TOKEN = "churn-token-0123456789abcdefghijklmnop"
SLOW_TOKEN = "slow-token-0123456789abcdefghijklmnopq"
FAST_TOKEN = "fast-token-0123456789abcdefghijklmnopq"
BAD_TOKEN = "wrong-token-0123456789abcdefghijklmnop"

CLIENTS = (
    DeviceClient(
        id=Name("churn"),
        token_sha256=hash_token(CHURN_TOKEN),
        subscribe=("devices/churn/#", "line-1/#"),
        publish=("+",),
    ),
    DeviceClient(id=Name("slow"), token_sha256=hash_token(SLOW_TOKEN), subscribe=("line-1/#",)),
    DeviceClient(id=Name("fast"), token_sha256=hash_token(FAST_TOKEN), subscribe=("line-1/#",)),
)

CHURN_SCRIPT = Path(__file__).with_name("wss_churn_clients.py")


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def section(ca: trustme.CA, tmp_path: Path) -> DevicePlaneSection:
    return tls_section(ca, tmp_path, CLIENTS)


@pytest.fixture
async def gateway(
    section: DevicePlaneSection,
) -> AsyncIterator[Callable[..., Awaitable[tuple[DevicePlane, Hub]]]]:
    """``await start(**section changes)``: a device plane serving until the test ends."""
    async with trio.open_nursery() as nursery:

        async def start(**changes: Any) -> tuple[DevicePlane, Hub]:
            hub = Hub()
            plane = DevicePlane(attrs.evolve(section, **changes), hub, shutdown_timeout=5.0)
            await nursery.start(plane.run)
            return plane, hub

        yield start
        nursery.cancel_scope.cancel()


@pytest.fixture
def open_files(request: pytest.FixtureRequest) -> Iterator[None]:
    """Raise the soft limit of open files to the hard one (for the duration of a test) when it is
    below what a thousand connections, both ends in this process at times, may need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.fail(f"ulimit -n: the hard limit {hard} is below the {wanted} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_targets() -> collections.Counter[str]:
    """What the open file descriptors point at (for a failure message)."""
    targets: collections.Counter[str] = collections.Counter()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            targets[os.readlink(f"/proc/self/fd/{fd}").split(":")[0]] += 1
    return targets


async def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll ``condition`` (server state with no event to wait on) until it holds."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


# ---- a raw client ------------------------------------------------------------------------------


class RawClient:
    """A WebSocket client on wsproto over a trio TLS stream that does only what the test says:
    it answers no ping (it counts them), and it can stop reading, stop mid-frame or reset."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.pings = 0
        self._events: collections.deque[wsproto.events.Event] = collections.deque()

    @classmethod
    async def connect(
        cls,
        port: int,
        context: ssl.SSLContext,
        token: str,
        *,
        receive_buffer: int | None = None,
    ) -> RawClient:
        sock = trio.socket.socket()
        if receive_buffer is not None:
            # Before connecting, so that the window the server sees is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SSLStream(trio.SocketStream(sock), context, server_hostname="127.0.0.1")
        client = cls(stream)
        await client.send(upgrade_request(token))
        event = await client.next_event()
        assert isinstance(event, wsproto.events.AcceptConnection), event
        return client

    async def send(self, event: wsproto.events.Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send(wsproto.events.TextMessage(json.dumps(message)))

    async def next_event(self) -> wsproto.events.Event:
        """The next event other than a ping; ``EOFError`` when the stream ends first."""
        while not self._events:
            try:
                data = await self.stream.receive_some()
            except trio.BrokenResourceError:
                data = b""  # a TLS stream cut without close_notify, or a reset
            if not data:
                raise EOFError("the server closed the stream without a close frame")
            self.ws.receive_data(bytes(data))
            for event in self.ws.events():
                if isinstance(event, wsproto.events.Ping):
                    self.pings += 1  # and no pong
                else:
                    self._events.append(event)
        return self._events.popleft()

    async def receive(self) -> dict[str, Any] | wsproto.events.CloseConnection:
        """The next message as JSON, or the close frame."""
        parts: list[str] = []
        while True:
            event = await self.next_event()
            if isinstance(event, wsproto.events.CloseConnection):
                assert not parts, "closed mid-message"
                return event
            assert isinstance(event, wsproto.events.TextMessage), event
            parts.append(event.data)
            if event.message_finished:
                result: dict[str, Any] = json.loads("".join(parts))
                return result

    async def ping(self) -> None:
        """A protocol ping: everything sent before it has been handled when pong arrives."""
        await self.send_json({"type": "ping", "id": "sync"})
        assert await self.receive() == {"type": "pong", "id": "sync"}

    async def close_frame(self) -> wsproto.events.CloseConnection:
        """Read (and drop) messages up to the server's close frame; answer it, end the stream."""
        while not isinstance(message := await self.receive(), wsproto.events.CloseConnection):
            pass
        await self.send(message.response())
        await self.abort()
        return message

    async def close(self) -> wsproto.events.CloseConnection:
        """Close the WebSocket (1000) and end the stream; the server's answer."""
        await self.send(wsproto.events.CloseConnection(1000))
        while not isinstance(message := await self.receive(), wsproto.events.CloseConnection):
            pass
        await self.abort()
        return message

    async def abort(self, *, reset: bool = False) -> None:
        """End the TCP connection without TLS close_notify: FIN, or RST with ``reset``."""
        sock = self.stream.transport_stream.socket
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.transport_stream.aclose()


def upgrade_request(token: str) -> wsproto.events.Request:
    return wsproto.events.Request(
        host="127.0.0.1",
        target="/",
        extra_headers=[(b"authorization", f"Bearer {token}".encode())],
    )


def client_hello(context: ssl.SSLContext) -> bytes:
    """The first flight of a TLS handshake, as ``context`` would send it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def wait_eof(sock: trio.socket.SocketType) -> None:
    """Until the server ends the connection (FIN or reset); it must send nothing first."""
    try:
        data = await sock.recv(1)
    except ConnectionResetError:
        return
    assert data == b"", data


# ---- test 1: churn -----------------------------------------------------------------------------

GOOD, BAD = 500, 100  # the websockets clients (subprocess)
RAW = {  # the misbehaving clients (this process)
    "drop mid-frame (FIN)": 75,
    "drop mid-frame (RST)": 75,
    "stall: TCP only": 50,
    "stall: half a ClientHello": 50,
    "stall: half an HTTP request": 50,
    "no pong": 100,
}
CONCURRENCY = 100  # per side: websockets clients, raw clients


async def churn_raw_client(kind: str, port: int, context: ssl.SSLContext) -> None:
    if kind.startswith("stall"):
        await stalled_client(kind, port, context)
        return
    client = await RawClient.connect(port, context, CHURN_TOKEN)
    await client.send_json({"type": "subscribe", "topics": ["line-1/#"]})
    await client.ping()  # subscribed, so there is a hub subscription to clean up
    if kind == "no pong":
        close = await client.close_frame()
        assert close.code == 1011, close
        assert client.pings >= 1
        return
    data = client.ws.send(wsproto.events.TextMessage(json.dumps({"type": "ping", "id": "x"})))
    await client.stream.send_all(data[: len(data) // 2])
    await client.abort(reset=kind.endswith("(RST)"))


async def stalled_client(kind: str, port: int, context: ssl.SSLContext) -> None:
    """Connects and stalls in the handshake; the server's ``handshake_timeout`` ends it."""
    sock = trio.socket.socket()
    with sock:
        await sock.connect(("127.0.0.1", port))
        if kind == "stall: half a ClientHello":
            hello = client_hello(context)
            await sock.send(hello[: len(hello) // 2])
        elif kind == "stall: half an HTTP request":
            stream = trio.SSLStream(trio.SocketStream(sock), context, server_hostname="127.0.0.1")
            await stream.do_handshake()
            request = wsproto.WSConnection(wsproto.ConnectionType.CLIENT).send(
                upgrade_request(CHURN_TOKEN)
            )
            await stream.send_all(request[: len(request) // 2])
            with contextlib.suppress(trio.BrokenResourceError):  # ends without close_notify
                assert await stream.receive_some() == b""
            return
        await wait_eof(sock)


async def run_churn_subprocess(port: int, ca_file: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        str(CHURN_SCRIPT),
        f"--port={port}",
        f"--ca={ca_file}",
        f"--token={CHURN_TOKEN}",
        "--client-id=churn",
        f"--bad-token={BAD_TOKEN}",
        f"--good={GOOD}",
        f"--bad={BAD}",
        f"--concurrency={CONCURRENCY}",
    ]
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def test_churn_of_a_thousand_connections_leaves_nothing_behind(
    gateway: Callable[..., Awaitable[tuple[DevicePlane, Hub]]],
    client_ssl: ssl.SSLContext,
    ca_file: Path,
    open_files: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.deviceplane")
    plane, hub = await gateway(
        max_connections=1000,
        handshake_timeout=Duration(1.0),
        ping_interval=Duration(0.2),
        ping_timeout=Duration(0.5),
    )
    assert plane.port is not None
    port = plane.port
    fds = open_fds()
    targets = fd_targets()
    tasks = trio.lowlevel.current_statistics().tasks_living

    kinds = [kind for kind, count in RAW.items() for _ in range(count)]
    random.Random(7).shuffle(kinds)
    done: collections.Counter[str] = collections.Counter()
    limit = trio.CapacityLimiter(CONCURRENCY)
    websockets_result: dict[str, Any] = {}

    async def raw(index: int, kind: str) -> None:
        async with limit:
            try:
                with trio.fail_after(TIMEOUT):
                    await churn_raw_client(kind, port, client_ssl)
            except Exception as e:
                e.add_note(f"raw client {index}: {kind}")
                raise
        done[kind] += 1

    async def library_clients() -> None:
        websockets_result.update(await run_churn_subprocess(port, ca_file))

    with trio.fail_after(3 * TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(library_clients)
            for index, kind in enumerate(kinds):
                nursery.start_soon(raw, index, kind)

    assert websockets_result == {
        "ok": GOOD,
        "refused": BAD,
        "unexpected": 0,
        "first_unexpected": [],
    }
    assert done == RAW

    # The server ends its side of each connection on its own time: wait for it.
    def clean() -> bool:
        return (
            plane.statistics().connections == 0
            and hub.statistics().subscriptions == 0
            and open_fds() == fds
            and trio.lowlevel.current_statistics().tasks_living == tasks
        )

    # On timeout, the assertions below say what is left.
    with contextlib.suppress(trio.TooSlowError):
        await wait_until(clean)
    stats = plane.statistics()
    assert stats.connections == 0
    assert hub.statistics().subscriptions == 0
    assert open_fds() == fds, f"before: {targets}; after: {fd_targets()}"
    assert trio.lowlevel.current_statistics().tasks_living == tasks
    assert stats.refused == BAD
    # Every accepted connection ended through the handler's cleanup, for the reason expected.
    ended = collections.Counter(
        int(m.group(1))
        for r in caplog.records
        if (m := re.search(r"disconnected \((\d+)", r.getMessage()))
    )
    accepted = GOOD + RAW["drop mid-frame (FIN)"] + RAW["drop mid-frame (RST)"] + RAW["no pong"]
    assert sum(ended.values()) == accepted
    assert ended[1011] == RAW["no pong"]
    assert plane.condition().state.value == "up"


# ---- test 2: a slow client ---------------------------------------------------------------------

QUEUE = 100
WINDOW = QUEUE // 2
"""How far (in readings) the publisher may run ahead of the slowest fast client: under the
queue size, so a fast client can never overflow, however the scheduler runs."""
FAST_CLIENTS = 3
MIN_READINGS = 3000
MAX_READINGS = 100_000
END = "line-1/boiler/end"
"""The topic of the last reading published."""
PADDING = "x" * 400  # so that socket buffers fill after hundreds, not thousands, of readings


class FastClient:
    """A ``websockets`` sync client that reads everything, from a trio task via a thread."""

    def __init__(self, ws: websockets.sync.client.ClientConnection, progress: Progress) -> None:
        self.ws = ws
        self.seqs: list[int] = []
        self.other_frames: list[dict[str, Any]] = []
        self._progress = progress

    async def receive(self) -> dict[str, Any]:
        # Abandoned on cancellation, so that a failing test does not wait for the timeout.
        data = await trio.to_thread.run_sync(
            lambda: self.ws.recv(timeout=TIMEOUT), abandon_on_cancel=True
        )
        result: dict[str, Any] = json.loads(data)
        return result

    async def send(self, message: dict[str, Any]) -> None:
        await trio.to_thread.run_sync(self.ws.send, json.dumps(message))

    async def ping(self) -> None:
        await self.send({"type": "ping", "id": "sync"})
        assert await self.receive() == {"type": "pong", "id": "sync"}

    async def read_until_end(self) -> None:
        """Collect the ``seq`` of every reading up to the one on ``END``."""
        while True:
            frame = await self.receive()
            if frame["type"] != "readings":
                self.other_frames.append(frame)
                continue
            for reading in frame["readings"]:
                if reading["topic"] == END:
                    return
                self.seqs.append(reading["seq"])
            self._progress.changed()


class Progress:
    """Wakes the publisher whenever a fast client got a frame."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def changed(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait_changed(self) -> None:
        await self._event.wait()


@pytest.fixture
def fast_connect(client_ssl: ssl.SSLContext) -> Iterator[Callable[[int], Awaitable[Any]]]:
    opened = contextlib.ExitStack()

    async def connect(port: int) -> websockets.sync.client.ClientConnection:
        return await trio.to_thread.run_sync(
            lambda: opened.enter_context(
                websockets.sync.client.connect(
                    f"wss://127.0.0.1:{port}/",
                    ssl=client_ssl,
                    additional_headers={"Authorization": f"Bearer {FAST_TOKEN}"},
                    open_timeout=TIMEOUT,
                    close_timeout=TIMEOUT,
                    ping_interval=None,
                )
            )
        )

    with opened:
        yield connect


def slow_statistics(plane: DevicePlane) -> ClientStatistics | None:
    """The slow client's connection, None once it has ended."""
    found = [c for c in plane.statistics().clients if c.client_id == "slow"]
    assert len(found) <= 1
    return found[0] if found else None


@attrs.frozen
class SlowCase:
    """How the gateway deals with a client that stops reading, and how to tell it did."""

    changes: dict[str, Any]
    """Of the section."""
    behind: Callable[[DevicePlane, Hub], bool]
    """Whether the gateway has acted on the slow client (after this, publishing may stop)."""
    resumed: Callable[[RawClient, int, DevicePlane], Awaitable[None]]
    """What the slow client gets when it reads again; given the number of readings."""


def dropped_a_queue(plane: DevicePlane, hub: Hub) -> bool:
    slow = slow_statistics(plane)
    return slow is not None and slow.dropped >= QUEUE


def unsubscribed(plane: DevicePlane, hub: Hub) -> bool:
    return hub.statistics().subscriptions == FAST_CLIENTS


def disconnected(plane: DevicePlane, hub: Hub) -> bool:
    return plane.statistics().connections == FAST_CLIENTS


async def read_slow(slow: RawClient, published: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The ``seq`` of the readings the slow client gets, and each ``gap`` as (readings before
    it, dropped), up to the reading on ``END`` (seq ``published``) or the end of the stream."""
    seqs: list[int] = []
    gaps: list[tuple[int, int]] = []
    while not seqs or seqs[-1] != published:
        frame = await slow.receive()
        assert isinstance(frame, dict), frame
        if frame["type"] == "gap":
            gaps.append((len(seqs), frame["dropped"]))
        else:
            assert frame["type"] == "readings", frame
            seqs += [r["seq"] for r in frame["readings"]]
    return seqs, gaps


def check_holes(seqs: list[int], gaps: list[tuple[int, int]]) -> None:
    """Readings in order from the first; before each hole a ``gap`` frame saying its size."""
    assert seqs[0] == 0
    holes = [
        (i, seqs[i] - seqs[i - 1] - 1) for i in range(1, len(seqs)) if seqs[i] != seqs[i - 1] + 1
    ]
    assert holes == gaps


async def gets_gaps(slow: RawClient, published: int, plane: DevicePlane) -> None:
    """What was sent before it stalled, a ``gap`` frame for each hole, and every reading after."""
    seqs, gaps = await read_slow(slow, published)
    assert gaps, "no gap frame"
    check_holes(seqs, gaps)
    # Every reading (the one on END too) was either received or counted in a gap.
    assert len(seqs) + sum(d for _, d in gaps) == published + 1
    statistics = slow_statistics(plane)
    assert statistics is not None
    assert statistics.dropped == sum(d for _, d in gaps)
    await slow.ping()
    assert (await slow.close()).code == 1000


async def gets_1013(slow: RawClient, published: int, plane: DevicePlane) -> None:
    """What was sent before it stalled, in order and without a hole, then 1013."""
    seqs: list[int] = []
    while isinstance(frame := await slow.receive(), dict):
        assert frame["type"] == "readings", frame
        seqs += [r["seq"] for r in frame["readings"]]
    assert seqs == list(range(len(seqs)))
    assert seqs
    assert frame.code == 1013
    assert frame.reason is not None
    assert "read faster" in frame.reason
    await slow.send(frame.response())
    await slow.abort()


async def gets_cut_off(slow: RawClient, published: int, plane: DevicePlane) -> None:
    """What the socket buffers held, then the end of the stream without a close frame: the
    send that timed out stopped mid-frame, after which no close frame can follow."""
    with pytest.raises(EOFError):
        await read_slow(slow, published)
    await slow.abort()


SLOW_CASES = {
    "drop-oldest": SlowCase({"overflow": "drop-oldest"}, dropped_a_queue, gets_gaps),
    "disconnect": SlowCase({"overflow": "disconnect"}, unsubscribed, gets_1013),
    "send-timeout": SlowCase(
        {"overflow": "drop-oldest", "send_timeout": Duration(0.5)}, disconnected, gets_cut_off
    ),
}


@pytest.mark.parametrize("case", SLOW_CASES.values(), ids=SLOW_CASES.keys())
async def test_slow_client_is_bounded_and_holds_back_no_one(
    gateway: Callable[..., Awaitable[tuple[DevicePlane, Hub]]],
    client_ssl: ssl.SSLContext,
    fast_connect: Callable[[int], Awaitable[websockets.sync.client.ClientConnection]],
    case: SlowCase,
) -> None:
    # Timeouts beyond the test unless the case is about one: the slow client is ended by its
    # queue (or its send timeout), not by a ping.
    changes = {
        "queue": QUEUE,
        "send_timeout": Duration(60.0),
        "ping_interval": Duration(60.0),
        "ping_timeout": Duration(60.0),
        **case.changes,
    }
    plane, hub = await gateway(**changes)
    assert plane.port is not None
    # A small receive window, so that the server's writer blocks soon once it stops reading.
    slow = await RawClient.connect(plane.port, client_ssl, SLOW_TOKEN, receive_buffer=4096)
    await slow.send_json({"type": "subscribe", "topics": ["line-1/#"]})
    await slow.ping()
    progress = Progress()
    fast = [FastClient(await fast_connect(plane.port), progress) for _ in range(FAST_CLIENTS)]
    for client in fast:
        await client.send({"type": "subscribe", "topics": ["line-1/#"]})
        await client.ping()

    # The slow client reads nothing from here until all readings are published.
    max_queued = 0
    published = 0
    with trio.fail_after(6 * TIMEOUT):
        async with trio.open_nursery() as nursery:
            for client in fast:
                nursery.start_soon(client.read_until_end)
            while published < MIN_READINGS or not case.behind(plane, hub):
                assert published < MAX_READINGS, "the gateway never acted on the slow client"
                while published - min(len(c.seqs) for c in fast) >= WINDOW:
                    await progress.wait_changed()
                hub.publish(Reading("line-1/boiler/flow", PADDING, seq=published, timestamp=1.0))
                published += 1
                slow_now = slow_statistics(plane)
                if slow_now is not None:
                    assert slow_now.queued <= QUEUE
                    max_queued = max(max_queued, slow_now.queued)
                # Lets the server's tasks run between publishes.
                await trio.lowlevel.checkpoint()
            hub.publish(Reading(END, True, seq=published, timestamp=1.0))

    for client in fast:
        assert client.seqs == list(range(published))
        assert client.other_frames == []
    # The slow client was really behind: its queue filled (and no further).
    assert max_queued == QUEUE
    assert all(c.queued <= QUEUE for c in plane.statistics().clients)
    with trio.fail_after(TIMEOUT):
        await case.resumed(slow, published, plane)
        for client in fast:
            await client.ping()
    await wait_until(lambda: plane.statistics().connections == FAST_CLIENTS)
    assert hub.statistics().subscriptions == FAST_CLIENTS


# ---- a peer that stops reading after it closed -------------------------------------------------


class TightStream(trio.abc.Stream):
    """The server's end of an in-memory connection whose outgoing buffer holds ``capacity``
    bytes, filled the way a kernel fills a socket buffer: a send waits while the buffer is full,
    then takes all its data (a little over the limit is fine). The test plays the client
    through ``incoming`` and ``outgoing``; nothing is read unless the test reads it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.incoming = bytearray()
        self.outgoing = bytearray()
        self.closed = trio.Event()
        self._changed = trio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait(self, done: Callable[[], bool]) -> None:
        while not done() and not self.closed.is_set():
            await self._changed.wait()
        if self.closed.is_set():
            raise trio.ClosedResourceError

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        await self._wait(lambda: len(self.outgoing) < self.capacity)
        self.outgoing += data
        self._wake()

    async def wait_send_all_might_not_block(self) -> None:
        await self._wait(lambda: len(self.outgoing) < self.capacity)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        await self._wait(lambda: bool(self.incoming))
        data = bytes(self.incoming[: max_bytes or len(self.incoming)])
        del self.incoming[: len(data)]
        return data

    async def aclose(self) -> None:
        self.closed.set()
        self._wake()
        await trio.lowlevel.checkpoint()

    # The client's side.

    def client_send(self, data: bytes) -> None:
        self.incoming += data
        self._wake()

    async def client_receive(self) -> bytes:
        await self._wait(lambda: bool(self.outgoing))
        data = bytes(self.outgoing)
        self.outgoing.clear()
        self._wake()
        return data


class OneListener(trio.abc.Listener[trio.abc.Stream]):
    """Hands out the streams the test gives it."""

    def __init__(self) -> None:
        self.send, self._receive = trio.open_memory_channel[trio.abc.Stream](1)

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        await self._receive.aclose()


async def test_client_that_closes_then_stops_reading_does_not_leak_its_connection(
    section: DevicePlaneSection, autojump_clock: trio.testing.MockClock
) -> None:
    section = attrs.evolve(
        section, ping_interval=Duration(1.0), ping_timeout=Duration(1.0), send_timeout=Duration(5.0)
    )
    hub = Hub()
    plane = DevicePlane(section, hub, shutdown_timeout=2.0)
    listener = OneListener()
    stream = TightStream(capacity=4096)
    async with trio.open_nursery() as nursery:
        # The real trio-websocket server and the plane's own handler, over the in-memory stream.
        server = WebSocketServer(
            plane._handle,
            [listener],  # type: ignore[list-item]
            handler_nursery=nursery,
            connect_timeout=section.handshake_timeout,
            disconnect_timeout=plane.shutdown_timeout,
        )
        await nursery.start(server.run)
        await listener.send.send(stream)

        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        events: list[wsproto.events.Event] = []

        async def receive_events() -> None:
            ws.receive_data(await stream.client_receive())
            events.extend(ws.events())

        stream.client_send(ws.send(upgrade_request(SLOW_TOKEN)))
        await receive_events()
        assert isinstance(events.pop(0), wsproto.events.AcceptConnection)
        subscribe = {"type": "subscribe", "topics": ["line-1/#"]}
        stream.client_send(ws.send(wsproto.events.TextMessage(json.dumps(subscribe))))
        await trio.testing.wait_all_tasks_blocked()
        assert hub.statistics().subscriptions == 1

        # One reading larger than the buffer: its send completes (the buffer had room) and
        # leaves the buffer full. The client reads no more, closes, and still reads nothing.
        hub.publish(Reading("line-1/boiler/flow", "x" * 5000, timestamp=1.0))
        await trio.testing.wait_all_tasks_blocked()
        assert len(stream.outgoing) > stream.capacity
        (client,) = plane.statistics().clients
        assert (client.queued, client.messages_out) == (0, 1)  # the writer is idle
        stream.client_send(ws.send(wsproto.events.CloseConnection(1000)))

        # The plane lets go of the connection (its next ping finds it closed)...
        await wait_until(lambda: plane.statistics().connections == 0)
        assert hub.statistics().subscriptions == 0
        # ... and the stream must be closed within the timeouts, not be held forever.
        with trio.move_on_after(section.send_timeout + 3 * plane.shutdown_timeout) as waiting:
            await stream.closed.wait()
        nursery.cancel_scope.cancel()
    assert not waiting.cancelled_caught, "the server never closed the stream"
