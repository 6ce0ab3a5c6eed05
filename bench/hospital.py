"""Hospital-scale benchmark: the gateway against the CRUD baseline as the data grows.

Runs against MONGODB_URI, or starts its own FerretDB in a temporary directory. For each size
in --sizes (ascending; the same two databases grow from one size to the next):

  preload    issue prescriptions until SIZE were preloaded in all, directly through
             app.service.PrescriptionService (not the HTTP API) with the log running in this
             process (its sequencer and anchorer, as in the gateway), PRELOAD_CONCURRENCY issues
             in flight (the ledger's appends and the sequencer batch them); then wait until a
             signed checkpoint covers every event, so every event has a proof. The baseline's
             database gets the same prescriptions (same ids, same fields) by insert_many.
             Prints progress and the preload rate.
  serve      start the gateway (`python -m app.cli serve`) and the baseline
             (bench/baseline_app.py) as uvicorn processes on the same server, and measure,
             with the same client (asyncio + httpx in this process, CLIENTS keep-alive
             connections per side, asking for uncompressed answers: the baseline does not
             compress, and on loopback gzip only costs both sides) and random preloaded ids:
    reads      prescription(id) closed loop for DURATION s after WARMUP: the gateway with
               history, inclusion proofs and integrity (every answer must be VERIFIED with a
               proof per event), the baseline with the plain fields: rate, p50/p99
    open loop  prescription(id) with proofs at a fixed rate, half the baseline's saturated
               read rate just measured (or --open-rate), for DURATION s: requests go out on a
               schedule whatever the answers, over the gateway's CLIENTS connections (a request
               waits for a free one), and latency runs from the scheduled time
    mutations  dispensePrescription on preloaded prescriptions, then issuePrescription, closed
               loop for DURATION s each, both sides (the gateway as the pharmacy's pharmacist and
               the prescriber, with real JWTs; the prescriptions these issue stay in both
               databases, beside the preloaded ones)
             Every baseline workload runs first, then the gateway's (reads, open loop,
             mutations); each starts once the gateway and the server (when started here) are
             idle (less than 0.3 of a core, rarely runnable; at most --timeout seconds). Then
             both stop (the next size's preload needs the sequencer lease).

Targets, each printed met or NOT MET, with the load average (os.getloadavg) of the run:
prescription(id) p50 and p99 at the largest size within 1.5x of the smallest; reads >= 0.8x
the baseline; open-loop p99 <= 50 ms; mutations >= 0.6x the baseline (each kind, and both
together). Lines to parse: `figure: NAME = VALUE`, `ratio: NAME = VALUE`,
`target: NAME: met|NOT MET`. A request unanswered within --timeout seconds counts as timed out
(printed per workload; its latency counts as the timeout, a lower bound; it adds nothing to a
rate), so a run at a size the server cannot serve still ends in bounded time. Not a test: slow
figures never fail the run. Exit 1 when a request failed or an answer was wrong (the figures
are then invalid), 2 when a process did not start or no checkpoint came, 130 on Ctrl-C.

    .venv/bin/python bench/hospital.py [--sizes 1000,100000] [--duration 8] [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pymongo.asynchronous.collection import AsyncCollection

ROOT = Path(__file__).resolve().parent.parent
# bench/graphql.py would shadow graphql-core: keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from anchoring.log import TransparencyLog  # noqa: E402
from anchoring.store import Doc  # noqa: E402
from app import prescriptions as rx  # noqa: E402
from app.auth import Role, Viewer  # noqa: E402
from app.db import make_client, make_log  # noqa: E402
from app.service import PrescriptionService  # noqa: E402
from app.settings import Settings  # noqa: E402
from bench.graphql import (  # noqa: E402
    DEPARTMENT,
    PHARMACY,
    PLAIN_QUERY,
    PRESCRIBER,
    PROOF_QUERY,
    App,
    Measurement,
    Operation,
    Plan,
    check_proofs,
    dispensing,
    graphql,
    issuing,
    log_summary,
    querying,
    shown,
    sign_in,
    start_apps,
    verify_offline,
    wait_until_up,
)
from bench.processes import (  # noqa: E402
    UNCOMPRESSED,
    Broken,
    copy_logs,
    cpu_seconds,
    describe_server,
    drop_databases,
    gateway_env,
    progress,
    start_database,
    terminated_by_sigterm,
)

READ_TARGET = 0.8  # gateway / baseline prescription(id) per second
MUTATION_TARGET = 0.6  # gateway / baseline mutations per second
GROWTH_TARGET = 1.5  # prescription(id) latency at the largest size / at the smallest
OPEN_P99_TARGET_MS = 50.0  # open-loop p99 at half the baseline's saturated rate
QUIET = 0.3  # share of a core the gateway and the server may use for a measurement to start
BASELINE_FIELDS = (
    "status",
    "version",
    "patient",
    "prescriber",
    "department",
    "pharmacy",
    "medications",
    "notes",
    "issuedAt",
    "updatedAt",
    "timestamps",
)


# --- preload ---------------------------------------------------------------------------------


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ replaced by `env` for the duration (Settings reads the environment)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def preload_fields(n: int) -> dict[str, Any]:
    return rx.issue_fields(
        f"pt-{n:07d}",
        f"Patient {n}",
        DEPARTMENT,
        PHARMACY,
        [
            {
                "code": "C09AA05",
                "name": "Ramipril",
                "dose": "5 mg",
                "quantity": 28,
                "instructions": "once daily",
            },
            {"code": "C10AA05", "name": "Atorvastatin", "dose": "20 mg", "quantity": 28},
        ],
        "benchmark",
    )


class PreloadService(PrescriptionService):
    """The prescription service with its document writes batched: `_store` of a new
    prescription queues the document, `flush` inserts the queued ones with one insert_many
    (FerretDB's SQLite handler commits each insert_one on its own). Everything else (the
    event, its leaf, the append through the log's group commit, sequencing, anchoring) is the
    service's own path, and the documents end up as its own inserts would leave them."""

    def __init__(self, log_: TransparencyLog, collection: AsyncCollection[Doc]) -> None:
        super().__init__(log_, collection)
        self.queued: list[Doc] = []

    async def _store(self, doc: Doc, previous_version: int | None) -> None:
        if previous_version is not None or "erased" in doc:
            await super()._store(doc, previous_version)
            return
        self.queued.append(doc)

    async def flush(self) -> None:
        batch, self.queued = self.queued, []
        if batch:
            await self.prescriptions.insert_many(batch, ordered=False)


@dataclass
class Preloaded:
    issued: int = 0
    seconds: float = 0.0  # issuing, all acknowledged
    covered_seconds: float = 0.0  # then until a checkpoint covered every event
    events: int = 0  # the log's size once covered

    @property
    def rate(self) -> float:
        total = self.seconds + self.covered_seconds
        return self.issued / total if total > 0 else float("nan")


async def preload(
    uri: str,
    gateway_db: str,
    baseline_db: str,
    var_dir: Path,
    have: int,
    target: int,
    concurrency: int,
    timeout: float,
) -> tuple[Preloaded, list[str]]:
    """Issue prescriptions through the service until `target` were preloaded (`have` were
    already), with the log (sequencer, anchorer) running here, and copy them into the baseline's
    database; returns the figures and the ids issued."""
    with environment(gateway_env(uri, gateway_db, var_dir)):
        settings = Settings.from_env()
    client = make_client(settings)
    tlog = make_log(settings, client)
    service = PreloadService(tlog, client[gateway_db]["prescriptions"])
    baseline = client[baseline_db]["prescriptions"]
    viewer = Viewer(PRESCRIBER, Role.PRESCRIBER, DEPARTMENT)
    result = Preloaded()
    ids: list[str] = []
    try:
        await service.ensure_indexes()
        numbers = iter(range(have, target))
        copies: list[dict[str, Any]] = []
        await tlog.start()

        async def flush() -> None:
            batch = copies[:]
            copies.clear()
            await service.flush()
            if batch:
                await baseline.insert_many(batch, ordered=False)

        async def issuer() -> None:
            for n in numbers:
                doc = await service.issue(viewer, preload_fields(n), None)
                copies.append({"_id": doc["_id"], **{k: doc[k] for k in BASELINE_FIELDS}})
                ids.append(doc["_id"])
                result.issued += 1
                if len(copies) >= 500:
                    await flush()

        async def report() -> None:
            last, last_at = 0, time.perf_counter()
            while True:
                await asyncio.sleep(5)
                now = time.perf_counter()
                progress(
                    f"  preload: {have + result.issued:,}/{target:,} issued "
                    f"({(result.issued - last) / (now - last_at):,.0f}/s), log sequenced "
                    f"{tlog.sequencer.size:,}"
                )
                last, last_at = result.issued, now

        started = time.perf_counter()
        reporter = asyncio.create_task(report())
        try:
            await asyncio.gather(*(issuer() for _ in range(concurrency)))
            await flush()
            result.seconds = time.perf_counter() - started
            covered = time.perf_counter()
            deadline = covered + timeout
            while True:
                # An event is acknowledged once queued in `pending`, and leaves it once
                # sequenced: with nothing pending, the sequencer's size counts every event (a
                # count of the ledger would decode all of it on FerretDB).
                pending = await tlog.store.pending.find_one({}, {"_id": 1})
                size = tlog.sequencer.size
                cp = await tlog.latest_checkpoint()
                if pending is None and cp is not None and cp.size >= size:
                    break
                if time.perf_counter() > deadline:
                    raise Broken(
                        f"preload: no checkpoint covered every event within {timeout:g} s "
                        f"(sequenced {size:,}, signed {0 if cp is None else cp.size:,})"
                    )
                await asyncio.sleep(0.2)
            result.covered_seconds = time.perf_counter() - covered
            result.events = cp.size
        finally:
            reporter.cancel()
    finally:
        await tlog.stop()
        await client.close()
    return result, ids


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Run(Measurement):
    """A measurement whose requests may time out: a request unanswered within --timeout is
    not an error (the answer is not wrong, only late) but a figure; its latency counts as
    what it was when given up, a lower bound, and it does not count towards the rate."""

    timeouts: int = 0


async def closed_loop(
    connections: list[httpx.AsyncClient],
    workload: str,
    app: App,
    next_operation: Callable[[], Operation | None],
    warmup: float,
    duration: float,
) -> Run:
    """One client per connection, each sending its next request when it has the answer to the
    last. The window opens once every client has had an answer and `warmup` seconds passed;
    requests sent in the window count (their latencies, and the rate: requests counted / from
    the window's start to the last of their answers), so a server slower than the window still
    yields figures, and the run lasts about warm-up + duration + two latencies."""
    m = Run(workload, app.name)
    warm_until = time.perf_counter() + warmup
    answered_once = 0
    window_start = window_end = float("inf")
    last_answer = 0.0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal answered_once, window_start, window_end, last_answer
        first = True
        while time.perf_counter() < window_end:
            operation = next_operation()
            if operation is None:
                return
            counted = time.perf_counter() >= window_start
            t0 = time.perf_counter()
            late = False
            try:
                problem = await operation(http)
            except httpx.TimeoutException:
                problem, late = None, True
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            t1 = time.perf_counter()
            m.requests += 1
            if problem is not None:
                m.errors += 1
                if len(m.samples) < 5:
                    m.samples.append(problem)
            if counted:
                m.latencies.append(t1 - t0)
                last_answer = max(last_answer, t1)
                if late:
                    m.timeouts += 1
                else:
                    m.ops += 1
            if first:
                first = False
                answered_once += 1
            if window_start == float("inf") and answered_once == len(connections):
                window_start = max(t1, warm_until)
                window_end = window_start + duration

    await asyncio.gather(*(client(http) for http in connections))
    if m.latencies:
        m.seconds = max(last_answer, window_end) - window_start
    return m


async def open_loop(
    app: App,
    ids: list[str],
    headers: dict[str, str],
    rate: float,
    seconds: float,
    connections: list[httpx.AsyncClient],
    seed: int,
    patience: float,
) -> Run:
    """prescription(id) with proofs sent at `rate`/s for `seconds`, on a schedule that does not
    wait for answers; each latency runs from the request's scheduled time (so time waiting for
    a free connection counts). Each answer is checked. Requests still unanswered `patience`
    seconds after the last was scheduled are abandoned: like those that time out, they count
    as timeouts, with their latency as it was then (a lower bound)."""
    m = Run("open", app.name)
    rng = random.Random(seed)
    free: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
    for c in connections:
        free.put_nowait(c)
    count = max(1, round(rate * seconds))
    scheduled_at: dict[asyncio.Task[None], float] = {}

    async def one(scheduled: float, rid: str) -> None:
        http = await free.get()
        try:
            data, problem = await graphql(http, app.url, PROOF_QUERY, {"id": rid}, headers)
            if problem is None and data is not None:
                p = data["prescription"]
                problem = (
                    f"prescription({rid}) answered {p}"
                    if p is None or p["id"] != rid
                    else check_proofs(p)
                )
        except httpx.TimeoutException:
            problem = None
            m.timeouts += 1
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        finally:
            free.put_nowait(http)
        m.latencies.append(time.perf_counter() - scheduled)
        m.requests += 1
        if problem is not None:
            m.errors += 1
            if len(m.samples) < 5:
                m.samples.append(problem)

    start = time.perf_counter() + 0.05
    for i in range(count):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(scheduled, rng.choice(ids)))
        scheduled_at[task] = scheduled
    _, pending = await asyncio.wait(scheduled_at, timeout=patience)
    abandoned_at = time.perf_counter()
    for task in pending:
        task.cancel()
        m.latencies.append(abandoned_at - scheduled_at[task])
    await asyncio.gather(*pending, return_exceptions=True)
    m.timeouts += len(pending)
    m.ops = count
    m.seconds = time.perf_counter() - start
    return m


def runnable_threads(pid: int) -> int:
    """How many threads of process `pid` are running or waiting for a core (state R)."""
    count = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/stat") as f:
                count += f.read().rsplit(")", 1)[1].split()[0] == "R"
    return count


async def quiesce(pids: list[int], patience: float) -> float:
    """Wait until the processes `pids` (the gateway and the database server) are idle: over a
    second, they used less than QUIET of a core and had a thread running or waiting for a core
    in at most a fifth of 20 samples (on a machine short of cores a busy process gets little
    CPU time, but stays runnable). So the requests a timed-out client left running on one side
    do not load the next measurement. At most `patience` seconds; returns the wait."""
    started = time.perf_counter()
    while time.perf_counter() - started < patience:
        before = sum(cpu_seconds(pid) for pid in pids)
        runnable = 0
        for _ in range(20):
            runnable += any(runnable_threads(pid) for pid in pids)
            await asyncio.sleep(0.05)
        if sum(cpu_seconds(pid) for pid in pids) - before < QUIET and runnable <= 4:
            break
    return time.perf_counter() - started


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Stage:
    size: int
    preloaded: Preloaded
    runs: dict[tuple[str, str], Run] = field(default_factory=dict)
    open_rate: float = 0.0
    verified: int = 0
    problems: list[str] = field(default_factory=list)
    log: str = ""

    def rate(self, workload: str, app: str) -> float:
        m = self.runs.get((workload, app))
        return m.rate if m is not None else float("nan")

    def ratio(self, workload: str) -> float:
        gw, bl = self.rate(workload, "gateway"), self.rate(workload, "baseline")
        return gw / bl if bl else float("nan")

    def latency(self, workload: str, app: str, q: float) -> float:
        m = self.runs.get((workload, app))
        return m.latency_ms(q) if m is not None else float("nan")

    def mutation_ratio(self) -> float:
        rates = []
        for app in ("gateway", "baseline"):
            ms = [self.runs[(w, app)] for w in ("dispense", "issue") if (w, app) in self.runs]
            seconds = sum(m.seconds for m in ms)
            rates.append(sum(m.ops for m in ms) / seconds if seconds else float("nan"))
        return rates[0] / rates[1] if rates[1] else float("nan")


async def serve_and_measure(
    stage: Stage,
    apps: list[App],
    ids: list[str],
    plan: Plan,
    open_rate: float | None,
    reader: dict[str, str],
    seed: int,
    dispensed: set[str],
    server_pid: int | None,
) -> None:
    """Reads, the open loop, then mutations, on the running gateway and baseline, the baseline
    first each time; `ids` are the preloaded prescriptions, `dispensed` those an earlier stage
    dispensed (updated). Each measurement starts once the gateway and the server (when
    started here) are quiet."""
    gateway, baseline = apps
    busy = [gateway.process.pid] + ([] if server_pid is None else [server_pid])

    async def quiet() -> None:
        waited = await quiesce(busy, plan.timeout)
        if waited > 1.5:
            progress(f"  (waited {waited:.0f} s for the gateway and the server to go quiet)")

    async with contextlib.AsyncExitStack() as stack:
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        tls = httpx.create_ssl_context()
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

        async def run(workload: str, app: App, next_operation: Any) -> Run:
            await quiet()
            progress(
                f"  {workload} on the {app.name}: {plan.warmup:g} s warm-up (and until every "
                f"client had an answer), then {plan.duration:g} s ..."
            )
            m = await closed_loop(
                connections[app.name], workload, app, next_operation, plan.warmup, plan.duration
            )
            stage.runs[(workload, app.name)] = m
            progress(
                f"    {shown(m.rate, ',.1f')}/s, p50 {shown(m.latency_ms(0.5), ',.1f')} ms, "
                f"p99 {shown(m.latency_ms(0.99), ',.1f')} ms"
                + (f"; {m.timeouts} timed out" if m.timeouts else "")
                + (f"; {m.errors} ERRORS, e.g. {m.samples[0][:200]}" if m.errors else "")
            )
            return m

        async def open_loop_run(rate: float) -> None:
            stage.open_rate = rate
            await quiet()
            progress(f"  open loop on the gateway: {rate:,.1f} requests/s for {plan.duration:g} s")
            m = await open_loop(
                gateway,
                ids,
                reader,
                rate,
                plan.duration,
                connections["gateway"],
                seed,
                plan.timeout,
            )
            stage.runs[("open", "gateway")] = m
            progress(
                f"    p50 {shown(m.latency_ms(0.5), ',.1f')} ms, p99 "
                f"{shown(m.latency_ms(0.99), ',.1f')} ms"
                + (f"; {m.errors} ERRORS" if m.errors else "")
                + (f"; {m.timeouts} unanswered within {plan.timeout:g} s" if m.timeouts else "")
            )
            sample = random.Random(seed).sample(ids, min(5, len(ids)))
            try:
                stage.verified, found = await verify_offline(http, gateway, sample, reader)
                stage.problems.extend(found)
            except httpx.TimeoutException:
                progress(f"  offline verification skipped: no answer within {plan.timeout:g} s")

        # Every baseline workload first: what a timed-out client leaves running on the gateway
        # (at a size it cannot serve, minutes of scans) then loads only the gateway's own later
        # figures. The baseline's saturated read rate sets the open-loop rate. Dispenses take
        # preloaded prescriptions never dispensed before, the same ones in the same order on
        # both sides; issues add new ones.
        fresh = [rid for rid in ids if rid not in dispensed]
        picked = random.Random(seed).sample(fresh, min(len(fresh), 20_000))
        done = 0
        for app, query, headers in ((baseline, PLAIN_QUERY, {}), (gateway, PROOF_QUERY, reader)):
            await run("read", app, querying(app, query, ids, headers, seed))
            if app is gateway:
                await open_loop_run(open_rate or 0.5 * stage.rate("read", "baseline"))
            queue = deque(picked)
            await run("dispense", app, dispensing(app, queue))
            done = max(done, len(picked) - len(queue))
            await run("issue", app, issuing(app, deque()))
        dispensed.update(picked[:done])


def parse_sizes(raw: str) -> list[int]:
    try:
        sizes = sorted({int(s.replace("_", "")) for s in raw.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes {raw!r}: comma-separated integers") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("--sizes needs at least one size >= 1")
    return sizes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes("1000,100000"),
        help="prescriptions preloaded before each measurement, ascending (default 1000,100000)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=8.0,
        help="measured seconds of each workload (default %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="least warm-up seconds before each closed-loop window (default %(default)s)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=16,
        help="concurrent connections per side (default %(default)s)",
    )
    parser.add_argument(
        "--open-rate",
        type=float,
        help="open-loop requests per second (default: half the baseline's read rate)",
    )
    parser.add_argument(
        "--preload-concurrency",
        type=int,
        default=64,
        help="issues in flight while preloading (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds a request may take: one unanswered by then counts as timed out (a "
        "figure, not an error), its latency as this lower bound (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default %(default)s)")
    parser.add_argument(
        "--keep-logs", type=Path, metavar="DIR", help="copy the servers' logs to DIR"
    )
    args = parser.parse_args()
    if min(args.clients, args.preload_concurrency) < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--clients, --preload-concurrency >= 1, --duration > 0, --warmup >= 0")
    if args.open_rate is not None and args.open_rate <= 0:
        parser.error("--open-rate must be > 0")
    return args


def met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def report(stages: list[Stage], plan: Plan, server: str, loads: list[tuple[float, ...]]) -> None:
    print()
    print("rxledger at hospital scale: prescription(id) with proofs, open loop, mutations,")
    print("against the CRUD baseline (bench/baseline_app.py) on the same server, same data")
    print(f"server:   {server}")
    print(
        f"machine:  {os.cpu_count()} CPUs shared by client, gateway, baseline, server and other "
        f"work; load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in loads[0])}, "
        f"at end {'/'.join(f'{x:.2f}' for x in loads[-1])}; Python {platform.python_version()}"
    )
    print(
        f"client:   {plan.clients} connections per side (asyncio + httpx, this process); "
        f"closed loops: {plan.describe()}; open loop {plan.duration:g} s"
    )
    for s in stages:
        p = s.preloaded
        print(
            f"figure: preload_rate_{s.size} = {p.rate:.1f}  (issued {p.issued:,} through "
            f"PrescriptionService in {p.seconds:.1f} s, checkpoint covering {p.events:,} events "
            f"{p.covered_seconds:.1f} s later)"
        )
    print()
    row = "{:<34} {:>12} {:>12} {:>8}"
    for s in stages:
        print(f"size {s.size:,} prescriptions")
        print(row.format("", "gateway", "baseline", "gw/bl"))
        for workload, label in (
            ("read", "prescription(id) /s"),
            ("dispense", "dispensePrescription /s"),
            ("issue", "issuePrescription /s"),
        ):
            print(
                row.format(
                    label,
                    shown(s.rate(workload, "gateway"), ",.1f"),
                    shown(s.rate(workload, "baseline"), ",.1f"),
                    shown(s.ratio(workload), ".2f"),
                )
            )
            print(
                row.format(
                    "  p50 / p99 ms",
                    f"{shown(s.latency(workload, 'gateway', 0.5), ',.1f')} / "
                    f"{shown(s.latency(workload, 'gateway', 0.99), ',.1f')}",
                    f"{shown(s.latency(workload, 'baseline', 0.5), ',.1f')} / "
                    f"{shown(s.latency(workload, 'baseline', 0.99), ',.1f')}",
                    "",
                )
            )
        print(
            row.format(
                f"open loop at {s.open_rate:,.1f}/s p50 / p99 ms",
                f"{shown(s.latency('open', 'gateway', 0.5), ',.1f')} / "
                f"{shown(s.latency('open', 'gateway', 0.99), ',.1f')}",
                "",
                "",
            )
        )
        n = s.size
        print(f"figure: read_p50_ms_{n} = {s.latency('read', 'gateway', 0.5):.2f}")
        print(f"figure: read_p99_ms_{n} = {s.latency('read', 'gateway', 0.99):.2f}")
        print(f"figure: read_rate_{n} = {s.rate('read', 'gateway'):.2f}")
        print(f"figure: baseline_read_rate_{n} = {s.rate('read', 'baseline'):.2f}")
        print(f"figure: open_rate_{n} = {s.open_rate:.2f}")
        print(f"figure: open_p99_ms_{n} = {s.latency('open', 'gateway', 0.99):.2f}")
        for workload, app in s.runs:
            print(f"figure: timeouts_{workload}_{app}_{n} = {s.runs[(workload, app)].timeouts}")
        print(f"ratio: read_vs_baseline_{n} = {s.ratio('read'):.3f}")
        print(f"ratio: mutations_vs_baseline_{n} = {s.mutation_ratio():.3f}")
        print(f"ratio: dispense_vs_baseline_{n} = {s.ratio('dispense'):.3f}")
        print(f"ratio: issue_vs_baseline_{n} = {s.ratio('issue'):.3f}")
        late = {w: m.timeouts for (w, a), m in s.runs.items() if a == "gateway" and m.timeouts}
        if late:
            print(
                f"timed out on the gateway (unanswered within {plan.timeout:g} s; their latency "
                f"counts as {plan.timeout:g} s, a lower bound): "
                + ", ".join(f"{w} {n:,}" for w, n in late.items())
            )
        print(f"(gateway log: {s.log}; {s.verified} proofs verified offline)")
        print()

    small, large = stages[0], stages[-1]
    targets: list[tuple[str, float, bool]] = []
    if len(stages) > 1:
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            r = large.latency("read", "gateway", q) / small.latency("read", "gateway", q)
            print(f"ratio: read_{name}_{large.size}_vs_{small.size} = {r:.3f}")
            targets.append(
                (
                    f"prescription(id) {name} at {large.size:,} <= {GROWTH_TARGET}x at "
                    f"{small.size:,}",
                    r,
                    r <= GROWTH_TARGET,
                )
            )
    for s in stages:
        r = s.ratio("read")
        targets.append(
            (f"prescription(id) /s >= {READ_TARGET}x baseline at {s.size:,}", r, r >= READ_TARGET)
        )
        p99 = s.latency("open", "gateway", 0.99)
        targets.append(
            (
                f"open-loop p99 <= {OPEN_P99_TARGET_MS:g} ms at {s.size:,}",
                p99,
                p99 <= OPEN_P99_TARGET_MS,
            )
        )
        for name, r in (
            ("mutations, both kinds", s.mutation_ratio()),
            ("dispensePrescription", s.ratio("dispense")),
            ("issuePrescription", s.ratio("issue")),
        ):
            targets.append(
                (f"{name} >= {MUTATION_TARGET}x baseline at {s.size:,}", r, r >= MUTATION_TARGET)
            )
    for name, value, ok in targets:
        print(f"target: {name}: {met(ok)} ({shown(value, ',.2f')})")
    load = "/".join(f"{x:.2f}" for x in loads[-1])
    print(f"figure: load_average = {load}")


def print_errors(stages: list[Stage]) -> bool:
    failures = [m for s in stages for m in s.runs.values() if m.errors]
    problems = [p for s in stages for p in s.problems]
    if not failures and not problems:
        answers = sum(m.requests for s in stages for m in s.runs.values())
        print(f"errors: none ({answers:,} answers checked)")
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
    plan = Plan(args.clients, args.warmup, args.duration, None, args.timeout, 0, False)
    tmp = Path(tempfile.mkdtemp(prefix="rxbench-hospital-"))
    suffix = uuid.uuid4().hex[:8]
    gateway_db, baseline_db = f"bench_hgw_{suffix}", f"bench_hbase_{suffix}"
    ferret = None
    uri = None
    apps: list[App] = []
    try:
        with terminated_by_sigterm():
            try:
                uri, ferret = start_database(tmp)
                server = describe_server(uri, ferret)
                progress(f"server: {server}")
                loads = [os.getloadavg()]
                stages: list[Stage] = []
                ids: list[str] = []  # every preloaded prescription, on both sides
                dispensed: set[str] = set()
                for size in args.sizes:
                    progress(f"size {size:,}: preloading through the service ...")
                    preloaded, new_ids = asyncio.run(
                        preload(
                            uri,
                            gateway_db,
                            baseline_db,
                            tmp / "var",
                            len(ids),
                            size,
                            args.preload_concurrency,
                            max(300.0, args.timeout),
                        )
                    )
                    progress(
                        f"  preloaded {preloaded.issued:,} in {preloaded.seconds:.1f} s, covered "
                        f"{preloaded.covered_seconds:.1f} s later: {preloaded.rate:,.0f}/s"
                    )
                    ids.extend(new_ids)
                    stage = Stage(size, preloaded)
                    apps = start_apps(uri, tmp, gateway_db, baseline_db)
                    gateway, baseline = apps
                    reader = sign_in(gateway, baseline, tmp / "var")
                    wait_until_up(
                        gateway,
                        "/readyz",
                        lambda r: r.status_code == 200 and r.json()["sequencerLeader"],
                        timeout=600.0,  # its start-up sweep reads every event
                    )
                    wait_until_up(baseline, "/healthz", lambda r: r.status_code == 200)
                    progress(f"  gateway on {gateway.base}, baseline on {baseline.base}")
                    asyncio.run(
                        serve_and_measure(
                            stage,
                            apps,
                            ids,
                            plan,
                            args.open_rate,
                            reader,
                            args.seed + size,
                            dispensed,
                            None if ferret is None else ferret.pid,
                        )
                    )
                    stage.log = log_summary(gateway)
                    for app in apps:
                        app.stop()
                    apps = []
                    stages.append(stage)
                    loads.append(os.getloadavg())
                report(stages, plan, server, loads)
                return 1 if print_errors(stages) else 0
            except Broken as exc:
                print(f"benchmark broken: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                progress("interrupted: stopping the servers")
                return 130
    finally:
        for app in apps:
            app.stop()
        if ferret is not None:
            ferret.stop()
        elif uri:
            with contextlib.suppress(Exception):
                asyncio.run(drop_databases(uri, [gateway_db, baseline_db]))
        if args.keep_logs is not None:
            copy_logs(tmp, args.keep_logs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
