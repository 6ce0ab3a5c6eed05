"""Ledger benchmark: append+sequence throughput and merge delay against Tessera's POSIX log on
the same machine, proof rate, sequencer memory.

For each number of concurrent appenders it runs our log (appends through TransparencyLog, the
in-process sequencer publishing them) and then Tessera v1.0.4's POSIX log (bench/tessera, the
reference tlog-tiles implementation: every batch fsynced, batches of at most 1,000 entries or
5 ms, a checkpoint every second) on the same number of entries and appenders, and prints both
and the ratio of our sequencing rate to Tessera's integration rate. Between the two it measures
the server's ceiling: the same appenders, batched as Tessera batches them (at most 1,000 entries
or 5 ms), each batch written as ONE insert_many of entry-sized documents into the server and
acknowledged when it returns. No log that keeps its entries as documents on this server can
acknowledge faster, and ours writes at least three documents per event (the ledger event, its
entry, its position), so the run prints our rate against that ceiling and Tessera's against it
too. Not a test: it never fails
on a figure. It does fail, rather than hang: past --deadline it stops with exit status 2, and
a publish callback or the sequencer failing unexpectedly ends the run with exit status 1 and
the traceback. Tessera that cannot be built (no Go, the module proxy unreachable) is exit
status 3, saying what failed; --no-tessera skips it.

Runs against MONGODB_URI, or starts its own FerretDB in a temporary directory the way the tests
do (scripts/devdb.py). Builds bench/tessera into var/bin/tessera-bench with `go build` (through
the Go module proxy the first time) and rebuilds it when its sources change.

    .venv/bin/python bench/ledger.py [--events 20000] [--appenders 64,512]
        [--sizes 10000,1000000] [--proof-seconds 3] [--deadline 3600] [--no-tessera]
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import hashlib
import json
import logging
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bson import Binary
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymongo import AsyncMongoClient, monitoring

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from anchoring.anchorer import AnchorSettings  # noqa: E402
from anchoring.log import LogSettings, TransparencyLog  # noqa: E402
from anchoring.note import Signer  # noqa: E402
from anchoring.proofs import inclusion_proof  # noqa: E402
from anchoring.sequencer import Sequencer  # noqa: E402
from anchoring.store import LogStore  # noqa: E402
from anchoring.tiles import TileReader  # noqa: E402

TESSERA_SOURCE = ROOT / "bench" / "tessera"
TESSERA_BINARY = ROOT / "var" / "bin" / "tessera-bench"
PublishCallback = Callable[[int, bytes, list[dict[str, Any]]], object]


class WriteCounter(monitoring.CommandListener):
    """Counts the write commands a client sends: on FerretDB (SQLite) each is one transaction,
    which waits for its commit to reach the disk."""

    def __init__(self) -> None:
        self.writes = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in ("insert", "update", "delete", "findAndModify"):
            self.writes += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


WRITES = WriteCounter()


class CallbackFailed(RuntimeError):
    """A publish callback raised, or the sequencer failed unexpectedly: the run is void."""


class TesseraUnavailable(RuntimeError):
    """The Tessera baseline could not be built or run; the message says what failed."""


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of this process, or of process `pid` (nan if unreadable)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return "load average: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def leaf_hash_rate(seconds: float = 1.0) -> float:
    leaf = os.urandom(200)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10000):
            hashlib.sha256(b"\x00" + leaf).digest()
        n += 10000
    return n / (time.perf_counter() - start)


class _FailOnError(logging.Handler):
    """Turns an error the sequencer logs (it then retries, possibly forever) into a failure."""

    def __init__(self, failed: asyncio.Future[None]) -> None:
        super().__init__(logging.ERROR)
        self.failed = failed

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed.done():
            self.failed.set_exception(
                CallbackFailed(f"the sequencer failed: {record.getMessage()}")
            )


def _guarded(callback: PublishCallback, failed: asyncio.Future[None]) -> PublishCallback:
    def call(size: int, root: bytes, entries: list[dict[str, Any]]) -> object:
        try:
            return callback(size, root, entries)
        except BaseException:
            if not failed.done():
                failed.set_exception(
                    CallbackFailed(f"a publish callback raised:\n{traceback.format_exc()}")
                )
            raise

    return call


async def bench_append(
    client: AsyncMongoClient[dict[str, Any]],
    signer: Signer,
    events: int,
    appenders: int,
    server_pid: int | None = None,
    extra_callbacks: Iterable[PublishCallback] = (),
) -> dict[str, float]:
    """`events` appends from `appenders` concurrent appenders (each appending its own subject's
    versions in order), until the sequencer has published them all. Raises CallbackFailed as
    soon as a publish callback raises or the sequencer logs an error."""
    store = LogStore(client[f"bench_{uuid.uuid4().hex[:8]}"], origin="bench.rxledger/log")
    log = TransparencyLog(
        store, signer, LogSettings(anchor=AnchorSettings(interval=1.0, max_leaves=1000))
    )
    per = events // appenders
    total_events = per * appenders
    started: dict[object, float] = {}
    acked: dict[object, float] = {}
    published: dict[object, float] = {}
    done = asyncio.Event()
    failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_publish(size: int, root: bytes, entries: list[dict[str, Any]]) -> None:
        now = time.perf_counter()
        for entry in entries:
            published[entry["event"]] = now
        if size >= total_events:
            done.set()

    for callback in (on_publish, *extra_callbacks):
        log.sequencer.on_publish.append(_guarded(callback, failed))
    watcher = _FailOnError(failed)
    logging.getLogger("rxledger.sequencer").addHandler(watcher)

    async def appender(k: int) -> None:
        for v in range(1, per + 1):
            t = time.perf_counter()
            r = await log.append(
                f"rx-{k}",
                v,
                {
                    "v": 1,
                    "subject": f"rx-{k}",
                    "version": v,
                    "type": "BENCH",
                    "payloadDigest": "x" * 44,
                },
            )
            acked[r.event_id] = time.perf_counter()
            started[r.event_id] = t

    try:
        await log.start()
        start = time.perf_counter()
        writes0 = WRITES.writes
        cpu0, server_cpu0, mem0 = cpu_seconds(), cpu_seconds(server_pid), rss_mib()
        appending = asyncio.ensure_future(asyncio.gather(*[appender(k) for k in range(appenders)]))
        waiting = asyncio.ensure_future(done.wait())
        for step in (appending, waiting):
            await asyncio.wait({step, failed}, return_when=asyncio.FIRST_COMPLETED)
            if failed.done():
                appending.cancel()
                waiting.cancel()
                await asyncio.gather(appending, waiting, return_exceptions=True)
                failed.result()  # raises CallbackFailed
            if step is appending:
                appended = time.perf_counter() - start
                appending.result()  # an append that raised fails the run
        total = time.perf_counter() - start
        writes = WRITES.writes - writes0
        cpu, server_cpu, mem1 = (
            cpu_seconds() - cpu0,
            cpu_seconds(server_pid) - server_cpu0,
            rss_mib(),
        )
    finally:
        logging.getLogger("rxledger.sequencer").removeHandler(watcher)
        await log.stop()
        await client.drop_database(store.db.name)
    merge = [max(0.0, published[e] - t) for e, t in acked.items() if e in published]
    whole = [published[e] - t for e, t in started.items() if e in published]
    return {
        "events": total_events,
        "append_rate": total_events / appended,
        "sequenced_rate": total_events / total,
        "writes_per_1000": writes * 1000 / total_events,
        "merge_p50_ms": pct(merge, 0.5) * 1000,
        "merge_p99_ms": pct(merge, 0.99) * 1000,
        "latency_p50_ms": pct(whole, 0.5) * 1000,
        "latency_p99_ms": pct(whole, 0.99) * 1000,
        "cores": cpu / total,
        "server_cores": server_cpu / total,
        "rss_before": mem0,
        "rss_after": mem1,
    }


CEILING_BATCH = 1000  # Tessera's batching in bench/tessera: at most 1,000 entries ...
CEILING_WAIT = 0.005  # ... or 5 ms


async def bench_storage_ceiling(
    client: AsyncMongoClient[dict[str, Any]], events: int, appenders: int
) -> dict[str, float]:
    """`events` appends from `appenders` concurrent appenders into a batcher that writes each
    batch (at most CEILING_BATCH entries, or what came within CEILING_WAIT) as one insert_many
    of documents shaped as our entries, and acknowledges its appends when it returns: the
    fastest a log keeping one document per entry could acknowledge on this server."""
    coll = client[f"bench_ceiling_{uuid.uuid4().hex[:8]}"]["entries"]
    per = events // appenders
    total = per * appenders
    queue: list[tuple[bytes, asyncio.Future[None]]] = []
    arrived = asyncio.Event()
    latencies: list[float] = []
    written = 0

    async def batcher() -> None:
        nonlocal written
        while written < total:
            await arrived.wait()
            deadline = time.perf_counter() + CEILING_WAIT
            while len(queue) < CEILING_BATCH and time.perf_counter() < deadline:
                await asyncio.sleep(0.0005)
            batch, queue[:] = queue[:CEILING_BATCH], queue[CEILING_BATCH:]
            if not queue:
                arrived.clear()
            docs = [
                {"_id": written + i, "event": f"e{written + i}", "leaf": Binary(leaf)}
                for i, (leaf, _) in enumerate(batch)
            ]
            await coll.insert_many(docs, ordered=False)
            written += len(batch)
            for _, future in batch:
                future.set_result(None)

    async def appender(k: int) -> None:
        loop = asyncio.get_running_loop()
        for v in range(per):
            t = time.perf_counter()
            future: asyncio.Future[None] = loop.create_future()
            queue.append(
                (b'{"subject":"rx-%d","version":%d,"pad":"%s"}' % (k, v, b"x" * 90), future)
            )
            arrived.set()
            await future
            latencies.append(time.perf_counter() - t)

    try:
        start = time.perf_counter()
        writes0 = WRITES.writes
        await asyncio.gather(batcher(), *(appender(k) for k in range(appenders)))
        seconds = time.perf_counter() - start
        writes = WRITES.writes - writes0
    finally:
        await client.drop_database(coll.database.name)
    return {
        "events": total,
        "rate": total / seconds,
        "writes_per_1000": writes * 1000 / total,
        "p50_ms": pct(latencies, 0.5) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
    }


def build_tessera() -> Path:
    """var/bin/tessera-bench, built from bench/tessera unless built from these very sources
    (a stamp beside it holds their digest). Raises TesseraUnavailable saying what failed."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((TESSERA_SOURCE / name).read_bytes())
    stamp = TESSERA_BINARY.with_name(TESSERA_BINARY.name + ".stamp")
    if TESSERA_BINARY.exists() and stamp.exists() and stamp.read_text() == digest.hexdigest():
        return TESSERA_BINARY
    go = shutil.which("go")
    if go is None:
        raise TesseraUnavailable(
            "the Go toolchain is not on PATH: the baseline is built with `go build` from "
            "bench/tessera (Go >= 1.26; or run with --no-tessera)"
        )
    TESSERA_BINARY.parent.mkdir(parents=True, exist_ok=True)
    print("building bench/tessera (Tessera v1.0.4 from the Go module proxy)...", file=sys.stderr)
    try:
        built = subprocess.run(
            [go, "build", "-o", str(TESSERA_BINARY), "."],
            cwd=TESSERA_SOURCE,
            env={**os.environ, "GOFLAGS": "-mod=readonly -buildvcs=false"},
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        raise TesseraUnavailable(
            "`go build` of bench/tessera took over 10 minutes (is the Go module proxy reachable?)"
        ) from None
    if built.returncode != 0:
        raise TesseraUnavailable(
            f"`go build` of bench/tessera failed (exit {built.returncode}):\n{built.stderr[-3000:]}"
        )
    stamp.write_text(digest.hexdigest())
    return TESSERA_BINARY


async def bench_tessera(binary: Path, events: int, appenders: int) -> dict[str, Any]:
    """One run of Tessera's POSIX log in a fresh temporary directory; its JSON summary."""
    with tempfile.TemporaryDirectory(prefix="rxbench-tessera-") as tmp:
        proc = await asyncio.create_subprocess_exec(
            str(binary),
            "-dir",
            str(Path(tmp) / "log"),
            "-entries",
            str(events),
            "-appenders",
            str(appenders),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    if proc.returncode != 0:
        raise TesseraUnavailable(
            f"{binary} exited {proc.returncode}:\n{err.decode(errors='replace')[-3000:]}"
        )
    result: dict[str, Any] = json.loads(out)
    if result["size"] != result["entries"]:
        raise TesseraUnavailable(f"Tessera integrated {result['size']} of {result['entries']}")
    return result


async def build_tree(
    client: AsyncMongoClient[dict[str, Any]], size: int
) -> tuple[LogStore, TileReader, list[float]]:
    """Build a tree of `size` leaves through the sequencer's own integrate+publish step
    (tiles and head, without the ledger), recording RSS as it grows."""
    store = LogStore(client[f"benchp_{uuid.uuid4().hex[:8]}"], origin="bench.rxledger/proofs")
    seq = Sequencer(store)
    assert await seq.acquire_lease()
    await seq.recover()
    rss = []
    chunk = 16384
    done = 0
    while done < size:
        n = min(chunk, size - done)
        await seq._integrate_and_publish(
            [
                {"_id": done + i, "event": done + i, "leaf": Binary(b"leaf-%d" % (done + i))}
                for i in range(n)
            ]
        )
        done += n
        rss.append(rss_mib())
        print(f"\r  building tree: {done}/{size}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return store, seq.reader, rss


async def bench_proofs(
    store: LogStore, size: int, seconds: float, reader: TileReader | None = None
) -> tuple[float, float]:
    """Proofs per second and database queries per proof; a fresh uncached reader by default."""
    reader = reader or TileReader(store, cache_tiles=0)
    rng = random.Random(7)
    n, start = 0, time.perf_counter()
    reads_before = reader.reads
    while time.perf_counter() - start < seconds:
        await inclusion_proof(reader, rng.randrange(size), size, size)
        n += 1
    elapsed = time.perf_counter() - start
    return n / elapsed, (reader.reads - reads_before) / n


async def run(args: argparse.Namespace) -> None:
    counts = [int(k) for k in args.appenders.split(",") if k]
    tessera = None if args.no_tessera else build_tessera()
    print(load_average() + " (start)")
    server = None
    uri = os.environ.get("MONGODB_URI")
    with tempfile.TemporaryDirectory(prefix="rxbench-") as tmp:
        if not uri:
            import devdb

            server = devdb.start_ferretdb(Path(tmp) / "db", log_path=Path(tmp) / "ferretdb.log")
            uri = server.uri
            print(f"server: FerretDB (SQLite, patched) started for this run at {uri}")
        else:
            print(f"server: {uri}")
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri, tz_aware=True, event_listeners=[WRITES]
        )
        signer = Signer("bench.rxledger", Ed25519PrivateKey.generate())
        try:
            base = leaf_hash_rate()
            print(f"baseline: raw SHA-256 leaf hashes: {base:,.0f}/s (one core)")
            for k in counts:
                await bench_pair(client, signer, args.events, k, tessera, server)
            await bench_proof_sizes(client, args)
        finally:
            await client.close()
            if server is not None:
                server.stop()
    print(load_average() + " (end)")


async def bench_pair(
    client: AsyncMongoClient[dict[str, Any]],
    signer: Signer,
    events: int,
    appenders: int,
    tessera: Path | None,
    server: Any,
) -> None:
    a = await bench_append(client, signer, events, appenders, server and server.pid)
    print(
        f"rxledger: {a['events']} events by {appenders} appenders: "
        f"acknowledged {a['append_rate']:,.0f}/s, sequenced {a['sequenced_rate']:,.0f}/s "
        f"(sequenced/acknowledged {a['sequenced_rate'] / a['append_rate']:.2f}); "
        f"append -> published p50 {a['latency_p50_ms']:.1f} ms, p99 {a['latency_p99_ms']:.1f} ms; "
        f"cores: ours {a['cores']:.2f}, server {a['server_cores']:.2f}; "
        f"write commands per 1,000 events {a['writes_per_1000']:.0f}; "
        f"RSS {a['rss_before']:.0f} -> {a['rss_after']:.0f} MiB"
    )
    print(
        f"  merge delay (ack -> published): p50 {a['merge_p50_ms']:.1f} ms, "
        f"p99 {a['merge_p99_ms']:.1f} ms"
    )
    c = await bench_storage_ceiling(client, events, appenders)
    print(
        f"ceiling: {c['events']} entries by {appenders} appenders, batched as Tessera batches, "
        f"one insert_many per batch: acknowledged {c['rate']:,.0f}/s, "
        f"latency p50 {c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms; "
        f"write commands per 1,000 entries {c['writes_per_1000']:.0f}"
    )
    print(f"  ratio sequenced/ceiling: {a['sequenced_rate'] / c['rate']:.2f}x")
    if tessera is None:
        return
    t = await bench_tessera(tessera, events, appenders)
    print(
        f"tessera: {t['entries']} entries by {appenders} appenders: integrated {t['rate']:,.0f}/s, "
        f"latency p50 {t['p50_ms']:.1f} ms, p99 {t['p99_ms']:.1f} ms; "
        f"cores {t['cpu_seconds'] / t['seconds']:.2f}"
    )
    print(
        f"  ratio ceiling/tessera: {c['rate'] / t['rate']:.2f}x (one document per entry on "
        "this server, against Tessera's files)"
    )
    print(
        f"  ratio sequenced/tessera: {a['sequenced_rate'] / t['rate']:.2f}x; "
        f"append -> published p99 / tessera latency p99: "
        f"{a['latency_p99_ms'] / t['p99_ms']:.1f}x; {load_average()}"
    )


async def bench_proof_sizes(
    client: AsyncMongoClient[dict[str, Any]], args: argparse.Namespace
) -> None:
    rates: dict[int, tuple[float, float]] = {}
    for size in [int(s) for s in args.sizes.split(",") if s]:
        store, warm_reader, rss = await build_tree(client, size)
        cold, reads = await bench_proofs(store, size, args.proof_seconds)
        warm, warm_reads = await bench_proofs(store, size, args.proof_seconds, warm_reader)
        rates[size] = (cold, warm)
        print(
            f"proofs at {size:,} leaves: {cold:,.1f}/s from storage ({reads:.1f} queries/proof), "
            f"{warm:,.1f}/s from the sequencer's tile cache ({warm_reads:.2f} queries/proof); "
            f"RSS while building: {rss[0]:.0f} -> {rss[-1]:.0f} MiB (tile cache <= 32 MiB)"
        )
        await client.drop_database(store.db.name)
    if len(rates) >= 2:
        small, large = min(rates), max(rates)
        print(
            f"proof cost ratio {large:,} vs {small:,} leaves: "
            f"{rates[small][0] / rates[large][0]:.2f}x from storage, "
            f"{rates[small][1] / rates[large][1]:.2f}x from the tile cache"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--events", type=int, default=20000, help="events to append (default %(default)s)"
    )
    parser.add_argument(
        "--appenders",
        default="64,512",
        help="numbers of concurrent appenders, one run each (default %(default)s)",
    )
    parser.add_argument(
        "--sizes", default="10000,1000000", help="tree sizes for the proof benchmark"
    )
    parser.add_argument(
        "--proof-seconds", type=float, default=3.0, help="time per proof measurement"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=3600.0,
        help="stop (exit status 2) after this many seconds (default %(default)s)",
    )
    parser.add_argument("--no-tessera", action="store_true", help="skip the Tessera baseline")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # A last resort should the event loop itself stop turning: dump every stack and exit.
    faulthandler.dump_traceback_later(args.deadline + 60, exit=True)
    try:
        asyncio.run(asyncio.wait_for(run(args), args.deadline))
    except TimeoutError:
        print(
            f"bench/ledger.py: the deadline of {args.deadline:g} s passed; stopped", file=sys.stderr
        )
        return 2
    except TesseraUnavailable as exc:
        print(f"bench/ledger.py: the Tessera baseline is unavailable: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
