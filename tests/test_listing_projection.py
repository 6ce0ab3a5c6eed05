"""Listing prescriptions reads only what the page selects: a page without history or integrity
reads no event (not the ledger's, not the document's copy), and a page with them reads whole
documents and checks them as a single read does. Runs the schema in process against the real
server, watching the commands with a CommandListener."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient, monitoring

from anchoring.anchorer import AnchorSettings
from anchoring.log import LogSettings, TransparencyLog
from anchoring.store import Doc, LogStore
from app.auth import Role, Viewer
from app.feed import PrescriptionFeed
from app.service import LISTED_WITHOUT_CHECKS, PrescriptionService
from schema.loaders import Loaders
from schema.root import make_schema

PRESCRIBER = Viewer("dr-list", Role.PRESCRIBER, "cardiology")

PLAIN = """
query($first: Int!) {
  prescriptions(first: $first) {
    edges { cursor node { id status version patient { id } medications { code } } }
    pageInfo { hasNextPage endCursor }
  }
}
"""

CHECKED = """
query($first: Int!) {
  prescriptions(first: $first) { edges { node { id ...checks } } }
}
fragment checks on Prescription { integrity { status detail } }
"""


class Reads(monitoring.CommandListener):
    def __init__(self) -> None:
        self.reads: list[tuple[str, Any]] = []  # (collection, projection)

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in ("find", "aggregate"):
            name = event.command_name
            self.reads.append((str(event.command[name]), event.command.get("projection")))

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


async def listed(
    mongo_uri: str, db_name: str, tlog: TransparencyLog, query: str
) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    reads = Reads()
    counted: AsyncMongoClient[Doc] = AsyncMongoClient(
        mongo_uri, tz_aware=True, event_listeners=[reads]
    )
    try:
        service = PrescriptionService(tlog, counted[db_name]["prescriptions"])
        service.ledger = counted[db_name]["ledger"]
        log = TransparencyLog(
            LogStore(counted[db_name], tlog.store.origin), tlog.signer, tlog.settings
        )
        context = {
            "log": log,
            "service": service,
            "viewer": PRESCRIBER,
            "loaders": Loaders(service, log, PrescriptionFeed(log)),
            "max_page": 100,
            "metrics": None,
        }
        result = await make_schema().execute(query, {"first": 10}, context_value=context)
        assert result.errors is None, result.errors
        return reads.reads, result.data or {}
    finally:
        await counted.close()


async def test_a_page_without_history_or_integrity_reads_no_event(tlog, mongo_uri, db_name):
    service = PrescriptionService(tlog, tlog.store.db["prescriptions"])
    fields = {
        "department": "cardiology",
        "pharmacy": "ph-1",
        "medications": [{"code": "N02BE01", "name": "Paracetamol", "dose": "1 g", "quantity": 8}],
    }
    issued = [
        await service.issue(PRESCRIBER, {**fields, "patient": {"id": f"p-{i}", "name": "A"}}, None)
        for i in range(3)
    ]
    await tlog.wait_anchored(3, timeout=30)

    reads, data = await listed(mongo_uri, db_name, tlog, PLAIN)
    assert reads == [("prescriptions", LISTED_WITHOUT_CHECKS)], reads
    nodes = [e["node"] for e in data["prescriptions"]["edges"]]
    assert [n["id"] for n in nodes] == [d["_id"] for d in issued]
    assert [n["patient"]["id"] for n in nodes] == ["p-0", "p-1", "p-2"]
    assert all(n["medications"] == [{"code": "N02BE01"}] for n in nodes)
    assert data["prescriptions"]["pageInfo"]["hasNextPage"] is False

    reads, data = await listed(mongo_uri, db_name, tlog, CHECKED)
    assert reads[0] == ("prescriptions", None), reads  # whole documents
    assert "ledger" in {coll for coll, _ in reads}
    checked = [e["node"]["integrity"] for e in data["prescriptions"]["edges"]]
    assert [c["status"] for c in checked] == ["VERIFIED"] * 3, checked
