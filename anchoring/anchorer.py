"""Anchoring: the leader signs checkpoints of the published tree into `notarizations`.

Before signing size n it proves, from stored tiles, that the tree is consistent with the last
checkpoint it signed, and refuses otherwise. Notarizations are append-only, keyed by size.

Key rotation (anchoring.keys): the anchorer holds one or more signing keys and the log's key set
from configuration. A checkpoint of size n is signed by every held key the key set puts in force
at n (both keys during a rotation's transition), and a stored checkpoint counts only when a key
in force at its size signed it: the database never names a key the log trusts.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bson import Binary
from pymongo.errors import DuplicateKeyError

from anchoring.cosignature import Cosignature
from anchoring.errors import AnchorRefused
from anchoring.keys import KeySet
from anchoring.note import Checkpoint, Signer
from anchoring.proofs import consistency_proof
from anchoring.store import Doc, LogStore
from anchoring.tiles import TileReader
from anchoring.verify import VerificationError, verify_consistency

log = logging.getLogger("rxledger.anchorer")


@dataclass(frozen=True)
class AnchorSettings:
    interval: float = 1.0  # seconds between checkpoints while the tree grows
    max_leaves: int = 1000  # or sooner, once this many leaves are unanchored


@dataclass(frozen=True)
class SignedCheckpoint:
    origin: str
    size: int
    root_hash: bytes
    note: str  # as the log signed it
    anchored_at: dt.datetime
    cosignatures: tuple[Cosignature, ...] = ()  # by witnesses, checked when they were added

    @classmethod
    def from_doc(cls, doc: Doc) -> SignedCheckpoint:
        cosigs = sorted(
            map(Cosignature.from_doc, (doc.get("cosignatures") or {}).values()),
            key=lambda c: (c.name, c.key_id),
        )
        return cls(
            doc["origin"],
            int(doc["size"]),
            bytes(doc["rootHash"]),
            doc["note"],
            doc["anchoredAt"],
            tuple(cosigs),
        )

    @property
    def witnessed_note(self) -> str:
        """The signed note with the witnesses' cosignature lines after the log's signature."""
        return self.note + "".join(c.line for c in self.cosignatures)


def checked_checkpoint(doc: Doc, keys: KeySet, origin: str) -> SignedCheckpoint:
    """A stored checkpoint, once its note carries the valid signature of a log key in force at
    its size and its stored size, root and key agree with that note: the database's copy of a
    checkpoint is trusted for nothing the signature does not cover. Raises AnchorRefused."""
    try:
        cp = keys.open_checkpoint(doc["note"], origin).checkpoint
    except (VerificationError, KeyError, TypeError) as exc:
        raise AnchorRefused(f"stored checkpoint {doc.get('_id')} does not verify: {exc}") from exc
    try:
        signed = SignedCheckpoint.from_doc(doc)
    except (KeyError, TypeError, ValueError) as exc:
        raise AnchorRefused(f"stored checkpoint {doc.get('_id')} is malformed: {exc}") from exc
    if not cp.size == signed.size == doc.get("_id") or cp.root_hash != signed.root_hash:
        raise AnchorRefused(
            f"stored checkpoint {doc.get('_id')} fields disagree with its signed note"
        )
    return signed


class Anchorer:
    def __init__(
        self,
        store: LogStore,
        signer: Signer,
        reader: TileReader,
        settings: AnchorSettings | None = None,
        name_newest: Callable[[Doc], Awaitable[object]] | None = None,
        keys: KeySet | None = None,
        signers: tuple[Signer, ...] = (),
    ):
        self.store = store
        self.signer = signer
        # The keys held (`signer` first) and the key set saying which signs what sizes
        # (default: `signer` alone, for every size).
        self.signers = (signer, *(s for s in signers if s.key_id != signer.key_id))
        self.keys = keys or KeySet.single(signer.verifier(), signer.verifier_key)
        self.reader = reader
        self.settings = settings or AnchorSettings()
        # Writes fields to the head (the leader's fenced update): before each checkpoint is
        # notarized, the head names it and the one before (LogStore.newest_notarization).
        self.name_newest = name_newest
        self.latest: SignedCheckpoint | None = None
        # time.monotonic() of this process's last checkpoint; never yet, so the first is due at
        # once (0.0 would be the host's boot: nothing signed during its first interval of uptime)
        self.last_anchor = -math.inf

    async def load_latest(self) -> SignedCheckpoint | None:
        """The newest notarized checkpoint (also one signed just before a crash, which the
        head does not name yet), checked against our key."""
        head = await self.store.head()
        named = head.get("checkpointSize")
        newest = await self.store.newest_notarization()
        if named is not None and (newest is None or newest["_id"] < named):
            raise AnchorRefused(
                f"the head names checkpoint {named}, which is missing from notarizations"
            )
        self.latest = self._checked(newest) if newest is not None else None
        return self.latest

    def _checked(self, doc: Doc) -> SignedCheckpoint:
        return checked_checkpoint(doc, self.keys, self.store.origin)

    def signers_for(self, size: int) -> list[Signer]:
        """The held keys the key set puts in force at `size`, the log's key first. Raises
        AnchorRefused when it puts none of them in force there."""
        in_force = {(k.verifier.name, k.verifier.key_id) for k in self.keys.for_size(size)}
        found = [s for s in self.signers if (s.name, s.key_id) in in_force]
        if not found:
            held = ", ".join(f"{s.name}+{s.key_id.hex()}" for s in self.signers)
            wanted = ", ".join(k.label for k in self.keys.for_size(size)) or "none"
            raise AnchorRefused(
                f"no signing key held may sign a checkpoint of size {size}: held {held}; "
                f"the log's key set puts in force {wanted}: configure the private key of one"
            )
        return found

    def due(self, size: int) -> bool:
        anchored = self.latest.size if self.latest else 0
        if size <= anchored and self.latest is not None:
            return False
        if size - anchored >= self.settings.max_leaves:
            return True
        return time.monotonic() - self.last_anchor >= self.settings.interval

    async def anchor(self, size: int, root: bytes) -> SignedCheckpoint:
        """Sign the tree (size, root) after proving it consistent with the last checkpoint."""
        prev = self.latest
        if prev is not None:
            if size < prev.size:
                raise AnchorRefused(
                    f"tree size {size} is smaller than the last checkpoint {prev.size}"
                )
            proof = await consistency_proof(self.reader, prev.size, size, size)
            try:
                verify_consistency(prev.size, size, prev.root_hash, root, proof)
            except VerificationError as exc:
                raise AnchorRefused(
                    f"tree {size} is not consistent with checkpoint {prev.size}: {exc}; refusing to sign"
                ) from exc
        signers = self.signers_for(size)
        if self.name_newest is not None:
            await self.name_newest(
                {"newestCheckpoint": size, "priorCheckpoint": None if prev is None else prev.size}
            )
        text = Checkpoint(self.store.origin, size, root).text()
        note = text + "\n" + "".join(s.signature_line(text) for s in signers)
        doc = {
            "_id": size,
            "origin": self.store.origin,
            "size": size,
            "rootHash": Binary(root),
            "note": note,
            "keyName": signers[0].name,
            "keyId": signers[0].key_id.hex(),
            "anchoredAt": dt.datetime.now(dt.UTC),
        }
        try:
            await self.store.notarizations.insert_one(doc)
        except DuplicateKeyError:
            # Signed before a crash, not yet recorded in the head: adopt it if it is the same tree.
            existing = await self.store.notarizations.find_one({"_id": size})
            if existing is None or bytes(existing["rootHash"]) != root:
                raise AnchorRefused(
                    f"a different checkpoint of size {size} is already notarized"
                ) from None
            doc = existing
        self.latest = self._checked(doc)
        self.last_anchor = time.monotonic()
        log.info(
            "anchor: signed checkpoint %s at size %d with %s",
            self.store.origin,
            size,
            ", ".join(f"{s.name}+{s.key_id.hex()}" for s in signers),
        )
        return self.latest
