"""The sequencer: one leader per log assigns contiguous leaf indices and publishes the tree.

Its steps carry these names in code and logs:
  queue      - appenders insert events into `pending` (see ledger.py); the leader knows the
               queue in memory: groups committed by its own process's appender are handed
               over (`offer`), others are found by reading `pending`, which FerretDB answers
               by decoding all of it, so the leader does that rarely (at once for a handed-over
               group extending a version another process appended; busy, every scan_interval
               and less often while reads find nothing new; idle, every poll_interval)
  sequence   - the leader takes a batch from that queue and inserts `entries` {_id: index}
               from the current size up, in one ordered insert (a race loses on _id); an
               event that clears tags first takes them off its subject's earlier entries
  integrate  - it extends the right edge of the tree and inserts the new tiles, and meanwhile
               the entries' positions (event id -> index, see store.py)
  publish    - it sets the new size and root on the lease document, only while it holds
               the lease (the write is fenced by holder); the groups sequenced leave `pending`
               meanwhile, by `_id` (the entries, written first, are the commit point)
Recovery reads the published head, reloads the right edge from tiles, and integrates any
entries written after it: a crash at any point leaves no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bson import Binary, ObjectId
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from anchoring.dialect import IN_BATCH, by_id_range, by_ids, delete_by_ids
from anchoring.errors import database_error, frames
from anchoring.hashing import leaf_hash
from anchoring.ledger import (
    INTENTS,
    MARKERS,
    UnreadableIntent,
    commit_marker,
    event_id,
    events_of,
    group_events,
    marker_events,
    marker_id,
    same_append,
    well_formed_event,
)
from anchoring.store import Doc, LogStore
from anchoring.tiles import TileReader, tile_document, write_tiles
from anchoring.treemath import TILE_HEIGHT, TILE_WIDTH, CompactRange, Node, root_nodes, tile_width

log = logging.getLogger("rxledger.sequencer")

# The fields of an event the sequencer uses: a handed-over group keeps only these in memory.
_SEQUENCED = ("_id", "subject", "version", "leaf", "tags", "clearsTags")


class LostLease(Exception):
    """Another process holds the lease now; this one must stop sequencing."""


class Resync(LostLease):
    """Storage moved under the sequencer (a race or a crash leftover): recover from it."""


@dataclass(frozen=True)
class SequencerSettings:
    batch_size: int = 4096
    groups_per_batch: int = 64  # unused: every queued group known is considered each batch
    batch_delay: float = 0.005  # group commit: wait this long for a batch to fill
    poll_interval: float = 0.05  # how often to look for events from other processes
    # While groups handed over in this process keep it busy, how often it still reads
    # `pending` for groups from other processes (and their markers); idle, every poll_interval.
    scan_interval: float = 0.25
    lease_ttl: float = 5.0
    orphan_grace: float = 10.0  # a pending event with no ledger copy this old is completed


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Sequencer:
    """Sequences pending events while holding the log's lease."""

    def __init__(
        self,
        store: LogStore,
        settings: SequencerSettings | None = None,
        holder: str | None = None,
        reader: TileReader | None = None,
    ) -> None:
        self.store = store
        self.settings = settings or SequencerSettings()
        self.holder = holder or f"seq-{uuid.uuid4().hex[:12]}"
        self.reader = reader or TileReader(store)
        self.is_leader = False
        # The published checkpoint the head names, as the leader knows it: only the leader
        # names one (publish_checkpoint).
        self.checkpoint_size = -1
        # Every write of the head by this process goes through this lock: on a server whose
        # updates read the document and write it back whole (FerretDB v1), two concurrent
        # updates of one document can lose one of them.
        self._head_lock = asyncio.Lock()
        self.size = 0
        self.root = b""
        self._range = CompactRange()
        self._edge: dict[int, tuple[int, list[bytes]]] = {}  # tile level -> (index, hashes)
        self._wakeup = asyncio.Event()
        # Called after each publish with (size, root, the entries just published).
        self.on_publish: list[Callable[[int, bytes, list[Doc]], object]] = []
        self.last_error: str | None = None
        self.batches = 0
        self.sequenced = 0
        self.step_seconds: dict[str, float] = {}  # cumulative time per step, for metrics
        self.epoch = 0  # counts recoveries, so others know to reload what they cached
        self._done: set[Any] = set()  # sequenced events whose group is still queued
        # Events of a batch whose entries the database refused: recovery asks `entries` for
        # them by event, whatever their positions say.
        self._suspects: set[Any] = set()
        # The queue as this leader knows it: intents {_id, events, queuedAt} by group id, the
        # event ids each marker names, and when (time.monotonic) each group handed over by
        # this process's appender waits for a read of `pending` that began after it (a
        # predecessor it extends may be queued by another process, unseen yet).
        self._queue: dict[Any, Doc] = {}
        self._markers: dict[Any, set[Any]] = {}
        self._unscanned: dict[Any, float] = {}
        self._dequeued: OrderedDict[Any, None] = OrderedDict()  # recent, for late handoffs
        self._reported: set[str] = set()  # malformed documents reported, by repr of `_id`
        self._scanned_at = -math.inf  # time.monotonic() the last read of `pending` began
        self._scan_seconds = 0.0  # how long it took
        self._quiet = 0  # reads of `pending` in a row that found no group it did not know
        self._dequeuing: asyncio.Task[None] | None = None  # the one dequeue in flight

    @property
    def queued_groups(self) -> int:
        """Groups queued and not yet wholly sequenced, as this process knows them (a leader
        knows them all, up to its next read of `pending`)."""
        return len(self._queue)

    def wake(self) -> None:
        self._wakeup.set()

    def offer(self, group_id: Any, events: list[Doc], committed: list[Any], local: bool) -> None:
        """A group this process's appender committed (intent, ledger copies and marker are
        durable): queued here without reading `pending` back. `local` says every predecessor
        its events extend was in the group or handed over before; otherwise the group waits
        for the next read of `pending`, which shows any earlier version queued elsewhere."""
        if not self.is_leader or group_id in self._dequeued:
            return
        # Known already when a read of `pending` (recovery's, or a scan) fell between its
        # intent and its marker: the marker named here still completes it.
        self._queue.setdefault(
            group_id,
            {
                "_id": group_id,
                "queuedAt": _now(),
                "events": [{k: e[k] for k in _SEQUENCED if k in e} for e in events],
            },
        )
        self._markers.setdefault(group_id, set(committed))
        if not local:
            self._unscanned[group_id] = time.monotonic()
        self._wakeup.set()

    # --- lease ------------------------------------------------------------------------

    async def acquire_lease(self) -> bool:
        async with self._head_lock:
            return await self._acquire_lease()

    async def _acquire_lease(self) -> bool:
        now = _now()
        try:
            doc = await self.store.leases.find_one_and_update(
                {
                    "_id": self.store.origin,
                    "$or": [{"holder": self.holder}, {"expiresAt": {"$lt": now}}],
                },
                {
                    "$set": {
                        "holder": self.holder,
                        "expiresAt": now + dt.timedelta(seconds=self.settings.lease_ttl),
                    }
                },
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            return False  # held by someone else: the upsert tried to create it again
        if doc is None or doc.get("holder") != self.holder:
            return False
        self.checkpoint_size = int(doc.get("checkpointSize", -1))
        return True

    async def release_lease(self) -> None:
        async with self._head_lock:
            await self.store.leases.update_one(
                {"_id": self.store.origin, "holder": self.holder},
                {"$set": {"expiresAt": _now()}},
            )
            self.is_leader = False

    async def fenced_update(self, fields: Doc) -> None:
        """Write to the head document only while holding the lease (renewing it)."""
        async with self._head_lock:
            await self._fenced_update(fields)

    async def publish_checkpoint(self, size: int) -> bool:
        """Name checkpoint `size` in the head, unless a larger one is named already. False
        when this process does not lead: the leader, the one writer of the head, does it."""
        async with self._head_lock:
            if not self.is_leader:
                return False
            if size > self.checkpoint_size:
                await self._fenced_update({"checkpointSize": size})
                self.checkpoint_size = size
            return True

    async def _fenced_update(self, fields: Doc) -> None:
        fields = {**fields, "expiresAt": _now() + dt.timedelta(seconds=self.settings.lease_ttl)}
        result = await self.store.leases.update_one(
            {"_id": self.store.origin, "holder": self.holder}, {"$set": fields}
        )
        if result.matched_count != 1:
            self.is_leader = False
            raise LostLease(f"{self.holder} lost the lease of {self.store.origin}")

    # --- recovery ----------------------------------------------------------------------

    async def recover(self) -> None:
        """Load the published head and right edge, then integrate entries written after it."""
        await self._settle_dequeue(raise_errors=False)
        await self.store.ensure_indexes()
        head = await self.store.head()
        size = int(head.get("size", 0))
        nodes = root_nodes(size)
        hashes = await self.reader.nodes(nodes, size) if size else {}
        self._range = CompactRange(size, [hashes[n] for n in nodes])
        self._edge = {}
        level = 0
        while size >> (TILE_HEIGHT * level):
            index = (size >> (TILE_HEIGHT * level)) // TILE_WIDTH
            width = tile_width(level, index, size)
            if width:
                key_nodes = [
                    Node(TILE_HEIGHT * level, index * TILE_WIDTH + i) for i in range(width)
                ]
                got = await self.reader.nodes(key_nodes, size)
                self._edge[level] = (index, [got[n] for n in key_nodes])
            level += 1
        self.size = size
        self.root = self._range.root()
        if "positionsFrom" not in head:
            # Entries from here on get positions (those after the head as they are integrated
            # below); an older log's earlier entries have none.
            await self.fenced_update({"positionsFrom": size})
        tail = await self._entries_from(size)
        if tail:
            log.info("recover: integrating %d entries sequenced after size %d", len(tail), size)
            await self._integrate_and_publish(tail)
        # Which queued events are in the log already (a crash before their group left
        # `pending`, or a group only partly sequenced): by their positions (every entry below
        # the head has one, but in a log older than positions); batches keep the answer.
        # Markers before intents: a marker is written after its intent, so one whose intent
        # is gone when read afterwards has outlived its group (a crash mid-dequeue).
        self._queue, self._markers, self._unscanned = {}, {}, {}
        scanned_at = time.monotonic()
        markers = self._valid_markers(
            [
                m
                async for m in self.store.pending.find(
                    MARKERS, {"_id": 1, "committed": 1, "events": 1}
                )
            ]
        )
        groups = await self._groups({})
        queued = [e["_id"] for g in groups for e in g["events"]]
        self._done = set()
        if queued:
            self._done = await self._sequenced(queued)
        alive = {g["_id"] for g in groups}
        strays = [m["_id"] for m in markers if m["committed"] not in alive]
        if strays:
            await self.store.pending.delete_many({"_id": {"$in": strays}})
        for g in groups:
            self._queue.setdefault(g["_id"], g)
        for m in markers:
            if m["committed"] in alive:
                self._markers.setdefault(m["committed"], set(m["events"]))
        self._scanned_at = scanned_at
        self.epoch += 1
        log.info("recover: %s leads %s at size %d", self.holder, self.store.origin, self.size)

    async def _sequenced(self, events: list[Any]) -> set[Any]:
        """Which of `events` the published log holds. Their positions say where to look (by
        `_id`), and an entry there naming the event confirms it: a position is not evidence,
        and one planted for a queued event must not drop that event from the log. Events of
        a batch the database refused (a position lost or edited, so a duplicate entry) are
        looked up in `entries` by event, which only such a refusal costs."""
        head = await self.store.head()
        placed = {
            event: index
            for event, index in (await self.store.entry_indices(events, head)).items()
            if index < self.size
        }
        stored = await by_ids(self.store.entries, set(placed.values()), {"event": 1})
        done = {e for e, i in placed.items() if stored.get(i, {}).get("event") == e}
        suspects = [e for e in events if e in self._suspects and e not in done]
        self._suspects = set()
        if suspects:
            query = {"event": {"$in": suspects}, "_id": {"$lt": self.size}}
            done.update([d["event"] async for d in self.store.entries.find(query, {"event": 1})])
        return done

    async def _entries_from(self, size: int) -> list[Doc]:
        """The entries written from index `size` on without a gap (by `_id`, a page at a
        time: a range read on MongoDB, `_id` lookups on FerretDB)."""
        found: list[Doc] = []
        while True:
            start = size + len(found)
            page = await by_id_range(self.store.entries, start, start + IN_BATCH)
            run = [doc for i, doc in enumerate(page) if doc["_id"] == start + i]
            found += run
            if len(run) < IN_BATCH:
                return found

    # --- one batch ----------------------------------------------------------------------

    async def sequence_batch(self, paced: bool = False) -> int:
        """Sequence up to about batch_size queued events; returns how many were published.
        With nothing known to sequence it reads `pending` first, so 0 means none was queued
        then; `paced` (the leader's own loop, which polls again) spaces those reads out."""
        t0 = time.perf_counter()
        if self._dequeuing is not None and self._dequeuing.done():
            await self._settle_dequeue()
        if self._scan_due(paced):
            await self._scan()
        groups = sorted(self._queue.values(), key=lambda g: g["_id"])
        if not groups:
            await self._settle_dequeue()
            return 0
        committed = self._markers
        orphans = [g for g in groups if g["_id"] not in committed]
        if orphans:
            committed.update(await self._complete_orphans(orphans))
        await self._fill_unreadable(groups, committed)
        ok = {e_id for ids in committed.values() for e_id in ids}
        # Events of a group without a marker, or waiting for a read of `pending`, hold their
        # subjects back: an earlier version may be among them, or queued unseen elsewhere.
        unresolved = {
            e["_id"]
            for g in groups
            if g["_id"] not in committed or g["_id"] in self._unscanned
            for e in g["events"]
        }
        ok -= unresolved
        # Only what its own group's marker names: a group that lost a version to a rival
        # holds a copy with the rival's (derived) id and its own leaf.
        candidates = [
            e
            for g in groups
            for e in g["events"]
            if e["_id"] not in self._done
            and (g["_id"] not in committed or e["_id"] in committed[g["_id"]])
        ]
        ready = self._in_version_order(candidates, ok, unresolved)[: self.settings.batch_size]
        t1 = self._timed("queue", t0)
        if ready:
            cleared = await self._clear_tags(ready)
            entries = [
                {
                    "_id": self.size + i,
                    "event": e["_id"],
                    "leaf": Binary(bytes(e["leaf"])),
                    **({"tags": tags} if (tags := _entry_tags(e, cleared)) else {}),
                }
                for i, e in enumerate(ready)
            ]
            try:
                await self.store.entries.insert_many(entries, ordered=True)
            except BulkWriteError as exc:
                # Another sequencer wrote some of these indices, or an event here was sequenced
                # already (its position lost or edited): recovery integrates what is stored
                # and relearns what is done, asking `entries` about these events.
                self._suspects.update(e["event"] for e in entries)
                errors = exc.details.get("writeErrors") or [{}]
                raise Resync(
                    f"sequence: lost a race at index {self.size} (code {errors[0].get('code')})"
                ) from exc
            t2 = self._timed("sequence", t1)
            await self._integrate_and_publish(entries)
            t1 = self._timed("integrate+publish", t2)
            self._done.update(e["_id"] for e in ready)
        # A group leaves the queue once each of its events is in the log or was refused (its
        # marker does not name it: another event holds its (subject, version)).
        finished = [
            g
            for g in groups
            if g["_id"] in committed
            and all(
                e["_id"] in self._done or e["_id"] not in committed[g["_id"]] for e in g["events"]
            )
        ]
        if finished:
            # Off the critical path: the entries are the commit point, so the next batch need
            # not wait for their groups to leave `pending` (one dequeue in flight at a time).
            await self._settle_dequeue()
            for g in finished:
                self._done.difference_update(e["_id"] for e in g["events"])
                self._forget(g["_id"])
            self._dequeuing = asyncio.create_task(self._dequeue([g["_id"] for g in finished]))
        if not ready:
            await self._settle_dequeue()
        self._timed("dequeue", t1)
        if ready:
            self.batches += 1
            self.sequenced += len(ready)
        return len(ready)

    async def _clear_tags(self, ready: list[Doc]) -> dict[str, tuple[int, list[str]]]:
        """For each subject with an event here that clears tags: take those tags off the
        subject's entries sequenced before this batch (all its earlier versions are in the log
        or in this batch: versions are sequenced in order). Done before this batch's entries
        are written, so a crash in between only repeats it. Returns {subject: (version, tag
        names)}, for this batch's earlier versions to be written without them."""
        cleared: dict[str, tuple[int, list[str]]] = {}
        for e in ready:
            if e.get("clearsTags") and e["version"] > cleared.get(e["subject"], (0, []))[0]:
                cleared[e["subject"]] = (e["version"], list(e["clearsTags"]))
        for subject, (version, names) in cleared.items():
            # By derived `_id` where that is the one indexed read (events_of).
            events = (
                await events_of(self.store.ledger, [subject], {"version": 1}, {subject: version})
            )[subject]
            earlier = [d["_id"] for d in events if d["version"] < version]
            await self.store.untag_entries(earlier, names)
        return cleared

    def _scan_due(self, paced: bool) -> bool:
        """Whether to read `pending` before this batch. A read decodes all of it on FerretDB,
        so reads are spaced out, the more so while they find nothing this process did not
        hand over itself: busy with handed-over groups, scan_interval (up to twice it);
        idle, poll_interval (up to scan_interval) when `paced`, else always. A group that
        waits for a read gets one at once."""
        if self._unscanned:
            return True
        # At most doubled: with `serve --workers N` the other workers' groups reach this
        # process only through these reads, and wait for them.
        backoff: float = 2 ** min(self._quiet, 1)
        if any(g in self._markers for g in self._queue):
            interval = self.settings.scan_interval * backoff
        elif paced:
            interval = min(self.settings.poll_interval * backoff, self.settings.scan_interval)
        else:
            return True
        interval = max(interval, 4 * self._scan_seconds)  # at most a fifth of the time
        return time.monotonic() - self._scanned_at >= interval

    async def _scan(self) -> None:
        """Read all of `pending` (intents and markers in one query) into the known queue."""
        started = time.monotonic()
        # Sorted by `_id`: on MongoDB a walk of the `_id` index rather than a collection scan.
        docs = await self.store.pending.find({}).sort("_id", 1).to_list()
        markers = self._valid_markers([doc for doc in docs if "committed" in doc])
        # A group in _dequeued may still be read while its dequeue is in flight.
        new = self._decoded(
            [
                doc
                for doc in docs
                if "committed" not in doc
                and (
                    not isinstance(doc["_id"], ObjectId)  # left out, reported
                    or (doc["_id"] not in self._queue and doc["_id"] not in self._dequeued)
                )
            ]
        )
        for doc in new:
            self._queue[doc["_id"]] = doc
        found = bool(new)
        self._quiet = 0 if found else self._quiet + 1
        for m in markers:
            if m["committed"] in self._queue:
                self._markers.setdefault(m["committed"], set(m["events"]))
        self._unscanned = {g: t for g, t in self._unscanned.items() if t >= started}
        self._scanned_at = started
        self._scan_seconds = time.monotonic() - started

    async def _dequeue(self, ids: list[Any]) -> None:
        await delete_by_ids(self.store.pending, ids + [marker_id(i) for i in ids])

    async def _settle_dequeue(self, raise_errors: bool = True) -> None:
        """Wait for the dequeue in flight; its database error is raised (recovery then
        finds those groups sequenced and dequeues them again) unless `raise_errors` is False."""
        task, self._dequeuing = self._dequeuing, None
        if task is None:
            return
        try:
            await task
        except PyMongoError:
            if raise_errors:
                raise

    def _forget(self, group_id: Any) -> None:
        self._queue.pop(group_id, None)
        self._markers.pop(group_id, None)
        self._unscanned.pop(group_id, None)
        self._dequeued[group_id] = None
        while len(self._dequeued) > 10_000:
            self._dequeued.popitem(last=False)

    def _timed(self, step: str, since: float) -> float:
        now = time.perf_counter()
        self.step_seconds[step] = self.step_seconds.get(step, 0.0) + now - since
        return now

    async def _groups(self, query: Doc, limit: int = 0) -> list[Doc]:
        """Queued intent documents, oldest first, with their events decoded."""
        cursor = self.store.pending.find({**INTENTS, **query}).sort("_id", 1).limit(limit)
        return self._decoded(await cursor.to_list())

    # What is read from `pending` and `ledger` is checked before it reaches memory: a document
    # this code could not have written (planted, or edited in place by someone who can write
    # the database) must not stop the log. Each is reported once, by id only.

    def _report(self, what: str, key: object) -> None:
        if len(self._reported) > 10_000:
            self._reported.clear()
        if repr(key) not in self._reported:
            self._reported.add(repr(key))
            log.error("sequence: %s", what)

    def _decoded(self, intents: list[Doc]) -> list[Doc]:
        """The intents with their events decoded, in place. One whose `_id` is not an id is
        left out. One whose events are unreadable (UnreadableIntent) is kept without events,
        marked: the events its commit marker names, if it has or gets one, are taken from
        their ledger copies once it is known (`_fill_unreadable`); an appender's marker may
        still be on its way. One with no time it was queued is timed from now."""
        groups = []
        for g in intents:
            if not isinstance(g.get("_id"), ObjectId):
                self._report(f"an intent with _id {g.get('_id')!r:.60} is ignored", g.get("_id"))
                continue
            try:
                g["events"] = group_events(g)
            except UnreadableIntent as exc:
                self._report(f"{exc}; what its commit marker names comes from the ledger", g["_id"])
                g["events"], g["unreadable"] = [], True
            if not isinstance(g.get("queuedAt"), dt.datetime):
                self._report(f"intent {g['_id']}: no time it was queued; timed from now", g["_id"])
                g["queuedAt"] = _now()
            groups.append(g)
        return groups

    def _valid_markers(self, markers: list[Doc]) -> list[Doc]:
        """The commit markers this code could have written, each with its `events` checked."""
        valid = []
        for m in markers:
            events = marker_events(m)
            if events is None:
                self._report(
                    f"commit marker {m.get('_id')!r:.60} is malformed; ignored", m.get("_id")
                )
            else:
                valid.append({**m, "events": events})
        return valid

    async def _fill_unreadable(self, groups: list[Doc], committed: dict[Any, set[Any]]) -> None:
        """The events of unreadable intents whose marker is now known: their ledger copies,
        each well formed and stored under the `_id` derived from its subject and version;
        those already in the log are done."""
        unreadable = [g for g in groups if g.get("unreadable") and g["_id"] in committed]
        if not unreadable:
            return
        wanted = [e for g in unreadable for e in committed[g["_id"]]]
        copies = await by_ids(self.store.ledger, wanted, dict.fromkeys(_SEQUENCED, 1))
        for g in unreadable:
            g["events"] = [
                copies[e]
                for e in sorted(committed[g["_id"]])
                if e in copies
                and well_formed_event(copies[e])
                and e == event_id(copies[e]["subject"], copies[e]["version"])
            ]
            del g["unreadable"]
        filled = [e["_id"] for g in unreadable for e in g["events"]]
        if filled:
            self._done |= await self._sequenced(filled)

    @staticmethod
    def _in_version_order(
        events: list[Doc], committed: set[Any], unresolved: set[Any]
    ) -> list[Doc]:
        """For each subject, the run of consecutive committed versions from its lowest queued
        one; a gap ends it, and an earlier version whose group is unresolved (no marker yet)
        holds the subject back. Refused events (not in their marker) are ignored."""
        by_subject: dict[str, list[Doc]] = {}
        for e in events:
            if e["_id"] in committed:
                by_subject.setdefault(e["subject"], []).append(e)
        ready: list[Doc] = []
        for subject_events in by_subject.values():
            subject_events.sort(key=lambda e: e["version"])
            expected = subject_events[0]["version"]
            for event in subject_events:
                if event["version"] != expected:
                    break
                ready.append(event)
                expected += 1
        highest: dict[str, int] = {}
        for r in ready:
            highest[r["subject"]] = max(highest.get(r["subject"], 0), r["version"])
        blocked = {
            e["subject"]
            for e in events
            if e["_id"] in unresolved and e["version"] <= highest.get(e["subject"], -1)
        }
        return [e for e in ready if e["subject"] not in blocked]

    async def _complete_orphans(self, orphans: list[Doc]) -> dict[Any, set[Any]]:
        """Groups without a commit marker: their appender is slow, died, or could not write
        the marker. Past the grace period, finish their ledger writes from the intent's copies
        (or find them there) and write the marker. Returns {group id: committed event ids}."""
        now = _now()
        old = [
            g
            for g in orphans
            if (now - g["queuedAt"].replace(tzinfo=dt.UTC)).total_seconds()
            >= self.settings.orphan_grace
        ]
        if not old:
            return {}
        events = [e for g in old for e in g["events"]]
        ids = [e["_id"] for e in events]
        try:
            if events:  # an unreadable intent without a marker has none
                await self.store.ledger.insert_many(events, ordered=False)
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                raise
        # The ledger's event under an orphan's id may be a rival's for the same version, and
        # the rival's group an orphan too: each copy is credited to its own group only.
        stored = await by_ids(self.store.ledger, ids, {"leaf": 1, "attempt": 1})

        def landed(e: Doc) -> bool:
            return e["_id"] in stored and same_append(stored[e["_id"]], e)

        log.warning(
            "sequence: completed %d orphaned appends from their intents",
            sum(landed(e) for e in events),
        )
        result = {}
        for g in old:
            committed = [e["_id"] for e in g["events"] if landed(e)]
            try:
                await self.store.pending.insert_one(commit_marker(g["_id"], committed))
            except DuplicateKeyError:
                # Its appender's marker landed meanwhile (or one planted: a malformed one
                # counts for nothing, and what landed stands).
                marker = await self.store.pending.find_one({"_id": marker_id(g["_id"])})
                named = marker_events(marker) if marker else None
                committed = named if named is not None else committed
            result[g["_id"]] = set(committed)
        return result

    async def _integrate_and_publish(self, entries: list[Doc]) -> None:
        """integrate: extend the right edge and insert new tiles; publish: fenced head update."""
        rng = CompactRange(self._range.size, list(self._range.hashes))
        edge = {level: (index, list(hashes)) for level, (index, hashes) in self._edge.items()}
        touched: set[int] = set()
        full: list[Doc] = []

        def on_node(node: Node, digest: bytes) -> None:
            if node.level % TILE_HEIGHT:
                return
            level = node.level // TILE_HEIGHT
            index = node.index // TILE_WIDTH
            current = edge.get(level)
            if current is None or current[0] != index:
                current = (index, [])
                edge[level] = current
            current[1].append(digest)
            touched.add(level)
            if len(current[1]) == TILE_WIDTH:
                full.append(tile_document(level, index, current[1]))
                del edge[level]
                touched.discard(level)

        for entry in entries:
            rng.append(leaf_hash(bytes(entry["leaf"])), on_node)
        partial = [tile_document(level, *edge[level]) for level in sorted(touched)]
        # Positions alongside the tiles: both are written before the head covers the entries.
        written = await asyncio.gather(
            write_tiles(self.store, full + partial),
            self.store.write_positions(entries),
            return_exceptions=True,
        )
        for outcome in written:
            if isinstance(outcome, BaseException):
                raise outcome
        self.reader.remember(full + partial)
        root = rng.root()
        await self.fenced_update({"size": rng.size, "rootHash": Binary(root)})
        self._range, self._edge, self.size, self.root = rng, edge, rng.size, root
        for callback in self.on_publish:
            callback(self.size, self.root, entries)

    # --- the loop ------------------------------------------------------------------------

    async def run(
        self, stopping: asyncio.Event, after_batch: Callable[[], object] | None = None
    ) -> None:
        """Lead when possible, sequence until `stopping` is set; survive database outages."""
        backoff = 0.1
        while not stopping.is_set():
            try:
                if not self.is_leader:
                    if await self.acquire_lease():
                        self.is_leader = True
                        await self.recover()
                    else:
                        await _wait(stopping, self.settings.lease_ttl / 3)
                        continue
                await self._lead(stopping, after_batch)
                backoff = 0.1
            except LostLease as exc:
                log.warning("sequence: %s", exc)
                self.is_leader = False
            except PyMongoError as exc:
                self.last_error = f"database: {database_error(exc)}"
                log.warning("sequence: %s; retrying in %.1fs", self.last_error, backoff)
                self.is_leader = False
                await _wait(stopping, backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as exc:
                # Never die silently: appends would be acknowledged and never sequenced.
                # Class and stack only: the text of an error may quote an event's data.
                self.last_error = type(exc).__name__
                log.error(
                    "sequence: unexpected error %s; recovering in %.1fs\n%s",
                    self.last_error,
                    backoff,
                    frames(exc),
                )
                self.is_leader = False
                await _wait(stopping, backoff)
                backoff = min(backoff * 2, 5.0)
        await self._settle_dequeue(raise_errors=False)
        if self.is_leader:
            try:
                await self.release_lease()
            except PyMongoError:
                pass

    async def _lead(
        self, stopping: asyncio.Event, after_batch: Callable[[], object] | None
    ) -> None:
        renew_every = self.settings.lease_ttl / 3
        last_renewal = time.monotonic()
        while not stopping.is_set():
            n = await self.sequence_batch(paced=True)
            self.last_error = None
            if after_batch is not None:
                result = after_batch()
                if asyncio.iscoroutine(result):
                    await result
            if n:
                last_renewal = time.monotonic()
                if n < self.settings.batch_size:
                    await asyncio.sleep(self.settings.batch_delay)
                continue
            if time.monotonic() - last_renewal > renew_every:
                await self.fenced_update({})
                last_renewal = time.monotonic()
                # Entries beyond the head with nothing queued: a deposed leader's late write.
                if await self.store.entries.find_one({"_id": self.size}, {"_id": 1}):
                    raise Resync(f"sequence: found entries beyond the published size {self.size}")
            waits = [
                asyncio.ensure_future(self._wakeup.wait()),
                asyncio.ensure_future(stopping.wait()),
            ]
            await asyncio.wait(
                waits, timeout=self.settings.poll_interval, return_when=asyncio.FIRST_COMPLETED
            )
            for w in waits:
                w.cancel()
            self._wakeup.clear()
            await asyncio.sleep(self.settings.batch_delay)


def _entry_tags(event: Doc, cleared: dict[str, tuple[int, list[str]]]) -> Doc:
    """The tags an event's entry carries: its own, less those a later version in the same
    batch clears."""
    tags: Doc = event.get("tags") or {}
    version, names = cleared.get(event["subject"], (0, []))
    if event["version"] < version:
        tags = {k: v for k, v in tags.items() if k not in names}
    return tags


async def _wait(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass
