"""Hub: fan-out that never blocks a producer; bounded buffers with exact drop counts."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
import trio
import trio.testing

from gateway.core.reading import Reading, iso_utc
from gateway.core.topics import matcher, matches, pattern_problem
from gateway.hub import Hub, OverflowPolicy, SubscriberOverflow, Watermark


def reading(topic: str, value: float) -> Reading:
    return Reading(topic, value, timestamp=0.0)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("#", "a/b/c", True),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/+", "a/b/c", False),
        ("+/+/+", "a/b/c", True),
        ("a/b/c", "a/b/c", True),
        ("a/b", "a/b/c", False),
        ("b/#", "a/b/c", False),
    ],
)
def test_topic_matching(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected
    assert matcher([pattern])(topic) is expected


def test_one_matcher_for_many_patterns_agrees_with_matches() -> None:
    rng = random.Random(11)
    # Levels that regular expressions treat specially, and patterns matches() takes although
    # the hub refuses them ('#' inside, empty levels): the two must agree on all of it.
    names = ["a", "b", "a.b", "x*", "(", "+x", "#", "", "é", "\\", "a\nb", "$"]

    def levels(n: int, wild: bool) -> list[str]:
        pool = names + ["+", "#"] * 3 if wild else names
        return [rng.choice(pool) for _ in range(n)]

    for _ in range(3000):
        patterns = ["/".join(levels(rng.randint(1, 4), True)) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.2:
            patterns.append("a/b/c")  # some topics are equal to a pattern
        wanted = matcher(patterns)
        for _ in range(10):
            topic = "/".join(levels(rng.randint(1, 4), False))
            if rng.random() < 0.1:
                topic = rng.choice(patterns or ["a/b/c"])
            expected = any(matches(p, topic) for p in patterns)
            assert wanted(topic) is expected, (patterns, topic)
    assert matcher([])("a/b/c") is False
    assert matcher(["x/y/z", "#"])("") is True


def test_latest_matches_many_patterns_against_many_topics() -> None:
    hub = Hub()
    for i in range(1000):
        hub.publish(reading(f"line-{i % 10}/dev-{i}/t", i))
    patterns = [f"line-{i % 10}/dev-{i}/+" for i in range(0, 1000, 10)] + ["line-3/#"]
    found = [r.topic for r in hub.latest(patterns)]
    expected = sorted(
        t
        for t in (f"line-{i % 10}/dev-{i}/t" for i in range(1000))
        if t.startswith("line-0/") or t.startswith("line-3/")
    )
    assert found == expected


@pytest.mark.parametrize("pattern", ["a/#/b", "a/b+", "a//b", "#a"])
def test_bad_patterns_are_refused(pattern: str) -> None:
    assert pattern_problem(pattern) is not None
    with pytest.raises(ValueError, match="'"):
        Hub().subscribe("x", [pattern])


async def test_subscriber_that_never_reads_blocks_no_one() -> None:
    hub = Hub()
    stuck = hub.subscribe("stuck", ["#"], maxlen=10)
    live = hub.subscribe("live", ["line/#"], maxlen=1000)
    received: list[Reading] = []

    async def consume() -> None:
        async for delivery in live:
            received.extend(delivery.readings)
            if len(received) == 500:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        for i in range(500):
            hub.publish(reading("line/dev/p", i))  # sync: cannot block
            if i % 50 == 0:
                await trio.testing.wait_all_tasks_blocked()
    assert [r.value for r in received] == list(range(500))
    # The stuck subscriber kept the newest 10 and counted exactly the 490 it lost.
    delivery = stuck.receive_nowait()
    assert [r.value for r in delivery.readings] == list(range(490, 500))
    assert delivery.dropped == 490
    stats = hub.statistics().subscribers
    assert stats["stuck"].dropped == 490
    assert stats["live"].dropped == 0
    # The count is reported once, with the next delivery only.
    hub.publish(reading("line/dev/p", 1000))
    assert stuck.receive_nowait().dropped == 0


async def test_disconnect_policy_ends_only_that_subscriber() -> None:
    hub = Hub()
    strict = hub.subscribe("strict", ["#"], maxlen=3, policy=OverflowPolicy.DISCONNECT)
    other = hub.subscribe("other", ["#"], maxlen=100)
    for i in range(5):
        hub.publish(reading("a/b/c", i))
    # It gets what it had, then the overflow error; it no longer receives anything.
    assert [r.value for r in strict.receive_nowait().readings] == [0, 1, 2]
    with pytest.raises(SubscriberOverflow, match="fell more than 3 readings behind"):
        await strict.receive()
    assert "strict" not in hub.statistics().subscribers
    assert [r.value for r in other.receive_nowait().readings] == [0, 1, 2, 3, 4]


async def test_patterns_route_readings() -> None:
    hub = Hub()
    boiler = hub.subscribe("boiler", ["line/boiler/+"])
    temps = hub.subscribe("temps", ["+/+/temperature"])
    hub.publish(reading("line/boiler/temperature", 1))
    hub.publish(reading("line/boiler/pressure", 2))
    hub.publish(reading("line/conveyor/temperature", 3))
    assert [r.value for r in boiler.receive_nowait().readings] == [1, 2]
    assert [r.value for r in temps.receive_nowait().readings] == [1, 3]


async def test_close_unsubscribes_and_wakes_receiver() -> None:
    hub = Hub()
    got: list[type[BaseException]] = []

    async def wait() -> None:
        with pytest.raises(trio.EndOfChannel):
            await sub.receive()
        got.append(trio.EndOfChannel)

    with hub.subscribe("temp", ["#"]) as sub:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            sub.close()
    assert got == [trio.EndOfChannel]
    hub.publish(reading("a/b/c", 1))  # no subscriber left: nothing to deliver to
    assert hub.statistics().subscribers == {}


def test_reading_encodes_once() -> None:
    r = Reading("a/b/c", 1.5, unit="bar", timestamp=0.0)
    first = r.encoded()
    assert first == (
        b'{"topic":"a/b/c","value":1.5,"quality":"good",'
        b'"ts":"1970-01-01T00:00:00.000Z","unit":"bar"}'
    )
    assert r.encoded() is first
    bad = Reading.bad("a/b/c", "timeout")
    assert not bad.good
    assert bad.as_dict()["reason"] == "timeout"


async def test_receive_cancelled_after_wakeup_returns_what_it_took() -> None:
    """Readings arrive and the receiver's scope is cancelled in the same tick: the receive
    that was woken must hand over what it took (before the fix, 5 of 5 were lost)."""
    hub = Hub()
    sub = hub.subscribe("s", ["#"])
    got: list[Reading] = []

    async def receiver(*, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            delivery = await sub.receive()
            got.extend(delivery.readings)
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        scope = await nursery.start(receiver)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(5):
            hub.publish(reading("a/b/c", i))
        scope.cancel()
    assert [r.value for r in got] == [0, 1, 2, 3, 4]


async def test_receive_cancelled_before_it_starts_takes_nothing() -> None:
    hub = Hub()
    sub = hub.subscribe("s", ["#"])
    hub.publish(reading("a/b/c", 1))
    with trio.CancelScope() as scope:
        scope.cancel()
        await sub.receive()
    assert scope.cancelled_caught
    assert [r.value for r in sub.receive_nowait().readings] == [1]


@pytest.mark.parametrize("cancel_after", range(6))
@pytest.mark.parametrize("publish_after", range(4))
async def test_receive_cancelled_at_any_point_loses_nothing(
    cancel_after: int, publish_after: int
) -> None:
    """A consumer loop whose receive is cancelled at every possible scheduling point, with
    readings published before, during and after: every reading is received or still buffered."""
    hub = Hub()
    sub = hub.subscribe("s", ["#"], maxlen=10_000)
    got: list[Reading] = []
    published = 0

    async def consume() -> None:
        while True:
            with trio.CancelScope() as scope:
                scopes.append(scope)
                delivery = await sub.receive()
                got.extend(delivery.readings)

    scopes: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(20):
            for _ in range(publish_after):
                await trio.lowlevel.checkpoint()
            for _ in range(3):
                hub.publish(reading("a/b/c", published))
                published += 1
            for _ in range(cancel_after):
                await trio.lowlevel.checkpoint()
            scopes[-1].cancel()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    try:
        left = sub.receive_nowait().readings
    except trio.WouldBlock:
        left = []
    values = [r.value for r in got + left]
    assert values == list(range(published))


def test_latest_keeps_the_last_reading_of_each_topic_within_a_bound() -> None:
    hub = Hub(last_values=3)
    hub.publish(Reading("a/x/1", 1, timestamp=1.0))
    hub.publish(Reading("a/x/2", 2, timestamp=1.0))
    hub.publish(Reading("a/x/1", 3, timestamp=2.0))
    hub.publish(Reading("b/y/1", 4, timestamp=2.0))
    assert [(r.topic, r.value) for r in hub.latest(["a/#"])] == [("a/x/1", 3), ("a/x/2", 2)]
    assert [r.topic for r in hub.latest(["+/+/1"])] == ["a/x/1", "b/y/1"]
    # A fourth topic forgets the least recently updated one (a/x/2), not the oldest inserted.
    hub.publish(Reading("c/z/1", 5, timestamp=3.0))
    assert [r.topic for r in hub.latest(["#"])] == ["a/x/1", "b/y/1", "c/z/1"]
    assert hub.statistics().last_values == 3
    with hub.subscribe("one", ["#"]), hub.subscribe("one", ["a/#"]):
        stats = hub.statistics()
        assert stats.subscriptions == 2
        assert len(stats.subscribers) == 1  # by name
    assert hub.statistics().subscriptions == 0


def test_iso_utc_matches_datetime_to_the_millisecond() -> None:
    rng = random.Random(7)
    for i in range(20_000):
        ts = rng.uniform(946_684_800, 4_102_444_800)
        if i % 3 == 0:
            ts = round(ts, 3)
        if i % 5 == 0:
            ts = float(int(ts)) + 0.9999995  # rounds up into the next second
        expected = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
        assert iso_utc(ts) == expected.replace("+00:00", "Z"), ts


async def test_watermark_merges_adjacent_refusals_and_keeps_them() -> None:
    watermark = Watermark(0)
    for _ in range(300):  # one refusal per reading, as a full outbox refuses a stream
        watermark.advance(1, stored=False)
    watermark.advance(1)
    assert await watermark.reached(0, 1) is False
    assert await watermark.reached(150, 151) is False
    assert await watermark.reached(300, 301) is True


async def test_watermark_never_confirms_refusals_it_forgot() -> None:
    watermark = Watermark(0)
    for _ in range(300):  # runs apart: each one is kept on its own, up to REFUSED_KEPT
        watermark.advance(1, stored=False)
        watermark.advance(1)
    assert await watermark.reached(0, 1) is False  # forgotten: not stored, to be safe
    assert await watermark.reached(1, 2) is False  # stored, but among forgotten refusals
    last_refused = 2 * 299
    assert await watermark.reached(last_refused, last_refused + 1) is False
    assert await watermark.reached(last_refused + 1, last_refused + 2) is True
    assert await watermark.reached(2 * 200 + 1, 2 * 200 + 2) is True  # among those kept
