"""Lookups by _id against collection size: is the server's _id index used?

Runs against MONGODB_URI, or starts its own FerretDB in a temporary directory (the binary of
scripts/install-ferretdb.sh, patched; RXLEDGER_FERRETDB=/path/to/ferretdb runs another one,
e.g. an unpatched build, for a before/after comparison). For each size it fills one collection
with that many small documents (insert_many in batches; every even document has an int _id,
every odd one a string _id; --pad adds a string of that many bytes to each) and times, one at a
time, LOOKUPS operations on random existing _ids, after one untimed warm-up each:

  find_one str   find_one({"_id": "p0000007"})
  find_one int   find_one({"_id": 6})
  update_one int update_one({"_id": 6}, {"$inc": {"n": 1}})

Prints the median and maximum latency of each at each size, and the ratio of each median to
that at the smallest size, measured in the same run. With an index behind _id the ratios stay
near 1; a collection scan makes them grow with the size (FerretDB's scan stops at the first
match, in insertion order, so its cost also varies with where the key lies). Not a test: slow figures never fail
the run (tests/test_ferretdb_index.py asserts the bound). Exit 2 when the server does not start.

    .venv/bin/python bench/ferretdb_index.py [--sizes 1000,10000,100000] [--lookups 15] [--pad 0]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.collection import Collection

ROOT = Path(__file__).resolve().parent.parent
# bench/graphql.py would shadow graphql-core: keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench.processes import Broken, progress, redacted_uri, start_database  # noqa: E402

BATCH = 10_000  # documents per insert_many


def doc_id(i: int) -> int | str:
    """The _id of the i-th document: i itself when i is even, a string when it is odd."""
    return i if i % 2 == 0 else f"p{i:07d}"


def fill(coll: Collection[dict[str, Any]], size: int, pad: int) -> None:
    extra = {"pad": "x" * pad} if pad else {}
    for start in range(0, size, BATCH):
        coll.insert_many(
            [{"_id": doc_id(i), "n": 0, **extra} for i in range(start, min(size, start + BATCH))],
            ordered=False,
        )


def measure(
    coll: Collection[dict[str, Any]], size: int, lookups: int, rng: random.Random
) -> dict[str, list[float]]:
    """Latencies (ms) of each operation on random existing _ids of a collection of `size`."""
    evens = [2 * rng.randrange(size // 2) for _ in range(lookups + 1)]
    odds = [2 * rng.randrange(size // 2) + 1 for _ in range(lookups + 1)]
    ops: dict[str, Callable[[int], object]] = {
        "find_one str": lambda k: coll.find_one({"_id": doc_id(odds[k])}),
        "find_one int": lambda k: coll.find_one({"_id": evens[k]}),
        "update_one int": lambda k: coll.update_one({"_id": evens[k]}, {"$inc": {"n": 1}}),
    }
    if coll.find_one({"_id": evens[0]}) is None or coll.find_one({"_id": odds[0]}) is not None:
        raise SystemExit(f"size {size}: the int _id {evens[0]} is not found, or {odds[0]} is")
    result: dict[str, list[float]] = {}
    for name, op in ops.items():
        op(0)  # warm-up, not timed
        times = result[name] = []
        for k in range(1, lookups + 1):
            start = time.perf_counter()
            op(k)
            times.append((time.perf_counter() - start) * 1000)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Set RXLEDGER_FERRETDB to measure another FerretDB binary (e.g. an unpatched one).",
    )
    parser.add_argument(
        "--sizes",
        default="1000,10000,100000",
        help="collection sizes, comma-separated; the first is the baseline (default: %(default)s)",
    )
    parser.add_argument(
        "--lookups", type=int, default=15, help="timed operations per kind and size (default 15)"
    )
    parser.add_argument(
        "--pad", type=int, default=0, help="bytes of padding per document (default 0)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(s < 2 for s in sizes) or args.lookups < 1:
        parser.error("sizes must be >= 2 and --lookups >= 1")

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-ferretdb-index-") as tmpdir:
        try:
            uri, ferret = start_database(Path(tmpdir))
        except Broken as exc:
            print(f"ferretdb_index: {exc}", file=sys.stderr)
            return 2
        client: MongoClient[dict[str, Any]] = MongoClient(uri)
        db_name = f"bench_idx_{uuid.uuid4().hex[:8]}"
        medians: dict[int, dict[str, float]] = {}
        try:
            for size in sizes:
                coll = client[db_name][f"docs_{size}"]
                progress(f"inserting {size} documents ...")
                start = time.perf_counter()
                fill(coll, size, args.pad)
                progress(
                    f"  {time.perf_counter() - start:.1f} s; timing {args.lookups} lookups of each kind"
                )
                lat = measure(coll, size, args.lookups, rng)
                medians[size] = {name: statistics.median(v) for name, v in lat.items()}
                for name, values in lat.items():
                    progress(
                        f"  {name:15} median {statistics.median(values):9.2f} ms"
                        f"  max {max(values):9.2f} ms"
                    )
        finally:
            client.drop_database(db_name)
            client.close()
            if ferret is not None:
                ferret.stop()

    binary = os.environ.get("RXLEDGER_FERRETDB") or "var/bin/ferretdb (patched)"
    server = (
        f"MONGODB_URI {redacted_uri(uri)}"
        if os.environ.get("MONGODB_URI")
        else f"FerretDB {binary}"
    )
    base = sizes[0]
    print(
        f"server: {server}; documents of {args.pad} bytes' padding; median of {args.lookups} "
        f"operations; ratio against {base} documents"
    )
    print(f"{'operation':16}" + "".join(f"{size:>22}" for size in sizes))
    for name in medians[base]:
        cells = "".join(
            f"{medians[s][name]:10.2f} ms ({medians[s][name] / medians[base][name]:5.1f}x)"
            for s in sizes
        )
        print(f"{name:16}{cells}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
