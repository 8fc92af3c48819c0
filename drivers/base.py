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

from collections.abc import Callable, Iterator
from typing import Protocol

import attrs
import trio

from gateway.core.component import Condition
from gateway.core.configtypes import Name
from gateway.core.reading import Reading, Value


class WriteError(Exception):
    """A write that cannot be done; the message says why and what to change."""


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


class Bus(Protocol):
    name: str

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll until cancelled. Call ``task_status.started()`` once the port/connection is up
        (or, for buses that reconnect by themselves, once the first attempt was made)."""
        ...

    async def write(self, target: str, value: Value) -> None:
        """Write ``value`` to ``device/point``; raises ``WriteError`` with a clear reason."""
        ...

    def condition(self) -> Condition:
        """How the bus is now: up; degraded (some device not answering, the sensor silent)
        or down (port missing, host refusing or not resolving), with a short reason."""
        ...

    def statistics(self) -> object:
        """A frozen attrs value with the bus's counters."""
        ...
