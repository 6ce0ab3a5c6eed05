"""Subscriptions over real connections: uvicorn gateway processes, a real WebSocket client
speaking graphql-transport-ws, Server-Sent Events over HTTP, and a real MongoDB-protocol server.

Every test starts its own gateways over a database of its own, so the log holds only what the
test wrote and leaf indices can be checked for gaps and repeats. A subscription starts after a
known leaf index (`next_leaf_index`), never "from now", so no test races its own subscribe
message. Every wait is bounded, and generously: the machine may be busy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_gateway import ORIGIN, env_for, serve
from websockets.exceptions import ConnectionClosed
from ws_client import GraphQLSocket, StalledSubscriber

from anchoring.encoding import unb64
from anchoring.ledger import Ledger
from anchoring.note import open_checkpoint, parse_verifier_key
from anchoring.store import LogStore
from anchoring.verify import verify_consistency
from app.auth import load_dev_secret, mint_token

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0
EVENT_TIMEOUT = 60.0  # longest silence a subscriber waits through before the test fails

EVENTS = """subscription($after: Int, $filter: EventFilter) {
  prescriptionEvents(afterLeafIndex: $after, filter: $filter) {
    prescriptionId type status version leafIndex leaf
  }
}"""

CHECKPOINTS = """subscription($known: Int) {
  checkpoints(knownSize: $known) {
    checkpoint { origin size rootHash note }
    consistency { fromSize toSize path }
  }
}"""

ISSUE = """mutation($input: IssuePrescriptionInput!, $key: String) {
  issuePrescription(input: $input, idempotencyKey: $key) {
    __typename
    ... on Prescription { id version }
    ... on Error { message }
  }
}"""

DISPENSE = """mutation($id: ID!, $version: Int!) {
  dispensePrescription(id: $id, expectedVersion: $version) {
    __typename
    ... on Prescription { id version status }
    ... on Error { message }
  }
}"""


# --- gateways ----------------------------------------------------------------------------


@dataclass
class Gateway:
    base: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    secret: bytes

    def token(
        self, role: str, subject: str, organization: str | None = None, ttl_seconds: int = 3600
    ) -> str:
        return mint_token(
            secret=self.secret,
            role=role,
            subject=subject,
            organization=organization,
            ttl_seconds=ttl_seconds,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def start_gateway(mongo_uri: str, db_name: str, tmp_path: Path) -> Iterator[StartGateway]:
    """Starts gateway processes over this test's database, all with the same var/ directory
    (so the same log signing key and token secret); stops them at the end of the test.
    Rate limiting is off unless `env` sets RXLEDGER_RATE_LIMIT."""
    started: list[Gateway] = []

    async def start(**env: str) -> Gateway:
        environment = env_for(mongo_uri, db_name, tmp_path, **{"RXLEDGER_RATE_LIMIT": "0", **env})
        secret = load_dev_secret(Path(environment["RXLEDGER_VAR_DIR"]))
        log_path = tmp_path / f"gateway-{len(started)}.log"
        base, proc = serve(environment, log_path)
        gateway = Gateway(base, proc, log_path, secret)
        started.append(gateway)
        deadline = time.monotonic() + READY_TIMEOUT
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{gateway.base}/readyz")).status_code == 200:
                        return gateway
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"gateway did not start: {gateway.log_text()[-2000:]}")
                await asyncio.sleep(0.1)

    try:
        yield start
    finally:
        for gateway in started:
            gateway.proc.terminate()
        for gateway in started:
            try:
                gateway.proc.wait(10)
            except subprocess.TimeoutExpired:
                gateway.proc.kill()
                gateway.proc.wait()


# --- writing through the API ---------------------------------------------------------------


def http_client(connections: int = 1) -> httpx.AsyncClient:
    # Plain HTTP to a local gateway: no certificates to load, no proxies to look up.
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=120, limits=limits, verify=False, trust_env=False)


async def graphql(
    client: httpx.AsyncClient, gw: Gateway, query: str, token: str | None = None, **variables: Any
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = await client.post(
        f"{gw.base}/graphql", json={"query": query, "variables": variables}, headers=headers
    )
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert "errors" not in out, out["errors"]
    data: dict[str, Any] = out["data"]
    return data


async def issue(
    client: httpx.AsyncClient, gw: Gateway, *, pharmacy: str, patient: str = "pt-1"
) -> str:
    """File a prescription; returns its id. A dropped connection or Unavailable is retried with
    the same idempotency key, which the API promises never records the step twice."""
    prescriber = gw.token("PRESCRIBER", "dr-sub", "cardiology")
    variables = {
        "input": {
            "patient": {"id": patient, "name": f"Patient {patient}"},
            "medications": [
                {"code": "N02BE01", "name": "paracetamol", "dose": "500 mg", "quantity": 20}
            ],
            "pharmacy": pharmacy,
        },
        "key": uuid.uuid4().hex,
    }
    for attempt in range(5):
        try:
            data = await graphql(client, gw, ISSUE, prescriber, **variables)
        except httpx.TransportError as exc:
            print(f"issuePrescription: {type(exc).__name__}; retrying with the same key")
            await asyncio.sleep(0.2 * (attempt + 1))
            continue
        result = data["issuePrescription"]
        if result["__typename"] == "Unavailable":
            await asyncio.sleep(0.2 * (attempt + 1))
            continue
        assert result["__typename"] == "Prescription", result
        return str(result["id"])
    pytest.fail("issuePrescription failed five times")


async def issue_many(
    gw: Gateway, count: int, *, pharmacy: str = "ph-1", concurrency: int = 16
) -> list[str]:
    """File `count` prescriptions from `concurrency` clients at once; their ids in no order.
    Each client has one connection: one shared pool of many connections costs the client more
    CPU per request than the gateway spends on it."""
    ids: list[str] = []
    remaining = count

    async def client_session() -> None:
        nonlocal remaining
        async with http_client() as client:
            while remaining > 0:
                remaining -= 1
                ids.append(await issue(client, gw, pharmacy=pharmacy))

    await asyncio.gather(*(client_session() for _ in range(min(concurrency, count))))
    return ids


async def append_issued(appender: Ledger, subjects: list[str]) -> None:
    """Append an ISSUED event for each subject straight to the log, as another gateway's
    group-committing appender would: many events in little time, for tests about volume."""
    at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    await asyncio.gather(
        *(
            appender.append(
                subject,
                1,
                {"v": 1, "subject": subject, "version": 1, "type": "ISSUED", "at": at},
                tags={"status": "ISSUED", "pharmacy": "ph-1"},
            )
            for subject in subjects
        )
    )


async def ledger_size(gw: Gateway, client: httpx.AsyncClient | None = None) -> int:
    async with contextlib.AsyncExitStack() as stack:
        if client is None:
            client = await stack.enter_async_context(http_client())
        return int((await graphql(client, gw, "{ ledger { size } }"))["ledger"]["size"])


async def wait_sequenced(gw: Gateway, size: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    async with http_client() as client:
        while (current := await ledger_size(gw, client)) < size:
            assert time.monotonic() < deadline, f"log at size {current}, want {size}"
            await asyncio.sleep(0.1)


async def next_leaf_index(gw: Gateway) -> int:
    """Files a first prescription and waits until it is sequenced: the index the next event
    will get. Subscribing with afterLeafIndex = this - 1 starts exactly at the next write
    (afterLeafIndex must be >= 0, hence the first prescription)."""
    await issue_many(gw, 1)
    await wait_sequenced(gw, 1)
    return await ledger_size(gw)


# --- reading subscriptions ----------------------------------------------------------------


async def changes(socket: GraphQLSocket, op_id: str, count: int) -> list[dict[str, Any]]:
    """The next `count` prescription changes of operation `op_id`."""
    received: list[dict[str, Any]] = []
    if count == 0:
        return received
    async with contextlib.aclosing(socket.events(op_id, EVENT_TIMEOUT)) as events:
        async for data in events:
            received.append(data["prescriptionEvents"])
            if len(received) == count:
                break
    return received


def indices(events: list[dict[str, Any]]) -> list[int]:
    return [e["leafIndex"] for e in events]


async def until_expired(socket: GraphQLSocket, op_id: str) -> tuple[list[dict[str, Any]], dict]:
    """Changes until the subscription ends (its token expires): the changes and the error."""
    received: list[dict[str, Any]] = []
    while True:
        message = await socket.receive(EVENT_TIMEOUT)
        assert message["id"] == op_id and message["type"] == "next", message
        payload = message["payload"]
        if payload.get("errors"):
            assert payload["data"] is None, payload
            assert await socket.receive(EVENT_TIMEOUT) == {"id": op_id, "type": "complete"}
            (error,) = payload["errors"]
            return received, error
        received.append(payload["data"]["prescriptionEvents"])


@contextlib.asynccontextmanager
async def subscribed(
    gw: Gateway,
    token: str | None,
    after: int | None,
    event_filter: dict[str, Any] | None = None,
    op_id: str = "events",
) -> AsyncIterator[GraphQLSocket]:
    """A WebSocket subscribed to prescriptionEvents after leaf index `after`."""
    async with await GraphQLSocket.open(gw.base, token) as socket:
        variables: dict[str, Any] = {"after": after}
        if event_filter is not None:
            variables["filter"] = event_filter
        await socket.subscribe(op_id, EVENTS, variables)
        yield socket


# --- 1. ordering and completeness across processes -----------------------------------------


async def test_a_subscriber_receives_every_event_written_through_two_gateways_in_leaf_order(
    start_gateway,
):
    a = await start_gateway()
    b = await start_gateway()  # same database and origin: one of the two leads the sequencer
    first = await next_leaf_index(a)

    async with subscribed(a, a.token("AUDITOR", "aud-1"), first - 1) as socket:
        reading = asyncio.create_task(changes(socket, "events", 100))
        via_a, via_b = await asyncio.gather(issue_many(a, 50), issue_many(b, 50))
        received = await reading

    assert indices(received) == list(range(first, first + 100))
    written = {(rid, 1) for rid in via_a + via_b}
    assert len(written) == 100
    assert {(e["prescriptionId"], e["version"]) for e in received} == written
    for event in received:
        header = json.loads(base64.b64decode(event["leaf"]))
        assert (header["subject"], header["version"], header["type"]) == (
            event["prescriptionId"],
            event["version"],
            event["type"],
        )
        assert (event["type"], event["status"]) == ("ISSUED", "ISSUED")


# --- 2. resume ------------------------------------------------------------------------------


async def test_resuming_after_a_dropped_connection_loses_and_repeats_nothing(start_gateway):
    # A small window: the events written while away are mostly older than the window, so the
    # resumed subscription reads its backlog from the database, then joins the live window.
    gw = await start_gateway(RXLEDGER_SUBSCRIPTION_WINDOW="16")
    admin = gw.token("ADMIN", "adm-1")
    first = await next_leaf_index(gw)

    async with subscribed(gw, admin, first - 1) as socket:
        reading = asyncio.create_task(changes(socket, "events", 10))
        before = await issue_many(gw, 10)
        seen = await reading
    assert indices(seen) == list(range(first, first + 10))
    assert {e["prescriptionId"] for e in seen} == set(before)
    last_seen = seen[-1]["leafIndex"]

    while_away = await issue_many(gw, 40)
    await wait_sequenced(gw, first + 50)

    async with subscribed(gw, admin, last_seen) as socket:
        reading = asyncio.create_task(changes(socket, "events", 60))
        during = await issue_many(gw, 20)  # written while the backlog is being read
        rest = await reading
        assert indices(rest) == list(range(last_seen + 1, last_seen + 61))
        assert {e["prescriptionId"] for e in rest} == set(while_away + during)

        # Nothing more was queued for this subscriber: the next event is the next write.
        (fence,) = await issue_many(gw, 1)
        (after,) = await changes(socket, "events", 1)
        assert (after["leafIndex"], after["prescriptionId"]) == (last_seen + 61, fence)


# --- 3. who sees what -------------------------------------------------------------------


async def test_subscribers_see_only_what_their_token_and_filter_allow(start_gateway):
    gw = await start_gateway()
    first = await next_leaf_index(gw)

    # rx1 and rx2 are for pharmacy ph-1, rx3 and rx4 for ph-2; patients pt-a and pt-b.
    async with http_client() as client:
        rx1 = await issue(client, gw, pharmacy="ph-1", patient="pt-a")
        rx2 = await issue(client, gw, pharmacy="ph-1", patient="pt-b")
        rx3 = await issue(client, gw, pharmacy="ph-2", patient="pt-a")
        rx4 = await issue(client, gw, pharmacy="ph-2", patient="pt-b")
        for rid, pharmacy in ((rx1, "ph-1"), (rx4, "ph-2")):
            pharmacist = gw.token("PHARMACIST", f"pharmacist-{pharmacy}", pharmacy)
            done = await graphql(client, gw, DISPENSE, pharmacist, id=rid, version=1)
            assert done["dispensePrescription"]["status"] == "DISPENSED", done
    await wait_sequenced(gw, first + 6)
    last = first + 5

    facts = {
        rx1: ("ph-1", "pt-a"),
        rx2: ("ph-1", "pt-b"),
        rx3: ("ph-2", "pt-a"),
        rx4: ("ph-2", "pt-b"),
    }
    # Each subscriber replays the log from `first` and ends when its short-lived token expires;
    # the expiry says how far it read, so "saw nothing more" is a fact, not a timeout.
    subscribers: dict[str, tuple[str, str, str | None, dict[str, Any] | None]] = {
        "admin": ("ADMIN", "adm-1", None, None),
        "partner ph-1": ("PARTNER", "partner-1", "ph-1", None),
        "partner ph-2": ("PARTNER", "partner-2", "ph-2", None),
        "patient pt-a": ("PATIENT", "pt-a", None, None),
        "dispensed": ("ADMIN", "adm-1", None, {"status": ["DISPENSED"]}),
        "pharmacy ph-2": ("ADMIN", "adm-1", None, {"pharmacy": "ph-2"}),
        "rx1 only": ("ADMIN", "adm-1", None, {"prescriptionId": rx1}),
        "ph-1 asking for ph-2": ("PARTNER", "partner-1", "ph-1", {"pharmacy": "ph-2"}),
        "ph-1 dispensed": ("PARTNER", "partner-1", "ph-1", {"status": ["DISPENSED"]}),
    }

    async def seen_by(role: str, sub: str, org: str | None, flt: dict[str, Any] | None):
        token = gw.token(role, sub, org, ttl_seconds=5)
        async with subscribed(gw, token, first - 1, flt) as socket:
            received, error = await until_expired(socket, "events")
        assert error["extensions"]["code"] == "TOKEN_EXPIRED", error
        assert f"afterLeafIndex={last}" in error["message"], error  # it read the whole log
        return [(e["prescriptionId"], e["version"]) for e in received], indices(received)

    results = await asyncio.gather(*(seen_by(*s) for s in subscribers.values()))
    seen = {name: events for name, (events, _) in zip(subscribers, results, strict=True)}
    for _, leaf_indices in results:
        assert leaf_indices == sorted(set(leaf_indices)), leaf_indices

    everything = seen["admin"]
    assert sorted(everything) == sorted([(r, 1) for r in facts] + [(rx1, 2), (rx4, 2)])

    def only(keep: Callable[[str, int], bool]) -> list[tuple[str, int]]:
        return [(rid, version) for rid, version in everything if keep(rid, version)]

    assert seen["partner ph-1"] == only(lambda rid, v: facts[rid][0] == "ph-1")
    assert seen["partner ph-2"] == only(lambda rid, v: facts[rid][0] == "ph-2")
    assert seen["patient pt-a"] == only(lambda rid, v: facts[rid][1] == "pt-a")
    # (in the order the log holds them: the two dispenses were written concurrently)
    assert seen["dispensed"] == only(lambda rid, v: v == 2)
    assert sorted(seen["dispensed"]) == sorted([(rx1, 2), (rx4, 2)])
    assert seen["pharmacy ph-2"] == only(lambda rid, v: facts[rid][0] == "ph-2")
    assert seen["rx1 only"] == [(rx1, 1), (rx1, 2)]
    assert seen["ph-1 asking for ph-2"] == []
    assert seen["ph-1 dispensed"] == [(rx1, 2)]


async def test_prescription_events_need_a_token_but_checkpoints_do_not(start_gateway):
    gw = await start_gateway()
    await next_leaf_index(gw)

    for token in (None, "not-a-jwt"):
        async with subscribed(gw, token, 0) as socket:
            message = await socket.receive(EVENT_TIMEOUT)
            assert message["type"] == "next" and message["payload"]["data"] is None, message
            (error,) = message["payload"]["errors"]
            assert error["extensions"]["code"] == "UNAUTHENTICATED", error
            assert ("Bearer" if token is None else "JWT") in error["message"], error
            assert await socket.receive(EVENT_TIMEOUT) == {"id": "events", "type": "complete"}

    async with await GraphQLSocket.open(gw.base) as socket:
        await socket.subscribe("cp", CHECKPOINTS)
        async for data in socket.events("cp", EVENT_TIMEOUT):
            update = data["checkpoints"]
            assert update["checkpoint"]["origin"] == ORIGIN
            assert update["checkpoint"]["size"] >= 0 and update["consistency"] is None
            break


# --- 4. a stalled subscriber -------------------------------------------------------------


# Two hundred copies of the leaf (~90 KB per message, no compression on the raw socket) fill
# the kernel's and the server's buffers after a few dozen events.
STALLING = (
    "subscription($after: Int) { prescriptionEvents(afterLeafIndex: $after) { leafIndex "
    + " ".join(f"l{i}: leaf" for i in range(200))
    + " } }"
)
WINDOW = 64


async def test_a_stalled_subscriber_is_cut_off_while_a_fast_one_keeps_receiving(
    start_gateway,
):
    gw = await start_gateway(RXLEDGER_SUBSCRIPTION_WINDOW=str(WINDOW), RXLEDGER_MAX_ALIASES="250")
    admin = gw.token("ADMIN", "adm-1")
    first = await next_leaf_index(gw)
    stalled = await StalledSubscriber.subscribe(
        gw.base, gw.token("ADMIN", "stalled"), STALLING, {"after": first - 1}
    )
    # The stall has to end (drain below) before uvicorn's keep-alive gives up on the unanswered
    # ping (20 s + 20 s after connecting); at a few dozen writes a second it takes ~10 s.
    try:
        async with subscribed(gw, admin, first - 1) as fast:
            received: list[dict[str, Any]] = []

            async def read_fast() -> None:
                async for data in fast.events("events", EVENT_TIMEOUT):
                    received.append(data["prescriptionEvents"])

            reading = asyncio.create_task(read_fast())
            written = 0
            # Write until the gateway cuts the stalled subscriber off (its log says so).
            while "cutting off a subscriber" not in gw.log_text():
                assert written < 1500, "no cut-off after 1500 events"
                await issue_many(gw, 25)
                written += 25
            await issue_many(gw, 25)  # and the fast one keeps receiving after the cut-off
            written += 25
            await wait_sequenced(gw, first + written)
            deadline = time.monotonic() + 120
            while len(received) < written and time.monotonic() < deadline:
                assert not reading.done(), reading.result()
                await asyncio.sleep(0.1)
            reading.cancel()
        assert indices(received) == list(range(first, first + written))

        # Reading again, the stalled one finds what was buffered for it, then the close frame.
        drained = await stalled.drain(timeout=60)
    finally:
        stalled.close()
    nexts = [m for m in drained.messages if m["type"] == "next"]
    got = [m["payload"]["data"]["prescriptionEvents"]["leafIndex"] for m in nexts]
    assert got == list(range(first, first + len(got))) and len(got) < written - WINDOW
    assert drained.close_code == 4008, drained
    assert "too slow" in drained.close_reason and "afterLeafIndex=" in drained.close_reason
    resume_after = int(drained.close_reason.split("afterLeafIndex=", 1)[1].split()[0])
    # The server's resume point never skips: it is the last event the subscriber received, or
    # the one before (a message in flight when the socket closed may or may not have arrived).
    assert resume_after in (got[-1], got[-1] - 1), (resume_after, got[-1])

    # Resuming from the later of the two continues exactly after the last event received.
    async with subscribed(gw, admin, max(resume_after, got[-1])) as again:
        (next_event,) = await changes(again, "events", 1)
    assert next_event["leafIndex"] == got[-1] + 1


async def test_a_subscriber_that_keeps_up_is_not_cut_off_when_its_gateway_catches_up_on_a_burst(
    start_gateway,
):
    # The subscriber reads everything as it comes; its gateway (a follower) is paused while the
    # other gateway writes 40 events, then catches up on them in one read of the log. Nothing
    # is wrong with the subscriber, and the events are all in the database to read.
    writer = await start_gateway()
    follower = await start_gateway(RXLEDGER_SUBSCRIPTION_WINDOW="16")
    first = await next_leaf_index(writer)
    async with subscribed(follower, follower.token("AUDITOR", "aud-1"), first - 1) as socket:
        caught_up, _ = await asyncio.gather(changes(socket, "events", 1), issue_many(writer, 1))
        assert indices(caught_up) == [first]
        follower.proc.send_signal(signal.SIGSTOP)
        try:
            burst = await issue_many(writer, 40)
            await wait_sequenced(writer, first + 41)
        finally:
            follower.proc.send_signal(signal.SIGCONT)
        try:
            received = await changes(socket, "events", 40)
        except ConnectionClosed as closed:
            pytest.fail(f"a subscriber that kept up was disconnected: {closed.rcvd}")
    assert indices(received) == list(range(first + 1, first + 41))
    assert {e["prescriptionId"] for e in received} == set(burst)


async def test_a_subscriber_that_keeps_up_is_not_cut_off_while_its_gateway_catches_up_under_traffic(
    start_gateway, client, db_name
):
    # As above, but the log keeps growing while the follower catches up, as it does in
    # production: the subscriber reads what it missed from the database while new batches
    # arrive. It is still not slow; it should not be cut off.
    writer = await start_gateway()
    follower = await start_gateway(RXLEDGER_SUBSCRIPTION_WINDOW="16")
    first = await next_leaf_index(writer)
    appender = Ledger(LogStore(client[db_name], ORIGIN))
    try:
        async with subscribed(follower, follower.token("AUDITOR", "aud-1"), first - 1) as socket:
            caught_up, _ = await asyncio.gather(
                changes(socket, "events", 1), append_issued(appender, ["rx_first"])
            )
            assert indices(caught_up) == [first]
            follower.proc.send_signal(signal.SIGSTOP)
            try:
                await append_issued(appender, [f"rx_burst_{i:04d}" for i in range(1000)])
                await wait_sequenced(writer, first + 1001)
            finally:
                follower.proc.send_signal(signal.SIGCONT)

            async def traffic() -> None:
                for round_ in range(50):
                    await append_issued(appender, [f"rx_more_{round_:02d}_{i}" for i in range(5)])
                    await asyncio.sleep(0.1)

            try:
                received, _ = await asyncio.gather(changes(socket, "events", 1250), traffic())
            except ConnectionClosed as closed:
                pytest.fail(f"a subscriber that kept up was disconnected: {closed.rcvd}")
    finally:
        await appender.close()
    assert indices(received) == list(range(first + 1, first + 1251))


# --- 5. volume -----------------------------------------------------------------------------


async def test_ten_thousand_events_arrive_complete_through_one_subscription(
    start_gateway, client, db_name
):
    # The events are appended to the log as another gateway process would append them (its
    # group-committing appender, not its HTTP API: 10,000 mutations over HTTP take minutes on
    # FerretDB). This gateway sequences them, and its subscriber must get every one, in order.
    gw = await start_gateway()
    first = await next_leaf_index(gw)
    count = 10_000
    appender = Ledger(LogStore(client[db_name], ORIGIN))
    subjects = [f"rx_bulk_{i:05d}" for i in range(count)]
    started = time.monotonic()
    async with subscribed(gw, gw.token("AUDITOR", "aud-1"), first - 1) as socket:
        reading = asyncio.create_task(changes(socket, "events", count))
        await append_issued(appender, subjects)
        await appender.close()
        writes_done = time.monotonic()
        received = await reading
    finished = time.monotonic()
    print(
        f"\n{count} events: appended in {writes_done - started:.1f} s, all received after "
        f"{finished - started:.1f} s"
    )
    assert indices(received) == list(range(first, first + count))
    assert sorted(e["prescriptionId"] for e in received) == subjects


# --- 6. token expiry --------------------------------------------------------------------


async def test_token_expiry_ends_the_subscription_with_the_point_to_resume_from(start_gateway):
    gw = await start_gateway()
    first = await next_leaf_index(gw)
    before = await issue_many(gw, 3)
    await wait_sequenced(gw, first + 3)

    token = gw.token("PARTNER", "partner-1", "ph-1", ttl_seconds=3)
    subscribed_at = time.time()
    async with subscribed(gw, token, first - 1) as socket:
        received, error = await until_expired(socket, "events")
    ended_after = time.time() - subscribed_at
    assert indices(received) == [first, first + 1, first + 2]
    assert {e["prescriptionId"] for e in received} == set(before)
    assert error["extensions"]["code"] == "TOKEN_EXPIRED", error
    assert "token expired" in error["message"], error
    assert f"afterLeafIndex={first + 2}" in error["message"], error
    assert ended_after < 15, f"the subscription outlived its 3 s token by {ended_after:.0f} s"

    # A fresh token and the named resume point continue exactly after the last event seen.
    later = await issue_many(gw, 2)
    async with subscribed(gw, gw.token("PARTNER", "partner-1", "ph-1"), first + 2) as socket:
        rest = await changes(socket, "events", 2)
    assert indices(rest) == [first + 3, first + 4]
    assert {e["prescriptionId"] for e in rest} == set(later)


async def test_token_expiry_before_any_event_names_a_resume_point_the_api_accepts(
    start_gateway,
):
    gw = await start_gateway()  # an empty log: the subscriber starts at leaf 0
    token = gw.token("ADMIN", "adm-1", ttl_seconds=3)
    async with await GraphQLSocket.open(gw.base, token) as socket:
        await socket.subscribe("events", EVENTS, {})
        received, error = await until_expired(socket, "events")
    assert received == [] and error["extensions"]["code"] == "TOKEN_EXPIRED", error
    resume_after = int(error["message"].split("afterLeafIndex=", 1)[1].split()[0])

    (rid,) = await issue_many(gw, 1)
    async with subscribed(gw, gw.token("ADMIN", "adm-1"), resume_after) as socket:
        message = await socket.receive(EVENT_TIMEOUT)
    assert message["type"] == "next" and not message["payload"].get("errors"), (
        f"the expiry said to resume with afterLeafIndex={resume_after}; that is refused: {message}"
    )
    assert message["payload"]["data"]["prescriptionEvents"]["prescriptionId"] == rid


# --- 7. Server-Sent Events -----------------------------------------------------------------


async def sse_events(response: httpx.Response, count: int) -> list[dict[str, str]]:
    """The next `count` events of an event stream, each as its fields (id, event, data)."""
    events: list[dict[str, str]] = []
    fields: dict[str, str] = {}

    async def read() -> None:
        async for line in response.aiter_lines():
            if line == "":
                if fields:
                    events.append(dict(fields))
                    fields.clear()
                    if len(events) == count:
                        return
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")

    await asyncio.wait_for(read(), EVENT_TIMEOUT)
    return events


async def test_server_sent_events_stream_with_ids_and_resume_from_last_event_id(start_gateway):
    gw = await start_gateway()
    first = await next_leaf_index(gw)
    written = await issue_many(gw, 5)
    await wait_sequenced(gw, first + 5)
    auth = {"Authorization": f"Bearer {gw.token('PARTNER', 'partner-1', 'ph-1')}"}

    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=EVENT_TIMEOUT)) as client:
        url = f"{gw.base}/events?afterLeafIndex={first - 1}"
        async with client.stream("GET", url, headers=auth) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            seen = await sse_events(response, 3)
        for offset, event in enumerate(seen):
            assert event["event"] == "prescription" and event["id"] == str(first + offset)
            data = json.loads(event["data"])
            assert data["leafIndex"] == first + offset and data["prescriptionId"] in written
            assert (data["type"], data["status"], data["version"]) == ("ISSUED", "ISSUED", 1)

        later = await issue_many(gw, 2)
        # Last-Event-ID (what EventSource sends on reconnect) wins over afterLeafIndex.
        headers = {**auth, "Last-Event-ID": seen[-1]["id"]}
        async with client.stream("GET", f"{gw.base}/events?afterLeafIndex=0", headers=headers) as r:
            rest = await sse_events(r, 4)
        assert [int(e["id"]) for e in rest] == list(range(first + 3, first + 7))
        ids = [json.loads(e["data"])["prescriptionId"] for e in seen + rest]
        assert sorted(ids) == sorted(written + later)

        for headers in ({}, {"Authorization": "Bearer not-a-jwt"}):
            refused = await client.get(f"{gw.base}/events", headers=headers)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["code"] == "UNAUTHENTICATED"


# --- 8. checkpoints -------------------------------------------------------------------------


async def test_checkpoint_updates_carry_consistency_proofs_from_the_known_size(start_gateway):
    gw = await start_gateway()
    first = await next_leaf_index(gw)
    await issue_many(gw, 4)
    await wait_sequenced(gw, first + 4)
    async with http_client() as client:
        ledger = (
            await graphql(
                client,
                gw,
                "{ ledger { verifierKey checkpoints(first: 100) { edges { node { size rootHash } } } } }",
            )
        )["ledger"]
    verifier = parse_verifier_key(ledger["verifierKey"])
    roots = {
        e["node"]["size"]: unb64(e["node"]["rootHash"]) for e in ledger["checkpoints"]["edges"]
    }
    known = min(size for size in roots if size > 0)

    old_size, old_root = known, roots[known]
    sizes: list[int] = []
    async with (
        await GraphQLSocket.open(gw.base) as socket,  # no token: checkpoints are public
        contextlib.aclosing(socket.events("cp", EVENT_TIMEOUT)) as updates,
    ):
        await socket.subscribe("cp", CHECKPOINTS, {"known": known})
        # Two rounds of writes, so that at least two updates arrive and the second one's
        # proof starts from the first one's size.
        for target in (first + 14, first + 24):
            await issue_many(gw, 10, concurrency=4)
            while old_size < target:
                data = await anext(updates)
                checkpoint = data["checkpoints"]["checkpoint"]
                proof = data["checkpoints"]["consistency"]
                size, new_root = checkpoint["size"], unb64(checkpoint["rootHash"])
                signed = open_checkpoint(checkpoint["note"], [verifier], ORIGIN)
                assert (signed.size, signed.root_hash) == (size, new_root)
                assert size > old_size
                assert (proof["fromSize"], proof["toSize"]) == (old_size, size)
                path = [unb64(h) for h in proof["path"]]
                verify_consistency(old_size, size, old_root, new_root, path)
                old_size, old_root = size, new_root
                sizes.append(size)
    assert len(sizes) >= 2 and sizes[-1] >= first + 24, sizes
