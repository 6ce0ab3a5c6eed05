"""Subscription benchmark: a thousand graphql-transport-ws subscribers on one gateway process.

Runs against MONGODB_URI (its database there is dropped at the end), or starts its own FerretDB
in a temporary directory; the gateway is a real uvicorn process (`python -m app.cli serve`).
The client sockets live in several client processes (multiprocessing), so one Python client
process is not the bottleneck; the writers post issuePrescription mutations over HTTP from this
process. Everything shares the machine's cores (and whatever else runs on it): the report says
how much CPU each side used.

Phases, in one run, each with its baseline measured in the same run:

  memory     the gateway's RSS before any socket, with SUBSCRIBERS bare sockets (connection_init
             only: the baseline), and once the same sockets have subscribed and are idle;
             per socket = the difference / SUBSCRIBERS (median of 5 samples once settled)
  closed     EVENTS mutations by WRITERS writers as fast as they are answered, with 1
             subscriber (the baseline) and with SUBSCRIBERS: deliveries/s is the capacity
  paced      the same writers paced at half the rate the closed phase delivered to each
             subscriber (or --rate) for --paced-seconds, with SUBSCRIBERS and with 1: latency
             below saturation

Subscribers select `prescriptionId version leafIndex at`. Delivery latency runs from the
moment the writer got the mutation's answer to the moment a subscriber received the event with
that prescriptionId (and, for reference, from the event's `at`, the server's clock at the
mutation; same machine, same clock). Every subscriber must receive every event exactly once,
in leafIndex order; the figures are invalid otherwise. Not a test: slow figures never fail the
run. Exit 1 when a subscriber missed, repeated or reordered an event or a mutation failed, 2
when a process did not start or a phase never completed, 130 on Ctrl-C.

    .venv/bin/python bench/subscriptions.py [--subscribers 1000] [--clients 4] [--writers 16]
        [--events 60] [--paced-seconds 20] [--rate R] [--no-compression]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol
from websockets.version import version as websockets_version

ROOT = Path(__file__).resolve().parent.parent
# bench/graphql.py would shadow graphql-core: keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from app.auth import Role, load_dev_secret, mint_token  # noqa: E402
from bench.processes import (  # noqa: E402
    Broken,
    Gateway,
    cpu_seconds,
    drop_databases,
    gateway_env,
    pct,
    progress,
    redacted_uri,
    start_database,
    start_gateway,
    terminated_by_sigterm,
    wait_until_ready,
)

MEMORY_TARGET_KIB = 50.0  # gateway RSS per idle subscriber
P99_TARGET_MS = 500.0  # delivery latency p99 at SUBSCRIBERS subscribers
PHARMACY = "pharmacy-bench"
PRESCRIBER = "dr-bench"
DEPARTMENT = "cardiology"

SUBSCRIBE = "subscription { prescriptionEvents { prescriptionId version leafIndex at } }"
ISSUE = """mutation Issue($input: IssuePrescriptionInput!) {
  issuePrescription(input: $input) { __typename ... on Prescription { id version } } }"""


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the new limit.
    Children inherit it, so call it before spawning the gateway and the client processes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- processes --------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise Broken(f"no VmRSS for process {pid}")


# --- the client processes -------------------------------------------------------------------


@dataclass(eq=False)
class Subscriber:
    """One client socket and what it received in the current phase."""

    ws: ClientConnection
    received: list[tuple[float, str, int, int, str]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    closing: bool = False

    async def read(self) -> None:
        try:
            async for raw in self.ws:
                t = time.time()
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "next":
                    payload = msg["payload"]
                    if payload.get("errors"):
                        self.problems.append(f"next with errors: {payload['errors']}"[:300])
                        continue
                    e = payload["data"]["prescriptionEvents"]
                    pid = e["prescriptionId"]
                    self.received.append((t, pid, e["leafIndex"], e["version"], e["at"]))
                    self.seen.add(pid)
                elif kind == "ping":
                    await self.ws.send(json.dumps({"type": "pong"}))
                elif kind != "pong":
                    self.problems.append(f"unexpected message: {raw!s:.300}")
        except ConnectionClosed as exc:
            if not self.closing:
                self.problems.append(f"socket closed by the server: {exc}")


def parse_at(at: str) -> float:
    return dt.datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


class ClientSide:
    """The sockets of one client process, driven by commands from the parent over a pipe."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.subscribers: list[Subscriber] = []

    async def serve(self) -> None:
        while True:
            command, *args = await readable(self.conn)
            try:
                reply = await getattr(self, command)(*args)
            except Exception:
                self.conn.send(("error", traceback.format_exc()))
            else:
                self.conn.send(("ok", reply))

    async def connect(self, url: str, token: str, count: int, compression: bool) -> dict[str, Any]:
        """Open `count` sockets, each through connection_init to connection_ack."""
        gate = asyncio.Semaphore(32)
        failures: list[str] = []

        async def one() -> None:
            async with gate:
                try:
                    ws = await connect(
                        url,
                        subprotocols=[Subprotocol("graphql-transport-ws")],
                        compression="deflate" if compression else None,
                        ping_interval=None,  # as a browser: the server pings, we answer
                        open_timeout=60,
                        max_size=2**20,
                    )
                    init = {"type": "connection_init", "payload": {"Authorization": token}}
                    await ws.send(json.dumps(init))
                    ack = json.loads(await asyncio.wait_for(ws.recv(), 60))
                    if ack.get("type") != "connection_ack":
                        failures.append(f"connection_init answered {ack}")
                        await ws.close()
                        return
                except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    return
                self.subscribers.append(Subscriber(ws))

        await asyncio.gather(*(one() for _ in range(count)))
        return {"connected": len(self.subscribers), "failures": failures[:5]}

    async def subscribe(self) -> None:
        message = json.dumps({"id": "1", "type": "subscribe", "payload": {"query": SUBSCRIBE}})
        for sub in self.subscribers:
            sub.reader = asyncio.create_task(sub.read())
        await asyncio.gather(*(sub.ws.send(message) for sub in self.subscribers))

    async def mark(self) -> None:
        """Start a new phase: forget what was received so far."""
        for sub in self.subscribers:
            sub.received.clear()
            sub.seen.clear()

    async def wait_for(self, count: int, timeout: float, ignore: set[str] | None = None) -> bool:
        """Wait until every socket has received `count` distinct prescriptions besides those
        in `ignore` (or has ended)."""
        ignore = ignore or set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(s.seen - ignore) >= count or s.problems for s in self.subscribers):
                return True
            await asyncio.sleep(0.05)
        return False

    async def evaluate(
        self, acked: dict[str, float], probes: set[str], timeout: float
    ) -> dict[str, Any]:
        """Wait for the phase's events, then check and time every socket's deliveries
        (ignoring late probe events, which announced the subscriptions live)."""
        await self.wait_for(len(acked), timeout, probes)
        report: dict[str, Any] = {
            "subscribers": len(self.subscribers),
            "deliveries": 0,
            "missing": 0,
            "duplicates": 0,
            "unexpected": 0,
            "out_of_order": 0,
            "complete": 0,
            "ended": 0,
            "samples": [],
            "last": 0.0,
        }
        from_ack, from_at = array.array("d"), array.array("d")
        samples: list[str] = report["samples"]
        for k, sub in enumerate(self.subscribers):
            received = [r for r in sub.received if r[1] not in probes]
            counts = Counter(pid for _, pid, _, _, _ in received)
            missing = len(acked.keys() - counts.keys())
            duplicates = sum(n - 1 for n in counts.values())
            unexpected = sum(1 for pid in counts if pid not in acked)
            leaves = [leaf for _, _, leaf, _, _ in received]
            out_of_order = sum(1 for a, b in itertools.pairwise(leaves) if b <= a)
            report["deliveries"] += len(received)
            report["missing"] += missing
            report["duplicates"] += duplicates
            report["unexpected"] += unexpected
            report["out_of_order"] += out_of_order
            report["ended"] += bool(sub.problems)
            if not (missing or duplicates or unexpected or out_of_order or sub.problems):
                report["complete"] += 1
            elif len(samples) < 5:
                samples.append(
                    f"socket {k}: {len(received)} received, {missing} missing, "
                    f"{duplicates} repeated, {unexpected} unexpected, "
                    f"{out_of_order} out of leafIndex order; {'; '.join(sub.problems[:2])}"
                )
            for t, pid, _, _, at in received:
                if pid in acked:
                    from_ack.append(t - acked[pid])
                    from_at.append(t - parse_at(at))
            if received:
                report["last"] = max(report["last"], received[-1][0])
        report["from_ack"] = from_ack.tobytes()
        report["from_at"] = from_at.tobytes()
        return report

    async def close(self) -> None:
        for sub in self.subscribers:
            sub.closing = True
        await asyncio.gather(*(sub.ws.close() for sub in self.subscribers), return_exceptions=True)
        for sub in self.subscribers:
            if sub.reader is not None:
                sub.reader.cancel()
        self.subscribers.clear()


def client_process(conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    raise_open_file_limit()
    with contextlib.suppress(EOFError, BrokenPipeError):
        asyncio.run(ClientSide(conn).serve())


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def readable(conn: Connection) -> Any:
    """The next object from a pipe, waiting in the event loop, not in a thread (a thread
    blocked on a pipe would hold up the exit on Ctrl-C or SIGTERM)."""
    loop = asyncio.get_running_loop()
    while not conn.poll():
        ready = loop.create_future()
        loop.add_reader(conn.fileno(), _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(conn.fileno())
    return conn.recv()


class ClientPool:
    """The client processes, forked before anything else runs in this process."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("fork")
        self.conns: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for k in range(processes):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=client_process, args=(theirs,), name=f"client-{k}", daemon=True
            )
            process.start()
            theirs.close()
            self.conns.append(ours)
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    async def ask(self, commands: list[tuple[Any, ...] | None]) -> list[Any]:
        """Send each client process its command (None: none) and collect the answers."""

        async def exchange(conn: Connection, command: tuple[Any, ...]) -> Any:
            try:
                conn.send(command)
                status, reply = await readable(conn)
            except (EOFError, OSError) as exc:
                raise Broken(
                    f"a client process died ({type(exc).__name__}) on {command[0]}"
                ) from None
            if status != "ok":
                raise Broken(f"a client process failed on {command[0]}:\n{reply}")
            return reply

        return await asyncio.gather(
            *(
                exchange(conn, command)
                for conn, command in zip(self.conns, commands, strict=True)
                if command is not None
            )
        )

    async def ask_all(self, *command: Any) -> list[Any]:
        return await self.ask([command] * len(self.conns))

    def stop(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()


# --- writing and measuring ------------------------------------------------------------------


def prescription_input(n: int) -> dict[str, Any]:
    return {
        "patient": {"id": f"pt-{n:06d}", "name": f"Patient {n}"},
        "medications": [
            {"code": "C09AA05", "name": "Ramipril", "dose": "5 mg", "quantity": 28},
        ],
        "pharmacy": PHARMACY,
        "department": DEPARTMENT,
        "notes": "subscription benchmark",
    }


@dataclass
class Writes:
    acked: dict[str, float] = field(default_factory=dict)  # prescription id -> answer time
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.acked) / (self.finished - self.started) if self.acked else 0.0


async def sequenced(url: str, authorization: str, size: int, timeout: float) -> None:
    """Wait until the log holds at least `size` leaves (Broken after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=timeout) as http:
        while True:
            r = await http.post(
                url,
                json={"query": "{ ledger { size } }"},
                headers={"authorization": authorization},
            )
            held = ((r.json().get("data") or {}).get("ledger") or {}).get("size", 0)
            if held >= size:
                return
            if time.monotonic() > deadline:
                raise Broken(f"the log holds {held} leaves after {timeout:g} s, not {size}")
            await asyncio.sleep(0.05)


async def write(
    url: str, headers: dict[str, str], events: int, writers: int, rate: float | None
) -> Writes:
    """`events` issuePrescription mutations by `writers` concurrent writers, each with its own
    keep-alive connection; paced at `rate` per second in total when given."""
    result = Writes()
    counter = itertools.count()
    one = httpx.Limits(max_connections=1, max_keepalive_connections=1)

    async def writer(http: httpx.AsyncClient) -> None:
        while (n := next(counter)) < events:
            if rate is not None:
                await asyncio.sleep(max(0.0, result.started + n / rate - time.time()))
            body = {"query": ISSUE, "variables": {"input": prescription_input(n)}}
            t0 = time.time()
            try:
                r = await http.post(url, json=body, headers=headers)
            except httpx.HTTPError as exc:
                result.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            t1 = time.time()
            answer = r.json() if r.status_code == 200 else {}
            issued = (answer.get("data") or {}).get("issuePrescription") or {}
            if issued.get("__typename") != "Prescription":
                result.errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                continue
            result.acked[issued["id"]] = t1
            result.latencies.append(t1 - t0)

    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(limits=one, timeout=300))
            for _ in range(writers)
        ]
        result.started = time.time()
        await asyncio.gather(*(writer(http) for http in clients))
        result.finished = time.time()
    return result


@dataclass
class Delivery:
    subscribers: int
    workload: Workload
    writes: Writes
    deliveries: int = 0
    seconds: float = 0.0  # from the first write to the last receipt
    from_ack: list[float] = field(default_factory=list)
    from_at: list[float] = field(default_factory=list)
    missing: int = 0
    duplicates: int = 0
    unexpected: int = 0
    out_of_order: int = 0
    ended: int = 0
    complete: int = 0
    samples: list[str] = field(default_factory=list)
    gateway_cpu: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float = 0.0

    @property
    def violations(self) -> int:
        return self.missing + self.duplicates + self.unexpected + self.out_of_order + self.ended

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class Workload:
    events: int
    writers: int
    rate: float | None  # mutations per second in total; None: as fast as they are answered

    def __str__(self) -> str:
        pace = "closed loop" if self.rate is None else f"paced {self.rate:.2g}/s"
        return f"{pace}, {self.events} by {self.writers} writers"


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (k < total % parts) for k in range(parts)]


@dataclass
class Bench:
    """What every phase needs: the gateway, the client processes and the tokens."""

    pool: ClientPool
    gateway: Gateway
    headers: dict[str, str]  # the writers': a prescriber's bearer token
    reader_token: str  # the subscribers': an admin's, who sees every event
    compression: bool
    timeout: float
    server_pid: int | None
    probes: set[str] = field(default_factory=set)  # prescription ids written as probes

    @property
    def graphql_url(self) -> str:
        return f"{self.gateway.base}/graphql"

    async def connect(self, sockets: int) -> float:
        """Open `sockets` sockets (connection_init only), spread over the client processes;
        returns the seconds it took."""
        started = time.monotonic()
        url = self.gateway.base.replace("http://", "ws://") + "/graphql"
        counts = split(sockets, len(self.pool.conns))
        commands = [
            ("connect", url, self.reader_token, n, self.compression) if n else None for n in counts
        ]
        replies = await self.pool.ask(commands)
        connected = sum(r["connected"] for r in replies)
        if connected < sockets:
            failures = [f for r in replies for f in r["failures"]]
            raise Broken(f"only {connected} of {sockets} sockets connected, e.g. {failures[:3]}")
        return time.monotonic() - started

    async def subscribe(self, timeout: float) -> float:
        """Subscribe every open socket, then write a probe event until every socket received
        one: only then is every subscription known to be live. Returns the seconds it took."""
        started = time.monotonic()
        await self.pool.ask_all("subscribe")
        while True:
            # A subscription starts at the leaf after the newest when the server runs it, so
            # an early probe may beat a late subscriber: probe again until all have one.
            probe = await write(self.graphql_url, self.headers, 1, 1, None)
            if probe.errors:
                raise Broken(f"probe mutation failed: {probe.errors[0]}")
            self.probes.update(probe.acked)
            if all(await self.pool.ask_all("wait_for", 1, 2.0)):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise Broken(f"not every socket received an event within {timeout:.0f} s")

    async def close(self) -> None:
        await self.pool.ask_all("close")

    async def deliver(self, subscribers: int, workload: Workload) -> Delivery:
        """Run the write workload against the subscribed sockets; check and time what they
        received."""
        await self.pool.ask_all("mark")
        pids = self.pool.pids
        gateway0, clients0 = cpu_seconds(self.gateway.pid), sum(map(cpu_seconds, pids))
        server0 = cpu_seconds(self.server_pid) if self.server_pid else 0.0
        writes = await write(
            self.graphql_url, self.headers, workload.events, workload.writers, workload.rate
        )
        progress(
            f"  {len(writes.acked)} mutations answered in "
            f"{writes.finished - writes.started:.1f} s; waiting for deliveries ..."
        )
        reports = await self.pool.ask_all("evaluate", writes.acked, self.probes, self.timeout)
        reports = [r for r in reports if r["subscribers"]]
        d = Delivery(subscribers, workload, writes)
        d.gateway_cpu = cpu_seconds(self.gateway.pid) - gateway0
        d.client_cpu = sum(map(cpu_seconds, pids)) - clients0
        d.server_cpu = (cpu_seconds(self.server_pid) if self.server_pid else 0.0) - server0
        for r in reports:
            for name in ("deliveries", "missing", "duplicates", "unexpected", "out_of_order"):
                setattr(d, name, getattr(d, name) + r[name])
            d.ended += r["ended"]
            d.complete += r["complete"]
            d.samples += r["samples"]
            d.from_ack += array.array("d", r["from_ack"]).tolist()
            d.from_at += array.array("d", r["from_at"]).tolist()
        last = max((r["last"] for r in reports), default=writes.finished)
        d.seconds = max(last, writes.finished) - writes.started
        return d


async def settled_rss(pid: int, settle: float, samples: int = 5, gap: float = 0.5) -> float:
    """The process's RSS in KiB once it has settled: the median of a few samples."""
    await asyncio.sleep(settle)
    values = []
    for _ in range(samples):
        values.append(rss_kib(pid))
        await asyncio.sleep(gap)
    return float(statistics.median(values))


@dataclass
class Memory:
    sockets: int
    before: float = 0.0  # gateway RSS in KiB
    bare: float = 0.0
    subscribed: float = 0.0
    connect_seconds: float = 0.0
    subscribe_seconds: float = 0.0

    def per_socket(self, after: float, before: float) -> float:
        return (after - before) / self.sockets


# --- the report -------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}"


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 and math.isfinite(a / b) else "n/a"


COLUMNS: list[tuple[str, int, Callable[[Delivery], float], Callable[[float], str]]] = [
    ("writes/s", 9, lambda d: d.writes.rate, lambda v: f"{v:.1f}"),
    ("deliveries", 10, lambda d: d.deliveries, lambda v: f"{v:,.0f}"),
    ("deliv/s", 8, lambda d: d.rate, lambda v: f"{v:,.0f}" if v >= 10 else f"{v:.2f}"),
    ("per sub/s", 9, lambda d: d.rate / d.subscribers, lambda v: f"{v:.2f}"),
    ("ack>recv p50", 12, lambda d: pct(d.from_ack, 0.5), ms),
    ("p99", 7, lambda d: pct(d.from_ack, 0.99), ms),
    ("at>recv p50", 11, lambda d: pct(d.from_at, 0.5), ms),
    ("p99", 7, lambda d: pct(d.from_at, 0.99), ms),
    ("mutation p50", 12, lambda d: pct(d.writes.latencies, 0.5), ms),
    ("p99", 7, lambda d: pct(d.writes.latencies, 0.99), ms),
]


def delivery_rows(one: Delivery, many: Delivery) -> list[str]:
    label = str(many.workload)
    rows = []
    for d in (one, many):
        cells = " ".join(f"{fmt(value(d)):>{width}}" for _, width, value, fmt in COLUMNS)
        rows.append(f"  {label:31} {d.subscribers:>6,} {cells}")
        label = ""
    cells = " ".join(f"{ratio(value(many), value(one)):>{width}}" for _, width, value, _ in COLUMNS)
    rows.append(f"  {'':31} {f'{many.subscribers:,}:1':>6} {cells}")
    return rows


def report(environment: list[str], pairs: list[tuple[Delivery, Delivery]], memory: Memory) -> None:
    n = memory.sockets
    bare = memory.per_socket(memory.bare, memory.before)
    subscribed = memory.per_socket(memory.subscribed, memory.before)
    own = memory.per_socket(memory.subscribed, memory.bare)
    print()
    print(f"Subscription benchmark: {n:,} graphql-transport-ws subscribers on one gateway process")
    for line in environment:
        print(f"  {line}")

    print()
    print("Memory: gateway RSS (/proc VmRSS), median of 5 samples once settled")
    print(f"  {'':42} {'RSS MiB':>8} {'KiB/socket':>11}  target")
    print(f"  {'before any socket':42} {memory.before / 1024:8.1f}")
    print(
        f"  {f'{n:,} bare sockets, connection_init only':42} {memory.bare / 1024:8.1f} "
        f"{bare:11.1f}  (baseline)"
    )
    print(
        f"  {f'{n:,} idle subscribers, the same sockets':42} {memory.subscribed / 1024:8.1f} "
        f"{subscribed:11.1f}  <= {MEMORY_TARGET_KIB:.0f} KiB: {met(subscribed <= MEMORY_TARGET_KIB)}"
    )
    print(
        f"  {'the subscription itself (difference)':42} {'':8} {own:11.1f}  "
        f"(subscriber / bare socket: {ratio(subscribed, bare)})"
    )
    print(
        f"  {n:,} sockets connected in {memory.connect_seconds:.1f} s; all subscriptions live "
        f"(a probe event received) {memory.subscribe_seconds:.1f} s after subscribing"
    )

    print()
    print(
        "Delivery: issuePrescription mutations (one event each) by concurrent writers; "
        "subscribers select prescriptionId version leafIndex at."
    )
    print(
        "  latency ms: ack>recv = subscriber's receipt - the writer's answer; at>recv = "
        "receipt - the event's `at`"
    )
    head = " ".join(f"{name:>{width}}" for name, width, _, _ in COLUMNS)
    print(f"  {'workload':31} {'subs':>6} {head}")
    for one, many in pairs:
        for row in delivery_rows(one, many):
            print(row)
    for _, many in pairs:
        p99 = pct(many.from_ack, 0.99) * 1000
        print(
            f"  delivery p99 at {many.subscribers:,} subscribers, {many.workload}: "
            f"{p99:,.0f} ms; target <= {P99_TARGET_MS:.0f} ms: {met(p99 <= P99_TARGET_MS)}"
        )

    print()
    print("CPU seconds during each phase (first write to last receipt)")
    print(
        f"  {'workload':31} {'subs':>6} {'seconds':>8} {'gateway':>8} {'of a core':>9} "
        f"{'us/delivery':>11} {'clients':>8} {'database':>8}"
    )
    for pair in pairs:
        for d in pair:
            print(
                f"  {str(d.workload):31} {d.subscribers:>6,} {d.seconds:8.1f} "
                f"{d.gateway_cpu:8.1f} {d.gateway_cpu / d.seconds:9.0%} "
                f"{d.gateway_cpu / max(1, d.deliveries) * 1e6:11,.0f} {d.client_cpu:8.1f} "
                f"{d.server_cpu:8.1f}"
            )
    print("  (gateway us/delivery includes its share of the mutations)")

    print()
    for d in [d for pair in pairs for d in pair]:
        what = f"{d.subscribers:,} subscriber(s), {d.workload}"
        if d.violations == 0:
            print(
                f"Completeness, {what}: each received all {len(d.writes.acked):,} events "
                f"exactly once, in leafIndex order ({d.deliveries:,} deliveries checked)"
            )
        else:
            print(
                f"COMPLETENESS VIOLATED, {what} (the figures are invalid): {d.complete:,} "
                f"complete; {d.missing:,} missing, {d.duplicates:,} repeated, "
                f"{d.unexpected:,} unexpected, {d.out_of_order:,} out of order, "
                f"{d.ended:,} sockets ended or errored"
            )
            for sample in d.samples[:5]:
                print(f"    {sample}")
        if d.writes.errors:
            print(
                f"MUTATIONS FAILED, {what}: {len(d.writes.errors)}, e.g. {d.writes.errors[0][:300]}"
            )


# --- the run ---------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--subscribers", type=int, default=1000, help="concurrent subscribers (default %(default)s)"
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=4,
        help="client processes holding the sockets (default %(default)s)",
    )
    parser.add_argument(
        "--writers", type=int, default=16, help="concurrent writers (default %(default)s)"
    )
    parser.add_argument(
        "--events",
        type=int,
        default=60,
        help="mutations in the closed-loop phases, each one event (default %(default)s)",
    )
    parser.add_argument(
        "--paced-seconds",
        type=float,
        default=20.0,
        help="length of the paced phases; 0 skips them (default %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="mutations per second in the paced phases (default: half the rate at which the "
        "closed-loop phase delivered events to each subscriber)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds to wait before sampling the gateway's RSS (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds to wait for all deliveries after the last write (default %(default)s)",
    )
    parser.add_argument(
        "--no-compression",
        action="store_true",
        help="do not offer permessage-deflate (browsers and the websockets client offer it)",
    )
    parser.add_argument(
        "--keep-logs", type=Path, metavar="DIR", help="copy the gateway's log to DIR"
    )
    args = parser.parse_args()
    if min(args.subscribers, args.clients, args.writers, args.events) < 1:
        parser.error("--subscribers, --clients, --writers and --events must be >= 1")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be > 0")
    if args.paced_seconds < 0:
        parser.error("--paced-seconds must be >= 0")
    args.clients = min(args.clients, args.subscribers)
    return args


async def phases(
    args: argparse.Namespace, bench: Bench
) -> tuple[list[tuple[Delivery, Delivery]], Memory]:
    """Every phase, in an order that keeps the memory figures clean: the 1-subscriber
    baseline first (it also warms the subscription path), then the sockets for the memory
    figures, which stay open for the delivery phases."""
    n = args.subscribers
    closed = Workload(args.events, args.writers, None)
    progress(f"delivery baseline: 1 subscriber, {closed} ...")
    await bench.connect(1)
    await bench.subscribe(30)
    one = await bench.deliver(1, closed)
    await bench.close()

    memory = Memory(sockets=n)
    progress("memory: gateway RSS before any socket ...")
    memory.before = await settled_rss(bench.gateway.pid, args.settle)
    progress(f"memory: opening {n} bare sockets in {len(bench.pool.conns)} client processes ...")
    memory.connect_seconds = await bench.connect(n)
    memory.bare = await settled_rss(bench.gateway.pid, args.settle)
    progress(f"memory: subscribing all {n} sockets ...")
    memory.subscribe_seconds = await bench.subscribe(60)
    memory.subscribed = await settled_rss(bench.gateway.pid, args.settle)

    progress(f"delivery: {n} subscribers, {closed} ...")
    many = await bench.deliver(n, closed)
    pairs = [(one, many)]
    if args.paced_seconds > 0:
        rate = args.rate or max(0.05, 0.5 * many.rate / n)
        paced = Workload(max(3, round(rate * args.paced_seconds)), args.writers, rate)
        progress(f"delivery: {n} subscribers, {paced} ...")
        paced_many = await bench.deliver(n, paced)
        await bench.close()
        progress(f"delivery baseline: 1 subscriber, {paced} ...")
        await bench.connect(1)
        await bench.subscribe(30)
        paced_one = await bench.deliver(1, paced)
        pairs.append((paced_one, paced_many))
    await bench.close()
    return pairs, memory


async def run(
    args: argparse.Namespace,
    pool: ClientPool,
    tmp: Path,
    uri: str,
    server: str,
    server_pid: int | None,
) -> int:
    database = f"bench_subs_{uuid.uuid4().hex[:8]}"
    gateway = start_gateway(gateway_env(uri, database, tmp / "var"), tmp / "gateway.log")
    try:
        await asyncio.to_thread(wait_until_ready, gateway)
        progress(f"gateway (pid {gateway.pid}) on {gateway.base}, database {database}")
        os.environ.pop("RXLEDGER_JWT_DEV_SECRET", None)  # the gateway's file under var/
        secret = load_dev_secret(tmp / "var")
        writer = mint_token(
            role=Role.PRESCRIBER, subject=PRESCRIBER, organization=DEPARTMENT, secret=secret
        )
        reader = mint_token(role=Role.ADMIN, subject="bench", secret=secret)
        bench = Bench(
            pool,
            gateway,
            {"authorization": f"Bearer {writer}"},
            f"Bearer {reader}",
            not args.no_compression,
            args.timeout,
            server_pid,
        )
        load0 = os.getloadavg()[0]
        progress("warming up the gateway ...")
        warm = await write(bench.graphql_url, bench.headers, 50, args.writers, None)
        if warm.errors:
            raise Broken(f"warm-up mutation failed: {warm.errors[0]}")
        # A subscriber subscribes from the log's end: a warm-up event sequenced after that
        # would reach it as one it did not expect.
        await sequenced(bench.graphql_url, f"Bearer {reader}", len(warm.acked), args.timeout)
        pairs, memory = await phases(args, bench)
        load1 = os.getloadavg()[0]

        per_process = "/".join(map(str, sorted(set(split(args.subscribers, len(pool.conns))))))
        environment = [
            f"database: {server}",
            f"gateway: one uvicorn {uvicorn.__version__} process (app.cli serve: h11, "
            "websockets-sansio, asyncio loop), rate limit off",
            f"clients: {len(pool.conns)} processes x {per_process} sockets (websockets "
            f"{websockets_version}, permessage-deflate "
            f"{'offered' if bench.compression else 'off'}); writers: {args.writers} in the "
            "parent process (httpx, one connection each)",
            f"machine: {os.cpu_count()} cores shared by the database, the gateway, the client "
            f"processes, the writers and whatever else runs; load average {load0:.1f} -> "
            f"{load1:.1f}; Python {platform.python_version()}",
        ]
        report(environment, pairs, memory)
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(gateway.log_path, args.keep_logs / "gateway.log")
        broken = any(d.violations or d.writes.errors for pair in pairs for d in pair)
        return 1 if broken else 0
    finally:
        gateway.stop()
        if server_pid is None:  # MONGODB_URI's server: ours to clean, not to stop
            with contextlib.suppress(Exception):
                await drop_databases(uri, [database])


def main() -> int:
    args = parse_args()
    limit = raise_open_file_limit()  # before the gateway and the client processes start
    if limit < args.subscribers + 256:
        progress(f"warning: open-file limit {limit} may be too low for {args.subscribers} sockets")
    # Forked first, while this process has no threads, event loop or database client.
    pool = ClientPool(args.clients)
    tmp = Path(tempfile.mkdtemp(prefix="rxbench-subs-"))
    ferret = None
    try:
        with terminated_by_sigterm():
            try:
                uri, ferret = start_database(tmp)
                if ferret is None:
                    server = f"MONGODB_URI {redacted_uri(uri)}"
                else:
                    server = f"FerretDB (SQLite handler), started for this run at {uri}"
                progress(f"database: {server}")
                server_pid = None if ferret is None else ferret.pid
                return asyncio.run(run(args, pool, tmp, uri, server, server_pid))
            except Broken as exc:
                print(f"benchmark broken: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                progress("interrupted; stopping the gateway, the clients and the database")
                return 130
    finally:
        pool.stop()
        if ferret is not None:
            ferret.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
