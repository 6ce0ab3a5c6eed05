"""The schema: queries (ledger, prescriptions) and mutations, with the given extensions."""

from __future__ import annotations

import logging
from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.types import ExecutionContext

from anchoring.errors import database_error, frames
from app.limits import is_database_error, is_unexpected_error
from schema.ledger import Ledger
from schema.prescriptions import Mutation, PrescriptionQueries
from schema.subscriptions import Subscription
from schema.webhooks import WebhookMutations, WebhookQueries


@strawberry.type
class Query(PrescriptionQueries, WebhookQueries):
    @strawberry.field(description="the transparency log; readable without authentication")
    def ledger(self) -> Ledger:
        return Ledger()


@strawberry.type(name="Mutation")
class Mutations(Mutation, WebhookMutations):
    pass


log = logging.getLogger("rxledger.graphql")


class Schema(strawberry.Schema):
    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        """Log only unexpected errors: a refused token or a too-deep query is the client's
        business, and logging each as an error would bury the real ones. A database error is
        one line; anything else its class and stack. Never an error's text: it may quote the
        documents or events it failed on, with their personal data."""
        for error in errors:
            original = error.original_error
            if original is None or not is_unexpected_error(error):
                continue
            where = ".".join(str(p) for p in error.path or ())
            if is_database_error(error):
                log.warning("%s: database unavailable: %s", where, database_error(original))
            else:
                log.error("%s: unexpected %s\n%s", where, type(original).__name__, frames(original))


def make_schema(extensions: list[Any] | None = None) -> strawberry.Schema:
    return Schema(
        query=Query, mutation=Mutations, subscription=Subscription, extensions=extensions or []
    )


def sdl() -> str:
    """The schema in SDL, as exported to schema.graphql."""
    return make_schema().as_str() + "\n"
