"""A log may be hostile to the tools that read it: the witness and `audit --from-tiles` must
report what it does, within bounds of memory and time, and never crash. The logs here are
served by httpx.MockTransport, so each can answer exactly what a hostile server would."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from anchoring.audit import audit_remote
from anchoring.cosignature import Cosigner
from anchoring.note import Checkpoint, Signer
from anchoring.remote import MAX_TILE, RemoteError, RemoteLog, printable
from anchoring.tiles import entry_bundle
from anchoring.witness import Witness
from app.witness import LogRejected, witness_once

ORIGIN = "hostile.example/log"
LOG = Signer("hostile.example", Ed25519PrivateKey.generate())
URL = "http://log.test/log"

Handler = Callable[[httpx.Request], httpx.Response]


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def two_leaf_root(a: bytes, b: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + leaf_hash(a) + leaf_hash(b)).digest()


def one_leaf_log(leaf: bytes) -> dict[str, bytes]:
    """The resources of a log holding one leaf: checkpoint, its level-0 tile and bundle."""
    note = LOG.sign_note(Checkpoint(ORIGIN, 1, leaf_hash(leaf)).text())
    return {
        "/log/checkpoint": note.encode(),
        "/log/next-checkpoint": note.encode(),
        "/log/tile/0/000.p/1": leaf_hash(leaf),
        "/log/tile/entries/000.p/1": entry_bundle([leaf]),
    }


def two_leaf_log(a: bytes, b: bytes) -> dict[str, bytes]:
    note = LOG.sign_note(Checkpoint(ORIGIN, 2, two_leaf_root(a, b)).text())
    return {
        "/log/checkpoint": note.encode(),
        "/log/tile/0/000.p/2": leaf_hash(a) + leaf_hash(b),
        "/log/tile/entries/000.p/2": entry_bundle([a, b]),
    }


def serving(resources: dict[str, bytes], post: Handler | None = None) -> RemoteLog:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and post is not None:
            return post(request)
        body = resources.get(request.url.path)
        return httpx.Response(404) if body is None else httpx.Response(200, content=body)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    return RemoteLog(URL, client=client, timeout=5)


def witness(tmp_path: Path) -> Witness:
    cosigner = Cosigner("w.example/w", Ed25519PrivateKey.generate())
    return Witness(cosigner, LOG.verifier(), tmp_path / "state.json")


# --- the witness ------------------------------------------------------------------------------


async def test_a_log_answering_a_cosignature_with_a_json_list_is_a_rejection(tmp_path):
    remote = serving(
        one_leaf_log(b'{"subject":"a","version":1}'),
        post=lambda request: httpx.Response(200, json=["not", "an", "object"]),
    )
    with pytest.raises(LogRejected, match="did not keep the cosignature by w.example/w"):
        await witness_once(witness(tmp_path), remote)


async def test_a_log_answering_with_cosigned_by_not_a_list_is_a_rejection(tmp_path):
    remote = serving(
        one_leaf_log(b'{"subject":"a","version":1}'),
        post=lambda request: httpx.Response(200, json={"cosignedBy": "w.example/w"}),
    )
    with pytest.raises(LogRejected):
        await witness_once(witness(tmp_path), remote)


async def test_a_log_missing_the_tiles_of_a_consistency_proof_cannot_be_read(tmp_path):
    w = witness(tmp_path)
    remote = serving(
        one_leaf_log(b'{"subject":"a","version":1}'),
        post=lambda request: httpx.Response(200, json={"cosignedBy": ["w.example/w"]}),
    )
    assert (await witness_once(w, remote))[0] == 1
    # The log grows to 3 leaves but serves none of the tiles a proof from 1 needs.
    bigger = LOG.sign_note(Checkpoint(ORIGIN, 3, bytes(32)).text()).encode()
    grown = serving({"/log/next-checkpoint": bigger})
    with pytest.raises(RemoteError, match="tiles for size 3 cannot be read"):
        await witness_once(w, grown)
    assert w.state is not None and w.state.size == 1


async def test_an_answer_larger_than_its_resource_can_be_is_refused_unread():
    remote = serving({"/log/tile/0/000": b"\x00" * (MAX_TILE + 1)})
    with pytest.raises(RemoteError, match=f"larger than {MAX_TILE} bytes"):
        await remote.tile(0, 0)


async def test_a_gzip_bomb_is_stopped_at_the_limit_of_its_decompressed_size():
    bomb = gzip.compress(b"\x00" * (64 << 20))  # 64 MiB of zeros in about 64 KiB

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=bomb, headers={"Content-Encoding": "gzip"})

    remote = RemoteLog(URL, client=httpx.AsyncClient(transport=httpx.MockTransport(handle)))
    with pytest.raises(RemoteError, match="larger than"):
        await remote.checkpoint()


async def test_an_invalid_url_is_a_remote_error_not_a_crash():
    with pytest.raises(RemoteError, match="InvalidURL|UnsupportedProtocol"):
        await RemoteLog("http://[::1/log").checkpoint()


def test_text_from_a_server_is_printed_without_terminal_escapes():
    assert printable("ok\x1b[2J\x07done") == "ok\\x1b[2J\\x07done"
    assert len(printable("x" * 1000)) == 300


# --- audit --from-tiles -----------------------------------------------------------------------


NOT_CANONICAL = "the leaf is not a JSON object in RFC 8785 canonical form"
NO_SUBJECT = "the leaf has no string subject and positive integer version"


@pytest.mark.parametrize(
    ("leaf", "problem"),
    [
        (b'{"subject":"a","version":"x"}', NO_SUBJECT),
        (b'{"subject":"a","version":true}', NO_SUBJECT),
        (b'{"subject":"a","version":0}', NO_SUBJECT),
        (b'{"version":1,"subject":"a"}', NOT_CANONICAL),
        (b"[" * 30_000 + b"]" * 30_000, NOT_CANONICAL),  # deeper than json.loads goes
        (b"\xff\xfe", NOT_CANONICAL),
        (
            b'{"subject":"a","version":2}',
            "a version 2 is the subject's first entry (events reordered or missing)",
        ),
    ],
)
async def test_audit_from_tiles_reports_a_hostile_leaf_and_does_not_crash(leaf, problem):
    report = await audit_remote(serving(one_leaf_log(leaf)), [LOG.verifier()])
    assert report.problems == [f"entry 0: {problem}"]
    assert report.entries == 1


A1 = b'{"subject":"a","version":1}'
B1 = b'{"subject":"b","version":1}'


async def test_audit_from_tiles_since_a_checkpoint_seen_before_accepts_a_log_that_grew():
    seen = LOG.sign_note(Checkpoint(ORIGIN, 1, leaf_hash(A1)).text())
    report = await audit_remote(serving(two_leaf_log(A1, B1)), [LOG.verifier()], since=seen)
    assert report.ok, report.problems
    assert (report.entries, report.checkpoints) == (2, 2)
    assert report.note is not None and report.note.startswith(f"{ORIGIN}\n2\n")


async def test_audit_from_tiles_since_a_checkpoint_the_log_no_longer_holds_is_a_fork():
    seen = LOG.sign_note(Checkpoint(ORIGIN, 1, leaf_hash(B1)).text())  # the log showed b first
    report = await audit_remote(serving(two_leaf_log(A1, B1)), [LOG.verifier()], since=seen)
    assert report.problems == [
        "checkpoint 1 seen before is not a prefix of checkpoint 2: the log has rewritten its "
        "history since (a fork)"
    ]


async def test_audit_from_tiles_since_a_larger_checkpoint_is_a_rollback():
    seen = LOG.sign_note(Checkpoint(ORIGIN, 5, bytes(32)).text())
    report = await audit_remote(serving(two_leaf_log(A1, B1)), [LOG.verifier()], since=seen)
    assert report.problems == [
        "checkpoint 2 is smaller than checkpoint 5 seen before: the log rolled back"
    ]


async def test_audit_from_tiles_since_a_checkpoint_signed_by_another_key_is_refused():
    other = Signer("hostile.example", Ed25519PrivateKey.generate())
    seen = other.sign_note(Checkpoint(ORIGIN, 1, leaf_hash(A1)).text())
    report = await audit_remote(serving(two_leaf_log(A1, B1)), [LOG.verifier()], since=seen)
    assert len(report.problems) == 1
    assert report.problems[0].startswith("the checkpoint seen before: unknown key")


async def test_audit_from_tiles_reports_a_tile_the_checkpoint_needs_and_the_log_lacks():
    resources = one_leaf_log(b'{"subject":"a","version":1}')
    del resources["/log/tile/0/000.p/1"]
    report = await audit_remote(serving(resources), [LOG.verifier()])
    assert report.problems == [
        f"the log does not serve what its checkpoint needs: {URL}/tile/0/000.p/1: not found"
    ]


async def test_audit_from_tiles_of_an_unreachable_log_raises_for_the_cli_to_say_so():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    remote = RemoteLog(URL, client=httpx.AsyncClient(transport=httpx.MockTransport(refuse)))
    with pytest.raises(RemoteError, match="ConnectError"):
        await audit_remote(remote, [LOG.verifier()])


def test_a_json_nesting_bomb_in_a_post_answer_is_harmless():
    from app.witness import _json_object

    assert _json_object(b"[" * 100_000) == {}
    assert _json_object(json.dumps({"a": 1}).encode()) == {"a": 1}
