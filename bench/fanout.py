"""Device-plane fan-out: 1 publisher, N subscribers, ours (``DevicePlane``) against a peer.

Each scenario starts a fresh server process (``bench.wss_servers``: ours, or the obvious
``websockets`` server), then the clients, all ``websockets`` asyncio clients in processes of
their own, pinned to the other CPU than the server: two processes share the subscribers, one
publishes. The publisher sends protocol v1 ``publish`` messages of ``BATCH`` readings whose
``value`` is ``time.monotonic()`` when the message was built (system-wide on Linux, so the
subscribers' clocks agree); each subscriber parses every frame and takes, per reading, its
receipt time minus that value. Both servers get the same messages and send the same
``readings`` frames (the peer one reading per frame, ours as many as are waiting).

Two modes, each run for ``DURATION`` seconds of which the first ``WARMUP`` are not counted:
- **max**: the publisher keeps ``WINDOW`` publishes unacknowledged, so it sends as fast as the
  server takes them; delivered readings/s is the sum over subscribers of readings received in
  the window (ours drops the oldest for a subscriber whose ``queue`` overflows: the
  ``dropped`` column counts what the ``gap`` frames reported);
- **rate**: ``RATE`` readings/s, one publish every ``BATCH / RATE`` seconds; latency is what
  counts there.

CPU columns: the server's CPU time over the window from ``/proc/<pid>/stat`` (100% = one
core, all it may use), and the clients' (the publisher's and subscribers', also one core):
near 100% for the clients means they, not the server, set the pace.
"""

from __future__ import annotations

import array
import asyncio
import json
import math
import os
import pstats
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import attrs

from bench.timing import table
from bench.wss_servers import (
    PACED_INTERVAL,
    PUBLISHER_TOKEN,
    READY_TIMEOUT,
    SIDES,
    SUBSCRIBER_TOKEN,
    TOPICS,
    Certs,
    ServerProcess,
    Side,
    certificates,
    client_processes,
    connect,
    quiet_logs,
    raise_open_files_limit,
    receive_command,
    server_process,
)

DURATION = 3.0
WARMUP = 0.5
"""Seconds at the start of each run that are not counted (connections and caches warm up)."""
BATCH = 10
"""Readings per publish."""
WINDOW = 4
"""Publishes in flight (sent, not acknowledged yet) in the max mode."""
RATE = 1000.0
"""Readings per second in the rate mode."""
QUEUE = 10_000
"""Ours: readings queued per subscriber before the oldest are dropped."""
SUBSCRIBER_PROCESSES = 2
GOAL_RATIO = 1.5
"""Ours / peer delivered readings/s at 100 subscribers, max mode."""
GOAL_P99_MS = 20.0
"""Ours' p99 latency at ``RATE`` readings/s to 100 subscribers."""

Mode = Literal["max", "rate"]

NAMES: dict[Side, str] = {
    "ours": "ours: DevicePlane (trio)",
    "ours-paced": f"ours, frame_interval {PACED_INTERVAL * 1000:g}ms",
    "peer": "peer: websockets (asyncio)",
}


@attrs.frozen
class Scenario:
    mode: Mode
    subscribers: int

    def describe(self) -> str:
        return "max" if self.mode == "max" else f"{RATE:,.0f}/s"


SCENARIOS = (Scenario("max", 10), Scenario("max", 100), Scenario("rate", 100))


def sides(scenario: Scenario) -> tuple[Side, ...]:
    """Ours as shipped and the peer; at 100 subscribers also ours with a ``frame_interval``."""
    paced: tuple[Side, ...] = ("ours-paced",) if scenario.subscribers == 100 else ()
    return ("ours", *paced, "peer")


# ---- the clients (each in its own process) --------------------------------------------------


@attrs.frozen
class SubscriberResult:
    latencies: bytes
    """``array('d')`` of seconds, one per reading received in the window."""
    frames: int
    dropped: int
    cpu_seconds: float


@attrs.frozen
class PublisherResult:
    published: int
    """Readings sent in the window."""
    acked: int
    cpu_seconds: float
    late_ms: float
    """Rate mode: how far the latest publish was behind its schedule."""


@attrs.frozen
class Plan:
    """Sent to every client with ``go``: times are ``time.monotonic()``."""

    start: float
    window_start: float
    window_end: float
    mode: Mode
    batch: int = BATCH
    rate: float = RATE
    window: int = WINDOW


def _client_main(role: str, conn: Connection, port: int, certs: Certs, count: int) -> None:
    raise_open_files_limit()
    quiet_logs()
    try:
        if role == "publisher":
            asyncio.run(_publisher(conn, port, certs))
        else:
            asyncio.run(_subscribers(conn, port, certs, count))
    except Exception as e:  # reported to the parent, which raises it
        with suppress(OSError):
            conn.send(("error", f"{type(e).__name__}: {e}"))
        raise
    finally:
        conn.close()


async def _sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.monotonic()))


async def _subscribers(conn: Connection, port: int, certs: Certs, count: int) -> None:
    connections = []
    for _ in range(count):
        ws = await connect(port, certs, SUBSCRIBER_TOKEN)
        await ws.send(json.dumps({"type": "subscribe", "topics": [TOPICS]}))
        connections.append(ws)
    for ws in connections:  # a pong after the subscribe: it was taken
        await ws.send(json.dumps({"type": "ping", "id": "ready"}))
        if json.loads(await ws.recv()) != {"type": "pong", "id": "ready"}:
            raise RuntimeError("the server did not answer the ping after subscribe")
    conn.send(("ready", None))
    plan: Plan = await receive_command(conn)
    latencies = array.array("d")
    counts = [0, 0]  # frames, dropped (in the window)
    window = (plan.window_start, plan.window_end)

    async def receive(ws: Any) -> None:
        monotonic, loads = time.monotonic, json.loads
        async for data in ws:
            now = monotonic()
            frame = loads(data)
            if not window[0] <= now < window[1]:
                continue
            kind = frame["type"]
            if kind == "readings":
                counts[0] += 1
                latencies.extend([now - r["value"] for r in frame["readings"]])
            elif kind == "gap":
                counts[1] += frame["dropped"]

    tasks = [asyncio.create_task(receive(ws)) for ws in connections]
    await _sleep_until(plan.window_start)
    cpu = time.process_time()
    await _sleep_until(plan.window_end)
    cpu = time.process_time() - cpu
    for task in tasks:
        task.cancel()
    conn.send(("result", SubscriberResult(latencies.tobytes(), counts[0], counts[1], cpu)))
    for ws in connections:
        ws.transport.abort()


async def _publisher(conn: Connection, port: int, certs: Certs) -> None:
    ws = await connect(port, certs, PUBLISHER_TOKEN)
    conn.send(("ready", None))
    plan: Plan = await receive_command(conn)
    in_flight = asyncio.Semaphore(plan.window)
    acked = [0]

    async def read_acks() -> None:
        async for data in ws:
            frame = json.loads(data)
            if frame["type"] != "ack":
                raise RuntimeError(f"the server refused a publish: {data}")
            acked[0] += 1
            in_flight.release()

    reader = asyncio.create_task(read_acks())
    points = [f"p{i}" for i in range(plan.batch)]
    published = sent = 0
    late = 0.0
    cpu = 0.0
    counting = False
    await _sleep_until(plan.start)
    while True:
        if plan.mode == "max":
            await in_flight.acquire()
        else:
            due = plan.start + sent * plan.batch / plan.rate
            await _sleep_until(due)
            late = max(late, time.monotonic() - due)
        now = time.monotonic()
        if now >= plan.window_end:
            break
        if not counting and now >= plan.window_start:
            counting, cpu = True, time.process_time()
        readings = [{"point": point, "value": time.monotonic()} for point in points]
        message = {"type": "publish", "id": f"m{sent}", "readings": readings}
        await ws.send(json.dumps(message))
        sent += 1
        published += plan.batch if counting else 0
    cpu = time.process_time() - cpu
    reader.cancel()
    result = PublisherResult(published, acked[0], cpu, late * 1000 if plan.mode == "rate" else 0)
    conn.send(("result", result))
    ws.transport.abort()


# ---- the parent -----------------------------------------------------------------------------


@attrs.frozen
class Outcome:
    side: Side
    scenario: Scenario
    seconds: float
    published: int
    readings: int
    frames: int
    dropped: int
    latencies: list[float]
    """Sorted, seconds."""
    server_cpu: float
    """Seconds over the window."""
    server_waited: float
    """Seconds the server was ready to run but another process had its CPU."""
    client_cpu: float
    late_ms: float

    @property
    def delivered_rate(self) -> float:
        return self.readings / self.seconds

    def quantile_ms(self, q: float) -> float:
        if not self.latencies:
            return math.nan
        index = min(len(self.latencies) - 1, math.ceil(q * len(self.latencies)) - 1)
        return self.latencies[index] * 1000

    @property
    def client_bound(self) -> bool:
        return self.client_cpu / self.seconds >= 0.9


def run_one(
    side: Side,
    scenario: Scenario,
    certs: Certs,
    on_window: Callable[[ServerProcess, bool], None] | None = None,
) -> Outcome:
    """One scenario against a fresh ``side`` server. ``on_window(server, started)`` is
    called at the start and the end of the measuring window (profiling)."""
    with server_process(side, certs, queue=QUEUE) as server, client_processes() as group:
        per_process = [
            len(part)
            for part in _split(range(scenario.subscribers), SUBSCRIBER_PROCESSES)
            if len(part)
        ]
        for count in per_process:
            group.start(_client_main, "subscribers", server.port, certs, count)
        group.start(_client_main, "publisher", server.port, certs, 0)
        # Subscribed (a pong followed the subscribe) and connected; nothing is published
        # before the plan arrives.
        group.expect("ready")
        start = time.monotonic() + 0.2
        plan = Plan(start, start + WARMUP, start + DURATION, scenario.mode, BATCH, RATE, WINDOW)
        group.send(plan)
        time.sleep(max(0.0, plan.window_start - time.monotonic()))
        before = server.usage()
        if on_window:
            on_window(server, True)
        time.sleep(max(0.0, plan.window_end - time.monotonic()))
        after = server.usage()
        if on_window:
            on_window(server, False)
        results = group.expect("result", DURATION + READY_TIMEOUT)
    subscribers: list[SubscriberResult] = results[:-1]
    publisher: PublisherResult = results[-1]
    latencies: list[float] = []
    for s in subscribers:
        latencies.extend(array.array("d", s.latencies))
    latencies.sort()
    return Outcome(
        side=side,
        scenario=scenario,
        seconds=plan.window_end - plan.window_start,
        published=publisher.published,
        readings=len(latencies),
        frames=sum(s.frames for s in subscribers),
        dropped=sum(s.dropped for s in subscribers),
        latencies=latencies,
        server_cpu=after.cpu_seconds - before.cpu_seconds,
        server_waited=after.waited_seconds - before.waited_seconds,
        client_cpu=publisher.cpu_seconds + sum(s.cpu_seconds for s in subscribers),
        late_ms=publisher.late_ms,
    )


def _split(items: Sequence[int], parts: int) -> list[Sequence[int]]:
    return [items[i::parts] for i in range(parts)]


def run() -> None:
    open_files = raise_open_files_limit()
    outcomes: dict[tuple[Scenario, Side], Outcome] = {}
    with certificates() as certs:
        for scenario in SCENARIOS:
            for side in sides(scenario):
                outcomes[scenario, side] = run_one(side, scenario, certs)
    headers = [
        "server",
        "mode",
        "subs",
        "published/s",
        "delivered readings/s",
        "readings/frame",
        "p50 ms",
        "p99 ms",
        "dropped",
        "server CPU",
        "CPU stolen",
        "clients CPU",
        "ours/peer",
    ]
    rows = []
    for scenario in SCENARIOS:
        peer = outcomes[scenario, "peer"]
        for o in (outcomes[scenario, side] for side in sides(scenario)):
            name = NAMES[o.side]
            ratio = o.delivered_rate / peer.delivered_rate if peer.readings else math.inf
            rows.append(
                [
                    name,
                    scenario.describe(),
                    str(scenario.subscribers),
                    f"{o.published / o.seconds:,.0f}",
                    f"{o.delivered_rate:,.0f}",
                    f"{o.readings / o.frames:.1f}" if o.frames else "-",
                    f"{o.quantile_ms(0.5):.1f}",
                    f"{o.quantile_ms(0.99):.1f}",
                    str(o.dropped),
                    f"{o.server_cpu / o.seconds:.0%}",
                    f"{o.server_waited / o.seconds:.0%}",
                    f"{o.client_cpu / o.seconds:.0%}" + ("*" if o.client_bound else ""),
                    f"{ratio:.2f}x" if o.side != "peer" else "1.00x",
                ]
            )
    print(
        f"Device plane fan-out: 1 publisher ({BATCH} readings per publish), N subscribers, "
        "wss (TLS, trustme cert) on 127.0.0.1; each server in its own process on its own CPU, "
        "the clients (websockets asyncio) in 3 processes on the other"
    )
    print(table(headers, rows))
    print(
        f"- {DURATION:g} s per run, the first {WARMUP:g} s not counted; max: {WINDOW} publishes "
        f"in flight; {RATE:,.0f}/s: one publish of {BATCH} every {BATCH / RATE * 1000:g} ms; "
        "latency = receipt (after parsing the frame) minus the publisher's time.monotonic() "
        "in the reading"
    )
    print(
        "- published/s: readings the publisher sent in the window; delivered: summed over "
        "subscribers; CPU 100% = one core; CPU stolen: time the server was ready to run while "
        "another process (not this benchmark's) had its core, i.e. noise; * = the clients' "
        "core was saturated, so that row is a lower bound of what its server can do"
    )
    print(
        f"- {NAMES['ours-paced']}: ours with that setting (the default is 0: each delivery "
        "goes at once); it trades latency and CPU at a steady rate for throughput at saturation"
    )
    rate_runs = [o for o in outcomes.values() if o.scenario.mode == "rate"]
    for o in rate_runs:
        expected = RATE * o.scenario.subscribers
        if o.delivered_rate < 0.95 * expected:
            print(
                f"- {o.side}: delivered {o.delivered_rate:,.0f} readings/s of the "
                f"{expected:,.0f} expected at {RATE:,.0f}/s: it cannot keep up, so its "
                "latency grows for as long as the run lasts"
            )
        if o.late_ms > BATCH / RATE * 1000:
            print(f"- {o.side}: the publisher fell behind its schedule by up to {o.late_ms:.0f} ms")
    if open_files < 1024:
        print(f"- open files limit is {open_files}: fewer connections than planned may open")

    big = max(s.subscribers for s in SCENARIOS if s.mode == "max")
    ours, peer = outcomes[Scenario("max", big), "ours"], outcomes[Scenario("max", big), "peer"]
    ratio = ours.delivered_rate / peer.delivered_rate if peer.readings else math.inf
    print(
        f"goal ours >= {GOAL_RATIO:.1f}x peer delivered readings/s at {big} subscribers: "
        f"{'MET' if ratio >= GOAL_RATIO else 'NOT MET'} ({ratio:.2f}x)"
    )
    rate = outcomes[Scenario("rate", 100), "ours"]
    p99 = rate.quantile_ms(0.99)
    kept_up = rate.delivered_rate >= 0.95 * RATE * 100 and not rate.dropped
    met = p99 < GOAL_P99_MS and kept_up
    print(
        f"goal ours p99 < {GOAL_P99_MS:g} ms at {RATE:,.0f} readings/s to 100 subscribers: "
        f"{'MET' if met else 'NOT MET'} (p99 {p99:.1f} ms"
        + ("" if kept_up else ", and it did not deliver every reading")
        + ")"
    )


# ---- profiling ------------------------------------------------------------------------------

# (label, test on cProfile's (filename, function name)); the first match wins.
LAYERS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("TLS: encrypt, decrypt (_ssl)", lambda f, n: f == "~" and "_ssl." in n),
    ("socket send/recv (syscalls)", lambda f, n: f == "~" and "_socket.socket" in n),
    ("epoll", lambda f, n: f == "~" and "epoll" in n),
    ("JSON (json, _json)", lambda f, n: "/json/" in f or (f == "~" and "_json" in n)),
    ("trio scheduler (trio/_core)", lambda f, n: "/trio/_core/" in f),
    ("trio SSLStream (trio/_ssl.py)", lambda f, n: f.endswith("/trio/_ssl.py")),
    ("trio sockets, streams, locks", lambda f, n: "/trio/" in f),
    ("trio-websocket", lambda f, n: "/trio_websocket/" in f),
    ("wsproto", lambda f, n: "/wsproto/" in f),
    ("asyncio loop, transports, sslproto", lambda f, n: "/asyncio/" in f or "selectors" in f),
    ("websockets", lambda f, n: "/websockets/" in f),
    ("our device plane (gateway/deviceplane.py)", lambda f, n: f.endswith("deviceplane.py")),
    ("our protocol (gateway/protocol.py)", lambda f, n: f.endswith("gateway/protocol.py")),
    ("our hub (gateway/hub.py)", lambda f, n: f.endswith("gateway/hub.py")),
    ("Reading (gateway/core/reading.py)", lambda f, n: f.endswith("core/reading.py")),
    ("cattrs, attrs", lambda f, n: "cattrs" in f or "/attr" in f or "<attrs generated" in f),
    (
        "datetime, enum, contextlib, outcome",
        lambda f, n: any(s in f for s in ("datetime", "enum", "contextlib", "outcome")),
    ),
]
OTHER = "other (builtins, the bench's commands)"


def report(stats: pstats.Stats, readings: int, top: int = 16) -> str:
    """Self time by layer and the top functions, per delivered reading."""
    table_: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    table_ = stats.stats  # type: ignore[attr-defined]
    layers: dict[str, float] = {}
    total = 0.0
    calls = 0
    for (filename, _, name), (_, ncalls, tottime, _, _) in table_.items():
        total += tottime
        calls += ncalls
        label = next((label for label, test in LAYERS if test(filename, name)), OTHER)
        layers[label] = layers.get(label, 0.0) + tottime
    per = max(readings, 1)
    lines = [
        f"{calls / per:.1f} Python function calls per delivered reading; "
        f"{total / per * 1e6:.1f} us per delivered reading under cProfile, self time by layer:"
    ]
    for label, seconds in sorted(layers.items(), key=lambda kv: -kv[1]):
        share = seconds / total * 100 if total else 0.0
        if share >= 0.5:
            lines.append(f"  {seconds / per * 1e6:7.2f} us  {share:4.1f}%  {label}")
    lines.append(f"top {top} functions by self time (us per reading, calls per reading):")
    ranked = sorted(table_.items(), key=lambda kv: -kv[1][2])[:top]
    for (filename, lineno, name), (_, ncalls, tottime, _, _) in ranked:
        where = name if filename == "~" else f"{_short(filename)}:{lineno}({name})"
        lines.append(f"  {tottime / per * 1e6:7.2f} us  {ncalls / per:6.2f}  {where}")
    return "\n".join(lines)


def _short(filename: str) -> str:
    root = f"{Path(__file__).resolve().parent.parent}/"
    if filename.startswith(root):
        return filename[len(root) :]
    marker = "site-packages/"
    if marker in filename:
        return filename.split(marker, 1)[1]
    return os.path.basename(filename)


def profile() -> None:
    """cProfile each server over the measuring window of the 100-subscriber runs; print where
    its time goes per delivered reading."""
    raise_open_files_limit()
    with certificates() as certs, tempfile.TemporaryDirectory(prefix="bench-prof-") as tmp:
        for scenario in (Scenario("max", 100), Scenario("rate", 100)):
            for side in SIDES:
                path = str(Path(tmp) / f"{side}-{scenario.mode}.prof")

                def window(server: ServerProcess, started: bool, path: str = path) -> None:
                    if started:
                        server.command("profile-start")
                    else:
                        server.command("profile-stop", path)

                outcome = run_one(side, scenario, certs, window)
                print(
                    f"--- {side} server, {scenario.describe()} to {scenario.subscribers} "
                    f"subscribers: {outcome.delivered_rate:,.0f} delivered readings/s under "
                    f"cProfile, {outcome.readings / max(outcome.frames, 1):.1f} readings/frame, "
                    f"server CPU {outcome.server_cpu / outcome.seconds:.0%}"
                )
                print(report(pstats.Stats(path), outcome.readings))
