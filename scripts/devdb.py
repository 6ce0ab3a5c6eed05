#!/usr/bin/env python3
"""Start and stop a real MongoDB-protocol server (FerretDB, SQLite handler) for development.

Used three ways:

* from tests and benchmarks (``tests/conftest.py``, ``bench/``)::

      from devdb import start_ferretdb          # with scripts/ on sys.path
      with start_ferretdb(tmp_path / "db") as server:
          client = AsyncMongoClient(server.uri)

  ``port=None`` picks a free port on 127.0.0.1, so parallel runs never collide.

* from the command line / Makefile (``make db``, ``make run``)::

      python3 scripts/devdb.py start  [--port 27017] [--data-dir var/db]
      python3 scripts/devdb.py status | uri | stop

  ``start`` leaves the server running detached and records it in ``<data-dir>/ferretdb.pid``.

* not at all: when ``MONGODB_URI`` is set, ``start`` does nothing and everything uses that server.

The FerretDB binary is built on first use by ``scripts/install-ferretdb.sh`` (needs Go), with our
``_id``-index patch, and rebuilt when that patch changes; ``RXLEDGER_FERRETDB`` names another binary.
Standard library only (Python >= 3.11): it runs with the system python3 before the venv exists.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

__all__ = [
    "FerretDBError",
    "FerretServer",
    "PortInUseError",
    "find_free_port",
    "install_ferretdb",
    "ping",
    "start_ferretdb",
]

HOST = "127.0.0.1"
DEFAULT_PORT = 27017
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT / "var" / "db"
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-ferretdb.sh"
PIDFILE_NAME = "ferretdb.pid"
LOGFILE_NAME = "ferretdb.log"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class FerretDBError(RuntimeError):
    """FerretDB could not be installed, started or reached."""


class PortInUseError(FerretDBError):
    """The requested port is already taken by another process."""


# --------------------------------------------------------------------------------------------
# A minimal MongoDB wire-protocol client: one OP_MSG `ping`, enough to know the server is up.
# --------------------------------------------------------------------------------------------

_OP_MSG = 2013


def _bson_encode(doc: dict[str, int | str]) -> bytes:
    """Encode a flat document of int32 and string values as BSON."""
    body = bytearray()
    for key, value in doc.items():
        name = key.encode() + b"\x00"
        if isinstance(value, int):
            body += b"\x10" + name + struct.pack("<i", value)
        else:
            data = value.encode() + b"\x00"
            body += b"\x02" + name + struct.pack("<i", len(data)) + data
    return struct.pack("<i", len(body) + 5) + bytes(body) + b"\x00"


# Sizes of fixed-width BSON element types; variable-width ones are handled in _bson_ok.
_FIXED_SIZES = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8}
_FIXED_SIZES.update({0x12: 8, 0x13: 16, 0x7F: 0, 0xFF: 0})


def _bson_ok(doc: bytes) -> bool:
    """Return True if the top-level field ``ok`` of a BSON document is numerically 1."""
    i, end = 4, len(doc) - 1
    while i < end:
        kind = doc[i]
        name_end = doc.index(b"\x00", i + 1)
        name, i = doc[i + 1 : name_end], name_end + 1
        if kind in _FIXED_SIZES:
            size = _FIXED_SIZES[kind]
        elif kind in (0x02, 0x0D, 0x0E):  # string, JS code, symbol
            size = 4 + struct.unpack_from("<i", doc, i)[0]
        elif kind in (0x03, 0x04, 0x0F):  # document, array, code with scope
            size = struct.unpack_from("<i", doc, i)[0]
        elif kind == 0x05:  # binary
            size = 5 + struct.unpack_from("<i", doc, i)[0]
        else:
            return False
        if name == b"ok":
            fmt = {0x01: "<d", 0x10: "<i", 0x12: "<q", 0x08: "<?"}.get(kind)
            return fmt is not None and struct.unpack_from(fmt, doc, i)[0] == 1
        i += size
    return False


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by server")
        buf += chunk
    return bytes(buf)


def ping(port: int, host: str = HOST, timeout: float = 2.0) -> bool:
    """Send ``{"ping": 1, "$db": "admin"}`` as OP_MSG; True if the server answers ``ok: 1``."""
    body = struct.pack("<I", 0) + b"\x00" + _bson_encode({"ping": 1, "$db": "admin"})
    request_id = os.getpid() & 0x7FFFFFFF
    header = struct.pack("<iiii", 16 + len(body), request_id, 0, _OP_MSG)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(header + body)
            length, _, response_to, op_code = struct.unpack("<iiii", _recv_exact(sock, 16))
            if op_code != _OP_MSG or response_to != request_id or not 21 <= length <= 48 << 20:
                return False
            reply = _recv_exact(sock, length - 16)
    except (OSError, ValueError, struct.error):
        return False
    # flagBits (4 bytes), then section kind 0 (1 byte) holding the reply document
    if len(reply) < 10 or reply[4] != 0:
        return False
    try:
        return _bson_ok(reply[5 : 5 + struct.unpack_from("<i", reply, 5)[0]])
    except (ValueError, IndexError, struct.error):
        return False


def _port_taken(port: int, host: str = HOST) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
        return True
    return False


def find_free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# Installing, starting and stopping FerretDB
# --------------------------------------------------------------------------------------------


def install_ferretdb() -> Path:
    """Build FerretDB if needed (scripts/install-ferretdb.sh) and return the binary's path.

    The script's progress goes to stderr and is passed through; its stdout is the path.
    """
    try:
        proc = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise FerretDBError(f"could not run {INSTALL_SCRIPT}: {exc}") from exc
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise FerretDBError(
            f"{INSTALL_SCRIPT.relative_to(REPO_ROOT)} failed (exit {proc.returncode}); see the "
            "messages above, or set MONGODB_URI to use a running MongoDB instead"
        )
    binary = Path(lines[-1])
    if not os.access(binary, os.X_OK):
        raise FerretDBError(f"install-ferretdb.sh reported {binary}, which is not executable")
    return binary


def _log_tail(log_path: Path, lines: int = 25) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in tail) if tail else "(log is empty)"


def _cmdline(pid: int) -> str | None:
    """The command line of a live process, or None if there is no such process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, but someone else's
    proc_file = Path(f"/proc/{pid}/cmdline")
    if proc_file.exists():
        with contextlib.suppress(OSError):
            return proc_file.read_bytes().replace(b"\x00", b" ").decode(errors="replace")
        return None
    with contextlib.suppress(OSError):  # no /proc (macOS): ask ps
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
        )
        return out.stdout.strip() or None
    return ""


def _is_zombie(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "Z"
    return False


class FerretServer:
    """A running FerretDB process. ``stop()`` (or leaving the ``with`` block) shuts it down."""

    def __init__(
        self,
        pid: int,
        port: int,
        data_dir: Path,
        log_path: Path,
        process: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.pid = pid
        self.port = port
        self.host = HOST
        self.data_dir = data_dir
        self.log_path = log_path
        self._process = process
        self._stopped = False

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/"

    def __repr__(self) -> str:
        return f"FerretServer(pid={self.pid}, uri={self.uri!r}, data_dir={str(self.data_dir)!r})"

    def is_running(self) -> bool:
        if self._stopped:
            return False
        if self._process is not None:
            return self._process.poll() is None
        return _cmdline(self.pid) is not None and not _is_zombie(self.pid)

    def ping(self, timeout: float = 2.0) -> bool:
        return ping(self.port, self.host, timeout)

    def _signal(self, sig: signal.Signals) -> None:
        # The server leads its own process group (start_new_session=True): signal the group.
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def _wait(self, timeout: float) -> bool:
        if self._process is not None:
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _cmdline(self.pid) is None or _is_zombie(self.pid):
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Safe to call twice."""
        if self._stopped:
            return
        if self.is_running():
            self._signal(signal.SIGTERM)
            if not self._wait(timeout):
                self._signal(signal.SIGKILL)
                self._wait(5.0)
        self._stopped = True
        _live_servers.discard(self)

    def __enter__(self) -> FerretServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# Servers started through start_ferretdb() are stopped when the interpreter exits, in case a
# caller forgets (or a test session is interrupted before its fixture finalizer runs).
_live_servers: set[FerretServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server.stop()


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the server get SIGTERM when this process dies, even by SIGKILL.

    atexit does not run when a test or benchmark process is killed, and the server lives in its
    own session, so without this it would be orphaned. Linux only (PR_SET_PDEATHSIG), and only
    from the main thread: the signal fires when the *thread* that started the child exits.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not sys.platform.startswith("linux") or not in_main_thread:
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl: stop right away
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _launch(
    binary: Path, data_dir: Path, port: int, log_path: Path, detached: bool = False
) -> FerretServer:
    """Start FerretDB on ``port`` and wait until it answers a ping (or fail with its log).

    ``detached`` servers (the CLI's) outlive this process; others die with it.
    """
    sqlite_url = "file:" + urllib.parse.quote(str(data_dir), safe="/") + "/"
    cmd = [
        str(binary),
        "--handler=sqlite",
        f"--sqlite-url={sqlite_url}",
        f"--state-dir={data_dir}",
        f"--listen-addr={HOST}:{port}",
        "--debug-addr=-",
        "--telemetry=disable",
        "--log-level=warn",
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"--- devdb {stamp}: {' '.join(cmd)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            cmd,
            cwd=data_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=None if detached else _die_with_parent(),
        )
    server = FerretServer(process.pid, port, data_dir, log_path, process)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise FerretDBError(
                f"FerretDB exited with code {process.returncode} before accepting connections "
                f"on {HOST}:{port}. Last lines of {log_path}:\n{_log_tail(log_path)}"
            )
        if ping(port, timeout=1.0):
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise FerretDBError(
                f"FerretDB did not answer a ping on {HOST}:{port} within {START_TIMEOUT:.0f} s. "
                f"Last lines of {log_path}:\n{_log_tail(log_path)}"
            )
        time.sleep(0.1)


def start_ferretdb(
    data_dir: Path, port: int | None = None, log_path: Path | None = None
) -> FerretServer:
    """Start FerretDB (SQLite handler) with its data in ``data_dir``; return once it answers.

    ``port=None`` picks a free port on 127.0.0.1. The log goes to ``log_path`` (default
    ``<data_dir>/ferretdb.log``). Builds the binary first if needed. The server runs in its own
    session; stop it with ``.stop()`` or use it as a context manager. It is also stopped when
    this interpreter exits, and (on Linux) when this process is killed.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path).resolve() if log_path is not None else data_dir / LOGFILE_NAME
    if port is not None and _port_taken(port):
        raise PortInUseError(f"port {HOST}:{port} is already in use")
    binary = install_ferretdb()
    attempts = 1 if port is not None else 5
    for attempt in range(attempts):
        chosen = port if port is not None else find_free_port()
        try:
            server = _launch(binary, data_dir, chosen, log_path)
        except FerretDBError:
            # A free port can be taken between choosing and binding it: choose another.
            if attempt + 1 < attempts and _port_taken(chosen):
                continue
            raise
        _live_servers.add(server)
        return server
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _pidfile(data_dir: Path) -> Path:
    return data_dir / PIDFILE_NAME


def _listen_port(cmdline: str) -> int | None:
    for arg in cmdline.split():
        if arg.startswith("--listen-addr="):
            with contextlib.suppress(ValueError):
                return int(arg.rsplit(":", 1)[1])
    return None


def _recorded_server(data_dir: Path, default_port: int) -> FerretServer | None:
    """The live FerretDB recorded in the pidfile; removes the pidfile if it is stale."""
    pidfile = _pidfile(data_dir)
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    cmdline = _cmdline(pid)
    if cmdline is None or _is_zombie(pid) or (cmdline and "ferretdb" not in cmdline):
        with contextlib.suppress(OSError):
            pidfile.unlink()
        return None
    port = _listen_port(cmdline) or default_port
    return FerretServer(pid, port, data_dir, data_dir / LOGFILE_NAME)


def _cmd_start(data_dir: Path, port: int) -> int:
    if os.environ.get("MONGODB_URI"):
        print("MONGODB_URI is set; not starting a server")
        return 0
    running = _recorded_server(data_dir, port)
    if running is not None:
        print(f"FerretDB is already running (pid {running.pid}) at {running.uri}")
        return 0
    if _port_taken(port):
        print(
            f"devdb: port {HOST}:{port} is already in use by another process.\n"
            f"  If that is a MongoDB server you want to use: export MONGODB_URI="
            f"mongodb://{HOST}:{port}/\n"
            f"  Otherwise stop that server, or choose another port: --port N "
            f"(make db DB_PORT=N).",
            file=sys.stderr,
        )
        return 1
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        server = _launch(install_ferretdb(), data_dir, port, data_dir / LOGFILE_NAME, True)
    except FerretDBError as exc:
        print(f"devdb: {exc}", file=sys.stderr)
        return 1
    _pidfile(data_dir).write_text(f"{server.pid}\n")
    print(f"FerretDB running (pid {server.pid}) at {server.uri}")
    print(f"  data: {data_dir}  log: {server.log_path}")
    where = "" if data_dir == DEFAULT_DATA_DIR.resolve() else f" --data-dir {data_dir}"
    print(f"  stop it with: python3 scripts/devdb.py stop{where}   (or: make db-stop)")
    return 0


def _cmd_stop(data_dir: Path, port: int) -> int:
    server = _recorded_server(data_dir, port)
    if server is None:
        print(f"FerretDB is not running (no live process in {_pidfile(data_dir)})")
        return 0
    server.stop()
    if _cmdline(server.pid) is not None and not _is_zombie(server.pid):
        print(f"devdb: could not stop FerretDB (pid {server.pid})", file=sys.stderr)
        return 1
    with contextlib.suppress(OSError):
        _pidfile(data_dir).unlink()
    print(f"FerretDB stopped (pid {server.pid})")
    return 0


def _cmd_status(data_dir: Path, port: int) -> int:
    if os.environ.get("MONGODB_URI"):
        print(f"MONGODB_URI is set: {os.environ['MONGODB_URI']}")
    server = _recorded_server(data_dir, port)
    if server is None:
        print(f"FerretDB not running (data dir {data_dir})")
        return 1
    answers = "answers ping" if server.ping() else "NOT answering ping"
    print(f"FerretDB running (pid {server.pid}) at {server.uri} ({answers})")
    return 0


def _cmd_uri(data_dir: Path, port: int) -> int:
    if os.environ.get("MONGODB_URI"):
        print(os.environ["MONGODB_URI"])
        return 0
    server = _recorded_server(data_dir, port)
    if server is None:
        print(f"devdb: note: no FerretDB running for {data_dir}", file=sys.stderr)
        print(f"mongodb://{HOST}:{port}/")
        return 0
    print(server.uri)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="devdb.py",
        description="Start/stop a FerretDB (MongoDB-protocol, SQLite-backed) server for "
        "development.\nIf MONGODB_URI is set, 'start' does nothing: that server is used instead.",
        epilog="commands:\n"
        "  start   start the server detached (no-op if running); builds FerretDB if needed\n"
        "  stop    stop the server recorded in <data-dir>/ferretdb.pid\n"
        "  status  say whether it is running, and its URI (exit 1 if not running)\n"
        "  uri     print the connection URI (MONGODB_URI if set)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["start", "stop", "status", "uri"])
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port on {HOST} (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="data, pidfile and log directory (default: var/db in the repository)",
    )
    args = parser.parse_args(argv)
    data_dir: Path = args.data_dir.resolve()
    commands = {"start": _cmd_start, "stop": _cmd_stop, "status": _cmd_status, "uri": _cmd_uri}
    return commands[args.command](data_dir, args.port)


if __name__ == "__main__":
    sys.exit(main())
