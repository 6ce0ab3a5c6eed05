"""The query cost limit (RXLEDGER_MAX_COST): the estimate on the real schema, the default
against every GraphQL document of the docs (README.md, docs/) and the tests, and the attack it
stops, over real HTTP and a real WebSocket against uvicorn gateways over the real database."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import strawberry
from graphql import (
    DocumentNode,
    GraphQLError,
    GraphQLSchema,
    OperationDefinitionNode,
    parse,
    validate,
)
from test_gateway import env_for, serve, wait_healthy
from ws_client import GraphQLSocket

from app.auth import load_dev_secret, mint_token
from app.limits import (
    FIELD_WEIGHTS,
    LIST_LENGTHS,
    LimitSettings,
    PreparedDocuments,
    graphql_extensions,
    query_cost,
)
from app.settings import ConfigError
from schema.root import make_schema

ROOT = Path(__file__).resolve().parent.parent
SCHEMA: GraphQLSchema = make_schema()._schema
DEFAULT = LimitSettings()


def cost(query: str, variables: dict[str, Any] | None = None, max_page: int = 100) -> int:
    return query_cost(SCHEMA, parse(query), None, variables, max_page)


# --- the estimate ---------------------------------------------------------------------------


def test_a_plain_field_costs_one_and_typename_nothing() -> None:
    assert cost("{ ledger { origin verifierKey __typename } }") == 3


def test_a_receipt_costs_its_signature_and_a_bundle_its_json() -> None:
    plain = cost("{ prescription(id: 1) { history { version } } }")
    receipt = cost("{ prescription(id: 1) { history { version receipt { note } } } }")
    bundle = cost("{ prescription(id: 1) { history { version bundle } } }")

    events = LIST_LENGTHS["Prescription.history"]
    assert receipt - plain == events * (FIELD_WEIGHTS["PrescriptionEvent.receipt"] + 1)
    assert bundle - plain == events * FIELD_WEIGHTS["PrescriptionEvent.bundle"]
    assert (
        FIELD_WEIGHTS["PrescriptionEvent.receipt"] > FIELD_WEIGHTS["PrescriptionEvent.bundle"] > 1
    )


def test_a_page_multiplies_what_it_selects_by_first_or_its_default() -> None:
    one = cost("{ prescriptions(first: 1) { edges { node { id } } } }")
    ten = cost("{ prescriptions(first: 10) { edges { node { id } } } }")
    default = cost("{ prescriptions { edges { node { id } } } }")

    assert one == 5 + 3
    assert ten == 5 + 10 * 3
    assert default == 5 + 20 * 3  # first: Int! = 20


def test_a_page_size_comes_from_the_variables_or_the_variable_default() -> None:
    query = "query($n: Int! = 7) { ledger { checkpoints(first: $n) { edges { cursor } } } }"

    assert cost(query, {"n": 50}) == 1 + 5 + 50 * 2
    assert cost(query) == 1 + 5 + 7 * 2


def test_a_page_larger_than_the_maximum_or_unreadable_counts_as_the_maximum() -> None:
    query = "query($n: Int!) { ledger { checkpoints(first: $n) { edges { cursor } } } }"

    assert cost(query, {"n": 10**9}, max_page=100) == 1 + 5 + 100 * 2
    assert cost(query, {}, max_page=100) == 1 + 5 + 100 * 2
    assert cost(query, {"n": "many"}, max_page=100) == 1 + 5 + 100 * 2


def test_every_alias_counts() -> None:
    one = cost("{ a: prescription(id: 1) { history { bundle } } }")
    three = cost(
        "{ a: prescription(id: 1) { history { bundle } }"
        " b: prescription(id: 2) { history { bundle } }"
        " c: prescription(id: 3) { history { bundle } } }"
    )

    assert three == 3 * one


def test_a_fragment_counts_once_per_spread() -> None:
    inline = cost("{ a: prescription(id: 1) { id status } b: prescription(id: 2) { id status } }")
    spread = cost(
        "{ a: prescription(id: 1) { ...F } b: prescription(id: 2) { ...F } }"
        " fragment F on Prescription { id status }"
    )

    assert spread == inline == 2 * (2 + 2)


def test_fragments_spread_many_times_are_costed_in_linear_time() -> None:
    # Each fragment spreads the next ten times: 10**8 paths for a walk per spread.
    levels = 9
    fragments = " ".join(
        f"fragment F{i} on Ledger {{ {' '.join([f'...F{i + 1}'] * 10)} }}" for i in range(levels)
    )
    query = f"{{ ledger {{ ...F0 }} }} {fragments} fragment F{levels} on Ledger {{ origin }}"

    start = time.perf_counter()
    total = cost(query)

    assert time.perf_counter() - start < 1.0
    assert total == 1 + 10**levels


def test_a_long_chain_of_fragments_is_costed_without_exhausting_the_stack() -> None:
    links = 5000
    chain = " ".join(f"fragment F{i} on Ledger {{ ...F{i + 1} }}" for i in range(links))
    query = f"{{ ledger {{ ...F0 }} }} {chain} fragment F{links} on Ledger {{ origin }}"

    assert cost(query) == 1 + 1


def test_introspection_costs_nothing() -> None:
    assert cost("{ __schema { types { name fields { name } } } }") == 0


def test_max_cost_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RXLEDGER_MAX_COST", "1234")

    assert LimitSettings.from_env().max_cost == 1234


@pytest.mark.parametrize("value", ["0", "1e9", "lots"])
def test_an_invalid_max_cost_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("RXLEDGER_MAX_COST", value)

    with pytest.raises(ConfigError, match="RXLEDGER_MAX_COST"):
        LimitSettings.from_env()


# --- the limit, in process ------------------------------------------------------------------


def limited_schema(max_cost: int) -> strawberry.Schema:
    return make_schema(graphql_extensions(LimitSettings(max_cost=max_cost), production=True))


async def test_an_operation_over_the_cost_is_refused_before_any_resolver_runs() -> None:
    # Without a context every resolver here would fail: an answer proves nothing ran.
    query = "{ a: ledger { size } b: ledger { size } }"  # 2 * (1 + 2)

    refused = await limited_schema(5).execute(query)
    allowed = await limited_schema(6).execute(query)

    assert refused.data is None
    assert refused.errors is not None
    assert [(e.message, e.extensions) for e in refused.errors] == [
        (
            "query cost 6 exceeds the maximum of 5 (RXLEDGER_MAX_COST)",
            {"code": "QUERY_TOO_COMPLEX"},
        )
    ]
    assert allowed.errors is not None and allowed.errors[0].message == "Unexpected error."


async def test_a_mutation_over_the_cost_is_refused() -> None:
    query = """mutation { a: dispensePrescription(id: "rx_1", expectedVersion: 1) { __typename }
                          b: dispensePrescription(id: "rx_2", expectedVersion: 1) { __typename } }"""

    total = 2 * FIELD_WEIGHTS["Mutation.dispensePrescription"]

    result = await limited_schema(total - 1).execute(query)

    assert result.errors is not None
    assert result.errors[0].message == (
        f"query cost {total} exceeds the maximum of {total - 1} (RXLEDGER_MAX_COST)"
    )


async def test_a_subscription_over_the_cost_is_refused_before_it_starts() -> None:
    query = "subscription { prescriptionEvents { leafIndex receipt { note } proof { path } } }"

    # what one event costs: its fields, the receipt's signature and the proof's tile reads
    total = 1 + 1 + FIELD_WEIGHTS["PrescriptionChange.receipt"] + 1
    total += FIELD_WEIGHTS["PrescriptionChange.proof"] + 1

    stream = await limited_schema(total - 1).subscribe(query)
    results = [result async for result in stream]  # type: ignore[union-attr]

    assert len(results) == 1
    assert results[0].errors is not None
    assert results[0].errors[0].message == (
        f"query cost {total} exceeds the maximum of {total - 1} (RXLEDGER_MAX_COST)"
    )


async def test_an_invalid_operation_gets_its_validation_error_not_a_cost() -> None:
    deep = "{ " + "a: prescriptions(first: 100) { edges { node { history { bundle } } } } " + "}"
    wrong = "{ prescriptions(first: 100) { edges { node { history { bundel } } } } }"

    too_deep = await make_schema(
        graphql_extensions(LimitSettings(max_depth=3, max_cost=10), production=True)
    ).execute(deep)
    unknown = await limited_schema(10).execute(wrong)

    assert [e.message for e in too_deep.errors or []] == ["query depth 4 exceeds the maximum of 3"]
    assert [e.message for e in unknown.errors or []] == [
        "Cannot query field 'bundel' on type 'PrescriptionEvent'."
    ]


# --- the cost, once per document and page size ----------------------------------------------

PAGED = """query($n: Int, $id: ID!) { ledger { checkpoints(first: $n) { edges { cursor } } }
  prescription(id: $id) { id } }"""


async def test_a_cost_is_measured_once_per_document_and_page_size() -> None:
    documents = PreparedDocuments()
    schema = make_schema(graphql_extensions(LimitSettings(max_cost=200), True, documents))

    for n, rid in [(5, "a"), (5, "b"), (50, "c"), (5, "d")]:
        await schema.execute(PAGED, {"n": n, "id": rid})  # the id costs nothing more
    assert (documents.stats.cost_misses, documents.stats.cost_hits) == (2, 2)

    over = [await schema.execute(PAGED, {"n": 100, "id": rid}) for rid in ("e", "f")]

    total = 1 + 5 + 100 * 2 + 2 + 1
    assert [[e.message for e in r.errors or []] for r in over] == [
        [f"query cost {total} exceeds the maximum of 200 (RXLEDGER_MAX_COST)"]
    ] * 2
    assert (documents.stats.cost_misses, documents.stats.cost_hits) == (3, 3)


@pytest.mark.parametrize(
    "variables",
    [
        {"n": 5, "id": "a"},
        {"n": None, "id": "a"},
        {"id": "a"},
        {"n": 5},  # $id missing: coercion fails, and every page counts as the maximum
        {"n": "many", "id": "a"},
        {"n": 5.0, "id": "a"},
        {"n": True, "id": "a"},
        {"n": 10**9, "id": "a"},
        {"n": [5], "id": "a"},
        {"n": 5, "id": {"x": 1}},
    ],
)
def test_a_kept_cost_is_the_cost_measured_afresh(variables: dict[str, Any]) -> None:
    documents = PreparedDocuments()
    prepared = documents.remember("paged", PAGED, parse(PAGED))
    assert prepared is not None
    documents.cost(prepared, SCHEMA, None, {"n": 7, "id": "warm"}, 100)

    kept = [documents.cost(prepared, SCHEMA, None, variables, 100) for _ in range(2)]

    assert kept == [query_cost(SCHEMA, prepared.document, None, variables, 100)] * 2
    assert documents.stats.cost_hits >= 1


def test_costs_kept_per_document_are_bounded() -> None:
    documents = PreparedDocuments(max_costs=4)
    prepared = documents.remember("paged", PAGED, parse(PAGED))
    assert prepared is not None

    for n in range(1, 21):
        documents.cost(prepared, SCHEMA, None, {"n": n, "id": "a"}, 100)

    assert len(prepared.costs) == 4
    assert documents.stats.cost_misses == 20


# --- the default lets every documented and tested query through -----------------------------


def operations(document: DocumentNode) -> Iterator[DocumentNode]:
    """Each operation of a document on its own, with the document's fragments."""
    fragments = [d for d in document.definitions if not isinstance(d, OperationDefinitionNode)]
    for definition in document.definitions:
        if isinstance(definition, OperationDefinitionNode):
            yield DocumentNode(definitions=(definition, *fragments))


def readme_documents() -> list[str]:
    """The ```graphql blocks of the docs: README.md and every page under docs/."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [
        document
        for page in pages
        for document in re.findall(r"```graphql\n(.*?)```", page.read_text(), re.S)
    ]


def test_documents() -> Iterator[tuple[str, str]]:
    """Every string constant in tests/ that is a valid GraphQL document for the schema:
    (where, document)."""
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            try:
                document = parse(node.value)
            except GraphQLError:
                continue
            if not validate(SCHEMA, document):
                yield f"{path.name}:{node.lineno}", node.value


test_documents.__test__ = False  # type: ignore[attr-defined]


def test_every_graphql_example_of_the_readme_is_within_the_default_cost() -> None:
    documents = readme_documents()
    costs = [
        query_cost(SCHEMA, operation, None, None, DEFAULT.max_page)
        for document in documents
        for operation in operations(parse(document))
    ]

    assert len(documents) >= 5 and len(costs) >= 7  # the walkthrough and the subscription
    assert max(costs) <= DEFAULT.max_cost // 2, costs  # with a margin


def test_every_query_of_the_tests_is_within_the_default_cost() -> None:
    found = list(test_documents())
    costs = {
        where: query_cost(SCHEMA, operation, None, None, DEFAULT.max_page)
        for where, document in found
        for operation in operations(parse(document))
    }

    assert len(found) >= 40
    # Variables are not known here: a page given by one counts as the largest page.
    assert max(costs.values()) <= DEFAULT.max_cost * 3 // 4, sorted(
        costs.items(), key=lambda item: -item[1]
    )[:5]


# --- the attack, over real HTTP and a real WebSocket ---------------------------------------

EVERYTHING = """
fragment Everything on Prescription {
  id status version redacted patient { id name }
  medications { code name dose quantity instructions } notes reason prescriber department
  pharmacy courier courierOrganization issuedAt updatedAt timeline { status at }
  erased { at by reason }
  history {
    type version actor at leafIndex leaf bundle
    proof {
      leafIndex treeSize leafHash path bundle
      checkpoint { origin size rootHash note anchoredAt
                   cosignatures { witness keyId cosignedAt line } }
    }
    receipt { leafIndex leafHash issuedAt note }
  }
  integrity { status leafIndex detail proof { leafIndex treeSize leafHash path bundle } }
}
"""


def everything(aliases: int, first: int = 100) -> str:
    """`aliases` full pages of prescriptions with every field, proof, receipt and bundle."""
    pages = " ".join(
        f"a{i}: prescriptions(first: {first}) {{ edges {{ node {{ ...Everything }} }} }}"
        for i in range(aliases)
    )
    return "{ " + pages + " }" + EVERYTHING


STOCKED = 36  # prescriptions, each through its whole lifecycle (5 events)
MEDICATION = {"code": "N02BE01", "name": "Paracetamol", "dose": "500 mg", "quantity": 20}
ISSUE = """mutation($input: IssuePrescriptionInput!) {
  %s
}"""


class Stocked:
    """A gateway over a database holding STOCKED delivered and confirmed prescriptions."""

    def __init__(self, base: str, secret: bytes, pid: int) -> None:
        self.base = base
        self.secret = secret
        self.pid = pid
        self.auditor = self.token("AUDITOR", "audit-1")

    def cpu_seconds(self) -> float:
        """The CPU time the gateway process has used so far (user and system, Linux)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
        return (utime + stime) / os.sysconf("SC_CLK_TCK")

    def token(self, role: str, subject: str, organization: str | None = None) -> str:
        return mint_token(secret=self.secret, role=role, subject=subject, organization=organization)

    def post(
        self, query: str, token: str, variables: dict[str, Any] | None = None
    ) -> httpx.Response:
        return httpx.post(
            f"{self.base}/graphql",
            json={"query": query, "variables": variables or {}},
            headers={"Authorization": f"Bearer {token}"},
            timeout=120,
        )

    def ok(self, query: str, token: str, variables: dict[str, Any] | None = None) -> Any:
        response = self.post(query, token, variables)
        assert response.status_code == 200, response.text
        body = response.json()
        assert "errors" not in body, body
        return body["data"]

    def stock(self, count: int = STOCKED, anchored: bool = True) -> None:
        """Issue `count` prescriptions and take each through the lifecycle, thirty steps per
        request (the alias limit); with `anchored`, wait until a checkpoint covers them."""
        prescriber = self.token("PRESCRIBER", "dr-cost", "cardiology")
        issue = {
            "patient": {"id": "patient-42", "name": "Ana Lima"},
            "pharmacy": "pharmacy-1",
            "medications": [MEDICATION],
        }
        ids: list[str] = []
        for start in range(0, count, 30):
            calls = " ".join(
                f"p{i}: issuePrescription(input: $input) {{ ... on Prescription {{ id }} }}"
                for i in range(start, min(start + 30, count))
            )
            ids += [p["id"] for p in self.ok(ISSUE % calls, prescriber, {"input": issue}).values()]
        pharmacist = self.token("PHARMACIST", "ph-anna", "pharmacy-1")
        steps = [
            (pharmacist, "dispensePrescription", ""),
            (
                pharmacist,
                "handToCourier",
                ', courier: "courier-7", courierOrganization: "fastmeds"',
            ),
            (self.token("COURIER", "courier-7", "fastmeds"), "deliverPrescription", ""),
            (self.token("PATIENT", "patient-42"), "confirmReceipt", ""),
        ]
        for version, (token, mutation, extra) in enumerate(steps, start=1):
            for start in range(0, count, 30):
                calls = " ".join(
                    f'p{i}: {mutation}(id: "{ids[i]}", expectedVersion: {version}{extra})'
                    " { __typename }"
                    for i in range(start, min(start + 30, count))
                )
                results = self.ok(f"mutation {{ {calls} }}", token)
                assert {r["__typename"] for r in results.values()} == {"Prescription"}
        if not anchored:
            return
        deadline = time.monotonic() + 60
        query = "{ ledger { checkpoint { size } } }"
        while (self.ok(query, self.auditor)["ledger"]["checkpoint"] or {"size": 0})[
            "size"
        ] < count * 5:
            assert time.monotonic() < deadline, "no checkpoint covers every event"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def stocked(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stocked]:
    tmp = tmp_path_factory.mktemp("cost")
    # One worker: the tests read the gateway's CPU time from its process (`rxledger serve`
    # runs one per core by default, and its parent only supervises them).
    env = env_for(
        mongo_uri, f"t_cost_{tmp.name[-8:]}", tmp, RXLEDGER_RATE_LIMIT="0", RXLEDGER_WORKERS="1"
    )
    secret = load_dev_secret(Path(env["RXLEDGER_VAR_DIR"]))
    base, proc = serve(env, tmp / "gateway.log")
    try:
        wait_healthy(base, proc, tmp / "gateway.log")
        gateway = Stocked(base, secret, proc.pid)
        gateway.stock()
        yield gateway
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def answer(gateway: Stocked, query: str, variables: dict[str, Any] | None = None) -> Any:
    response = gateway.post(query, gateway.auditor, variables)
    assert response.status_code == 200, response.text
    return response.json()


def with_cpu(gateway: Stocked, query: str) -> tuple[Any, float]:
    """The answer to `query` and the gateway's CPU seconds while it answered."""
    before = gateway.cpu_seconds()
    body = answer(gateway, query)
    return body, gateway.cpu_seconds() - before


def refusal(cost: int) -> dict[str, Any]:
    return {
        "message": f"query cost {cost} exceeds the maximum of {DEFAULT.max_cost} (RXLEDGER_MAX_COST)",
        "locations": [{"line": 1, "column": 1}],
        "extensions": {"code": "QUERY_TOO_COMPLEX"},
    }


def test_the_max_alias_full_page_query_is_refused_over_http_before_it_executes(
    stocked: Stocked,
) -> None:
    one_page, executing = with_cpu(stocked, everything(1))
    refused, refusing = with_cpu(stocked, everything(30))

    assert "errors" not in one_page
    assert len(one_page["data"]["a0"]["edges"]) == STOCKED
    assert refused == {"data": None, "errors": [refusal(cost(everything(30)))]}
    # Executing thirty pages costs about thirty times one page (10 to 15 s of the gateway's
    # CPU before this limit); the refusal, parsing and validation included, less than one.
    print(f"gateway CPU: one page executed {executing:.3f} s, thirty refused {refusing:.3f} s")
    assert refusing < executing


def test_the_page_size_is_read_from_the_variables(stocked: Stocked) -> None:
    query = (
        "query($n: Int!) { "
        + " ".join(
            f"a{i}: prescriptions(first: $n) {{ edges {{ node {{ ...Everything }} }} }}"
            for i in range(30)
        )
        + " }"
        + EVERYTHING
    )

    small = answer(stocked, query, {"n": 1})
    large = answer(stocked, query, {"n": 100})

    assert "errors" not in small and len(small["data"]["a29"]["edges"]) == 1
    assert large == {"data": None, "errors": [refusal(cost(query, {"n": 100}))]}


async def test_the_max_alias_full_page_query_is_refused_over_a_websocket(stocked: Stocked) -> None:
    async with await GraphQLSocket.open(stocked.base, stocked.auditor) as socket:
        before = stocked.cpu_seconds()
        await socket.subscribe("attack", everything(30))
        message = await socket.receive()
        refusing = stocked.cpu_seconds() - before

        before = stocked.cpu_seconds()
        await socket.subscribe("page", everything(1))
        answered = [data async for data in socket.events("page")]
        executing = stocked.cpu_seconds() - before

    assert message == {
        "id": "attack",
        "type": "error",
        "payload": [refusal(cost(everything(30)))],
    }
    assert len(answered) == 1 and len(answered[0]["a0"]["edges"]) == STOCKED
    print(
        f"gateway CPU over a WebSocket: one page {executing:.3f} s, thirty refused {refusing:.3f} s"
    )
    assert refusing < executing
