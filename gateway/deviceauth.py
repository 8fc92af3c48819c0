"""The device plane's configuration, tokens, and who may connect and do what.

Pure code, no sockets: the ``[device_plane]`` config section and its checks, token hashing
(``hash-token``), the handshake decision (``Authenticator.authenticate``: an ``Identity`` or a
``Refusal``) and the ACL (``Identity.may_subscribe`` / ``may_publish``). The wss server feeds
it the handshake's headers, query and offered subprotocols and acts on the answer.
``ViewerTokens`` holds the status page's short-lived tokens (on a clock the server passes in).

Depends only on ``gateway.core`` (topics, config value types); ``gateway.config`` imports the
section from here, as it does the drivers' sections.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import math
import re
import secrets
import ssl
import sys
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Literal, TextIO

import attrs

from gateway.core.configtypes import Duration, Name, Secret, Size, format_duration
from gateway.core.servertls import (
    host_port,
    ip,
    plain_or_tls_problems,
    server_context,
    tls_problems,
)
from gateway.core.topics import (
    DEVICE_NAMESPACE,
    device_topic,
    matches,
    name_problem,
    pattern_problem,
)

SUBPROTOCOL = "edge-gateway.v1"
"""The WebSocket subprotocol the server selects when a client offers it."""

BEARER_PREFIX = "bearer."
"""A ``Sec-WebSocket-Protocol`` offer ``bearer.<token>`` carries a token (for browsers)."""

MAX_TOKEN_LENGTH = 4096
"""Longer presented tokens are refused unhashed; generated ones have 43 characters."""

MIN_TOKEN_LENGTH = 20
"""``hash-token`` warns below this: a short token can be guessed from a leaked hash."""

MAX_MESSAGE_SIZE = 16 * 1024 * 1024
"""The largest ``max_message_size`` accepted: memory per connection stays bounded."""

LOCAL_CLIENT = "local"
"""The client id of a connection with the local token (``local_access``): reserved."""

STATUS_PAGE_CLIENT = "status-page"
"""The client id of a connection with a viewer token (the status page): reserved."""

RESERVED_CLIENTS = frozenset({LOCAL_CLIENT, STATUS_PAGE_CLIENT})
"""Client ids no ``[[device_plane.clients]]`` table may take; never a command target."""

MAX_VIEWER_TOKENS = 100
"""Viewer tokens kept at once; issuing another forgets the oldest."""

DEFAULT_VIEWER_TTL = 300.0
"""Seconds a viewer token is accepted for handshakes."""

Overflow = Literal["drop-oldest", "disconnect"]
Via = Literal["header", "subprotocol", "query"]

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_ORIGIN = re.compile(r"(https?)://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::(\d{1,5}))?")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


# ---- config ---------------------------------------------------------------------------------


@attrs.frozen
class DeviceClient:
    """One ``[[device_plane.clients]]`` table: a device or HMI and what it may do."""

    id: Name
    token_sha256: str
    """SHA-256 of the client's token, 64 hex digits (``edge-gateway hash-token``)."""
    subscribe: tuple[str, ...] = ()
    """Topic patterns (``+``, ``#``) the client may subscribe within."""
    publish: tuple[str, ...] = ()
    """Point names (or ``+`` / ``#`` for any) the client may publish as
    ``devices/<id>/<point>``."""

    def check(self) -> Iterator[tuple[str, str]]:
        if not _HEX64.fullmatch(self.token_sha256):
            # Never echo the value: a token pasted here by mistake would end up in the journal.
            what = (
                "looks like a token, not its hash"
                if len(self.token_sha256) != 64
                else "is not hexadecimal"
            )
            yield (
                "token_sha256",
                f"{what}: write the 64 hex digits that 'edge-gateway hash-token' prints "
                "(the gateway stores only the hash; the device keeps the token)",
            )
        for k, pattern in enumerate(self.subscribe):
            problem = pattern_problem(pattern)
            if problem:
                yield f"subscribe[{k}]", f"{problem}: write a topic pattern such as 'line-1/+/#'"
        for k, point in enumerate(self.publish):
            problem = publish_pattern_problem(point)
            if problem:
                yield f"publish[{k}]", problem


def publish_pattern_problem(point: str) -> str | None:
    """Why ``point`` is not a publish pattern (a point name, ``+`` or ``#``), or None."""
    if point in ("+", "#"):
        return None
    if "/" in point:
        return (
            f"{point!r}: give a point name (or '+' for any point), not a topic: the client "
            f"publishes under {DEVICE_NAMESPACE}/<its id>/ by itself"
        )
    problem = name_problem(point)
    return f"{problem} (or '+' for any point)" if problem else None


@attrs.frozen
class DevicePlaneSection:
    """``[device_plane]``: the wss server for devices and HMIs. Absent: no server."""

    listen: str = "0.0.0.0"
    port: int = 8443
    tls_cert_file: Secret | None = None
    tls_key_file: Secret | None = None
    client_ca_file: Secret | None = None
    plain: bool = False
    handshake_timeout: Duration = Duration(10.0)
    max_connections: int = 100
    max_message_size: Size = Size(64 * 1024)
    ping_interval: Duration = Duration(20.0)
    ping_timeout: Duration = Duration(20.0)
    send_timeout: Duration = Duration(10.0)
    frame_interval: Duration = Duration(0)
    """0: each delivery goes at once (what waited while the client was being sent to goes
    together). Above 0: at most one readings frame per client per this time; what comes
    meanwhile joins the next frame, and a reading waits at most this long."""
    queue: int = 1000
    """Readings queued per client before ``overflow`` applies."""
    overflow: Overflow = "drop-oldest"
    messages_per_second: float = 50.0
    bytes_per_second: Size = Size(256 * 1024)
    burst: Duration = Duration(2.0)
    """Token-bucket depth as time's worth of each rate: ``rate * burst`` may come at once."""
    max_errors: int = 10
    dedupe_window: int = 1000
    origins: tuple[str, ...] = ()
    local_access: bool = True
    """Write a fresh loopback-only token to the runtime directory at each start, so that
    ``edge-gateway tail`` on this machine needs no arguments."""
    clients: tuple[DeviceClient, ...] = ()

    def restart_key(self) -> tuple[object, ...]:
        """What a reload can apply only by restarting the server (dropping its connections).
        Everything else (clients, origins, limits, the certificate and key) applies live."""
        ca = self.client_ca_file.reveal() if self.client_ca_file else None
        return (
            self.listen,
            self.port,
            self.plain,
            ca,
            self.handshake_timeout,
            self.max_message_size,
            self.local_access,
        )

    @property
    def messages_burst(self) -> float:
        """Capacity of the per-connection message bucket."""
        return self.messages_per_second * self.burst

    @property
    def bytes_burst(self) -> float:
        """Capacity of the per-connection byte bucket (at least ``max_message_size``)."""
        return self.bytes_per_second * self.burst

    def check(self) -> Iterator[tuple[str, str]]:
        """``(path, message)`` below ``device_plane`` for every problem."""
        yield from self._check_listen()
        yield from self._check_tls()
        if not 1 <= self.port <= 65535:
            yield "port", f"{self.port} is not a TCP port: give 1 .. 65535"
        for key in ("handshake_timeout", "ping_interval", "ping_timeout", "send_timeout", "burst"):
            if getattr(self, key) <= 0:
                yield key, "must be greater than 0"
        if not 0 <= self.frame_interval <= 1:
            yield "frame_interval", "must be from 0 to 1s (readings would wait that long)"
        for key, low in (
            ("max_connections", 1),
            ("queue", 1),
            ("max_errors", 1),
            ("dedupe_window", 1),
        ):
            if getattr(self, key) < low:
                yield key, f"must be at least {low}"
        size_ok = 1024 <= self.max_message_size <= MAX_MESSAGE_SIZE
        if not size_ok:
            yield "max_message_size", "must be from 1KiB to 16MiB"
        if self.messages_per_second <= 0:
            yield "messages_per_second", "must be greater than 0"
        elif self.burst > 0 and self.messages_burst < 1:
            yield (
                "burst",
                f"messages_per_second * burst is {self.messages_burst:g}: no message could "
                "ever pass; raise burst or messages_per_second",
            )
        if self.bytes_per_second <= 0:
            yield "bytes_per_second", "must be greater than 0"
        elif size_ok and self.burst > 0 and self.bytes_burst < self.max_message_size:
            yield (
                "burst",
                f"bytes_per_second * burst ({int(self.bytes_burst)} bytes) is below "
                f"max_message_size ({self.max_message_size} bytes): a message of the largest "
                "allowed size could never pass; raise burst or bytes_per_second",
            )
        for i, origin in enumerate(self.origins):
            problem = origin_problem(origin)
            if problem:
                yield f"origins[{i}]", problem
        yield from self._check_clients()

    def _check_listen(self) -> Iterator[tuple[str, str]]:
        address = ip(self.listen)
        if address is None and not _HOSTNAME.fullmatch(self.listen):
            yield (
                "listen",
                f"{self.listen!r} is not an IP address or host name: write e.g. "
                '"0.0.0.0" (every IPv4 interface) or "192.168.10.5"',
            )
            return
        if self.plain and (address is None or not address.is_loopback):
            yield (
                "plain",
                f"plain ws:// is allowed only on a loopback address, and listen is "
                f"{self.listen!r}: tokens and readings would cross the network "
                'unencrypted; set listen = "127.0.0.1" (or "::1"), or serve wss: '
                "set tls_cert_file and tls_key_file and remove plain",
            )
        yield from plain_or_tls_problems(
            self,
            plain=self.plain,
            scheme="ws",
            missing=(
                "missing: wss needs a certificate and its key (or, for a test on this machine "
                'only, plain = true with listen = "127.0.0.1")'
            ),
        )

    def _check_tls(self) -> Iterator[tuple[str, str]]:
        if not self.plain:
            yield from tls_problems(self, ca_signs="the devices' client certificates")

    def _check_clients(self) -> Iterator[tuple[str, str]]:
        ids: dict[str, int] = {}
        hashes: dict[str, int] = {}
        for i, client in enumerate(self.clients):
            for path, message in client.check():
                yield f"clients[{i}].{path}", message
            if client.id == LOCAL_CLIENT:
                yield (
                    f"clients[{i}].id",
                    f"{LOCAL_CLIENT!r} is reserved for 'edge-gateway tail' on this machine "
                    "(local_access): choose another id",
                )
            if client.id == STATUS_PAGE_CLIENT:
                yield (
                    f"clients[{i}].id",
                    f"{STATUS_PAGE_CLIENT!r} is reserved for the status page's live view "
                    "(its short-lived viewer tokens): choose another id",
                )
            if client.id in ids:
                yield (
                    f"clients[{i}].id",
                    f"duplicate id {client.id!r} (clients[{ids[client.id]}] has it too): "
                    "ids must be unique",
                )
            else:
                ids[client.id] = i
            digest = client.token_sha256.lower()
            if digest in hashes:
                yield (
                    f"clients[{i}].token_sha256",
                    f"the same token hash as clients[{hashes[digest]}]: give every client "
                    "its own token ('edge-gateway hash-token --new')",
                )
            else:
                hashes[digest] = i

    def describe(self) -> str:
        """One line for ``check-config``."""
        scheme = "ws" if self.plain else "wss"
        mtls = ", client certificates required" if self.client_ca_file else ""
        n = len(self.clients)
        return (
            f"device plane: {scheme}://{host_port(self.listen, self.port)}{mtls}, "
            f"{n} client{'' if n == 1 else 's'}, at most {self.max_connections} connections, "
            f"ping every {format_duration(self.ping_interval)}"
        )


def server_ssl_context(section: DevicePlaneSection) -> ssl.SSLContext | None:
    """The TLS context of the server (``gateway.core.servertls``), or None for plain
    ``ws://``. Raises ``ssl.SSLError`` / ``OSError``, ``EncryptedKey``, ``ClientCaError``."""
    if section.plain:
        return None
    if section.tls_cert_file is None or section.tls_key_file is None:
        raise ValueError("device_plane: wss needs tls_cert_file and tls_key_file (or plain)")
    return server_context(section)


def normalize_origin(origin: str) -> str:
    """An origin as browsers send it: lower case, without the scheme's default port."""
    origin = origin.strip().lower()
    m = _ORIGIN.fullmatch(origin)
    if m and m.group(3) == _DEFAULT_PORTS[m.group(1)]:
        return f"{m.group(1)}://{m.group(2)}"
    return origin


def origin_problem(origin: str) -> str | None:
    """Why ``origin`` cannot be in the allow-list, or None."""
    if origin.strip().lower() == "null":
        return (
            "'null' is the origin of sandboxed pages and local files, which any site can "
            "create: list the real origins, e.g. 'https://hmi.plant.local'"
        )
    m = _ORIGIN.fullmatch(origin.strip().lower())
    if not m or (m.group(3) is not None and not 1 <= int(m.group(3)) <= 65535):
        return (
            f"{origin!r} is not an origin: write scheme://host[:port] without a path or a "
            "trailing slash, e.g. 'https://hmi.plant.local' or 'http://10.0.0.7:8080'"
        )
    return None


# ---- tokens ---------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    """The SHA-256 of ``token`` (UTF-8) as 64 lower-case hex digits, as stored in the config.

    Unsalted on purpose: tokens are random (``generate_token``), not passwords, so a salt or
    a slow hash adds nothing, and an unsalted hash lets the handshake find the client."""
    return hashlib.sha256(token.encode()).hexdigest()


def generate_token() -> str:
    """A new random token: 32 bytes, URL-safe base64 (43 characters; fits a header, a
    subprotocol offer and a query string without escaping)."""
    return secrets.token_urlsafe(32)


def token_problem(token: str) -> str | None:
    """Why ``token`` could not be presented as a bearer token, or None."""
    if not token:
        return "the token is empty"
    if len(token) > MAX_TOKEN_LENGTH:
        return f"the token is longer than {MAX_TOKEN_LENGTH} characters"
    if not all("!" <= c <= "~" for c in token):
        return (
            "the token has spaces, control or non-ASCII characters, which an Authorization "
            "header cannot carry: use 'hash-token --new'"
        )
    return None


def hash_token_command(
    token: str | None,
    *,
    new: bool,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``edge-gateway hash-token``: print a token's hash, or (``--new``) a new token and its
    hash. The token comes from the argument or from one line on stdin (no echo on a
    terminal). Exit status 0, or 2 for an unusable token."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if new:
        if token is not None:
            print("hash-token: give either --new or a TOKEN, not both", file=stderr)
            return 2
        token = generate_token()
        print(f"token = {token}", file=stdout)
        print(f'token_sha256 = "{hash_token(token)}"', file=stdout)
        stdout.flush()  # before the hint on stderr, so a terminal shows them in order
        print(
            "Give the token to the device (it sends 'Authorization: Bearer <token>'); put the\n"
            "token_sha256 line in its [[device_plane.clients]] table. Only the hash is kept:\n"
            "the token cannot be shown again.",
            file=stderr,
        )
        return 0
    if token is None:
        token = getpass.getpass("token: ") if stdin.isatty() else stdin.readline()
        token = token.rstrip("\r\n")
    problem = token_problem(token)
    if problem:
        print(f"hash-token: {problem}", file=stderr)
        return 2
    if len(token) < MIN_TOKEN_LENGTH:
        print(
            f"hash-token: warning: a token of {len(token)} characters can be guessed from its "
            "hash; 'hash-token --new' makes a strong one",
            file=stderr,
        )
    print(hash_token(token), file=stdout)
    return 0


# ---- the handshake --------------------------------------------------------------------------


def pattern_within(inner: str, outer: str) -> bool:
    """True when every topic that pattern ``inner`` matches is matched by pattern ``outer``
    (both valid MQTT-style patterns, ``a/#`` also matching ``a``, as ``topics.matches``)."""
    return _within(inner.split("/"), outer.split("/"), top=True)


def _within(inner: list[str], outer: list[str], *, top: bool) -> bool:
    # Level by level over what is left of both; below the top an empty rest is a topic that
    # ended, which a trailing '#' also matches ('a/#' matches 'a').
    if outer and outer[0] == "#":
        return True
    if not inner:
        return not outer
    if inner[0] == "#":
        # Any rest (the empty one too, below the top): only '#', or at the top '+/#', which
        # matches every topic of one level or more, covers that.
        return top and outer == ["+", "#"]
    if not outer:
        return False
    if outer[0] != "+" and outer[0] != inner[0]:
        return False  # a literal never covers '+', nor another literal
    return _within(inner[1:], outer[1:], top=False)


@attrs.frozen
class Identity:
    """An authenticated client, with what it may do."""

    client_id: str
    subscribe: tuple[str, ...]
    publish: tuple[str, ...]
    via: Via
    """Where the token was found: ``Authorization`` header, subprotocol offer, query string."""
    subprotocol: str | None = None
    """What the server must select in its handshake answer (``SUBPROTOCOL`` when offered)."""
    token_sha256: str = attrs.field(default="", repr=False)
    owner: str | None = None
    """For the status page: the API user its viewer token was issued to."""

    def may_subscribe(self, pattern: str) -> bool:
        """Whether every topic ``pattern`` can match lies within one allowed pattern."""
        if pattern_problem(pattern):
            return False
        return any(pattern_within(pattern, allowed) for allowed in self.subscribe)

    def may_publish(self, point: str) -> bool:
        """Whether the client may publish readings of ``point`` (one topic level)."""
        if name_problem(point):
            return False
        return any(matches(allowed, point) for allowed in self.publish)

    def topic(self, point: str) -> str:
        """The topic of a reading this client publishes for ``point``."""
        return device_topic(self.client_id, point)


@attrs.frozen
class Refusal:
    """A handshake to reject: 401 (no or unknown token) or 403 (Origin not allowed).
    ``reason`` is safe to log: it never contains the token."""

    status: Literal[401, 403]
    reason: str


def _bearer(headers: Mapping[str, str]) -> str | Refusal | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return Refusal(401, "the Authorization header is not 'Bearer <token>'")
    return token.strip()


def _offered(subprotocols: Sequence[str]) -> str | Refusal | None:
    offers = [p for p in subprotocols if p.lower().startswith(BEARER_PREFIX)]
    if not offers:
        return None
    if len(offers) > 1:
        return Refusal(401, "more than one bearer.<token> subprotocol offered")
    if SUBPROTOCOL not in subprotocols:
        # The server must select an offered subprotocol (browsers fail the connection
        # otherwise), and selecting bearer.<token> would echo the token in the answer.
        return Refusal(401, f"a bearer.<token> subprotocol needs {SUBPROTOCOL!r} offered with it")
    return offers[0][len(BEARER_PREFIX) :]


@attrs.frozen
class ViewerGrant:
    """One viewer token as the gateway keeps it: its hash (never the token), the origin it
    was issued for, and when it stops being accepted (on the store's clock)."""

    digest: bytes = attrs.field(repr=False)
    origin: str | None
    """Normalized (``normalize_origin``); None: the usual Origin rule applies."""
    expires: float
    owner: str | None = None
    """Who asked for it (an API user): a reload that removes that user revokes it."""


class ViewerTokens:
    """The status page's short-lived tokens: client ``status-page``, subscribe ``#``, publish
    nothing. A browser cannot set headers on a WebSocket, so the page fetches a token from the
    API (``/api/v1/live``) and offers it as ``bearer.<token>``.

    A token is accepted for any number of handshakes until it expires (a page that reconnects
    fetches a new one anyway); connections it opened stay open after that. At most ``limit``
    are kept, the oldest forgotten first, expired ones included so that a late handshake is
    told "expired" rather than "unknown". The server keeps one store across reloads and hands
    it to every ``Authenticator`` it builds. ``clock`` gives the time in seconds (the server
    passes ``trio.current_time``)."""

    def __init__(self, clock: Callable[[], float], *, limit: int = MAX_VIEWER_TOKENS) -> None:
        self.clock = clock
        self._grants: deque[ViewerGrant] = deque(maxlen=limit)

    def __len__(self) -> int:
        return len(self._grants)

    def issue(
        self, origin: str | None, ttl: float = DEFAULT_VIEWER_TTL, *, owner: str | None = None
    ) -> str:
        """A fresh random token, accepted for ``ttl`` seconds from now; with ``origin``, only
        from a page of that origin (the status page's own). Raises ``ValueError`` for an
        origin that is not ``scheme://host[:port]`` or a ``ttl`` that is not above 0."""
        if not 0 < ttl < math.inf:
            raise ValueError(f"viewer token: ttl {ttl!r} must be a number of seconds above 0")
        if origin is not None:
            problem = origin_problem(origin)
            if problem:
                raise ValueError(f"viewer token: {problem}")
            origin = normalize_origin(origin)
        token = generate_token()
        digest = hashlib.sha256(token.encode()).digest()
        self._grants.append(ViewerGrant(digest, origin, self.clock() + ttl, owner))
        return token

    def revoke(self, owners: Collection[str]) -> None:
        """Forget every token whose owner is not in ``owners`` (tokens without one stay)."""
        kept = [g for g in self._grants if g.owner is None or g.owner in owners]
        self._grants.clear()
        self._grants.extend(kept)

    def find(self, digest: bytes) -> ViewerGrant | None:
        """The grant of the token whose SHA-256 is ``digest``, expired or not, or None."""
        # Every kept hash is compared, with no early exit (as for the configured clients).
        found = None
        for grant in self._grants:
            if hmac.compare_digest(digest, grant.digest) and found is None:
                found = grant
        return found

    def origins(self) -> frozenset[str]:
        """The origins tokens were issued for: handshakes from them get past the first Origin
        check, and then need a viewer token issued for that very origin."""
        return frozenset(g.origin for g in self._grants if g.origin is not None)


class Authenticator:
    """Decides each handshake from the configured clients and Origin allow-list.

    Built once per config (and again on reload); ``refresh`` tells whether an identity from
    the previous config still holds."""

    def __init__(
        self,
        clients: Sequence[DeviceClient],
        origins: Sequence[str],
        *,
        local_token_sha256: str | None = None,
        viewer_tokens: ViewerTokens | None = None,
    ) -> None:
        self._clients = tuple(clients)
        self._digests = tuple(bytes.fromhex(c.token_sha256) for c in self._clients)
        self._origins = frozenset(normalize_origin(o) for o in origins)
        self.local_token_sha256 = local_token_sha256
        """The hash of the local token (``local_access``): client ``local``, subscribe
        ``#``, publish nothing, accepted only from this machine."""
        self.viewer_tokens = viewer_tokens
        """The status page's tokens: client ``status-page``, subscribe ``#``, publish
        nothing, from the origin each was issued for, until it expires."""

    @classmethod
    def from_section(
        cls,
        section: DevicePlaneSection,
        *,
        local_token_sha256: str | None = None,
        viewer_tokens: ViewerTokens | None = None,
    ) -> Authenticator:
        return cls(
            section.clients,
            section.origins,
            local_token_sha256=local_token_sha256,
            viewer_tokens=viewer_tokens,
        )

    def authenticate(
        self,
        headers: Mapping[str, str],
        query: Mapping[str, str],
        subprotocols: Sequence[str],
        *,
        local_peer: bool = False,
    ) -> Identity | Refusal:
        """The handshake's answer. ``headers`` with lower-case names. The Origin is checked
        first; then the token is taken from the first of: ``Authorization: Bearer``, a
        ``bearer.<token>`` subprotocol offer, the ``token`` query parameter. ``local_peer``:
        the connection comes from this machine (only then is the local token accepted).

        A page from an origin that is not listed passes the first check only when a viewer
        token was issued for that origin, and then needs such a token: a device's token (or
        the local one) from there is refused (403) as from any origin not listed."""
        origin = headers.get("origin")
        normalized = normalize_origin(origin) if origin is not None else None
        # Header-less (non-browser) clients pass; a browser page only from a listed origin.
        listed = normalized is None or normalized in self._origins
        viewers = self.viewer_tokens
        if not listed and (viewers is None or normalized not in viewers.origins()):
            return _foreign_origin(origin)
        via: Via = "header"
        token = _bearer(headers)
        if token is None:
            via, token = "subprotocol", _offered(subprotocols)
        if token is None:
            via, token = "query", query.get("token")
        if token is None:
            return Refusal(401, "no token")
        if isinstance(token, Refusal):
            return token
        problem = token_problem(token)
        if problem:
            return Refusal(401, f"unusable token ({via}): {problem}")
        digest = hashlib.sha256(token.encode()).digest()
        # Every kind of token is looked up whatever matched, so the time taken does not tell.
        client = self._lookup(digest)
        local = self._is_local(digest)
        viewer = viewers.find(digest) if viewers is not None else None
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in subprotocols else None
        if client is None and viewer is not None and viewers is not None:
            return self._viewer(viewer, viewers, origin, listed, via, subprotocol)
        if not listed and (client is not None or local):
            # Past the first check only because a viewer token was issued for this origin:
            # any other token from there is refused as from any origin not listed.
            return _foreign_origin(origin)
        if client is None and local:
            if not local_peer:
                return Refusal(401, f"the local token ({via}) is accepted only from this machine")
            return Identity(
                client_id=LOCAL_CLIENT,
                subscribe=("#",),
                publish=(),
                via=via,
                subprotocol=subprotocol,
                token_sha256=digest.hex(),
            )
        if client is None:
            return Refusal(401, f"unknown token ({via})")
        return Identity(
            client_id=client.id,
            subscribe=client.subscribe,
            publish=client.publish,
            via=via,
            subprotocol=subprotocol,
            token_sha256=client.token_sha256.lower(),
        )

    def _viewer(
        self,
        grant: ViewerGrant,
        viewers: ViewerTokens,
        origin: str | None,
        listed: bool,
        via: Via,
        subprotocol: str | None,
    ) -> Identity | Refusal:
        if grant.origin is not None:
            if origin is None or normalize_origin(origin) != grant.origin:
                return Refusal(
                    403,
                    f"Origin {_shown(origin)} is not the one the viewer token was issued for "
                    f"({grant.origin})",
                )
        elif not listed:
            return _foreign_origin(origin)
        if viewers.clock() >= grant.expires:
            return Refusal(401, f"expired viewer token ({via})")
        return Identity(
            client_id=STATUS_PAGE_CLIENT,
            subscribe=("#",),
            publish=(),
            via=via,
            subprotocol=subprotocol,
            token_sha256=grant.digest.hex(),
            owner=grant.owner,
        )

    def _is_local(self, digest: bytes) -> bool:
        local = self.local_token_sha256
        return local is not None and hmac.compare_digest(digest, bytes.fromhex(local))

    def _lookup(self, digest: bytes) -> DeviceClient | None:
        # Every stored hash is compared, with no early exit, so the time taken does not say
        # how many clients come before the matching one (or that none matched).
        found = None
        for client, stored in zip(self._clients, self._digests, strict=True):
            if hmac.compare_digest(digest, stored) and found is None:
                found = client
        return found

    def refresh(self, identity: Identity) -> Identity | None:
        """``identity`` with its client's current ACL, or None when the client was removed
        or its token changed (the server closes that connection with 1008)."""
        if identity.client_id == LOCAL_CLIENT:
            return identity if self._is_local(bytes.fromhex(identity.token_sha256)) else None
        if identity.client_id == STATUS_PAGE_CLIENT:
            # A viewer token only opens connections; expired or forgotten, it closes none.
            return identity
        for client in self._clients:
            if client.id == identity.client_id:
                if not hmac.compare_digest(
                    client.token_sha256.lower().encode(), identity.token_sha256.encode()
                ):
                    return None
                return attrs.evolve(identity, subscribe=client.subscribe, publish=client.publish)
        return None


def _shown(origin: str | None) -> str:
    """An Origin header as a log may show it (a malformed one could forge log lines)."""
    if origin is None:
        return "(none)"
    return origin if origin == "null" or origin_problem(origin) is None else "(malformed)"


def _foreign_origin(origin: str | None) -> Refusal:
    return Refusal(403, f"Origin {_shown(origin)} is not in device_plane.origins")
