"""The schema: queries (ledger, prescriptions) and mutations, with the given extensions."""

from __future__ import annotations

from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.types import ExecutionContext

from app.limits import is_unexpected_error
from schema.ledger import Ledger
from schema.prescriptions import Mutation, PrescriptionQueries
from schema.subscriptions import Subscription


@strawberry.type
class Query(PrescriptionQueries):
    @strawberry.field(description="the transparency log; readable without authentication")
    def ledger(self) -> Ledger:
        return Ledger()


class Schema(strawberry.Schema):
    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        """Log only unexpected errors: a refused token or a too-deep query is the client's
        business, and logging each as an error would bury the real ones."""
        unexpected = [e for e in errors if is_unexpected_error(e)]
        if unexpected:
            super().process_errors(unexpected, execution_context)


def make_schema(extensions: list[Any] | None = None) -> strawberry.Schema:
    return Schema(
        query=Query, mutation=Mutation, subscription=Subscription, extensions=extensions or []
    )


def sdl() -> str:
    """The schema in SDL, as exported to schema.graphql."""
    return make_schema().as_str() + "\n"
