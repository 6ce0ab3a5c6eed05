"""A graphql-transport-ws client for tests: a real WebSocket (the `websockets` library) speaking
the protocol's messages as they are, with every wait bounded.

    connection_init {payload} -> connection_ack
    subscribe {id, payload: {query, variables}} -> next* then complete, or error

`GraphQLSocket` reads like an ordinary client; `StalledSubscriber` subscribes over a raw socket
and then stops reading, as a client that hangs or cannot keep up does.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

PROTOCOL = "graphql-transport-ws"


class ProtocolError(AssertionError):
    """The server sent something a test did not expect."""


def ws_url(base: str) -> str:
    """The GraphQL WebSocket URL of a gateway at `base` (http://host:port)."""
    return base.replace("http://", "ws://", 1) + "/graphql"


class GraphQLSocket:
    """One graphql-transport-ws connection. Messages of every operation arrive on one socket;
    `receive` returns them in arrival order, `events` follows one operation."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(
        cls, base: str, token: str | None = None, timeout: float = 30.0, **options: Any
    ) -> GraphQLSocket:
        """Connect and complete connection_init -> connection_ack, authenticating with `token`
        in the connection_init payload. `options` go to websockets' connect (e.g. max_queue)."""
        ws = await asyncio.wait_for(
            connect(ws_url(base), subprotocols=[PROTOCOL], open_timeout=timeout, **options),
            timeout,
        )
        assert ws.subprotocol == PROTOCOL, ws.subprotocol
        socket = cls(ws)
        payload = {"Authorization": f"Bearer {token}"} if token else {}
        await socket.send({"type": "connection_init", "payload": payload})
        ack = await socket.receive(timeout)
        if ack.get("type") != "connection_ack":
            raise ProtocolError(f"expected connection_ack, got {ack}")
        return socket

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def subscribe(
        self, op_id: str, query: str, variables: dict[str, Any] | None = None
    ) -> None:
        payload: dict[str, Any] = {"query": query, "variables": variables or {}}
        await self.send({"id": op_id, "type": "subscribe", "payload": payload})

    async def execute(
        self,
        op_id: str,
        query: str,
        variables: dict[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Run a query or mutation as operation `op_id`: its `next` message (after which the
        server's `complete` is read), or the `error` message that refused it. Raises
        ProtocolError for anything else."""
        await self.subscribe(op_id, query, variables)
        message = await self.receive(timeout)
        if message.get("id") != op_id or message.get("type") not in ("next", "error"):
            raise ProtocolError(f"expected next or error of {op_id}, got {message}")
        if message["type"] == "next":
            done = await self.receive(timeout)
            if done != {"id": op_id, "type": "complete"}:
                raise ProtocolError(f"expected complete of {op_id}, got {done}")
        return message

    async def complete(self, op_id: str) -> None:
        await self.send({"id": op_id, "type": "complete"})

    async def receive(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next message (pings are answered and skipped). Raises TimeoutError when none
        arrives in time and ConnectionClosed when the server closed the socket."""
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
            message: dict[str, Any] = json.loads(raw)
            if message.get("type") == "ping":
                await self.send({"type": "pong"})
                continue
            return message

    async def events(self, op_id: str, timeout: float = 30.0) -> AsyncIterator[dict[str, Any]]:
        """The `data` of each `next` message of operation `op_id`, until it completes.
        Raises ProtocolError for an `error` message or a `next` that carries errors, and
        TimeoutError when the operation is silent for `timeout` seconds."""
        while True:
            message = await self.receive(timeout)
            if message.get("id") != op_id:
                raise ProtocolError(f"a message of another operation: {message}")
            kind = message["type"]
            if kind == "complete":
                return
            if kind == "error":
                raise ProtocolError(f"operation {op_id} failed: {message['payload']}")
            if kind != "next":
                raise ProtocolError(f"unexpected message {message}")
            payload = message["payload"]
            if payload.get("errors"):
                raise ProtocolError(f"operation {op_id} ended with errors: {payload['errors']}")
            yield payload["data"]

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> GraphQLSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), 10)
        except (TimeoutError, ConnectionClosed, OSError):
            pass


@dataclass
class Drained:
    """What a stalled subscriber finds once it reads again: the messages the server had sent,
    and how the server closed the WebSocket (None: the TCP connection ended without a close
    frame)."""

    messages: list[dict[str, Any]]
    close_code: int | None
    close_reason: str


class StalledSubscriber:
    """A subscriber that subscribes and then stops reading: a raw TCP socket with a small
    receive buffer, speaking WebSocket through websockets' sans-I/O protocol without
    compression, so what the server sends piles up in the kernel and the server's buffers until
    its writes block. `drain` reads again."""

    def __init__(self, sock: socket.socket, protocol: ClientProtocol) -> None:
        self.sock = sock
        self.protocol = protocol
        self._messages: list[dict[str, Any]] = []

    @classmethod
    async def subscribe(
        cls,
        base: str,
        token: str,
        query: str,
        variables: dict[str, Any] | None = None,
        receive_buffer: int = 4096,
        timeout: float = 30.0,
    ) -> StalledSubscriber:
        """Connect, authenticate, subscribe with operation id "stalled", and return without
        reading anything more."""
        address = urlsplit(base)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connect, so that the TCP window is small from the start.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (address.hostname, address.port)), timeout)
        protocol = ClientProtocol(
            parse_uri(ws_url(base)), subprotocols=[Subprotocol(PROTOCOL)], max_size=None
        )
        subscriber = cls(sock, protocol)
        protocol.send_request(protocol.connect())
        await subscriber._flush()
        await asyncio.wait_for(subscriber._handshake(), timeout)
        await subscriber._send(
            {"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}
        )
        ack = await asyncio.wait_for(subscriber._next_message(), timeout)
        if ack.get("type") != "connection_ack":
            raise ProtocolError(f"expected connection_ack, got {ack}")
        await subscriber._send(
            {
                "id": "stalled",
                "type": "subscribe",
                "payload": {"query": query, "variables": variables or {}},
            }
        )
        return subscriber

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        for chunk in self.protocol.data_to_send():
            if chunk:
                await loop.sock_sendall(self.sock, chunk)

    async def _send(self, message: dict[str, Any]) -> None:
        self.protocol.send_text(json.dumps(message).encode())
        await self._flush()

    async def _read(self) -> bool:
        """Read once from the socket and collect the text messages; False at end of stream."""
        data = await asyncio.get_running_loop().sock_recv(self.sock, 1 << 16)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                if event.status_code != 101:
                    raise ProtocolError(f"WebSocket upgrade refused: {event.status_code}")
            elif event.opcode is Opcode.TEXT:
                self._messages.append(json.loads(event.data))
        await self._flush()  # pongs, and the reply to a close frame
        return bool(data)

    async def _handshake(self) -> None:
        while self.protocol.handshake_exc is None and self.protocol.state is State.CONNECTING:
            if not await self._read():
                raise ProtocolError("the server closed the connection during the handshake")
        if self.protocol.handshake_exc is not None:
            raise ProtocolError(f"WebSocket handshake failed: {self.protocol.handshake_exc}")

    async def _next_message(self) -> dict[str, Any]:
        while not self._messages:
            if not await self._read():
                raise ProtocolError("the server closed the connection")
        return self._messages.pop(0)

    async def drain(self, timeout: float) -> Drained:
        """Read everything until the server ends the connection. Raises TimeoutError when it
        is still open after `timeout` seconds."""

        async def read_all() -> None:
            while await self._read():
                pass

        await asyncio.wait_for(read_all(), timeout)
        close = self.protocol.close_rcvd
        messages, self._messages = self._messages, []
        return Drained(
            messages, None if close is None else close.code, "" if close is None else close.reason
        )

    def close(self) -> None:
        self.sock.close()
