"""Audit replay: rebuild the whole log from the stored events and check everything against it.

Reads every entry in index order with its ledger event, recomputes each leaf from the event's
header, rebuilds the tree, compares every stored tile and every checkpoint's root, verifies each
checkpoint's signature and the consistency between consecutive checkpoints, and that each
entry's position (from the head's `positionsFrom` on, or wherever one is stored) names it.
Reports the first divergence with the index, tile or checkpoint where it shows; positions that
disagree with the entries come after the replay's findings.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from anchoring.dialect import by_id_range, by_ids
from anchoring.encoding import EncodingError, b64, canonical_json
from anchoring.hashing import EMPTY_ROOT, HASH_SIZE, leaf_hash
from anchoring.keys import KeySet
from anchoring.note import Checkpoint, Verifier
from anchoring.proofs import consistency_proof
from anchoring.remote import RemoteLog
from anchoring.store import Doc, LogStore
from anchoring.tiles import TileCorrupt, TileNotFound, TileReader, parse_tile_key, tile_path
from anchoring.treemath import TILE_HEIGHT, TILE_WIDTH, CompactRange, Node, tile_key, tile_width
from anchoring.verify import VerificationError, verify_consistency

PAGE = 1000


@dataclass
class AuditReport:
    entries: int = 0
    checkpoints: int = 0
    tiles: int = 0
    problems: list[str] = field(default_factory=list)
    note: str | None = None  # the checkpoint audited (a remote audit)
    # Which log key signed which checkpoints: key label -> (smallest size, largest size).
    signed_by: dict[str, tuple[int, int]] = field(default_factory=dict)

    def signed(self, labels: list[str], size: int) -> None:
        for label in labels:
            low, high = self.signed_by.get(label, (size, size))
            self.signed_by[label] = (min(low, size), max(high, size))

    @property
    def keys_text(self) -> str:
        """`label (sizes a..b)` for each key that signed, in order of first size."""
        ranges = sorted(self.signed_by.items(), key=lambda item: item[1])
        return ", ".join(f"{label} (sizes {a}..{b})" for label, (a, b) in ranges)

    @property
    def ok(self) -> bool:
        return not self.problems


class _Stop(Exception):
    pass


Problem = Callable[[str], None]


async def _collect(
    max_problems: int, audit: Callable[[AuditReport, Problem], Awaitable[None]]
) -> AuditReport:
    """Run `audit` with a report and a `problem` callback that stops it at `max_problems`."""
    report = AuditReport()

    def problem(message: str) -> None:
        report.problems.append(message)
        if len(report.problems) >= max_problems:
            raise _Stop

    try:
        await audit(report, problem)
    except _Stop:
        pass
    return report


async def audit_log(
    store: LogStore,
    verifiers: KeySet | list[Verifier],
    progress: Callable[[int, int], None] | None = None,
    max_problems: int = 20,
) -> AuditReport:
    """Audit the log in `store`; its checkpoints must be signed by a key of `verifiers` in
    force at their size (a list of verifiers: each for every size)."""
    keys = KeySet.of(verifiers)
    return await _collect(
        max_problems, lambda report, problem: _audit(store, keys, report, problem, progress)
    )


async def _load_checkpoints(
    store: LogStore, keys: KeySet, report: AuditReport, problem: Problem
) -> list[Doc]:
    checkpoints = []
    async for doc in store.notarizations.find({}).sort("_id", 1):
        size = doc.get("_id")
        try:
            signed = keys.open_checkpoint(str(doc.get("note", "")), store.origin)
            cp = signed.checkpoint
            stored_root = bytes(doc.get("rootHash", b""))
        except VerificationError as exc:
            problem(f"checkpoint {size}: signed note does not verify ({exc})")
            continue
        except (TypeError, ValueError) as exc:
            problem(f"checkpoint {size}: malformed document ({exc})")
            continue
        if cp.size != size or cp.size != doc.get("size"):
            problem(f"checkpoint {size}: note says size {cp.size}, document says {doc.get('size')}")
            continue
        if cp.root_hash != stored_root:
            problem(f"checkpoint {size}: rootHash field differs from the signed note's root")
        report.signed([k.label for k in signed.keys], cp.size)
        checkpoints.append({"size": cp.size, "root": cp.root_hash})
    return checkpoints


async def _audit(
    store: LogStore,
    keys: KeySet,
    report: AuditReport,
    problem: Problem,
    progress: Callable[[int, int], None] | None,
) -> None:
    head = await store.head()
    published = int(head.get("size", 0))
    positioned = head.get("positionsFrom")
    # Positions are an index of the entries: what disagrees there is reported after the
    # replay's own findings, whose first one is the first divergence.
    misplaced: list[str] = []
    checkpoints = await _load_checkpoints(store, keys, report, problem)
    report.checkpoints = len(checkpoints)
    if checkpoints and checkpoints[-1]["size"] > published:
        problem(
            f"checkpoint {checkpoints[-1]['size']} is beyond the published tree size {published}"
        )
    next_cp = 0
    rng = CompactRange()
    last_version: dict[str, tuple[int, bytes]] = {}

    rows: dict[int, list[bytes]] = {}  # tile level -> recomputed hashes of tree level 8*L

    def on_node(node: Node, digest: bytes) -> None:
        if node.level % TILE_HEIGHT == 0:
            rows.setdefault(node.level // TILE_HEIGHT, []).append(digest)

    index = 0
    while index < published:
        page = await by_id_range(store.entries, index, min(index + PAGE, published))
        ids = [d.get("event") for d in page]
        events, positions = await asyncio.gather(
            by_ids(store.ledger, ids), by_ids(store.positions, ids, {"index": 1})
        )
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
            if len(misplaced) < PAGE:
                _check_position(
                    index, positions.get(entry.get("event")), positioned, misplaced.append
                )
            rng.append(leaf_hash(leaf), on_node)
            index += 1
            while next_cp < len(checkpoints) and checkpoints[next_cp]["size"] == rng.size:
                if rng.root() != checkpoints[next_cp]["root"]:
                    problem(
                        f"checkpoint {rng.size}: its root differs from the tree rebuilt from the ledger "
                        f"(an entry before index {rng.size} was edited, deleted or reordered)"
                    )
                next_cp += 1
        if len(page) < min(PAGE, published - (index - len(page))):
            problem(f"entry {index}: missing; the log has {index} of {published} published entries")
            return
        report.entries = index
        if progress is not None:
            progress(index, published)
    sizes = {published} | {cp["size"] for cp in checkpoints if cp["size"] <= published}
    await _check_tiles(store, rows, sizes, report, problem)
    while next_cp < len(checkpoints) and checkpoints[next_cp]["size"] == 0:
        next_cp += 1
    reader = TileReader(store, cache_tiles=64)
    for old, new in zip(checkpoints, checkpoints[1:], strict=False):
        try:
            path = await consistency_proof(reader, old["size"], new["size"], published)
            verify_consistency(old["size"], new["size"], old["root"], new["root"], path)
        except (VerificationError, TileCorrupt, ValueError) as exc:
            problem(f"checkpoints {old['size']} -> {new['size']}: not consistent ({exc})")
    for message in misplaced:
        problem(message)


async def audit_remote(
    remote: RemoteLog,
    verifiers: KeySet | list[Verifier],
    progress: Callable[[int, int], None] | None = None,
    max_problems: int = 20,
    origin: str | None = None,
    since: str | None = None,
) -> AuditReport:
    """Audit a log through its tlog-tiles alone: verify its current checkpoint, read every
    entry bundle, check each leaf (canonical JSON, versions and prev hashes per subject), rebuild
    the tree and compare every tile of the checkpoint's size and the root with the checkpoint.
    With `since`, a checkpoint of the same log seen before (a signed note), the rebuilt tree
    must also have its root at its size: the log has not rewritten what was seen. A resource
    the checkpoint needs and the log does not serve is a problem; RemoteError (the log
    unreachable, too slow, answering errors) is raised."""

    async def audit(report: AuditReport, problem: Problem) -> None:
        try:
            await _audit_remote(
                remote, KeySet.of(verifiers), report, problem, progress, origin, since
            )
        except TileNotFound as exc:
            report.problems.append(f"the log does not serve what its checkpoint needs: {exc}")

    return await _collect(max_problems, audit)


async def _audit_remote(
    remote: RemoteLog,
    keys: KeySet,
    report: AuditReport,
    problem: Problem,
    progress: Callable[[int, int], None] | None,
    origin: str | None,
    since: str | None,
) -> None:
    note = await remote.checkpoint()
    assert note is not None
    try:
        signed = keys.open_checkpoint(note, origin)
    except VerificationError as exc:
        problem(f"checkpoint: {exc}")
        return
    cp = signed.checkpoint
    report.signed([k.label for k in signed.keys], cp.size)
    report.checkpoints = 1
    report.note = note
    seen: Checkpoint | None = None
    if since is not None:
        try:
            seen_signed = keys.open_checkpoint(since, cp.origin)
            seen = seen_signed.checkpoint
            report.signed([k.label for k in seen_signed.keys], seen.size)
        except VerificationError as exc:
            problem(f"the checkpoint seen before: {exc}")
            return
        report.checkpoints = 2
        if seen.size > cp.size:
            problem(
                f"checkpoint {cp.size} is smaller than checkpoint {seen.size} seen before: "
                "the log rolled back"
            )
            return
        if seen.size == 0 and seen.root_hash != EMPTY_ROOT:
            problem("the checkpoint seen before, of size 0, has a root other than the empty tree's")
    size = cp.size
    rng = CompactRange()
    rows: dict[int, list[bytes]] = {}
    last_version: dict[str, tuple[int, bytes]] = {}

    def on_node(node: Node, digest: bytes) -> None:
        # Level 0 is checked leaf by leaf; higher tiles against these rows at the end.
        if node.level % TILE_HEIGHT == 0 and node.level > 0:
            rows.setdefault(node.level // TILE_HEIGHT, []).append(digest)

    for bundle in range((size + TILE_WIDTH - 1) // TILE_WIDTH):
        width = tile_width(0, bundle, size)
        leaves = await remote.entries(bundle, width)
        stored = await remote.tile(0, bundle, width)
        for i, leaf in enumerate(leaves):
            index = bundle * TILE_WIDTH + i
            digest = leaf_hash(leaf)
            if stored[i * HASH_SIZE : (i + 1) * HASH_SIZE] != digest:
                problem(
                    f"entry {index}: its leaf does not hash to {tile_path(0, bundle, width)}[{i}]"
                )
            _check_leaf(index, leaf, last_version, problem)
            rng.append(digest, on_node)
            if seen is not None and rng.size == seen.size and rng.root() != seen.root_hash:
                problem(
                    f"checkpoint {seen.size} seen before is not a prefix of checkpoint {cp.size}: "
                    "the log has rewritten its history since (a fork)"
                )
        report.entries = rng.size
        if progress is not None:
            progress(rng.size, size)
    if rng.root() != cp.root_hash:
        problem(f"checkpoint {size}: its root differs from the tree rebuilt from the entry bundles")
    level = 1
    while size >> (TILE_HEIGHT * level):
        nodes = size >> (TILE_HEIGHT * level)
        for index in range((nodes + TILE_WIDTH - 1) // TILE_WIDTH):
            width = tile_width(level, index, size)
            stored = await remote.tile(level, index, width)
            expected = rows.get(level, [])[index * TILE_WIDTH : index * TILE_WIDTH + width]
            report.tiles += 1
            if stored != b"".join(expected):
                problem(
                    f"{tile_path(level, index, width)} differs from the tree rebuilt from the "
                    "entry bundles"
                )
        level += 1
    report.tiles += (size + TILE_WIDTH - 1) // TILE_WIDTH


def _parse_tile_key(key: object) -> tuple[int, int, int] | None:
    """(level, index, width) from "L/N" or "L/N.p/W", None for anything else."""
    try:
        return parse_tile_key(key) if isinstance(key, str) else None
    except ValueError:
        return None


async def _check_tiles(
    store: LogStore,
    rows: dict[int, list[bytes]],
    sizes: set[int],
    report: AuditReport,
    problem: Problem,
) -> None:
    """Every stored tile, full or partial (older sizes included), against the rebuilt tree,
    and every tile that proofs at the published and checkpointed sizes need must exist."""
    found: list[tuple[int, str]] = []
    needed: dict[str, int] = {}
    largest = max(sizes, default=0)
    for size in sizes:
        level = 0
        while size >> (TILE_HEIGHT * level):
            count = size >> (TILE_HEIGHT * level)
            # Full tiles are shared by every size: list them once, for the largest; each
            # other size adds only its right-edge partial tile per level.
            first = 0 if size == largest else count // TILE_WIDTH
            for index in range(first, (count + TILE_WIDTH - 1) // TILE_WIDTH):
                width = tile_width(level, index, size)
                needed[tile_key(level, index, width)] = (index * TILE_WIDTH) << (
                    TILE_HEIGHT * level
                )
            level += 1
    async for doc in store.tiles.find({}):
        report.tiles += 1
        key = doc.get("_id")
        needed.pop(str(key), None)
        parsed = _parse_tile_key(key)
        if parsed is None:
            found.append((-1, f"tile {key!r}: not a tile key"))
            continue
        level, index, width = parsed
        stored = bytes(doc.get("hashes", b""))
        expected = rows.get(level, [])[index * TILE_WIDTH : index * TILE_WIDTH + width]
        first_leaf = (index * TILE_WIDTH) << (TILE_HEIGHT * level)
        if len(stored) != width * HASH_SIZE:
            found.append(
                (first_leaf, f"tile {key}: holds {len(stored)} bytes, want {width * HASH_SIZE}")
            )
        elif len(expected) < width:
            found.append((first_leaf, f"tile {key}: covers nodes beyond the rebuilt tree"))
        else:
            for i, h in enumerate(expected):
                if stored[i * HASH_SIZE : (i + 1) * HASH_SIZE] != h:
                    leaf = (index * TILE_WIDTH + i) << (TILE_HEIGHT * level)
                    message = f"tile {key}: hash {i} differs from the tree rebuilt from the ledger (leaves from {leaf})"
                    found.append((leaf, message))
                    break
    found.extend((leaf, f"tile {key}: missing") for key, leaf in needed.items())
    for _, message in sorted(found):
        problem(message)


def _check_position(index: int, position: Doc | None, positioned: object, problem: Problem) -> None:
    """Entry `index`'s position, if stored, names it; from `positioned` (the head's
    positionsFrom) on, one is stored."""
    if position is not None:
        if position.get("index") != index:
            problem(
                f"entry {index}: its event's position says {position.get('index')}; "
                "the positions were edited"
            )
    elif isinstance(positioned, int) and index >= positioned:
        problem(f"entry {index}: its event has no position (positions begin at {positioned})")


def _check_event(
    index: int,
    leaf: bytes,
    event: Doc,
    last_version: dict[str, tuple[int, bytes]],
    problem: Problem,
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
    _check_chain(index, subject, version, header, leaf, last_version, problem)


def _check_leaf(
    index: int,
    leaf: bytes,
    last_version: dict[str, tuple[int, bytes]],
    problem: Problem,
) -> None:
    """A leaf read from a remote log, which may be hostile: canonical JSON of an object with a
    string subject and a positive integer version, in order after the subject's last one."""
    try:
        header = json.loads(leaf)
        canonical = canonical_json(header) == leaf
    except (ValueError, RecursionError, EncodingError):
        header, canonical = None, False
    if not isinstance(header, dict) or not canonical:
        problem(f"entry {index}: the leaf is not a JSON object in RFC 8785 canonical form")
        return
    subject, version = header.get("subject"), header.get("version")
    if not isinstance(subject, str) or type(version) is not int or version < 1:
        problem(f"entry {index}: the leaf has no string subject and positive integer version")
        return
    _check_chain(index, subject, version, header, leaf, last_version, problem)


def _check_chain(
    index: int,
    subject: str,
    version: int,
    header: Doc,
    leaf: bytes,
    last_version: dict[str, tuple[int, bytes]],
    problem: Problem,
) -> None:
    """Each subject's versions in order, each `prev` the leaf hash of the version before."""
    previous = last_version.get(subject)
    expected = 1 if previous is None else previous[0] + 1
    if version != expected:
        after = (
            "is the subject's first entry" if previous is None else f"follows version {previous[0]}"
        )
        problem(f"entry {index}: {subject} version {version} {after} (events reordered or missing)")
    if "prev" in header and previous is not None:
        if header["prev"] != b64(previous[1]):
            problem(
                f"entry {index}: {subject} v{version} prev hash does not match the leaf hash of v{previous[0]}"
            )
    last_version[subject] = (version, leaf_hash(leaf))
