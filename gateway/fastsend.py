"""One WebSocket text frame out in one step: framed, encrypted and handed to the kernel.

Why (``python -m bench fanout``): a readings frame to each of 100 subscribers 100 times a
second is 10,000 sends a second on one core. Through trio-websocket's ``send_message`` a send
passes two locks and the socket, each a trip through trio's scheduler, and costs about 70 us
of CPU before the gateway has done anything; the trips also interleave the subscribers' sends,
so every frame of a burst leaves near the end of the burst. Here, when nothing else is
sending on the connection, the frame is built (wsproto), encrypted (the connection's
``SSLObject``) and written to the socket without a yield, at about half that cost and in the
order the writers run. Only what the socket does not take at once (its buffer is full: a
client that reads slowly) is awaited, through trio's ``SocketStream.send_all``, with both
send locks held so that nothing overtakes it.

The price: this reads private attributes of trio-websocket's ``WebSocketConnection`` and of
trio's ``SSLStream`` (both versions are pinned in the Makefile). When one is missing, or the
connection is in any state but open and idle, ``send_now`` answers ``NOT_TRIED`` and the
caller uses the public ``send_message``: a library upgrade that renames them costs speed, not
correctness, and ``tests/test_fastsend.py`` fails so that it is noticed.
"""

from __future__ import annotations

import enum
import logging
import os
from typing import Any

import trio
from trio_websocket import WebSocketConnection
from wsproto.events import TextMessage

log = logging.getLogger("gateway.fastsend")


class Sent(enum.Enum):
    AT_ONCE = "at once"
    """All of the frame is with the kernel."""
    NOT_TRIED = "not tried"
    """Nothing was done: send it with ``WebSocketConnection.send_message``."""


_warned = False


class TextSender:
    """Sends text frames on one connection, in one step when it can (see the module)."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws: Any = ws
        self._stream: Any = None
        try:
            stream = ws._stream
            # Plain ws:// (loopback only) goes the public way.
            if isinstance(stream, trio.SSLStream):
                # Every attribute used below, read once so a missing one shows here.
                for name in ("_close_reason", "_wsproto", "_stream_lock"):
                    getattr(ws, name)
                for name in (
                    "_ssl_object",
                    "_outgoing",
                    "_inner_send_lock",
                    "_state",
                    "_delayed_outgoing",
                    "_handshook",
                ):
                    getattr(stream, name)
                self._stream = stream
        except AttributeError as e:
            _unavailable(e)

    @property
    def available(self) -> bool:
        """Whether frames on this connection can go in one step (TLS, known library versions)."""
        return self._stream is not None

    def send_now(self, text: str) -> Sent | Rest:
        """Send ``text`` as one text frame if nothing else is sending on the connection.

        ``Sent.AT_ONCE``: done. ``Sent.NOT_TRIED``: nothing was done. A ``Rest``: the frame
        is encrypted and partly sent; the same task must ``await rest.finish()`` next (it
        holds the connection's send locks), and nothing else is sent on the connection until
        that returns or fails. Raises
        ``trio.BrokenResourceError`` when the connection broke (the frame may be half sent:
        the socket is closed, so nothing can follow it)."""
        ws, stream = self._ws, self._stream
        if (
            stream is None
            or ws._close_reason is not None
            or ws._stream_lock.locked()
            or stream._inner_send_lock.locked()
            or stream._state.name != "OK"
            or stream._delayed_outgoing is not None
            or not stream._handshook.done
        ):
            return Sent.NOT_TRIED
        socket = stream.transport_stream.socket
        fd = socket.fileno()
        if fd < 0:
            return Sent.NOT_TRIED
        data = ws._wsproto.send(TextMessage(data=text))
        # Taken without waiting (both are free): whoever comes next queues behind this frame,
        # as behind any send in progress.
        ws._stream_lock.acquire_nowait()
        stream._inner_send_lock.acquire_nowait()
        try:
            # With renegotiation off (servertls) a write never waits for the peer; if one
            # did, or failed, the connection is closed rather than guessed at.
            stream._ssl_object.write(data)
            out = stream._outgoing.read()
            try:
                written = os.write(fd, out)
            except BlockingIOError:
                written = 0
        except BaseException as e:
            # The frame may be encrypted and not sent, or half sent: nothing may follow it.
            self._release()
            socket.close()
            if isinstance(e, OSError):  # ssl.SSLError too
                raise trio.BrokenResourceError(f"sending a frame failed: {e}") from e
            raise
        if written == len(out):
            self._release()
            return Sent.AT_ONCE
        return Rest(self, memoryview(out)[written:])

    def _release(self) -> None:
        self._stream._inner_send_lock.release()
        self._ws._stream_lock.release()


class Rest:
    """What the socket did not take at once; the connection's send locks are held for it."""

    def __init__(self, sender: TextSender, data: memoryview) -> None:
        self._sender = sender
        self._data = data

    async def finish(self) -> None:
        """Send the rest. On any failure or cancel the socket is closed: half a TLS record
        went out, and nothing may follow it."""
        transport = self._sender._stream.transport_stream
        try:
            await transport.send_all(self._data)
        except BaseException:
            transport.socket.close()
            raise
        finally:
            self._sender._release()


def _unavailable(e: AttributeError) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "frames go out through trio-websocket's send_message only (%s): the installed "
            "trio or trio-websocket differs from the pinned one; fan-out costs more CPU",
            e,
        )
