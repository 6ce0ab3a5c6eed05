"""Witness cosignatures (C2SP tlog-cosignature, Ed25519 cosignature/v1) and the witness's
decision to give one (anchoring.cosignature, anchoring.witness), without a database or a
network.

Published vector: sigsum/sigsum-go pkg/checkpoint/checkpoint_test.go (commit 2224a397),
TestCheckpointCosignVerify and TestCheckpointVerifyCosignatureByKey: a witness key from the
seed 0x11 ‖ 31 zero bytes, named "example.org/witness", cosigning the checkpoint
"example.org/log\\n10\\nHA5H…\\n" at time 1234. Only the data is taken from there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from proof_tree import ProofTree

from anchoring.cosignature import (
    ALG_COSIGNATURE_V1,
    Cosignature,
    Cosigner,
    cosignatures,
    parse_witness_key,
)
from anchoring.encoding import b64
from anchoring.note import (
    SIG_PREFIX,
    Checkpoint,
    Signer,
    key_id,
    open_checkpoint,
    parse_verifier_key,
    split_note,
)
from anchoring.verify import BAD_SIGNATURE, MALFORMED, UNKNOWN_KEY, VerificationError
from anchoring.witness import Refused, Witness, WitnessState, load_state
from app.settings import ConfigError, Settings

ORIGIN = "log.rx.example/log"


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def cosigner(name: str) -> Cosigner:
    return Cosigner(name, Ed25519PrivateKey.generate())


def verifier_of(c: Cosigner):
    return parse_witness_key(c.verifier_key)


def body_of(note: str) -> str:
    return note[: note.rfind("\n\n") + 1]


def blob_of(line: str) -> bytes:
    assert line.startswith(SIG_PREFIX) and line.endswith("\n")
    return base64.b64decode(line[:-1].split(" ")[-1])


def with_blob(line: str, blob: bytes) -> str:
    name = line[len(SIG_PREFIX) :].split(" ")[0]
    return f"{SIG_PREFIX}{name} {b64(blob)}\n"


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.fixture(scope="module")
def log_signer() -> Signer:
    return Signer("log.rx.example", Ed25519PrivateKey.generate())


def signed(log_signer: Signer, tree: ProofTree, size: int, origin: str = ORIGIN) -> str:
    return log_signer.sign_note(Checkpoint(origin, size, tree.root(size)).text())


# --- an independent vector -----------------------------------------------------------------

# sigsum/sigsum-go pkg/checkpoint/checkpoint_test.go: testCheckpoint (origin example.org/log,
# size 10, root 1c0e47 followed by zeros), cosigned with crypto.PrivateKey{17} at timestamp
# 1234; the second line of TestCheckpointVerifyCosignatureByKey is that cosignature.
SIGSUM_SEED = bytes([17]) + bytes(31)
SIGSUM_WITNESS = "example.org/witness"
SIGSUM_BODY = "example.org/log\n10\nHA5HAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"
SIGSUM_LINES = [
    # another key ID under the same name
    "\u2014 example.org/witness yX8uUAAAAAAAAATSftMzceM8zssdZ9jin9SjwIxzx9iADMf63VqirX2hafol9Rsq"
    "NqbofIz0LVRqHXI2kpEBSki5RTXFtxz1vo9+Cg==\n",
    # the cosignature
    "\u2014 example.org/witness ys8uUAAAAAAAAATSftMzceM8zssdZ9jin9SjwIxzx9iADMf63VqirX2hafol9Rsq"
    "NqbofIz0LVRqHXI2kpEBSki5RTXFtxz1vo9+Cg==\n",
    # another key name
    "\u2014 example.org/witness-2 ys8uUAAAAAAAAATSftMzceM8zssdZ9jin9SjwIxzx9iADMf63VqirX2hafol9"
    "RsqNqbofIz0LVRqHXI2kpEBSki5RTXFtxz1vo9+Cg==\n",
]


def test_the_sigsum_cosignature_vector_verifies_byte_for_byte():
    key = Ed25519PrivateKey.from_private_bytes(SIGSUM_SEED)
    witness = Cosigner(SIGSUM_WITNESS, key)
    assert witness.key_id == bytes.fromhex("cacf2e50")  # sigsum's NewWitnessKeyId
    assert key_id(SIGSUM_WITNESS, raw_public(key), ALG_COSIGNATURE_V1) == witness.key_id

    log = Signer("example.org/log", Ed25519PrivateKey.generate())
    note = log.sign_note(SIGSUM_BODY) + "".join(SIGSUM_LINES)
    text, found = cosignatures(note, [verifier_of(witness)])
    assert text == SIGSUM_BODY
    assert found == [
        Cosignature(SIGSUM_WITNESS, witness.key_id, 1234, SIGSUM_LINES[1]),
    ]
    # The lines by another key ID and another name are not this witness's: the log's
    # signature still opens the note with all of them on it.
    assert open_checkpoint(note, [log.verifier()]).size == 10


def test_cosigner_reproduces_the_sigsum_cosignature_given_the_same_key():
    witness = Cosigner(SIGSUM_WITNESS, Ed25519PrivateKey.from_private_bytes(SIGSUM_SEED))
    assert witness.cosign(SIGSUM_BODY, 1234).line == SIGSUM_LINES[1]


def test_a_malformed_line_under_a_known_witness_key_is_not_ignored():
    # sigsum's fourth line: the known name and key ID with a 78-byte blob.
    witness = Cosigner(SIGSUM_WITNESS, Ed25519PrivateKey.from_private_bytes(SIGSUM_SEED))
    bad = SIGSUM_LINES[1].replace("Cg==\n", "CgXX\n")
    with pytest.raises(VerificationError) as err:
        cosignatures(SIGSUM_BODY + "\n" + bad, [verifier_of(witness)])
    assert err.value.check == MALFORMED and "78 bytes" in err.value.detail


# --- the format ----------------------------------------------------------------------------


def test_a_cosignature_line_is_key_id_timestamp_and_signature_over_the_v1_message():
    key = Ed25519PrivateKey.generate()
    name = "witness.example/w1"
    witness = Cosigner(name, key)
    public = raw_public(key)
    want_id = hashlib.sha256(name.encode() + b"\n\x04" + public).digest()[:4]
    assert witness.key_id == want_id
    assert witness.verifier_key == f"{name}+{want_id.hex()}+{b64(bytes([4]) + public)}"

    body = Checkpoint(ORIGIN, 7, bytes(range(32))).text()
    cosig = witness.cosign(body, 1_700_000_000)
    assert cosig.line.startswith(f"\u2014 {name} ") and cosig.line.count("\n") == 1
    blob = blob_of(cosig.line)
    assert len(blob) == 4 + 8 + 64
    assert blob[:4] == want_id and cosig.key_id == want_id
    assert int.from_bytes(blob[4:12], "big") == 1_700_000_000 == cosig.timestamp
    message = b"cosignature/v1\ntime 1700000000\n" + body.encode()
    key.public_key().verify(blob[12:], message)  # raises if not
    assert cosig.doc() == {
        "name": name,
        "keyId": want_id.hex(),
        "timestamp": 1_700_000_000,
        "line": cosig.line,
    }


def test_a_cosignature_covers_extension_lines():
    witness = cosigner("w.example")
    body = Checkpoint(ORIGIN, 3, bytes(32), ("ext one", "ext two")).text()
    line = witness.cosign(body, 5).line
    assert cosignatures(body + "\n" + line, [verifier_of(witness)])[1][0].timestamp == 5
    changed = body.replace("ext two", "ext 2")
    with pytest.raises(VerificationError) as err:
        cosignatures(changed + "\n" + line, [verifier_of(witness)])
    assert err.value.check == BAD_SIGNATURE


def test_cosigner_refuses_a_timestamp_out_of_range():
    witness = cosigner("w.example")
    with pytest.raises(ValueError, match="out of range"):
        witness.cosign("o\n1\n" + b64(bytes(32)) + "\n", -1)
    with pytest.raises(ValueError, match="out of range"):
        witness.cosign("o\n1\n" + b64(bytes(32)) + "\n", 1 << 63)


@pytest.mark.parametrize(
    "where",
    ["body size", "body root", "timestamp", "signature first byte", "signature last byte"],
)
def test_a_flipped_byte_in_body_timestamp_or_signature_is_a_bad_signature(log_signer, where):
    witness = cosigner("w.example")
    tree = ProofTree([b"leaf %d" % i for i in range(12)])
    note = signed(log_signer, tree, 12)
    line = witness.cosign(body_of(note), 1_700_000_000).line
    blob = blob_of(line)
    if where == "body size":
        note = note.replace("\n12\n", "\n13\n", 1)
    elif where == "body root":
        root = b64(tree.root(12))
        note = note.replace(root, b64(flip(tree.root(12), 5)), 1)
    elif where == "timestamp":
        line = with_blob(line, flip(blob, 11))
    elif where == "signature first byte":
        line = with_blob(line, flip(blob, 12))
    else:
        line = with_blob(line, flip(blob, 75))
    with pytest.raises(VerificationError) as err:
        cosignatures(note + line, [verifier_of(witness)])
    assert err.value.check == BAD_SIGNATURE
    assert "w.example" in err.value.detail


def test_a_timestamp_beyond_int63_does_not_verify():
    witness = cosigner("w.example")
    body = Checkpoint(ORIGIN, 1, bytes(32)).text()
    blob = blob_of(witness.cosign(body, 1).line)
    huge = blob[:4] + (1 << 63).to_bytes(8, "big") + blob[12:]
    with pytest.raises(VerificationError) as err:
        cosignatures(
            body + "\n" + with_blob(witness.cosign(body, 1).line, huge), [verifier_of(witness)]
        )
    assert err.value.check == BAD_SIGNATURE


def test_lines_by_unknown_keys_and_the_logs_own_signature_are_ignored(log_signer):
    known, stranger = cosigner("w1.example"), cosigner("w2.example")
    impostor = cosigner("w1.example")  # the known name, another key: another key ID
    tree = ProofTree([b"x"] * 4)
    note = signed(log_signer, tree, 4)
    body = body_of(note)
    lines = [stranger.cosign(body).line, impostor.cosign(body).line, known.cosign(body).line]
    text, found = cosignatures(note + "".join(lines), [verifier_of(known)])
    assert text == body
    assert [c.line for c in found] == [lines[2]]
    # A cosignature by an unknown key that would not verify is not looked at either.
    garbled = with_blob(lines[0], flip(blob_of(lines[0]), 40))
    assert cosignatures(note + garbled, [verifier_of(known)])[1] == []


def test_a_key_id_flipped_makes_a_line_unknown_not_valid():
    witness = cosigner("w.example")
    body = Checkpoint(ORIGIN, 1, bytes(32)).text()
    line = witness.cosign(body).line
    other = with_blob(line, flip(blob_of(line), 0))
    assert cosignatures(body + "\n" + other, [verifier_of(witness)])[1] == []


def test_two_cosignatures_by_one_witness_are_refused_before_the_second_is_verified():
    """Each witness line is verified once at most: a note repeating one line hundreds of times
    cannot make the log verify it hundreds of times."""
    witness = cosigner("w.example")
    body = Checkpoint(ORIGIN, 1, bytes(32)).text()
    line = witness.cosign(body, 10).line
    for note in (
        body + "\n" + line + witness.cosign(body, 11).line,
        body + "\n" + line * 50,
    ):
        with pytest.raises(VerificationError) as err:
            cosignatures(note, [verifier_of(witness)])
        assert (err.value.check, err.value.detail) == (
            MALFORMED,
            "the note carries two cosignatures by w.example",
        )


def test_a_note_with_the_log_signature_and_cosignatures_still_opens_as_a_checkpoint(log_signer):
    w1, w2 = cosigner("w1.example"), cosigner("w2.example")
    tree = ProofTree([b"e%d" % i for i in range(9)])
    note = signed(log_signer, tree, 9)
    witnessed = note + w1.cosign(body_of(note)).line + w2.cosign(body_of(note)).line
    cp = open_checkpoint(witnessed, [log_signer.verifier()], ORIGIN)
    assert (cp.origin, cp.size, cp.root_hash) == (ORIGIN, 9, tree.root(9))
    assert len(split_note(witnessed)[1]) == 3
    found = cosignatures(witnessed, [verifier_of(w1), verifier_of(w2)])[1]
    assert {c.name for c in found} == {"w1.example", "w2.example"}
    # Cosignatures do not stand in for the log's signature.
    with pytest.raises(VerificationError) as err:
        open_checkpoint(
            body_of(note) + "\n" + w1.cosign(body_of(note)).line, [log_signer.verifier()]
        )
    assert err.value.check == UNKNOWN_KEY


def test_witness_keys_and_log_keys_are_not_interchangeable():
    key = Ed25519PrivateKey.generate()
    log, witness = Signer("same.example", key), Cosigner("same.example", key)
    assert log.key_id != witness.key_id  # 0x01 and 0x04 in the key ID hash
    with pytest.raises(VerificationError) as err:
        parse_verifier_key(witness.verifier_key)
    assert err.value.check == MALFORMED and "0x01" in err.value.detail
    with pytest.raises(VerificationError) as err:
        parse_witness_key(log.verifier_key)
    assert err.value.check == MALFORMED and "0x04" in err.value.detail
    # The same key's note signature is no cosignature, and its cosignature no note signature.
    body = Checkpoint(ORIGIN, 2, bytes(32)).text()
    assert cosignatures(log.sign_note(body), [verifier_of(witness)])[1] == []
    with pytest.raises(VerificationError) as err:
        open_checkpoint(body + "\n" + witness.cosign(body).line, [log.verifier()])
    assert err.value.check == UNKNOWN_KEY


# --- the witness ---------------------------------------------------------------------------


class Fetcher:
    """Consistency proofs from a tree the test chooses, and the calls made."""

    def __init__(self, tree: ProofTree) -> None:
        self.tree = tree
        self.calls: list[tuple[int, int]] = []

    async def __call__(self, old: int, new: int) -> list[bytes]:
        self.calls.append((old, new))
        return self.tree.consistency_proof(old, new)


class RecordingCosigner(Cosigner):
    """A cosigner that notes what the state file held when it was asked to sign."""

    def __init__(self, name: str, key: Ed25519PrivateKey, state: Path) -> None:
        super().__init__(name, key)
        self.state_path = state
        self.state_when_signing: list[WitnessState | None] = []

    def cosign(self, checkpoint_text: str, timestamp: int | None = None) -> Cosignature:
        self.state_when_signing.append(load_state(self.state_path))
        return super().cosign(checkpoint_text, timestamp)


HONEST = ProofTree([b"honest %d" % i for i in range(40)])
FORKED = ProofTree([b"honest %d" % i for i in range(6)] + [b"forked %d" % i for i in range(34)])


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "witness" / "state.json"


def make_witness(log_signer: Signer, state: Path, origin: str | None = ORIGIN) -> Witness:
    recording = RecordingCosigner("w.example", Ed25519PrivateKey.generate(), state)
    return Witness(recording, log_signer.verifier(), state, origin)


async def test_the_first_checkpoint_is_cosigned_after_the_state_is_written(log_signer, state):
    witness = make_witness(log_signer, state)
    fetch = Fetcher(HONEST)
    note = signed(log_signer, HONEST, 10)
    cosig = await witness.witness(note, fetch)
    assert fetch.calls == []  # nothing to be consistent with yet
    assert witness.cosigner.state_when_signing == [WitnessState(ORIGIN, 10, HONEST.root(10))]
    assert load_state(state) == WitnessState(ORIGIN, 10, HONEST.root(10))
    found = cosignatures(note + cosig.line, [verifier_of(witness.cosigner)])[1]
    assert found == [cosig]


async def test_a_larger_consistent_checkpoint_is_cosigned_with_a_proof_from_the_last(
    log_signer, state
):
    witness = make_witness(log_signer, state)
    fetch = Fetcher(HONEST)
    await witness.witness(signed(log_signer, HONEST, 10), fetch)
    note = signed(log_signer, HONEST, 23)
    cosig = await witness.witness(note, fetch)
    assert fetch.calls == [(10, 23)]
    assert load_state(state) == WitnessState(ORIGIN, 23, HONEST.root(23))
    assert witness.cosigner.state_when_signing[-1] == WitnessState(ORIGIN, 23, HONEST.root(23))
    assert cosignatures(note + cosig.line, [verifier_of(witness.cosigner)])[1] == [cosig]
    # The same checkpoint again (e.g. with other witnesses' lines on it) is cosigned again.
    again = await witness.witness(
        note + cosigner("other.example").cosign(body_of(note)).line, fetch
    )
    assert again.key_id == cosig.key_id and fetch.calls == [(10, 23)]


def refusal_leaves_state_alone(state: Path):
    before = (state.read_bytes(), state.stat().st_mtime_ns)

    def check() -> None:
        assert (state.read_bytes(), state.stat().st_mtime_ns) == before
        assert not state.with_name(state.name + ".tmp").exists()

    return check


@pytest.mark.parametrize(
    ("size", "tree", "reason"),
    [
        (15, HONEST, "smaller than 20, which I cosigned: the log rolled back"),
        (20, FORKED, "two different trees"),
        (30, FORKED, "not consistent with checkpoint 20 that I cosigned"),
    ],
    ids=["rollback", "fork-same-size", "fork-larger"],
)
async def test_rollbacks_and_forks_are_refused_and_the_state_is_kept(
    log_signer, state, size, tree, reason
):
    witness = make_witness(log_signer, state)
    await witness.witness(signed(log_signer, HONEST, 20), Fetcher(HONEST))
    unchanged = refusal_leaves_state_alone(state)
    signings = len(witness.cosigner.state_when_signing)
    with pytest.raises(Refused, match=reason):
        await witness.witness(signed(log_signer, tree, size), Fetcher(tree))
    unchanged()
    assert len(witness.cosigner.state_when_signing) == signings  # nothing was signed
    assert witness.state == WitnessState(ORIGIN, 20, HONEST.root(20))
    # The honest log can go on.
    await witness.witness(signed(log_signer, HONEST, 25), Fetcher(HONEST))
    assert load_state(state) == WitnessState(ORIGIN, 25, HONEST.root(25))


async def test_a_consistency_proof_for_another_tree_is_refused(log_signer, state):
    # The log signs the honest tree of 30 but serves tiles (proofs) of a forked history.
    witness = make_witness(log_signer, state)
    await witness.witness(signed(log_signer, HONEST, 20), Fetcher(HONEST))
    unchanged = refusal_leaves_state_alone(state)
    with pytest.raises(Refused, match="forked or rewritten"):
        await witness.witness(signed(log_signer, HONEST, 30), Fetcher(FORKED))
    unchanged()


async def test_a_failing_proof_fetch_is_no_cosignature_and_no_state_change(log_signer, state):
    witness = make_witness(log_signer, state)
    await witness.witness(signed(log_signer, HONEST, 20), Fetcher(HONEST))
    unchanged = refusal_leaves_state_alone(state)

    async def unreachable(old: int, new: int) -> list[bytes]:
        raise ConnectionError("tiles are away")

    with pytest.raises(ConnectionError):
        await witness.witness(signed(log_signer, HONEST, 30), unreachable)
    unchanged()


async def test_a_checkpoint_not_signed_by_the_log_key_is_refused(log_signer, state):
    witness = make_witness(log_signer, state)
    other = Signer(log_signer.name, Ed25519PrivateKey.generate())  # same name, other key
    with pytest.raises(Refused, match="does not verify with the log's key"):
        await witness.witness(signed(other, HONEST, 10), Fetcher(HONEST))
    assert not state.exists()
    await witness.witness(signed(log_signer, HONEST, 10), Fetcher(HONEST))
    unchanged = refusal_leaves_state_alone(state)
    forged = signed(log_signer, HONEST, 12).replace("\n12\n", "\n13\n", 1)
    with pytest.raises(Refused, match="bad signature"):
        await witness.witness(forged, Fetcher(HONEST))
    with pytest.raises(Refused, match="malformed"):
        await witness.witness("not a note", Fetcher(HONEST))
    unchanged()


async def test_a_checkpoint_of_another_origin_is_refused(log_signer, state):
    witness = make_witness(log_signer, state, origin=ORIGIN)
    with pytest.raises(Refused, match="but I witness 'log.rx.example/log'"):
        await witness.witness(signed(log_signer, HONEST, 10, "other.example/log"), Fetcher(HONEST))
    assert not state.exists()


async def test_the_state_survives_a_new_witness_and_pins_the_origin(log_signer, state):
    first = make_witness(log_signer, state, origin=None)
    await first.witness(signed(log_signer, HONEST, 20), Fetcher(HONEST))
    again = make_witness(log_signer, state, origin=None)  # a restarted witness
    assert again.state == WitnessState(ORIGIN, 20, HONEST.root(20)) and again.origin == ORIGIN
    unchanged = refusal_leaves_state_alone(state)
    with pytest.raises(Refused, match="smaller than 20"):
        await again.witness(signed(log_signer, HONEST, 12), Fetcher(HONEST))
    with pytest.raises(Refused, match="two different trees"):
        await again.witness(signed(log_signer, FORKED, 20), Fetcher(FORKED))
    with pytest.raises(Refused, match="origin"):
        await again.witness(signed(log_signer, HONEST, 20, "other.example/log"), Fetcher(HONEST))
    unchanged()
    fetch = Fetcher(HONEST)
    await again.witness(signed(log_signer, HONEST, 32), fetch)
    assert fetch.calls == [(20, 32)]
    assert load_state(state) == WitnessState(ORIGIN, 32, HONEST.root(32))


async def test_the_first_origin_seen_is_pinned_in_a_running_witness(log_signer, state):
    # `rxledger witness --origin`: "require this checkpoint origin (default: the first one
    # seen)". A running witness started without --origin and without state must hold on to
    # the origin of the first checkpoint it cosigns, as a restarted one does (above).
    witness = make_witness(log_signer, state, origin=None)
    await witness.witness(signed(log_signer, HONEST, 20), Fetcher(HONEST))
    unchanged = refusal_leaves_state_alone(state)
    with pytest.raises(Refused, match="origin"):
        await witness.witness(signed(log_signer, HONEST, 20, "other.example/log"), Fetcher(HONEST))
    with pytest.raises(Refused, match="origin"):
        await witness.witness(signed(log_signer, HONEST, 30, "other.example/log"), Fetcher(HONEST))
    unchanged()


def test_a_corrupt_state_file_is_an_error_not_a_fresh_start(log_signer, state):
    state.parent.mkdir(parents=True)
    state.write_text('{"origin": "o", "size": "many"}')
    with pytest.raises(ValueError, match="witness state is not valid"):
        make_witness(log_signer, state)


# --- settings ------------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("RXLEDGER_WITNESSES", raising=False)
    monkeypatch.delenv("RXLEDGER_WITNESS_QUORUM", raising=False)
    monkeypatch.setenv("RXLEDGER_VAR_DIR", str(tmp_path / "var"))
    return monkeypatch


def test_witnesses_and_quorum_come_from_the_environment(env):
    w1, w2 = cosigner("w1.example/a"), cosigner("w2.example/b")
    env.setenv("RXLEDGER_WITNESSES", f" {w1.verifier_key},\n{w2.verifier_key} ")
    env.setenv("RXLEDGER_WITNESS_QUORUM", "2")
    log = Settings.from_env().log
    assert [(w.name, w.key_id) for w in log.witnesses] == [
        ("w1.example/a", w1.key_id),
        ("w2.example/b", w2.key_id),
    ]
    assert log.quorum == 2
    env.delenv("RXLEDGER_WITNESSES")
    env.delenv("RXLEDGER_WITNESS_QUORUM")
    log = Settings.from_env().log
    assert (log.witnesses, log.quorum) == ((), 0)


@pytest.mark.parametrize(
    "value",
    [
        "w1.example+deadbeef",
        "w1.example+00000000+BAAA",
        "not a key",
        "LOG_KEY",  # a note (0x01) key where a witness (0x04) key belongs
    ],
)
def test_a_malformed_or_log_witness_key_is_a_config_error_naming_the_variable(env, value):
    if value == "LOG_KEY":
        value = Signer("w1.example", Ed25519PrivateKey.generate()).verifier_key
    env.setenv("RXLEDGER_WITNESSES", value)
    with pytest.raises(ConfigError, match="RXLEDGER_WITNESSES") as err:
        Settings.from_env()
    assert "--print-key" in str(err.value)


def test_a_witness_named_twice_is_a_config_error(env):
    w = cosigner("w.example")
    env.setenv("RXLEDGER_WITNESSES", f"{w.verifier_key} {w.verifier_key}")
    with pytest.raises(
        ConfigError, match="RXLEDGER_WITNESSES: the witness key w.example is given twice"
    ):
        Settings.from_env()


@pytest.mark.parametrize(
    ("witnesses", "quorum", "message"),
    [
        (1, "2", "RXLEDGER_WITNESS_QUORUM=2 needs at least 2 witness keys"),
        (0, "1", "RXLEDGER_WITNESS_QUORUM=1 needs at least 1 witness keys"),
        (2, "-1", "RXLEDGER_WITNESS_QUORUM=-1 must be an integer of at least 0"),
        (2, "one", "RXLEDGER_WITNESS_QUORUM='one' is not an integer"),
    ],
)
def test_a_quorum_the_witnesses_cannot_meet_is_a_config_error(env, witnesses, quorum, message):
    keys = [cosigner(f"w{i}.example").verifier_key for i in range(witnesses)]
    if keys:
        env.setenv("RXLEDGER_WITNESSES", " ".join(keys))
    env.setenv("RXLEDGER_WITNESS_QUORUM", quorum)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Settings.from_env()


# --- rxledger verify --witness: a client that insists on a quorum ----------------------------


def run_verify(*args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "verify", *args],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout + done.stderr


def test_verify_with_witness_keys_requires_their_cosignatures(tmp_path: Path) -> None:
    log = Signer("log.example", Ed25519PrivateKey.generate())
    w1, w2, w3 = (Cosigner(f"w{i}.example/w", Ed25519PrivateKey.generate()) for i in range(3))
    leaf = b'{"subject":"rx-1","version":1}'
    root = hashlib.sha256(b"\x00" + leaf).digest()
    text = Checkpoint("log.example/log", 1, root).text()
    note = log.sign_note(text) + w1.cosign(text).line + w2.cosign(text).line
    bundle = tmp_path / "bundle.json"
    bundle.write_text(
        json.dumps(
            {
                "leaf": b64(leaf),
                "leafIndex": 0,
                "treeSize": 1,
                "inclusionPath": [],
                "checkpoint": note,
            }
        )
    )
    keys = tmp_path / "witnesses.txt"
    keys.write_text(f"{w1.verifier_key}\n{w2.verifier_key}\n{w3.verifier_key}\n")
    base = [str(bundle), "--key", log.verifier_key]

    code, out = run_verify(*base, "--witness", w1.verifier_key, "--witness", w2.verifier_key)
    assert code == 0, out
    assert "cosigned by 2 of 2 witnesses (w0.example/w, w1.example/w)" in out

    code, out = run_verify(*base, "--witness", str(keys), "--quorum", "2")
    assert code == 0 and "cosigned by 2 of 3 witnesses" in out, out

    code, out = run_verify(*base, "--witness", str(keys))
    assert code == 1
    assert (
        "FAILED: witness quorum not met: 2 of the 3 witnesses cosigned the checkpoint, 3 required (missing: w2.example/w)"
        in out
    )

    code, out = run_verify(*base, "--witness", str(keys), "--quorum", "4")
    assert code == 2 and "--quorum 4: want 0 to 3" in out

    code, out = run_verify(*base, "--witness", log.verifier_key)
    assert code == 1 and "verifier key must be 0x04 followed by a 32-byte Ed25519 key" in out
