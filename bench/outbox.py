"""The CPI path: ingest into the SQLite outbox and the drain of a backlog to CPI, each against
the naive way of doing it, in the same run.

**Drain.** An outbox (``gateway.outbox.Outbox``, a temporary file) is filled with
``DRAIN_READINGS`` readings; then the CPI stand-in (``gateway.cpistandin``: hypercorn, real
TLS with a trustme certificate, Basic auth, CSRF on as CPI ships it) comes up in a process of
its own, pinned to the other CPU, and ``gateway.forwarder.Forwarder`` with the shipped
``[cpi]`` defaults (JSON, 1000 readings / 250 KB per batch, 1 s linger) drains the backlog.
Timed from the forwarder's start (its first linger included) until the outbox is empty.
The peer: what a simple middleware does, one httpx POST per reading (keep-alive, the CSRF
token fetched once), run for ``NAIVE_SECONDS`` against the same stand-in and extrapolated.

**Ingest.** Readings committed through ``Outbox.append`` in groups of ``commit_readings`` (as
``Outbox.feed`` commits them), and through the hub (``Hub.publish`` -> subscription ->
``Outbox.feed``) with the shipped ``[outbox]`` settings. The peer: one SQLite transaction per
reading, same file settings (WAL, the same ``synchronous``). fsyncs are counted by running the
same work again in a child process under ``strace -c`` (the count of an empty open and close
subtracted); without strace they are estimated from the commit count.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import multiprocessing
import re
import shutil
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from bench import profiling
from bench.peers import pin
from bench.timing import table
from bench.wss_servers import READY_TIMEOUT, Certs, certificates
from gateway.core.configtypes import Secret
from gateway.core.reading import Reading
from gateway.cpistandin import CpiStandIn, serve_standin
from gateway.forwarder import CpiSection, Forwarder
from gateway.hub import Hub, OverflowPolicy
from gateway.outbox import Outbox, OutboxSection

DRAIN_READINGS = 1_000_000
"""The backlog (issue 8: 1,000,000)."""
FILL_GROUP = 10_000
"""Readings per transaction while filling the backlog (not measured)."""
NAIVE_SECONDS = 3.0
INGEST_READINGS = 200_000
NAIVE_STORE_SECONDS = 2.0
GOAL_DRAIN = 50_000.0
"""Readings/s drained."""
GOAL_REQUEST_RATIO = 100.0
"""Naive requests / ours, for the same readings."""
GOAL_INGEST = 100_000.0
"""Readings/s committed."""

GATEWAY = "bench-gw"
PATH = "/http/edge/readings"
CLIENT_ID = "sb-bench"
CLIENT_SECRET = "bench-client-secret"
CSRF = True

log = logging.getLogger("bench.outbox")


def readings(start: int, count: int) -> list[Reading]:
    """Readings shaped as a Modbus bus produces them (~110 bytes of JSON each)."""
    t0 = 1_790_000_000.0
    return [
        Reading(
            f"line-1/plc-{i % 8}/temperature-{i % 32}",
            round(20.0 + (i % 500) / 10, 1),
            unit="degC",
            timestamp=t0 + i / 1000,
        )
        for i in range(start, start + count)
    ]


def quiet() -> None:
    # The forwarder logs every batch at debug and hypercorn every connection; noise here.
    logging.getLogger("gateway").setLevel(logging.WARNING)
    logging.getLogger("hypercorn").setLevel(logging.CRITICAL + 10)


# ---- the CPI stand-in, in its own process ---------------------------------------------------


def _standin_stats(app: CpiStandIn) -> dict[str, Any]:
    seqs = app.seqs()
    return {
        "batches": len(app.batches),
        "readings": len(seqs),
        "in_order": all(a < b for a, b in itertools.pairwise(seqs)),
        "duplicates": app.duplicates,
        "posts": len(app.statuses("POST")),
        "other_requests": sum(1 for r in app.requests if r.method != "POST"),
        "not_2xx": sum(1 for s in app.statuses("POST") if not 200 <= s < 300),
    }


async def _standin(conn: Connection, certs: Certs) -> None:
    # Each batch's sequence numbers are kept, not its body (a million readings' bodies would
    # only cost memory here).
    app = CpiStandIn(
        path=PATH,
        auth="basic",
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        csrf=CSRF,
        keep_bodies=False,
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            functools.partial(serve_standin, app, cert_file=certs.cert, key_file=certs.key)
        )
        conn.send(("port", port))
        while True:
            command = await trio.to_thread.run_sync(conn.recv)
            if command == "stats":
                conn.send(_standin_stats(app))
            elif command == "reset":
                app.batches.clear()
                app.requests.clear()
                app.duplicates = 0
                conn.send("ok")
            else:
                break
        nursery.cancel_scope.cancel()


def _standin_main(conn: Connection, certs: Certs) -> None:
    pin("server")
    quiet()
    try:
        trio.run(_standin, conn, certs)
    finally:
        conn.close()


@attrs.frozen
class StandIn:
    port: int
    conn: Connection

    def command(self, command: str) -> Any:
        self.conn.send(command)
        if not self.conn.poll(READY_TIMEOUT):
            raise RuntimeError(f"the CPI stand-in did not answer {command!r}")
        return self.conn.recv()


@contextmanager
def standin_process(certs: Certs) -> Iterator[StandIn]:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    process = ctx.Process(target=_standin_main, args=(theirs, certs), daemon=True)
    process.start()
    try:
        if not ours.poll(READY_TIMEOUT):
            raise RuntimeError("the CPI stand-in did not start")
        _, port = ours.recv()
        yield StandIn(port, ours)
    finally:
        if process.is_alive():
            with suppress(OSError):  # it is gone already
                ours.send("stop")
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join()


# ---- drain: ours ----------------------------------------------------------------------------


@attrs.frozen
class Drained:
    readings: int
    seconds: float
    cpu_seconds: float
    requests: int
    """As the forwarder counts them: POSTs and CSRF fetches."""
    batches: int
    fill_seconds: float
    retries: int


def cpi_section(port: int, certs: Certs) -> CpiSection:
    section = CpiSection(
        url=f"https://127.0.0.1:{port}{PATH}",
        auth="basic",
        client_id=CLIENT_ID,
        client_secret_file=Secret(Path("client_secret"), CLIENT_SECRET),
        ca_file=Secret(certs.ca, certs.ca.read_text()),
        csrf=CSRF,
    )
    problems = list(section.check())
    if problems:
        raise RuntimeError(f"bench [cpi] section refused: {problems}")
    return section


async def fill(outbox: Outbox, count: int) -> float:
    started = time.perf_counter()
    for start in range(0, count, FILL_GROUP):
        await outbox.append(readings(start, min(FILL_GROUP, count - start)))
    return time.perf_counter() - started


async def drain_ours(directory: Path, count: int, standin: StandIn, certs: Certs) -> Drained:
    async with await Outbox.open(directory / "drain.sqlite3") as outbox:
        fill_seconds = await fill(outbox, count)
        empty = trio.Event()

        def progress() -> None:  # after each batch the forwarder handled
            if outbox.statistics().backlog_readings == 0:
                empty.set()

        forwarder = Forwarder(
            cpi_section(standin.port, certs), outbox, gateway=GATEWAY, progress=progress
        )
        async with trio.open_nursery() as nursery:
            cpu = time.process_time()
            started = time.perf_counter()
            nursery.start_soon(forwarder.run)
            await empty.wait()
            seconds = time.perf_counter() - started
            cpu_seconds = time.process_time() - cpu
            nursery.cancel_scope.cancel()
        stats = forwarder.statistics()
    (directory / "drain.sqlite3").unlink()
    return Drained(
        stats.readings_delivered,
        seconds,
        cpu_seconds,
        stats.requests,
        stats.batches_delivered,
        fill_seconds,
        stats.retries,
    )


# ---- drain: the naive peer ------------------------------------------------------------------


@attrs.frozen
class Naive:
    readings: int
    seconds: float
    cpu_seconds: float
    requests: int


async def drain_naive(standin: StandIn, certs: Certs, seconds: float) -> Naive:
    """One POST per reading, as it comes: what a simple middleware does. Keep-alive and a CSRF
    token fetched once (a middleware that fetched one per POST would do twice the requests)."""
    url = f"https://127.0.0.1:{standin.port}{PATH}"
    context = ssl.create_default_context(cafile=str(certs.ca))
    pool = readings(0, 10_000)
    sent = requests = 0
    async with httpx.AsyncClient(verify=context, auth=(CLIENT_ID, CLIENT_SECRET)) as client:
        cpu = time.process_time()
        started = time.perf_counter()
        deadline = started + seconds
        token = ""
        if CSRF:
            fetched = await client.head(url, headers={"X-CSRF-Token": "Fetch"})
            requests += 1
            token = fetched.headers["x-csrf-token"]
        while time.perf_counter() < deadline:
            reading = pool[sent % len(pool)]
            response = await client.post(
                url,
                content=reading.encoded(),
                headers={
                    "Content-Type": "application/json",
                    "X-CSRF-Token": token,
                    "X-Message-ID": f"naive-{sent}",
                },
            )
            requests += 1
            if response.status_code != 200:
                raise RuntimeError(f"naive peer: the stand-in answered {response.status_code}")
            sent += 1
        elapsed = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu
    return Naive(sent, elapsed, cpu_seconds, requests)


# ---- ingest ---------------------------------------------------------------------------------


@attrs.frozen
class Ingested:
    readings: int
    seconds: float
    commits: int
    dropped: int = 0


async def ingest_append(path: Path, count: int) -> Ingested:
    section = OutboxSection()
    group = section.commit_readings
    batches = [readings(start, min(group, count - start)) for start in range(0, count, group)]
    async with await Outbox.open(path, section) as outbox:
        started = time.perf_counter()
        for batch in batches:
            await outbox.append(batch)
        seconds = time.perf_counter() - started
        stats = outbox.statistics()
    if stats.backlog_readings != count:
        raise RuntimeError(f"append: {stats.backlog_readings} stored of {count}")
    return Ingested(count, seconds, stats.commits)


async def ingest_feed(path: Path, count: int) -> Ingested:
    """Through the hub as the gateway runs it: publish as fast as the outbox keeps up (the
    producer waits while the subscription holds more than half its buffer), so the rate is
    the feed's, not a measure of how much it drops."""
    section = OutboxSection()
    all_readings = readings(0, count)
    hub = Hub()
    async with await Outbox.open(path, section) as outbox:
        commits_before = outbox.statistics().commits
        subscription = hub.subscribe(
            "outbox", ["#"], maxlen=section.buffer, policy=OverflowPolicy.DROP_OLDEST
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(outbox.feed, subscription)
            started = time.perf_counter()
            for start in range(0, count, 1000):
                # Back-pressure for the benchmark only: the hub has no event for "buffer
                # below half" (publishers never wait in the gateway).
                while subscription.statistics().buffered > section.buffer // 2:  # noqa: ASYNC110
                    await trio.sleep(0.001)
                hub.publish_many(all_readings[start : start + 1000])
                await trio.lowlevel.checkpoint()
            subscription.close()  # the feed commits what it holds and returns
        seconds = time.perf_counter() - started
        stats = outbox.statistics()
    if stats.backlog_readings + stats.dropped_hub != count:
        raise RuntimeError(f"feed: {stats.backlog_readings} stored of {count}")
    return Ingested(
        stats.backlog_readings, seconds, stats.commits - commits_before, stats.dropped_hub
    )


def encode_rate(count: int) -> float:
    """Readings/s of ``Reading.encoded()`` alone: the JSON each reading is stored as, built in
    ``Outbox.append`` (a polled reading has not been encoded before it reaches the outbox)."""
    fresh = readings(0, count)
    started = time.perf_counter()
    for reading in fresh:
        reading.encoded()
    return count / (time.perf_counter() - started)


def ingest_naive(path: Path, seconds: float, synchronous: str) -> Ingested:
    """One transaction per reading, same file settings as the outbox."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    conn.execute("CREATE TABLE readings (seq INTEGER PRIMARY KEY, topic TEXT, payload BLOB)")
    pool = readings(0, 10_000)
    stored = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        reading = pool[stored % len(pool)]
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO readings (topic, payload) VALUES (?, ?)",
            (reading.topic, reading.encoded()),
        )
        conn.execute("COMMIT")
        stored += 1
    elapsed = time.perf_counter() - started
    conn.close()
    return Ingested(stored, elapsed, stored)


def _ingest_child(kind: str, amount: float, directory: str) -> None:
    """``python -m bench.outbox KIND AMOUNT DIR`` (under strace): one ingest, a JSON line."""
    path = Path(directory) / f"{kind}.sqlite3"
    if kind == "append":
        result = trio.run(ingest_append, path, int(amount))
    elif kind == "naive":
        result = ingest_naive(path, amount, OutboxSection().synchronous)
    else:  # "open": the baseline (create, open, close) subtracted from both
        result = trio.run(ingest_append, path, 0)
    print(json.dumps(attrs.asdict(result)))


_STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(fdatasync|fsync)\s*$")


def count_fsyncs(kind: str, amount: float, directory: Path) -> tuple[Ingested, int] | None:
    """Run one ingest in a child under ``strace -f -c``; its result and its fsyncs (fsync and
    fdatasync calls). None when strace is missing or not allowed here."""
    strace = shutil.which("strace")
    if strace is None:
        return None
    out = directory / f"strace-{kind}.txt"
    child = subprocess.run(
        [
            strace,
            "--seccomp-bpf",  # only the traced calls stop the child: timing barely moves
            "-f",
            "-c",
            "-e",
            "trace=fdatasync,fsync",
            "-o",
            str(out),
            sys.executable,
            "-m",
            "bench.outbox",
            kind,
            str(amount),
            str(directory),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if child.returncode != 0 or not out.exists():
        log.warning("strace failed: %s", child.stderr.strip()[-300:])
        return None
    calls = sum(
        int(m.group(1)) for line in out.read_text().splitlines() if (m := _STRACE_LINE.match(line))
    )
    for name in directory.glob(f"{kind}.sqlite3*"):
        name.unlink()
    return Ingested(**json.loads(child.stdout.strip().splitlines()[-1])), calls


# ---- the report -----------------------------------------------------------------------------


def _rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.0f}" if seconds else "-"


def run() -> None:
    quiet()
    with certificates() as certs, tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp:
        directory = Path(tmp)
        count = DRAIN_READINGS
        with standin_process(certs) as standin:
            ours = trio.run(drain_ours, directory, count, standin, certs)
            seen = standin.command("stats")
            standin.command("reset")
            naive = trio.run(drain_naive, standin, certs, NAIVE_SECONDS)
            naive_seen = standin.command("stats")
        append = trio.run(ingest_append, directory / "append.sqlite3", INGEST_READINGS)
        feed = trio.run(ingest_feed, directory / "feed.sqlite3", INGEST_READINGS)
        store = ingest_naive(directory / "naive.sqlite3", NAIVE_STORE_SECONDS, "full")
        encode = encode_rate(INGEST_READINGS)
        children = directory / "strace"
        children.mkdir()
        synced: dict[str, tuple[Ingested, int] | None] = {}
        baseline = count_fsyncs("open", 0, children)
        for kind, amount in (("append", INGEST_READINGS), ("naive", NAIVE_STORE_SECONDS)):
            synced[kind] = count_fsyncs(kind, amount, children)

    synchronous = OutboxSection().synchronous
    section = CpiSection(url="https://example.invalid/")
    print(
        f"CPI backlog drain: {count:,} readings in the outbox, CPI stand-in (hypercorn, TLS, "
        f"Basic auth, CSRF {'on' if CSRF else 'off'}) on 127.0.0.1 in its own process"
    )
    naive_per = naive.requests / naive.readings
    ours_per = ours.requests / ours.readings
    rows = [
        [
            "ours: Forwarder, batches",
            f"{ours.readings:,}",
            f"{ours.seconds:.2f}",
            _rate(ours.readings, ours.seconds),
            f"{ours.requests:,}",
            f"{ours_per:.4f}",
            f"{ours.requests:,}",
            f"{ours.seconds:.1f}",
            f"{ours.cpu_seconds / ours.readings * 1e6:.1f}",
        ],
        [
            "peer: one httpx POST per reading",
            f"{naive.readings:,}",
            f"{naive.seconds:.2f}",
            _rate(naive.readings, naive.seconds),
            f"{naive.requests:,}",
            f"{naive_per:.4f}",
            f"{math.ceil(count * naive_per):,}",
            f"{count / (naive.readings / naive.seconds):,.0f}",
            f"{naive.cpu_seconds / naive.readings * 1e6:.1f}",
        ],
    ]
    headers = [
        "forwarder",
        "readings",
        "s",
        "readings/s",
        "requests",
        "req/reading",
        f"req for {count:,}",
        f"s for {count:,}",
        "CPU us/reading",
    ]
    print(table(headers, rows))
    print(
        f"- ours: shipped [cpi] defaults ({section.format}, batch_max_readings "
        f"{section.batch_max_readings}, batch_max_bytes {section.batch_max_bytes}, linger "
        f"{section.linger:g} s, the first linger included), {ours.batches:,} batches, "
        f"{ours.retries} retries; outbox filled in {ours.fill_seconds:.1f} s (not counted); "
        f"requests include the CSRF fetch"
    )
    print(
        f"- the stand-in saw {seen['readings']:,} readings in {seen['batches']:,} batches, "
        f"in order: {'yes' if seen['in_order'] else 'NO'}, {seen['duplicates']} duplicates, "
        f"{seen['posts']:,} POSTs and {seen['other_requests']} other requests, "
        f"{seen['not_2xx']} not 2xx; peer: {naive_seen['posts']:,} POSTs, "
        f"{naive_seen['other_requests']} other requests"
    )
    print(
        f"- peer ran {NAIVE_SECONDS:g} s and is extrapolated to {count:,} readings; CPU us/"
        "reading: this process (the stand-in's CPU is not counted)"
    )
    if seen["readings"] != count or not seen["in_order"]:
        print("- ours did NOT deliver every reading in order: the rates above mean nothing")

    print()
    print(
        f"Ingest into the outbox: {INGEST_READINGS:,} readings, shipped [outbox] settings "
        f"(synchronous = {synchronous}, commit_readings {OutboxSection().commit_readings}, "
        f"commit_interval {OutboxSection().commit_interval:g} s), WAL, on the temp directory's disk"
    )
    rows = []
    for label, result, key in (
        ("ours: Outbox.append, 1000 per call", append, "append"),
        ("ours: Hub.publish -> Outbox.feed", feed, None),
        ("peer: sqlite3, one transaction per reading", store, "naive"),
    ):
        counted = synced.get(key) if key else None
        if counted is not None and baseline is not None:
            child, calls = counted
            fsyncs = f"{(calls - baseline[1]) / child.readings * 10_000:,.1f}"
            how = "strace"
        else:
            # WAL, synchronous=full: one fdatasync of the WAL per commit, checkpoints aside.
            fsyncs = f"~{result.commits / result.readings * 10_000:,.1f}"
            how = "commits"
        rows.append(
            [
                label,
                f"{result.readings:,}",
                f"{result.seconds:.2f}",
                _rate(result.readings, result.seconds),
                f"{result.commits:,}",
                fsyncs,
                how,
                f"{result.dropped:,}",
            ]
        )
    print(
        table(
            [
                "store",
                "readings",
                "s",
                "readings/s",
                "commits",
                "fsyncs/10k readings",
                "counted by",
                "dropped",
            ],
            rows,
        )
    )
    print(
        "- fsyncs: fsync + fdatasync calls of a second run in a child under `strace -f -c` "
        "(the calls of an empty open and close subtracted), or ~ from the commit count "
        "(synchronous=full: one WAL sync per commit) where strace was not usable"
    )
    print(
        f"- of the time per reading in ours, Reading.encoded() alone (JSON) runs at "
        f"{encode:,.0f} readings/s, {1e6 / encode:.1f} us; the rest is SQLite and the thread"
    )
    print(
        "- feed: the producer waits while the hub subscription holds more than half its "
        f"buffer ({OutboxSection().buffer:,}), so 'dropped' must be 0; the rate is what the "
        "feed sustains"
    )

    drain_rate = ours.readings / ours.seconds
    ratio = naive_per / ours_per
    print(
        f"goal drain >= {GOAL_DRAIN:,.0f} readings/s: "
        f"{'MET' if drain_rate >= GOAL_DRAIN else 'NOT MET'} ({drain_rate:,.0f}/s)"
    )
    print(
        f"goal >= {GOAL_REQUEST_RATIO:.0f}x fewer HTTP requests than the naive peer: "
        f"{'MET' if ratio >= GOAL_REQUEST_RATIO else 'NOT MET'} ({ratio:,.0f}x)"
    )
    for label, result in (("Outbox.append", append), ("hub feed", feed)):
        rate = result.readings / result.seconds
        print(
            f"goal ingest >= {GOAL_INGEST:,.0f} readings/s ({label}): "
            f"{'MET' if rate >= GOAL_INGEST else 'NOT MET'} ({rate:,.0f}/s)"
        )


def profile() -> None:
    """cProfile our drain of a 100,000-reading backlog (the fill included); print where the
    time goes per delivered reading."""
    quiet()
    count = 100_000
    with (
        certificates() as certs,
        tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp,
        standin_process(certs) as standin,
    ):
        profiler = profiling.profiled(
            lambda: trio.run(drain_ours, Path(tmp), count, standin, certs)
        )
    print(
        f"--- ours: fill and drain of {count:,} readings, per reading (the event loop's thread "
        "only: the outbox's SQLite work runs on a worker thread cProfile does not see, so it "
        "shows up as epoll waiting, as do the stand-in's answers and the 1 s linger)"
    )
    print(profiling.report(profiler, count))


if __name__ == "__main__":
    _ingest_child(sys.argv[1], float(sys.argv[2]), sys.argv[3])
