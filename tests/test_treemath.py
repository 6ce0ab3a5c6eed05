"""RFC 9162 tree hashing and proof shapes (anchoring.hashing, anchoring.treemath).

Our proofs are built the way the log builds them: leaf ranges from `inclusion_ranges` /
`consistency_ranges`, each range decomposed by `range_nodes` into stored perfect subtrees and
folded by `fold_right`. They are checked against

- a naive recursive transcription of RFC 9162 §2.1.1 (MTH), §2.1.3.1 (PATH) and §2.1.4.1
  (PROOF/SUBPROOF) written here with hashlib only,
- the published RFC 6962 vectors of transparency-dev/merkle (testonly/constants.go,
  proof/verify_test.go) and the worked example of C2SP merkle-tree.md,
- pymerkle 7 (an independent implementation of the same tree).
"""

from __future__ import annotations

import hashlib
import random
from functools import cache

import pytest
from proof_tree import ProofTree, hash_perfect
from pymerkle import InmemoryTree

from anchoring.hashing import EMPTY_ROOT, HASH_SIZE, leaf_hash, node_hash
from anchoring.treemath import (
    TILE_WIDTH,
    CompactRange,
    Node,
    TileSlice,
    consistency_ranges,
    fold_right,
    inclusion_ranges,
    range_nodes,
    root_nodes,
    tile_key,
    tile_slice,
    tile_width,
)

SMALL = 70  # every tree size up to this one is checked exhaustively
LARGE = 5000  # random pairs are drawn from trees up to this size
RANDOM_PAIRS = 3000


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def entries(count: int) -> list[bytes]:
    """Distinct entries of varied lengths (the empty entry included), reproducible."""
    rng = random.Random(9162)
    return [b""] + [
        rng.randbytes(rng.randrange(1, 40)) + i.to_bytes(4, "big") for i in range(1, count)
    ]


# --- RFC 9162 §2.1, transcribed literally ----------------------------------------------------


def split_point(n: int) -> int:
    """The largest power of two smaller than n (k < n <= 2k), by counting. Requires n > 1."""
    k = 1
    while 2 * k < n:
        k *= 2
    return k


class ReferenceTree:
    """MTH, PATH and PROOF of RFC 9162 over a fixed list of entries, recursing as the RFC reads.

    Ranges are (lo, hi) slices of the entries; MTH is memoized per slice so that thousands of
    proofs over a large tree stay fast without changing the recursion.
    """

    def __init__(self, data: list[bytes]) -> None:
        self.data = data
        self.mth = cache(self._mth)

    def _mth(self, lo: int, hi: int) -> bytes:
        """§2.1.1: MTH(D[lo:hi])."""
        n = hi - lo
        if n == 0:
            return sha256(b"")
        if n == 1:
            return sha256(b"\x00" + self.data[lo])
        k = split_point(n)
        return sha256(b"\x01" + self.mth(lo, lo + k) + self.mth(lo + k, hi))

    def path(self, m: int, lo: int, hi: int) -> list[bytes]:
        """§2.1.3.1: PATH(m, D[lo:hi]) with m counted from lo."""
        n = hi - lo
        if n == 1:
            return []
        k = split_point(n)
        if m < k:
            return self.path(m, lo, lo + k) + [self.mth(lo + k, hi)]
        return self.path(m - k, lo + k, hi) + [self.mth(lo, lo + k)]

    def subproof(self, m: int, lo: int, hi: int, b: bool) -> list[bytes]:
        """§2.1.4.1: SUBPROOF(m, D[lo:hi], b)."""
        n = hi - lo
        if m == n:
            return [] if b else [self.mth(lo, hi)]
        k = split_point(n)
        if m <= k:
            return self.subproof(m, lo, lo + k, b) + [self.mth(lo + k, hi)]
        return self.subproof(m - k, lo + k, hi, False) + [self.mth(lo, lo + k)]

    def root(self, n: int) -> bytes:
        return self.mth(0, n)

    def inclusion_proof(self, m: int, n: int) -> list[bytes]:
        return self.path(m, 0, n)

    def consistency_proof(self, m: int, n: int) -> list[bytes]:
        """PROOF(m, D[n]) = SUBPROOF(m, D[n], true), for 0 < m <= n."""
        return self.subproof(m, 0, n, True)


# --- Our proofs, assembled from treemath as the log assembles them -------------------------


DATA = entries(LARGE)
REFERENCE = ReferenceTree(DATA)
OURS = ProofTree(DATA)


def random_inclusion_pairs(seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(RANDOM_PAIRS):
        size = rng.randint(1, LARGE)
        pairs.append((rng.randrange(size), size))
    return pairs


def random_consistency_pairs(seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(RANDOM_PAIRS):
        new = rng.randint(1, LARGE)
        pairs.append((rng.randint(1, new), new))
    return pairs


# --- Hashing -------------------------------------------------------------------------------


def test_empty_root_is_sha256_of_the_empty_string():
    # RFC 9162 §2.1.1; the constant is testonly.EmptyRootHash() of transparency-dev/merkle.
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert fold_right([]) == EMPTY_ROOT
    assert root_nodes(0) == []


def test_leaf_hash_prefixes_0x00_and_node_hash_prefixes_0x01():
    assert leaf_hash(b"rx") == sha256(b"\x00rx")
    a, b = sha256(b"a"), sha256(b"b")
    assert node_hash(a, b) == sha256(b"\x01" + a + b)
    assert node_hash(a, b) != node_hash(b, a)
    assert leaf_hash(a + b) != node_hash(a, b)  # domain separation
    assert len(leaf_hash(b"")) == len(node_hash(a, b)) == HASH_SIZE


# --- Published RFC 6962 vectors (transparency-dev/merkle testonly/constants.go) -------------

TD_LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
TD_ROOTS = [
    bytes.fromhex(h)
    for h in [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
]
TD_NODES = [
    [
        bytes.fromhex(h)
        for h in [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
            "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
        ]
    ],
    [
        bytes.fromhex(h)
        for h in [
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        ]
    ],
    [
        bytes.fromhex(h)
        for h in [
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ]
    ],
    [bytes.fromhex("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")],
]
# testonly.CompactTrees(): the compact range of each tree size, as (level, index) of TD_NODES.
TD_COMPACT = [
    [],
    [(0, 0)],
    [(1, 0)],
    [(1, 0), (0, 2)],
    [(2, 0)],
    [(2, 0), (0, 4)],
    [(2, 0), (1, 2)],
    [(2, 0), (1, 2), (0, 6)],
    [(3, 0)],
]


def test_leaf_hashes_and_perfect_subtrees_match_published_rfc6962_node_hashes():
    leaf_hashes = [leaf_hash(d) for d in TD_LEAVES]
    assert leaf_hashes == TD_NODES[0]
    for level, row in enumerate(TD_NODES):
        width = 1 << level
        for index, want in enumerate(row):
            got = hash_perfect(leaf_hashes[index * width : (index + 1) * width])
            assert got == want, (level, index)


def test_roots_match_published_rfc6962_roots_for_sizes_0_to_8():
    table = ProofTree(TD_LEAVES)
    for size, want in enumerate(TD_ROOTS):
        assert table.root(size) == want, size
        assert ReferenceTree(TD_LEAVES).root(size) == want, size


def test_compact_range_matches_published_compact_trees_after_each_append():
    cr = CompactRange()
    assert cr.root() == TD_ROOTS[0]
    for size in range(1, 9):
        cr.append(leaf_hash(TD_LEAVES[size - 1]), lambda node, h: None)
        assert cr.size == size
        assert cr.hashes == [TD_NODES[level][index] for level, index in TD_COMPACT[size]]
        assert cr.root() == TD_ROOTS[size]


def test_inclusion_proofs_match_published_rfc6962_vectors():
    # proof/verify_test.go inclusionProofs; the Go vectors count leaves from 1.
    nodes = {h.hex()[:8]: h for row in TD_NODES for h in row}
    vectors = [
        (1, 8, ["96a296d2", "5f083f0a", "6b47aaf2"]),
        (6, 8, ["bc1a0643", "ca854ea1", "d37ee418"]),
        (3, 3, ["fac54203"]),
        (2, 5, ["6e340b9c", "5f083f0a", "bc1a0643"]),
        (1, 1, []),
    ]
    table = ProofTree(TD_LEAVES)
    for leaf, size, proof in vectors:
        assert table.inclusion_proof(leaf - 1, size) == [nodes[p] for p in proof], (leaf, size)


def test_consistency_proofs_match_published_rfc6962_vectors():
    # proof/verify_test.go consistencyProofs.
    nodes = {h.hex()[:8]: h for row in TD_NODES for h in row}
    vectors = [
        (1, 1, []),
        (1, 8, ["96a296d2", "5f083f0a", "6b47aaf2"]),
        (6, 8, ["0ebc5d34", "ca854ea1", "d37ee418"]),
        (2, 5, ["5f083f0a", "bc1a0643"]),
        (6, 7, ["0ebc5d34", "b08693ec", "d37ee418"]),
    ]
    table = ProofTree(TD_LEAVES)
    for old, new, proof in vectors:
        assert table.consistency_proof(old, new) == [nodes[p] for p in proof], (old, new)


def test_proofs_match_the_worked_example_of_c2sp_merkle_tree():
    # C2SP merkle-tree.md, "Example": a 7-entry tree with its nodes labelled a..l and root.
    d = [f"entry {i}".encode() for i in range(7)]
    a, b, c, d3, e, f, g = (sha256(b"\x00" + x) for x in d)
    h = sha256(b"\x01" + a + b)
    i = sha256(b"\x01" + c + d3)
    j = sha256(b"\x01" + e + f)
    k = sha256(b"\x01" + h + i)
    l_ = sha256(b"\x01" + j + g)
    root = sha256(b"\x01" + k + l_)
    table = ProofTree(d)
    assert table.root(7) == root
    assert table.inclusion_proof(0, 7) == [b, i, l_]
    assert table.inclusion_proof(3, 7) == [c, h, l_]
    assert table.inclusion_proof(4, 7) == [f, g, k]
    assert table.inclusion_proof(6, 7) == [j, k]
    assert table.consistency_proof(3, 7) == [c, d3, h, l_]
    assert table.consistency_proof(4, 7) == [l_]
    assert table.consistency_proof(6, 7) == [j, g, k]


# --- Against the RFC 9162 reference --------------------------------------------------------


def test_root_matches_rfc_reference_for_every_size_up_to_the_large_tree():
    for size in range(LARGE + 1):
        assert OURS.root(size) == REFERENCE.root(size), size


def test_inclusion_proof_matches_rfc_reference_for_all_small_trees():
    for size in range(1, SMALL + 1):
        for index in range(size):
            assert OURS.inclusion_proof(index, size) == REFERENCE.inclusion_proof(index, size), (
                index,
                size,
            )


def test_consistency_proof_matches_rfc_reference_for_all_small_trees():
    for new in range(1, SMALL + 1):
        assert consistency_ranges(0, new) == []
        for old in range(1, new + 1):
            assert OURS.consistency_proof(old, new) == REFERENCE.consistency_proof(old, new), (
                old,
                new,
            )


def test_inclusion_proof_matches_rfc_reference_for_random_pairs_in_large_trees():
    for index, size in random_inclusion_pairs(seed=1):
        assert OURS.inclusion_proof(index, size) == REFERENCE.inclusion_proof(index, size), (
            index,
            size,
        )


def test_consistency_proof_matches_rfc_reference_for_random_pairs_in_large_trees():
    for old, new in random_consistency_pairs(seed=2):
        assert OURS.consistency_proof(old, new) == REFERENCE.consistency_proof(old, new), (
            old,
            new,
        )


def test_inclusion_ranges_rejects_index_outside_the_tree():
    for index, size in [(0, 0), (-1, 5), (5, 5), (6, 5)]:
        with pytest.raises(ValueError):
            inclusion_ranges(index, size)


def test_consistency_ranges_rejects_sizes_out_of_order_and_is_empty_when_trivial():
    for old, new in [(-1, 3), (4, 3), (1, 0)]:
        with pytest.raises(ValueError):
            consistency_ranges(old, new)
    assert consistency_ranges(0, 0) == []
    assert consistency_ranges(7, 7) == []
    assert consistency_ranges(0, 9) == []


def test_range_nodes_cover_each_proof_range_with_decreasing_perfect_subtrees():
    for size in range(1, SMALL + 1):
        ranges = {r for i in range(size) for r in inclusion_ranges(i, size)}
        ranges |= {r for m in range(size + 1) for r in consistency_ranges(m, size)}
        for lo, hi in ranges:
            nodes = range_nodes(lo, hi)
            spans = [(n.index << n.level, (n.index + 1) << n.level) for n in nodes]
            assert spans[0][0] == lo and spans[-1][1] == hi, (lo, hi, nodes)
            assert all(s[1] == t[0] for s, t in zip(spans, spans[1:], strict=False)), nodes
            assert all(s.level > t.level for s, t in zip(nodes, nodes[1:], strict=False)), nodes


def test_root_nodes_are_one_perfect_subtree_per_set_bit_of_the_size():
    assert root_nodes(1) == [Node(0, 0)]
    assert root_nodes(6) == [Node(2, 0), Node(1, 2)]
    assert root_nodes(13) == [Node(3, 0), Node(2, 2), Node(0, 12)]
    for size in range(1, 600):
        assert [n.level for n in root_nodes(size)] == [
            b for b in reversed(range(size.bit_length())) if size >> b & 1
        ]


# --- Compact ranges ------------------------------------------------------------------------


def test_compact_range_reports_every_complete_node_once_with_its_hash():
    size = 1100
    seen: dict[Node, bytes] = {}

    def on_node(node: Node, h: bytes) -> None:
        assert node not in seen, node
        seen[node] = h

    cr = CompactRange()
    for i in range(size):
        cr.append(OURS.levels[0][i], on_node)
        assert cr.root() == REFERENCE.root(i + 1), i + 1
    want = {
        Node(level, index): h
        for level, row in enumerate(OURS.levels)
        for index, h in enumerate(row)
        if (index + 1) << level <= size
    }
    assert seen == want


def test_compact_range_resumed_from_its_hashes_continues_the_same_tree():
    cr = CompactRange()
    for i in range(37):
        cr.append(OURS.levels[0][i], lambda node, h: None)
    resumed = CompactRange(37, list(cr.hashes))
    for i in range(37, 300):
        resumed.append(OURS.levels[0][i], lambda node, h: None)
    assert resumed.root() == REFERENCE.root(300)


def test_compact_range_rejects_a_hash_count_that_does_not_match_the_size():
    with pytest.raises(ValueError):
        CompactRange(3, [EMPTY_ROOT])
    with pytest.raises(ValueError):
        CompactRange(0, [EMPTY_ROOT])


# --- Tiles ---------------------------------------------------------------------------------


def test_tile_slice_examples():
    assert tile_slice(Node(0, 300)) == TileSlice(0, 1, 44, 1)
    assert tile_slice(Node(3, 40)) == TileSlice(0, 1, 64, 8)
    assert tile_slice(Node(8, 3)) == TileSlice(1, 0, 3, 1)
    assert tile_slice(Node(10, 70)) == TileSlice(1, 1, 24, 4)
    assert tile_slice(Node(16, 0)) == TileSlice(2, 0, 0, 1)


def test_every_node_is_the_perfect_subtree_of_the_tile_hashes_its_slice_names():
    for level, row in enumerate(OURS.levels):
        for index, want in enumerate(row):
            s = tile_slice(Node(level, index))
            assert s.start + s.count <= TILE_WIDTH
            base = OURS.levels[8 * s.tile_level]
            first = s.tile_index * TILE_WIDTH + s.start
            assert hash_perfect(base[first : first + s.count]) == want, (level, index)


def test_tile_width_counts_the_hashes_a_tile_holds_at_a_tree_size():
    assert tile_width(0, 0, 0) == 0
    assert [tile_width(0, n, 1000) for n in range(5)] == [256, 256, 256, 232, 0]
    assert tile_width(1, 0, 1000) == 3
    assert tile_width(2, 0, 1000) == 0
    assert tile_width(1, 0, 65536) == 256
    assert tile_width(2, 0, 65536) == 1
    assert tile_width(0, 255, 65536) == 256


def test_tile_key_is_full_or_partial_tlog_tiles_path():
    assert tile_key(0, 5, 256) == "0/5"
    assert tile_key(1, 2, 17) == "1/2.p/17"


# --- Against pymerkle 7 --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pymerkle_tree() -> InmemoryTree:
    # The default InmemoryTree hashes like RFC 9162: sha256, leaf prefix 0x00, node prefix 0x01
    # (security mode on), and the empty tree is sha256(b"").
    tree = InmemoryTree.init_from_entries(DATA, algorithm="sha256")
    assert (tree.algorithm, tree.leaf_prefix, tree.node_prefix) == ("sha256", b"\x00", b"\x01")
    return tree


def test_root_equals_pymerkle_root_for_every_size(pymerkle_tree):
    for size in range(LARGE + 1):
        assert OURS.root(size) == pymerkle_tree.get_root(size), size


def test_inclusion_path_equals_pymerkle_path_after_its_leaf_hash(pymerkle_tree):
    # pymerkle counts leaves from 1 and puts the leaf hash itself first in its path.
    pairs = [(i, n) for n in range(1, SMALL + 1) for i in range(n)] + random_inclusion_pairs(3)
    for index, size in pairs:
        proof = pymerkle_tree.prove_inclusion(index + 1, size)
        assert proof.path[0] == OURS.levels[0][index]
        assert proof.path[1:] == OURS.inclusion_proof(index, size), (index, size)
