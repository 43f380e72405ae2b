"""The baseline for bench/gateway_overhead.py: a minimal hand-written Starlette + httpx reverse
proxy doing the gateway's forwarding and nothing else.

`/connections/{id}/quickbooks/{path}` goes to `{RAW_PROXY_UPSTREAM}/v3/company/{realm}/{path}`
with the caller's query string (plus `minorversion` when absent), its end-to-end headers (minus
its credentials, plus a fixed Bearer token and `Accept: application/json` when absent), and the
body streamed both ways. No caller authentication, token lookup, refresh, throttle or retry:
what is left is the cost of forwarding itself.

    uvicorn raw_proxy:create_app --factory --app-dir bench   (RAW_PROXY_UPSTREAM,
    RAW_PROXY_REALM and RAW_PROXY_ACCESS_TOKEN in the environment)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

_DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"authorization",
        b"x-api-key",
        b"content-length",
    }
)
_NOT_RETURNED = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"date", b"server"})


def create_app() -> Starlette:
    upstream = os.environ["RAW_PROXY_UPSTREAM"].rstrip("/")
    realm = os.environ["RAW_PROXY_REALM"]
    bearer = b"Bearer " + os.environ["RAW_PROXY_ACCESS_TOKEN"].encode()
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        state["http"] = httpx.AsyncClient(
            timeout=15, limits=httpx.Limits(max_connections=200, max_keepalive_connections=50)
        )
        yield
        await state["http"].aclose()

    async def forward(request: Request) -> StreamingResponse:
        rest = request.scope["raw_path"].split(b"/", 4)[4].decode()
        query = request.scope["query_string"].decode("latin-1")
        if "minorversion=" not in query:
            query = f"{query}&minorversion=75" if query else "minorversion=75"
        headers = [(k, v) for k, v in request.headers.raw if k not in _DROPPED]
        if not any(k == b"accept" and v != b"*/*" for k, v in headers):
            headers = [(k, v) for k, v in headers if k != b"accept"]
            headers.append((b"accept", b"application/json"))
        headers.append((b"authorization", bearer))
        has_body = request.method not in ("GET", "HEAD")
        sent = state["http"].build_request(
            request.method,
            f"{upstream}/v3/company/{realm}/{rest}?{query}",
            headers=headers,
            content=request.stream() if has_body else None,
        )
        answer = await state["http"].send(sent, stream=True)
        return StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            headers={k.decode(): v.decode() for k, v in answer.headers.raw if k.lower() not in _NOT_RETURNED},
            background=BackgroundTask(answer.aclose),
        )

    return Starlette(
        routes=[
            Route(
                "/connections/{connection_id}/quickbooks/{path:path}",
                forward,
                methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            )
        ],
        lifespan=lifespan,
    )
