"""The management API: a real ``Api`` on 127.0.0.1 (port 0) over real TLS (trustme), httpx
as the client (as CPI's HTTP receiver adapter or a browser would call it), the real command
parser and record forms, a fake router and fake services built from the real statistics
value classes."""

from __future__ import annotations

import base64
import io
import json
import logging
import ssl
import threading
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
import trustme
from prometheus_client.parser import text_string_to_metric_families

from gateway import api as api_module
from gateway.api import (
    CSP_PAGE,
    Api,
    ApiSection,
    ApiUser,
    LiveAccess,
    accept_prefers_xml,
    hash_password,
    hash_password_command,
    parse_scrypt,
    ready_report,
    request_host,
    server_ssl_context,
    verify_password,
)
from gateway.commands import CommandLimits, CommandStatistics
from gateway.core.commands import (
    CommandRecord,
    CommandRejected,
    CommandRequest,
    CommandState,
    Source,
    Unavailable,
)
from gateway.core.component import StartPolicy, State
from gateway.core.configtypes import Duration, Secret, Size
from gateway.core.reading import Quality, Reading
from gateway.supervisor import GatewayStatistics, SupervisedStatistics
from tests.test_metrics import (
    NOW,
    component,
    device_stats,
    forwarder_stats,
    gateway_statistics,
    modbus_stats,
)

TIMEOUT = 10.0
OPERATOR = ("cpi", "correct horse battery staple")
VIEWER = ("engineer", "viewer password 42")


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def users() -> tuple[ApiUser, ...]:
    return (
        ApiUser(OPERATOR[0], hash_password(OPERATOR[1]), role="operator"),
        ApiUser(VIEWER[0], hash_password(VIEWER[1]), role="viewer"),
    )


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def secret(path: Path) -> Secret:
    return Secret(path, path.read_text())


@pytest.fixture
def tls(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("cpi-tenant")
    files = {
        "cert": tmp_path / "api-cert.pem",
        "key": tmp_path / "api-key.pem",
        "ca": tmp_path / "ca.pem",
        "client": tmp_path / "client.pem",
    }
    server.cert_chain_pems[0].write_to_path(files["cert"])
    server.private_key_pem.write_to_path(files["key"])
    ca.cert_pem.write_to_path(files["ca"])
    client.private_key_and_cert_chain_pem.write_to_path(files["client"])
    return files


@pytest.fixture
def section(tls: dict[str, Path], users: tuple[ApiUser, ...]) -> ApiSection:
    return ApiSection(
        listen="127.0.0.1",
        port=0,
        tls_cert_file=secret(tls["cert"]),
        tls_key_file=secret(tls["key"]),
        users=users,
        max_body=Size(2048),
    )


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def record(request: CommandRequest, state: CommandState, status: int, **more: Any) -> CommandRecord:
    return CommandRecord(
        request=request,
        source=Source.API,
        state=state,
        created=NOW,
        updated=NOW,
        status=status,
        **more,
    )


class FakeRouter:
    """Answers by target, as the real router would for such a bus or device."""

    def __init__(self) -> None:
        self.limits = CommandLimits()
        self.records: dict[str, CommandRecord] = {}
        self.executed: list[CommandRequest] = []

    async def execute(self, request: CommandRequest, source: Source) -> CommandRecord:
        await trio.lowlevel.checkpoint()
        assert source is Source.API
        known = self.records.get(request.id)
        if known is not None:
            if known.request != request:
                raise CommandRejected(409, "id-conflict", f"id {request.id} was another command")
            return known
        point = str(request.target).rsplit("/", 1)[-1]
        if point == "missing":
            raise CommandRejected(404, "unknown-target", f"{request.target}: no such point")
        if point == "readonly":
            raise CommandRejected(422, "not-writable", f"{request.target}: read-only")
        if str(request.target).startswith("modbus:down/"):
            raise Unavailable("bus down is down (/dev/ttyUSB9 missing): nothing was written")
        self.executed.append(request)
        if point == "refused":
            result = record(request, CommandState.FAILED, 502, error="exception 02")
        elif point == "slow":
            result = record(request, CommandState.FAILED, 504, error="timeout")
        elif point == "late":
            result = record(request, CommandState.EXPIRED, 410, error="expired")
        elif request.target.__class__.__name__ == "DeviceTarget":
            result = record(request, CommandState.PENDING, 202)
        else:
            result = record(request, CommandState.DONE, 200, result={"written": request.value})
        self.records[request.id] = result
        return result

    async def get(self, id: str) -> CommandRecord | None:
        await trio.lowlevel.checkpoint()
        return self.records.get(id)

    async def recent(self, limit: int) -> list[CommandRecord]:
        await trio.lowlevel.checkpoint()
        return list(reversed(self.records.values()))[:limit]

    def statistics(self) -> CommandStatistics:
        return CommandStatistics(
            by_state={"done": len(self.records)}, executed=1, rejected=2, unmatched_acks=0
        )


@attrs.define
class FakeServices:
    gateway_name: str = "plant-7"
    components: list[SupervisedStatistics] = attrs.Factory(
        lambda: list(gateway_statistics().components)
    )
    readings: list[Reading] = attrs.Factory(list)
    the_router: FakeRouter | None = attrs.Factory(FakeRouter)
    access: LiveAccess | None = None
    live_down: bool = False
    """``live()`` raises ``Unavailable``: a device plane configured, not running now."""
    origins: list[str | None] = attrs.Factory(list)
    broken: bool = False

    def statistics(self) -> GatewayStatistics:
        if self.broken:
            raise RuntimeError("a defect in statistics()")
        return attrs.evolve(gateway_statistics(), components=tuple(self.components))

    def latest(self) -> list[Reading]:
        return self.readings

    def router(self) -> FakeRouter | None:
        return self.the_router

    def live(self, origin: str | None, user: str | None = None) -> LiveAccess | None:
        self.origins.append(origin)
        if self.live_down:
            raise Unavailable("the device plane is not running now (see /readyz): try again")
        return self.access

    def replace(self, name: str, **changes: Any) -> None:
        self.components = [
            attrs.evolve(c, **changes) if c.name == name else c for c in self.components
        ]


@pytest.fixture
def services() -> FakeServices:
    return FakeServices()


@attrs.define
class Server:
    api: Api
    url: str
    verify: ssl.SSLContext | bool

    def client(self, auth: tuple[str, str] | None = OPERATOR, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, verify=self.verify, auth=auth, timeout=TIMEOUT, **kwargs
        )


@pytest.fixture
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def start(
    nursery: trio.Nursery,
    section: ApiSection,
    services: FakeServices,
    client_ssl: ssl.SSLContext,
    tmp_path: Path,
) -> Callable[..., Awaitable[Server]]:
    clock = Clock()
    page = tmp_path / "statuspage.html"
    page.write_text("<!doctype html><title>edge-gateway</title>")

    async def start(
        *, wall_clock: Clock = clock, status_page: Path | None = page, **changes: Any
    ) -> Server:
        api = Api(
            attrs.evolve(section, **changes),
            services,
            wall_clock=wall_clock,
            status_page=status_page,
        )
        await nursery.start(api.run)
        scheme = "http" if api.section.plain else "https"
        return Server(api, f"{scheme}://127.0.0.1:{api.port}", client_ssl)

    return start


@pytest.fixture
async def server(start: Callable[..., Awaitable[Server]]) -> Server:
    return await start()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with server.client() as c:
        yield c


def error(response: httpx.Response) -> dict[str, str]:
    body: dict[str, dict[str, str]] = response.json()
    return body["error"]


SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}


def assert_secure(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value, name
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


# ---- health, auth, routing ----------------------------------------------------------------------


async def test_healthz_needs_no_auth(server: Server) -> None:
    async with server.client(auth=None) as c:
        r = await c.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "alive"}
    assert r.headers["content-type"] == "application/json"
    assert_secure(r)


async def test_401_is_the_same_for_no_auth_a_bad_password_and_an_unknown_user(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    answers = []
    for auth in (None, (OPERATOR[0], "wrong"), ("nobody", OPERATOR[1])):
        async with server.client(auth=auth) as c:
            answers.append(await c.get("/readyz"))
    for r in answers:
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Basic realm="edge-gateway"'
        assert r.json() == answers[0].json()
        assert_secure(r)
    assert error(answers[0])["code"] == "unauthorized"
    # No credentials at all is how a browser asks for them: only the two bad ones count.
    assert server.api.statistics().auth_failures == 2
    # One warning per peer per minute, with the user name and never the password.
    warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.api"]
    warnings = [w for w in warnings if "authentication failed" in w]
    assert warnings == ["api: authentication failed for user 'cpi' from 127.0.0.1 (wrong password)"]
    assert OPERATOR[1] not in caplog.text


@pytest.fixture
def password_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords the API checks from now on (each an scrypt), in order."""
    calls: list[str] = []

    def counting(password: str, stored: str) -> bool:
        calls.append(password)
        return verify_password(password, stored)

    monkeypatch.setattr(api_module, "verify_password", counting)
    return calls


async def test_a_user_name_that_keeps_failing_is_refused_without_a_password_check(
    server: Server, password_checks: list[str]
) -> None:
    calls = password_checks
    async with server.client(auth=(OPERATOR[0], "wrong")) as c:
        for _ in range(api_module.PEER_FAILURES):
            assert (await c.get("/readyz")).status_code == 401
        r = await c.get("/readyz")
    assert r.status_code == 429
    assert error(r)["code"] == "too-many-failures"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert len(calls) == api_module.PEER_FAILURES  # the 11th cost no scrypt
    # Even the right password waits out the window, for that user from that address: no
    # guessing through...
    async with server.client() as c:
        assert (await c.get("/readyz")).status_code == 429
    # ...while another user from the same address (all of CPI behind one Cloud Connector)
    # is not locked out by it.
    async with server.client(auth=VIEWER) as c:
        assert (await c.get("/readyz")).status_code == 200


async def test_too_many_password_checks_at_once_get_503_at_once(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    checks: list[str] = []

    def held(password: str, stored: str) -> bool:
        checks.append(password)
        release.wait(TIMEOUT)
        return verify_password(password, stored)

    monkeypatch.setattr(api_module, "verify_password", held)
    answers: list[int] = []

    async def login(c: httpx.AsyncClient, password: str) -> None:
        answers.append((await c.get("/readyz", auth=(OPERATOR[0], password))).status_code)

    async with server.client(auth=None) as c:
        try:
            async with trio.open_nursery() as nursery:
                for n in range(api_module.MAX_VERIFYING):
                    nursery.start_soon(login, c, f"wrong {n}")
                with trio.fail_after(TIMEOUT):
                    # Two checks run on the worker threads, the others wait for one.
                    while server.api._verifying < api_module.MAX_VERIFYING:
                        await trio.testing.wait_all_tasks_blocked(0.01)
                started = trio.current_time()
                r = await c.get("/readyz", auth=(OPERATOR[0], "one more"))
                assert r.status_code == 503
                assert error(r)["code"] == "busy"
                assert r.headers["retry-after"] == "1"
                assert trio.current_time() - started < 1  # at once, not after the queue
                assert answers == []
                assert "one more" not in checks
                release.set()
        finally:
            release.set()
    assert answers == [401] * api_module.MAX_VERIFYING
    # The checks are done: the next login is checked again.
    async with server.client() as c:
        assert (await c.get("/readyz")).status_code == 200


async def test_a_success_is_remembered_a_failure_is_not(
    server: Server, password_checks: list[str]
) -> None:
    calls = password_checks
    async with server.client() as c:
        for _ in range(3):
            assert (await c.get("/readyz")).status_code == 200
    assert calls == [OPERATOR[1]]
    async with server.client(auth=(OPERATOR[0], "wrong")) as c:
        for _ in range(2):
            assert (await c.get("/readyz")).status_code == 401
    assert calls == [OPERATOR[1], "wrong", "wrong"]


async def test_a_reload_that_removes_a_user_locks_it_out_at_once(
    server: Server, section: ApiSection, users: tuple[ApiUser, ...]
) -> None:
    async with server.client() as c:
        assert (await c.get("/readyz")).status_code == 200  # now remembered
        server.api.reconfigure(attrs.evolve(section, users=users[1:]))
        assert (await c.get("/readyz")).status_code == 401
    async with server.client(auth=VIEWER) as c:
        assert (await c.get("/readyz")).status_code == 200


async def test_a_viewer_reads_but_cannot_send_commands(
    server: Server, services: FakeServices
) -> None:
    async with server.client(auth=VIEWER) as c:
        for path in ("/readyz", "/metrics", "/", "/api/v1/status", "/api/v1/commands"):
            assert (await c.get(path)).status_code == 200, path
        r = await c.post(
            "/api/v1/commands", json={"id": "a", "target": "modbus:plc/m/p", "value": 1}
        )
    assert r.status_code == 403
    assert error(r)["code"] == "forbidden"
    assert "viewer" in error(r)["message"]
    assert services.the_router is not None
    assert services.the_router.executed == []


async def test_unknown_path_and_wrong_method(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/v2/everything")
    assert r.status_code == 404
    assert error(r)["code"] == "not-found"
    assert_secure(r)
    r = await client.delete("/api/v1/commands")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD, POST"
    assert error(r)["code"] == "method-not-allowed"
    r = await client.post("/readyz")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    r = await client.head("/readyz")
    assert r.status_code == 200
    assert r.content == b""
    assert int(r.headers["content-length"]) > 0


# ---- commands -----------------------------------------------------------------------------------


async def test_a_modbus_write_done_is_200_with_its_record(
    client: httpx.AsyncClient, services: FakeServices
) -> None:
    command = {"id": "cpi-4711", "target": "modbus:plc/meter/setpoint", "value": 21.5}
    r = await client.post("/api/v1/commands", json=command)
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == "cpi-4711"
    assert body["state"] == "done"
    assert body["result"] == {"written": 21.5}
    assert body["status_url"] == "/api/v1/commands/cpi-4711"
    assert "location" not in r.headers
    assert_secure(r)
    # The same id again: the same record, not executed twice (the router's idempotency).
    again = await client.post("/api/v1/commands", json=command)
    assert again.status_code == 200
    assert again.json() == body
    assert services.the_router is not None
    assert len(services.the_router.executed) == 1


async def test_a_pending_device_command_is_202_with_location_then_readable(
    client: httpx.AsyncClient,
) -> None:
    command = {
        "id": "cpi 4712/b",
        "target": "device:hmi-1",
        "name": "show-message",
        "args": {"text": "hi"},
    }
    r = await client.post("/api/v1/commands", json=command)
    assert r.status_code == 202
    assert r.headers["location"] == "/api/v1/commands/cpi%204712%2Fb"
    assert r.json()["state"] == "pending"
    got = await client.get(r.headers["location"])
    assert got.status_code == 200
    assert got.json() == r.json()
    missing = await client.get("/api/v1/commands/never-sent")
    assert missing.status_code == 404
    assert error(missing)["code"] == "unknown-command"
    unencoded = await client.get("/api/v1/commands/cpi 4712/b")
    assert unencoded.status_code == 404
    assert "percent-encoded" in error(unencoded)["message"]


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        ("modbus:plc/meter/refused", 502, None),
        ("modbus:plc/meter/slow", 504, None),
        ("modbus:plc/meter/late", 410, None),
        ("modbus:plc/meter/missing", 404, "unknown-target"),
        ("modbus:plc/meter/readonly", 422, "not-writable"),
        ("modbus:down/meter/setpoint", 503, "unavailable"),
    ],
)
async def test_each_outcome_has_its_status(
    client: httpx.AsyncClient, target: str, status: int, code: str | None
) -> None:
    r = await client.post("/api/v1/commands", json={"id": "c-1", "target": target, "value": 1})
    assert r.status_code == status
    if code is None:
        assert r.json()["state"] in ("failed", "expired")
    else:
        assert error(r)["code"] == code
        assert error(r)["message"]


async def test_bad_input_from_the_real_parser(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/api/v1/commands", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert (r.status_code, error(r)["code"]) == (400, "malformed")
    r = await client.post(
        "/api/v1/commands", content=b"id=1", headers={"content-type": "text/plain"}
    )
    assert (r.status_code, error(r)["code"]) == (415, "unsupported-media-type")
    # (An expires in the past is the router's to refuse: tests/test_commands.py and the e2e.)
    await client.post(
        "/api/v1/commands", json={"id": "same", "target": "modbus:plc/m/p", "value": 1}
    )
    r = await client.post(
        "/api/v1/commands", json={"id": "same", "target": "modbus:plc/m/p", "value": 2}
    )
    assert (r.status_code, error(r)["code"]) == (409, "id-conflict")


async def test_xml_in_gives_xml_out(client: httpx.AsyncClient) -> None:
    body = (
        b"<command><id>cpi-4711</id><target>modbus:plc/meter/setpoint</target>"
        b"<value>21.5</value><timeout>5</timeout><read_back>true</read_back></command>"
    )
    r = await client.post(
        "/api/v1/commands", content=body, headers={"content-type": "application/xml"}
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/xml"
    root = ET.fromstring(r.content)
    assert root.tag == "command"
    assert root.findtext("state") == "done"
    assert root.findtext("result/written") == "21.5"
    # An error in XML, too.
    r = await client.post(
        "/api/v1/commands",
        content=b"<command><id>x</id><target>modbus:plc/m/missing</target><value>1</value></command>",
        headers={"content-type": "text/xml"},
    )
    assert r.status_code == 404
    root = ET.fromstring(r.content)
    assert (root.tag, root.findtext("code")) == ("error", "unknown-target")
    # A DOCTYPE is refused (the parser's rule), answered in XML.
    r = await client.post(
        "/api/v1/commands",
        content=b'<!DOCTYPE x [<!ENTITY e "e">]><command><id>&e;</id></command>',
        headers={"content-type": "application/xml"},
    )
    assert r.status_code == 400
    assert ET.fromstring(r.content).findtext("code") == "malformed"


async def test_accept_chooses_the_answer_format(client: httpx.AsyncClient) -> None:
    command = {"id": "j", "target": "modbus:plc/meter/setpoint", "value": 1}
    r = await client.post("/api/v1/commands", json=command, headers={"accept": "application/xml"})
    assert r.headers["content-type"] == "application/xml"
    assert ET.fromstring(r.content).findtext("id") == "j"
    r = await client.get(
        "/api/v1/commands/j", headers={"accept": "application/json;q=0.5, text/xml"}
    )
    assert ET.fromstring(r.content).findtext("id") == "j"
    r = await client.get("/api/v1/commands", headers={"accept": "application/xml"})
    root = ET.fromstring(r.content)
    assert [c.findtext("id") for c in root.findall("command")] == ["j"]
    r = await client.get("/api/v1/commands/nope", headers={"accept": "application/xml"})
    assert r.status_code == 404
    assert ET.fromstring(r.content).findtext("code") == "unknown-command"
    # JSON wins when Accept prefers it, even for an XML body.
    r = await client.post(
        "/api/v1/commands",
        content=b"<command><id>j</id><target>modbus:plc/meter/setpoint</target><value>1</value></command>",
        headers={"content-type": "application/xml", "accept": "application/json"},
    )
    assert r.json()["id"] == "j"


def test_accept_header_preference() -> None:
    assert accept_prefers_xml(None) is None
    assert accept_prefers_xml("*/*") is None
    assert accept_prefers_xml("application/xml") is True
    assert accept_prefers_xml("text/xml;q=0.9, application/json") is False
    assert accept_prefers_xml("application/json;q=0.1, application/xml;q=0.2") is True
    assert accept_prefers_xml("application/xml, application/json") is True  # tie: first
    assert accept_prefers_xml("application/json, application/xml") is False
    assert accept_prefers_xml("application/xml;q=0") is None
    assert accept_prefers_xml("application/xml;q=nan") is None


async def test_a_body_that_trickles_in_is_408_and_nothing_runs(
    server: Server, services: FakeServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_module, "BODY_TIMEOUT", 0.3)
    assert isinstance(server.verify, ssl.SSLContext)
    port = int(server.url.rsplit(":", 1)[1])
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=server.verify, https_compatible=True
    )
    credentials = base64.b64encode(f"{OPERATOR[0]}:{OPERATOR[1]}".encode()).decode()
    await stream.send_all(
        b"POST /api/v1/commands HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n"
        + f"Authorization: Basic {credentials}\r\n\r\n".encode()
        + b'{"id": "slow",'  # and then nothing more
    )
    answer = b""
    with trio.fail_after(TIMEOUT):
        while b"\r\n\r\n" not in answer:
            answer += await stream.receive_some()
    assert answer.startswith(b"HTTP/1.1 408")
    await trio.aclose_forcefully(stream)
    assert services.the_router is not None
    assert services.the_router.executed == []


async def test_a_body_over_max_body_is_413_and_not_read_to_the_end(
    server: Server, client: httpx.AsyncClient, services: FakeServices
) -> None:
    big = {"id": "big", "target": "device:hmi-1", "name": "n", "args": {"text": "x" * 3000}}
    r = await client.post("/api/v1/commands", json=big)
    assert r.status_code == 413
    assert error(r)["code"] == "too-large"
    assert "2048" in error(r)["message"]
    # The unread rest of the body does not confuse the next request (hypercorn closes or
    # drains that connection; httpx opens another when it must).
    assert (await client.get("/readyz")).status_code == 200

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        yield json.dumps(big).encode()[:1500]
        yield json.dumps(big).encode()[1500:]

    async with server.client() as fresh:
        r = await fresh.post(
            "/api/v1/commands", content=chunks(), headers={"content-type": "application/json"}
        )
    assert r.status_code == 413
    assert services.the_router is not None
    assert services.the_router.executed == []


async def test_list_of_commands_newest_first_with_a_limit(client: httpx.AsyncClient) -> None:
    for n in range(3):
        await client.post(
            "/api/v1/commands", json={"id": f"c{n}", "target": "modbus:plc/m/p", "value": n}
        )
    r = await client.get("/api/v1/commands", params={"limit": 2})
    assert [c["id"] for c in r.json()["commands"]] == ["c2", "c1"]
    r = await client.get("/api/v1/commands")
    assert [c["id"] for c in r.json()["commands"]] == ["c2", "c1", "c0"]
    for bad in ("0", "x", "100000"):
        r = await client.get("/api/v1/commands", params={"limit": bad})
        assert (r.status_code, error(r)["code"]) == (400, "bad-limit")


async def test_a_list_of_commands_is_written_out_off_the_event_loop(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(3):
        await client.post(
            "/api/v1/commands", json={"id": f"c{n}", "target": "modbus:plc/m/p", "value": n}
        )
    threads: list[threading.Thread] = []

    def watched(write: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
        def on_its_thread(records: Any) -> bytes:
            threads.append(threading.current_thread())
            return write(records)

        return on_its_thread

    monkeypatch.setattr(api_module, "records_xml", watched(api_module.records_xml))
    monkeypatch.setattr(api_module, "_records_json", watched(api_module._records_json))
    r = await client.get("/api/v1/commands", params={"limit": 1000})
    assert [c["id"] for c in r.json()["commands"]] == ["c2", "c1", "c0"]
    r = await client.get("/api/v1/commands", headers={"accept": "application/xml"})
    assert [c.findtext("id") for c in ET.fromstring(r.content)] == ["c2", "c1", "c0"]
    assert len(threads) == 2
    assert threading.main_thread() not in threads


async def test_without_a_router_commands_are_503(
    client: httpx.AsyncClient, services: FakeServices
) -> None:
    services.the_router = None
    r = await client.post(
        "/api/v1/commands", json={"id": "a", "target": "modbus:plc/m/p", "value": 1}
    )
    assert (r.status_code, error(r)["code"]) == (503, "unavailable")
    assert "nothing was executed" in error(r)["message"]
    assert (await client.get("/api/v1/commands/a")).status_code == 503
    assert (await client.get("/api/v1/commands")).status_code == 503
    status = await client.get("/api/v1/status")
    assert status.status_code == 200
    assert status.json()["commands"] == []


# ---- readiness, metrics, status -----------------------------------------------------------------


async def test_readyz_turns_503_when_a_bus_is_down_or_cpi_fails_too_long_and_back(
    start: Callable[..., Awaitable[Server]], services: FakeServices
) -> None:
    clock = Clock()
    server = await start(wall_clock=clock, ready_cpi_failing_after=Duration(300.0))
    async with server.client(auth=VIEWER) as c:
        r = await c.get("/readyz")
        assert r.status_code == 200
        body = r.json()
        assert body["ready"] is True
        assert body["problems"] == []
        assert body["wss_clients"] == 2
        assert body["outbox"] == {"backlog": 1234, "backlog_bytes": 56789, "dead_letters": 2}
        assert body["cpi"]["failing_since"] is None
        plc = next(x for x in body["components"] if x["name"] == "plc")
        assert plc == {
            "name": "plc",
            "kind": "bus",
            "state": "degraded",
            "since": "2027-01-15T07:59:00.000Z",
            "reason": "pump not answering",
            "last_error": None,
        }
        assert [(d["device"], d["state"]) for d in body["devices"]] == [
            ("meter", "up"),
            ("pump", "down"),
        ]
        assert body["devices"][0]["last_error"] == "timeout"
        assert body["devices"][0]["last_success"] == "2027-01-15T07:59:59.000Z"

        services.replace(
            "line-1",
            health=attrs.evolve(
                services.components[1].health, state=State.DOWN, reason="/dev/ttyUSB0 missing"
            ),
        )
        r = await c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["ready"] is False
        assert r.json()["problems"] == ["bus line-1 is down: /dev/ttyUSB0 missing"]

        services.replace(
            "line-1",
            health=attrs.evolve(services.components[1].health, state=State.UP, reason=None),
        )
        services.replace("cpi forwarder", part=forwarder_stats(failing_since=NOW - 100))
        assert (await c.get("/readyz")).status_code == 200  # failing, not for long yet
        clock.now = NOW + 201  # 301 s
        r = await c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["problems"] == [
            "CPI has been failing for 5min (more than 5min): 503 Service Unavailable"
        ]
        assert r.json()["cpi"]["last_failure_reason"] == "503 Service Unavailable"

        services.replace("cpi forwarder", part=forwarder_stats())
        assert (await c.get("/readyz")).status_code == 200


def test_a_required_component_starting_is_not_ready() -> None:
    stats = gateway_statistics(
        [
            component("outbox database", "outbox", None, State.STARTING),
            component("line-1", "bus", None, State.STARTING, "first poll of meter"),
        ]
    )
    body = ready_report(stats, now=NOW, cpi_failing_after=300)
    assert body["ready"] is False
    assert body["problems"] == ["outbox outbox database is starting"]  # a bus may start
    assert body["outbox"] is None
    assert body["cpi"] is None


def test_required_is_the_components_start_policy_not_its_kind() -> None:
    stats = gateway_statistics(
        [
            component("spool", "outbox", None, State.STARTING, policy=StartPolicy.SUPERVISED),
            component("plc", "bus", None, State.STARTING, policy=StartPolicy.REQUIRED),
        ]
    )
    body = ready_report(stats, now=NOW, cpi_failing_after=300)
    assert body["problems"] == ["bus plc is starting"]
    assert body["ready"] is False


async def test_when_full_the_failed_logins_forget_ended_windows_first(server: Server) -> None:
    api = server.api
    now = trio.current_time()
    for n in range(api_module.AUTH_CACHE_SIZE - 1):
        api._count_peer_failure((f"10.0.{n // 256}.{n % 256}", "cpi"), now - api_module.PEER_WINDOW)
    guessing = ("192.0.2.1", "cpi")
    for _ in range(api_module.PEER_FAILURES):
        api._count_peer_failure(guessing, now - 1)
    api._count_peer_failure(("192.0.2.2", "cpi"), now)  # a new address, the table full
    # The one still guessing keeps its count: refused without a password check.
    assert api._peer_failures[guessing] == (now - 1, api_module.PEER_FAILURES)
    assert len(api._peer_failures) == 2


def test_a_device_is_down_when_its_bus_is() -> None:
    bus = component("plc", "bus", modbus_stats({"meter": device_stats()}), State.DOWN, "refused")
    body = ready_report(gateway_statistics([bus]), now=NOW, cpi_failing_after=300)
    assert [d["state"] for d in body["devices"]] == ["down"]


async def test_metrics_parse_with_the_prometheus_parser(client: httpx.AsyncClient) -> None:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert_secure(r)
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert families["edge_gateway_readings_published"].samples[0].value == 98765
    assert {s.labels["state"]: s.value for s in families["edge_gateway_commands"].samples} == {
        "done": 0
    }
    assert families["edge_gateway_cpi_request_duration_seconds"].type == "histogram"


async def test_status_has_readiness_readings_commands_and_live(
    client: httpx.AsyncClient, services: FakeServices
) -> None:
    services.readings = [
        Reading("plc/meter/power", 12.5, unit="kW", timestamp=NOW),
        Reading("plc/pump/flow", None, quality=Quality.BAD, reason="timeout", timestamp=NOW),
        Reading("line-1/x/nan", float("nan"), timestamp=NOW),
    ]
    await client.post("/api/v1/commands", json={"id": "c1", "target": "modbus:plc/m/p", "value": 3})
    r = await client.get("/api/v1/status")
    assert r.status_code == 200
    body = r.json()
    assert body["gateway"] == "plant-7"
    assert body["version"] == api_module.__version__
    assert body["ready"] is True
    assert body["readings"][:2] == [
        {
            "topic": "plc/meter/power",
            "value": 12.5,
            "unit": "kW",
            "quality": "good",
            "ts": "2027-01-15T08:00:00.000Z",
            "reason": None,
        },
        {
            "topic": "plc/pump/flow",
            "value": None,
            "unit": None,
            "quality": "bad",
            "ts": "2027-01-15T08:00:00.000Z",
            "reason": "timeout",
        },
    ]
    assert body["readings"][2]["value"] is None  # NaN is not JSON
    assert [c["id"] for c in body["commands"]] == ["c1"]
    assert body["live"] is True
    assert services.origins == []  # no token minted for a status poll


async def test_live_gives_the_device_plane_address_and_a_token(
    server: Server, client: httpx.AsyncClient, services: FakeServices
) -> None:
    services.access = LiveAccess(port=8443, tls=True, token="viewer-token-1")
    r = await client.get("/api/v1/live")
    assert r.status_code == 200
    assert r.json() == {
        "url": "wss://127.0.0.1:8443/",
        "token": "viewer-token-1",
        "protocols": ["edge-gateway.v1", "bearer.viewer-token-1"],
    }
    assert services.origins == [f"https://127.0.0.1:{server.api.port}"]
    r = await client.get("/api/v1/live", headers={"host": "[::1]:9443"})
    assert r.json()["url"] == "wss://[::1]:8443/"
    r = await client.get("/api/v1/live", headers={"host": "gw.plant.local"})
    assert r.json()["url"] == "wss://gw.plant.local:8443/"
    assert services.origins[-1] == "https://gw.plant.local"
    r = await client.get("/api/v1/live", headers={"host": "evil/path"})
    assert (r.status_code, error(r)["code"]) == (400, "bad-host")
    services.access = None
    r = await client.get("/api/v1/live")
    assert (r.status_code, error(r)["code"]) == (404, "no-device-plane")


async def test_live_is_503_while_the_device_plane_is_configured_but_down(
    client: httpx.AsyncClient, services: FakeServices
) -> None:
    services.live_down = True
    r = await client.get("/api/v1/live")
    assert (r.status_code, error(r)["code"]) == (503, "unavailable")
    assert "not running now" in error(r)["message"]
    services.live_down = False
    services.access = LiveAccess(port=8443, tls=True, token="viewer-token-1")
    assert (await client.get("/api/v1/live")).status_code == 200


def test_request_host() -> None:
    assert request_host("127.0.0.1:9443") == "127.0.0.1"
    assert request_host("[::1]:9443") == "[::1]"
    assert request_host("[::1]") == "[::1]"
    assert request_host("GW.plant.local") == "gw.plant.local"
    assert request_host(None) is None
    assert request_host("[nope]:1") is None
    assert request_host("a b") is None
    assert request_host("x:99999999") is None


async def test_the_status_page(start: Callable[..., Awaitable[Server]], tmp_path: Path) -> None:
    server = await start()
    async with server.client(auth=VIEWER) as c:
        r = await c.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.text == "<!doctype html><title>edge-gateway</title>"
    assert r.headers["content-security-policy"] == CSP_PAGE
    assert "connect-src 'self' wss: ws:" in CSP_PAGE
    assert_secure(r)
    installed = await start(status_page=None)  # the package's own page, served as it is
    async with installed.client(auth=VIEWER) as c:
        r = await c.get("/")
    assert r.status_code == 200
    assert r.content == (Path(api_module.__file__).parent / "statuspage.html").read_bytes()
    missing = await start(status_page=tmp_path / "gone.html")
    async with missing.client() as c:
        r = await c.get("/")
    assert r.status_code == 500
    assert error(r)["code"] == "status-page-missing"
    assert "statuspage.html" in error(r)["message"]


async def test_a_defect_in_a_handler_is_a_500_and_the_server_goes_on(
    client: httpx.AsyncClient, services: FakeServices, caplog: pytest.LogCaptureFixture
) -> None:
    services.broken = True
    r = await client.get("/readyz")
    assert r.status_code == 500
    assert error(r)["code"] == "internal-error"
    assert_secure(r)
    assert "api: GET /readyz failed: RuntimeError: a defect in statistics()" in caplog.text
    services.broken = False
    assert (await client.get("/readyz")).status_code == 200


async def test_statistics_count_answers_by_status(
    server: Server, client: httpx.AsyncClient
) -> None:
    await client.get("/healthz")
    await client.get("/readyz")
    await client.get("/nope")
    stats = server.api.statistics()
    assert stats.requests == 3
    assert stats.by_status == {"200": 2, "404": 1}
    assert stats.port == server.api.port
    assert server.api.condition().state is State.UP


# ---- TLS and plain ------------------------------------------------------------------------------


async def test_client_certificates_are_required_with_client_ca_file(
    start: Callable[..., Awaitable[Server]], tls: dict[str, Path], client_ssl: ssl.SSLContext
) -> None:
    server = await start(client_ca_file=secret(tls["ca"]))
    async with server.client() as c:
        with pytest.raises(httpx.TransportError):
            await c.get("/healthz")
    with_cert = ssl.create_default_context(cafile=str(tls["ca"]))
    with_cert.load_cert_chain(str(tls["client"]))
    async with httpx.AsyncClient(base_url=server.url, verify=with_cert, auth=OPERATOR) as c:
        assert (await c.get("/readyz")).status_code == 200


def test_tls_is_at_least_1_2_and_http_1_1(section: ApiSection) -> None:
    context = server_ssl_context(section)
    assert context is not None
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert server_ssl_context(attrs.evolve(section, plain=True)) is None


async def test_plain_on_loopback_serves_http_with_a_warning(
    start: Callable[..., Awaitable[Server]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.api")
    server = await start(plain=True, tls_cert_file=None, tls_key_file=None)
    async with server.client() as c:
        assert (await c.get("/readyz")).status_code == 200
    records = [r for r in caplog.records if r.name == "gateway.api"]
    assert any(
        r.levelno == logging.INFO
        and r.getMessage() == f"api listening on http://127.0.0.1:{server.api.port}/"
        for r in records
    )
    assert any(r.levelno == logging.WARNING and "loopback" in r.getMessage() for r in records)


async def test_https_start_logs_its_url(
    start: Callable[..., Awaitable[Server]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.api")
    server = await start()
    assert f"api listening on https://127.0.0.1:{server.api.port}/" in caplog.text
    assert "plain" not in caplog.text


async def test_a_port_in_use_fails_the_start(
    start: Callable[..., Awaitable[Server]], server: Server
) -> None:
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{server.api.port}: .*in use"):
        await start(port=server.api.port)


# ---- config -------------------------------------------------------------------------------------


def problems(section: ApiSection) -> dict[str, str]:
    return dict(section.check())


def test_plain_only_on_loopback_or_for_cloud_connector(users: tuple[ApiUser, ...]) -> None:
    plain = ApiSection(listen="0.0.0.0", plain=True, users=users)
    found = problems(plain)
    assert list(found) == ["plain"]
    assert "loopback" in found["plain"]
    assert "cloud_connector = true" in found["plain"]
    assert problems(attrs.evolve(plain, cloud_connector=True)) == {}
    assert problems(attrs.evolve(plain, listen="127.0.0.1")) == {}
    assert problems(attrs.evolve(plain, listen="::1")) == {}
    assert "SAP Cloud Connector" in attrs.evolve(plain, cloud_connector=True).describe()


def test_https_needs_a_certificate_and_key(
    users: tuple[ApiUser, ...], section: ApiSection, tls: dict[str, Path]
) -> None:
    found = problems(ApiSection(users=users))
    assert set(found) == {"tls_cert_file", "tls_key_file"}
    assert problems(attrs.evolve(section, port=9443)) == {}
    assert "tls_cert_file" in problems(attrs.evolve(section, port=9443, plain=True))
    swapped = attrs.evolve(section, port=9443, tls_cert_file=secret(tls["key"]))
    assert "no PEM certificate" in problems(swapped)["tls_cert_file"]
    with_ca = attrs.evolve(section, port=9443, client_ca_file=secret(tls["cert"]))
    assert problems(with_ca) == {}
    assert "client certificates required" in with_ca.describe()


def test_users_are_checked_and_a_hash_is_never_echoed(users: tuple[ApiUser, ...]) -> None:
    base = ApiSection(listen="127.0.0.1", plain=True)
    assert "users" in problems(base)
    bad = attrs.evolve(
        base,
        users=(
            users[0],
            ApiUser("cpi", users[1].password_scrypt),
            ApiUser("a:b", users[0].password_scrypt),
            ApiUser("pw", "hunter2-plaintext"),
            ApiUser(
                "cheap",
                "scrypt$1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ),
            ApiUser(
                "huge",
                "scrypt$1048576$16$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ),
        ),
    )
    found = problems(bad)
    assert "duplicate name 'cpi'" in found["users[1].name"]
    assert "':'" in found["users[2].name"]
    assert "looks like a password" in found["users[3].password_scrypt"]
    assert "hunter2" not in " ".join(found.values())
    assert "n out of range" in found["users[4].password_scrypt"]
    assert "128MiB" in found["users[5].password_scrypt"]
    assert "hunter2" not in repr(bad)


def test_limits_are_checked(users: tuple[ApiUser, ...]) -> None:
    base = ApiSection(listen="127.0.0.1", plain=True, users=users)
    found = problems(
        attrs.evolve(
            base,
            port=70000,
            max_body=Size(10),
            command_timeout=Duration(90),
            command_expiry=Duration(8 * 86400),
            ready_cpi_failing_after=Duration(0),
        )
    )
    assert set(found) == {
        "port",
        "max_body",
        "command_timeout",
        "command_expiry",
        "ready_cpi_failing_after",
    }
    assert "max_command_timeout" in problems(attrs.evolve(base, max_command_timeout=Duration(3600)))
    assert "listen" in problems(attrs.evolve(base, listen="not a host"))


def test_restart_key_and_describe(section: ApiSection, users: tuple[ApiUser, ...]) -> None:
    assert (
        section.restart_key()
        == attrs.evolve(section, users=users[:1], max_body=Size(4096)).restart_key()
    )
    assert section.restart_key() != attrs.evolve(section, port=1).restart_key()
    assert attrs.evolve(section, port=9443).describe() == (
        "api: https://127.0.0.1:9443/, HTTPS, 2 users (1 operator, 1 viewer), "
        "commands wait 10s (at most 1min)"
    )
    viewers_only = attrs.evolve(section, port=9443, users=users[1:])
    assert viewers_only.describe().endswith(
        '; no operator: nobody can send commands (role = "operator" allows it)'
    )


# ---- passwords ----------------------------------------------------------------------------------


def test_hash_and_verify_a_password() -> None:
    stored = hash_password("s3cret passphrase")
    assert stored.split("$")[:4] == ["scrypt", "16384", "8", "1"]
    assert len(parse_scrypt(stored).salt) == 16
    assert verify_password("s3cret passphrase", stored)
    assert not verify_password("s3cret passphrasE", stored)
    assert hash_password("s3cret passphrase") != stored  # a fresh salt each time
    assert not verify_password("x", "not a hash")
    assert not verify_password("x", stored.replace("$16384$", "$2097152$"))  # beyond bounds
    assert not verify_password("x", api_module._NOBODY)


def test_hash_password_command() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert (
        hash_password_command(stdin=io.StringIO("a long enough password\n"), stdout=out, stderr=err)
        == 0
    )
    assert verify_password("a long enough password", out.getvalue().strip())
    assert err.getvalue() == ""
    out, err = io.StringIO(), io.StringIO()
    assert hash_password_command(stdin=io.StringIO("short\n"), stdout=out, stderr=err) == 0
    assert "warning" in err.getvalue()
    for text in ("", "\n"):
        err = io.StringIO()
        assert hash_password_command(stdin=io.StringIO(text), stdout=io.StringIO(), stderr=err) == 2
        assert err.getvalue().startswith("hash-password: ")


def test_hash_password_command_asks_twice_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    answers = iter(["first password!", "other password!"])
    monkeypatch.setattr(api_module.getpass, "getpass", lambda prompt: next(answers))
    out, err = io.StringIO(), io.StringIO()
    assert hash_password_command(stdin=Tty(), stdout=out, stderr=err) == 2
    assert out.getvalue() == ""
    assert "differ" in err.getvalue()
    answers = iter(["same password!!", "same password!!"])
    assert hash_password_command(stdin=Tty(), stdout=out, stderr=err) == 0
    assert verify_password("same password!!", out.getvalue().strip())
