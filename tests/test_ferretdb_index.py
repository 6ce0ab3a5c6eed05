"""The suite's FerretDB carries scripts/ferretdb-v1.24.2-id-index.patch: a lookup by _id, or by an
_id `$in`, uses the _id index (its cost does not grow with the collection) for int, string and
ObjectId _ids, also when the filter has other conditions besides, and answers exactly as MongoDB
does for every _id type, numbers of mixed types included.

These check the FerretDB that scripts/install-ferretdb.sh builds; with MONGODB_URI set they are
skipped, since that server is another one."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest
from bson import Int64, ObjectId
from conftest import Databases
from pymongo import MongoClient
from pymongo.collection import Collection

SMALL = 1_000
LARGE = 100_000
LOOKUPS = 15
MAX_RATIO = 3.0  # the bound; a scan costs about 100x more at 10^5 than at 10^3
BATCH = 10_000


@pytest.fixture(scope="module", autouse=True)
def suite_ferretdb() -> None:
    if os.environ.get("MONGODB_URI"):
        pytest.skip(
            "MONGODB_URI is set, so the tests run against that server, which is not the "
            "patched FerretDB these tests check (unset MONGODB_URI to run them)"
        )


def filled(db: Any, name: str, size: int) -> Collection[dict[str, Any]]:
    """A collection of `size` small documents with the int _ids 0 .. size-1."""
    coll: Collection[dict[str, Any]] = db[name]
    for start in range(0, size, BATCH):
        coll.insert_many(
            [{"_id": i, "n": 0} for i in range(start, min(size, start + BATCH))], ordered=False
        )
    return coll


Op = Callable[[Collection[dict[str, Any]], int], object]


def median_ms(op: Op, coll: Collection[dict[str, Any]], keys: list[int]) -> float:
    times = []
    for key in keys:
        start = time.perf_counter()
        op(coll, key)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def test_lookup_by_int_id_at_100k_documents_costs_what_it_costs_at_1k(
    mongo: MongoClient[dict[str, Any]], databases: Databases
) -> None:
    db = mongo[databases.new()]
    small = filled(db, "small", SMALL)
    large = filled(db, "large", LARGE)
    assert large.find_one({"_id": LARGE - 1}) == {"_id": LARGE - 1, "n": 0}

    # Alternate the sizes, several rounds each, so that a change in the machine's load weighs
    # on both the same. The keys are among the last tenth inserted: a scan (which stops at the
    # first match, in insertion order) reads nearly the whole collection to find them.
    step = 7919  # a prime: the keys spread over that tenth
    ops: dict[str, Op] = {
        "find_one": lambda coll, key: coll.find_one({"_id": key}),
        "update_one": lambda coll, key: coll.update_one({"_id": key}, {"$inc": {"n": 1}}),
        # An optimistic update: _id and another condition (pushed down only with _id alone
        # upstream).
        "update_one on _id and version": lambda coll, key: coll.update_one(
            {"_id": key, "n": {"$gte": 0}}, {"$inc": {"n": 1}}
        ),
        # Several documents by _id in one query (the storage dialect's read on FerretDB).
        "find with _id $in": lambda coll, key: list(
            coll.find({"_id": {"$in": [key, key - 1, key - 2, 0]}})
        ),
    }
    for name, op in ops.items():
        med: dict[int, list[float]] = {SMALL: [], LARGE: []}
        for r in range(3):
            for size, coll in ((SMALL, small), (LARGE, large)):
                keys = [size - 1 - (r * LOOKUPS + k) * step % (size // 10) for k in range(LOOKUPS)]
                op(coll, keys[0])  # warm-up
                med[size].append(median_ms(op, coll, keys))
        at_small, at_large = statistics.median(med[SMALL]), statistics.median(med[LARGE])
        assert at_large <= MAX_RATIO * at_small, (
            f"{name} by int _id: median {at_large:.2f} ms at {LARGE} documents, "
            f"{at_small:.2f} ms at {SMALL} ({at_large / at_small:.1f}x, want <= {MAX_RATIO}x): "
            "the _id index is not used; is var/bin/ferretdb built with the patch? "
            "(rm var/bin/ferretdb.stamp rebuilds it)"
        )
    assert large.count_documents({"n": {"$gt": 0}}) > 0


def plan(coll: Collection[dict[str, Any]], filter: dict[str, Any]) -> str:
    """FerretDB's EXPLAIN QUERY PLAN of a find, as one string."""
    explained = coll.find(filter).explain()
    return " | ".join(explained["queryPlanner"]["Plan"])


def test_lookups_by_int_string_and_object_id_use_the_id_index(
    mongo: MongoClient[dict[str, Any]], databases: Databases
) -> None:
    coll = mongo[databases.new()]["docs"]
    oid = ObjectId()
    coll.insert_many([{"_id": 5}, {"_id": "five"}, {"_id": oid}, {"_id": -0.0}, {"_id": 2**60}])
    indexed: tuple[object, ...] = (5, Int64(5), -5, 0, 2**53, "five", oid)
    for value in indexed:
        assert "USING INDEX" in plan(coll, {"_id": value}), (value, plan(coll, {"_id": value}))
    # The _id condition of a filter that says more is pushed down too; the rest still applies.
    assert "USING INDEX" in plan(coll, {"_id": 5, "k": {"$exists": False}})
    assert coll.find_one({"_id": "five", "k": {"$exists": False}}) == {"_id": "five"}
    assert coll.find_one({"_id": "five", "k": 1}) is None
    # An _id $in of values of those types, alone or beside other conditions.
    for filter in (
        {"_id": {"$in": [5, "five", oid, 0]}},
        {"k": 1, "_id": {"$in": [5, "five"]}},
    ):
        assert "USING INDEX" in plan(coll, filter), (filter, plan(coll, filter))
    # An $in holding a value that is not pushed down, or another operator beside it, scans.
    for filter in (
        {"_id": {"$in": [5, 5.0]}},
        {"_id": {"$in": [5, 2**60]}},
        {"_id": {"$in": [5], "$ne": 6}},
        {"_id": {"$nin": [5]}},
    ):
        assert "SCAN" in plan(coll, filter), (filter, plan(coll, filter))
    # Not pushed down (a scan, and still a right answer: see the next test): ints beyond 2^53,
    # whose double may be written with other digits, and doubles.
    scanned: tuple[object, ...] = (2**60, 5.0)
    for value in scanned:
        assert "SCAN" in plan(coll, {"_id": value}), (value, plan(coll, {"_id": value}))


def test_lookups_by_id_answer_as_mongodb_does_for_every_id_type(
    mongo: MongoClient[dict[str, Any]], databases: Databases
) -> None:
    coll = mongo[databases.new()]["docs"]
    oid = ObjectId()
    docs: list[dict[str, Any]] = [
        {"_id": 5, "k": "int"},
        {"_id": 7.0, "k": "double"},
        {"_id": Int64(8), "k": "long"},
        {"_id": -0.0, "k": "negative zero"},
        {"_id": 9.5, "k": "fraction"},
        {"_id": 2**60, "k": "long beyond 2^53"},
        {"_id": 2**53, "k": "2^53"},
        {"_id": "5", "k": "string"},
        {"_id": oid, "k": "object id"},
    ]
    coll.insert_many(docs)

    def found(value: object) -> list[str]:
        return sorted(d["k"] for d in coll.find({"_id": value}))

    # MongoDB compares numbers by value, whatever their BSON type.
    assert found(5) == found(Int64(5)) == found(5.0) == ["int"]
    assert found(7) == found(Int64(7)) == found(7.0) == ["double"]
    assert found(8) == found(Int64(8)) == found(8.0) == ["long"]
    assert found(0) == found(Int64(0)) == found(0.0) == ["negative zero"]
    assert found(9.5) == ["fraction"]
    assert found(9) == found(10) == []
    assert found(2**60) == found(float(2**60)) == ["long beyond 2^53"]
    assert found(2**53) == found(float(2**53)) == ["2^53"]
    # A string is never a number, an ObjectId never its hex string.
    assert found("5") == ["string"]
    assert found("7") == []
    assert found(oid) == ["object id"]
    assert found(str(oid)) == []

    def found_in(values: list[object]) -> list[str]:
        return sorted(d["k"] for d in coll.find({"_id": {"$in": values}}))

    # An $in matches what its values match one by one, duplicates and all.
    assert found_in([5, Int64(8), 7, 0]) == ["double", "int", "long", "negative zero"]
    assert found_in([5, 5, Int64(5)]) == ["int"]
    assert found_in(["5", oid, str(oid), 9]) == ["object id", "string"]
    assert found_in([2**60, 2**53, 9.5]) == ["2^53", "fraction", "long beyond 2^53"]
    assert found_in([]) == []
    assert found_in(list(range(10, 1100))) == []  # more values than are pushed down: a scan
    assert sorted(d["k"] for d in coll.find({"_id": {"$in": [5, 7]}, "k": "int"})) == ["int"]
    assert coll.update_many({"_id": {"$in": [7, 9]}}, {"$set": {"many": 1}}).modified_count == 1
    assert coll.find_one({"_id": 7.0}) == {"_id": 7.0, "k": "double", "many": 1}
    assert coll.update_one({"_id": 7}, {"$unset": {"many": ""}}).modified_count == 1

    assert coll.update_one({"_id": 7}, {"$set": {"seen": True}}).modified_count == 1
    assert coll.find_one({"_id": 7.0}) == {"_id": 7.0, "k": "double", "seen": True}
    assert coll.update_one({"_id": 0}, {"$set": {"seen": True}}).modified_count == 1
    assert coll.update_one({"_id": 6}, {"$set": {"seen": True}}).matched_count == 0
    assert coll.delete_one({"_id": 8}).deleted_count == 1
    assert coll.delete_one({"_id": 5.0}).deleted_count == 1
    assert sorted(d["k"] for d in coll.find({})) == sorted(
        d["k"] for d in docs if d["k"] not in ("long", "int")
    )
