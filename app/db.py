"""The database client and the log built from settings."""

from __future__ import annotations

from pymongo import AsyncMongoClient

from anchoring.log import TransparencyLog
from anchoring.store import Doc, LogStore
from app.settings import Settings


def make_client(settings: Settings) -> AsyncMongoClient[Doc]:
    return AsyncMongoClient(
        settings.mongodb_uri,
        serverSelectionTimeoutMS=settings.db_timeout_ms,
        connectTimeoutMS=settings.db_timeout_ms,
        tz_aware=True,
        appname="rxledger",
    )


def make_store(settings: Settings, client: AsyncMongoClient[Doc]) -> LogStore:
    return LogStore(
        client[settings.database], settings.origin, notary_db=client[settings.notary_database]
    )


def make_log(settings: Settings, client: AsyncMongoClient[Doc]) -> TransparencyLog:
    return TransparencyLog(make_store(settings, client), settings.signer(), settings.log)
