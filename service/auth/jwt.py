"""Verification of the cieTrade frontend's user JWTs (HS256 secret, RS256 key or JWKS)."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import jwt
from jwt import PyJWKClient
from jwt.exceptions import PyJWKClientConnectionError, PyJWKClientError, PyJWKSetError

from service.core.config import Settings
from service.core.errors import ProblemError, Unauthorized

_REQUIRED_CLAIMS = ["exp", "sub", "tenant_id"]
_VERIFIED_MAX = 10_000
# Longer bearer tokens are refused before anything parses them (a cieTrade JWT is well under
# 2 KB; a multi-megabyte one would hold the event loop while it is decoded).
MAX_BEARER_TOKEN_CHARS = 8192

# The JWKS: the key set is kept this long, then fetched again, so a key removed from it stops
# verifying at that fetch. A token naming a key the set lacks may fetch it again early, at most
# once per cooldown. A fetch that fails is not retried for a few seconds (callers get 503 at once
# instead of queueing behind timeouts).
JWKS_LIFESPAN_SECONDS = 300.0
JWKS_COOLDOWN_SECONDS = 30.0
JWKS_TIMEOUT_SECONDS = 5.0
JWKS_RETRY_AFTER_SECONDS = 5


class SigningKeysUnavailable(ProblemError):
    status, code, title = 503, "jwks_unavailable", "The signing keys of user tokens are unavailable"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"Retry-After": str(JWKS_RETRY_AFTER_SECONDS)})


class _KeySetClient(PyJWKClient):
    """PyJWKClient without its per-kid cache (which would trust a removed key until restart),
    remembering when the key set in use was fetched, and failing fast after a failed fetch."""

    def __init__(self, uri: str, *, lifespan: float, cooldown: float, timeout: float) -> None:
        super().__init__(
            uri,
            cache_keys=False,
            cache_jwk_set=True,
            lifespan=lifespan,
            timeout=timeout,
            cooldown_duration=cooldown,
            headers={"User-Agent": "qbo-broker"},
        )
        self.fetched_at = -math.inf  # time.monotonic() of the last successful fetch
        self._failed_at = -math.inf

    def fetch_data(self) -> Any:
        if time.monotonic() - self._failed_at < JWKS_RETRY_AFTER_SECONDS:
            raise PyJWKClientConnectionError("the last fetch failed moments ago")
        try:
            data = super().fetch_data()
        except (PyJWKClientError, PyJWKSetError, ValueError):  # ValueError: not JSON
            self._failed_at = time.monotonic()
            raise
        self.fetched_at = time.monotonic()
        return data


class JWTVerifier:
    def __init__(
        self,
        settings: Settings,
        *,
        jwks_lifespan: float = JWKS_LIFESPAN_SECONDS,
        jwks_cooldown: float = JWKS_COOLDOWN_SECONDS,
        jwks_timeout: float = JWKS_TIMEOUT_SECONDS,
    ) -> None:
        self._settings = settings
        self._jwks_lifespan = jwks_lifespan
        self._jwks = (
            _KeySetClient(
                settings.jwt_jwks_url, lifespan=jwks_lifespan, cooldown=jwks_cooldown, timeout=jwks_timeout
            )
            if settings.jwt_jwks_url
            else None
        )
        # token -> (claims, time.monotonic() until which it may be trusted without a new look)
        self._verified: dict[str, tuple[dict[str, Any], float]] = {}

    @property
    def configured(self) -> bool:
        s = self._settings
        return bool(s.jwt_secret or s.jwt_public_key or self._jwks)

    def remembered(self, token: str) -> dict[str, Any] | None:
        """The claims of a token verified earlier and not yet expired; None otherwise."""
        hit = self._verified.get(token)
        if hit is None:
            return None
        claims, until = hit
        return claims if claims["exp"] > time.time() and time.monotonic() < until else None

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, if valid. Verified tokens are remembered until they expire (a
        JWT cannot change, so there is nothing to invalidate), and one verified with a key from
        the JWKS no longer than that key set is trusted."""
        if len(token) > MAX_BEARER_TOKEN_CHARS:
            raise Unauthorized("The bearer token is too long.")
        hit = self.remembered(token)
        if hit is not None:
            return hit
        claims, until = await self._verify(token)
        self._verified[token] = (claims, until)
        if len(self._verified) > _VERIFIED_MAX:
            self._verified.pop(next(iter(self._verified)))
        return claims

    def _jwks_key(self, token: str) -> tuple[Any, float]:
        """The JWKS key the token names, and until when the key set it came from is current.
        Runs in a thread: PyJWKClient fetches synchronously."""
        assert self._jwks is not None
        try:
            key = self._jwks.get_signing_key_from_jwt(token).key
        except (PyJWKClientConnectionError, PyJWKSetError, ValueError):
            raise SigningKeysUnavailable(
                "The signing keys of user tokens could not be fetched; retry shortly."
            ) from None
        except jwt.PyJWTError:
            raise Unauthorized("The bearer token's signing key is unknown.") from None
        return key, self._jwks.fetched_at + self._jwks_lifespan

    async def _verify(self, token: str) -> tuple[dict[str, Any], float]:
        s = self._settings
        until = math.inf
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
            # PyJWKClient fetches synchronously; keep the event loop free.
            key, until = await asyncio.to_thread(self._jwks_key, token)
        else:
            raise Unauthorized("The bearer token's algorithm is not accepted.")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=s.jwt_audience,
                issuer=s.jwt_issuer,
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
        exp = int(claims["exp"])
        if s.jwt_max_lifetime_seconds is not None:
            iat = claims.get("iat")
            # PyJWT has checked that a present iat is a number (or a numeric string).
            start = int(iat) if iat is not None else int(time.time())
            if exp - start > s.jwt_max_lifetime_seconds:
                raise Unauthorized("The bearer token's lifetime is longer than the broker accepts.")
        return {**claims, "exp": exp}, until


def issue_dev_token(
    secret: str,
    *,
    tenant_id: str,
    user_id: str,
    ttl_seconds: int = 12 * 3600,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """An HS256 token as the cieTrade frontend would send, for development and tests."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "tenant_id": tenant_id, "iat": now, "exp": now + ttl_seconds}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
