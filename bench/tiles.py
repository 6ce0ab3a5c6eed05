"""Auditor benchmark: the log's tlog-tiles over HTTP, whole-log audits and inclusion proofs.

Runs against MONGODB_URI, or starts its own FerretDB in a temporary directory, and one real
gateway process (`python -m app.cli serve`) on its own database. The log is filled with ENTRIES
events appended directly through `anchoring.ledger.Ledger` by concurrent appenders (one subject
each, versions in order, `prev` chained as the prescription service does); the gateway's
sequencer sequences and anchors them, and the run waits until `GET /log/checkpoint` covers
them all. Then, each against a baseline measured in the same run:

  serving   CLIENTS keep-alive HTTP/1.1 connections (raw asyncio in this process: about a third
            of the gateway's CPU per request, so the gateway, not the load generator, saturates)
            for DURATION seconds after WARMUP, per path: GET /healthz (the baseline, first and
            again last: the ratios are against both, so a drift in load favours no path), a random
            full hash tile /log/tile/0/N, entry bundles /log/tile/entries/N (first touch: each
            read once from the database, one request at a time, so each latency is one range
            read and not a queue; then from the gateway's cache, as clients ask for them, with
            Accept-Encoding: gzip, and without) and /log/checkpoint
  audit     `rxledger audit --from-tiles URL --key VKEY --quiet` against `rxledger audit --quiet`
            (the database) on the same log, REPEAT times each, alternating, on a freshly started
            gateway: the first --from-tiles run meets cold caches (every bundle and tile from
            the database) and is reported apart from the later ones; process start-up
            (`python -m app.cli --help`) is measured as the fixed cost of any run
  proofs   an inclusion proof of a random leaf computed by a Python client from the tiles
            (`RemoteLog(url).tiles()`, a fresh RemoteTiles each time, then
            `inclusion_proof`) against asking GraphQL `ledger { inclusionProof(leafIndex) }`,
            one at a time, alternating which goes first; both paths must be equal

Prints requests/s, latency p50/p90/p99 and CPU per request of the gateway, the database server
(when started here) and this client; medians of the audits' wall time and CPU; medians of
the proofs; the ratios; then a compact summary with the environment. Not a test: slow figures
never fail the run. Exit 1 when an answer was wrong (the figures are then invalid), 2 when a
process did not start or no checkpoint came, 130 on Ctrl-C.

    .venv/bin/python bench/tiles.py [--entries 5000] [--clients 16] [--duration 5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pymongo import AsyncMongoClient

ROOT = Path(__file__).resolve().parent.parent
# bench/graphql.py would shadow graphql-core: keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from anchoring.encoding import b64  # noqa: E402
from anchoring.ledger import Ledger  # noqa: E402
from anchoring.note import Verifier, open_checkpoint, parse_verifier_key  # noqa: E402
from anchoring.proofs import inclusion_proof  # noqa: E402
from anchoring.remote import RemoteError, RemoteLog  # noqa: E402
from anchoring.store import LogStore  # noqa: E402
from anchoring.tiles import ENTRIES, parse_entry_bundle, tile_path  # noqa: E402
from anchoring.treemath import TILE_WIDTH  # noqa: E402
from bench.processes import (  # noqa: E402
    Broken,
    copy_logs,
    cpu_seconds,
    die_with_parent,
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

ORIGIN = "bench.rxledger/log"
CHECKPOINT_INTERVAL = "0.5"  # seconds; RXLEDGER_CHECKPOINT_INTERVAL of the gateway
BUNDLES_CACHED = 64  # app/logserver.py: LogServer keeps this many entry bundles in memory
HASH_TILE_BYTES = TILE_WIDTH * 32
VERIFIER = "{ ledger { verifierKey } }"
PROOF = """query Proof($leafIndex: Int!) {
  ledger { inclusionProof(leafIndex: $leafIndex) { treeSize path } } }"""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- processes --------------------------------------------------------------------------------


def cpu_now(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of this process ("client") and of each process by name."""
    return {"client": time.process_time()} | {name: cpu_seconds(pid) for name, pid in pids.items()}


def cpu_since(before: dict[str, float], pids: dict[str, int]) -> dict[str, float]:
    return {name: t - before[name] for name, t in cpu_now(pids).items()}


async def idle_cpu(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Share of one core each process uses while no request is made."""
    before = cpu_now(pids)
    await asyncio.sleep(seconds)
    return {name: t / seconds for name, t in cpu_since(before, pids).items() if name in pids}


# --- filling the log --------------------------------------------------------------------------


@dataclass
class Filled:
    entries: int
    subjects: dict[str, int]  # subject -> its last version
    append_seconds: float = 0.0
    covered_seconds: float = 0.0  # from the last acknowledgement to a checkpoint of every entry


async def fill(uri: str, database: str, entries: int, appenders: int) -> Filled:
    """Append `entries` events through the ledger's group commit, from `appenders` concurrent
    tasks, each the versions of one subject in order (with `prev`, as the service chains them)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
    ledger = Ledger(LogStore(client[database], ORIGIN))
    counts = [entries // appenders + (k < entries % appenders) for k in range(appenders)]
    filled = Filled(entries, {f"rx_bench{k:04d}": n for k, n in enumerate(counts) if n})
    acked = 0
    step = max(1, entries // 5)

    async def appender(subject: str, count: int) -> None:
        nonlocal acked
        prev: bytes | None = None
        for version in range(1, count + 1):
            header = {
                "v": 1,
                "subject": subject,
                "version": version,
                "type": "ISSUED" if version == 1 else "BENCH",
                "actor": "PRESCRIBER:dr-bench",
                "at": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                "prev": None if prev is None else b64(prev),
                "stateDigest": b64(os.urandom(32)),
                "payloadDigest": b64(os.urandom(32)),
            }
            prev = (await ledger.append(subject, version, header)).leaf_hash
            acked += 1
            if acked % step == 0:
                progress(f"  {acked:,} of {entries:,} appended")

    started = time.perf_counter()
    try:
        await asyncio.gather(*(appender(s, n) for s, n in filled.subjects.items()))
        filled.append_seconds = time.perf_counter() - started
        # These subjects are not prescriptions: documents at their last version keep a restarted
        # gateway's start-up repair sweep from trying to rebuild each (and from logging an error
        # for each) while an audit is being measured.
        await client[database]["prescriptions"].insert_many(
            [{"_id": s, "version": n} for s, n in filled.subjects.items()]
        )
    finally:
        await ledger.close()
        await client.close()
    return filled


async def verifier_key(http: httpx.AsyncClient, base: str) -> str:
    r = await http.post(f"{base}/graphql", json={"query": VERIFIER})
    if r.status_code != 200 or r.json().get("errors"):
        raise Broken(f"ledger {{ verifierKey }} answered HTTP {r.status_code}: {r.text[:200]}")
    return str(r.json()["data"]["ledger"]["verifierKey"])


async def wait_for_checkpoint(
    http: httpx.AsyncClient, base: str, verifier: Verifier, size: int, timeout: float
) -> int:
    """Wait until GET /log/checkpoint, verified with the log's key, covers `size` entries;
    returns its size."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await http.get(f"{base}/log/checkpoint")
        if r.status_code == 200:
            cp = open_checkpoint(r.text, [verifier], ORIGIN)
            if cp.size >= size:
                return cp.size
        await asyncio.sleep(0.1)
    raise Broken(f"no checkpoint covered {size:,} entries within {timeout:g} s")


# --- serving: keep-alive connections and the measured windows --------------------------------


class Connection:
    """One HTTP/1.1 keep-alive connection that GETs paths and reads Content-Length bodies: all
    the gateway's answers have one. Far cheaper per request than a general-purpose client."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str, accept_gzip: bool) -> tuple[int, bytes]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        encoding = "gzip" if accept_gzip else "identity"
        self.writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Accept-Encoding: {encoding}\r\n\r\n".encode()
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise ValueError(f"GET {path}: an answer without Content-Length")
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


# What was wrong with an answer to GET path, or None.
Check = Callable[[str, int, bytes], str | None]


@dataclass
class Serving:
    path: str
    note: str = ""
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0
    samples: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds in the window

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else float("nan")

    def cpu_us(self, process: str) -> float:
        """CPU microseconds per request of a process (nan when not measured)."""
        if process not in self.cpu or not self.requests:
            return float("nan")
        return self.cpu[process] / self.requests * 1e6

    def failed(self, problem: str) -> None:
        self.errors += 1
        if len(self.samples) < 3:
            self.samples.append(problem)


async def serve_window(
    result: Serving,
    connections: list[Connection],
    next_path: Callable[[], str],
    check: Check,
    accept_gzip: bool,
    warmup: float,
    duration: float,
    pids: dict[str, int],
) -> Serving:
    """Every connection GETs next_path() back to back for warmup + duration seconds; only the
    answers that arrive inside the last `duration` seconds count."""
    started = time.perf_counter()
    opens, closes = started + warmup, started + warmup + duration
    before: dict[str, float] = {}

    async def client(conn: Connection) -> None:
        while (t0 := time.perf_counter()) < closes:
            path = next_path()
            try:
                status, body = await conn.get(path, accept_gzip)
            except (OSError, EOFError, ValueError) as exc:  # EOFError: IncompleteReadError
                problem: str | None = f"GET {path}: {type(exc).__name__}: {exc}"
                await conn.close()
            else:
                problem = check(path, status, body)
            t1 = time.perf_counter()
            if opens <= t1 <= closes:
                result.latencies.append(t1 - t0)
                if problem is not None:
                    result.failed(problem)

    async def window() -> None:
        await asyncio.sleep(opens - time.perf_counter())
        before.update(cpu_now(pids))
        await asyncio.sleep(closes - time.perf_counter())
        result.cpu = cpu_since(before, pids)
        result.seconds = duration

    await asyncio.gather(window(), *(client(conn) for conn in connections))
    return result


async def first_touch(
    conn: Connection, bundles: list[int], pids: dict[str, int]
) -> tuple[Serving, dict[int, int]]:
    """GET each bundle once, one at a time (each one a database range read); checks that it
    holds TILE_WIDTH entries. Returns the figures and each bundle's gzip length."""
    result = Serving("/log/tile/entries/N", "first touch")
    lengths: dict[int, int] = {}
    before = cpu_now(pids)
    started = time.perf_counter()
    for bundle in bundles:
        path = "/log/" + tile_path(ENTRIES, bundle)
        t0 = time.perf_counter()
        try:
            status, body = await conn.get(path, accept_gzip=True)
            result.latencies.append(time.perf_counter() - t0)
            if status != 200:
                raise ValueError(f"HTTP {status}: {body[:200]!r}")
            leaves = parse_entry_bundle(gzip.decompress(body))
            if len(leaves) != TILE_WIDTH:
                raise ValueError(f"{len(leaves)} entries, want {TILE_WIDTH}")
            lengths[bundle] = len(body)
        except (OSError, EOFError, ValueError) as exc:
            result.failed(f"GET {path}: {type(exc).__name__}: {exc}")
            await conn.close()
    result.seconds = time.perf_counter() - started
    result.cpu = cpu_since(before, pids)
    return result, lengths


async def measure_serving(
    base: str,
    size: int,
    clients: int,
    warmup: float,
    duration: float,
    pids: dict[str, int],
    seed: int,
) -> list[Serving]:
    host, port = base.removeprefix("http://").split(":")
    rng = random.Random(seed)
    full = size // TILE_WIDTH
    # At most what the gateway's bundle cache holds, so that "cached" stays cached.
    touched = rng.sample(range(full), min(full, BUNDLES_CACHED))
    connections = [Connection(host, int(port)) for _ in range(clients)]
    results = []

    def status_200(path: str, status: int, body: bytes) -> str | None:
        return None if status == 200 else f"GET {path}: HTTP {status}: {body[:200]!r}"

    def hash_tile(path: str, status: int, body: bytes) -> str | None:
        if status == 200 and len(body) == HASH_TILE_BYTES:
            return None
        return f"GET {path}: HTTP {status}, {len(body)} bytes, want {HASH_TILE_BYTES}"

    def checkpoint(path: str, status: int, body: bytes) -> str | None:
        if status == 200 and body.startswith(ORIGIN.encode() + b"\n"):
            return None
        return f"GET {path}: HTTP {status}: {body[:200]!r}"

    async def window(
        result: Serving, next_path: Callable[[], str], check: Check, accept_gzip: bool = True
    ) -> None:
        what = f"GET {result.path} {result.note}".rstrip()
        progress(f"serving: {what}, {clients} clients, {warmup:g} + {duration:g} s ...")
        results.append(
            await serve_window(
                result, connections, next_path, check, accept_gzip, warmup, duration, pids
            )
        )

    def bundle_path() -> str:
        return "/log/" + tile_path(ENTRIES, rng.choice(touched))

    try:
        await window(Serving("/healthz", "baseline"), lambda: "/healthz", status_200)
        await window(
            Serving("/log/tile/0/N", "random full tile"),
            lambda: "/log/" + tile_path(0, rng.randrange(full)),
            hash_tile,
        )

        progress(f"serving: {len(touched)} entry bundles, first touch, one at a time ...")
        touch, lengths = await first_touch(connections[0], touched, pids)
        results.append(touch)

        def gzip_bundle(path: str, status: int, body: bytes) -> str | None:
            want = lengths.get(int(path.rsplit("/", 1)[1]))
            if status == 200 and len(body) == want and body[:2] == b"\x1f\x8b":
                return None
            return f"GET {path}: HTTP {status}, {len(body)} bytes, want gzip of {want}"

        def plain_bundle(path: str, status: int, body: bytes) -> str | None:
            # A bundle is TILE_WIDTH (uint16 length, leaf) pairs: a cheap shape check.
            if status == 200 and len(body) > 2 * TILE_WIDTH and body[:2] != b"\x1f\x8b":
                return None
            return f"GET {path}: HTTP {status}, {len(body)} bytes: {body[:100]!r}"

        await window(Serving("/log/tile/entries/N", "cached, gzip"), bundle_path, gzip_bundle)
        await window(
            Serving("/log/tile/entries/N", "cached, identity"), bundle_path, plain_bundle, False
        )
        await window(Serving("/log/checkpoint"), lambda: "/log/checkpoint", checkpoint)
        # The baseline again: the ratios are against both windows, so a drift in the
        # machine's load over the phases favours no path.
        await window(Serving("/healthz", "baseline, again"), lambda: "/healthz", status_200)
    finally:
        for conn in connections:
            await conn.close()
    return results


# --- whole-log audits -------------------------------------------------------------------------


@dataclass
class Run:
    kind: str
    seconds: float
    cpu: dict[str, float]  # "auditor" (the child process), gateway, database
    output: str

    @property
    def failed(self) -> bool:
        return self.kind != "start-up" and not self.output.startswith("OK:")


def run_command(kind: str, cmd: list[str], env: dict[str, str], pids: dict[str, int]) -> Run:
    """Run a command to completion; its wall time and the CPU it, the gateway and the
    database used meanwhile. Raises Broken when it exits other than 0, or 1 saying FAILED."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.perf_counter()
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        preexec_fn=die_with_parent,
        check=False,
    )
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    cpu["auditor"] = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    output = done.stdout.strip()
    if done.returncode != 0 and not (done.returncode == 1 and output.startswith("FAILED")):
        raise Broken(
            f"{' '.join(cmd[1:])} exited {done.returncode}: {output[:300]} {done.stderr[-600:]}"
        )
    return Run(kind, seconds, cpu, output)


async def measure_audits(
    base: str, vkey: str, env: dict[str, str], repeat: int, pids: dict[str, int]
) -> list[Run]:
    cli = [sys.executable, "-m", "app.cli"]
    commands = {
        "start-up": [*cli, "--help"],
        "tiles": [*cli, "audit", "--from-tiles", f"{base}/log", "--key", vkey, "--quiet"],
        "database": [*cli, "audit", "--quiet"],
    }
    order = ["start-up", "tiles", "database"] * repeat
    runs = []
    for k, kind in enumerate(order):
        progress(f"run {k + 1}/{len(order)}: {' '.join(['python', *commands[kind][1:]])} ...")
        run = await asyncio.to_thread(run_command, kind, commands[kind], env, pids)
        progress(f"  {run.seconds:.2f} s; {run.output.splitlines()[0][:120]}")
        runs.append(run)
    return runs


# --- inclusion proofs -------------------------------------------------------------------------


@dataclass
class Proofs:
    tiles: list[float] = field(default_factory=list)
    graphql: list[float] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)  # HTTP requests per proof from tiles
    problems: list[str] = field(default_factory=list)


async def measure_proofs(base: str, size: int, count: int, seed: int) -> Proofs:
    """Inclusion proofs of `count` random leaves, from the tiles and from GraphQL, one at a
    time, alternating which goes first; both must give the same path."""
    leaves = random.Random(seed).sample(range(size), min(count, size))
    result = Proofs()
    log_requests = 0

    async def count_log_request(request: httpx.Request) -> None:
        nonlocal log_requests
        if request.url.path.startswith("/log/"):
            log_requests += 1

    hooks = {"request": [count_log_request]}
    async with httpx.AsyncClient(timeout=60, event_hooks=hooks) as http:
        remote = RemoteLog(f"{base}/log", client=http)

        async def from_tiles(index: int) -> list[str]:
            before = log_requests
            path = await inclusion_proof(remote.tiles(), index, size, size)
            result.requests.append(log_requests - before)
            return [b64(h) for h in path]

        async def from_graphql(index: int) -> list[str]:
            r = await http.post(
                f"{base}/graphql", json={"query": PROOF, "variables": {"leafIndex": index}}
            )
            body = r.json()
            if r.status_code != 200 or body.get("errors"):
                raise ValueError(f"HTTP {r.status_code}: {str(body)[:200]}")
            proof = body["data"]["ledger"]["inclusionProof"]
            if proof["treeSize"] != size:
                raise ValueError(f"treeSize {proof['treeSize']}, want {size}")
            return list(proof["path"])

        # The first leaf twice: its first round opens the connections and is not counted.
        for k, index in enumerate([leaves[0], *leaves]):
            paths: dict[str, list[str]] = {}
            for name in ("tiles", "graphql") if k % 2 == 0 else ("graphql", "tiles"):
                started = time.perf_counter()
                try:
                    paths[name] = await (from_tiles if name == "tiles" else from_graphql)(index)
                except (ValueError, KeyError, httpx.HTTPError, RemoteError) as exc:
                    result.problems.append(f"leaf {index} from {name}: {exc}")
                    continue
                if k > 0:
                    getattr(result, name).append(time.perf_counter() - started)
            if k == 0:
                result.requests.clear()
            if len(paths) == 2 and paths["tiles"] != paths["graphql"]:
                result.problems.append(f"leaf {index}: the paths from tiles and GraphQL differ")
    return result


# --- the report -------------------------------------------------------------------------------


def shown(value: float, spec: str = ",.0f") -> str:
    return "n/a" if value != value else format(value, spec)  # nan -> n/a


def ratio(a: float, b: float) -> str:
    return shown(a / b if b else float("nan"), ".2f") + "x"


def ms(seconds: float) -> str:
    return shown(seconds * 1000, ".1f" if seconds < 0.1 else ",.0f")


def baseline_rate(results: list[Serving]) -> float:
    """Requests/s of GET /healthz: the mean of its windows, first and last."""
    return statistics.fmean(r.rate for r in results if r.path == "/healthz")


def report_serving(results: list[Serving], clients: int, database_measured: bool) -> None:
    base = baseline_rate(results)
    print()
    print(
        f"1. HTTP serving: {clients} keep-alive connections GET back to back (raw asyncio, this "
        "process); Accept-Encoding: gzip unless marked identity"
    )
    row = "  {:21} {:17} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}"
    print(
        row.format(
            "GET", "", "req/s", "vs hz", "p50 ms", "p90 ms", "p99 ms", "gw us", "db us", "cl us"
        )
    )
    for r in results:
        sequential = r.note == "first touch"
        print(
            row.format(
                r.path,
                f"{r.note} ({r.requests})" if sequential else r.note,
                shown(r.rate),
                "" if r.path == "/healthz" or sequential else ratio(r.rate, base),
                ms(median(r.latencies)),
                ms(pct(r.latencies, 0.9)),
                "" if sequential else ms(pct(r.latencies, 0.99)),
                shown(r.cpu_us("gateway")),
                shown(r.cpu_us("database")) if database_measured else "-",
                shown(r.cpu_us("client")),
            )
        )
    print(
        "  vs hz: requests/s against GET /healthz (the mean of its two windows); gw/db/cl us: CPU "
        "microseconds per request of the gateway, the database server and this client"
    )
    print(
        "  first touch: one request at a time, each bundle once (req/s = 1 / mean latency); "
        "p50 is the cost of one bundle read from the database"
    )


def report_audits(runs: list[Run], entries: int, database_measured: bool) -> dict[str, float]:
    """Prints the audit table; returns the medians for the summary."""
    by_kind: dict[str, list[Run]] = {}
    for run in runs:
        by_kind.setdefault(run.kind, []).append(run)
    tiles, database = by_kind["tiles"], by_kind["database"]
    groups = [
        ("start-up: app.cli --help", by_kind["start-up"]),
        ("--from-tiles, first (cold)", tiles[:1]),
        (f"--from-tiles, later ({len(tiles) - 1})", tiles[1:]),
        (f"database ({len(database)})", database),
    ]
    db_seconds = median([r.seconds for r in database])
    print()
    print(
        f"2. Whole-log audit of {entries:,} entries (`rxledger audit --quiet`, each a new process)"
    )
    row = "  {:28} {:>8} {:>10} {:>8} {:>9} {:>9} {:>9}"
    print(row.format("", "wall s", "entries/s", "vs db", "audit cpu", "gw cpu", "db cpu"))
    figures = {}
    for label, group in groups:
        if not group:
            continue
        seconds = median([r.seconds for r in group])
        figures[label] = seconds
        auditing = not label.startswith("start-up")
        print(
            row.format(
                label,
                f"{seconds:.2f}",
                shown(entries / seconds) if auditing else "",
                ratio(db_seconds, seconds) if auditing else "",
                f"{median([r.cpu['auditor'] for r in group]):.2f}",
                f"{median([r.cpu['gateway'] for r in group]):.2f}",
                f"{median([r.cpu['database'] for r in group]):.2f}" if database_measured else "-",
            )
        )
    print("  medians; vs db: entries/s against the audit from the database; cpu: CPU seconds")
    print(f"  the audits said: {tiles[0].output} / {database[0].output}")
    print(
        "  runs, s: tiles "
        + ", ".join(f"{r.seconds:.2f}" for r in tiles)
        + "; database "
        + ", ".join(f"{r.seconds:.2f}" for r in database)
    )
    return figures


def report_proofs(proofs: Proofs, size: int) -> None:
    print()
    print(
        f"3. Inclusion proof of a random leaf in the tree of {size:,}, one at a time "
        f"({len(proofs.tiles)} leaves)"
    )
    row = "  {:44} {:>8} {:>8} {:>8}"
    print(row.format("", "p50 ms", "p90 ms", "vs gql"))
    base = median(proofs.graphql)
    print(
        row.format(
            "GraphQL ledger { inclusionProof { path } }",
            ms(base),
            ms(pct(proofs.graphql, 0.9)),
            "",
        )
    )
    print(
        row.format(
            "client from tiles (fresh RemoteTiles)",
            ms(median(proofs.tiles)),
            ms(pct(proofs.tiles, 0.9)),
            ratio(base, median(proofs.tiles)),
        )
    )
    requests = median([float(n) for n in proofs.requests])
    print(
        f"  vs gql: GraphQL's p50 / this p50 (above 1x: faster); a proof from tiles fetched "
        f"{shown(requests)} tiles (in parallel); both paths compared for every leaf"
    )


def report_summary(
    environment: list[str],
    serving: list[Serving],
    audit: dict[str, float],
    proofs: Proofs,
    entries: int,
) -> None:
    hz = baseline_rate(serving)
    print()
    print("Summary")
    for line in environment:
        print(f"  {line}")
    row = "  {:44} {:>16} {:>11}"
    print(row.format("figure", "value", "ratio"))
    for r in serving:
        if r.note == "first touch":
            value, against = f"{ms(median(r.latencies))} ms p50", "(one read)"
        else:
            value = f"{shown(r.rate)} req/s"
            against = "" if r.path == "/healthz" else f"{ratio(r.rate, hz)} hz"
        print(row.format(f"GET {r.path} {r.note}".strip(), value, against))
    db = audit.get(next(k for k in audit if k.startswith("database")), float("nan"))
    for label, seconds in audit.items():
        if label.startswith("start-up"):
            print(row.format("audit: process start-up", f"{seconds:.2f} s", ""))
            continue
        print(
            row.format(
                f"audit {label}",
                f"{seconds:.1f} s, {shown(entries / seconds)}/s",
                "" if label.startswith("database") else f"{ratio(db, seconds)} db",
            )
        )
    gql = median(proofs.graphql)
    print(row.format("proof: GraphQL inclusionProof p50", f"{ms(gql)} ms", ""))
    print(
        row.format(
            "proof: client from tiles p50",
            f"{ms(median(proofs.tiles))} ms",
            f"{ratio(gql, median(proofs.tiles))} gql",
        )
    )
    print("  ratio: speed against the baseline named (above 1x: faster)")


def print_errors(serving: list[Serving], runs: list[Run], proofs: Proofs) -> bool:
    """Print every failed check; True when there was one."""
    failed = [r for r in serving if r.errors]
    audits = [r for r in runs if r.failed]
    if not failed and not audits and not proofs.problems:
        answers = sum(r.requests for r in serving) + len(proofs.tiles) + len(proofs.graphql)
        print(f"  errors: none ({answers:,} answers checked, every audit OK)")
        return False
    print()
    print("ERRORS: the figures above are invalid")
    for r in failed:
        print(f"  GET {r.path} {r.note}: {r.errors} of {r.requests} failed, e.g.")
        for sample in r.samples:
            print(f"    {sample[:300]}")
    for run in audits:
        print(f"  audit {run.kind}: {run.output[:300]}")
    for problem in proofs.problems[:10]:
        print(f"  {problem[:300]}")
    return True


# --- the run ---------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--entries",
        type=int,
        default=5000,
        help="entries in the log, at least one full tile (default %(default)s)",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=16,
        help="concurrent connections while serving (default %(default)s)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=5.0,
        help="measured seconds of each serving phase (default %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        help="seconds before each serving phase's window opens (default %(default)s)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each audit, alternating; medians are shown (default %(default)s)",
    )
    parser.add_argument(
        "--proofs",
        type=int,
        default=50,
        help="random leaves proven each way (default %(default)s)",
    )
    parser.add_argument(
        "--appenders",
        type=int,
        default=64,
        help="concurrent appenders filling the log, one subject each (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default %(default)s)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds to wait for a checkpoint covering every entry (default %(default)s)",
    )
    parser.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="copy the gateway's and FerretDB's logs to DIR",
    )
    args = parser.parse_args()
    if args.entries < TILE_WIDTH:
        parser.error(f"--entries must be >= {TILE_WIDTH} (one full tile)")
    if min(args.clients, args.repeat, args.proofs, args.appenders) < 1:
        parser.error("--clients, --repeat, --proofs and --appenders must be >= 1")
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be > 0 and --warmup >= 0")
    return args


async def run(
    args: argparse.Namespace,
    tmp: Path,
    uri: str,
    database: str,
    server: str,
    server_pid: int | None,
) -> int:
    # `rxledger audit` from the database runs with the gateway's environment too.
    env = gateway_env(
        uri,
        database,
        tmp / "var",
        RXLEDGER_ORIGIN=ORIGIN,
        RXLEDGER_CHECKPOINT_INTERVAL=CHECKPOINT_INTERVAL,
    )
    log_path = tmp / "gateway.log"
    gateway = start_gateway(env, log_path)
    server_pids = {} if server_pid is None else {"database": server_pid}
    try:
        await asyncio.to_thread(wait_until_ready, gateway)
        progress(f"gateway (pid {gateway.pid}) on {gateway.base}, database {database}")
        load0 = os.getloadavg()
        async with httpx.AsyncClient(timeout=30) as http:
            vkey = await verifier_key(http, gateway.base)
            verifier = parse_verifier_key(vkey)
            progress(
                f"filling the log: {args.entries:,} entries from {args.appenders} appenders ..."
            )
            filled = await fill(uri, database, args.entries, args.appenders)
            progress("waiting for a checkpoint covering every entry ...")
            started = time.perf_counter()
            size = await wait_for_checkpoint(
                http, gateway.base, verifier, args.entries, args.timeout
            )
            filled.covered_seconds = time.perf_counter() - started
        if size != args.entries:
            raise Broken(f"the checkpoint covers {size:,} entries; {args.entries:,} were appended")
        progress(
            f"  {size:,} entries appended in {filled.append_seconds:.1f} s, covered by a "
            f"checkpoint {filled.covered_seconds:.1f} s later"
        )

        pids = {"gateway": gateway.pid, **server_pids}
        progress("measuring idle CPU (no requests) ...")
        idle = await idle_cpu(pids, 3.0)
        serving = await measure_serving(
            gateway.base, size, args.clients, args.warmup, args.duration, pids, args.seed
        )

        progress("restarting the gateway, so the first audit from tiles meets cold caches ...")
        gateway.stop()
        gateway = start_gateway(env, log_path)
        await asyncio.to_thread(wait_until_ready, gateway)
        await asyncio.sleep(2.0)  # its start-up work (indexes, repair sweep) out of the way
        pids = {"gateway": gateway.pid, **server_pids}
        runs = await measure_audits(gateway.base, vkey, env, args.repeat, pids)

        progress(f"proofs: {args.proofs} random leaves, from tiles and from GraphQL ...")
        proofs = await measure_proofs(gateway.base, size, args.proofs, args.seed)
        load1 = os.getloadavg()

        environment = [
            f"database: {server}",
            f"gateway: one uvicorn process (python -m app.cli serve: h11, asyncio), rate limit "
            f"off, checkpoint interval {CHECKPOINT_INTERVAL} s; restarted before the audits",
            f"log: N = {size:,} entries of {len(filled.subjects)} subjects ({args.appenders} "
            f"concurrent appenders: {size / filled.append_seconds:,.0f}/s; checkpoint covering "
            f"all {filled.covered_seconds:.1f} s after the last)",
            "idle (no requests, 3 s): "
            + ", ".join(f"{name} {share:.0%}" for name, share in idle.items())
            + " of a core; this load runs under every figure",
            f"clients: C = {args.clients} while serving; {args.warmup:g} + {args.duration:g} s "
            f"per path; audits x{args.repeat}; {len(proofs.tiles)} proofs each way",
            f"machine: {os.cpu_count()} CPUs shared by everything; load average (1/5/15 min) "
            f"{'/'.join(f'{x:.1f}' for x in load0)} -> {'/'.join(f'{x:.1f}' for x in load1)}; "
            f"Python {platform.python_version()}",
        ]
        print()
        print(
            f"rxledger auditor paths, N = {size:,} entries, C = {args.clients}: tlog-tiles over "
            "HTTP, whole-log audit, inclusion proofs (environment in the summary)"
        )
        report_serving(serving, args.clients, bool(server_pids))
        audit = report_audits(runs, size, bool(server_pids))
        report_proofs(proofs, size)
        report_summary(environment, serving, audit, proofs, size)
        return 1 if print_errors(serving, runs, proofs) else 0
    finally:
        gateway.stop()


def main() -> int:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rxbench-tiles-"))
    database = f"bench_tiles_{uuid.uuid4().hex[:8]}"
    ferret = None
    try:
        with terminated_by_sigterm():
            try:
                uri, ferret = start_database(tmp)
                if ferret is None:
                    server = f"MONGODB_URI {redacted_uri(uri)}"
                else:
                    server = (
                        f"FerretDB v1.24.2 (SQLite handler), started for this run at "
                        f"{redacted_uri(uri)}"
                    )
                progress(f"database: {server}")
                return asyncio.run(
                    run(args, tmp, uri, database, server, None if ferret is None else ferret.pid)
                )
            except Broken as exc:
                print(f"benchmark broken: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                progress("interrupted; stopping the gateway and the database")
                return 130
    finally:
        if ferret is not None:
            ferret.stop()
        elif os.environ.get("MONGODB_URI"):
            with contextlib.suppress(Exception):
                asyncio.run(drop_databases(os.environ["MONGODB_URI"], [database]))
        if args.keep_logs is not None:
            copy_logs(tmp, args.keep_logs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
