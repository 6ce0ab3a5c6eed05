"""The prescription service: every mutation appends one ledger event, then updates the
document; reads repair documents that lag behind their events.

Events are the truth. Each ledger event carries, beside its leaf header, the application's
record of it (`data`: the whole document after the event, the request's payload, the actor and
the idempotency key). A process that dies between the append and the document update leaves a
document one version behind its events; the next read (the process's log tail knows the newest
sequenced version of every prescription changed since it started), the next mutation (which
then meets a version conflict) or the sweep at start-up copies the newest event's state into
the document.

The document keeps a copy of its events (`events`: id, version, type, time, actor and leaf
bytes), so a read costs one query on servers where every query scans. Integrity does not trust
that copy: it checks the hash chain of the leaves, the state digest of the newest one, and the
newest leaf's inclusion proof against the signed checkpoint.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from bson import Binary, ObjectId
from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError, PyMongoError

from anchoring.anchorer import SignedCheckpoint
from anchoring.encoding import b64, canonical_json
from anchoring.errors import InvalidEvent, LedgerUnavailable, VersionConflict, database_error
from anchoring.hashing import leaf_hash
from anchoring.log import InclusionProof, TransparencyLog
from anchoring.receipt import Receipt
from anchoring.store import Doc, one_of
from anchoring.verify import root_from_inclusion_proof
from app import prescriptions as rx
from app.auth import Role, Viewer
from app.prescriptions import Refused

log = logging.getLogger("rxledger.service")

# What telling a retried request from a new one needs of a ledger event.
REQUEST_FIELDS = {"data.actor": 1, "data.mutation": 1, "data.idem": 1, "data.payload": 1}


# Audit paths of leaves in a tree size: (indices, size) -> paths.
PathSource = Callable[[list[int], int], Awaitable[list[list[bytes]]]]

P = ParamSpec("P")
R = TypeVar("R")


def unavailable(exc: BaseException) -> Refused:
    """The typed answer to a database error met anywhere in a mutation: the change may or
    may not be recorded, and retrying with the same idempotency key is always safe."""
    return Refused(
        "Unavailable",
        f"the database is unavailable ({database_error(exc)}); the change may or may not be "
        "recorded: retry in a few seconds with the same idempotencyKey (a retry never records "
        "it twice)",
    )


def answers_unavailable(
    mutation: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """A mutation whose database errors, on any of its paths (reads, the append, repairs),
    are refused as Unavailable instead of escaping as unexpected errors."""

    @functools.wraps(mutation)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await mutation(*args, **kwargs)
        except PyMongoError as exc:
            log.warning("%s: database unavailable: %s", mutation.__name__, database_error(exc))
            raise unavailable(exc) from None

    return guarded


@dataclass(frozen=True)
class Integrity:
    status: str  # VERIFIED, PENDING, TAMPERED or ERASED
    leaf_index: int | None
    proof: InclusionProof | None
    detail: str


@dataclass(frozen=True)
class EventProof:
    leaf_index: int | None
    proof: InclusionProof | None
    receipt: Receipt | None


class PrescriptionService:
    def __init__(self, log_: TransparencyLog, collection: AsyncCollection[Doc]) -> None:
        self.log = log_
        self.prescriptions = collection
        self.ledger = log_.store.ledger
        self.tags = rx.Tags(log_.signer.private_key.private_bytes_raw())

    async def ensure_indexes(self) -> None:
        await self.prescriptions.create_index(
            [("issuedAt", ASCENDING), ("_id", ASCENDING)], name="issued"
        )
        for field in ("patient.id", "prescriber", "pharmacy", "courier", "status"):
            await self.prescriptions.create_index([(field, ASCENDING)], name=field)

    # --- reads ------------------------------------------------------------------------

    async def documents(self, ids: list[str]) -> dict[str, Doc]:
        return {d["_id"]: d async for d in self.prescriptions.find(one_of("_id", ids))}

    async def page(
        self, query: Doc, first: int, after: tuple[dt.datetime, str] | None
    ) -> tuple[list[Doc], bool]:
        """Documents matching `query` in issue order, `first` of them after the cursor."""
        if after is not None:
            at, last_id = after
            query = {
                "$and": [
                    query,
                    {"$or": [{"issuedAt": {"$gt": at}}, {"issuedAt": at, "_id": {"$gt": last_id}}]},
                ]
            }
        cursor = (
            self.prescriptions.find(query)
            .sort([("issuedAt", ASCENDING), ("_id", ASCENDING)])
            .limit(first + 1)
        )
        docs = [d async for d in cursor]
        return docs[:first], len(docs) > first

    async def up_to_date(self, docs: dict[str, Doc | None], newest: dict[str, int]) -> None:
        """Repair, in place, each document behind the newest version known to be sequenced."""
        for subject, version in newest.items():
            doc = docs.get(subject)
            if doc is None or doc["version"] < version:
                docs[subject] = await self.repair(subject)

    async def repair(self, subject: str) -> Doc | None:
        """Copy the newest event's state into the document; returns the document."""
        newest = await self.ledger.find_one({"subject": subject}, sort=[("version", DESCENDING)])
        if newest is None:
            return await self.prescriptions.find_one({"_id": subject})
        state = (newest.get("data") or {}).get("state")
        if state is None:
            log.error("repair: event %s of %s holds no state", newest["version"], subject)
            return await self.prescriptions.find_one({"_id": subject})
        try:
            await self.prescriptions.replace_one(
                {"_id": subject, "version": {"$lt": state["version"]}}, state, upsert=True
            )
            log.warning(
                "repair: %s brought to version %d from the ledger", subject, state["version"]
            )
        except DuplicateKeyError:
            pass  # already at (or past) that version
        if "erased" in state:
            await self._scrub(subject, state["version"])
        return await self.prescriptions.find_one({"_id": subject})

    async def sweep(self) -> int:
        """Repair every document behind its ledger (at start-up). Returns how many."""
        # A plain scan: FerretDB v1 implements no $max accumulator for $group.
        newest: dict[str, int] = {}
        async for d in self.ledger.find({}, {"subject": 1, "version": 1, "_id": 0}):
            newest[d["subject"]] = max(newest.get(d["subject"], 0), d["version"])
        current = {
            d["_id"]: d["version"] async for d in self.prescriptions.find({}, {"version": 1})
        }
        behind = [s for s, v in newest.items() if current.get(s, 0) < v]
        for subject in behind:
            await self.repair(subject)
        return len(behind)

    # --- mutations ----------------------------------------------------------------------

    @answers_unavailable
    async def issue(self, viewer: Viewer, fields: Doc, idempotency_key: str | None) -> Doc:
        rx.check_role(viewer, "issuePrescription")
        if idempotency_key is not None:
            # The same key from the same prescriber names the same prescription, so a retry
            # meets the unique (subject, version 1) index instead of filing a second one.
            rid = (
                "rx_"
                + hashlib.sha256(
                    f"issue\n{viewer.rate_key}\n{idempotency_key}".encode()
                ).hexdigest()[:24]
            )
        else:
            rid = "rx_" + str(ObjectId())
        at = rx.now()
        doc: Doc = {
            "_id": rid,
            "status": rx.Status.ISSUED.value,
            "version": 1,
            "salt": Binary(rx.new_salt()),
            "prescriber": viewer.subject,
            **fields,
            "issuedAt": at,
            "updatedAt": at,
            "timestamps": {rx.Status.ISSUED.value: at},
        }
        payload = {k: v for k, v in fields.items()}
        appended = await self._append(
            doc,
            rx.EventType.ISSUED,
            viewer,
            at,
            None,
            payload,
            "issuePrescription",
            idempotency_key,
        )
        if appended is not None:
            return appended
        await self._store(doc, None)
        return doc

    @answers_unavailable
    async def transition(
        self,
        viewer: Viewer,
        mutation: str,
        rid: str,
        expected_version: int,
        idempotency_key: str | None,
        args: Doc,
    ) -> Doc:
        rx.check_role(viewer, mutation)
        doc = await self._current(viewer, rid)
        retried = await self._retried(
            viewer, doc, mutation, expected_version, idempotency_key, args
        )
        if retried is not None:
            return retried
        if mutation == "erasePersonalData":
            if "erased" in doc:
                raise Refused("IllegalTransition", "the personal data is already erased")
            at = rx.now()
            new = rx.erase(doc, at, viewer, args["reason"])
            event = rx.EventType.PERSONAL_DATA_ERASED
        else:
            if "erased" in doc:
                raise Refused(
                    "IllegalTransition", "the prescription's personal data was erased; it is closed"
                )
            _may_act(viewer, doc, mutation)
            step = rx.check_transition(viewer, doc, mutation)
            at = rx.now()
            new = rx.apply_transition(doc, step, at, args)
            event = step.event
        prev = bytes(doc["lastLeafHash"]) if doc.get("lastLeafHash") else None
        replayed = await self._append(new, event, viewer, at, prev, args, mutation, idempotency_key)
        if replayed is not None:
            return replayed
        await self._store(new, doc["version"])
        return new

    # --- internals ----------------------------------------------------------------------

    async def _current(self, viewer: Viewer, rid: str) -> Doc:
        doc = await self.prescriptions.find_one({"_id": rid})
        if doc is None:
            doc = await self.repair(rid)  # filed, but the document was never written
        if doc is None or not rx.can_see(viewer, doc):
            raise Refused("NotFound", f"no prescription {rid} that you may see")
        return doc

    async def _retried(
        self,
        viewer: Viewer,
        doc: Doc,
        mutation: str,
        expected_version: int,
        idempotency_key: str | None,
        payload: Doc,
    ) -> Doc | None:
        """The current document when this request is a retry of one already stored; raises
        VersionConflict when the expected version is stale; None to go ahead."""
        if doc["version"] == expected_version:
            return None
        if doc["version"] > expected_version and await self._first_attempt_stored(
            doc["_id"], expected_version + 1, viewer, mutation, idempotency_key, payload
        ):
            return doc
        raise Refused(
            "VersionConflict",
            f"expected version {expected_version}, the prescription is at version {doc['version']}: "
            "read it again and retry",
        )

    async def _first_attempt_stored(
        self,
        subject: str,
        version: int,
        viewer: Viewer,
        mutation: str,
        idempotency_key: str | None,
        payload: Doc,
    ) -> bool:
        """Whether the ledger's event at `version` is this request's first attempt (same
        caller and idempotency key); raises Refused when the key was used for another request."""
        if idempotency_key is None:
            return False
        first = await self.ledger.find_one({"subject": subject, "version": version}, REQUEST_FIELDS)
        return first is not None and _same_request(
            first, viewer, mutation, idempotency_key, payload
        )

    async def _append(
        self,
        doc: Doc,
        event: rx.EventType,
        viewer: Viewer,
        at: dt.datetime,
        prev: bytes | None,
        payload: Doc,
        mutation: str,
        idempotency_key: str | None,
    ) -> Doc | None:
        """Append the event that produced `doc`. Returns None when appended; the current
        document when an earlier identical request (same idempotency key) already did;
        raises Refused otherwise."""
        header = rx.header(doc, event, viewer, at, prev, payload)
        leaf = canonical_json(header)
        event_id = ObjectId()
        actor = rx.actor_record(viewer)
        doc["lastLeafHash"] = Binary(leaf_hash(leaf))
        doc["events"] = [
            *doc.get("events", []),
            {
                "id": event_id,
                "version": doc["version"],
                "type": event.value,
                "at": at,
                "actor": actor,
                "leaf": Binary(leaf),
            },
        ]
        data: Doc = {"state": doc, "payload": payload, "mutation": mutation, "actor": actor}
        if idempotency_key is not None:
            data["idem"] = idempotency_key
        try:
            await self.log.append(
                doc["_id"],
                doc["version"],
                header,
                data,
                event_id,
                self.tags.of(doc),
                clears_tags=rx.cleared_tags(event),
            )
        except VersionConflict:
            current = await self.repair(doc["_id"])
            if current is not None and await self._first_attempt_stored(
                doc["_id"], doc["version"], viewer, mutation, idempotency_key, payload
            ):
                return current
            now_at = "unknown" if current is None else current["version"]
            raise Refused(
                "VersionConflict",
                f"another change took version {doc['version']} first; the prescription is at "
                f"version {now_at}: read it again and retry",
            ) from None
        except InvalidEvent as exc:
            raise Refused("InvalidInput", str(exc)) from None
        except LedgerUnavailable as exc:
            raise Refused("Unavailable", str(exc)) from None
        return None

    async def _store(self, doc: Doc, previous_version: int | None) -> None:
        """Project an appended event into the document (the step after the append). A failure
        here loses nothing: the event is durable and the next read repairs the document."""
        try:
            if previous_version is None:
                await self.prescriptions.insert_one(doc)
            else:
                await self.prescriptions.replace_one(
                    {"_id": doc["_id"], "version": previous_version}, doc
                )
            if "erased" in doc:
                await self._scrub(doc["_id"], doc["version"])
        except DuplicateKeyError:
            pass  # a reader repaired it from the ledger first
        except PyMongoError as exc:
            log.warning(
                "%s stored in the ledger, document deferred: %s", doc["_id"], database_error(exc)
            )

    async def _scrub(self, subject: str, erased_version: int) -> None:
        """Remove what came from the requests (the state, payload, actor and idempotency key)
        from the events before an erasure (their leaves stay), from their queued copies, and
        the patient tag from their sequenced entries. Entries sequenced later lose the tag
        when the erasure event is sequenced (rx.cleared_tags)."""
        ids = [
            d["_id"]
            async for d in self.ledger.find(
                {"subject": subject, "version": {"$lt": erased_version}}, {"_id": 1}
            )
        ]
        await self.ledger.update_many(
            {"_id": {"$in": ids}},
            {
                "$unset": {
                    "data.state": "",
                    "data.payload": "",
                    "data.actor": "",
                    "data.idem": "",
                    "tags.patient": "",
                }
            },
        )
        await self.log.store.entries.update_many(
            {"event": {"$in": ids}}, {"$unset": {"tags.patient": ""}}
        )
        await self.log.ledger.redact_queued(
            subject,
            erased_version,
            ["data.state", "data.payload", "data.actor", "data.idem", "tags.patient"],
        )

    # --- integrity and proofs -------------------------------------------------------------

    async def event_proofs(
        self,
        events: list[Doc],
        indices: dict[ObjectId, int],
        cp: SignedCheckpoint | None,
        paths: PathSource,
    ) -> list[EventProof]:
        """Each event's proof against `cp` when it covers the event, else a signed receipt
        when the event is sequenced. `paths` fetches audit paths (batched by the caller)."""
        anchored = [
            indices[e["id"]]
            for e in events
            if e["id"] in indices and cp is not None and indices[e["id"]] < cp.size
        ]
        found = dict(zip(anchored, await paths(anchored, cp.size), strict=True)) if cp else {}
        out = []
        for event in events:
            index = indices.get(event["id"])
            leaf = bytes(event["leaf"])
            if index is None:
                out.append(EventProof(None, None, None))
            elif cp is not None and index in found:
                proof = InclusionProof.against(index, leaf, found[index], cp)
                out.append(EventProof(index, proof, None))
            else:
                out.append(EventProof(index, None, self.log.receipt(index, leaf)))
        return out

    async def integrity(
        self,
        doc: Doc,
        events: list[Doc],
        indices: dict[ObjectId, int],
        cp: SignedCheckpoint | None,
        paths: PathSource,
    ) -> Integrity:
        problem = _disagreement(doc, events)
        if problem is not None:
            return Integrity("TAMPERED", None, None, problem)
        latest = events[-1]
        index = indices.get(latest["id"])
        if index is None or cp is None or index >= cp.size:
            status = "ERASED" if "erased" in doc else "PENDING"
            detail = (
                "the latest event is not sequenced yet"
                if index is None
                else f"leaf {index} is sequenced; no checkpoint covers it yet"
            )
            return Integrity(status, index, None, detail)
        leaf = bytes(latest["leaf"])
        [path] = await paths([index], cp.size)
        root = root_from_inclusion_proof(index, cp.size, leaf_hash(leaf), path)
        if root != cp.root_hash:
            return Integrity(
                "TAMPERED", index, None, f"leaf {index} does not match checkpoint {cp.size}"
            )
        proof = InclusionProof.against(index, leaf, path, cp)
        if "erased" in doc:
            return Integrity("ERASED", index, proof, "personal data erased; the ledger verifies")
        return Integrity("VERIFIED", index, proof, f"matches leaf {index} in checkpoint {cp.size}")


def _may_act(viewer: Viewer, doc: Doc, mutation: str) -> None:
    """Beyond seeing it: the prescriber cancels only their own; a courier only what it carries."""
    if viewer.role is Role.PRESCRIBER and doc.get("prescriber") != viewer.subject:
        raise Refused("Forbidden", "only the prescriber who filed it may cancel it")
    if viewer.role is Role.COURIER and doc.get("courier") != viewer.subject:
        raise Refused("Forbidden", "only the courier it was handed to may deliver it")


def _same_request(event: Doc, viewer: Viewer, mutation: str, key: str, payload: Doc) -> bool:
    """Whether a stored event is this request's first attempt (same caller and key). A key
    reused for a different request is refused rather than silently answered."""
    data = event.get("data") or {}
    actor = data.get("actor") or {}
    if data.get("idem") != key or actor.get("sub") != viewer.subject:
        return False
    if data.get("mutation") != mutation or ("payload" in data and data["payload"] != payload):
        raise Refused(
            "InvalidInput",
            f"idempotency key {key!r} was already used for a different request "
            f"({data.get('mutation')}, not this {mutation}); use a new key for a new request",
        )
    return True


def _disagreement(doc: Doc, events: list[Doc]) -> str | None:
    """What in the document or its copy of the events disagrees with their leaves, if anything."""
    if not events:
        return "the document lists no ledger events"
    prev: bytes | None = None
    header: Doc = {}
    for expected, event in enumerate(events, start=1):
        leaf = bytes(event["leaf"])
        try:
            header = json.loads(leaf)
        except ValueError:
            return f"event {expected}: its leaf is not JSON"
        if not isinstance(header, dict) or canonical_json(header) != leaf:
            return f"event {expected}: its leaf is not canonical JSON"
        if event.get("version") != expected or header.get("version") != expected:
            return f"event {expected} is missing or out of order"
        if header.get("subject") != doc["_id"]:
            return f"event {expected}: its leaf names another prescription"
        if header.get("type") != event.get("type"):
            return f"event {expected}: its type differs from its leaf"
        if header.get("prev") != (None if prev is None else b64(prev)):
            return f"event {expected}: the hash chain to event {expected - 1} is broken"
        problem = _actor_disagreement(doc, event, header)
        if problem is not None:
            return f"event {expected}: {problem}"
        prev = leaf_hash(leaf)
    if doc["version"] != len(events):
        return f"document version {doc['version']}, but {len(events)} events"
    if "erased" in doc and header.get("type") != rx.EventType.PERSONAL_DATA_ERASED:
        return "document marked erased, its latest event is not an erasure"
    # After an erasure the salt is gone and the digest is of the remaining (impersonal) state.
    salt = b"" if "erased" in doc else doc.get("salt")
    if salt is None or rx.digest(bytes(salt), rx.state_of(doc)) != header.get("stateDigest"):
        return f"the document differs from the state digest of its event {len(events)}"
    return None


def _actor_disagreement(doc: Doc, event: Doc, header: Doc) -> str | None:
    """The application's record of who acted must say what the leaf says (the leaf records a
    patient only as PATIENT: then it must be the prescription's own patient)."""
    actor = event.get("actor") or {}
    role, sub = actor.get("role"), actor.get("sub")
    if role is None:
        return None if "erased" in doc else "it names no actor"
    if sub is None:
        return (
            None
            if header.get("actor", "").split(":")[0] == role
            else "its actor differs from its leaf"
        )
    if role == Role.PATIENT.value:
        patient = (doc.get("patient") or {}).get("id")
        ok = header.get("actor") == Role.PATIENT.value and (patient is None or sub == patient)
    else:
        ok = header.get("actor") == f"{role}:{sub}"
    return None if ok else "its actor differs from its leaf"


def encode_cursor(doc: Doc) -> str:
    raw = f"{rx.timestamp(doc['issuedAt'])}|{doc['_id']}".encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        at, _, rid = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return dt.datetime.fromisoformat(at.replace("Z", "+00:00")), rid
    except (ValueError, UnicodeError):
        raise Refused(
            "InvalidInput", f"cursor {cursor[:40]!r} is not one this API returned"
        ) from None
