"""Appending events: the write side of the log.

An append writes, in this order: the event as a `pending` intent (the sequencer's queue, with
the full event), the `ledger` document (the truth, unique on (subject, version)), and a
`pending` commit marker saying the ledger copy exists. It is acknowledged only when all three
are durable. The marker lets the sequencer work from the small `pending` collection alone;
an intent without a marker (an appender that died or is slow) is checked against the ledger
after a grace period and completed from its copy. Concurrent appends in one process are group-committed:
one insert_many per collection for everything queued while the previous batch was written.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from bson import Binary, ObjectId
from pymongo.errors import BulkWriteError, PyMongoError

from anchoring.encoding import EncodingError, canonical_json
from anchoring.errors import InvalidEvent, LedgerUnavailable, VersionConflict
from anchoring.hashing import leaf_hash
from anchoring.store import Doc, LogStore

log = logging.getLogger("rxledger.ledger")

DUPLICATE_KEY = 11000
MAX_SUBJECT_LENGTH = 256
MAX_LEAF_BYTES = 64 * 1024


@dataclass(frozen=True)
class Appended:
    """An acknowledged append: the event's id and its leaf bytes and hash."""

    event_id: ObjectId
    subject: str
    version: int
    leaf: bytes
    leaf_hash: bytes


def _check_keys(value: Any, path: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not key or key.startswith("$") or "." in key:
                raise InvalidEvent(
                    f"header key {path}{key!r} must be a non-empty string without '.' or a leading '$'"
                )
            _check_keys(item, f"{path}{key}.")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_keys(item, f"{path}{i}.")
    elif isinstance(value, int) and not isinstance(value, bool) and not -(2**53) <= value <= 2**53:
        raise InvalidEvent(
            f"header value at {path.rstrip('.')} is outside the exact JSON integer range"
        )


def commit_marker(event_id: ObjectId) -> Doc:
    """The `pending` document that says the ledger copy of `event_id` is written."""
    return {"_id": marker_id(event_id), "committed": event_id}


def marker_id(event_id: ObjectId) -> str:
    return f"{event_id}.c"


def make_event(subject: Any, version: Any, header: Any) -> tuple[Doc, Appended]:
    """Validate an event and build its ledger document. Raises InvalidEvent."""
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
    event_id = ObjectId()
    doc = {
        "_id": event_id,
        "subject": subject,
        "version": version,
        "header": header,
        "leaf": Binary(leaf),
        "appendedAt": dt.datetime.now(dt.UTC),
    }
    return doc, Appended(event_id, subject, version, leaf, leaf_hash(leaf))


class Ledger:
    """Group-committing appender. `append` returns once the event is durably stored."""

    def __init__(self, store: LogStore, *, max_batch: int = 1000) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: list[tuple[Doc, Appended, asyncio.Future[Appended]]] = []
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self.listeners: list[Any] = []  # callables notified (no args) after each durable batch

    async def append(self, subject: str, version: int, header: dict[str, Any]) -> Appended:
        doc, appended = make_event(subject, version, header)
        future: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._queue.append((doc, appended, future))
        self._wakeup.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_forever(), name="ledger-flusher")
        return await future

    async def close(self) -> None:
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

    async def _flush_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                await self._write(batch)
                for listener in self.listeners:
                    listener()

    async def _write(self, batch: list[tuple[Doc, Appended, asyncio.Future[Appended]]]) -> None:
        now = dt.datetime.now(dt.UTC)
        pending_docs = [{**doc, "queuedAt": now} for doc, _, _ in batch]
        try:
            await self.store.pending.insert_many(pending_docs, ordered=False)
        except PyMongoError as exc:
            # Nothing is in the ledger yet; any pending document written is completed or
            # discarded by the sequencer, so the caller may retry.
            self._fail_all(batch, exc)
            return
        failed: dict[int, Doc] = {}
        try:
            await self.store.ledger.insert_many([doc for doc, _, _ in batch], ordered=False)
        except BulkWriteError as exc:
            failed = {err["index"]: err for err in exc.details.get("writeErrors", [])}
        except PyMongoError as exc:
            self._fail_all(batch, exc)
            return
        written, conflicts = [], []
        for i, (doc, appended, future) in enumerate(batch):
            err = failed.get(i)
            if err is None:
                written.append((doc, appended, future))
            elif err.get("code") == DUPLICATE_KEY:
                conflicts.append((doc, appended, future))
            else:
                future.set_exception(
                    LedgerUnavailable(f"the database refused the event: {err.get('errmsg')}")
                )
        if conflicts:
            await self._settle_conflicts(conflicts)
        if not written:
            return
        try:
            await self.store.pending.insert_many(
                [commit_marker(doc["_id"]) for doc, _, _ in written], ordered=False
            )
        except PyMongoError as exc:
            # The event is in the ledger; the sequencer finds it after the grace period.
            self._fail_all(written, exc)
            return
        for _, appended, future in written:
            future.set_result(appended)

    async def _settle_conflicts(
        self, conflicts: list[tuple[Doc, Appended, asyncio.Future[Appended]]]
    ) -> None:
        """A duplicate key is either (subject, version) taken by another event, or our own
        event already completed by the sequencer from its pending copy (it needs no marker)."""
        ids = [doc["_id"] for doc, _, _ in conflicts]
        try:
            present = {
                d["_id"] async for d in self.store.ledger.find({"_id": {"$in": ids}}, {"_id": 1})
            }
            losers = [doc["_id"] for doc, _, _ in conflicts if doc["_id"] not in present]
            if losers:
                await self.store.pending.delete_many({"_id": {"$in": losers}})
        except PyMongoError as exc:
            self._fail_all(conflicts, exc)
            return
        for doc, appended, future in conflicts:
            if doc["_id"] in present:
                future.set_result(appended)
            else:
                future.set_exception(VersionConflict(appended.subject, appended.version))

    @staticmethod
    def _fail_all(
        batch: list[tuple[Doc, Appended, asyncio.Future[Appended]]], exc: Exception
    ) -> None:
        log.warning("append failed: %s", exc)
        error = LedgerUnavailable(
            f"database unavailable ({type(exc).__name__}); the event was not acknowledged: "
            "retry the same (subject, version) later, a conflict then means it was stored"
        )
        for _, _, future in batch:
            if not future.done():
                future.set_exception(error)
