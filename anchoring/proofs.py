"""RFC 9162 inclusion and consistency proofs served from stored tiles in O(log n) reads."""

from __future__ import annotations

from anchoring.errors import ProofUnavailable
from anchoring.tiles import TileSource
from anchoring.treemath import (
    Node,
    consistency_ranges,
    fold_right,
    inclusion_ranges,
    range_nodes,
    root_nodes,
)


async def _range_hashes(
    reader: TileSource, ranges: list[tuple[int, int]], published_size: int
) -> list[bytes]:
    per_range = [range_nodes(lo, hi) for lo, hi in ranges]
    wanted: list[Node] = sorted({n for nodes in per_range for n in nodes})
    hashes = await reader.nodes(wanted, published_size)
    return [fold_right([hashes[n] for n in nodes]) for nodes in per_range]


async def inclusion_proof(
    reader: TileSource, index: int, size: int, published_size: int
) -> list[bytes]:
    """The audit path of leaf `index` in the tree of `size`. Requires 0 <= index < size <= published."""
    if not 0 <= index < size:
        raise ProofUnavailable(f"leaf index {index} is not in a tree of size {size}")
    if size > published_size:
        raise ProofUnavailable(
            f"tree size {size} is larger than the published size {published_size}"
        )
    return await _range_hashes(reader, inclusion_ranges(index, size), published_size)


async def inclusion_proofs(
    reader: TileSource, indices: list[int], size: int, published_size: int
) -> list[list[bytes]]:
    """The audit paths of several leaves in the tree of `size`, from one read of tiles.
    Requires 0 <= index < size <= published for each index."""
    for index in indices:
        if not 0 <= index < size:
            raise ProofUnavailable(f"leaf index {index} is not in a tree of size {size}")
    if size > published_size:
        raise ProofUnavailable(
            f"tree size {size} is larger than the published size {published_size}"
        )
    per_leaf = [inclusion_ranges(index, size) for index in indices]
    hashes = await _range_hashes(reader, [r for ranges in per_leaf for r in ranges], published_size)
    paths, at = [], 0
    for ranges in per_leaf:
        paths.append(hashes[at : at + len(ranges)])
        at += len(ranges)
    return paths


async def consistency_proof(
    reader: TileSource, old_size: int, new_size: int, published_size: int
) -> list[bytes]:
    """The proof that tree old_size is a prefix of tree new_size. Requires old <= new <= published."""
    if not 0 <= old_size <= new_size:
        raise ProofUnavailable(
            f"consistency needs 0 <= fromSize <= toSize, got {old_size} and {new_size}"
        )
    if new_size > published_size:
        raise ProofUnavailable(
            f"tree size {new_size} is larger than the published size {published_size}"
        )
    return await _range_hashes(reader, consistency_ranges(old_size, new_size), published_size)


async def root_hash(reader: TileSource, size: int, published_size: int) -> bytes:
    """The root of the tree of `size` leaves, from stored tiles."""
    if size > published_size:
        raise ProofUnavailable(
            f"tree size {size} is larger than the published size {published_size}"
        )
    nodes = root_nodes(size)
    hashes = await reader.nodes(nodes, published_size)
    return fold_right([hashes[n] for n in nodes])
