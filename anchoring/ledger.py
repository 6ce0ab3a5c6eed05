"""Appending events: the write side of the log.

Appends are group-committed: everything queued while the previous group was written goes out
together, in this order: one `pending` intent document holding the group's events (the
sequencer's queue), the events in `ledger` (the truth, unique on (subject, version)), and one
`pending` commit marker naming the events whose ledger copy is written. An append is
acknowledged only when all three are durable. Grouping keeps `pending` small in documents, which
matters on servers where every query scans; the marker lets the sequencer work from `pending`
alone. An intent without a marker (an appender that died or is slow) is checked against the
ledger after a grace period and completed from its copy. Concurrent appends in one process are group-committed:
one insert_many per collection for everything queued while the previous batch was written.

A ledger event's `_id` is derived from its (subject, version) (`event_id`), so a subject's
events are read by `_id` (equalities and `$in`s), the one lookup every server answers from an index
(`events_of`, `newest_event`, `events_at`: the one place these reads are written). Two appends
racing for one version then share an `_id` as well as the unique (subject, version) key: each
event also carries its own `attempt` id, which tells whose append took the version.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import bson
import bson.errors
from bson import Binary, ObjectId
from pymongo import DESCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, PyMongoError

from anchoring.dialect import Dialect, by_ids, detect, one_of
from anchoring.encoding import EncodingError, b64, canonical_json
from anchoring.errors import (
    InvalidEvent,
    LedgerUnavailable,
    VersionConflict,
    database_error,
    frames,
)
from anchoring.hashing import leaf_hash
from anchoring.store import Doc, LogStore

log = logging.getLogger("rxledger.ledger")

DUPLICATE_KEY = 11000
MAX_SUBJECT_LENGTH = 256
MAX_LEAF_BYTES = 0xFFFF  # tlog-tiles entry bundles prefix each leaf with a uint16 length
MAX_DEPTH = 32
MAX_GROUP_BYTES = 4 * 1024 * 1024
EVENT_ID_DOMAIN = b"rxledger event\0"
# Versions of a subject read at once past the one its document names: the first read looks
# one version beyond the newest it expects (a document behind its ledger), then one more (a
# deleted event followed by a later one is a gap, which the subject's full read then shows).
PROBE_AHEAD = 2
# At most this many versions are read at once on a document's word (which an attacker with
# database access writes); further versions are probed PROBE_AHEAD at a time.
MAX_FIRST_READ = 64


@dataclass(frozen=True)
class Appended:
    """An acknowledged append: the event's id and its leaf bytes and hash."""

    event_id: ObjectId
    subject: str
    version: int
    leaf: bytes
    leaf_hash: bytes


def _check_keys(value: Any, path: str, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise InvalidEvent(f"header nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if (
                not isinstance(key, str)
                or not key
                or key.startswith("$")
                or "." in key
                or "\x00" in key
            ):
                raise InvalidEvent(
                    f"header key {path}{key!r} must be a non-empty string without '.' or a leading '$'"
                )
            _check_keys(item, f"{path}{key}.", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_keys(item, f"{path}{i}.", depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool) and not -(2**53) <= value <= 2**53:
        raise InvalidEvent(
            f"header value at {path.rstrip('.')} is outside the exact JSON integer range"
        )


# The two kinds of `pending` document: a group's intent, and its commit marker.
INTENTS: Doc = {"committed": {"$exists": False}}
MARKERS: Doc = {"committed": {"$exists": True}}


def commit_marker(group_id: ObjectId, event_ids: list[ObjectId]) -> Doc:
    """The `pending` document that says the ledger copies of these events of a group exist."""
    return {"_id": marker_id(group_id), "committed": group_id, "events": event_ids}


def marker_id(group_id: ObjectId) -> str:
    return f"{group_id}.c"


def intent(group_id: ObjectId, events: list[Doc]) -> Doc:
    """The `pending` document queuing a group of events for the sequencer. The events travel
    as one BSON blob: a server that decodes every document it scans (FerretDB) then pays for
    one binary field instead of a deep structure per event."""
    blob = bson.encode({"events": events})
    return {
        "_id": group_id,
        "queuedAt": dt.datetime.now(dt.UTC),
        "count": len(events),
        "events": Binary(blob),
    }


_DECODE: bson.CodecOptions[Doc] = bson.CodecOptions(tz_aware=True)


class UnreadableIntent(ValueError):
    """A `pending` intent this code never wrote: its events do not decode, or one lacks the
    `_id`, subject, version and leaf every queued event has (planted, or edited in place)."""


def well_formed_event(e: object) -> bool:
    """Whether `e` has the `_id`, subject, version and leaf every queued or ledger event has."""
    return (
        isinstance(e, dict)
        and isinstance(e.get("_id"), ObjectId)
        and isinstance(e.get("subject"), str)
        and type(e.get("version")) is int
        and isinstance(e.get("leaf"), bytes)
    )


def marker_events(doc: Doc) -> list[ObjectId] | None:
    """The event ids a commit marker names; None for one this code could not have written
    (planted or edited): its `_id` not the one of the group it names, or `events` not a list
    of ids."""
    group, events = doc.get("committed"), doc.get("events")
    if (
        isinstance(group, ObjectId)
        and doc.get("_id") == marker_id(group)
        and isinstance(events, list)
        and all(isinstance(e, ObjectId) for e in events)
    ):
        return events
    return None


def group_events(doc: Doc) -> list[Doc]:
    """The events of an intent document. Raises UnreadableIntent (naming the intent, never
    quoting its content) for one this code could not have written."""
    try:
        events = bson.decode(bytes(doc["events"]), codec_options=_DECODE)["events"]
    except (bson.errors.BSONError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise UnreadableIntent(
            f"intent {doc.get('_id')!s:.40}: its events do not decode ({type(exc).__name__})"
        ) from None
    if not isinstance(events, list) or not all(well_formed_event(e) for e in events):
        raise UnreadableIntent(f"intent {doc.get('_id')!s:.40}: an event is malformed")
    return events


def event_id(subject: str, version: int) -> ObjectId:
    """The `_id` of the ledger event of `subject` at `version`: the first 12 bytes of a
    SHA-256 over a domain tag, the subject and the decimal version (NUL-separated; a subject
    holds no NUL), so a reader finds a subject's events by `_id` alone."""
    digest = hashlib.sha256(
        EVENT_ID_DOMAIN + subject.encode() + b"\0" + str(version).encode()
    ).digest()
    return ObjectId(digest[:12])


def same_append(stored: Doc, ours: Doc) -> bool:
    """Whether the ledger's `stored` event is `ours` (a retried insert), not a rival's for the
    same version (which has the same derived `_id`): same attempt id and leaf."""
    return stored.get("attempt") == ours.get("attempt") and bytes(stored.get("leaf", b"")) == bytes(
        ours["leaf"]
    )


def make_event(
    subject: Any,
    version: Any,
    header: Any,
    data: Any = None,
    chosen_id: ObjectId | None = None,
    tags: Any = None,
    clears_tags: Any = (),
) -> tuple[Doc, Appended]:
    """Validate an event and build its ledger document. Raises InvalidEvent.

    `header` becomes the leaf (canonical JSON); `data` is the application's own record of the
    event, stored beside it in `ledger` but not in the tree (so it may hold what a leaf must not,
    and may be erased). `tags` (short strings by name) travel with the sequenced entry, for
    followers of the log to route events without reading the ledger. `clears_tags` names tags
    withdrawn from the subject's earlier entries when this event is sequenced (the sequencer
    sequences a subject's versions in order, so all of them are in the log by then, and it
    leaves the named tags off those it sequences together with this one).

    The event's `_id` is `event_id(subject, version)`; a caller that names one (to record it
    before the append) must name that one, since reads find events by it."""
    if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT_LENGTH:
        raise InvalidEvent(
            f"subject must be a non-empty string of at most {MAX_SUBJECT_LENGTH} characters"
        )
    if "\x00" in subject:
        raise InvalidEvent("subject must not contain NUL characters")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidEvent(f"version must be a positive integer, got {version!r:.40}")
    if not isinstance(header, dict):
        raise InvalidEvent("header must be a JSON object")
    if data is not None and not isinstance(data, dict):
        raise InvalidEvent("data must be a document")
    if tags is not None and (
        not isinstance(tags, dict)
        or not all(isinstance(k, str) and isinstance(v, str | None) for k, v in tags.items())
    ):
        raise InvalidEvent("tags must map names to strings")
    if not isinstance(clears_tags, list | tuple) or not all(
        isinstance(name, str) and name and "." not in name and not name.startswith("$")
        for name in clears_tags
    ):
        raise InvalidEvent("clears_tags must list tag names")
    for key, expected in (("subject", subject), ("version", version)):
        if key in header and header[key] != expected:
            raise InvalidEvent(
                f"header {key} {header[key]!r:.40} differs from the appended {key} {expected!r:.40}"
            )
    _check_keys(header, "")
    try:
        leaf = canonical_json(header)
    except EncodingError as exc:
        raise InvalidEvent(str(exc)) from exc
    if len(leaf) > MAX_LEAF_BYTES:
        raise InvalidEvent(f"header is {len(leaf)} bytes canonicalized, at most {MAX_LEAF_BYTES}")
    try:
        bson.encode({"subject": subject, "header": header, "data": data})
    except (bson.errors.InvalidDocument, UnicodeEncodeError, OverflowError) as exc:
        raise InvalidEvent(f"the event cannot be stored as BSON: {exc}") from exc
    derived = event_id(subject, version)
    if chosen_id is not None and chosen_id != derived:
        raise InvalidEvent(
            f"event id {chosen_id} is not the id of {subject!r:.40} version {version} ({derived})"
        )
    doc = {
        "_id": derived,
        "subject": subject,
        "version": version,
        "header": header,
        "leaf": Binary(leaf),
        "appendedAt": dt.datetime.now(dt.UTC),
        "attempt": ObjectId(),
    }
    if data is not None:
        doc["data"] = data
    if tags:
        doc["tags"] = tags
    if clears_tags:
        doc["clearsTags"] = list(clears_tags)
    return doc, Appended(derived, subject, version, leaf, leaf_hash(leaf))


def _remove(doc: Doc, path: str) -> bool:
    """Delete the field at dotted `path` from `doc`; whether it was there."""
    *parents, last = path.split(".")
    holder: Any = doc
    for name in parents:
        holder = holder.get(name)
        if not isinstance(holder, dict):
            return False
    if last not in holder:
        return False
    del holder[last]
    return True


Pending = tuple[Doc, Appended, "asyncio.Future[Appended]"]


def _predecessor_problem(
    appended: Appended, header: Doc, known: dict[tuple[str, int], bytes]
) -> str | None:
    """Why an event does not extend its subject's previous version (None when it does)."""
    subject, version = appended.subject, appended.version
    previous = known.get((subject, version - 1)) if version > 1 else None
    if version > 1 and previous is None:
        return (
            f"version gap: {subject!r} has no version {version - 1}, so version {version} "
            "cannot follow it; append the versions in order"
        )
    if "prev" not in header:
        return None
    if previous is None and header["prev"] is not None:
        return f"the first version of {subject!r} has prev {header['prev']!r:.60}; it must be null"
    if previous is not None and header["prev"] != b64(previous):
        return (
            f"prev {header['prev']!r:.60} of {subject!r} version {version} is not the leaf hash "
            f"of version {version - 1} ({b64(previous)})"
        )
    return None


class Ledger:
    """Group-committing appender. `append` returns once the event is durably stored."""

    def __init__(self, store: LogStore, *, max_batch: int = 1000) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: list[Pending] = []
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self.listeners: list[Any] = []  # callables notified (no args) after each durable batch
        # Callables handed each committed group as (group id, its events, the ids its marker
        # names, whether every predecessor they extend was written by this process): an
        # in-process sequencer takes them from here instead of reading `pending` back.
        self.handoffs: list[Any] = []
        self._closed = False
        self._writing = False
        self._indexed = False
        # (subject, version) -> leaf hash of events this process wrote to the ledger: stored
        # events never change, so a later version's predecessor check needs no query (which
        # FerretDB answers by decoding the whole ledger). Bounded, oldest forgotten first.
        self._written: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._written_max = 100_000

    async def append(
        self,
        subject: str,
        version: int,
        header: dict[str, Any],
        data: dict[str, Any] | None = None,
        event_id: ObjectId | None = None,
        tags: dict[str, str | None] | None = None,
        clears_tags: tuple[str, ...] = (),
    ) -> Appended:
        if self._closed:
            raise LedgerUnavailable("the log is shut down; the event was not stored")
        doc, appended = make_event(subject, version, header, data, event_id, tags, clears_tags)
        future: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._queue.append((doc, appended, future))
        self._wakeup.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_forever(), name="ledger-flusher")
        return await future

    async def queued(self, event_ids: list[ObjectId]) -> set[ObjectId]:
        """Which of these events are queued for the log: named by a commit marker, or in an
        intent whose marker is not written yet. Reads `pending`, which holds only what is not
        sequenced yet; an event written straight into `ledger` is in neither."""
        wanted = set(event_ids)
        found = {
            e
            async for m in self.store.pending.find(MARKERS, {"committed": 1, "events": 1})
            for e in marker_events(m) or []
            if e in wanted
        }
        if found != wanted:
            async for doc in self.store.pending.find(INTENTS, {"events": 1}):
                try:
                    found.update(e["_id"] for e in group_events(doc) if e["_id"] in wanted)
                except UnreadableIntent as exc:
                    # What it held, if ours, its marker names (read above) or it never was
                    # acknowledged; the sequencer reports and sets it aside.
                    log.warning("queued: %s; skipped", exc)
        return found

    async def close(self) -> None:
        """Stop taking appends, let the batch being written finish (bounded), fail the rest."""
        self._closed = True
        if self._flusher is not None and not self._flusher.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._drained()), 5.0)
            except TimeoutError:
                pass
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
        for _, _, future in self._queue:
            if not future.done():
                future.set_exception(
                    LedgerUnavailable("the log is shutting down; the event was not stored")
                )
        self._queue.clear()

    async def redact_queued(self, subject: str, before_version: int, fields: list[str]) -> int:
        """Remove `fields` (dotted paths such as "data.state") from the queued copies of the
        events of `subject` below `before_version`, in the intent documents not yet sequenced.
        Each intent is replaced only if unchanged since read (one that left the queue
        meanwhile needs nothing). Returns how many intents were rewritten."""
        rewritten = 0
        async for group in self.store.pending.find({"committed": {"$exists": False}}):
            try:
                events = group_events(group)
            except UnreadableIntent as exc:
                # Holds no copy to redact: the sequencer takes its events, if any, from
                # the ledger, whose copies erasure redacts.
                log.warning("redact: %s; skipped", exc)
                continue
            changed = False
            for event in events:
                if event["subject"] == subject and event["version"] < before_version:
                    for path in fields:
                        changed = _remove(event, path) or changed
            if changed:
                result = await self.store.pending.update_one(
                    {"_id": group["_id"], "events": group["events"]},
                    {"$set": {"events": Binary(bson.encode({"events": events}))}},
                )
                rewritten += result.modified_count
        return rewritten

    def _take_group(self) -> tuple[list[Pending], list[Pending]]:
        """The next group: at most max_batch events and MAX_GROUP_BYTES of leaves, so that
        the intent document stays far below MongoDB's 16 MiB document limit."""
        total, n = 0, 0
        for doc, _, _ in self._queue[: self.max_batch]:
            total += 2 * len(doc["leaf"]) + 256
            if n and total > MAX_GROUP_BYTES:
                break
            n += 1
        return self._queue[:n], self._queue[n:]

    async def _drained(self) -> None:
        while self._queue or self._writing:
            await asyncio.sleep(0.01)

    async def _flush_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._take_group()
                self._writing = True
                try:
                    await self._write(batch)
                except Exception as exc:
                    # Never leave a caller waiting on an unexpected error.
                    log.error("append batch failed: %s\n%s", database_error(exc), frames(exc))
                    self._fail_all(batch, exc)
                except asyncio.CancelledError as exc:
                    self._fail_all(batch, exc)
                    raise
                finally:
                    self._writing = False
                for listener in self.listeners:
                    listener()

    async def _insert(self, collection: Any, docs: list[Doc]) -> dict[int, Doc]:
        """insert_many(ordered=False); returns the per-document errors by position. A write
        concern error leaves every document's durability unknown, so it raises."""
        try:
            await collection.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                raise
            return {err["index"]: err for err in exc.details.get("writeErrors", [])}
        return {}

    async def _write(self, batch: list[Pending]) -> None:
        group_id = ObjectId()
        try:
            if not self._indexed:
                # The unique (subject, version) index must exist before the first event does.
                await self.store.ensure_indexes()
                self._indexed = True
            batch, local = await self._extending_their_predecessors(batch)
            if not batch:
                return
            # The intent first: whatever is written after it is completed or discarded by the
            # sequencer, so a failure from here on loses nothing.
            await self.store.pending.insert_one(intent(group_id, [d for d, _, _ in batch]))
            failed = await self._insert(self.store.ledger, [d for d, _, _ in batch])
        except PyMongoError as exc:
            self._fail_all(batch, exc)
            return
        written, conflicts = [], []
        for i, item in enumerate(batch):
            err = failed.get(i)
            if err is None:
                written.append(item)
            elif err.get("code") == DUPLICATE_KEY:
                conflicts.append(item)
            else:
                self._reject(item, err)
        if conflicts:
            ours = await self._settle_conflicts(conflicts)
            if ours is None:
                # Which conflicts are our own is unknown: no marker, so the sequencer settles
                # the group from the ledger after the orphan grace period.
                self._fail_all(written, LedgerUnavailable("conflicts could not be settled"))
                return
            written += ours
        # A marker even when nothing was written: a group of refused events must leave the
        # queue now, not hold its subjects back until the orphan grace period ends.
        try:
            await self.store.pending.insert_one(
                commit_marker(group_id, [d["_id"] for d, _, _ in written])
            )
        except PyMongoError as exc:
            self._fail_all(written, exc)
            return
        # Without the events that lost their version to a rival: the rival's has the same
        # `_id`, and a sequencer must never take the loser's copy for it.
        lost = {id(item[2]) for item in conflicts} - {id(item[2]) for item in written}
        offered = [d for d, _, future in batch if id(future) not in lost]
        for handoff in self.handoffs:
            handoff(group_id, offered, [d["_id"] for d, _, _ in written], local)
        for _, appended, future in written:
            self._written[(appended.subject, appended.version)] = appended.leaf_hash
            if not future.done():
                future.set_result(appended)
        while len(self._written) > self._written_max:
            self._written.popitem(last=False)

    async def _extending_their_predecessors(
        self, batch: list[Pending]
    ) -> tuple[list[Pending], bool]:
        """The events of `batch` that extend their subject's previous version, and whether
        each predecessor was in the batch or written by this process; the others are
        refused. Version n+1 needs version n, in the ledger or earlier in this group (one
        query for the group), and a header's `prev`, where it has one, must be the leaf hash
        of version n (null for version 1): a subject's events form a hash chain without gaps,
        whatever a caller (or a document it read) believes the newest version to be."""
        ours = {(a.subject, a.version): a.leaf_hash for _, a, _ in batch}
        stored: dict[tuple[str, int], bytes] = {}
        wanted = []
        for s, v in sorted(ours):
            if v > 1 and (s, v - 1) not in ours:
                if (s, v - 1) in self._written:
                    stored[(s, v - 1)] = self._written[(s, v - 1)]
                else:
                    wanted.append((s, v - 1))
        if wanted:
            found = await events_at(self.store.ledger, wanted, {"leaf": 1})
            stored.update({key: leaf_hash(bytes(d["leaf"])) for key, d in found.items()})
        known = {**ours, **stored}  # a stored version wins over a rival in this group
        accepted: set[int] = set()
        for item in sorted(batch, key=lambda item: (item[1].subject, item[1].version)):
            doc, appended, future = item
            problem = _predecessor_problem(appended, doc["header"], known)
            if problem is None:
                accepted.add(id(future))
                continue
            known.pop((appended.subject, appended.version), None)
            if not future.done():
                future.set_exception(InvalidEvent(problem))
        return [item for item in batch if id(item[2]) in accepted], not wanted

    @staticmethod
    def _reject(item: Pending, err: Doc) -> None:
        future = item[2]
        if not future.done():
            future.set_exception(
                InvalidEvent(f"the database refused the event (code {err.get('code')})")
            )

    async def _settle_conflicts(self, conflicts: list[Pending]) -> list[Pending] | None:
        """A duplicate key is either (subject, version) taken by another event, or our own
        event already written (a retried insert). Fails the former, returns the latter; None
        when the database could not say. A rival's event has our derived `_id` too, so what
        tells them apart is the stored event's content (`same_append`), not its presence."""
        ids = [doc["_id"] for doc, _, _ in conflicts]
        try:
            stored = await by_ids(self.store.ledger, ids, {"leaf": 1, "attempt": 1})
        except PyMongoError as exc:
            self._fail_all(conflicts, exc)
            return None
        ours = []
        for item in conflicts:
            doc, appended, future = item
            there = stored.get(doc["_id"])
            if there is not None and same_append(there, doc):
                ours.append(item)
            elif not future.done():
                future.set_exception(VersionConflict(appended.subject, appended.version))
        return ours

    @staticmethod
    def _fail_all(batch: list[Pending], exc: BaseException) -> None:
        # Only the class and code: a BulkWriteError's text holds the events themselves.
        log.warning("append failed: %s", database_error(exc))
        error = LedgerUnavailable(
            f"database unavailable ({database_error(exc)}); the event was not acknowledged and may "
            "or may not be recorded: retry later; a VersionConflict then means an event for that "
            "version exists (possibly this one)"
        )
        for _, _, future in batch:
            if not future.done():
                future.set_exception(error)


# --- reading a subject's events --------------------------------------------------------------


def _keyed(projection: Doc | None) -> Doc | None:
    """`projection` keeping what places an event in its subject's history."""
    return None if projection is None else {**projection, "subject": 1, "version": 1}


async def events_at(
    ledger: AsyncCollection[Doc], keys: list[tuple[str, int]], projection: Doc | None = None
) -> dict[tuple[str, int], Doc]:
    """The ledger events at these (subject, version)s, by key (absent ones left out). On a
    server that serves only `_id` lookups from an index, by their derived `_id`s, with one
    (subject, version) query for those not found (events written before ids were derived)."""
    found: dict[tuple[str, int], Doc] = {}
    missing = list(dict.fromkeys(keys))
    if not missing:
        return found
    if await detect(ledger) is Dialect.FERRETDB:
        ids = {event_id(s, v): (s, v) for s, v in missing}
        found = {ids[i]: d for i, d in (await by_ids(ledger, ids, projection)).items()}
        missing = [key for key in missing if key not in found]
    if missing:
        wanted = [{"subject": s, "version": v} for s, v in missing]
        query = wanted[0] if len(wanted) == 1 else {"$or": wanted}
        async for d in ledger.find(query, _keyed(projection)):
            found[(d["subject"], d["version"])] = d
    return found


async def events_of(
    ledger: AsyncCollection[Doc],
    subjects: list[str],
    projection: Doc | None = None,
    known: Mapping[str, int] | None = None,
    expected_only: bool = False,
) -> dict[str, list[Doc]]:
    """Each subject's ledger events, oldest first. `known` is the newest version a caller
    expects of a subject (its document's), a hint that only saves round trips.

    On MongoDB one query by subject, which the (subject, version) index serves. On a server
    that serves only `_id` lookups from an index, versions 1 to the expected one and
    PROBE_AHEAD beyond it by their derived `_id`s, all subjects together, then PROBE_AHEAD more
    while the last ones are found: a subject's events are versions 1..n without a gap. A
    subject whose version 1 is not found under its derived `_id` (written before ids were
    derived, or not at all), or with a gap in what was read (an event deleted), is read by
    subject instead, so the checks see what the ledger holds. An event stored under any other
    `_id` than its derived one is never read on this path: no append writes one.

    With `expected_only`, a subject the caller expects no version of (none in `known`) and
    whose version 1 is not under its derived `_id` has no events, and is not read by subject:
    on FerretDB that read decodes the whole ledger, and an id nothing has (any id a caller may
    send) must not cost that. Its events written before ids were derived are then not found."""
    if await detect(ledger) is not Dialect.FERRETDB:
        return await _events_by_subject(ledger, subjects, projection)
    known = known or {}
    chains: dict[str, dict[int, Doc]] = {s: {} for s in subjects}
    read: dict[str, int] = {s: 0 for s in chains}  # versions 1..read[s] were looked up
    wanted = {s: min(max(known.get(s, 0), 0), MAX_FIRST_READ) + PROBE_AHEAD for s in chains}
    by_subject: list[str] = []
    while wanted:
        ids = {
            event_id(s, v): (s, v)
            for s, last in wanted.items()
            for v in range(read[s] + 1, last + 1)
        }
        for i, d in (await by_ids(ledger, ids, projection)).items():
            s, v = ids[i]
            chains[s][v] = d
        read.update(wanted)
        looked, wanted = wanted, {}
        for s, last in looked.items():
            chain = chains[s]
            if len(chain) == last:  # every version looked up is there: look further
                wanted[s] = last + PROBE_AHEAD
                continue
            first_miss = next(v for v in range(1, last + 1) if v not in chain)
            if first_miss == 1 and expected_only and known.get(s, 0) <= 0:
                chain.clear()  # no version 1: no events, whatever is found beyond it
                continue
            if first_miss == 1 or max(chain) > first_miss:
                by_subject.append(s)
            elif first_miss == last:  # nothing looked up past the first miss yet
                wanted[s] = last + PROBE_AHEAD
    found = {s: [chain[v] for v in sorted(chain)] for s, chain in chains.items()}
    if by_subject:
        found.update(await _events_by_subject(ledger, by_subject, projection))
    return found


async def newest_event(
    ledger: AsyncCollection[Doc],
    subject: str,
    projection: Doc | None = None,
    known: int = 0,
    expected_only: bool = False,
) -> Doc | None:
    """The newest ledger event of `subject` (None when it has none), read as `events_of`
    reads (`known`: the version expected, a hint; `expected_only`: as there)."""
    if await detect(ledger) is not Dialect.FERRETDB:
        return await ledger.find_one(
            {"subject": subject}, projection, sort=[("version", DESCENDING)]
        )
    found = await events_of(ledger, [subject], projection, {subject: known}, expected_only)
    events = found[subject]
    return events[-1] if events else None


async def event_at(
    ledger: AsyncCollection[Doc], subject: str, version: int, projection: Doc | None = None
) -> Doc | None:
    """The ledger event of `subject` at `version` (None when there is none)."""
    return (await events_at(ledger, [(subject, version)], projection)).get((subject, version))


async def _events_by_subject(
    ledger: AsyncCollection[Doc], subjects: list[str], projection: Doc | None
) -> dict[str, list[Doc]]:
    """Each subject's events, oldest first, in one query by subject."""
    found: dict[str, list[Doc]] = {s: [] for s in subjects}
    async for event in ledger.find(one_of("subject", subjects), _keyed(projection)):
        found.setdefault(event["subject"], []).append(event)
    for events in found.values():
        events.sort(key=lambda e: e["version"])
    return found
