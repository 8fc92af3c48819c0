"""The command router: parses commands (JSON and XML bodies, objects in CPI's responses),
keeps their records in SQLite and executes them, on a bus (``ModbusTargets``) or on a device
connected over wss (``DeviceTargets``, acks back through ``CommandSink``).

Parsing (``parse_command``, ``command_from_object``) is pure: the caller passes ``now``.
Every problem is a ``CommandRejected`` with the HTTP status, a short code and a message that
names the field and says what to send:

- 400 ``malformed``: not JSON or XML, not an object, a DOCTYPE or ENTITY in XML;
- 400 ``invalid-field``: a field missing, unknown, of the wrong type or value;
- 400 ``bad-target``: ``target`` is not ``modbus:<bus>/<device>/<point>`` or
  ``device:<client id>``;
- 413 ``too-large``: ``args`` and ``value`` encode to more than ``max_args_bytes``;
- 415 ``unsupported-media-type``;
- 422 ``bad-timeout``, ``bad-expires`` (too far ahead), ``expired`` (already past).

The router (``CommandRouter``, a component part) adds 404 ``unknown-target`` and 409
``id-conflict``; the buses' ``check_write`` raises its own 404/422.

Records: one row per command id in an SQLite file (WAL, ``synchronous=FULL``), written on one
worker thread at a time so that the event loop never waits on an fsync. A command is
persisted as ``pending`` before it runs or is answered; open (pending, delivered) records are
also kept in memory. Final records are pruned after ``retention`` and beyond ``max_records``.
Executions run in the router's own nursery, never in the caller's task: an HTTP client that
goes away must not cancel a write half-way.

Depends on the stdlib (``json``, ``sqlite3``, ``xml.etree``), trio, attrs, cattrs,
``gateway.core`` and ``gateway.protocol`` (for ``show``). Never on ``drivers``: a bus's write
error reaches the router as any exception other than ``Unavailable`` and ``CommandRejected``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import sqlite3
import time
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NewType, TypeVar, cast
from urllib.parse import quote

import attrs
import cattrs
import trio
from cattrs.errors import ClassValidationError

from gateway.core import sqlitefile
from gateway.core.commands import (
    DEVICE,
    MODBUS,
    CommandRecord,
    CommandRejected,
    CommandRequest,
    CommandState,
    DeviceTarget,
    DeviceTargets,
    Json,
    ModbusTarget,
    ModbusTargets,
    OutcomeUnknown,
    Source,
    Target,
    Unavailable,
)
from gateway.core.component import UP, Condition, State
from gateway.core.configtypes import ConfigValueError, DurationTooLong, parse_duration
from gateway.core.logs import kv
from gateway.core.reading import Value, iso_utc
from gateway.core.topics import name_problem
from gateway.core.validation import UnknownKey, join, json_depth_problem, leaves, unique_keys
from gateway.protocol import show

log = logging.getLogger("gateway.commands")

MAX_ID = 128
MAX_NAME = 64
MAX_TARGET = 512
MAX_XML_DEPTH = 32
"""Nesting of elements in an XML body (``<command><args><a><b>...``)."""
MIN_INT = -(2**63)
MAX_INT = 2**63 - 1

STATUS_URL = "/api/v1/commands/"

MAX_SWEEP_SLEEP = 60.0
"""The expiry sweep sleeps until the next ``expires``, but at most this long: ``expires`` is
wall-clock time, and a clock step (NTP) is noticed within this."""
PRUNE_INTERVAL = 3600.0
"""Seconds between prunes by age (done with a write; an idle router has nothing to prune)."""
SCHEMA_VERSION = 1

FINAL_STATES = tuple(s.value for s in CommandState if s.final)

_T = TypeVar("_T")


MIN_TIMEOUT = 0.1
"""Seconds: less leaves a write no chance to finish and records it as "may or may not"."""


@attrs.frozen
class CommandLimits:
    default_timeout: float = 10.0
    max_timeout: float = 60.0
    default_expiry: float = 3600.0
    max_expiry: float = 7 * 86400.0
    max_args_bytes: int = 16 * 1024
    """Encoded JSON of ``args`` and ``value`` together."""


# ---- parsing -------------------------------------------------------------------------------


class _Problem(ValueError):
    """A bad field value (raised in the cattrs hooks)."""


CommandId = NewType("CommandId", str)
TargetText = NewType("TargetText", str)
CommandName = NewType("CommandName", str)
JsonObject = NewType("JsonObject", dict[str, object])
Scalar = NewType("Scalar", object)
"""A value to write: a number, true/false or a string."""
Timeout = NewType("Timeout", float)
Expires = NewType("Expires", float)


@attrs.frozen
class _Body:
    """A command body as sent, each field valid on its own. ``null`` means not given."""

    id: CommandId
    target: TargetText
    name: CommandName | None = None
    args: JsonObject | None = None
    value: Scalar | None = None
    timeout: Timeout | None = None
    expires: Expires | None = None
    read_back: bool | None = None


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""C0 and C1 controls and Unicode's line and paragraph separators."""
_ID_EXAMPLE = '"cpi-4711"'


def _string(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise _Problem(f"{show(value)} is not a string: send {what}")
    if not value:
        raise _Problem(f"must not be empty: send {what}")
    if len(value) > limit:
        raise _Problem(f"{show(value)} is too long: at most {limit} characters")
    if _CONTROL.search(value) or any(unicodedata.category(c) == "Cf" for c in value):
        # Format characters (bidi overrides, zero-width) make one id look like another in
        # logs and on the status page.
        raise _Problem(
            f"{show(value)} contains control or invisible format characters: send printable text"
        )
    if value != value.strip():
        raise _Problem(f"{show(value)} starts or ends with spaces: send it without them")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Problem(f"{show(value)} contains a lone surrogate: send valid Unicode") from None
    return value


def _check_json(value: object) -> None:
    """``value`` holds only what JSON can carry (finite numbers, 64-bit integers), nested at
    most ``MAX_JSON_DEPTH`` deep."""
    problem = json_depth_problem(value)
    if problem:
        raise _Problem(problem)
    stack = [value]
    while stack:  # without recursion, and no deeper than MAX_JSON_DEPTH (checked above)
        item = stack.pop()
        if item is None or isinstance(item, bool | str):
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise _Problem("contains a lone surrogate: send valid Unicode") from None
        elif isinstance(item, int):
            if not MIN_INT <= item <= MAX_INT:
                raise _Problem(f"contains {show(item)}: a whole number is 64 bits at most")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise _Problem(f"contains {item}, which JSON does not allow: send a number")
        elif isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    raise _Problem(f"has the key {key!r}: keys are strings")
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        else:
            raise _Problem(f"contains {type(item).__name__}, which is not JSON")


def _json_object(value: object, _: type) -> JsonObject:
    if not isinstance(value, dict):
        raise _Problem(f'{show(value)} is not an object: send {{"key": value, ...}}')
    _check_json(value)
    return JsonObject(value)


def _scalar(value: object, _: type) -> Scalar:
    if isinstance(value, dict | list):
        raise _Problem(f"{show(value)} is not a number, true/false or string: send one value")
    if not isinstance(value, bool | int | float | str):
        raise _Problem(f"{type(value).__name__} is not a number, true/false or string")
    _check_json(value)
    return Scalar(value)


def _timeout(value: object, _: type) -> Timeout:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Problem(f'{show(value)} is not a timeout: send seconds, e.g. 5 or "5s"')
    if isinstance(value, str):
        try:
            return Timeout(parse_duration(value))
        except DurationTooLong:  # beyond a year (a typo): the limit check says the most
            return _FAR_TOO_LONG
        except ConfigValueError:
            raise _Problem(
                f'{show(value)} is not a duration: send e.g. "5s", "500ms", "1min" or a number '
                "of seconds"
            ) from None
    try:
        seconds = float(value)
    except OverflowError:  # an integer of hundreds of digits
        if value < 0:
            raise _Problem(
                f'{show(value)} is not a timeout: send seconds, e.g. 5 or "5s"'
            ) from None
        return _FAR_TOO_LONG
    if not math.isfinite(seconds):
        raise _Problem(f'{value} is not a timeout: send seconds, e.g. 5 or "5s"')
    return Timeout(seconds)


_FAR_TOO_LONG = Timeout(math.inf)
"""A timeout beyond any limit (more than a year, more digits than a float holds)."""


_EXPIRES_EXAMPLE = '"2026-11-27T22:00:00Z"'


def _expires(value: object, _: type) -> Expires:
    if not isinstance(value, str):
        raise _Problem(f"{show(value)} is not a time: send ISO 8601 UTC, e.g. {_EXPIRES_EXAMPLE}")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise _Problem(
            f"{show(value)} is not an ISO 8601 time: send one such as {_EXPIRES_EXAMPLE}"
        ) from None
    if when.tzinfo is None:
        raise _Problem(
            f"{show(value)} has no time zone: end it in Z (UTC), e.g. {_EXPIRES_EXAMPLE}"
        )
    return Expires(when.timestamp())


def _strict_bool(value: object, _: type) -> bool:
    if not isinstance(value, bool):
        raise _Problem(f"{show(value)} is not true or false")
    return value


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(
        CommandId, lambda v, _: CommandId(_string(v, f"an id such as {_ID_EXAMPLE}", MAX_ID))
    )
    conv.register_structure_hook(
        TargetText,
        lambda v, _: TargetText(
            _string(v, 'a target such as "modbus:plc/meter/setpoint"', MAX_TARGET)
        ),
    )
    conv.register_structure_hook(
        CommandName,
        lambda v, _: CommandName(_string(v, 'a name such as "show-message"', MAX_NAME)),
    )
    conv.register_structure_hook(JsonObject, _json_object)
    conv.register_structure_hook(Scalar, _scalar)
    conv.register_structure_hook(Timeout, _timeout)
    conv.register_structure_hook(Expires, _expires)
    return conv


_CONVERTER = _make_converter()
"""The one converter of this boundary (API bodies, CPI's commands), built once."""

_MESSAGES_PER_ERROR = 3


def _field_problems(exc: BaseException) -> Iterator[str]:
    for path, leaf in leaves(exc):
        if isinstance(leaf, UnknownKey):
            yield f"{path}: {leaf}"
        elif isinstance(leaf, KeyError):
            yield f"{path}: missing: this field is required"
        elif isinstance(leaf, _Problem):
            yield f"{path}: {leaf}" if path else str(leaf)
        else:  # not expected from the hooks; still an answer naming the field
            yield f"{path}: cannot be used ({type(leaf).__name__}: {leaf})"


def _invalid(message: str) -> CommandRejected:
    return CommandRejected(400, "invalid-field", message)


def parse_target(text: str) -> Target:
    """``modbus:<bus>/<device>/<point>`` or ``device:<client id>``; else ``CommandRejected``
    (400 ``bad-target``)."""
    example = "send modbus:<bus>/<device>/<point> or device:<client id>"
    scheme, colon, rest = text.partition(":")
    if not colon or scheme not in (MODBUS, DEVICE):
        raise CommandRejected(400, "bad-target", f"target: {show(text)} is not a target: {example}")
    levels = rest.split("/")
    if scheme == MODBUS:
        if len(levels) != 3:
            raise CommandRejected(
                400,
                "bad-target",
                f"target: {show(text)} has {len(levels)} level(s) after modbus:, not 3: send "
                "modbus:<bus>/<device>/<point>, e.g. modbus:plc/meter/setpoint",
            )
        for what, level in zip(("bus", "device", "point"), levels, strict=True):
            problem = name_problem(level)
            if problem:
                raise CommandRejected(
                    400, "bad-target", f"target: the {what} of {show(text)}: {problem}"
                )
        return ModbusTarget(*levels)
    problem = name_problem(rest)
    if problem:
        raise CommandRejected(
            400, "bad-target", f"target: the client id of {show(text)}: {problem}"
        )
    return DeviceTarget(rest)


def _json_size(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def command_from_object(data: object, *, now: float, limits: CommandLimits) -> CommandRequest:
    """A decoded JSON object (an API body, or one of ``commands`` in CPI's response) as a
    validated request. ``now``: UTC seconds since the epoch. Raises ``CommandRejected``."""
    if not isinstance(data, dict):
        raise CommandRejected(
            400,
            "malformed",
            f'{show(data)} is not a command: send an object such as {{"id": {_ID_EXAMPLE}, '
            '"target": "modbus:plc/meter/setpoint", "value": 21.5}',
        )
    try:
        body = _CONVERTER.structure(data, _Body)
    except (ClassValidationError, _Problem) as e:
        # A misspelt key also shows up as a missing one: its "did you mean" goes first.
        problems = sorted(_field_problems(e), key=lambda p: "unknown key" not in p)
        message = "; ".join(problems[:_MESSAGES_PER_ERROR])
        if len(problems) > _MESSAGES_PER_ERROR:
            message += f"; and {len(problems) - _MESSAGES_PER_ERROR} more"
        raise _invalid(message) from None
    return _request(body, now, limits, data.get("timeout"))


def _request(
    body: _Body, now: float, limits: CommandLimits, sent_timeout: object
) -> CommandRequest:
    target = parse_target(body.target)
    value: Value
    if isinstance(target, ModbusTarget):
        if body.name is not None and body.name != "write":
            raise _invalid(
                f'name: {show(body.name)}: a Modbus target takes only "write" (or leave '
                "name out); send the value to write in value"
            )
        if body.args:
            raise _invalid("args: only for device targets: send the value to write in value")
        if body.value is None:
            raise _invalid("value: missing: a Modbus target needs the value to write")
        name, args, value = "write", {}, cast(Value, body.value)
    else:
        if body.name is None:
            raise _invalid('name: missing: a device command needs a name, e.g. "show-message"')
        if body.value is not None:
            raise _invalid("value: only for Modbus targets: put what the device needs into args")
        if body.read_back:
            raise _invalid("read_back: only for Modbus targets: leave it out")
        name, args, value = body.name, dict(body.args or {}), None
    size = _json_size(args) + _json_size(value)
    if size > limits.max_args_bytes:
        raise CommandRejected(
            413,
            "too-large",
            f"args and value are {size} bytes as JSON: at most {limits.max_args_bytes}",
        )
    timeout = limits.default_timeout if body.timeout is None else body.timeout
    if timeout == _FAR_TOO_LONG:
        raise CommandRejected(
            422,
            "bad-timeout",
            f"timeout: {show(sent_timeout)} is far too long: at most {limits.max_timeout:g}s",
        )
    if not MIN_TIMEOUT <= timeout <= limits.max_timeout:
        raise CommandRejected(
            422,
            "bad-timeout",
            f"timeout: {timeout:g}s: send at least {MIN_TIMEOUT:g}s and at most "
            f"{limits.max_timeout:g}s",
        )
    expires = now + limits.default_expiry if body.expires is None else body.expires
    # An expires in the past is refused by the router, not here: a repeat of an id that ran
    # before its expires must get that first result back, not "refused".
    if expires > now + limits.max_expiry:
        raise CommandRejected(
            422,
            "bad-expires",
            f"expires: {iso_utc(expires)} is more than {limits.max_expiry / 86400:g} days ahead: "
            "send an earlier time",
        )
    return CommandRequest(
        id=body.id,
        target=target,
        name=name,
        args=args,
        value=value,
        timeout=timeout,
        expires=expires,
        read_back=bool(body.read_back),
    )


def _media_type(content_type: str) -> tuple[str, str | None]:
    kind, *params = content_type.split(";")
    charset = None
    for param in params:
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset":
            charset = val.strip().strip('"').lower()
    return kind.strip().lower(), charset


def parse_command(
    body: bytes, content_type: str, *, now: float, limits: CommandLimits
) -> CommandRequest:
    """A request body (``application/json``, or ``application/xml`` / ``text/xml``) as a
    validated request. Raises ``CommandRejected``."""
    kind, charset = _media_type(content_type)
    if kind not in ("application/json", "application/xml", "text/xml"):
        raise CommandRejected(
            415,
            "unsupported-media-type",
            f"Content-Type {show(content_type) if content_type else '(none)'}: send "
            "application/json or application/xml",
        )
    if charset is not None and charset not in ("utf-8", "utf8"):
        raise CommandRejected(
            415, "unsupported-media-type", f"charset {charset}: send UTF-8 (charset=utf-8)"
        )
    if kind == "application/json":
        return command_from_object(_load_json(body), now=now, limits=limits)
    return command_from_object(_load_xml(body), now=now, limits=limits)


def _malformed(message: str) -> CommandRejected:
    return CommandRejected(400, "malformed", message)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return unique_keys(
        pairs,
        lambda key: _malformed(f"the key {show(key)} appears twice in one object: send it once"),
    )


def _no_constant(name: str) -> object:
    raise _malformed(f"{name} is not JSON: send a number")


def _load_json(body: bytes) -> object:
    try:
        # Decoded here: json.loads would guess UTF-16 or UTF-32 from the first bytes.
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _malformed("not UTF-8: send the JSON body in UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise _malformed(
            f"not JSON ({e.msg} at line {e.lineno}, column {e.colno}): send one JSON object "
            f'such as {{"id": {_ID_EXAMPLE}, "target": "modbus:plc/meter/setpoint", "value": 1}}'
        ) from None
    except RecursionError:
        raise _malformed("arrays and objects nested too deeply") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise _malformed("a number has thousands of digits: send at most 19 digits") from None


# XML: text of these fields stays a string ("4711" is an id, not a number).
_XML_STRINGS = frozenset({"id", "target", "name", "expires"})
_DTD = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def _xml_scalar(text: str) -> object:
    """XML text that reads as a JSON number, true, false or null becomes that; anything else
    is the string."""
    try:
        value = json.loads(text, parse_constant=lambda _: text)
    except ValueError:  # not JSON, or a number of thousands of digits
        return text
    if value is None or isinstance(value, bool | int | float):
        return value
    return text


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]  # {namespace}name: iFlows may put the body in a namespace


def _xml_object(element: ET.Element, path: str, depth: int) -> dict[str, object]:
    if depth > MAX_XML_DEPTH:
        raise _malformed(f"{path}: elements nested more than {MAX_XML_DEPTH} deep")
    if element.text and element.text.strip():
        raise _malformed(
            f"{path or 'command'}: text {show(element.text.strip())} where elements are "
            "expected: send each field as an element"
        )
    out: dict[str, object] = {}
    for child in element:
        name = _local(child.tag)
        attributes = dict(child.attrib)
        # <item key="a b"> is how record_xml writes keys that are not XML names.
        key = attributes.pop("key") if name == "item" and "key" in attributes else name
        if attributes:
            raise _malformed(
                f"{join(path, key)}: attributes ({', '.join(attributes)}) are not used: send "
                "each field as an element"
            )
        if child.tail and child.tail.strip():
            raise _malformed(f"{path}: text between elements: send elements only")
        if key in out:
            raise _malformed(
                f"{join(path, key)}: appears twice: an XML command cannot hold lists (send "
                "JSON for that), or send the element once"
            )
        if len(child) or (path == "" and key == "args"):
            out[key] = _xml_object(child, join(path, key), depth + 1)
        elif path == "" and key in _XML_STRINGS:
            out[key] = child.text or ""
        else:
            out[key] = _xml_scalar(child.text or "")
    return out


def _load_xml(body: bytes) -> dict[str, object]:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _malformed("not UTF-8: send the XML body in UTF-8") from None
    if _DTD.search(text):
        # No DTDs at all: entity expansion (billion laughs, external entities) is refused
        # before the parser sees the body.
        raise _malformed("DOCTYPE and ENTITY declarations are not accepted: leave them out")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise _malformed(
            f"not XML ({e}): send one <command> element such as <command><id>cpi-4711</id>"
            "<target>modbus:plc/meter/setpoint</target><value>21.5</value></command>"
        ) from None
    if _local(root.tag) != "command":
        raise _malformed(f"the root element is <{_local(root.tag)}>: send <command>")
    if root.attrib:
        raise _malformed(
            f"attributes of <command> ({', '.join(root.attrib)}) are not used: send each "
            "field as an element"
        )
    return _xml_object(root, "", 1)


# ---- records as the API shows them ---------------------------------------------------------


def status_url(command_id: str) -> str:
    return STATUS_URL + quote(command_id, safe="")


def record_json(record: CommandRecord) -> dict[str, object]:
    request = record.request
    return {
        "id": request.id,
        "target": str(request.target),
        "name": request.name,
        "args": dict(request.args),
        "value": request.value,
        "state": record.state.value,
        "result": record.result,
        "error": record.error,
        "source": record.source.value,
        "created": iso_utc(record.created),
        "updated": iso_utc(record.updated),
        "expires": iso_utc(request.expires),
        "status_url": status_url(request.id),
    }


# Characters XML 1.0 cannot hold at all (control characters, lone surrogates).
_NOT_XML = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def _xml_text(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def _xml_value(element: ET.Element, value: object) -> None:
    """``value`` (any JSON) as the content of ``element``: objects and lists as child
    elements, null as an empty element."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            key = str(key)
            if _XML_NAME.fullmatch(key) and not key.lower().startswith("xml"):
                child = ET.SubElement(element, key)
            else:
                child = ET.SubElement(element, "item", key=_xml_text(key))
            _xml_value(child, item)
    elif isinstance(value, list | tuple):
        for item in value:
            _xml_value(ET.SubElement(element, "item"), item)
    elif value is None:
        pass
    elif isinstance(value, bool):
        element.text = "true" if value else "false"
    elif isinstance(value, int | float):
        element.text = json.dumps(value)
    else:
        element.text = _xml_text(str(value))


def _xml_document(root: ET.Element) -> bytes:
    document: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return document


def _record_element(parent: ET.Element | None, record: CommandRecord) -> ET.Element:
    element = ET.Element("command") if parent is None else ET.SubElement(parent, "command")
    for key, value in record_json(record).items():
        _xml_value(ET.SubElement(element, key), value)
    return element


def record_xml(record: CommandRecord) -> bytes:
    return _xml_document(_record_element(None, record))


def records_xml(records: Iterable[CommandRecord]) -> bytes:
    """``<commands>`` holding each record's ``<command>``, as ``record_xml`` writes it, in
    one document (built once, not each record serialised and parsed again)."""
    root = ET.Element("commands")
    for record in records:
        _record_element(root, record)
    return _xml_document(root)


def error_xml(code: str, message: str) -> bytes:
    root = ET.Element("error")
    ET.SubElement(root, "code").text = _xml_text(code)
    ET.SubElement(root, "message").text = _xml_text(message)
    return _xml_document(root)


# ---- the store (synchronous; runs on the worker thread) -------------------------------------


class CommandStoreError(Exception):
    """The command database cannot be used; the message says what to do."""


_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE commands (
    id TEXT PRIMARY KEY, request TEXT NOT NULL, source TEXT NOT NULL, state TEXT NOT NULL,
    result TEXT NOT NULL, error TEXT, status INTEGER NOT NULL, created REAL NOT NULL,
    updated REAL NOT NULL, expires REAL NOT NULL);
CREATE INDEX commands_created ON commands (created);
CREATE INDEX commands_state ON commands (state, updated);
"""
_TABLES = {"meta", "commands"}
COMMANDS_FILE = sqlitefile.Kind(
    what="command database",
    a_what="a command database",
    error=CommandStoreError,
    schema=_SCHEMA,
    tables=frozenset(_TABLES),
    version=SCHEMA_VERSION,
)
_COLUMNS = "id, request, source, state, result, error, status, created, updated, expires"
_FINAL_SQL = ", ".join(f"'{s}'" for s in FINAL_STATES)


def _request_json(request: CommandRequest) -> str:
    return json.dumps(
        {
            "id": request.id,
            "target": str(request.target),
            "name": request.name,
            "args": dict(request.args),
            "value": request.value,
            "timeout": request.timeout,
            "expires": request.expires,
            "read_back": request.read_back,
        },
        separators=(",", ":"),
    )


def _row(record: CommandRecord) -> tuple[object, ...]:
    return (
        record.request.id,
        _request_json(record.request),
        record.source.value,
        record.state.value,
        json.dumps(record.result, separators=(",", ":")),
        record.error,
        record.status,
        record.created,
        record.updated,
        record.request.expires,
    )


def _from_row(row: Sequence[Any]) -> CommandRecord:
    _, request_text, source, state, result, error, status, created, updated, _ = row
    data = json.loads(request_text)
    request = CommandRequest(
        id=data["id"],
        target=parse_target(data["target"]),
        name=data["name"],
        args=data["args"],
        value=data["value"],
        timeout=data["timeout"],
        expires=data["expires"],
        read_back=data["read_back"],
    )
    return CommandRecord(
        request,
        Source(source),
        CommandState(state),
        created,
        updated,
        json.loads(result),
        error,
        status,
    )


class _Store:
    """One connection to the command database. Not thread-safe: one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.conn = self._open()
        except sqlitefile.Corrupt as e:
            aside = sqlitefile.move_aside(path, COMMANDS_FILE, str(e))
            self.conn = self._open()
            log.error(
                "COMMAND DATABASE CORRUPT: moved it aside and started an empty one; the "
                "commands it held (pending device commands, results) are lost",
                extra=kv(path=path, moved_to=aside, reason=e),
            )

    def _open(self) -> sqlite3.Connection:
        return sqlitefile.connect(self.path, COMMANDS_FILE)

    def close(self) -> None:
        self.conn.close()

    def _transaction(self, fn: Callable[[], _T]) -> _T:
        return sqlitefile.transaction(self.conn, fn)

    def counts(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT state, count(*) FROM commands GROUP BY state"))

    def load_open(self) -> list[CommandRecord]:
        records = []
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM commands WHERE state NOT IN ({_FINAL_SQL}) "
            "ORDER BY created, rowid"
        )
        for row in rows:
            try:
                records.append(_from_row(row))
            except (ValueError, KeyError, TypeError, CommandRejected) as e:
                log.error(
                    "command database: a stored command cannot be read; it is left as it is",
                    extra=kv(path=self.path, id=row[0], reason=e),
                )
        return records

    def get(self, command_id: str) -> CommandRecord | None:
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM commands WHERE id = ?", (command_id,)
        ).fetchone()
        return _from_row(row) if row is not None else None

    def recent(self, limit: int) -> list[CommandRecord]:
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM commands ORDER BY created DESC, rowid DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [_from_row(row) for row in rows]

    def write(
        self, batch: Mapping[str, CommandRecord | None], prune: tuple[float, int] | None
    ) -> dict[str, int]:
        """Store (or delete: None) the records of ``batch`` in one transaction; with
        ``prune = (before, max_final)`` also delete final records updated before ``before``
        and the oldest beyond ``max_final``. The records pruned, per state."""

        def work() -> dict[str, int]:
            c = self.conn
            for command_id, record in batch.items():
                if record is None:
                    c.execute("DELETE FROM commands WHERE id = ?", (command_id,))
                else:
                    c.execute(
                        f"INSERT INTO commands ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?) "
                        "ON CONFLICT (id) DO UPDATE SET request = excluded.request, "
                        "source = excluded.source, state = excluded.state, "
                        "result = excluded.result, error = excluded.error, "
                        "status = excluded.status, created = excluded.created, "
                        "updated = excluded.updated, expires = excluded.expires",
                        _row(record),
                    )
            return self._prune(*prune) if prune is not None else {}

        return self._transaction(work)

    def _prune(self, before: float, max_final: int) -> dict[str, int]:
        c = self.conn
        pruned: dict[str, int] = {}
        old = f"state IN ({_FINAL_SQL}) AND updated < ?"
        for state, n in c.execute(
            f"SELECT state, count(*) FROM commands WHERE {old} GROUP BY state", (before,)
        ):
            pruned[state] = n
        c.execute(f"DELETE FROM commands WHERE {old}", (before,))
        total = c.execute(
            f"SELECT count(*) FROM commands WHERE state IN ({_FINAL_SQL})"
        ).fetchone()[0]
        if total > max_final:
            oldest = (
                f"rowid IN (SELECT rowid FROM commands WHERE state IN ({_FINAL_SQL}) "
                "ORDER BY created, rowid LIMIT ?)"
            )
            excess = total - max_final
            for state, n in c.execute(
                f"SELECT state, count(*) FROM commands WHERE {oldest} GROUP BY state", (excess,)
            ):
                pruned[state] = pruned.get(state, 0) + n
            c.execute(f"DELETE FROM commands WHERE {oldest}", (excess,))
        return pruned


# ---- the router ----------------------------------------------------------------------------


@attrs.frozen
class CommandStatistics:
    by_state: Mapping[str, int]
    """Records known per ``CommandState`` value (all five keys, 0 when none)."""
    executed: int
    """Commands accepted for execution since start."""
    rejected: int
    """``CommandRejected`` raised by ``execute`` / ``from_cpi`` since start."""
    unmatched_acks: int
    """``device_acked`` calls that matched no open command of that client."""


@attrs.define
class _Outcome:
    """How a Modbus execution ended, for the caller of ``execute`` waiting for it."""

    done: trio.Event = attrs.Factory(trio.Event)
    record: CommandRecord | None = None
    error: Exception | None = None


_MISSING: Any = object()


def _excerpt(value: object, limit: int = 200) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _same_command(a: CommandRequest, b: CommandRequest) -> bool:
    # As JSON, so that true and 1, or 1 and 1.0, count as different values.
    def key(r: CommandRequest) -> str:
        return json.dumps(
            [str(r.target), r.name, r.args, r.value, r.read_back], sort_keys=True, default=str
        )

    return key(a) == key(b)


def _same_number(read: Value, held: Value) -> Value:
    """What was read back, as the value written when it is that value up to float noise
    (33 * 0.1 reads back as 3.3000000000000003)."""
    if (
        isinstance(read, float)
        and isinstance(held, int | float)
        and not isinstance(held, bool)
        and math.isclose(read, held, rel_tol=1e-9)
    ):
        return held
    return read


class CommandRouter:
    """Executes commands and keeps their records; a component part (``run``, ``condition``,
    ``statistics``) and the device plane's ``CommandSink``.

    ``execute`` and ``from_cpi`` need the router running (else ``Unavailable``); the
    executions run in its nursery, so a caller that is cancelled (an HTTP client that went
    away) never cancels a write or a delivery half-way."""

    def __init__(
        self,
        path: Path,
        modbus: ModbusTargets,
        devices: Callable[[], DeviceTargets | None],
        *,
        limits: CommandLimits = CommandLimits(),  # frozen: one shared default is safe
        wall_clock: Callable[[], float] = time.time,
        retention: float = 7 * 86400.0,
        max_records: int = 10_000,
    ) -> None:
        self.path = Path(path)
        self.limits = limits
        self._modbus = modbus
        self._devices = devices
        self._wall = wall_clock
        self._retention = retention
        self._max_records = max_records
        self._store: _Store | None = None
        self._nursery: trio.Nursery | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._lock = trio.Lock()
        """Held around every store call: the snapshot of what to write and the write are
        one step, so writes land in the order their changes were made."""
        self._open: dict[str, CommandRecord] = {}
        """Pending and delivered records, in the order they were created."""
        self._unsaved: dict[str, CommandRecord | None] = {}
        """Changes not yet written (None: delete), the newest per id."""
        self._claims: dict[str, trio.Event] = {}
        """Ids being looked up or created by an ``execute``: another waits for it."""
        self._changed: dict[str, trio.Event] = {}
        self._sweep_wakeup = trio.Event()
        self._delivering: dict[str, bool] = {}
        """Client ids with a delivery task running; True: look again when done."""
        self._counts = {s.value: 0 for s in CommandState}
        self._last_prune = -math.inf
        self._executed = 0
        self._rejected = 0
        self._unmatched = 0

    # -- component part

    def condition(self) -> Condition:
        return UP if self._nursery is not None else Condition(State.STARTING)

    def statistics(self) -> CommandStatistics:
        return CommandStatistics(
            by_state=dict(self._counts),
            executed=self._executed,
            rejected=self._rejected,
            unmatched_acks=self._unmatched,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # A missing directory, no permission, another database: CommandStoreError says
        # what to do, and the supervisor tries again with backoff (the rest of the gateway
        # goes on; commands are 503 meanwhile).
        store = await trio.to_thread.run_sync(
            functools.partial(_Store, self.path), limiter=self._limiter
        )
        self._store = store
        try:
            await self._load(store)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._sweep)
                devices = self._devices()
                if devices is not None:
                    for client_id in {
                        r.request.target.client_id
                        for r in self._open.values()
                        if isinstance(r.request.target, DeviceTarget)
                    }:
                        if devices.connected(client_id):
                            self._kick(client_id)
                task_status.started()
        finally:
            self._nursery = None
            for event in self._changed.values():  # waiters see that the router stopped
                event.set()
            self._changed.clear()
            with trio.CancelScope(shield=True):
                try:
                    await self._flush()
                except CommandStoreError as e:
                    log.error("commands: the last changes could not be stored: %s", e)
                await trio.to_thread.run_sync(store.close, limiter=self._limiter)
            self._store = None

    async def _load(self, store: _Store) -> None:
        def load() -> tuple[dict[str, int], list[CommandRecord]]:
            return store.counts(), store.load_open()

        counts, records = await trio.to_thread.run_sync(load, limiter=self._limiter)
        self._counts = {s.value: counts.get(s.value, 0) for s in CommandState}
        self._open.clear()
        self._unsaved.clear()
        now = self._wall()
        for record in records:
            self._open[record.request.id] = record
            if isinstance(record.request.target, ModbusTarget):
                # The gateway stopped while this write was running: nobody knows whether it
                # reached the device.
                self._change(
                    record,
                    CommandState.FAILED,
                    now,
                    status=504,
                    error="the gateway stopped during the write; it may or may not have happened",
                )
            elif record.state is CommandState.DELIVERED:
                # Delivered before the restart, never acked: deliver it anew when the device
                # connects (the device dedupes by command_id), so a lost ack is not fatal.
                self._change(record, CommandState.PENDING, now)
        await self._flush(prune_now=True)
        log.info(
            "commands: store open",
            extra=kv(path=self.path, open=len(self._open), records=sum(self._counts.values())),
        )

    # -- bookkeeping (event loop)

    def _running(self) -> trio.Nursery:
        if self._nursery is None:
            raise Unavailable("the command router is not running (starting or stopping)")
        return self._nursery

    def _change(
        self,
        old: CommandRecord,
        state: CommandState,
        now: float,
        *,
        status: int | None = None,
        result: Json = _MISSING,
        error: str | None = None,
    ) -> CommandRecord:
        """``old`` moved to ``state``; counted, indexed, queued for writing, waiters woken."""
        if status is None:
            status = 202 if not state.final else 200
        new = attrs.evolve(
            old,
            state=state,
            updated=now,
            status=status,
            result=old.result if result is _MISSING else result,
            error=error,
        )
        self._counts[old.state.value] -= 1
        self._counts[state.value] += 1
        self._put(new)
        if state.final:
            request = new.request
            log.info(
                "command %s",
                state.value,
                extra=kv(
                    id=request.id,
                    target=request.target,
                    source=new.source.value,
                    status=status,
                    **({"error": error} if error else {"result": _excerpt(new.result)}),
                ),
            )
        return new

    def _put(self, record: CommandRecord) -> None:
        command_id = record.request.id
        if record.state.final:
            self._open.pop(command_id, None)
        else:
            self._open[command_id] = record
        self._unsaved[command_id] = record
        self._notify(command_id)

    def _remove(self, record: CommandRecord) -> None:
        command_id = record.request.id
        self._counts[record.state.value] -= 1
        self._open.pop(command_id, None)
        self._unsaved[command_id] = None
        self._notify(command_id)

    def _notify(self, command_id: str) -> None:
        event = self._changed.pop(command_id, None)
        if event is not None:
            event.set()

    async def _wait_changed(self, command_id: str) -> None:
        event = self._changed.get(command_id)
        if event is None:
            event = self._changed[command_id] = trio.Event()
        await event.wait()

    # -- the store (worker thread)

    async def _call(self, fn: Callable[..., _T], *args: object) -> _T:
        store = self._store
        if store is None:
            raise Unavailable("the command router is not running (starting or stopping)")
        try:
            return await trio.to_thread.run_sync(
                functools.partial(fn, store, *args), limiter=self._limiter
            )
        except sqlite3.Error as e:
            raise CommandStoreError(f"command database {self.path}: {e}") from e

    async def _flush(self, *, prune_now: bool = False) -> None:
        """Write every change made so far; returns once they are on disk. Prunes old final
        records with it when there are too many, every ``PRUNE_INTERVAL``, or ``prune_now``."""
        async with self._lock:
            batch, self._unsaved = self._unsaved, {}
            if not batch and not prune_now:
                await trio.lowlevel.checkpoint()
                return
            now = self._wall()
            final = sum(self._counts[s] for s in FINAL_STATES)
            prune = None
            if prune_now or final > self._max_records or now - self._last_prune >= PRUNE_INTERVAL:
                prune = (now - self._retention, self._max_records)
            try:
                pruned = await self._call(_Store.write, batch, prune)
            except BaseException:
                for command_id, record in batch.items():  # newer changes win
                    self._unsaved.setdefault(command_id, record)
                raise
            if prune is not None:
                self._last_prune = now
                for state, n in pruned.items():
                    self._counts[state] -= n
                if pruned:
                    log.info("commands: old records pruned", extra=kv(**pruned))

    async def _persist(self) -> None:
        """A flush in the background (after an ack, a delivery, an expiry)."""
        try:
            await self._flush()
        except CommandStoreError as e:
            # The change stays queued; the next flush tries again.
            log.error("commands: %s", e)

    def _persist_soon(self) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._persist)

    async def _find(self, command_id: str) -> CommandRecord | None:
        record = self._open.get(command_id)
        if record is not None:
            return record
        if command_id in self._unsaved:
            return self._unsaved[command_id]
        async with self._lock:  # a batch being written has landed once this is held
            if command_id in self._unsaved:
                return self._unsaved[command_id]
            try:
                return await self._call(_Store.get, command_id)
            except CommandStoreError as e:
                raise Unavailable(str(e)) from None

    async def get(self, id: str) -> CommandRecord | None:
        return await self._find(id)

    async def recent(self, limit: int) -> list[CommandRecord]:
        """The ``limit`` newest records, newest first."""
        try:
            await self._flush()
            async with self._lock:
                stored = await self._call(_Store.recent, max(0, limit))
        except CommandStoreError as e:
            raise Unavailable(str(e)) from None
        out = []
        for record in stored:  # what changed since the flush
            command_id = record.request.id
            current = self._open.get(command_id) or self._unsaved.get(command_id, record)
            if current is not None:
                out.append(current)
        return out

    # -- executing

    async def execute(self, request: CommandRequest, source: Source) -> CommandRecord:
        """Execute ``request`` (or return the record of its id) and wait for the outcome:
        a Modbus write's result, a device's ack within ``request.timeout`` (else the record
        as it is: pending or delivered). Raises ``CommandRejected`` (nothing executed, not
        recorded) or ``Unavailable`` (a bus that is down: not recorded either)."""
        try:
            return await self._execute(request, source, wait=True)
        except CommandRejected:
            self._rejected += 1
            raise

    async def _execute(
        self, request: CommandRequest, source: Source, *, wait: bool
    ) -> CommandRecord:
        self._running()
        command_id = request.id
        while True:
            claim = self._claims.get(command_id)
            if claim is not None:
                await claim.wait()
                continue
            claim = self._claims[command_id] = trio.Event()
            try:
                existing = await self._find(command_id)
                if existing is None:
                    return await self._accept(request, source, claim, wait=wait)
            finally:
                if self._claims.get(command_id) is claim:
                    del self._claims[command_id]
                    claim.set()
            if not _same_command(existing.request, request):
                raise CommandRejected(
                    409,
                    "id-conflict",
                    f"id {show(command_id)} was used for another command ({existing.request.name}"
                    f" on {existing.request.target}, {existing.state.value}): send this command "
                    "under a new id",
                )
            record = await self._replay(
                existing, trio.current_time() + (request.timeout if wait else 0.0)
            )
            if record is not None:
                return record
            # Removed (its bus was down): nothing ran, so this request may run now.

    async def _replay(self, record: CommandRecord, deadline: float) -> CommandRecord | None:
        """The record of a known id, once final or at ``deadline`` (Trio time; at once for a
        device that is offline); None when it was removed meanwhile."""
        command_id = record.request.id
        target = record.request.target
        with trio.move_on_at(deadline):
            while command_id in self._open:
                devices = self._devices()
                if (
                    isinstance(target, DeviceTarget)
                    and self._open[command_id].state is CommandState.PENDING
                    and (devices is None or not devices.connected(target.client_id))
                ):
                    break
                await self._wait_changed(command_id)
                self._running()
        return await self._find(command_id)

    async def _accept(
        self, request: CommandRequest, source: Source, claim: trio.Event, *, wait: bool
    ) -> CommandRecord:
        """A new command: check it, record it as pending (on disk before anything runs or
        is answered) and run it."""
        self._running()
        now = self._wall()
        if request.expires <= now:
            raise CommandRejected(
                422,
                "expired",
                f"expires: {iso_utc(request.expires)} has passed (the gateway's time is "
                f"{iso_utc(now)}): send a later time, or leave expires out",
            )
        target = request.target
        devices = None
        if isinstance(target, ModbusTarget):
            self._modbus.check_write(target, request.value)
        else:
            devices = self._devices()
            if devices is None:
                raise CommandRejected(
                    404,
                    "unknown-target",
                    f"target {target}: no device plane configured: configure [device_plane] "
                    "with this client, or send to a modbus: target",
                )
            if not devices.known(target.client_id):
                raise CommandRejected(
                    404,
                    "unknown-target",
                    f"target {target}: no client {show(target.client_id)} in "
                    "[[device_plane.clients]]: check the client id",
                )
        if len(self._open) >= self._max_records:
            raise Unavailable(
                f"{len(self._open)} commands are still open (pending or delivered): wait for "
                "them to be answered or expire"
            )
        now = self._wall()
        record = CommandRecord(request, source, CommandState.PENDING, now, now, status=202)
        outcome = _Outcome()
        self._counts[CommandState.PENDING.value] += 1
        self._put(record)
        # Shielded: once on disk the command runs, even if this caller goes away meanwhile.
        with trio.CancelScope(shield=True):
            try:
                await self._flush()
                nursery = self._running()
            except (CommandStoreError, Unavailable) as e:
                # Not stored, or the router stopped meanwhile: nothing runs, the id is free.
                self._remove(record)
                raise Unavailable(f"the command could not be accepted: {e}") from None
            self._executed += 1
            if isinstance(target, ModbusTarget):
                nursery.start_soon(self._run_modbus, record, outcome)
            else:
                log.info(
                    "command accepted for a device",
                    extra=kv(
                        id=request.id,
                        target=target,
                        source=source.value,
                        name=request.name,
                        args=_excerpt(request.args),
                    ),
                )
                self._sweep_wakeup.set()
        # Known now (in memory): another execute with this id finds it without the claim.
        del self._claims[request.id]
        claim.set()
        if isinstance(target, ModbusTarget):
            await outcome.done.wait()
            if outcome.error is not None:
                raise outcome.error
            assert outcome.record is not None
            return outcome.record
        assert devices is not None
        if not devices.connected(target.client_id):
            return record  # 202: delivered when the device connects
        self._kick(target.client_id)
        if not wait:
            return record
        deadline = trio.current_time() + request.timeout
        return await self._replay(record, deadline) or record

    async def _run_modbus(self, record: CommandRecord, outcome: _Outcome) -> None:
        request = record.request
        target = request.target
        assert isinstance(target, ModbusTarget)
        written = False
        held: Value = request.value
        try:
            try:
                # What the point will hold: a register's resolution may round the value.
                held = self._modbus.check_write(target, request.value)
                with trio.fail_after(request.timeout):
                    await self._modbus.write(target, request.value)
                    written = True
                    result: dict[str, object] = {"written": held}
                    if held != request.value:
                        result["requested"] = request.value
                    if request.read_back:
                        result["read_back"] = _same_number(await self._modbus.read(target), held)
            except (Unavailable, CommandRejected) as e:
                if not written:  # nothing ran: forget it, the caller may send it again
                    self._remove(record)
                    outcome.error = e
                    log.warning(
                        "command not executed: %s",
                        e,
                        extra=kv(id=request.id, target=target, source=record.source.value),
                    )
                    return
                outcome.record = self._change(
                    record,
                    CommandState.FAILED,
                    self._wall(),
                    status=502,
                    result={"written": held},
                    error=f"written, but reading it back failed: {e}",
                )
            except OutcomeUnknown as e:
                outcome.record = self._change(
                    record, CommandState.FAILED, self._wall(), status=504, error=str(e)
                )
            except trio.TooSlowError:
                outcome.record = self._change(
                    record,
                    CommandState.FAILED,
                    self._wall(),
                    status=504,
                    result={"written": held} if written else None,
                    error=(
                        f"written, but reading it back gave no result within {request.timeout:g}s"
                        if written
                        else f"no result within {request.timeout:g}s; the write may or may not "
                        "have happened"
                    ),
                )
            except Exception as e:  # the bus's WriteError (drivers are not imported here)
                outcome.record = self._change(
                    record,
                    CommandState.FAILED,
                    self._wall(),
                    status=502,
                    result={"written": held} if written else None,
                    error=(f"written, but reading it back failed: {e}" if written else str(e))
                    or type(e).__name__,
                )
            else:
                outcome.record = self._change(
                    record, CommandState.DONE, self._wall(), status=200, result=result
                )
            await self._persist()
        finally:
            if outcome.record is None and outcome.error is None:
                outcome.error = Unavailable("the gateway stopped during the write")
            outcome.done.set()

    # -- devices

    def _kick(self, client_id: str) -> None:
        """Deliver the client's pending commands, oldest first (one task per client)."""
        if client_id in self._delivering:
            self._delivering[client_id] = True
            return
        if self._nursery is None:
            return
        self._delivering[client_id] = False
        self._nursery.start_soon(self._deliver, client_id)

    async def _deliver(self, client_id: str) -> None:
        try:
            while True:
                self._delivering[client_id] = False
                pending = [
                    r
                    for r in self._open.values()
                    if r.request.target == DeviceTarget(client_id)
                    and r.state is CommandState.PENDING
                ]
                for record in sorted(pending, key=lambda r: r.created):
                    devices = self._devices()
                    if devices is None:
                        return
                    command_id = record.request.id
                    current = self._open.get(command_id)
                    if current is None or current.state is not CommandState.PENDING:
                        continue
                    if current.request.expires <= self._wall():
                        self._expire(current)
                        self._persist_soon()
                        continue
                    try:
                        sent = await devices.send_command(client_id, current.request)
                    except Exception:
                        log.exception(
                            "command could not be sent to the device; it stays pending",
                            extra=kv(id=command_id, client=client_id),
                        )
                        return
                    if not sent:
                        break  # gone again: the next connection gets it
                    current = self._open.get(command_id)
                    if current is not None and current.state is CommandState.PENDING:
                        self._change(current, CommandState.DELIVERED, self._wall())
                        self._persist_soon()
                if not self._delivering.get(client_id):
                    return
        finally:
            self._delivering.pop(client_id, None)

    def device_connected(self, client_id: str) -> None:
        # A command delivered on an earlier connection but not acknowledged may never have
        # reached the device (the connection dropped with the frame queued, or the ack was
        # lost): it goes again, as after a restart. Devices execute a command_id once
        # (docs/protocol.md), so a second copy costs them nothing.
        now = self._wall()
        resent = False
        for record in list(self._open.values()):
            if (
                record.request.target == DeviceTarget(client_id)
                and record.state is CommandState.DELIVERED
            ):
                self._change(record, CommandState.PENDING, now)
                resent = True
        if resent:
            self._persist_soon()
        self._kick(client_id)

    def device_acked(
        self, client_id: str, command_id: str, ok: bool, result: Json, error: str | None
    ) -> bool:
        record = self._open.get(command_id)
        if (
            record is None
            or self._nursery is None
            or record.request.target != DeviceTarget(client_id)
        ):
            self._unmatched += 1
            return False
        if ok:
            self._change(record, CommandState.DONE, self._wall(), status=200, result=result)
        else:
            self._change(
                record,
                CommandState.FAILED,
                self._wall(),
                status=502,
                error=error or "the device answered that it failed",
            )
        self._persist_soon()
        return True

    # -- expiry

    def _expire(self, record: CommandRecord) -> None:
        what = "delivered" if record.state is CommandState.PENDING else "answered"
        self._change(
            record,
            CommandState.EXPIRED,
            self._wall(),
            status=410,
            error=f"not {what} before {iso_utc(record.request.expires)}",
        )

    async def _sweep(self) -> None:
        """Expire open device commands at their ``expires``: sleeps until the next one (or
        until a new command comes), never polls."""
        while True:
            self._sweep_wakeup = trio.Event()
            now = self._wall()
            expired = [
                r
                for r in self._open.values()
                if isinstance(r.request.target, DeviceTarget) and r.request.expires <= now
            ]
            for record in expired:
                self._expire(record)
            if expired:
                # Written in the background: the sweep goes back to sleep at once.
                self._persist_soon()
                continue
            upcoming = [
                r.request.expires
                for r in self._open.values()
                if isinstance(r.request.target, DeviceTarget)
            ]
            if not upcoming:  # nothing to expire: sleep until a command comes
                await self._sweep_wakeup.wait()
                continue
            delay = min(min(upcoming) - now, MAX_SWEEP_SLEEP)
            with trio.move_on_at(trio.current_time() + max(0.0, delay)):
                await self._sweep_wakeup.wait()

    # -- commands in CPI's responses

    async def from_cpi(self, commands: Sequence[object]) -> None:
        """The forwarder's hook: parse each command of a CPI response and execute them in
        the background, in order (a device's ack is not waited for). A bad one is logged and
        skipped; this never raises for bad input."""
        requests = []
        now = self._wall()
        for i, data in enumerate(commands):
            try:
                requests.append(command_from_object(data, now=now, limits=self.limits))
            except CommandRejected as e:
                self._rejected += 1
                command_id = data.get("id") if isinstance(data, dict) else None
                log.warning(
                    "command from CPI refused: %s",
                    e.message,
                    extra=kv(
                        index=i,
                        code=e.code,
                        **({"id": command_id} if isinstance(command_id, str) else {}),
                    ),
                )
        if not requests:
            await trio.lowlevel.checkpoint()
            return
        if self._nursery is None:
            log.error(
                "commands from CPI not executed: the command router is not running",
                extra=kv(ids=",".join(r.id for r in requests)),
            )
            await trio.lowlevel.checkpoint()
            return
        self._nursery.start_soon(self._run_cpi, requests)
        await trio.lowlevel.checkpoint()

    async def _run_cpi(self, requests: list[CommandRequest]) -> None:
        for request in requests:
            try:
                await self._execute(request, Source.CPI, wait=False)
            except CommandRejected as e:
                self._rejected += 1
                log.warning(
                    "command from CPI refused: %s",
                    e.message,
                    extra=kv(id=request.id, target=request.target, code=e.code),
                )
            except Unavailable as e:
                log.warning(
                    "command from CPI not executed: %s",
                    e,
                    extra=kv(id=request.id, target=request.target),
                )
