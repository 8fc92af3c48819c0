"""The ``edge-gateway`` entry point: signal handling from the first instant, then the command.

Importing the command (trio, cattrs, pymodbus) takes a moment; until the gateway's own
signal handling runs, SIGTERM is remembered (the gateway stops as soon as it can, with exit 0)
instead of killing the process, SIGHUP is ignored instead of killing it (the config is being
read anyway), and Ctrl-C ends it with 130 and no traceback. Imports nothing heavy.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

early_terms: list[int] = []
"""SIGTERMs that came before the gateway could handle them."""


def _remember(signum: int, frame: FrameType | None) -> None:
    early_terms.append(signum)


def handle_early_signals() -> None:
    signal.signal(signal.SIGTERM, _remember)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def ignore_signals() -> None:
    """The process only exits from here on. Ignored, not handled: at exit the interpreter
    resets Python-level handlers to the default, which would let a late SIGTERM, SIGINT or
    SIGHUP kill it by signal."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


DAEMONS = ("run", "demo")
"""Commands that become the gateway; the others (tail, check-config...) keep the default
signal dispositions, so that SIGTERM and SIGHUP end them as they end any command."""


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in DAEMONS:
        handle_early_signals()
    try:
        from gateway import cli
    except KeyboardInterrupt:
        ignore_signals()
        return 130
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
