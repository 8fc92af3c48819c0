"""The component model: one way in and one way out for every long-running part of the tree.

A component (a bus, and next the outbox, the forwarder, the wss server, the API) has a name,
a kind (``bus``, ``outbox``...; the STATUS line groups by it), a start policy, ``run`` (Trio's
``task_status`` protocol: ``started()`` once it is really ready), a ``health()`` value and
``statistics()`` returning a frozen attrs value. The composition root (``gateway.app``) runs
components and reads them only through this protocol: the watchdog, the STATUS line, reload
and (later) ``/readyz`` and ``/metrics``.

A running part says how it is with a ``Condition`` (state and a short reason, e.g.
``Condition(State.DOWN, "/dev/ttyUSB9 missing")``); whoever runs it adds since-when and the
last error to make a ``Health``.
"""

from __future__ import annotations

import enum
from typing import Protocol

import attrs
import trio


class State(enum.Enum):
    STARTING = "starting"
    UP = "up"
    DEGRADED = "degraded"
    """Running, but part of it is not working (e.g. one device of a bus stopped answering)."""
    DOWN = "down"


class StartPolicy(enum.Enum):
    REQUIRED = "required"
    """A failure to start (port in use, database unopenable) ends the process."""
    SUPERVISED = "supervised"
    """Started and restarted with backoff; a failure never holds back the others."""


@attrs.frozen
class Condition:
    """What a running part says about itself: its state and, unless up, why (short: it goes
    into the STATUS line, e.g. ``/dev/ttyUSB9 missing``, ``meter not answering``)."""

    state: State
    reason: str | None = None


UP = Condition(State.UP)


@attrs.frozen
class Health:
    """A component's health: its state, since when (wall clock, UTC seconds), why it is not
    up, and the last error it had (also after it recovered)."""

    state: State
    since: float
    reason: str | None = None
    last_error: str | None = None


class StartupError(Exception):
    """A required component cannot start. The message says what is wrong and what to do;
    ``exit_status`` is the process's exit status (sysexits.h)."""

    EX_UNAVAILABLE = 69
    EX_CANTCREAT = 73

    def __init__(self, message: str, exit_status: int = EX_UNAVAILABLE) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class Component(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def policy(self) -> StartPolicy: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``task_status.started()`` once ready. A required component
        raises ``StartupError`` when it cannot start."""
        ...

    def health(self) -> Health: ...

    def statistics(self) -> object:
        """A frozen attrs value (trio's style): counters, queue depths, per-part detail."""
        ...
