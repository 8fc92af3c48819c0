"""The management API: HTTPS for CPI's HTTP receiver adapter, field engineers and Prometheus.

    GET  /healthz                   no auth       the process is alive
    GET  /readyz                    viewer        200 or 503 with every component's health
    GET  /metrics                   viewer        Prometheus text (``gateway.metrics``)
    GET  /                          viewer        the status page (``gateway/statuspage.html``)
    GET  /api/v1/status             viewer        what the status page shows, as JSON
    GET  /api/v1/live               viewer        where and how the page subscribes over wss
    POST /api/v1/commands           operator      a command (JSON or XML) -> its record
    GET  /api/v1/commands[/{id}]    viewer        records, newest first / one record

Plain ASGI (no framework: nine routes do not need one) served by hypercorn's Trio worker.
Auth is HTTP Basic against scrypt hashes in the config (passwords may be weak, so a fast
hash would not do); verification runs on worker threads, at most two at a time, and a
success is remembered for five minutes so that a page polling every two seconds costs one
scrypt, not one per request. With ``client_ca_file`` the TLS handshake also requires a
client certificate from that CA. Plain HTTP only on loopback, or behind SAP Cloud Connector
(which calls its backends over http:// with Basic auth), with a warning in the log.

``Api`` is a supervisor part (``run`` / ``condition`` / ``statistics`` / ``reconfigure``);
what it shows comes from ``ApiServices``, which the composition root implements. Commands go
to ``gateway.commands`` (parsing, the router, the record's JSON and XML forms).

Depends on hypercorn, trio, attrs, ``gateway.core``, ``gateway.commands``, ``gateway.metrics``,
``gateway.deviceauth`` (its TLS errors and origin form) and the statistics value classes.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import errno
import getpass
import hashlib
import hmac
import importlib.resources
import json
import logging
import math
import re
import secrets
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO
from urllib.parse import parse_qs, unquote_to_bytes

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from gateway import __version__, metrics
from gateway.commands import (
    CommandRouter,
    error_xml,
    parse_command,
    record_json,
    record_xml,
    records_xml,
    status_url,
)
from gateway.core.asgi import Receive, Scope, Send, lifespan
from gateway.core.commands import CommandRecord, CommandRejected, Source, Unavailable
from gateway.core.component import Condition, StartPolicy, State
from gateway.core.configtypes import Duration, Secret, Size, format_duration
from gateway.core.logs import kv
from gateway.core.reading import Reading, iso_utc
from gateway.core.servertls import (
    host_port,
    ip,
    load_certificate,
    plain_or_tls_problems,
    server_context,
    tls_problems,
)
from gateway.deviceauth import normalize_origin
from gateway.deviceplane import DevicePlaneStatistics
from gateway.forwarder import ForwarderStatistics
from gateway.outbox import OutboxStatistics
from gateway.supervisor import GatewayStatistics, SupervisedStatistics

log = logging.getLogger("gateway.api")

Role = Literal["operator", "viewer"]

REALM = "edge-gateway"

# scrypt as ``hash-password`` writes it: 16 MiB and about 50 ms per verification.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
# What a stored hash may ask for, so that a config cannot make a login take minutes or
# gigabytes (``hashlib.scrypt`` refuses more than 2 GiB of memory anyway).
MIN_SCRYPT_N = 2**14
MAX_SCRYPT_N = 2**20
MAX_SCRYPT_R = 16
MAX_SCRYPT_P = 4
MAX_SCRYPT_MEMORY = 2**27
"""128 * r * n bytes: at most 128 MiB (n = 2^17 with r = 8): two checks at once must fit in
a Raspberry Pi's memory beside everything else."""

MAX_PASSWORD_LENGTH = 1024
"""Longer presented passwords are refused unhashed."""
MIN_PASSWORD_LENGTH = 12
"""``hash-password`` warns below this."""
MAX_USER_NAME = 64

VERIFY_THREADS = 2
"""Worker threads checking passwords (scrypt) at once; the others wait for one."""
MAX_VERIFYING = 8
"""Password checks (scrypt) waiting or running at once; beyond, a login gets 503 at once, so
a flood of wrong passwords cannot queue up minutes of work in front of CPI's next call."""
PEER_FAILURES = 10
"""Failed logins from one address per ``PEER_WINDOW`` before it is refused without a check."""
PEER_WINDOW = 60.0
BODY_TIMEOUT = 20.0
"""Seconds a command's body may take to arrive, all of it."""
UNKNOWN_USERS = "(unknown users)"
HANDSHAKE_TIMEOUT = 10.0
"""Seconds a TLS handshake may take."""
"""scrypt verifications at a time: the rest wait, the event loop never does."""
AUTH_CACHE_SECONDS = 300.0
"""How long a successful verification is remembered."""
AUTH_CACHE_SIZE = 1024
AUTH_LOG_INTERVAL = 60.0
"""At most one failed-login warning per peer address in this time (the rest are counted)."""

MIN_BODY = 1024
MAX_BODY = 16 * 1024 * 1024
MAX_COMMAND_TIMEOUT = 600.0
"""CPI: inbound calls should not wait more than 10 minutes."""
MAX_COMMAND_EXPIRY = 7 * 86400.0

READINGS_SHOWN = 500
"""Latest values in ``/api/v1/status``."""
RECENT_COMMANDS = 20
"""Commands in ``/api/v1/status``."""
MAX_COMMANDS_LISTED = 1000
"""The largest ``limit`` of ``GET /api/v1/commands``."""
WRITER_THREADS = 2
"""Worker threads writing out ``GET /api/v1/commands`` lists (off the event loop)."""

STATUS_PAGE = "statuspage.html"
"""The status page, a file of this package."""

_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_HOST_HEADER = re.compile(
    r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d{1,5}))?"
)
_SCRYPT_FIELDS = 6

# ---- config ---------------------------------------------------------------------------------


@attrs.frozen
class ApiUser:
    """One ``[[api.users]]`` table."""

    name: str
    password_scrypt: str = attrs.field(repr=False)
    """``scrypt$<n>$<r>$<p>$<salt base64>$<hash base64>`` (``edge-gateway hash-password``)."""
    role: Role = "viewer"
    """``operator``: everything; ``viewer``: read-only (no commands). Viewer unless said: a
    user table that forgets ``role`` must not get command rights."""

    def check(self) -> Iterator[tuple[str, str]]:
        problem = user_name_problem(self.name)
        if problem:
            yield "name", problem
        problem = scrypt_problem(self.password_scrypt)
        if problem:
            yield "password_scrypt", problem


@attrs.frozen
class ApiSection:
    """``[api]``: the HTTPS management and command API. Absent: no API."""

    listen: str = "127.0.0.1"
    port: int = 9443
    tls_cert_file: Secret | None = None
    tls_key_file: Secret | None = None
    client_ca_file: Secret | None = None
    """When set, the TLS handshake requires a client certificate this CA signed."""
    plain: bool = False
    cloud_connector: bool = False
    """SAP Cloud Connector calls this port (over http:// when ``plain``): allows plain
    HTTP on an address other than loopback."""
    max_body: Size = Size(64 * 1024)
    ready_cpi_failing_after: Duration = Duration(300.0)
    command_timeout: Duration = Duration(10.0)
    max_command_timeout: Duration = Duration(60.0)
    command_expiry: Duration = Duration(3600.0)
    users: tuple[ApiUser, ...] = ()

    def restart_key(self) -> tuple[object, ...]:
        """What a reload can apply only by restarting the server (dropping its connections).
        Everything else (users, limits, the certificate and key) applies live."""
        ca = self.client_ca_file.reveal() if self.client_ca_file else None
        return (self.listen, self.port, self.plain, ca)

    @property
    def url(self) -> str:
        return f"{'http' if self.plain else 'https'}://{host_port(self.listen, self.port)}/"

    def check(self) -> Iterator[tuple[str, str]]:
        """``(path, message)`` below ``api`` for every problem."""
        yield from self._check_listen()
        yield from self._check_tls()
        if not 1 <= self.port <= 65535:
            yield "port", f"{self.port} is not a TCP port: give 1 .. 65535"
        if not MIN_BODY <= self.max_body <= MAX_BODY:
            yield "max_body", "must be from 1KiB to 16MiB"
        if self.ready_cpi_failing_after <= 0:
            yield "ready_cpi_failing_after", "must be greater than 0"
        if self.command_timeout <= 0:
            yield "command_timeout", "must be greater than 0"
        if not 0 < self.max_command_timeout <= MAX_COMMAND_TIMEOUT:
            yield (
                "max_command_timeout",
                "must be greater than 0 and at most 10min (CPI ends inbound calls after that)",
            )
        elif self.command_timeout > self.max_command_timeout:
            yield (
                "command_timeout",
                f"{format_duration(self.command_timeout)} is above max_command_timeout "
                f"({format_duration(self.max_command_timeout)}): the default wait must be "
                "one a request may ask for",
            )
        if not 0 < self.command_expiry <= MAX_COMMAND_EXPIRY:
            yield "command_expiry", "must be greater than 0 and at most 7d"
        yield from self._check_users()

    def _check_listen(self) -> Iterator[tuple[str, str]]:
        address = ip(self.listen)
        if address is None and not _HOSTNAME.fullmatch(self.listen):
            yield (
                "listen",
                f"{self.listen!r} is not an IP address or host name: write e.g. "
                '"127.0.0.1" (this machine only), "0.0.0.0" (every IPv4 interface) or '
                '"192.168.10.5"',
            )
            return
        if self.plain:
            loopback = address is not None and address.is_loopback
            if not loopback and not self.cloud_connector:
                yield (
                    "plain",
                    f"plain http:// is allowed only on a loopback address or for SAP Cloud "
                    f"Connector, and listen is {self.listen!r}: passwords and commands would "
                    'cross the network unencrypted; set listen = "127.0.0.1", or set '
                    "cloud_connector = true if the Cloud Connector calls this port, or serve "
                    "HTTPS: set tls_cert_file and tls_key_file and remove plain",
                )
        yield from plain_or_tls_problems(
            self,
            plain=self.plain,
            scheme="http",
            missing=(
                "missing: HTTPS needs a certificate and its key (or plain = true, "
                'with listen = "127.0.0.1" or behind SAP Cloud Connector with '
                "cloud_connector = true)"
            ),
        )

    def _check_tls(self) -> Iterator[tuple[str, str]]:
        if not self.plain:
            yield from tls_problems(
                self,
                ca_signs="the clients' certificates (for CPI: the CA of the tenant's client "
                "certificate)",
            )

    def _check_users(self) -> Iterator[tuple[str, str]]:
        if not self.users:
            yield (
                "users",
                "none: nobody could use the API; add a [[api.users]] table with a name and "
                "the password_scrypt that 'edge-gateway hash-password' prints",
            )
        names: dict[str, int] = {}
        for i, user in enumerate(self.users):
            for path, message in user.check():
                yield f"users[{i}].{path}", message
            if user.name in names:
                yield (
                    f"users[{i}].name",
                    f"duplicate name {user.name!r} (users[{names[user.name]}] has it too): "
                    "names must be unique",
                )
            else:
                names[user.name] = i

    def describe(self) -> str:
        """One line for ``check-config``."""
        if self.plain:
            why = "SAP Cloud Connector" if self.cloud_connector else "loopback only"
            how = f"plain HTTP ({why})"
        else:
            how = "client certificates required" if self.client_ca_file else "HTTPS"
        roles = collections.Counter(u.role for u in self.users)
        n = len(self.users)
        who = ", ".join(f"{roles[r]} {r}{'' if roles[r] == 1 else 's'}" for r in sorted(roles))
        return (
            f"api: {self.url}, {how}, {n} user{'' if n == 1 else 's'}"
            + (f" ({who})" if who else "")
            + f", commands wait {format_duration(self.command_timeout)} "
            f"(at most {format_duration(self.max_command_timeout)})"
            + (
                ""
                if roles["operator"]
                else '; no operator: nobody can send commands (role = "operator" allows it)'
            )
        )


def user_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a Basic auth user name, or None."""
    if not name:
        return "is empty: give the user a name"
    if len(name) > MAX_USER_NAME:
        return f"is longer than {MAX_USER_NAME} characters"
    if ":" in name:
        return f"{name!r} contains ':', which HTTP Basic auth cannot carry in a user name"
    if not name.isprintable() or name != name.strip():
        return f"{name!r} has control characters or leading/trailing spaces"
    return None


def server_ssl_context(section: ApiSection) -> ssl.SSLContext | None:
    """The TLS context of the server (``gateway.core.servertls``, HTTP/1.1), or None for
    plain HTTP. Raises ``ssl.SSLError`` / ``OSError``, ``EncryptedKey``, ``ClientCaError``."""
    if section.plain:
        return None
    if section.tls_cert_file is None or section.tls_key_file is None:
        raise ValueError("api: HTTPS needs tls_cert_file and tls_key_file (or plain)")
    return server_context(section, alpn=["http/1.1"])


# ---- passwords ------------------------------------------------------------------------------


@attrs.frozen
class ScryptHash:
    """A parsed ``password_scrypt``."""

    n: int
    r: int
    p: int
    salt: bytes = attrs.field(repr=False)
    digest: bytes = attrs.field(repr=False)

    @property
    def maxmem(self) -> int:
        """What OpenSSL needs for these parameters (128 * r * (n + 2 + p)), plus slack."""
        return 128 * self.r * (self.n + 2 + self.p) + 1024 * 1024


class BadHash(ValueError):
    """A ``password_scrypt`` that is not one; the message never contains the value."""


def parse_scrypt(stored: str) -> ScryptHash:
    """Parse ``scrypt$n$r$p$salt$hash``; raises ``BadHash`` saying what is wrong."""
    parts = stored.split("$")
    if parts[0] != "scrypt" or len(parts) != _SCRYPT_FIELDS:
        raise BadHash(
            "is not a hash from 'edge-gateway hash-password' (scrypt$16384$8$1$<salt>$<hash>)"
            + ("; it looks like a password: store only its hash" if "$" not in stored else "")
        )
    try:
        n, r, p = (int(x) for x in parts[1:4])
    except ValueError:
        raise BadHash("has parameters that are not whole numbers") from None
    if not (MIN_SCRYPT_N <= n <= MAX_SCRYPT_N and n & (n - 1) == 0):
        raise BadHash("has n out of range: n must be a power of 2 from 2^14 to 2^20")
    if not (1 <= r <= MAX_SCRYPT_R and 1 <= p <= MAX_SCRYPT_P):
        raise BadHash(f"has r or p out of range: r from 1 to {MAX_SCRYPT_R}, p 1 to 4")
    if 128 * r * n > MAX_SCRYPT_MEMORY:
        raise BadHash("asks for more than 128MiB of memory (128 * r * n): lower n or r")
    try:
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (binascii.Error, ValueError):
        raise BadHash("has a salt or hash that is not base64") from None
    if not 8 <= len(salt) <= 64 or not 16 <= len(digest) <= 64:
        raise BadHash("has a salt or hash of the wrong length (salt 8..64, hash 16..64 bytes)")
    return ScryptHash(n, r, p, salt, digest)


def scrypt_problem(stored: str) -> str | None:
    """Why ``stored`` is not a usable ``password_scrypt``, or None."""
    try:
        parse_scrypt(stored)
    except BadHash as e:
        return f"{e}: run 'edge-gateway hash-password' and paste what it prints"
    return None


def _encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    """``scrypt$16384$8$1$<salt base64>$<hash base64>`` of ``password`` (UTF-8), with a fresh
    random salt: what ``[[api.users]] password_scrypt`` holds."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=HASH_BYTES
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_encode(salt)}${_encode(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time comparison). False for a
    malformed or out-of-bounds ``stored``. Blocks for tens of milliseconds: call it on a
    worker thread from async code."""
    try:
        parsed = parse_scrypt(stored)
    except BadHash:
        return False
    digest = hashlib.scrypt(
        password.encode(),
        salt=parsed.salt,
        n=parsed.n,
        r=parsed.r,
        p=parsed.p,
        maxmem=parsed.maxmem,
        dklen=len(parsed.digest),
    )
    return hmac.compare_digest(digest, parsed.digest)


def password_problem(password: str) -> str | None:
    """Why ``password`` cannot be used at all, or None."""
    if not password:
        return "the password is empty"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"the password is longer than {MAX_PASSWORD_LENGTH} characters"
    return None


def hash_password_command(
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``edge-gateway hash-password``: read a password from stdin (on a terminal twice,
    without echo; otherwise one line) and print its ``password_scrypt``. Never from the
    command line, where other users and the shell history would see it. Exit status 0, or 2
    for an unusable password (or two that differ)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("hash-password: the two passwords differ; nothing was printed", file=stderr)
            return 2
    else:
        line = stdin.readline()
        if not line:
            print("hash-password: no password on stdin (give it as one line)", file=stderr)
            return 2
        password = line.rstrip("\r\n")
    problem = password_problem(password)
    if problem:
        print(f"hash-password: {problem}", file=stderr)
        return 2
    if len(password) < MIN_PASSWORD_LENGTH:
        print(
            f"hash-password: warning: a password of {len(password)} character"
            f"{'' if len(password) == 1 else 's'} is easy to "
            f"guess; use at least {MIN_PASSWORD_LENGTH}",
            file=stderr,
        )
    print(hash_password(password), file=stdout)
    return 0


# A hash of a random password nobody knows: an unknown user name costs the same scrypt as a
# wrong password, so the time taken does not tell which names exist.
_NOBODY = "scrypt$16384$8$1$2BG9xBmCrcVB4JzAdiDfkA==$Vfl6QdJrXJ/Jr6rZVdk+BG1mCHHX+3Xdhk6KDD9gaVs="


# ---- what the API reads ---------------------------------------------------------------------


@attrs.frozen
class LiveAccess:
    """Where the status page subscribes to live readings: the device plane's port, whether
    it speaks TLS, and a short-lived viewer token (subscribe ``#``, publish nothing)."""

    port: int
    tls: bool
    token: str = attrs.field(repr=False)


class ApiServices(Protocol):
    """What the API reads of the running gateway (``gateway.app.Gateway`` implements it)."""

    @property
    def gateway_name(self) -> str: ...

    def statistics(self) -> GatewayStatistics: ...

    def latest(self) -> Sequence[Reading]:
        """The hub's latest reading of every topic."""
        ...

    def router(self) -> CommandRouter | None:
        """The command router while it runs; None: commands are answered 503."""
        ...

    def live(self, origin: str | None, user: str | None = None) -> LiveAccess | None:
        """A viewer token for a page served from ``origin``; None without a device plane.
        Raises ``Unavailable`` while it is configured but not running (answered 503)."""
        ...


@attrs.frozen
class ApiStatistics:
    requests: int
    by_status: Mapping[str, int]
    """Answers by HTTP status (``"200"``, ``"401"``...)."""
    auth_failures: int
    port: int | None


# ---- readiness ------------------------------------------------------------------------------


def _iso(timestamp: float | None) -> str | None:
    return iso_utc(timestamp) if timestamp is not None else None


def _label(component: SupervisedStatistics) -> str:
    return (
        component.name
        if component.name == component.kind
        else (f"{component.kind} {component.name}")
    )


def _required(component: SupervisedStatistics) -> bool:
    return component.policy is StartPolicy.REQUIRED


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{int(seconds)}s"
    if seconds < 7200:
        return f"{int(seconds // 60)}min"
    return f"{seconds / 3600:.1f}h"


def _named(name: str, reason: str | None) -> bool:
    """Whether a bus's health reason names device ``name`` (``meter, pump not answering``)."""
    if not reason:
        return False
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", reason) is not None


def _devices(bus: SupervisedStatistics) -> list[dict[str, Any]]:
    devices = getattr(bus.part, "devices", None)
    if not isinstance(devices, Mapping):
        return []
    health = bus.health
    found = []
    for name, device in sorted((str(k), v) for k, v in devices.items()):
        last_success = getattr(device, "last_success", None)
        up = (
            health.state in (State.UP, State.DEGRADED)
            and last_success is not None
            and not (health.state is State.DEGRADED and _named(name, health.reason))
        )
        last_error = getattr(device, "last_error", None)
        found.append(
            {
                "bus": bus.name,
                "device": name,
                "state": "up" if up else "down",
                "last_error": last_error if isinstance(last_error, str) else None,
                "last_success": _iso(last_success) if isinstance(last_success, float) else None,
            }
        )
    return found


def ready_report(
    stats: GatewayStatistics, *, now: float, cpi_failing_after: float
) -> dict[str, Any]:
    """The ``/readyz`` body. Not ready (``problems`` says why, one line each) when any
    component is down, a required component is still starting, or CPI has been failing for
    longer than ``cpi_failing_after`` seconds (``now``: wall clock, UTC seconds)."""
    problems: list[str] = []
    components: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    wss_clients = 0
    outbox: dict[str, Any] | None = None
    cpi: dict[str, Any] | None = None
    for c in stats.components:
        health = c.health
        components.append(
            {
                "name": c.name,
                "kind": c.kind,
                "state": health.state.value,
                "since": _iso(health.since),
                "reason": health.reason,
                "last_error": health.last_error,
            }
        )
        why = health.reason or health.last_error
        if health.state is State.DOWN:
            problems.append(f"{_label(c)} is down" + (f": {why}" if why else ""))
        elif health.state is State.STARTING and _required(c):
            problems.append(f"{_label(c)} is starting" + (f": {why}" if why else ""))
        part = c.part
        if c.kind == "bus":
            devices.extend(_devices(c))
        if isinstance(part, DevicePlaneStatistics):
            wss_clients += part.connections
        elif isinstance(part, OutboxStatistics):
            outbox = {
                "backlog": part.backlog_readings,
                "backlog_bytes": part.backlog_bytes,
                "dead_letters": part.dead_letters,
            }
        elif isinstance(part, ForwarderStatistics):
            cpi = {
                "last_success": _iso(part.last_success),
                "last_failure": _iso(part.last_failure),
                "failing_since": _iso(part.failing_since),
                "last_failure_reason": part.last_failure_reason,
            }
            if part.failing_since is not None:
                failing = now - part.failing_since
                if failing > cpi_failing_after:
                    problems.append(
                        f"CPI has been failing for {_ago(failing)} (more than "
                        f"{format_duration(cpi_failing_after)})"
                        + (f": {part.last_failure_reason}" if part.last_failure_reason else "")
                    )
    return {
        "ready": not problems,
        "problems": problems,
        "components": components,
        "devices": devices,
        "wss_clients": wss_clients,
        "outbox": outbox,
        "cpi": cpi,
    }


# ---- HTTP plumbing --------------------------------------------------------------------------


JSON = "application/json"
XML = "application/xml"
HTML = "text/html; charset=utf-8"

_SECURITY_HEADERS = (
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
)
CSP_API = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
CSP_PAGE = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self' wss: ws:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The status page is one self-contained file: inline script and style, fetches to this
server and a WebSocket to the device plane (another port, so not 'self')."""

_GET = ("GET", "HEAD")


class _Disconnected(Exception):
    """The client went away while its request was read."""


def _dumps(data: object) -> bytes:
    return json.dumps(data, ensure_ascii=False, allow_nan=False).encode() + b"\n"


@attrs.frozen
class _Request:
    method: str
    path: str
    raw_path: bytes
    query: str
    headers: Mapping[str, str]
    """Lower-case names; repeated headers joined with ', '."""
    peer: str
    scheme: str
    receive: Receive


class _Responder:
    """Sends one response with the security headers; remembers whether it started."""

    def __init__(self, send: Send, *, head: bool, counted: Callable[[int], None]) -> None:
        self._send = send
        self._head = head
        self._counted = counted
        self.started = False

    async def respond(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        csp: str = CSP_API,
    ) -> None:
        self.started = True
        self._counted(status)
        out = [
            ("content-type", content_type),
            ("content-length", str(len(body))),
            *_SECURITY_HEADERS,
            ("content-security-policy", csp),
            *headers,
        ]
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in out],
            }
        )
        await self._send({"type": "http.response.body", "body": b"" if self._head else body})

    async def json(
        self, status: int, data: object, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        await self.respond(status, _dumps(data), JSON, headers)

    async def error(
        self,
        status: int,
        code: str,
        message: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        xml: bool = False,
    ) -> None:
        if xml:
            await self.respond(status, error_xml(code, message), XML, headers)
        else:
            await self.json(status, {"error": {"code": code, "message": message}}, headers)


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _is_xml(content_type: str) -> bool:
    media = _media_type(content_type)
    return media in ("application/xml", "text/xml") or media.endswith("+xml")


def accept_prefers_xml(accept: str | None) -> bool | None:
    """What ``Accept`` says between XML and JSON: True (XML ranks higher), False (JSON
    does), None (it names neither, or only wildcards). On a tie the one listed first wins."""
    if not accept:
        return None
    best: dict[str, tuple[float, int]] = {}
    for index, item in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in item.split(";"))
        media = media.lower()
        kind = "xml" if media in ("application/xml", "text/xml") else "json"
        if media not in ("application/xml", "text/xml", "application/json"):
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if not math.isfinite(q):
            q = 0.0
        if kind not in best or q > best[kind][0]:
            best[kind] = (q, index)
    xml, json_ = best.get("xml", (0.0, 0)), best.get("json", (0.0, 0))
    if xml[0] <= 0 and json_[0] <= 0:
        return None
    if xml[0] != json_[0]:
        return xml[0] > json_[0]
    return xml[1] < json_[1]


def request_host(host: str | None) -> str | None:
    """The host of a ``Host`` header without its port (IPv6 in brackets), or None when it
    is missing or not a host name / address."""
    if host is None:
        return None
    m = _HOST_HEADER.fullmatch(host.strip())
    if m is None:
        return None
    name = m.group("host")
    if name.startswith("[") and ip(name[1:-1]) is None:
        return None
    return name.lower()


def _status_page(source: Traversable | Path | None) -> bytes:
    page = source if source is not None else importlib.resources.files("gateway") / STATUS_PAGE
    return page.read_bytes()


# ---- the server -----------------------------------------------------------------------------


class _ServerConfig(HypercornConfig):
    """hypercorn's config with our own TLS context (hypercorn would build one from file
    names, without a way to reload the certificate or refuse a passphrase)."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self._context = context

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._context

    @property
    def ssl_enabled(self) -> bool:
        return self._context is not None


class _AuthFailures:
    """When a peer's failed logins were last logged, and how many came since."""

    def __init__(self) -> None:
        self.logged_at: dict[str, float] = {}
        self.suppressed: collections.Counter[str] = collections.Counter()

    def should_log(self, peer: str, now: float) -> int | None:
        """None: count it silently; else log it, with this many suppressed before it."""
        last = self.logged_at.get(peer)
        if last is not None and now - last < AUTH_LOG_INTERVAL:
            self.suppressed[peer] += 1
            return None
        if len(self.logged_at) >= AUTH_CACHE_SIZE:  # bounded, however many peers try
            for stale in [p for p, t in self.logged_at.items() if now - t >= AUTH_LOG_INTERVAL]:
                del self.logged_at[stale]
                self.suppressed.pop(stale, None)
            if len(self.logged_at) >= AUTH_CACHE_SIZE:
                self.logged_at.clear()
                self.suppressed.clear()
        self.logged_at[peer] = now
        return self.suppressed.pop(peer, 0)


class _Busy(Exception):
    """A login refused before its password is checked: 503 (too many checks at once) or 429
    (this address failed too often), with when to try again."""

    def __init__(self, status: int, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class Api:
    """The HTTPS API (a supervisor ``Part``). ``port`` is the bound port once started."""

    def __init__(
        self,
        section: ApiSection,
        services: ApiServices,
        *,
        wall_clock: Callable[[], float] = time.time,
        status_page: Traversable | Path | None = None,
    ) -> None:
        self.section = section
        self.services = services
        self._wall_clock = wall_clock
        self._status_page_source = status_page
        self._users = {u.name: u for u in section.users}
        self._ssl_context: ssl.SSLContext | None = None
        self._limiter = trio.CapacityLimiter(VERIFY_THREADS)
        self._writers = trio.CapacityLimiter(WRITER_THREADS)
        self._verifying = 0
        self._peer_failures: dict[tuple[str, str], tuple[float, int]] = {}
        """Per (address, user name): when its window of failed logins started, how many."""
        self._verified: dict[bytes, float] = {}
        """SHA-256 of (user, password, stored hash) -> when the success is forgotten."""
        self._failures = _AuthFailures()
        self.port: int | None = None
        self._listening = False
        self._stopped = False
        self.requests = 0
        self.by_status: collections.Counter[str] = collections.Counter()
        self.auth_failures = 0

    # ---- the Part protocol ---------------------------------------------------------------------

    def condition(self) -> Condition:
        if self._listening:
            return Condition(State.UP)
        if self._stopped:
            return Condition(State.DOWN, "stopped")
        return Condition(State.STARTING)

    def statistics(self) -> ApiStatistics:
        return ApiStatistics(
            requests=self.requests,
            by_status=dict(self.by_status),
            auth_failures=self.auth_failures,
            port=self.port,
        )

    def reconfigure(self, section: ApiSection) -> None:
        """Apply a reloaded section whose ``restart_key`` is unchanged: users, roles and
        limits take effect with the next request; the certificate and key are read again."""
        if self._ssl_context is not None:
            try:
                server_ssl_context(section)  # a scratch context first: all or nothing
                load_certificate(self._ssl_context, section)
            except (ssl.SSLError, OSError, ValueError) as e:
                log.error(
                    "api: cannot load the certificate and key again (%s); new connections "
                    "keep getting the previous certificate",
                    getattr(e, "reason", None) or e,
                )
            else:
                log.info("api: certificate and key read again for new connections")
        self.section = section
        self._users = {u.name: u for u in section.users}
        self._verified.clear()  # a removed user or a changed password counts at once

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Raises ``OSError`` when the address cannot be bound."""
        section = self.section
        self._ssl_context = server_ssl_context(section)
        config = _ServerConfig(self._ssl_context)
        config.bind = [host_port(section.listen, section.port)]
        config.accesslog = None
        config.errorlog = None  # every request is answered and logged by the app itself
        config.include_server_header = False
        config.graceful_timeout = 1.0
        # No read timeout: a caller waiting up to max_command_timeout for its answer sends
        # nothing meanwhile, and hypercorn would close that connection under it.
        config.read_timeout = None
        # A connection that never finishes its TLS handshake is dropped after 10 s (as the
        # device plane's handshake_timeout), not hypercorn's 60 s: idle sockets cost fds.
        config.ssl_handshake_timeout = HANDSHAKE_TIMEOUT
        api = self

        class _Started:
            def started(self, binds: list[str]) -> None:
                api.port = int(binds[0].rsplit(":", 1)[1])
                api._listening = True
                url = f"{'https' if api._ssl_context else 'http'}://" + host_port(
                    section.listen, api.port
                )
                log.info("api listening on %s/", url)
                if section.plain:
                    api._warn_plain(section)
                task_status.started()

        try:
            await serve(self, config, task_status=_Started())  # type: ignore[arg-type]
        except Exception as e:
            bind_error = None if self._listening else _single_os_error(e)
            if bind_error is None:
                raise
            where = host_port(section.listen, section.port)
            hint = _BIND_HINTS.get(bind_error.errno or 0, "")
            raise OSError(
                bind_error.errno,
                f"cannot listen on {where}: {bind_error.strerror or bind_error}{hint}",
            ) from None
        finally:
            self._listening = False
            self._stopped = True

    @staticmethod
    def _warn_plain(section: ApiSection) -> None:
        address = ip(section.listen)
        if address is not None and address.is_loopback:
            log.warning(
                "api: plain HTTP (no TLS) on %s: acceptable only because it is a loopback "
                "address, which only this machine can reach",
                section.listen,
            )
        else:
            log.warning(
                "api: plain HTTP (no TLS) on %s for SAP Cloud Connector: passwords and "
                "commands cross the network unencrypted; acceptable only when the Cloud "
                "Connector reaches this port over a network you trust; firewall it to the "
                "connector's address",
                section.listen,
            )

    # ---- ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        client = scope.get("client")
        request = _Request(
            method=scope["method"],
            path=scope["path"],
            raw_path=scope.get("raw_path") or scope["path"].encode(),
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            peer=str(client[0]) if client else "unknown",
            scheme=scope.get("scheme", "http"),
            receive=receive,
        )
        responder = _Responder(send, head=request.method == "HEAD", counted=self._count)
        try:
            await self._dispatch(request, responder)
        except _Disconnected:
            pass
        except Exception as e:  # a defect in one request must not end the server
            log.error(
                "api: %s %s failed: %s: %s",
                request.method,
                request.path,
                type(e).__name__,
                e,
                exc_info=e,
            )
            if not responder.started:
                await responder.error(
                    500,
                    "internal-error",
                    "the gateway could not answer this request (a defect, logged with its "
                    "details): try again; if it persists, report the gateway's log",
                )

    def _count(self, status: int) -> None:
        self.requests += 1
        self.by_status[str(status)] += 1

    async def _dispatch(self, request: _Request, out: _Responder) -> None:
        path = request.path
        commands = path == "/api/v1/commands" or path.startswith("/api/v1/commands/")
        xml = commands and self._wants_xml(request)
        methods = _methods(path)
        if methods is None:
            await out.error(
                404,
                "not-found",
                f"no such resource {path!r}: see docs/api.md for the endpoints",
                xml=xml,
            )
            return
        if request.method not in methods:
            await out.error(
                405,
                "method-not-allowed",
                f"{request.method} is not allowed on {path}: use {', '.join(methods)}",
                [("allow", ", ".join(methods))],
                xml=xml,
            )
            return
        if path == "/healthz":
            await out.json(200, {"status": "alive"})
            return
        try:
            user = await self._authenticate(request)
        except _Busy as e:
            await out.error(
                e.status,
                "busy" if e.status == 503 else "too-many-failures",
                e.message,
                [("retry-after", str(e.retry_after))],
                xml=xml,
            )
            return
        if user is None:
            await out.error(
                401,
                "unauthorized",
                "give a user name and password of [[api.users]] (HTTP Basic auth)",
                [("www-authenticate", f'Basic realm="{REALM}"')],
                xml=xml,
            )
            return
        if request.method == "POST" and user.role != "operator":
            await out.error(
                403,
                "forbidden",
                f'user {user.name!r} is a viewer: sending commands needs role = "operator"',
                xml=xml,
            )
            return
        if path == "/readyz":
            body = self._ready()
            await out.json(200 if body["ready"] else 503, body)
        elif path == "/metrics":
            router = self.services.router()
            text = metrics.render(
                self.services.statistics(), router.statistics() if router else None
            )
            await out.respond(200, text, metrics.CONTENT_TYPE)
        elif path == "/":
            await self._page(out)
        elif path == "/api/v1/status":
            await out.json(200, await self._status(request))
        elif path == "/api/v1/live":
            await self._live(request, out, user.name)
        elif request.method == "POST":
            await self._post_command(request, out, xml=xml, user=user.name)
        elif path == "/api/v1/commands":
            await self._list_commands(request, out, xml=xml)
        else:
            await self._get_command(request, out, xml=xml)

    def _wants_xml(self, request: _Request) -> bool:
        preference = accept_prefers_xml(request.headers.get("accept"))
        if preference is not None:
            return preference
        return request.method == "POST" and _is_xml(request.headers.get("content-type", ""))

    # ---- auth -----------------------------------------------------------------------------------

    async def _authenticate(self, request: _Request) -> ApiUser | None:
        credentials = _basic(request.headers.get("authorization"))
        if credentials is None:
            self._failed(request, None, "no Basic credentials")
            return None
        name, password = credentials
        user = self._users.get(name)
        if password_problem(password):
            self._failed(request, name, "unusable password")
            return None
        stored = user.password_scrypt if user is not None else _NOBODY
        key = hashlib.sha256(
            b"\0".join((name.encode(), password.encode(), stored.encode()))
        ).digest()
        now = trio.current_time()
        expires = self._verified.get(key)
        if user is not None and expires is not None and now < expires:
            await trio.lowlevel.checkpoint()
            return user
        self._check_peer((request.peer, self._bucket(name)), now)
        if self._verifying >= MAX_VERIFYING:
            raise _Busy(503, "too many logins are being checked at once: try again in a moment", 1)
        self._verifying += 1
        try:
            ok = await trio.to_thread.run_sync(
                verify_password, password, stored, limiter=self._limiter
            )
        finally:
            self._verifying -= 1
        if user is None or not ok:
            self._failed(request, name, "unknown user" if user is None else "wrong password")
            return None
        self._remember(key, trio.current_time())
        return user

    def _check_peer(self, key: tuple[str, str], now: float) -> None:
        """Refuse, without a password check, a user name that failed too often lately from
        this address. Per name, not per address: everyone may come from one address (a
        Cloud Connector, an SSH tunnel), and one name guessed at must not lock out the others
        (a success remembered from before still gets through)."""
        start, count = self._peer_failures.get(key, (now, 0))
        if now - start >= PEER_WINDOW:
            self._peer_failures.pop(key, None)
            return
        if count >= PEER_FAILURES:
            wait = max(1, round(start + PEER_WINDOW - now))
            raise _Busy(
                429,
                f"{count} failed logins for user {_shown(key[1])} from {key[0]} within "
                f"{PEER_WINDOW:g}s: wait {wait}s, then use the right user name and password",
                wait,
            )

    def _bucket(self, name: str) -> str:
        """Failed logins count per configured user name; unknown names share one count."""
        return name if name in self._users else UNKNOWN_USERS

    def _count_peer_failure(self, key: tuple[str, str], now: float) -> None:
        start, count = self._peer_failures.get(key, (now, 0))
        if now - start >= PEER_WINDOW:
            start, count = now, 0
        if key not in self._peer_failures and len(self._peer_failures) >= AUTH_CACHE_SIZE:
            # Bounded, however many addresses try: the windows that ended go first, and only
            # if all are still running is everything forgotten.
            for ended in [k for k, (t, _) in self._peer_failures.items() if now - t >= PEER_WINDOW]:
                del self._peer_failures[ended]
            if len(self._peer_failures) >= AUTH_CACHE_SIZE:
                self._peer_failures.clear()
        self._peer_failures[key] = (start, count + 1)

    def _remember(self, key: bytes, now: float) -> None:
        if len(self._verified) >= AUTH_CACHE_SIZE:
            for stale in [k for k, t in self._verified.items() if t <= now]:
                del self._verified[stale]
            if len(self._verified) >= AUTH_CACHE_SIZE:
                self._verified.clear()
        self._verified[key] = now + AUTH_CACHE_SECONDS

    def _failed(self, request: _Request, name: str | None, why: str) -> None:
        if name is None and "authorization" not in request.headers:
            return  # a first request without credentials is how browsers ask: not a failure
        self.auth_failures += 1
        if name is not None:
            self._count_peer_failure((request.peer, self._bucket(name)), trio.current_time())
        suppressed = self._failures.should_log(request.peer, trio.current_time())
        if suppressed is None:
            return
        more = f" ({suppressed} more failed from there in the last minute)" if suppressed else ""
        who = f"user {_shown(name)}" if name is not None else "a request"
        log.warning(
            "api: authentication failed for %s from %s (%s)%s", who, request.peer, why, more
        )

    # ---- endpoints ------------------------------------------------------------------------------

    def _ready(self, stats: GatewayStatistics | None = None) -> dict[str, Any]:
        return ready_report(
            stats if stats is not None else self.services.statistics(),
            now=self._wall_clock(),
            cpi_failing_after=self.section.ready_cpi_failing_after,
        )

    async def _page(self, out: _Responder) -> None:
        try:
            page = await trio.to_thread.run_sync(_status_page, self._status_page_source)
        except OSError as e:
            log.error("api: the status page cannot be read: %s", e)
            await out.error(
                500,
                "status-page-missing",
                f"the status page ({STATUS_PAGE}) is missing from this installation "
                f"({e.strerror or e}): reinstall edge-gateway; the JSON API still works",
            )
            return
        await out.respond(200, page, HTML, csp=CSP_PAGE)

    async def _status(self, request: _Request) -> dict[str, Any]:
        stats = self.services.statistics()
        body = self._ready(stats)
        router = self.services.router()
        recent: list[CommandRecord] = []
        if router is not None:
            # The page shows what it can: a command store that is down shows in components.
            with contextlib.suppress(Unavailable):
                recent = await router.recent(RECENT_COMMANDS)
        latest = list(self.services.latest())[:READINGS_SHOWN]
        body.update(
            {
                "gateway": self.services.gateway_name,
                "version": __version__,
                "readings": [_reading(r) for r in latest],
                "commands": [record_json(r) for r in recent],
                # Without minting a token on every poll: the page asks /api/v1/live itself.
                "live": any(c.kind == "device plane" for c in stats.components),
            }
        )
        return body

    async def _live(self, request: _Request, out: _Responder, user: str) -> None:
        header = request.headers.get("host")
        host = request_host(header)
        if header is None or host is None:
            await out.error(
                400,
                "bad-host",
                "the request has no usable Host header: the live address is built from it",
            )
            return
        origin = normalize_origin(f"{request.scheme}://{header.strip()}")
        try:
            access = self.services.live(origin, user)
        except Unavailable as e:
            # Configured, not running now (restarting, or the gateway stops): the page
            # tries again with its backoff, unlike after a 404.
            await out.error(503, "unavailable", str(e))
            return
        if access is None:
            await out.error(
                404,
                "no-device-plane",
                "live readings need the device plane ([device_plane] in the config), which "
                "is not running",
            )
            return
        scheme = "wss" if access.tls else "ws"
        await out.json(
            200,
            {
                "url": f"{scheme}://{host}:{access.port}/",
                "token": access.token,
                "protocols": ["edge-gateway.v1", f"bearer.{access.token}"],
            },
        )

    async def _read_body(self, request: _Request) -> bytes | None:
        """The request body, or None when it is larger than ``max_body`` (reading stops)."""
        limit = self.section.max_body
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return None
        body = bytearray()
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            body += message.get("body", b"")
            if len(body) > limit:
                return None
            if not message.get("more_body"):
                return bytes(body)

    async def _post_command(
        self, request: _Request, out: _Responder, *, xml: bool, user: str
    ) -> None:
        router = self.services.router()
        if router is None:
            await out.error(
                503,
                "unavailable",
                "commands cannot be taken now: the command router is not running (starting, "
                "stopping, or its database cannot be opened: see the gateway's log); "
                "nothing was executed, send it again later",
                xml=xml,
            )
            return
        # A body trickling in ties up a connection: 20 s for all of it (CPI's own web server
        # gives up on a 20 s gap, FACTS.md).
        with trio.move_on_after(BODY_TIMEOUT) as reading:
            body = await self._read_body(request)
        if reading.cancelled_caught:
            await out.error(
                408,
                "body-timeout",
                f"the body did not arrive within {BODY_TIMEOUT:g}s: nothing was executed; "
                "send it at once",
                xml=xml,
            )
            return
        if body is None:
            await out.error(
                413,
                "too-large",
                f"the body is larger than {self.section.max_body} bytes (api.max_body): "
                "nothing was executed",
                xml=xml,
            )
            return
        try:
            command = parse_command(
                body,
                request.headers.get("content-type", ""),
                now=self._wall_clock(),
                limits=router.limits,
            )
            record = await router.execute(command, Source.API)
        except CommandRejected as e:
            # The caller gets the reason; the journal too, for whoever looks there first.
            log.warning(
                "command refused (%d %s): %s",
                e.status,
                e.code,
                e.message,
                extra=kv(user=user, peer=request.peer),
            )
            await out.error(e.status, e.code, e.message, xml=xml)
            return
        except Unavailable as e:
            log.warning("command not executed: %s", e, extra=kv(user=user, peer=request.peer))
            await out.error(503, "unavailable", str(e), xml=xml)
            return
        await self._record(record, out, xml=xml)

    async def _record(self, record: CommandRecord, out: _Responder, *, xml: bool) -> None:
        headers = []
        if record.status == 202:
            headers.append(("location", status_url(record.request.id)))
        if xml:
            await out.respond(record.status, record_xml(record), XML, headers)
        else:
            await out.json(record.status, record_json(record), headers)

    async def _get_command(self, request: _Request, out: _Responder, *, xml: bool) -> None:
        router = self.services.router()
        raw = request.raw_path.split(b"?", 1)[0][len(b"/api/v1/commands/") :]
        command_id = unquote_to_bytes(raw).decode("utf-8", "replace") if b"/" not in raw else ""
        if router is None:
            await out.error(
                503, "unavailable", "the command router is not running: try again later", xml=xml
            )
            return
        try:
            record = await router.get(command_id) if command_id else None
        except Unavailable as e:
            await out.error(503, "unavailable", str(e), xml=xml)
            return
        if record is None:
            if b"/" in raw:
                message = (
                    "an id in the path must be percent-encoded ('/' as %2F): use the "
                    "record's status_url"
                )
            else:
                message = f"no command with id {_shown(command_id)}"
            await out.error(404, "unknown-command", message, xml=xml)
            return
        # The record as it is now; its status is the one of its state (200, 202, 410...),
        # but a GET that found it succeeded.
        if xml:
            await out.respond(200, record_xml(record), XML)
        else:
            await out.json(200, record_json(record))

    async def _list_commands(self, request: _Request, out: _Responder, *, xml: bool) -> None:
        values = parse_qs(request.query).get("limit", [str(RECENT_COMMANDS)])
        try:
            limit = int(values[-1])
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_COMMANDS_LISTED:
            await out.error(
                400,
                "bad-limit",
                f"limit must be a whole number from 1 to {MAX_COMMANDS_LISTED}",
                xml=xml,
            )
            return
        router = self.services.router()
        if router is None:
            await out.error(
                503, "unavailable", "the command router is not running: try again later", xml=xml
            )
            return
        try:
            records = await router.recent(limit)
        except Unavailable as e:
            await out.error(503, "unavailable", str(e), xml=xml)
            return
        # A thousand records with large arguments take a good part of a second to write out
        # (XML more than JSON): done on a worker thread, so the event loop goes on serving
        # the other requests, the device plane and the buses meanwhile.
        if xml:
            body = await trio.to_thread.run_sync(records_xml, records, limiter=self._writers)
            await out.respond(200, body, XML)
        else:
            body = await trio.to_thread.run_sync(_records_json, records, limiter=self._writers)
            await out.respond(200, body, JSON)


def _records_json(records: Sequence[CommandRecord]) -> bytes:
    return _dumps({"commands": [record_json(r) for r in records]})


_BIND_HINTS = {
    errno.EADDRINUSE: " (another program has the port: stop it, or set api.port)",
    errno.EADDRNOTAVAIL: " (no interface of this machine has that address: check api.listen)",
    errno.EACCES: " (ports below 1024 need CAP_NET_BIND_SERVICE: choose api.port above 1023)",
}


def _single_os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` inside nursery wrappers around one error (hypercorn binds in one)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, OSError) else None


def _methods(path: str) -> tuple[str, ...] | None:
    """The methods ``path`` allows, or None for an unknown path."""
    if path in ("/healthz", "/readyz", "/metrics", "/", "/api/v1/status", "/api/v1/live"):
        return _GET
    if path == "/api/v1/commands":
        return (*_GET, "POST")
    if path.startswith("/api/v1/commands/") and len(path) > len("/api/v1/commands/"):
        return _GET
    return None


def _basic(header: str | None) -> tuple[str, str] | None:
    """``(user, password)`` of ``Authorization: Basic ...`` (UTF-8), or None."""
    if header is None:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    name, colon, password = decoded.partition(":")
    return (name, password) if colon else None


def _shown(text: str | None) -> str:
    """Untrusted text for a log line or message: quoted, escaped, cut short."""
    if text is None:
        return "(none)"
    return repr(text if len(text) <= 64 else text[:64] + "...")


def _reading(reading: Reading) -> dict[str, Any]:
    value = reading.value
    if isinstance(value, float) and not math.isfinite(value):
        value = None  # JSON has no NaN; a driver never publishes one as good anyway
    return {
        "topic": reading.topic,
        "value": value,
        "unit": reading.unit,
        "quality": reading.quality.value,
        "ts": iso_utc(reading.timestamp),
        "reason": reading.reason,
    }
