"""MongoDB's `notablescan`, emulated: a command listener that checks every read the product
sends against the indexes it declares (app.db.declared_indexes), by the rules in
tests/index_rules.py, and records each read no index serves.

Whose command is it? The listener runs synchronously in the code that sends the command, so
the Python stack says who sent it: the innermost frame in this repository decides. A frame in
`anchoring/`, `app/` or `schema/` makes it the product's (checked), one in `tests/`, `bench/`
or `scripts/` makes it the test's own (tampering, seeding, inspecting: not checked), whatever
client carries it. Tests build product objects over their own clients, so telling clients
apart would miss the product's reads there, and an appName would follow the client, not the
code. A command with no frame of the repository on its stack (a coroutine the product handed
to `asyncio.gather` runs as a task of its own) is checked, as the product's: only the product
gathers reads.

Full reads the product intends (an audit reads every notarization) are declared once, in
app.db.FULL_READS, by collection and the function that issues them.

Each process appends what it finds to `<NOTABLESCAN_DIR>/<pid>.jsonl` as it finds it, so
gateways started as subprocesses report too (tests/notablescan_site/sitecustomize.py installs
the listener there); `NOTABLESCAN_TEST` names the test that was running (or that started the
process). tests/conftest.py reads the directory at the end of the session.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

import index_rules
from index_rules import Declared, Query
from pymongo import monitoring

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_DIRS = tuple(f"{ROOT / d}{os.sep}" for d in ("anchoring", "app", "schema"))
TOOL_DIRS = tuple(f"{ROOT / d}{os.sep}" for d in ("tests", "bench", "scripts"))
THIS_FILE = str(Path(__file__).resolve())

REPORT_DIR_ENV = "NOTABLESCAN_DIR"
TEST_ENV = "NOTABLESCAN_TEST"
UNKNOWN = "(a task of its own: no caller on the stack)"


@dataclass(frozen=True)
class Violation:
    """A read no declared index serves: its shape, why, where the product sent it, and the
    test that was running."""

    shape: str
    reason: str
    origin: str
    test: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> Violation:
        return cls(**json.loads(line))


def sender(frame: FrameType | None) -> str | None:
    """Where the product sent the command from (`app/service.py:155 PrescriptionService.page`),
    UNKNOWN when no frame of the repository is on the stack, None when the tests sent it."""
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(PRODUCT_DIRS):
            where = os.path.relpath(path, ROOT)
            return f"{where}:{frame.f_lineno} {frame.f_code.co_qualname}"
        if path.startswith(TOOL_DIRS) and path != THIS_FILE:
            return None
        frame = frame.f_back
    return UNKNOWN


def origin_function(origin: str) -> str:
    """`app/service.py PrescriptionService.page` of an origin: what FULL_READS names."""
    where, _, function = origin.partition(" ")
    return f"{where.rsplit(':', 1)[0]} {function}"


class NotablescanListener(monitoring.CommandListener):
    """Records every product read that no declared index serves (module docstring)."""

    def __init__(
        self,
        report_dir: Path,
        indexes: Mapping[str, Sequence[Declared]] | None = None,
        full_reads: Iterable[tuple[str, str]] | None = None,
    ) -> None:
        """`indexes` (by collection) and `full_reads` ((collection, function)
        pairs) default to the product's app.db.declared_indexes and app.db.FULL_READS."""
        self.report_dir = report_dir
        self._indexes = None if indexes is None else dict(indexes)
        self._full_reads = set() if full_reads is None else set(full_reads)
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def _declared(self) -> dict[str, Sequence[Declared]]:
        # Imported on first use: a subprocess installs the listener before its sys.path
        # holds the repository.
        if self._indexes is None:
            from app.db import FULL_READS, declared_indexes

            self._indexes = dict(declared_indexes())
            self._full_reads |= {(r.collection, r.origin) for r in FULL_READS}
        return self._indexes

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        reads = index_rules.queries(event.command_name, event.command)
        if not reads:
            return
        origin = sender(sys._getframe(1))
        if origin is None:
            return
        indexes = self._declared()
        for query in reads:
            self._check(query, origin, indexes.get(query.collection, ()))

    def _check(self, query: Query, origin: str, indexes: Sequence[Declared]) -> None:
        if self._intended(query.collection, origin_function(origin)):
            return
        verdict = index_rules.judge(query, indexes)
        if verdict.served:
            return
        shape = index_rules.describe(query)
        with self._lock:
            if (shape, origin) in self._seen:
                return
            self._seen.add((shape, origin))
            found = Violation(shape, verdict.reason, origin, os.environ.get(TEST_ENV, "?"))
            with (self.report_dir / f"{os.getpid()}.jsonl").open("a") as out:
                out.write(found.to_json() + "\n")

    def _intended(self, collection: str, function: str) -> bool:
        """Whether FULL_READS declares this read (a comprehension inside the function counts)."""
        return any(
            c == collection and (function == f or function.startswith(f"{f}.<locals>."))
            for c, f in self._full_reads
        )

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def install(environ: Mapping[str, str] = os.environ) -> NotablescanListener | None:
    """Register the listener for every client created from now on, when NOTABLESCAN_DIR is set."""
    where = environ.get(REPORT_DIR_ENV)
    if not where:
        return None
    listener = NotablescanListener(Path(where))
    monitoring.register(listener)
    return listener


def collected(report_dir: Path) -> list[Violation]:
    """Every violation the processes of the run recorded, each shape once per function that
    sent it."""
    found: dict[tuple[str, str], Violation] = {}
    for path in sorted(report_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                v = Violation.from_json(line)
                found.setdefault((v.shape, origin_function(v.origin)), v)
    return sorted(found.values(), key=lambda v: (v.shape, v.origin))


def report(violations: list[Violation]) -> str:
    lines = [
        f"{len(violations)} product reads no declared index serves "
        "(MongoDB with notablescan would refuse them; tests/notablescan.py):"
    ]
    for v in violations:
        lines += [
            f"- {v.shape}",
            f"    {v.reason}",
            f"    sent from {v.origin}",
            f"    in {v.test}",
        ]
    lines.append(
        "Declare an index that serves the read (app.db.declared_indexes), change the read's "
        "shape, or, for a deliberate full read, declare it in app.db.FULL_READS."
    )
    return "\n".join(lines)
