"""The command router and the parsing of command bodies: every bad input with its status and
code; a real SQLite file in ``tmp_path``; small fakes of the buses (``ModbusTargets``) and the
device plane (``DeviceTargets``) written here. End-to-end tests with pymodbus and websockets
live with the API."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from gateway.commands import (
    CommandLimits,
    CommandRouter,
    CommandStoreError,
    command_from_object,
    error_xml,
    parse_command,
    record_json,
    record_xml,
    records_xml,
)
from gateway.core.commands import (
    CommandRecord,
    CommandRejected,
    CommandRequest,
    CommandState,
    DeviceTarget,
    ModbusTarget,
    OutcomeUnknown,
    Source,
    Unavailable,
)
from gateway.core.reading import Value, iso_utc

T0 = 1_800_000_000.0
"""Wall-clock time at Trio time 0 (2027-01-15T08:00:00Z)."""
LIMITS = CommandLimits()


def wall() -> float:
    """The wall clock of these tests: moves with Trio's clock (and the autojump clock)."""
    return T0 + trio.current_time()


def iso(ts: float) -> str:
    return iso_utc(ts)


def rejected(
    body: bytes | object, content_type: str = "application/json", now: float = T0
) -> CommandRejected:
    def parse() -> None:
        if isinstance(body, bytes):
            parse_command(body, content_type, now=now, limits=LIMITS)
        else:
            command_from_object(body, now=now, limits=LIMITS)

    with pytest.raises(CommandRejected) as info:
        parse()
    return info.value


def modbus(id: object = "cpi-1", value: object = 21.5, **fields: object) -> dict[str, object]:
    return {"id": id, "target": "modbus:plc/meter/setpoint", "value": value, **fields}


def device(id: str = "cpi-2", client: str = "hmi-1", **fields: object) -> dict[str, object]:
    return {"id": id, "target": f"device:{client}", "name": "show-message", **fields}


def request(data: dict[str, object]) -> CommandRequest:
    return command_from_object(data, now=wall(), limits=LIMITS)


# ---- parsing -------------------------------------------------------------------------------


def test_json_command_parses() -> None:
    body = json.dumps(
        modbus(timeout=5, expires="2027-01-15T09:00:00Z", read_back=True, name="write")
    ).encode()
    r = parse_command(body, "application/json; charset=utf-8", now=T0, limits=LIMITS)
    assert r == CommandRequest(
        id="cpi-1",
        target=ModbusTarget("plc", "meter", "setpoint"),
        name="write",
        args={},
        value=21.5,
        timeout=5.0,
        expires=T0 + 3600,
        read_back=True,
    )
    d = command_from_object(device(args={"text": "hi"}), now=T0, limits=LIMITS)
    assert d.target == DeviceTarget("hmi-1")
    assert (d.name, d.args, d.value, d.read_back) == ("show-message", {"text": "hi"}, None, False)
    assert d.timeout == LIMITS.default_timeout
    assert d.expires == T0 + LIMITS.default_expiry


def test_timeout_as_duration_and_expires_with_offset() -> None:
    r = command_from_object(
        modbus(timeout="1500ms", expires="2027-01-15T11:00:00.250+02:00"), now=T0, limits=LIMITS
    )
    assert r.timeout == 1.5
    assert r.expires == T0 + 3600.25


def test_json_and_xml_parse_to_equal_requests() -> None:
    json_body = json.dumps(
        modbus("cpi-4711", 21.5, timeout=5, read_back=True, expires="2027-01-15T09:00:00Z")
    ).encode()
    xml_body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<command><id>cpi-4711</id>'
        b"<target>modbus:plc/meter/setpoint</target><value>21.5</value><timeout>5</timeout>"
        b"<expires>2027-01-15T09:00:00Z</expires><read_back>true</read_back></command>"
    )
    as_json = parse_command(json_body, "application/json", now=T0, limits=LIMITS)
    assert parse_command(xml_body, "application/xml", now=T0, limits=LIMITS) == as_json
    assert parse_command(xml_body, "text/xml; charset=UTF-8", now=T0, limits=LIMITS) == as_json

    json_device = json.dumps(
        device(
            "cpi-4712",
            args={
                "text": "hi",
                "n": 3,
                "on": False,
                "none": None,
                "nested": {"a": 1.5, "b": "x y"},
            },
        )
    ).encode()
    xml_device = (
        b"<command><id>cpi-4712</id><target>device:hmi-1</target><name>show-message</name>"
        b"<args><text>hi</text><n>3</n><on>false</on><none>null</none>"
        b"<nested><a>1.5</a><b>x y</b></nested></args></command>"
    )
    assert parse_command(xml_device, "application/xml", now=T0, limits=LIMITS) == parse_command(
        json_device, "application/json", now=T0, limits=LIMITS
    )


def test_xml_text_fields_stay_strings_and_namespaces_are_ignored() -> None:
    body = (
        b'<c:command xmlns:c="urn:edge"><c:id>4711</c:id><c:target>device:hmi-1</c:target>'
        b'<c:name>123</c:name><c:args><c:code>007</c:code><item key="a b">true</item>'
        b"<c:empty/></c:args></c:command>"
    )
    r = parse_command(body, "application/xml", now=T0, limits=LIMITS)
    assert r.id == "4711"
    assert r.name == "123"
    # "007" is not a JSON number, so it stays a string; <item key> carries any key.
    assert r.args == {"code": "007", "a b": True, "empty": ""}


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code", "fragment"),
    [
        (b'{"id": "x"', "application/json", 400, "malformed", "not JSON"),
        (b"\xff\xfe{}", "application/json", 400, "malformed", "UTF-8"),
        (b"[1, 2]", "application/json", 400, "malformed", "is not a command"),
        (b'{"id": "a", "id": "b"}', "application/json", 400, "malformed", "appears twice"),
        (b'{"id": "a", "value": NaN}', "application/json", 400, "malformed", "NaN"),
        (b"<command><id>x</id>", "application/xml", 400, "malformed", "not XML"),
        (b"<order><id>x</id></order>", "application/xml", 400, "malformed", "<order>"),
        (
            b'<command><id a="1">x</id></command>',
            "application/xml",
            400,
            "malformed",
            "attributes",
        ),
        (
            b"<command><args><a>1</a><a>2</a></args></command>",
            "application/xml",
            400,
            "malformed",
            "args.a: appears twice",
        ),
        (b"<command>hello</command>", "application/xml", 400, "malformed", "text"),
        (b"{}", "text/plain", 415, "unsupported-media-type", "application/json"),
        (b"{}", "", 415, "unsupported-media-type", "(none)"),
        (
            b"{}",
            "application/json; charset=iso-8859-1",
            415,
            "unsupported-media-type",
            "UTF-8",
        ),
    ],
)
def test_unreadable_bodies(
    body: bytes, content_type: str, status: int, code: str, fragment: str
) -> None:
    e = rejected(body, content_type)
    assert (e.status, e.code) == (status, code)
    assert fragment in e.message


def test_doctype_and_entities_are_refused_before_parsing() -> None:
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><command><id>&lol2;</id></command>'
    )
    external = (
        b'<!DOCTYPE command [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<command><id>&x;</id></command>"
    )
    for body in (laughs, external, b"<!doctype command><command/>"):
        e = rejected(body, "application/xml")
        assert (e.status, e.code) == (400, "malformed")
        assert "DOCTYPE and ENTITY declarations are not accepted" in e.message


DEEP = {"a": {"b": 1}}


@pytest.mark.parametrize(
    ("data", "status", "code", "message"),
    [
        (
            {"target": "modbus:plc/meter/setpoint", "value": 1},
            400,
            "invalid-field",
            "id: missing: this field is required",
        ),
        (
            modbus(id=""),
            400,
            "invalid-field",
            'id: must not be empty: send an id such as "cpi-4711"',
        ),
        (modbus(id="x" * 129), 400, "invalid-field", "id: "),
        (
            modbus(id="a\nb"),
            400,
            "invalid-field",
            "contains control or invisible format characters",
        ),
        (modbus(id=17), 400, "invalid-field", "id: 17 is not a string"),
        (
            modbus(valeu=1),
            400,
            "invalid-field",
            "valeu: unknown key (did you mean 'value'?)",
        ),
        (modbus(timeout=True), 400, "invalid-field", "timeout: true is not a timeout"),
        (modbus(timeout="soon"), 400, "invalid-field", 'timeout: "soon" is not a duration'),
        (modbus(read_back="yes"), 400, "invalid-field", 'read_back: "yes" is not true or false'),
        (modbus(expires=1800000000), 400, "invalid-field", "expires: 1800000000 is not a time"),
        (modbus(expires="tomorrow"), 400, "invalid-field", "is not an ISO 8601 time"),
        (modbus(expires="2027-01-15T09:00:00"), 400, "invalid-field", "has no time zone"),
        (modbus(value=[1]), 400, "invalid-field", "value: a list is not a number"),
        (modbus(value=None), 400, "invalid-field", "value: missing: a Modbus target needs"),
        (modbus(name="toggle"), 400, "invalid-field", 'name: "toggle": a Modbus target takes'),
        (modbus(args={"a": 1}), 400, "invalid-field", "args: only for device targets"),
        (device(name=None), 400, "invalid-field", "name: missing: a device command needs"),
        (device(name=""), 400, "invalid-field", "name: must not be empty"),
        (device(name="n" * 65), 400, "invalid-field", "at most 64 characters"),
        (device(value=1), 400, "invalid-field", "value: only for Modbus targets"),
        (device(read_back=True), 400, "invalid-field", "read_back: only for Modbus targets"),
        (device(args=[1]), 400, "invalid-field", "args: a list is not an object"),
        (device(args={"x": float("inf")}), 400, "invalid-field", "args: contains inf"),
        (modbus(target="opcua:x/y/z"), 400, "bad-target", "is not a target: send modbus:"),
        (modbus(target="modbus:plc/meter"), 400, "bad-target", "has 2 level(s)"),
        (modbus(target="modbus:plc//setpoint"), 400, "bad-target", "the device of"),
        (modbus(target="modbus:plc/meter/set point"), 400, "bad-target", "the point of"),
        (device(client=""), 400, "bad-target", "the client id of"),
        (device(client="a/b"), 400, "bad-target", "the client id of"),
        (modbus(target=5), 400, "invalid-field", "target: 5 is not a string"),
        (modbus(value="x" * 20_000), 413, "too-large", "at most 16384"),
        (device(args={"blob": "x" * 20_000}), 413, "too-large", "args and value are"),
        (modbus(id="a\u202eb"), 400, "invalid-field", "invisible format characters"),
        (modbus(id="a\u2028b"), 400, "invalid-field", "control or invisible"),
        (modbus(id=" cpi-1"), 400, "invalid-field", "starts or ends with spaces"),
        (modbus(timeout=0), 422, "bad-timeout", "timeout: 0s: send at least 0.1s and at most 60s"),
        (modbus(timeout=1e-300), 422, "bad-timeout", "send at least 0.1s"),
        (modbus(timeout="2min"), 422, "bad-timeout", "timeout: 120s"),
        # Beyond what parse_duration or a float takes: still a timeout, far above the limit.
        (modbus(timeout="400d"), 422, "bad-timeout", '"400d" is far too long: at most 60s'),
        (modbus(timeout=10**400), 422, "bad-timeout", "digits is far too long: at most 60s"),
        (modbus(timeout="9" * 400 + "s"), 422, "bad-timeout", "is far too long: at most 60s"),
        (modbus(timeout=-(10**400)), 400, "invalid-field", "digits is not a timeout"),
        (modbus(expires="2027-01-23T08:00:00Z"), 422, "bad-expires", "more than 7 days ahead"),
        (
            modbus(expires="9999-12-31T23:59:59-23:59"),  # year 10000 in UTC
            422,
            "bad-expires",
            "expires: 10000-01-01T23:58:59.000Z is more than 7 days ahead",
        ),
        ("a string", 400, "malformed", '"a string" is not a command'),
    ],
)
def test_bad_fields(data: object, status: int, code: str, message: str) -> None:
    e = rejected(data)
    assert (e.status, e.code) == (status, code), e.message
    assert message in e.message


def test_several_problems_in_one_message_misspelt_key_first() -> None:
    e = rejected({"id": 5, "target": "device:hmi-1", "nmae": "x", "args": 3})
    assert e.message.startswith("nmae: unknown key (did you mean 'name'?)")
    assert "id: 5 is not a string" in e.message
    assert "args: 3 is not an object" in e.message


def test_xml_values_follow_json_rules() -> None:
    xml = b"<command><id>a</id><target>modbus:plc/meter/setpoint</target><value/></command>"
    # An empty element is the empty string: a value to write (the bus's check decides).
    assert parse_command(xml, "application/xml", now=T0, limits=LIMITS).value == ""
    e = rejected(
        b"<command><id>a</id><target>modbus:plc/meter/setpoint</target><value>1</value>"
        b"<timeout>0</timeout></command>",
        "application/xml",
    )
    assert (e.status, e.code) == (422, "bad-timeout")
    e = rejected(
        b"<command><id>a</id><target>modbus:plc/meter/setpoint</target><value>null</value>"
        b"</command>",
        "application/xml",
    )
    assert (e.status, e.code) == (400, "invalid-field")


def record(
    r: CommandRequest,
    state: CommandState = CommandState.DONE,
    result: object = None,
    error: str | None = None,
) -> CommandRecord:
    return CommandRecord(r, Source.API, state, T0 + 0.1234, T0 + 1.5, result, error, 200)


def test_record_json_shape() -> None:
    r = command_from_object(modbus("cpi/4711 x"), now=T0, limits=LIMITS)
    data = record_json(record(r, result={"written": 21.5, "read_back": 21.5}))
    assert data == {
        "id": "cpi/4711 x",
        "target": "modbus:plc/meter/setpoint",
        "name": "write",
        "args": {},
        "value": 21.5,
        "state": "done",
        "result": {"written": 21.5, "read_back": 21.5},
        "error": None,
        "source": "api",
        "created": "2027-01-15T08:00:00.123Z",
        "updated": "2027-01-15T08:00:01.500Z",
        "expires": "2027-01-15T09:00:00.000Z",
        "status_url": "/api/v1/commands/cpi%2F4711%20x",
    }
    json.dumps(data, allow_nan=False)


def test_record_xml_shape() -> None:
    r = command_from_object(device("cpi-9", args={"text": "<hi>"}), now=T0, limits=LIMITS)
    result = {"pos": 50, "ok": True, "two words": [1, None, "a\x01b"], "xmlish": "x"}
    doc = record_xml(record(r, CommandState.FAILED, result, "valve in manual mode"))
    assert doc.startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    root = ET.fromstring(doc)
    assert root.tag == "command"
    assert [c.tag for c in root] == list(record_json(record(r)))
    assert root.findtext("state") == "failed"
    assert root.findtext("error") == "valve in manual mode"
    assert root.findtext("args/text") == "<hi>"
    res = root.find("result")
    assert res is not None
    assert res.findtext("pos") == "50"
    assert res.findtext("ok") == "true"
    items = res.findall("item")
    keyed = {i.get("key"): i for i in items}
    assert set(keyed) == {"two words", "xmlish"}  # names starting with "xml" are reserved
    assert [i.text for i in keyed["two words"].findall("item")] == ["1", None, "a\ufffdb"]
    value = root.find("value")
    assert value is not None
    assert value.text is None  # null: an empty element


def test_records_xml_is_each_record_xml_in_one_document(monkeypatch: pytest.MonkeyPatch) -> None:
    records = [
        record(command_from_object(device(f"c-{n}", args={"text": "<hi>"}), now=T0, limits=LIMITS))
        for n in range(3)
    ]
    expected = [ET.tostring(ET.fromstring(record_xml(r))) for r in records]

    def no_parsing(*args: object) -> None:
        raise AssertionError("records_xml parses XML: it should build the elements once")

    monkeypatch.setattr(ET, "fromstring", no_parsing)
    monkeypatch.setattr(ET, "XML", no_parsing)
    doc = records_xml(records)
    monkeypatch.undo()
    assert doc.startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    root = ET.fromstring(doc)
    assert root.tag == "commands"
    assert [ET.tostring(c) for c in root] == expected
    assert ET.fromstring(records_xml([])).tag == "commands"


def test_error_xml() -> None:
    root = ET.fromstring(error_xml("malformed", "not XML: <x> & more"))
    assert [(c.tag, c.text) for c in root] == [
        ("code", "malformed"),
        ("message", "not XML: <x> & more"),
    ]


# ---- fakes ---------------------------------------------------------------------------------


class FakeModbus:
    """``ModbusTargets`` over a dict of points. ``gate``: writes wait for it; ``fail``: the
    next writes raise it."""

    def __init__(self) -> None:
        self.points: dict[str, Value] = {"plc/meter/setpoint": 0.0, "plc/meter/limit": 0.0}
        self.writes: list[tuple[str, Value]] = []
        self.gate: trio.Event | None = None
        self.write_started = trio.Event()
        self.written = trio.Event()
        self.fail: Exception | None = None
        self.hang_read = False

    @staticmethod
    def key(target: ModbusTarget) -> str:
        return f"{target.bus}/{target.device}/{target.point}"

    def check_write(self, target: ModbusTarget, value: Value) -> Value:
        if self.key(target) not in self.points:
            raise CommandRejected(404, "unknown-target", f"no point {target}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CommandRejected(422, "wrong-type", f"{value!r} is not a number")
        return round(value, 1)  # a register with a resolution of 0.1

    async def write(self, target: ModbusTarget, value: Value) -> None:
        self.write_started.set()
        if self.gate is not None:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        if self.fail is not None:
            raise self.fail
        self.writes.append((self.key(target), value))
        self.points[self.key(target)] = value
        self.written.set()

    async def read(self, target: ModbusTarget) -> Value:
        if self.hang_read:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        return self.points[self.key(target)]


class FakeDevices:
    """``DeviceTargets``: clients ``hmi-1`` and ``hmi-2``; ``online`` says who is connected.
    Every command sent is recorded and announced on ``sent_event``."""

    def __init__(self) -> None:
        self.clients = {"hmi-1", "hmi-2"}
        self.online: set[str] = set()
        self.sent: list[tuple[str, str]] = []
        self.sent_event = trio.Event()

    def known(self, client_id: str) -> bool:
        return client_id in self.clients

    def connected(self, client_id: str) -> bool:
        return client_id in self.online

    async def send_command(self, client_id: str, request: CommandRequest) -> bool:
        await trio.lowlevel.checkpoint()
        if client_id not in self.online:
            return False
        self.sent.append((client_id, request.id))
        self.sent_event.set()
        self.sent_event = trio.Event()
        return True

    async def wait_sent(self, n: int) -> None:
        while len(self.sent) < n:
            await self.sent_event.wait()


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "commands.sqlite3"


@pytest.fixture
def bus() -> FakeModbus:
    return FakeModbus()


@pytest.fixture
def devices() -> FakeDevices:
    return FakeDevices()


def background(nursery: trio.Nursery, call: Awaitable[CommandRecord]) -> list[CommandRecord]:
    """Runs ``call`` in ``nursery``; the list gets its result."""
    results: list[CommandRecord] = []

    async def run() -> None:
        results.append(await call)

    nursery.start_soon(run)
    return results


async def jump(clock: trio.testing.MockClock, seconds: float) -> None:
    """Moves Trio's clock (and so the tests' wall clock); returns once every task reacted."""
    await trio.testing.wait_all_tasks_blocked()
    clock.jump(seconds)
    await trio.testing.wait_all_tasks_blocked()


@contextlib.asynccontextmanager
async def running(
    db: Path,
    bus: FakeModbus,
    devices: FakeDevices | None,
    clock: Callable[[], float] = wall,
    **kwargs: object,
) -> AsyncIterator[CommandRouter]:
    router = CommandRouter(db, bus, lambda: devices, wall_clock=clock, **kwargs)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        yield router
        nursery.cancel_scope.cancel()


# ---- Modbus --------------------------------------------------------------------------------


async def test_write_done_with_read_back(db: Path, bus: FakeModbus, devices: FakeDevices) -> None:
    async with running(db, bus, devices) as router:
        rec = await router.execute(request(modbus(value=23.0, read_back=True)), Source.API)
        assert (rec.state, rec.status) == (CommandState.DONE, 200)
        assert rec.result == {"written": 23.0, "read_back": 23.0}
        plain = await router.execute(request(modbus("cpi-2", 24)), Source.CPI)
        assert plain.result == {"written": 24}
        assert plain.source is Source.CPI
        assert bus.writes == [("plc/meter/setpoint", 23.0), ("plc/meter/setpoint", 24)]
        stats = router.statistics()
        assert stats.by_state == {
            "pending": 0,
            "delivered": 0,
            "done": 2,
            "failed": 0,
            "expired": 0,
        }
        assert stats.executed == 2


async def test_the_result_says_what_the_point_holds_when_its_resolution_rounds(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    async with running(db, bus, devices) as router:
        rec = await router.execute(request(modbus(value=12.34)), Source.API)
    assert rec.state is CommandState.DONE
    assert rec.result == {"written": 12.3, "requested": 12.34}


async def test_a_write_without_a_clear_answer_is_504_may_or_may_not(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    bus.fail = OutcomeUnknown("plc/meter/setpoint: no response within 1s; the write may or may "
                              "not have happened")  # fmt: skip
    async with running(db, bus, devices) as router:
        rec = await router.execute(request(modbus()), Source.API)
    assert (rec.state, rec.status) == (CommandState.FAILED, 504)
    assert rec.error is not None
    assert "may or may not" in rec.error


async def test_write_error_is_failed_502(db: Path, bus: FakeModbus, devices: FakeDevices) -> None:
    bus.fail = RuntimeError("exception 02 illegal data address")  # as a WriteError would be
    async with running(db, bus, devices) as router:
        rec = await router.execute(request(modbus()), Source.API)
        assert (rec.state, rec.status) == (CommandState.FAILED, 502)
        assert rec.error == "exception 02 illegal data address"
        assert rec.result is None
        # Recorded: a repeat gets the same answer without writing again.
        bus.fail = None
        again = await router.execute(request(modbus()), Source.API)
        assert again == rec
        assert bus.writes == []


async def test_an_expired_command_is_refused_but_a_repeat_of_one_that_ran_is_not(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    now = [wall()]
    async with running(db, bus, devices, clock=lambda: now[0]) as router:
        past = command_from_object(
            modbus("late", expires=iso_utc(now[0] - 1)), now=now[0] - 3600, limits=LIMITS
        )
        with pytest.raises(CommandRejected) as info:
            await router.execute(past, Source.API)
        assert (info.value.status, info.value.code) == (422, "expired")
        assert f"{iso_utc(now[0] - 1)} has passed" in info.value.message
        assert bus.writes == []
        # Ran before its expires; CPI retries after the answer was lost, later than that:
        # the first result, not "refused" (the write happened).
        soon = command_from_object(
            modbus("ran", expires=iso_utc(now[0] + 3)), now=now[0], limits=LIMITS
        )
        first = await router.execute(soon, Source.API)
        assert first.state is CommandState.DONE
        now[0] += 10
        assert await router.execute(soon, Source.API) == first
        assert len(bus.writes) == 1


async def test_write_timeout_is_failed_504(
    db: Path, bus: FakeModbus, devices: FakeDevices, mock_clock: trio.testing.MockClock
) -> None:
    bus.gate = trio.Event()  # never set: the write hangs
    async with running(db, bus, devices) as router, trio.open_nursery() as nursery:
        results = background(nursery, router.execute(request(modbus(timeout=5)), Source.API))
        await bus.write_started.wait()
        await jump(mock_clock, 4.9)
        assert results == []
        await jump(mock_clock, 0.1)
    [rec] = results
    assert (rec.state, rec.status) == (CommandState.FAILED, 504)
    assert rec.error == "no result within 5s; the write may or may not have happened"


async def test_read_back_timeout_says_it_was_written(
    db: Path, bus: FakeModbus, devices: FakeDevices, mock_clock: trio.testing.MockClock
) -> None:
    bus.hang_read = True
    async with running(db, bus, devices) as router, trio.open_nursery() as nursery:
        req = request(modbus(timeout=2, read_back=True))
        results = background(nursery, router.execute(req, Source.API))
        await bus.written.wait()
        await jump(mock_clock, 2)
    [rec] = results
    assert (rec.state, rec.status) == (CommandState.FAILED, 504)
    assert rec.result == {"written": 21.5}
    assert rec.error == "written, but reading it back gave no result within 2s"


async def test_bus_down_is_not_recorded(db: Path, bus: FakeModbus, devices: FakeDevices) -> None:
    bus.fail = Unavailable("bus plc is down: connection refused")
    async with running(db, bus, devices) as router:
        with pytest.raises(Unavailable, match="connection refused"):
            await router.execute(request(modbus()), Source.API)
        assert await router.get("cpi-1") is None
        assert router.statistics().by_state["pending"] == 0
        # Nothing ran: the same id may be sent again once the bus is back.
        bus.fail = None
        rec = await router.execute(request(modbus()), Source.API)
        assert rec.state is CommandState.DONE
        assert bus.writes == [("plc/meter/setpoint", 21.5)]
    async with running(db, bus, devices) as router:
        assert (await router.get("cpi-1")) == rec


async def test_rejections_are_not_recorded(db: Path, bus: FakeModbus, devices: FakeDevices) -> None:
    async with running(db, bus, devices) as router:
        with pytest.raises(CommandRejected) as info:
            await router.execute(request(modbus(value="high")), Source.API)
        assert (info.value.status, info.value.code) == (422, "wrong-type")
        with pytest.raises(CommandRejected) as info:
            await router.execute(request(modbus(target="modbus:plc/meter/nothing")), Source.API)
        assert (info.value.status, info.value.code) == (404, "unknown-target")
        assert await router.get("cpi-1") is None
        assert router.statistics().rejected == 2
        assert router.statistics().executed == 0
        assert bus.write_started.is_set() is False


async def test_replay_returns_the_record_without_writing_again(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    async with running(db, bus, devices) as router:
        first = await router.execute(request(modbus(timeout=5)), Source.API)
        # timeout and expires are not part of the command: they default from the clock.
        second = await router.execute(request(modbus(timeout=7)), Source.CPI)
        assert second == first
        assert bus.writes == [("plc/meter/setpoint", 21.5)]
        assert router.statistics().executed == 1


async def test_same_id_for_another_command_is_409(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    async with running(db, bus, devices) as router:
        await router.execute(request(modbus(value=1)), Source.API)
        for other in (
            modbus(value=2),
            modbus(value=1.0),  # another JSON value than 1
            modbus(value=True),
            modbus(value=1, read_back=True),
            modbus(value=1, target="modbus:plc/meter/limit"),
            device("cpi-1"),
        ):
            with pytest.raises(CommandRejected) as info:
                await router.execute(request(other), Source.API)
            assert (info.value.status, info.value.code) == (409, "id-conflict")
            assert '"cpi-1" was used for another command (write on modbus:plc/meter/setpoint' in (
                info.value.message
            )
        assert bus.writes == [("plc/meter/setpoint", 1)]
        assert router.statistics().rejected == 6


async def test_concurrent_executes_of_one_id_write_once(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    bus.gate = trio.Event()
    results: list[CommandRecord] = []
    async with running(db, bus, devices) as router:

        async def send() -> None:
            results.append(await router.execute(request(modbus()), Source.API))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(send)
            await bus.write_started.wait()
            await trio.testing.wait_all_tasks_blocked()
            bus.gate.set()
    assert len(results) == 2
    assert results[0] == results[1]
    assert results[0].state is CommandState.DONE
    assert bus.writes == [("plc/meter/setpoint", 21.5)]


async def test_a_cancelled_caller_does_not_cancel_the_write(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    bus.gate = trio.Event()
    async with running(db, bus, devices) as router:
        async with trio.open_nursery() as nursery:
            caller = trio.CancelScope()

            async def client() -> None:
                with caller:
                    await router.execute(request(modbus()), Source.API)
                    pytest.fail("the caller was to be cancelled")

            nursery.start_soon(client)
            await bus.write_started.wait()
            caller.cancel()  # the HTTP client went away mid-write
        assert caller.cancelled_caught
        bus.gate.set()
        # The write goes on in the router's nursery; a repeat waits for its outcome.
        rec = await router.execute(request(modbus()), Source.API)
        assert rec.state is CommandState.DONE
        assert bus.writes == [("plc/meter/setpoint", 21.5)]


async def test_a_write_cut_by_a_stop_is_failed_after_restart(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    bus.gate = trio.Event()
    errors: list[Exception] = []
    router = CommandRouter(db, bus, lambda: devices, wall_clock=wall)
    async with trio.open_nursery() as outer:
        router_scope = trio.CancelScope()

        async def run_router(task_status: trio.TaskStatus[None]) -> None:
            with router_scope:
                await router.run(task_status=task_status)

        await outer.start(run_router)

        async def client() -> None:
            try:
                await router.execute(request(modbus()), Source.API)
            except Unavailable as e:
                errors.append(e)

        outer.start_soon(client)
        await bus.write_started.wait()
        router_scope.cancel()  # the gateway stops while the write hangs
    assert [str(e) for e in errors] == ["the gateway stopped during the write"]
    async with running(db, bus, devices) as again:
        rec = await again.get("cpi-1")
        assert rec is not None
        assert (rec.state, rec.status) == (CommandState.FAILED, 504)
        assert rec.error == "the gateway stopped during the write; it may or may not have happened"


async def test_not_running_is_unavailable(db: Path, bus: FakeModbus, devices: FakeDevices) -> None:
    router = CommandRouter(db, bus, lambda: devices, wall_clock=wall)
    with pytest.raises(Unavailable, match="not running"):
        await router.execute(request(modbus()), Source.API)
    assert router.condition().state.value == "starting"


# ---- devices -------------------------------------------------------------------------------


async def test_offline_device_pending_then_delivered_on_connect_then_acked(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    async with running(db, bus, devices) as router:
        with trio.fail_after(1):  # offline: answered at once, not after the timeout
            rec = await router.execute(request(device(args={"text": "hi"})), Source.API)
        assert (rec.state, rec.status) == (CommandState.PENDING, 202)
        assert devices.sent == []
        devices.online.add("hmi-1")
        router.device_connected("hmi-1")
        await devices.wait_sent(1)
        await trio.testing.wait_all_tasks_blocked()
        delivered = await router.get("cpi-2")
        assert delivered is not None
        assert (delivered.state, delivered.status) == (CommandState.DELIVERED, 202)
        assert router.device_acked("hmi-1", "cpi-2", True, {"shown": True}, None)
        done = await router.get("cpi-2")
        assert done is not None
        assert (done.state, done.status, done.result) == (CommandState.DONE, 200, {"shown": True})
        # A second ack for a final command matches nothing.
        assert not router.device_acked("hmi-1", "cpi-2", True, None, None)
    async with running(db, bus, devices) as router:
        assert await router.get("cpi-2") == done


async def test_a_delivered_command_without_ack_goes_again_on_reconnect(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    # The connection dropped after the command was queued to it: the device may never have
    # seen it. Its next connection gets it again (devices execute a command_id once).
    devices.online.add("hmi-1")
    async with running(db, bus, devices) as router:
        rec = await router.execute(request(device(timeout=0.1)), Source.API)
        assert rec.state is CommandState.DELIVERED
        assert devices.sent == [("hmi-1", "cpi-2")]
        router.device_connected("hmi-1")  # it reconnected
        await devices.wait_sent(2)
        assert devices.sent == [("hmi-1", "cpi-2")] * 2
        await trio.testing.wait_all_tasks_blocked()
        again = await router.get("cpi-2")
        assert again is not None
        assert again.state is CommandState.DELIVERED
        assert router.device_acked("hmi-1", "cpi-2", True, None, None)
        router.device_connected("hmi-1")  # a final command does not go again
        await trio.testing.wait_all_tasks_blocked()
        assert len(devices.sent) == 2


async def test_online_device_acks_within_timeout(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    devices.online.add("hmi-1")
    async with running(db, bus, devices) as router:

        async def device_answers() -> None:
            await devices.wait_sent(1)
            assert router.device_acked("hmi-1", "cpi-2", False, None, "screen is off")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(device_answers)
            rec = await router.execute(request(device(timeout=30)), Source.API)
        assert (rec.state, rec.status, rec.error) == (CommandState.FAILED, 502, "screen is off")


async def test_late_ack_after_202(
    db: Path, bus: FakeModbus, devices: FakeDevices, mock_clock: trio.testing.MockClock
) -> None:
    devices.online.add("hmi-1")
    async with running(db, bus, devices) as router:
        async with trio.open_nursery() as nursery:
            first = background(nursery, router.execute(request(device(timeout=3)), Source.API))
            await devices.wait_sent(1)
            await jump(mock_clock, 1)
            # A repeat of the id waits too (up to its own timeout).
            second = background(nursery, router.execute(request(device(timeout=5)), Source.API))
            await jump(mock_clock, 1.9)
            assert first == second == []
            await jump(mock_clock, 0.1)
            assert len(first) == 1
            assert second == []
            await jump(mock_clock, 4)
        assert (first[0].state, first[0].status) == (CommandState.DELIVERED, 202)
        assert second == first
        assert devices.sent == [("hmi-1", "cpi-2")]
        assert router.device_acked("hmi-1", "cpi-2", True, [1, 2], None)
        rec = await router.get("cpi-2")
        assert rec is not None
        assert (rec.state, rec.status, rec.result) == (CommandState.DONE, 200, [1, 2])


async def test_unmatched_acks(db: Path, bus: FakeModbus, devices: FakeDevices) -> None:
    async with running(db, bus, devices) as router:
        await router.execute(request(device()), Source.API)
        assert not router.device_acked("hmi-1", "nothing", True, None, None)
        assert not router.device_acked("hmi-2", "cpi-2", True, None, None)  # another client's
        await router.execute(request(modbus("m-1")), Source.API)
        assert not router.device_acked("hmi-1", "m-1", True, None, None)
        assert router.statistics().unmatched_acks == 3
        rec = await router.get("cpi-2")
        assert rec is not None
        assert rec.state is CommandState.PENDING


async def test_unknown_device_and_no_device_plane(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    async with running(db, bus, devices) as router:
        with pytest.raises(CommandRejected) as info:
            await router.execute(request(device(client="hmi-9")), Source.API)
        assert (info.value.status, info.value.code) == (404, "unknown-target")
        assert '"hmi-9"' in info.value.message
    async with running(db, bus, None) as router:
        with pytest.raises(CommandRejected) as info:
            await router.execute(request(device()), Source.API)
        assert (info.value.status, info.value.code) == (404, "unknown-target")
        assert "no device plane configured" in info.value.message
        assert router.statistics().rejected == 1


async def test_pending_commands_delivered_oldest_first(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    async with running(db, bus, devices) as router:
        for i in range(3):
            await router.execute(request(device(f"c-{i}")), Source.API)
        await router.execute(request(device("other", client="hmi-2")), Source.API)
        devices.online.add("hmi-1")
        router.device_connected("hmi-1")
        await devices.wait_sent(3)
        assert devices.sent == [("hmi-1", "c-0"), ("hmi-1", "c-1"), ("hmi-1", "c-2")]


async def test_restart_keeps_pending_device_commands_and_final_records(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    async with running(db, bus, devices) as router:
        done = await router.execute(request(modbus("m-1")), Source.API)
        await router.execute(request(device("offline-1")), Source.API)
        devices.online.add("hmi-2")
        delivered = await router.execute(
            request(device("delivered-1", client="hmi-2", timeout=0.1)), Source.API
        )
        assert delivered.state is CommandState.DELIVERED
    devices.online.clear()
    async with running(db, bus, devices) as router:
        assert await router.get("m-1") == done
        offline = await router.get("offline-1")
        assert offline is not None
        assert offline.state is CommandState.PENDING
        # Delivered before the restart but never acked: pending again, sent anew.
        again = await router.get("delivered-1")
        assert again is not None
        assert again.state is CommandState.PENDING
        assert router.statistics().by_state["pending"] == 2
        devices.online.update({"hmi-1", "hmi-2"})
        router.device_connected("hmi-1")
        router.device_connected("hmi-2")
        await devices.wait_sent(3)
        assert sorted(devices.sent[1:]) == [("hmi-1", "offline-1"), ("hmi-2", "delivered-1")]
        assert router.device_acked("hmi-1", "offline-1", True, "ok", None)
    async with running(db, bus, devices) as router:
        rec = await router.get("offline-1")
        assert rec is not None
        assert (rec.state, rec.result) == (CommandState.DONE, "ok")


async def test_connected_devices_get_their_commands_when_the_router_starts(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    async with running(db, bus, devices) as router:
        await router.execute(request(device()), Source.API)
    devices.online.add("hmi-1")  # connected while the router was down
    async with running(db, bus, devices) as router:
        await devices.wait_sent(1)
        assert devices.sent == [("hmi-1", "cpi-2")]


# ---- expiry --------------------------------------------------------------------------------


async def test_expiry(
    db: Path, bus: FakeModbus, devices: FakeDevices, mock_clock: trio.testing.MockClock
) -> None:
    exp = iso(T0 + 60)
    async with running(db, bus, devices) as router:
        await router.execute(request(device("late", expires=exp)), Source.API)
        await router.execute(request(device("later", expires=iso(T0 + 600))), Source.API)
        devices.online.add("hmi-2")
        async with trio.open_nursery() as nursery:
            answer = request(device("unanswered", client="hmi-2", expires=exp, timeout=1))
            background(nursery, router.execute(answer, Source.API))
            await devices.wait_sent(1)
            await jump(mock_clock, 1)
        await jump(mock_clock, 58)
        states = [(await router.get(i)).state for i in ("late", "unanswered", "later")]  # type: ignore[union-attr]
        assert states == [CommandState.PENDING, CommandState.DELIVERED, CommandState.PENDING]
        await jump(mock_clock, 1)  # T0 + 60
        late = await router.get("late")
        assert late is not None
        assert (late.state, late.status) == (CommandState.EXPIRED, 410)
        assert late.error == f"not delivered before {exp}"
        unanswered = await router.get("unanswered")
        assert unanswered is not None
        assert (unanswered.state, unanswered.error) == (
            CommandState.EXPIRED,
            f"not answered before {exp}",
        )
        assert not router.device_acked("hmi-2", "unanswered", True, None, None)
        later = await router.get("later")
        assert later is not None
        assert later.state is CommandState.PENDING
        await jump(mock_clock, 540)
        later = await router.get("later")
        assert later is not None
        assert later.state is CommandState.EXPIRED
        assert router.statistics().by_state["expired"] == 3
    async with running(db, bus, devices) as router:
        late = await router.get("late")
        assert late is not None
        assert late.state is CommandState.EXPIRED


async def test_expired_at_delivery_is_not_sent(
    db: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    # A wall clock that jumps (NTP) while Trio's clock does not: the sweep has not woken yet,
    # the delivery looks at expires itself.
    now = [T0]
    async with running(db, bus, devices, clock=lambda: now[0]) as router:
        r = command_from_object(device(expires=iso(T0 + 60)), now=T0, limits=LIMITS)
        await router.execute(r, Source.API)
        now[0] = T0 + 120
        devices.online.add("hmi-1")
        router.device_connected("hmi-1")
        await trio.testing.wait_all_tasks_blocked()
        rec = await router.get("cpi-2")
        assert rec is not None
        assert rec.state is CommandState.EXPIRED
        assert devices.sent == []


# ---- commands from CPI ---------------------------------------------------------------------


async def test_from_cpi_runs_the_good_and_logs_the_bad(
    db: Path, bus: FakeModbus, devices: FakeDevices, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(db, bus, devices) as router:
        with caplog.at_level(logging.INFO, logger="gateway.commands"):
            await router.from_cpi(
                [
                    {"id": "bad-1", "value": 1},
                    "not an object",
                    device("dev-1"),
                    modbus("good-1", 42),  # executed in order: after dev-1 is recorded
                ]
            )
            await bus.written.wait()
            # A repeat waits for the first's outcome and does not write again.
            rec = await router.execute(request(modbus("good-1", 42)), Source.API)
        assert (rec.state, rec.source, rec.result) == (
            CommandState.DONE,
            Source.CPI,
            {"written": 42},
        )
        assert bus.writes == [("plc/meter/setpoint", 42)]
        dev = await router.get("dev-1")
        assert dev is not None
        assert dev.state is CommandState.PENDING
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2
        assert warnings[0].kv["id"] == "bad-1"  # type: ignore[attr-defined]
        assert "target: missing" in warnings[0].getMessage()
        assert "id" not in warnings[1].kv  # type: ignore[attr-defined]
        assert router.statistics().rejected == 2
        done = [r for r in caplog.records if r.getMessage() == "command done"]
        assert len(done) == 1
        assert done[0].kv["id"] == "good-1"  # type: ignore[attr-defined]
        assert done[0].kv["source"] == "cpi"  # type: ignore[attr-defined]
        assert str(done[0].kv["target"]) == "modbus:plc/meter/setpoint"  # type: ignore[attr-defined]


# ---- the store -----------------------------------------------------------------------------


async def test_recent_newest_first(db: Path, bus: FakeModbus, devices: FakeDevices) -> None:
    now = [T0]
    async with running(db, bus, devices, clock=lambda: now[0]) as router:
        for i in range(4):
            now[0] += 1
            await router.execute(
                command_from_object(modbus(f"m-{i}"), now=now[0], limits=LIMITS), Source.API
            )
        now[0] += 1
        await router.execute(
            command_from_object(device("d-1"), now=now[0], limits=LIMITS), Source.API
        )
        ids = [r.request.id for r in await router.recent(3)]
        assert ids == ["d-1", "m-3", "m-2"]
        assert len(await router.recent(100)) == 5


async def test_retention_and_max_records(db: Path, bus: FakeModbus, devices: FakeDevices) -> None:
    now = [T0]

    def req(data: dict[str, object]) -> CommandRequest:
        return command_from_object(data, now=now[0], limits=LIMITS)

    async with running(
        db, bus, devices, clock=lambda: now[0], retention=3600.0, max_records=3
    ) as router:
        # Open records are never pruned.
        await router.execute(req(device("open-1", expires=iso(T0 + 86400))), Source.API)
        for i in range(5):
            now[0] += 1
            await router.execute(req(modbus(f"m-{i}")), Source.API)
        # Beyond max_records, the oldest final records go.
        assert [r.request.id for r in await router.recent(10)] == ["m-4", "m-3", "m-2", "open-1"]
        assert router.statistics().by_state["done"] == 3
        assert await router.get("m-0") is None
    now[0] += 1800
    async with running(db, bus, devices, clock=lambda: now[0], retention=3600.0) as router:
        await router.execute(req(modbus("fresh")), Source.API)
        assert len(await router.recent(10)) == 5
    now[0] += 3000  # m-* are now older than the retention, "fresh" is not
    async with running(db, bus, devices, clock=lambda: now[0], retention=3600.0) as router:
        assert [r.request.id for r in await router.recent(10)] == ["fresh", "open-1"]
        assert router.statistics().by_state == {
            "pending": 1,
            "delivered": 0,
            "done": 1,
            "failed": 0,
            "expired": 0,
        }


async def test_corrupt_file_is_moved_aside(
    db: Path, bus: FakeModbus, devices: FakeDevices, caplog: pytest.LogCaptureFixture
) -> None:
    write(db, b"this is not an SQLite database, it is a text file" * 100)
    with caplog.at_level(logging.ERROR, logger="gateway.commands"):
        async with running(db, bus, devices) as router:
            rec = await router.execute(request(modbus()), Source.API)
            assert rec.state is CommandState.DONE
    aside = list(db.parent.glob("commands.sqlite3.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b"this is not")
    assert any("COMMAND DATABASE CORRUPT" in r.getMessage() for r in caplog.records)
    async with running(db, bus, devices) as router:
        assert await router.get("cpi-1") == rec


async def test_unopenable_store_fails_the_run_with_what_to_do(
    tmp_path: Path, bus: FakeModbus, devices: FakeDevices
) -> None:
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
        conn.commit()
    cases = [
        (tmp_path / "missing" / "commands.sqlite3", "does not exist"),
        (tmp_path, "is a directory"),
        (other, "not a command database"),
    ]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        cases.append((locked / "commands.sqlite3", "cannot"))
    for path, message in cases:
        router = CommandRouter(path, bus, lambda: devices, wall_clock=wall)
        # The router is supervised: its run fails with the reason and is tried again later.
        with pytest.raises(CommandStoreError, match=message):
            await router.run()


async def test_open_commands_are_bounded(db: Path, bus: FakeModbus, devices: FakeDevices) -> None:
    async with running(db, bus, devices, max_records=2) as router:
        await router.execute(request(device("d-1")), Source.API)
        await router.execute(request(device("d-2")), Source.API)
        with pytest.raises(Unavailable, match="2 commands are still open"):
            await router.execute(request(device("d-3")), Source.API)
        assert await router.get("d-3") is None


async def test_the_store_is_in_wal_mode(db: Path, bus: FakeModbus, devices: FakeDevices) -> None:
    async with running(db, bus, devices) as router:
        await router.execute(request(modbus()), Source.API)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            (state,) = conn.execute("SELECT state FROM commands WHERE id = 'cpi-1'").fetchone()
            assert state == "done"


@pytest.mark.parametrize("depth", [33, 975, 2000])
def test_args_nested_too_deep_are_refused_with_400(depth: int) -> None:
    # 975 is just under Python's parser limit: accepted there, it crashed every later walk
    # (encoding it again, the XML record); 2000 the parser refuses by itself.
    nested = "[" * depth + "1" + "]" * depth
    body = '{"id": "d", "target": "device:hmi-1", "name": "n", "args": {"x": ' + nested + "}}"
    e = rejected(body.encode())
    assert e.status == 400
    assert "nested" in e.message or "deep" in e.message or e.code == "malformed"


def test_args_nested_32_deep_are_taken() -> None:
    nested = "[" * 31 + "1" + "]" * 31
    body = '{"id": "d", "target": "device:hmi-1", "name": "n", "args": {"x": ' + nested + "}}"
    assert parse_command(body.encode(), "application/json", now=T0, limits=LIMITS).args
