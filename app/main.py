"""The starlette application: GraphQL, health and readiness, with the log running inside."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from pymongo.errors import PyMongoError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from strawberry.asgi import GraphQL

from anchoring.sequencer import INTENTS
from app.db import make_client, make_log
from app.settings import Settings
from schema.ledger import schema

log = logging.getLogger("rxledger.app")


class GraphQLApp(GraphQL[dict[str, Any], None]):
    async def get_context(self, request: Any, response: Any = None) -> dict[str, Any]:
        return {"request": request, "response": response, "log": request.app.state.log}


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = make_client(settings)
        tlog = make_log(settings, client)
        app.state.log = tlog
        await tlog.start()
        log.info(
            "rxledger %s mode; log %s; verifier key %s",
            settings.mode,
            settings.origin,
            tlog.verifier_key,
        )
        try:
            yield
        finally:
            await tlog.stop()
            await client.close()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        tlog = request.app.state.log
        try:
            await tlog.store.db.command("ping")
            queued = await tlog.store.pending.count_documents(INTENTS)
        except PyMongoError as exc:
            return JSONResponse(
                {"status": "unavailable", "database": f"unreachable: {type(exc).__name__}"},
                status_code=503,
            )
        body = {
            "status": "ok",
            "database": "ok",
            "sequencerLeader": tlog.sequencer.is_leader,
            "treeSize": await tlog.published_size(),
            "queuedGroups": queued,
            "sequencerError": tlog.sequencer.last_error,
            "anchorError": tlog.anchor_error,
        }
        if not tlog.running:
            body["status"] = "sequencer stopped"
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)

    graphql = GraphQLApp(schema, graphql_ide=None if settings.production else "graphiql")
    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/graphql", graphql, methods=["GET", "POST"]),
        ],
        lifespan=lifespan,
    )
