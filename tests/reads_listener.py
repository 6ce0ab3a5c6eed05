"""A command listener recording the reads a client sends, for tests that prove which shapes of
query a code path uses (by `_id` only, on FerretDB: the shapes its patched `_id` index serves)."""

from __future__ import annotations

from typing import Any

from pymongo import monitoring

from anchoring.dialect import IN_BATCH

READS = ("find", "aggregate", "count", "distinct")


class Reads(monitoring.CommandListener):
    """The collection and filter of every read command a client sends."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in READS:
            command = event.command
            filter = command.get("filter", command.get("query"))
            self.reads.append((str(command[event.command_name]), filter))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def of(self, collection: str) -> list[Any]:
        """The filters of the reads of `collection`."""
        return [f for c, f in self.reads if c == collection]

    def not_id_lookups(self) -> list[tuple[str, Any]]:
        """The reads whose filter is anything but {"_id": <one value>} or {"_id": {"$in":
        [at most IN_BATCH values]}}: the shapes the patched FerretDB serves from its index."""
        return [(coll, f) for coll, f in self.reads if not id_lookup(f)]


def id_lookup(f: Any) -> bool:
    """Whether a filter is an `_id` equality or an `_id` `$in` of at most IN_BATCH values."""
    if not (isinstance(f, dict) and list(f) == ["_id"]):
        return False
    value = f["_id"]
    if not isinstance(value, dict):
        return True
    return list(value) == ["$in"] and len(value["$in"]) <= IN_BATCH
