"""Offline verification of inclusion and consistency proofs and of proof bundles (anchoring.verify).

Good proofs come from treemath (shown equal to the RFC 9162 reference in test_treemath.py), from
the published RFC 6962 vectors of transparency-dev/merkle and from pymerkle 7. Bad ones are the
corruptions of transparency-dev/merkle proof/verify_test.go (corruptInclusionProof,
corruptConsistencyProof) plus malformed JSON bundles.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from proof_tree import ProofTree
from pymerkle import ConsistencyProof as PymerkleConsistencyProof
from pymerkle import InclusionProof as PymerkleInclusionProof
from pymerkle import InmemoryTree, InvalidProof
from pymerkle import verify_consistency as pymerkle_verify_consistency
from pymerkle import verify_inclusion as pymerkle_verify_inclusion

from anchoring.encoding import EncodingError, b64, unb64
from anchoring.hashing import EMPTY_ROOT, leaf_hash, node_hash
from anchoring.note import Checkpoint, Signer, open_checkpoint
from anchoring.treemath import inclusion_ranges
from anchoring.verify import (
    MALFORMED,
    ROOT_MISMATCH,
    SIZE_MISMATCH,
    WRONG_PROOF_LENGTH,
    VerificationError,
    consistency_proof_length,
    inclusion_proof_length,
    parse_consistency_proof,
    parse_inclusion_bundle,
    root_from_inclusion_proof,
    verify_bundle_inclusion,
    verify_consistency,
    verify_inclusion,
)

SMALL = 40
LARGE = 5000
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


DATA = [b"rx-%d" % i for i in range(LARGE)]
TREE = ProofTree(DATA)


def small_inclusion_pairs() -> list[tuple[int, int]]:
    return [(i, n) for n in range(1, SMALL + 1) for i in range(n)]


def small_consistency_pairs() -> list[tuple[int, int]]:
    return [(m, n) for n in range(2, SMALL + 1) for m in range(1, n)]


def random_inclusion_pairs(seed: int, count: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        size = rng.randint(1, LARGE)
        pairs.append((rng.randrange(size), size))
    return pairs


def random_consistency_pairs(seed: int, count: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        new = rng.randint(2, LARGE)
        pairs.append((rng.randint(1, new - 1), new))
    return pairs


def flip(h: bytes, bit: int) -> bytes:
    return bytes([h[0] ^ bit]) + h[1:]


def check_of(fn, *args, **kwargs) -> str:
    """The name of the check that fn(*args, **kwargs) fails with."""
    with pytest.raises(VerificationError) as info:
        fn(*args, **kwargs)
    return info.value.check


# --- Inclusion -----------------------------------------------------------------------------


def test_inclusion_proofs_verify_for_all_small_trees_and_random_large_ones():
    for index, size in small_inclusion_pairs() + random_inclusion_pairs(1, 2000):
        path = TREE.inclusion_proof(index, size)
        assert len(path) == inclusion_proof_length(index, size)
        assert root_from_inclusion_proof(index, size, TREE.leaf(index), path) == TREE.root(size)
        verify_inclusion(index, size, TREE.leaf(index), path, TREE.root(size))


def corrupt_inclusion(index, size, path, root, leaf):
    """transparency-dev/merkle corruptInclusionProof: (description, args) that must not verify."""
    probes = [
        ("index - 1", (index - 1, size, leaf, path, root)),
        ("index + 1", (index + 1, size, leaf, path, root)),
        ("index ^ 2", (index ^ 2, size, leaf, path, root)),
        ("size * 2", (index, size * 2, leaf, path, root)),
        ("size // 2", (index, size // 2, leaf, path, root)),
        ("wrong leaf", (index, size, b"WrongLeaf", path, root)),
        ("empty root", (index, size, leaf, path, EMPTY_ROOT)),
        ("random root", (index, size, leaf, path, SOME_HASH)),
        ("trailing garbage", (index, size, leaf, [*path, b""], root)),
        ("trailing root", (index, size, leaf, [*path, root], root)),
        ("preceding garbage", (index, size, leaf, [b"", *path], root)),
        ("preceding root", (index, size, leaf, [root, *path], root)),
    ]
    for i in range(len(path)):
        wrong = list(path)
        wrong[i] = flip(wrong[i], 8)
        probes.append((f"proof[{i}] bit 3 flipped", (index, size, leaf, wrong, root)))
    if path:
        probes.append(("removed component", (index, size, leaf, path[:-1], root)))
    if len(path) > 1:
        probes.append(
            ("inserted component", (index, size, leaf, [path[0], SOME_HASH, *path[1:]], root))
        )
    return probes


def test_corrupted_inclusion_proofs_never_verify():
    for index, size in small_inclusion_pairs() + random_inclusion_pairs(2, 200):
        path, root, leaf = TREE.inclusion_proof(index, size), TREE.root(size), TREE.leaf(index)
        for desc, args in corrupt_inclusion(index, size, path, root, leaf):
            with pytest.raises(VerificationError):
                verify_inclusion(*args)
                pytest.fail(f"({index}, {size}) verified with {desc}")


def test_tampering_any_path_element_or_the_leaf_is_a_root_mismatch():
    for index, size in [(0, 1), (0, 2), (5, 8), (6, 7), (12, 13), (999, 4321)]:
        path, root, leaf = TREE.inclusion_proof(index, size), TREE.root(size), TREE.leaf(index)
        assert check_of(verify_inclusion, index, size, leaf_hash(b"x"), path, root) == ROOT_MISMATCH
        for i in range(len(path)):
            for bit in (1, 0x80):
                wrong = list(path)
                wrong[i] = flip(wrong[i], bit)
                assert check_of(verify_inclusion, index, size, leaf, wrong, root) == ROOT_MISMATCH


def test_inclusion_proof_of_wrong_length_is_rejected_with_both_lengths_named():
    path = TREE.inclusion_proof(5, 8)
    with pytest.raises(VerificationError) as info:
        verify_inclusion(5, 8, TREE.leaf(5), path[:-1], TREE.root(8))
    assert info.value.check == WRONG_PROOF_LENGTH
    assert {"2", "3"} <= set(info.value.detail.replace(",", " ").split())
    longer = [*path, path[0]]
    assert (
        check_of(verify_inclusion, 5, 8, TREE.leaf(5), longer, TREE.root(8)) == WRONG_PROOF_LENGTH
    )
    assert check_of(verify_inclusion, 0, 1, TREE.leaf(0), [SOME_HASH], TREE.root(1)) == (
        WRONG_PROOF_LENGTH
    )


def test_inclusion_with_index_outside_the_tree_is_malformed():
    for index, size in [(0, 0), (-1, 4), (4, 4), (9, 4)]:
        assert check_of(verify_inclusion, index, size, SOME_HASH, [], SOME_HASH) == MALFORMED


def test_inclusion_path_element_of_the_wrong_size_is_malformed():
    path = TREE.inclusion_proof(5, 8)
    for bad in (path[1][:31], path[1] + b"\x00", b""):
        wrong = [path[0], bad, path[2]]
        assert check_of(verify_inclusion, 5, 8, TREE.leaf(5), wrong, TREE.root(8)) == MALFORMED


def test_inclusion_rejects_a_leaf_hash_of_the_wrong_size():
    # transparency-dev/merkle TestVerifyInclusionSingleEntry: an empty leaf hash against an
    # empty root is an error ("wrong hash size"), not a valid one-leaf tree.
    assert check_of(verify_inclusion, 0, 1, b"", [], b"") == MALFORMED
    assert check_of(verify_inclusion, 0, 1, b"short", [], b"short") == MALFORMED


def test_single_entry_tree_root_is_its_leaf_hash_with_an_empty_proof():
    h = leaf_hash(b"data")
    verify_inclusion(0, 1, h, [], h)
    assert check_of(verify_inclusion, 0, 1, h, [], EMPTY_ROOT) == ROOT_MISMATCH


# --- Consistency ---------------------------------------------------------------------------


def test_consistency_proofs_verify_for_all_small_trees_and_random_large_ones():
    for old, new in small_consistency_pairs() + random_consistency_pairs(3, 2000):
        path = TREE.consistency_proof(old, new)
        assert len(path) == consistency_proof_length(old, new)
        verify_consistency(old, new, TREE.root(old), TREE.root(new), path)


def test_trivial_consistency_needs_an_empty_proof_and_equal_roots_for_equal_sizes():
    r1, r2 = TREE.root(5), TREE.root(6)
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(0, 6, EMPTY_ROOT, r2, [])
    verify_consistency(5, 5, r1, r1, [])
    assert check_of(verify_consistency, 5, 5, r1, r2, []) == ROOT_MISMATCH
    assert check_of(verify_consistency, 0, 0, EMPTY_ROOT, r2, []) == ROOT_MISMATCH
    assert check_of(verify_consistency, 5, 5, r1, r1, [r1]) == WRONG_PROOF_LENGTH
    assert check_of(verify_consistency, 0, 6, EMPTY_ROOT, r2, [r2]) == WRONG_PROOF_LENGTH
    assert check_of(verify_consistency, 5, 6, r1, r2, []) == WRONG_PROOF_LENGTH


def test_consistency_sizes_out_of_order_are_malformed():
    for old, new in [(6, 5), (1, 0), (-1, 3), (-2, -1)]:
        assert check_of(verify_consistency, old, new, SOME_HASH, SOME_HASH, []) == MALFORMED


def test_consistency_path_element_of_the_wrong_size_is_malformed():
    path = TREE.consistency_proof(6, 8)
    wrong = [path[0], path[1][:31], path[2]]
    assert check_of(verify_consistency, 6, 8, TREE.root(6), TREE.root(8), wrong) == MALFORMED


def corrupt_consistency(old, new, r1, r2, path):
    """transparency-dev/merkle corruptConsistencyProof: (description, args) that must not verify."""
    probes = [
        ("old - 1", (old - 1, new, r1, r2, path)),
        ("old + 1", (old + 1, new, r1, r2, path)),
        ("old ^ 2", (old ^ 2, new, r1, r2, path)),
        ("new * 2", (old, new * 2, r1, r2, path)),
        ("new // 2", (old, new // 2, r1, r2, path)),
        ("wrong old root", (old, new, b"WrongRoot", r2, path)),
        ("wrong new root", (old, new, r1, b"WrongRoot", path)),
        ("swapped roots", (old, new, r2, r1, path)),
        ("empty proof", (old, new, r1, r2, [])),
        ("trailing garbage", (old, new, r1, r2, [*path, b""])),
        ("trailing old root", (old, new, r1, r2, [*path, r1])),
        ("trailing new root", (old, new, r1, r2, [*path, r2])),
        ("preceding garbage", (old, new, r1, r2, [b"", *path])),
        ("preceding old root", (old, new, r1, r2, [r1, *path])),
        ("preceding new root", (old, new, r1, r2, [r2, *path])),
        ("preceding proof[0]", (old, new, r1, r2, [path[0], *path])),
        ("truncated proof", (old, new, r1, r2, path[:-1])),
    ]
    for i in range(len(path)):
        wrong = list(path)
        wrong[i] = flip(wrong[i], 16)
        probes.append((f"proof[{i}] bit 4 flipped", (old, new, r1, r2, wrong)))
    return probes


def test_corrupted_consistency_proofs_never_verify():
    for old, new in small_consistency_pairs() + random_consistency_pairs(4, 200):
        path, r1, r2 = TREE.consistency_proof(old, new), TREE.root(old), TREE.root(new)
        for desc, args in corrupt_consistency(old, new, r1, r2, path):
            with pytest.raises(VerificationError):
                verify_consistency(*args)
                pytest.fail(f"({old}, {new}) verified with {desc}")


def test_tampering_any_consistency_path_element_is_a_root_mismatch():
    for old, new in [(1, 2), (3, 7), (4, 7), (6, 7), (6, 8), (100, 4097)]:
        path, r1, r2 = TREE.consistency_proof(old, new), TREE.root(old), TREE.root(new)
        for i in range(len(path)):
            wrong = list(path)
            wrong[i] = flip(wrong[i], 1)
            assert check_of(verify_consistency, old, new, r1, r2, wrong) == ROOT_MISMATCH
        assert check_of(verify_consistency, old, new, r2, r1, path) == ROOT_MISMATCH


# --- Published RFC 6962 vectors (transparency-dev/merkle proof/verify_test.go) ---------------

TD_LEAVES = [
    bytes.fromhex(h) for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657"]
]
TD_LEAVES.append(bytes.fromhex("606162636465666768696a6b6c6d6e6f"))
TD_ROOTS = {
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}
TD_INCLUSION = [  # (leaf counted from 1, size, proof)
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        2,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
TD_CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]


def test_published_inclusion_proofs_verify_and_their_corruptions_do_not():
    for leaf, size, proof in TD_INCLUSION:
        path = [bytes.fromhex(h) for h in proof]
        root, digest = bytes.fromhex(TD_ROOTS[size]), leaf_hash(TD_LEAVES[leaf - 1])
        verify_inclusion(leaf - 1, size, digest, path, root)
        for desc, args in corrupt_inclusion(leaf - 1, size, path, root, digest):
            with pytest.raises(VerificationError):
                verify_inclusion(*args)
                pytest.fail(f"({leaf}, {size}) verified with {desc}")


def test_published_consistency_proofs_verify_and_their_corruptions_do_not():
    for old, new, proof in TD_CONSISTENCY:
        path = [bytes.fromhex(h) for h in proof]
        r1, r2 = bytes.fromhex(TD_ROOTS[old]), bytes.fromhex(TD_ROOTS[new])
        verify_consistency(old, new, r1, r2, path)
        if not path:
            continue
        for desc, args in corrupt_consistency(old, new, r1, r2, path):
            with pytest.raises(VerificationError):
                verify_consistency(*args)
                pytest.fail(f"({old}, {new}) verified with {desc}")


def test_published_trivial_consistency_cases():
    # transparency-dev/merkle TestVerifyConsistency, first table.
    root1, root2 = b"don't care 1", b"don't care 2"
    empty = EMPTY_ROOT
    verify_consistency(0, 0, root1, root1, [])
    verify_consistency(0, 1, root1, root2, [])
    verify_consistency(1, 1, root2, root2, [])
    for old, new, r1, r2, path in [
        (0, 0, root1, root2, []),
        (1, 1, root1, root2, []),
        (1, 0, root1, root2, []),
        (2, 1, root1, root2, []),
        (1, 2, root1, root2, []),
        (0, 0, empty, root2, []),
        (1, 1, empty, root2, []),
        (0, 0, empty, empty, [empty]),
        (0, 1, empty, empty, [empty]),
        (1, 1, empty, empty, [empty]),
    ]:
        with pytest.raises(VerificationError):
            verify_consistency(old, new, r1, r2, path)


# --- pymerkle 7 ----------------------------------------------------------------------------
#
# pymerkle's InclusionProof is RFC 9162 PATH with the leaf hash put first, a 1-based leaf index,
# and a `rule` of bits (1: the next hash is a left sibling) ending with the root's bit 0.
# Its ConsistencyProof is not RFC 9162 §2.1.4: it is the inclusion path of the first new leaf
# (0-based index old_size) with a `subset` mask marking the left siblings, which fold into the
# old root. An RFC proof lacks the hashes below the point where the old tree ends, so pymerkle
# cannot check our RFC consistency proofs directly. Instead: pymerkle checks a proof of its
# layout built from our tree, and pymerkle's proofs, rewritten to RFC form, equal ours and pass
# our verifier.


@pytest.fixture(scope="module")
def pymerkle_tree() -> InmemoryTree:
    tree = InmemoryTree.init_from_entries(DATA, algorithm="sha256")
    assert (tree.leaf_prefix, tree.node_prefix) == (b"\x00", b"\x01")
    return tree


def pymerkle_inclusion_from_ours(index: int, size: int) -> PymerkleInclusionProof:
    ranges = inclusion_ranges(index, size)
    rule = [1 if hi <= index else 0 for _, hi in ranges] + [0]
    path = [TREE.leaf(index), *TREE.inclusion_proof(index, size)]
    return PymerkleInclusionProof("sha256", True, size, index + 1, rule, path)


def pymerkle_consistency_from_our_tree(old: int, new: int) -> PymerkleConsistencyProof:
    ranges = inclusion_ranges(old, new)
    rule = [1 if hi <= old else 0 for _, hi in ranges] + [0]
    subset = [0] + [1 if hi <= old else 0 for _, hi in ranges]
    path = [TREE.leaf(old), *TREE.inclusion_proof(old, new)]
    return PymerkleConsistencyProof("sha256", True, new, old, rule, subset, path)


def rfc_consistency_from_pymerkle(proof: PymerkleConsistencyProof) -> list[bytes]:
    """Rewrite pymerkle's layout to RFC 9162 PROOF(old, D[new]) for 0 < old < new.

    Below the first old-tree hash (subset bit 1), pymerkle's path climbs the new subtree that
    starts at leaf `old`: those hashes fold into that subtree's root, the RFC's element. The
    old-tree hash there is the RFC's first element unless it is the whole old tree (old a
    power of two); above it both layouts list the same siblings bottom up.
    """
    first_old = proof.subset.index(1)
    assert proof.rule[: first_old - 1] == [0] * (first_old - 1)  # only right siblings below
    new_subtree = proof.path[0]
    for h in proof.path[1:first_old]:
        new_subtree = node_hash(new_subtree, h)
    above = proof.path[first_old + 1 :]
    seed = [proof.path[first_old]] if 1 in proof.subset[first_old + 1 :] else []
    return [*seed, new_subtree, *above]


def test_pymerkle_accepts_our_inclusion_proofs(pymerkle_tree):
    for index, size in small_inclusion_pairs() + random_inclusion_pairs(5, 2000):
        proof = pymerkle_inclusion_from_ours(index, size)
        pymerkle_verify_inclusion(
            TREE.leaf(index), TREE.root(size), proof, index=index + 1, size=size
        )


def test_pymerkle_rejects_our_inclusion_proof_with_a_tampered_element(pymerkle_tree):
    proof = pymerkle_inclusion_from_ours(999, 4321)
    proof.path[3] = flip(proof.path[3], 1)
    with pytest.raises(InvalidProof):
        pymerkle_verify_inclusion(TREE.leaf(999), TREE.root(4321), proof)


def test_we_accept_pymerkle_inclusion_proofs(pymerkle_tree):
    for index, size in small_inclusion_pairs() + random_inclusion_pairs(6, 2000):
        proof = pymerkle_tree.prove_inclusion(index + 1, size)
        root = pymerkle_tree.get_root(size)
        verify_inclusion(index, size, leaf_hash(DATA[index]), proof.path[1:], root)


def test_pymerkle_accepts_consistency_proofs_of_its_layout_built_from_our_tree(pymerkle_tree):
    for old, new in small_consistency_pairs() + random_consistency_pairs(7, 2000):
        proof = pymerkle_consistency_from_our_tree(old, new)
        pymerkle_verify_consistency(
            TREE.root(old), TREE.root(new), proof, prior_size=old, later_size=new
        )


def test_pymerkle_consistency_proofs_rewritten_to_rfc_form_equal_ours_and_verify(pymerkle_tree):
    for old, new in small_consistency_pairs() + random_consistency_pairs(8, 2000):
        proof = pymerkle_tree.prove_consistency(old, new)
        path = rfc_consistency_from_pymerkle(proof)
        assert path == TREE.consistency_proof(old, new), (old, new)
        verify_consistency(old, new, pymerkle_tree.get_root(old), pymerkle_tree.get_root(new), path)


# --- Proof bundles -------------------------------------------------------------------------

ORIGIN = "rx.example/log"
SIGNER = Signer(
    "rx.example/log", Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"log").digest())
)


def make_bundle(index: int, size: int) -> dict:
    checkpoint = Checkpoint(ORIGIN, size, TREE.root(size)).text()
    return {
        "leaf": b64(DATA[index]),
        "leafIndex": index,
        "treeSize": size,
        "inclusionPath": [b64(h) for h in TREE.inclusion_proof(index, size)],
        "checkpoint": SIGNER.sign_note(checkpoint),
    }


def verify_bundle_json(obj: object) -> None:
    """What `rxledger verify` does with a bundle: parse, open the note, check the inclusion."""
    bundle = parse_inclusion_bundle(obj)
    cp = open_checkpoint(bundle.checkpoint, [SIGNER.verifier()])
    verify_bundle_inclusion(bundle, cp.size, cp.root_hash)


def test_a_bundle_survives_json_and_verifies():
    for index, size in [(0, 1), (3, 4), (5, 8), (1000, 4097)]:
        verify_bundle_json(json.loads(json.dumps(make_bundle(index, size))))


def test_bundle_with_a_size_other_than_the_checkpoint_is_a_size_mismatch():
    obj = make_bundle(5, 8)
    bundle = parse_inclusion_bundle(obj)
    with pytest.raises(VerificationError) as info:
        verify_bundle_inclusion(bundle, 9, TREE.root(9))
    assert info.value.check == SIZE_MISMATCH
    assert {"8", "9"} <= set(info.value.detail.replace(",", " ").split())
    obj["treeSize"] = 7
    obj["inclusionPath"] = [b64(h) for h in TREE.inclusion_proof(5, 7)]
    assert check_of(verify_bundle_json, obj) == SIZE_MISMATCH


def test_bundle_with_a_tampered_leaf_or_path_element_is_a_root_mismatch():
    good = make_bundle(1000, 4097)
    assert check_of(verify_bundle_json, {**good, "leaf": b64(b"rx-1001")}) == ROOT_MISMATCH
    for i in range(len(good["inclusionPath"])):
        path = list(good["inclusionPath"])
        path[i] = b64(flip(base64.b64decode(path[i]), 2))
        assert check_of(verify_bundle_json, {**good, "inclusionPath": path}) == ROOT_MISMATCH


def test_bundle_with_a_wrong_index_or_path_length_fails():
    good = make_bundle(5, 8)
    assert check_of(verify_bundle_json, {**good, "leafIndex": 4}) == ROOT_MISMATCH
    assert check_of(verify_bundle_json, {**good, "leafIndex": 8}) == MALFORMED
    short = {**good, "inclusionPath": good["inclusionPath"][:-1]}
    assert check_of(verify_bundle_json, short) == WRONG_PROOF_LENGTH


def test_bundle_path_hash_of_the_wrong_size_is_malformed():
    good = make_bundle(5, 8)
    path = list(good["inclusionPath"])
    path[1] = b64(base64.b64decode(path[1])[:20])
    assert check_of(verify_bundle_json, {**good, "inclusionPath": path}) == MALFORMED


def _without(obj: dict, key: str) -> dict:
    return {k: v for k, v in obj.items() if k != key}


GOOD = make_bundle(5, 8)
MALFORMED_BUNDLES = {
    "not an object": [GOOD],
    "a string": json.dumps(GOOD),
    "missing leaf": _without(GOOD, "leaf"),
    "missing leafIndex": _without(GOOD, "leafIndex"),
    "missing treeSize": _without(GOOD, "treeSize"),
    "missing inclusionPath": _without(GOOD, "inclusionPath"),
    "missing checkpoint": _without(GOOD, "checkpoint"),
    "leaf not base64": {**GOOD, "leaf": "not base64!"},
    "leaf unpadded": {**GOOD, "leaf": "cngtNQ"},
    "leaf as a list of bytes": {**GOOD, "leaf": list(DATA[5])},
    "leaf null": {**GOOD, "leaf": None},
    "leafIndex a string": {**GOOD, "leafIndex": "5"},
    "leafIndex a float": {**GOOD, "leafIndex": 5.0},
    "leafIndex a boolean": {**GOOD, "leafIndex": True},
    "leafIndex negative": {**GOOD, "leafIndex": -1},
    "treeSize a boolean": {**GOOD, "treeSize": True},
    "treeSize negative": {**GOOD, "treeSize": -8},
    "treeSize null": {**GOOD, "treeSize": None},
    "inclusionPath a string": {**GOOD, "inclusionPath": GOOD["inclusionPath"][0]},
    "inclusionPath an object": {**GOOD, "inclusionPath": {"0": GOOD["inclusionPath"][0]}},
    "inclusionPath element a number": {**GOOD, "inclusionPath": [1, 2, 3]},
    "inclusionPath element not base64": {
        **GOOD,
        "inclusionPath": ["@@", *GOOD["inclusionPath"][1:]],
    },
    "checkpoint a number": {**GOOD, "checkpoint": 8},
    "checkpoint a list": {**GOOD, "checkpoint": [GOOD["checkpoint"]]},
}


@pytest.mark.parametrize("case", sorted(MALFORMED_BUNDLES))
def test_malformed_bundle_is_rejected_as_malformed_input(case):
    assert check_of(parse_inclusion_bundle, MALFORMED_BUNDLES[case]) == MALFORMED


def test_parse_inclusion_bundle_decodes_every_field():
    bundle = parse_inclusion_bundle(GOOD)
    assert bundle.leaf == DATA[5]
    assert (bundle.leaf_index, bundle.tree_size) == (5, 8)
    assert bundle.inclusion_path == TREE.inclusion_proof(5, 8)
    assert bundle.checkpoint == GOOD["checkpoint"]


# --- Consistency proof files ---------------------------------------------------------------


def test_consistency_proof_file_round_trips_and_verifies():
    obj = {"fromSize": 6, "toSize": 8, "path": [b64(h) for h in TREE.consistency_proof(6, 8)]}
    proof = parse_consistency_proof(json.loads(json.dumps(obj)))
    assert (proof.from_size, proof.to_size) == (6, 8)
    verify_consistency(proof.from_size, proof.to_size, TREE.root(6), TREE.root(8), proof.path)


@pytest.mark.parametrize(
    "obj",
    [
        [],
        "x",
        {"toSize": 8, "path": []},
        {"fromSize": 6, "path": []},
        {"fromSize": 6, "toSize": 8},
        {"fromSize": "6", "toSize": 8, "path": []},
        {"fromSize": 6, "toSize": False, "path": []},
        {"fromSize": -6, "toSize": 8, "path": []},
        {"fromSize": 6, "toSize": 8.0, "path": []},
        {"fromSize": 6, "toSize": 8, "path": "AAAA"},
        {"fromSize": 6, "toSize": 8, "path": [None]},
        {"fromSize": 6, "toSize": 8, "path": ["AA AA"]},
    ],
)
def test_malformed_consistency_proof_file_is_rejected_as_malformed_input(obj):
    assert check_of(parse_consistency_proof, obj) == MALFORMED


# --- base64 --------------------------------------------------------------------------------


def test_b64_and_unb64_round_trip_standard_base64():
    for n in range(70):
        data = hashlib.sha256(bytes([n])).digest()[: n % 33] * 2
        text = b64(data)
        assert text == base64.standard_b64encode(data).decode()
        assert unb64(text) == data


@pytest.mark.parametrize(
    "text",
    ["YQ", "YQ=", "Y", "====", "YQ==\n", " YQ==", "YQ==YQ==", "-_8=", "YQ\u00e9=", "cngtNQ"],
)
def test_unb64_rejects_malformed_or_non_standard_base64(text):
    with pytest.raises(EncodingError):
        unb64(text, "field")


@pytest.mark.parametrize("text", ["YWJj=", "YWJj==", "YWJj===="])
def test_unb64_rejects_padding_after_a_complete_quantum(text):
    # RFC 4648 §3.2/§4: "abc" is exactly "YWJj"; trailing "=" after a full 4-character group is
    # not standard base64 (Go's base64.StdEncoding, which signed-note tools use, rejects it).
    with pytest.raises(EncodingError):
        unb64(text, "field")


def test_unb64_names_the_field_and_rejects_non_strings():
    with pytest.raises(EncodingError, match="inclusionPath\\[2\\]"):
        unb64("%%", "inclusionPath[2]")
    for value in (None, 5, b"YQ=="):
        with pytest.raises(EncodingError):
            unb64(value, "leaf")  # type: ignore[arg-type]
