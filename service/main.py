"""create_app(): settings, lifespan (database, Intuit client, keys), middleware, errors, routers."""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service import ops
from service.connections.router import direct_routes as connection_direct_routes
from service.connections.router import router as connections_router
from service.core.body_limit import BodySizeLimitMiddleware
from service.core.config import Settings
from service.core.db.engine import asyncpg_dsn
from service.core.errors import ErrorBoundary, Problem, install_error_handlers
from service.core.observability import RequestContextMiddleware
from service.docs import OPENAPI_PATH, install_docs
from service.events import outbox
from service.gateway.proxy import Gateway
from service.gateway.router import direct_routes as gateway_direct_routes
from service.gateway.router import router as gateway_router
from service.gateway.usage import router as usage_router
from service.intuit_webhooks import router as intuit_webhooks
from service.oauth.router import router as oauth_router
from service.runtime import build_runtime
from service.streams.hub import StreamHub
from service.streams.router import router as streams_router
from service.webhooks.router import router as webhooks_router
from service.worker import BackgroundWorker

log = logging.getLogger(__name__)
OWN_BODY_LIMITS = re.compile(rf"^(/connections/[^/]+/quickbooks/|{re.escape(intuit_webhooks.PATH)}$)")

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
                Problem.model_json_schema()
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with build_runtime(settings) as runtime:
            app.state.runtime = runtime
            app.state.sessionmaker = runtime.sessionmaker
            runtime.meter.start()  # flushes, and the budget gauges, even before the first call
            streams = StreamHub(
                asyncpg_dsn(runtime.database_url),
                runtime.pool,
                channel=outbox.CHANNEL,
                queue_size=settings.stream_queue_size,
                max_streams=settings.streams_max,
                max_streams_per_tenant=settings.streams_per_tenant,
            )
            await streams.start()
            app.state.streams = streams
            gateway = app.state.gateway = Gateway(
                settings,
                runtime.refresher,
                runtime.throttle,
                runtime.meter,
            )
            stop_metrics = (
                await ops.serve_metrics(app.state, settings) if settings.metrics_port is not None else None
            )
            worker = BackgroundWorker(runtime) if settings.background_enabled else None
            if worker is not None:
                worker.start()
            # What start-up built lives as long as the process: out of the collector's sight,
            # a full collection no longer walks it (~170,000 objects; 125 ms of a stopped event
            # loop per collection on a slow machine, bench/README.md).
            gc.collect()
            gc.freeze()
            try:
                yield
            finally:
                await streams.close()
                if stop_metrics is not None:
                    await stop_metrics()
                if worker is not None:
                    await worker.stop()
                await gateway.aclose()

    app = FastAPI(
        # The broker's metrics are Prometheus's (service.core.metrics) and its logs its own:
        # FastAPI's OpenTelemetry hooks stay off, instead of looking for a provider on every
        # request.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
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
    app.include_router(usage_router)
    app.include_router(streams_router)
    app.include_router(webhooks_router)
    app.include_router(ops.router)
    app.include_router(intuit_webhooks.router)
    # Ahead of the documented routes they stand for (service.core.routing).
    app.router.routes[:0] = [*connection_direct_routes, *gateway_direct_routes]
    # Around the app: any exception becomes a problem answer here, inside CORS
    # and the request context, so it carries their headers and the request id.
    app.add_middleware(ErrorBoundary)
    if settings.cors_origins:
        # Credentials only in cookie mode, where authorize sets the browser-binding cookie.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.connect_binding == "cookie",
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "Last-Event-ID"],
            expose_headers=["X-Request-ID", "Retry-After", "X-Stream-Resumed"],
            max_age=600,
        )
    # The gateway streams bodies up to a limit of its own (BROKER_QUICKBOOKS_MAX_BODY_BYTES), and
    # Intuit's webhooks have theirs (2 MB).
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes, own_limits=OWN_BODY_LIMITS)
    app.add_middleware(RequestContextMiddleware)
    return app


def openapi_yaml() -> str:
    """The OpenAPI document as YAML, independent of any environment the process runs in."""
    import yaml

    document = create_app(Settings(BROKER_RETURN_URL_ALLOWLIST=[])).openapi()
    return str(yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100))
