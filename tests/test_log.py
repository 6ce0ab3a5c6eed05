"""The log end to end against the real server: append, sequence, anchor, prove."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import bson
import pytest
from bson import Binary, ObjectId
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from anchoring.anchorer import AnchorSettings
from anchoring.encoding import b64
from anchoring.errors import InvalidEvent, ProofUnavailable, VersionConflict
from anchoring.hashing import EMPTY_ROOT
from anchoring.ledger import (
    INTENTS,
    Ledger,
    commit_marker,
    event_id,
    group_events,
    intent,
    make_event,
)
from anchoring.log import LogSettings, TransparencyLog
from anchoring.note import Signer, open_checkpoint
from anchoring.receipt import ReceiptCache, open_receipt
from anchoring.sequencer import Sequencer, SequencerSettings
from anchoring.verify import verify_consistency, verify_inclusion

FAST = LogSettings(
    sequencer=SequencerSettings(poll_interval=0.02, lease_ttl=2.0, orphan_grace=1.0),
    anchor=AnchorSettings(interval=0.1, max_leaves=50),
)


def header(subject: str, version: int, **extra: object) -> dict[str, object]:
    return {"v": 1, "subject": subject, "version": version, "type": "TEST", **extra}


@pytest.fixture
async def tlog(store, signer):
    log = TransparencyLog(store, signer, FAST)
    await log.start()
    yield log
    await log.stop()


async def test_concurrent_appends_get_contiguous_indices_and_anchored_proofs(tlog):
    results = await asyncio.gather(
        *[
            tlog.append(f"rx-{i % 7}", i // 7 + 1, header(f"rx-{i % 7}", i // 7 + 1))
            for i in range(140)
        ]
    )
    indices = [await tlog.wait_sequenced(r.event_id) for r in results]
    assert sorted(indices) == list(range(140))
    cp = await tlog.wait_anchored(140)
    opened = open_checkpoint(cp.note, [tlog.signer.verifier()], tlog.origin)
    assert opened.size == cp.size == 140
    for r, index in zip(results, indices, strict=True):
        proof = await tlog.inclusion_proof(index)
        assert proof.leaf == r.leaf
        verify_inclusion(index, proof.tree_size, r.leaf_hash, proof.path, opened.root_hash)


async def test_versions_of_one_subject_appear_in_order(tlog):
    for v in range(1, 30):
        await tlog.append("rx-order", v, header("rx-order", v))
    await tlog.wait_anchored(29)
    versions = [
        (await tlog.store.ledger.find_one({"_id": (await tlog.entry(i))["event"]}))["version"]
        for i in range(29)
    ]
    assert versions == list(range(1, 30))


async def test_second_event_for_same_version_is_a_conflict(tlog):
    await tlog.append("rx-1", 1, header("rx-1", 1))
    with pytest.raises(VersionConflict):
        await tlog.append("rx-1", 1, header("rx-1", 1, note="other"))
    a, b = await asyncio.gather(
        tlog.append("rx-2", 1, header("rx-2", 1, who="a")),
        tlog.append("rx-2", 1, header("rx-2", 1, who="b")),
        return_exceptions=True,
    )
    assert sorted(type(x).__name__ for x in (a, b)) == ["Appended", "VersionConflict"]


async def test_a_version_gap_is_refused_and_nothing_is_stored(tlog):
    await tlog.append("rx-gap", 1, header("rx-gap", 1))
    with pytest.raises(InvalidEvent, match="'rx-gap' has no version 2"):
        await tlog.append("rx-gap", 3, header("rx-gap", 3))
    with pytest.raises(InvalidEvent, match="'rx-none' has no version 1"):
        await tlog.append("rx-none", 2, header("rx-none", 2))
    assert await tlog.store.ledger.count_documents({"subject": "rx-gap"}) == 1
    assert await tlog.store.ledger.count_documents({"subject": "rx-none"}) == 0
    # The refused events hold nothing back: the next version is taken and sequenced.
    second = await tlog.append("rx-gap", 2, header("rx-gap", 2))
    await tlog.wait_sequenced(second.event_id)


async def test_versions_appended_together_may_extend_each_other(tlog):
    appended = await asyncio.gather(
        *(tlog.append("rx-together", v, header("rx-together", v)) for v in range(1, 6))
    )
    assert [a.version for a in appended] == [1, 2, 3, 4, 5]


async def test_a_prev_that_is_not_the_previous_versions_leaf_hash_is_refused(tlog):
    with pytest.raises(InvalidEvent, match="first version of 'rx-prev' has prev"):
        await tlog.append("rx-prev", 1, header("rx-prev", 1, prev=b64(b"\x00" * 32)))
    first = await tlog.append("rx-prev", 1, header("rx-prev", 1, prev=None))
    with pytest.raises(InvalidEvent, match="is not the leaf hash of version 1"):
        await tlog.append("rx-prev", 2, header("rx-prev", 2, prev=b64(b"\x00" * 32)))
    second = await tlog.append("rx-prev", 2, header("rx-prev", 2, prev=b64(first.leaf_hash)))
    # In one group: the prev of version 3 is checked against version 2 of the same group.
    third, fourth = await asyncio.gather(
        tlog.append("rx-prev", 3, header("rx-prev", 3, prev=b64(second.leaf_hash))),
        tlog.append("rx-prev", 4, header("rx-prev", 4, prev=b64(b"\x01" * 32))),
        return_exceptions=True,
    )
    assert not isinstance(third, Exception), third
    assert isinstance(fourth, InvalidEvent) and "version 3" in str(fourth), fourth


async def test_the_next_version_after_a_lost_race_is_sequenced_promptly(store, signer):
    settings = LogSettings(
        sequencer=SequencerSettings(poll_interval=0.02, orphan_grace=10.0), anchor=FAST.anchor
    )
    tlog = TransparencyLog(store, signer, settings)
    await tlog.start()
    try:
        await _race_then_next_version(tlog)
    finally:
        await tlog.stop()


async def _race_then_next_version(tlog: TransparencyLog) -> None:
    await tlog.append("rx-9", 1, header("rx-9", 1))
    # Appenders in other processes: each writes its own group, so the losers' groups hold
    # only refused events.
    others = [Ledger(tlog.store) for _ in range(4)]
    race = await asyncio.gather(
        *(o.append("rx-9", 2, header("rx-9", 2, who=i)) for i, o in enumerate(others)),
        return_exceptions=True,
    )
    for other in others:
        await other.close()
    assert sum(not isinstance(r, Exception) for r in race) == 1
    third = await tlog.append("rx-9", 3, header("rx-9", 3))
    # Not held back by the losers' groups until the orphan grace period (10 s) runs out.
    await tlog.wait_sequenced(third.event_id, timeout=3)


@pytest.mark.parametrize(
    "subject, version, hdr",
    [
        ("", 1, {}),
        ("rx", 0, {}),
        ("rx", True, {}),
        ("rx", 1, []),
        ("rx", 1, {"a.b": 1}),
        ("rx", 1, {"$x": 1}),
        ("rx", 1, {"x": float("nan")}),
        ("rx", 1, {"subject": "other"}),
        ("rx", 1, {"n": 2**60}),
    ],
)
async def test_malformed_events_are_refused_with_a_clear_error(tlog, subject, version, hdr):
    with pytest.raises(InvalidEvent):
        await tlog.append(subject, version, hdr)


async def test_consistency_proofs_between_checkpoints_verify(tlog):
    first = [await tlog.append("rx-c", v, header("rx-c", v)) for v in range(1, 12)]
    cp1 = await tlog.wait_anchored(11)
    for v in range(12, 40):
        await tlog.append("rx-c", v, header("rx-c", v))
    cp2 = await tlog.wait_anchored(39)
    old, new, path = await tlog.consistency_proof(cp1.size, cp2.size)
    verify_consistency(old, new, cp1.root_hash, cp2.root_hash, path)
    assert first


async def test_proof_for_unknown_tree_size_is_refused(tlog):
    await tlog.append("rx-p", 1, header("rx-p", 1))
    await tlog.wait_anchored(1)
    with pytest.raises(ProofUnavailable):
        await tlog.inclusion_proof(0, tree_size=12345)
    with pytest.raises(ProofUnavailable):
        await tlog.inclusion_proof(5)


async def test_a_cancelled_caller_does_not_strand_the_rest_of_its_batch(tlog):
    tasks = [
        asyncio.create_task(tlog.append(f"rx-k{i}", 1, header(f"rx-k{i}", 1))) for i in range(30)
    ]
    await asyncio.sleep(0)
    tasks[3].cancel()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
    assert isinstance(results[3], asyncio.CancelledError)
    assert all(type(r).__name__ == "Appended" for i, r in enumerate(results) if i != 3)


@pytest.mark.parametrize(
    "subject, hdr",
    [
        ("rx", {"a\x00b": 1}),
        ("rx-\ud800", {}),
        ("rx", {"deep": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}),
    ],
)
async def test_events_that_cannot_be_stored_as_bson_are_refused_up_front(tlog, subject, hdr):
    with pytest.raises(InvalidEvent):
        await tlog.append(subject, 1, hdr)
    ok = await tlog.append("rx-after", 1, header("rx-after", 1))  # the appender still works
    assert ok.version == 1


async def _queue_directly(store, events: list[tuple[str, int, ObjectId]]) -> None:
    """Queue events as appenders in other processes would, one group each, with chosen
    group ids (their order across processes is arbitrary within a second)."""
    for subject, version, group_id in events:
        doc, _ = make_event(subject, version, header(subject, version))
        await store.pending.insert_one(intent(group_id, [doc]))
        await store.ledger.insert_one(doc)
        await store.pending.insert_one(commit_marker(group_id, [doc["_id"]]))


@pytest.mark.parametrize("batch_size", [1, 2, 1000])
async def test_versions_enter_the_log_in_order_when_the_queue_is_out_of_order(
    store, signer, batch_size
):
    t = int(time.time())
    oid = lambda n: ObjectId(f"{t:08x}{n:016x}")  # noqa: E731  same second, order by n
    await _queue_directly(
        store, [("rx-a", 2, oid(1)), ("rx-a", 3, oid(2)), ("rx-b", 1, oid(3)), ("rx-a", 1, oid(4))]
    )
    seq = Sequencer(store, SequencerSettings(batch_size=batch_size, groups_per_batch=batch_size))
    assert await seq.acquire_lease()
    await seq.recover()
    for _ in range(10):
        await seq.sequence_batch()
    assert seq.size == 4
    order = []
    for i in range(4):
        entry = await store.entries.find_one({"_id": i})
        event = await store.ledger.find_one({"_id": entry["event"]})
        order.append((event["subject"], event["version"]))
    assert [v for s, v in order if s == "rx-a"] == [1, 2, 3]
    assert await store.pending.count_documents({}) == 0


async def test_entries_a_deposed_leader_wrote_beyond_the_head_get_published(store, signer):
    await _queue_directly(store, [(f"rx-d{i}", 1, ObjectId()) for i in range(4)])
    settings = SequencerSettings(batch_size=2, lease_ttl=0.6)
    leader = Sequencer(store, settings)
    assert await leader.acquire_lease()
    await leader.recover()
    assert await leader.sequence_batch() == 2
    # A deposed leader, still running, writes the next two entries after the new leader's
    # recovery read the tail: nothing is queued any more, yet they must get published.
    queued = [
        e
        for g in await store.pending.find(INTENTS).sort("_id", 1).to_list()
        for e in group_events(g)
    ]
    queued = [e for e in queued if not await store.entries.find_one({"event": e["_id"]})]
    await store.entries.insert_many(
        [{"_id": 2 + i, "event": e["_id"], "leaf": e["leaf"]} for i, e in enumerate(queued)]
    )
    await store.pending.delete_many({})
    leader.is_leader = True  # it goes on leading: no fresh recovery would see those entries
    stopping = asyncio.Event()
    task = asyncio.create_task(leader.run(stopping))
    try:
        for _ in range(100):
            if leader.size == 4:
                break
            await asyncio.sleep(0.05)
    finally:
        stopping.set()
        await task
    assert leader.size == 4
    assert (await store.head())["size"] == 4


async def test_the_empty_tree_is_anchored_at_start_however_long_the_interval(store, signer):
    """The first checkpoint does not wait for the checkpoint interval to pass since the host
    booted (time.monotonic() counts from boot): a freshly started VM or container with an
    interval of an hour would otherwise sign nothing for its first hour of uptime."""
    longer_than_any_uptime = AnchorSettings(interval=10.0**9, max_leaves=50)
    tlog = TransparencyLog(store, signer, LogSettings(FAST.sequencer, longer_than_any_uptime))
    await tlog.start()
    try:
        cp = await tlog.wait_anchored(0, timeout=10)
        assert cp.size == 0 and cp.root_hash == EMPTY_ROOT
    finally:
        await tlog.stop()


async def test_a_receipt_is_signed_only_over_the_leaf_the_tree_holds(tlog):
    appended = await tlog.append("rx-receipt", 1, header("rx-receipt", 1))
    index = await tlog.wait_sequenced(appended.event_id)
    receipt = await tlog.receipt(index, appended.leaf)
    assert (receipt.leaf_index, receipt.leaf_hash) == (index, appended.leaf_hash)
    with pytest.raises(ProofUnavailable, match=f"entry {index} is not the leaf"):
        await tlog.receipt(index, appended.leaf + b" ")


async def test_a_leaf_is_signed_once_and_later_receipts_are_the_same_bytes(tlog):
    appended = await tlog.append("rx-once", 1, header("rx-once", 1))
    index = await tlog.wait_sequenced(appended.event_id)

    first = await tlog.receipt(index, appended.leaf)
    await asyncio.sleep(0.01)  # a receipt signed now would name a later time
    again = await tlog.receipt(index, appended.leaf)

    assert again.note == first.note and again.issued_at == first.issued_at
    assert (tlog.receipts.misses, tlog.receipts.hits) == (1, 1)


async def test_a_cached_receipt_is_refused_once_the_leaf_bytes_change(tlog):
    appended = await tlog.append("rx-changed", 1, header("rx-changed", 1))
    index = await tlog.wait_sequenced(appended.event_id)
    await tlog.receipt(index, appended.leaf)

    with pytest.raises(ProofUnavailable, match=f"entry {index} is not the leaf"):
        await tlog.receipt(index, appended.leaf + b" ")

    assert (tlog.receipts.misses, tlog.receipts.hits) == (1, 0)


async def test_another_signing_key_signs_its_own_receipt(tlog, store):
    appended = await tlog.append("rx-rekeyed", 1, header("rx-rekeyed", 1))
    index = await tlog.wait_sequenced(appended.event_id)
    first = await tlog.receipt(index, appended.leaf)

    tlog.signer = Signer("other.rxledger.example", Ed25519PrivateKey.generate())
    other = await tlog.receipt(index, appended.leaf)

    assert other.note != first.note
    assert open_receipt(other.note, [tlog.signer.verifier()]).leaf_hash == appended.leaf_hash
    assert tlog.receipts.misses == 2


def test_the_receipt_cache_keys_on_index_hash_key_and_origin_and_is_bounded(signer):
    cache = ReceiptCache(max_receipts=3)
    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    later = at + dt.timedelta(seconds=5)
    kept = cache.receipt(signer, "o", 7, b"a" * 32, at)

    assert cache.receipt(signer, "o", 7, b"a" * 32, later) is kept
    assert cache.receipt(signer, "o", 7, b"b" * 32, later).leaf_hash == b"b" * 32
    assert cache.receipt(signer, "o", 8, b"a" * 32, later).leaf_index == 8
    assert cache.receipt(signer, "p", 7, b"a" * 32, later).origin == "p"
    assert (cache.hits, cache.misses, len(cache)) == (1, 4, 3)
    assert cache.receipt(signer, "o", 7, b"a" * 32, later).issued_at == later  # evicted


async def test_a_proof_is_built_only_over_the_leaf_the_signed_tree_holds(tlog):
    appended = await tlog.append("rx-proof", 1, header("rx-proof", 1))
    index = await tlog.wait_sequenced(appended.event_id)
    cp = await tlog.wait_anchored(index + 1)
    assert (await tlog.prove(index, appended.leaf, cp)).holds()
    with pytest.raises(ProofUnavailable, match=f"entry {index} is not the leaf"):
        await tlog.prove(index, appended.leaf + b" ", cp)


async def test_two_writers_racing_for_a_version_one_wins_and_its_event_stands(tlog):
    # Two appenders (as in two processes) race for version 2 of several subjects. The
    # versions' `_id`s are derived from (subject, version), so the rivals collide on `_id`
    # too: each loser gets its VersionConflict, never the winner's success, and the event the
    # ledger holds and the log sequences is the winner's.
    subjects = [f"rx-race-{i}" for i in range(8)]
    for s in subjects:
        await tlog.append(s, 1, header(s, 1))
    writers = [Ledger(tlog.store), Ledger(tlog.store)]
    try:
        races = await asyncio.gather(
            *(
                asyncio.gather(
                    *(w.append(s, 2, header(s, 2, who=n)) for n, w in enumerate(writers)),
                    return_exceptions=True,
                )
                for s in subjects
            )
        )
    finally:
        for w in writers:
            await w.close()
    for s, results in zip(subjects, races, strict=True):
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1 and len(lost) == 1, (s, results)
        assert isinstance(lost[0], VersionConflict), lost[0]
        stored = await tlog.store.ledger.find_one({"_id": won[0].event_id})
        assert bytes(stored["leaf"]) == won[0].leaf
        index = await tlog.wait_sequenced(won[0].event_id)
        assert bytes((await tlog.entry(index))["leaf"]) == won[0].leaf, s


async def test_a_duplicate_key_is_our_event_only_when_the_stored_one_is_ours(store):
    # What the appender decides after a duplicate key: its own event already stored (a
    # retried insert) was appended; a rival's, under the same derived `_id`, is a conflict.
    ledger = Ledger(store)
    loop = asyncio.get_running_loop()
    ours, ours_appended = make_event("rx-retry", 1, header("rx-retry", 1))
    rival, rival_appended = make_event("rx-retry", 1, header("rx-retry", 1))
    assert ours["_id"] == rival["_id"]
    await store.ledger.insert_one(dict(ours))
    mine, theirs = loop.create_future(), loop.create_future()
    settled = await ledger._settle_conflicts(
        [(ours, ours_appended, mine), (rival, rival_appended, theirs)]
    )
    assert settled is not None and [item[0] for item in settled] == [ours]
    assert not mine.done()
    assert isinstance(theirs.exception(), VersionConflict)


def test_an_events_id_is_derived_from_its_subject_and_version():
    doc, appended = make_event("rx-id", 3, header("rx-id", 3))
    assert doc["_id"] == appended.event_id == event_id("rx-id", 3)
    assert event_id("rx-id", 3) != event_id("rx-id", 4) != event_id("rx-ie", 3)
    with pytest.raises(InvalidEvent, match="is not the id of 'rx-id' version 3"):
        make_event("rx-id", 3, header("rx-id", 3), chosen_id=ObjectId())


# The sequencer takes an event id named by any group's commit marker as committed for every
# group that holds an event with that id. With ids derived from (subject, version), a group
# that lost its version to a rival holds a copy of the rival's id with its own leaf; the
# sequencer must take an event only from the group whose marker names it, and complete an
# orphaned group's event only when the ledger holds that very event (`same_append`), not
# merely its id. Both are changes to anchoring/sequencer.py, owned elsewhere for issue 11.
async def test_the_log_sequences_the_winners_event_not_a_losers_queued_copy(tlog):
    # The documents a losing appender writes, in the order that loses: its intent (queued
    # before the winner's), then, after the winner's event took the version, its marker
    # naming none of its events.
    await tlog.append("rx-lost", 1, header("rx-lost", 1))
    loser, _ = make_event("rx-lost", 2, header("rx-lost", 2, who="loser"))
    group = ObjectId()
    await tlog.store.pending.insert_one(intent(group, [loser]))
    await _known_to_the_sequencer(tlog, group)
    winner = await tlog.append("rx-lost", 2, header("rx-lost", 2, who="winner"))
    await tlog.store.pending.insert_one(commit_marker(group, []))
    index = await tlog.wait_sequenced(winner.event_id)
    assert bytes((await tlog.entry(index))["leaf"]) == winner.leaf


async def test_an_orphaned_copy_of_a_version_a_rival_took_is_not_sequenced(tlog):
    # An appender queued version 2 and died before writing it to the ledger; another took
    # version 2 meanwhile. Completing the orphan finds the rival's event under the same id:
    # the orphan's own event was never stored, and the log holds the rival's.
    await tlog.append("rx-orphan", 1, header("rx-orphan", 1))
    orphan, _ = make_event("rx-orphan", 2, header("rx-orphan", 2, who="orphan"))
    group = ObjectId()
    await tlog.store.pending.insert_one(intent(group, [orphan]))
    await _known_to_the_sequencer(tlog, group)
    winner = await tlog.append("rx-orphan", 2, header("rx-orphan", 2, who="winner"))
    index = await tlog.wait_sequenced(winner.event_id)
    assert bytes((await tlog.entry(index))["leaf"]) == winner.leaf


async def test_two_orphaned_rival_copies_of_a_version_log_the_one_the_ledger_holds(tlog):
    # Two appenders raced for version 2 and both lost their commit markers (a database
    # outage): completing both orphans finds the winner's event under their shared derived
    # id. Only the winner's group may name it; the loser's group sorts first, so crediting
    # ids rather than copies would log the loser's leaf.
    await tlog.append("rx-rivals", 1, header("rx-rivals", 1))
    loser, _ = make_event("rx-rivals", 2, header("rx-rivals", 2, who="loser"))
    winner, appended = make_event("rx-rivals", 2, header("rx-rivals", 2, who="winner"))
    loser_group, winner_group = ObjectId(), ObjectId()
    await tlog.store.pending.insert_many(
        [intent(loser_group, [loser]), intent(winner_group, [winner])]
    )
    await tlog.store.ledger.insert_one(winner)
    index = await tlog.wait_sequenced(appended.event_id)
    assert bytes((await tlog.entry(index))["leaf"]) == appended.leaf


async def _known_to_the_sequencer(tlog: TransparencyLog, group: ObjectId) -> None:
    """Wait until the sequencer has read `group` from `pending` (its next scan)."""
    deadline = time.monotonic() + 5
    while group not in tlog.sequencer._queue:
        assert time.monotonic() < deadline, "the sequencer never read the group"
        await asyncio.sleep(0.01)


UNREADABLE_EVENTS = [
    Binary(b"\x05\x00\x00\x00\x00garbage"),  # not BSON
    "not even bytes",
    Binary(bson.encode({"events": [{"_id": ObjectId(), "subject": "rx-x"}]})),  # no version
    Binary(bson.encode({"events": "a string"})),
]


@pytest.mark.parametrize("events", UNREADABLE_EVENTS)
async def test_an_unreadable_intent_planted_in_pending_does_not_stop_the_log(store, signer, events):
    # Someone who can write the database plants an intent this code never wrote: it is set
    # aside (it names nothing anyone was told is stored), and the log goes on, from a start
    # (recovery reads it) and in the steady state (a scan reads it).
    planted = ObjectId()
    await store.pending.insert_one({**intent(planted, []), "events": events})
    tlog = TransparencyLog(store, signer, FAST)
    await tlog.start()
    try:
        first = await tlog.append("rx-planted", 1, header("rx-planted", 1))
        await tlog.wait_sequenced(first.event_id)
        again = ObjectId()
        await store.pending.insert_one({**intent(again, []), "events": events})
        second = await tlog.append("rx-planted", 2, header("rx-planted", 2))
        await tlog.wait_sequenced(second.event_id)
        assert await Ledger(store).queued([first.event_id]) == set()
    finally:
        await tlog.stop()


async def test_a_queued_group_whose_intent_was_overwritten_is_sequenced_from_its_ledger_copies(
    store, signer
):
    # The appender acknowledged the event (its ledger copy and commit marker are durable);
    # its intent was then overwritten. The marker names the events, the ledger holds them.
    queued = Ledger(store)
    appended = await queued.append("rx-overwritten", 1, header("rx-overwritten", 1))
    await queued.close()
    await store.pending.update_many(INTENTS, {"$set": {"events": Binary(b"garbage")}})
    assert await Ledger(store).queued([appended.event_id]) == {appended.event_id}
    tlog = TransparencyLog(store, signer, FAST)
    await tlog.start()
    try:
        index = await tlog.wait_sequenced(appended.event_id)
        assert bytes((await tlog.entry(index))["leaf"]) == appended.leaf
    finally:
        await tlog.stop()


PLANTED = [
    "a ledger copy without its leaf",
    "a ledger copy without its subject",
    "a ledger copy under an id not derived from it",
    "a marker whose events are not a list",
    "a marker naming the group under another id",
    "an intent whose id is a document",
    "a marker whose group id is a document",
]


@pytest.mark.parametrize("case", PLANTED)
async def test_a_planted_marker_or_ledger_copy_beside_an_unreadable_intent_does_not_stop_the_log(
    store, signer, case
):
    planted, bogus = ObjectId(), ObjectId()
    garbage = {**intent(planted, []), "events": Binary(b"garbage")}
    if case == "an intent whose id is a document":
        await store.pending.insert_one({**intent(ObjectId(), []), "_id": {"a": 1}})
    elif case == "a marker whose group id is a document":
        await store.pending.insert_one({"_id": "x.c", "committed": {"a": 1}, "events": []})
    elif case == "a marker whose events are not a list":
        await store.pending.insert_many([garbage, {**commit_marker(planted, []), "events": 5}])
    elif case == "a marker naming the group under another id":
        copy, _ = make_event("rx-bogus", 1, header("rx-bogus", 1))
        await store.ledger.insert_one(copy)
        await store.pending.insert_many(
            [garbage, {**commit_marker(planted, [copy["_id"]]), "_id": "elsewhere"}]
        )
    else:
        copy, _ = make_event("rx-bogus", 1, header("rx-bogus", 1))
        if case == "a ledger copy under an id not derived from it":
            copy["_id"] = bogus
        else:
            del copy["leaf" if "leaf" in case else "subject"]
        await store.ledger.insert_one(copy)
        await store.pending.insert_many([garbage, commit_marker(planted, [copy["_id"]])])
    tlog = TransparencyLog(store, signer, FAST)
    await tlog.start()
    try:
        appended = await tlog.append("rx-after", 1, header("rx-after", 1))
        await tlog.wait_sequenced(appended.event_id, timeout=5)
        assert await store.entries.count_documents({"event": {"$ne": appended.event_id}}) == 0
    finally:
        await tlog.stop()


async def test_an_event_a_planted_marker_names_again_is_not_sequenced_twice(store, signer):
    tlog = TransparencyLog(store, signer, FAST)
    await tlog.start()
    try:
        first = await tlog.append("rx-once", 1, header("rx-once", 1))
        await tlog.wait_sequenced(first.event_id)
        planted = ObjectId()
        await store.pending.insert_many(
            [
                {**intent(planted, []), "events": Binary(b"garbage")},
                commit_marker(planted, [first.event_id]),
            ]
        )
        second = await tlog.append("rx-once", 2, header("rx-once", 2))
        await tlog.wait_sequenced(second.event_id)
        deadline = time.monotonic() + 5
        while await store.pending.find_one({"_id": planted}) is not None:
            assert time.monotonic() < deadline, "the planted group never left the queue"
            await asyncio.sleep(0.05)
        assert await store.entries.count_documents({"event": first.event_id}) == 1
    finally:
        await tlog.stop()
