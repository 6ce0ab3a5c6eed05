"""The prescription service: every mutation appends one ledger event, then updates the
document; reads repair documents that lag behind their events.

Events are the truth. Each ledger event carries, beside its leaf header, the application's
record of it (`data`: the whole document after the event, the request's payload, the actor and
the idempotency key). A process that dies between the append and the document update leaves a
document one version behind its events; the next read (the process's log tail knows the newest
sequenced version of every prescription changed since it started), the next mutation (which
then meets a version conflict) or the sweep at start-up copies the newest event's state into
the document.

Nothing the gateway claims rests on the document, which whoever writes the database can edit.
A mutation extends the ledger's newest event of its prescription (a document that disagrees is
restored from the ledger, or the mutation is refused). History, proofs, receipts and integrity
are built from the ledger's events and checked against the signed tree: every event's leaf hash
must be the level-0 hash at its index in the tiles the checkpoint authenticates, versions run
1..n along the `prev` chain, and the document must be the newest event's state. The document's
own copy of its events (`events`: id, version, type, time, actor and leaf bytes) is checked
against the ledger like any other field, never used as a source.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from bson import Binary, ObjectId
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError, PyMongoError

from anchoring.anchorer import SignedCheckpoint
from anchoring.dialect import by_id_range, by_ids, update_by_ids
from anchoring.encoding import b64, canonical_json
from anchoring.errors import (
    InvalidEvent,
    LedgerUnavailable,
    ProofUnavailable,
    VersionConflict,
    database_error,
)
from anchoring.hashing import leaf_hash
from anchoring.ledger import (
    UnreadableIntent,
    event_at,
    event_id,
    events_of,
    group_events,
    newest_event,
)
from anchoring.log import InclusionProof, TransparencyLog
from anchoring.receipt import Receipt
from anchoring.store import Doc, Index, create_indexes
from anchoring.tiles import TileCorrupt
from app import policy
from app import prescriptions as rx
from app.auth import Role, Viewer
from app.derived_keys import DerivedKeys
from app.prescriptions import Refused

log = logging.getLogger("rxledger.service")

# What telling a retried request from a new one needs of a ledger event.
REQUEST_FIELDS = {"data.actor": 1, "data.mutation": 1, "data.idem": 1, "data.payload": 1}


# What a listing leaves out of a document when its page selects neither history nor
# integrity: the document's copy of its events (every leaf), its salt and its last leaf hash,
# which only the checks against the ledger read. Most of a document's bytes are its events.
LISTED_WITHOUT_CHECKS: Doc = {"events": 0, "salt": 0, "lastLeafHash": 0}

# What history, proofs and integrity read of a ledger event (its leaf, and who acted).
EVENT_FIELDS = {"subject": 1, "version": 1, "header": 1, "leaf": 1, "data.actor": 1}

# Audit paths of leaves in a tree size: (indices, size) -> paths.
PathSource = Callable[[list[int], int], Awaitable[list[list[bytes]]]]
# The tree's leaf hashes at sequenced indices: indices -> {index: hash}.
LeafHashSource = Callable[[list[int]], Awaitable[dict[int, bytes]]]

# Every index the prescriptions collection needs (`_id` is always indexed), created at
# start-up. Listings are in issue order (`page`), so each field a viewer's visibility or a
# listing filter fixes leads an index that then yields that order (equality, then sort).
PRESCRIPTION_INDEXES: tuple[Index, ...] = (
    Index((("issuedAt", ASCENDING), ("_id", ASCENDING)), "issued", "listing everything"),
    *(
        Index(((field, ASCENDING), ("issuedAt", ASCENDING), ("_id", ASCENDING)), name, serves)
        for field, name, serves in (
            ("prescriber", "prescriber_issued", "a prescriber's listing, a filter by prescriber"),
            ("patient.id", "patient_issued", "a patient's listing, a filter by patient"),
            ("pharmacy", "pharmacy_issued", "a pharmacy's listing, a filter by pharmacy"),
            ("courierOrganization", "courier_company_issued", "a courier company's listing"),
            ("status", "status_issued", "a filter by status (one sorted scan per status)"),
        )
    ),
    Index(
        (
            ("courier", ASCENDING),
            ("courierOrganization", ASCENDING),
            ("issuedAt", ASCENDING),
            ("_id", ASCENDING),
        ),
        "courier_issued",
        "a courier's listing",
    ),
)

# The start-up sweep's mark: {_id: the prescriptions collection's name, through: the log size
# the last finished sweep began at}. Entries below it need no sweep again.
SWEEPS = "sweeps"
# Entries the sweep reads at once (and the ledger events they name).
SWEEP_PAGE = 2000

# Restores of a document a mutation tries while concurrent mutations move its ledger on.
RESTORE_ATTEMPTS = 3

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
    behind: bool = False  # the document is behind sequenced events of its ledger


@dataclass(frozen=True)
class EventProof:
    leaf_index: int | None
    proof: InclusionProof | None
    # The tree's own leaf hash at leaf_index, when it is this event's and no checkpoint covers
    # it: what a receipt signs (`receipt`, only for those who ask).
    receivable: bytes | None = None

    def receipt(self, log: TransparencyLog) -> Receipt | None:
        """The log's signed receipt for this event, when it is sequenced, its bytes the
        tree's, and not yet anchored; signed once per leaf."""
        if self.leaf_index is None or self.receivable is None:
            return None
        return log.tree_receipt(self.leaf_index, self.receivable)


class PrescriptionService:
    def __init__(
        self,
        log_: TransparencyLog,
        collection: AsyncCollection[Doc],
        tag_secret: bytes | None = None,
    ) -> None:
        """`tag_secret` keys the patient routing tags (default: the one derived from the log's
        signing key); it must stay the same for the life of the log, across key rotations
        (RXLEDGER_TAG_KEY, app/derived_keys.py)."""
        self.log = log_
        self.prescriptions = collection
        self.ledger = log_.store.ledger
        self.tags = policy.Tags(
            tag_secret or DerivedKeys.of_key(log_.signer.private_key.private_bytes_raw()).tags
        )

    async def ensure_indexes(self) -> None:
        await create_indexes(self.prescriptions, PRESCRIPTION_INDEXES)

    # --- reads ------------------------------------------------------------------------

    async def documents(self, ids: list[str]) -> dict[str, Doc]:
        found: dict[str, Doc] = await by_ids(self.prescriptions, ids)
        return found

    async def page(
        self,
        query: Doc,
        first: int,
        after: tuple[dt.datetime, str] | None,
        projection: Doc | None = None,
    ) -> tuple[list[Doc], bool]:
        """Documents matching `query` in issue order, `first` of them after the cursor, with
        the fields of `projection` (whole documents by default). No index serves every filter
        on every server: a server without one reads the collection, and the projection keeps
        what it sends and what is decoded here to the page's fields."""
        if after is not None:
            at, last_id = after
            query = {
                "$and": [
                    query,
                    {"$or": [{"issuedAt": {"$gt": at}}, {"issuedAt": at, "_id": {"$gt": last_id}}]},
                ]
            }
        cursor = (
            self.prescriptions.find(query, projection)
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
                docs[subject] = await self.repair(subject, known=version)

    async def repair(self, subject: str, stale: Doc | None = None, known: int = 0) -> Doc | None:
        """Copy the newest event's state into the document, once its leaf proves that state
        (the state digest); returns the document. Brings a document forward; with `stale`
        (the document as last read), replaces that one whatever its version: a document the
        ledger does not back (rolled back, edited, or claiming events the ledger lacks).
        `known`: the version the ledger is expected to be at (a hint)."""
        if stale is not None and isinstance(stale.get("version"), int):
            known = max(known, stale["version"])
        newest = await newest_event(self.ledger, subject, known=known)
        if newest is None:
            return await self.prescriptions.find_one({"_id": subject})
        state = (newest.get("data") or {}).get("state")
        problem = _unproven_state(subject, newest, state)
        if problem is not None:
            log.error("repair: %s version %s: %s", subject, newest.get("version"), problem)
            return await self.prescriptions.find_one({"_id": subject})
        assert state is not None
        guard: Doc = {"version": {"$lt": state["version"]}}
        if stale is not None:
            guard = {"version": stale.get("version")}
        try:
            done = await self.prescriptions.replace_one(
                {"_id": subject, **guard}, state, upsert=stale is None
            )
            if stale is not None and done.matched_count == 0 and done.upserted_id is None:
                return await self.prescriptions.find_one({"_id": subject})
            log.warning(
                "repair: %s %s to version %d from the ledger",
                subject,
                "brought" if stale is None else "restored (it disagreed with the ledger)",
                state["version"],
            )
        except DuplicateKeyError:
            pass  # already at (or past) that version
        if "erased" in state:
            await self._scrub(subject, state["version"])
        return await self.prescriptions.find_one({"_id": subject})

    async def sweep(self) -> int:
        """Repair every document behind its ledger (at start-up). Returns how many.

        Only an event whose document write a crash interrupted can leave a document behind,
        and such an event is queued in `pending` or was sequenced after the previous sweep
        began: the sweep reads the queue, then the entries from where the previous sweep
        began (SWEEPS) to the published size, a page at a time with the ledger events they
        name and their documents, all by `_id`, never the whole ledger or every document. It
        records where it began once every document it found behind is repaired, so a restart
        reads what was sequenced since the previous start. A mark moved by a database writer
        only skips repairs a read or a mutation then makes (each checks the document against
        the ledger): nothing the product proves rests on documents. Malformed rows are logged
        and skipped."""
        marks = self.prescriptions.database[SWEEPS]
        mark = await marks.find_one({"_id": self.prescriptions.name})
        start = _count(mark.get("through") if mark is not None else 0)
        store = self.log.store
        repaired: set[str] = set()

        async def repair_behind(newest: dict[str, int]) -> None:
            current = await by_ids(self.prescriptions, list(newest), {"version": 1})
            for subject, version in newest.items():
                have = current.get(subject, {}).get("version", 0)
                if subject not in repaired and not (isinstance(have, int) and have >= version):
                    await self.repair(subject)
                    repaired.add(subject)

        # The queue before the published size: a group leaves `pending` only once published,
        # so an event not queued at this read is below the size read next.
        queued: dict[str, int] = {}
        async for doc in store.pending.find({}).sort("_id", 1):
            if "committed" not in doc:
                try:
                    _newest(queued, group_events(doc))
                except UnreadableIntent as exc:
                    log.error("sweep: queued group %s unreadable (%s); skipped", doc["_id"], exc)
        size = _count((await store.head()).get("size", 0))
        if start > size:  # a log restored from an older backup, or a mark edited
            log.warning("sweep: mark %d beyond the log's size %d; sweeping from 0", start, size)
            start = 0
        await repair_behind(queued)
        for first in range(start, size, SWEEP_PAGE):
            entries = await by_id_range(
                store.entries, first, min(first + SWEEP_PAGE, size), {"event": 1}
            )
            if not entries:
                break  # past what is stored: a head size that no entry backs
            ids = [e["event"] for e in entries if isinstance(e.get("event"), ObjectId)]
            events = await by_ids(self.ledger, ids, {"subject": 1, "version": 1})
            page: dict[str, int] = {}
            _newest(page, events.values())
            await repair_behind(page)
        await marks.update_one(
            {"_id": self.prescriptions.name}, {"$set": {"through": size}}, upsert=True
        )
        return len(repaired)

    # --- mutations ----------------------------------------------------------------------

    @answers_unavailable
    async def issue(self, viewer: Viewer, fields: Doc, idempotency_key: str | None) -> Doc:
        policy.check_role(viewer, "issuePrescription")
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
        policy.check_role(viewer, mutation)
        doc = await self._current(viewer, rid)
        retried = await self._retried(
            viewer, doc, mutation, expected_version, idempotency_key, args
        )
        if retried is not None:
            return retried
        policy.check_may_act(viewer, doc, mutation)
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
            step = rx.check_transition(doc, mutation)
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
        """The prescription as its ledger says it is, which a mutation then extends: the state
        its newest event's leaf commits to (a logged or queued event), never a version or a
        field only the document claims. Raises Refused (NotFound, Tampered)."""
        # The document first, then the ledger: a mutation appends before it stores, so a
        # document ahead of the ledger read after it was not written by this gateway.
        doc = await self.prescriptions.find_one({"_id": rid})
        for _ in range(RESTORE_ATTEMPTS):
            known = doc.get("version") if doc is not None else 0
            # Without a document, only by derived `_id`s: any caller may send any id, and
            # reading an id nothing has by subject would decode the whole ledger on FerretDB.
            newest = await newest_event(
                self.ledger,
                rid,
                {"version": 1, "leaf": 1},
                known if isinstance(known, int) else 0,
                expected_only=True,
            )
            if newest is None:
                doc = None  # a document the ledger knows nothing of is nothing to extend
                break
            await self._check_logged(rid, newest)
            if doc is not None and _unproven_state(rid, newest, doc) is None:
                break
            # Edited, rolled back, or behind a change still being stored: restore it. A
            # concurrent mutation may move the ledger on meanwhile: look again.
            doc = await self.repair(rid, stale=doc)
        else:
            log.error("%s disagrees with its ledger and could not be restored", rid)
            raise Refused(
                "Tampered",
                f"prescription {rid} disagrees with its ledger events and cannot be "
                "restored from them; nothing was appended",
            )
        if doc is None or not policy.can_see(viewer, doc):
            raise Refused("NotFound", f"no prescription {rid} that you may see")
        return doc

    async def _check_logged(self, rid: str, newest: Doc) -> None:
        """A mutation extends only an event the log holds (its leaf the tree's at its index)
        or has queued (named by a commit marker): never one written straight into `ledger`,
        which the log would never sequence. Raises Refused (Tampered, Unavailable)."""
        event_id, version = newest["_id"], newest["version"]
        if not await self._never_queued([event_id]):
            index = (await self.log.leaf_indices([event_id])).get(event_id)
            if index is None:
                return  # queued
            held = (await self.log.leaf_hashes([index])).get(index)
            if held == leaf_hash(bytes(newest["leaf"])):
                return
            problem = f"its version {version} is not the leaf the log holds at {index}"
        else:
            problem = f"its version {version} is in the ledger but was never queued for the log"
        log.error("%s: %s", rid, problem)
        raise Refused("Tampered", f"prescription {rid}: {problem}; nothing was appended")

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
        first = await event_at(self.ledger, subject, version, REQUEST_FIELDS)
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
        appended_id = event_id(doc["_id"], doc["version"])
        actor = rx.actor_record(viewer)
        doc["lastLeafHash"] = Binary(leaf_hash(leaf))
        doc["events"] = [
            *doc.get("events", []),
            {
                "id": appended_id,
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
                appended_id,
                self.tags.of(doc),
                clears_tags=rx.cleared_tags(event),
            )
        except VersionConflict:
            current = await self.repair(doc["_id"], known=doc["version"])
            taken = await event_at(self.ledger, doc["_id"], doc["version"], REQUEST_FIELDS)
            if (
                current is not None
                and taken is not None
                and idempotency_key is not None
                and _same_request(taken, viewer, mutation, idempotency_key, payload)
            ):
                return current
            now_at = "unknown" if current is None else current["version"]
            behind = current is None or current["version"] < doc["version"]
            if taken is not None and taken["_id"] != appended_id and behind:
                # The version is held by an event stored around the gateway, under another
                # `_id` than the ledger gives it: the subject's events, read by those ids,
                # never reach it, and no mutation can ever take that version.
                problem = (
                    f"its version {doc['version']} is held in the ledger by an event not stored "
                    "under that version's id"
                )
                log.error("%s: %s", doc["_id"], problem)
                raise Refused(
                    "Tampered", f"prescription {doc['_id']}: {problem}; nothing was appended"
                ) from None
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
        events = (
            await events_of(self.ledger, [subject], {"version": 1}, {subject: erased_version})
        )[subject]
        ids = [d["_id"] for d in events if d["version"] < erased_version]
        await update_by_ids(
            self.ledger,
            ids,
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
        await self.log.store.untag_entries(ids, ["patient"])
        await self.log.ledger.redact_queued(
            subject,
            erased_version,
            ["data.state", "data.payload", "data.actor", "data.idem", "tags.patient"],
        )

    async def _never_queued(
        self, event_ids: list[ObjectId], unplaced: bool = False
    ) -> list[ObjectId]:
        """The events neither sequenced nor queued for the log: written straight into
        `ledger`, the log will never sequence them. `unplaced`: the caller has just found
        none of them in the log."""
        # The log first (by `_id`, usually cached): most events a caller asks about are
        # sequenced, and a read of `pending` decodes the whole queue on FerretDB. An event
        # that left `pending` between the two reads was published first (a group leaves
        # `pending` only once published), so the log is asked once more for what neither had.
        missing = set(event_ids)
        if not unplaced:
            missing -= set(await self.log.leaf_indices(event_ids))
        if missing:
            missing -= await self.log.ledger.queued(list(missing))
        if missing:
            missing -= set(await self.log.leaf_indices(list(missing)))
        return [e for e in event_ids if e in missing]

    # --- integrity and proofs -------------------------------------------------------------

    async def ledger_events(
        self, subjects: list[str], known: dict[str, int] | None = None
    ) -> dict[str, list[Doc]]:
        """Each subject's ledger events, oldest first: what history, proofs and integrity are
        built from, never the document's copy. `known`: the version each subject's document
        is at, a hint that saves round trips (see anchoring.ledger.events_of)."""
        return await events_of(self.ledger, subjects, EVENT_FIELDS, known)

    async def examine(
        self,
        doc: Doc,
        events: list[Doc],
        indices: dict[ObjectId, int],
        cp: SignedCheckpoint | None,
        paths: PathSource,
        leaf_hashes: LeafHashSource,
    ) -> Examined:
        """Check `doc` and its ledger `events` against the log: every event in the signed
        tree (its leaf hash equal to the authenticated level-0 hash at its index: the audit
        path from the tiles rebuilds the checkpoint's root), versions 1..n and the `prev`
        chain, and the document equal to the newest event's state. Each event gets a proof
        (anchored) or a receipt (sequenced, its leaf hash the tree's own: signed when asked
        for) only when its bytes are the log's. `paths` and `leaf_hashes` read tiles, batched
        by the caller."""
        placed = [indices.get(e["_id"]) for e in events]
        proofs: list[EventProof] = []
        problem = _ledger_problem(doc, events)
        unplaced = [e["_id"] for e, i in zip(events, placed, strict=True) if i is None]
        if problem is None and unplaced:
            never = await self._never_queued(unplaced, unplaced=True)
            if never:
                version = next(e["version"] for e in events if e["_id"] == never[0])
                problem = f"event {version} is in the ledger but was never queued for the log"
        try:
            anchored = [i for i in placed if i is not None and cp is not None and i < cp.size]
            found = dict(zip(anchored, await paths(anchored, cp.size), strict=True)) if cp else {}
            tree = await leaf_hashes([i for i in placed if i is not None and i not in found])
        except (TileCorrupt, ProofUnavailable) as exc:
            # Tiles missing or cut short: nothing can be proved, and that is itself a finding.
            problem = problem or f"the signed tree cannot be read: {exc}"
            found, tree = {}, {}
        for event, index in zip(events, placed, strict=True):
            leaf = bytes(event["leaf"])
            if index is None:
                proofs.append(EventProof(None, None))
            elif cp is not None and index in found:
                proof = InclusionProof.against(index, leaf, found[index], cp)
                if proof.holds():
                    proofs.append(EventProof(index, proof))
                    continue
                proofs.append(EventProof(index, None))
                problem = problem or (
                    f"event {event['version']} (leaf {index}) is not the leaf of the signed "
                    f"tree of checkpoint {cp.size}"
                )
            elif tree.get(index) == leaf_hash(leaf):
                proofs.append(EventProof(index, None, tree[index]))
            else:
                proofs.append(EventProof(index, None))
                problem = problem or (
                    f"event {event['version']} is not the leaf the signed tree holds at {index}"
                )
        return Examined(_integrity(doc, events, placed, proofs, cp, problem), proofs)


@dataclass(frozen=True)
class Examined:
    integrity: Integrity
    proofs: list[EventProof]  # one per ledger event, oldest first


def _integrity(
    doc: Doc,
    events: list[Doc],
    placed: list[int | None],
    proofs: list[EventProof],
    cp: SignedCheckpoint | None,
    problem: str | None,
) -> Integrity:
    """The verdict on a prescription from what `examine` found."""
    newest = placed[-1] if placed else None
    if problem is None:
        problem = _sequencing_problem(events, placed)
    at = doc.get("version")
    if problem is None and isinstance(at, int) and 0 < at < len(events):
        # Behind events still queued (its update follows their append): the document must be
        # what its own version's leaf says.
        problem = _document_problem(doc, events[:at])
        if problem is None and all(i is None for i in placed[at:]):
            return Integrity(
                "PENDING",
                newest,
                None,
                f"the document is at version {doc.get('version')}; the ledger's version "
                f"{len(events)} is not sequenced yet",
            )
    if problem is not None:
        return Integrity("TAMPERED", newest, None, problem)
    problem = _document_problem(doc, events)
    if problem is not None:
        # Only the document disagrees: the ledger proves what it should be.
        behind = isinstance(at, int) and at < len(events)
        return Integrity("TAMPERED", newest, None, problem, behind)
    erased = "erased" in doc
    latest = proofs[-1]
    if latest.proof is None:
        detail = (
            "the latest event is not sequenced yet"
            if newest is None
            else f"leaf {newest} is sequenced; no checkpoint covers it yet"
        )
        return Integrity("ERASED" if erased else "PENDING", newest, None, detail)
    assert cp is not None
    if erased:
        return Integrity(
            "ERASED", newest, latest.proof, "personal data erased; the ledger verifies"
        )
    return Integrity(
        "VERIFIED",
        newest,
        latest.proof,
        f"every event is in the signed tree; the latest matches leaf {newest} in checkpoint {cp.size}",
    )


def _unproven_state(subject: str, event: Doc, state: Doc | None) -> str | None:
    """Why a state (an event's recorded state, or a document) is not what the event's leaf
    commits to (None when it is): same prescription and version, the state digest over its
    salt, and the leaf's hash as its last."""
    if not isinstance(state, dict):
        return "the event holds no state"
    header = _header_of(bytes(event["leaf"]))
    if header is None:
        return "its leaf is not a JSON object"
    if state.get("_id") != subject or state.get("version") != header.get("version"):
        return "its state is of another prescription or version"
    salt = b"" if "erased" in state else state.get("salt")
    try:
        proven = salt is not None and rx.digest(bytes(salt), rx.state_of(state)) == header.get(
            "stateDigest"
        )
        last = bytes(state.get("lastLeafHash") or b"")
    except (TypeError, ValueError, KeyError, AttributeError):
        return "its state is malformed"
    if not proven:
        return "its state differs from the state digest of its leaf"
    if last != leaf_hash(bytes(event["leaf"])):
        return "its state names another leaf"
    return None


def _header_of(leaf: bytes) -> Doc | None:
    """The JSON object a leaf holds (None when it holds none)."""
    try:
        header = json.loads(leaf)
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def leaf_header(leaf: bytes) -> Doc:
    """The JSON object a leaf holds, empty when it holds none (for display: integrity
    reports a malformed leaf)."""
    return _header_of(leaf) or {}


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


def _ledger_problem(doc: Doc, events: list[Doc]) -> str | None:
    """What in a prescription's ledger events breaks the chain, if anything: versions 1..n,
    each leaf canonical JSON equal to its stored header, naming this prescription and its
    version, each `prev` the leaf hash of the version before, and the application's record of
    who acted saying what the leaf says."""
    if not events:
        return f"the ledger holds no event of {doc['_id']}"
    prev: bytes | None = None
    for expected, event in enumerate(events, start=1):
        version = event.get("version")
        if version != expected:
            return f"version {expected} is missing from the ledger (version {version} follows version {expected - 1})"
        leaf = bytes(event["leaf"])
        try:
            header = json.loads(leaf)
        except ValueError:
            return f"event {version}: its leaf is not JSON"
        if not isinstance(header, dict) or canonical_json(header) != leaf:
            return f"event {version}: its leaf is not canonical JSON"
        if event.get("header") != header:
            return f"event {version}: the ledger's header differs from its leaf (edited)"
        if header.get("version") != version or header.get("subject") != doc["_id"]:
            return f"event {version}: its leaf names another prescription or version"
        if header.get("prev") != (None if prev is None else b64(prev)):
            return f"event {version}: the hash chain to event {version - 1} is broken"
        problem = _actor_disagreement(doc, (event.get("data") or {}).get("actor"), header)
        if problem is not None:
            return f"event {version}: {problem}"
        prev = leaf_hash(leaf)
    return None


def _sequencing_problem(events: list[Doc], placed: list[int | None]) -> str | None:
    """The log takes a prescription's events in version order: a sequenced event after one
    that is not means an entry was removed or rewritten."""
    for event, index, before in zip(events[1:], placed[1:], placed[:-1], strict=True):
        if index is not None and before is None:
            return f"event {event['version']} is in the log (leaf {index}) but event {event['version'] - 1} is not"
    return None


def _document_problem(doc: Doc, events: list[Doc]) -> str | None:
    """What in the document disagrees with its ledger events, if anything: its version, its
    copy of the events, the hash of its last leaf, and the newest event's state digest."""
    newest = events[-1]
    n = newest["version"]
    copy = {e.get("version"): e for e in doc.get("events", [])}
    extra = sorted((v for v in copy if not isinstance(v, int) or v > n), key=str)
    if extra:
        fake = copy[extra[0]]
        return (
            f"event {extra[0]} ({fake.get('type')}) of the document is not in the ledger, "
            f"whose newest event of it is version {n}"
        )
    if doc.get("version") != n:
        return (
            f"the document is at version {doc.get('version')}, the ledger at version {n}: the "
            "document was rolled back or edited"
        )
    for event in events:
        version = event["version"]
        mine = copy.get(version)
        if mine is None:
            return f"event {version} is missing from the document's copy of its events"
        if bytes(mine.get("leaf", b"")) != bytes(event["leaf"]) or mine.get("id") != event["_id"]:
            return f"event {version}: the document's copy differs from the ledger's event"
    if bytes(doc.get("lastLeafHash") or b"") != leaf_hash(bytes(newest["leaf"])):
        return f"the document's last leaf hash is not that of event {n}"
    header = newest["header"]
    if "erased" in doc and header.get("type") != rx.EventType.PERSONAL_DATA_ERASED:
        return "document marked erased, its latest event is not an erasure"
    # After an erasure the salt is gone and the digest is of the remaining (impersonal) state.
    salt = b"" if "erased" in doc else doc.get("salt")
    if salt is None or rx.digest(bytes(salt), rx.state_of(doc)) != header.get("stateDigest"):
        return f"the document differs from the state digest of its event {n}"
    return None


def shown_actor(doc: Doc, event: Doc, header: Doc, hidden: bool) -> str:
    """Who acted in a ledger event: as the application recorded it when that agrees with the
    leaf, else (withheld from auditors, erased, or disagreeing) as the leaf says."""
    actor = (event.get("data") or {}).get("actor") or {}
    if hidden or not actor.get("sub") or _actor_disagreement(doc, actor, header):
        return str(header.get("actor", ""))
    return f"{actor['role']}:{actor['sub']}"


def _actor_disagreement(doc: Doc, actor: Doc | None, header: Doc) -> str | None:
    """The application's record of who acted must say what the leaf says (the leaf records a
    patient only as PATIENT: then it must be the prescription's own patient)."""
    actor = actor or {}
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


def _count(value: Any) -> int:
    """A non-negative count stored in a document (an integral double, as mongosh writes
    numbers, counts), else 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else 0


def _newest(into: dict[str, int], events: Iterable[Doc]) -> None:
    """Raise `into[subject]` to each well-formed event's version."""
    for event in events:
        subject, version = event.get("subject"), event.get("version")
        if isinstance(subject, str) and isinstance(version, int) and not isinstance(version, bool):
            into[subject] = max(into.get(subject, 0), version)
