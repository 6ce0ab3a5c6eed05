"""`rxledger mirror`: the log copied as C2SP tlog-tiles files into a directory, served by a
plain static web server and read there by the same clients that read the gateway (`rxledger
audit --from-tiles`, Go's sumdb/tlog). A mirror resumes without rewriting a file, follows the
log, and refuses a tampered source or a forked checkpoint, leaving itself as it was.

One gateway serves the module's log: 300 entries when the first mirror is taken (tiles 0/000,
0/001.p/44, 1/000.p/1), then 600 (0/000 0/001 0/002.p/88 1/000.p/2). Sources that must lie
(tampered, forked, stalling) are directories served by a thread of this process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import run_go
from pymongo import MongoClient
from pymongo.database import Database
from test_gateway import ORIGIN, env_for, free_port, running_gateway
from test_interop import (
    INTEROP,
    KEY_NAME,
    append,
    interop,
    passes,
    tampered,
    wait_for_checkpoint,
)

from anchoring.encoding import canonical_json
from anchoring.hashing import leaf_hash
from anchoring.note import Checkpoint, Signer, load_private_key, open_checkpoint, parse_verifier_key
from anchoring.tiles import ENTRIES, entry_bundle, parse_entry_bundle, tile_path
from anchoring.treemath import TILE_HEIGHT, TILE_WIDTH, CompactRange, Node

ROOT = Path(__file__).resolve().parent.parent
LOCK = ".mirror.lock"


def rxledger(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def mirror(to: Path, source: str, vkey: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return rxledger("mirror", "--to", str(to), "--from", source, "--key", vkey, *extra)


def ok(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr}"
    return run.stdout


def refused(run: subprocess.CompletedProcess[str], reason: str) -> str:
    assert run.returncode == 1, f"exit {run.returncode}: {run.stdout} {run.stderr}"
    assert "REFUSED: " in run.stderr and reason in run.stderr, run.stderr
    assert "is left as it was" in run.stderr
    return run.stderr


Files = dict[str, tuple[int, int, bytes]]


def snapshot(root: Path) -> Files:
    """Every file of a mirror (its lock aside): (inode, mtime in ns, bytes) by path."""
    found: Files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != LOCK:
            st = path.stat()
            found[str(path.relative_to(root))] = (st.st_ino, st.st_mtime_ns, path.read_bytes())
    return found


def contents(root: Path) -> dict[str, bytes]:
    return {path: data for path, (_, _, data) in snapshot(root).items()}


def copy_mirror(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def size_of(root: Path) -> int:
    return int((root / "checkpoint").read_text().split("\n")[1])


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/interop, the Go sumdb/tlog client (built from the module cache after the first)."""
    binary = tmp_path_factory.mktemp("mirror-interop-bin") / "interop"
    run_go(
        ["build", "-o", str(binary), "."],
        "tests/interop",
        cwd=INTEROP,
        GOFLAGS="-mod=readonly -buildvcs=false",
    )
    return binary


# --- the module's log, its gateway, and mirrors of it ------------------------------------------


@dataclass
class Log:
    base: str
    env: dict[str, str]
    db: Database[dict]
    tmp: Path
    vkey: str
    note300: Path  # the checkpoint of 300 entries, saved
    at300: Path  # a mirror taken at 300 entries
    full: Path  # a mirror of all 600


@pytest.fixture(scope="module")
def log(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Log]:
    tmp = tmp_path_factory.mktemp("mirror")
    db_name = f"t_mirror_{uuid.uuid4().hex[:12]}"
    env = env_for(mongo_uri, db_name, tmp)
    client: MongoClient[dict] = MongoClient(mongo_uri)
    try:
        with running_gateway(env, tmp / "gateway.log") as base:
            vkey = httpx.post(
                f"{base}/graphql", json={"query": "{ ledger { verifierKey } }"}, timeout=10
            ).json()["data"]["ledger"]["verifierKey"]
            append(mongo_uri, db_name, [f"rx-mirror-{i:04d}" for i in range(300)])
            note300 = tmp / "checkpoint-300"
            note300.write_text(wait_for_checkpoint(base, 300))
            at300 = tmp / "at300" / "log"
            ok(mirror(at300, f"{base}/log", vkey))
            assert size_of(at300) == 300
            append(mongo_uri, db_name, [f"rx-mirror-{i:04d}" for i in range(300, 600)])
            wait_for_checkpoint(base, 600)
            full = tmp / "full" / "log"
            ok(mirror(full, f"{base}/log", vkey))
            assert size_of(full) == 600
            yield Log(base, env, client[db_name], tmp, vkey, note300, at300, full)
    finally:
        client.drop_database(db_name)
        client.close()


@contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """`python -m http.server` serving `directory` in a subprocess; its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(base, timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, "http.server exited"
                assert time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Stall:
    """A path whose request the source holds until `release` is set."""

    path: str
    requested: threading.Event
    release: threading.Event


@contextmanager
def source_server(directory: Path, stall: Stall | None = None, port: int = 0) -> Iterator[str]:
    """A static server of `directory` in a thread of this process, which may stall one path."""

    class Handler(_Quiet):
        def do_GET(self) -> None:
            if stall is not None and self.path == stall.path:
                stall.requested.set()
                stall.release.wait(60)
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", port), partial(Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        if stall is not None:
            stall.release.set()
        server.shutdown()
        server.server_close()


def expected_files(size: int) -> set[str]:
    """The paths of a tree of `size` as tlog-tiles, and its checkpoint."""
    paths = {"checkpoint"}
    level = 0
    while size >> (TILE_HEIGHT * level):
        count = size >> (TILE_HEIGHT * level)
        for index in range((count + TILE_WIDTH - 1) // TILE_WIDTH):
            paths.add(tile_path(level, index, min(TILE_WIDTH, count - index * TILE_WIDTH)))
        level += 1
    for index in range((size + TILE_WIDTH - 1) // TILE_WIDTH):
        paths.add(tile_path(ENTRIES, index, min(TILE_WIDTH, size - index * TILE_WIDTH)))
    return paths


# --- a mirror holds what the gateway serves, and is read as the gateway is --------------------


def test_a_mirror_holds_exactly_the_paths_and_bytes_the_gateway_serves(log):
    files = contents(log.full)
    assert set(files) == expected_files(600)
    for path, data in files.items():
        r = httpx.get(f"{log.base}/log/{path}", headers={"Accept-Encoding": "identity"})
        assert r.status_code == 200, path
        assert r.content == data, path


def test_a_mirror_of_the_database_equals_the_mirror_of_the_gateway(log):
    # No --from: the database named by MONGODB_URI and RXLEDGER_DB; no --key: the configured
    # signing key's verifier key.
    to = log.tmp / "from-db" / "log"
    out = ok(rxledger("mirror", "--to", str(to), env=log.env))
    assert "at size 600" in out
    assert contents(to) == contents(log.full)


def test_audit_and_the_go_client_read_the_served_mirror_as_they_read_the_gateway(go_client, log):
    from_gateway = passes(
        interop(go_client, log.base, log.vkey, "-old", str(log.note300), "-samples", "1000")
    )
    with http_server(log.full.parent) as base:
        from_mirror = passes(
            interop(go_client, base, log.vkey, "-old", str(log.note300), "-samples", "1000")
        )
        audit = rxledger("audit", "--from-tiles", f"{base}/log", "--key", log.vkey, "--quiet")
    assert from_mirror == from_gateway
    assert from_mirror["size"] == 600 and from_mirror["checked"] == 600
    assert from_mirror["consistentWith"] == 300
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert audit.stdout.startswith("OK: 600 entries"), audit.stdout


# --- resuming: new files only ------------------------------------------------------------------


def test_a_mirror_grows_from_its_checkpoint_without_rewriting_a_file(go_client, log):
    to = copy_mirror(log.at300, log.tmp / "grow" / "log")
    before = snapshot(to)
    run = mirror(to, f"{log.base}/log", log.vkey)
    assert "at size 600 (was 300)" in ok(run)
    assert "mirror: 5/5 files (100%)" in run.stderr, "progress is shown on stderr"
    after = snapshot(to)
    for path, seen in before.items():
        if path != "checkpoint":
            assert after[path] == seen, f"{path} was rewritten"
    # The tiles of 300 stay; those of 600 are added; a static server now serves both sizes.
    assert set(after) == expected_files(600) | expected_files(300)
    with http_server(to.parent) as base:
        summary = passes(interop(go_client, base, log.vkey, "-old", str(log.note300)))
    assert summary["size"] == 600 and summary["consistentWith"] == 300


def test_an_interrupted_copy_resumes_without_rewriting_finished_files(log):
    to = log.tmp / "interrupted" / "log"
    stall = Stall("/tile/entries/001", threading.Event(), threading.Event())
    with source_server(log.full, stall) as source:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "mirror", "--to", str(to), "--from", source]
            + ["--key", log.vkey],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert stall.requested.wait(60), "the mirror never asked for tile/entries/001"
            deadline = time.monotonic() + 30
            while not all((to / p).exists() for p in ("tile/entries/000", "tile/entries/002.p/88")):
                assert time.monotonic() < deadline, "the other entry bundles were never written"
                time.sleep(0.05)
        finally:
            proc.kill()  # mid-copy, as a crash would
            proc.communicate(timeout=10)
        stall.release.set()
        interrupted = snapshot(to)
        assert "checkpoint" not in interrupted, "the checkpoint must be written last"
        assert "tile/0/000" in interrupted and "tile/entries/000" in interrupted
        assert "tile/entries/001" not in interrupted
        assert not [p for p in interrupted if ".tmp" in p], interrupted.keys()

        out = ok(mirror(to, source, log.vkey))
    assert f"{len(interrupted)} kept from an interrupted copy" in out
    resumed = snapshot(to)
    for path, seen in interrupted.items():
        assert resumed[path] == seen, f"{path} was rewritten"
    assert contents(to) == contents(log.full)


def test_following_picks_up_new_entries_and_stops_on_sigterm(mongo_uri, tmp_path):
    db_name = f"t_mirror_follow_{uuid.uuid4().hex[:12]}"
    env = env_for(mongo_uri, db_name, tmp_path)
    to = tmp_path / "follow" / "log"
    client: MongoClient[dict] = MongoClient(mongo_uri)
    try:
        with running_gateway(env, tmp_path / "gateway.log") as base:
            vkey = httpx.post(
                f"{base}/graphql", json={"query": "{ ledger { verifierKey } }"}, timeout=10
            ).json()["data"]["ledger"]["verifierKey"]
            append(mongo_uri, db_name, [f"rx-follow-{i}" for i in range(5)])
            wait_for_checkpoint(base, 5)
            proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "mirror", "--to", str(to), "--from"]
                + [f"{base}/log", "--key", vkey, "--follow", "--interval", "0.2"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                wait_for_size(to, 5)
                append(mongo_uri, db_name, [f"rx-follow-{i}" for i in range(5, 300)])
                wait_for_size(to, 300)
            finally:
                proc.send_signal(signal.SIGTERM)
                out, err = proc.communicate(timeout=20)
            assert proc.returncode == 0, err
            assert "stopped" in err
            assert "at size 300" in out
        cp = open_checkpoint((to / "checkpoint").read_text(), [parse_verifier_key(vkey)], ORIGIN)
        assert cp.size == 300
        assert set(contents(to)) >= expected_files(300)
    finally:
        client.drop_database(db_name)
        client.close()


def wait_for_size(root: Path, size: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ((root / "checkpoint").exists() and size_of(root) >= size):
        assert time.monotonic() < deadline, f"the mirror did not reach size {size}"
        time.sleep(0.1)


# --- refusals: the mirror left as it was ------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "path", "at", "reason"),
    [
        ("at300", "tile/0/001", 5 * 32, "tile/0/001 does not hash to tile/1/000.p/2[1]"),
        ("empty", "tile/0/000", 5 * 32, "tile/0/000 does not hash to tile/1/000.p/2[0]"),
        ("at300", "tile/0/002.p/88", 87 * 32 + 31, "fold to root"),
        ("at300", "tile/1/000.p/2", 3, "fold to root"),
        ("at300", "tile/entries/001", 10, "entry 256 does not hash to tile/0/001[0]"),
    ],
)
def test_a_tampered_tile_in_the_source_is_refused(log, held, path, at, reason):
    # (A mirror at 300 does not read tile/0/000 again: it holds it, checked when copied.)
    source_dir = copy_mirror(log.full, log.tmp / f"tampered-{uuid.uuid4().hex[:8]}")
    data = bytearray((source_dir / path).read_bytes())
    data[at] ^= 0x01
    (source_dir / path).write_bytes(bytes(data))
    to = log.tmp / f"victim-{uuid.uuid4().hex[:8]}"
    if held == "at300":
        copy_mirror(log.at300, to)
    before = snapshot(to)
    with source_server(source_dir) as source:
        err = refused(mirror(to, source, log.vkey), reason)
    assert "TAMPERED" in err
    assert_left_as_it_was(to, before, log.full)
    assert path not in snapshot(to)


def test_a_tampered_entry_in_the_database_is_refused(log):
    to = copy_mirror(log.at300, log.tmp / "victim-db" / "log")
    before = snapshot(to)
    with tampered(log.db.entries, 300, "leaf", 10):
        err = refused(rxledger("mirror", "--to", str(to), env=log.env), "entry 300 does not hash")
    assert "TAMPERED" in err
    assert_left_as_it_was(to, before, log.full)


def assert_left_as_it_was(root: Path, before: Files, genuine: Path) -> None:
    """Every file the mirror had is untouched (its checkpoint too); whatever was added is the
    genuine log's own bytes, checked against its signed root."""
    after = snapshot(root)
    for path, seen in before.items():
        assert after[path] == seen, f"{path} changed"
    real = contents(genuine)
    for path in set(after) - set(before):
        assert after[path][2] == real[path], f"{path} was written with bytes the log never had"


def fork_log(root: Path, leaves: list[bytes], key_pem: Path) -> Path:
    """A log of `leaves` as tlog-tiles files, its checkpoint signed with the log's own key
    under its own origin: another history, as a log that forked would show it."""
    rows: dict[int, list[bytes]] = {}

    def on_node(node: Node, digest: bytes) -> None:
        if node.level % TILE_HEIGHT == 0:
            rows.setdefault(node.level // TILE_HEIGHT, []).append(digest)

    tree = CompactRange()
    for leaf in leaves:
        tree.append(leaf_hash(leaf), on_node)
    for level, row in rows.items():
        for start in range(0, len(row), TILE_WIDTH):
            hashes = row[start : start + TILE_WIDTH]
            path = root / tile_path(level, start // TILE_WIDTH, len(hashes))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"".join(hashes))
    for start in range(0, len(leaves), TILE_WIDTH):
        chunk = leaves[start : start + TILE_WIDTH]
        path = root / tile_path(ENTRIES, start // TILE_WIDTH, len(chunk))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(entry_bundle(chunk))
    signer = Signer(KEY_NAME, load_private_key(key_pem.read_bytes()))
    note = signer.sign_note(Checkpoint(ORIGIN, len(leaves), tree.root()).text())
    # Replaced whole, as a log publishes it: a mirror following this one may read it any time.
    (root / ".checkpoint.new").write_text(note)
    os.replace(root / ".checkpoint.new", root / "checkpoint")
    return root


@pytest.mark.parametrize(
    ("held", "fork_size"),
    [("at300", 356), ("at300", 300), ("full", 356), ("full", 600)],
    ids=["fork-larger", "fork-same-size", "fork-smaller", "fork-same-size-600"],
)
def test_a_forked_checkpoint_is_refused_and_the_mirror_left_as_it_was(log, held, fork_size):
    # The fork shares the log's first 256 entries, then differs.
    shared = parse_entry_bundle((log.full / "tile/entries/000").read_bytes())
    other = [
        canonical_json({"v": 1, "subject": f"rx-fork-{i}", "version": 1, "type": "ISSUED"})
        for i in range(fork_size - len(shared))
    ]
    source_dir = fork_log(
        log.tmp / f"fork-{uuid.uuid4().hex[:8]}",
        shared + other,
        Path(log.env["RXLEDGER_VAR_DIR"]) / "keys" / "dev-log.pem",
    )
    assert open_checkpoint(
        (source_dir / "checkpoint").read_text(), [parse_verifier_key(log.vkey)], ORIGIN
    ), "the fork must verify with the log's key"
    to = copy_mirror(getattr(log, held), log.tmp / f"forked-{uuid.uuid4().hex[:8]}")
    before = snapshot(to)
    with source_server(source_dir) as source:
        err = refused(mirror(to, source, log.vkey), "FORK")
    assert f"size {fork_size}" in err
    assert snapshot(to) == before


def test_a_source_behind_the_mirror_but_consistent_changes_nothing(log):
    to = copy_mirror(log.full, log.tmp / "ahead" / "log")
    before = snapshot(to)
    with source_server(log.at300) as source:
        run = mirror(to, source, log.vkey)
    assert run.returncode == 0, run.stderr
    assert "behind the mirror's 600 and consistent with it" in run.stderr
    assert snapshot(to) == before


def test_a_checkpoint_signed_by_another_key_is_refused(log):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Signer(KEY_NAME, Ed25519PrivateKey.generate()).verifier_key
    to = log.tmp / "other-key" / "log"
    refused(mirror(to, f"{log.base}/log", other), "unknown key")
    assert snapshot(to) == {}


# --- the command line --------------------------------------------------------------------------


def test_mirror_help_names_its_options():
    run = rxledger("mirror", "--help")
    assert run.returncode == 0
    for option in ("--to", "--from", "--key", "--follow", "--interval", "--quiet"):
        assert option in run.stdout


def test_mirror_from_a_url_needs_the_log_key(tmp_path):
    run = rxledger("mirror", "--to", str(tmp_path / "m"), "--from", "http://127.0.0.1:9/log")
    assert run.returncode == 2
    assert "--from needs --key" in run.stderr


def test_mirror_of_an_unreachable_log_says_so(tmp_path, log):
    port = free_port()
    run = mirror(tmp_path / "m", f"http://127.0.0.1:{port}/log", log.vkey)
    assert run.returncode == 2
    assert "cannot read the log" in run.stderr and str(port) in run.stderr


def test_two_mirrors_cannot_write_one_directory(log):
    to = copy_mirror(log.full, log.tmp / "busy" / "log")
    stall = Stall("/checkpoint", threading.Event(), threading.Event())
    with source_server(log.full, stall) as source:
        first = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "mirror", "--to", str(to), "--from", source]
            + ["--key", log.vkey],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert stall.requested.wait(60)
            second = mirror(to, source, log.vkey)
        finally:
            stall.release.set()
            first.communicate(timeout=30)
    assert second.returncode == 2
    assert "another rxledger mirror is writing" in second.stderr
    assert first.returncode == 0


def test_following_stops_at_a_fork_and_leaves_the_mirror_as_it_was(log):
    source_dir = copy_mirror(log.at300, log.tmp / "follow-source" / "log")
    to = log.tmp / "follow-fork" / "log"
    with source_server(source_dir) as source:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "mirror", "--to", str(to), "--from", source]
            + ["--key", log.vkey, "--follow", "--interval", "0.1"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for_size(to, 300)
            before = snapshot(to)
            # The source now shows another history of 356 entries, signed by the log's key.
            shared = parse_entry_bundle((log.full / "tile/entries/000").read_bytes())
            other = [canonical_json({"subject": f"rx-fork-{i}", "version": 1}) for i in range(100)]
            fork_log(
                source_dir,
                shared + other,
                Path(log.env["RXLEDGER_VAR_DIR"]) / "keys" / "dev-log.pem",
            )
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1, err
    assert "REFUSED: FORK" in err and "size 356" in err, err
    assert snapshot(to) == before


def test_a_one_shot_copy_stopped_by_sigterm_keeps_its_old_checkpoint(log):
    to = copy_mirror(log.at300, log.tmp / "sigterm" / "log")
    before = snapshot(to)
    stall = Stall("/tile/entries/001", threading.Event(), threading.Event())
    with source_server(log.full, stall) as source:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "mirror", "--to", str(to), "--from", source]
            + ["--key", log.vkey],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert stall.requested.wait(60), "the mirror never asked for tile/entries/001"
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, err
    assert "stopped before the copy finished" in err
    assert_left_as_it_was(to, before, log.full)
    assert size_of(to) == 300


def test_following_retries_an_unreachable_source(log):
    to = log.tmp / "retry" / "log"
    errors = log.tmp / "retry.err"
    port = free_port()
    with errors.open("w") as err_file:
        with source_server(log.at300, port=port) as source:
            proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "mirror", "--to", str(to), "--from", source]
                + ["--key", log.vkey, "--follow", "--interval", "0.1", "--quiet"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=err_file,
                text=True,
            )
            try:
                wait_for_size(to, 300)
            except BaseException:
                proc.kill()
                raise
        try:
            deadline = time.monotonic() + 30
            while "retrying in 0.1 s" not in errors.read_text():
                assert proc.poll() is None, errors.read_text()
                assert time.monotonic() < deadline, "the mirror did not say the log is unreachable"
                time.sleep(0.05)
            with source_server(log.full, port=port):
                wait_for_size(to, 600)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=20)
    assert proc.returncode == 0, errors.read_text()
    assert "cannot read the log" in errors.read_text()
    assert contents(to) == {**contents(log.at300), **contents(log.full)}
