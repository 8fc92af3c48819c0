"""The serial-line driver: the parser and decoders by plain calls, the config checks, and the
bus end to end on a real pty (readings, polls, silence, unplug and replug)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from drivers.base import WriteError
from drivers.lines import (
    BadLine,
    Line,
    LineDecoder,
    LineParser,
    LinePointConfig,
    SerialLineBus,
    SerialLineBusConfig,
    convert,
    decode_nmea,
    decode_regex,
    next_deadline,
    nmea_checksum,
    sentence_matches,
)
from drivers.registry import KINDS, DriverKind
from gateway.config import ConfigError, parse_config
from gateway.core.configtypes import Name
from gateway.core.reading import Quality
from tests.ptys import PtyPeer
from tests.readings import Recorder

KINDS_WITH_LINES = {
    **KINDS,
    "serial-line": DriverKind("serial-line", SerialLineBusConfig, SerialLineBus, "line sensors"),
}

GGA = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
"""The textbook GGA sentence; its checksum (47) is the published one, not computed here."""


def point(name: str, **kw: object) -> LinePointConfig:
    return LinePointConfig(Name(name), **kw)  # type: ignore[arg-type]


# ---- LineParser ---------------------------------------------------------------------------


def texts(events: list[Line | BadLine]) -> list[str]:
    return [e.text if isinstance(e, Line) else f"<{e.kind}>" for e in events]


def test_lines_split_across_chunks() -> None:
    parser = LineParser("\r\n")
    assert parser.receive_data(b"T=2") == []
    assert parser.receive_data(b"1.5\r") == []
    assert texts(parser.receive_data(b"\nT=22\r\nT=")) == ["T=21.5", "T=22"]
    assert texts(parser.receive_data(b"23\r\n")) == ["T=23"]
    assert parser.lines == 3


def test_crlf_lf_and_cr_terminators() -> None:
    # A CRLF setting also reads LF-only devices; empty lines are skipped.
    assert texts(LineParser("\r\n").receive_data(b"a\r\nb\n\r\n\nc\r\n")) == ["a", "b", "c"]
    assert texts(LineParser("\n").receive_data(b"a\nb\r\n")) == ["a", "b"]
    # A CR setting reads CR-only and CRLF devices alike.
    assert texts(LineParser("\r").receive_data(b"a\rb\r\nc\r")) == ["a", "b", "c"]
    # A LF setting never ends a CR-only line: it shows up as overlong, not as silence.
    parser = LineParser("\n", max_line_length=8)
    assert texts(parser.receive_data(b"a\rb\rc\rd\re\r")) == ["<overlong>"]


def test_overlong_lines_are_discarded_up_to_the_next_terminator() -> None:
    parser = LineParser("\r\n", max_line_length=10)
    events = parser.receive_data(b"0123456789ABCDEF\r\nok\r\n")
    assert texts(events) == ["<overlong>", "ok"]
    assert isinstance(events[0], BadLine)
    assert events[0].reason == "longer than 10 bytes"
    # Trickled in: reported once, the buffer stays bounded, the next line is intact.
    parser = LineParser("\r\n", max_line_length=10)
    out: list[Line | BadLine] = []
    for _ in range(1000):
        out += parser.receive_data(b"xxxxxxx")
        assert len(parser._buffer) <= 12
    out += parser.receive_data(b"tail\r\nT=1\r\n")
    assert texts(out) == ["<overlong>", "T=1"]
    assert parser.overlong == 1
    # Exactly the limit is fine, even with its CR already in and the LF still to come.
    parser = LineParser("\r\n", max_line_length=10)
    assert parser.receive_data(b"0123456789\r") == []
    assert texts(parser.receive_data(b"\n")) == ["0123456789"]


def test_garbage_bytes_are_bad_lines_not_errors() -> None:
    parser = LineParser("\r\n", encoding="ascii")
    events = parser.receive_data(b"\xff\xfe\x00noise\r\nT=1\r\n")
    assert texts(events) == ["<undecodable>", "T=1"]
    assert isinstance(events[0], BadLine)
    assert events[0].reason == "not ascii text"
    assert events[0].raw == b"\xff\xfe\x00noise"
    assert parser.undecodable == 1
    assert texts(LineParser(encoding="latin-1").receive_data(b"\xb0C\r\n")) == ["\xb0C"]


# ---- decoding -----------------------------------------------------------------------------


def test_regex_named_groups_with_types_scale_and_units() -> None:
    pattern = re.compile(
        r"T=(?P<temp>\S+) P=(?P<p>\S+)(?: ALARM=(?P<alarm>\w+))? ID=(?P<id>\w+) N=(?P<n>\S+)"
    )
    points = [
        point("temp", unit="degC"),
        point("pressure", group="p", unit="kPa", scale=0.1),
        point("alarm", type="bool"),
        point("id", type="str"),
        point("n", type="int"),
    ]
    decoded = decode_regex("T=21.5 P=1013 ALARM=on ID=A7 N=12", pattern, points)
    assert decoded.ok
    assert [(v.point.name, v.value, v.reason) for v in decoded.values] == [
        ("temp", 21.5, None),
        ("pressure", pytest.approx(101.3), None),
        ("alarm", True, None),
        ("id", "A7", None),
        ("n", 12, None),
    ]
    # An optional group that did not take part gives no value; bad text gives a reason.
    decoded = decode_regex("T=hot P=1013 ID=A7 N=1.5", pattern, points)
    assert [(v.point.name, v.value, v.reason) for v in decoded.values] == [
        ("temp", None, "not a number: 'hot'"),
        ("pressure", pytest.approx(101.3), None),
        ("id", "A7", None),
        ("n", None, "not a whole number: '1.5'"),
    ]
    assert decode_regex("hello", pattern, points).malformed == "does not match the pattern"


def test_convert_edge_cases() -> None:
    assert convert(" 7 ", point("x", type="int", scale=2.0, offset=1.0)).value == 15.0
    assert convert("nan", point("x")).reason == "not a finite number: 'nan'"
    assert convert("", point("x")).reason == "no value"
    assert convert("maybe", point("x", type="bool")).reason == "not a bool: 'maybe'"
    assert convert("OFF", point("x", type="bool")).value is False
    assert convert("\x00\x01", point("x")).reason == "not a number: '\\x00\\x01'"


def test_nmea_checksum_and_fields() -> None:
    assert nmea_checksum(GGA[1:-3]) == 0x47
    points = [
        point("fix", sentence="GGA", field=6, type="int"),
        point("altitude", sentence="GGA", field=9, unit="m"),
        point("station", sentence="GGA", field=14, type="str"),
        point("beyond", sentence="GGA", field=20),
        point("speed", sentence="VTG", field=7, unit="km/h"),
    ]
    decoded = decode_nmea(GGA, points)
    assert decoded.ok
    assert decoded.checked
    assert [(v.point.name, v.value, v.reason) for v in decoded.values] == [
        ("fix", 1, None),
        ("altitude", 545.4, None),
        ("station", None, "no value"),  # empty field: not available
        ("beyond", None, "GPGGA has no field 20 (it has 14)"),
    ]
    # Lowercase hex is accepted; a wrong checksum rejects the whole sentence.
    assert decode_nmea(GGA[:-2] + "47".lower(), points).ok
    bad = decode_nmea(GGA.replace("545.4", "545.5"), points)
    assert bad.checksum_error == "checksum 47, but the sentence sums to 46"
    assert bad.values == ()
    assert decode_nmea(GGA[:-2] + "G7", points).malformed == "checksum 'G7' is not two hex digits"
    assert decode_nmea("GPGGA,1,2", points).malformed == "not an NMEA sentence (no leading $ or !)"
    assert decode_nmea("$,1,2", points).malformed == "'' is not a sentence id"


def test_nmea_sentences_match_across_talkers() -> None:
    assert sentence_matches("GPGGA", "GGA")
    assert sentence_matches("GNGGA", "GGA")
    assert sentence_matches("GPGGA", "GPGGA")
    assert not sentence_matches("GNGGA", "GPGGA")
    assert not sentence_matches("GPGSA", "GGA")
    assert not sentence_matches("PGRME", "RME")  # proprietary: no talker to ignore
    gn = "$GNGGA,1,2,3,4,5,2"
    sentence = f"{gn}*{nmea_checksum(gn[1:]):02X}"
    decoded = decode_nmea(sentence, [point("fix", sentence="GGA", field=6, type="int")])
    assert [v.value for v in decoded.values] == [2]


def test_missing_checksum_accepted_until_the_device_has_sent_one() -> None:
    config = SerialLineBusConfig(
        Name("gps"),
        port="/dev/null",
        format="nmea",
        points=(point("fix", sentence="GGA", field=6, type="int"),),
    )
    decoder = LineDecoder(config)
    bare = GGA.partition("*")[0]
    first = decoder.decode(bare)
    assert first.ok
    assert not first.checked
    assert decoder.decode(GGA).checked
    # A corrupted '*' would look exactly like this: now it is rejected.
    assert decoder.decode(bare).checksum_error == (
        "no checksum, though this device sent checksums before"
    )
    decoder.reset()  # a reconnect may bring another device
    assert decoder.decode(bare).ok


def test_drift_free_schedule_skips_missed_ticks() -> None:
    assert next_deadline(10.0, 1.0, 10.5) == (11.0, 0)
    assert next_deadline(10.0, 1.0, 13.5) == (14.0, 3)


# ---- config -------------------------------------------------------------------------------

BASE = """
[[buses]]
name = "line"
kind = "serial-line"
port = "/dev/ttyUSB0"
"""


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + text, kinds=KINDS_WITH_LINES)
    return info.value.problems


def test_config_defaults_and_topics() -> None:
    config = parse_config(
        BASE + 'pattern = "T=(?P<t>.*)"\npoints = [{ name = "t", unit = "degC" }]',
        kinds=KINDS_WITH_LINES,
    )
    bus = config.buses[0]
    assert isinstance(bus, SerialLineBusConfig)
    assert bus.device == "sensor"
    assert bus.terminator == "\r\n"
    assert bus.interval == 1.0
    assert list(bus.topics()) == ["line/sensor/t"]
    assert bus.stall_after() == 13.0
    settings = bus.port_settings()
    assert (settings.path, settings.baudrate, settings.parity) == ("/dev/ttyUSB0", 9600, "N")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            'pattern = "T=(?P<t>[0-9.]+"\npoints = [{ name = "t" }]',
            ("buses[0].pattern", "not a valid regular expression: missing ), unterminated"),
        ),
        (
            'pattern = "T=(?P<t>.*)"\npoints = [{ name = "t" }, { name = "h", group = "hum" }]',
            ("buses[0].points[1].group", "the pattern has no group named 'hum' (it has: t)"),
        ),
        (
            'pattern = "T=(?P<t>.*)"\npoints = [{ name = "t" }, { name = "x" }]',
            ("buses[0].points[1].name", "add (?P<x>...) to the pattern or set group"),
        ),
        ('points = [{ name = "t" }]', ("buses[0].pattern", 'format = "regex" needs a pattern')),
        (
            'pattern = "(?P<t>.*)"\npoints = [{ name = "t", sentence = "GGA" }]',
            ("buses[0].points[0].sentence", 'only for format = "nmea"'),
        ),
        (
            'format = "nmea"\npoints = [{ name = "fix", sentence = "GGA", field = 0 }]',
            ("buses[0].points[0].field", "0 is below 1"),
        ),
        (
            'format = "nmea"\npoints = [{ name = "fix", field = 6 }]',
            ("buses[0].points[0].sentence", "missing: an NMEA point needs sentence"),
        ),
        (
            'format = "nmea"\npoints = [{ name = "fix", sentence = "gga", field = 6 }]',
            ("buses[0].points[0].sentence", "'gga' is not a sentence type"),
        ),
        (
            'format = "nmea"\npattern = "x"\n'
            'points = [{ name = "f", sentence = "GGA", field = 1 }]',
            ("buses[0].pattern", 'only for format = "regex"'),
        ),
        (
            'encoding = "klingon"\npattern = "(?P<t>.*)"\npoints = [{ name = "t" }]',
            ("buses[0].encoding", "'klingon' is not a known text encoding"),
        ),
        (
            'encoding = "utf-16"\npattern = "(?P<t>.*)"\npoints = [{ name = "t" }]',
            ("buses[0].encoding", "'utf-16' is not ASCII-compatible"),
        ),
        (
            'terminator = "\\t"\npattern = "(?P<t>.*)"\npoints = [{ name = "t" }]',
            ("buses[0].terminator", "'\\t' is not one of"),
        ),
        (
            'poll = "MEAS\\r\\n"\npattern = "(?P<t>.*)"\npoints = [{ name = "t" }]',
            ("buses[0].poll", "must not contain line breaks"),
        ),
        (
            'poll = "M\\u00e9"\npattern = "(?P<t>.*)"\npoints = [{ name = "t" }]',
            ("buses[0].poll", "cannot be written in ascii"),
        ),
        (
            'pattern = "(?P<t>.*)"\npoints = [{ name = "t", type = "str", scale = 2.0 }]',
            ("buses[0].points[0].scale", "applies to numbers only (type is str)"),
        ),
        (
            'reopen_initial = "5s"\nreopen_max = "1s"\npattern = "(?P<t>.*)"\n'
            'points = [{ name = "t" }]',
            ("buses[0].reopen_max", "must not be below reopen_initial"),
        ),
        (
            'max_line_length = 0\npattern = "(?P<t>.*)"\npoints = [{ name = "t" }]',
            ("buses[0].max_line_length", "0 is outside 1..65536"),
        ),
        (
            'pattern = "(?P<t>.*)"\npoints = [{ name = "t", type = "float32" }]',
            ("buses[0].points[0].type", "'float32' is not one of float, int, str, bool"),
        ),
        (
            'pattern = "(?P<t>.*)"\npoints = [{ name = "t", feild = 1 }]',
            ("buses[0].points[0].feild", "unknown key (did you mean 'field'?)"),
        ),
        ('pattern = "(?P<t>.*)"', ("buses[0].points", "needs at least one point")),
    ],
)
def test_config_errors_name_the_path(extra: str, expected: tuple[str, str]) -> None:
    found = problems(extra)
    path, text = expected
    assert any(p == path and text in m for p, m in found), found


# ---- the bus on a real pty ----------------------------------------------------------------


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[PtyPeer]:
    p = PtyPeer(tmp_path)
    yield p
    p.close()


def make_bus(path: Path, **kw: object) -> tuple[SerialLineBus, Recorder]:
    values: dict[str, object] = {
        "pattern": r"T=(?P<temperature>\S+) H=(?P<humidity>\S+)",
        "interval": 0.05,
        "reopen_initial": 0.01,
        "reopen_max": 0.04,
        "points": (point("temperature", unit="degC"), point("humidity", unit="%")),
    }
    values.update(kw)
    config = SerialLineBusConfig(Name("wx"), port=str(path), **values)  # type: ignore[arg-type]
    assert list(config.check()) == []
    sink = Recorder()
    return SerialLineBus(config, sink.context()), sink


TEMP, HUM = "wx/sensor/temperature", "wx/sensor/humidity"


async def test_readings_from_a_streaming_sensor(
    peer: PtyPeer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.lines")
    bus, sink = make_bus(peer.path)
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        assert bus.connected
        await peer.send(b"T=21.5 H=40\r\nT=21.6 H=41\r\n")
        await sink.wait_until(lambda: len(sink.of(HUM)) == 2)
        # Junk, a bad value and more junk: counted; one warning per minute, not per line.
        await peer.send(b"#boot v1.2\r\nT=21.7 H=--\r\n\xff\xfe\r\nT=21.8 H=42\n")
        await sink.wait_until(lambda: len(sink.of(HUM)) == 4)
        nursery.cancel_scope.cancel()
    temps = sink.of(TEMP)
    assert [r.value for r in temps] == [21.5, 21.6, 21.7, 21.8]
    assert {r.unit for r in temps} == {"degC"}
    assert all(r.quality is Quality.GOOD for r in temps)
    bad = sink.of(HUM)[2]
    assert (bad.quality, bad.reason, bad.unit) == (Quality.BAD, "not a number: '--'", "%")
    stats = bus.statistics()
    assert stats["lines"] == 6
    assert stats["malformed"] == 2
    assert stats["conversion_errors"] == 1
    assert stats["partial"] == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == "bad line from the sensor"
    assert warnings[0].kv == {  # type: ignore[attr-defined]
        "bus": "wx",
        "port": str(peer.path),
        "reason": "does not match the pattern",
        "line": "#boot v1.2",
        "count": 1,
    }


async def test_nmea_sensor(peer: PtyPeer) -> None:
    points = (
        point("fix", sentence="GGA", field=6, type="int"),
        point("altitude", sentence="GGA", field=9, unit="m"),
    )
    bus, sink = make_bus(peer.path, format="nmea", pattern=None, points=points)
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        # A partial first line (opened mid-sentence), a wrong checksum, then a good one.
        corrupted = GGA.replace("545.4", "545.5")
        await peer.send(f"46.9,M,,*47\r\n{corrupted}\r\n$GPGSV,1,1,00*79\r\n{GGA}\r\n".encode())
        await sink.wait_until(lambda: len(sink.of("wx/sensor/altitude")) == 1)
        nursery.cancel_scope.cancel()
    assert [r.value for r in sink.of("wx/sensor/altitude")] == [545.4]
    assert [r.value for r in sink.of("wx/sensor/fix")] == [1]
    stats = bus.statistics()
    assert (stats["partial"], stats["checksum_errors"], stats["malformed"]) == (1, 1, 0)


async def test_poll_string_every_interval(peer: PtyPeer) -> None:
    bus, sink = make_bus(peer.path, poll="MEAS", terminator="\r")
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        for n in range(1, 4):
            await peer.wait_received(lambda b, n=n: b.count(b"MEAS\r") >= n)  # type: ignore[misc]
            await peer.send(f"T={n} H={n}\r".encode())
        await sink.wait_until(lambda: len(sink.of(TEMP)) == 3)
        nursery.cancel_scope.cancel()
    assert [r.value for r in sink.of(TEMP)] == [1.0, 2.0, 3.0]
    assert re.fullmatch(rb"(MEAS\r)+", peer.received)  # nothing but whole polls
    assert bus.polls >= 3


async def test_silent_sensor_reads_timeout_then_recovers(
    peer: PtyPeer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.lines")
    bus, sink = make_bus(peer.path)
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await peer.send(b"T=1 H=1\r\n")
        await sink.wait_until(lambda: any(r.reason == "timeout" for r in sink.of(TEMP)))
        calls = sink.progress_calls
        await sink.wait_until(lambda: sink.progress_calls >= calls + 3)  # still fed
        await peer.send(b"T=2 H=2\r\n")
        await sink.wait_until(lambda: sink.of(TEMP)[-1].value == 2.0)
        nursery.cancel_scope.cancel()
    assert [(r.value, r.reason) for r in sink.of(TEMP)] == [
        (1.0, None),
        (None, "timeout"),
        (2.0, None),
    ]
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert (
        messages.count("no valid line from the sensor; its points read bad until it sends again")
        == 1
    )
    assert "the sensor sends again" in messages


async def test_unplug_and_replug(peer: PtyPeer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="drivers.lines")
    bus, sink = make_bus(peer.path)
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)
        await peer.send(b"T=1 H=1\r\n")
        await sink.wait_until(lambda: len(sink.of(TEMP)) == 1)

        peer.unplug()
        await sink.wait_until(lambda: bus.open_failures >= 3)
        assert not bus.connected
        calls = sink.progress_calls
        await sink.wait_until(lambda: sink.progress_calls >= calls + 2)  # fed while down

        peer.replug()
        await sink.wait_until(lambda: bus.connected)
        await peer.send(b"T=2 H=2\r\n")
        await sink.wait_until(lambda: len(sink.of(TEMP)) == 3)
        nursery.cancel_scope.cancel()
    assert [(r.value, r.reason) for r in sink.of(TEMP)] == [
        (1.0, None),
        (None, "disconnected"),  # once per outage, however many attempts
        (2.0, None),
    ]
    assert [(r.value, r.reason) for r in sink.of(HUM)][1] == (None, "disconnected")
    stats = bus.statistics()
    assert stats["reconnects"] == 1
    assert "no such device" in str(stats["last_error"])  # the last failed open
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].kv["bus"] == "wx"  # type: ignore[attr-defined]
    assert "device gone" in str(warnings[0].kv["error"])  # type: ignore[attr-defined]
    assert [r.getMessage() for r in records].count("serial port is back") == 1


async def test_started_even_when_the_port_is_missing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bus, sink = make_bus(tmp_path / "ttyLATE")
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run)  # returns after the first, failed attempt
        assert not bus.connected
        assert [r.reason for r in sink.of(TEMP)] == ["disconnected"]
        await sink.wait_until(lambda: bus.open_failures >= 2)
        late = PtyPeer(tmp_path, "ttyLATE")  # the adapter is plugged in
        try:
            await sink.wait_until(lambda: bus.connected)
            await late.send(b"T=5 H=5\r\n")
            await sink.wait_until(lambda: len(sink.of(TEMP)) == 2)
        finally:
            late.close()
        nursery.cancel_scope.cancel()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    error = str(warning.kv["error"])  # type: ignore[attr-defined]
    assert "no such device: is the adapter plugged in" in error
    assert [r.value for r in sink.of(TEMP)] == [None, 5.0]


# ---- the adapter by plain calls -----------------------------------------------------------


async def test_bad_line_warnings_are_rate_limited(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    bus, _ = make_bus(Path("/dev/null"))
    for _ in range(5):
        bus._line("junk", first=False)
    await trio.sleep(30)
    bus._line("junk", first=False)
    await trio.sleep(31)
    bus._line("more junk", first=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.kv["count"] for r in warnings] == [1, 6]  # type: ignore[attr-defined]
    assert warnings[1].kv["line"] == "more junk"  # type: ignore[attr-defined]
    assert bus.statistics()["malformed"] == 7


async def test_points_are_read_only(tmp_path: Path) -> None:
    bus, _ = make_bus(tmp_path / "tty")
    with pytest.raises(WriteError, match="wx/sensor/temperature is on a serial-line bus"):
        await bus.write("sensor/temperature", 1.0)
