"""Builds the emulator's ASGI app: Intuit's pages and endpoints plus the `/_emulator` API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from .accounting import accounting_router
from .config import EmulatorSettings
from .control import control_router
from .flow import flow_router
from .oauth import oauth_router
from .state import Store


def create_app(settings: EmulatorSettings | None = None) -> FastAPI:
    """One emulated Intuit app registration (client) with its own in-memory world."""
    settings = settings or EmulatorSettings()
    store = Store(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await store.webhooks.start()
        try:
            yield
        finally:
            await store.webhooks.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="Intuit emulator",
        description="A local stand-in for Intuit's OAuth 2.0, OpenID and Accounting API "
        "(CompanyInfo, entities, query, batch, CDC, reports, upload) endpoints, with a control "
        "API under /_emulator.",
        docs_url="/_emulator/docs",
        redoc_url=None,
        openapi_url="/_emulator/openapi.json",
    )
    app.state.emulator = store
    app.include_router(oauth_router(store))
    app.include_router(accounting_router(store))  # after oauth's CompanyInfo route
    app.include_router(flow_router(store))
    app.include_router(control_router(store))

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        # A landing page for humans who open the emulator's base URL in a browser.
        return HTMLResponse(
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Intuit emulator</title>"
            "</head><body style='font-family:sans-serif;max-width:640px;margin:40px auto'>"
            "<h1 style='color:#2CA01C'>Intuit emulator</h1>"
            "<p>Local stand-in for Intuit OAuth 2.0. Start a Connect from the app; "
            "this server plays Intuit's part.</p><ul>"
            "<li><a href='/.well-known/openid_sandbox_configuration'>Discovery document</a></li>"
            "<li><a href='/_emulator/users'>Users</a> and "
            "<a href='/_emulator/grants'>grants</a></li>"
            "<li><a href='/_emulator/docs'>Control API</a></li></ul></body></html>"
        )

    return app
