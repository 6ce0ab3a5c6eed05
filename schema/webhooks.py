"""Webhook endpoints in GraphQL: create (the secret shown once), list, rotate the secret,
disable, enable, the attempt log, replay. A PARTNER manages its organization's endpoints, an
ADMIN any organization's (app/policy.py `WEBHOOK_MANAGERS`); another organization's endpoint
is WebhookEndpointNotFound, as if absent. Expected failures of the mutations are members of
their result unions; the queries raise errors with an `extensions.code`."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Annotated, Any

import strawberry
from pymongo.errors import PyMongoError
from strawberry.types import Info

from anchoring.store import Doc
from app import policy
from app import prescriptions as rx
from app.auth import Viewer
from app.limits import ClientError
from app.webhooks import (
    DEFAULT_GRACE_SECONDS,
    INVALID_INPUT,
    MAX_DESCRIPTION_LENGTH,
    MAX_GRACE_SECONDS,
    EndpointFilter,
    EndpointState,
    WebhookDispatcher,
    WebhookRefused,
    check_destination,
    new_endpoint_id,
    new_secret,
    state_of,
)
from schema.ledger import PageInfo, page_size
from schema.prescriptions import Error, Forbidden, InvalidInput, Status, Unavailable, signed_in

WebhookEndpointState = strawberry.enum(
    EndpointState,
    name="WebhookEndpointState",
    description="ACTIVE delivers; FAILING waits (its last retry failed) for "
    "replayWebhooks or enableWebhookEndpoint; DISABLED waits for enableWebhookEndpoint.",
)


@strawberry.type(description="No such webhook endpoint, or not one of your organization's.")
class WebhookEndpointNotFound(Error):
    pass


@strawberry.type(description="The URL is not an absolute http(s) URL with a host, or is too long.")
class InvalidWebhookUrl(Error):
    pass


@strawberry.type(
    description="The URL's host resolves to a loopback, private, link-local or metadata address."
)
class PrivateAddressRefused(Error):
    pass


@strawberry.type(description="The filter names too many prescriptions or is too large.")
class FilterTooLarge(Error):
    pass


WEBHOOK_ERRORS: dict[str, type[Error]] = {
    cls.__name__: cls
    for cls in (
        WebhookEndpointNotFound,
        InvalidWebhookUrl,
        PrivateAddressRefused,
        FilterTooLarge,
        InvalidInput,
        Forbidden,
        Unavailable,
    )
}


@strawberry.type(description="Which of the events the organization sees an endpoint is sent.")
class WebhookFilter:
    status: list[Status]  # type: ignore[valid-type]
    pharmacy: str | None
    organization: str | None = strawberry.field(description="the pharmacy or courier company")
    prescription_ids: list[strawberry.ID]


@strawberry.input(description="All given conditions must hold; none: every event it may see.")
class WebhookFilterInput:
    status: list[Status] | None = None  # type: ignore[valid-type]
    pharmacy: str | None = None
    organization: str | None = strawberry.field(
        default=None, description="the pharmacy or courier company"
    )
    prescription_ids: list[strawberry.ID] | None = strawberry.field(
        default=None, description="at most 100"
    )


@strawberry.type(description="A partner's receiver of prescription events.")
class WebhookEndpoint:
    doc: strawberry.Private[Doc]
    delivery: strawberry.Private[Doc | None]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return strawberry.ID(str(self.doc["_id"]))

    @strawberry.field(description="the organization whose view of the events it is sent")
    def organization(self) -> str:
        return str(self.doc["organization"])

    @strawberry.field
    def url(self) -> str:
        return str(self.doc["url"])

    @strawberry.field
    def description(self) -> str | None:
        found: str | None = self.doc.get("description")
        return found

    @strawberry.field
    def filter(self) -> WebhookFilter:
        f = EndpointFilter.of(self.doc.get("filter"))
        return WebhookFilter(
            status=[rx.Status(s) for s in f.statuses],
            pharmacy=f.pharmacy,
            organization=f.organization,
            prescription_ids=[strawberry.ID(i) for i in f.prescription_ids],
        )

    @strawberry.field
    def state(self) -> WebhookEndpointState:  # type: ignore[valid-type]
        return state_of(self.doc, self.delivery)

    @strawberry.field(
        description="the last leaf index delivered (or passed over: not for this endpoint); "
        "the next delivery is of a later leaf. After replayWebhooks, the replay's point once "
        "the delivering process has taken it up"
    )
    def last_delivered_leaf_index(self) -> int:
        return -1 if self.delivery is None else int(self.delivery["cursor"])

    @strawberry.field
    def created_at(self) -> dt.datetime:
        at: dt.datetime = self.doc["createdAt"]
        return at

    @strawberry.field(description="since when it is FAILING")
    def failing_since(self) -> dt.datetime | None:
        if state_of(self.doc, self.delivery) is not EndpointState.FAILING or not self.delivery:
            return None
        at: dt.datetime = self.delivery["failing"]["since"]
        return at

    @strawberry.field(description="the error of the try that made it FAILING")
    def last_error(self) -> str | None:
        if state_of(self.doc, self.delivery) is not EndpointState.FAILING or not self.delivery:
            return None
        return str(self.delivery["failing"]["error"])

    @strawberry.field(description="delivery attempts made so far")
    def attempts(self) -> int:
        return 0 if self.delivery is None else int(self.delivery.get("attempts", 0))


@strawberry.type(description="A new endpoint and its signing secret, shown this once.")
class WebhookEndpointCreated:
    endpoint: WebhookEndpoint
    secret: str = strawberry.field(description="whsec_...: keep it; it is never shown again")


@strawberry.type(description="A new signing secret, shown this once.")
class WebhookSecretRotated:
    endpoint: WebhookEndpoint
    secret: str = strawberry.field(description="whsec_...: keep it; it is never shown again")
    previous_secrets_expire_at: dt.datetime = strawberry.field(
        description="until then, deliveries are signed by the previous secret(s) too"
    )


@strawberry.type(description="One delivery attempt of one event.")
class WebhookDelivery:
    number: int = strawberry.field(description="the endpoint's attempt number (1, 2, ...)")
    webhook_id: str = strawberry.field(description="the webhook-id header: the same on retries")
    leaf_index: int
    attempt: int = strawberry.field(description="the try of this event (1: the first)")
    at: dt.datetime
    http_status: int | None
    latency_ms: float
    result: str = strawberry.field(
        description="success, http_error, timeout, refused, blocked or error"
    )
    error: str | None
    next_attempt_at: dt.datetime | None = strawberry.field(
        description="when the event is tried again (null: delivered, or the last try)"
    )

    @classmethod
    def of(cls, doc: Doc) -> WebhookDelivery:
        return cls(
            number=int(doc["n"]),
            webhook_id=str(doc["webhookId"]),
            leaf_index=int(doc["leafIndex"]),
            attempt=int(doc["try"]),
            at=doc["at"],
            http_status=doc.get("httpStatus"),
            latency_ms=float(doc["latencyMs"]),
            result=str(doc["result"]),
            error=doc.get("error"),
            next_attempt_at=doc.get("nextAttemptAt"),
        )


@strawberry.type(description="Attempts, newest first.")
class WebhookDeliveryConnection:
    nodes: list[WebhookDelivery]
    page_info: PageInfo


CreateWebhookEndpointResult = Annotated[
    WebhookEndpointCreated
    | InvalidWebhookUrl
    | PrivateAddressRefused
    | FilterTooLarge
    | InvalidInput
    | Forbidden
    | Unavailable,
    strawberry.union("CreateWebhookEndpointResult"),
]

RotateWebhookSecretResult = Annotated[
    WebhookSecretRotated | WebhookEndpointNotFound | InvalidInput | Forbidden | Unavailable,
    strawberry.union("RotateWebhookSecretResult"),
]

WebhookEndpointResult = Annotated[
    WebhookEndpoint | WebhookEndpointNotFound | InvalidInput | Forbidden | Unavailable,
    strawberry.union("WebhookEndpointResult"),
]


# --- helpers ------------------------------------------------------------------------------


def _dispatcher(info: Info) -> WebhookDispatcher:
    found: WebhookDispatcher = info.context["webhooks"]
    return found


async def _endpoint(info: Info, viewer: Viewer, endpoint_id: str) -> Doc:
    """The endpoint, if the viewer manages it; raises WebhookRefused otherwise."""
    try:
        policy.webhook_scope(viewer)
    except policy.NotAllowed as exc:
        raise WebhookRefused("Forbidden", str(exc)) from None
    doc = await _dispatcher(info).store.endpoint(endpoint_id)
    if doc is None or not policy.may_manage_webhooks_of(viewer, str(doc["organization"])):
        raise WebhookRefused(
            "WebhookEndpointNotFound",
            f"no webhook endpoint {endpoint_id!r}, or not one of your organization's",
        )
    return doc


async def _run(info: Info, mutation: str, action: Any) -> Any:
    """Run a webhook mutation, turning expected refusals into their union member."""
    metrics = info.context.get("metrics")
    try:
        result = await action(signed_in(info))
    except WebhookRefused as exc:
        result = WEBHOOK_ERRORS[exc.kind](message=exc.message)
    except policy.NotAllowed as exc:
        result = Forbidden(message=str(exc))
    except PyMongoError:
        result = Unavailable(message="the database is unreachable; nothing was changed: retry")
    if metrics is not None:
        metrics.count_mutation(mutation, type(result).__name__)
    return result


def _filter(given: WebhookFilterInput | None) -> EndpointFilter:
    if given is None:
        return EndpointFilter()
    f = EndpointFilter(
        statuses=tuple(rx.Status(s).value for s in given.status or ()),
        pharmacy=given.pharmacy,
        organization=given.organization,
        prescription_ids=tuple(str(i) for i in given.prescription_ids or ()),
    )
    f.check()
    return f


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- the API ------------------------------------------------------------------------------


@strawberry.type
class WebhookQueries:
    @strawberry.field(
        description="PARTNER: its organization's webhook endpoints; ADMIN: every endpoint"
    )
    async def webhook_endpoints(self, info: Info) -> list[WebhookEndpoint]:
        viewer = signed_in(info)
        try:
            scope = policy.webhook_scope(viewer)
        except policy.NotAllowed as exc:
            raise ClientError(str(exc), "FORBIDDEN") from None
        store = _dispatcher(info).store
        docs = await (store.every_endpoint() if scope is None else store.of_organization(scope))
        deliveries = await store.deliveries_of([str(d["_id"]) for d in docs])
        return [WebhookEndpoint(doc=d, delivery=deliveries.get(str(d["_id"]))) for d in docs]

    @strawberry.field(description="an endpoint's delivery attempts, newest first")
    async def webhook_deliveries(
        self, info: Info, endpoint_id: strawberry.ID, first: int = 20, after: str | None = None
    ) -> WebhookDeliveryConnection:
        viewer = signed_in(info)
        first = page_size(info, first)
        try:
            await _endpoint(info, viewer, str(endpoint_id))
        except WebhookRefused as exc:
            code = "FORBIDDEN" if exc.kind == "Forbidden" else "NOT_FOUND"
            raise ClientError(exc.message, code) from None
        delivery = await _dispatcher(info).store.delivery(str(endpoint_id))
        top = 0 if delivery is None else int(delivery.get("attempts", 0))
        if after is not None:
            if not after.isdigit() or not 1 <= int(after) <= top + 1:
                raise ClientError(f"after {after!r} is not a cursor of this list", "BAD_USER_INPUT")
            top = int(after) - 1
        numbers = list(range(top, max(0, top - first), -1))
        docs = await _dispatcher(info).store.attempts_page(str(endpoint_id), numbers)
        lowest = numbers[-1] if numbers else 0
        return WebhookDeliveryConnection(
            nodes=[WebhookDelivery.of(d) for d in docs],
            page_info=PageInfo(
                has_next_page=lowest > 1, end_cursor=str(lowest) if numbers else None
            ),
        )


@strawberry.type
class WebhookMutations:
    @strawberry.mutation(
        description="PARTNER (for its organization) or ADMIN (naming one): a new endpoint, "
        "sent every event from now on that the organization may see and the filter selects; "
        "its signing secret is in the answer, and only there"
    )
    async def create_webhook_endpoint(
        self,
        info: Info,
        url: str,
        filter: WebhookFilterInput | None = None,
        description: str | None = None,
        organization: str | None = None,
    ) -> CreateWebhookEndpointResult:
        dispatcher = _dispatcher(info)

        async def act(viewer: Viewer) -> WebhookEndpointCreated:
            owner = policy.webhook_organization(viewer, organization)
            if description is not None and len(description) > MAX_DESCRIPTION_LENGTH:
                raise WebhookRefused(
                    INVALID_INPUT,
                    f"description has {len(description)} characters; at most "
                    f"{MAX_DESCRIPTION_LENGTH}",
                )
            chosen = _filter(filter)
            await check_destination(url, dispatcher.settings.allow_private)
            endpoint_id = new_endpoint_id()
            secret = new_secret()
            now = _now()
            doc: Doc = {
                "_id": endpoint_id,
                "organization": owner,
                "url": url,
                "description": description,
                "filter": chosen.doc(),
                "state": EndpointState.ACTIVE.value,
                "generation": 0,
                "replay": None,
                "secrets": [{**dispatcher.box.seal(endpoint_id, secret), "createdAt": now}],
                "createdAt": now,
                "createdBy": viewer.subject,
            }
            # From now on: the next leaf the feed will see.
            cursor = await dispatcher.feed.start_position() - 1
            delivery = await dispatcher.store.insert(doc, cursor)
            dispatcher.wake()
            return WebhookEndpointCreated(
                endpoint=WebhookEndpoint(doc=doc, delivery=delivery), secret=secret
            )

        return await _run(info, "createWebhookEndpoint", act)

    @strawberry.mutation(
        description="a new signing secret, answered once every delivery is signed by it "
        "(2 × RXLEDGER_WEBHOOK_SCAN_INTERVAL); the previous one(s) go on signing for "
        "graceSeconds (default 86400, at most 604800) so receivers can switch without loss"
    )
    async def rotate_webhook_secret(
        self, info: Info, endpoint_id: strawberry.ID, grace_seconds: int | None = None
    ) -> RotateWebhookSecretResult:
        dispatcher = _dispatcher(info)

        async def act(viewer: Viewer) -> WebhookSecretRotated:
            grace = DEFAULT_GRACE_SECONDS if grace_seconds is None else grace_seconds
            if not 0 <= grace <= MAX_GRACE_SECONDS:
                raise WebhookRefused(
                    INVALID_INPUT, f"graceSeconds is {grace}; it must be 0 to {MAX_GRACE_SECONDS}"
                )
            doc = await _endpoint(info, viewer, str(endpoint_id))
            now = _now()
            until = now + dt.timedelta(seconds=grace)
            kept = []
            for entry in doc.get("secrets") or ():
                expires = entry.get("expiresAt")
                if expires is None:
                    kept.append({**entry, "expiresAt": until})
                elif (expires if expires.tzinfo else expires.replace(tzinfo=dt.UTC)) > now:
                    kept.append(entry)
            secret = new_secret()
            fresh = {**dispatcher.box.seal(str(doc["_id"]), secret), "createdAt": now}
            changed = await dispatcher.store.change(
                str(doc["_id"]), {"$set": {"secrets": [fresh, *kept]}}
            )
            if changed is None:
                raise WebhookRefused(
                    "WebhookEndpointNotFound", f"no webhook endpoint {endpoint_id!r}"
                )
            # Answer once every process signs with the new secret: each signs by an endpoint
            # read at most `freshness` ago (WebhookDispatcher.endpoint).
            await asyncio.sleep(dispatcher.freshness)
            return WebhookSecretRotated(
                endpoint=WebhookEndpoint(
                    doc=changed, delivery=await dispatcher.store.delivery(str(doc["_id"]))
                ),
                secret=secret,
                previous_secrets_expire_at=until,
            )

        return await _run(info, "rotateWebhookSecret", act)

    @strawberry.mutation(description="stop deliveries; events wait from its cursor")
    async def disable_webhook_endpoint(
        self, info: Info, endpoint_id: strawberry.ID
    ) -> WebhookEndpointResult:
        return await _next_generation(
            info,
            "disableWebhookEndpoint",
            str(endpoint_id),
            lambda doc, g: {"state": EndpointState.DISABLED.value},
        )

    @strawberry.mutation(
        description="deliver again, from its cursor (a FAILING endpoint retries the event it "
        "gave up on)"
    )
    async def enable_webhook_endpoint(
        self, info: Info, endpoint_id: strawberry.ID
    ) -> WebhookEndpointResult:
        return await _next_generation(
            info,
            "enableWebhookEndpoint",
            str(endpoint_id),
            lambda doc, g: {"state": EndpointState.ACTIVE.value},
        )

    @strawberry.mutation(
        description="send again every event after afterLeafIndex (-1: from the first leaf) "
        "that it is sent, with the same webhook-ids; a FAILING endpoint becomes ACTIVE, a "
        "DISABLED one stays so (and replays once enabled)"
    )
    async def replay_webhooks(
        self, info: Info, endpoint_id: strawberry.ID, after_leaf_index: int
    ) -> WebhookEndpointResult:
        size = await info.context["log"].published_size()

        def replay(doc: Doc, generation: int) -> dict[str, Any]:
            if not -1 <= after_leaf_index < size:
                raise WebhookRefused(
                    INVALID_INPUT,
                    f"afterLeafIndex is {after_leaf_index}; it must be -1 to {size - 1} "
                    "(the log's last leaf)",
                )
            return {"replay": {"generation": generation, "after": after_leaf_index}}

        return await _next_generation(info, "replayWebhooks", str(endpoint_id), replay)


async def _next_generation(
    info: Info,
    mutation: str,
    endpoint_id: str,
    fields: Callable[[Doc, int], dict[str, Any]],
) -> Any:
    """Set `fields(endpoint, next generation)` and move the endpoint to its next generation:
    the process delivering to it stops, and whoever takes it next starts from its state (and
    from a replay's point). Refused as Unavailable when another change won the race."""
    dispatcher = _dispatcher(info)

    async def act(viewer: Viewer) -> WebhookEndpoint:
        doc = await _endpoint(info, viewer, endpoint_id)
        generation = int(doc["generation"])
        changed = await dispatcher.store.change(
            endpoint_id,
            {"$set": {**fields(doc, generation + 1), "generation": generation + 1}},
            generation,
        )
        if changed is None:
            raise WebhookRefused(
                "Unavailable", f"webhook endpoint {endpoint_id!r} changed meanwhile; retry"
            )
        dispatcher.wake()
        return WebhookEndpoint(doc=changed, delivery=await dispatcher.store.delivery(endpoint_id))

    return await _run(info, mutation, act)
