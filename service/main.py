"""create_app(): settings, lifespan (database, Intuit client, keys), middleware, errors, routers."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service import ops
from service.auth.jwt import JWTVerifier
from service.cache import Caches, ChangeFeed
from service.config import Settings
from service.connections.router import router as connections_router
from service.db.embedded import start_embedded_postgres
from service.db.engine import asyncpg_dsn, build_engine, build_sessionmaker, create_reads_pool
from service.docs import OPENAPI_PATH, install_docs
from service.errors import ErrorBoundary, Problem, install_error_handlers
from service.fastlane import FastLane
from service.gateway.proxy import Gateway
from service.gateway.router import router as gateway_router
from service.gateway.throttle import RealmThrottle
from service.intuit.client import IntuitClient
from service.oauth.router import router as oauth_router
from service.observability import BodySizeLimitMiddleware, RequestContextMiddleware
from service.runtime import Runtime
from service.tokens.background import BackgroundWorker
from service.tokens.crypto import SecretBox
from service.tokens.locks import RefreshLocks
from service.tokens.refresh import TokenRefresher

log = logging.getLogger(__name__)
GATEWAY_PATHS = re.compile(r"^/connections/[^/]+/quickbooks/")

DESCRIPTION = """
qbo-broker owns cieTrade's links to QuickBooks Online: connections, the Connect flow with Intuit,
encrypted per-user credentials, and fresh access tokens for internal services.

Authorize in Swagger UI with a user's JWT (`UserJWT`, e.g. from `qbo-broker dev-token`) or a
service API key (`ServiceAPIKey`, from `qbo-broker api-key create`). Errors are
`application/problem+json` with a stable `code`.
"""


def _document_problems(app: FastAPI) -> None:
    """Add the Problem schema that every error response refers to."""
    build = app.openapi

    def openapi() -> dict:  # type: ignore[type-arg]
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = (
                Problem.model_json_schema())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def database_url_for(settings: Settings) -> str:
    return settings.database_url or start_embedded_postgres(settings.data_dir)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database_url = database_url_for(settings)
        engine = build_engine(database_url, pool_size=settings.db_pool_size)
        caches = Caches()
        feed = ChangeFeed(asyncpg_dsn(database_url), caches)
        await feed.start()
        sessionmaker = build_sessionmaker(engine, caches)
        reads = await create_reads_pool(database_url, max_size=settings.db_pool_size)
        intuit = IntuitClient(settings)
        box = SecretBox(settings.parsed_encryption_keys)
        locks = RefreshLocks(asyncpg_dsn(database_url))
        refresher = TokenRefresher(settings, reads, intuit, box, locks, caches, watch=feed.watching)
        runtime = Runtime(settings=settings, engine=engine, sessionmaker=sessionmaker,
                          intuit=intuit, box=box, refresher=refresher, caches=caches,
                          reads=reads)
        app.state.runtime = runtime
        gateway = app.state.gateway = Gateway(settings, refresher, RealmThrottle(settings, reads))
        app.state.sessionmaker = sessionmaker
        app.state.jwt_verifier = JWTVerifier(settings)
        stop_metrics = (await ops.serve_metrics(app.state, settings)
                        if settings.metrics_port is not None else None)
        worker = BackgroundWorker(runtime) if settings.background_enabled else None
        if worker is not None:
            worker.start()
        try:
            yield
        finally:
            if stop_metrics is not None:
                await stop_metrics()
            if worker is not None:
                await worker.stop()
            await gateway.aclose()
            await refresher.aclose()
            await feed.stop()
            await locks.close()
            await reads.close()
            await intuit.aclose()
            await engine.dispose()

    app = FastAPI(
        title="qbo-broker",
        version="0.1.0",
        description=DESCRIPTION.strip(),
        lifespan=lifespan,
        # Swagger UI is service/docs.py's, with local assets; no ReDoc (its assets are not local).
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        # app.openapi() builds the document either way (openapi.yaml, the CLI).
        openapi_url=OPENAPI_PATH if settings.docs_enabled else None,
    )
    if settings.docs_enabled:
        install_docs(app, settings)
    install_error_handlers(app)
    _document_problems(app)
    app.include_router(connections_router)
    app.include_router(gateway_router)
    app.include_router(oauth_router)
    app.include_router(ops.router)
    # Innermost: its answers pass through CORS, body limits and the request context (ids,
    # metrics, logs) like the app's own.
    app.add_middleware(FastLane, state=app.state,
                       routes={route.path: route for route in connections_router.routes})  # type: ignore[attr-defined]
    # Around the app and the fast lane: any exception becomes a problem answer here, inside CORS
    # and the request context, so it carries their headers and the request id.
    app.add_middleware(ErrorBoundary)
    if settings.cors_origins:
        # Credentials only in cookie mode, where authorize sets the browser-binding cookie.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_credentials=settings.connect_binding == "cookie",
                           allow_methods=["GET", "POST", "PATCH", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Retry-After"], max_age=600)
    # The gateway streams bodies up to a limit of its own (BROKER_QUICKBOOKS_MAX_BODY_BYTES).
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes,
                       exempt=GATEWAY_PATHS)
    app.add_middleware(RequestContextMiddleware)
    return app


def openapi_yaml() -> str:
    """The OpenAPI document as YAML, independent of any environment the process runs in."""
    import yaml

    document = create_app(Settings(BROKER_RETURN_URL_ALLOWLIST=[])).openapi()  # type: ignore[call-arg]
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
