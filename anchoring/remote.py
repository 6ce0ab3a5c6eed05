"""Reading a log over HTTP as C2SP tlog-tiles: its checkpoint, tiles and entry bundles.

Nothing fetched is trusted: callers verify the checkpoint's signature and check every proof or
rebuilt root computed from the tiles against it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from anchoring.tiles import (
    ENTRIES,
    TileNotFound,
    TileSource,
    parse_entry_bundle,
    tile_path,
)
from anchoring.treemath import TILE_WIDTH

MAX_RESPONSE = 1 << 20  # a tile is 8 KiB; an entry bundle of 256 entries stays far below this


class RemoteError(Exception):
    """The log could not be read: unreachable, or an answer other than the resource."""


class RemoteLog:
    """A tlog-tiles log at `url` (its prefix, e.g. https://rx.example.org/log)."""

    def __init__(self, url: str, client: httpx.AsyncClient | None = None, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self._own_client = client is None
        self.client = client or httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        self.requests = 0

    async def aclose(self) -> None:
        if self._own_client:
            await self.client.aclose()

    async def __aenter__(self) -> RemoteLog:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def get(self, path: str, missing_ok: bool = False) -> bytes | None:
        url = f"{self.url}/{path}"
        self.requests += 1
        try:
            response = await self.client.get(url)
        except httpx.HTTPError as exc:
            raise RemoteError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code != 200:
            raise RemoteError(f"GET {url}: HTTP {response.status_code}: {response.text[:200]}")
        if len(response.content) > MAX_RESPONSE:
            raise RemoteError(f"GET {url}: {len(response.content)} bytes is too large")
        return response.content

    async def checkpoint(self, path: str = "checkpoint") -> str:
        """The signed checkpoint note at `path` (not verified here)."""
        body = await self.get(path)
        assert body is not None
        try:
            return body.decode()
        except UnicodeDecodeError as exc:
            raise RemoteError(f"{self.url}/{path} is not UTF-8 text") from exc

    async def tile(self, level: int, index: int, width: int = TILE_WIDTH) -> bytes:
        path = tile_path(level, index, width)
        body = await self.get(path, missing_ok=True)
        if body is None:
            raise TileNotFound(f"{self.url}/{path}: not found")
        return body

    async def entries(self, index: int, width: int = TILE_WIDTH) -> list[bytes]:
        """The leaves of entry bundle `index`; checks there are `width` of them."""
        data = await self.tile(ENTRIES, index, width)
        try:
            leaves = parse_entry_bundle(data)
        except ValueError as exc:
            raise RemoteError(f"{tile_path(ENTRIES, index, width)}: {exc}") from exc
        if len(leaves) != width:
            raise RemoteError(
                f"{tile_path(ENTRIES, index, width)} holds {len(leaves)} entries, want {width}"
            )
        return leaves

    async def post(self, path: str, body: str) -> httpx.Response:
        url = f"{self.url}/{path}"
        try:
            return await self.client.post(
                url, content=body.encode(), headers={"Content-Type": "text/plain; charset=utf-8"}
            )
        except httpx.HTTPError as exc:
            raise RemoteError(f"POST {url}: {type(exc).__name__}: {exc}") from exc

    def tiles(self, cache_tiles: int = 4096) -> RemoteTiles:
        return RemoteTiles(self, cache_tiles)


class RemoteTiles(TileSource):
    """Node hashes from a remote log's tiles (fetched in parallel), for proofs and roots."""

    def __init__(self, remote: RemoteLog, cache_tiles: int = 4096) -> None:
        super().__init__(cache_tiles)
        self.remote = remote

    async def _fetch(self, keys: list[str]) -> dict[str, bytes]:
        async def one(key: str) -> tuple[str, bytes | None]:
            body, _, partial = key.partition(".p/")
            level, index = (int(x) for x in body.split("/"))
            try:
                return key, await self.remote.tile(level, index, int(partial or TILE_WIDTH))
            except TileNotFound:
                return key, None

        fetched = await asyncio.gather(*(one(key) for key in keys))
        return {key: data for key, data in fetched if data is not None}
