"""Reading a log over HTTP as C2SP tlog-tiles: its checkpoint, tiles and entry bundles.

Nothing fetched is trusted: callers verify the checkpoint's signature and check every proof or
rebuilt root computed from the tiles against it. A log may also be hostile to its readers, so
every response is bounded in size (after decompression) and in time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from anchoring.hashing import HASH_SIZE
from anchoring.ledger import MAX_LEAF_BYTES
from anchoring.note import MAX_NOTE_BYTES
from anchoring.tiles import (
    ENTRIES,
    TileNotFound,
    TileSource,
    parse_entry_bundle,
    parse_tile_key,
    tile_path,
)
from anchoring.treemath import TILE_WIDTH

MAX_TILE = TILE_WIDTH * HASH_SIZE
MAX_BUNDLE = TILE_WIDTH * (2 + MAX_LEAF_BYTES)
MAX_ANSWER = 64 * 1024  # what a log says back to a POST


class RemoteError(Exception):
    """The log could not be read: unreachable, too slow, or an answer other than the
    resource."""


def printable(text: str, limit: int = 300) -> str:
    """Text from a remote server, safe to print: control characters (terminal escapes among
    them) escaped, and cut at `limit` characters."""
    text = text[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class RemoteLog:
    """A tlog-tiles log at `url` (its prefix, e.g. https://rx.example.org/log). Each request
    must complete within `timeout` seconds."""

    def __init__(self, url: str, client: httpx.AsyncClient | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._own_client = client is None
        self.client = client or httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    async def aclose(self) -> None:
        if self._own_client:
            await self.client.aclose()

    async def __aenter__(self) -> RemoteLog:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _request(
        self, method: str, path: str, limit: int, content: bytes | None = None
    ) -> tuple[int, bytes]:
        """(status, body) of one request; the body is read (decoded) up to `limit` bytes."""
        url = f"{self.url}/{path}"
        headers = {"Content-Type": "text/plain; charset=utf-8"} if content is not None else None
        try:
            async with asyncio.timeout(self.timeout):
                async with self.client.stream(
                    method, url, content=content, headers=headers
                ) as response:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > limit:
                            raise RemoteError(
                                f"{method} {url}: the answer is larger than {limit} bytes"
                            )
                    return response.status_code, bytes(body)
        except TimeoutError:
            raise RemoteError(
                f"{method} {url}: no complete answer within {self.timeout:g} s"
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise RemoteError(
                f"{method} {url}: {type(exc).__name__}: {printable(str(exc))}"
            ) from exc

    async def get(self, path: str, limit: int, missing_ok: bool = False) -> bytes | None:
        status, body = await self._request("GET", path, limit)
        if status == 404 and missing_ok:
            return None
        if status != 200:
            text = printable(body.decode(errors="replace"), 200)
            raise RemoteError(f"GET {self.url}/{path}: HTTP {status}: {text}")
        return body

    async def checkpoint(self, path: str = "checkpoint", missing_ok: bool = False) -> str | None:
        """The signed checkpoint note at `path` (not verified here)."""
        body = await self.get(path, MAX_NOTE_BYTES, missing_ok)
        if body is None:
            return None
        try:
            return body.decode()
        except UnicodeDecodeError as exc:
            raise RemoteError(f"{self.url}/{path} is not UTF-8 text") from exc

    async def tile(self, level: int, index: int, width: int = TILE_WIDTH) -> bytes:
        """A hash tile, or an entry bundle with level ENTRIES; TileNotFound when the log
        answers 404."""
        path = tile_path(level, index, width)
        body = await self.get(path, MAX_BUNDLE if level == ENTRIES else MAX_TILE, missing_ok=True)
        if body is None:
            raise TileNotFound(f"{self.url}/{path}: not found")
        return body

    async def entries(self, index: int, width: int = TILE_WIDTH) -> list[bytes]:
        """The leaves of entry bundle `index`; checks there are `width` of them."""
        data = await self.tile(ENTRIES, index, width)
        path = tile_path(ENTRIES, index, width)
        try:
            leaves = parse_entry_bundle(data)
        except ValueError as exc:
            raise TileNotFound(f"{self.url}/{path}: {exc}") from exc
        if len(leaves) != width:
            raise TileNotFound(f"{self.url}/{path} holds {len(leaves)} entries, want {width}")
        return leaves

    async def post(self, path: str, body: str) -> tuple[int, bytes]:
        return await self._request("POST", path, MAX_ANSWER, body.encode())

    def tiles(self, cache_tiles: int = 4096) -> RemoteTiles:
        return RemoteTiles(self, cache_tiles)


class RemoteTiles(TileSource):
    """Node hashes from a remote log's tiles (fetched in parallel), for proofs and roots.
    Raises TileNotFound for a tile the log does not serve."""

    def __init__(self, remote: RemoteLog, cache_tiles: int = 4096) -> None:
        super().__init__(cache_tiles)
        self.remote = remote

    async def _fetch(self, keys: list[str]) -> dict[str, bytes]:
        async def one(key: str) -> tuple[str, bytes]:
            return key, await self.remote.tile(*parse_tile_key(key))

        return dict(await asyncio.gather(*(one(key) for key in keys)))
