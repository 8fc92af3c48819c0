"""The bit of ASGI both of the gateway's HTTP apps need (the API and the CPI stand-in, both
served by hypercorn): the callable types and the lifespan handshake, which hypercorn insists
on (an app that just returns from it makes ``serve`` fail).

Depends on the standard library only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer the server's lifespan events until it shuts down (nothing to start or stop)."""
    while True:
        kind = (await receive())["type"]
        if kind == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif kind == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
