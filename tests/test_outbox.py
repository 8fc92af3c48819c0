"""The outbox: a real SQLite file in ``tmp_path``, real trio threads, real subprocesses for
``kill -9``."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from gateway import outbox as outbox_mod
from gateway.core.batches import Gap, batch_id
from gateway.core.reading import Reading
from gateway.hub import Hub, Watermark
from gateway.outbox import (
    HUB_OVERFLOW,
    OUTBOX_FULL_OLDEST,
    OUTBOX_FULL_REJECTED,
    OUTBOX_WRITE_FAILED,
    Outbox,
    OutboxError,
    OutboxFull,
    OutboxSection,
)

from .conftest import ROOT, TIMEOUT


def readings(n: int, start: int = 0, topic: str = "line-1/meter/p") -> list[Reading]:
    return [Reading(topic, start + i, timestamp=1_700_000_000.0 + i) for i in range(n)]


def values(batch_readings: object) -> list[object]:
    return [json.loads(r.payload)["value"] for r in batch_readings]  # type: ignore[attr-defined]


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def damage(path: Path, first_page: int, pages: int, page_size: int = 4096) -> None:
    with path.open("r+b") as f:
        f.seek(first_page * page_size)
        f.write(os.urandom(pages * page_size))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite3"


async def test_append_next_batch_confirm_in_order(db: Path) -> None:
    async with await Outbox.open(db) as box:
        assert await box.next_batch(10, 10_000) is None
        assert await box.append(readings(5)) == (1, 5)
        assert await box.append(readings(5, 5)) == (6, 10)
        assert await box.append([]) is None
        await box.wait_pending()

        first = await box.next_batch(4, 10_000)
        assert first is not None
        assert (first.first_seq, first.last_seq, first.sent_before) == (1, 4, False)
        assert [r.seq for r in first.readings] == [1, 2, 3, 4]
        assert values(first.readings) == [0, 1, 2, 3]
        assert "seq" not in json.loads(first.readings[0].payload)

        # Until confirmed, the same batch comes back, marked as a retry, whatever the limits.
        again = await box.next_batch(100, 10_000)
        assert again == attrs.evolve(first, sent_before=True)
        await box.confirm(again)
        with pytest.raises(OutboxError, match="not in flight"):
            await box.confirm(again)

        rest = await box.next_batch(100, 10_000)
        assert rest is not None
        assert (rest.first_seq, rest.last_seq) == (5, 10)
        await box.confirm(rest)
        assert await box.next_batch(100, 10_000) is None
        stats = box.statistics()
        assert stats.backlog_readings == 0
        assert stats.backlog_bytes == 0
        assert stats.next_seq == 11
        assert stats.oldest_seq is None


async def test_wait_pending_wakes_on_append_and_on_cli_replay(
    db: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with await Outbox.open(db) as box:
        await box.append(readings(1))
        batch = await box.next_batch(1, 10_000)
        assert batch is not None
        await box.dead_letter(batch, 400, "bad")

        async def waiter(done: trio.Event) -> None:
            await box.wait_pending()
            done.set()

        async with trio.open_nursery() as nursery:
            done = trio.Event()
            nursery.start_soon(waiter, done)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            await box.append(readings(1))
            await trio.testing.wait_all_tasks_blocked()
            assert done.is_set()

        batch = await box.next_batch(1, 10_000)
        assert batch is not None
        await box.confirm(batch)
        async with trio.open_nursery() as nursery:
            done = trio.Event()
            nursery.start_soon(waiter, done)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            # Another connection (the CLI) puts readings back: noticed within a second.
            await trio.to_thread.run_sync(outbox_mod.replay_dead, db)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            mock_clock.jump(1)
            deadline = time.monotonic() + TIMEOUT
            while not done.is_set():
                assert time.monotonic() < deadline, "replayed readings never noticed"
                await trio.testing.wait_all_tasks_blocked()


async def test_batch_respects_max_bytes_but_holds_at_least_one(db: Path) -> None:
    async with await Outbox.open(db) as box:
        await box.append(readings(10))
        size = len(Reading("line-1/meter/p", 0, timestamp=1_700_000_000.0).encoded())
        batch = await box.next_batch(100, 3 * size + size // 2)
        assert batch is not None
        assert len(batch.readings) == 3
        await box.confirm(batch)
        tiny = await box.next_batch(100, 1)
        assert tiny is not None
        assert len(tiny.readings) == 1


async def test_in_flight_batch_survives_reopen(db: Path) -> None:
    async with await Outbox.open(db) as box:
        await box.append(readings(10))
        batch = await box.next_batch(6, 10_000)
        assert batch is not None
        await box.append(readings(10, 10))
    async with await Outbox.open(db) as box:
        again = await box.next_batch(1000, 10_000_000)
        assert again is not None
        assert (again.first_seq, again.last_seq) == (batch.first_seq, batch.last_seq)
        assert again.readings == batch.readings
        assert again.sent_before
        assert box.statistics().backlog_readings == 20
        await box.confirm(again)
        assert (await box.append(readings(1))) == (21, 21)


async def test_split_hands_out_halves_in_order(db: Path) -> None:
    async with await Outbox.open(db) as box:
        await box.append(readings(5))
        batch = await box.next_batch(5, 10_000)
        assert batch is not None
        await box.split(batch)
        with pytest.raises(OutboxError, match="not in flight"):
            await box.split(batch)
        first = await box.next_batch(100, 10_000)
        assert first is not None
        assert (first.first_seq, first.last_seq, first.sent_before) == (1, 2, False)
        await box.confirm(first)
        await box.append(readings(5, 5))
        # The second half comes next as it was cut, not merged with newer readings.
        second = await box.next_batch(100, 10_000)
        assert second is not None
        assert (second.first_seq, second.last_seq) == (3, 5)
        await box.split(second)
        one = await box.next_batch(100, 10_000)
        assert one is not None
        assert [r.seq for r in one.readings] == [3]
        with pytest.raises(OutboxError, match="cannot be split"):
            await box.split(one)


async def test_dead_letter_replay_and_purge(db: Path) -> None:
    async with await Outbox.open(db) as box:
        await box.append(readings(6))
        bad = await box.next_batch(3, 10_000)
        assert bad is not None
        await box.dead_letter(bad, 400, "Bad Request: field 'value' unknown")
        stats = box.statistics()
        assert (stats.dead_letters, stats.dead_readings, stats.backlog_readings) == (1, 3, 3)

        lines = outbox_mod.dead_letters(db)
        assert len(lines) == 1
        assert "seq 1-3 (3 readings) status 400" in lines[0]
        assert "field 'value' unknown" in lines[0]

        # Replayed while the daemon's outbox is open: they come back with their seqs, ahead
        # of the newer readings, and the open outbox notices.
        assert outbox_mod.replay_dead(db) == 3
        batch = await box.next_batch(100, 10_000)
        assert batch is not None
        assert [r.seq for r in batch.readings] == [1, 2, 3, 4, 5, 6]
        assert box.statistics().dead_letters == 0
        assert box.statistics().backlog_readings == 6

        await box.dead_letter(batch, None, "connection refused for good")
        assert outbox_mod.purge_dead(db) == 6
        assert outbox_mod.dead_letters(db) == []
        assert await box.next_batch(100, 10_000) is None
        assert box.statistics().dead_readings == 0


async def test_batch_never_spans_a_dead_letter(db: Path) -> None:
    """A batch cut across a dead-lettered seq would change content after a replay."""
    async with await Outbox.open(db) as box:
        await box.append(readings(3))
        one = await box.next_batch(1, 10_000)
        assert one is not None
        await box.confirm(one)  # seq 1 gone
        middle = await box.next_batch(1, 10_000)
        assert middle is not None
        await box.dead_letter(middle, 422, "no")  # seq 2 dead
        await box.append(readings(2, 3))  # seqs 4, 5
        outbox_mod.replay_dead(db)  # seq 2 back, before 3
        batch = await box.next_batch(100, 10_000)
        assert batch is not None
        assert [r.seq for r in batch.readings] == [2, 3, 4, 5]


async def test_seq_never_reused_after_confirm_dead_letters_and_restart(db: Path) -> None:
    async with await Outbox.open(db) as box:
        await box.append(readings(4))
        batch = await box.next_batch(2, 10_000)
        assert batch is not None
        await box.confirm(batch)
        batch = await box.next_batch(2, 10_000)
        assert batch is not None
        await box.dead_letter(batch, 400, "x")
    async with await Outbox.open(db) as box:
        assert box.statistics().next_seq == 5
        assert await box.append(readings(1)) == (5, 5)
        batch = await box.next_batch(2, 10_000)
        assert batch is not None
        await box.confirm(batch)
    outbox_mod.purge_dead(db)
    async with await Outbox.open(db) as box:
        assert await box.append(readings(1)) == (6, 6)


async def test_hub_overflow_becomes_a_gap_in_the_next_batch(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub = Hub()
    section = OutboxSection(buffer=3)
    async with await Outbox.open(db, section) as box:
        with hub.subscribe("outbox", maxlen=section.buffer) as sub:
            hub.publish_many(readings(2))
        await box.feed(sub)  # returns once it committed what the closed subscription held
        # Five readings while the outbox does not read: the buffer of 3 drops 2.
        with hub.subscribe("outbox", maxlen=section.buffer) as sub:
            hub.publish_many(readings(5, 2))
        with caplog.at_level(logging.ERROR, logger="gateway.outbox"):
            await box.feed(sub)
        assert box.statistics().dropped_hub == 2
    async with await Outbox.open(db) as box:
        batch = await box.next_batch(100, 100_000)
        assert batch is not None
        assert values(batch.readings) == [0, 1, 4, 5, 6]
        assert [r.seq for r in batch.readings] == [1, 2, 3, 4, 5]
        assert batch.gaps == (Gap(2, 2, HUB_OVERFLOW),)
        await box.confirm(batch)
        assert box.statistics().gaps == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "hub dropped readings" in errors[0].getMessage()


async def wait_commits(box: Outbox, n: int) -> None:
    """Until ``n`` transactions were committed (the worker thread finishes them)."""
    deadline = time.monotonic() + TIMEOUT
    while box.statistics().commits < n:
        assert time.monotonic() < deadline, "commit never came"
        await trio.testing.wait_all_tasks_blocked()


async def test_feed_groups_commits_by_interval_and_count(
    db: Path, mock_clock: trio.testing.MockClock
) -> None:
    hub = Hub()
    section = OutboxSection(commit_interval=outbox_mod.Duration(0.1), commit_readings=100)
    async with await Outbox.open(db, section) as box, trio.open_nursery() as nursery:
        start = box.statistics().commits
        sub = hub.subscribe("outbox", maxlen=section.buffer)
        await nursery.start(box.feed, sub)
        hub.publish(Reading("a/b/c", 0))
        await wait_commits(box, start + 1)  # idle: committed at once
        for i in range(1, 6):
            hub.publish(Reading("a/b/c", i))
            await trio.testing.wait_all_tasks_blocked()
        assert box.statistics().commits == start + 1  # waiting for commit_interval
        mock_clock.jump(0.1)
        await wait_commits(box, start + 2)
        assert box.statistics().backlog_readings == 6
        # commit_readings waiting: no need to wait for the interval.
        hub.publish_many(readings(100))
        await wait_commits(box, start + 3)
        assert box.statistics().backlog_readings == 106
        sub.close()


async def test_overflow_is_logged_once_per_episode(
    db: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    hub = Hub()
    section = OutboxSection(buffer=3)
    caplog.set_level(logging.WARNING, logger="gateway.outbox")
    async with await Outbox.open(db, section) as box, trio.open_nursery() as nursery:
        start = box.statistics().commits
        sub = hub.subscribe("outbox", maxlen=section.buffer)
        await nursery.start(box.feed, sub)
        hub.publish_many(readings(5))
        await wait_commits(box, start + 1)
        hub.publish_many(readings(5, 5))
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(1)
        await wait_commits(box, start + 2)
        assert box.statistics().dropped_hub == 4
        mock_clock.jump(outbox_mod.EPISODE_QUIET)
        hub.publish(Reading("a/b/c", 1))
        await wait_commits(box, start + 3)
        sub.close()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in messages] == [logging.ERROR, logging.WARNING]
    assert "reach the disk again" in messages[1][1]


async def test_feed_groups_by_count(db: Path) -> None:
    hub = Hub()
    section = OutboxSection(commit_interval=outbox_mod.Duration(10), commit_readings=100)
    async with await Outbox.open(db, section) as box:
        start = box.statistics().commits
        with hub.subscribe("outbox", maxlen=section.buffer) as sub:
            hub.publish_many(readings(1000))
        await box.feed(sub)
        # One delivery of 1000 is one transaction: the count caps waiting, not size.
        assert box.statistics().commits - start == 1
        assert box.statistics().backlog_readings == 1000


async def test_feed_commits_what_it_took_when_cancelled(
    db: Path, mock_clock: trio.testing.MockClock
) -> None:
    hub = Hub()
    section = OutboxSection(commit_interval=outbox_mod.Duration(10))
    async with await Outbox.open(db, section) as box:
        sub = hub.subscribe("outbox", maxlen=1000)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(box.feed, sub)
                hub.publish_many(readings(1))
                await wait_commits(box, box.statistics().commits + 1)  # idle: at once
                hub.publish_many(readings(50, 1))
                await trio.testing.wait_all_tasks_blocked()
                # Taken from the hub, waiting for commit_interval (the clock stands still).
                assert sub.statistics().buffered == 0
                assert box.statistics().backlog_readings == 1
                scope.cancel()
        # What the feeder had taken from the hub was committed, shielded.
        assert box.statistics().backlog_readings == 51


def _big_section(policy: outbox_mod.Policy) -> OutboxSection:
    return OutboxSection(max_bytes=outbox_mod.Size(1024**2), policy=policy)


def _blobs(n: int, start: int = 0) -> list[Reading]:
    return [Reading("line-1/cam/blob", f"{start + i:06d}" + "x" * 10_000) for i in range(n)]


async def test_drop_oldest_keeps_disk_bounded_and_records_gaps(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.outbox")
    async with await Outbox.open(db, _big_section("drop-oldest")) as box:
        await box.append(_blobs(10))
        batch = await box.next_batch(2, 10_000_000)  # seqs 1, 2 in flight: never dropped
        assert batch is not None
        for k in range(1, 30):
            await box.append(_blobs(10, 10 * k))
            assert box.statistics().backlog_bytes <= 1024**2
        full = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(full) == 1  # once for the episode, not per commit
        assert "outbox full" in full[0].getMessage()
        stats = box.statistics()
        assert stats.dropped_full > 0
        assert stats.backlog_readings + stats.dropped_full == 300
        await box.confirm(batch)
        nxt = await box.next_batch(1000, 10**9)
        assert nxt is not None
        # The readings after the in-flight batch went first, as one gap, then the newest stay.
        assert nxt.gaps == (Gap(2, stats.dropped_full, OUTBOX_FULL_OLDEST),)
        assert nxt.first_seq == 3 + stats.dropped_full
        assert nxt.last_seq == 300


async def test_dead_letters_count_and_the_newest_win(db: Path) -> None:
    """Dead letters are never dropped for new readings: they need an operator's decision."""
    async with await Outbox.open(db, _big_section("drop-oldest")) as box:
        await box.append(_blobs(100))
        batch = await box.next_batch(1000, 10**9)
        assert batch is not None
        await box.dead_letter(batch, 400, "bad")
        assert await box.append(_blobs(10, 100)) == (101, 103)
        stats = box.statistics()
        assert stats.dead_readings == 100
        assert stats.dropped_full == 7
        assert stats.backlog_bytes + 100 * 10_000 <= 1024**2
        batch = await box.next_batch(1000, 10**9)
        assert batch is not None
        assert values(batch.readings)[0].startswith("000107")
        assert batch.gaps == (Gap(100, 7, outbox_mod.OUTBOX_FULL_NEW),)


async def test_reject_refuses_new_readings(db: Path) -> None:
    hub = Hub()
    async with await Outbox.open(db, _big_section("reject")) as box:
        stored = 0
        blob = _blobs(1)[0]
        per = len(blob.topic) + len(blob.encoded()) + outbox_mod.ROW_OVERHEAD
        while box.statistics().backlog_bytes + 10 * per <= 1024**2:
            await box.append(_blobs(10, stored))
            stored += 10
        with pytest.raises(OutboxFull) as full:
            await box.append(_blobs(10, stored))
        assert full.value.count == 10
        assert box.statistics().backlog_readings == stored
        assert box.statistics().backlog_bytes <= 1024**2

        # The feeder counts refused readings and reports them as a gap.
        async with trio.open_nursery() as nursery:
            sub = hub.subscribe("outbox", maxlen=1000)
            await nursery.start(box.feed, sub)
            hub.publish_many(_blobs(5, 1000))
            sub.close()
        # Refused readings count and become a gap whoever appended them: the 10 above too.
        assert box.statistics().rejected == 15
        batch = await box.next_batch(1000, 10**9)
        assert batch is not None
        assert batch.last_seq == stored
        await box.confirm(batch)
        assert await box.append(_blobs(1, 2000)) == (stored + 1, stored + 1)
        last = await box.next_batch(1000, 10**9)
        assert last is not None
        assert last.gaps == (Gap(stored, 15, OUTBOX_FULL_REJECTED),)


async def test_refused_readings_are_a_gap_even_when_the_feed_is_cancelled(db: Path) -> None:
    """The gap is written in the transaction that refuses: a cancel that lands while the
    worker refuses cannot skip it."""
    hub = Hub()
    async with await Outbox.open(db, _big_section("reject")) as box:
        stored = 0
        while box.statistics().rejected == 0:  # fill it up
            with contextlib.suppress(OutboxFull):
                await box.append(_blobs(10, stored))
                stored += 10
        real = box._store.append
        started = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def slow_append(*args: Any) -> Any:  # a slow disk: the cancel lands meanwhile
            token.run_sync_soon(started.set)
            time.sleep(0.2)
            return real(*args)

        box._store.append = slow_append  # type: ignore[method-assign]
        sub = hub.subscribe("outbox", maxlen=1000)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(box.feed, sub)
                hub.publish_many(_blobs(5, 5000))
                await started.wait()
                scope.cancel()
        box._store.append = real  # type: ignore[method-assign]
        assert box.statistics().rejected == 15
        rows = box._store.conn.execute("SELECT after_seq, count, reason FROM gaps").fetchall()
        assert rows == [(stored, 15, OUTBOX_FULL_REJECTED)]


async def test_a_failed_write_is_a_gap_and_the_feed_carries_on(
    db: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.outbox")
    hub = Hub()
    async with await Outbox.open(db) as box:
        await box.append(_blobs(5))
        conn = box._store.conn
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # the disk fills up
        watermark = Watermark(hub.published)
        async with trio.open_nursery() as nursery:
            sub = hub.subscribe("outbox", maxlen=1000)
            await nursery.start(functools.partial(box.feed, sub, watermark=watermark))
            hub.publish_many(_blobs(20, 100))
            deadline = time.monotonic() + TIMEOUT
            while box.statistics().write_failed < 20:
                assert time.monotonic() < deadline, "the failed write was never counted"
                await trio.testing.wait_all_tasks_blocked()
            # Lost, and said so to whoever waits for them to be stored.
            assert watermark.position == 20
            assert not await watermark.reached(0, 20)
            assert box.statistics().backlog_readings == 5

            conn.execute("PRAGMA max_page_count = 1000000")  # space again
            hub.publish_many(_blobs(3, 200))
            await trio.testing.wait_all_tasks_blocked()
            assert box.statistics().backlog_readings == 5  # the feed waits its backoff
            mock_clock.jump(outbox_mod.WRITE_RETRY_INITIAL)
            deadline = time.monotonic() + TIMEOUT
            while box.statistics().backlog_readings < 8:
                assert time.monotonic() < deadline, "the feed never wrote again"
                await trio.testing.wait_all_tasks_blocked()
            assert await watermark.reached(20, 23)
            sub.close()
        batch = await box.next_batch(1000, 10**9)
        assert batch is not None
        assert [r.seq for r in batch.readings] == list(range(1, 9))
        assert batch.gaps == (Gap(5, 20, OUTBOX_WRITE_FAILED),)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, caplog.records[0].getMessage()),
        (logging.WARNING, "outbox: writing to the database works again"),
    ]
    assert "cannot write to the database" in caplog.records[0].getMessage()


async def test_corrupt_database_is_moved_aside(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(db, b"this is not an SQLite database, it is a text file" * 100)
    with caplog.at_level(logging.ERROR, logger="gateway.outbox"):
        async with await Outbox.open(db) as box:
            assert await box.append(readings(1)) == (1, 1)
    aside = list(db.parent.glob("outbox.sqlite3.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b"this is not")
    assert any("CORRUPT" in r.getMessage() for r in caplog.records)


async def test_damaged_pages_are_detected(db: Path) -> None:
    async with await Outbox.open(db) as box:
        await box.append(_blobs(20))
    damage(db, first_page=2, pages=4)
    async with await Outbox.open(db) as box:
        assert box.statistics().backlog_readings == 0
    assert len(list(db.parent.glob("outbox.sqlite3.corrupt-*"))) == 1


async def test_unopenable_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="does not exist"):
        await Outbox.open(tmp_path / "missing" / "outbox.sqlite3")
    with pytest.raises(OutboxError, match="is a directory"):
        await Outbox.open(tmp_path)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.close()
    with pytest.raises(OutboxError, match="not an outbox"):
        await Outbox.open(other)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(OutboxError, match="cannot"):
            await Outbox.open(locked / "outbox.sqlite3")


def test_cli_helpers_need_an_existing_outbox(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="no outbox database"):
        outbox_mod.stats(tmp_path / "nothing.sqlite3")
    assert not (tmp_path / "nothing.sqlite3").exists()


async def test_cli_stats_and_peek(db: Path) -> None:
    async with await Outbox.open(db) as box:
        await box.append(readings(3))
        await box.next_batch(2, 10_000)
        lines = outbox_mod.stats(db)
        assert "backlog: 3 readings" in lines[1]
        assert "seq 1 .. 3" in lines[1]
        assert lines[3] == "in flight: 1-2 (sent 1x)"
        peeked = outbox_mod.peek(db, 2)
        assert [line.split()[0] for line in peeked] == ["1", "2"]
        assert '"value":0' in peeked[0]


def test_section_check() -> None:
    assert list(OutboxSection().check()) == []
    bad = OutboxSection(
        file="",
        commit_interval=outbox_mod.Duration(0),
        commit_readings=0,
        max_bytes=outbox_mod.Size(10),
        buffer=10,
    )
    keys = [k for k, _ in bad.check()]
    assert keys == ["file", "commit_interval", "commit_readings", "max_bytes"]
    assert [k for k, _ in OutboxSection(buffer=10).check()] == ["buffer"]


WRITER = textwrap.dedent(
    """
    import sys, trio
    from gateway.core.reading import Reading
    from gateway.outbox import Outbox

    async def main():
        box = await Outbox.open(sys.argv[1])
        n = 0
        while True:
            batch = [Reading("a/b/c", n + i) for i in range(50)]
            first, last = await box.append(batch)
            n += 50
            print(first, last, flush=True)

    trio.run(main)
    """
)


async def start_writer(db: Path) -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, "-c", WRITER, str(db)], cwd=ROOT, stdout=subprocess.PIPE
    )


async def read_lines(proc: trio.Process, output: bytearray, n: int) -> None:
    assert proc.stdout is not None
    with trio.fail_after(TIMEOUT):
        while output.count(b"\n") < n:
            chunk = await proc.stdout.receive_some()
            assert chunk, "writer ended early"
            output += chunk


async def kill(proc: trio.Process, output: bytearray) -> list[tuple[int, ...]]:
    """SIGKILL the writer; the ranges it reported committed (also just before the kill)."""
    assert proc.stdout is not None
    proc.send_signal(signal.SIGKILL)
    with trio.fail_after(TIMEOUT):
        while chunk := await proc.stdout.receive_some():
            output += chunk
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return [tuple(map(int, line.split())) for line in output.decode().splitlines()]


async def test_kill_9_keeps_every_committed_reading(db: Path) -> None:
    proc = await start_writer(db)
    output = bytearray()
    try:
        await read_lines(proc, output, 40)
    finally:
        committed = await kill(proc, output)
    assert committed[0] == (1, 50)
    assert len(committed) >= 40
    async with await Outbox.open(db) as box:
        stats = box.statistics()
        assert stats.backlog_readings >= committed[-1][1]
        assert stats.next_seq > committed[-1][1]
        batch = await box.next_batch(10**6, 10**9)
        assert batch is not None
        assert [r.seq for r in batch.readings] == list(range(1, len(batch.readings) + 1))
        assert values(batch.readings) == list(range(len(batch.readings)))


async def test_cli_is_safe_while_the_daemon_writes(db: Path) -> None:
    async with await Outbox.open(db) as box:
        await box.append(readings(3))
        batch = await box.next_batch(3, 10_000)
        assert batch is not None
        await box.dead_letter(batch, 400, "bad")
    proc = await start_writer(db)
    output = bytearray()
    try:
        await read_lines(proc, output, 5)
        for _ in range(20):
            # Each of these opens its own connection, as `edge-gateway outbox ...` does.
            assert (await trio.to_thread.run_sync(outbox_mod.stats, db))[0].startswith("file:")
            assert len(await trio.to_thread.run_sync(outbox_mod.peek, db, 5)) == 5
            await trio.to_thread.run_sync(outbox_mod.dead_letters, db)
        assert await trio.to_thread.run_sync(outbox_mod.replay_dead, db) == 3
        assert await trio.to_thread.run_sync(outbox_mod.purge_dead, db) == 0
        await read_lines(proc, output, len(output.splitlines()) + 5)
    finally:
        committed = await kill(proc, output)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        seqs = [r[0] for r in conn.execute("SELECT seq FROM readings ORDER BY seq")]
    finally:
        conn.close()
    assert seqs[:3] == [1, 2, 3]  # replayed, ahead of the writer's readings
    assert seqs[3] == 4 == committed[0][0]
    assert seqs[-1] >= committed[-1][1]


async def test_a_database_made_anew_gives_its_batches_new_ids(tmp_path: Path) -> None:
    # Its seqs start at 1 again: the same range must not get an id CPI already took.
    ids = []
    for attempt in range(2):
        path = tmp_path / str(attempt) / "outbox.sqlite3"
        path.parent.mkdir()
        async with await Outbox.open(path) as outbox:
            await outbox.append([Reading("line-1/m/p", 1, timestamp=1.7e9)])
            batch = await outbox.next_batch(10, 1_000_000)
            assert batch is not None
            assert (batch.first_seq, batch.last_seq) == (1, 1)
            ids.append(batch_id("gw", batch.first_seq, batch.last_seq, batch.epoch))
        async with await Outbox.open(path) as outbox:  # the same database: the same id
            batch = await outbox.next_batch(10, 1_000_000)
            assert batch is not None
            assert batch_id("gw", 1, 1, batch.epoch) == ids[-1]
    assert ids[0] != ids[1]


def test_outbox_file_is_a_name_in_the_state_dir_or_an_absolute_path() -> None:
    assert [k for k, _ in OutboxSection(file="x/y.sqlite3").check()] == ["file"]
    assert list(OutboxSection(file="/var/lib/other/outbox.sqlite3").check()) == []
