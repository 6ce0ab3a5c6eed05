"""Shared fixtures: a real MongoDB-protocol server for the whole session, a fresh database
per test. With MONGODB_URI set, that server is used and nothing is started."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymongo import AsyncMongoClient

from anchoring.note import Signer
from anchoring.store import LogStore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import devdb  # noqa: E402


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    uri = os.environ.get("MONGODB_URI")
    if uri:
        yield uri
        return
    data_dir = tmp_path_factory.mktemp("ferretdb")
    server = devdb.start_ferretdb(data_dir, log_path=data_dir / "ferretdb.log")
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
async def client(mongo_uri: str) -> AsyncIterator[AsyncMongoClient[dict]]:
    c: AsyncMongoClient[dict] = AsyncMongoClient(
        mongo_uri, serverSelectionTimeoutMS=5000, tz_aware=True
    )
    yield c
    await c.close()


@pytest.fixture
async def db_name(client: AsyncMongoClient[dict]) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    await client.drop_database(name)


@pytest.fixture
def store(client: AsyncMongoClient[dict], db_name: str) -> LogStore:
    return LogStore(client[db_name], origin="test.rxledger.example/log")


@pytest.fixture(scope="session")
def signer() -> Signer:
    return Signer("test.rxledger.example", Ed25519PrivateKey.generate())
