"""The log's MongoDB collections and indexes.

Growing collections are insert-only (ledger, entries, positions, tiles, notarizations): appends and
sequencing never update or delete a document there. An application may remove its own `data`
and `tags` from events and entries, as a legal erasure does; leaves are never touched. Witnesses'
cosignatures are added to a checkpoint's notarization document; its signed note never changes. Only two
small collections change: `pending` (events appended but not yet sequenced, deleted once
sequenced) and `leases` (one document per log holding the sequencer lease and the published
tree head).

The head also names the newest signed checkpoint (`newestCheckpoint`, written before its
notarization is inserted) and the one before it (`priorCheckpoint`), so the newest checkpoint
is two lookups by `_id` rather than a sort of `notarizations`. Reads whose shape depends on
the server go through `anchoring.dialect`.

`positions` maps each sequenced event to its entry, `{_id: event id, index: leaf index}`, so
"the leaf index of event e" is one lookup by `_id` rather than a query on `entries.event` (which
FerretDB answers by decoding every entry). The sequencer writes an entry's position after the
entry (the commit point) and before it publishes the size that covers it. The head's
`positionsFrom` says from which index on every published entry has one (0 for a log sequenced
by this code from its start; the size at its first recovery for an older log): an event without
a position is looked up in `entries` only below it. A position is an index, not evidence:
whoever uses one compares the leaf at that index with the event's own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from anchoring.dialect import Doc, by_ids, one_of, update_by_ids

__all__ = ["CollectionNames", "Doc", "LogStore", "one_of"]

log = logging.getLogger("rxledger.store")

DUPLICATE_KEY = 11000


@dataclass(frozen=True)
class Index:
    """An index a collection needs: its keys in order (1 ascending, -1 descending), its name,
    and the reads or the rule it serves."""

    keys: tuple[tuple[str, int], ...]
    name: str
    serves: str
    unique: bool = False


async def create_indexes(collection: AsyncCollection[Doc], indexes: tuple[Index, ...]) -> None:
    """Create `indexes` on `collection` (idempotent: an existing identical index is kept)."""
    for index in indexes:
        await collection.create_index(list(index.keys), name=index.name, unique=index.unique)


# Every index the log's collections need, by collection (a CollectionNames field); `_id` is
# always indexed. Created by LogStore.ensure_indexes; the test run checks every read the
# product sends against this table (tests/notablescan.py), as MongoDB's `notablescan` would.
LOG_INDEXES: dict[str, tuple[Index, ...]] = {
    "ledger": (
        Index(
            (("subject", ASCENDING), ("version", ASCENDING)),
            "subject_version",
            # Optimistic concurrency: a second event for the same (subject, version) is refused.
            "a subject's events in version order, its newest event; unique: one event per version",
            unique=True,
        ),
    ),
    "pending": (
        Index(
            (("committed", ASCENDING), ("_id", ASCENDING)),
            "committed_id",
            "queued groups in queue order (no `committed`), and the commit markers",
        ),
    ),
    "entries": (
        Index(
            (("event", ASCENDING),),
            "event",
            # No event is ever sequenced twice, even by two processes that both think they lead.
            "an event's leaf index; unique: no event is sequenced twice",
            unique=True,
        ),
    ),
}


@dataclass(frozen=True)
class CollectionNames:
    ledger: str = "ledger"
    pending: str = "pending"
    entries: str = "entries"
    positions: str = "positions"
    tiles: str = "tiles"
    leases: str = "leases"
    notarizations: str = "notarizations"


def log_indexes(names: CollectionNames) -> dict[str, tuple[Index, ...]]:
    """LOG_INDEXES by collection name."""
    return {getattr(names, role): indexes for role, indexes in LOG_INDEXES.items()}


@dataclass
class LogStore:
    """Where one log lives: its database, the notarization database and collection names."""

    db: AsyncDatabase[Doc]
    origin: str
    notary_db: AsyncDatabase[Doc] | None = None
    names: CollectionNames = field(default_factory=CollectionNames)

    @property
    def ledger(self) -> AsyncCollection[Doc]:
        return self.db[self.names.ledger]

    @property
    def pending(self) -> AsyncCollection[Doc]:
        return self.db[self.names.pending]

    @property
    def entries(self) -> AsyncCollection[Doc]:
        return self.db[self.names.entries]

    @property
    def positions(self) -> AsyncCollection[Doc]:
        return self.db[self.names.positions]

    @property
    def tiles(self) -> AsyncCollection[Doc]:
        return self.db[self.names.tiles]

    @property
    def leases(self) -> AsyncCollection[Doc]:
        return self.db[self.names.leases]

    @property
    def notarizations(self) -> AsyncCollection[Doc]:
        return (self.notary_db if self.notary_db is not None else self.db)[self.names.notarizations]

    async def ensure_indexes(self) -> None:
        for role, indexes in LOG_INDEXES.items():
            await create_indexes(getattr(self, role), indexes)

    async def head(self) -> Doc:
        """The lease/head document: {size, rootHash, checkpointSize, holder, expiresAt}."""
        doc = await self.leases.find_one({"_id": self.origin})
        return doc or {}

    async def newest_notarization(self) -> Doc | None:
        """The newest signed checkpoint's notarization document (None before the first). The
        head names it before it is inserted, and the one before it: after a crash between the
        two, the one before is the newest. A log whose head names none (signed before the head
        did) is read by size, newest first."""
        head = await self.head()
        named = [
            head[k] for k in ("newestCheckpoint", "priorCheckpoint") if head.get(k) is not None
        ]
        found = await by_ids(self.notarizations, named)
        for size in named:
            if size in found:
                return found[size]
        if "newestCheckpoint" in head and head.get("priorCheckpoint") is None:
            return None  # the first checkpoint was about to be signed
        newest = await self.notarizations.find({}).sort("_id", -1).limit(1).to_list()
        return newest[0] if newest else None

    async def write_positions(self, entries: list[Doc]) -> None:
        """Insert the position of each of `entries` (stored already). A position stored before
        (a batch integrated again after a crash) is fine when it names the same index; one
        naming another index was edited: logged as an error, left for the audit."""
        if not entries:
            return
        docs = [{"_id": e["event"], "index": int(e["_id"])} for e in entries]
        try:
            await self.positions.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors") or []
            if exc.details.get("writeConcernErrors") or any(
                e.get("code") != DUPLICATE_KEY for e in errors
            ):
                raise
            wanted = {docs[e["index"]]["_id"]: docs[e["index"]]["index"] for e in errors}
            stored = await by_ids(self.positions, wanted)
            for event, index in wanted.items():
                found = stored.get(event, {}).get("index")
                if found != index:
                    log.error(
                        "positions: event %s is entry %d, its stored position says %s: "
                        "the positions were edited (run rxledger audit)",
                        event,
                        index,
                        found,
                    )

    async def entry_indices(self, event_ids: Iterable[Any], head: Doc) -> dict[Any, int]:
        """The index of the entry of each of `event_ids` that is sequenced, published or not
        (unsequenced ones are left out), from their positions; events without one are looked
        up in `entries` (one query) when the log has entries without positions below `head`'s
        `positionsFrom`. Not evidence: compare the leaf at the index with the event's."""
        wanted = list(dict.fromkeys(event_ids))
        found = {
            event: int(doc["index"])
            for event, doc in (await by_ids(self.positions, wanted, {"index": 1})).items()
        }
        missing = [e for e in wanted if e not in found]
        complete_from = head.get("positionsFrom")
        if missing and complete_from != 0:
            query = one_of("event", missing)
            if complete_from is not None:
                query["_id"] = {"$lt": int(complete_from)}
            async for doc in self.entries.find(query, {"event": 1}):
                found[doc["event"]] = int(doc["_id"])
        return found

    async def untag_entries(self, event_ids: list[Any], names: Iterable[str]) -> None:
        """Take tags `names` off the entries of `event_ids` found by `entry_indices`: every
        published one. An entry still being integrated may be missed; an erasure reaches it
        when its own event is sequenced (the sequencer's clear-tags step runs then)."""
        if not event_ids:
            return
        indices = await self.entry_indices(event_ids, await self.head())
        unset = {"$unset": {f"tags.{n}": "" for n in names}}
        await update_by_ids(self.entries, sorted(indices.values()), unset)
