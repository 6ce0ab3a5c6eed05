"""Witnesses: C2SP tlog-cosignature/v1 cosignatures, and the witness's decision to give one.

A witness keeps the latest checkpoint it cosigned. Shown a newer one, it checks the log's
signature and a consistency proof from what it cosigned before, and only then cosigns; a
checkpoint that is smaller, or of the same size with another root, or not consistent, is
refused with the reason. A log with a quorum of witnesses cannot show two different histories
(a split view) without a witness seeing both.

Cosignature (Ed25519, signature type 0x04): a note signature line
"— <witness name> <base64(key ID ‖ u64 big-endian timestamp ‖ Ed25519 signature)>", key ID =
SHA-256(name ‖ 0x0A ‖ 0x04 ‖ public key)[:4], over "cosignature/v1\\ntime <timestamp>\\n"
followed by the whole checkpoint text. Witness verifier keys read
"<name>+<8 hex key ID>+<base64(0x04 ‖ public key)>".
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from anchoring.encoding import EncodingError, b64, unb64
from anchoring.note import (
    SIG_PREFIX,
    Checkpoint,
    Verifier,
    key_id,
    open_checkpoint,
    parse_key,
    split_note,
    verifier_key_string,
)
from anchoring.verify import BAD_SIGNATURE, MALFORMED, VerificationError, verify_consistency

ALG_COSIGNATURE_V1 = 0x04
HEADER = "cosignature/v1\n"
MAX_TIMESTAMP = (1 << 63) - 1


def cosigned_message(checkpoint_text: str, timestamp: int) -> bytes:
    return f"{HEADER}time {timestamp}\n{checkpoint_text}".encode()


def parse_witness_key(text: str) -> Verifier:
    """A witness verifier key "<name>+<hex id>+<base64(0x04 ‖ key)>"."""
    return parse_key(text, ALG_COSIGNATURE_V1)


@dataclass(frozen=True)
class Cosignature:
    name: str
    key_id: bytes
    timestamp: int
    line: str  # the signature line, with its newline

    def doc(self) -> dict[str, object]:
        return {
            "name": self.name,
            "keyId": self.key_id.hex(),
            "timestamp": self.timestamp,
            "line": self.line,
        }


class Cosigner:
    """A witness's Ed25519 key, signing cosignature/v1."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.verifier_key = verifier_key_string(name, public, ALG_COSIGNATURE_V1)
        self.name = name
        self.key_id = key_id(name, public, ALG_COSIGNATURE_V1)
        self.private_key = private_key

    def cosign(self, checkpoint_text: str, timestamp: int | None = None) -> Cosignature:
        ts = int(time.time()) if timestamp is None else timestamp
        if not 0 <= ts <= MAX_TIMESTAMP:
            raise ValueError(f"cosignature timestamp {ts} is out of range")
        sig = self.private_key.sign(cosigned_message(checkpoint_text, ts))
        raw = self.key_id + ts.to_bytes(8, "big") + sig
        return Cosignature(self.name, self.key_id, ts, f"{SIG_PREFIX}{self.name} {b64(raw)}\n")


def cosignatures(note: str, witnesses: list[Verifier]) -> tuple[str, list[Cosignature]]:
    """The checkpoint text of `note` and the valid cosignatures on it by `witnesses` (one per
    witness). Lines by other keys are ignored; a line by a witness's name and key ID that does
    not verify raises VerificationError(BAD_SIGNATURE)."""
    text, signatures = split_note(note)
    known = {(w.name, w.key_id): w for w in witnesses}
    found: dict[bytes, Cosignature] = {}
    for name, raw in signatures:
        witness = known.get((name, raw[:4]))
        if witness is None:
            continue
        if len(raw) != 4 + 8 + 64:
            raise VerificationError(
                MALFORMED, f"cosignature by {name} is {len(raw)} bytes, want 76"
            )
        ts = int.from_bytes(raw[4:12], "big")
        if ts > MAX_TIMESTAMP or not witness.verify(cosigned_message(text, ts), raw[12:]):
            raise VerificationError(
                BAD_SIGNATURE, f"cosignature by {name} ({raw[:4].hex()}) does not verify"
            )
        found[witness.key_id] = Cosignature(
            name, witness.key_id, ts, f"{SIG_PREFIX}{name} {b64(raw)}\n"
        )
    return text, list(found.values())


# --- the witness ---------------------------------------------------------------------------


class Refused(Exception):
    """The witness will not cosign this checkpoint: the reason says why."""


@dataclass(frozen=True)
class WitnessState:
    """What a witness cosigned last: it never cosigns anything not consistent with it."""

    origin: str
    size: int
    root_hash: bytes

    def dumps(self) -> str:
        return json.dumps(
            {"origin": self.origin, "size": self.size, "rootHash": b64(self.root_hash)}
        )

    @classmethod
    def loads(cls, text: str) -> WitnessState:
        try:
            doc = json.loads(text)
            return cls(str(doc["origin"]), int(doc["size"]), unb64(doc["rootHash"], "rootHash"))
        except (ValueError, KeyError, TypeError, EncodingError) as exc:
            raise ValueError(f"witness state is not valid: {exc}") from exc


def load_state(path: Path) -> WitnessState | None:
    try:
        return WitnessState.loads(path.read_text())
    except FileNotFoundError:
        return None


def save_state(path: Path, state: WitnessState) -> None:
    """Written to a new file, synced, then renamed over the old one: a crash leaves either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(state.dumps())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


ConsistencyFetcher = Callable[[int, int], Awaitable[list[bytes]]]


class Witness:
    def __init__(
        self, cosigner: Cosigner, log_key: Verifier, state_path: Path, origin: str | None = None
    ) -> None:
        self.cosigner = cosigner
        self.log_key = log_key
        self.state_path = state_path
        self.state = load_state(state_path)
        self.origin = origin or (self.state.origin if self.state else None)
        self.submitted: str | None = None  # the note last handed back with a cosignature

    async def witness(self, note: str, consistency: ConsistencyFetcher) -> Cosignature:
        """Cosign `note` if it is consistent with the last checkpoint cosigned (or is that
        checkpoint again). `consistency(old, new)` fetches a proof (from the log's tiles),
        which is verified here. Raises Refused."""
        try:
            cp = open_checkpoint(note, [self.log_key])
        except VerificationError as exc:
            raise Refused(f"the checkpoint does not verify with the log's key: {exc}") from exc
        if self.origin is not None and cp.origin != self.origin:
            raise Refused(f"checkpoint origin {cp.origin!r}, but I witness {self.origin!r}")
        old = self.state
        if old is not None:
            self._check(old, cp)
            if cp.size == old.size:
                return self.cosigner.cosign(note[: note.rfind("\n\n") + 1])
            proof = await consistency(old.size, cp.size)
            try:
                verify_consistency(old.size, cp.size, old.root_hash, cp.root_hash, proof)
            except VerificationError as exc:
                raise Refused(
                    f"checkpoint {cp.size} is not consistent with checkpoint {old.size} that "
                    f"I cosigned: {exc}. The log has forked or rewritten its history."
                ) from exc
        # Remember before releasing the cosignature: a witness must never sign two views.
        self.state = WitnessState(cp.origin, cp.size, cp.root_hash)
        save_state(self.state_path, self.state)
        self.origin = cp.origin  # from now on, this is the log it witnesses
        return self.cosigner.cosign(note[: note.rfind("\n\n") + 1])

    @staticmethod
    def _check(old: WitnessState, cp: Checkpoint) -> None:
        if cp.size < old.size:
            raise Refused(
                f"checkpoint size {cp.size} is smaller than {old.size}, which I cosigned: "
                "the log rolled back"
            )
        if cp.size == old.size and cp.root_hash != old.root_hash:
            raise Refused(
                f"checkpoint {cp.size} has root {b64(cp.root_hash)}, but I cosigned root "
                f"{b64(old.root_hash)} at that size: the log shows two different trees"
            )
