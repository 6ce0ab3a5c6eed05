"""`rxledger serve --workers 2`: one port, two gateway processes, one server.

Each test runs the real command as a subprocess against the test database. Which worker
answers is observable: /readyz names the answering worker's pid, and a keep-alive connection
stays with the worker that accepted it, so a client of one connection talks to one worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import MongoClient
from test_gateway import env_for, free_port
from test_subscriptions import DISPENSE, EVENTS, Gateway, sse_events
from websockets.exceptions import ConnectionClosed
from ws_client import GraphQLSocket

from app.auth import load_dev_secret
from app.limits import SharedRateLimiter
from app.workers import ServerState

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0
WORKERS = 2

PRESCRIPTION = """query($id: ID!) { prescription(id: $id) { id version status } }"""


# --- a server of two workers ------------------------------------------------------------------


@dataclass
class Server(Gateway):
    """A running `rxledger serve --workers 2`; `proc` is its parent (the supervisor)."""

    mongo_uri: str = ""
    db_name: str = ""

    def database(self) -> MongoClient[dict[str, Any]]:
        return MongoClient(self.mongo_uri, tz_aware=True, serverSelectionTimeoutMS=5000)


StartServer = Callable[..., Awaitable[Server]]


@pytest.fixture
def start_server(mongo_uri: str, db_name: str, tmp_path: Path) -> Iterator[StartServer]:
    """Starts `rxledger serve --workers 2` over this test's database; ready once /readyz says
    both workers are up and one of them sequences. Stopped (SIGTERM) at the end of the test.
    Rate limiting is off unless `env` sets RXLEDGER_RATE_LIMIT."""
    started: list[Server] = []

    async def start(**env: str) -> Server:
        environment = env_for(mongo_uri, db_name, tmp_path, **{"RXLEDGER_RATE_LIMIT": "0", **env})
        secret = load_dev_secret(Path(environment["RXLEDGER_VAR_DIR"]))
        log_path = tmp_path / f"server-{len(started)}.log"
        port = free_port()
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
                + ["--workers", str(WORKERS), "--log-level", "warning"],
                cwd=ROOT,
                env=environment,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        server = Server(f"http://127.0.0.1:{port}", proc, log_path, secret, mongo_uri, db_name)
        started.append(server)
        deadline = time.monotonic() + READY_TIMEOUT
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                with contextlib.suppress(httpx.TransportError, ValueError):
                    r = await client.get(f"{server.base}/readyz")
                    ready = r.json()
                    if r.status_code == 200 and ready["workers"] == WORKERS:
                        if ready["sequencerLeader"]:
                            return server
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"server did not start: {server.log_text()[-3000:]}")
                await asyncio.sleep(0.1)

    try:
        yield start
    finally:
        for server in started:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in started:
            try:
                server.proc.wait(30)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


@dataclass
class WorkerConnection:
    """A client of one keep-alive connection, and the worker at its other end."""

    client: httpx.AsyncClient
    pid: int


async def readyz(client: httpx.AsyncClient, base: str) -> dict[str, Any]:
    r = await client.get(f"{base}/readyz")
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


@contextlib.asynccontextmanager
async def one_connection_per_worker(base: str) -> AsyncIterator[list[WorkerConnection]]:
    """Opens connections (keeping each open, so the kernel hands the next to whichever worker
    accepts first) until one leads to each worker; yields those, one per worker, pid order."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(10, read=60)
    async with contextlib.AsyncExitStack() as stack:
        found: dict[int, WorkerConnection] = {}
        for _ in range(200):
            client = await stack.enter_async_context(
                httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)
            )
            pid = (await readyz(client, base))["worker"]["pid"]
            found.setdefault(pid, WorkerConnection(client, pid))
            if len(found) == WORKERS:
                break
        assert len(found) == WORKERS, f"200 new connections all reached workers {sorted(found)}"
        yield [found[pid] for pid in sorted(found)]


async def gql(
    conn: WorkerConnection, base: str, query: str, token: str | None = None, **variables: Any
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = await conn.client.post(
        f"{base}/graphql", json={"query": query, "variables": variables}, headers=headers
    )
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert "errors" not in out, out["errors"]
    data: dict[str, Any] = out["data"]
    return data


async def issue_through(conn: WorkerConnection, server: Server, pharmacy: str = "ph-1") -> str:
    """File a prescription through this connection's worker; its id."""
    prescriber = server.token("PRESCRIBER", "dr-sub", "cardiology")
    variables = {
        "input": {
            "patient": {"id": "pt-1", "name": "Patient pt-1"},
            "medications": [
                {"code": "N02BE01", "name": "paracetamol", "dose": "500 mg", "quantity": 20}
            ],
            "pharmacy": pharmacy,
        },
        "key": uuid.uuid4().hex,
    }
    mutation = """mutation($input: IssuePrescriptionInput!, $key: String) {
      issuePrescription(input: $input, idempotencyKey: $key) {
        __typename ... on Prescription { id } ... on Error { message } } }"""
    result = (await gql(conn, server.base, mutation, prescriber, **variables))["issuePrescription"]
    assert result["__typename"] == "Prescription", result
    return str(result["id"])


def sample(text: str, name: str, labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


# --- (a) both workers serve ---------------------------------------------------------------------


async def test_connections_reach_both_workers_and_metrics_count_all_of_them(start_server):
    server = await start_server()
    async with one_connection_per_worker(server.base) as (a, b):
        assert a.pid != b.pid and server.proc.pid not in (a.pid, b.pid)
        for conn in (a, b):
            ready = await readyz(conn.client, server.base)
            assert ready["worker"]["pid"] == conn.pid and ready["workers"] == WORKERS
        for _ in range(7):
            await gql(a, server.base, "{ ledger { size } }")
        # Scraped through the other worker: the requests worker `a` served are counted.
        text = (await b.client.get(f"{server.base}/metrics")).text
        served = sample(
            text, "rxledger_http_requests_total", 'method="POST",path="/graphql",status="200"'
        )
        assert served == 7, text
        assert sample(text, "rxledger_workers", "") == WORKERS
        assert sample(text, "rxledger_sequencer_leader", "") == 1


async def test_metrics_count_the_subscribers_of_every_worker(start_server):
    server = await start_server()
    partner = server.token("PARTNER", "partner-1", "ph-1")
    headers = {"Authorization": f"Bearer {partner}"}
    url = f"{server.base}/events?afterLeafIndex=-1"
    async with one_connection_per_worker(server.base) as (a, b):
        text = (await a.client.get(f"{server.base}/metrics")).text
        assert sample(text, "rxledger_subscribers", "") == 0, text
        async with (
            a.client.stream("GET", url, headers=headers) as on_a,
            b.client.stream("GET", url, headers=headers) as on_b,
            await GraphQLSocket.open(server.base, partner) as socket,
        ):
            assert on_a.status_code == on_b.status_code == 200
            await socket.subscribe("events", EVENTS, {"after": -1})
            # Scraped through a fresh connection (either worker): all three, wherever they are.
            deadline = time.monotonic() + 10
            while True:
                async with httpx.AsyncClient() as other:
                    text = (await other.get(f"{server.base}/metrics")).text
                if sample(text, "rxledger_subscribers", "") == 3 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert sample(text, "rxledger_subscribers", "") == 3, text
        deadline = time.monotonic() + 10
        while sample(text, "rxledger_subscribers", "") != 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            text = (await b.client.get(f"{server.base}/metrics")).text
        assert sample(text, "rxledger_subscribers", "") == 0, text


# --- (b) what one worker writes, the other serves -------------------------------------------------


async def test_a_mutation_through_one_worker_reaches_subscribers_and_reads_on_the_other(
    start_server,
):
    server = await start_server()
    partner = server.token("PARTNER", "partner-1", "ph-1")
    pharmacist = server.token("PHARMACIST", "pharmacist-1", "ph-1")
    admin = server.token("ADMIN", "adm-1")
    async with (
        one_connection_per_worker(server.base) as (a, b),
        await GraphQLSocket.open(server.base, partner) as socket,
    ):
        # A WebSocket subscriber on whichever worker accepted it: of the two writes below, one
        # goes through the other worker.
        await socket.subscribe("events", EVENTS, {"after": -1})
        headers = {"Authorization": f"Bearer {partner}"}
        # An event stream on worker b's connection, and a write on worker a's.
        async with b.client.stream(
            "GET", f"{server.base}/events?afterLeafIndex=-1", headers=headers
        ) as stream:
            assert stream.status_code == 200
            rid = await issue_through(a, server)
            (event,) = await sse_events(stream, 1)
        assert json.loads(event["data"])["prescriptionId"] == rid, event
        # Changed through worker b: read on both, each sees the new version at once.
        done = await gql(b, server.base, DISPENSE, pharmacist, id=rid, version=1)
        assert done["dispensePrescription"]["status"] == "DISPENSED", done
        for conn in (a, b):
            read = (await gql(conn, server.base, PRESCRIPTION, admin, id=rid))["prescription"]
            assert (read["version"], read["status"]) == (2, "DISPENSED"), (conn.pid, read)
        seen = []
        async with contextlib.aclosing(socket.events("events", 60)) as events:
            async for data in events:
                change = data["prescriptionEvents"]
                seen.append((change["prescriptionId"], change["version"], change["status"]))
                if len(seen) == 2:
                    break
        assert seen == [(rid, 1, "ISSUED"), (rid, 2, "DISPENSED")]


# --- (c) one sequencer ----------------------------------------------------------------------------


async def test_exactly_one_worker_sequences_and_every_event_is_sequenced_once(start_server):
    server = await start_server()
    async with one_connection_per_worker(server.base) as (a, b):
        views = [await readyz(conn.client, server.base) for conn in (a, b)]
        leaders = [v["worker"]["pid"] for v in views if v["worker"]["leads"]]
        assert len(leaders) == 1, views
        assert all(v["sequencerLeader"] for v in views), views
        ids = await asyncio.gather(
            *(issue_through(conn, server) for conn in (a, b) for _ in range(10))
        )
    assert len(set(ids)) == 20
    with server.database() as client:
        db = client[server.db_name]
        deadline = time.monotonic() + 60
        while (size := (db.leases.find_one({}) or {}).get("size", 0)) < 20:
            assert time.monotonic() < deadline, f"tree size {size}, want 20"
            time.sleep(0.1)
        events = sorted(str(e["_id"]) for e in db.ledger.find({}, {"_id": 1}))
        entries = list(db.entries.find({}, {"event": 1}))
        assert len(events) == 20 and size == 20
        assert sorted(e["_id"] for e in entries) == list(range(20))
        assert sorted(str(e["event"]) for e in entries) == events
        assert db.pending.count_documents({}) == 0
        leases = list(db.leases.find({}))
    assert len(leases) == 1 and leases[0]["holder"].startswith("seq-"), leases


# --- (d) one rate limit -----------------------------------------------------------------------------


async def test_a_clients_rate_limit_holds_across_workers_not_per_worker(start_server):
    # A burst of 10 and next to no refill: the server grants 10 requests in all, not 10 each.
    server = await start_server(RXLEDGER_RATE_LIMIT="0.001", RXLEDGER_RATE_BURST="10")
    async with one_connection_per_worker(server.base) as (a, b):
        statuses: dict[int, list[int]] = {a.pid: [], b.pid: []}
        for _ in range(15):
            for conn in (a, b):
                r = await conn.client.post(
                    f"{server.base}/graphql", json={"query": "{ ledger { size } }"}
                )
                statuses[conn.pid].append(r.status_code)
        granted = {pid: codes.count(200) for pid, codes in statuses.items()}
        refused = {pid: codes.count(429) for pid, codes in statuses.items()}
        assert sum(granted.values()) == 10, statuses
        assert granted == {a.pid: 5, b.pid: 5} and refused == {a.pid: 10, b.pid: 10}, statuses
        text = (await a.client.get(f"{server.base}/metrics")).text
        assert sample(text, "rxledger_rate_limited_total", "") == 20, text


# --- (e) stopping -----------------------------------------------------------------------------------


def _state_file(pid: int) -> Path:
    """The server state file a worker has mapped into its memory."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1]
        if "rxledger-serve-" in path and path.endswith("/state"):
            return Path(path)
    raise AssertionError(f"worker {pid} maps no server state file")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


SHUTDOWN_GRACE = 2.0
SHUTDOWN_BOUND = 15.0  # the grace, the lifespan's stop (releasing the lease) and the exits


async def test_sigterm_stops_every_worker_within_the_grace_with_streams_open(start_server):
    server = await start_server(RXLEDGER_SHUTDOWN_GRACE=str(SHUTDOWN_GRACE))
    partner = server.token("PARTNER", "partner-1", "ph-1")
    async with one_connection_per_worker(server.base) as (a, b):
        state = _state_file(a.pid)
        assert state.exists()
        headers = {"Authorization": f"Bearer {partner}"}
        # An open event stream on each worker (an HTTP response that never ends by itself) and
        # a WebSocket subscription.
        async with (
            a.client.stream("GET", f"{server.base}/events", headers=headers) as stream_a,
            b.client.stream("GET", f"{server.base}/events", headers=headers) as stream_b,
            await GraphQLSocket.open(server.base, partner) as socket,
        ):
            assert stream_a.status_code == stream_b.status_code == 200
            await socket.subscribe("events", EVENTS, {})
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            # Each stream ends with a resume hint, the socket with 1012 (service restart).
            ends = [(await sse_events(stream, 1))[0] for stream in (stream_a, stream_b)]
            with pytest.raises(ConnectionClosed) as closed:
                await socket.receive(SHUTDOWN_BOUND)
            code = await asyncio.to_thread(server.proc.wait, SHUTDOWN_BOUND)
            took = time.monotonic() - started
    for end in ends:
        assert end["event"] == "end" and json.loads(end["data"])["code"] == "UNAVAILABLE", end
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012, closed.value
    assert code == 0, server.log_text()[-3000:]
    assert took < SHUTDOWN_BOUND
    assert _gone(a.pid) and _gone(b.pid)
    assert not state.parent.exists(), "the shared state directory outlived the server"
    log = server.log_text()
    assert "Traceback" not in log, log[-3000:]
    with server.database() as client:
        (lease,) = list(client[server.db_name].leases.find({}))
    # The sequencing worker let its lease go on the way out: a successor need not wait for it.
    assert lease["expiresAt"].timestamp() <= time.time(), lease


# --- a worker that dies is replaced ---------------------------------------------------------------


async def test_a_killed_sequencing_worker_is_replaced_and_another_takes_over(start_server):
    server = await start_server(RXLEDGER_LEASE_TTL="1")
    async with httpx.AsyncClient(timeout=5) as client:
        before = await readyz(client, server.base)
        pids = await _worker_pids(server)
        leader = next(pid for pid, leads in pids.items() if leads)
        os.kill(leader, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            now = await _worker_pids(server)
            if len(now) == WORKERS and leader not in now and any(now.values()):
                break
            assert time.monotonic() < deadline, f"workers {now} after killing {leader}"
            await asyncio.sleep(0.2)
    async with one_connection_per_worker(server.base) as (a, _b):
        rid = await issue_through(a, server)
    with server.database() as mongo:
        db = mongo[server.db_name]
        deadline = time.monotonic() + 60
        while not db.entries.find_one({"_id": before["treeSize"]}):
            assert time.monotonic() < deadline, f"{rid} not sequenced after the takeover"
            time.sleep(0.1)


async def _worker_pids(server: Server) -> dict[int, bool]:
    """{pid: leads} of the live workers, from their own /readyz answers."""
    async with one_connection_per_worker(server.base) as conns:
        return {c.pid: (await readyz(c.client, server.base))["worker"]["leads"] for c in conns}


# --- the shared buckets --------------------------------------------------------------------------


def test_shared_buckets_are_one_budget_for_every_limiter_attached(tmp_path):
    state = ServerState.create(tmp_path / "state", worker_slots=4, buckets=64)
    other = ServerState.attach(tmp_path / "state")
    now = [100.0]
    first = SharedRateLimiter(state, 1.0, 3, clock=lambda: now[0])
    second = SharedRateLimiter(other, 1.0, 3, clock=lambda: now[0])
    assert [first.check("k"), second.check("k"), first.check("k")] == [None] * 3
    assert second.check("k") == pytest.approx(1.0)  # empty: one token a second
    assert first.check("other key") is None
    now[0] += 1.0
    assert second.check("k") is None and first.check("k") == pytest.approx(1.0)
    state.close()
    other.close()


def test_a_checkpoint_change_one_worker_counts_is_seen_by_every_worker(tmp_path):
    state = ServerState.create(tmp_path / "state", worker_slots=2, buckets=16)
    other = ServerState.attach(tmp_path / "state")
    before = other.value()
    state.bump()
    assert other.value() == before + 1 and state.value() == before + 1
    state.close()
    other.close()


def test_a_full_group_of_buckets_gives_the_least_recently_used_away(tmp_path):
    state = ServerState.create(tmp_path / "state", worker_slots=1, buckets=16)  # one group
    now = [0.0]
    limiter = SharedRateLimiter(state, 0.001, 1, clock=lambda: now[0])
    keys = [f"k{i}" for i in range(17)]
    for key in keys[:16]:
        now[0] += 1
        assert limiter.check(key) is None
    now[0] += 1
    assert limiter.check(keys[1]) is not None  # still remembered: its one token is spent
    assert limiter.check(keys[16]) is None  # takes k0's bucket, the least recently used
    assert limiter.check(keys[0]) is None  # forgotten: a fresh burst (bounded leniency)
    state.close()


HAMMER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from app.limits import SharedRateLimiter
    from app.workers import ServerState
    limiter = SharedRateLimiter(ServerState.attach(Path(sys.argv[1])), 1e-9, 30000)
    print("ready", flush=True)
    sys.stdin.readline()  # every process starts at once
    print(sum(limiter.check("one key") is None for _ in range(20000)), flush=True)
    """
)


def test_processes_hammering_one_bucket_at_once_share_its_burst_exactly(tmp_path):
    state = ServerState.create(tmp_path / "state", worker_slots=1, buckets=64)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HAMMER, str(state.path)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    granted = [int(proc.communicate(timeout=120)[0]) for proc in procs]
    # 60,000 attempts at a burst of 30,000: a lost update would grant more.
    assert sum(granted) == 30000, granted
    assert all(g > 0 for g in granted), granted
    state.close()


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--workers", "0"], {}, "--workers 0: want at least 1 worker process"),
        ([], {"RXLEDGER_WORKERS": "many"}, "RXLEDGER_WORKERS='many' is not an integer"),
        ([], {"RXLEDGER_WORKERS": "0"}, "RXLEDGER_WORKERS=0 must be an integer of at least 1"),
        ([], {"RXLEDGER_SHUTDOWN_GRACE": "-1"}, "RXLEDGER_SHUTDOWN_GRACE=-1 must be a number"),
    ],
)
def test_a_bad_worker_count_or_grace_exits_2_naming_it(tmp_path, args, env, message):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RXLEDGER_")}
    environment.update(RXLEDGER_MODE="development", RXLEDGER_VAR_DIR=str(tmp_path), **env)
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port()), *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"rxledger serve: {message}" in proc.stderr and "Traceback" not in proc.stderr


def test_the_default_worker_count_is_the_cores_this_process_may_use(monkeypatch):
    from app.cli import default_workers, serve_workers

    monkeypatch.delenv("RXLEDGER_WORKERS", raising=False)
    assert serve_workers(None) == default_workers() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("RXLEDGER_WORKERS", "3")
    assert serve_workers(None) == 3 and serve_workers(5) == 5


def test_the_rate_limiter_benchmark_runs_at_a_tiny_size():
    out = subprocess.run(
        [sys.executable, "bench/ratelimit.py", "--checks", "200", "--rounds", "1", "--keys", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for label in ("in-process", "shared", "contended", "load average"):
        assert label in out.stdout, out.stdout


# --- a supervisor that is killed takes its workers with it -------------------------------------------


async def test_workers_of_a_supervisor_killed_with_sigkill_exit_instead_of_serving_on(start_server):
    # SIGKILL (the OOM killer, a `kill -9`) gives the supervisor no chance to stop its workers;
    # orphans would keep the port, the lease and the log's tail, unsupervised.
    server = await start_server()
    pids = list(await _worker_pids(server))
    assert len(pids) == WORKERS
    server.proc.kill()
    server.proc.wait()
    deadline = time.monotonic() + SHUTDOWN_BOUND
    while not all(_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"workers {pids} outlived their supervisor"
        await asyncio.sleep(0.1)
