"""The schema: queries (ledger, prescriptions) and mutations, with the given extensions."""

from __future__ import annotations

from typing import Any

import strawberry

from schema.ledger import Ledger
from schema.prescriptions import Mutation, PrescriptionQueries


@strawberry.type
class Query(PrescriptionQueries):
    @strawberry.field(description="the transparency log; readable without authentication")
    def ledger(self) -> Ledger:
        return Ledger()


def make_schema(extensions: list[Any] | None = None) -> strawberry.Schema:
    return strawberry.Schema(query=Query, mutation=Mutation, extensions=extensions or [])


def sdl() -> str:
    """The schema in SDL, as exported to schema.graphql."""
    return make_schema().as_str() + "\n"
