"""The prescription service and schema in process, against the real server: repairs after a
crash between append and document update, and batched reads (DataLoaders)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
from bson import Binary
from pymongo import AsyncMongoClient, monitoring
from reads_listener import Reads

from anchoring.anchorer import AnchorSettings
from anchoring.dialect import ENV_DIALECT, IN_BATCH, Dialect
from anchoring.ledger import PROBE_AHEAD, event_id
from anchoring.log import LogSettings, TransparencyLog
from anchoring.store import Doc, LogStore
from app.auth import Role, Viewer
from app.feed import PrescriptionFeed
from app.prescriptions import Refused
from app.service import PrescriptionService
from schema.loaders import Loaders
from schema.root import make_schema

PRESCRIBER = Viewer("dr-zhang", Role.PRESCRIBER, "cardiology")
PHARMACIST = Viewer("ph-anna", Role.PHARMACIST, "ph-1")
AUDITOR = Viewer("aud-1", Role.AUDITOR, None)


def fields(patient: str = "p-1") -> Doc:
    return {
        "patient": {"id": patient, "name": "Ana Lima"},
        "department": "cardiology",
        "pharmacy": "ph-1",
        "medications": [
            {"code": "N02BE01", "name": "Paracetamol", "dose": "500 mg", "quantity": 20}
        ],
    }


class CrashAfterAppend(PrescriptionService):
    """A service whose process dies right after the ledger append: the document update never
    happens."""

    async def _store(self, doc: Doc, previous_version: int | None) -> None:
        return None


class Counter(monitoring.CommandListener):
    def __init__(self) -> None:
        self.commands: list[tuple[str, str]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        if name not in ("getMore", "endSessions"):  # a cursor's next batch is the same query
            query = event.command.get("filter")
            if name == "find" and isinstance(query, dict) and list(query) == ["_id"]:
                name = "find _id"  # one index lookup (FerretDB's answer to a batch)
            self.commands.append((name, str(event.command.get(event.command_name))))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
async def tlog(store: LogStore, signer) -> AsyncIterator[TransparencyLog]:
    log = TransparencyLog(store, signer, LogSettings(anchor=AnchorSettings(interval=0.05)))
    await log.start()
    yield log
    await log.stop()


@pytest.fixture
def service(tlog: TransparencyLog, client, db_name) -> PrescriptionService:
    return PrescriptionService(tlog, client[db_name]["prescriptions"])


async def test_a_crash_after_the_append_is_repaired_on_the_next_read(tlog, client, db_name):
    crashed = CrashAfterAppend(tlog, client[db_name]["prescriptions"])
    service = PrescriptionService(tlog, client[db_name]["prescriptions"])
    feed = PrescriptionFeed(tlog)
    doc = await service.issue(PRESCRIBER, fields(), None)
    await crashed.transition(PHARMACIST, "dispensePrescription", doc["_id"], 1, None, {})
    stored = await service.prescriptions.find_one({"_id": doc["_id"]})
    assert stored["version"] == 1  # the crash left the document behind its ledger

    await _until(lambda: feed.newest_version(doc["_id"]) == 2)
    read = await Loaders(service, tlog, feed).documents.load(doc["_id"])
    assert read["status"] == "DISPENSED" and read["version"] == 2
    assert (await service.prescriptions.find_one({"_id": doc["_id"]}))["version"] == 2


async def _until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_crash_before_the_first_document_write_is_repaired_by_the_next_mutation(
    tlog, client, db_name
):
    crashed = CrashAfterAppend(tlog, client[db_name]["prescriptions"])
    service = PrescriptionService(tlog, client[db_name]["prescriptions"])
    doc = await crashed.issue(PRESCRIBER, fields(), None)
    assert await service.prescriptions.find_one({"_id": doc["_id"]}) is None
    dispensed = await service.transition(
        PHARMACIST, "dispensePrescription", doc["_id"], 1, None, {}
    )
    assert dispensed["version"] == 2 and dispensed["status"] == "DISPENSED"


async def test_a_mutation_on_a_document_behind_its_ledger_is_a_conflict_then_repaired(
    tlog, client, db_name
):
    crashed = CrashAfterAppend(tlog, client[db_name]["prescriptions"])
    service = PrescriptionService(tlog, client[db_name]["prescriptions"])
    doc = await service.issue(PRESCRIBER, fields(), None)
    await crashed.transition(PHARMACIST, "dispensePrescription", doc["_id"], 1, None, {})
    # The caller read version 1 from the stale document; the ledger already holds version 2.
    with pytest.raises(Refused) as refused:
        await service.transition(
            PHARMACIST, "rejectPrescription", doc["_id"], 1, None, {"reason": "x"}
        )
    assert refused.value.kind == "VersionConflict"
    assert "version 2" in refused.value.message
    assert (await service.prescriptions.find_one({"_id": doc["_id"]}))["status"] == "DISPENSED"


async def test_the_start_up_sweep_repairs_every_document_behind_its_ledger(tlog, client, db_name):
    crashed = CrashAfterAppend(tlog, client[db_name]["prescriptions"])
    service = PrescriptionService(tlog, client[db_name]["prescriptions"])
    ids = [(await service.issue(PRESCRIBER, fields(f"p-{i}"), None))["_id"] for i in range(3)]
    for rid in ids[:2]:
        await crashed.transition(PHARMACIST, "dispensePrescription", rid, 1, None, {})
    lost = await crashed.issue(PRESCRIBER, fields("p-9"), None)

    assert await service.sweep() == 3
    statuses = {d["_id"]: d["status"] async for d in service.prescriptions.find({})}
    assert statuses == {
        ids[0]: "DISPENSED",
        ids[1]: "DISPENSED",
        ids[2]: "ISSUED",
        lost["_id"]: "ISSUED",
    }
    assert await service.sweep() == 0


LIST = """
query($first: Int!) {
  prescriptions(first: $first) {
    edges { node {
      id status version
      history { type leafIndex leaf proof { leafIndex treeSize path checkpoint { note } } receipt { note } }
      integrity { status leafIndex proof { path } }
    } }
  }
}
"""


async def _list_commands(
    mongo_uri: str, db_name: str, tlog: TransparencyLog, first: int
) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    counter = Counter()
    counted: AsyncMongoClient[Doc] = AsyncMongoClient(
        mongo_uri, tz_aware=True, event_listeners=[counter]
    )
    try:
        service = PrescriptionService(tlog, counted[db_name]["prescriptions"])
        service.ledger = counted[db_name]["ledger"]
        log = TransparencyLog(
            LogStore(counted[db_name], tlog.store.origin), tlog.signer, tlog.settings
        )
        # A reading process that knows the leaf indices (its log tail filled them in) but has
        # read no tiles yet.
        log._indices = tlog._indices
        context = {
            "log": log,
            "service": service,
            "viewer": AUDITOR,
            "loaders": Loaders(service, log, PrescriptionFeed(log)),
            "max_page": 100,
            "metrics": None,
        }
        counter.commands.clear()
        result = await make_schema().execute(LIST, {"first": first}, context_value=context)
        assert result.errors is None, result.errors
        return counter.commands, result.data or {}
    finally:
        await counted.close()


@pytest.mark.parametrize("server", [Dialect.MONGODB, Dialect.FERRETDB])
async def test_listing_a_hundred_prescriptions_with_history_and_proofs_costs_a_handful_of_queries(
    tlog, service, mongo_uri, db_name, server, monkeypatch
):
    monkeypatch.setenv(ENV_DIALECT, server.value)
    ids = []
    for i in range(100):
        ids.append((await service.issue(PRESCRIBER, fields(f"p-{i}"), None))["_id"])
    await asyncio.gather(
        *(service.transition(PHARMACIST, "dispensePrescription", r, 1, None, {}) for r in ids)
    )
    await tlog.wait_anchored(200, timeout=30)

    few, few_data = await _list_commands(mongo_uri, db_name, tlog, 10)
    many, data = await _list_commands(mongo_uri, db_name, tlog, 100)

    nodes = [e["node"] for e in data["prescriptions"]["edges"]]
    assert len(nodes) == 100
    assert all(n["integrity"]["status"] == "VERIFIED" for n in nodes)
    assert all(len(n["history"]) == 2 and n["history"][1]["proof"] for n in nodes)
    # 100 prescriptions, 200 events and 300 proofs: the same few queries as for 10.
    # prescriptions, their ledger events, the head, its checkpoint, and the tiles of all 300
    # proofs (every event checked against the signed tree) at once. Where only `_id`
    # lookups are index-backed, the ledger events are read by their derived `_id`s instead,
    # all prescriptions' at once: their versions and PROBE_AHEAD more each, in `_id` `$in`s
    # of at most IN_BATCH ids.
    lookups = [c for c in many if c == ("find _id", "ledger")]
    many = [c for c in many if c != ("find _id", "ledger")]
    few = [c for c in few if c != ("find _id", "ledger")]
    in_reads = math.ceil(100 * (2 + PROBE_AHEAD) / IN_BATCH)
    assert len(lookups) == (0 if server is Dialect.MONGODB else in_reads), many
    assert len(many) <= 5, many
    assert len(many) == len(few), (few, many)
    assert len(few_data["prescriptions"]["edges"]) == 10


HISTORY = """query($id: ID!) { prescription(id: $id) { history { version leafIndex %s } } }"""


async def test_history_signs_a_receipt_only_when_selected_and_once_per_leaf(
    store: LogStore, signer, client, db_name
):
    # No checkpoint after the empty tree's: sequenced events wait for one, with receipts.
    unanchored = LogSettings(anchor=AnchorSettings(interval=3600, max_leaves=10**6))
    log = TransparencyLog(store, signer, unanchored)
    await log.start()
    try:
        await log.wait_anchored(0)  # the empty tree's checkpoint, before any event
        service = PrescriptionService(log, client[db_name]["prescriptions"])
        feed = PrescriptionFeed(log)
        rid = (await service.issue(PRESCRIBER, fields(), None))["_id"]

        async def history(selection: str) -> list[dict[str, Any]]:
            context = {
                "log": log,
                "service": service,
                "viewer": PRESCRIBER,
                "loaders": Loaders(service, log, feed),
                "max_page": 100,
                "metrics": None,
            }
            result = await make_schema().execute(
                HISTORY % selection, {"id": rid}, context_value=context
            )
            assert result.errors is None, result.errors
            events: list[dict[str, Any]] = result.data["prescription"]["history"]  # type: ignore[index]
            return events

        for _ in range(500):
            if (await history(""))[0]["leafIndex"] is not None:
                break
            await asyncio.sleep(0.02)
        unselected = await history("")
        assert unselected[0]["leafIndex"] is not None
        assert (log.receipts.misses, log.receipts.hits) == (0, 0)

        first = await history("receipt { note issuedAt }")
        again = await history("receipt { note issuedAt }")

        assert first[0]["receipt"] is not None
        assert again[0]["receipt"] == first[0]["receipt"]
        assert (log.receipts.misses, log.receipts.hits) == (1, 1)
    finally:
        await log.stop()


async def test_a_mutation_on_an_id_nothing_has_reads_the_ledger_by_id_only(
    tlog, service, mongo_uri, db_name, monkeypatch
):
    # On FerretDB a read of the ledger by anything but `_id` decodes all of it: were an unknown
    # id read by subject, any caller allowed a mutation could make every request of theirs
    # cost a scan of the hospital's whole ledger.
    monkeypatch.setenv(ENV_DIALECT, Dialect.FERRETDB.value)
    known = await service.issue(PRESCRIBER, fields("p-known"), None)
    reads = Reads()
    watched: AsyncMongoClient[Doc] = AsyncMongoClient(
        mongo_uri, tz_aware=True, event_listeners=[reads]
    )
    try:
        probing = PrescriptionService(tlog, watched[db_name]["prescriptions"])
        probing.ledger = watched[db_name]["ledger"]
        for rid in ("rx-nothing-has-this-id", "x" * 200):
            with pytest.raises(Refused) as refused:
                await probing.transition(PHARMACIST, "dispensePrescription", rid, 1, None, {})
            assert refused.value.kind == "NotFound"
        assert reads.of("ledger"), "the ledger was not read at all"
        not_by_id = [
            f for f in reads.of("ledger") if not (isinstance(f, dict) and list(f) == ["_id"])
        ]
        assert not_by_id == []
        # The prescription that exists is still found and extended.
        done = await probing.transition(
            PHARMACIST, "dispensePrescription", known["_id"], 1, None, {}
        )
        assert done["version"] == 2
    finally:
        await watched.close()


def _ids_read(reads: list[tuple[str, Any]], collection: str) -> list[Any]:
    """The `_id`s read from `collection`; every read of it must be by `_id`."""
    found: list[Any] = []
    for coll, f in reads:
        if coll == collection:
            assert isinstance(f, dict) and list(f) == ["_id"], (coll, f)
            value = f["_id"]
            if not isinstance(value, dict):
                found.append(value)
            elif "$in" in value:
                found += value["$in"]
            else:  # a range of indices (entries, on MongoDB)
                assert set(value) == {"$gte", "$lt"}, value
                found += range(value["$gte"], value["$lt"])
    return found


@pytest.mark.parametrize("server", [Dialect.MONGODB, Dialect.FERRETDB])
async def test_the_start_up_sweep_reads_only_the_queue_and_what_was_sequenced_since_the_last(
    tlog, client, mongo_uri, db_name, server, monkeypatch
):
    monkeypatch.setenv(ENV_DIALECT, server.value)
    crashed = CrashAfterAppend(tlog, client[db_name]["prescriptions"])
    service = PrescriptionService(tlog, client[db_name]["prescriptions"])
    for i in range(30):
        await service.issue(PRESCRIBER, fields(f"p-{i}"), None)
    lost = await crashed.issue(PRESCRIBER, fields("p-lost"), None)
    await tlog.wait_sequenced(event_id(lost["_id"], 1))

    reads = Reads()
    watched: AsyncMongoClient[Doc] = AsyncMongoClient(
        mongo_uri, tz_aware=True, event_listeners=[reads]
    )
    try:
        sweeping = PrescriptionService(
            TransparencyLog(LogStore(watched[db_name], tlog.store.origin), tlog.signer),
            watched[db_name]["prescriptions"],
        )
        sweeping.ledger = watched[db_name]["ledger"]
        assert await sweeping.sweep() == 1  # the document the crash never wrote
        assert (await service.prescriptions.find_one({"_id": lost["_id"]}))["version"] == 1
        # The size the sweep read (its mark): events published later were still queued then.
        mark = await client[db_name]["sweeps"].find_one({"_id": "prescriptions"})
        first_size = mark["through"]
        assert 0 < first_size <= (await tlog.store.head())["size"] == 31
        # Every read by `_id` but the queue's (and, on MongoDB, the repair's read of the
        # ledger by subject, which its index serves): never all events or all documents.
        assert {c for c, _ in reads.reads} <= {
            "sweeps",
            "pending",
            "leases",
            "entries",
            "ledger",
            "prescriptions",
        }
        for coll in ("prescriptions", "entries", "sweeps", "leases"):
            _ids_read(reads.reads, coll)
        ledger_reads = [f for c, f in reads.reads if c == "ledger"]
        assert all(f for f in ledger_reads), ledger_reads
        if server is Dialect.FERRETDB:
            _ids_read(reads.reads, "ledger")
        entries_read = set(_ids_read(reads.reads, "entries"))
        assert sorted(entries_read & set(range(first_size))) == list(range(first_size))

        dispensed = await crashed.transition(
            PHARMACIST, "dispensePrescription", lost["_id"], 1, None, {}
        )
        await tlog.wait_sequenced(event_id(lost["_id"], 2))
        reads.reads.clear()
        assert await sweeping.sweep() == 1
        stored = await service.prescriptions.find_one({"_id": lost["_id"]})
        assert stored["version"] == dispensed["version"] == 2
        # Only the entries sequenced since the first sweep began.
        entries = _ids_read(reads.reads, "entries")
        assert entries and min(entries) >= first_size, entries
        if server is Dialect.FERRETDB:
            since = (await tlog.store.head())["size"] - first_size
            assert len(_ids_read(reads.reads, "ledger")) <= since + 2 + PROBE_AHEAD
        reads.reads.clear()
        assert await sweeping.sweep() == 0
    finally:
        await watched.close()


async def test_a_mutation_on_a_sequenced_prescription_does_not_read_the_queue(
    tlog, client, mongo_uri, db_name
):
    # The queue holds every event not yet sequenced, copies and all, and on FerretDB any read
    # of it decodes all of it: a mutation extending an event the log holds must not pay that.
    service = PrescriptionService(tlog, client[db_name]["prescriptions"])
    doc = await service.issue(PRESCRIBER, fields("p-q"), None)
    await tlog.wait_sequenced(event_id(doc["_id"], 1))
    reads = Reads()
    watched: AsyncMongoClient[Doc] = AsyncMongoClient(
        mongo_uri, tz_aware=True, event_listeners=[reads]
    )
    # A second process's log on the watched client: `tlog` holds the lease and sequences.
    other = TransparencyLog(LogStore(watched[db_name], tlog.store.origin), tlog.signer)
    await other.start()
    try:
        acting = PrescriptionService(other, watched[db_name]["prescriptions"])
        assert not other.sequencer.is_leader
        reads.reads.clear()
        done = await acting.transition(PHARMACIST, "dispensePrescription", doc["_id"], 1, None, {})
        assert done["version"] == 2
        assert [f for c, f in reads.reads if c == "pending"] == []
        assert any(c == "positions" for c, _ in reads.reads)  # it looked the event up
    finally:
        await other.stop()
        await watched.close()


async def test_the_sweep_survives_a_mark_beyond_the_log_and_an_unreadable_queued_group(
    tlog, client, db_name, caplog
):
    # What a database writer (or a restore of an older backup) can leave: a mark past the
    # log's end, a queued group whose events do not decode. The sweep still repairs.
    crashed = CrashAfterAppend(tlog, client[db_name]["prescriptions"])
    service = PrescriptionService(tlog, client[db_name]["prescriptions"])
    lost = await crashed.issue(PRESCRIBER, fields("p-lost"), None)
    await tlog.wait_sequenced(event_id(lost["_id"], 1))
    sweeps = client[db_name]["sweeps"]
    await sweeps.insert_one({"_id": "prescriptions", "through": 10**15})
    await client[db_name]["pending"].insert_one(
        {"_id": "planted", "events": Binary(b"not bson"), "queuedAt": 0}
    )
    assert await service.sweep() == 1
    assert (await service.prescriptions.find_one({"_id": lost["_id"]}))["version"] == 1
    size = (await tlog.store.head())["size"]
    assert (await sweeps.find_one({"_id": "prescriptions"}))["through"] == size
    assert "unreadable" in caplog.text and "beyond the log's size" in caplog.text
