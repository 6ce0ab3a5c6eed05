"""A whole tree's perfect-subtree hashes in memory, with proofs assembled from
anchoring.treemath exactly as the log assembles them from stored tiles (test helper)."""

from __future__ import annotations

from anchoring.hashing import leaf_hash, node_hash
from anchoring.treemath import (
    Node,
    consistency_ranges,
    fold_right,
    inclusion_ranges,
    range_nodes,
    root_nodes,
)


def hash_perfect(hashes: list[bytes]) -> bytes:
    """Root of a perfect subtree over 2^k consecutive same-level hashes."""
    row = hashes
    while len(row) > 1:
        row = [node_hash(row[i], row[i + 1]) for i in range(0, len(row), 2)]
    return row[0]


class ProofTree:
    def __init__(self, data: list[bytes]) -> None:
        self.levels = [[leaf_hash(d) for d in data]]
        while len(self.levels[-1]) > 1:
            row = self.levels[-1]
            self.levels.append([node_hash(row[i], row[i + 1]) for i in range(0, len(row) - 1, 2)])

    def node(self, node: Node) -> bytes:
        return self.levels[node.level][node.index]

    def leaf(self, index: int) -> bytes:
        return self.levels[0][index]

    def range_hash(self, lo: int, hi: int) -> bytes:
        return fold_right([self.node(n) for n in range_nodes(lo, hi)])

    def root(self, size: int) -> bytes:
        return fold_right([self.node(n) for n in root_nodes(size)])

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return [self.range_hash(lo, hi) for lo, hi in inclusion_ranges(index, size)]

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        return [self.range_hash(lo, hi) for lo, hi in consistency_ranges(old_size, new_size)]
