"""Following the log: one reader of the sequenced entries per process.

The tail polls the published head (one small document) and, when the tree has grown, reads the
new entries in index order and hands each batch to its listeners. Everything in the process that
wants to know what was sequenced (caches, subscriptions) listens here, so the database sees one
poll loop per process however many subscribers there are. Works across processes: it reads what
any leader published. Change streams are not used (FerretDB has none).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from bson import ObjectId
from pymongo.errors import PyMongoError

from anchoring.dialect import by_id_range
from anchoring.errors import database_error, frames
from anchoring.store import Doc, LogStore

log = logging.getLogger("rxledger.tail")


@dataclass(frozen=True)
class Sequenced:
    """An entry of the log: its index, the ledger event it holds and the leaf bytes."""

    index: int
    event_id: ObjectId
    leaf: bytes
    tags: dict[str, str | None]


Listener = Callable[[list["Sequenced"]], None]


def _sequenced(doc: Doc) -> Sequenced:
    return Sequenced(int(doc["_id"]), doc["event"], bytes(doc["leaf"]), doc.get("tags") or {})


class LogTail:
    def __init__(self, store: LogStore, poll_interval: float = 0.1, chunk: int = 1000) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.chunk = chunk
        self.position: int | None = None  # next index to read; None until the first poll
        self.checkpoint_size = -1
        self.listeners: list[Listener] = []
        self.error: str | None = None
        self._changed = asyncio.Event()
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """Poll now."""
        self._wakeup.set()

    def offer(self, entries: list[Doc]) -> None:
        """Entries the in-process sequencer just published: taken as they are when they are
        the next ones, which spares the database a read; otherwise polled for."""
        if entries and self.position == entries[0]["_id"]:
            self._deliver([_sequenced(d) for d in entries])
        else:
            self.wake()

    def _deliver(self, batch: list[Sequenced]) -> None:
        self.position = batch[-1].index + 1
        for listener in self.listeners:
            listener(batch)
        self._notify()

    async def changed(self) -> None:
        """Wait until the next batch or checkpoint."""
        await self._changed.wait()

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def read(self, start: int, end: int) -> list[Sequenced]:
        """Entries [start, end) in index order. Requires end <= the published size."""
        found = [_sequenced(d) for d in await by_id_range(self.store.entries, start, end)]
        if [e.index for e in found] != list(range(start, end)):
            raise PyMongoError(f"entries [{start}, {end}) are incomplete in storage")
        return found

    async def poll(self) -> None:
        """Read what was published since the last poll and tell the listeners."""
        head = await self.store.head()
        size = int(head.get("size", 0))
        if self.position is None:
            self.position = size  # follow from now; older entries are read on demand
        while self.position < size:
            batch = await self.read(self.position, min(size, self.position + self.chunk))
            if batch[0].index != self.position:  # offered meanwhile
                continue
            self._deliver(batch)
        checkpoint = int(head.get("checkpointSize", -1))
        if checkpoint != self.checkpoint_size:
            self.checkpoint_size = checkpoint
            self._notify()

    async def run(self, stopping: asyncio.Event) -> None:
        """Poll until `stopping` is set; database errors are retried, never fatal."""
        while not stopping.is_set():
            try:
                await self.poll()
                self.error = None
            except PyMongoError as exc:
                self.error = database_error(exc)
                log.warning("tail: %s", self.error)
            except Exception as exc:
                log.error("tail: unexpected error %s\n%s", type(exc).__name__, frames(exc))
            self._wakeup.clear()
            waits = [
                asyncio.ensure_future(self._wakeup.wait()),
                asyncio.ensure_future(stopping.wait()),
            ]
            await asyncio.wait(
                waits, timeout=self.poll_interval, return_when=asyncio.FIRST_COMPLETED
            )
            for w in waits:
                w.cancel()
