"""A local stand-in for an SAP Cloud Integration (CPI) iFlow endpoint, over HTTPS.

Behaves as ``FACTS.md`` documents the CPI runtime, for the forwarder's tests and for
``edge-gateway demo``:

- OAuth2 client credentials at ``/oauth/token`` (HTTP Basic client auth, ``expires_in``);
  ``auth = "basic"``, ``"client-certificate"`` (mTLS, checked in the TLS handshake) or
  ``"none"`` instead. Bad or expired credentials: 401.
- CSRF (``csrf = True``): ``HEAD``/``GET`` with ``X-CSRF-Token: Fetch`` returns a token bound to
  a new session cookie; a POST without both, or with a token of another session: 403.
- Scripted faults (``faults``: a queue applied to the next POSTs that pass auth and CSRF):
  any status with headers and body (429 with ``Retry-After``, 500, 503...), a connection
  dropped mid-response, a response slower than the client's deadline. ``token_faults``: status
  answers for the next token requests (a token endpoint answering nonsense).
- ``max_body``: larger bodies get 413 (or a 500 saying so, as some tenants do).
- An idempotent process call: batches are recorded once per ``X-Message-ID``; repeats are
  counted as duplicates. Each new batch is printed as one line when ``echo`` is set, and
  handed to ``on_batch``.
- What it keeps: by default every batch (with its body) and every request, for tests to
  assert on. A long run (the demo) sets ``keep_bodies = False`` and ``history``: then only
  the last ``history`` batches and requests are kept (a repeat of a forgotten batch is
  recorded again), without their bodies.

Served by hypercorn's Trio worker (the project's HTTP server) with a small ASGI app.
Imports nothing from the gateway (it plays the other side): hypercorn, attrs and trio only.
"""

from __future__ import annotations

import base64
import collections
import json
import secrets
import ssl
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from gateway.core.asgi import Receive, Scope, Send, lifespan

SESSION_COOKIE = "JSESSIONID"


@attrs.frozen
class Fault:
    """One scripted answer to a POST: a status (with headers and body), ``reset`` (the
    connection drops mid-response) or ``slow`` (the batch is processed, the answer comes after
    ``delay`` seconds: a client with a shorter deadline sends it again)."""

    kind: Literal["status", "reset", "slow"] = "status"
    status: int = 503
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    delay: float = 0.0

    @classmethod
    def respond(cls, status: int, body: bytes = b"", **headers: str) -> Fault:
        return cls(
            "status", status, tuple((k.replace("_", "-"), v) for k, v in headers.items()), body
        )

    @classmethod
    def reset(cls) -> Fault:
        return cls("reset")

    @classmethod
    def slow(cls, delay: float) -> Fault:
        return cls("slow", 200, delay=delay)


@attrs.frozen
class ReceivedBatch:
    message_id: str
    content_type: str
    body: bytes
    seqs: tuple[int, ...]
    """The readings' sequence numbers, in the order of the payload."""


@attrs.frozen
class Request:
    method: str
    path: str
    status: int


@attrs.define
class CpiStandIn:
    """The ASGI app and its state; ``serve_standin`` runs it."""

    path: str = "/http/edge/readings"
    auth: Literal["oauth2", "client-certificate", "basic", "none"] = "oauth2"
    client_id: str = "sb-edge-gateway"
    client_secret: str = "secret"
    token_lifetime: float = 3600.0
    csrf: bool = True
    max_body: int | None = None
    too_large_status: int = 413
    echo: bool = False
    clock: Callable[[], float] = trio.current_time
    commands: list[object] = attrs.field(factory=list)
    """Handed out once in the next 2xx response (``{"commands": [...]}``)."""
    faults: collections.deque[Fault] = attrs.field(factory=collections.deque)
    token_faults: collections.deque[Fault] = attrs.field(factory=collections.deque)
    """Status answers (``Fault.respond``) for the next token requests, before any check."""
    keep_bodies: bool = True
    """False: batches are recorded with an empty ``body`` (their seqs and size are kept)."""
    history: int | None = None
    """Keep only the last this many batches and requests (None: all)."""
    on_batch: Callable[[ReceivedBatch], None] | None = None
    """Called with each new batch (with its body, whatever ``keep_bodies`` says)."""
    batches: dict[str, ReceivedBatch] = attrs.field(factory=dict)
    duplicates: int = 0
    requests: collections.deque[Request] = attrs.field(factory=collections.deque)
    tokens: dict[str, float] = attrs.field(factory=dict)
    """Issued access tokens and when they expire."""
    sessions: dict[str, str] = attrs.field(factory=dict)
    """Session cookie -> CSRF token."""
    received: trio.Event = attrs.field(factory=trio.Event)
    """Set (and replaced) whenever a new batch was recorded."""

    # ---- what tests assert on ---------------------------------------------------------------

    def seqs(self) -> list[int]:
        """Every sequence number received, in order of arrival, after dedupe by message id."""
        return [s for b in self.batches.values() for s in b.seqs]

    async def wait_readings(self, count: int) -> None:
        while len(self.seqs()) < count:
            await self.received.wait()

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    def forget_sessions(self) -> None:
        self.sessions.clear()

    def statuses(self, method: str = "POST") -> list[int]:
        return [r.status for r in self.requests if r.method == method and r.path == self.path]

    # ---- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        status, out_headers, out = await self._handle(method, path, headers, bytes(body), send)
        if status == 0:  # already answered (or dropped) by a fault
            return
        self._note(Request(method, path, status))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in out_headers]
                + [(b"content-length", str(len(out)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": out if method != "HEAD" else b""})

    async def _handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes, send: Send
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        if path == "/oauth/token" and method == "POST":
            if self.token_faults:
                fault = self.token_faults.popleft()
                return fault.status, list(fault.headers), fault.body
            return self._token(headers, body)
        if path.lower() != self.path.lower():
            return 404, [], b"Not Found"
        if not self._authorised(headers):
            return 401, [("www-authenticate", 'Bearer realm="cpi"')], b"Unauthorized"
        if method in ("HEAD", "GET"):
            if self.csrf and headers.get("x-csrf-token", "").lower() == "fetch":
                session, token = secrets.token_hex(8), secrets.token_urlsafe(16)
                self.sessions[session] = token
                cookie = f"{SESSION_COOKIE}={session}; Path=/; Secure; HttpOnly"
                return 200, [("x-csrf-token", token), ("set-cookie", cookie)], b""
            return 200, [], b""
        if method != "POST":
            return 405, [], b"Method Not Allowed"
        if self.csrf and not self._csrf_ok(headers):
            return 403, [("x-csrf-token", "Required")], b"CSRF token validation failed"
        if self.faults:
            fault = self.faults.popleft()
            if fault.kind == "status":
                return fault.status, list(fault.headers), fault.body
            if fault.kind == "reset":
                self._note(Request(method, path, 0))
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-length", b"1000")],
                    }
                )
                await send({"type": "http.response.body", "body": b"{", "more_body": True})
                raise ConnectionResetError("scripted: connection dropped mid-response")
            self._record(headers, body)
            await trio.sleep(fault.delay)
            return 200, [], b""
        if self.max_body is not None and len(body) > self.max_body:
            text = f"Body size limit of {self.max_body} bytes exceeded".encode()
            return self.too_large_status, [], text
        self._record(headers, body)
        answer = json.dumps({"commands": self.commands}).encode() if self.commands else b""
        self.commands = []
        mpl = "AG" + secrets.token_hex(14)
        return 200, [("sap_messageprocessinglogid", mpl)], answer

    def _note(self, request: Request) -> None:
        self.requests.append(request)
        if self.history is not None:
            while len(self.requests) > self.history:
                self.requests.popleft()

    def _token(
        self, headers: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        form = dict(p.split("=", 1) for p in body.decode().split("&") if "=" in p)
        if not self._basic_ok(headers) or form.get("grant_type") != "client_credentials":
            return 401, [], b'{"error":"unauthorized"}'
        token = secrets.token_urlsafe(24)
        self.tokens[token] = self.clock() + self.token_lifetime
        data = {"access_token": token, "token_type": "bearer", "expires_in": self.token_lifetime}
        return 200, [("content-type", "application/json")], json.dumps(data).encode()

    def _basic_ok(self, headers: dict[str, str]) -> bool:
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        return secrets.compare_digest(headers.get("authorization", ""), f"Basic {expected}")

    def _authorised(self, headers: dict[str, str]) -> bool:
        if self.auth == "basic":
            return self._basic_ok(headers)
        if self.auth == "oauth2":
            value = headers.get("authorization", "")
            token = value[7:] if value.startswith("Bearer ") else ""
            expires = self.tokens.get(token)
            return expires is not None and self.clock() < expires
        return True  # none, or client-certificate (checked in the TLS handshake)

    def _csrf_ok(self, headers: dict[str, str]) -> bool:
        cookies = dict(
            c.strip().split("=", 1) for c in headers.get("cookie", "").split(";") if "=" in c
        )
        token = self.sessions.get(cookies.get(SESSION_COOKIE, ""))
        return token is not None and secrets.compare_digest(token, headers.get("x-csrf-token", ""))

    def _record(self, headers: dict[str, str], body: bytes) -> None:
        message_id = headers.get("x-message-id", "")
        if message_id in self.batches:
            self.duplicates += 1
            return
        content_type = headers.get("content-type", "")
        seqs = _seqs(content_type, body)
        batch = ReceivedBatch(message_id, content_type, body, seqs)
        self.batches[message_id] = batch if self.keep_bodies else attrs.evolve(batch, body=b"")
        if self.history is not None:
            while len(self.batches) > self.history:
                del self.batches[next(iter(self.batches))]
        if self.on_batch is not None:
            self.on_batch(batch)
        self.received.set()
        self.received = trio.Event()
        if self.echo:
            span = f"{seqs[0]}..{seqs[-1]}" if seqs else "-"
            print(
                f"CPI stand-in: batch {message_id} seq {span} readings={len(seqs)} "
                f"bytes={len(body)}",
                file=sys.stdout,
                flush=True,
            )


def _seqs(content_type: str, body: bytes) -> tuple[int, ...]:
    try:
        if "xml" in content_type:
            root = ET.fromstring(body)
            return tuple(int(e.attrib["seq"]) for e in root if "seq" in e.attrib)
        return tuple(int(r["seq"]) for r in json.loads(body)["readings"])
    except (ValueError, KeyError, TypeError, ET.ParseError):
        return ()


async def serve_standin(
    app: CpiStandIn,
    *,
    cert_file: Path,
    key_file: Path,
    client_ca_file: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` over HTTPS until cancelled; ``task_status.started(port)``. With
    ``client_ca_file`` the TLS handshake requires a client certificate it signed (mTLS)."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.certfile = str(cert_file)
    config.keyfile = str(key_file)
    if client_ca_file is not None:
        config.ca_certs = str(client_ca_file)
        config.verify_mode = ssl.CERT_REQUIRED
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5
    config.alpn_protocols = ["http/1.1"]
    await _serve(app, config, task_status)


async def _serve(app: CpiStandIn, config: Config, task_status: trio.TaskStatus[int]) -> None:
    class _Started:
        def started(self, binds: list[str]) -> None:
            task_status.started(int(binds[0].rsplit(":", 1)[1]))

    await serve(app, config, task_status=_Started())  # type: ignore[arg-type]
