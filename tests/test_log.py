"""The log end to end against the real server: append, sequence, anchor, prove."""

from __future__ import annotations

import asyncio

import pytest

from anchoring.anchorer import AnchorSettings
from anchoring.errors import InvalidEvent, ProofUnavailable, VersionConflict
from anchoring.log import LogSettings, TransparencyLog
from anchoring.note import open_checkpoint
from anchoring.sequencer import SequencerSettings
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
