#!/usr/bin/env python3
"""Follow prescription events over GraphQL (graphql-transport-ws), resuming after drops.

Prints one JSON object per event on stdout. When the connection drops or the server ends the
subscription (the subscriber fell behind, the token expired), it reconnects and resumes after
the last leaf index it printed, so nothing is missed and nothing repeats. Needs the `websockets`
package (installed with the project).

    .venv/bin/python scripts/subscribe.py --token "$PARTNER" --pharmacy pharmacy-1
    .venv/bin/python scripts/subscribe.py --token "$AUDITOR" --after 41 --status DELIVERED
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import websockets

QUERY = """
subscription($filter: EventFilter, $after: Int) {
  prescriptionEvents(filter: $filter, afterLeafIndex: $after) {
    prescriptionId type status version at leafIndex
  }
}
"""


async def follow(url: str, token: str, event_filter: dict[str, Any], after: int | None) -> None:
    while True:
        try:
            async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:
                init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}
                await ws.send(json.dumps(init))
                ack = json.loads(await ws.recv())
                if ack.get("type") != "connection_ack":
                    sys.exit(f"subscribe: the server refused the connection: {ack}")
                variables = {"filter": event_filter or None, "after": after}
                await ws.send(
                    json.dumps(
                        {
                            "id": "1",
                            "type": "subscribe",
                            "payload": {"query": QUERY, "variables": variables},
                        }
                    )
                )
                async for raw in ws:
                    message = json.loads(raw)
                    payload = message.get("payload") or {}
                    if message["type"] == "next" and payload.get("data"):
                        event = payload["data"]["prescriptionEvents"]
                        after = event["leafIndex"]
                        print(json.dumps(event), flush=True)
                    elif message["type"] in ("next", "error"):
                        errors = payload.get("errors", payload)
                        print(f"subscribe: server says: {errors}", file=sys.stderr)
                        codes = {(e.get("extensions") or {}).get("code") for e in errors}
                        if codes & {"UNAUTHENTICATED", "FORBIDDEN", "BAD_USER_INPUT"}:
                            sys.exit(2)
                        break  # e.g. SUBSCRIBER_TOO_SLOW or TOKEN_EXPIRED: resume below
                    elif message["type"] == "complete":
                        break
        except (OSError, websockets.ConnectionClosed) as exc:
            print(f"subscribe: connection lost ({exc}); resuming after {after}", file=sys.stderr)
        await asyncio.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/graphql")
    parser.add_argument("--token", required=True, help="a bearer JWT (rxledger token ...)")
    parser.add_argument("--after", type=int, help="last leaf index already seen (default: now)")
    parser.add_argument("--prescription", help="only this prescription id")
    parser.add_argument("--pharmacy", help="only this pharmacy's prescriptions")
    parser.add_argument("--organization", help="only this pharmacy's or courier company's")
    parser.add_argument("--patient", help="only this patient's prescriptions")
    parser.add_argument("--status", action="append", help="only events into this status (repeat)")
    args = parser.parse_args()
    event_filter = {
        k: v
        for k, v in {
            "prescriptionId": args.prescription,
            "pharmacy": args.pharmacy,
            "organization": args.organization,
            "patientId": args.patient,
            "status": args.status,
        }.items()
        if v
    }
    try:
        asyncio.run(follow(args.url, args.token, event_filter, args.after))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
