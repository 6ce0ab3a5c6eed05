"""The leaf index of an event, cold process: by position (`_id` lookups) against a read of
`entries` by event.

Runs against MONGODB_URI, or starts its own FerretDB in a temporary directory. Builds a log of
--size entries in a database of its own, in bulk: `entries` {_id: index, event, leaf} inserted
CHUNK at a time, each chunk then through the sequencer's own integrate-and-publish step (tiles,
positions, the fenced head update). Then, --rounds times, for --events random sequenced events:

  baseline   the read before positions: the head, then one query of `entries` by event
             (`{event: {$in: ids}}`), what `TransparencyLog.leaf_indices` sent for a cold cache
  positions  `TransparencyLog.leaf_indices` of a fresh TransparencyLog (nothing cached): the
             head, then the events' positions by `_id`

Both answers are checked against the indices the build assigned. Prints the median and the
worst of each, and their ratio (baseline / positions). Lines to parse: `figure: NAME = VALUE`,
`ratio: NAME = VALUE`. Not a test: slow figures never fail the run. Exit 1 when an answer was
wrong, 2 when the server did not start, 130 on Ctrl-C.

    .venv/bin/python bench/leaf_index.py [--size 100000] [--events 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bson import Binary, ObjectId
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymongo import AsyncMongoClient

ROOT = Path(__file__).resolve().parent.parent
# bench/graphql.py would shadow graphql-core: keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from anchoring.log import TransparencyLog  # noqa: E402
from anchoring.note import Signer  # noqa: E402
from anchoring.sequencer import Sequencer  # noqa: E402
from anchoring.store import LogStore, one_of  # noqa: E402
from bench.processes import (  # noqa: E402
    Broken,
    describe_server,
    drop_databases,
    progress,
    start_database,
    terminated_by_sigterm,
)

CHUNK = 8192  # entries per insert and integrate-and-publish call


def leaf(i: int) -> bytes:
    """A leaf of about the size of a prescription event's header."""
    return b'{"subject":"rx_bench_%012d","version":1,"type":"ISSUED","pad":"%s"}' % (
        i,
        b"x" * 200,
    )


async def build(store: LogStore, events: list[ObjectId]) -> float:
    """Entries for `events` (event i at index i), tiles, positions and the head; seconds."""
    started = time.perf_counter()
    sequencer = Sequencer(store)
    if not await sequencer.acquire_lease():
        raise Broken(f"no sequencer lease on {store.db.name}")
    await sequencer.recover()
    for first in range(0, len(events), CHUNK):
        entries = [
            {"_id": i, "event": events[i], "leaf": Binary(leaf(i))}
            for i in range(first, min(first + CHUNK, len(events)))
        ]
        await store.entries.insert_many(entries, ordered=True)
        await sequencer._integrate_and_publish(entries)
        progress(f"  built {sequencer.size:,}/{len(events):,} entries")
    await sequencer.release_lease()
    return time.perf_counter() - started


async def baseline(store: LogStore, ids: list[ObjectId]) -> dict[Any, int]:
    """The cold read before positions."""
    size = int((await store.head()).get("size", 0))
    cursor = store.entries.find(one_of("event", ids), {"event": 1})
    return {d["event"]: int(d["_id"]) async for d in cursor if d["_id"] < size}


async def run(uri: str, args: argparse.Namespace, names: list[str]) -> dict[str, list[float]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, tz_aware=True)
    rng = random.Random(args.seed)
    times: dict[str, list[float]] = {"baseline": [], "positions": [], "build": []}
    try:
        name = f"bench_leaf_index_{uuid.uuid4().hex[:8]}"
        names.append(name)
        store = LogStore(client[name], origin="bench.rxledger/leaf-index")
        await store.ensure_indexes()
        events = [ObjectId() for _ in range(args.size)]
        progress(f"building {args.size:,} entries in {name} ...")
        times["build"].append(await build(store, events))
        signer = Signer("bench.rxledger", Ed25519PrivateKey.generate())
        for r in range(args.rounds):
            picked = rng.sample(range(args.size), min(args.events, args.size))
            ids = [events[i] for i in picked]
            want = {events[i]: i for i in picked}
            for kind in ("positions", "baseline") if r % 2 else ("baseline", "positions"):
                t0 = time.perf_counter()
                if kind == "baseline":
                    got = await baseline(store, ids)
                else:
                    got = await TransparencyLog(store, signer).leaf_indices(ids)
                times[kind].append(time.perf_counter() - t0)
                if got != want:
                    raise AssertionError(f"{kind}: wrong indices for round {r}")
            progress(
                f"  round {r + 1}: baseline {times['baseline'][-1] * 1000:,.1f} ms, "
                f"positions {times['positions'][-1] * 1000:,.1f} ms"
            )
    finally:
        await client.close()
    return times


def report(
    times: dict[str, list[float]], args: argparse.Namespace, server: str, loads: list[Any]
) -> None:
    print()
    print(f"rxledger leaf index of {args.events} events, cold process, {args.size:,} entries")
    print(f"server:   {server}")
    print(
        f"machine:  {os.cpu_count()} CPUs shared with other work; load average (1/5/15 min) "
        f"{'/'.join(f'{x:.2f}' for x in loads[0])} -> {'/'.join(f'{x:.2f}' for x in loads[-1])}"
    )
    print(f"rounds:   {args.rounds}, alternating which read goes first")
    print()
    for kind in ("baseline", "positions"):
        median = statistics.median(times[kind]) * 1000
        print(f"{kind:>10}: median {median:,.2f} ms, worst {max(times[kind]) * 1000:,.2f} ms")
    print()
    base, pos = (statistics.median(times[k]) for k in ("baseline", "positions"))
    print(f"figure: build_seconds = {times['build'][0]:.1f}")
    print(f"figure: baseline_ms = {base * 1000:.3f}")
    print(f"figure: positions_ms = {pos * 1000:.3f}")
    print(f"ratio: baseline_vs_positions = {base / pos:.3f}")
    print(f"figure: load_average = {'/'.join(f'{x:.2f}' for x in loads[-1])}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=100_000, help="entries (default %(default)s)")
    parser.add_argument("--events", type=int, default=20, help="events per read (%(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="reads of each kind (%(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default %(default)s)")
    args = parser.parse_args()
    if args.size < 1 or args.events < 1 or args.rounds < 1:
        parser.error("--size, --events and --rounds must be >= 1")
    return args


def main() -> int:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rxbench-leaf-index-"))
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
                times = asyncio.run(run(uri, args, names))
                loads.append(os.getloadavg())
                report(times, args, server, loads)
                print("errors: none")
                return 0
            except AssertionError as exc:
                print(f"ERRORS: {exc}")
                return 1
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


if __name__ == "__main__":
    sys.exit(main())
