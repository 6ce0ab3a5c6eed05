"""Webhook benchmark: ENDPOINTS webhook endpoints and one WebSocket subscription, fed the same
EVENTS issuePrescription mutations, on one gateway process.

Runs against MONGODB_URI (its database there is dropped at the end), or starts its own FerretDB
in a temporary directory; the gateway is a real uvicorn process (`python -m app.cli serve`).
The receiver of every endpoint is a starlette app under uvicorn in this process, verifying each
delivery's signature with `standardwebhooks` as a partner would; the subscriber (the baseline,
in the same run, over the same events) is a graphql-transport-ws client in this process too;
the writers post the mutations over HTTP from here, as fast as they are answered.

Latency runs from the moment a writer got the mutation's answer to the moment the receiver (or
the subscriber) got the event with that prescription id. Every endpoint and the subscriber must
get every event once, in leaf order; the figures are invalid otherwise (exit 1). Not a test:
slow figures never fail the run. Exit 2 when a process did not start or the deliveries never
completed within --timeout, 130 on Ctrl-C.

    .venv/bin/python bench/webhooks.py [--endpoints 10] [--events 1000] [--writers 8]
        [--timeout 600]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

ROOT = Path(__file__).resolve().parent.parent
# bench/graphql.py would shadow graphql-core: keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from app.auth import Role, load_dev_secret, mint_token  # noqa: E402
from bench.processes import (  # noqa: E402
    Broken,
    Gateway,
    drop_databases,
    free_port,
    gateway_env,
    pct,
    progress,
    redacted_uri,
    start_database,
    start_gateway,
    terminated_by_sigterm,
    wait_until_ready,
)

PHARMACY = "ph-bench"
ISSUE = """mutation($input: IssuePrescriptionInput!) {
  issuePrescription(input: $input) { __typename ... on Prescription { id } ... on Error { message } }
}"""
CREATE = """mutation($url: String!) {
  createWebhookEndpoint(url: $url) {
    __typename ... on WebhookEndpointCreated { secret endpoint { id } } ... on Error { message }
  }
}"""
EVENTS = """subscription($after: Int) {
  prescriptionEvents(afterLeafIndex: $after) { prescriptionId leafIndex }
}"""


@dataclass
class Stream:
    """What one receiver (an endpoint, or the subscriber) got: arrival time by prescription,
    and the leaf indices in arrival order."""

    arrived: dict[str, float] = field(default_factory=dict)
    indices: list[int] = field(default_factory=list)
    duplicates: int = 0
    unverified: int = 0

    def add(self, prescription: str, leaf_index: int, at: float) -> None:
        if prescription in self.arrived:
            self.duplicates += 1
            return
        self.arrived[prescription] = at
        self.indices.append(leaf_index)

    def in_order(self) -> bool:
        return self.indices == sorted(self.indices)


class Receivers:
    """Every endpoint's receiver: one uvicorn server, one path per endpoint."""

    def __init__(self) -> None:
        self.port = free_port()
        self.secrets: dict[str, Webhook] = {}
        self.streams: dict[str, Stream] = {}
        self.changed = asyncio.Event()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{name}"

    async def hook(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await request.body()
        arrived = time.time()
        stream = self.streams[name]
        try:
            data = self.secrets[name].verify(body, dict(request.headers))
        except Exception:
            stream.unverified += 1
            return Response(status_code=400)
        stream.add(data["data"]["prescriptionId"], int(data["data"]["leafIndex"]), arrived)
        self.changed.set()
        return Response(b"{}")

    async def start(self) -> None:
        app = Starlette(routes=[Route("/hook/{name}", self.hook, methods=["POST"])])
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                raise Broken("the receiver did not start")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task


async def graphql(
    http: httpx.AsyncClient, gateway: Gateway, query: str, token: str, **variables: Any
) -> dict[str, Any]:
    r = await http.post(
        f"{gateway.base}/graphql",
        json={"query": query, "variables": variables},
        headers={"authorization": f"Bearer {token}"},
    )
    body = r.json()
    if r.status_code != 200 or body.get("errors"):
        raise Broken(f"GraphQL failed: HTTP {r.status_code} {r.text[:300]}")
    data: dict[str, Any] = body["data"]
    return data


async def subscribe(
    gateway: Gateway,
    token: str,
    after: int,
    stream: Stream,
    ready: asyncio.Event,
    changed: asyncio.Event,
) -> None:
    """One graphql-transport-ws subscription to prescriptionEvents after leaf `after`."""
    url = gateway.base.replace("http://", "ws://") + "/graphql"
    async with connect(url, subprotocols=[Subprotocol("graphql-transport-ws")]) as ws:
        await ws.send(
            json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}})
        )
        ack = json.loads(await ws.recv())
        if ack.get("type") != "connection_ack":
            raise Broken(f"subscription refused: {ack}")
        await ws.send(
            json.dumps(
                {
                    "id": "1",
                    "type": "subscribe",
                    "payload": {"query": EVENTS, "variables": {"after": after}},
                }
            )
        )
        ready.set()
        async for raw in ws:
            arrived = time.time()
            message = json.loads(raw)
            if message.get("type") != "next":
                raise Broken(f"subscription ended: {message}")
            change = message["payload"]["data"]["prescriptionEvents"]
            stream.add(change["prescriptionId"], int(change["leafIndex"]), arrived)
            changed.set()


async def write(gateway: Gateway, token: str, events: int, writers: int) -> dict[str, float]:
    """`events` mutations by `writers` concurrent writers; answer time by prescription id."""
    acked: dict[str, float] = {}
    counter = itertools.count()
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)

    async def writer() -> None:
        async with httpx.AsyncClient(limits=one, timeout=300, trust_env=False) as http:
            while (n := next(counter)) < events:
                variables = {
                    "input": {
                        "patient": {"id": f"pt-{n:06d}", "name": f"Patient {n}"},
                        "medications": [
                            {"code": "C09AA05", "name": "Ramipril", "dose": "5 mg", "quantity": 28}
                        ],
                        "pharmacy": PHARMACY,
                    }
                }
                data = await graphql(http, gateway, ISSUE, token, **variables)
                issued = data["issuePrescription"]
                if issued["__typename"] != "Prescription":
                    raise Broken(f"issuePrescription: {issued}")
                acked[issued["id"]] = time.time()

    await asyncio.gather(*(writer() for _ in range(writers)))
    return acked


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f}"


async def run(args: argparse.Namespace, tmp: Path, uri: str, server: str) -> int:
    database = f"bench_webhooks_{uuid.uuid4().hex[:8]}"
    env = gateway_env(
        uri,
        database,
        tmp / "var",
        RXLEDGER_WEBHOOK_ALLOW_PRIVATE="1",
        RXLEDGER_WEBHOOK_SCAN_INTERVAL="0.2",
    )
    gateway = start_gateway(env, tmp / "gateway.log")
    receivers = Receivers()
    tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.to_thread(wait_until_ready, gateway)
        progress(f"gateway (pid {gateway.pid}) on {gateway.base}, database {database}")
        os.environ.pop("RXLEDGER_JWT_DEV_SECRET", None)  # the gateway's file under var/
        secret = load_dev_secret(tmp / "var")
        writer = mint_token(
            role=Role.PRESCRIBER, subject="dr-bench", organization="dept", secret=secret
        )
        partner = mint_token(
            role=Role.PARTNER, subject="partner-bench", organization=PHARMACY, secret=secret
        )
        await receivers.start()
        async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
            progress("warming up the gateway ...")
            await write(gateway, writer, 20, min(args.writers, 4))
            for i in range(args.endpoints):
                name = f"e{i}"
                created = (await graphql(http, gateway, CREATE, partner, url=receivers.url(name)))[
                    "createWebhookEndpoint"
                ]
                if created["__typename"] != "WebhookEndpointCreated":
                    raise Broken(f"createWebhookEndpoint: {created}")
                receivers.secrets[name] = Webhook(created["secret"])
                receivers.streams[name] = Stream()
            size = (await graphql(http, gateway, "{ ledger { size } }", partner))["ledger"]["size"]
        subscription = Stream()
        ready = asyncio.Event()
        tasks.append(
            asyncio.create_task(
                subscribe(gateway, partner, size - 1, subscription, ready, receivers.changed)
            )
        )
        await asyncio.wait_for(ready.wait(), 30)
        load0 = os.getloadavg()[0]
        progress(f"writing {args.events} events to {args.endpoints} endpoints and 1 subscriber ...")
        started = time.time()
        acked = await write(gateway, writer, args.events, args.writers)
        written = time.time()
        streams = [*receivers.streams.values(), subscription]
        deadline = time.monotonic() + args.timeout

        def received(s: Stream) -> int:
            return sum(rx in acked for rx in s.arrived)  # not the warm-up's events

        while not all(received(s) >= len(acked) for s in streams):
            if time.monotonic() > deadline:
                got = [received(s) for s in streams]
                raise Broken(
                    f"deliveries incomplete after {args.timeout:g} s: {got} of {len(acked)}"
                )
            if any(t.done() for t in tasks):
                tasks[0].result()
            receivers.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(receivers.changed.wait(), 1)
        load1 = os.getloadavg()[0]
        webhook_last = max(
            at for s in receivers.streams.values() for rx, at in s.arrived.items() if rx in acked
        )
        webhook_latency = [
            at - acked[rx]
            for s in receivers.streams.values()
            for rx, at in s.arrived.items()
            if rx in acked
        ]
        subscription_latency = [
            at - acked[rx] for rx, at in subscription.arrived.items() if rx in acked
        ]
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await receivers.stop()
        gateway.stop()
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(gateway.log_path, args.keep_logs / "gateway.log")
        with contextlib.suppress(Exception):
            await drop_databases(uri, [database])

    violations = sum(s.duplicates + s.unverified + (not s.in_order()) for s in streams)
    deliveries = len(webhook_latency)
    rate = deliveries / (webhook_last - started)
    w50, w99 = pct(webhook_latency, 0.5), pct(webhook_latency, 0.99)
    s50, s99 = pct(subscription_latency, 0.5), pct(subscription_latency, 0.99)
    ratio = w99 / s99 if s99 > 0 else float("nan")
    print(
        f"bench/webhooks.py: {args.endpoints} endpoints and 1 subscription, {len(acked)} events "
        f"by {args.writers} writers (closed loop, {len(acked) / (written - started):.1f} "
        "writes/s)"
    )
    print(f"  database: {server}")
    print(
        f"  machine: {os.cpu_count()} cores shared by the database, the gateway, the receivers,"
        f" the subscriber and the writers; load average {load0:.1f} -> {load1:.1f}; "
        f"Python {platform.python_version()}"
    )
    print()
    print(f"  {'':28} {'deliveries':>10} {'deliv/s':>9} {'ack>recv p50 ms':>16} {'p99 ms':>9}")
    print(f"  {'webhooks':28} {deliveries:>10,} {rate:>9,.0f} {ms(w50):>16} {ms(w99):>9}")
    print(
        f"  {'subscription (baseline)':28} {len(subscription_latency):>10,} {'':>9} "
        f"{ms(s50):>16} {ms(s99):>9}"
    )
    print()
    print(f"figure: webhook_deliveries_per_s = {rate:.1f}")
    print(f"figure: webhook_p50_ms = {w50 * 1000:.1f}")
    print(f"figure: webhook_p99_ms = {w99 * 1000:.1f}")
    print(f"figure: subscription_p50_ms = {s50 * 1000:.1f}")
    print(f"figure: subscription_p99_ms = {s99 * 1000:.1f}")
    print(f"ratio: webhook_p99/subscription_p99 = {ratio:.2f}")
    print(
        f"target: webhook p99 within 2x of the subscription's: {'met' if ratio <= 2 else 'NOT MET'}"
    )
    print(f"violations: {violations}")
    return 1 if violations else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--endpoints", type=int, default=10, help="webhook endpoints (10)")
    parser.add_argument("--events", type=int, default=1000, help="mutations (1000)")
    parser.add_argument("--writers", type=int, default=8, help="concurrent writers (8)")
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds to wait for every delivery (600)"
    )
    parser.add_argument("--keep-logs", type=Path, help="copy the gateway's log here")
    args = parser.parse_args()
    if args.endpoints < 1 or args.events < 1 or args.writers < 1:
        parser.error("--endpoints, --events and --writers must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rxbench-webhooks-"))
    ferret = None
    try:
        with terminated_by_sigterm():
            try:
                uri, ferret = start_database(tmp)
                server = (
                    f"MONGODB_URI {redacted_uri(uri)}"
                    if ferret is None
                    else f"FerretDB (SQLite handler), started for this run at {uri}"
                )
                progress(f"database: {server}")
                return asyncio.run(run(args, tmp, uri, server))
            except Broken as exc:
                print(f"benchmark broken: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                progress("interrupted; stopping the gateway and the database")
                return 130
    finally:
        if ferret is not None:
            ferret.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
