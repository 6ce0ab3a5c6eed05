"""What the benchmarks share: the database server (MONGODB_URI, or a FerretDB of their own),
child processes that die with the benchmark, their CPU time, free ports, progress output,
clean-up on SIGTERM, dropping their databases and keeping their logs, percentiles, and server
processes such as a real gateway (`rxledger serve`) on a free port."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from pymongo import AsyncMongoClient

if TYPE_CHECKING:
    import devdb

ROOT = Path(__file__).resolve().parent.parent


class Broken(Exception):
    """A process did not start, or never reached the state the benchmark needs."""


# Request headers for comparing the gateway with the baseline: the same bytes from both sides.
# The baseline does not compress, the gateway gzips large answers for clients that accept them,
# and on loopback gzip only costs both ends.
UNCOMPRESSED = {"Accept-Encoding": "identity"}


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of `values` by nearest rank; NaN when there are none."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when this process dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redacted_uri(uri: str) -> str:
    """A server URI without credentials or options, for printing."""
    parts = urllib.parse.urlsplit(uri)
    return f"{parts.scheme}://{parts.hostname or '?'}{f':{parts.port}' if parts.port else ''}/"


def start_database(tmp: Path) -> tuple[str, devdb.FerretServer | None]:
    """The database server's URI: MONGODB_URI when it is set; otherwise that of a FerretDB
    started for this run, its files in `tmp`/db and its log `tmp`/ferretdb.log, returned too
    so that the caller stops it. Broken when FerretDB does not start. Imports devdb from
    scripts/, which the benchmarks put on sys.path."""
    uri = os.environ.get("MONGODB_URI")
    if uri:
        return uri, None
    import devdb

    progress("starting FerretDB ...")
    try:
        ferret = devdb.start_ferretdb(tmp / "db", log_path=tmp / "ferretdb.log")
    except devdb.FerretDBError as exc:
        raise Broken(str(exc)) from None
    return ferret.uri, ferret


def describe_server(uri: str, ferret: object | None) -> str:
    """The `server:` line of a benchmark: MONGODB_URI (password redacted), or the FerretDB
    `start_database` started for this run."""
    if ferret is None:
        return f"MONGODB_URI {redacted_uri(uri)}"
    return (
        "FerretDB v1.24.2 (patched: _id equalities and $ins use its index, other queries scan), "
        f"SQLite handler, started for this run at {uri}"
    )


async def drop_databases(uri: str, names: list[str]) -> None:
    """Drop the databases `names` on the server at `uri`."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri, serverSelectionTimeoutMS=3000)
    try:
        for name in names:
            await client.drop_database(name)
    finally:
        await client.close()


def copy_logs(source: Path, dest: Path) -> None:
    """Copy the *.log files in `source` to `dest`, creating it if needed."""
    dest.mkdir(parents=True, exist_ok=True)
    for log in source.glob("*.log"):
        shutil.copy(log, dest / log.name)


@contextlib.contextmanager
def terminated_by_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit, so the clean-up in `finally` blocks runs."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL when it has not exited within 10 s; nothing if it already has."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def log_tail(log_path: Path, lines: int) -> str:
    """The last `lines` lines of a process's log, each cut at 240 characters, for an error."""
    try:
        tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "(no log)"
    return "\n".join(line[:240] for line in tail)


def start_server(
    cmd: list[str], env: dict[str, str], log_path: Path, *, own_session: bool = True
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `cmd --port PORT --log-level warning` from the project's root on a free port with
    environment `env`, its output appended to `log_path`; returns the process and its base
    URL. It dies with this process; in its own session (`own_session`), Ctrl-C does not
    reach it (we stop it), otherwise it gets Ctrl-C's SIGINT too."""
    port = free_port()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [*cmd, "--port", str(port), "--log-level", "warning"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            start_new_session=own_session,
        )
    return process, f"http://127.0.0.1:{port}"


# --- the gateway ------------------------------------------------------------------------------


@dataclass
class Gateway:
    """One `rxledger serve` process, its address and the file its output goes to."""

    process: subprocess.Popen[bytes]
    base: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        stop_process(self.process)


def gateway_env(uri: str, database: str, var_dir: Path, **settings: str) -> dict[str, str]:
    """The gateway's environment: ours without any RXLEDGER_ setting, then database `database`
    at `uri`, its files under `var_dir`, no rate limit, one worker process (the figures, CPU
    and memory read by its pid, are those of one process, as the baselines' are), and
    `settings` last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RXLEDGER_")}
    env.update(
        MONGODB_URI=uri,
        RXLEDGER_DB=database,
        RXLEDGER_VAR_DIR=str(var_dir),
        RXLEDGER_RATE_LIMIT="0",
        RXLEDGER_WORKERS="1",
        **settings,
    )
    return env


def start_gateway(env: dict[str, str], log_path: Path) -> Gateway:
    """Start `python -m app.cli serve` on a free port with environment `env`, its output
    appended to `log_path`; it dies with this process and is not reached by Ctrl-C."""
    cmd = [sys.executable, "-m", "app.cli", "serve"]
    process, base = start_server(cmd, env, log_path)
    return Gateway(process, base, log_path)


def wait_until_ready(gateway: Gateway, timeout: float = 60) -> None:
    """Return once /readyz says the gateway leads the sequencer; Broken, with the end of its
    log, when it exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.TransportError, ValueError):
            r = httpx.get(f"{gateway.base}/readyz", timeout=2)
            if r.status_code == 200 and r.json()["sequencerLeader"]:
                return
        if gateway.process.poll() is not None or time.monotonic() > deadline:
            raise Broken(f"the gateway did not start; last lines of its log:\n{gateway.log_tail()}")
        time.sleep(0.2)
