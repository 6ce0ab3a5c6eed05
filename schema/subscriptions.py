"""Subscriptions (graphql-transport-ws): prescription events in leaf order, and checkpoints.

Every subscriber reads from the process's one shared feed (app/feed.py). A subscription is
resumable: `afterLeafIndex` is the last leaf index the client saw, and the stream continues with
exactly the events after it, including those written while the client was away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import Any

import strawberry
from strawberry.types import Info

from anchoring.encoding import b64
from anchoring.receipt import Receipt as SignedReceipt
from app import prescriptions as rx
from app.feed import FeedEvent, PrescriptionFeed, StreamEnded, event_filter
from app.limits import ClientError
from app.policy import NotAllowed
from app.service import PrescriptionService
from schema.ledger import Checkpoint, ConsistencyProof, InclusionProof, Receipt, non_negative
from schema.prescriptions import Status, signed_in, viewer_of


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
