"""Commands end to end in the real ``edge-gateway run`` (a subprocess), with real peers:
httpx calling the API as CPI's HTTP receiver adapter would (Basic auth over TLS), pymodbus's
server as the Modbus device whose datastore the write must reach, the ``websockets`` library
as the device that receives a command and acks it; a restart keeps a pending command; expiry;
``/readyz`` following a bus down and up; ``/metrics`` parsed by Prometheus's own parser;
``edge-gateway send-command`` through the same API."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import websockets.exceptions
import websockets.sync.client
from prometheus_client.parser import text_string_to_metric_families

from gateway.api import hash_password
from gateway.deviceauth import hash_token
from tests.conftest import ROOT, TIMEOUT, Daemon, NotifySocket, gateway_command, gateway_env
from tests.modbus_peer import ModbusPeer, device, free_port

OPERATOR, OPERATOR_PASSWORD = "cpi", "correct horse battery staple"
VIEWER, VIEWER_PASSWORD = "engineer", "a viewer's password"
HMI_TOKEN = "hmi-token-0123456789abcdefghijklmnop"

# Hashed once per session: scrypt takes a moment by design.
_HASHES: dict[str, str] = {}


def password_hash(password: str) -> str:
    if password not in _HASHES:
        _HASHES[password] = hash_password(password)
    return _HASHES[password]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_dir(tmp_path: Path, ca: trustme.CA) -> Path:
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return tmp_path


@pytest.fixture
def plc() -> Iterator[ModbusPeer]:
    # holding 0: setpoint (int16, 0.1 degC), coil 0: pump, input 0: temperature (read-only)
    peer = ModbusPeer([device(1, holding=[200], input=[215], coils=[False])]).start()
    yield peer
    peer.stop()


class Gateway:
    """One gateway config in ``tmp_path``; ``start()`` runs it (again, for a restart)."""

    def __init__(self, tmp_path: Path, plc: ModbusPeer, ca: trustme.CA) -> None:
        self.tmp_path = tmp_path
        self.api_port = free_port()
        self.wss_port = free_port()
        self.config = tmp_path / "gateway.toml"
        self.config.write_text(
            f"""
[gateway]
name = "e2e"
state_dir = '{tmp_path / "state"}'
status_interval = "200ms"
shutdown_timeout = "3s"

[supervisor]
backoff_initial = "50ms"
backoff_max = "200ms"

[[buses]]
name = "plc"
kind = "modbus-tcp"
host = "127.0.0.1"
port = {plc.port}
timeout = "500ms"

[[buses.devices]]
name = "boiler"
unit_id = 1
interval = "200ms"
points = [
  {{ name = "setpoint", table = "holding", address = 0, type = "int16", scale = 0.1, unit = "degC", writable = true, min = 0, max = 90 }},
  {{ name = "pump", table = "coil", address = 0, type = "bool", writable = true }},
  {{ name = "temperature", table = "input", address = 0, type = "int16", scale = 0.1, unit = "degC" }},
]

[device_plane]
listen = "127.0.0.1"
port = {self.wss_port}
tls_cert_file = "cert.pem"
tls_key_file = "key.pem"
local_access = false

[[device_plane.clients]]
id = "hmi-1"
token_sha256 = "{hash_token(HMI_TOKEN)}"
subscribe = ["#"]

[api]
listen = "127.0.0.1"
port = {self.api_port}
tls_cert_file = "cert.pem"
tls_key_file = "key.pem"
ready_cpi_failing_after = "1min"

[[api.users]]
name = "{OPERATOR}"
password_scrypt = "{password_hash(OPERATOR_PASSWORD)}"
role = "operator"

[[api.users]]
name = "{VIEWER}"
password_scrypt = "{password_hash(VIEWER_PASSWORD)}"
role = "viewer"
"""
        )
        self.ssl = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        self.daemon: Daemon | None = None

    def start(self) -> Daemon:
        self.daemon = Daemon(["run", "--config", str(self.config)], None, {})
        self.daemon.wait_for_log("gateway ready:")
        return self.daemon

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.running:
            self.daemon.send_signal(signal.SIGTERM)
            assert self.daemon.wait_exit() == 0

    def client(self, user: str = OPERATOR, password: str = OPERATOR_PASSWORD) -> httpx.Client:
        return httpx.Client(
            base_url=f"https://127.0.0.1:{self.api_port}",
            verify=self.ssl,
            auth=httpx.BasicAuth(user, password),
            timeout=TIMEOUT,
        )

    def device(self) -> Any:
        return websockets.sync.client.connect(
            f"wss://127.0.0.1:{self.wss_port}/",
            ssl=self.ssl,
            additional_headers={"Authorization": f"Bearer {HMI_TOKEN}"},
            open_timeout=TIMEOUT,
        )


@pytest.fixture
def gateway(tmp_path: Path, tls_dir: Path, plc: ModbusPeer, ca: trustme.CA) -> Iterator[Gateway]:
    g = Gateway(tmp_path, plc, ca)
    g.start()
    yield g
    if g.daemon is not None:
        g.daemon.kill()


def wait_until(check: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll an external process's state (the daemon's API) until ``check`` is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# ---- Modbus -----------------------------------------------------------------------------------


def test_a_write_lands_in_the_devices_datastore_once_per_id(
    gateway: Gateway, plc: ModbusPeer
) -> None:
    with gateway.client() as api:
        body = {"id": "cpi-1", "target": "modbus:plc/boiler/setpoint", "value": 45.5,
                "read_back": True}  # fmt: skip
        r = api.post("/api/v1/commands", json=body)
        assert r.status_code == 200, r.text
        record = r.json()
        assert record["state"] == "done"
        assert record["result"] == {"written": 45.5, "read_back": 45.5}
        assert plc.get(1, 3, 0, 1) == [455]  # raw, scale 0.1

        # The same id again: the first result, and nothing is written again.
        plc.set(1, 6, 0, [123])
        again = api.post("/api/v1/commands", json=body)
        assert again.status_code == 200
        assert again.json()["result"] == record["result"]
        assert again.json()["created"] == record["created"]
        assert plc.get(1, 3, 0, 1) == [123]

        # The same id for another command: refused, naming the id.
        conflict = api.post("/api/v1/commands", json={**body, "value": 50})
        assert conflict.status_code == 409
        assert "cpi-1" in conflict.json()["error"]["message"]

        assert api.get("/api/v1/commands/cpi-1").json()["state"] == "done"

        # The register holds tenths: 12.34 becomes 12.3, and the result says so.
        r = api.post(
            "/api/v1/commands",
            json={"id": "cpi-r", "target": "modbus:plc/boiler/setpoint", "value": 12.34},
        )
        assert r.json()["result"] == {"written": 12.3, "requested": 12.34}
        assert plc.get(1, 3, 0, 1) == [123]
        r = api.post(
            "/api/v1/commands",
            json={"id": "cpi-s", "target": "modbus:plc/boiler/setpoint", "value": 3.3},
        )
        assert r.json()["result"] == {"written": 3.3}

        r = api.post("/api/v1/commands", json={"id": "cpi-2", "target": "modbus:plc/boiler/pump",
                                                "value": True})  # fmt: skip
        assert r.status_code == 200, r.text
        assert plc.get(1, 1, 0, 1) == [True]


def test_xml_from_an_iflow_is_answered_in_xml(gateway: Gateway, plc: ModbusPeer) -> None:
    xml = (
        b"<?xml version='1.0'?><command><id>cpi-x1</id>"
        b"<target>modbus:plc/boiler/setpoint</target><value>12.5</value></command>"
    )
    with gateway.client() as api:
        r = api.post("/api/v1/commands", content=xml, headers={"Content-Type": "application/xml"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(("application/xml", "text/xml"))
    assert b"<state>done</state>" in r.content
    assert plc.get(1, 3, 0, 1) == [125]


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        ({"id": "b1", "target": "modbus:plc/boiler/temperature", "value": 1}, 422,
         "not-writable", "temperature"),
        ({"id": "b2", "target": "modbus:plc/boiler/setpoint", "value": 95}, 422,
         "not-writable", "max"),
        ({"id": "b3", "target": "modbus:plc/boiler/setpoint", "value": "hot"}, 422,
         "not-writable", "number"),
        ({"id": "b4", "target": "modbus:plc/boiler/nothing", "value": 1}, 404,
         "unknown-target", "nothing"),
        ({"id": "b5", "target": "modbus:kiln/boiler/setpoint", "value": 1}, 404,
         "unknown-target", "kiln"),
        ({"id": "b6", "target": "device:nobody", "name": "x"}, 404, "unknown-target", "nobody"),
        ({"id": "b7", "target": "plc/boiler/setpoint", "value": 1}, 400, "bad-target", "modbus:"),
        ({"target": "modbus:plc/boiler/setpoint", "value": 1}, 400, None, "id"),
    ],
)  # fmt: skip
def test_bad_commands_are_refused_and_nothing_is_written(
    gateway: Gateway,
    plc: ModbusPeer,
    body: dict[str, object],
    status: int,
    code: str | None,
    words: str,
) -> None:
    with gateway.client() as api:
        r = api.post("/api/v1/commands", json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        if code is not None:
            assert error["code"] == code
        assert words in error["message"]
        if "id" in body:  # not recorded: the id is free for a corrected command
            assert api.get(f"/api/v1/commands/{body['id']}").status_code == 404
    assert plc.get(1, 3, 0, 1) == [200]


def test_malformed_expired_and_unauthorised_requests(gateway: Gateway) -> None:
    with gateway.client() as api:
        r = api.post(
            "/api/v1/commands", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400
        past = iso(datetime.now(UTC) - timedelta(minutes=1))
        r = api.post(
            "/api/v1/commands",
            json={"id": "e1", "target": "modbus:plc/boiler/setpoint", "value": 1,
                  "expires": past},
        )  # fmt: skip
        assert r.status_code == 422
        assert "expire" in r.json()["error"]["message"]
    with gateway.client(password="wrong") as api:
        r = api.post("/api/v1/commands", json={"id": "a1", "target": "device:hmi-1", "name": "x"})
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Basic")
    with gateway.client(VIEWER, VIEWER_PASSWORD) as api:
        r = api.post("/api/v1/commands", json={"id": "a2", "target": "device:hmi-1", "name": "x"})
        assert r.status_code == 403
        assert api.get("/api/v1/commands/a2").status_code == 404


# ---- devices ----------------------------------------------------------------------------------


def test_a_connected_device_gets_the_command_and_its_ack_is_the_result(
    gateway: Gateway,
) -> None:
    with gateway.device() as ws, gateway.client() as api:
        ws.send(json.dumps({"type": "ping", "id": "p"}))
        assert json.loads(ws.recv(TIMEOUT))["type"] == "pong"  # connected and registered
        body = {"id": "cpi-d1", "target": "device:hmi-1", "name": "show-message",
                "args": {"text": "Batch 42 done"}, "timeout": 10}  # fmt: skip
        answer: dict[str, Any] = {}

        def device_side() -> None:
            frame = json.loads(ws.recv(TIMEOUT))
            answer.update(frame)
            ws.send(json.dumps({"type": "ack", "command_id": frame["command_id"], "ok": True,
                                "result": {"shown": True}}))  # fmt: skip

        t = threading.Thread(target=device_side)
        t.start()
        r = api.post("/api/v1/commands", json=body)
        t.join(TIMEOUT)
        assert answer["type"] == "command"
        assert answer["command_id"] == "cpi-d1"
        assert answer["name"] == "show-message"
        assert answer["args"] == {"text": "Batch 42 done"}
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "done"
        assert r.json()["result"] == {"shown": True}


def test_offline_device_202_kept_across_restart_delivered_on_connect(gateway: Gateway) -> None:
    with gateway.client() as api:
        r = api.post(
            "/api/v1/commands",
            json={"id": "cpi-o1", "target": "device:hmi-1", "name": "reboot", "timeout": 1},
        )
        assert r.status_code == 202, r.text
        assert r.json()["state"] == "pending"
        assert r.headers["location"] == "/api/v1/commands/cpi-o1"

    gateway.stop()
    gateway.start()

    with gateway.client() as api:
        assert api.get("/api/v1/commands/cpi-o1").json()["state"] == "pending"
        with gateway.device() as ws:
            frame = json.loads(ws.recv(TIMEOUT))
            assert frame["type"] == "command"
            assert frame["command_id"] == "cpi-o1"
            assert frame["name"] == "reboot"
            assert api.get("/api/v1/commands/cpi-o1").json()["state"] == "delivered"
            ws.send(json.dumps({"type": "ack", "command_id": "cpi-o1", "ok": True,
                                "result": {"rebooting": True}}))  # fmt: skip
            record = wait_until(
                lambda: (
                    rec
                    if (rec := api.get("/api/v1/commands/cpi-o1").json())["state"] == "done"
                    else None
                ),
                "the ack",
            )
        assert record["result"] == {"rebooting": True}
        assert record["error"] is None


def test_a_command_not_delivered_in_time_expires(gateway: Gateway) -> None:
    expires = iso(datetime.now(UTC) + timedelta(seconds=1))
    with gateway.client() as api:
        r = api.post(
            "/api/v1/commands",
            json={"id": "cpi-x", "target": "device:hmi-1", "name": "reboot", "timeout": 0.2,
                  "expires": expires},
        )  # fmt: skip
        assert r.status_code == 202
        record = wait_until(
            lambda: (
                rec
                if (rec := api.get("/api/v1/commands/cpi-x").json())["state"] == "expired"
                else None
            ),
            "expiry",
        )
        assert record["error"]
        with gateway.device() as ws:  # an expired command is not delivered
            ws.send(json.dumps({"type": "ping", "id": "after"}))
            assert json.loads(ws.recv(TIMEOUT)) == {"type": "pong", "id": "after"}


# ---- health, metrics, CLI ---------------------------------------------------------------------


def test_readyz_follows_a_bus_down_and_up_and_metrics_parse(
    gateway: Gateway, plc: ModbusPeer
) -> None:
    with httpx.Client(verify=gateway.ssl) as anyone:
        r = anyone.get(f"https://127.0.0.1:{gateway.api_port}/healthz")
        assert r.status_code == 200
    with gateway.client(VIEWER, VIEWER_PASSWORD) as api:
        wait_until(lambda: api.get("/readyz").status_code == 200, "ready")
        plc.stop()
        down = wait_until(
            lambda: r if (r := api.get("/readyz")).status_code == 503 else None, "503"
        )
        assert any("plc" in p for p in down.json()["problems"])
        # A write to a bus that is down: 503 with why, and nothing recorded.
        with gateway.client() as operator:
            r = operator.post(
                "/api/v1/commands",
                json={"id": "w-down", "target": "modbus:plc/boiler/setpoint", "value": 1},
            )
            assert r.status_code == 503, r.text
            assert "plc" in r.json()["error"]["message"]
        plc.start()
        wait_until(lambda: api.get("/readyz").status_code == 200, "ready again")

        text = api.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "edge_gateway_readings_published",
        "edge_gateway_bus_polls",
        "edge_gateway_bus_timeouts",
        "edge_gateway_wss_connections",
        "edge_gateway_commands",
    ):
        assert name in families, sorted(families)
    polls = [s for s in families["edge_gateway_bus_polls"].samples if s.labels["bus"] == "plc"]
    assert polls
    assert polls[0].value > 0


def test_send_command_cli_goes_through_the_api(gateway: Gateway, plc: ModbusPeer) -> None:
    password = gateway.tmp_path / "password"
    password.write_text(OPERATOR_PASSWORD + "\n")
    env = {**gateway_env(), "EDGE_GATEWAY_PASSWORD": ""}
    args = gateway_command(
        "send-command", "--config", str(gateway.config), "--user", OPERATOR,
        "--password-file", str(password), "--ca", str(gateway.tmp_path / "ca.pem"),
        "modbus:plc/boiler/setpoint", "33.3", "--id", "cli-1",
    )  # fmt: skip
    result = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "cli-1" in result.stdout
    assert "done" in result.stdout
    assert plc.get(1, 3, 0, 1) == [333]

    refused = subprocess.run(
        [*args[:-4], "modbus:plc/boiler/setpoint", "999", "--id", "cli-2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert refused.returncode == 65, refused.stderr
    assert "max" in refused.stderr


def test_an_api_port_in_use_ends_the_gateway_without_ready(
    gateway_config: Callable[..., Path],
    daemon: Callable[..., Daemon],
    notify_listener: NotifySocket,
    tls_dir: Path,
) -> None:
    # systemd must not hear READY=1 from a gateway whose API cannot listen: it exits 69.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = gateway_config(
            f"""
[api]
listen = "127.0.0.1"
port = {port}
tls_cert_file = '{tls_dir / "cert.pem"}'
tls_key_file = '{tls_dir / "key.pem"}'

[[api.users]]
name = "{OPERATOR}"
password_scrypt = "{password_hash(OPERATOR_PASSWORD)}"
role = "operator"
"""
        )
        d = daemon(config)
        assert d.wait_exit() == 69
    assert not [m for m in notify_listener.drain() if "READY=1" in m]
    critical = [line for line in d.lines if "CRITICAL" in line]
    assert critical, d.lines
    assert f"cannot listen on 127.0.0.1:{port}" in critical[0]
    assert "api api" not in critical[0]


def test_a_reload_to_a_taken_api_port_keeps_the_running_api(gateway: Gateway) -> None:
    assert gateway.daemon is not None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        text = gateway.config.read_text()
        # The same reload removes the viewer: the fallback must not bring it back.
        viewer = text.index(f'name = "{VIEWER}"')
        text = text[: text.rindex("[[api.users]]", 0, viewer)]
        gateway.config.write_text(text.replace(f"port = {gateway.api_port}", f"port = {busy}"))
        gateway.daemon.send_signal(signal.SIGHUP)
        line = gateway.daemon.wait_for_log("goes on with the previous address and port")
        assert f"cannot listen on 127.0.0.1:{busy}" in line
        assert "api api" not in line
        gateway.daemon.wait_for_log("reloaded")
        # Still running, and the API answers where it did, to the users of the new config.
        with gateway.client() as api:
            assert api.get("/readyz").status_code == 200
        with gateway.client(VIEWER, VIEWER_PASSWORD) as removed:
            assert removed.get("/readyz").status_code == 401
    assert gateway.daemon.running


def test_a_reload_without_the_api_closes_the_status_pages_live_view(gateway: Gateway) -> None:
    assert gateway.daemon is not None
    with gateway.client(VIEWER, VIEWER_PASSWORD) as api:
        live = api.get("/api/v1/live").json()
    page = websockets.sync.client.connect(
        live["url"],
        ssl=gateway.ssl,
        subprotocols=live["protocols"],
        origin=f"https://127.0.0.1:{gateway.api_port}",
        open_timeout=TIMEOUT,
    )
    with page:
        page.send(json.dumps({"type": "ping", "id": "p"}))
        assert json.loads(page.recv(TIMEOUT))["type"] == "pong"
        text = gateway.config.read_text()
        gateway.config.write_text(text[: text.index("[api]")])
        gateway.daemon.send_signal(signal.SIGHUP)
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            drain(page)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008


def drain(ws: Any) -> None:
    """Receive until the connection closes (which raises)."""
    while True:
        ws.recv(TIMEOUT)


STANDIN = """
import functools, json, sys, trio
from pathlib import Path
from gateway.cpistandin import CpiStandIn, serve_standin

async def main():
    app = CpiStandIn(auth="basic", client_id="sb-test", client_secret="s3cret-of-the-test",
                     csrf=False, commands=json.loads(sys.argv[3]))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(
            serve_standin, app, cert_file=Path(sys.argv[1]), key_file=Path(sys.argv[2])))
        print(f"port {port}", flush=True)

trio.run(main)
"""


def test_commands_in_cpis_answer_go_through_the_same_router(
    gateway: Gateway, plc: ModbusPeer, tls_dir: Path
) -> None:
    # CPI answers a batch with two commands: a write, and one refused as out of range.
    commands = [
        {"id": "cpi-resp-1", "target": "modbus:plc/boiler/setpoint", "value": 61.5},
        {"id": "cpi-resp-2", "target": "modbus:plc/boiler/setpoint", "value": 999},
    ]
    standin = subprocess.Popen(
        [sys.executable, "-c", STANDIN, str(tls_dir / "cert.pem"), str(tls_dir / "key.pem"),
         json.dumps(commands)],
        cwd=ROOT, env=gateway_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert standin.stdout is not None
        port = int(standin.stdout.readline().split()[1])
        (tls_dir / "cpi-secret").write_text("s3cret-of-the-test")
        text = gateway.config.read_text()
        gateway.config.write_text(
            text
            + f"""
[cpi]
url = "https://127.0.0.1:{port}/http/edge/readings"
auth = "basic"
client_id = "sb-test"
client_secret_file = "cpi-secret"
ca_file = "ca.pem"
csrf = false
linger = "100ms"
"""
        )
        gateway.stop()
        gateway.start()
        with gateway.client() as api:
            record = wait_until(
                lambda: (
                    rec
                    if (r := api.get("/api/v1/commands/cpi-resp-1")).status_code == 200
                    and (rec := r.json())["state"] == "done"
                    else None
                ),
                "the command from CPI's answer",
            )
            assert record["source"] == "cpi"
            assert plc.get(1, 3, 0, 1) == [615]
            # The refused one ran nowhere and is not recorded; the journal says why.
            assert api.get("/api/v1/commands/cpi-resp-2").status_code == 404
        assert gateway.daemon is not None
        line = gateway.daemon.wait_for_log("cpi-resp-2")
        assert "max" in line
    finally:
        standin.kill()
        standin.wait()
