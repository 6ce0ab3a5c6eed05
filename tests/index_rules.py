"""Would MongoDB answer this command from an index? A pure model of its query planner's rules,
for the test run's emulation of `notablescan` (tests/notablescan.py).

A command's filter is split into its alternatives (a top-level `$or`, also inside `$and`, each
joined with the predicates beside it); every alternative must be served by one index, as
MongoDB plans each `$or` branch on its own. Each predicate on a field is classified:

- equality: a value, `$eq`, `$in` (a set of points), `$exists: false` (the point null);
- range: `$gt`, `$gte`, `$lt`, `$lte`, `$exists: true`;
- unbounded: anything else (`$ne`, `$nin`, `$regex`, `$not`, `$elemMatch`, `$expr`, ...).

An index with keys k0, k1, ... serves a filter and a sort (ESR: equality, sort, range) when:

1. prefix: the equality fields that are keys k0, k1, ... in a run from k0 are its prefix;
2. bound: the prefix is not empty, or the key after it has a range. Without a prefix, the
   filter has no equality elsewhere (walking a range or the whole index testing each entry for
   an equality is a scan in disguise: an index should lead with that field);
3. sort: the sort, without the fields a single-value equality fixes, runs along the keys after
   the prefix (all directions as declared, or all reversed). After a multi-value `$in` MongoDB
   merges one sorted scan per point ("explode for sort", at most 200 points), else the index
   yields the `$in` field's order and only a sort starting at that field is served;
4. a sort served and a limit stand in for the bound (the first entries in index order: the
   newest checkpoint), when the index holds every predicate of the filter.

A unique index fixed on all its keys by equalities holds one document per point: it serves
whatever else the filter and sort ask. Other predicates the index does not hold are evaluated
on the documents it bounds (MongoDB's FETCH filter). `_id` is always indexed (unique). An
empty filter without a served sort and a limit reads the whole collection; a `count` without a
filter reads the collection's metadata and is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

EQ, IN, RANGE, UNBOUNDED = "eq", "in", "range", "unbounded"

RANGE_OPS = {"$gt", "$gte", "$lt", "$lte"}

Keys = tuple[tuple[str, int], ...]
ID_INDEX: Keys = (("_id", 1),)


@dataclass(frozen=True)
class Query:
    """What one command asks of one collection: its filter, sort and whether it is limited."""

    command: str
    collection: str
    filter: Mapping[str, Any]
    sort: tuple[tuple[str, int], ...] = ()
    limited: bool = False
    # A count without a filter reads metadata (MongoDB's fast count), never documents.
    metadata_only: bool = False


@dataclass(frozen=True)
class Verdict:
    served: bool
    reason: str  # why not, or which index serves each alternative
    alternatives: list[str] = field(default_factory=list)


# --- the command's shape ------------------------------------------------------------------


def queries(command_name: str, command: Mapping[str, Any]) -> list[Query]:
    """The reads a command makes, one per filter it carries; [] for commands that read no
    documents by filter (insert, getMore, createIndexes, ...)."""
    name = command_name
    coll = command.get(name)
    if not isinstance(coll, str):
        return []
    if name == "find":
        return [
            Query(
                name,
                coll,
                command.get("filter") or {},
                _sort(command.get("sort")),
                bool(command.get("limit")) or bool(command.get("singleBatch")),
            )
        ]
    if name == "findAndModify":
        return [Query(name, coll, command.get("query") or {}, _sort(command.get("sort")), True)]
    if name == "update":
        return [Query(name, coll, u.get("q") or {}) for u in command.get("updates", [])]
    if name == "delete":
        return [Query(name, coll, d.get("q") or {}) for d in command.get("deletes", [])]
    if name == "count":
        found = command.get("query") or {}
        return [Query(name, coll, found, metadata_only=not found)]
    if name == "distinct":
        return [Query(name, coll, command.get("query") or {})]
    if name == "aggregate":
        return [_aggregate(coll, command.get("pipeline") or [])]
    return []


def _sort(spec: Any) -> tuple[tuple[str, int], ...]:
    if not spec:
        return ()
    return tuple((str(k), -1 if v == -1 else 1) for k, v in dict(spec).items())


def _aggregate(coll: str, pipeline: Sequence[Mapping[str, Any]]) -> Query:
    """The index-relevant head of a pipeline: a leading `$match`, then `$sort` and `$limit`."""
    stages = list(pipeline)
    found: Mapping[str, Any] = {}
    sort: tuple[tuple[str, int], ...] = ()
    limited = False
    if stages and "$match" in stages[0]:
        found = stages.pop(0)["$match"]
    if stages and "$sort" in stages[0]:
        sort = _sort(stages.pop(0)["$sort"])
    if stages and "$limit" in stages[0]:
        limited = True
    return Query("aggregate", coll, found, sort, limited)


# --- the filter's alternatives ------------------------------------------------------------


@dataclass(frozen=True)
class Predicate:
    kind: str  # EQ, IN, RANGE or UNBOUNDED
    points: int = 1  # the values of an IN


Conjunction = dict[str, Predicate]


def alternatives(filter_: Mapping[str, Any]) -> list[Conjunction]:
    """The filter as alternatives (disjunctive normal form over `$or`), each a conjunction of
    one predicate per field."""
    result: list[Conjunction] = [{}]
    for key, value in filter_.items():
        if key == "$and":
            for part in value:
                result = _join(result, alternatives(part))
        elif key == "$or":
            branches = [b for part in value for b in alternatives(part)]
            result = _join(result, branches)
        elif key.startswith("$"):
            result = _join(result, [{key: Predicate(UNBOUNDED)}])
        else:
            result = _join(result, [{key: _predicate(value)}])
    return result


def _join(left: list[Conjunction], right: list[Conjunction]) -> list[Conjunction]:
    return [_merge(a, b) for a in left for b in right]


def _merge(a: Conjunction, b: Conjunction) -> Conjunction:
    out = dict(a)
    for f, p in b.items():
        out[f] = _stronger(out[f], p) if f in out else p
    return out


STRENGTH = {EQ: 3, IN: 2, RANGE: 1, UNBOUNDED: 0}


def _stronger(a: Predicate, b: Predicate) -> Predicate:
    return a if STRENGTH[a.kind] >= STRENGTH[b.kind] else b


def _predicate(value: Any) -> Predicate:
    """The predicate a field's condition is."""
    if not _is_operator_doc(value):
        return Predicate(EQ)  # a value, or an embedded document compared whole
    return max((_operator(op, arg) for op, arg in value.items()), key=lambda p: STRENGTH[p.kind])


def _operator(op: str, arg: Any) -> Predicate:
    if op == "$eq":
        return Predicate(EQ)
    if op == "$in":
        n = len(arg) if isinstance(arg, list) else 2
        return Predicate(EQ) if n == 1 else Predicate(IN, n)
    if op in RANGE_OPS:
        return Predicate(RANGE)
    if op == "$exists":
        return Predicate(RANGE) if arg else Predicate(EQ)
    return Predicate(UNBOUNDED)


def _is_operator_doc(value: Any) -> bool:
    return isinstance(value, Mapping) and any(str(k).startswith("$") for k in value)


# --- serving ------------------------------------------------------------------------------

MAX_SCANS_TO_EXPLODE = 200  # MongoDB's internalQueryMaxScansToExplode


class Declared(Protocol):
    """An index as the product declares it (anchoring.store.Index)."""

    @property
    def keys(self) -> Keys: ...

    @property
    def unique(self) -> bool: ...


@dataclass(frozen=True)
class IdIndex:
    keys: Keys = ID_INDEX
    unique: bool = True


def serves(
    index: Declared, where: Conjunction, sort: Sequence[tuple[str, int]], limited: bool
) -> bool:
    """Whether `index` serves one conjunction with this sort (the module docstring's rules)."""
    keys = index.keys
    equal = {f for f, p in where.items() if p.kind in (EQ, IN)}
    fixed = {f for f, p in where.items() if p.kind == EQ}
    prefix = 0
    while prefix < len(keys) and keys[prefix][0] in equal:
        prefix += 1
    if index.unique and prefix == len(keys):
        return True
    wanted = [(f, d) for f, d in sort if f not in fixed]
    if not _sort_served(keys, prefix, fixed, where, wanted):
        return False
    if prefix > 0:
        return True
    if equal:
        return False
    nxt = keys[0][0]
    if where.get(nxt, Predicate(UNBOUNDED)).kind == RANGE:
        return True
    held = {f for f, _ in keys}
    return bool(wanted) and limited and set(where) <= held


def _sort_served(
    keys: Keys,
    prefix: int,
    fixed: set[str],
    where: Conjunction,
    wanted: Sequence[tuple[str, int]],
) -> bool:
    if not wanted:
        return True
    if _runs_along(wanted, keys[prefix:]):
        scans = 1
        for f, _ in keys[:prefix]:
            scans *= where[f].points
        return scans <= MAX_SCANS_TO_EXPLODE
    # The index's own order from its first multi-value $in (its constants left out).
    start = next((i for i in range(prefix) if keys[i][0] not in fixed), prefix)
    order = [
        (f, d) for i, (f, d) in enumerate(keys) if i >= start and not (i < prefix and f in fixed)
    ]
    return _runs_along(wanted, order)


def _runs_along(wanted: Sequence[tuple[str, int]], order: Sequence[tuple[str, int]]) -> bool:
    """Whether the sort is the head of this key order, all directions equal or all reversed."""
    if len(wanted) > len(order):
        return False
    head = order[: len(wanted)]
    if [f for f, _ in wanted] != [f for f, _ in head]:
        return False
    same = all(d == e for (_, d), (_, e) in zip(wanted, head, strict=True))
    reversed_ = all(d == -e for (_, d), (_, e) in zip(wanted, head, strict=True))
    return same or reversed_


def judge(query: Query, indexes: Iterable[Declared]) -> Verdict:
    """Whether every alternative of the query is served by one of `indexes` (`_id` added)."""
    if query.metadata_only:
        return Verdict(True, "count of the whole collection: metadata")
    candidates: list[Declared] = [IdIndex(), *indexes]
    served: list[str] = []
    for where in alternatives(query.filter):
        found = next((i for i in candidates if serves(i, where, query.sort, query.limited)), None)
        if found is None:
            return Verdict(False, f"no index serves {describe_conjunction(where)}", served)
        served.append(f"{describe_conjunction(where)} by {describe_keys(found.keys)}")
    return Verdict(True, "; ".join(served), served)


# --- descriptions -------------------------------------------------------------------------


def describe_keys(keys: Keys) -> str:
    return "(" + ", ".join(f"{f}: {d}" for f, d in keys) + ")"


def describe_conjunction(where: Conjunction) -> str:
    return "{" + ", ".join(f"{f}: {p.kind}" for f, p in where.items()) + "}"


def describe(query: Query) -> str:
    """`find ledger {subject: $eq, version: {$lt}} sort (version: -1) limit`: fields and
    operators, never values."""
    text = f"{query.command} {query.collection} {_describe_filter(query.filter)}"
    if query.sort:
        text += f" sort {describe_keys(query.sort)}"
    if query.limited:
        text += " limit"
    return text


def _describe_filter(value: Any) -> str:
    if isinstance(value, Mapping):
        parts = []
        for k, v in value.items():
            if k in ("$and", "$or", "$nor"):
                parts.append(f"{k}: [" + ", ".join(_describe_filter(x) for x in v) + "]")
            elif _is_operator_doc(v):
                ops = ", ".join(_describe_operator(op, arg) for op, arg in v.items())
                parts.append(f"{k}: {{{ops}}}")
            elif str(k).startswith("$"):
                parts.append(f"{k}: …")
            else:
                parts.append(f"{k}: $eq")
        return "{" + ", ".join(parts) + "}"
    return "…"


def _describe_operator(op: str, arg: Any) -> str:
    if op in ("$not", "$elemMatch"):
        return f"{op}: {_describe_filter(arg)}"
    if op == "$exists":
        return f"{op}: {'true' if arg else 'false'}"
    if op in ("$in", "$nin") and isinstance(arg, list):
        return f"{op}[{len(arg)}]"
    return op
