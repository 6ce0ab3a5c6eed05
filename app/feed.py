"""The process's view of what was sequenced: one shared tail of the log, turned into
prescription events for readers and subscribers.

The feed listens to the log tail (`anchoring.tail`), so everything the process learns about new
events costs one poll loop, however many readers and subscribers it serves:

- the newest sequenced version of each prescription changed since the process started (reads
  repair a document behind it);
- a window of the most recent events, in leaf order, that every subscriber reads from. A
  subscriber holds no buffer of its own, only its position, so a thousand of them cost a
  thousand positions. One that falls further behind than the window (it stopped reading, or
  reads slower than events arrive) is cut off with a reason that says where to resume; a
  subscriber resuming from an older position reads its backlog from the database first.

Subscribers whose payloads are the same for every event share their visibility class
(`visibility_class`): the GraphQL layer executes a selection once per class, not once per
subscriber (schema/subscriptions.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from anchoring.log import TransparencyLog
from anchoring.tail import Sequenced
from app.auth import Viewer
from app.policy import Tags, check_patient_filter, check_sees_any, visibility_filter

log = logging.getLogger("rxledger.feed")


@dataclass(frozen=True)
class FeedEvent:
    """A sequenced prescription event: what its leaf states, and its routing tags."""

    leaf_index: int
    leaf: bytes
    event_id: Any
    subject: str
    version: int
    type: str
    at: str
    tags: dict[str, str | None]


def feed_event(entry: Sequenced) -> FeedEvent | None:
    """The event a leaf records, or None for a leaf that is not a prescription event."""
    try:
        header = json.loads(entry.leaf)
        return FeedEvent(
            entry.index,
            entry.leaf,
            entry.event_id,
            str(header["subject"]),
            int(header["version"]),
            str(header["type"]),
            str(header["at"]),
            entry.tags,
        )
    except (ValueError, KeyError, TypeError):
        return None


class StreamEnded(Exception):
    """A subscription ends for a reason the subscriber should see (and act on)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(eq=False)
class Subscriber:
    position: int
    cut: Callable[[str], None] | None = None  # how to disconnect it when it stalls
    ended: str | None = None
    live: bool = False  # reading from the window (not a backlog from the database)


class PrescriptionFeed:
    def __init__(
        self, log_: TransparencyLog, window: int = 4096, max_subjects: int = 500_000
    ) -> None:
        self.log = log_
        self.tail = log_.tail
        # The window: a ring holding leaves [_start, _end); None for a leaf that is not a
        # prescription event.
        self.window_size = window
        self._ring: list[FeedEvent | None] = [None] * window
        self._start = self._end = 0
        self.subscribers: set[Subscriber] = set()
        self._newest: OrderedDict[str, int] = OrderedDict()
        self._max_subjects = max_subjects
        self.tail.listeners.append(self._on_batch)

    # --- what the tail tells us ---------------------------------------------------------

    def _on_batch(self, batch: list[Sequenced]) -> None:
        previous_end = self._end
        for entry in batch:
            event = feed_event(entry)
            if self._end != entry.index:  # the first batch, or after a gap: start afresh
                self._start = self._end = entry.index
            self._ring[self._end % self.window_size] = event
            self._end += 1
            self._start = max(self._start, self._end - self.window_size)
            if event is None:
                continue
            if event.version > self._newest.get(event.subject, 0):
                self._newest[event.subject] = event.version
                self._newest.move_to_end(event.subject)
        while len(self._newest) > self._max_subjects:
            self._newest.popitem(last=False)
        self._cut_stalled(previous_end)

    def newest_version(self, subject: str) -> int:
        """The newest sequenced version of a prescription, as far as this process has seen
        (0 when it has seen none since it started)."""
        return self._newest.get(subject, 0)

    @property
    def window_start(self) -> int:
        """The oldest leaf index the window holds (the tail position when empty)."""
        if self._end == self._start:
            return self.tail.position or 0
        return self._start

    def _window(self, start: int) -> list[FeedEvent | None]:
        """The window's leaves from index `start` (>= window_start) to its end."""
        return [self._ring[i % self.window_size] for i in range(start, self._end)]

    def _cut_stalled(self, previous_end: int) -> None:
        """Cut off the subscribers the window has left behind while they still had events to
        read. One that had read everything before this batch is not slow, only this batch is
        large (a follower catching up): it reads what it missed from the database."""
        start = self.window_start
        for sub in list(self.subscribers):
            if sub.live and sub.position < min(start, previous_end) and sub.ended is None:
                sub.ended = (
                    f"subscriber too slow: more than {self.window_size} events behind; "
                    f"resume with afterLeafIndex={sub.position - 1} "
                    "(or your last leafIndex, if later)"
                )
                log.warning("feed: cutting off a subscriber at %d: %s", sub.position, sub.ended)
                if sub.cut is not None:
                    sub.cut(sub.ended)

    # --- subscribers ----------------------------------------------------------------------

    async def start_position(self) -> int:
        """Where a subscriber that asks for nothing older starts: the next leaf."""
        if self.tail.position is None:
            await self.tail.poll()
        return self.tail.position or 0

    async def backlog(self, start: int, end: int) -> list[FeedEvent]:
        """Events [start, end) read from the database (for subscribers resuming from before
        the window)."""
        entries = await self.tail.read(start, end)
        return [e for e in map(feed_event, entries) if e is not None]

    async def stream(
        self,
        start: int,
        expires_at: float | None = None,
        cut: Callable[[str], None] | None = None,
        match: Callable[[FeedEvent], bool] | None = None,
        chunk: int = 500,
    ) -> AsyncGenerator[FeedEvent, None]:
        """Every event from leaf index `start` on, in order, without gaps or repeats, until
        the subscriber stalls or its token expires (StreamEnded says which)."""
        sub = Subscriber(position=start, cut=cut)
        self.subscribers.add(sub)
        try:
            while True:
                if sub.ended is not None:
                    raise StreamEnded(sub.ended, "SUBSCRIBER_TOO_SLOW")
                if expires_at is not None and time.time() >= expires_at:
                    raise StreamEnded(
                        "token expired; reconnect with a fresh token and "
                        f"afterLeafIndex={sub.position - 1} (or your last leafIndex, if later)",
                        "TOKEN_EXPIRED",
                    )
                if sub.position < self.window_start:
                    # Resuming from before the window: read the backlog from the database.
                    # Not "live" meanwhile: only a subscriber reading the window can lag it.
                    sub.live = False
                    stop = min(self.window_start, sub.position + chunk)
                    backlog = await self.backlog(sub.position, stop)
                    pending: list[tuple[int, FeedEvent | None]] = [
                        (e.leaf_index, e) for e in backlog
                    ]
                else:
                    sub.live = True
                    stop = self._end
                    if sub.position >= stop:
                        await self._wait(expires_at)
                        continue
                    pending = list(
                        zip(range(sub.position, stop), self._window(sub.position), strict=True)
                    )
                for index, event in pending:
                    if event is not None and (match is None or match(event)):
                        yield event
                    sub.position = index + 1
                    if sub.ended is not None:
                        break
                else:
                    sub.position = max(sub.position, stop)
        finally:
            self.subscribers.discard(sub)

    async def _wait(self, expires_at: float | None) -> None:
        timeout = None if expires_at is None else max(0.0, expires_at - time.time())
        try:
            await asyncio.wait_for(self.tail.changed(), timeout)
        except TimeoutError:
            pass

    async def checkpoints(
        self, known_size: int, expires_at: float | None = None
    ) -> AsyncIterator[int]:
        """Each checkpoint size newer than `known_size`, as the log anchors it."""
        while True:
            size = self.tail.checkpoint_size
            if size > known_size:
                known_size = size
                yield size
                continue
            if expires_at is not None and time.time() >= expires_at:
                raise StreamEnded("token expired; reconnect with a fresh token", "TOKEN_EXPIRED")
            await self._wait(expires_at)


def visibility_class(viewer: Viewer) -> str:
    """The viewers that are sent the same payload for every event share a class: the same role
    (which fields of a prescription it reads) and the same prescriptions seen (its visibility
    filter, from the policy table). Two pharmacists of one pharmacy share a class; a courier of
    company A and one of company B, or a pharmacist and an auditor, do not."""
    return json.dumps(
        [viewer.role.value, visibility_filter(viewer)], sort_keys=True, separators=(",", ":")
    )


def event_filter(
    tags: Tags,
    viewer: Viewer,
    *,
    prescription_id: str | None = None,
    patient_id: str | None = None,
    pharmacy: str | None = None,
    organization: str | None = None,
    statuses: list[str] | None = None,
) -> Callable[[FeedEvent], bool]:
    """Which events a subscriber receives: those its token may read, narrowed by its filter.
    Raises policy.NotAllowed for a viewer that may read none, or a filter it may not use."""
    check_sees_any(viewer)
    if patient_id is not None:
        check_patient_filter(viewer)
    patient = None if patient_id is None else tags.patient(patient_id)
    wanted = None if not statuses else set(statuses)

    def match(event: FeedEvent) -> bool:
        t = event.tags
        if prescription_id is not None and event.subject != prescription_id:
            return False
        if patient is not None and t.get("patient") != patient:
            return False
        if pharmacy is not None and t.get("pharmacy") != pharmacy:
            return False
        if organization is not None and organization not in (
            t.get("pharmacy"),
            t.get("courierOrganization"),
        ):
            return False
        if wanted is not None and t.get("status") not in wanted:
            return False
        return tags.can_see(viewer, t)

    return match
