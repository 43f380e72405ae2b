"""GET /connections/{id}/stream and GET /status/stream: the tenant's connection events as
server-sent events, live on whichever replica the browser reaches, resumable by Last-Event-ID.

A stream holds no database connection: the process's StreamHub reads new events once for all of
its streams. A stream ends when the client leaves, when it falls behind (its queue is full), at
its maximum lifetime or its JWT's expiry (the client reconnects, authenticating again), when its
connection is deleted, and when the server shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Annotated, Any

import jwt
from fastapi import APIRouter, Header, Path, Query, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.auth.dependencies import CurrentCaller
from service.connections import service as connections
from service.connections.schemas import TenantId
from service.core.db.engine import SessionDep
from service.core.errors import ProblemError, problem_responses
from service.core.httpserver import END_STREAM_SCOPE_KEY
from service.runtime import RuntimeDep
from service.streams.hub import StreamEvent, StreamHub, StreamLimitReached, Subscription

router = APIRouter(tags=["streams"])

RETRY_MILLISECONDS = 3000  # how long an EventSource waits before it reconnects
BACKLOG_LIMIT = 1000  # events a resume replays at most; further behind, it starts from now
HEARTBEAT = b": heartbeat\n\n"
EVENT_STREAM = "text/event-stream"


class TooManyStreams(ProblemError):
    status, code, title = 429, "too_many_streams", "Too many open streams"

    def __init__(self, detail: str, *, retry_after: int = 30) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class StreamsUnavailable(ProblemError):
    status, code, title = 503, "streams_unavailable", "No stream can be opened on this server now"

    def __init__(self, detail: str, *, retry_after: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


_STREAM_DOC = (
    "Server-sent events (`text/event-stream`): each message has `id:` (the event id), `event:` "
    "(its type) and `data:` (the webhook body, `{type, timestamp, data}`), a `: heartbeat` "
    "comment every 15 s. Send `Last-Event-ID` to resume after that event (an id the tenant "
    "does not have, or one too far behind, starts from now and answers "
    "`X-Stream-Resumed: false`). 429 `too_many_streams` / 503 `streams_unavailable` with "
    "`Retry-After` when the tenant or the server has as many streams open as allowed."
)
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The event stream", "content": {EVENT_STREAM: {"schema": {"type": "string"}}}},
    **problem_responses(401, 403, 404, 422, 429, 503),
}

ConnectionID = Annotated[uuid.UUID, Path(description="The connection's id.")]
LastEventID = Annotated[
    str | None, Header(alias="Last-Event-ID", max_length=100, description="Resume after this event id.")
]
TenantQuery = Annotated[TenantId | None, Query(description="Services only: the tenant to follow.")]


class EventStream(Response):
    """The streams' response class, as the OpenAPI document names it."""

    media_type = EVENT_STREAM


class EventStreamResponse(EventStream):
    """An SSE response fed by a hub subscription (a plain ASGI response, so no middleware
    buffers it)."""

    def __init__(
        self,
        hub: StreamHub,
        subscription: Subscription,
        backlog: list[StreamEvent],
        *,
        heartbeat_seconds: float,
        ends_at: float,
        resumed: bool | None,
        ends_on_delete: bool,
    ) -> None:
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        if resumed is not None:
            headers["X-Stream-Resumed"] = "true" if resumed else "false"
        super().__init__(None, headers=headers, media_type=EVENT_STREAM)
        self._hub, self._subscription, self._backlog = hub, subscription, backlog
        self._heartbeat, self._ends_at = heartbeat_seconds, ends_at
        self._ends_on_delete = ends_on_delete

    def init_headers(self, headers: Any = None) -> None:
        super().init_headers(headers)
        # Streamed: no length, whatever Response assumed for an empty body.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        subscription = self._subscription
        # The server ends this stream when it shuts down (service.core.httpserver), rather than
        # waiting for the client to leave.
        scope[END_STREAM_SCOPE_KEY] = subscription.close

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            subscription.close()

        watcher = asyncio.create_task(watch_disconnect())
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            opening = [f"retry: {RETRY_MILLISECONDS}\n\n".encode()]
            for event in self._backlog:
                subscription.seen.add(event.id)
                opening.append(event.message)
            await send({"type": "http.response.body", "body": b"".join(opening), "more_body": True})
            await self._relay(send)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self._hub.unsubscribe(subscription)

    async def _relay(self, send: Send) -> None:
        subscription = self._subscription
        while True:
            remaining = self._ends_at - time.time()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(min(self._heartbeat, remaining)):
                    event = await subscription.queue.get()
            except TimeoutError:
                if time.time() < self._ends_at:
                    await send({"type": "http.response.body", "body": HEARTBEAT, "more_body": True})
                continue
            if event is None:  # closed: the client left, fell behind, or the server stops
                return
            if event.id in subscription.seen:  # already sent from the backlog
                continue
            await send({"type": "http.response.body", "body": event.message, "more_body": True})
            if self._ends_on_delete and event.type == "connection.deleted":
                return


def _token_expiry(request: Request) -> float | None:
    """The `exp` of the (already verified) bearer token, for a user's stream to end with it."""
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token or request.headers.get("x-api-key"):
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) else None


async def _open(
    request: Request,
    rt: RuntimeDep,
    *,
    tenant_id: str,
    connection_id: uuid.UUID | None,
    last_event_id: str | None,
) -> EventStreamResponse:
    hub: StreamHub = request.app.state.streams
    try:
        subscription = hub.subscribe(tenant_id, str(connection_id) if connection_id else None)
    except StreamLimitReached as exc:
        if exc.scope == "tenant":
            raise TooManyStreams(
                "This tenant has as many streams open on this server as it may "
                "(BROKER_STREAMS_PER_TENANT); close one or try again later."
            ) from None
        raise StreamsUnavailable(
            "This server has as many streams open as it may (BROKER_STREAMS_MAX), or is shutting down."
        ) from None
    try:
        backlog: list[StreamEvent] | None = []
        resumed: bool | None = None
        if last_event_id is not None:
            after = _parse_event_id(last_event_id)
            backlog = (
                None
                if after is None
                else await hub.backlog(
                    tenant_id=tenant_id, connection_id=connection_id, after_id=after, limit=BACKLOG_LIMIT
                )
            )
            resumed = backlog is not None
        settings = rt.settings
        ends_at = time.time() + settings.stream_max_seconds
        expiry = _token_expiry(request)
        if expiry is not None:
            ends_at = min(ends_at, expiry)
        return EventStreamResponse(
            hub,
            subscription,
            backlog or [],
            heartbeat_seconds=settings.stream_heartbeat_seconds,
            ends_at=ends_at,
            resumed=resumed,
            ends_on_delete=connection_id is not None,
        )
    except BaseException:
        hub.unsubscribe(subscription)
        raise


def _parse_event_id(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        return None


@router.get(
    "/connections/{connection_id}/stream",
    response_class=EventStream,
    responses=_RESPONSES,
    summary="Live events of one connection (server-sent events)",
    description=_STREAM_DOC,
)
async def connection_stream(
    request: Request,
    session: SessionDep,
    rt: RuntimeDep,
    caller: CurrentCaller,
    connection_id: ConnectionID,
    last_event_id: LastEventID = None,
) -> EventStreamResponse:
    conn = await connections.load_for_read(session, caller, connection_id)
    return await _open(
        request, rt, tenant_id=conn.tenant_id, connection_id=connection_id, last_event_id=last_event_id
    )


@router.get(
    "/status/stream",
    response_class=EventStream,
    responses=_RESPONSES,
    tags=["status"],
    summary="Live events of every connection of the tenant (server-sent events)",
    description=_STREAM_DOC,
)
async def status_stream(
    request: Request,
    rt: RuntimeDep,
    caller: CurrentCaller,
    tenant_id: TenantQuery = None,
    last_event_id: LastEventID = None,
) -> EventStreamResponse:
    tenant = caller.tenant_for_read(tenant_id)
    return await _open(request, rt, tenant_id=tenant, connection_id=None, last_event_id=last_event_id)
