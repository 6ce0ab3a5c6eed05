"""Per-operation DataLoaders: every read of an operation is batched into a handful of queries,
however many prescriptions, events and proofs the query asks for.

A loader caches what it read for as long as it lives, so it lives for one operation: an HTTP
request, or one query, mutation or subscription on a WebSocket. A connection-wide loader would
serve a socket the documents (erased personal data included) and the checkpoint of its first
read for as long as it stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from bson import ObjectId
from strawberry.dataloader import DataLoader
from strawberry.extensions import SchemaExtension

from anchoring.anchorer import SignedCheckpoint
from anchoring.log import TransparencyLog
from anchoring.store import Doc
from app.feed import PrescriptionFeed
from app.service import Examined, PrescriptionService


class Loaders:
    def __init__(
        self, service: PrescriptionService, log: TransparencyLog, feed: PrescriptionFeed
    ) -> None:
        self.service = service
        self.log = log
        self.feed = feed
        self.documents: DataLoader[str, Doc | None] = DataLoader(load_fn=self._documents)
        self.indices: DataLoader[ObjectId, int | None] = DataLoader(load_fn=self._indices)
        self._paths: DataLoader[tuple[int, int], list[bytes]] = DataLoader(load_fn=self._load_paths)
        self.events: DataLoader[str, list[Doc]] = DataLoader(load_fn=self._events)
        self._leaf_hashes: DataLoader[int, bytes | None] = DataLoader(load_fn=self._load_hashes)
        self._checkpoint: asyncio.Task[SignedCheckpoint | None] | None = None
        self._examined: dict[str, asyncio.Future[Examined]] = {}
        # The version of each document examined: how many events to read at once.
        self._versions: dict[str, int] = {}

    async def _documents(self, ids: list[str]) -> list[Doc | None]:
        found: dict[str, Doc | None] = dict(await self.service.documents(ids))
        await self.up_to_date(found, ids)
        return [found.get(i) for i in ids]

    async def up_to_date(self, docs: dict[str, Doc | None], ids: list[str]) -> None:
        """Repair documents behind (or missing for) a version this process saw sequenced."""
        newest = {i: self.feed.newest_version(i) for i in ids}
        stale = {
            i: v
            for i, v in newest.items()
            if v and (docs.get(i) is None or docs[i]["version"] < v)  # type: ignore[index]
        }
        if stale:
            await self.service.up_to_date(docs, stale)

    def forget(self, rid: str) -> None:
        """Drop a cached document and what was read of its events (after this request
        changed it)."""
        with contextlib.suppress(KeyError):  # DataLoader.clear raises for keys never loaded
            self.documents.clear(rid)
        with contextlib.suppress(KeyError):
            self.events.clear(rid)
        self._examined.pop(rid, None)

    async def _events(self, subjects: list[str]) -> list[list[Doc]]:
        found = await self.service.ledger_events(
            subjects, {s: self._versions[s] for s in subjects if s in self._versions}
        )
        return [found.get(s, []) for s in subjects]

    async def examined(self, doc: Doc) -> Examined:
        """A prescription checked against its ledger events and the signed tree, once per
        request however many fields ask (history and integrity share it)."""
        rid = doc["_id"]
        if rid not in self._examined:
            self._examined[rid] = asyncio.ensure_future(self._examine(doc))
        return await self._examined[rid]

    async def _examine(self, doc: Doc) -> Examined:
        if isinstance(doc.get("version"), int):
            self._versions[doc["_id"]] = doc["version"]
        events = await self.events.load(doc["_id"])
        ids = [e["_id"] for e in events]
        found = await self.indices.load_many(ids)
        cp = await self.checkpoint()
        indices = {e: i for e, i in zip(ids, found, strict=True) if i is not None}
        return await self.service.examine(doc, events, indices, cp, self.paths, self.leaf_hashes)

    async def leaf_hashes(self, indices: list[int]) -> dict[int, bytes]:
        """The tree's leaf hashes at sequenced indices: batched across the request."""
        found = await self._leaf_hashes.load_many(indices)
        return {i: h for i, h in zip(indices, found, strict=True) if h is not None}

    async def _load_hashes(self, indices: list[int]) -> list[bytes | None]:
        found = await self.log.leaf_hashes(indices)
        return [found.get(i) for i in indices]

    async def _indices(self, event_ids: list[ObjectId]) -> list[int | None]:
        found = await self.log.leaf_indices(event_ids)
        return [found.get(e) for e in event_ids]

    async def paths(self, indices: list[int], size: int) -> list[list[bytes]]:
        """Audit paths of leaves in the tree of `size`: every proof a request needs is read
        from the tiles together."""
        return list(await self._paths.load_many([(i, size) for i in indices]))

    async def _load_paths(self, keys: list[tuple[int, int]]) -> list[list[bytes]]:
        by_size: dict[int, list[int]] = {}
        for index, size in keys:
            by_size.setdefault(size, []).append(index)
        found: dict[tuple[int, int], list[bytes]] = {}
        for size, indices in by_size.items():
            unique = sorted(set(indices))
            for index, path in zip(
                unique, await self.log.inclusion_paths(unique, size), strict=True
            ):
                found[(index, size)] = path
        return [found[k] for k in keys]

    async def checkpoint(self) -> SignedCheckpoint | None:
        """The latest checkpoint, read once per operation."""
        if self._checkpoint is None:
            self._checkpoint = asyncio.ensure_future(self.log.current_checkpoint())
        return await self._checkpoint


class LoadersPerOperation(SchemaExtension):
    """Gives each operation a context of its own with fresh Loaders, built from the `service`,
    `log` and `feed` of the context the transport made (strawberry makes one per HTTP request
    but only one per WebSocket connection, shared by all its operations)."""

    def on_operation(self) -> Iterator[None]:
        shared = self.execution_context.context
        loaders = Loaders(shared["service"], shared["log"], shared["feed"])
        # A copy, not an update: operations running at once on one socket share `shared`.
        self.execution_context.context = {**shared, "loaders": loaders}
        yield
