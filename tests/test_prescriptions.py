"""Prescriptions over HTTP: a real uvicorn gateway, real JWTs, a real MongoDB-protocol server.

One gateway serves most tests (module scope; every test files its own prescriptions under a
fresh pharmacy and patient, so tests do not see each other's). Tests that need other settings
(no anchoring for a while; a low rate limit; production mode) share three more gateways, started
together when the first of those tests runs. Every gateway has a database of its own, and only
the rate limit test's gateway limits the rate: no other test shares its buckets or polls it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from bson import Binary
from conftest import Databases
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from pymongo import MongoClient
from test_gateway import ORIGIN, env_for, serve

from anchoring.encoding import canonical_json
from anchoring.note import parse_verifier_key
from anchoring.receipt import open_receipt
from app.auth import load_dev_secret, mint_token

ROOT = Path(__file__).resolve().parent.parent

# The main gateway's request limits, set explicitly so the tests below can cross them.
LIMITS = {
    "RXLEDGER_MAX_DEPTH": "5",
    "RXLEDGER_MAX_ALIASES": "10",
    "RXLEDGER_MAX_TOKENS": "1000",
    "RXLEDGER_MAX_BODY_BYTES": "16384",
    "RXLEDGER_MAX_PAGE": "50",
    "RXLEDGER_RATE_LIMIT": "0",  # off (as by env_for): the rate limit test has its own gateway
}

ROLES = ("PRESCRIBER", "PHARMACIST", "COURIER", "PATIENT", "PARTNER", "AUDITOR", "ADMIN")

# Who may call each mutation (schema.graphql's descriptions and DESIGN.md's roles).
MAY_CALL = {
    "issuePrescription": {"PRESCRIBER"},
    "cancelPrescription": {"PRESCRIBER"},
    "rejectPrescription": {"PHARMACIST"},
    "dispensePrescription": {"PHARMACIST"},
    "handToCourier": {"PHARMACIST"},
    "deliverPrescription": {"COURIER", "PHARMACIST"},
    "confirmReceipt": {"PATIENT"},
    "erasePersonalData": {"ADMIN"},
}

RESULT = """
    __typename
    ... on Error { message }
    ... on Prescription {
      id status version redacted reason prescriber pharmacy courier courierOrganization
      patient { id name } medications { code quantity } notes
    }
"""

PRESCRIPTION = """query($id: ID!) { prescription(id: $id) {
  id status version redacted reason prescriber department pharmacy courier courierOrganization
  patient { id name } medications { code name dose quantity instructions } notes
  issuedAt timeline { status at } erased { by reason }
  history {
    type version actor at leafIndex leaf
    proof { leafIndex treeSize leafHash bundle checkpoint { size note } }
    receipt { leafIndex leafHash note }
  }
  integrity { status leafIndex detail proof { leafIndex treeSize bundle } }
} }"""

LISTING = """query($filter: PrescriptionFilter, $first: Int!, $after: String) {
  prescriptions(filter: $filter, first: $first, after: $after) {
    edges { cursor node { id status pharmacy courierOrganization redacted patient { id name } } }
    pageInfo { hasNextPage endCursor }
  }
}"""

# Types of the variables a mutation call declares (non-null fits nullable arguments too).
ARGUMENT_TYPES = {
    "input": "IssuePrescriptionInput!",
    "id": "ID!",
    "expectedVersion": "Int!",
    "idempotencyKey": "String!",
    "reason": "String!",
    "courier": "String!",
    "courierOrganization": "String!",
}

MEDICATION = {
    "code": "N02BE01",
    "name": "Paracetamol",
    "dose": "500 mg",
    "quantity": 20,
    "instructions": "one tablet every six hours",
}


# --- the gateway process ----------------------------------------------------------------------


@dataclass
class Gateway:
    base: str
    db: str
    var_dir: Path
    log_path: Path
    mint: Callable[..., str]
    # One client, its connections reused: creating an httpx client costs far more than a request.
    http: httpx.Client

    def token(self, role: str, sub: str, org: str | None = None) -> str:
        return self.mint(role=role, subject=sub, organization=org)

    def post(self, body: Any, token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.http.post("/graphql", json=body, headers=headers)

    def gql(self, query: str, token: str | None = None, **variables: Any) -> dict[str, Any]:
        r = self.post({"query": query, "variables": variables}, token)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def data(self, query: str, token: str | None = None, **variables: Any) -> dict[str, Any]:
        """The data of a query that must not fail."""
        out = self.gql(query, token, **variables)
        assert "errors" not in out, out["errors"]
        data: dict[str, Any] = out["data"]
        return data

    def verifier_key(self) -> str:
        return str(self.data("{ ledger { verifierKey } }")["ledger"]["verifierKey"])

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def launch(
    mongo_uri: str, db: str, tmp: Path, mint: Callable[..., str] | None = None, **env: str
) -> tuple[Gateway, subprocess.Popen[bytes]]:
    """Start a gateway process on a free port over database `db` (not yet ready)."""
    tmp.mkdir(parents=True, exist_ok=True)
    environment = env_for(mongo_uri, db, tmp)
    environment.update(env)
    var_dir = Path(environment["RXLEDGER_VAR_DIR"])
    if mint is None:
        # The gateway reads its development HS256 secret from the same file under var/.
        secret = load_dev_secret(var_dir)

        def mint(**claims: Any) -> str:
            return mint_token(secret=secret, **claims)

    log_path = tmp / "gateway.log"
    base, proc = serve(environment, log_path)
    http = httpx.Client(base_url=base, timeout=30)
    return Gateway(base, db, var_dir, log_path, mint, http), proc


@contextlib.contextmanager
def running(*launched: tuple[Gateway, subprocess.Popen[bytes]]) -> Iterator[list[Gateway]]:
    """Wait until every launched gateway is ready (they start in parallel); stop them on exit."""
    try:
        for gateway, proc in launched:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if gateway.http.get("/readyz", timeout=1).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"gateway did not start: {gateway.log_tail()}")
                time.sleep(0.05)
        yield [gateway for gateway, _ in launched]
    finally:
        for gateway, proc in launched:
            gateway.http.close()
            proc.terminate()
        for _, proc in launched:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def gw(
    mongo_uri: str, databases: Databases, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    launched = launch(mongo_uri, databases.new(), tmp_path_factory.mktemp("gateway"), **LIMITS)
    with running(launched) as (gateway,):
        yield gateway


# --- the parties of one test ---------------------------------------------------------------


@dataclass
class Parties:
    """A fresh patient, pharmacy and staff for one test, so no test sees another's data."""

    gw: Gateway
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:10])

    @property
    def patient_id(self) -> str:
        return f"pat-{self.uid}"

    @property
    def patient_name(self) -> str:
        return f"Ada Lovelace {self.uid}"

    @property
    def pharmacy(self) -> str:
        return f"pharm-{self.uid}"

    @property
    def courier_org(self) -> str:
        return f"couriers-{self.uid}"

    @property
    def prescriber(self) -> str:
        return self.gw.token("PRESCRIBER", f"dr-{self.uid}", "cardiology")

    @property
    def pharmacist(self) -> str:
        return self.gw.token("PHARMACIST", f"ph-{self.uid}", self.pharmacy)

    @property
    def courier(self) -> str:
        return self.gw.token("COURIER", "c-7", self.courier_org)

    @property
    def patient(self) -> str:
        return self.gw.token("PATIENT", self.patient_id)

    @property
    def admin(self) -> str:
        return self.gw.token("ADMIN", f"admin-{self.uid}")

    @property
    def auditor(self) -> str:
        return self.gw.token("AUDITOR", f"auditor-{self.uid}")

    def by_role(self, role: str) -> str:
        """A token of `role` that could see this test's prescriptions."""
        return {
            "PRESCRIBER": self.prescriber,
            "PHARMACIST": self.pharmacist,
            "COURIER": self.courier,
            "PATIENT": self.patient,
            "PARTNER": self.gw.token("PARTNER", f"partner-{self.uid}", self.pharmacy),
            "AUDITOR": self.auditor,
            "ADMIN": self.admin,
        }[role]

    def input(self, **changes: Any) -> dict[str, Any]:
        value: dict[str, Any] = {
            "patient": {"id": self.patient_id, "name": self.patient_name},
            "medications": [MEDICATION],
            "pharmacy": self.pharmacy,
            "notes": "take with food",
        }
        value.update(changes)
        return value

    def issued(self, **changes: Any) -> str:
        result = call(self.gw, self.prescriber, "issuePrescription", input=self.input(**changes))
        assert result["__typename"] == "Prescription", result
        return str(result["id"])

    def hand_over(self, rid: str, expected_version: int) -> dict[str, Any]:
        """This test's pharmacist hands a dispensed prescription to its courier c-7; returns
        the mutation's result."""
        return call(
            self.gw,
            self.pharmacist,
            "handToCourier",
            id=rid,
            expectedVersion=expected_version,
            courier="c-7",
            courierOrganization=self.courier_org,
        )

    def advance(self, rid: str, to: str) -> int:
        """Take a freshly issued prescription to status `to` (CANCELLED, or a status along the
        courier path); returns its version there."""
        courier_path = [
            ("DISPENSED", "dispensePrescription", self.pharmacist, {}),
            (
                "IN_TRANSIT",
                "handToCourier",
                self.pharmacist,
                {"courier": "c-7", "courierOrganization": self.courier_org},
            ),
            ("DELIVERED", "deliverPrescription", self.courier, {}),
            ("CONFIRMED", "confirmReceipt", self.patient, {}),
        ]
        cancel = [("CANCELLED", "cancelPrescription", self.prescriber, {"reason": "changed"})]
        version = 1
        for status, mutation, token, args in cancel if to == "CANCELLED" else courier_path:
            result = call(self.gw, token, mutation, id=rid, expectedVersion=version, **args)
            assert (result["__typename"], result.get("status")) == ("Prescription", status), result
            version = result["version"]
            if status == to:
                return version
        raise AssertionError(f"no path to {to}")

    def read(self, rid: str) -> dict[str, Any]:
        """The prescription as an admin sees it (with history and integrity)."""
        found: dict[str, Any] | None = self.gw.data(PRESCRIPTION, self.admin, id=rid)[
            "prescription"
        ]
        assert found is not None, f"{rid} not found"
        return found

    def listing(self, token: str, **variables: Any) -> list[dict[str, Any]]:
        """Every prescription `token` may list (all pages)."""
        nodes: list[dict[str, Any]] = []
        after = None
        while True:
            page = self.gw.data(LISTING, token, first=50, after=after, **variables)
            nodes += [edge["node"] for edge in page["prescriptions"]["edges"]]
            if not page["prescriptions"]["pageInfo"]["hasNextPage"]:
                return nodes
            after = page["prescriptions"]["pageInfo"]["endCursor"]


@pytest.fixture
def parties(gw: Gateway) -> Parties:
    return Parties(gw)


def mutation_document(mutation: str, args: dict[str, Any]) -> str:
    """A mutation taking `args` as variables and selecting its PrescriptionResult."""
    declared = ", ".join(f"${name}: {ARGUMENT_TYPES[name]}" for name in args)
    passed = ", ".join(f"{name}: ${name}" for name in args)
    return f"mutation({declared}) {{ {mutation}({passed}) {{ {RESULT} }} }}"


def call(gw: Gateway, token: str | None, mutation: str, **args: Any) -> dict[str, Any]:
    """Run one mutation; returns its PrescriptionResult."""
    result: dict[str, Any] = gw.data(mutation_document(mutation, args), token, **args)[mutation]
    return result


def refused(result: dict[str, Any], kind: str, *fragments: str) -> None:
    assert result["__typename"] == kind, result
    for fragment in fragments:
        assert fragment in result["message"], result["message"]


def ledger_count(gw: Gateway, mongo: MongoClient[dict[str, Any]], subject: str) -> int:
    return mongo[gw.db]["ledger"].count_documents({"subject": subject})


def ledger_total(gw: Gateway, mongo: MongoClient[dict[str, Any]]) -> int:
    return mongo[gw.db]["ledger"].count_documents({})


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def wait_anchored(p: Parties, rid: str, status: str = "VERIFIED") -> dict[str, Any]:
    """The prescription (read by its admin) once a checkpoint covers every event."""

    def anchored() -> dict[str, Any] | None:
        rx = p.read(rid)
        if rx["integrity"]["status"] == status and all(e["proof"] for e in rx["history"]):
            return rx
        return None

    found: dict[str, Any] = wait_for(anchored, f"{rid} anchored with integrity {status}")
    return found


def start_verify(bundle: str, key: str, tmp_path: Path) -> subprocess.Popen[str]:
    """`rxledger verify BUNDLE --key KEY` on a bundle written to a file, started."""
    path = tmp_path / f"bundle-{uuid.uuid4().hex[:8]}.json"
    path.write_text(bundle, encoding="utf-8")
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "verify", str(path), "--key", key],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("RXLEDGER_")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def verify_offline(bundles: list[str], key: str, tmp_path: Path) -> dict[str, str]:
    """Run `rxledger verify` on each distinct bundle (in parallel); each must pass.
    Returns what it printed for each bundle."""
    procs = {bundle: start_verify(bundle, key, tmp_path) for bundle in dict.fromkeys(bundles)}
    printed = {}
    for bundle, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"rxledger verify failed ({proc.returncode}): {out}{err}"
        assert out.startswith("OK: leaf"), out
        printed[bundle] = out
    return printed


# --- 1. the lifecycle ----------------------------------------------------------------------


def test_lifecycle_issue_dispense_courier_deliver_confirm_is_recorded_and_anchored(parties):
    p = parties
    issued = call(p.gw, p.prescriber, "issuePrescription", input=p.input())
    assert issued["__typename"] == "Prescription"
    assert (issued["status"], issued["version"], issued["pharmacy"]) == ("ISSUED", 1, p.pharmacy)
    assert issued["patient"] == {"id": p.patient_id, "name": p.patient_name}
    assert issued["prescriber"] == f"dr-{p.uid}" and issued["redacted"] is False
    rid = issued["id"]

    dispensed = call(p.gw, p.pharmacist, "dispensePrescription", id=rid, expectedVersion=1)
    assert (dispensed["status"], dispensed["version"]) == ("DISPENSED", 2)
    handed = p.hand_over(rid, 2)
    assert (handed["status"], handed["version"], handed["courier"]) == ("IN_TRANSIT", 3, "c-7")
    assert handed["courierOrganization"] == p.courier_org
    delivered = call(p.gw, p.courier, "deliverPrescription", id=rid, expectedVersion=3)
    assert (delivered["status"], delivered["version"]) == ("DELIVERED", 4)
    confirmed = call(p.gw, p.patient, "confirmReceipt", id=rid, expectedVersion=4)
    assert (confirmed["status"], confirmed["version"]) == ("CONFIRMED", 5)

    rx = wait_anchored(p, rid)
    assert (rx["status"], rx["version"]) == ("CONFIRMED", 5)
    history = rx["history"]
    assert [e["type"] for e in history] == [
        "ISSUED",
        "DISPENSED",
        "HANDED_TO_COURIER",
        "DELIVERED",
        "RECEIPT_CONFIRMED",
    ]
    assert [e["version"] for e in history] == [1, 2, 3, 4, 5]
    assert [e["actor"] for e in history] == [
        f"PRESCRIBER:dr-{p.uid}",
        f"PHARMACIST:ph-{p.uid}",
        f"PHARMACIST:ph-{p.uid}",
        "COURIER:c-7",
        f"PATIENT:{p.patient_id}",
    ]
    indices = [e["leafIndex"] for e in history]
    assert all(isinstance(i, int) for i in indices) and indices == sorted(set(indices))
    for event in history:
        proof = event["proof"]
        assert proof["leafIndex"] == event["leafIndex"]
        assert proof["checkpoint"]["size"] == proof["treeSize"] > event["leafIndex"]
        assert json.loads(proof["bundle"])["leaf"] == event["leaf"]
        assert event["receipt"] is None
        # No personal data in a leaf: it is handed to anyone with its proof.
        leaf = base64.b64decode(event["leaf"]).decode()
        assert p.patient_id not in leaf and p.patient_name not in leaf
    integrity = rx["integrity"]
    assert integrity["status"] == "VERIFIED", integrity
    assert integrity["leafIndex"] == history[-1]["leafIndex"] == integrity["proof"]["leafIndex"]
    assert [t["status"] for t in rx["timeline"]] == [
        "ISSUED",
        "DISPENSED",
        "IN_TRANSIT",
        "DELIVERED",
        "CONFIRMED",
    ]


def test_pharmacist_hands_a_dispensed_prescription_over_at_the_counter(parties):
    p = parties
    rid = p.issued()
    p.advance(rid, "DISPENSED")
    picked_up = call(p.gw, p.pharmacist, "deliverPrescription", id=rid, expectedVersion=2)
    assert (picked_up["status"], picked_up["version"], picked_up["courier"]) == (
        "DELIVERED",
        3,
        None,
    )
    confirmed = call(p.gw, p.patient, "confirmReceipt", id=rid, expectedVersion=3)
    assert confirmed["status"] == "CONFIRMED"
    rx = wait_anchored(p, rid)
    assert [e["type"] for e in rx["history"]] == [
        "ISSUED",
        "DISPENSED",
        "DELIVERED",
        "RECEIPT_CONFIRMED",
    ]


def test_prescriber_cancels_an_issued_prescription_with_a_reason(parties):
    p = parties
    rid = p.issued()
    result = call(
        p.gw, p.prescriber, "cancelPrescription", id=rid, expectedVersion=1, reason="wrong dose"
    )
    assert (result["status"], result["version"], result["reason"]) == ("CANCELLED", 2, "wrong dose")
    rx = wait_anchored(p, rid)
    assert [e["type"] for e in rx["history"]] == ["ISSUED", "CANCELLED"]
    assert rx["reason"] == "wrong dose"


def test_pharmacist_rejects_an_issued_prescription_with_a_reason(parties):
    p = parties
    rid = p.issued()
    result = call(
        p.gw,
        p.pharmacist,
        "rejectPrescription",
        id=rid,
        expectedVersion=1,
        reason="interaction with warfarin",
    )
    assert (result["status"], result["version"]) == ("REJECTED", 2)
    assert result["reason"] == "interaction with warfarin"
    rx = wait_anchored(p, rid)
    assert [e["type"] for e in rx["history"]] == ["ISSUED", "REJECTED"]


# --- 2. illegal transitions, wrong roles, invisible prescriptions ----------------------------


@pytest.fixture(scope="module")
def at_status(gw: Gateway) -> Callable[[str], tuple[Parties, str, int]]:
    """A prescription at a status, with its parties and version; one per status, shared by
    the tests that must leave it unchanged."""
    made: dict[str, tuple[Parties, str, int]] = {}

    def get(status: str) -> tuple[Parties, str, int]:
        if status not in made:
            p = Parties(gw)
            rid = p.issued()
            made[status] = (p, rid, 1 if status == "ISSUED" else p.advance(rid, status))
        return made[status]

    return get


@pytest.mark.parametrize(
    ("status", "mutation", "role", "args", "message"),
    [
        ("CANCELLED", "dispensePrescription", "PHARMACIST", {}, "needs status ISSUED"),
        ("ISSUED", "confirmReceipt", "PATIENT", {}, "needs status DELIVERED"),
        (
            "ISSUED",
            "handToCourier",
            "PHARMACIST",
            {"courier": "c-7", "courierOrganization": "fastmeds"},
            "needs status DISPENSED",
        ),
        ("ISSUED", "deliverPrescription", "PHARMACIST", {}, "needs status DISPENSED, IN_TRANSIT"),
        ("DISPENSED", "cancelPrescription", "PRESCRIBER", {}, "needs status ISSUED"),
        ("DISPENSED", "rejectPrescription", "PHARMACIST", {"reason": "late"}, "is DISPENSED"),
        ("DISPENSED", "dispensePrescription", "PHARMACIST", {}, "is DISPENSED"),
        ("DELIVERED", "deliverPrescription", "COURIER", {}, "is DELIVERED"),
        ("CONFIRMED", "confirmReceipt", "PATIENT", {}, "is CONFIRMED"),
        ("CANCELLED", "cancelPrescription", "PRESCRIBER", {}, "is CANCELLED"),
    ],
)
def test_a_step_the_status_does_not_allow_is_an_illegal_transition(
    at_status, mongo, status, mutation, role, args, message
):
    p, rid, version = at_status(status)
    result = call(p.gw, p.by_role(role), mutation, id=rid, expectedVersion=version, **args)
    refused(result, "IllegalTransition", message)
    assert ledger_count(p.gw, mongo, rid) == version


def test_dispense_twice_conflicts(parties, mongo):
    p = parties
    rid = p.issued()
    assert call(p.gw, p.pharmacist, "dispensePrescription", id=rid, expectedVersion=1)[
        "__typename"
    ] == ("Prescription")
    again = call(p.gw, p.pharmacist, "dispensePrescription", id=rid, expectedVersion=1)
    refused(again, "VersionConflict", "expected version 1", "at version 2")
    fresh = call(p.gw, p.pharmacist, "dispensePrescription", id=rid, expectedVersion=2)
    refused(fresh, "IllegalTransition", "the prescription is DISPENSED")
    assert ledger_count(p.gw, mongo, rid) == 2


def test_courier_delivering_a_dispensed_prescription_not_handed_to_it_gets_not_found(parties):
    # A courier sees only what was handed to it (visibility_filter / can_see): a DISPENSED
    # prescription has no courier yet, so to the courier it does not exist.
    p = parties
    rid = p.issued()
    p.advance(rid, "DISPENSED")
    result = call(p.gw, p.courier, "deliverPrescription", id=rid, expectedVersion=2)
    refused(result, "NotFound", rid)


def test_pharmacist_cannot_deliver_what_a_courier_carries(parties):
    p = parties
    rid = p.issued()
    version = p.advance(rid, "IN_TRANSIT")
    result = call(p.gw, p.pharmacist, "deliverPrescription", id=rid, expectedVersion=version)
    refused(result, "Forbidden", "only its assigned courier")


def test_another_courier_cannot_deliver_it(parties):
    p = parties
    rid = p.issued()
    version = p.advance(rid, "IN_TRANSIT")
    other = p.gw.token("COURIER", "c-8", p.courier_org)
    result = call(p.gw, other, "deliverPrescription", id=rid, expectedVersion=version)
    refused(result, "NotFound", rid)


def test_a_courier_of_another_company_with_the_same_id_sees_and_delivers_nothing(parties, mongo):
    p = parties
    rid = p.issued()
    version = p.advance(rid, "IN_TRANSIT")
    for impostor in (
        p.gw.token("COURIER", "c-7", f"rival-{p.uid}"),  # same courier id, another company
        p.gw.token("COURIER", "c-7"),  # no company at all
    ):
        read = p.gw.gql(PRESCRIPTION, impostor, id=rid)
        assert read["data"]["prescription"] is None, read
        assert p.patient_name not in json.dumps(read)
        listed = p.gw.gql(LISTING, impostor, first=50)
        assert rid not in json.dumps(listed) and p.patient_name not in json.dumps(listed)
        delivered = call(p.gw, impostor, "deliverPrescription", id=rid, expectedVersion=version)
        refused(delivered, "NotFound", rid)
    assert ledger_count(p.gw, mongo, rid) == version
    # The courier it was handed to (id and company) still sees and delivers it.
    seen = p.gw.data(PRESCRIPTION, p.courier, id=rid)["prescription"]
    assert seen["patient"]["name"] == p.patient_name
    assert rid in [n["id"] for n in p.listing(p.courier)]
    delivered = call(p.gw, p.courier, "deliverPrescription", id=rid, expectedVersion=version)
    assert delivered["status"] == "DELIVERED", delivered


def test_handing_to_a_courier_names_its_company(parties, mongo):
    # Without a company no courier could ever see or deliver it: refused, not recorded.
    p = parties
    rid = p.issued()
    version = p.advance(rid, "DISPENSED")
    result = call(
        p.gw, p.pharmacist, "handToCourier", id=rid, expectedVersion=version, courier="c-7"
    )
    refused(result, "InvalidInput", "courierOrganization is required")
    assert ledger_count(p.gw, mongo, rid) == version


@pytest.fixture(scope="module")
def shared(gw: Gateway) -> tuple[Parties, str]:
    """One ISSUED prescription the wrong-role tests aim at (they must never change it)."""
    p = Parties(gw)
    return p, p.issued()


@pytest.mark.parametrize(
    ("mutation", "role"),
    [(m, r) for m, allowed in MAY_CALL.items() for r in ROLES if r not in allowed],
)
def test_a_role_that_may_not_call_a_mutation_is_forbidden(shared, mongo, mutation, role):
    p, rid = shared
    before = ledger_total(p.gw, mongo)
    args: dict[str, Any] = {"id": rid, "expectedVersion": 1}
    if mutation == "issuePrescription":
        args = {"input": p.input()}
    elif mutation in ("rejectPrescription", "erasePersonalData"):
        args["reason"] = "because"
    elif mutation == "handToCourier":
        args["courier"] = "c-7"
    result = call(p.gw, p.by_role(role), mutation, **args)
    allowed = ", ".join(sorted(MAY_CALL[mutation]))
    refused(result, "Forbidden", f"{mutation} needs the role {allowed}; you are {role}")
    assert ledger_total(p.gw, mongo) == before


def test_pharmacist_of_another_pharmacy_gets_not_found(parties, mongo):
    p = parties
    rid = p.issued()
    stranger = p.gw.token("PHARMACIST", "ph-elsewhere", f"other-{p.uid}")
    for mutation, args in (
        ("dispensePrescription", {}),
        ("rejectPrescription", {"reason": "not ours"}),
    ):
        result = call(p.gw, stranger, mutation, id=rid, expectedVersion=1, **args)
        refused(result, "NotFound", f"no prescription {rid} that you may see")
    assert ledger_count(p.gw, mongo, rid) == 1


def test_prescriber_cancelling_another_prescribers_prescription_gets_not_found(parties, mongo):
    p = parties
    rid = p.issued()
    colleague = p.gw.token("PRESCRIBER", f"dr-other-{p.uid}", "cardiology")
    result = call(p.gw, colleague, "cancelPrescription", id=rid, expectedVersion=1)
    refused(result, "NotFound", f"no prescription {rid} that you may see")
    assert p.gw.data(PRESCRIPTION, colleague, id=rid)["prescription"] is None
    assert ledger_count(p.gw, mongo, rid) == 1


def test_patient_confirming_another_patients_prescription_gets_not_found(parties):
    p = parties
    rid = p.issued()
    version = p.advance(rid, "DELIVERED")
    other = p.gw.token("PATIENT", f"pat-other-{p.uid}")
    refused(call(p.gw, other, "confirmReceipt", id=rid, expectedVersion=version), "NotFound", rid)


def test_unknown_prescription_id_gets_not_found(parties):
    p = parties
    result = call(p.gw, p.pharmacist, "dispensePrescription", id="rx_nope", expectedVersion=1)
    refused(result, "NotFound", "no prescription rx_nope")


def test_unauthenticated_mutation_is_forbidden_and_names_the_bearer_token(parties):
    p = parties
    result = call(p.gw, None, "issuePrescription", input=p.input())
    refused(result, "Forbidden", "authentication required", "Authorization: Bearer <token>")
    rid = p.issued()
    result = call(p.gw, None, "dispensePrescription", id=rid, expectedVersion=1)
    refused(result, "Forbidden", "Bearer")


# --- 3. concurrency ------------------------------------------------------------------------


async def race(gw: Gateway, token: str, mutation: str, n: int, **args: Any) -> list[dict[str, Any]]:
    """Send the same mutation n times at once; returns the n results."""
    body = {"query": mutation_document(mutation, args), "variables": args}
    async with httpx.AsyncClient(
        base_url=gw.base, headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        responses = await asyncio.gather(*(client.post("/graphql", json=body) for _ in range(n)))
    return [r.json()["data"][mutation] for r in responses]


async def test_concurrent_dispenses_of_one_prescription_let_exactly_one_win(parties, mongo):
    p = parties
    rid = p.issued()
    results = await race(p.gw, p.pharmacist, "dispensePrescription", 8, id=rid, expectedVersion=1)
    kinds = sorted(r["__typename"] for r in results)
    assert kinds == ["Prescription"] + ["VersionConflict"] * 7, results
    winner = next(r for r in results if r["__typename"] == "Prescription")
    assert (winner["status"], winner["version"]) == ("DISPENSED", 2)
    for loser in results:
        if loser["__typename"] == "VersionConflict":
            assert "read it again and retry" in loser["message"]
    rx = p.read(rid)
    assert rx is not None and (rx["status"], rx["version"]) == ("DISPENSED", 2)
    assert [e["type"] for e in rx["history"]] == ["ISSUED", "DISPENSED"]
    dispensed = {"subject": rid, "header.type": "DISPENSED"}
    assert mongo[p.gw.db]["ledger"].count_documents(dispensed) == 1


async def test_the_step_after_a_concurrent_race_is_sequenced_promptly(parties):
    # The race's losers must not hold back the prescription's next events in the log.
    p = parties
    rid = p.issued()
    await race(p.gw, p.pharmacist, "dispensePrescription", 8, id=rid, expectedVersion=1)
    handed = p.hand_over(rid, 2)
    assert handed["__typename"] == "Prescription", handed

    def handed_over_sequenced() -> bool:
        rx = p.read(rid)
        return rx is not None and rx["history"][2]["leafIndex"] is not None

    wait_for(handed_over_sequenced, "HANDED_TO_COURIER sequenced within 3 s", timeout=3)


async def test_concurrent_retries_with_one_idempotency_key_all_succeed_and_append_once(
    parties, mongo
):
    p = parties
    rid = p.issued()
    key = f"retry-{p.uid}"
    results = await race(
        p.gw,
        p.pharmacist,
        "dispensePrescription",
        6,
        id=rid,
        expectedVersion=1,
        idempotencyKey=key,
    )
    assert [r["__typename"] for r in results] == ["Prescription"] * 6, results
    assert {(r["status"], r["version"]) for r in results} == {("DISPENSED", 2)}
    assert ledger_count(p.gw, mongo, rid) == 2


# --- 4. idempotent retries -------------------------------------------------------------------


def test_issuing_twice_with_one_idempotency_key_files_one_prescription(parties, mongo):
    p = parties
    before = ledger_total(p.gw, mongo)
    key = f"issue-{p.uid}"
    first = call(p.gw, p.prescriber, "issuePrescription", input=p.input(), idempotencyKey=key)
    again = call(p.gw, p.prescriber, "issuePrescription", input=p.input(), idempotencyKey=key)
    assert first["__typename"] == again["__typename"] == "Prescription", (first, again)
    assert again["id"] == first["id"] and again["version"] == 1
    assert ledger_total(p.gw, mongo) == before + 1
    mine = p.listing(p.prescriber, filter={"pharmacy": p.pharmacy})
    assert [n["id"] for n in mine] == [first["id"]]
    # The key is the prescriber's own: another prescriber's same key files another one.
    colleague = p.gw.token("PRESCRIBER", f"dr-other-{p.uid}", "cardiology")
    theirs = call(p.gw, colleague, "issuePrescription", input=p.input(), idempotencyKey=key)
    assert theirs["__typename"] == "Prescription" and theirs["id"] != first["id"]


def test_a_retried_transition_with_its_key_succeeds_and_appends_nothing(parties, mongo):
    p = parties
    rid = p.issued()
    key = f"dispense-{p.uid}"
    first = call(
        p.gw, p.pharmacist, "dispensePrescription", id=rid, expectedVersion=1, idempotencyKey=key
    )
    assert (first["__typename"], first["version"]) == ("Prescription", 2)
    before = ledger_total(p.gw, mongo)
    retry = call(
        p.gw, p.pharmacist, "dispensePrescription", id=rid, expectedVersion=1, idempotencyKey=key
    )
    assert retry["__typename"] == "Prescription", retry
    assert (retry["id"], retry["status"], retry["version"]) == (rid, "DISPENSED", 2)
    assert ledger_total(p.gw, mongo) == before
    # Without the key the same request is a stale write.
    refused(
        call(p.gw, p.pharmacist, "dispensePrescription", id=rid, expectedVersion=1),
        "VersionConflict",
    )


def test_an_idempotency_key_reused_for_another_mutation_is_invalid_input(parties, mongo):
    p = parties
    rid = p.issued()
    key = f"k-{p.uid}"
    first = call(
        p.gw, p.pharmacist, "dispensePrescription", id=rid, expectedVersion=1, idempotencyKey=key
    )
    assert first["__typename"] == "Prescription"
    other = call(
        p.gw,
        p.pharmacist,
        "rejectPrescription",
        id=rid,
        expectedVersion=1,
        reason="changed my mind",
        idempotencyKey=key,
    )
    refused(other, "InvalidInput", repr(key), "dispensePrescription", "rejectPrescription")
    assert ledger_count(p.gw, mongo, rid) == 2


# --- 5. tampering --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value"),
    [("medications.0.quantity", 999), ("status", "CONFIRMED"), ("patient.name", "Mallory")],
)
def test_editing_a_prescription_document_in_the_database_is_tampered(parties, mongo, path, value):
    p = parties
    rid = p.issued()
    assert wait_anchored(p, rid)["integrity"]["status"] == "VERIFIED"
    changed = mongo[p.gw.db]["prescriptions"].update_one({"_id": rid}, {"$set": {path: value}})
    assert changed.modified_count == 1
    integrity = p.read(rid)["integrity"]
    assert integrity["status"] == "TAMPERED", integrity
    assert "differs from the state digest" in integrity["detail"]
    assert integrity["proof"] is None


def test_rewriting_the_documents_copy_of_an_event_leaf_and_all_is_tampered(parties, mongo):
    # Consistent with itself (canonical leaf, hash chain, state digest), the rewritten event
    # still disagrees with the anchored tree.
    p = parties
    rid = p.issued()
    p.advance(rid, "DISPENSED")
    wait_anchored(p, rid)
    prescriptions = mongo[p.gw.db]["prescriptions"]
    events = prescriptions.find_one({"_id": rid})["events"]
    header = {**json.loads(bytes(events[1]["leaf"])), "actor": "PHARMACIST:mallory"}
    prescriptions.update_one(
        {"_id": rid},
        {
            "$set": {
                "events.1.leaf": Binary(canonical_json(header)),
                "events.1.actor.sub": "mallory",
            }
        },
    )
    integrity = p.read(rid)["integrity"]
    assert integrity["status"] == "TAMPERED", integrity
    assert "event 2: the document's copy differs" in integrity["detail"]


def test_a_forged_actor_in_a_stored_event_is_never_shown_as_verified(parties, mongo):
    # History names who acted; that name must not change unnoticed.
    p = parties
    rid = p.issued()
    p.advance(rid, "DISPENSED")
    wait_anchored(p, rid)
    mongo[p.gw.db]["prescriptions"].update_one(
        {"_id": rid}, {"$set": {"events.1.actor.sub": "mallory"}}
    )
    rx = p.read(rid)
    assert rx is not None
    shown = rx["history"][1]["actor"]
    assert shown == f"PHARMACIST:ph-{p.uid}" or rx["integrity"]["status"] == "TAMPERED", (
        shown,
        rx["integrity"],
    )


def test_a_document_rolled_back_to_an_earlier_version_is_not_verified_as_current(parties, mongo):
    p = parties
    rid = p.issued()
    p.advance(rid, "DISPENSED")
    wait_anchored(p, rid)
    db = mongo[p.gw.db]
    first = db["ledger"].find_one({"subject": rid, "version": 1})
    db["prescriptions"].replace_one({"_id": rid}, first["data"]["state"])
    rx = p.read(rid)
    assert rx is not None
    assert (rx["status"], rx["version"]) == ("DISPENSED", 2) or rx["integrity"][
        "status"
    ] == "TAMPERED", (rx["status"], rx["version"], rx["integrity"])


def test_editing_an_erased_prescriptions_status_is_tampered(parties, mongo):
    # Erasure removes the salt, but the status is no personal data: the ledger's events say
    # ISSUED, DISPENSED, PERSONAL_DATA_ERASED, so a document claiming CANCELLED disagrees.
    p = parties
    rid = p.issued()
    p.advance(rid, "DISPENSED")
    erased = call(p.gw, p.admin, "erasePersonalData", id=rid, expectedVersion=2, reason="law")
    assert erased["__typename"] == "Prescription", erased
    wait_anchored(p, rid, status="ERASED")
    mongo[p.gw.db]["prescriptions"].update_one({"_id": rid}, {"$set": {"status": "CANCELLED"}})
    rx = p.read(rid)
    assert rx is not None and rx["status"] == "CANCELLED"
    assert rx["integrity"]["status"] == "TAMPERED", rx["integrity"]


# --- 6. proofs verify offline ------------------------------------------------------------------


def test_every_proof_the_api_returns_verifies_with_rxledger_verify(parties, tmp_path):
    p = parties
    rid = p.issued()
    p.advance(rid, "DISPENSED")
    rx = wait_anchored(p, rid)
    key = p.gw.verifier_key()
    last = rx["history"][-1]
    by_ledger = p.gw.data(
        "query($i: Int!) { ledger { inclusionProof(leafIndex: $i) { bundle } } }",
        i=last["leafIndex"],
    )["ledger"]["inclusionProof"]["bundle"]
    bundles = [e["proof"]["bundle"] for e in rx["history"]]
    bundles += [rx["integrity"]["proof"]["bundle"], by_ledger]
    # The verifier really checks: the first event's proof does not prove the second leaf.
    forged = {**json.loads(bundles[0]), "leaf": last["leaf"]}
    refusal = start_verify(json.dumps(forged), key, tmp_path)
    printed = verify_offline(bundles, key, tmp_path)
    for event in rx["history"]:
        out = printed[event["proof"]["bundle"]]
        assert f"leaf {event['leafIndex']} is included in {ORIGIN}" in out
    out, err = refusal.communicate(timeout=60)
    assert refusal.returncode == 1, out + err
    assert "FAILED: root mismatch" in out + err


# --- 7. who may read what ------------------------------------------------------------------


def test_patient_sees_only_their_own_prescriptions(parties):
    p = parties
    own = [p.issued(), p.issued()]
    other = Parties(p.gw)
    theirs = other.issued(pharmacy=p.pharmacy)
    assert p.gw.data(PRESCRIPTION, p.patient, id=theirs)["prescription"] is None
    seen = p.gw.data(PRESCRIPTION, p.patient, id=own[0])["prescription"]
    assert seen["patient"] == {"id": p.patient_id, "name": p.patient_name}
    listed = p.listing(p.patient)
    assert [n["id"] for n in listed] == own
    assert {n["patient"]["id"] for n in listed} == {p.patient_id}


def test_pharmacist_sees_only_its_pharmacys_prescriptions(parties):
    p = parties
    ours = [p.issued(), p.issued()]
    elsewhere = p.issued(pharmacy=f"other-{p.uid}")
    assert p.gw.data(PRESCRIPTION, p.pharmacist, id=elsewhere)["prescription"] is None
    assert p.gw.data(PRESCRIPTION, p.pharmacist, id=ours[1])["prescription"]["id"] == ours[1]
    listed = p.listing(p.pharmacist)
    assert [n["id"] for n in listed] == ours
    assert {n["pharmacy"] for n in listed} == {p.pharmacy}


def test_partner_sees_only_its_organizations_prescriptions(parties):
    p = parties
    at_pharmacy = p.issued()
    carried = p.issued(pharmacy=f"other-{p.uid}")
    handed = call(
        p.gw,
        p.gw.token("PHARMACIST", "ph-x", f"other-{p.uid}"),
        "dispensePrescription",
        id=carried,
        expectedVersion=1,
    )
    assert handed["__typename"] == "Prescription"
    handed = call(
        p.gw,
        p.gw.token("PHARMACIST", "ph-x", f"other-{p.uid}"),
        "handToCourier",
        id=carried,
        expectedVersion=2,
        courier="c-7",
        courierOrganization=p.courier_org,
    )
    assert handed["__typename"] == "Prescription"
    unrelated = p.issued(pharmacy=f"third-{p.uid}")

    pharmacy_partner = p.gw.token("PARTNER", f"insurer-{p.uid}", p.pharmacy)
    assert [n["id"] for n in p.listing(pharmacy_partner)] == [at_pharmacy]
    courier_partner = p.gw.token("PARTNER", f"fleet-{p.uid}", p.courier_org)
    assert [n["id"] for n in p.listing(courier_partner)] == [carried]
    for token, hidden in ((pharmacy_partner, carried), (courier_partner, unrelated)):
        assert p.gw.data(PRESCRIPTION, token, id=hidden)["prescription"] is None
    no_org = p.gw.gql(LISTING, p.gw.token("PARTNER", "orgless"), first=5)
    assert no_org["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    assert "needs an 'org' claim" in no_org["errors"][0]["message"]


def test_auditor_sees_everything_redacted_with_history_proofs_and_integrity(parties):
    p = parties
    rid = p.issued()
    p.advance(rid, "DISPENSED")
    wait_anchored(p, rid)
    rx = p.gw.data(PRESCRIPTION, p.auditor, id=rid)["prescription"]
    assert rx["redacted"] is True
    assert (rx["patient"], rx["medications"], rx["notes"]) == (None, None, None)
    assert (rx["status"], rx["pharmacy"], rx["prescriber"]) == (
        "DISPENSED",
        p.pharmacy,
        f"dr-{p.uid}",
    )
    assert [e["type"] for e in rx["history"]] == ["ISSUED", "DISPENSED"]
    assert all(e["proof"] and e["proof"]["bundle"] for e in rx["history"])
    assert rx["integrity"]["status"] == "VERIFIED" and rx["integrity"]["proof"]
    assert p.patient_name not in json.dumps(rx) and p.patient_id not in json.dumps(rx)

    listed = p.listing(p.auditor, filter={"pharmacy": p.pharmacy})
    assert [n["id"] for n in listed] == [rid]
    assert listed[0]["redacted"] is True and listed[0]["patient"] is None
    by_patient = p.gw.gql(LISTING, p.auditor, first=5, filter={"patientId": p.patient_id})
    assert "auditors cannot filter by patient" in by_patient["errors"][0]["message"]


def test_unauthenticated_reads_of_prescriptions_are_refused_but_the_ledger_is_public(parties):
    p = parties
    rid = p.issued()
    out = p.gw.gql(PRESCRIPTION, id=rid)
    assert out["data"] == {"prescription": None}
    error = out["errors"][0]
    assert error["extensions"]["code"] == "UNAUTHENTICATED"
    assert "Authorization: Bearer <token>" in error["message"]
    listing = p.gw.gql(LISTING, first=5)
    assert listing["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    public = p.gw.gql("{ ledger { checkpoint { size } } }")
    assert "errors" not in public and public["data"]["ledger"]["checkpoint"]["size"] >= 0


def test_pages_of_two_walk_every_prescription_once_in_issue_order(parties):
    p = parties
    issued = [p.issued() for _ in range(5)]
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = p.gw.data(LISTING, p.patient, first=2, after=after)["prescriptions"]
        assert len(page["edges"]) <= 2
        seen += [edge["node"]["id"] for edge in page["edges"]]
        pages += 1
        if not page["pageInfo"]["hasNextPage"]:
            break
        assert page["pageInfo"]["endCursor"] == page["edges"][-1]["cursor"]
        after = page["pageInfo"]["endCursor"]
    assert seen == issued and pages == 3


def test_a_page_larger_than_the_maximum_is_a_clear_error(parties):
    p = parties
    out = p.gw.gql(LISTING, p.patient, first=1000)
    assert out["errors"][0]["message"] == "first is 1000; it must be 1 to 50"
    assert out["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    bad_cursor = p.gw.gql(LISTING, p.patient, first=2, after="not-a-cursor")
    assert "is not one this API returned" in bad_cursor["errors"][0]["message"]


def test_listing_filters_by_status_and_issue_time(parties):
    p = parties
    ids = [p.issued() for _ in range(5)]
    for rid in ids[1:3]:
        p.advance(rid, "DISPENSED")
    dispensed = p.listing(p.patient, filter={"status": ["DISPENSED"]})
    assert [n["id"] for n in dispensed] == ids[1:3]
    both = p.listing(p.patient, filter={"status": ["ISSUED", "DISPENSED"]})
    assert [n["id"] for n in both] == ids
    times = [p.read(rid)["issuedAt"] for rid in ids]
    window = p.listing(p.patient, filter={"issuedAfter": times[1], "issuedBefore": times[4]})
    assert [n["id"] for n in window] == ids[1:4]
    later = p.listing(p.patient, filter={"issuedAfter": times[3], "status": ["ISSUED"]})
    assert [n["id"] for n in later] == ids[3:]


# --- 8. erasure --------------------------------------------------------------------------


def test_erasing_personal_data_keeps_the_ledger_verifiable_and_closes_the_prescription(
    parties, mongo, tmp_path
):
    p = parties
    rid = p.issued()
    p.advance(rid, "DISPENSED")
    received = p.issued()  # a second one, on which the patient acted (confirmReceipt)
    p.advance(received, "CONFIRMED")
    before = wait_anchored(p, rid)
    earlier_bundles = [e["proof"]["bundle"] for e in before["history"]]
    earlier_bundles.append(before["integrity"]["proof"]["bundle"])
    db = mongo[p.gw.db]
    assert p.patient_name in str(list(db["ledger"].find({"subject": rid})))  # until erased

    erased = call(
        p.gw, p.admin, "erasePersonalData", id=rid, expectedVersion=2, reason="GDPR Art. 17"
    )
    assert erased["__typename"] == "Prescription", erased
    assert (erased["version"], erased["patient"], erased["medications"]) == (3, None, None)
    assert erased["redacted"] is True
    also = call(p.gw, p.admin, "erasePersonalData", id=received, expectedVersion=5, reason="Art 17")
    assert also["__typename"] == "Prescription", also

    rx = wait_anchored(p, rid, status="ERASED")
    assert (rx["patient"], rx["medications"], rx["notes"], rx["redacted"]) == (
        None,
        None,
        None,
        True,
    )
    assert rx["erased"] == {"by": f"ADMIN:admin-{p.uid}", "reason": "GDPR Art. 17"}
    assert [e["type"] for e in rx["history"]] == ["ISSUED", "DISPENSED", "PERSONAL_DATA_ERASED"]
    assert rx["integrity"]["proof"] is not None
    assert [e["leaf"] for e in rx["history"][:2]] == [e["leaf"] for e in before["history"]]
    assert wait_anchored(p, received, status="ERASED")["history"][4]["actor"] == "PATIENT"

    erasure_bundle = rx["history"][-1]["proof"]["bundle"]
    verify_offline([*earlier_bundles, erasure_bundle], p.gw.verifier_key(), tmp_path)

    ledger_text = str(list(db["ledger"].find({})))
    assert p.patient_name not in ledger_text and p.patient_id not in ledger_text

    def collections_holding_personal_data() -> list[str]:
        return [
            name
            for name in db.list_collection_names()
            for text in [str(list(db[name].find({})))]
            if p.patient_name in text or p.patient_id in text
        ]

    # The sequencer's queue (`pending`) lets go of sequenced events shortly after publishing.
    deadline = time.monotonic() + 10
    while (holding := collections_holding_personal_data()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert holding == []

    refused(
        call(
            p.gw,
            p.pharmacist,
            "handToCourier",
            id=rid,
            expectedVersion=3,
            courier="c-7",
            courierOrganization=p.courier_org,
        ),
        "IllegalTransition",
        "erased",
    )
    refused(
        call(p.gw, p.admin, "erasePersonalData", id=rid, expectedVersion=3, reason="again"),
        "IllegalTransition",
        "already erased",
    )
    assert ledger_count(p.gw, mongo, rid) == 3


def test_an_auditor_reads_an_erasure_without_its_free_text_reason(parties):
    # The reason is free text: it may name the patient, so it is personal data.
    p = parties
    rid = p.issued()
    reason = f"request of {p.patient_name}, letter of 2 May"
    erased = call(p.gw, p.admin, "erasePersonalData", id=rid, expectedVersion=1, reason=reason)
    assert erased["__typename"] == "Prescription", erased
    read = p.gw.gql(PRESCRIPTION, p.auditor, id=rid)
    assert read["data"]["prescription"]["erased"] == {"by": f"ADMIN:admin-{p.uid}", "reason": None}
    assert p.patient_name not in json.dumps(read)
    assert p.read(rid)["erased"]["reason"] == reason  # the admin still reads it


# --- 9. bad input ----------------------------------------------------------------------------


def test_a_syntax_error_is_reported_as_such(gw):
    r = gw.post({"query": "{ ledger { size "})
    assert r.status_code in (200, 400), r.text
    assert "Syntax Error" in r.json()["errors"][0]["message"]
    assert "Traceback" not in r.text


def test_an_argument_of_the_wrong_type_is_reported(parties):
    p = parties
    out = p.gw.post(
        {
            "query": 'mutation { dispensePrescription(id: "rx_1", expectedVersion: "x") '
            "{ __typename } }"
        },
        p.pharmacist,
    )
    assert out.status_code in (200, 400)
    message = out.json()["errors"][0]["message"]
    assert "Int cannot represent non-integer value" in message and '"x"' in message
    variables = p.gw.post(
        {
            "query": 'mutation($v: Int!) { dispensePrescription(id: "rx_1", expectedVersion: $v) '
            "{ __typename } }",
            "variables": {"v": "x"},
        },
        p.pharmacist,
    )
    assert variables.json()["errors"][0]["message"] == (
        "Variable '$v' has invalid value: Int cannot represent non-integer value: 'x'"
    )


def test_a_query_deeper_than_the_maximum_is_refused(gw):
    query = "{ prescriptions { edges { node { integrity { proof { checkpoint { size } } } } } } }"
    out = gw.gql(query, gw.token("ADMIN", "admin-depth"))
    assert out["errors"][0]["message"] == "query depth 6 exceeds the maximum of 5"
    assert out["errors"][0]["extensions"]["code"] == "QUERY_TOO_COMPLEX"
    assert out.get("data") is None


def test_an_alias_bomb_is_refused(gw):
    query = "{ " + " ".join(f"a{i}: ledger {{ size }}" for i in range(11)) + " }"
    out = gw.gql(query)
    assert out["errors"][0]["message"] == "query alias count 11 exceeds the maximum of 10"
    assert out["errors"][0]["extensions"]["code"] == "QUERY_TOO_COMPLEX"
    assert out.get("data") is None
    ten = "{ " + " ".join(f"a{i}: ledger {{ size }}" for i in range(10)) + " }"
    assert "errors" not in gw.gql(ten)


def test_a_query_with_too_many_tokens_is_refused(gw):
    query = "{ ledger { " + "size " * 1200 + "} }"
    r = gw.post({"query": query})
    assert r.status_code in (200, 400)
    error = r.json()["errors"][0]
    assert error["message"] == (
        "query token count exceeds the maximum of 1000 (parsing stopped at the limit)"
    )
    assert error["extensions"]["code"] == "QUERY_TOO_COMPLEX"


def test_a_body_larger_than_the_maximum_is_413(gw):
    body = {"query": "{ ledger { size } }", "padding": "x" * 20000}
    r = gw.post(body)
    assert r.status_code == 413
    error = r.json()["errors"][0]
    assert error["extensions"]["code"] == "REQUEST_TOO_LARGE"
    assert re.fullmatch(
        r"request body of \d+ bytes exceeds the maximum of 16384 bytes", error["message"]
    )


def test_a_streamed_body_growing_past_the_maximum_is_413(gw):
    def chunks() -> Iterator[bytes]:
        yield b'{"query": "{ ledger { size } }", "padding": "'
        for _ in range(10):
            yield b"x" * 4096
        yield b'"}'

    r = gw.http.post("/graphql", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    error = r.json()["errors"][0]
    assert error["extensions"]["code"] == "REQUEST_TOO_LARGE"
    assert "exceeds the maximum of 16384 bytes" in error["message"]


def _expired(gw: Gateway) -> str:
    claims = {"sub": "late", "role": "ADMIN", "exp": int(time.time()) - 3600}
    return "Bearer " + jwt.encode(claims, load_dev_secret(gw.var_dir), algorithm="HS256")


def _foreign(gw: Gateway) -> str:
    return "Bearer " + mint_token(secret=b"s" * 40, role="ADMIN", subject="mallory")


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (lambda gw: "Bearer not-a-jwt", "bearer token is not a well-formed JWT"),
        (lambda gw: "Basic dXNlcjpwYXNz", 'the Authorization header must be "Bearer <token>"'),
        (_foreign, "token signature does not verify"),
        (_expired, "token has expired"),
    ],
    ids=["malformed", "not-bearer", "foreign-secret", "expired"],
)
def test_a_bad_bearer_token_is_401_unauthenticated(gw, authorization, message):
    r = gw.http.post(
        "/graphql",
        json={"query": "{ ledger { size } }"},
        headers={"Authorization": authorization(gw)},
    )
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    error = r.json()["errors"][0]
    assert error["extensions"]["code"] == "UNAUTHENTICATED"
    assert message in error["message"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"medications": [{**MEDICATION, "quantity": 0}]},
            "medications[0].quantity is 0, must be 1 to 100000",
        ),
        (
            {"patient": {"id": "pat-x", "name": "   "}},
            "patient.name is required and must not be blank",
        ),
        ({"medications": [MEDICATION] * 51}, "a prescription lists 1 to 50 medications, got 51"),
        ({"medications": []}, "a prescription lists 1 to 50 medications, got 0"),
        ({"pharmacy": "p" * 129}, "pharmacy has 129 characters, at most 128"),
        ({"notes": "line\x00break"}, "notes contains control characters"),
    ],
)
def test_invalid_prescription_input_is_invalid_input(parties, changes, message):
    p = parties
    result = call(p.gw, p.prescriber, "issuePrescription", input=p.input(**changes))
    refused(result, "InvalidInput", message)
    assert p.listing(p.prescriber, filter={"pharmacy": p.pharmacy}) == []


def test_invalid_transition_arguments_are_invalid_input(parties, mongo):
    p = parties
    rid = p.issued()
    refused(
        call(p.gw, p.pharmacist, "rejectPrescription", id=rid, expectedVersion=1, reason="  "),
        "InvalidInput",
        "reason is required and must not be blank",
    )
    refused(
        call(p.gw, p.pharmacist, "dispensePrescription", id=rid, expectedVersion=0),
        "InvalidInput",
        "expectedVersion is 0; versions start at 1",
    )
    assert ledger_count(p.gw, mongo, rid) == 1


# --- gateways with other settings (started together, in parallel) -------------------------


# The rate limit test's gateway: a burst of LIMITED_BURST requests per caller, then one every
# 50 s, so no request after the burst can find a token refilled however slow the machine.
LIMITED_BURST = 5


@dataclass
class Others:
    quiet: Gateway  # checkpoints an hour apart, so events stay sequenced but unanchored
    limited: Gateway  # a low rate limit; the rate limit test's alone
    production: Gateway  # RXLEDGER_MODE=production, EdDSA tokens
    production_verifier_key: str


ISSUER, AUDIENCE = "https://idp.rxledger.test", "rxledger-gateway"


def production_settings(tmp: Path) -> tuple[dict[str, str], Callable[..., str], str]:
    """A log key from `rxledger keygen`, a token issuer's Ed25519 key pair: the production
    environment, a token minter and the expected verifier key."""
    tmp.mkdir(parents=True, exist_ok=True)
    log_key = tmp / "log.pem"
    keygen = subprocess.run(
        [sys.executable, "-m", "app.cli", "keygen", "--name", ORIGIN.split("/")[0]]
        + ["--out", str(log_key)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert keygen.returncode == 0, keygen.stderr
    issuer = Ed25519PrivateKey.generate()
    public = tmp / "issuer.pem"
    public.write_bytes(
        issuer.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    private_pem = issuer.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    def mint(**claims: Any) -> str:
        return mint_token(key_pem=private_pem, issuer=ISSUER, audience=AUDIENCE, **claims)

    env = {
        "RXLEDGER_MODE": "production",
        "RXLEDGER_SIGNING_KEY": str(log_key),
        "RXLEDGER_JWT_PUBLIC_KEYS": str(public),
        "RXLEDGER_JWT_ISSUER": ISSUER,
        "RXLEDGER_JWT_AUDIENCE": AUDIENCE,
    }
    return env, mint, keygen.stdout.strip()


@pytest.fixture(scope="module")
def others(
    mongo_uri: str, databases: Databases, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Others]:
    tmp = tmp_path_factory.mktemp("others")
    production_env, production_mint, verifier_key = production_settings(tmp / "production")
    with running(
        launch(
            mongo_uri,
            databases.new(),
            tmp / "quiet",
            RXLEDGER_CHECKPOINT_INTERVAL="3600",
            RXLEDGER_CHECKPOINT_LEAVES="1000000",
        ),
        launch(
            mongo_uri,
            databases.new(),
            tmp / "limited",
            RXLEDGER_RATE_LIMIT="0.02",
            RXLEDGER_RATE_BURST=str(LIMITED_BURST),
        ),
        launch(mongo_uri, databases.new(), tmp / "production", production_mint, **production_env),
    ) as (quiet, limited, production):
        yield Others(quiet, limited, production, verifier_key)


@pytest.fixture
def production(others: Others) -> Gateway:
    return others.production


def test_a_sequenced_event_awaiting_its_checkpoint_has_a_signed_receipt(others):
    gateway = others.quiet
    p = Parties(gateway)
    # Only the checkpoint of the empty tree, signed at startup, exists.
    cp = wait_for(
        lambda: gateway.data("{ ledger { checkpoint { size } } }")["ledger"]["checkpoint"],
        "the startup checkpoint",
    )
    assert cp["size"] == 0
    rid = p.issued()

    def sequenced() -> dict[str, Any] | None:
        rx = p.read(rid)
        return rx if rx and rx["history"][0]["leafIndex"] is not None else None

    rx = wait_for(sequenced, "the event sequenced")
    event = rx["history"][0]
    assert event["proof"] is None and event["receipt"] is not None
    assert rx["integrity"]["status"] == "PENDING"
    assert rx["integrity"]["proof"] is None
    assert f"leaf {event['leafIndex']} is sequenced" in rx["integrity"]["detail"]

    verifier = parse_verifier_key(gateway.verifier_key())
    receipt = open_receipt(event["receipt"]["note"], [verifier], ORIGIN)
    assert receipt.leaf_index == event["leafIndex"] == event["receipt"]["leafIndex"]
    leaf = base64.b64decode(event["leaf"])
    assert receipt.leaf_hash == hashlib.sha256(b"\x00" + leaf).digest()
    assert base64.b64decode(event["receipt"]["leafHash"]) == receipt.leaf_hash
    assert gateway.data("{ ledger { checkpoint { size } } }")["ledger"]["checkpoint"] == {"size": 0}


def test_a_receipt_read_again_is_the_same_signature(others):
    gateway = others.quiet
    p = Parties(gateway)
    rid = p.issued()

    def receipt() -> dict[str, Any] | None:
        found: dict[str, Any] | None = p.read(rid)["history"][0]["receipt"]
        return found

    first = wait_for(receipt, "the event sequenced, with its receipt")
    again = receipt()

    # Signed once: the same note, time and signature, however often it is read.
    assert again == first
    assert gateway.data("{ ledger { checkpoint { size } } }")["ledger"]["checkpoint"] == {"size": 0}


def test_a_caller_over_the_rate_limit_gets_429_with_retry_after(others):
    gateway = others.limited
    token = gateway.token("AUDITOR", "hasty")
    statuses = [
        gateway.post({"query": "{ ledger { size } }"}, token) for _ in range(LIMITED_BURST + 1)
    ]
    assert [r.status_code for r in statuses[:-1]] == [200] * LIMITED_BURST
    limited = statuses[-1]
    assert limited.status_code == 429, limited.text
    assert int(limited.headers["retry-after"]) >= 1
    error = limited.json()["errors"][0]
    assert error["extensions"]["code"] == "RATE_LIMITED"
    assert error["message"].startswith("rate limit exceeded for AUDITOR:hasty: retry in")
    # Buckets are per subject: another caller is not held back.
    other = gateway.post({"query": "{ ledger { size } }"}, gateway.token("AUDITOR", "calm"))
    assert other.status_code == 200
    metrics = gateway.http.get("/metrics").text
    assert re.search(r"^rxledger_rate_limited_total 1\.0$", metrics, re.M), metrics


def test_production_signs_with_the_configured_key(others):
    assert others.production.verifier_key() == others.production_verifier_key


def test_production_accepts_eddsa_tokens_and_refuses_hs256(production, gw):
    p = Parties(production)
    rid = p.issued()
    assert p.read(rid)["status"] == "ISSUED"
    dev_token = gw.token("ADMIN", "dev-admin")
    r = production.post({"query": "{ ledger { size } }"}, dev_token)
    assert r.status_code == 401
    assert "HS256 tokens are accepted only in development mode" in r.json()["errors"][0]["message"]


def test_production_refuses_introspection(production):
    token = production.token("ADMIN", "curious")
    for query in ("{ __schema { types { name } } }", '{ __type(name: "Prescription") { name } }'):
        out = production.gql(query, token)
        assert out.get("data") is None, out
        assert "introspection" in out["errors"][0]["message"].lower()


def test_production_serves_no_graphiql_page(production, gw):
    page = gw.http.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200 and "graphiql" in page.text.lower()  # development does
    r = production.http.get("/graphql", headers={"Accept": "text/html"})
    assert r.status_code >= 400, r.text
    assert not r.headers.get("content-type", "").startswith("text/html")
    assert "graphiql" not in r.text.lower()


def test_production_shows_no_stack_trace_for_an_unexpected_error(production, mongo):
    p = Parties(production)
    rid = p.issued()
    # A document the code cannot read (an unknown status) makes a resolver raise.
    mongo[production.db]["prescriptions"].update_one({"_id": rid}, {"$set": {"status": "BOGUS"}})
    r = production.post({"query": PRESCRIPTION, "variables": {"id": rid}}, p.admin)
    assert r.status_code == 200
    errors = r.json()["errors"]
    assert [e["message"] for e in errors] == ["Unexpected error."], errors
    for text in ("Traceback", 'File "', "ValueError", "BOGUS", "stacktrace"):
        assert text not in r.text, r.text


def test_production_does_not_suggest_field_names(production, gw):
    queries = [
        ("{ ledgr { size } }", "Cannot query field 'ledgr' on type 'Query'."),
        ("{ ledger { inclusionProof(leafIndx: 0) { leafIndex } } }", "Unknown argument 'leafIndx'"),
    ]
    token = production.token("ADMIN", "guesser")
    for query, expected in queries:
        assert "Did you mean" in gw.gql(query)["errors"][0]["message"]  # development does
        message = production.gql(query, token)["errors"][0]["message"]
        assert message.startswith(expected), message
        assert "Did you mean" not in message, message
    enum = production.gql(LISTING, token, first=1, filter={"status": ["ISSUD"]})
    assert "Did you mean" not in enum["errors"][0]["message"]
    assert "ISSUD" in enum["errors"][0]["message"]


# --- 11. operations -----------------------------------------------------------------------------


def test_metrics_count_mutations_by_result_and_readyz_reports_the_tree(parties):
    p = parties
    rid = p.issued()
    refused(call(p.gw, p.patient, "dispensePrescription", id=rid, expectedVersion=1), "Forbidden")
    r = p.gw.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "# TYPE rxledger_mutations_total counter" in text
    issued = re.search(
        r'^rxledger_mutations_total\{mutation="issuePrescription",result="Prescription"\} (\d+)\.0$',
        text,
        re.M,
    )
    assert issued and int(issued.group(1)) >= 1, text
    assert re.search(
        r'^rxledger_mutations_total\{mutation="dispensePrescription",result="Forbidden"\} \d+\.0$',
        text,
        re.M,
    ), text
    assert re.search(r"^rxledger_tree_size \d+\.0$", text, re.M)
    # The leading process knows its queue (declared and documented, so exported).
    assert re.search(r"^rxledger_queued_groups \d+\.0$", text, re.M), text

    ready = p.gw.http.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ok" and body["database"] == "ok"
    assert isinstance(body["treeSize"], int) and body["treeSize"] >= 1
