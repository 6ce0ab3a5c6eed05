"""The prescription domain: states, the transitions between them, and the ledger event each
step appends (who may take a step is app/policy.py's). Pure: no database, no clock of its own,
no GraphQL.

A prescription document (the projection kept in `prescriptions`):

    {_id, status, version, salt, lastLeafHash, patient: {id, name}, prescriber, department,
     medications: [{code, name, dose, quantity, instructions}], notes, pharmacy, courier,
     courierOrganization, reason, issuedAt, updatedAt, timestamps: {STATUS: time}, erased}

The leaf of each event is the header `{v, subject, version, type, actor, at, prev, stateDigest,
payloadDigest}`: no personal data, only salted digests of the state and the request, so proofs
can be handed to anyone and erasing the salt leaves the log verifiable.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import os
from dataclasses import dataclass
from typing import Any

from anchoring.encoding import b64, canonical_json
from app.auth import Role, Viewer

HEADER_VERSION = 1
SALT_BYTES = 32


class Status(enum.StrEnum):
    ISSUED = "ISSUED"
    CANCELLED = "CANCELLED"
    REJECTED = "REJECTED"
    DISPENSED = "DISPENSED"
    IN_TRANSIT = "IN_TRANSIT"
    DELIVERED = "DELIVERED"
    CONFIRMED = "CONFIRMED"


class EventType(enum.StrEnum):
    ISSUED = "ISSUED"
    CANCELLED = "CANCELLED"
    REJECTED = "REJECTED"
    DISPENSED = "DISPENSED"
    HANDED_TO_COURIER = "HANDED_TO_COURIER"
    DELIVERED = "DELIVERED"
    RECEIPT_CONFIRMED = "RECEIPT_CONFIRMED"
    PERSONAL_DATA_ERASED = "PERSONAL_DATA_ERASED"


# Fields that identify or describe the patient or their treatment: redacted for auditors,
# removed by erasure.
PERSONAL_FIELDS = ("patient", "medications", "notes", "reason")
# The fields a state digest covers (the document minus its bookkeeping).
STATE_FIELDS = (
    "status",
    "patient",
    "prescriber",
    "department",
    "medications",
    "notes",
    "pharmacy",
    "courier",
    "courierOrganization",
    "reason",
    "issuedAt",
    "updatedAt",
    "timestamps",
    "erased",
)


@dataclass(frozen=True)
class Transition:
    """A lifecycle step: the mutation that takes it, the states it leaves, where it goes."""

    mutation: str
    event: EventType
    sources: frozenset[Status]
    target: Status


TRANSITIONS: dict[str, Transition] = {
    t.mutation: t
    for t in (
        Transition(
            "cancelPrescription", EventType.CANCELLED, frozenset({Status.ISSUED}), Status.CANCELLED
        ),
        Transition(
            "rejectPrescription", EventType.REJECTED, frozenset({Status.ISSUED}), Status.REJECTED
        ),
        Transition(
            "dispensePrescription",
            EventType.DISPENSED,
            frozenset({Status.ISSUED}),
            Status.DISPENSED,
        ),
        Transition(
            "handToCourier",
            EventType.HANDED_TO_COURIER,
            frozenset({Status.DISPENSED}),
            Status.IN_TRANSIT,
        ),
        Transition(
            "deliverPrescription",
            EventType.DELIVERED,
            frozenset({Status.IN_TRANSIT, Status.DISPENSED}),
            Status.DELIVERED,
        ),
        Transition(
            "confirmReceipt",
            EventType.RECEIPT_CONFIRMED,
            frozenset({Status.DELIVERED}),
            Status.CONFIRMED,
        ),
    )
}


class Refused(Exception):
    """An expected refusal; `kind` names the GraphQL error type."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def now() -> dt.datetime:
    """The current time at the millisecond precision BSON keeps (digests must round-trip)."""
    t = dt.datetime.now(dt.UTC)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def timestamp(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_salt() -> bytes:
    return os.urandom(SALT_BYTES)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return timestamp(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def state_of(doc: dict[str, Any]) -> dict[str, Any]:
    """The part of a document a state digest covers, as JSON values."""
    state = {k: doc[k] for k in STATE_FIELDS if k in doc and doc[k] is not None}
    state["id"] = doc["_id"]
    return dict(_jsonable(state))


def digest(salt: bytes, value: Any) -> str:
    """base64 SHA-256(salt ‖ JCS(value))."""
    return b64(hashlib.sha256(salt + canonical_json(_jsonable(value))).digest())


def actor_ref(viewer: Viewer) -> str:
    """Who acted, as the leaf records it. A patient is the prescription's own subject, so the
    leaf says only the role: a patient's identifier is personal data and stays out of leaves."""
    if viewer.role is Role.PATIENT:
        return Role.PATIENT.value
    return f"{viewer.role.value}:{viewer.subject}"


def actor_record(viewer: Viewer) -> dict[str, Any]:
    """Who acted, as the application keeps it (beside the leaf; erased with personal data)."""
    return {"sub": viewer.subject, "role": viewer.role.value, "org": viewer.organization}


def header(
    doc: dict[str, Any],
    event: EventType,
    viewer: Viewer,
    at: dt.datetime,
    prev: bytes | None,
    payload: dict[str, Any],
) -> dict[str, Any]:
    """The leaf header of the event that produced `doc` (already at its new version)."""
    # After an erasure there is no salt: the digests are then of impersonal values only.
    salt = bytes(doc["salt"]) if doc.get("salt") is not None else b""
    return {
        "v": HEADER_VERSION,
        "subject": doc["_id"],
        "version": doc["version"],
        "type": event.value,
        "actor": actor_ref(viewer),
        "at": timestamp(at),
        "prev": None if prev is None else b64(prev),
        "stateDigest": digest(salt, state_of(doc)),
        "payloadDigest": digest(salt, payload),
    }


def cleared_tags(event: EventType) -> tuple[str, ...]:
    """The routing tags an event withdraws from its prescription's earlier entries: an
    erasure leaves no patient tag on any entry, even one still queued when it was erased."""
    return ("patient",) if event is EventType.PERSONAL_DATA_ERASED else ()


def check_transition(doc: dict[str, Any], mutation: str) -> Transition:
    """The transition `mutation` takes from `doc`'s status; raises Refused("IllegalTransition")
    when that status does not allow it. Who may take it is app.policy's."""
    step = TRANSITIONS[mutation]
    status = Status(doc["status"])
    if status not in step.sources:
        allowed = ", ".join(sorted(s.value for s in step.sources))
        raise Refused(
            "IllegalTransition",
            f"{mutation} needs status {allowed}; the prescription is {status.value}",
        )
    return step


def apply_transition(
    doc: dict[str, Any],
    step: Transition,
    at: dt.datetime,
    args: dict[str, Any],
) -> dict[str, Any]:
    """The document after `step` (a new dict; `doc` is not changed)."""
    new = dict(doc)
    new["status"] = step.target.value
    new["version"] = doc["version"] + 1
    new["updatedAt"] = at
    new["timestamps"] = {**doc.get("timestamps", {}), step.target.value: at}
    if step.mutation == "handToCourier":
        new["courier"] = args["courier"]
        if args.get("courierOrganization"):
            new["courierOrganization"] = args["courierOrganization"]
    if args.get("reason"):
        new["reason"] = args["reason"]
    return new


def erase(doc: dict[str, Any], at: dt.datetime, viewer: Viewer, reason: str) -> dict[str, Any]:
    """The document after a legal erasure: no personal fields, no salt."""
    new = {k: v for k, v in doc.items() if k not in PERSONAL_FIELDS and k != "salt"}
    # Who acted stays as the leaves say it (a patient only as PATIENT).
    new["events"] = [
        {**e, "actor": {"role": e["actor"]["role"]}} if e.get("actor") else e
        for e in doc.get("events", [])
    ]
    new["version"] = doc["version"] + 1
    new["updatedAt"] = at
    new["erased"] = {"at": at, "by": actor_ref(viewer), "reason": reason}
    return new


# --- requests ----------------------------------------------------------------------------

LIMITS = {
    "patient.id": 128,
    "patient.name": 200,
    "department": 120,
    "pharmacy": 128,
    "notes": 4000,
    "code": 64,
    "name": 200,
    "dose": 120,
    "instructions": 1000,
    "reason": 1000,
    "courier": 128,
    "courierOrganization": 128,
    "idempotencyKey": 200,
}
MAX_MEDICATIONS = 50
MAX_QUANTITY = 100_000


def text(value: Any, field: str, *, required: bool = True) -> str | None:
    """A trimmed string within its length limit, without control characters."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise Refused("InvalidInput", f"{field} is required and must not be blank")
        return None
    if not isinstance(value, str):
        raise Refused("InvalidInput", f"{field} must be a string")
    stripped: str = value.strip()
    limit = LIMITS[field.rsplit(".", 1)[-1] if field.startswith("medications") else field]
    if len(stripped) > limit:
        raise Refused("InvalidInput", f"{field} has {len(stripped)} characters, at most {limit}")
    if any(ord(c) < 0x20 and c not in "\n\t" for c in stripped):
        raise Refused("InvalidInput", f"{field} contains control characters")
    return stripped


def issue_fields(
    patient_id: Any,
    patient_name: Any,
    department: Any,
    pharmacy: Any,
    medications: list[dict[str, Any]],
    notes: Any,
) -> dict[str, Any]:
    """The validated fields of a new prescription; raises Refused("InvalidInput")."""
    if not 1 <= len(medications) <= MAX_MEDICATIONS:
        raise Refused(
            "InvalidInput",
            f"a prescription lists 1 to {MAX_MEDICATIONS} medications, got {len(medications)}",
        )
    meds = []
    for i, m in enumerate(medications):
        quantity = m.get("quantity")
        if isinstance(quantity, bool) or not isinstance(quantity, int):
            raise Refused("InvalidInput", f"medications[{i}].quantity must be an integer")
        if not 1 <= quantity <= MAX_QUANTITY:
            raise Refused(
                "InvalidInput",
                f"medications[{i}].quantity is {quantity}, must be 1 to {MAX_QUANTITY}",
            )
        med = {
            "code": text(m.get("code"), f"medications[{i}].code"),
            "name": text(m.get("name"), f"medications[{i}].name"),
            "dose": text(m.get("dose"), f"medications[{i}].dose"),
            "quantity": quantity,
        }
        instructions = text(m.get("instructions"), f"medications[{i}].instructions", required=False)
        if instructions is not None:
            med["instructions"] = instructions
        meds.append(med)
    fields: dict[str, Any] = {
        "patient": {
            "id": text(patient_id, "patient.id"),
            "name": text(patient_name, "patient.name"),
        },
        "department": text(department, "department"),
        "pharmacy": text(pharmacy, "pharmacy"),
        "medications": meds,
    }
    note = text(notes, "notes", required=False)
    if note is not None:
        fields["notes"] = note
    return fields
