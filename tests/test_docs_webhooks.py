"""The examples of docs/partners.md "Webhooks", run against real deliveries: a gateway process
(uvicorn) over the suite's database, the page's createWebhookEndpoint with its URL pointed at a
real receiver on loopback, and real prescriptions whose events are delivered to it.

- The Python snippet (```python) is the receiver's handler, as written: run under uvicorn with
  `SECRET` set and stand-ins for the two functions it leaves to the reader (`already_processed`,
  `handle`), which record what it did.
- The JavaScript snippet (```js) runs under `node`, with `standardwebhooks` and `express`
  installed from the npm registry into a temporary directory by the fixture (skipped, saying
  why, only when npm or the registry cannot be reached).
- The delivery's shape (```http): every header it names and every JSON key it shows is in a
  real delivery.
- The replay and the later proof (```graphql) and the offline check (```sh, with `rxledger` on
  PATH and `jq`) run with the example's ids, leaf indices and key replaced by real ones.

The blocks are found by their language within the "## Webhooks" section, so the page's text is
what runs; tests/test_docs.py runs the page's marked blocks."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_subscriptions
import uvicorn
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from test_docs import Block, read_page
from test_subscriptions import Gateway, graphql, http_client
from test_webhooks import CREATE, FAST, lifecycle
from webhook_receiver import free_port

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "partners.md"
NPM_PACKAGES = ("standardwebhooks@1", "express@4")

start_gateway = test_subscriptions.start_gateway


def webhook_blocks() -> list[Block]:
    """The fenced blocks of the page's "## Webhooks" section, in order."""
    text = PAGE.read_text()
    lines = text.split("\n")
    start = lines.index("## Webhooks") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return [b for b in read_page("docs/partners.md", text).blocks if start < b.line <= end]


# The blocks the tests below run, by language and a text each holds: every fenced block of the
# section must be one of them (test_every_block_of_the_section_is_run_here).
RUNS = {
    ("graphql", "createWebhookEndpoint"),
    ("python", "Webhook(SECRET)"),
    ("http", "webhook-signature"),
    ("graphql", "replayWebhooks"),
    ("sh", "rxledger verify"),
    ("graphql", "inclusionProof"),
    ("js", "standardwebhooks"),
}


def the_block(info: str, containing: str = "") -> Block:
    assert (info, containing) in RUNS, f"add ({info!r}, {containing!r}) to RUNS"
    found = [b for b in webhook_blocks() if b.info == info and containing in b.text]
    assert len(found) == 1, f"want one ```{info} block with {containing!r}, found {len(found)}"
    return found[0]


@dataclass
class Hook:
    """A receiver on loopback whose /rxledger route is handed to `handler` once set; it
    records each request and the status answered."""

    port: int = field(default_factory=free_port)
    handler: Callable[[Request], Awaitable[Response]] | None = None
    requests: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/rxledger"

    async def route(self, request: Request) -> Response:
        body = await request.body()
        if self.handler is None:
            return Response(status_code=503)
        response = await self.handler(request)
        self.requests.append((dict(request.headers), body, response.status_code))
        return response


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    h = Hook()
    app = Starlette(routes=[Route("/rxledger", h.route, methods=["POST"])])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=h.port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the receiver did not start"
        await asyncio.sleep(0.02)
    yield h
    server.should_exit = True
    await task


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        await asyncio.sleep(0.05)


async def run_graphql_block(
    client: httpx.AsyncClient, gw: Gateway, text: str, token: str
) -> dict[str, Any]:
    data = await graphql(client, gw, text, token)
    for value in data.values():
        assert not (isinstance(value, dict) and value.get("message")), value
    return data


def signed_headers(headers: dict[str, str]) -> dict[str, str]:
    """A delivery's own headers, as they came."""
    keep = ("webhook-id", "webhook-timestamp", "webhook-signature", "content-type")
    return {k: v for k, v in headers.items() if k in keep}


def test_every_block_of_the_section_is_run_here() -> None:
    blocks = webhook_blocks()
    ran = {b.where: [key for key in RUNS if b.info == key[0] and key[1] in b.text] for b in blocks}

    # Those tests/test_docs.py does not run (no `test` marker) are each one run here.
    unmarked = [b for b in blocks if b.marker is None]
    assert [b.where for b in unmarked if len(ran[b.where]) != 1] == []
    assert [b.where for b in blocks if len(ran[b.where]) > 1] == []
    assert sorted(key for keys in ran.values() for key in keys) == sorted(RUNS)
    assert [
        b.where for b in unmarked if b.exemption != ("run by", "tests/test_docs_webhooks.py")
    ] == []


async def test_the_python_snippet_verifies_real_deliveries_and_the_examples_hold(
    start_gateway, hook: Hook, tmp_path: Path
):
    gw = await start_gateway(**FAST)
    partner = gw.token("PARTNER", "partner-a", "ph-A")
    handled: list[tuple[str, dict[str, Any]]] = []
    asked: list[str] = []  # the webhook-ids the snippet asked about
    processed: set[str] = set()

    def already_processed(webhook_id: str) -> bool:
        asked.append(webhook_id)
        return webhook_id in processed

    def handle(kind: str, data: dict[str, Any]) -> None:
        handled.append((kind, data))
        processed.add(asked[-1])

    async with http_client(2) as client:
        # The page's createWebhookEndpoint, at the receiver: DISPENSED and DELIVERED only.
        create = the_block("graphql", "createWebhookEndpoint").text.replace(
            "https://hooks.example-pharmacy.com/rxledger", hook.url
        )
        created = (await run_graphql_block(client, gw, create, partner))["createWebhookEndpoint"]
        assert created["__typename"] == "WebhookEndpointCreated", created
        endpoint = created["endpoint"]["id"]
        snippet = the_block("python", "Webhook(SECRET)")
        namespace: dict[str, Any] = {
            "SECRET": created["secret"],
            "Response": Response,
            "already_processed": already_processed,
            "handle": handle,
        }
        exec(compile(snippet.text, snippet.where, "exec"), namespace)
        hook.handler = namespace["rxledger_hook"]

        rx = await lifecycle(client, gw, "ph-A", "pt-1")
        await wait_until(lambda: len(hook.requests) == 2, "the dispensed and delivered events")
        assert [(kind, data["prescriptionId"]) for kind, data in handled] == [
            ("prescription.dispensed", rx),
            ("prescription.delivered", rx),
        ]
        assert [status for _, _, status in hook.requests] == [204, 204]

        # The delivery's shape, as the page shows it.
        headers, body, _ = hook.requests[0]
        example = the_block("http", "webhook-signature").text
        head, _, shown = example.partition("\n\n")
        for line in head.split("\n")[1:]:
            assert line.split(":")[0] in headers, line
        delivered = json.loads(body)
        keys = set(delivered) | set(delivered["data"]) | set(delivered["data"]["receipt"])
        assert set(re.findall(r'"(\w+)":', shown)) <= keys
        assert '{"type":"prescription.dispensed",' in shown
        assert delivered["type"] == "prescription.dispensed"

        # A body changed on the way is refused, and not handled.
        changed = body.replace(b'"DISPENSED"', b'"CANCELLED"', 1)
        refused = await client.post(hook.url, content=changed, headers=signed_headers(headers))
        assert refused.status_code == 400 and len(handled) == 2
        del hook.requests[2:]

        # The page's replay, once a checkpoint covers both leaves: sent again with their
        # webhook-ids (the snippet answers 200, handling nothing twice) and now their proofs.
        last = max(data["leafIndex"] for _, data in handled)
        await covered(client, gw, last)
        replay = (
            the_block("graphql", "replayWebhooks")
            .text.replace("whep_…", endpoint)
            .replace("afterLeafIndex: 1206", "afterLeafIndex: -1")
        )
        replayed = (await run_graphql_block(client, gw, replay, partner))["replayWebhooks"]
        assert replayed["__typename"] == "WebhookEndpoint" and replayed["state"] == "ACTIVE"
        await wait_until(lambda: len(hook.requests) == 4, "the replay")
        assert [status for _, _, status in hook.requests[2:]] == [200, 200]
        assert [h["webhook-id"] for h, _, _ in hook.requests[2:]] == [
            h["webhook-id"] for h, _, _ in hook.requests[:2]
        ]
        assert len(handled) == 2

        # The page's offline check, on the replayed delivery as it came.
        replayed_body = hook.requests[2][1]
        (tmp_path / "delivery.json").write_bytes(replayed_body)
        key = (await graphql(client, gw, "{ ledger { verifierKey } }"))["ledger"]["verifierKey"]
        offline = the_block("sh", "rxledger verify").text.replace(
            "rxledger.local+1a2b3c4d+AbC…", key
        )
        leaf = json.loads(replayed_body)["data"]["leafIndex"]
        ran = run_sh(offline, tmp_path)
        assert ran.stdout.startswith(f"OK: leaf {leaf} is included"), ran.stdout + ran.stderr

        # The page's query for a proof fetched later: its leaf is the leaf delivered.
        later = the_block("graphql", "inclusionProof").text.replace(
            "leafIndex: 1207", f"leafIndex: {leaf}"
        )
        bundle = (await run_graphql_block(client, gw, later, partner))["ledger"]["inclusionProof"][
            "bundle"
        ]
        bundle = json.loads(bundle) if isinstance(bundle, str) else bundle
        assert bundle["leaf"] == json.loads(replayed_body)["data"]["leaf"]


async def covered(client: httpx.AsyncClient, gw: Gateway, leaf: int) -> None:
    """Wait until a signed checkpoint covers `leaf`."""
    deadline = time.monotonic() + 60
    while True:
        cp = (await graphql(client, gw, "{ ledger { checkpoint { size } } }"))["ledger"][
            "checkpoint"
        ]
        if cp is not None and cp["size"] > leaf:
            return
        assert time.monotonic() < deadline, f"no checkpoint covers leaf {leaf}"
        await asyncio.sleep(0.1)


def run_sh(text: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert shutil.which("jq"), "the offline example needs jq (apt-get install jq)"
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    ran = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", text],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return ran


# --- JavaScript -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory with the snippet's packages installed from the npm registry."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed: the JavaScript snippet cannot run")
    where = tmp_path_factory.mktemp("npm")
    (where / "package.json").write_text('{"private": true}\n')
    try:
        installed = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent", *NPM_PACKAGES],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("npm install did not finish within 300 s: is the npm registry reachable?")
    if installed.returncode != 0:
        if re.search(r"ENOTFOUND|ECONNREFUSED|ETIMEDOUT|EAI_AGAIN|network", installed.stderr):
            pytest.skip(f"the npm registry is unreachable: {installed.stderr.strip()[-300:]}")
        pytest.fail(f"npm install {' '.join(NPM_PACKAGES)} failed:\n{installed.stderr}")
    yield where


# The snippet leaves `alreadyProcessed` and `handle` to the reader, and does not listen.
JS_BEFORE = """\
const processed = new Set();
let asked;  // the webhook-id the snippet asked about last
function alreadyProcessed(id) { asked = id; return processed.has(id); }
function handle(type, data) {
  processed.add(asked);
  console.log(JSON.stringify({ type, data }));
}
"""
JS_AFTER = """
app.listen(Number(process.env.PORT), "127.0.0.1", () => console.log("listening"));
"""


async def test_the_javascript_snippet_verifies_real_deliveries(start_gateway, node_modules: Path):
    gw = await start_gateway(**FAST)
    partner = gw.token("PARTNER", "partner-a", "ph-A")
    port = free_port()
    url = f"http://127.0.0.1:{port}/rxledger"
    async with http_client(2) as client:
        created = (await graphql(client, gw, CREATE, partner, url=url))["createWebhookEndpoint"]
        assert created["__typename"] == "WebhookEndpointCreated", created
        endpoint = created["endpoint"]["id"]
        snippet = the_block("js", "standardwebhooks")
        script = node_modules / "receiver.mjs"
        script.write_text(JS_BEFORE + snippet.text + JS_AFTER)
        node = await asyncio.create_subprocess_exec(
            "node",
            str(script),
            cwd=node_modules,
            env={
                **os.environ,
                "PORT": str(port),
                "RXLEDGER_WEBHOOK_SECRET": created["secret"],
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert node.stdout is not None and node.stderr is not None
        try:
            first = await asyncio.wait_for(node.stdout.readline(), 30)
            assert first == b"listening\n", first + await node.stderr.read()
            rx = await lifecycle(client, gw, "ph-A", "pt-1")
            handled = []
            for _ in range(5):
                line = await asyncio.wait_for(node.stdout.readline(), 60)
                handled.append(json.loads(line))
            assert [(h["type"], h["data"]["prescriptionId"]) for h in handled] == [
                (f"prescription.{s}", rx)
                for s in ("issued", "dispensed", "in_transit", "delivered", "confirmed")
            ]
            # A forged delivery is refused; a repeat of a real one is answered 200, not handled.
            body = json.dumps({"type": "prescription.issued", "data": handled[0]["data"]})
            at = dt.datetime.now(dt.UTC)
            forged = Webhook("whsec_" + "A" * 32).sign("msg_forged", at, body)
            refused = await client.post(
                url,
                content=body,
                headers={
                    "content-type": "application/json",
                    "webhook-id": "msg_forged",
                    "webhook-timestamp": str(int(at.timestamp())),
                    "webhook-signature": forged,
                },
            )
            assert refused.status_code == 400
            replay = (await graphql(client, gw, REPLAY_ALL, partner, id=endpoint))["replayWebhooks"]
            assert replay["__typename"] == "WebhookEndpoint", replay
            attempts = await wait_for_successes(client, gw, partner, endpoint, 10)
            assert [a["httpStatus"] for a in attempts[-5:]] == [200] * 5
            assert [a["httpStatus"] for a in attempts[:5]] == [204] * 5
        finally:
            node.terminate()
            await node.wait()
        assert await node.stdout.read() == b"", "the snippet handled a repeat or a forgery"


REPLAY_ALL = """mutation($id: ID!) {
  replayWebhooks(endpointId: $id, afterLeafIndex: -1) { __typename ... on Error { message } }
}"""
ATTEMPTS = """query($id: ID!) {
  webhookDeliveries(endpointId: $id, first: 100) { nodes { result httpStatus leafIndex } }
}"""


async def wait_for_successes(
    client: httpx.AsyncClient, gw: Gateway, token: str, endpoint: str, count: int
) -> list[dict[str, Any]]:
    """The endpoint's attempts, oldest first, once `count` of them succeeded."""
    deadline = time.monotonic() + 60
    while True:
        nodes = (await graphql(client, gw, ATTEMPTS, token, id=endpoint))["webhookDeliveries"][
            "nodes"
        ][::-1]
        if sum(n["result"] == "success" for n in nodes) >= count:
            return nodes
        assert time.monotonic() < deadline, f"want {count} successes, have {nodes}"
        await asyncio.sleep(0.1)
