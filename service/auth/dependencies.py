"""The one authentication dependency: a Bearer JWT or an X-API-Key, offered in Swagger UI."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.auth.api_keys import MAX_API_KEY_CHARS, find_active_key, hash_key
from service.auth.callers import Caller
from service.auth.jwt import MAX_BEARER_TOKEN_CHARS, REJECTED_JWT, JWTVerifier
from service.errors import Unauthorized

bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="UserJWT",
    description="A cieTrade user's JWT (claims sub, tenant_id, exp).",
)
api_key_scheme = APIKeyHeader(
    name="X-API-Key", auto_error=False, scheme_name="ServiceAPIKey",
    description="An internal service's API key (created with `qbo-broker api-key create`).",
)


async def authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    api_key: Annotated[str | None, Security(api_key_scheme)],
) -> Caller:
    if api_key:
        if len(api_key) > MAX_API_KEY_CHARS:
            raise Unauthorized("The API key is not valid.")
        runtime = request.app.state.runtime

        async def load() -> Caller | None:
            # Its own short transaction: most requests are served from the cache, with no session.
            async with runtime.sessionmaker() as session, session.begin():
                row = await find_active_key(session, api_key)
            if row is None:
                return None
            return Caller(kind="service", subject=row.name, scopes=frozenset(row.scopes),
                          api_key_id=row.id)

        cached = await runtime.caches.api_keys.get_or_load(hash_key(api_key), load)
        if cached is None:
            raise Unauthorized("The API key is not valid or has been revoked.")
        caller = cached
    elif bearer is not None:
        if len(bearer.credentials) > MAX_BEARER_TOKEN_CHARS:  # before anything parses it
            raise Unauthorized("The bearer token is too long.")
        verifier: JWTVerifier = request.app.state.jwt_verifier
        if not verifier.configured:
            raise Unauthorized("User tokens are not accepted: no JWT verification is configured.")
        # Found invalid a moment ago by the fast lane (service.fastlane): the same answer, without
        # verifying it again.
        rejected = getattr(request.state, REJECTED_JWT, None)
        if rejected is not None and rejected[0] == bearer.credentials:
            raise rejected[1]
        claims = await verifier.verify(bearer.credentials)
        caller = Caller(kind="user", subject=claims["sub"], tenant_id=claims["tenant_id"])
    else:
        raise Unauthorized("Send a Bearer JWT or an X-API-Key.")
    request.state.caller = caller
    return caller


CurrentCaller = Annotated[Caller, Depends(authenticate)]
