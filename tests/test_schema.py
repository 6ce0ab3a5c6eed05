"""The exported SDL: schema.graphql is what the code defines, with the names clients rely on."""

from __future__ import annotations

import re
from pathlib import Path

from schema.root import sdl

ROOT = Path(__file__).resolve().parent.parent


def test_schema_graphql_matches_the_code():
    exported = (ROOT / "schema.graphql").read_text(encoding="utf-8")
    assert exported == sdl(), (
        "schema.graphql drifted from the code: run `make schema` and commit it"
    )


def _fields(text: str, type_name: str) -> set[str]:
    block = re.search(rf"(?:type|input) {type_name}\b[^{{]*\{{(.*?)\n\}}", text, re.S)
    assert block, f"no type {type_name} in the SDL"
    return set(re.findall(r"^\s+(\w+)", block.group(1), re.M))


def test_the_schema_has_the_names_clients_are_promised():
    text = sdl()
    assert {"prescription", "prescriptions", "ledger"} <= _fields(text, "Query")
    assert {
        "issuePrescription",
        "cancelPrescription",
        "rejectPrescription",
        "dispensePrescription",
        "handToCourier",
        "deliverPrescription",
        "confirmReceipt",
        "erasePersonalData",
    } <= _fields(text, "Mutation")
    assert {"id", "status", "version", "history", "integrity"} <= _fields(text, "Prescription")
    assert {"type", "version", "actor", "at", "leafIndex", "leaf", "proof", "receipt"} <= _fields(
        text, "PrescriptionEvent"
    )
    assert {"status", "leafIndex", "proof"} <= _fields(text, "Integrity")
    assert {
        "origin",
        "verifierKey",
        "size",
        "checkpoint",
        "checkpoints",
        "inclusionProof",
        "consistencyProof",
        "entry",
    } <= _fields(text, "Ledger")
    assert {"origin", "size", "rootHash", "note", "anchoredAt"} <= _fields(text, "Checkpoint")
    assert {"leafIndex", "treeSize", "leafHash", "path", "checkpoint"} <= _fields(
        text, "InclusionProof"
    )
    assert {"fromSize", "toSize", "path"} <= _fields(text, "ConsistencyProof")
    assert re.search(r"enum IntegrityStatus \{\s+VERIFIED\s+PENDING\s+TAMPERED\s+ERASED\s+\}", text)
    assert re.search(
        r"union PrescriptionResult = Prescription \| NotFound \| Forbidden \| IllegalTransition \| VersionConflict \| InvalidInput \| Unavailable",
        text,
    )
