"""The audit replay against a real log, clean and then tampered with directly in the database.

One log of 300 events over four subjects is built once per module with the real
TransparencyLog (sequencer and anchorer running), stopped, and copied into each test's own
database; each test then edits that copy with plain pymongo, the way an attacker or a broken
script with database access would, and checks that the audit names the right place first.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bson import Binary, ObjectId
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymongo import AsyncMongoClient

import anchoring.audit
from anchoring.anchorer import AnchorSettings
from anchoring.audit import audit_log
from anchoring.encoding import b64
from anchoring.errors import ProofUnavailable
from anchoring.hashing import HASH_SIZE
from anchoring.log import LogSettings, TransparencyLog
from anchoring.note import Checkpoint, Signer
from anchoring.sequencer import SequencerSettings
from anchoring.store import LogStore
from anchoring.treemath import TILE_HEIGHT, TILE_WIDTH, tile_key, tile_width

ROOT = Path(__file__).resolve().parent.parent
ORIGIN = "test.rxledger.example/log"  # the origin of the conftest `store` fixture
SUBJECTS = ["rx-a", "rx-b", "rx-c", "rx-d"]
VERSIONS = 75  # 4 x 75 = 300 events: one full level-0 tile, a partial one and a level-1 tile
SIZE = len(SUBJECTS) * VERSIONS
COLLECTIONS = ["ledger", "pending", "entries", "positions", "tiles", "leases", "notarizations"]


# The conftest signer's key is random; a fixed one whose verifier key has no '+' in its base64
# part keeps `rxledger audit --key` runs the same every time (see test_cli for keys with '+').
@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("test.rxledger.example", Ed25519PrivateKey.from_private_bytes(b"\x01" * 32))


FAST = LogSettings(
    sequencer=SequencerSettings(poll_interval=0.02, lease_ttl=2.0, orphan_grace=1.0),
    anchor=AnchorSettings(interval=0.05, max_leaves=60),
)


def header(subject: str, version: int, prev: str | None) -> dict[str, Any]:
    h: dict[str, Any] = {"v": 1, "subject": subject, "version": version, "type": "T"}
    if prev is not None:
        h["prev"] = prev
    return h


@dataclass(frozen=True)
class Template:
    db_name: str
    checkpoint_sizes: list[int]


@pytest.fixture(scope="module")
async def template(mongo_uri: str, signer: Signer):
    """Build the log once: rounds of one new version per subject, anchored along the way."""
    client: AsyncMongoClient[dict] = AsyncMongoClient(
        mongo_uri, serverSelectionTimeoutMS=5000, tz_aware=True
    )
    name = f"t_audit_tpl_{uuid.uuid4().hex[:8]}"
    store = LogStore(client[name], origin=ORIGIN)
    log = TransparencyLog(store, signer, FAST)
    try:
        last: dict[str, Any] = {}
        for version in range(1, VERSIONS + 1):
            if version == 2:
                # Start once the first events are queued, so the first checkpoint covers them
                # (the tests below need the first checkpoint to hold leaves).
                await log.start()
            appended = await asyncio.gather(
                *[
                    log.append(
                        s,
                        version,
                        header(s, version, b64(last[s].leaf_hash) if s in last else None),
                    )
                    for s in SUBJECTS
                ]
            )
            last.update({a.subject: a for a in appended})
            if version in (10, 25, 45, 60):
                await log.wait_anchored(version * len(SUBJECTS))
        await log.wait_anchored(SIZE)
    finally:
        await log.stop()
    sizes = [d["_id"] async for d in store.notarizations.find({}, {"_id": 1}).sort("_id", 1)]
    yield Template(name, sizes)
    await client.drop_database(name)
    await client.close()


@pytest.fixture
async def log_store(template: Template, client, store: LogStore) -> LogStore:
    """A faithful copy of the template log in this test's own database, ready to tamper with."""
    source = client[template.db_name]
    for name in COLLECTIONS:
        docs = await source[name].find({}).to_list()
        if docs:
            await store.db[name].insert_many(docs)
    await store.ensure_indexes()
    return store


# --- helpers -------------------------------------------------------------------------------


async def entry(store: LogStore, index: int) -> dict[str, Any]:
    doc = await store.entries.find_one({"_id": index})
    assert doc is not None
    return doc


async def event_of(store: LogStore, index: int) -> dict[str, Any]:
    doc = await store.ledger.find_one({"_id": (await entry(store, index))["event"]})
    assert doc is not None
    return doc


async def subject_at(store: LogStore, index: int) -> str:
    return str((await event_of(store, index))["subject"])


async def index_of(store: LogStore, subject: str, version: int) -> int:
    event = await store.ledger.find_one({"subject": subject, "version": version})
    assert event is not None
    doc = await store.entries.find_one({"event": event["_id"]})
    assert doc is not None
    return int(doc["_id"])


async def swap_entries(store: LogStore, i: int, j: int) -> None:
    """Exchange the `event` and `leaf` of entries i and j (via a placeholder: `event` is unique)."""
    a, b = await entry(store, i), await entry(store, j)
    await store.entries.update_one({"_id": i}, {"$set": {"event": ObjectId()}})
    await store.entries.update_one({"_id": j}, {"$set": {"event": a["event"], "leaf": a["leaf"]}})
    await store.entries.update_one({"_id": i}, {"$set": {"event": b["event"], "leaf": b["leaf"]}})


async def flip_tile_byte(store: LogStore, key: str, hash_index: int) -> None:
    doc = await store.tiles.find_one({"_id": key})
    assert doc is not None, f"no tile {key}"
    hashes = bytearray(doc["hashes"])
    hashes[hash_index * HASH_SIZE + 7] ^= 0x01
    await store.tiles.update_one({"_id": key}, {"$set": {"hashes": Binary(bytes(hashes))}})


def first_checkpoint_after(template: Template, index: int) -> int:
    """The smallest checkpoint size that covers leaf `index`."""
    return min(s for s in template.checkpoint_sizes if s > index)


async def audit(store: LogStore, signer: Signer) -> anchoring.audit.AuditReport:
    return await audit_log(store, [signer.verifier()])


# --- a clean log -----------------------------------------------------------------------------


async def test_template_log_has_several_checkpoints_up_to_its_full_size(template):
    assert len(template.checkpoint_sizes) >= 4
    assert template.checkpoint_sizes[-1] == SIZE


async def test_clean_log_audits_ok_with_every_entry_and_checkpoint_counted(log_store, signer):
    report = await audit(log_store, signer)
    assert report.ok, report.problems
    assert report.problems == []
    assert report.entries == SIZE
    assert report.checkpoints == await log_store.notarizations.count_documents({})
    assert report.tiles >= 3  # 0/0, the right-edge level-0 tile and the level-1 tile


async def test_audit_rejects_checkpoints_when_given_another_key(log_store, template):
    stranger = Signer("test.rxledger.example", Ed25519PrivateKey.generate())
    report = await audit_log(log_store, [stranger.verifier()])
    assert not report.ok
    assert report.problems[0].startswith(
        f"checkpoint {template.checkpoint_sizes[0]}: signed note does not verify (unknown key"
    )


async def test_progress_is_reported_with_increasing_counts_up_to_the_size(
    log_store, signer, monkeypatch
):
    monkeypatch.setattr(anchoring.audit, "PAGE", 64)
    calls: list[tuple[int, int]] = []
    report = await audit_log(log_store, [signer.verifier()], lambda d, t: calls.append((d, t)))
    assert report.ok, report.problems
    done = [d for d, _ in calls]
    assert done == [64, 128, 192, 256, SIZE]
    assert all(total == SIZE for _, total in calls)


# --- the ledger and the entries --------------------------------------------------------------


async def test_edited_event_is_reported_at_its_entry_index(log_store, signer):
    index = 137
    event = await event_of(log_store, index)
    await log_store.ledger.update_one({"_id": event["_id"]}, {"$set": {"header.type": "FORGED"}})
    report = await audit(log_store, signer)
    assert not report.ok
    assert report.problems[0].startswith(f"entry {index}: ledger event {event['_id']} was edited")


async def test_event_whose_version_field_no_longer_matches_its_header_is_reported(
    log_store, signer
):
    index = 90
    event = await event_of(log_store, index)
    await log_store.ledger.update_one({"_id": event["_id"]}, {"$inc": {"version": 1000}})
    report = await audit(log_store, signer)
    assert not report.ok
    assert report.problems[0].startswith(f"entry {index}: event {event['_id']} subject/version")


async def test_deleted_event_is_reported_at_its_entry_index(log_store, signer):
    index = 201
    event = await event_of(log_store, index)
    await log_store.ledger.delete_one({"_id": event["_id"]})
    report = await audit(log_store, signer)
    assert not report.ok
    assert report.problems[0] == f"entry {index}: its ledger event {event['_id']} was deleted"


@pytest.mark.parametrize("index", [0, 100, SIZE - 1])
async def test_deleted_entry_is_reported_at_its_index(log_store, signer, index):
    await log_store.entries.delete_one({"_id": index})
    report = await audit(log_store, signer)
    assert not report.ok
    assert report.problems[0].startswith(f"entry {index}: missing")


async def test_reordered_versions_of_one_subject_are_reported_at_the_first_moved_entry(
    log_store, signer
):
    i = await index_of(log_store, "rx-b", 20)
    j = await index_of(log_store, "rx-b", 22)
    assert i < j
    await swap_entries(log_store, i, j)
    report = await audit(log_store, signer)
    assert not report.ok
    assert report.problems[0].startswith(f"entry {i}: rx-b version 22 follows version 19")


async def test_swapping_a_subjects_first_two_versions_is_reported_at_the_first_moved_entry(
    log_store, signer
):
    # After the swap, entry i holds rx-c version 2, whose prev names a leaf that is nowhere
    # before it in the log: the log diverges at i, not later.
    i = await index_of(log_store, "rx-c", 1)
    j = await index_of(log_store, "rx-c", 2)
    await swap_entries(log_store, i, j)
    report = await audit(log_store, signer)
    assert not report.ok
    assert report.problems[0].startswith(f"entry {i}: rx-c")


async def test_swapping_entries_of_different_subjects_shows_at_the_first_covering_checkpoint(
    log_store, signer, template
):
    # Two adjacent entries of different subjects: each subject's own order is intact, so no
    # event check can see it; the first signed root over the swapped leaves no longer matches.
    i = template.checkpoint_sizes[1] - 2
    while await subject_at(log_store, i) == await subject_at(log_store, i + 1):
        i -= 1
    await swap_entries(log_store, i, i + 1)
    report = await audit_log(log_store, [signer.verifier()], max_problems=100)
    assert not report.ok
    covering = first_checkpoint_after(template, i)
    assert report.problems[0].startswith(
        f"checkpoint {covering}: its root differs from the tree rebuilt from the ledger"
    )
    # the stored level-0 tile then pinpoints the swapped leaves
    assert any(p.startswith(f"tile 0/0: hash {i} differs") for p in report.problems)


# --- tiles -------------------------------------------------------------------------------------


def final_tiles() -> list[tuple[str, int, int]]:
    """(key, hash index, first leaf under that hash) for one hash of each tile of the final tree."""
    right = tile_width(0, 1, SIZE)
    return [
        (tile_key(0, 0, TILE_WIDTH), 5, 5),
        (tile_key(0, 1, right), right - 1, TILE_WIDTH + right - 1),
        (tile_key(1, 0, tile_width(1, 0, SIZE)), 0, 0 << TILE_HEIGHT),
    ]


@pytest.mark.parametrize(("key", "hash_index", "first_leaf"), final_tiles())
async def test_edited_tile_is_reported_by_key_and_hash(
    log_store, signer, key, hash_index, first_leaf
):
    await flip_tile_byte(log_store, key, hash_index)
    report = await audit(log_store, signer)
    assert not report.ok
    assert report.problems[0] == (
        f"tile {key}: hash {hash_index} differs from the tree rebuilt from the ledger "
        f"(leaves from {first_leaf})"
    )


async def test_edited_tile_of_an_older_checkpoint_size_fails_the_audit(log_store, signer, template):
    # Tiles of every published size stay stored and are what proofs against an older
    # checkpoint are built from; editing one would make a proof that does not verify, so the
    # log refuses to serve it, and the audit names the tile.
    old = template.checkpoint_sizes[0]
    assert old % TILE_WIDTH
    key = tile_key(0, 0, old)
    await flip_tile_byte(log_store, key, 3)
    tlog = TransparencyLog(log_store, signer, FAST)  # not started: it only reads
    with pytest.raises(ProofUnavailable, match=f"signed tree of size {old} holds"):
        await tlog.inclusion_proof(0, tree_size=old)
    report = await audit(log_store, signer)
    assert not report.ok, "the audit passed a log whose stored tiles serve broken proofs"
    assert report.problems[0].startswith(f"tile {key}:")


async def test_deleted_tile_is_reported_missing(log_store, signer):
    key = tile_key(0, 0, TILE_WIDTH)
    await log_store.tiles.delete_one({"_id": key})
    report = await audit(log_store, signer)
    assert not report.ok
    assert report.problems[0] == f"tile {key}: missing"


# --- checkpoints ---------------------------------------------------------------------------


async def test_checkpoint_note_edited_after_signing_is_reported_by_size(
    log_store, signer, template
):
    size = template.checkpoint_sizes[2]
    doc = await log_store.notarizations.find_one({"_id": size})
    root_line = doc["note"].split("\n")[2]
    forged_root = b64(bytes(HASH_SIZE))
    assert root_line != forged_root
    note = doc["note"].replace(f"\n{root_line}\n", f"\n{forged_root}\n", 1)
    await log_store.notarizations.update_one({"_id": size}, {"$set": {"note": note}})
    report = await audit(log_store, signer)
    assert not report.ok
    assert report.problems[0].startswith(
        f"checkpoint {size}: signed note does not verify (bad signature"
    )


async def test_checkpoint_root_hash_field_edited_is_reported_by_size(log_store, signer, template):
    size = template.checkpoint_sizes[1]
    await log_store.notarizations.update_one(
        {"_id": size}, {"$set": {"rootHash": Binary(b"\x42" * HASH_SIZE)}}
    )
    report = await audit(log_store, signer)
    assert not report.ok
    assert report.problems[0] == (
        f"checkpoint {size}: rootHash field differs from the signed note's root"
    )


async def test_checkpoint_signed_by_another_key_is_reported_by_size(log_store, signer, template):
    size = template.checkpoint_sizes[1] + 1
    assert size not in template.checkpoint_sizes
    forger = Signer(signer.name, Ed25519PrivateKey.generate())  # same name, other key
    root = b"\x07" * HASH_SIZE
    await log_store.notarizations.insert_one(
        {
            "_id": size,
            "origin": ORIGIN,
            "size": size,
            "rootHash": Binary(root),
            "note": forger.sign_note(Checkpoint(ORIGIN, size, root).text()),
        }
    )
    report = await audit(log_store, signer)
    assert not report.ok
    assert report.problems[0].startswith(
        f"checkpoint {size}: signed note does not verify (unknown key"
    )


async def test_checkpoint_validly_signed_over_a_wrong_root_is_reported_by_size(
    log_store, signer, template
):
    size = template.checkpoint_sizes[2]
    root = b"\x09" * HASH_SIZE
    await log_store.notarizations.update_one(
        {"_id": size},
        {
            "$set": {
                "rootHash": Binary(root),
                "note": signer.sign_note(Checkpoint(ORIGIN, size, root).text()),
            }
        },
    )
    report = await audit(log_store, signer)
    assert not report.ok
    assert report.problems[0].startswith(
        f"checkpoint {size}: its root differs from the tree rebuilt from the ledger"
    )
    # and its neighbours no longer prove consistent with it
    assert any(p.startswith(f"checkpoints {size} -> ") for p in report.problems)


async def test_validly_signed_checkpoint_beyond_the_published_size_is_reported(log_store, signer):
    size = SIZE + 10
    root = b"\x0a" * HASH_SIZE
    await log_store.notarizations.insert_one(
        {
            "_id": size,
            "origin": ORIGIN,
            "size": size,
            "rootHash": Binary(root),
            "note": signer.sign_note(Checkpoint(ORIGIN, size, root).text()),
        }
    )
    report = await audit(log_store, signer)
    assert not report.ok
    assert report.problems[0] == (f"checkpoint {size} is beyond the published tree size {SIZE}")


# --- `rxledger audit` ------------------------------------------------------------------------


def run_audit(uri: str, db: str, key: str, timeout_ms: int = 5000) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MONGODB_URI": uri,
        "RXLEDGER_DB": db,
        "RXLEDGER_NOTARY_DB": db,
        "RXLEDGER_ORIGIN": ORIGIN,
        "RXLEDGER_DB_TIMEOUT_MS": str(timeout_ms),
    }
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "audit", "--key", key],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cli_audit_of_a_clean_log_exits_0_and_says_ok(log_store, signer, mongo_uri, db_name):
    result = await asyncio.to_thread(run_audit, mongo_uri, db_name, signer.verifier_key)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"OK: {SIZE} entries")
    assert "Traceback" not in result.stderr


async def test_cli_audit_of_a_tampered_log_exits_1_and_names_the_first_divergence(
    log_store, signer, mongo_uri, db_name
):
    event = await event_of(log_store, 42)
    await log_store.ledger.update_one({"_id": event["_id"]}, {"$set": {"header.type": "X"}})
    result = await asyncio.to_thread(run_audit, mongo_uri, db_name, signer.verifier_key)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "first divergence: entry 42: ledger event" in result.stdout
    assert "Traceback" not in result.stderr


async def test_cli_audit_without_a_database_exits_2_with_a_clear_message(signer):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = await asyncio.to_thread(
        run_audit, f"mongodb://127.0.0.1:{port}/", "nowhere", signer.verifier_key, 1000
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "database unavailable" in result.stderr
    assert "MONGODB_URI" in result.stderr
    assert "Traceback" not in result.stderr
