"""What every bus driver provides and what it is given.

A bus is one serial port or one TCP connection (or a simulated source). The daemon's
supervisor creates it from its config with a ``BusContext``, runs it, and restarts it with
backoff when ``run`` raises.

Drivers use only the gateway's lower layer (``gateway.core``: readings, topics, config value
types, logging, backoff, the component model); only the composition root (``gateway.app``)
and the config loader (``gateway.config``) import drivers. ``make test`` checks both with
import-linter.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import attrs
import trio

from gateway.core.component import Condition
from gateway.core.configtypes import Name
from gateway.core.reading import Reading, Value


class WriteError(Exception):
    """A write (or an on-demand read) that cannot be done; the message says why and what to
    change."""


class WriteUncertain(WriteError):
    """A write that was sent, or may have been, without a clear answer (no response, the
    connection lost, a corrupted answer, the bus stopped under it): it may or may not have
    happened. A refusal by the device is a plain ``WriteError``: then it did not."""


class UnknownPoint(WriteError):
    """The target names no point of this bus (an unknown device or point)."""


def unknown_point(bus: str, target: str, points: Iterable[str]) -> UnknownPoint:
    """The ``UnknownPoint`` for a ``target`` (``device/point``) that is none of ``points``
    (the bus's ``device/point`` names): suggests the closest names, or else lists the bus's
    devices or the device's points, so the caller can see what to send instead."""
    known = list(points)
    devices = list(dict.fromkeys(p.partition("/")[0] for p in known))
    device = target.partition("/")[0]
    guesses = difflib.get_close_matches(target, known, n=2)
    if guesses:
        hint = f"did you mean {' or '.join(repr(g) for g in guesses)}?"
    elif device in devices:
        names = [p.partition("/")[2] for p in known if p.partition("/")[0] == device]
        hint = f"the points of {device!r} are {_listing(names)}"
    else:
        hint = f"its devices are {_listing(devices)}" if devices else "it has no devices"
    return UnknownPoint(f"bus {bus!r} has no point {target!r}; {hint}")


def _listing(names: list[str], most: int = 10) -> str:
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown}, ... ({len(names)} in all)"


@attrs.frozen
class BusContext:
    """What a bus gets from the daemon.

    ``publish`` hands a reading to the hub and never blocks. ``progress`` is called after every
    poll cycle (successful or not): the supervisor restarts a bus that stops making progress
    and the systemd watchdog relies on that.
    """

    publish: Callable[[Reading], None]
    progress: Callable[[], None]


class BusConfig(Protocol):
    """The part of every driver's config class that the daemon relies on."""

    @property
    def name(self) -> Name: ...

    @property
    def kind(self) -> str: ...

    def topics(self) -> Iterator[str]:
        """Every topic (``bus/device/point``) this bus publishes."""
        ...

    def stall_after(self) -> float:
        """Seconds without progress after which the bus counts as stuck."""
        ...

    def check(self) -> Iterator[tuple[str, str]]:
        """Problems no single field shows: ``(path below this bus, message)`` pairs."""
        ...

    def describe(self) -> str:
        """Where the bus is, for ``check-config`` and logs: ``/dev/ttyUSB0 9600 8N1``,
        ``10.0.0.5:502``, ``simulated``."""
        ...

    def check_write(self, target: str, value: Value) -> Value:
        """Whether the bus's ``write`` would accept ``value`` for ``target``
        (``device/point``), from the config alone: no I/O. Returns the value the point will
        hold, which a register's resolution may round (``12.34`` on a point with scale 0.1
        is ``12.3``). Raises ``UnknownPoint`` when no such device or point is configured,
        ``WriteError`` when the point is not writable or the value has the wrong type or is
        out of range; the message is the one ``write`` gives for the same case."""
        ...


class Bus(Protocol):
    name: str

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll until cancelled. Call ``task_status.started()`` once the port/connection is up
        (or, for buses that reconnect by themselves, once the first attempt was made)."""
        ...

    async def write(self, target: str, value: Value) -> None:
        """Write ``value`` to ``device/point``; raises ``UnknownPoint`` or ``WriteError``
        with a clear reason (first every check ``BusConfig.check_write`` makes, then I/O
        failures: no response, disconnected, refused by the device)."""
        ...

    async def read(self, target: str) -> Value:
        """Read ``device/point`` now, from the device (to read back a write); raises
        ``UnknownPoint``, or ``WriteError`` for I/O failures as ``write`` does, or when the
        bus cannot read on demand."""
        ...

    def condition(self) -> Condition:
        """How the bus is now: up; degraded (some device not answering, the sensor silent)
        or down (port missing, host refusing or not resolving), with a short reason."""
        ...

    def statistics(self) -> object:
        """A frozen attrs value with the bus's counters."""
        ...
