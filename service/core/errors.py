"""One exception tree for everything a caller can cause, rendered as application/problem+json."""

from __future__ import annotations

import logging
import time
from typing import Any

import asyncpg
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.observability import loggable_path

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"


class Problem(BaseModel):
    """RFC 9457 problem details, with the broker's stable `code`."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the given error statuses."""
    content = {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    return {
        status: {"description": "A problem (application/problem+json)", "content": content}
        for status in statuses
    }


class ProblemError(Exception):
    """An error answered as RFC 9457 problem details with a stable `code`."""

    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        self.detail = detail or self.title
        self.headers = headers or {}
        self.extra = extra
        super().__init__(self.detail)

    def body(self) -> dict[str, Any]:
        # Extra fields help (connection_id, connection_status); they never replace the core ones.
        return {
            **self.extra,
            "type": f"https://qbo-broker.cietrade.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }


class Unauthorized(ProblemError):
    status, code, title = 401, "unauthorized", "Authentication required"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"}, **extra)


class Forbidden(ProblemError):
    status, code, title = 403, "forbidden", "Not allowed"


class NotFound(ProblemError):
    status, code, title = 404, "not_found", "Not found"


class ValidationFailed(ProblemError):
    status, code, title = 422, "validation_error", "The request is not valid"


class PayloadTooLarge(ProblemError):
    status, code, title = 413, "payload_too_large", "The request body is too large"


class InvalidState(ProblemError):
    status, code, title = 400, "invalid_state", "The authorization state is not valid"


class ReturnUrlNotAllowed(ProblemError):
    status, code, title = 400, "return_url_not_allowed", "The return URL is not allowed"


class CallbackError(ProblemError):
    status, code, title = 400, "invalid_callback", "The callback from Intuit is not valid"


class AuthorizationCodeRejected(ProblemError):
    status, code, title = 400, "authorization_code_rejected", "Intuit rejected the authorization"


class ReturnUrlRequired(ProblemError):
    status, code, title = 400, "return_url_required", "A return URL is required"


class CompletionNotAllowed(ProblemError):
    status, code = 403, "completion_not_allowed"
    title = "Only the user who started Connect can finish it"


class IdentityNotVerified(ProblemError):
    status, code = 502, "quickbooks_identity_not_verified"
    title = "Intuit's identity token did not verify"


class QuickBooksAccessDenied(ProblemError):
    status, code, title = 403, "quickbooks_access_denied", "QuickBooks refused access"


class QuickBooksUserBelongsToAnotherUser(ProblemError):
    status, code = 409, "quickbooks_user_belongs_to_another_user"
    title = "This QuickBooks user belongs to another cieTrade user"


class QuickBooksCompanyInUse(ProblemError):
    status, code = 409, "quickbooks_company_in_use"
    title = "This QuickBooks company is linked by another connection"


class NotConnected(ProblemError):
    status, code, title = 409, "not_connected", "The connection is not connected"


class ReauthorizationRequired(ProblemError):
    status, code, title = 409, "reauthorization_required", "QuickBooks must be connected again"


class NoPendingLink(ProblemError):
    status, code, title = 404, "no_pending_link", "There is no pending link to confirm"


class IntuitUnavailableProblem(ProblemError):
    status, code, title = 503, "intuit_unavailable", "Intuit is not reachable right now"

    def __init__(self, detail: str | None = None, *, retry_after: int = 30, **extra: Any) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)}, **extra)


class DatabaseUnavailable(ProblemError):
    status, code, title = 503, "database_unavailable", "The database is not reachable right now"

    def __init__(self, detail: str | None = None, *, retry_after: int = 5, **extra: Any) -> None:
        super().__init__(
            detail or "PostgreSQL cannot be reached right now; retry shortly.",
            headers={"Retry-After": str(retry_after)},
            **extra,
        )


class IntuitRejected(ProblemError):
    """Intuit answered something the broker cannot use (bad client credentials, a bad code)."""

    status, code, title = 502, "intuit_error", "Intuit refused the request"


def problem_response(error: ProblemError) -> JSONResponse:
    return JSONResponse(
        error.body(), status_code=error.status, headers=error.headers, media_type=PROBLEM_CONTENT_TYPE
    )


def _validation_detail(errors: list[Any]) -> list[dict[str, Any]]:
    # Echo locations and messages only: input values may hold secrets.
    return [
        {
            "loc": [str(part) for part in err.get("loc", ())],
            "msg": err.get("msg", ""),
            "type": err.get("type", ""),
        }
        for err in errors
    ]


_HTTP_CODES = {
    400: ("bad_request", "Bad request"),
    401: ("unauthorized", "Authentication required"),
    403: ("forbidden", "Not allowed"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    406: ("not_acceptable", "Not acceptable"),
    413: ("payload_too_large", "The request body is too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
}


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    """Every method the request's path answers to. Each route carries one operation, so the
    router's own 405 names only the methods of the first route whose path matched."""
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(_: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(
            ValidationFailed("The request is not valid.", errors=_validation_detail(list(exc.errors())))
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code, title = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error"))
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
        error = ProblemError(title if exc.detail is None else str(exc.detail), headers=headers)
        error.status, error.code, error.title = exc.status_code, code, title
        return problem_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Only for an error raised outside ErrorBoundary (in an outer middleware): that one
        # answers everything raised inside it.
        return problem_response(unexpected_error(exc, request.scope))


# Failures that mean "PostgreSQL cannot be reached, or is not serving, right now", not a bug: no
# connection (refused, reset, a socket gone, a timeout), a session the server ended (a shutdown,
# restart or failover: SQLSTATE classes 08 and 57, a cancelled statement included), a server
# starting up or full, a pool with no connection to give in time.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionRefusedError, ConnectionResetError, TimeoutError (asyncio's too), ...
    asyncpg.PostgresConnectionError,  # 08xxx, ConnectionDoesNotExistError
    asyncpg.exceptions.OperatorInterventionError,  # 57xxx: CannotConnectNow, AdminShutdown, ...
    asyncpg.exceptions.TooManyConnectionsError,
    sqlalchemy.exc.TimeoutError,  # the pool had no connection to give in time
)


def database_unreachable(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps: SQLAlchemy's `orig`, an explicit `raise … from`) says
    the database cannot be reached, rather than that the broker has a bug."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, _UNREACHABLE):
            return True
        if isinstance(current, asyncpg.InterfaceError) and "clos" in str(current):
            return True  # "connection is closed", "pool is closing"
        if isinstance(current, asyncpg.exceptions.InternalClientError) and "cannot switch to state" in str(
            current
        ):
            # A pooled connection the server was ending (its FATAL came in, the close not yet)
            # handed to the next statement.
            return True
        if isinstance(current, sqlalchemy.exc.DBAPIError):
            if current.connection_invalidated:  # SQLAlchemy found the connection dead
                return True
            if isinstance(current.orig, BaseException):
                pending.append(current.orig)
        if current.__cause__ is not None:
            pending.append(current.__cause__)
    return False


class _Throttled:
    """One warning per interval, however many requests fail the same way meanwhile."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0

    def warn(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        self._next = now + self._interval
        suppressed, self._suppressed = self._suppressed, 0
        log.warning(message, *args, extra={"similar_suppressed": suppressed})


_database_warnings = _Throttled(5.0)


def database_unavailable(exc: BaseException) -> DatabaseUnavailable:
    """The answer to a request that failed because the database cannot be reached (a warning
    without traceback, at most every few seconds: an outage fails every request alike)."""
    _database_warnings.warn(
        "database unreachable (%s); answering 503 database_unavailable", type(exc).__name__
    )
    return DatabaseUnavailable()


def unexpected_error(exc: BaseException, scope: Scope) -> ProblemError:
    """The answer to an exception nothing handled: 503 database_unavailable if the database
    cannot be reached, else 500 internal_error, logged here with its traceback (details stay in
    the log, under the request id; the caller gets none)."""
    if isinstance(exc, ProblemError):  # raised where no handler of the app's saw it
        return exc
    if database_unreachable(exc):
        return database_unavailable(exc)
    route = scope.get("route")
    where = getattr(route, "path", None) or loggable_path(scope.get("path", ""))
    # The class first: after the path it would read as "…/token: <value>" to the redaction.
    log.error("unhandled %s on %s %s", type(exc).__name__, scope.get("method", "?"), where, exc_info=exc)
    return ProblemError("The broker failed to handle this request.")


class ErrorBoundary:
    """ASGI middleware: answers every exception raised inside it as a problem, instead of
    letting it reach the server (which would log a second traceback and close a keep-alive
    connection). It sits inside the request context and CORS, so these answers carry
    X-Request-ID and CORS headers, and their log lines the request id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            error = unexpected_error(exc, scope)
            if started:
                # Part of an answer is out: nothing can follow it, and the server ends the
                # connection when the app returns. Logged above; not raised, so not logged again.
                return
            await problem_response(error)(scope, receive, send)


class ConnectionLimitReached(ProblemError):
    status, code = 409, "connection_limit_reached"
    title = "The tenant has as many connections as it may have"
