"""Auditor tools against a real gateway: `rxledger export-proof` (one bundle per event, the same
JSON as GraphQL history.bundle) and `rxledger audit --from-tiles` (the whole log checked through
its tlog-tiles alone, and each kind of tampering reported)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bson import Binary
from pymongo import AsyncMongoClient, MongoClient
from test_gateway import ORIGIN
from test_prescriptions import (
    LIMITS,
    Databases,
    Gateway,
    Parties,
    call,
    launch,
    running,
    verify_offline,
    wait_for,
)

from anchoring.ledger import Ledger
from anchoring.store import LogStore

ROOT = Path(__file__).resolve().parent.parent

HISTORY = """query($id: ID!) { prescription(id: $id) {
  history { version type bundle proof { treeSize } }
} }"""


def rxledger(*args: str, gw: Gateway | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RXLEDGER_")}
    if gw is not None:
        environment.update(RXLEDGER_DB=gw.db, RXLEDGER_VAR_DIR=str(gw.var_dir))
    environment.update(RXLEDGER_ORIGIN=ORIGIN, **env)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def gw(
    mongo_uri: str,
    databases: Databases,
    tmp_path_factory: pytest.TempPathFactory,
) -> Any:
    launched = launch(mongo_uri, databases.new(), tmp_path_factory.mktemp("auditor"), **LIMITS)
    with running(launched) as (gateway,):
        yield gateway


def anchored_history(p: Parties, rid: str, versions: int) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        history = p.gw.data(HISTORY, p.admin, id=rid)["prescription"]["history"]
        if len(history) == versions and all(e["bundle"] for e in history):
            return list(history)
        return None

    found: list[dict[str, Any]] = wait_for(ready, f"{rid} anchored")
    return found


# --- export-proof --------------------------------------------------------------------------


def test_export_proof_writes_each_events_bundle_as_graphql_returns_it_and_each_verifies(
    gw: Gateway, mongo_uri: str, tmp_path: Path
) -> None:
    p = Parties(gw)
    rid = p.issued()
    assert call(gw, p.pharmacist, "dispensePrescription", id=rid, expectedVersion=1)["version"] == 2
    history = anchored_history(p, rid, 2)
    out = tmp_path / "proofs"
    done = rxledger(
        "export-proof", "--prescription", rid, "--out", str(out), gw=gw, MONGODB_URI=mongo_uri
    )
    assert done.returncode == 0, done.stderr
    assert "OK: 2 bundles" in done.stdout
    files = sorted(f.name for f in out.iterdir())
    assert files == ["v1-ISSUED.json", "v2-DISPENSED.json", "verifier.key"]
    assert (out / "verifier.key").read_text().strip() == gw.verifier_key()
    # No write happened since the query, so both were proved against the same checkpoint.
    for event, name in zip(history, files[:2], strict=True):
        assert json.loads((out / name).read_text()) == json.loads(event["bundle"])
    verify_offline(
        [(out / name).read_text() for name in files[:2]], str(out / "verifier.key"), tmp_path
    )


def test_export_proof_writes_no_bundle_for_a_ledger_leaf_the_signed_tree_does_not_hold(
    gw: Gateway, mongo_uri: str, tmp_path: Path
) -> None:
    p = Parties(gw)
    rid = p.issued()
    anchored_history(p, rid, 1)
    ledger = MongoClient(mongo_uri)[gw.db]["ledger"]
    event = ledger.find_one({"subject": rid, "version": 1})
    header = {**event["header"], "actor": "PRESCRIBER:mallory"}
    forged = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    ledger.update_one({"_id": event["_id"]}, {"$set": {"header": header, "leaf": Binary(forged)}})
    out = tmp_path / "proofs"
    done = rxledger(
        "export-proof", "--prescription", rid, "--out", str(out), "--wait", "0", gw=gw,
        MONGODB_URI=mongo_uri,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "TAMPERED: version 1" in done.stderr, done.stderr
    assert not (out / "v1-ISSUED.json").exists()


def test_export_proof_of_an_unknown_prescription_says_so(
    gw: Gateway, mongo_uri: str, tmp_path: Path
) -> None:
    done = rxledger(
        "export-proof", "--prescription", "rx-nope", "--out", str(tmp_path), gw=gw,
        MONGODB_URI=mongo_uri,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no prescription 'rx-nope' in the ledger" in done.stderr


def test_export_proof_into_a_path_that_is_a_file_exits_2_and_names_it(
    gw: Gateway, mongo_uri: str, tmp_path: Path
) -> None:
    rid = Parties(gw).issued()
    taken = tmp_path / "taken"
    taken.write_text("not a directory")
    done = rxledger(
        "export-proof", "--prescription", rid, "--out", str(taken), "--wait", "0", gw=gw,
        MONGODB_URI=mongo_uri,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"rxledger export-proof: --out {taken}: [Errno 17] File exists" in done.stderr
    assert "Traceback" not in done.stderr


def test_export_proof_of_events_no_checkpoint_covers_is_incomplete(
    mongo_uri: str,
    databases: Databases,
    tmp_path: Path,
) -> None:
    """Events appended to a log that nothing sequences: no bundle can exist yet."""
    db = databases.new()

    async def append() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
        ledger = Ledger(LogStore(client[db], ORIGIN))
        await ledger.append("rx-pending", 1, {"subject": "rx-pending", "version": 1, "type": "X"})
        await ledger.close()
        await client.close()

    asyncio.run(append())
    out = tmp_path / "out"
    done = rxledger(
        "export-proof", "--prescription", "rx-pending", "--out", str(out), "--wait", "0.3",
        MONGODB_URI=mongo_uri, RXLEDGER_DB=db, RXLEDGER_VAR_DIR=str(tmp_path / "var"),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "INCOMPLETE: no checkpoint covers version(s) 1 of rx-pending" in done.stderr
    assert sorted(f.name for f in out.iterdir()) == ["verifier.key"]


# --- audit --from-tiles ----------------------------------------------------------------------


def fill(mongo_uri: str, db: str, n: int) -> None:
    """Append n events of a few subjects, as another process's appender would."""

    async def run() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
        ledger = Ledger(LogStore(client[db], ORIGIN))
        prev: dict[str, str] = {}
        for i in range(n):
            subject = f"rx-{i % 5}"
            version = i // 5 + 1
            header = {
                "subject": subject,
                "version": version,
                "type": "STEP",
                "prev": prev.get(subject),
            }
            appended = await ledger.append(subject, version, header)
            prev[subject] = base64.b64encode(appended.leaf_hash).decode()
        await ledger.close()
        await client.close()

    asyncio.run(run())


def published(gw: Gateway, size: int) -> None:
    def at_least() -> bool:
        r = gw.http.get("/log/checkpoint")
        return r.status_code == 200 and int(r.text.split("\n")[1]) >= size

    wait_for(at_least, f"a checkpoint of size {size}", timeout=60)


def audit_args(gw: Gateway, key: str) -> list[str]:
    return ["audit", "--from-tiles", f"{gw.base}/log", "--key", key, "--quiet"]


def audit(gw: Gateway, key: str) -> subprocess.CompletedProcess[str]:
    return rxledger(*audit_args(gw, key))


@pytest.fixture(scope="module")
def tiled(
    mongo_uri: str,
    databases: Databases,
    tmp_path_factory: pytest.TempPathFactory,
) -> Any:
    """A log of 600 entries (full and partial tiles at level 0, a partial one at level 1)."""
    db = databases.new()
    tmp = tmp_path_factory.mktemp("tiled")
    with running(launch(mongo_uri, db, tmp)) as (gateway,):
        fill(mongo_uri, db, 600)
        published(gateway, 600)
        yield gateway, tmp


def test_audit_from_tiles_verifies_a_sound_log(tiled: Any) -> None:
    gw, _ = tiled
    done = audit(gw, gw.verifier_key())
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"OK: 600 entries, 4 tiles and 1 checkpoints of {gw.base}/log")


def test_audit_from_tiles_saves_the_checkpoint_for_the_next_audit_to_start_from(
    tiled: Any, tmp_path: Path
) -> None:
    gw, _ = tiled
    saved = tmp_path / "seen.note"
    first = rxledger(*audit_args(gw, gw.verifier_key()), "--save", str(saved))
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"next time: --since {saved}" in first.stdout
    assert saved.read_text() == gw.http.get("/log/checkpoint").text
    again = rxledger(*audit_args(gw, gw.verifier_key()), "--since", str(saved))
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.startswith("OK: 600 entries, 4 tiles and 2 checkpoints")


def test_audit_from_tiles_with_another_key_fails_on_the_checkpoint(
    tiled: Any, tmp_path: Path
) -> None:
    gw, _ = tiled
    other = rxledger("keygen", "--name", "other.test", "--out", str(tmp_path / "k.pem"))
    done = audit(gw, other.stdout.strip())
    assert done.returncode == 1
    assert "FAILED: first divergence: checkpoint: unknown key" in done.stdout


def test_audit_from_tiles_needs_a_key_and_a_reachable_log() -> None:
    done = rxledger("audit", "--from-tiles", "http://127.0.0.1:9/log")
    assert done.returncode == 2 and "--from-tiles needs --key" in done.stderr
    key = "x.test+00000000+AQ" + "A" * 42 + "="
    done = rxledger("audit", "--from-tiles", "http://127.0.0.1:9/log", "--key", key)
    assert done.returncode in (1, 2), done.stderr


@dataclass
class StoredLog:
    db: str
    var_dir: Path  # its signing key is here
    key: str


@pytest.fixture
def small_log(
    mongo_uri: str,
    databases: Databases,
    tmp_path: Path,
) -> StoredLog:
    """A log of 300 entries whose gateway has stopped."""
    db = databases.new()
    with running(launch(mongo_uri, db, tmp_path / "first")) as (gateway,):
        fill(mongo_uri, db, 300)
        published(gateway, 300)
        return StoredLog(db, gateway.var_dir, gateway.verifier_key())


def tampered_log(
    mongo_uri: str, tmp: Path, log: StoredLog, edit: Any
) -> subprocess.CompletedProcess[str]:
    """Edit the stored log, then audit it through a fresh gateway (no cached tiles)."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    try:
        edit(client[log.db])
    finally:
        client.close()
    with running(launch(mongo_uri, log.db, tmp, RXLEDGER_VAR_DIR=str(log.var_dir))) as (fresh,):
        return audit(fresh, log.key)


def test_audit_from_tiles_reports_an_edited_entry_at_its_index(
    small_log: StoredLog, mongo_uri: str, tmp_path: Path
) -> None:
    def edit(db: Any) -> None:
        leaf = bytes(db.entries.find_one({"_id": 261})["leaf"])
        db.entries.update_one(
            {"_id": 261}, {"$set": {"leaf": Binary(leaf.replace(b"STEP", b"STOP"))}}
        )

    done = tampered_log(mongo_uri, tmp_path / "second", small_log, edit)
    assert done.returncode == 1
    assert "entry 261: its leaf does not hash to tile/0/001.p/44[5]" in done.stdout


def test_audit_from_tiles_reports_an_edited_tile(
    small_log: StoredLog, mongo_uri: str, tmp_path: Path
) -> None:
    def edit(db: Any) -> None:
        doc = db.tiles.find_one({"_id": "1/0.p/1"})
        hashes = bytearray(doc["hashes"])
        hashes[0] ^= 1
        db.tiles.update_one({"_id": "1/0.p/1"}, {"$set": {"hashes": Binary(bytes(hashes))}})

    done = tampered_log(mongo_uri, tmp_path / "second", small_log, edit)
    assert done.returncode == 1
    assert "tile/1/000.p/1 differs from the tree rebuilt from the entry bundles" in done.stdout


def test_audit_from_tiles_reports_a_broken_hash_chain(
    small_log: StoredLog, mongo_uri: str, tmp_path: Path
) -> None:
    """A leaf rewritten with its tile (the tree then matches nothing signed): the root check
    and the per-subject prev chain both catch it."""

    edited: dict[str, Any] = {}

    def edit(db: Any) -> None:
        # Entry 200: by then every subject has appeared, so it is not a first version. Which
        # subject it holds depends on how the sequencer interleaved the appends.
        header = json.loads(bytes(db.entries.find_one({"_id": 200})["leaf"]))
        edited.update(header)
        header["prev"] = None
        new = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        db.entries.update_one({"_id": 200}, {"$set": {"leaf": Binary(new)}})
        tile = bytearray(db.tiles.find_one({"_id": "0/0"})["hashes"])
        tile[200 * 32 : 201 * 32] = hashlib.sha256(b"\x00" + new).digest()
        db.tiles.update_one({"_id": "0/0"}, {"$set": {"hashes": Binary(bytes(tile))}})

    done = tampered_log(mongo_uri, tmp_path / "second", small_log, edit)
    assert done.returncode == 1
    subject, version = edited["subject"], edited["version"]
    assert version > 1
    assert (
        f"entry 200: {subject} v{version} prev hash does not match the leaf hash of v{version - 1}"
        in done.stdout
    )
    assert "checkpoint 300: its root differs from the tree rebuilt" in done.stdout
