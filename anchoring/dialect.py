"""The storage dialect: which read shapes each MongoDB-protocol server answers from an index.

MongoDB serves `$in`, ranges and sorts on `_id` (and on any declared index) from its indexes.
FerretDB v1 (SQLite), with our patch (scripts/ferretdb-v1.24.2-id-index.patch), serves from its
`_id` index only an `_id` equality and an `_id` `$in` of at most 1,000 strings, ObjectIds or
ints: a range, a sort or a filter on any other field decodes every document of the collection,
a cost that grows with the collection. Every choice that depends on the server is made here,
and nowhere else names FerretDB:

- documents by `_id` (`by_ids`): one `$in` per MONGODB_IN_BATCH ids on MongoDB, per IN_BATCH
  ids on FerretDB;
- entries from a to b by their integer `_id` (`by_id_range`): one range read in `_id` order on
  MongoDB; on FerretDB, `by_ids` of the indices a..b-1;
- an update or a deletion of documents by `_id` (`update_by_ids`, `delete_by_ids`): one
  `update_many` or `delete_many` with `$in` on MongoDB; on FerretDB, one per IN_BATCH ids;
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

import enum
import os
import weakref
from collections.abc import Iterable
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

Doc = dict[str, Any]

ENV_DIALECT = "RXLEDGER_STORAGE_DIALECT"
# `_id`s in one `$in` sent to FerretDB: the patch pushes down an `$in` of at most 1,000 values;
# more would scan the collection.
IN_BATCH = 500
# ... and to MongoDB: far below what its 16 MiB command limit holds of the longest ids we use.
MONGODB_IN_BATCH = 20_000


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
    if len(wanted) == 1:
        doc = await collection.find_one({"_id": wanted[0]}, projection)
        return {} if doc is None else {doc["_id"]: doc}
    found: dict[Any, Doc] = {}
    for part in await _batches(collection, wanted):
        cursor = collection.find({"_id": {"$in": part}}, projection, batch_size=len(part))
        async for d in cursor:
            found[d["_id"]] = d
    return found


async def by_id_range(
    collection: AsyncCollection[Doc], start: int, end: int, projection: Doc | None = None
) -> list[Doc]:
    """The documents with integer `_id` in [start, end), in `_id` order; absent ones are left
    out (the caller checks for gaps). Index-backed on every server. A `projection` must keep
    `_id`."""
    if end <= start:
        return []
    if await detect(collection) is Dialect.FERRETDB:
        found = await by_ids(collection, range(start, end), projection)
        return [found[i] for i in range(start, end) if i in found]
    cursor = collection.find({"_id": {"$gte": start, "$lt": end}}, projection).sort("_id", 1)
    return [d async for d in cursor]


async def update_by_ids(collection: AsyncCollection[Doc], ids: Iterable[Any], update: Doc) -> None:
    """Apply `update` to the documents of `collection` whose `_id` is one of `ids` (absent ones
    are skipped). Index-backed on every server; not atomic across documents."""
    wanted = list(dict.fromkeys(ids))
    if len(wanted) == 1:
        await collection.update_one({"_id": wanted[0]}, update)
        return
    for part in await _batches(collection, wanted):
        await collection.update_many({"_id": {"$in": part}}, update)


async def delete_by_ids(collection: AsyncCollection[Doc], ids: Iterable[Any]) -> None:
    """Delete the documents of `collection` whose `_id` is one of `ids` (absent ones are
    skipped). Index-backed on every server; not atomic across documents."""
    for part in await _batches(collection, list(dict.fromkeys(ids))):
        await collection.delete_many({"_id": {"$in": part}})


async def _batches(collection: AsyncCollection[Doc], ids: list[Any]) -> list[list[Any]]:
    """`ids` cut into the `$in`s the server answers from its `_id` index: MONGODB_IN_BATCH at
    a time on MongoDB, IN_BATCH on FerretDB (sent one after another, so that a failing
    database never leaves operations in flight behind a raised error)."""
    if not ids:
        return []
    size = IN_BATCH if await detect(collection) is Dialect.FERRETDB else MONGODB_IN_BATCH
    return [ids[i : i + size] for i in range(0, len(ids), size)]
