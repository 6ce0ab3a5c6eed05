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
RXLEDGER_MAX_BODY_BYTES (integer >= 1, default 65536)
    Largest HTTP request body in bytes. A larger Content-Length, or a streamed (chunked) body
    that grows past the limit, is answered with HTTP 413 and the GraphQL-shaped error code
    REQUEST_TOO_LARGE: "request body of 70000 bytes exceeds the maximum of 65536 bytes".
    The same limit holds for each `subscribe` message on a WebSocket (see below), and
    `rxledger serve` has uvicorn close a connection (code 1009, message too big) that sends a
    message larger than twice the limit, before buffering it.
RXLEDGER_RATE_LIMIT (number >= 0, default 50)
    Sustained requests per second allowed for one subject (the key the app rate-limits by,
    such as the authenticated subject); 0 disables rate limiting. It is the refill rate of an
    in-process token bucket per subject, so each gateway process limits on its own. An
    operation on a WebSocket counts as a request, against the same bucket as the subject's
    HTTP requests.
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
Query depth, tokens and aliases are checked per operation on both transports alike.

Query depth, token and alias errors carry `extensions.code` QUERY_TOO_COMPLEX. In production,
introspection is refused and errors carry no "Did you mean ...?" suggestions, so the schema
cannot be explored by guessing. In every mode, errors caused by an unexpected exception are
answered as "Unexpected error."; only GraphQL errors reach the client verbatim: `ClientError`
raised by resolvers and graphql-core's own (syntax, validation, variable coercion). A database
error (the server unreachable, timing out, refusing) is not unexpected: it is answered with
`extensions.code` UNAVAILABLE, `extensions.retryAfterSeconds` 1 and a message naming only the
error's class and code ("the database is unavailable (AutoReconnect): retry in a few seconds").
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSyntaxError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationContext,
    ValidationRule,
)
from pymongo.errors import PyMongoError
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.extensions import (
    DisableIntrospection,
    MaskErrors,
    SchemaExtension,
    ValidationCache,
)

from anchoring.errors import LedgerUnavailable, database_error
from app.settings import env_number

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


def _fragment_totals(shapes: dict[str, _Shape]) -> dict[str, tuple[int, int]]:
    """Every fragment's depth and alias count through its spreads, each fragment computed
    once (a naive walk per spread is exponential in the nesting of fragments), without
    recursion so that long fragment chains cannot exhaust the stack."""
    totals: dict[str, tuple[int, int]] = {}
    for root in shapes:
        if root in totals:
            continue
        path = [(root, iter(shapes[root].spreads))]
        on_path = {root}
        while path:
            name, spreads = path[-1]
            for spread, _level in spreads:
                if spread in shapes and spread not in totals and spread not in on_path:
                    path.append((spread, iter(shapes[spread].spreads)))
                    on_path.add(spread)
                    break
            else:
                path.pop()
                on_path.remove(name)
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
    limits: LimitSettings, production: bool
) -> list[Callable[[], SchemaExtension]]:
    """Schema extension factories for strawberry.Schema(extensions=...): one fresh instance
    per request, as strawberry requires for isolation between concurrent requests."""
    shape_rule = query_shape_rule(limits.max_depth, limits.max_aliases)
    extensions: list[Callable[[], SchemaExtension]] = [
        partial(QueryLimits, limits.max_tokens, shape_rule),
        partial(SafeErrors, should_mask_error=is_unexpected_error),
        # Clients send the same few documents again and again: validate each once (a bounded
        # LRU cache keyed by the document and the rules in force, these limits included).
        partial(ValidationCache, maxsize=1024),
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
