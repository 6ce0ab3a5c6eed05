"""What the benchmarks share: child processes that die with the benchmark, their CPU time,
free ports, progress output and clean-up on SIGTERM."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import urllib.parse
from collections.abc import Iterator


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
