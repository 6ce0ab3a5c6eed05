"""Shared fixtures: a real MongoDB-protocol server for the whole session, a fresh database
per test. With MONGODB_URI set, that server is used and nothing is started.

MongoDB's `notablescan`, emulated for the whole run: every find, update, delete,
findAndModify, count, distinct and aggregate the product sends (in this process and in every
gateway or CLI the tests start) is checked against the indexes the product declares
(`app.db.declared_indexes`, the table start-up creates them from), by MongoDB's rules
(equality prefix, then sort, then range; tests/index_rules.py). The run fails at its end,
listing each read no index serves: its shape (collection, filter fields with operators, sort),
the product line that sent it and the test. A full read the product intends is declared,
with its reason, in `app.db.FULL_READS`. Commands the tests send themselves (seeding,
tampering, inspecting) are not checked: the innermost frame of this repository on the
sending stack says whose command it is (tests/notablescan.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymongo import AsyncMongoClient, MongoClient

from anchoring.note import Signer
from anchoring.store import LogStore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
NOTABLESCAN_DIR = pytest.StashKey[Path]()
NOTABLESCAN_FOUND = pytest.StashKey[list["notablescan.Violation"]]()

import devdb  # noqa: E402
import notablescan  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    report_dir = Path(tempfile.mkdtemp(prefix="notablescan-"))
    config.stash[NOTABLESCAN_DIR] = report_dir
    os.environ[notablescan.REPORT_DIR_ENV] = str(report_dir)
    site = str(ROOT / "tests" / "notablescan_site")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [site, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    notablescan.install()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    os.environ[notablescan.TEST_ENV] = item.nodeid


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    report_dir = session.config.stash.get(NOTABLESCAN_DIR, None)
    if report_dir is None:
        return
    found = notablescan.collected(report_dir)
    shutil.rmtree(report_dir, ignore_errors=True)
    session.config.stash[NOTABLESCAN_FOUND] = found
    if found and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    found = config.stash.get(NOTABLESCAN_FOUND, [])
    if found:
        terminalreporter.section("notablescan", red=True)
        terminalreporter.line(notablescan.report(found))


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


@dataclass
class Databases:
    """Throw-away databases for the gateways of this module, dropped at its end."""

    client: MongoClient[dict[str, Any]]
    created: list[str] = field(default_factory=list)

    def new(self) -> str:
        name = f"t_rx_{uuid.uuid4().hex[:12]}"
        self.created.append(name)
        return name


@pytest.fixture(scope="module")
def databases(mongo_uri: str) -> Iterator[Databases]:
    client: MongoClient[dict[str, Any]] = MongoClient(
        mongo_uri, tz_aware=True, serverSelectionTimeoutMS=5000
    )
    dbs = Databases(client)
    yield dbs
    for name in dbs.created:
        client.drop_database(name)
    client.close()


@pytest.fixture(scope="module")
def mongo(databases: Databases) -> MongoClient[dict[str, Any]]:
    """A plain client, for reading and editing what the gateways stored."""
    return databases.client


def run_go(args: list[str], what: str, cwd: Path | None = None, **env: str) -> None:
    """Run the Go toolchain (`go build` or `go install`, modules through the Go module proxy);
    fails the test saying what to do when Go is missing, hangs or fails."""
    go = shutil.which("go")
    if go is None:
        pytest.fail(
            f"the Go toolchain is not on PATH: this test runs `go {args[0]}` for {what} "
            "(Go >= 1.26, https://go.dev/dl/; `make help` lists what the tests need)"
        )
    try:
        built = subprocess.run(
            [go, *args],
            cwd=cwd,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`go {args[0]}` of {what} took over 10 minutes (is the Go proxy reachable?)")
    if built.returncode != 0:
        pytest.fail(f"`go {' '.join(args)}` ({what}) failed:\n{built.stderr[-3000:]}")
