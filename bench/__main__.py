"""``python -m bench [tcp] [rtu] [fanout] [wss-memory] [outbox] [--profile]``: run the
benchmarks and print their tables."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib.metadata import version

from bench.peers import pin, quiet_pymodbus

BENCHMARKS = ("tcp", "rtu", "fanout", "wss-memory", "outbox")


def machine() -> str:
    cpus = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    load = os.getloadavg()[0]
    busy = "; other processes are busy: expect noise" if load > usable / 2 else ""
    return (
        f"machine: Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.machine()}, {cpus} CPUs ({usable} usable), load "
        f"average {load:.2f}{busy}; trio {version('trio')}, pymodbus {version('pymodbus')}, "
        f"pyserial {version('pyserial')}, trio-websocket {version('trio-websocket')}, "
        f"websockets {version('websockets')}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"{', '.join(BENCHMARKS)} (default: all)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing, cProfile one round of each client and print where time goes",
    )
    args = parser.parse_args(argv)
    quiet_pymodbus()
    about = machine()
    pinned = pin("client")
    names = args.names or list(BENCHMARKS)
    for name in names:
        if name not in BENCHMARKS:
            parser.error(f"unknown benchmark {name!r}: choose from {', '.join(BENCHMARKS)}")
    print(f"{about}; {pinned}")
    for name in names:
        print()
        started = time.perf_counter()
        if name == "tcp":
            from bench import modbus_tcp as bench
        elif name == "rtu":
            from bench import modbus_rtu as bench  # type: ignore[no-redef]
        elif name == "fanout":
            from bench import fanout as bench  # type: ignore[no-redef]
        elif name == "outbox":
            from bench import outbox as bench  # type: ignore[no-redef]
        else:
            from bench import wss_memory as bench  # type: ignore[no-redef]
        if args.profile:
            bench.profile()
        else:
            bench.run()
        print(f"({name} benchmark took {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
