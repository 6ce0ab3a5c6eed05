"""A web app on another origin than the gateway, in a real headless Chromium: a page served on
its own port (a small static server started here) runs a mutation and a query, subscribes over
a WebSocket and over the event stream, each against a real gateway that lists its origin; a page
on an origin not listed gets nothing, and its mutation never reaches the gateway.

The page's calls are written as a frontend team would write them (fetch, WebSocket), in
PAGE_SCRIPT; the test runs them in the page and reads what they returned.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import Databases
from selenium import webdriver
from test_audit_page import driver  # noqa: F401  (the module's Chromium)
from test_prescriptions import (
    PRESCRIPTION,
    Gateway,
    Parties,
    launch,
    mutation_document,
    running,
)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ward app</title><script src="app.js"></script></head>
<body><h1>ward app</h1></body></html>
"""

PAGE_SCRIPT = """
"use strict";

// GraphQL over HTTP, with a bearer token: a preflighted cross-origin POST.
async function graphql(gateway, token, query, variables) {
  const response = await fetch(gateway + "/graphql", {
    method: "POST",
    headers: {"Content-Type": "application/json", "Authorization": "Bearer " + token},
    body: JSON.stringify({query, variables}),
  });
  return {status: response.status, body: await response.json()};
}

// The first message of a subscription over graphql-transport-ws.
function websocketEvent(gateway, token, query, variables) {
  return new Promise((resolve) => {
    let opened = false;
    const ws = new WebSocket(gateway.replace("http://", "ws://") + "/graphql",
                             "graphql-transport-ws");
    ws.onopen = () => {
      opened = true;
      ws.send(JSON.stringify({type: "connection_init", payload: {Authorization: "Bearer " + token}}));
    };
    ws.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "connection_ack") {
        ws.send(JSON.stringify({id: "1", type: "subscribe", payload: {query, variables}}));
      } else if (message.type === "next" || message.type === "error") {
        resolve({opened, message});
        ws.close();
      }
    };
    ws.onclose = (event) => resolve({opened, closeCode: event.code});
  });
}

// The first event of the event stream. EventSource cannot send Authorization: fetch reads
// the stream instead.
async function streamedEvent(gateway, token, query) {
  const abort = new AbortController();
  const response = await fetch(gateway + "/events?" + query, {
    headers: {"Authorization": "Bearer " + token}, signal: abort.signal,
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!/event: prescription\\ndata: .*\\n\\n/.test(text)) {
    const {value, done} = await reader.read();
    if (done) break;
    text += value;
  }
  abort.abort();
  return {status: response.status, contentType: response.headers.get("content-type"), text};
}

// A call's outcome, or the error the browser raised instead.
async function outcome(call) {
  try {
    return {ok: await call()};
  } catch (error) {
    return {error: error.name + ": " + error.message};
  }
}
"""

# Runs one of PAGE_SCRIPT's calls in the page; the arguments follow the call's name.
RUN = """
const done = arguments[arguments.length - 1];
const [name, ...args] = Array.from(arguments).slice(0, -1);
outcome(() => window[name](...args)).then(done);
"""

SUBSCRIPTION = """subscription($filter: EventFilter, $after: Int) {
  prescriptionEvents(filter: $filter, afterLeafIndex: $after) { prescriptionId type leafIndex }
}"""


class StaticSite:
    """The ward app's files, served on a port of its own (its own origin)."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StaticSite, StaticSite]]:
    """The ward app on a listed origin, and the same files on an origin not listed."""
    directory = tmp_path_factory.mktemp("ward-app")
    (directory / "index.html").write_text(PAGE)
    (directory / "app.js").write_text(PAGE_SCRIPT)
    listed, unlisted = StaticSite(directory), StaticSite(directory)
    try:
        yield listed, unlisted
    finally:
        listed.close()
        unlisted.close()


@pytest.fixture(scope="module")
def gw(
    mongo_uri: str,
    databases: Databases,
    tmp_path_factory: pytest.TempPathFactory,
    sites: tuple[StaticSite, StaticSite],
) -> Iterator[Gateway]:
    listed, _ = sites
    launched = launch(
        mongo_uri,
        databases.new(),
        tmp_path_factory.mktemp("cors-browser"),
        RXLEDGER_CORS_ORIGINS=f"https://app.hospital.test,{listed.origin}",
    )
    with running(launched) as (gateway,):
        yield gateway


def open_page(browser: webdriver.Chrome, site: StaticSite) -> None:
    browser.get(f"{site.origin}/index.html")
    browser.set_script_timeout(30)
    assert browser.execute_script("return window.origin") == site.origin
    assert browser.execute_script("return typeof graphql") == "function"


def run(browser: webdriver.Chrome, name: str, *args: Any) -> dict[str, Any]:
    result: dict[str, Any] = browser.execute_async_script(RUN, name, *args)
    return result


def issue_document() -> str:
    return mutation_document("issuePrescription", {"input": None})


def test_a_page_on_a_listed_origin_mutates_queries_and_subscribes_over_websocket_and_sse(
    driver,  # noqa: F811
    gw,
    sites,
):
    listed, _ = sites
    p = Parties(gw)
    open_page(driver, listed)

    issued = run(driver, "graphql", gw.base, p.prescriber, issue_document(), {"input": p.input()})
    assert "error" not in issued, issued
    result = issued["ok"]["body"]["data"]["issuePrescription"]
    assert result["__typename"] == "Prescription", result
    rid = result["id"]

    read = run(driver, "graphql", gw.base, p.pharmacist, PRESCRIPTION, {"id": rid})
    assert "error" not in read, read
    assert read["ok"]["status"] == 200
    prescription = read["ok"]["body"]["data"]["prescription"]
    assert (prescription["id"], prescription["status"]) == (rid, "ISSUED")

    variables = {"filter": {"prescriptionId": rid}, "after": -1}
    socket = run(driver, "websocketEvent", gw.base, p.pharmacist, SUBSCRIPTION, variables)
    assert "error" not in socket, socket
    assert socket["ok"]["opened"] is True, socket
    message = socket["ok"]["message"]
    assert message["type"] == "next", message
    event = message["payload"]["data"]["prescriptionEvents"]
    assert event["prescriptionId"] == rid

    streamed = run(
        driver, "streamedEvent", gw.base, p.pharmacist, f"prescriptionId={rid}&afterLeafIndex=-1"
    )
    assert "error" not in streamed, streamed
    assert streamed["ok"]["status"] == 200
    assert streamed["ok"]["contentType"].startswith("text/event-stream")
    data = streamed["ok"]["text"].split("event: prescription\ndata: ", 1)[1].split("\n", 1)[0]
    assert json.loads(data)["prescriptionId"] == rid
    assert json.loads(data)["leafIndex"] == event["leafIndex"]


def test_a_page_on_an_origin_not_listed_gets_nothing_and_changes_nothing(
    driver,  # noqa: F811
    gw,
    sites,
):
    listed, unlisted = sites
    p = Parties(gw)
    rid = p.issued()
    open_page(driver, unlisted)

    # The preflight is refused: the mutation is never sent.
    issued = run(driver, "graphql", gw.base, p.prescriber, issue_document(), {"input": p.input()})
    assert issued.get("error", "").startswith("TypeError: Failed to fetch"), issued

    read = run(driver, "graphql", gw.base, p.pharmacist, PRESCRIPTION, {"id": rid})
    assert read.get("error", "").startswith("TypeError"), read

    variables = {"filter": {"prescriptionId": rid}, "after": -1}
    socket = run(driver, "websocketEvent", gw.base, p.pharmacist, SUBSCRIPTION, variables)
    assert socket == {"ok": {"opened": False, "closeCode": 1006}}, socket
    assert f"Rejected WebSocket connection from origin '{unlisted.origin}'" in gw.log_tail()

    streamed = run(driver, "streamedEvent", gw.base, p.pharmacist, f"prescriptionId={rid}")
    assert streamed.get("error", "").startswith("TypeError"), streamed

    console = " ".join(entry["message"] for entry in driver.get_log("browser"))
    assert f"from origin '{unlisted.origin}' has been blocked by CORS policy" in console

    # Only the prescription issued above exists for this pharmacy.
    nodes = p.listing(p.pharmacist)
    assert [node["id"] for node in nodes] == [rid]

    # The same calls from the listed origin, in the same browser, succeed: the origin made
    # the difference.
    open_page(driver, listed)
    read = run(driver, "graphql", gw.base, p.pharmacist, PRESCRIPTION, {"id": rid})
    assert read["ok"]["body"]["data"]["prescription"]["id"] == rid
