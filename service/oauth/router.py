"""HTTP endpoints of the Connect flow: authorize, Intuit's callback, pending-link decisions."""

from __future__ import annotations

import html
from datetime import datetime
from typing import Annotated
from urllib.parse import urlencode, urlsplit, urlunsplit

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StrictBool

from service.auth.dependencies import CurrentCaller
from service.connections import service
from service.connections.router import CONFLICT, ERRORS, UPSTREAM, ConnectionID
from service.connections.schemas import ConnectionOut, Strict, UserId
from service.db.engine import SessionDep
from service.errors import IntuitUnavailable, problem_response, problem_responses
from service.intuit import errors as intuit_errors
from service.oauth import flows
from service.oauth.state import check_return_url, create_state
from service.runtime import RuntimeDep

router = APIRouter(tags=["authorization"])

_CALLBACK_HEADERS = {"Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
                     "X-Content-Type-Options": "nosniff"}


class AuthorizeRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"force": False}]})

    return_url: AnyHttpUrl | None = Field(
        default=None, description="Where the browser returns after Intuit; its origin must be in "
                                  "BROKER_RETURN_URL_ALLOWLIST.")
    force: StrictBool = Field(default=False, description="\"Connect anyway\": a different QuickBooks user "
                                                   "or company replaces the current one.")
    user_id: UserId | None = Field(default=None, description="Services only: the cieTrade user "
                                                            "who will sign in to Intuit.")


class AuthorizeResponse(BaseModel):
    authorization_url: str
    expires_at: datetime


@router.post("/connections/{connection_id}/authorize", response_model=AuthorizeResponse,
             responses={**ERRORS, **problem_responses(400), **UPSTREAM},
             summary="Start the Connect flow: get Intuit's authorization URL")
async def authorize(session: SessionDep, rt: RuntimeDep, caller: CurrentCaller,
                    connection_id: ConnectionID, body: AuthorizeRequest | None = None) -> AuthorizeResponse:
    body = body or AuthorizeRequest()
    conn = await service.load_for_write(session, caller, connection_id)
    user_id = caller.user_for_write(body.user_id)
    return_url = (check_return_url(str(body.return_url), rt.settings.return_url_allowlist)
                  if body.return_url is not None else None)
    state, expires_at = await create_state(session, connection_id=conn.id, tenant_id=conn.tenant_id,
                                           user_id=user_id, return_url=return_url, force=body.force)
    try:
        url = await rt.intuit.authorization_url(state)
    except intuit_errors.IntuitError as exc:
        raise IntuitUnavailable("Intuit's discovery document could not be read; try again.",
                                retry_after=getattr(exc, "retry_after", None) or 30) from None
    return AuthorizeResponse(authorization_url=url, expires_at=expires_at)


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def _result_page(outcome: flows.CallbackOutcome) -> str:
    if outcome.result == "connected":
        heading, text = "Connected to QuickBooks", "You can close this window and return to cieTrade."
    elif outcome.result == "confirmation_required":
        heading = "Confirmation needed"
        text = ("A different QuickBooks user or company signed in than the one this connection had. "
                "Return to cieTrade to confirm (\"Connect anyway\") or decline.")
    else:
        assert outcome.error is not None
        heading, text = "QuickBooks was not connected", outcome.error.detail
    code = f"<p><code>{html.escape(outcome.error.code)}</code></p>" if outcome.error else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>qbo-broker</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;"
        "padding:0 1rem;color:#1f2933}h1{font-size:1.4rem}</style></head><body>"
        f"<h1 id=result data-result={html.escape(outcome.result)}>{html.escape(heading)}</h1>"
        f"<p>{html.escape(text)}</p>{code}</body></html>"
    )


_PAGE_OR_PROBLEM = {"text/html": {"schema": {"type": "string"}},
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
_CALLBACK_FAILURES = {
    400: "The authorization state is unknown, used or expired, or Intuit's callback is not usable",
    403: "The user declined, or is not a Master admin or Company Administrator",
    404: "The connection was deleted during the authorization",
    409: "A linking rule refused the QuickBooks user or company",
    502: "Intuit answered something the broker cannot use",
    503: "Intuit could not be reached (with Retry-After)",
}


@router.get("/callback", response_class=HTMLResponse,
            responses={303: {"description": "Back to the return_url with connection_id, result and "
                                            "error (never a code, token or state)"},
                       **{status: {"description": f"{text}: a small HTML page says so, or "
                                                  "problem+json for a client that accepts only JSON",
                                   "content": _PAGE_OR_PROBLEM}
                          for status, text in _CALLBACK_FAILURES.items()},
                       **problem_responses(413, 422)},
            summary="Intuit's redirect back to the broker (browser only)")
async def callback(request: Request, rt: RuntimeDep,
                   code: Annotated[str | None, Query(max_length=2000)] = None,
                   state: Annotated[str | None, Query(max_length=2000)] = None,
                   realm_id: Annotated[str | None, Query(alias="realmId", max_length=64)] = None,
                   error: Annotated[str | None, Query(max_length=200)] = None) -> Response:
    outcome = await flows.complete_callback(rt, state=state, code=code, realm_id=realm_id,
                                            error=error)
    if outcome.return_url:
        params = {"connection_id": str(outcome.connection_id), "result": outcome.result}
        if outcome.error is not None:
            params["error"] = outcome.error.code
        return RedirectResponse(_with_query(outcome.return_url, params), status_code=303,
                                headers=_CALLBACK_HEADERS)
    if outcome.error is None:
        return HTMLResponse(_result_page(outcome), headers=_CALLBACK_HEADERS)
    headers = {**outcome.error.headers, **_CALLBACK_HEADERS}
    accept = request.headers.get("accept", "")
    if "html" not in accept and "json" in accept:
        response = problem_response(outcome.error)
        response.headers.update(_CALLBACK_HEADERS)
        return response
    return HTMLResponse(_result_page(outcome), status_code=outcome.error.status, headers=headers)


@router.post("/connections/{connection_id}/pending-link/confirm", response_model=ConnectionOut,
             responses={**ERRORS, **CONFLICT}, summary="\"Connect anyway\" after the fact")
async def confirm_pending_link(session: SessionDep, rt: RuntimeDep, caller: CurrentCaller,
                               connection_id: ConnectionID) -> ConnectionOut:
    conn = await service.load_for_write(session, caller, connection_id)
    await flows.confirm_pending_link(session, rt, conn, actor=caller.actor)
    return await service.present(session, conn)


@router.delete("/connections/{connection_id}/pending-link", status_code=204, responses=ERRORS,
               summary="Decline the pending link: revoke and discard its credentials")
async def decline_pending_link(session: SessionDep, rt: RuntimeDep, caller: CurrentCaller,
                               connection_id: ConnectionID) -> Response:
    conn = await service.load_for_write(session, caller, connection_id)
    await flows.decline_pending_link(session, rt, conn, actor=caller.actor)
    return Response(status_code=204)
