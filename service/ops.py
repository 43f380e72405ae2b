"""Operational endpoints: liveness, readiness, Prometheus metrics (on the main port, or on
BROKER_METRICS_PORT when that is set)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Iterator

import sqlalchemy as sa
import uvicorn
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import State
from starlette.types import Receive, Scope, Send

from service.core.config import Settings
from service.core.db.migrations import head_revision
from service.core.errors import NotFound, ProblemError, problem_response
from service.core.httpserver import server_options
from service.core.metrics import CONNECTIONS_BY_STATUS, METRICS_DATABASE_READS, SECRETS_BY_KEY
from service.domain import Status
from service.runtime import Runtime, RuntimeDep
from service.store.connections import count_by_status
from service.tokens.rotation import count_secrets_by_key

router = APIRouter(tags=["operations"])
log = logging.getLogger(__name__)

# The database figures (connections by status, secrets by key id: two counts over whole tables)
# are read at most this often, however often and however many scrapers ask.
DATABASE_FIGURES_MAX_AGE = 30.0
_DATABASE_RETRY_SECONDS = 5.0  # after a failed read


class DatabaseFigures:
    """The database gauges of /metrics, read again once older than max_age, one read at a time
    (concurrent scrapes wait for the read in progress instead of starting their own)."""

    def __init__(self, max_age: float = DATABASE_FIGURES_MAX_AGE) -> None:
        self._max_age = max_age
        self._lock = asyncio.Lock()
        self._fresh_until = -math.inf

    async def refresh(self, rt: Runtime) -> None:
        if time.monotonic() < self._fresh_until:
            return
        async with self._lock:
            if time.monotonic() < self._fresh_until:
                return  # read by the scrape this one waited for
            try:
                await _read_database_figures(rt)
            except Exception as exc:  # metrics must still answer when the database does not
                log.warning("metrics: database gauges not refreshed: %s", type(exc).__name__)
                self._fresh_until = time.monotonic() + _DATABASE_RETRY_SECONDS
            else:
                self._fresh_until = time.monotonic() + self._max_age


async def _read_database_figures(rt: Runtime) -> None:
    METRICS_DATABASE_READS.inc()
    async with asyncio.timeout(3), rt.sessionmaker() as session:
        counts = await count_by_status(session)
        by_key = await count_secrets_by_key(session)
    for status in Status:
        CONNECTIONS_BY_STATUS.labels(status.value).set(counts.get(status.value, 0))
    SECRETS_BY_KEY.clear()
    for kid, count in by_key.items():
        SECRETS_BY_KEY.labels(kid).set(count)


def _figures(state: State) -> DatabaseFigures:
    figures: DatabaseFigures | None = getattr(state, "database_figures", None)
    if figures is None:
        figures = state.database_figures = DatabaseFigures()
    return figures


async def render_metrics(state: State) -> bytes:
    """The Prometheus exposition of this process, database gauges at most 30 s old."""
    await _figures(state).refresh(state.runtime)
    return generate_latest()


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: database reachable and migrations at head",
    responses={503: {"content": {"application/json": {}}}},
)
async def readyz(rt: RuntimeDep) -> JSONResponse:
    try:
        async with asyncio.timeout(3):
            async with rt.engine.connect() as conn:
                current = (
                    await conn.execute(sa.text("SELECT version_num FROM alembic_version"))
                ).scalar_one_or_none()
    except Exception as exc:  # any failure to reach the database means "not ready"
        log.warning("readiness: database not reachable: %s", type(exc).__name__)
        return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
    head = head_revision()
    if current != head:
        return JSONResponse(
            {"status": "unavailable", "database": "ok", "migration": current, "expected_migration": head},
            status_code=503,
        )
    return JSONResponse({"status": "ok", "database": "ok", "migration": current})


@router.get("/metrics", summary="Prometheus metrics", responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request, rt: RuntimeDep) -> Response:
    if rt.settings.metrics_port is not None:  # served on the metrics port instead
        raise NotFound("Not found.")
    return Response(await render_metrics(request.app.state), media_type=CONTENT_TYPE_LATEST)


class MetricsApp:
    """The ASGI app of BROKER_METRICS_PORT: GET /metrics; anything else is a 404 problem."""

    def __init__(self, state: State) -> None:
        self._state = state  # the broker's app.state: its runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        response: Response
        if scope["path"] != "/metrics":
            response = problem_response(NotFound("Not found."))
        elif scope["method"] not in ("GET", "HEAD"):
            error = ProblemError("Only GET is allowed here.", headers={"Allow": "GET"})
            error.status, error.code, error.title = 405, "method_not_allowed", "Method not allowed"
            response = problem_response(error)
        else:
            response = Response(await render_metrics(self._state), media_type=CONTENT_TYPE_LATEST)
        await response(scope, receive, send)


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server inside another's event loop: the main server owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_metrics(state: State, settings: Settings) -> Callable[[], Awaitable[None]]:
    """Serve MetricsApp on BROKER_METRICS_PORT in this event loop; returns the function that
    stops it. Raises OSError at once when the port cannot be bound."""
    assert settings.metrics_port is not None
    host = settings.metrics_host or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, settings.metrics_port), family=family)
    config = uvicorn.Config(
        MetricsApp(state), log_config=None, access_log=False, lifespan="off", **server_options()
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="qbo-broker-metrics-server")
    while not server.started and not task.done():  # noqa: ASYNC110 (uvicorn has no startup event)
        await asyncio.sleep(0.01)
    if task.done():
        task.result()  # its failure, if any
        raise RuntimeError("the metrics server stopped at startup")
    log.info("metrics served on %s:%d", host, settings.metrics_port)

    async def stop() -> None:
        server.should_exit = True
        await task

    return stop
