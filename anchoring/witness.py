"""A witness's decision to cosign a checkpoint (anchoring.cosignature), and its memory.

A witness keeps the latest checkpoint it cosigned. Shown a newer one, it checks the log's
signature and a consistency proof from what it cosigned before, and only then cosigns; a
checkpoint that is smaller, or of the same size with another root, or not consistent, is
refused with the reason. A log with a quorum of witnesses cannot show two different histories
(a split view) without a witness seeing both.

The log's key may be a key set (anchoring.keys): the witness follows a key rotation, and
refuses a checkpoint signed only by a retired key past its end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from anchoring.cosignature import Cosignature, Cosigner
from anchoring.encoding import EncodingError, b64, unb64
from anchoring.keys import KeySet
from anchoring.note import Checkpoint, Verifier
from anchoring.verify import VerificationError, verify_consistency


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
    """Written to a new file, synced, renamed over the old one, and the rename synced: after a
    crash or a power loss the file holds the old state or the new, and once this returns, the
    new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(state.dumps())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


ConsistencyFetcher = Callable[[int, int], Awaitable[list[bytes]]]


class Witness:
    def __init__(
        self,
        cosigner: Cosigner,
        log_key: Verifier | KeySet,
        state_path: Path,
        origin: str | None = None,
    ) -> None:
        self.cosigner = cosigner
        self.log_keys = KeySet.of([log_key] if isinstance(log_key, Verifier) else log_key)
        self.signed_by = ""  # the log keys that signed the checkpoint last shown
        self.state_path = state_path
        self.state = load_state(state_path)
        if origin and self.state and origin != self.state.origin:
            raise ValueError(
                f"it witnesses origin {self.state.origin!r}, not {origin!r}: a witness follows "
                "one log; give another log its own state file"
            )
        self._origin = origin or None
        self.submitted: str | None = None  # the checkpoint text last cosigned and handed back

    @property
    def origin(self) -> str | None:
        """The log it witnesses: that of what it cosigned, else the one it was given."""
        return self.state.origin if self.state else self._origin

    async def witness(self, note: str, consistency: ConsistencyFetcher) -> Cosignature:
        """Cosign `note` if it is consistent with the last checkpoint cosigned (or is that
        checkpoint again). `consistency(old, new)` fetches a proof (from the log's tiles),
        which is verified here. Raises Refused."""
        try:
            signed = self.log_keys.open_checkpoint(note)
        except VerificationError as exc:
            raise Refused(f"the checkpoint does not verify with the log's key: {exc}") from exc
        text, cp = signed.text, signed.checkpoint
        self.signed_by = signed.labels
        if self.origin is not None and cp.origin != self.origin:
            raise Refused(f"checkpoint origin {cp.origin!r}, but I witness {self.origin!r}")
        old = self.state
        if old is not None:
            self._check(old, cp)
            if cp.size == old.size:
                return self.cosigner.cosign(text)
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
        save_state(self.state_path, self.state)  # from now on, the log it witnesses
        return self.cosigner.cosign(text)

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
