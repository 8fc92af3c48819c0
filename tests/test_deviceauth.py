"""The device plane's config section, token hashing, the handshake decision and the ACL.

Pure code: plain function calls, plus the real ``edge-gateway hash-token`` in a subprocess.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from gateway import deviceauth
from gateway.config import ConfigError, parse_config, summary
from gateway.core.configtypes import Name
from gateway.core.topics import matches
from gateway.deviceauth import (
    SUBPROTOCOL,
    Authenticator,
    DeviceClient,
    DevicePlaneSection,
    Identity,
    Refusal,
    generate_token,
    hash_token,
    pattern_within,
)
from tests.conftest import gateway_command, gateway_env

TOKEN = "s3cret-token-of-the-hmi-0123456789"
OTHER = "another-token-for-plc-7-abcdefghij"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_dir(tmp_path: Path, ca: trustme.CA) -> Path:
    cert = ca.issue_cert("gateway.plant.example")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return tmp_path


TLS = """
[device_plane]
tls_cert_file = "cert.pem"
tls_key_file = "key.pem"
"""


def load(text: str, config_dir: Path) -> DevicePlaneSection:
    config = parse_config(textwrap.dedent(text), config_dir=config_dir)
    assert config.device_plane is not None
    return config.device_plane


def problems(text: str, config_dir: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), config_dir=config_dir)
    return info.value.problems


def client_toml(id: str = "hmi-1", token: str = TOKEN, **extra: str) -> str:
    lines = [f'id = "{id}"', f'token_sha256 = "{hash_token(token)}"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n[[device_plane.clients]]\n" + "\n".join(lines) + "\n"


# ---- config ---------------------------------------------------------------------------------


def test_no_section_no_server() -> None:
    assert parse_config("").device_plane is None


def test_defaults(tls_dir: Path) -> None:
    plane = load(TLS, tls_dir)
    assert (plane.listen, plane.port, plane.plain) == ("0.0.0.0", 8443, False)
    assert plane.tls_cert_file is not None
    assert plane.tls_key_file is not None
    assert plane.tls_cert_file.source == tls_dir / "cert.pem"
    assert plane.tls_key_file.source == tls_dir / "key.pem"
    assert "PRIVATE KEY" not in repr(plane)  # read like a secret, never shown
    assert plane.client_ca_file is None
    assert plane.handshake_timeout == 10.0
    assert plane.max_connections == 100
    assert plane.max_message_size == 64 * 1024
    assert (plane.ping_interval, plane.ping_timeout, plane.send_timeout) == (20.0, 20.0, 10.0)
    assert (plane.queue, plane.overflow) == (1000, "drop-oldest")
    assert (plane.max_errors, plane.dedupe_window) == (10, 1000)
    assert plane.origins == ()
    assert plane.clients == ()
    assert plane.messages_burst == 100.0
    assert plane.bytes_burst == 512 * 1024


def test_full_section(tls_dir: Path) -> None:
    plane = load(
        TLS
        + """
        listen = "192.168.10.5"
        port = 9443
        client_ca_file = "ca.pem"
        handshake_timeout = "5s"
        max_message_size = "1MiB"
        overflow = "disconnect"
        messages_per_second = 10
        bytes_per_second = "1MiB"
        burst = "1s"
        origins = ["https://hmi.plant.local", "http://10.0.0.7:8080"]
        """
        + client_toml(subscribe='["line-1/#", "devices/+/temperature"]', publish='["+"]'),
        tls_dir,
    )
    assert (plane.listen, plane.port, plane.overflow) == ("192.168.10.5", 9443, "disconnect")
    assert plane.client_ca_file is not None
    assert plane.max_message_size == 1024 * 1024
    assert plane.messages_per_second == 10.0
    (client,) = plane.clients
    assert client == DeviceClient(
        Name("hmi-1"), hash_token(TOKEN), ("line-1/#", "devices/+/temperature"), ("+",)
    )
    assert plane.describe() == (
        "device plane: wss://192.168.10.5:9443, client certificates required, 1 client, "
        "at most 100 connections, ping every 20s"
    )


def test_summary_shows_the_device_plane(tls_dir: Path) -> None:
    config = parse_config(
        "[device_plane]\nlisten = '::1'\nplain = true\n" + client_toml(), config_dir=tls_dir
    )
    assert (
        "device plane: ws://[::1]:8443, 1 client, at most 100 connections, ping every 20s"
        in summary(config)
    )


PLAIN_REFUSED = (
    "plain ws:// is allowed only on a loopback address, and listen is {listen!r}: tokens and "
    'readings would cross the network unencrypted; set listen = "127.0.0.1" (or "::1"), or '
    "serve wss: set tls_cert_file and tls_key_file and remove plain"
)


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.53", "::1"])
def test_plain_on_loopback(tls_dir: Path, listen: str) -> None:
    plane = load(f"[device_plane]\nplain = true\nlisten = '{listen}'\n", tls_dir)
    assert plane.plain
    assert plane.describe().startswith("device plane: ws://")


@pytest.mark.parametrize("listen", ["0.0.0.0", "192.168.1.2", "::", "localhost", "gw.local"])
def test_plain_elsewhere_is_an_error(tls_dir: Path, listen: str) -> None:
    text = "[device_plane]\nplain = true\n"
    if listen != "0.0.0.0":  # the default
        text += f"listen = '{listen}'\n"
    assert problems(text, tls_dir) == [("device_plane.plain", PLAIN_REFUSED.format(listen=listen))]


def test_plain_with_tls_files_is_an_error(tls_dir: Path) -> None:
    text = TLS + "client_ca_file = 'ca.pem'\nplain = true\nlisten = '127.0.0.1'\n"
    message = "is set, but plain = true serves ws:// without TLS: remove one of them"
    assert problems(text, tls_dir) == [
        ("device_plane.tls_cert_file", message),
        ("device_plane.tls_key_file", message),
        ("device_plane.client_ca_file", message),
    ]


def test_tls_files_are_required(tls_dir: Path) -> None:
    message = (
        "missing: wss needs a certificate and its key (or, for a test on this machine only, "
        'plain = true with listen = "127.0.0.1")'
    )
    assert problems("[device_plane]\n", tls_dir) == [
        ("device_plane.tls_cert_file", message),
        ("device_plane.tls_key_file", message),
    ]
    assert problems("[device_plane]\ntls_key_file = 'key.pem'\n", tls_dir) == [
        ("device_plane.tls_cert_file", message)
    ]


def test_missing_tls_file(tls_dir: Path) -> None:
    ((path, message),) = problems(TLS.replace("key.pem", "absent.pem"), tls_dir)
    assert path == "device_plane.tls_key_file"
    assert message.startswith(f"secret file {str(tls_dir / 'absent.pem')!r} does not exist")


@pytest.mark.parametrize(
    ("setting", "path", "message"),
    [
        ("port = 0", "port", "0 is not a TCP port: give 1 .. 65535"),
        ("port = 65536", "port", "65536 is not a TCP port: give 1 .. 65535"),
        ("listen = 'not a host'", "listen", "'not a host' is not an IP address or host name"),
        ("handshake_timeout = '0s'", "handshake_timeout", "must be greater than 0"),
        ("ping_interval = '0s'", "ping_interval", "must be greater than 0"),
        ("ping_timeout = '0ms'", "ping_timeout", "must be greater than 0"),
        ("send_timeout = '0s'", "send_timeout", "must be greater than 0"),
        ("burst = '0s'", "burst", "must be greater than 0"),
        ("max_connections = 0", "max_connections", "must be at least 1"),
        ("queue = 0", "queue", "must be at least 1"),
        ("max_errors = 0", "max_errors", "must be at least 1"),
        ("dedupe_window = 0", "dedupe_window", "must be at least 1"),
        ("max_message_size = '512B'", "max_message_size", "must be from 1KiB to 16MiB"),
        ("max_message_size = '17MiB'", "max_message_size", "must be from 1KiB to 16MiB"),
        ("messages_per_second = 0", "messages_per_second", "must be greater than 0"),
        ("bytes_per_second = 0", "bytes_per_second", "must be greater than 0"),
        (
            "messages_per_second = 0.1\nburst = '5s'",
            "burst",
            "messages_per_second * burst is 0.5: no message could ever pass; raise burst or "
            "messages_per_second",
        ),
        (
            "bytes_per_second = '16KiB'",
            "burst",
            "bytes_per_second * burst (32768 bytes) is below max_message_size (65536 bytes): a "
            "message of the largest allowed size could never pass; raise burst or "
            "bytes_per_second",
        ),
        ("overflow = 'block'", "overflow", "'block' is not one of drop-oldest, disconnect"),
        ("ping_interval = 20", "ping_interval", "20 is not a duration"),
        ("porrt = 1", "porrt", "unknown key (did you mean 'port'?)"),
        (
            "origins = ['https://hmi.local/']",
            "origins[0]",
            "'https://hmi.local/' is not an origin: write scheme://host[:port] without a path "
            "or a trailing slash",
        ),
        ("origins = ['hmi.local']", "origins[0]", "'hmi.local' is not an origin"),
        ("origins = ['https://hmi.local:99999']", "origins[0]", "'https://hmi.local:99999'"),
        ("origins = ['*']", "origins[0]", "'*' is not an origin"),
        (
            "origins = ['null']",
            "origins[0]",
            "'null' is the origin of sandboxed pages and local files, which any site can create",
        ),
    ],
)
def test_every_setting_is_checked(tls_dir: Path, setting: str, path: str, message: str) -> None:
    found = problems(TLS + setting + "\n", tls_dir)
    assert len(found) == 1, found
    assert found[0][0] == f"device_plane.{path}"
    assert found[0][1].startswith(message), found[0][1]


@pytest.mark.parametrize(
    ("extra", "path", "message"),
    [
        (
            {"subscribe": '["line-1/#/x"]'},
            "subscribe[0]",
            "'line-1/#/x': '#' may only be the last level: write a topic pattern such as "
            "'line-1/+/#'",
        ),
        (
            {"subscribe": '["ok/+", "a//b"]'},
            "subscribe[1]",
            "'a//b': empty level: write a topic pattern",
        ),
        ({"subscribe": '["a/b+"]'}, "subscribe[0]", "'a/b+': '+' and '#' must stand alone"),
        (
            {"publish": '["devices/hmi-1/setpoint"]'},
            "publish[0]",
            "'devices/hmi-1/setpoint': give a point name (or '+' for any point), not a topic: "
            "the client publishes under devices/<its id>/ by itself",
        ),
        (
            {"publish": '["ok", "set point"]'},
            "publish[1]",
            "'set point' may use only letters, digits and _ . : -",
        ),
    ],
)
def test_client_patterns_are_checked(
    tls_dir: Path, extra: dict[str, str], path: str, message: str
) -> None:
    found = problems(TLS + client_toml(**extra), tls_dir)
    assert len(found) == 1, found
    assert found[0][0] == f"device_plane.clients[0].{path}"
    assert found[0][1].startswith(message), found[0][1]


def test_client_needs_id_and_hash(tls_dir: Path) -> None:
    text = TLS + "[[device_plane.clients]]\nsubscribe = []\n"
    assert problems(text, tls_dir) == [
        ("device_plane.clients[0].id", "missing: this key is required"),
        ("device_plane.clients[0].token_sha256", "missing: this key is required"),
    ]


def test_client_id_is_a_name(tls_dir: Path) -> None:
    ((path, message),) = problems(TLS + client_toml(id="hmi/1"), tls_dir)
    assert path == "device_plane.clients[0].id"
    assert message.startswith("'hmi/1' may use only letters")


@pytest.mark.parametrize(
    ("value", "start"),
    [
        (TOKEN, "looks like a token, not its hash"),
        ("z" * 64, "is not hexadecimal"),
        (hash_token(TOKEN)[:-1], "looks like a token, not its hash"),
    ],
)
def test_token_hash_is_checked_without_echoing_it(tls_dir: Path, value: str, start: str) -> None:
    text = TLS + f"[[device_plane.clients]]\nid = 'hmi-1'\ntoken_sha256 = '{value}'\n"
    ((path, message),) = problems(text, tls_dir)
    assert path == "device_plane.clients[0].token_sha256"
    assert message == (
        f"{start}: write the 64 hex digits that 'edge-gateway hash-token' prints (the gateway "
        "stores only the hash; the device keeps the token)"
    )
    assert value not in message


def test_duplicate_ids_and_token_hashes(tls_dir: Path) -> None:
    text = (
        TLS
        + client_toml("hmi-1", TOKEN)
        + client_toml("plc-7", OTHER)
        + client_toml("hmi-1", "third-token-xxxxxxxxxxxxxxxxxxxx")
        # The same hash in upper case is the same token.
        + client_toml("plc-8").replace(hash_token(TOKEN), hash_token(OTHER).upper())
    )
    assert problems(text, tls_dir) == [
        (
            "device_plane.clients[2].id",
            "duplicate id 'hmi-1' (clients[0] has it too): ids must be unique",
        ),
        (
            "device_plane.clients[3].token_sha256",
            "the same token hash as clients[1]: give every client its own token "
            "('edge-gateway hash-token --new')",
        ),
    ]


def test_clients_as_a_single_table(tls_dir: Path) -> None:
    text = TLS + "[device_plane.clients]\nid = 'hmi-1'\n"
    assert problems(text, tls_dir) == [
        (
            "device_plane.clients",
            "is a single table ([device_plane.clients]): write [[device_plane.clients]], with "
            "two brackets, for each client",
        )
    ]


def test_a_bus_named_devices_is_refused(tls_dir: Path) -> None:
    text = """
        [[buses]]
        name = "devices"
        kind = "sim"
        [[buses.devices]]
        name = "d"
        points = [{ name = "p" }]
    """
    message = (
        "'devices' is reserved for readings that devices publish over the device plane "
        "(devices/<client id>/<point>): give the bus another name"
    )
    # Reserved with or without a device plane, so adding one later cannot collide.
    assert problems(text, tls_dir) == [("buses[0].name", message)]
    assert problems(textwrap.dedent(text) + TLS, tls_dir) == [("buses[0].name", message)]


# ---- tokens ---------------------------------------------------------------------------------


def test_hash_token() -> None:
    # The FIPS 180-2 test vector for "abc".
    assert hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert hash_token("ä") == hashlib.sha256("ä".encode()).hexdigest()


def test_generate_token() -> None:
    tokens = {generate_token() for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
        assert deviceauth.token_problem(token) is None


# ---- the handshake --------------------------------------------------------------------------


def client(
    id: str, token: str, subscribe: tuple[str, ...] = (), publish: tuple[str, ...] = ()
) -> DeviceClient:
    return DeviceClient(Name(id), hash_token(token), subscribe, publish)


HMI = client("hmi-1", TOKEN, ("line-1/#",), ("setpoint",))
PLC = client("plc-7", OTHER, (), ("+",))
ORIGINS = ("https://hmi.plant.local", "http://10.0.0.7:8080")


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator([PLC, HMI], ORIGINS)


def ok(result: Identity | Refusal) -> Identity:
    assert isinstance(result, Identity), result
    return result


def refused(result: Identity | Refusal, status: int, reason: str) -> None:
    assert result == Refusal(status, reason)  # type: ignore[arg-type]


def test_token_in_the_authorization_header(auth: Authenticator) -> None:
    identity = ok(auth.authenticate({"authorization": f"Bearer {TOKEN}"}, {}, []))
    assert identity == Identity(
        "hmi-1", ("line-1/#",), ("setpoint",), "header", None, hash_token(TOKEN)
    )
    assert hash_token(TOKEN) not in repr(identity)
    # The scheme is case-insensitive (RFC 7235); surrounding spaces do not matter.
    assert ok(auth.authenticate({"authorization": f"bearer  {OTHER} "}, {}, [])).client_id == (
        "plc-7"
    )


def test_token_in_a_subprotocol_offer(auth: Authenticator) -> None:
    identity = ok(auth.authenticate({}, {}, [SUBPROTOCOL, f"bearer.{TOKEN}"]))
    assert (identity.client_id, identity.via, identity.subprotocol) == (
        "hmi-1",
        "subprotocol",
        SUBPROTOCOL,
    )


def test_token_in_the_query(auth: Authenticator) -> None:
    identity = ok(auth.authenticate({}, {"token": OTHER}, []))
    assert (identity.client_id, identity.via, identity.subprotocol) == ("plc-7", "query", None)


def test_the_subprotocol_is_selected_when_offered(auth: Authenticator) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    assert ok(auth.authenticate(headers, {}, ["other", SUBPROTOCOL])).subprotocol == SUBPROTOCOL
    assert ok(auth.authenticate(headers, {}, ["other"])).subprotocol is None


def test_the_header_comes_first(auth: Authenticator) -> None:
    # Only the first place that holds a token counts: a bad header is not rescued by the query.
    identity = ok(
        auth.authenticate(
            {"authorization": f"Bearer {TOKEN}"}, {"token": OTHER}, [SUBPROTOCOL, f"bearer.{OTHER}"]
        )
    )
    assert (identity.client_id, identity.via) == ("hmi-1", "header")
    identity = ok(auth.authenticate({}, {"token": OTHER}, [SUBPROTOCOL, f"bearer.{TOKEN}"]))
    assert (identity.client_id, identity.via) == ("hmi-1", "subprotocol")
    refused(
        auth.authenticate({"authorization": "Bearer wrong-token-123"}, {"token": OTHER}, []),
        401,
        "unknown token (header)",
    )


@pytest.mark.parametrize(
    ("headers", "query", "subprotocols", "reason"),
    [
        ({}, {}, [], "no token"),
        ({}, {}, [SUBPROTOCOL], "no token"),
        (
            {"authorization": "Basic aG1pOnB3"},
            {},
            [],
            "the Authorization header is not 'Bearer <token>'",
        ),
        ({"authorization": "Bearer"}, {}, [], "unusable token (header): the token is empty"),
        (
            {"authorization": "Bearer " + "x" * 5000},
            {},
            [],
            "unusable token (header): the token is longer than 4096 characters",
        ),
        ({"authorization": f"Bearer {TOKEN}x"}, {}, [], "unknown token (header)"),
        ({}, {"token": ""}, [], "unusable token (query): the token is empty"),
        ({}, {"token": TOKEN.upper()}, [], "unknown token (query)"),
        (
            {},
            {},
            [f"bearer.{TOKEN}"],
            "a bearer.<token> subprotocol needs 'edge-gateway.v1' offered with it",
        ),
        (
            {},
            {},
            [SUBPROTOCOL, f"bearer.{TOKEN}", f"bearer.{OTHER}"],
            "more than one bearer.<token> subprotocol offered",
        ),
        ({}, {}, [SUBPROTOCOL, "bearer.nope-nope-nope-nope"], "unknown token (subprotocol)"),
        (
            {},
            {"token": "a b"},
            [],
            "unusable token (query): the token has spaces, control or non-ASCII characters, which an Authorization header cannot carry: use 'hash-token --new'",
        ),
    ],
)
def test_refused_with_401(
    auth: Authenticator,
    headers: dict[str, str],
    query: dict[str, str],
    subprotocols: list[str],
    reason: str,
) -> None:
    result = auth.authenticate(headers, query, subprotocols)
    refused(result, 401, reason)
    assert isinstance(result, Refusal)
    # Log-safe: no presented token, nor any part of one, is in the reason.
    for token in (TOKEN, OTHER, "nope-nope", "aG1pOnB3", "xxxxx"):
        assert token not in result.reason


@pytest.mark.parametrize(
    "origin", ["https://hmi.plant.local", "HTTPS://HMI.plant.local:443", "http://10.0.0.7:8080"]
)
def test_listed_origins_pass(auth: Authenticator, origin: str) -> None:
    headers = {"origin": origin, "authorization": f"Bearer {TOKEN}"}
    assert ok(auth.authenticate(headers, {}, [])).client_id == "hmi-1"


@pytest.mark.parametrize(
    ("origin", "shown"),
    [
        ("https://evil.example", "https://evil.example"),
        ("http://hmi.plant.local", "http://hmi.plant.local"),  # another scheme, another origin
        ("http://10.0.0.7", "http://10.0.0.7"),  # another port
        ("null", "null"),
        ("https://x/\r\nforged: log line", "(malformed)"),
    ],
)
def test_other_origins_get_403(auth: Authenticator, origin: str, shown: str) -> None:
    # Even with a valid token: a page on another site must not ride on a browser's token.
    result = auth.authenticate({"origin": origin}, {"token": TOKEN}, [])
    refused(result, 403, f"Origin {shown} is not in device_plane.origins")


def test_no_origins_allows_no_browser() -> None:
    auth = Authenticator([HMI], [])
    refused(
        auth.authenticate({"origin": "https://hmi.plant.local"}, {"token": TOKEN}, []),
        403,
        "Origin https://hmi.plant.local is not in device_plane.origins",
    )
    assert ok(auth.authenticate({}, {"token": TOKEN}, [])).client_id == "hmi-1"


def test_no_clients_refuses_everyone() -> None:
    refused(
        Authenticator([], []).authenticate({}, {"token": TOKEN}, []), 401, "unknown token (query)"
    )


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The stored digests that the handshake compared with, in order."""
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)  # as deviceauth calls it
    return calls


@pytest.mark.parametrize("which", [0, 3, 7, None])
def test_every_stored_hash_is_compared(compared: list[bytes], which: int | None) -> None:
    tokens = [f"token-number-{i}-of-eight-xxxxxxxx" for i in range(8)]
    auth = Authenticator([client(f"c{i}", t) for i, t in enumerate(tokens)], [])
    presented = tokens[which] if which is not None else "none-of-them-xxxxxxxxxxxx"
    result = auth.authenticate({}, {"token": presented}, [])
    if which is None:
        refused(result, 401, "unknown token (query)")
    else:
        assert ok(result).client_id == f"c{which}"
    # No early exit on a match, nor a shortcut when nothing matches: all 8, in constant time.
    assert compared == [bytes.fromhex(hash_token(t)) for t in tokens]


def test_refresh_after_reload(auth: Authenticator) -> None:
    identity = ok(auth.authenticate({}, {"token": TOKEN}, [SUBPROTOCOL, "x"]))
    narrower = client("hmi-1", TOKEN, ("line-1/boiler/#",), ())
    refreshed = Authenticator([narrower], ORIGINS).refresh(identity)
    assert refreshed == Identity(
        "hmi-1", ("line-1/boiler/#",), (), "query", SUBPROTOCOL, hash_token(TOKEN)
    )
    assert Authenticator([PLC], ORIGINS).refresh(identity) is None  # removed
    assert Authenticator([client("hmi-1", OTHER)], ORIGINS).refresh(identity) is None  # new token
    assert Authenticator([HMI, PLC], ORIGINS).refresh(identity) == identity


def test_from_section(tls_dir: Path) -> None:
    plane = load(TLS + "origins = ['https://hmi.local']\n" + client_toml(), tls_dir)
    auth = Authenticator.from_section(plane)
    assert (
        ok(auth.authenticate({"origin": "https://hmi.local"}, {"token": TOKEN}, [])).client_id
        == "hmi-1"
    )


# ---- the ACL --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inner", "outer", "within"),
    [
        ("a/b/c", "a/b/c", True),
        ("a/b/c", "a/b/d", False),
        ("a/b/c", "a/+/c", True),
        ("a/+/c", "a/b/c", False),
        ("a/+/c", "a/+/c", True),
        ("+/+/x", "a/+/x", False),
        ("a/+/x", "+/+/x", True),
        ("+/+/x", "+/+/+", True),
        ("+/+/+", "+/+/x", False),
        ("#", "#", True),
        ("#", "a/#", False),
        ("a/#", "#", True),
        ("a/#", "a/#", True),
        ("a/b/#", "a/#", True),
        ("a/#", "a/b/#", False),
        ("a/#", "a/+", False),  # a/# also matches 'a' and 'a/b/c'
        ("a/#", "a/+/#", False),  # ... 'a' is not under a/+/#
        ("a/+/#", "a/#", True),
        ("a", "a/#", True),  # 'a/#' matches its parent 'a'
        ("a/b", "a/#", True),
        ("a", "a/+", False),
        ("a/b", "a/b/#", True),
        ("#", "+/#", True),  # every topic has at least one level
        ("+/#", "#", True),
        ("+", "+/#", True),
        ("+/#", "+", False),
        ("+/+", "+/#", True),
        ("+/+/#", "+/#", True),
        ("+/#", "+/+/#", False),
        ("a/b", "a", False),
        ("a", "a/b", False),
        ("a/b/c", "a/b", False),
        ("+", "a", False),
        ("line-1/+/temperature", "line-1/#", True),
        ("line-1/#", "line-1/+/temperature", False),
    ],
)
def test_pattern_within(inner: str, outer: str, within: bool) -> None:
    assert pattern_within(inner, outer) is within


def _patterns(levels: int) -> Iterator[str]:
    for n in range(1, levels + 1):
        for head in itertools.product(["a", "b", "+"], repeat=n - 1):
            for last in ["a", "b", "+", "#"]:
                yield "/".join([*head, last])


def test_pattern_within_agrees_with_matches() -> None:
    # Exhaustively, against the definition: inner is within outer exactly when every topic
    # that inner matches, outer matches too. 'z' stands for every name no pattern mentions;
    # topics one level longer than any pattern show what '#' adds.
    topics = [
        "/".join(t) for n in range(1, 5) for t in itertools.product(["a", "b", "z"], repeat=n)
    ]
    patterns = list(_patterns(3))
    assert len(patterns) == 52
    for inner in patterns:
        matched = [t for t in topics if matches(inner, t)]
        for outer in patterns:
            expected = all(matches(outer, t) for t in matched)
            assert pattern_within(inner, outer) is expected, (inner, outer)


def identity(subscribe: tuple[str, ...] = (), publish: tuple[str, ...] = ()) -> Identity:
    return Identity("hmi-1", subscribe, publish, "header")


def test_may_subscribe() -> None:
    hmi = identity(("line-1/#", "+/+/temperature"))
    assert hmi.may_subscribe("line-1/#")
    assert hmi.may_subscribe("line-1/boiler/+")
    assert hmi.may_subscribe("line-2/boiler/temperature")
    assert hmi.may_subscribe("+/boiler/temperature")
    assert not hmi.may_subscribe("#")
    assert not hmi.may_subscribe("+/boiler/#")
    assert not hmi.may_subscribe("line-2/boiler/pressure")
    assert not hmi.may_subscribe("line-1/#/x")  # not a valid pattern
    assert not hmi.may_subscribe("")
    assert not identity().may_subscribe("line-1/boiler/temperature")
    assert identity(("#",)).may_subscribe("#")


def test_may_subscribe_needs_one_pattern_that_covers() -> None:
    # 'a/#' is 'a' plus everything below it: both are allowed, but by two patterns, not one;
    # the client subscribes to the two separately. Conservative: a deny, never a leak.
    both = identity(("a", "a/+/#"))
    assert both.may_subscribe("a")
    assert both.may_subscribe("a/b/c")
    assert not both.may_subscribe("a/#")


def test_may_publish() -> None:
    hmi = identity(publish=("setpoint", "mode"))
    assert hmi.may_publish("setpoint")
    assert hmi.may_publish("mode")
    assert not hmi.may_publish("temperature")
    assert not hmi.may_publish("setpoint/x")
    assert not identity().may_publish("setpoint")
    for anything in ("+", "#"):
        device = identity(publish=(anything,))
        assert device.may_publish("temperature")
        assert not device.may_publish("a/b")  # one level only
        assert not device.may_publish("+")
        assert not device.may_publish("")
        assert not device.may_publish("set point")


def test_topic() -> None:
    assert identity().topic("setpoint") == "devices/hmi-1/setpoint"
    with pytest.raises(ValueError, match="not a topic level: 'a/b' may use only"):
        identity().topic("a/b")


# ---- edge-gateway hash-token ----------------------------------------------------------------


def hash_token_cli(*args: str, input: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_command("hash-token", *args),
        input=input,
        env=gateway_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_cli_hashes_the_argument() -> None:
    result = hash_token_cli(TOKEN)
    assert (result.returncode, result.stdout, result.stderr) == (0, hash_token(TOKEN) + "\n", "")


def test_cli_hashes_one_line_from_stdin() -> None:
    result = hash_token_cli(input=f"{TOKEN}\r\nsecond line\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, hash_token(TOKEN) + "\n", "")


def test_cli_warns_about_a_short_token() -> None:
    result = hash_token_cli("abc")
    assert result.returncode == 0
    assert result.stdout == hash_token("abc") + "\n"
    assert "warning: a token of 3 characters can be guessed from its hash" in result.stderr


@pytest.mark.parametrize(
    ("args", "input", "message"),
    [
        ((), "", "hash-token: the token is empty"),
        ((), "\n", "hash-token: the token is empty"),
        (("two words",), "", "hash-token: the token has spaces"),
        (("--new", TOKEN), "", "hash-token: give either --new or a TOKEN, not both"),
    ],
)
def test_cli_refuses_an_unusable_token(args: tuple[str, ...], input: str, message: str) -> None:
    result = hash_token_cli(*args, input=input)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(message)


def test_cli_new_prints_a_token_and_its_hash(tls_dir: Path) -> None:
    result = hash_token_cli("--new")
    assert result.returncode == 0, result.stderr
    m = re.fullmatch(
        r'token = ([A-Za-z0-9_-]{43})\ntoken_sha256 = "([0-9a-f]{64})"\n', result.stdout
    )
    assert m, result.stdout
    token, digest = m.groups()
    assert digest == hash_token(token)
    assert "[[device_plane.clients]]" in result.stderr
    assert token not in result.stderr
    # The hash line pastes into a client table as it is, and the token then authenticates.
    plane = load(
        TLS + f"[[device_plane.clients]]\nid = 'new'\n{result.stdout.splitlines()[1]}\n", tls_dir
    )
    auth = Authenticator.from_section(plane)
    assert ok(auth.authenticate({"authorization": f"Bearer {token}"}, {}, [])).client_id == "new"
    assert hash_token_cli("--new").stdout != result.stdout


def test_cli_help_lists_hash_token() -> None:
    result = subprocess.run(
        gateway_command("--help"),
        env=gateway_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "hash-token" in result.stdout


# ---- viewer tokens (the status page) -----------------------------------------------------------

PAGE = "https://gateway.plant.local:9443"


class Clock:
    """A clock the test sets by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def viewers(clock: Clock) -> deviceauth.ViewerTokens:
    return deviceauth.ViewerTokens(clock)


def page(token: str, origin: str | None = PAGE) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """A handshake as the status page makes it: the token in the subprotocol offer."""
    headers = {"origin": origin} if origin is not None else {}
    return headers, {}, [SUBPROTOCOL, f"bearer.{token}"]


def test_a_viewer_token_is_the_status_page_until_it_expires(
    viewers: deviceauth.ViewerTokens, clock: Clock
) -> None:
    auth = Authenticator([HMI], ORIGINS, viewer_tokens=viewers)
    token = viewers.issue("HTTPS://Gateway.plant.local:9443", ttl=300.0)
    assert len(token) == 43
    assert token not in repr(viewers._grants)
    identity = ok(auth.authenticate(*page(token)))
    assert identity == Identity(
        "status-page", ("#",), (), "subprotocol", SUBPROTOCOL, hash_token(token)
    )
    assert identity.may_subscribe("#")
    assert not identity.may_publish("x")
    # Any way of presenting it works, from the page's origin.
    assert ok(auth.authenticate({"origin": PAGE}, {"token": token}, [])).via == "query"
    clock.now += 299.9
    ok(auth.authenticate(*page(token)))
    clock.now += 0.1
    refused(auth.authenticate(*page(token)), 401, "expired viewer token (subprotocol)")


@pytest.mark.parametrize(
    ("origin", "shown"),
    [
        ("https://evil.example", "https://evil.example"),
        ("https://hmi.plant.local", "https://hmi.plant.local"),  # listed, but not the page's
        ("null", "null"),
        (None, "(none)"),
    ],
)
def test_a_viewer_token_is_for_its_page_only(
    viewers: deviceauth.ViewerTokens, origin: str | None, shown: str
) -> None:
    auth = Authenticator([HMI], ORIGINS, viewer_tokens=viewers)
    token = viewers.issue(PAGE)
    reason = f"Origin {shown} is not the one the viewer token was issued for ({PAGE})"
    if origin in ("https://evil.example", "null"):
        # Not a viewer origin at all: refused before the token is looked at.
        reason = f"Origin {shown} is not in device_plane.origins"
    refused(auth.authenticate(*page(token, origin)), 403, reason)


def test_the_origin_comes_before_expiry(viewers: deviceauth.ViewerTokens, clock: Clock) -> None:
    auth = Authenticator([HMI], ORIGINS, viewer_tokens=viewers)
    token = viewers.issue(PAGE, ttl=1.0)
    clock.now += 2.0
    refused(
        auth.authenticate(*page(token, "https://hmi.plant.local")),
        403,
        f"Origin https://hmi.plant.local is not the one the viewer token was issued for ({PAGE})",
    )


def test_the_page_origin_admits_only_viewer_tokens(viewers: deviceauth.ViewerTokens) -> None:
    auth = Authenticator(
        [HMI], ORIGINS, viewer_tokens=viewers, local_token_sha256=hash_token(OTHER)
    )
    viewers.issue(PAGE)
    reason = f"Origin {PAGE} is not in device_plane.origins"
    refused(auth.authenticate(*page(TOKEN)), 403, reason)
    refused(auth.authenticate(*page(OTHER), local_peer=True), 403, reason)
    refused(
        auth.authenticate(*page("no-such-token-0123456789abcdef")),
        401,
        "unknown token (subprotocol)",
    )
    # Without any viewer token for it, the page's origin is refused first, as before.
    refused(
        Authenticator([HMI], ORIGINS).authenticate(*page(TOKEN)),
        403,
        reason,
    )


def test_a_viewer_token_without_origin_follows_the_allow_list(
    viewers: deviceauth.ViewerTokens,
) -> None:
    auth = Authenticator([HMI], ORIGINS, viewer_tokens=viewers)
    token = viewers.issue(None)
    assert ok(auth.authenticate(*page(token, None))).client_id == "status-page"
    assert ok(auth.authenticate(*page(token, "https://hmi.plant.local"))).client_id == (
        "status-page"
    )
    refused(
        auth.authenticate(*page(token, PAGE)), 403, f"Origin {PAGE} is not in device_plane.origins"
    )


def test_at_most_so_many_viewer_tokens_are_kept(clock: Clock) -> None:
    viewers = deviceauth.ViewerTokens(clock, limit=3)
    auth = Authenticator([], [], viewer_tokens=viewers)
    tokens = [viewers.issue(None) for _ in range(4)]
    assert len(viewers) == 3
    refused(auth.authenticate({}, {"token": tokens[0]}, []), 401, "unknown token (query)")
    for token in tokens[1:]:
        ok(auth.authenticate({}, {"token": token}, []))
    assert deviceauth.MAX_VIEWER_TOKENS == 100
    assert deviceauth.ViewerTokens(clock)._grants.maxlen == 100


@pytest.mark.parametrize(
    ("origin", "ttl", "message"),
    [
        ("https://gateway/status", 300.0, "is not an origin"),
        ("*", 300.0, "is not an origin"),
        ("null", 300.0, "'null' is the origin of sandboxed pages"),
        (PAGE, -1.0, "ttl -1.0 must be a number of seconds above 0"),
        (PAGE, float("inf"), "ttl inf must be a number of seconds above 0"),
    ],
)
def test_a_viewer_token_needs_an_origin_and_a_lifetime(
    viewers: deviceauth.ViewerTokens, origin: str, ttl: float, message: str
) -> None:
    with pytest.raises(ValueError, match=r"^viewer token: ") as info:
        viewers.issue(origin, ttl)
    assert message in str(info.value)
    assert len(viewers) == 0


def test_every_viewer_hash_is_compared(
    viewers: deviceauth.ViewerTokens, compared: list[bytes]
) -> None:
    auth = Authenticator([HMI, PLC], [], viewer_tokens=viewers)
    tokens = [viewers.issue(None) for _ in range(5)]
    compared.clear()
    assert ok(auth.authenticate({}, {"token": tokens[1]}, [])).client_id == "status-page"
    # The clients' hashes, then every viewer token's, with no early exit on the match.
    expected = [bytes.fromhex(hash_token(t)) for t in (TOKEN, OTHER, *tokens)]
    assert compared == expected
    compared.clear()
    assert ok(auth.authenticate({}, {"token": TOKEN}, [])).client_id == "hmi-1"
    assert compared == expected  # a client's token is looked for among the viewers' too


def test_a_reload_keeps_viewer_connections(viewers: deviceauth.ViewerTokens, clock: Clock) -> None:
    auth = Authenticator([HMI], ORIGINS, viewer_tokens=viewers)
    identity = ok(auth.authenticate(*page(viewers.issue(PAGE, ttl=1.0))))
    clock.now += 10.0  # expired, and then forgotten
    for _ in range(100):
        viewers.issue(PAGE)
    assert Authenticator([], [], viewer_tokens=viewers).refresh(identity) == identity
    assert Authenticator([], []).refresh(identity) == identity


def test_no_client_may_take_a_reserved_id(tls_dir: Path) -> None:
    assert problems(TLS + client_toml(id="status-page"), tls_dir) == [
        (
            "device_plane.clients[0].id",
            "'status-page' is reserved for the status page's live view (its short-lived viewer "
            "tokens): choose another id",
        )
    ]
    assert sorted(deviceauth.RESERVED_CLIENTS) == ["local", "status-page"]
