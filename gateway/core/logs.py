"""Logging: one line per event with ``key=value`` context.

Under systemd (``$JOURNAL_STREAM`` set) each line starts with a ``<N>`` syslog priority that
journald turns into the entry's priority, and carries no timestamp (journald adds one). On a
terminal, lines carry a UTC timestamp and the level. Use ``extra=kv(bus="rs485-1")`` for
context. Secrets never reach a log line: config values are logged only as ``Secret`` objects,
whose repr hides the value.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def kv(**fields: object) -> dict[str, object]:
    """``extra=`` for a log call: context printed as ``key=value`` after the message."""
    return {"kv": fields}


def _format_value(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class _Formatter(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        fields: dict[str, object] = getattr(record, "kv", {})
        if fields:
            message += " " + " ".join(f"{k}={_format_value(v)}" for k, v in fields.items())
        if record.exc_info:
            # One journal entry per line would split a traceback; keep it in one record.
            trace = self.formatException(record.exc_info)
            message += "\n" + trace
        if record.stack_info:  # log.warning(..., stack_info=True)
            message += "\n" + self.formatStack(record.stack_info)
        if self.journal:
            prio = _PRIORITY.get(record.levelno, 6)
            # Continuation lines get the prefix too, so journald keeps their priority.
            return "\n".join(f"<{prio}>{line}" for line in message.split("\n"))
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ms = int(record.msecs)
        return f"{ts}.{ms:03d}Z {record.levelname:<7} {record.name}: {message}"


def under_journal() -> bool:
    # systemd also passes stderr's device:inode here; we only run as the unit's main process
    # (never with stderr redirected), so the variable being set is enough.
    return bool(os.environ.get("JOURNAL_STREAM"))


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """``sys.excepthook``: a traceback nobody caught goes through our handler at critical
    priority, so ``journalctl -p warning`` (or ``-p crit``) shows a crash."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("gateway").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("gateway").critical(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


class AcceptRetries(logging.Filter):
    """trio's servers log a traceback every 0.1 s while ``accept`` fails for want of file
    descriptors (EMFILE, ENFILE, ENOBUFS, ENOMEM): one warning a minute, without the
    traceback, with how many were left out and what to do. Not a defect of the gateway, and a
    traceback in the journal says there is one."""

    EVERY = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._last: float | None = None
        self._left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("accept returned"):
            return True
        now = self._clock()
        if self._last is not None and now - self._last < self.EVERY:
            self._left_out += 1
            return False
        args = record.args if isinstance(record.args, tuple) and len(record.args) == 3 else None
        code, text, retry = args or ("?", "?", "?")
        record.msg = (
            "new connections wait: accepting one failed with %s (%s), retrying every %ss%s; "
            "the process is out of file descriptors: raise LimitNOFILE in the unit, or lower "
            "max_connections"
        )
        left_out = f" ({self._left_out} more such failures since the last message)"
        record.args = (code, text, retry, left_out if self._left_out else "")
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        self._last, self._left_out = now, 0
        return True


def setup(level: str = "info", stream: IO[str] | None = None) -> None:
    """Configure the root logger once; call again to change the level (reload). Uncaught
    exceptions (main thread and worker threads) are logged at critical priority."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    # Libraries chat at INFO about every request; our lines say what matters. Set on every
    # call: their own level, not the root's, decides what they log.
    for noisy in ("hypercorn", "httpx", "httpcore", "pymodbus", "trio-websocket"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    for handler in root.handlers:
        if getattr(handler, "_edge_gateway", False):
            return
    logging.getLogger("trio.serve_listeners").addFilter(AcceptRetries())
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(journal=under_journal()))
    handler._edge_gateway = True  # type: ignore[attr-defined]
    root.addHandler(handler)
