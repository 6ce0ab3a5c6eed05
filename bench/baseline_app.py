"""The baseline for bench/graphql.py: the prescription API a team would otherwise write.

Plain strawberry on starlette over pymongo CRUD: the same prescription fields as the gateway,
issuePrescription (one insert) and dispensePrescription (find_one, then update_one guarded by
the version), prescription(id) (one find_one). No ledger, no proofs, no authentication;
writes refused with SQLITE_BUSY by FerretDB are retried.

    MONGODB_URI=mongodb://127.0.0.1:27017/ BASELINE_DB=baseline \\
        .venv/bin/python -m bench.baseline_app --port 8001   (from the repository root)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import enum
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

import strawberry
import uvicorn
from bson import ObjectId
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from strawberry.asgi import GraphQL
from strawberry.types import Info


@strawberry.enum
class Status(enum.Enum):
    ISSUED = "ISSUED"
    DISPENSED = "DISPENSED"


@strawberry.type
class Patient:
    id: str
    name: str


@strawberry.type
class Medication:
    code: str
    name: str
    dose: str
    quantity: int
    instructions: str | None


@strawberry.type
class StatusTime:
    status: Status
    at: dt.datetime


@strawberry.type
class Prescription:
    id: strawberry.ID
    status: Status
    version: int
    patient: Patient
    prescriber: str
    department: str | None
    pharmacy: str
    medications: list[Medication]
    notes: str | None
    issued_at: dt.datetime
    updated_at: dt.datetime
    timeline: list[StatusTime]

    @classmethod
    def of(cls, doc: dict[str, Any]) -> Prescription:
        return cls(
            id=strawberry.ID(doc["_id"]),
            status=Status(doc["status"]),
            version=doc["version"],
            patient=Patient(**doc["patient"]),
            prescriber=doc["prescriber"],
            department=doc.get("department"),
            pharmacy=doc["pharmacy"],
            medications=[
                Medication(
                    code=m["code"],
                    name=m["name"],
                    dose=m["dose"],
                    quantity=m["quantity"],
                    instructions=m.get("instructions"),
                )
                for m in doc["medications"]
            ],
            notes=doc.get("notes"),
            issued_at=doc["issuedAt"],
            updated_at=doc["updatedAt"],
            timeline=[StatusTime(status=Status(s), at=at) for s, at in doc["timestamps"].items()],
        )


@strawberry.type
class NotFound:
    message: str


@strawberry.type
class VersionConflict:
    message: str


@strawberry.type
class IllegalTransition:
    message: str


PrescriptionResult = Annotated[
    Prescription | NotFound | VersionConflict | IllegalTransition,
    strawberry.union("PrescriptionResult"),
]


@strawberry.input
class PatientInput:
    id: str
    name: str


@strawberry.input
class MedicationInput:
    code: str
    name: str
    dose: str
    quantity: int
    instructions: str | None = None


@strawberry.input
class IssuePrescriptionInput:
    patient: PatientInput
    medications: list[MedicationInput]
    pharmacy: str
    prescriber: str  # no authentication here: the caller says who they are
    department: str | None = None
    notes: str | None = None


T = TypeVar("T")
BUSY_ATTEMPTS = 8


async def retried(write: Callable[[], Awaitable[T]]) -> T:
    """FerretDB's SQLite handler refuses a writer that waited past its busy timeout with
    "database is locked" (SQLITE_BUSY), nothing written; a team on it would retry those."""
    for attempt in range(BUSY_ATTEMPTS):
        try:
            return await write()
        except OperationFailure as exc:
            if "SQLITE_BUSY" not in str(exc) or attempt == BUSY_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


def now() -> dt.datetime:
    t = dt.datetime.now(dt.UTC)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def collection(info: Info) -> Any:
    return info.context["prescriptions"]


@strawberry.type
class Query:
    @strawberry.field
    async def prescription(self, info: Info, id: strawberry.ID) -> Prescription | None:
        doc = await collection(info).find_one({"_id": str(id)})
        return None if doc is None else Prescription.of(doc)


@strawberry.type
class Mutation:
    @strawberry.mutation
    async def issue_prescription(self, info: Info, input: IssuePrescriptionInput) -> Prescription:
        at = now()
        doc: dict[str, Any] = {
            "_id": "rx_" + str(ObjectId()),
            "status": Status.ISSUED.value,
            "version": 1,
            "patient": {"id": input.patient.id, "name": input.patient.name},
            "prescriber": input.prescriber,
            "department": input.department,
            "pharmacy": input.pharmacy,
            "medications": [vars(m) for m in input.medications],
            "notes": input.notes,
            "issuedAt": at,
            "updatedAt": at,
            "timestamps": {Status.ISSUED.value: at},
        }
        await retried(lambda: collection(info).insert_one(doc))
        return Prescription.of(doc)

    @strawberry.mutation
    async def dispense_prescription(
        self, info: Info, id: strawberry.ID, expected_version: int
    ) -> PrescriptionResult:
        prescriptions = collection(info)
        doc = await prescriptions.find_one({"_id": str(id)})
        if doc is None:
            return NotFound(message=f"no prescription {id}")
        if doc["version"] != expected_version:
            return VersionConflict(message=f"the prescription is at version {doc['version']}")
        if doc["status"] != Status.ISSUED.value:
            return IllegalTransition(message=f"the prescription is {doc['status']}")
        at = now()
        changes = {
            "status": Status.DISPENSED.value,
            "version": expected_version + 1,
            "updatedAt": at,
            f"timestamps.{Status.DISPENSED.value}": at,
        }
        done = await retried(
            lambda: prescriptions.update_one(
                {"_id": doc["_id"], "version": expected_version}, {"$set": changes}
            )
        )
        if done.modified_count != 1:
            return VersionConflict(message="changed concurrently: read it again")
        doc.update(changes)
        doc["timestamps"][Status.DISPENSED.value] = at
        return Prescription.of(doc)


class BaselineGraphQL(GraphQL[dict[str, Any], None]):
    async def get_context(self, request: Any, response: Any = None) -> dict[str, Any]:
        return {"prescriptions": request.app.state.prescriptions}


def create_app(mongodb_uri: str, database: str) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_uri, tz_aware=True)
        app.state.prescriptions = client[database]["prescriptions"]
        try:
            yield
        finally:
            await client.close()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    schema = strawberry.Schema(query=Query, mutation=Mutation)
    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/graphql", BaselineGraphQL(schema, graphql_ide=None), methods=["GET", "POST"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    app = create_app(
        os.environ.get("MONGODB_URI", "mongodb://127.0.0.1:27017/"),
        os.environ.get("BASELINE_DB", "baseline"),
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
