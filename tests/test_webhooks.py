"""Partner webhooks with real parts: gateway processes (uvicorn) over the suite's MongoDB-protocol
server, and a receiver under a real uvicorn on loopback that verifies every delivery with
`standardwebhooks.Webhook.verify` (tests/webhook_receiver.py). Each test has a database of its
own, so leaf indices are the test's. Every wait is bounded; nothing sleeps before asserting
that something did not happen."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidTag
from test_subscriptions import Gateway, graphql, http_client, issue
# The fixture that starts gateway processes over the test's database, under its own name here.
from test_subscriptions import start_gateway as start_gateway_fixture  # noqa: F401
from webhook_receiver import Receiver

from anchoring.encoding import unb64
from anchoring.hashing import leaf_hash
from anchoring.note import parse_verifier_key
from anchoring.receipt import open_receipt
from app.auth import Role, Viewer
from app.feed import FeedEvent, event_filter
from app.policy import Tags
from app.webhooks import (
    EndpointFilter,
    SecretBox,
    WebhookRefused,
    new_secret,
    parse_url,
    refused_address,
)

FAST = {
    "RXLEDGER_WEBHOOK_ALLOW_PRIVATE": "1",
    "RXLEDGER_WEBHOOK_LEASE_TTL": "2",
    "RXLEDGER_WEBHOOK_SCAN_INTERVAL": "0.2",
    "RXLEDGER_WEBHOOK_TIMEOUT": "5",
    "RXLEDGER_WEBHOOK_RETRY_SCHEDULE": "0.2,0.2,0.4,0.4,0.8,0.8,1.6,1.6,3.2,3.2",
}

CREATE = """mutation($url: String!, $filter: WebhookFilterInput, $org: String, $d: String) {
  createWebhookEndpoint(url: $url, filter: $filter, organization: $org, description: $d) {
    __typename
    ... on WebhookEndpointCreated { secret endpoint { id organization state lastDeliveredLeafIndex } }
    ... on Error { message }
  }
}"""

ENDPOINT_FIELDS = "id state lastDeliveredLeafIndex attempts failingSince lastError"

DELIVERIES = """query($id: ID!, $first: Int, $after: String) {
  webhookDeliveries(endpointId: $id, first: $first, after: $after) {
    nodes { number webhookId leafIndex attempt at httpStatus latencyMs result error nextAttemptAt }
    pageInfo { hasNextPage endCursor }
  }
}"""

ROTATE = """mutation($id: ID!, $grace: Int) {
  rotateWebhookSecret(endpointId: $id, graceSeconds: $grace) {
    __typename
    ... on WebhookSecretRotated { secret previousSecretsExpireAt }
    ... on Error { message }
  }
}"""

REPLAY = f"""mutation($id: ID!, $after: Int!) {{
  replayWebhooks(endpointId: $id, afterLeafIndex: $after) {{
    __typename ... on WebhookEndpoint {{ {ENDPOINT_FIELDS} }} ... on Error {{ message }}
  }}
}}"""

STEP = """mutation($id: ID!, $v: Int!) {
  %s(id: $id, expectedVersion: $v%s) { __typename ... on Prescription { version } ... on Error { message } }
}"""


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


async def create_endpoint(
    client: httpx.AsyncClient,
    gw: Gateway,
    receiver: Receiver,
    name: str,
    token: str,
    **variables: Any,
) -> tuple[str, str]:
    """Create an endpoint at the receiver's path `name`; its id and secret (which the receiver
    then verifies deliveries with)."""
    data = await graphql(client, gw, CREATE, token, url=receiver.url(name), **variables)
    created = data["createWebhookEndpoint"]
    assert created["__typename"] == "WebhookEndpointCreated", created
    assert created["secret"].startswith("whsec_")
    receiver.secrets[name] = [created["secret"]]
    return created["endpoint"]["id"], created["secret"]


async def step(
    client: httpx.AsyncClient,
    gw: Gateway,
    token: str,
    mutation: str,
    rx: str,
    v: int,
    extra: str = "",
) -> None:
    data = await graphql(client, gw, STEP % (mutation, extra), token, id=rx, v=v)
    assert data[mutation]["__typename"] == "Prescription", data


async def lifecycle(client: httpx.AsyncClient, gw: Gateway, pharmacy: str, patient: str) -> str:
    """Issue, dispense, hand to courier-co, deliver, confirm: five events, versions 1 to 5."""
    rx = await issue(client, gw, pharmacy=pharmacy, patient=patient)
    pharmacist = gw.token("PHARMACIST", f"pharm-{pharmacy}", pharmacy)
    await step(client, gw, pharmacist, "dispensePrescription", rx, 1)
    await step(
        client,
        gw,
        pharmacist,
        "handToCourier",
        rx,
        2,
        ', courier: "c-1", courierOrganization: "courier-co"',
    )
    await step(client, gw, gw.token("COURIER", "c-1", "courier-co"), "deliverPrescription", rx, 3)
    await step(client, gw, gw.token("PATIENT", patient), "confirmReceipt", rx, 4)
    return rx


STATUS_AT_VERSION = {1: "ISSUED", 2: "DISPENSED", 3: "IN_TRANSIT", 4: "DELIVERED", 5: "CONFIRMED"}


async def deliveries(
    client: httpx.AsyncClient, gw: Gateway, token: str, endpoint: str, first: int = 100
) -> list[dict[str, Any]]:
    """Every attempt of `endpoint`, oldest first, paging through webhookDeliveries."""
    out: list[dict[str, Any]] = []
    after = None
    while True:
        page = (
            await graphql(client, gw, DELIVERIES, token, id=endpoint, first=first, after=after)
        )["webhookDeliveries"]
        out.extend(page["nodes"])
        if not page["pageInfo"]["hasNextPage"]:
            return out[::-1]
        after = page["pageInfo"]["endCursor"]


def assert_in_order_without_gaps(got: list[Any], want: list[tuple[str, int]]) -> None:
    """Accepted deliveries in leaf order, each event of `want` (prescription, version) once."""
    indices = [r.leaf_index for r in got]
    assert indices == sorted(indices), "deliveries out of leaf order"
    assert len(indices) == len(set(indices)), "an event accepted twice"
    events = [(r.payload["data"]["prescriptionId"], r.payload["data"]["version"]) for r in got]
    assert sorted(events) == sorted(want)


# --- routing and safety, without a gateway ------------------------------------------------


def test_an_endpoint_is_routed_exactly_as_a_partner_subscriber_of_its_organization():
    tags = Tags(b"k" * 32)
    partner = Viewer("p-1", Role.PARTNER, "ph-A")
    for filt in (
        EndpointFilter(),
        EndpointFilter(statuses=("DELIVERED",)),
        EndpointFilter(pharmacy="ph-A"),
    ):
        webhook = filt.matcher(tags, "whep_x", "ph-A")
        subscriber = event_filter(
            tags, partner, pharmacy=filt.pharmacy, statuses=list(filt.statuses) or None
        )
        for pharmacy in ("ph-A", "ph-B"):
            for courier_org in (None, "ph-A", "courier-co"):
                for status in ("ISSUED", "DELIVERED"):
                    event = FeedEvent(
                        0,
                        b"{}",
                        None,
                        "rx-1",
                        1,
                        status,
                        "t",
                        {
                            "status": status,
                            "pharmacy": pharmacy,
                            "courierOrganization": courier_org,
                            "patient": "h",
                            "prescriber": "d",
                            "courier": None,
                        },
                    )
                    assert webhook(event) == subscriber(event), (filt, event.tags)


def test_refused_addresses_cover_loopback_private_link_local_and_metadata():
    for address in (
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "172.16.5.4",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "::1",
        "fd00:ec2::254",
        "fe80::1",
        "::ffff:127.0.0.1",
        "224.0.0.1",
    ):
        assert refused_address(address), address
    for address in ("93.184.215.14", "2606:4700::1111"):
        assert not refused_address(address), address


def test_urls_other_than_absolute_http_without_credentials_are_invalid():
    for url in (
        "ftp://example.com/x",
        "example.com/hook",
        "http:///nohost",
        "https://user:pw@example.com/",
        "https://example.com/#frag",
        "https://example.com/" + "a" * 3000,
        "http://example.com:99999/",
    ):
        with pytest.raises(WebhookRefused) as caught:
            parse_url(url)
        assert caught.value.kind == "InvalidWebhookUrl", url
    assert parse_url("https://hooks.example.com/rx") == ("hooks.example.com", 443)


def test_a_sealed_secret_opens_only_under_its_key_for_its_endpoint():
    box = SecretBox(b"1" * 32)
    secret = new_secret()
    sealed = box.seal("whep_a", secret)
    assert secret.encode() not in bytes(sealed["sealed"])
    assert box.open("whep_a", sealed) == secret
    with pytest.raises(InvalidTag):
        box.open("whep_b", sealed)
    with pytest.raises(InvalidTag):
        SecretBox(b"2" * 32).open("whep_a", sealed)


# --- delivery -----------------------------------------------------------------------------


async def test_the_lifecycle_of_50_prescriptions_reaches_three_filtered_endpoints_in_order(
    start_gateway_fixture, receiver
):
    gw = await start_gateway_fixture(**FAST)
    async with http_client(8) as client:
        partner_a = gw.token("PARTNER", "partner-a", "ph-A")
        couriers = gw.token("PARTNER", "partner-courier", "courier-co")
        admin = gw.token("ADMIN", "admin-1")
        every_a, _ = await create_endpoint(client, gw, receiver, "pharmacy-a", partner_a)
        delivered, _ = await create_endpoint(
            client,
            gw,
            receiver,
            "courier-delivered",
            couriers,
            filter={"status": ["DELIVERED"]},
        )
        early_b, _ = await create_endpoint(
            client,
            gw,
            receiver,
            "pharmacy-b-early",
            admin,
            org="ph-B",
            filter={"status": ["ISSUED", "DISPENSED"]},
        )
        pharmacies = {}
        queue = list(range(50))

        async def worker() -> None:
            while queue:
                i = queue.pop()
                pharmacy = "ph-A" if i % 2 == 0 else "ph-B"
                pharmacies[await lifecycle(client, gw, pharmacy, f"pt-{i}")] = pharmacy

        await asyncio.gather(*(worker() for _ in range(8)))

    want = {
        "pharmacy-a": [
            (rx, v) for rx, ph in pharmacies.items() if ph == "ph-A" for v in range(1, 6)
        ],
        "courier-delivered": [(rx, 4) for rx in pharmacies],
        "pharmacy-b-early": [
            (rx, v) for rx, ph in pharmacies.items() if ph == "ph-B" for v in (1, 2)
        ],
    }
    for name, events in want.items():
        await receiver.wait_until(
            lambda n=name, e=events: len(receiver.accepted(n)) >= len(e),
            f"{len(events)} deliveries to {name}",
        )
    ledger = (await graphql(http_client(), gw, "{ ledger { verifierKey origin } }"))["ledger"]
    verifier = parse_verifier_key(ledger["verifierKey"])
    for name, events in want.items():
        got = receiver.accepted(name)
        assert_in_order_without_gaps(got, events)
        for r in got:
            data = r.payload["data"]
            assert r.payload["type"] == "prescription." + STATUS_AT_VERSION[data["version"]].lower()
            assert data["status"] == STATUS_AT_VERSION[data["version"]]
            assert r.webhook_id.endswith(f"_{data['leafIndex']}")
            # The receipt is the log's signature over this very leaf at this index.
            receipt = open_receipt(data["receipt"]["note"], [verifier], ledger["origin"])
            assert receipt.leaf_index == data["leafIndex"]
            assert receipt.leaf_hash == leaf_hash(unb64(data["leaf"]))
            # No personal data: the leaf and the change carry none.
            assert "Patient" not in r.body.decode()
    # Every delivery verified with the endpoint's secret, and nothing unverified arrived.
    assert all(r.verified_by == [0] for r in receiver.received)
    async with http_client() as client:
        attempts = await deliveries(client, gw, partner_a, every_a)
    assert [a["result"] for a in attempts] == ["success"] * len(want["pharmacy-a"])
    assert [a["number"] for a in attempts] == list(range(1, len(attempts) + 1))
