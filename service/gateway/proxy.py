"""One call through the gateway: the caller's right, a fresh token, a slot within Intuit's
limits, the request sent on (streamed), retries where they are safe, the answer streamed back.

Retries. Reads are retried on connection errors, timeouts, 429 and 5xx; writes too, because
every write carries a `requestid` (Intuit answers a repeat with the first answer). A request
body is sent again only if it was read whole before the first attempt: bodies up to
BROKER_QUICKBOOKS_RETRY_BODY_BYTES (and every batch) are; a larger one is streamed through once,
and retried only when the connection failed before any of it left. Attempts stop at
INTUIT_MAX_ATTEMPTS or when the next wait would pass the call's deadline; the wait is
exponential with full jitter, at least Intuit's Retry-After, clamped to
INTUIT_BACKOFF_MAX_SECONDS. A 401 gets one token refresh and one more try, outside that count.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.auth.callers import Caller
from service.auth.callers import Scope as CallerScope
from service.core.config import Settings
from service.core.errors import (
    IntuitUnavailableProblem,
    NotFound,
    PayloadTooLarge,
    ProblemError,
    ValidationFailed,
)
from service.core.httpclient import SpreadTransport
from service.gateway import forwarding
from service.metering.meter import CallClass, Meter, classify, outcome_for_status
from service.metering.throttle import Lease, RealmThrottle
from service.tokens.refresh import TokenRefresher
from service.tokens.view import AccessToken

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "QuickBooks-Request-Id"
# A batch is read whole (to classify it) up to this size at least.
BATCH_BUFFER_BYTES = 1024 * 1024
# Errors raised before a request could reach Intuit: nothing was sent.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class _BodyTooLarge(Exception):
    pass


@dataclass
class _Body:
    """The caller's request body: read whole (`buffered`, can be sent again) or streamed."""

    buffered: bytes | None
    prefix: bytes = b""
    rest: AsyncIterator[bytes] | None = None
    length: int | None = None
    limit: int = 0
    started: bool = False

    def content(self) -> bytes | AsyncIterator[bytes]:
        return self.buffered if self.buffered is not None else self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        self.started = True
        seen = len(self.prefix)
        yield self.prefix
        assert self.rest is not None
        async for chunk in self.rest:
            seen += len(chunk)
            if seen > self.limit:
                raise _BodyTooLarge
            yield chunk


async def _read_body(request: Request, *, limit: int, buffer: int) -> _Body:
    announced = request.headers.get("content-length")
    length = None
    if announced is not None:
        if not announced.isdigit():
            raise ValidationFailed("Content-Length must be a number.")
        length = int(announced)
        if length > limit:
            raise PayloadTooLarge(f"Request bodies to QuickBooks are limited to {limit} bytes.")
    chunks: list[bytes] = []
    seen = 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await stream.__anext__()
        except StopAsyncIteration:
            return _Body(b"".join(chunks), length=length)
        seen += len(chunk)
        if seen > limit:
            raise PayloadTooLarge(f"Request bodies to QuickBooks are limited to {limit} bytes.")
        chunks.append(chunk)
        if seen > buffer:
            return _Body(None, b"".join(chunks), stream, length, limit)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else None


class _Relay(Response):
    """Intuit's answer, relayed as it arrives; the in-flight slot is given back after its last
    byte (and renewed while a long one streams)."""

    def __init__(
        self,
        upstream: httpx.Response,
        headers: list[tuple[bytes, bytes]],
        lease: Lease,
        throttle: RealmThrottle,
        renew_every: float,
    ) -> None:
        self.status_code = upstream.status_code
        self.raw_headers = headers
        self.background = None
        self._upstream = upstream
        self._lease = lease
        self._throttle = throttle
        self._renew_every = renew_every

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        renew_at = loop.time() + self._renew_every
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            try:
                async for chunk in self._upstream.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if loop.time() > renew_at:
                        await self._throttle.renew(self._lease)
                        renew_at = loop.time() + self._renew_every
            except httpx.TransportError as exc:
                # Cut off mid-answer: the status has gone, so the caller learns it from an answer
                # that ends early (the server closes the connection).
                log.warning("QuickBooks answer cut off while relayed (%s)", type(exc).__name__)
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self._upstream.aclose()
            self._throttle.release_soon(self._lease)


class Gateway:
    def __init__(
        self,
        settings: Settings,
        refresher: TokenRefresher,
        throttle: RealmThrottle,
        meter: Meter,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._refresher = refresher
        self._throttle = throttle
        self._meter = meter
        self._base = settings.intuit_api_base_url
        # Calls go to the transport itself, not through an httpx.AsyncClient: a client would
        # keep one cookie jar for every tenant's calls (Intuit's cookies from one company's
        # answer sent with the next company's call) and add default headers, redirects and
        # auth hooks the gateway does not want, at a cost on every call. An egress proxy named
        # by the environment is still used (SpreadTransport picks it per host).
        self._transport = transport or SpreadTransport(
            httpx.Limits(max_connections=200, max_keepalive_connections=50)
        )
        self._timeout = httpx.Timeout(settings.intuit_timeout_seconds, connect=5.0, pool=5.0).as_dict()

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def forward(self, request: Request, connection_id: uuid.UUID, caller: Caller) -> Response:
        method = request.method
        caller.require_scope(CallerScope.QUICKBOOKS_READ if method == "GET" else CallerScope.QUICKBOOKS_WRITE)
        raw_path: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
        parts = raw_path.split(b"/", 4)
        path = forwarding.company_path(parts[4] if len(parts) == 5 else b"")
        view = await self._refresher.view(connection_id)
        if view is None:
            raise NotFound("No such connection.", connection_id=str(connection_id))
        token = await self._refresher.access_token(view)
        if not forwarding.REALM_ID.match(token.realm_id):
            raise NotFound("No such connection.", connection_id=str(connection_id))
        s = self._settings
        batch = path == "batch"
        body = await _read_body(
            request,
            limit=s.quickbooks_max_body_bytes,
            buffer=max(s.quickbooks_retry_body_bytes, BATCH_BUFFER_BYTES)
            if batch
            else s.quickbooks_retry_body_bytes,
        )
        if batch and body.buffered is None:
            raise PayloadTooLarge(
                "A batch request is limited to "
                f"{max(s.quickbooks_retry_body_bytes, BATCH_BUFFER_BYTES)} bytes."
            )
        query: bytes = request.scope["query_string"]
        request_id: str | None = None
        added_id = None
        if method != "GET":
            request_id, add = forwarding.request_id_for(
                connection_id=connection_id,
                query=query,
                idempotency_key=request.headers.get("idempotency-key"),
            )
            added_id = request_id if add else None
        query = forwarding.with_params(
            query, minorversion=str(s.quickbooks_minor_version), requestid=added_id
        )
        url = httpx.URL(
            f"{self._base}/v3/company/{token.realm_id}/{path}"
            + (f"?{query.decode('latin-1')}" if query else "")
        )
        call = _Call(
            self,
            view.id,
            view.tenant_id,
            token,
            method,
            url,
            batch,
            body,
            classify(method, path, body.buffered),
            list(request.headers.raw),
            request_id,
        )
        try:
            await self._meter.admit(view.tenant_id, token.realm_id, call.call_class)
            return await call.run()
        except ProblemError as error:
            if request_id is not None:
                error.headers = {**error.headers, REQUEST_ID_HEADER: request_id}
            raise

    async def _token_after_401(self, connection_id: uuid.UUID, used: AccessToken) -> AccessToken:
        """A token other than the one QuickBooks refused: one another call already got, else
        a forced refresh (shared by every call refused meanwhile, in this process and others)."""
        current = await self._refresher.view(connection_id)
        if current is None:
            raise NotFound("No such connection.", connection_id=str(connection_id))
        fresh = self._refresher.fresh_token(current)
        if fresh is not None and fresh.access_token != used.access_token:
            return fresh
        return await self._refresher.access_token(current, force=True)


class _Call:
    """The attempts of one forwarded call."""

    def __init__(
        self,
        gateway: Gateway,
        connection_id: uuid.UUID,
        tenant_id: str,
        token: AccessToken,
        method: str,
        url: httpx.URL,
        batch: bool,
        body: _Body,
        call_class: CallClass,
        headers: list[tuple[bytes, bytes]],
        request_id: str | None,
    ) -> None:
        self.g = gateway
        self.connection_id = connection_id
        self.tenant_id = tenant_id
        self.token = token
        self.method = method
        self.url = url
        self.batch = batch
        self.body = body
        self.call_class = call_class
        self.caller_headers = headers
        self.request_id = request_id

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        s = self.g._settings
        ceiling = min(s.intuit_backoff_max_seconds, s.intuit_backoff_seconds * 2**attempt)
        delay = random.uniform(0, ceiling)  # noqa: S311 (jitter, not cryptography)
        if retry_after is not None:
            delay = max(delay, min(retry_after, s.intuit_backoff_max_seconds))
        return delay

    async def _send(self) -> httpx.Response:
        headers = forwarding.request_headers(self.caller_headers, self.token.access_token)
        if self.body.buffered is None and self.body.length is not None:
            headers.append((b"content-length", str(self.body.length).encode()))
        # A read without a body goes without one (not an empty one, which costs a second write).
        content = None if self.method == "GET" and self.body.buffered == b"" else self.body.content()
        request = httpx.Request(
            self.method, self.url, headers=headers, content=content, extensions={"timeout": self.g._timeout}
        )
        response = await self.g._transport.handle_async_request(request)
        response.request = request
        return response

    def _unavailable(self) -> IntuitUnavailableProblem:
        return IntuitUnavailableProblem(
            "QuickBooks did not answer; the call may be repeated"
            + (f" with the same requestid ({REQUEST_ID_HEADER})." if self.request_id else "."),
            retry_after=max(1, math.ceil(self.g._settings.intuit_backoff_max_seconds)),
            connection_id=str(self.connection_id),
        )

    async def _record(self, outcome: str) -> None:
        await self.g._meter.record(self.tenant_id, self.token.realm_id, self.call_class, outcome)

    async def run(self) -> Response:
        g, s = self.g, self.g._settings
        throttle = g._throttle
        realm = self.token.realm_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.quickbooks_deadline_seconds
        replayable = self.body.buffered is not None
        attempt = 0
        refreshed = False
        while True:
            wait = (
                s.quickbooks_queue_seconds
                if attempt == 0 and not refreshed
                else max(0.0, deadline - loop.time())
            )
            lease = await throttle.admit(realm, batch=self.batch, wait_seconds=wait)
            try:
                upstream = await self._send()
            except _BodyTooLarge:
                throttle.release_soon(lease)
                raise PayloadTooLarge(
                    f"Request bodies to QuickBooks are limited to {s.quickbooks_max_body_bytes} bytes."
                ) from None
            except httpx.TransportError as exc:
                throttle.release_soon(lease)
                sent = not isinstance(exc, _NOT_SENT)
                if sent:
                    await self._record("network_error")
                can_retry = replayable or not self.body.started
                delay = self._backoff(attempt, None)
                if can_retry and attempt + 1 < s.intuit_max_attempts and loop.time() + delay < deadline:
                    log.warning("QuickBooks call failed (%s), retrying", type(exc).__name__)
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
                raise self._unavailable() from None
            except BaseException:
                throttle.release_soon(lease)
                raise
            try:
                status = upstream.status_code
                await self._record(outcome_for_status(status))
                if status == 401 and not refreshed:
                    refreshed = True
                    if replayable:
                        await upstream.aclose()
                        throttle.release_soon(lease)
                        self.token = await g._token_after_401(self.connection_id, self.token)
                        continue
                    # A streamed body has gone: Intuit's 401 goes back, and the caller's repeat
                    # finds a good token.
                    self.token = await g._token_after_401(self.connection_id, self.token)
                retry_after = _retry_after(upstream)
                if status == 429:
                    await throttle.paused_by_intuit(realm, retry_after)
                if status == 429 or status >= 500:
                    delay = self._backoff(attempt, retry_after)
                    if replayable and attempt + 1 < s.intuit_max_attempts and loop.time() + delay < deadline:
                        await upstream.aclose()
                        throttle.release_soon(lease)
                        attempt += 1
                        await asyncio.sleep(delay)
                        continue
            except BaseException:
                await upstream.aclose()
                throttle.release_soon(lease)
                raise
            body: bytes | None = None
            length = upstream.headers.get("content-length", "")
            if length.isdigit() and int(length) <= s.quickbooks_retry_body_bytes:
                # A small answer is read before it is relayed, so that one cut off on the way
                # (Intuit's connection dropped) can still be asked for again.
                try:
                    body = b"".join([chunk async for chunk in upstream.aiter_raw()])
                except httpx.TransportError as exc:
                    throttle.release_soon(lease)
                    delay = self._backoff(attempt, None)
                    if replayable and attempt + 1 < s.intuit_max_attempts and loop.time() + delay < deadline:
                        log.warning("QuickBooks answer cut off (%s), retrying", type(exc).__name__)
                        attempt += 1
                        await asyncio.sleep(delay)
                        continue
                    raise self._unavailable() from None
                finally:
                    await upstream.aclose()
            headers = forwarding.response_headers(upstream.headers.raw)
            if self.request_id is not None:
                headers.append((REQUEST_ID_HEADER.lower().encode(), self.request_id.encode()))
            if body is not None:
                throttle.release_soon(lease)
                answer = Response(body, upstream.status_code)
                answer.raw_headers = headers  # Intuit's own Content-Length among them
                return answer
            return _Relay(upstream, headers, lease, throttle, s.quickbooks_lease_seconds / 3)
