"""The ``edge-gateway`` command: ``run``, ``check-config``, ``demo``.

Exit status: 0 after a clean stop, 78 (EX_CONFIG) on a config error so that systemd's
``RestartPreventExitStatus=78`` stops a crash loop, 130 when interrupted during start-up.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from drivers.modbus.config import ModbusRtuBusConfig, ModbusTcpBusConfig
from drivers.modbus.planner import format_plan
from gateway import __version__
from gateway.app import Extra, Gateway, prepare_state_dir
from gateway.config import DEFAULT_PATH, EX_CONFIG, Config, ConfigError, load_config, summary
from gateway.core import logs
from gateway.sdnotify import Notifier

log = logging.getLogger("gateway")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-gateway",
        description="Reads plant sensors, serves them over wss, forwards them to SAP CPI.",
    )
    parser.add_argument("--version", action="version", version=f"edge-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"config file (default {DEFAULT_PATH})"
    run = sub.add_parser("run", help="run the gateway (what the systemd unit starts)")
    run.add_argument("--config", type=Path, default=DEFAULT_PATH, help=config_help)
    check = sub.add_parser("check-config", help="validate the config and say what would run")
    check.add_argument("--config", type=Path, default=DEFAULT_PATH, help=config_help)
    check.add_argument(
        "--plan",
        action="store_true",
        help="also print the read requests each Modbus bus sends per poll cycle",
    )
    sub.add_parser(
        "demo", help="run on embedded defaults with simulated sensors and a Modbus TCP meter"
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
        return demo()
    except KeyboardInterrupt:
        return 130


def check_config(path: Path, *, plan: bool = False) -> int:
    try:
        config = load_config(path)
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


def request_plan(config: Config) -> list[str]:
    """The read requests of every Modbus bus, as ``check-config --plan`` prints them: a
    heading per bus, then ``drivers.modbus.planner.format_plan``'s lines indented."""
    lines: list[str] = []
    for bus in config.buses:
        if isinstance(bus, ModbusRtuBusConfig | ModbusTcpBusConfig):
            lines.append(f"request plan of bus {bus.name} ({bus.kind}), addresses 0-based:")
            lines.extend(f"  {line}" for line in format_plan(bus.name, bus.devices))
    if not lines:
        lines.append("request plan: no Modbus buses")
    return lines


def run(path: Path) -> int:
    return _serve(lambda: prepare_state_dir(load_config(path), str(path)))


def demo() -> int:
    from gateway import demo as demo_mod
    from gateway.simulator import EnergyMeterSimulator

    # The simulator stops after the gateway (which closes its connection first) has stopped.
    with demo_mod.state_tempdir() as state_dir, EnergyMeterSimulator() as meter:
        log.info(
            "demo: simulated sensors (bus line-1) and a Modbus TCP energy meter on %s:%d "
            "(bus plc), state in %s; press Ctrl-C to stop",
            meter.host,
            meter.port,
            state_dir,
        )
        return _serve(
            lambda: prepare_state_dir(
                demo_mod.demo_config(state_dir, plc_port=meter.port), "demo config"
            ),
            [demo_mod.console],
        )


def _serve(load: Callable[[], Config], extras: Sequence[Extra] = ()) -> int:
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
    try:
        trio.run(Gateway.create(config, load, notifier).run, extras)
    finally:
        notifier.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
