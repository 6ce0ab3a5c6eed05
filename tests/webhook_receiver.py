"""A partner's webhook receiver for tests and bench/webhooks.py: a small starlette app under a
real uvicorn server on loopback, in the caller's event loop. It verifies every delivery with
`standardwebhooks.Webhook.verify` against each secret its endpoint is known by, records what
arrived, and answers as told: 200, 500, or 504 only after `slow_seconds` (a timeout for
the sender); `stop()` makes the port refuse connections until `start()` again."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Received:
    name: str  # the endpoint's path segment
    webhook_id: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() on arrival
    status: int  # what the receiver answered
    verified_by: list[int]  # indices of the secrets whose signature verifies
    payload: dict[str, Any] | None  # parsed once a signature verified

    @property
    def leaf_index(self) -> int:
        assert self.payload is not None
        return int(self.payload["data"]["leafIndex"])


@dataclass
class Receiver:
    port: int = field(default_factory=free_port)
    mode: str = "ok"  # ok | error | slow
    delay: float = 0.0  # before answering 200
    slow_seconds: float = 3.0
    secrets: dict[str, list[str]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    on_receive: Callable[[Received], None] | None = None
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{name}"

    async def _hook(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await request.body()
        headers = dict(request.headers)
        verified: list[int] = []
        for i, secret in enumerate(self.secrets.get(name, [])):
            try:
                Webhook(secret).verify(body, headers)
            except WebhookVerificationError:
                continue
            verified.append(i)
        status = 200 if verified else 400
        if verified and self.mode == "error":
            status = 500
        elif verified and self.mode == "slow":
            # A hang: whatever it answers comes after the sender has given up.
            await asyncio.sleep(self.slow_seconds)
            status = 504
        elif verified and self.delay:
            await asyncio.sleep(self.delay)
        got = Received(
            name,
            headers.get("webhook-id", ""),
            headers,
            body,
            time.monotonic(),
            status,
            verified,
            json.loads(body) if verified else None,
        )
        self.received.append(got)
        if self.on_receive is not None:
            self.on_receive(got)
        return Response(b"{}" if status == 200 else b"no", status_code=status)

    async def start(self) -> None:
        app = Starlette(routes=[Route("/hook/{name}", self._hook, methods=["POST"])])
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert not self._task.done(), "the receiver did not start"
            assert time.monotonic() < deadline, "the receiver did not start within 10 s"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._server = self._task = None

    def accepted(self, name: str) -> list[Received]:
        """The deliveries to endpoint `name` answered 2xx, in arrival order."""
        return [r for r in self.received if r.name == name and r.status == 200]

    def of(self, name: str) -> list[Received]:
        return [r for r in self.received if r.name == name]

    async def wait_until(
        self, condition: Callable[[], bool], what: str, timeout: float = 60.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
            await asyncio.sleep(0.05)
