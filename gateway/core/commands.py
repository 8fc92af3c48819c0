"""Commands: what CPI (or an operator) asks the gateway to do, and the contract between the
parts that take part in one.

    API (POST /api/v1/commands) --+                    +--> ModbusTargets (bus writes)
    CPI response {"commands": []} +--> CommandRouter --+
    edge-gateway send-command ----+    (gateway.       +--> DeviceTargets (wss command / ack)
                                        commands)

- ``CommandRequest`` is one validated request: its ``id`` is the caller's and makes it
  idempotent (the same id never executes twice; a repeat gets the first record back).
- ``CommandRecord`` is what the gateway knows of it at any time: its state and result. The
  router keeps records in SQLite, so pending device commands survive a restart.
- ``CommandRejected`` is bad input (nothing was executed): an HTTP status, a short code and a
  message naming what is wrong and what to send instead.
- ``ModbusTargets`` is the router's way to buses (implemented by the composition root over the
  config and the running buses), ``DeviceTargets`` its way to connected devices (the device
  plane). ``CommandSink`` is the device plane's way back to the router.

Pure data and Protocols; depends on attrs and ``gateway.core.reading`` only.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Protocol

import attrs

from gateway.core.reading import Value

Json = object
"""Any JSON value (no NaN or Infinity): a command's ``args`` values and ``result``."""

MODBUS = "modbus"
DEVICE = "device"


class CommandState(enum.Enum):
    PENDING = "pending"
    """Accepted, not yet executed or delivered (a device target that is offline)."""
    DELIVERED = "delivered"
    """Sent to the device over wss; its ``ack`` has not come yet."""
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"
    """``expires`` passed before the command could be delivered or answered."""

    @property
    def final(self) -> bool:
        return self in (CommandState.DONE, CommandState.FAILED, CommandState.EXPIRED)


class Source(enum.Enum):
    API = "api"
    CPI = "cpi"
    """In CPI's response to a batch (the forwarder)."""


@attrs.frozen
class ModbusTarget:
    """``modbus:<bus>/<device>/<point>``."""

    bus: str
    device: str
    point: str

    def __str__(self) -> str:
        return f"{MODBUS}:{self.bus}/{self.device}/{self.point}"


@attrs.frozen
class DeviceTarget:
    """``device:<client id>``: a wss client of the device plane."""

    client_id: str

    def __str__(self) -> str:
        return f"{DEVICE}:{self.client_id}"


Target = ModbusTarget | DeviceTarget


@attrs.frozen
class CommandRequest:
    """One command as the caller sent it, after validation.

    For a Modbus target ``value`` is what to write (``name`` is ``write``); for a device,
    ``name`` and ``args`` are passed on as they are. ``timeout``: seconds the caller waits for
    the result (the write, or the device's ack); ``expires``: UTC seconds since the epoch after
    which it is no longer executed or delivered."""

    id: str
    target: Target
    name: str
    args: Mapping[str, Json]
    value: Value
    timeout: float
    expires: float
    read_back: bool = False
    """Modbus: read the point again after the write and return what the device holds."""


@attrs.frozen
class CommandRecord:
    request: CommandRequest
    source: Source
    state: CommandState
    created: float
    """UTC seconds since the epoch."""
    updated: float
    result: Json = None
    """What the device acked, or for a Modbus write ``{"written": v}`` (and ``"read_back"``)."""
    error: str | None = None
    """Why it failed or expired."""
    status: int = 200
    """The HTTP status the API answers with for this record (200 done, 202 pending or
    delivered, 502/503/504 failed, 410 expired): a repeat of the id gets the same."""


class CommandRejected(Exception):
    """Bad input: nothing was executed. ``status`` is the HTTP status (400 malformed, 404
    unknown target, 409 id reused for another command, 413 too large, 415 media type, 422 not
    writable / out of range / wrong type / expired), ``code`` a short machine-readable word."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Unavailable(Exception):
    """The target exists but cannot execute now (a bus that is down: 503 with its last
    error). Nothing was executed."""


class OutcomeUnknown(Exception):
    """A write was sent (or may have been) without a clear answer: it may or may not have
    happened (the API answers 504). Raised by ``ModbusTargets.write``."""


class ModbusTargets(Protocol):
    """The buses as the router sees them (``gateway.app`` implements it)."""

    def check_write(self, target: ModbusTarget, value: Value) -> Value:
        """Validate against the configured point (exists, writable, type, range) without any
        I/O; raises ``CommandRejected`` (404 unknown bus/device/point, 422 otherwise).
        Returns the value the point will hold (its resolution may round ``value``)."""
        ...

    async def write(self, target: ModbusTarget, value: Value) -> None:
        """Write through the running bus; raises ``Unavailable`` when the bus is not running
        or down (the message carries its last error), ``OutcomeUnknown`` when it may or may
        not have happened (no answer), another exception when it failed (refused by the
        device)."""
        ...

    async def read(self, target: ModbusTarget) -> Value:
        """Read the point now (for ``read_back``); raises as ``write`` does."""
        ...


class DeviceTargets(Protocol):
    """The device plane as the router sees it."""

    def known(self, client_id: str) -> bool:
        """Whether a client with this id is configured (may connect at all)."""
        ...

    def connected(self, client_id: str) -> bool: ...

    async def send_command(self, client_id: str, request: CommandRequest) -> bool:
        """Send a ``command`` frame to every open connection of the client (usually one);
        False when none is open (the command stays pending until it connects)."""
        ...


class CommandSink(Protocol):
    """What the device plane tells the router (``gateway.commands.CommandRouter``)."""

    def device_connected(self, client_id: str) -> None:
        """A connection of ``client_id`` was accepted: deliver its pending commands."""
        ...

    def device_acked(
        self, client_id: str, command_id: str, ok: bool, result: Json, error: str | None
    ) -> bool:
        """A device's ``ack``; False when no command with that id was delivered to that
        client (unknown, another client's, or already final): the device plane then answers
        an ``error`` frame."""
        ...
