"""The emulated `notablescan`: which reads MongoDB would answer from an index (tests/index_rules.py),
and the listener that checks the product's reads against its declared indexes
(tests/notablescan.py)."""

from __future__ import annotations

import asyncio
import importlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import index_rules
import notablescan
from bson import ObjectId
from index_rules import Keys, Query, judge, queries
from pymongo import AsyncMongoClient

from anchoring.log import TransparencyLog
from anchoring.note import Signer
from anchoring.store import LOG_INDEXES, CollectionNames, Index, LogStore
from app.db import FULL_READS, PRESCRIPTIONS, declared_indexes
from app.main import _prepare as prepare
from app.service import PRESCRIPTION_INDEXES, PrescriptionService


def index(*keys: tuple[str, int], unique: bool = False) -> Index:
    return Index(keys, "_".join(f for f, _ in keys), "a test", unique=unique)


SUBJECT_VERSION = index(("subject", 1), ("version", 1), unique=True)
ISSUED = index(("issuedAt", 1), ("_id", 1))
PHARMACY_ISSUED = index(("pharmacy", 1), ("issuedAt", 1), ("_id", 1))
STATUS_ISSUED = index(("status", 1), ("issuedAt", 1), ("_id", 1))
A_B_C = index(("a", 1), ("b", 1), ("c", 1))
ORDER: Keys = (("issuedAt", 1), ("_id", 1))


def served(
    filter_: dict[str, Any],
    *indexes: Index,
    sort: Keys = (),
    limited: bool = False,
) -> bool:
    return judge(Query("find", "c", filter_, sort, limited), indexes).served


# --- equality prefix ----------------------------------------------------------------------


def test_id_is_always_indexed() -> None:
    assert served({"_id": 7})
    assert served({"_id": {"$in": [1, 2, 3]}})
    assert served({"_id": {"$gte": 3, "$lt": 9}}, sort=(("_id", 1),))


def test_an_equality_on_the_leading_key_is_served() -> None:
    assert served({"subject": "rx-1"}, SUBJECT_VERSION)


def test_an_equality_on_a_later_key_alone_is_not_served() -> None:
    assert not served({"version": 3}, SUBJECT_VERSION)


def test_a_compound_prefix_is_served_in_any_order_of_the_filter() -> None:
    assert served({"b": 1, "a": 2}, A_B_C)
    assert served({"c": 1, "b": 1, "a": 2}, A_B_C)


def test_fields_beyond_the_prefix_are_filtered_on_the_fetched_documents() -> None:
    assert served({"a": 1, "c": 3, "note": "x"}, A_B_C)


def test_an_empty_filter_is_a_collection_scan() -> None:
    verdict = judge(Query("find", "c", {}), [A_B_C])
    assert not verdict.served
    assert verdict.reason == "no index serves {}"


def test_unbounded_operators_do_not_use_an_index() -> None:
    for condition in ({"$ne": 1}, {"$nin": [1, 2]}, {"$regex": "^x"}, {"$not": {"$gt": 1}}):
        assert not served({"a": condition}, A_B_C), condition
    assert not served({"$expr": {"$eq": ["$a", 1]}}, A_B_C)


def test_exists_false_is_the_point_null_and_exists_true_a_range() -> None:
    pending = index(("committed", 1), ("_id", 1))
    assert served({"committed": {"$exists": False}}, pending, sort=(("_id", 1),), limited=True)
    assert served({"committed": {"$exists": True}}, pending)
    assert not served({"committed": {"$exists": True}}, pending, sort=(("_id", 1),))


# --- ranges and sorts: ESR ----------------------------------------------------------------


def test_equality_then_range_on_the_next_key_is_served() -> None:
    assert served({"subject": "rx-1", "version": {"$lt": 4}}, SUBJECT_VERSION)


def test_a_range_on_the_leading_key_is_served() -> None:
    assert served({"a": {"$gt": 1}}, A_B_C)


def test_a_range_on_a_later_key_without_the_prefix_is_not_served() -> None:
    assert not served({"b": {"$gt": 1}}, A_B_C)


def test_equality_then_sort_on_the_next_key_is_served() -> None:
    assert served({"subject": "rx-1"}, SUBJECT_VERSION, sort=(("version", -1),), limited=True)


def test_a_sort_that_skips_a_key_is_not_served() -> None:
    assert not served({"a": 1}, A_B_C, sort=(("c", 1),))
    assert served({"a": 1, "b": 2}, A_B_C, sort=(("c", 1),))


def test_a_sort_on_a_field_the_filter_fixes_costs_nothing() -> None:
    assert served({"a": 1, "b": 2}, A_B_C, sort=(("a", 1), ("b", -1), ("c", 1)))


def test_esr_equality_sort_range_is_served_and_ers_is_not() -> None:
    # E = a, S = b, R = c: the index walks a's b-ordered run, bounding c on each entry.
    assert served({"a": 1, "c": {"$gt": 5}}, A_B_C, sort=(("b", 1),))
    # E = a, R = b, S = c: the range on b breaks c's order; MongoDB would sort in memory.
    assert not served({"a": 1, "b": {"$gt": 5}}, A_B_C, sort=(("c", 1),))


def test_sort_directions_must_all_match_the_index_or_all_be_reversed() -> None:
    assert served({"pharmacy": "p"}, PHARMACY_ISSUED, sort=(("issuedAt", 1), ("_id", 1)))
    assert served({"pharmacy": "p"}, PHARMACY_ISSUED, sort=(("issuedAt", -1), ("_id", -1)))
    assert not served({"pharmacy": "p"}, PHARMACY_ISSUED, sort=(("issuedAt", 1), ("_id", -1)))


def test_a_sort_served_by_an_index_with_a_limit_reads_only_the_first_entries() -> None:
    assert served({}, sort=(("_id", -1),), limited=True)
    assert served({"issuedAt": {"$lt": 9}}, ISSUED, sort=ORDER, limited=True)


def test_walking_an_index_to_test_an_equality_on_each_entry_is_a_disguised_scan() -> None:
    # The first page of one pharmacy's listing, in issue order: the issued index alone would
    # walk every pharmacy's prescriptions to find this one's.
    assert not served({"pharmacy": "p"}, ISSUED, sort=ORDER, limited=True)
    assert not served({"pharmacy": "p", "issuedAt": {"$gt": 5}}, ISSUED, sort=ORDER)
    assert served({"pharmacy": "p"}, ISSUED, PHARMACY_ISSUED, sort=ORDER, limited=True)
    # Without a bound, the index must hold every predicate of the filter.
    assert not served({"note": {"$exists": True}}, sort=(("_id", 1),), limited=True)


def test_a_sort_without_a_limit_or_a_bound_reads_the_whole_index() -> None:
    assert not served({}, sort=(("_id", 1),))


def test_a_filter_served_but_sorted_by_another_field_is_not_served() -> None:
    pharmacy = index(("pharmacy", 1))
    assert served({"pharmacy": "p"}, pharmacy)
    assert not served({"pharmacy": "p"}, pharmacy, sort=(("issuedAt", 1),), limited=True)


# --- $in ----------------------------------------------------------------------------------


def test_in_counts_as_equality_for_the_prefix() -> None:
    assert served({"a": {"$in": [1, 2]}, "b": {"$in": [3, 4]}, "c": {"$gt": 0}}, A_B_C)


def test_a_sort_after_in_merges_one_scan_per_value_up_to_200() -> None:
    assert served({"status": {"$in": ["A", "B"]}}, STATUS_ISSUED, sort=ORDER, limited=True)
    many = {"status": {"$in": [str(n) for n in range(201)]}}
    assert not served(many, STATUS_ISSUED, sort=ORDER, limited=True)
    # 15 x 15 points is past 200 scans as well.
    both = {"a": {"$in": list(range(15))}, "b": {"$in": list(range(15))}}
    assert not served(both, A_B_C, sort=(("c", 1),))
    assert served({**both, "a": {"$in": [1, 2]}}, A_B_C, sort=(("c", 1),))


def test_past_200_points_only_a_sort_starting_at_the_in_field_is_served() -> None:
    many = {"a": {"$in": list(range(300))}}
    assert not served(many, A_B_C, sort=(("b", 1),))
    assert served(many, A_B_C, sort=(("a", 1), ("b", 1)))


def test_a_single_value_in_is_an_equality() -> None:
    assert served({"a": {"$in": [1]}}, A_B_C, sort=(("b", 1),))


# --- $or ----------------------------------------------------------------------------------


def test_or_needs_every_branch_served() -> None:
    b_index = index(("b", 1))
    assert served({"$or": [{"a": 1}, {"b": 2}]}, A_B_C, b_index)
    verdict = judge(Query("find", "c", {"$or": [{"a": 1}, {"z": 2}]}), [A_B_C])
    assert not verdict.served
    assert verdict.reason == "no index serves {z: eq}"


def test_or_branches_carry_the_predicates_beside_them() -> None:
    # {x, $or: [{a}, {b}]} is (x and a) or (x and b): an index on x serves both.
    assert served({"x": 1, "$or": [{"a": 1}, {"b": 2}]}, index(("x", 1)))


def test_the_listing_cursor_is_served_in_issue_order() -> None:
    after = {"$or": [{"issuedAt": {"$gt": 5}}, {"issuedAt": 5, "_id": {"$gt": "rx-9"}}]}
    mine = {"$and": [{"pharmacy": "p"}, after]}
    assert served(mine, PHARMACY_ISSUED, sort=ORDER, limited=True)
    assert served(after, ISSUED, sort=ORDER, limited=True)
    assert not served(mine, ISSUED, sort=ORDER, limited=True)
    statuses = {"$and": [{"status": {"$in": ["A", "B"]}}, after]}
    assert served(statuses, STATUS_ISSUED, sort=ORDER, limited=True)


def test_a_unique_index_fixed_on_all_its_keys_serves_any_remainder() -> None:
    # One document per point: a version guard or another sort costs nothing.
    assert served({"_id": "rx-1", "version": {"$lt": 3}, "status": "ISSUED"})
    assert served({"_id": {"$in": ["a", "b"]}}, sort=(("issuedAt", 1),))
    assert served({"subject": "s", "version": 3, "x": 1}, SUBJECT_VERSION, sort=(("y", 1),))
    assert not served({"subject": "s", "x": 1}, SUBJECT_VERSION, sort=(("y", 1),))


# --- commands -----------------------------------------------------------------------------


def test_each_command_names_its_filter_and_sort() -> None:
    find = queries("find", {"find": "c", "filter": {"a": 1}, "sort": {"b": -1}, "limit": 1})
    assert find == [Query("find", "c", {"a": 1}, (("b", -1),), True)]
    update = queries("update", {"update": "c", "updates": [{"q": {"a": 1}}, {"q": {"b": 2}}]})
    assert [q.filter for q in update] == [{"a": 1}, {"b": 2}]
    delete = queries("delete", {"delete": "c", "deletes": [{"q": {"_id": 1}, "limit": 0}]})
    assert [q.filter for q in delete] == [{"_id": 1}]
    modify = queries("findAndModify", {"findAndModify": "c", "query": {"a": 1}, "sort": {"b": 1}})
    assert modify == [Query("findAndModify", "c", {"a": 1}, (("b", 1),), True)]
    pipeline = [{"$match": {"a": 1}}, {"$sort": {"b": 1}}, {"$limit": 3}, {"$project": {"a": 1}}]
    aggregate = queries("aggregate", {"aggregate": "c", "pipeline": pipeline})
    assert aggregate == [Query("aggregate", "c", {"a": 1}, (("b", 1),), True)]
    assert queries("insert", {"insert": "c", "documents": [{"a": 1}]}) == []
    assert queries("getMore", {"getMore": 1, "collection": "c"}) == []


def test_a_count_without_a_filter_reads_metadata_and_with_one_is_checked() -> None:
    assert judge(queries("count", {"count": "c"})[0], []).served
    assert not judge(queries("count", {"count": "c", "query": {"a": 1}})[0], []).served


def test_the_report_names_fields_and_operators_never_values() -> None:
    query = Query(
        "find",
        "ledger",
        {"subject": "rx-secret", "version": {"$lt": 4}, "$or": [{"a": {"$in": [1, 2]}}]},
        (("version", -1),),
        True,
    )
    text = index_rules.describe(query)
    assert text == (
        "find ledger {subject: $eq, version: {$lt}, $or: [{a: {$in[2]}}]} sort (version: -1) limit"
    )
    assert "secret" not in text


# --- the product's table and the listener -------------------------------------------------


def test_start_up_creates_the_declared_indexes_and_the_listener_reads_the_same_table() -> None:
    table = declared_indexes()
    assert table["prescriptions"] == PRESCRIPTION_INDEXES
    for role, indexes in LOG_INDEXES.items():
        assert table[role] == indexes


def test_each_declared_full_read_names_a_collection_and_a_function_that_exist() -> None:
    collections = {*asdict(CollectionNames()).values(), PRESCRIPTIONS}
    for read in FULL_READS:
        assert read.reason, read
        assert read.collection in collections, read
        path, qualname = read.origin.split(" ")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        target: Any = module
        for part in qualname.split("."):
            target = getattr(target, part)
        assert callable(target), read


async def test_start_up_creates_every_declared_index_as_declared(
    store: LogStore, signer: Signer
) -> None:
    service = PrescriptionService(TransparencyLog(store, signer), store.db[PRESCRIPTIONS])
    await prepare(service)
    for collection, indexes in declared_indexes().items():
        info = await store.db[collection].index_information()
        for index in indexes:
            assert index.name in info, f"{collection}: no index {index.name}"
            created = info[index.name]
            assert [tuple(k) for k in created["key"]] == list(index.keys), index.name
            assert bool(created.get("unique")) == index.unique, index.name


async def test_the_listener_records_a_product_read_no_index_serves_and_ignores_the_tests(
    mongo_uri: str, tmp_path: Path, signer: Signer
) -> None:
    listener = notablescan.NotablescanListener(tmp_path, indexes={"entries": []}, full_reads=())
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_uri, event_listeners=[listener], tz_aware=True
    )
    try:
        store = LogStore(client["t_notablescan"], origin="test.rxledger.example/log")
        # The test's own read of entries by event: tampering and inspecting are not checked.
        await store.entries.find_one({"event": ObjectId()})
        assert notablescan.collected(tmp_path) == []
        # The product's read of the same shape: `entries` declares no index here.
        await TransparencyLog(store, signer).leaf_indices([ObjectId()])
    finally:
        await client.drop_database("t_notablescan")
        await client.close()
    found = notablescan.collected(tmp_path)
    assert len(found) == 1, found
    assert found[0].shape == "find entries {event: $eq}"
    assert found[0].reason == "no index serves {event: eq}"
    # leaf_indices reads positions by `_id`, then `entries` by event for a log that may hold
    # entries without positions (this one's head names no positionsFrom).
    assert found[0].origin.startswith("anchoring/store.py:")
    assert found[0].origin.endswith(" LogStore.entry_indices")


async def test_a_read_with_no_caller_on_its_stack_is_checked_as_the_products(
    mongo_uri: str, tmp_path: Path
) -> None:
    # A coroutine handed to asyncio.gather runs as a task of its own: its stack holds no
    # caller. Only the product gathers reads, so such a read is checked.
    listener = notablescan.NotablescanListener(tmp_path, indexes={"entries": []}, full_reads=())
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_uri, event_listeners=[listener], tz_aware=True
    )
    try:
        entries = client["t_notablescan_task"]["entries"]
        await asyncio.gather(entries.find_one({"event": ObjectId()}))
    finally:
        await client.close()
    found = notablescan.collected(tmp_path)
    assert [(v.shape, v.origin) for v in found] == [
        ("find entries {event: $eq} limit", notablescan.UNKNOWN)
    ]
