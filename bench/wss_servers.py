"""The two wss servers the device-plane benchmarks compare, each in its own process.

- **ours**: ``gateway.deviceplane.DevicePlane`` with its ``Hub`` (trio, trio-websocket), as
  the gateway runs it, with rate limits too high to throttle a benchmark; **ours-paced** is
  the same with ``frame_interval = "10ms"`` (fan-out only, to show that setting's trade-off).
- **peer**: what a user would write with the ``websockets`` library (asyncio): on each
  ``publish``, for each reading, ``await ws.send(frame)`` to each subscriber, one reading per
  frame, in the same ``readings`` frame shape as ours (protocol v1); ``ack`` after it; no
  topic matching (every subscriber gets everything, which only favours it).

Both load the same trustme certificate, TLS 1.2 or newer, no WebSocket compression (the
``websockets`` library would negotiate permessage-deflate; trio-websocket does not offer it).
Each server pins itself to the "server" CPU (``bench.peers.pin``) so the clients, pinned to
the other one, neither slow it down nor get slowed by it. The parent reads the server's CPU
time and RSS from ``/proc/<pid>``; the pipe carries only start, stop and profiling commands.

Also here, for both benchmarks: the certificate files, the tokens, the ``websockets`` client
connection every benchmark client uses, and the raising of the open-files limit.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import logging
import multiprocessing
import os
import resource
import ssl
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import attrs

from bench.peers import pin, spawned

Side = Literal["ours", "ours-paced", "peer"]
SIDES: tuple[Side, ...] = ("ours", "peer")
PACED_INTERVAL = 0.01
"""``ours-paced``: ours with ``frame_interval`` set to this (the default is 0)."""

PUBLISHER_TOKEN = "bench-publisher-token-0123456789abcdefghij"
SUBSCRIBER_TOKEN = "bench-subscriber-token-0123456789abcdefgh"
PUBLISHER_ID = "bench-pub"
TOPICS = f"devices/{PUBLISHER_ID}/#"
"""What the fan-out subscribers subscribe to: everything the publisher publishes."""
QUIET = "line-9/quiet/#"
"""What the idle connections subscribe to: nothing is ever published there."""

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


@attrs.frozen
class Certs:
    """A trustme CA and a certificate for 127.0.0.1, written to files both servers load."""

    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def key(self) -> Path:
        return self.directory / "key.pem"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"


@contextmanager
def certificates() -> Iterator[Certs]:
    import trustme  # a test dependency: only the benchmarks need it

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="bench-wss-") as directory:
        certs = Certs(Path(directory))
        cert.cert_chain_pems[0].write_to_path(str(certs.cert))
        cert.private_key_pem.write_to_path(str(certs.key))
        ca.cert_pem.write_to_path(str(certs.ca))
        yield certs


def quiet_logs() -> None:
    """Clients that leave by aborting their connections (as the benchmark's do once measured)
    are logged, with tracebacks, by the libraries on both ends: noise here, not news."""
    for name in ("asyncio", "websockets", "trio-websocket", "gateway"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 10)


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to the hard one; returns the new soft
    limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def client_ssl_context(certs: Certs) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    return context


async def connect(port: int, certs: Certs, token: str, **kwargs: Any) -> Any:
    """A ``websockets`` asyncio client connection, as every benchmark client opens it: no
    compression, no client pings, no proxy lookup, no size limit (ours coalesces readings)."""
    from websockets.asyncio.client import connect as ws_connect

    return await ws_connect(
        f"wss://127.0.0.1:{port}/",
        ssl=client_ssl_context(certs),
        additional_headers={"Authorization": f"Bearer {token}"},
        compression=None,
        proxy=None,
        ping_interval=None,
        max_size=None,
        open_timeout=READY_TIMEOUT,
        close_timeout=2,
        **kwargs,
    )


async def receive_command(conn: Connection) -> Any:
    """The parent's next message to an asyncio client process, without blocking its loop."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(conn.fileno(), ready.set)
    try:
        await ready.wait()
    finally:
        loop.remove_reader(conn.fileno())
    return conn.recv()


# ---- the parent's side ----------------------------------------------------------------------


@attrs.frozen
class Usage:
    cpu_seconds: float
    """User + system time of the whole process since it started."""
    rss_kib: int
    waited_seconds: float
    """Time its main thread was ready to run but waited for a CPU (other processes on its
    core): what makes a server look slow on a busy machine."""


def usage(pid: int) -> Usage:
    """CPU time and resident memory of process ``pid``, from ``/proc``."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    # Fields after the command name (which is in parentheses and may hold spaces).
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    waited_ns = int(Path(f"/proc/{pid}/schedstat").read_text().split()[1])
    return Usage(ticks / os.sysconf("SC_CLK_TCK"), rss, waited_ns / 1e9)


class ServerProcess:
    """A running server: its ``port``, its ``pid``, and commands over the pipe."""

    def __init__(self, side: Side, port: int, pid: int, conn: Connection) -> None:
        self.side = side
        self.port = port
        self.pid = pid
        self._conn = conn

    def usage(self) -> Usage:
        return usage(self.pid)

    def command(self, *message: object) -> Any:
        """Send a command; wait for and return its answer."""
        self._conn.send(message)
        if not self._conn.poll(READY_TIMEOUT):
            raise RuntimeError(f"the {self.side} server did not answer {message[0]!r}")
        return self._conn.recv()


@contextmanager
def server_process(side: Side, certs: Certs, *, queue: int = 10_000) -> Iterator[ServerProcess]:
    """Run the ``side`` server until the block ends. ``queue``: readings per client queued
    in ours before it drops the oldest (the peer has no queue: it waits for every send)."""
    with spawned(
        _main,
        (side, certs, queue),
        f"wss-{side}",
        stop=("stop",),
        ready_timeout=READY_TIMEOUT,
        stop_timeout=STOP_TIMEOUT * 2,
    ) as (process, ours, where):
        assert process.pid is not None
        assert isinstance(where, int)
        yield ServerProcess(side, where, process.pid, ours)


class ClientGroup:
    """The client processes of one run."""

    def __init__(self) -> None:
        self.processes: list[tuple[str, Any, Connection]] = []

    def start(self, target: Callable[..., None], role: str, *args: object) -> None:
        """Spawn ``target(role, conn, *args)``; ``conn`` is its end of the pipe."""
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=target, args=(role, theirs, *args), name=f"bench-{role}")
        process.start()
        theirs.close()
        self.processes.append((role, process, ours))

    def expect(self, status: str, timeout: float = READY_TIMEOUT) -> list[Any]:
        """Every client's next message, which must be ``status``; their payloads."""
        out = []
        for role, process, conn in self.processes:
            if not conn.poll(timeout):
                raise RuntimeError(f"the {role} client sent no {status!r} within {timeout:g}s")
            try:
                got, payload = conn.recv()
            except EOFError:
                process.join(STOP_TIMEOUT)
                raise RuntimeError(f"the {role} client exited (code {process.exitcode})") from None
            if got != status:
                raise RuntimeError(f"the {role} client failed: {payload}")
            out.append(payload)
        return out

    def send(self, message: object) -> None:
        for _, _, conn in self.processes:
            conn.send(message)

    def stop(self) -> None:
        for _, process, conn in self.processes:
            process.join(STOP_TIMEOUT)
            if process.is_alive():
                process.terminate()
                process.join(STOP_TIMEOUT)
            conn.close()


@contextmanager
def client_processes() -> Iterator[ClientGroup]:
    group = ClientGroup()
    try:
        yield group
    finally:
        group.stop()


# ---- the server processes -------------------------------------------------------------------


def _main(side: Side, certs: Certs, queue: int, conn: Connection) -> None:
    pin("server")
    quiet_logs()
    raise_open_files_limit()
    try:
        if side != "peer":
            import trio

            interval = PACED_INTERVAL if side == "ours-paced" else 0.0
            trio.run(_serve_ours, certs, queue, interval, conn)
        else:
            asyncio.run(_serve_peer(certs, conn))
    except Exception as e:  # reported to the parent, which raises it
        with suppress(OSError):  # the parent is gone
            conn.send(("error", f"{type(e).__name__}: {e}"))
        raise
    finally:
        conn.close()


class _Commands:
    """The pipe's commands, the same for both servers: ``profile-start``, ``profile-stop
    <path>`` (writes the profile there) and ``stop``; returns False on ``stop``."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.profiler: cProfile.Profile | None = None

    def handle(self) -> bool:
        try:
            message = self.conn.recv()
        except EOFError:  # the parent is gone
            return False
        name = message[0]
        if name == "profile-start":
            self.profiler = cProfile.Profile()
            self.profiler.enable()
            self.conn.send("ok")
        elif name == "profile-stop":
            if self.profiler is not None:
                self.profiler.disable()
                self.profiler.dump_stats(message[1])
                self.profiler = None
            self.conn.send("ok")
        elif name == "stop":
            return False
        else:
            self.conn.send(f"unknown command {name!r}")
        return True


def _section(certs: Certs, queue: int, frame_interval: float = 0.0) -> Any:
    from gateway.core.configtypes import Duration, Name, Secret, Size
    from gateway.deviceauth import DeviceClient, DevicePlaneSection, hash_token

    clients = (
        DeviceClient(
            id=Name(PUBLISHER_ID),
            token_sha256=hash_token(PUBLISHER_TOKEN),
            publish=("+",),
        ),
        DeviceClient(
            id=Name("bench-sub"),
            token_sha256=hash_token(SUBSCRIBER_TOKEN),
            subscribe=("#",),
        ),
    )
    section = DevicePlaneSection(
        listen="127.0.0.1",
        port=0,
        tls_cert_file=Secret(certs.cert, certs.cert.read_text()),
        tls_key_file=Secret(certs.key, certs.key.read_text()),
        clients=clients,
        max_connections=5000,
        max_message_size=Size(1024 * 1024),
        # Far above what one publisher can send: the benchmark measures fan-out, not limits.
        messages_per_second=1e6,
        bytes_per_second=Size(1 << 34),
        queue=queue,
        send_timeout=Duration(30.0),
        frame_interval=Duration(frame_interval),
        handshake_timeout=Duration(30.0),
    )
    # Port 0 (any free port) is for tests and benchmarks: the config file must name one.
    problems = [p for p in section.check() if p[0] != "port"]
    if problems:
        raise ValueError(f"bench device_plane section: {problems}")
    return section


async def _serve_ours(certs: Certs, queue: int, frame_interval: float, conn: Connection) -> None:
    import trio

    from gateway.app import settle_memory
    from gateway.deviceplane import DevicePlane
    from gateway.hub import Hub

    plane = DevicePlane(_section(certs, queue, frame_interval), Hub(), shutdown_timeout=1.0)
    commands = _Commands(conn)
    async with trio.open_nursery() as nursery:
        await nursery.start(plane.run)
        settle_memory()  # as the daemon does once it is ready
        conn.send(("ready", plane.port))
        while True:
            await trio.lowlevel.wait_readable(conn.fileno())
            if not commands.handle():
                break
        nursery.cancel_scope.cancel()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _serve_peer(certs: Certs, conn: Connection) -> None:
    """The obvious ``websockets`` fan-out server."""
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed
    from websockets.http11 import Request, Response

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certs.cert, certs.key)
    tokens = {f"Bearer {PUBLISHER_TOKEN}": PUBLISHER_ID, f"Bearer {SUBSCRIBER_TOKEN}": "bench-sub"}
    subscribers: set[ServerConnection] = set()

    def check_token(connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Authorization") not in tokens:
            return connection.respond(401, "no or unknown token\n")
        return None

    async def handler(ws: ServerConnection) -> None:
        client_id = tokens[ws.request.headers["Authorization"]] if ws.request else "?"
        try:
            async for data in ws:
                message = json.loads(data)
                kind = message.get("type")
                if kind == "subscribe":
                    subscribers.add(ws)
                elif kind == "publish":
                    now = datetime.now(UTC).timestamp()
                    for item in message["readings"]:
                        reading = {
                            "topic": f"devices/{client_id}/{item['point']}",
                            "value": item["value"],
                            "quality": "good",
                            "ts": _iso(now),
                        }
                        frame = json.dumps({"type": "readings", "readings": [reading]})
                        for subscriber in list(subscribers):
                            try:
                                await subscriber.send(frame)
                            except ConnectionClosed:
                                subscribers.discard(subscriber)
                    await ws.send(json.dumps({"type": "ack", "id": message["id"]}))
                elif kind == "ping":
                    await ws.send(json.dumps({"type": "pong", "id": message.get("id")}))
        finally:
            subscribers.discard(ws)

    loop = asyncio.get_running_loop()
    commands = _Commands(conn)
    stop = asyncio.Event()

    def on_command() -> None:
        if not commands.handle():
            stop.set()

    async with serve(
        handler,
        "127.0.0.1",
        0,
        ssl=context,
        compression=None,
        process_request=check_token,
        max_size=1024 * 1024,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        loop.add_reader(conn.fileno(), on_command)
        conn.send(("ready", port))
        await stop.wait()
        loop.remove_reader(conn.fileno())
        server.close(close_connections=False)
        for ws in list(server.connections):
            ws.transport.abort()
