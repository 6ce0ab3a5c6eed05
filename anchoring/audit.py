"""Audit replay: rebuild the whole log from the stored events and check everything against it.

Reads every entry in index order with its ledger event, recomputes each leaf from the event's
header, rebuilds the tree, compares every stored tile and every checkpoint's root, verifies each
checkpoint's signature and the consistency between consecutive checkpoints. Reports the first
divergence with the index, tile or checkpoint where it shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from anchoring.encoding import EncodingError, b64, canonical_json
from anchoring.hashing import HASH_SIZE, leaf_hash
from anchoring.note import Verifier, open_checkpoint
from anchoring.proofs import consistency_proof
from anchoring.store import Doc, LogStore
from anchoring.tiles import TileCorrupt, TileReader
from anchoring.treemath import TILE_HEIGHT, TILE_WIDTH, CompactRange, Node, tile_key
from anchoring.verify import VerificationError, verify_consistency

PAGE = 1000


@dataclass
class AuditReport:
    entries: int = 0
    checkpoints: int = 0
    tiles: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class _Stop(Exception):
    pass


async def audit_log(
    store: LogStore,
    verifiers: list[Verifier],
    progress: Callable[[int, int], None] | None = None,
    max_problems: int = 20,
) -> AuditReport:
    report = AuditReport()

    def problem(message: str) -> None:
        report.problems.append(message)
        if len(report.problems) >= max_problems:
            raise _Stop

    try:
        await _audit(store, verifiers, report, problem, progress)
    except _Stop:
        pass
    return report


async def _load_checkpoints(
    store: LogStore, verifiers: list[Verifier], problem: Callable[[str], None]
) -> list[Doc]:
    checkpoints = []
    async for doc in store.notarizations.find({}).sort("_id", 1):
        size = doc.get("_id")
        try:
            cp = open_checkpoint(doc.get("note", ""), verifiers, store.origin)
        except VerificationError as exc:
            problem(f"checkpoint {size}: signed note does not verify ({exc})")
            continue
        if cp.size != size or cp.size != doc.get("size"):
            problem(f"checkpoint {size}: note says size {cp.size}, document says {doc.get('size')}")
            continue
        if cp.root_hash != bytes(doc.get("rootHash", b"")):
            problem(f"checkpoint {size}: rootHash field differs from the signed note's root")
        checkpoints.append({"size": cp.size, "root": cp.root_hash})
    return checkpoints


async def _audit(
    store: LogStore,
    verifiers: list[Verifier],
    report: AuditReport,
    problem: Callable[[str], None],
    progress: Callable[[int, int], None] | None,
) -> None:
    head = await store.head()
    published = int(head.get("size", 0))
    checkpoints = await _load_checkpoints(store, verifiers, problem)
    report.checkpoints = len(checkpoints)
    if checkpoints and checkpoints[-1]["size"] > published:
        problem(
            f"checkpoint {checkpoints[-1]['size']} is beyond the published tree size {published}"
        )
    next_cp = 0
    rng = CompactRange()
    tile_rows: dict[int, tuple[int, list[bytes]]] = {}
    last_version: dict[str, tuple[int, bytes]] = {}

    async def compare_tile(level: int, index: int, hashes: list[bytes]) -> None:
        key = tile_key(level, index, len(hashes))
        doc = await store.tiles.find_one({"_id": key})
        report.tiles += 1
        if doc is None:
            problem(f"tile {key}: missing")
            return
        stored = bytes(doc.get("hashes", b""))
        for i, h in enumerate(hashes):
            if stored[i * HASH_SIZE : (i + 1) * HASH_SIZE] != h:
                first = (index * TILE_WIDTH + i) << (TILE_HEIGHT * level)
                problem(
                    f"tile {key}: hash {i} differs from the tree rebuilt from the ledger (leaves from {first})"
                )
                return

    pending_tiles: list[tuple[int, int, list[bytes]]] = []

    def on_node(node: Node, digest: bytes) -> None:
        if node.level % TILE_HEIGHT:
            return
        level, index = node.level // TILE_HEIGHT, node.index // TILE_WIDTH
        row = tile_rows.get(level)
        if row is None or row[0] != index:
            row = (index, [])
            tile_rows[level] = row
        row[1].append(digest)
        if len(row[1]) == TILE_WIDTH:
            pending_tiles.append((level, index, row[1]))
            del tile_rows[level]

    index = 0
    while index < published:
        page = [
            d
            async for d in store.entries.find(
                {"_id": {"$gte": index, "$lt": min(index + PAGE, published)}}
            ).sort("_id", 1)
        ]
        events = {}
        ids = [d.get("event") for d in page]
        async for ev in store.ledger.find({"_id": {"$in": ids}}):
            events[ev["_id"]] = ev
        for entry in page:
            if entry["_id"] != index:
                problem(
                    f"entry {index}: missing (the next stored entry is {entry['_id']}); entries were deleted"
                )
                return
            leaf = bytes(entry.get("leaf", b""))
            event = events.get(entry.get("event"))
            if event is None:
                problem(f"entry {index}: its ledger event {entry.get('event')} was deleted")
            else:
                _check_event(index, leaf, event, last_version, problem)
            rng.append(leaf_hash(leaf), on_node)
            index += 1
            while next_cp < len(checkpoints) and checkpoints[next_cp]["size"] == rng.size:
                if rng.root() != checkpoints[next_cp]["root"]:
                    problem(
                        f"checkpoint {rng.size}: its root differs from the tree rebuilt from the ledger "
                        f"(an entry before index {rng.size} was edited, deleted or reordered)"
                    )
                next_cp += 1
            for level, tindex, hashes in pending_tiles:
                await compare_tile(level, tindex, hashes)
            pending_tiles.clear()
        if len(page) < min(PAGE, published - (index - len(page))):
            problem(f"entry {index}: missing; the log has {index} of {published} published entries")
            return
        report.entries = index
        if progress is not None:
            progress(index, published)
    for level, (tindex, hashes) in sorted(tile_rows.items()):
        await compare_tile(level, tindex, hashes)
    while next_cp < len(checkpoints) and checkpoints[next_cp]["size"] == 0:
        next_cp += 1
    reader = TileReader(store, cache_tiles=64)
    for old, new in zip(checkpoints, checkpoints[1:], strict=False):
        try:
            path = await consistency_proof(reader, old["size"], new["size"], published)
            verify_consistency(old["size"], new["size"], old["root"], new["root"], path)
        except (VerificationError, TileCorrupt, ValueError) as exc:
            problem(f"checkpoints {old['size']} -> {new['size']}: not consistent ({exc})")


def _check_event(
    index: int,
    leaf: bytes,
    event: Doc,
    last_version: dict[str, tuple[int, bytes]],
    problem: Callable[[str], None],
) -> None:
    try:
        recomputed = canonical_json(event.get("header"))
    except EncodingError:
        recomputed = b""
    if recomputed != leaf:
        problem(
            f"entry {index}: ledger event {event['_id']} was edited (its header no longer matches the sequenced leaf)"
        )
        return
    subject, version = str(event.get("subject")), int(event.get("version") or 0)
    header = event.get("header") or {}
    if header.get("subject", subject) != subject or header.get("version", version) != version:
        problem(
            f"entry {index}: event {event['_id']} subject/version fields differ from its header"
        )
    previous = last_version.get(subject)
    expected = 1 if previous is None else previous[0] + 1
    if previous is not None and version != expected:
        problem(
            f"entry {index}: {subject} version {version} follows version {previous[0]} (events reordered or missing)"
        )
    if "prev" in header and previous is not None:
        if header["prev"] != b64(previous[1]):
            problem(
                f"entry {index}: {subject} v{version} prev hash does not match the leaf hash of v{previous[0]}"
            )
    last_version[subject] = (version, leaf_hash(leaf))
