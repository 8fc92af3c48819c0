"""One SQLite file of the gateway's (the outbox, the command store): opened the same way
(WAL, busy timeout, a quick check), its schema made or checked, and a corrupt file moved aside
for a fresh one, with errors that name the file and say what to do.

Each kind of file is a ``Kind``: what to call it, the exception its errors raise, its schema.
Depends on the standard library and attrs only.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import attrs

_T = TypeVar("_T")

BUSY_TIMEOUT_MS = 5000
"""How long a writer waits for another (the CLI next to the daemon) before giving up."""


class Corrupt(Exception):
    """The file is damaged (SQLite says so, or ``quick_check`` does)."""


@attrs.frozen
class Kind:
    what: str
    """``outbox database``, ``command database``: how messages name it."""
    a_what: str
    """The same with its article, for "not an outbox": ``an outbox``."""
    error: type[Exception]
    """Raised for every problem but corruption (which is ``Corrupt``)."""
    schema: str
    """``CREATE TABLE`` statements, ``;``-separated; one of them a ``meta(key, value)``."""
    tables: frozenset[str]
    version: int
    initial_meta: Callable[[], Sequence[tuple[str, object]]] = attrs.field(default=lambda: ())
    """Rows besides ``schema`` for a new file's ``meta``."""
    not_ours: str = "move it away or delete it"
    """What to do about an SQLite file that is not this kind."""
    where: str = "check gateway.state_dir"
    """Which setting decides the file's path."""


def is_corruption(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def connect(
    path: Path,
    kind: Kind,
    *,
    create: bool = True,
    synchronous: str = "full",
    check: bool = True,
    pragmas: Sequence[str] = (),
) -> sqlite3.Connection:
    """Open ``path`` for one worker thread: WAL, ``synchronous``, ``pragmas``; with ``check``
    a ``quick_check``; the schema made (a new file) or checked. Raises ``Corrupt``, or
    ``kind.error`` saying what to do."""
    conn = _connect(path, kind, create=create)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise kind.error(
                f"{kind.what} {path}: cannot switch to WAL mode (got {mode}): put the state "
                "directory on a local file system"
            )
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
        if check:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                raise Corrupt(f"quick_check: {result}")
        _schema(conn, path, kind)
    except sqlite3.Error as e:
        conn.close()
        if is_corruption(e):
            raise Corrupt(str(e)) from None
        raise kind.error(
            f"cannot use the {kind.what} {path}: {e}: check that the gateway's user may read "
            "and write it and its directory"
        ) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _connect(path: Path, kind: Kind, *, create: bool) -> sqlite3.Connection:
    if not create and not path.exists():
        raise kind.error(f"no {kind.what} at {path}: {kind.where}")
    if path.is_dir():
        raise kind.error(f"{kind.what} {path} is a directory: give a file ({kind.where})")
    if not path.parent.is_dir():
        raise kind.error(
            f"cannot create the {kind.what} {path}: directory {path.parent} does not exist "
            f"({kind.where})"
        )
    uri = f"{path.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
    try:
        return sqlite3.connect(
            uri,
            uri=True,
            isolation_level=None,  # explicit BEGIN IMMEDIATE / COMMIT
            check_same_thread=False,  # used from one worker thread at a time
            timeout=BUSY_TIMEOUT_MS / 1000,  # sets SQLite's busy_timeout
        )
    except sqlite3.Error as e:
        raise kind.error(
            f"cannot open the {kind.what} {path}: {e}: check that the gateway's user may read "
            f"and write {path} and its directory"
        ) from None


def _schema(conn: sqlite3.Connection, path: Path, kind: Kind) -> None:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:

        def create() -> None:
            for statement in kind.schema.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("schema", kind.version), *kind.initial_meta()],
            )

        transaction(conn, create)
        return
    if not tables >= kind.tables:
        raise kind.error(
            f"{path} is an SQLite database but not {kind.a_what} (tables: "
            f"{', '.join(sorted(tables))}): {kind.not_ours}"
        )
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    if row is None:
        raise kind.error(
            f"{kind.what} {path} has no schema version (not made by this gateway?): {kind.not_ours}"
        )
    if row[0] > kind.version:
        raise kind.error(
            f"{kind.what} {path} has schema version {row[0]}, newer than this "
            f"gateway's ({kind.version}): run the newer gateway, or move the file away"
        )


def move_aside(path: Path, kind: Kind, reason: str) -> Path:
    """Rename a corrupt file (and its WAL and shared-memory files) to
    ``<name>.corrupt-<UTC time>``, so a fresh one can be made and the old one examined."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        os.replace(path, aside)
        for suffix in ("-wal", "-shm"):
            side = Path(f"{path}{suffix}")
            if side.exists():
                os.replace(side, Path(f"{aside}{suffix}"))
    except OSError as e:
        raise kind.error(
            f"{kind.what} {path} is corrupt ({reason}) and cannot be moved aside: "
            f"{e.strerror}: move or delete it by hand"
        ) from None
    return aside


def transaction(conn: sqlite3.Connection, fn: Callable[[], _T]) -> _T:
    """``fn()`` in one ``BEGIN IMMEDIATE`` transaction: committed, or rolled back if it
    raises (and the error raised again)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result
