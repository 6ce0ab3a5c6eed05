"""An attacker who can write the database, against a real gateway: `integrity`, history proofs
and mutations come from the ledger and the signed tree, never from the document's copy.

Each case edits what the gateway stored through a plain MongoDB client, the way an operator
with database access could, then reads or mutates over real HTTP. A case ends `TAMPERED` (with a
detail naming the event) or repaired from the ledger where the ledger proves what the document
should be; `rxledger audit` and `integrity` never disagree about the log.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bson import Binary, ObjectId
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymongo import MongoClient
from test_gateway import env_for
from test_prescriptions import (
    LIMITS,
    ROOT,
    Gateway,
    Parties,
    call,
    launch,
    ledger_count,
    refused,
    running,
    wait_anchored,
    wait_for,
)

from anchoring.encoding import canonical_json
from anchoring.hashing import leaf_hash
from anchoring.ledger import event_id
from anchoring.note import Signer
from app import prescriptions as rx
from app.auth import Role, Viewer

Mongo = MongoClient[dict[str, Any]]


def fabricate(
    mongo: Mongo, db: str, rid: str, mutation: str, viewer: Viewer, args: dict[str, Any]
) -> dict[str, Any]:
    """Write into the document a step the ledger never saw, self-consistent the way the
    gateway would have made it (state digest, hash chain, canonical leaf). Returns it."""
    prescriptions = mongo[db]["prescriptions"]
    doc = prescriptions.find_one({"_id": rid})
    assert doc is not None
    step = rx.TRANSITIONS[mutation]
    at = rx.now()
    new = rx.apply_transition(doc, step, at, args)
    header = rx.header(new, step.event, viewer, at, bytes(doc["lastLeafHash"]), args)
    leaf = canonical_json(header)
    new["lastLeafHash"] = Binary(leaf_hash(leaf))
    new["events"] = [
        *doc["events"],
        {
            "id": ObjectId(),
            "version": new["version"],
            "type": step.event.value,
            "at": at,
            "actor": rx.actor_record(viewer),
            "leaf": Binary(leaf),
        },
    ]
    prescriptions.replace_one({"_id": rid}, new)
    return new


def forge_handoff(p: Parties, mongo: Mongo, rid: str, courier: str, org: str) -> dict[str, Any]:
    """Fabricate, in the document only, this test's pharmacist handing `rid` to `courier`."""
    pharmacist = Viewer(f"ph-{p.uid}", Role.PHARMACIST, p.pharmacy)
    args = {"courier": courier, "courierOrganization": org}
    return fabricate(mongo, p.gw.db, rid, "handToCourier", pharmacist, args)


def audit(gateway: Gateway, mongo_uri: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "audit", "--quiet", "--key", gateway.verifier_key()],
        cwd=ROOT,
        env=env_for(mongo_uri, gateway.db, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def gateway(mongo_uri: str, databases: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A gateway of this module's own, so `rxledger audit` sees only these tests' log."""
    launched = launch(mongo_uri, databases.new(), tmp_path_factory.mktemp("gateway"), **LIMITS)
    with running(launched) as (gw,):
        yield gw


@pytest.fixture
def p(gateway: Gateway) -> Parties:
    return Parties(gateway)


def dispensed_and_anchored(p: Parties) -> str:
    rid = p.issued()
    p.advance(rid, "DISPENSED")
    wait_anchored(p, rid)
    return rid


def tampered(p: Parties, rid: str, *fragments: str) -> dict[str, Any]:
    rx_ = p.read(rid)
    integrity = rx_["integrity"]
    assert integrity["status"] == "TAMPERED", integrity
    assert integrity["proof"] is None, integrity
    for fragment in fragments:
        assert fragment in integrity["detail"], integrity["detail"]
    return rx_


def test_a_fabricated_event_appended_to_a_document_is_tampered(p, mongo):
    rid = dispensed_and_anchored(p)
    forge_handoff(p, mongo, rid, "c-7", f"rogue-{p.uid}")
    rx_ = tampered(p, rid, "event 3", "not in the ledger")
    # History is the ledger's: the fabricated step is not shown as one of its events.
    assert [e["type"] for e in rx_["history"]] == ["ISSUED", "DISPENSED"]
    assert all(e["proof"] for e in rx_["history"])


def test_a_fabricated_handoff_cannot_be_extended_by_the_courier_it_names(
    p, mongo, mongo_uri, tmp_path
):
    # The attack as tried: a forged HANDED_TO_COURIER step to another company's courier, which
    # then delivers. The mutation extends the ledger's newest event, not the document's.
    rid = dispensed_and_anchored(p)
    rogue_org = f"rogue-{p.uid}"
    forge_handoff(p, mongo, rid, "c-rogue", rogue_org)
    rogue = p.gw.token("COURIER", "c-rogue", rogue_org)
    result = call(p.gw, rogue, "deliverPrescription", id=rid, expectedVersion=3)
    assert result["__typename"] != "Prescription", result
    assert ledger_count(p.gw, mongo, rid) == 2
    # The document was restored from the ledger: version 2, dispensed, verified again.
    rx_ = wait_anchored(p, rid)
    assert (rx_["status"], rx_["version"], rx_["courier"]) == ("DISPENSED", 2, None)
    # The real hand-over goes on from the ledger's version.
    handed = p.hand_over(rid, 2)
    assert (handed["__typename"], handed.get("version")) == ("Prescription", 3), handed
    wait_anchored(p, rid)
    checked = audit(p.gw, mongo_uri, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_document_copy_missing_an_event_from_the_middle_is_tampered(p, mongo):
    rid = dispensed_and_anchored(p)
    handed = p.hand_over(rid, 2)
    assert handed["__typename"] == "Prescription", handed
    wait_anchored(p, rid)
    prescriptions = mongo[p.gw.db]["prescriptions"]
    events = prescriptions.find_one({"_id": rid})["events"]
    kept = [e for e in events if e["version"] != 2]
    assert len(kept) == 2
    prescriptions.update_one({"_id": rid}, {"$set": {"events": kept}})
    tampered(p, rid, "event 2")


def test_an_event_removed_from_the_ledger_is_tampered_and_the_audit_agrees(
    p, mongo, mongo_uri, tmp_path
):
    rid = dispensed_and_anchored(p)
    removed = mongo[p.gw.db]["ledger"].delete_one({"subject": rid, "version": 1})
    assert removed.deleted_count == 1
    rx_ = tampered(p, rid, "version 1")
    assert [e["version"] for e in rx_["history"]] == [2]
    checked = audit(p.gw, mongo_uri, tmp_path)
    assert checked.returncode == 1, checked.stdout + checked.stderr


def test_an_edited_ledger_header_is_tampered_and_the_audit_agrees(p, mongo, mongo_uri, tmp_path):
    rid = dispensed_and_anchored(p)
    changed = mongo[p.gw.db]["ledger"].update_one(
        {"subject": rid, "version": 1}, {"$set": {"header.actor": "PRESCRIBER:mallory"}}
    )
    assert changed.modified_count == 1
    tampered(p, rid, "event 1")
    checked = audit(p.gw, mongo_uri, tmp_path)
    assert checked.returncode == 1, checked.stdout + checked.stderr


def test_a_ledger_leaf_rewritten_consistently_is_tampered_against_the_signed_tree(p, mongo):
    # Leaf, header and the document's copy all say the same, and the chain holds: only the
    # authenticated tiles of the signed tree tell.
    rid = dispensed_and_anchored(p)
    db = mongo[p.gw.db]
    event = db["ledger"].find_one({"subject": rid, "version": 2})
    header = {**event["header"], "actor": "PHARMACIST:mallory"}
    leaf = Binary(canonical_json(header))
    db["ledger"].update_one(
        {"_id": event["_id"]},
        {"$set": {"header": header, "leaf": leaf, "data.actor.sub": "mallory"}},
    )
    db["prescriptions"].update_one(
        {"_id": rid},
        {
            "$set": {
                "events.1.leaf": leaf,
                "events.1.actor.sub": "mallory",
                "lastLeafHash": Binary(leaf_hash(bytes(leaf))),
            }
        },
    )
    rx_ = tampered(p, rid, "event 2", "signed tree")
    # No proof or receipt is built over the rewritten bytes.
    assert rx_["history"][1]["proof"] is None and rx_["history"][1]["receipt"] is None


def test_an_edited_leaf_in_the_documents_copy_is_tampered(p, mongo):
    rid = dispensed_and_anchored(p)
    prescriptions = mongo[p.gw.db]["prescriptions"]
    events = prescriptions.find_one({"_id": rid})["events"]
    leaf = bytes(events[0]["leaf"]).replace(b'"ISSUED"', b'"ISSUED" ')
    prescriptions.update_one({"_id": rid}, {"$set": {"events.0.leaf": Binary(leaf)}})
    tampered(p, rid, "event 1", "copy")


def test_two_documents_with_their_events_swapped_are_both_tampered(p, mongo):
    first, second = dispensed_and_anchored(p), dispensed_and_anchored(p)
    prescriptions = mongo[p.gw.db]["prescriptions"]
    a, b = (prescriptions.find_one({"_id": rid}) for rid in (first, second))
    for rid, other in ((first, b), (second, a)):
        prescriptions.update_one(
            {"_id": rid},
            {"$set": {"events": other["events"], "lastLeafHash": other["lastLeafHash"]}},
        )
    tampered(p, first, "event 1")
    tampered(p, second, "event 1")


def test_a_document_rolled_back_on_a_gateway_that_never_saw_it_change_is_caught(
    p, mongo, mongo_uri, tmp_path
):
    # A second gateway starts after the step was logged: its feed never saw it, and its
    # start-up sweep ran before the rollback.
    rid = dispensed_and_anchored(p)
    fresh = launch(
        mongo_uri, p.gw.db, tmp_path / "fresh", RXLEDGER_VAR_DIR=str(p.gw.var_dir), **LIMITS
    )
    with running(fresh) as (other,):
        db = mongo[p.gw.db]
        first = db["ledger"].find_one({"subject": rid, "version": 1})
        db["prescriptions"].replace_one({"_id": rid}, first["data"]["state"])
        seen = Parties(other, uid=p.uid).read(rid)
        assert (seen["status"], seen["version"]) == ("DISPENSED", 2) or seen["integrity"][
            "status"
        ] == "TAMPERED", (seen["status"], seen["version"], seen["integrity"])
        if seen["integrity"]["status"] == "TAMPERED":
            assert "version 2" in seen["integrity"]["detail"], seen["integrity"]
        # A mutation on it extends the ledger's version 2, never the document's version 1.
        stale = call(
            other, p.pharmacist, "rejectPrescription", id=rid, expectedVersion=1, reason="x"
        )
        refused(stale, "VersionConflict")
        assert ledger_count(p.gw, mongo, rid) == 2
        restored = wait_for(
            lambda: (r := Parties(other, uid=p.uid).read(rid))["version"] == 2 and r,
            "the document restored from the ledger",
        )
        assert restored["status"] == "DISPENSED"


def test_an_edited_field_is_never_carried_into_the_next_event(p, mongo):
    # Version and last leaf hash left as they are; only who carries it changed: the mutation
    # must not build its event on the edited state.
    rid = dispensed_and_anchored(p)
    assert p.hand_over(rid, 2)["__typename"] == "Prescription"
    wait_anchored(p, rid)
    rogue_org = f"rogue-{p.uid}"
    mongo[p.gw.db]["prescriptions"].update_one(
        {"_id": rid}, {"$set": {"courier": "c-rogue", "courierOrganization": rogue_org}}
    )
    rogue = p.gw.token("COURIER", "c-rogue", rogue_org)
    result = call(p.gw, rogue, "deliverPrescription", id=rid, expectedVersion=3)
    assert result["__typename"] != "Prescription", result
    assert ledger_count(p.gw, mongo, rid) == 3
    rx_ = wait_anchored(p, rid)
    assert (rx_["version"], rx_["courier"], rx_["courierOrganization"]) == (
        3,
        "c-7",
        p.courier_org,
    )


def plant_never_queued_event(p: Parties, mongo: Mongo, rid: str, under_id: Any) -> None:
    """Write straight into `ledger` (no intent in `pending`) the forged version 3 of `rid`,
    chained and digested as the gateway would, under `_id` `under_id`; the document claims it."""
    forged = forge_handoff(p, mongo, rid, "c-rogue", f"rogue-{p.uid}")
    newest = forged["events"][-1]
    newest["id"] = under_id
    mongo[p.gw.db]["prescriptions"].replace_one({"_id": rid}, forged)
    mongo[p.gw.db]["ledger"].insert_one(
        {
            "_id": under_id,
            "subject": rid,
            "version": 3,
            "header": json.loads(bytes(newest["leaf"])),
            "leaf": newest["leaf"],
            "data": {"state": forged, "actor": newest["actor"], "mutation": "handToCourier"},
        }
    )


def test_a_ledger_event_that_was_never_queued_is_never_extended(p, mongo):
    # Planted under the `_id` the ledger derives from (subject, version 3): where the gateway
    # reads version 3, so what an attacker who wants the event read must do. The log will
    # never sequence it, so it reads as tampered and no mutation may build on it.
    rid = dispensed_and_anchored(p)
    plant_never_queued_event(p, mongo, rid, event_id(rid, 3))
    rogue = p.gw.token("COURIER", "c-rogue", f"rogue-{p.uid}")
    result = call(p.gw, rogue, "deliverPrescription", id=rid, expectedVersion=3)
    assert result["__typename"] != "Prescription", result
    assert ledger_count(p.gw, mongo, rid) == 3  # two real events and the forged one; no 4th
    tampered(p, rid, "event 3")


def test_a_ledger_event_planted_under_another_id_is_never_read_nor_extended(p, mongo):
    # Under any other `_id`, the gateway never reads it: a prescription's events are read by
    # their derived `_id`s, and history is what the signed tree proves of those. The document
    # claiming it is restored from the ledger (version 2), which verifies; the planted event
    # is never extended.
    rid = dispensed_and_anchored(p)
    plant_never_queued_event(p, mongo, rid, ObjectId())
    rogue = p.gw.token("COURIER", "c-rogue", f"rogue-{p.uid}")
    result = call(p.gw, rogue, "deliverPrescription", id=rid, expectedVersion=3)
    assert result["__typename"] != "Prescription", result
    assert ledger_count(p.gw, mongo, rid) == 3  # two real events and the planted one; no 4th
    read = p.read(rid)
    assert read["version"] == 2, read
    assert [e["version"] for e in read["history"]] == [1, 2], read["history"]
    assert read["integrity"]["status"] == "VERIFIED", read["integrity"]


def test_a_checkpoint_not_signed_by_the_log_is_never_used(mongo_uri, databases, mongo, tmp_path):
    launched = launch(mongo_uri, databases.new(), tmp_path / "gw", **LIMITS)
    with running(launched) as (gw,):
        q = Parties(gw)
        rid = q.issued()
        wait_anchored(q, rid)
        notarizations = mongo[gw.db]["notarizations"]
        latest = notarizations.find_one(sort=[("_id", -1)])
        text = latest["note"].split("\n\n")[0] + "\n"
        forger = Signer(gw.verifier_key().split("+")[0], Ed25519PrivateKey.generate())
        notarizations.update_one({"_id": latest["_id"]}, {"$set": {"note": forger.sign_note(text)}})
        # (the gateway may answer from the checkpoint it read before, for half a second)
        rx_ = wait_for(
            lambda: (r := q.read(rid))["integrity"]["status"] != "VERIFIED" and r,
            "the forged checkpoint to be read",
            timeout=10,
        )
        assert rx_["integrity"]["proof"] is None
        assert all(e["proof"] is None for e in rx_["history"]), rx_["history"]
        out = gw.gql(
            "query($i: Int!) { ledger { inclusionProof(leafIndex: $i) { treeSize } } }",
            None,
            i=rx_["history"][0]["leafIndex"],
        )
        assert out["errors"][0]["extensions"]["code"] == "PROOF_UNAVAILABLE", out


def test_an_entry_whose_leaf_was_edited_gets_no_proof(p, mongo):
    rid = dispensed_and_anchored(p)
    index = p.read(rid)["history"][0]["leafIndex"]
    entries = mongo[p.gw.db]["entries"]
    entry = entries.find_one({"_id": index})
    edited = bytes(entry["leaf"]).replace(b'"ISSUED"', b'"CANCELLED"')
    entries.update_one({"_id": index}, {"$set": {"leaf": Binary(edited)}})
    out = p.gw.gql(
        "query($i: Int!) { ledger { inclusionProof(leafIndex: $i) { bundle } } }", None, i=index
    )
    assert out["data"] is None or out["data"]["ledger"] is None, out
    assert out["errors"][0]["extensions"]["code"] == "PROOF_UNAVAILABLE", out
    assert f"entry {index}" in out["errors"][0]["message"], out
