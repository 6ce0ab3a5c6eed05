"""The gateway over HTTP: a real uvicorn process, its sequencer and anchorer, GraphQL proofs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from anchoring.encoding import unb64
from anchoring.ledger import Ledger
from anchoring.note import open_checkpoint, parse_verifier_key
from anchoring.proofs import root_hash
from anchoring.store import LogStore
from anchoring.tiles import TileReader
from anchoring.verify import verify_consistency, verify_inclusion
from app.main import decode_json, encode_json
from app.settings import write_new_key

ROOT = Path(__file__).resolve().parent.parent
ORIGIN = "gw.rxledger.test/log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(mongo_uri: str, db_name: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RXLEDGER_")}
    env.update(
        MONGODB_URI=mongo_uri,
        RXLEDGER_DB=db_name,
        RXLEDGER_ORIGIN=ORIGIN,
        RXLEDGER_VAR_DIR=str(tmp_path / "var"),
        RXLEDGER_CHECKPOINT_INTERVAL="0.1",
        RXLEDGER_LEASE_TTL="2",
        # No rate limit unless the test sets one: tests sharing a gateway would share its
        # buckets (and its rxledger_rate_limited_total), and a test polling it could drain them.
        RXLEDGER_RATE_LIMIT="0",
        # One process per gateway: the suite starts many on two cores. test_workers.py runs
        # `serve --workers 2` (the default there) and checks what differs with several.
        RXLEDGER_WORKERS="1",
    )
    env.update(extra)
    return env


def serve(environment: dict[str, str], log_path: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Start `rxledger serve` on a free port with this environment, its output in `log_path`;
    the base URL and the process (not ready yet)."""
    port = free_port()
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return f"http://127.0.0.1:{port}", proc


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Wait until the gateway at `base` answers /healthz; fail with its log if it exits or
    takes more than 30 s."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"gateway did not start: {log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


@contextmanager
def running_gateway(environment: dict[str, str], log_path: Path) -> Iterator[str]:
    """A gateway process, ready; its base URL. Stopped on exit."""
    base, proc = serve(environment, log_path)
    try:
        wait_healthy(base, proc, log_path)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def gateway(mongo_uri: str, db_name: str, tmp_path: Path) -> Iterator[str]:
    with running_gateway(env_for(mongo_uri, db_name, tmp_path), tmp_path / "gateway.log") as base:
        yield base


def gql(base: str, query: str, **variables: object) -> dict:
    r = httpx.post(f"{base}/graphql", json={"query": query, "variables": variables}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


LEDGER = "{ ledger { origin verifierKey size checkpoint { origin size rootHash note } } }"


def wait_for_checkpoint(base: str, size: int) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ledger = gql(base, LEDGER)["data"]["ledger"]
        if ledger["checkpoint"] and ledger["checkpoint"]["size"] >= size:
            return ledger
        time.sleep(0.1)
    pytest.fail(f"no checkpoint of size {size} within 20 s")


async def test_events_appended_elsewhere_are_sequenced_anchored_and_proven_over_graphql(
    gateway, store
):
    store = LogStore(store.db, ORIGIN)
    ledger_writer = Ledger(store)
    appended = [
        await ledger_writer.append("rx-gw", v, {"subject": "rx-gw", "version": v, "type": "T"})
        for v in range(1, 21)
    ]
    await ledger_writer.close()
    first = wait_for_checkpoint(gateway, 20)
    verifier = parse_verifier_key(first["verifierKey"])
    cp = open_checkpoint(first["checkpoint"]["note"], [verifier], ORIGIN)
    assert cp.size == first["checkpoint"]["size"] and first["origin"] == ORIGIN

    query = """query($i: Int!) { ledger { inclusionProof(leafIndex: $i) {
        leafIndex treeSize leafHash path checkpoint { note } } } }"""
    leaf_hashes = {a.leaf_hash for a in appended}
    for i in range(cp.size):
        proof = gql(gateway, query, i=i)["data"]["ledger"]["inclusionProof"]
        assert proof["treeSize"] == cp.size
        leaf_hash = unb64(proof["leafHash"])
        assert leaf_hash in leaf_hashes
        verify_inclusion(i, cp.size, leaf_hash, [unb64(h) for h in proof["path"]], cp.root_hash)

    consistency = (
        """query($f: Int!) { ledger { consistencyProof(fromSize: $f) { fromSize toSize path } } }"""
    )
    proof = gql(gateway, consistency, f=7)["data"]["ledger"]["consistencyProof"]
    assert proof["toSize"] == cp.size
    # The old root is the tree's own root of size 7, read from the stored tiles.
    old_root = await root_hash(TileReader(store), 7, cp.size)
    verify_consistency(7, cp.size, old_root, cp.root_hash, [unb64(h) for h in proof["path"]])


def test_health_and_readiness_report_the_sequencer(gateway):
    assert httpx.get(f"{gateway}/healthz").json() == {"status": "ok"}
    deadline = time.monotonic() + 10
    while True:
        ready = httpx.get(f"{gateway}/readyz").json()
        if ready["sequencerLeader"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (
        ready["status"] == "ok" and ready["database"] == "ok" and ready["sequencerLeader"] is True
    )
    assert ready["queuedGroups"] == 0 and ready["sequencerLagSeconds"] == 0.0


def test_bad_requests_get_clear_errors_not_tracebacks(gateway):
    wait_for_checkpoint(gateway, 0)
    out = gql(gateway, "{ ledger { inclusionProof(leafIndex: 5) { leafIndex } } }")
    assert "not in the checkpoint" in out["errors"][0]["message"]
    out = gql(gateway, "{ ledger { inclusionProof(treeSize: 3, leafIndex: 0) { leafIndex } } }")
    assert "no published checkpoint of tree size 3" in out["errors"][0]["message"]
    out = gql(gateway, '{ ledger { inclusionProof(leafIndex: "x") { leafIndex } } }')
    assert "Int cannot represent" in out["errors"][0]["message"]
    r = httpx.post(f"{gateway}/graphql", json={"query": "{ ledger { "}, timeout=10)
    assert "Syntax Error" in r.json()["errors"][0]["message"]
    for body in (r.text, out["errors"][0]["message"]):
        assert "Traceback" not in body


def test_production_mode_refuses_to_start_without_a_signing_key(mongo_uri, db_name, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())],
        cwd=ROOT,
        env=env_for(mongo_uri, db_name, tmp_path, RXLEDGER_MODE="production"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "production mode needs RXLEDGER_SIGNING_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_production_mode_refuses_to_start_without_token_issuer_and_audience(
    mongo_uri, db_name, tmp_path
):
    write_new_key(tmp_path / "log.pem")
    issuer = tmp_path / "issuer.pem"
    issuer.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    production = env_for(
        mongo_uri,
        db_name,
        tmp_path,
        RXLEDGER_MODE="production",
        RXLEDGER_SIGNING_KEY=str(tmp_path / "log.pem"),
        RXLEDGER_JWT_PUBLIC_KEYS=str(issuer),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())],
        cwd=ROOT,
        env=production,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "production mode needs RXLEDGER_JWT_ISSUER and RXLEDGER_JWT_AUDIENCE" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unset_mode_warns_loudly_that_it_is_development_mode(gateway, tmp_path):
    # `gateway` runs `rxledger serve` with no RXLEDGER_MODE (env_for drops every RXLEDGER_*).
    output = (tmp_path / "gateway.log").read_text(errors="replace")
    warning = [line for line in output.splitlines() if "RXLEDGER_MODE is not set" in line]
    assert len(warning) == 1, output[-2000:]
    assert "WARNING" in warning[0] and "DEVELOPMENT mode" in warning[0]


def test_an_explicit_development_mode_does_not_warn(mongo_uri, db_name, tmp_path):
    log_path = tmp_path / "gateway.log"
    environment = env_for(mongo_uri, db_name, tmp_path, RXLEDGER_MODE="development")
    with running_gateway(environment, log_path):
        output = log_path.read_text(errors="replace")
    # Start-up has logged (after the mode was decided), without the warning.
    assert "rxledger development mode" in output, output[-2000:]
    assert "RXLEDGER_MODE is not set" not in output, output[-2000:]


def test_development_mode_creates_a_key_under_var_with_a_warning(mongo_uri, db_name, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "verifier-key"],
        cwd=ROOT,
        env=env_for(mongo_uri, db_name, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    key = tmp_path / "var" / "keys" / "dev-log.pem"
    assert key.exists() and (key.stat().st_mode & 0o777) == 0o600
    assert "created a new log signing key" in proc.stderr
    assert parse_verifier_key(proc.stdout.strip()).name == "gw.rxledger.test"


def test_the_docker_image_and_compose_file_run_in_production_mode_with_issuer_and_audience():
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    assert "ENV RXLEDGER_MODE=production" in dockerfile
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gateways = [s for name, s in compose["services"].items() if name.startswith("gateway")]
    assert len(gateways) == 2
    for gateway in gateways:
        environment = gateway["environment"]
        assert environment["RXLEDGER_MODE"] == "production"
        # Compose refuses to start the service when either is unset (${VAR:?message}).
        for name in ("RXLEDGER_JWT_ISSUER", "RXLEDGER_JWT_AUDIENCE"):
            assert environment[name].startswith(f"${{{name}:?"), environment[name]


# --- JSON ------------------------------------------------------------------------------------

READ_AS_JSON_READS = [
    '{"query":"{ ledger { size } }","variables":{"n":5,"id":"rx-1"}}',
    '{"n":123456789012345678901234567890,"m":-9223372036854775809,"k":18446744073709551616}',
    '{"id":"1234567890123456789012345"}',
    '{"x":1.5,"y":-0.0,"z":1e-7,"w":"Müller 漢字 \\u00e9"}',
    '{"a":1,"a":2}',
    "[NaN, Infinity, -Infinity]",
    '{"s":"\\ud800"}',
]


@pytest.mark.parametrize("text", READ_AS_JSON_READS)
def test_request_json_means_what_the_standard_library_reads(text: str) -> None:
    for data in (text, text.encode(), text.encode("utf-16")):
        decoded, expected = decode_json(data), json.loads(data)
        assert repr(decoded) == repr(expected)  # types too: 10**29 stays an int
        assert [type(v) for v in _leaves(decoded)] == [type(v) for v in _leaves(expected)]


def _leaves(value: object) -> list[object]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


@pytest.mark.parametrize("text", ['{"query": ', "{'query': 1}", "", "[1,]"])
def test_malformed_request_json_raises_the_standard_librarys_error(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        decode_json(text)


def test_answers_are_compact_utf8_json_with_the_same_values() -> None:
    answer = {"data": {"name": "Müller", "n": 2**40, "list": [None, True], "nested": {}}}

    encoded = encode_json(answer)

    assert encoded == json.dumps(answer, separators=(",", ":"), ensure_ascii=False).encode()
    assert json.loads(encoded) == answer
    # What orjson cannot encode still is, as json encodes it.
    assert json.loads(encode_json({"big": 10**30, 1: "x"})) == {"big": 10**30, "1": "x"}
