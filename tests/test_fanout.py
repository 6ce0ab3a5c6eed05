"""Subscriptions that fan out once: subscribers of one document, the same payload variables and
one visibility class share a group that executes each event once (schema/subscriptions.py).

The gateway is a real uvicorn server run inside the test's event loop (so that the test can read
the app's fan-out counters: `app.state.fanout`), over a real MongoDB-protocol server; clients are
real WebSockets speaking graphql-transport-ws, with real JWTs. Events are appended to the log as
another gateway's appender would; this gateway sequences them and delivers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from test_faults import toxiproxy, toxiproxy_binary  # noqa: F401 (fixtures)
from test_gateway import ORIGIN, env_for
from test_subscriptions import EVENT_TIMEOUT, EVENTS, STALLING, changes, indices, until_expired
from ws_client import GraphQLSocket, StalledSubscriber

from anchoring.ledger import Ledger
from anchoring.store import LogStore
from app.auth import load_dev_secret, mint_token
from app.main import create_app
from schema.subscriptions import FanOut

WAIT = 60.0  # longest a condition may take to hold before the test fails


@dataclass
class Gateway:
    base: str
    app: Starlette
    secret: bytes
    appender: Ledger

    @property
    def fanout(self) -> FanOut:
        fanout: FanOut = self.app.state.fanout
        return fanout

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

    def members(self) -> list[int]:
        """How many members each group has, largest first."""
        return sorted((g.members for g in self.fanout.groups.values()), reverse=True)

    async def size(self) -> int:
        size: int = await self.app.state.log.published_size()
        return size

    async def append(self, events: list[tuple[str, dict[str, str | None]]]) -> None:
        """Append an ISSUED event per (subject, routing tags), at once, and wait until this
        gateway has sequenced them all."""
        target = await self.size() + len(events)
        at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        await asyncio.gather(
            *(
                self.appender.append(
                    subject,
                    1,
                    {"v": 1, "subject": subject, "version": 1, "type": "ISSUED", "at": at},
                    tags={"status": "ISSUED", **tags},
                )
                for subject, tags in events
            )
        )
        await until(lambda: self.size_reached(target), f"log size {target}")

    async def size_reached(self, target: int) -> bool:
        return await self.size() >= target


async def until(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    """Wait until `check` holds (polling); fail after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"still waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def start_gateway(
    mongo_uri: str, db_name: str, tmp_path: Path, client: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """Starts the gateway (uvicorn, in this event loop) with `env` settings on top of the
    tests' usual ones; stops it at the end of the test."""
    started: list[tuple[uvicorn.Server, asyncio.Task[None], Ledger]] = []

    async def start(**env: str) -> Gateway:
        environment = env_for(mongo_uri, db_name, tmp_path, **env)
        for name in [n for n in os.environ if n.startswith("RXLEDGER_")]:
            monkeypatch.delenv(name)
        for name, value in environment.items():
            if name.startswith("RXLEDGER_") or name == "MONGODB_URI":
                monkeypatch.setenv(name, value)
        app = create_app()
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=0,
                ws_per_message_deflate=False,  # as `rxledger serve` runs it
                log_level="warning",
                lifespan="on",
            )
        )
        task = asyncio.create_task(server.serve())
        appender = Ledger(LogStore(client[db_name], ORIGIN))
        started.append((server, task, appender))
        await until(lambda: server.started or task.done(), "uvicorn to start")
        assert not task.done(), "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        secret = load_dev_secret(Path(environment["RXLEDGER_VAR_DIR"]))
        return Gateway(f"http://127.0.0.1:{port}", app, secret, appender)

    try:
        yield start
    finally:
        for server, task, appender in started:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
            await appender.close()


async def subscribe_all(
    gw: Gateway, tokens: list[str], query: str, variables: dict[str, Any]
) -> list[GraphQLSocket]:
    """One socket per token, each subscribed as operation "events"."""
    sockets = [await GraphQLSocket.open(gw.base, token) for token in tokens]
    for socket in sockets:
        await socket.subscribe("events", query, variables)
    return sockets


# --- (a) one execution per event -------------------------------------------------------------


async def test_subscribers_of_one_document_and_class_cause_one_execution_per_event(
    start_gateway,
):
    gw = await start_gateway()
    subscribers = 20
    events = 15
    # Twenty auditors (twenty subjects): one visibility class. Subscribed "from now on".
    tokens = [gw.token("AUDITOR", f"aud-{i}") for i in range(subscribers)]
    sockets = await subscribe_all(gw, tokens, EVENTS, {})
    try:
        await until(lambda: gw.members() == [subscribers], f"one group of {subscribers}")
        assert gw.fanout.executions == 0
        await gw.append([(f"rx_a_{i:02d}", {"pharmacy": "ph-1"}) for i in range(events)])

        received = await asyncio.gather(*(raw_nexts(s, "events", events) for s in sockets))
    finally:
        for socket in sockets:
            await socket.close()

    first = received[0][0]["payload"]["data"]["prescriptionEvents"]["leafIndex"]
    for messages in received:
        assert [m["id"] for m in messages] == ["events"] * events
        got = [m["payload"]["data"]["prescriptionEvents"] for m in messages]
        assert indices(got) == list(range(first, first + events))
        assert sorted(e["prescriptionId"] for e in got) == [f"rx_a_{i:02d}" for i in range(events)]
    # Every subscriber got the same payloads; the group executed each event once, not 20 times.
    assert all(r == received[0] for r in received)
    assert gw.fanout.executions == events


async def raw_nexts(socket: GraphQLSocket, op_id: str, count: int) -> list[dict[str, Any]]:
    """The next `count` messages of operation `op_id`, each a `next` without errors."""
    messages = []
    while len(messages) < count:
        message = await socket.receive(EVENT_TIMEOUT)
        assert message.get("id") == op_id and message["type"] == "next", message
        assert not message["payload"].get("errors"), message
        messages.append(message)
    return messages


async def test_subscribers_resuming_from_different_points_share_one_group(start_gateway):
    # afterLeafIndex only says where a subscriber starts: with it in a variable, subscribers
    # resuming from anywhere still share their group and its executions.
    gw = await start_gateway()
    await gw.append([(f"rx_r_{i}", {"pharmacy": "ph-1"}) for i in range(6)])
    size = await gw.size()
    starts = [size - 6, size - 4, size - 1]  # afterLeafIndex: the last leaf each one saw
    sockets = []
    try:
        for n, after in enumerate(starts):
            sockets.append(await GraphQLSocket.open(gw.base, gw.token("ADMIN", f"adm-{n}")))
            await sockets[-1].subscribe("events", EVENTS, {"after": after})
        got = await asyncio.gather(
            *(
                changes(s, "events", size - 1 - after)
                for s, after in zip(sockets, starts, strict=True)
            )
        )
        assert gw.members() == [len(starts)]
    finally:
        for socket in sockets:
            await socket.close()
    for events, after in zip(got, starts, strict=True):
        assert indices(events) == list(range(after + 1, size))
    assert gw.fanout.executions == 5  # leaves size-5 .. size-1, each once


# --- (b) visibility classes never share ------------------------------------------------------


async def test_subscribers_in_different_visibility_classes_get_their_own_groups_and_payloads(
    start_gateway,
):
    gw = await start_gateway()
    first = await gw.size()
    courier = {"pharmacy": "ph-2", "courier": "c-1"}
    log = [
        ("rx_ca", {**courier, "courierOrganization": "co-A"}),  # courier c-1 of company A
        ("rx_cb", {**courier, "courierOrganization": "co-B"}),  # courier c-1 of company B
        ("rx_p1", {"pharmacy": "ph-1"}),
        ("rx_p2", {"pharmacy": "ph-2"}),
    ]
    for event in log:  # one at a time: leaf order is the list's order
        await gw.append([event])

    viewers = {
        "courier c-1 of co-A": ("COURIER", "c-1", "co-A", ["rx_ca"]),
        "courier c-1 of co-B": ("COURIER", "c-1", "co-B", ["rx_cb"]),
        "pharmacist of ph-1": ("PHARMACIST", "ph1-anna", "ph-1", ["rx_p1"]),
        "another pharmacist of ph-1": ("PHARMACIST", "ph1-ben", "ph-1", ["rx_p1"]),
        "auditor": ("AUDITOR", "aud-1", None, ["rx_ca", "rx_cb", "rx_p1", "rx_p2"]),
    }
    # Each replays the log and ends when its short-lived token expires: the expiry names the
    # last leaf it read, so "received nothing more" is a fact, not a timeout.
    sockets = {
        name: await GraphQLSocket.open(gw.base, gw.token(role, sub, org, ttl_seconds=5))
        for name, (role, sub, org, _) in viewers.items()
    }
    try:
        for socket in sockets.values():
            await socket.subscribe("events", EVENTS, {"after": first - 1})
        # Couriers of two companies, a pharmacist and an auditor: four classes; the two
        # pharmacists of one pharmacy share theirs.
        await until(lambda: gw.members() == [2, 1, 1, 1], "four groups")
        results = await asyncio.gather(*(until_expired(s, "events") for s in sockets.values()))
    finally:
        for socket in sockets.values():
            await socket.close()

    for (name, (*_, expected)), (received, error) in zip(viewers.items(), results, strict=True):
        assert [e["prescriptionId"] for e in received] == expected, name
        assert error["extensions"]["code"] == "TOKEN_EXPIRED", (name, error)
        assert f"afterLeafIndex={first + len(log) - 1}" in error["message"], (name, error)
        for event in received:
            assert event["leafIndex"] == first + [s for s, _ in log].index(event["prescriptionId"])
    # Each group executed only what its members may see: 1 + 1 + 1 + 4 events.
    assert gw.fanout.executions == 7


# --- (c) a slow member holds up only itself ---------------------------------------------------

WINDOW = 64


async def test_a_stalled_member_does_not_hold_up_its_group_mates(start_gateway):
    gw = await start_gateway(RXLEDGER_SUBSCRIPTION_WINDOW=str(WINDOW), RXLEDGER_MAX_ALIASES="250")
    first = await gw.size()
    variables = {"after": first - 1}
    stalled = await StalledSubscriber.subscribe(
        gw.base, gw.token("ADMIN", "stalled"), STALLING, variables
    )
    try:
        async with await GraphQLSocket.open(gw.base, gw.token("ADMIN", "fast")) as fast:
            await fast.subscribe("events", STALLING, variables)
            await until(lambda: gw.members() == [2], "one group of two")
            received: list[dict[str, Any]] = []

            async def read_fast() -> None:
                async for data in fast.events("events", EVENT_TIMEOUT):
                    received.append(data["prescriptionEvents"])

            reading = asyncio.create_task(read_fast())
            written = 0
            feed = gw.app.state.feed
            # Write until the feed cuts the stalled member off; the fast one keeps receiving.
            while not any(sub.ended for sub in feed.subscribers):
                assert written < 1500, "no cut-off after 1500 events"
                batch = [(f"rx_s_{written + i:04d}", {"pharmacy": "ph-1"}) for i in range(25)]
                await gw.append(batch)
                written += 25
            await gw.append([(f"rx_s_{written + i:04d}", {"pharmacy": "ph-1"}) for i in range(25)])
            written += 25
            await until(lambda: len(received) >= written or reading.done(), "the fast member")
            reading.cancel()
            assert indices(received) == list(range(first, first + written))
            # One execution per event, though one member read far fewer of them.
            assert gw.fanout.executions == written
        drained = await stalled.drain(timeout=60)
    finally:
        stalled.close()
    got = [
        m["payload"]["data"]["prescriptionEvents"]["leafIndex"]
        for m in drained.messages
        if m["type"] == "next"
    ]
    assert got == list(range(first, first + len(got))) and len(got) < written - WINDOW
    assert drained.close_code == 4008 and "too slow" in drained.close_reason, drained


# --- (d) ordering and resume within a group ---------------------------------------------------


async def test_a_member_that_resumes_rejoins_its_group_and_loses_and_repeats_nothing(
    start_gateway,
):
    # A small window: the resumed member reads what it missed from the database, then joins
    # the live window, all the while a member of the same group as the one that stayed.
    gw = await start_gateway(RXLEDGER_SUBSCRIPTION_WINDOW="16")
    first = await gw.size()
    stayed = await GraphQLSocket.open(gw.base, gw.token("PARTNER", "partner-1", "ph-1"))
    try:
        await stayed.subscribe("events", EVENTS, {"after": first - 1})
        async with await GraphQLSocket.open(
            gw.base, gw.token("PARTNER", "partner-2", "ph-1")
        ) as leaving:
            await leaving.subscribe("events", EVENTS, {"after": first - 1})
            await until(lambda: gw.members() == [2], "one group of two")
            await gw.append([(f"rx_d_{i:02d}", {"pharmacy": "ph-1"}) for i in range(10)])
            seen = await changes(leaving, "events", 10)
        assert indices(seen) == list(range(first, first + 10))
        await until(lambda: gw.members() == [1], "the group without the one that left")

        # Written while it is away: more than the window, and some another class sees only.
        await gw.append(
            [(f"rx_d_{i:02d}", {"pharmacy": "ph-1" if i % 3 else "ph-9"}) for i in range(10, 50)]
        )
        expected = [i for i in range(10, 50) if i % 3]
        async with await GraphQLSocket.open(
            gw.base, gw.token("PARTNER", "partner-2", "ph-1")
        ) as again:
            await again.subscribe("events", EVENTS, {"after": seen[-1]["leafIndex"]})
            await until(lambda: gw.members() == [2], "the resumed member back in its group")
            rest = await changes(again, "events", len(expected))
            fence, _ = await asyncio.gather(
                changes(again, "events", 1), gw.append([("rx_d_fence", {"pharmacy": "ph-1"})])
            )
        assert [e["prescriptionId"] for e in rest] == [f"rx_d_{i:02d}" for i in expected]
        assert indices(rest) == [first + i for i in expected]
        assert fence[0]["prescriptionId"] == "rx_d_fence"
        assert fence[0]["leafIndex"] == first + 50

        stayed_saw = await changes(stayed, "events", 10 + len(expected) + 1)
        assert indices(stayed_saw) == [*range(first, first + 10), *indices(rest), first + 50]
    finally:
        await stayed.close()
    # The one that stayed had executed what the resumed one read back: one execution each.
    assert gw.fanout.executions == 10 + len(expected) + 1


# --- a member's stream failing ---------------------------------------------------------------


async def test_a_member_whose_backlog_read_fails_gets_a_typed_error_and_its_group_goes_on(
    start_gateway,
    toxiproxy,  # noqa: F811 (the fixture imported above)
):
    # The gateway reaches the database through toxiproxy; the test appends directly. With the
    # proxy disabled, a member resuming from before the window cannot read its backlog: it is
    # answered as a resolver's database error is (UNAVAILABLE, then complete), and the member
    # already live in its group keeps receiving from the window.
    gw = await start_gateway(
        MONGODB_URI=f"mongodb://{toxiproxy.listen}/",
        RXLEDGER_DB_TIMEOUT_MS="1500",
        RXLEDGER_SUBSCRIPTION_WINDOW="16",
    )
    first = await gw.size()
    async with await GraphQLSocket.open(gw.base, gw.token("ADMIN", "adm-1")) as live:
        await live.subscribe("events", EVENTS, {"after": first - 1})
        await until(lambda: gw.members() == [1], "a group")
        await gw.append([(f"rx_f_{i:02d}", {"pharmacy": "ph-1"}) for i in range(30)])
        assert indices(await changes(live, "events", 30)) == list(range(first, first + 30))

        toxiproxy.enable(False)
        try:
            async with await GraphQLSocket.open(gw.base, gw.token("ADMIN", "adm-2")) as late:
                await late.subscribe("events", EVENTS, {"after": first - 1})
                message = await late.receive(EVENT_TIMEOUT)
                assert message["type"] == "next" and message["payload"]["data"] is None, message
                (error,) = message["payload"]["errors"]
                assert error["extensions"]["code"] == "UNAVAILABLE", error
                assert error["path"] == ["prescriptionEvents"], error
                assert await late.receive(EVENT_TIMEOUT) == {"id": "events", "type": "complete"}
        finally:
            toxiproxy.enable(True)
        assert gw.members() == [1]
