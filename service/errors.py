"""One exception tree for everything a caller can cause, rendered as application/problem+json."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

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
    return {status: {"description": "A problem (application/problem+json)", "content": content}
            for status in statuses}


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


class IntuitUnavailable(ProblemError):
    status, code, title = 503, "intuit_unavailable", "Intuit is not reachable right now"

    def __init__(self, detail: str | None = None, *, retry_after: int = 30, **extra: Any) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)}, **extra)


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
        {"loc": [str(part) for part in err.get("loc", ())], "msg": err.get("msg", ""),
         "type": err.get("type", "")}
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
    return ", ".join(method for method in _METHODS
                     if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
                            for route in routes))


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
        log.error("unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__,
                  exc_info=exc)
        return problem_response(ProblemError("The broker failed to handle this request."))


class ConnectionLimitReached(ProblemError):
    status, code = 409, "connection_limit_reached"
    title = "The tenant has as many connections as it may have"
