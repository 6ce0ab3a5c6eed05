"""GraphQL types, queries and mutations for prescriptions.

Expected failures of a mutation are members of its result union (NotFound, Forbidden,
IllegalTransition, VersionConflict, InvalidInput, Unavailable, Tampered), never stack traces. Reads
check authorization on every node: a prescription the viewer may not see is null, as if
absent, and auditors get every personal field as null.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable
from typing import Annotated, Any

import strawberry
from strawberry.types import Info
from strawberry.types.nodes import SelectedField, Selection

from anchoring.encoding import b64
from anchoring.store import Doc
from app import policy
from app import prescriptions as rx
from app.auth import Viewer
from app.limits import ClientError
from app.prescriptions import Refused
from app.service import (
    LISTED_WITHOUT_CHECKS,
    EventProof,
    PrescriptionService,
    decode_cursor,
    encode_cursor,
    leaf_header,
    shown_actor,
)
from schema.ledger import InclusionProof, PageInfo, Receipt, bundle_json, page_size
from schema.loaders import Loaders

Status = strawberry.enum(rx.Status, description="Where a prescription is in its lifecycle.")


@strawberry.enum(description="Whether a prescription's document agrees with the ledger.")
class IntegrityStatus(enum.Enum):
    VERIFIED = "VERIFIED"
    PENDING = "PENDING"
    TAMPERED = "TAMPERED"
    ERASED = "ERASED"


# --- context --------------------------------------------------------------------------


def viewer_of(info: Info) -> Viewer | None:
    viewer: Viewer | None = info.context.get("viewer")
    return viewer


def signed_in(info: Info) -> Viewer:
    viewer = viewer_of(info)
    if viewer is None and info.context.get("auth_error"):
        raise ClientError(info.context["auth_error"], "UNAUTHENTICATED")
    if viewer is None:
        raise ClientError(
            "authentication required: send 'Authorization: Bearer <token>' "
            "(`rxledger token --role ROLE --sub ID` mints one in development)",
            "UNAUTHENTICATED",
        )
    return viewer


def loaders(info: Info) -> Loaders:
    found: Loaders = info.context["loaders"]
    return found


def service(info: Info) -> PrescriptionService:
    found: PrescriptionService = info.context["service"]
    return found


# --- output types -----------------------------------------------------------------------


@strawberry.type
class Patient:
    id: str
    name: str


@strawberry.type
class Medication:
    code: str
    name: str
    dose: str
    quantity: int
    instructions: str | None


@strawberry.type(description="When the prescription reached a status.")
class StatusTime:
    status: Status  # type: ignore[valid-type]
    at: dt.datetime


@strawberry.type(description="A legal erasure of the personal data.")
class Erasure:
    at: dt.datetime
    by: str
    reason: str | None = strawberry.field(
        description="free text that may name the patient: null when personal fields are "
        "withheld from you (auditors)"
    )


@strawberry.type(description="One ledger event of a prescription, with its proof.")
class PrescriptionEvent:
    type: str
    version: int
    actor: str
    at: str = strawberry.field(description="RFC 3339 time recorded in the leaf")
    leaf_index: int | None = strawberry.field(description="null until sequenced")
    leaf: str = strawberry.field(description="base64 leaf bytes (RFC 8785 JSON header)")
    # What the proof and the receipt are made of, made into them only when selected.
    examined: strawberry.Private[EventProof]

    @strawberry.field(description="null until anchored")
    def proof(self) -> InclusionProof | None:
        proof = self.examined.proof
        return None if proof is None else InclusionProof.of(proof)

    @strawberry.field(description="signed receipt while sequenced but not yet anchored")
    def receipt(self, info: Info) -> Receipt | None:
        receipt = self.examined.receipt(info.context["log"])  # signed once per leaf
        return None if receipt is None else Receipt.of(receipt)

    @strawberry.field(
        description="the proof bundle JSON (as proof.bundle, and as `rxledger export-proof` "
        "writes it): null until anchored"
    )
    def bundle(self) -> str | None:
        proof = self.examined.proof
        return None if proof is None else bundle_json(proof)


@strawberry.type(description="Whether the document matches the ledger, with the proof.")
class Integrity:
    status: IntegrityStatus
    leaf_index: int | None = strawberry.field(description="the latest event's leaf index")
    proof: InclusionProof | None = strawberry.field(
        description="inclusion proof of the latest event (VERIFIED and ERASED)"
    )
    detail: str


@strawberry.type(description="A prescription: its current state, history and proofs.")
class Prescription:
    doc: strawberry.Private[Doc]
    hidden: strawberry.Private[bool]  # personal fields redacted for this viewer

    @strawberry.field
    def id(self) -> strawberry.ID:
        return strawberry.ID(self.doc["_id"])

    @strawberry.field
    def status(self) -> Status:  # type: ignore[valid-type]
        return rx.Status(self.doc["status"])

    @strawberry.field
    def version(self) -> int:
        return int(self.doc["version"])

    @strawberry.field(description="true when personal fields are withheld (auditors, erasure)")
    def redacted(self) -> bool:
        return self.hidden or "erased" in self.doc

    def _personal(self, field: str) -> Any:
        return None if self.hidden else self.doc.get(field)

    @strawberry.field
    def patient(self) -> Patient | None:
        p = self._personal("patient")
        return None if p is None else Patient(id=p["id"], name=p["name"])

    @strawberry.field
    def medications(self) -> list[Medication] | None:
        meds = self._personal("medications")
        if meds is None:
            return None
        return [
            Medication(
                code=m["code"],
                name=m["name"],
                dose=m["dose"],
                quantity=m["quantity"],
                instructions=m.get("instructions"),
            )
            for m in meds
        ]

    @strawberry.field
    def notes(self) -> str | None:
        notes: str | None = self._personal("notes")
        return notes

    @strawberry.field(description="why it was cancelled or rejected")
    def reason(self) -> str | None:
        reason: str | None = self._personal("reason")
        return reason

    @strawberry.field
    def prescriber(self) -> str:
        return str(self.doc["prescriber"])

    @strawberry.field
    def department(self) -> str | None:
        return self.doc.get("department")

    @strawberry.field
    def pharmacy(self) -> str | None:
        return self.doc.get("pharmacy")

    @strawberry.field
    def courier(self) -> str | None:
        return self.doc.get("courier")

    @strawberry.field
    def courier_organization(self) -> str | None:
        return self.doc.get("courierOrganization")

    @strawberry.field
    def issued_at(self) -> dt.datetime:
        at: dt.datetime = self.doc["issuedAt"]
        return at

    @strawberry.field
    def updated_at(self) -> dt.datetime:
        at: dt.datetime = self.doc["updatedAt"]
        return at

    @strawberry.field(description="when each status was reached, in lifecycle order")
    def timeline(self) -> list[StatusTime]:
        times = self.doc.get("timestamps", {})
        return sorted(
            (StatusTime(status=rx.Status(s), at=at) for s, at in times.items()),
            key=lambda t: t.at,
        )

    @strawberry.field
    def erased(self) -> Erasure | None:
        e = self.doc.get("erased")
        if e is None:
            return None
        return Erasure(at=e["at"], by=e["by"], reason=None if self.hidden else e["reason"])

    @strawberry.field(
        description="every ledger event of this prescription, oldest first (read from the "
        "ledger, never from the document); proof and receipt are given only for an event "
        "whose leaf is the one the signed tree holds"
    )
    async def history(self, info: Info) -> list[PrescriptionEvent]:
        examined = await loaders(info).examined(self.doc)
        events = await loaders(info).events.load(self.doc["_id"])
        out = []
        for event, proof in zip(events, examined.proofs, strict=True):
            # What the leaf says; a malformed one (integrity says TAMPERED) is shown as such.
            header = leaf_header(bytes(event["leaf"]))
            out.append(
                PrescriptionEvent(
                    type=str(header.get("type", "MALFORMED")),
                    version=int(event["version"]),
                    actor=shown_actor(self.doc, event, header, self.hidden),
                    at=str(header.get("at", "")),
                    leaf_index=proof.leaf_index,
                    leaf=b64(bytes(event["leaf"])),
                    examined=proof,
                )
            )
        return out

    @strawberry.field(
        description="does the document match its ledger events, and are they all in the signed tree"
    )
    async def integrity(self, info: Info) -> Integrity:
        result = (await loaders(info).examined(self.doc)).integrity
        if result.behind:
            # Rolled back, or its update failed after the append: the next read has it back.
            await service(info).repair(self.doc["_id"], stale=self.doc)
        return Integrity(
            status=IntegrityStatus(result.status),
            leaf_index=result.leaf_index,
            proof=None if result.proof is None else InclusionProof.of(result.proof),
            detail=result.detail,
        )


def present(info: Info, doc: Doc | None) -> Prescription | None:
    """The prescription as this viewer may see it (None when they may not)."""
    viewer = viewer_of(info)
    if doc is None or viewer is None or not policy.can_see(viewer, doc):
        return None
    return Prescription(doc=doc, hidden=policy.personal_data_hidden(viewer))


@strawberry.type
class PrescriptionEdge:
    cursor: str
    node: Prescription


@strawberry.type
class PrescriptionConnection:
    edges: list[PrescriptionEdge]
    page_info: PageInfo


@strawberry.input(description="All given conditions must hold.")
class PrescriptionFilter:
    status: list[Status] | None = None  # type: ignore[valid-type]
    patient_id: str | None = None
    prescriber: str | None = None
    pharmacy: str | None = None
    issued_after: dt.datetime | None = None
    issued_before: dt.datetime | None = None


def _query(viewer: Viewer, f: PrescriptionFilter | None) -> Doc:
    try:
        visible = policy.check_sees_any(viewer)
        if f is not None and f.patient_id is not None:
            policy.check_patient_filter(viewer)
    except policy.NotAllowed as exc:
        raise ClientError(str(exc), "FORBIDDEN") from None
    conditions = [visible] if visible else []
    if f is not None:
        if f.status:
            conditions.append({"status": {"$in": [rx.Status(s).value for s in f.status]}})
        for field, value in (
            ("patient.id", f.patient_id),
            ("prescriber", f.prescriber),
            ("pharmacy", f.pharmacy),
        ):
            if value is not None:
                conditions.append({field: value})
        if f.issued_after is not None:
            conditions.append({"issuedAt": {"$gte": f.issued_after}})
        if f.issued_before is not None:
            conditions.append({"issuedAt": {"$lt": f.issued_before}})
    if not conditions:
        return {}
    return conditions[0] if len(conditions) == 1 else {"$and": conditions}


# The fields of a prescription that check its document against the ledger.
CHECKED_FIELDS = frozenset({"history", "integrity"})


def _selects_any(selections: Iterable[Selection], names: frozenset[str]) -> bool:
    """Whether any of the fields `names` is selected anywhere below `selections` (through
    fragments too)."""
    for selection in selections:
        if isinstance(selection, SelectedField) and selection.name in names:
            return True
        if _selects_any(selection.selections, names):
            return True
    return False


@strawberry.type
class PrescriptionQueries:
    @strawberry.field(description="a prescription by id; null when absent or not yours to see")
    async def prescription(self, info: Info, id: strawberry.ID) -> Prescription | None:
        signed_in(info)
        return present(info, await loaders(info).documents.load(str(id)))

    @strawberry.field(description="prescriptions you may see, in issue order")
    async def prescriptions(
        self,
        info: Info,
        filter: PrescriptionFilter | None = None,
        first: int = 20,
        after: str | None = None,
    ) -> PrescriptionConnection:
        viewer = signed_in(info)
        first = page_size(info, first)
        try:
            cursor = None if after is None else decode_cursor(after)
        except Refused as exc:
            raise ClientError(exc.message, "BAD_USER_INPUT") from None
        # A page whose nodes are checked against the ledger needs whole documents; any
        # other page reads no event, not even the document's copy of them.
        checked = _selects_any(info.selected_fields, CHECKED_FIELDS)
        projection = None if checked else LISTED_WITHOUT_CHECKS
        docs, more = await service(info).page(_query(viewer, filter), first, cursor, projection)
        found: dict[str, Doc | None] = {d["_id"]: d for d in docs}
        await loaders(info).up_to_date(found, list(found))
        edges = []
        for doc in found.values():
            node = present(info, doc)
            if node is not None and doc is not None:
                edges.append(PrescriptionEdge(cursor=encode_cursor(doc), node=node))
        return PrescriptionConnection(
            edges=edges,
            page_info=PageInfo(
                has_next_page=more, end_cursor=encode_cursor(docs[-1]) if docs else None
            ),
        )


# --- mutations ------------------------------------------------------------------------


@strawberry.interface(description="An expected failure of a mutation.")
class Error:
    message: str


@strawberry.type(description="No such prescription, or not one you may see.")
class NotFound(Error):
    pass


@strawberry.type(description="Your role or organization may not do this.")
class Forbidden(Error):
    pass


@strawberry.type(description="The prescription's status does not allow this step.")
class IllegalTransition(Error):
    pass


@strawberry.type(description="expectedVersion is stale: read the prescription again.")
class VersionConflict(Error):
    pass


@strawberry.type(description="An argument is missing, too long or malformed.")
class InvalidInput(Error):
    pass


@strawberry.type(
    description="The database is unreachable; nothing was acknowledged. Retry with the same "
    "idempotencyKey: a retry never records the step twice."
)
class Unavailable(Error):
    pass


@strawberry.type(
    description="The stored prescription disagrees with its ledger events and cannot be restored "
    "from them; nothing was appended. An operator should run `rxledger audit`."
)
class Tampered(Error):
    pass


ERRORS = {
    cls.__name__: cls
    for cls in (
        NotFound,
        Forbidden,
        IllegalTransition,
        VersionConflict,
        InvalidInput,
        Unavailable,
        Tampered,
    )
}

PrescriptionResult = Annotated[
    Prescription
    | NotFound
    | Forbidden
    | IllegalTransition
    | VersionConflict
    | InvalidInput
    | Unavailable
    | Tampered,
    strawberry.union("PrescriptionResult"),
]


@strawberry.input
class PatientInput:
    id: str
    name: str


@strawberry.input
class MedicationInput:
    code: str
    name: str
    dose: str
    quantity: int
    instructions: str | None = None


@strawberry.input
class IssuePrescriptionInput:
    patient: PatientInput
    medications: list[MedicationInput]
    pharmacy: str = strawberry.field(description="the pharmacy (organization id) to dispense it")
    department: str | None = strawberry.field(
        default=None, description="defaults to the prescriber token's 'org' claim"
    )
    notes: str | None = None


async def _run(info: Info, mutation: str, action: Any) -> Any:
    """Run a mutation, turning expected refusals into their union member."""
    metrics = info.context.get("metrics")
    try:
        viewer = viewer_of(info)
        if viewer is None:
            raise Refused(
                "Forbidden",
                "authentication required: send 'Authorization: Bearer <token>' "
                "(`rxledger token --role ROLE --sub ID` mints one in development)",
            )
        policy.check_role(viewer, mutation)  # before the arguments: a wrong role learns only that
        doc = await action(viewer)
        loaders(info).forget(doc["_id"])  # this request may have read the old version
        result: Any = Prescription(doc=doc, hidden=policy.personal_data_hidden(viewer))
    except Refused as exc:
        result = ERRORS[exc.kind](message=exc.message)
    if metrics is not None:
        metrics.count_mutation(mutation, type(result).__name__)
    return result


def _key(key: str | None) -> str | None:
    return None if key is None else rx.text(key, "idempotencyKey")


@strawberry.type
class Mutation:
    @strawberry.mutation(description="PRESCRIBER: file a prescription (status ISSUED)")
    async def issue_prescription(
        self, info: Info, input: IssuePrescriptionInput, idempotency_key: str | None = None
    ) -> PrescriptionResult:
        async def act(viewer: Viewer) -> Doc:
            fields = rx.issue_fields(
                input.patient.id,
                input.patient.name,
                input.department or viewer.organization,
                input.pharmacy,
                [vars(m) for m in input.medications],
                input.notes,
            )
            return await service(info).issue(viewer, fields, _key(idempotency_key))

        return await _run(info, "issuePrescription", act)

    @strawberry.mutation(description="PRESCRIBER who filed it: ISSUED → CANCELLED")
    async def cancel_prescription(
        self,
        info: Info,
        id: strawberry.ID,
        expected_version: int,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> PrescriptionResult:
        args = {"reason": reason} if reason else {}
        return await _transition(
            info, "cancelPrescription", id, expected_version, idempotency_key, args
        )

    @strawberry.mutation(description="PHARMACIST of its pharmacy: ISSUED → REJECTED, with a reason")
    async def reject_prescription(
        self,
        info: Info,
        id: strawberry.ID,
        expected_version: int,
        reason: str,
        idempotency_key: str | None = None,
    ) -> PrescriptionResult:
        return await _transition(
            info, "rejectPrescription", id, expected_version, idempotency_key, {"reason": reason}
        )

    @strawberry.mutation(description="PHARMACIST of its pharmacy: ISSUED → DISPENSED")
    async def dispense_prescription(
        self,
        info: Info,
        id: strawberry.ID,
        expected_version: int,
        idempotency_key: str | None = None,
    ) -> PrescriptionResult:
        return await _transition(
            info, "dispensePrescription", id, expected_version, idempotency_key, {}
        )

    @strawberry.mutation(
        description="PHARMACIST of its pharmacy: DISPENSED → IN_TRANSIT with a courier and its "
        "company (courierOrganization, required): only a COURIER token with that sub and org "
        "sees and delivers it"
    )
    async def hand_to_courier(
        self,
        info: Info,
        id: strawberry.ID,
        expected_version: int,
        courier: str,
        courier_organization: str | None = None,
        idempotency_key: str | None = None,
    ) -> PrescriptionResult:
        args = {"courier": courier, "courierOrganization": courier_organization}
        return await _transition(info, "handToCourier", id, expected_version, idempotency_key, args)

    @strawberry.mutation(
        description="COURIER it was handed to: IN_TRANSIT → DELIVERED; or PHARMACIST of its "
        "pharmacy for a pick-up: DISPENSED → DELIVERED"
    )
    async def deliver_prescription(
        self,
        info: Info,
        id: strawberry.ID,
        expected_version: int,
        idempotency_key: str | None = None,
    ) -> PrescriptionResult:
        return await _transition(
            info, "deliverPrescription", id, expected_version, idempotency_key, {}
        )

    @strawberry.mutation(description="the PATIENT it belongs to: DELIVERED → CONFIRMED")
    async def confirm_receipt(
        self,
        info: Info,
        id: strawberry.ID,
        expected_version: int,
        idempotency_key: str | None = None,
    ) -> PrescriptionResult:
        return await _transition(info, "confirmReceipt", id, expected_version, idempotency_key, {})

    @strawberry.mutation(
        description="ADMIN: erase the personal data and salt for a legal request; the ledger "
        "and every proof stay verifiable and integrity reports ERASED"
    )
    async def erase_personal_data(
        self,
        info: Info,
        id: strawberry.ID,
        expected_version: int,
        reason: str,
        idempotency_key: str | None = None,
    ) -> PrescriptionResult:
        return await _transition(
            info, "erasePersonalData", id, expected_version, idempotency_key, {"reason": reason}
        )


async def _transition(
    info: Info,
    mutation: str,
    rid: strawberry.ID,
    expected_version: int,
    idempotency_key: str | None,
    args: dict[str, Any],
) -> Any:
    async def act(viewer: Viewer) -> Doc:
        checked = dict(args)
        for field in ("reason", "courier", "courierOrganization"):
            if field in checked:
                # A courier sees what it carries only when its id and company both match,
                # so a hand-over must name the company.
                required = not (field == "reason" and mutation == "cancelPrescription")
                checked[field] = rx.text(checked[field], field, required=required)
        checked = {k: v for k, v in checked.items() if v is not None}
        if expected_version < 1:
            raise Refused(
                "InvalidInput", f"expectedVersion is {expected_version}; versions start at 1"
            )
        return await service(info).transition(
            viewer, mutation, str(rid), expected_version, _key(idempotency_key), checked
        )

    return await _run(info, mutation, act)
