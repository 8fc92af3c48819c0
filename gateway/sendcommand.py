"""``edge-gateway send-command``: send one command through the gateway's HTTPS API, as CPI would.

For a field engineer testing a write (``send-command modbus:plc/meter/setpoint 21.5``) or a
device command (``send-command device:hmi-1 --name show-message --arg text=hello``). It goes
through the API on purpose, so the same checks apply as to CPI (auth, validation, the
idempotent id) and the result is recorded where ``GET /api/v1/commands/{id}`` finds it.

With no ``--url`` it reads the local config's ``[api]``: the address (a wildcard listen
address becomes 127.0.0.1) and, for TLS, trusts exactly the server's own certificate (the
first one in its ``tls_cert_file``), pinned as ``tail`` pins it.

Depends on httpx, ``gateway.config`` (the local config), ``gateway.api`` (its section, the
longest command timeout) and ``gateway.tail`` (the TLS contexts, shared with ``tail``).
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import json
import math
import os
import secrets
import ssl
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from gateway.api import MAX_COMMAND_TIMEOUT
from gateway.config import DEFAULT_PATH, EX_CONFIG, ConfigError, load_config
from gateway.tail import ca_context, pinned_pem_context

EX_DATAERR = 65
"""The gateway refused the command (4xx): nothing was executed."""
EX_UNAVAILABLE = 69
"""The API cannot be reached, or the target cannot execute now (503)."""
EX_TEMPFAIL = 75
"""Accepted, not finished: pending (device offline) or delivered without an answer yet."""
EX_NOPERM = 77
"""Wrong user or password, or a viewer."""
FAILED = 1
"""Executed and failed, or expired."""

PASSWORD_ENV = "EDGE_GATEWAY_PASSWORD"

TIMEOUT = httpx.Timeout(10.0, read=MAX_COMMAND_TIMEOUT + 10.0)
"""The API answers within the command's timeout (at most ``MAX_COMMAND_TIMEOUT``); allow for
the round trip, and never wait forever on a gateway that does not answer."""

DESCRIPTION = """\
Send one command through the gateway's HTTPS API (the same checks as for CPI) and print
its result. TARGET is modbus:<bus>/<device>/<point> (VALUE is written) or
device:<client id> (--name, and --arg for each argument). Without --url the API of the
local config is used, trusting its own certificate.

The password is read from --password-file, else from $EDGE_GATEWAY_PASSWORD, else asked
for on the terminal.

exit status:
  0    done (the result is printed)
  1    executed and failed, or expired (the reason is printed)
  2    bad arguments
  65   refused: bad target, not writable, out of range... (nothing was executed)
  69   the API cannot be reached, or the bus is down (nothing was executed)
  75   accepted, not finished yet: the device is offline or has not answered
       (edge-gateway send-command --status ID asks again)
  77   wrong user or password, or the user may only view
  78   config error

examples:
  edge-gateway send-command --user operator modbus:plc/meter/setpoint 21.5 --read-back
  edge-gateway send-command --user operator device:hmi-1 --name show-message --arg text=hi
  edge-gateway send-command --user operator --status cli-3f2a9c"""


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "send-command",
        help="send a command (a Modbus write, a device command) through the HTTPS API",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
    )
    parser.add_argument("target", nargs="?", help="modbus:<bus>/<device>/<point> or device:<id>")
    parser.add_argument("value", nargs="?", help="for modbus: the value (21.5, true, or a string)")
    parser.add_argument("--name", help="for device: the command's name")
    parser.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="for device: an argument (repeat it); VALUE as JSON when it reads as JSON",
    )
    parser.add_argument("--id", help="the command id (default: a new cli-<random> id)")
    parser.add_argument("--timeout", help='how long to wait for the result, e.g. "5s"')
    parser.add_argument("--expires", help="ISO 8601 UTC time after which it is not executed")
    parser.add_argument(
        "--read-back", action="store_true", help="for modbus: read the point after writing"
    )
    parser.add_argument("--status", metavar="ID", help="show the command ID instead of sending")
    parser.add_argument("--url", help="the API's base URL (default: from the config's [api])")
    parser.add_argument("--user", required=True, help="an [[api.users]] name")
    parser.add_argument("--password-file", type=Path, help="a file holding the password")
    parser.add_argument(
        "--ca", type=Path, help="a CA, or the gateway's certificate, to trust (names checked)"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_PATH, help="the gateway's config")
    parser.add_argument("--json", action="store_true", help="print the record as JSON")


class Refused(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def main(args: argparse.Namespace) -> int:
    try:
        if args.status is not None and not args.status.strip():
            raise Refused("--status is empty: give the id of a command", 2)
        if args.status is not None and (args.target or args.value):
            raise Refused("give either --status ID or a TARGET to send, not both", 2)
        if args.url and not args.url.startswith(("https://", "http://")):
            raise Refused(f"--url {args.url!r}: give https://<host>:<port>", 2)
        body = None if args.status is not None else build_body(args)
        url, verify = endpoint(args)
        password = read_password(args.password_file)
    except Refused as e:
        print(f"edge-gateway send-command: {e}", file=sys.stderr)
        return e.status
    auth = httpx.BasicAuth(args.user, password)
    try:
        with httpx.Client(base_url=url, verify=verify, auth=auth, timeout=TIMEOUT) as client:
            if body is None:
                response = client.get(f"/api/v1/commands/{quote(args.status, safe='')}")
            else:
                response = client.post("/api/v1/commands", json=body)
    except httpx.HTTPError as e:
        hint = ""
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            hint = " (give the gateway's certificate or its CA with --ca)"
        elif url.startswith("http://") and isinstance(e, httpx.RemoteProtocolError):
            hint = " (does the API use TLS? try https://)"
        print(
            f"edge-gateway send-command: cannot reach the API at {url}: {e}{hint}",
            file=sys.stderr,
        )
        return EX_UNAVAILABLE
    return report(response, as_json=args.json, user=args.user)


def build_body(args: argparse.Namespace) -> dict[str, object]:
    if not args.target:
        raise Refused("give a TARGET (modbus:<bus>/<device>/<point> or device:<id>)", 2)
    if not args.target.startswith(("modbus:", "device:")):
        raise Refused(
            f"TARGET {args.target!r} starts with neither modbus: nor device:: write "
            "modbus:<bus>/<device>/<point> or device:<client id>",
            2,
        )
    if args.id is not None and not args.id.strip():
        raise Refused("--id is empty: give an id, or leave --id out for a new one", 2)
    body: dict[str, object] = {
        "id": args.id or f"cli-{secrets.token_hex(6)}",
        "target": args.target,
    }
    if args.target.startswith("modbus:"):
        if args.value is None:
            raise Refused("a modbus target needs a VALUE to write", 2)
        if args.name or args.arg:
            raise Refused("--name and --arg are for device targets; give a VALUE", 2)
        body["value"] = _scalar(args.value)
        if args.read_back:
            body["read_back"] = True
    else:
        if args.value is not None:
            raise Refused("a device target takes --name and --arg, not a VALUE", 2)
        if not args.name:
            raise Refused("a device target needs --name (the command's name)", 2)
        body["name"] = args.name
        arguments: dict[str, object] = {}
        for item in args.arg:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise Refused(f"--arg {item!r}: write KEY=VALUE", 2)
            arguments[key] = _scalar(value)
        body["args"] = arguments
    if args.timeout:
        # "5" is 5 seconds, as the API takes a number; "5s" goes as the duration it is.
        timeout = _scalar(args.timeout)
        body["timeout"] = timeout if isinstance(timeout, int | float) else args.timeout
    if args.expires:
        body["expires"] = args.expires
    return body


def _scalar(text: str) -> object:
    """``21.5`` -> 21.5, ``true`` -> True, ``"a b"`` -> "a b", anything else the string."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, float) and not math.isfinite(value):
        raise Refused(f"{text!r} is not a finite number: send a number, true, false or text", 2)
    return value if not isinstance(value, dict | list) else text


def endpoint(args: argparse.Namespace) -> tuple[str, ssl.SSLContext | bool]:
    """The API's base URL and what to trust: ``--url`` with ``--ca`` (or the system's CAs),
    else the local config's ``[api]`` and exactly its certificate."""
    if args.url:
        if args.ca is None:
            return args.url.rstrip("/"), True
        return args.url.rstrip("/"), _ca(args.ca)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        raise Refused("; ".join(e.lines()) + " (or give --url)", EX_CONFIG) from None
    api = config.api
    if api is None:
        raise Refused(f"{args.config} has no [api] section: add one, or give --url", EX_CONFIG)
    host = api.listen
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and address.is_unspecified:
        host = "127.0.0.1" if address.version == 4 else "::1"
    shown = f"[{host}]" if ":" in host else host
    scheme = "http" if api.plain else "https"
    url = f"{scheme}://{shown}:{api.port}"
    if api.plain:
        return url, False
    if args.ca is not None:
        return url, _ca(args.ca)
    if api.tls_cert_file is None:
        return url, True
    # The server's own certificate (the first one in its file, not the CA certificates that
    # may follow it), as tail pins it: trusted as it is, whatever names it holds (it is for
    # the plant's name, and we connect to the loopback address).
    try:
        return url, pinned_pem_context(api.tls_cert_file.reveal())
    except (ValueError, ssl.SSLError) as e:
        raise Refused(
            f"cannot use {api.tls_cert_file.source} as the certificate to trust: {e} "
            "(give the gateway's certificate or its CA with --ca)",
            EX_CONFIG,
        ) from None


def _ca(path: Path) -> ssl.SSLContext:
    """``--ca``: a CA, or the gateway's own certificate, names checked (as for tail)."""
    if not path.is_file():
        raise Refused(f"--ca {path}: no such file", 2)
    try:
        return ca_context(str(path))
    except (OSError, ssl.SSLError) as e:
        raise Refused(f"--ca {path}: {e}: give a PEM certificate file", 2) from None


def read_password(path: Path | None) -> str:
    if path is not None:
        try:
            return path.read_text().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise Refused(f"cannot read the password from {path}: {e}", 2) from None
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env:
        return from_env
    if sys.stdin.isatty():
        return getpass.getpass("API password: ")
    raise Refused(f"no password: give --password-file, or set ${PASSWORD_ENV}", 2)


def report(response: httpx.Response, *, as_json: bool, user: str = "") -> int:
    try:
        data = response.json()
    except ValueError:
        data = None
    status = response.status_code
    if not isinstance(data, dict):
        print(f"edge-gateway send-command: HTTP {status}: {response.text[:200]}", file=sys.stderr)
        return EX_UNAVAILABLE
    error = data.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        if status == 401:
            message = (
                f"wrong user or password for {user!r} (an [[api.users]] name and its password)"
            )
        print(f"refused ({status} {error.get('code')}): {message}", file=sys.stderr)
        if status in (401, 403):
            return EX_NOPERM
        return EX_UNAVAILABLE if status >= 500 else EX_DATAERR
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        line = f"{data.get('id')} {data.get('target')}: {data.get('state')}"
        if data.get("result") is not None:
            line += f", result {json.dumps(data['result'])}"
        if data.get("error"):
            line += f" ({data['error']})"
        print(line)
    state = data.get("state")
    if state == "done":
        return 0
    if state in ("pending", "delivered"):
        if not as_json:
            print(
                f"not finished yet; ask again with: edge-gateway send-command --status "
                f"{data.get('id')} (with the same --user and address)"
            )
        return EX_TEMPFAIL
    return FAILED
