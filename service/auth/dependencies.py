"""The one authentication: a Bearer JWT or an X-API-Key. `identify` finds the caller of a request;
the FastAPI dependency (offered in Swagger UI) and the direct routes both call it."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from service.auth.api_keys import MAX_API_KEY_CHARS, find_active_key, hash_key
from service.auth.callers import Caller
from service.auth.jwt import MAX_BEARER_TOKEN_CHARS, JWTVerifier
from service.core.errors import Unauthorized

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="UserJWT",
    description="A cieTrade user's JWT (claims sub, tenant_id, exp).",
)
api_key_scheme = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="ServiceAPIKey",
    description="An internal service's API key (created with `qbo-broker api-key create`).",
)


async def identify(request: Request) -> Caller:
    """The request's caller. An API key wins over a JWT; either is read from the first header of
    its name, as Swagger UI's schemes above read them. Raises Unauthorized."""
    api_key = request.headers.get("x-api-key")
    if api_key:
        return await _service(request, api_key)
    authorization = request.headers.get("authorization")
    scheme, token = get_authorization_scheme_param(authorization)
    if authorization and token and scheme.lower() == "bearer":
        return await _user(request, token)
    raise Unauthorized("Send a Bearer JWT or an X-API-Key.")


async def _service(request: Request, api_key: str) -> Caller:
    if len(api_key) > MAX_API_KEY_CHARS:
        raise Unauthorized("The API key is not valid.")
    runtime = request.app.state.runtime

    async def load() -> Caller | None:
        # Its own short transaction: most requests are served from the cache, with no session.
        async with runtime.sessionmaker() as session, session.begin():
            row = await find_active_key(session, api_key)
        if row is None:
            return None
        return Caller(kind="service", subject=row.name, scopes=frozenset(row.scopes), api_key_id=row.id)

    caller: Caller | None = await runtime.caches.api_keys.get_or_load(hash_key(api_key), load)
    if caller is None:
        raise Unauthorized("The API key is not valid or has been revoked.")
    return caller


async def _user(request: Request, token: str) -> Caller:
    if len(token) > MAX_BEARER_TOKEN_CHARS:  # before anything parses it
        raise Unauthorized("The bearer token is too long.")
    verifier: JWTVerifier = request.app.state.runtime.jwt_verifier
    if not verifier.configured:
        raise Unauthorized("User tokens are not accepted: no JWT verification is configured.")
    claims = await verifier.verify(token)
    return Caller(kind="user", subject=claims["sub"], tenant_id=claims["tenant_id"])


async def authenticate(
    request: Request,
    # Declared for the OpenAPI document and Swagger UI's "Authorize"; identify() reads the same
    # headers the same way.
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    _api_key: Annotated[str | None, Security(api_key_scheme)],
) -> Caller:
    return await identify(request)


CurrentCaller = Annotated[Caller, Depends(authenticate)]
