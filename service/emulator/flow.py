"""The browser side of Intuit's authorization: `/connect/oauth2` and its sign-in/consent pages.

A valid authorize request becomes a server-side flow; the browser then walks through
sign-in -> company -> (admin check) -> Connect / Switch Admin, each step a plain HTML page
whose forms post back to the flow and answer 303 to it, until the flow ends in a redirect to
the app's registered redirect_uri with a code or `error=access_denied`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit, urlunsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from . import pages
from .config import KNOWN_SCOPES
from .state import Company, Flow, Store, User

SESSION_COOKIE = "intuit_emulator_session"
_NO_STORE = {"Cache-Control": "no-store"}


@dataclass
class Step:
    """Where a flow stands for the signed-in user (recomputed on every request)."""

    kind: str  # signin | no_company | choose_company | not_admin | switch_admin | authorize
    user: User | None = None
    company: Company | None = None
    companies: list[Company] = field(default_factory=list)
    other: User | None = None  # Switch Admin: the user who owns the live grant


def _html(content: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(content, status_code=status, headers=_NO_STORE)


def _error(title: str, message: str, code: str, status: int = 400) -> HTMLResponse:
    return _html(pages.error_page(title, message, code), status)


def _back_to_flow(flow: Flow) -> RedirectResponse:
    # Relative, so the flow works whatever host name the browser used to reach the emulator.
    return RedirectResponse(f"/connect/oauth2/flow/{flow.flow_id}", status_code=303, headers=_NO_STORE)


def _to_client(redirect_uri: str, params: dict[str, str]) -> RedirectResponse:
    parts = urlsplit(redirect_uri)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return RedirectResponse(urlunsplit(parts._replace(query=query)), status_code=303, headers=_NO_STORE)


def flow_router(store: Store) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    settings = store.settings

    def resolve(flow: Flow, request: Request) -> Step:
        found = store.session(request.cookies.get(SESSION_COOKIE))
        if found is None:
            return Step("signin")
        _session, user = found
        if not flow.needs_company:
            return Step("authorize", user)
        companies = store.companies_of(user)
        if not companies:
            return Step("no_company", user)
        if flow.realm_id not in user.companies or flow.realm_id not in store.companies:
            if len(companies) > 1:
                return Step("choose_company", user, companies=companies)
            flow.realm_id = companies[0].realm_id  # exactly one company: Intuit skips the chooser
        company = store.companies[str(flow.realm_id)]
        if not user.is_admin_of(company.realm_id):
            return Step("not_admin", user, company)
        grant = store.live_grant(flow.client_id, company.realm_id, user.sub)
        if grant is not None and grant.sub != user.sub:
            return Step("switch_admin", user, company, other=store.users.get(grant.sub))
        return Step("authorize", user, company)

    def render(flow: Flow, step: Step, error: str | None = None, status: int = 200) -> Response:
        fid = flow.flow_id
        if step.kind == "signin" or step.user is None:
            names = {realm: c.name for realm, c in store.companies.items()}
            return _html(pages.signin_page(fid, list(store.users.values()), names, error), status)
        if step.kind == "no_company":
            return _html(pages.no_company_page(fid, step.user), status)
        if step.kind == "choose_company":
            return _html(pages.company_page(fid, step.user, step.companies, error), status)
        if step.kind == "not_admin" and step.company is not None:
            admins = store.admins_of(step.company.realm_id)
            return _html(pages.not_admin_page(fid, step.user, step.company, admins), status)
        if step.kind == "switch_admin" and step.company is not None:
            return _html(
                pages.switch_admin_page(
                    fid, step.user, step.company, settings.app_name, step.other, flow.scopes
                ),
                status,
            )
        return _html(
            pages.authorize_page(fid, step.user, step.company, settings.app_name, flow.scopes), status
        )

    def live_flow(flow_id: str) -> Flow | Response:
        flow = store.flow(flow_id)
        if flow is None:
            return _error(
                "This page has expired",
                "This sign-in request is unknown or has "
                "expired. Go back to the app and start connecting again.",
                "flow_expired",
                404,
            )
        if flow.finished:
            return _error(
                "This request was already completed",
                "This sign-in request has already been used. Go back to the app and start connecting again.",
                "flow_completed",
            )
        return flow

    @router.get("/connect/oauth2")
    async def authorize(request: Request) -> Response:
        params = request.query_params
        repeated = sorted({k for k in params if len(params.getlist(k)) > 1})
        client_id = params.get("client_id", "")
        redirect_uri = params.get("redirect_uri", "")
        # Until client and redirect_uri are known good, nothing may be sent back to the URI.
        if not client_id or not secrets.compare_digest(client_id.encode(), settings.client_id.encode()):
            return _error(
                "We're sorry, something went wrong",
                "The client_id query parameter is missing or does not belong to any app.",
                "invalid_client",
            )
        if redirect_uri not in settings.redirect_uris:
            return _error(
                "We're sorry, something went wrong",
                "The redirect_uri query parameter"
                " value is invalid. Make sure it is listed in the Redirect URIs section"
                " on your app's keys tab and matches it exactly.",
                "invalid_redirect_uri",
            )
        if repeated:
            return _error(
                "We're sorry, something went wrong",
                f"These parameters were sent more than once: {', '.join(repeated)}.",
                "invalid_request",
            )
        response_type = params.get("response_type")
        if not response_type:
            return _error(
                "We're sorry, something went wrong",
                "The response_type query parameter is missing.",
                "invalid_request",
            )
        if response_type != "code":
            return _error(
                "We're sorry, something went wrong",
                "The response_type query parameter must be 'code'.",
                "unsupported_response_type",
            )
        scopes = list(dict.fromkeys(params.get("scope", "").split()))
        unknown = [s for s in scopes if s not in KNOWN_SCOPES]
        if not scopes or unknown:
            detail = f"Unknown scopes: {', '.join(unknown)}." if unknown else "No scope given."
            return _error(
                "We're sorry, something went wrong",
                f"The scope query parameter is invalid. {detail}",
                "invalid_scope",
            )
        state = params.get("state")
        if not state:
            return _error(
                "We're sorry, something went wrong",
                "The state query parameter is required.",
                "invalid_request",
            )
        challenge = params.get("code_challenge")
        if challenge is not None and params.get("code_challenge_method") != "S256":
            return _error(
                "We're sorry, something went wrong",
                "Only the S256 code_challenge_method is supported.",
                "invalid_request",
            )
        flow = store.create_flow(
            client_id, redirect_uri, scopes, state, nonce=params.get("nonce"), code_challenge=challenge
        )
        return RedirectResponse(f"/connect/oauth2/flow/{flow.flow_id}", status_code=302, headers=_NO_STORE)

    @router.get("/connect/oauth2/flow/{flow_id}")
    async def flow_page(flow_id: str, request: Request) -> Response:
        flow = live_flow(flow_id)
        if isinstance(flow, Response):
            return flow
        return render(flow, resolve(flow, request))

    @router.post("/connect/oauth2/flow/{flow_id}/signin")
    async def signin(flow_id: str, request: Request) -> Response:
        flow = live_flow(flow_id)
        if isinstance(flow, Response):
            return flow
        form = await request.form()
        user = store.user_by_email(str(form.get("email") or ""))
        if user is None:
            return render(
                flow,
                Step("signin"),
                error="We don't recognize this user ID or email. Try again or choose one of the users above.",
            )
        store.end_session(request.cookies.get(SESSION_COOKIE))
        sid = store.create_session(user.sub)
        flow.realm_id = None  # a company picked by a previous user is not this user's choice
        response = _back_to_flow(flow)
        response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="lax", path="/")
        return response

    @router.post("/connect/oauth2/flow/{flow_id}/signout")
    async def signout(flow_id: str, request: Request) -> Response:
        flow = live_flow(flow_id)
        if isinstance(flow, Response):
            return flow
        store.end_session(request.cookies.get(SESSION_COOKIE))
        flow.realm_id = None
        response = _back_to_flow(flow)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @router.post("/connect/oauth2/flow/{flow_id}/company")
    async def choose_company(flow_id: str, request: Request) -> Response:
        flow = live_flow(flow_id)
        if isinstance(flow, Response):
            return flow
        step = resolve(flow, request)
        if step.user is None:
            return _back_to_flow(flow)
        realm_id = str((await request.form()).get("realm_id") or "")
        if realm_id not in step.user.companies or realm_id not in store.companies:
            companies = store.companies_of(step.user)
            return render(
                flow,
                Step("choose_company", step.user, companies=companies),
                error="Choose one of your companies.",
            )
        flow.realm_id = realm_id
        return _back_to_flow(flow)

    @router.post("/connect/oauth2/flow/{flow_id}/consent")
    async def consent(flow_id: str, request: Request) -> Response:
        flow = live_flow(flow_id)
        if isinstance(flow, Response):
            return flow
        form = await request.form()
        decision = form.get("decision")
        if decision == "deny":
            # Declining (or "Back to app" after the admin refusal) returns without a description.
            flow.finished = True
            return _to_client(flow.redirect_uri, {"error": "access_denied", "state": flow.state})
        if decision != "allow":
            return _error(
                "We're sorry, something went wrong", "The decision must be allow or deny.", "invalid_request"
            )
        step = resolve(flow, request)
        if step.user is None or step.kind not in ("authorize", "switch_admin", "not_admin"):
            return _back_to_flow(flow)
        if step.kind == "not_admin":
            return render(flow, step, status=403)
        if step.kind == "switch_admin" and form.get("connect_anyway") != "true":
            # Taking over another admin's connection needs the explicit "Connect anyway".
            return render(flow, step)
        found = store.session(request.cookies.get(SESSION_COOKIE))
        auth_time = found[0].created_at if found else store.now()
        code = store.issue_code(flow, step.user, auth_time)
        params = {"code": code, "state": flow.state}
        if flow.needs_company and flow.realm_id is not None:
            params["realmId"] = flow.realm_id
        return _to_client(flow.redirect_uri, params)

    return router
