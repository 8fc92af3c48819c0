"""``edge-gateway send-command``'s own checks, as a real subprocess: bad arguments exit 2 with
what to write instead, before anything is sent (the API calls are in test_commands_e2e.py)."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest
import trustme

from gateway import sendcommand
from gateway.api import MAX_COMMAND_TIMEOUT, hash_password

RunGateway = Callable[..., CompletedProcess[str]]
BASE = ("send-command", "--url", "https://127.0.0.1:1", "--user", "cpi")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("bogus:x", "1"), "starts with neither modbus: nor device:"),
        (("modbus:plc/meter/limit",), "needs a VALUE"),
        (("modbus:plc/meter/limit", "NaN"), "'NaN' is not a finite number"),
        (("modbus:plc/meter/limit", "1e999"), "is not a finite number"),
        (("device:hmi-1", "5"), "not a VALUE"),
        (("device:hmi-1",), "needs --name"),
        (("device:hmi-1", "--name", "x", "--arg", "novalue"), "write KEY=VALUE"),
        (("modbus:plc/meter/limit", "1", "--id", " "), "--id is empty"),
        (("--status", "c-1", "modbus:plc/meter/limit", "1"), "either --status ID or a TARGET"),
    ],
)
def test_bad_arguments_exit_2_and_say_what_to_write(
    run_gateway: RunGateway, args: tuple[str, ...], words: str
) -> None:
    result = run_gateway(*BASE, *args, EDGE_GATEWAY_PASSWORD="pw")
    assert result.returncode == 2, result.stderr
    assert words in result.stderr
    assert "crashed" not in result.stderr


def test_a_bad_url_or_ca_file_is_a_bad_argument(run_gateway: RunGateway, tmp_path: Path) -> None:
    ftp = run_gateway(
        "send-command", "--url", "ftp://x", "--user", "cpi", "device:a", "--name", "n",
        EDGE_GATEWAY_PASSWORD="pw",
    )  # fmt: skip
    assert ftp.returncode == 2
    assert "give https://" in ftp.stderr
    missing = run_gateway(
        *BASE, "--ca", str(tmp_path / "nope.pem"), "device:a", "--name", "n",
        EDGE_GATEWAY_PASSWORD="pw",
    )  # fmt: skip
    assert missing.returncode == 2
    assert "no such file" in missing.stderr


def test_nothing_listening_is_69_with_the_address(run_gateway: RunGateway) -> None:
    result = run_gateway(*BASE, "device:a", "--name", "n", EDGE_GATEWAY_PASSWORD="pw")
    assert result.returncode == 69
    assert "cannot reach the API at https://127.0.0.1:1" in result.stderr


# ---- TLS: what send-command trusts ----------------------------------------------------------


class _Api(http.server.BaseHTTPRequestHandler):
    """Answers any POST as a command done: enough to see the TLS handshake pass."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = json.dumps({"id": "c-1", "target": "device:a", "state": "done"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def https_api(cert: trustme.LeafCert) -> Iterator[int]:
    """An HTTPS server on 127.0.0.1 presenting ``cert``; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


HASH = hash_password("a long enough password")


def write_config(tmp_path: Path, port: int, cert: trustme.LeafCert, ca: trustme.CA) -> Path:
    """A config whose [api] uses ``cert``; its file holds the leaf followed by its CA, as a
    certificate file with its chain does."""
    tmp_path.mkdir(exist_ok=True)
    chain = b"".join(p.bytes() for p in cert.cert_chain_pems)
    (tmp_path / "cert.pem").write_bytes(chain + ca.cert_pem.bytes())
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[gateway]
name = "send-command"
state_dir = '{tmp_path / "state"}'

[api]
listen = "0.0.0.0"
port = {port}
tls_cert_file = "cert.pem"
tls_key_file = "key.pem"

[[api.users]]
name = "cpi"
password_scrypt = "{HASH}"
role = "operator"
"""
    )
    return config


def send(*args: str) -> int:
    parser = argparse.ArgumentParser()
    sendcommand.add_parser(parser.add_subparsers())
    return sendcommand.main(
        parser.parse_args(["send-command", "--user", "cpi", "device:a", "--name", "n", *args])
    )


def test_without_ca_exactly_the_gateways_own_certificate_is_trusted(
    tmp_path: Path,
    ca: trustme.CA,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(sendcommand.PASSWORD_ENV, "pw")
    # Issued for the plant's name, not for 127.0.0.1: pinned, so the name does not matter.
    gateway = ca.issue_cert("gw.plant.example")
    other = ca.issue_cert("127.0.0.1", "gw.plant.example")  # the same CA, all the right names
    with https_api(gateway) as port:
        config = write_config(tmp_path, port, gateway, ca)
        assert send("--config", str(config)) == 0
        assert "c-1 device:a: done" in capsys.readouterr().out
    with https_api(other) as port:
        config = write_config(tmp_path / "other", port, gateway, ca)
        assert send("--config", str(config)) == sendcommand.EX_UNAVAILABLE
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err


def test_ca_with_the_gateways_certificate_works_as_for_tail(
    tmp_path: Path,
    ca: trustme.CA,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(sendcommand.PASSWORD_ENV, "pw")
    gateway = ca.issue_cert("127.0.0.1")
    other = ca.issue_cert("127.0.0.1")
    leaf = tmp_path / "gateway-cert.pem"
    gateway.cert_chain_pems[0].write_to_path(str(leaf))
    with https_api(gateway) as port:
        assert send("--url", f"https://127.0.0.1:{port}", "--ca", str(leaf)) == 0
        config = write_config(tmp_path, port, gateway, ca)
        assert send("--config", str(config), "--ca", str(leaf)) == 0
    with https_api(other) as port:
        assert send("--url", f"https://127.0.0.1:{port}", "--ca", str(leaf)) == 69
    assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err


def test_the_client_waits_for_the_longest_command_but_not_forever() -> None:
    assert sendcommand.TIMEOUT.read is not None
    assert sendcommand.TIMEOUT.read > MAX_COMMAND_TIMEOUT
    assert sendcommand.TIMEOUT.connect == 10.0
