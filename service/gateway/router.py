"""`/connections/{id}/quickbooks/{path}`: the Accounting API of the connection's company, for
internal services (scopes quickbooks:read for GET, quickbooks:write for the other methods)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from starlette.types import Scope as ASGIScope

from service.auth.dependencies import CurrentCaller, identify
from service.core.errors import problem_responses
from service.core.routing import DirectRoute
from service.gateway.proxy import REQUEST_ID_HEADER, Gateway

PATH = "/connections/{connection_id}/quickbooks/{path:path}"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

router = APIRouter(tags=["quickbooks"])


async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
ConnectionID = Annotated[uuid.UUID, Path(description="The connection's id.")]
CompanyPath = Annotated[
    str,
    Path(
        description="The Accounting API path under `/v3/company/{realmId}/`, e.g. `customer/1`, "
        "`query`, `reports/ProfitAndLoss`, `batch`, `upload`."
    ),
]

DESCRIPTION = """
Forwards the call to `{INTUIT_API_BASE_URL}/v3/company/{realm_id}/{path}` with the caller's
query string, headers and body, and the connection's access token (refreshed first when fewer
than 5 minutes are left; after a 401, refreshed once and the call repeated). `Accept:
application/json` and `minorversion` are added when absent. Intuit's status, body, `Content-Type`
and `intuit_tid` come back unchanged; bodies stream both ways (up to
`BROKER_QUICKBOOKS_MAX_BODY_BYTES`).

Every call other than GET carries a `requestid` (the caller's own, else derived from its
`Idempotency-Key` header, else a new one), answered in `QuickBooks-Request-Id`: repeating the
call with it never does the work twice. Calls wait (up to `BROKER_QUICKBOOKS_QUEUE_SECONDS`) for
room within Intuit's limits for the company, shared by every replica, else answer 429
`quickbooks_throttled` with `Retry-After`. Problems of the broker are
`application/problem+json`; Intuit's own answers keep Intuit's content type.
"""

_INTUIT_CONTENT: dict[str, Any] = {"application/json": {}, "application/xml": {}, "*/*": {}}
_HEADERS: dict[str, Any] = {
    "intuit_tid": {"description": "Intuit's transaction id, for support.", "schema": {"type": "string"}},
    REQUEST_ID_HEADER: {"description": "The call's requestid (not on GET).", "schema": {"type": "string"}},
}
_INTUIT: dict[str, Any] = {
    "description": "Intuit's answer, relayed unchanged (any status, JSON or XML).",
    "content": _INTUIT_CONTENT,
    "headers": _HEADERS,
}


def _problem_or_intuit(problem: dict[str, Any]) -> dict[str, Any]:
    """The broker's problem for this status, or Intuit's own answer with it."""
    return {
        "description": "A problem (application/problem+json) from the broker, or Intuit's "
        "own answer relayed unchanged.",
        "content": {**problem["content"], **_INTUIT_CONTENT},
        "headers": _HEADERS,
    }


RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _INTUIT,
    **{
        status: _problem_or_intuit(problem)
        for status, problem in problem_responses(400, 401, 403, 404, 409, 413, 422, 429, 503).items()
    },
    "default": _INTUIT,
}


async def quickbooks(
    connection_id: ConnectionID,
    path: CompanyPath,
    request: Request,
    caller: CurrentCaller,
    gateway: GatewayDep,
) -> Response:
    return await gateway.forward(request, connection_id, caller)


for _method in METHODS:
    router.add_api_route(
        PATH,
        quickbooks,
        methods=[_method],
        name=f"quickbooks_{_method.lower()}",
        responses=RESPONSES,
        response_class=Response,
        summary=f"{_method} on the connection's QuickBooks company (scope "
        f"quickbooks:{'read' if _method == 'GET' else 'write'})",
        description=DESCRIPTION.strip(),
    )


# Every call in its plain form (a canonical connection id) goes by a direct route
# (service.core.routing): the same caller and the same Gateway.forward, without FastAPI's
# dependency solving, which would cost a gateway call more than its admission statement. The
# route above documents the endpoint and answers the forms the direct route declines (an id
# written otherwise, which FastAPI validates).
def _accept(scope: ASGIScope) -> dict[str, Any] | None:
    if scope.get("root_path"):
        return None
    parts = scope["path"].split("/", 4)
    if len(parts) != 5 or parts[0] or parts[1] != "connections" or parts[3] != "quickbooks":
        return None
    try:
        connection_id = uuid.UUID(parts[2])
    except ValueError:
        return None
    if str(connection_id) != parts[2]:
        return None
    return {"connection_id": connection_id, "path": parts[4]}


async def _direct(request: Request, arguments: dict[str, Any]) -> Response:
    caller = await identify(request)
    gateway: Gateway = request.app.state.gateway
    return await gateway.forward(request, arguments["connection_id"], caller)


direct_routes = [DirectRoute(PATH, _accept, _direct, methods=METHODS)]
