"""The ``edge-gateway`` command: ``run``, ``check-config``, ``demo``.

Exit status: 0 after a clean stop; 78 (EX_CONFIG) on a config error, so that systemd's
``RestartPreventExitStatus=78`` stops a crash loop; 69 (EX_UNAVAILABLE) when a required
component cannot start (a port in use: systemd retries); 70 (EX_SOFTWARE) after a defect,
logged at critical priority; 130 when interrupted during start-up.

Knows no driver: the composition root (``gateway.app``) and the config loader do.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from gateway import __version__, api, deviceauth, entry, sendcommand, tail
from gateway.app import Extra, Gateway, prepare_state_dir, request_plan
from gateway.config import DEFAULT_PATH, EX_CONFIG, Config, ConfigError, load_config, summary
from gateway.core import logs
from gateway.core.component import StartupError
from gateway.sdnotify import Notifier

log = logging.getLogger("gateway")

EX_SOFTWARE = 70


def _parser() -> argparse.ArgumentParser:
    # Descriptions are laid out by hand (exit status tables, examples), so argparse must not
    # re-wrap them; each subparser needs the formatter too, it is not inherited.
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="edge-gateway",
        formatter_class=raw,
        description=(
            "Reads plant sensors (Modbus RTU, Modbus TCP, serial-line sensors such as\n"
            "NMEA 0183) into an in-memory hub and serves them live to devices and HMIs over\n"
            "secure WebSocket (wss), where devices also publish readings of their own. With\n"
            "[cpi], every reading is stored in an SQLite outbox and forwarded in batches to\n"
            "SAP Cloud Integration (CPI) over HTTPS. Each part runs under its own\n"
            "supervisor, which restarts it with backoff when it fails; the process runs\n"
            "under systemd (readiness, status line, watchdog, reload on SIGHUP).\n"
            "\n"
            "With [api], an HTTPS API takes commands from CPI or an operator (Modbus writes,\n"
            "commands to wss devices; pending ones kept in SQLite) and serves /readyz,\n"
            "/metrics and a live status page."
        ),
        epilog="'edge-gateway COMMAND --help' says what a command does and its exit statuses.",
    )
    parser.add_argument("--version", action="version", version=f"edge-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"config file (default {DEFAULT_PATH})"
    run = sub.add_parser(
        "run",
        help="run the gateway (what the systemd unit starts)",
        formatter_class=raw,
        description=(
            "Run the gateway until it is stopped: start every bus in the config, publish\n"
            "its readings to the hub and, with [device_plane], serve them over wss. Under\n"
            "systemd it reports readiness, a status line and watchdog pings. SIGHUP reloads\n"
            "the config (an invalid one is rejected and the running one stays; device\n"
            "clients stay connected unless the reload removed them); SIGTERM or Ctrl-C stops\n"
            "it within [gateway] shutdown_timeout. This is what the systemd unit starts.\n"
            "\n"
            "exit status:\n"
            "  0    stopped cleanly (SIGTERM, or Ctrl-C once started)\n"
            "  78   config error: the config is invalid or state_dir is unusable\n"
            "       (the unit does not restart then; fix it, check with check-config)\n"
            "  69   a required part could not start\n"
            "  130  interrupted (Ctrl-C) during start-up\n"
            "\n"
            "example:\n"
            "  edge-gateway run --config /etc/edge-gateway/gateway.toml"
        ),
    )
    run.add_argument("--config", type=Path, default=DEFAULT_PATH, help=config_help)
    check = sub.add_parser(
        "check-config",
        help="validate the config and say what would run",
        formatter_class=raw,
        description=(
            "Validate the config without starting anything, and print what would run: the\n"
            "gateway, the supervisor's backoff, each bus with its devices and points. An\n"
            "invalid config gets one line per problem on stderr, each with the path to its\n"
            "key. With --plan, also print the Modbus read requests of every poll cycle\n"
            "(nothing is connected to).\n"
            "\n"
            "exit status:\n"
            "  0    the config is valid\n"
            "  78   config error: the config is invalid or missing\n"
            "\n"
            "examples:\n"
            "  sudo edge-gateway check-config\n"
            "  edge-gateway check-config --plan --config examples/energy-meter-rtu.toml"
        ),
    )
    check.add_argument("--config", type=Path, default=DEFAULT_PATH, help=config_help)
    check.add_argument(
        "--plan",
        action="store_true",
        help="also print the read requests each Modbus bus sends per poll cycle",
    )
    sub.add_parser(
        "demo",
        help="run on embedded defaults with simulated sensors and a Modbus TCP meter",
        formatter_class=raw,
        description=(
            "Run the gateway on embedded defaults, without a config file or hardware:\n"
            "simulated sensors (bus line-1) and a Modbus TCP energy meter simulated on\n"
            "localhost (bus plc). The latest value of every point is printed every few\n"
            "seconds; state goes to a temporary directory. The device plane serves wss on\n"
            "127.0.0.1:8443 (or a free port) with a self-signed certificate kept in\n"
            "~/.local/share/edge-gateway; 'edge-gateway tail' in another terminal shows the\n"
            "readings. Ctrl-C stops it.\n"
            "\n"
            "exit status:\n"
            "  0    stopped cleanly (Ctrl-C or SIGTERM once started)\n"
            "  69   a required part could not start\n"
            "  130  interrupted (Ctrl-C) during start-up\n"
            "\n"
            "example:\n"
            "  edge-gateway demo    (from a checkout: make demo)"
        ),
    )
    hash_token = sub.add_parser(
        "hash-token",
        help="print the SHA-256 of a device token for [[device_plane.clients]]",
        formatter_class=raw,
        description=(
            "Print the hash of a device's token, as token_sha256 in its\n"
            "[[device_plane.clients]] table wants it. The token is read from one line on\n"
            "stdin (not echoed on a terminal), or taken from the argument (which shell\n"
            "history and ps can see). With --new, make a new random token and print it\n"
            "with its hash: the token goes to the device, the hash into the config. The\n"
            "gateway stores only the hash.\n"
            "\n"
            "exit status:\n"
            "  0    printed\n"
            "  2    no usable token (empty, spaces, or both --new and TOKEN)\n"
            "\n"
            "examples:\n"
            "  edge-gateway hash-token --new\n"
            "  edge-gateway hash-token < hmi-1.token"
        ),
    )
    hash_token.add_argument("token", nargs="?", metavar="TOKEN", help="the token to hash")
    hash_token.add_argument("--new", action="store_true", help="make a new token and hash it")
    tail.add_parser(sub)
    sendcommand.add_parser(sub)
    sub.add_parser(
        "hash-password",
        help="print the scrypt hash of an API password for [[api.users]]",
        formatter_class=raw,
        description=(
            "Print the scrypt hash of an API user's password, as password_scrypt in its\n"
            "[[api.users]] table wants it. The password is read from stdin (asked twice,\n"
            "not echoed, on a terminal). The gateway stores only the hash; scrypt, since\n"
            "passwords chosen by people can be weak.\n"
            "\n"
            "exit status:\n"
            "  0    printed\n"
            "  2    no usable password (empty, or the two entries differ)\n"
            "\n"
            "examples:\n"
            "  edge-gateway hash-password\n"
            "  edge-gateway hash-password < cpi.password"
        ),
    )
    outbox_parser = sub.add_parser(
        "outbox",
        help="look into the store-and-forward outbox; replay or purge dead letters",
        formatter_class=raw,
        description=(
            "Work on the outbox database of the config's [outbox] (in gateway.state_dir),\n"
            "safely while the gateway runs:\n"
            "  stats          backlog, sequence numbers, batch in flight, gaps, dead letters\n"
            "  peek [N]       the N oldest readings waiting (default 10)\n"
            "  dead-letters   batches CPI refused for good (status and answer excerpt)\n"
            "  replay-dead    put the dead letters back in front of the backlog, to be sent\n"
            "                 again (after fixing the iFlow)\n"
            "  purge-dead     delete the dead letters\n"
            "Run it as the gateway's user (sudo -u edge-gateway) so that files it creates\n"
            "stay the service's.\n"
            "\n"
            "exit status:\n"
            "  0    done\n"
            "  69   the outbox cannot be opened (missing: has the gateway run with [cpi]?)\n"
            "  78   config error\n"
            "\n"
            "examples:\n"
            "  sudo -u edge-gateway edge-gateway outbox stats\n"
            "  sudo -u edge-gateway edge-gateway outbox replay-dead"
        ),
    )
    outbox_parser.add_argument("--config", type=Path, default=DEFAULT_PATH, help=config_help)
    outbox_parser.add_argument(
        "action", choices=["stats", "peek", "dead-letters", "replay-dead", "purge-dead"]
    )
    outbox_parser.add_argument(
        "n", nargs="?", type=_peek_count, default=10, help="for peek: 1 .. 100000"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup("info")
    try:
        if args.command == "check-config":
            return check_config(args.config, plan=args.plan)
        if args.command == "run":
            return run(args.config)
        if args.command == "hash-token":
            return deviceauth.hash_token_command(args.token, new=args.new)
        if args.command == "tail":
            return tail.main(args)
        if args.command == "send-command":
            return sendcommand.main(args)
        if args.command == "hash-password":
            return api.hash_password_command()
        if args.command == "outbox":
            return outbox_command(args.config, args.action, args.n)
        return demo()
    except KeyboardInterrupt:
        entry.ignore_signals()
        return 130
    except BrokenPipeError:
        # `check-config | head`: the reader has all it wanted. Quietly, as other tools do;
        # stdout goes to /dev/null so the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception:  # a defect: say so at critical priority, exit for systemd to restart
        log.critical("edge-gateway crashed; please report this traceback", exc_info=True)
        return EX_SOFTWARE


def check_config(path: Path, *, plan: bool = False) -> int:
    try:
        config = load_config(path, check_state_dir=True)
    except ConfigError as e:
        print("\n".join(e.lines()), file=sys.stderr)
        print(f"{len(e.problems)} problem(s); nothing was started", file=sys.stderr)
        return EX_CONFIG
    print(f"{path}: OK")
    for line in summary(config):
        print(f"  {line}")
    if plan:
        for line in request_plan(config):
            print(line)
    return 0


def _peek_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= n <= 100_000:
        raise argparse.ArgumentTypeError(f"{n} is not from 1 to 100000")
    return n


def outbox_command(path: Path, action: str, n: int) -> int:
    from gateway import outbox

    try:
        config = load_config(path)
    except ConfigError as e:
        print("\n".join(e.lines()), file=sys.stderr)
        return EX_CONFIG
    file = config.outbox.path(config.gateway.state_dir)
    try:
        if action == "stats":
            lines = outbox.stats(file)
        elif action == "peek":
            lines = outbox.peek(file, n)
        elif action == "dead-letters":
            lines = outbox.dead_letters(file) or ["no dead letters"]
        elif action == "replay-dead":
            lines = [f"{outbox.replay_dead(file)} readings put back in front of the backlog"]
        else:
            lines = [f"{outbox.purge_dead(file)} dead readings deleted"]
    except outbox.OutboxError as e:
        print(f"outbox {file}: {e}", file=sys.stderr)
        return StartupError.EX_UNAVAILABLE
    for line in lines:
        print(line)
    return 0


def run(path: Path) -> int:
    return _serve(lambda: prepare_state_dir(load_config(path), str(path)))


def demo() -> int:
    from gateway import demo as demo_mod
    from gateway.selfsigned import demo_certificate
    from gateway.simulator import EnergyMeterSimulator

    # The simulator stops after the gateway (which closes its connection first) has stopped.
    with demo_mod.state_tempdir() as state_dir, EnergyMeterSimulator() as meter:
        try:
            cert, key, made = demo_certificate(demo_mod.certificate_dir())
        except OSError as e:  # a read-only home: a certificate for this run only
            log.warning("demo: cannot keep a certificate in %s (%s)", demo_mod.certificate_dir(), e)
            cert, key, made = demo_certificate(Path(state_dir))
        plane = demo_mod.DemoPlane(demo_mod.wss_port(), cert, key, deviceauth.generate_token())
        secret_file = Path(state_dir) / "cpi-client-secret"
        secret_file.write_text(deviceauth.generate_token())
        cpi = demo_mod.DemoCpi(demo_mod.free_port(), secret_file, cert)
        api = demo_mod.demo_api(cert, key, avoid=plane.port)
        log.info(
            "demo: simulated sensors (bus line-1) and a Modbus TCP energy meter on %s:%d "
            "(bus plc), state in %s; press Ctrl-C to stop",
            meter.host,
            meter.port,
            state_dir,
        )
        log.info(
            "demo: devices connect to wss://127.0.0.1:%d as client demo-device with token %s "
            "(made for this run); "
            "the certificate is self-signed (%s %s): trust that file, e.g. 'edge-gateway tail "
            "--ca %s'; on this machine just run 'edge-gateway tail'",
            plane.port,
            plane.token,
            "made now in" if made else "kept in",
            cert,
            cert,
        )
        log.info(
            "demo: readings are stored in the outbox and forwarded to a local stand-in for "
            "CPI on https://127.0.0.1:%d/http/edge/readings (Basic auth, CSRF), which logs each "
            "batch it receives",
            cpi.port,
        )
        log.info(
            "demo: status page https://127.0.0.1:%d/ (user %s, password %s); the same "
            "certificate; writable: plc/meter/power_limit (0..6 kW) and plc/meter/relay; "
            "try 'edge-gateway send-command --url https://127.0.0.1:%d --ca %s "
            "--user %s modbus:plc/meter/power_limit 4.5' with EDGE_GATEWAY_PASSWORD set; "
            "commands to the wss client go to device:demo-device",
            api.port,
            demo_mod.API_USER,
            api.password,
            api.port,
            cert,
            demo_mod.API_USER,
        )
        return _serve(
            lambda: prepare_state_dir(
                demo_mod.demo_config(state_dir, plc_port=meter.port, plane=plane, cpi=cpi, api=api),
                "demo config",
            ),
            [demo_mod.cpi_standin(cpi, key), demo_mod.console],
        )


def _serve(load: Callable[[], Config], extras: Sequence[Extra] = ()) -> int:
    # Until the gateway's own signal handling runs, SIGTERM is only remembered: one during
    # start-up stops the gateway as soon as it can (gateway.entry installs this first thing).
    entry.handle_early_signals()
    try:
        config = load()  # also what SIGHUP calls, so a reload is checked the same way
    except ConfigError as e:
        for line in e.lines():
            log.error("%s", line)
        log.error(
            "config invalid: not starting (exit %d); fix it and check with "
            "'edge-gateway check-config'",
            EX_CONFIG,
        )
        return EX_CONFIG
    logs.setup(config.logging.level)
    notifier = Notifier()
    gateway = Gateway.create(config, load, notifier)
    gateway.settle = True

    async def serve() -> None:
        try:
            await gateway.run(extras, stop_requested=bool(entry.early_terms))
        finally:
            # The gateway has stopped: nothing is left for a signal to do. Ignored, not just
            # handled: trio closes its signal wakeup socket before it restores the previous
            # one, and a handled signal in between prints "Exception ignored when trying to
            # write to the signal wakeup fd".
            entry.ignore_signals()

    try:
        trio.run(serve)
    except StartupError as e:
        log.critical("cannot start: %s (exit %d)", e, e.exit_status)
        return e.exit_status
    except KeyboardInterrupt:
        # A Ctrl-C in the instant between the gateway's signal handling ending and trio
        # returning: the gateway had already stopped.
        if not gateway.stopped_cleanly:
            raise
    finally:
        entry.ignore_signals()
        notifier.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
