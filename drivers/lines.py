"""``kind = "serial-line"``: sensors that send text lines on a serial port (NMEA 0183 GPS,
weather and gas sensors, scales, anything "one reading per line").

Three layers:

- the config (``SerialLineBusConfig``, ``LinePointConfig``) with ``check()``;
- sans-IO: ``LineParser`` (bytes in, lines out), ``decode_regex`` / ``decode_nmea`` (a line
  to values per point), ``LineDecoder`` (the per-bus policy) and ``SentenceWatch`` (NMEA
  sentence types that stopped coming), all plain functions and small state machines,
  tested without ports or clocks;
- ``SerialLineBus``: the thin Trio adapter that owns the port (``drivers.serialio``), the
  poll and progress schedules, the silence deadline, reopening with backoff and logging.

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

Depends on ``drivers.base``, ``drivers.serialio`` and the gateway's lower layer
(``gateway.core``: readings, config value types, logging, the component model, backoff).
"""

from __future__ import annotations

import codecs
import difflib
import errno
import logging
import math
import random
import re
import re._constants as re_constants
import re._parser as re_parser
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from string import hexdigits
from types import FrameType
from typing import Literal, NoReturn, Protocol

import attrs
import trio

from drivers.base import BusContext, WriteError, unknown_point
from drivers.serialio import DeviceGone, PortError, PortSettings, SerialPort, SerialPortConfig
from gateway.core.backoff import Backoff
from gateway.core.component import UP, Condition, State
from gateway.core.configtypes import Duration, Name, duplicate_names, format_duration
from gateway.core.logs import kv
from gateway.core.reading import Reading, Value

log = logging.getLogger("drivers.lines")

LineFormat = Literal["regex", "nmea"]
PointType = Literal["float", "int", "str", "bool"]
Axis = Literal["latitude", "longitude"]

TERMINATORS = ("\r\n", "\n", "\r")
MAX_LINE_LENGTH = 65536
MATCH_TIME_LIMIT = 0.02
"""Longest a pattern may search one line (a sane one takes microseconds): the match runs in
the event loop, which must never stall for long."""
READ_SIZE = 1024
"""Bytes per read: at most a few hundred lines, published before subscribers get a turn, so
a burst (a buffer full after a stall) fits in a subscriber's queue. Plenty for any baud rate."""
SILENCE_INTERVALS = 3
"""The silence window is this many intervals: without a valid line for that long, the points
read bad ``timeout``; without an NMEA sentence type a point needs (while others come), that
point reads bad ``no GGA sentence received``."""
BAD_LINE_LOG_INTERVAL = 60.0
"""At most one warning about bad lines per bus in this many seconds (with a count)."""
POSITION_DECIMALS = 7
"""Latitudes and longitudes are rounded to this many decimals of a degree (about 1 cm)."""

_SENTENCE = re.compile(r"[A-Z][A-Z0-9]{2,9}")
_PROBE = "\r\n$*,.-+0123456789AZaz=:; "

# ---- NMEA 0183 names ----------------------------------------------------------------------

SENTENCE_TYPES: tuple[str, ...] = (
    # The common ones first: a "did you mean" hint prefers them among equally close matches.
    "GGA", "RMC", "GLL", "VTG", "GSA", "GSV", "ZDA", "GNS", "GST", "HDT", "HDG", "HDM",
    "MWV", "MWD", "MTW", "DBT", "DPT", "VHW", "XDR", "ROT", "VBW", "TXT", "THS", "MDA",
    "GBS", "GRS", "DTM", "RMB", "APB", "BOD", "BWC", "XTE", "WPL", "RTE", "VLW", "VWR",
    "VWT", "DBK", "DBS", "VDM", "VDO", "ALR", "RSA", "RPM", "HSC", "MTA", "MHU", "MMB",
    # The rest of NMEA 0183 (4.11 and older), alphabetically.
    "AAM", "ABK", "ABM", "ACA", "ACK", "ACN", "ACS", "AIR", "AKD", "ALA", "ALC", "ALF",
    "ALM", "ARC", "BBM", "BEC", "BWR", "BWW", "CUR", "DDC", "DOR", "DSC", "DSE", "DSI",
    "DSR", "EPV", "ETL", "EVE", "FIR", "FSI", "GEN", "GFA", "GLC", "GTD", "GXA", "HBT",
    "HCR", "HMR", "HMS", "HRM", "HSS", "HTC", "HTD", "LCD", "LR1", "LR2", "LR3", "LRF",
    "LRI", "MLA", "MOB", "MSK", "MSS", "NAK", "NRM", "NRX", "NSR", "OSD", "POS", "PRC",
    "RLM", "RMA", "ROR", "RRT", "RSD", "SFI", "SSD", "STN", "TLB", "TLL", "TRC", "TRD",
    "TRF", "TRL", "TTD", "TTM", "TUT", "UID", "VDR", "VER", "VPW", "VSD", "WAT", "WCV",
    "WNC", "XTR", "ZDL", "ZFO", "ZTG",
)  # fmt: skip
"""Known NMEA 0183 sentence types (the formatter after the talker id)."""

TALKERS: tuple[str, ...] = (
    # Satellite navigation first, then instruments; the order ranks "did you mean" hints.
    "GP", "GN", "GL", "GA", "GB", "BD", "GQ", "GI", "QZ",
    "II", "IN", "WI", "HC", "HE", "HN", "SD", "YX", "AG", "AP", "AI", "EC", "VW", "VD",
    "VM", "TI", "RA", "EI", "ER", "SN", "LC", "ZA", "ZC", "ZQ", "ZV", "CD", "CS", "CT",
    "CV", "CX", "DE", "DF", "EP", "FD", "FE", "FR", "FS", "HD", "HF", "HS", "NL", "NV",
    "RB", "RC", "RI", "SG", "SS", "TC", "UP", "VA", "VR", "VS", "WD", "WL", "YC", "YD",
    "YF", "YL", "YP", "YR", "YT", "YV", "AB", "AD", "AN", "AR", "AS", "AT", "AU", "BI",
    "BN", "CA", "CR", "DU", "JA", "JB", "JC", "JD", "JE", "JF", "JG", "JH",
)  # fmt: skip
"""Known NMEA 0183 talker ids (the two letters before the sentence type)."""

_TYPE_SET = frozenset(SENTENCE_TYPES)
_TALKER_SET = frozenset(TALKERS)

POSITION_FIELDS: Mapping[str, Mapping[int, tuple[Axis, int]]] = {
    "GGA": {2: ("latitude", 3), 4: ("longitude", 5)},
    "RMC": {3: ("latitude", 4), 5: ("longitude", 6)},
    "GLL": {1: ("latitude", 2), 3: ("longitude", 4)},
    "GNS": {2: ("latitude", 3), 4: ("longitude", 5)},
}
"""Sentence type -> {field: (axis, its hemisphere field)} for the position fields that are
published as signed decimal degrees."""


def close_matches(word: str, candidates: Sequence[str], n: int = 2) -> list[str]:
    """Up to ``n`` candidates like ``word`` (difflib ratio 0.6 or more), closest first; ties
    go to the candidate listed first (the more common one)."""
    scored: list[tuple[float, int, str]] = []
    for rank, candidate in enumerate(candidates):
        matcher = difflib.SequenceMatcher(None, word, candidate)
        if matcher.real_quick_ratio() >= 0.6 and matcher.quick_ratio() >= 0.6:
            ratio = matcher.ratio()
            if ratio >= 0.6:
                scored.append((-ratio, rank, candidate))
    return [candidate for _, _, candidate in sorted(scored)[:n]]


def _did_you_mean(guesses: Sequence[str]) -> str:
    if not guesses:
        return ""
    return f" (did you mean {' or '.join(repr(g) for g in guesses)}?)"


def sentence_problem(sentence: str) -> str | None:
    """Why ``sentence`` (a point's ``sentence`` key) names no NMEA 0183 sentence, with a
    hint for a mistype; ``None`` when it is fine: a known type (``GGA``), a known talker and
    type (``GPGGA``), or a proprietary id (``P...``, taken as given)."""
    if sentence[:1] in ("$", "!") and sentence_problem(sentence[1:]) is None:
        return f"{sentence!r}: write the sentence id without the leading {sentence[0]!r}"
    if not _SENTENCE.fullmatch(sentence):
        upper = sentence.upper()
        fixed = upper != sentence and sentence_problem(upper) is None  # recurse only on a change
        hint = _did_you_mean([upper]) if fixed else ""
        return (
            f"{sentence!r} is not a sentence type{hint}: three letters for any talker "
            '("GGA"), or talker and type ("GPGGA"), in capitals'
        )
    if sentence.startswith("P") or sentence in _TYPE_SET:
        return None
    talker, kind = sentence[:2], sentence[2:]
    if len(sentence) == 5:
        if talker in _TALKER_SET and kind in _TYPE_SET:
            return None
        if kind in _TYPE_SET:
            hint = _did_you_mean(close_matches(sentence, [t + kind for t in TALKERS]))
            return f"{sentence!r}: {talker!r} is not a known NMEA talker id{hint}"
        if talker in _TALKER_SET:
            hint = _did_you_mean(close_matches(sentence, [talker + k for k in SENTENCE_TYPES]))
            return f"{sentence!r}: {kind!r} is not a known NMEA 0183 sentence type{hint}"
    candidates = list(SENTENCE_TYPES)
    if len(sentence) >= 4:
        candidates += [t + k for t in TALKERS[:9] for k in SENTENCE_TYPES]
    hint = _did_you_mean(close_matches(sentence, candidates))
    return (
        f"{sentence!r} is not a known NMEA 0183 sentence type{hint}: write the type "
        '("GGA", any talker) or talker and type ("GPGGA"); proprietary ids start with P'
    )


def sentence_type(sentence: str) -> str | None:
    """The type in a point's ``sentence`` (``GGA`` for ``GGA`` and ``GPGGA``); ``None`` for
    proprietary ids."""
    if sentence.startswith("P") or len(sentence) not in (3, 5):
        return None
    return sentence[-3:]


def position_field(point: LinePointConfig) -> tuple[Axis, int] | None:
    """``(axis, hemisphere field)`` when the point reads a latitude or longitude field."""
    if point.sentence is None or point.field is None:
        return None
    kind = sentence_type(point.sentence)
    if kind is None:
        return None
    return POSITION_FIELDS.get(kind, {}).get(point.field)


# ---- config -------------------------------------------------------------------------------


@attrs.frozen
class LinePointConfig:
    name: Name
    group: str | None = None
    """Regex format: the named group holding the value (default: the point's name)."""
    sentence: str | None = None
    """NMEA format: the sentence type, ``"GGA"`` (any talker) or ``"GPGGA"`` (that talker);
    proprietary ids (``"PGRME"``) as the device sends them."""
    field: int | None = None
    """NMEA format: the field number; 1 is the first field after the sentence id."""
    type: PointType = "float"
    """For a latitude or longitude field (see ``POSITION_FIELDS``) ``float`` means signed
    decimal degrees; ``str`` gives the raw ``ddmm.mmmm`` text."""
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
    """Ends the poll string only. Received lines end in CR, LF or CRLF whatever it is."""
    encoding: str = "ascii"
    max_line_length: int = 256
    poll: str | None = None
    """Written (plus terminator) every interval, for sensors that answer on request."""
    interval: Duration = Duration(1.0)
    """Poll period; without ``poll``, the longest expected gap between lines."""
    reopen_initial: Duration = Duration(1.0)
    reopen_max: Duration = Duration(5.0)
    """Backoff between attempts to open the port while it is missing (``Backoff``: the
    ceiling doubles from ``reopen_initial`` up to ``reopen_max``, each delay jittered)."""
    points: tuple[LinePointConfig, ...] = ()

    def topic(self, point: LinePointConfig) -> str:
        return f"{self.name}/{self.device}/{point.name}"

    def topics(self) -> Iterator[str]:
        for p in self.points:
            yield self.topic(p)

    def point(self, target: str) -> LinePointConfig:
        """The point ``target`` (``device/point``) names; raises ``UnknownPoint``."""
        device, _, name = target.partition("/")
        for p in self.points:
            if device == self.device and p.name == name:
                return p
        known = (f"{self.device}/{p.name}" for p in self.points)
        raise unknown_point(self.name, target, known)

    def check_write(self, target: str, value: Value) -> NoReturn:
        """Refuses every write: ``UnknownPoint`` for a point that does not exist,
        ``WriteError`` for one that does (line sensors only send)."""
        self.point(target)
        raise WriteError(
            f"{self.name}/{target} is on a serial-line bus; line sensors are read-only"
        )

    def silence_window(self) -> float:
        """Seconds without a valid line (or a needed NMEA sentence) before points read bad."""
        return SILENCE_INTERVALS * self.interval

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
            else:
                risk = backtracking_risk(self.pattern)
                if risk is not None:
                    compiled = None
                    yield "pattern", risk
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
            sentence_ok = False
            if p.sentence is None:
                yield (
                    f"points[{i}].sentence",
                    ('missing: an NMEA point needs sentence (e.g. "GGA") and field'),
                )
            elif (problem := sentence_problem(p.sentence)) is not None:
                yield f"points[{i}].sentence", problem
            else:
                sentence_ok = True
            if p.field is None:
                yield f"points[{i}].field", "missing: the field number, 1 = first after the id"
            elif p.field < 1:
                yield (
                    f"points[{i}].field",
                    (f"{p.field} is below 1 (1 = the first field after the sentence id)"),
                )
            position = position_field(p) if sentence_ok else None
            if position is not None and p.type in ("int", "bool"):
                yield (
                    f"points[{i}].type",
                    (
                        f"{p.sentence} field {p.field} is a {position[0]}: leave type out "
                        '(signed decimal degrees) or use "str" for the raw ddmm.mmmm text'
                    ),
                )


def backtracking_risk(pattern: str) -> str | None:
    """Why ``pattern`` may take exponential time on a line (a variable repeat nested in
    another, ``(a+)+``, ``(\\d*,?)*``), or None. The match runs on the event loop, so one bad
    line would freeze the whole gateway: refuse such patterns in check-config."""
    try:
        tree = re_parser.parse(pattern)
    except re.error:
        return None  # reported as invalid elsewhere
    found = _nested_repeat(tree, inside=False)
    if found is None:
        return None
    return (
        f"{found} can take exponential time on a bad line and freeze the gateway: repeat each "
        "part once and keep alternatives apart, e.g. '(?P<v>[0-9.]+)' instead of "
        "'(?P<v>([0-9]+.?)+)'"
    )


_REPEATS = (re_constants.MAX_REPEAT, re_constants.MIN_REPEAT)


def _nested_repeat(items: object, *, inside: bool) -> str | None:
    """Walk sre's parse tree; an inner variable repeat under an outer one is the risk."""
    if isinstance(items, re_parser.SubPattern):
        items = list(items)
    if not isinstance(items, list | tuple):
        return None
    for item in items:
        if isinstance(item, tuple) and len(item) == 2 and item[0] in _REPEATS:
            low, high, body = item[1]
            variable = high != low and high != 1
            if variable and inside:
                return "a '*', '+' or '{m,n}' inside a repeated group"
            found = _nested_repeat(body, inside=inside or variable)
        elif isinstance(item, tuple) and len(item) == 2 and item[0] == re_constants.BRANCH:
            alternatives = item[1][1]
            if inside and not _distinct_by_first_character(alternatives):
                return "alternatives that can match the same text inside a repeated group"
            found = _nested_repeat(alternatives, inside=inside)
        elif isinstance(item, re_parser.SubPattern | list | tuple):
            found = _nested_repeat(item, inside=inside)
        else:
            continue
        if found is not None:
            return found
    return None


def _distinct_by_first_character(alternatives: list[object]) -> bool:
    """True when every alternative starts with its own literal character, so a repeat of
    them can take only one path through a line (``(?:ab|cd)+``, not ``(?:a|aa)+``)."""
    firsts = []
    for alternative in alternatives:
        items = list(alternative) if isinstance(alternative, re_parser.SubPattern | list) else []
        if not items or items[0][0] != re_constants.LITERAL:
            return False
        firsts.append(items[0][1])
    return len(set(firsts)) == len(firsts)


# ---- sans-IO: bytes to lines --------------------------------------------------------------

EXCERPT = 60
_LINE_END = re.compile(rb"[\r\n]")


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
    """Bytes in (``receive_data``), lines out. A line ends at CR, at LF, or at CRLF, whatever
    the bus's ``terminator`` (that only ends the poll string): sensors differ, and a line is
    handed on as soon as its first end byte is in, without waiting for what follows. The LF
    of a CRLF (also one that arrives in a later chunk) then ends an empty line, and empty
    lines are skipped.

    A line longer than ``max_line_length`` bytes is discarded up to the next CR or LF and
    reported once; the buffer never holds more than that. Counters: ``lines`` (complete
    lines, good or bad), ``overlong``, ``undecodable``.
    """

    def __init__(self, max_line_length: int = 256, encoding: str = "ascii") -> None:
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
        buffer = self._buffer
        buffer += data
        start = 0
        # The bytes before _scanned were searched by an earlier call and hold no line end.
        while (end := _LINE_END.search(buffer, max(start, self._scanned))) is not None:
            content = bytes(buffer[start : end.start()])
            start = end.end()
            if self._discarding:  # the tail of a line already reported as too long
                self._discarding = False
                continue
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
        del buffer[:start]
        self._scanned = len(buffer)
        if len(buffer) > self._max:
            if not self._discarding:
                out.append(self._too_long(bytes(buffer)))
            buffer.clear()
            self._scanned = 0
            self._discarding = True
        return out

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
    sentence: str | None = None
    """NMEA: the sentence id of an accepted sentence (``GPGGA``)."""

    @property
    def ok(self) -> bool:
        return self.malformed is None and self.checksum_error is None


_TRUE = frozenset({"1", "true", "on", "yes"})
_FALSE = frozenset({"0", "false", "off", "no"})


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """``text`` shortened and with control characters escaped, for logs and reasons."""
    short = text[:limit] + ("..." if len(text) > limit else "")
    return short.encode("unicode_escape").decode("ascii")


def _scaled(number: int | float, point: LinePointConfig) -> int | float:
    if point.scale != 1.0 or point.offset != 0.0:
        return number * point.scale + point.offset
    return number


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
    number = _scaled(number, point)
    if isinstance(number, float) and not math.isfinite(number):
        return PointValue(point, None, f"not a finite number: '{excerpt(raw, 20)}'")
    return PointValue(point, number)


_DDMM = re.compile(r"([0-9]{1,3})([0-5][0-9](?:\.[0-9]*)?)")
_HEMISPHERES: Mapping[Axis, Mapping[str, int]] = {
    "latitude": {"N": 1, "S": -1},
    "longitude": {"E": 1, "W": -1},
}
_LIMITS: Mapping[Axis, int] = {"latitude": 90, "longitude": 180}


def convert_position(text: str, hemisphere: str, point: LinePointConfig, axis: Axis) -> PointValue:
    """An NMEA ``ddmm.mmmm`` (latitude) or ``dddmm.mmmm`` (longitude) field and its
    hemisphere (N/S, E/W) as signed decimal degrees (S and W negative), rounded to
    ``POSITION_DECIMALS``; then scale and offset. An empty field (no fix) gives ``no fix``."""
    raw = text.strip()
    if not raw:
        return PointValue(point, None, "no fix")
    match = _DDMM.fullmatch(raw)
    if match is None:
        width = "dd" if axis == "latitude" else "ddd"
        return PointValue(point, None, f"not a {axis} ({width}mm.mmmm): '{excerpt(raw, 20)}'")
    degrees = int(match[1]) + float(match[2]) / 60
    if degrees > _LIMITS[axis]:
        return PointValue(
            point, None, f"not a {axis}: '{excerpt(raw, 20)}' is beyond {_LIMITS[axis]} degrees"
        )
    signs = _HEMISPHERES[axis]
    sign = signs.get(hemisphere.strip().upper())
    if sign is None:
        wanted = " or ".join(signs)
        return PointValue(
            point, None, f"{axis} hemisphere '{excerpt(hemisphere, 8)}' is not {wanted}"
        )
    return PointValue(point, _scaled(round(sign * degrees, POSITION_DECIMALS), point))


Search = Callable[[re.Pattern[str], str], "re.Match[str] | None"]


def plain_search(pattern: re.Pattern[str], line: str) -> re.Match[str] | None:
    return pattern.search(line)


class PatternTooSlow(Exception):
    """A pattern's search on one line went over its time limit."""


def _too_slow(signum: int, frame: FrameType | None) -> None:
    raise PatternTooSlow


def search_within(limit: float) -> Search:
    """A search that gives up after ``limit`` seconds, so that no pattern on no line can
    freeze the event loop (the static ``backtracking_risk`` check catches the common shapes,
    not every one: ``(a?a?)+$``, ``(.*,){12}x``). CPython's regex engine checks for signals
    as it runs, so a SIGALRM handler that raises ends a runaway search. Main thread only (a
    plain search elsewhere); the previous SIGALRM handler is put back after each line."""

    def search(pattern: re.Pattern[str], line: str) -> re.Match[str] | None:
        if threading.current_thread() is not threading.main_thread():
            return pattern.search(line)
        previous = signal.signal(signal.SIGALRM, _too_slow)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            return pattern.search(line)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return search


def decode_regex(
    line: str,
    pattern: re.Pattern[str],
    points: Sequence[LinePointConfig],
    search: Search = plain_search,
) -> Decoded:
    """Search ``pattern`` in ``line``; each point's named group gives its value. A group
    that did not take part in the match (an optional part) gives no value."""
    try:
        match = search(pattern, line)
    except PatternTooSlow:
        return Decoded(malformed="the pattern took too long on this line (rewrite the pattern)")
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
    right; a missing one is accepted unless ``require_checksum``. Latitude and longitude
    fields (``POSITION_FIELDS``) of ``float`` points become signed decimal degrees."""
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
            continue
        position = position_field(point) if point.type == "float" else None
        if position is None:
            values.append(convert(fields[point.field], point))
            continue
        axis, hemisphere = position
        if hemisphere >= len(fields):
            reason = f"{address} has no field {hemisphere} (the {axis}'s hemisphere)"
            values.append(PointValue(point, None, reason))
        else:
            values.append(convert_position(fields[point.field], fields[hemisphere], point, axis))
    return Decoded(tuple(values), checked=checked, sentence=address)


class LineDecoder:
    """A line to values for one bus.

    NMEA checksum policy: a sentence with a wrong checksum is rejected. One without a
    checksum is accepted (older and simple talkers omit it) until the device has sent a
    valid one; from then on a missing checksum is rejected too, because a corrupted ``*``
    would otherwise pass a garbled last field off as data. ``reset()`` (a reconnect, maybe
    another device) forgets what was seen.
    """

    def __init__(self, config: SerialLineBusConfig, search: Search = plain_search) -> None:
        self.search = search
        self.format = config.format
        self.points = config.points
        self.pattern = re.compile(config.pattern or "") if config.format == "regex" else None
        self.checksums_seen = False

    def reset(self) -> None:
        self.checksums_seen = False

    def decode(self, line: str) -> Decoded:
        if self.pattern is not None:
            return decode_regex(line, self.pattern, self.points, self.search)
        decoded = decode_nmea(line, self.points, require_checksum=self.checksums_seen)
        if decoded.checked:
            self.checksums_seen = True
        return decoded


class SentenceWatch:
    """NMEA: notices a sentence type that points need but the device stopped sending (or
    never sent), while it sends others. Times are plain numbers (seconds) from the caller.

    ``sentence(address, now)`` for each accepted sentence; ``overdue(now)`` returns the
    wanted sentences (as the points name them) not seen for ``window`` seconds, each once
    until it comes again. ``seen`` lists the sentence ids received since the last reset (at
    most ``MAX_SEEN``), for the warning.
    """

    MAX_SEEN = 24

    def __init__(self, points: Sequence[LinePointConfig], window: float, now: float) -> None:
        self.window = window
        wanted: dict[str, list[LinePointConfig]] = {}
        for point in points:
            if point.sentence is not None:
                wanted.setdefault(point.sentence, []).append(point)
        self.wanted: Mapping[str, tuple[LinePointConfig, ...]] = {
            s: tuple(ps) for s, ps in wanted.items()
        }
        self._last: dict[str, float] = {}
        self.missing: dict[str, None] = {}
        """The wanted sentences reported overdue and not seen since, in report order."""
        self.seen: dict[str, None] = {}
        self.reset(now)

    def reset(self, now: float) -> None:
        """Start afresh (the port was opened): every sentence has ``window`` from ``now``."""
        self._last = dict.fromkeys(self.wanted, now)
        self.missing.clear()
        self.seen.clear()

    def sentence(self, address: str, now: float) -> list[str]:
        """Note a sentence; returns the wanted sentences it brings back (were overdue)."""
        if address not in self.seen and len(self.seen) < self.MAX_SEEN:
            self.seen[address] = None
        back = []
        for wanted in self._last:
            if sentence_matches(address, wanted):
                self._last[wanted] = now
                if wanted in self.missing:
                    del self.missing[wanted]
                    back.append(wanted)
        return back

    def overdue(self, now: float) -> list[str]:
        """The wanted sentences whose window ended by ``now``, each reported once."""
        out = [
            s
            for s, last in self._last.items()
            if s not in self.missing and now >= last + self.window
        ]
        self.missing.update(dict.fromkeys(out))
        return out

    def next_due(self) -> float:
        """When the next wanted sentence that is not missing becomes overdue (inf: none)."""
        return min(
            (last + self.window for s, last in self._last.items() if s not in self.missing),
            default=math.inf,
        )


def next_deadline(deadline: float, interval: float, now: float) -> tuple[float, int]:
    """The next tick after ``deadline`` on a fixed grid, skipping ticks already past ``now``;
    returns it with the number of ticks skipped."""
    deadline += interval
    if now <= deadline:
        return deadline, 0
    missed = int((now - deadline) // interval) + 1
    return deadline + missed * interval, missed


# ---- the Trio adapter ---------------------------------------------------------------------


class LinePort(Protocol):
    """What the bus needs of an open port: ``drivers.serialio.SerialPort`` (or a test's
    stand-in). Reads and writes raise ``PortError`` (``DeviceGone``) when the device is gone."""

    async def receive_some(self, max_bytes: int = ...) -> bytes: ...

    async def send_all(self, data: bytes) -> None: ...

    async def aclose(self) -> None: ...


PortOpener = Callable[[PortSettings], Awaitable[LinePort]]

_PORT_PROBLEMS: Mapping[int, str] = {
    errno.ENOENT: "missing",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EBUSY: "busy",
    errno.EAGAIN: "in use by another process",
    errno.ENXIO: "not ready",
    errno.ENODEV: "device gone",
}


def port_problem(port: str, error: PortError) -> str:
    """A short reason naming the port, for ``condition()`` and the STATUS line (the log has
    the whole message with what to do): ``/dev/ttyUSB9 missing``."""
    if isinstance(error, DeviceGone):
        return f"{port} device gone"
    what = _PORT_PROBLEMS.get(error.errno) if error.errno is not None else None
    return f"{port} {what or 'unusable'}"


@attrs.frozen
class SerialLineStatistics:
    connected: bool
    bytes_received: int
    lines: int
    """Complete lines, good or bad (``LineParser.lines``)."""
    malformed: int
    overlong: int
    checksum_errors: int
    unchecked: int
    """NMEA sentences accepted without a checksum."""
    partial: int
    """Bad first lines after opening the port (cut off), dropped without a warning."""
    conversion_errors: int
    polls: int
    poll_overruns: int
    reconnects: int
    open_failures: int
    last_error: str | None


class SerialLineBus:
    """Reads lines from one port and publishes a reading per point per line.

    While the port is missing or the device is gone the points read bad ``disconnected``
    (published once per outage, with one warning), and the bus retries opening with
    ``Backoff(reopen_initial, reopen_max)`` until the device is back. Without a valid line
    for the silence window (``SILENCE_INTERVALS`` intervals after the last one) the points
    read bad ``timeout``; an NMEA sentence type that stops coming while others come reads
    bad ``no GGA sentence received`` on its points (``SentenceWatch``).

    ``condition()``: starting until the first open attempt ends; down with the port's
    problem; degraded while silent or a sentence type is missing; up otherwise.
    """

    def __init__(
        self,
        config: SerialLineBusConfig,
        context: BusContext,
        *,
        open_port: PortOpener = SerialPort.open,
        rng: random.Random | None = None,
    ) -> None:
        self.name: str = config.name
        self.config = config
        self.context = context
        self._open_port = open_port
        self._rng = rng or random.Random()
        self._backoff = Backoff(config.reopen_initial, config.reopen_max)
        self._settings = config.port_settings()
        self._window = config.silence_window()
        self._parser = LineParser(config.max_line_length, config.encoding)
        self._decoder = LineDecoder(config, search_within(MATCH_TIME_LIMIT))
        self._watch = (
            SentenceWatch(config.points, self._window, 0.0) if config.format == "nmea" else None
        )
        self._poll_data = (
            (config.poll + config.terminator).encode(config.encoding)
            if config.poll is not None
            else None
        )
        self._state = State.STARTING
        self._down_reason: str | None = None
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
        return self._state is State.UP

    def _log_context(self, **more: object) -> dict[str, object]:
        return kv(bus=self.name, port=self.config.port, **more)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tick)
            await self._keep_open(task_status)

    async def _keep_open(self, task_status: trio.TaskStatus[None]) -> None:
        failures = 0
        started = False
        while True:
            try:
                port = await self._open_port(self._settings)
            except PortError as e:
                self.open_failures += 1
                failures += 1
                self._down(e)
            else:
                try:
                    self._up()
                    if not started:
                        started = True
                        task_status.started()
                    error = await self._serve(port)
                finally:
                    await port.aclose()
                self._down(error)
                # A device that sent valid lines starts the backoff afresh.
                failures = 1 if self._healthy else failures + 1
            if not started:
                started = True
                task_status.started()
            await trio.sleep(self._backoff.delay(failures, self._rng))

    async def _serve(self, port: LinePort) -> PortError:
        """Read (and poll) until the device is gone; returns why."""
        failures: list[PortError] = []
        async with trio.open_nursery() as nursery:

            async def until_gone(work: Callable[[LinePort], Awaitable[None]]) -> None:
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
        if self._watch is not None:
            self._watch.reset(self._last_good)
        if self._state is State.DOWN:
            self.reconnects += 1
            down_for = self._last_good - self._down_since
            log.info("serial port is back", extra=self._log_context(down_for=f"{down_for:.1f}s"))
        else:
            log.info("serial port open", extra=self._log_context())
        self._state = State.UP

    def _down(self, error: PortError) -> None:
        self.last_error = str(error)
        self._down_reason = port_problem(self.config.port, error)
        if self._state is State.DOWN:
            log.debug("serial port still unavailable", extra=self._log_context(error=error))
            return
        self._state = State.DOWN
        self._down_since = trio.current_time()
        self._publish_bad("disconnected")
        log.warning(
            "serial port unavailable; its points read bad until it is back (retrying)",
            extra=self._log_context(error=error),
        )

    def _publish_bad(self, reason: str, points: Sequence[LinePointConfig] | None = None) -> None:
        for point in self.config.points if points is None else points:
            self.context.publish(Reading.bad(self.config.topic(point), reason, unit=point.unit))

    async def _tick(self) -> None:
        """Feed the stall detector every interval, connected or not, and end silences when
        their window ends (not at the next tick: that would make 3 intervals nearly 4)."""
        interval = self.config.interval
        progress_at = trio.current_time()
        while True:
            now = trio.current_time()
            if now >= progress_at:
                self.context.progress()
                progress_at, _ = next_deadline(progress_at, interval, now)
            await trio.sleep_until(min(progress_at, self._check_silence(now)))

    def _check_silence(self, now: float) -> float:
        """Publish ``timeout`` (no valid line) or ``no ... sentence received`` for a window
        that ended by ``now``; returns when the next window ends."""
        if self._state is not State.UP or self._silent:
            return math.inf
        due = self._last_good + self._window
        if now >= due:
            self._silent = True
            self._publish_bad("timeout")
            log.warning(
                "no valid line from the sensor; its points read bad until it sends again",
                extra=self._log_context(silent_for=f"{now - self._last_good:.1f}s"),
            )
            return math.inf
        if self._watch is None:
            return due
        overdue = self._watch.overdue(now)
        if overdue:
            for sentence in overdue:
                self._publish_bad(f"no {sentence} sentence received", self._watch.wanted[sentence])
            log.warning(
                "no NMEA sentence of a type the points need; they read bad until it comes",
                extra=self._log_context(
                    missing=",".join(overdue),
                    window=format_duration(self._window),
                    seen=",".join(self._watch.seen) or "none",
                ),
            )
        return min(due, self._watch.next_due())

    async def _poll(self, port: LinePort) -> None:
        assert self._poll_data is not None
        deadline = trio.current_time()
        while True:
            await port.send_all(self._poll_data)
            self.polls += 1
            deadline, missed = next_deadline(deadline, self.config.interval, trio.current_time())
            self.poll_overruns += missed
            await trio.sleep_until(deadline)

    async def _read_lines(self, port: LinePort) -> None:
        while True:
            data = await port.receive_some(READ_SIZE)
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
        now = trio.current_time()
        self._last_good = now
        self._healthy = True
        if self._silent:
            self._silent = False
            if self._watch is not None:  # every sentence type gets a whole window again
                self._watch.reset(now)
            log.info("the sensor sends again", extra=self._log_context())
        if self._watch is not None and decoded.sentence is not None:
            back = self._watch.sentence(decoded.sentence, now)
            if back:
                log.info(
                    "NMEA sentence arrives again", extra=self._log_context(sentence=",".join(back))
                )
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

    async def write(self, target: str, value: Value) -> NoReturn:
        await trio.lowlevel.checkpoint()
        self.config.check_write(target, value)

    async def read(self, target: str) -> NoReturn:
        """Refuses: the sensor sends when it sends (or when polled on its schedule)."""
        await trio.lowlevel.checkpoint()
        self.config.point(target)
        raise WriteError(
            f"{self.name}/{target} is on a serial-line bus: line sensors cannot be read on "
            "demand; their latest value is in the hub (the bus publishes every line)"
        )

    def condition(self) -> Condition:
        if self._state is State.STARTING:
            return Condition(State.STARTING)
        if self._state is State.DOWN:
            return Condition(State.DOWN, self._down_reason)
        window = format_duration(self._window)
        if self._silent:
            return Condition(State.DEGRADED, f"no valid line for {window}")
        if self._watch is not None and self._watch.missing:
            missing = ", ".join(self._watch.missing)
            return Condition(State.DEGRADED, f"no {missing} sentence for {window}")
        return UP

    def statistics(self) -> SerialLineStatistics:
        return SerialLineStatistics(
            connected=self.connected,
            bytes_received=self.bytes_received,
            lines=self._parser.lines,
            malformed=self.malformed,
            overlong=self._parser.overlong,
            checksum_errors=self.checksum_errors,
            unchecked=self.unchecked,
            partial=self.partial,
            conversion_errors=self.conversion_errors,
            polls=self.polls,
            poll_overruns=self.poll_overruns,
            reconnects=self.reconnects,
            open_failures=self.open_failures,
            last_error=self.last_error,
        )
