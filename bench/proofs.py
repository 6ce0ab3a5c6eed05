"""Proofs from storage, cold cache: inclusion proofs per second at 10^4 and 10^6 leaves.

Runs against MONGODB_URI, or starts its own FerretDB in a temporary directory. For each size
in --sizes it builds a log of that many leaves in a database of its own, in bulk through the
sequencer's own integrate-and-publish step (`Sequencer._integrate_and_publish`: the compact
range, the tiles it completes and the fenced head update, CHUNK leaves per call; entries and
the ledger are not written, since a proof reads only tiles), then measures for DURATION
seconds, with CONCURRENCY concurrent provers:

  baseline  one `find_one({"_id": key})` of a random stored tile: the cheapest read of the
            storage a proof can make (a proof at these sizes needs one to three tiles)
  proofs    `anchoring.proofs.inclusion_proof` of a random leaf in the full tree, each through
            a fresh `TileReader` with no cache (cold: every tile from the database); each
            proof is checked against the tree's root

Prints, per size, proofs/s, latency p50/p99, storage round trips per proof, reads/s of the
baseline and the ratio; then the ratio of the proof rate at the smallest size to that at the
largest, and the targets (>= 2,000 proofs/s at the largest size, within 1.5x of the smallest),
met or NOT MET, with the load average. Lines to parse: `figure: NAME = VALUE`,
`ratio: NAME = VALUE`, `target: NAME: met|NOT MET`. Not a test: slow figures never fail the
run. Exit 1 when a proof did not verify, 2 when the server did not start, 130 on Ctrl-C.

    .venv/bin/python bench/proofs.py [--sizes 10000,1000000] [--duration 5] [--concurrency 16]
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bson import Binary
from pymongo import AsyncMongoClient

ROOT = Path(__file__).resolve().parent.parent
# bench/graphql.py would shadow graphql-core: keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from anchoring.hashing import leaf_hash  # noqa: E402
from anchoring.proofs import inclusion_proof  # noqa: E402
from anchoring.sequencer import Sequencer  # noqa: E402
from anchoring.store import LogStore  # noqa: E402
from anchoring.tiles import TileReader  # noqa: E402
from anchoring.verify import VerificationError, verify_inclusion  # noqa: E402
from bench.processes import (  # noqa: E402
    Broken,
    copy_logs,
    describe_server,
    drop_databases,
    pct,
    progress,
    start_database,
    terminated_by_sigterm,
)

RATE_TARGET = 2000.0  # proofs/s at the largest size
GROWTH_TARGET = 1.5  # proof rate at the smallest size / at the largest
CHUNK = 16384  # leaves per integrate-and-publish call


def leaf(i: int) -> bytes:
    """A leaf of about the size of a prescription event's header."""
    return b'{"subject":"rx_bench_%012d","version":1,"type":"ISSUED","pad":"%s"}' % (
        i,
        b"x" * 200,
    )


@dataclass
class Figures:
    size: int
    build_seconds: float = 0.0
    tiles: int = 0
    proofs: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    reads: int = 0
    baseline_reads: int = 0
    baseline_seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.proofs / self.seconds if self.seconds else float("nan")

    @property
    def baseline_rate(self) -> float:
        return self.baseline_reads / self.baseline_seconds if self.baseline_seconds else 0.0


async def build(store: LogStore, size: int) -> tuple[bytes, float]:
    """A tree of `size` leaves through the sequencer's integrate-and-publish step; returns its
    root and the seconds it took."""
    started = time.perf_counter()
    sequencer = Sequencer(store)
    if not await sequencer.acquire_lease():
        raise Broken(f"no sequencer lease on {store.db.name}")
    await sequencer.recover()
    done, last = 0, time.perf_counter()
    while done < size:
        n = min(CHUNK, size - done)
        entries = [
            {"_id": done + i, "event": done + i, "leaf": Binary(leaf(done + i))} for i in range(n)
        ]
        await sequencer._integrate_and_publish(entries)
        done += n
        if time.perf_counter() - last > 5 or done == size:
            last = time.perf_counter()
            progress(f"  built {done:,}/{size:,} leaves ({done / (last - started):,.0f}/s)")
    await sequencer.release_lease()
    return sequencer.root, time.perf_counter() - started


async def measure(
    store: LogStore,
    figures: Figures,
    root: bytes,
    duration: float,
    concurrency: int,
    seed: int,
) -> None:
    size = figures.size
    keys = [d["_id"] async for d in store.tiles.find({}, {"_id": 1})]
    figures.tiles = len(keys)

    async def baseline(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            if await store.tiles.find_one({"_id": rng.choice(keys)}) is None:
                figures.failures.append("a stored tile went missing")
            figures.baseline_reads += 1

    progress(f"  baseline: find_one of a random tile, {concurrency} concurrent, {duration:g} s")
    started = time.perf_counter()
    await asyncio.gather(*(baseline(k) for k in range(concurrency)))
    figures.baseline_seconds = time.perf_counter() - started

    async def prover(k: int) -> None:
        rng = random.Random(seed * 2000 + k)
        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            index = rng.randrange(size)
            reader = TileReader(store, cache_tiles=0)
            t0 = time.perf_counter()
            path = await inclusion_proof(reader, index, size, size)
            figures.latencies.append(time.perf_counter() - t0)
            figures.reads += reader.reads
            figures.proofs += 1
            try:
                verify_inclusion(index, size, leaf_hash(leaf(index)), path, root)
            except VerificationError as exc:
                figures.failures.append(f"leaf {index}: {exc}")

    progress(f"  proofs: cold cache, {concurrency} concurrent provers, {duration:g} s")
    started = time.perf_counter()
    await asyncio.gather(*(prover(k) for k in range(concurrency)))
    figures.seconds = time.perf_counter() - started


async def run(
    uri: str, sizes: list[int], duration: float, concurrency: int, seed: int, names: list[str]
) -> list[Figures]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
    results = []
    try:
        for size in sizes:
            name = f"bench_proofs_{uuid.uuid4().hex[:8]}"
            names.append(name)
            store = LogStore(client[name], origin="bench.rxledger/proofs")
            await store.ensure_indexes()
            figures = Figures(size)
            progress(f"size {size:,}: building the tree in {name} ...")
            root, figures.build_seconds = await build(store, size)
            await measure(store, figures, root, duration, concurrency, seed)
            progress(
                f"  {figures.rate:,.0f} proofs/s (baseline {figures.baseline_rate:,.0f} reads/s)"
            )
            results.append(figures)
    finally:
        await client.close()
    return results


def report(
    results: list[Figures], server: str, concurrency: int, duration: float, loads: list[Any]
) -> None:
    print()
    print("rxledger inclusion proofs from storage, cold cache (a fresh uncached TileReader each)")
    print(f"server:   {server}")
    print(
        f"machine:  {os.cpu_count()} CPUs shared by this process, the server and other work; "
        f"load average (1/5/15 min) {'/'.join(f'{x:.2f}' for x in loads[0])} -> "
        f"{'/'.join(f'{x:.2f}' for x in loads[-1])}; Python {platform.python_version()}"
    )
    print(f"provers:  {concurrency} concurrent (asyncio, one process), {duration:g} s per figure")
    print()
    row = "{:>10} {:>8} {:>10} {:>14} {:>12} {:>15} {:>9}"
    print(
        row.format(
            "leaves", "tiles", "proofs/s", "p50 / p99 ms", "reads/proof", "baseline rd/s", "ratio"
        )
    )
    for f in results:
        reads = f.reads / f.proofs if f.proofs else float("nan")
        ratio = f.rate / f.baseline_rate if f.baseline_rate else float("nan")
        print(
            row.format(
                f"{f.size:,}",
                f"{f.tiles:,}",
                f"{f.rate:,.1f}",
                f"{pct(f.latencies, 0.5) * 1000:,.1f} / {pct(f.latencies, 0.99) * 1000:,.1f}",
                f"{reads:.2f}",
                f"{f.baseline_rate:,.1f}",
                f"{ratio:.3f}",
            )
        )
    print()
    for f in results:
        print(f"figure: build_seconds_{f.size} = {f.build_seconds:.1f}")
        print(f"figure: proofs_per_s_{f.size} = {f.rate:.2f}")
        print(f"figure: proof_p99_ms_{f.size} = {pct(f.latencies, 0.99) * 1000:.2f}")
        print(f"figure: baseline_reads_per_s_{f.size} = {f.baseline_rate:.2f}")
        ratio = f.rate / f.baseline_rate if f.baseline_rate else float("nan")
        print(f"ratio: proofs_vs_baseline_reads_{f.size} = {ratio:.3f}")
    small, large = results[0], results[-1]
    growth = small.rate / large.rate if large.rate else float("inf")
    if len(results) > 1:
        print(f"ratio: proofs_{small.size}_vs_{large.size} = {growth:.3f}")
    ok = large.rate >= RATE_TARGET
    print(
        f"target: proofs/s >= {RATE_TARGET:,.0f} at {large.size:,} leaves: "
        f"{'met' if ok else 'NOT MET'} ({large.rate:,.1f})"
    )
    if len(results) > 1:
        ok = growth <= GROWTH_TARGET
        print(
            f"target: proof rate at {large.size:,} within {GROWTH_TARGET}x of {small.size:,}: "
            f"{'met' if ok else 'NOT MET'} ({growth:.2f}x)"
        )
    print(f"figure: load_average = {'/'.join(f'{x:.2f}' for x in loads[-1])}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        default="10000,1000000",
        help="tree sizes in leaves, comma-separated (default %(default)s)",
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per figure (default %(default)s)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="concurrent provers (and baseline readers) (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default %(default)s)")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy FerretDB's log to DIR")
    args = parser.parse_args()
    try:
        args.sizes = sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        parser.error("--sizes: comma-separated integers")
    if not args.sizes or args.sizes[0] < 1:
        parser.error("--sizes needs at least one size >= 1")
    if args.duration <= 0 or args.concurrency < 1:
        parser.error("--duration must be > 0 and --concurrency >= 1")
    return args


def main() -> int:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rxbench-proofs-"))
    ferret = None
    uri = None
    names: list[str] = []
    try:
        with terminated_by_sigterm():
            try:
                uri, ferret = start_database(tmp)
                server = describe_server(uri, ferret)
                progress(f"server: {server}")
                loads = [os.getloadavg()]
                results = asyncio.run(
                    run(uri, args.sizes, args.duration, args.concurrency, args.seed, names)
                )
                loads.append(os.getloadavg())
                report(results, server, args.concurrency, args.duration, loads)
                failures = [x for f in results for x in f.failures]
                if failures:
                    print(f"ERRORS: {len(failures)} proofs failed, e.g. {failures[0]}")
                    return 1
                print(f"errors: none ({sum(f.proofs for f in results):,} proofs verified)")
                return 0
            except Broken as exc:
                print(f"benchmark broken: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                progress("interrupted")
                return 130
    finally:
        if ferret is not None:
            ferret.stop()
        elif uri and names:
            with contextlib.suppress(Exception):
                asyncio.run(drop_databases(uri, names))
        if args.keep_logs is not None:
            copy_logs(tmp, args.keep_logs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
