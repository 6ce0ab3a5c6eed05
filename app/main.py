"""The starlette application: GraphQL, health, readiness and metrics, with the log running
inside.

GraphQL answers, request bodies and WebSocket messages are JSON by orjson: compact, in UTF-8
(characters outside ASCII are not escaped), the same values as the standard library's json.
A body orjson would read differently (integers beyond 64 bits, which it turns into floats;
NaN; lone surrogates; UTF-16) is read by the standard library instead, so every request means
what it did before.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
from graphql import GraphQLFormattedError
from pymongo.errors import PyMongoError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES, GZipMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send
from strawberry.asgi import GraphQL
from strawberry.http import GraphQLHTTPResponse
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
    Operation,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import SubscribeMessage
from strawberry.types import ExecutionResult
from uvicorn.config import STARTUP_FAILURE

from anchoring.dialect import detect as detect_dialect
from anchoring.errors import database_error, frames
from anchoring.ledger import INTENTS
from app.auth import Authenticator, AuthError, AuthSettings, Viewer
from app.cors import CrossOriginSettings
from app.db import PRESCRIPTIONS, make_client, make_log
from app.events import EventStream
from app.feed import PrescriptionFeed
from app.limits import (
    REQUEST_TOO_LARGE,
    BodySizeLimit,
    LimitSettings,
    RateLimiter,
    SharedRateLimiter,
    graphql_extensions,
)
from app.logserver import OCTETS, LogServer
from app.metrics import Metrics, MetricsMiddleware
from app.service import PrescriptionService
from app.settings import Settings, announce_mode
from app.webhooks import WebhookDispatcher, WebhookMetrics, WebhookStore
from app.workers import (
    METRICS_DIR_ENV,
    SERVER_STATE_ENV,
    ServerState,
    configure_logging,
    exit_with_parent,
)
from schema.loaders import LoadersPerOperation
from schema.root import make_schema
from schema.subscriptions import HANDOFF, FanOut, Handoff

log = logging.getLogger("rxledger.app")

STATIC = Path(__file__).parent / "static"
# The audit page runs only its own script and style: nothing inline, nothing from elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# Below this size gzip saves a few hundred bytes at most. Level 6: on a 500 kB listing of
# proofs, within 0.5 % of level 9's size in two thirds of its time.
GZIP_MIN_BYTES = 1024
GZIP_LEVEL = 6
# Never compressed: event streams (a compressor holds events back) and what is compressed
# already or does not compress (entry bundles arrive gzipped, hash tiles are random bytes).
GZIP_EXCLUDED = (*DEFAULT_EXCLUDED_CONTENT_TYPES, "text/event-stream", OCTETS)


def _problem(message: str, code: str, **extensions: Any) -> GraphQLFormattedError:
    """One GraphQL error, as HTTP error bodies and WebSocket error messages carry it."""
    return {"message": message, "extensions": {"code": code, **extensions}}


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> Response:
    body = {"errors": [_problem(message, code)]}
    return JSONResponse(body, status_code=status, headers=headers)


def _rate_key(viewer: Viewer | None, scope: Scope) -> str:
    """What a caller's requests count against: its subject, or its address when anonymous."""
    if viewer is not None:
        return viewer.rate_key
    client = scope.get("client") or ("?",)
    return f"ip:{client[0]}"


def _over_rate(limiter: RateLimiter, key: str, scope: Scope) -> tuple[str, int] | None:
    """None when `key` may go on (a token is taken); else the error message and the whole
    seconds to wait (Retry-After), counted in the metrics."""
    retry = limiter.check(key)
    if retry is None:
        return None
    scope["app"].state.metrics.count_rate_limited()
    return f"rate limit exceeded for {key}: retry in {retry:.1f} s", max(1, round(retry))


# Nineteen digits or more: perhaps an integer beyond 64 bits, which orjson reads as a float.
_LONG_NUMBER_TEXT = re.compile(r"[0-9]{19}")
_LONG_NUMBER_BYTES = re.compile(rb"[0-9]{19}")


def decode_json(data: str | bytes) -> object:
    """JSON as json.loads reads it, by orjson whenever orjson reads it the same. Raises
    json.JSONDecodeError (orjson's is a subclass) on malformed JSON."""
    pattern = _LONG_NUMBER_BYTES if isinstance(data, bytes) else _LONG_NUMBER_TEXT
    if pattern.search(data) is None:  # type: ignore[arg-type]
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # NaN, lone surrogates, UTF-16...: json decides, and words its error
    return json.loads(data)


def encode_json(data: object) -> bytes:
    """Compact UTF-8 JSON; what orjson cannot encode (integers beyond 64 bits, keys that are
    not strings) is encoded by json."""
    try:
        return orjson.dumps(data)
    except TypeError:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


class _SubscribeMessage(dict[str, Any]):
    """A decoded subscribe message that remembers its size on the wire."""

    def __init__(self, decoded: dict[str, Any], size: int) -> None:
        super().__init__(decoded)
        self.size = size


class StrictTransportWS(BaseGraphQLTransportWSHandler[dict[str, Any], None]):
    """graphql-transport-ws with each operation held to what an HTTP request is: the size of
    its message, the token's expiry and the caller's rate are checked before it runs, and a
    refused operation gets an `error` message while the connection stays open."""

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        view = self.view
        # Before the handshake, or with an id in use, strawberry closes the socket as the
        # protocol says; an error message there would answer an operation that is not ours.
        if (
            isinstance(view, GraphQLApp)
            and self.connection_acknowledged
            and message["id"] not in self.operations
        ):
            refused = view.refusal(self.context, message)
            if refused is not None:
                await self.send_message(
                    {"id": message["id"], "type": "error", "payload": [refused]}
                )
                return
        # The operation's task inherits the handoff: a grouped subscription leaves its member
        # there (schema/subscriptions.py), for _send_result_stream to deliver.
        payload = message.get("payload")
        handoff = None
        if isinstance(payload, dict) and isinstance(payload.get("query"), str):
            handoff = Handoff(
                payload["query"], payload.get("variables"), payload.get("operationName")
            )
        token = HANDOFF.set(handoff)
        try:
            await super().handle_subscribe(message)
        finally:
            HANDOFF.reset(token)

    async def _send_result_stream(
        self, operation: Operation[dict[str, Any], None], result_source: Any
    ) -> None:
        await super()._send_result_stream(operation, result_source)
        handoff = HANDOFF.get()
        if handoff is None or handoff.member is None:
            return
        # The group's payload, serialized once, in this operation's own `next` message; the
        # error that ends the member's stream as strawberry sends a resolver's.
        head = f'{{"id":{json.dumps(operation.id)},"type":"next","payload":'

        async def send(payload: str) -> None:
            await self.websocket.send_json(SerializedMessage(head + payload + "}"))

        error = await handoff.member.deliver(send)
        if error is not None:
            await operation.send_next(ExecutionResult(data=None, errors=[error]))


class SerializedMessage(dict[str, Any]):
    """A message already serialized (GraphQLApp.encode_json sends its text as it is)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class GraphQLApp(GraphQL[dict[str, Any], None]):
    graphql_transport_ws_handler_class = StrictTransportWS

    def __init__(
        self,
        *args: Any,
        max_page: int,
        auth: Authenticator,
        limiter: RateLimiter,
        max_body_bytes: int,
        **kwargs: Any,
    ) -> None:
        # Only graphql-transport-ws: the older graphql-ws would run operations unchecked.
        kwargs["subscription_protocols"] = (GRAPHQL_TRANSPORT_WS_PROTOCOL,)
        super().__init__(*args, **kwargs)
        self.max_page = max_page
        self.auth = auth
        self.limiter = limiter
        self.max_body_bytes = max_body_bytes

    def encode_json(self, data: object) -> str:
        # A str: strawberry sends bytes on a WebSocket as binary frames, which
        # graphql-transport-ws does not allow. HTTP answers skip the str (create_response).
        # A grouped subscription's message is serialized once already: sent as it is.
        if isinstance(data, SerializedMessage):
            return data.text
        return encode_json(data).decode()

    def create_response(
        self, response_data: GraphQLHTTPResponse | list[GraphQLHTTPResponse], sub_response: Response
    ) -> Response:
        response = Response(encode_json(response_data), media_type="application/json")
        response.headers.raw.extend(sub_response.headers.raw)
        if sub_response.background:
            response.background = sub_response.background
        if sub_response.status_code:
            response.status_code = sub_response.status_code
        return response

    def decode_json(self, data: str | bytes) -> object:
        decoded = decode_json(data)
        if isinstance(decoded, dict) and decoded.get("type") == "subscribe":
            size = len(data.encode() if isinstance(data, str) else data)
            return _SubscribeMessage(decoded, size)
        return decoded

    def refusal(
        self, context: dict[str, Any], message: SubscribeMessage
    ) -> GraphQLFormattedError | None:
        """Why an operation on a WebSocket may not run (a GraphQL error), or None: its message
        is larger than an HTTP body may be, the token has expired, or the caller is over its
        rate (sharing its bucket with its HTTP requests)."""
        size = getattr(message, "size", 0)
        if size > self.max_body_bytes:
            return _problem(
                f"subscribe message of {size} bytes exceeds the maximum of "
                f"{self.max_body_bytes} bytes",
                REQUEST_TOO_LARGE,
            )
        viewer: Viewer | None = context.get("viewer")
        # From `exp` on, as subscriptions end then: the leeway HTTP grants for clock skew is
        # for a token's first use, and this socket has used it already.
        if (
            viewer is not None
            and viewer.expires_at is not None
            and time.time() >= viewer.expires_at
        ):
            return _problem("token has expired; reconnect with a fresh token", "UNAUTHENTICATED")
        scope = context["request"].scope
        over = _over_rate(self.limiter, _rate_key(viewer, scope), scope)
        if over is not None:
            text, retry_after = over
            return _problem(text, "RATE_LIMITED", retryAfter=retry_after)
        return None

    async def get_context(self, request: Any, response: Any = None) -> dict[str, Any]:
        state = request.app.state
        return {
            "request": request,
            "response": response,
            "log": state.log,
            "service": state.service,
            "feed": state.feed,
            "fanout": state.fanout,
            "metrics": state.metrics,
            "webhooks": state.webhooks,
            "viewer": request.scope.get("state", {}).get("viewer"),
            "max_page": self.max_page,
        }

    async def on_ws_connect(self, context: dict[str, Any]) -> None:
        """WebSocket clients authenticate in the connection_init payload
        ({"Authorization": "Bearer <token>"}) or with the upgrade request's header. A bad token
        still connects, so that each operation can say precisely what is wrong."""
        params = context.get("connection_params") or {}
        header = params.get("Authorization") or params.get("authorization")
        if not isinstance(header, str):
            header = context["request"].headers.get("authorization")
        try:
            context["viewer"] = self.auth.authenticate(header)
        except AuthError as exc:
            context["viewer"] = None
            context["auth_error"] = str(exc)


class GraphQLEndpoint:
    """Authenticates and rate-limits each request before strawberry sees it: a bad token is
    a 401 and a caller over its rate a 429, both with a GraphQL-shaped error body."""

    def __init__(self, graphql: GraphQLApp, auth: Authenticator, limiter: RateLimiter) -> None:
        self.graphql = graphql
        self.auth = auth
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            try:
                viewer = self.auth.authenticate(request.headers.get("authorization"))
            except AuthError as exc:
                response = _error(
                    401,
                    str(exc),
                    "UNAUTHENTICATED",
                    {"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
                return await response(scope, receive, send)
            over = _over_rate(self.limiter, _rate_key(viewer, scope), scope)
            if over is not None:
                text, retry_after = over
                response = _error(429, text, "RATE_LIMITED", {"Retry-After": str(retry_after)})
                return await response(scope, receive, send)
            scope.setdefault("state", {})["viewer"] = viewer
        await self.graphql(scope, receive, send)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    # A worker of `rxledger serve --workers N`: the parent announced the mode, once.
    server = ServerState.from_env()
    if server is None:
        announce_mode(settings)
    else:
        configure_logging()
    auth = Authenticator(AuthSettings.from_env(settings.mode, settings.var_dir))
    limits = LimitSettings.from_env()
    cross_origin = CrossOriginSettings.from_env(settings.production)
    metrics = Metrics(os.environ.get(METRICS_DIR_ENV) if server is not None else None)
    webhook_metrics = WebhookMetrics(metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = make_client(settings)
        tlog = make_log(settings, client)
        # What one worker changes of the checkpoints, the others stop serving from cache.
        tlog.peers = server
        derived = settings.derived_keys(tlog.signer)
        service = PrescriptionService(tlog, client[settings.database][PRESCRIPTIONS], derived.tags)
        app.state.log = tlog
        app.state.service = service
        app.state.feed = PrescriptionFeed(tlog, window=limits.subscription_window)
        app.state.fanout = FanOut()
        app.state.metrics = metrics
        webhooks = WebhookDispatcher(
            WebhookStore(client[settings.database]),
            tlog,
            app.state.feed,
            service.tags,
            settings.webhooks,
            webhook_metrics,
            derived,
        )
        app.state.webhooks = webhooks
        # Set when the server begins to stop, for responses that never end by themselves.
        app.state.stopping = asyncio.Event()
        restore_signals = _notice_exit_signals(app.state.stopping)
        feed = app.state.feed
        metrics.set_ledger_probe(lambda: _probe(tlog, server, feed))
        if server is not None:
            server.join(os.getpid())
        await tlog.start()
        upkeep = asyncio.create_task(_prepare(service), name="prescriptions-upkeep")
        webhooks_stopping = asyncio.Event()
        delivering = asyncio.create_task(webhooks.run(webhooks_stopping), name="webhooks")
        if server is not None:
            roll_call = asyncio.create_task(_roll_call(tlog, server, feed), name="worker-roll-call")
        log.info(
            "rxledger %s mode; log %s; verifier key %s",
            settings.mode,
            settings.origin,
            tlog.verifier_key,
        )
        try:
            yield
        finally:
            restore_signals()
            webhooks_stopping.set()
            await delivering
            upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upkeep
            await tlog.stop()
            if server is not None:
                roll_call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await roll_call
                server.leave()
            await client.close()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        tlog = request.app.state.log
        try:
            await tlog.store.db.command("ping")
            queued = await tlog.store.pending.count_documents(INTENTS)
            # The head of the queue, in the order the sequencer takes groups (an index serves
            # it: LOG_INDEXES, pending).
            oldest = await tlog.store.pending.find_one(INTENTS, {"queuedAt": 1}, sort=[("_id", 1)])
            tree_size = await tlog.published_size()
        except PyMongoError as exc:
            return JSONResponse(
                {"status": "unavailable", "database": f"unreachable: {type(exc).__name__}"},
                status_code=503,
            )
        body = {
            "status": "ok",
            "database": "ok",
            # This server: with several workers, whether one of them holds the lease.
            "sequencerLeader": _server_leads(tlog, server),
            # Which worker answered, and whether it is the one sequencing.
            "worker": {"pid": os.getpid(), "leads": tlog.sequencer.is_leader},
            "workers": 1 if server is None else len(server.workers()),
            "treeSize": tree_size,
            "queuedGroups": queued,
            # How long the oldest unsequenced append has waited: the sequencer's lag.
            "sequencerLagSeconds": 0.0
            if oldest is None
            else round((dt.datetime.now(dt.UTC) - oldest["queuedAt"]).total_seconds(), 3),
            "sequencerError": tlog.sequencer.last_error,
            "anchorError": tlog.anchor_error,
            # Listed, not failing readiness: a partner's broken receiver is not ours.
            "failingWebhookEndpoints": request.app.state.webhooks.failing(),
        }
        if tlog.settings.witnesses:
            try:
                witnesses = await tlog.witness_status()
            except PyMongoError as exc:
                witnesses = {"error": f"database: {type(exc).__name__}"}
            body["witnesses"] = witnesses
            # A checkpoint waits a moment for witnesses polling it: only a longer wait counts.
            grace = max(5.0, 5 * tlog.settings.anchor.interval)
            if witnesses.get("missing") and witnesses.get("waitingSeconds", 0) >= grace:
                # Still ready: writes and reads go on; only new checkpoints wait.
                body["status"] = (
                    f"degraded: checkpoint {witnesses['newestSignedSize']} waits for "
                    f"{tlog.settings.quorum} of {len(tlog.settings.witnesses)} witnesses; "
                    f"missing: {', '.join(witnesses['missing'])}"
                )
        if not tlog.running:
            body["status"] = "sequencer stopped"
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)

    async def audit_page(request: Request) -> Response:
        return FileResponse(STATIC / "audit.html", headers=PAGE_HEADERS)

    async def metrics_endpoint(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # One limiter for HTTP requests and WebSocket operations: a caller has one budget, shared
    # by all the workers of the server.
    limiter = (
        RateLimiter(limits.rate_per_second, limits.rate_burst)
        if server is None
        else SharedRateLimiter(server, limits.rate_per_second, limits.rate_burst)
    )
    graphql = GraphQLApp(
        make_schema(
            [
                LoadersPerOperation,
                *graphql_extensions(limits, settings.production),
                metrics.operation_counter(),
            ]
        ),
        graphql_ide=None if settings.production else "graphiql",
        max_page=limits.max_page,
        auth=auth,
        limiter=limiter,
        max_body_bytes=limits.max_body_bytes,
        max_subscriptions_per_connection=limits.max_subscriptions,
        # WebSocket upgrades from pages on other origins: the CORS allowlist (app/cors.py).
        allowed_origins=cross_origin.origins,
    )
    endpoint = GraphQLEndpoint(graphql, auth, limiter)
    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
            Route("/graphql", endpoint, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", graphql),
            Route("/events", EventStream(auth)),
            *LogServer().routes(),
            Route("/audit", audit_page),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[
            Middleware(MetricsMiddleware, metrics=metrics),
            # Outside the rest, so that refusals (401, 413, 429) reach the page too.
            cross_origin.middleware(),
            Middleware(
                GZipMiddleware,
                minimum_size=GZIP_MIN_BYTES,
                compresslevel=GZIP_LEVEL,
                exclude_content_types=GZIP_EXCLUDED,
            ),
            Middleware(BodySizeLimit, max_bytes=limits.max_body_bytes),
        ],
        lifespan=lifespan,
    )


def serve_app() -> Starlette:
    """The app factory `rxledger serve` hands uvicorn. A failure to build the app ends the
    process as uvicorn's startup failure (exit 3), so that its supervisor stops the server
    instead of restarting a worker that can only fail again."""
    if os.environ.get(SERVER_STATE_ENV):
        configure_logging()  # a worker: before anything can fail
        exit_with_parent()
    try:
        return create_app()
    except Exception:
        log.exception("the gateway app could not be built; stopping")
        sys.exit(STARTUP_FAILURE)


def _probe(tlog: Any, server: ServerState | None, feed: PrescriptionFeed) -> dict[str, float]:
    """Gauges for /metrics, from what the process already knows (no database reads). With
    several workers, the sequencer's and anchorer's sizes are those of the worker that leads,
    and the other workers' subscribers, as they last reported them (every ROLL_CALL_SECONDS)."""
    cp = tlog.anchorer.latest
    own = len(feed.subscribers)
    gauges = {
        "subscribers": float(own),
        "tree_size": float(tlog.sequencer.size),
        "checkpoint_size": float(cp.size if cp else 0),
        "checkpoint_published_size": float(tlog.tail.checkpoint_size),
        "sequencer_leader": 1.0 if tlog.sequencer.is_leader else 0.0,
    }
    if tlog.sequencer.is_leader:  # only the leader knows the queue without reading it
        gauges["queued_groups"] = float(tlog.sequencer.queued_groups)
    if server is not None:
        workers = server.workers()
        leader = next((w for w in workers if w.leads), None)
        gauges["workers"] = float(len(workers))
        pid = os.getpid()
        gauges["subscribers"] = float(own + sum(w.subscribers for w in workers if w.pid != pid))
        gauges["sequencer_leader"] = 0.0 if leader is None else 1.0
        if leader is not None and not tlog.sequencer.is_leader:
            gauges["tree_size"] = float(leader.tree_size)
            gauges["checkpoint_size"] = float(leader.checkpoint_size)
    return gauges


def _notice_exit_signals(stopping: asyncio.Event) -> Callable[[], None]:
    """Set `stopping` on SIGTERM or SIGINT, then let the server's own handler (uvicorn's,
    installed before the lifespan starts) stop the server as it would have. uvicorn waits for
    open responses before it shuts the app down, and an event stream never ends by itself:
    told, it ends with a resume point instead of being cancelled at the grace period's end.
    Returns the function that puts the previous handlers back. Does nothing outside the main
    thread, or where no handler is installed to chain to (an app run in a test)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Callable[[int, Any], Any]] = {}

    def handler(signum: int, frame: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to tell
            loop.call_soon_threadsafe(stopping.set)
        previous[signum](signum, frame)

    for signum in (signal.SIGTERM, signal.SIGINT):
        installed = signal.getsignal(signum)
        if callable(installed):
            previous[signum] = installed
            signal.signal(signum, handler)

    def restore() -> None:
        for signum, installed in previous.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, installed)

    return restore


def _server_leads(tlog: Any, server: ServerState | None) -> bool:
    """Whether this process, or with several workers any of them, holds the sequencer lease."""
    if server is None:
        return bool(tlog.sequencer.is_leader)
    return server.leader() is not None


ROLL_CALL_SECONDS = 0.2


async def _roll_call(tlog: Any, server: ServerState, feed: PrescriptionFeed) -> None:
    """Keep this worker's entry in the server's worker table saying whether it sequences, the
    sizes its sequencer and anchorer know and its subscribers (for /metrics on the others)."""
    while True:
        cp = tlog.anchorer.latest
        server.report(
            tlog.sequencer.is_leader,
            tlog.sequencer.size,
            cp.size if cp else 0,
            len(feed.subscribers),
        )
        await asyncio.sleep(ROLL_CALL_SECONDS)


async def _prepare(service: PrescriptionService) -> None:
    """Indexes, then the repair sweep; retried while the database is away."""
    delay = 0.5
    while True:
        try:
            await service.log.store.ensure_indexes()
            await service.ensure_indexes()
            # The webhook collections live beside the prescriptions.
            await WebhookStore(service.prescriptions.database).ensure_indexes()
            log.info("storage dialect: %s", (await detect_dialect(service.prescriptions)).value)
            repaired = await service.sweep()
            if repaired:
                log.warning("start-up sweep: repaired %d prescriptions from the ledger", repaired)
            return
        except PyMongoError as exc:
            log.warning("start-up sweep: database unavailable (%s); retrying", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        except Exception as exc:
            # Not the database being away: retrying would fail the same way. Reads and
            # mutations still repair each document they meet.
            log.error(
                "start-up sweep failed (%s); not retried\n%s", database_error(exc), frames(exc)
            )
            return
