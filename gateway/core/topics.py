"""Topic names (``bus/device/point``) and MQTT-style patterns (``+`` one level, ``#`` the rest).

Pure functions; used by the hub for subscriptions and, later, by ACLs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

_NAME = re.compile(r"[A-Za-z0-9_.:-]+")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one level of a topic, or None when it can."""
    if not name:
        return "must not be empty"
    if not _NAME.fullmatch(name):
        return (
            f"{name!r} may use only letters, digits and _ . : - "
            "(no '/', '+', '#' or spaces: it becomes one level of a topic)"
        )
    return None


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid subscription pattern, or None when it is."""
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                return f"{pattern!r}: '#' may only be the last level"
        elif level == "+":
            continue
        elif "#" in level or "+" in level:
            return f"{pattern!r}: '+' and '#' must stand alone in a level"
        elif not level:
            return f"{pattern!r}: empty level"
    return None


TOPIC_LEVELS = 3
"""Every topic is ``bus/device/point`` (or ``devices/<client id>/<point>``)."""


def depth_problem(pattern: str) -> str | None:
    """Why a valid ``pattern`` can never match a topic of ``TOPIC_LEVELS`` levels, or None."""
    levels = pattern.split("/")
    fixed = levels[:-1] if levels[-1] == "#" else levels
    if len(fixed) > TOPIC_LEVELS or (levels[-1] != "#" and len(levels) != TOPIC_LEVELS):
        return (
            f"{pattern!r} can never match: topics have {TOPIC_LEVELS} levels, bus/device/point "
            "(end a shorter pattern in '/#')"
        )
    return None


def matches(pattern: str, topic: str) -> bool:
    """True when ``topic`` matches the MQTT-style ``pattern``."""
    if pattern == "#" or pattern == topic:
        return True
    p_levels = pattern.split("/")
    t_levels = topic.split("/")
    for i, p in enumerate(p_levels):
        if p == "#":
            return True
        if i >= len(t_levels):
            return False
        if p != "+" and p != t_levels[i]:
            return False
    return len(p_levels) == len(t_levels)


def matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """One test for "does a topic match any of ``patterns``", as ``matches`` answers it for
    each, made once for many topics: a single compiled regular expression, so that checking
    many topics against many patterns costs one scan per topic, not one per pair."""
    alternatives: list[str] = []
    for pattern in dict.fromkeys(patterns):
        levels = pattern.split("/")
        if "#" in levels:  # matches() answers yes once it reaches a '#' level
            levels = levels[: levels.index("#")]
            if not levels:
                return _any_topic
            tail = "(?:/.*)?"
        else:
            tail = ""
        body = "/".join("[^/]*" if level == "+" else re.escape(level) for level in levels)
        alternatives.append(body + tail)
    if not alternatives:
        return _no_topic
    expression = re.compile("|".join(f"(?:{a})" for a in alternatives), re.DOTALL)
    return lambda topic: expression.fullmatch(topic) is not None


def _any_topic(topic: str) -> bool:
    return True


def _no_topic(topic: str) -> bool:
    return False


DEVICE_NAMESPACE = "devices"
"""First topic level of every reading a device publishes over the device plane:
``devices/<client id>/<point>``. Reserved: no bus may take this name, so a device can never
publish as a sensor bus."""


def device_topic(client_id: str, point: str) -> str:
    """The topic of a reading that client ``client_id`` publishes for ``point``; raises
    ``ValueError`` when either is not a valid topic level."""
    for name in (client_id, point):
        problem = name_problem(name)
        if problem:
            raise ValueError(f"not a topic level: {problem}")
    return f"{DEVICE_NAMESPACE}/{client_id}/{point}"
