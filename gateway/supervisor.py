"""Restart components that fail, with exponential backoff and full jitter.

``Backoff`` is the pure policy. ``Supervised`` runs one component (a bus, later the forwarder
and servers) in its own cancel scope: it restarts it after a failure or a stall (no progress
for too long), resets the backoff after a period of health, and reports its health for the
STATUS line, the watchdog and, later, ``/metrics``. One failing component never affects
another: each has its own task and its own scope.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Awaitable, Callable

import attrs
import trio

from gateway.core.logs import kv

log = logging.getLogger("gateway.supervisor")


@attrs.frozen
class Backoff:
    """Delay before restart number ``failures`` (1-based): uniform in
    ``[0, min(maximum, initial * 2**(failures-1))]`` ("full jitter")."""

    initial: float = 1.0
    maximum: float = 60.0
    healthy_after: float = 30.0

    def ceiling(self, failures: int) -> float:
        return min(self.maximum, self.initial * 2.0 ** min(max(failures - 1, 0), 62))

    def delay(self, failures: int, rng: random.Random) -> float:
        return rng.uniform(0, self.ceiling(failures))


class State(enum.Enum):
    STARTING = "starting"
    UP = "up"
    BACKOFF = "backoff"
    STOPPED = "stopped"


class ComponentStalled(Exception):
    pass


# A component: an async callable taking task_status and a progress callback; it calls
# task_status.started() when it is ready and runs until cancelled or it fails.
ComponentFn = Callable[..., Awaitable[None]]


class Supervised:
    def __init__(
        self,
        name: str,
        run: Callable[[Callable[[], None]], ComponentFn],
        backoff: Backoff,
        *,
        stall_after: float | None = None,
        rng: random.Random | None = None,
        context: dict[str, str] | None = None,
    ) -> None:
        """``run(progress)`` builds a fresh component for each attempt."""
        self.name = name
        self._make = run
        self.backoff = backoff
        self.stall_after = stall_after
        self._rng = rng or random.Random()
        self._context = context or {}
        self.state = State.STARTING
        self.since = trio.current_time()
        self.last_progress = self.since
        self.failures = 0  # consecutive, reset after health
        self.total_failures = 0
        self.restarts = 0
        self.last_error: str | None = None
        self.delays: list[float] = []  # backoff delays taken, for tests and statistics
        self._cancel_scope: trio.CancelScope | None = None

    def progress(self) -> None:
        self.last_progress = trio.current_time()

    def _set(self, state: State) -> None:
        self.state = state
        self.since = trio.current_time()

    def stuck(self, grace: float) -> bool:
        """True when the component is up without progress well past ``stall_after``: the
        supervisor should have restarted it by now, so the supervisor itself is stuck."""
        if self.stall_after is None or self.state is not State.UP:
            return False
        return trio.current_time() - self.last_progress > self.stall_after + grace

    def stop(self) -> None:
        """Cancel the component and the supervision loop."""
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise until cancelled. Reports started after the first attempt has either come
        up or failed, so one broken bus never holds back READY=1."""
        reported = False
        with trio.CancelScope() as self._cancel_scope:
            try:
                while True:
                    self._set(State.STARTING)
                    self._stalled = False
                    self.last_progress = trio.current_time()
                    up_at: float | None = None
                    try:
                        async with trio.open_nursery() as nursery:
                            await nursery.start(self._make(self.progress))
                            up_at = trio.current_time()
                            self._set(State.UP)
                            if self.failures:
                                log.info("%s is up again", self.name, extra=kv(**self._context))
                            if not reported:
                                reported = True
                                task_status.started()
                            if self.stall_after is not None:
                                nursery.start_soon(self._watch_stall, nursery.cancel_scope)
                        if self._stalled:
                            raise ComponentStalled(
                                f"no progress for {self.stall_after:g}s; restarting"
                            )
                        raise RuntimeError("component returned; it should run until cancelled")
                    except Exception as exc:  # a component failure, never Cancelled
                        healthy_for = 0.0 if up_at is None else trio.current_time() - up_at
                        delay = self._failed(exc, healthy_for)
                    if not reported:
                        reported = True
                        task_status.started()
                    self._set(State.BACKOFF)
                    self.delays.append(delay)
                    await trio.sleep(delay)
                    self.restarts += 1
            finally:
                self._set(State.STOPPED)

    _stalled = False

    async def _watch_stall(self, scope: trio.CancelScope) -> None:
        assert self.stall_after is not None
        while True:
            deadline = self.last_progress + self.stall_after
            if trio.current_time() >= deadline:
                self._stalled = True
                scope.cancel()
                return
            await trio.sleep_until(deadline)

    def _failed(self, exc: BaseException, healthy_for: float) -> float:
        # The per-attempt nursery wraps the component's error; log the error itself.
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if healthy_for >= self.backoff.healthy_after:
            self.failures = 0
        self.failures += 1
        self.total_failures += 1
        self.last_error = _describe(exc)
        delay = self.backoff.delay(self.failures, self._rng)
        fields = kv(**self._context, failures=self.failures, restart_in=f"{delay:.1f}s")
        if self.failures == 1:
            log.error("%s failed: %s", self.name, self.last_error, exc_info=exc, extra=fields)
        else:
            log.error("%s failed again: %s", self.name, self.last_error, extra=fields)
        return delay

    def statistics(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "since": self.since,
            "failures": self.failures,
            "total_failures": self.total_failures,
            "restarts": self.restarts,
            "last_error": self.last_error,
        }


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
