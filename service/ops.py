"""Operational endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging

import sqlalchemy as sa
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.connections.repository import count_by_status
from service.connections.schemas import Status
from service.db.migrations import head_revision
from service.metrics import CONNECTIONS_BY_STATUS, SECRETS_BY_KEY
from service.runtime import RuntimeDep
from service.tokens.rotation import count_secrets_by_key

router = APIRouter(tags=["operations"])
log = logging.getLogger(__name__)


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database reachable and migrations at head",
            responses={503: {"content": {"application/json": {}}}})
async def readyz(rt: RuntimeDep) -> JSONResponse:
    try:
        async with asyncio.timeout(3):
            async with rt.engine.connect() as conn:
                current = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))
                           ).scalar_one_or_none()
    except Exception as exc:  # any failure to reach the database means "not ready"
        log.warning("readiness: database not reachable: %s", type(exc).__name__)
        return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
    head = head_revision()
    if current != head:
        return JSONResponse({"status": "unavailable", "database": "ok", "migration": current,
                             "expected_migration": head}, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok", "migration": current})


@router.get("/metrics", summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(rt: RuntimeDep) -> Response:
    try:
        async with asyncio.timeout(3), rt.sessionmaker() as session:
            counts = await count_by_status(session)
            by_key = await count_secrets_by_key(session)
        for status in Status:
            CONNECTIONS_BY_STATUS.labels(status.value).set(counts.get(status.value, 0))
        SECRETS_BY_KEY.clear()
        for kid, count in by_key.items():
            SECRETS_BY_KEY.labels(kid).set(count)
    except Exception as exc:  # metrics must still answer when the database does not
        log.warning("metrics: database gauges not refreshed: %s", type(exc).__name__)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
