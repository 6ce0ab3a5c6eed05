"""The storage dialect: which read shapes each MongoDB-protocol server answers from an index.

MongoDB serves `$in`, ranges and sorts on `_id` (and on any declared index) from its indexes.
FerretDB v1 (SQLite), even with our patch for its `_id` index, serves only an `_id` equality
from an index: `$in`, a range, a sort or a filter on any other field decodes every document of
the collection, a cost that grows with the collection. Every choice that depends on the server
is made here, and nowhere else names FerretDB:

- documents by `_id` (`by_ids`): one `$in` on MongoDB; on FerretDB, concurrent `_id`
  equalities (at most CONCURRENT_LOOKUPS in flight);
- entries from a to b by their integer `_id` (`by_id_range`): one range read in `_id` order on
  MongoDB; on FerretDB, the same concurrent equalities, one per index;
- an update of documents by `_id` (`update_by_ids`): one `update_many` with `$in` on MongoDB;
  on FerretDB, one bulk write of `_id` equalities;
- documents by a field that is not `_id` (`one_of`): one query on every server. MongoDB
  serves it from the field's index; FerretDB decodes the collection once per query whatever
  the filter, so one query for all the values beats one equality per value.

The dialect is detected once per client (one `buildInfo`: FerretDB answers with its
`ferretdbVersion`) at the first read that needs it, and kept for the client's life.

Environment:
  RXLEDGER_STORAGE_DIALECT  `auto` (default: ask the server), `mongodb` or `ferretdb`. Forcing
                            `ferretdb` against MongoDB is correct, only slower; forcing
                            `mongodb` against FerretDB is correct and slow at scale.
"""

from __future__ import annotations

import asyncio
import enum
import os
import weakref
from collections.abc import Iterable
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.collection import AsyncCollection

Doc = dict[str, Any]

ENV_DIALECT = "RXLEDGER_STORAGE_DIALECT"
# `_id` lookups one read sends to FerretDB at once: enough to overlap round trips, few enough
# to leave the connection pool to other requests.
CONCURRENT_LOOKUPS = 32


class Dialect(enum.Enum):
    MONGODB = "mongodb"
    FERRETDB = "ferretdb"


class DialectError(ValueError):
    """RXLEDGER_STORAGE_DIALECT names no dialect."""


_detected: weakref.WeakKeyDictionary[Any, Dialect] = weakref.WeakKeyDictionary()


def forced() -> Dialect | None:
    """The dialect RXLEDGER_STORAGE_DIALECT forces (None for `auto` or unset). Raises
    DialectError for any other value."""
    value = os.environ.get(ENV_DIALECT, "auto").strip().lower()
    if value in ("", "auto"):
        return None
    try:
        return Dialect(value)
    except ValueError:
        raise DialectError(f"{ENV_DIALECT}={value!r}: want auto, mongodb or ferretdb") from None


def dialect_of_build(build_info: Doc) -> Dialect:
    """The dialect a server's `buildInfo` answer reveals."""
    return Dialect.FERRETDB if "ferretdbVersion" in build_info else Dialect.MONGODB


async def detect(collection: AsyncCollection[Doc]) -> Dialect:
    """The dialect of the server holding `collection`: forced by the environment, else asked
    once per client (a database error propagates, and the next read asks again)."""
    chosen = forced()
    if chosen is not None:
        return chosen
    client = collection.database.client
    known = _detected.get(client)
    if known is None:
        known = dialect_of_build(await client.admin.command("buildInfo"))
        _detected[client] = known
    return known


def one_of(field: str, values: list[Any]) -> Doc:
    """A filter for documents whose `field` is one of `values`: an equality for one value,
    else `$in`. For a field that is not `_id`, one such query is the cheapest read on every
    server; for `_id` use `by_ids`, which FerretDB answers from its index."""
    return {field: values[0]} if len(values) == 1 else {field: {"$in": values}}


async def by_ids(
    collection: AsyncCollection[Doc], ids: Iterable[Any], projection: Doc | None = None
) -> dict[Any, Doc]:
    """The documents of `collection` whose `_id` is one of `ids`, by `_id` (absent ones are
    left out). Index-backed on every server. A `projection` must keep `_id`."""
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        return {}
    if len(wanted) == 1 or await detect(collection) is Dialect.FERRETDB:
        return await _equalities(collection, wanted, projection)
    return {d["_id"]: d async for d in collection.find({"_id": {"$in": wanted}}, projection)}


async def by_id_range(
    collection: AsyncCollection[Doc], start: int, end: int, projection: Doc | None = None
) -> list[Doc]:
    """The documents with integer `_id` in [start, end), in `_id` order; absent ones are left
    out (the caller checks for gaps). Index-backed on every server. A `projection` must keep
    `_id`."""
    if end <= start:
        return []
    if await detect(collection) is Dialect.FERRETDB:
        found = await _equalities(collection, list(range(start, end)), projection)
        return [found[i] for i in range(start, end) if i in found]
    cursor = collection.find({"_id": {"$gte": start, "$lt": end}}, projection).sort("_id", 1)
    return [d async for d in cursor]


async def update_by_ids(collection: AsyncCollection[Doc], ids: Iterable[Any], update: Doc) -> None:
    """Apply `update` to the documents of `collection` whose `_id` is one of `ids` (absent ones
    are skipped). Index-backed on every server; not atomic across documents."""
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        return
    if len(wanted) == 1 or await detect(collection) is Dialect.FERRETDB:
        await collection.bulk_write([UpdateOne({"_id": i}, update) for i in wanted], ordered=False)
        return
    await collection.update_many({"_id": {"$in": wanted}}, update)


async def _equalities(
    collection: AsyncCollection[Doc], ids: list[Any], projection: Doc | None
) -> dict[Any, Doc]:
    """One `_id` equality per id, CONCURRENT_LOOKUPS at a time."""
    gate = asyncio.Semaphore(CONCURRENT_LOOKUPS)

    async def lookup(i: Any) -> Doc | None:
        async with gate:
            return await collection.find_one({"_id": i}, projection)

    # Every lookup runs to its end, even once one has failed: cancelling pymongo operations
    # in flight (checking out a connection, mid-reply) while the database fails left the
    # connection pool waiting for connections that never came back, so that every later
    # call of the process hung (tests/test_faults.py). Each lookup is bounded by the
    # client's timeouts; the first error is raised once all have ended.
    found = await asyncio.gather(*(lookup(i) for i in ids), return_exceptions=True)
    for result in found:
        if isinstance(result, BaseException):
            raise result
    return {d["_id"]: d for d in found if isinstance(d, dict)}
