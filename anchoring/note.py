"""C2SP signed notes and tlog checkpoints with Ed25519 keys.

signed-note: a UTF-8 text ending in a newline, a blank line, then signature lines
"— <key name> <base64(4-byte key ID || signature)>". The key ID of an Ed25519 key is
SHA-256(name || 0x0A || 0x01 || public key)[:4]; a verifier key reads
"<name>+<8 hex key ID>+<base64(0x01 || public key)>". tlog-checkpoint: the note text is
"<origin>\n<tree size>\n<base64 root hash>\n" followed by optional extension lines.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from anchoring.encoding import EncodingError, b64, unb64
from anchoring.hashing import HASH_SIZE
from anchoring.verify import (
    BAD_SIGNATURE,
    MALFORMED,
    ORIGIN_MISMATCH,
    UNKNOWN_KEY,
    VerificationError,
)

ALG_ED25519 = 0x01
SIG_PREFIX = "\u2014 "  # em dash and a space
MAX_NOTE_BYTES = 1 << 20
MAX_SIGNATURES = 100  # as Go's sumdb/note: a note cannot make a verifier check without end
MAX_TREE_SIZE = (1 << 64) - 1  # a uint64
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


def key_id(name: str, public_key: bytes, alg: int = ALG_ED25519) -> bytes:
    """SHA-256(name || 0x0A || alg || public key)[:4]: alg 0x01 for note signatures, 0x04 for
    C2SP tlog-cosignature/v1 cosignatures."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public_key).digest()[:4]


def check_key_name(name: str) -> None:
    if not name or any(c in name for c in "+ \t\n\r") or not name.isprintable():
        raise ValueError(
            f"key name {name!r} must be non-empty printable text without '+' or spaces"
        )


@dataclass(frozen=True)
class Verifier:
    name: str
    key_id: bytes
    public_key: Ed25519PublicKey

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self.public_key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


def verifier_key_string(name: str, public_key: bytes, alg: int = ALG_ED25519) -> str:
    check_key_name(name)
    return f"{name}+{key_id(name, public_key, alg).hex()}+{b64(bytes([alg]) + public_key)}"


def parse_verifier_key(text: str) -> Verifier:
    """Parse "<name>+<hex id>+<base64(0x01 || key)>"; raises VerificationError(MALFORMED) on bad
    input."""
    return parse_key(text, ALG_ED25519)


def parse_key(text: str, alg: int) -> Verifier:
    """Parse a vkey "<name>+<hex id>+<base64(alg || Ed25519 key)>" of signature type `alg`."""
    parts = text.strip().split("+", 2)  # the base64 key may itself contain '+'
    if len(parts) != 3:
        raise VerificationError(
            MALFORMED, "verifier key must read <name>+<8 hex key ID>+<base64 key>"
        )
    name, hex_id, key_b64 = parts
    try:
        check_key_name(name)
        raw = unb64(key_b64, "verifier key")
        kid = bytes.fromhex(hex_id)
    except (ValueError, EncodingError) as exc:
        raise VerificationError(MALFORMED, f"verifier key: {exc}") from exc
    if len(kid) != 4:
        raise VerificationError(MALFORMED, f"verifier key ID must be 8 hex digits, got {hex_id!r}")
    if len(raw) != 33 or raw[0] != alg:
        raise VerificationError(
            MALFORMED, f"verifier key must be 0x{alg:02x} followed by a 32-byte Ed25519 key"
        )
    if key_id(name, raw[1:], alg) != kid:
        raise VerificationError(MALFORMED, f"verifier key ID {hex_id} does not match the key")
    return Verifier(name, kid, Ed25519PublicKey.from_public_bytes(raw[1:]))


def format_signature(name: str, raw: bytes) -> str:
    """A note's signature line: "— <key name> <base64(key ID || signature)>" and a newline."""
    return f"{SIG_PREFIX}{name} {b64(raw)}\n"


class Signer:
    """An Ed25519 note signer with its signed-note name."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        check_key_name(name)
        self.name = name
        self.private_key = private_key
        self.public_bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.key_id = key_id(name, self.public_bytes)
        self.verifier_key = verifier_key_string(name, self.public_bytes)

    def signature_line(self, text: str) -> str:
        sig = self.private_key.sign(text.encode())
        return format_signature(self.name, self.key_id + sig)

    def sign_note(self, text: str) -> str:
        if not text.endswith("\n"):
            raise ValueError("note text must end with a newline")
        return text + "\n" + self.signature_line(text)

    def verifier(self) -> Verifier:
        return Verifier(self.name, self.key_id, self.private_key.public_key())


def split_note(note: str) -> tuple[str, list[tuple[str, bytes]]]:
    """A signed note's text and its signatures as (key name, key ID || signature) pairs, in
    order; raises VerificationError(MALFORMED) when the note does not parse."""
    if len(note.encode()) > MAX_NOTE_BYTES:
        raise VerificationError(MALFORMED, "note is larger than 1 MiB")
    sep = note.rfind("\n\n")
    if sep < 0 or not note.endswith("\n"):
        raise VerificationError(
            MALFORMED, "signed note must be text, a blank line and signature lines"
        )
    text, sig_block = note[: sep + 1], note[sep + 2 :]
    for ch in note:
        if (ord(ch) < 0x20 and ch != "\n") or ch == "\x7f":
            raise VerificationError(MALFORMED, f"note contains control character {ch!r}")
    signatures: list[tuple[str, bytes]] = []
    lines = sig_block.split("\n")[:-1]
    if not lines:
        raise VerificationError(MALFORMED, "signed note has no signature lines")
    if len(lines) > MAX_SIGNATURES:
        raise VerificationError(
            MALFORMED, f"signed note has {len(lines)} signature lines, at most {MAX_SIGNATURES}"
        )
    for line in lines:
        if not line.startswith(SIG_PREFIX):
            raise VerificationError(
                MALFORMED, f"signature line must start with an em dash: {line!r:.60}"
            )
        name, _, sig_b64 = line[len(SIG_PREFIX) :].partition(" ")
        if " " in sig_b64:
            raise VerificationError(
                MALFORMED, f"key names in signature lines have no spaces: {line!r:.60}"
            )
        try:
            raw = unb64(sig_b64, "signature")
        except EncodingError as exc:
            raise VerificationError(MALFORMED, str(exc)) from exc
        if not name or len(raw) < 5:
            raise VerificationError(MALFORMED, f"malformed signature line {line!r:.60}")
        signatures.append((name, raw))
    return text, signatures


def open_note(note: str, verifiers: list[Verifier]) -> tuple[str, list[str]]:
    """Split a signed note, check the signatures by known keys, return (text, names verified).

    Signatures by keys not in `verifiers` are ignored. Raises VerificationError: MALFORMED for
    a note that does not parse, BAD_SIGNATURE when a known key's signature does not verify,
    UNKNOWN_KEY when no known key signed it.
    """
    text, signatures = split_note(note)
    known = {(v.name, v.key_id): v for v in verifiers}
    verified: list[str] = []
    for name, raw in signatures:
        verifier = known.get((name, raw[:4]))
        if verifier is None:
            continue
        if not verifier.verify(text.encode(), raw[4:]):
            raise VerificationError(
                BAD_SIGNATURE, f"signature by {name} ({raw[:4].hex()}) does not verify"
            )
        verified.append(name)
    if not verified:
        names = ", ".join(f"{v.name}+{v.key_id.hex()}" for v in verifiers)
        raise VerificationError(UNKNOWN_KEY, f"note is not signed by the verifier key ({names})")
    return text, verified


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        ext = "".join(line + "\n" for line in self.extensions)
        return f"{self.origin}\n{self.size}\n{b64(self.root_hash)}\n{ext}"


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint body (the note text, without signatures)."""
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise VerificationError(MALFORMED, "checkpoint must have origin, size and root hash lines")
    origin, size_s, root_s = lines[0], lines[1], lines[2]
    if not origin:
        raise VerificationError(MALFORMED, "checkpoint origin line is empty")
    if not _DECIMAL.fullmatch(size_s):
        raise VerificationError(
            MALFORMED, f"checkpoint size {size_s!r:.30} is not a decimal number"
        )
    if len(size_s) > 20 or int(size_s) > MAX_TREE_SIZE:
        raise VerificationError(MALFORMED, f"checkpoint size {size_s:.30} is above 2^64 - 1")
    try:
        root = unb64(root_s, "checkpoint root hash")
    except EncodingError as exc:
        raise VerificationError(MALFORMED, str(exc)) from exc
    if len(root) != HASH_SIZE:
        raise VerificationError(
            MALFORMED, f"checkpoint root hash is {len(root)} bytes, want {HASH_SIZE}"
        )
    extensions = tuple(lines[3:-1])
    if any(not line for line in extensions):
        raise VerificationError(MALFORMED, "checkpoint extension lines must not be empty")
    return Checkpoint(origin, int(size_s), root, extensions)


def open_checkpoint(note: str, verifiers: list[Verifier], origin: str | None = None) -> Checkpoint:
    """Verify a signed checkpoint note and parse it; checks the origin when one is given."""
    text, _ = open_note(note, verifiers)
    cp = parse_checkpoint(text)
    if origin is not None and cp.origin != origin:
        raise VerificationError(
            ORIGIN_MISMATCH, f"checkpoint origin {cp.origin!r}, want {origin!r}"
        )
    return cp


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the signing key must be an Ed25519 private key")
    return key


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
