"""Offline verification of RFC 9162 inclusion and consistency proofs, and of proof bundles.

Pure functions of bytes and integers: no I/O, no clock, no globals. Every failure raises
VerificationError naming the check that failed and what was expected and found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from anchoring.encoding import EncodingError, unb64
from anchoring.hashing import HASH_SIZE, leaf_hash, node_hash

# The names of the checks, in the order a bundle is verified.
MALFORMED = "malformed input"
BAD_SIGNATURE = "bad signature"
UNKNOWN_KEY = "unknown key"
ORIGIN_MISMATCH = "origin mismatch"
SIZE_MISMATCH = "size mismatch"
WRONG_PROOF_LENGTH = "wrong proof length"
ROOT_MISMATCH = "root mismatch"
NO_QUORUM = "witness quorum not met"


class VerificationError(Exception):
    """A proof, note or bundle failed a named check."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail


def _decomp_inclusion(index: int, size: int) -> tuple[int, int]:
    """Split an inclusion proof length into inner (below the split) and border (right edge)."""
    inner = (index ^ (size - 1)).bit_length()
    border = bin(index >> inner).count("1")
    return inner, border


def inclusion_proof_length(index: int, size: int) -> int:
    """Length of the RFC 9162 audit path. Requires 0 <= index < size."""
    inner, border = _decomp_inclusion(index, size)
    return inner + border


def root_from_inclusion_proof(
    index: int, size: int, leaf_digest: bytes, path: list[bytes]
) -> bytes:
    """RFC 9162 §2.1.3.2: the root implied by a leaf hash and its audit path.

    Requires 0 <= index < size and len(path) == inclusion_proof_length(index, size).
    """
    if not 0 <= index < size:
        raise VerificationError(MALFORMED, f"leaf index {index} out of range for tree size {size}")
    want = inclusion_proof_length(index, size)
    if len(path) != want:
        raise VerificationError(WRONG_PROOF_LENGTH, f"wrong proof size {len(path)}, want {want}")
    _check_hash_sizes(path, "inclusion path")
    _check_hash_sizes([leaf_digest], "leaf hash")
    fn, sn, r = index, size - 1, leaf_digest
    for p in path:
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r


def verify_inclusion(
    index: int, size: int, leaf_digest: bytes, path: list[bytes], root: bytes
) -> None:
    """Raise unless `path` proves the leaf hash is at `index` in the tree of `size` with `root`."""
    got = root_from_inclusion_proof(index, size, leaf_digest, path)
    if got != root:
        raise VerificationError(
            ROOT_MISMATCH, f"calculated root {got.hex()}, want {root.hex()} (tree size {size})"
        )


def consistency_proof_length(old_size: int, new_size: int) -> int:
    """Length of the RFC 9162 consistency proof. Requires 0 < old_size < new_size."""
    shift = (old_size & -old_size).bit_length() - 1
    inner, border = _decomp_inclusion(old_size - 1, new_size)
    start = 0 if old_size == 1 << shift else 1
    return start + inner - shift + border


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, path: list[bytes]
) -> None:
    """RFC 9162 §2.1.4.2: raise unless `path` proves tree old_size is a prefix of new_size."""
    if not 0 <= old_size <= new_size:
        raise VerificationError(
            MALFORMED, f"sizes must satisfy 0 <= old <= new, got {old_size}, {new_size}"
        )
    _check_hash_sizes(path, "consistency path")
    if old_size == new_size or old_size == 0:
        if path:
            raise VerificationError(WRONG_PROOF_LENGTH, f"wrong proof size {len(path)}, want 0")
        if old_size == new_size and old_root != new_root:
            raise VerificationError(
                ROOT_MISMATCH,
                f"same size {old_size} but roots differ: {old_root.hex()} != {new_root.hex()}",
            )
        return
    want = consistency_proof_length(old_size, new_size)
    if len(path) != want:
        raise VerificationError(WRONG_PROOF_LENGTH, f"wrong proof size {len(path)}, want {want}")
    if old_size & (old_size - 1) == 0:
        path = [old_root, *path]
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if fr != old_root:
        raise VerificationError(
            ROOT_MISMATCH,
            f"calculated old root {fr.hex()}, want {old_root.hex()} (size {old_size})",
        )
    if sr != new_root:
        raise VerificationError(
            ROOT_MISMATCH,
            f"calculated new root {sr.hex()}, want {new_root.hex()} (size {new_size})",
        )


def _check_hash_sizes(path: list[bytes], what: str) -> None:
    for i, h in enumerate(path):
        if len(h) != HASH_SIZE:
            raise VerificationError(MALFORMED, f"{what}[{i}] is {len(h)} bytes, want {HASH_SIZE}")


# --- Proof bundles (the format `rxledger verify` reads) -------------------------------------


@dataclass(frozen=True)
class InclusionBundle:
    leaf: bytes
    leaf_index: int
    tree_size: int
    inclusion_path: list[bytes]
    checkpoint: str


@dataclass(frozen=True)
class ConsistencyProof:
    from_size: int
    to_size: int
    path: list[bytes]


def _field(obj: dict[str, Any], name: str, kind: type) -> Any:
    if name not in obj:
        raise VerificationError(MALFORMED, f"missing field {name!r}")
    value = obj[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise VerificationError(MALFORMED, f"field {name!r} must be an integer, got {value!r:.40}")
    if not isinstance(value, kind):
        raise VerificationError(MALFORMED, f"field {name!r} must be a {kind.__name__}")
    if isinstance(value, int) and value < 0:
        raise VerificationError(MALFORMED, f"field {name!r} must not be negative, got {value}")
    return value


def _hash_list(obj: dict[str, Any], name: str) -> list[bytes]:
    items = _field(obj, name, list)
    try:
        return [unb64(x, f"{name}[{i}]") for i, x in enumerate(items)]
    except EncodingError as exc:
        raise VerificationError(MALFORMED, str(exc)) from exc


def parse_inclusion_bundle(obj: Any) -> InclusionBundle:
    """Validate the JSON shape of a proof bundle."""
    if not isinstance(obj, dict):
        raise VerificationError(MALFORMED, "a proof bundle must be a JSON object")
    try:
        leaf = unb64(_field(obj, "leaf", str), "leaf")
    except EncodingError as exc:
        raise VerificationError(MALFORMED, str(exc)) from exc
    return InclusionBundle(
        leaf=leaf,
        leaf_index=_field(obj, "leafIndex", int),
        tree_size=_field(obj, "treeSize", int),
        inclusion_path=_hash_list(obj, "inclusionPath"),
        checkpoint=_field(obj, "checkpoint", str),
    )


def parse_consistency_proof(obj: Any) -> ConsistencyProof:
    """Validate the JSON shape of a consistency proof file."""
    if not isinstance(obj, dict):
        raise VerificationError(MALFORMED, "a consistency proof must be a JSON object")
    return ConsistencyProof(
        from_size=_field(obj, "fromSize", int),
        to_size=_field(obj, "toSize", int),
        path=_hash_list(obj, "path"),
    )


def verify_bundle_inclusion(bundle: InclusionBundle, tree_size: int, root: bytes) -> None:
    """Check the bundle's size against the checkpoint's, then rebuild and compare the root."""
    if bundle.tree_size != tree_size:
        raise VerificationError(
            SIZE_MISMATCH, f"bundle treeSize {bundle.tree_size}, checkpoint size {tree_size}"
        )
    verify_inclusion(
        bundle.leaf_index, bundle.tree_size, leaf_hash(bundle.leaf), bundle.inclusion_path, root
    )
