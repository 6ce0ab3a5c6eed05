"""Positions: an event's leaf index is a lookup by `_id` in `positions`, written by the
sequencer with its tiles; `entries` is read by event only for an older log's events. A position
is an index, not evidence: an edited one never makes a proof or `integrity` hold for another
leaf."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient, monitoring

from anchoring.anchorer import AnchorSettings
from anchoring.audit import audit_log
from anchoring.log import LogSettings, TransparencyLog
from anchoring.sequencer import Sequencer
from anchoring.store import Doc, LogStore
from app.auth import Role, Viewer
from app.feed import PrescriptionFeed
from app.service import PrescriptionService
from schema.loaders import Loaders
from schema.root import make_schema

PRESCRIBER = Viewer("dr-zhang", Role.PRESCRIBER, "cardiology")
AUDITOR = Viewer("aud-1", Role.AUDITOR, None)


def fields(patient: str) -> Doc:
    return {
        "patient": {"id": patient, "name": "Ana Lima"},
        "department": "cardiology",
        "pharmacy": "ph-1",
        "medications": [
            {"code": "N02BE01", "name": "Paracetamol", "dose": "500 mg", "quantity": 20}
        ],
    }


class Finds(monitoring.CommandListener):
    """The collections `find` commands read."""

    def __init__(self) -> None:
        self.collections: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find":
            self.collections.append(str(event.command["find"]))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
async def tlog(store: LogStore, signer: Any) -> AsyncIterator[TransparencyLog]:
    log = TransparencyLog(store, signer, LogSettings(anchor=AnchorSettings(interval=0.05)))
    await log.start()
    yield log
    await log.stop()


@pytest.fixture
def service(tlog: TransparencyLog, client: Any, db_name: str) -> PrescriptionService:
    return PrescriptionService(tlog, client[db_name]["prescriptions"])


@pytest.fixture
async def counted(mongo_uri: str) -> AsyncIterator[tuple[AsyncMongoClient[Doc], Finds]]:
    finds = Finds()
    client: AsyncMongoClient[Doc] = AsyncMongoClient(
        mongo_uri, tz_aware=True, event_listeners=[finds]
    )
    yield client, finds
    await client.close()


async def sequenced(tlog: TransparencyLog, service: PrescriptionService, n: int) -> list[Doc]:
    """`n` prescriptions issued and their events sequenced; their ledger events."""
    ids = [(await service.issue(PRESCRIBER, fields(f"p-{i}"), None))["_id"] for i in range(n)]
    events = [e async for e in tlog.store.ledger.find({"subject": {"$in": ids}})]
    for e in events:
        await tlog.wait_sequenced(e["_id"])
    return events


async def stored_indices(store: LogStore, events: list[Doc]) -> dict[Any, int]:
    ids = [e["_id"] for e in events]
    return {d["event"]: d["_id"] async for d in store.entries.find({"event": {"$in": ids}})}


def cold(store: LogStore, client: AsyncMongoClient[Doc], tlog: TransparencyLog) -> TransparencyLog:
    """A process that has read nothing of the log yet (its tail never ran)."""
    return TransparencyLog(LogStore(client[store.db.name], store.origin), tlog.signer)


async def as_older_log(store: LogStore) -> None:
    """The log as code before positions left it: no positions, no positionsFrom."""
    await store.positions.delete_many({})
    await store.leases.update_one({"_id": store.origin}, {"$unset": {"positionsFrom": ""}})


async def test_a_cold_process_finds_leaf_indices_by_position_without_reading_entries(
    tlog, service, store, counted
):
    events = await sequenced(tlog, service, 3)
    client, finds = counted
    reader = cold(store, client, tlog)
    finds.collections.clear()
    found = await reader.leaf_indices([e["_id"] for e in events] + [ObjectId()])
    assert found == await stored_indices(store, events)
    assert "entries" not in finds.collections, finds.collections
    assert "positions" in finds.collections


async def test_an_event_not_sequenced_yet_costs_no_read_of_entries(tlog, store, counted):
    await tlog.wait_sequenced((await tlog.append("rx-1", 1, {"type": "t"})).event_id)
    assert (await store.head())["positionsFrom"] == 0  # a log sequenced from its start
    client, finds = counted
    finds.collections.clear()
    assert await cold(store, client, tlog).leaf_indices([ObjectId(), ObjectId()]) == {}
    assert "entries" not in finds.collections, finds.collections


async def test_an_older_logs_events_are_found_in_entries_and_new_ones_by_position(
    tlog, service, store, counted
):
    old = await sequenced(tlog, service, 2)
    await tlog.stop()
    await as_older_log(store)
    # The first leader running this code marks where positions begin.
    leader = Sequencer(store)
    assert await leader.acquire_lease()
    await leader.recover()
    assert (await store.head())["positionsFrom"] == leader.size == 2
    await leader.release_lease()
    restarted = TransparencyLog(store, tlog.signer)
    await restarted.start()
    try:
        new = await sequenced(restarted, PrescriptionService(restarted, service.prescriptions), 2)
    finally:
        await restarted.stop()
    assert await store.positions.count_documents({}) == 2

    client, finds = counted
    reader = cold(store, client, tlog)
    finds.collections.clear()
    assert await reader.leaf_indices([e["_id"] for e in new]) == await stored_indices(store, new)
    assert "entries" not in finds.collections
    found = await reader.leaf_indices([e["_id"] for e in old])
    assert found == await stored_indices(store, old)
    assert "entries" in finds.collections


async def test_a_batch_integrated_again_keeps_its_positions_and_an_edited_one_is_reported(
    tlog, service, store, caplog
):
    events = await sequenced(tlog, service, 2)
    entries = [d async for d in store.entries.find({}).sort("_id", 1)]
    before = [d async for d in store.positions.find({}).sort("_id", 1)]
    await store.write_positions(entries)  # recovery integrating the same entries again
    assert [d async for d in store.positions.find({}).sort("_id", 1)] == before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    first, second = (e["_id"] for e in events)
    indices = await stored_indices(store, events)
    await store.positions.update_one({"_id": first}, {"$set": {"index": indices[second]}})
    with caplog.at_level(logging.ERROR, logger="rxledger.store"):
        await store.write_positions(entries)
    assert any("positions were edited" in r.getMessage() for r in caplog.records)


QUERY = """
query($id: ID!) {
  prescription(id: $id) {
    history { version leafIndex proof { leafIndex } receipt { note } }
    integrity { status leafIndex detail proof { leafIndex } }
  }
}
"""


async def read(
    store: LogStore, client: AsyncMongoClient[Doc], tlog: TransparencyLog, rid: str
) -> dict[str, Any]:
    """`prescription(id)` with history, proofs and integrity, as a cold process serves it."""
    log = cold(store, client, tlog)
    service = PrescriptionService(log, client[store.db.name]["prescriptions"])
    context = {
        "log": log,
        "service": service,
        "viewer": AUDITOR,
        "loaders": Loaders(service, log, PrescriptionFeed(log)),
        "max_page": 100,
        "metrics": None,
    }
    result = await make_schema().execute(QUERY, {"id": rid}, context_value=context)
    assert result.errors is None, result.errors
    assert result.data is not None
    rx: dict[str, Any] = result.data["prescription"]
    return rx


async def test_a_position_pointing_at_another_events_entry_never_proves_it(
    tlog, service, store, counted
):
    events = await sequenced(tlog, service, 2)
    victim, other = events[0], events[1]
    indices = await stored_indices(store, events)
    await tlog.wait_anchored(2)
    client, _ = counted
    assert (await read(store, client, tlog, victim["subject"]))["integrity"]["status"] == (
        "VERIFIED"
    )

    await store.positions.update_one(
        {"_id": victim["_id"]}, {"$set": {"index": indices[other["_id"]]}}
    )
    rx = await read(store, client, tlog, victim["subject"])
    assert rx["integrity"]["status"] == "TAMPERED", rx["integrity"]
    assert rx["integrity"]["proof"] is None
    assert "event 1" in rx["integrity"]["detail"]
    # No proof or receipt for the victim's event at the other event's index.
    assert rx["history"][0]["proof"] is None and rx["history"][0]["receipt"] is None
    # The other prescription, whose own position is intact, still verifies.
    assert (await read(store, client, tlog, other["subject"]))["integrity"]["status"] == (
        "VERIFIED"
    )


async def test_an_erasure_untags_entries_found_by_position_and_in_an_older_log(
    tlog, service, store
):
    events = await sequenced(tlog, service, 2)
    indices = await stored_indices(store, events)
    by_position, by_entry = events[0], events[1]
    await tlog.stop()  # FerretDB rewrites the head whole: its writers would undo this edit
    await store.leases.update_one({"_id": store.origin}, {"$set": {"positionsFrom": 2}})
    await store.positions.delete_one({"_id": by_entry["_id"]})

    async def patients() -> list[str | None]:
        found = [await store.entries.find_one({"_id": i}) for i in sorted(indices.values())]
        return [(d or {}).get("tags", {}).get("patient") for d in found]

    assert all(await patients())
    await store.untag_entries([by_position["_id"], by_entry["_id"], ObjectId()], ["patient"])
    assert await patients() == [None, None]


async def test_the_audit_reports_an_edited_and_a_missing_position(tlog, service, store, signer):
    events = await sequenced(tlog, service, 2)
    indices = await stored_indices(store, events)
    assert (await audit_log(store, [signer.verifier()])).ok
    first, second = (e["_id"] for e in events)
    await store.positions.update_one({"_id": first}, {"$set": {"index": indices[second]}})
    await store.positions.delete_one({"_id": second})
    problems = (await audit_log(store, [signer.verifier()])).problems
    assert f"entry {indices[first]}: its event's position says {indices[second]}; " in (
        " ".join(problems)
    )
    assert f"entry {indices[second]}: its event has no position (positions begin at 0)" in problems
