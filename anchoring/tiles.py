"""Reading and writing tree nodes as immutable C2SP tlog-tiles in MongoDB.

A tile document is {_id: "L/N" or "L/N.p/W", level: L, index: N, width: W, hashes: W*32 bytes}.
Every document is written once and never changed: a growing right-edge tile is stored again
under a new partial key at each published size, so the tiles of every published size stay
readable. Which key to read follows from the tree size being read (see treemath.tile_width).
"""

from __future__ import annotations

from collections import OrderedDict

from bson import Binary
from pymongo.errors import BulkWriteError

from anchoring.hashing import HASH_SIZE, node_hash
from anchoring.ledger import DUPLICATE_KEY
from anchoring.store import Doc, LogStore, one_of
from anchoring.treemath import Node, tile_key, tile_slice, tile_width


class TileCorrupt(Exception):
    """A stored tile is missing or has the wrong shape."""


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


class TileReader:
    """Fetches node hashes through tiles, with an LRU cache (every tile is immutable)."""

    def __init__(self, store: LogStore, cache_tiles: int = 4096) -> None:
        self.store = store
        self.cache_tiles = cache_tiles
        self._cache: OrderedDict[str, _Tile] = OrderedDict()
        self.reads = 0  # database round trips, for tests and benchmarks

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
            query = one_of("_id", missing)
            async for doc in self.store.tiles.find(query):
                tile = _Tile(doc["_id"], bytes(doc["hashes"]))
                found[tile.key] = tile
                self._put(tile)
        absent = [key for key in keys if key not in found]
        if absent:
            raise TileCorrupt(f"tile {absent[0]} is missing from storage")
        return found

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
