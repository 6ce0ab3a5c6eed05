"""Request limits for the GraphQL gateway: query shape, body size, request rate, safe errors.

Environment variables (all optional; an invalid value stops startup with a ConfigError that
names the variable):

RXLEDGER_MAX_DEPTH (integer >= 1, default 12)
    Deepest nesting of selection sets in one operation, counted through fragments. A field with
    a selection set adds one level, leaf fields and inline fragments add none, so
    `{ ledger { checkpoint { size } } }` has depth 2. Introspection fields (`__schema`,
    `__type`) and what they select are not counted, so GraphiQL's introspection query works in
    development. Error: "query depth 15 exceeds the maximum of 12".
RXLEDGER_MAX_TOKENS (integer >= 1, default 2000)
    Most lexical tokens (names, punctuation, values and comments) the parser reads from one
    document; parsing stops at the limit, before any validation work. Error: "query token
    count exceeds the maximum of 2000 (parsing stopped at the limit)".
RXLEDGER_MAX_ALIASES (integer >= 0, default 30)
    Most aliased fields in one operation, counting a fragment's aliases once per spread, which
    is how often they execute. Stops alias bombs (`a1: ledger { ... } a2: ledger { ... }`).
    Error: "query alias count 31 exceeds the maximum of 30".
RXLEDGER_MAX_PAGE (integer >= 1, default 100)
    Largest page size a connection field accepts (its `first` argument); the resolvers apply it.
RXLEDGER_MAX_COST (integer >= 1, default 50000)
    Largest estimated cost of one operation, computed from the document and its variables
    before anything executes (`query_cost`). Each field costs its weight (1, or what
    FIELD_WEIGHTS says: receipts and bundles for their Ed25519 signature and JSON, proofs,
    history and integrity for their tile reads) plus the cost of its selection times the items
    it yields: the page size (`first`, its default when absent, at most RXLEDGER_MAX_PAGE) for
    a connection, LIST_LENGTHS for an unpaged list, else 1. A fragment counts once per spread,
    every alias counts, introspection fields count nothing. A subscription costs what one of
    its events does. Error: "query cost 1311150 exceeds the maximum of 50000
    (RXLEDGER_MAX_COST)".
RXLEDGER_MAX_BODY_BYTES (integer >= 1, default 65536)
    Largest HTTP request body in bytes. A larger Content-Length, or a streamed (chunked) body
    that grows past the limit, is answered with HTTP 413 and the GraphQL-shaped error code
    REQUEST_TOO_LARGE: "request body of 70000 bytes exceeds the maximum of 65536 bytes".
    The same limit holds for each `subscribe` message on a WebSocket (see below), and
    `rxledger serve` has uvicorn close a connection (code 1009, message too big) that sends a
    message larger than twice the limit, before buffering it.
RXLEDGER_RATE_LIMIT (number >= 0, default 50)
    Sustained requests per second allowed for one subject (the key the app rate-limits by,
    such as the authenticated subject); 0 disables rate limiting. It is the refill rate of a
    token bucket per subject, kept in the memory all workers of one `rxledger serve --workers
    N` share (app.workers), so the limit holds for the server as a whole, not per worker;
    separate servers (hosts, containers) each limit on their own. An operation on a WebSocket
    counts as a request, against the same bucket as the subject's HTTP requests.
RXLEDGER_RATE_BURST (integer >= 1, default 100)
    Requests a subject may make at once before the rate applies: the token bucket's size.

RXLEDGER_SUBSCRIPTION_WINDOW (integer >= 16, default 4096)
    How many of the most recent events the process keeps for its subscribers (shared by all).
    A subscriber that falls further behind than this is disconnected with a reason saying
    where to resume (its afterLeafIndex / Last-Event-ID).

RXLEDGER_MAX_SUBSCRIPTIONS (integer >= 1, default 10)
    Most operations one WebSocket connection may run at once.

WebSocket (graphql-transport-ws, the only subprotocol served) operations are held to what an
HTTP request is. Each `subscribe` message, whatever its operation type, is checked before it
runs, in this order, and a refused one is answered with an `error` message for its id (the
connection stays open):
- its size: over RXLEDGER_MAX_BODY_BYTES is REQUEST_TOO_LARGE, "subscribe message of 70000
  bytes exceeds the maximum of 65536 bytes";
- the token of connection_init: from its `exp` on, UNAUTHENTICATED, "token has expired;
  reconnect with a fresh token" (no leeway: the socket's subscriptions end at `exp` too);
- the rate: over it, RATE_LIMITED, "rate limit exceeded for ROLE:sub: retry in 3.2 s", with
  `extensions.retryAfter` the whole seconds to wait (HTTP's Retry-After).
Query depth, tokens, aliases and cost are checked per operation on both transports alike.

Parsing, validation and the cost are done once per document, not per request: a bounded LRU
(`PreparedDocuments`) keeps each document's tree by its exact text (and the parse options,
the token limit included), its validation errors by the rules in force, and its costs by
operation name and the values of the variables that set a page size (`first`). A client that
sends unique documents only evicts others; a document that fails to parse is never kept, so
its error is found again each time; a kept error is the same error object, message and all.

Query depth, token, alias and cost errors carry `extensions.code` QUERY_TOO_COMPLEX. In production,
introspection is refused and errors carry no "Did you mean ...?" suggestions, so the schema
cannot be explored by guessing. In every mode, errors caused by an unexpected exception are
answered as "Unexpected error."; only GraphQL errors reach the client verbatim: `ClientError`
raised by resolvers and graphql-core's own (syntax, validation, variable coercion). A database
error (the server unreachable, timing out, refusing) is not unexpected: it is answered with
`extensions.code` UNAVAILABLE, `extensions.retryAfterSeconds` 1 and a message naming only the
error's class and code ("the database is unavailable (AutoReconnect): retry in a few seconds").
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLField,
    GraphQLInt,
    GraphQLSchema,
    GraphQLSyntaxError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationContext,
    ValidationRule,
    VariableNode,
    get_named_type,
    get_operation_ast,
    validate,
    value_from_ast,
)
from graphql.execution.values import get_variable_values
from pymongo.errors import PyMongoError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.extensions import (
    DisableIntrospection,
    MaskErrors,
    SchemaExtension,
)
from strawberry.schema.schema import validate_document
from strawberry.types import ExecutionContext

from anchoring.errors import LedgerUnavailable, database_error
from app.policy import MUTATIONS
from app.settings import env_number
from app.workers import BUCKET, ServerState

QUERY_TOO_COMPLEX = "QUERY_TOO_COMPLEX"
REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
UNAVAILABLE = "UNAVAILABLE"
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class LimitSettings:
    max_depth: int = 12
    max_tokens: int = 2000
    max_aliases: int = 30
    max_page: int = 100
    max_cost: int = 50000
    max_body_bytes: int = 65536
    rate_per_second: float = 50
    rate_burst: int = 100
    subscription_window: int = 4096
    max_subscriptions: int = 10

    @property
    def max_ws_message_bytes(self) -> int:
        """The largest WebSocket message the server reads (uvicorn's ws_max_size): room for a
        subscribe message over the body limit to be refused precisely, and no more."""
        return 2 * self.max_body_bytes

    @classmethod
    def from_env(cls) -> LimitSettings:
        """The limits from the RXLEDGER_* variables in the module docstring.
        Raises ConfigError naming the first invalid variable."""

        def integer(name: str, default: int, minimum: int) -> int:
            return int(env_number(name, default, minimum, integer=True))

        return cls(
            max_depth=integer("RXLEDGER_MAX_DEPTH", cls.max_depth, 1),
            max_tokens=integer("RXLEDGER_MAX_TOKENS", cls.max_tokens, 1),
            max_aliases=integer("RXLEDGER_MAX_ALIASES", cls.max_aliases, 0),
            max_page=integer("RXLEDGER_MAX_PAGE", cls.max_page, 1),
            max_cost=integer("RXLEDGER_MAX_COST", cls.max_cost, 1),
            max_body_bytes=integer("RXLEDGER_MAX_BODY_BYTES", cls.max_body_bytes, 1),
            rate_per_second=env_number(
                "RXLEDGER_RATE_LIMIT", cls.rate_per_second, 0, integer=False
            ),
            rate_burst=integer("RXLEDGER_RATE_BURST", cls.rate_burst, 1),
            subscription_window=integer(
                "RXLEDGER_SUBSCRIPTION_WINDOW", cls.subscription_window, 16
            ),
            max_subscriptions=integer("RXLEDGER_MAX_SUBSCRIPTIONS", cls.max_subscriptions, 1),
        )


class ClientError(GraphQLError):
    """An expected error whose message is safe to show; resolvers raise it.
    The client sees the message and `extensions.code`; MaskErrors leaves it alone."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, extensions={"code": code})
        self.code = code


# --- query shape: depth and aliases ------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """What one definition contributes on its own, before following its fragment spreads."""

    depth: int
    aliases: int
    # (fragment name, depth at the spread or None inside introspection, which is not counted)
    spreads: list[tuple[str, int | None]]


def _local_shape(selection_set: SelectionSetNode) -> _Shape:
    depth = aliases = 0
    spreads: list[tuple[str, int | None]] = []
    stack: list[tuple[SelectionSetNode, int | None]] = [(selection_set, 0)]
    while stack:
        selections, level = stack.pop()
        for selection in selections.selections:
            if isinstance(selection, FragmentSpreadNode):
                spreads.append((selection.name.value, level))
            elif isinstance(selection, InlineFragmentNode):  # adds no level
                stack.append((selection.selection_set, level))
            elif isinstance(selection, FieldNode):
                if selection.alias:
                    aliases += 1
                nested = selection.selection_set
                if nested is None:
                    continue
                if level is None or selection.name.value.startswith("__"):
                    stack.append((nested, None))
                else:
                    depth = max(depth, level + 1)
                    stack.append((nested, level + 1))
    return _Shape(depth, aliases, spreads)


def _combine(shape: _Shape, totals: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """Depth and alias count of a definition, given the totals of the fragments it spreads.
    A spread of an unknown fragment, or one closing a cycle, adds nothing: the specified
    rules report those."""
    depth, aliases = shape.depth, shape.aliases
    for name, level in shape.spreads:
        fragment_depth, fragment_aliases = totals.get(name, (0, 0))
        aliases += fragment_aliases
        if level is not None:
            depth = max(depth, level + fragment_depth)
    return depth, aliases


def _spread_order(spreads: dict[str, list[str]]) -> list[str]:
    """The fragments, each after every fragment it spreads (a spread closing a cycle is
    skipped), so that each can be measured once from the totals of those before it (a naive
    walk per spread is exponential in the nesting of fragments). Without recursion, so that
    long fragment chains cannot exhaust the stack."""
    order: list[str] = []
    done: set[str] = set()
    for root in spreads:
        if root in done:
            continue
        path = [(root, iter(spreads[root]))]
        on_path = {root}
        while path:
            name, children = path[-1]
            for child in children:
                if child in spreads and child not in done and child not in on_path:
                    path.append((child, iter(spreads[child])))
                    on_path.add(child)
                    break
            else:
                path.pop()
                on_path.remove(name)
                done.add(name)
                order.append(name)
    return order


def _fragment_totals(shapes: dict[str, _Shape]) -> dict[str, tuple[int, int]]:
    """Every fragment's depth and alias count through its spreads."""
    totals: dict[str, tuple[int, int]] = {}
    for name in _spread_order({n: [s for s, _ in shape.spreads] for n, shape in shapes.items()}):
        totals[name] = _combine(shapes[name], totals)
    return totals


def query_shape_rule(max_depth: int, max_aliases: int) -> type[ValidationRule]:
    """A validation rule refusing operations deeper than max_depth or with more than
    max_aliases aliased fields; the error names the limit, the value and the maximum."""

    class QueryShapeRule(ValidationRule):
        def __init__(self, context: ValidationContext) -> None:
            super().__init__(context)
            definitions = context.document.definitions
            shapes = {
                d.name.value: _local_shape(d.selection_set)
                for d in definitions
                if isinstance(d, FragmentDefinitionNode)
            }
            totals = _fragment_totals(shapes)
            for operation in definitions:
                if not isinstance(operation, OperationDefinitionNode):
                    continue
                depth, aliases = _combine(_local_shape(operation.selection_set), totals)
                if depth > max_depth:
                    self._refuse(
                        f"query depth {depth} exceeds the maximum of {max_depth}", operation
                    )
                if aliases > max_aliases:
                    self._refuse(
                        f"query alias count {aliases} exceeds the maximum of {max_aliases}",
                        operation,
                    )

        def _refuse(self, message: str, operation: OperationDefinitionNode) -> None:
            self.report_error(
                GraphQLError(message, operation, extensions={"code": QUERY_TOO_COMPLEX})
            )

    return QueryShapeRule


class QueryLimits(SchemaExtension):
    """Token limit at parsing, depth and alias limits at validation (strawberry's
    MaxTokensLimiter, QueryDepthLimiter and MaxAliasesLimiter, with clear messages and
    fragment handling that stays linear in the document size)."""

    def __init__(self, max_tokens: int, shape_rule: type[ValidationRule]) -> None:
        self.max_tokens = max_tokens
        self.shape_rule = shape_rule

    def on_operation(self) -> Iterator[None]:
        context = self.execution_context
        context.parse_options["max_tokens"] = self.max_tokens
        context.validation_rules = (*context.validation_rules, self.shape_rule)
        yield

    def on_parse(self) -> Iterator[None]:
        yield
        # graphql-core says "Syntax Error: Document contains more than N tokens. Parsing
        # aborted.", which reads like a mistake in the query rather than a limit.
        for error in self.execution_context.pre_execution_errors or ():
            if isinstance(error, GraphQLSyntaxError) and (
                f"more than {self.max_tokens} tokens" in error.message
            ):
                error.message = (
                    f"query token count exceeds the maximum of {self.max_tokens}"
                    " (parsing stopped at the limit)"
                )
                error.extensions = {"code": QUERY_TOO_COMPLEX}


# --- query cost -----------------------------------------------------------------------------

# What resolving a field once costs, where it is more than the 1 of a field read from memory.
# The unit is about one plain field's work in the executor (some 10 µs of the gateway's CPU);
# the figures are gateway CPU time per field, measured on a page of 100 prescriptions of 5
# events each (docs/frontend.md, "Query cost").
FIELD_WEIGHTS: dict[str, int] = {
    # an Ed25519 signature over a receipt note (once per leaf: later requests for the same
    # leaf get the same receipt from memory)
    "PrescriptionEvent.receipt": 10,
    "PrescriptionChange.receipt": 10,
    # a proof bundle: the JSON of the leaf, its path and the signed checkpoint note
    "InclusionProof.bundle": 5,
    "PrescriptionEvent.bundle": 5,
    # an audit path (tile reads) and a proof or receipt for each event, whatever is selected
    "Prescription.history": 50,
    # the ledger events, every event's audit path and the root rebuilt from each (the same
    # examination history uses: shared when both are selected)
    "Prescription.integrity": 60,
    # a proof object over paths history and integrity already read
    "PrescriptionEvent.proof": 2,
    "Integrity.proof": 2,
    # tile reads of their own
    "PrescriptionChange.proof": 20,
    "Ledger.inclusionProof": 50,
    "Ledger.consistencyProof": 50,
    # database reads
    "Query.prescription": 2,
    "Query.prescriptions": 5,
    "Ledger.size": 2,
    "Ledger.checkpoint": 2,
    "Ledger.checkpoints": 5,
    "Ledger.entry": 5,
    # an append to the ledger and a document update
    **{f"Mutation.{name}": 20 for name in MUTATIONS},
}

# Lists no argument bounds, by the most items they hold: a prescription has at most six
# events (issued, dispensed, handed to a courier, delivered, confirmed, erased).
LIST_LENGTHS: dict[str, int] = {"Prescription.history": 6}

# The argument that makes a field a page of that many items.
PAGE_ARGUMENT = "first"


@dataclass(frozen=True)
class _Cost:
    """What one definition costs on its own, before following its fragment spreads."""

    own: int
    # (fragment name, how many times it executes there: the product of the enclosing pages)
    spreads: list[tuple[str, int]]

    def total(self, fragments: dict[str, int]) -> int:
        """With the totals of the fragments it spreads (an unknown one or one closing a
        cycle adds nothing: the specified rules report those)."""
        return self.own + sum(times * fragments.get(name, 0) for name, times in self.spreads)


def _page_size(
    node: FieldNode, field: GraphQLField, variables: dict[str, Any], max_page: int
) -> int:
    """The page a field with a PAGE_ARGUMENT would return: the argument (literal or variable),
    else its default; at most max_page (the resolver refuses more without doing the work).
    A value that cannot be read counts as max_page."""
    given = [a for a in node.arguments or () if a.name.value == PAGE_ARGUMENT]
    size = (
        value_from_ast(given[0].value, GraphQLInt, variables)
        if given
        else field.args[PAGE_ARGUMENT].default_value
    )
    if not isinstance(size, int):
        return max_page
    return max(0, min(size, max_page))


def _local_cost(
    schema: GraphQLSchema,
    selection_set: SelectionSetNode,
    parent: Any,
    page_size: Callable[[FieldNode, GraphQLField], int],
) -> _Cost:
    """Each field's weight times the items of the fields around it (a field inside a page of
    100 runs 100 times), without recursion."""
    own = 0
    spreads: list[tuple[str, int]] = []
    stack: list[tuple[SelectionSetNode, Any, int]] = [(selection_set, parent, 1)]
    while stack:
        selections, parent, times = stack.pop()
        for selection in selections.selections:
            if isinstance(selection, FragmentSpreadNode):
                spreads.append((selection.name.value, times))
            elif isinstance(selection, InlineFragmentNode):
                condition = selection.type_condition
                on = parent if condition is None else schema.get_type(condition.name.value)
                stack.append((selection.selection_set, on, times))
            elif isinstance(selection, FieldNode):
                name = selection.name.value
                if name.startswith("__"):
                    continue  # __typename is free; introspection is refused in production
                fields = getattr(parent, "fields", {})  # objects and interfaces have fields
                field = fields.get(name)
                if field is None:
                    own += times  # validation reports the unknown field
                    continue
                key = f"{parent.name}.{name}"
                own += times * FIELD_WEIGHTS.get(key, 1)
                if selection.selection_set is not None:
                    items = page_size(selection, field) if PAGE_ARGUMENT in field.args else 1
                    items = LIST_LENGTHS.get(key, items)
                    stack.append(
                        (selection.selection_set, get_named_type(field.type), times * items)
                    )
    return _Cost(own, spreads)


def query_cost(
    schema: GraphQLSchema,
    document: DocumentNode,
    operation_name: str | None = None,
    variables: dict[str, Any] | None = None,
    max_page: int = LimitSettings.max_page,
) -> int:
    """The estimated cost of the operation `operation_name` of a valid `document` with these
    variables (as the client sent them), as the RXLEDGER_MAX_COST paragraph of the module
    docstring defines it. Linear in the size of the document: each fragment is measured once
    and multiplied at its spreads."""
    operation = get_operation_ast(document, operation_name)
    if operation is None:
        return 0
    coerced = get_variable_values(schema, operation.variable_definitions or (), variables or {})
    known = {} if isinstance(coerced, list) else coerced.coerced  # a list: coercion errors
    page_size = partial(_page_size, variables=known, max_page=max_page)
    costs = {
        d.name.value: _local_cost(
            schema, d.selection_set, schema.get_type(d.type_condition.name.value), page_size
        )
        for d in document.definitions
        if isinstance(d, FragmentDefinitionNode)
    }
    totals: dict[str, int] = {}
    for name in _spread_order({n: [s for s, _ in cost.spreads] for n, cost in costs.items()}):
        totals[name] = costs[name].total(totals)
    root = schema.get_root_type(operation.operation)
    return _local_cost(schema, operation.selection_set, root, page_size).total(totals)


# --- prepared documents: parse, validation and cost once per document -----------------------


@dataclass
class DocumentCacheStats:
    """What PreparedDocuments answered from memory (hits) and had to work out (misses)."""

    parse_hits: int = 0
    parse_misses: int = 0
    validation_hits: int = 0
    validation_misses: int = 0
    cost_hits: int = 0
    cost_misses: int = 0
    evictions: int = 0


def _page_variables(document: DocumentNode) -> tuple[str, ...]:
    """The variables a PAGE_ARGUMENT takes its value from anywhere in the document: the only
    variables a cost depends on."""
    names: set[str] = set()
    stack = [d.selection_set for d in document.definitions if hasattr(d, "selection_set")]
    while stack:
        for selection in stack.pop().selections:
            if isinstance(selection, FieldNode):
                for argument in selection.arguments or ():
                    if argument.name.value == PAGE_ARGUMENT and isinstance(
                        argument.value, VariableNode
                    ):
                        names.add(argument.value.name.value)
            nested = getattr(selection, "selection_set", None)
            if nested is not None:
                stack.append(nested)
    return tuple(sorted(names))


# A page variable left out by the client (distinct from an explicit null, and from any value).
_ABSENT = ("absent",)


class _Prepared:
    """One document text: its tree, its validation errors by rule set, its costs."""

    __slots__ = ("costs", "document", "errors", "page_variables", "size")

    def __init__(self, document: DocumentNode, size: int) -> None:
        self.document = document
        self.size = size
        self.errors: dict[tuple[Any, ...], tuple[GraphQLError, ...]] = {}
        self.page_variables = _page_variables(document)
        self.costs: OrderedDict[Hashable, int] = OrderedDict()


class PreparedDocuments:
    """Parsed documents, their validation errors and their costs, kept by the exact text of
    the document, in a bounded LRU: at most `max_documents` documents of at most
    `max_characters` characters together (a parsed tree takes some 110 bytes per character),
    a document longer than `max_document_characters` is not kept, and each keeps at most
    `max_costs` costs (one per operation name and page sizes). Shared by every request to a
    schema; the statistics say what was answered from memory."""

    def __init__(
        self,
        max_documents: int = 512,
        max_characters: int = 256 * 1024,
        max_document_characters: int = 16 * 1024,
        max_costs: int = 32,
    ) -> None:
        self.max_documents = max_documents
        self.max_characters = max_characters
        self.max_document_characters = max_document_characters
        self.max_costs = max_costs
        self.stats = DocumentCacheStats()
        self._documents: OrderedDict[Hashable, _Prepared] = OrderedDict()
        self._characters = 0

    def __len__(self) -> int:
        return len(self._documents)

    @staticmethod
    def key(context: ExecutionContext) -> Hashable | None:
        """What a document is kept by: the schema, the exact text and the parse options
        (None without a text: nothing to key on)."""
        if not context.query:
            return None
        return (context.schema, context.query, tuple(sorted(context.parse_options.items())))

    def parsed(self, key: Hashable) -> _Prepared | None:
        """The document kept under `key` (counted as a parse hit or miss)."""
        prepared = self._documents.get(key)
        if prepared is None:
            self.stats.parse_misses += 1
            return None
        self._documents.move_to_end(key)
        self.stats.parse_hits += 1
        return prepared

    def remember(self, key: Hashable, text: str, document: DocumentNode) -> _Prepared | None:
        """Keep a document that parsed without error; None when it is too long to keep."""
        if len(text) > self.max_document_characters:
            return None
        prepared = _Prepared(document, len(text))
        self._documents[key] = prepared
        self._characters += prepared.size
        while len(self._documents) > self.max_documents or self._characters > self.max_characters:
            _, evicted = self._documents.popitem(last=False)
            self._characters -= evicted.size
            self.stats.evictions += 1
        return prepared

    def find(self, context: ExecutionContext) -> _Prepared | None:
        """The kept entry of the document this operation runs, if it is kept (no statistics)."""
        key = self.key(context)
        prepared = None if key is None else self._documents.get(key)
        if prepared is None or prepared.document is not context.graphql_document:
            return None
        return prepared

    def validation_errors(
        self, prepared: _Prepared, schema: GraphQLSchema, rules: tuple[Any, ...]
    ) -> list[GraphQLError]:
        """The document's validation errors under `rules` (validated once per rule set)."""
        errors = prepared.errors.get(rules)
        if errors is None:
            self.stats.validation_misses += 1
            errors = tuple(validate_document(schema, prepared.document, rules))
            prepared.errors[rules] = errors
        else:
            self.stats.validation_hits += 1
        return list(errors)  # a list of its own: callers may replace or extend it

    def cost(
        self,
        prepared: _Prepared,
        schema: GraphQLSchema,
        operation_name: str | None,
        variables: dict[str, Any] | None,
        max_page: int,
    ) -> int:
        """`query_cost` of a valid kept document, measured once per operation name and
        values of its page variables."""
        key = self._cost_key(prepared, schema, operation_name, variables, max_page)
        cost = None if key is None else prepared.costs.get(key)
        if cost is not None:
            prepared.costs.move_to_end(key)
            self.stats.cost_hits += 1
            return cost
        self.stats.cost_misses += 1
        cost = query_cost(schema, prepared.document, operation_name, variables, max_page)
        if key is not None:
            prepared.costs[key] = cost
            while len(prepared.costs) > self.max_costs:
                prepared.costs.popitem(last=False)
        return cost

    @staticmethod
    def _cost_key(
        prepared: _Prepared,
        schema: GraphQLSchema,
        operation_name: str | None,
        variables: dict[str, Any] | None,
        max_page: int,
    ) -> Hashable | None:
        """What the cost depends on besides the document: the operation, the page limit and,
        when a page size comes from a variable, the variables as query_cost coerces them
        (all of them fail together, and each page variable then counts as max_page). None
        when that is not hashable: the cost is then measured and not kept."""
        if not prepared.page_variables:
            return (operation_name, max_page)
        operation = get_operation_ast(prepared.document, operation_name)
        if operation is None:
            return (operation_name, max_page)
        coerced = get_variable_values(schema, operation.variable_definitions or (), variables or {})
        if isinstance(coerced, list):  # coercion errors
            return (operation_name, max_page, None)
        values = coerced.coerced
        key = (
            operation_name,
            max_page,
            tuple((type(v), v) for v in (values.get(n, _ABSENT) for n in prepared.page_variables)),
        )
        try:
            hash(key)
        except TypeError:
            return None
        return key


class CachedDocuments(SchemaExtension):
    """Parses and validates each document once (PreparedDocuments): a kept document skips
    the parser, and its kept errors skip validation. A document that fails to parse is
    parsed again each time, so its error stays exact; a document seen for the first time is
    parsed by strawberry as usual and kept afterwards."""

    def __init__(self, documents: PreparedDocuments) -> None:
        self.documents = documents
        self.prepared: _Prepared | None = None

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        key = self.documents.key(context)
        prepared = None if key is None else self.documents.parsed(key)
        if prepared is not None:
            context.graphql_document = prepared.document
        yield
        if (
            prepared is None
            and key is not None
            and context.query
            and context.graphql_document is not None
            and not context.pre_execution_errors
        ):
            prepared = self.documents.remember(key, context.query, context.graphql_document)
        self.prepared = prepared

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        prepared = self.prepared
        if (
            prepared is not None
            and prepared.document is context.graphql_document
            and context.pre_execution_errors is None
        ):
            context.pre_execution_errors = self.documents.validation_errors(
                prepared, context.schema._schema, tuple(context.validation_rules)
            )
        yield


class QueryCostLimit(SchemaExtension):
    """Refuses an operation whose `query_cost` exceeds max_cost, after validation (so the
    walk sees a valid document, already within the depth and alias limits) and before
    execution. It is not a validation rule because the cost depends on the variables, and the
    validation results are cached by document alone. The error is a validation error, so every
    transport answers it as it answers the depth and alias limits."""

    def __init__(
        self, max_cost: int, max_page: int, documents: PreparedDocuments | None = None
    ) -> None:
        self.max_cost = max_cost
        self.max_page = max_page
        self.documents = documents

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        document = context.graphql_document
        schema = context.schema._schema
        if context.pre_execution_errors is None and document is not None:
            # No extension before this one validated: validate here, so that the cost is
            # only ever measured on a valid document.
            context.pre_execution_errors = validate(schema, document, context.validation_rules)
        if not context.pre_execution_errors and document is not None:
            prepared = None if self.documents is None else self.documents.find(context)
            if prepared is not None and self.documents is not None:
                cost = self.documents.cost(
                    prepared, schema, context.operation_name, context.variables, self.max_page
                )
            else:
                cost = query_cost(
                    schema, document, context.operation_name, context.variables, self.max_page
                )
            if cost > self.max_cost:
                message = (
                    f"query cost {cost} exceeds the maximum of {self.max_cost} (RXLEDGER_MAX_COST)"
                )
                operation = get_operation_ast(document, context.operation_name)
                context.pre_execution_errors = [
                    GraphQLError(message, operation, extensions={"code": QUERY_TOO_COMPLEX})
                ]
        yield


# graphql-core builds every suggestion with pyutils.did_you_mean: " Did you mean 'a' or 'b'?";
# the suggested names are GraphQL names, which contain no "?".
_SUGGESTION = re.compile(r" Did you mean [^?]*\?")


class HideSuggestions(SchemaExtension):
    """Removes "Did you mean ...?" from every error, so the schema cannot be mapped by
    guessing names. graphql-core 3.3 has a `hide_suggestions` flag for validate() and
    execute(), but strawberry 0.341 passes it to neither, and its own
    `disable_field_suggestions` only covers unknown fields."""

    def on_operation(self) -> Iterator[None]:
        yield
        context = self.execution_context
        errors = [*(context.pre_execution_errors or ()), *(_result_errors(context.result))]
        for error in errors:
            error.message = _SUGGESTION.sub("", error.message)


def _result_errors(result: Any) -> list[GraphQLError]:
    return list(getattr(result, "errors", None) or ())


def is_unexpected_error(error: GraphQLError) -> bool:
    """True for errors caused by an exception not meant for clients: anything but a
    GraphQLError (ClientError included) or graphql-core's own syntax and validation errors,
    which have no original error."""
    original = error.original_error
    return original is not None and not isinstance(original, GraphQLError)


def is_database_error(error: GraphQLError) -> bool:
    """True for errors caused by the database failing (answered as UNAVAILABLE)."""
    return isinstance(error.original_error, PyMongoError | LedgerUnavailable)


class SafeErrors(MaskErrors):
    """MaskErrors, except that a database error gets its typed answer: UNAVAILABLE with a
    retry hint, and a message that names the error's class and code but never its text."""

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        if not is_database_error(error):
            return super().anonymise_error(error)
        assert error.original_error is not None
        return GraphQLError(
            message=f"the database is unavailable ({database_error(error.original_error)}): "
            f"retry in a few seconds",
            nodes=error.nodes,
            source=error.source,
            positions=error.positions,
            path=error.path,
            extensions={"code": UNAVAILABLE, "retryAfterSeconds": RETRY_AFTER_SECONDS},
        )


def graphql_extensions(
    limits: LimitSettings, production: bool, documents: PreparedDocuments | None = None
) -> list[Callable[[], SchemaExtension]]:
    """Schema extension factories for strawberry.Schema(extensions=...): one fresh instance
    per request, as strawberry requires for isolation between concurrent requests. They
    share `documents` (a new PreparedDocuments by default): give each schema its own."""
    documents = PreparedDocuments() if documents is None else documents
    shape_rule = query_shape_rule(limits.max_depth, limits.max_aliases)
    extensions: list[Callable[[], SchemaExtension]] = [
        partial(QueryLimits, limits.max_tokens, shape_rule),
        partial(SafeErrors, should_mask_error=is_unexpected_error),
        # Clients send the same few documents again and again: parse and validate each once
        # (kept by its text, the token limit and the rules in force, these limits included).
        partial(CachedDocuments, documents),
        # After CachedDocuments: it measures only documents that passed validation, and
        # keeps their costs with them.
        partial(QueryCostLimit, limits.max_cost, limits.max_page, documents),
    ]
    if production:
        extensions += [DisableIntrospection, HideSuggestions]
    return extensions


# --- request rate ---------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per key, in process: `burst` requests at once, refilled at
    `rate_per_second`. A rate of 0 allows everything."""

    def __init__(
        self,
        rate_per_second: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if rate_per_second < 0 or (rate_per_second > 0 and burst < 1):
            raise ValueError(
                f"rate {rate_per_second}/s with burst {burst}: want rate >= 0 and burst >= 1"
            )
        self.rate = rate_per_second
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys
        # A bucket left alone this long is full again, so forgetting it changes nothing.
        self.idle_after = burst / rate_per_second if rate_per_second else 0.0
        # key -> (tokens, updated at), least recently used first
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, key: str) -> float | None:
        """None if `key` may proceed (a token is taken), else the seconds until it may retry."""
        if self.rate == 0:
            return None
        now = self.clock()
        self._forget_idle(now)
        tokens, updated = self.buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - updated) * self.rate)
        retry_after = None if tokens >= 1 else (1 - tokens) / self.rate
        self.buckets[key] = (tokens - 1 if retry_after is None else tokens, now)
        return retry_after

    def _forget_idle(self, now: float) -> None:
        buckets = self.buckets
        while buckets:
            _tokens, updated = next(iter(buckets.values()))
            if now - updated < self.idle_after and len(buckets) < self.max_keys:
                return
            # Past max_keys this forgets a bucket that is not yet full: that key gets a fresh
            # burst, a bounded leniency that is better than unbounded memory.
            buckets.popitem(last=False)


class SharedRateLimiter(RateLimiter):
    """RateLimiter's token buckets in the memory the workers of one server share
    (app.workers.ServerState), so that a key's budget is the same however many workers its
    requests reach. A key lives in one group of GROUP_SLOTS buckets, chosen by a hash of it,
    under that group's lock. A bucket idle long enough to be full again is free; when every
    bucket of the group is busy the least recently used one is taken over (its key gets a fresh
    burst: the bounded leniency RateLimiter has past max_keys)."""

    def __init__(
        self,
        state: ServerState,
        rate_per_second: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # time.monotonic() is the host's CLOCK_MONOTONIC: the same clock in every worker.
        super().__init__(rate_per_second, burst, clock)
        self.state = state
        self.group_bytes = state.group_slots * BUCKET.size

    def check(self, key: str) -> float | None:
        if self.rate == 0:
            return None
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        group = int.from_bytes(digest[:8], "little") % self.state.bucket_groups
        start = self.state.buckets_at + group * self.group_bytes
        memory = self.state.memory
        self.state.lock(start, self.group_bytes)
        try:
            now = self.clock()
            at = memory.find(digest, start, start + self.group_bytes)
            if at >= 0 and (at - start) % BUCKET.size == 0:  # the key's bucket
                slot = (at - start) // BUCKET.size
                _, tokens, updated = BUCKET.unpack_from(memory, at)
            else:
                buckets = list(BUCKET.iter_unpack(memory[start : start + self.group_bytes]))
                tokens, updated = float(self.burst), now
                slot = min(
                    range(len(buckets)),
                    # Never used (updated 0) or full again first, then the least recently used.
                    key=lambda i: (now - buckets[i][2] < self.idle_after, buckets[i][2]),
                )
            tokens = min(float(self.burst), tokens + max(0.0, now - updated) * self.rate)
            retry_after = None if tokens >= 1 else (1 - tokens) / self.rate
            left = tokens - 1 if retry_after is None else tokens
            BUCKET.pack_into(memory, start + slot * BUCKET.size, digest, left, now)
        finally:
            self.state.unlock(start, self.group_bytes)
        return retry_after


# --- request body size ----------------------------------------------------------------------


class _BodyTooLarge(Exception):
    pass


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses malformed lengths before we see them
    return None


class BodySizeLimit:
    """ASGI middleware answering 413 to HTTP requests whose body exceeds max_bytes, declared
    by Content-Length or counted while the app reads a streamed body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(f"request body of {declared} bytes", scope, receive, send)
            return

        received = 0
        too_large = response_started = False

        async def receive_limited() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def send_unless_refused(message: Message) -> None:
            nonlocal response_started
            if too_large:
                return  # the 413 below replaces whatever the app answers to the aborted read
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_limited, send_unless_refused)
        except Exception:
            # The app may wrap or replace our exception; after an aborted read any failure
            # is its consequence.
            if not too_large:
                raise
        # A response already under way cannot become a 413; the server closes it unfinished.
        if too_large and not response_started:
            await self._refuse(f"request body of at least {received} bytes", scope, receive, send)

    async def _refuse(self, body: str, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"{body} exceeds the maximum of {self.max_bytes} bytes"
        response = JSONResponse(
            {"errors": [{"message": message, "extensions": {"code": REQUEST_TOO_LARGE}}]},
            status_code=413,
            # The rest of the body is not read: closing spares the server from draining it.
            headers={"connection": "close"},
        )
        await response(scope, receive, send)
