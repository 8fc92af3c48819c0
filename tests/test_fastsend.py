"""Frames sent in one step (``gateway.fastsend``) on real trio-websocket connections over real
TLS (trustme) on loopback, read by the ``websockets`` library's sync client: they arrive
whole and in order, also when the socket is full, cancelled or broken, and with the pinned
trio and trio-websocket the fast way is actually taken."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
import trustme
import websockets.exceptions
import websockets.sync.client
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from gateway import fastsend
from gateway.core.servertls import TlsFiles, server_context
from gateway.fastsend import Rest, Sent, TextSender

TIMEOUT = 10.0
BIG = "x" * 60_000
"""A frame the size that fills a socket buffer in a few sends."""

Connect = Callable[..., Awaitable[tuple[WebSocketConnection, Any]]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def connect(ca: trustme.CA, nursery: trio.Nursery) -> AsyncIterator[Connect]:
    """``connect(tls=True, **client kwargs) -> (server side, websockets client)``."""
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ssl)
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    opened = contextlib.ExitStack()
    clients: list[Any] = []

    async def connect(tls: bool = True, **kwargs: Any) -> tuple[WebSocketConnection, Any]:
        accepted: trio.MemorySendChannel[WebSocketConnection]
        accepted, taken = trio.open_memory_channel[WebSocketConnection](1)

        async def handler(request: WebSocketRequest) -> None:
            ws = await request.accept()
            await accepted.send(ws)
            await trio.sleep_forever()  # the connection lives as long as its handler

        server = await nursery.start(
            serve_websocket, handler, "127.0.0.1", 0, server_ssl if tls else None
        )
        url = f"{'wss' if tls else 'ws'}://127.0.0.1:{server.port}/"
        client = await trio.to_thread.run_sync(
            lambda: opened.enter_context(
                websockets.sync.client.connect(
                    url, ssl=client_ssl if tls else None, open_timeout=TIMEOUT, **kwargs
                )
            )
        )
        clients.append(client)
        return await taken.receive(), client

    yield connect
    for client in clients:
        client.close_socket()  # no closing handshake: some servers here can no longer answer
    await trio.to_thread.run_sync(opened.close)


def transport(ws: WebSocketConnection) -> Any:
    """The trio socket under the connection's TLS."""
    stream: Any = ws._stream
    return stream.transport_stream.socket


def receive(client: Any, count: int) -> list[str]:
    return [client.recv(timeout=TIMEOUT) for _ in range(count)]


def until_closed(client: Any) -> tuple[list[str], Any]:
    """Every frame until the connection ends, and how it ended."""
    frames = []
    while True:
        try:
            frames.append(client.recv(timeout=TIMEOUT))
        except websockets.exceptions.ConnectionClosed as e:
            return frames, e


def fill(sender: TextSender) -> tuple[list[str], Rest]:
    """Send numbered big frames until the socket takes one only in part."""
    sent = []
    for i in range(1000):
        frame = f"{i:04d}{BIG}"
        outcome = sender.send_now(frame)
        sent.append(frame)
        if isinstance(outcome, Rest):
            return sent, outcome
        assert outcome is Sent.AT_ONCE
    raise AssertionError("the socket took 60 MB without filling")


async def test_with_the_pinned_libraries_frames_go_at_once_in_order(connect: Connect) -> None:
    ws, client = await connect()
    sender = TextSender(ws)
    assert sender.available
    frames = [json.dumps({"type": "readings", "n": i}) for i in range(100)]
    for frame in frames[:50]:
        assert sender.send_now(frame) is Sent.AT_ONCE
    # The public way and the fast one share the connection: order is kept across both.
    await ws.send_message(frames[50])
    for frame in frames[51:]:
        assert sender.send_now(frame) is Sent.AT_ONCE
    assert await trio.to_thread.run_sync(receive, client, 100) == frames
    # The client's pings are answered in between as ever.
    pong = await trio.to_thread.run_sync(client.ping)
    assert await trio.to_thread.run_sync(lambda: pong.wait(TIMEOUT))
    assert sender.send_now("after the ping") is Sent.AT_ONCE
    assert await trio.to_thread.run_sync(receive, client, 1) == ["after the ping"]


async def test_a_full_socket_leaves_a_rest_that_nothing_overtakes(connect: Connect) -> None:
    ws, client = await connect(max_queue=1)  # the client reads only when asked to
    sender = TextSender(ws)
    sent, rest = fill(sender)
    # While the rest waits, nothing else goes: not in one step, not the public way.
    assert sender.send_now("overtaker") is Sent.NOT_TRIED
    received: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ws.send_message, "queued behind the rest")
        await trio.testing.wait_all_tasks_blocked()

        async def read() -> None:
            received.extend(await trio.to_thread.run_sync(receive, client, len(sent) + 1))

        nursery.start_soon(read)
        with trio.fail_after(TIMEOUT):
            await rest.finish()
    assert received == [*sent, "queued behind the rest"]
    # The locks are free again.
    assert sender.send_now("next") is Sent.AT_ONCE
    assert await trio.to_thread.run_sync(receive, client, 1) == ["next"]


async def test_a_cancelled_rest_closes_the_socket(connect: Connect) -> None:
    ws, client = await connect(max_queue=1)
    sender = TextSender(ws)
    sent, rest = fill(sender)
    with trio.CancelScope() as scope:
        scope.cancel()
        await rest.finish()
    assert scope.cancelled_caught
    # Half a frame went out: the socket is closed, so nothing can follow it.
    assert transport(ws).fileno() == -1
    assert sender.send_now("after") is Sent.NOT_TRIED
    with pytest.raises(ConnectionClosed):
        await ws.send_message("after")
    frames, closed = await trio.to_thread.run_sync(until_closed, client)
    # Every whole frame arrived and nothing after them; no close frame could follow.
    assert frames == sent[: len(frames)]
    assert closed.rcvd is None


async def test_a_broken_connection_raises_and_closes_the_socket(connect: Connect) -> None:
    ws, client = await connect()
    sender = TextSender(ws)
    assert sender.send_now("before") is Sent.AT_ONCE
    raw = transport(ws)
    raw.shutdown(socket.SHUT_WR)  # the next write fails with EPIPE
    with pytest.raises(trio.BrokenResourceError, match="sending a frame failed"):
        sender.send_now("lost")
    assert raw.fileno() == -1
    # The locks were released: the public way runs and reports the closed connection.
    assert not ws._stream_lock.locked()
    with pytest.raises(ConnectionClosed):
        await ws.send_message("after")
    frames, _ = await trio.to_thread.run_sync(until_closed, client)
    assert frames == ["before"]


async def test_a_send_in_progress_is_not_overtaken(connect: Connect) -> None:
    ws, client = await connect(max_queue=1)
    sender = TextSender(ws)
    sent = [f"{i:04d}{BIG}" for i in range(200)]
    received: list[str] = []
    async with trio.open_nursery() as nursery:

        async def public() -> None:
            for frame in sent:
                await ws.send_message(frame)

        # The public way blocks on the full socket, holding trio-websocket's lock.
        nursery.start_soon(public)
        await trio.testing.wait_all_tasks_blocked()
        assert ws._stream_lock.locked()
        assert sender.send_now("overtaker") is Sent.NOT_TRIED
        received.extend(await trio.to_thread.run_sync(receive, client, len(sent)))
    assert received == sent
    assert sender.send_now("after") is Sent.AT_ONCE
    assert await trio.to_thread.run_sync(receive, client, 1) == ["after"]


async def test_plain_connections_take_the_public_way(
    connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    ws, _ = await connect(tls=False)
    sender = TextSender(ws)
    assert not sender.available
    assert sender.send_now("plain") is Sent.NOT_TRIED
    assert not caplog.records  # plain ws:// is not a library mismatch


async def test_unknown_library_internals_take_the_public_way_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fastsend, "_warned", False)
    caplog.set_level(logging.WARNING, "gateway.fastsend")
    renamed = types.SimpleNamespace(_transport=None)  # what a future trio-websocket might be
    for _ in range(3):
        sender = TextSender(renamed)  # type: ignore[arg-type]
        assert not sender.available
        assert sender.send_now("frame") is Sent.NOT_TRIED
    [record] = caplog.records
    assert "send_message only" in record.getMessage()
    assert "_stream" in record.getMessage()


def test_the_server_context_refuses_renegotiation(tmp_path: Any, ca: trustme.CA) -> None:
    # fastsend relies on it: a write never has to wait for the peer.
    from gateway.core.configtypes import Secret

    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    files: TlsFiles = types.SimpleNamespace(
        tls_cert_file=Secret(cert_file, cert_file.read_text()),
        tls_key_file=Secret(key_file, key_file.read_text()),
        client_ca_file=None,
    )
    assert server_context(files).options & ssl.OP_NO_RENEGOTIATION
