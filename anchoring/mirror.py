"""A static mirror of a log: its C2SP tlog-tiles files (`checkpoint`, `tile/<L>/<N>[.p/<W>]`,
`tile/entries/<N>[.p/<W>]`) in a directory, byte for byte as the log serves them, for any
static web server to serve.

Nothing read from the source is trusted. A copy round, from the checkpoint the mirror holds
(size m, possibly none) to the source's (size s):

1. open the source's checkpoint with the log's verifier keys (and the origin the mirror has);
2. prove it consistent with the mirror's: for s >= m a consistency proof built from the
   source's tiles, checked against both signed roots; for s < m (a source behind the mirror)
   one built from the mirror's own tiles. A proof that fails is a fork: refused;
3. fetch the right-edge (partial) tiles of size s and check that the root they fold to is the
   checkpoint's root: that authenticates them;
4. copy the full tiles top-down, each checked against its hash in the tile above it (already
   authenticated), then the entry bundles, each leaf checked against the level-0 tile;
5. write the checkpoint, last.

Every tile path names fixed bytes (a partial tile's path carries its width), so no file is
ever replaced: a file is written to a temporary name, flushed to disk and linked into place,
and a tile left by an interrupted round is checked like a fetched one and kept. A tile already
on disk that fails its check means the mirror holds files copied toward a checkpoint of
another history, or a file was altered: the round is refused and the checkpoint stays. Tiles
the mirror's own checkpoint covers were checked when copied and are not read again.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

from anchoring.anchorer import SignedCheckpoint
from anchoring.hashing import EMPTY_ROOT, HASH_SIZE, leaf_hash, node_hash
from anchoring.keys import KeySet
from anchoring.note import Checkpoint, Verifier
from anchoring.proofs import consistency_proof, root_hash
from anchoring.remote import RemoteLog
from anchoring.store import LogStore
from anchoring.tiles import (
    ENTRIES,
    TileReader,
    TileSource,
    entry_bundle,
    parse_entry_bundle,
    parse_tile_key,
    read_entry_leaves,
    tile_exists,
    tile_path,
)
from anchoring.treemath import TILE_HEIGHT, TILE_WIDTH, tile_key, tile_width
from anchoring.verify import VerificationError, verify_consistency

CHECKPOINT = "checkpoint"
LOCK = ".mirror.lock"
CONCURRENCY = 8  # tiles fetched at once


class MirrorRefused(Exception):
    """The source's checkpoint or tiles do not verify, or contradict what the mirror holds
    (a fork): nothing of the round was published."""


class MirrorBusy(Exception):
    """Another mirror process is writing the directory."""


class MirrorSource(Protocol):
    """Where a mirror copies from: the log's served bytes, not trusted."""

    def describe(self) -> str: ...

    async def checkpoint(self) -> str | None:
        """The published checkpoint note (None when the log has published none yet)."""
        ...

    async def tile(self, level: int, index: int, width: int) -> bytes:
        """A tile's bytes, an entry bundle's with level ENTRIES; TileNotFound when absent."""
        ...


class RemoteSource:
    """A log served over HTTP as tlog-tiles, e.g. https://rx.example.org/log."""

    def __init__(self, remote: RemoteLog) -> None:
        self.remote = remote

    def describe(self) -> str:
        return f"the log at {self.remote.url}:"

    async def checkpoint(self) -> str | None:
        return await self.remote.checkpoint(missing_ok=True)

    async def tile(self, level: int, index: int, width: int) -> bytes:
        return await self.remote.tile(level, index, width)


class DatabaseSource:
    """A log's MongoDB collections, read as the gateway serves them (no signing key needed):
    the published checkpoint with its cosignatures, the tiles and entry bundles of its size."""

    def __init__(self, store: LogStore) -> None:
        self.store = store
        self.reader = TileReader(store, cache_tiles=64)
        self.size = 0

    def describe(self) -> str:
        return f"the database's log {self.store.origin}:"

    async def checkpoint(self) -> str | None:
        size = (await self.store.head()).get("checkpointSize")
        if size is None:
            return None
        doc = await self.store.notarizations.find_one({"_id": size})
        if doc is None:
            return None
        self.size = int(size)
        return SignedCheckpoint.from_doc(doc).witnessed_note

    async def tile(self, level: int, index: int, width: int) -> bytes:
        if level == ENTRIES:
            return entry_bundle(await read_entry_leaves(self.store, index, width, self.size))
        return await self.reader.tile(level, index, width, self.size)


@dataclass(frozen=True)
class Round:
    """What one copy round did."""

    old_size: int | None  # the mirror's checkpoint before (None: it had none)
    size: int  # the mirror's checkpoint after
    source_size: int | None  # the source's checkpoint (None: the source has none)
    written: int  # files written
    kept: int  # files found already copied by an interrupted round, checked and kept

    @property
    def behind(self) -> bool:
        """Whether the source serves an older checkpoint than the mirror holds."""
        return self.source_size is not None and self.source_size < self.size


Progress = Callable[[int, int], None]


def subtree_hash(hashes: bytes) -> bytes:
    """The root of the perfect subtree over consecutive hashes. Requires a power-of-two count."""
    row = [hashes[i : i + HASH_SIZE] for i in range(0, len(hashes), HASH_SIZE)]
    while len(row) > 1:
        row = [node_hash(row[i], row[i + 1]) for i in range(0, len(row), 2)]
    return row[0]


def full_tile_problem(level: int, index: int, data: bytes, parent: bytes, size: int) -> str | None:
    """Why full tile (level, index) of a tree of `size` is not the one whose hash is in its
    parent tile `parent` (already checked), or None when it is."""
    if len(data) != TILE_WIDTH * HASH_SIZE:
        return f"is {len(data)} bytes, not a full tile"
    parent_index, at = divmod(index, TILE_WIDTH)
    if subtree_hash(data) != parent[at * HASH_SIZE : (at + 1) * HASH_SIZE]:
        parent_width = tile_width(level + 1, parent_index, size)
        return f"does not hash to {tile_path(level + 1, parent_index, parent_width)}[{at}]"
    return None


async def _tampered_hash_tile(source: MirrorSource, cp: Checkpoint) -> str | None:
    """What, if anything, of the source's hash tiles of `cp` does not verify against its
    root: every tile read and checked top-down, nothing written; the tiles above level 0 are
    kept in memory as parents."""
    size = cp.size
    levels = tiles_of(size)
    edge = {t: await source.tile(*t) for ts in levels for t in ts if t[2] < TILE_WIDTH}
    root = await root_hash(_Held({tile_key(*t): d for t, d in edge.items()}), size, size)
    if root != cp.root_hash:
        paths = ", ".join(tile_path(*t) for t in edge)
        return f"right-edge tiles {paths} fold to root {root.hex()}, not the checkpoint's"
    parents = {(level, index): data for (level, index, _), data in edge.items()}
    for level, index, width in [t for ts in levels for t in ts if t[2] == TILE_WIDTH]:
        data = await source.tile(level, index, width)
        why = full_tile_problem(level, index, data, parents[(level + 1, index // TILE_WIDTH)], size)
        if why is not None:
            return f"{tile_path(level, index, width)} {why}"
        if level > 0:
            parents[(level, index)] = data
    return None


class _Held(TileSource):
    """Tiles already in hand, by storage key."""

    def __init__(self, tiles: dict[str, bytes]) -> None:
        super().__init__(cache_tiles=0)
        self.held = tiles

    async def _fetch(self, keys: list[str]) -> dict[str, bytes]:
        return {key: self.held[key] for key in keys if key in self.held}


class _Fetched(TileSource):
    """Tiles read from a source, for a consistency proof (checked against signed roots)."""

    def __init__(self, source: MirrorSource) -> None:
        super().__init__()
        self.source = source

    async def _fetch(self, keys: list[str]) -> dict[str, bytes]:
        async def one(key: str) -> tuple[str, bytes]:
            return key, await self.source.tile(*parse_tile_key(key))

        return dict(await asyncio.gather(*(one(key) for key in keys)))


class _OnDisk(TileSource):
    """Tiles of the mirror's own directory."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    async def _fetch(self, keys: list[str]) -> dict[str, bytes]:
        found = {}
        for key in keys:
            data = _read(self.root / tile_path(*parse_tile_key(key)))
            if data is not None:
                found[key] = data
        return found


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _write_new(path: Path, data: bytes) -> None:
    """Write a file that must not exist yet: a temporary file flushed to disk, then linked
    to its name (which fails rather than replace a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink()


def _replace(path: Path, data: bytes) -> None:
    """Replace a file atomically: readers see the old bytes or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tiles_of(size: int) -> list[list[tuple[int, int, int]]]:
    """The (level, index, width) of every hash tile of a tree of `size`, by level from the
    top down."""
    levels = []
    level = 0
    while size >> (TILE_HEIGHT * level):
        count = size >> (TILE_HEIGHT * level)
        levels.append(
            [
                (level, index, tile_width(level, index, size))
                for index in range((count + TILE_WIDTH - 1) // TILE_WIDTH)
            ]
        )
        level += 1
    return levels[::-1]


class Mirror:
    """The mirror directory `root` of the log whose checkpoints `keys` sign (a key set: each
    checkpoint counts only if a key in force at its size signed it; anchoring.keys)."""

    def __init__(self, root: Path, keys: KeySet | list[Verifier]) -> None:
        self.root = root
        self.keys = KeySet.of(keys)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory for this process; MirrorBusy when another holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / LOCK).open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MirrorBusy(f"another rxledger mirror is writing {self.root}") from None
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def held(self) -> tuple[str, Checkpoint] | None:
        """The mirror's checkpoint note, verified; None when it has none. MirrorRefused when
        it does not verify with the keys."""
        note = _read(self.root / CHECKPOINT)
        if note is None:
            return None
        try:
            text = note.decode()
            return text, self.keys.open_checkpoint(text).checkpoint
        except (UnicodeDecodeError, VerificationError) as exc:
            raise MirrorRefused(
                f"the mirror's own {self.root / CHECKPOINT} does not verify with the log's key "
                f"({exc}): another log's mirror, or another key?"
            ) from None

    async def sync(self, source: MirrorSource, progress: Progress | None = None) -> Round:
        """One copy round (see the module's docstring). Raises MirrorRefused, and whatever
        the source raises when it cannot be read (TileNotFound for a tile it does not serve)."""
        held = self.held()
        old = held[1] if held else None
        old_size = old.size if old else None
        note = await source.checkpoint()
        if note is None:
            return Round(old_size, old_size or 0, None, 0, 0)
        try:
            new = self.keys.open_checkpoint(note, old.origin if old else None).checkpoint
        except VerificationError as exc:
            raise MirrorRefused(f"{source.describe()} checkpoint: {exc}") from None
        if new.size == 0 and new.root_hash != EMPTY_ROOT:
            raise MirrorRefused(f"{source.describe()} checkpoint of size 0 has a non-empty root")
        if old is not None and new.size < old.size:
            await self._check_prefix(new, old, source)
            return Round(old.size, old.size, new.size, 0, 0)
        if old is not None:
            await self._check_consistent(old, new, source)
        if held is not None and held[0] == note:
            return Round(old_size, new.size, new.size, 0, 0)
        written, kept = await _Copy(self.root, source, new, old.size if old else 0, progress).run()
        _replace(self.root / CHECKPOINT, note.encode())
        return Round(old_size, new.size, new.size, written + 1, kept)

    async def _check_consistent(
        self, old: Checkpoint, new: Checkpoint, source: MirrorSource
    ) -> None:
        path = []
        if 0 < old.size < new.size:
            path = await consistency_proof(_Fetched(source), old.size, new.size, new.size)
        try:
            verify_consistency(old.size, new.size, old.root_hash, new.root_hash, path)
        except VerificationError as exc:
            # The proof was built from tiles not checked yet: tell tampering from a fork.
            tampered = await _tampered_hash_tile(source, new)
            if tampered is not None:
                raise MirrorRefused(f"TAMPERED: {source.describe()} {tampered}") from None
            raise MirrorRefused(
                f"FORK: {source.describe()} checkpoint of size {new.size} is not consistent "
                f"with the mirror's checkpoint of size {old.size} ({exc}); the log has "
                "rewritten its history, or the source is another log signed by the same key"
            ) from None

    async def _check_prefix(self, new: Checkpoint, old: Checkpoint, source: MirrorSource) -> None:
        path = []
        if new.size > 0:
            path = await consistency_proof(_OnDisk(self.root), new.size, old.size, old.size)
        try:
            verify_consistency(new.size, old.size, new.root_hash, old.root_hash, path)
        except VerificationError as exc:
            raise MirrorRefused(
                f"FORK: {source.describe()} checkpoint of size {new.size} is behind the "
                f"mirror's of size {old.size} and not a prefix of it ({exc})"
            ) from None


class _Copy:
    """Copying the tiles of checkpoint `new` that a mirror at `old_size` lacks."""

    def __init__(
        self,
        root: Path,
        source: MirrorSource,
        new: Checkpoint,
        old_size: int,
        progress: Progress | None,
    ) -> None:
        self.root = root
        self.source = source
        self.new = new
        self.old_size = old_size
        self.progress = progress
        self.written = 0
        self.kept = 0
        self.done = 0
        self.total = 0
        self._gate = asyncio.Semaphore(CONCURRENCY)
        self._dirs: set[Path] = set()

    def _path(self, level: int, index: int, width: int) -> Path:
        return self.root / tile_path(level, index, width)

    def _missing(self, tiles: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        # What the mirror's checkpoint covers was checked when it was copied.
        return [t for t in tiles if not tile_exists(t[0], t[1], t[2], self.old_size)]

    async def run(self) -> tuple[int, int]:
        size = self.new.size
        levels = [self._missing(tiles) for tiles in tiles_of(size)]
        bundles = self._missing(
            [
                (ENTRIES, n, tile_width(0, n, size))
                for n in range((size + TILE_WIDTH - 1) // TILE_WIDTH)
            ]
        )
        self.total = sum(map(len, levels)) + len(bundles)
        await self._edge([t for tiles in levels for t in tiles if t[2] < TILE_WIDTH])
        for tiles in levels:
            await self._each([t for t in tiles if t[2] == TILE_WIDTH], self._full_tile)
        await self._each(bundles, self._bundle)
        for path in sorted(self._dirs):
            _sync_dir(path)
        return self.written, self.kept

    async def _each(
        self, tiles: list[tuple[int, int, int]], copy: Callable[[int, int, int], Awaitable[None]]
    ) -> None:
        async def one(tile: tuple[int, int, int]) -> None:
            async with self._gate:
                await copy(*tile)

        await asyncio.gather(*(one(t) for t in tiles))

    async def _get(self, level: int, index: int, width: int) -> tuple[bytes, bool]:
        """A tile's bytes, and whether they are a file an interrupted round left."""
        on_disk = _read(self._path(level, index, width))
        if on_disk is not None:
            return on_disk, True
        return await self.source.tile(level, index, width), False

    def _refuse(self, level: int, index: int, width: int, from_disk: bool, why: str) -> NoReturn:
        path = tile_path(level, index, width)
        if from_disk:
            raise MirrorRefused(
                f"{self.root / path} (left by an interrupted round) {why} of the checkpoint of "
                f"size {self.new.size}: it was copied toward a checkpoint of another history, "
                "or altered since; the mirror's checkpoint is unchanged (move the files beyond "
                "it aside to copy them again)"
            )
        raise MirrorRefused(f"TAMPERED: {self.source.describe()} {path} {why} of the checkpoint")

    def _keep(self, level: int, index: int, width: int, data: bytes, from_disk: bool) -> None:
        path = self._path(level, index, width)
        if from_disk:
            self.kept += 1
        else:
            _write_new(path, data)
            self.written += 1
            self._dirs.add(path.parent)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    async def _edge(self, tiles: list[tuple[int, int, int]]) -> None:
        """The partial tiles of the new size, authenticated together by the root."""
        size = self.new.size
        edge = {t: await self._get(*t) for t in tiles}
        held = {tile_key(*t): data for t, (data, _) in edge.items()}
        for (level, index, width), (data, from_disk) in edge.items():
            if len(data) != width * HASH_SIZE:
                self._refuse(level, index, width, from_disk, f"is {len(data)} bytes, not the width")
        # The partial tiles the mirror already held are part of the root too.
        for level, index, width in [t for ts in tiles_of(size) for t in ts if t[2] < TILE_WIDTH]:
            key = tile_key(level, index, width)
            if key not in held:
                held[key] = self._path(level, index, width).read_bytes()
        root = await root_hash(_Held(held), size, size)
        if root != self.new.root_hash:
            left_over = [tile_path(*t) for t, (_, disk) in edge.items() if disk]
            left = f" (of which the files {', '.join(left_over)} were left by an interrupted round)"
            raise MirrorRefused(
                f"TAMPERED: the right-edge tiles {', '.join(tile_path(*t) for t in edge)} of "
                f"{self.source.describe()} fold to root {root.hex()}, not the checkpoint's "
                f"{self.new.root_hash.hex()}" + (left if left_over else "")
            )
        for (level, index, width), (data, from_disk) in edge.items():
            self._keep(level, index, width, data, from_disk)

    async def _full_tile(self, level: int, index: int, width: int) -> None:
        data, from_disk = await self._get(level, index, width)
        parent_index = index // TILE_WIDTH
        parent_width = tile_width(level + 1, parent_index, self.new.size)
        parent = self._path(level + 1, parent_index, parent_width).read_bytes()
        why = full_tile_problem(level, index, data, parent, self.new.size)
        if why is not None:
            self._refuse(level, index, width, from_disk, why)
        self._keep(level, index, width, data, from_disk)

    async def _bundle(self, level: int, index: int, width: int) -> None:
        data, from_disk = await self._get(ENTRIES, index, width)
        try:
            leaves = parse_entry_bundle(data)
        except ValueError as exc:
            self._refuse(ENTRIES, index, width, from_disk, f"is not an entry bundle ({exc})")
        if len(leaves) != width:
            self._refuse(ENTRIES, index, width, from_disk, f"holds {len(leaves)} entries")
        hashes = self._path(0, index, width).read_bytes()
        for i, leaf in enumerate(leaves):
            if leaf_hash(leaf) != hashes[i * HASH_SIZE : (i + 1) * HASH_SIZE]:
                self._refuse(
                    ENTRIES,
                    index,
                    width,
                    from_disk,
                    f"entry {index * TILE_WIDTH + i} does not hash to "
                    f"{tile_path(0, index, width)}[{i}]",
                )
        self._keep(ENTRIES, index, width, data, from_disk)
