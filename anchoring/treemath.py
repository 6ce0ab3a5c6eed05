"""Which tree nodes make up RFC 9162 proofs and roots, and where they live in tiles.

A node (level, index) is the root of the perfect subtree over leaves
[index << level, (index + 1) << level). Proof elements are Merkle tree hashes of leaf ranges
MTH(D[lo:hi]); each range is a fold of stored perfect-subtree nodes. Tiles follow C2SP
tlog-tiles: a tile at tile level L holds the hashes of tree level 8*L, 256 per full tile.
Everything here is pure integer arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from anchoring.hashing import EMPTY_ROOT, node_hash

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT


@dataclass(frozen=True, order=True)
class Node:
    level: int
    index: int


Range = tuple[int, int]


def _largest_power_of_two_below(n: int) -> int:
    """k with k < n <= 2k. Requires n >= 2."""
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """RFC 9162 §2.1.3.1 PATH(index, D[size]) as leaf ranges, leaf end first.

    Requires 0 <= index < size.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} out of range for tree size {size}")
    path: list[Range] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _largest_power_of_two_below(hi - lo)
        if index < lo + k:
            path.append((lo + k, hi))
            hi = lo + k
        else:
            path.append((lo, lo + k))
            lo = lo + k
    path.reverse()
    return path


def consistency_ranges(old_size: int, new_size: int) -> list[Range]:
    """RFC 9162 §2.1.4.1 PROOF(old_size, D[new_size]) as leaf ranges, in proof order.

    Requires 0 <= old_size <= new_size. Empty when old_size is 0 or equal to new_size.
    """
    if not 0 <= old_size <= new_size:
        raise ValueError(f"consistency needs 0 <= old size <= new size, got {old_size}, {new_size}")
    if old_size == 0 or old_size == new_size:
        return []
    proof: list[Range] = []
    lo, hi, m, complete = 0, new_size, old_size, True
    while m != hi - lo:
        k = _largest_power_of_two_below(hi - lo)
        if m <= k:
            proof.append((lo + k, hi))
            hi = lo + k
        else:
            proof.append((lo, lo + k))
            lo, m, complete = lo + k, m - k, False
    if not complete:
        proof.append((lo, hi))
    proof.reverse()
    return proof


def range_nodes(lo: int, hi: int) -> list[Node]:
    """The perfect subtrees whose right fold is MTH(D[lo:hi]), left to right.

    Requires lo < hi and lo aligned as RFC 9162 recursion produces it (lo is a multiple of the
    largest power of two below hi - lo, or of hi - lo itself when that is a power of two).
    """
    nodes: list[Node] = []
    while hi - lo > 0:
        n = hi - lo
        if n & (n - 1) == 0:
            level = n.bit_length() - 1
            nodes.append(Node(level, lo >> level))
            break
        k = _largest_power_of_two_below(n)
        level = k.bit_length() - 1
        nodes.append(Node(level, lo >> level))
        lo += k
    return nodes


def fold_right(hashes: list[bytes]) -> bytes:
    """MTH of consecutive perfect subtrees given left to right: H(a, H(b, H(c, ...)))."""
    if not hashes:
        return EMPTY_ROOT
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def root_nodes(size: int) -> list[Node]:
    """The perfect subtrees (largest first) whose fold is the root of a tree of `size` leaves."""
    return range_nodes(0, size) if size else []


@dataclass(frozen=True)
class TileSlice:
    """Where the level-8L hashes under one node sit inside a tile."""

    tile_level: int
    tile_index: int
    start: int  # first hash position inside the tile
    count: int  # number of consecutive hashes (a power of two)


def tile_slice(node: Node) -> TileSlice:
    """The tile hashes a node is computed from (a single hash when level % 8 == 0)."""
    tile_level, rest = divmod(node.level, TILE_HEIGHT)
    first = node.index << rest
    return TileSlice(tile_level, first >> TILE_HEIGHT, first & (TILE_WIDTH - 1), 1 << rest)


def tile_width(tile_level: int, tile_index: int, size: int) -> int:
    """Number of hashes tile (tile_level, tile_index) holds in a tree of `size` leaves (0..256)."""
    complete = size >> (TILE_HEIGHT * tile_level)
    return max(0, min(TILE_WIDTH, complete - tile_index * TILE_WIDTH))


def tile_key(tile_level: int, tile_index: int, width: int) -> str:
    """Storage key of a tile: "L/N" when full, "L/N.p/W" when partial (as in tlog-tiles paths)."""
    if width == TILE_WIDTH:
        return f"{tile_level}/{tile_index}"
    return f"{tile_level}/{tile_index}.p/{width}"


class CompactRange:
    """The right edge of a tree [0, size): one perfect-subtree hash per set bit of size.

    Appending a leaf hash merges equal-sized subtrees; every node completed on the way is
    reported to `on_node` so callers can store it. Memory is O(log size).
    """

    def __init__(self, size: int = 0, hashes: list[bytes] | None = None) -> None:
        hashes = hashes or []
        if len(hashes) != bin(size).count("1"):
            raise ValueError(f"compact range of size {size} needs {bin(size).count('1')} hashes")
        self.size = size
        self.hashes = list(hashes)

    def append(self, leaf_hash: bytes, on_node: Callable[[Node, bytes], None]) -> None:
        index = self.size
        on_node(Node(0, index), leaf_hash)
        h = leaf_hash
        level = 0
        while (index >> level) & 1:
            h = node_hash(self.hashes.pop(), h)
            level += 1
            on_node(Node(level, index >> level), h)
        self.hashes.append(h)
        self.size += 1

    def root(self) -> bytes:
        return fold_right(self.hashes)
