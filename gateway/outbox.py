"""The outbox: SQLite store-and-forward between the hub and the CPI forwarder.

Every reading taken from the hub is committed to an SQLite file in the state directory with a
gateway-wide sequence number (``seq``, increasing, never reused: the high-water mark is kept in
the database) before it counts as stored. The forwarder reads it back through the
``BatchSource`` protocol (``gateway.core.batches``): batches in ``seq`` order, the batch in
flight recorded in the database so that a restart hands out the same range again.

Durability (``synchronous``, default ``full``). The database runs in WAL mode.

- ``full`` (shipped default): every commit fsyncs the WAL. A reading whose ``append``
  returned survives a process crash, ``kill -9`` *and* a power loss (as far as the storage
  honours fsync). Writes are grouped (one transaction per ``commit_interval`` or
  ``commit_readings``), so the cost is one fsync per group, not per reading: about 10 fsyncs
  per 10,000 readings at full rate, plus two per WAL checkpoint (every ~4 MiB of WAL).
- ``normal``: commits reach the OS but are fsynced only at checkpoints. Survives a process
  crash and ``kill -9``; on power loss the commits since the last checkpoint may be lost
  (the database itself stays consistent). For storage where fsyncs are too dear.

Measured (2-core VM, ext4, 1,000 readings per commit, strace): ``full`` 12 fdatasyncs per
10,000 readings, ``normal`` 2. Bytes written per reading are the same in both: its row in the
WAL, then once more into the database at the checkpoint. At lower rates the commit interval
decides: at most 1 / ``commit_interval`` commits (fsyncs) per second.

Disk use is bounded by ``max_bytes`` (payload, topic and a fixed overhead per reading,
live and dead-lettered): ``drop-oldest`` deletes the oldest readings not in flight and records
a ``Gap``, ``reject`` refuses new readings (``OutboxFull``). Dead letters count too and are
never dropped: ``edge-gateway outbox purge-dead`` or ``replay-dead`` frees them.

All database work runs on one worker thread at a time (``trio.to_thread`` with a
``CapacityLimiter(1)``); the event loop never waits on the disk. The CLI helpers at the end
(``stats``, ``peek``, ``dead_letters``, ``replay_dead``, ``purge_dead``) open the same file with
their own connection; WAL and a busy timeout make that safe while the daemon runs, and the
daemon notices their changes (``PRAGMA data_version``).

Depends on the stdlib (``sqlite3``), trio, attrs, ``gateway.core`` and ``gateway.hub``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import attrs
import trio

from gateway.core import sqlitefile
from gateway.core.batches import Batch, BatchSource, Gap, StoredReading
from gateway.core.configtypes import Duration, Size
from gateway.core.logs import kv
from gateway.core.reading import Reading
from gateway.hub import Subscription, Watermark

log = logging.getLogger("gateway.outbox")

SCHEMA_VERSION = 1

ROW_OVERHEAD = 32
"""Bytes counted against ``max_bytes`` per reading besides its topic and payload (the
b-tree cell, the seq, page slack): the bound is approximate, on the safe side."""

EPISODE_QUIET = 10.0
"""Seconds without a drop that end an overflow episode (one error log per episode)."""

HUB_OVERFLOW = "hub buffer overflow: the disk was too slow"
OUTBOX_FULL_OLDEST = "outbox full (max_bytes): oldest readings dropped"
OUTBOX_FULL_NEW = "outbox full (max_bytes): new readings dropped"
OUTBOX_FULL_REJECTED = "outbox full (max_bytes, policy reject): new readings refused"
OUTBOX_WRITE_FAILED = "outbox write failed"

WRITE_RETRY_INITIAL = 1.0
WRITE_RETRY_MAX = 30.0
"""After a failed write (disk full, I/O error) the feed waits this long before the next one,
doubling from the initial to the maximum; readings arriving meanwhile wait in the hub's
buffer (beyond it: dropped, counted as a hub overflow)."""

Policy = Literal["drop-oldest", "reject"]
Synchronous = Literal["full", "normal"]

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE readings (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE in_flight (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, attempts INTEGER NOT NULL);
CREATE TABLE gaps (
    id INTEGER PRIMARY KEY, after_seq INTEGER NOT NULL, count INTEGER NOT NULL,
    reason TEXT NOT NULL, batch INTEGER);
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    status INTEGER, excerpt TEXT NOT NULL, time REAL NOT NULL);
CREATE TABLE dead_readings (
    seq INTEGER PRIMARY KEY, letter INTEGER NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL);
CREATE INDEX dead_readings_letter ON dead_readings (letter);
"""
_TABLES = {"meta", "readings", "in_flight", "gaps", "dead_letters", "dead_readings"}

# Readings not in a recorded batch range: what drop-oldest may delete.
_DROPPABLE = """
SELECT seq, length(topic) + length(payload) + ? FROM readings AS r
WHERE NOT EXISTS (SELECT 1 FROM in_flight AS b WHERE r.seq BETWEEN b.first_seq AND b.last_seq)
ORDER BY seq LIMIT ?
"""


# ---- config ---------------------------------------------------------------------------------


@attrs.frozen
class OutboxSection:
    """``[outbox]``: the store-and-forward database for CPI."""

    file: str = "outbox.sqlite3"
    """Relative paths are relative to ``gateway.state_dir``."""
    commit_interval: Duration = Duration(0.1)
    """At most one transaction per this time (unless ``commit_readings`` are waiting)."""
    commit_readings: int = 1000
    max_bytes: Size = Size(256 * 1024**2)
    policy: Policy = "drop-oldest"
    synchronous: Synchronous = "full"
    """``full``: a commit survives power loss; ``normal``: only a crash (see the module)."""
    buffer: int = 50_000
    """Readings held between the hub and the disk: several seconds of a disk stall at full
    rate. Beyond it readings are dropped, counted, logged and reported to CPI as a gap."""

    def path(self, state_dir: str | Path) -> Path:
        return Path(state_dir) / self.file

    def check(self) -> Iterator[tuple[str, str]]:
        """``(path, message)`` below ``outbox`` for every problem."""
        if not self.file or "\0" in self.file:
            yield "file", "give a file name, e.g. 'outbox.sqlite3'"
        elif not os.path.isabs(self.file) and os.sep in self.file:
            yield (
                "file",
                f"{self.file!r}: give a file name (it goes into gateway.state_dir) or an "
                "absolute path",
            )
        elif self.file.endswith(("/", os.sep)):
            yield "file", f"{self.file!r} is a directory: give a file name"
        if not 0 < self.commit_interval <= 10:
            yield "commit_interval", "must be greater than 0 and at most 10s"
        if self.commit_readings < 1:
            yield "commit_readings", "must be at least 1"
        if self.max_bytes < 1024**2:
            yield "max_bytes", "must be at least 1MiB"
        if self.buffer < self.commit_readings:
            yield (
                "buffer",
                f"must be at least commit_readings ({self.commit_readings}): size it for "
                "several seconds of readings at full rate",
            )


# ---- errors and values ----------------------------------------------------------------------


class OutboxError(Exception):
    """The outbox database cannot be used; the message says what to do."""


class OutboxFull(OutboxError):
    """``append`` refused ``count`` readings: the outbox is at ``max_bytes`` (policy
    ``reject``). Nothing of this append was stored."""

    def __init__(self, count: int, max_bytes: int) -> None:
        super().__init__(
            f"outbox full: {count} readings refused (max_bytes {max_bytes} reached, policy "
            "reject); new readings are stored again once CPI has taken some of the backlog"
        )
        self.count = count


@attrs.frozen
class OutboxStatistics:
    backlog_readings: int
    """Readings stored and not yet confirmed by CPI (including the batches in flight)."""
    backlog_bytes: int
    """Their size as counted against ``max_bytes``."""
    oldest_seq: int | None
    next_seq: int
    in_flight: int
    """Batch ranges recorded as handed out (or queued halves of a split batch)."""
    dead_letters: int
    dead_readings: int
    gaps: int
    """Gap records waiting to travel to CPI."""
    commits: int
    dropped_hub: int
    """Readings the hub dropped before the disk (buffer overflow)."""
    dropped_full: int
    """Readings deleted or not stored because of ``max_bytes`` (``drop-oldest``)."""
    rejected: int
    """Readings refused because of ``max_bytes`` (``reject``)."""
    file_bytes: int
    """Database plus WAL file."""
    write_failed: int = 0
    """Readings taken from the hub that could not be written (disk full, I/O error)."""


# ---- the store (synchronous; runs on the worker thread) -------------------------------------


def _new_epoch() -> int:
    return secrets.randbelow(2**31 - 1) + 1


OUTBOX_FILE = sqlitefile.Kind(
    what="outbox database",
    a_what="an outbox",
    error=OutboxError,
    schema=_SCHEMA,
    tables=frozenset(_TABLES),
    version=SCHEMA_VERSION,
    initial_meta=lambda: [("next_seq", 1), ("epoch", _new_epoch())],
    not_ours="point outbox.file at another file",
    where="check gateway.state_dir and outbox.file",
)


def _runs(seqs: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Consecutive runs ``(first, last)`` of sorted ``seqs``."""
    start = prev = seqs[0]
    for s in seqs[1:]:
        if s != prev + 1:
            yield start, prev
            start = s
        prev = s
    yield start, prev


class _Store:
    """One connection and everything done with it. Not thread-safe: one thread at a time."""

    backlog_readings: int
    backlog_bytes: int
    oldest_seq: int | None
    dead_readings: int
    dead_bytes: int
    dead_letters: int
    gaps: int
    in_flight: int
    next_seq: int
    file_bytes: int

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 256 * 1024**2,
        policy: Policy = "drop-oldest",
        synchronous: Synchronous = "full",
        repair: bool = True,
        create: bool = True,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.policy = policy
        try:
            self.conn = self._open(synchronous, create=create, check=repair)
        except sqlitefile.Corrupt as e:
            if not repair:
                raise OutboxError(
                    f"outbox database {path} is corrupt ({e}); the gateway moves it aside at "
                    "its next start"
                ) from None
            aside = sqlitefile.move_aside(path, OUTBOX_FILE, str(e))
            self.conn = self._open(synchronous, create=True, check=True)
            log.error(
                "OUTBOX DATABASE CORRUPT: moved it aside and started an empty one; the readings "
                "it held were not sent to CPI",
                extra=kv(path=path, moved_to=aside, reason=e),
            )
        self.commits = 0
        self.dropped_full = 0
        self._full = False
        self._data_version = -1
        self.refresh()

    # -- opening

    def _open(self, synchronous: Synchronous, *, create: bool, check: bool) -> sqlite3.Connection:
        return sqlitefile.connect(
            self.path,
            OUTBOX_FILE,
            create=create,
            synchronous=synchronous,
            check=check,
            # After a checkpoint the WAL is cut back to this, so it cannot grow for good.
            pragmas=("journal_size_limit = 67108864",),
        )

    def close(self) -> None:
        self.conn.close()

    # -- counters

    def refresh(self) -> None:
        """Recount everything from the database (at open, and after another connection —
        the CLI — changed it)."""
        c = self.conn
        self._data_version = c.execute("PRAGMA data_version").fetchone()[0]
        n, size, oldest, newest = c.execute(
            "SELECT count(*), coalesce(sum(length(topic) + length(payload)), 0), min(seq), "
            "max(seq) FROM readings"
        ).fetchone()
        self.backlog_readings = n
        self.backlog_bytes = size + n * ROW_OVERHEAD
        self.oldest_seq = oldest
        dn, dsize, dmax = c.execute(
            "SELECT count(*), coalesce(sum(length(topic) + length(payload)), 0), max(seq) "
            "FROM dead_readings"
        ).fetchone()
        self.dead_readings = dn
        self.dead_bytes = dsize + dn * ROW_OVERHEAD
        self.dead_letters = c.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
        self.gaps = c.execute("SELECT count(*) FROM gaps").fetchone()[0]
        self.in_flight = c.execute("SELECT count(*) FROM in_flight").fetchone()[0]
        meta = c.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0]
        self.next_seq = max(meta, (newest or 0) + 1, (dmax or 0) + 1)
        epoch = c.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        self.epoch: int = epoch[0] if epoch is not None else 0
        self.file_bytes = self._file_bytes()

    def check_external(self) -> None:
        if self.conn.execute("PRAGMA data_version").fetchone()[0] != self._data_version:
            self.refresh()

    def _file_bytes(self) -> int:
        total = 0
        for name in (str(self.path), f"{self.path}-wal"):
            with contextlib.suppress(OSError):  # no WAL between connections
                total += os.stat(name).st_size
        return total

    def counters(self) -> OutboxStatistics:
        """A consistent snapshot, taken on the worker thread after each operation."""
        return OutboxStatistics(
            backlog_readings=self.backlog_readings,
            backlog_bytes=self.backlog_bytes,
            oldest_seq=self.oldest_seq,
            next_seq=self.next_seq,
            in_flight=self.in_flight,
            dead_letters=self.dead_letters,
            dead_readings=self.dead_readings,
            gaps=self.gaps,
            commits=self.commits,
            dropped_hub=0,
            dropped_full=self.dropped_full,
            rejected=0,
            file_bytes=self.file_bytes,
        )

    @property
    def used_bytes(self) -> int:
        return self.backlog_bytes + self.dead_bytes

    def _update_oldest(self) -> None:
        self.oldest_seq = self.conn.execute("SELECT min(seq) FROM readings").fetchone()[0]

    # -- transactions

    def _transaction(self, fn: Callable[[], _T]) -> _T:
        try:
            result = sqlitefile.transaction(self.conn, fn)
        except BaseException:
            self.refresh()  # the counters may have moved with the rolled-back work
            raise
        self.commits += 1
        self.file_bytes = self._file_bytes()
        return result

    def _add_gap(self, after_seq: int, count: int, reason: str, *, seqs_lost: bool) -> None:
        """Record a gap, merged into the last unsent one where they describe one loss: the
        same place for readings lost before they had a seq, or contiguous seqs."""
        if count <= 0:
            return
        row = self.conn.execute(
            "SELECT id, after_seq, count FROM gaps WHERE batch IS NULL AND reason = ? "
            "ORDER BY id DESC LIMIT 1",
            (reason,),
        ).fetchone()
        if row is not None:
            gap_id, g_after, g_count = row
            if g_after == after_seq or (seqs_lost and g_after + g_count == after_seq):
                self.conn.execute("UPDATE gaps SET count = count + ? WHERE id = ?", (count, gap_id))
                return
        self.conn.execute(
            "INSERT INTO gaps (after_seq, count, reason) VALUES (?, ?, ?)",
            (after_seq, count, reason),
        )
        self.gaps += 1

    # -- writing

    def append(
        self, readings: Sequence[Reading], losses: Sequence[tuple[int, str]] = ()
    ) -> tuple[int, int] | None:
        """Store ``readings`` in one transaction, with a gap for each ``(count, reason)`` of
        ``losses`` (readings lost before them); the seq range stored, None if none was.
        Raises ``OutboxFull`` (policy ``reject``): then the same transaction stores the gaps
        and one for the refused readings, and nothing else."""
        self.check_external()
        rows = [
            (r.topic, (r if r.seq is None else attrs.evolve(r, seq=None)).encoded())
            for r in readings
        ]
        sizes = [len(t) + len(p) + ROW_OVERHEAD for t, p in rows]
        over = self.used_bytes + sum(sizes) - self.max_bytes

        def add_losses() -> None:
            for count, reason in losses:
                self._add_gap(self.next_seq - 1, count, reason, seqs_lost=False)

        if over > 0 and self.policy == "reject":

            def refuse() -> None:
                add_losses()
                self._add_gap(self.next_seq - 1, len(rows), OUTBOX_FULL_REJECTED, seqs_lost=False)

            self._transaction(refuse)
            raise OutboxFull(len(rows), self.max_bytes)

        def work() -> tuple[int, int] | None:
            nonlocal rows, sizes, over
            add_losses()
            if over > 0:
                over -= self._drop_oldest(over)
            if over > 0:
                # Nothing older left to drop (in flight or dead letters): the newest win.
                k = 0
                while over > 0 and k < len(rows):
                    over -= sizes[k]
                    k += 1
                rows, sizes = rows[k:], sizes[k:]
                self._add_gap(self.next_seq - 1, k, OUTBOX_FULL_NEW, seqs_lost=False)
                self.dropped_full += k
            if not rows:
                return None
            first = self.next_seq
            last = first + len(rows) - 1
            self.conn.executemany(
                "INSERT INTO readings VALUES (?, ?, ?)",
                [(first + i, t, p) for i, (t, p) in enumerate(rows)],
            )
            self.conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (last + 1,))
            return first, last

        dropped_before = self.dropped_full
        result = self._transaction(work)
        self._log_full(self.dropped_full - dropped_before)
        if result is not None:
            first, last = result
            self.next_seq = last + 1
            self.backlog_readings += last - first + 1
            self.backlog_bytes += sum(sizes)
            if self.oldest_seq is None or first < self.oldest_seq:
                self._update_oldest()
        return result

    def _log_full(self, dropped: int) -> None:
        """One error per episode of a full outbox (``drop-oldest``), one line when it ends."""
        if dropped and not self._full:
            log.error(
                "outbox full (max_bytes): dropping the oldest readings not yet sent (reported "
                "to CPI as a gap); CPI is not taking the backlog, or max_bytes is too small",
                extra=kv(max_bytes=self.max_bytes, dropped=dropped, dead_bytes=self.dead_bytes),
            )
            self._full = True
        elif not dropped and self._full:
            log.warning("outbox below max_bytes again", extra=kv(dropped_total=self.dropped_full))
            self._full = False

    def _drop_oldest(self, need: int) -> int:
        """Delete the oldest readings outside the batches in flight until ``need`` bytes are
        free; returns the bytes freed. Inside the caller's transaction."""
        freed = 0
        dropped = 0
        while freed < need:
            candidates = self.conn.execute(_DROPPABLE, (ROW_OVERHEAD, 1000)).fetchall()
            if not candidates:
                break
            taken: list[int] = []
            for seq, size in candidates:
                taken.append(seq)
                freed += size
                if freed >= need:
                    break
            for first, last in _runs(taken):
                self.conn.execute("DELETE FROM readings WHERE seq BETWEEN ? AND ?", (first, last))
                self._add_gap(first - 1, last - first + 1, OUTBOX_FULL_OLDEST, seqs_lost=True)
            dropped += len(taken)
        if dropped:
            self.backlog_readings -= dropped
            self.backlog_bytes -= freed
            self.dropped_full += dropped
            self._update_oldest()
        return freed

    # -- batches

    def next_batch(self, max_readings: int, max_bytes: int) -> Batch | None:
        self.check_external()
        c = self.conn
        while True:
            row = c.execute(
                "SELECT first_seq, last_seq, attempts FROM in_flight ORDER BY first_seq LIMIT 1"
            ).fetchone()
            if row is None:
                return self._cut(max_readings, max_bytes)
            first, last, attempts = row
            readings = self._readings(first, last)
            if not readings:  # emptied behind our back: nothing left to send
                self._transaction(functools.partial(self._forget, first))
                continue
            c.execute("UPDATE in_flight SET attempts = attempts + 1 WHERE first_seq = ?", (first,))
            return Batch(
                first,
                last,
                readings,
                sent_before=attempts > 0,
                gaps=self._gaps(first),
                epoch=self.epoch,
            )

    def _forget(self, first: int) -> None:
        self.conn.execute("DELETE FROM in_flight WHERE first_seq = ?", (first,))
        self.conn.execute("UPDATE gaps SET batch = NULL WHERE batch = ?", (first,))
        self.in_flight -= 1

    def _readings(self, first: int, last: int) -> tuple[StoredReading, ...]:
        return tuple(
            StoredReading(seq, topic, payload)
            for seq, topic, payload in self.conn.execute(
                "SELECT seq, topic, payload FROM readings WHERE seq BETWEEN ? AND ? ORDER BY seq",
                (first, last),
            )
        )

    def _gaps(self, first: int) -> tuple[Gap, ...]:
        return tuple(
            Gap(after, count, reason)
            for after, count, reason in self.conn.execute(
                "SELECT after_seq, count, reason FROM gaps WHERE batch = ? ORDER BY after_seq, id",
                (first,),
            )
        )

    def _cut(self, max_readings: int, max_bytes: int) -> Batch | None:
        c = self.conn
        oldest = c.execute("SELECT min(seq) FROM readings").fetchone()[0]
        if oldest is None:
            return None
        # A range never spans a dead-lettered seq: replayed, it would change the batch.
        limit = c.execute("SELECT min(seq) FROM dead_readings WHERE seq > ?", (oldest,)).fetchone()[
            0
        ]
        chosen: list[StoredReading] = []
        size = 0
        for seq, topic, payload in c.execute(
            "SELECT seq, topic, payload FROM readings WHERE seq < ? ORDER BY seq LIMIT ?",
            (math.inf if limit is None else limit, max(1, max_readings)),
        ):
            if chosen and size + len(payload) > max_bytes:
                break
            chosen.append(StoredReading(seq, topic, payload))
            size += len(payload)
        first, last = chosen[0].seq, chosen[-1].seq

        def record() -> None:
            c.execute("INSERT INTO in_flight VALUES (?, ?, 1)", (first, last))
            c.execute(
                "UPDATE gaps SET batch = ? WHERE batch IS NULL AND after_seq < ?", (first, last)
            )

        self._transaction(record)
        self.in_flight += 1
        return Batch(
            first, last, tuple(chosen), sent_before=False, gaps=self._gaps(first), epoch=self.epoch
        )

    def _recorded(self, batch: Batch) -> None:
        row = self.conn.execute(
            "SELECT last_seq FROM in_flight WHERE first_seq = ?", (batch.first_seq,)
        ).fetchone()
        if row is None or row[0] != batch.last_seq:
            raise OutboxError(
                f"batch {batch.first_seq}-{batch.last_seq} is not in flight (confirmed, split or "
                "dead-lettered already?)"
            )

    def _range_size(self, first: int, last: int) -> tuple[int, int]:
        n, size = self.conn.execute(
            "SELECT count(*), coalesce(sum(length(topic) + length(payload)), 0) FROM readings "
            "WHERE seq BETWEEN ? AND ?",
            (first, last),
        ).fetchone()
        return n, size + n * ROW_OVERHEAD

    def confirm(self, batch: Batch) -> None:
        self._recorded(batch)
        first, last = batch.first_seq, batch.last_seq
        n, size = self._range_size(first, last)

        def work() -> None:
            c = self.conn
            c.execute("DELETE FROM readings WHERE seq BETWEEN ? AND ?", (first, last))
            gaps = c.execute("DELETE FROM gaps WHERE batch = ?", (first,)).rowcount
            c.execute("DELETE FROM in_flight WHERE first_seq = ?", (first,))
            self.gaps -= gaps

        self._transaction(work)
        self.in_flight -= 1
        self.backlog_readings -= n
        self.backlog_bytes -= size
        self._update_oldest()

    def split(self, batch: Batch) -> None:
        self._recorded(batch)
        first, last = batch.first_seq, batch.last_seq
        seqs = [
            r[0]
            for r in self.conn.execute(
                "SELECT seq FROM readings WHERE seq BETWEEN ? AND ? ORDER BY seq", (first, last)
            )
        ]
        if len(seqs) < 2:
            raise OutboxError(
                f"batch {first}-{last} holds one reading and cannot be split: dead-letter it"
            )
        mid, second = seqs[len(seqs) // 2 - 1], seqs[len(seqs) // 2]

        def work() -> None:
            c = self.conn
            c.execute(
                "UPDATE in_flight SET last_seq = ?, attempts = 0 WHERE first_seq = ?", (mid, first)
            )
            c.execute("INSERT INTO in_flight VALUES (?, ?, 0)", (second, last))
            c.execute(
                "UPDATE gaps SET batch = ? WHERE batch = ? AND after_seq >= ?", (second, first, mid)
            )

        self._transaction(work)
        self.in_flight += 1

    def dead_letter(self, batch: Batch, status: int | None, excerpt: str) -> None:
        self._recorded(batch)
        first, last = batch.first_seq, batch.last_seq
        n, size = self._range_size(first, last)

        def work() -> None:
            c = self.conn
            letter = c.execute(
                "INSERT INTO dead_letters (first_seq, last_seq, status, excerpt, time) "
                "VALUES (?, ?, ?, ?, ?)",
                (first, last, status, excerpt[:2000], time.time()),
            ).lastrowid
            c.execute(
                "INSERT INTO dead_readings SELECT seq, ?, topic, payload FROM readings "
                "WHERE seq BETWEEN ? AND ?",
                (letter, first, last),
            )
            c.execute("DELETE FROM readings WHERE seq BETWEEN ? AND ?", (first, last))
            self._forget(first)  # its gaps travel with the next batch

        self._transaction(work)
        self.dead_letters += 1
        self.dead_readings += n
        self.dead_bytes += size
        self.backlog_readings -= n
        self.backlog_bytes -= size
        self._update_oldest()

    # -- for the CLI

    def replay_dead(self) -> int:
        def work() -> int:
            c = self.conn
            n: int = c.execute(
                "INSERT INTO readings SELECT seq, topic, payload FROM dead_readings"
            ).rowcount
            c.execute("DELETE FROM dead_readings")
            c.execute("DELETE FROM dead_letters")
            return n

        n = self._transaction(work)
        self.refresh()
        return n

    def purge_dead(self) -> int:
        def work() -> int:
            n: int = self.conn.execute("DELETE FROM dead_readings").rowcount
            self.conn.execute("DELETE FROM dead_letters")
            return n

        n = self._transaction(work)
        self.refresh()
        return n


# ---- the outbox as the daemon uses it -------------------------------------------------------


class Outbox(trio.abc.AsyncResource):
    """The store, used from Trio: every method that touches the database runs on the worker
    thread (one at a time) and is a checkpoint. Implements ``BatchSource``.

    Open with ``await Outbox.open(path, section)``; close with ``await outbox.aclose()`` or
    ``async with``."""

    def __init__(self, store: _Store, section: OutboxSection) -> None:
        self._store = store
        self._counters = store.counters()
        self.section = section
        self._limiter = trio.CapacityLimiter(1)
        self._stored = trio.Event()
        self._closed = False
        self.dropped_hub = 0
        self.rejected = 0
        self.write_failed = 0

    @classmethod
    async def open(cls, path: str | Path, section: OutboxSection | None = None) -> Outbox:
        """Open (or create) the database at ``path``. A corrupt one is moved aside and a fresh
        one created; one that cannot be opened raises ``OutboxError``."""
        section = section or OutboxSection()

        def opening() -> _Store:
            return _Store(
                Path(path),
                max_bytes=section.max_bytes,
                policy=section.policy,
                synchronous=section.synchronous,
            )

        store = await trio.to_thread.run_sync(opening)
        return cls(store, section)

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        if self._closed:
            raise OutboxError("the outbox is closed")
        store = self._store

        def call() -> tuple[_T | None, BaseException | None, OutboxStatistics]:
            # The counters travel back with the result, so statistics() changes on the event
            # loop together with what the caller learns, never half-way through an operation.
            try:
                return fn(*args), None, store.counters()
            except BaseException as e:
                return None, e, store.counters()

        result, error, self._counters = await trio.to_thread.run_sync(call, limiter=self._limiter)
        if isinstance(error, sqlite3.Error):
            raise OutboxError(f"outbox database {store.path}: {error}") from error
        if error is not None:
            raise error
        return result  # type: ignore[return-value]  # _T, as fn returned it

    async def aclose(self) -> None:
        if not self._closed:
            with trio.CancelScope(shield=True):
                await self._run(self._store.close)
            self._closed = True

    # -- writing

    async def append(
        self,
        readings: Sequence[Reading],
        *,
        lost: int = 0,
        lost_reason: str = HUB_OVERFLOW,
        lost_before: Mapping[str, int] | None = None,
    ) -> tuple[int, int] | None:
        """Commit ``readings`` in one transaction; the seq range stored (None if nothing was).
        ``lost`` readings dropped before these are recorded as a gap in the same transaction,
        after the gaps of ``lost_before`` (reason -> count). Raises ``OutboxFull`` (counted in
        ``rejected``) when the policy is ``reject`` and ``max_bytes`` is reached: then the
        same transaction records the refused readings, and the lost ones, as gaps."""
        losses = [(count, reason) for reason, count in (lost_before or {}).items()]
        losses.append((lost, lost_reason))
        if not readings and not any(count for count, _ in losses):
            await trio.lowlevel.checkpoint()
            return None
        try:
            result = await self._run(self._store.append, readings, losses)
        except OutboxFull as e:
            self.rejected += e.count
            raise
        if result is not None:
            self._stored.set()
        return result

    async def feed(
        self,
        subscription: Subscription,
        *,
        watermark: Watermark | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Commit what ``subscription`` delivers: at once when idle, else grouped into one
        transaction per ``commit_interval`` (or ``commit_readings``). Readings the hub dropped
        (its buffer is the one between hub and disk) are recorded as a gap and logged once
        per episode; readings refused by a full outbox (``reject``) likewise. A write that
        fails (disk full, I/O error) loses the readings it held: they are counted
        (``write_failed``), logged once per episode and recorded as a gap by the next write
        that works, tried after a backoff. Returns when the subscription is closed, after
        committing what it took; on cancellation commits what it took, shielded."""
        section = self.section
        pending: list[Reading] = []
        lost = 0
        # Losses already counted (and told to the watermark) that wait for a write to record
        # them as gaps: reason -> count.
        unrecorded: dict[str, int] = {}
        last_commit = -math.inf
        overflowing = False
        last_drop = -math.inf
        rejecting = False
        failing = False
        retry_in = WRITE_RETRY_INITIAL

        def not_stored(dropped: int, readings: int) -> None:
            if watermark is not None:  # the oldest were dropped by the hub, then these
                watermark.advance(dropped, stored=False)
                watermark.advance(readings, stored=False)
            self.dropped_hub += dropped

        async def commit() -> None:
            # ``pending`` is cleared only once stored or refused: cancelled while waiting for
            # the worker, nothing was written and the shielded final commit takes it.
            nonlocal pending, lost, unrecorded, overflowing, rejecting, last_drop, failing
            readings, dropped, earlier = pending, lost, unrecorded
            try:
                await self.append(readings, lost=dropped, lost_before=earlier)
            except OutboxFull as e:
                # The refused readings and the losses before them are gaps already.
                pending, lost, unrecorded = [], 0, {}
                not_stored(dropped, len(readings))
                if not rejecting:
                    log.error("%s", e, extra=kv(policy=section.policy))
                rejecting = True
                return
            except OutboxError as e:
                if self._closed:
                    raise
                pending, lost = [], 0
                unrecorded = dict(earlier)
                for reason, count in (
                    (HUB_OVERFLOW, dropped),
                    (OUTBOX_WRITE_FAILED, len(readings)),
                ):
                    if count:
                        unrecorded[reason] = unrecorded.get(reason, 0) + count
                not_stored(dropped, len(readings))
                self.write_failed += len(readings)
                if not failing:
                    log.error(
                        "outbox: cannot write to the database: the readings it was to store "
                        "are lost (reported to CPI as a gap once writing works again); free "
                        "disk space or check the storage",
                        extra=kv(error=e, lost=len(readings), retry_in=f"{retry_in:g}s"),
                    )
                failing = True
                return
            pending, lost, unrecorded = [], 0, {}
            if watermark is not None:
                watermark.advance(dropped, stored=False)
                watermark.advance(len(readings))
            self.dropped_hub += dropped
            if failing:
                log.warning(
                    "outbox: writing to the database works again", extra=kv(lost=self.write_failed)
                )
                failing = False
            if rejecting:
                log.warning("outbox: storing readings again", extra=kv(refused=self.rejected))
                rejecting = False
            now = trio.current_time()
            if dropped:
                last_drop = now
            if dropped and not overflowing:
                log.error(
                    "outbox: the hub dropped readings before they reached the disk (reported "
                    "to CPI as a gap); the disk is too slow or outbox.buffer too small",
                    extra=kv(dropped=dropped, buffer=section.buffer),
                )
                overflowing = True
            elif overflowing and now - last_drop >= EPISODE_QUIET:
                log.warning(
                    "outbox: readings reach the disk again", extra=kv(lost=self.dropped_hub)
                )
                overflowing = False

        task_status.started()
        try:
            while True:
                try:
                    delivery = await subscription.receive()
                except trio.EndOfChannel:
                    break
                pending.extend(delivery.readings)
                lost += delivery.dropped
                with trio.move_on_at(last_commit + section.commit_interval):
                    while len(pending) < section.commit_readings:
                        try:
                            delivery = await subscription.receive()
                        except trio.EndOfChannel:
                            break
                        pending.extend(delivery.readings)
                        lost += delivery.dropped
                last_commit = trio.current_time()
                await commit()
                if failing:  # the hub's buffer holds what arrives meanwhile
                    await trio.sleep(retry_in)
                    retry_in = min(retry_in * 2, WRITE_RETRY_MAX)
                else:
                    retry_in = WRITE_RETRY_INITIAL
        finally:
            if pending or lost or unrecorded:
                with trio.CancelScope(shield=True):
                    await commit()

    # -- BatchSource

    async def wait_pending(self) -> None:
        while True:
            if self._stored.is_set():
                self._stored = trio.Event()
            if self._counters.backlog_readings > 0:
                await trio.lowlevel.checkpoint()
                return
            # Another connection (the CLI's replay-dead) may add readings: look now and then.
            with trio.move_on_after(1.0) as scope:
                await self._stored.wait()
            if scope.cancelled_caught:
                await self._run(self._store.check_external)

    async def next_batch(self, max_readings: int, max_bytes: int) -> Batch | None:
        return await self._run(self._store.next_batch, max_readings, max_bytes)

    async def confirm(self, batch: Batch) -> None:
        await self._run(self._store.confirm, batch)

    async def split(self, batch: Batch) -> None:
        await self._run(self._store.split, batch)

    async def dead_letter(self, batch: Batch, status: int | None, excerpt: str) -> None:
        await self._run(self._store.dead_letter, batch, status, excerpt)
        log.error(
            "outbox: batch moved to the dead letters ('edge-gateway outbox dead-letters')",
            extra=kv(first=batch.first_seq, last=batch.last_seq, status=status),
        )

    def statistics(self) -> OutboxStatistics:
        return attrs.evolve(
            self._counters,
            dropped_hub=self.dropped_hub,
            rejected=self.rejected,
            write_failed=self.write_failed,
        )


if TYPE_CHECKING:

    def _implements_batch_source(outbox: Outbox) -> BatchSource:
        return outbox  # mypy checks Outbox against the protocol here


# ---- the CLI (``edge-gateway outbox ...``): safe while the daemon runs ----------------------


def _cli_store(path: str | Path) -> _Store:
    return _Store(Path(path), repair=False, create=False)


def stats(path: str | Path) -> list[str]:
    with contextlib.closing(_cli_store(path)) as store:
        oldest = store.oldest_seq
        rows = store.conn.execute(
            "SELECT first_seq, last_seq, attempts FROM in_flight ORDER BY first_seq"
        ).fetchall()
        lost = store.conn.execute("SELECT coalesce(sum(count), 0) FROM gaps").fetchone()[0]
        return [
            f"file: {store.path} ({store.file_bytes} bytes with WAL)",
            f"backlog: {store.backlog_readings} readings, {store.backlog_bytes} bytes"
            + (f", seq {oldest} .. {store.next_seq - 1}" if oldest is not None else ""),
            f"next seq: {store.next_seq}",
            "in flight: "
            + (", ".join(f"{f}-{la} (sent {a}x)" for f, la, a in rows) if rows else "none"),
            f"gaps to report: {store.gaps} ({lost} readings lost)",
            f"dead letters: {store.dead_letters} batches, {store.dead_readings} readings",
        ]


def peek(path: str | Path, n: int = 10) -> list[str]:
    """The ``n`` oldest readings waiting, one line each: ``seq topic payload``."""
    with contextlib.closing(_cli_store(path)) as store:
        return [
            f"{seq} {topic} {payload.decode(errors='replace')}"
            for seq, topic, payload in store.conn.execute(
                "SELECT seq, topic, payload FROM readings ORDER BY seq LIMIT ?", (max(0, n),)
            )
        ]


def dead_letters(path: str | Path) -> list[str]:
    with contextlib.closing(_cli_store(path)) as store:
        lines = []
        for letter, first, last, status, excerpt, when in store.conn.execute(
            "SELECT id, first_seq, last_seq, status, excerpt, time FROM dead_letters ORDER BY id"
        ):
            count = store.conn.execute(
                "SELECT count(*) FROM dead_readings WHERE letter = ?", (letter,)
            ).fetchone()[0]
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
            lines.append(
                f"{stamp} seq {first}-{last} ({count} readings) status "
                f"{status if status is not None else '-'}: {excerpt[:200]!r}"
            )
        return lines


def replay_dead(path: str | Path) -> int:
    """Move every dead letter back to the readings waiting (same seqs, so before newer ones);
    the number of readings moved."""
    with contextlib.closing(_cli_store(path)) as store:
        return store.replay_dead()


def purge_dead(path: str | Path) -> int:
    """Delete every dead letter; the number of readings deleted."""
    with contextlib.closing(_cli_store(path)) as store:
        return store.purge_dead()
