"""GraphQL benchmark: the gateway against the baseline a team would otherwise write.

Both run as real uvicorn processes on the same database server, each on its own database: the
gateway (`python -m app.cli serve`: ledger, sequencer, anchorer, JWT auth, proofs) and the
baseline (bench/baseline_app.py: plain strawberry + pymongo CRUD, no ledger, no auth). Runs
against MONGODB_URI, or starts its own FerretDB in a temporary directory.

Workloads, each with CLIENTS concurrent clients (asyncio + httpx, one process):

  issuePrescription      ISSUE_COUNT new prescriptions after one per client as warm-up (a
                         count, so both sides hold the same data)
  dispensePrescription   the issued prescriptions, each once, as the pharmacy's pharmacist
  prescription(id)       the gateway with history, inclusion proofs and integrity, once a
                         checkpoint covers every event; the baseline with the plain fields
                         (--reference: also the gateway with the plain fields)

The last two run for a warm-up (at least WARMUP seconds, and until every client had an
answer), then DURATION seconds (or COUNT operations). Every answer is checked and a sample of
proofs is verified offline. Prints rates, p50/p99 latency, ratios gateway/baseline against
the targets and CPU per operation of each process. Not a test: slow figures never fail the
run. Exit 1 when a request failed (the figures are then invalid), 2 when a server did not
start or no checkpoint came.

    .venv/bin/python bench/graphql.py [--issue-count 300] [--duration 8] [--clients 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from pymongo import AsyncMongoClient

ROOT = Path(__file__).resolve().parent.parent
# This file shares its name with graphql-core: keep its directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from anchoring.encoding import unb64  # noqa: E402
from anchoring.hashing import leaf_hash  # noqa: E402
from anchoring.note import open_checkpoint, parse_verifier_key  # noqa: E402
from anchoring.verify import VerificationError, verify_inclusion  # noqa: E402
from app.auth import Role, load_dev_secret, mint_token  # noqa: E402
from bench.processes import (  # noqa: E402
    UNCOMPRESSED,
    Broken,
    copy_logs,
    cpu_seconds,
    describe_server,
    drop_databases,
    gateway_env,
    log_tail,
    pct,
    progress,
    start_database,
    start_server,
    stop_process,
    terminated_by_sigterm,
)

PHARMACY = "pharmacy-bench"
PRESCRIBER = "dr-bench"
DEPARTMENT = "cardiology"
MUTATION_TARGET = 0.6  # gateway/baseline mutations per second
QUERY_TARGET = 0.8  # gateway (with proofs) / baseline queries per second
P99_TARGET_MS = 50.0  # gateway query p99
VERIFY_SAMPLE = 5  # prescriptions whose proofs are verified offline after the run

ISSUE = """mutation Issue($input: IssuePrescriptionInput!) {
  issuePrescription(input: $input) { __typename ... on Prescription { id version } } }"""
DISPENSE = """mutation Dispense($id: ID!, $version: Int!) {
  dispensePrescription(id: $id, expectedVersion: $version) {
    __typename ... on Prescription { id version } } }"""
PROOF_QUERY = """query Prescription($id: ID!) { prescription(id: $id) {
  id status version patient { name } medications { name }
  history { type leafIndex proof { leafIndex treeSize path checkpoint { note } } }
  integrity { status proof { path } } } }"""
PLAIN_QUERY = """query Prescription($id: ID!) { prescription(id: $id) {
  id status version patient { name } medications { name } } }"""
LEDGER = "{ ledger { size checkpoint { size } } }"
VERIFY_QUERY = """query Verify($id: ID!) { ledger { origin verifierKey }
  prescription(id: $id) { history { leaf leafIndex
    proof { leafIndex treeSize leafHash path checkpoint { note } } } } }"""


# --- processes --------------------------------------------------------------------------------


@dataclass
class App:
    """One uvicorn process under test and how the benchmark talks to it."""

    name: str
    process: subprocess.Popen[bytes]
    base: str
    log_path: Path
    issue_headers: dict[str, str] = field(default_factory=dict)
    dispense_headers: dict[str, str] = field(default_factory=dict)
    extra_input: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.base}/graphql"

    def log_tail(self, lines: int = 8) -> str:
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        stop_process(self.process)


def start_app(name: str, cmd: list[str], env: dict[str, str], tmp: Path) -> App:
    """Start `cmd` on a free port, its output in `tmp`/NAME.log; Ctrl-C reaches it too."""
    log_path = tmp / f"{name}.log"
    process, base = start_server(cmd, env, log_path, own_session=False)
    return App(name, process, base, log_path)


def wait_until_up(
    app: App, path: str, ready: Callable[[httpx.Response], bool], timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError, ValueError):
            if ready(httpx.get(app.base + path, timeout=2)):
                return
        if app.process.poll() is not None or time.monotonic() > deadline:
            raise Broken(f"the {app.name} did not start; last lines of its log:\n{app.log_tail()}")
        time.sleep(0.2)


# --- measuring --------------------------------------------------------------------------------

# An operation posts one request and returns what was wrong with the answer, or None.
Operation = Callable[[httpx.AsyncClient], Awaitable[str | None]]


@dataclass
class Measurement:
    workload: str
    app: str
    ops: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    samples: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds in the window

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else float("nan")

    def latency_ms(self, q: float) -> float:
        return pct(self.latencies, q) * 1000

    def busy(self, process: str) -> float:
        """Share of one core the process used during the window."""
        return self.cpu.get(process, 0.0) / self.seconds if self.seconds > 0 else float("nan")

    def cpu_ms_per_op(self, process: str) -> float:
        return self.cpu.get(process, 0.0) / self.ops * 1000 if self.ops else float("nan")


@dataclass(frozen=True)
class Plan:
    clients: int
    warmup: float
    duration: float
    count: int | None
    timeout: float
    issue_count: int
    reference: bool

    def describe(self) -> str:
        if self.count is not None:
            return f"one warm-up operation per client, then {self.count:,} operations"
        return f"{self.warmup:g} s warm-up (and until every client had an answer), then {self.duration:g} s"


async def measure(
    connections: list[httpx.AsyncClient],
    workload: str,
    app: App,
    next_operation: Callable[[], Operation | None],
    plan: Plan,
    pids: dict[str, int],
) -> Measurement:
    """Run one client per connection until the window closes or `next_operation` runs dry.

    The window opens once every client has had an answer (so all of them are in their steady
    state; by duration, also not before the warm-up's end). By duration it closes after
    `duration` seconds and only completions inside it count; by count exactly `count`
    operations follow the first answer of each client. Every answer is checked."""
    m = Measurement(workload, app.name)
    warm = time.perf_counter() + (plan.warmup if plan.count is None else 0.0)
    budget = None if plan.count is None else len(connections) + plan.count
    window_start = window_end = float("inf")
    opened, closed = asyncio.Event(), asyncio.Event()
    cpu_at_start: dict[str, float] = {}
    answers = 0
    last_completion = 0.0

    def cpu_now() -> dict[str, float]:
        return {"client": time.process_time()} | {p: cpu_seconds(pid) for p, pid in pids.items()}

    def open_window(at: float) -> None:
        nonlocal window_start, window_end
        window_start = at
        if plan.count is None:
            window_end = at + plan.duration
        cpu_at_start.update(cpu_now())
        opened.set()

    def close(at: float) -> None:
        if closed.is_set():
            return
        closed.set()
        if opened.is_set():
            m.seconds = at - window_start
            m.cpu = {p: t - cpu_at_start[p] for p, t in cpu_now().items()}

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal answers, last_completion, budget
        while not closed.is_set():
            if budget is not None:
                if budget == 0:
                    return
                budget -= 1
            operation = next_operation()
            if operation is None:
                return
            t0 = time.perf_counter()
            try:
                problem = await operation(http)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            t1 = time.perf_counter()
            answers += 1
            if problem is not None:
                m.errors += 1
                if len(m.samples) < 5:
                    m.samples.append(problem)
            if not opened.is_set():
                if t1 >= warm and answers >= len(connections):
                    open_window(t1)
                continue
            if closed.is_set():
                continue
            if t1 > window_end:
                close(window_end)
                continue
            m.ops += 1
            m.latencies.append(t1 - t0)
            last_completion = t1

    async def timer() -> None:
        await opened.wait()
        if plan.count is None:
            await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
            close(window_end)

    timing = asyncio.create_task(timer())
    await asyncio.gather(*(client(http) for http in connections))
    close(max(last_completion, window_start))  # ran dry before the window closed
    timing.cancel()
    m.requests = answers
    return m


async def graphql(
    http: httpx.AsyncClient,
    url: str,
    query: str,
    variables: dict[str, Any],
    headers: dict[str, str],
) -> tuple[dict[str, Any] | None, str | None]:
    """The data of a GraphQL answer, or what was wrong with it."""
    r = await http.post(url, json={"query": query, "variables": variables}, headers=headers)
    if r.status_code != 200:
        return None, f"HTTP {r.status_code}: {r.text[:200]}"
    body = r.json()
    if body.get("errors"):
        return None, f"GraphQL error: {body['errors'][0].get('message')}"
    return body["data"], None


def prescription_input(n: int, extra: dict[str, str]) -> dict[str, Any]:
    return {
        "patient": {"id": f"pt-{n:06d}", "name": f"Patient {n}"},
        "medications": [
            {
                "code": "C09AA05",
                "name": "Ramipril",
                "dose": "5 mg",
                "quantity": 28,
                "instructions": "once daily",
            },
            {"code": "C10AA05", "name": "Atorvastatin", "dose": "20 mg", "quantity": 28},
        ],
        "pharmacy": PHARMACY,
        "department": DEPARTMENT,
        "notes": "benchmark",
        **extra,
    }


def issuing(app: App, issued: deque[str]) -> Callable[[], Operation]:
    counter = itertools.count()

    def next_operation() -> Operation:
        variables = {"input": prescription_input(next(counter), app.extra_input)}

        async def issue(http: httpx.AsyncClient) -> str | None:
            data, problem = await graphql(http, app.url, ISSUE, variables, app.issue_headers)
            if problem is not None or data is None:
                return problem
            result = data["issuePrescription"]
            if result["__typename"] != "Prescription" or result["version"] != 1:
                return f"issuePrescription answered {result}"
            issued.append(result["id"])
            return None

        return issue

    return next_operation


def dispensing(app: App, issued: deque[str]) -> Callable[[], Operation | None]:
    def next_operation() -> Operation | None:
        if not issued:
            return None
        rid = issued.popleft()

        async def dispense(http: httpx.AsyncClient) -> str | None:
            variables = {"id": rid, "version": 1}
            data, problem = await graphql(http, app.url, DISPENSE, variables, app.dispense_headers)
            if problem is not None or data is None:
                return problem
            result = data["dispensePrescription"]
            if result["__typename"] != "Prescription" or result["version"] != 2:
                return f"dispensePrescription {rid} answered {result}"
            return None

        return dispense

    return next_operation


def check_proofs(p: dict[str, Any]) -> str | None:
    """What is missing from a gateway answer read after a checkpoint covered every event."""
    if p["integrity"]["status"] != "VERIFIED" or p["integrity"]["proof"] is None:
        return f"prescription {p['id']}: integrity {p['integrity']['status']}, want VERIFIED"
    if len(p["history"]) != p["version"]:
        return f"prescription {p['id']}: {len(p['history'])} events for version {p['version']}"
    if any(e["proof"] is None or e["leafIndex"] is None for e in p["history"]):
        return f"prescription {p['id']}: an event without an inclusion proof"
    return None


def querying(
    app: App, query: str, ids: list[str], headers: dict[str, str], seed: int
) -> Callable[[], Operation]:
    rng = random.Random(seed)
    with_proofs = query is PROOF_QUERY

    def next_operation() -> Operation:
        rid = rng.choice(ids)

        async def read(http: httpx.AsyncClient) -> str | None:
            data, problem = await graphql(http, app.url, query, {"id": rid}, headers)
            if problem is not None or data is None:
                return problem
            p = data["prescription"]
            if p is None or p["id"] != rid:
                return f"prescription({rid}) answered {p}"
            return check_proofs(p) if with_proofs else None

        return read

    return next_operation


async def wait_for_checkpoint(http: httpx.AsyncClient, app: App, events: int) -> float:
    """Seconds until the gateway's latest checkpoint covers `events` events."""
    started = time.perf_counter()
    while time.perf_counter() - started < 120:
        data, problem = await graphql(http, app.url, LEDGER, {}, {})
        if problem is not None or data is None:
            raise Broken(f"ledger query failed: {problem}")
        ledger = data["ledger"]
        cp = ledger["checkpoint"]
        if ledger["size"] >= events and cp is not None and cp["size"] == ledger["size"]:
            return time.perf_counter() - started
        await asyncio.sleep(0.1)
    raise Broken(f"no checkpoint covered {events} events within 120 s")


async def verify_offline(
    http: httpx.AsyncClient, app: App, ids: list[str], headers: dict[str, str]
) -> tuple[int, list[str]]:
    """Verify the inclusion proofs of a few prescriptions' events against their signed
    checkpoints, as an auditor would. Returns events verified and problems found."""
    verified, problems = 0, []
    for rid in ids:
        data, problem = await graphql(http, app.url, VERIFY_QUERY, {"id": rid}, headers)
        if problem is not None or data is None:
            problems.append(f"verify {rid}: {problem}")
            continue
        verifier = parse_verifier_key(data["ledger"]["verifierKey"])
        for event in data["prescription"]["history"]:
            proof = event["proof"]
            try:
                cp = open_checkpoint(
                    proof["checkpoint"]["note"], [verifier], data["ledger"]["origin"]
                )
                digest = leaf_hash(unb64(event["leaf"]))
                if digest != unb64(proof["leafHash"]) or cp.size != proof["treeSize"]:
                    raise VerificationError("mismatch", "leaf hash or tree size differs")
                path = [unb64(h) for h in proof["path"]]
                verify_inclusion(proof["leafIndex"], cp.size, digest, path, cp.root_hash)
                verified += 1
            except (VerificationError, ValueError, TypeError) as exc:
                problems.append(f"verify {rid} leaf {event['leafIndex']}: {exc}")
    return verified, problems


# --- the run ---------------------------------------------------------------------------------


ISSUE_W, DISPENSE_W = "issuePrescription", "dispensePrescription"
QUERY_W, PLAIN_W = "prescription(id)", "prescription(id) plain"
IDLE_PROCESSES = ("gateway", "baseline", "server")


@dataclass
class Round:
    runs: dict[tuple[str, str], Measurement] = field(default_factory=dict)  # (workload, app)
    checkpoint_wait: float = 0.0
    idle: dict[str, float] = field(default_factory=dict)  # process -> share of one core


async def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Share of one core each process uses while no request is made."""
    before = {p: cpu_seconds(pid) for p, pid in pids.items()}
    await asyncio.sleep(seconds)
    return {p: (cpu_seconds(pid) - before[p]) / seconds for p, pid in pids.items()}


async def one_round(
    number: int,
    gateway: App,
    baseline: App,
    plan: Plan,
    pids: dict[str, dict[str, int]],
    pharmacist: dict[str, str],
    verified: list[int],
    problems: list[str],
) -> Round:
    result = Round()
    # Alternate who goes first, so a drift in the machine's load does not favour one side.
    apps = [gateway, baseline] if number % 2 == 0 else [baseline, gateway]
    async with contextlib.AsyncExitStack() as stack:
        # One httpx client per simulated client, each with one keep-alive connection: with a
        # shared pool of 64 connections, httpx spends about 3x the CPU per request
        # (encode/httpx#3215), and the client shares the machine's 2 cores with the servers.
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        tls = httpx.create_ssl_context()  # unused (plain http), but built once, not 128 times
        connections = {
            app.name: [
                await stack.enter_async_context(
                    httpx.AsyncClient(
                        limits=one, timeout=plan.timeout, verify=tls, headers=UNCOMPRESSED
                    )
                )
                for _ in range(plan.clients)
            ]
            for app in apps
        }
        http = connections["gateway"][0]

        async def run(
            workload: str, app: App, next_operation: Callable[[], Any], plan: Plan = plan
        ) -> None:
            progress(f"round {number + 1}: {workload} on the {app.name}: {plan.describe()} ...")
            m = await measure(
                connections[app.name], workload, app, next_operation, plan, pids[app.name]
            )
            result.runs[(workload, app.name)] = m
            busy = ", ".join(f"{p} {shown(m.busy(p), '.0%')}" for p in m.cpu)
            progress(
                f"  {shown(m.rate, ',.1f')}/s ({m.ops:,} in {m.seconds:.1f} s), "
                f"p50 {shown(m.latency_ms(0.5))} ms, p99 {shown(m.latency_ms(0.99))} ms; "
                f"CPU (share of one core): {busy}"
                + (f"; {m.errors} ERRORS, e.g. {m.samples[0][:200]}" if m.errors else "")
            )

        # Issue by count, so both sides hold the same number of prescriptions: on a server
        # that scans, every later operation costs time in proportion to it.
        by_count = replace(plan, count=plan.issue_count)
        issued = {app.name: deque[str]() for app in apps}
        all_ids: dict[str, list[str]] = {}
        for app in apps:
            await run(ISSUE_W, app, issuing(app, issued[app.name]), by_count)
            all_ids[app.name] = list(issued[app.name])
        for app in apps:
            await run(DISPENSE_W, app, dispensing(app, issued[app.name]))

        dispensed = result.runs[(DISPENSE_W, "gateway")]
        events = len(all_ids["gateway"]) + dispensed.requests - dispensed.errors
        progress(f"round {number + 1}: waiting for a checkpoint covering the gateway's events ...")
        result.checkpoint_wait = await wait_for_checkpoint(http, gateway, events)
        progress(f"  covered after {result.checkpoint_wait:.1f} s")

        seed = 1000 + number
        reads = {
            "gateway": querying(gateway, PROOF_QUERY, all_ids["gateway"], pharmacist, seed),
            "baseline": querying(baseline, PLAIN_QUERY, all_ids["baseline"], {}, seed),
        }
        for app in apps:
            await run(QUERY_W, app, reads[app.name])
        if plan.reference:
            plain = querying(gateway, PLAIN_QUERY, all_ids["gateway"], pharmacist, seed)
            await run(PLAIN_W, gateway, plain)

        sample = random.Random(seed).sample(
            all_ids["gateway"], min(VERIFY_SAMPLE, len(all_ids["gateway"]))
        )
        n, found = await verify_offline(http, gateway, sample, pharmacist)
        verified.append(n)
        problems.extend(found)
        progress(f"round {number + 1}: {n} proofs verified offline; measuring idle CPU ...")
        idle = {"gateway": gateway.process.pid, "baseline": baseline.process.pid}
        idle |= {"server": pids["gateway"]["server"]} if "server" in pids["gateway"] else {}
        result.idle = await idle_cpu(idle, 2.0)
    return result


# --- the report ------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # without NaN
    return statistics.median(values) if values else float("nan")


def shown(value: float, spec: str = ",.0f") -> str:
    return "-" if value != value else format(value, spec)


class Report:
    """Medians over the rounds; ratios are medians of each round's gateway/baseline ratio,
    since the two sides of a round ran minutes apart at most."""

    ROW = "{:<40} {:>15} {:>14} {:>6}   {:<17} {}"
    CPU_ROW = "{:<40} {:>7} {:>7} {:>7}    {:>7} {:>7} {:>7}"

    def __init__(self, rounds: list[Round], clients: int) -> None:
        self.rounds = rounds
        self.clients = clients

    def runs(self, workload: str, app: str) -> list[Measurement]:
        return [r.runs[(workload, app)] for r in self.rounds if (workload, app) in r.runs]

    def rate(self, workload: str, app: str) -> float:
        return median([m.rate for m in self.runs(workload, app)])

    def ratio(self, workload: str, baseline_workload: str | None = None) -> float:
        pairs = zip(
            self.runs(workload, "gateway"),
            self.runs(baseline_workload or workload, "baseline"),
            strict=True,
        )
        return median([g.rate / b.rate if b.rate else float("nan") for g, b in pairs])

    def latency(self, workload: str, app: str, q: float) -> float:
        return median([m.latency_ms(q) for m in self.runs(workload, app)])

    def latencies(self, workload: str, app: str) -> str:
        p50, p99 = self.latency(workload, app, 0.5), self.latency(workload, app, 0.99)
        return f"{shown(p50)} / {shown(p99)}"

    def cpu(self, workload: str, app: str, process: str) -> float:
        return median([m.cpu_ms_per_op(process) for m in self.runs(workload, app)])

    def mutation_rate(self, app: str) -> list[float]:
        out = []
        for r in self.rounds:
            issue, dispense = r.runs[(ISSUE_W, app)], r.runs[(DISPENSE_W, app)]
            seconds = issue.seconds + dispense.seconds
            out.append((issue.ops + dispense.ops) / seconds if seconds else float("nan"))
        return out

    def figures(self) -> None:
        row = self.ROW
        print(row.format("workload", "gateway", "baseline", "gw/bl", "target", "result"))
        print("-" * 106)
        for workload in (ISSUE_W, DISPENSE_W):
            r = self.ratio(workload)
            print(
                row.format(
                    f"{workload} /s",
                    shown(self.rate(workload, "gateway")),
                    shown(self.rate(workload, "baseline")),
                    shown(r, ".2f"),
                    f"gw/bl >= {MUTATION_TARGET}",
                    met(r >= MUTATION_TARGET),
                )
            )
            print(
                row.format(
                    "  latency p50 / p99 ms",
                    self.latencies(workload, "gateway"),
                    self.latencies(workload, "baseline"),
                    "",
                    "",
                    "",
                )
            )
        gw, bl = self.mutation_rate("gateway"), self.mutation_rate("baseline")
        r = median([g / b if b else float("nan") for g, b in zip(gw, bl, strict=True)])
        print(
            row.format(
                "mutations, both kinds /s",
                shown(median(gw)),
                shown(median(bl)),
                shown(r, ".2f"),
                f"gw/bl >= {MUTATION_TARGET}",
                met(r >= MUTATION_TARGET),
            )
        )
        r = self.ratio(QUERY_W)
        print(
            row.format(
                f"{QUERY_W} /s (gateway: proofs)",
                shown(self.rate(QUERY_W, "gateway")),
                shown(self.rate(QUERY_W, "baseline")),
                shown(r, ".2f"),
                f"gw/bl >= {QUERY_TARGET}",
                met(r >= QUERY_TARGET),
            )
        )
        p99 = self.latency(QUERY_W, "gateway", 0.99)
        print(
            row.format(
                "  latency p50 / p99 ms",
                self.latencies(QUERY_W, "gateway"),
                self.latencies(QUERY_W, "baseline"),
                "",
                f"gw p99 <= {P99_TARGET_MS:g} ms",
                met(p99 <= P99_TARGET_MS),
            )
        )
        self.reference_rows()
        print(
            "(clients that never pause wait about clients / rate for an answer, Little's law: "
            f"p99 <= {P99_TARGET_MS:g} ms with {self.clients} clients needs more than "
            f"{self.clients / P99_TARGET_MS * 1000:,.0f} queries/s)"
        )

    def reference_rows(self) -> None:
        row = self.ROW
        if not self.runs(PLAIN_W, "gateway"):
            return
        print(
            row.format(
                f"{QUERY_W} /s (gateway: plain fields)",
                shown(self.rate(PLAIN_W, "gateway")),
                shown(self.rate(QUERY_W, "baseline")),
                shown(self.ratio(PLAIN_W, QUERY_W), ".2f"),
                "(reference)",
                "",
            )
        )
        print(
            row.format(
                "  latency p50 / p99 ms",
                self.latencies(PLAIN_W, "gateway"),
                self.latencies(QUERY_W, "baseline"),
                "",
                "",
                "",
            )
        )

    def cpu_per_operation(self) -> None:
        print("CPU per operation, ms (app: the uvicorn process; server: the database server, when")
        print("started here; client: this process)")
        print(self.CPU_ROW.format("", "gw app", "server", "client", "bl app", "server", "client"))
        print("-" * 106)
        processes = ("app", "server", "client")
        for workload, baseline_workload in (
            (ISSUE_W, ISSUE_W),
            (DISPENSE_W, DISPENSE_W),
            (QUERY_W, QUERY_W),
            (PLAIN_W, None),
        ):
            if not self.runs(workload, "gateway"):
                continue
            cells = [shown(self.cpu(workload, "gateway", p), ".2f") for p in processes]
            if baseline_workload is None:
                cells += ["", "", ""]
            else:
                cells += [
                    shown(self.cpu(baseline_workload, "baseline", p), ".2f") for p in processes
                ]
            print(self.CPU_ROW.format(workload, *cells))
        idle = {
            p: median([r.idle.get(p, float("nan")) for r in self.rounds]) for p in IDLE_PROCESSES
        }
        print(
            f"idle after the workloads, share of one core: gateway {shown(idle['gateway'], '.0%')}, "
            f"baseline {shown(idle['baseline'], '.0%')}, server {shown(idle['server'], '.0%')} "
            "(the gateway's sequencer keeps polling; this load is there while the baseline runs)"
        )


def met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def report(
    rounds: list[Round],
    plan: Plan,
    server: str,
    data: str,
    load: tuple[float, float],
    verified: int,
) -> None:
    print()
    print("rxledger GraphQL gateway vs. the baseline (strawberry + pymongo CRUD, no ledger)")
    print(f"server:   {server}")
    print(
        f"machine:  {os.cpu_count()} CPUs shared by client, gateway, baseline and server; "
        f"load average {load[0]:.1f} -> {load[1]:.1f}; Python {platform.python_version()}"
    )
    print(
        f"clients:  {plan.clients} concurrent (asyncio + httpx, one process, one connection "
        f"each); {len(rounds)} round(s), medians shown"
    )
    print(f"          issuePrescription: {replace(plan, count=plan.issue_count).describe()}")
    print(f"          other workloads: {plan.describe()}")
    print(f"data:     {data}")
    print()
    table = Report(rounds, plan.clients)
    table.figures()
    print()
    table.cpu_per_operation()
    waits = ", ".join(f"{r.checkpoint_wait:.1f} s" for r in rounds)
    print(f"checkpoint covering every event, after the mutations ended: {waits}")
    print(f"offline proof check: {verified} inclusion proofs verified against signed checkpoints")


async def data_sizes(uri: str, gateway_db: str, baseline_db: str) -> str:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        uri, serverSelectionTimeoutMS=5000, tz_aware=True
    )
    try:
        gw, bl = client[gateway_db], client[baseline_db]
        prescriptions = await gw["prescriptions"].count_documents({})
        events = await gw["ledger"].count_documents({})
        entries = await gw["entries"].count_documents({})
        baseline = await bl["prescriptions"].count_documents({})
    finally:
        await client.close()
    return (
        f"gateway {prescriptions:,} prescriptions, {events:,} ledger events ({entries:,} "
        f"sequenced); baseline {baseline:,} prescriptions"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--issue-count",
        type=int,
        default=300,
        help="prescriptions each side issues after one warm-up issue per client: a count, so "
        "both hold the same data (default %(default)s)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=8.0,
        help="measured seconds of the other workloads (default %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="least warm-up seconds before a --duration window (default %(default)s)",
    )
    parser.add_argument(
        "--count",
        type=int,
        help="measure this many operations of the other workloads instead of --duration",
    )
    parser.add_argument(
        "--clients", type=int, default=64, help="concurrent clients (default %(default)s)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every workload; medians are shown (default %(default)s)",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also measure the gateway's prescription(id) with the baseline's plain fields",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds a request may take before it counts as an error: slow is a figure, "
        "not a failure (default %(default)s)",
    )
    parser.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="copy the gateway's, the baseline's and FerretDB's logs to DIR",
    )
    args = parser.parse_args()
    if args.clients < 1 or args.rounds < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--clients and --rounds must be >= 1, --duration > 0, --warmup >= 0")
    if (args.count is not None and args.count < 1) or args.issue_count < 1:
        parser.error("--count and --issue-count must be >= 1")
    return args


def start_apps(uri: str, tmp: Path, gateway_db: str, baseline_db: str) -> list[App]:
    """Start the gateway and the baseline; returns them as soon as they are launched (so the
    caller can stop them whatever happens next)."""
    gateway_cmd = [sys.executable, "-m", "app.cli", "serve"]
    gateway = start_app("gateway", gateway_cmd, gateway_env(uri, gateway_db, tmp / "var"), tmp)
    # As a module from ROOT: run as a script, its neighbour bench/graphql.py would shadow
    # graphql-core.
    baseline_cmd = [sys.executable, "-m", "bench.baseline_app"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RXLEDGER_")}
    baseline_env = env | {"MONGODB_URI": uri, "BASELINE_DB": baseline_db}
    baseline = start_app("baseline", baseline_cmd, baseline_env, tmp)
    return [gateway, baseline]


def sign_in(gateway: App, baseline: App, var_dir: Path) -> dict[str, str]:
    """Give the gateway's workloads their tokens (the baseline has no authentication);
    returns the pharmacist's headers, which also read."""
    # The dev secret is the gateway's file under var_dir, whatever our environment says.
    os.environ.pop("RXLEDGER_JWT_DEV_SECRET", None)
    secret = load_dev_secret(var_dir)

    def bearer(role: Role, subject: str, org: str) -> dict[str, str]:
        token = mint_token(role=role, subject=subject, organization=org, secret=secret)
        return {"authorization": f"Bearer {token}"}

    gateway.issue_headers = bearer(Role.PRESCRIBER, PRESCRIBER, DEPARTMENT)
    gateway.dispense_headers = bearer(Role.PHARMACIST, "ph-bench", PHARMACY)
    baseline.extra_input = {"prescriber": PRESCRIBER}
    return gateway.dispense_headers


LOG_LINE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (\S+) (.*)$|^(ERROR|CRITICAL):\s+(.*)$")


def log_summary(app: App) -> str:
    """The gateway's warnings and errors during the run, grouped by kind."""
    kinds: Counter[str] = Counter()
    try:
        lines = app.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    for line in lines:
        found = LOG_LINE.match(line)
        if found is None:
            continue
        level = found.group(1) or found.group(4)
        message = found.group(3) or found.group(5)
        if "development mode:" in message:
            continue  # the dev signing key and token secret it creates, as expected
        message = re.sub(r"rx_[0-9a-f]+", "<id>", message)
        kinds[f"{level} {re.sub(r'[0-9]+', 'N', message)[:90]}"] += 1
    if not kinds:
        return "no warnings or errors"
    return "; ".join(f"{n}x {kind}" for kind, n in kinds.most_common(4))


def print_errors(rounds: list[Round], problems: list[str]) -> bool:
    """Print every failed check; True when there was one."""
    failures = [m for r in rounds for m in r.runs.values() if m.errors]
    if not failures and not problems:
        requests = sum(m.requests for r in rounds for m in r.runs.values())
        print(f"errors:   none ({requests:,} answers checked)")
        return False
    print()
    print("ERRORS: the figures above are invalid")
    for m in failures:
        print(f"  {m.workload} on the {m.app}: {m.errors} of {m.requests} failed, e.g.")
        for sample in dict.fromkeys(m.samples):
            print(f"    {sample[:300]}")
    for problem in problems[:10]:
        print(f"  {problem[:300]}")
    return True


def main() -> int:
    args = parse_args()
    plan = Plan(
        args.clients,
        args.warmup,
        args.duration,
        args.count,
        args.timeout,
        args.issue_count,
        args.reference,
    )
    tmp = Path(tempfile.mkdtemp(prefix="rxbench-graphql-"))
    suffix = uuid.uuid4().hex[:8]
    gateway_db, baseline_db = f"bench_gw_{suffix}", f"bench_base_{suffix}"
    ferret = None
    apps: list[App] = []
    uri = None
    try:
        with terminated_by_sigterm():
            uri, ferret = start_database(tmp)
            server = describe_server(uri, ferret)
            progress(f"server: {server}")
            apps = start_apps(uri, tmp, gateway_db, baseline_db)
            gateway, baseline = apps
            reader = sign_in(gateway, baseline, tmp / "var")
            wait_until_up(
                gateway, "/readyz", lambda r: r.status_code == 200 and r.json()["sequencerLeader"]
            )
            wait_until_up(baseline, "/healthz", lambda r: r.status_code == 200)
            progress(f"gateway on {gateway.base}, baseline on {baseline.base}")
            server_pid = {"server": ferret.pid} if ferret is not None else {}
            pids = {app.name: {"app": app.process.pid, **server_pid} for app in apps}

            load0 = os.getloadavg()[0]
            rounds: list[Round] = []
            verified: list[int] = []
            problems: list[str] = []
            for number in range(args.rounds):
                round_ = one_round(
                    number, gateway, baseline, plan, pids, reader, verified, problems
                )
                rounds.append(asyncio.run(round_))
            load1 = os.getloadavg()[0]
            data = asyncio.run(data_sizes(uri, gateway_db, baseline_db))
            report(rounds, plan, server, data, (load0, load1), sum(verified))
            print(f"gateway log: {log_summary(gateway)}")
            return 1 if print_errors(rounds, problems) else 0
    except Broken as exc:
        print(f"benchmark broken: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopping the servers", file=sys.stderr)
        return 130
    finally:
        for app in apps:
            app.stop()
        if ferret is not None:
            ferret.stop()
        elif uri and apps:
            with contextlib.suppress(Exception):
                asyncio.run(drop_databases(uri, [gateway_db, baseline_db]))
        if args.keep_logs is not None:
            copy_logs(tmp, args.keep_logs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
