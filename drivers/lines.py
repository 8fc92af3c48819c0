"""``kind = "serial-line"``: sensors that send text lines on a serial port (NMEA 0183 GPS,
weather and gas sensors, scales, anything "one reading per line").

Three layers:

- the config (``SerialLineBusConfig``, ``LinePointConfig``) with ``check()``;
- sans-IO: ``LineParser`` (bytes in, lines out), ``decode_regex`` / ``decode_nmea`` (a line
  to values per point) and ``LineDecoder`` (the per-bus policy), all plain functions and
  small state machines, tested without ports or clocks;
- ``SerialLineBus``: the thin Trio adapter that owns the port (``drivers.serialio``), the
  poll and progress schedules, reconnects and logging.

Example::

    [[buses]]
    name = "weather"
    kind = "serial-line"
    port = "/dev/serial/by-id/usb-FTDI_FT232R-if00-port0"
    baudrate = 4800
    format = "regex"
    pattern = 'T=(?P<temperature>-?[0-9.]+) H=(?P<humidity>[0-9.]+)'
    poll = "MEAS"        # written (plus terminator) every interval; leave out if it streams
    interval = "2s"
    points = [
      { name = "temperature", unit = "degC" },
      { name = "humidity", unit = "%" },
    ]

Depends on ``drivers.base``, ``drivers.serialio`` and the gateway's value types only.
"""

from __future__ import annotations

import codecs
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from string import hexdigits
from typing import Literal

import attrs
import trio

from drivers.base import BusContext, WriteError
from drivers.serialio import PortError, SerialPort, SerialPortConfig
from gateway.core.component import UP, Condition
from gateway.core.configtypes import Duration, Name, duplicate_names
from gateway.core.logs import kv
from gateway.core.reading import Reading, Value

log = logging.getLogger("drivers.lines")

LineFormat = Literal["regex", "nmea"]
PointType = Literal["float", "int", "str", "bool"]

TERMINATORS = ("\r\n", "\n", "\r")
MAX_LINE_LENGTH = 65536
SILENCE_INTERVALS = 3
"""Without a valid line for this many intervals, the points read bad ``timeout``."""
BAD_LINE_LOG_INTERVAL = 60.0
"""At most one warning about bad lines per bus in this many seconds (with a count)."""

_SENTENCE = re.compile(r"[A-Z][A-Z0-9]{2,9}")
_PROBE = "\r\n$*,.-+0123456789AZaz=:; "


# ---- config -------------------------------------------------------------------------------


@attrs.frozen
class LinePointConfig:
    name: Name
    group: str | None = None
    """Regex format: the named group holding the value (default: the point's name)."""
    sentence: str | None = None
    """NMEA format: the sentence type, ``"GGA"`` (any talker) or ``"GPGGA"`` (that talker)."""
    field: int | None = None
    """NMEA format: the field number; 1 is the first field after the sentence id."""
    type: PointType = "float"
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0
    """value = number * scale + offset (numbers only)."""

    @property
    def group_name(self) -> str:
        return self.group or self.name


@attrs.frozen
class SerialLineBusConfig(SerialPortConfig):
    name: Name
    kind: Literal["serial-line"] = "serial-line"
    device: Name = Name("sensor")
    """The middle level of the topics: ``bus/device/point``."""
    format: LineFormat = "regex"
    pattern: str | None = None
    """Regex format: searched in each line; one named group per point."""
    terminator: str = "\r\n"
    """Ends the poll string. Received lines may end in CR, LF or CRLF either way."""
    encoding: str = "ascii"
    max_line_length: int = 256
    poll: str | None = None
    """Written (plus terminator) every interval, for sensors that answer on request."""
    interval: Duration = Duration(1.0)
    """Poll period; without ``poll``, the longest expected gap between lines."""
    reopen_initial: Duration = Duration(1.0)
    reopen_max: Duration = Duration(30.0)
    """Backoff between attempts to open the port while it is missing."""
    points: tuple[LinePointConfig, ...] = ()

    def topic(self, point: LinePointConfig) -> str:
        return f"{self.name}/{self.device}/{point.name}"

    def topics(self) -> Iterator[str]:
        for p in self.points:
            yield self.topic(p)

    def stall_after(self) -> float:
        # The bus feeds progress every interval, connected or not; only a wedged task stalls.
        return 3 * self.interval + 10.0

    def check(self) -> Iterator[tuple[str, str]]:
        yield from self.check_port()
        if self.terminator not in TERMINATORS:
            yield "terminator", f'{self.terminator!r} is not one of "\\r\\n", "\\n", "\\r"'
        encoding_ok = False
        try:
            codecs.lookup(self.encoding)
            encoding_ok = _PROBE.encode(self.encoding) == _PROBE.encode("ascii")
        except LookupError:
            yield (
                "encoding",
                (f"{self.encoding!r} is not a known text encoding (e.g. ascii, utf-8, latin-1)"),
            )
        else:
            if not encoding_ok:
                yield (
                    "encoding",
                    (
                        f"{self.encoding!r} is not ASCII-compatible: lines are split on CR/LF "
                        "bytes; use ascii, utf-8 or latin-1"
                    ),
                )
        if not 1 <= self.max_line_length <= MAX_LINE_LENGTH:
            yield "max_line_length", f"{self.max_line_length} is outside 1..{MAX_LINE_LENGTH}"
        if self.interval <= 0:
            yield "interval", "must be greater than 0"
        if self.reopen_initial <= 0:
            yield "reopen_initial", "must be greater than 0"
        if self.reopen_max < self.reopen_initial:
            yield "reopen_max", "must not be below reopen_initial"
        if self.poll is not None:
            if not self.poll:
                yield "poll", "must not be empty (leave it out for sensors that send by themselves)"
            elif "\r" in self.poll or "\n" in self.poll:
                yield "poll", "must not contain line breaks: the terminator is appended"
            elif encoding_ok:
                try:
                    self.poll.encode(self.encoding)
                except UnicodeEncodeError:
                    yield "poll", f"cannot be written in {self.encoding}"
        if not self.points:
            yield "points", "a serial-line bus needs at least one point (points = [ ... ])"
        yield from duplicate_names("points", [p.name for p in self.points])
        yield from (self._check_regex() if self.format == "regex" else self._check_nmea())
        for i, p in enumerate(self.points):
            if p.type in ("str", "bool"):
                if p.scale != 1.0:
                    yield f"points[{i}].scale", f"applies to numbers only (type is {p.type})"
                if p.offset != 0.0:
                    yield f"points[{i}].offset", f"applies to numbers only (type is {p.type})"

    def _check_regex(self) -> Iterator[tuple[str, str]]:
        compiled: re.Pattern[str] | None = None
        if self.pattern is None:
            yield (
                "pattern",
                (
                    'format = "regex" needs a pattern with a named group per point, '
                    "e.g. 'T=(?P<temperature>-?[0-9.]+)'"
                ),
            )
        else:
            try:
                compiled = re.compile(self.pattern)
            except re.error as e:
                yield "pattern", f"not a valid regular expression: {e.msg} at position {e.pos}"
        for i, p in enumerate(self.points):
            for key in ("sentence", "field"):
                if getattr(p, key) is not None:
                    yield f"points[{i}].{key}", 'only for format = "nmea"'
            if compiled is not None and p.group_name not in compiled.groupindex:
                where = "group" if p.group is not None else "name"
                groups = ", ".join(compiled.groupindex) or "none"
                yield (
                    f"points[{i}].{where}",
                    (
                        f"the pattern has no group named {p.group_name!r} (it has: {groups}): "
                        f"add (?P<{p.group_name}>...) to the pattern or set group"
                    ),
                )

    def _check_nmea(self) -> Iterator[tuple[str, str]]:
        if self.pattern is not None:
            yield "pattern", 'only for format = "regex"'
        for i, p in enumerate(self.points):
            if p.group is not None:
                yield f"points[{i}].group", 'only for format = "regex"'
            if p.sentence is None:
                yield (
                    f"points[{i}].sentence",
                    ('missing: an NMEA point needs sentence (e.g. "GGA") and field'),
                )
            elif not _SENTENCE.fullmatch(p.sentence):
                yield (
                    f"points[{i}].sentence",
                    (
                        f"{p.sentence!r} is not a sentence type: three letters for any talker "
                        '("GGA"), or talker and type ("GPGGA"), in capitals'
                    ),
                )
            if p.field is None:
                yield f"points[{i}].field", "missing: the field number, 1 = first after the id"
            elif p.field < 1:
                yield (
                    f"points[{i}].field",
                    (f"{p.field} is below 1 (1 = the first field after the sentence id)"),
                )


# ---- sans-IO: bytes to lines --------------------------------------------------------------

EXCERPT = 60


@attrs.frozen
class Line:
    text: str


@attrs.frozen
class BadLine:
    """A line the parser could not hand on: too long, or not text in the configured
    encoding. ``raw`` is its start, for the log."""

    kind: Literal["overlong", "undecodable"]
    reason: str
    raw: bytes


class LineParser:
    """Bytes in (``receive_data``), lines out. A line ends at the terminator's last byte (LF
    for CRLF and LF, CR for CR); CR and LF around a line are dropped, so a CRLF setting
    also reads LF-only devices and a CR setting reads CRLF. Empty lines are skipped.

    A line longer than ``max_line_length`` bytes is discarded up to the next terminator and
    reported once; the buffer never holds more than that. Counters: ``lines`` (complete
    lines, good or bad), ``overlong``, ``undecodable``.
    """

    def __init__(
        self, terminator: str = "\r\n", max_line_length: int = 256, encoding: str = "ascii"
    ) -> None:
        self._end = terminator.encode("ascii")[-1:]
        self._max = max_line_length
        self._encoding = encoding
        self._buffer = bytearray()
        self._scanned = 0
        self._discarding = False
        self.lines = 0
        self.overlong = 0
        self.undecodable = 0

    def reset(self) -> None:
        """Forget a partial line (after a reconnect); counters stay."""
        self._buffer.clear()
        self._scanned = 0
        self._discarding = False

    def receive_data(self, data: bytes) -> list[Line | BadLine]:
        out: list[Line | BadLine] = []
        self._buffer += data
        while True:
            end = self._buffer.find(self._end, self._scanned)
            if end < 0:
                self._scanned = len(self._buffer)
                if len(self._buffer.strip(b"\r\n")) > self._max:
                    if not self._discarding:
                        out.append(self._too_long(bytes(self._buffer.lstrip(b"\r\n"))))
                    self._buffer.clear()
                    self._scanned = 0
                    self._discarding = True
                return out
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._scanned = 0
            if self._discarding:  # the tail of a line already reported as too long
                self._discarding = False
                continue
            content = raw.strip(b"\r\n")
            if not content:
                continue
            if len(content) > self._max:
                out.append(self._too_long(content))
                continue
            self.lines += 1
            try:
                out.append(Line(content.decode(self._encoding)))
            except UnicodeDecodeError:
                self.undecodable += 1
                reason = f"not {self._encoding} text"
                out.append(BadLine("undecodable", reason, content[:EXCERPT]))

    def _too_long(self, start: bytes) -> BadLine:
        self.lines += 1
        self.overlong += 1
        return BadLine("overlong", f"longer than {self._max} bytes", start[:EXCERPT])


# ---- sans-IO: a line to values ------------------------------------------------------------


@attrs.frozen
class PointValue:
    """The value of one point from one line, or why there is none (``reason``)."""

    point: LinePointConfig
    value: Value
    reason: str | None = None


@attrs.frozen
class Decoded:
    """What one line says. ``malformed`` or ``checksum_error`` (with the reason) when the
    line was rejected; otherwise ``values`` for the points it carries (maybe none)."""

    values: tuple[PointValue, ...] = ()
    malformed: str | None = None
    checksum_error: str | None = None
    checked: bool = False
    """NMEA: the sentence carried a checksum, and it matched."""

    @property
    def ok(self) -> bool:
        return self.malformed is None and self.checksum_error is None


_TRUE = frozenset({"1", "true", "on", "yes"})
_FALSE = frozenset({"0", "false", "off", "no"})


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """``text`` shortened and with control characters escaped, for logs and reasons."""
    short = text[:limit] + ("..." if len(text) > limit else "")
    return short.encode("unicode_escape").decode("ascii")


def convert(text: str, point: LinePointConfig) -> PointValue:
    """The text of one field as the point's type, with scale and offset applied."""
    raw = text.strip()
    if not raw:
        return PointValue(point, None, "no value")
    if point.type == "str":
        return PointValue(point, raw)
    if point.type == "bool":
        word = raw.lower()
        if word in _TRUE or word in _FALSE:
            return PointValue(point, word in _TRUE)
        return PointValue(point, None, f"not a bool: '{excerpt(raw, 20)}'")
    number: int | float
    try:
        number = int(raw, 10) if point.type == "int" else float(raw)
    except ValueError:
        what = "a whole number" if point.type == "int" else "a number"
        return PointValue(point, None, f"not {what}: '{excerpt(raw, 20)}'")
    if point.scale != 1.0 or point.offset != 0.0:
        number = number * point.scale + point.offset
    if isinstance(number, float) and not math.isfinite(number):
        return PointValue(point, None, f"not a finite number: '{excerpt(raw, 20)}'")
    return PointValue(point, number)


def decode_regex(line: str, pattern: re.Pattern[str], points: Sequence[LinePointConfig]) -> Decoded:
    """Search ``pattern`` in ``line``; each point's named group gives its value. A group
    that did not take part in the match (an optional part) gives no value."""
    match = pattern.search(line)
    if match is None:
        return Decoded(malformed="does not match the pattern")
    values = []
    for point in points:
        text = match.group(point.group_name)
        if text is not None:
            values.append(convert(text, point))
    return Decoded(tuple(values))


def nmea_checksum(body: str) -> int:
    """XOR of the characters between ``$`` (or ``!``) and ``*``."""
    checksum = 0
    for char in body:
        checksum ^= ord(char)
    return checksum & 0xFF


def sentence_matches(address: str, wanted: str) -> bool:
    """``GGA`` matches any talker (GPGGA, GNGGA, ...); anything else must match exactly.
    Proprietary sentences (``P...``) have no talker."""
    if address == wanted:
        return True
    return (
        len(wanted) == 3
        and len(address) == 5
        and not address.startswith("P")
        and address.endswith(wanted)
    )


def decode_nmea(
    line: str, points: Sequence[LinePointConfig], *, require_checksum: bool = False
) -> Decoded:
    """One NMEA 0183 sentence: ``$GPGGA,f1,f2,...*hh``. A checksum that is present must be
    right; a missing one is accepted unless ``require_checksum``."""
    if line[:1] not in ("$", "!"):
        return Decoded(malformed="not an NMEA sentence (no leading $ or !)")
    body, star, given = line[1:].partition("*")
    checked = False
    if star:
        if len(given) != 2 or not all(c in hexdigits for c in given):
            return Decoded(malformed=f"checksum '{excerpt(given, 8)}' is not two hex digits")
        actual = nmea_checksum(body)
        if int(given, 16) != actual:
            return Decoded(
                checksum_error=f"checksum {given.upper()}, but the sentence sums to {actual:02X}"
            )
        checked = True
    elif require_checksum:
        return Decoded(checksum_error="no checksum, though this device sent checksums before")
    fields = body.split(",")
    address = fields[0]
    if not _SENTENCE.fullmatch(address):
        return Decoded(malformed=f"'{excerpt(address, 12)}' is not a sentence id")
    values = []
    for point in points:
        if point.sentence is None or point.field is None:
            continue
        if not sentence_matches(address, point.sentence):
            continue
        if point.field >= len(fields):
            reason = f"{address} has no field {point.field} (it has {len(fields) - 1})"
            values.append(PointValue(point, None, reason))
        else:
            values.append(convert(fields[point.field], point))
    return Decoded(tuple(values), checked=checked)


class LineDecoder:
    """A line to values for one bus.

    NMEA checksum policy: a sentence with a wrong checksum is rejected. One without a
    checksum is accepted (older and simple talkers omit it) until the device has sent a
    valid one; from then on a missing checksum is rejected too, because a corrupted ``*``
    would otherwise pass a garbled last field off as data. ``reset()`` (a reconnect, maybe
    another device) forgets what was seen.
    """

    def __init__(self, config: SerialLineBusConfig) -> None:
        self.format = config.format
        self.points = config.points
        self.pattern = re.compile(config.pattern or "") if config.format == "regex" else None
        self.checksums_seen = False

    def reset(self) -> None:
        self.checksums_seen = False

    def decode(self, line: str) -> Decoded:
        if self.pattern is not None:
            return decode_regex(line, self.pattern, self.points)
        decoded = decode_nmea(line, self.points, require_checksum=self.checksums_seen)
        if decoded.checked:
            self.checksums_seen = True
        return decoded


def next_deadline(deadline: float, interval: float, now: float) -> tuple[float, int]:
    """The next tick after ``deadline`` on a fixed grid, skipping ticks already past ``now``;
    returns it with the number of ticks skipped."""
    deadline += interval
    if now <= deadline:
        return deadline, 0
    missed = int((now - deadline) // interval) + 1
    return deadline + missed * interval, missed


# ---- the Trio adapter ---------------------------------------------------------------------

State = Literal["starting", "up", "down"]


class SerialLineBus:
    """Reads lines from one port and publishes a reading per point per line.

    While the port is missing or the device is gone the points read bad ``disconnected``
    (published once per outage, with one warning), and the bus retries opening with
    exponential backoff until the device is back. Without a valid line for
    ``SILENCE_INTERVALS`` intervals, the points read bad ``timeout``.
    """

    def __init__(self, config: SerialLineBusConfig, context: BusContext) -> None:
        self.name: str = config.name
        self.config = config
        self.context = context
        self._settings = config.port_settings()
        self._parser = LineParser(config.terminator, config.max_line_length, config.encoding)
        self._decoder = LineDecoder(config)
        self._poll_data = (
            (config.poll + config.terminator).encode(config.encoding)
            if config.poll is not None
            else None
        )
        self._state: State = "starting"
        self._down_since = 0.0
        self._last_good = 0.0
        self._silent = False
        self._first_line = True
        self._healthy = False
        self._bad_log_at = -math.inf
        self._bad_unlogged = 0
        self.bytes_received = 0
        self.malformed = 0
        self.checksum_errors = 0
        self.unchecked = 0
        self.partial = 0
        self.conversion_errors = 0
        self.polls = 0
        self.poll_overruns = 0
        self.reconnects = 0
        self.open_failures = 0
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._state == "up"

    def _log_context(self, **more: object) -> dict[str, object]:
        return kv(bus=self.name, port=self.config.port, **more)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tick)
            await self._keep_open(task_status)

    async def _keep_open(self, task_status: trio.TaskStatus[None]) -> None:
        delay: float = self.config.reopen_initial
        started = False
        while True:
            try:
                port = await SerialPort.open(self._settings)
            except PortError as e:
                self.open_failures += 1
                self._down(e)
            else:
                async with port:
                    self._up()
                    if not started:
                        started = True
                        task_status.started()
                    error = await self._serve(port)
                self._down(error)
                if self._healthy:  # the device worked: start the backoff afresh
                    delay = self.config.reopen_initial
            if not started:
                started = True
                task_status.started()
            await trio.sleep(delay)
            delay = min(delay * 2, self.config.reopen_max)

    async def _serve(self, port: SerialPort) -> PortError:
        """Read (and poll) until the device is gone; returns why."""
        failures: list[PortError] = []
        async with trio.open_nursery() as nursery:

            async def until_gone(work: Callable[[SerialPort], Awaitable[None]]) -> None:
                try:
                    await work(port)
                except PortError as e:
                    failures.append(e)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(until_gone, self._read_lines)
            if self._poll_data is not None:
                nursery.start_soon(until_gone, self._poll)
        return failures[0]

    def _up(self) -> None:
        self._parser.reset()
        self._decoder.reset()
        self._first_line = True
        self._healthy = False
        self._silent = False
        self._last_good = trio.current_time()
        if self._state == "down":
            self.reconnects += 1
            down_for = self._last_good - self._down_since
            log.info("serial port is back", extra=self._log_context(down_for=f"{down_for:.1f}s"))
        else:
            log.info("serial port open", extra=self._log_context())
        self._state = "up"

    def _down(self, error: PortError) -> None:
        self.last_error = str(error)
        if self._state == "down":
            log.debug("serial port still unavailable", extra=self._log_context(error=error))
            return
        self._state = "down"
        self._down_since = trio.current_time()
        self._publish_bad("disconnected")
        log.warning(
            "serial port unavailable; its points read bad until it is back (retrying)",
            extra=self._log_context(error=error),
        )

    def _publish_bad(self, reason: str) -> None:
        for point in self.config.points:
            self.context.publish(Reading.bad(self.config.topic(point), reason, unit=point.unit))

    async def _tick(self) -> None:
        """Feed the stall detector every interval, connected or not, and notice silence."""
        interval = self.config.interval
        deadline = trio.current_time()
        while True:
            self.context.progress()
            now = trio.current_time()
            silent_for = now - self._last_good
            if self.connected and not self._silent and silent_for >= SILENCE_INTERVALS * interval:
                self._silent = True
                self._publish_bad("timeout")
                log.warning(
                    "no valid line from the sensor; its points read bad until it sends again",
                    extra=self._log_context(silent_for=f"{silent_for:.1f}s"),
                )
            deadline, _ = next_deadline(deadline, interval, now)
            await trio.sleep_until(deadline)

    async def _poll(self, port: SerialPort) -> None:
        assert self._poll_data is not None
        deadline = trio.current_time()
        while True:
            await port.send_all(self._poll_data)
            self.polls += 1
            deadline, missed = next_deadline(deadline, self.config.interval, trio.current_time())
            self.poll_overruns += missed
            await trio.sleep_until(deadline)

    async def _read_lines(self, port: SerialPort) -> None:
        while True:
            data = await port.receive_some()
            self.bytes_received += len(data)
            for event in self._parser.receive_data(data):
                self.context.progress()
                first, self._first_line = self._first_line, False
                if isinstance(event, BadLine):
                    if event.kind == "undecodable" and not first:
                        self.malformed += 1
                    text = event.raw.decode("latin-1")  # any bytes; excerpt() escapes them
                    self._bad_line(event.reason, text, first=first)
                else:
                    self._line(event.text, first=first)

    def _line(self, text: str, *, first: bool) -> None:
        decoded = self._decoder.decode(text)
        if not decoded.ok:
            if not first:  # a first line is counted as partial by _bad_line
                if decoded.malformed is not None:
                    self.malformed += 1
                else:
                    self.checksum_errors += 1
            self._bad_line(decoded.malformed or decoded.checksum_error or "", text, first=first)
            return
        self._last_good = trio.current_time()
        self._healthy = True
        if self._silent:
            self._silent = False
            log.info("the sensor sends again", extra=self._log_context())
        if self.config.format == "nmea" and not decoded.checked:
            self.unchecked += 1
        for pv in decoded.values:
            topic = self.config.topic(pv.point)
            if pv.reason is None:
                self.context.publish(Reading(topic, pv.value, unit=pv.point.unit))
            else:
                self.conversion_errors += 1
                self.context.publish(Reading.bad(topic, pv.reason, unit=pv.point.unit))
                self._bad_line(f"{pv.point.name}: {pv.reason}", text, first=False)

    def _bad_line(self, reason: str, text: str, *, first: bool) -> None:
        if first:
            # The port was opened mid-line: the first fragment is expected to be junk.
            self.partial += 1
            log.debug("partial first line dropped", extra=self._log_context(line=excerpt(text)))
            return
        self._bad_unlogged += 1
        now = trio.current_time()
        if now < self._bad_log_at + BAD_LINE_LOG_INTERVAL:
            return
        log.warning(
            "bad line from the sensor",
            extra=self._log_context(reason=reason, line=excerpt(text), count=self._bad_unlogged),
        )
        self._bad_log_at = now
        self._bad_unlogged = 0

    async def write(self, target: str, value: Value) -> None:
        await trio.lowlevel.checkpoint()
        raise WriteError(
            f"{self.name}/{target} is on a serial-line bus; line sensors are read-only"
        )

    def condition(self) -> Condition:
        return UP  # refined by the components issue's driver work

    def statistics(self) -> Mapping[str, object]:
        return {
            "connected": self.connected,
            "bytes_received": self.bytes_received,
            "lines": self._parser.lines,
            "malformed": self.malformed,
            "overlong": self._parser.overlong,
            "checksum_errors": self.checksum_errors,
            "unchecked": self.unchecked,
            "partial": self.partial,
            "conversion_errors": self.conversion_errors,
            "polls": self.polls,
            "poll_overruns": self.poll_overruns,
            "reconnects": self.reconnects,
            "open_failures": self.open_failures,
            "last_error": self.last_error,
        }
