"""The docs run: every fenced block of README.md and docs/*.md is run, in order, against a real
gateway (uvicorn, FerretDB, real JWTs minted by the documented `rxledger token`), or says why
not, so the docs cannot quietly rot.

The marker is an HTML comment on the line right before a fenced block (GitHub does not render
it; it is plain in the source). Its clauses are separated by `;`:

    <!-- test -->                  run the block
    <!-- test: as $PRESCRIBER -->  (```graphql) send its operations with the bearer token that
                                   an earlier block exported as PRESCRIBER; with several names
                                   (`as $COURIER $PATIENT`), one per operation, in order
    <!-- test: lines 5 -->         (```sh, ```python) a command that keeps running (a
                                   subscription): it passes once it has printed 5 lines on
                                   stdout, then it is stopped
    <!-- test: until TEXT -->      (```sh) the same, until a line of stdout or stderr holds TEXT
    <!-- test: while writing -->   (with `lines` or `until`) a prescription for pharmacy-1 is
                                   filed every half second meanwhile, for streams that start
                                   with the next event
    <!-- test: with --sizes 60 --repeats 1 -->
                                   (```sh) each command run with these options' values, set or
                                   added: a benchmark at a tiny size
    <!-- test: serves /readyz -->  (```sh) a server started the way `make run` starts one, with
                                   free PORT and DB_PORT and neither MONGODB_URI nor RXLEDGER_*
                                   settings: it passes once GET /readyz on PORT answers 200;
                                   then it is stopped, and its FerretDB with `make db-stop`
    <!-- test: witnessed by $W1 -->
                                   (```sh) first restart the gateway with RXLEDGER_WITNESSES set
                                   to the witness key an earlier block exported as W1

A block that is not run here says why, and only these three ways:

    <!-- not run: REASON -->       sample output, a file format, a diagram, an example
                                   response: never a command or a query
    <!-- cannot run here: REASON -->
                                   a command this machine cannot run at all (no Docker engine)
                                   or that must not run inside the suite (`make test`)
    <!-- run by: tests/FILE.py -->   a block another test runs (one that needs more than a
                                   gateway: a webhook receiver, node); FILE must exist and name
                                   the page, and it checks that it runs every such block

A block is a command or a query when it is ```sh, ```graphql, ```python, ```js (and the like),
or when one of its lines starts with `rxledger`, `.venv/bin/...`, `curl`, `make`, `python` or
`docker` (after any VAR=value). Every block is marked.

How a marked block runs:

- ```sh: with `bash -e -o pipefail`, in one scratch directory for the whole run (it stands for
  the repository: links to its `scripts/`, `bench/`, `Makefile`, `pyproject.toml` and `.venv`),
  with the test gateway's environment (MONGODB_URI, RXLEDGER_DB, RXLEDGER_VAR_DIR, ...:
  `rxledger token`, `verifier-key` and `export-proof` use the gateway's log and keys) and the
  project's `rxledger` on PATH. What a block exports, later blocks see (the walkthrough exports
  the tokens). It fails on a non-zero exit status.
- ```python: the same, with the Python running the tests (`python -c`).
- ```graphql: each operation of the block, in order, is POSTed to /graphql; a subscription is
  sent over a real WebSocket (graphql-transport-ws) and passes with its first event. It fails
  on an HTTP status other than 200, on `errors`, and on a result-union member that is an error
  (an object with a `__typename` and a `message`).

Before it runs, a block's text has `http://127.0.0.1:8000`, `ws://127.0.0.1:8000` and
`https://rx.example.org` replaced by the test gateway's address; `https://mirror.example.org`
by a `python -m http.server` serving the scratch directory's `srv/rx-mirror/` (so
`/srv/rx-mirror/log` is served as `https://mirror.example.org/log`); the production paths
`/etc/rxledger/`, `/srv/` and `/var/lib/` by directories of the scratch directory; `bench/`
and `scripts/` by the repository's own; `.venv/bin/` by the directory of the Python running
the tests; and `rx_…` by the id of the prescription the newest tested `issuePrescription`
returned.

Pages run in the order of PAGES (README.md, then docs/ alphabetically) against one gateway and
one database: the walkthrough's prescription is the one later pages list, export and follow.
Before each block the test waits until the log has sequenced every event and a signed checkpoint
covers it (a second or so for a reader; `integrity` is VERIFIED by then). A failing block stops
the run; the blocks after it are reported as not run.

A marker must stand right before a fence and say only the words above.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Databases
from graphql import OperationDefinitionNode, OperationType, parse
from test_gateway import env_for, free_port, running_gateway
from ws_client import GraphQLSocket, ProtocolError

from anchoring.keys import parse_key_set
from anchoring.note import open_checkpoint, parse_verifier_key

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

MARKER = re.compile(r"^\s*<!--\s*test\b(?::(?P<words>.*?))?\s*-->\s*$")
EXEMPTION = re.compile(
    r"^\s*<!--\s*(?P<kind>not run|cannot run here|run by):\s*(?P<reason>.*?)\s*-->\s*$"
)
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>[^`]*)$")
HEADING = re.compile(r"^## (?P<title>.*)$")
COMMAND_LANGUAGES = {"sh", "bash", "shell", "console", "graphql", "python", "js", "javascript"}
RUNNABLE = ("sh", "graphql", "python")
COMMAND_START = re.compile(
    r"^\s*(?:[A-Z_]+=\S*\s+)*(rxledger\s|\.venv/bin/|curl\s|make(\s|$)|python3?\s|docker\s)"
)
# Sections whose unmarked blocks another piece of work (issue 13's webhook docs) runs: their
# blocks need no marker here until that work is merged, which removes its entry.
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
    exemption: tuple[str, str] | None = None  # (kind: not run, cannot run here, run by; why)
    section: str = ""  # the title of the `## ` heading the block is under

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass(frozen=True)
class Plan:
    """What a marker asks for."""

    tokens: tuple[str, ...] = ()
    lines: int | None = None
    until: str | None = None  # keeps running until a line of its output contains this
    serves: str | None = None  # a server: until GET this path answers 200
    options: tuple[tuple[str, str], ...] = ()  # `with --opt VALUE`: set in each command
    writing: bool = False  # `while writing`: prescriptions are filed while it runs
    witness: str | None = None  # `witnessed by $W`: the gateway accepts that witness key


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
    return any(COMMAND_START.match(x) for x in block.text.splitlines())


def read_page(name: str, text: str) -> Page:
    lines = text.split("\n")
    blocks: list[Block] = []
    problems: list[str] = []
    # a marker waiting for its fence: (line, test words or None, exemption or None)
    pending: tuple[int, str | None, tuple[str, str] | None] | None = None
    section = ""
    i = 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        exemption = EXEMPTION.match(lines[i])
        fence = FENCE.match(lines[i])
        if heading := HEADING.match(lines[i]):
            section = heading["title"].strip()
        if marker or exemption:
            if pending is not None:
                problems.append(f"{name}:{pending[0]}: marker not followed by a fenced block")
            if marker:
                pending = (i + 1, (marker["words"] or "").strip(), None)
            else:
                assert exemption is not None
                if not exemption["reason"]:
                    problems.append(f"{name}:{i + 1}: `{exemption['kind']}:` without a reason")
                pending = (i + 1, None, (exemption["kind"], exemption["reason"]))
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
            words, exempt = (None, None)
            if pending is not None and pending[0] == i:
                words, exempt = pending[1], pending[2]
            if pending is not None and pending[0] != i:
                problems.append(f"{name}:{pending[0]}: marker not followed by a fenced block")
            blocks.append(Block(name, i + 1, info, body + "\n", words, exempt, section))
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


def unaccounted(page: Page) -> list[str]:
    """The blocks of the page that are neither run nor say, rightly, why not: unmarked ones,
    commands and queries marked `not run`, `cannot run here` on what is no command, and `run
    by` a file that does not exist or does not name the page."""
    found = []
    for block in page.blocks:
        if block.marker is not None:
            continue
        if block.exemption is None:
            found.append(f"{block.where}: neither marked for testing nor `not run: why`")
        elif block.exemption[0] == "run by":
            runner = ROOT / block.exemption[1]
            if not (
                block.exemption[1].startswith("tests/")
                and runner.is_file()
                and page.path in runner.read_text()
            ):
                found.append(f"{block.where}: `run by` {block.exemption[1]}, no test of this page")
        elif block.exemption[0] == "not run" and shows_commands(block):
            found.append(f"{block.where}: a command or query is never `not run`; run it")
        elif block.exemption[0] == "cannot run here" and not shows_commands(block):
            found.append(f"{block.where}: `cannot run here` on what is no command: `not run`")
    return found


OPTION = re.compile(r"--[a-z][a-z0-9-]*")


def plan_of(block: Block) -> Plan:
    """The marker's clauses (separated by `;`), checked: `as $A [$B ...]` for GraphQL;
    `lines N`, `until TEXT`, `serves /PATH`, `with --OPT VALUE ...`, `while writing` and
    `witnessed by $W` for shell; `lines N` for Python."""
    if block.info not in RUNNABLE:
        raise ValueError(f"a marked block must be ```{', ```'.join(RUNNABLE)}, not ```{block.info}")
    text = (block.marker or "").strip()
    clauses = [c.strip() for c in text.split(";")] if text else []
    found: dict[str, Any] = {}
    for clause in clauses:
        words = clause.split()
        wrong = ValueError(f"marker words {clause!r} are not understood for ```{block.info}")
        if not words:
            raise wrong
        head, rest = words[0], words[1:]
        if head == "as" and block.info == "graphql" and rest:
            if not all(re.fullmatch(r"\$[A-Z_][A-Z0-9_]*", w) for w in rest):
                raise wrong
            found["tokens"] = tuple(w[1:] for w in rest)
        elif head == "lines" and block.info in ("sh", "python") and len(rest) == 1:
            if not rest[0].isdigit():
                raise wrong
            found["lines"] = int(rest[0])
        elif head == "until" and block.info == "sh" and rest:
            found["until"] = " ".join(rest)
        elif head == "serves" and block.info == "sh" and len(rest) == 1 and rest[0][:1] == "/":
            found["serves"] = rest[0]
        elif head == "with" and block.info == "sh" and rest and len(rest) % 2 == 0:
            pairs = tuple(zip(rest[::2], rest[1::2], strict=True))
            if not all(OPTION.fullmatch(option) for option, _ in pairs):
                raise wrong
            found["options"] = pairs
        elif words == ["while", "writing"] and block.info == "sh":
            found["writing"] = True
        elif words[:2] == ["witnessed", "by"] and block.info == "sh" and len(words) == 3:
            if not re.fullmatch(r"\$[A-Z_][A-Z0-9_]*", words[2]):
                raise wrong
            found["witness"] = words[2][1:]
        else:
            raise wrong
    plan = Plan(**found)
    if sum(x is not None for x in (plan.lines, plan.until, plan.serves)) > 1:
        raise ValueError("a marker says at most one of `lines N`, `until TEXT`, `serves /PATH`")
    if plan.writing and plan.lines is None and plan.until is None:
        raise ValueError("`while writing` goes with `lines N` or `until TEXT`")
    return plan


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
    mirror: str | None = (
        None  # the static server of work/srv/rx-mirror (https://mirror.example.org)
    )
    restart: Callable[[dict[str, str]], str] | None = None  # the gateway with more settings

    def substitute(self, text: str) -> str:
        ws = self.base.replace("http://", "ws://", 1)
        text = text.replace("http://127.0.0.1:8000", self.base)
        text = text.replace("ws://127.0.0.1:8000", ws)
        text = text.replace("https://rx.example.org", self.base)
        if self.mirror is not None:
            text = text.replace("https://mirror.example.org", self.mirror)
        text = PRODUCTION_PATH.sub(lambda m: f"{self.work}/{m[1]}/", text)
        text = TOOL_PATH.sub(lambda m: f"{ROOT}/{m[1]}/", text)
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
        if plan.witness is not None:
            self.trust_witness(plan.witness)
        self.settle()
        text = self.substitute(block.text)
        if plan.options:
            text = with_options(text, plan.options)
        if block.info == "graphql":
            self.run_graphql(text, plan)
        elif block.info == "python":
            command = [sys.executable, "-c", text]
            if plan.lines is not None:
                self.run_stream(command, plan)
            else:
                self.run_program(command)
        elif plan.serves is not None:
            self.run_server(text, plan.serves)
        elif plan.lines is not None or plan.until is not None:
            self.run_stream(["bash", "-e", "-o", "pipefail", "-c", text], plan)
        else:
            self.run_shell(text)

    def trust_witness(self, name: str) -> None:
        """Restart the gateway with RXLEDGER_WITNESSES set to the key an earlier block exported
        as `name`, as the log's operator does for a new witness."""
        key = self.env.get(name)
        if not key:
            raise BlockFailed(f"no earlier block exported ${name}")
        if self.restart is None:
            raise BlockFailed("this session cannot restart its gateway")
        self.base = self.restart({"RXLEDGER_WITNESSES": key})

    def run_program(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        """Run `command` to its end in the scratch directory; BlockFailed unless it exits 0."""
        result = subprocess.run(
            command,
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
        return result

    def run_shell(self, text: str) -> None:
        state = self.work / ".exported"
        state.unlink(missing_ok=True)
        script = f"{text}\nenv -0 > {state}\n"
        self.run_program(["bash", "-e", "-o", "pipefail", "-c", script])
        exported = dict(
            entry.split("=", 1) for entry in state.read_text().split("\0") if "=" in entry
        )
        for noise in ("_", "PWD", "OLDPWD", "SHLVL"):
            exported.pop(noise, None)
        self.env = exported

    def run_stream(self, command: list[str], plan: Plan) -> None:
        """A command that keeps running: it passes once it has printed `plan.lines` lines on
        stdout, or a line containing `plan.until` on stdout or stderr; then it is stopped."""
        errors = self.work / ".stream-stderr"
        with errors.open("wb") as stderr:
            proc = subprocess.Popen(
                command,
                cwd=self.work,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if plan.until is not None else stderr,
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

        def done() -> bool:
            if plan.until is not None:
                return any(plan.until in line for line in got)
            assert plan.lines is not None
            return len(got) >= plan.lines

        threading.Thread(target=pump, daemon=True).start()
        stop_writing = threading.Event()
        writer = Writer(self, stop_writing) if plan.writing else None
        if writer is not None:
            writer.start()
        got: list[str] = []
        deadline = time.monotonic() + STREAM_TIMEOUT
        try:
            while not done():
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if line is None:
                    break
                got.append(line)
        finally:
            stop_writing.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            if writer is not None:
                writer.join(10)
        if not done():
            if plan.lines is not None:
                short = f"printed {len(got)} of {plan.lines} lines within {STREAM_TIMEOUT:.0f} s"
            else:
                short = f"printed no line with {plan.until!r} within {STREAM_TIMEOUT:.0f} s"
            wrote = f"\nwrites meanwhile: {writer.report()}" if writer is not None else ""
            raise BlockFailed(
                f"{short}\nstdout: {''.join(got)[-2000:]}\nstderr: {errors.read_text()[-2000:]}"
                f"{wrote}"
            )

    def run_server(self, text: str, path: str) -> None:
        """A block that starts a server the way `make run` does: with free PORT and DB_PORT
        and neither MONGODB_URI nor RXLEDGER_* settings (it starts its own FerretDB, as on a
        fresh checkout); it passes once GET http://127.0.0.1:PORT/PATH answers 200. Then it is
        stopped, and its database server with `make db-stop`."""
        env = {
            k: v
            for k, v in self.env.items()
            if k != "MONGODB_URI" and not k.startswith("RXLEDGER_")
        }
        port = free_port()
        env.update(PORT=str(port), DB_PORT=str(free_port()))
        url = f"http://127.0.0.1:{port}{path}"
        output = self.work / ".server-output"
        with output.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-e", "-o", "pipefail", "-c", text],
                cwd=self.work,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        answered: int | None = None
        try:
            deadline = time.monotonic() + BLOCK_TIMEOUT
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    answered = httpx.get(url, timeout=5).status_code
                except httpx.HTTPError:
                    answered = None
                if answered == 200:
                    break
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            stopped = subprocess.run(
                ["make", "db-stop"],
                cwd=self.work,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        if answered != 200:
            raise BlockFailed(
                f"GET {url} answered {answered} (exit status {proc.returncode})\n"
                f"output: {output.read_text()[-3000:]}"
            )
        if stopped.returncode != 0:
            raise BlockFailed(
                f"make db-stop failed: {stopped.stdout[-1000:]}{stopped.stderr[-1000:]}"
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
            token: str | None = None
            if tokens:
                token = self.env.get(tokens[n])
                if not token:
                    raise BlockFailed(f"no earlier block exported ${tokens[n]}")
                headers["Authorization"] = f"Bearer {token}"
            if operation.operation == OperationType.SUBSCRIPTION:
                self.run_subscription(n, query, token)
                continue
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

    def run_subscription(self, n: int, query: str, token: str | None) -> None:
        """A subscription, over a real WebSocket (graphql-transport-ws): it passes once its first
        event arrives, without errors and without an error result."""

        async def first_event() -> dict[str, Any]:
            socket = await GraphQLSocket.open(self.base, token)
            try:
                await socket.subscribe("1", query)
                async for data in socket.events("1", timeout=STREAM_TIMEOUT):
                    return data
                raise BlockFailed(f"operation {n + 1}: the subscription ended without an event")
            finally:
                await socket.close()

        try:
            data = asyncio.run(first_event())
        except (ProtocolError, TimeoutError, OSError) as exc:
            raise BlockFailed(f"operation {n + 1}: {type(exc).__name__}: {exc}") from None
        for typename, message in error_results(data):
            raise BlockFailed(f"operation {n + 1}: {typename}: {message}")


# The repository's tools by their own paths: tests/notablescan.py tells their reads from the
# product's by where their code lies.
TOOL_PATH = re.compile(r"(?<![\w.~/-])(bench|scripts)/")
PRODUCTION_PATH = re.compile(r"(?<![\w.~/-])/(etc/rxledger|srv|var/lib)/")
ISSUE = """mutation { issuePrescription(input: {patient: {id: "patient-7", name: "Rui Costa"},
  pharmacy: "pharmacy-1", medications: [{code: "N02BE01", name: "Paracetamol", dose: "500 mg",
  quantity: 10}]}) { __typename ... on Error { message } } }"""


class Writer(threading.Thread):
    """`while writing`: files a prescription for pharmacy-1 every half second until stopped, so
    that a stream that starts with the next event has one to show."""

    def __init__(self, session: Session, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.base, self.env, self.stop = session.base, session.env, stop
        self.written = 0
        self.failures: list[str] = []

    def run(self) -> None:
        try:
            token = subprocess.run(
                [
                    "rxledger",
                    "token",
                    "--role",
                    "PRESCRIBER",
                    "--sub",
                    "dr-docs",
                    "--org",
                    "ward-9",
                ],
                env=self.env,
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.split()[0]
            while not self.stop.is_set():
                r = httpx.post(
                    f"{self.base}/graphql",
                    json={"query": ISSUE},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=10,
                )
                answer = r.json() if r.status_code == 200 else {}
                issued = (answer.get("data") or {}).get("issuePrescription") or {}
                if issued.get("__typename") == "Prescription":
                    self.written += 1
                else:
                    self.failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
                self.stop.wait(0.5)
        except (subprocess.SubprocessError, httpx.HTTPError, IndexError) as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")

    def report(self) -> str:
        return f"{self.written} prescriptions filed; failures: {self.failures[:3] or 'none'}"


def with_options(text: str, options: tuple[tuple[str, str], ...]) -> str:
    """`with --opt VALUE ...`: in each command of the block (a line, with its continuation
    lines joined), the option's value replaced, or the option added before a trailing comment."""
    text = re.sub(r"\s*\\\n\s*", " ", text)
    lines = []
    for line in text.split("\n"):
        if not line.strip() or line.lstrip().startswith("#"):
            lines.append(line)
            continue
        command, _, comment = line.partition(" #")
        command = command.rstrip()
        for option, value in options:
            given = re.compile(rf"(?<!\S){re.escape(option)}(?:=|\s+)(?:'[^']*'|\"[^\"]*\"|\S+)")
            wanted = f"{option} {shlex.quote(value)}"
            if given.search(command):
                command = given.sub(wanted.replace("\\", "\\\\"), command)
            else:
                command = f"{command} {wanted}"
        lines.append(command + (f"  #{comment}" if comment else ""))
    return "\n".join(lines)


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
    # The scratch directory stands for the repository (`make run` runs in it) and for the
    # production paths the docs name (/etc/rxledger/, /srv/, /var/lib/: see Session.substitute).
    for name in ("scripts", "bench", "Makefile", "pyproject.toml"):
        (work / name).symlink_to(ROOT / name)
    (work / ".venv").symlink_to(Path(sys.executable).parent.parent)
    for directory in ("etc/rxledger", "srv/rx-mirror", "var/lib/witness"):
        (work / directory).mkdir(parents=True)
    # Webhook endpoints of the examples name hosts this machine need not resolve.
    environment = env_for(
        mongo_uri,
        databases.new(),
        tmp,
        RXLEDGER_MODE="development",
        RXLEDGER_WEBHOOK_ALLOW_PRIVATE="1",
    )
    with ExitStack() as stack:
        mirror = static_server(work / "srv" / "rx-mirror", stack)
        gateway = ExitStack()
        stack.callback(lambda: gateway.close())
        base = gateway.enter_context(running_gateway(environment, tmp / "gateway.log"))

        def restart(settings: dict[str, str]) -> str:
            nonlocal gateway
            gateway.close()
            environment.update(settings)
            gateway = ExitStack()
            return gateway.enter_context(running_gateway(environment, tmp / "gateway-2.log"))

        shell_env = dict(environment)
        shell_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
        yield Session(base, shell_env, work, mirror=mirror, restart=restart)


def static_server(directory: Path, stack: ExitStack) -> str:
    """`python -m http.server` serving `directory`, as a static mirror is served; its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "--directory",
            directory,
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(proc.wait, 10)
    stack.callback(proc.terminate)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


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


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_every_block_is_run_or_says_why_not(path: Path) -> None:
    assert unaccounted(load(path)) == []


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
        "<!-- test: lines -->\n```sh\nx\n```\n<!-- test -->\n```js\nx\n```\n",
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


def test_a_block_neither_run_nor_rightly_excused_is_refused() -> None:
    page = read_page(
        "p.md",
        "# P\n\n```\nsome output\n```\n\n"
        "<!-- not run: sample output -->\n```\nOK: 3 entries\n```\n\n"
        "<!-- not run: slow -->\n```sh\nrxledger audit\n```\n\n"
        "<!-- not run: a file -->\n```\nFOO=1 rxledger serve\n```\n\n"
        "<!-- cannot run here: no such engine -->\n```sh\ndocker compose up\n```\n\n"
        "<!-- cannot run here: no reason really -->\n```json\n{}\n```\n\n"
        "<!-- not run: -->\n```\nx\n```\n",
    )

    assert unaccounted(page) == [
        "p.md:3: neither marked for testing nor `not run: why`",
        "p.md:13: a command or query is never `not run`; run it",
        "p.md:18: a command or query is never `not run`; run it",
        "p.md:28: `cannot run here` on what is no command: `not run`",
    ]
    assert page.problems == ["p.md:32: `not run:` without a reason"]


def test_a_block_run_by_another_test_names_an_existing_test_of_its_page() -> None:
    page = read_page(
        "docs/partners.md",
        "# P\n\n<!-- run by: tests/test_docs_webhooks.py -->\n```js\nverify()\n```\n\n"
        "<!-- run by: tests/no_such_test.py -->\n```js\nverify()\n```\n\n"
        "<!-- run by: tests/test_cli.py -->\n```js\nverify()\n```\n",
    )

    assert unaccounted(page) == [
        "docs/partners.md:9: `run by` tests/no_such_test.py, no test of this page",
        "docs/partners.md:14: `run by` tests/test_cli.py, no test of this page",
    ]


def test_with_sets_each_option_in_each_command_or_adds_it() -> None:
    text = (
        ".venv/bin/python bench/x.py --sizes 10000 --repeats 5    # load average 8\n"
        "# a comment\n"
        "A=b .venv/bin/python bench/x.py \\\n    --sizes=100000\n"
    )

    assert with_options(text, (("--sizes", "60"), ("--repeats", "1"))) == (
        ".venv/bin/python bench/x.py --sizes 60 --repeats 1  # load average 8\n"
        "# a comment\n"
        "A=b .venv/bin/python bench/x.py --sizes 60 --repeats 1\n"
    )


def test_a_marker_asks_for_one_way_of_stopping_and_known_clauses_only() -> None:
    def problems(marker: str, info: str = "sh") -> list[str]:
        return read_page("p.md", f"<!-- test: {marker} -->\n```{info}\nx\n```\n").problems

    assert problems("lines 3; while writing") == []
    assert problems("until cosigned checkpoint; witnessed by $W1") == []
    assert problems("with --sizes 10,20 --reads 2") == []
    assert problems("serves /readyz") == []
    assert problems("lines 3", "python") == []
    assert problems("lines 3; until x") != []
    assert problems("while writing") != []
    assert problems("with --sizes") != []
    assert problems("with sizes 10") != []
    assert problems("serves readyz") != []
    assert problems("witnessed by W1") != []
    assert problems("until x", "graphql") != []


def test_the_sample_checkpoint_verifies_with_the_sample_verifier_key() -> None:
    text = (ROOT / "docs" / "auditors.md").read_text()
    vkey = re.search(r"`(rxledger\.local\+[0-9a-f]{8}\+\S+)`", text)
    sample = next(b for b in load(ROOT / "docs" / "auditors.md").blocks if b.text.startswith("rx"))
    assert vkey is not None

    checkpoint = open_checkpoint(sample.text, [parse_verifier_key(vkey[1])], "rxledger.local/log")

    assert checkpoint.size == 0


def test_the_sample_key_set_parses_as_the_text_around_it_says() -> None:
    page = load(ROOT / "docs" / "operations.md")
    sample = next(b for b in page.blocks if b.text.startswith("# rxledger log keys"))

    keys = parse_key_set(sample.text)

    assert [(k.verifier.name, k.first, k.last) for k in keys.keys] == [
        ("rx.hospital.example", 0, 52000),
        ("rx.hospital.example", 51001, None),
    ]
    assert [k.label for k in keys.for_size(51500)] == [k.label for k in keys.keys]
