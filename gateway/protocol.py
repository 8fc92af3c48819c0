"""The wss device protocol v1 as a sans-IO message model: JSON text frames in, JSON text out.

``parse_client_message`` turns one text frame from a device into a frozen message value or
raises ``ProtocolError`` (an error code, a message naming the field path, the reason and what
to send instead, and the message's id when one could be read). The ``*_frame`` functions build
the frames the gateway sends. ``published_reading`` turns a published item into a ``Reading``
under the device namespace ``devices/<client id>/<point>``.

No sockets, no trio, no clock: the caller passes ``now``. Depends on ``gateway.core``, attrs
and cattrs only. The wire format is documented in ``docs/protocol.md``; keep both in step.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NewType

import attrs
import cattrs
from cattrs.cols import homogenous_tuple_structure_factory
from cattrs.errors import (
    ClassValidationError,
    IterableValidationError,
)
from cattrs.gen import make_dict_structure_fn

from gateway.core.reading import Quality, Reading, Value
from gateway.core.topics import depth_problem, device_topic, name_problem, pattern_problem
from gateway.core.validation import UnknownKey, join, json_depth_problem, leaves, unique_keys

# ---- limits (docs/protocol.md, "Limits") ---------------------------------------------------

MAX_TOPICS = 100
"""Patterns in one subscribe or unsubscribe."""
MAX_READINGS = 1000
"""Readings in one publish."""
MAX_ID = 128
"""Characters of a publish id, ping id or command id."""
MAX_PATTERN = 256
"""Characters of one topic pattern."""
MAX_POINT = 64
"""Characters of a point name (one topic level)."""
MAX_STRING_VALUE = 1024
"""Characters of a string value."""
MAX_UNIT = 32
"""Characters of a unit."""
MAX_REASON = 128
"""Characters of the reason of a bad reading."""
MAX_ERROR_TEXT = 1024
"""Characters of the error of a failed command (``ack`` with ``ok: false``)."""
EARLIEST_YEAR = 2000
"""A reading's ``ts`` before this year means a device clock that was never set."""

MAX_FUTURE = 86400.0
"""How far (seconds) a reading's ``ts`` may be ahead of the gateway's clock."""
MAX_INT = 2**63 - 1
MIN_INT = -(2**63)
"""Whole numbers are 64-bit, as the outbox (SQLite) and CPI store them."""

DEFAULT_BAD_REASON = "reported bad by the device"
"""The reason of a bad reading published without one (a bad ``Reading`` always has a reason)."""

_MESSAGES_PER_ERROR = 3  # problems spelt out in one error message; the rest are counted


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` frame. The parser raises the first four; the server sends
    ``forbidden`` (ACL), ``rate-limited`` (token buckets), ``not-stored`` (the outbox did not
    commit a publish) and ``unknown-command`` (an ``ack`` that answers no command waiting for
    one)."""

    BAD_JSON = "bad-json"
    BAD_MESSAGE = "bad-message"
    UNKNOWN_TYPE = "unknown-type"
    TOO_LARGE = "too-large"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate-limited"
    NOT_STORED = "not-stored"
    UNKNOWN_COMMAND = "unknown-command"


class ProtocolError(Exception):
    """A frame the gateway cannot accept. ``message`` names the field path and the reason and
    says what to send instead; ``ref`` is the message's id (publish, ping) or command id
    (ack) when one could be read, so that the client knows which message failed."""

    def __init__(self, code: ErrorCode, message: str, ref: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.ref = ref

    def frame(self) -> str:
        """The ``error`` frame that answers the bad message."""
        return error_frame(self.code, self.message, self.ref)


# ---- field types: each NewType has its own structure hook (validation) ---------------------

Pattern = NewType("Pattern", str)
"""A subscription pattern (``bus/device/point``, ``+`` one level, ``#`` the rest)."""
PointName = NewType("PointName", str)
"""One topic level: letters, digits and ``_ . : -``."""
MessageId = NewType("MessageId", str)
"""1 to ``MAX_ID`` characters, no control characters (ids are echoed and logged)."""
Unit = NewType("Unit", str)
Reason = NewType("Reason", str)
ErrorText = NewType("ErrorText", str)
UtcTime = NewType("UtcTime", float)
"""Seconds since the epoch, sent as an ISO 8601 UTC string (``2024-05-01T12:00:00.250Z``)."""
Json = NewType("Json", object)
"""Any JSON value without NaN or Infinity (the result of a command)."""


# ---- client -> gateway messages ------------------------------------------------------------


def _unique(patterns: Sequence[Pattern]) -> tuple[Pattern, ...]:
    return tuple(dict.fromkeys(patterns))


@attrs.frozen(slots=True)
class Subscribe:
    """Receive readings on topics matching ``topics``; with ``last``, the latest value of each
    matching topic at once. Repeated patterns are kept once."""

    topics: tuple[Pattern, ...] = attrs.field(converter=_unique)
    last: bool = False


@attrs.frozen(slots=True)
class Unsubscribe:
    topics: tuple[Pattern, ...] = attrs.field(converter=_unique)


@attrs.frozen(slots=True)
class PublishItem:
    """One reading a device publishes; becomes a ``Reading`` with ``published_reading``."""

    point: PointName
    value: Value
    unit: Unit | None = None
    ts: UtcTime | None = None
    quality: Quality = Quality.GOOD
    reason: Reason | None = None
    """Only with quality ``bad``; optional (``DEFAULT_BAD_REASON`` when absent)."""


@attrs.frozen(slots=True)
class Publish:
    id: MessageId
    readings: tuple[PublishItem, ...]


@attrs.frozen(slots=True)
class Ack:
    """A device's answer to a ``command``: ``result`` only when ``ok``, ``error`` (required)
    only when not."""

    command_id: MessageId
    ok: bool
    result: Json | None = None
    error: ErrorText | None = None


@attrs.frozen(slots=True)
class Ping:
    id: MessageId | None = None


ClientMessage = Subscribe | Unsubscribe | Publish | Ack | Ping

MESSAGE_TYPES: Mapping[str, type[ClientMessage]] = {
    "subscribe": Subscribe,
    "unsubscribe": Unsubscribe,
    "publish": Publish,
    "ack": Ack,
    "ping": Ping,
}

_LISTS: Mapping[type, tuple[str, int, str]] = {
    # class: (field, most items, example of what a list holds)
    Subscribe: ("topics", MAX_TOPICS, '["line-1/+/temperature"]'),
    Unsubscribe: ("topics", MAX_TOPICS, '["line-1/+/temperature"]'),
    Publish: ("readings", MAX_READINGS, '[{"point": "temperature", "value": 21.5}]'),
}


# ---- parsing -------------------------------------------------------------------------------


class _Problem(ValueError):
    """A bad value; ``subpath`` names the key below the current path that is wrong."""

    def __init__(self, message: str, subpath: str = "", code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.subpath = subpath
        self.code = code or ErrorCode.BAD_MESSAGE


def show(value: object) -> str:
    """A value as JSON writes it, for error messages; long ones are cut short."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"a number of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, str) and len(value) > 50:
        return f'{json.dumps(value[:40])[:-1]}..." ({len(value)} characters)'
    return json.dumps(value)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _string(value: object, label: str, limit: int) -> str:
    if not isinstance(value, str):
        raise _Problem(f"{show(value)} is not a string: send {label}")
    if len(value) > limit:
        raise _Problem(f"{show(value)} is too long: at most {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # json.loads accepts "\ud800"; nothing downstream can store it.
        raise _Problem(f"{show(value)} contains a lone surrogate: send valid Unicode") from None
    return value


def _message_id(value: object, _: type) -> MessageId:
    text = _string(value, 'an id such as "42"', MAX_ID)
    if not text:
        raise _Problem('must not be empty: send an id such as "42"')
    if _CONTROL.search(text):
        raise _Problem(f"{show(text)} contains control characters: send printable text")
    return MessageId(text)


def _pattern(value: object, _: type) -> Pattern:
    text = _string(value, 'a topic pattern such as "line-1/+/temperature"', MAX_PATTERN)
    problem = pattern_problem(text) or depth_problem(text)
    if problem is None:
        for level in text.split("/"):
            if level not in ("+", "#"):
                problem = name_problem(level)
                if problem:
                    problem = f"{text!r}: {problem}"
                    break
    if problem:
        raise _Problem(f"{problem}: send a pattern such as 'line-1/+/temperature' or 'devices/#'")
    return Pattern(text)


def _point(value: object, _: type) -> PointName:
    text = _string(value, 'a point name such as "temperature"', MAX_POINT)
    problem = name_problem(text)
    if problem:
        raise _Problem(f"{problem}: send a point name such as 'temperature'")
    return PointName(text)


def _value(value: object, _: type) -> Value:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not MIN_INT <= value <= MAX_INT:
            raise _Problem(
                f"{show(value)} is out of range: a whole number is from {MIN_INT} to "
                f"{MAX_INT} (64 bits); send it as a float or a string"
            )
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Problem(
                f"{show(value)} is not a finite number: "
                'send null with "quality": "bad" for a value that could not be read'
            )
        return value
    if isinstance(value, str):
        return _string(value, "a value", MAX_STRING_VALUE)
    raise _Problem(
        f"{show(value)} is not a number, true/false, string or null: send one value per reading"
    )


_UTC_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})?",
    re.ASCII,
)
_TS_EXAMPLE = '"2024-05-01T12:00:00.250Z"'


def _utc_time(value: object, _: type) -> UtcTime:
    if not isinstance(value, str):
        raise _Problem(
            f"{show(value)} is not a timestamp: send an ISO 8601 UTC string such as {_TS_EXAMPLE}"
        )
    m = _UTC_TIME.fullmatch(value)
    if not m:
        raise _Problem(
            f"{show(value)} is not an ISO 8601 timestamp: send one such as {_TS_EXAMPLE}"
        )
    zone = m[8]
    if zone is None:
        raise _Problem(
            f"{show(value)} has no time zone: send UTC, ending in Z, such as {_TS_EXAMPLE}"
        )
    if zone not in ("Z", "+00:00"):
        raise _Problem(
            f"{show(value)} is not UTC: convert it to UTC and end it in Z, such as {_TS_EXAMPLE}"
        )
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if year < EARLIEST_YEAR:
        raise _Problem(
            f"{show(value)} is before {EARLIEST_YEAR}: the device's clock is not set (NTP, or an "
            "RTC battery); leave ts out to use the gateway's time"
        )
    try:
        when = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as e:
        raise _Problem(f"{show(value)} is not a valid date and time ({e})") from None
    fraction = float(f"0.{m[7]}") if m[7] else 0.0
    return UtcTime(when.timestamp() + fraction)


def _quality(value: object, _: type) -> Quality:
    if value == "good":
        return Quality.GOOD
    if value == "bad":
        return Quality.BAD
    raise _Problem(f'{show(value)} is not "good" or "bad"')


def _json(value: object, _: type) -> Json:
    problem = json_depth_problem(value)
    if problem:
        raise _Problem(problem)
    stack = [value]
    while stack:  # without recursion, and no deeper than MAX_JSON_DEPTH (checked above)
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise _Problem(f"contains {show(item)}, which JSON does not allow: send a number")
        if isinstance(item, int) and not isinstance(item, bool) and not MIN_INT <= item <= MAX_INT:
            raise _Problem(f"contains {show(item)}: a whole number is from {MIN_INT} to {MAX_INT}")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return Json(value)


def _strict_bool(value: object, _: type) -> bool:
    if not isinstance(value, bool):
        raise _Problem(f"{show(value)} is not true or false")
    return value


def _check(cl: type, value: dict[str, Any], message: object) -> None:
    """The rules between fields, after each field is valid on its own."""
    if isinstance(message, PublishItem):
        if message.reason is not None and message.quality is Quality.GOOD:
            raise _Problem('only with "quality": "bad": leave it out of a good reading', "reason")
    elif isinstance(message, Ack):
        if message.ok:
            if "error" in value:
                raise _Problem('only with "ok": false: leave it out, or send ok false', "error")
        else:
            if "result" in value:
                raise _Problem('only with "ok": true: send "error" to say what failed', "result")
            if message.error is None:
                raise _Problem(
                    'missing: a failed command ("ok": false) needs "error", a string saying why',
                    "error",
                )


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(MessageId, _message_id)
    conv.register_structure_hook(Pattern, _pattern)
    conv.register_structure_hook(PointName, _point)
    conv.register_structure_hook(
        Unit, lambda v, _: Unit(_string(v, 'a unit such as "degC"', MAX_UNIT))
    )
    conv.register_structure_hook(
        Reason, lambda v, _: Reason(_string(v, 'a reason such as "sensor open"', MAX_REASON))
    )
    conv.register_structure_hook(
        ErrorText,
        lambda v, _: ErrorText(_string(v, "a string saying why", MAX_ERROR_TEXT)),
    )
    conv.register_structure_hook(UtcTime, _utc_time)
    conv.register_structure_hook(Quality, _quality)
    conv.register_structure_hook(Json, _json)
    conv.register_structure_hook_func(lambda t: t == Value, _value)

    def tuple_hook(tp: Any) -> Callable[[object, type], object]:
        structure_items = homogenous_tuple_structure_factory(tp, conv)

        def structure(value: object, _: type) -> object:
            if not isinstance(value, list):
                raise _Problem(f"{show(value)} is not a list: send [ ... ]")
            return structure_items(value, tp)

        return structure

    conv.register_structure_hook_factory(
        lambda t: getattr(t, "__origin__", None) is tuple, tuple_hook
    )

    def object_hook(cl: type) -> Callable[[object, type], object]:
        structure_fields: Callable[..., object] = make_dict_structure_fn(
            cl, conv, _cattrs_forbid_extra_keys=True
        )
        listed = _LISTS.get(cl)

        def structure(value: object, _: type) -> object:
            if not isinstance(value, dict):
                raise _Problem(f"{show(value)} is not an object: send {{...}}")
            if listed:
                name, most, example = listed
                items = value.get(name)
                if isinstance(items, list) and not items:
                    raise _Problem(f"must not be empty: send e.g. {example}", name)
                if isinstance(items, list) and len(items) > most:
                    raise _Problem(
                        f"{len(items)} items are too many: at most {most} in one message; "
                        "send several messages",
                        name,
                        ErrorCode.TOO_LARGE,
                    )
            message = structure_fields(value, cl)
            _check(cl, value, message)
            return message

        return structure

    conv.register_structure_hook_factory(attrs.has, object_hook)
    return conv


_CONVERTER = _make_converter()


def _problems(exc: BaseException) -> Iterator[tuple[str, str, ErrorCode]]:
    """cattrs' detailed-validation errors as ``(path, message, code)``."""
    for path, leaf in leaves(exc):
        if isinstance(leaf, UnknownKey):
            yield path, str(leaf), ErrorCode.BAD_MESSAGE
        elif isinstance(leaf, KeyError):
            yield path, "missing: this key is required", ErrorCode.BAD_MESSAGE
        elif isinstance(leaf, _Problem):
            yield (join(path, leaf.subpath) if leaf.subpath else path), str(leaf), leaf.code
        else:
            # Not expected from the hooks; still an answer with the path, not a traceback.
            yield path, f"cannot be used ({type(leaf).__name__}: {leaf})", ErrorCode.BAD_MESSAGE


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return unique_keys(
        pairs,
        lambda key: _Problem(f"the key {show(key)} appears twice in one object: send it once"),
    )


def _ref(data: dict[str, Any]) -> str | None:
    ref = data.get("command_id") if data.get("type") == "ack" else data.get("id")
    if isinstance(ref, str) and 0 < len(ref) <= MAX_ID and not _CONTROL.search(ref):
        try:
            ref.encode("utf-8")
        except UnicodeEncodeError:
            return None
        return ref
    return None


def parse_client_message(data: str, *, now: float) -> ClientMessage:
    """One text frame from a device as a message value. ``now`` (seconds since the epoch) is
    the gateway's clock, for refusing readings from the future. Raises ``ProtocolError``."""
    try:
        raw = json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except _Problem as e:
        raise ProtocolError(ErrorCode.BAD_JSON, str(e)) from None
    except json.JSONDecodeError as e:
        raise ProtocolError(
            ErrorCode.BAD_JSON,
            f"not JSON ({e.msg} at line {e.lineno}, column {e.colno}): "
            'send one JSON object per text frame, such as {"type": "ping"}',
        ) from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise ProtocolError(
            ErrorCode.BAD_JSON, "a number has thousands of digits: send at most 19 digits"
        ) from None
    except RecursionError:
        raise ProtocolError(
            ErrorCode.BAD_JSON, "arrays and objects nested too deeply: no message nests that deep"
        ) from None
    if not isinstance(raw, dict):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f'{show(raw)} is not a JSON object: send {{"type": ..., ...}}, such as '
            '{"type": "ping"}',
        )
    ref = _ref(raw)
    types = ", ".join(MESSAGE_TYPES)
    if "type" not in raw:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"type: missing: every message needs a type, one of {types}", ref
        )
    kind = raw.pop("type")
    cl = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cl is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"type: {show(kind)} is not one of {types}", ref
        )
    try:
        message: ClientMessage = _CONVERTER.structure(raw, cl)
    except (ClassValidationError, IterableValidationError, _Problem) as e:
        raise _error(list(_problems(e)), ref) from None
    if isinstance(message, Publish):
        late = [
            (f"readings[{i}].ts", _future(item.ts, now), ErrorCode.BAD_MESSAGE)
            for i, item in enumerate(message.readings)
            if item.ts is not None and item.ts > now + MAX_FUTURE
        ]
        if late:
            raise _error(late, ref)
    return message


def _future(ts: float, now: float) -> str:
    return (
        f"{_iso(ts)} is more than a day ahead of the gateway's clock ({_iso(now)}): "
        "check the device's clock (NTP), or leave ts out to use the gateway's time"
    )


def _error(problems: list[tuple[str, str, ErrorCode]], ref: str | None) -> ProtocolError:
    codes = {code for _, _, code in problems}
    code = ErrorCode.TOO_LARGE if ErrorCode.TOO_LARGE in codes else ErrorCode.BAD_MESSAGE
    # A misspelt key also shows up as a missing one: its "did you mean" hint goes first.
    problems = sorted(problems, key=lambda p: not p[1].startswith("unknown key"))
    lines = [f"{path}: {text}" if path else text for path, text, _ in problems]
    message = "; ".join(lines[:_MESSAGES_PER_ERROR])
    if len(lines) > _MESSAGES_PER_ERROR:
        more = len(lines) - _MESSAGES_PER_ERROR
        message += f"; and {more} more problem{'s' if more > 1 else ''}"
    return ProtocolError(code, message, ref)


# ---- device readings -----------------------------------------------------------------------


def published_reading(client_id: str, item: PublishItem, now: float) -> Reading:
    """``item``, published by client ``client_id``, as a ``Reading`` on
    ``devices/<client id>/<point>``, timestamped ``ts`` or else ``now``."""
    bad = item.quality is Quality.BAD
    return Reading(
        device_topic(client_id, item.point),
        item.value,
        unit=item.unit,
        quality=item.quality,
        reason=(item.reason or DEFAULT_BAD_REASON) if bad else None,
        timestamp=now if item.ts is None else item.ts,
    )


# ---- gateway -> client frames --------------------------------------------------------------


def _iso(ts: float) -> str:
    try:
        when = datetime.fromtimestamp(ts, UTC)
    except (OverflowError, ValueError, OSError):  # 9999-12-31T23:59:59.9999Z rounds past 9999
        return "the end of year 9999"
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dumps(data: Mapping[str, object]) -> str:
    # allow_nan=False: a NaN here is a bug upstream; the frame would not be JSON.
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


def readings_frame(readings: Sequence[Reading]) -> str:
    """A ``readings`` frame, joined from each reading's shared ``encoded()`` bytes (encoded
    once however many subscribers receive it)."""
    body = b",".join([r.encoded() for r in readings]).decode()
    return '{"type":"readings","readings":[' + body + "]}"


def ack_frame(id: str) -> str:
    """The answer to a ``publish``: its readings were taken."""
    return _dumps({"type": "ack", "id": id})


def command_frame(command_id: str, name: str, args: Mapping[str, object], expires: float) -> str:
    """A command for the device; ``expires`` is seconds since the epoch, sent as ISO 8601 UTC."""
    return _dumps(
        {
            "type": "command",
            "command_id": command_id,
            "name": name,
            "args": dict(args),
            "expires": _iso(expires),
        }
    )


def error_frame(code: ErrorCode, message: str, ref: str | None = None) -> str:
    data: dict[str, object] = {"type": "error", "code": str(code), "message": message}
    if ref is not None:
        data["ref"] = ref
    return _dumps(data)


def gap_frame(dropped: int) -> str:
    """``dropped`` readings for this client were discarded because it read too slowly."""
    return _dumps({"type": "gap", "dropped": dropped})


def pong_frame(id: str | None = None) -> str:
    data: dict[str, object] = {"type": "pong"}
    if id is not None:
        data["id"] = id
    return _dumps(data)
