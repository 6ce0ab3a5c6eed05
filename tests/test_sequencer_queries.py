"""What the write path asks the database, counted with a command listener on a real server:
the steady state of appending and sequencing must not lean on queries that a server without a
usable index (FerretDB: any filter but an `_id` equality or `$in`) answers by decoding a whole
collection that grows with the log."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from bson import Binary
from pymongo import AsyncMongoClient, monitoring

from anchoring.anchorer import AnchorSettings
from anchoring.dialect import ENV_DIALECT, IN_BATCH, Dialect, detect
from anchoring.encoding import b64
from anchoring.errors import InvalidEvent
from anchoring.ledger import INTENTS, Ledger, event_id
from anchoring.log import LogSettings, TransparencyLog
from anchoring.note import Signer
from anchoring.sequencer import Resync, Sequencer, SequencerSettings
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


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        await asyncio.sleep(0.01)


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
    writer = Ledger(store)
    first = await writer.append("rx-other", 1, header("rx-other", 1))
    await writer.close()
    other = Ledger(store)
    commands.seen.clear()
    with pytest.raises(InvalidEvent, match="is not the leaf hash of version 1"):
        await other.append("rx-other", 2, header("rx-other", 2, prev=b64(b"\x00" * 32)))
    # The stored version 1, read by its derived `_id` on FerretDB, by (subject, version) on
    # MongoDB (the unique index serves it).
    expected = (
        {"_id": event_id("rx-other", 1)}
        if await detect(store.ledger) is Dialect.FERRETDB
        else {"subject": "rx-other", "version": 1}
    )
    assert commands.finds("ledger") == [expected]
    await other.append("rx-other", 2, header("rx-other", 2, prev=b64(first.leaf_hash)))
    await other.close()


# Reads of `pending` spaced far apart, so that only what the sequencer must read is read.
RARE = LogSettings(
    sequencer=SequencerSettings(poll_interval=30.0, scan_interval=30.0, lease_ttl=30.0),
    anchor=AnchorSettings(interval=0.1, max_leaves=50),
)


async def test_sequencing_what_this_process_appends_reads_no_queue_back(
    watched: tuple[LogStore, Commands], signer: Signer
) -> None:
    store, commands = watched
    tlog = TransparencyLog(store, signer, RARE)
    await tlog.start()
    try:
        await wait_for(lambda: tlog.sequencer.epoch > 0, "the lease and recovery")
        commands.seen.clear()
        batches = tlog.sequencer.batches
        for v in range(1, 21):
            appended = await asyncio.gather(
                *(tlog.append(f"rx-{k}", v, header(f"rx-{k}", v)) for k in range(4))
            )
            await tlog.wait_sequenced(appended[-1].event_id)
        assert tlog.sequencer.batches - batches >= 20
        assert commands.finds("pending") == []
        await wait_for(
            lambda: tlog.sequencer._dequeuing is None or tlog.sequencer._dequeuing.done(),
            "the dequeue",
        )
        deletes = [
            d["q"]
            for n, coll, c in commands.seen
            if n == "delete" and coll == "pending"
            for d in c["deletes"]
        ]
        # By `_id` (an equality or an `$in` within what the patched FerretDB serves from its
        # index), never by another field, which would decode the whole queue.
        assert deletes and all(
            set(q) == {"_id"}
            and (
                not isinstance(q["_id"], dict)
                or (set(q["_id"]) == {"$in"} and len(q["_id"]["$in"]) <= IN_BATCH)
            )
            for q in deletes
        )
    finally:
        await tlog.stop()


async def test_a_version_queued_by_another_process_enters_the_log_before_the_next_one(
    watched: tuple[LogStore, Commands], signer: Signer
) -> None:
    """The next version handed over in this process extends one another process queued,
    which this leader has not read yet: it must wait for a read of the queue, not go first."""
    store, _ = watched
    tlog = TransparencyLog(store, signer, RARE)
    other = Ledger(store)
    await tlog.start()
    try:
        await wait_for(lambda: tlog.sequencer.epoch > 0, "the lease and recovery")
        first = await other.append("rx-mixed", 1, header("rx-mixed", 1))
        second = await tlog.append("rx-mixed", 2, header("rx-mixed", 2))
        await tlog.wait_sequenced(second.event_id)
        entries = await store.entries.find({}).sort("_id", 1).to_list()
        assert [e["event"] for e in entries] == [first.event_id, second.event_id]
    finally:
        await other.close()
        await tlog.stop()


async def test_recovery_finds_which_queued_events_are_sequenced_by_id(
    watched: tuple[LogStore, Commands], signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Recovery runs at every start and every change of leader; on FerretDB a read of `entries`
    # by event decodes the whole log.
    monkeypatch.setenv(ENV_DIALECT, Dialect.FERRETDB.value)
    store, commands = watched
    tlog = TransparencyLog(store, signer, RARE)
    await tlog.start()
    try:
        appended = [await tlog.append(f"rx-{k}", 1, header(f"rx-{k}", 1)) for k in range(5)]
        # Each one: events of different prescriptions may enter the log in any order.
        for a in appended:
            await tlog.wait_sequenced(a.event_id)
    finally:
        await tlog.stop()
    queued = Ledger(store)  # appends with no sequencer running: they stay queued
    waiting = [await queued.append(f"rx-q{k}", 1, header(f"rx-q{k}", 1)) for k in range(3)]
    await queued.close()

    sequencer = Sequencer(store)
    assert await sequencer.acquire_lease()
    commands.seen.clear()
    await sequencer.recover()
    entry_reads = commands.finds("entries")
    assert all(set(f) == {"_id"} for f in entry_reads), entry_reads
    assert sequencer.size == 5
    assert sequencer._done == set()
    assert {e["_id"] for g in sequencer._queue.values() for e in g["events"]} == {
        w.event_id for w in waiting
    }
    await sequencer.release_lease()


class MarkerAfterGate:
    """`pending`, but a commit marker is written only once `gate` is set."""

    def __init__(self, pending: Any, gate: asyncio.Event) -> None:
        self.pending, self.gate = pending, gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pending, name)

    async def insert_one(self, doc: Any, *args: Any, **kwargs: Any) -> Any:
        if "committed" in doc:
            await self.gate.wait()
        return await self.pending.insert_one(doc, *args, **kwargs)


class GatedStore(LogStore):
    """The store an appender writes through, held between its intent and its marker."""

    def __init__(self, *args: Any, gate: asyncio.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate

    @property
    def pending(self) -> Any:
        return MarkerAfterGate(super().pending, self.gate)


async def test_a_group_recovery_read_before_its_marker_is_sequenced_when_handed_over(
    watched: tuple[LogStore, Commands],
) -> None:
    """Recovery reads `pending` while an appender of this process sits between its intent and
    its marker: the group is known, its marker not. The hand-over that follows the marker
    must complete it; otherwise the group waits as an orphan for the next read of `pending`."""
    store, _ = watched
    gate = asyncio.Event()
    sequencer = Sequencer(store, RARE.sequencer)
    ledger = Ledger(GatedStore(store.db, origin=store.origin, gate=gate))
    ledger.handoffs.append(sequencer.offer)
    appending = asyncio.create_task(ledger.append("rx-gap", 1, header("rx-gap", 1)))
    try:
        while await store.pending.count_documents({}) == 0:  # the intent, not its marker
            await asyncio.sleep(0.01)
        assert await sequencer.acquire_lease()
        sequencer.is_leader = True  # as the leader's loop sets it before recovering
        await sequencer.recover()
        assert len(sequencer._queue) == 1 and sequencer._markers == {}
        gate.set()
        appended = await appending
        # Paced, as the leader's loop runs it: no read of `pending` due for 30 s.
        assert await sequencer.sequence_batch(paced=True) == 1
        assert await store.entries.find_one({"event": appended.event_id}) is not None
    finally:
        gate.set()
        await ledger.close()
        await sequencer.release_lease()


async def test_an_acknowledged_group_whose_intent_is_overwritten_before_its_marker_is_sequenced(
    watched: tuple[LogStore, Commands],
) -> None:
    """The intent is overwritten while its appender sits before its marker; recovery then
    reads an unreadable intent with no marker. Its marker, once written, names an
    acknowledged event that must still enter the log, from its ledger copy."""
    store, _ = watched
    sequencer = Sequencer(store, RARE.sequencer)
    gate = asyncio.Event()
    ledger = Ledger(GatedStore(store.db, origin=store.origin, gate=gate))
    ledger.handoffs.append(sequencer.offer)
    appending = asyncio.create_task(ledger.append("rx-edited", 1, header("rx-edited", 1)))
    try:
        while await store.ledger.find_one({"_id": event_id("rx-edited", 1)}) is None:
            await asyncio.sleep(0.01)  # intent and ledger copy durable; the marker waits
        await store.pending.update_many(INTENTS, {"$set": {"events": Binary(b"garbage")}})
        assert await sequencer.acquire_lease()
        sequencer.is_leader = True  # as the leader's loop sets it before recovering
        await sequencer.recover()
        gate.set()
        appended = await appending  # acknowledged
        assert await sequencer.sequence_batch(paced=True) == 1
        assert await store.entries.find_one({"event": appended.event_id}) is not None
    finally:
        gate.set()
        await ledger.close()
        await sequencer.release_lease()


async def _published_but_still_queued(
    store: LogStore, signer: Signer
) -> tuple[list[Any], list[Any]]:
    """A log of 5 published events whose groups are put back into `pending` (a crash between
    publishing and dequeuing), and 2 events queued but never sequenced. Returns both lists of
    event ids."""
    early = Ledger(store)  # queued with no sequencer running: copy the queue as it is
    published = [await early.append(f"rx-p{k}", 1, header(f"rx-p{k}", 1)) for k in range(5)]
    await early.close()
    queue = [d async for d in store.pending.find({})]
    tlog = TransparencyLog(store, signer, RARE)
    await tlog.start()
    try:
        await tlog.wait_sequenced(published[-1].event_id)
        await wait_for(lambda: len(tlog.sequencer._queue) == 0, "the groups to leave")
        await wait_for(
            lambda: tlog.sequencer._dequeuing is None or tlog.sequencer._dequeuing.done(),
            "the dequeue",
        )
    finally:
        await tlog.stop()
    assert await store.pending.count_documents({}) == 0
    await store.pending.insert_many(queue)  # intents and markers, as before the dequeue
    late = Ledger(store)
    waiting = [await late.append(f"rx-w{k}", 1, header(f"rx-w{k}", 1)) for k in range(2)]
    await late.close()
    return [p.event_id for p in published], [w.event_id for w in waiting]


async def test_recovery_knows_a_published_event_still_queued_and_never_sequences_it_twice(
    watched: tuple[LogStore, Commands], signer: Signer
) -> None:
    store, _ = watched
    published, waiting = await _published_but_still_queued(store, signer)
    sequencer = Sequencer(store)
    assert await sequencer.acquire_lease()
    try:
        await sequencer.recover()
        assert sequencer._done == set(published)
        assert await sequencer.sequence_batch() == 2  # only the two never sequenced
        assert sequencer.size == 7
    finally:
        await sequencer.release_lease()


async def test_recovery_is_not_fooled_by_edited_positions(
    watched: tuple[LogStore, Commands], signer: Signer
) -> None:
    # Positions are not evidence: one deleted must not make the sequencer loop on a duplicate
    # entry, one planted must not make it drop a queued event from the log.
    store, _ = watched
    published, waiting = await _published_but_still_queued(store, signer)
    await store.positions.delete_one({"_id": published[0]})
    await store.positions.insert_one({"_id": waiting[0], "index": 1})
    sequencer = Sequencer(store)
    assert await sequencer.acquire_lease()
    try:
        for _ in range(3):  # a Resync is recovered from, then the batch goes through
            try:
                await sequencer.recover()
                sequenced = await sequencer.sequence_batch()
                break
            except Resync:
                continue
        else:
            raise AssertionError("the sequencer never got past the edited positions")
        assert sequenced == 2 and sequencer.size == 7
        logged = {d["event"] async for d in store.entries.find({}, {"event": 1})}
        assert set(waiting) <= logged and set(published) <= logged
    finally:
        await sequencer.release_lease()
