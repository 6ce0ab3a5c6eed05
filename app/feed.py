"""The process's view of what was sequenced: one shared tail of the log, turned into
prescription events.

The feed listens to the log tail (`anchoring.tail`), so everything the process learns about new
events costs one poll loop, however many readers and subscribers it serves:

- the newest sequenced version of each prescription changed since the process started (reads
  repair a document behind it);
- a bounded window of the most recent events, in leaf order, which subscribers read from.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from anchoring.log import TransparencyLog
from anchoring.tail import Sequenced


@dataclass(frozen=True)
class FeedEvent:
    """A sequenced prescription event, as its leaf states it."""

    leaf_index: int
    leaf: bytes
    event_id: Any
    subject: str
    version: int
    type: str
    at: str


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
        )
    except (ValueError, KeyError, TypeError):
        return None


class PrescriptionFeed:
    def __init__(self, log: TransparencyLog, window: int = 4096, max_subjects: int = 500_000):
        self.log = log
        self.window: deque[FeedEvent] = deque(maxlen=window)
        self._newest: OrderedDict[str, int] = OrderedDict()
        self._max_subjects = max_subjects
        log.tail.listeners.append(self._on_batch)

    def _on_batch(self, batch: list[Sequenced]) -> None:
        for entry in batch:
            event = feed_event(entry)
            if event is None:
                continue
            self.window.append(event)
            if event.version > self._newest.get(event.subject, 0):
                self._newest[event.subject] = event.version
                self._newest.move_to_end(event.subject)
        while len(self._newest) > self._max_subjects:
            self._newest.popitem(last=False)

    def newest_version(self, subject: str) -> int:
        """The newest sequenced version of a prescription, as far as this process has seen
        (0 when it has seen none since it started)."""
        return self._newest.get(subject, 0)
