"""C2SP tlog-cosignature/v1: a witness's Ed25519 signature line on a checkpoint.

A cosignature (signature type 0x04) is a note signature line
"— <witness name> <base64(key ID ‖ u64 big-endian timestamp ‖ Ed25519 signature)>", with key ID
SHA-256(name ‖ 0x0A ‖ 0x04 ‖ public key)[:4], over "cosignature/v1\\ntime <timestamp>\\n"
followed by the whole checkpoint text. Witness verifier keys read
"<name>+<8 hex key ID>+<base64(0x04 ‖ public key)>".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from anchoring.note import (
    Verifier,
    format_signature,
    key_id,
    parse_key,
    split_note,
    verifier_key_string,
)
from anchoring.verify import BAD_SIGNATURE, MALFORMED, VerificationError

ALG_COSIGNATURE_V1 = 0x04
HEADER = "cosignature/v1\n"
MAX_TIMESTAMP = (1 << 63) - 1


def cosigned_message(checkpoint_text: str, timestamp: int) -> bytes:
    return f"{HEADER}time {timestamp}\n{checkpoint_text}".encode()


def parse_witness_key(text: str) -> Verifier:
    """A witness verifier key "<name>+<hex id>+<base64(0x04 ‖ key)>"."""
    return parse_key(text, ALG_COSIGNATURE_V1)


def parse_witness_keys(text: str) -> list[Verifier]:
    """Witness verifier keys separated by spaces, commas or newlines, each named once.
    Raises VerificationError(MALFORMED) naming the key that does not parse."""
    keys: dict[bytes, Verifier] = {}
    for item in text.replace(",", " ").split():
        try:
            key = parse_witness_key(item)
        except VerificationError as exc:
            raise VerificationError(MALFORMED, f"{item!r:.60}: {exc.detail}") from None
        if key.key_id in keys:
            raise VerificationError(MALFORMED, f"the witness key {key.name} is given twice")
        keys[key.key_id] = key
    return list(keys.values())


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

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Cosignature:
        """As stored by doc()."""
        return cls(doc["name"], bytes.fromhex(doc["keyId"]), int(doc["timestamp"]), doc["line"])


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
        return Cosignature(self.name, self.key_id, ts, format_signature(self.name, raw))


def cosignatures(note: str, witnesses: list[Verifier]) -> tuple[str, list[Cosignature]]:
    """The checkpoint text of `note` and the valid cosignatures on it by `witnesses`. Lines by
    other keys are ignored. Raises VerificationError: BAD_SIGNATURE for a line by a witness's
    name and key ID that does not verify, MALFORMED for a witness's second line (each is
    verified once: a note cannot make us verify one line many times)."""
    text, signatures = split_note(note)
    known = {(w.name, w.key_id): w for w in witnesses}
    found: dict[bytes, Cosignature] = {}
    for name, raw in signatures:
        witness = known.get((name, raw[:4]))
        if witness is None:
            continue
        if witness.key_id in found:
            raise VerificationError(MALFORMED, f"the note carries two cosignatures by {name}")
        if len(raw) != 4 + 8 + 64:
            raise VerificationError(
                MALFORMED, f"cosignature by {name} is {len(raw)} bytes, want 76"
            )
        ts = int.from_bytes(raw[4:12], "big")
        if ts > MAX_TIMESTAMP or not witness.verify(cosigned_message(text, ts), raw[12:]):
            raise VerificationError(
                BAD_SIGNATURE, f"cosignature by {name} ({raw[:4].hex()}) does not verify"
            )
        found[witness.key_id] = Cosignature(name, witness.key_id, ts, format_signature(name, raw))
    return text, list(found.values())
