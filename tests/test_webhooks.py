"""Partner webhooks with real parts: gateway processes (uvicorn) over the suite's MongoDB-protocol
server, and a receiver under a real uvicorn on loopback that verifies every delivery with
`standardwebhooks.Webhook.verify` (tests/webhook_receiver.py). Each test has a database of its
own, so leaf indices are the test's. Every wait is bounded; nothing sleeps before asserting
that something did not happen."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import test_subscriptions
import uvicorn
from cryptography.exceptions import InvalidTag
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from test_gateway import ROOT, env_for
from test_subscriptions import Gateway, graphql, http_client, issue
from webhook_receiver import Receiver, free_port

import app.webhooks
from anchoring.encoding import unb64
from anchoring.hashing import leaf_hash
from anchoring.note import parse_verifier_key
from anchoring.receipt import open_receipt
from app.auth import Role, Viewer
from app.feed import FeedEvent, event_filter
from app.policy import Tags
from app.webhooks import (
    DeliveryClient,
    EndpointFilter,
    SecretBox,
    WebhookRefused,
    event_type,
    live_secrets,
    new_secret,
    parse_url,
    refused_address,
)

# The fixture that starts gateway processes over the test's database (tests/test_subscriptions.py).
start_gateway = test_subscriptions.start_gateway

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


def test_an_event_is_typed_by_the_status_it_moved_to_or_else_by_its_own_type():
    def event(kind: str, status: str) -> FeedEvent:
        return FeedEvent(0, b"{}", None, "rx-1", 2, kind, "t", {"status": status})

    assert event_type(event("HANDED_TO_COURIER", "IN_TRANSIT")) == "prescription.in_transit"
    assert event_type(event("RECEIPT_CONFIRMED", "CONFIRMED")) == "prescription.confirmed"
    # An erasure leaves the status where it was: it is not another "delivered".
    erased = event("PERSONAL_DATA_ERASED", "DELIVERED")
    assert event_type(erased) == "prescription.personal_data_erased"


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
    # Under a changed key, the endpoint has no secret that signs (its deliveries fail, named).
    endpoint = {"_id": "whep_a", "secrets": [sealed]}
    now = dt.datetime.now(dt.UTC)
    assert live_secrets(box, endpoint, now) == [secret]
    assert live_secrets(SecretBox(b"2" * 32), endpoint, now) == []


# --- delivery -----------------------------------------------------------------------------


async def test_the_lifecycle_of_50_prescriptions_reaches_three_filtered_endpoints_in_order(
    start_gateway, receiver
):
    gw = await start_gateway(**FAST)
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
        attempts = await wait_for_attempts(
            client, gw, partner_a, every_a, "success", len(want["pharmacy-a"])
        )
    assert [a["result"] for a in attempts] == ["success"] * len(want["pharmacy-a"])
    assert [a["number"] for a in attempts] == list(range(1, len(attempts) + 1))


ENDPOINTS = f"{{ webhookEndpoints {{ {ENDPOINT_FIELDS} }} }}"


async def endpoint_state(client: httpx.AsyncClient, gw: Gateway, token: str, endpoint: str) -> dict:
    found = (await graphql(client, gw, ENDPOINTS, token))["webhookEndpoints"]
    return next(e for e in found if e["id"] == endpoint)


async def wait_for_state(
    client: httpx.AsyncClient, gw: Gateway, token: str, endpoint: str, state: str
) -> dict:
    deadline = time.monotonic() + 60
    while (found := await endpoint_state(client, gw, token, endpoint))["state"] != state:
        assert time.monotonic() < deadline, f"endpoint {endpoint} is {found}, want {state}"
        await asyncio.sleep(0.1)
    return found


async def wait_for_attempts(
    client: httpx.AsyncClient, gw: Gateway, token: str, endpoint: str, result: str, count: int
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60
    while True:
        attempts = await deliveries(client, gw, token, endpoint)
        if sum(a["result"] == result for a in attempts) >= count:
            return attempts
        assert time.monotonic() < deadline, f"want {count} attempts {result}, have {attempts}"
        await asyncio.sleep(0.1)


def one_id_per_event(received: list[Any]) -> None:
    """Every request for one event carried the same webhook-id, and events differ in it."""
    ids: dict[int, set[str]] = {}
    for r in received:
        if r.payload is not None:
            ids.setdefault(r.leaf_index, set()).add(r.webhook_id)
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len({next(iter(v)) for v in ids.values()}) == len(ids)


SCHEDULE = (0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0)


async def test_a_receiver_that_errs_times_out_and_refuses_gets_every_event_in_order_once_it_recovers(
    start_gateway, receiver
):
    gw = await start_gateway(
        **{
            **FAST,
            "RXLEDGER_WEBHOOK_TIMEOUT": "1",
            "RXLEDGER_WEBHOOK_RETRY_SCHEDULE": ",".join(map(str, SCHEDULE)),
        }
    )
    partner = gw.token("PARTNER", "partner-a", "ph-A")
    async with http_client(2) as client:
        endpoint, _ = await create_endpoint(client, gw, receiver, "flaky", partner)
        receiver.mode = "error"
        issued = [await issue(client, gw, pharmacy="ph-A", patient=f"pt-{i}") for i in range(3)]
        await wait_for_attempts(client, gw, partner, endpoint, "http_error", 2)
        receiver.mode, receiver.slow_seconds = "slow", 2.5
        await wait_for_attempts(client, gw, partner, endpoint, "timeout", 2)
        await receiver.stop()
        await wait_for_attempts(client, gw, partner, endpoint, "refused", 2)
        receiver.mode = "ok"
        await receiver.start()
        await receiver.wait_until(lambda: len(receiver.accepted("flaky")) >= 3, "3 deliveries")
        attempts = await wait_for_attempts(client, gw, partner, endpoint, "success", 3)

    accepted = receiver.accepted("flaky")
    assert_in_order_without_gaps(accepted, [(rx, 1) for rx in issued])
    one_id_per_event(receiver.of("flaky"))
    # The first event was tried until it was accepted; the others waited behind it.
    first = [a for a in attempts if a["leafIndex"] == accepted[0].leaf_index]
    assert [a["attempt"] for a in first] == list(range(1, len(first) + 1))
    results = [a["result"] for a in first]
    assert results[-1] == "success" and results.count("success") == 1
    phases = [r for i, r in enumerate(results) if i == 0 or results[i - 1] != r]
    assert [p for p in phases if p != "error"] == ["http_error", "timeout", "refused", "success"]
    assert all(a["webhookId"] == first[0]["webhookId"] for a in first)
    later = [a for a in attempts if a["leafIndex"] != accepted[0].leaf_index]
    assert min(a["number"] for a in later) > max(a["number"] for a in first)
    # The backoff: each retry waited at least the schedule's wait, at most it plus 25 % jitter
    # (and the time the try itself took).
    for before, after in zip(first, first[1:], strict=False):
        wait = SCHEDULE[before["attempt"] - 1]
        start, planned = (
            dt.datetime.fromisoformat(before["at"]),
            dt.datetime.fromisoformat(before["nextAttemptAt"]),
        )
        assert wait <= (planned - start).total_seconds() <= wait * 1.25 + 0.01
        assert dt.datetime.fromisoformat(after["at"]) >= planned
    assert first[-1]["nextAttemptAt"] is None
    assert [a["httpStatus"] for a in first if a["result"] == "http_error"] == [500] * results.count(
        "http_error"
    )


async def test_after_the_last_try_the_endpoint_fails_and_a_replay_resends_with_proofs(
    start_gateway, receiver, tmp_path
):
    gw = await start_gateway(
        **{**FAST, "RXLEDGER_WEBHOOK_RETRY_SCHEDULE": "0.1,0.1", "RXLEDGER_WEBHOOK_TIMEOUT": "2"}
    )
    partner = gw.token("PARTNER", "partner-a", "ph-A")
    async with http_client(2) as client:
        endpoint, _ = await create_endpoint(client, gw, receiver, "failing", partner)
        receiver.mode = "error"
        issued = [await issue(client, gw, pharmacy="ph-A", patient=f"pt-{i}") for i in range(2)]
        failing = await wait_for_state(client, gw, partner, endpoint, "FAILING")
        assert failing["lastError"] == "HTTP 500" and failing["failingSince"]
        attempts = await deliveries(client, gw, partner, endpoint)
        # Three tries of the first event, none of the second: it waits behind the first.
        assert [(a["attempt"], a["result"]) for a in attempts] == [
            (1, "http_error"),
            (2, "http_error"),
            (3, "http_error"),
        ]
        assert attempts[-1]["nextAttemptAt"] is None
        # /readyz and the gauges say what the last scan of the endpoints found (each scan
        # interval): still ready, the endpoint listed.
        deadline = time.monotonic() + 10
        while (ready := httpx.get(f"{gw.base}/readyz")).json()["failingWebhookEndpoints"] == []:
            assert time.monotonic() < deadline, "the failing endpoint never reached /readyz"
            await asyncio.sleep(0.05)
        assert ready.status_code == 200 and ready.json()["failingWebhookEndpoints"] == [endpoint]
        metrics = httpx.get(f"{gw.base}/metrics").text
        assert 'rxledger_webhook_deliveries_total{result="http_error"} 3.0' in metrics
        assert 'rxledger_webhook_endpoints{state="FAILING"} 1.0' in metrics
        assert f'rxledger_webhook_backlog{{endpoint="{endpoint}"}}' in metrics

        # Once a checkpoint covers both events, a replay from the start carries their proofs.
        ledger = (await graphql(client, gw, "{ ledger { size verifierKey checkpoint { size } } }"))[
            "ledger"
        ]
        while ledger["checkpoint"] is None or ledger["checkpoint"]["size"] < ledger["size"]:
            await asyncio.sleep(0.1)
            ledger = (
                await graphql(client, gw, "{ ledger { size verifierKey checkpoint { size } } }")
            )["ledger"]
        receiver.mode = "ok"
        replayed = (await graphql(client, gw, REPLAY, partner, id=endpoint, after=-1))[
            "replayWebhooks"
        ]
        assert replayed["__typename"] == "WebhookEndpoint" and replayed["state"] == "ACTIVE"
        await receiver.wait_until(lambda: len(receiver.accepted("failing")) >= 2, "the replay")
        await wait_for_attempts(client, gw, partner, endpoint, "success", 2)
        # Pages of two, newest first, cursors chaining without gaps or repeats.
        numbers, after = [], None
        while True:
            page = (
                await graphql(client, gw, DELIVERIES, partner, id=endpoint, first=2, after=after)
            )["webhookDeliveries"]
            numbers += [n["number"] for n in page["nodes"]]
            if not page["pageInfo"]["hasNextPage"]:
                break
            after = page["pageInfo"]["endCursor"]
        assert numbers == [5, 4, 3, 2, 1]
        metrics = httpx.get(f"{gw.base}/metrics").text
        assert 'rxledger_webhook_deliveries_total{result="success"} 2.0' in metrics

    accepted = receiver.accepted("failing")
    assert_in_order_without_gaps(accepted, [(rx, 1) for rx in issued])
    one_id_per_event(receiver.of("failing"))
    key = tmp_path / "verifier.key"
    key.write_text(ledger["verifierKey"] + "\n")
    for r in accepted:
        bundle = r.payload["data"]["proof"]
        assert bundle is not None and bundle["leafIndex"] == r.leaf_index
        assert bundle["leaf"] == r.payload["data"]["leaf"]
        path = tmp_path / f"bundle-{r.leaf_index}.json"
        path.write_text(json.dumps(bundle))
        verified = subprocess.run(
            [sys.executable, "-m", "app.cli", "verify", str(path), "--key", str(key)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert verified.stdout.startswith(f"OK: leaf {r.leaf_index} is included")


async def test_killing_the_gateway_during_deliveries_then_restarting_misses_nothing(
    start_gateway, receiver
):
    first = await start_gateway(**FAST)
    partner = first.token("PARTNER", "partner-a", "ph-A")
    receiver.delay = 0.05  # deliveries are in flight when the gateway dies
    async with http_client(4) as client:
        await create_endpoint(client, first, receiver, "crash", partner)
        issued = []
        for i in range(30):
            issued.append(await issue(client, first, pharmacy="ph-A", patient=f"pt-{i}"))
        await receiver.wait_until(lambda: len(receiver.accepted("crash")) >= 5, "5 deliveries")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    before = len(receiver.accepted("crash"))
    assert before < 30, "every delivery was made before the kill: nothing was in flight"
    await start_gateway(**FAST)
    await receiver.wait_until(
        lambda: len({r.leaf_index for r in receiver.accepted("crash")}) >= 30,
        "all 30 events after the restart",
    )
    got = receiver.accepted("crash")
    events = {(r.payload["data"]["prescriptionId"], r.payload["data"]["version"]) for r in got}
    assert events == {(rx, 1) for rx in issued}
    # In leaf order, but for repeats of what was in flight: each first arrival is in order.
    seen: list[int] = []
    for r in got:
        if r.leaf_index not in seen:
            seen.append(r.leaf_index)
    assert seen == sorted(seen)
    one_id_per_event(got)


async def test_two_gateways_deliver_each_event_once(start_gateway, receiver):
    gateways = [await start_gateway(**FAST), await start_gateway(**FAST)]
    partner = gateways[0].token("PARTNER", "partner-a", "ph-A")
    names = [f"pair-{i}" for i in range(4)]
    async with http_client(4) as client:
        for name in names:
            await create_endpoint(client, gateways[0], receiver, name, partner)
        issued = [
            await issue(client, gateways[i % 2], pharmacy="ph-A", patient=f"pt-{i}")
            for i in range(20)
        ]
    for name in names:
        await receiver.wait_until(lambda n=name: len(receiver.accepted(n)) >= 20, f"20 to {name}")
    for name in names:
        # The receiver answered every request at once with 200: no retry, so no repeat.
        assert_in_order_without_gaps(receiver.of(name), [(rx, 1) for rx in issued])


async def test_deliveries_during_a_rotation_grace_period_verify_with_either_secret(
    start_gateway, receiver
):
    gw = await start_gateway(**FAST)
    partner = gw.token("PARTNER", "partner-a", "ph-A")
    async with http_client(2) as client:
        endpoint, old = await create_endpoint(client, gw, receiver, "rotating", partner)
        rotated = (await graphql(client, gw, ROTATE, partner, id=endpoint, grace=3))[
            "rotateWebhookSecret"
        ]
        assert rotated["__typename"] == "WebhookSecretRotated", rotated
        new = rotated["secret"]
        assert new != old
        receiver.secrets["rotating"] = [old, new]
        await issue(client, gw, pharmacy="ph-A")
        await receiver.wait_until(lambda: len(receiver.accepted("rotating")) >= 1, "a delivery")
        assert receiver.accepted("rotating")[0].verified_by == [0, 1]
        grace_ends = dt.datetime.fromisoformat(rotated["previousSecretsExpireAt"])
        while dt.datetime.now(dt.UTC) <= grace_ends:
            await asyncio.sleep(0.1)
        await issue(client, gw, pharmacy="ph-A")
        await receiver.wait_until(lambda: len(receiver.accepted("rotating")) >= 2, "a delivery")
        assert receiver.accepted("rotating")[1].verified_by == [1]


async def test_bad_input_is_refused_with_a_typed_error(start_gateway):
    gw = await start_gateway(**{**FAST, "RXLEDGER_WEBHOOK_ALLOW_PRIVATE": "0"})
    partner_a = gw.token("PARTNER", "partner-a", "ph-A")
    partner_b = gw.token("PARTNER", "partner-b", "ph-B")

    async def create(token: str, **variables: Any) -> dict[str, Any]:
        return (await graphql(client, gw, CREATE, token, **variables))["createWebhookEndpoint"]

    async with http_client(2) as client:
        for url in (
            "ftp://hooks.example.com/x",
            "not a url",
            "https://user:pw@93.184.215.14/",
            "https://93.184.215.14/" + "a" * 3000,
        ):
            got = await create(partner_a, url=url)
            assert got["__typename"] == "InvalidWebhookUrl", (url, got)
        for url in (
            "http://127.0.0.1:8080/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.7/",
            "http://[::1]/",
            "http://localhost/",
        ):
            got = await create(partner_a, url=url)
            assert got["__typename"] == "PrivateAddressRefused", (url, got)
            assert "RXLEDGER_WEBHOOK_ALLOW_PRIVATE" in got["message"]
        too_many = {"prescriptionIds": [f"rx-{i}" for i in range(101)]}
        got = await create(partner_a, url="https://93.184.215.14/hook", filter=too_many)
        assert got["__typename"] == "FilterTooLarge" and "101" in got["message"]
        got = await create(
            partner_a, url="https://93.184.215.14/hook", filter={"pharmacy": "p" * 5000}
        )
        assert got["__typename"] == "FilterTooLarge"
        got = await create(partner_a, url="https://93.184.215.14/hook", org="ph-B")
        assert got["__typename"] == "Forbidden"
        got = await create(gw.token("COURIER", "c-1", "courier-co"), url="https://93.184.215.14/")
        assert got["__typename"] == "Forbidden"
        got = await create(gw.token("ADMIN", "admin-1"), url="https://93.184.215.14/")
        assert got["__typename"] == "Forbidden" and "organization" in got["message"]

        created = await create(partner_a, url="https://93.184.215.14/hook")
        assert created["__typename"] == "WebhookEndpointCreated"
        assert created["endpoint"]["organization"] == "ph-A"
        theirs = created["endpoint"]["id"]
        # Another organization's endpoint is not found, whatever is asked of it.
        got = await graphql(client, gw, ROTATE, partner_b, id=theirs, grace=None)
        assert got["rotateWebhookSecret"]["__typename"] == "WebhookEndpointNotFound"
        got = await graphql(client, gw, REPLAY, partner_b, id=theirs, after=-1)
        assert got["replayWebhooks"]["__typename"] == "WebhookEndpointNotFound"
        r = await client.post(
            f"{gw.base}/graphql",
            json={"query": DELIVERIES, "variables": {"id": theirs}},
            headers={"Authorization": f"Bearer {partner_b}"},
        )
        assert r.json()["errors"][0]["extensions"]["code"] == "NOT_FOUND"
        assert (await graphql(client, gw, ENDPOINTS, partner_b))["webhookEndpoints"] == []
        # Out-of-range arguments of one's own endpoint.
        got = await graphql(client, gw, REPLAY, partner_a, id=theirs, after=10**6)
        assert got["replayWebhooks"]["__typename"] == "InvalidInput"
        got = await graphql(client, gw, ROTATE, partner_a, id=theirs, grace=-1)
        assert got["rotateWebhookSecret"]["__typename"] == "InvalidInput"
        admin_sees = await graphql(client, gw, ENDPOINTS, gw.token("ADMIN", "admin-1"))
        assert [e["id"] for e in admin_sees["webhookEndpoints"]] == [theirs]


async def test_a_send_follows_no_redirect_reads_at_most_64_kib_and_names_each_failure():
    hits: list[str] = []

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 65536
            await asyncio.sleep(0)

    async def route(request: Request) -> Response:
        hits.append(request.url.path)
        if request.url.path == "/redirect":
            return Response(status_code=307, headers={"location": "/ok"})
        if request.url.path == "/endless":
            return StreamingResponse(endless())
        return Response(b"{}")

    port = free_port()
    app = Starlette(routes=[Route("/{path}", route, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    try:
        async with (
            DeliveryClient(5.0, allow_private=True) as client,
            DeliveryClient(5.0, allow_private=False) as strict,
        ):

            async def post(url: str, allow_private: bool = True) -> Any:
                return await (client if allow_private else strict).send(url, {}, b"{}")

            assert (await post(f"{base}/ok")).result == "success"
            redirected = await post(f"{base}/redirect")
            assert (redirected.result, redirected.status) == ("http_error", 307)
            assert "redirects are not followed" in redirected.error
            assert hits == ["/ok", "/redirect"]
            # An endless body: accepted on its status, after reading at most 64 KiB of it.
            endless_answer = await post(f"{base}/endless")
            assert endless_answer.result == "success" and endless_answer.seconds < 5
            refused = await post(f"http://127.0.0.1:{free_port()}/ok")
            assert refused.result == "refused"
            blocked = await post(f"{base}/ok", allow_private=False)
            assert blocked.result == "blocked" and "127.0.0.1" in blocked.error
            assert hits == ["/ok", "/redirect", "/endless"]
    finally:
        server.should_exit = True
        await task


DISABLE = f"""mutation($id: ID!) {{
  disableWebhookEndpoint(endpointId: $id) {{
    __typename ... on WebhookEndpoint {{ {ENDPOINT_FIELDS} }} ... on Error {{ message }}
  }}
}}"""
ENABLE = DISABLE.replace("disableWebhookEndpoint", "enableWebhookEndpoint")


async def test_a_disabled_endpoint_gets_its_waiting_events_only_once_enabled(
    start_gateway, receiver
):
    gw = await start_gateway(**FAST)
    partner = gw.token("PARTNER", "partner-a", "ph-A")
    async with http_client(2) as client:
        paused, _ = await create_endpoint(client, gw, receiver, "paused", partner)
        await create_endpoint(client, gw, receiver, "control", partner)
        disabled = (await graphql(client, gw, DISABLE, partner, id=paused))[
            "disableWebhookEndpoint"
        ]
        assert disabled["state"] == "DISABLED"
        rx = await issue(client, gw, pharmacy="ph-A")
        # The event went out: the control endpoint, routed alike, got it.
        await receiver.wait_until(lambda: len(receiver.accepted("control")) == 1, "the control")
        enabling = time.monotonic()
        enabled = (await graphql(client, gw, ENABLE, partner, id=paused))["enableWebhookEndpoint"]
        assert enabled["state"] == "ACTIVE"
        await receiver.wait_until(
            lambda: len(receiver.accepted("paused")) == 1, "the waiting event"
        )
    got = receiver.accepted("paused")[0]
    assert got.payload["data"]["prescriptionId"] == rx
    assert got.at > enabling, "delivered while the endpoint was disabled"
    assert receiver.of("paused") == [got]


class Listener:
    """A real HTTP server on (host, port) that answers 200 and counts the requests it got."""

    def __init__(self, host: str, port: int) -> None:
        self.hits: list[str] = []

        async def route(request: Request) -> Response:
            self.hits.append(request.url.path)
            return Response(b"{}")

        app = Starlette(routes=[Route("/{path}", route, methods=["POST"])])
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        )

    async def __aenter__(self) -> Listener:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            assert not self.task.done(), "the listener did not start"
            await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        await self.task


REAL_GETADDRINFO = socket.getaddrinfo


def rebinding_dns(
    monkeypatch: pytest.MonkeyPatch, name: str, answers: list[list[str]]
) -> list[str]:
    """The process's resolver (socket.getaddrinfo, which every lookup of the gateway goes
    through) answering `name` as a hostile DNS server would: the n-th lookup gets answers[n]
    (the last one ever after). The lookups made, for the test to count."""
    lookups: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if (host.decode() if isinstance(host, bytes) else host) != name:
            return REAL_GETADDRINFO(host, port, *args, **kwargs)
        lookups.append(host)
        addresses = answers[min(len(lookups), len(answers)) - 1]
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, int(port)))
            for a in addresses
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


async def test_a_name_that_rebinds_after_its_check_is_sent_only_to_the_address_checked(
    monkeypatch: pytest.MonkeyPatch,
):
    # No public address is reachable from a test: 127.0.0.2 stands for one (the address policy
    # refuses 127.0.0.1 only), and a real server listens on each address, on one port.
    monkeypatch.setattr(app.webhooks, "refused_address", lambda a: a == "127.0.0.1")
    lookups = rebinding_dns(monkeypatch, "rebinding.test", [["127.0.0.2"], ["127.0.0.1"]])
    port = free_port()
    async with Listener("127.0.0.2", port) as checked, Listener("127.0.0.1", port) as rebound:
        async with DeliveryClient(5.0, allow_private=False) as client:
            for _ in range(3):
                sent = await client.send(f"http://rebinding.test:{port}/hook", {}, b"{}")
                assert sent.result == "success", sent
    assert rebound.hits == [], "a delivery went to an address that was never checked"
    assert checked.hits == ["/hook"] * 3
    assert lookups == ["rebinding.test"], "the name was resolved again after its check"


async def test_a_name_with_any_refused_address_is_not_connected_to_at_all(
    monkeypatch: pytest.MonkeyPatch,
):
    port = free_port()
    async with Listener("127.0.0.1", port) as local:
        # `localhost`, resolved for real: loopback, refused unless private addresses are allowed.
        async with DeliveryClient(5.0, allow_private=False) as client:
            blocked = await client.send(f"http://localhost:{port}/hook", {}, b"{}")
        assert blocked.result == "blocked", blocked
        assert "'localhost' resolves to 127.0.0.1" in blocked.error
        assert "RXLEDGER_WEBHOOK_ALLOW_PRIVATE" in blocked.error
        assert local.hits == []
        # A name answering a public stand-in and a refused address at once: refused whole.
        monkeypatch.setattr(app.webhooks, "refused_address", lambda a: a == "127.0.0.1")
        rebinding_dns(monkeypatch, "mixed.test", [["127.0.0.2", "127.0.0.1"]])
        async with DeliveryClient(5.0, allow_private=False) as client:
            mixed = await client.send(f"http://mixed.test:{port}/hook", {}, b"{}")
        assert mixed.result == "blocked" and "127.0.0.1" in mixed.error, mixed
        assert local.hits == []
        # With RXLEDGER_WEBHOOK_ALLOW_PRIVATE=1 (development, tests), loopback is fine.
        async with DeliveryClient(5.0, allow_private=True) as client:
            allowed = await client.send(f"http://localhost:{port}/hook", {}, b"{}")
        assert allowed.result == "success", allowed
        assert local.hits == ["/hook"]


async def test_a_restart_continues_the_retry_schedule_and_a_failing_endpoint_stays_failing(
    start_gateway, receiver
):
    # Three tries 0.2 s apart, then a wait of 3 s before the fourth and last.
    env = {**FAST, "RXLEDGER_WEBHOOK_RETRY_SCHEDULE": "0.2,0.2,3"}
    first = await start_gateway(**env)
    partner = first.token("PARTNER", "partner-a", "ph-A")
    receiver.mode = "error"
    async with http_client(2) as client:
        endpoint, _ = await create_endpoint(client, first, receiver, "schedule", partner)
        await issue(client, first, pharmacy="ph-A")
        await wait_for_attempts(client, first, partner, endpoint, "http_error", 3)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        second = await start_gateway(**env)
        failing = await wait_for_state(client, second, partner, endpoint, "FAILING")
        attempts = await deliveries(client, second, partner, endpoint)
        # The new process went on with the fourth try, when the third had set it for.
        assert [a["attempt"] for a in attempts] == [1, 2, 3, 4], attempts
        due = dt.datetime.fromisoformat(attempts[2]["nextAttemptAt"])
        assert dt.datetime.fromisoformat(attempts[3]["at"]) >= due
        assert failing["attempts"] == 4 and len(receiver.of("schedule")) == 4

        second.proc.send_signal(signal.SIGKILL)
        second.proc.wait(10)
        third = await start_gateway(**env)
        # Once its scan has found the endpoint failing, the third process leaves it alone.
        deadline = time.monotonic() + 30
        while httpx.get(f"{third.base}/readyz").json()["failingWebhookEndpoints"] != [endpoint]:
            assert time.monotonic() < deadline, "the third process never found it failing"
            await asyncio.sleep(0.05)
        assert (await endpoint_state(client, third, partner, endpoint))["state"] == "FAILING"
        assert len(await deliveries(client, third, partner, endpoint)) == 4
        assert len(receiver.of("schedule")) == 4


async def test_two_gateways_share_the_endpoints_and_one_takes_over_when_the_other_dies(
    start_gateway, receiver, client, db_name
):
    gateways = [await start_gateway(**FAST), await start_gateway(**FAST)]
    partner = gateways[0].token("PARTNER", "partner-a", "ph-A")
    names = [f"share-{i}" for i in range(6)]
    db = client[db_name]

    async def holders() -> dict[str, int]:
        """Endpoints per process holding an unexpired lease."""
        now = dt.datetime.now(dt.UTC)
        held: dict[str, int] = {}
        async for d in db.webhook_deliveries.find({}):
            if d["leaseHolder"] and d["leaseExpiresAt"] > now:
                held[d["leaseHolder"]] = held.get(d["leaseHolder"], 0) + 1
        return held

    async def balanced(want: list[int], what: str) -> dict[str, int]:
        deadline = time.monotonic() + 30
        while sorted((held := await holders()).values()) != want:
            assert time.monotonic() < deadline, f"{what}: leases held {held}, want {want}"
            await asyncio.sleep(0.1)
        return held

    async with http_client(4) as http:
        for name in names:
            await create_endpoint(http, gateways[0], receiver, name, partner)
        # Each process holds its share, ceil(6 / 2) = 3, whoever scanned first.
        sharing = await balanced([3, 3], "two processes")
        issued = [
            await issue(http, gateways[i % 2], pharmacy="ph-A", patient=f"pt-{i}")
            for i in range(10)
        ]
        for name in names:
            await receiver.wait_until(lambda n=name: len(receiver.accepted(n)) >= 10, name)
        # Both delivered: the attempt log (stored within a second) names each attempt's process.
        deadline = time.monotonic() + 30
        while len(attempts := [a async for a in db.webhook_attempts.find({})]) < 60:
            assert time.monotonic() < deadline, f"{len(attempts)} attempts stored, want 60"
            await asyncio.sleep(0.1)
        by_holder: dict[str, int] = {}
        for a in attempts:
            by_holder[a["holder"]] = by_holder.get(a["holder"], 0) + 1
        assert sorted(by_holder) == sorted(sharing) and sum(by_holder.values()) == 60, by_holder

        # Once every cursor is stored, the first process dies; the second takes its endpoints
        # over when their leases expire, and delivers what was filed meanwhile.
        deadline = time.monotonic() + 30
        while (
            sorted([d["cursor"] async for d in db.webhook_deliveries.find({})])
            != [max(r.leaf_index for r in receiver.accepted(names[0]))] * 6
        ):
            assert time.monotonic() < deadline, "the cursors were never stored"
            await asyncio.sleep(0.1)
        gateways[0].proc.send_signal(signal.SIGKILL)
        gateways[0].proc.wait(10)
        issued += [
            await issue(http, gateways[1], pharmacy="ph-A", patient=f"pt-{i}")
            for i in range(10, 15)
        ]
        for name in names:
            await receiver.wait_until(lambda n=name: len(receiver.accepted(n)) >= 15, name)
        assert list((await balanced([6], "one process left")).values()) == [6]
    for name in names:
        # The receiver answered every request at once with 200: no retry, so no repeat.
        assert_in_order_without_gaps(receiver.of(name), [(rx, 1) for rx in issued])


@pytest.mark.parametrize("tag_key", ["the old key file", "the keys derived from it"])
async def test_after_a_log_key_rotation_endpoints_sealed_before_still_get_deliveries(
    start_gateway, receiver, mongo_uri, db_name, tmp_path, tag_key
):
    # docs/operations.md, "Rotating the log key": the new key replaces the signing key and
    # RXLEDGER_TAG_KEY keeps what the old one keyed. The endpoint secrets sealed under the
    # old key must still open, else every endpoint stops at the rotation; and the old private
    # key need not stay on the gateway for it.
    from app.settings import write_new_key

    old_pem, new_pem = tmp_path / "old.pem", tmp_path / "new.pem"
    write_new_key(old_pem)
    write_new_key(new_pem)
    first = await start_gateway(**FAST, RXLEDGER_SIGNING_KEY=str(old_pem))
    partner = first.token("PARTNER", "partner-a", "ph-A")
    async with http_client() as client:
        await create_endpoint(client, first, receiver, "rotated", partner)
        await issue(client, first, pharmacy="ph-A", patient="pt-before")
        await receiver.wait_until(lambda: len(receiver.accepted("rotated")) == 1, "a delivery")
    first.proc.terminate()
    first.proc.wait(10)

    env = env_for(mongo_uri, db_name, tmp_path, RXLEDGER_SIGNING_KEY=str(old_pem))
    keys = tmp_path / "log-keys.txt"
    rotate = ["rotate-key", "--new", str(new_pem), "--out", str(keys), "--transition", "0"]
    commands = [rotate]
    tag_file = old_pem
    if tag_key == "the keys derived from it":
        tag_file = tmp_path / "derived.keys"
        commands.append(["derive-keys", "--key", str(old_pem), "--out", str(tag_file)])
    for command in commands:
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", *command],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    if tag_key == "the keys derived from it":
        old_pem.unlink()  # retired: no gateway holds it any more
    second = await start_gateway(
        **FAST,
        RXLEDGER_SIGNING_KEY=str(new_pem),
        RXLEDGER_LOG_KEYS=str(keys),
        RXLEDGER_TAG_KEY=str(tag_file),
    )
    async with http_client() as client:
        await issue(client, second, pharmacy="ph-A", patient="pt-after")
    await receiver.wait_until(lambda: len(receiver.accepted("rotated")) == 2, "a delivery after")
