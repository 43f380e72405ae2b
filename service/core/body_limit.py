"""Request bodies over the limit are refused with 413 before any handler sees a part of them."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import PayloadTooLarge, problem_response
from service.core.observability import header


class BodySizeLimitMiddleware:
    """Refuse bodies over the limit, whether announced by Content-Length or streamed. Paths that
    `own_limits` matches are passed through: their handlers bound their bodies themselves."""

    def __init__(self, app: ASGIApp, max_bytes: int, own_limits: re.Pattern[str] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.own_limits = own_limits  # paths whose endpoints bound their bodies themselves

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.own_limits is not None and self.own_limits.match(scope["path"])):
            await self.app(scope, receive, send)
            return
        length = header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE") and length is None:
            await self.app(scope, receive, send)
            return
        # Read the (small, bounded) body up front, so an oversized stream is refused with 413
        # before any handler sees a part of it; then replay it to the app.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = PayloadTooLarge(f"Request bodies are limited to {self.max_bytes} bytes.")
        await problem_response(refusal)(scope, receive, send)
