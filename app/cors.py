"""Cross-origin access for browser apps served from other origins than the gateway: CORS on
every HTTP route (GraphQL, the /events stream, the log's tiles) and the same allowlist for
WebSocket upgrades.

Environment variables (an invalid value stops start-up with a ConfigError naming it):

RXLEDGER_CORS_ORIGINS (comma-separated origins, each `http(s)://host[:port]`)
    The origins whose pages may call the gateway. Unset: none in production; in development
    the gateway's own address as `rxledger serve` binds it by default (DEVELOPMENT_ORIGINS),
    where GraphiQL runs. Set but empty: none. Scheme and host are compared case-insensitively
    and a default port (:80, :443) is dropped, as browsers do. `*`, `null`, wildcards, paths
    (a trailing `/` too), queries, user names and other schemes are refused.
RXLEDGER_CORS_MAX_AGE (integer seconds >= 0, default 600)
    How long a browser may reuse a preflight's answer (Access-Control-Max-Age). Browsers cap
    it (Chromium at 7200, Firefox at 86400).

Preflights allow GET and POST with the headers Authorization, Content-Type and Last-Event-ID
(a fetch-based event stream client resuming); answers expose Retry-After and WWW-Authenticate
to the page. Credentials (cookies) are never allowed: the gateway authenticates by bearer token
only. A preflight from another origin is answered 400 ("Disallowed CORS origin"), and other
answers to it carry no Access-Control-Allow-Origin, so the browser keeps them from the page.

A browser sends Origin on a WebSocket upgrade too, and no preflight: strawberry answers 403
before the handshake to an upgrade whose Origin is neither listed (its `allowed_origins`, set
from the same list) nor the gateway's own host (GraphiQL's page), and logs "Rejected WebSocket
connection from origin ...". Clients that send no Origin (not browsers) are not affected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from app.settings import ConfigError, env_number

ORIGINS_ENV = "RXLEDGER_CORS_ORIGINS"
MAX_AGE_ENV = "RXLEDGER_CORS_MAX_AGE"
# GraphiQL's page when `rxledger serve` runs with its default --host and --port.
DEVELOPMENT_ORIGINS = ("http://127.0.0.1:8000", "http://localhost:8000")
ALLOWED_METHODS = ("GET", "POST")
ALLOWED_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID")
EXPOSED_HEADERS = ("Retry-After", "WWW-Authenticate")
DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_origin(entry: str) -> str:
    """`entry` as a browser writes it in Origin (`scheme://host[:port]`, lower case, no default
    port). Raises ConfigError saying what is wrong with it."""
    shape = f"{ORIGINS_ENV}: {entry!r} is not an origin"
    if entry == "*":
        raise ConfigError(
            f"{ORIGINS_ENV}: '*' is not accepted; list each web app's origin "
            "(e.g. https://app.hospital.example)"
        )
    try:
        parts = urlsplit(entry)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{shape} ({exc})") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in DEFAULT_PORTS:
        raise ConfigError(f"{shape}: want http://host[:port] or https://host[:port]")
    if not host or "*" in host:
        raise ConfigError(f"{shape}: want one host name or address, no wildcard")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{shape}: a user name has no place in an origin")
    if parts.path or parts.query or parts.fragment or entry.endswith(("?", "#")):
        raise ConfigError(
            f"{shape}: an origin has no path, query or fragment "
            f"(not even a trailing '/'): write {scheme}://{parts.netloc}"
        )
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address, as Origin writes it
    if port is None or port == DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


@dataclass(frozen=True)
class CrossOriginSettings:
    origins: tuple[str, ...] = ()
    max_age: int = 600

    @classmethod
    def from_env(cls, production: bool) -> CrossOriginSettings:
        """The allowlist and preflight lifetime from the variables in the module docstring.
        Raises ConfigError naming the first invalid entry."""
        raw = os.environ.get(ORIGINS_ENV)
        if raw is None:
            origins: tuple[str, ...] = () if production else DEVELOPMENT_ORIGINS
        else:
            entries = [entry.strip() for entry in raw.split(",")]
            # Tolerate "a, b," but not an origin lost between two commas.
            if entries and entries[-1] == "":
                entries.pop()
            if any(entry == "" for entry in entries):
                raise ConfigError(f"{ORIGINS_ENV}={raw!r} has an empty entry")
            origins = tuple(dict.fromkeys(parse_origin(entry) for entry in entries))
        max_age = int(env_number(MAX_AGE_ENV, cls.max_age, 0, integer=True))
        return cls(origins=origins, max_age=max_age)

    def middleware(self) -> Middleware:
        """starlette's CORSMiddleware, allowing these origins."""
        return Middleware(
            CORSMiddleware,
            allow_origins=self.origins,
            allow_methods=ALLOWED_METHODS,
            allow_headers=ALLOWED_HEADERS,
            expose_headers=EXPOSED_HEADERS,
            max_age=self.max_age,
        )
