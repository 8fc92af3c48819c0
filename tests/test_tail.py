"""``edge-gateway tail`` against a real device plane over real TLS (trustme) on loopback, in the
same trio run: ``run_tail`` writes to in-memory streams the test waits on."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import localendpoint, tail
from gateway.core.configtypes import Duration, Name, Secret
from gateway.core.reading import Quality, Reading
from gateway.deviceauth import DeviceClient, DevicePlaneSection, hash_token
from gateway.deviceplane import DevicePlane
from gateway.hub import Hub, Subscription
from gateway.localendpoint import LocalEndpoint
from gateway.tail import TailError, Target, run_tail
from tests.conftest import TIMEOUT, gateway_command, gateway_env

CONSOLE_TOKEN = "console-token-0123456789abcdefghijkl"
SENSOR_TOKEN = "sensor-token-0123456789abcdefghijklm"

CLIENTS = (
    # What the gateway's local token will allow: every topic.
    DeviceClient(id=Name("console"), token_sha256=hash_token(CONSOLE_TOKEN), subscribe=("#",)),
    DeviceClient(
        id=Name("sensor-7"),
        token_sha256=hash_token(SENSOR_TOKEN),
        subscribe=("devices/sensor-7/#",),
    ),
)

# 2024-05-01T12:00:00.250Z
T0 = datetime(2024, 5, 1, 12, 0, 0, 250_000, tzinfo=UTC).timestamp()


# ---- the server -----------------------------------------------------------------------------


class WatchedHub(Hub):
    """A hub that lets a test wait until a client's subscription is in place."""

    def __init__(self) -> None:
        super().__init__()
        self._subscribed = trio.Event()

    def subscribe(self, name: str, patterns: Iterable[str] = ("#",), **kwargs: Any) -> Subscription:
        sub = super().subscribe(name, patterns, **kwargs)
        self._subscribed.set()
        return sub

    async def wait_subscribed(self) -> None:
        with trio.fail_after(TIMEOUT):
            await self._subscribed.wait()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_files(tmp_path: Path, cert_pem: bytes, key_pem: bytes) -> dict[str, Secret]:
    """``tls_cert_file`` and ``tls_key_file`` for the section, written below ``tmp_path``."""
    cert_file, key_file = tmp_path / "server-cert.pem", tmp_path / "server-key.pem"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    return {
        "tls_cert_file": Secret(cert_file, cert_pem.decode()),
        "tls_key_file": Secret(key_file, key_pem.decode()),
    }


def issued(ca: trustme.CA, tmp_path: Path, *names: str) -> dict[str, Secret]:
    cert = ca.issue_cert(*names)
    return tls_files(tmp_path, cert.cert_chain_pems[0].bytes(), cert.private_key_pem.bytes())


def self_signed(tmp_path: Path, hostname: str) -> dict[str, Secret]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return tls_files(tmp_path, cert.public_bytes(serialization.Encoding.PEM), key_pem)


@pytest.fixture
def section(ca: trustme.CA, tmp_path: Path) -> DevicePlaneSection:
    return DevicePlaneSection(
        listen="127.0.0.1", port=0, clients=CLIENTS, **issued(ca, tmp_path, "127.0.0.1")
    )


@attrs.define
class Gateway:
    plane: DevicePlane
    hub: WatchedHub
    scope: trio.CancelScope

    @property
    def url(self) -> str:
        scheme = "ws" if self.plane.section.plain else "wss"
        return f"{scheme}://127.0.0.1:{self.plane.port}/"

    def stop(self) -> None:
        self.scope.cancel()


@pytest.fixture
async def gateway(section: DevicePlaneSection) -> AsyncIterator[Callable[..., Any]]:
    """``await start(**section changes) -> Gateway``: a device plane serving on loopback."""
    async with trio.open_nursery() as nursery:

        async def start(**changes: Any) -> Gateway:
            hub = WatchedHub()
            plane = DevicePlane(attrs.evolve(section, **changes), hub, shutdown_timeout=5.0)
            scope = trio.CancelScope()

            async def run(task_status: trio.TaskStatus[None]) -> None:
                with scope:
                    await plane.run(task_status=task_status)

            await nursery.start(run)
            return Gateway(plane, hub, scope)

        yield start
        nursery.cancel_scope.cancel()


# ---- the client -----------------------------------------------------------------------------


class Output(io.StringIO):
    """A text stream a test can wait on."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = trio.Event()

    def write(self, text: str) -> int:
        self._changed.set()
        return super().write(text)

    def lines(self) -> list[str]:
        return self.getvalue().splitlines()

    async def wait_lines(self, n: int) -> list[str]:
        with trio.fail_after(TIMEOUT):
            while len(self.lines()) < n:
                await self._changed.wait()
                self._changed = trio.Event()
        return self.lines()


class Tail:
    """One ``run_tail`` in the test's nursery."""

    def __init__(self) -> None:
        self.out = Output()
        self.err = Output()
        self.status: int | None = None
        self._done = trio.Event()

    async def run(self, target: Target, topics: list[str], kwargs: dict[str, Any]) -> None:
        self.status = await run_tail(target, topics, out=self.out, err=self.err, **kwargs)
        self._done.set()

    async def wait(self) -> int:
        with trio.fail_after(TIMEOUT):
            await self._done.wait()
        assert self.status is not None
        return self.status


@pytest.fixture
def client_ssl(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def start_tail(nursery: trio.Nursery, client_ssl: ssl.SSLContext) -> Callable[..., Tail]:
    def start(
        url: str,
        *topics: str,
        token: str = CONSOLE_TOKEN,
        ssl_context: ssl.SSLContext | str | None = "default",
        target: Target | None = None,
        **kwargs: Any,
    ) -> Tail:
        if target is None:
            context = client_ssl if ssl_context == "default" else ssl_context
            assert not isinstance(context, str)
            target = Target(url, token, context if url.startswith("wss:") else None)
        t = Tail()
        nursery.start_soon(t.run, target, list(topics) or ["#"], kwargs)
        return t

    return start


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edge-gateway")
    tail.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["tail", *argv])


def free_port() -> int:
    """A loopback port that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# ---- printing -------------------------------------------------------------------------------


async def test_readings_printed_one_line_each(
    gateway: Callable[..., Any], start_tail: Callable[..., Tail]
) -> None:
    gw = await gateway()
    t = start_tail(gw.url)
    await gw.hub.wait_subscribed()
    gw.hub.publish(Reading("line-1/boiler/temperature", 71.25, unit="degC", timestamp=T0))
    gw.hub.publish(
        Reading("line-1/boiler/flow", None, quality=Quality.BAD, reason="timeout", timestamp=T0)
    )
    gw.hub.publish(Reading("line-1/door/state", "open", timestamp=T0 + 1))
    gw.hub.publish(Reading("devices/hmi-1/x", True, timestamp=T0 + 2))
    gw.hub.publish(Reading("line-1/boiler/parts", 12, unit="\x1b[31m", timestamp=T0 + 3))
    assert await t.out.wait_lines(5) == [
        "2024-05-01T12:00:00.250Z  line-1/boiler/temperature  71.25 degC",
        # The topic column widens to the longest topic so far.
        "2024-05-01T12:00:00.250Z  line-1/boiler/flow         null  (bad: timeout)",
        '2024-05-01T12:00:01.250Z  line-1/door/state          "open"',
        "2024-05-01T12:00:02.250Z  devices/hmi-1/x            true",
        # A terminal never gets control characters from a reading.
        "2024-05-01T12:00:03.250Z  line-1/boiler/parts        12 \\x1b[31m",
    ]
    assert t.err.getvalue() == ""


async def test_json_lines(gateway: Callable[..., Any], start_tail: Callable[..., Tail]) -> None:
    gw = await gateway()
    t = start_tail(gw.url, json_lines=True)
    await gw.hub.wait_subscribed()
    readings = [
        Reading("line-1/boiler/temperature", 71.25, unit="degC", timestamp=T0),
        Reading("line-1/boiler/flow", None, quality=Quality.BAD, reason="timeout", timestamp=T0),
    ]
    gw.hub.publish_many(readings)
    lines = await t.out.wait_lines(2)
    assert [json.loads(line) for line in lines] == [r.as_dict() for r in readings]


async def test_only_the_topics_asked_for(
    gateway: Callable[..., Any], start_tail: Callable[..., Tail]
) -> None:
    gw = await gateway()
    t = start_tail(gw.url, "line-1/+/temperature", "devices/hmi-1/#")
    await gw.hub.wait_subscribed()
    gw.hub.publish(Reading("line-1/boiler/flow", 1.0, timestamp=T0))
    gw.hub.publish(Reading("devices/sensor-7/x", 1.0, timestamp=T0))
    gw.hub.publish(Reading("line-1/boiler/temperature", 2.0, timestamp=T0))
    gw.hub.publish(Reading("devices/hmi-1/y", 3.0, timestamp=T0))
    # In order: had the others been sent, they would have come first.
    lines = await t.out.wait_lines(2)
    assert [line.split()[1:] for line in lines] == [
        ["line-1/boiler/temperature", "2.0"],
        ["devices/hmi-1/y", "3.0"],
    ]


@pytest.mark.parametrize("last", [True, False])
async def test_last_asks_for_the_latest_values_at_once(
    gateway: Callable[..., Any], start_tail: Callable[..., Tail], last: bool
) -> None:
    gw = await gateway()
    gw.hub.publish(Reading("line-1/boiler/temperature", 70.0, timestamp=T0))
    gw.hub.publish(Reading("line-2/boiler/temperature", 50.0, timestamp=T0))
    t = start_tail(gw.url, "line-1/#", last=last)
    await gw.hub.wait_subscribed()
    gw.hub.publish(Reading("line-1/boiler/temperature", 71.0, timestamp=T0 + 1))
    lines = await t.out.wait_lines(2 if last else 1)
    values = [line.split()[-1] for line in lines]
    assert values == (["70.0", "71.0"] if last else ["71.0"])


async def test_a_closed_output_ends_quietly(
    gateway: Callable[..., Any], start_tail: Callable[..., Tail], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.deviceplane")
    gw = await gateway()
    t = start_tail(gw.url)
    t.out.flush = _broken_pipe  # type: ignore[method-assign]
    await gw.hub.wait_subscribed()
    gw.hub.publish(Reading("line-1/boiler/flow", 1.0, timestamp=T0))
    assert await t.wait() == 141
    assert t.err.getvalue() == ""
    # tail still said goodbye: a normal close, not a dropped connection.
    with trio.fail_after(TIMEOUT):
        while gw.plane.statistics().connections:
            await trio.testing.wait_all_tasks_blocked()
    assert "device console disconnected (1000)" in caplog.text


def _broken_pipe() -> None:
    raise BrokenPipeError(32, "Broken pipe")


# ---- how it ends ----------------------------------------------------------------------------


async def test_gateway_stopping_ends_tail_with_0(
    gateway: Callable[..., Any], start_tail: Callable[..., Tail]
) -> None:
    gw = await gateway()
    t = start_tail(gw.url)
    await gw.hub.wait_subscribed()
    gw.stop()
    assert await t.wait() == 0
    assert "the gateway is shutting down or restarting (1001" in t.err.getvalue()


async def test_forbidden_topic_is_an_error_and_exit_1(
    gateway: Callable[..., Any], start_tail: Callable[..., Tail]
) -> None:
    gw = await gateway()
    t = start_tail(gw.url, "devices/sensor-7/#", "line-1/#", token=SENSOR_TOKEN)
    assert await t.wait() == 1
    err = t.err.getvalue()
    assert "tail: error from the gateway (forbidden): topics: 'line-1/#' not within" in err
    assert gw.hub.statistics().subscriptions == 0
    # tail closed the connection itself.
    with trio.fail_after(TIMEOUT):
        while gw.plane.statistics().connections:
            await trio.testing.wait_all_tasks_blocked()


async def test_unknown_token_gets_77_without_showing_it(
    gateway: Callable[..., Any], start_tail: Callable[..., Tail]
) -> None:
    gw = await gateway()
    wrong = "wrong-token-0123456789abcdefghijklmn"
    t = start_tail(gw.url, token=wrong)
    assert await t.wait() == 77
    err = t.err.getvalue()
    assert err == "tail: token refused (401): check --token-file, --token or EDGE_GATEWAY_TOKEN\n"
    assert wrong not in err
    assert gw.plane.statistics().refused == 1


async def test_too_many_connections_is_unavailable(
    gateway: Callable[..., Any], start_tail: Callable[..., Tail]
) -> None:
    gw = await gateway(max_connections=1)
    first = start_tail(gw.url)
    await gw.hub.wait_subscribed()
    second = start_tail(gw.url)
    assert await second.wait() == 69
    assert "the gateway refused the connection (503: too many connections" in second.err.getvalue()
    assert first.status is None


async def test_connection_refused_is_69(start_tail: Callable[..., Tail]) -> None:
    t = start_tail(f"wss://127.0.0.1:{free_port()}/")
    assert await t.wait() == 69
    assert "tail: cannot connect to 127.0.0.1:" in t.err.getvalue()
    assert "connection refused: is the gateway running" in t.err.getvalue()


# ---- TLS ------------------------------------------------------------------------------------


async def test_untrusted_certificate_is_69_with_the_hint(
    gateway: Callable[..., Any], start_tail: Callable[..., Tail]
) -> None:
    gw = await gateway()
    # The system's trust store does not know trustme's CA.
    t = start_tail(gw.url, ssl_context=ssl.create_default_context())
    assert await t.wait() == 69
    err = t.err.getvalue()
    assert err.startswith("tail: certificate verify failed: ")
    assert "pass --ca with the server's certificate" in err
    assert gw.hub.statistics().subscriptions == 0


async def test_ca_option(
    gateway: Callable[..., Any], start_tail: Callable[..., Tail], ca: trustme.CA, tmp_path: Path
) -> None:
    gw = await gateway()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    t = start_tail(
        gw.url,
        target=tail.resolve(
            parse("--url", gw.url, "--ca", str(ca_file)), {"EDGE_GATEWAY_TOKEN": CONSOLE_TOKEN}
        ),
    )
    await gw.hub.wait_subscribed()
    gw.hub.publish(Reading("line-1/boiler/flow", 1.0, timestamp=T0))
    assert len(await t.out.wait_lines(1)) == 1

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    t = start_tail(
        gw.url,
        target=tail.resolve(
            parse("--url", gw.url, "--ca", str(other)), {"EDGE_GATEWAY_TOKEN": CONSOLE_TOKEN}
        ),
    )
    assert await t.wait() == 69
    assert f"does not match --ca {other}: is it the right server" in t.err.getvalue()


@pytest.mark.parametrize("kind", ["ca-issued", "self-signed"])
async def test_local_endpoint_pins_the_certificate_whatever_its_name(
    gateway: Callable[..., Any],
    start_tail: Callable[..., Tail],
    ca: trustme.CA,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    # Issued for another name than 127.0.0.1 (nothing resolves it: tail connects to the URL).
    files = (
        issued(ca, tmp_path, "gateway.invalid")
        if kind == "ca-issued"
        else self_signed(tmp_path, "gateway.invalid")
    )
    gw = await gateway(**files)
    runtime = tmp_path / "run"
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    cert_file = str(files["tls_cert_file"].source)
    localendpoint.write(LocalEndpoint(gw.url, CONSOLE_TOKEN, cert_file, os.getpid()), runtime)

    target = tail.resolve(parse(), {})
    assert (target.url, target.token, target.token_source) == (
        gw.url,
        CONSOLE_TOKEN,
        f"the local endpoint file {runtime / localendpoint.FILE_NAME}",
    )
    t = start_tail(gw.url, target=target)
    await gw.hub.wait_subscribed()
    gw.hub.publish(Reading("line-1/boiler/flow", 1.0, timestamp=T0))
    assert len(await t.out.wait_lines(1)) == 1

    # The same certificate with names checked (--ca): refused, for its name.
    t = start_tail(
        gw.url,
        target=tail.resolve(
            parse("--url", gw.url, "--ca", cert_file), {"EDGE_GATEWAY_TOKEN": CONSOLE_TOKEN}
        ),
    )
    assert await t.wait() == 69
    assert "certificate is not valid for '127.0.0.1'" in t.err.getvalue()
    assert (
        "connect with a name or address the server's certificate was issued for" in t.err.getvalue()
    )


async def test_pin_is_the_leaf_not_its_ca(
    gateway: Callable[..., Any], start_tail: Callable[..., Tail], ca: trustme.CA, tmp_path: Path
) -> None:
    gw = await gateway()  # a certificate of ``ca`` for 127.0.0.1
    # Another leaf of the same CA, with the CA's certificate after it in the file.
    other = ca.issue_cert("127.0.0.1")
    pinned = tmp_path / "other.pem"
    pinned.write_bytes(other.cert_chain_pems[0].bytes() + ca.cert_pem.bytes())
    t = start_tail(
        gw.url,
        target=Target(
            gw.url, CONSOLE_TOKEN, tail.pinned_context(str(pinned)), trust="the pinned one"
        ),
    )
    assert await t.wait() == 69
    assert "does not match the pinned one" in t.err.getvalue()


async def test_plain_ws(gateway: Callable[..., Any], start_tail: Callable[..., Tail]) -> None:
    gw = await gateway(plain=True, tls_cert_file=None, tls_key_file=None)
    assert gw.url.startswith("ws://")
    t = start_tail(gw.url)
    await gw.hub.wait_subscribed()
    gw.hub.publish(Reading("line-1/boiler/flow", 1.0, timestamp=T0))
    assert len(await t.out.wait_lines(1)) == 1


async def test_wss_to_a_plain_server(
    gateway: Callable[..., Any], start_tail: Callable[..., Tail]
) -> None:
    gw = await gateway(plain=True, tls_cert_file=None, tls_key_file=None)
    t = start_tail(gw.url.replace("ws://", "wss://"))
    assert await t.wait() == 69
    assert "does the server speak TLS? For a plain server, write ws://" in t.err.getvalue()


async def test_ws_to_a_tls_server_fails_when_it_hangs_up(
    gateway: Callable[..., Any], start_tail: Callable[..., Tail]
) -> None:
    # The server drops the connection once its handshake timeout has passed; trio-websocket
    # alone would then still wait for the client's connect timeout (an hour here).
    gw = await gateway(handshake_timeout=Duration(0.1))
    t = start_tail(gw.url.replace("wss://", "ws://"), connect_timeout=3600)
    assert await t.wait() == 69
    assert "closed the connection without answering the WebSocket handshake" in t.err.getvalue()


async def test_no_answer_within_the_timeout(
    start_tail: Callable[..., Tail], autojump_clock: trio.testing.MockClock
) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:  # accepts nothing: the TCP connection is made, nothing answers
        t = start_tail(f"ws://127.0.0.1:{port}/", connect_timeout=5)
        assert await t.wait() == 69
    assert t.err.getvalue() == f"tail: ws://127.0.0.1:{port}/ did not answer within 5s\n"


# ---- the command line -----------------------------------------------------------------------


def test_token_sources(tmp_path: Path) -> None:
    token_file = tmp_path / "hmi.token"
    token_file.write_text(CONSOLE_TOKEN + "\n")
    url = "wss://127.0.0.1:9/"
    target = tail.resolve(
        parse("--url", url, "--token-file", str(token_file)), {"EDGE_GATEWAY_TOKEN": "x" * 30}
    )
    assert (target.token, target.token_source) == (CONSOLE_TOKEN, f"--token-file {token_file}")
    assert CONSOLE_TOKEN not in repr(target)
    target = tail.resolve(parse("--url", url), {"EDGE_GATEWAY_TOKEN": CONSOLE_TOKEN})
    assert (target.token, target.token_source) == (CONSOLE_TOKEN, "EDGE_GATEWAY_TOKEN")
    target = tail.resolve(parse("--url", url, "--token", CONSOLE_TOKEN), {})
    assert (target.token, target.token_source) == (CONSOLE_TOKEN, "--token")
    assert target.ssl_context is not None
    assert target.ssl_context.check_hostname
    assert (
        tail.resolve(
            parse("--url", "ws://127.0.0.1:9/"), {"EDGE_GATEWAY_TOKEN": CONSOLE_TOKEN}
        ).ssl_context
        is None
    )


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--url", "wss://h:1"], {}, "no token: give --token-file FILE, or set EDGE_GATEWAY_TOKEN"),
        (["--url", "wss://h:1", "--token", "a b"], {}, "--token: the token has spaces"),
        (
            ["--url", "wss://h:1", "--token-file", "/nonexistent/t"],
            {},
            "--token-file /nonexistent/t: no such file or directory",
        ),
        (
            ["--url", "ws://h:1", "--ca", "/x"],
            {"EDGE_GATEWAY_TOKEN": CONSOLE_TOKEN},
            "--ca: ws://h:1 is plain ws://",
        ),
        (
            ["--url", "wss://h:1", "--ca", "/nonexistent/ca"],
            {"EDGE_GATEWAY_TOKEN": CONSOLE_TOKEN},
            "--ca /nonexistent/ca: no such file",
        ),
    ],
)
def test_usage_problems_exit_2(argv: list[str], env: dict[str, str], expected: str) -> None:
    with pytest.raises(TailError) as info:
        tail.resolve(parse(*argv), env)
    assert info.value.status == 2
    assert str(info.value).startswith(expected)


def test_empty_token_file(tmp_path: Path) -> None:
    empty = tmp_path / "t"
    empty.write_text("\n")
    with pytest.raises(TailError, match="the file is empty: write the token in it"):
        tail.resolve(parse("--url", "wss://h:1", "--token-file", str(empty)), {})


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--url", "https://h:1"], "argument --url: 'https://h:1' is not a ws:// or wss:// URL"),
        (["--url", "wss://h:99999"], "argument --url: 'wss://h:99999' is not a URL"),
        # The password is not echoed.
        (["--url", "wss://user:pw@h:1"], "argument --url: wss://...@: give the token with"),
        (["line-1/#/x"], "argument TOPIC: "),
        (["--token", "a", "--token-file", "b"], "not allowed with argument --token"),
    ],
)
def test_argparse_refuses(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "pw" not in err


def test_defaults() -> None:
    args = parse()
    assert (args.url, args.token, args.token_file, args.ca, args.json, args.last, args.topics) == (
        None,
        None,
        None,
        None,
        False,
        False,
        [],
    )
    args = parse("--json", "--last", "line-1/#", "devices/+/t")
    assert (args.json, args.last, args.topics) == (True, True, ["line-1/#", "devices/+/t"])


def test_no_local_gateway(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(localendpoint, "candidates", lambda: [tmp_path / localendpoint.FILE_NAME])
    assert tail.main(parse()) == 69
    err = capsys.readouterr().err
    assert err.startswith("tail: no local device plane found; looked at:\n")
    assert f"{tmp_path / localendpoint.FILE_NAME}: not there" in err
    assert err.endswith("Or give --url, and a token (--token-file or EDGE_GATEWAY_TOKEN).\n")


def test_local_endpoint_not_readable_is_77(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / localendpoint.FILE_NAME
    monkeypatch.setattr(localendpoint, "candidates", lambda: [path])

    def refuse(*args: object) -> bytes:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(localendpoint, "read_regular_file", refuse)
    with pytest.raises(TailError) as info:
        tail.resolve(parse(), {})
    assert info.value.status == 77
    assert "join group edge-gateway" in str(info.value)


def test_local_endpoint_token_only_without_another(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    localendpoint.write(
        LocalEndpoint("ws://127.0.0.1:9", "local-token-0123456789abcdefghij", None, os.getpid()),
        tmp_path,
    )
    target = tail.resolve(parse(), {"EDGE_GATEWAY_TOKEN": CONSOLE_TOKEN})
    assert (target.url, target.token, target.ssl_context) == (
        "ws://127.0.0.1:9",
        CONSOLE_TOKEN,
        None,
    )
    assert tail.resolve(parse(), {}).token == "local-token-0123456789abcdefghij"


@pytest.mark.parametrize("early", [False, True], ids=["connected", "while-importing"])
def test_sigterm_ends_tail(tmp_path: Path, early: bool) -> None:
    # A server that accepts and never answers: tail waits in its handshake.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        token = tmp_path / "token"
        token.write_text("a-token-of-twenty-or-more-characters")
        tail = subprocess.Popen(
            gateway_command("tail", "--url", f"ws://127.0.0.1:{port}", "--token-file", str(token)),
            env=gateway_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            if early:  # while Python is still importing: not remembered as for the daemon
                tail.send_signal(signal.SIGTERM)
                assert tail.wait(TIMEOUT) == -signal.SIGTERM
                return
            connection, _ = server.accept()  # tail is connected, so past its start-up
            with connection:
                tail.send_signal(signal.SIGTERM)
                assert tail.wait(TIMEOUT) == -signal.SIGTERM
        finally:
            tail.kill()
            tail.wait()
