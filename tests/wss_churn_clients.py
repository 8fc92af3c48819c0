"""Well-behaved device-plane clients, many at once: run by ``test_deviceplane_stress.py`` in a
subprocess, so that the independent peer (the ``websockets`` asyncio client) shares no event
loop, GIL or file descriptors with the server under test.

Each good client connects with a bearer token, subscribes to one topic of its own, publishes
a few readings on it, receives them back (through the gateway's hub) and its ack, and closes
cleanly (1000). Each bad client presents a wrong token and must get HTTP 401. At most
``--concurrency`` clients are open at a time. Prints one JSON object: counts of each outcome
and the first few unexpected ones.

Only the standard library and ``websockets``; no DNS (the URL holds an IP address).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
from typing import Any

import websockets.exceptions
from websockets.asyncio.client import connect

TIMEOUT = 10.0


async def good_client(
    url: str, context: ssl.SSLContext, token: str, client_id: str, index: int, readings: int
) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    point = f"p{index}"
    async with connect(
        url,
        ssl=context,
        additional_headers=headers,
        open_timeout=TIMEOUT,
        close_timeout=TIMEOUT,
        ping_interval=None,  # the server's pings are still answered
    ) as ws:
        # Subscribe and publish without waiting in between: the gateway handles one
        # connection's messages in order, so the readings come back to this client.
        await ws.send(json.dumps({"type": "subscribe", "topics": [f"devices/{client_id}/{point}"]}))
        publish = {
            "type": "publish",
            "id": f"churn-{index}",
            "readings": [{"point": point, "value": k} for k in range(readings)],
        }
        await ws.send(json.dumps(publish))
        values: list[Any] = []
        acked = False
        while not acked or len(values) < readings:
            frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            if frame == {"type": "ack", "id": publish["id"]}:
                acked = True
            elif frame["type"] == "readings":
                values += [r["value"] for r in frame["readings"]]
            else:
                return f"unexpected frame {frame!r}"
        if values != list(range(readings)):
            return f"readings {values!r}"
    if ws.close_code != 1000:
        return f"closed with {ws.close_code} {ws.close_reason!r}"
    return "ok"


async def bad_client(url: str, context: ssl.SSLContext, token: str) -> str:
    try:
        async with connect(
            url,
            ssl=context,
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=TIMEOUT,
        ):
            return "accepted a bad token"
    except websockets.exceptions.InvalidStatus as e:
        status = e.response.status_code
        return "refused" if status == 401 else f"status {status}"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True, help="PEM file of the CA to trust")
    parser.add_argument("--token", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--bad-token", required=True)
    parser.add_argument("--good", type=int, required=True)
    parser.add_argument("--bad", type=int, required=True)
    parser.add_argument("--readings", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()

    url = f"wss://127.0.0.1:{args.port}/"
    context = ssl.create_default_context(cafile=args.ca)
    limit = asyncio.Semaphore(args.concurrency)

    total = args.good + args.bad
    # Bad clients spread evenly among the good ones.
    bad = {index * total // args.bad for index in range(args.bad)}

    async def one(index: int) -> str:
        async with limit:
            try:
                if index in bad:
                    return await bad_client(url, context, args.bad_token)
                return await good_client(
                    url, context, args.token, args.client_id, index, args.readings
                )
            except Exception as e:  # reported to the test, which fails on any
                return f"{type(e).__name__}: {e}"

    outcomes = await asyncio.gather(*(one(i) for i in range(total)))
    unexpected = [o for o in outcomes if o not in ("ok", "refused")]
    print(
        json.dumps(
            {
                "ok": outcomes.count("ok"),
                "refused": outcomes.count("refused"),
                "unexpected": len(unexpected),
                "first_unexpected": unexpected[:5],
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
