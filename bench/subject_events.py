"""A prescription's ledger events against ledger size: by derived `_id` against by subject.

The ledger part of a `prescription(id)` read: `PrescriptionService.ledger_events([rid])`, which
reads the prescription's events by their `_id`s (derived from (subject, version)) where only
`_id` equalities are index-backed (FerretDB), and by `subject` on MongoDB. The baseline, in the
same run on the same data, is the read as it was before the `_id`s were derived: one query by
`subject` (what RXLEDGER_STORAGE_DIALECT=mongodb makes it on any server).

Runs against MONGODB_URI, or starts its own FerretDB in a temporary directory. For each size in
--sizes (ascending; one ledger grows from one size to the next) it writes SIZE prescriptions of
--versions events each straight into `ledger` (ledger documents as appends make them; no log is
needed for this read), then times READS reads of random prescriptions one at a time, after one
untimed warm-up, both ways, and checks both return the same events. Prints medians and the
ratio of the baseline's median to the `_id` read's (how many times faster), and the load
average. Not a test: slow figures never fail the run. Exit 1 when the two reads disagree, 2
when the server does not start.

    .venv/bin/python bench/subject_events.py [--sizes 1000,10000] [--versions 2] [--reads 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# bench/graphql.py would shadow graphql-core: keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from pymongo import AsyncMongoClient  # noqa: E402
from pymongo.asynchronous.collection import AsyncCollection  # noqa: E402

from anchoring.dialect import ENV_DIALECT, Dialect  # noqa: E402
from anchoring.ledger import events_of, make_event  # noqa: E402
from anchoring.store import LOG_INDEXES, Doc, create_indexes  # noqa: E402
from app.service import EVENT_FIELDS  # noqa: E402
from bench.processes import Broken, progress, redacted_uri, start_database  # noqa: E402

BATCH = 5_000  # ledger documents per insert_many


async def fill(ledger: AsyncCollection[Doc], start: int, end: int, versions: int) -> None:
    """Prescriptions start..end-1, `versions` events each, as appends store them."""
    docs: list[Doc] = []
    for i in range(start, end):
        rid = f"rx_{i:08d}"
        for v in range(1, versions + 1):
            header = {"v": 1, "subject": rid, "version": v, "type": "BENCH", "n": i}
            data = {"actor": {"role": "PRESCRIBER", "sub": "dr-bench"}, "state": {"pad": "x" * 600}}
            docs.append(make_event(rid, v, header, data)[0])
        if len(docs) >= BATCH:
            await ledger.insert_many(docs, ordered=False)
            docs = []
    if docs:
        await ledger.insert_many(docs, ordered=False)


async def timed_reads(
    ledger: AsyncCollection[Doc], rids: list[str], versions: int, dialect: Dialect
) -> tuple[list[float], list[list[Any]]]:
    """Latencies (ms) of reading each prescription's events with `dialect`, and what was read."""
    os.environ[ENV_DIALECT] = dialect.value
    times, found = [], []
    for k, rid in enumerate(rids):
        start = time.perf_counter()
        events = (await events_of(ledger, [rid], EVENT_FIELDS, {rid: versions}))[rid]
        if k:  # the first is the warm-up
            times.append((time.perf_counter() - start) * 1000)
        found.append([e["_id"] for e in events])
    return times, found


async def run(uri: str, sizes: list[int], versions: int, reads: int, seed: int) -> int:
    rng = random.Random(seed)
    client: AsyncMongoClient[Doc] = AsyncMongoClient(uri, tz_aware=True)
    db_name = f"bench_subject_{uuid.uuid4().hex[:8]}"
    ledger = client[db_name]["ledger"]
    rows: list[tuple[int, float, float]] = []
    try:
        await create_indexes(ledger, LOG_INDEXES["ledger"])
        filled = 0
        for size in sizes:
            progress(f"writing prescriptions {filled}..{size - 1}, {versions} events each ...")
            started = time.perf_counter()
            await fill(ledger, filled, size, versions)
            filled = size
            progress(f"  {time.perf_counter() - started:.1f} s; timing {reads} reads each way")
            rids = [f"rx_{rng.randrange(size):08d}" for _ in range(reads + 1)]
            by_id, ours = await timed_reads(ledger, rids, versions, Dialect.FERRETDB)
            by_subject, theirs = await timed_reads(ledger, rids, versions, Dialect.MONGODB)
            if ours != theirs or any(len(ids) != versions for ids in ours):
                print(f"size {size}: the two reads disagree", file=sys.stderr)
                return 1
            rows.append((size, statistics.median(by_id), statistics.median(by_subject)))
            progress(f"  by _id {rows[-1][1]:.2f} ms, by subject {rows[-1][2]:.2f} ms (medians)")
    finally:
        await client.drop_database(db_name)
        await client.close()
    print(
        f"server: {'MONGODB_URI ' + redacted_uri(uri) if os.environ.get('MONGODB_URI') else 'FerretDB var/bin/ferretdb (patched)'}; "
        f"{versions} events per prescription; median of {reads} reads of one prescription's events"
    )
    print(f"{'prescriptions':>14}{'events':>10}{'by _id':>14}{'by subject':>14}{'ratio':>9}")
    for size, ours_ms, theirs_ms in rows:
        print(
            f"{size:>14}{size * versions:>10}{ours_ms:>11.2f} ms{theirs_ms:>11.2f} ms"
            f"{theirs_ms / ours_ms:>8.1f}x"
        )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sizes",
        default="1000,10000",
        help="prescriptions, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--versions", type=int, default=2, help="events per prescription (2)")
    parser.add_argument("--reads", type=int, default=15, help="timed reads per way and size (15)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if sizes != sorted(sizes) or sizes[0] < 1 or args.versions < 1 or args.reads < 1:
        parser.error("sizes must be ascending and >= 1, --versions and --reads >= 1")
    with tempfile.TemporaryDirectory(prefix="bench-subject-events-") as tmpdir:
        try:
            uri, ferret = start_database(Path(tmpdir))
        except Broken as exc:
            print(f"subject_events: {exc}", file=sys.stderr)
            return 2
        try:
            return asyncio.run(run(uri, sizes, args.versions, args.reads, args.seed))
        finally:
            if ferret is not None:
                ferret.stop()


if __name__ == "__main__":
    sys.exit(main())
