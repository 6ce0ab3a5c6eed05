"""The docs run: every block README.md and docs/*.md mark for testing is run, in order, against a
real gateway (uvicorn, FerretDB, real JWTs minted by the documented `rxledger token`), so the
docs cannot quietly rot.

The marker is an HTML comment on the line right before a fenced block (GitHub does not render
it; it is plain in the source):

    <!-- test -->                  run the block
    <!-- test: as $PRESCRIBER -->  (```graphql) send its operations with the bearer token that
                                   an earlier block exported as PRESCRIBER; with several names
                                   (`as $COURIER $PATIENT`), one per operation, in order
    <!-- test: lines 5 -->         (```sh) a command that keeps running (a subscription): it
                                   passes once it has printed 5 lines, then it is stopped

How a marked block runs:

- ```sh: with `bash -e -o pipefail`, in one scratch directory for the whole run (holding links
  to the repository's `scripts/` and `bench/`), with the test gateway's environment
  (MONGODB_URI, RXLEDGER_DB, RXLEDGER_VAR_DIR, ...: `rxledger token`, `verifier-key` and
  `export-proof` use the gateway's log and keys) and the project's `rxledger` on PATH. What a
  block exports, later blocks see (the walkthrough exports the tokens). It fails on a non-zero
  exit status.
- ```graphql: each operation of the block, in order, is POSTed to /graphql. It fails on an HTTP
  status other than 200, on `errors`, and on a result-union member that is an error (an object
  with a `__typename` and a `message`).

Before it runs, a block's text has `http://127.0.0.1:8000` and `ws://127.0.0.1:8000` replaced by
the test gateway's address, `.venv/bin/` by the directory of the Python running the tests, and
`rx_…` by the id of the prescription the newest tested `issuePrescription` returned.

Pages run in the order of PAGES (README.md, then docs/ alphabetically) against one gateway and
one database: the walkthrough's prescription is the one later pages list, export and follow.
Before each block the test waits until the log has sequenced every event and a signed checkpoint
covers it (a second or so for a reader; `integrity` is VERIFIED by then). A failing block stops
the run; the blocks after it are reported as not run.

A page that shows commands (a ```sh or ```graphql block, or a block whose first command is
`rxledger`, `.venv/bin/...`, `curl` or `make`) must mark at least one of them, and a marker must
stand right before a fence and say only the words above.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Databases
from graphql import OperationDefinitionNode, parse
from test_gateway import env_for, running_gateway

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

MARKER = re.compile(r"^\s*<!--\s*test\b(?::(?P<words>.*?))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>[^`]*)$")
COMMAND_LANGUAGES = {"sh", "bash", "shell", "console", "graphql"}
COMMAND_START = re.compile(r"^\s*(rxledger\b|\.venv/bin/|curl\b|make\b)")
BLOCK_TIMEOUT = 120.0
STREAM_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository
    line: int  # line of the opening fence, from 1
    info: str  # the fence's language
    text: str
    marker: str | None  # the words after "test" (may be empty); None when unmarked

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass(frozen=True)
class Plan:
    """What a marker asks for."""

    tokens: tuple[str, ...] = ()
    lines: int | None = None


@dataclass
class Page:
    path: str
    blocks: list[Block]
    problems: list[str]  # malformed markers, markers without a block, unclosed fences

    @property
    def marked(self) -> list[Block]:
        return [b for b in self.blocks if b.marker is not None]

    @property
    def shows_commands(self) -> bool:
        return any(shows_commands(b) for b in self.blocks)


def shows_commands(block: Block) -> bool:
    if block.info in COMMAND_LANGUAGES:
        return True
    first = next((x for x in block.text.splitlines() if x.strip()), "")
    return bool(COMMAND_START.match(first))


def read_page(name: str, text: str) -> Page:
    lines = text.split("\n")
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[int, str] | None = None  # a marker waiting for its fence: (line, words)
    i = 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        fence = FENCE.match(lines[i])
        if marker:
            if pending is not None:
                problems.append(f"{name}:{pending[0]}: marker not followed by a fenced block")
            pending = (i + 1, (marker["words"] or "").strip())
            i += 1
            continue
        if fence:
            indent, info = fence["indent"], fence["info"].strip()
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                problems.append(f"{name}:{i + 1}: unclosed fence")
                break
            body = "\n".join(x.removeprefix(indent) for x in lines[i + 1 : end])
            words = pending[1] if pending is not None and pending[0] == i else None
            if pending is not None and pending[0] != i:
                problems.append(f"{name}:{pending[0]}: marker not followed by a fenced block")
            blocks.append(Block(name, i + 1, info, body + "\n", words))
            pending = None
            i = end + 1
            continue
        if pending is not None and lines[i].strip():
            problems.append(f"{name}:{pending[0]}: marker not followed by a fenced block")
            pending = None
        i += 1
    if pending is not None:
        problems.append(f"{name}:{pending[0]}: marker not followed by a fenced block")
    for block in blocks:
        if block.marker is not None:
            try:
                plan_of(block)
            except ValueError as exc:
                problems.append(f"{block.where}: {exc}")
    return Page(name, blocks, problems)


def plan_of(block: Block) -> Plan:
    """The marker's words, checked: `as $A [$B ...]` for GraphQL, `lines N` for shell."""
    words = (block.marker or "").split()
    if block.info not in ("sh", "graphql"):
        raise ValueError(f"a marked block must be ```sh or ```graphql, not ```{block.info}")
    if not words:
        return Plan()
    if words[0] == "as" and block.info == "graphql" and len(words) > 1:
        if all(re.fullmatch(r"\$[A-Z_][A-Z0-9_]*", w) for w in words[1:]):
            return Plan(tokens=tuple(w[1:] for w in words[1:]))
    if words[0] == "lines" and block.info == "sh" and len(words) == 2 and words[1].isdigit():
        return Plan(lines=int(words[1]))
    raise ValueError(f"marker words {' '.join(words)!r} are not `as $NAME ...` or `lines N`")


def load(path: Path) -> Page:
    return read_page(str(path.relative_to(ROOT)), path.read_text())


# --- running blocks ---------------------------------------------------------------------------


class BlockFailed(Exception):
    pass


@dataclass
class Session:
    """One gateway, one scratch directory, and what earlier blocks left: the environment they
    exported and the newest prescription issued."""

    base: str
    env: dict[str, str]
    work: Path
    prescription: str | None = None
    outcomes: dict[str, str] = field(default_factory=dict)  # where -> "ok" or why not

    def substitute(self, text: str) -> str:
        ws = self.base.replace("http://", "ws://", 1)
        text = text.replace("http://127.0.0.1:8000", self.base)
        text = text.replace("ws://127.0.0.1:8000", ws)
        text = text.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
        if "rx_…" in text:
            if self.prescription is None:
                raise BlockFailed("the block names `rx_…` but no tested block issued one before")
            text = text.replace("rx_…", self.prescription)
        return text

    def settle(self) -> None:
        """Wait until every event is sequenced and a signed checkpoint covers the tree."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            ready = httpx.get(f"{self.base}/readyz", timeout=5).json()
            if ready.get("queuedGroups") == 0:
                answer = httpx.post(
                    f"{self.base}/graphql",
                    json={"query": "{ ledger { checkpoint { size } } }"},
                    timeout=5,
                ).json()
                checkpoint = answer["data"]["ledger"]["checkpoint"]
                if checkpoint is not None and checkpoint["size"] >= ready["treeSize"]:
                    return
            time.sleep(0.05)
        raise BlockFailed(f"the log did not settle within {SETTLE_TIMEOUT:.0f} s")

    def run(self, block: Block) -> None:
        plan = plan_of(block)
        self.settle()
        text = self.substitute(block.text)
        if block.info == "graphql":
            self.run_graphql(text, plan)
        elif plan.lines is not None:
            self.run_stream(text, plan.lines)
        else:
            self.run_shell(text)

    def run_shell(self, text: str) -> None:
        state = self.work / ".exported"
        state.unlink(missing_ok=True)
        script = f"{text}\nenv -0 > {state}\n"
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
        )
        if result.returncode != 0:
            raise BlockFailed(
                f"exit status {result.returncode}\nstdout: {result.stdout[-2000:]}\n"
                f"stderr: {result.stderr[-2000:]}"
            )
        exported = dict(
            entry.split("=", 1) for entry in state.read_text().split("\0") if "=" in entry
        )
        for noise in ("_", "PWD", "OLDPWD", "SHLVL"):
            exported.pop(noise, None)
        self.env = exported

    def run_stream(self, text: str, wanted: int) -> None:
        errors = self.work / ".stream-stderr"
        with errors.open("wb") as stderr:
            proc = subprocess.Popen(
                ["bash", "-e", "-o", "pipefail", "-c", text],
                cwd=self.work,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                start_new_session=True,  # its own process group, stopped as a whole below
            )
        assert proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        got: list[str] = []
        deadline = time.monotonic() + STREAM_TIMEOUT
        try:
            while len(got) < wanted:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if line is None:
                    break
                got.append(line)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if len(got) < wanted:
            raise BlockFailed(
                f"printed {len(got)} of {wanted} lines within {STREAM_TIMEOUT:.0f} s\n"
                f"stdout: {''.join(got)[-2000:]}\nstderr: {errors.read_text()[-2000:]}"
            )

    def run_graphql(self, text: str, plan: Plan) -> None:
        document = parse(text)
        operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
        fragments = [
            text[d.loc.start : d.loc.end]
            for d in document.definitions
            if not isinstance(d, OperationDefinitionNode) and d.loc is not None
        ]
        tokens = list(plan.tokens)
        if len(tokens) == 1:
            tokens *= len(operations)
        if tokens and len(tokens) != len(operations):
            raise BlockFailed(
                f"the marker names {len(tokens)} tokens for {len(operations)} operations"
            )
        for n, operation in enumerate(operations):
            assert operation.loc is not None
            query = "\n".join([text[operation.loc.start : operation.loc.end], *fragments])
            headers = {}
            if tokens:
                token = self.env.get(tokens[n])
                if not token:
                    raise BlockFailed(f"no earlier block exported ${tokens[n]}")
                headers["Authorization"] = f"Bearer {token}"
            r = httpx.post(
                f"{self.base}/graphql", json={"query": query}, headers=headers, timeout=30
            )
            if r.status_code != 200:
                raise BlockFailed(f"operation {n + 1}: HTTP {r.status_code}: {r.text[:2000]}")
            answer = r.json()
            if answer.get("errors"):
                raise BlockFailed(f"operation {n + 1}: {json.dumps(answer['errors'])[:2000]}")
            for typename, message in error_results(answer.get("data")):
                raise BlockFailed(f"operation {n + 1}: {typename}: {message}")
            issued = (answer.get("data") or {}).get("issuePrescription") or {}
            if isinstance(issued.get("id"), str):
                self.prescription = issued["id"]


def error_results(value: Any) -> Iterator[tuple[str, str]]:
    """Result-union members that are errors: objects with a `__typename` and a `message`."""
    if isinstance(value, dict):
        if "__typename" in value and value.get("message") is not None:
            yield value["__typename"], value["message"]
        for item in value.values():
            yield from error_results(item)
    elif isinstance(value, list):
        for item in value:
            yield from error_results(item)


def run_blocks(session: Session, blocks: list[Block]) -> None:
    """Run the blocks in order, recording each outcome; the first failure stops the run."""
    failed: str | None = None
    for block in blocks:
        if failed is not None:
            session.outcomes[block.where] = f"not run: {failed} failed before it"
            continue
        try:
            session.run(block)
        except (BlockFailed, subprocess.TimeoutExpired, httpx.HTTPError) as exc:
            session.outcomes[block.where] = f"FAILED: {exc}"
            failed = block.where
        else:
            session.outcomes[block.where] = "ok"


@pytest.fixture(scope="module")
def session(
    mongo_uri: str, databases: Databases, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Session]:
    tmp = tmp_path_factory.mktemp("docs")
    work = tmp / "work"
    work.mkdir()
    for name in ("scripts", "bench"):
        (work / name).symlink_to(ROOT / name)
    # Webhook endpoints of the examples name hosts this machine need not resolve.
    environment = env_for(
        mongo_uri,
        databases.new(),
        tmp,
        RXLEDGER_MODE="development",
        RXLEDGER_WEBHOOK_ALLOW_PRIVATE="1",
    )
    with running_gateway(environment, tmp / "gateway.log") as base:
        shell_env = dict(environment)
        shell_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
        yield Session(base, shell_env, work)


@pytest.fixture(scope="module")
def outcomes(session: Session) -> dict[str, str]:
    """Every marked block of every page, run once, in page order."""
    run_blocks(session, [b for path in PAGES for b in load(path).marked])
    return session.outcomes


# --- the tests ----------------------------------------------------------------------------------

PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]
TESTED_PAGES = [p for p in PAGES if load(p).marked]


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_the_page_marks_its_commands_and_its_markers_are_well_formed(path: Path) -> None:
    page = load(path)

    assert page.problems == []
    if page.shows_commands:
        assert page.marked, f"{page.path} shows commands but marks none of them for testing"


@pytest.mark.parametrize("path", TESTED_PAGES, ids=[str(p.relative_to(ROOT)) for p in TESTED_PAGES])
def test_every_marked_block_of_the_page_runs(path: Path, outcomes: dict[str, str]) -> None:
    page = load(path)

    results = {b.where: outcomes[b.where] for b in page.marked}

    assert all(r == "ok" for r in results.values()), "\n".join(
        f"{where}: {r}" for where, r in results.items() if r != "ok"
    )


LINK = re.compile(r"\]\((?!https?://|mailto:)(?P<target>[^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than `-` and `_` dropped,
    spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    in_fence = False
    for line in path.read_text().split("\n"):
        if line.strip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (heading := re.match(r"#{1,6} (.*)", line)):
            found.add(slug(heading[1]))
    return found


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_every_relative_link_names_a_file_and_heading_that_exist(path: Path) -> None:
    broken = []
    for match in LINK.finditer(path.read_text()):
        file, _, anchor = match["target"].partition("#")
        target = (path.parent / file).resolve() if file else path
        if not target.exists():
            broken.append(f"{match['target']}: no such file")
        elif anchor and (target.suffix != ".md" or anchor not in anchors(target)):
            broken.append(f"{match['target']}: no such heading")

    assert broken == []


def test_a_heading_anchor_is_githubs() -> None:
    assert slug("Development and test database: FerretDB v1.24.2") == (
        "development-and-test-database-ferretdb-v1242"
    )
    assert slug("Verifying proofs in the browser: `/audit`") == (
        "verifying-proofs-in-the-browser-audit"
    )


def test_the_walkthrough_and_every_audience_page_are_tested() -> None:
    tested = {str(p.relative_to(ROOT)) for p in TESTED_PAGES}

    assert {
        "README.md",
        "docs/frontend.md",
        "docs/partners.md",
        "docs/auditors.md",
        "docs/operations.md",
        "docs/benchmarks.md",
    } <= tested


# --- the checker itself can fail ------------------------------------------------------------------

BROKEN = """\
# A page

<!-- test -->
```sh
echo this one runs
```

<!-- test -->
```sh
echo about to fail; exit 3
```

<!-- test -->
```sh
echo never reached
```
"""


def test_a_page_that_shows_commands_but_marks_none_is_refused() -> None:
    page = read_page("p.md", "# P\n\n```sh\nrxledger --help\n```\n\n```\ncurl -s x\n```\n")

    assert page.shows_commands and page.marked == []


def test_a_stray_or_misspelt_marker_is_a_problem() -> None:
    page = read_page(
        "p.md",
        "<!-- test -->\nsome prose\n\n<!-- test: as PRESCRIBER -->\n```graphql\n{ a }\n```\n"
        "<!-- test: lines -->\n```sh\nx\n```\n<!-- test -->\n```python\nx\n```\n",
    )

    assert len(page.problems) == 4, page.problems
    assert page.problems[0] == "p.md:1: marker not followed by a fenced block"


def test_a_failing_block_fails_and_stops_the_run(session: Session) -> None:
    probe = Session(session.base, dict(session.env), session.work)
    page = read_page("broken.md", BROKEN)

    run_blocks(probe, page.marked)

    assert probe.outcomes["broken.md:4"] == "ok"
    assert probe.outcomes["broken.md:9"].startswith("FAILED: exit status 3")
    assert probe.outcomes["broken.md:14"] == "not run: broken.md:9 failed before it"


def test_graphql_errors_and_error_results_fail_the_block(session: Session) -> None:
    probe = Session(session.base, dict(session.env), session.work)
    probe.run_shell(
        "export PATIENT=$(.venv/bin/rxledger token --role PATIENT --sub patient-docs)".replace(
            ".venv/bin/", f"{Path(sys.executable).parent}/"
        )
    )
    page = read_page(
        "errors.md",
        "<!-- test -->\n```graphql\n{ nosuchfield }\n```\n\n"
        "<!-- test: as $PATIENT -->\n```graphql\n"
        'mutation { dispensePrescription(id: "rx_none", expectedVersion: 1) {\n'
        "  __typename ... on Error { message } } }\n```\n\n"
        "<!-- test: lines 3 -->\n```sh\necho one; echo two\n```\n",
    )

    for block in page.marked:
        with pytest.raises(BlockFailed) as failure:
            probe.run(block)
        probe.outcomes[block.where] = str(failure.value)

    assert "nosuchfield" in probe.outcomes["errors.md:2"]
    assert probe.outcomes["errors.md:7"].startswith("operation 1: Forbidden:")
    assert probe.outcomes["errors.md:13"].startswith("printed 2 of 3 lines")
