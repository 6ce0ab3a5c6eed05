"""Webhook benchmark: ENDPOINTS webhook endpoints and one WebSocket subscription, fed the same
EVENTS issuePrescription mutations, on one gateway process.

Runs against MONGODB_URI (its database there is dropped at the end), or starts its own FerretDB
in a temporary directory; the gateway is a real uvicorn process (`python -m app.cli serve`).
The receiver of every endpoint is a starlette app under uvicorn in this process, verifying each
delivery's signature with `standardwebhooks` as a partner would; the subscriber (the baseline,
in the same run, over the same events) is a graphql-transport-ws client in this process too;
the writers post the mutations over HTTP from here, as fast as they are answered.

Two phases, each of EVENTS mutations and each with its baseline in the same run:

  closed loop   the writers as fast as they are answered: deliveries/s is the capacity (a
                gateway process is one core; past it, events queue and latency grows with
                the queue, for the webhooks first: ten POSTs cost more than one frame)
  paced         the writers paced at --rate events/s in total: latency below saturation

Latency runs from the moment a writer got the mutation's answer to the moment the receiver (or
the subscriber) got the event with that prescription id. Every endpoint and the subscriber must
get every event once, in leaf order; the figures are invalid otherwise (exit 1). Not a test:
slow figures never fail the run. Exit 2 when a process did not start or the deliveries never
completed within --timeout, 130 on Ctrl-C.

    .venv/bin/python bench/webhooks.py [--endpoints 10] [--events 1000] [--writers 8]
        [--rate 10] [--timeout 600]
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
    streams: dict[str, Stream],
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
            streams["subscription"].add(change["prescriptionId"], int(change["leafIndex"]), arrived)
            changed.set()


async def write(
    gateway: Gateway, token: str, events: int, writers: int, rate: float | None = None
) -> dict[str, float]:
    """`events` mutations by `writers` concurrent writers, paced at `rate` per second in
    total when given; answer time by prescription id."""
    acked: dict[str, float] = {}
    counter = itertools.count()
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    started = time.time()

    async def writer() -> None:
        async with httpx.AsyncClient(limits=one, timeout=300, trust_env=False) as http:
            while (n := next(counter)) < events:
                if rate is not None:
                    await asyncio.sleep(max(0.0, started + n / rate - time.time()))
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


@dataclass
class Phase:
    """One phase's figures: the webhook deliveries and the subscription's, same events."""

    name: str
    events: int
    writes_per_s: float
    deliveries: int
    deliveries_per_s: float
    webhook: list[float]  # latencies, seconds
    subscription: list[float]
    violations: int


async def phase(
    name: str,
    gateway: Gateway,
    writer: str,
    args: argparse.Namespace,
    receivers: Receivers,
    subscribed: dict[str, Stream],
    subscriber: asyncio.Task[None],
    rate: float | None,
    events: int,
) -> Phase:
    """Write `events` mutations (paced at `rate`, or closed loop) and wait until every
    endpoint and the subscriber got them all."""
    for endpoint in receivers.streams:
        receivers.streams[endpoint] = Stream()
    subscribed["subscription"] = Stream()
    streams = [*receivers.streams.values(), subscribed["subscription"]]
    progress(f"{name}: {events} events to {len(receivers.streams)} endpoints and 1 subscriber")
    started = time.time()
    acked = await write(gateway, writer, events, args.writers, rate)
    written = time.time()

    def received(s: Stream) -> int:
        return sum(rx in acked for rx in s.arrived)  # not an earlier phase's events

    deadline = time.monotonic() + args.timeout
    while not all(received(s) >= len(acked) for s in streams):
        if time.monotonic() > deadline:
            got = [received(s) for s in streams]
            raise Broken(f"{name}: deliveries incomplete after {args.timeout:g} s: {got}")
        if subscriber.done():
            subscriber.result()
            raise Broken("the subscription ended")
        receivers.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(receivers.changed.wait(), 1)
    webhook = [
        (at - acked[rx], at)
        for s in receivers.streams.values()
        for rx, at in s.arrived.items()
        if rx in acked
    ]
    last = max(at for _, at in webhook)
    subscription = subscribed["subscription"]
    return Phase(
        name,
        len(acked),
        len(acked) / (written - started),
        len(webhook),
        len(webhook) / (last - started),
        [latency for latency, _ in webhook],
        [at - acked[rx] for rx, at in subscription.arrived.items() if rx in acked],
        sum(s.duplicates + s.unverified + (not s.in_order()) for s in streams),
    )


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
    phases: list[Phase] = []
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
        subscribed: dict[str, Stream] = {"subscription": Stream()}
        ready = asyncio.Event()
        tasks.append(
            asyncio.create_task(
                subscribe(gateway, partner, size - 1, subscribed, ready, receivers.changed)
            )
        )
        await asyncio.wait_for(ready.wait(), 30)
        load0 = os.getloadavg()[0]
        phases.append(
            await phase(
                "closed loop",
                gateway,
                writer,
                args,
                receivers,
                subscribed,
                tasks[0],
                None,
                args.events,
            )
        )
        phases.append(
            await phase(
                f"paced {args.rate:g}/s",
                gateway,
                writer,
                args,
                receivers,
                subscribed,
                tasks[0],
                args.rate,
                args.events,
            )
        )
        load1 = os.getloadavg()[0]
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

    closed, paced = phases
    print(
        f"bench/webhooks.py: {args.endpoints} endpoints and 1 WebSocket subscription (the "
        f"baseline) over the same events, {args.events} events per phase by {args.writers} writers"
    )
    print(f"  database: {server}")
    print(
        f"  machine: {os.cpu_count()} cores shared by the database, the gateway, the receivers,"
        f" the subscriber and the writers; load average {load0:.1f} -> {load1:.1f}; "
        f"Python {platform.python_version()}"
    )
    print()
    print(
        f"  {'phase':22} {'writes/s':>9} {'deliveries':>10} {'deliv/s':>8}"
        f" {'webhook p50 ms':>15} {'p99 ms':>9} {'subscr. p50 ms':>15} {'p99 ms':>9}"
    )
    for ph in phases:
        print(
            f"  {ph.name:22} {ph.writes_per_s:>9.1f} {ph.deliveries:>10,} "
            f"{ph.deliveries_per_s:>8,.0f} {ms(pct(ph.webhook, 0.5)):>15} "
            f"{ms(pct(ph.webhook, 0.99)):>9} {ms(pct(ph.subscription, 0.5)):>15} "
            f"{ms(pct(ph.subscription, 0.99)):>9}"
        )
    print()
    for key, ph in (("closed", closed), ("paced", paced)):
        print(f"figure: {key}_webhook_deliveries_per_s = {ph.deliveries_per_s:.1f}")
        for what, values in (("webhook", ph.webhook), ("subscription", ph.subscription)):
            print(f"figure: {key}_{what}_p50_ms = {pct(values, 0.5) * 1000:.1f}")
            print(f"figure: {key}_{what}_p99_ms = {pct(values, 0.99) * 1000:.1f}")
    for key, ph in (("closed", closed), ("paced", paced)):
        r = pct(ph.webhook, 0.99) / pct(ph.subscription, 0.99)
        print(f"ratio: {key}_webhook_p99/subscription_p99 = {r:.2f}")
    r = pct(paced.webhook, 0.99) / pct(paced.subscription, 0.99)
    print(
        f"target: webhook p99 within 2x of the subscription's (paced): "
        f"{'met' if r <= 2 else 'NOT MET'}"
    )
    violations = closed.violations + paced.violations
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
        "--rate", type=float, default=10, help="events per second in the paced phase (10)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds to wait for every delivery (600)"
    )
    parser.add_argument("--keep-logs", type=Path, help="copy the gateway's log here")
    args = parser.parse_args()
    if args.endpoints < 1 or args.events < 1 or args.writers < 1 or args.rate <= 0:
        parser.error("--endpoints, --events and --writers must be at least 1, --rate above 0")
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
