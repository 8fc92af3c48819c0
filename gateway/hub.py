"""In-memory fan-out of readings from producers (drivers, devices) to subscribers.

``Hub.publish`` never blocks and never raises for a slow subscriber: each subscription has a
bounded buffer and a policy for when it is full (drop the oldest reading and count it, or
disconnect the subscriber). Depends on trio, ``reading`` and ``topics`` only.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable, Mapping
from types import TracebackType

import attrs
import trio

from gateway.core.reading import Reading
from gateway.core.topics import matcher, matches, pattern_problem

_MAX_ROUTES = 100_000

DEFAULT_LAST_VALUES = 10_000
"""Topics whose latest reading the hub keeps (``Hub.latest``); the least recently updated
is forgotten beyond it, so devices that invent topics cannot grow it without bound."""


class OverflowPolicy(enum.Enum):
    DROP_OLDEST = "drop-oldest"
    DISCONNECT = "disconnect"


class SubscriberOverflow(Exception):
    """Raised to a subscriber with the ``disconnect`` policy whose buffer overflowed."""


@attrs.frozen
class Delivery:
    """What a subscriber receives: the readings waiting for it, oldest first, and how many
    readings were dropped since the previous delivery (a gap the subscriber can report)."""

    readings: list[Reading]
    dropped: int = 0


@attrs.frozen
class SubscriptionStatistics:
    patterns: tuple[str, ...]
    policy: str
    buffered: int
    maxlen: int
    delivered: int
    dropped: int


@attrs.frozen
class HubStatistics:
    published: int
    subscriptions: int
    """Open subscriptions (``subscribers`` may show fewer: names need not be unique)."""
    subscribers: Mapping[str, SubscriptionStatistics]
    """By subscriber name (names need not be unique; the last one of a name is shown)."""
    last_values: int
    """Topics with a latest reading kept (``Hub.latest``)."""


class Subscription:
    """A bounded queue of readings matching some patterns. Use as a context manager so that it
    is removed from the hub however the subscriber ends."""

    def __init__(
        self,
        hub: Hub,
        name: str,
        patterns: Iterable[str],
        maxlen: int,
        policy: OverflowPolicy,
    ) -> None:
        self._hub = hub
        self.name = name
        self.patterns = tuple(patterns)
        self.maxlen = maxlen
        self.policy = policy
        self._buffer: collections.deque[Reading] = collections.deque()
        self._wakeup = trio.Event()
        self._dropped_since_delivery = 0
        self._overflowed = False
        self.closed = False
        self.delivered = 0
        self.dropped = 0

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove the subscription from the hub; waiting receivers get ``trio.EndOfChannel``."""
        if not self.closed:
            self.closed = True
            self._hub._remove(self)
            self._wakeup.set()

    def matches(self, topic: str) -> bool:
        return any(matches(p, topic) for p in self.patterns)

    def _offer(self, reading: Reading) -> None:
        if self.closed:
            return
        if len(self._buffer) >= self.maxlen:
            if self.policy is OverflowPolicy.DISCONNECT:
                self._overflowed = True
                self.dropped += 1
                self.close()
                return
            self._buffer.popleft()
            self.dropped += 1
            self._dropped_since_delivery += 1
        self._buffer.append(reading)
        self._wakeup.set()

    def receive_nowait(self) -> Delivery:
        """Everything waiting now; raises ``trio.WouldBlock`` when nothing is."""
        if self._buffer or self._dropped_since_delivery:
            readings = list(self._buffer)
            self._buffer.clear()
            delivery = Delivery(readings, self._dropped_since_delivery)
            self._dropped_since_delivery = 0
            self.delivered += len(readings)
            return delivery
        if self._overflowed:
            raise SubscriberOverflow(
                f"subscriber {self.name!r} fell more than {self.maxlen} readings behind"
            )
        if self.closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> Delivery:
        """Wait for at least one reading (or a gap) and return all that are waiting.

        Cancel-safe, as trio's channels are: a cancelled ``receive`` has taken nothing. It
        checks for cancellation before taking anything, and after taking it yields only
        through a shielded checkpoint (or not at all, when it already yielded waiting), so
        the readings it took are always returned."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            try:
                delivery = self.receive_nowait()
            except trio.WouldBlock:
                await self._wakeup.wait()  # cancelled here: nothing was taken
                self._wakeup = trio.Event()
                waited = True
                continue
            # A receive must yield; one that waited has, and a second pass through the
            # scheduler would cost every subscriber a turn per delivery.
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return delivery

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Delivery:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def statistics(self) -> SubscriptionStatistics:
        return SubscriptionStatistics(
            patterns=self.patterns,
            policy=self.policy.value,
            buffered=len(self._buffer),
            maxlen=self.maxlen,
            delivered=self.delivered,
            dropped=self.dropped,
        )


class Watermark:
    """How far a consumer (the outbox) has made the hub's readings durable, counted in
    ``Hub.published``: a publisher that noted ``hub.published`` after publishing waits with
    ``reached`` until its readings were committed, or learns they were not (dropped before
    the disk, refused by a full outbox)."""

    REFUSED_KEPT = 256
    """Runs of refused readings remembered one by one (adjacent refusals make one run);
    beyond, the oldest are forgotten and everything up to their end counts as not stored."""

    def __init__(self, position: int) -> None:
        self.position = position
        # (start, end] runs of refused positions, oldest first, never adjacent.
        self._refused: collections.deque[tuple[int, int]] = collections.deque()
        # Positions up to here (inclusive) count as refused: runs forgotten lay below it.
        self._forgotten = position
        self._moved = trio.Event()

    def advance(self, count: int, *, stored: bool = True) -> None:
        """The next ``count`` readings (in publish order) were committed, or not."""
        if count <= 0:
            return
        start = self.position
        self.position += count
        if not stored:
            if self._refused and self._refused[-1][1] == start:
                self._refused[-1] = (self._refused[-1][0], self.position)
            else:
                self._refused.append((start, self.position))
                if len(self._refused) > self.REFUSED_KEPT:
                    self._forgotten = self._refused.popleft()[1]
        self._moved.set()
        self._moved = trio.Event()

    async def reached(self, first: int, last: int) -> bool:
        """Wait until readings ``first`` (exclusive) .. ``last`` (inclusive), as positions in
        ``Hub.published``, are covered; whether every one of them was stored. Readings so
        old that the refusals around them were forgotten count as not stored: publishing
        them again at worst stores them twice, where a wrong yes would lose them."""
        while self.position < last:
            await self._moved.wait()
        if first < self._forgotten:
            return False
        return not any(start < last and first < end for start, end in self._refused)


class Hub:
    """Fan-out of readings. ``publish`` is synchronous and O(matching subscribers)."""

    def __init__(
        self, default_maxlen: int = 1000, *, last_values: int = DEFAULT_LAST_VALUES
    ) -> None:
        self.default_maxlen = default_maxlen
        self.last_values = last_values
        # topic -> its latest reading, least recently updated first.
        self._latest: dict[str, Reading] = {}
        self._subs: dict[int, Subscription] = {}
        # topic -> subscriptions matching it; rebuilt lazily after (un)subscribe.
        self._routes: dict[str, tuple[Subscription, ...]] = {}
        self.published = 0

    def subscribe(
        self,
        name: str,
        patterns: Iterable[str] = ("#",),
        *,
        maxlen: int | None = None,
        policy: OverflowPolicy = OverflowPolicy.DROP_OLDEST,
    ) -> Subscription:
        patterns = tuple(patterns)
        for p in patterns:
            problem = pattern_problem(p)
            if problem:
                raise ValueError(problem)
        size = self.default_maxlen if maxlen is None else maxlen
        if size < 1:
            raise ValueError("maxlen must be at least 1")
        sub = Subscription(self, name, patterns, size, policy)
        self._subs[id(sub)] = sub
        self._routes.clear()
        return sub

    def _remove(self, sub: Subscription) -> None:
        if self._subs.pop(id(sub), None) is not None:
            self._routes.clear()

    def publish(self, reading: Reading) -> None:
        """Hand ``reading`` to every matching subscriber. Never blocks."""
        self.published += 1
        latest = self._latest
        if latest.pop(reading.topic, None) is None and len(latest) >= self.last_values:
            del latest[next(iter(latest))]
        latest[reading.topic] = reading
        route = self._routes.get(reading.topic)
        if route is None:
            if len(self._routes) >= _MAX_ROUTES:
                self._routes.clear()  # bounded memory even if devices invent topics
            route = tuple(s for s in self._subs.values() if s.matches(reading.topic))
            self._routes[reading.topic] = route
        for sub in route:
            sub._offer(reading)

    def publish_many(self, readings: Iterable[Reading]) -> None:
        for reading in readings:
            self.publish(reading)

    def latest(self, patterns: Iterable[str]) -> list[Reading]:
        """The latest reading of each topic matching any of ``patterns``, by topic."""
        wanted = matcher(patterns)
        found = [r for t, r in self._latest.items() if wanted(t)]
        found.sort(key=lambda r: r.topic)
        return found

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            published=self.published,
            subscriptions=len(self._subs),
            subscribers={s.name: s.statistics() for s in self._subs.values()},
            last_values=len(self._latest),
        )
