"""GET /status and GET /connections/{id}/token, answered before FastAPI's machinery.

These are the broker's hottest reads: the link icon polls /status, and internal services fetch
tokens all day (and in bursts, when a batch job starts). For a caller this layer can identify
without the database (a valid JWT, or an API key in the cache), it answers them with the same
functions the app's endpoints use (the caches, their loaders, the refresher), skipping FastAPI's
routing, dependency solving and validation, which cost more than everything else in a cached
request.

It answers what the app would, and only successes: an API key to look up, a caller without the
right, a query string it does not recognise, an unknown connection, or any other request goes
on to the app unchanged, which answers (and fills the caches). The errors rendered here are a
refresh's own outcome (reauthorization_required, intuit_unavailable, …) and a database that
cannot be reached (database_unavailable), with the app's problem renderer: handing them to the
app would only repeat the work to fail again. It sits inside every other middleware, so its
answers get the same CORS headers, request ids, metrics and access logs as the app's.
tests/test_fastlane.py compares the two answers byte for byte.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import parse_qsl

from fastapi.security.utils import get_authorization_scheme_param
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from service.auth.api_keys import MAX_API_KEY_CHARS, hash_key
from service.auth.callers import Caller
from service.auth.callers import Scope as CallerScope
from service.auth.jwt import MAX_BEARER_TOKEN_CHARS, REJECTED_JWT
from service.connections.schemas import TenantId
from service.connections.service import link_status_body
from service.errors import (
    ProblemError,
    database_unavailable,
    database_unreachable,
    problem_response,
)
from service.metrics import FAST_LANE_ANSWERS

STATUS_PATH = "/status"
TOKEN_PREFIX, TOKEN_SUFFIX = "/connections/", "/token"

_TENANT_ID = TypeAdapter(TenantId)
# In the order Starlette's Response writes them: the endpoint's own, then length and type.
_NO_STORE = [(b"cache-control", b"no-store")]  # the token endpoint's own header
_JSON = b"application/json"
# Longer credentials are the app's to refuse, unread here ("Bearer " and some spaces).
_MAX_AUTHORIZATION_BYTES = MAX_BEARER_TOKEN_CHARS + 64


class _Oversized(Exception):
    pass


def _credentials(scope: Scope) -> tuple[str | None, str | None]:
    """(Authorization, X-API-Key), the first of each, as Starlette reads them. Raises _Oversized
    for a value too long to be valid, before decoding it."""
    authorization = api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            if authorization is None:
                if len(value) > _MAX_AUTHORIZATION_BYTES:
                    raise _Oversized
                authorization = value.decode("latin-1")
        elif name == b"x-api-key" and api_key is None:
            if len(value) > MAX_API_KEY_CHARS:
                raise _Oversized
            api_key = value.decode("latin-1")
    return authorization, api_key


async def _caller(state: State, scope: Scope) -> Caller | None:
    """The caller, as service.auth.dependencies.authenticate finds them, when that needs no
    database: an API key in the cache, or a valid JWT. None whenever that function would have
    other work (an API key to look up) or an error to tell: the app does that."""
    try:
        authorization, api_key = _credentials(scope)
    except _Oversized:  # the app refuses it (or, next to a valid API key, ignores it)
        return None
    if api_key:  # the API key wins, as in authenticate()
        if len(api_key) > MAX_API_KEY_CHARS:
            return None
        cached: Caller | None = state.runtime.caches.api_keys.get(hash_key(api_key))
        return cached
    scheme, token = get_authorization_scheme_param(authorization)
    if not (authorization and scheme and token) or scheme.lower() != "bearer":
        return None
    if len(token) > MAX_BEARER_TOKEN_CHARS:
        return None
    verifier = state.jwt_verifier
    claims = verifier.remembered(token)
    if claims is None:
        if not verifier.configured:
            return None
        try:
            claims = await verifier.verify(token)
        except ProblemError as rejected:
            # The app says so, without verifying the token again.
            scope.setdefault("state", {})[REJECTED_JWT] = (token, rejected)
            return None
    return Caller(kind="user", subject=claims["sub"], tenant_id=claims["tenant_id"])


class FastLane:
    """ASGI middleware: the cached 200 answers of GET /status and GET /connections/{id}/token."""

    def __init__(self, app: ASGIApp, *, state: State, routes: dict[str, Any]) -> None:
        self.app = app
        self._state = state  # the broker's app.state: runtime and jwt_verifier, once started
        self._status_route = routes[STATUS_PATH]
        self._token_route = routes[TOKEN_PREFIX + "{connection_id}" + TOKEN_SUFFIX]
        self._count_status = FAST_LANE_ANSWERS.labels(STATUS_PATH)
        self._count_token = FAST_LANE_ANSWERS.labels(self._token_route.path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path")
                and hasattr(self._state, "runtime")):
            path = scope["path"]
            answer: tuple[bytes, list[tuple[bytes, bytes]]] | ProblemError | None = None
            if path == STATUS_PATH:
                route, counter = self._status_route, self._count_status
            else:
                route, counter = self._token_route, self._count_token
            try:
                if path == STATUS_PATH:
                    answer = await self._status(scope)
                elif path.startswith(TOKEN_PREFIX) and path.endswith(TOKEN_SUFFIX):
                    answer = await self._token(scope, path[len(TOKEN_PREFIX):-len(TOKEN_SUFFIX)])
            except ProblemError:  # the app will say why, in its own words
                answer = None
            except Exception as exc:
                # PostgreSQL cannot be reached: the app could only fail the same way again.
                if not database_unreachable(exc):
                    raise
                answer = database_unavailable(exc)
            if isinstance(answer, ProblemError):
                scope["route"] = route
                counter.inc()
                await problem_response(answer)(scope, receive, send)
                return
            if answer is not None:
                body, headers = answer
                scope["route"] = route  # for the request metrics' route label
                counter.inc()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [*headers, (b"content-length", str(len(body)).encode()),
                                        (b"content-type", _JSON)]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    async def _status(self, scope: Scope) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
        query = scope["query_string"]
        requested = None
        if query:
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
            if len(pairs) != 1 or pairs[0][0] != "tenant_id":
                return None
            requested = pairs[0][1]
            try:  # the app's own validation of the parameter; anything else is its to refuse
                _TENANT_ID.validate_python(requested)
            except ValidationError:
                return None
        caller = await _caller(self._state, scope)
        if caller is None:
            return None
        body = await link_status_body(self._state.runtime, caller.tenant_for_read(requested))
        return body, []

    async def _token(self, scope: Scope,
                     connection_id: str) -> tuple[bytes, list[tuple[bytes, bytes]]] | ProblemError | None:
        if scope["query_string"]:  # force_refresh, or anything else: the app decides
            return None
        runtime = self._state.runtime
        caller = await _caller(self._state, scope)
        if caller is None:
            return None
        caller.require_scope(CallerScope.TOKENS_READ)
        # Cached under the canonical id; anything else is parsed, and left to the app's
        # validation unless it is a canonical id.
        view = runtime.caches.connections.get(connection_id)
        if view is None:
            try:
                parsed = uuid.UUID(connection_id)
            except ValueError:
                return None
            if str(parsed) != connection_id:
                return None
            view = await runtime.refresher.view(parsed)
            if view is None:  # the app says 404 its own way
                return None
        token = runtime.refresher.fresh_token(view)
        if token is None:  # a refresh (or the reason there can be none): as the app would
            try:
                token = await runtime.refresher.access_token(view)
            except ProblemError as error:
                return error
        return token.body(runtime.intuit.api_base_url), _NO_STORE
