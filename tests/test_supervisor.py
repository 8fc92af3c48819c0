"""Supervisor: restarts with growing, jittered delays; others keep running; reset after health."""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from gateway.core.backoff import Backoff
from gateway.core.component import UP, Condition, StartPolicy, StartupError, State
from gateway.supervisor import Part, Supervised

Progress = Callable[[], None]
RunFn = Callable[..., Awaitable[None]]


class FnPart:
    """A part made of a run function, with a settable condition."""

    def __init__(self, fn: RunFn, condition: Condition = UP) -> None:
        self.fn = fn
        self.cond = condition

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.fn(task_status=task_status)

    def condition(self) -> Condition:
        return self.cond

    def statistics(self) -> object:
        return None


def parts(make: Callable[[Progress], RunFn]) -> Callable[[Progress], Part]:
    return lambda progress: FnPart(make(progress))


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    b = Backoff(initial=1.0, maximum=60.0)
    assert [b.ceiling(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert b.ceiling(10_000) == 60  # no overflow however long a bus stays down


def test_equal_jitter_stays_in_the_upper_half_of_the_ceiling() -> None:
    b = Backoff(initial=1.0, maximum=60.0)
    rng = random.Random(7)
    for n in range(1, 12):
        delays = [b.delay(n, rng) for _ in range(200)]
        assert all(b.ceiling(n) / 2 <= d <= b.ceiling(n) for d in delays)
        # Spread over the range (no lock step), never at once.
        assert min(delays) < b.ceiling(n) * 0.6 < b.ceiling(n) * 0.9 < max(delays)


class NoJitter(random.Random):
    """Always the top of the range, so delays are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


def failing(times: int, *, up_for: float = 0.0) -> tuple[list[float], Callable[..., object]]:
    """A component that comes up, runs ``up_for`` seconds, then fails; ``times`` times."""
    starts: list[float] = []

    def make(progress: Progress) -> Callable[..., Awaitable[None]]:
        async def run(*, task_status: trio.TaskStatus[None]) -> None:
            starts.append(trio.current_time())
            task_status.started()
            if len(starts) <= times:
                await trio.sleep(up_for)
                raise OSError(f"port gone (attempt {len(starts)})")
            while True:
                progress()
                await trio.sleep(1)

        return run

    return starts, make


async def test_failing_component_restarts_with_growing_delays_others_keep_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts, make = failing(5)
    bad = Supervised("bad", parts(make), Backoff(1.0, 60.0), rng=NoJitter())
    ticks: list[float] = []

    def make_good(progress: Progress) -> Callable[..., Awaitable[None]]:
        async def run(*, task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            while True:
                ticks.append(trio.current_time())
                await trio.sleep(1)

        return run

    good = Supervised("good", parts(make_good), Backoff())
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(bad.run)
        await nursery.start(good.run)
        await trio.sleep(99.5)  # not on a tick: same-instant wakeups have no set order
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert list(bad.delays) == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert bad.total_failures == 5
    assert bad.last_error == "OSError: port gone (attempt 5)"
    # The good bus ticked once a second all along, untouched by the other's failures.
    assert ticks == [t0 + i for i in range(100)]
    assert good.total_failures == 0
    assert good.health().state is State.DOWN
    assert good.health().reason == "stopped"


async def test_backoff_resets_after_a_period_of_health(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _, make = failing(6, up_for=0.0)
    backoff = Backoff(1.0, 60.0)
    sup = Supervised("x", parts(make), backoff, healthy_after=30.0, rng=NoJitter())
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(5)  # failures at t=0, 1, 3: delays 1, 2, 4
        assert list(sup.delays) == [1.0, 2.0, 4.0]
        nursery.cancel_scope.cancel()

    # Now a component that stays up longer than healthy_after between failures.
    _starts, make = failing(3, up_for=40.0)
    sup = Supervised("y", parts(make), backoff, healthy_after=30.0, rng=NoJitter())
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(200)
        nursery.cancel_scope.cancel()
    assert list(sup.delays) == [1.0, 1.0, 1.0]  # never grew: each run was healthy long enough
    assert sup.total_failures == 3


async def test_failure_before_started_does_not_hold_back_startup(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def make(progress: Progress) -> Callable[..., Awaitable[None]]:
        async def run(*, task_status: trio.TaskStatus[None]) -> None:
            raise FileNotFoundError("/dev/ttyUSB0")

        return run

    sup = Supervised("rs485", parts(make), Backoff(1.0, 4.0), rng=NoJitter())
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)  # returns although the component never came up
        health = sup.health()
        assert health.state is State.DOWN
        assert health.reason == health.last_error == "FileNotFoundError: /dev/ttyUSB0"
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert list(sup.delays)[:4] == [1.0, 2.0, 4.0, 4.0]


async def test_stalled_component_is_restarted(autojump_clock: trio.testing.MockClock) -> None:
    attempts: list[float] = []

    def make(progress: Progress) -> Callable[..., Awaitable[None]]:
        async def run(*, task_status: trio.TaskStatus[None]) -> None:
            attempts.append(trio.current_time())
            task_status.started()
            progress()
            await trio.sleep_forever()  # hangs without progress

        return run

    sup = Supervised("hung", parts(make), Backoff(1.0, 1.0), stall_after=10.0, rng=NoJitter())
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(sup.run)
        await trio.sleep(25)
        nursery.cancel_scope.cancel()
    assert attempts == [t0, t0 + 11.0, t0 + 22.0]
    assert sup.last_error == "ComponentStalled: no progress for 10s; restarting"


async def test_stuck_reports_only_when_the_supervisor_failed_to_act(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def make(progress: Progress) -> Callable[..., Awaitable[None]]:
        async def run(*, task_status: trio.TaskStatus[None]) -> None:
            task_status.started()
            with trio.CancelScope(shield=True):  # ignores the supervisor's cancel
                await trio.sleep(1000)

        return run

    sup = Supervised("wedged", parts(make), Backoff(), stall_after=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(5)
        assert not sup.stuck(grace=5.0)
        await trio.sleep(11)
        assert sup.stuck(grace=5.0)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("failures", [1, 2])
async def test_traceback_logged_first_time_then_a_count(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, failures: int
) -> None:
    _, make = failing(failures)
    sup = Supervised("x", parts(make), Backoff(1.0, 2.0), rng=NoJitter())
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    records = [
        r for r in caplog.records if r.name == "gateway.supervisor" and r.levelname == "ERROR"
    ]
    assert len(records) == failures
    assert records[0].exc_info is not None
    assert all(r.exc_info is None for r in records[1:])
    assert [r.kv["failures"] for r in records] == list(range(1, failures + 1))  # type: ignore[attr-defined]


async def test_health_follows_the_parts_condition_with_since(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wall = [1000.0]
    part = FnPart(lambda *, task_status: _serve_forever(task_status))
    sup = Supervised("line-1", lambda progress: part, Backoff(), wall_clock=lambda: wall[0])
    assert sup.health().state is State.STARTING
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert sup.health() == sup.health()  # stable while nothing changes
        assert sup.health().state is State.UP
        wall[0] = 1010.0
        part.cond = Condition(State.DOWN, "/dev/ttyUSB9 missing")
        health = sup.health()
        assert (health.state, health.reason, health.since) == (
            State.DOWN,
            "/dev/ttyUSB9 missing",
            1010.0,
        )
        wall[0] = 1020.0
        assert sup.health().since == 1010.0  # unchanged condition keeps its since
        part.cond = Condition(State.DEGRADED, "meter not answering")
        assert sup.health().since == 1020.0
        nursery.cancel_scope.cancel()
    assert sup.health().reason == "stopped"


async def _serve_forever(task_status: trio.TaskStatus[None]) -> None:
    task_status.started()
    await trio.sleep_forever()


async def test_required_component_that_cannot_start_raises_startup_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def make(progress: Progress) -> RunFn:
        async def run(*, task_status: trio.TaskStatus[None]) -> None:
            raise OSError(98, "Address already in use")

        return run

    sup = Supervised("server", parts(make), Backoff(), kind="wss", policy=StartPolicy.REQUIRED)
    with pytest.raises(StartupError, match=r"wss server cannot start: OSError: .*already in use"):
        await sup.run()
    assert sup.total_failures == 0  # not retried


async def test_required_component_is_restarted_once_it_has_been_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    starts, make = failing(2, up_for=1.0)
    sup = Supervised(
        "outbox", parts(make), Backoff(1.0, 1.0), policy=StartPolicy.REQUIRED, rng=NoJitter()
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert len(starts) == 3
    assert sup.total_failures == 2


async def test_delays_kept_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    _, make = failing(1000)
    sup = Supervised("x", parts(make), Backoff(0.001, 0.001), rng=NoJitter())
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(1.5)
        nursery.cancel_scope.cancel()
    assert sup.total_failures > 500
    assert len(sup.delays) == 32


async def test_a_failing_condition_report_degrades_health_instead_of_crashing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Broken(FnPart):
        def condition(self) -> Condition:
            raise KeyError("oops")

    sup = Supervised(
        "x", lambda progress: Broken(lambda *, task_status: _serve_forever(task_status)), Backoff()
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        health = sup.health()
        assert health.state is State.DEGRADED
        assert health.reason == "health unknown (KeyError: 'oops')"
        assert sup.total_failures == 0  # the part keeps running
        nursery.cancel_scope.cancel()


async def test_stopped_while_its_first_attempt_is_still_starting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A stop during start-up (a PLC that takes its connect timeout to answer) must let
    ``nursery.start`` return, not fail with 'child exited without calling started()'."""

    def make(progress: Progress) -> RunFn:
        async def run(*, task_status: trio.TaskStatus[None]) -> None:
            await trio.sleep(5)  # still connecting
            task_status.started()
            await trio.sleep_forever()

        return run

    sup = Supervised("plc", parts(make), Backoff())
    async with trio.open_nursery() as nursery:

        async def stop_soon() -> None:
            await trio.sleep(1)
            sup.stop()

        nursery.start_soon(stop_soon)
        await nursery.start(sup.run)  # returns once stopped
    assert sup.health().reason == "stopped"
