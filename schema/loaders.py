"""Per-request DataLoaders: every read of a request is batched into a handful of queries,
however many prescriptions, events and proofs the query asks for."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from bson import ObjectId
from strawberry.dataloader import DataLoader

from anchoring.anchorer import SignedCheckpoint
from anchoring.log import TransparencyLog
from anchoring.store import Doc
from app.service import PrescriptionService


@dataclass
class Record:
    """A prescription document with its ledger events, brought up to date."""

    doc: Doc
    events: list[Doc]


class Loaders:
    def __init__(self, service: PrescriptionService, log: TransparencyLog) -> None:
        self.service = service
        self.log = log
        self.records: DataLoader[str, Record | None] = DataLoader(load_fn=self._records)
        self.events: DataLoader[str, list[Doc]] = DataLoader(load_fn=self._events)
        self.indices: DataLoader[ObjectId, int | None] = DataLoader(load_fn=self._indices)
        self._checkpoint: asyncio.Task[SignedCheckpoint | None] | None = None

    async def _events(self, subjects: list[str]) -> list[list[Doc]]:
        found = await self.service.events(subjects)
        return [found[s] for s in subjects]

    async def _records(self, ids: list[str]) -> list[Record | None]:
        docs, events = await asyncio.gather(self.service.documents(ids), self.events.load_many(ids))
        return await self._up_to_date(dict(docs), dict(zip(ids, events, strict=True)), ids)

    async def page(self, docs: list[Doc]) -> list[Record]:
        """Records for documents a listing query returned (their events in one query)."""
        ids = [d["_id"] for d in docs]
        events = await self.events.load_many(ids)
        records = await self._up_to_date(
            {d["_id"]: d for d in docs}, dict(zip(ids, events, strict=True)), ids
        )
        return [r for r in records if r is not None]

    async def _up_to_date(
        self, docs: dict[str, Doc | None], events: dict[str, list[Doc]], ids: list[str]
    ) -> list[Record | None]:
        stale = [
            s
            for s, evs in events.items()
            if evs
            and (
                docs.get(s) is None or evs[-1]["version"] > docs[s]["version"]  # type: ignore[index]
            )
        ]
        if stale:
            await self.service.up_to_date(docs, {s: events[s] for s in stale})
            for s in stale:
                self.forget_events(s)
            fresh = await self.events.load_many(stale)
            events.update(zip(stale, fresh, strict=True))
        out: list[Record | None] = []
        for rid in ids:
            doc = docs.get(rid)
            out.append(None if doc is None else Record(doc, events.get(rid, [])))
        return out

    def forget_events(self, subject: str) -> None:
        """Drop a subject's cached events (after this request appended one)."""
        with contextlib.suppress(KeyError):  # DataLoader.clear raises for keys never loaded
            self.events.clear(subject)

    async def _indices(self, event_ids: list[ObjectId]) -> list[int | None]:
        found = await self.log.leaf_indices(event_ids)
        return [found.get(e) for e in event_ids]

    async def checkpoint(self) -> SignedCheckpoint | None:
        """The latest checkpoint, read once per request."""
        if self._checkpoint is None:
            self._checkpoint = asyncio.ensure_future(self.log.current_checkpoint())
        return await self._checkpoint
