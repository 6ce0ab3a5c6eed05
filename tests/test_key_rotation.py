"""Rotating the log's signing key: the key set (anchoring.keys) says which key signs which
checkpoint sizes; old checkpoints and proofs stay verifiable with the old key, a retired key
signs nothing after its end, and no database write adds a key."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from bson import Binary
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymongo import AsyncMongoClient
from test_gateway import ORIGIN as GATEWAY_ORIGIN
from test_gateway import env_for, free_port
from test_subscriptions import (
    Gateway,
    StartGateway,
    changes,
    graphql,
    http_client,
    indices,
    issue_many,
    next_leaf_index,
    start_gateway,  # noqa: F401 (a fixture)
    subscribed,
)

from anchoring.anchorer import AnchorSettings
from anchoring.cosignature import Cosigner
from anchoring.encoding import b64
from anchoring.keys import RETIRED_KEY, KeySet, LogKey, parse_key_set
from anchoring.log import LogSettings, TransparencyLog
from anchoring.note import Checkpoint, Signer, load_private_key, split_note
from anchoring.sequencer import SequencerSettings
from anchoring.store import LogStore
from anchoring.verify import (
    BAD_SIGNATURE,
    MALFORMED,
    UNKNOWN_KEY,
    VerificationError,
    verify_inclusion,
)
from app.policy import Tags
from app.settings import ConfigError, Settings, write_new_key

FAST = LogSettings(
    sequencer=SequencerSettings(poll_interval=0.02, lease_ttl=2.0, orphan_grace=1.0),
    anchor=AnchorSettings(interval=0.05, max_leaves=10),
)
NAME = "test.rxledger.example"


def new_signer() -> Signer:
    return Signer(NAME, Ed25519PrivateKey.generate())


def header(subject: str, version: int) -> dict[str, object]:
    return {"v": 1, "subject": subject, "version": version, "type": "TEST"}


async def append_and_anchor(tlog: TransparencyLog, subject: str, count: int) -> int:
    """Append `count` versions of `subject`; returns the size of the checkpoint covering them."""
    size = 0
    for version in range(1, count + 1):
        appended = await tlog.append(subject, version, header(subject, version))
        size = await tlog.wait_sequenced(appended.event_id) + 1
    return (await tlog.wait_anchored(size)).size


async def until(condition, what: str, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        pytest.fail(f"waited {timeout} s for {what}")


async def test_a_log_restarted_with_another_key_says_why_and_keeps_sequencing(store: LogStore):
    """The newest checkpoint was signed by a key the log no longer has: nothing new is signed
    (anchorError names the checkpoint that does not verify), and the sequencer neither fails
    nor gives up its lease over it: appends keep being sequenced."""
    first = TransparencyLog(store, new_signer(), FAST)
    await first.start()
    try:
        await append_and_anchor(first, "rx-a", 3)
    finally:
        await first.stop()

    other = TransparencyLog(store, new_signer(), FAST)
    await other.start()
    try:
        appended = await other.append("rx-b", 1, header("rx-b", 1))
        index = await other.wait_sequenced(appended.event_id)
        await until(lambda: other.anchor_error is not None, "the anchorer's refusal")
        more = await other.append("rx-b", 2, header("rx-b", 2))
        assert await other.wait_sequenced(more.event_id) == index + 1
        assert "does not verify" in str(other.anchor_error)
        assert other.sequencer.last_error is None
        assert other.sequencer.is_leader
    finally:
        await other.stop()


# --- the key set, a pure function of the note and the configured ranges -----------------------


def note_of(size: int, *signers: Signer, origin: str = "test.rxledger.example/log") -> str:
    text = Checkpoint(origin, size, bytes(32)).text()
    return text + "\n" + "".join(s.signature_line(text) for s in signers)


OLD, NEW, STRANGER = new_signer(), new_signer(), new_signer()
ROTATED = KeySet(
    [
        LogKey(OLD.verifier(), OLD.verifier_key, 0, 20),
        LogKey(NEW.verifier(), NEW.verifier_key, 10),
    ]
)


def test_a_key_set_file_reads_ranges_comments_and_bare_keys():
    text = (
        "# the log's keys\n"
        f"{OLD.verifier_key} 0..20  # retired\n\n"
        f"{NEW.verifier_key} 10..\n"
        f"{STRANGER.verifier_key}\n"
    )
    keys = parse_key_set(text)
    assert [(k.label, k.first, k.last) for k in keys.keys] == [
        (f"{NAME}+{OLD.key_id.hex()}", 0, 20),
        (f"{NAME}+{NEW.key_id.hex()}", 10, None),
        (f"{NAME}+{STRANGER.key_id.hex()}", 0, None),
    ]
    assert parse_key_set(keys.text()).text() == keys.text()


@pytest.mark.parametrize(
    "line, found",
    [
        ("{old} 20..10", "first <= last"),
        ("{old} 10", "must read <first>.. or <first>..<last>"),
        ("{old} 1..2 3", "must read <verifier key>"),
        ("not-a-key", "verifier key must read"),
    ],
)
def test_a_malformed_key_set_line_is_refused_naming_the_line(line, found):
    with pytest.raises(VerificationError) as err:
        parse_key_set(f"{NEW.verifier_key}\n" + line.format(old=OLD.verifier_key) + "\n")
    assert err.value.check == MALFORMED
    assert "line 2" in err.value.detail and found in err.value.detail


def test_the_same_key_twice_is_refused():
    with pytest.raises(VerificationError, match="listed twice"):
        parse_key_set(f"{OLD.verifier_key} 0..5\n{OLD.verifier_key} 9..\n")


def test_during_the_transition_both_keys_sign_and_both_are_reported():
    signed = ROTATED.open_checkpoint(note_of(15, OLD, NEW))
    assert signed.checkpoint.size == 15
    assert [k.verifier.key_id for k in signed.keys] == [OLD.key_id, NEW.key_id]


def test_a_checkpoint_from_before_the_rotation_verifies_with_the_old_key():
    assert ROTATED.open_checkpoint(note_of(3, OLD)).labels == f"{NAME}+{OLD.key_id.hex()}"


def test_a_checkpoint_signed_only_by_a_retired_key_after_its_end_is_refused():
    """A stolen old key cannot extend the log: past its last size it counts for nothing."""
    with pytest.raises(VerificationError) as err:
        ROTATED.open_checkpoint(note_of(21, OLD))
    assert err.value.check == RETIRED_KEY
    assert "size 21" in err.value.detail and "0..20" in err.value.detail


def test_a_new_key_before_its_first_size_does_not_count():
    with pytest.raises(VerificationError) as err:
        ROTATED.open_checkpoint(note_of(9, NEW))
    assert err.value.check == RETIRED_KEY


def test_a_key_outside_the_set_counts_for_nothing_whatever_else_signed():
    """An attacker's signature next to the log's is ignored; alone, it is an unknown key."""
    assert ROTATED.open_checkpoint(note_of(30, STRANGER, NEW)).labels.endswith(NEW.key_id.hex())
    with pytest.raises(VerificationError) as err:
        ROTATED.open_checkpoint(note_of(30, STRANGER))
    assert err.value.check == UNKNOWN_KEY
    with pytest.raises(VerificationError) as err:
        ROTATED.open_checkpoint(note_of(30, STRANGER, OLD))
    assert err.value.check == RETIRED_KEY


def test_a_forged_signature_by_a_listed_key_is_a_bad_signature():
    """The signature of size 15's checkpoint, moved onto size 16's."""
    signature_of_15 = note_of(15, NEW).rpartition("\u2014 ")[2]
    forged = note_of(16, NEW).rpartition("\u2014 ")[0] + "\u2014 " + signature_of_15
    with pytest.raises(VerificationError) as err:
        ROTATED.open_checkpoint(forged)
    assert err.value.check == BAD_SIGNATURE


# --- the log itself, rotating while it is written to -------------------------------------------


def rotation(old: Signer, new: Signer, first: int, last: int) -> KeySet:
    return KeySet(
        [
            LogKey(old.verifier(), old.verifier_key, 0, last),
            LogKey(new.verifier(), new.verifier_key, first),
        ]
    )


def signed_by(note: str) -> set[bytes]:
    """The key IDs of the signature lines of a note."""
    return {raw[:4] for _, raw in split_note(note)[1]}


async def test_a_rotation_signs_with_both_keys_then_with_the_new_key_only(store: LogStore):
    old, new = new_signer(), new_signer()
    keys = rotation(old, new, first=20, last=40)
    tlog = TransparencyLog(store, old, FAST, keys=keys, next_signer=new)
    await tlog.start()
    try:
        before = await append_and_anchor(tlog, "rx-before", 5)
        early = await tlog.inclusion_proof(0, before)
        await append_and_anchor(tlog, "rx-during", 60)
        cps = await tlog.checkpoints(limit=1000)
    finally:
        await tlog.stop()
    by_size = {cp.size: signed_by(cp.note) for cp in cps}
    assert {s for s, ids in by_size.items() if ids == {old.key_id}} == {
        s for s in by_size if s < 20
    }
    assert {s for s, ids in by_size.items() if ids == {old.key_id, new.key_id}} == {
        s for s in by_size if 20 <= s <= 40
    }
    assert {s for s, ids in by_size.items() if ids == {new.key_id}} == {
        s for s in by_size if s > 40
    }
    assert any(s > 40 for s in by_size) and any(20 <= s <= 40 for s in by_size)
    # The proof issued before still verifies with the old key alone, and with the key set.
    bundle = early.bundle()
    old_only = KeySet.single(old.verifier(), old.verifier_key)
    for held in (old_only, keys):
        cp = held.open_checkpoint(bundle["checkpoint"], tlog.origin).checkpoint
        verify_inclusion(0, cp.size, early.leaf_hash, early.path, cp.root_hash)


async def test_after_the_rotation_the_new_key_alone_carries_the_log_on(store: LogStore):
    """The operator's last step: the new key becomes RXLEDGER_SIGNING_KEY and the old private
    key is dropped; the stored checkpoints the old key signed still count (the key set lists it)."""
    old, new = new_signer(), new_signer()
    keys = rotation(old, new, first=0, last=5)
    tlog = TransparencyLog(store, old, FAST, keys=keys, next_signer=new)
    await tlog.start()
    try:
        await append_and_anchor(tlog, "rx-one", 3)
    finally:
        await tlog.stop()
    tlog = TransparencyLog(store, new, FAST, keys=keys)
    await tlog.start()
    try:
        size = await append_and_anchor(tlog, "rx-two", 5)
        assert tlog.anchor_error is None
        assert signed_by((await tlog.wait_anchored(size)).note) == {new.key_id}
        assert tlog.verifier_key == new.verifier_key
    finally:
        await tlog.stop()


async def test_a_database_writer_cannot_make_the_log_take_a_checkpoint_of_a_retired_key(
    store: LogStore,
):
    """Whoever holds the retired key and can write the database notarizes a checkpoint past
    the key's end and names it in the head: the log neither serves it nor signs after it."""
    old, new = new_signer(), new_signer()
    keys = rotation(old, new, first=0, last=2)
    tlog = TransparencyLog(store, new, FAST, keys=keys)
    await tlog.start()
    try:
        size = await append_and_anchor(tlog, "rx-x", 4)
        await tlog.stop()
        forged_size = size + 1
        forged = Checkpoint(tlog.origin, forged_size, bytes(32)).text()
        await store.notarizations.insert_one(
            {
                "_id": forged_size,
                "origin": tlog.origin,
                "size": forged_size,
                "rootHash": Binary(bytes(32)),
                "note": forged + "\n" + old.signature_line(forged),
                "anchoredAt": dt.datetime.now(dt.UTC),
            }
        )
        await store.leases.update_one(
            {"_id": tlog.origin},
            {"$set": {"newestCheckpoint": forged_size, "priorCheckpoint": size}},
        )
        assert await tlog.checkpoint(forged_size) is None
        tlog = TransparencyLog(store, new, FAST, keys=keys)
        await tlog.start()
        appended = await tlog.append("rx-x", 5, header("rx-x", 5))
        await tlog.wait_sequenced(appended.event_id)
        await until(lambda: tlog.anchor_error is not None, "the anchorer's refusal")
        assert "key out of range" in str(tlog.anchor_error)
    finally:
        await tlog.stop()


# --- the auditor's commands, given the key set file ---------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def rxledger(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


async def test_the_auditor_commands_verify_across_a_rotation_with_a_key_set_file(
    store: LogStore, mongo_uri: str, db_name: str, tmp_path: Path
):
    old, new = new_signer(), new_signer()
    keys = rotation(old, new, first=20, last=40)
    tlog = TransparencyLog(store, old, FAST, keys=keys, next_signer=new)
    await tlog.start()
    try:
        before = await append_and_anchor(tlog, "rx-before", 5)
        early = await tlog.inclusion_proof(0, before)
        after = await append_and_anchor(tlog, "rx-after", 60)
        late = await tlog.inclusion_proof(0, after)
        _, _, path = await tlog.consistency_proof(before, after)
    finally:
        await tlog.stop()
    assert after > 40 and signed_by(late.checkpoint.note) == {new.key_id}
    (tmp_path / "keys.txt").write_text("# the log's keys\n" + keys.text())
    (tmp_path / "old.key").write_text(old.verifier_key + "\n")
    (tmp_path / "early.json").write_text(json.dumps(early.bundle()))
    (tmp_path / "late.json").write_text(json.dumps(late.bundle()))
    # Whoever stole the retired key signs the newest tree with it alone.
    text = split_note(late.checkpoint.note)[0]
    stolen = {**late.bundle(), "checkpoint": text + "\n" + old.signature_line(text)}
    (tmp_path / "stolen.json").write_text(json.dumps(stolen))
    (tmp_path / "old.note").write_text(early.checkpoint.note)
    (tmp_path / "new.note").write_text(late.checkpoint.note)
    (tmp_path / "proof.json").write_text(
        json.dumps({"fromSize": before, "toSize": after, "path": [b64(h) for h in path]})
    )
    d = str(tmp_path)
    db = {"MONGODB_URI": mongo_uri, "RXLEDGER_DB": db_name, "RXLEDGER_ORIGIN": tlog.origin}
    runs = await asyncio.gather(
        *[
            asyncio.to_thread(rxledger, *args, **env)
            for args, env in [
                (("verify", f"{d}/early.json", "--key", f"{d}/old.key"), {}),
                (("verify", f"{d}/early.json", "--key", f"{d}/keys.txt"), {}),
                (("verify", f"{d}/late.json", "--key", f"{d}/keys.txt"), {}),
                (("verify", f"{d}/stolen.json", "--key", f"{d}/keys.txt"), {}),
                (
                    (
                        "verify-consistency",
                        f"{d}/old.note",
                        f"{d}/new.note",
                        "--proof",
                        f"{d}/proof.json",
                        "--key",
                        f"{d}/keys.txt",
                    ),
                    {},
                ),
                (("audit", "--quiet", "--key", f"{d}/keys.txt"), db),
            ]
        ]
    )
    old_label, new_label = f"{NAME}+{old.key_id.hex()}", f"{NAME}+{new.key_id.hex()}"
    with_old, early_with_set, late_with_set, with_stolen, consistency, audit = runs
    assert with_old.returncode == 0 and f"signed by {old_label};" in with_old.stdout
    assert early_with_set.returncode == 0 and f"signed by {old_label};" in early_with_set.stdout
    assert late_with_set.returncode == 0 and f"signed by {new_label};" in late_with_set.stdout
    assert with_stolen.returncode == 1
    assert "key out of range" in with_stolen.stderr + with_stolen.stdout
    assert consistency.returncode == 0, consistency.stderr
    assert f"size {before} signed by {old_label}, size {after} by {new_label}" in consistency.stdout
    assert audit.returncode == 0, audit.stdout + audit.stderr
    ranges = {
        label: (int(a), int(b))
        for label, a, b in re.findall(r"(\S+) \(sizes (\d+)\.\.(\d+)\)", audit.stdout)
    }
    assert set(ranges) == {old_label, new_label}
    assert ranges[old_label][1] <= 40 and 20 <= ranges[new_label][0] <= 40
    assert ranges[new_label][1] == after


# --- a gateway rotating while it is written to, subscribed to and witnessed --------------------

LEDGER_KEYS = """{ ledger {
  verifierKeys { key keyId fromSize untilSize current line }
  checkpoint { size note cosignatures { witness } }
} }"""


async def published_at(gw: Gateway, size: int, timeout: float = 60.0) -> dict[str, Any]:
    """The gateway's ledger once its published checkpoint covers `size` (with a witness
    quorum: once the witness has cosigned it)."""
    deadline = time.monotonic() + timeout
    async with http_client() as http:
        while True:
            ledger = (await graphql(http, gw, LEDGER_KEYS))["ledger"]
            if ledger["checkpoint"] and ledger["checkpoint"]["size"] >= size:
                return dict(ledger)
            assert time.monotonic() < deadline, f"no checkpoint of size {size} published"
            await asyncio.sleep(0.1)


async def test_a_gateway_rotates_its_key_while_writes_and_subscriptions_flow_and_its_witness_follows(
    start_gateway: StartGateway,  # noqa: F811 (the fixture imported above)
    client: Any,
    db_name: str,
    tmp_path: Path,
):
    name = GATEWAY_ORIGIN.split("/")[0]
    old_pem, new_pem, witness_pem = tmp_path / "old.pem", tmp_path / "new.pem", tmp_path / "w.pem"
    for pem in (old_pem, new_pem, witness_pem):
        write_new_key(pem)
    old = Signer(name, load_private_key(old_pem.read_bytes()))
    new = Signer(name, load_private_key(new_pem.read_bytes()))
    cosigner = Cosigner("w1.witness.test/a", load_private_key(witness_pem.read_bytes()))
    # Sizes 1..11 the old key alone, 12..25 both, 26 and above the new key alone.
    keys = rotation(old, new, first=12, last=25)
    (tmp_path / "keys.txt").write_text(keys.text())
    (tmp_path / "old.key").write_text(old.verifier_key + "\n")
    gw = await start_gateway(
        RXLEDGER_SIGNING_KEY=str(old_pem),
        RXLEDGER_NEXT_SIGNING_KEY=str(new_pem),
        RXLEDGER_LOG_KEYS=str(tmp_path / "keys.txt"),
        RXLEDGER_WITNESSES=cosigner.verifier_key,
        RXLEDGER_WITNESS_QUORUM="1",
        RXLEDGER_WITNESS_HOLD="1",
    )

    def witness(log_key: Path, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "app.cli",
            "witness",
            "--key",
            str(witness_pem),
            "--name",
            cosigner.name,
            "--log",
            f"{gw.base}/log",
            "--log-key",
            str(log_key),
            *extra,
        ]

    env = {k: v for k, v in os.environ.items() if not k.startswith("RXLEDGER_")}
    watcher = subprocess.Popen(
        witness(tmp_path / "keys.txt", "--state", str(tmp_path / "w.json"), "--interval", "0.1"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "witness.log").open("wb"),
    )
    try:
        first = await next_leaf_index(gw)  # size 1
        cps: dict[int, dict[str, Any]] = {}
        async with subscribed(gw, gw.token("AUDITOR", "aud-1"), first - 1) as socket:
            reading = asyncio.create_task(changes(socket, "events", 39))
            for target in (10, 18, 40):  # one phase of writes per stage of the rotation
                await issue_many(gw, target - first, concurrency=4)
                first = target
                ledger = await published_at(gw, target)
                cps[target] = ledger["checkpoint"]
            received = await reading
        assert indices(received) == list(range(1, 40))
    finally:
        watcher.terminate()
        watcher.wait(10)
    witness_log = (tmp_path / "witness.log").read_text()

    log_keys = {old.key_id, new.key_id}  # (the notes also carry the witness's line)
    assert signed_by(cps[10]["note"]) & log_keys == {old.key_id}
    assert signed_by(cps[18]["note"]) & log_keys == {old.key_id, new.key_id}
    assert signed_by(cps[40]["note"]) & log_keys == {new.key_id}
    for cp in cps.values():  # published only once the witness cosigned: it followed
        assert [c["witness"] for c in cp["cosignatures"]] == [cosigner.name]
    assert f"signature by {name}+{new.key_id.hex()}" in witness_log, witness_log
    # Every stored checkpoint verifies with the key set, the early ones with the old key alone.
    async for doc in client[db_name]["notarizations"].find({}):
        keys.open_checkpoint(doc["note"], GATEWAY_ORIGIN)
        if doc["_id"] < 12:
            KeySet.of([old.verifier()]).open_checkpoint(doc["note"], GATEWAY_ORIGIN)

    ledger = await published_at(gw, 40)
    assert [
        (k["key"], k["fromSize"], k["untilSize"], k["current"]) for k in ledger["verifierKeys"]
    ] == [
        (old.verifier_key, 0, 25, False),
        (new.verifier_key, 12, None, True),
    ]
    assert "".join(k["line"] + "\n" for k in ledger["verifierKeys"]) == keys.text()
    async with http_client() as http:
        ready = (await http.get(f"{gw.base}/readyz")).json()
    assert ready["sequencerError"] is None and ready["anchorError"] is None, ready

    # An auditor reading the tiles alone, with the key set, sees the new key sign.
    audited = await asyncio.to_thread(
        rxledger,
        "audit",
        "--quiet",
        "--from-tiles",
        f"{gw.base}/log",
        "--key",
        str(tmp_path / "keys.txt"),
    )
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert f"signed by {name}+{new.key_id.hex()} (sizes 40..40)" in audited.stdout

    # A witness that knows only the old key refuses what the new key alone signed.
    stale = await asyncio.to_thread(
        subprocess.run,
        witness(tmp_path / "old.key", "--state", str(tmp_path / "stale.json"), "--once"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stale.returncode == 1, stale.stderr
    assert "REFUSED" in stale.stderr and "unknown key" in stale.stderr, stale.stderr


def test_rotate_key_writes_the_key_set_that_hands_over_after_the_newest_checkpoint(
    mongo_uri: str, db_name: str, tmp_path: Path
):
    old_pem, new_pem = tmp_path / "old.pem", tmp_path / "new.pem"
    write_new_key(old_pem)
    write_new_key(new_pem)
    old = Signer(NAME, load_private_key(old_pem.read_bytes()))
    new = Signer(NAME, load_private_key(new_pem.read_bytes()))

    async def grow() -> int:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri, tz_aware=True)
        tlog = TransparencyLog(LogStore(client[db_name], "test.rxledger.example/log"), old, FAST)
        await tlog.start()
        try:
            return await append_and_anchor(tlog, "rx-r", 7)
        finally:
            await tlog.stop()
            await client.close()

    newest = asyncio.run(grow())
    env = {
        "MONGODB_URI": mongo_uri,
        "RXLEDGER_DB": db_name,
        "RXLEDGER_ORIGIN": "test.rxledger.example/log",
        "RXLEDGER_KEY_NAME": NAME,
        "RXLEDGER_SIGNING_KEY": str(old_pem),
    }
    keys_file = tmp_path / "keys.txt"
    args = ("rotate-key", "--new", str(new_pem), "--out", str(keys_file))
    done = rxledger(*args, "--transition", "5", **env)
    assert done.returncode == 0, done.stderr
    keys = parse_key_set(keys_file.read_text())
    assert [(k.vkey, k.first, k.last) for k in keys.keys] == [
        (old.verifier_key, 0, newest + 5),  # both sign newest+1 .. newest+5
        (new.verifier_key, newest + 1, None),
    ]
    assert f"RXLEDGER_NEXT_SIGNING_KEY={new_pem}" in done.stderr
    leaked = rxledger(*args[:-1], str(tmp_path / "leaked.txt"), "--transition", "0", **env)
    assert leaked.returncode == 0, leaked.stderr
    assert [
        (k.first, k.last) for k in parse_key_set((tmp_path / "leaked.txt").read_text()).keys
    ] == [
        (0, newest),  # the leaked key signs nothing more
        (newest + 1, None),
    ]
    with_set = {**env, "RXLEDGER_LOG_KEYS": str(keys_file)}
    again = rxledger(*args, **with_set)
    assert again.returncode == 2 and "already in the key set" in again.stderr
    newer = tmp_path / "newer.pem"
    write_new_key(newer)
    too_early = rxledger(
        "rotate-key", "--new", str(newer), "--from", str(newest), "--out", str(keys_file), **env
    )
    assert too_early.returncode == 2
    assert f"checkpoint {newest} is signed already" in too_early.stderr


# --- configuration ---------------------------------------------------------------------------


@pytest.fixture
def key_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    for variable in [v for v in os.environ if v.startswith("RXLEDGER_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("RXLEDGER_MODE", "development")
    monkeypatch.setenv("RXLEDGER_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("RXLEDGER_KEY_NAME", NAME)
    old_pem, new_pem = tmp_path / "old.pem", tmp_path / "new.pem"
    write_new_key(old_pem)
    write_new_key(new_pem)
    return old_pem, new_pem


def test_a_gateway_misconfigured_for_a_rotation_does_not_start(
    key_files: tuple[Path, Path], mongo_uri: str, db_name: str, tmp_path: Path
):
    old_pem, new_pem = key_files
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())],
        cwd=ROOT,
        env=env_for(
            mongo_uri,
            db_name,
            tmp_path,
            RXLEDGER_SIGNING_KEY=str(old_pem),
            RXLEDGER_NEXT_SIGNING_KEY=str(new_pem),
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "RXLEDGER_NEXT_SIGNING_KEY needs RXLEDGER_LOG_KEYS" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_next_key_without_a_key_set_or_a_key_set_without_the_keys_is_refused(
    key_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    old_pem, new_pem = key_files
    monkeypatch.setenv("RXLEDGER_SIGNING_KEY", str(old_pem))
    monkeypatch.setenv("RXLEDGER_NEXT_SIGNING_KEY", str(new_pem))
    settings = Settings.from_env()
    with pytest.raises(ConfigError, match="RXLEDGER_NEXT_SIGNING_KEY needs RXLEDGER_LOG_KEYS"):
        settings.key_set(settings.signer(), settings.next_signer())
    stranger = new_signer()
    (tmp_path / "keys.txt").write_text(f"{stranger.verifier_key}\n")
    monkeypatch.setenv("RXLEDGER_LOG_KEYS", str(tmp_path / "keys.txt"))
    settings = Settings.from_env()
    with pytest.raises(ConfigError, match="RXLEDGER_SIGNING_KEY: its verifier key .* is not in"):
        settings.key_set(settings.signer(), settings.next_signer())
    (tmp_path / "keys.txt").write_text("not a key\n")
    with pytest.raises(ConfigError, match="line 1"):
        settings.key_set(settings.signer(), settings.next_signer())


def test_the_patient_tags_stay_the_same_once_the_new_key_replaces_the_signing_key(
    key_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
):
    old_pem, new_pem = key_files

    def patient_tag() -> str:
        settings = Settings.from_env()
        return Tags(settings.derived_keys(settings.signer()).tags).patient("pt-1")

    monkeypatch.setenv("RXLEDGER_SIGNING_KEY", str(old_pem))
    before = patient_tag()
    monkeypatch.setenv("RXLEDGER_SIGNING_KEY", str(new_pem))
    assert patient_tag() != before  # why RXLEDGER_TAG_KEY exists
    monkeypatch.setenv("RXLEDGER_TAG_KEY", str(old_pem))
    assert patient_tag() == before


def test_the_keys_derived_from_the_old_key_replace_it_and_sign_nothing(
    key_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from app.derived_keys import DerivedKeys
    from app.webhooks import SecretBox

    old_pem, new_pem = key_files
    monkeypatch.setenv("RXLEDGER_SIGNING_KEY", str(old_pem))
    settings = Settings.from_env()
    before = settings.derived_keys(settings.signer())
    sealed = SecretBox.for_log(settings.webhooks, before).seal("whep_a", "whsec_x")
    derived = tmp_path / "derived.keys"
    done = rxledger("derive-keys", "--key", str(old_pem), "--out", str(derived))
    assert done.returncode == 0, done.stderr
    assert derived.stat().st_mode & 0o777 == 0o600
    assert f"RXLEDGER_TAG_KEY={derived}" in done.stderr
    assert "PRIVATE KEY" not in derived.read_text()

    old_pem.unlink()  # retired
    monkeypatch.setenv("RXLEDGER_SIGNING_KEY", str(new_pem))
    monkeypatch.setenv("RXLEDGER_TAG_KEY", str(derived))
    settings = Settings.from_env()
    after = settings.derived_keys(settings.signer())
    assert after == before
    assert SecretBox.for_log(settings.webhooks, after).open("whep_a", sealed) == "whsec_x"
    assert Tags(after.tags).patient("pt-1") == Tags(before.tags).patient("pt-1")
    # Without --key: what the gateway keys them with now (here RXLEDGER_TAG_KEY's), so that
    # a later rotation's copy is still the first key's.
    copied = tmp_path / "copied.keys"
    assert rxledger("derive-keys", "--out", str(copied)).returncode == 0
    assert DerivedKeys.parse(copied.read_text()) == before

    again = rxledger("derive-keys", "--key", str(new_pem), "--out", str(derived))
    assert again.returncode == 2 and "--force" in again.stderr
    assert DerivedKeys.parse(derived.read_text()) == before  # untouched
    monkeypatch.setenv("RXLEDGER_SIGNING_KEY", str(derived))  # it is no signing key
    with pytest.raises(ConfigError):
        Settings.from_env().signer()


@pytest.mark.parametrize(
    "text, problem",
    [
        ("tags AAAA\n", "holds 3 bytes"),
        ("tags " + "A" * 43 + "=\n", "no webhooks line"),
        ("nonsense\n", "line 1 must read"),
        ("tags !!!\nwebhooks x\n", "tags is not base64"),
    ],
)
def test_a_tag_key_file_that_is_no_key_and_no_derived_keys_is_a_config_error(
    key_files: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    problem: str,
):
    old_pem, _ = key_files
    bad = tmp_path / "bad.keys"
    bad.write_text(text)
    monkeypatch.setenv("RXLEDGER_SIGNING_KEY", str(old_pem))
    monkeypatch.setenv("RXLEDGER_TAG_KEY", str(bad))
    settings = Settings.from_env()
    with pytest.raises(ConfigError, match=f"neither a private key .*{re.escape(problem)}"):
        settings.derived_keys(settings.signer())


async def test_a_mirror_follows_the_log_across_a_rotation_with_its_key_set(
    store: LogStore, tmp_path
):
    """A mirror given the key set copies checkpoints signed before, during and after the
    transition; given only the old key, it refuses the new key's checkpoint and keeps its own."""
    from anchoring.mirror import DatabaseSource, Mirror, MirrorRefused

    old, new = new_signer(), new_signer()
    keys = rotation(old, new, first=0, last=5)
    tlog = TransparencyLog(store, old, FAST, keys=keys, next_signer=new)
    await tlog.start()
    try:
        before = await append_and_anchor(tlog, "rx-m", 3)
        with_old_key_only = Mirror(tmp_path / "old-key", [old.verifier()])
        with_set = Mirror(tmp_path / "key-set", keys)
        assert (await with_old_key_only.sync(DatabaseSource(store))).size == before
        assert (await with_set.sync(DatabaseSource(store))).size == before
    finally:
        await tlog.stop()
    tlog = TransparencyLog(store, new, FAST, keys=keys)
    await tlog.start()
    try:
        after = await append_and_anchor(tlog, "rx-n", 6)
        assert signed_by((await tlog.wait_anchored(after)).note) == {new.key_id}
        assert (await with_set.sync(DatabaseSource(store))).size == after
        with pytest.raises(MirrorRefused, match="not signed by a log key"):
            await with_old_key_only.sync(DatabaseSource(store))
        held = with_old_key_only.held()
        assert held is not None and held[1].size == before
    finally:
        await tlog.stop()
