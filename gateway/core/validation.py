"""Walking cattrs' detailed-validation errors: one place for every boundary that structures
untrusted data (the config file, device messages, later API bodies).

``leaves`` flattens the exception tree into ``(path, error)`` pairs with paths such as
``buses[1].devices[0].points[3].type``; an unknown key becomes its own pair with a "did you
mean" message. Each boundary turns the leaves into its own messages.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator

import attrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)


class UnknownKey(Exception):
    """A key the structure does not have; the message suggests the closest one."""


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def leaves(exc: BaseException, path: str = "") -> Iterator[tuple[str, BaseException]]:
    """Every error below ``exc`` with the path of the value it is about."""
    if isinstance(exc, ClassValidationError | IterableValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            if isinstance(note, AttributeValidationNote):
                sub_path = join(path, note.name)
            elif isinstance(note, IterableValidationNote):
                sub_path = f"{path}[{note.index}]"
            else:
                sub_path = path
            yield from leaves(sub, sub_path)
        for sub in without:
            yield from leaves(sub, path)
    elif isinstance(exc, ForbiddenExtraKeysError):
        allowed = [a.name for a in attrs.fields(exc.cl)]
        for key in sorted(exc.extra_fields):
            guess = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {guess[0]!r}?" if guess else f"allowed: {', '.join(allowed)}"
            yield join(path, key), UnknownKey(f"unknown key ({hint})")
    else:
        yield path, exc


def unique_keys(
    pairs: list[tuple[str, object]], duplicate: Callable[[str], Exception]
) -> dict[str, object]:
    """A JSON object from ``pairs`` (``json.loads``'s ``object_pairs_hook``), raising
    ``duplicate(key)`` for a key that appears twice: JSON parsers disagree on which one
    wins, so the gateway takes neither."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise duplicate(key)
            seen.add(key)
    return out


MAX_JSON_DEPTH = 32
"""Objects and arrays inside each other in untrusted JSON (a command's args, a device's ack
result). Python's parser stops only at its recursion limit, and a value nested just under it
would crash whatever walks it later (encoding it again, writing it as XML)."""


def json_depth_problem(value: object, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why ``value`` (decoded JSON) is nested too deep, or None; without recursion."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                return f"is nested more than {max_depth} levels deep: send a flatter value"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None
