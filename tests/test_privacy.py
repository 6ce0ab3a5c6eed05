"""No personal data in logs, errors or health endpoints, and erasure that leaves none behind.

A prescription carries a marker patient name and medication; each error path that can be forced
against the real server (a unique-index conflict, a stored state the database refuses, the
database's own error texts) must leave the marker out of the logs (caplog, the uvicorn
process's output), /readyz, /metrics and every answer. Erasure removes everything that came from
the requests, the idempotency keys included, and an event still queued when its prescription is
erased is sequenced without the patient tag."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bson import Binary, ObjectId
from pymongo import AsyncMongoClient
from pymongo.errors import BulkWriteError, DuplicateKeyError
from test_gateway import env_for, running_gateway

from anchoring.anchorer import AnchorSettings
from anchoring.errors import LedgerUnavailable, database_error
from anchoring.ledger import Ledger, group_events
from anchoring.log import LogSettings, TransparencyLog
from anchoring.store import Doc, LogStore
from app.auth import Role, Viewer, load_dev_secret, mint_token
from app.service import PrescriptionService

MARKER = "Quillonmarker"  # a patient name and a medication no other test uses
PRESCRIBER = Viewer("dr-priv", Role.PRESCRIBER, "cardiology")
PHARMACIST = Viewer("ph-priv", Role.PHARMACIST, "ph-priv")
ADMIN = Viewer("admin-priv", Role.ADMIN, None)


def marked_fields(n: int = 0) -> Doc:
    return {
        "patient": {"id": f"pt-priv-{n}", "name": f"{MARKER} Patient"},
        "department": "cardiology",
        "pharmacy": "ph-priv",
        "medications": [{"code": "X01", "name": f"{MARKER}ol", "dose": "1 mg", "quantity": 1}],
    }


async def until(condition: Any, what: str, seconds: float = 10.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        found = await condition()
        if found:
            return found
        assert loop.time() < deadline, f"not within {seconds} s: {what}"
        await asyncio.sleep(0.02)


# --- database errors are named, never quoted ------------------------------------------------------


async def test_database_errors_are_named_by_class_and_code_never_by_their_text(client, db_name):
    collection = client[db_name]["leaky"]
    with pytest.raises(BulkWriteError) as bulk:
        # FerretDB refuses a key with a dot; the error quotes the whole refused document.
        await collection.insert_many([{"_id": 1, "a.b": MARKER}], ordered=False)
    await collection.create_index("name", unique=True)
    await collection.insert_one({"_id": 2, "name": MARKER})
    with pytest.raises(DuplicateKeyError) as duplicate:
        await collection.insert_one({"_id": 3, "name": MARKER})
    assert MARKER in str(bulk.value)  # what the old messages showed
    assert database_error(bulk.value) == "BulkWriteError (code 65)"
    assert database_error(duplicate.value) == "DuplicateKeyError (code 11000)"


async def test_a_failed_append_is_logged_and_refused_without_its_events(client, db_name, caplog):
    """The append's failure path, given the BulkWriteError the server raised for a group
    holding the marker: the log line and the caller's error name only class and code."""
    with pytest.raises(BulkWriteError) as bulk:
        await client[db_name]["leaky"].insert_many([{"_id": 1, "a.b": MARKER}], ordered=False)
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    with caplog.at_level(logging.DEBUG, logger="rxledger"):
        Ledger._fail_all([({}, None, future)], bulk.value)  # type: ignore[list-item]
    with pytest.raises(LedgerUnavailable) as refused:
        await future
    assert "BulkWriteError (code 65)" in str(refused.value) and MARKER not in str(refused.value)
    assert "BulkWriteError (code 65)" in caplog.text and MARKER not in caplog.text


# --- the gateway: forced error paths, then every output grepped -----------------------------------

RESULT = "__typename ... on Prescription { id version } ... on Error { message }"
ISSUE = f"""mutation($input: IssuePrescriptionInput!, $key: String) {{
  issuePrescription(input: $input, idempotencyKey: $key) {{ {RESULT} }} }}"""
DISPENSE = f"""mutation($id: ID!) {{
  dispensePrescription(id: $id, expectedVersion: 1) {{ {RESULT} }} }}"""
READ = "query($id: ID!) { prescription(id: $id) { id version patient { name } } }"


def issue_input(n: int) -> dict[str, Any]:
    return {
        "patient": {"id": f"pt-priv-{n}", "name": f"{MARKER} Patient"},
        "medications": [{"code": "X01", "name": f"{MARKER}ol", "dose": "1 mg", "quantity": 1}],
        "pharmacy": "ph-priv",
    }


def test_forced_database_errors_leave_no_personal_data_in_logs_health_or_answers(
    mongo_uri, db_name, tmp_path
):
    from pymongo import MongoClient

    env = env_for(mongo_uri, db_name, tmp_path, RXLEDGER_RATE_LIMIT="0")
    log_path = tmp_path / "gateway.log"
    bodies: list[str] = []
    with running_gateway(env, log_path) as base, MongoClient(mongo_uri) as direct:
        secret = load_dev_secret(Path(env["RXLEDGER_VAR_DIR"]))
        http = httpx.Client(base_url=base, timeout=20)

        def gql(token: str, query: str, **variables: Any) -> dict[str, Any]:
            r = http.post(
                "/graphql",
                json={"query": query, "variables": variables},
                headers={"Authorization": f"Bearer {token}"},
            )
            bodies.append(r.text)
            assert r.status_code == 200, r.text
            out: dict[str, Any] = r.json()
            return out

        prescriber = mint_token(
            secret=secret, role="PRESCRIBER", subject="dr-priv", organization="cardiology"
        )
        pharmacist = mint_token(
            secret=secret, role="PHARMACIST", subject="ph-anna", organization="ph-priv"
        )
        first = gql(prescriber, ISSUE, input=issue_input(0), key="k0")["data"]
        assert first["issuePrescription"]["__typename"] == "Prescription", first
        rid = first["issuePrescription"]["id"]
        db = direct[db_name]

        # A unique-index conflict: an operator's unique index on the patient's name in the
        # ledger refuses a second prescription for the same name.
        db.ledger.create_index("data.state.patient.name", unique=True, name="by_patient_name")
        second = gql(prescriber, ISSUE, input=issue_input(1), key="k1")["data"]
        assert second["issuePrescription"]["__typename"] != "Prescription", second
        db.ledger.drop_index("by_patient_name")

        # A forged ledger event whose state names another prescription: the next mutation
        # finds the document behind the ledger, and restoring it from that state is refused
        # (its leaf does not prove it), so the mutation is refused as Tampered; neither the
        # answer nor the log may quote the state.
        v1 = db.ledger.find_one({"subject": rid, "version": 1})
        state = {**v1["data"]["state"], "_id": f"{rid}-other", "version": 2}
        db.ledger.insert_one(
            {
                "_id": ObjectId(),
                "subject": rid,
                "version": 2,
                "header": {},
                "leaf": Binary(b"{}"),
                "data": {"state": state},
            }
        )
        dispensed = gql(pharmacist, DISPENSE, id=rid)["data"]["dispensePrescription"]
        assert dispensed["__typename"] == "Tampered", dispensed

        bodies.append(http.get("/readyz").text)
        bodies.append(http.get("/metrics").text)
        http.close()
    output = log_path.read_text(errors="replace")
    assert "Traceback" not in output, output[-3000:]
    for text in [output, *bodies]:
        assert MARKER not in text, text[-3000:]


# --- erasure --------------------------------------------------------------------------------------


@pytest.fixture
async def idle_log(store: LogStore, signer) -> AsyncIterator[TransparencyLog]:
    """A log that queues appends but does not sequence them until the test starts it."""
    log = TransparencyLog(store, signer, LogSettings(anchor=AnchorSettings(interval=0.05)))
    await log.start(sequence=False)
    yield log
    await log.stop()


async def entries_of(store: LogStore, subject: str) -> list[Doc]:
    ids = [e["_id"] async for e in store.ledger.find({"subject": subject}, {"_id": 1})]
    return [e async for e in store.entries.find({"event": {"$in": ids}})]


async def erase_marked(service: PrescriptionService) -> Doc:
    """A marked prescription, issued and dispensed with idempotency keys naming the patient,
    then erased."""
    doc = await service.issue(PRESCRIBER, marked_fields(), f"{MARKER}-issue")
    await service.transition(
        PHARMACIST, "dispensePrescription", doc["_id"], 1, f"{MARKER}-dispense", {}
    )
    return await service.transition(
        ADMIN, "erasePersonalData", doc["_id"], 2, None, {"reason": "legal request"}
    )


async def test_erasure_removes_what_came_from_the_requests_idempotency_keys_included(
    store: LogStore, signer, client: AsyncMongoClient[Doc], db_name: str
):
    log = TransparencyLog(store, signer, LogSettings(anchor=AnchorSettings(interval=0.05)))
    await log.start()
    try:
        service = PrescriptionService(log, client[db_name]["prescriptions"])
        erased = await erase_marked(service)
        await until(
            lambda: _sequenced(store, erased["_id"], 3), "the erasure sequenced and dequeued"
        )
        ledger = [e async for e in store.ledger.find({"subject": erased["_id"]})]
        for event in ledger[:2]:
            assert set(event.get("data", {})) <= {"mutation"}, event["data"]
        for name in await client[db_name].list_collection_names():
            text = str([d async for d in client[db_name][name].find({})])
            assert MARKER not in text and "pt-priv-0" not in text, name
    finally:
        await log.stop()


async def _sequenced(store: LogStore, subject: str, count: int) -> bool:
    queued = await store.pending.count_documents({})
    return queued == 0 and len(await entries_of(store, subject)) == count


async def test_events_still_queued_when_erased_are_sequenced_without_the_patient_tag(
    idle_log: TransparencyLog, store: LogStore, client: AsyncMongoClient[Doc], db_name: str
):
    service = PrescriptionService(idle_log, client[db_name]["prescriptions"])
    erased = await erase_marked(service)
    assert await entries_of(store, erased["_id"]) == []  # all three still queued
    queued = [e async for g in store.pending.find({"count": {"$gte": 1}}) for e in [g]]
    copies = [e for g in queued for e in group_events(g) if e["subject"] == erased["_id"]]
    assert len(copies) == 3 and MARKER not in str(copies)  # the queued copies are redacted

    await idle_log.start(follow=False)  # the sequencer now
    await until(lambda: _sequenced(store, erased["_id"], 3), "the three events sequenced")
    tags = [e.get("tags", {}) for e in await entries_of(store, erased["_id"])]
    assert [t.get("patient") for t in tags] == [None, None, None]
    assert all("status" in t for t in tags)  # only the patient tag is withdrawn


class ScrubsTooEarly(PrescriptionService):
    """An erasure whose scrub of the entries ran before the earlier events were sequenced
    (the sequencer was mid-batch): the entries are written with the tag afterwards."""

    async def _scrub(self, subject: str, erased_version: int) -> None:
        return None


async def test_the_sequenced_erasure_withdraws_the_patient_tag_from_earlier_entries(
    store: LogStore, signer, client: AsyncMongoClient[Doc], db_name: str
):
    log = TransparencyLog(store, signer, LogSettings(anchor=AnchorSettings(interval=0.05)))
    await log.start()
    try:
        service = ScrubsTooEarly(log, client[db_name]["prescriptions"])
        doc = await service.issue(PRESCRIBER, marked_fields(), None)
        await service.transition(PHARMACIST, "dispensePrescription", doc["_id"], 1, None, {})
        await until(lambda: _sequenced(store, doc["_id"], 2), "issue and dispense sequenced")
        tagged = [e["tags"].get("patient") for e in await entries_of(store, doc["_id"])]
        assert all(tagged)  # the entries carry the patient tag until the erasure
        await service.transition(ADMIN, "erasePersonalData", doc["_id"], 2, None, {"reason": "x"})
        await until(lambda: _sequenced(store, doc["_id"], 3), "the erasure sequenced")
        tags = [e.get("tags", {}) for e in await entries_of(store, doc["_id"])]
        assert [t.get("patient") for t in tags] == [None, None, None]
    finally:
        await log.stop()
