"""Prometheus metrics of one app, in a registry of its own so that several apps (tests) in one
process do not clash. Served by the app at /metrics in the Prometheus text format.

Under `rxledger serve --workers N` (N > 1) every worker writes its counters and histograms to
prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, set by the parent), and
/metrics, whichever worker answers it, reports them summed over all the server's workers,
those that have exited included (counters never go down). The ledger gauges are read at the
scrape: the tree and checkpoint sizes as the answering worker has followed the log (all
workers follow the same log), `sequencer_leader` and `workers` for the server as a whole."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.extensions import SchemaExtension

from anchoring.errors import database_error, frames

log = logging.getLogger("rxledger.metrics")

# Labels come from clients; anything else is counted as "other" to bound the series.
KNOWN_PATHS = frozenset({"/graphql", "/healthz", "/readyz", "/metrics"})
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Ledger state read at scrape time: probe key -> help text; exported as rxledger_<key>.
LEDGER_GAUGES = {
    "tree_size": "Leaves sequenced into the published tree.",
    "checkpoint_size": "Tree size of the latest signed checkpoint.",
    "checkpoint_published_size": "Tree size of the latest published checkpoint (with "
    "RXLEDGER_WITNESS_QUORUM, the latest its witnesses cosigned); -1 before the first.",
    "queued_groups": "Intent groups queued and not yet sequenced (exported by the process that "
    "sequences).",
    "sequencer_leader": "1 if this server (one of its workers) holds the sequencer lease, else 0.",
    "workers": "Gateway worker processes of this server alive.",
    "subscribers": "Prescription-event subscribers (WebSocket and SSE) this server streams to.",
}

LedgerProbe = Callable[[], Mapping[str, float]]


class LedgerCollector:
    """Reads the ledger gauges from a probe at each scrape. The probe runs on the scraping
    thread or event loop, so it must be quick and must not block: return cached values."""

    def __init__(self) -> None:
        self.probe: LedgerProbe | None = None

    def describe(self) -> Iterable[Metric]:
        # Names only, so that registering does not call the probe.
        return [GaugeMetricFamily(f"rxledger_{key}", doc) for key, doc in LEDGER_GAUGES.items()]

    def collect(self) -> Iterable[Metric]:
        if self.probe is None:
            return []
        try:
            values = self.probe()
        except Exception as exc:
            # A failing probe must not break the scrape of everything else.
            log.error(
                "ledger probe failed (%s); ledger gauges omitted from this scrape\n%s",
                database_error(exc),
                frames(exc),
            )
            return []
        return [
            GaugeMetricFamily(f"rxledger_{key}", doc, value=float(values[key]))
            for key, doc in LEDGER_GAUGES.items()
            if key in values
        ]


class Metrics:
    """The counters, histograms and ledger gauges of one app. With `multiprocess_dir` (the
    server's PROMETHEUS_MULTIPROC_DIR), render() reports the counters and histograms of every
    process writing there."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        registry = self.registry
        self.http_requests = Counter(
            "rxledger_http_requests_total",
            "HTTP requests by route path, method and status.",
            ["path", "method", "status"],
            registry=registry,
        )
        self.http_request_seconds = Histogram(
            "rxledger_http_request_seconds",
            "Time from request to the end of the response, by route path.",
            ["path"],
            registry=registry,
        )
        self.graphql_operations = Counter(
            "rxledger_graphql_operations_total",
            "GraphQL operations by type (query, mutation, subscription) and outcome (ok, error).",
            ["type", "outcome"],
            registry=registry,
        )
        self.mutations = Counter(
            "rxledger_mutations_total",
            "Mutations by name and result (the union member returned, e.g. VersionConflict).",
            ["mutation", "result"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "rxledger_rate_limited_total",
            "Requests refused by the rate limiter.",
            registry=registry,
        )
        self.ledger = LedgerCollector()
        registry.register(self.ledger)
        self.collectors: list[Any] = []  # read at scrape time, like the ledger gauges

    def set_ledger_probe(self, probe: LedgerProbe) -> None:
        """Export the probe's values (keys of LEDGER_GAUGES; others ignored) at each scrape.
        The probe must return cached values without blocking."""
        self.ledger.probe = probe

    def add_collector(self, collector: Any) -> None:
        """Register a collector of gauges read at scrape time (with several workers, the
        answering worker's)."""
        self.registry.register(collector)
        self.collectors.append(collector)

    def observe_request(self, path: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP request; unknown paths and methods are labelled "other"."""
        path = path if path in KNOWN_PATHS else "other"
        method = method if method in KNOWN_METHODS else "other"
        self.http_requests.labels(path=path, method=method, status=str(status)).inc()
        self.http_request_seconds.labels(path=path).observe(seconds)

    def count_operation(self, operation_type: str, outcome: str) -> None:
        """Count one GraphQL operation: type query|mutation|subscription, outcome ok|error."""
        self.graphql_operations.labels(type=operation_type, outcome=outcome).inc()

    def operation_counter(self) -> Callable[[], SchemaExtension]:
        """A schema extension factory (for strawberry.Schema(extensions=...)) that counts every
        operation in rxledger_graphql_operations_total."""
        return partial(CountOperations, self)

    def count_mutation(self, mutation: str, result: str) -> None:
        """Count one mutation by field name and the union member it returned."""
        self.mutations.labels(mutation=mutation, result=result).inc()

    def count_rate_limited(self) -> None:
        self.rate_limited.inc()

    def render(self) -> tuple[bytes, str]:
        """The /metrics response: body and content type."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.multiprocess_dir)  # type: ignore[no-untyped-call]
        registry.register(self.ledger)
        for collector in self.collectors:
            registry.register(collector)
        return generate_latest(registry), CONTENT_TYPE_LATEST


class CountOperations(SchemaExtension):
    """Counts each GraphQL operation by type; the outcome is "error" if the result has any error.
    A document that does not parse, or names no operation it contains, has no type and is
    counted only as an HTTP request."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_operation(self) -> Iterator[None]:
        yield
        context = self.execution_context
        try:
            operation_type = context.operation_type.value
        except RuntimeError:
            return
        outcome = "error" if getattr(context.result, "errors", None) else "ok"
        self.metrics.count_operation(operation_type, outcome)


class MetricsMiddleware:
    """ASGI middleware recording every HTTP request's path, method, status and duration."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the server answers if the app fails before responding

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            self.metrics.observe_request(
                scope["path"], scope["method"], status, time.perf_counter() - start
            )
