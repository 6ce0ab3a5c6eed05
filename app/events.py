"""GET /events: the prescription event stream as Server-Sent Events, for partners that cannot
hold a WebSocket.

    GET /events?afterLeafIndex=N (-1: from the first leaf)&pharmacy=P&organization=O&status=DISPENSED,DELIVERED
                &prescriptionId=ID&patientId=ID
    Authorization: Bearer <token>
    Last-Event-ID: N          (sent by EventSource on reconnect; wins over afterLeafIndex)

Each event is `id: <leaf index>`, `event: prescription`, and `data:` a JSON object
{prescriptionId, type, status, version, at, leafIndex, leaf}. The stream ends with
`event: end` and {message, code} when the subscriber falls too far behind or its token
expires, or with code UNAVAILABLE when the database fails or the server shuts down (a request that cannot start is a
503 with that code and Retry-After); reconnecting with the last id resumes exactly after it. A comment line is sent every
15 s of silence so that proxies keep the connection open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

from pymongo.errors import PyMongoError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from anchoring.encoding import b64
from anchoring.errors import database_error
from app.auth import Authenticator, AuthError
from app.feed import FeedEvent, PrescriptionFeed, StreamEnded, event_filter
from app.policy import NotAllowed
from app.prescriptions import Status

HEARTBEAT_SECONDS = 15.0
SHUTTING_DOWN = (
    "the server is shutting down: reconnect with Last-Event-ID to resume after the last event"
)


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(
        {"error": {"message": message, "code": code}}, status_code=status, headers=headers
    )


def _unavailable(exc: PyMongoError) -> str:
    return f"the database is unavailable ({database_error(exc)}): retry in a few seconds"


def _index(raw: str | None, name: str) -> int | None:
    if raw is None or raw == "":
        return None
    if raw == "-1":
        return -1  # from the first leaf
    if not raw.isdigit():
        raise ValueError(f"{name} must be a leaf index (an integer, -1 or more), got {raw[:40]!r}")
    return int(raw)


def sse(event: FeedEvent) -> str:
    data = {
        "prescriptionId": event.subject,
        "type": event.type,
        "status": event.tags.get("status"),
        "version": event.version,
        "at": event.at,
        "leafIndex": event.leaf_index,
        "leaf": b64(event.leaf),
    }
    return f"id: {event.leaf_index}\nevent: prescription\ndata: {json.dumps(data)}\n\n"


class EventStream:
    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = await self.respond(request)
        await response(scope, receive, send)

    async def respond(self, request: Request) -> Response:
        if request.method != "GET":
            return _error(405, "use GET", "METHOD_NOT_ALLOWED")
        try:
            viewer = self.auth.authenticate(request.headers.get("authorization"))
        except AuthError as exc:
            return _error(401, str(exc), "UNAUTHENTICATED")
        if viewer is None:
            return _error(401, "send 'Authorization: Bearer <token>'", "UNAUTHENTICATED")
        q = request.query_params
        try:
            after = _index(request.headers.get("last-event-id"), "Last-Event-ID")
            if after is None:
                after = _index(q.get("afterLeafIndex"), "afterLeafIndex")
            statuses = [s for s in q.get("status", "").split(",") if s]
            for s in statuses:
                Status(s)
            state = request.app.state
            match = event_filter(
                state.service.tags,
                viewer,
                prescription_id=q.get("prescriptionId"),
                patient_id=q.get("patientId"),
                pharmacy=q.get("pharmacy"),
                organization=q.get("organization"),
                statuses=statuses or None,
            )
        except NotAllowed as exc:
            return _error(403, str(exc), "FORBIDDEN")
        except ValueError as exc:
            return _error(400, str(exc), "BAD_USER_INPUT")
        feed: PrescriptionFeed = state.feed
        try:
            start = await feed.start_position() if after is None else after + 1
        except PyMongoError as exc:
            return _error(503, _unavailable(exc), "UNAVAILABLE", {"Retry-After": "1"})
        stopping: asyncio.Event = getattr(state, "stopping", None) or asyncio.Event()
        return StreamingResponse(
            self._events(feed, start, viewer.expires_at, match, stopping),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def _events(
        self,
        feed: PrescriptionFeed,
        start: int,
        expires_at: float | None,
        match: Callable[[FeedEvent], bool],
        stopping: asyncio.Event,
    ) -> AsyncIterator[str]:
        task = asyncio.current_task()

        def cut(reason: str) -> None:
            # A stalled client blocks our writes: end the response instead of waiting on it.
            if task is not None:
                task.cancel()

        stream = feed.stream(start, expires_at, cut, match)
        next_event: asyncio.Task[FeedEvent] | None = None
        stopped = asyncio.ensure_future(stopping.wait())
        try:
            while True:
                if next_event is None:
                    next_event = asyncio.ensure_future(anext(stream))
                done, _ = await asyncio.wait(
                    {next_event, stopped},
                    timeout=HEARTBEAT_SECONDS,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if next_event not in done and stopped in done:
                    end = {"message": SHUTTING_DOWN, "code": "UNAVAILABLE"}
                    yield f"event: end\ndata: {json.dumps(end)}\n\n"
                    return
                if not done:
                    yield ": keep-alive\n\n"
                    continue
                event, next_event = next_event.result(), None
                yield sse(event)
        except StreamEnded as exc:
            yield f"event: end\ndata: {json.dumps({'message': exc.message, 'code': exc.code})}\n\n"
        except PyMongoError as exc:
            # Resume with Last-Event-ID: the events sent so far carry their leaf index.
            end = {"message": _unavailable(exc), "code": "UNAVAILABLE"}
            yield f"event: end\ndata: {json.dumps(end)}\n\n"
        except StopAsyncIteration:
            return
        finally:
            stopped.cancel()
            if next_event is not None:
                next_event.cancel()
                with contextlib.suppress(BaseException):
                    await next_event
            await stream.aclose()
