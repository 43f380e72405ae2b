"""Verification of the cieTrade frontend's user JWTs (HS256 secret, RS256 key or JWKS)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
from jwt import PyJWKClient

from service.config import Settings
from service.errors import Unauthorized

_REQUIRED_CLAIMS = ["exp", "sub", "tenant_id"]
# The request state's key for (token, error) of a bearer token found invalid before the app's
# own authentication ran (service.fastlane), which then answers without verifying it again.
REJECTED_JWT = "qbo_broker_rejected_jwt"
_VERIFIED_MAX = 10_000


class JWTVerifier:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._jwks = (PyJWKClient(settings.jwt_jwks_url, cache_keys=True, lifespan=300)
                      if settings.jwt_jwks_url else None)
        self._verified: dict[str, dict[str, Any]] = {}

    @property
    def configured(self) -> bool:
        s = self._settings
        return bool(s.jwt_secret or s.jwt_public_key or self._jwks)

    def remembered(self, token: str) -> dict[str, Any] | None:
        """The claims of a token verified earlier and not yet expired; None otherwise."""
        hit = self._verified.get(token)
        return hit if hit is not None and hit["exp"] > time.time() else None

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, if valid. Verified tokens are remembered until they expire (a
        JWT cannot change, so there is nothing to invalidate)."""
        hit = self.remembered(token)
        if hit is not None:
            return hit
        claims = await self._verify(token)
        self._verified[token] = claims
        if len(self._verified) > _VERIFIED_MAX:
            self._verified.pop(next(iter(self._verified)))
        return claims

    async def _verify(self, token: str) -> dict[str, Any]:
        s = self._settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("The bearer token is not a JWT.") from None
        alg = header.get("alg")
        if alg == "HS256" and s.jwt_secret:
            key: Any = s.jwt_secret
        elif alg == "RS256" and s.jwt_public_key:
            key = s.jwt_public_key
        elif alg == "RS256" and self._jwks is not None:
            try:
                # PyJWKClient fetches synchronously; keep the event loop free.
                key = (await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)).key
            except jwt.PyJWTError:
                raise Unauthorized("The bearer token's signing key is unknown.") from None
        else:
            raise Unauthorized("The bearer token's algorithm is not accepted.")
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg],
                audience=s.jwt_audience, issuer=s.jwt_issuer,
                options={"require": list(_REQUIRED_CLAIMS), "verify_aud": s.jwt_audience is not None},
                leeway=30,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("The bearer token has expired.") from None
        except jwt.PyJWTError:
            raise Unauthorized("The bearer token is not valid.") from None
        for claim in ("sub", "tenant_id"):
            value = claims.get(claim)
            if not isinstance(value, str) or not value or len(value) > 128:
                raise Unauthorized(f"The bearer token's {claim} claim is not a valid id.")
        # PyJWT accepts a numeric string too; the cache of verified tokens compares numbers.
        return {**claims, "exp": int(claims["exp"])}


def issue_dev_token(secret: str, *, tenant_id: str, user_id: str,
                    ttl_seconds: int = 12 * 3600, issuer: str | None = None,
                    audience: str | None = None) -> str:
    """An HS256 token as the cieTrade frontend would send, for development and tests."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "tenant_id": tenant_id, "iat": now,
                              "exp": now + ttl_seconds}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
