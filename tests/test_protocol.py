"""The wss device protocol v1 message model: every bad input gets its exact answer, every
frame the gateway sends is JSON with the documented content. Plain function calls, no sockets."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any

import pytest

from gateway.core.reading import Quality, Reading
from gateway.core.topics import device_topic
from gateway.protocol import (
    DEFAULT_BAD_REASON,
    MAX_READINGS,
    MAX_TOPICS,
    Ack,
    ErrorCode,
    Ping,
    ProtocolError,
    Publish,
    PublishItem,
    Subscribe,
    Unsubscribe,
    ack_frame,
    command_frame,
    error_frame,
    gap_frame,
    parse_client_message,
    pong_frame,
    published_reading,
    readings_frame,
)

NOW = 1_777_000_000.0  # 2026-04-24T03:06:40Z


def pub(*items: object, **extra: object) -> str:
    return json.dumps({"type": "publish", "id": "p1", "readings": list(items), **extra})


def item(**fields: object) -> dict[str, object]:
    return {"point": "temperature", "value": 21.5, **fields}


def parse(data: str) -> Any:
    return parse_client_message(data, now=NOW)


# ---- every bad input and its exact answer --------------------------------------------------

BAD = [
    pytest.param(
        "hello",
        "bad-json",
        'not JSON (Expecting value at line 1, column 1): send one JSON object per text frame, such as {"type": "ping"}',
        None,
        id="not-json",
    ),
    pytest.param(
        "",
        "bad-json",
        'not JSON (Expecting value at line 1, column 1): send one JSON object per text frame, such as {"type": "ping"}',
        None,
        id="empty",
    ),
    pytest.param(
        '{"type":"ping"} x',
        "bad-json",
        'not JSON (Extra data at line 1, column 17): send one JSON object per text frame, such as {"type": "ping"}',
        None,
        id="trailing",
    ),
    pytest.param(
        '{"type":"ping","type":"subscribe"}',
        "bad-json",
        'the key "type" appears twice in one object: send it once',
        None,
        id="duplicate-key",
    ),
    pytest.param(
        '{"type":"ping","id":' + "1" * 5000 + "}",
        "bad-json",
        "a number has thousands of digits: send at most 19 digits",
        None,
        id="many-digits",
    ),
    pytest.param(
        "[" * 100_000,
        "bad-json",
        "arrays and objects nested too deeply: no message nests that deep",
        None,
        id="deep",
    ),
    pytest.param(
        '{"type":"ack","command_id":"c-1","ok":true,"result":' + "[" * 600 + "]" * 600 + "}",
        "bad-message",
        "result: is nested more than 32 levels deep: send a flatter value",
        "c-1",
        id="ack-result-600-deep",
    ),
    pytest.param(
        "[1]",
        "bad-message",
        'a list is not a JSON object: send {"type": ..., ...}, such as {"type": "ping"}',
        None,
        id="array",
    ),
    pytest.param(
        '"ping"',
        "bad-message",
        '"ping" is not a JSON object: send {"type": ..., ...}, such as {"type": "ping"}',
        None,
        id="string",
    ),
    pytest.param(
        "{}",
        "bad-message",
        "type: missing: every message needs a type, one of subscribe, unsubscribe, publish, ack, ping",
        None,
        id="no-type",
    ),
    pytest.param(
        '{"id":"7"}',
        "bad-message",
        "type: missing: every message needs a type, one of subscribe, unsubscribe, publish, ack, ping",
        "7",
        id="no-type-with-id",
    ),
    pytest.param(
        '{"type":"subscrbe","topics":["#"]}',
        "unknown-type",
        'type: "subscrbe" is not one of subscribe, unsubscribe, publish, ack, ping',
        None,
        id="unknown-type",
    ),
    pytest.param(
        '{"type":5,"id":"9"}',
        "unknown-type",
        "type: 5 is not one of subscribe, unsubscribe, publish, ack, ping",
        "9",
        id="type-number",
    ),
    pytest.param(
        '{"type":"subscribe"}',
        "bad-message",
        "topics: missing: this key is required",
        None,
        id="sub-no-topics",
    ),
    pytest.param(
        '{"type":"subscribe","topics":"a/b"}',
        "bad-message",
        'topics: "a/b" is not a list: send [ ... ]',
        None,
        id="sub-topics-string",
    ),
    pytest.param(
        '{"type":"subscribe","topics":[]}',
        "bad-message",
        'topics: must not be empty: send e.g. ["line-1/+/temperature"]',
        None,
        id="sub-topics-empty",
    ),
    pytest.param(
        json.dumps({"type": "subscribe", "topics": [f"a/{i}/#" for i in range(101)]}),
        "too-large",
        "topics: 101 items are too many: at most 100 in one message; send several messages",
        None,
        id="sub-too-many",
    ),
    pytest.param(
        '{"type":"subscribe","topics":["a/#",5]}',
        "bad-message",
        'topics[1]: 5 is not a string: send a topic pattern such as "line-1/+/temperature"',
        None,
        id="sub-topic-number",
    ),
    pytest.param(
        '{"type":"subscribe","topics":["a/#/b"]}',
        "bad-message",
        "topics[0]: 'a/#/b': '#' may only be the last level: send a pattern such as 'line-1/+/temperature' or 'devices/#'",
        None,
        id="sub-hash-middle",
    ),
    pytest.param(
        '{"type":"subscribe","topics":["a//b"]}',
        "bad-message",
        "topics[0]: 'a//b': empty level: send a pattern such as 'line-1/+/temperature' or 'devices/#'",
        None,
        id="sub-empty-level",
    ),
    pytest.param(
        '{"type":"subscribe","topics":["a+/b"]}',
        "bad-message",
        "topics[0]: 'a+/b': '+' and '#' must stand alone in a level: send a pattern such as 'line-1/+/temperature' or 'devices/#'",
        None,
        id="sub-plus-in-level",
    ),
    pytest.param(
        '{"type":"subscribe","topics":["line 1/#"]}',
        "bad-message",
        "topics[0]: 'line 1/#': 'line 1' may use only letters, digits and _ . : - (no '/', '+', '#' or spaces: it becomes one level of a topic): send a pattern such as 'line-1/+/temperature' or 'devices/#'",
        None,
        id="sub-space",
    ),
    pytest.param(
        json.dumps({"type": "subscribe", "topics": ["a" * 257]}),
        "bad-message",
        'topics[0]: "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa..." (257 characters) is too long: at most 256 characters',
        None,
        id="sub-long",
    ),
    pytest.param(
        '{"type":"subscribe","topics":["#"],"last":"yes"}',
        "bad-message",
        'last: "yes" is not true or false',
        None,
        id="sub-last-string",
    ),
    pytest.param(
        '{"type":"subscribe","topics":["#"],"last":1}',
        "bad-message",
        "last: 1 is not true or false",
        None,
        id="sub-last-number",
    ),
    pytest.param(
        '{"type":"subscribe","topic":["#"]}',
        "bad-message",
        "topic: unknown key (did you mean 'topics'?); topics: missing: this key is required",
        None,
        id="sub-typo",
    ),
    pytest.param(
        '{"type":"unsubscribe","topics":["#"],"last":true}',
        "bad-message",
        "last: unknown key (allowed: topics)",
        None,
        id="unsub-last",
    ),
    pytest.param(
        '{"type":"publish","readings":[{"point":"t","value":1}]}',
        "bad-message",
        "id: missing: this key is required",
        None,
        id="pub-no-id",
    ),
    pytest.param(
        '{"type":"publish","id":7,"readings":[{"point":"t","value":1}]}',
        "bad-message",
        'id: 7 is not a string: send an id such as "42"',
        None,
        id="pub-id-number",
    ),
    pytest.param(
        '{"type":"publish","id":"","readings":[{"point":"t","value":1}]}',
        "bad-message",
        'id: must not be empty: send an id such as "42"',
        None,
        id="pub-id-empty",
    ),
    pytest.param(
        json.dumps({"type": "publish", "id": "x" * 129, "readings": [item()]}),
        "bad-message",
        'id: "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx..." (129 characters) is too long: at most 128 characters',
        None,
        id="pub-id-long",
    ),
    pytest.param(
        json.dumps({"type": "publish", "id": "a\nb", "readings": [item()]}),
        "bad-message",
        'id: "a\\nb" contains control characters: send printable text',
        None,
        id="pub-id-newline",
    ),
    pytest.param(
        '{"type":"publish","id":"p1"}',
        "bad-message",
        "readings: missing: this key is required",
        "p1",
        id="pub-no-readings",
    ),
    pytest.param(
        pub(),
        "bad-message",
        'readings: must not be empty: send e.g. [{"point": "temperature", "value": 21.5}]',
        "p1",
        id="pub-readings-empty",
    ),
    pytest.param(
        pub(*[item()] * 1001),
        "too-large",
        "readings: 1001 items are too many: at most 1000 in one message; send several messages",
        "p1",
        id="pub-too-many",
    ),
    pytest.param(
        pub(5),
        "bad-message",
        "readings[0]: 5 is not an object: send {...}",
        "p1",
        id="pub-item-not-object",
    ),
    pytest.param(
        pub({"value": 1}),
        "bad-message",
        "readings[0].point: missing: this key is required",
        "p1",
        id="pub-no-point",
    ),
    pytest.param(
        pub({"point": "t"}),
        "bad-message",
        "readings[0].value: missing: this key is required",
        "p1",
        id="pub-no-value",
    ),
    pytest.param(
        pub(item(point="a/b")),
        "bad-message",
        "readings[0].point: 'a/b' may use only letters, digits and _ . : - (no '/', '+', '#' or spaces: it becomes one level of a topic): send a point name such as 'temperature'",
        "p1",
        id="pub-point-slash",
    ),
    pytest.param(
        pub(item(point="p" * 65)),
        "bad-message",
        'readings[0].point: "pppppppppppppppppppppppppppppppppppppppp..." (65 characters) is too long: at most 64 characters',
        "p1",
        id="pub-point-long",
    ),
    pytest.param(
        pub(item(value=[1, 2])),
        "bad-message",
        "readings[0].value: a list is not a number, true/false, string or null: send one value per reading",
        "p1",
        id="pub-value-list",
    ),
    pytest.param(
        pub(item(value={"v": 1})),
        "bad-message",
        "readings[0].value: an object is not a number, true/false, string or null: send one value per reading",
        "p1",
        id="pub-value-object",
    ),
    pytest.param(
        '{"type":"publish","id":"p1","readings":[{"point":"t","value":NaN}]}',
        "bad-message",
        'readings[0].value: NaN is not a finite number: send null with "quality": "bad" for a value that could not be read',
        "p1",
        id="pub-value-nan",
    ),
    pytest.param(
        '{"type":"publish","id":"p1","readings":[{"point":"t","value":1e400}]}',
        "bad-message",
        'readings[0].value: Infinity is not a finite number: send null with "quality": "bad" for a value that could not be read',
        "p1",
        id="pub-value-inf",
    ),
    pytest.param(
        pub(item(value=2**64)),
        "bad-message",
        "readings[0].value: 18446744073709551616 is out of range: a whole number is from -9223372036854775808 to 9223372036854775807 (64 bits); send it as a float or a string",
        "p1",
        id="pub-value-huge-int",
    ),
    pytest.param(
        pub(item(value="v" * 1025)),
        "bad-message",
        'readings[0].value: "vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv..." (1025 characters) is too long: at most 1024 characters',
        "p1",
        id="pub-value-long-string",
    ),
    pytest.param(
        pub(item(unit=5)),
        "bad-message",
        'readings[0].unit: 5 is not a string: send a unit such as "degC"',
        "p1",
        id="pub-unit-number",
    ),
    pytest.param(
        pub(item(unit="u" * 33)),
        "bad-message",
        'readings[0].unit: "uuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuu" is too long: at most 32 characters',
        "p1",
        id="pub-unit-long",
    ),
    pytest.param(
        '{"type":"publish","id":"p1","readings":[{"point":"t","value":1,"unit":"\\ud800"}]}',
        "bad-message",
        'readings[0].unit: "\\ud800" contains a lone surrogate: send valid Unicode',
        "p1",
        id="pub-unit-surrogate",
    ),
    pytest.param(
        pub(item(ts=1700000000)),
        "bad-message",
        'readings[0].ts: 1700000000 is not a timestamp: send an ISO 8601 UTC string such as "2024-05-01T12:00:00.250Z"',
        "p1",
        id="pub-ts-number",
    ),
    pytest.param(
        pub(item(ts="2026-04-24")),
        "bad-message",
        'readings[0].ts: "2026-04-24" is not an ISO 8601 timestamp: send one such as "2024-05-01T12:00:00.250Z"',
        "p1",
        id="pub-ts-date",
    ),
    pytest.param(
        pub(item(ts="2026-04-24T03:00:00")),
        "bad-message",
        'readings[0].ts: "2026-04-24T03:00:00" has no time zone: send UTC, ending in Z, such as "2024-05-01T12:00:00.250Z"',
        "p1",
        id="pub-ts-naive",
    ),
    pytest.param(
        pub(item(ts="2026-04-24T05:00:00+02:00")),
        "bad-message",
        'readings[0].ts: "2026-04-24T05:00:00+02:00" is not UTC: convert it to UTC and end it in Z, such as "2024-05-01T12:00:00.250Z"',
        "p1",
        id="pub-ts-offset",
    ),
    pytest.param(
        pub(item(ts="2026-04-24 03:00:00Z")),
        "bad-message",
        'readings[0].ts: "2026-04-24 03:00:00Z" is not an ISO 8601 timestamp: send one such as "2024-05-01T12:00:00.250Z"',
        "p1",
        id="pub-ts-space",
    ),
    pytest.param(
        pub(item(ts="2026-02-30T00:00:00Z")),
        "bad-message",
        'readings[0].ts: "2026-02-30T00:00:00Z" is not a valid date and time (day is out of range for month)',
        "p1",
        id="pub-ts-invalid-date",
    ),
    pytest.param(
        pub(item(ts="2026-04-25T03:06:41Z")),
        "bad-message",
        "readings[0].ts: 2026-04-25T03:06:41.000Z is more than a day ahead of the gateway's clock (2026-04-24T03:06:40.000Z): check the device's clock (NTP), or leave ts out to use the gateway's time",
        "p1",
        id="pub-ts-future",
    ),
    pytest.param(
        pub(item(quality="ok")),
        "bad-message",
        'readings[0].quality: "ok" is not "good" or "bad"',
        "p1",
        id="pub-quality-ok",
    ),
    pytest.param(
        pub(item(quality=True)),
        "bad-message",
        'readings[0].quality: true is not "good" or "bad"',
        "p1",
        id="pub-quality-bool",
    ),
    pytest.param(
        pub(item(reason="open")),
        "bad-message",
        'readings[0].reason: only with "quality": "bad": leave it out of a good reading',
        "p1",
        id="pub-reason-good",
    ),
    pytest.param(
        pub(item(qualty="bad")),
        "bad-message",
        "readings[0].qualty: unknown key (did you mean 'quality'?)",
        "p1",
        id="pub-typo",
    ),
    pytest.param(
        pub(item(value=[]), item(unit=1), item(point=""), item(ts=1), item(quality=None)),
        "bad-message",
        "readings[0].value: a list is not a number, true/false, string or null: send one value per reading; readings[1].unit: 1 is not a string: send a unit such as \"degC\"; readings[2].point: must not be empty: send a point name such as 'temperature'; and 2 more problems",
        "p1",
        id="pub-many-problems",
    ),
    pytest.param(
        '{"type":"ack","command_id":"c1"}',
        "bad-message",
        "ok: missing: this key is required",
        "c1",
        id="ack-no-ok",
    ),
    pytest.param(
        '{"type":"ack","command_id":"c1","ok":"true"}',
        "bad-message",
        'ok: "true" is not true or false',
        "c1",
        id="ack-ok-string",
    ),
    pytest.param(
        '{"type":"ack","command_id":"c1","ok":1}',
        "bad-message",
        "ok: 1 is not true or false",
        "c1",
        id="ack-ok-number",
    ),
    pytest.param(
        '{"type":"ack","command_id":"c1","ok":false}',
        "bad-message",
        'error: missing: a failed command ("ok": false) needs "error", a string saying why',
        "c1",
        id="ack-fail-no-error",
    ),
    pytest.param(
        '{"type":"ack","command_id":"c1","ok":false,"error":"busy","result":1}',
        "bad-message",
        'result: only with "ok": true: send "error" to say what failed',
        "c1",
        id="ack-fail-result",
    ),
    pytest.param(
        '{"type":"ack","command_id":"c1","ok":true,"error":"busy"}',
        "bad-message",
        'error: only with "ok": false: leave it out, or send ok false',
        "c1",
        id="ack-ok-error",
    ),
    pytest.param(
        '{"type":"ack","ok":true}',
        "bad-message",
        "command_id: missing: this key is required",
        None,
        id="ack-no-command-id",
    ),
    pytest.param(
        '{"type":"ack","command_id":"c1","ok":true,"result":{"a":[NaN]}}',
        "bad-message",
        "result: contains NaN, which JSON does not allow: send a number",
        "c1",
        id="ack-result-nan",
    ),
    pytest.param(
        '{"type":"ack","command_id":"c1","ok":false,"error":5}',
        "bad-message",
        "error: 5 is not a string: send a string saying why",
        "c1",
        id="ack-error-number",
    ),
    pytest.param(
        '{"type":"ping","id":5}',
        "bad-message",
        'id: 5 is not a string: send an id such as "42"',
        None,
        id="ping-id-number",
    ),
    pytest.param(
        '{"type":"ping","id":"a","seq":1}',
        "bad-message",
        "seq: unknown key (allowed: id)",
        "a",
        id="ping-extra",
    ),
]


@pytest.mark.parametrize(("data", "code", "message", "ref"), BAD)
def test_bad_input_gets_its_exact_answer(
    data: str, code: str, message: str, ref: str | None
) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(data)
    assert (info.value.code, info.value.message, info.value.ref) == (code, message, ref)


def test_every_error_code_is_documented() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text("utf-8")
    for code in ErrorCode:
        assert f"`{code}`" in doc, code


def test_limits_are_inclusive() -> None:
    topics = [f"a/{i}/#" for i in range(MAX_TOPICS)]
    assert len(parse(json.dumps({"type": "subscribe", "topics": topics})).topics) == MAX_TOPICS
    assert len(parse(pub(*[item()] * MAX_READINGS)).readings) == MAX_READINGS
    assert parse(json.dumps({"type": "ping", "id": "x" * 128})) == Ping("x" * 128)
    assert parse(pub(item(point="p" * 64, unit="u" * 32, value="v" * 1024))).readings[0].value == (
        "v" * 1024
    )
    # exactly one day ahead is still accepted (clock skew), a second more is not
    ahead = parse(pub(item(ts="2026-04-25T03:06:40Z")))
    assert ahead.readings[0].ts == NOW + 86400


def test_a_too_large_list_is_refused_before_its_items_are_read() -> None:
    with pytest.raises(ProtocolError) as info:
        parse(pub(*[{"point": 5}] * (MAX_READINGS + 1)))
    assert info.value.code == ErrorCode.TOO_LARGE


def test_the_error_frame_answers_the_bad_message() -> None:
    with pytest.raises(ProtocolError) as info:
        parse(pub(item(value=[1])))
    assert json.loads(info.value.frame()) == {
        "type": "error",
        "code": "bad-message",
        "message": "readings[0].value: a list is not a number, true/false, string or null: "
        "send one value per reading",
        "ref": "p1",
    }


# ---- good messages -------------------------------------------------------------------------


def test_subscribe() -> None:
    assert parse('{"type":"subscribe","topics":["line-1/+/temperature","devices/#"]}') == (
        Subscribe(("line-1/+/temperature", "devices/#"), last=False)  # type: ignore[arg-type]
    )
    assert parse('{"type":"subscribe","topics":["#"],"last":true}') == Subscribe(
        ("#",),  # type: ignore[arg-type]
        last=True,
    )


def test_repeated_patterns_are_kept_once_in_order() -> None:
    message = parse('{"type":"subscribe","topics":["b/#","a/#","b/#"]}')
    assert message.topics == ("b/#", "a/#")


def test_unsubscribe() -> None:
    assert parse('{"type":"unsubscribe","topics":["a/+/+"]}') == Unsubscribe(("a/+/+",))  # type: ignore[arg-type]


def test_publish_with_every_field() -> None:
    message = parse(
        pub(
            {"point": "flow", "value": 3},
            {"point": "state", "value": "running", "unit": None, "ts": None},
            {"point": "door", "value": True, "ts": "2026-04-24T03:00:00.250Z"},
            {"point": "level", "value": None, "quality": "bad", "reason": "sensor open"},
            {"point": "temp", "value": -1.5e3, "unit": "degC", "ts": "2026-04-24T03:00:00+00:00"},
        )
    )
    assert isinstance(message, Publish)
    assert message.id == "p1"
    flow, state, door, level, temp = message.readings
    assert flow == PublishItem("flow", 3)  # type: ignore[arg-type]
    assert type(flow.value) is int
    assert state.value == "running"
    assert state.unit is None
    assert door.value is True
    assert door.ts == NOW - 400 + 0.25
    assert level.quality is Quality.BAD
    assert level.reason == "sensor open"
    assert temp.value == -1500.0
    assert temp.ts == NOW - 400


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-04-24T03:06:40Z", NOW),
        ("2026-04-24T03:06:40.5Z", NOW + 0.5),
        ("2026-04-24T03:06:40.123456+00:00", NOW + 0.123456),
        ("2000-01-01T00:00:00Z", 946684800.0),
    ],
)
def test_timestamps_in_utc(ts: str, expected: float) -> None:
    assert parse(pub(item(ts=ts))).readings[0].ts == pytest.approx(expected, abs=1e-6)


def test_strings_are_values_not_numbers() -> None:
    # "10" stays a string: the protocol never guesses a type.
    assert parse(pub(item(value="10"))).readings[0].value == "10"


def test_ack() -> None:
    assert parse('{"type":"ack","command_id":"c1","ok":true,"result":{"set":[1,2.5]}}') == Ack(
        "c1",  # type: ignore[arg-type]
        True,
        {"set": [1, 2.5]},  # type: ignore[arg-type]
    )
    assert parse('{"type":"ack","command_id":"c1","ok":true}') == Ack("c1", True)  # type: ignore[arg-type]
    assert parse('{"type":"ack","command_id":"c1","ok":false,"error":"busy"}') == Ack(
        "c1",  # type: ignore[arg-type]
        False,
        error="busy",  # type: ignore[arg-type]
    )


def test_ping() -> None:
    assert parse('{"type":"ping"}') == Ping()
    assert parse('{"type":"ping","id":"7"}') == Ping("7")  # type: ignore[arg-type]


def test_unicode_in_strings_is_kept() -> None:
    assert parse(pub(item(unit="°C", value="Kühlung läuft"))).readings[0].unit == "°C"


# ---- device readings -----------------------------------------------------------------------


def test_published_reading_lands_in_the_device_namespace() -> None:
    message = parse(pub(item(unit="degC", ts="2026-04-24T03:00:00Z")))
    reading = published_reading("hmi-1", message.readings[0], NOW)
    assert reading == Reading("devices/hmi-1/temperature", 21.5, unit="degC", timestamp=NOW - 400)
    assert reading.good


def test_published_reading_without_ts_takes_now() -> None:
    reading = published_reading("hmi-1", parse(pub(item())).readings[0], NOW)
    assert reading.timestamp == NOW


def test_a_bad_reading_always_has_a_reason() -> None:
    given, default = parse(
        pub(item(quality="bad", reason="sensor open"), item(quality="bad", value=None))
    ).readings
    assert published_reading("d", given, NOW).reason == "sensor open"
    reading = published_reading("d", default, NOW)
    assert (reading.quality, reading.reason, reading.value) == (
        Quality.BAD,
        DEFAULT_BAD_REASON,
        None,
    )


@pytest.mark.parametrize("client_id", ["", "a/b", "#", "a b"])
def test_a_client_id_that_is_no_topic_level_is_a_bug(client_id: str) -> None:
    with pytest.raises(ValueError, match="not a topic level"):
        device_topic(client_id, "p")


# ---- gateway -> client frames --------------------------------------------------------------


def readings() -> list[Reading]:
    return [
        Reading("line-1/boiler/temp", 71.25, unit="degC", timestamp=NOW, seq=3),
        Reading.bad("line-1/boiler/flow", "timeout"),
        Reading("devices/hmi-1/note", "Kühlung", timestamp=NOW + 0.5),
    ]


def test_readings_frame_is_json_with_each_readings_dict() -> None:
    rs = readings()
    frame = readings_frame(rs)
    assert isinstance(frame, str)
    assert json.loads(frame) == {"type": "readings", "readings": [r.as_dict() for r in rs]}
    assert json.loads(readings_frame([])) == {"type": "readings", "readings": []}


def test_each_reading_is_serialised_once_however_many_frames_carry_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    as_dict = Reading.as_dict

    def counting(self: Reading) -> dict[str, object]:
        calls.append(self.topic)
        return as_dict(self)

    monkeypatch.setattr(Reading, "as_dict", counting)
    rs = readings()
    frames = {readings_frame(rs) for _ in range(100)} | {readings_frame(rs[1:])}
    assert len(frames) == 2
    assert sorted(calls) == sorted(r.topic for r in rs)


def test_ack_frame() -> None:
    assert ack_frame("p1") == '{"type":"ack","id":"p1"}'


def test_command_frame() -> None:
    frame = command_frame("c1", "set-point", {"point": "valve", "value": 0.5}, NOW + 30)
    assert json.loads(frame) == {
        "type": "command",
        "command_id": "c1",
        "name": "set-point",
        "args": {"point": "valve", "value": 0.5},
        "expires": "2026-04-24T03:07:10.000Z",
    }


def test_a_frame_is_never_invalid_json() -> None:
    with pytest.raises(ValueError, match="Out of range float"):
        command_frame("c1", "set", {"value": math.nan}, NOW)


def test_error_frame() -> None:
    assert (
        error_frame(ErrorCode.FORBIDDEN, "no")
        == '{"type":"error","code":"forbidden","message":"no"}'
    )
    assert json.loads(error_frame(ErrorCode.RATE_LIMITED, "slow down", "p1")) == {
        "type": "error",
        "code": "rate-limited",
        "message": "slow down",
        "ref": "p1",
    }


def test_gap_and_pong_frames() -> None:
    assert gap_frame(17) == '{"type":"gap","dropped":17}'
    assert pong_frame() == '{"type":"pong"}'
    assert pong_frame("7") == '{"type":"pong","id":"7"}'


def test_the_protocol_model_imports_no_io() -> None:
    source = (Path(__file__).resolve().parent.parent / "gateway" / "protocol.py").read_text("utf-8")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    allowed = {"__future__", "attrs", "cattrs", "collections.abc", "datetime", "difflib"}
    allowed |= {"enum", "json", "math", "re", "typing"}
    outside = {m for m in imported if m not in allowed and not m.startswith("cattrs.")}
    assert outside, "expected imports of gateway.core"
    assert all(m.startswith("gateway.core.") for m in outside), outside


@pytest.mark.parametrize(
    "pattern", ["line-1", "line-1/+", "line-1/+/+/+", "line-1/+/+/+/#", "a/b/c/d"]
)
def test_a_pattern_that_can_never_match_a_topic_is_refused(pattern: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(json.dumps({"type": "subscribe", "topics": [pattern]}))
    assert f"topics[0]: {pattern!r} can never match: topics have 3 levels" in info.value.message


@pytest.mark.parametrize("ts", ["9999-12-31T23:59:59.999999999Z", "9999-12-31T23:59:59Z"])
def test_a_timestamp_at_the_end_of_time_is_an_error_not_a_crash(ts: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(pub(item(ts=ts)))
    assert "is more than a day ahead of the gateway's clock" in info.value.message


@pytest.mark.parametrize("ts", ["1970-01-01T00:00:00Z", "0001-01-01T00:00:00Z"])
def test_a_timestamp_before_2000_means_an_unset_clock(ts: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(pub(item(ts=ts)))
    assert "is before 2000: the device's clock is not set" in info.value.message
