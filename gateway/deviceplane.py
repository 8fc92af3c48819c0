"""The device plane: the wss server where devices and HMIs watch readings, publish their own
and take commands.

A thin Trio adapter around the sans-IO pieces: ``gateway.deviceauth`` decides each handshake,
``gateway.protocol`` parses client frames and builds the gateway's, ``gateway.hub`` fans
readings out. Each connection runs a reader and a writer task in one nursery; when either
ends the other is cancelled, its hub subscription is removed and the WebSocket is closed with
the code that says why (``docs/protocol.md``, "Closing codes").

``DevicePlane`` is a supervisor ``Part``: ``run`` binds, reports started once listening, and on
cancellation closes every open connection with 1001 (shielded, bounded) before returning.
It is also the command router's ``DeviceTargets`` (``gateway.core.commands``): ``send_command``
queues a ``command`` frame to the client's open connections, and the router, as the
``CommandSink``, hears of each connection and each ``ack``. ``viewer_token`` issues the status
page's short-lived tokens.

Depends on trio, trio-websocket, ``gateway.core``, ``gateway.deviceauth``, ``gateway.hub`` and
``gateway.protocol``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterator
from functools import partial
from pathlib import Path
from typing import cast
from urllib.parse import parse_qsl, urlsplit

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    Endpoint,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from gateway import localendpoint
from gateway.core.commands import CommandRequest, CommandSink
from gateway.core.component import Condition, State
from gateway.core.logs import kv
from gateway.core.reading import Reading
from gateway.core.servertls import load_certificate
from gateway.deviceauth import (
    DEFAULT_VIEWER_TTL,
    RESERVED_CLIENTS,
    STATUS_PAGE_CLIENT,
    Authenticator,
    DevicePlaneSection,
    Identity,
    Refusal,
    ViewerTokens,
    generate_token,
    hash_token,
    server_ssl_context,
)
from gateway.fastsend import Sent, TextSender
from gateway.hub import Hub, OverflowPolicy, SubscriberOverflow, Subscription, Watermark
from gateway.protocol import (
    MAX_TOPICS,
    Ack,
    ErrorCode,
    Ping,
    ProtocolError,
    Publish,
    Subscribe,
    Unsubscribe,
    ack_frame,
    command_frame,
    gap_frame,
    parse_client_message,
    pong_frame,
    published_reading,
    readings_frame,
)

log = logging.getLogger("gateway.deviceplane")

# Closing codes (RFC 6455 section 7.4.1; docs/protocol.md, "Closing codes").
GOING_AWAY = 1001
UNSUPPORTED_DATA = 1003
POLICY_VIOLATION = 1008
# No pong within ping_timeout. RFC 6455 has no code for a silent peer; 1011 is what the
# ``websockets`` library sends for its keepalive timeout, and 1001 would tell the client the
# gateway is going away, which it is not.
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013
ABNORMAL = 1006
STILL_WAITING = "; a send was still waiting for the client to read"
"""Never sent (RFC 6455 forbids it in a close frame): what the log shows for a connection
that ended without a close frame, either way."""

CLOSE_REASON_BYTES = 123
"""The most a close frame's reason can hold (RFC 6455 section 5.5)."""

DEFAULT_SHUTDOWN_TIMEOUT = 5.0
"""Seconds for closing every connection (1001) when the server stops."""

ANSWERS_QUEUED = 16
"""Answers (ack, pong, error) a connection's reader may be ahead of its sender: beyond, the
reader waits, so a client that does not read its answers cannot pile them up."""

COMMAND_BYTES_QUEUED = 1024 * 1024
"""Bytes of ``command`` frames waiting to be sent on one connection, on top of its answers.
Beyond it, ``send_command`` waits for the client to take some (up to ``send_timeout``): a device
that reconnects to a backlog larger than this gets it all, at the pace it reads. Only a
connection that takes no command for ``send_timeout`` is closed (1013, or cut off when a send
of its own timed out first). Counted in bytes, not commands: a device that reconnects may be
sent hundreds of small pending commands at once, faster than any socket takes them."""

MESSAGES_QUEUED = 4
"""Incoming messages trio-websocket may buffer per connection (each up to
``max_message_size``), so that its reader keeps the socket drained while ours is busy."""


@attrs.frozen
class ClientStatistics:
    """One open connection."""

    client_id: str
    peer: str
    patterns: tuple[str, ...]
    queued: int
    """Readings waiting in its hub subscription."""
    dropped: int
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    pings: int
    """WebSocket pings the client answered."""


@attrs.frozen
class DevicePlaneStatistics:
    listening: bool
    port: int | None
    connections: int
    refused: int
    """Handshakes rejected (401, 403, 503) since start."""
    messages_in: int
    """Frames received, over all connections since start."""
    messages_out: int
    bytes_in: int
    """Payload bytes of the frames received, over all connections since start."""
    bytes_out: int
    dropped: int
    """Readings dropped for slow clients, over all connections since start."""
    revoked: int
    """Connections closed (1008) because a reload removed their client or changed its token."""
    clients: tuple[ClientStatistics, ...]
    commands_sent: int = 0
    """``command`` frames queued to open connections since start (one per connection)."""
    acks_unmatched: int = 0
    """Device ``ack`` messages that answered no command waiting for one (``unknown-command``)."""


class TokenBucket:
    """A token bucket (sans-IO: the caller passes the time, in seconds, on each call).

    Holds up to ``capacity`` tokens and gains ``rate`` per second; a message costs tokens (one,
    or its size) and passes only if the bucket holds that many. Starts full."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._updated = now

    def tokens(self, now: float) -> float:
        """What the bucket holds at ``now`` (refilled since the last call)."""
        # max(): a clock that went backwards takes nothing away.
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._updated = max(self._updated, now)
        return self._tokens

    def can_take(self, amount: float, now: float) -> bool:
        return self.tokens(now) >= amount

    def take(self, amount: float, now: float) -> None:
        """Take ``amount`` tokens; only after ``can_take`` said yes (may go below zero else)."""
        self._tokens = self.tokens(now) - amount


class RecentIds:
    """The last ``size`` publish ids of one client, oldest forgotten first, each with what
    its publish waits for (the outbox's commit of its readings), when it waits for anything:
    a resend of the id gets the same answer as the original."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: OrderedDict[str, _AckWhenStored | None] = OrderedDict()

    def __contains__(self, id: str) -> bool:
        return id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, id: str) -> _AckWhenStored | None:
        """What the publish ``id`` waits for; None when nothing (or not a recent id)."""
        return self._ids.get(id)

    def discard(self, id: str, pending: _AckWhenStored | None = None) -> None:
        """Forget ``id``; with ``pending``, only while it is still what ``id`` waits for (a
        resend taken meanwhile is not forgotten)."""
        if pending is None or self._ids.get(id) is pending:
            self._ids.pop(id, None)

    def add(self, id: str, pending: _AckWhenStored | None = None) -> None:
        self._ids[id] = pending
        self._ids.move_to_end(id)
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)


@attrs.frozen
class _Command:
    """A ``command`` frame for the answering task (counted apart from the reader's answers)."""

    frame: str


@attrs.frozen
class _AckWhenStored:
    """Acknowledge publish ``id`` once the outbox committed hub positions ``first`` (exclusive)
    .. ``last``; or answer ``not-stored``."""

    id: str
    first: int
    last: int
    watermark: Watermark


class _Closing(Exception):
    """Ends a connection's tasks with a closing code for the client."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class DevicePlane:
    """The wss server (a supervisor ``Part``) and the router's ``DeviceTargets``. ``port`` is
    the bound port once started."""

    def __init__(
        self,
        section: DevicePlaneSection,
        hub: Hub,
        *,
        ssl_context_factory: Callable[
            [DevicePlaneSection], ssl.SSLContext | None
        ] = server_ssl_context,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        wall_clock: Callable[[], float] = time.time,
        local_endpoint_dir: Path | None = None,
        watermark: Callable[[], Watermark | None] = lambda: None,
        commands: Callable[[], CommandSink | None] = lambda: None,
    ) -> None:
        self.section = section
        self.watermark = watermark
        """The outbox's commit watermark, when there is one: publishes are acknowledged
        once committed (else as soon as the hub took them)."""
        self.commands = commands
        """The command router, when there is one: told of every accepted connection (to
        deliver what is pending) and of every ``ack``; without one, every ack is unmatched."""
        self.hub = hub
        self._ssl_context_factory = ssl_context_factory
        self._ssl_context: ssl.SSLContext | None = None
        self.local_token = generate_token() if section.local_access else None
        """Accepted from this machine only (``tail``); fresh at each start."""
        self._local_token_sha256 = hash_token(self.local_token) if self.local_token else None
        # One store for the life of the server: a reload builds a new Authenticator, and the
        # page's tokens must outlive that.
        self._viewer_tokens = ViewerTokens(trio.current_time)
        self._authenticator = self._new_authenticator(section)
        self._local_endpoint_dir = local_endpoint_dir
        self.local_endpoint_file: Path | None = None
        self.shutdown_timeout = shutdown_timeout
        self._wall_clock = wall_clock
        self.port: int | None = None
        self._listening = False
        self._stopping = False
        self._connections: set[_Connection] = set()
        self._handshakes = 0  # accepted or being accepted: counts towards max_connections
        self._closed = trio.Event()  # set whenever an accepted connection has ended
        self.refused = 0
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.dropped = 0
        self.revoked = 0
        self.commands_sent = 0
        self.acks_unmatched = 0
        # Per client id, not per connection: a publish resent after a reconnect is a duplicate.
        self._recent_ids: dict[str, RecentIds] = {}

    def _new_authenticator(self, section: DevicePlaneSection) -> Authenticator:
        return Authenticator.from_section(
            section,
            local_token_sha256=self._local_token_sha256,
            viewer_tokens=self._viewer_tokens,
        )

    def recent_ids(self, client_id: str) -> RecentIds:
        """The dedupe window of ``client_id`` (created on first use)."""
        recent = self._recent_ids.get(client_id)
        if recent is None:
            recent = self._recent_ids[client_id] = RecentIds(self.section.dedupe_window)
        return recent

    # ---- the Part protocol ---------------------------------------------------------------------

    def condition(self) -> Condition:
        if self._listening:
            return Condition(State.UP)
        if self._stopping:
            return Condition(State.DOWN, "stopped")
        return Condition(State.STARTING)

    def statistics(self) -> DevicePlaneStatistics:
        return DevicePlaneStatistics(
            listening=self._listening,
            port=self.port,
            connections=len(self._connections),
            refused=self.refused,
            messages_in=self.messages_in,
            messages_out=self.messages_out,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            dropped=self.dropped + sum(c.dropped() for c in self._connections),
            revoked=self.revoked,
            clients=tuple(c.statistics() for c in self._connections),
            commands_sent=self.commands_sent,
            acks_unmatched=self.acks_unmatched,
        )

    # ---- commands (DeviceTargets) and viewer tokens --------------------------------------------

    def known(self, client_id: str) -> bool:
        """Whether ``client_id`` is a configured client now (never ``local`` nor
        ``status-page``, which take no commands)."""
        return client_id not in RESERVED_CLIENTS and any(
            c.id == client_id for c in self.section.clients
        )

    def connected(self, client_id: str) -> bool:
        """Whether at least one connection of ``client_id`` is open (and not closing)."""
        return any(self._open_connections(client_id))

    async def send_command(self, client_id: str, request: CommandRequest) -> bool:
        """Queue a ``command`` frame to every open connection of ``client_id``, behind the
        answers each already has waiting. Waits while a connection has
        ``COMMAND_BYTES_QUEUED`` of commands unsent, until its client takes some, and at most
        ``send_timeout``: a connection that took none meanwhile is closed (1013) and does not
        count. Only the router's delivery task for ``client_id`` calls this, so the wait
        holds up no other client. True when at least one connection took it."""
        await trio.lowlevel.checkpoint_if_cancelled()
        frame = command_frame(request.id, request.name, request.args, request.expires)
        taken = 0
        for connection in list(self._open_connections(client_id)):
            if await connection.offer_command(frame):
                taken += 1
        self.commands_sent += taken
        if taken:
            log.info(
                "device %s: command %s (%s) queued for %d connection%s",
                client_id,
                request.id,
                request.name,
                taken,
                "" if taken == 1 else "s",
            )
        # Queued is queued: a cancellation now must not tell the caller otherwise.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return taken > 0

    def _open_connections(self, client_id: str) -> Iterator[_Connection]:
        if client_id in RESERVED_CLIENTS:
            return
        for connection in self._connections:
            if connection.identity.client_id == client_id and not connection.closing:
                yield connection

    def viewer_token(
        self, origin: str | None, ttl: float = DEFAULT_VIEWER_TTL, *, owner: str | None = None
    ) -> str:
        """A fresh token for the status page (``bearer.<token>`` subprotocol offer): client
        ``status-page``, subscribe ``#``, publish nothing, accepted for handshakes for ``ttl``
        seconds (connections it opened stay open after); with ``origin``, only from a page of
        that origin. At most ``MAX_VIEWER_TOKENS`` are kept, the oldest forgotten. Raises
        ``ValueError`` for an origin that is not ``scheme://host[:port]``, or ``ttl`` <= 0."""
        token = self._viewer_tokens.issue(origin, ttl, owner=owner)
        log.debug("device plane: viewer token issued for %s, %gs", origin or "any origin", ttl)
        return token

    def revoke_viewers(self, owners: Collection[str]) -> None:
        """Forget the viewer tokens of API users not in ``owners`` (a reload removed them)
        and close those users' status-page connections (1008)."""
        self._viewer_tokens.revoke(owners)
        for connection in list(self._connections):
            identity = connection.identity
            if (
                identity.client_id == STATUS_PAGE_CLIENT
                and identity.owner is not None
                and identity.owner not in owners
            ):
                connection.revoke(
                    f"API user {identity.owner!r} of this status page was removed by a reload"
                )

    def reconfigure(self, section: DevicePlaneSection) -> None:
        """Apply a reloaded section whose ``restart_key`` is unchanged, without dropping
        connections: clients, origins and limits take effect at once; a client that was
        removed (or whose token changed) is closed with 1008, as is one whose open
        subscriptions its new ACL no longer allows; the certificate and key are read again."""
        if self._ssl_context is not None:
            self._reload_certificate(section)
        self.section = section
        self._authenticator = self._new_authenticator(section)
        for connection in list(self._connections):
            identity = self._authenticator.refresh(connection.identity)
            if identity is None:
                connection.revoke(
                    f"client {connection.identity.client_id!r} was removed or its token "
                    "changed by a reload"
                )
            elif not all(identity.may_subscribe(p) for p in connection.patterns):
                connection.revoke(
                    f"client {identity.client_id!r} may no longer subscribe to all of "
                    f"{', '.join(connection.patterns)} after a reload: reconnect and subscribe "
                    "within its new patterns"
                )
            else:
                connection.reconfigure(identity, section)
        for recent in self._recent_ids.values():
            recent.size = section.dedupe_window

    def _reload_certificate(self, section: DevicePlaneSection) -> None:
        assert self._ssl_context is not None
        try:
            # A scratch context first: a pair that fails halfway would otherwise leave the
            # live one with the new certificate and no matching key.
            server_ssl_context(section)
            load_certificate(self._ssl_context, section)
        except (ssl.SSLError, OSError, ValueError) as e:
            log.error(
                "device plane: cannot load the certificate and key again (%s); new "
                "connections keep getting the previous certificate",
                getattr(e, "reason", None) or e,
            )
            return
        log.info("device plane: certificate and key read again for new connections")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then close every connection with 1001 and return."""
        ssl_context = self._ssl_context = self._ssl_context_factory(self.section)
        stop = trio.Event()
        async with trio.open_nursery() as outer:
            outer.start_soon(_set_when_cancelled, stop)
            # The connections live under a shield: the caller's cancellation must not tear
            # them down before each client was told 1001. ``stop`` starts that shutdown.
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as handlers:
                    listener = trio.CancelScope()
                    await handlers.start(self._listen, listener, ssl_context, handlers)
                    self._publish_local_endpoint(ssl_context)
                    task_status.started()
                    await stop.wait()
                    self._listening = False
                    self._withdraw_local_endpoint()
                    self._stopping = True
                    listener.cancel()
                    for connection in list(self._connections):
                        connection.shut_down()
                    # Once every accepted connection got its 1001 (or the time is up), what
                    # is left is cancelled: handshakes in progress, and connections closed
                    # before their HTTP request, which trio-websocket would otherwise keep
                    # until handshake_timeout.
                    with trio.move_on_after(self.shutdown_timeout):
                        while self._handshakes:
                            await self._closed.wait()
                            self._closed = trio.Event()
                    handlers.cancel_scope.cancel()

    def _publish_local_endpoint(self, ssl_context: ssl.SSLContext | None) -> None:
        """Tell ``edge-gateway tail`` on this machine where to connect, with the local token."""
        if self._local_endpoint_dir is None or self.local_token is None:
            return
        section = self.section
        host = section.listen
        address = _ip(host)
        if address is not None and address.is_unspecified:
            host = "::1" if address.version == 6 else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        cert = section.tls_cert_file
        endpoint = localendpoint.LocalEndpoint(
            url=f"{'ws' if ssl_context is None else 'wss'}://{host}:{self.port}",
            token=self.local_token,
            cert_file=str(cert.source) if cert is not None and ssl_context else None,
            pid=os.getpid(),
        )
        try:
            self.local_endpoint_file = localendpoint.write(endpoint, self._local_endpoint_dir)
        except (OSError, ValueError) as e:
            log.warning(
                "device plane: cannot write the local endpoint file (%s): 'edge-gateway tail' "
                "needs --url and a token on this machine",
                e,
            )

    def _withdraw_local_endpoint(self) -> None:
        if self.local_endpoint_file is not None:
            with contextlib.suppress(OSError):
                localendpoint.remove(self.local_endpoint_file, os.getpid())
            self.local_endpoint_file = None

    async def _listen(
        self,
        scope: trio.CancelScope,
        ssl_context: ssl.SSLContext | None,
        handlers: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        section = self.section
        with scope:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(
                    partial(
                        serve_websocket,
                        self._handle,
                        section.listen,
                        section.port,
                        ssl_context,
                        handler_nursery=cast(trio.Nursery, _EachConnectionAlone(handlers)),
                        max_message_size=section.max_message_size,
                        message_queue_size=MESSAGES_QUEUED,
                        connect_timeout=section.handshake_timeout,
                        disconnect_timeout=self.shutdown_timeout,
                    )
                )
                self.port = server.port
                self._listening = True
                scheme = "ws" if ssl_context is None else "wss"
                log.info("device plane listening on %s://%s:%d", scheme, section.listen, self.port)
                task_status.started()

    # ---- one connection ------------------------------------------------------------------------

    async def _handle(self, request: WebSocketRequest) -> None:
        try:
            await self._handshake(request)
        except ConnectionClosed:
            pass  # gone during the handshake (or its rejection): nothing was set up for it
        except Exception as e:
            # Ours, not trio-websocket's (_EachConnectionAlone's warning is for those): a
            # defect, which ends this connection only.
            log.critical(
                "device plane: defect while handling a connection, closed (please report this)",
                exc_info=e,
            )

    async def _handshake(self, request: WebSocketRequest) -> None:
        peer = _address(request.remote)
        if self._stopping:
            await request.reject(503, body=b"the gateway is shutting down\n")
            return
        if self._handshakes >= self.section.max_connections:
            self.refused += 1
            log.warning(
                "device plane refused %s: %d connections open, the maximum",
                peer,
                self._handshakes,
                extra=kv(peer=peer, status=503),
            )
            await request.reject(503, body=b"too many connections: try again later\n")
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        pairs = parse_qsl(urlsplit(request.path).query)
        query = dict(pairs)
        if sum(1 for key, _ in pairs if key == "token") > 1:
            self.refused += 1
            log.warning(
                "device plane refused %s: more than one token in the query string",
                peer,
                extra=kv(peer=peer, status=401),
            )
            await request.reject(401, extra_headers=[(b"WWW-Authenticate", b"Bearer")])
            return
        answer = self._authenticator.authenticate(
            headers,
            query,
            request.proposed_subprotocols,
            local_peer=_same_machine(request.local, request.remote),
        )
        if isinstance(answer, Refusal):
            self.refused += 1
            # ``reason`` never contains the token (deviceauth's promise).
            log.warning(
                "device plane refused %s: %s",
                peer,
                answer.reason,
                extra=kv(peer=peer, status=answer.status),
            )
            extra = [(b"WWW-Authenticate", b"Bearer")] if answer.status == 401 else None
            await request.reject(answer.status, extra_headers=extra)
            return
        self._handshakes += 1
        try:
            ws = await request.accept(subprotocol=answer.subprotocol)
            await self._serve(ws, answer, peer)
        finally:
            self._handshakes -= 1
            self._closed.set()

    async def _serve(self, ws: WebSocketConnection, identity: Identity, peer: str) -> None:
        connection = _Connection(self, ws, identity, peer)
        self._connections.add(connection)
        if self._stopping:
            connection.shut_down()
        log.info("device %s connected from %s", identity.client_id, peer, extra=kv(peer=peer))
        if not self._stopping:
            self._tell_connected(identity.client_id)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
            self.dropped += connection.dropped()
            connection.unsubscribe_all()
            log.info(
                "device %s disconnected (%d%s)",
                identity.client_id,
                connection.close_code,
                f": {connection.close_reason}" if connection.close_reason else "",
                extra=kv(peer=peer),
            )

    def _tell_connected(self, client_id: str) -> None:
        """Let the router deliver what waits for ``client_id`` (it calls ``send_command``)."""
        sink = self.commands()
        if sink is None or client_id in RESERVED_CLIENTS:
            return
        try:
            sink.device_connected(client_id)
        except Exception as e:
            # A defect in the router must not take the server and every connection with it;
            # the connection stays, its commands are delivered at its next connect.
            log.critical(
                "device %s: defect in the command router on connect (please report this)",
                client_id,
                exc_info=e,
            )


def _address(endpoint: Endpoint | str) -> str:
    if isinstance(endpoint, Endpoint):
        host = str(endpoint.address)
        return f"[{host}]:{endpoint.port}" if ":" in host else f"{host}:{endpoint.port}"
    return endpoint


def _fit(reason: str) -> str:
    """``reason`` cut at a word to fit a close frame (the log keeps the whole text)."""
    if len(reason.encode()) <= CLOSE_REASON_BYTES:
        return reason
    cut = reason.encode()[: CLOSE_REASON_BYTES - 3].decode(errors="ignore")
    return cut.rsplit(" ", 1)[0].rstrip(",:;") + "..."


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _same_machine(local: Endpoint | str, remote: Endpoint | str) -> bool:
    """Whether the peer is on this machine: a loopback address, or the very address it
    connected to (a client on the box that used the box's LAN address)."""
    if not isinstance(local, Endpoint) or not isinstance(remote, Endpoint):
        return False
    peer = _ip(str(remote.address))
    return peer is not None and (peer.is_loopback or peer == _ip(str(local.address)))


class _EachConnectionAlone:
    """Where trio-websocket runs each connection: a failure inside trio-websocket ends that
    connection only, not the server and every other client on it.

    (trio-websocket 0.12 raises out of a connection's reader task, for one, when a client
    pings after the gateway sent its close: python-trio/trio-websocket#184.) The connection's
    handler has been cancelled and has cleaned up by then, as for any other disconnect."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        self._nursery.start_soon(self._alone, fn, args)

    async def _alone(self, fn: Callable[..., Awaitable[object]], args: tuple[object, ...]) -> None:
        # trio's serve_listeners passes the connection's stream first.
        peer = _peer_of(args[0]) if args else "?"
        try:
            await fn(*args)
        except Exception as e:
            # Shortened: the error may quote what the client sent.
            log.warning(
                "a device connection from %s ended on an error inside trio-websocket (the "
                "other connections go on): %s",
                peer,
                "; ".join(f"{type(leaf).__name__}: {str(leaf)[:100]!r}" for leaf in _leaves(e)),
            )


def _peer_of(stream: object) -> str:
    transport = getattr(stream, "transport_stream", stream)  # under TLS
    try:
        host, port = transport.socket.getpeername()[:2]  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return "?"
    return f"{host}:{port}"


def _leaves(e: BaseException) -> Iterator[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        for inner in e.exceptions:
            yield from _leaves(inner)
    else:
        yield e


async def close_websocket(ws: WebSocketConnection, code: int, reason: str, wait: float) -> None:
    """Close ``ws`` with ``code`` (none for ``ABNORMAL``: the client sees 1006), waiting up to
    ``wait`` seconds for the client's answer, and let go of everything trio-websocket holds for it.

    Shielded: on shutdown the client must still get its 1001."""
    with trio.CancelScope(shield=True):
        if code != ABNORMAL:
            with trio.move_on_after(wait):
                await ws.aclose(code, _fit(reason) or None)
        # trio-websocket's aclose() returns at once, without closing the stream, when the
        # client started the close or the connection broke; its reader may then wait forever
        # to send the close answer to a client that stopped reading, holding the socket.
        # Closing the stream ends that. A reader parked on its full message queue (the
        # connection's own reader had stopped taking messages) is reached by neither, nor by
        # a failed close: closing the queue ends it. trio-websocket offers no public way to
        # do either.
        await trio.aclose_forcefully(ws._stream)
        await ws._recv_channel.aclose()


async def _set_when_cancelled(event: trio.Event) -> None:
    try:
        await trio.sleep_forever()
    finally:
        event.set()


class _Connection:
    """The reader and writer of one accepted WebSocket and the hub subscription they share."""

    def __init__(
        self, plane: DevicePlane, ws: WebSocketConnection, identity: Identity, peer: str
    ) -> None:
        self._plane = plane
        self._ws = ws
        self._sender = TextSender(ws)
        self._send_scopes: set[trio.CancelScope] = set()
        """Of the sends waiting for the socket (the writer's and the answers')."""
        self.identity = identity
        self.peer = peer
        self.patterns: tuple[str, ...] = ()
        self._subscription: Subscription | None = None
        self._snapshot: dict[str, Reading] = {}
        """Latest readings a ``subscribe`` with ``last`` asked for, sent before new ones."""
        self._changed = trio.Event()
        # The reader's answers and the router's commands go through a task of their own, in
        # order: the reader goes on reading while they are sent, and a command never cuts into
        # another frame. Each side has its own share of the channel, so a reader that is ahead
        # never makes a command look like an overload, nor the other way round.
        # The channel itself is unbounded: what bounds it are the reader's slots and the
        # commands' bytes.
        self._answers, self._answers_out = trio.open_memory_channel[
            str | _Closing | _AckWhenStored | _Command
        ](math.inf)
        self._reader_slots = trio.Semaphore(ANSWERS_QUEUED)
        self._command_bytes = 0  # of command frames queued, not yet taken by the sender
        self._room = trio.Event()  # set when the sender took a command, or the connection ends
        self._ending = False  # a task ended: the others are being cancelled
        self._closed_why = False  # a task ended with a _Closing: its code and reason stand
        self._scope = trio.CancelScope()
        self._dropped_before = 0  # by subscriptions replaced since
        self.close_code = 1000
        self.close_reason = ""
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.pings = 0
        self.errors = 0
        """Error frames sent to this client (invalid, forbidden, rate-limited messages)."""
        section = plane.section
        now = trio.current_time()
        self._message_bucket = TokenBucket(section.messages_per_second, section.messages_burst, now)
        self._byte_bucket = TokenBucket(section.bytes_per_second, section.bytes_burst, now)

    def shut_down(self) -> None:
        """Close with 1001 (the gateway stops)."""
        self.close_code, self.close_reason = GOING_AWAY, "the gateway is shutting down"
        self._end()

    def revoke(self, reason: str) -> None:
        """Close with 1008 (a reload took away what this connection was allowed)."""
        self._plane.revoked += 1
        self._close(POLICY_VIOLATION, reason)

    def _close(self, code: int, reason: str) -> None:
        log.warning("device %s: closing (%d): %s", self.identity.client_id, code, reason)
        self.close_code, self.close_reason = code, reason
        self._end()

    def _end(self) -> None:
        self._scope.cancel()
        self._wake_offers()
        # A send waiting on a client that reads nothing is not cancelled (see _send), but it
        # may not keep the connection (and a shutdown) for longer than a close may take.
        deadline = trio.current_time() + self._plane.shutdown_timeout
        for scope in self._send_scopes:
            scope.deadline = min(scope.deadline, deadline)

    def _wake_offers(self) -> None:
        """Let an ``offer_command`` waiting for room look again (room was made, or the
        connection is ending)."""
        self._room.set()
        self._room = trio.Event()

    @property
    def closing(self) -> bool:
        """Whether the connection is ending: nothing queued for it now would be sent."""
        return self._ending or self._scope.cancel_called

    async def offer_command(self, frame: str) -> bool:
        """Queue ``frame`` behind the answers waiting. While that would make more than
        ``COMMAND_BYTES_QUEUED`` of commands unsent, wait for the client to take some, up to
        ``send_timeout``. False when the connection is closing, or took no command for that
        long: the client is not reading, and it is closed (1013)."""
        # One command alone always fits, however large.
        with trio.move_on_after(self._plane.section.send_timeout):
            while not self.closing and not self._fits(frame):
                await self._room.wait()
        if self.closing:
            return False
        if not self._fits(frame):
            self._close(
                TRY_AGAIN_LATER,
                f"more than {COMMAND_BYTES_QUEUED // 1024} KiB of commands waiting to be sent "
                f"and none taken for {self._plane.section.send_timeout:g}s: read faster, then "
                "reconnect",
            )
            return False
        self._command_bytes += len(frame)
        self._answers.send_nowait(_Command(frame))
        return True

    def _fits(self, frame: str) -> bool:
        return not self._command_bytes or self._command_bytes + len(frame) <= COMMAND_BYTES_QUEUED

    def reconfigure(self, identity: Identity, section: DevicePlaneSection) -> None:
        """A reload changed the client's ACL or the limits: apply them from now on."""
        self.identity = identity
        for bucket, rate, capacity in (
            (self._message_bucket, section.messages_per_second, section.messages_burst),
            (self._byte_bucket, section.bytes_per_second, section.bytes_burst),
        ):
            bucket.rate, bucket.capacity = rate, capacity

    def dropped(self) -> int:
        current = self._subscription.dropped if self._subscription is not None else 0
        return self._dropped_before + current

    def statistics(self) -> ClientStatistics:
        sub = self._subscription
        return ClientStatistics(
            client_id=self.identity.client_id,
            peer=self.peer,
            patterns=self.patterns,
            queued=sub.statistics().buffered if sub is not None else 0,
            dropped=self.dropped(),
            messages_in=self.messages_in,
            messages_out=self.messages_out,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            pings=self.pings,
        )

    async def run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._until_done, self._read, nursery.cancel_scope)
                    nursery.start_soon(self._until_done, self._answer, nursery.cancel_scope)
                    nursery.start_soon(self._until_done, self._write, nursery.cancel_scope)
                    nursery.start_soon(self._until_done, self._keepalive, nursery.cancel_scope)
        finally:
            await close_websocket(
                self._ws, self.close_code, self.close_reason, self._plane.shutdown_timeout
            )

    async def _until_done(
        self, task: Callable[[], Awaitable[None]], scope: trio.CancelScope
    ) -> None:
        """Run the reader or the writer; when it ends, for whatever reason, so does the other."""
        try:
            await task()
        except _Closing as e:
            # Once a send was cut (1006), no close frame may follow: that code stays.
            if not (self._closed_why and self.close_code == ABNORMAL):
                self.close_code, self.close_reason = e.code, e.reason
            self._closed_why = True
        except ConnectionClosed as e:
            # The client left, cleanly or not (1006: without a close frame); nothing more to
            # say to it. Its code is what the log shows, unless the other task's _Closing
            # already said why (a send it cut short ends this task's send too).
            if e.reason is not None and not self._closed_why:
                self.close_code = e.reason.code
                self.close_reason = e.reason.reason or ""
        except Exception as e:
            # A defect while serving one client ends that connection only, never the server
            # and everyone else on it.
            log.critical(
                "device %s: defect while serving it, connection closed (please report this)",
                self.identity.client_id,
                exc_info=e,
            )
            self.close_code, self.close_reason = INTERNAL_ERROR, "internal error"
        finally:
            self._ending = True
            scope.cancel()
            self._wake_offers()

    async def _send(self, frame: str) -> None:
        # Most frames go out in one step, without a yield (gateway/fastsend.py).
        try:
            sent = self._sender.send_now(frame)
        except trio.BrokenResourceError:
            raise _Closing(ABNORMAL, "the connection broke while sending to it") from None
        if sent is not Sent.AT_ONCE:
            # A send cancelled halfway leaves a partial frame on the TLS stream, after which
            # not even a close frame can be sent: so a send is not cancelled from outside
            # (shutdown, the other task ending), only by its own deadline, which ends the
            # connection anyway.
            timeout = self._plane.section.send_timeout
            with trio.CancelScope(shield=True, deadline=trio.current_time() + timeout) as scope:
                self._send_scopes.add(scope)
                try:
                    if sent is Sent.NOT_TRIED:
                        await self._ws.send_message(frame)
                    else:
                        await sent.finish()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # Only from the rest of a frame sent in one step; send_message raises
                    # ConnectionClosed.
                    raise _Closing(ABNORMAL, "the connection broke while sending to it") from None
                finally:
                    self._send_scopes.discard(scope)
            if scope.cancelled_caught:
                # Half a frame went out: no close frame can follow it, the client sees 1006.
                if self._scope.cancel_called:  # cut short by _end
                    raise _Closing(ABNORMAL, f"{self.close_reason}{STILL_WAITING}")
                raise _Closing(ABNORMAL, f"a send took longer than {timeout:g}s: read faster")
        self.messages_out += 1
        self._plane.messages_out += 1
        # Frames are ASCII (JSON with ensure_ascii), so characters are bytes.
        self.bytes_out += len(frame)
        self._plane.bytes_out += len(frame)
        await trio.lowlevel.checkpoint_if_cancelled()

    async def _keepalive(self) -> None:
        """Ping every ``ping_interval``; no pong within ``ping_timeout`` ends the connection."""
        # Unlike ``_send``, not shielded: ``ping`` sends and then waits for the pong in one
        # call. The ping frame is a few bytes; its send only blocks on a client that reads
        # nothing, and that connection is ended (the writer's send timeout) anyway.
        section = self._plane.section
        while True:
            await trio.sleep(section.ping_interval)
            with trio.move_on_after(section.ping_timeout) as scope:
                await self._ws.ping()
            if scope.cancelled_caught:
                raise _Closing(
                    INTERNAL_ERROR,
                    f"no pong within {section.ping_timeout:g}s of a ping: answer pings",
                )
            self.pings += 1

    # ---- reader --------------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            data = await self._ws.get_message()
            size = len(data) if isinstance(data, bytes) else len(data.encode())
            self.messages_in += 1
            self._plane.messages_in += 1
            self.bytes_in += size
            self._plane.bytes_in += size
            if isinstance(data, bytes):
                raise _Closing(UNSUPPORTED_DATA, "binary frames are not supported: send JSON text")
            try:
                try:
                    message = parse_client_message(data, now=self._plane._wall_clock())
                except ProtocolError:
                    self._take_tokens(size)  # a bad message costs as much as any
                    raise
                # An ack of a command the gateway sent is not charged: a device answering a
                # backlog of commands at once, or after a burst of its own, must not be
                # refused (and then sent them all again on its next connection). Parsing
                # before charging costs little more: messages refused as rate-limited count
                # towards max_errors.
                if isinstance(message, Ack) and self._acked(message):
                    continue
                self._take_tokens(size)
                await self._dispatch(message)
            except ProtocolError as e:
                await self._refuse(e)

    def _take_tokens(self, size: int) -> None:
        """Charge a message to the rate limits; over them it is dropped, unread."""
        now = trio.current_time()
        if self._message_bucket.can_take(1, now) and self._byte_bucket.can_take(size, now):
            self._message_bucket.take(1, now)
            self._byte_bucket.take(size, now)
            return
        section = self._plane.section
        raise ProtocolError(
            ErrorCode.RATE_LIMITED,
            f"more than {section.messages_per_second:g} messages or {section.bytes_per_second} "
            f"bytes per second (bursts up to {section.burst:g}s of either): this message was "
            "dropped; send less often",
        )

    async def _answer(self) -> None:
        """Send the reader's answers and the commands in order; a ``_Closing`` after them
        ends the connection."""
        async for answer in self._answers_out:
            if isinstance(answer, _Command):
                self._command_bytes -= len(answer.frame)
                self._wake_offers()
                await self._send(answer.frame)
                continue
            self._reader_slots.release()
            if isinstance(answer, _Closing):
                raise answer
            if isinstance(answer, _AckWhenStored):
                answer = await self._when_stored(answer)
            await self._send(answer)

    async def _queue(self, answer: str | _Closing | _AckWhenStored) -> None:
        """Queue one of the reader's answers; waits while ``ANSWERS_QUEUED`` are unsent."""
        await self._reader_slots.acquire()
        self._answers.send_nowait(answer)

    async def _when_stored(self, pending: _AckWhenStored) -> str:
        timeout = self._plane.section.send_timeout
        # Not stored: a resend with the same id must be taken, not acknowledged as a duplicate.
        recent = self._plane.recent_ids(self.identity.client_id)
        with trio.move_on_after(timeout):
            if await pending.watermark.reached(pending.first, pending.last):
                return ack_frame(pending.id)
            recent.discard(pending.id, pending)
            return ProtocolError(
                ErrorCode.NOT_STORED,
                "the gateway could not store these readings (the outbox is full, or its disk "
                "too slow): publish them again later, with the same id",
                pending.id,
            ).frame()
        recent.discard(pending.id, pending)
        return ProtocolError(
            ErrorCode.NOT_STORED,
            f"these readings were not stored within {timeout:g}s (the outbox is not "
            "keeping up or restarting): publish them again with the same id",
            pending.id,
        ).frame()

    async def _refuse(self, error: ProtocolError) -> None:
        """Answer with the error frame; the ``max_errors``-th one also ends the connection
        (1008), once that frame has been sent."""
        await self._queue(error.frame())
        self.errors += 1
        limit = self._plane.section.max_errors
        if self.errors >= limit:
            await self._queue(
                _Closing(
                    POLICY_VIOLATION,
                    f"{limit} invalid, forbidden or rate-limited messages: fix the client, "
                    "then reconnect",
                )
            )
            await trio.sleep_forever()  # read no more; the answering task ends it

    async def _dispatch(self, message: Subscribe | Unsubscribe | Publish | Ack | Ping) -> None:
        """Act on ``message`` (an ``Ack`` here matched no command)."""
        identity = self.identity
        if isinstance(message, Subscribe):
            denied = [p for p in message.topics if not identity.may_subscribe(p)]
            if denied:
                raise ProtocolError(
                    ErrorCode.FORBIDDEN,
                    f"topics: {', '.join(repr(p) for p in denied)} not within what client "
                    f"{identity.client_id!r} may subscribe to "
                    f"({', '.join(identity.subscribe) or 'nothing'}): nothing was subscribed; "
                    "ask for the pattern to be added to the client's config",
                )
            patterns = tuple(dict.fromkeys(self.patterns + message.topics))
            if len(patterns) > MAX_TOPICS:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE,
                    f"topics: {len(patterns)} patterns in all on this connection would be too "
                    f"many: at most {MAX_TOPICS} at once; nothing was subscribed; unsubscribe "
                    "some first, or use a wider pattern",
                )
            # The snapshot and the new subscription are taken with no checkpoint between,
            # so every later reading comes through the subscription, after the snapshot.
            # Replaced even when the patterns are the same: closing the old subscription is
            # what wakes a writer waiting on it to send the snapshot.
            if message.last:
                # By topic: repeated ones while the client reads nothing cannot pile up.
                self._snapshot.update((r.topic, r) for r in self._plane.hub.latest(message.topics))
            self._resubscribe(patterns, renew=message.last)
        elif isinstance(message, Unsubscribe):
            self._resubscribe(tuple(p for p in self.patterns if p not in message.topics))
        elif isinstance(message, Publish):
            refused = [i for i in message.readings if not identity.may_publish(i.point)]
            if refused:
                raise ProtocolError(
                    ErrorCode.FORBIDDEN,
                    f"readings: point(s) {', '.join(repr(i.point) for i in refused)} not within "
                    f"what client {identity.client_id!r} may publish "
                    f"({', '.join(identity.publish) or 'nothing'}): nothing was taken; "
                    "ask for the point to be added to the client's config",
                    message.id,
                )
            recent = self._plane.recent_ids(identity.client_id)
            # A duplicate (its ack was lost, say) is not taken twice. It gets the answer the
            # original gets: an ack once its readings were committed, not-stored if they
            # were not (and then, forgotten, the id is taken again at the next resend).
            if message.id in recent:
                original = recent.get(message.id)
                await self._queue(ack_frame(message.id) if original is None else original)
                return
            hub = self._plane.hub
            first = hub.published
            now = self._plane._wall_clock()
            for item in message.readings:
                hub.publish(published_reading(identity.client_id, item, now))
            watermark = self._plane.watermark()
            if watermark is None:
                recent.add(message.id)
                await self._queue(ack_frame(message.id))
            else:  # acknowledged once committed, by the answering task: the reader goes on
                pending = _AckWhenStored(message.id, first, hub.published, watermark)
                recent.add(message.id, pending)
                await self._queue(pending)
        elif isinstance(message, Ping):
            await self._queue(pong_frame(message.id))
        else:
            await self._unmatched_ack(message)

    def _acked(self, ack: Ack) -> bool:
        """Hand ``ack`` to the command router; whether it answered a command waiting for it."""
        client_id = self.identity.client_id
        sink = self._plane.commands()
        return (
            sink is not None
            and client_id not in RESERVED_CLIENTS
            and sink.device_acked(client_id, ack.command_id, ack.ok, ack.result, ack.error)
        )

    async def _unmatched_ack(self, ack: Ack) -> None:
        client_id = self.identity.client_id
        self._plane.acks_unmatched += 1
        log.warning(
            "device %s: ack of command %s, which is not waiting for one from it",
            client_id,
            ack.command_id,
        )
        # Answered, but not counted towards max_errors: an ack that crosses its command's
        # expiry, or a second one for a command delivered again, is a race, not a broken client.
        await self._queue(
            ProtocolError(
                ErrorCode.UNKNOWN_COMMAND,
                f"command_id: {ack.command_id!r} is not a command of client {client_id!r} "
                "waiting for an ack (never sent to it, already answered, or expired): nothing "
                "was recorded; ack only command ids you received, once each",
                ack.command_id,
            ).frame()
        )

    def _resubscribe(self, patterns: tuple[str, ...], *, renew: bool = False) -> None:
        """Replace the hub subscription by one for ``patterns`` (the same ones kept once).

        No checkpoint between subscribing anew and closing the old one, so no reading is
        offered to both; the writer drains what the old one still holds before moving on."""
        patterns = tuple(dict.fromkeys(patterns))
        if patterns == self.patterns and not renew:
            return
        old = self._subscription
        section = self._plane.section
        self._subscription = (
            self._plane.hub.subscribe(
                f"device {self.identity.client_id} {self.peer}",
                patterns,
                maxlen=section.queue,
                policy=OverflowPolicy(section.overflow),
            )
            if patterns
            else None
        )
        self.patterns = patterns
        if old is not None:
            self._dropped_before += old.dropped
            old.close()
        self._wake_writer()

    def _wake_writer(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def unsubscribe_all(self) -> None:
        if self._subscription is not None:
            self._dropped_before += self._subscription.dropped
            self._subscription.close()
            self._subscription = None

    # ---- writer --------------------------------------------------------------------------------

    async def _write(self) -> None:
        # Subscriptions being replaced leave the old one to drain: follow whichever is current.
        draining: Subscription | None = None
        while True:
            if self._snapshot and draining is None:
                snapshot, self._snapshot = self._snapshot, {}
                await self._send(readings_frame(list(snapshot.values())))
                continue
            sub = draining or self._subscription
            if sub is None:
                await self._changed.wait()
                continue
            try:
                delivery = await sub.receive()
            except trio.EndOfChannel:
                draining = None
                if sub is self._subscription:  # closed under us: wait for a new one
                    await self._changed.wait()
                continue
            except SubscriberOverflow:
                raise _Closing(
                    TRY_AGAIN_LATER,
                    f"more than {sub.maxlen} readings waiting: read faster, then reconnect",
                ) from None
            if sub is not self._subscription:
                draining = sub
            if delivery.dropped:
                await self._send(gap_frame(delivery.dropped))
            if delivery.readings:
                await self._send(readings_frame(delivery.readings))
                # With a frame_interval, what comes meanwhile waits for the next frame: a
                # client gets at most one readings frame per frame_interval. Without one
                # (the default) readings still share frames once they come faster than the
                # client is sent to; a timer per frame would cost more CPU than the frames
                # it saves (bench fanout).
                interval = self._plane.section.frame_interval
                if interval > 0:
                    await trio.sleep(interval)
