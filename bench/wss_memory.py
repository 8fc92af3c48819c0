"""Idle wss connections: the server's resident memory per open, authenticated, subscribed
connection, ours (``DevicePlane``) against the obvious ``websockets`` server.

Each side gets a fresh server process (``bench.wss_servers``). One client process (the
``websockets`` asyncio client, pinned to the other CPU) first opens ``WARMUP`` connections, so
that one-time costs (the first handshake, lazily imported modules, allocator arenas) land in
the baseline; the parent reads the server's ``VmRSS`` from ``/proc/<pid>/status``. Then the
client opens ``CONNECTIONS`` more over TLS, each authenticated with a bearer token and
subscribed to a topic nothing is published on, each confirmed by a ping's pong, and the
parent reads ``VmRSS`` again once it has settled. The growth divided by the connections is
what one idle connection costs the server: TLS state, buffers, WebSocket state, tasks,
subscription.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import suppress
from multiprocessing.connection import Connection
from typing import Any

import attrs

from bench.timing import table
from bench.wss_servers import (
    QUIET,
    READY_TIMEOUT,
    SIDES,
    SUBSCRIBER_TOKEN,
    Certs,
    Side,
    certificates,
    client_processes,
    connect,
    quiet_logs,
    raise_open_files_limit,
    receive_command,
    server_process,
)

CONNECTIONS = 1000
WARMUP = 20
"""Connections opened before the baseline is read (and kept open)."""
CONCURRENT = 50
"""Handshakes in progress at once while opening the connections."""
SETTLE = 0.5
"""Seconds between the last pong and reading the server's RSS."""
SPARE_FILES = 64
"""Files a process needs besides its connections (libraries, pipes, the listener)."""
GOAL_KIB = 64


@attrs.frozen
class Outcome:
    side: Side
    connections: int
    before_kib: int
    after_kib: int

    @property
    def per_connection_kib(self) -> float:
        return (self.after_kib - self.before_kib) / self.connections


def _client_main(role: str, conn: Connection, port: int, certs: Certs) -> None:
    raise_open_files_limit()
    quiet_logs()
    try:
        asyncio.run(_client(conn, port, certs))
    except Exception as e:  # reported to the parent, which raises it
        with suppress(OSError):
            conn.send(("error", f"{type(e).__name__}: {e}"))
        raise
    finally:
        conn.close()


async def _open(port: int, certs: Certs, count: int) -> list[Any]:
    """``count`` connections, subscribed and confirmed, ``CONCURRENT`` handshakes at a time."""
    gate = asyncio.Semaphore(CONCURRENT)

    async def one() -> Any:
        async with gate:
            ws = await connect(port, certs, SUBSCRIBER_TOKEN)
            await ws.send(json.dumps({"type": "subscribe", "topics": [QUIET]}))
            await ws.send(json.dumps({"type": "ping", "id": "ready"}))
            if json.loads(await ws.recv()) != {"type": "pong", "id": "ready"}:
                raise RuntimeError("the server did not answer the ping after subscribe")
            return ws

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def _client(conn: Connection, port: int, certs: Certs) -> None:
    connections = await _open(port, certs, WARMUP)
    conn.send(("ready", len(connections)))
    count = await receive_command(conn)
    connections += await _open(port, certs, count)
    conn.send(("ready", len(connections)))
    await receive_command(conn)  # stop
    for ws in connections:
        ws.transport.abort()


def run_one(side: Side, certs: Certs, connections: int) -> Outcome:
    with server_process(side, certs) as server, client_processes() as group:
        group.start(_client_main, "idle-clients", server.port, certs)
        group.expect("ready")
        time.sleep(SETTLE)
        before = server.usage().rss_kib
        group.send(connections)
        group.expect("ready", READY_TIMEOUT + connections * 0.05)
        time.sleep(SETTLE)
        after = server.usage().rss_kib
        group.send("stop")
    return Outcome(side, connections, before, after)


def run(connections: int = CONNECTIONS) -> None:
    open_files = raise_open_files_limit()
    possible = open_files - WARMUP - SPARE_FILES
    notes = []
    if possible < connections:
        notes.append(
            f"- the open-files limit is {open_files} (soft = hard): {connections} connections "
            f"are not possible here, measured {possible}; raise it with 'ulimit -Hn' as root"
        )
        connections = possible
    with certificates() as certs:
        outcomes = [run_one(side, certs, connections) for side in SIDES]
    rows = [
        [
            "ours: DevicePlane (trio)" if o.side == "ours" else "peer: websockets (asyncio)",
            str(o.connections),
            f"{o.before_kib / 1024:.1f}",
            f"{o.after_kib / 1024:.1f}",
            f"{o.per_connection_kib:.1f}",
        ]
        for o in outcomes
    ]
    ours, peer = outcomes
    rows[0].append(f"{ours.per_connection_kib / peer.per_connection_kib:.2f}x")
    rows[1].append("1.00x")
    print(
        f"Idle wss connections: server RSS growth for {connections} open connections (TLS, "
        "bearer token, subscribed to a quiet topic, confirmed by a pong), each server in its "
        f"own process; baseline read with {WARMUP} connections already open"
    )
    headers = ["server", "connections", "RSS before MiB", "RSS after MiB", "KiB/connection"]
    print(table([*headers, "ours/peer"], rows))
    print(f"- open files limit: {open_files} (soft, raised to the hard limit)")
    for note in notes:
        print(note)
    verdict = "MET" if ours.per_connection_kib <= GOAL_KIB else "NOT MET"
    print(
        f"goal ours <= {GOAL_KIB} KiB per connection: {verdict} ({ours.per_connection_kib:.1f} KiB)"
    )


def profile() -> None:
    """Nothing to profile: this benchmark measures memory, not time."""
    print("wss-memory measures memory, not time: nothing to profile; running it instead")
    run()
