"""Run one component under supervision: restart it with backoff when it fails or stalls.

``Supervised`` is the component the composition root sees for every bus (and later for the
outbox, forwarder and servers). Each attempt builds a fresh *part* (a bus driver instance...)
and runs it in its own cancel scope. A failure or a stall (no progress for too long) is
logged and the part is restarted after a delay from ``gateway.core.backoff``; the count of
consecutive failures resets after ``healthy_after`` of health. One failing component never
affects another: each has its own task and its own scope.

Start policy: a *supervised* component reports started after its first attempt came up or
failed, so one broken bus never holds back READY=1. A *required* component whose first
attempt fails before it is ready raises ``StartupError``: the process ends with a clear
message; once it has been up, it is restarted like any other.

Health comes from the supervisor (starting, backing off after a failure) and, while the part
runs, from the part's own ``condition()`` (a bus whose port is missing is down even though
its task runs).
"""

from __future__ import annotations

import collections
import logging
import random
import time
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from gateway.core.backoff import Backoff
from gateway.core.component import Condition, Health, StartPolicy, StartupError, State
from gateway.core.logs import kv
from gateway.hub import HubStatistics

log = logging.getLogger("gateway.supervisor")

DELAYS_KEPT = 32
"""Backoff delays kept for statistics and tests (the most recent ones)."""


class Part(Protocol):
    """One attempt of a supervised component: a bus driver instance, for example."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; call ``task_status.started()`` when ready."""
        ...

    def condition(self) -> Condition: ...

    def statistics(self) -> object: ...


MakePart = Callable[[Callable[[], None]], Part]
"""``make(progress)``: a fresh part for each attempt; it calls ``progress()`` as it works."""


class ComponentStalled(Exception):
    pass


@attrs.frozen
class SupervisedStatistics:
    name: str
    kind: str
    health: Health
    failures: int
    """Consecutive failures (reset after ``healthy_after`` of health)."""
    total_failures: int
    restarts: int
    part: object | None
    """The current attempt's own ``statistics()``, None between attempts."""
    policy: StartPolicy = StartPolicy.SUPERVISED


@attrs.frozen
class GatewayStatistics:
    """The whole gateway, as ``/readyz``, ``/metrics`` and the status page read it."""

    hub: HubStatistics
    components: tuple[SupervisedStatistics, ...]


class Supervised:
    def __init__(
        self,
        name: str,
        make: MakePart,
        backoff: Backoff,
        *,
        kind: str = "bus",
        policy: StartPolicy = StartPolicy.SUPERVISED,
        healthy_after: float = 30.0,
        stall_after: float | None = None,
        rng: random.Random | None = None,
        context: dict[str, str] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.kind = kind
        self.policy = policy
        self.make = make
        """Builds each attempt's part; a reload that reconfigures in place replaces it."""
        self.backoff = backoff
        self.healthy_after = healthy_after
        self.stall_after = stall_after
        self._rng = rng or random.Random()
        self._context = context or {kind: name}
        self._wall_clock = wall_clock
        self.state = State.STARTING
        self.last_progress = trio.current_time()
        self.failures = 0
        self.total_failures = 0
        self.restarts = 0
        self.last_error: str | None = None
        self.delays: collections.deque[float] = collections.deque(maxlen=DELAYS_KEPT)
        self.part: Part | None = None
        self._stalled = False
        self._stopped = False
        self._condition_failed = False
        self._cancel_scope: trio.CancelScope | None = None
        self._observed = Condition(State.STARTING)
        self._observed_since = wall_clock()

    # ---- health ------------------------------------------------------------------------------

    def progress(self) -> None:
        self.last_progress = trio.current_time()

    def _condition(self) -> Condition:
        if self.state is State.UP and self.part is not None:
            try:
                return self.part.condition()
            except Exception as e:  # a defect in a driver's report must not stop the tree
                if not self._condition_failed:
                    self._condition_failed = True
                    log.error("%s: condition() failed", self.label, exc_info=e)
                return Condition(State.DEGRADED, f"health unknown ({describe_error(e)})")
        if self._stopped:
            return Condition(State.DOWN, "stopped")
        if self.state is State.DOWN:
            return Condition(State.DOWN, self.last_error)
        return Condition(self.state)

    def health(self) -> Health:
        """The component's health; ``since`` is when its state or reason last changed."""
        current = self._condition()
        if current != self._observed:
            self._observed = current
            self._observed_since = self._wall_clock()
        return Health(current.state, self._observed_since, current.reason, self.last_error)

    def _set(self, state: State) -> None:
        self.state = state
        self.health()  # note the change now, so ``since`` is exact

    def stuck(self, grace: float) -> bool:
        """True when the part runs without progress well past ``stall_after``: the
        supervisor should have restarted it by now, so the supervisor itself is stuck."""
        if self.stall_after is None or self.state is not State.UP:
            return False
        return trio.current_time() - self.last_progress > self.stall_after + grace

    @property
    def label(self) -> str:
        """``bus plc``, ``device plane devices``; ``commands`` when kind and name agree."""
        return self.name if self.kind == self.name else f"{self.kind} {self.name}"

    def statistics(self) -> SupervisedStatistics:
        return SupervisedStatistics(
            name=self.name,
            kind=self.kind,
            health=self.health(),
            failures=self.failures,
            total_failures=self.total_failures,
            restarts=self.restarts,
            part=self.part.statistics() if self.part is not None else None,
            policy=self.policy,
        )

    # ---- running -----------------------------------------------------------------------------

    async def drain(self) -> None:
        """Let the part finish what it accepted, if it has a ``drain`` (the outbox commits
        what the hub holds, the forwarder its batch in flight); a producer has nothing to
        finish and stops when cancelled."""
        drain = getattr(self.part, "drain", None)
        if drain is None:
            await trio.lowlevel.checkpoint()
            return
        try:
            await drain()
        except Exception as e:  # stopping goes on: the part is cancelled next anyway
            log.error("%s: could not finish: %s", self.label, describe_error(e))

    def stop(self) -> None:
        """Cancel the part and the supervision loop."""
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise until cancelled."""
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
                            self.part = self.make(self.progress)
                            await nursery.start(self.part.run)
                            up_at = trio.current_time()
                            self._set(State.UP)
                            if self.failures:
                                log.info("%s is up again", self.label, extra=self._kv())
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
                        if not reported and self.policy is StartPolicy.REQUIRED:
                            # Not started: whoever waits in nursery.start() gets the error
                            # (and READY=1 is never sent), not a component that "started".
                            reported = True
                            raise self._startup_error(exc) from None
                        healthy_for = 0.0 if up_at is None else trio.current_time() - up_at
                        delay = self._failed(exc, healthy_for)
                    finally:
                        self.part = None
                    if not reported:
                        reported = True
                        task_status.started()
                    self._set(State.DOWN)
                    self.delays.append(delay)
                    await trio.sleep(delay)
                    self.restarts += 1
            finally:
                self._stopped = True
                self._set(State.DOWN)
                if not reported:
                    # Stopped (shutdown, reload) while the first attempt was still starting:
                    # whoever waits in nursery.start() must not get "child exited without
                    # calling task_status.started()".
                    task_status.started()

    def _kv(self, **more: object) -> dict[str, object]:
        return kv(**self._context, **more)

    async def _watch_stall(self, scope: trio.CancelScope) -> None:
        assert self.stall_after is not None
        while True:
            deadline = self.last_progress + self.stall_after
            if trio.current_time() >= deadline:
                self._stalled = True
                scope.cancel()
                return
            await trio.sleep_until(deadline)

    def _startup_error(self, exc: BaseException) -> StartupError:
        exc = _unwrap(exc)
        if isinstance(exc, StartupError):
            return exc
        what = self.label
        return StartupError(f"{what} cannot start: {describe_error(exc)}")

    def _failed(self, exc: BaseException, healthy_for: float) -> float:
        exc = _unwrap(exc)
        if healthy_for >= self.healthy_after:
            self.failures = 0
        self.failures += 1
        self.total_failures += 1
        self.last_error = describe_error(exc)
        delay = self.backoff.delay(self.failures, self._rng)
        fields = self._kv(failures=self.failures, restart_in=f"{delay:.1f}s")
        what = self.label
        if self.failures == 1:
            log.error("%s failed: %s", what, self.last_error, exc_info=exc, extra=fields)
        else:
            log.error("%s failed again: %s", what, self.last_error, extra=fields)
        return delay


def _unwrap(exc: BaseException) -> BaseException:
    # The per-attempt nursery wraps the part's error; report the error itself.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe_error(e) for e in exc.exceptions)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
