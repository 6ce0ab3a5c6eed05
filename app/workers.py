"""What the worker processes of one `rxledger serve --workers N` share.

`rxledger serve` with more than one worker creates, before it starts them, a directory of its
own (under /dev/shm when there is one) holding:
- `state`: a small file every worker maps into memory (`ServerState`): a table of the workers
  (pid, and whether that worker holds the sequencer lease) and the rate limiter's token buckets
  (app.limits.SharedRateLimiter), so a client has one budget however many workers serve it;
- `metrics/`: prometheus_client's multiprocess files, so that /metrics on any worker reports
  the counters and histograms of all of them, summed.
The workers find both through environment variables the parent sets for them
(SERVER_STATE_ENV, and prometheus_client's PROMETHEUS_MULTIPROC_DIR); the parent removes the
directory when it stops.

Environment variables:

RXLEDGER_WORKERS (integer >= 1; default: the cores this process may run on)
    How many workers `rxledger serve` runs when --workers is not given. Invalid: "rxledger
    serve: RXLEDGER_WORKERS='many' is not an integer" (exit 2).
RXLEDGER_SHUTDOWN_GRACE (number >= 0, seconds; default 10)
    On SIGTERM or SIGINT, how long each worker waits for requests still running before it
    cancels them. Event streams are ended at once (with a resume hint) and WebSockets closed
    (1012), so they do not hold the shutdown up.
RXLEDGER_SERVER_STATE, PROMETHEUS_MULTIPROC_DIR
    Set by `rxledger serve` for its workers (the state file and the metrics directory); not for
    operators to set.

Writers lock the byte range they change with a POSIX record lock (fcntl.lockf) on the file:
two system calls per update, no database round trip, and a lock held by a worker that dies is
released by the kernel. A worker holds a lock only across plain memory reads and writes, never
across an `await`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import mmap
import os
import shutil
import signal
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Set by `rxledger serve` for its workers: the path of the shared state file. Not for operators.
SERVER_STATE_ENV = "RXLEDGER_SERVER_STATE"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

MAGIC = b"RXSRV002"
_HEADER = struct.Struct("<8sIII")  # magic, worker slots, bucket groups, slots per group
_COUNTER = struct.Struct("<q")  # at COUNTER_AT: bumped whenever a worker changes checkpoints
COUNTER_AT = 32
HEADER_BYTES = 64
# pid (0: free); 1 if it holds the sequencer lease; as it knows them: tree size, checkpoint size;
# its prescription-event subscribers
_WORKER = struct.Struct("<qqqqq")
WORKER_BYTES = 40
BUCKET = struct.Struct("<16sdd")  # key digest, tokens, updated (time.monotonic(), host-wide)
GROUP_SLOTS = 16  # buckets one key may live in: a key hashes to one group of this many
DEFAULT_BUCKETS = 1 << 17  # 131,072 buckets of 32 bytes: 4 MiB


class ServerStateError(Exception):
    """The shared state file is missing or not one `rxledger serve` made."""


def configure_logging() -> None:
    """How every rxledger process logs (the CLI, and each worker of `rxledger serve`, which
    uvicorn starts as a fresh interpreter that configures only uvicorn's own loggers)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise


PR_SET_PDEATHSIG = 1  # prctl(2)


def exit_with_parent() -> None:
    """Have the kernel send this worker SIGTERM (a graceful stop) when its supervisor dies,
    even by SIGKILL, which gives the supervisor no chance to stop its workers: orphans would
    go on holding the port, the sequencer lease and the log's tail, unsupervised. Linux only
    (prctl); elsewhere a no-op."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Worker:
    pid: int
    leads: bool  # holds the sequencer lease
    tree_size: int  # the sequencer's, if it leads
    checkpoint_size: int  # the anchorer's latest signed checkpoint, if it leads
    subscribers: int = 0  # its prescription-event subscribers (WebSocket and SSE)


class ServerState:
    """The shared memory of one server's workers: a file mapped by each of them."""

    def __init__(self, path: Path, fd: int, memory: mmap.mmap) -> None:
        self.path = path
        self._fd = fd
        self.memory = memory
        magic, self.worker_slots, self.bucket_groups, self.group_slots = _HEADER.unpack_from(
            memory, 0
        )
        if magic != MAGIC:
            raise ServerStateError(f"{path} is not an rxledger server state file")
        self.buckets_at = HEADER_BYTES + self.worker_slots * WORKER_BYTES
        self._slot: int | None = None

    @classmethod
    def create(cls, path: Path, worker_slots: int, buckets: int = DEFAULT_BUCKETS) -> ServerState:
        """Make the file at `path` (which must not exist): room for `worker_slots` workers
        alive at once and about `buckets` rate limiter buckets, all zero."""
        groups = max(1, -(-buckets // GROUP_SLOTS))
        size = HEADER_BYTES + worker_slots * WORKER_BYTES + groups * GROUP_SLOTS * BUCKET.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)  # reads as zeros
        memory = mmap.mmap(fd, size)
        _HEADER.pack_into(memory, 0, MAGIC, worker_slots, groups, GROUP_SLOTS)
        return cls(path, fd, memory)

    @classmethod
    def attach(cls, path: Path) -> ServerState:
        """Map the file a parent created. Raises ServerStateError when it is not there."""
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise ServerStateError(
                f"{SERVER_STATE_ENV}={path}: {exc.strerror} (this variable is set by "
                "`rxledger serve --workers N` for its workers, not by hand)"
            ) from None
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES:
            os.close(fd)
            raise ServerStateError(f"{path} is not an rxledger server state file")
        return cls(path, fd, mmap.mmap(fd, size))

    @classmethod
    def from_env(cls) -> ServerState | None:
        """The state of the server this process is a worker of; None outside one."""
        raw = os.environ.get(SERVER_STATE_ENV, "")
        return cls.attach(Path(raw)) if raw else None

    def close(self) -> None:
        self.memory.close()
        os.close(self._fd)

    # --- locking --------------------------------------------------------------------------

    def lock(self, offset: int, length: int) -> None:
        """Take the lock of bytes [offset, offset + length), waiting for another process."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX, length, offset)

    def unlock(self, offset: int, length: int) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, length, offset)

    @contextlib.contextmanager
    def locked(self, offset: int, length: int) -> Iterator[None]:
        self.lock(offset, length)
        try:
            yield
        finally:
            self.unlock(offset, length)

    # --- what changed -----------------------------------------------------------------------

    def value(self) -> int:
        """The checkpoint change counter (anchoring.log.ChangeCounter). Read without a lock: a
        read torn by a concurrent bump differs from the value seen before, and only costs the
        reader a fresh read of the checkpoints."""
        return int(_COUNTER.unpack_from(self.memory, COUNTER_AT)[0])

    def bump(self) -> None:
        with self.locked(COUNTER_AT, _COUNTER.size):
            _COUNTER.pack_into(self.memory, COUNTER_AT, self.value() + 1)

    # --- the workers ----------------------------------------------------------------------

    def _workers_locked(self) -> contextlib.AbstractContextManager[None]:
        return self.locked(HEADER_BYTES, self.worker_slots * WORKER_BYTES)

    def join(self, pid: int) -> None:
        """Take a free slot of the worker table for `pid`: never used, or left by a worker
        that is gone (one that crashed leaves its slot behind). Raises ServerStateError when
        every slot is held by a live process."""
        with self._workers_locked():
            for slot in range(self.worker_slots):
                held = _WORKER.unpack_from(self.memory, HEADER_BYTES + slot * WORKER_BYTES)[0]
                if held in (0, pid) or not _alive(held):
                    _WORKER.pack_into(
                        self.memory, HEADER_BYTES + slot * WORKER_BYTES, pid, 0, 0, 0, 0
                    )
                    self._slot = slot
                    return
        raise ServerStateError(f"all {self.worker_slots} worker slots are held by live processes")

    def leave(self) -> None:
        """Give this worker's slot back."""
        if self._slot is None:
            return
        with self._workers_locked():
            _WORKER.pack_into(self.memory, HEADER_BYTES + self._slot * WORKER_BYTES, 0, 0, 0, 0, 0)
        self._slot = None

    def report(
        self, leads: bool, tree_size: int, checkpoint_size: int, subscribers: int = 0
    ) -> None:
        """Say in this worker's slot whether it holds the sequencer lease, the sizes its
        sequencer and anchorer know (meaningful while it leads), and its subscribers."""
        if self._slot is None:
            return
        offset = HEADER_BYTES + self._slot * WORKER_BYTES
        with self._workers_locked():
            pid = _WORKER.unpack_from(self.memory, offset)[0]
            _WORKER.pack_into(
                self.memory, offset, pid, int(leads), tree_size, checkpoint_size, subscribers
            )

    def workers(self) -> list[Worker]:
        """The live workers, as the table says (a crashed one's slot is left out)."""
        with self._workers_locked():
            rows = list(
                _WORKER.iter_unpack(
                    self.memory[HEADER_BYTES : HEADER_BYTES + self.worker_slots * WORKER_BYTES]
                )
            )
        return [
            Worker(pid, bool(leads), tree_size, checkpoint_size, subscribers)
            for pid, leads, tree_size, checkpoint_size, subscribers in rows
            if pid and _alive(pid)
        ]

    def leader(self) -> Worker | None:
        """The live worker holding the sequencer lease, if one of this server's does."""
        return next((w for w in self.workers() if w.leads), None)


@contextlib.contextmanager
def shared_state(workers: int) -> Iterator[ServerState]:
    """For the parent of `workers` worker processes: a fresh directory with the state file and
    an empty metrics directory, named in this process's environment (which the workers
    inherit); removed, and the variables unset, on exit."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    directory = Path(tempfile.mkdtemp(prefix="rxledger-serve-", dir=base))
    saved = {name: os.environ.get(name) for name in (SERVER_STATE_ENV, METRICS_DIR_ENV)}
    try:
        # Room for restarts: a crashed worker's slot is reused once its pid is gone.
        state = ServerState.create(directory / "state", worker_slots=2 * workers + 8)
        (directory / "metrics").mkdir()
        os.environ[SERVER_STATE_ENV] = str(state.path)
        os.environ[METRICS_DIR_ENV] = str(directory / "metrics")
        try:
            yield state
        finally:
            state.close()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(directory, ignore_errors=True)
