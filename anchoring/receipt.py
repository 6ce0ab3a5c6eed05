"""Signed receipts: the log's promise for a leaf that is sequenced but not yet anchored.

A receipt is a C2SP signed note by the log key whose text is

    <origin>
    receipt
    <leaf index>
    <base64 leaf hash>
    <time, RFC 3339 UTC>

Its second line is not a number, so no receipt can be mistaken for a checkpoint signed by the
same key. A receipt is superseded by an inclusion proof once a checkpoint covers the leaf.

A leaf is signed once: `ReceiptCache` keeps each receipt by what it signs (the key, the
origin, the leaf index and the leaf hash), so every later request for the same leaf gets the
same note, with the time of that first signature.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from dataclasses import dataclass

from anchoring.encoding import b64, unb64
from anchoring.note import Signer, Verifier, open_note
from anchoring.verify import MALFORMED, ORIGIN_MISMATCH, VerificationError

RECEIPT_LINE = "receipt"


@dataclass(frozen=True)
class Receipt:
    origin: str
    leaf_index: int
    leaf_hash: bytes
    issued_at: dt.datetime
    note: str


def _timestamp(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sign_receipt(
    signer: Signer, origin: str, leaf_index: int, leaf_hash: bytes, at: dt.datetime
) -> Receipt:
    """Requires leaf_index >= 0 and a 32-byte leaf hash."""
    if leaf_index < 0 or len(leaf_hash) != 32:
        raise ValueError("a receipt needs a leaf index >= 0 and a 32-byte leaf hash")
    at = at.astimezone(dt.UTC).replace(microsecond=at.microsecond // 1000 * 1000)
    text = f"{origin}\n{RECEIPT_LINE}\n{leaf_index}\n{b64(leaf_hash)}\n{_timestamp(at)}\n"
    return Receipt(origin, leaf_index, leaf_hash, at, signer.sign_note(text))


def open_receipt(note: str, verifiers: list[Verifier], origin: str | None = None) -> Receipt:
    """Check a receipt's signature by one of `verifiers` and parse it. Raises VerificationError
    (MALFORMED, BAD_SIGNATURE, UNKNOWN_KEY or ORIGIN_MISMATCH)."""
    text, _ = open_note(note, verifiers)
    lines = text.split("\n")
    if len(lines) != 6 or lines[1] != RECEIPT_LINE or lines[5] != "":
        raise VerificationError(
            MALFORMED, "not a receipt: want origin, 'receipt', index, leaf hash and time"
        )
    if origin is not None and lines[0] != origin:
        raise VerificationError(ORIGIN_MISMATCH, f"receipt origin {lines[0]!r}, want {origin!r}")
    if not lines[2].isdigit() or (lines[2] != "0" and lines[2].startswith("0")):
        raise VerificationError(
            MALFORMED, f"receipt leaf index {lines[2]!r} is not a decimal number"
        )
    try:
        leaf_hash = unb64(lines[3], "leaf hash")
        at = dt.datetime.fromisoformat(lines[4].replace("Z", "+00:00"))
    except ValueError as exc:
        raise VerificationError(MALFORMED, f"receipt: {exc}") from None
    if len(leaf_hash) != 32:
        raise VerificationError(MALFORMED, f"receipt leaf hash has {len(leaf_hash)} bytes, want 32")
    return Receipt(lines[0], int(lines[2]), leaf_hash, at, note)


class ReceiptCache:
    """Receipts already signed, by everything a receipt signs but its time: the signing key,
    the origin, the leaf index and the leaf hash. Other bytes at that index (an edited
    entry, other tiles) have another hash and so another receipt; the cache never vouches for
    a hash the caller has not checked against the tree. At most `max_receipts`, the least
    recently used forgotten first; `hits` and `misses` count the answers."""

    def __init__(self, max_receipts: int = 65536) -> None:
        self.max_receipts = max_receipts
        self.hits = 0
        self.misses = 0
        self._receipts: OrderedDict[tuple[str, str, int, bytes], Receipt] = OrderedDict()

    def __len__(self) -> int:
        return len(self._receipts)

    def receipt(
        self, signer: Signer, origin: str, leaf_index: int, leaf_hash: bytes, at: dt.datetime
    ) -> Receipt:
        """The receipt `sign_receipt` makes, signed at `at` the first time and the same
        receipt afterwards. Requires leaf_index >= 0 and a 32-byte leaf hash."""
        key = (signer.verifier_key, origin, leaf_index, leaf_hash)
        found = self._receipts.get(key)
        if found is not None:
            self._receipts.move_to_end(key)
            self.hits += 1
            return found
        self.misses += 1
        signed = sign_receipt(signer, origin, leaf_index, leaf_hash, at)
        self._receipts[key] = signed
        while len(self._receipts) > self.max_receipts:
            self._receipts.popitem(last=False)
        return signed
