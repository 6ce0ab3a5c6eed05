"""The WebSocket path is as strict as HTTP: token expiry, rate limit and body size are checked
on every operation of a graphql-transport-ws socket, each operation reads the database afresh,
and the server refuses to buffer a huge frame.

Real uvicorn gateways (`rxledger serve`), a real WebSocket client (tests/ws_client.py), real
HS256 JWTs with short lifetimes and a real MongoDB-protocol server. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import pytest
from test_subscriptions import (
    DISPENSE,
    ISSUE,
    Gateway,
    StartGateway,
    graphql,
    http_client,
    issue,
    start_gateway,  # noqa: F401 (a fixture)
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from ws_client import GraphQLSocket, ws_url

READ = """query($id: ID!) {
  prescription(id: $id) { status version redacted patient { name } erased { reason } }
}"""

PROOFS = """query($id: ID!) {
  prescription(id: $id) { history { leafIndex proof { treeSize } } }
}"""

ERASE = """mutation($id: ID!, $version: Int!) {
  erasePersonalData(id: $id, expectedVersion: $version, reason: "patient request") {
    __typename
    ... on Prescription { version }
    ... on Error { message }
  }
}"""

LIST = "{ prescriptions(first: 10) { edges { node { id } } } }"


def data(message: dict[str, Any]) -> dict[str, Any]:
    """The data of a `next` message that carries no errors."""
    assert message["type"] == "next", message
    payload = message["payload"]
    assert not payload.get("errors"), payload
    result: dict[str, Any] = payload["data"]
    return result


def refusal(message: dict[str, Any]) -> dict[str, Any]:
    """The one GraphQL error of an `error` message."""
    assert message["type"] == "error", message
    (error,) = message["payload"]
    result: dict[str, Any] = error
    return result


def expiry(token: str) -> float:
    exp: float = jwt.decode(token, options={"verify_signature": False})["exp"]
    return exp


async def until(moment: float) -> None:
    """Wait until the wall clock reaches `moment` (a token's exp)."""
    while (left := moment - time.time()) > 0:
        await asyncio.sleep(left + 0.05)


# --- token expiry ----------------------------------------------------------------------------


async def test_a_query_or_mutation_on_an_open_socket_after_the_token_expired_is_refused(
    start_gateway: StartGateway,  # noqa: F811 (the fixture imported above)
) -> None:
    gw = await start_gateway()  # RXLEDGER_JWT_LEEWAY is its default: 30 s
    token = gw.token("PRESCRIBER", "dr-sub", "cardiology", ttl_seconds=5)
    async with await GraphQLSocket.open(gw.base, token) as socket:
        assert data(await socket.execute("before", LIST)) == {"prescriptions": {"edges": []}}

        await until(expiry(token))
        query = refusal(await socket.execute("query", LIST))
        assert query["extensions"]["code"] == "UNAUTHENTICATED", query
        assert "token has expired" in query["message"], query

        variables = {
            "input": {
                "patient": {"id": "pt-1", "name": "Patient pt-1"},
                "medications": [
                    {"code": "N02BE01", "name": "paracetamol", "dose": "500 mg", "quantity": 20}
                ],
                "pharmacy": "ph-1",
            }
        }
        mutation = refusal(await socket.execute("mutation", ISSUE, variables))
        assert mutation["extensions"]["code"] == "UNAUTHENTICATED", mutation
        assert "token has expired" in mutation["message"], mutation

    # The refusal came before execution: nothing was filed.
    async with http_client() as client:
        fresh = gw.token("PRESCRIBER", "dr-sub", "cardiology")
        assert await graphql(client, gw, LIST, fresh) == {"prescriptions": {"edges": []}}


# --- one set of DataLoaders per operation ----------------------------------------------------


async def test_a_socket_reads_a_prescription_afresh_after_it_changed_and_was_erased(
    start_gateway: StartGateway,  # noqa: F811 (the fixture imported above)
) -> None:
    gw = await start_gateway()
    admin = gw.token("ADMIN", "adm-1")
    async with http_client() as client, await GraphQLSocket.open(gw.base, admin) as socket:
        rid = await issue(client, gw, pharmacy="ph-1")
        first = data(await socket.execute("1", READ, {"id": rid}))["prescription"]
        assert (first["status"], first["version"]) == ("ISSUED", 1), first
        assert first["patient"] == {"name": "Patient pt-1"}, first

        pharmacist = gw.token("PHARMACIST", "ph-user", "ph-1")
        done = await graphql(client, gw, DISPENSE, pharmacist, id=rid, version=1)
        assert done["dispensePrescription"]["__typename"] == "Prescription", done
        second = data(await socket.execute("2", READ, {"id": rid}))["prescription"]
        assert (second["status"], second["version"]) == ("DISPENSED", 2), second

        erased = await graphql(client, gw, ERASE, admin, id=rid, version=2)
        assert erased["erasePersonalData"]["__typename"] == "Prescription", erased
        third = data(await socket.execute("3", READ, {"id": rid}))["prescription"]
        assert third["version"] == 3, third
        assert third["patient"] is None and third["redacted"], third
        assert third["erased"] == {"reason": "patient request"}, third


async def test_a_socket_proves_with_the_checkpoint_current_at_each_operation(
    start_gateway: StartGateway,  # noqa: F811 (the fixture imported above)
) -> None:
    gw = await start_gateway()
    admin = gw.token("ADMIN", "adm-1")
    async with http_client() as client, await GraphQLSocket.open(gw.base, admin) as socket:
        earlier = await issue(client, gw, pharmacy="ph-1")
        data(await socket.execute("earlier", PROOFS, {"id": earlier}))

        # Filed after the socket's first read, so no checkpoint that read could see covers it.
        later = await issue(client, gw, pharmacy="ph-1")
        deadline = time.monotonic() + 60
        while True:
            over_http = await graphql(client, gw, PROOFS, admin, id=later)
            (event,) = over_http["prescription"]["history"]
            if event["proof"] is not None:
                break
            assert time.monotonic() < deadline, f"{later} not anchored in 60 s"
            await asyncio.sleep(0.1)

        over_socket = data(await socket.execute("later", PROOFS, {"id": later}))
        (event,) = over_socket["prescription"]["history"]
        assert event["proof"] is not None, over_socket
        assert event["proof"]["treeSize"] > event["leafIndex"], over_socket


# --- rate limit ------------------------------------------------------------------------------


async def test_operations_over_the_rate_on_a_socket_are_refused_with_a_retry_hint(
    start_gateway: StartGateway,  # noqa: F811 (the fixture imported above)
) -> None:
    # Three at once, then one every 1000 s: nothing refills during the test.
    gw = await start_gateway(RXLEDGER_RATE_LIMIT="0.001", RXLEDGER_RATE_BURST="3")
    token = gw.token("AUDITOR", "hasty")
    async with await GraphQLSocket.open(gw.base, token) as socket:
        for op in ("1", "2", "3"):
            assert "ledger" in data(await socket.execute(op, "{ ledger { size } }"))
        limited = refusal(await socket.execute("4", "{ ledger { size } }"))
        assert limited["extensions"]["code"] == "RATE_LIMITED", limited
        assert limited["extensions"]["retryAfter"] >= 1, limited
        assert limited["message"].startswith("rate limit exceeded for AUDITOR:hasty: retry in"), (
            limited
        )

    # The socket and HTTP draw on one bucket: neither gets around the other.
    async with http_client() as client:
        r = await client.post(
            f"{gw.base}/graphql",
            json={"query": "{ ledger { size } }"},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert r.status_code == 429, r.text
    other = gw.token("AUDITOR", "calm")
    async with await GraphQLSocket.open(gw.base, other) as socket:
        assert "ledger" in data(await socket.execute("1", "{ ledger { size } }"))


# --- message size ----------------------------------------------------------------------------


def padded(size: int) -> str:
    """A small query behind a comment, `size` characters in all."""
    query = "{ ledger { size } }"
    return "#" + "x" * (size - len(query) - 2) + "\n" + query


async def test_a_subscribe_message_larger_than_the_body_limit_is_refused(
    start_gateway: StartGateway,  # noqa: F811 (the fixture imported above)
) -> None:
    gw = await start_gateway(RXLEDGER_MAX_BODY_BYTES="4096")
    async with await GraphQLSocket.open(gw.base) as socket:
        too_large = refusal(await socket.execute("big", padded(6000)))
        assert too_large["extensions"]["code"] == "REQUEST_TOO_LARGE", too_large
        assert "exceeds the maximum of 4096 bytes" in too_large["message"], too_large
        # The connection stays usable: only that operation was refused.
        assert "ledger" in data(await socket.execute("small", padded(3000)))


async def test_a_huge_websocket_frame_closes_the_connection_unbuffered(
    start_gateway: StartGateway,  # noqa: F811 (the fixture imported above)
) -> None:
    gw = await start_gateway(RXLEDGER_MAX_BODY_BYTES="4096")
    async with await GraphQLSocket.open(gw.base) as socket:
        await socket.subscribe("huge", padded(100_000))
        with pytest.raises(ConnectionClosed) as closed:
            await socket.receive()
    assert closed.value.rcvd is not None, "closed without a close frame"
    assert closed.value.rcvd.code == 1009, closed.value  # message too big


# --- one protocol ----------------------------------------------------------------------------


async def test_the_legacy_graphql_ws_subprotocol_is_not_served(
    start_gateway: StartGateway,  # noqa: F811 (the fixture imported above)
) -> None:
    """The older protocol would run operations past every check above."""
    gw: Gateway = await start_gateway()
    async with connect(ws_url(gw.base), subprotocols=["graphql-ws"], open_timeout=30) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4406, closed.value
