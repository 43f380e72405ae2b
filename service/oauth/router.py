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
from service.core.db.engine import SessionDep
from service.core.errors import (
    IntuitUnavailableProblem,
    ReturnUrlRequired,
    problem_response,
    problem_responses,
)
from service.intuit import errors as intuit_errors
from service.oauth import flows
from service.oauth.state import STATE_TTL, binding_cookie, check_return_url, create_state
from service.runtime import RuntimeDep

router = APIRouter(tags=["authorization"])

_CALLBACK_HEADERS = {
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'; base-uri 'none'",
}


class AuthorizeRequest(Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"return_url": "http://localhost:8000/docs", "force": False}]},
    )

    return_url: AnyHttpUrl | None = Field(
        default=None,
        description="Where the browser returns after Intuit; its origin must be in "
        "BROKER_RETURN_URL_ALLOWLIST. Required when "
        "BROKER_CONNECT_BINDING=ticket (the default).",
    )
    force: StrictBool = Field(
        default=False,
        description='"Connect anyway": a different QuickBooks user or company replaces the current one.',
    )
    user_id: UserId | None = Field(
        default=None, description="Services only: the cieTrade user who will sign in to Intuit."
    )


class AuthorizeResponse(BaseModel):
    authorization_url: str
    expires_at: datetime


@router.post(
    "/connections/{connection_id}/authorize",
    response_model=AuthorizeResponse,
    responses={**ERRORS, **problem_responses(400), **UPSTREAM},
    summary="Start the Connect flow: get Intuit's authorization URL",
    description="Ticket mode (the default) requires a `return_url`: the callback sends "
    "the browser back there with a `completion_ticket`, which the same user "
    "redeems with `POST /connections/{id}/complete`. Cookie mode sets a "
    "`__Host-` cookie binding the flow to this browser (call it with "
    "credentials).",
)
async def authorize(
    session: SessionDep,
    rt: RuntimeDep,
    caller: CurrentCaller,
    connection_id: ConnectionID,
    response: Response,
    body: AuthorizeRequest | None = None,
) -> AuthorizeResponse:
    body = body or AuthorizeRequest()
    conn = await service.load_for_write(session, caller, connection_id)
    user_id = caller.user_for_write(body.user_id)
    cookie_mode = rt.settings.connect_binding == "cookie"
    if body.return_url is None and not cookie_mode:
        raise ReturnUrlRequired(
            "A return_url is required: after Intuit the browser returns there with a completion "
            "ticket that the same user redeems with POST /connections/{id}/complete."
        )
    return_url = (
        check_return_url(str(body.return_url), rt.settings.return_url_allowlist)
        if body.return_url is not None
        else None
    )
    started = await create_state(
        session,
        rt.box,
        connection_id=conn.id,
        tenant_id=conn.tenant_id,
        user_id=user_id,
        return_url=return_url,
        force=body.force,
        bind_browser=cookie_mode,
    )
    try:
        url = await rt.intuit.authorization_url(
            started.state, code_verifier=started.code_verifier, nonce=started.nonce
        )
    except intuit_errors.IntuitError as exc:
        raise IntuitUnavailableProblem(
            "Intuit's discovery document could not be read; try again.",
            retry_after=getattr(exc, "retry_after", None) or 30,
        ) from None
    if started.browser_binding is not None:
        response.set_cookie(
            binding_cookie(conn.id),
            started.browser_binding,
            max_age=int(STATE_TTL.total_seconds()),
            path="/",
            secure=True,
            httponly=True,
            samesite="lax",
        )
    return AuthorizeResponse(authorization_url=url, expires_at=started.expires_at)


class CompleteRequest(Strict):
    model_config = ConfigDict(extra="forbid")

    completion_ticket: str = Field(
        min_length=1, max_length=200, description="From the callback's redirect to the return_url."
    )
    user_id: UserId | None = Field(
        default=None, description="Services only: the cieTrade user who started the Connect."
    )


@router.post(
    "/connections/{connection_id}/complete",
    response_model=ConnectionOut,
    responses={**ERRORS, **problem_responses(400), **CONFLICT, **UPSTREAM},
    summary="Finish Connect with the callback's completion ticket",
    description="Only the cieTrade user who started the Connect (a service: "
    "`connections:write` and that `user_id`) may redeem the ticket; the "
    "linking rules run here. Another caller gets 403 "
    "`completion_not_allowed` and the ticket stays usable by its owner.",
)
async def complete(
    rt: RuntimeDep, caller: CurrentCaller, connection_id: ConnectionID, body: CompleteRequest
) -> ConnectionOut:
    await flows.complete_with_ticket(
        rt, caller, connection_id=connection_id, ticket=body.completion_ticket, user_id=body.user_id
    )
    async with rt.sessionmaker() as session:
        conn = await service.load_for_read(session, caller, connection_id)
        return await service.present(session, conn)


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def _result_page(outcome: flows.CallbackOutcome) -> str:
    if outcome.result == "connected":
        heading, text = "Connected to QuickBooks", "You can close this window and return to cieTrade."
    elif outcome.result == "confirmation_required":
        heading = "Confirmation needed"
        text = (
            "A different QuickBooks user or company signed in than the one this connection had. "
            'Return to cieTrade to confirm ("Connect anyway") or decline.'
        )
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


_PAGE_OR_PROBLEM = {
    "text/html": {"schema": {"type": "string"}},
    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}},
}
_CALLBACK_FAILURES = {
    400: "The authorization state is unknown, used or expired, started in another browser (cookie "
    "mode), or Intuit's callback is not usable",
    403: "The user declined, or is not a Master admin or Company Administrator",
    404: "The connection was deleted during the authorization",
    409: "A linking rule refused the QuickBooks user or company",
    502: "Intuit answered something the broker cannot use",
    503: "Intuit could not be reached (with Retry-After)",
}


@router.get(
    "/callback",
    response_class=HTMLResponse,
    responses={
        303: {
            "description": "Back to the return_url with connection_id, result, "
            "completion_ticket (ticket mode) and error (never a "
            "code, token or state)"
        },
        **{
            status: {
                "description": f"{text}: a small HTML page says so, or "
                "problem+json for a client that accepts only JSON",
                "content": _PAGE_OR_PROBLEM,
            }
            for status, text in _CALLBACK_FAILURES.items()
        },
        **problem_responses(413, 422),
    },
    summary="Intuit's redirect back to the broker (browser only)",
)
async def callback(
    request: Request,
    rt: RuntimeDep,
    code: Annotated[str | None, Query(max_length=2000)] = None,
    state: Annotated[str | None, Query(max_length=2000)] = None,
    realm_id: Annotated[str | None, Query(alias="realmId", max_length=64)] = None,
    error: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    outcome = await flows.complete_callback(
        rt, state=state, code=code, realm_id=realm_id, error=error, cookies=request.cookies
    )
    response = _callback_answer(request, outcome)
    if outcome.connection_id is not None and rt.settings.connect_binding == "cookie":
        response.delete_cookie(
            binding_cookie(outcome.connection_id), path="/", secure=True, httponly=True, samesite="lax"
        )
    return response


def _callback_answer(request: Request, outcome: flows.CallbackOutcome) -> Response:
    if outcome.return_url:
        params = {"connection_id": str(outcome.connection_id), "result": outcome.result}
        if outcome.completion_ticket is not None:
            params["completion_ticket"] = outcome.completion_ticket
        if outcome.error is not None:
            params["error"] = outcome.error.code
        return RedirectResponse(
            _with_query(outcome.return_url, params), status_code=303, headers=_CALLBACK_HEADERS
        )
    if outcome.error is None:
        return HTMLResponse(_result_page(outcome), headers=_CALLBACK_HEADERS)
    headers = {**outcome.error.headers, **_CALLBACK_HEADERS}
    accept = request.headers.get("accept", "")
    if "html" not in accept and "json" in accept:
        response = problem_response(outcome.error)
        response.headers.update(_CALLBACK_HEADERS)
        return response
    return HTMLResponse(_result_page(outcome), status_code=outcome.error.status, headers=headers)


@router.post(
    "/connections/{connection_id}/pending-link/confirm",
    response_model=ConnectionOut,
    responses={**ERRORS, **CONFLICT},
    summary='"Connect anyway" after the fact',
)
async def confirm_pending_link(
    session: SessionDep, rt: RuntimeDep, caller: CurrentCaller, connection_id: ConnectionID
) -> ConnectionOut:
    conn = await service.load_for_write(session, caller, connection_id)
    await flows.confirm_pending_link(session, rt, conn, actor=caller.actor)
    return await service.present(session, conn)


@router.delete(
    "/connections/{connection_id}/pending-link",
    status_code=204,
    responses=ERRORS,
    summary="Decline the pending link: revoke and discard its credentials",
)
async def decline_pending_link(
    session: SessionDep, rt: RuntimeDep, caller: CurrentCaller, connection_id: ConnectionID
) -> Response:
    conn = await service.load_for_write(session, caller, connection_id)
    await flows.decline_pending_link(session, rt, conn, actor=caller.actor)
    return Response(status_code=204)
