"""What the write path asks the database, counted with a command listener on a real server:
the steady state of appending and sequencing must not lean on queries that a server without a
usable index (FerretDB: any filter but an `_id` equality) answers by decoding a whole
collection that grows with the log."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pymongo import AsyncMongoClient, monitoring

from anchoring.encoding import b64
from anchoring.errors import InvalidEvent
from anchoring.ledger import Ledger
from anchoring.store import LogStore


@dataclass
class Commands(monitoring.CommandListener):
    seen: list[tuple[str, str, Any]] = field(default_factory=list)

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        if name in ("find", "delete", "update", "insert", "findAndModify", "count", "aggregate"):
            self.seen.append((name, str(event.command.get(name)), event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def finds(self, collection: str) -> list[Any]:
        return [c.get("filter") for n, coll, c in self.seen if n == "find" and coll == collection]


@pytest.fixture
async def watched(mongo_uri: str) -> AsyncIterator[tuple[LogStore, Commands]]:
    commands = Commands()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_uri, tz_aware=True, event_listeners=[commands]
    )
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield LogStore(client[name], origin="test.rxledger.example/log"), commands
    await client.drop_database(name)
    await client.close()


def header(subject: str, version: int, **extra: object) -> dict[str, object]:
    return {"v": 1, "subject": subject, "version": version, "type": "TEST", **extra}


async def test_an_appender_checks_the_version_it_wrote_itself_without_a_query(
    watched: tuple[LogStore, Commands],
) -> None:
    store, commands = watched
    ledger = Ledger(store)
    first = await ledger.append("rx-own", 1, header("rx-own", 1))
    commands.seen.clear()
    await ledger.append("rx-own", 2, header("rx-own", 2, prev=b64(first.leaf_hash)))
    assert commands.finds("ledger") == []
    with pytest.raises(InvalidEvent, match="is not the leaf hash of version 2"):
        await ledger.append("rx-own", 3, header("rx-own", 3, prev=b64(first.leaf_hash)))
    assert commands.finds("ledger") == []
    await ledger.close()


async def test_another_appender_checks_the_stored_version(
    watched: tuple[LogStore, Commands],
) -> None:
    store, commands = watched
    first = await Ledger(store).append("rx-other", 1, header("rx-other", 1))
    other = Ledger(store)
    commands.seen.clear()
    with pytest.raises(InvalidEvent, match="is not the leaf hash of version 1"):
        await other.append("rx-other", 2, header("rx-other", 2, prev=b64(b"\x00" * 32)))
    assert commands.finds("ledger") == [{"subject": "rx-other", "version": 1}]
    await other.append("rx-other", 2, header("rx-other", 2, prev=b64(first.leaf_hash)))
    await other.close()
