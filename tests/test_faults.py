"""Faults between the gateway and its database: Shopify's toxiproxy between a real gateway
(uvicorn) and the real FerretDB, under idempotent write load and reads.

Phases: latency (300 ± 150 ms), connections reset by the peer, a black hole (data dropped,
connections left open), the database unreachable for 8 s (the proxy disabled). Every answer
must be typed (data, a PrescriptionResult member, or an error with a code; never "Unexpected
error."), nothing acknowledged may be lost, no retry with the same idempotency key may file a
second prescription, and /readyz must recover without a restart.

toxiproxy is built once from the Go module proxy (`go install`, like tests/interop's client)
and kept as var/bin/toxiproxy-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import run_go
from pymongo import MongoClient
from test_gateway import ORIGIN, env_for, free_port, running_gateway
from test_prescriptions import wait_for

from anchoring.note import open_checkpoint, parse_verifier_key
from anchoring.verify import parse_inclusion_bundle, verify_bundle_inclusion
from app.auth import load_dev_secret, mint_token

ROOT = Path(__file__).resolve().parent.parent
TOXIPROXY = ROOT / "var" / "bin" / "toxiproxy-server"
TOXIPROXY_MODULE = "github.com/Shopify/toxiproxy/v2/cmd/server@v2.5.0"

ISSUE = """mutation($input: IssuePrescriptionInput!, $key: String!) {
  issuePrescription(input: $input, idempotencyKey: $key) {
    __typename
    ... on Prescription { id version }
    ... on Error { message }
  }
}"""

READ = """query($id: ID!) { prescription(id: $id) {
  id version patient { name } integrity { status detail proof { bundle } }
} }"""

# What may answer a mutation under faults: the result, or the typed retry-later member.
TYPED_MUTATION_ANSWERS = {"Prescription", "Unavailable"}
MARKER = "Vexmarkerina"  # in every patient name and medication: must never be in an output


# --- toxiproxy ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def toxiproxy_binary() -> Path:
    """var/bin/toxiproxy-server, built with `go install` the first time (through the Go module
    proxy, GOPROXY), reused afterwards."""
    if TOXIPROXY.exists():
        return TOXIPROXY
    gobin = TOXIPROXY.parent / f".toxiproxy-build-{os.getpid()}"
    run_go(["install", TOXIPROXY_MODULE], "toxiproxy", GOBIN=str(gobin), GOFLAGS="-buildvcs=false")
    (gobin / "server").replace(TOXIPROXY)
    shutil.rmtree(gobin, ignore_errors=True)
    return TOXIPROXY


@dataclass
class Toxiproxy:
    """One proxy, `db`, in a toxiproxy server, driven through its HTTP API."""

    api: httpx.Client
    listen: str

    def add(self, name: str, kind: str, stream: str = "downstream", **attributes: int) -> None:
        r = self.api.post(
            "/proxies/db/toxics",
            json={"name": name, "type": kind, "stream": stream, "attributes": attributes},
        )
        assert r.status_code == 200, r.text

    def remove(self, name: str) -> None:
        r = self.api.delete(f"/proxies/db/toxics/{name}")
        assert r.status_code == 204, r.text

    def enable(self, enabled: bool) -> None:
        r = self.api.post("/proxies/db", json={"enabled": enabled})
        assert r.status_code == 200, r.text


@pytest.fixture
def toxiproxy(toxiproxy_binary: Path, mongo_uri: str, tmp_path: Path) -> Iterator[Toxiproxy]:
    api_port, listen_port = free_port(), free_port()
    upstream = urlsplit(mongo_uri).netloc.rsplit("@", 1)[-1].split(",")[0]
    log_path = tmp_path / "toxiproxy.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [str(toxiproxy_binary), "-host", "127.0.0.1", "-port", str(api_port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=5)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(httpx.TransportError):
                if api.get("/version").status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"toxiproxy did not start: {log_path.read_text(errors='replace')}")
            time.sleep(0.05)
        listen = f"127.0.0.1:{listen_port}"
        r = api.post(
            "/proxies", json={"name": "db", "listen": listen, "upstream": upstream, "enabled": True}
        )
        assert r.status_code == 201, r.text
        yield Toxiproxy(api, listen)
    finally:
        api.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- the load ----------------------------------------------------------------------------------


@dataclass
class Load:
    """What the clients saw: every answer by kind, and each key's acknowledged prescription."""

    answers: Counter[str] = field(default_factory=Counter)
    untyped: list[str] = field(default_factory=list)
    acknowledged: dict[str, str] = field(default_factory=dict)  # idempotency key -> id
    keys: list[str] = field(default_factory=list)
    retries: int = 0
    errors: list[str] = field(default_factory=list)  # bodies of error answers, /readyz's too
    phase: str = "baseline"
    by_phase: Counter[str] = field(default_factory=Counter)

    def answer(self, kind: str) -> None:
        self.answers[kind] += 1
        self.by_phase[f"{self.phase}:{kind}"] += 1


def issue_input(n: int) -> dict[str, Any]:
    return {
        "patient": {"id": f"pt-fault-{n}", "name": f"{MARKER} Patient {n}"},
        "medications": [{"code": "N02BE01", "name": f"{MARKER}ol", "dose": "5 mg", "quantity": 1}],
        "pharmacy": "ph-fault",
    }


async def issue_until_acknowledged(
    http: httpx.AsyncClient, load: Load, key: str, n: int, until: float
) -> None:
    """issuePrescription with idempotency key `key`, retried on Unavailable and on transport
    errors (the answer lost on the way) until acknowledged or `until` (monotonic) passes."""
    while time.monotonic() < until:
        try:
            r = await http.post(
                "/graphql",
                json={"query": ISSUE, "variables": {"input": issue_input(n), "key": key}},
            )
        except httpx.TransportError as exc:
            load.answer(f"transport:{type(exc).__name__}")
            load.retries += 1
            await asyncio.sleep(0.2)
            continue
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        result = (body.get("data") or {}).get("issuePrescription")
        if (
            r.status_code != 200
            or result is None
            or result["__typename"] not in TYPED_MUTATION_ANSWERS
        ):
            load.untyped.append(f"{r.status_code} {r.text[:500]}")
            return
        load.answer(result["__typename"])
        if result["__typename"] == "Prescription":
            load.acknowledged[key] = result["id"]
            return
        load.errors.append(r.text)
        load.retries += 1
        await asyncio.sleep(0.2)


async def writer(http: httpx.AsyncClient, load: Load, name: str, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        key = f"{name}-{n}"
        load.keys.append(key)
        await issue_until_acknowledged(http, load, key, n, time.monotonic() + 60)
        n += 1


async def reader(http: httpx.AsyncClient, load: Load, stop: asyncio.Event) -> None:
    """Reads of acknowledged prescriptions: data, or errors that carry a code."""
    while not stop.is_set():
        ids = list(load.acknowledged.values())
        if not ids:
            await asyncio.sleep(0.1)
            continue
        try:
            r = await http.post("/graphql", json={"query": READ, "variables": {"id": ids[-1]}})
        except httpx.TransportError as exc:
            load.answer(f"read transport:{type(exc).__name__}")
            continue
        body = r.json() if r.status_code == 200 else {}
        errors = body.get("errors") or []
        codes = [(e.get("extensions") or {}).get("code") for e in errors]
        if r.status_code != 200 or None in codes or (not errors and not body.get("data")):
            load.untyped.append(f"read {r.status_code} {r.text[:500]}")
        for code in codes:
            load.answer(f"read:{code}")
        if errors:
            load.errors.append(r.text)
        else:
            load.answer("read:data")
        await asyncio.sleep(0.05)


async def health(http: httpx.AsyncClient, load: Load, stop: asyncio.Event) -> None:
    """/readyz and /metrics as a monitor sees them through the faults."""
    while not stop.is_set():
        for path in ("/readyz", "/metrics"):
            with contextlib.suppress(httpx.TransportError):
                load.errors.append((await http.get(path)).text)
        await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def under_load(base: str, token: str, load: Load) -> AsyncIterator[None]:
    """Three writers, a reader and a health monitor run while the body runs; they stop (each finishing its
    current key, bounded) when it ends."""
    stop = asyncio.Event()
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=20) as http:
        tasks = [asyncio.create_task(writer(http, load, f"w{i}", stop)) for i in range(3)]
        tasks.append(asyncio.create_task(reader(http, load, stop)))
        tasks.append(asyncio.create_task(health(http, load, stop)))
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 90)


def ready(base: str) -> dict[str, Any] | None:
    with contextlib.suppress(httpx.TransportError, ValueError):
        r = httpx.get(f"{base}/readyz", timeout=5)
        if r.status_code == 200:
            body: dict[str, Any] = r.json()
            return body
    return None


# --- the test ----------------------------------------------------------------------------------


async def test_faults_between_gateway_and_database_get_typed_answers_and_lose_nothing(
    toxiproxy: Toxiproxy, mongo_uri: str, db_name: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    proxied = f"mongodb://{toxiproxy.listen}/"
    env = env_for(
        proxied,
        db_name,
        tmp_path,
        RXLEDGER_RATE_LIMIT="0",
        RXLEDGER_DB_TIMEOUT_MS="1500",
        # A call in flight when the black hole starts waits this long for its reply, then fails:
        # the writers' retries after recovery must not meet a connection still waiting.
        RXLEDGER_DB_REPLY_TIMEOUT_MS="3000",
    )
    log_path = tmp_path / "gateway.log"
    load = Load()
    with running_gateway(env, log_path) as base:
        token = mint_token(
            secret=load_dev_secret(Path(env["RXLEDGER_VAR_DIR"])),
            role="PRESCRIBER",
            subject="dr-fault",
            organization="hosp-fault",
        )
        wait_for(lambda: (ready(base) or {}).get("sequencerLeader"), "the gateway leads", 15)
        async with under_load(base, token, load):
            await asyncio.sleep(2)  # a baseline
            load.phase = "latency"
            toxiproxy.add("slow", "latency", latency=300, jitter=150)
            await asyncio.sleep(5)
            toxiproxy.remove("slow")
            load.phase = "reset"
            toxiproxy.add("reset", "reset_peer", timeout=0)
            await asyncio.sleep(3)
            toxiproxy.remove("reset")
            load.phase = "black hole"
            toxiproxy.add("hole", "timeout", timeout=0)
            await asyncio.sleep(4)
            toxiproxy.remove("hole")
            load.phase = "down"
            toxiproxy.enable(False)
            await asyncio.sleep(8)
            toxiproxy.enable(True)
            load.phase = "recovery"
            await asyncio.sleep(2)
        # Every key the writers gave up on is retried until acknowledged.
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=20
        ) as http:
            for n, key in enumerate(load.keys):
                if key not in load.acknowledged:
                    await issue_until_acknowledged(http, load, key, n, time.monotonic() + 20)

        assert not load.untyped, f"untyped answers: {load.untyped[:5]}"
        assert load.answers["Unavailable"] > 0, f"the faults were never felt: {load.answers}"
        assert set(load.keys) == set(load.acknowledged), (
            f"keys never acknowledged after recovery; answers by phase: {dict(load.by_phase)}"
        )

        # /readyz recovers in the same process: database reachable, leading, queue drained.
        recovered = wait_for(
            lambda: (r := ready(base)) and r["sequencerLeader"] and r["queuedGroups"] == 0 and r,
            "/readyz ok with an empty queue",
            30,
        )
        assert recovered["database"] == "ok" and recovered["sequencerError"] is None

        # Nothing acknowledged is lost, and each is anchored with a verifying proof.
        admin = mint_token(
            secret=load_dev_secret(Path(env["RXLEDGER_VAR_DIR"])), role="ADMIN", subject="ad-1"
        )
        http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin}"}, timeout=20)
        verifier = parse_verifier_key(
            http.post("/graphql", json={"query": "{ ledger { verifierKey } }"}).json()["data"][
                "ledger"
            ]["verifierKey"]
        )

        def read(rid: str) -> dict[str, Any] | None:
            r = http.post("/graphql", json={"query": READ, "variables": {"id": rid}})
            found: dict[str, Any] | None = r.json()["data"]["prescription"]
            return found

        for rid in load.acknowledged.values():
            rx = wait_for(
                lambda rid=rid: (p := read(rid)) and p["integrity"]["status"] == "VERIFIED" and p,
                f"{rid} VERIFIED",
                20,
            )
            bundle = parse_inclusion_bundle(json.loads(rx["integrity"]["proof"]["bundle"]))
            cp = open_checkpoint(bundle.checkpoint, [verifier], ORIGIN)
            verify_bundle_inclusion(bundle, cp.size, cp.root_hash)
        http.close()

    # No retry filed a second prescription: one per key, in the documents and in the ledger.
    with MongoClient(mongo_uri) as direct:
        db = direct[db_name]
        filed = [d["_id"] for d in db.prescriptions.find({"prescriber": "dr-fault"}, {"_id": 1})]
        issued = [e["subject"] for e in db.ledger.find({"version": 1}, {"subject": 1})]
    assert sorted(filed) == sorted(set(load.acknowledged.values()))
    assert sorted(issued) == sorted(filed)
    assert len(set(load.acknowledged.values())) == len(load.keys)

    gateway_log = log_path.read_text(errors="replace")
    assert "Traceback" not in gateway_log, gateway_log[-3000:]
    for text in [gateway_log, *load.errors]:
        assert MARKER not in text, text[-3000:]
    print(
        f"faults: {len(load.keys)} keys, {load.retries} retries, answers {dict(load.by_phase)}, "
        f"{time.monotonic() - started:.1f} s"
    )
