"""Witnesses against the real server: the log waits for a quorum of cosignatures before it
publishes a checkpoint; real gateways and the real `rxledger witness` process cosign them,
and refuse a log that rolls back or shows a second history (a split view)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymongo import MongoClient
from test_gateway import ORIGIN, env_for, free_port, serve, wait_healthy

from anchoring.anchorer import AnchorSettings
from anchoring.cosignature import Cosigner, cosignatures, parse_witness_key
from anchoring.errors import CosignatureRejected, ProofUnavailable
from anchoring.ledger import Ledger
from anchoring.log import LogSettings, TransparencyLog
from anchoring.note import (
    Checkpoint,
    Signer,
    Verifier,
    load_private_key,
    open_checkpoint,
    parse_checkpoint,
    split_note,
)
from anchoring.remote import RemoteLog
from anchoring.sequencer import SequencerSettings
from anchoring.store import LogStore
from anchoring.witness import Witness
from app.settings import write_new_key
from app.witness import witness_once

ROOT = Path(__file__).resolve().parent.parent


def header(subject: str, version: int) -> dict[str, object]:
    return {"v": 1, "subject": subject, "version": version, "type": "TEST"}


def note_body(note: str) -> str:
    return note[: note.rfind("\n\n") + 1]


# --- the log: publishing waits for the quorum ------------------------------------------------


def witness_set(count: int) -> list[Cosigner]:
    return [Cosigner(f"w{i}.witness.test", Ed25519PrivateKey.generate()) for i in range(count)]


def settings_for(witnesses: list[Cosigner], quorum: int, witness_hold: float = 0.0) -> LogSettings:
    """Log settings; checkpoints are not held for witnesses unless `witness_hold` says so,
    for tests that cosign by hand the checkpoint of a size they choose."""
    return LogSettings(
        sequencer=SequencerSettings(poll_interval=0.02, lease_ttl=2.0),
        anchor=AnchorSettings(interval=0.05, max_leaves=1000),
        witnesses=tuple(parse_witness_key(w.verifier_key) for w in witnesses),
        quorum=quorum,
        witness_hold=witness_hold,
    )


async def signed_checkpoint(tlog: TransparencyLog, size: int):
    """The newest signed checkpoint, once it is of `size`."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        cp = await tlog.newest_checkpoint()
        if cp is not None and cp.size == size:
            return cp
        await asyncio.sleep(0.05)
    pytest.fail(f"no checkpoint of size {size} was signed within 15 s")


async def appended(tlog: TransparencyLog, subject: str, count: int) -> None:
    for v in range(1, count + 1):
        await tlog.append(subject, v, header(subject, v))


async def sequenced_rounds_later(tlog: TransparencyLog, subject: str, version: int) -> int:
    """Append versions `version` and `version + 1` of `subject`, each once the one before is
    sequenced: the second is sequenced in a later round of the sequencer than the first, so the
    round that sequenced the first, with all it does after sequencing (anchor, publish), is over.
    Proof that the sequencer has moved on, however slow the machine. The next version."""
    for v in (version, version + 1):
        got = await tlog.append(subject, v, header(subject, v))
        await tlog.wait_sequenced(got.event_id, timeout=15)
    return version + 2


async def test_a_checkpoint_is_published_only_once_its_quorum_has_cosigned(store, signer):
    w1, w2, w3 = witness_set(3)
    tlog = TransparencyLog(store, signer, settings_for([w1, w2, w3], quorum=2))
    await tlog.start()
    try:
        await appended(tlog, "rx-q", 5)
        await signed_checkpoint(tlog, 5)
        # A newer checkpoint signed: the round that signed checkpoint 5, where a log that did
        # not wait for its witnesses would have published it, is over. Nothing is published.
        await appended_more(tlog, "rx-q", 6, 6)
        cp = await signed_checkpoint(tlog, 6)
        assert await tlog.latest_checkpoint() is None
        status = await tlog.witness_status()
        assert status["required"] == 2 and status["newestSignedSize"] == 6
        assert status["publishedSize"] is None
        assert status["missing"] == ["w0.witness.test", "w1.witness.test", "w2.witness.test"]

        one = await tlog.add_cosignatures(cp.note + w1.cosign(note_body(cp.note)).line)
        assert [c.name for c in one.cosignatures] == ["w0.witness.test"]
        assert await tlog.latest_checkpoint() is None  # 1 of 2
        status = await tlog.witness_status()
        assert status["cosignedNewest"] == ["w0.witness.test"]
        assert status["missing"] == ["w1.witness.test", "w2.witness.test"]

        line2 = w2.cosign(note_body(cp.note)).line
        two = await tlog.add_cosignatures(cp.note + line2)
        published = await tlog.latest_checkpoint()
        assert published is not None and published.size == 6
        assert [c.name for c in two.cosignatures] == ["w0.witness.test", "w1.witness.test"]
        assert (await tlog.witness_status())["missing"] == []

        # The published note is the log's note followed by the cosignatures, which verify.
        assert published.note == cp.note
        assert published.witnessed_note.startswith(cp.note)
        assert line2 in published.witnessed_note
        text, found = cosignatures(published.witnessed_note, list(tlog.settings.witnesses))
        assert text == note_body(cp.note) and len(found) == 2
        assert open_checkpoint(published.witnessed_note, [signer.verifier()]).size == 6
        doc = await store.notarizations.find_one({"_id": 6})
        assert sorted(c["name"] for c in doc["cosignatures"].values()) == [
            "w0.witness.test",
            "w1.witness.test",
        ]

        # Proofs are against published checkpoints only, and carry the cosignatures.
        proof = await tlog.inclusion_proof(2)
        assert proof.bundle()["checkpoint"] == published.witnessed_note
    finally:
        await tlog.stop()


async def test_a_checkpoint_waiting_for_witnesses_is_used_for_no_proof_and_not_listed(
    store, signer
):
    (w1,) = witness_set(1)
    tlog = TransparencyLog(store, signer, settings_for([w1], quorum=1))
    await tlog.start()
    try:
        await appended(tlog, "rx-wait", 3)
        first = await signed_checkpoint(tlog, 3)
        await tlog.add_cosignatures(first.note + w1.cosign(note_body(first.note)).line)
        await appended_more(tlog, "rx-wait", 4, 6)
        waiting = await signed_checkpoint(tlog, 6)
        assert (await tlog.latest_checkpoint()).size == 3
        listed = [cp.size for cp in await tlog.checkpoints()]
        assert listed[-1] == 3 and 6 not in listed  # smaller ones the log signed on the way: yes
        with pytest.raises(ProofUnavailable, match="no published checkpoint of tree size 6"):
            await tlog.inclusion_proof(1, tree_size=6)
        with pytest.raises(ProofUnavailable, match="no published checkpoint of tree size 6"):
            await tlog.consistency_proof(3, to_size=6)
        assert (await tlog.inclusion_proof(1)).tree_size == 3

        await tlog.add_cosignatures(waiting.note + w1.cosign(note_body(waiting.note)).line)
        assert (await tlog.inclusion_proof(1, tree_size=6)).tree_size == 6
        assert (await tlog.checkpoints())[-1].size == 6
    finally:
        await tlog.stop()


async def appended_more(tlog: TransparencyLog, subject: str, first: int, last: int) -> None:
    for v in range(first, last + 1):
        await tlog.append(subject, v, header(subject, v))


async def test_while_witnesses_cosign_a_checkpoint_no_newer_one_replaces_it(store, signer):
    """Each witness cosigns the newest checkpoint it sees: were a newer one signed at every
    interval while writes go on, witnesses polling out of step would never cosign the same
    one and nothing would be published."""
    (w,) = witness_set(1)
    tlog = TransparencyLog(store, signer, settings_for([w], quorum=1, witness_hold=30))
    await tlog.start()
    try:
        await appended(tlog, "rx-hold", 1)
        held = await signed_checkpoint(tlog, 1)
        await appended_more(tlog, "rx-hold", 2, 6)
        # Wait until, by the anchorer's own clock and the sequenced size, a newer checkpoint
        # is due, then until the sequencer has finished a round after that: one that would
        # have signed it, were checkpoint 1 not held for its witness.
        deadline = time.monotonic() + 15
        while tlog.sequencer.size < 6 or not tlog.anchorer.due(tlog.sequencer.size):
            assert time.monotonic() < deadline, "no newer checkpoint became due within 15 s"
            await asyncio.sleep(0.01)
        size = await sequenced_rounds_later(tlog, "rx-hold", 7) - 1
        assert (await tlog.newest_checkpoint()).size == 1
        status = await tlog.witness_status()
        interval = tlog.settings.anchor.interval
        assert status["missing"] == ["w0.witness.test"] and status["waitingSeconds"] >= interval

        await tlog.add_cosignatures(held.note + w.cosign(note_body(held.note)).line)
        assert (await tlog.latest_checkpoint()).size == 1
        await signed_checkpoint(tlog, size)  # published: the next one follows
    finally:
        await tlog.stop()


async def test_a_checkpoint_its_witnesses_do_not_cosign_is_replaced_after_the_hold(store, signer):
    (w,) = witness_set(1)
    tlog = TransparencyLog(store, signer, settings_for([w], quorum=1, witness_hold=0.5))
    await tlog.start()
    try:
        await appended(tlog, "rx-hold", 1)
        await signed_checkpoint(tlog, 1)
        await appended_more(tlog, "rx-hold", 2, 3)
        await signed_checkpoint(tlog, 3)  # after 0.5 s, without any cosignature
        assert await tlog.latest_checkpoint() is None
    finally:
        await tlog.stop()


async def test_a_late_quorum_for_an_older_checkpoint_does_not_move_the_head_back(store, signer):
    w1, w2 = witness_set(2)
    tlog = TransparencyLog(store, signer, settings_for([w1, w2], quorum=2))
    await tlog.start()
    try:
        await appended(tlog, "rx-a", 3)
        first = await signed_checkpoint(tlog, 3)
        await tlog.add_cosignatures(first.note + w1.cosign(note_body(first.note)).line)
        await appended(tlog, "rx-b", 4)
        second = await signed_checkpoint(tlog, 7)
        await tlog.add_cosignatures(second.note + w1.cosign(note_body(second.note)).line)
        assert await tlog.latest_checkpoint() is None
        await tlog.add_cosignatures(second.note + w2.cosign(note_body(second.note)).line)
        assert (await tlog.latest_checkpoint()).size == 7
        # Checkpoint 3 reaches its quorum after 7 was published: 7 stays the head.
        late = await tlog.add_cosignatures(first.note + w2.cosign(note_body(first.note)).line)
        assert len(late.cosignatures) == 2
        assert (await tlog.latest_checkpoint()).size == 7
        status = await tlog.witness_status()
        assert status["publishedSize"] == 7 and status["missing"] == []
    finally:
        await tlog.stop()


async def test_cosignatures_the_log_cannot_accept_are_rejected_and_not_stored(store, signer):
    w1, w2, stranger = witness_set(3)
    tlog = TransparencyLog(store, signer, settings_for([w1, w2], quorum=2))
    await tlog.start()
    try:
        await appended(tlog, "rx-r", 4)
        cp = await signed_checkpoint(tlog, 4)
        body = note_body(cp.note)

        with pytest.raises(CosignatureRejected, match="no cosignature by a witness this log"):
            await tlog.add_cosignatures(cp.note + stranger.cosign(body).line)
        with pytest.raises(CosignatureRejected, match=r"configured: w0\.witness\.test, w1"):
            await tlog.add_cosignatures(cp.note)  # the log's own signature is no cosignature

        # A checkpoint of the same size with another root, even one signed by the log's key:
        # this log never made it (it is what a split view would show someone else).
        other = Checkpoint(ORIGIN, 4, bytes(32)).text()
        forged = signer.sign_note(other) + w1.cosign(other).line
        with pytest.raises(CosignatureRejected, match="has not signed that checkpoint of size 4"):
            await tlog.add_cosignatures(forged)
        beyond = Checkpoint(cp.origin, 99, cp.root_hash).text()
        with pytest.raises(CosignatureRejected, match="size 99"):
            await tlog.add_cosignatures(signer.sign_note(beyond) + w1.cosign(beyond).line)

        line = w1.cosign(body).line
        prefix, _, blob = line[:-1].rpartition(" ")
        raw = bytearray(base64.b64decode(blob))
        raw[40] ^= 0x01  # in the Ed25519 signature
        tampered = f"{prefix} {base64.b64encode(bytes(raw)).decode()}\n"
        with pytest.raises(CosignatureRejected, match="does not verify"):
            await tlog.add_cosignatures(cp.note + tampered)
        with pytest.raises(CosignatureRejected, match="malformed"):
            await tlog.add_cosignatures("garbage")

        doc = await store.notarizations.find_one({"_id": 4})
        assert "cosignatures" not in doc
        assert await tlog.latest_checkpoint() is None
    finally:
        await tlog.stop()


async def test_the_same_witness_cosigning_again_keeps_its_first_cosignature(store, signer):
    """The served note of a checkpoint stops changing once its witnesses have cosigned: a
    witness's later (or replayed) line does not replace its first."""
    w1, w2, w3 = witness_set(3)
    tlog = TransparencyLog(store, signer, settings_for([w1, w2, w3], quorum=3))
    await tlog.start()
    try:
        await appended(tlog, "rx-i", 2)
        cp = await signed_checkpoint(tlog, 2)
        body = note_body(cp.note)
        await tlog.add_cosignatures(cp.note + w1.cosign(body, 1000).line)
        again = await tlog.add_cosignatures(cp.note + w1.cosign(body, 2000).line)
        assert [(c.name, c.timestamp) for c in again.cosignatures] == [("w0.witness.test", 1000)]
        # Several cosignatures in one note are all taken.
        both = await tlog.add_cosignatures(
            cp.note + w2.cosign(body).line + w3.cosign(body).line + w1.cosign(body, 2000).line
        )
        assert [c.name for c in both.cosignatures] == [
            "w0.witness.test",
            "w1.witness.test",
            "w2.witness.test",
        ]
        doc = await store.notarizations.find_one({"_id": 2})
        assert len(doc["cosignatures"]) == 3
        assert (await tlog.latest_checkpoint()).size == 2
        stored = await tlog.checkpoint(2)
        assert stored.witnessed_note == cp.note + "".join(c.line for c in both.cosignatures)
    finally:
        await tlog.stop()


async def test_a_published_checkpoint_is_not_lost_to_the_sequencer_writing_the_head(store, signer):
    """On a server whose updates read, modify and write back the whole document (FerretDB v1),
    two concurrent updates of the head can lose one: a cosigned checkpoint named in the head
    while the sequencer renews its lease must stay named."""
    (w,) = witness_set(1)
    # Renewals every 20 ms or so: the head is written all the time.
    settings = dataclasses.replace(
        settings_for([w], quorum=1),
        sequencer=SequencerSettings(poll_interval=0.01, lease_ttl=0.06),
    )
    tlog = TransparencyLog(store, signer, settings)
    await tlog.start()
    try:
        for size in range(1, 21):
            await tlog.append("rx-head", size, header("rx-head", size))
            cp = await signed_checkpoint(tlog, size)
            await tlog.add_cosignatures(cp.note + w.cosign(note_body(cp.note)).line)
            await lease_renewals(store, 3)  # each a write of the head
            head = await store.head()
            assert head.get("checkpointSize") == size, f"checkpoint {size} lost from the head"
    finally:
        await tlog.stop()


async def lease_renewals(store: LogStore, count: int) -> None:
    """Wait until the leader has written the head `count` more times (each write sets a new
    lease expiry)."""
    deadline = time.monotonic() + 15
    seen = (await store.head()).get("expiresAt")
    while count:
        assert time.monotonic() < deadline, f"the lease was not renewed {count} more times"
        expires = (await store.head()).get("expiresAt")
        if expires != seen:
            seen, count = expires, count - 1
        else:
            await asyncio.sleep(0.005)


async def test_witnesses_cosigning_at_the_same_moment_all_count(store, signer):
    """Two cosignatures of one checkpoint arriving together both stay (a server whose updates
    read, modify and write back the whole document could lose one of them)."""
    w1, w2, w3 = witness_set(3)
    tlog = TransparencyLog(store, signer, settings_for([w1, w2, w3], quorum=3))
    await tlog.start()
    try:
        for size in range(1, 16):
            await tlog.append("rx-together", size, header("rx-together", size))
            cp = await signed_checkpoint(tlog, size)
            body = note_body(cp.note)
            await asyncio.gather(
                *[tlog.add_cosignatures(cp.note + w.cosign(body).line) for w in (w1, w2, w3)]
            )
            doc = await store.notarizations.find_one({"_id": size})
            assert len(doc.get("cosignatures", {})) == 3, f"checkpoint {size}: {doc}"
            assert (await tlog.latest_checkpoint()).size == size
    finally:
        await tlog.stop()


async def test_cosignatures_taken_by_a_process_that_does_not_lead_are_published_by_the_leader(
    store, signer
):
    """Only the sequencer's leader writes the head; a gateway that does not lead stores the
    cosignatures, and the leader sees the quorum and publishes."""
    w1, w2 = witness_set(2)
    settings = settings_for([w1, w2], quorum=2)
    leader = TransparencyLog(store, signer, settings)
    other = TransparencyLog(store, signer, settings)
    await leader.start()
    await other.start(sequence=False)
    try:
        await appended(other, "rx-other", 4)
        cp = await signed_checkpoint(leader, 4)
        body = note_body(cp.note)
        for w in (w1, w2):
            await other.add_cosignatures(cp.note + w.cosign(body).line)
        assert not other.sequencer.is_leader
        deadline = time.monotonic() + 5
        while (await store.head()).get("checkpointSize") != 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (await other.latest_checkpoint()).size == 4
        assert len((await leader.latest_checkpoint()).cosignatures) == 2
    finally:
        await other.stop()
        await leader.stop()


async def test_without_a_quorum_checkpoints_are_published_when_signed(store, signer):
    w1, w2 = witness_set(2)
    tlog = TransparencyLog(store, signer, settings_for([w1, w2], quorum=0))
    await tlog.start()
    try:
        await appended(tlog, "rx-z", 6)
        cp = await tlog.wait_anchored(6)
        assert cp.size == 6 and cp.cosignatures == ()
        assert (await tlog.witness_status())["missing"] == []
        # Witnesses may still cosign; their lines are kept and shown.
        cosigned = await tlog.add_cosignatures(cp.note + w2.cosign(note_body(cp.note)).line)
        assert [c.name for c in cosigned.cosignatures] == ["w1.witness.test"]
        latest = await tlog.latest_checkpoint()
        assert latest.witnessed_note == cp.note + cosigned.cosignatures[0].line
    finally:
        await tlog.stop()


def test_a_quorum_larger_than_the_witnesses_is_refused():
    w1, w2 = witness_set(2)
    with pytest.raises(ValueError, match="a quorum of 3 witnesses needs"):
        settings_for([w1, w2], quorum=3)
    with pytest.raises(ValueError, match="a quorum of 1 witnesses needs"):
        LogSettings(quorum=1)
    with pytest.raises(ValueError):
        settings_for([w1], quorum=-1)


# --- real gateways and real witnesses --------------------------------------------------------


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass(frozen=True)
class WitnessKey:
    name: str
    pem: Path
    vkey: str  # cosignature/v1 verifier key, as `--print-key` prints it

    @property
    def verifier(self) -> Verifier:
        return parse_witness_key(self.vkey)


@dataclass(frozen=True)
class Keys:
    log_pem: Path
    log_vkey: str
    w1: WitnessKey
    w2: WitnessKey
    w3: WitnessKey  # not configured in any log


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    tmp = tmp_path_factory.mktemp("witness-keys")
    log_pem = tmp / "log.pem"
    write_new_key(log_pem)
    log_vkey = Signer(ORIGIN.split("/")[0], load_private_key(log_pem.read_bytes())).verifier_key
    names = ["w1.witness.test/a", "w2.witness.test/b", "w3.witness.test/c"]

    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args],
            cwd=ROOT,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    made = [
        start("keygen", "--name", n, "--out", str(tmp / f"w{i}.pem")) for i, n in enumerate(names)
    ]
    note_keys = []
    for proc in made:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        note_keys.append(out.strip())
    printed = [
        start("witness", "--key", str(tmp / f"w{i}.pem"), "--name", n, "--print-key")
        for i, n in enumerate(names)
    ]
    witnesses = []
    for i, (proc, note_key) in enumerate(zip(printed, note_keys, strict=True)):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        vkey = out.strip()
        # The same Ed25519 key: as a note key (0x01) from keygen, as a witness key (0x04) here.
        as_witness = base64.b64decode(vkey.split("+", 2)[2])
        as_note = base64.b64decode(note_key.split("+", 2)[2])
        assert (as_witness[0], as_note[0], as_witness[1:]) == (0x04, 0x01, as_note[1:])
        assert vkey.split("+")[1] != note_key.split("+")[1]
        assert parse_witness_key(vkey).name == names[i]
        witnesses.append(WitnessKey(names[i], tmp / f"w{i}.pem", vkey))
    return Keys(log_pem, log_vkey, *witnesses)


@dataclass
class Gateway:
    base: str
    db: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def log(self) -> str:
        return f"{self.base}/log"


@pytest.fixture(scope="module")
def gateways(
    mongo_uri: str, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Gateway]]:
    """Two gateways with the same signing key and origin, on two databases: A, the log the
    witnesses follow, and B, a second history of it (a split view). Both require 2 of w1, w2."""
    started = []
    for which in ("a", "b"):
        tmp = tmp_path_factory.mktemp(f"gateway-{which}")
        db = f"t_{uuid.uuid4().hex[:12]}"
        env = env_for(
            mongo_uri,
            db,
            tmp,
            RXLEDGER_SIGNING_KEY=str(keys.log_pem),
            RXLEDGER_WITNESSES=f"{keys.w1.vkey} {keys.w2.vkey}",
            RXLEDGER_WITNESS_QUORUM="2",
            # A checkpoint waits this long for its witnesses before a newer one is signed:
            # short here, where tests wait for checkpoints of sizes they choose.
            RXLEDGER_WITNESS_HOLD="1" if which == "a" else "0",
        )
        base, proc = serve(env, tmp / "gateway.log")
        started.append(Gateway(base, db, proc, tmp / "gateway.log"))
    try:
        for gw in started:
            wait_healthy(gw.base, gw.proc, gw.log_path)
        yield started[0], started[1]
    finally:
        for gw in started:
            gw.proc.terminate()
        with MongoClient(mongo_uri, serverSelectionTimeoutMS=5000) as client:
            for gw in started:
                try:
                    gw.proc.wait(10)
                except subprocess.TimeoutExpired:
                    gw.proc.kill()
                client.drop_database(gw.db)


@pytest.fixture(scope="module")
def log_a(gateways: tuple[Gateway, Gateway]) -> Gateway:
    return gateways[0]


@pytest.fixture(scope="module")
def log_b(gateways: tuple[Gateway, Gateway]) -> Gateway:
    return gateways[1]


async def append_events(client, gw: Gateway, subject: str, count: int) -> None:
    """Append as another gateway process would (its appender), for `gw` to sequence."""
    ledger = Ledger(LogStore(client[gw.db], ORIGIN))
    try:
        await asyncio.gather(
            *[ledger.append(subject, v, header(subject, v)) for v in range(1, count + 1)]
        )
    finally:
        await ledger.close()


def newest(gw: Gateway) -> Checkpoint | None:
    r = httpx.get(f"{gw.log}/next-checkpoint", timeout=5)
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    return parse_checkpoint(split_note(r.text)[0])


def wait_signed(gw: Gateway, size: int) -> Checkpoint:
    """Wait until the newest signed checkpoint is of `size`."""
    deadline = time.monotonic() + 20
    cp = None
    while time.monotonic() < deadline:
        cp = newest(gw)
        if cp is not None and cp.size == size:
            return cp
        time.sleep(0.05)
    pytest.fail(f"{gw.base}: no checkpoint of size {size} signed within 20 s (newest {cp})")


def tree_size(gw: Gateway) -> int:
    return int(httpx.get(f"{gw.base}/readyz", timeout=5).json()["treeSize"])


def wait_quiet(gw: Gateway, size: int) -> Checkpoint:
    """Wait until the tree has `size` leaves and the newest checkpoint covers them."""
    deadline = time.monotonic() + 20
    while tree_size(gw) < size and time.monotonic() < deadline:
        time.sleep(0.05)
    return wait_signed(gw, size)


def published(gw: Gateway) -> httpx.Response:
    return httpx.get(f"{gw.log}/checkpoint", timeout=5)


def readyz(gw: Gateway) -> tuple[int, dict]:
    r = httpx.get(f"{gw.base}/readyz", timeout=5)
    return r.status_code, r.json()


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RXLEDGER_")}


def witness_args(key: WitnessKey, url: str, keys: Keys, state: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "app.cli",
        "witness",
        "--key",
        str(key.pem),
        "--name",
        key.name,
        "--log",
        url,
        "--log-key",
        keys.log_vkey,
        "--state",
        str(state),
    ]


def witness_cli(
    key: WitnessKey, gw: Gateway | str, keys: Keys, state: Path
) -> subprocess.CompletedProcess[str]:
    """`rxledger witness --once`, to completion."""
    url = gw.log if isinstance(gw, Gateway) else gw
    return subprocess.run(
        [*witness_args(key, url, keys, state), "--once"],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def log_verifier(keys: Keys) -> Verifier:
    return Signer(ORIGIN.split("/")[0], load_private_key(keys.log_pem.read_bytes())).verifier()


def gql(gw: Gateway, query: str) -> dict:
    r = httpx.post(f"{gw.base}/graphql", json={"query": query}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert "errors" not in body, body
    return body["data"]


async def test_a_gateway_publishes_a_checkpoint_once_two_witness_processes_cosigned_it(
    log_a, keys, client, tmp_path
):
    # This test runs first on gateway A: nothing has been published there yet.
    await append_events(client, log_a, "rx-quorum", 20)
    cp = wait_quiet(log_a, 20)

    r = published(log_a)
    assert r.status_code == 404, "nothing may be published before two witnesses cosigned"
    assert "witnesses" in r.text
    status, ready = readyz(log_a)
    assert status == 200
    witnesses = ready["witnesses"]
    assert witnesses["required"] == 2 and witnesses["newestSignedSize"] == 20
    assert witnesses["publishedSize"] is None
    assert witnesses["missing"] == [keys.w1.name, keys.w2.name]
    if witnesses["waitingSeconds"] < 4.5:  # within the grace period: not yet degraded
        assert ready["status"] == "ok"

    # After the grace (max(5 s, 5 × 0.1 s)) the gateway says it is degraded, and why; it
    # stays ready (200): writes and reads go on.
    deadline = time.monotonic() + 20
    while not ready["status"].startswith("degraded") and time.monotonic() < deadline:
        time.sleep(0.2)
        status, ready = readyz(log_a)
    assert status == 200
    assert ready["status"] == (
        f"degraded: checkpoint 20 waits for 2 of 2 witnesses; missing: {keys.w1.name}, "
        f"{keys.w2.name}"
    )
    assert ready["witnesses"]["waitingSeconds"] >= 5

    w1 = witness_cli(keys.w1, log_a, keys, tmp_path / "w1.json")
    assert w1.returncode == 0, w1.stderr
    assert "cosigned checkpoint 20" in w1.stderr and "(published)" not in w1.stderr
    assert published(log_a).status_code == 404
    status, ready = readyz(log_a)
    assert ready["witnesses"]["cosignedNewest"] == [keys.w1.name]
    assert ready["witnesses"]["missing"] == [keys.w2.name]
    assert ready["status"].endswith(f"missing: {keys.w2.name}")
    assert json.loads((tmp_path / "w1.json").read_text())["size"] == 20

    w2 = witness_cli(keys.w2, log_a, keys, tmp_path / "w2.json")
    assert w2.returncode == 0, w2.stderr
    assert "cosigned checkpoint 20 (published)" in w2.stderr

    r = published(log_a)
    assert r.status_code == 200
    note = r.text
    opened = open_checkpoint(note, [log_verifier(keys)], ORIGIN)
    assert (opened.size, opened.root_hash) == (20, cp.root_hash)
    _, found = cosignatures(note, [keys.w1.verifier, keys.w2.verifier])
    assert sorted(c.name for c in found) == [keys.w1.name, keys.w2.name]
    assert len(split_note(note)[1]) == 3  # the log's signature and two cosignatures
    status, ready = readyz(log_a)
    assert ready["status"] == "ok" and ready["witnesses"]["missing"] == []
    assert ready["witnesses"]["publishedSize"] == 20

    data = gql(
        log_a,
        """{ ledger { verifierKey checkpoint { size note
              cosignatures { witness keyId cosignedAt line } }
            inclusionProof(leafIndex: 7) { bundle } } }""",
    )["ledger"]
    assert data["verifierKey"] == keys.log_vkey
    assert data["checkpoint"]["size"] == 20 and data["checkpoint"]["note"] == note
    shown = {c["witness"]: c for c in data["checkpoint"]["cosignatures"]}
    assert set(shown) == {keys.w1.name, keys.w2.name}
    for c in found:
        assert shown[c.name]["keyId"] == c.key_id.hex()
        assert shown[c.name]["line"] + "\n" == c.line
        assert shown[c.name]["line"] + "\n" in note
        assert dt.datetime.fromisoformat(shown[c.name]["cosignedAt"]).timestamp() == c.timestamp
        assert abs(c.timestamp - time.time()) < 120

    bundle = json.loads(data["inclusionProof"]["bundle"])
    assert bundle["checkpoint"] == note  # with the cosignature lines
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    verified = cli("verify", str(path), "--key", keys.log_vkey, "--origin", ORIGIN)
    assert verified.returncode == 0, verified.stderr
    assert (
        verified.stdout.startswith("OK: leaf 7 is included") and "tree size 20" in verified.stdout
    )


async def test_running_witnesses_cosign_new_checkpoints_as_the_log_grows(
    log_a, keys, client, tmp_path
):
    said = [tmp_path / f"{i}.err" for i in range(2)]

    def start_witness(i: int, w: WitnessKey) -> subprocess.Popen:
        with said[i].open("w") as err:  # a file, to read while it runs
            return subprocess.Popen(
                [*witness_args(w, log_a.log, keys, tmp_path / f"{i}.json"), "--interval", "0.2"],
                cwd=ROOT,
                env=cli_env(),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    procs = [start_witness(i, w) for i, w in enumerate((keys.w1, keys.w2))]

    def diagnosis() -> str:
        return (
            f"readyz: {readyz(log_a)[1]}\nwitnesses said:\n"
            + "".join(f.read_text() for f in said)
            + "gateway log (tail):\n"
            + log_a.log_path.read_text()[-3000:]
        )

    try:
        start = tree_size(log_a)
        sizes = []
        for round_, count in enumerate((7, 5)):
            await append_events(client, log_a, f"rx-grow-{uuid.uuid4().hex[:6]}-{round_}", count)
            target = start + sum((7, 5)[: round_ + 1])
            deadline = time.monotonic() + 30
            size = -1
            while time.monotonic() < deadline:
                r = published(log_a)
                if r.status_code == 200:
                    size = parse_checkpoint(split_note(r.text)[0]).size
                    if size == target:
                        break
                assert all(p.poll() is None for p in procs), "a witness exited"
                time.sleep(0.1)
            assert size == target, f"published {size}, want {target}\n{diagnosis()}"
            sizes.append(size)
            found = cosignatures(published(log_a).text, [keys.w1.verifier, keys.w2.verifier])
            assert len(found[1]) == 2
        assert sizes == [start + 7, start + 12]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait(timeout=15)
    for p, f in zip(procs, said, strict=True):
        err = f.read_text()
        assert p.returncode == 0, err
        assert "Traceback" not in err
        assert f"cosigned checkpoint {start + 12}" in err
    for i in range(2):
        assert json.loads((tmp_path / f"{i}.json").read_text())["size"] == start + 12


async def test_a_witness_refuses_a_second_history_under_the_same_key_and_origin(
    log_a, log_b, keys, client, tmp_path
):
    state = tmp_path / "w1.json"
    n = tree_size(log_a) + 6
    await append_events(client, log_a, f"rx-a-{uuid.uuid4().hex[:6]}", 6)
    wait_quiet(log_a, n)
    first = witness_cli(keys.w1, log_a, keys, state)
    assert first.returncode == 0, first.stderr
    assert f"cosigned checkpoint {n}" in first.stderr
    cosigned = state.read_bytes()
    assert json.loads(cosigned)["size"] == n

    cases = [
        (n - 3, [f"checkpoint size {n - 3} is smaller than {n}, which I cosigned", "rolled back"]),
        (n, [f"checkpoint {n} has root", "the log shows two different trees"]),
        (n + 4, [f"checkpoint {n + 4} is not consistent with checkpoint {n}", "forked"]),
    ]
    done = tree_size(log_b)
    assert done == 0, "gateway B's history is made only here"
    for size, reasons in cases:
        await append_events(client, log_b, f"rx-b-{size}", size - done)
        done = size
        b = wait_quiet(log_b, size)
        # B's checkpoint is genuinely signed by the log's key: a split view, not a forgery.
        note_b = httpx.get(f"{log_b.log}/next-checkpoint", timeout=5).text
        assert open_checkpoint(note_b, [log_verifier(keys)], ORIGIN) == b
        if size == n:
            assert b.root_hash != base64.b64decode(json.loads(cosigned)["rootHash"])
        refused = witness_cli(keys.w1, log_b, keys, state)
        assert refused.returncode == 1, refused.stderr
        assert "REFUSED" in refused.stderr, refused.stderr
        for reason in reasons:
            assert reason in refused.stderr, refused.stderr
        assert state.read_bytes() == cosigned

    # B got no cosignature and published nothing; A, unchanged, is still cosigned.
    docs = await client[log_b.db]["notarizations"].find({}).to_list()
    assert docs and all(not d.get("cosignatures") for d in docs)
    assert published(log_b).status_code == 404
    assert readyz(log_b)[1]["witnesses"]["cosignedNewest"] == []
    again = witness_cli(keys.w1, log_a, keys, state)
    assert again.returncode == 0, again.stderr
    assert state.read_bytes() == cosigned


# --- what the witness and the log say when something is wrong ------------------------------


def test_a_missing_witness_key_says_how_to_create_one(tmp_path):
    missing = tmp_path / "keys" / "w.pem"
    out = cli("witness", "--key", str(missing), "--name", "w.example/x", "--print-key")
    assert out.returncode == 2
    assert f"create one with: rxledger keygen --name w.example/x --out {missing}" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_witness_needs_the_log_and_its_key(keys, tmp_path):
    base = ["witness", "--key", str(keys.w1.pem), "--name", keys.w1.name, "--once"]
    for extra in (["--log-key", keys.log_vkey], ["--log", "http://127.0.0.1:1/log"]):
        out = cli(*base, *extra, "--state", str(tmp_path / "s.json"))
        assert out.returncode == 2, out.stderr
        assert "--log URL and --log-key VKEY are required" in out.stderr
    assert not (tmp_path / "s.json").exists()


def test_an_unreachable_log_is_reported_once_with_exit_2(keys, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/log"
    out = witness_cli(keys.w1, url, keys, tmp_path / "s.json")
    assert out.returncode == 2, out.stderr
    assert "cannot reach the log" in out.stderr and url in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "s.json").exists()


async def unwitnessed_checkpoint(client, gw: Gateway) -> int:
    """Grow `gw`'s log by one entry and wait for its checkpoint, which no witness has seen."""
    size = tree_size(gw) + 1
    await append_events(client, gw, f"rx-one-{uuid.uuid4().hex[:8]}", 1)
    wait_quiet(gw, size)
    return size


async def test_a_log_rejecting_the_cosignature_shows_the_logs_reason(log_a, keys, client, tmp_path):
    await unwitnessed_checkpoint(client, log_a)
    out = witness_cli(keys.w3, log_a, keys, tmp_path / "w3.json")
    assert out.returncode == 2, out.stderr
    assert "HTTP 422" in out.stderr
    assert (
        "the note carries no cosignature by a witness this log accepts "
        f"(configured: {keys.w1.name}, {keys.w2.name})"
    ) in out.stderr


async def test_a_log_rejecting_the_cosignature_is_not_reported_as_unreachable(
    log_a, keys, client, tmp_path
):
    # The log answered; it refused. "cannot reach the log … retrying" sends the operator to
    # look at the network, and --once does not retry.
    await unwitnessed_checkpoint(client, log_a)
    out = witness_cli(keys.w3, log_a, keys, tmp_path / "w3.json")
    assert "no cosignature by a witness this log accepts" in out.stderr
    assert "cannot reach the log" not in out.stderr, out.stderr
    assert "retrying" not in out.stderr, out.stderr


async def test_a_witness_the_log_does_not_accept_is_not_told_it_succeeded(
    log_a, keys, client, tmp_path
):
    # Once w1 has cosigned the newest checkpoint, the note a witness fetches carries w1's line;
    # w3 (not configured in the log) appends its own and posts it. The log takes w1's line
    # again and ignores w3's (200, cosignedBy: [w1]); w3 must not report that it was taken.
    size = await unwitnessed_checkpoint(client, log_a)
    w1 = witness_cli(keys.w1, log_a, keys, tmp_path / "w1.json")
    assert w1.returncode == 0 and f"cosigned checkpoint {size}" in w1.stderr, w1.stderr
    out = witness_cli(keys.w3, log_a, keys, tmp_path / "w3.json")
    assert out.returncode != 0, out.stderr
    assert f"cosigned checkpoint {size}" not in out.stderr, out.stderr


async def test_a_witness_sends_its_cosignature_again_when_the_log_has_lost_it(
    log_a, keys, client, tmp_path
):
    """A log may lose a cosignature it took (a lost concurrent update, a restored backup): the
    witness sees its line missing from the checkpoint and sends it again."""
    size = await unwitnessed_checkpoint(client, log_a)
    cosigner = Cosigner(keys.w1.name, load_private_key(keys.w1.pem.read_bytes()))
    witness = Witness(cosigner, log_verifier(keys), tmp_path / "w1.json")
    notarizations = client[log_a.db]["notarizations"]
    field = f"cosignatures.k{cosigner.key_id.hex()}"
    async with RemoteLog(log_a.log) as remote:
        assert (await witness_once(witness, remote))[1] == f"cosigned checkpoint {size}"
        await served_with_cosignature(log_a, keys.w1, True)  # (the served note is cached)
        assert await witness_once(witness, remote) == (size, None)  # nothing to send again

        await notarizations.update_one({"_id": size}, {"$unset": {field: ""}})
        await served_with_cosignature(log_a, keys.w1, False)
        assert (await witness_once(witness, remote))[1] == f"cosigned checkpoint {size}"
    doc = await notarizations.find_one({"_id": size})
    line = doc["cosignatures"][field.split(".")[1]]["line"]
    assert [c.name for c in cosignatures(doc["note"] + line, [keys.w1.verifier])[1]] == [
        keys.w1.name
    ]


async def served_with_cosignature(gw: Gateway, witness: WitnessKey, present: bool) -> None:
    """Wait until the note /log/next-checkpoint serves carries `witness`'s cosignature (or,
    with `present` False, no longer does)."""
    deadline = time.monotonic() + 15
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            r = await http.get(f"{gw.log}/next-checkpoint")
            assert r.status_code == 200, r.text
            found = cosignatures(r.text, [witness.verifier])[1]
            if bool(found) == present:
                return
            assert time.monotonic() < deadline, f"served note, present={present}: {r.text}"
            await asyncio.sleep(0.05)


def test_a_corrupt_state_file_is_a_clear_error_not_a_traceback(log_a, keys, tmp_path):
    state = tmp_path / "w1.json"
    state.write_text("{not json")
    out = witness_cli(keys.w1, log_a, keys, state)
    assert "Traceback" not in out.stderr, out.stderr[-1500:]
    assert out.returncode == 2, out.stderr[-1500:]
    assert str(state) in out.stderr and "not valid" in out.stderr
    assert state.read_text() == "{not json"  # kept for the operator to look at


def test_a_witness_given_a_witness_key_as_the_log_key_does_not_cosign(log_a, keys, tmp_path):
    out = cli(
        "witness",
        "--key",
        str(keys.w1.pem),
        "--name",
        keys.w1.name,
        "--log",
        log_a.log,
        "--log-key",
        keys.w2.vkey,
        "--state",
        str(tmp_path / "s.json"),
        "--once",
    )
    assert out.returncode != 0
    assert "0x01" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"garbage", 422, "COSIGNATURE_REJECTED"),
        (b"", 422, "COSIGNATURE_REJECTED"),
        (b"o\n1\nAAAA\n\n\xe2\x80\x94 x AAAAAAAA\n", 422, "COSIGNATURE_REJECTED"),
        (b"\xff\xfe not utf-8\n", 400, "MALFORMED"),
        (b"a" * (64 * 1024 + 1), 413, "REQUEST_TOO_LARGE"),
    ],
    ids=["garbage", "empty", "unsigned", "not-utf8", "too-large"],
)
def test_a_bad_cosignature_post_gets_a_json_error(log_a, body, status, code):
    r = httpx.post(f"{log_a.log}/cosignature", content=body, timeout=10)
    assert r.status_code == status, r.text
    if status == 413:
        # The gateway's body limit (RXLEDGER_MAX_BODY_BYTES, 64 KiB) answers before the
        # endpoint does, in the GraphQL error shape.
        error = r.json()["errors"][0]
        assert error["extensions"]["code"] == code and error["message"]
        return
    error = r.json()["error"]
    assert error["code"] == code and error["message"]


def test_a_checkpoint_size_of_thousands_of_digits_is_rejected_not_a_server_error(log_a):
    body = f"o\n{'9' * 5000}\nAAAA\n\n\u2014 x AAAAAAAA\n".encode()
    r = httpx.post(f"{log_a.log}/cosignature", content=body, timeout=10)
    assert r.status_code == 422, r.text
    assert "is above 2^64 - 1" in r.json()["error"]["message"]


def test_a_cosignature_dated_in_the_future_is_rejected(log_a, keys):
    """A witness with a broken clock must not store a time GraphQL cannot even render."""
    note = httpx.get(f"{log_a.log}/next-checkpoint", timeout=5).text
    cosigner = Cosigner(keys.w1.name, load_private_key(keys.w1.pem.read_bytes()))
    line = cosigner.cosign(note_body(note), timestamp=2**62).line
    lines = [x for x in note.split("\n\n", 1)[1].splitlines(True) if keys.w1.name not in x]
    r = httpx.post(
        f"{log_a.log}/cosignature", content=note_body(note) + "\n" + "".join(lines) + line
    )
    assert r.status_code == 422, r.text
    assert "in the future" in r.json()["error"]["message"]
    out = gql(log_a, "{ ledger { checkpoint { cosignatures { cosignedAt } } } }")
    assert "errors" not in out, out


def test_the_logs_own_note_posted_back_is_rejected(log_a, keys):
    witnessed = httpx.get(f"{log_a.log}/next-checkpoint", timeout=5).text
    # The log's signature is the first line after the body; cosignatures follow it.
    body, signatures = witnessed.split("\n\n", 1)
    note = body + "\n\n" + signatures.split("\n")[0] + "\n"
    assert open_checkpoint(note, [log_verifier(keys)])
    r = httpx.post(f"{log_a.log}/cosignature", content=note.encode(), timeout=10)
    assert r.status_code == 422
    assert "no cosignature by a witness this log accepts" in r.json()["error"]["message"]
