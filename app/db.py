"""The database client and the log built from settings."""

from __future__ import annotations

from dataclasses import dataclass

from pymongo import AsyncMongoClient

from anchoring.log import TransparencyLog
from anchoring.store import CollectionNames, Doc, Index, LogStore, log_indexes
from app.service import PRESCRIPTION_INDEXES
from app.settings import Settings
from app.webhooks import WEBHOOK_INDEXES

PRESCRIPTIONS = "prescriptions"


@dataclass(frozen=True)
class FullRead:
    """A read of a whole collection the product intends: the collection, the function that
    sends it (`anchoring/audit.py _check_tiles`, comprehensions inside it included) and why
    it must read everything."""

    collection: str
    origin: str
    reason: str


# The only reads of whole collections, each with its reason. Every other read the product
# sends is served by an index of declared_indexes() (or `_id`): the test run checks that
# (tests/notablescan.py), as MongoDB's `notablescan` would.
FULL_READS: tuple[FullRead, ...] = (
    FullRead(
        "notarizations",
        "anchoring/audit.py _load_checkpoints",
        "the audit checks every checkpoint ever signed, oldest first",
    ),
    FullRead(
        "tiles",
        "anchoring/audit.py _check_tiles",
        "the audit recomputes every stored tile from the entries",
    ),
    FullRead(
        "pending",
        "anchoring/sequencer.py Sequencer._scan",
        "the sequencer reads the whole queue in _id order (the _id index on MongoDB); it holds"
        " only what is appended and not yet sequenced, spaced out while busy",
    ),
    FullRead(
        "pending",
        "app/service.py PrescriptionService.sweep",
        "the start-up repair sweep reads the queue: what is appended and not yet sequenced",
    ),
)


def declared_indexes() -> dict[str, tuple[Index, ...]]:
    """Every index the product needs, by collection name (`_id` is always indexed): the
    table start-up creates them from and the test run checks every read against."""
    return {
        **log_indexes(CollectionNames()),
        PRESCRIPTIONS: PRESCRIPTION_INDEXES,
        **WEBHOOK_INDEXES,
    }


def make_client(settings: Settings) -> AsyncMongoClient[Doc]:
    return AsyncMongoClient(
        settings.mongodb_uri,
        serverSelectionTimeoutMS=settings.db_timeout_ms,
        connectTimeoutMS=settings.db_timeout_ms,
        socketTimeoutMS=settings.db_reply_timeout_ms,
        tz_aware=True,
        appname="rxledger",
    )


def make_store(settings: Settings, client: AsyncMongoClient[Doc]) -> LogStore:
    return LogStore(
        client[settings.database], settings.origin, notary_db=client[settings.notary_database]
    )


def make_log(settings: Settings, client: AsyncMongoClient[Doc]) -> TransparencyLog:
    signer, next_signer = settings.signer(), settings.next_signer()
    keys = settings.key_set(signer, next_signer)
    return TransparencyLog(
        make_store(settings, client), signer, settings.log, keys=keys, next_signer=next_signer
    )
