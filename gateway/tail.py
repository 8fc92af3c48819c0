"""``edge-gateway tail``: print live readings from a gateway's device plane (a small wss client).

``resolve`` turns the command line into a ``Target`` (URL, token, TLS context): from the
arguments, or, without ``--url``, from the local endpoint file the gateway writes
(``gateway.localendpoint``), pinning the certificate it names. ``run_tail`` connects,
subscribes and prints until the gateway closes the connection; it writes to the streams it is
given and returns the exit status, so tests drive it in the same trio run as a server.
``add_parser`` and ``main`` are what ``gateway.cli`` calls.

Depends on trio, trio-websocket, ``gateway.core``, ``gateway.deviceauth`` (the subprotocol and
token checks), ``gateway.entry`` (signals at exit) and ``gateway.localendpoint``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import ssl
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from gateway import entry, localendpoint
from gateway.core.configtypes import MAX_SECRET_FILE, FileRefused, read_regular_file
from gateway.core.topics import pattern_problem
from gateway.deviceauth import MAX_MESSAGE_SIZE, SUBPROTOCOL, token_problem

TOKEN_ENV = "EDGE_GATEWAY_TOKEN"

EX_PROTOCOL = 1
"""The gateway refused the subscription, or ended the connection for a protocol problem."""
EX_USAGE = 2
"""What argparse exits with; also for a token or file given that cannot be used."""
EX_UNAVAILABLE = 69
EX_NOPERM = 77
EX_INTERRUPTED = 130
EX_BROKEN_PIPE = 128 + signal.SIGPIPE

CONNECT_TIMEOUT = 10.0
"""Seconds for TCP, TLS and the WebSocket handshake together."""
CLOSE_TIMEOUT = 2.0
"""Seconds for the closing handshake when ``tail`` ends first (Ctrl-C, a broken pipe)."""

_SUBSCRIBED = "tail-subscribed"
"""The id of the ping sent right after the subscribe: the gateway handles a connection's
messages in order, so an error that arrives before its pong is the subscribe's answer."""

_DEFAULT_TOKEN_SOURCE = f"--token-file, --token or {TOKEN_ENV}"

# Closing codes (docs/protocol.md, "Closing codes").
_NORMAL = 1000
_GOING_AWAY = 1001
_ABNORMAL = 1006  # no close frame: the TCP connection ended
_TRY_AGAIN_LATER = 1013

# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH (OpenSSL's x509_vfy.h)
_NAME_MISMATCH = (62, 64)

_PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL
)


class TailError(Exception):
    """``tail`` cannot start; ``status`` is the exit status, the message says what to do."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class Target:
    """Where ``tail`` connects, with what."""

    url: str
    token: str = attrs.field(repr=False)
    ssl_context: ssl.SSLContext | None
    """None for a ``ws://`` URL."""
    token_source: str = _DEFAULT_TOKEN_SOURCE
    """Where the token came from, for the message when it is refused."""
    trust: str | None = None
    """What the certificate is checked against (``--ca FILE``, a pinned file), for the
    message when the check fails; None: the system's trust store."""


# ---- TLS ------------------------------------------------------------------------------------


def ca_context(ca_file: str) -> ssl.SSLContext:
    """Trust only ``ca_file`` (a CA, or the server's own certificate), names checked."""
    context = ssl.create_default_context(cafile=ca_file)
    # The server's certificate itself may be given, even one issued by a CA.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def pinned_context(cert_file: str) -> ssl.SSLContext:
    """Trust exactly the (first) certificate in ``cert_file``, whatever name it was issued
    for. Raises ``OSError``, ``FileRefused`` or ``ValueError`` (no certificate in it)."""
    text = read_regular_file(Path(cert_file), MAX_SECRET_FILE).decode("ascii", "replace")
    return pinned_pem_context(text)


def pinned_pem_context(text: str) -> ssl.SSLContext:
    """Trust exactly the first PEM certificate in ``text`` (a certificate file's content),
    whatever name it was issued for. Raises ``ValueError`` (no certificate in it) or
    ``ssl.SSLError``."""
    first = _PEM_CERTIFICATE.search(text)
    if first is None:
        raise ValueError("holds no PEM certificate")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Only the leaf is the trust anchor, not the CA certificates the file may carry after it:
    # another certificate of the same CA must not pass. PARTIAL_CHAIN lets a CA-issued leaf
    # be an anchor on its own.
    context.load_verify_locations(cadata=first.group(0))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    # The exact certificate is pinned, so the name it was issued for does not matter: the
    # gateway's certificate names the plant host, and tail connects to 127.0.0.1.
    context.check_hostname = False
    return context


# ---- the command line -----------------------------------------------------------------------


def _url(text: str) -> str:
    problem = url_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def url_problem(url: str) -> str | None:
    """Why ``url`` is not a URL ``tail`` can connect to, or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError when out of range)
    except ValueError as e:
        return f"{url!r} is not a URL ({e}): write e.g. wss://gateway.plant.local:8443"
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        return f"{url!r} is not a ws:// or wss:// URL: write e.g. wss://gateway.plant.local:8443"
    if parts.username is not None or parts.password is not None:
        return f"{parts.scheme}://...@: give the token with --token-file, not in the URL"
    return None


def _topic(text: str) -> str:
    problem = pattern_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(
            f"{problem}: write a topic pattern such as 'line-1/+/temperature' or 'devices/#'"
        )
    return text


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``tail`` subcommand to ``edge-gateway``'s subparsers."""
    tail = sub.add_parser(
        "tail",
        help="print live readings from a gateway's device plane (wss)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Connect to a gateway's device plane and print its readings as they come, one\n"
            "line each: time (UTC), topic, value, unit, and the quality when it is bad.\n"
            "TOPIC is a pattern ('+' one level, '#' the rest; default '#', every topic,\n"
            "which the token must allow). tail ends when the gateway closes the\n"
            "connection, also when it stops or restarts; it does not reconnect.\n"
            "\n"
            "On the gateway's own machine no option is needed: the gateway writes its URL,\n"
            "a token for local use and its certificate to device-plane.json in its runtime\n"
            "directory (/run/edge-gateway under systemd), and tail pins that certificate.\n"
            "Reading that file takes sudo or membership of the group edge-gateway.\n"
            "Elsewhere, give --url and a token: --token-file, or the environment variable\n"
            f"{TOKEN_ENV}; --token works too, but other users see it in ps.\n"
            "\n"
            "exit status:\n"
            "  0    the gateway closed the connection (also when it stops or restarts)\n"
            "  1    the gateway refused the subscription (a topic the token may not\n"
            "       read) or ended the connection for a protocol problem\n"
            "  2    usage error: bad arguments, no token, a file given cannot be read\n"
            "  69   cannot connect: refused, TLS failure, no answer, connection lost,\n"
            "       or no local gateway found\n"
            "  77   the token was refused (401, 403), or the local endpoint file cannot be\n"
            "       read by this user\n"
            "  130  interrupted (Ctrl-C)\n"
            "  141  the output was closed (tail | head)\n"
            "\n"
            "examples:\n"
            "  sudo edge-gateway tail 'line-1/#'\n"
            "  edge-gateway tail --url wss://gw-7.plant.local:8443 --token-file hmi.token \\\n"
            "      --ca plant-ca.pem --json --last 'line-1/+/temperature'"
        ),
    )
    tail.add_argument(
        "--url",
        type=_url,
        help="the device plane, e.g. wss://gw-7.plant.local:8443 (default: the local gateway's)",
    )
    token = tail.add_mutually_exclusive_group()
    token.add_argument("--token-file", metavar="FILE", help="a file holding the token")
    token.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"the token (visible in ps: prefer --token-file or {TOKEN_ENV})",
    )
    tail.add_argument(
        "--ca",
        metavar="FILE",
        help="trust only this CA certificate, or the server's own (PEM); "
        "default: the system's CAs, or the local gateway's pinned certificate",
    )
    tail.add_argument("--json", action="store_true", help="print each reading as a JSON line")
    tail.add_argument(
        "--last",
        action="store_true",
        help="ask for the latest reading of each matching topic at once",
    )
    tail.add_argument(
        "topics", nargs="*", type=_topic, metavar="TOPIC", help="topic patterns (default: #)"
    )


def _read_token_file(name: str) -> str:
    try:
        token = read_regular_file(Path(name), MAX_SECRET_FILE).decode("utf-8").strip()
    except (OSError, FileRefused, UnicodeDecodeError) as e:
        raise TailError(f"--token-file {name}: {_reason(e)}", EX_USAGE) from None
    if not token:
        raise TailError(f"--token-file {name}: the file is empty: write the token in it", EX_USAGE)
    return token


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error)


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Target:
    """The target the command line asks for. Without ``--url``, the local endpoint file is
    looked for. Raises ``TailError``."""
    token: str | None = None
    source = _DEFAULT_TOKEN_SOURCE
    if args.token_file is not None:
        token, source = _read_token_file(args.token_file), f"--token-file {args.token_file}"
    elif args.token is not None:
        token, source = args.token, "--token"
    elif environ.get(TOKEN_ENV):
        token, source = environ[TOKEN_ENV].strip(), TOKEN_ENV
    if token is not None:
        problem = token_problem(token)
        if problem:
            raise TailError(f"{source}: {problem}", EX_USAGE)

    url: str | None = args.url
    pinned: str | None = None
    if url is None:
        try:
            skipped: list[str] = []
            endpoint, path = localendpoint.find(skipped)
            for note in skipped:
                if not note.endswith(": not there"):
                    print(f"tail: passed over{note}", file=sys.stderr)
        except localendpoint.EndpointNotFoundError as e:
            status = EX_NOPERM if e.permission_denied else EX_UNAVAILABLE
            raise TailError(
                f"{e}\nOr give --url, and a token (--token-file or {TOKEN_ENV}).", status
            ) from None
        url = endpoint.url
        problem = url_problem(url)
        if problem:
            raise TailError(f"{path}: url: {problem}", EX_UNAVAILABLE)
        if token is None:
            token, source = endpoint.token, f"the local endpoint file {path}"
        pinned = endpoint.cert_file
    if token is None:
        raise TailError(
            f"no token: give --token-file FILE, or set {TOKEN_ENV} (or run tail on the "
            "gateway's machine without --url)",
            EX_USAGE,
        )

    context: ssl.SSLContext | None = None
    trust: str | None = None
    secure = url.startswith("wss:")
    if args.ca is not None:
        if not secure:
            raise TailError(f"--ca: {url} is plain ws://, without TLS: leave --ca out", EX_USAGE)
        try:
            context = ca_context(args.ca)
        except (OSError, ssl.SSLError) as e:
            raise TailError(
                f"--ca {args.ca}: {_reason(e)}: give a PEM certificate file", EX_USAGE
            ) from None
        trust = f"--ca {args.ca}"
    elif secure and pinned is not None:
        try:
            context = pinned_context(pinned)
        except (OSError, FileRefused, ValueError, ssl.SSLError) as e:
            denied = isinstance(e, PermissionError)
            todo = "run tail with sudo" if denied else "give --ca with the gateway's certificate"
            raise TailError(
                f"the gateway's certificate {pinned} (named in the local endpoint file): "
                f"{_reason(e)}: {todo}",
                EX_NOPERM if denied else EX_UNAVAILABLE,
            ) from None
        trust = f"the gateway's certificate {pinned}, pinned"
    elif secure:
        context = ssl.create_default_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    return Target(url, token, context, token_source=source, trust=trust)


def main(args: argparse.Namespace) -> int:
    """``edge-gateway tail`` with its parsed arguments; the exit status."""
    # The command line's entry remembers SIGTERM and ignores SIGHUP for the daemon's sake;
    # tail is a plain command: both end it, as they end any other (timeout, a closed ssh).
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    try:
        target = resolve(args, os.environ)
        status = trio.run(
            partial(
                run_tail,
                target,
                args.topics or ["#"],
                last=args.last,
                json_lines=args.json,
                out=sys.stdout,
                err=sys.stderr,
            )
        )
    except TailError as e:
        print(f"tail: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        entry.ignore_signals()
        return EX_INTERRUPTED
    if status == EX_BROKEN_PIPE:
        # `tail | head`: the reader has all it wanted. Quietly, as cli.py does; stdout goes to
        # /dev/null so the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return status


# ---- the connection -------------------------------------------------------------------------


class _Failed(Exception):
    """Connecting failed: print the message, exit with ``status``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _EndWatch(trio.abc.Stream):
    """A stream that cancels the scope ``on_end`` when the peer closes it or it breaks.

    trio-websocket waits for the handshake's answer until a timeout even when the stream ended
    long before (python-trio/trio-websocket#199): this lets the wait be cut short."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self.on_end: trio.CancelScope | None = None

    def _ended(self) -> None:
        if self.on_end is not None:
            self.on_end.cancel()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError:
            self._ended()
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError:
            self._ended()
            raise
        if not data:
            self._ended()
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()


def _host_port(url: str) -> tuple[str, int, str, str]:
    """``(host, port, Host header, resource)`` of a URL that passed ``url_problem``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    default = 443 if parts.scheme == "wss" else 80
    port = parts.port or default
    shown = f"[{host}]" if ":" in host else host
    header = shown if port == default else f"{shown}:{port}"
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port, header, resource


async def _open_stream(target: Target, host: str, port: int) -> trio.abc.Stream:
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as e:
        raise _Failed(
            f"cannot connect to {where}: {_os_reason(e)}: is the gateway running, with its "
            "device plane on this address and port?",
            EX_UNAVAILABLE,
        ) from None
    if target.ssl_context is None:
        return tcp
    # The TLS handshake is done here, not by trio-websocket, which hides its errors.
    stream = trio.SSLStream(tcp, target.ssl_context, server_hostname=host, https_compatible=True)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as e:
        await trio.aclose_forcefully(tcp)
        raise _Failed(_tls_failure(e.__cause__, target, host), EX_UNAVAILABLE) from None
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


def _os_reason(error: OSError) -> str:
    """The first errno text below trio's "all attempts to connect ... failed"."""
    pending: list[BaseException] = [error]
    while pending:
        e = pending.pop(0)
        if isinstance(e, OSError) and e.strerror:
            return e.strerror.lower()
        if isinstance(e, BaseExceptionGroup):
            pending.extend(e.exceptions)
        if e.__cause__ is not None:
            pending.append(e.__cause__)
    return str(error)


def _tls_failure(cause: BaseException | None, target: Target, host: str) -> str:
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = cause.verify_message or str(cause)
        if cause.verify_code in _NAME_MISMATCH:
            return (
                f"certificate verify failed: {detail.rstrip('.')}: connect with a name or "
                "address the server's certificate was issued for"
            )
        if target.trust is None:
            return (
                f"certificate verify failed: {detail}: pass --ca with the server's "
                "certificate, or the CA that issued it"
            )
        return (
            f"certificate verify failed: {detail}: the server's certificate does not match "
            f"{target.trust}: is it the right server, and the right certificate?"
        )
    if isinstance(cause, ssl.SSLError):
        return (
            f"TLS handshake with {host} failed ({cause.reason or cause}): does the server "
            "speak TLS? For a plain server, write ws:// instead of wss://"
        )
    return (
        f"the server {host} closed the connection during the TLS handshake: does it speak "
        "TLS? For a plain server, write ws:// instead of wss://"
    )


def _rejected(e: ConnectionRejected, target: Target) -> _Failed:
    status = e.status_code
    body = _printable((e.body or b"").decode("utf-8", "replace").strip())[:200]
    said = f": {body}" if body else ""
    if status == 401:
        return _Failed(f"token refused (401): check {target.token_source}", EX_NOPERM)
    if status == 403:
        return _Failed(f"refused (403{said}): the gateway does not allow this client", EX_NOPERM)
    if status == 503:
        return _Failed(
            f"the gateway refused the connection (503{said}): try again later", EX_UNAVAILABLE
        )
    return _Failed(
        f"{target.url} answered HTTP {status}{said}, not a WebSocket handshake: is it the "
        "gateway's device plane?",
        EX_UNAVAILABLE,
    )


async def _connect(
    nursery: trio.Nursery, target: Target
) -> tuple[WebSocketConnection, trio.abc.Stream]:
    """An open WebSocket to ``target`` and its stream; its reader task runs in ``nursery``.
    Raises ``_Failed``, or (from ``nursery``) ``ConnectionRejected``."""
    host, port, header, resource = _host_port(target.url)
    stream = _EndWatch(await _open_stream(target, host, port))
    try:
        with trio.CancelScope() as ended:
            stream.on_end = ended
            ws = await wrap_client_stream(
                nursery,
                stream,  # type: ignore[arg-type]  # annotated too narrowly: any trio Stream works
                header,
                resource,
                subprotocols=[SUBPROTOCOL],
                extra_headers=[(b"Authorization", f"Bearer {target.token}".encode())],
                # As large as the gateway may be configured to send.
                max_message_size=MAX_MESSAGE_SIZE,
            )
            stream.on_end = None
            return ws, stream
        raise _Failed(
            f"{target.url} closed the connection without answering the WebSocket handshake: "
            "is it the gateway's device plane? (wss:// for a TLS server)",
            EX_UNAVAILABLE,
        )
    except BaseException:  # refused, cancelled (a timeout, a refusal in the reader task)
        await trio.aclose_forcefully(stream)
        raise


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception in ``group`` that is not a ``Cancelled``, or ``group`` itself."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        e = pending.pop()
        if isinstance(e, BaseExceptionGroup):
            pending.extend(e.exceptions)
        elif not isinstance(e, trio.Cancelled):
            leaves.append(e)
    return leaves[0] if len(leaves) == 1 else group


async def run_tail(
    target: Target,
    topics: Sequence[str],
    *,
    last: bool = False,
    json_lines: bool = False,
    out: TextIO,
    err: TextIO,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> int:
    """Connect to ``target``, subscribe to ``topics`` and print readings to ``out`` (other
    news to ``err``) until the gateway closes the connection. The exit status; raises
    ``KeyboardInterrupt`` after closing the connection."""
    try:
        async with trio.open_nursery() as nursery:
            opened: tuple[WebSocketConnection, trio.abc.Stream] | None = None
            with trio.move_on_after(connect_timeout):
                opened = await _connect(nursery, target)
            if opened is None:
                raise _Failed(
                    f"{target.url} did not answer within {connect_timeout:g}s", EX_UNAVAILABLE
                )
            ws, stream = opened
            try:
                return await _Printer(ws, out, err, json_lines).follow(topics, last)
            except trio.Cancelled:
                # From outside: trio-websocket's reader task is cancelled too, so no closing
                # handshake could complete.
                await trio.aclose_forcefully(stream)
                raise
            finally:
                # Shielded: after a Ctrl-C or a broken pipe, still say goodbye (1000).
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # What ends the nursery comes wrapped: a refusal from trio-websocket's reader task,
        # our own _Failed, a KeyboardInterrupt.
        error = _single(group)
        if error is group:
            raise
    if isinstance(error, ConnectionRejected):
        error = _rejected(error, target)
    if isinstance(error, _Failed):
        print(f"tail: {error}", file=err)
        return error.status
    raise error


def _printable(text: str) -> str:
    """``text`` with control characters escaped: readings come from devices, and a terminal
    acts on escape sequences."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_value(value: object) -> str:
    """A reading's value as JSON shows it (strings quoted, so "21.5" is not 21.5)."""
    return _printable(json.dumps(value, ensure_ascii=False))


class _Printer:
    """Reads frames until the connection ends; prints readings, gaps and errors."""

    def __init__(self, ws: WebSocketConnection, out: TextIO, err: TextIO, json_lines: bool):
        self._ws = ws
        self._out = out
        self._err = err
        self._json = json_lines
        self._width = 0  # of the topic column: the longest topic so far

    def _note(self, text: str) -> None:
        print(f"tail: {text}", file=self._err, flush=True)

    async def follow(self, topics: Sequence[str], last: bool) -> int:
        subscribed = False
        try:
            await self._ws.send_message(
                json.dumps({"type": "subscribe", "topics": list(topics), "last": last})
            )
            await self._ws.send_message(json.dumps({"type": "ping", "id": _SUBSCRIBED}))
            while True:
                data = await self._ws.get_message()
                frame = json.loads(data) if isinstance(data, str) else None
                kind = frame.get("type") if isinstance(frame, dict) else None
                if frame is None or not isinstance(kind, str):
                    self._note("the gateway sent a frame that is not protocol v1 JSON: stopping")
                    return EX_PROTOCOL
                if kind == "readings":
                    if not self._readings(frame.get("readings")):
                        return EX_PROTOCOL
                elif kind == "gap":
                    dropped = _printable(str(frame.get("dropped")))
                    self._note(
                        f"{dropped} readings dropped: this terminal is reading too slowly "
                        "(narrow the topics, or use --json to a file)"
                    )
                elif kind == "error":
                    code = _printable(str(frame.get("code")))
                    self._note(
                        f"error from the gateway ({code}): {_printable(str(frame.get('message')))}"
                    )
                    if not subscribed:
                        return EX_PROTOCOL
                elif kind == "pong" and frame.get("id") == _SUBSCRIBED:
                    subscribed = True
                # Anything else (a command, a later version's frame) is not for tail.
        except ConnectionClosed as e:
            return self._closed(e)
        except json.JSONDecodeError:
            self._note("the gateway sent a frame that is not JSON: stopping")
            return EX_PROTOCOL
        except BrokenPipeError:
            return EX_BROKEN_PIPE

    def _readings(self, readings: object) -> bool:
        if not isinstance(readings, list) or not all(isinstance(r, dict) for r in readings):
            self._note("the gateway sent a readings frame without a list of readings: stopping")
            return False
        # Written while the gateway waits: a slow terminal slows this connection only, and
        # the gateway says so with a gap.
        for reading in readings:
            self._out.write(self._line(reading) + "\n")
        self._out.flush()
        return True

    def _line(self, reading: dict[str, Any]) -> str:
        if self._json:
            return json.dumps(reading, separators=(",", ":"))
        topic = _printable(str(reading.get("topic", "?")))
        self._width = max(self._width, len(topic))
        line = f"{_printable(str(reading.get('ts', '?')))}  {topic:<{self._width}}  "
        line += format_value(reading.get("value"))
        if reading.get("unit") is not None:
            line += f" {_printable(str(reading['unit']))}"
        quality = reading.get("quality", "good")
        if quality != "good":
            reason = reading.get("reason")
            why = f": {_printable(str(reason))}" if reason else ""
            line += f"  ({_printable(str(quality))}{why})"
        return line

    def _closed(self, e: ConnectionClosed) -> int:
        code = e.reason.code if e.reason is not None else _ABNORMAL
        reason = _printable(e.reason.reason or "") if e.reason is not None else ""
        said = f"{code}: {reason}" if reason else str(code)
        if code == _NORMAL:
            self._note(f"the gateway closed the connection ({said})")
            return 0
        if code == _GOING_AWAY:
            self._note(
                f"the gateway is shutting down or restarting ({said}): run tail again once "
                "it is back"
            )
            return 0
        if code == _ABNORMAL:
            self._note("the connection to the gateway was lost (no closing handshake)")
            return EX_UNAVAILABLE
        if code == _TRY_AGAIN_LATER:
            self._note(f"the gateway closed the connection ({said}): this terminal read too slowly")
            return EX_PROTOCOL
        self._note(f"the gateway closed the connection ({said})")
        return EX_PROTOCOL
