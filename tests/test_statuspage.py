"""The status page (``gateway/statuspage.html``) in headless Chromium.

Against the real ``edge-gateway demo``: live values appear and update over the wss feed, the
health section lists the components, nothing throws, and a phone-sized window (360 CSS px)
needs no sideways scrolling. Against a stand-in gateway (a small HTTPS server with canned
``/api/v1/status`` and a ``websockets`` server as the device plane): what the demo cannot
show on demand: text from devices that looks like HTML stays text, bad readings with their
reason, ``gap`` frames, a reconnect with a fresh token after the feed closes, status polls
never overwriting newer live values, and the fallback to polling without a device plane.

Screenshots go to ``test-output/`` (gitignored); their paths are printed.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it); without it these tests
skip with that reason.
"""

from __future__ import annotations

import base64
import http.server
import json
import queue
import re
import signal
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.sync.server import Server, ServerConnection, serve

from tests.cdp import Browser, Page, find_chromium
from tests.conftest import ROOT, TIMEOUT, Daemon

PAGE_FILE = ROOT / "gateway" / "statuspage.html"
OUTPUT = ROOT / "test-output"
PHONE = 360

# {topic: value text} of the readings table, and the rows the live feed updated.
VALUES = """Object.fromEntries([...document.querySelectorAll('#readings tr[data-topic]')]
    .map(tr => [tr.dataset.topic, tr.querySelector('td.value').textContent]))"""
SHOWN = """({live: document.getElementById('live-state').textContent,
    notice: document.getElementById('live-notice').textContent,
    updated: document.getElementById('updated').textContent,
    readings: document.getElementById('readings').innerText.slice(0, 600)})"""
NO_OVERFLOW = "document.documentElement.scrollWidth <= window.innerWidth"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    executable = find_chromium()
    if executable is None:
        pytest.skip("chromium not installed: apt-get install chromium (.ci/run installs it)")
    with Browser(tmp_path_factory.mktemp("chromium") / "profile", executable) as b:
        yield b


def save(page: Page, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    path = page.screenshot(OUTPUT / f"{name}.png")
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path


def check_phone_layout(page: Page) -> None:
    """A phone's width, as a phone renders it (the viewport meta tag counts); no part of the
    page may stick out sideways."""
    page.set_viewport(PHONE, 780, scale=2, mobile=True)
    assert page.wait_for(f"window.innerWidth === {PHONE} && 'resized'") == "resized"
    widths = page.evaluate(
        "({page: document.documentElement.scrollWidth, body: document.body.scrollWidth})"
    )
    assert widths["page"] <= PHONE, widths
    assert widths["body"] <= PHONE, widths


# ---- against the real demo ----------------------------------------------------------------------

DEMO_PAGE = re.compile(
    r"demo: status page (https://127\.0\.0\.1:\d+/) \(user (\S+), password (\S+)\)"
)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Daemon]:
    # Like tests/test_demo.py: certificate and local endpoint file below tmp_path.
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "RUNTIME_DIRECTORY": str(tmp_path / "run")}
    d = Daemon(["demo"], None, env)
    yield d
    d.kill()


def test_demo_status_page_shows_live_values_and_health(
    browser: Browser, demo: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    line = demo.wait_for_log("demo: status page ")
    match = DEMO_PAGE.search(line)
    assert match is not None, line
    url, user, password = match.groups()
    # The line comes as the demo starts; the API listens once the gateway is ready.
    if not any("gateway ready:" in seen for seen in demo.lines):
        demo.wait_for_log("gateway ready:")
    page = browser.new_page(credentials=(user, password))
    page.navigate(url)
    # The browser met the API's Basic challenge and answered it with the demo's password.
    assert page.auth_challenges >= 1

    # Values of both demo buses appear, and the wss feed (not the fallback) is connected.
    page.wait_for(
        "document.querySelector('#readings tr[data-topic^=\"line-1/\"]')"
        " && document.querySelector('#readings tr[data-topic^=\"plc/\"]')",
        describe=SHOWN,
    )
    page.wait_for(
        "document.getElementById('live-state').textContent === 'Live feed: connected'",
        describe=SHOWN,
    )
    # ... and update from the feed: a value cell changes (the demo's counter moves every
    # 500 ms, the boiler temperature every second).
    before = page.evaluate(VALUES)
    changed = page.wait_for(
        f"(() => {{ const before = {json.dumps(before)};"
        " const rows = [...document.querySelectorAll('#readings tr[data-via=\"live\"]')];"
        " const moved = rows.filter(tr => tr.dataset.topic in before"
        "   && before[tr.dataset.topic] !== tr.querySelector('td.value').textContent);"
        " return moved.length && moved.map(tr => tr.dataset.topic); })()",
        describe=SHOWN,
    )
    assert changed, before

    # Health: every component with a state, and this page counted as a wss client.
    components = page.wait_for(
        "(() => { const c = [...document.querySelectorAll('#components .comp')];"
        " return c.length && c.map(e => [e.dataset.component,"
        "   e.querySelector('.badge').textContent]); })()",
        describe="document.getElementById('health').innerText",
    )
    assert all(name and state for name, state in components), components
    assert {"line-1", "plc"} <= {name for name, _ in components}, components  # its two buses
    page.wait_for(
        "/^[1-9]\\d* live clients? \\(wss\\)$/.test("
        "document.getElementById('wss-clients').textContent)",
        describe="document.getElementById('wss-clients').textContent",
    )
    page.wait_for(
        "document.getElementById('ready').textContent === '✓ Ready'",
        describe="document.getElementById('top').innerText",
    )
    assert page.evaluate(NO_OVERFLOW)
    save(page, "statuspage-demo-desktop", capsys)

    check_phone_layout(page)
    save(page, "statuspage-demo-phone", capsys)

    assert page.problems() == []
    page.close()

    demo.send_signal(signal.SIGINT)
    assert demo.wait_exit() == 0


# ---- against a stand-in gateway -----------------------------------------------------------------

USER, PASSWORD = "viewer", "not <b>secret</b>"
# Text from devices and configs that a careless page would turn into markup.
HOSTILE = '<img src=x onerror="window.__pwned=1">'
NOW = datetime.now(UTC)


def iso(seconds_ago: float) -> str:
    t = NOW - timedelta(seconds=seconds_ago)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def canned_status() -> dict[str, Any]:
    """What /api/v1/status answers for a gateway with trouble: a bus down, CPI failing."""
    return {
        "gateway": f"press-7 {HOSTILE}",
        "version": "0.1.0",
        "ready": False,
        "problems": ["bus plc: meter not answering", f"cpi: failing for 6 min ({HOSTILE})"],
        "components": [
            {"name": "line-1", "kind": "bus", "state": "up", "since": iso(3600), "reason": None, "last_error": None},
            {"name": "plc", "kind": "bus", "state": "degraded", "since": iso(125), "reason": "meter not answering", "last_error": f"timeout after 1.0 s {HOSTILE}"},
            {"name": "device plane", "kind": "device plane", "state": "up", "since": iso(3600), "reason": None, "last_error": None},
            {"name": "outbox database", "kind": "outbox", "state": "up", "since": iso(3600), "reason": None, "last_error": None},
            {"name": "cpi forwarder", "kind": "cpi", "state": "down", "since": iso(360), "reason": "HTTP 503", "last_error": "503 Service Unavailable"},
            {"name": "api", "kind": "api", "state": "starting", "since": iso(1), "reason": None, "last_error": None},
        ],
        "devices": [
            {"bus": "line-1", "device": "boiler", "state": "up", "last_error": None, "last_success": iso(0.5)},
            {"bus": "plc", "device": "meter", "state": "down", "last_error": "no answer within 1.0 s (unit 1)", "last_success": iso(125)},
        ],
        "wss_clients": 0,
        "outbox": {"backlog": 12345, "backlog_bytes": 3456789, "dead_letters": 2},
        "cpi": {"last_success": iso(400), "last_failure": iso(2), "failing_since": iso(360), "last_failure_reason": f"HTTP 503 from CPI: {HOSTILE}"},
        "readings": [
            {"topic": "line-1/boiler/temperature", "value": 71.25, "unit": "degC", "quality": "good", "ts": iso(1)},
            {"topic": "line-1/boiler/pressure", "value": 1.5, "unit": "bar", "quality": "good", "ts": iso(1)},
            {"topic": "plc/meter/voltage", "value": 230.10000610351562, "unit": "V", "quality": "good", "ts": iso(125)},
            {"topic": "plc/meter/current", "value": None, "quality": "bad", "reason": "timeout", "ts": iso(2)},
            {"topic": f"devices/{HOSTILE}/x", "value": HOSTILE, "quality": "good", "ts": iso(3)},
        ],
        "commands": [
            {"id": "cpi-4711", "target": "modbus:plc/meter/power_limit", "name": "write", "args": {}, "value": 5.5, "state": "done", "result": {"written": 5.5, "read_back": 5.5}, "error": None, "source": "api", "created": iso(30), "updated": iso(29), "expires": iso(-3600), "status_url": "/api/v1/commands/cpi-4711"},
            {"id": f"cpi-{HOSTILE}", "target": "device:hmi-1", "name": "show-message", "args": {"text": HOSTILE}, "value": None, "state": "failed", "result": None, "error": f"device said: {HOSTILE}", "source": "cpi", "created": iso(20), "updated": iso(19), "expires": iso(-3600), "status_url": "/api/v1/commands/x"},
            {"id": "cpi-4713", "target": "device:hmi-2", "name": "reboot", "args": {}, "value": None, "state": "pending", "result": None, "error": None, "source": "api", "created": iso(5), "updated": iso(5), "expires": iso(-3600), "status_url": "/api/v1/commands/cpi-4713"},
        ],
        "live": True,
    }  # fmt: skip


class Peer:
    """One WebSocket connection the page made to the stand-in device plane."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.origin = ws.request.headers.get("Origin") if ws.request else None
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()

    def receive(self) -> dict[str, Any]:
        return self.messages.get(timeout=TIMEOUT)

    def send(self, frame: dict[str, Any]) -> None:
        self.ws.send(json.dumps(frame))


class StandIn:
    """The API's status endpoints over HTTPS with Basic auth, and the device plane's wss."""

    def __init__(self, ca: trustme.CA) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        self.status = canned_status()
        self.live = True
        self.live_down = False
        """``/api/v1/live`` answers 503: the device plane configured, not running now."""
        self.tokens: list[str] = []
        self.status_requests = 0
        self.unauthorised = 0
        self.peers: queue.Queue[Peer] = queue.Queue()
        self._all_peers: list[Peer] = []
        self._lock = threading.Lock()
        self.wss: Server = serve(
            self._handle_ws,
            "127.0.0.1",
            0,
            ssl=context,
            subprotocols=["edge-gateway.v1"],  # type: ignore[list-item]
            process_request=self._check_token,
        )
        self.wss_port = self.wss.socket.getsockname()[1]
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.http.socket = context.wrap_socket(self.http.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.http.server_address[1]}/"
        self._threads = [
            threading.Thread(target=self.wss.serve_forever, daemon=True),
            threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        for peer in self._all_peers:
            peer.ws.close()
        self.wss.shutdown()
        self.http.shutdown()
        self.http.server_close()
        for t in self._threads:
            t.join(TIMEOUT)

    def _check_token(self, connection: ServerConnection, request: Any) -> Any:
        # Like the device plane: the newest viewer token, offered as a subprotocol.
        offered = request.headers.get("Sec-WebSocket-Protocol", "")
        with self._lock:
            token = self.tokens[-1] if self.tokens else None
        if token is None or f"bearer.{token}" not in [p.strip() for p in offered.split(",")]:
            return connection.respond(401, "no valid bearer token offered\n")
        return None

    def _handle_ws(self, ws: ServerConnection) -> None:
        peer = Peer(ws)
        with self._lock:
            self._all_peers.append(peer)
        self.peers.put(peer)
        for message in ws:
            peer.messages.put(json.loads(message))

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        standin = self
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="edge-gateway"')
                self.end_headers()
                self.wfile.write(body)

            def json(self, status: int, body: object) -> None:
                self.answer(status, json.dumps(body).encode(), "application/json")

            def do_GET(self) -> None:
                if self.headers.get("Authorization") != expected:
                    with standin._lock:
                        standin.unauthorised += 1
                    self.json(401, {"error": {"code": "unauthorised", "message": "log in"}})
                elif self.path == "/":
                    self.answer(200, PAGE_FILE.read_bytes(), "text/html; charset=utf-8")
                elif self.path == "/api/v1/status":
                    with standin._lock:
                        standin.status_requests += 1
                        # The count of polls shows on the page, so a test can wait for a poll
                        # to have been rendered.
                        body = {**standin.status, "wss_clients": standin.status_requests}
                    self.json(200, body)
                elif self.path == "/api/v1/live" and standin.live_down:
                    self.json(
                        503,
                        {
                            "error": {
                                "code": "unavailable",
                                "message": "the device plane is not running now (see /readyz)",
                            }
                        },
                    )
                elif self.path == "/api/v1/live" and standin.live:
                    with standin._lock:
                        token = f"viewer-token-{len(standin.tokens) + 1}"
                        standin.tokens.append(token)
                    self.json(
                        200,
                        {
                            "url": f"wss://127.0.0.1:{standin.wss_port}/",
                            "token": token,
                            "protocols": ["edge-gateway.v1", f"bearer.{token}"],
                        },
                    )
                else:
                    self.json(404, {"error": {"code": "not-found", "message": self.path}})

        return Handler


@pytest.fixture
def standin() -> Iterator[StandIn]:
    s = StandIn(trustme.CA())
    yield s
    s.close()


def polls_rendered(page: Page, at_least: int) -> None:
    """Wait until the page shows the answer to the stand-in's ``at_least``-th status poll."""
    page.wait_for(
        f"parseInt(document.getElementById('wss-clients').textContent) >= {at_least}",
        describe=SHOWN,
    )


def test_stand_in_live_feed_gap_and_reconnect(
    browser: Browser, standin: StandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    page = browser.new_page(credentials=(USER, PASSWORD))
    page.navigate(standin.url)
    peer = standin.peers.get(timeout=TIMEOUT)
    assert peer.receive() == {"type": "subscribe", "topics": ["#"], "last": True}
    assert peer.ws.subprotocol == "edge-gateway.v1"
    assert peer.origin == standin.url.rstrip("/")
    page.wait_for(
        "document.getElementById('live-state').textContent === 'Live feed: connected'",
        describe=SHOWN,
    )
    page.wait_for(
        "document.querySelector('#readings tr[data-topic=\"line-1/boiler/temperature\"]')",
        describe=SHOWN,
    )

    values = page.evaluate(VALUES)
    assert values["line-1/boiler/temperature"] == "71.25"
    assert values["plc/meter/voltage"] == "230.1"  # float32 noise is not shown
    assert values["plc/meter/current"] == "—"

    # A live frame: a change, a new bad reading with its reason, a value from a device.
    peer.send(
        {
            "type": "readings",
            "readings": [
                {"topic": "line-1/boiler/temperature", "value": 72.5, "unit": "degC", "quality": "good", "ts": iso(-5), "seq": 7},
                {"topic": "devices/hmi-1/level", "value": None, "quality": "bad", "reason": "sensor open", "ts": iso(-5)},
            ],
        }
    )  # fmt: skip
    page.wait_for(
        "document.querySelector('#readings tr[data-topic=\"line-1/boiler/temperature\"] td.value')"
        ".textContent === '72.5'",
        describe=SHOWN,
    )
    level = page.wait_for(
        "(() => { const tr = document.querySelector('#readings tr[data-topic=\"devices/hmi-1/level\"]');"
        " return tr && {bad: tr.classList.contains('bad-quality'),"
        " quality: tr.querySelector('td.quality').textContent, via: tr.dataset.via}; })()"
    )
    assert level == {"bad": True, "quality": "✕ BAD sensor open", "via": "live"}

    # The status poll has an older temperature (71.25): the newer live value stays.
    polls_rendered(page, standin.status_requests + 1)
    assert page.evaluate(VALUES)["line-1/boiler/temperature"] == "72.5"

    # gap: said on the page, and the latest values asked for again.
    peer.send({"type": "gap", "dropped": 118})
    assert peer.receive() == {"type": "subscribe", "topics": ["#"], "last": True}
    notice = page.wait_for(
        "document.getElementById('gap-notice').hidden === false && document.getElementById('gap-notice').textContent"
    )
    assert "118 readings were skipped" in notice

    # The feed closes (a gateway restart): the page says so and connects again with a new
    # token (the stand-in accepts only the newest one).
    peer.ws.close(1001, "going away")
    page.wait_for(
        "document.getElementById('live-state').textContent.startsWith('Live feed: reconnecting in')",
        describe=SHOWN,
    )
    assert "the gateway is restarting" in page.evaluate(
        "document.getElementById('live-notice').textContent"
    )
    again = standin.peers.get(timeout=TIMEOUT)
    assert again.receive()["type"] == "subscribe"
    assert standin.tokens == ["viewer-token-1", "viewer-token-2"]
    page.wait_for(
        "document.getElementById('live-state').textContent === 'Live feed: connected'",
        describe=SHOWN,
    )
    again.send({"type": "readings", "readings": [{"topic": "line-1/boiler/temperature", "value": 73, "unit": "degC", "quality": "good", "ts": iso(-6)}]})  # fmt: skip
    page.wait_for(
        "document.querySelector('#readings tr[data-topic=\"line-1/boiler/temperature\"] td.value')"
        ".textContent === '73'",
        describe=SHOWN,
    )
    assert standin.unauthorised >= 1  # the page itself was behind the Basic challenge
    assert page.problems() == []
    page.close()


def test_stand_in_device_text_stays_text(
    browser: Browser, standin: StandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    page = browser.new_page(credentials=(USER, PASSWORD))
    page.navigate(standin.url)
    polls_rendered(page, 1)
    shown = page.wait_for(
        "document.querySelectorAll('#commands tr[data-command]').length === 3 && {"
        " name: document.getElementById('gw-name').textContent,"
        " title: document.title,"
        " problems: [...document.querySelectorAll('#problems li')].map(li => li.textContent),"
        " topics: Object.keys(" + VALUES + "),"
        " commands: [...document.querySelectorAll('#commands tr[data-command]')].map(tr => tr.dataset.command),"
        " images: document.querySelectorAll('img').length,"
        " pwned: window.__pwned === 1,"
        " body: document.body.innerText}",
        describe=SHOWN,
    )
    assert shown["images"] == 0
    assert shown["pwned"] is False
    assert shown["name"] == f"press-7 {HOSTILE}"
    assert shown["title"].startswith(f"press-7 {HOSTILE}")
    assert shown["problems"] == [
        "bus plc: meter not answering",
        f"cpi: failing for 6 min ({HOSTILE})",
    ]
    assert f"devices/{HOSTILE}/x" in shown["topics"]
    assert f"cpi-{HOSTILE}" in shown["commands"]
    body = shown["body"]
    for text in (
        f"timeout after 1.0 s {HOSTILE}",  # a component's last error
        f"HTTP 503 from CPI: {HOSTILE}",
        f"device said: {HOSTILE}",
        "✕ Not ready",
        "✕ BAD",
        "timeout",  # the bad reading's reason
        "no answer within 1.0 s (unit 1)",  # a bus device's last error
        "12,345 readings",  # outbox backlog
        "3.3 MiB",
        "2 (see: edge-gateway outbox dead-letters)",
        "✕ failing",
    ):
        assert text in body, text
    assert page.evaluate(NO_OVERFLOW)
    save(page, "statuspage-standin-desktop", capsys)
    check_phone_layout(page)
    save(page, "statuspage-standin-phone", capsys)
    assert page.problems() == []
    page.close()


def test_stand_in_without_device_plane_polls_the_status(browser: Browser, standin: StandIn) -> None:
    standin.live = False
    standin.status = {**standin.status, "live": False}
    page = browser.new_page(credentials=(USER, PASSWORD))
    page.navigate(standin.url)
    notice = page.wait_for(
        "document.getElementById('live-state').textContent === 'Live feed: not available'"
        " && document.getElementById('live-notice').textContent",
        describe=SHOWN,
    )
    assert "no live feed" in notice
    assert "refreshed from the status every 2 s" in notice
    polls_rendered(page, 1)
    standin.status = {
        **standin.status,
        "live": False,
        "readings": [
            {"topic": "line-1/boiler/temperature", "value": 80.5, "unit": "degC", "quality": "good", "ts": iso(-1)},
        ],
    }  # fmt: skip
    page.wait_for(
        "document.querySelector('#readings tr[data-topic=\"line-1/boiler/temperature\"] td.value')"
        ".textContent === '80.5'",
        describe=SHOWN,
    )
    assert standin.peers.empty()
    # The one error the browser logs: the 404 of /api/v1/live that told the page.
    problems = page.problems()
    assert all("404" in p and "/api/v1/live" in p for p in problems), problems

    # A reload adds the device plane: the status says so, and the page subscribes.
    standin.live = True
    standin.status = {**standin.status, "live": True}
    peer = standin.peers.get(timeout=TIMEOUT)
    assert peer.receive() == {"type": "subscribe", "topics": ["#"], "last": True}
    page.wait_for(
        "document.getElementById('live-state').textContent === 'Live feed: connected'",
        describe=SHOWN,
    )
    assert page.evaluate("document.getElementById('live-notice').hidden")
    page.close()


def test_stand_in_live_feed_down_for_now_is_tried_again(browser: Browser, standin: StandIn) -> None:
    # A device plane configured but not running (restarting, or the gateway stopping): 503,
    # and the page tries again with its backoff (after a 404 it would stop asking).
    standin.live_down = True
    page = browser.new_page(credentials=(USER, PASSWORD))
    page.navigate(standin.url)
    notice = page.wait_for(
        "document.getElementById('live-state').textContent.startsWith('Live feed: reconnecting in')"
        " && document.getElementById('live-notice').textContent",
        describe=SHOWN,
    )
    assert "not running now" in notice
    assert "readings come from the status every 2 s" in notice
    polls_rendered(page, 1)
    standin.live_down = False
    peer = standin.peers.get(timeout=TIMEOUT)
    assert peer.receive() == {"type": "subscribe", "topics": ["#"], "last": True}
    page.wait_for(
        "document.getElementById('live-state').textContent === 'Live feed: connected'",
        describe=SHOWN,
    )
    problems = page.problems()
    assert all("503" in p and "/api/v1/live" in p for p in problems), problems
    page.close()


def test_stand_in_live_topics_beyond_500_are_left_out(browser: Browser, standin: StandIn) -> None:
    page = browser.new_page(credentials=(USER, PASSWORD))
    page.navigate(standin.url)
    peer = standin.peers.get(timeout=TIMEOUT)
    assert peer.receive()["type"] == "subscribe"
    polls_rendered(page, 1)  # the status's 5 topics
    peer.send(
        {
            "type": "readings",
            "readings": [
                {"topic": f"devices/many/t{n:04d}", "value": n, "quality": "good", "ts": iso(0)}
                for n in range(600)
            ],
        }
    )
    count = page.wait_for(
        "document.getElementById('readings-count').textContent.includes('left out')"
        " && document.getElementById('readings-count').textContent",
        describe=SHOWN,
    )
    assert count == "500 topics (the first 500 shown; more are left out)"
    assert page.evaluate("document.querySelectorAll('#readings tr[data-topic]').length") == 500
    # The topics already shown go on updating.
    peer.send({"type": "readings", "readings": [{"topic": "devices/many/t0000", "value": 42, "quality": "good", "ts": iso(-1)}]})  # fmt: skip
    page.wait_for(
        "document.querySelector('#readings tr[data-topic=\"devices/many/t0000\"] td.value')"
        ".textContent === '42'",
        describe=SHOWN,
    )
    assert page.problems() == []
    page.close()


def test_stand_in_polls_only_while_the_tab_is_shown(browser: Browser, standin: StandIn) -> None:
    page = browser.new_page(credentials=(USER, PASSWORD))
    page.navigate(standin.url)
    polls_rendered(page, 1)
    # Another tab in front hides this one (headless Chromium has one window).
    other = browser.new_page()
    page.wait_for(
        "document.hidden && document.getElementById('updated').textContent"
        ".includes('paused while the tab is hidden')",
        describe=SHOWN,
    )
    # Counted once hidden: a poll that was on its way as the tab went is not one of those
    # that must not come.
    polled = standin.status_requests
    # A poll interval and a bit, by the browser's clock, in the tab in front.
    other.evaluate("new Promise(resolve => setTimeout(resolve, 2500))")
    assert standin.status_requests == polled
    # Shown again: it polls at once.
    page.call("Target.activateTarget", {"targetId": page.target_id})
    polls_rendered(page, polled + 1)
    assert "paused" not in page.evaluate("document.getElementById('updated').textContent")
    other.close()
    assert page.problems() == []
    page.close()


def test_filter_hides_other_topics(browser: Browser, standin: StandIn) -> None:
    page = browser.new_page(credentials=(USER, PASSWORD))
    page.navigate(standin.url)
    polls_rendered(page, 1)
    visible = """[...document.querySelectorAll('#readings tr[data-topic]')]
        .filter(tr => !tr.hidden).map(tr => tr.dataset.topic)"""

    def type_filter(text: str) -> list[str]:
        page.evaluate(
            f"(() => {{ const f = document.getElementById('filter'); f.value = {json.dumps(text)};"
            " f.dispatchEvent(new Event('input')); })()"
        )
        return sorted(page.evaluate(visible))

    assert type_filter("BOILER") == ["line-1/boiler/pressure", "line-1/boiler/temperature"]
    assert type_filter("plc/#") == ["plc/meter/current", "plc/meter/voltage"]
    assert type_filter("+/+/voltage") == ["plc/meter/voltage"]
    assert type_filter("nothing") == []
    assert page.evaluate("document.getElementById('readings').innerText").endswith(
        "No topic matches “nothing”."
    )
    assert len(type_filter("")) == 5
    page.close()
