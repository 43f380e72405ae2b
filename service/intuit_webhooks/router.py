"""`POST /intuit/webhooks`: Intuit's notifications, verified, stored, answered at once.

Intuit is the only caller and authenticates by signing the body (`intuit-signature`) with the
app's verifier token; there are no other credentials. The body is read only up to
MAX_BODY_BYTES (counted as it streams in), verified against every configured token (a rotation
keeps two), stored byte for byte, and answered 200; the entity changes in it become events
afterwards (service.intuit_webhooks.processor). A notification captured and sent again later
verifies, is stored, and then produces nothing: its changes are known, or too old.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.core.db.notify import Waker
from service.core.errors import PayloadTooLarge, ProblemError, problem_responses
from service.intuit_webhooks import repository as repo
from service.intuit_webhooks.metrics import NOTIFICATIONS_RECEIVED
from service.intuit_webhooks.signature import verify
from service.intuit_webhooks.waker import CHANNEL
from service.runtime import RuntimeDep

PATH = "/intuit/webhooks"
MAX_BODY_BYTES = 2 * 1024 * 1024

router = APIRouter(tags=["intuit webhooks"])


class InvalidSignature(ProblemError):
    status, code, title = 401, "invalid_signature", "The intuit-signature is missing or wrong"


class WebhooksNotConfigured(ProblemError):
    status, code = 503, "intuit_webhooks_not_configured"
    title = "Intuit webhooks are not configured"

    def __init__(self) -> None:
        # Intuit retries a 503: what it sends before the token is set is not lost at once.
        super().__init__(
            "INTUIT_WEBHOOK_VERIFIER_TOKENS is not set: no notification can be "
            "verified, so none is accepted.",
            headers={"Retry-After": "300"},
        )


def _too_large() -> PayloadTooLarge:
    NOTIFICATIONS_RECEIVED.labels("too_large").inc()
    return PayloadTooLarge(f"Intuit notifications are limited to {MAX_BODY_BYTES} bytes.")


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as more than MAX_BODY_BYTES arrived (or were
    announced), before the rest is read."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _waker(request: Request) -> Waker:
    """The app's waker of the processors (one per app: it holds a task of the app's loop)."""
    state = request.app.state
    waker: Waker | None = getattr(state, "intuit_waker", None)
    if waker is None:
        waker = state.intuit_waker = Waker(CHANNEL)
    return waker


_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": "Intuit's notification, byte for byte as signed: the legacy format "
    '(`{"eventNotifications": [...]}`) or a JSON array of CloudEvents.',
    "content": {
        "application/json": {
            "schema": {"oneOf": [{"type": "object"}, {"type": "array", "items": {"type": "object"}}]}
        }
    },
}


@router.post(
    PATH,
    summary="Intuit's webhook notifications (Intuit calls this)",
    description="Verified with `intuit-signature` (base64 HMAC-SHA256 of the raw body under a "
    "verifier token in `INTUIT_WEBHOOK_VERIFIER_TOKENS`), stored and answered at "
    "once; each entity change becomes a `quickbooks.entity_changed` event for the "
    "tenant whose connection holds the company. Duplicates are dropped.",
    responses={
        200: {"description": "Stored; processed after this answer"},
        **problem_responses(401, 413, 503),
    },
    openapi_extra={
        "requestBody": _REQUEST_BODY,
        "parameters": [
            {"name": "intuit-signature", "in": "header", "required": True, "schema": {"type": "string"}}
        ],
    },
)
async def receive_notification(request: Request, runtime: RuntimeDep) -> dict[str, str]:
    tokens = runtime.settings.intuit_webhook_verifier_tokens
    if not tokens:
        NOTIFICATIONS_RECEIVED.labels("not_configured").inc()
        raise WebhooksNotConfigured()
    signature = request.headers.get("intuit-signature")
    if not signature:
        NOTIFICATIONS_RECEIVED.labels("missing_signature").inc()
        raise InvalidSignature("The request carries no intuit-signature header.")
    body = await _read_body(request)
    if not verify(signature, body, tokens):
        NOTIFICATIONS_RECEIVED.labels("bad_signature").inc()
        raise InvalidSignature(
            "The intuit-signature does not match the body under any configured verifier token."
        )
    await repo.store(runtime.pool, body)
    _waker(request).wake(runtime.pool)
    NOTIFICATIONS_RECEIVED.labels("accepted").inc()
    return {"status": "accepted"}
