"""Ledger benchmark: append+sequence throughput, merge delay, proof rate, sequencer memory.

Runs against MONGODB_URI, or starts its own FerretDB in a temporary directory. Prints figures
and ratios against the raw SHA-256 leaf-hash rate measured in the same run. Not a test: it
never fails on a figure.

    .venv/bin/python bench/ledger.py [--events 20000] [--appenders 64] [--sizes 10000,1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bson import Binary
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymongo import AsyncMongoClient

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


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def leaf_hash_rate(seconds: float = 1.0) -> float:
    leaf = os.urandom(200)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10000):
            hashlib.sha256(b"\x00" + leaf).digest()
        n += 10000
    return n / (time.perf_counter() - start)


async def bench_append(
    client: AsyncMongoClient, signer: Signer, events: int, appenders: int
) -> dict[str, float]:
    store = LogStore(client[f"bench_{uuid.uuid4().hex[:8]}"], origin="bench.rxledger/log")
    log = TransparencyLog(
        store, signer, LogSettings(anchor=AnchorSettings(interval=1.0, max_leaves=1000))
    )
    per = events // appenders
    total_events = per * appenders
    acked: dict[object, float] = {}
    delays: list[float] = []
    done = asyncio.Event()

    def on_publish(size: int, root: bytes, ids: list[object]) -> None:
        now = time.perf_counter()
        for event_id in ids:
            t = acked.pop(event_id, None)
            if t is not None:
                delays.append(now - t)
        if size >= total_events:
            done.set()

    log.sequencer.on_publish.append(on_publish)
    await log.start()

    async def appender(k: int) -> None:
        for v in range(1, per + 1):
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

    start = time.perf_counter()
    mem0 = rss_mib()
    await asyncio.gather(*[appender(k) for k in range(appenders)])
    appended = time.perf_counter() - start
    await asyncio.wait_for(done.wait(), 600)
    total = time.perf_counter() - start
    mem1 = rss_mib()
    await log.stop()
    await client.drop_database(store.db.name)
    n = total_events
    return {
        "events": n,
        "append_rate": n / appended,
        "sequenced_rate": n / total,
        "merge_p50_ms": pct(delays, 0.5) * 1000,
        "merge_p99_ms": pct(delays, 0.99) * 1000,
        "rss_before": mem0,
        "rss_after": mem1,
    }


async def build_tree(
    client: AsyncMongoClient, size: int
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


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--events", type=int, default=20000, help="events to append (default %(default)s)"
    )
    parser.add_argument(
        "--appenders", type=int, default=64, help="concurrent appenders (default %(default)s)"
    )
    parser.add_argument(
        "--sizes", default="10000,1000000", help="tree sizes for the proof benchmark"
    )
    parser.add_argument(
        "--proof-seconds", type=float, default=3.0, help="time per proof measurement"
    )
    args = parser.parse_args()

    server = None
    uri = os.environ.get("MONGODB_URI")
    if not uri:
        import devdb

        tmp = Path(tempfile.mkdtemp(prefix="rxbench-"))
        server = devdb.start_ferretdb(tmp, log_path=tmp / "ferretdb.log")
        uri = server.uri
        print(f"server: FerretDB (SQLite) started for this run at {uri}")
    else:
        print(f"server: {uri}")
    client: AsyncMongoClient = AsyncMongoClient(uri, tz_aware=True)
    signer = Signer("bench.rxledger", Ed25519PrivateKey.generate())
    try:
        base = leaf_hash_rate()
        print(f"baseline: raw SHA-256 leaf hashes: {base:,.0f}/s (one core)")
        a = await bench_append(client, signer, args.events, args.appenders)
        print(
            f"append+sequence: {a['events']} events by {args.appenders} concurrent appenders: "
            f"acknowledged {a['append_rate']:,.0f}/s, sequenced {a['sequenced_rate']:,.0f}/s "
            f"(ratio to hashing: {a['sequenced_rate'] / base:.5f})"
        )
        print(
            f"merge delay (ack -> published): p50 {a['merge_p50_ms']:.1f} ms, p99 {a['merge_p99_ms']:.1f} ms"
        )
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
    finally:
        await client.close()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
