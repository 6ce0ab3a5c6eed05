"""Reading and writing tree nodes as immutable C2SP tlog-tiles in MongoDB, and the tlog-tiles
HTTP forms: tile paths and entry bundles.

A tile document is {_id: "L/N" or "L/N.p/W", level: L, index: N, width: W, hashes: W*32 bytes}.
Every document is written once and never changed: a growing right-edge tile is stored again
under a new partial key at each published size, so the tiles of every published size stay
readable. Which key to read follows from the tree size being read (see treemath.tile_width).
"""

from __future__ import annotations

import re
from collections import OrderedDict

from bson import Binary
from pymongo.errors import BulkWriteError

from anchoring.dialect import by_id_range, by_ids
from anchoring.hashing import HASH_SIZE, node_hash
from anchoring.ledger import DUPLICATE_KEY, MAX_LEAF_BYTES
from anchoring.store import Doc, LogStore
from anchoring.treemath import TILE_WIDTH, Node, tile_key, tile_slice, tile_width

ENTRIES = -1  # the "level" of entry bundles in tile paths (tile/entries/N)


class TileCorrupt(Exception):
    """A stored tile is missing or has the wrong shape."""


class TileNotFound(LookupError):
    """A tile or entry bundle that the tree of the given size does not (yet) have."""


def tile_path(level: int, index: int, width: int = TILE_WIDTH) -> str:
    """The tlog-tiles path of a tile, "tile/<L>/<N>[.p/<W>]", or of an entry bundle when
    level is ENTRIES, "tile/entries/<N>[.p/<W>]". N is written in 3-digit groups, all but the
    last prefixed with "x": 1234067 is "x001/x234/067"."""
    if index < 0 or not 0 < width <= TILE_WIDTH or not ENTRIES <= level < 64:
        raise ValueError(f"no tile at level {level}, index {index}, width {width}")
    groups = [f"{index % 1000:03d}"]
    index //= 1000
    while index:
        groups.append(f"x{index % 1000:03d}")
        index //= 1000
    name = "entries" if level == ENTRIES else str(level)
    suffix = "" if width == TILE_WIDTH else f".p/{width}"
    return f"tile/{name}/{'/'.join(reversed(groups))}{suffix}"


_TILE_PATH = re.compile(
    r"tile/(entries|0|[1-9][0-9]?)/((?:x[0-9]{3}/)*)([0-9]{3})(?:\.p/([1-9][0-9]{0,2}))?"
)


def parse_tile_path(path: str) -> tuple[int, int, int]:
    """(level, index, width) of a tlog-tiles path; level is ENTRIES for an entry bundle.
    Raises ValueError for anything that is not a canonical tile path."""
    m = _TILE_PATH.fullmatch(path)
    if m is None:
        raise ValueError(f"{path!r} is not a tile path (tile/<L>/<N>[.p/<W>])")
    name, groups, last, partial = m.groups()
    level = ENTRIES if name == "entries" else int(name)
    index = 0
    for group in [g[1:] for g in groups.split("/") if g] + [last]:
        index = index * 1000 + int(group)
    width = int(partial) if partial else TILE_WIDTH
    if level >= 64 or width >= TILE_WIDTH and partial or tile_path(level, index, width) != path:
        raise ValueError(f"{path!r} is not a canonical tile path")
    return level, index, width


def parse_tile_key(key: str) -> tuple[int, int, int]:
    """(level, index, width) of a storage key "L/N" or "L/N.p/W" (see treemath.tile_key).
    Raises ValueError for anything else."""
    body, sep, partial = key.partition(".p/")
    level, index = (int(x) for x in body.split("/"))
    width = int(partial) if sep else TILE_WIDTH
    if (
        tile_key(level, index, width) != key
        or level < 0
        or index < 0
        or not 0 < width <= TILE_WIDTH
    ):
        raise ValueError(f"{key!r} is not a tile key")
    return level, index, width


def tile_exists(level: int, index: int, width: int, size: int) -> bool:
    """Whether a tree of `size` leaves has all `width` hashes of tile (level, index): a tile
    (or entry bundle, level ENTRIES) of that width is then immutable."""
    return 0 < width <= tile_width(max(level, 0), index, size)


def entry_bundle(leaves: list[bytes]) -> bytes:
    """A tlog-tiles entry bundle: each entry prefixed with its big-endian uint16 length."""
    out = bytearray()
    for leaf in leaves:
        if len(leaf) > MAX_LEAF_BYTES:
            raise ValueError(f"an entry of {len(leaf)} bytes does not fit an entry bundle")
        out += len(leaf).to_bytes(2, "big") + leaf
    return bytes(out)


def parse_entry_bundle(data: bytes) -> list[bytes]:
    """The entries of an entry bundle; raises ValueError when it is truncated."""
    leaves: list[bytes] = []
    at = 0
    while at < len(data):
        if at + 2 > len(data):
            raise ValueError(f"entry bundle is truncated at byte {at}")
        n = int.from_bytes(data[at : at + 2], "big")
        if at + 2 + n > len(data):
            raise ValueError(f"entry bundle is truncated in entry {len(leaves)}")
        leaves.append(data[at + 2 : at + 2 + n])
        at += 2 + n
    return leaves


class _Tile:
    """One tile's hashes, with the rows above them (the tile's inner tree levels) computed
    on first use and kept, so a cached tile hashes its interior once, not once per proof.
    Rows are kept as flat bytes: at most twice the tile's own size."""

    def __init__(self, key: str, data: bytes) -> None:
        self.key = key
        self.rows = [data]

    def node(self, start: int, count: int) -> bytes:
        """Root of the perfect subtree over hashes [start, start + count)."""
        if (start + count) * HASH_SIZE > len(self.rows[0]):
            raise TileCorrupt(
                f"tile {self.key} is {len(self.rows[0])} bytes, too short for hashes {start}..{start + count}"
            )
        level = count.bit_length() - 1
        while len(self.rows) <= level:
            below = self.rows[-1]
            pairs = len(below) // (2 * HASH_SIZE)
            self.rows.append(
                b"".join(
                    node_hash(
                        below[2 * i * HASH_SIZE : (2 * i + 1) * HASH_SIZE],
                        below[(2 * i + 1) * HASH_SIZE : (2 * i + 2) * HASH_SIZE],
                    )
                    for i in range(pairs)
                )
            )
        i = start >> level
        return self.rows[level][i * HASH_SIZE : (i + 1) * HASH_SIZE]


class TileSource:
    """Node hashes through tiles, with an LRU cache (every tile is immutable); subclasses say
    where tiles come from."""

    def __init__(self, cache_tiles: int = 4096) -> None:
        self.cache_tiles = cache_tiles
        self._cache: OrderedDict[str, _Tile] = OrderedDict()
        self.reads = 0  # round trips to the tiles' storage, for tests and benchmarks

    async def _fetch(self, keys: list[str]) -> dict[str, bytes]:
        """The stored bytes of tiles by key ("L/N" or "L/N.p/W"); absent keys are left out."""
        raise NotImplementedError

    def remember(self, docs: list[Doc]) -> None:
        """Cache tiles just written (they never change)."""
        for doc in docs:
            self._put(_Tile(doc["_id"], bytes(doc["hashes"])))

    def _put(self, tile: _Tile) -> None:
        if self.cache_tiles <= 0:
            return
        self._cache[tile.key] = tile
        self._cache.move_to_end(tile.key)
        if len(self._cache) > self.cache_tiles:
            self._cache.popitem(last=False)

    async def _tiles(self, keys: set[str]) -> dict[str, _Tile]:
        found: dict[str, _Tile] = {}
        missing = []
        for key in keys:
            tile = self._cache.get(key)
            if tile is None:
                missing.append(key)
            else:
                self._cache.move_to_end(key)
                found[key] = tile
        if missing:
            self.reads += 1
            for key, data in (await self._fetch(missing)).items():
                tile = _Tile(key, data)
                found[key] = tile
                self._put(tile)
        absent = [key for key in keys if key not in found]
        if absent:
            raise TileCorrupt(f"tile {absent[0]} is missing from storage")
        return found

    async def tile(self, level: int, index: int, width: int, published_size: int) -> bytes:
        """The bytes of tile (level, index) of `width` hashes, as tlog-tiles serves them.
        Any width the tree of `published_size` completes is served: a narrower partial tile
        is a prefix of the stored wider one. Raises TileNotFound otherwise."""
        if level < 0 or not tile_exists(level, index, width, published_size):
            raise TileNotFound(
                f"the tree of size {published_size} has no {tile_path(max(level, 0), index, width)}"
            )
        key = tile_key(level, index, tile_width(level, index, published_size))
        data = (await self._tiles({key}))[key].rows[0]
        if len(data) < width * HASH_SIZE:
            raise TileCorrupt(f"tile {key} is {len(data)} bytes, too short for {width} hashes")
        return data[: width * HASH_SIZE]

    async def nodes(self, nodes: list[Node], published_size: int) -> dict[Node, bytes]:
        """Hashes of complete nodes of the tree, read from the tiles of `published_size`.

        Requires every node to be complete at published_size, a size that was published.
        """
        slices = {node: tile_slice(node) for node in nodes}
        keys = {}
        for node, sl in slices.items():
            width = tile_width(sl.tile_level, sl.tile_index, published_size)
            if sl.start + sl.count > width:
                raise ValueError(f"node {node} is not complete in a tree of size {published_size}")
            keys[node] = tile_key(sl.tile_level, sl.tile_index, width)
        tiles = await self._tiles(set(keys.values()))
        return {node: tiles[keys[node]].node(sl.start, sl.count) for node, sl in slices.items()}


class TileReader(TileSource):
    """Tiles from the log's MongoDB collection."""

    def __init__(self, store: LogStore, cache_tiles: int = 4096) -> None:
        super().__init__(cache_tiles)
        self.store = store

    async def _fetch(self, keys: list[str]) -> dict[str, bytes]:
        found = await by_ids(self.store.tiles, keys)
        return {key: bytes(doc["hashes"]) for key, doc in found.items()}


async def read_entry_leaves(
    store: LogStore, index: int, width: int, published_size: int
) -> list[bytes]:
    """The `width` leaves of tlog-tiles entry bundle `index`, from the log's entries; raises
    TileNotFound when the tree of `published_size` does not have them all, TileCorrupt when
    entries are missing."""
    if not tile_exists(ENTRIES, index, width, published_size):
        raise TileNotFound(
            f"the tree of size {published_size} has no {tile_path(ENTRIES, index, width)}"
        )
    first = index * TILE_WIDTH
    found = await by_id_range(store.entries, first, first + width, {"leaf": 1})
    leaves = [(int(doc["_id"]), bytes(doc["leaf"])) for doc in found]
    if [i for i, _ in leaves] != list(range(first, first + width)):
        raise TileCorrupt(f"entries {first}..{first + width - 1} are not all stored")
    return [leaf for _, leaf in leaves]


def tile_document(level: int, index: int, hashes: list[bytes]) -> Doc:
    return {
        "_id": tile_key(level, index, len(hashes)),
        "level": level,
        "index": index,
        "width": len(hashes),
        "hashes": Binary(b"".join(hashes)),
    }


async def write_tiles(store: LogStore, docs: list[Doc]) -> None:
    """Insert tile documents; an identical one already there (a retry) is fine."""
    if not docs:
        return
    try:
        await store.tiles.insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(err.get("code") != DUPLICATE_KEY for err in errors):
            raise
        # Tiles are a deterministic function of the entries, so an existing key must hold
        # the same bytes; verify rather than assume.
        for err in errors:
            doc = docs[err["index"]]
            existing = await store.tiles.find_one({"_id": doc["_id"]})
            if existing is None or bytes(existing["hashes"]) != bytes(doc["hashes"]):
                raise TileCorrupt(
                    f"tile {doc['_id']} already stored with different hashes"
                ) from exc
