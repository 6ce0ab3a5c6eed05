"""Browser apps on other origins: CORS with an explicit allowlist on a real uvicorn gateway (its
GraphQL endpoint and its event stream), the allowlist on WebSocket upgrades, and gzip on large
answers but never on event streams or WebSocket frames. tests/test_cross_origin_browser.py
does the same from a real Chromium.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Databases
from test_gateway import env_for, free_port
from test_prescriptions import (
    LISTING,
    PRESCRIPTION,
    Gateway,
    Parties,
    launch,
    running,
    wait_for,
)
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin
from ws_client import GraphQLSocket

from app.cors import DEVELOPMENT_ORIGINS, CrossOriginSettings, parse_origin
from app.settings import ConfigError

ROOT = Path(__file__).resolve().parent.parent
APP = "https://app.hospital.test"
LOCAL_APP = "http://127.0.0.1:3000"
ELSEWHERE = "https://evil.example"
MAX_AGE = 1234


@pytest.fixture(scope="module")
def gw(
    mongo_uri: str, databases: Databases, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    launched = launch(
        mongo_uri,
        databases.new(),
        tmp_path_factory.mktemp("cors"),
        # As an operator writes it: spaces, a default port, capitals, a trailing comma.
        RXLEDGER_CORS_ORIGINS=f" HTTPS://App.Hospital.test:443 , {LOCAL_APP},",
        RXLEDGER_CORS_MAX_AGE=str(MAX_AGE),
    )
    with running(launched) as (gateway,):
        yield gateway


def preflight(gw: Gateway, path: str, origin: str, method: str, headers: str) -> httpx.Response:
    return gw.http.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
    )


def listed(header: str) -> set[str]:
    return {part.strip().lower() for part in header.split(",") if part.strip()}


# --- preflights ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "method", "headers"),
    [
        ("/graphql", "POST", "authorization,content-type"),
        ("/graphql", "GET", "authorization"),
        ("/events", "GET", "authorization,last-event-id"),
    ],
)
@pytest.mark.parametrize("origin", [APP, LOCAL_APP])
def test_a_preflight_from_a_listed_origin_allows_its_method_and_headers_for_max_age(
    gw, path, method, headers, origin
):
    r = preflight(gw, path, origin, method, headers)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == origin
    assert {"authorization", "content-type", "last-event-id"} <= listed(
        r.headers["access-control-allow-headers"]
    )
    assert listed(r.headers["access-control-allow-methods"]) == {"get", "post"}
    assert r.headers["access-control-max-age"] == str(MAX_AGE)
    assert "access-control-allow-credentials" not in r.headers


@pytest.mark.parametrize("origin", [ELSEWHERE, "https://app.hospital.test.evil.example", "null"])
def test_a_preflight_from_an_unlisted_origin_is_refused(gw, origin):
    r = preflight(gw, "/graphql", origin, "POST", "authorization,content-type")
    assert r.status_code == 400
    assert "origin" in r.text
    assert "access-control-allow-origin" not in r.headers


def test_a_preflight_asking_for_a_header_not_allowed_is_refused(gw):
    r = preflight(gw, "/graphql", APP, "POST", "authorization,x-debug")
    assert r.status_code == 400
    assert "headers" in r.text


def test_a_preflight_for_a_method_not_allowed_is_refused(gw):
    r = preflight(gw, "/graphql", APP, "DELETE", "authorization")
    assert r.status_code == 400
    assert "method" in r.text


# --- answers ------------------------------------------------------------------------------------


def test_an_answer_to_a_listed_origin_names_it_and_exposes_retry_after(gw):
    p = Parties(gw)
    rid = p.issued()
    r = gw.http.post(
        "/graphql",
        json={"query": PRESCRIPTION, "variables": {"id": rid}},
        headers={"Origin": APP, "Authorization": f"Bearer {p.pharmacist}"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"]["prescription"]["id"] == rid
    assert r.headers["access-control-allow-origin"] == APP
    assert "origin" in listed(r.headers["vary"])
    assert {"retry-after", "www-authenticate"} <= listed(r.headers["access-control-expose-headers"])


def test_a_refused_request_still_reaches_a_listed_origins_page(gw):
    """A bad token's 401 carries the CORS headers: the page can read why."""
    r = gw.http.post(
        "/graphql",
        json={"query": "{ ledger { size } }"},
        headers={"Origin": APP, "Authorization": "Bearer not-a-token"},
    )
    assert r.status_code == 401
    assert r.headers["access-control-allow-origin"] == APP
    assert r.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


def test_an_answer_to_an_unlisted_origin_does_not_allow_it(gw):
    r = gw.http.post(
        "/graphql", json={"query": "{ ledger { size } }"}, headers={"Origin": ELSEWHERE}
    )
    assert r.status_code == 200  # the browser, not the server, keeps it from the page
    assert "access-control-allow-origin" not in r.headers
    assert "origin" in listed(r.headers["vary"])


# --- gzip ---------------------------------------------------------------------------------------


def test_a_large_query_answer_is_gzipped_when_the_client_accepts_it(gw):
    p = Parties(gw)
    for _ in range(4):
        p.issued()
    body = {"query": LISTING, "variables": {"first": 10}}
    headers = {"Authorization": f"Bearer {p.pharmacist}", "Origin": APP}

    with gw.http.stream(
        "POST", "/graphql", json=body, headers={**headers, "Accept-Encoding": "gzip"}
    ) as r:
        raw = b"".join(r.iter_raw())
        assert r.status_code == 200
        assert r.headers["content-encoding"] == "gzip"
        assert {"accept-encoding", "origin"} <= listed(r.headers["vary"])
        assert int(r.headers["content-length"]) == len(raw)
    plain = gw.http.post("/graphql", json=body, headers={**headers, "Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert len(plain.content) > 1024  # large enough to be compressed
    assert len(raw) < len(plain.content)
    decoded = json.loads(gzip.decompress(raw))
    assert len(decoded["data"]["prescriptions"]["edges"]) == 4
    assert decoded == plain.json()


def test_a_small_answer_is_not_compressed(gw):
    r = gw.http.get("/healthz", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200
    assert "content-encoding" not in r.headers


def test_hash_tiles_are_served_as_they_are(gw):
    """Hashes do not compress: gzip would only cost CPU."""
    p = Parties(gw)
    for _ in range(33):  # a partial tile of 33 hashes or more: above the gzip minimum
        p.issued()

    def checkpoint_size() -> int:
        r = gw.http.get("/log/checkpoint")
        return int(r.text.split("\n")[1]) if r.status_code == 200 else 0

    size = wait_for(lambda: checkpoint_size() >= 33 and checkpoint_size(), "33 leaves signed")
    width = min(size, 256)
    r = gw.http.get(f"/log/tile/0/000.p/{width}", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    assert len(r.content) == 32 * width > 1024
    assert "content-encoding" not in r.headers


def test_the_event_stream_answers_a_listed_origin_and_is_never_compressed(gw):
    p = Parties(gw)
    rid = p.issued()
    with gw.http.stream(
        "GET",
        "/events",
        params={"prescriptionId": rid, "afterLeafIndex": "-1"},
        headers={
            "Authorization": f"Bearer {p.pharmacist}",
            "Origin": APP,
            "Accept-Encoding": "gzip",
        },
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["access-control-allow-origin"] == APP
        assert "content-encoding" not in r.headers
        received = b""
        for chunk in r.iter_raw():  # the bytes on the wire, not decoded by httpx
            received += chunk
            if b"event: prescription" in received and received.endswith(b"\n\n"):
                break
    block = received.decode().split("event: prescription\n", 1)[1]
    data = json.loads(block.split("data: ", 1)[1].split("\n", 1)[0])
    assert data["prescriptionId"] == rid


# --- WebSockets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", [APP, LOCAL_APP, None, "own"])
async def test_a_websocket_from_a_listed_origin_its_own_or_none_is_accepted(gw, origin):
    """A client that is not a browser sends no Origin; GraphiQL's page sends the gateway's own."""
    options = {}
    if origin is not None:
        options["origin"] = Origin(gw.base if origin == "own" else origin)
    p = Parties(gw)
    async with await GraphQLSocket.open(gw.base, p.pharmacist, **options) as socket:
        # No compression of frames either (permessage-deflate is offered by the client).
        assert socket.ws.protocol.extensions == []
        reply = await socket.execute("1", "{ ledger { origin } }")
    assert reply["payload"]["data"]["ledger"]["origin"]


@pytest.mark.parametrize("origin", [ELSEWHERE, "null", "http://127.0.0.1:3001"])
async def test_a_websocket_from_an_unlisted_origin_is_refused_before_the_handshake(gw, origin):
    with pytest.raises(InvalidStatus) as refused:
        await GraphQLSocket.open(gw.base, origin=Origin(origin))
    assert refused.value.response.status_code == 403


# --- configuration ------------------------------------------------------------------------------


def cors_settings(monkeypatch: pytest.MonkeyPatch, production: bool, **env: str | None):
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return CrossOriginSettings.from_env(production)


def test_no_origin_is_allowed_by_default_in_production(monkeypatch):
    settings = cors_settings(monkeypatch, True, RXLEDGER_CORS_ORIGINS=None)
    assert settings.origins == ()
    assert settings.max_age == 600


def test_graphiqls_local_origin_is_allowed_by_default_in_development(monkeypatch):
    settings = cors_settings(monkeypatch, False, RXLEDGER_CORS_ORIGINS=None)
    assert (
        settings.origins
        == DEVELOPMENT_ORIGINS
        == ("http://127.0.0.1:8000", "http://localhost:8000")
    )


def test_an_empty_list_allows_no_origin_in_development_too(monkeypatch):
    assert cors_settings(monkeypatch, False, RXLEDGER_CORS_ORIGINS="").origins == ()


@pytest.mark.parametrize(
    ("entry", "written"),
    [
        ("https://app.hospital.example", "https://app.hospital.example"),
        ("HTTPS://App.Hospital.Example:443", "https://app.hospital.example"),
        ("http://localhost:80", "http://localhost"),
        ("http://127.0.0.1:5173", "http://127.0.0.1:5173"),
        ("http://[::1]:5173", "http://[::1]:5173"),
    ],
)
def test_an_origin_is_written_as_browsers_send_it(entry, written):
    assert parse_origin(entry) == written


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("*", "'*' is not accepted"),
        ("null", "want http://host[:port]"),
        ("app.hospital.example", "want http://host[:port]"),
        ("ftp://app.hospital.example", "want http://host[:port]"),
        ("https://*.hospital.example", "no wildcard"),
        ("https://app.hospital.example/", "write https://app.hospital.example"),
        ("https://app.hospital.example/graphql", "no path"),
        ("https://app.hospital.example?x=1", "no path, query or fragment"),
        ("https://nurse@app.hospital.example", "user name"),
        ("https://app.hospital.example:99999", "not an origin (Port out of range"),
        ("https://app.hospital.example:https", "not an origin"),
        ("https://", "want one host name"),
    ],
)
def test_a_malformed_origin_is_a_config_error_naming_it(monkeypatch, entry, says):
    with pytest.raises(ConfigError) as error:
        cors_settings(monkeypatch, True, RXLEDGER_CORS_ORIGINS=f"https://ok.example,{entry}")
    message = str(error.value)
    assert message.startswith("RXLEDGER_CORS_ORIGINS: ")
    assert repr(entry) in message or entry == "*"
    assert says in message


def test_an_empty_entry_between_commas_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="has an empty entry"):
        cors_settings(
            monkeypatch, True, RXLEDGER_CORS_ORIGINS="https://a.example,,https://b.example"
        )


@pytest.mark.parametrize("value", ["-1", "ten", "1.5"])
def test_a_bad_max_age_is_a_config_error(monkeypatch, value):
    with pytest.raises(ConfigError, match="RXLEDGER_CORS_MAX_AGE"):
        cors_settings(monkeypatch, True, RXLEDGER_CORS_MAX_AGE=value)


def test_serve_refuses_to_start_with_a_wildcard_origin(mongo_uri, tmp_path):
    env = env_for(mongo_uri, "cors-refused", tmp_path, RXLEDGER_CORS_ORIGINS="*")
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())],
        cwd=ROOT,
        env={**env, "RXLEDGER_MODE": "development"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "rxledger serve: RXLEDGER_CORS_ORIGINS: '*' is not accepted" in result.stderr
    assert "Traceback" not in result.stderr
