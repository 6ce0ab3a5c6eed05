"""TransparencyLog: the one object the application uses (append, proofs, checkpoints)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from bson import ObjectId
from pymongo.errors import PyMongoError

from anchoring.anchorer import Anchorer, AnchorSettings, SignedCheckpoint, checked_checkpoint
from anchoring.cosignature import Cosignature, cosignatures
from anchoring.encoding import b64
from anchoring.errors import AnchorRefused, CosignatureRejected, ProofUnavailable
from anchoring.hashing import leaf_hash
from anchoring.keys import KeySet, LogKey
from anchoring.ledger import Appended, Ledger
from anchoring.note import Signer, Verifier, parse_checkpoint
from anchoring.proofs import consistency_proof, inclusion_proof, inclusion_proofs
from anchoring.receipt import Receipt, ReceiptCache, sign_receipt
from anchoring.sequencer import LostLease, Sequencer, SequencerSettings
from anchoring.store import Doc, LogStore
from anchoring.tail import LogTail, Sequenced
from anchoring.tiles import (
    TileReader,
    read_entry_leaves,
)
from anchoring.treemath import Node
from anchoring.verify import VerificationError, verify_inclusion

log = logging.getLogger("rxledger.log")

MAX_CLOCK_SKEW = 600  # seconds a witness's cosignature may be dated ahead of this log's clock
# How often the leader looks whether another process took the cosignatures that complete the
# quorum of the newest checkpoint (only the leader writes the head: see _publish).
COSIGNED_POLL = 0.25
COSIGNATURE_WRITES = 5  # attempts at storing a cosignature the server lost to a concurrent write


@dataclass(frozen=True)
class LogSettings:
    sequencer: SequencerSettings = field(default_factory=SequencerSettings)
    anchor: AnchorSettings = field(default_factory=AnchorSettings)
    append_batch: int = 1000
    # Witnesses whose cosignatures the log accepts, and how many of them must cosign a
    # checkpoint before it is published (0: published as soon as it is signed).
    witnesses: tuple[Verifier, ...] = ()
    quorum: int = 0
    witness_hold: float = 30.0  # seconds a checkpoint waits for its quorum before a newer one

    def __post_init__(self) -> None:
        if not 0 <= self.quorum <= len(self.witnesses):
            raise ValueError(
                f"a quorum of {self.quorum} witnesses needs at least that many configured "
                f"witnesses; {len(self.witnesses)} are"
            )


class ChangeCounter(Protocol):
    """A number the processes serving one log together bump whenever one of them changes its
    checkpoints (signs one, publishes one, stores cosignatures), so that the others drop what
    they cached of them (app.workers.ServerState is one)."""

    def value(self) -> int: ...

    def bump(self) -> None: ...


@dataclass(frozen=True)
class InclusionProof:
    leaf_index: int
    tree_size: int
    leaf: bytes
    leaf_hash: bytes
    path: list[bytes]
    checkpoint: SignedCheckpoint

    @classmethod
    def against(
        cls, leaf_index: int, leaf: bytes, path: list[bytes], cp: SignedCheckpoint
    ) -> InclusionProof:
        """The proof of `leaf` at `leaf_index` with audit `path` in the tree of checkpoint `cp`."""
        return cls(leaf_index, cp.size, leaf, leaf_hash(leaf), path, cp)

    def holds(self) -> bool:
        """Whether the audit path rebuilds the checkpoint's root from this leaf: the signed
        tree holds these bytes at this index."""
        try:
            verify_inclusion(
                self.leaf_index,
                self.tree_size,
                self.leaf_hash,
                self.path,
                self.checkpoint.root_hash,
            )
        except VerificationError:
            return False
        return True

    def bundle(self) -> dict[str, Any]:
        """The proof bundle `rxledger verify` reads."""
        return {
            "leaf": b64(self.leaf),
            "leafIndex": self.leaf_index,
            "treeSize": self.tree_size,
            "inclusionPath": [b64(h) for h in self.path],
            "checkpoint": self.checkpoint.witnessed_note,
        }


class TransparencyLog:
    def __init__(
        self,
        store: LogStore,
        signer: Signer,
        settings: LogSettings | None = None,
        keys: KeySet | None = None,
        next_signer: Signer | None = None,
    ) -> None:
        """`signer` is the log's key; with a rotation, `keys` says which key signs which
        checkpoint sizes (anchoring.keys) and `next_signer` is the key rotated to."""
        self.store = store
        self.signer = signer
        self.settings = settings or LogSettings()
        self.reader = TileReader(store)
        self.ledger = Ledger(store, max_batch=self.settings.append_batch)
        self.sequencer = Sequencer(store, self.settings.sequencer, reader=self.reader)
        self.anchorer = Anchorer(
            store,
            signer,
            self.reader,
            self.settings.anchor,
            self.sequencer.fenced_update,
            keys,
            () if next_signer is None else (next_signer,),
        )
        self.keys = self.anchorer.keys
        self._rotating = keys is not None
        self.ledger.listeners.append(self.sequencer.wake)
        self.ledger.handoffs.append(self.sequencer.offer)
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.anchor_error: str | None = None
        self._anchor_epoch = -1
        # event id -> leaf index: immutable once sequenced, so cached for good (bounded LRU)
        self._indices: OrderedDict[ObjectId, int] = OrderedDict()
        self._indices_max = 200_000
        self.tail = LogTail(store)
        self.tail.listeners.append(self._remember_sequenced)
        # The leader hands what it published straight to the tail: no read back.
        self.sequencer.on_publish.append(lambda size, root, entries: self.tail.offer(entries))
        self._tail_task: asyncio.Task[None] | None = None
        self._latest: tuple[float, SignedCheckpoint | None] = (0.0, None)
        self._newest: tuple[float, SignedCheckpoint | None] = (0.0, None)
        # With other processes serving the same log: their changes to checkpoints.
        self.peers: ChangeCounter | None = None
        self._peers_seen = 0
        self._cosigning = asyncio.Lock()  # one cosignature write at a time per process
        self._cosigned_checked = 0.0
        self._checked_notes: dict[tuple[Any, Any, Any], SignedCheckpoint] = {}
        self._known_size = 0  # the largest published size this process has read
        self.receipts = ReceiptCache()  # each leaf signed once

    @property
    def running(self) -> bool:
        """Whether the background sequencer task is alive."""
        return self._task is not None and not self._task.done()

    @property
    def origin(self) -> str:
        return self.store.origin

    @property
    def verifier_key(self) -> str:
        """The verifier key of the key that signs now (the newest in force)."""
        return self.current_signer.verifier_key

    @property
    def current_signer(self) -> Signer:
        """The newest held key in force for the next checkpoint (receipts are signed with it);
        the log's key without a key set, or when none is (the anchorer then refuses, saying
        why)."""
        if not self._rotating:
            return self.signer
        try:
            return self.anchorer.signers_for(max(self._known_size, self.sequencer.size) + 1)[-1]
        except AnchorRefused:
            return self.signer

    def key_history(self) -> tuple[LogKey, ...]:
        """The log's verifier keys with the checkpoint sizes each signs (from configuration)."""
        return self.keys.keys

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, sequence: bool = True, follow: bool = True) -> None:
        """Start sequencing (and following the log) in the background. Needs no database yet:
        the sequencer creates the indexes when it first takes the lease, and both retry while
        the database is away."""
        if follow:
            self._stopping.clear()
            self._tail_task = asyncio.create_task(self.tail.run(self._stopping), name="tail")
        if sequence:
            self._stopping.clear()
            self._task = asyncio.create_task(
                self.sequencer.run(self._stopping, self._after_batch), name="sequencer"
            )

    async def stop(self) -> None:
        self._stopping.set()
        await self.ledger.close()
        if self._task is not None:
            await self._task
            self._task = None
        if self._tail_task is not None:
            await self._tail_task
            self._tail_task = None

    async def _after_batch(self) -> None:
        if self._anchor_epoch != self.sequencer.epoch:
            try:
                await self.anchorer.load_latest()  # another leader may have signed meanwhile
            except AnchorRefused as exc:
                # Sequencing goes on; nothing is signed until the newest checkpoint verifies
                # (a key rotation that is not configured, or a stored checkpoint edited).
                self.anchor_error = str(exc)
                log.error("anchor: %s", exc)
                return
            self._anchor_epoch = self.sequencer.epoch
        if self.settings.quorum:
            await self._publish_cosigned()
        if not self.anchorer.due(self.sequencer.size) or self._waiting_for_witnesses():
            return
        try:
            cp = await self.anchorer.anchor(self.sequencer.size, self.sequencer.root)
        except AnchorRefused as exc:
            self.anchor_error = str(exc)
            log.error("anchor: %s", exc)
            return
        self.anchor_error = None
        self._checkpoints_changed()
        if self.settings.quorum == 0:
            await self._publish(cp.size)
        # Otherwise the checkpoint is published when its quorum of witnesses has cosigned it
        # (add_cosignatures in this process, _publish_cosigned for the others).

    # --- witnesses ----------------------------------------------------------------------

    def _waiting_for_witnesses(self) -> bool:
        """Whether to hold the next checkpoint back while witnesses cosign the last one: each
        witness cosigns the newest checkpoint it sees, so a quorum forms only on a checkpoint
        that stays the newest long enough. After `witness_hold` seconds a newer one is signed
        all the same, for witnesses that come back later to have a fresh one to cosign."""
        latest = self.anchorer.latest
        if self.settings.quorum == 0 or latest is None or latest.size == 0:
            return False  # (the empty tree's checkpoint holds nothing worth waiting for)
        if self.sequencer.checkpoint_size >= latest.size:
            return False  # published
        return time.monotonic() - self.anchorer.last_anchor < self.settings.witness_hold

    async def add_cosignatures(self, note: str) -> SignedCheckpoint:
        """Store the configured witnesses' cosignatures found on `note`, a checkpoint this log
        signed, and publish it once its quorum has cosigned. Returns the checkpoint with all
        its cosignatures. Raises CosignatureRejected."""
        try:
            text, found = cosignatures(note, list(self.settings.witnesses))
            cp = parse_checkpoint(text)
        except VerificationError as exc:
            raise CosignatureRejected(str(exc)) from exc
        if not found:
            names = ", ".join(w.name for w in self.settings.witnesses) or "none"
            raise CosignatureRejected(
                f"the note carries no cosignature by a witness this log accepts (configured: {names})"
            )
        latest = time.time() + MAX_CLOCK_SKEW
        for c in found:
            if c.timestamp > latest:
                raise CosignatureRejected(
                    f"the cosignature by {c.name} is dated {c.timestamp}, in the future "
                    f"(more than {MAX_CLOCK_SKEW} s ahead of this log's clock)"
                )
        async with self._cosigning:
            doc = await self._store_cosignatures(cp.size, text, found)
        self._checkpoints_changed()
        signed = SignedCheckpoint.from_doc(doc)
        if self.has_quorum(signed):
            await self._publish(signed.size)
        return signed

    async def _store_cosignatures(self, size: int, text: str, found: list[Cosignature]) -> Doc:
        """Add each witness's first cosignature to the document of checkpoint `size`, which
        must be the checkpoint `text` this log signed, and read it back to see them there: a
        server whose updates read the document and write it back whole (FerretDB v1) can lose
        one of two updates made at once by two processes. A witness whose cosignature the log
        still loses sends it again, seeing it missing from the checkpoint (app.witness)."""
        for _ in range(COSIGNATURE_WRITES):
            doc = await self.store.notarizations.find_one({"_id": size})
            if doc is None or not str(doc.get("note", "")).startswith(text + "\n"):
                raise CosignatureRejected(
                    f"this log has not signed that checkpoint of size {size}: a witness saw "
                    "a checkpoint this log never made"
                )
            stored = doc.get("cosignatures") or {}
            missing = [c for c in found if f"k{c.key_id.hex()}" not in stored]
            if not missing:
                return doc
            for c in missing:  # the first cosignature of each witness stays
                field = f"cosignatures.k{c.key_id.hex()}"
                await self.store.notarizations.update_one(
                    {"_id": size, field: {"$exists": False}}, {"$set": {field: c.doc()}}
                )
        raise PyMongoError(f"the cosignatures of checkpoint {size} could not be stored")

    def _accepted(self, cp: SignedCheckpoint) -> list[Cosignature]:
        ids = {w.key_id for w in self.settings.witnesses}
        return [c for c in cp.cosignatures if c.key_id in ids]

    def has_quorum(self, cp: SignedCheckpoint) -> bool:
        """Whether witnesses are required and `cp` carries the cosignatures of enough of them
        to be published."""
        return self.settings.quorum > 0 and len(self._accepted(cp)) >= self.settings.quorum

    async def _publish(self, size: int) -> None:
        """Name checkpoint `size` (signed, and cosigned by its quorum) in the head. Only the
        sequencer's leader writes the head, one write at a time: a server whose updates read the
        document and write it back whole (FerretDB v1) would otherwise lose one of two at once,
        and with it a publication or the sequencer's own size. In a process that does not
        lead this does nothing: the leader finds the quorum itself (_publish_cosigned)."""
        try:
            published = await self.sequencer.publish_checkpoint(size)
        except LostLease:
            return  # the next leader finds it
        if published:
            self._checkpoints_changed()
            self.tail.wake()

    async def _publish_cosigned(self) -> None:
        """The leader's look, every COSIGNED_POLL seconds, at whether the newest checkpoint has
        its quorum, whichever process took the cosignatures."""
        latest = self.anchorer.latest
        if latest is None or latest.size <= self.sequencer.checkpoint_size:
            return
        now = time.monotonic()
        if now - self._cosigned_checked < COSIGNED_POLL:
            return
        self._cosigned_checked = now
        doc = await self.store.notarizations.find_one({"_id": latest.size})
        if doc is not None:
            cp = SignedCheckpoint.from_doc(doc)
            if self.has_quorum(cp):
                await self._publish(cp.size)

    def _checkpoints_changed(self) -> None:
        """This process changed the checkpoints: drop what it cached of them, and tell its
        peers to do the same."""
        self._latest = self._newest = (0.0, None)
        if self.peers is not None:
            self.peers.bump()
            self._peers_seen = self.peers.value()

    def _forget_if_peers_changed(self) -> None:
        if self.peers is not None and (seen := self.peers.value()) != self._peers_seen:
            self._peers_seen = seen
            self._latest = self._newest = (0.0, None)

    async def newest_checkpoint(self, max_age: float = 0.0) -> SignedCheckpoint | None:
        """The newest signed checkpoint, published or still waiting for its witnesses, at
        most `max_age` seconds stale (and never older than a change a peer made)."""
        self._forget_if_peers_changed()
        now = time.monotonic()
        fetched_at, cp = self._newest
        if now - fetched_at > max_age or max_age == 0:
            newest = await self.store.newest_notarization()
            cp = SignedCheckpoint.from_doc(newest) if newest is not None else None
            self._newest = (now, cp)
        return cp

    async def witness_status(self) -> dict[str, Any]:
        """Whether checkpoints wait for witnesses, which of them are missing on the newest
        checkpoint, and how long the oldest unpublished checkpoint has waited."""
        settings = self.settings
        newest = await self.newest_checkpoint()
        published = await self.latest_checkpoint()
        published_size = published.size if published else -1
        cosigned = {c.key_id for c in self._accepted(newest)} if newest else set()
        waiting = newest is not None and newest.size > published_size
        waited = 0.0
        if waiting:
            oldest = await self.store.notarizations.find_one(
                {"_id": {"$gt": published_size}}, sort=[("_id", 1)]
            )
            if oldest is not None:
                since = SignedCheckpoint.from_doc(oldest).anchored_at.replace(tzinfo=dt.UTC)
                waited = round((dt.datetime.now(dt.UTC) - since).total_seconds(), 3)
        return {
            "required": settings.quorum,
            "configured": [w.name for w in settings.witnesses],
            "newestSignedSize": newest.size if newest else None,
            "publishedSize": published.size if published else None,
            "cosignedNewest": [w.name for w in settings.witnesses if w.key_id in cosigned],
            "missing": [w.name for w in settings.witnesses if w.key_id not in cosigned]
            if waiting
            else [],
            "waitingSeconds": waited,
        }

    # --- writes -------------------------------------------------------------------------

    async def append(
        self,
        subject: str,
        version: int,
        header: dict[str, Any],
        data: dict[str, Any] | None = None,
        event_id: ObjectId | None = None,
        tags: dict[str, str | None] | None = None,
        clears_tags: tuple[str, ...] = (),
    ) -> Appended:
        """Append an event. Its id is derived from (subject, version)
        (anchoring.ledger.event_id), so that a subject's events are found by `_id`; an
        `event_id` given must be that one (any other is refused as InvalidEvent). `tags` go with the sequenced entry, for followers of the log; `clears_tags` are
        withdrawn from the subject's earlier entries once this event is sequenced."""
        return await self.ledger.append(subject, version, header, data, event_id, tags, clears_tags)

    # --- reads ----------------------------------------------------------------------------

    async def published_size(self) -> int:
        size = int((await self.store.head()).get("size", 0))
        self._known_size = max(self._known_size, size)
        return size

    async def published_checkpoint_size(self) -> int | None:
        """The size of the published checkpoint the head names (None before the first)."""
        size = (await self.store.head()).get("checkpointSize")
        return None if size is None else int(size)

    async def latest_checkpoint(self) -> SignedCheckpoint | None:
        size = await self.published_checkpoint_size()
        return None if size is None else await self.checkpoint(size)

    async def checkpoint(self, size: int) -> SignedCheckpoint | None:
        """The checkpoint of `size`, as its signed note says: None when there is none, or when
        the stored one does not carry this log's valid signature (logged as an error)."""
        doc = await self.store.notarizations.find_one({"_id": size})
        return None if doc is None else self._signed(doc)

    def _signed(self, doc: Doc) -> SignedCheckpoint | None:
        """A stored checkpoint checked against its signature (once per note: notes are
        immutable, so a cached check stays true for the same text)."""
        key = (doc.get("_id"), doc.get("note"), doc.get("rootHash"))
        checked = self._checked_notes.get(key)
        if checked is None:
            try:
                checked = checked_checkpoint(doc, self.keys, self.origin)
            except AnchorRefused as exc:
                log.error("checkpoint: not used: %s", exc)
                return None
            self._checked_notes[key] = checked
            while len(self._checked_notes) > 1024:
                self._checked_notes.pop(next(iter(self._checked_notes)))
        # The cosignatures may have grown since: they are checked when added, and by clients.
        return SignedCheckpoint.from_doc(doc) if doc.get("cosignatures") else checked

    async def checkpoints(self, after_size: int = -1, limit: int = 100) -> list[SignedCheckpoint]:
        """Published checkpoints (those witnesses still have to cosign are left out), by size."""
        published = await self.published_checkpoint_size()
        if published is None:
            return []
        cursor = (
            self.store.notarizations.find({"_id": {"$gt": after_size, "$lte": published}})
            .sort("_id", 1)
            .limit(limit)
        )
        return [cp async for d in cursor if (cp := self._signed(d)) is not None]

    async def entry_leaves(self, index: int, width: int, published_size: int) -> list[bytes]:
        """The `width` leaves of tlog-tiles entry bundle `index`; raises TileNotFound when the
        tree of `published_size` does not have them all, TileCorrupt when entries are missing."""
        return await read_entry_leaves(self.store, index, width, published_size)

    async def entry(self, index: int) -> Doc | None:
        return await self.store.entries.find_one({"_id": index})

    async def leaf_index(self, event_id: ObjectId) -> int | None:
        return (await self.leaf_indices([event_id])).get(event_id)

    def _remember_sequenced(self, batch: list[Sequenced]) -> None:
        for entry in batch:
            self._remember_index(entry.event_id, entry.index)

    def _remember_index(self, event_id: ObjectId, index: int) -> None:
        self._indices[event_id] = index
        self._indices.move_to_end(event_id)
        while len(self._indices) > self._indices_max:
            self._indices.popitem(last=False)

    async def leaf_indices(self, event_ids: list[ObjectId]) -> dict[ObjectId, int]:
        """The leaf index of each event that is sequenced and published, from its position
        (lookups by `_id`; `entries` only for an older log's events: LogStore.entry_indices).
        Indices never change, so they are cached. Not evidence: a caller compares the leaf
        the tree holds at the index with the event's own."""
        found = {e: self._indices[e] for e in event_ids if e in self._indices}
        missing = [e for e in event_ids if e not in found]
        if missing:
            head = await self.store.head()
            size = int(head.get("size", 0))
            self._known_size = max(self._known_size, size)
            for event, index in (await self.store.entry_indices(missing, head)).items():
                if index < size:  # beyond the head: written by a leader that may not publish
                    found[event] = index
                    self._remember_index(event, index)
        return found

    async def current_checkpoint(self, max_age: float = 0.5) -> SignedCheckpoint | None:
        """The latest checkpoint, at most `max_age` seconds stale: for request paths, where a
        read of the head per request would cost more than the proof itself. Never older than
        a change a peer made."""
        self._forget_if_peers_changed()
        now = time.monotonic()
        fetched_at, cp = self._latest
        if now - fetched_at > max_age:
            cp = await self.latest_checkpoint()
            self._latest = (now, cp)
        return cp

    async def prove(self, leaf_index: int, leaf: bytes, cp: SignedCheckpoint) -> InclusionProof:
        """Inclusion proof of a leaf the caller holds, against checkpoint `cp`; raises
        ProofUnavailable when the signed tree does not hold those bytes at that index (the
        stored entry or tiles were edited). Requires 0 <= leaf_index < cp.size."""
        path = await inclusion_proof(self.reader, leaf_index, cp.size, cp.size)
        proof = InclusionProof.against(leaf_index, leaf, path, cp)
        if not proof.holds():
            raise ProofUnavailable(
                f"entry {leaf_index} is not the leaf the signed tree of size {cp.size} holds: "
                "the log's storage was edited (run rxledger audit)"
            )
        return proof

    async def inclusion_paths(self, indices: list[int], size: int) -> list[list[bytes]]:
        """Audit paths of several leaves in the tree of `size` (a published size), from one
        read of tiles."""
        return await inclusion_proofs(self.reader, indices, size, size)

    async def leaf_hashes(self, indices: list[int]) -> dict[int, bytes]:
        """The tree's own leaf hashes (level 0 of the tiles) at published indices, from one
        read of tiles: what a receipt may sign, since no checkpoint covers them yet."""
        if not indices:
            return {}
        # Any size once published still reads the same tiles (they are immutable): the head is
        # read again only for an index beyond the largest size seen.
        size = self._known_size
        if max(indices) >= size:
            size = await self.published_size()
        nodes = await self.reader.nodes([Node(0, i) for i in indices if i < size], size)
        return {node.index: digest for node, digest in nodes.items()}

    async def receipt(self, leaf_index: int, leaf: bytes, at: dt.datetime | None = None) -> Receipt:
        """A signed receipt for a sequenced leaf not yet covered by a checkpoint. The log signs
        only the leaf its own tree holds at that index (level 0 of its tiles); raises
        ProofUnavailable for any other bytes. Signed once per leaf (`tree_receipt`), unless
        a time `at` is asked for."""
        digest = leaf_hash(leaf)
        if (await self.leaf_hashes([leaf_index])).get(leaf_index) != digest:
            raise ProofUnavailable(
                f"entry {leaf_index} is not the leaf the tree holds at that index: no receipt "
                "(run rxledger audit)"
            )
        if at is not None:
            return sign_receipt(self.current_signer, self.origin, leaf_index, digest, at)
        return self.tree_receipt(leaf_index, digest)

    def tree_receipt(self, leaf_index: int, tree_hash: bytes) -> Receipt:
        """The receipt for `tree_hash`, which the caller read as the tree's own leaf hash at
        `leaf_index` (`leaf_hashes`) and compared with the entry's leaf: signed now the first
        time, the same receipt afterwards (kept by key, origin, index and hash)."""
        return self.receipts.receipt(
            self.current_signer, self.origin, leaf_index, tree_hash, dt.datetime.now(dt.UTC)
        )

    async def _checkpoint_for(self, tree_size: int | None) -> SignedCheckpoint:
        """The latest published checkpoint, or the published one of `tree_size`: a checkpoint
        still waiting for its witnesses is not used for proofs."""
        if tree_size is None:
            cp = await self.latest_checkpoint()
            if cp is None:
                raise ProofUnavailable("no checkpoint published yet")
            return cp
        published = await self.published_checkpoint_size()
        cp = None
        if published is not None and tree_size <= published:
            cp = await self.checkpoint(tree_size)
        if cp is None:
            raise ProofUnavailable(
                f"no published checkpoint of tree size {tree_size} (a checkpoint waiting for "
                "its witnesses is not published); omit treeSize for the latest"
            )
        return cp

    async def inclusion_proof(
        self, leaf_index: int, tree_size: int | None = None
    ) -> InclusionProof:
        """Proof that entry `leaf_index` is in the checkpointed tree (latest by default)."""
        cp = await self._checkpoint_for(tree_size)
        if not 0 <= leaf_index < cp.size:
            raise ProofUnavailable(
                f"leaf index {leaf_index} is not in the checkpoint of size {cp.size}"
            )
        entry = await self.entry(leaf_index)
        if entry is None:
            raise ProofUnavailable(f"entry {leaf_index} is missing")
        return await self.prove(leaf_index, bytes(entry["leaf"]), cp)

    async def consistency_proof(
        self, from_size: int, to_size: int | None = None
    ) -> tuple[int, int, list[bytes]]:
        cp = await self._checkpoint_for(to_size)
        return from_size, cp.size, await consistency_proof(self.reader, from_size, cp.size, cp.size)

    async def wait_sequenced(self, event_id: ObjectId, timeout: float = 10.0) -> int:
        """Wait until an event has a leaf index (for tools and tests); returns it."""

        async def poll() -> int:
            while True:
                index = await self.leaf_index(event_id)
                if index is not None and index < await self.published_size():
                    return index
                await asyncio.sleep(0.05)

        return await asyncio.wait_for(poll(), timeout)

    async def wait_anchored(self, size: int, timeout: float = 10.0) -> SignedCheckpoint:
        async def poll() -> SignedCheckpoint:
            while True:
                try:
                    cp = await self.latest_checkpoint()
                except PyMongoError:
                    cp = None
                if cp is not None and cp.size >= size:
                    return cp
                await asyncio.sleep(0.05)

        return await asyncio.wait_for(poll(), timeout)
