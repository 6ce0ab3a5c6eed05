"""Partner webhooks: every prescription event an endpoint may see, pushed to it in leaf order,
signed by the Standard Webhooks scheme, retried, and carrying the log's receipt or proof.

Lifecycle of a delivery, named as in the code, the logs and the metrics:

  acquire  - a process takes an endpoint's lease (`webhook_deliveries` document, fields
             `leaseHolder`/`leaseExpiresAt`), as the sequencer takes the log's: one process
             delivers to an endpoint at a time. Every process scans the endpoints
             (RXLEDGER_WEBHOOK_SCAN_INTERVAL) and tries the active ones nobody holds, up to
             its share: the active endpoints divided among the live delivering processes,
             rounded up. A process is live while its heartbeat (`webhook_holders`, renewed
             at each scan, expiring after RXLEDGER_WEBHOOK_LEASE_TTL or 3 scan intervals,
             whichever is longer) is: a dead process's endpoints are taken over once
             their leases expire, and a process above its share (others started) hands the
             excess over between two deliveries.
  follow   - the holder reads the shared feed (app/feed.py) from the endpoint's `cursor` (the
             last leaf index delivered or passed over) and routes each event as a PARTNER of the
             endpoint's organization would be sent it (app/policy.py `webhook_viewer`, through
             the same `event_filter` subscriptions use), narrowed by the endpoint's filter.
  send     - one POST: `webhook-id` stable per (event, endpoint), `webhook-timestamp`,
             `webhook-signature` by every secret still valid (the new one and, during a
             rotation's grace period, the old one); no redirects, at most 64 KiB of the
             response read, RXLEDGER_WEBHOOK_TIMEOUT for the whole exchange; connections only
             to addresses that were checked when resolved (`CheckedResolver`: a name that
             answers differently to a later lookup, DNS rebinding, changes nothing).
  record   - each attempt is a document of `webhook_attempts` under `_id` "<endpoint>:<n>", n
             counted on the endpoint (so a page of attempts is a read by `_id`).
  advance  - a 2xx moves the cursor, and the next event is sent (in order, at least once: it
             waited until then). The cursor and the attempts are stored together, a success
             within FLUSH_SECONDS, a failure before its retry, with the point reached in
             the schedule (`retry`: the tries made, the next one's time), so that whoever
             holds the endpoint next, after a restart or a lease handover, goes on with it. A
             failure is retried after RXLEDGER_WEBHOOK_RETRY_SCHEDULE's waits, with jitter;
             after the last the endpoint is FAILING and its events wait for `replayWebhooks`
             or `enableWebhookEndpoint` (which start the schedule afresh).

Every write of the holder is fenced by its lease; replaying, disabling and enabling bump the
endpoint's `generation`, and a holder that sees it moved (before each try, in the endpoint as
read at most 2 × RXLEDGER_WEBHOOK_SCAN_INTERVAL before, and at each renewal) stops: whoever holds the endpoint next starts from the cursor stored, or from the
replay's point. A crash between a delivery and its cursor write repeats that delivery with the
same `webhook-id`; nothing is skipped.

Secrets are stored encrypted (AES-256-GCM under a key derived by HKDF-SHA256 from the log's
key, RXLEDGER_TAG_KEY's or else the signing key's, or from RXLEDGER_WEBHOOK_KEY: see
app/derived_keys.py; the endpoint id is the associated data): a reader of the database alone
cannot sign a delivery, and a rotation of the log's signing key leaves them readable. Environment variables: app/settings.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import ipaddress
import json
import logging
import math
import os
import random
import secrets as random_secrets
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError
from standardwebhooks import Webhook

from anchoring.anchorer import SignedCheckpoint
from anchoring.dialect import by_ids
from anchoring.encoding import b64
from anchoring.errors import ProofUnavailable, database_error, frames
from anchoring.log import TransparencyLog
from anchoring.store import Doc, Index, create_indexes
from app.derived_keys import DerivedKeys, webhook_key
from app.feed import FeedEvent, PrescriptionFeed, StreamEnded, event_filter
from app.metrics import Metrics
from app.policy import Tags, webhook_viewer
from app.prescriptions import TRANSITIONS, EventType
from app.settings import WebhookSettings

log = logging.getLogger("rxledger.webhooks")

ENDPOINTS = "webhook_endpoints"
DELIVERIES = "webhook_deliveries"
ATTEMPTS = "webhook_attempts"
HOLDERS = "webhook_holders"

WEBHOOK_INDEXES: dict[str, tuple[Index, ...]] = {
    ENDPOINTS: (
        Index(
            (("organization", ASCENDING), ("_id", ASCENDING)),
            "organization_id",
            "an organization's endpoints, in id order (webhookEndpoints for a PARTNER)",
        ),
    ),
    # Read by `_id` only: the endpoint's id; "<endpoint>:<n>"; the holder.
    DELIVERIES: (),
    ATTEMPTS: (),
    HOLDERS: (),
}

MAX_URL_LENGTH = 2048
MAX_DESCRIPTION_LENGTH = 500
MAX_FILTER_IDS = 100
MAX_FILTER_BYTES = 4096
MAX_RESPONSE_BYTES = 64 * 1024
MAX_GRACE_SECONDS = 7 * 24 * 3600
DEFAULT_GRACE_SECONDS = 24 * 3600
SECRET_BYTES = 24
USER_AGENT = "rxledger-webhooks/1"


class EndpointState(enum.StrEnum):
    ACTIVE = "ACTIVE"
    FAILING = "FAILING"  # the last retry failed: events wait for a replay or re-enabling
    DISABLED = "DISABLED"


class WebhookRefused(Exception):
    """Bad input for an endpoint; `kind` names the GraphQL error type, the message says what
    was found and what is wanted."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


INVALID_URL = "InvalidWebhookUrl"
PRIVATE_ADDRESS = "PrivateAddressRefused"
FILTER_TOO_LARGE = "FilterTooLarge"
INVALID_INPUT = "InvalidInput"


# --- URLs ---------------------------------------------------------------------------------


def parse_url(url: str) -> tuple[str, int]:
    """The host and port of an endpoint URL. Raises WebhookRefused(INVALID_URL) for anything
    but an absolute http(s) URL with a host, without credentials or a fragment."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(
            INVALID_URL, f"url has {len(url)} characters; at most {MAX_URL_LENGTH}"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(INVALID_URL, f"url does not parse: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused(
            INVALID_URL, f"url scheme is {parts.scheme or 'missing'!r}; want http or https"
        )
    if not parts.hostname:
        raise WebhookRefused(INVALID_URL, "url has no host")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused(INVALID_URL, "url must not carry credentials (user:password@)")
    if parts.fragment:
        raise WebhookRefused(INVALID_URL, "url must not have a fragment (#...)")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise WebhookRefused(INVALID_URL, "url contains whitespace or control characters")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def refused_address(address: str) -> bool:
    """Whether an endpoint may not be at `address`: anything not globally routable (loopback,
    private, link-local, hence cloud metadata at 169.254.169.254, shared, reserved) or
    multicast; an IPv4-mapped IPv6 address as its IPv4 address."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


async def check_destination(url: str, allow_private: bool) -> None:
    """Raises WebhookRefused when `url` is malformed, or (unless `allow_private`) its host does
    not resolve or resolves to any refused address. What a URL is checked by when it is given;
    a delivery's connection is checked again, at the address it goes to (`CheckedResolver`)."""
    host, port = parse_url(url)
    if allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise WebhookRefused(INVALID_URL, f"url host {host!r} does not resolve: {exc}") from None
    for info in infos:
        refuse_address(host, str(info[4][0]))


def refuse_address(host: str, address: str) -> None:
    """Raises WebhookRefused(PRIVATE_ADDRESS) when `host` is at `address` and `refused_address`
    refuses it."""
    if refused_address(address):
        raise WebhookRefused(
            PRIVATE_ADDRESS,
            f"url host {host!r} resolves to {address}, a loopback, private, link-local or "
            "metadata address (set RXLEDGER_WEBHOOK_ALLOW_PRIVATE=1 in development)",
        )


# --- filters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointFilter:
    """Which of the events an endpoint's organization sees it is sent: all conditions hold."""

    statuses: tuple[str, ...] = ()
    pharmacy: str | None = None
    organization: str | None = None
    prescription_ids: tuple[str, ...] = ()

    def doc(self) -> Doc:
        return {
            "statuses": list(self.statuses),
            "pharmacy": self.pharmacy,
            "organization": self.organization,
            "prescriptionIds": list(self.prescription_ids),
        }

    @classmethod
    def of(cls, doc: Mapping[str, Any] | None) -> EndpointFilter:
        doc = doc or {}
        return cls(
            tuple(doc.get("statuses") or ()),
            doc.get("pharmacy"),
            doc.get("organization"),
            tuple(doc.get("prescriptionIds") or ()),
        )

    def check(self) -> None:
        """Raises WebhookRefused(FILTER_TOO_LARGE) beyond MAX_FILTER_IDS prescription ids or
        MAX_FILTER_BYTES of JSON."""
        if len(self.prescription_ids) > MAX_FILTER_IDS:
            raise WebhookRefused(
                FILTER_TOO_LARGE,
                f"filter names {len(self.prescription_ids)} prescriptions; at most "
                f"{MAX_FILTER_IDS}",
            )
        size = len(json.dumps(self.doc(), separators=(",", ":")).encode())
        if size > MAX_FILTER_BYTES:
            raise WebhookRefused(
                FILTER_TOO_LARGE,
                f"filter is {size} bytes as JSON; at most {MAX_FILTER_BYTES}",
            )

    def matcher(
        self, tags: Tags, endpoint_id: str, organization: str
    ) -> Callable[[FeedEvent], bool]:
        """The events the endpoint is sent: those a PARTNER of its organization subscribed
        with this filter would receive."""
        seen = event_filter(
            tags,
            webhook_viewer(endpoint_id, organization),
            pharmacy=self.pharmacy,
            organization=self.organization,
            statuses=list(self.statuses) or None,
        )
        ids = frozenset(self.prescription_ids)
        if not ids:
            return seen
        return lambda event: event.subject in ids and seen(event)


# --- secrets ------------------------------------------------------------------------------


def new_secret() -> str:
    return "whsec_" + b64(random_secrets.token_bytes(SECRET_BYTES))


class SecretBox:
    """Endpoint secrets encrypted at rest: AES-256-GCM under `aes_key` (one that
    app/derived_keys.py derives), with the endpoint id as associated data (a sealed secret
    copied to another endpoint does not open)."""

    def __init__(self, aes_key: bytes) -> None:
        self._aead = AESGCM(aes_key)

    @classmethod
    def for_log(cls, settings: WebhookSettings, derived: DerivedKeys) -> SecretBox:
        """Under the key derived from RXLEDGER_WEBHOOK_KEY when set, else the one derived
        from the log's key (RXLEDGER_TAG_KEY's, else the signing key's: Settings.derived_keys)."""
        if settings.key is not None:
            return cls(webhook_key(settings.key))
        return cls(derived.webhooks)

    def seal(self, endpoint_id: str, secret: str) -> Doc:
        nonce = os.urandom(12)
        return {
            "nonce": nonce,
            "sealed": self._aead.encrypt(nonce, secret.encode(), endpoint_id.encode()),
        }

    def open(self, endpoint_id: str, sealed: Mapping[str, Any]) -> str:
        """Raises cryptography's InvalidTag when the secret was sealed under another key or
        for another endpoint."""
        plain = self._aead.decrypt(
            bytes(sealed["nonce"]), bytes(sealed["sealed"]), endpoint_id.encode()
        )
        return plain.decode()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(at: dt.datetime) -> dt.datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)


def live_secrets(box: SecretBox, doc: Mapping[str, Any], at: dt.datetime) -> list[str]:
    """The endpoint's secrets that sign at `at`: the current one, and those rotated out whose
    grace period has not ended. One sealed under another key (RXLEDGER_WEBHOOK_KEY, or the log
    key, changed since) is left out: it cannot sign."""
    out = []
    for entry in doc.get("secrets") or ():
        expires = entry.get("expiresAt")
        if expires is None or _aware(expires) > at:
            try:
                out.append(box.open(str(doc["_id"]), entry))
            except InvalidTag:
                log.error(
                    "webhooks: a secret of %s was sealed under another key (RXLEDGER_WEBHOOK_KEY "
                    "or the log key changed): rotate it",
                    doc["_id"],
                )
    return out


def sign(secrets: Iterable[str], webhook_id: str, at: dt.datetime, body: bytes) -> str:
    """The webhook-signature header: one `v1,` signature per secret, space-separated."""
    return " ".join(Webhook(s).sign(webhook_id, at, body) for s in secrets)


def webhook_id(endpoint_id: str, leaf_index: int) -> str:
    """Stable per (event, endpoint): a receiver de-duplicates retries and replays by it."""
    return f"msg_{endpoint_id}_{leaf_index}"


# --- storage ------------------------------------------------------------------------------


class LostEndpoint(Exception):
    """This process no longer holds the endpoint's lease."""


def state_of(endpoint: Mapping[str, Any], delivery: Mapping[str, Any] | None) -> EndpointState:
    """DISABLED as its owner set it; FAILING when its holder gave up on an event since the
    last replay or enabling (the same generation); else ACTIVE."""
    if endpoint.get("state") == EndpointState.DISABLED.value:
        return EndpointState.DISABLED
    if (
        delivery is not None
        and delivery.get("failing")
        and delivery.get("generation") == endpoint.get("generation")
    ):
        return EndpointState.FAILING
    return EndpointState.ACTIVE


class WebhookStore:
    """Four collections. `webhook_endpoints` holds what owners set (url, filter, secrets,
    state, `generation`, a pending `replay`) and only mutations write it; `webhook_deliveries`
    holds, under the same `_id`, what the delivering process keeps (cursor, lease, attempt
    count, the point reached in the retry schedule, `failing`) and only the process taking or
    holding the lease writes it, one write at a time. Two writers never update one document
    at once: on a server whose updates read a document and write it back whole (FerretDB
    v1), one of them could be lost. `webhook_attempts` is the attempt log; `webhook_holders`
    the delivering processes' heartbeats, each written by its process only."""

    def __init__(self, db: AsyncDatabase[Doc]) -> None:
        self.endpoints: AsyncCollection[Doc] = db[ENDPOINTS]
        self.deliveries: AsyncCollection[Doc] = db[DELIVERIES]
        self.attempts: AsyncCollection[Doc] = db[ATTEMPTS]
        self.holders: AsyncCollection[Doc] = db[HOLDERS]

    async def ensure_indexes(self) -> None:
        await create_indexes(self.endpoints, WEBHOOK_INDEXES[ENDPOINTS])

    async def insert(self, endpoint: Doc, cursor: int) -> Doc:
        """Store a new endpoint whose first delivery is of the leaf after `cursor`; its
        delivery state. The state first: an endpoint is never seen without one."""
        delivery: Doc = {
            "_id": endpoint["_id"],
            "cursor": cursor,
            "generation": endpoint["generation"],
            "replayed": -1,
            "attempts": 0,
            "retry": None,
            "failing": None,
            "leaseHolder": None,
            "leaseExpiresAt": None,
        }
        await self.deliveries.insert_one(delivery)
        await self.endpoints.insert_one(endpoint)
        return delivery

    async def endpoint(self, endpoint_id: str) -> Doc | None:
        found: Doc | None = await self.endpoints.find_one({"_id": endpoint_id})
        return found

    async def delivery(self, endpoint_id: str) -> Doc | None:
        found: Doc | None = await self.deliveries.find_one({"_id": endpoint_id})
        return found

    async def deliveries_of(self, endpoint_ids: list[str]) -> dict[str, Doc]:
        found: dict[str, Doc] = await by_ids(self.deliveries, endpoint_ids)
        return found

    async def of_organization(self, organization: str) -> list[Doc]:
        cursor = self.endpoints.find({"organization": organization}, sort=[("_id", 1)])
        return [d async for d in cursor]

    async def every_endpoint(self) -> list[Doc]:
        """Every endpoint, in `_id` order (`_every`)."""
        return await _every(self.endpoints)

    async def every_delivery(self) -> list[Doc]:
        """Every endpoint's delivery state, in `_id` order (`_every`)."""
        return await _every(self.deliveries)

    async def change(
        self, endpoint_id: str, update: Doc, generation: int | None = None
    ) -> Doc | None:
        """Apply `update` (an operator document) to the endpoint, if it is still at
        `generation` when one is given; the result, or None."""
        query: Doc = {"_id": endpoint_id}
        if generation is not None:
            query["generation"] = generation
        found: Doc | None = await self.endpoints.find_one_and_update(
            query, update, return_document=ReturnDocument.AFTER
        )
        return found

    # --- the holder's writes (each worker makes one at a time) --------------------------------

    async def acquire(self, endpoint_id: str, holder: str, ttl: float) -> Doc | None:
        now = _now()
        found: Doc | None = await self.deliveries.find_one_and_update(
            {
                "_id": endpoint_id,
                "$or": [
                    {"leaseHolder": holder},
                    {"leaseHolder": None},  # never held
                    {"leaseExpiresAt": {"$lt": now}},
                ],
            },
            {"$set": {"leaseHolder": holder, "leaseExpiresAt": now + dt.timedelta(seconds=ttl)}},
            return_document=ReturnDocument.AFTER,
        )
        return found

    async def held(self, endpoint_id: str, holder: str, fields: Doc, ttl: float) -> Doc:
        """Set `fields` and extend the lease, while `holder` holds it; the delivery state.
        Raises LostEndpoint."""
        found: Doc | None = await self.deliveries.find_one_and_update(
            {"_id": endpoint_id, "leaseHolder": holder},
            {"$set": {**fields, "leaseExpiresAt": _now() + dt.timedelta(seconds=ttl)}},
            return_document=ReturnDocument.AFTER,
        )
        if found is None:
            raise LostEndpoint(f"lost the lease of {endpoint_id}")
        return found

    async def release(self, endpoint_id: str, holder: str, fields: Doc) -> None:
        """Store `fields` (the cursor, the attempt count) and give the lease up."""
        await self.deliveries.update_one(
            {"_id": endpoint_id, "leaseHolder": holder},
            {"$set": {**fields, "leaseExpiresAt": _now()}},
        )

    async def insert_attempts(self, attempts: list[Doc]) -> None:
        """Store numbered attempts (`_id` "<endpoint>:<n>"), numbers the holder has already
        stored as the endpoint's count."""
        if attempts:
            await self.attempts.insert_many(attempts, ordered=False)

    # --- the delivering processes (each writes its own heartbeat only) -----------------------

    async def heartbeat(self, holder: str, ttl: float) -> None:
        """Say that `holder` delivers, for `ttl` seconds from now."""
        await self.holders.update_one(
            {"_id": holder},
            {"$set": {"expiresAt": _now() + dt.timedelta(seconds=ttl)}},
            upsert=True,
        )

    async def every_holder(self) -> list[Doc]:
        """Every heartbeat, live or not, in `_id` order (`_every`)."""
        return await _every(self.holders)

    async def forget_holder(self, holder: str) -> None:
        await self.holders.delete_one({"_id": holder})

    async def attempts_page(self, endpoint_id: str, numbers: list[int]) -> list[Doc]:
        found = await by_ids(self.attempts, [f"{endpoint_id}:{n}" for n in numbers])
        return [found[f"{endpoint_id}:{n}"] for n in numbers if f"{endpoint_id}:{n}" in found]


SCAN_PAGE = 500


async def _every(collection: AsyncCollection[Doc]) -> list[Doc]:
    """Every document of a small collection, in pages along the `_id` index (a sorted,
    limited read from the last `_id` seen, which the index serves on MongoDB)."""
    found: list[Doc] = []
    query: Doc = {}
    while True:
        page = [d async for d in collection.find(query, sort=[("_id", 1)], limit=SCAN_PAGE)]
        found += page
        if len(page) < SCAN_PAGE:
            return found
        query = {"_id": {"$gt": page[-1]["_id"]}}


def new_endpoint_id() -> str:
    return "whep_" + uuid.uuid4().hex[:20]


# --- payloads -----------------------------------------------------------------------------


# The events that move a prescription to a status (app.prescriptions); others (an erasure)
# leave it where it was.
STATUS_EVENTS = frozenset({EventType.ISSUED.value, *(t.event.value for t in TRANSITIONS.values())})


def event_type(event: FeedEvent) -> str:
    """`prescription.<status>` (the status the event moved it to), e.g. prescription.dispensed;
    for an event that changes no status, `prescription.<event type>`, e.g.
    prescription.personal_data_erased."""
    status = event.tags.get("status")
    if event.type not in STATUS_EVENTS or not status:
        return f"prescription.{event.type.lower()}"
    return f"prescription.{status.lower()}"


async def payload(tlog: TransparencyLog, event: FeedEvent, cp: SignedCheckpoint | None) -> bytes:
    """The body of an event's delivery: {type, timestamp, data}, data being the change a
    subscriber gets plus the log's receipt and, when checkpoint `cp` (covering the leaf) is
    given, the proof bundle `rxledger verify` reads."""
    receipt: Doc | None = None
    proof: Doc | None = None
    try:
        signed = await tlog.receipt(event.leaf_index, event.leaf)
        receipt = {
            "leafIndex": signed.leaf_index,
            "leafHash": b64(signed.leaf_hash),
            "issuedAt": signed.issued_at.isoformat().replace("+00:00", "Z"),
            "note": signed.note,
        }
        if cp is not None:
            proof = (await tlog.prove(event.leaf_index, event.leaf, cp)).bundle()
    except ProofUnavailable as exc:
        # The stored log disagrees with its tree: deliver the change without vouching for it.
        log.error("webhooks: no receipt or proof for leaf %d: %s", event.leaf_index, exc)
    body = {
        "type": event_type(event),
        "timestamp": event.at,
        "data": {
            "prescriptionId": event.subject,
            "type": event.type,
            "status": event.tags.get("status"),
            "version": event.version,
            "at": event.at,
            "leafIndex": event.leaf_index,
            "leaf": b64(event.leaf),
            "receipt": receipt,
            "proof": proof,
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()


class Payloads:
    """Each event's body, built once however many endpoints are sent it (the body is the
    same for all of them): by leaf index and whether a checkpoint covers it yet, so a retry
    or a replay after a checkpoint carries the proof. At most `size` kept."""

    def __init__(self, tlog: TransparencyLog, size: int = 4096) -> None:
        self.log = tlog
        self.size = size
        self._bodies: OrderedDict[tuple[int, bool], asyncio.Future[bytes]] = OrderedDict()

    async def body(self, event: FeedEvent) -> bytes:
        cp = await self.log.current_checkpoint()
        covering = cp if cp is not None and event.leaf_index < cp.size else None
        key = (event.leaf_index, covering is not None)
        found = self._bodies.get(key)
        if found is None or (found.done() and found.exception() is not None):
            found = asyncio.ensure_future(payload(self.log, event, covering))
            self._bodies[key] = found
            while len(self._bodies) > self.size:
                self._bodies.popitem(last=False)
        return await asyncio.shield(found)


# --- sending ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    result: str  # success | http_error | timeout | refused | blocked | error
    status: int | None
    seconds: float
    error: str | None

    @property
    def ok(self) -> bool:
        return self.result == "success"


RESULTS = ("success", "http_error", "timeout", "refused", "blocked", "error")


# How long a host's checked addresses are used before it is resolved (and checked) again.
RESOLUTION_SECONDS = 30


class CheckedResolver(AbstractResolver):
    """The delivery client's resolver, hence the only place a delivery's addresses come from:
    it resolves a host (the system resolver, `socket.getaddrinfo`), refuses the host when any
    address is refused (`refused_address`; WebhookRefused), and hands the connector only the
    addresses it checked. A connection goes to one of those: a DNS answer that changes between
    a check and a connection (DNS rebinding) never reaches an unchecked address. With
    `allow_private`, nothing is refused."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._system = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._system.resolve(host, port, family)
        if not self.allow_private:
            for result in found:
                refuse_address(host, result["host"])
        return found

    async def close(self) -> None:
        await self._system.close()


class DeliveryClient:
    """The HTTP client deliveries are POSTed with (aiohttp): addresses only from
    CheckedResolver (an IP-literal host, which needs no resolution, is checked as it is), no
    redirects, no proxies from the environment, no cookies kept, at most MAX_RESPONSE_BYTES of
    a response read, `timeout` for a whole exchange. Requires a running event loop."""

    def __init__(self, timeout: float, allow_private: bool) -> None:
        self.timeout = timeout
        self.allow_private = allow_private
        connector = aiohttp.TCPConnector(
            resolver=CheckedResolver(allow_private),
            ttl_dns_cache=RESOLUTION_SECONDS,
            limit=256,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=timeout),
            auto_decompress=False,
            trust_env=False,
        )

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> DeliveryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _check_literal(self, url: str) -> None:
        """Raises WebhookRefused for a malformed URL, or one whose host is a refused IP
        literal (the connector does not resolve those, so the resolver never sees them)."""
        host, _ = parse_url(url)
        if self.allow_private:
            return
        try:
            ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return  # a name: CheckedResolver checks what it resolves to
        refuse_address(host, host)

    async def send(self, url: str, headers: Mapping[str, str], body: bytes) -> Outcome:
        """POST one delivery: a 2xx is a success; a redirect, another status, a timeout over
        the whole exchange, a refused connection are failures. At most MAX_RESPONSE_BYTES of
        the response are read."""
        started = time.perf_counter()
        timeout = self.timeout

        def outcome(result: str, status: int | None, error: str | None) -> Outcome:
            return Outcome(result, status, time.perf_counter() - started, error)

        try:
            async with asyncio.timeout(timeout):
                self._check_literal(url)
                async with self.session.post(
                    url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    status = response.status
                    read = 0
                    while read < MAX_RESPONSE_BYTES:
                        chunk = await response.content.readany()
                        if not chunk:
                            break
                        read += len(chunk)
                    if not response.content.at_eof():
                        response.close()  # the rest is never read: the connection goes
        except TimeoutError:
            return outcome("timeout", None, f"no complete response within {timeout:g} s")
        except WebhookRefused as exc:
            return outcome("blocked", None, exc.message)
        except aiohttp.ClientConnectorDNSError as exc:
            return outcome("refused", None, f"url host does not resolve: {exc.os_error}")
        except aiohttp.ClientConnectorError as exc:
            return outcome("refused", None, f"connection failed: {exc.os_error}")
        except aiohttp.ClientError as exc:
            return outcome("error", None, f"{type(exc).__name__}: {exc}"[:300])
        if 200 <= status < 300:
            return outcome("success", status, None)
        if 300 <= status < 400:
            return outcome("http_error", status, f"HTTP {status}: redirects are not followed")
        return outcome("http_error", status, f"HTTP {status}")


def retry_wait(schedule: tuple[float, ...], tries: int) -> float:
    """The wait after failed try number `tries` (1-based): the schedule's, plus up to 25 %
    of jitter, so that endpoints failing together do not retry together."""
    base = schedule[tries - 1]
    return base * (1.0 + random.uniform(0.0, 0.25))


# --- metrics ------------------------------------------------------------------------------


class WebhookMetrics:
    """Deliveries by result, their latency, and at each scrape endpoints by state and each
    endpoint's backlog (leaves after its cursor), from the dispatcher's last scan."""

    def __init__(self, metrics: Metrics) -> None:
        self.deliveries = Counter(
            "rxledger_webhook_deliveries_total",
            "Webhook delivery attempts by result (success, http_error, timeout, refused, "
            "blocked, error).",
            ["result"],
            registry=metrics.registry,
        )
        self.latency = Histogram(
            "rxledger_webhook_delivery_seconds",
            "Time of one webhook delivery attempt, request to the end of the response.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=metrics.registry,
        )
        self.dispatcher: WebhookDispatcher | None = None
        metrics.add_collector(self)

    def describe(self) -> list[Metric]:
        return [
            GaugeMetricFamily("rxledger_webhook_endpoints", "Webhook endpoints by state."),
            GaugeMetricFamily("rxledger_webhook_backlog", "Leaves after an endpoint's cursor."),
        ]

    def collect(self) -> list[Metric]:
        if self.dispatcher is None:
            return []
        endpoints = self.dispatcher.endpoints
        states = GaugeMetricFamily(
            "rxledger_webhook_endpoints", "Webhook endpoints by state.", labels=["state"]
        )
        counted = [self.dispatcher.state(i) for i in endpoints]
        for state in EndpointState:
            states.add_metric([state.value], float(counted.count(state)))
        backlog = GaugeMetricFamily(
            "rxledger_webhook_backlog", "Leaves after an endpoint's cursor.", labels=["endpoint"]
        )
        for endpoint_id in endpoints:
            backlog.add_metric([endpoint_id], float(self.dispatcher.backlog(endpoint_id)))
        return [states, backlog]


# --- delivery -----------------------------------------------------------------------------


FLUSH_SECONDS = 0.5  # how long a success waits, at most, for its cursor and attempt to be stored


class EndpointWorker:
    """One lease term on one endpoint: acquire, follow and send until the lease is lost, the
    endpoint's generation moves on (a replay, disabling, enabling), it fails, or the process
    stops.

    A success is stored in the background: the next event is sent at once, and the cursor
    and the attempts made since are written together every FLUSH_SECONDS (a crash in between
    repeats those deliveries, with their webhook-ids). A failure is stored before its retry.
    The worker's writes of the delivery state go one at a time (`_write`)."""

    def __init__(self, dispatcher: WebhookDispatcher, endpoint_id: str) -> None:
        self.dispatcher = dispatcher
        self.endpoint_id = endpoint_id
        self.endpoint: Doc = {}
        self.position = -1  # the last leaf index delivered or passed over
        self.stored = -1  # the cursor as stored
        self.count = 0  # attempts numbered so far
        self.pending: list[Doc] = []  # attempts numbered, not yet stored
        # Where the event after the cursor is in the retry schedule, once a try of it failed:
        # {leafIndex, try (the tries made), nextAttemptAt (None after the last)}.
        self.retry: Doc | None = None
        self.sending = False  # a POST is under way: the term does not end in its middle
        self.leaving = False  # handing the endpoint over: the term ends between deliveries
        self._write = asyncio.Lock()

    def leave(self) -> None:
        """End this term between two deliveries (or during a retry's wait, which the next
        holder goes on with) and give the lease up, for another process to take."""
        self.leaving = True

    async def run(self) -> None:
        try:
            await self._term()
        except LostEndpoint as exc:
            log.info("webhooks: %s", exc)
        except PyMongoError as exc:
            log.warning("webhooks: %s: database: %s", self.endpoint_id, database_error(exc))

    async def _held(self, fields: Doc) -> Doc:
        d = self.dispatcher
        async with self._write:
            return await d.store.held(self.endpoint_id, d.holder, fields, d.settings.lease_ttl)

    def _progress(self) -> Doc:
        """What the delivery state keeps of this worker's progress: the cursor, the attempt
        count, and where the next event is in the retry schedule."""
        return {"cursor": self.position, "attempts": self.count, "retry": self.retry}

    async def _flush(self, force: bool = False, failing: Doc | None = None) -> None:
        """Store the cursor, the attempt count, the retry schedule's point and the attempts
        made since the last flush (and extend the lease); nothing when nothing changed, unless
        `force`d. With `failing`, the endpoint is marked FAILING in the same write."""
        d = self.dispatcher
        async with self._write:
            if not (force or self.pending or self.position != self.stored):
                return
            pending, progress = self.pending, self._progress()
            self.pending = []
            if failing is not None:
                progress["failing"] = failing
            # The count first: a crash before the attempts are in leaves a gap in their
            # numbers, never a number used twice.
            await d.store.held(self.endpoint_id, d.holder, progress, d.settings.lease_ttl)
            self.stored = progress["cursor"]
            await d.store.insert_attempts(pending)

    async def _acquire(self) -> bool:
        """Take the lease and the endpoint as it stands; apply a replay asked for since the
        last term. False when someone else holds it, or it is not to be delivered to."""
        d = self.dispatcher
        delivery = await d.store.acquire(self.endpoint_id, d.holder, d.settings.lease_ttl)
        if delivery is None:
            return False
        endpoint = await d.store.endpoint(self.endpoint_id)
        if endpoint is None:
            return False
        generation = int(endpoint["generation"])
        if delivery.get("generation") != generation:
            fields: Doc = {"generation": generation, "failing": None, "retry": None}
            replay = endpoint.get("replay")
            if replay is not None and int(replay["generation"]) > int(delivery["replayed"]):
                fields.update(cursor=int(replay["after"]), replayed=int(replay["generation"]))
            delivery = await self._held(fields)
        self.endpoint = endpoint
        self.position = self.stored = int(delivery["cursor"])
        self.count = int(delivery.get("attempts", 0))
        self.retry = delivery.get("retry")
        return state_of(endpoint, delivery) is EndpointState.ACTIVE

    async def _term(self) -> None:
        d = self.dispatcher
        acquired = await self._acquire()
        if not acquired:
            async with self._write:
                await d.store.release(self.endpoint_id, d.holder, {})
            return
        log.info("webhooks: acquire %s from leaf %d", self.endpoint_id, self.position + 1)
        delivery = asyncio.create_task(self._follow(), name=f"webhook-{self.endpoint_id}")
        renewed = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({delivery}, timeout=FLUSH_SECONDS)
                if done:
                    break
                if self.leaving and not self.sending:
                    log.info("webhooks: %s handed over at leaf %d", self.endpoint_id, self.position)
                    break
                renew = time.monotonic() - renewed >= d.settings.lease_ttl / 3
                await self._flush(force=renew)
                if not renew:
                    continue
                renewed = time.monotonic()
                fresh = await d.store.endpoint(self.endpoint_id)
                if fresh is None or fresh["generation"] != self.endpoint["generation"]:
                    log.info("webhooks: %s changed; starting afresh", self.endpoint_id)
                    break
        finally:
            delivery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await delivery
                except LostEndpoint as exc:
                    log.info("webhooks: %s", exc)
                except PyMongoError as exc:
                    log.warning("webhooks: %s: database: %s", self.endpoint_id, database_error(exc))
                except Exception as exc:
                    log.error(
                        "webhooks: %s: unexpected %s\n%s",
                        self.endpoint_id,
                        type(exc).__name__,
                        frames(exc),
                    )
            with contextlib.suppress(PyMongoError, LostEndpoint):
                await self._flush()
                async with self._write:
                    await d.store.release(self.endpoint_id, d.holder, self._progress())

    async def _follow(self) -> None:
        d = self.dispatcher
        match = EndpointFilter.of(self.endpoint.get("filter")).matcher(
            d.tags, self.endpoint_id, str(self.endpoint["organization"])
        )
        while True:
            try:
                async for event in d.feed.stream(self.position + 1):
                    if self.leaving:
                        return
                    if match(event) and not await self._deliver(event):
                        return
                    self.position = event.leaf_index
            except StreamEnded:
                continue  # left behind the window while retrying: read on from the database

    async def _current_endpoint(self) -> Doc:
        """The endpoint as read at most 2 × the scan interval ago (`WebhookDispatcher.endpoint`);
        raises LostEndpoint when a replay, disabling or enabling moved it on."""
        fresh = await self.dispatcher.endpoint(self.endpoint_id)
        if fresh is None or fresh["generation"] != self.endpoint["generation"]:
            raise LostEndpoint(f"{self.endpoint_id} changed; starting afresh")
        self.endpoint = fresh
        return fresh

    async def _deliver(self, event: FeedEvent) -> bool:
        """Send one event until a 2xx (True) or the last retry fails (False, FAILING)."""
        d = self.dispatcher
        message_id = webhook_id(self.endpoint_id, event.leaf_index)
        tries = await self._resume(event.leaf_index)
        while True:
            tries += 1
            endpoint, body = await asyncio.gather(self._current_endpoint(), d.payloads.body(event))
            at = _now()
            secrets = live_secrets(d.box, endpoint, at)
            headers = {
                "content-type": "application/json",
                "user-agent": USER_AGENT,
                "webhook-id": message_id,
                "webhook-timestamp": str(int(at.timestamp())),
                "webhook-signature": sign(secrets, message_id, at, body),
            }
            if not secrets:
                outcome = Outcome("error", None, 0.0, "no secret can sign: rotate the secret")
            else:
                self.sending = True
                try:
                    outcome = await d.client.send(str(endpoint["url"]), headers, body)
                finally:
                    self.sending = False
            d.metrics.deliveries.labels(result=outcome.result).inc()
            d.metrics.latency.observe(outcome.seconds)
            last = tries > len(d.settings.retry_schedule)
            wait = None if outcome.ok or last else retry_wait(d.settings.retry_schedule, tries)
            self.count += 1
            self.pending.append(
                {
                    "_id": f"{self.endpoint_id}:{self.count}",
                    "endpoint": self.endpoint_id,
                    "n": self.count,
                    "holder": d.holder,
                    "leafIndex": event.leaf_index,
                    "webhookId": message_id,
                    "try": tries,
                    "at": at,
                    "httpStatus": outcome.status,
                    "latencyMs": round(outcome.seconds * 1000, 3),
                    "result": outcome.result,
                    "error": outcome.error,
                    "nextAttemptAt": None if wait is None else at + dt.timedelta(seconds=wait),
                }
            )
            if outcome.ok:
                self.position = event.leaf_index
                self.retry = None
                return True
            self.retry = {
                "leafIndex": event.leaf_index,
                "try": tries,
                "nextAttemptAt": self.pending[-1]["nextAttemptAt"],
            }
            if wait is None:
                log.warning(
                    "webhooks: %s FAILING at leaf %d after %d tries: %s",
                    self.endpoint_id,
                    event.leaf_index,
                    tries,
                    outcome.error,
                )
                await self._flush(
                    failing={"since": _now(), "error": outcome.error or outcome.result}
                )
                return False
            # Stored before the wait: whoever holds the endpoint next goes on from here.
            await self._flush()
            await asyncio.sleep(wait)

    async def _resume(self, leaf_index: int) -> int:
        """The tries of the event at `leaf_index` made already (0 for a new one): a previous
        holder's point in the retry schedule, whose next try waits until it is due."""
        retry = self.retry
        if retry is None or int(retry["leafIndex"]) != leaf_index:
            self.retry = None
            return 0
        due = retry.get("nextAttemptAt")
        if due is not None:
            wait = (_aware(due) - _now()).total_seconds()
            if wait > 0:
                log.info(
                    "webhooks: %s resumes leaf %d at try %d in %.1f s",
                    self.endpoint_id,
                    leaf_index,
                    int(retry["try"]) + 1,
                    wait,
                )
                await asyncio.sleep(wait)
        return int(retry["try"])


class WebhookDispatcher:
    """Each process runs one: it scans the endpoints and delivers to those whose lease it
    takes (one EndpointWorker each)."""

    def __init__(
        self,
        store: WebhookStore,
        tlog: TransparencyLog,
        feed: PrescriptionFeed,
        tags: Tags,
        settings: WebhookSettings,
        metrics: WebhookMetrics,
        derived: DerivedKeys,
    ) -> None:
        """`derived`: the keys derived from the log's key (Settings.derived_keys)."""
        self.store = store
        self.log = tlog
        self.feed = feed
        self.tags = tags
        self.settings = settings
        self.metrics = metrics
        self.box = SecretBox.for_log(settings, derived)
        self.payloads = Payloads(tlog)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # As of the last scan (begun at `scanned_at`, time.monotonic()): each endpoint and its
        # delivery state.
        self.scanned_at = -math.inf
        self.endpoints: dict[str, Doc] = {}
        self.deliveries: dict[str, Doc] = {}
        self.workers: dict[str, tuple[EndpointWorker, asyncio.Task[None]]] = {}
        self.client = DeliveryClient(settings.timeout, settings.allow_private)
        self._wakeup = asyncio.Event()
        metrics.dispatcher = self

    def wake(self) -> None:
        """Scan now (an endpoint was created, replayed or enabled here)."""
        self._wakeup.set()

    @property
    def freshness(self) -> float:
        """How old, at most, an endpoint a delivery is signed by may be (seconds): a rotated
        secret signs on every process once this long has passed (rotateWebhookSecret waits
        that long before it answers)."""
        return 2 * self.settings.scan_interval

    async def endpoint(self, endpoint_id: str) -> Doc | None:
        """The endpoint as the last scan read it, if that read began less than `freshness`
        ago; else read now. Every process scans anyway: a delivery costs no read of its own."""
        if time.monotonic() - self.scanned_at < self.freshness and endpoint_id in self.endpoints:
            return self.endpoints[endpoint_id]
        return await self.store.endpoint(endpoint_id)

    def state(self, endpoint_id: str) -> EndpointState:
        return state_of(self.endpoints[endpoint_id], self.deliveries.get(endpoint_id))

    def backlog(self, endpoint_id: str) -> int:
        """Leaves after the endpoint's cursor, as of the last scan and the tail's position."""
        delivery = self.deliveries.get(endpoint_id)
        position = self.feed.tail.position
        if delivery is None or position is None:
            return 0
        return max(0, position - 1 - int(delivery.get("cursor", -1)))

    def failing(self) -> list[str]:
        return sorted(i for i in self.endpoints if self.state(i) is EndpointState.FAILING)

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            while not stopping.is_set():
                try:
                    await self.scan()
                except PyMongoError as exc:
                    log.warning("webhooks: scan: database: %s", database_error(exc))
                except Exception as exc:
                    # Never stop silently: every endpoint's events would wait unseen.
                    log.error("webhooks: scan: unexpected %s\n%s", type(exc).__name__, frames(exc))
                waits = [
                    asyncio.ensure_future(self._wakeup.wait()),
                    asyncio.ensure_future(stopping.wait()),
                ]
                await asyncio.wait(
                    waits, timeout=self.settings.scan_interval, return_when=asyncio.FIRST_COMPLETED
                )
                for w in waits:
                    w.cancel()
                self._wakeup.clear()
        finally:
            for _, task in self.workers.values():
                task.cancel()
            for _, task in self.workers.values():
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.client.close()
            with contextlib.suppress(PyMongoError):
                await self.store.forget_holder(self.holder)

    @property
    def heartbeat_ttl(self) -> float:
        """How long this process counts as delivering after its last scan began."""
        return max(self.settings.lease_ttl, 3 * self.settings.scan_interval)

    async def scan(self) -> None:
        began = time.monotonic()
        await self.store.heartbeat(self.holder, self.heartbeat_ttl)
        endpoints = await self.store.every_endpoint()
        deliveries = await self.store.every_delivery()
        holders = await self.store.every_holder()
        self.scanned_at = began
        self.endpoints = {str(d["_id"]): d for d in endpoints}
        self.deliveries = {str(d["_id"]): d for d in deliveries}
        now = _now()
        active = [
            endpoint_id
            for endpoint_id, endpoint in self.endpoints.items()
            if endpoint_id in self.deliveries
            and state_of(endpoint, self.deliveries[endpoint_id]) is EndpointState.ACTIVE
        ]
        share = fair_share(len(active), await self._live(holders, now))
        running = {i: w for i, (w, task) in self.workers.items() if not task.done()}
        self._hand_over(running, share)
        held = len(running)
        for endpoint_id in active:
            if held >= share:
                break
            if endpoint_id in running:
                continue
            delivery = self.deliveries[endpoint_id]
            holder, expires = delivery.get("leaseHolder"), delivery.get("leaseExpiresAt")
            if holder not in (None, self.holder) and expires is not None and _aware(expires) > now:
                continue  # another process delivers to it
            worker = EndpointWorker(self, endpoint_id)
            task = asyncio.create_task(worker.run(), name=f"webhook-lease-{endpoint_id}")
            self.workers[endpoint_id] = (worker, task)
            held += 1

    async def _live(self, holders: list[Doc], now: dt.datetime) -> int:
        """How many processes deliver, this one included, by their heartbeats; forgets those
        silent for long (a process that stopped without saying so)."""
        live = {self.holder}
        for doc in holders:
            expires = _aware(doc["expiresAt"])
            if expires > now:
                live.add(str(doc["_id"]))
            elif now - expires > dt.timedelta(seconds=FORGET_AFTER * self.heartbeat_ttl):
                await self.store.forget_holder(str(doc["_id"]))
        return len(live)

    def _hand_over(self, running: dict[str, EndpointWorker], share: int) -> None:
        """Ask as many workers as this process holds endpoints beyond its share to leave
        (the last in id order, those not leaving already)."""
        staying = sorted(i for i, w in running.items() if not w.leaving)
        for endpoint_id in staying[share:]:
            log.info("webhooks: %s above this process's share of %d", endpoint_id, share)
            running[endpoint_id].leave()


FORGET_AFTER = 10  # heartbeats silent this many times their ttl are deleted


def fair_share(endpoints: int, processes: int) -> int:
    """The most endpoints one of `processes` live delivering processes holds: an even split,
    rounded up (so that together they hold every one)."""
    return math.ceil(endpoints / max(1, processes))
