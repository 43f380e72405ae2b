"""HTTP endpoints for connections, their events, fresh tokens, and the link status."""

from __future__ import annotations

import uuid
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Body, Path, Query, Request, Response
from pydantic import TypeAdapter, ValidationError
from starlette.types import Scope as ASGIScope

from service.auth.callers import Caller, Scope
from service.auth.dependencies import CurrentCaller, identify
from service.connections import service
from service.connections.schemas import (
    ConnectionCreate,
    ConnectionOut,
    ConnectionPatch,
    EventOut,
    LinkStatusOut,
    Page,
    TenantId,
    connection_out,
)
from service.core.db.engine import SessionDep
from service.core.errors import NotFound, problem_responses
from service.core.routing import DirectRoute
from service.domain import Status
from service.runtime import Runtime, RuntimeDep
from service.store import connections as repo
from service.tokens.schemas import AccessTokenOut

router = APIRouter(tags=["connections"])

ConnectionID = Annotated[uuid.UUID, Path(description="The connection's id.")]
Limit = Annotated[int, Query(ge=1, le=100, description="Page size (at most 100).")]
Cursor = Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page.")]
TenantQuery = Annotated[TenantId | None, Query(description="Services only: the tenant to look at.")]

# 503: database_unavailable (PostgreSQL cannot be reached right now), with Retry-After.
ERRORS = problem_responses(401, 403, 404, 413, 422, 503)
# A request body that is not even text (FastAPI: "There was an error parsing the body").
MALFORMED = problem_responses(400)
CONFLICT = problem_responses(409)
UPSTREAM = problem_responses(502, 503)


@router.post(
    "/connections",
    status_code=201,
    response_model=ConnectionOut,
    responses={**ERRORS, **MALFORMED, **CONFLICT},
    summary="Create a connection for the tenant",
    description="409 `connection_limit_reached` once the tenant has "
    "`BROKER_MAX_CONNECTIONS_PER_TENANT` connections (20 by default).",
)
async def create_connection(
    session: SessionDep,
    rt: RuntimeDep,
    caller: CurrentCaller,
    body: Annotated[ConnectionCreate | None, Body()] = None,
) -> ConnectionOut:
    tenant_id = caller.tenant_for_write(body.tenant_id if body else None)
    conn = await service.create(
        session, tenant_id=tenant_id, caller=caller, limit=rt.settings.max_connections_per_tenant
    )
    return connection_out(conn, None)


@router.get(
    "/connections",
    response_model=Page[ConnectionOut],
    responses=ERRORS,
    summary="List the tenant's connections",
)
async def list_connections(
    session: SessionDep,
    caller: CurrentCaller,
    tenant_id: TenantQuery = None,
    status: Status | None = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[ConnectionOut]:
    tenant = caller.tenant_for_read(tenant_id)
    rows, next_cursor = await repo.list_connections(
        session, tenant_id=tenant, status=status.value if status else None, limit=limit, cursor=cursor
    )
    return Page[ConnectionOut](items=[connection_out(c, p) for c, p in rows], next_cursor=next_cursor)


@router.get(
    "/connections/{connection_id}", response_model=ConnectionOut, responses=ERRORS, summary="One connection"
)
async def get_connection(
    session: SessionDep, caller: CurrentCaller, connection_id: ConnectionID
) -> ConnectionOut:
    conn = await service.load_for_read(session, caller, connection_id)
    return await service.present(session, conn)


@router.patch(
    "/connections/{connection_id}",
    response_model=ConnectionOut,
    responses={**ERRORS, **MALFORMED},
    summary="Turn modules on or off (the Integration page's Save)",
)
async def patch_connection(
    session: SessionDep, caller: CurrentCaller, connection_id: ConnectionID, body: ConnectionPatch
) -> ConnectionOut:
    conn = await service.load_for_write(session, caller, connection_id)
    await service.change_modules(session, conn, body.modules, caller=caller)
    return await service.present(session, conn)


@router.post(
    "/connections/{connection_id}/disconnect",
    response_model=ConnectionOut,
    responses={**ERRORS, **CONFLICT},
    summary="Disconnect from QuickBooks",
)
async def disconnect_connection(
    session: SessionDep, rt: RuntimeDep, caller: CurrentCaller, connection_id: ConnectionID
) -> ConnectionOut:
    conn = await service.load_for_write(session, caller, connection_id)
    await service.disconnect(session, rt, conn, caller=caller)
    return await service.present(session, conn)


@router.delete(
    "/connections/{connection_id}",
    status_code=204,
    responses=ERRORS,
    summary="Disconnect, then delete the connection",
)
async def delete_connection(
    session: SessionDep, rt: RuntimeDep, caller: CurrentCaller, connection_id: ConnectionID
) -> Response:
    conn = await service.load_for_write(session, caller, connection_id)
    await service.delete(session, rt, conn, caller=caller)
    return Response(status_code=204)


@router.get(
    "/connections/{connection_id}/events",
    response_model=Page[EventOut],
    responses=ERRORS,
    summary="The connection's audit trail, newest first",
)
async def list_events(
    session: SessionDep,
    caller: CurrentCaller,
    connection_id: ConnectionID,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[EventOut]:
    await service.load_for_read(session, caller, connection_id)
    events, next_cursor = await repo.list_events(
        session, connection_id=connection_id, limit=limit, cursor=cursor
    )
    return Page[EventOut](items=[EventOut.of(e) for e in events], next_cursor=next_cursor)


@router.get(
    "/connections/{connection_id}/token",
    response_model=AccessTokenOut,
    responses={**ERRORS, **CONFLICT, **UPSTREAM},
    summary="A fresh QuickBooks access token (internal services, scope tokens:read)",
)
async def get_token(
    rt: RuntimeDep, caller: CurrentCaller, connection_id: ConnectionID, force_refresh: bool = False
) -> Response:
    return await _token(rt, caller, connection_id, force=force_refresh)


@router.get(
    "/status",
    response_model=LinkStatusOut,
    responses=ERRORS,
    tags=["status"],
    summary="The accounting link's status (the link icon)",
    description="Lists the tenant's newest connections, at most "
    "`BROKER_MAX_CONNECTIONS_PER_TENANT` (20 by default).",
)
async def link_status(rt: RuntimeDep, caller: CurrentCaller, tenant_id: TenantQuery = None) -> Response:
    return await _status(rt, caller, tenant_id)


async def _token(rt: Runtime, caller: Caller, connection_id: uuid.UUID, *, force: bool) -> Response:
    caller.require_scope(Scope.TOKENS_READ)
    view = await rt.refresher.view(connection_id)
    if view is None:
        raise NotFound("No such connection.", connection_id=str(connection_id))
    token = await rt.refresher.access_token(view, force=force)
    return Response(
        token.body(rt.intuit.api_base_url),
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def _status(rt: Runtime, caller: Caller, tenant_id: str | None) -> Response:
    body = await service.link_status_body(rt, caller.tenant_for_read(tenant_id))
    return Response(body, media_type="application/json")


# The two hottest reads (the link icon polls /status; services fetch tokens all day) in their
# plain forms, as direct routes (service.core.routing): the same caller, the same functions, the
# same answers as the endpoints above, without FastAPI's dependency solving. Every other form
# (force_refresh, an unknown parameter, a tenant id or connection id that needs validating) is
# declined, and the endpoints above answer it.
_TENANT_ID = TypeAdapter(TenantId)
_TOKEN_PREFIX, _TOKEN_SUFFIX = "/connections/", "/token"


def _accept_status(scope: ASGIScope) -> dict[str, Any] | None:
    if scope["path"] != "/status" or scope.get("root_path"):
        return None
    query = scope["query_string"]
    if not query:
        return {"tenant_id": None}
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    if len(pairs) != 1 or pairs[0][0] != "tenant_id":
        return None
    try:
        return {"tenant_id": _TENANT_ID.validate_python(pairs[0][1])}
    except ValidationError:
        return None


def _accept_token(scope: ASGIScope) -> dict[str, Any] | None:
    path: str = scope["path"]
    if (
        scope["query_string"]
        or scope.get("root_path")
        or not path.startswith(_TOKEN_PREFIX)
        or not path.endswith(_TOKEN_SUFFIX)
    ):
        return None
    raw = path[len(_TOKEN_PREFIX) : -len(_TOKEN_SUFFIX)]
    try:
        connection_id = uuid.UUID(raw)
    except ValueError:
        return None
    return {"connection_id": connection_id} if str(connection_id) == raw else None


async def _direct_token(request: Request, arguments: dict[str, Any]) -> Response:
    caller = await identify(request)
    return await _token(request.app.state.runtime, caller, arguments["connection_id"], force=False)


async def _direct_status(request: Request, arguments: dict[str, Any]) -> Response:
    caller = await identify(request)
    return await _status(request.app.state.runtime, caller, arguments["tenant_id"])


direct_routes = [
    DirectRoute("/status", _accept_status, _direct_status),
    DirectRoute("/connections/{connection_id}/token", _accept_token, _direct_token),
]
