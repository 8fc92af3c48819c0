"""systemd's notify protocol: one datagram per message to ``$NOTIFY_SOCKET``.

``READY=1``, ``STATUS=...``, ``STOPPING=1``, ``RELOADING=1`` + ``MONOTONIC_USEC``,
``WATCHDOG=1``. A no-op when not started by systemd. The protocol is stable and needs no
library (systemd ``man/sd_notify.xml``).
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("gateway.sdnotify")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        self._sock: socket.socket | None = None
        self._failing = False
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the event loop on a full receive queue; a lost STATUS is harmless.
            self._sock.setblocking(False)
            if self.address.startswith("@"):  # abstract namespace
                self.address = "\0" + self.address[1:]
        self.watchdog_interval = self._watchdog_interval(env)

    @staticmethod
    def _watchdog_interval(env: os._Environ[str] | dict[str, str]) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None."""
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            value = int(usec)
        except ValueError:
            return None
        return value / 1e6 / 2 if value > 0 else None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> None:
        """Send one message; never raises (systemd being gone must not stop the gateway)."""
        if self._sock is None or self.address is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:
            if not self._failing:  # once per outage, not once per ping
                log.warning("sd_notify failed: %s", e)
            self._failing = True
        else:
            self._failing = False

    def ready(self, status: str | None = None) -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text.splitlines()[0] if text else ''}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
