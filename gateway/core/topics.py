"""Topic names (``bus/device/point``) and MQTT-style patterns (``+`` one level, ``#`` the rest).

Pure functions; used by the hub for subscriptions and, later, by ACLs.
"""

from __future__ import annotations

import re

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
