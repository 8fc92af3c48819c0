"""The ``Reading`` value that flows from drivers through the hub to every consumer.

Pure data; depends on nothing but attrs.
"""

from __future__ import annotations

import enum
import json
import time
from datetime import UTC, datetime

import attrs

Value = float | int | bool | str | None


class Quality(enum.Enum):
    GOOD = "good"
    BAD = "bad"


@attrs.frozen(slots=True)
class Reading:
    """One value of one point at one instant.

    ``topic`` is ``bus/device/point``; ``timestamp`` is UTC seconds since the epoch; ``seq`` is
    the gateway-wide sequence number, set once the reading is stored (later: the outbox).
    A bad reading carries ``reason`` (``timeout``, ``crc``, ``exception 02 illegal address``...).
    """

    topic: str
    value: Value
    unit: str | None = None
    quality: Quality = Quality.GOOD
    reason: str | None = None
    timestamp: float = attrs.field(factory=time.time)
    seq: int | None = None
    # The JSON form, built once on first use and shared by every consumer (not part of equality).
    _encoded: bytes | None = attrs.field(default=None, init=False, eq=False, repr=False)

    @classmethod
    def bad(cls, topic: str, reason: str, *, unit: str | None = None) -> Reading:
        return cls(topic, None, unit=unit, quality=Quality.BAD, reason=reason)

    @property
    def good(self) -> bool:
        return self.quality is Quality.GOOD

    @property
    def time_utc(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp, UTC)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "topic": self.topic,
            "value": self.value,
            "quality": self.quality.value,
            "ts": self.time_utc.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        if self.unit is not None:
            out["unit"] = self.unit
        if self.reason is not None:
            out["reason"] = self.reason
        if self.seq is not None:
            out["seq"] = self.seq
        return out

    def encoded(self) -> bytes:
        """Compact JSON, computed once per reading however many subscribers send it."""
        if self._encoded is None:
            data = json.dumps(self.as_dict(), separators=(",", ":")).encode()
            object.__setattr__(self, "_encoded", data)
            return data
        return self._encoded
