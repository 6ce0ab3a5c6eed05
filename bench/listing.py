"""What listing prescriptions costs at 10^4 and 10^5 stored, against a plain find.

Runs against MONGODB_URI, or starts its own FerretDB (patched, scripts/install-ferretdb.sh) in
a temporary directory. For each size it files two prescriptions through the service (one
issued, one dispensed: two ledger events), then stores `size` copies of their documents
straight into the collection (new ids, issue times, patients; half of each status), and times
each of these once per round, one at a time, through `PrescriptionService`:

  plain find          find({}).limit(21): the server's cheapest read of a page (baseline)
  scan                find({"status": "NONE"}): a filter no document matches, which no
                      index serves on FerretDB: what reading the collection once costs there
  page, whole docs    the first page of 20 in issue order, whole documents (a page that
                      selects history or integrity; every page before this change)
  page, projected     the same page without the documents' copy of their events, salt and
                      last leaf hash (a page that selects neither)
  filtered, projected status DISPENSED, the page after a cursor in the middle, projected
  20 by id: equalities the documents of 20 ids by 20 concurrent _id equalities (the
                      storage dialect's read on FerretDB before the patch pushed $in down)
  20 by id: dialect   the same through anchoring.dialect.by_ids (one _id $in, which the
                      patched FerretDB serves from its _id index)

Prints the median and maximum of each, and the ratio of each median to the plain find's at the
same size, measured in the same run, with the load average. Not a test: slow figures never fail
the run (tests/test_bench_listing.py runs it at a tiny size). Exit 2 when the server does not
start.

    .venv/bin/python bench/listing.py [--sizes 10000,100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymongo import AsyncMongoClient

ROOT = Path(__file__).resolve().parent.parent
# bench/graphql.py would shadow graphql-core: keep this directory off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from anchoring.dialect import by_ids, detect  # noqa: E402
from anchoring.log import TransparencyLog  # noqa: E402
from anchoring.note import Signer  # noqa: E402
from anchoring.store import Doc, LogStore  # noqa: E402
from app.auth import Role, Viewer  # noqa: E402
from app.service import LISTED_WITHOUT_CHECKS, PrescriptionService, encode_cursor  # noqa: E402
from bench.processes import Broken, progress, redacted_uri, start_database  # noqa: E402

BATCH = 5_000  # documents per insert_many
PAGE = 20
PRESCRIBER = Viewer("dr-bench", Role.PRESCRIBER, "cardiology")
PHARMACIST = Viewer("ph-bench", Role.PHARMACIST, "ph-1")
FIELDS: Doc = {
    "patient": {"id": "p-0", "name": "Ana Lima"},
    "department": "cardiology",
    "pharmacy": "ph-1",
    "medications": [
        {"code": "N02BE01", "name": "Paracetamol", "dose": "500 mg", "quantity": 20},
        {"code": "C07AB02", "name": "Metoprolol", "dose": "50 mg", "quantity": 30},
    ],
    "notes": "take with food",
}
OPERATIONS = (
    "plain find",
    "scan",
    "page, whole docs",
    "page, projected",
    "filtered, projected",
    "20 by id: equalities",
    "20 by id: dialect",
)


async def templates(service: PrescriptionService) -> list[Doc]:
    """An issued and a dispensed prescription, filed through the service."""
    issued = await service.issue(PRESCRIBER, FIELDS, None)
    other = await service.issue(PRESCRIBER, FIELDS, None)
    await service.transition(PHARMACIST, "dispensePrescription", other["_id"], 1, None, {})
    found = await service.documents([issued["_id"], other["_id"]])
    return [found[issued["_id"]], found[other["_id"]]]


async def fill(service: PrescriptionService, size: int, models: list[Doc]) -> list[str]:
    """`size` copies of the model documents, straight into the collection; returns the ids."""
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ids = []
    for first in range(0, size, BATCH):
        docs = []
        for i in range(first, min(size, first + BATCH)):
            doc = copy.deepcopy(models[i % len(models)])
            doc["_id"] = f"rx_bench{i:08d}"
            doc["issuedAt"] = start + dt.timedelta(seconds=i)
            doc["patient"]["id"] = f"p-{i % 5000}"
            docs.append(doc)
            ids.append(doc["_id"])
        await service.prescriptions.insert_many(docs, ordered=False)
    return ids


async def measure(
    service: PrescriptionService, ids: list[str], repeats: int
) -> dict[str, list[float]]:
    """Latencies (ms) of each operation."""
    coll = service.prescriptions
    middle = await coll.find_one({"_id": ids[len(ids) // 2]}, {"issuedAt": 1})
    assert middle is not None
    cursor = (middle["issuedAt"], middle["_id"])
    some = ids[len(ids) // 3 :: max(1, len(ids) // (3 * PAGE))][:PAGE]
    ops: dict[str, Callable[[], Awaitable[object]]] = {
        "plain find": lambda: coll.find({}).limit(PAGE + 1).to_list(),
        "scan": lambda: coll.find({"status": "NONE"}).to_list(),
        "page, whole docs": lambda: service.page({}, PAGE, None),
        "page, projected": lambda: service.page({}, PAGE, None, LISTED_WITHOUT_CHECKS),
        "filtered, projected": lambda: service.page(
            {"status": "DISPENSED"}, PAGE, cursor, LISTED_WITHOUT_CHECKS
        ),
        "20 by id: equalities": lambda: asyncio.gather(*(coll.find_one({"_id": i}) for i in some)),
        "20 by id: dialect": lambda: by_ids(coll, some),
    }
    whole, _ = await service.page({}, PAGE, None)
    projected, _ = await service.page({}, PAGE, None, LISTED_WITHOUT_CHECKS)
    if [encode_cursor(d) for d in whole] != [encode_cursor(d) for d in projected]:
        raise SystemExit("the projected page differs from the page of whole documents")
    if len(await by_ids(coll, some)) != len(some):
        raise SystemExit("by_ids did not find every document")
    # Round robin: on a shared machine the load drifts, and each operation should meet the
    # same drift.
    result: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, op in ops.items():
            start = time.perf_counter()
            await op()
            result[name].append((time.perf_counter() - start) * 1000)
    return result


async def run(uri: str, sizes: list[int], repeats: int) -> tuple[dict[int, Any], str]:
    client: AsyncMongoClient[Doc] = AsyncMongoClient(uri, tz_aware=True)
    signer = Signer("bench.rxledger.example", Ed25519PrivateKey.generate())
    medians: dict[int, Any] = {}
    created = []
    try:
        for size in sizes:
            name = f"bench_list_{uuid.uuid4().hex[:8]}"
            created.append(name)
            tlog = TransparencyLog(LogStore(client[name], "bench.rxledger.example/log"), signer)
            service = PrescriptionService(tlog, client[name]["prescriptions"])
            progress(f"filing {size} prescriptions ...")
            start = time.perf_counter()
            models = await templates(service)
            await tlog.stop()
            ids = await fill(service, size, models)
            progress(f"  {time.perf_counter() - start:.1f} s; timing {repeats} of each")
            lat = await measure(service, ids, repeats)
            medians[size] = {k: (statistics.median(v), max(v)) for k, v in lat.items()}
            for k, (med, top) in medians[size].items():
                progress(f"  {k:20} median {med:9.2f} ms  max {top:9.2f} ms")
        dialect = (await detect(client["admin"]["x"])).value
    finally:
        for name in created:
            await client.drop_database(name)
        await client.close()
    return medians, dialect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sizes",
        default="10000,100000",
        help="prescriptions stored, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per operation and size (default 5)"
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(s < 2 * PAGE + 2 for s in sizes) or args.repeats < 1:
        parser.error(f"sizes must be >= {2 * PAGE + 2} and --repeats >= 1")
    with tempfile.TemporaryDirectory(prefix="bench-listing-") as tmpdir:
        try:
            uri, ferret = start_database(Path(tmpdir))
        except Broken as exc:
            print(f"listing: {exc}", file=sys.stderr)
            return 2
        try:
            medians, dialect = asyncio.run(run(uri, sizes, args.repeats))
        finally:
            if ferret is not None:
                ferret.stop()
    server = (
        f"MONGODB_URI {redacted_uri(uri)}"
        if os.environ.get("MONGODB_URI")
        else "FerretDB var/bin/ferretdb (patched)"
    )
    print(
        f"server: {server} (dialect {dialect}); median of {args.repeats}; "
        f"ratio against the plain find at the same size"
    )
    print(f"{'operation':22}" + "".join(f"{size:>26,}" for size in sizes))
    for name in OPERATIONS:
        cells = ""
        for s in sizes:
            med, base = medians[s][name][0], medians[s]["plain find"][0]
            cells += f"{med:12.1f} ms ({med / base:6.2f}x)"
        print(f"{name:22}{cells}")
    for s in sizes:
        whole, projected = medians[s]["page, whole docs"][0], medians[s]["page, projected"][0]
        by_eq, by_dialect = (
            medians[s]["20 by id: equalities"][0],
            medians[s]["20 by id: dialect"][0],
        )
        print(
            f"at {s:,}: projected page / whole-document page {projected / whole:.2f}x; "
            f"projected page / scan {projected / medians[s]['scan'][0]:.2f}x; "
            f"20 by id dialect / equalities {by_dialect / by_eq:.2f}x"
        )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
