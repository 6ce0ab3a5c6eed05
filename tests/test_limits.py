"""Query limits, error masking, suggestions, rate limiting, body size and metrics, on a small
real strawberry schema and real starlette apps. No database."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
import strawberry
from graphql import get_introspection_query
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from strawberry.asgi import GraphQL

from app.limits import (
    BodySizeLimit,
    ClientError,
    LimitSettings,
    PreparedDocuments,
    RateLimiter,
    graphql_extensions,
)
from app.metrics import Metrics, MetricsMiddleware
from app.settings import ConfigError

LIMITS = LimitSettings(max_depth=4, max_tokens=60, max_aliases=3)


@strawberry.type
class Node:
    name: str = "node"

    @strawberry.field
    def child(self) -> Node:
        return Node()

    @strawberry.field
    def broken(self) -> str | None:
        raise RuntimeError("connection string mongodb://admin:hunter2@db")

    @strawberry.field
    def missing(self) -> str | None:
        raise ClientError("no prescription rx-1", "NOT_FOUND")


@strawberry.type
class Query:
    @strawberry.field
    def node(self) -> Node:
        return Node()


def make_schema(
    production: bool,
    limits: LimitSettings = LIMITS,
    documents: PreparedDocuments | None = None,
) -> strawberry.Schema:
    return strawberry.Schema(Query, extensions=graphql_extensions(limits, production, documents))


def nested(depth: int) -> str:
    """A query of the given depth: `node` and depth - 1 levels of `child`."""
    return "{ node " + "{ child " * (depth - 1) + "{ name }" + " }" * (depth - 1) + " }"


def messages(result: strawberry.types.ExecutionResult) -> list[str]:
    return [error.message for error in result.errors or []]


# --- query shape ----------------------------------------------------------------------------


async def test_query_deeper_than_the_limit_is_refused_naming_depth_and_maximum() -> None:
    result = await make_schema(production=True).execute(nested(6))

    assert result.data is None
    assert messages(result) == ["query depth 6 exceeds the maximum of 4"]
    assert result.errors is not None
    assert result.errors[0].extensions == {"code": "QUERY_TOO_COMPLEX"}


async def test_query_at_the_depth_limit_is_answered() -> None:
    result = await make_schema(production=True).execute(nested(4))

    assert result.errors is None
    assert result.data == {"node": {"child": {"child": {"child": {"name": "node"}}}}}


async def test_depth_is_counted_through_fragments() -> None:
    query = """
        { node { ...Two } }
        fragment Two on Node { child { child { ...Two2 } } }
        fragment Two2 on Node { child { child { name } } }
    """

    result = await make_schema(production=True).execute(query)

    assert messages(result) == ["query depth 5 exceeds the maximum of 4"]


async def test_fragments_spread_many_times_are_measured_in_linear_time() -> None:
    # Each fragment spreads the next one ten times: 10**8 paths for a walk per spread.
    levels = 9
    fragments = " ".join(
        f"fragment F{i} on Node {{ {' '.join([f'...F{i + 1}'] * 10)} }}" for i in range(levels)
    )
    query = f"{{ node {{ ...F0 }} }} {fragments} fragment F{levels} on Node {{ a: name }}"
    schema = make_schema(False, LimitSettings(max_tokens=2000, max_aliases=30))

    start = time.perf_counter()
    result = await schema.execute(query)

    assert time.perf_counter() - start < 1.0
    assert messages(result) == [f"query alias count {10**levels} exceeds the maximum of 30"]


async def test_document_with_too_many_tokens_is_refused_naming_the_maximum() -> None:
    query = "{ " + "node { name } " * 20 + "}"

    result = await make_schema(production=True).execute(query)

    assert messages(result) == [
        "query token count exceeds the maximum of 60 (parsing stopped at the limit)"
    ]
    assert result.errors is not None
    assert result.errors[0].extensions == {"code": "QUERY_TOO_COMPLEX"}


async def test_document_within_the_token_limit_is_answered() -> None:
    result = await make_schema(production=True).execute("{ " + "node { name } " * 5 + "}")

    assert result.errors is None


async def test_alias_bomb_is_refused_naming_count_and_maximum() -> None:
    query = "{ " + " ".join(f"a{i}: node {{ name }}" for i in range(5)) + " }"

    result = await make_schema(production=True).execute(query)

    assert messages(result) == ["query alias count 5 exceeds the maximum of 3"]


async def test_aliases_within_the_limit_are_answered() -> None:
    query = "{ a: node { name } b: node { n: name } }"

    result = await make_schema(production=True).execute(query)

    assert result.errors is None
    assert result.data == {"a": {"name": "node"}, "b": {"n": "node"}}


# --- parse and validation, once per document -------------------------------------------------


async def test_a_document_is_parsed_and_validated_once_however_often_it_runs() -> None:
    documents = PreparedDocuments()
    schema = make_schema(True, documents=documents)

    results = [await schema.execute("{ node { name } }") for _ in range(3)]

    assert [r.data for r in results] == [{"node": {"name": "node"}}] * 3
    stats = documents.stats
    assert (stats.parse_misses, stats.parse_hits) == (1, 2)
    assert (stats.validation_misses, stats.validation_hits) == (1, 2)
    assert len(documents) == 1


async def test_a_document_is_kept_by_its_exact_text() -> None:
    documents = PreparedDocuments()
    schema = make_schema(True, documents=documents)

    await schema.execute("{ node { name } }")
    await schema.execute("{ node {  name } }")  # the same operation, another text

    assert (documents.stats.parse_misses, documents.stats.parse_hits) == (2, 0)
    assert len(documents) == 2


async def test_a_kept_validation_error_is_answered_as_precisely_each_time() -> None:
    documents = PreparedDocuments()
    schema = make_schema(False, documents=documents)

    first = await schema.execute("{ node { nmae } }")
    again = await schema.execute("{ node { nmae } }")

    expected = ["Cannot query field 'nmae' on type 'Node'. Did you mean 'name'?"]
    assert messages(first) == messages(again) == expected
    assert again.errors is not None and again.errors[0].locations == first.errors[0].locations  # type: ignore[index]
    assert (documents.stats.validation_misses, documents.stats.validation_hits) == (1, 1)


async def test_limits_are_enforced_on_a_kept_document() -> None:
    documents = PreparedDocuments()
    schema = make_schema(True, documents=documents)

    results = [await schema.execute(nested(6)) for _ in range(2)]

    assert [messages(r) for r in results] == [["query depth 6 exceeds the maximum of 4"]] * 2
    assert documents.stats.validation_hits == 1


async def test_a_document_that_does_not_parse_is_never_kept() -> None:
    documents = PreparedDocuments()
    schema = make_schema(True, documents=documents)
    too_many_tokens = "{ " + "node { name } " * 20 + "}"

    for _ in range(2):
        syntax = await schema.execute("{ node { name }")
        tokens = await schema.execute(too_many_tokens)
        assert messages(syntax) == ["Syntax Error: Expected Name, found <EOF>."]
        assert messages(tokens) == [
            "query token count exceeds the maximum of 60 (parsing stopped at the limit)"
        ]

    assert len(documents) == 0
    assert (documents.stats.parse_misses, documents.stats.parse_hits) == (4, 0)


async def test_unique_documents_only_evict_others_and_the_cache_stays_bounded() -> None:
    documents = PreparedDocuments(max_documents=3)
    schema = make_schema(True, documents=documents)
    kept = "{ node { name } }"
    await schema.execute(kept)

    for i in range(10):
        result = await schema.execute(f"{{ a{i}: node {{ name }} }}")
        assert result.errors is None

    assert len(documents) == 3
    assert documents.stats.evictions == 8
    await schema.execute(kept)  # evicted by the unique ones: parsed again
    assert documents.stats.parse_hits == 0


async def test_the_cache_holds_at_most_its_characters_and_skips_long_documents() -> None:
    documents = PreparedDocuments(max_characters=60, max_document_characters=40)
    schema = make_schema(False, LimitSettings(max_tokens=2000), documents)
    short = [f"{{ a{i}: node {{ name }} }}" for i in range(4)]  # 22 characters each
    long = "{ " + " ".join(f"b{i}: node {{ name }}" for i in range(3)) + " }"

    for query in [*short, long, long]:
        assert (await schema.execute(query)).errors is None

    assert len(documents) == 2  # 44 of 60 characters; the long one is parsed each time
    assert documents.stats.evictions == 2
    assert documents.stats.parse_hits == 0


# --- introspection and suggestions ----------------------------------------------------------


async def test_introspection_is_refused_in_production() -> None:
    result = await make_schema(production=True).execute("{ __schema { queryType { name } } }")

    assert result.data is None
    assert "introspection has been disabled" in messages(result)[0]


async def test_full_introspection_query_is_answered_in_development_with_default_limits() -> None:
    result = await make_schema(False, LimitSettings()).execute(get_introspection_query())

    assert result.errors is None
    assert result.data is not None
    assert result.data["__schema"]["queryType"]["name"] == "Query"


async def test_typename_is_answered_in_production() -> None:
    result = await make_schema(production=True).execute("{ __typename }")

    assert result.data == {"__typename": "Query"}


async def test_production_errors_suggest_no_field_names() -> None:
    result = await make_schema(production=True).execute("{ node { nmae } }")

    assert messages(result) == ["Cannot query field 'nmae' on type 'Node'."]


async def test_development_errors_suggest_field_names() -> None:
    result = await make_schema(production=False).execute("{ node { nmae } }")

    assert messages(result) == ["Cannot query field 'nmae' on type 'Node'. Did you mean 'name'?"]


# --- error masking --------------------------------------------------------------------------


@pytest.mark.parametrize("production", [True, False])
async def test_unexpected_exception_is_masked(production: bool) -> None:
    result = await make_schema(production).execute("{ node { broken } }")

    assert messages(result) == ["Unexpected error."]
    assert result.data == {"node": {"broken": None}}


@pytest.mark.parametrize("production", [True, False])
async def test_client_error_is_shown_with_its_code(production: bool) -> None:
    result = await make_schema(production).execute("{ node { missing broken } }")

    assert result.errors is not None
    formatted = sorted((e.formatted for e in result.errors), key=lambda e: e["message"])
    assert [(e["message"], e.get("extensions"), e["path"]) for e in formatted] == [
        ("Unexpected error.", None, ["node", "broken"]),
        ("no prescription rx-1", {"code": "NOT_FOUND"}, ["node", "missing"]),
    ]


async def test_syntax_errors_are_shown_unmasked() -> None:
    result = await make_schema(production=True).execute("{ node { name }")

    assert messages(result) == ["Syntax Error: Expected Name, found <EOF>."]


# --- settings -------------------------------------------------------------------------------


def test_limit_settings_default_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DEPTH", "TOKENS", "ALIASES", "PAGE", "BODY_BYTES"):
        monkeypatch.delenv(f"RXLEDGER_MAX_{name}", raising=False)
    monkeypatch.delenv("RXLEDGER_RATE_LIMIT", raising=False)
    monkeypatch.delenv("RXLEDGER_RATE_BURST", raising=False)

    assert LimitSettings.from_env() == LimitSettings()


def test_limit_settings_are_read_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RXLEDGER_MAX_DEPTH", "8")
    monkeypatch.setenv("RXLEDGER_MAX_PAGE", "25")
    monkeypatch.setenv("RXLEDGER_RATE_LIMIT", "0.5")
    monkeypatch.setenv("RXLEDGER_RATE_BURST", "3")

    limits = LimitSettings.from_env()

    assert (limits.max_depth, limits.max_page, limits.rate_per_second, limits.rate_burst) == (
        8,
        25,
        0.5,
        3,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RXLEDGER_MAX_DEPTH", "0"),
        ("RXLEDGER_MAX_TOKENS", "1.5"),
        ("RXLEDGER_MAX_ALIASES", "-1"),
        ("RXLEDGER_MAX_BODY_BYTES", "64k"),
        ("RXLEDGER_RATE_LIMIT", "nan"),
        ("RXLEDGER_RATE_BURST", "0"),
    ],
)
def test_invalid_limit_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(ConfigError, match=name):
        LimitSettings.from_env()


# --- rate limiter ---------------------------------------------------------------------------


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_allows_a_burst_then_refuses_with_retry_after() -> None:
    clock = ManualClock()
    limiter = RateLimiter(rate_per_second=2, burst=3, clock=clock)

    assert [limiter.check("alice") for _ in range(3)] == [None, None, None]
    retry_after = limiter.check("alice")

    assert retry_after == pytest.approx(0.5)


def test_rate_limiter_refills_over_time() -> None:
    clock = ManualClock()
    limiter = RateLimiter(rate_per_second=2, burst=3, clock=clock)
    for _ in range(3):
        limiter.check("alice")

    clock.now += 0.5
    assert limiter.check("alice") is None
    assert limiter.check("alice") is not None
    clock.now += 10
    assert [limiter.check("alice") for _ in range(4)] == [None, None, None, pytest.approx(0.5)]


def test_rate_limiter_keys_are_independent() -> None:
    limiter = RateLimiter(rate_per_second=1, burst=1, clock=ManualClock())

    assert limiter.check("alice") is None
    assert limiter.check("alice") == pytest.approx(1.0)
    assert limiter.check("bob") is None


def test_rate_limiter_forgets_idle_keys_and_bounds_memory() -> None:
    clock = ManualClock()
    limiter = RateLimiter(rate_per_second=1, burst=2, clock=clock, max_keys=100)
    for i in range(50):
        limiter.check(f"subject-{i}")

    clock.now += 2  # every bucket is full again
    limiter.check("late")
    assert list(limiter.buckets) == ["late"]

    for i in range(500):
        limiter.check(f"flood-{i}")
    assert len(limiter.buckets) <= 100


def test_rate_limiter_with_rate_zero_allows_everything() -> None:
    limiter = RateLimiter(rate_per_second=0, burst=1)

    assert all(limiter.check("alice") is None for _ in range(1000))


# --- body size ------------------------------------------------------------------------------


async def body_length(request: Request) -> Response:
    return JSONResponse({"received": len(await request.body())})


def limited_app(max_bytes: int) -> BodySizeLimit:
    return BodySizeLimit(Starlette(routes=[Route("/", body_length, methods=["POST"])]), max_bytes)


def client_for(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")  # type: ignore[arg-type]


async def chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"x" * size


async def test_body_within_limit_reaches_the_app() -> None:
    async with client_for(limited_app(100)) as client:
        response = await client.post("/", content=b"x" * 100)

    assert response.status_code == 200
    assert response.json() == {"received": 100}


async def test_declared_content_length_over_limit_is_refused_with_413() -> None:
    async with client_for(limited_app(100)) as client:
        response = await client.post("/", content=b"x" * 101)

    assert response.status_code == 413
    assert response.json() == {
        "errors": [
            {
                "message": "request body of 101 bytes exceeds the maximum of 100 bytes",
                "extensions": {"code": "REQUEST_TOO_LARGE"},
            }
        ]
    }


async def test_streamed_body_over_limit_is_refused_with_413() -> None:
    async with client_for(limited_app(100)) as client:
        response = await client.post("/", content=chunks(count=5, size=40))

    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["errors"][0] == {
        "message": "request body of at least 120 bytes exceeds the maximum of 100 bytes",
        "extensions": {"code": "REQUEST_TOO_LARGE"},
    }


async def test_streamed_body_within_limit_reaches_the_app() -> None:
    async with client_for(limited_app(100)) as client:
        response = await client.post("/", content=chunks(count=2, size=40))

    assert response.status_code == 200
    assert response.json() == {"received": 80}


async def test_streamed_graphql_request_over_limit_is_refused_with_413() -> None:
    graphql = GraphQL(make_schema(production=True), graphql_ide=None)
    app = BodySizeLimit(Starlette(routes=[Route("/graphql", graphql, methods=["POST"])]), 100)

    async def query() -> AsyncIterator[bytes]:
        yield b'{"query": "{ node { name } }", "variables": {"padding": "'
        yield b"x" * 200
        yield b'"}}'

    async with client_for(app) as client:
        response = await client.post(
            "/graphql", content=query(), headers={"content-type": "application/json"}
        )

    assert response.status_code == 413
    assert response.json()["errors"][0]["extensions"] == {"code": "REQUEST_TOO_LARGE"}


# --- metrics --------------------------------------------------------------------------------


def sample_lines(metrics: Metrics) -> set[str]:
    body, _content_type = metrics.render()
    return {line for line in body.decode().splitlines() if not line.startswith("#")}


def test_metrics_render_counters_after_observations() -> None:
    metrics = Metrics()
    metrics.observe_request("/graphql", "POST", 200, 0.02)
    metrics.observe_request("/prescriptions/rx-1", "BREW", 404, 0.001)
    metrics.count_operation("mutation", "ok")
    metrics.count_mutation("dispense", "VersionConflict")
    metrics.count_rate_limited()

    body, content_type = metrics.render()
    lines = sample_lines(metrics)

    assert content_type.startswith("text/plain")
    assert 'rxledger_http_requests_total{method="POST",path="/graphql",status="200"} 1.0' in lines
    assert 'rxledger_http_requests_total{method="other",path="other",status="404"} 1.0' in lines
    assert 'rxledger_http_request_seconds_count{path="/graphql"} 1.0' in lines
    assert 'rxledger_graphql_operations_total{outcome="ok",type="mutation"} 1.0' in lines
    assert 'rxledger_mutations_total{mutation="dispense",result="VersionConflict"} 1.0' in lines
    assert "rxledger_rate_limited_total 1.0" in lines


def test_metrics_render_ledger_gauges_from_the_probe_at_scrape_time() -> None:
    metrics = Metrics()
    state = {"tree_size": 7.0, "checkpoint_size": 5.0, "queued_groups": 2.0}
    metrics.set_ledger_probe(lambda: {**state, "sequencer_leader": 1.0})

    assert {
        "rxledger_tree_size 7.0",
        "rxledger_checkpoint_size 5.0",
        "rxledger_queued_groups 2.0",
        "rxledger_sequencer_leader 1.0",
    } <= sample_lines(metrics)

    state["tree_size"] = 9.0
    assert "rxledger_tree_size 9.0" in sample_lines(metrics)


def test_metrics_scrape_survives_a_failing_probe() -> None:
    metrics = Metrics()
    metrics.count_rate_limited()

    def probe() -> dict[str, float]:
        raise RuntimeError("database unreachable")

    metrics.set_ledger_probe(probe)
    lines = sample_lines(metrics)

    assert "rxledger_rate_limited_total 1.0" in lines
    assert not any(line.startswith("rxledger_tree_size") for line in lines)


async def test_operation_counter_counts_graphql_operations_by_type_and_outcome() -> None:
    metrics = Metrics()
    schema = strawberry.Schema(
        Query, extensions=[*graphql_extensions(LIMITS, True), metrics.operation_counter()]
    )

    await schema.execute("{ node { name } }")
    await schema.execute("{ node { missing } }")
    await schema.execute("{ node { nmae } }")
    await schema.execute("{ node {")

    lines = sample_lines(metrics)
    assert 'rxledger_graphql_operations_total{outcome="ok",type="query"} 1.0' in lines
    assert 'rxledger_graphql_operations_total{outcome="error",type="query"} 2.0' in lines


def test_two_apps_in_one_process_have_separate_metrics() -> None:
    first, second = Metrics(), Metrics()
    first.count_rate_limited()

    assert "rxledger_rate_limited_total 1.0" in sample_lines(first)
    assert "rxledger_rate_limited_total 0.0" in sample_lines(second)


async def test_metrics_middleware_records_known_routes_and_buckets_the_rest() -> None:
    metrics = Metrics()

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def crash(request: Request) -> Response:
        raise RuntimeError("boom")

    app = Starlette(routes=[Route("/healthz", healthz), Route("/crash/{id}", crash)])
    transport = httpx.ASGITransport(app=MetricsMiddleware(app, metrics), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await client.get("/healthz")
        await client.get("/healthz")
        await client.get("/nowhere/1")
        await client.get("/crash/2")

    lines = sample_lines(metrics)
    assert 'rxledger_http_requests_total{method="GET",path="/healthz",status="200"} 2.0' in lines
    assert 'rxledger_http_requests_total{method="GET",path="other",status="404"} 1.0' in lines
    assert 'rxledger_http_requests_total{method="GET",path="other",status="500"} 1.0' in lines
    assert 'rxledger_http_request_seconds_count{path="/healthz"} 2.0' in lines
