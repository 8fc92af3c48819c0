"""A small Chrome DevTools Protocol driver for tests: headless Chromium, one page per test,
JavaScript evaluation, waits on a JavaScript condition, HTTP Basic auth and screenshots.

Only what the status page test needs, over the ``websockets`` library's sync client (the
tests that use it are plain functions, like those running ``edge-gateway demo``). A reader
thread takes every message off the DevTools socket: answers go to the call that waits for
them, events are recorded (``Page.events``) and the ones that must be answered at once
(``Fetch.requestPaused``, ``Fetch.authRequired``) are answered from that thread.

Basic auth goes through the browser's own challenge handling (``Fetch.enable`` with
``handleAuthRequests``): the server's 401 and ``WWW-Authenticate`` are exercised, and the
browser then sends the credentials on the page's same-origin requests by itself, exactly as
for a person who typed them into the login dialog. (An ``Authorization`` header added to
every request would also reach the WebSocket handshake to another port, which no real
browser does.)

Waiting for a condition polls inside the browser with a deadline: the page changes on its
own timers and sockets, outside anything this process could wait on.

Imports: the standard library and ``websockets``.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import websockets.sync.client
from websockets.exceptions import ConnectionClosed

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--ignore-certificate-errors",
    # Containers often have a 64 MiB /dev/shm, too small for a renderer with a full-page
    # screenshot; /tmp then stands in.
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)
STARTUP_TIMEOUT = 20.0
CALL_TIMEOUT = 10.0


def find_chromium() -> str | None:
    """Debian's ``/usr/bin/chromium``, else ``chromium`` on PATH, else None."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


class CdpError(Exception):
    """A DevTools call failed, or Chromium did not start or answer."""


class JsError(Exception):
    """The evaluated JavaScript threw; the message is the exception's description."""


class Browser:
    """A headless Chromium process and its browser-level DevTools connection.

    Use as a context manager: on exit the browser is asked to close and, whatever happens,
    its whole process group is killed."""

    def __init__(self, user_data_dir: Path, executable: str | None = None) -> None:
        executable = executable or find_chromium()
        if executable is None:
            raise CdpError("chromium not found: apt-get install chromium")
        user_data_dir.mkdir(parents=True, exist_ok=True)
        self.user_data_dir = user_data_dir
        self.log_file = user_data_dir / "chromium.log"
        self._log = self.log_file.open("wb")
        # Its own session (process group), so that the renderers and helpers it forks are
        # killed with it.
        self.proc = subprocess.Popen(
            [
                executable,
                *FLAGS,
                f"--user-data-dir={user_data_dir}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            url = self._wait_devtools_url()
            self._conn = _Connection(url)
        except BaseException:
            self._kill()
            raise

    def _wait_devtools_url(self) -> str:
        # Chromium writes the port it bound (line 1) and the browser target's path (line 2)
        # once it listens; until then the file is missing or incomplete.
        active = self.user_data_dir / "DevToolsActivePort"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                lines = active.read_text().split("\n")
            except FileNotFoundError:
                lines = []
            if len(lines) >= 2 and lines[0].strip().isdigit() and lines[1].startswith("/"):
                return f"ws://127.0.0.1:{int(lines[0])}{lines[1].strip()}"
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise CdpError(
                    f"chromium did not open its DevTools port within {STARTUP_TIMEOUT}s "
                    f"(exit status {self.proc.poll()}); its output:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        """The end of Chromium's own output, for error messages."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def new_page(
        self,
        *,
        width: int = 1280,
        height: int = 900,
        scale: float = 1,
        mobile: bool = False,
        credentials: tuple[str, str] | None = None,
    ) -> Page:
        """A new tab with the given viewport (CSS pixels) answering Basic auth challenges
        with ``credentials`` (user, password)."""
        target = self._conn.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._conn.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        page = Page(self._conn, target, session, credentials)
        page.set_viewport(width, height, scale=scale, mobile=mobile)
        return page

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(CdpError, TimeoutError):
                    self._conn.call("Browser.close", timeout=5)
            self._conn.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        finally:
            self._kill()

    def _kill(self) -> None:
        # Whatever is left of the group (a renderer that hung, a crashpad handler).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    """One tab, driven through its flattened DevTools session."""

    def __init__(
        self,
        conn: _Connection,
        target_id: str,
        session_id: str,
        credentials: tuple[str, str] | None,
    ) -> None:
        self._conn = conn
        self.target_id = target_id
        self.session_id = session_id
        self._credentials = credentials
        self._auth_attempts: dict[str, int] = {}
        self.auth_challenges = 0
        """How many times the browser asked for credentials (a server's 401 challenge)."""
        conn.handlers[session_id] = self._on_event
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        if credentials is not None:
            self.call(
                "Fetch.enable", {"handleAuthRequests": True, "patterns": [{"urlPattern": "*"}]}
            )

    # ---- DevTools plumbing --------------------------------------------------------------------

    def call(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = CALL_TIMEOUT
    ) -> dict[str, Any]:
        return self._conn.call(method, params, session=self.session_id, timeout=timeout)

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event of this page so far: ``{"method": ..., "params": ...}``."""
        return [e for e in self._conn.events_snapshot() if e.get("sessionId") == self.session_id]

    def wait_event(
        self,
        method: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda params: True,
        timeout: float = CALL_TIMEOUT,
        after: int = 0,
    ) -> dict[str, Any]:
        """The params of the first event ``method`` (from the ``after``-th event of the
        connection on) for which ``predicate`` holds."""
        event = self._conn.wait_event(
            lambda e: (
                e.get("sessionId") == self.session_id
                and e["method"] == method
                and predicate(e.get("params", {}))
            ),
            timeout,
            after,
            what=method,
        )
        params: dict[str, Any] = event.get("params", {})
        return params

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        # Runs on the reader thread: a paused request must be let through at once.
        if method == "Fetch.requestPaused":
            self._conn.send(
                "Fetch.continueRequest", {"requestId": params["requestId"]}, self.session_id
            )
        elif method == "Fetch.authRequired":
            self.auth_challenges += 1
            request = params["requestId"]
            tries = self._auth_attempts[request] = self._auth_attempts.get(request, 0) + 1
            # A second challenge for the same request means the credentials were refused:
            # cancel rather than loop, so the page sees the 401.
            if self._credentials is None or tries > 1:
                response: dict[str, str] = {"response": "CancelAuth"}
            else:
                user, password = self._credentials
                response = {
                    "response": "ProvideCredentials",
                    "username": user,
                    "password": password,
                }
            self._conn.send(
                "Fetch.continueWithAuth",
                {"requestId": request, "authChallengeResponse": response},
                self.session_id,
            )

    # ---- what tests use -----------------------------------------------------------------------

    def set_viewport(
        self, width: int, height: int, *, scale: float = 1, mobile: bool = False
    ) -> None:
        """The window size in CSS pixels. ``mobile`` makes the page's viewport meta tag count,
        as on a phone."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile},
        )

    def navigate(self, url: str, timeout: float = CALL_TIMEOUT) -> None:
        """Open ``url`` and wait for its load event."""
        mark = self._conn.event_count()
        answer = self.call("Page.navigate", {"url": url}, timeout=timeout)
        if answer.get("errorText"):
            raise CdpError(f"navigating to {url} failed: {answer['errorText']}")
        self.wait_event("Page.loadEventFired", timeout=timeout, after=mark)

    def evaluate(self, expression: str, timeout: float = CALL_TIMEOUT) -> Any:
        """The value of ``expression`` (JSON-able; a promise is awaited)."""
        answer = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout=timeout,
        )
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            exception = details.get("exception", {})
            raise JsError(exception.get("description") or details.get("text") or repr(details))
        return answer["result"].get("value")

    def wait_for(
        self, condition: str, timeout: float = CALL_TIMEOUT, describe: str = "null"
    ) -> Any:
        """Wait until the JavaScript expression ``condition`` is truthy, and return its value.
        On timeout, fail with the value of ``describe`` (an expression telling what the page
        shows instead)."""
        script = f"""new Promise((resolve) => {{
            const deadline = performance.now() + {timeout * 1000:.0f};
            const check = () => {{
                let value = null, error = null;
                try {{ value = ({condition}); }} catch (e) {{ error = String(e); }}
                if (value) resolve({{ok: true, value}});
                else if (performance.now() > deadline) resolve({{ok: false, error}});
                else setTimeout(check, 50);
            }};
            check();
        }})"""
        answer = self.evaluate(script, timeout=timeout + CALL_TIMEOUT)
        if not answer["ok"]:
            shown = self.evaluate(describe)
            raise AssertionError(
                f"not true within {timeout}s: {condition}"
                + (f" (last error: {answer['error']})" if answer["error"] else "")
                + f"; the page shows: {shown!r}"
            )
        return answer["value"]

    def screenshot(self, path: Path, *, full_page: bool = True) -> Path:
        """Save a PNG of the page (all of it when ``full_page``) to ``path``."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.call("Page.getLayoutMetrics")
            size = metrics["cssContentSize"]
            params["captureBeyondViewport"] = True
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": metrics["cssLayoutViewport"]["clientWidth"],
                "height": size["height"],
                "scale": 1,
            }
        data = self.call("Page.captureScreenshot", params, timeout=30)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def problems(self) -> list[str]:
        """JavaScript exceptions, ``console.error`` calls and errors the browser logged
        (failed loads, refused WebSocket handshakes), as readable lines."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                exception = details.get("exception", {})
                found.append(f"exception: {exception.get('description') or details.get('text')}")
            elif event["method"] == "Runtime.consoleAPICalled" and params["type"] in (
                "error",
                "assert",
            ):
                args = [a.get("value", a.get("description")) for a in params.get("args", [])]
                found.append(f"console.{params['type']}: {' '.join(map(str, args))}")
            elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(f"log ({entry.get('source')}): {entry['text']} {entry.get('url', '')}")
        return found

    def exceptions(self) -> list[str]:
        return [p for p in self.problems() if p.startswith("exception: ")]

    def close(self) -> None:
        self._conn.handlers.pop(self.session_id, None)
        with contextlib.suppress(CdpError):
            self._conn.call("Target.closeTarget", {"targetId": self.target_id})


class _Connection:
    """The DevTools WebSocket: numbered calls answered by id, events recorded in order."""

    def __init__(self, url: str) -> None:
        # Screenshots arrive as one large message; no proxy for a loopback address. Entered
        # as a context manager (websockets 17 warns otherwise) and closed by close().
        self._ws = websockets.sync.client.connect(
            url, max_size=None, proxy=None, compression=None, open_timeout=CALL_TIMEOUT
        ).__enter__()
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._answers: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._closed: str | None = None
        self.handlers: dict[str, Callable[[str, dict[str, Any]], None]] = {}
        self._reader = threading.Thread(target=self._read, daemon=True, name="cdp-reader")
        self._reader.start()

    def _read(self) -> None:
        reason = "DevTools connection closed"
        try:
            for raw in self._ws:
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        self._answers[message["id"]] = message
                        self._lock.notify_all()
                    continue
                handler = self.handlers.get(message.get("sessionId", ""))
                if handler is not None:
                    with contextlib.suppress(ConnectionClosed):
                        handler(message["method"], message.get("params", {}))
                with self._lock:
                    self._events.append(message)
                    self._lock.notify_all()
        except ConnectionClosed as e:
            reason = f"DevTools connection closed: {e}"
        finally:
            with self._lock:
                self._closed = reason
                self._lock.notify_all()

    def send(self, method: str, params: dict[str, Any] | None, session: str | None) -> int:
        call_id = next(self._ids)
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        return call_id

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> dict[str, Any]:
        try:
            call_id = self.send(method, params, session)
        except ConnectionClosed as e:
            raise CdpError(f"{method}: DevTools connection closed ({e})") from None
        deadline = time.monotonic() + timeout
        with self._lock:
            while call_id not in self._answers:
                remaining = deadline - time.monotonic()
                if self._closed is not None:
                    raise CdpError(f"{method}: {self._closed}")
                if remaining <= 0:
                    raise TimeoutError(f"{method}: no answer from Chromium within {timeout}s")
                self._lock.wait(remaining)
            answer = self._answers.pop(call_id)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error'].get('message')} ({answer['error']})")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def event_count(self) -> int:
        with self._lock:
            return len(self._events)

    def events_snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)

    def wait_event(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float,
        after: int,
        what: str,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._lock:
            seen = after
            while True:
                for event in itertools.islice(self._events, seen, None):
                    if predicate(event):
                        return event
                seen = len(self._events)
                remaining = deadline - time.monotonic()
                if self._closed is not None:
                    raise CdpError(f"waiting for {what}: {self._closed}")
                if remaining <= 0:
                    raise TimeoutError(f"no {what} event within {timeout}s")
                self._lock.wait(remaining)

    def close(self) -> None:
        self._ws.close()
        self._reader.join(CALL_TIMEOUT)
