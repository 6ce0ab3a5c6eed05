"""Who sees and does what: one table of expectations, checked on every path that enforces it.

The table below (`VIEWERS`, `SEES`, `MAY`) is the specification, written out by hand: role ×
relation to the prescription (own or other prescriber, same or other pharmacy, courier with the
same id and company / same id and another company / another id, own or other patient, partner
of the pharmacy / of the courier company / of another organization, tokens without `org`,
auditor, admin) × operation. For every cell, over real HTTP and WebSocket against a real uvicorn
gateway and the real database, these must all agree with it:

- the listing (`prescriptions`: the MongoDB filter derived from the policy),
- the node read (`prescription(id)`: the policy's document check),
- the subscription (`prescriptionEvents`: the policy applied to each event's routing tags),
- each mutation (`check_role`, then the node check, then `check_may_act`),
- and app.policy itself, asked in-process about the stored documents.

The world: one prescription at each of ISSUED, DISPENSED, IN_TRANSIT and DELIVERED, all with
the same parties; the courier is on the last two only. A subscriber must receive exactly the
world's events whose resulting state it may see; so that "not received" is never concluded
from waiting, each subscriber reads on until an event it must receive that was appended after
every world event had been sequenced (a sentinel), and events arrive in leaf order.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pymongo import MongoClient
from test_prescriptions import LIMITS, MAY_CALL, MEDICATION, Gateway, call, launch, running
from ws_client import GraphQLSocket

from app import policy
from app.auth import Role, Viewer

U = uuid.uuid4().hex[:8]

# The parties of the world's prescriptions, and "another" one of each.
PRESCRIBER, OTHER_PRESCRIBER = f"dr-{U}", f"dr-x-{U}"
PATIENT, OTHER_PATIENT = f"pat-{U}", f"pat-x-{U}"
PHARMACY, OTHER_PHARMACY = f"pharm-{U}", f"pharm-x-{U}"
COURIER, OTHER_COURIER = f"c-{U}", f"c-x-{U}"
COMPANY, OTHER_COMPANY = f"co-{U}", f"co-x-{U}"

STATUSES = ("ISSUED", "DISPENSED", "IN_TRANSIT", "DELIVERED")
ALL = frozenset(STATUSES)
CARRIED = frozenset({"IN_TRANSIT", "DELIVERED"})  # a courier is on the prescription
NONE: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Who:
    role: str
    sub: str
    org: str | None
    sees: frozenset[str]  # the world's statuses at which this viewer sees the prescription
    sentinel: str | None  # which sentinel it must receive (None: it may not subscribe at all)

    @property
    def viewer(self) -> Viewer:
        return Viewer(self.sub, Role[self.role], self.org)


VIEWERS: dict[str, Who] = {
    "prescriber/own": Who("PRESCRIBER", PRESCRIBER, "cardiology", ALL, "ours"),
    "prescriber/other": Who("PRESCRIBER", OTHER_PRESCRIBER, "cardiology", NONE, "theirs"),
    "pharmacist/same pharmacy": Who("PHARMACIST", f"ph-{U}", PHARMACY, ALL, "ours"),
    "pharmacist/other pharmacy": Who("PHARMACIST", f"ph-{U}", OTHER_PHARMACY, NONE, "theirs"),
    "pharmacist/no org": Who("PHARMACIST", f"ph-{U}", None, NONE, None),
    "courier/same id and company": Who("COURIER", COURIER, COMPANY, CARRIED, "ours"),
    "courier/same id, other company": Who("COURIER", COURIER, OTHER_COMPANY, NONE, "theirs"),
    "courier/other id, same company": Who("COURIER", OTHER_COURIER, COMPANY, NONE, "colleague"),
    "courier/no org": Who("COURIER", COURIER, None, NONE, None),
    "patient/own": Who("PATIENT", PATIENT, None, ALL, "ours"),
    "patient/other": Who("PATIENT", OTHER_PATIENT, None, NONE, "theirs"),
    "partner/of the pharmacy": Who("PARTNER", f"p-{U}", PHARMACY, ALL, "ours"),
    "partner/of the courier company": Who("PARTNER", f"p-{U}", COMPANY, CARRIED, "ours"),
    "partner/of another organization": Who("PARTNER", f"p-{U}", OTHER_PHARMACY, NONE, "theirs"),
    "partner/no org": Who("PARTNER", f"p-{U}", None, NONE, None),
    "auditor": Who("AUDITOR", f"aud-{U}", None, ALL, "ours"),
    "admin": Who("ADMIN", f"adm-{U}", None, ALL, "ours"),
}
HIDDEN = {"auditor"}  # personal fields (and the erasure's reason) withheld

# The mutations a world prescription at a status is open to (the statuses each leaves).
ATTEMPTS = [
    ("cancelPrescription", "ISSUED"),
    ("rejectPrescription", "ISSUED"),
    ("dispensePrescription", "ISSUED"),
    ("erasePersonalData", "ISSUED"),
    ("handToCourier", "DISPENSED"),
    ("deliverPrescription", "DISPENSED"),
    ("deliverPrescription", "IN_TRANSIT"),
    ("confirmReceipt", "DELIVERED"),
]
# Who may take them, beyond seeing the prescription.
MAY = {
    ("prescriber/own", "cancelPrescription", "ISSUED"),
    ("pharmacist/same pharmacy", "rejectPrescription", "ISSUED"),
    ("pharmacist/same pharmacy", "dispensePrescription", "ISSUED"),
    ("pharmacist/same pharmacy", "handToCourier", "DISPENSED"),
    ("pharmacist/same pharmacy", "deliverPrescription", "DISPENSED"),  # pick-up at the counter
    ("courier/same id and company", "deliverPrescription", "IN_TRANSIT"),
    ("patient/own", "confirmReceipt", "DELIVERED"),
    ("admin", "erasePersonalData", "ISSUED"),
}
ARGS: dict[str, dict[str, Any]] = {
    "cancelPrescription": {"reason": "changed"},
    "rejectPrescription": {"reason": "out of stock"},
    "erasePersonalData": {"reason": "legal request"},
    "handToCourier": {"courier": COURIER, "courierOrganization": COMPANY},
}

EVENTS = """subscription($after: Int) {
  prescriptionEvents(afterLeafIndex: $after) { prescriptionId version leafIndex }
}"""
LISTING = """query($after: String) { prescriptions(first: 50, after: $after) {
  edges { node { id } } pageInfo { hasNextPage endCursor } } }"""
NODE = """query($id: ID!) { prescription(id: $id) {
  id redacted patient { id name } medications { code } notes erased { reason } } }"""
HISTORY = """query($id: ID!) { prescription(id: $id) { version history { leafIndex } } }"""


# --- the world ----------------------------------------------------------------------------------


class Parties:
    """Tokens of the world's (or another world's) staff, and the steps that build it."""

    def __init__(
        self,
        gw: Gateway,
        prescriber: str = PRESCRIBER,
        patient: str = PATIENT,
        pharmacy: str = PHARMACY,
    ) -> None:
        self.gw = gw
        self.prescriber = gw.token("PRESCRIBER", prescriber, "cardiology")
        self.pharmacist = gw.token("PHARMACIST", f"ph-{U}", pharmacy)
        self.patient_id = patient
        self.pharmacy = pharmacy
        self.admin = gw.token("ADMIN", f"adm-{U}")

    def at(self, status: str, courier: str = COURIER, company: str = COMPANY) -> tuple[str, int]:
        """A new prescription taken to `status` along the courier path; its id and version."""
        issued = call(
            self.gw,
            self.prescriber,
            "issuePrescription",
            input={
                "patient": {"id": self.patient_id, "name": f"Ada {self.patient_id}"},
                "medications": [MEDICATION],
                "pharmacy": self.pharmacy,
            },
        )
        assert issued["__typename"] == "Prescription", issued
        rid, version = issued["id"], 1
        steps = [
            ("dispensePrescription", self.pharmacist, {}),
            (
                "handToCourier",
                self.pharmacist,
                {"courier": courier, "courierOrganization": company},
            ),
            ("deliverPrescription", self.gw.token("COURIER", courier, company), {}),
        ]
        for mutation, tok, args in steps[: STATUSES.index(status)]:
            done = call(self.gw, tok, mutation, id=rid, expectedVersion=version, **args)
            assert done["__typename"] == "Prescription", done
            version = done["version"]
        return rid, version


@dataclass
class Seen:
    """What one viewer got on each read path."""

    listed: frozenset[str] | str  # world statuses listed, or the error code
    nodes: frozenset[str]
    node_redacted: dict[str, bool]
    events: frozenset[tuple[str, int]] | str  # (status of the world rid, version), or error


@dataclass
class World:
    gw: Gateway
    mongo: MongoClient[dict[str, Any]]
    rids: dict[str, str]  # status -> prescription id
    seen: dict[str, Seen]


def token(gw: Gateway, who: Who) -> str:
    return gw.token(who.role, who.sub, who.org)


def history_of(gw: Gateway, admin: str, rid: str) -> list[int | None]:
    found = gw.data(HISTORY, admin, id=rid)["prescription"]
    return [e["leafIndex"] for e in found["history"]]


def wait_sequenced(gw: Gateway, admin: str, rids: list[str]) -> int:
    """Wait until every event of `rids` has a leaf index; the smallest of them."""
    for _ in range(400):
        indices = [i for rid in rids for i in history_of(gw, admin, rid)]
        if all(i is not None for i in indices):
            return min(i for i in indices if i is not None)
        time.sleep(0.05)
    pytest.fail("the world's events were not sequenced within 20 s")


def listing(gw: Gateway, tok: str) -> set[str] | str:
    ids: set[str] = set()
    after = None
    while True:
        out = gw.gql(LISTING, tok, after=after)
        if out.get("errors"):
            return str(out["errors"][0]["extensions"]["code"])
        page = out["data"]["prescriptions"]
        ids |= {edge["node"]["id"] for edge in page["edges"]}
        if not page["pageInfo"]["hasNextPage"]:
            return ids
        after = page["pageInfo"]["endCursor"]


async def subscription(
    gw: Gateway, tok: str, after: int, until: str, world: set[str]
) -> set[tuple[str, int]] | str:
    """The world's events the subscriber receives before the last event of `until` (the
    sentinel), or the error code when the subscription is refused."""
    received: set[tuple[str, int]] = set()
    async with await GraphQLSocket.open(gw.base, tok) as socket:
        await socket.subscribe("s", EVENTS, {"after": after})
        while True:
            message = await socket.receive(60)
            payload = message.get("payload")
            if message["type"] == "error":
                return str(payload[0]["extensions"]["code"])
            assert message["type"] == "next", message
            if payload.get("errors"):
                return str(payload["errors"][0]["extensions"]["code"])
            event = payload["data"]["prescriptionEvents"]
            if event["prescriptionId"] in world:
                received.add((event["prescriptionId"], event["version"]))
            if event["prescriptionId"] == until and event["version"] == 3:
                return received


@pytest.fixture(scope="module")
def world(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    db = f"t_policy_{uuid.uuid4().hex[:12]}"
    mongo: MongoClient[dict[str, Any]] = MongoClient(mongo_uri, tz_aware=True)
    try:
        with running(launch(mongo_uri, db, tmp_path_factory.mktemp("policy"), **LIMITS)) as (gw,):
            yield build(gw, mongo)
    finally:
        mongo.drop_database(db)
        mongo.close()


def build(gw: Gateway, mongo: MongoClient[dict[str, Any]]) -> World:
    ours = Parties(gw)
    rids = {status: ours.at(status)[0] for status in STATUSES}
    first = wait_sequenced(gw, ours.admin, list(rids.values()))
    # Sentinels, appended after every world event is sequenced, so they follow in leaf order.
    # Each is taken to IN_TRANSIT (version 3), which each viewer of its kind sees.
    theirs = Parties(gw, OTHER_PRESCRIBER, OTHER_PATIENT, OTHER_PHARMACY)
    sentinels = {
        "ours": ours.at("IN_TRANSIT")[0],
        "theirs": theirs.at("IN_TRANSIT", COURIER, OTHER_COMPANY)[0],
        "colleague": theirs.at("IN_TRANSIT", OTHER_COURIER, COMPANY)[0],
    }
    by_rid = {rid: status for status, rid in rids.items()}

    async def subscribe_all() -> list[set[tuple[str, int]] | str]:
        return await asyncio.gather(
            *(
                subscription(
                    gw,
                    token(gw, who),
                    first - 1,
                    sentinels[who.sentinel or "ours"],
                    set(by_rid),
                )
                for who in VIEWERS.values()
            )
        )

    events = asyncio.run(asyncio.wait_for(subscribe_all(), 180))
    seen: dict[str, Seen] = {}
    for (name, who), got in zip(VIEWERS.items(), events, strict=True):
        tok = token(gw, who)
        listed = listing(gw, tok)
        nodes = {s: gw.data(NODE, tok, id=rid)["prescription"] for s, rid in rids.items()}
        seen[name] = Seen(
            listed=listed
            if isinstance(listed, str)
            else frozenset(by_rid[r] for r in listed if r in by_rid),
            nodes=frozenset(s for s, node in nodes.items() if node is not None),
            node_redacted={s: node["redacted"] for s, node in nodes.items() if node is not None},
            events=got if isinstance(got, str) else frozenset((by_rid[r], v) for r, v in got),
        )
    return World(gw, mongo, rids, seen)


# --- read paths ---------------------------------------------------------------------------------

VERSION_STATUS = {1: "ISSUED", 2: "DISPENSED", 3: "IN_TRANSIT", 4: "DELIVERED"}


def expected_events(who: Who) -> frozenset[tuple[str, int]]:
    """Each world event whose resulting state the viewer sees (the world prescription at
    `status` went through versions 1..its status)."""
    return frozenset(
        (status, version)
        for status in STATUSES
        for version in range(1, STATUSES.index(status) + 2)
        if VERSION_STATUS[version] in who.sees
    )


@pytest.mark.parametrize("name", list(VIEWERS))
def test_listing_node_read_and_subscription_agree_with_the_table(world: World, name: str) -> None:
    who, seen = VIEWERS[name], world.seen[name]
    assert seen.nodes == who.sees
    if who.sentinel is None:  # a token that can see nothing is told so, on both streams
        assert (seen.listed, seen.events) == ("FORBIDDEN", "FORBIDDEN")
    else:
        assert seen.listed == who.sees
        assert seen.events == expected_events(who)
    assert all(hidden == (name in HIDDEN) for hidden in seen.node_redacted.values())


@pytest.mark.parametrize("name", list(VIEWERS))
def test_the_policy_module_says_what_the_table_says(world: World, name: str) -> None:
    who = VIEWERS[name]
    docs = world.mongo[world.gw.db]["prescriptions"]
    for status, rid in world.rids.items():
        doc = docs.find_one({"_id": rid})
        assert doc is not None and doc["status"] == status
        assert policy.can_see(who.viewer, doc) == (status in who.sees), status
        query = policy.visibility_filter(who.viewer)
        listed = query is not None and docs.count_documents({"$and": [query, {"_id": rid}]}) == 1
        assert listed == (status in who.sees), status
    for mutation, status in ATTEMPTS:
        doc = docs.find_one({"_id": world.rids[status]})
        assert doc is not None
        allowed = (
            who.viewer.role in policy.MUTATION_ROLES[mutation]
            and policy.can_see(who.viewer, doc)
            and policy.may_act(who.viewer, doc, mutation) is None
        )
        assert allowed == ((name, mutation, status) in MAY), (mutation, status)
    assert policy.personal_data_hidden(who.viewer) == (name in HIDDEN)


def test_server_sent_events_refuse_a_token_that_can_see_nothing(world: World) -> None:
    for who in VIEWERS.values():
        if who.sentinel is not None:
            continue
        r = httpx.get(
            f"{world.gw.base}/events",
            params={"afterLeafIndex": "-1"},
            headers={"Authorization": f"Bearer {token(world.gw, who)}"},
            timeout=10,
        )
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "FORBIDDEN"
        assert "needs an 'org' claim" in r.json()["error"]["message"]


# --- mutations ----------------------------------------------------------------------------------


def ledger_count(world: World, rid: str) -> int:
    return world.mongo[world.gw.db]["ledger"].count_documents({"subject": rid})


@pytest.mark.parametrize(("mutation", "status"), ATTEMPTS)
@pytest.mark.parametrize("name", list(VIEWERS))
def test_each_mutation_is_allowed_exactly_where_the_table_says(
    world: World, name: str, mutation: str, status: str
) -> None:
    who = VIEWERS[name]
    if (name, mutation, status) in MAY:
        # On a fresh prescription like the world's, so that the world stays as it is.
        rid, version = Parties(world.gw).at(status)
    else:
        rid = world.rids[status]
        version = STATUSES.index(status) + 1
    before = ledger_count(world, rid)
    result = call(
        world.gw,
        token(world.gw, who),
        mutation,
        id=rid,
        expectedVersion=version,
        **ARGS.get(mutation, {}),
    )
    if who.role not in MAY_CALL[mutation]:
        expected = "Forbidden"  # by role, before the prescription is read
    elif status not in who.sees:
        expected = "NotFound"  # as if absent: the node read says null too
    elif (name, mutation, status) in MAY:
        expected = "Prescription"
    else:
        expected = "Forbidden"  # sees it, may not take this step
    assert result["__typename"] == expected, result
    assert ledger_count(world, rid) == before + (expected == "Prescription")


@pytest.mark.parametrize("name", list(VIEWERS))
def test_only_a_prescriber_may_issue(world: World, name: str) -> None:
    who = VIEWERS[name]
    result = call(
        world.gw,
        token(world.gw, who),
        "issuePrescription",
        input={
            "patient": {"id": f"pat-issue-{U}", "name": "Grace"},
            "medications": [MEDICATION],
            "pharmacy": f"pharm-issue-{U}",
        },
    )
    assert result["__typename"] == ("Prescription" if who.role == "PRESCRIBER" else "Forbidden")
