"""What the outbox hands the CPI forwarder: stored readings cut into batches.

The contract between ``gateway.outbox`` (SQLite store-and-forward) and ``gateway.forwarder``
(HTTPS to CPI), so that each can be built and tested without the other.

- Every reading the outbox accepted has a gateway-wide sequence number (``seq``), increasing.
- ``next_batch`` returns the batch in flight again (same range, ``sent_before``) until it is
  confirmed, dead-lettered or split: a batch that was sent once is never re-cut under another
  id, so CPI's idempotent process call can drop a duplicate (``batch_id``).
- A ``Gap`` records readings the gateway lost before the disk (hub buffer overflow, outbox
  full under ``drop-oldest``); it travels with the next batch so CPI learns of it.

Pure data and a Protocol; depends on attrs only.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import attrs


@attrs.frozen
class StoredReading:
    seq: int
    topic: str
    payload: bytes
    """``Reading.encoded()``: the reading as a compact JSON object (topic, value, quality, ts,
    unit, reason), without ``seq``."""


@attrs.frozen
class Gap:
    """``count`` readings lost between ``after_seq`` and the next stored one, and why."""

    after_seq: int
    count: int
    reason: str


@attrs.frozen
class Batch:
    first_seq: int
    last_seq: int
    readings: tuple[StoredReading, ...]
    sent_before: bool = False
    """Handed out before and not confirmed: a retry (after a failure or a restart)."""
    gaps: tuple[Gap, ...] = ()
    epoch: int = 0
    """Random, made with the outbox database: a database made anew (the old one corrupt,
    deleted, moved) starts its seqs at 1 again, and its batches must not get the ids of
    batches CPI already took (its idempotent call would drop them as duplicates)."""

    @property
    def size(self) -> int:
        return sum(len(r.payload) for r in self.readings)


def batch_id(gateway: str, first_seq: int, last_seq: int, epoch: int = 0) -> str:
    """Stable across retries and restarts: the same range of the same database always has
    the same id. Readable in CPI's monitoring (``SAP_ApplicationID`` shows 120 characters)."""
    key = f"{gateway}\0{first_seq}\0{last_seq}\0{epoch}".encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    return f"{gateway[:60]}-{first_seq}-{last_seq}-{digest}"


class BatchSource(Protocol):
    """The outbox as the forwarder sees it. Every method may block on disk: they run on the
    outbox's worker thread and never block the event loop."""

    async def wait_pending(self) -> None:
        """Return once at least one reading waits to be sent."""

    async def next_batch(self, max_readings: int, max_bytes: int) -> Batch | None:
        """The batch in flight if there is one (unchanged), else a new one of the oldest
        readings within the limits (at least one reading, even if larger than
        ``max_bytes``), recorded as in flight. None when nothing waits."""

    async def confirm(self, batch: Batch) -> None:
        """CPI answered 2xx: delete the batch's readings (and its gaps)."""

    async def split(self, batch: Batch) -> None:
        """CPI refused the size (413): replace the batch in flight by its first half; the
        second half becomes the next batch. A batch of one reading cannot be split."""

    async def dead_letter(self, batch: Batch, status: int | None, excerpt: str) -> None:
        """CPI refused the batch for good (4xx): move it to the dead letters with why."""
