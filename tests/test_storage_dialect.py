"""The storage dialect (anchoring.dialect): against FerretDB the log's hot reads are `_id`
equalities and `_id` `$in`s of at most IN_BATCH ids, the only shapes our patched FerretDB answers
from an index; against MongoDB they are one `$in` or range read; both give the same documents. The newest checkpoint is named in the head.

Each test forces a dialect with RXLEDGER_STORAGE_DIALECT, so both paths run against whatever
server the suite uses, and watches the commands a client sends with a CommandListener."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient
from reads_listener import Reads

from anchoring import dialect
from anchoring.anchorer import AnchorSettings
from anchoring.dialect import Dialect, DialectError, by_id_range, by_ids
from anchoring.ledger import event_at, event_id, events_of, make_event, newest_event
from anchoring.log import LogSettings, TransparencyLog
from anchoring.store import Doc, LogStore
from anchoring.tail import LogTail
from anchoring.treemath import Node
from app.settings import ConfigError, Settings


@pytest.fixture
async def watched(mongo_uri: str) -> AsyncIterator[tuple[AsyncMongoClient[Doc], Reads]]:
    reads = Reads()
    c: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_uri, tz_aware=True, event_listeners=[reads])
    yield c, reads
    await c.close()


def force(monkeypatch: pytest.MonkeyPatch, which: Dialect) -> None:
    monkeypatch.setenv(dialect.ENV_DIALECT, which.value)


async def test_ferretdb_reads_documents_and_index_ranges_by_id_lookups_only(
    watched, db_name, monkeypatch
):
    c, reads = watched
    coll = c[db_name]["docs"]
    await coll.insert_many([{"_id": i, "n": i * i} for i in range(0, 60) if i != 15])
    await coll.insert_many([{"_id": f"s{i}", "n": i} for i in range(5)])
    wanted: list[Any] = [3, 7, 15, 59, "s2", 999, 3]

    found: dict[Dialect, Any] = {}
    shapes: dict[Dialect, list[tuple[str, Any]]] = {}
    for which in (Dialect.MONGODB, Dialect.FERRETDB):
        force(monkeypatch, which)
        reads.reads.clear()
        found[which] = (
            await by_ids(coll, wanted),
            await by_ids(coll, [7], {"n": 1}),
            await by_id_range(coll, 10, 20),
            await by_id_range(coll, 58, 62, {"_id": 1}),
        )
        shapes[which] = list(reads.reads)
        if which is Dialect.FERRETDB:
            assert reads.not_id_lookups() == []
            assert len(reads.reads) == 4  # one per call
    assert found[Dialect.MONGODB] == found[Dialect.FERRETDB]
    by_id, one, ten, edge = found[Dialect.FERRETDB]
    assert sorted(map(str, by_id)) == ["3", "59", "7", "s2"]
    assert by_id[59] == {"_id": 59, "n": 59 * 59}
    assert one == {7: {"_id": 7, "n": 49}}
    assert [d["_id"] for d in ten] == [10, 11, 12, 13, 14, 16, 17, 18, 19]  # 15 is absent
    assert edge == [{"_id": 58}, {"_id": 59}]
    # MongoDB: one $in and one range read, each served by the _id index.
    assert shapes[Dialect.MONGODB][0] == ("docs", {"_id": {"$in": wanted[:-1]}})
    assert shapes[Dialect.MONGODB][2] == ("docs", {"_id": {"$gte": 10, "$lt": 20}})
    assert len(shapes[Dialect.MONGODB]) == 4
    # FerretDB: an $in of the wanted ids, or of the range's indices.
    assert shapes[Dialect.FERRETDB][0] == ("docs", {"_id": {"$in": wanted[:-1]}})
    assert shapes[Dialect.FERRETDB][1] == ("docs", {"_id": 7})
    assert shapes[Dialect.FERRETDB][2] == ("docs", {"_id": {"$in": list(range(10, 20))}})


async def test_ferretdb_reads_more_ids_than_one_in_holds_in_batches(watched, db_name, monkeypatch):
    c, reads = watched
    coll = c[db_name]["docs"]
    size = 2 * dialect.IN_BATCH + 7
    await coll.insert_many([{"_id": i} for i in range(size)])
    force(monkeypatch, Dialect.FERRETDB)
    reads.reads.clear()
    found = await by_id_range(coll, 0, size + 5)
    assert [d["_id"] for d in found] == list(range(size))
    assert reads.not_id_lookups() == []
    assert [len(f["_id"]["$in"]) for _, f in reads.reads] == [
        dialect.IN_BATCH,
        dialect.IN_BATCH,
        12,
    ]


@pytest.fixture
async def anchored(store: LogStore, signer) -> AsyncIterator[TransparencyLog]:
    """A log of 300 events (a full tile and a partial one) with several checkpoints."""
    log = TransparencyLog(store, signer, LogSettings(anchor=AnchorSettings(interval=0.01)))
    await log.start()
    for batch in range(3):
        await asyncio.gather(*(log.append(f"s-{batch}-{i}", 1, {"n": i}) for i in range(100)))
        await log.wait_anchored(100 * (batch + 1), timeout=30)
    yield log
    await log.stop()


async def test_ferretdb_serves_the_logs_hot_reads_by_id_lookups_only(
    anchored, watched, db_name, monkeypatch
):
    c, reads = watched
    force(monkeypatch, Dialect.FERRETDB)
    log = TransparencyLog(LogStore(c[db_name], anchored.store.origin), anchored.signer)
    size = await log.published_size()
    assert size == 300
    reads.reads.clear()

    newest = await log.newest_checkpoint()
    latest = await log.latest_checkpoint()
    proof = await log.inclusion_proof(5)
    leaves = await log.entry_leaves(0, 256, size)
    tail = await LogTail(log.store).read(250, 300)
    nodes = await log.reader.nodes([Node(0, 299), Node(8, 0)], size)

    assert reads.not_id_lookups() == []
    assert {coll for coll, _ in reads.reads} == {"leases", "notarizations", "entries", "tiles"}
    assert newest is not None and latest is not None and newest.size == latest.size == 300
    assert proof.holds()
    assert len(leaves) == 256 and [e.index for e in tail] == list(range(250, 300))
    assert len(nodes) == 2
    # The same answers as the MongoDB path.
    force(monkeypatch, Dialect.MONGODB)
    other = TransparencyLog(LogStore(c[db_name], anchored.store.origin), anchored.signer)
    assert await other.entry_leaves(0, 256, size) == leaves
    assert await LogTail(other.store).read(250, 300) == tail
    assert await other.reader.nodes([Node(0, 299), Node(8, 0)], size) == nodes


async def test_the_newest_checkpoint_is_named_in_the_head_and_survives_a_crash_before_notarizing(
    anchored,
):
    store = anchored.store
    by_sort = await store.notarizations.find({}).sort("_id", -1).limit(1).to_list()
    head = await store.head()
    assert head["newestCheckpoint"] == by_sort[0]["_id"] == 300
    assert head["priorCheckpoint"] < 300
    assert (await store.newest_notarization()) == by_sort[0]
    await anchored.stop()

    # Named, then the process died before inserting it: the one before is the newest.
    await store.leases.update_one(
        {"_id": store.origin}, {"$set": {"newestCheckpoint": 400, "priorCheckpoint": 300}}
    )
    assert (await store.newest_notarization())["_id"] == 300
    # A log signed before the head named checkpoints: read by size.
    await store.leases.update_one(
        {"_id": store.origin}, {"$unset": {"newestCheckpoint": "", "priorCheckpoint": ""}}
    )
    assert (await store.newest_notarization())["_id"] == 300
    # The first checkpoint named and never notarized: there is none.
    await store.notarizations.delete_many({})
    await store.leases.update_one(
        {"_id": store.origin}, {"$set": {"newestCheckpoint": 0, "priorCheckpoint": None}}
    )
    assert await store.newest_notarization() is None


async def test_the_dialect_is_read_from_build_info_or_forced_by_the_environment(
    client, monkeypatch
):
    assert dialect.dialect_of_build({"version": "7.0.42", "ferretdbVersion": "v1.24.2"}) is (
        Dialect.FERRETDB
    )
    assert dialect.dialect_of_build({"version": "8.0.4"}) is Dialect.MONGODB
    monkeypatch.delenv(dialect.ENV_DIALECT, raising=False)
    detected = await dialect.detect(client["any"]["collection"])
    build = await client.admin.command("buildInfo")
    assert detected is dialect.dialect_of_build(build)
    if not os.environ.get("MONGODB_URI"):
        assert detected is Dialect.FERRETDB  # the suite's own server
    monkeypatch.setenv(dialect.ENV_DIALECT, "MongoDB")
    assert await dialect.detect(client["any"]["collection"]) is Dialect.MONGODB
    monkeypatch.setenv(dialect.ENV_DIALECT, "sqlite")
    with pytest.raises(DialectError, match="want auto, mongodb or ferretdb"):
        await dialect.detect(client["any"]["collection"])


def test_a_storage_dialect_that_names_no_server_is_refused_at_start_up(monkeypatch):
    monkeypatch.setenv(dialect.ENV_DIALECT, "postgres")
    with pytest.raises(ConfigError, match="RXLEDGER_STORAGE_DIALECT='postgres': want auto"):
        Settings.from_env()


def _event(subject: str, version: int, **fields: Any) -> Doc:
    doc, _ = make_event(subject, version, {"subject": subject, "version": version, **fields})
    return doc


async def test_a_subjects_events_are_read_by_their_derived_ids_on_ferretdb(
    watched, db_name, monkeypatch
):
    # Derived `_id`s on FerretDB (no other read), one query by subject on MongoDB; the same
    # events either way, oldest first, however wrong the caller's guess of the newest version.
    c, reads = watched
    ledger = c[db_name]["ledger"]
    await ledger.insert_many([_event("rx-a", v) for v in (1, 2, 3)] + [_event("rx-b", 1)])
    ids = {s: [event_id(s, v) for v in range(1, n + 1)] for s, n in (("rx-a", 3), ("rx-b", 1))}
    for which in (Dialect.MONGODB, Dialect.FERRETDB):
        force(monkeypatch, which)
        for known in ({}, {"rx-a": 3, "rx-b": 1}, {"rx-a": 1}, {"rx-a": 10**9, "rx-b": -5}):
            reads.reads.clear()
            found = await events_of(ledger, ["rx-a", "rx-b", "rx-none"], {"leaf": 1}, known)
            assert {s: [e["_id"] for e in found[s]] for s in ids} == ids, (which, known)
            if which is Dialect.FERRETDB:
                # rx-none has no version 1 under its id: read by subject (nothing there).
                assert reads.not_id_lookups() == [("ledger", {"subject": "rx-none"})]
            assert found["rx-none"] == []
        newest = await newest_event(ledger, "rx-a", {"version": 1})
        assert newest is not None and newest["version"] == 3
        at = await event_at(ledger, "rx-a", 2)
        assert at is not None and at["_id"] == event_id("rx-a", 2)


async def test_a_ledger_without_derived_ids_or_with_a_gap_is_read_by_subject(
    watched, db_name, monkeypatch
):
    # Written before ids were derived (random `_id`s), or with an event deleted: on FerretDB
    # the subject is then read by subject, so the checks see exactly what the ledger holds.
    c, reads = watched
    ledger = c[db_name]["ledger"]
    legacy = [{**_event("rx-old", v), "_id": ObjectId()} for v in (1, 2)]
    gap = [_event("rx-gap", v) for v in (1, 3, 4)]  # version 2 deleted
    # Planted under a foreign `_id`: read by subject on MongoDB, never by derived ids.
    planted = [_event("rx-planted", 1), {**_event("rx-planted", 2), "_id": ObjectId()}]
    await ledger.insert_many(legacy + gap + planted)
    for which in (Dialect.MONGODB, Dialect.FERRETDB):
        force(monkeypatch, which)
        found = await events_of(ledger, ["rx-old", "rx-gap", "rx-planted"], {"version": 1})
        assert [e["_id"] for e in found["rx-old"]] == [d["_id"] for d in legacy]
        assert [e["version"] for e in found["rx-gap"]] == [1, 3, 4]
        planted_read = [e["version"] for e in found["rx-planted"]]
        assert planted_read == ([1, 2] if which is Dialect.MONGODB else [1]), which
        legacy_at = await event_at(ledger, "rx-old", 2)
        assert legacy_at is not None and legacy_at["_id"] == legacy[1]["_id"]
        gap_newest = await newest_event(ledger, "rx-gap", {"version": 1}, known=1)
        assert gap_newest is not None and gap_newest["version"] == 4


async def test_an_unexpected_subject_without_its_version_1_has_no_events_and_costs_no_scan(
    watched, db_name, monkeypatch
):
    # `expected_only` (a mutation on an id no document has): version 1 missing means no
    # events, even when a later version is under its derived `_id` (version 1 deleted).
    c, reads = watched
    ledger = c[db_name]["ledger"]
    await ledger.insert_many([_event("rx-cut", v) for v in (2, 3)])
    force(monkeypatch, Dialect.FERRETDB)
    reads.reads.clear()
    found = await events_of(ledger, ["rx-cut", "rx-none"], {"version": 1}, expected_only=True)
    assert found == {"rx-cut": [], "rx-none": []}
    assert await newest_event(ledger, "rx-cut", {"version": 1}, expected_only=True) is None
    assert reads.not_id_lookups() == []
    # Without it, the subject is read by subject: the gap is seen.
    assert [e["version"] for e in (await events_of(ledger, ["rx-cut"]))["rx-cut"]] == [2, 3]
