"""Intuit's OAuth 2.0, OpenID and CompanyInfo endpoints, through Authlib over one httpx client.

Endpoints come from Intuit's discovery document (cached); retries are bounded, with backoff and
jitter, and only where a retry cannot make things worse. Tokens never reach a log line; Intuit's
`intuit_tid` does.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import time
import warnings
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import jwt
from authlib.integrations.base_client.errors import OAuthError

with warnings.catch_warnings():
    # Authlib prefers the httpx2 fork when installed; this service is built on httpx.
    warnings.filterwarnings("ignore", message="The httpx module is deprecated")
    from authlib.integrations.httpx_client import AsyncOAuth2Client

from service.core.config import Settings
from service.core.httpclient import SpreadTransport
from service.core.metrics import INTUIT_CALLS, INTUIT_LATENCY
from service.intuit.errors import (
    IntuitError,
    IntuitProtocolError,
    IntuitUnavailable,
    InvalidClient,
    InvalidGrant,
    InvalidIdToken,
    InvalidToken,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_DISCOVERY_TTL_SECONDS = 3600.0
_JWKS_TTL_SECONDS = 3600.0
# A kid we have not seen may be a new signing key: fetch again, but at most this often.
_JWKS_REFETCH_SECONDS = 60.0
_ID_TOKEN_LEEWAY_SECONDS = 120
_MINOR_VERSION = "75"


@dataclass(frozen=True)
class TokenSet:
    access_token: str
    refresh_token: str
    expires_in: int
    refresh_token_expires_in: int
    refresh_token_hard_expires_in: int | None
    id_token: str | None = None  # only a code exchange with the openid scope carries one

    def __repr__(self) -> str:  # never print tokens, even in a debugger or a traceback
        return f"TokenSet(expires_in={self.expires_in})"


@dataclass(frozen=True)
class QuickBooksUser:
    sub: str
    email: str | None
    name: str | None


@dataclass(frozen=True)
class Discovery:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    revocation_endpoint: str
    userinfo_endpoint: str
    jwks_uri: str | None


class _UnstoredTokenClient(AsyncOAuth2Client):  # type: ignore[misc]
    """Authlib's client, minus remembering the last token: one client serves every connection."""

    def parse_response_token(self, resp: httpx.Response) -> dict[str, Any]:
        try:
            token = resp.json()
        except ValueError:
            raise IntuitProtocolError(
                f"token endpoint answered {resp.status_code} without JSON",
                intuit_tid=resp.headers.get("intuit_tid"),
            ) from None
        if not isinstance(token, dict):
            raise IntuitProtocolError(
                "token endpoint answered a non-object", intuit_tid=resp.headers.get("intuit_tid")
            )
        if "error" in token:
            error = OAuthError(error=token["error"], description=token.get("error_description"))
            error.intuit_tid = resp.headers.get("intuit_tid")
            raise error
        return token


def _same(value: object, expected: str) -> bool:
    return isinstance(value, str) and hmac.compare_digest(value.encode(), expected.encode())


def _find_key(keys: jwt.PyJWKSet | None, kid: str) -> jwt.PyJWK | None:
    for key in keys.keys if keys is not None else []:
        if key.key_id == kid:
            return key
    return None


def _retry_after(response: httpx.Response) -> int | None:
    value = response.headers.get("retry-after", "")
    return int(value) if value.isdigit() else None


def _raise_for_unavailable(response: httpx.Response) -> httpx.Response:
    """429 and 5xx mean Intuit did not do the work: report them as unavailable."""
    if response.status_code == 429 or response.status_code >= 500:
        raise IntuitUnavailable(
            f"Intuit answered {response.status_code}",
            intuit_tid=response.headers.get("intuit_tid"),
            retry_after=_retry_after(response),
        )
    return response


class IntuitClient:
    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._sleep = sleep
        self._discovery: Discovery | None = None
        self._discovery_at = 0.0
        self._discovery_lock = asyncio.Lock()
        self._jwks: jwt.PyJWKSet | None = None
        self._jwks_at = -_JWKS_TTL_SECONDS
        self._jwks_lock = asyncio.Lock()
        self._oauth = _UnstoredTokenClient(
            client_id=settings.intuit_client_id,
            client_secret=settings.intuit_client_secret,
            token_endpoint_auth_method="client_secret_basic",  # noqa: S106 (a method name)
            code_challenge_method="S256",
            scope=settings.intuit_scopes,
            redirect_uri=settings.redirect_uri,
            timeout=httpx.Timeout(settings.intuit_timeout_seconds, connect=5.0),
            # As many idle connections kept as refreshes may run at once: a storm of refreshes
            # then reuses connections instead of opening (in production, TLS-handshaking) new
            # ones for all but the first few; spread over small pools (SpreadTransport).
            transport=transport
            or SpreadTransport(
                httpx.Limits(
                    max_connections=max(100, settings.refresh_concurrency),
                    max_keepalive_connections=settings.refresh_concurrency,
                )
            ),
            event_hooks={"response": [self._log_response]},
        )
        for hook in ("access_token_response", "refresh_token_response"):
            self._oauth.register_compliance_hook(hook, _raise_for_unavailable)

    async def aclose(self) -> None:
        await self._oauth.aclose()

    @property
    def api_base_url(self) -> str:
        return self._settings.intuit_api_base_url

    async def _log_response(self, response: httpx.Response) -> None:
        # Only the path: query strings may carry codes or tokens.
        log.info(
            "intuit answered",
            extra={
                "intuit_path": response.request.url.path,
                "intuit_status": response.status_code,
                "intuit_tid": response.headers.get("intuit_tid"),
            },
        )

    # -- discovery ---------------------------------------------------------------------------

    async def discovery(self) -> Discovery:
        now = time.monotonic()
        if self._discovery and now - self._discovery_at < _DISCOVERY_TTL_SECONDS:
            return self._discovery
        async with self._discovery_lock:
            if self._discovery and time.monotonic() - self._discovery_at < _DISCOVERY_TTL_SECONDS:
                return self._discovery
            response = await self._call(
                "discovery",
                lambda: self._oauth.request(
                    "GET",
                    self._settings.intuit_discovery_url,
                    headers={"Accept": "application/json"},
                    withhold_token=True,
                ),
            )
            if response.status_code != 200:
                raise IntuitUnavailable(f"discovery document answered {response.status_code}")
            try:
                doc = response.json()
                self._discovery = Discovery(
                    issuer=doc["issuer"],
                    authorization_endpoint=doc["authorization_endpoint"],
                    token_endpoint=doc["token_endpoint"],
                    revocation_endpoint=doc["revocation_endpoint"],
                    userinfo_endpoint=doc["userinfo_endpoint"],
                    jwks_uri=doc.get("jwks_uri"),
                )
            except (ValueError, KeyError, TypeError):
                raise IntuitProtocolError("discovery document is not usable") from None
            self._discovery_at = time.monotonic()
            return self._discovery

    # -- authorization -------------------------------------------------------------------------

    async def authorization_url(
        self, state: str, *, code_verifier: str | None = None, nonce: str | None = None
    ) -> str:
        """Intuit's authorization URL; with PKCE (S256) and an OpenID nonce when given."""
        endpoint = (await self.discovery()).authorization_endpoint
        extra = {"nonce": nonce} if nonce else {}
        url, _ = self._oauth.create_authorization_url(
            endpoint, state=state, code_verifier=code_verifier, **extra
        )
        return str(url)

    async def exchange_code(self, code: str, *, code_verifier: str | None = None) -> TokenSet:
        endpoint = (await self.discovery()).token_endpoint
        extra = {"code_verifier": code_verifier} if code_verifier else {}
        # A code is single-use: retry only when the request cannot have reached Intuit.
        return await self._token_request(
            "token.authorization_code",
            lambda: self._oauth.fetch_token(
                endpoint,
                grant_type="authorization_code",
                code=code,
                redirect_uri=self._settings.redirect_uri,
                headers=self._token_headers(),
                **extra,
            ),
            retry_after_send=False,
        )

    async def verify_id_token(self, id_token: str, *, nonce: str | None) -> dict[str, Any]:
        """The id_token's claims, after checking its RS256 signature against the discovery
        document's JWKS, `iss`, `aud` (this app), `exp`, and the nonce sent with the request.
        Raises InvalidIdToken."""
        discovery = await self.discovery()
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise InvalidIdToken("the id_token is not a JWT") from None
        if header.get("alg") != "RS256":
            raise InvalidIdToken("the id_token is not signed with RS256")
        key = await self._signing_key(str(header.get("kid") or ""))
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key=key,
                algorithms=["RS256"],
                audience=self._settings.intuit_client_id,
                issuer=discovery.issuer,
                leeway=_ID_TOKEN_LEEWAY_SECONDS,
                options={"require": ["iss", "aud", "exp", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidIdToken(f"the id_token did not verify ({type(exc).__name__})") from None
        if nonce is not None and not _same(claims.get("nonce"), nonce):
            raise InvalidIdToken("the id_token's nonce is not the one this authorization sent")
        return claims

    async def _signing_key(self, kid: str) -> jwt.PyJWK:
        keys = await self._key_set(refetch=False)
        found = _find_key(keys, kid)
        if found is None and time.monotonic() - self._jwks_at >= _JWKS_REFETCH_SECONDS:
            found = _find_key(await self._key_set(refetch=True), kid)
        if found is None:
            raise InvalidIdToken("the id_token is signed with a key Intuit does not publish")
        return found

    async def _key_set(self, *, refetch: bool) -> jwt.PyJWKSet | None:
        fresh = time.monotonic() - self._jwks_at < _JWKS_TTL_SECONDS
        if self._jwks is not None and fresh and not refetch:
            return self._jwks
        async with self._jwks_lock:
            if refetch and time.monotonic() - self._jwks_at < _JWKS_REFETCH_SECONDS:
                return self._jwks  # another caller fetched meanwhile
            uri = (await self.discovery()).jwks_uri
            if not uri:
                raise InvalidIdToken("Intuit's discovery document names no jwks_uri")
            response = await self._with_retries(
                "jwks",
                lambda: self._oauth.request(
                    "GET", uri, headers={"Accept": "application/json"}, withhold_token=True
                ),
                retry_after_send=True,
            )
            data = self._json_or_raise(response, "jwks")
            try:
                self._jwks = jwt.PyJWKSet.from_dict(data)
            except jwt.PyJWTError:
                raise IntuitProtocolError("Intuit's JWKS holds no usable key") from None
            self._jwks_at = time.monotonic()
            return self._jwks

    async def refresh(self, refresh_token: str) -> TokenSet:
        endpoint = (await self.discovery()).token_endpoint
        # Retrying a refresh whose answer was lost is safe: if Intuit rotated, the retry gets
        # invalid_grant, which is the truth about that token.
        return await self._token_request(
            "token.refresh_token",
            lambda: self._oauth.fetch_token(
                endpoint,
                grant_type="refresh_token",
                refresh_token=refresh_token,
                headers=self._token_headers(),
            ),
            retry_after_send=True,
        )

    async def revoke(self, token: str) -> None:
        endpoint = (await self.discovery()).revocation_endpoint
        response = await self._with_retries(
            "revoke",
            lambda: self._oauth.post(
                endpoint,
                json={"token": token},
                auth=self._basic_auth(),
                headers={"Accept": "application/json"},
            ),
            retry_after_send=True,
        )
        if response.status_code == 401:
            raise InvalidClient(
                "Intuit refused the client credentials", intuit_tid=response.headers.get("intuit_tid")
            )
        if response.status_code not in (200, 204):
            # 400 for a token Intuit no longer knows: it is as revoked as it can be.
            log.warning(
                "revocation answered %s",
                response.status_code,
                extra={"intuit_tid": response.headers.get("intuit_tid")},
            )

    # -- identity and company -----------------------------------------------------------------

    async def userinfo(self, access_token: str) -> QuickBooksUser:
        endpoint = (await self.discovery()).userinfo_endpoint
        response = await self._with_retries(
            "userinfo",
            lambda: self._oauth.request(
                "GET",
                endpoint,
                headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
                withhold_token=True,
            ),
            retry_after_send=True,
        )
        data = self._json_or_raise(response, "userinfo")
        sub = data.get("sub")
        if not isinstance(sub, str) or not sub:
            raise IntuitProtocolError("userinfo has no sub", intuit_tid=response.headers.get("intuit_tid"))
        name = (
            " ".join(p for p in (data.get("givenName"), data.get("familyName")) if isinstance(p, str) and p)
            or None
        )
        email = data.get("email") if isinstance(data.get("email"), str) else None
        return QuickBooksUser(sub=sub, email=email, name=name)

    async def company_name(
        self,
        realm_id: str,
        access_token: str,
        *,
        on_sent: Callable[[int | None], Awaitable[None]] | None = None,
        admitted: Callable[[], AbstractAsyncContextManager[object]] | None = None,
        on_throttled: Callable[[int | None], Awaitable[None]] | None = None,
    ) -> str | None:
        """The company's name. `on_sent` hears of every attempt that reached Intuit (an
        Accounting API call Intuit meters): its status, or None when its answer was lost.
        `admitted`, when given, is entered around each attempt (the company's throttle);
        `on_throttled` hears of each 429, with its Retry-After (inside `admitted`)."""
        url = f"{self.api_base_url}/v3/company/{realm_id}/companyinfo/{realm_id}"

        async def attempt() -> httpx.Response:
            try:
                async with admitted() if admitted is not None else nullcontext():
                    response: httpx.Response = await self._oauth.request(
                        "GET",
                        url,
                        params={"minorversion": _MINOR_VERSION},
                        headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
                        withhold_token=True,
                    )
                    if on_throttled is not None and response.status_code == 429:
                        # Paused before the slot goes back, so no call waiting for it goes first.
                        await on_throttled(_retry_after(response))
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
                raise  # never sent
            except httpx.TransportError:
                if on_sent is not None:
                    await on_sent(None)
                raise
            if on_sent is not None:
                await on_sent(response.status_code)
            return response

        response = await self._with_retries("companyinfo", attempt, retry_after_send=True)
        data = self._json_or_raise(response, "companyinfo")
        info = data.get("CompanyInfo")
        if not isinstance(info, dict):
            raise IntuitProtocolError("CompanyInfo missing", intuit_tid=response.headers.get("intuit_tid"))
        name = info.get("CompanyName") or info.get("LegalName")
        return name if isinstance(name, str) else None

    # -- plumbing ------------------------------------------------------------------------------

    def _basic_auth(self) -> httpx.BasicAuth:
        return httpx.BasicAuth(
            self._settings.intuit_client_id or "", self._settings.intuit_client_secret or ""
        )

    @staticmethod
    def _token_headers() -> dict[str, str]:
        return {
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded;charset=UTF-8",
            "x-include-refresh-token-hard-expires-in": "true",
        }

    @staticmethod
    def _json_or_raise(response: httpx.Response, what: str) -> dict[str, Any]:
        tid = response.headers.get("intuit_tid")
        if response.status_code in (401, 403):
            raise InvalidToken(f"{what} refused the access token ({response.status_code})", intuit_tid=tid)
        if response.status_code != 200:
            raise IntuitProtocolError(f"{what} answered {response.status_code}", intuit_tid=tid)
        try:
            data = response.json()
        except ValueError:
            raise IntuitProtocolError(f"{what} answered without JSON", intuit_tid=tid) from None
        if not isinstance(data, dict):
            raise IntuitProtocolError(f"{what} answered a non-object", intuit_tid=tid)
        return data

    async def _token_request(
        self, endpoint: str, call: Callable[[], Awaitable[dict[str, Any]]], *, retry_after_send: bool
    ) -> TokenSet:
        try:
            raw = await self._with_retries(endpoint, call, retry_after_send=retry_after_send)
        except OAuthError as exc:
            tid = getattr(exc, "intuit_tid", None)
            if exc.error == "invalid_grant":
                raise InvalidGrant(
                    exc.description or "invalid_grant",
                    intuit_tid=tid,
                    after_lost_response=getattr(exc, "after_lost_response", False),
                ) from None
            if exc.error == "invalid_client":
                raise InvalidClient("Intuit refused the client credentials", intuit_tid=tid) from None
            raise IntuitProtocolError(f"token endpoint error: {exc.error}", intuit_tid=tid) from None
        try:
            return TokenSet(
                access_token=str(raw["access_token"]),
                refresh_token=str(raw["refresh_token"]),
                expires_in=int(raw.get("expires_in", 3600)),
                refresh_token_expires_in=int(raw.get("x_refresh_token_expires_in", 8726400)),
                refresh_token_hard_expires_in=(
                    int(raw["x_refresh_token_hard_expires_in"])
                    if "x_refresh_token_hard_expires_in" in raw
                    else None
                ),
                id_token=str(raw["id_token"]) if raw.get("id_token") else None,
            )
        except (KeyError, ValueError, TypeError):
            raise IntuitProtocolError("token answer is missing fields") from None

    async def _call(self, endpoint: str, call: Callable[[], Awaitable[T]]) -> T:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await call()
            status = getattr(result, "status_code", 200)
            outcome = "ok" if status < 400 else str(status)
            return result
        except OAuthError as exc:
            outcome = str(exc.error)
            raise
        except IntuitUnavailable:
            outcome = "unavailable"
            raise
        except httpx.TimeoutException:
            outcome = "timeout"
            raise
        except httpx.TransportError:
            outcome = "transport_error"
            raise
        finally:
            INTUIT_CALLS.labels(endpoint, outcome).inc()
            INTUIT_LATENCY.labels(endpoint).observe(time.perf_counter() - started)

    async def _with_retries(
        self, endpoint: str, call: Callable[[], Awaitable[T]], *, retry_after_send: bool
    ) -> T:
        """Run call, retrying transient failures a bounded number of times.

        `retry_after_send` says whether a request that may already have reached Intuit can be
        sent again (false for single-use codes).
        """
        attempts = self._settings.intuit_max_attempts
        last: IntuitUnavailable | None = None
        # Any attempt whose answer was lost may have been carried out, whatever came after it.
        maybe_processed = False
        for attempt in range(1, attempts + 1):
            try:
                result = await self._call(endpoint, call)
                if isinstance(result, httpx.Response):
                    _raise_for_unavailable(result)
                return result
            except OAuthError as exc:
                exc.after_lost_response = maybe_processed
                raise
            except IntuitUnavailable as exc:
                last = exc
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                last = IntuitUnavailable(f"cannot reach Intuit ({type(exc).__name__})")
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = IntuitUnavailable(
                    f"Intuit's answer was lost ({type(exc).__name__})", maybe_processed=True
                )
                if not retry_after_send:
                    raise last from None
            maybe_processed = maybe_processed or last.maybe_processed
            if attempt < attempts:
                await self._sleep(self._backoff(attempt, last.retry_after))
        assert last is not None
        last.maybe_processed = maybe_processed
        log.warning(
            "intuit %s unavailable after %d attempts: %s",
            endpoint,
            attempts,
            last,
            extra={"intuit_tid": last.intuit_tid},
        )
        raise last

    def _backoff(self, attempt: int, retry_after: int | None) -> float:
        base = self._settings.intuit_backoff_seconds * (2 ** (attempt - 1))
        delay = random.uniform(0, base)  # noqa: S311 (jitter, not cryptography)  full jitter
        if retry_after is not None:
            delay = max(delay, min(float(retry_after), self._settings.intuit_backoff_max_seconds))
        return min(delay, self._settings.intuit_backoff_max_seconds)


__all__ = ["IntuitClient", "IntuitError", "QuickBooksUser", "TokenSet", "Discovery"]
