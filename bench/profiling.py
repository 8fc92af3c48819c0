"""Where a client's time goes: cProfile's numbers grouped by layer, per transaction.

cProfile slows every Python call by about the same amount, so code that makes more calls
looks slower than it is: read the shares and the call counts, not the absolute times. The
counts (function calls, event-loop passes per transaction) do not depend on machine load.
"""

from __future__ import annotations

import cProfile
import pstats
import re
from collections.abc import Callable
from pathlib import Path

ROOT = f"{Path(__file__).resolve().parent.parent}/"

# (label, test on cProfile's (filename, function name)); the first match wins.
LAYERS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("socket send/recv (syscalls)", lambda f, n: f == "~" and "_socket.socket" in n),
    ("epoll: waiting for the peer (idle)", lambda f, n: f == "~" and "'poll' of 'select" in n),
    ("epoll registration (syscalls)", lambda f, n: f == "~" and "select.epoll" in n),
    (
        "tty syscalls (read, write, ioctl, tcflush)",
        lambda f, n: (
            f == "~" and any(s in n for s in ("posix.read", "posix.write", "ioctl", "tcflush"))
        ),
    ),
    ("trio scheduler (trio/_core)", lambda f, n: "/trio/_core/" in f),
    ("trio sockets, streams, locks", lambda f, n: "/trio/" in f),
    ("asyncio loop, transports", lambda f, n: "/asyncio/" in f or f.endswith("selectors.py")),
    ("our Link (drivers/modbus/link.py)", lambda f, n: f.endswith("drivers/modbus/link.py")),
    ("our codec (drivers/modbus/codec.py)", lambda f, n: f.endswith("drivers/modbus/codec.py")),
    ("our serial port (drivers/serialio.py)", lambda f, n: f.endswith("drivers/serialio.py")),
    ("our bus: schedule, publish (bus.py)", lambda f, n: f.endswith("drivers/modbus/bus.py")),
    (
        "our decode, report filter, point config",
        lambda f, n: f.endswith(("drivers/modbus/datatypes.py", "drivers/modbus/config.py")),
    ),
    ("Reading objects (gateway/core/reading.py, attrs)", lambda f, n: "gateway.core.reading" in f),
    ("pymodbus PDUs, framers", lambda f, n: "/pymodbus/pdu/" in f or "/pymodbus/framer/" in f),
    ("pymodbus client, transaction, transport", lambda f, n: "/pymodbus/" in f),
    ("pyserial", lambda f, n: "/serial/" in f),
    ("contextlib, outcome, attrs", lambda f, n: "contextlib" in f or "outcome" in f or "attr" in f),
]
OTHER = "other (builtins, the timing loop)"
LOOP_PASSES = {"unrolled_run", "_run_once"}
"""The function entered once per pass of the Trio / asyncio event loop."""


def report(profiler: cProfile.Profile, transactions: int, top: int = 12) -> str:
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    layers: dict[str, float] = {}
    calls = 0
    passes = 0
    total = 0.0
    for (filename, _, name), (_, ncalls, tottime, _, _) in stats.items():
        calls += ncalls
        total += tottime
        if name in LOOP_PASSES:
            passes += ncalls
        label = next((label for label, test in LAYERS if test(filename, name)), OTHER)
        layers[label] = layers.get(label, 0.0) + tottime
    lines = [
        f"{calls / transactions:.0f} Python function calls and {passes / transactions:.1f} "
        f"event-loop passes per transaction; {total / transactions * 1e6:.0f} us/tx under "
        "cProfile, self time by layer:"
    ]
    for label, seconds in sorted(layers.items(), key=lambda kv: -kv[1]):
        share = seconds / total * 100
        if share >= 0.5:
            lines.append(f"  {seconds / transactions * 1e6:7.1f} us  {share:4.1f}%  {label}")
    lines.append(f"top {top} functions by self time (us/tx, calls/tx):")
    ranked = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    for (filename, lineno, name), (_, ncalls, tottime, _, _) in ranked:
        where = name if filename == "~" else f"{_short(filename)}:{lineno}({name})"
        lines.append(
            f"  {tottime / transactions * 1e6:7.1f} us  {ncalls / transactions:4.1f}  {where}"
        )
    return "\n".join(lines)


def _short(filename: str) -> str:
    if filename.startswith(ROOT):
        return filename[len(ROOT) :]
    m = re.search(r"(?:site-packages|lib/python3\.\d+)/(.*)", filename)
    return m.group(1) if m else filename


def profiled(run: Callable[[], object]) -> cProfile.Profile:
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        run()
    finally:
        profiler.disable()
    return profiler
