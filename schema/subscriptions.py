"""Subscriptions (graphql-transport-ws): prescription events in leaf order, and checkpoints.

Every subscriber reads from the process's one shared feed (app/feed.py). A subscription is
resumable: `afterLeafIndex` is the last leaf index the client saw, and the stream continues with
exactly the events after it, including those written while the client was away.

Fan-out. Over graphql-transport-ws, `prescriptionEvents` subscribers are grouped by what their
payloads depend on: the document (and operation name), the variables its selection reads (not
those only its arguments read: which events, and from where, stay each subscriber's own) and
the viewer's visibility class (`app.feed.visibility_class`). A group runs ONE strawberry
operation, with its first member's context, that executes each event the group's members reach
once and serializes the result once (`SubscriptionGroup`); each member sends that payload in a
`next` message with its own id. Everything else stays per subscriber, in the transport's task
for the operation (`Member.deliver`): the checks when it subscribes (token, filter, limits),
its position in the feed (ordering, resume, back-pressure: a slow member waits on its own
socket only, and is cut off as before), its token's expiry and the error that ends it. An idle
member holds a feed position and a task, not an operation of strawberry's.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import strawberry
from graphql import (
    DocumentNode,
    FieldNode,
    GraphQLError,
    Node,
    VariableNode,
    located_error,
)
from graphql import ExecutionResult as GraphQLExecutionResult
from graphql.execution import Executor, execute_subscription_event
from graphql.language import Visitor, visit
from strawberry.types import Info

from anchoring.encoding import b64
from anchoring.receipt import Receipt as SignedReceipt
from app import prescriptions as rx
from app.auth import Viewer
from app.feed import FeedEvent, PrescriptionFeed, StreamEnded, event_filter, visibility_class
from app.limits import ClientError, SafeErrors, is_unexpected_error
from app.policy import NotAllowed
from app.service import PrescriptionService
from schema.ledger import Checkpoint, ConsistencyProof, InclusionProof, Receipt, non_negative
from schema.prescriptions import Status, signed_in, viewer_of

log = logging.getLogger("rxledger.subscriptions")


@strawberry.type(description="A step of a prescription, as the log sequenced it.")
class PrescriptionChange:
    # Plain fields, built once per event and shared by every subscriber that receives it:
    # each delivery then costs a serialization, not a resolver call per field.
    event: strawberry.Private[FeedEvent]
    prescription_id: strawberry.ID
    type: str = strawberry.field(description="the event type recorded in the leaf, e.g. DISPENSED")
    status: Status | None = strawberry.field(  # type: ignore[valid-type]
        description="the prescription's status after this event"
    )
    version: int
    at: str = strawberry.field(description="RFC 3339 time recorded in the leaf")
    leaf_index: int = strawberry.field(
        description="the resume point: pass it back as afterLeafIndex"
    )
    leaf: str = strawberry.field(description="base64 leaf bytes (RFC 8785 JSON header)")
    # One signature per leaf, shared by every subscriber that selects the receipt.
    _receipt: strawberry.Private[asyncio.Future[SignedReceipt] | None] = None

    @classmethod
    def of(cls, event: FeedEvent) -> PrescriptionChange:
        status = event.tags.get("status")
        return cls(
            event=event,
            prescription_id=strawberry.ID(event.subject),
            type=event.type,
            status=None if status is None else rx.Status(status),
            version=event.version,
            at=event.at,
            leaf_index=event.leaf_index,
            leaf=b64(event.leaf),
        )

    @strawberry.field(description="inclusion proof, when a checkpoint already covers the leaf")
    async def proof(self, info: Info) -> InclusionProof | None:
        log = info.context["log"]
        cp = await log.current_checkpoint()
        if cp is None or self.event.leaf_index >= cp.size:
            return None
        return InclusionProof.of(await log.prove(self.event.leaf_index, self.event.leaf, cp))

    @strawberry.field(
        description="the log's signed receipt for the leaf: signed once per leaf, and only "
        "over the leaf the log's tree holds at that index"
    )
    async def receipt(self, info: Info) -> Receipt:
        if self._receipt is None:
            self._receipt = asyncio.ensure_future(
                info.context["log"].receipt(self.event.leaf_index, self.event.leaf)
            )
        return Receipt.of(await self._receipt)


class _Changes:
    """The GraphQL objects of recent events, one per event however many subscribers get it."""

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self._by_index: OrderedDict[int, PrescriptionChange] = OrderedDict()

    def of(self, event: FeedEvent) -> PrescriptionChange:
        change = self._by_index.get(event.leaf_index)
        if change is None or change.event is not event:
            change = PrescriptionChange.of(event)
            self._by_index[event.leaf_index] = change
            if len(self._by_index) > self.size:
                self._by_index.popitem(last=False)
        return change


CHANGES = _Changes()


@strawberry.input(description="All given conditions must hold.")
class EventFilter:
    prescription_id: strawberry.ID | None = None
    patient_id: str | None = None
    pharmacy: str | None = None
    organization: str | None = strawberry.field(
        default=None, description="the pharmacy or the courier company"
    )
    status: list[Status] | None = None  # type: ignore[valid-type]


@strawberry.type(
    description="A new checkpoint, with its consistency proof from the last one known."
)
class CheckpointUpdate:
    checkpoint: Checkpoint
    consistency: ConsistencyProof | None = strawberry.field(
        description="from the previous size the subscriber knew (null when it knew none)"
    )


def _feed(info: Info) -> PrescriptionFeed:
    feed: PrescriptionFeed = info.context["feed"]
    return feed


CLOSING: set[asyncio.Task[None]] = set()


def _cut(info: Info) -> Any:
    """How to disconnect this subscriber with a reason: close its WebSocket (a stalled client
    may not read another message, but the close frame carries the reason)."""
    websocket = info.context.get("request")

    async def close(reason: str) -> None:
        close_socket = getattr(websocket, "close", None)
        if close_socket is not None:
            with contextlib.suppress(Exception):  # the client may be gone already
                await close_socket(code=4008, reason=reason[:120])

    def cut(reason: str) -> None:
        task = asyncio.ensure_future(close(reason))
        CLOSING.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(CLOSING.discard)

    return cut


# --- fan-out: one execution per group of subscribers ----------------------------------------


@dataclass(eq=False)
class Handoff:
    """A graphql-transport-ws subscribe message whose transport delivers shared payloads. The
    transport sets it (HANDOFF) for the operation's task; `prescriptionEvents` checks the
    subscriber as always, then leaves its `member` here for the transport to run instead of
    yielding events itself."""

    query: str
    variables: Mapping[str, Any] | None
    operation_name: str | None
    member: Member | None = None


HANDOFF: contextvars.ContextVar[Handoff | None] = contextvars.ContextVar(
    "rxledger_subscription_handoff", default=None
)


class _Variables(Visitor):
    """Collects the names of the variables a part of a document reads."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def enter_variable(self, node: VariableNode, *_: object) -> None:
        self.names.add(node.name.value)


def payload_variables(info: Info, variables: Mapping[str, Any] | None) -> dict[str, Any]:
    """The variables that can change what an event's payload is: all but those only the root
    field's arguments read (the filter and afterLeafIndex choose events, not their payloads).
    Fragments and directives count wholly: reading more than needed only splits groups."""
    raw = info._raw_info  # strawberry's Info does not expose the field nodes otherwise
    parts: list[Node] = [*raw.fragments.values(), *(raw.operation.directives or ())]
    for field in raw.field_nodes:
        parts.extend(field.directives or ())
        if field.selection_set is not None:
            parts.append(field.selection_set)
    reads = _Variables()
    for part in parts:
        visit(part, reads)
    return {k: v for k, v in (variables or {}).items() if k in reads.names}


# Masks a group's field errors as an operation's are (the SafeErrors extension's rule).
_SAFE_ERRORS = SafeErrors(should_mask_error=is_unexpected_error)


class SubscriptionGroup:
    """The subscribers of one document, one set of payload variables and one visibility class.
    The first member to reach an event executes the group's selection on it, with the group's
    context (its first member's, without its socket), and serializes the result; `payload`
    gives every member that same JSON text. Executed by graphql-core directly, as a
    subscription's events are; field errors are logged and masked as strawberry does for an
    operation."""

    def __init__(self, fanout: FanOut, key: str, handoff: Handoff, info: Info, keep: int) -> None:
        self.key = key
        self.members = 0
        self.executions = 0
        raw = info._raw_info  # strawberry's Info exposes neither the field nodes nor the schema
        # Where the root field is, to locate a member's own errors as its resolver would.
        self.field_nodes: Collection[FieldNode] = raw.field_nodes
        self.path = raw.path.as_list()
        self._schema = info.schema
        self._fanout = fanout
        self._keep = keep
        self._payloads: OrderedDict[int, str | asyncio.Future[str]] = OrderedDict()
        # The members' sockets and credentials stay theirs, and so do the loaders of their
        # operations (a loader's cache must not outlive one); the rest is the app's.
        context = {
            k: v
            for k, v in info.context.items()
            if k not in ("request", "response", "connection_params", "loaders")
        }
        executor = Executor.build(
            raw.schema,
            DocumentNode(definitions=(raw.operation, *raw.fragments.values())),
            context_value=context,
            raw_variable_values=dict(handoff.variables or {}),
            operation_name=handoff.operation_name,
        )
        if isinstance(executor, list):  # the member's own operation passed the same checks
            raise RuntimeError(f"subscription group: variables refused: {executor}")
        self._executor = executor

    def payload(self, event: FeedEvent) -> str | asyncio.Future[str]:
        """The event's payload for this group's members: executed by the first to ask (a
        future while fields it selects are still being resolved)."""
        found = self._payloads.get(event.leaf_index)
        if found is not None:
            return found
        self.executions += 1
        self._fanout.executions += 1
        result = execute_subscription_event(
            self._executor.build_per_event_executor(CHANGES.of(event))
        )
        # A task, so that the member that started it cannot cancel it for the others.
        payload = (
            asyncio.ensure_future(self._serialize_later(result))
            if isinstance(result, Awaitable)
            else self._serialize(result)
        )
        self._payloads[event.leaf_index] = payload
        if len(self._payloads) > self._keep:
            self._payloads.popitem(last=False)
        return payload

    async def _serialize_later(self, result: Awaitable[GraphQLExecutionResult]) -> str:
        return self._serialize(await result)

    def _serialize(self, result: GraphQLExecutionResult) -> str:
        """A `next` message's payload, as strawberry's transport builds it."""
        payload: dict[str, Any] = {"data": result.data}
        if result.errors:
            payload["errors"] = [self.masked(e).formatted for e in result.errors]
        return json.dumps(payload)

    def located(self, error: Exception) -> GraphQLError:
        """An error at the root field, as graphql-core locates one its resolver raised."""
        return located_error(error, self.field_nodes, self.path)

    def masked(self, error: GraphQLError) -> GraphQLError:
        """The error logged (when unexpected) and masked as the schema's extensions do."""
        self._schema.process_errors([error])
        return _SAFE_ERRORS.anonymise_error(error) if is_unexpected_error(error) else error

    def leave(self) -> None:
        self.members -= 1
        if self.members == 0:
            self._fanout.discard(self)


class Member:
    """One subscriber of a group: its own position in the feed, filter, expiry and socket."""

    __slots__ = ("cut", "expires_at", "feed", "group", "match", "start")

    def __init__(
        self,
        group: SubscriptionGroup,
        feed: PrescriptionFeed,
        start: int,
        expires_at: float | None,
        cut: Callable[[str], None],
        match: Callable[[FeedEvent], bool],
    ) -> None:
        self.group = group
        self.feed = feed
        self.start = start
        self.expires_at = expires_at
        self.cut = cut
        self.match = match
        group.members += 1

    async def deliver(self, send: Callable[[str], Awaitable[None]]) -> GraphQLError | None:
        """Send the payload of each event this subscriber receives, in leaf order, until its
        stream ends; returns the error that ended it, as its resolver would have raised it
        (StreamEnded's reason, or anything else logged and masked as strawberry does).
        `send` waits for the subscriber's socket: a slow one holds up only itself; what
        `send` raises (the socket is gone) is the transport's, as before."""
        events = self.feed.stream(self.start, self.expires_at, self.cut, self.match)
        try:
            while True:
                try:
                    payload = self.group.payload(await anext(events))
                    if not isinstance(payload, str):
                        # Shielded: a member that leaves must not cancel its mates' payload.
                        payload = await asyncio.shield(payload)
                except StreamEnded as exc:
                    error = ClientError(exc.message, exc.code)
                    return self.group.located(error)
                except Exception as exc:
                    return self.group.masked(self.group.located(exc))
                await send(payload)
        finally:
            await events.aclose()
            self.group.leave()


class FanOut:
    """The subscription groups of one app (`fanout` in the GraphQL context)."""

    def __init__(self, keep: int = 1024) -> None:
        self.keep = keep  # payloads a group keeps for members behind the fastest
        self.groups: dict[str, SubscriptionGroup] = {}
        self.executions = 0  # events executed, over all groups

    def join(
        self,
        handoff: Handoff,
        info: Info,
        viewer: Viewer,
        start: int,
        cut: Callable[[str], None],
        match: Callable[[FeedEvent], bool],
    ) -> Member:
        """A member for a subscriber whose checks passed, in the group of its document,
        payload variables and visibility class (a new one if it is the first)."""
        key = json.dumps(
            [
                handoff.query,
                handoff.operation_name,
                payload_variables(info, handoff.variables),
                visibility_class(viewer),
            ],
            sort_keys=True,
            default=str,
        )
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = SubscriptionGroup(self, key, handoff, info, self.keep)
        return Member(group, _feed(info), start, viewer.expires_at, cut, match)

    def discard(self, group: SubscriptionGroup) -> None:
        if self.groups.get(group.key) is group:
            del self.groups[group.key]


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="prescription events you may read, in leaf order, after afterLeafIndex "
        "(-1: from the first leaf; default: from now on)"
    )
    async def prescription_events(
        self,
        info: Info,
        filter: EventFilter | None = None,
        after_leaf_index: int | None = None,
    ) -> AsyncGenerator[PrescriptionChange, None]:
        viewer = signed_in(info)
        if after_leaf_index is not None and after_leaf_index < -1:
            raise ClientError(
                f"afterLeafIndex is {after_leaf_index}; it must be -1 (from the first leaf) or more",
                "BAD_USER_INPUT",
            )
        service: PrescriptionService = info.context["service"]
        f = filter or EventFilter()
        try:
            match = event_filter(
                service.tags,
                viewer,
                prescription_id=None if f.prescription_id is None else str(f.prescription_id),
                patient_id=f.patient_id,
                pharmacy=f.pharmacy,
                organization=f.organization,
                statuses=None if not f.status else [rx.Status(s).value for s in f.status],
            )
        except NotAllowed as exc:
            raise ClientError(str(exc), "FORBIDDEN") from None
        feed = _feed(info)
        start = await feed.start_position() if after_leaf_index is None else after_leaf_index + 1
        handoff = HANDOFF.get()
        fanout: FanOut | None = info.context.get("fanout")
        if handoff is not None and handoff.member is None and fanout is not None:
            handoff.member = fanout.join(handoff, info, viewer, start, _cut(info), match)
            return
        try:
            async for event in feed.stream(start, viewer.expires_at, _cut(info), match):
                yield CHANGES.of(event)
        except StreamEnded as exc:
            raise ClientError(exc.message, exc.code) from None

    @strawberry.subscription(
        description="each new checkpoint as it is anchored, with the consistency proof from "
        "knownSize (then from the previous one sent); readable without authentication"
    )
    async def checkpoints(
        self, info: Info, known_size: int | None = None
    ) -> AsyncGenerator[CheckpointUpdate, None]:
        non_negative(known_size, "knownSize")
        viewer = viewer_of(info)
        log = info.context["log"]
        known = -1 if known_size is None else known_size
        try:
            async for size in _feed(info).checkpoints(
                known, None if viewer is None else viewer.expires_at
            ):
                cp = await log.checkpoint(size)
                if cp is None:
                    continue
                proof = None
                if known >= 0:
                    old, new, path = await log.consistency_proof(min(known, cp.size), cp.size)
                    proof = ConsistencyProof(
                        from_size=old, to_size=new, path=[b64(h) for h in path]
                    )
                known = cp.size
                yield CheckpointUpdate(checkpoint=Checkpoint.of(cp), consistency=proof)
        except StreamEnded as exc:
            raise ClientError(exc.message, exc.code) from None
