"""The log over HTTP as C2SP tlog-tiles, for auditors, monitors and witnesses (no token needed:
the log holds no personal data).

    GET  /log/checkpoint              the published checkpoint, with its witnesses' cosignatures
    GET  /log/tile/<L>/<N>[.p/<W>]    Merkle tree tiles (immutable)
    GET  /log/tile/entries/<N>[.p/<W>] entry bundles: the leaf bytes (immutable)
    GET  /log/next-checkpoint         the newest signed checkpoint, published or not (witnesses)
    POST /log/cosignature             a witness returns a checkpoint with its cosignature
"""

from __future__ import annotations

import contextlib
import gzip
import logging
from collections import OrderedDict

from pymongo.errors import PyMongoError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from anchoring.anchorer import SignedCheckpoint
from anchoring.errors import CosignatureRejected
from anchoring.log import COSIGNED_POLL, TransparencyLog
from anchoring.tiles import (
    ENTRIES,
    TileCorrupt,
    TileNotFound,
    entry_bundle,
    parse_tile_path,
    tile_exists,
    tile_path,
)
from anchoring.treemath import tile_width

log = logging.getLogger("rxledger.logserver")

IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}
# The checkpoint changes: caches may keep it a moment, never long.
MUTABLE = {"Cache-Control": "public, max-age=2"}
# How long a cosignature that completes its checkpoint's quorum waits, on a worker that does
# not sequence, for the worker that does to publish the checkpoint.
QUORUM_PUBLISH_WAIT = 4 * COSIGNED_POLL + 1.0
NOT_YET = {"Cache-Control": "no-store"}
MAX_COSIGNATURE_BODY = 64 * 1024
OCTETS = "application/octet-stream"


def _not_found(message: str) -> Response:
    return PlainTextResponse(message + "\n", status_code=404, headers=NOT_YET)


def _unavailable(exc: Exception) -> Response:
    return PlainTextResponse(
        f"the log's database is unavailable ({type(exc).__name__}); retry shortly\n",
        status_code=503,
        headers={"Retry-After": "1", **NOT_YET},
    )


def _note(cp: SignedCheckpoint | None, missing: str) -> Response:
    if cp is None:
        return _not_found(missing)
    return PlainTextResponse(cp.witnessed_note, headers=MUTABLE)


class LogServer:
    def __init__(self, bundles_cached: int = 64) -> None:
        # Entry bundles are immutable: the leaves read for each, and the gzipped bodies sent.
        self._cached = bundles_cached
        self._leaves: OrderedDict[int, list[bytes]] = OrderedDict()
        self._gzipped: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def routes(self) -> list[Route]:
        return [
            Route("/log/checkpoint", self.checkpoint),
            Route("/log/next-checkpoint", self.next_checkpoint),
            Route("/log/tile/{path:path}", self.tile),
            Route("/log/cosignature", self.cosignature, methods=["POST"]),
        ]

    async def checkpoint(self, request: Request) -> Response:
        tlog: TransparencyLog = request.app.state.log
        try:
            return _note(
                await tlog.current_checkpoint(),
                "no checkpoint published yet (when witnesses are required, a checkpoint is "
                "published once enough of them have cosigned it; see /readyz)",
            )
        except PyMongoError as exc:
            return _unavailable(exc)

    async def next_checkpoint(self, request: Request) -> Response:
        tlog: TransparencyLog = request.app.state.log
        try:
            return _note(await tlog.newest_checkpoint(max_age=0.5), "no checkpoint signed yet")
        except PyMongoError as exc:
            return _unavailable(exc)

    async def tile(self, request: Request) -> Response:
        tlog: TransparencyLog = request.app.state.log
        path = "tile/" + request.path_params["path"]
        try:
            level, index, width = parse_tile_path(path)
        except ValueError as exc:
            return _not_found(str(exc))
        try:
            # What this process saw published; read the head only for a tile beyond it.
            size = tlog.tail.position or 0
            if not tile_exists(level, index, width, size):
                size = await tlog.published_size()
            if level == ENTRIES:
                return await self._bundle(request, tlog, index, width, size)
            data = await tlog.reader.tile(level, index, width, size)
        except TileNotFound as exc:
            return _not_found(str(exc))
        except TileCorrupt as exc:
            log.error("tile %s: %s", path, exc)
            return PlainTextResponse(f"{path}: {exc}\n", status_code=500, headers=NOT_YET)
        except PyMongoError as exc:
            return _unavailable(exc)
        return Response(data, media_type=OCTETS, headers=IMMUTABLE)

    async def _bundle(
        self, request: Request, tlog: TransparencyLog, index: int, width: int, size: int
    ) -> Response:
        if not tile_exists(ENTRIES, index, width, size):
            raise TileNotFound(f"the tree of size {size} has no {tile_path(ENTRIES, index, width)}")
        headers = {**IMMUTABLE, "Vary": "Accept-Encoding"}
        # Compressed once: most clients (httpx, Go, browsers) ask for gzip.
        use_gzip = accepts_gzip(request.headers.get("accept-encoding", ""))
        key = (index, width)
        gzipped = self._gzipped.get(key) if use_gzip else None
        if gzipped is None:
            data = await self._bundle_bytes(tlog, index, width, size)
            if not use_gzip:
                return Response(data, media_type=OCTETS, headers=headers)
            gzipped = self._gzipped[key] = gzip.compress(data, 6, mtime=0)
            if len(self._gzipped) > self._cached:
                self._gzipped.popitem(last=False)
        self._gzipped.move_to_end(key)
        return Response(gzipped, media_type=OCTETS, headers={**headers, "Content-Encoding": "gzip"})

    async def _bundle_bytes(
        self, tlog: TransparencyLog, index: int, width: int, size: int
    ) -> bytes:
        leaves = self._leaves.get(index)
        if leaves is None or len(leaves) < width:
            # All the leaves the tree has there: any narrower bundle is a prefix of them.
            leaves = await tlog.entry_leaves(index, tile_width(0, index, size), size)
            self._leaves[index] = leaves
            if len(self._leaves) > self._cached:
                self._leaves.popitem(last=False)
        self._leaves.move_to_end(index)
        try:
            return entry_bundle(leaves[:width])
        except ValueError as exc:  # a leaf too long for a bundle's uint16 length
            raise TileCorrupt(str(exc)) from exc

    async def cosignature(self, request: Request) -> Response:
        tlog: TransparencyLog = request.app.state.log
        body = await request.body()
        if len(body) > MAX_COSIGNATURE_BODY:
            return _rejected(413, "BODY_TOO_LARGE", "a cosigned checkpoint is at most 64 KiB")
        try:
            note = body.decode()
        except UnicodeDecodeError:
            return _rejected(400, "MALFORMED", "the body must be a UTF-8 signed note")
        try:
            cp = await tlog.add_cosignatures(note)
            published = await tlog.published_checkpoint_size()
            if (published is None or published < cp.size) and tlog.has_quorum(cp):
                # Taken by a worker that does not sequence: the one that does publishes it
                # at its next look (every COSIGNED_POLL seconds); answer once it has.
                with contextlib.suppress(TimeoutError):
                    published = (await tlog.wait_anchored(cp.size, QUORUM_PUBLISH_WAIT)).size
        except CosignatureRejected as exc:
            return _rejected(422, "COSIGNATURE_REJECTED", str(exc))
        except PyMongoError as exc:
            return _unavailable(exc)
        return JSONResponse(
            {
                "size": cp.size,
                "cosignedBy": [c.name for c in cp.cosignatures],
                "published": published is not None and published >= cp.size,
            }
        )


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header (RFC 9110 §12.5.3) allows gzip: named (or x-gzip)
    with a q above 0, or else covered by a "*" with a q above 0. Codings are case-insensitive."""
    named: float | None = None
    wildcard: float | None = None
    for item in accept_encoding.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        coding = coding.lower()
        if coding in ("gzip", "x-gzip"):
            named = q
        elif coding == "*":
            wildcard = q
    chosen = named if named is not None else wildcard
    return chosen is not None and chosen > 0


def _rejected(status: int, code: str, message: str) -> Response:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)
