"""The log read by an independent client: Go's golang.org/x/mod/sumdb/tlog and sumdb/note
(tests/interop/) verify the checkpoint, authenticate every tile against its root, prove
entries from their entry bundles included, and prove old checkpoints consistent. And the
client must be able to fail: another key, a tampered tile or entry, a forked history.

One gateway serves the module's log of 600 entries (full and partial level-0 tiles and a
level-1 tile); tampering is done in the database and read through a fresh gateway process,
since a gateway keeps the tiles it has written or served in memory."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from bson import Binary
from conftest import run_go
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymongo import AsyncMongoClient, MongoClient
from pymongo.collection import Collection
from pymongo.database import Database
from test_gateway import ORIGIN, env_for, running_gateway

from anchoring.cosignature import Cosigner
from anchoring.encoding import b64
from anchoring.ledger import Ledger
from anchoring.note import Signer, open_checkpoint, parse_verifier_key
from anchoring.store import LogStore

ROOT = Path(__file__).resolve().parent.parent
INTEROP = ROOT / "tests" / "interop"
KEY_NAME = ORIGIN.split("/")[0]
AT = "2025-01-02T03:04:05.000Z"  # fixed, so that two logs given the same events share leaves


# --- the Go client ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def interop_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/interop built once; the first build downloads golang.org/x/mod through the Go
    module proxy (GOPROXY), later ones use the module cache."""
    binary = tmp_path_factory.mktemp("interop-bin") / "interop"
    run_go(
        ["build", "-o", str(binary), "."],
        "tests/interop",
        cwd=INTEROP,
        GOFLAGS="-mod=readonly -buildvcs=false",
    )
    return binary


def interop(binary: Path, base: str, vkey: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), "-url", f"{base}/log", "-vkey", vkey, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def passes(run: subprocess.CompletedProcess[str]) -> dict:
    assert run.returncode == 0, f"the Go client failed: {run.stderr}"
    assert run.stderr == ""
    summary: dict = json.loads(run.stdout)
    return summary


def fails(run: subprocess.CompletedProcess[str], reason: str) -> str:
    assert run.returncode == 1, f"the Go client should have failed; it said {run.stdout!r}"
    assert run.stdout == ""
    assert re.search(reason, run.stderr), run.stderr
    return run.stderr


# --- gateways and their logs -------------------------------------------------------------------


def append(mongo_uri: str, db_name: str, subjects: list[str]) -> None:
    """Append one event per subject straight to the log, as another gateway process's
    group-committing appender would (far faster than mutations over HTTP on FerretDB); the
    running gateway's sequencer sequences and anchors them, in this order."""

    async def write() -> None:
        client: AsyncMongoClient[dict] = AsyncMongoClient(mongo_uri, tz_aware=True)
        appender = Ledger(LogStore(client[db_name], ORIGIN))
        try:
            await asyncio.gather(
                *(
                    appender.append(
                        s, 1, {"v": 1, "subject": s, "version": 1, "type": "ISSUED", "at": AT}
                    )
                    for s in subjects
                )
            )
        finally:
            await appender.close()
            await client.close()

    asyncio.run(write())


def checkpoint_size(note: str) -> int:
    return int(note.split("\n")[1])


def wait_for_checkpoint(base: str, size: int, timeout: float = 60.0) -> str:
    """The published checkpoint note once it covers `size` leaves."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{base}/log/checkpoint", timeout=5)
        if r.status_code == 200 and checkpoint_size(r.text) >= size:
            return r.text
        assert time.monotonic() < deadline, f"no checkpoint of size {size} within {timeout} s"
        time.sleep(0.1)


@dataclass
class Log:
    base: str
    env: dict[str, str]
    db: Database[dict]
    var_dir: Path
    tmp: Path
    vkey: str
    witness: Cosigner
    note: str  # the published checkpoint of all 600 entries, cosigned by the witness
    old: dict[int, Path] = field(default_factory=dict)  # older checkpoints saved by size


SIZES = (256, 300, 600)  # one full tile; then a partial one; then 0/000 0/001 0/002.p/88 1/000.p/2


@pytest.fixture(scope="module")
def log(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Log]:
    tmp = tmp_path_factory.mktemp("interop")
    db_name = f"t_interop_{uuid.uuid4().hex[:12]}"
    witness = Cosigner("witness.interop.test", Ed25519PrivateKey.generate())
    env = env_for(mongo_uri, db_name, tmp, RXLEDGER_WITNESSES=witness.verifier_key)
    client: MongoClient[dict] = MongoClient(mongo_uri)
    try:
        with running_gateway(env, tmp / "gateway.log") as base:
            vkey = httpx.post(
                f"{base}/graphql", json={"query": "{ ledger { verifierKey } }"}, timeout=10
            ).json()["data"]["ledger"]["verifierKey"]
            old = {}
            done = 0
            for size in SIZES:
                append(mongo_uri, db_name, [f"rx-interop-{i:04d}" for i in range(done, size)])
                note = wait_for_checkpoint(base, size)
                assert checkpoint_size(note) == size
                old[size] = tmp / f"checkpoint-{size}"
                old[size].write_text(note)
                done = size
            # A witness cosigns the last one (the log accepts its key, needs no quorum): the
            # published note then carries a signature line of another type, which a
            # checkpoint reader must ignore.
            text = note[: note.index("\n\n") + 1]
            r = httpx.post(
                f"{base}/log/cosignature", content=note + witness.cosign(text).line, timeout=10
            )
            assert r.status_code == 200 and r.json()["cosignedBy"] == [witness.name], r.text
            deadline = time.monotonic() + 10
            while witness.name not in note:
                assert time.monotonic() < deadline, "the cosignature was not published"
                time.sleep(0.1)
                note = wait_for_checkpoint(base, SIZES[-1])
            yield Log(base, env, client[db_name], tmp / "var", tmp, vkey, witness, note, old)
    finally:
        client.drop_database(db_name)
        client.close()


@pytest.fixture(scope="module")
def fork(mongo_uri: str, log: Log) -> Iterator[Log]:
    """Another log in another database under the same origin and signing key: the first 256
    of the module log's events, then 256 others. Its checkpoints verify with the log's key."""
    tmp = log.tmp / "fork"
    tmp.mkdir()
    db_name = f"t_interop_fork_{uuid.uuid4().hex[:12]}"
    env = {**env_for(mongo_uri, db_name, tmp), "RXLEDGER_VAR_DIR": str(log.var_dir)}
    client: MongoClient[dict] = MongoClient(mongo_uri)
    try:
        with running_gateway(env, log.tmp / "gateway-fork.log") as base:
            old = {}
            for size, subjects in (
                (256, [f"rx-interop-{i:04d}" for i in range(256)]),
                (512, [f"rx-fork-{i:04d}" for i in range(256)]),
            ):
                append(mongo_uri, db_name, subjects)
                note = wait_for_checkpoint(base, size)
                assert checkpoint_size(note) == size
                old[size] = tmp / f"checkpoint-{size}"
                old[size].write_text(note)
            db = client[db_name]

            def leaves(d: Database[dict]) -> list[bytes]:
                return [bytes(e["leaf"]) for e in d.entries.find({"_id": {"$lt": 256}}).sort("_id")]

            assert leaves(db) == leaves(log.db), "the fork should share the log's first tile"
            yield Log(base, env, db, log.var_dir, tmp, log.vkey, log.witness, note, old)
    finally:
        client.drop_database(db_name)
        client.close()


# --- the log as the Go client reads it ---------------------------------------------------------


@pytest.mark.parametrize("old_size", SIZES)
def test_go_client_verifies_the_log_and_proves_an_old_checkpoint_consistent(
    interop_client, log, old_size
):
    assert log.note.count("\n— ") == 2, "the checkpoint should carry the witness's cosignature"
    cp = open_checkpoint(log.note, [parse_verifier_key(log.vkey)], ORIGIN)
    summary = passes(
        interop(
            interop_client, log.base, log.vkey, "-old", str(log.old[old_size]), "-samples", "1000"
        )
    )
    assert summary == {
        "origin": ORIGIN,
        "size": 600,
        "root": b64(cp.root_hash),
        "checked": 600,
        "consistentWith": old_size,
    }


def test_go_client_proves_a_random_sample_when_the_log_is_larger(interop_client, log):
    summary = passes(interop(interop_client, log.base, log.vkey, "-samples", "20", "-seed", "7"))
    assert summary["size"] == 600 and summary["checked"] == 20
    assert summary["consistentWith"] is None


def test_go_client_reads_a_tree_of_whole_tiles(interop_client, fork):
    # 512 leaves: two full level-0 tiles and entry bundles, no partial one at level 0.
    summary = passes(
        interop(
            interop_client, fork.base, fork.vkey, "-old", str(fork.old[256]), "-samples", "1000"
        )
    )
    assert summary["size"] == 512 and summary["checked"] == 512
    assert summary["consistentWith"] == 256


# --- the Go client must be able to fail --------------------------------------------------------


def test_go_client_rejects_a_checkpoint_signed_by_another_key(interop_client, log):
    # The same key name, another key: the note's signature is by a key the client does not know.
    other = Signer(KEY_NAME, Ed25519PrivateKey.generate()).verifier_key
    fails(interop(interop_client, log.base, other), "checkpoint: .*verif")


def test_go_client_rejects_an_old_checkpoint_signed_by_another_key(interop_client, log):
    forged = log.tmp / "forged-checkpoint"
    text = log.note[: log.note.index("\n\n") + 1]
    forged.write_text(Signer(KEY_NAME, Ed25519PrivateKey.generate()).sign_note(text))
    fails(interop(interop_client, log.base, log.vkey, "-old", str(forged)), "old checkpoint")


def test_go_client_rejects_an_old_checkpoint_of_a_forked_history(interop_client, log, fork):
    # The fork is signed by the same key under the same origin and shares the first 256
    # leaves; its checkpoint of 512 is not a prefix of the log's 600.
    fails(
        interop(interop_client, log.base, log.vkey, "-old", str(fork.old[512])),
        "not consistent with old checkpoint 512",
    )


@contextmanager
def tampered(collection: Collection[dict], _id: object, field_name: str, at: int) -> Iterator[None]:
    """One byte of a stored document's binary field flipped, restored afterwards."""
    doc = collection.find_one({"_id": _id})
    assert doc is not None, f"no {collection.name} document {_id!r}"
    original = bytes(doc[field_name])
    changed = bytearray(original)
    changed[at] ^= 0x01
    collection.update_one({"_id": _id}, {"$set": {field_name: Binary(bytes(changed))}})
    try:
        yield
    finally:
        collection.update_one({"_id": _id}, {"$set": {field_name: Binary(original)}})


@pytest.mark.parametrize(
    ("tile", "at"),
    [
        ("0/0", 5 * 32),  # a full level-0 tile: the hash of leaf 5
        ("0/2.p/88", 87 * 32 + 31),  # the partial right edge: the hash of leaf 599
    ],
)
def test_go_client_rejects_a_tampered_tile(interop_client, log, tile, at):
    # The serving gateway keeps the tiles it wrote in memory; a fresh one reads the database.
    with (
        tampered(log.db.tiles, tile, "hashes", at),
        running_gateway(log.env, log.tmp / f"gateway-tile-{tile.replace('/', '-')}.log") as base,
    ):
        fails(interop(interop_client, base, log.vkey, "-samples", "1000"), "inconsistent tile")


def test_go_client_rejects_a_tampered_entry(interop_client, log):
    with (
        tampered(log.db.entries, 300, "leaf", 10),
        running_gateway(log.env, log.tmp / "gateway-entry.log") as base,
    ):
        fails(
            interop(interop_client, base, log.vkey, "-samples", "1000"),
            r"entry 300 of tree size 600 .*leaf hash from the entry bundle",
        )


# --- HTTP semantics of the tlog-tiles endpoints ------------------------------------------------


def test_tiles_and_entry_bundles_are_immutable_octets(log):
    for path, length in (
        ("tile/0/000", 256 * 32),
        ("tile/0/002.p/88", 88 * 32),
        ("tile/0/002.p/5", 5 * 32),  # a narrower partial tile of the tree is served too
        ("tile/1/000.p/2", 2 * 32),
        ("tile/entries/001", None),
        ("tile/entries/002.p/88", None),
    ):
        r = httpx.get(f"{log.base}/log/{path}", headers={"Accept-Encoding": "identity"})
        assert r.status_code == 200, (path, r.text)
        assert r.headers["content-type"] == "application/octet-stream", path
        assert "immutable" in r.headers["cache-control"], path
        assert "content-encoding" not in r.headers, path
        if length is not None:
            assert len(r.content) == length, path
    narrow = httpx.get(f"{log.base}/log/tile/0/002.p/5").content
    assert httpx.get(f"{log.base}/log/tile/0/002.p/88").content.startswith(narrow)


def test_an_entry_bundle_sent_gzipped_decodes_to_the_same_bytes(log):
    url = f"{log.base}/log/tile/entries/002.p/88"
    plain = httpx.get(url, headers={"Accept-Encoding": "identity"}).content
    with httpx.stream("GET", url, headers={"Accept-Encoding": "gzip"}) as r:
        assert r.headers["content-encoding"] == "gzip"
        assert "accept-encoding" in r.headers["vary"].lower()
        raw = b"".join(r.iter_raw())
    assert gzip.decompress(raw) == plain
    leaves = [bytes(e["leaf"]) for e in log.db.entries.find({"_id": {"$gte": 512}}).sort("_id")]
    assert plain == b"".join(len(leaf).to_bytes(2, "big") + leaf for leaf in leaves)


@pytest.mark.parametrize(
    ("accept", "gzipped"),
    [
        ("gzip;q=0", False),
        ("gzip; q=0.000, identity", False),
        ("GZIP", True),
        ("br, gzip;q=0.5", True),
        ("*", True),
        ("*;q=0", False),
        ("identity", False),
        ("br", False),
        ("gzip;q=0, *", False),
    ],
)
def test_an_entry_bundle_is_gzipped_only_when_the_client_accepts_gzip(log, accept, gzipped):
    url = f"{log.base}/log/tile/entries/002.p/88"
    with httpx.stream("GET", url, headers={"Accept-Encoding": accept}) as r:
        assert r.status_code == 200
        assert (r.headers.get("content-encoding") == "gzip") is gzipped, r.headers


def test_the_checkpoint_is_text_that_caches_may_keep_only_briefly(log):
    r = httpx.get(f"{log.base}/log/checkpoint")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    cache = r.headers["cache-control"]
    max_age = re.search(r"max-age=(\d+)", cache)
    assert max_age is not None and int(max_age.group(1)) <= 10, cache
    assert "immutable" not in cache
    assert r.text == log.note


@pytest.mark.parametrize(
    "path",
    [
        "tile/0/003",
        "tile/0/002",
        "tile/0/002.p/89",
        "tile/1/000",
        "tile/2/000.p/1",
        "tile/entries/003",
        "tile/entries/002",
    ],
)
def test_a_tile_beyond_the_tree_is_not_found_and_not_cached(log, path):
    r = httpx.get(f"{log.base}/log/{path}")
    assert r.status_code == 404, r.text
    assert r.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    "path",
    [
        "tile/0/1",
        "tile/0/x000/001",
        "tile/0/001.p/256",
        "tile/0/001.p/0",
        "tile/0/001.p/007",
        "tile/8/0/000",  # Go's go.sum layout, with the tile height: not tlog-tiles
        "tile/entries/1",
        "tile/00/000",
        "tile/0/x001",
    ],
)
def test_a_malformed_tile_path_is_not_found(log, path):
    assert httpx.get(f"{log.base}/log/{path}").status_code == 404
