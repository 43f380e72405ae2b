"""Intuit's machine endpoints: discovery, JWKS, token, revoke, userinfo and CompanyInfo.

Each of the four "live" endpoints (token, revoke, userinfo, companyinfo) goes through the same
prelude: an `intuit_tid`, the injected latency and any queued fault. Error bodies follow
Intuit's shapes: RFC 6749 JSON for OAuth, the `Fault` document for the accounting API.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote_plus

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .config import ACCOUNTING_SCOPE, KNOWN_SCOPES
from .faults import DEFAULT_TIMEOUT_S, Fault, new_intuit_tid
from .state import Company, Grant, Issued, OAuthError, Store

_PACIFIC = timezone(timedelta(hours=-7))  # Intuit stamps accounting answers in Pacific time
_GRANT_TYPES = ("authorization_code", "refresh_token")


class FaultDroppedConnection(Exception):
    """Raised after the response has started, so the server cuts the connection mid-answer."""


class _DroppedResponse(Response):
    """Starts a response and dies: uvicorn closes the socket, the client never gets a body."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2048")],
            }
        )
        raise FaultDroppedConnection("connection dropped by an injected drop_after_rotate fault")


def intuit_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, _PACIFIC).isoformat(timespec="milliseconds")


def _json(body: Any, status: int, tid: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        body, status_code=status, headers={"intuit_tid": tid, "Cache-Control": "no-store", **headers}
    )


def _oauth_error(exc: OAuthError, tid: str) -> JSONResponse:
    body: dict[str, str] = {"error": exc.error}
    if exc.description:
        body["error_description"] = exc.description
    extra = {"WWW-Authenticate": 'Basic realm="Intuit"'} if exc.status == 401 else {}
    return _json(body, exc.status, tid, **extra)


def _fault_body(endpoint: str, status: int, now: float) -> dict[str, Any]:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    if endpoint == "companyinfo":
        if status == 429:
            error = {
                "Message": "message=ThrottleExceeded; errorCode=003001; statusCode=429",
                "Detail": "The request limit was reached.",
                "code": "3001",
            }
            return {"Fault": {"Error": [error], "type": "SERVICE"}, "time": intuit_time(now)}
        error = {
            "Message": "An application error has occurred while processing your request",
            "Detail": f"System Failure Error: {phrase}",
            "code": "10000",
        }
        return {"Fault": {"Error": [error], "type": "SystemFault"}, "time": intuit_time(now)}
    if status == 429:
        return {"error": "too_many_requests", "error_description": "Too many requests"}
    kind = "temporarily_unavailable" if status == 503 else "server_error"
    return {"error": kind if status >= 500 else "invalid_request", "error_description": phrase}


def _client_ok(request: Request, client_id: str, client_secret: str) -> bool:
    """HTTP Basic client authentication, the only method Intuit's token endpoint accepts."""
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    given_id, sep, given_secret = decoded.partition(":")
    if not sep:
        return False

    def same(a: str, b: str) -> bool:
        return secrets.compare_digest(a.encode(), b.encode())

    # RFC 6749 2.3.1 form-encodes both parts first; Intuit's own clients do not. Accept both.
    return (same(given_id, client_id) and same(given_secret, client_secret)) or (
        same(unquote_plus(given_id), client_id) and same(unquote_plus(given_secret), client_secret)
    )


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def oauth_router(store: Store) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    settings = store.settings

    async def prelude(endpoint: str, *, is_refresh: bool = False) -> Fault | None:
        """Consume a queued fault, then wait out the injected latency and any timeout fault."""
        fault = store.faults.take(endpoint, is_refresh=is_refresh)
        if store.config.latency_ms > 0:
            await asyncio.sleep(store.config.latency_ms / 1000)
        if fault is not None and fault.kind == "timeout":
            await asyncio.sleep(DEFAULT_TIMEOUT_S if fault.delay_s is None else fault.delay_s)
        return fault

    def status_fault(endpoint: str, fault: Fault, tid: str) -> JSONResponse:
        status = fault.status or 503
        extra = {"Retry-After": str(max(1, int(fault.delay_s or 1)))} if status == 429 else {}
        return _json(_fault_body(endpoint, status, store.now()), status, tid, **extra)

    def discovery() -> dict[str, Any]:
        base = settings.api_url  # machine endpoints; the browser only visits authorize
        return {
            "issuer": settings.issuer,
            "authorization_endpoint": f"{settings.public_url}/connect/oauth2",
            "token_endpoint": f"{base}/oauth2/v1/tokens/bearer",
            "userinfo_endpoint": f"{base}/v1/openid_connect/userinfo",
            "revocation_endpoint": f"{base}/v2/oauth2/tokens/revoke",
            "jwks_uri": f"{base}/op/v1/jwks",
            "response_types_supported": ["code"],
            "grant_types_supported": list(_GRANT_TYPES),
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": list(KNOWN_SCOPES),
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            "claims_supported": ["aud", "exp", "iat", "iss", "realmid", "sub", "auth_time"],
        }

    @router.get("/.well-known/openid_configuration")
    @router.get("/.well-known/openid_sandbox_configuration")
    async def openid_configuration() -> JSONResponse:
        return JSONResponse(discovery())

    @router.get("/op/v1/jwks")
    async def jwks() -> JSONResponse:
        return JSONResponse(store.signing_key.jwks())

    def token_body(issued: Issued, request: Request) -> dict[str, Any]:
        grant = issued.grant
        body: dict[str, Any] = {
            "token_type": "bearer",
            "access_token": issued.access_token,
            "refresh_token": issued.refresh_token,
            "expires_in": issued.expires_in,
            "x_refresh_token_expires_in": issued.refresh_expires_in,
        }
        if request.headers.get("x-include-refresh-token-hard-expires-in", "").lower() == "true":
            body["x_refresh_token_hard_expires_in"] = issued.hard_expires_in
        if issued.first_issue and "openid" in grant.scopes:
            body["id_token"] = id_token(grant, issued.nonce)
        return body

    def id_token(grant: Grant, nonce: str | None) -> str:
        now = int(store.now())
        claims: dict[str, Any] = {
            "sub": grant.sub,
            "aud": [grant.client_id],
            "iss": settings.issuer,
            "iat": now,
            "exp": now + 3600,
            "auth_time": int(grant.auth_time),
        }
        if nonce is not None:
            claims["nonce"] = nonce
        if grant.realm_id is not None:
            claims["realmid"] = grant.realm_id
        return store.signing_key.sign(claims)

    def run_grant(request: Request, fields: dict[str, list[str]] | None) -> Issued:
        if not _client_ok(request, settings.client_id, settings.client_secret):
            raise OAuthError("invalid_client", None, 401)
        if fields is None:
            raise OAuthError("invalid_request", "Content-Type must be application/x-www-form-urlencoded")
        repeated = sorted(k for k, v in fields.items() if len(v) > 1)
        if repeated:
            raise OAuthError("invalid_request", f"Repeated parameters: {', '.join(repeated)}")
        one = {k: v[0] for k, v in fields.items()}
        grant_type = one.get("grant_type")
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is required")
        if grant_type == "authorization_code":
            if not one.get("code") or not one.get("redirect_uri"):
                raise OAuthError("invalid_request", "code and redirect_uri are required")
            return store.exchange_code(
                settings.client_id, one["code"], one["redirect_uri"], one.get("code_verifier")
            )
        if grant_type == "refresh_token":
            if not one.get("refresh_token"):
                raise OAuthError("invalid_request", "refresh_token is required")
            return store.refresh(settings.client_id, one["refresh_token"])
        raise OAuthError("unsupported_grant_type", f"Unsupported grant_type: {grant_type}")

    @router.post("/oauth2/v1/tokens/bearer")
    async def token(request: Request) -> Response:
        tid = new_intuit_tid()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw = await request.body()
        fields: dict[str, list[str]] | None = None
        if content_type == "application/x-www-form-urlencoded":
            fields = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        grant_type = (fields or {}).get("grant_type", [""])[0]
        if grant_type in _GRANT_TYPES:
            label = grant_type
        else:
            label = "unsupported" if grant_type else "missing"
        is_refresh = grant_type == "refresh_token"
        realm = store.realm_of_refresh_token((fields or {}).get("refresh_token", [""])[0])
        with store.stats.refresh_in_flight(realm if is_refresh else None):
            fault = await prelude("token", is_refresh=is_refresh)
            if fault is not None and fault.kind == "status":
                store.stats.count_token(label, f"status_{fault.status or 503}", realm)
                return status_fault("token", fault, tid)
            try:
                issued = run_grant(request, fields)
            except OAuthError as exc:
                store.stats.count_token(label, exc.error, realm)
                return _oauth_error(exc, tid)
            realm = issued.grant.realm_id
            if fault is not None and fault.kind == "drop_after_rotate":
                # Intuit rotated; the answer never arrives. With delay_s the answer is only late.
                store.stats.count_token(label, "dropped_after_rotate", realm)
                if fault.delay_s is None:
                    return _DroppedResponse()
                await asyncio.sleep(fault.delay_s)
            else:
                store.stats.count_token(label, "ok", realm)
            return _json(token_body(issued, request), 200, tid, Pragma="no-cache")

    @router.post("/v2/oauth2/tokens/revoke")
    async def revoke(request: Request) -> Response:
        tid = new_intuit_tid()
        fault = await prelude("revoke")
        if fault is not None and fault.kind == "status":
            store.stats.count("revoke", f"status_{fault.status or 503}")
            return status_fault("revoke", fault, tid)
        if not _client_ok(request, settings.client_id, settings.client_secret):
            store.stats.count("revoke", "invalid_client")
            return _oauth_error(OAuthError("invalid_client", None, 401), tid)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        token_value: Any = None
        if content_type == "application/json":
            try:
                document = json.loads(await request.body())
                token_value = document.get("token") if isinstance(document, dict) else None
            except ValueError:
                token_value = None
        if not isinstance(token_value, str) or not token_value:
            store.stats.count("revoke", "invalid_request")
            return _oauth_error(
                OAuthError(
                    "invalid_request",
                    'Expected a JSON body {"token": "..."} with Content-Type: application/json',
                ),
                tid,
            )
        revoked = store.revoke(settings.client_id, token_value)
        store.stats.count("revoke", "ok" if revoked else "unknown_token")
        return Response(status_code=200, headers={"intuit_tid": tid, "Cache-Control": "no-store"})

    @router.get("/v1/openid_connect/userinfo")
    async def userinfo(request: Request) -> Response:
        tid = new_intuit_tid()
        fault = await prelude("userinfo")
        if fault is not None and fault.kind == "status":
            store.stats.count("userinfo", f"status_{fault.status or 503}")
            return status_fault("userinfo", fault, tid)
        checked = store.check_access(_bearer(request))
        if isinstance(checked, str):
            store.stats.count("userinfo", "invalid_token")
            return _json(
                {"error": "invalid_token", "error_description": checked},
                401,
                tid,
                **{"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        grant, user = checked
        if "openid" not in grant.scopes:
            store.stats.count("userinfo", "insufficient_scope")
            return _json(
                {"error": "insufficient_scope", "error_description": "openid scope required"},
                403,
                tid,
                **{"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
            )
        body: dict[str, Any] = {"sub": user.sub}
        if "email" in grant.scopes:
            body.update(email=user.email, emailVerified=user.email_verified)
        if "profile" in grant.scopes:
            body.update(givenName=user.given_name, familyName=user.family_name)
        store.stats.count("userinfo", "ok")
        return _json(body, 200, tid)

    def auth_fault(detail: str, tid: str) -> JSONResponse:
        error = {
            "Message": "message=AuthenticationFailed; errorCode=003200; statusCode=401",
            "Detail": detail,
            "code": "3200",
        }
        return _json(
            {"Fault": {"Error": [error], "type": "AUTHENTICATION"}, "time": intuit_time(store.now())},
            401,
            tid,
            **{"WWW-Authenticate": 'Bearer realm="Intuit", error="invalid_token"'},
        )

    @router.get("/v3/company/{realm_id}/companyinfo/{company_id}")
    async def companyinfo(realm_id: str, company_id: str, request: Request) -> Response:
        tid = new_intuit_tid()
        fault = await prelude("companyinfo")
        if fault is not None and fault.kind == "status":
            store.stats.count("companyinfo", f"status_{fault.status or 503}")
            if (fault.status or 503) == 429:
                store.traffic.count_throttled(realm_id, "fault")
            return status_fault("companyinfo", fault, tid)
        checked = store.check_access(_bearer(request))
        if isinstance(checked, str):
            store.stats.count("companyinfo", "unauthorized")
            return auth_fault(f"{checked}: the OAuth 2.0 access token is invalid", tid)
        grant, _user = checked
        company = store.companies.get(realm_id)
        if grant.realm_id != realm_id or company is None:
            store.stats.count("companyinfo", "unauthorized")
            return auth_fault("Token not valid for this company (realmId)", tid)
        if ACCOUNTING_SCOPE not in grant.scopes:
            store.stats.count("companyinfo", "forbidden")
            error = {
                "Message": "message=ApplicationAuthorizationFailed; errorCode=003100; statusCode=403",
                "Detail": "The app is not authorized for the accounting scope",
                "code": "3100",
            }
            return _json(
                {"Fault": {"Error": [error], "type": "AUTHENTICATION"}, "time": intuit_time(store.now())},
                403,
                tid,
            )
        # An Accounting API call like the others: throttled, observed and metered (CorePlus).
        refusal = store.traffic.enter(realm_id, grant.client_id, store.config.limits)
        if refusal is not None:
            store.stats.count("companyinfo", "throttled")
            return _json(
                _fault_body("companyinfo", 429, store.now()),
                429,
                tid,
                **{"Retry-After": str(refusal.retry_after)},
            )
        store.traffic.leave(realm_id, grant.client_id)
        store.traffic.meter(realm_id, "coreplus", "companyinfo")
        if company_id != realm_id:
            store.stats.count("companyinfo", "not_found")
            error = {
                "Message": "Object Not Found",
                "Detail": "Object Not Found : Something "
                "you're trying to use has been made inactive. Check the fields with "
                "accounts, customers, items, vendors or employees.",
                "code": "610",
                "element": "",
            }
            return _json(
                {"Fault": {"Error": [error], "type": "ValidationFault"}, "time": intuit_time(store.now())},
                400,
                tid,
            )
        store.stats.count("companyinfo", "ok")
        return _json({"CompanyInfo": company_info(company), "time": intuit_time(store.now())}, 200, tid)

    return router


def company_info(company: Company) -> dict[str, Any]:
    """A CompanyInfo entity shaped like QuickBooks Online's (Id is "1" there too)."""
    address = {
        "Id": "1",
        "Line1": company.line1,
        "City": company.city,
        "Country": company.country,
        "CountrySubDivisionCode": company.region,
        "PostalCode": company.postal_code,
    }
    created = intuit_time(company.created_at)
    return {
        "CompanyName": company.name,
        "LegalName": company.legal_name,
        "CompanyAddr": address,
        "CustomerCommunicationAddr": address,
        "LegalAddr": address,
        "CustomerCommunicationEmailAddr": {"Address": company.email},
        "PrimaryPhone": {},
        "CompanyStartDate": created[:10],
        "FiscalYearStartMonth": "January",
        "Country": company.country,
        "Email": {"Address": company.email},
        "WebAddr": {},
        "SupportedLanguages": "en",
        "NameValue": [
            {"Name": "NeoEnabled", "Value": "true"},
            {"Name": "IndustryType", "Value": "Recycling"},
            {"Name": "CompanyType", "Value": "Other"},
            {"Name": "SubscriptionStatus", "Value": "PAID"},
            {"Name": "OfferingSku", "Value": "QuickBooks Online Plus"},
        ],
        "domain": "QBO",
        "sparse": False,
        "Id": "1",
        "SyncToken": "4",
        "MetaData": {"CreateTime": created, "LastUpdatedTime": created},
    }
